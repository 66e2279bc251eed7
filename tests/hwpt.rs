//! HWPTs on the kernel's mock IOMMU (`CONFIG_IOMMUFD_TEST`): nest parents, nested tables with the mock
//! driver's data, cache invalidation with its partial-failure count, dirty tracking, wrong object
//! types, and teardown order.
//!
//! The errnos asserted are the 7.3.4 kernel's (`drivers/iommu/iommufd/hw_pagetable.c` and the mock
//! driver in `selftest.c`). Where the crate refuses a request before the ioctl, a raw ioctl shows what
//! the kernel itself answers, so the two stay in agreement.
#![cfg(feature = "testing")]

mod common;

use std::os::fd::{AsFd, AsRawFd};

use iommufd::sys::testing as tsys;
use iommufd::testing::{self, MockDevice};
use iommufd::{
    Access, DmaBuffer, Errno, Error, FaultQueue, Hwpt, HwptFlags, HwptKind, InvalidateEntries, Ioas, Iommufd,
    Iova, IovaRange, NestedData, VtdPagingLevels, VtdS1, VtdS1Invalidate,
};

/// An iommufd, an IOAS mapping in 4 KiB units (huge IOMMU pages off, so each CPU page has entries of
/// its own and dirty bits come back page by page) and a mock device attached to it.
fn setup() -> (Iommufd, Ioas, MockDevice) {
    let fd = Iommufd::open().expect("open /dev/iommu");
    let ioas = fd.alloc_ioas().unwrap();
    ioas.set_huge_pages(false).unwrap();
    let dev = MockDevice::new(&ioas).expect("mock device (needs CONFIG_IOMMUFD_TEST)");
    (fd, ioas, dev)
}

/// `struct iommu_hwpt_selftest` for the mock driver, at the running kernel's size: every mock IOTLB
/// entry starts at `iotlb`. The structure is `iotlb` alone on 6.12 (whose mock refuses longer data
/// with EINVAL) and gained `pagetable_type` with the mock's generic page table (7.3, the bindings).
fn selftest_data(iotlb: u32) -> NestedData {
    assert_eq!(std::mem::size_of::<tsys::iommu_hwpt_selftest>(), 8);
    let mut bytes = iotlb.to_ne_bytes().to_vec();
    if !common::predates("6.13") {
        bytes.extend_from_slice(&tsys::MOCK_IOMMUPT_DEFAULT.to_ne_bytes()); // pagetable_type
    }
    NestedData::Raw { data_type: tsys::IOMMU_HWPT_DATA_SELFTEST, bytes }
}

/// `struct iommu_hwpt_invalidate_selftest` entries: (flags, iotlb_id).
fn selftest_entries(entries: &[(u32, u32)]) -> Vec<u8> {
    assert_eq!(std::mem::size_of::<tsys::iommu_hwpt_invalidate_selftest>(), 8);
    entries.iter().flat_map(|&(flags, id)| [flags.to_ne_bytes(), id.to_ne_bytes()].concat()).collect()
}

fn selftest_invalidate(bytes: &[u8]) -> InvalidateEntries<'_> {
    InvalidateEntries::Raw { data_type: tsys::IOMMU_HWPT_INVALIDATE_DATA_SELFTEST, entry_len: 8, bytes }
}

fn nest_parent(dev: &MockDevice, ioas: &Ioas) -> Hwpt {
    Hwpt::alloc(dev, ioas, HwptFlags::NEST_PARENT).expect("nest-parent HWPT on the mock IOMMU")
}

fn assert_errno<T: std::fmt::Debug>(r: Result<T, Error>, errno: Errno) {
    match r {
        Err(e) => assert_eq!(e.errno(), Some(errno), "{e}"),
        Ok(v) => panic!("expected {errno}, got Ok({v:?})"),
    }
}

fn assert_invalid<T: std::fmt::Debug>(r: Result<T, Error>, needle: &str) {
    match r {
        Err(Error::InvalidArgument { reason, .. }) => {
            assert!(reason.contains(needle), "{reason:?} lacks {needle:?}")
        }
        other => panic!("expected InvalidArgument(..{needle}..), got {other:?}"),
    }
}

fn errno() -> Errno {
    Errno::from_io_error(&std::io::Error::last_os_error()).unwrap()
}

