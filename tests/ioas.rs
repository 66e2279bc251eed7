//! IOAS: allocation, the three kinds of map, fixed and automatic IOVAs, read-only maps, unmap of a
//! range and of everything with the reported length, copy, IOVA ranges, allowed IOVAs, options.

mod common;

use common::NEEDS;
use iommufd::{Access, DmaBuffer, Errno, Error, Iommufd, Iova, IovaRange, RlimitMode, page_size};

fn page() -> u64 {
    page_size() as u64
}

fn memfd(len: u64, fill: u8) -> std::os::fd::OwnedFd {
    let fd = rustix::fs::memfd_create("iommufd-test", rustix::fs::MemfdFlags::CLOEXEC).unwrap();
    rustix::fs::ftruncate(&fd, len).unwrap();
    rustix::io::pwrite(&fd, &vec![fill; len as usize], 0).unwrap();
    fd
}

#[test]
#[ignore = "needs /dev/iommu: run by cargo xtask vm-test"]
fn alloc_gives_distinct_ids_and_destroy_frees_them() {
    let _ = NEEDS;
    let fd = Iommufd::open().unwrap();
    let a = fd.alloc_ioas().unwrap();
    let b = fd.alloc_ioas().unwrap();
    assert_ne!(a.id(), b.id());
    let (ida, idb) = (a.id(), b.id());
    a.destroy().unwrap();
    drop(b);
    for id in [ida, idb] {
        // SAFETY: no handle owns these ids any more; destroying them again is the leak check.
        let e = unsafe { fd.destroy_raw(id) }.unwrap_err();
        assert_eq!(e.errno(), Some(Errno::NOENT), "{e}");
    }
}

#[test]
#[ignore = "needs /dev/iommu: run by cargo xtask vm-test"]
fn iova_ranges_of_an_empty_ioas_cover_the_space() {
    let fd = Iommufd::open().unwrap();
    let ioas = fd.alloc_ioas().unwrap();
    let r = ioas.iova_ranges().unwrap();
    assert_eq!(r.ranges, vec![IovaRange { start: 0, last: u64::MAX }], "no device attached: no holes");
    assert!(r.alignment.is_power_of_two() && r.alignment <= page(), "alignment {:#x}", r.alignment);
}

#[test]
#[ignore = "needs /dev/iommu: run by cargo xtask vm-test"]
fn map_buffer_fixed_and_auto_then_unmap_returns_it() {
    let fd = Iommufd::open().unwrap();
    let ioas = fd.alloc_ioas().unwrap();
    let mut buf = DmaBuffer::new(3 * page_size()).unwrap();
    buf.as_mut_slice()[..4].copy_from_slice(b"abcd");
    let fixed = ioas.map(buf, Iova::Fixed(0x40_0000), Access::READ_WRITE).unwrap();
    assert_eq!(fixed.iova(), 0x40_0000);
    assert_eq!(fixed.len(), 3 * page());
    let auto = ioas.map(DmaBuffer::new(page_size()).unwrap(), Iova::Auto, Access::READ).unwrap();
    assert_eq!(auto.iova() % page(), 0);
    assert!(!auto.range().overlaps(&fixed.range()), "{auto:?} vs {fixed:?}");
    let mut head = [0u8; 4];
    fixed.read_at(0, &mut head).unwrap();
    assert_eq!(&head, b"abcd");
    fixed.write_at(4, b"efgh").unwrap();
    let buf = fixed.unmap().unwrap().expect("not shared");
    assert_eq!(&buf.as_slice()[..8], b"abcdefgh");
    assert_eq!(auto.unmap().unwrap().unwrap().len(), page_size());
    // Both ranges are gone: unmapping everything finds nothing.
    assert_eq!(ioas.unmap_all().unwrap(), 0);
}

#[test]
#[ignore = "needs /dev/iommu: run by cargo xtask vm-test"]
fn overlapping_fixed_map_is_refused() {
    let fd = Iommufd::open().unwrap();
    let ioas = fd.alloc_ioas().unwrap();
    let _a =
        ioas.map(DmaBuffer::new(2 * page_size()).unwrap(), Iova::Fixed(0x10_0000), Access::READ).unwrap();
    // Caught before the ioctl: the range overlaps a live guard.
    let e = ioas.map(DmaBuffer::new(page_size()).unwrap(), Iova::Fixed(0x10_0000 + page()), Access::READ);
    assert!(matches!(e, Err(Error::InvalidArgument { .. })), "{e:?}");
    // A leaked guard's range is still known to the IOAS's registry: refused before the ioctl too.
    let b = ioas.map(DmaBuffer::new(page_size()).unwrap(), Iova::Fixed(0x20_0000), Access::READ).unwrap();
    let range = b.leak();
    let e =
        ioas.map(DmaBuffer::new(page_size()).unwrap(), Iova::Fixed(range.start), Access::READ).unwrap_err();
    assert!(matches!(&e, Error::InvalidArgument { reason, .. } if reason.contains("leaked")), "{e}");
    // An automatic map never lands there either (the kernel knows the area).
    let c = ioas.map(DmaBuffer::new(page_size()).unwrap(), Iova::Auto, Access::READ).unwrap();
    assert!(!c.range().overlaps(&range));
    assert_eq!(ioas.unmap_range(range.start, range.len()).unwrap(), page());
}

