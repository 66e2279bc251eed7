//! The soundness claims under attack: threads racing every call that changes an IOAS's areas, a
//! `fork()`ed child holding copies of the parent's guards, and file mappings whose fd forbids what the
//! mapping asks for.
//!
//! After every stress round each live guard is checked against the kernel: an emulated access (the
//! mock IOMMU's) reads the guard's IOVA and must find the guard's own buffer, and a copy of the guard
//! must succeed. A guard whose range the kernel no longer maps (the registry and the kernel out of
//! step) is a mismatch, and the test requires zero.
#![cfg(feature = "testing")]

mod common;

use std::os::fd::AsFd;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use iommufd::testing::{self, MockAccess, MockDevice};
use iommufd::{Access, DmaBuffer, Errno, Error, Hwpt, HwptFlags, Ioas, Iommufd, Iova, Mapping, page_size};

/// Rounds of the stress test, threads per round, operations per thread and round, and a time cap
/// that ends the test early on a slow machine (each round still completes and is checked).
const ROUNDS: usize = 12;
const THREADS: usize = 4;
const OPS: usize = 120;
/// Attach, replace, replace back and detach cycles of a mock device per round, racing the threads.
const ATTACHES: usize = 6;
const TIME_CAP: Duration = Duration::from_secs(20);
/// The window fixed-IOVA maps and range unmaps aim at (inside the mock aperture), in pages.
const WINDOW_PAGES: u64 = 64;

/// A small deterministic generator (xorshift64*), so a failing round can be replayed from its seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// A live guard and the tag written in the first 8 bytes of its buffer.
struct Live {
    mapping: Mapping<DmaBuffer>,
    tag: u64,
}

static NEXT_TAG: AtomicU64 = AtomicU64::new(1);

/// A buffer of `pages` pages whose first 8 bytes hold a fresh tag.
fn tagged(pages: u64) -> (DmaBuffer, u64) {
    let tag = NEXT_TAG.fetch_add(1, Ordering::Relaxed);
    let mut buf = DmaBuffer::new(pages as usize * page_size()).unwrap();
    buf.as_mut_slice()[..8].copy_from_slice(&tag.to_ne_bytes());
    (buf, tag)
}

/// The outcome counts of one stress run.
#[derive(Debug, Default)]
struct Stats {
    rounds: usize,
    ops: u64,
    maps: u64,
    unmaps: u64,
    unmap_all_ok: u64,
    unmap_range_ok: u64,
    copies: u64,
    leaks: u64,
    attaches: u64,
    checked: u64,
    mismatches: Vec<String>,
}