/// Raw `IOMMU_HWPT_INVALIDATE` with no entries (the probe) on any object id.
fn raw_invalidate_probe(fd: &Iommufd, id: u32, data_type: u32) -> Result<(), Errno> {
    let mut arg = iommufd::sys::iommu_hwpt_invalidate {
        size: std::mem::size_of::<iommufd::sys::iommu_hwpt_invalidate>() as u32,
        hwpt_id: id,
        data_type,
        ..Default::default()
    };
    // SAFETY: IOMMU_HWPT_INVALIDATE with `iommu_hwpt_invalidate`, sized; no entries, so no pointer
    // is followed.
    let r =
        unsafe { libc::ioctl(fd.as_fd().as_raw_fd(), iommufd::sys::IOMMU_HWPT_INVALIDATE as _, &mut arg) };
    if r < 0 { Err(errno()) } else { Ok(()) }
}

/// Raw `IOMMU_HWPT_ALLOC` of a mock nested table on `pt_id`; returns the new id.
fn raw_alloc_nested(fd: &Iommufd, dev_id: u32, pt_id: u32) -> Result<u32, Errno> {
    let data = tsys::iommu_hwpt_selftest { iotlb: tsys::IOMMU_TEST_IOTLB_DEFAULT, pagetable_type: 0 };
    let mut arg = iommufd::sys::iommu_hwpt_alloc {
        size: std::mem::size_of::<iommufd::sys::iommu_hwpt_alloc>() as u32,
        dev_id,
        pt_id,
        data_type: tsys::IOMMU_HWPT_DATA_SELFTEST,
        // Only `iotlb` on a kernel whose structure has nothing else (see `selftest_data`).
        data_len: if common::predates("6.13") { 4 } else { std::mem::size_of_val(&data) as u32 },
        data_uptr: &data as *const _ as u64,
        ..Default::default()
    };
    // SAFETY: IOMMU_HWPT_ALLOC with `iommu_hwpt_alloc`, sized; `data_uptr` points at `data`, alive
    // for the call, `data_len` bytes long.
    let r = unsafe { libc::ioctl(fd.as_fd().as_raw_fd(), iommufd::sys::IOMMU_HWPT_ALLOC as _, &mut arg) };
    if r < 0 { Err(errno()) } else { Ok(arg.out_hwpt_id) }
}

#[test]
#[ignore = "needs /dev/iommu with CONFIG_IOMMUFD_TEST: run by cargo xtask vm-test"]
fn nest_parent_on_the_mock_iommu() {
    if common::mock_devices_unavailable() {
        return;
    }
    let (_fd, ioas, dev) = setup();
    let parent = nest_parent(&dev, &ioas);
    assert_eq!(parent.kind(), HwptKind::Paging);
    assert_eq!(parent.parent_id(), ioas.id());
    assert_eq!(parent.flags(), HwptFlags::NEST_PARENT);
    // A nest parent is an ordinary paging table too: the device can use it directly.
    dev.replace(&parent).unwrap();
    assert_eq!(dev.hwpt_id(), parent.id());
    dev.replace(&ioas).unwrap();
    // A fault queue goes on the nested tables, never on the parent: refused before the ioctl.
    let fq = FaultQueue::alloc(ioas.iommufd()).unwrap();
    assert_invalid(Hwpt::alloc_with_faults(&dev, &ioas, HwptFlags::NEST_PARENT, &fq), "nest-parent");
    parent.destroy().unwrap();
}