#[test]
#[ignore = "needs /dev/iommu: run by cargo xtask vm-test"]
fn map_file_from_a_memfd() {
    let fd = Iommufd::open().unwrap();
    let ioas = fd.alloc_ioas().unwrap();
    let file = memfd(4 * page(), 0x77);
    let r = ioas.map_file(&file, page(), 2 * page(), Iova::Fixed(0x80_0000), Access::READ_WRITE);
    if common::unsupported_here(&r, "IOMMU_IOAS_MAP_FILE", "6.13", Errno::NOTTY) {
        return;
    }
    let m = r.unwrap();
    assert_eq!((m.iova(), m.len()), (0x80_0000, 2 * page()));
    drop(file); // the kernel holds the pages, not the fd
    let ro = {
        let file = memfd(page(), 1);
        ioas.map_file(&file, 0, page(), Iova::Auto, Access::READ).unwrap()
    };
    assert_eq!(ro.access(), Access::READ);
    m.unmap().unwrap();
    ro.unmap().unwrap();
    assert_eq!(ioas.unmap_all().unwrap(), 0, "both guards unmapped their ranges");
}

#[test]
#[ignore = "needs /dev/iommu: run by cargo xtask vm-test"]
fn map_user_memory_and_read_only() {
    let fd = Iommufd::open().unwrap();
    let ioas = fd.alloc_ioas().unwrap();
    let len = 4 * page_size();
    // SAFETY: a fresh private anonymous mapping; it is only unmapped after the IOVA mapping is gone.
    let va = unsafe {
        rustix::mm::mmap_anonymous(
            std::ptr::null_mut(),
            len,
            rustix::mm::ProtFlags::READ | rustix::mm::ProtFlags::WRITE,
            rustix::mm::MapFlags::PRIVATE,
        )
    }
    .unwrap()
    .cast::<u8>();
    // SAFETY: `va..va+len` stays mapped until after `m` is unmapped below, no Rust reference to it is
    // created, and the guard is not leaked. The mapping is read-only for devices anyway.
    let m = unsafe { ioas.map_user(va, len, Iova::Fixed(0x100_0000), Access::READ) }.unwrap();
    assert_eq!(m.access(), Access::READ);
    m.unmap().unwrap();
    // SAFETY: the only IOVA range referring to it is gone.
    unsafe { rustix::mm::munmap(va.cast(), len) }.unwrap();
}

#[test]
#[ignore = "needs /dev/iommu: run by cargo xtask vm-test"]
fn unmap_range_and_all_report_lengths() {
    let fd = Iommufd::open().unwrap();
    let ioas = fd.alloc_ioas().unwrap();
    let mut ranges = Vec::new();
    for i in 0..3u64 {
        let m = ioas
            .map(DmaBuffer::new(page_size()).unwrap(), Iova::Fixed(0x10_0000 * (i + 1)), Access::READ)
            .unwrap();
        ranges.push(m.leak());
    }
    assert_eq!(ioas.unmap_range(ranges[0].start, ranges[0].len()).unwrap(), page());
    // No mapping starts exactly here any more.
    let e = ioas.unmap_range(ranges[0].start, ranges[0].len()).unwrap_err();
    assert_eq!(e.errno(), Some(Errno::NOENT), "{e}");
    assert_eq!(ioas.unmap_all().unwrap(), 2 * page());
    assert_eq!(ioas.unmap_all().unwrap(), 0);
}

