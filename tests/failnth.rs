//! Fault-injection sweeps: every kernel failure point an SDK call sequence passes through is made to
//! fail, one at a time, through the kernel's per-thread `/proc/thread-self/fail-nth`
//! (`CONFIG_FAULT_INJECTION`, with `FAILSLAB`, `FAIL_PAGE_ALLOC` and the mock IOMMU's own
//! `fail_iommufd` points).
//!
//! For n = 1, 2, ... the sequence runs with the n-th failure point armed (only while an SDK call of
//! the sequence runs), until a run passes every point without reaching the n-th: the points that run
//! passed are the injection points the sequence has. After every run, whatever it returned:
//!
//! - nothing panicked, and every failure came from a call during which the injected fault fired;
//! - with every handle dropped, each kernel object id the run recorded is gone (`IOMMU_DESTROY`
//!   answers `ENOENT`);
//! - no file descriptor leaked (the entries of `/proc/self/fd` are the same as before the run);
//! - no page stays pinned (the mock's `check_refs` on the memfd pages the sequence maps and on the
//!   buffer, when the run got it back);
//!
//! and a clean run of the sequence right after each faulted one succeeds and passes the same checks.
//! The number of points each sequence hit is printed (it shows in the VM console), and must be above a
//! floor that proves the injection reached the kernel paths behind the calls.
//!
//! Build with `--features testing`; the tests need `/dev/iommu` from a kernel with
//! `CONFIG_IOMMUFD_TEST` and `CONFIG_FAULT_INJECTION_DEBUG_FS`, so they are ignored on the host and
//! run by `cargo xtask vm-test`.
#![cfg(feature = "testing")]

mod common;

use std::collections::BTreeMap;
use std::fs::File;
use std::os::fd::AsFd;
use std::os::unix::fs::FileExt;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::time::Instant;

use iommufd::testing::{self, MockAccess, MockDevice, PageRequest};
use iommufd::{
    Access, DmaBuffer, Errno, Error, FaultPerm, FaultQueue, Hwpt, HwptFlags, Iommufd, Iova, PageResponse,
    ResponseCode, Vdevice, Veventq, VfioDevice, Viommu, page_size,
};

/// Most injection points a sequence may have: reaching this many fails the test (raise it if the
/// kernel grows more points on these paths).
const MAX_POINTS: u32 = 400;
/// The mock sequence must pass more injection points than this, or injection did not work.
const MOCK_MIN_POINTS: u32 = 10;
/// The access sequence must pass more injection points than this.
const ACCESS_MIN_POINTS: u32 = 10;
/// The edu sequence must pass more injection points than this.
const EDU_MIN_POINTS: u32 = 5;
/// Pages of the `DmaBuffer` each sequence maps.
const BUF_PAGES: usize = 4;
/// Pages of the memfd the mock sequence maps with `map_file`.
const MEMFD_PAGES: usize = 4;
/// Wall-clock budget of one sweep (TCG is slow, but a sweep far beyond this means something loops).
const SWEEP_BUDGET_SECS: u64 = 60;

/// The fault-injection knobs of debugfs this test sets, restored on drop.
struct DebugfsSetup {
    saved: Vec<(String, String)>,
}

impl DebugfsSetup {
    /// Lets fail-nth fail any allocation (not only those that cannot sleep) and silences the per-failure
    /// stack dumps, which on a serial console under TCG would dominate the run time.
    fn apply() -> DebugfsSetup {
        let root = "/sys/kernel/debug";
        let mut knobs: Vec<(String, &str)> = vec![
            (format!("{root}/failslab/ignore-gfp-wait"), "N"),
            (format!("{root}/fail_page_alloc/ignore-gfp-wait"), "N"),
            (format!("{root}/fail_page_alloc/ignore-gfp-highmem"), "N"),
        ];
        let dirs =
            std::fs::read_dir(root).unwrap_or_else(|e| panic!("{root} (debugfs) is not readable: {e}"));
        for dir in dirs.flatten() {
            let name = dir.file_name().to_string_lossy().into_owned();
            if name.starts_with("fail") {
                knobs.push((format!("{root}/{name}/verbose"), "0"));
            }
        }
        assert!(
            std::path::Path::new(&format!("{root}/fail_iommufd")).exists(),
            "no {root}/fail_iommufd: the kernel lacks CONFIG_IOMMUFD_TEST or CONFIG_FAULT_INJECTION_DEBUG_FS"
        );
        let mut saved = Vec::new();
        for (path, value) in knobs {
            let old = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {path}: {e}"));
            std::fs::write(&path, value).unwrap_or_else(|e| panic!("write {value} to {path}: {e}"));
            saved.push((path, old.trim().to_string()));
        }
        DebugfsSetup { saved }
    }
}