/// One thread's share of a round: random operations on the shared IOAS and pool.
fn worker(ioas: &Ioas, pool: &Mutex<Vec<Live>>, base: u64, seed: u64, counts: &Mutex<Stats>) {
    let page = page_size() as u64;
    let mut rng = Rng(seed | 1);
    let mut local = Stats::default();
    let take = |rng: &mut Rng| {
        let mut pool = pool.lock().unwrap();
        if pool.is_empty() {
            None
        } else {
            let i = rng.below(pool.len() as u64) as usize;
            Some(pool.swap_remove(i))
        }
    };
    for _ in 0..OPS {
        local.ops += 1;
        match rng.below(10) {
            // map at an automatic IOVA
            0 | 1 => {
                let (buf, tag) = tagged(1 + rng.below(2));
                let mapping = ioas.map(buf, Iova::Auto, Access::READ_WRITE).expect("map(Auto)");
                local.maps += 1;
                pool.lock().unwrap().push(Live { mapping, tag });
            }
            // map at a fixed IOVA in the window: refused when it overlaps (by us or the kernel)
            2 => {
                let (buf, tag) = tagged(1 + rng.below(2));
                let iova = base + rng.below(WINDOW_PAGES - 2) * page;
                match ioas.map(buf, Iova::Fixed(iova), Access::READ_WRITE) {
                    Ok(mapping) => {
                        local.maps += 1;
                        pool.lock().unwrap().push(Live { mapping, tag });
                    }
                    Err(Error::InvalidArgument { .. }) => {}
                    Err(e) if e.errno() == Some(Errno::EXIST) => {}
                    Err(e) => panic!("map(Fixed({iova:#x})): {e}"),
                }
            }
            // unmap a guard here, or drop it here (either way on another thread than mapped it)
            3 | 4 => {
                if let Some(live) = take(&mut rng) {
                    if rng.below(2) == 0 {
                        live.mapping.unmap().map_err(Error::from).expect("unmap of a live guard");
                    } else {
                        drop(live);
                    }
                    local.unmaps += 1;
                }
            }
            // unmap everything: refused while guards live, else removes leaked areas
            5 => match ioas.unmap_all() {
                Ok(_) => local.unmap_all_ok += 1,
                Err(Error::InvalidArgument { .. }) => {}
                Err(e) => panic!("unmap_all: {e}"),
            },
            // unmap a range of the window: refused over guards or cuts, ENOENT over nothing
            6 => {
                let start = base + rng.below(WINDOW_PAGES - 4) * page;
                let len = (1 + rng.below(4)) * page;
                match ioas.unmap_range(start, len) {
                    Ok(_) => local.unmap_range_ok += 1,
                    Err(Error::InvalidArgument { .. }) => {}
                    Err(e) if e.errno() == Some(Errno::NOENT) => {}
                    Err(e) => panic!("unmap_range({start:#x}, {len:#x}): {e}"),
                }
            }
            // copy a guard (the pool stays locked so the source lives through the copy)
            7 | 8 => {
                let mut pool = pool.lock().unwrap();
                if !pool.is_empty() {
                    let i = rng.below(pool.len() as u64) as usize;
                    let tag = pool[i].tag;
                    let copy = ioas.copy(&pool[i].mapping, Iova::Auto, Access::READ_WRITE).expect("copy");
                    local.copies += 1;
                    pool.push(Live { mapping: copy, tag });
                }
            }
            // give a guard up: its range becomes an unowned kernel mapping
            _ => {
                if let Some(live) = take(&mut rng) {
                    let _ = live.mapping.leak();
                    local.leaks += 1;
                }
            }
        }
    }
    let mut c = counts.lock().unwrap();
    c.ops += local.ops;
    c.maps += local.maps;
    c.unmaps += local.unmaps;
    c.unmap_all_ok += local.unmap_all_ok;
    c.unmap_range_ok += local.unmap_range_ok;
    c.copies += local.copies;
    c.leaks += local.leaks;
}

/// Checks every live guard against the kernel; returns the mismatches.
fn check_guards(ioas: &Ioas, access: &MockAccess, pool: &[Live]) -> Vec<String> {
    let mut bad = Vec::new();
    for live in pool {
        let m = &live.mapping;
        let mut word = [0u8; 8];
        match access.read(m.iova(), &mut word) {
            Ok(()) if u64::from_ne_bytes(word) == live.tag => {}
            Ok(()) => bad.push(format!(
                "guard {:#x}+{:#x}: the kernel maps another buffer there (tag {} instead of {})",
                m.iova(),
                m.len(),
                u64::from_ne_bytes(word),
                live.tag
            )),
            Err(e) => {
                bad.push(format!("guard {:#x}+{:#x}: the kernel does not map it: {e}", m.iova(), m.len()))
            }
        }
        match ioas.copy(m, Iova::Auto, Access::READ) {
            Ok(copy) => {
                if let Err(e) = copy.unmap() {
                    bad.push(format!("unmap of a copy of {:#x}: {}", m.iova(), e.error()));
                }
            }
            Err(e) => bad.push(format!("copy of guard {:#x}+{:#x}: {e}", m.iova(), m.len())),
        }
    }
    bad
}