#[test]
#[ignore = "needs /dev/iommu: run by cargo xtask vm-test"]
fn copy_shares_memory_until_the_last_copy_is_unmapped() {
    let fd = Iommufd::open().unwrap();
    let a = fd.alloc_ioas().unwrap();
    let b = fd.alloc_ioas().unwrap();
    let mut buf = DmaBuffer::new(2 * page_size()).unwrap();
    buf.as_mut_slice().fill(0xab);
    let src = a.map(buf, Iova::Fixed(0x20_0000), Access::READ_WRITE).unwrap();
    let copy = b.copy(&src, Iova::Fixed(0x30_0000), Access::READ).unwrap();
    assert_eq!((copy.iova(), copy.len(), copy.ioas_id()), (0x30_0000, 2 * page(), b.id()));
    let auto = b.copy(&src, Iova::Auto, Access::READ).unwrap();
    assert_eq!(auto.to_vec().unwrap(), vec![0xab; 2 * page_size()], "copies see the same memory");
    assert!(src.unmap().unwrap().is_none(), "still shared by the copies");
    assert!(copy.unmap().unwrap().is_none(), "still shared by one copy");
    let buf = auto.unmap().unwrap().expect("last one out returns the buffer");
    assert_eq!(buf.as_slice()[0], 0xab);
}

#[test]
#[ignore = "needs /dev/iommu: run by cargo xtask vm-test"]
fn copy_from_another_iommufd_is_refused() {
    let fd1 = Iommufd::open().unwrap();
    let fd2 = Iommufd::open().unwrap();
    let a = fd1.alloc_ioas().unwrap();
    let b = fd2.alloc_ioas().unwrap();
    let m = a.map(DmaBuffer::new(page_size()).unwrap(), Iova::Auto, Access::READ).unwrap();
    assert!(matches!(b.copy(&m, Iova::Auto, Access::READ), Err(Error::ForeignObject { .. })));
}

#[test]
#[ignore = "needs /dev/iommu: run by cargo xtask vm-test"]
fn allow_iovas_steers_automatic_allocation() {
    let fd = Iommufd::open().unwrap();
    let ioas = fd.alloc_ioas().unwrap();
    let window = IovaRange { start: 0x4000_0000, last: 0x4000_0000 + 4 * page() - 1 };
    ioas.allow_iovas(&[window]).unwrap();
    let m = ioas.map(DmaBuffer::new(2 * page_size()).unwrap(), Iova::Auto, Access::READ).unwrap();
    assert!(window.contains(&m.range()), "{m:?} outside {window:?}");
    let e = ioas.map(DmaBuffer::new(8 * page_size()).unwrap(), Iova::Auto, Access::READ).unwrap_err();
    assert_eq!(e.errno(), Some(Errno::NOSPC), "{e}");
    // Fixed mappings outside the allowed window still work.
    let f = ioas.map(DmaBuffer::new(page_size()).unwrap(), Iova::Fixed(0x1000_0000), Access::READ).unwrap();
    drop((m, f));
    ioas.allow_iovas(&[]).unwrap();
    let big = ioas.map(DmaBuffer::new(8 * page_size()).unwrap(), Iova::Auto, Access::READ).unwrap();
    assert!(!window.contains(&big.range()));
}

#[test]
#[ignore = "needs /dev/iommu: run by cargo xtask vm-test"]
fn options_huge_pages_and_rlimit_mode() {
    let fd = Iommufd::open().unwrap();
    // The accounting mode can change only while the iommufd holds no object (root has
    // CAP_SYS_RESOURCE).
    assert_eq!(fd.rlimit_mode().unwrap(), RlimitMode::PerUser);
    fd.set_rlimit_mode(RlimitMode::PerProcess).unwrap();
    assert_eq!(fd.rlimit_mode().unwrap(), RlimitMode::PerProcess);
    let ioas = fd.alloc_ioas().unwrap();
    let e = fd.set_rlimit_mode(RlimitMode::PerUser).unwrap_err();
    assert_eq!(e.errno(), Some(Errno::BUSY), "{e}");
    assert_eq!(fd.rlimit_mode().unwrap(), RlimitMode::PerProcess);
    assert!(ioas.huge_pages().unwrap(), "huge pages default on");
    ioas.set_huge_pages(false).unwrap();
    assert!(!ioas.huge_pages().unwrap());
    ioas.set_huge_pages(true).unwrap();
    assert!(ioas.huge_pages().unwrap());
}

#[test]
#[ignore = "needs /dev/iommu: run by cargo xtask vm-test"]
fn adopting_a_passed_fd_works_and_rejects_other_files() {
    let fd: std::os::fd::OwnedFd =
        std::fs::OpenOptions::new().read(true).write(true).open("/dev/iommu").unwrap().into();
    let iommufd = Iommufd::from_fd(fd).unwrap();
    iommufd.alloc_ioas().unwrap();
    let null: std::os::fd::OwnedFd = std::fs::File::open("/dev/null").unwrap().into();
    assert!(matches!(Iommufd::from_fd(null), Err(Error::WrongFile { .. })));
}
