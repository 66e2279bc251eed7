//! What the SDK costs over raw ioctls: the same operations done through `iommufd` and through
//! `libc::ioctl` on the same iommufd, interleaved, with the order rotated every round. Prints the
//! SDK/raw time ratio per operation (median over rounds, with its spread). Only ratios measured in one
//! run mean anything: absolute times under emulation vary between boots.
//!
//! Run inside the test VM with `cargo xtask bench`; it needs `/dev/iommu` from a kernel with
//! `CONFIG_IOMMUFD_TEST` (the mock IOMMU). Nothing here asserts a timing.

use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::time::{Duration, Instant};

use iommufd::sys;
use iommufd::sys::testing as tsys;
use iommufd::testing::{self, MockDevice};
use iommufd::{Access, DmaBuffer, Hwpt, HwptFlags, Ioas, Iommufd, Iova, page_size};

/// Rounds per operation (each round times one SDK batch and one raw batch); the operations that take
/// seconds a batch run [`HEAVY_ROUNDS`].
const ROUNDS: usize = 15;
const HEAVY_ROUNDS: usize = 3;

fn main() {
    let iommufd = Iommufd::open().expect("open /dev/iommu (run with cargo xtask bench)");
    let mut ops = operations(&iommufd);
    let mut results: Vec<(Vec<f64>, Vec<f64>)> = vec![(Vec::new(), Vec::new()); ops.len()];
    let started = Instant::now();
    for round in 0..ROUNDS {
        // Rotate which operation goes first, and alternate which side goes first, every round.
        let n = ops.len();
        for k in 0..n {
            let i = (k + round) % n;
            let op = &mut ops[i];
            if round >= op.rounds {
                continue;
            }
            let iters = op.iters as f64;
            let (sdk, raw) = if round % 2 == 0 {
                let s = (op.sdk)();
                (s, (op.raw)())
            } else {
                let r = (op.raw)();
                ((op.sdk)(), r)
            };
            results[i].0.push(sdk.as_secs_f64() * 1e6 / iters);
            results[i].1.push(raw.as_secs_f64() * 1e6 / iters);
        }
    }
    println!(
        "\nSDK vs raw ioctls, {ROUNDS} rounds ({HEAVY_ROUNDS} for the heavy ones), order rotated ({:.0} s in all)",
        started.elapsed().as_secs_f64()
    );
    println!(
        "{:<44} {:>10} {:>10} {:>10} {:>8} {:>16}",
        "operation", "SDK µs", "raw µs", "SDK-raw", "ratio", "ratio min..max"
    );
    for (op, (sdk, raw)) in ops.iter().zip(&results) {
        let mut ratios: Vec<f64> = sdk.iter().zip(raw).map(|(s, r)| s / r).collect();
        ratios.sort_by(f64::total_cmp);
        println!(
            "{:<44} {:>10.1} {:>10.1} {:>10.1} {:>8.3} {:>7.3}..{:<7.3}",
            op.name,
            median(sdk),
            median(raw),
            median(sdk) - median(raw),
            median(&ratios),
            ratios[0],
            ratios[ratios.len() - 1]
        );
    }
    println!(
        "bookkeeping floor of a sound map + unmap (2 lock/unlock pairs, Arc clone + drop, last-reference \
         check, registry insert + remove): {:.2} µs",
        bookkeeping_floor(10_000)
    );
}