#[test]
#[ignore = "needs /dev/iommu with CONFIG_IOMMUFD_TEST: run by cargo xtask vm-test"]
fn nested_hwpt_with_selftest_data() {
    if common::mock_devices_unavailable() {
        return;
    }
    let (fd, ioas, dev) = setup();
    let parent = nest_parent(&dev, &ioas);
    let nested =
        Hwpt::alloc_nested(&dev, &parent, &selftest_data(testing::IOTLB_DEFAULT), HwptFlags::empty())
            .unwrap();
    assert_eq!(nested.kind(), HwptKind::Nested);
    assert_eq!(nested.parent_id(), parent.id());
    for entry in 0..testing::IOTLB_ENTRIES {
        testing::check_iotlb(&fd, nested.id(), entry, testing::IOTLB_DEFAULT).unwrap();
    }
    // The device can be attached to the nested table.
    dev.replace(&nested).unwrap();
    assert_eq!(dev.hwpt_id(), nested.id());
    dev.replace(&ioas).unwrap();

    // A data type the mock driver does not implement: EOPNOTSUPP, typed or raw.
    let vtd = NestedData::VtdS1(VtdS1::new(0x10_0000, VtdPagingLevels::Four).unwrap());
    let e = Hwpt::alloc_nested(&dev, &parent, &vtd, HwptFlags::empty()).unwrap_err();
    assert_eq!(e.errno(), Some(Errno::OPNOTSUPP), "{e}");
    assert!(e.is_unsupported());
    let other = NestedData::Raw { data_type: 0xbeef, bytes: vec![0; 8] };
    assert_errno(Hwpt::alloc_nested(&dev, &parent, &other, HwptFlags::empty()), Errno::OPNOTSUPP);
    // Right type, data shorter than the structure's first version (4 bytes): EINVAL.
    let short = NestedData::Raw { data_type: tsys::IOMMU_HWPT_DATA_SELFTEST, bytes: vec![0; 2] };
    assert_errno(Hwpt::alloc_nested(&dev, &parent, &short, HwptFlags::empty()), Errno::INVAL);
    // Longer than the kernel's structure: EINVAL even with a zero tail (this driver data has no
    // forward-compatible extension).
    let mut long = selftest_data(7);
    if let NestedData::Raw { bytes, .. } = &mut long {
        bytes.resize(16, 0);
    }
    assert_errno(Hwpt::alloc_nested(&dev, &parent, &long, HwptFlags::empty()), Errno::INVAL);
    // The exact size works and sets the IOTLB value given.
    let h = Hwpt::alloc_nested(&dev, &parent, &selftest_data(7), HwptFlags::empty()).unwrap();
    testing::check_iotlb(&fd, h.id(), 0, 7).unwrap();
}

#[test]
#[ignore = "needs /dev/iommu with CONFIG_IOMMUFD_TEST: run by cargo xtask vm-test"]
fn nested_needs_a_nest_parent() {
    if common::mock_devices_unavailable() {
        return;
    }
    let (fd, ioas, dev) = setup();
    let data = selftest_data(testing::IOTLB_DEFAULT);
    let plain = Hwpt::alloc(&dev, &ioas, HwptFlags::empty()).unwrap();
    assert_invalid(Hwpt::alloc_nested(&dev, &plain, &data, HwptFlags::empty()), "NEST_PARENT");
    // The kernel agrees: EINVAL for a paging parent without NEST_PARENT, for a nested parent and for
    // the device's automatic domain.
    assert_eq!(raw_alloc_nested(&fd, dev.dev_id(), plain.id()), Err(Errno::INVAL));
    let parent = nest_parent(&dev, &ioas);
    let nested = Hwpt::alloc_nested(&dev, &parent, &data, HwptFlags::empty()).unwrap();
    assert_invalid(Hwpt::alloc_nested(&dev, &nested, &data, HwptFlags::empty()), "nested");
    assert_eq!(raw_alloc_nested(&fd, dev.dev_id(), nested.id()), Err(Errno::INVAL));
    assert_eq!(raw_alloc_nested(&fd, dev.dev_id(), dev.hwpt_id()), Err(Errno::INVAL));
    // Flags that belong to the stage-2 parent are refused before the ioctl.
    assert_invalid(Hwpt::alloc_nested(&dev, &parent, &data, HwptFlags::DIRTY_TRACKING), "stage-2");
    // The raw path succeeds on the real nest parent (the helper is right); clean up its object.
    let id = raw_alloc_nested(&fd, dev.dev_id(), parent.id()).unwrap();
    // SAFETY: `id` was allocated by the raw ioctl above; no handle of the crate owns it.
    unsafe { fd.destroy_raw(id) }.unwrap();
}