impl Drop for DebugfsSetup {
    fn drop(&mut self) {
        for (path, old) in self.saved.drain(..).rev() {
            let _ = std::fs::write(&path, old);
        }
    }
}

/// New kernel log records since `start`, to report warnings the injected faults provoke in the kernel
/// (`WARN_ON` splats, BUGs): these are kernel findings, reported on the console, while the test's
/// verdict stays about what the SDK returned and left behind.
struct Kmsg {
    file: Option<File>,
}

impl Kmsg {
    fn start() -> Kmsg {
        use std::io::Seek;
        use std::os::unix::fs::OpenOptionsExt;
        let file = File::options().read(true).custom_flags(libc::O_NONBLOCK).open("/dev/kmsg").ok();
        let file = file.and_then(|mut f| f.seek(std::io::SeekFrom::End(0)).ok().map(|_| f));
        Kmsg { file }
    }

    /// Log lines since `start` that look like kernel warnings or bugs.
    fn warnings(&mut self) -> Vec<String> {
        use std::io::Read;
        let mut out = Vec::new();
        let Some(file) = &mut self.file else { return out };
        let mut buf = vec![0u8; 8192];
        // Each read returns one record; EAGAIN once there is none left.
        while let Ok(n) = file.read(&mut buf) {
            if n == 0 {
                break;
            }
            let record = String::from_utf8_lossy(&buf[..n]);
            let text = record.split_once(';').map_or(&*record, |(_, t)| t).trim_end();
            if ["WARNING:", "BUG:", "Oops", "refcount_t:", "UBSAN:", "list_del corruption"]
                .iter()
                .any(|w| text.contains(w))
            {
                out.push(text.to_string());
            }
        }
        out
    }
}

/// Makes the allocator keep the heap it has, so that Rust allocations inside an armed call do not
/// reach the kernel (`brk`/`mmap` would pass injection points of their own, and a failed one would
/// abort the process rather than fail the call).
fn keep_heap() {
    // SAFETY: mallopt only tunes the allocator's thresholds; these values are within its limits.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 16 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 512 << 20);
        libc::mallopt(libc::M_TOP_PAD, 16 << 20);
    }
    // Grow this thread's arena once and touch it, so later allocations find pages that exist.
    let mut grow: Vec<Vec<u8>> = (0..64).map(|_| vec![0u8; 64 << 10]).collect();
    for chunk in &mut grow {
        for byte in chunk.iter_mut().step_by(4096) {
            *byte = 1;
        }
    }
    std::hint::black_box(&grow);
}