fn stress(with_domain: bool) -> Stats {
    let iommufd = Iommufd::open().unwrap();
    let ioas = iommufd.alloc_ioas().unwrap();
    // Automatic IOVAs stay inside the mock IOMMU's aperture, so mock devices can attach at any time.
    ioas.allow_iovas(&[testing::APERTURE]).unwrap();
    let _mock = with_domain.then(|| MockDevice::new(&ioas).unwrap());
    let access = MockAccess::new(&ioas).unwrap();
    let base = testing::APERTURE.start;
    let pool = Mutex::new(Vec::<Live>::new());
    let counts = Mutex::new(Stats::default());
    let start = Instant::now();
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let mut rounds = 0;
    while rounds < ROUNDS && start.elapsed() < TIME_CAP {
        std::thread::scope(|s| {
            for t in 0..THREADS {
                let (ioas, pool, counts) = (&ioas, &pool, &counts);
                let seed = seed.wrapping_add(t as u64 * 0x1234_5678_9abc);
                s.spawn(move || worker(ioas, pool, base, seed, counts));
            }
            // Domains come and go while the areas change: attach (every area is mapped into the new
            // domain), replace by a HWPT and back, detach.
            let (ioas, counts) = (&ioas, &counts);
            s.spawn(move || {
                for _ in 0..ATTACHES {
                    let mock = MockDevice::new(ioas).expect("attach a mock device");
                    let hwpt = Hwpt::alloc(&mock, ioas, HwptFlags::empty()).expect("HWPT on the IOAS");
                    mock.replace(&hwpt).expect("replace by the HWPT");
                    mock.replace(ioas).expect("replace back");
                    drop(mock);
                    hwpt.destroy().map_err(Error::from).expect("destroy the HWPT");
                    counts.lock().unwrap().attaches += 1;
                }
            });
        });
        rounds += 1;
        seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
        let live = pool.lock().unwrap();
        let bad = check_guards(&ioas, &access, &live);
        counts.lock().unwrap().checked += live.len() as u64;
        counts.lock().unwrap().mismatches.extend(bad);
    }
    // Teardown: every guard unmaps, then the leaked areas go with unmap_all, and the IOAS is empty.
    for live in pool.into_inner().unwrap() {
        live.mapping.unmap().map_err(Error::from).expect("final unmap");
    }
    ioas.unmap_all().unwrap();
    assert_eq!(
        ioas.unmap_range(base, WINDOW_PAGES * page_size() as u64).map_err(|e| e.errno()),
        Err(Some(Errno::NOENT)),
        "nothing is left mapped"
    );
    let mut stats = counts.into_inner().unwrap();
    stats.rounds = rounds;
    stats
}

/// Prints to the console even when libtest captures test output (the VM log keeps the figures).
macro_rules! console {
    ($($t:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), $($t)*);
    }};
}

fn report(name: &str, stats: &Stats) {
    console!(
        "{name}: {} rounds x {THREADS} threads, {} ops ({} maps, {} unmaps, {} copies, {} leaks, {} unmap_all, \
         {} unmap_range), {} attach/replace/detach cycles, {} guard checks, {} mismatches",
        stats.rounds,
        stats.ops,
        stats.maps,
        stats.unmaps,
        stats.copies,
        stats.leaks,
        stats.unmap_all_ok,
        stats.unmap_range_ok,
        stats.attaches,
        stats.checked,
        stats.mismatches.len()
    );
    assert!(
        stats.mismatches.is_empty(),
        "{name}: live guards out of step with the kernel:\n{:#?}",
        stats.mismatches
    );
    assert!(stats.rounds >= 2 && stats.checked > 0, "{name}: the stress did too little to mean anything");
}

#[test]
#[ignore = "needs /dev/iommu with CONFIG_IOMMUFD_TEST: run by cargo xtask vm-test"]
fn racing_threads_never_leave_a_stale_guard_with_a_domain() {
    if common::mock_devices_unavailable() {
        return;
    }
    let stats = stress(true);
    report("stress (mock domain)", &stats);
}

