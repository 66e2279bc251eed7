//! Unit tests that need no `/dev/iommu`: error mapping on a real fd, and validation that must reject
//! bad input before any ioctl.
//!
//! The validation tests run against an iommufd handle backed by `/dev/null`. Every ioctl on it fails
//! with `ENOTTY`, so a check that wrongly let the call through shows up as `Error::Unsupported`
//! instead of the expected `Error::InvalidArgument`.

use std::os::fd::OwnedFd;

use crate::ioas::IovaRange;
use crate::*;

pub(crate) fn dev_null() -> OwnedFd {
    std::fs::OpenOptions::new().read(true).write(true).open("/dev/null").unwrap().into()
}

/// An iommufd handle whose fd is `/dev/null`, and an IOAS handle with a made-up id on it.
pub(crate) fn fake() -> (Iommufd, Ioas) {
    // SAFETY: the fd is freshly opened and owned; it is not an iommufd, which is the point: any
    // ioctl that gets through fails with ENOTTY.
    let fd = unsafe {
        <Iommufd as std::os::fd::FromRawFd>::from_raw_fd(std::os::fd::IntoRawFd::into_raw_fd(dev_null()))
    };
    let ioas = Ioas::fake(&fd, 7);
    (fd, ioas)
}

pub(crate) fn assert_invalid<T: std::fmt::Debug>(r: Result<T>, op: &str, needle: &str) {
    match r {
        Err(Error::InvalidArgument { op: o, reason }) => {
            assert_eq!(o, op);
            assert!(reason.contains(needle), "reason {reason:?} lacks {needle:?}");
        }
        other => panic!("expected InvalidArgument({op}: ..{needle}..), got {other:?}"),
    }
}

#[test]
fn ioctl_on_a_non_iommufd_is_unsupported_with_the_kernel_version() {
    // `from_raw_fd` adopts without checking (`from_fd` refuses /dev/null before any ioctl), so the
    // ioctl reaches /dev/null, which answers ENOTTY.
    // SAFETY: the fd is freshly opened and owned; it is deliberately not an iommufd.
    let fd = unsafe {
        <Iommufd as std::os::fd::FromRawFd>::from_raw_fd(std::os::fd::IntoRawFd::into_raw_fd(dev_null()))
    };
    let e = fd.rlimit_mode().unwrap_err();
    match &e {
        Error::Unsupported { op, since, errno } => {
            assert_eq!(*errno, Errno::NOTTY);
            assert_eq!(*op, "IOMMU_OPTION");
            assert_eq!(*since, "6.2");
        }
        other => panic!("expected Unsupported, got {other:?}"),
    }
    assert_eq!(e.errno(), Some(Errno::NOTTY));
    assert!(e.is_unsupported());
    assert_eq!(
        e.to_string(),
        "IOMMU_OPTION is not supported by the running kernel (it needs Linux 6.2 or newer)"
    );
}

