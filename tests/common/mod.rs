//! Shared helpers for the integration suite. These tests need `/dev/iommu` and a VFIO device: on a
//! host without them they are `#[ignore]`d (and reported as ignored); `cargo xtask vm-test` runs them
//! inside the test VM with `--include-ignored`, and `cargo xtask hw-test` on real hardware.
#![allow(dead_code)]

use std::time::{Duration, Instant};

use iommufd::{BoundDevice, Iommufd, PciRegion, RegionMapping, VfioDevice};

/// The reason every test here is ignored on the host.
pub const NEEDS: &str = "needs /dev/iommu and a VFIO device: run by cargo xtask vm-test";

/// Which IOMMU the VM emulates (`intel` or `virtio`), or `hardware` on a real machine.
pub fn iommu() -> String {
    std::env::var("IOMMUFD_TEST_IOMMU").expect("IOMMUFD_TEST_IOMMU is set by the VM init or hw-test")
}

/// The PCI address of the device under test: `IOMMUFD_TEST_DEVICE` (hardware mode) or the VM's edu.
pub fn device_address() -> String {
    std::env::var("IOMMUFD_TEST_DEVICE")
        .or_else(|_| std::env::var("IOMMUFD_TEST_EDU_BDF"))
        .expect("IOMMUFD_TEST_DEVICE or IOMMUFD_TEST_EDU_BDF names the device under test")
}

/// The edu device's address (only in the VM).
pub fn edu_address() -> String {
    std::env::var("IOMMUFD_TEST_EDU_BDF").expect("IOMMUFD_TEST_EDU_BDF is set by the VM init")
}

/// Opens the device under test by PCI address and binds it.
pub fn bind(iommufd: &Iommufd) -> BoundDevice {
    VfioDevice::open_pci(&device_address()).expect("open device cdev").bind(iommufd).expect("bind")
}

/// Number of open fds of this process.
pub fn fd_count() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

/// A driver for QEMU's `edu` device: its DMA engine copies between RAM (by IOVA) and a 4 KiB buffer
/// inside the device at device address 0x40000.
pub struct Edu {
    pub bar: RegionMapping,
}

pub const EDU_BUF: u64 = 0x40000;
const REG_ID: usize = 0x00;
const REG_LIVENESS: usize = 0x04;
const REG_DMA_SRC: usize = 0x80;
const REG_DMA_DST: usize = 0x88;
const REG_DMA_COUNT: usize = 0x90;
const REG_DMA_CMD: usize = 0x98;
const CMD_START: u64 = 1;
const CMD_TO_RAM: u64 = 2;

impl Edu {
    /// Maps BAR0 and enables bus mastering (vfio-pci leaves it off, and DMA silently does nothing).
    pub fn new(device: &BoundDevice) -> Edu {
        let bar = device.map_region(PciRegion::Bar(0).index()).expect("mmap edu BAR0");
        let id = bar.read_u32(REG_ID).unwrap();
        assert_eq!(id & 0xffff, 0x00ed, "edu id register reads {id:#x}");
        bar.write_u32(REG_LIVENESS, 0x1234_5678).unwrap();
        assert_eq!(bar.read_u32(REG_LIVENESS).unwrap(), !0x1234_5678u32, "edu liveness check");
        device.set_bus_master(true).expect("enable bus mastering");
        Edu { bar }
    }

    fn dma(&self, src: u64, dst: u64, len: u64, cmd: u64) {
        assert!(len <= 4096);
        self.wait_idle();
        self.bar.write_u64(REG_DMA_SRC, src).unwrap();
        self.bar.write_u64(REG_DMA_DST, dst).unwrap();
        self.bar.write_u64(REG_DMA_COUNT, len).unwrap();
        self.bar.write_u64(REG_DMA_CMD, cmd | CMD_START).unwrap();
        self.wait_idle();
    }

    fn wait_idle(&self) {
        let start = Instant::now();
        while self.bar.read_u64(REG_DMA_CMD).unwrap() & CMD_START != 0 {
            assert!(start.elapsed() < Duration::from_secs(20), "edu DMA did not complete in 20 s");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Device reads `len` bytes of RAM at `iova` into its buffer.
    pub fn ram_to_device(&self, iova: u64, len: u64) {
        self.dma(iova, EDU_BUF, len, 0);
    }

    /// Device writes `len` bytes of its buffer to RAM at `iova`.
    pub fn device_to_ram(&self, iova: u64, len: u64) {
        self.dma(EDU_BUF, iova, len, CMD_TO_RAM);
    }
}

/// A recognisable pattern for `len` bytes, different for each `seed`.
pub fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ 0x5a).collect()
}