/// What the armed calls of one run saw.
#[derive(Debug, Default)]
struct Outcome {
    /// The call during which the armed point fired, and what it returned.
    fired_in: Option<(&'static str, String)>,
    /// Failures of calls during which nothing fired (each one fails the test).
    unexpected: Vec<(&'static str, String)>,
}

/// `/proc/thread-self/fail-nth` of the thread running the sweep: writing n makes the n-th failure
/// point this thread passes fail; the value counts down with every point and reads 0 once it fired.
struct FailNth {
    file: File,
    /// Points still to pass before the armed one (0: disarmed, or it fired).
    remaining: u32,
    outcome: Outcome,
}

impl FailNth {
    fn open() -> File {
        File::options()
            .read(true)
            .write(true)
            .open("/proc/thread-self/fail-nth")
            .expect("/proc/thread-self/fail-nth (CONFIG_FAULT_INJECTION)")
    }

    fn new(file: &File, n: u32) -> FailNth {
        let file = file.try_clone().expect("dup fail-nth fd");
        FailNth { file, remaining: n, outcome: Outcome::default() }
    }

    fn write(&self, n: u32) {
        let text = n.to_string();
        let written = self.file.write_at(text.as_bytes(), 0).expect("write fail-nth");
        assert_eq!(written, text.len());
    }

    fn read(&self) -> u32 {
        let mut buf = [0u8; 32];
        let n = self.file.read_at(&mut buf, 0).expect("read fail-nth");
        std::str::from_utf8(&buf[..n]).unwrap().trim().parse().expect("fail-nth holds a number")
    }

    fn disarm(&self) {
        self.write(0);
    }

    /// Runs a call without injection (a check of the test's own, or a call whose kernel path cannot
    /// take injected faults); a failure is recorded as unexpected.
    fn unarmed<T, E: Into<Error>>(
        &mut self,
        what: &'static str,
        f: impl FnOnce() -> std::result::Result<T, E>,
    ) -> iommufd::Result<T> {
        let r = f().map_err(Into::into);
        if let Err(e) = &r {
            self.outcome.unexpected.push((what, describe(e)));
        }
        r
    }

    /// Runs one SDK call with the remaining count armed; notes whether the point fired during it.
    fn call<T, E: Into<Error>>(
        &mut self,
        what: &'static str,
        f: impl FnOnce() -> std::result::Result<T, E>,
    ) -> iommufd::Result<T> {
        if self.remaining == 0 {
            let r = f().map_err(Into::into);
            if let Err(e) = &r {
                self.outcome.unexpected.push((what, e.to_string()));
            }
            return r;
        }
        self.write(self.remaining);
        let r = f();
        let left = self.read();
        self.disarm();
        self.remaining = left;
        let r = r.map_err(Into::into);
        if left == 0 {
            let result = match &r {
                Ok(_) => "Ok".to_string(),
                Err(e) => describe(e),
            };
            self.outcome.fired_in = Some((what, result));
        } else if let Err(e) = &r {
            self.outcome.unexpected.push((what, describe(e)));
        }
        r
    }
}

impl Drop for FailNth {
    fn drop(&mut self) {
        self.disarm();
    }
}

/// Writes a line straight to stderr, past the test harness's output capture, so it shows in the VM
/// console for passing tests too.
fn report(line: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "{line}");
}

fn describe(e: &Error) -> String {
    format!("{e} [{e:?}]")
}

/// What a run leaves for the checks after it: the iommufd its ids belong to, the ids, and the memory
/// whose pins must be gone.
#[derive(Default)]
struct Run {
    iommufd: Option<Iommufd>,
    ids: Vec<(&'static str, u32)>,
    /// The buffer the sequence got back from its unmap, with its address, if it got that far.
    buffer: Option<DmaBuffer>,
}

impl Run {
    fn id(&mut self, what: &'static str, id: u32) {
        self.ids.push((what, id));
    }
}

/// What every sequence run shares: the memfd it maps (mapped shared into this process, so its
/// pages' pins can be counted) and an iommufd for pin checks.
struct Env {
    memfd: common::SharedMemfd,
    checker: Iommufd,
    /// The kernel predates 6.13: no `map_file`, no fault queue on a paging HWPT, no vIOMMU. The
    /// sequences then leave those steps out (their refusals are asserted by the tests of each) and
    /// take faults through a nested HWPT (6.11) instead.
    lts: bool,
}

impl Env {
    fn new() -> Env {
        // Every page written, so the kernel pins pages that exist and check_refs can see them.
        let memfd = common::SharedMemfd::new("failnth", MEMFD_PAGES * page_size(), false, page_size());
        Env { memfd, checker: Iommufd::open().expect("open /dev/iommu"), lts: common::predates("6.13") }
    }