#[test]
fn every_op_names_its_ioctl_and_kernel() {
    for op in crate::ioctl::ALL {
        assert!(op.name.starts_with("IOMMU_") || op.name.starts_with("VFIO_"), "{}", op.name);
        let (major, minor) = op.since.split_once('.').expect("since is MAJOR.MINOR");
        assert!(major.parse::<u32>().is_ok() && minor.parse::<u32>().is_ok(), "{}", op.since);
        match crate::ioctl::error(op, Errno::NOTTY) {
            Error::Unsupported { op: name, since, errno } => {
                assert_eq!((name, since, errno), (op.name, op.since, Errno::NOTTY))
            }
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(crate::ioctl::ALL.iter().filter(|o| o.name.starts_with("IOMMU_")).count(), 22);
}

#[test]
fn errno_display_and_hint_appear_once() {
    let e = crate::ioctl::error(&crate::ioctl::IOAS_MAP, Errno::NOMEM);
    let s = e.to_string();
    assert!(s.starts_with("IOMMU_IOAS_MAP failed: "), "{s}");
    assert!(s.contains("RLIMIT_MEMLOCK"), "{s}");
    // The errno's text appears once: Display prints it and there is no source() repeating it.
    assert!(std::error::Error::source(&e).is_none());
    assert_eq!(e.errno(), Some(Errno::NOMEM));
    assert!(!e.is_unsupported());
    // A VFIO device feature the driver lacks is an Ioctl error with ENOTTY: also "unsupported".
    let feature = Error::Ioctl { op: "VFIO_DEVICE_FEATURE_DMA_BUF", errno: Errno::NOTTY, hint: None };
    assert!(feature.is_unsupported());
    let e = crate::ioctl::error(&crate::ioctl::HWPT_ALLOC, Errno::OPNOTSUPP);
    assert!(e.is_unsupported());
    assert!(crate::ioctl::error(&crate::ioctl::DESTROY, Errno::BUSY).is_retryable());
}

#[test]
fn missing_iommu_node_hints_at_config_iommufd() {
    let dir = std::env::temp_dir().join(format!("iommufd-test-{}", std::process::id()));
    let e = Iommufd::open_path(dir.join("iommu")).unwrap_err();
    match &e {
        Error::Open { errno, hint, .. } => {
            assert_eq!(*errno, Errno::NOENT);
            assert!(hint.unwrap().contains("CONFIG_IOMMUFD"), "{hint:?}");
        }
        other => panic!("expected Open, got {other:?}"),
    }
    assert!(e.to_string().contains("CONFIG_IOMMUFD"));
    let e = VfioDevice::open(dir.join("vfio-devices-vfio9")).unwrap_err();
    assert_eq!(e.errno(), Some(Errno::NOENT));
}

#[test]
fn dma_buffer_validation_and_rounding() {
    assert_invalid(DmaBuffer::new(0), "DmaBuffer::new", "zero");
    assert_invalid(DmaBuffer::new(usize::MAX), "DmaBuffer::new", "overflows");
    let mut b = DmaBuffer::new(100).unwrap();
    assert_eq!(b.len(), page_size());
    assert!(b.as_slice().iter().all(|&x| x == 0));
    b.as_mut_slice()[99] = 0xa5;
    assert_eq!(b.as_slice()[99], 0xa5);
    assert_eq!(b.as_slice().as_ptr() as usize % page_size(), 0);
}

#[test]
fn map_validation_table() {
    let (_fd, ioas) = fake();
    let page = page_size() as u64;
    let mem = std::fs::File::open("/dev/null").unwrap();
    let cases: Vec<(Result<Mapping<FileMemory>>, &str, &str)> = vec![
        (ioas.map_file(&mem, 0, 0, Iova::Auto, Access::READ), "IOMMU_IOAS_MAP_FILE", "length is zero"),
        (ioas.map_file(&mem, 1, page, Iova::Auto, Access::READ), "IOMMU_IOAS_MAP_FILE", "not page-aligned"),
        (
            ioas.map_file(&mem, u64::MAX - page + 1, page * 2, Iova::Auto, Access::READ),
            "IOMMU_IOAS_MAP_FILE",
            "overflows",
        ),
        (
            ioas.map_file(&mem, 0, page, Iova::Fixed(page + 1), Access::READ),
            "IOMMU_IOAS_MAP_FILE",
            "alignment",
        ),
        (
            ioas.map_file(&mem, 0, page + 1, Iova::Fixed(page), Access::READ),
            "IOMMU_IOAS_MAP_FILE",
            "alignment",
        ),
        (
            ioas.map_file(&mem, 0, page * 2, Iova::Fixed(u64::MAX - page + 1), Access::READ),
            "IOMMU_IOAS_MAP_FILE",
            "overflows",
        ),
        (ioas.map_file(&mem, 0, page, Iova::Auto, Access::empty()), "IOMMU_IOAS_MAP_FILE", "access is empty"),
    ];
    for (i, (r, op, needle)) in cases.into_iter().enumerate() {
        eprintln!("case {i}");
        assert_invalid(r, op, needle);
    }
    let buf = DmaBuffer::new(1).unwrap();
    assert_invalid(ioas.map(buf, Iova::Fixed(3), Access::READ), "IOMMU_IOAS_MAP", "alignment");
    let mut v = vec![0u8; 2 * page as usize];
    let unaligned = v
        .as_mut_ptr()
        .wrapping_add(1 + (page as usize - v.as_ptr() as usize % page as usize) % page as usize);
    // SAFETY: the call is rejected before any ioctl (the address is not page-aligned), so the memory
    // is never mapped.
    let r = unsafe { ioas.map_user(unaligned, page as usize, Iova::Auto, Access::READ) };
    assert_invalid(r, "IOMMU_IOAS_MAP", "not page-aligned");
}

#[test]
fn unmap_and_allow_validation() {
    let (_fd, ioas) = fake();
    let page = page_size() as u64;
    assert_invalid(ioas.unmap_range(0, 0), "IOMMU_IOAS_UNMAP", "length is zero");
    assert_invalid(ioas.unmap_range(page, 1), "IOMMU_IOAS_UNMAP", "alignment");
    assert_invalid(ioas.unmap_range(u64::MAX - page + 1, 2 * page), "IOMMU_IOAS_UNMAP", "overflows");
    assert_invalid(
        ioas.allow_iovas(&[IovaRange { start: 2 * page, last: page }]),
        "IOMMU_IOAS_ALLOW_IOVAS",
        "start",
    );
    // A single-IOVA range is refused too (the kernel rejects start == last).
    assert_invalid(
        ioas.allow_iovas(&[IovaRange { start: page, last: page }]),
        "IOMMU_IOAS_ALLOW_IOVAS",
        "single IOVA",
    );
    // A well-formed request does reach the kernel (here /dev/null, hence ENOTTY): proof the checks
    // above are what stopped the others.
    assert!(matches!(ioas.unmap_range(0, page), Err(Error::Unsupported { op: "IOMMU_IOAS_UNMAP", .. })));
}

#[test]
fn owned_ranges_are_protected_from_unmap_range_and_unmap_all() {
    let (_fd, ioas) = fake();
    let page = page_size() as u64;
    // A guard as a successful map would have produced (the kernel never saw it).
    let guard = ioas.fake_guard::<UserMemory>(0x10_0000, 4 * page, Access::READ, ());
    assert_invalid(ioas.unmap_range(0x10_0000 + page, page), "IOMMU_IOAS_UNMAP", "live mapping");
    assert_invalid(ioas.unmap_all(), "IOMMU_IOAS_UNMAP", "guard");
    let mem = std::fs::File::open("/dev/null").unwrap();
    assert_invalid(
        ioas.map_file(&mem, 0, page, Iova::Fixed(0x10_0000 + 3 * page), Access::READ),
        "IOMMU_IOAS_MAP_FILE",
        "overlaps",
    );
    // Adjacent ranges are fine (they reach the fake kernel).
    assert!(matches!(ioas.unmap_range(0x10_0000 + 4 * page, page), Err(Error::Unsupported { .. })));
    // The guard's unmap fails (ENOTTY): reported, and the guard comes back, still owning its range.
    let refused = guard.unmap().unwrap_err();
    assert!(matches!(refused.error(), Error::Unsupported { .. }));
    let guard = refused.into_inner();
    assert_invalid(ioas.unmap_range(0x10_0000, page), "IOMMU_IOAS_UNMAP", "live mapping");
    // Leaked, the range is no longer protected, but cutting it is refused (the kernel unmaps whole
    // areas only), before any ioctl.
    let range = guard.leak();
    assert_invalid(ioas.unmap_range(0x10_0000, page), "IOMMU_IOAS_UNMAP", "cuts the mapping");
    assert!(matches!(ioas.unmap_range(range.start, range.len()), Err(Error::Unsupported { .. })));
}

#[test]
fn objects_of_another_iommufd_are_refused_before_any_ioctl() {
    let (_a, ioas_a) = fake();
    let (_b, ioas_b) = fake();
    let guard = ioas_a.fake_guard::<UserMemory>(0, page_size() as u64, Access::READ, ());
    // SAFETY: the refusal comes before any ioctl, so nothing is mapped and no memory is exposed.
    match unsafe { ioas_b.copy_user(&guard, Iova::Auto, Access::READ) } {
        Err(Error::ForeignObject { op }) => assert_eq!(op, "IOMMU_IOAS_COPY"),
        other => panic!("expected ForeignObject, got {other:?}"),
    }
    std::mem::forget(guard);
}

#[test]
fn explicit_destroy_refuses_while_referenced() {
    let (_fd, ioas) = fake();
    let clone = ioas.clone();
    let ioas = match ioas.destroy() {
        Err(e) if matches!(e.error(), Error::InUse { users: 1, .. }) => e.into_inner(),
        other => panic!("expected InUse, got {other:?}"),
    };
    drop(clone);
    // The last handle reaches the (fake) kernel; refused there, it comes back too.
    let refused = ioas.destroy().unwrap_err();
    assert!(matches!(refused.error(), Error::Unsupported { op: "IOMMU_DESTROY", .. }));
    assert!(refused.into_inner().destroy().is_err(), "and can be retried");
}

#[test]
fn iova_range_arithmetic() {
    assert_eq!(IovaRange::from_len(0, 0), None);
    assert_eq!(IovaRange::from_len(u64::MAX, 2), None);
    let r = IovaRange::from_len(0x1000, 0x2000).unwrap();
    assert_eq!(r, IovaRange { start: 0x1000, last: 0x2fff });
    assert_eq!(r.len(), 0x2000);
    assert!(r.overlaps(&IovaRange { start: 0x2fff, last: 0x3000 }));
    assert!(!r.overlaps(&IovaRange { start: 0x3000, last: 0x3fff }));
    assert!(r.contains(&IovaRange { start: 0x1000, last: 0x1fff }));
    assert_eq!(IovaRange { start: 0, last: u64::MAX }.len(), u64::MAX);
    // Inverted ranges hold nothing and overlap nothing: no panic, no wrapped length.
    let inverted = IovaRange { start: 0x3000, last: 0x1000 };
    assert_eq!((inverted.len(), inverted.is_empty()), (0, true));
    assert!(!inverted.overlaps(&r) && !r.overlaps(&inverted) && !r.contains(&inverted));
}

#[test]
fn device_copies_move_every_byte_at_any_alignment() {
    // The atomic copies access whole aligned words and merge the partial ones at the edges: every offset and
    // length combination must move exactly the bytes asked for and nothing else.
    let mut backing = vec![0u64; 8];
    let base = backing.as_mut_ptr().cast::<u8>();
    let src: Vec<u8> = (1..=40).collect();
    for offset in 0..16 {
        for len in 0..=(40 - offset).min(24) {
            backing.iter_mut().for_each(|w| *w = 0);
            // SAFETY: `base + offset .. + len` lies inside `backing` (64 bytes), which is read-write
            // memory that no reference covers during the call.
            unsafe { crate::dma::copy_to_device(&src[..len], base.add(offset)) };
            let mut out = vec![0xeeu8; len];
            // SAFETY: as above.
            unsafe { crate::dma::copy_from_device(base.add(offset), &mut out) };
            assert_eq!(out, src[..len], "offset {offset} len {len}");
            // SAFETY: reads `backing` through its own pointer after the copies; no other access.
            let all = unsafe { std::slice::from_raw_parts(base, 64) };
            assert!(all[..offset].iter().all(|&b| b == 0), "wrote before offset {offset}");
            assert!(all[offset + len..].iter().all(|&b| b == 0), "wrote past offset {offset} len {len}");
        }
    }
}

#[test]
fn concurrent_copies_of_neighbouring_bytes_in_one_word_lose_nothing() {
    // Two threads write disjoint byte ranges that share aligned words (3..13 and the edges 0..3,
    // 13..16) while a third reads an odd range across both: every access is a whole-word atomic, and
    // the partial words are merged, so neither writer's bytes are lost to the other's.
    let mut backing = vec![0u64; 2];
    let addr = backing.as_mut_ptr() as usize;
    std::thread::scope(|s| {
        s.spawn(move || {
            for round in 0..20_000u32 {
                let v = [(round % 251) as u8 | 1; 10];
                // SAFETY: `addr+3..addr+13` is inside `backing` (16 bytes, whole words), read-write,
                // no reference to it is live while the threads run; all accesses are atomic.
                unsafe { crate::dma::copy_to_device(&v, (addr + 3) as *mut u8) };
            }
        });
        s.spawn(move || {
            for round in 0..20_000u32 {
                let v = [(round % 241) as u8 | 0x80; 3];
                // SAFETY: as above, for `addr..addr+3` and `addr+13..addr+16`.
                unsafe { crate::dma::copy_to_device(&v, addr as *mut u8) };
                // SAFETY: as above.
                unsafe { crate::dma::copy_to_device(&v, (addr + 13) as *mut u8) };
            }
        });
        s.spawn(move || {
            let mut out = [0u8; 7];
            for _ in 0..20_000 {
                // SAFETY: as above, for `addr+1..addr+8`.
                unsafe { crate::dma::copy_from_device((addr + 1) as *const u8, &mut out) };
            }
        });
    });
    // SAFETY: the threads are joined: `backing` is read through its own pointer, no other access.
    let all = unsafe { std::slice::from_raw_parts(addr as *const u8, 16) };
    assert_eq!(&all[3..13], &[(19_999 % 251) as u8 | 1; 10], "the middle writer's last bytes");
    for edge in [&all[0..3], &all[13..16]] {
        assert_eq!(edge, &[(19_999 % 241) as u8 | 0x80; 3], "the edge writer's last bytes");
    }
    drop(backing);
}

#[test]
fn concurrent_device_copies_never_tear_an_aligned_word() {
    // Two threads write different whole-word patterns into the same 8-byte-aligned memory while a
    // third reads: each aligned word read must be one of the patterns, never a mix.
    let mut backing = vec![0u64; 64];
    let addr = backing.as_mut_ptr() as usize;
    let patterns = [[0x11u8; 512], [0x22u8; 512]];
    std::thread::scope(|s| {
        for p in &patterns {
            s.spawn(move || {
                for _ in 0..200 {
                    // SAFETY: `addr..addr+512` is `backing`, read-write, no reference to it is live
                    // while the threads run; all accesses are atomic.
                    unsafe { crate::dma::copy_to_device(p, addr as *mut u8) };
                }
            });
        }
        s.spawn(move || {
            let mut out = [0u8; 512];
            for _ in 0..200 {
                // SAFETY: as above.
                unsafe { crate::dma::copy_from_device(addr as *const u8, &mut out) };
                for word in out.chunks(8) {
                    assert!(word.iter().all(|&b| b == word[0]), "torn word {word:?}");
                }
            }
        });
    });
    drop(backing);
}