#[test]
#[ignore = "needs /dev/iommu with CONFIG_IOMMUFD_TEST: run by cargo xtask vm-test"]
fn racing_threads_never_leave_a_stale_guard_starting_without_a_domain() {
    if common::mock_devices_unavailable() {
        return;
    }
    let stats = stress(false);
    report("stress (no domain but the racing attaches)", &stats);
}

/// The shape of the race that once let a device write a returned buffer: `unmap_all` checked for
/// guards, then removed a mapping that a concurrent `map(Auto)` created in between. Tight loops on
/// two threads, then every guard must still be mapped.
#[test]
#[ignore = "needs /dev/iommu with CONFIG_IOMMUFD_TEST: run by cargo xtask vm-test"]
fn unmap_all_cannot_remove_a_concurrent_map() {
    let iommufd = Iommufd::open().unwrap();
    let ioas = iommufd.alloc_ioas().unwrap();
    let access = MockAccess::new(&ioas).unwrap();
    let stop = AtomicBool::new(false);
    let mut live = Vec::new();
    let (mut refused, mut done) = (0u64, 0u64);
    let (mut mismatches, mut checked) = (Vec::new(), 0);
    std::thread::scope(|s| {
        let unmapper = s.spawn(|| {
            let mut n = (0u64, 0u64);
            while !stop.load(Ordering::Relaxed) {
                match ioas.unmap_all() {
                    Ok(_) => n.1 += 1,
                    Err(Error::InvalidArgument { .. }) => n.0 += 1,
                    Err(e) => panic!("unmap_all: {e}"),
                }
            }
            n
        });
        for i in 0..600 {
            let (buf, tag) = tagged(1);
            let mapping = ioas.map(buf, Iova::Auto, Access::READ_WRITE).unwrap();
            if i % 3 == 0 {
                mapping.unmap().map_err(Error::from).unwrap();
            } else {
                live.push(Live { mapping, tag });
            }
            // Check and empty the pool often, so `unmap_all` finds no guard and proceeds often.
            if live.len() >= 2 {
                mismatches.extend(check_guards(&ioas, &access, &live));
                checked += live.len();
                live.clear();
            }
        }
        stop.store(true, Ordering::Relaxed);
        (refused, done) = unmapper.join().unwrap();
    });
    mismatches.extend(check_guards(&ioas, &access, &live));
    checked += live.len();
    console!(
        "unmap_all race: {refused} refused, {done} done, {checked} guard checks, {} mismatches",
        mismatches.len()
    );
    assert!(mismatches.is_empty(), "{mismatches:#?}");
    assert!(done > 0 && refused > 0, "the race needs both outcomes of unmap_all to mean anything");
}