/// The user-space work a sound map + unmap cannot skip, timed alone in the same boot: the registry
/// lock taken and released around each of the two ioctls, the guard's reference to its IOAS taken and
/// dropped, the last-reference check that hands the buffer back, and one registry entry added and
/// removed. Under emulation every atomic read-modify-write is expensive, so this floor, not the
/// SDK's other code, sets the ratio of the cheapest operations.
fn bookkeeping_floor(iters: usize) -> f64 {
    use std::collections::BTreeMap;
    use std::hint::black_box;
    use std::sync::{Arc, Mutex};
    let registry = Arc::new(Mutex::new(BTreeMap::<(u64, u64), (u64, u8)>::new()));
    let mut buffer = Arc::new([0u8; 64]);
    let mut samples: Vec<f64> = (0..ROUNDS)
        .map(|_| {
            let t = timed(iters, || {
                let mut areas = registry.lock().unwrap();
                areas.insert(black_box((0x1000, 7)), (0x1fff, 0));
                drop(areas);
                let guard_ref = black_box(Arc::clone(&registry));
                let mut areas = guard_ref.lock().unwrap();
                areas.remove(black_box(&(0x1000, 7)));
                drop(areas);
                drop(guard_ref);
                black_box(Arc::get_mut(&mut buffer).is_some());
            });
            t.as_secs_f64() * 1e6 / iters as f64
        })
        .collect();
    samples.sort_by(f64::total_cmp);
    samples[samples.len() / 2]
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// One measured operation: each closure runs `iters` iterations and returns the time taken.
struct Op {
    name: String,
    iters: usize,
    rounds: usize,
    sdk: Box<dyn FnMut() -> Duration>,
    raw: Box<dyn FnMut() -> Duration>,
}

fn timed(iters: usize, mut f: impl FnMut()) -> Duration {
    let t = Instant::now();
    for _ in 0..iters {
        f();
    }
    t.elapsed()
}

fn ioctl<T>(fd: &impl AsRawFd, request: u32, arg: &mut T) {
    // SAFETY: every caller passes the structure the kernel defines for `request`, with its size set
    // and any user pointer in it valid for the call; `arg` is exclusively borrowed for the call.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), request as _, arg as *mut T) };
    assert!(r >= 0, "raw ioctl {request:#x}: {}", std::io::Error::last_os_error());
}

fn raw_alloc_ioas(fd: &Iommufd) -> u32 {
    let mut a = sys::iommu_ioas_alloc {
        size: std::mem::size_of::<sys::iommu_ioas_alloc>() as u32,
        ..Default::default()
    };
    ioctl(fd, sys::IOMMU_IOAS_ALLOC, &mut a);
    a.out_ioas_id
}

fn raw_destroy(fd: &Iommufd, id: u32) {
    let mut d = sys::iommu_destroy { size: std::mem::size_of::<sys::iommu_destroy>() as u32, id };
    ioctl(fd, sys::IOMMU_DESTROY, &mut d);
}

fn raw_map(fd: &Iommufd, ioas: u32, va: u64, len: u64, iova: Option<u64>) -> u64 {
    let mut m = sys::iommu_ioas_map {
        size: std::mem::size_of::<sys::iommu_ioas_map>() as u32,
        flags: sys::IOMMU_IOAS_MAP_READABLE
            | sys::IOMMU_IOAS_MAP_WRITEABLE
            | iova.map_or(0, |_| sys::IOMMU_IOAS_MAP_FIXED_IOVA),
        ioas_id: ioas,
        user_va: va,
        length: len,
        iova: iova.unwrap_or(0),
        ..Default::default()
    };
    ioctl(fd, sys::IOMMU_IOAS_MAP, &mut m);
    m.iova
}

fn raw_map_file(fd: &Iommufd, ioas: u32, file: &OwnedFd, start: u64, len: u64, iova: Option<u64>) -> u64 {
    let mut m = sys::iommu_ioas_map_file {
        size: std::mem::size_of::<sys::iommu_ioas_map_file>() as u32,
        flags: sys::IOMMU_IOAS_MAP_READABLE | iova.map_or(0, |_| sys::IOMMU_IOAS_MAP_FIXED_IOVA),
        ioas_id: ioas,
        fd: file.as_raw_fd(),
        start,
        length: len,
        iova: iova.unwrap_or(0),
    };
    ioctl(fd, sys::IOMMU_IOAS_MAP_FILE, &mut m);
    m.iova
}

fn raw_unmap(fd: &Iommufd, ioas: u32, iova: u64, len: u64) {
    let mut u = sys::iommu_ioas_unmap {
        size: std::mem::size_of::<sys::iommu_ioas_unmap>() as u32,
        ioas_id: ioas,
        iova,
        length: len,
    };
    ioctl(fd, sys::IOMMU_IOAS_UNMAP, &mut u);
    assert_eq!(u.length, len);
}

/// Anonymous memory for the raw side (never freed: the bench ends with the process).
fn raw_buffer(len: usize) -> u64 {
    // SAFETY: a fresh private anonymous mapping aliases nothing.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    assert_ne!(p, libc::MAP_FAILED);
    p as u64
}

fn memfd(len: u64) -> OwnedFd {
    let fd = rustix::fs::memfd_create("bench", rustix::fs::MemfdFlags::CLOEXEC).unwrap();
    rustix::fs::ftruncate(&fd, len).unwrap();
    fd
}

/// An IOAS with a mock domain attached (so maps pin and enter a page table).
fn mock_ioas(fd: &Iommufd) -> (Ioas, MockDevice) {
    let ioas = fd.alloc_ioas().unwrap();
    let mock = MockDevice::new(&ioas).unwrap();
    (ioas, mock)
}

/// Map + unmap of `len` bytes at automatic IOVAs, through the SDK (one reused buffer) and raw.
fn map_unmap(name: &str, fd: &Iommufd, domain: bool, len: usize, iters: usize) -> Op {
    let (ioas, mock) = if domain {
        let (i, m) = mock_ioas(fd);
        (i, Some(m))
    } else {
        (fd.alloc_ioas().unwrap(), None)
    };
    let raw_id = ioas.id();
    let mut buffer = Some(DmaBuffer::new(len).unwrap());
    let va = raw_buffer(len);
    let (sdk_ioas, raw_fd) = (ioas.clone(), fd.clone());
    Op {
        name: name.into(),
        iters,
        rounds: ROUNDS,
        sdk: Box::new(move || {
            let _keep = &mock;
            timed(iters, || {
                let m = sdk_ioas.map(buffer.take().unwrap(), Iova::Auto, Access::READ_WRITE).unwrap();
                buffer = m.unmap().unwrap();
            })
        }),
        raw: Box::new(move || {
            timed(iters, || {
                let iova = raw_map(&raw_fd, raw_id, va, len as u64, None);
                raw_unmap(&raw_fd, raw_id, iova, len as u64);
            })
        }),
    }
}

fn operations(fd: &Iommufd) -> Vec<Op> {
    let page = page_size();
    let mut ops = Vec::new();

    // IOAS alloc + destroy.
    let (f1, f2) = (fd.clone(), fd.clone());
    ops.push(Op {
        name: "IOAS alloc + destroy".into(),
        iters: 1000,
        rounds: ROUNDS,
        sdk: Box::new(move || timed(1000, || f1.alloc_ioas().unwrap().destroy().unwrap())),
        raw: Box::new(move || timed(1000, || raw_destroy(&f2, raw_alloc_ioas(&f2)))),
    });

    ops.push(map_unmap("map + unmap 4 KiB, no domain", fd, false, page, 1000));
    ops.push(map_unmap("map + unmap 2 MiB, no domain", fd, false, 2 << 20, 500));
    ops.push(map_unmap("map + unmap 4 KiB, mock domain", fd, true, page, 1000));
    ops.push(map_unmap("map + unmap 2 MiB, mock domain", fd, true, 2 << 20, 60));

    // map_file + unmap of large files, no domain (the kernel records the range; pinning is deferred).
    for (label, len) in [("256 MiB", 256u64 << 20), ("1 GiB", 1u64 << 30)] {
        let ioas = fd.alloc_ioas().unwrap();
        let file = memfd(len);
        let (raw_fd, raw_id) = (fd.clone(), ioas.id());
        let raw_file = file.try_clone().unwrap();
        ops.push(Op {
            name: format!("map_file + unmap {label}, no domain"),
            iters: 250,
            rounds: ROUNDS,
            sdk: Box::new(move || {
                timed(250, || {
                    ioas.map_file(file.as_fd(), 0, len, Iova::Auto, Access::READ).unwrap().unmap().unwrap()
                })
            }),
            raw: Box::new(move || {
                timed(250, || {
                    let iova = raw_map_file(&raw_fd, raw_id, &raw_file, 0, len, None);
                    raw_unmap(&raw_fd, raw_id, iova, len);
                })
            }),
        });
    }

    // Attach + detach of a mock device (IOMMU_TEST_OP_MOCK_DOMAIN, then destroying the device).
    {
        let ioas = fd.alloc_ioas().unwrap();
        let (raw_fd, raw_id) = (fd.clone(), ioas.id());
        ops.push(Op {
            name: "mock device attach + detach".into(),
            iters: 100,
            rounds: ROUNDS,
            sdk: Box::new(move || timed(100, || MockDevice::new(&ioas).unwrap().close().unwrap())),
            raw: Box::new(move || {
                timed(100, || {
                    let mut cmd = tsys::iommu_test_cmd {
                        size: std::mem::size_of::<tsys::iommu_test_cmd>() as u32,
                        op: tsys::IOMMU_TEST_OP_MOCK_DOMAIN,
                        id: raw_id,
                        ..Default::default()
                    };
                    ioctl(&raw_fd, tsys::IOMMU_TEST_CMD, &mut cmd);
                    // SAFETY: the kernel answered in the `mock_domain` member (plain integers).
                    let stdev = unsafe { cmd.__bindgen_anon_1.mock_domain.out_stdev_id };
                    raw_destroy(&raw_fd, stdev);
                })
            }),
        });
    }

    // 10,000 live mappings created, then torn down (automatic IOVAs, no domain).
    {
        const N: usize = 10_000;
        let ioas = fd.alloc_ioas().unwrap();
        let raw_ioas = fd.alloc_ioas().unwrap();
        let (raw_fd, raw_id) = (fd.clone(), raw_ioas.id());
        let mut buffers: Vec<DmaBuffer> = (0..N).map(|_| DmaBuffer::new(page).unwrap()).collect();
        let base = raw_buffer(N * page);
        ops.push(Op {
            name: "10,000 live 4 KiB mappings, made + removed".into(),
            iters: N,
            rounds: HEAVY_ROUNDS,
            sdk: Box::new(move || {
                let t = Instant::now();
                let maps: Vec<_> =
                    buffers.drain(..).map(|b| ioas.map(b, Iova::Auto, Access::READ_WRITE).unwrap()).collect();
                buffers.extend(maps.into_iter().map(|m| m.unmap().unwrap().unwrap()));
                t.elapsed()
            }),
            raw: Box::new(move || {
                let _keep = &raw_ioas; // the raw side's IOAS lives as long as its closure
                let t = Instant::now();
                let iovas: Vec<u64> = (0..N)
                    .map(|i| raw_map(&raw_fd, raw_id, base + (i * page) as u64, page as u64, None))
                    .collect();
                for iova in iovas {
                    raw_unmap(&raw_fd, raw_id, iova, page as u64);
                }
                t.elapsed()
            }),
        });
    }

    // 100,000 mappings of one anonymous region (not one VMA per mapping, which the kernel's map
    // count limit forbids): the SDK places them itself (Iova::Below, O(log n) a map; the memory is
    // `map_user`, which is what a VMM does with guest RAM); the raw side gives fixed consecutive
    // IOVAs, the cheapest placement the kernel offers. No domain: the kernel pins nothing.
    {
        const N: u64 = 100_000;
        let p = page as u64;
        let region = raw_buffer((N * p) as usize);
        let ioas = fd.alloc_ioas().unwrap();
        let raw_ioas = fd.alloc_ioas().unwrap();
        let (raw_fd, raw_id) = (fd.clone(), raw_ioas.id());
        let base = testing::APERTURE.start;
        ops.push(Op {
            name: "100,000 mappings (SDK Iova::Below, raw fixed)".into(),
            iters: N as usize,
            rounds: HEAVY_ROUNDS,
            sdk: Box::new(move || {
                let t = Instant::now();
                let maps: Vec<_> = (0..N)
                    .map(|i| {
                        let va = (region + i * p) as *mut u8;
                        // SAFETY: the region is never freed or touched by the bench, and no reference
                        // to it exists; every mapping of it is dropped (unmapped) below.
                        unsafe { ioas.map_user(va, p as usize, Iova::Below(u64::MAX), Access::READ_WRITE) }
                            .unwrap()
                    })
                    .collect();
                drop(maps);
                t.elapsed()
            }),
            raw: Box::new(move || {
                let _keep = &raw_ioas; // the raw side's IOAS lives as long as its closure
                let t = Instant::now();
                for i in 0..N {
                    raw_map(&raw_fd, raw_id, region + i * p, p, Some(base + i * p));
                }
                for i in 0..N {
                    raw_unmap(&raw_fd, raw_id, base + i * p, p);
                }
                t.elapsed()
            }),
        });
    }

    // Dirty bitmap read of 256 MiB on the mock (a 1 GiB mapping would pin half the VM's memory).
    {
        const LEN: u64 = 256 << 20;
        let ioas = fd.alloc_ioas().unwrap();
        let mock = MockDevice::new(&ioas).unwrap();
        let hwpt = Hwpt::alloc(&mock, &ioas, HwptFlags::DIRTY_TRACKING).unwrap();
        mock.replace(&hwpt).unwrap();
        hwpt.set_dirty_tracking(true).unwrap();
        let file = memfd(LEN);
        let iova = testing::APERTURE.start;
        let mapping = ioas.map_file(file.as_fd(), 0, LEN, Iova::Fixed(iova), Access::READ_WRITE).unwrap();
        let p = page as u64;
        let words = (LEN / p).div_ceil(64) as usize;
        // The raw side pads its bitmap by a page, as a careful raw user must (a dirty huge IOPTE is
        // reported whole).
        let mut raw_bitmap = vec![0u64; words + page / 8];
        let (raw_fd, raw_hwpt) = (fd.clone(), hwpt.id());
        let mut bitmap = hwpt.read_dirty(iova, LEN, p, true).unwrap();
        ops.push(Op {
            name: "dirty bitmap read of 256 MiB, mock".into(),
            iters: 20,
            rounds: ROUNDS,
            sdk: Box::new(move || {
                let _keep = (&mock, &mapping);
                timed(20, || hwpt.read_dirty_into(&mut bitmap, true).unwrap())
            }),
            raw: Box::new(move || {
                timed(20, || {
                    let mut arg = sys::iommu_hwpt_get_dirty_bitmap {
                        size: std::mem::size_of::<sys::iommu_hwpt_get_dirty_bitmap>() as u32,
                        hwpt_id: raw_hwpt,
                        flags: 0,
                        iova,
                        length: LEN,
                        page_size: p,
                        data: raw_bitmap.as_mut_ptr() as u64,
                        ..Default::default()
                    };
                    ioctl(&raw_fd, sys::IOMMU_HWPT_GET_DIRTY_BITMAP, &mut arg);
                })
            }),
        });
    }
    ops
}