/// True if `id` names no object of `iommufd`. Only called for ids whose handles are gone: if one were
/// still alive this would destroy it, and the assertion around it fail.
pub fn gone(iommufd: &iommufd::Iommufd, id: u32) -> bool {
    // SAFETY: the handle that owned `id` has been dropped or closed; were the object still alive, the
    // caller's assertion fails anyway.
    unsafe { iommufd.destroy_raw(id) }.err().and_then(|e| e.errno()) == Some(iommufd::Errno::NOENT)
}

/// The kernel refuses to destroy `id` because something still uses it (so it is alive, untouched).
pub fn busy(iommufd: &iommufd::Iommufd, id: u32) -> bool {
    // SAFETY: a destroy refused with EBUSY changes nothing; if it succeeded the caller's assertion fails.
    unsafe { iommufd.destroy_raw(id) }.err().and_then(|e| e.errno()) == Some(iommufd::Errno::BUSY)
}

/// Warnings and errors this crate logs (through the `log` crate), captured so a test can assert that
/// a teardown logged nothing: `Drop` reports failures only there.
pub mod logs {
    use std::sync::{Mutex, Once};

    static LINES: Mutex<Vec<String>> = Mutex::new(Vec::new());

    struct Capture;

    impl log::Log for Capture {
        fn enabled(&self, metadata: &log::Metadata<'_>) -> bool {
            metadata.level() <= log::Level::Warn
        }
        fn log(&self, record: &log::Record<'_>) {
            if self.enabled(record.metadata()) {
                LINES.lock().unwrap_or_else(|e| e.into_inner()).push(record.args().to_string());
            }
        }
        fn flush(&self) {}
    }

    /// Starts capturing (once per test binary) and forgets what was captured so far.
    pub fn start() {
        static INSTALL: Once = Once::new();
        INSTALL.call_once(|| {
            log::set_logger(&Capture).expect("no other logger in this test binary");
            log::set_max_level(log::LevelFilter::Warn);
        });
        take();
    }