#[test]
#[ignore = "needs /dev/iommu with CONFIG_IOMMUFD_TEST: run by cargo xtask vm-test"]
fn invalidate_with_selftest_entries() {
    if common::mock_devices_unavailable() {
        return;
    }
    let (fd, ioas, dev) = setup();
    let parent = nest_parent(&dev, &ioas);
    let nested =
        Hwpt::alloc_nested(&dev, &parent, &selftest_data(testing::IOTLB_DEFAULT), HwptFlags::empty())
            .unwrap();
    let iotlb = |entry, value| testing::check_iotlb(&fd, nested.id(), entry, value);
    let default = testing::IOTLB_DEFAULT;

    // The empty list is the kernel's probe for a data type.
    assert_eq!(
        nested.invalidate(&InvalidateEntries::probe(tsys::IOMMU_HWPT_INVALIDATE_DATA_SELFTEST)).unwrap(),
        0
    );
    let e = nested
        .invalidate(&InvalidateEntries::probe(tsys::IOMMU_HWPT_INVALIDATE_DATA_SELFTEST_INVALID))
        .unwrap_err();
    assert_eq!((e.handled, e.error.errno()), (0, Some(Errno::INVAL)), "{e}");

    // Two entries: both handled, those two IOTLB entries cleared, the others untouched.
    let bytes = selftest_entries(&[(0, 1), (0, 3)]);
    assert_eq!(nested.invalidate(&selftest_invalidate(&bytes)).unwrap(), 2);
    for (entry, value) in [(0, default), (1, 0), (2, default), (3, 0)] {
        iotlb(entry, value).unwrap();
    }

    // A bad entry in the middle: the kernel handles the prefix, refuses the bad one, skips the rest.
    let bytes = selftest_entries(&[(0, 0), (0, testing::IOTLB_ENTRIES + 4), (0, 2)]);
    let e = nested.invalidate(&selftest_invalidate(&bytes)).unwrap_err();
    assert_eq!((e.handled, e.error.errno()), (1, Some(Errno::INVAL)), "{e}");
    iotlb(0, 0).unwrap();
    iotlb(2, default).unwrap();
    // `?` into the crate's error keeps the errno.
    let as_error: Error = e.into();
    assert_eq!(as_error.errno(), Some(Errno::INVAL));

    // Unknown entry flags: EOPNOTSUPP, nothing handled.
    let bytes = selftest_entries(&[(1 << 5, 2)]);
    let e = nested.invalidate(&selftest_invalidate(&bytes)).unwrap_err();
    assert_eq!((e.handled, e.error.errno()), (0, Some(Errno::OPNOTSUPP)), "{e}");
    iotlb(2, default).unwrap();

    // Entries longer than the kernel's structure: EINVAL at the first entry, even with a zero tail.
    let mut padded = selftest_entries(&[(0, 2)]);
    padded.extend_from_slice(&[0; 4]);
    let entries = InvalidateEntries::Raw {
        data_type: tsys::IOMMU_HWPT_INVALIDATE_DATA_SELFTEST,
        entry_len: 12,
        bytes: &padded,
    };
    let e = nested.invalidate(&entries).unwrap_err();
    assert_eq!((e.handled, e.error.errno()), (0, Some(Errno::INVAL)), "{e}");
    iotlb(2, default).unwrap();

    // A typed list of another driver's type: the mock refuses the type before any entry.
    let vtd = [VtdS1Invalidate::all()];
    let e = nested.invalidate(&InvalidateEntries::VtdS1(&vtd)).unwrap_err();
    assert_eq!((e.handled, e.error.errno()), (0, Some(Errno::INVAL)), "{e}");

    // "Invalidate all" on a fresh table clears every entry.
    let fresh = Hwpt::alloc_nested(&dev, &parent, &selftest_data(9), HwptFlags::empty()).unwrap();
    let bytes = selftest_entries(&[(tsys::IOMMU_TEST_INVALIDATE_FLAG_ALL, 0)]);
    assert_eq!(fresh.invalidate(&selftest_invalidate(&bytes)).unwrap(), 1);
    for entry in 0..testing::IOTLB_ENTRIES {
        testing::check_iotlb(&fd, fresh.id(), entry, 0).unwrap();
    }
}