/// A `fork()`ed child shares the iommufd. Its copies of the parent's guards must do nothing: no unmap
/// on drop, explicit calls refused; buffers that are not mapped stay usable memory in the child.
#[test]
#[ignore = "needs /dev/iommu with CONFIG_IOMMUFD_TEST: run by cargo xtask vm-test"]
fn a_forked_child_cannot_touch_the_parents_mappings() {
    if common::mock_devices_unavailable() {
        return;
    }
    let iommufd = Iommufd::open().unwrap();
    assert!(iommufd.in_owner_process());
    let ioas = iommufd.alloc_ioas().unwrap();
    let _mock = MockDevice::new(&ioas).unwrap();
    let access = MockAccess::new(&ioas).unwrap();
    let (buf, tag) = tagged(1);
    let kept = Live { mapping: ioas.map(buf, Iova::Auto, Access::READ_WRITE).unwrap(), tag };
    let (buf, tag2) = tagged(1);
    let dropped_in_child = ioas.map(buf, Iova::Auto, Access::READ_WRITE).unwrap();
    let (spare, spare_tag) = tagged(1);

    // SAFETY: the test process forks with other test threads possibly running; the child only
    // runs code that takes no lock another thread could hold (this crate's checks refuse before
    // locking, the buffer read is plain memory), then leaves with `_exit`.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork failed");
    if pid == 0 {
        // The child: every check is a bit of the exit code.
        let mut code = 0;
        if iommufd.in_owner_process() {
            code |= 1;
        }
        if !matches!(kept.mapping.read_at(0, &mut [0u8; 8]), Err(Error::ForeignProcess { .. })) {
            code |= 2;
        }
        if !matches!(ioas.unmap_all(), Err(Error::ForeignProcess { .. })) {
            code |= 4;
        }
        match dropped_in_child.unmap() {
            Err(e) if matches!(e.error(), Error::ForeignProcess { .. }) => drop(e.into_inner()),
            _ => code |= 8,
        }
        if spare.as_slice()[..8] != spare_tag.to_ne_bytes() {
            code |= 16;
        }
        // New objects too: made in the child they would carry the parent's ownership and leak.
        if !matches!(iommufd.alloc_ioas(), Err(Error::ForeignProcess { .. })) {
            code |= 32;
        }
        if !matches!(
            iommufd::Hwpt::alloc(&_mock, &ioas, iommufd::HwptFlags::empty()),
            Err(Error::ForeignProcess { .. })
        ) {
            code |= 64;
        }
        drop(kept);
        drop(ioas);
        // SAFETY: ends the child without running the parent's test harness teardown.
        unsafe { libc::_exit(code) };
    }
    let mut status = 0;
    // SAFETY: waits for the child just forked; `status` is a valid out pointer.
    assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
    assert!(libc::WIFEXITED(status), "child did not exit normally: {status:#x}");
    assert_eq!(
        libc::WEXITSTATUS(status),
        0,
        "child checks failed (bits: 1 owner, 2 read, 4 unmap_all, 8 unmap, 16 buffer, 32 IOAS alloc, 64 HWPT alloc)"
    );

    // The parent's mappings are intact, and new maps do not land on them.
    let live = vec![kept, Live { mapping: dropped_in_child, tag: tag2 }];
    assert_eq!(check_guards(&ioas, &access, &live), Vec::<String>::new());
    let next = ioas.map(spare, Iova::Auto, Access::READ).unwrap();
    assert!(live.iter().all(|l| !l.mapping.range().overlaps(&next.range())));
}