    /// What was logged since the last call.
    pub fn take() -> Vec<String> {
        std::mem::take(&mut *LINES.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

/// A memfd of `len` bytes mapped shared into this process, with every `step` bytes written so the
/// file's pages exist: `map_file` maps them, and the mock's `check_map`/`check_refs` compare against
/// `va`. Unmapped on drop (the kernel pins the file's pages itself, so unmapping this view never
/// frees memory a device can reach).
pub struct SharedMemfd {
    pub fd: std::os::fd::OwnedFd,
    pub va: *mut u8,
    pub len: usize,
}

impl SharedMemfd {
    pub fn new(name: &str, len: usize, hugetlb: bool, step: usize) -> SharedMemfd {
        let mut flags = rustix::fs::MemfdFlags::CLOEXEC;
        if hugetlb {
            flags |= rustix::fs::MemfdFlags::HUGETLB;
        }
        let fd = rustix::fs::memfd_create(name, flags).expect("memfd_create");
        rustix::fs::ftruncate(&fd, len as u64).expect("ftruncate memfd");
        // SAFETY: a fresh shared mapping of the memfd at a kernel-chosen address aliases nothing; it is
        // unmapped in Drop and accessed only through raw pointers.
        let va = unsafe {
            rustix::mm::mmap(
                std::ptr::null_mut(),
                len,
                rustix::mm::ProtFlags::READ | rustix::mm::ProtFlags::WRITE,
                rustix::mm::MapFlags::SHARED,
                &fd,
                0,
            )
        }
        .expect("mmap memfd")
        .cast::<u8>();
        for off in (0..len).step_by(step) {
            // SAFETY: inside the writable shared mapping created above; populates the file's pages.
            unsafe { va.add(off).write_volatile((off / step) as u8 + 1) };
        }
        SharedMemfd { fd, va, len }
    }
}

impl Drop for SharedMemfd {
    fn drop(&mut self) {
        // SAFETY: the mapping created in `new`, unmapped once.
        let _ = unsafe { rustix::mm::munmap(self.va.cast(), self.len) };
    }
}

/// A mediated device instance created through the mdev sysfs interface
/// (`/sys/class/mdev_bus/<parent>/mdev_supported_types/<type>/create`) for one test, and removed
/// (`/sys/bus/mdev/devices/<uuid>/remove`) when dropped. Drop every handle of the device first: the
/// kernel waits for its cdev to be closed before it removes it.
pub struct Mdev {
    pub uuid: String,
    pub sysfs: std::path::PathBuf,
}

impl Mdev {
    /// Creates an instance of `mdev_type` (`mtty-2`, `mbochs-small`) of the parent device `parent`
    /// (`mtty`, `mbochs`), named by a fresh UUID. Needs root (the VM's tests run as root).
    pub fn create(parent: &str, mdev_type: &str) -> Mdev {
        let create = format!("/sys/class/mdev_bus/{parent}/mdev_supported_types/{mdev_type}/create");
        let uuid = std::fs::read_to_string("/proc/sys/kernel/random/uuid").expect("read a random UUID");
        let uuid = uuid.trim().to_string();
        std::fs::write(&create, &uuid).unwrap_or_else(|e| panic!("write {uuid} to {create}: {e}"));
        Mdev { sysfs: std::path::PathBuf::from("/sys/bus/mdev/devices").join(&uuid), uuid }
    }

    /// The instance's VFIO cdev, `/dev/vfio/devices/vfioN`, from `<sysfs>/vfio-dev/vfioN`.
    pub fn cdev(&self) -> std::path::PathBuf {
        let dir = self.sysfs.join("vfio-dev");
        let entries = std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
        let name = entries
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .find(|n| n.starts_with("vfio"))
            .unwrap_or_else(|| panic!("no vfioN in {}", dir.display()));
        std::path::PathBuf::from("/dev/vfio/devices").join(name)
    }

    /// Opens the instance's cdev by its UUID and binds it to `iommufd`.
    pub fn bind(&self, iommufd: &Iommufd) -> BoundDevice {
        let dev = VfioDevice::open_mdev(&self.uuid).expect("open mdev cdev");
        assert_eq!(dev.name(), Some(self.uuid.as_str()), "the cdev's device is the instance");
        dev.bind(iommufd).expect("bind mdev")
    }
}

impl Drop for Mdev {
    fn drop(&mut self) {
        if let Err(e) = std::fs::write(self.sysfs.join("remove"), "1") {
            eprintln!("removing mdev {}: {e}", self.uuid);
        }
    }
}

/// The kernel release the VM booted (`IOMMUFD_TEST_KERNEL`, set by the VM init: `7.3.4`, `6.12.95`);
/// `None` elsewhere (hardware runs rely on the probe: [`predates`]).
pub fn kernel() -> Option<String> {
    std::env::var("IOMMUFD_TEST_KERNEL").ok()
}

/// True if the running kernel is known to be older than Linux `release` (`"6.15"`), from the
/// side-effect-free probe ([`iommufd::Capabilities::predates`]); checked against the VM's kernel
/// release when the VM names it, so a wrong probe fails the test instead of changing what it asserts.
pub fn predates(release: &str) -> bool {
    // The probe's answers are fixed for the running kernel: probe once per test binary.
    static CAPABILITIES: std::sync::OnceLock<iommufd::Capabilities> = std::sync::OnceLock::new();
    let capabilities = CAPABILITIES
        .get_or_init(|| Iommufd::open().expect("open /dev/iommu").capabilities().expect("probe").clone());
    let probed = capabilities.predates(release);
    if let Some(running) = kernel() {
        let version = |v: &str| -> (u32, u32) {
            let mut parts = v.split('.').map(|p| p.parse::<u32>().expect("numeric release"));
            (parts.next().unwrap_or(0), parts.next().unwrap_or(0))
        };
        // A kernel between releases that added no iommufd ioctl cannot be dated by the probe; the VM's
        // kernels are not such kernels.
        assert_eq!(probed, version(&running) < version(release), "probe vs kernel {running} for {release}");
    }
    probed
}

/// Asserts that `result` is exactly the [`iommufd::Error::Unsupported`] a kernel older than `since`
/// gives for `op`, with `errno`.
#[track_caller]
pub fn assert_unsupported<T: std::fmt::Debug>(
    result: &iommufd::Result<T>,
    op: &str,
    since: &str,
    errno: iommufd::Errno,
) {
    match result {
        Err(iommufd::Error::Unsupported { op: o, since: s, errno: e }) => {
            assert_eq!((*o, *s, *e), (op, since, errno), "the Unsupported names the operation and release")
        }
        other => panic!("expected Unsupported {{ {op}, since {since}, {errno:?} }}, got {other:?}"),
    }
}

/// True if the kernel's mock IOMMU devices cannot be tested in this VM: then the calling test reports
/// itself skipped by design (a `@@xtask skip NAME REASON` line on the console, which `cargo xtask
/// vm-test` counts and prints in its summary) and must return at once:
/// `if common::mock_devices_unavailable() { return; }`.
///
/// The VM init sets `IOMMUFD_TEST_NO_MOCK` to the reason, for example on Linux 6.12 under intel-iommu,
/// whose IOMMU core gives mock devices to the Intel driver (every mock-domain operation then fails
/// with `EINVAL`); the same kernel under virtio-iommu runs these tests.
pub fn mock_devices_unavailable() -> bool {
    use std::io::Write;
    let Ok(reason) = std::env::var("IOMMUFD_TEST_NO_MOCK") else { return false };
    // Only where the kernel is known to lack them: a misconfigured VM must not turn tests into skips.
    assert!(
        iommu() == "intel" && kernel().is_some_and(|k| k.starts_with("6.12.")),
        "IOMMUFD_TEST_NO_MOCK is set on {} / {:?}, where mock devices work",
        iommu(),
        kernel()
    );
    let name = std::thread::current().name().unwrap_or("unnamed").replace(' ', "_");
    // Straight to the process's stderr: libtest captures only the print macros.
    let _ = writeln!(std::io::stderr(), "@@xtask skip {name} {reason}");
    true
}

/// On a kernel older than `since` ([`predates`]), asserts that `result` is exactly the
/// [`iommufd::Error::Unsupported`] for `op` with `errno` and returns true: the test has then checked
/// what that kernel can do and ends. On a newer kernel returns false, leaving `result` to the test.
#[track_caller]
pub fn unsupported_here<T: std::fmt::Debug>(
    result: &iommufd::Result<T>,
    op: &str,
    since: &str,
    errno: iommufd::Errno,
) -> bool {
    if !predates(since) {
        return false;
    }
    assert_unsupported(result, op, since, errno);
    true
}

/// True on Linux 6.12 under virtio-iommu, whose driver sets a domain's aperture only when the domain
/// is first attached: a HWPT allocated explicitly (`Hwpt::alloc`) has an empty aperture when iommufd
/// adds it to its IOAS, which leaves the IOAS no usable IOVA (a map at a fixed IOVA is `EINVAL`, an
/// automatic one `ENOSPC`). Later kernels allocate virtio-iommu domains finalised. An IOAS attached
/// directly (the kernel's own domain, attached at once) is not affected.
pub fn allocated_hwpt_has_no_aperture() -> bool {
    std::env::var("IOMMUFD_TEST_IOMMU").is_ok_and(|i| i == "virtio")
        && kernel().is_some_and(|k| k.starts_with("6.12."))
}

/// A mock device with PASID support on `ioas`; `None` on a kernel older than 6.15, after asserting the
/// exact `Unsupported` that kernel gives for the flag (the calling test has then checked what it can
/// and ends).
#[cfg(feature = "testing")]
pub fn pasid_mock_device(ioas: &iommufd::Ioas) -> Option<iommufd::testing::MockDevice> {
    use iommufd::testing::{MockDevice, MockDeviceFlags};
    let r = MockDevice::with_flags(ioas, MockDeviceFlags::PASID);
    let op = "IOMMU_TEST_OP_MOCK_DOMAIN_FLAGS (MOCK_FLAGS_DEVICE_PASID)";
    if unsupported_here(&r, op, "6.15", iommufd::Errno::INVAL) {
        return None;
    }
    Some(r.expect("mock device with PASID"))
}

/// Runs `f` in a `fork()`ed child and returns the child's exit code: what `f` returned, 101 if it
/// panicked. Values `f` uses are the child's copies; the parent's stay as they were.
pub fn in_child(f: impl FnOnce() -> i32) -> i32 {
    // SAFETY: the VM suite runs tests one at a time (--test-threads=1); the child runs `f` and _exits,
    // never returning into the test harness.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork: {}", std::io::Error::last_os_error());
    if pid == 0 {
        let code = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).unwrap_or(101);
        // SAFETY: ends the child without running the parent's harness or destructors.
        unsafe { libc::_exit(code) };
    }
    let mut status = 0;
    // SAFETY: waits for the child just forked; `status` is a valid out-pointer.
    assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
    assert!(libc::WIFEXITED(status), "child died: status {status:#x}");
    libc::WEXITSTATUS(status)
}