#[test]
#[ignore = "needs /dev/iommu with CONFIG_IOMMUFD_TEST: run by cargo xtask vm-test"]
fn wrong_object_types() {
    if common::mock_devices_unavailable() {
        return;
    }
    let (fd, ioas, dev) = setup();
    let parent = nest_parent(&dev, &ioas);
    let nested =
        Hwpt::alloc_nested(&dev, &parent, &selftest_data(testing::IOTLB_DEFAULT), HwptFlags::empty())
            .unwrap();
    let selftest = tsys::IOMMU_HWPT_INVALIDATE_DATA_SELFTEST;

    // Invalidation is for nested tables: a paging HWPT is refused before the ioctl...
    let e = parent.invalidate(&InvalidateEntries::probe(selftest)).unwrap_err();
    assert_eq!(e.handled, 0);
    assert!(matches!(e.error, Error::InvalidArgument { .. }), "{e}");
    // ...and the kernel answers EINVAL for a paging HWPT or an IOAS, ENOENT for no object. 6.12 looks
    // the id up as a nested HWPT only (vIOMMU ids came later), so every other object is ENOENT there.
    let wrong_type = if common::predates("6.13") { Errno::NOENT } else { Errno::INVAL };
    assert_eq!(raw_invalidate_probe(&fd, parent.id(), selftest), Err(wrong_type));
    assert_eq!(raw_invalidate_probe(&fd, ioas.id(), selftest), Err(wrong_type));
    assert_eq!(raw_invalidate_probe(&fd, dev.id(), selftest), Err(wrong_type));
    assert_eq!(raw_invalidate_probe(&fd, 0xffff, selftest), Err(Errno::NOENT));
    assert_eq!(raw_invalidate_probe(&fd, nested.id(), selftest), Ok(()));

    // Dirty tracking is for paging tables allocated with it: refused before the ioctl.
    assert_invalid(nested.set_dirty_tracking(true), "nested");
    assert_invalid(nested.read_dirty(testing::APERTURE.start, 4096, 4096, true), "nested");
    assert_invalid(parent.set_dirty_tracking(true), "DIRTY_TRACKING");
}

#[test]
#[ignore = "needs /dev/iommu with CONFIG_IOMMUFD_TEST: run by cargo xtask vm-test"]
fn dirty_tracking_on_the_mock_iommu() {
    if common::mock_devices_unavailable() {
        return;
    }
    const PAGE: u64 = 4096;
    const PAGES: u64 = 32;
    let (fd, ioas, dev) = setup();
    let hwpt = Hwpt::alloc(&dev, &ioas, HwptFlags::DIRTY_TRACKING).expect("dirty-tracking HWPT");
    dev.replace(&hwpt).unwrap();
    let iova = testing::APERTURE.start;
    let len = PAGES * PAGE;
    let mapping =
        ioas.map(DmaBuffer::new(len as usize).unwrap(), Iova::Fixed(iova), Access::READ_WRITE).unwrap();
    let page = |i: u64| IovaRange { start: iova + i * PAGE, last: iova + (i + 1) * PAGE - 1 };
    let pages = |first: u64, end: u64| IovaRange { start: iova + first * PAGE, last: iova + end * PAGE - 1 };

    // Tracking off: the mock refuses to mark pages dirty.
    assert_errno(testing::set_dirty(&fd, hwpt.id(), iova, PAGE, &[1]), Errno::INVAL);
    hwpt.set_dirty_tracking(true).unwrap();
    hwpt.set_dirty_tracking(true).unwrap(); // idempotent
    assert!(hwpt.read_dirty(iova, len, PAGE, true).unwrap().is_clean());

    // "Device writes" to pages 0, 1, 2, 7 and 31.
    let marked: u64 = [0, 1, 2, 7, 31].iter().map(|b| 1u64 << b).sum();
    assert_eq!(testing::set_dirty(&fd, hwpt.id(), iova, PAGE, &[marked]).unwrap(), 5);
    let expected = vec![pages(0, 3), page(7), page(31)];

    // Read without clearing, twice: the same answer.
    for _ in 0..2 {
        let b = hwpt.read_dirty(iova, len, PAGE, false).unwrap();
        assert_eq!(b.dirty_pages(), 5);
        assert_eq!(b.iter_ranges().collect::<Vec<_>>(), expected);
        assert_eq!(b.as_words(), &[marked]);
        assert!(b.is_dirty(iova + 7 * PAGE + 123) && !b.is_dirty(iova + 3 * PAGE));
    }
    // A sub-range: bit 0 is the sub-range's first page.
    let b = hwpt.read_dirty(iova + 2 * PAGE, 8 * PAGE, PAGE, false).unwrap();
    assert_eq!(b.iter_ranges().collect::<Vec<_>>(), vec![page(2), page(7)]);
    assert_eq!(b.as_words(), &[1 | 1 << 5]);
    // Coarser granularity: one bit per 8 KiB.
    let b = hwpt.read_dirty(iova, len, 2 * PAGE, false).unwrap();
    assert_eq!(b.pages(), PAGES / 2);
    assert_eq!(b.iter_ranges().collect::<Vec<_>>(), vec![pages(0, 4), pages(6, 8), pages(30, 32)]);

    // Read and clear: the same pages, then nothing.
    let b = hwpt.read_dirty(iova, len, PAGE, true).unwrap();
    assert_eq!(b.iter_ranges().collect::<Vec<_>>(), expected);
    assert!(hwpt.read_dirty(iova, len, PAGE, true).unwrap().is_clean());

    // A reused bitmap holds exactly the latest read.
    let mut b = iommufd::DirtyBitmap::new(iova, len, PAGE).unwrap();
    testing::set_dirty(&fd, hwpt.id(), iova, PAGE, &[1 << 9]).unwrap();
    hwpt.read_dirty_into(&mut b, true).unwrap();
    assert_eq!(b.iter_ranges().collect::<Vec<_>>(), vec![page(9)]);
    testing::set_dirty(&fd, hwpt.id(), iova, PAGE, &[1 << 4]).unwrap();
    hwpt.read_dirty_into(&mut b, true).unwrap();
    assert_eq!(b.iter_ranges().collect::<Vec<_>>(), vec![page(4)]);

    // Misaligned requests never reach the kernel; an IOAS-misaligned one is the kernel's EINVAL.
    assert_invalid(hwpt.read_dirty(iova + 512, PAGE, PAGE, true), "multiples");
    assert_invalid(hwpt.read_dirty(iova, len, 3 * PAGE, true), "power of two");
    assert_errno(hwpt.read_dirty(iova + 1024, 1024, 1024, true), Errno::INVAL);

    // Tracking off again: the mock no longer marks pages.
    hwpt.set_dirty_tracking(false).unwrap();
    assert_errno(testing::set_dirty(&fd, hwpt.id(), iova, PAGE, &[1]), Errno::INVAL);

    mapping.unmap().unwrap();
    dev.replace(&ioas).unwrap();
    hwpt.destroy().unwrap();
}