/// `map_file` refuses what the fd does not allow, before any ioctl: the kernel checks none of it.
#[test]
#[ignore = "needs /dev/iommu: run by cargo xtask vm-test"]
fn map_file_honours_the_fds_access_mode_seals_and_size() {
    use rustix::fs::{MemfdFlags, OFlags, SealFlags};
    let iommufd = Iommufd::open().unwrap();
    let ioas = iommufd.alloc_ioas().unwrap();
    let page = page_size() as u64;
    let memfd = rustix::fs::memfd_create("seals", MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING).unwrap();
    rustix::fs::ftruncate(&memfd, 2 * page).unwrap();
    let reopen = |flags: OFlags| {
        let path = format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(&memfd));
        rustix::fs::open(path.as_str(), flags | OFlags::CLOEXEC, rustix::fs::Mode::empty()).unwrap()
    };
    let invalid = |r: iommufd::Result<Mapping<iommufd::FileMemory>>, needle: &str| match r {
        Err(Error::InvalidArgument { reason, .. }) => assert!(reason.contains(needle), "{reason}"),
        other => panic!("expected a refusal mentioning {needle:?}, got {other:?}"),
    };

    let ro = reopen(OFlags::RDONLY);
    invalid(ioas.map_file(&ro, 0, page, Iova::Auto, Access::READ_WRITE), "open read-only");
    // The refusals are the crate's, before any ioctl: they hold on a kernel without the ioctl too,
    // where the accepted maps are the exact `Unsupported` instead.
    let r = ioas.map_file(&ro, 0, page, Iova::Auto, Access::READ);
    let supported = !common::unsupported_here(&r, "IOMMU_IOAS_MAP_FILE", "6.13", Errno::NOTTY);
    let accepted = |r: iommufd::Result<Mapping<iommufd::FileMemory>>| {
        if supported {
            r.unwrap().unmap().unwrap();
        } else {
            common::assert_unsupported(&r, "IOMMU_IOAS_MAP_FILE", "6.13", Errno::NOTTY);
        }
    };
    accepted(r);
    let wo = reopen(OFlags::WRONLY);
    invalid(ioas.map_file(&wo, 0, page, Iova::Auto, Access::READ), "open write-only");
    accepted(ioas.map_file(&wo, 0, page, Iova::Auto, Access::WRITE));
    // Past the end of the file (with no domain the kernel would accept it and fail at attach).
    invalid(ioas.map_file(&memfd, page, 2 * page, Iova::Auto, Access::READ), "past the end");

    // Sealed against writes: READ still works, WRITE is refused, for either seal.
    rustix::fs::fcntl_add_seals(&memfd, SealFlags::FUTURE_WRITE).unwrap();
    invalid(ioas.map_file(&memfd, 0, page, Iova::Auto, Access::WRITE), "sealed");
    accepted(ioas.map_file(memfd.as_fd(), 0, page, Iova::Auto, Access::READ));
    let memfd2 =
        rustix::fs::memfd_create("seal-write", MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING).unwrap();
    rustix::fs::ftruncate(&memfd2, page).unwrap();
    rustix::fs::fcntl_add_seals(&memfd2, SealFlags::WRITE).unwrap();
    invalid(ioas.map_file(&memfd2, 0, page, Iova::Auto, Access::READ_WRITE), "sealed");
    accepted(ioas.map_file(&memfd2, 0, page, Iova::Auto, Access::READ));
}

/// Leaked mappings are removed by `unmap_range` one area at a time (and counted), and never while
/// a guard's range is in the way.
#[test]
#[ignore = "needs /dev/iommu with CONFIG_IOMMUFD_TEST: run by cargo xtask vm-test"]
fn leaked_mappings_are_removed_and_counted_but_guards_are_not() {
    if common::mock_devices_unavailable() {
        return;
    }
    let iommufd = Iommufd::open().unwrap();
    let ioas = iommufd.alloc_ioas().unwrap();
    let _mock = MockDevice::new(&ioas).unwrap();
    let page = page_size() as u64;
    let base = testing::APERTURE.start;
    let guard = ioas.map(tagged(2).0, Iova::Fixed(base + 4 * page), Access::READ_WRITE).unwrap();
    let a = ioas.map(tagged(1).0, Iova::Fixed(base), Access::READ).unwrap().leak();
    let b = ioas.map(tagged(2).0, Iova::Fixed(base + page), Access::READ).unwrap().leak();
    assert!(matches!(ioas.unmap_all(), Err(Error::InvalidArgument { .. })), "a guard is alive");
    // Over the guard: refused. Cutting b: refused. Both before any ioctl.
    assert!(matches!(ioas.unmap_range(base, 6 * page), Err(Error::InvalidArgument { .. })));
    assert!(matches!(ioas.unmap_range(base, 2 * page), Err(Error::InvalidArgument { .. })));
    assert_eq!(ioas.unmap_range(a.start, 3 * page).unwrap(), a.len() + b.len());
    assert_eq!(ioas.unmap_range(base, 3 * page).map_err(|e| e.errno()), Err(Some(Errno::NOENT)));
    let buffer = guard.unmap().map_err(Error::from).unwrap().expect("no copy shares it");
    assert_eq!(buffer.as_slice().len() as u64, 2 * page);
    assert_eq!(ioas.unmap_all().unwrap(), 0, "nothing is left");
}