    fn check_no_pins(&self, run: &Run) -> Result<(), String> {
        testing::check_refs(&self.checker, self.memfd.va, self.memfd.len, 0)
            .map_err(|e| format!("memfd pages are still pinned: {e}"))?;
        if let Some(buffer) = &run.buffer {
            testing::check_refs(&self.checker, buffer.as_slice().as_ptr(), buffer.len(), 0)
                .map_err(|e| format!("the returned buffer's pages are still pinned: {e}"))?;
        }
        Ok(())
    }
}

type Sequence = fn(&mut FailNth, &mut Run, &Env) -> iommufd::Result<()>;

/// A check of the test's own, as a result.
fn check(ok: bool, what: String) -> iommufd::Result<()> {
    if ok { Ok(()) } else { Err(Error::Protocol { op: "check", detail: what }) }
}

/// Converts an explicit close's error (whatever handle it may give back) into the crate's error.
fn closed<T, E: Into<Error>>(r: std::result::Result<T, E>) -> iommufd::Result<T> {
    r.map_err(Into::into)
}

/// open, IOAS, map / map_file / copy, mock device, nest-parent HWPT, replace, fault queue and a HWPT
/// with it, replace, a page fault read and answered, vIOMMU, vDEVICE, vEVENTQ, nested HWPT, a vEVENT
/// read; then an explicit teardown.
fn mock_sequence(nth: &mut FailNth, run: &mut Run, env: &Env) -> iommufd::Result<()> {
    let len = BUF_PAGES * page_size();
    let iommufd = nth.call("Iommufd::open", Iommufd::open)?;
    run.iommufd = Some(iommufd.clone());
    let ioas = nth.call("alloc_ioas", || iommufd.alloc_ioas())?;
    run.id("IOAS", ioas.id());
    // Automatic placement must stay inside the mock domain's aperture, or attaching the device later
    // fails (the domain reserves everything outside it, and a reservation cannot cover an area).
    nth.call("Ioas::allow_iovas", || ioas.allow_iovas(&[testing::APERTURE]))?;

    let mut buffer = nth.call("DmaBuffer::new", || DmaBuffer::new(len))?;
    buffer.as_mut_slice().fill(0x5a);
    let buffer_va = buffer.as_slice().as_ptr();
    let mapping = nth.call("Ioas::map", || ioas.map(buffer, Iova::Auto, Access::READ_WRITE))?;
    let file_len = (MEMFD_PAGES * page_size()) as u64;
    let file_mapping = if env.lts {
        None
    } else {
        Some(nth.call("Ioas::map_file", || {
            ioas.map_file(env.memfd.fd.as_fd(), 0, file_len, Iova::Auto, Access::READ_WRITE)
        })?)
    };
    let copy = nth.call("Ioas::copy", || ioas.copy(&mapping, Iova::Auto, Access::READ))?;

    let dev = nth.call("MockDevice::new", || MockDevice::new(&ioas))?;
    run.id("mock device", dev.id());
    run.id("automatic domain", dev.hwpt_id());
    // The mappings made before the device attached are in its domain.
    nth.unarmed("check_map(buffer)", || {
        testing::check_map(&iommufd, dev.hwpt_id(), mapping.iova(), buffer_va, len)
    })?;
    nth.unarmed("check_map(copy)", || {
        testing::check_map(&iommufd, dev.hwpt_id(), copy.iova(), buffer_va, len)
    })?;

    let parent = nth.call("Hwpt::alloc(NEST_PARENT)", || Hwpt::alloc(&dev, &ioas, HwptFlags::NEST_PARENT))?;
    run.id("nest-parent HWPT", parent.id());
    nth.call("MockDevice::replace(parent)", || dev.replace(&parent))?;
    if let Some(file_mapping) = &file_mapping {
        nth.unarmed("check_map(file)", || {
            testing::check_map(&iommufd, parent.id(), file_mapping.iova(), env.memfd.va, file_len as usize)
        })?;
    }

    let faults = nth.call("FaultQueue::alloc", || FaultQueue::alloc(&iommufd))?;
    run.id("fault queue", faults.id());
    let fault_hwpt = if env.lts {
        nth.call("Hwpt::alloc_nested_with_faults", || {
            let data = testing::nested_data(testing::IOTLB_DEFAULT);
            Hwpt::alloc_nested_with_faults(&dev, &parent, &data, HwptFlags::empty(), &faults)
        })?
    } else {
        nth.call("Hwpt::alloc_with_faults", || {
            Hwpt::alloc_with_faults(&dev, &ioas, HwptFlags::empty(), &faults)
        })?
    };
    run.id("fault HWPT", fault_hwpt.id());
    nth.call("MockDevice::replace(fault HWPT)", || dev.replace(&fault_hwpt))?;
    // A page fault through the queue, read and answered.
    let request = PageRequest { pasid: None, group: 1, perm: FaultPerm::READ, addr: 0x4000_0000 };
    nth.call("MockDevice::trigger_iopf", || dev.trigger_iopf(&request))?;
    let fired_before = nth.outcome.fired_in.is_some();
    let got = nth.call("FaultQueue::read", || faults.read())?;
    if !fired_before && nth.outcome.fired_in.is_none() {
        nth.unarmed("one fault read", || check(got.len() == 1, format!("read {got:?}")))?;
    }
    let answers: Vec<PageResponse> = got.iter().map(|f| f.response(ResponseCode::Success)).collect();
    if !answers.is_empty() {
        nth.call("FaultQueue::respond_all", || faults.respond_all(&answers))?;
    }

    let virtual_iommu = if env.lts { None } else { Some(viommu_steps(nth, run, &dev, &parent)?) };

    // Explicit teardown, children first.
    nth.call("MockDevice::replace(IOAS)", || dev.replace(&ioas))?;
    run.id("second automatic domain", dev.hwpt_id());
    if let Some((viommu, vdev, veventq, nested)) = virtual_iommu {
        nth.call("Hwpt::destroy(nested)", || closed(nested.destroy()))?;
        nth.call("Veventq::close", || closed(veventq.close()))?;
        nth.call("Vdevice::destroy", || closed(vdev.destroy()))?;
        nth.call("Viommu::destroy", || closed(viommu.destroy()))?;
    }
    nth.call("Hwpt::destroy(fault HWPT)", || closed(fault_hwpt.destroy()))?;
    nth.call("FaultQueue::close", || closed(faults.close()))?;
    nth.call("Hwpt::destroy(parent)", || closed(parent.destroy()))?;
    nth.call("Mapping::unmap(copy)", || closed(copy.unmap()))?;
    if let Some(file_mapping) = file_mapping {
        nth.call("Mapping::unmap(map_file)", || closed(file_mapping.unmap()))?;
    }
    let back = nth.call("Mapping::unmap(buffer)", || closed(mapping.unmap()))?;
    run.buffer = Some(back.expect("the copy is gone: the buffer comes back"));
    nth.call("MockDevice::close", || closed(dev.close()))?;
    nth.call("Ioas::destroy", || closed(ioas.destroy()))?;
    Ok(())
}

/// The vIOMMU part of the mock sequence (6.13 on): vIOMMU, vDEVICE, vEVENTQ, a nested HWPT on the
/// vIOMMU with the device on it, and a vEVENT read. Returns what the teardown destroys.
fn viommu_steps(
    nth: &mut FailNth,
    run: &mut Run,
    dev: &MockDevice,
    parent: &Hwpt,
) -> iommufd::Result<(Viommu, Vdevice, Veventq, Hwpt)> {
    let viommu = nth.call("Viommu::alloc", || Viommu::alloc(dev, parent, testing::VIOMMU_TYPE, None))?;
    run.id("vIOMMU", viommu.id());
    let vdev = nth.call("Vdevice::alloc", || Vdevice::alloc(&viommu, dev, 0x42))?;
    run.id("vDEVICE", vdev.id());
    let mut veventq = nth.call("Veventq::alloc", || Veventq::alloc(&viommu, testing::VEVENTQ_TYPE, 8))?;
    run.id("vEVENTQ", veventq.id());
    // A vEVENT: the mock raises it for a device on a nested page table of the vIOMMU.
    let nested = nth.call("Hwpt::alloc_nested", || {
        Hwpt::alloc_nested(dev, &viommu, &testing::nested_data(testing::IOTLB_DEFAULT), HwptFlags::empty())
    })?;
    run.id("nested HWPT", nested.id());
    nth.call("MockDevice::replace(nested)", || dev.replace(&nested))?;
    nth.call("MockDevice::trigger_vevent", || dev.trigger_vevent())?;
    let fired_before = nth.outcome.fired_in.is_some();
    let events = nth.call("Veventq::read", || veventq.read())?;
    if !fired_before && nth.outcome.fired_in.is_none() {
        nth.unarmed("one vEVENT read", || check(events.len() == 1, format!("read {events:?}")))?;
    }
    Ok((viommu, vdev, veventq, nested))
}

/// open, IOAS, map, mock device, an emulated device's access that pins pages and copies through the
/// fast and slow paths, unmap under a pin, teardown.
fn access_sequence(nth: &mut FailNth, run: &mut Run, env: &Env) -> iommufd::Result<()> {
    let len = BUF_PAGES * page_size();
    let iommufd = nth.call("Iommufd::open", Iommufd::open)?;
    run.iommufd = Some(iommufd.clone());
    let ioas = nth.call("alloc_ioas", || iommufd.alloc_ioas())?;
    run.id("IOAS", ioas.id());
    let dev = nth.call("MockDevice::new", || MockDevice::new(&ioas))?;
    run.id("mock device", dev.id());
    run.id("automatic domain", dev.hwpt_id());
    let mut buffer = nth.call("DmaBuffer::new", || DmaBuffer::new(len))?;
    buffer.as_mut_slice().fill(0x3c);
    let buffer_va = buffer.as_slice().as_ptr();
    let mapping = nth.call("Ioas::map", || ioas.map(buffer, Iova::Auto, Access::READ_WRITE))?;
    let file_len = (MEMFD_PAGES * page_size()) as u64;
    let file_mapping = if env.lts {
        None
    } else {
        Some(nth.call("Ioas::map_file", || {
            ioas.map_file(env.memfd.fd.as_fd(), 0, file_len, Iova::Auto, Access::READ_WRITE)
        })?)
    };

    let mut access = nth.call("MockAccess::with_pinning", || MockAccess::with_pinning(&ioas))?;
    let pin = nth.call("MockAccess::pin_pages_checked", || {
        access.pin_pages_checked(mapping.iova(), len as u64, Access::READ_WRITE, buffer_va)
    })?;
    nth.call("MockAccess::unpin_pages", || access.unpin_pages(pin))?;
    let data = [0xa5u8; 100];
    let mut back = [0u8; 100];
    // Across a page boundary, both kernel paths.
    let at = mapping.iova() + page_size() as u64 - 10;
    for slow in [false, true] {
        access.set_slow_path(slow);
        nth.call("MockAccess::write", || access.write(at, &data))?;
        nth.call("MockAccess::read", || access.read(at, &mut back))?;
    }
    if nth.outcome.fired_in.is_none() {
        nth.unarmed("access copy", || check(back == data, format!("read back {back:?}")))?;
    }
    // Unmapping a pinned range makes the kernel ask the access to unpin first.
    if let Some(file_mapping) = file_mapping {
        let _file_pin = nth.call("MockAccess::pin_pages(file)", || {
            access.pin_pages(file_mapping.iova(), file_len, Access::READ)
        })?;
        nth.call("Mapping::unmap(map_file, pinned)", || closed(file_mapping.unmap()))?;
    }
    let back = nth.call("Mapping::unmap(buffer)", || closed(mapping.unmap()))?;
    run.buffer = Some(back.expect("no copy: the buffer comes back"));
    drop(access);
    nth.call("MockDevice::close", || closed(dev.close()))?;
    nth.call("Ioas::destroy", || closed(ioas.destroy()))?;
    Ok(())
}

/// open -> open the edu cdev -> bind -> IOAS -> attach -> map -> unmap -> detach -> close (bind and
/// close unarmed, see below).
fn edu_sequence(nth: &mut FailNth, run: &mut Run, _env: &Env) -> iommufd::Result<()> {
    let len = BUF_PAGES * page_size();
    let iommufd = nth.call("Iommufd::open", Iommufd::open)?;
    run.iommufd = Some(iommufd.clone());
    let address = common::edu_address();
    let device = nth.call("VfioDevice::open_pci", || VfioDevice::open_pci(&address))?;
    // Binding opens the device, and the last close disables it: vfio-pci enables and disables the PCI
    // function, which evaluates the platform's ACPI _PRT method. An allocation that fails inside the
    // ACPI interpreter there leaves its object reference counts corrupt (Linux 7.3.4: "Could not
    // update object reference count", then an oops in acpi_ut_update_object_reference at the next
    // pci_disable_device). That is outside iommufd and VFIO, so these two calls run unarmed.
    let bound = nth.unarmed("VfioDevice::bind", || device.bind(&iommufd))?;
    run.id("device", bound.dev_id());
    let ioas = nth.call("alloc_ioas", || iommufd.alloc_ioas())?;
    run.id("IOAS", ioas.id());
    let attachment = nth.call("BoundDevice::attach", || bound.attach(&ioas))?;
    let mut buffer = nth.call("DmaBuffer::new", || DmaBuffer::new(len))?;
    buffer.as_mut_slice().fill(0xa5);
    let mapping = nth.call("Ioas::map", || ioas.map(buffer, Iova::Auto, Access::READ_WRITE))?;
    let back = nth.call("Mapping::unmap", || closed(mapping.unmap()))?;
    run.buffer = Some(back.expect("no copy: the buffer comes back"));
    nth.call("Attachment::detach", || closed(attachment.detach()))?;
    nth.unarmed("BoundDevice::close", || closed(bound.close()))?;
    nth.call("Ioas::destroy", || closed(ioas.destroy()))?;
    Ok(())
}

/// The checks after a run (all its handles dropped). Returns what is wrong.
fn check_after(run: &mut Run, env: &Env, fds_before: &BTreeMap<i32, String>) -> Vec<String> {
    let mut problems = Vec::new();
    if let Some(iommufd) = run.iommufd.take() {
        for (what, id) in &run.ids {
            // SAFETY: every handle of the run is dropped; if the object were still alive the test
            // fails anyway, and destroying it here is what a leak deserves.
            let r = unsafe { iommufd.destroy_raw(*id) };
            match r {
                Err(e) if e.errno() == Some(Errno::NOENT) => {}
                other => {
                    problems.push(format!("{what} {id} is still alive after the run (destroy: {other:?})"))
                }
            }
        }
    }
    if let Err(e) = env.check_no_pins(run) {
        problems.push(e);
    }
    run.buffer = None;
    let fds_after = open_fds();
    if &fds_after != fds_before {
        problems.push(format!("file descriptors differ: before {fds_before:?}, after {fds_after:?}"));
    }
    problems
}

/// The open fds of this process and what they are.
fn open_fds() -> BTreeMap<i32, String> {
    let mut fds = BTreeMap::new();
    for entry in std::fs::read_dir("/proc/self/fd").expect("/proc/self/fd").flatten() {
        let Ok(fd) = entry.file_name().to_string_lossy().parse::<i32>() else { continue };
        // The directory listing's own fd is gone by the time its link is read.
        if let Ok(target) = std::fs::read_link(entry.path()) {
            fds.insert(fd, target.to_string_lossy().into_owned());
        }
    }
    fds
}

/// Runs `sequence` without injection: it must succeed and leave nothing behind.
fn clean_run(
    name: &str,
    sequence: Sequence,
    nth_file: &File,
    env: &Env,
    fds_before: &BTreeMap<i32, String>,
    when: &str,
) {
    let mut run = Run::default();
    let mut nth = FailNth::new(nth_file, 0);
    let result = sequence(&mut nth, &mut run, env);
    let unexpected = std::mem::take(&mut nth.outcome.unexpected);
    drop(nth);
    let problems = check_after(&mut run, env, fds_before);
    if let Err(e) = result {
        panic!("{name}: the clean run {when} failed: {e} ({unexpected:?})");
    }
    assert!(problems.is_empty(), "{name}: after the clean run {when}: {problems:#?}");
}

/// Sweeps `sequence`; returns the number of injection points it has.
fn sweep(name: &str, sequence: Sequence, min_points: u32) -> u32 {
    let _debugfs = DebugfsSetup::apply();
    keep_heap();
    let env = Env::new();
    let nth_file = FailNth::open();
    let started = Instant::now();

    // A clean run first: the sequence works.
    let mut kmsg = Kmsg::start();
    let fds_before = open_fds();
    clean_run(name, sequence, &nth_file, &env, &fds_before, "before the sweep");

    let mut by_call: BTreeMap<&'static str, u32> = BTreeMap::new();
    let mut by_error: BTreeMap<String, u32> = BTreeMap::new();
    let mut recovered = 0u32;
    let mut points = None;
    for n in 1..=MAX_POINTS {
        assert!(
            started.elapsed().as_secs() < SWEEP_BUDGET_SECS,
            "{name}: the sweep took over {SWEEP_BUDGET_SECS} s (at n = {n})"
        );
        let mut run = Run::default();
        let mut nth = FailNth::new(&nth_file, n);
        let result = catch_unwind(AssertUnwindSafe(|| sequence(&mut nth, &mut run, &env)));
        nth.disarm();
        let result = match result {
            Ok(r) => r,
            Err(panic) => {
                let msg = panic
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default();
                panic!("{name}: n = {n}: the sequence panicked ({msg}); armed calls: {:?}", nth.outcome);
            }
        };
        let outcome = std::mem::take(&mut nth.outcome);
        let remaining = nth.remaining;
        drop(nth);
        let problems = check_after(&mut run, &env, &fds_before);
        assert!(problems.is_empty(), "{name}: n = {n} (fault in {:?}): {problems:#?}", outcome.fired_in);
        assert!(
            outcome.unexpected.is_empty(),
            "{name}: n = {n}: calls failed without an injected fault (fault in {:?}): {:?}",
            outcome.fired_in,
            outcome.unexpected
        );
        // A clean rerun right after the faulted one works and cleans up as well.
        clean_run(name, sequence, &nth_file, &env, &fds_before, &format!("after n = {n}"));
        match (&outcome.fired_in, &result) {
            (None, Ok(())) => {
                // Every point passed without reaching the n-th: the run passed n - remaining points.
                points = Some((n - remaining, n));
                break;
            }
            (None, Err(e)) => panic!("{name}: n = {n}: failed without an injected fault: {e}"),
            (Some((call, _)), Ok(())) => {
                recovered += 1;
                *by_call.entry(call).or_default() += 1;
            }
            (Some((call, what)), Err(e)) => {
                *by_call.entry(call).or_default() += 1;
                let class = match e {
                    Error::Ioctl { op, errno, .. } => format!("{op}: {errno}"),
                    Error::Os { op, errno } => format!("{op}: {errno}"),
                    Error::Open { errno, .. } => format!("open: {errno}"),
                    Error::Unsupported { op, .. } => format!("{op}: unsupported"),
                    Error::Protocol { .. } => {
                        panic!("{name}: n = {n}: a fault in {call} was misread as a protocol error: {what}")
                    }
                    other => format!("{other}"),
                };
                *by_error.entry(class).or_default() += 1;
            }
        }
    }
    let (points, first_clean) =
        points.unwrap_or_else(|| panic!("{name}: more than {MAX_POINTS} injection points"));

    report(&format!(
        "fail-nth {name}: {points} injection points (first clean run at n = {first_clean}) in {:.1} s; \
         faults absorbed by the kernel or SDK: {recovered}",
        started.elapsed().as_secs_f64()
    ));
    let warnings = kmsg.warnings();
    report(&format!("fail-nth {name}: kernel warnings during the sweep: {}", warnings.len()));
    for w in &warnings {
        report(&format!("fail-nth {name}: kernel: {w}"));
    }
    report(&format!("fail-nth {name}: faults by call: {by_call:?}"));
    report(&format!("fail-nth {name}: errors returned: {by_error:?}"));
    assert!(points > min_points, "{name}: only {points} injection points (expected more than {min_points})");
    points
}

#[test]
#[ignore = "needs /dev/iommu with CONFIG_IOMMUFD_TEST and fault injection: run by cargo xtask vm-test"]
fn fail_nth_sweep_mock_sequence() {
    if common::mock_devices_unavailable() {
        return;
    }
    sweep("mock", mock_sequence, MOCK_MIN_POINTS);
}

#[test]
#[ignore = "needs /dev/iommu with CONFIG_IOMMUFD_TEST and fault injection: run by cargo xtask vm-test"]
fn fail_nth_sweep_access_sequence() {
    if common::mock_devices_unavailable() {
        return;
    }
    sweep("access", access_sequence, ACCESS_MIN_POINTS);
}

#[test]
#[ignore = "needs /dev/iommu and the VM's edu device with fault injection: run by cargo xtask vm-test"]
fn fail_nth_sweep_edu_sequence() {
    sweep("edu", edu_sequence, EDU_MIN_POINTS);
}

/// `unmap_range` over two leaked mappings, with one injected kernel failure at each point in turn:
/// when the second mapping's unmap fails after the first one's succeeded, the error says how much was
/// unmapped (`Error::PartialUnmap`), and in every outcome what is left stays known and removable.
#[test]
#[ignore = "needs /dev/iommu with CONFIG_IOMMUFD_TEST and fault injection: run by cargo xtask vm-test"]
fn a_range_unmap_that_fails_part_way_reports_what_it_unmapped() {
    let _debugfs = DebugfsSetup::apply();
    let iommufd = Iommufd::open().unwrap();
    let ioas = iommufd.alloc_ioas().unwrap();
    let (base, p) = (testing::APERTURE.start, page_size() as u64);
    let nth = File::options().read(true).write(true).open("/proc/thread-self/fail-nth").unwrap();
    let arm = |n: u32| {
        let text = n.to_string();
        assert_eq!(nth.write_at(text.as_bytes(), 0).unwrap(), text.len());
    };
    let fired = || {
        let mut buf = [0u8; 16];
        let len = nth.read_at(&mut buf, 0).unwrap();
        String::from_utf8_lossy(&buf[..len]).trim() == "0"
    };
    let (mut partial, mut failed, mut n) = (0, 0, 0);
    loop {
        n += 1;
        assert!(n <= MAX_POINTS, "the unmap never ran clean");
        let _a =
            ioas.map(DmaBuffer::new(page_size()).unwrap(), Iova::Fixed(base), Access::READ).unwrap().leak();
        let _b = ioas
            .map(DmaBuffer::new(page_size()).unwrap(), Iova::Fixed(base + p), Access::READ)
            .unwrap()
            .leak();
        arm(n);
        let r = ioas.unmap_range(base, 2 * p);
        let hit = fired();
        arm(0);
        match r {
            Ok(bytes) => {
                assert_eq!(bytes, 2 * p, "n = {n}");
                if !hit {
                    break; // past the last injection point: a clean run
                }
            }
            Err(Error::PartialUnmap { unmapped, source, .. }) => {
                assert!(hit, "n = {n}: a partial unmap without an injected fault: {source}");
                assert_eq!(unmapped, p, "n = {n}: the first mapping went, the second did not");
                partial += 1;
                assert_eq!(ioas.unmap_range(base, 2 * p).unwrap(), p, "n = {n}: the rest is removable");
            }
            Err(e) => {
                assert!(hit, "n = {n}: failed without an injected fault: {e}");
                failed += 1;
                assert_eq!(ioas.unmap_range(base, 2 * p).unwrap(), 2 * p, "n = {n}: nothing went: {e}");
            }
        }
        assert_eq!(
            ioas.unmap_range(base, 2 * p).map_err(|e| e.errno()),
            Err(Some(Errno::NOENT)),
            "n = {n}: the range is empty again"
        );
    }
    report(&format!("fail-nth unmap_range: {} points, {partial} partial, {failed} failed whole", n - 1));
    assert!(partial > 0, "no injected failure landed between the two unmaps");
}