#[test]
#[ignore = "needs /dev/iommu with CONFIG_IOMMUFD_TEST: run by cargo xtask vm-test"]
fn dirty_tracking_refused_by_a_device_without_it() {
    if common::mock_devices_unavailable() {
        return;
    }
    let fd = Iommufd::open().unwrap();
    let ioas = fd.alloc_ioas().unwrap();
    let dev = MockDevice::with_flags(&ioas, testing::MockDeviceFlags::NO_DIRTY).unwrap();
    let e = Hwpt::alloc(&dev, &ioas, HwptFlags::DIRTY_TRACKING).unwrap_err();
    assert_eq!(e.errno(), Some(Errno::OPNOTSUPP), "{e}");
    assert!(e.is_unsupported());
}

#[test]
#[ignore = "needs /dev/iommu with CONFIG_IOMMUFD_TEST: run by cargo xtask vm-test"]
fn nested_keeps_its_parent_and_fault_queue_alive() {
    if common::mock_devices_unavailable() {
        return;
    }
    let (fd, ioas, dev) = setup();
    let parent = nest_parent(&dev, &ioas);
    let parent_id = parent.id();
    let fq = FaultQueue::alloc(&fd).unwrap();
    let nested = Hwpt::alloc_nested_with_faults(
        &dev,
        &parent,
        &selftest_data(testing::IOTLB_DEFAULT),
        HwptFlags::empty(),
        &fq,
    )
    .unwrap();
    let (nested_id, fq_id) = (nested.id(), fq.id());
    dev.replace(&nested).unwrap();

    // Handles below the nested table refuse to go while it exists (and the device holds it). A
    // refused destroy gives the handle back, unchanged.
    let parent = match parent.destroy() {
        Err(e) if matches!(e.error(), Error::InUse { users: 1, .. }) => e.into_inner(),
        other => panic!("expected InUse with the handle back, got {other:?}"),
    };
    assert_eq!(parent.id(), parent_id);
    drop(parent);
    assert!(matches!(fq.close(), Err(Error::InUse { .. })));
    let (e, again) = nested.clone().destroy().unwrap_err().into_parts();
    assert!(matches!(e, Error::InUse { .. }), "{e:?}");
    assert_eq!(again.id(), nested_id);
    drop(again);
    // The last handles to the parent and the queue are now inside the nested table: it still works.
    testing::check_iotlb(&fd, nested_id, 0, testing::IOTLB_DEFAULT).unwrap();

    // Detach the device, then destroy the nested table: the parent and the queue go with it.
    dev.replace(&ioas).unwrap();
    nested.destroy().unwrap();
    for id in [nested_id, parent_id, fq_id] {
        // SAFETY: no live handle owns these ids any more: the test checks that they are gone.
        let e = unsafe { fd.destroy_raw(id) }.unwrap_err();
        assert_eq!(e.errno(), Some(Errno::NOENT), "object {id}: {e}");
    }
    // Nothing holds the IOAS in the kernel but the device.
    dev.close().unwrap();
    ioas.destroy().unwrap();
}

#[test]
#[ignore = "needs /dev/iommu with CONFIG_IOMMUFD_TEST: run by cargo xtask vm-test"]
fn dropping_in_any_order_tears_down_children_first() {
    if common::mock_devices_unavailable() {
        return;
    }
    let (fd, ioas, dev) = setup();
    let ids;
    {
        let parent = nest_parent(&dev, &ioas);
        let nested =
            Hwpt::alloc_nested(&dev, &parent, &selftest_data(testing::IOTLB_DEFAULT), HwptFlags::empty())
                .unwrap();
        let second = Hwpt::alloc_nested(&dev, &parent, &selftest_data(1), HwptFlags::empty()).unwrap();
        dev.replace(&second).unwrap();
        ids = [parent.id(), nested.id(), second.id()];
        // Parent first: its handle only lets go; the kernel object lives on under the nested tables.
        drop(parent);
        drop(nested);
    }
    // `second` is still alive through the device.
    testing::check_iotlb(&fd, ids[2], 0, 1).unwrap();
    drop(dev);
    for id in ids {
        // SAFETY: every handle owning these ids has been dropped.
        let e = unsafe { fd.destroy_raw(id) }.unwrap_err();
        assert_eq!(e.errno(), Some(Errno::NOENT), "object {id}: {e}");
    }
    ioas.destroy().unwrap();
}

#[test]
#[ignore = "needs /dev/iommu with CONFIG_IOMMUFD_TEST: run by cargo xtask vm-test"]
fn a_refused_destroy_gives_the_handle_back() {
    if common::mock_devices_unavailable() {
        return;
    }
    let (fd, ioas, dev) = setup();
    let parent = nest_parent(&dev, &ioas);
    let parent_id = parent.id();
    // A nested table the crate does not know of holds the parent in the kernel: the handle is the
    // only one, so the destroy reaches the kernel, which refuses it.
    let nested = raw_alloc_nested(&fd, dev.dev_id(), parent_id).unwrap();
    let (e, parent) = parent.destroy().unwrap_err().into_parts();
    assert_eq!(e.errno(), Some(Errno::BUSY), "{e}");
    assert!(e.is_retryable());
    // The handle came back intact: the object and its IOAS reference are still alive and usable.
    assert_eq!((parent.id(), parent.parent_id()), (parent_id, ioas.id()));
    dev.replace(&parent).unwrap();
    dev.replace(&ioas).unwrap();
    // Once the kernel's other user is gone, the same handle is destroyed for good.
    // SAFETY: `nested` was allocated by the raw ioctl above; no handle owns it.
    unsafe { fd.destroy_raw(nested) }.unwrap();
    parent.destroy().unwrap();
    // SAFETY: the handle owning `parent_id` is gone: this checks that the object is too.
    let e = unsafe { fd.destroy_raw(parent_id) }.unwrap_err();
    assert_eq!(e.errno(), Some(Errno::NOENT), "{e}");
    // The IOAS was released after the HWPT: it can go now that the device leaves.
    dev.close().unwrap();
    ioas.destroy().unwrap();
}

#[test]
#[ignore = "needs /dev/iommu with CONFIG_IOMMUFD_TEST: run by cargo xtask vm-test"]
fn a_refused_destroy_left_to_drop_destroys_later() {
    if common::mock_devices_unavailable() {
        return;
    }
    let (fd, ioas, dev) = setup();
    let parent = nest_parent(&dev, &ioas);
    let parent_id = parent.id();
    let nested = raw_alloc_nested(&fd, dev.dev_id(), parent_id).unwrap();
    let parent = parent.destroy().unwrap_err().into_inner();
    // SAFETY: `nested` was allocated by the raw ioctl above; no handle owns it.
    unsafe { fd.destroy_raw(nested) }.unwrap();
    // Dropping the returned handle destroys the object: nothing leaks.
    drop(parent);
    // SAFETY: the handle owning `parent_id` is gone: this checks that the object is too.
    let e = unsafe { fd.destroy_raw(parent_id) }.unwrap_err();
    assert_eq!(e.errno(), Some(Errno::NOENT), "{e}");
}
