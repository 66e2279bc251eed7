//! The kernel's mock IOMMU (`CONFIG_IOMMUFD_TEST`) through `iommufd::testing`: mock devices attached
//! to IOASes and HWPTs, what their domains translate, pin counts, replacement, HWPT flags, PASIDs,
//! emulated-device accesses, dirty tracking, I/O page faults, vIOMMU events and invalidations, and a
//! clean teardown.
//!
//! Build with `--features testing`. Every test needs `/dev/iommu` from a kernel with
//! `CONFIG_IOMMUFD_TEST`, so each is ignored on the host and run by `cargo xtask vm-test`.
#![cfg(feature = "testing")]

mod common;

use std::time::Duration;

use iommufd::testing::{self, MockAccess, MockDevice, MockDeviceFlags, PageRequest};
use iommufd::{
    Access, DmaBuffer, Errno, Error, FaultPerm, FaultQueue, HwInfoData, Hwpt, HwptFlags, Iommufd, Iova,
    IovaRange, Mapping, Vdevice, VeventRecord, Veventq, Viommu, hw_info, page_size,
};

/// The errno of a failed call, for assertions.
fn errno<T: std::fmt::Debug>(r: iommufd::Result<T>) -> Option<Errno> {
    r.expect_err("the call should have failed").errno()
}

/// A buffer of `pages` pages filled with `byte` (so its pages exist), and its address.
fn buffer(pages: usize, byte: u8) -> (DmaBuffer, *const u8) {
    let mut buffer = DmaBuffer::new(pages * page_size()).unwrap();
    buffer.as_mut_slice().fill(byte);
    let va = buffer.as_slice().as_ptr();
    (buffer, va)
}

/// Maps `buffer` at the start of the mock aperture.
fn map_at_aperture(ioas: &iommufd::Ioas, buffer: DmaBuffer) -> Mapping {
    ioas.map(buffer, Iova::Fixed(testing::APERTURE.start), Access::READ_WRITE).unwrap()
}

/// Asserts that `id` names no object of `iommufd` any more.
fn assert_gone(iommufd: &Iommufd, id: u32, what: &str) {
    // SAFETY: every handle that owned `id` is gone; the destroy only probes that the id is free.
    let r = unsafe { iommufd.destroy_raw(id) };
    assert_eq!(errno(r), Some(Errno::NOENT), "{what} {id} still exists");
}

#[test]
#[ignore = "needs /dev/iommu with CONFIG_IOMMUFD_TEST: run by cargo xtask vm-test"]
fn mock_domain_translates_mapped_memory() {
    if common::mock_devices_unavailable() {
        return;
    }
    let iommufd = Iommufd::open().unwrap();
    let ioas = iommufd.alloc_ioas().unwrap();
    let mock = MockDevice::new(&ioas).unwrap();
    assert_ne!(mock.id(), 0);
    assert_ne!(mock.dev_id(), 0);
    assert_ne!(mock.hwpt_id(), 0);
    assert_eq!(mock.pt_id(), ioas.id());

    let (buf, va) = buffer(4, 0x11);
    let (_other, other_va) = buffer(4, 0x22);
    let len = 4 * page_size();
    let mapping = map_at_aperture(&ioas, buf);
    testing::check_map(&iommufd, mock.hwpt_id(), mapping.iova(), va, len).unwrap();
    // A page at a time, and from the middle.
    let page = page_size();
    testing::check_map(&iommufd, mock.hwpt_id(), mapping.iova() + page as u64, va.wrapping_add(page), page)
        .unwrap();

    // The check is real: other memory, or the right memory one page off, does not match.
    let r = testing::check_map(&iommufd, mock.hwpt_id(), mapping.iova(), other_va, len);
    assert_eq!(errno(r), Some(Errno::INVAL));
    let r = testing::check_map(&iommufd, mock.hwpt_id(), mapping.iova(), va.wrapping_add(page), page);
    assert_eq!(errno(r), Some(Errno::INVAL));
    // Nothing to check is refused before the ioctl.
    let r = testing::check_map(&iommufd, mock.hwpt_id(), mapping.iova(), va, 0);
    assert!(matches!(r, Err(Error::InvalidArgument { .. })), "{r:?}");

    let iova = mapping.iova();
    let _buf = mapping.unmap().unwrap();
    let r = testing::check_map(&iommufd, mock.hwpt_id(), iova, va, len);
    assert_eq!(errno(r), Some(Errno::INVAL), "the unmapped range no longer translates");
    mock.close().unwrap();
}

#[test]
#[ignore = "needs /dev/iommu with CONFIG_IOMMUFD_TEST: run by cargo xtask vm-test"]
fn mapping_pins_pages_once_and_unmap_unpins() {
    if common::mock_devices_unavailable() {
        return;
    }
    let iommufd = Iommufd::open().unwrap();
    let ioas = iommufd.alloc_ioas().unwrap();
    let _mock = MockDevice::new(&ioas).unwrap();
    let (buf, va) = buffer(2, 0x33);
    let len = 2 * page_size();
    testing::check_refs(&iommufd, va, len, 0).unwrap();

    let mapping = map_at_aperture(&ioas, buf);
    testing::check_refs(&iommufd, va, len, 1).unwrap();
    let r = testing::check_refs(&iommufd, va, len, 2);
    assert_eq!(errno(r), Some(Errno::IO), "a wrong count is EIO");

    // A second mapping of the same pages (IOAS_COPY into another IOAS) shares the one pin.
    let other = iommufd.alloc_ioas().unwrap();
    let copy = other.copy(&mapping, Iova::Auto, Access::READ).unwrap();
    testing::check_refs(&iommufd, va, len, 1).unwrap();
    drop(copy);

    let _buf = mapping.unmap().unwrap().expect("the buffer comes back");
    testing::check_refs(&iommufd, va, len, 0).unwrap();
}

#[test]
#[ignore = "needs /dev/iommu with CONFIG_IOMMUFD_TEST: run by cargo xtask vm-test"]
fn replace_moves_the_device_between_ioas_and_hwpt() {
    if common::mock_devices_unavailable() {
        return;
    }
    let iommufd = Iommufd::open().unwrap();
    let ioas = iommufd.alloc_ioas().unwrap();
    let mock = MockDevice::new(&ioas).unwrap();
    let auto_domain = mock.hwpt_id();
    let (buf, va) = buffer(1, 0x44);
    let mapping = map_at_aperture(&ioas, buf);

    let hwpt = Hwpt::alloc(&mock, &ioas, HwptFlags::empty()).unwrap();
    mock.replace(&hwpt).unwrap();
    assert_eq!(mock.hwpt_id(), hwpt.id());
    assert_eq!(mock.pt_id(), hwpt.id());
    // The new domain holds the IOAS's existing mappings.
    testing::check_map(&iommufd, hwpt.id(), mapping.iova(), va, page_size()).unwrap();
    // The automatic domain went away with its last device.
    assert_gone(&iommufd, auto_domain, "the automatic domain");
    // The device holds the HWPT: dropping our handle does not destroy it.
    let hwpt_id = hwpt.id();
    drop(hwpt);
    testing::check_map(&iommufd, hwpt_id, mapping.iova(), va, page_size()).unwrap();

    // Back to the IOAS: a fresh automatic domain, with the mapping in it.
    mock.replace(&ioas).unwrap();
    assert_eq!(mock.pt_id(), ioas.id());
    assert_ne!(mock.hwpt_id(), hwpt_id);
    testing::check_map(&iommufd, mock.hwpt_id(), mapping.iova(), va, page_size()).unwrap();
    // The HWPT, released by the device after the kernel moved it away, is gone.
    assert_gone(&iommufd, hwpt_id, "the replaced HWPT");

    // A page table of another iommufd is refused before any ioctl.
    let stranger = Iommufd::open().unwrap().alloc_ioas().unwrap();
    assert!(matches!(mock.replace(&stranger), Err(Error::ForeignObject { .. })));
}

#[test]
#[ignore = "needs /dev/iommu with CONFIG_IOMMUFD_TEST: run by cargo xtask vm-test"]
fn hw_info_reports_the_mock_iommu() {
    if common::mock_devices_unavailable() {
        return;
    }
    let iommufd = Iommufd::open().unwrap();
    let ioas = iommufd.alloc_ioas().unwrap();
    let mock = MockDevice::new(&ioas).unwrap();
    let info = hw_info(&mock).unwrap();
    match &info.data {
        HwInfoData::Unknown { kind, data } => {
            assert_eq!(*kind, 0xfeed_beef);
            assert_eq!(*kind, testing::HW_INFO_TYPE);
            // struct iommu_test_hw_info { u32 flags; u32 test_reg; }
            assert_eq!(data.len(), 8);
            assert_eq!(u32::from_ne_bytes(data[4..8].try_into().unwrap()), testing::HW_INFO_TEST_REG);
        }
        other => panic!("mock hw_info data: {other:?}"),
    }
    assert!(info.capabilities.contains(iommufd::HwCapabilities::DIRTY_TRACKING));
    assert_eq!(info.max_pasid_log2, 0);

    let no_dirty = MockDevice::with_flags(&ioas, MockDeviceFlags::NO_DIRTY).unwrap();
    assert!(!hw_info(&no_dirty).unwrap().capabilities.contains(iommufd::HwCapabilities::DIRTY_TRACKING));
    let Some(pasid) = common::pasid_mock_device(&ioas) else { return };
    assert_eq!(hw_info(&pasid).unwrap().max_pasid_log2, testing::PASID_WIDTH);
}

#[test]
#[ignore = "needs /dev/iommu with CONFIG_IOMMUFD_TEST: run by cargo xtask vm-test"]
fn hwpt_alloc_dirty_tracking_and_nest_parent_on_the_mock() {
    if common::mock_devices_unavailable() {
        return;
    }
    let iommufd = Iommufd::open().unwrap();
    let ioas = iommufd.alloc_ioas().unwrap();
    let mock = MockDevice::new(&ioas).unwrap();
    for flags in [
        HwptFlags::DIRTY_TRACKING,
        HwptFlags::NEST_PARENT,
        HwptFlags::DIRTY_TRACKING | HwptFlags::NEST_PARENT,
        HwptFlags::PASID,
    ] {
        let r = Hwpt::alloc(&mock, &ioas, flags);
        if flags.contains(HwptFlags::PASID)
            && common::unsupported_here(
                &r,
                "IOMMU_HWPT_ALLOC (IOMMU_HWPT_ALLOC_PASID)",
                "6.15",
                Errno::OPNOTSUPP,
            )
        {
            continue;
        }
        let hwpt = r.unwrap_or_else(|e| panic!("{flags:?}: {e}"));
        assert_eq!(hwpt.flags(), flags);
        // A mock device can be created directly on it, too.
        let on_it = MockDevice::new(&hwpt).unwrap();
        assert_eq!(on_it.hwpt_id(), hwpt.id());
        on_it.close().unwrap();
        hwpt.destroy().unwrap();
    }
    // A device whose IOMMU cannot track dirty pages is refused DIRTY_TRACKING.
    let no_dirty = MockDevice::with_flags(&ioas, MockDeviceFlags::NO_DIRTY).unwrap();
    let r = Hwpt::alloc(&no_dirty, &ioas, HwptFlags::DIRTY_TRACKING);
    assert!(r.as_ref().is_err_and(Error::is_unsupported), "{r:?}");
}

#[test]
#[ignore = "needs /dev/iommu with CONFIG_IOMMUFD_TEST: run by cargo xtask vm-test"]
fn set_dirty_shows_up_in_the_dirty_bitmap() {
    if common::mock_devices_unavailable() {
        return;
    }
    let iommufd = Iommufd::open().unwrap();
    let ioas = iommufd.alloc_ioas().unwrap();
    // Dirty bits live in IOMMU page table entries: with huge pages on, physically contiguous pages may
    // share one larger entry and be reported dirty together. One entry per page keeps this exact.
    ioas.set_huge_pages(false).unwrap();
    let mock = MockDevice::new(&ioas).unwrap();
    let hwpt = Hwpt::alloc(&mock, &ioas, HwptFlags::DIRTY_TRACKING).unwrap();
    mock.replace(&hwpt).unwrap();
    let pages = 8;
    let (buf, _) = buffer(pages, 0x55);
    let mapping = map_at_aperture(&ioas, buf);
    let page = page_size() as u64;

    // Tracking off: the mock refuses to mark pages.
    let r = testing::set_dirty(&iommufd, hwpt.id(), mapping.iova(), page, &[0b1]);
    assert_eq!(errno(r), Some(Errno::INVAL));

    hwpt.set_dirty_tracking(true).unwrap();
    // Pages 0, 3 and 7 of the mapping. The bitmap covers 64 pages; bits past the mapping are unset.
    let marked = testing::set_dirty(&iommufd, hwpt.id(), mapping.iova(), page, &[0b1000_1001]).unwrap();
    assert_eq!(marked, 3);
    let bitmap = hwpt.read_dirty(mapping.iova(), pages as u64 * page, page, true).unwrap();
    assert_eq!(bitmap.dirty_pages(), 3);
    for i in 0..pages as u64 {
        assert_eq!(bitmap.is_dirty(mapping.iova() + i * page), [0, 3, 7].contains(&i), "page {i}");
    }
    // Read-and-clear left nothing behind.
    assert!(hwpt.read_dirty(mapping.iova(), pages as u64 * page, page, true).unwrap().is_clean());
    hwpt.set_dirty_tracking(false).unwrap();
}

#[test]
#[ignore = "needs /dev/iommu with CONFIG_IOMMUFD_TEST: run by cargo xtask vm-test"]
fn pasids_attach_replace_and_detach() {
    if common::mock_devices_unavailable() {
        return;
    }
    let iommufd = Iommufd::open().unwrap();
    let ioas = iommufd.alloc_ioas().unwrap();
    let Some(mock) = common::pasid_mock_device(&ioas) else { return };
    // The whole device must sit on a PASID-capable table before any PASID is attached.
    let rid = Hwpt::alloc(&mock, &ioas, HwptFlags::PASID).unwrap();
    let a = Hwpt::alloc(&mock, &ioas, HwptFlags::PASID).unwrap();
    let b = Hwpt::alloc(&mock, &ioas, HwptFlags::PASID).unwrap();
    let plain = Hwpt::alloc(&mock, &ioas, HwptFlags::empty()).unwrap();
    mock.replace(&rid).unwrap();

    mock.check_pasid_hwpt(1, None).unwrap();
    let r = mock.attach_pasid(1, &plain);
    assert_eq!(errno(r), Some(Errno::INVAL), "a table without HwptFlags::PASID is refused");
    assert_eq!(mock.attach_pasid(1, &a).unwrap(), a.id());
    mock.check_pasid_hwpt(1, Some(a.id())).unwrap();
    assert_eq!(errno(mock.check_pasid_hwpt(1, Some(b.id()))), Some(Errno::INVAL));
    assert_eq!(errno(mock.check_pasid_hwpt(1, None)), Some(Errno::INVAL));
    assert!(matches!(mock.attach_pasid(1, &b), Err(Error::InvalidArgument { .. })));
    // PASID 0 is the device's own attachment to the kernel: refused before the ioctl.
    assert!(matches!(mock.attach_pasid(0, &b), Err(Error::InvalidArgument { .. })));

    assert_eq!(mock.replace_pasid(1, &b).unwrap(), b.id());
    mock.check_pasid_hwpt(1, Some(b.id())).unwrap();
    assert_eq!(mock.attach_pasid(2, &a).unwrap(), a.id());
    assert_eq!(mock.pasids(), [1, 2]);

    mock.detach_pasid(1).unwrap();
    mock.check_pasid_hwpt(1, None).unwrap();
    mock.check_pasid_hwpt(2, Some(a.id())).unwrap();
    // PASID 2 is still attached: closing the device detaches it, then releases the tables.
    drop(mock);
    for hwpt in [a, b, rid, plain] {
        hwpt.destroy().unwrap();
    }
}

#[test]
#[ignore = "needs /dev/iommu with CONFIG_IOMMUFD_TEST: run by cargo xtask vm-test"]
fn access_reads_and_writes_through_iovas() {
    let iommufd = Iommufd::open().unwrap();
    let ioas = iommufd.alloc_ioas().unwrap();
    let (buf, _) = buffer(2, 0);
    let mapping = ioas.map(buf, Iova::Auto, Access::READ_WRITE).unwrap();
    let mut access = MockAccess::new(&ioas).unwrap();
    assert_eq!(access.ioas_id(), ioas.id());

    for slow in [false, true] {
        access.set_slow_path(slow);
        // Emulated device -> memory, across the page boundary.
        let at = page_size() as u64 - 3;
        access.write(mapping.iova() + at, b"written by the device").unwrap();
        let mut seen = [0u8; 21];
        mapping.read_at(at as usize, &mut seen).unwrap();
        assert_eq!(&seen, b"written by the device", "slow path {slow}");
        // Memory -> emulated device.
        mapping.write_at(100, b"from the CPU").unwrap();
        let mut read = [0u8; 12];
        access.read(mapping.iova() + 100, &mut read).unwrap();
        assert_eq!(&read, b"from the CPU", "slow path {slow}");
    }

    // Outside any mapping.
    let r = access.read(mapping.iova() + mapping.len(), &mut [0u8; 4]);
    assert!(r.is_err());
    // A read-only mapping cannot be written through.
    let (ro, _) = buffer(1, 0);
    let ro = ioas.map(ro, Iova::Auto, Access::READ).unwrap();
    assert!(access.write(ro.iova(), b"x").is_err());
    let mut byte = [1u8];
    access.read(ro.iova(), &mut byte).unwrap();
    assert_eq!(byte, [0]);

    // Moved to another IOAS, the access sees that one's memory.
    let other = iommufd.alloc_ioas().unwrap();
    let (buf, _) = buffer(1, 0x77);
    let there = other.map(buf, Iova::Fixed(mapping.iova()), Access::READ_WRITE).unwrap();
    access.replace_ioas(&other).unwrap();
    assert_eq!(access.ioas_id(), other.id());
    access.read(there.iova(), &mut byte).unwrap();
    assert_eq!(byte, [0x77]);
}

#[test]
#[ignore = "needs /dev/iommu with CONFIG_IOMMUFD_TEST: run by cargo xtask vm-test"]
fn access_pins_pages_until_unpinned_or_unmapped() {
    let iommufd = Iommufd::open().unwrap();
    let ioas = iommufd.alloc_ioas().unwrap();
    let (buf, va) = buffer(2, 0x66);
    let len = 2 * page_size();
    let mapping = ioas.map(buf, Iova::Auto, Access::READ_WRITE).unwrap();

    let plain = MockAccess::new(&ioas).unwrap();
    assert!(!plain.can_pin());
    assert!(plain.pin_pages(mapping.iova(), len as u64, Access::READ).unwrap_err().is_unsupported());

    let access = MockAccess::with_pinning(&ioas).unwrap();
    let id = access.pin_pages_checked(mapping.iova(), len as u64, Access::READ_WRITE, va).unwrap();
    // The pages pinned are not those of other memory.
    let (_other, other_va) = buffer(2, 0);
    let r = access.pin_pages_checked(mapping.iova(), len as u64, Access::READ, other_va);
    assert_eq!(errno(r), Some(Errno::BADE));
    access.unpin_pages(id).unwrap();
    assert_eq!(errno(access.unpin_pages(id)), Some(Errno::NOENT));

    // Unmapping a pinned range makes the kernel ask the access to unpin first.
    let id = access.pin_pages(mapping.iova(), page_size() as u64, Access::READ).unwrap();
    let _buf = mapping.unmap().unwrap();
    assert_eq!(errno(access.unpin_pages(id)), Some(Errno::NOENT));
    testing::check_refs(&iommufd, va, len, 0).unwrap();
}

#[test]
#[ignore = "needs /dev/iommu with CONFIG_IOMMUFD_TEST: run by cargo xtask vm-test"]
fn reserved_ranges_leave_the_iova_space() {
    if common::mock_devices_unavailable() {
        return;
    }
    let iommufd = Iommufd::open().unwrap();
    let ioas = iommufd.alloc_ioas().unwrap();
    let _mock = MockDevice::new(&ioas).unwrap();
    let reserved = IovaRange::from_len(testing::APERTURE.start + 0x10_0000, 0x10_0000).unwrap();
    testing::add_reserved(&ioas, reserved).unwrap();
    let ranges = ioas.iova_ranges().unwrap();
    assert!(ranges.ranges.iter().all(|r| !r.overlaps(&reserved)), "{ranges:?}");
    assert!(ranges.ranges.iter().all(|r| testing::APERTURE.contains(r)), "{ranges:?}");
    let (buf, _) = buffer(1, 0);
    assert!(ioas.map(buf, Iova::Fixed(reserved.start), Access::READ).is_err());

    // A range over a mapping cannot be reserved.
    let (buf, _) = buffer(1, 0);
    let mapping = map_at_aperture(&ioas, buf);
    let r = testing::add_reserved(&ioas, mapping.range());
    assert!(r.is_err());
}

#[test]
#[ignore = "needs /dev/iommu with CONFIG_IOMMUFD_TEST: run by cargo xtask vm-test"]
fn temp_memory_limit_is_validated() {
    let iommufd = Iommufd::open().unwrap();
    assert_eq!(errno(testing::set_temp_memory_limit(&iommufd, 4)), Some(Errno::INVAL));
    // Setting the default is harmless for tests running concurrently.
    testing::set_temp_memory_limit(&iommufd, testing::DEFAULT_TEMP_MEMORY_LIMIT).unwrap();
}

#[test]
#[ignore = "needs /dev/iommu with CONFIG_IOMMUFD_TEST: run by cargo xtask vm-test"]
fn page_requests_reach_the_fault_queue() {
    if common::mock_devices_unavailable() {
        return;
    }
    let iommufd = Iommufd::open().unwrap();
    let ioas = iommufd.alloc_ioas().unwrap();
    let mock = MockDevice::new(&ioas).unwrap();
    // Without a fault queue the request goes nowhere, and the op still succeeds.
    mock.trigger_iopf(&PageRequest { addr: testing::APERTURE.start, ..Default::default() }).unwrap();

    let faults = FaultQueue::alloc(&iommufd).unwrap();
    let r = Hwpt::alloc_with_faults(&mock, &ioas, HwptFlags::empty(), &faults);
    if common::unsupported_here(
        &r,
        "IOMMU_HWPT_ALLOC (IOMMU_HWPT_FAULT_ID_VALID on a paging table)",
        "6.13",
        iommufd::Errno::OPNOTSUPP,
    ) {
        return;
    }
    let hwpt = r.unwrap();
    mock.replace(&hwpt).unwrap();
    let request =
        PageRequest { pasid: None, group: 5, perm: FaultPerm::READ | FaultPerm::WRITE, addr: 0x123000 };
    mock.trigger_iopf(&request).unwrap();
    let got = faults.read_timeout(Some(Duration::from_secs(5))).unwrap();
    assert_eq!(got.len(), 1, "{got:?}");
    let fault = got[0];
    assert_eq!(fault.dev_id, mock.dev_id());
    assert_eq!(fault.addr, 0x123000);
    assert_eq!(fault.grpid, 5);
    assert_eq!(fault.perm, FaultPerm::READ | FaultPerm::WRITE);
    assert_eq!(fault.pasid(), None);
    assert!(fault.is_last());
    faults.respond(&fault.response(iommufd::ResponseCode::Success)).unwrap();
    mock.replace(&ioas).unwrap();
}

#[test]
#[ignore = "needs /dev/iommu with CONFIG_IOMMUFD_TEST: run by cargo xtask vm-test"]
fn nested_iotlb_invalidation() {
    if common::mock_devices_unavailable() {
        return;
    }
    let iommufd = Iommufd::open().unwrap();
    let ioas = iommufd.alloc_ioas().unwrap();
    let mock = MockDevice::new(&ioas).unwrap();
    let parent = Hwpt::alloc(&mock, &ioas, HwptFlags::NEST_PARENT).unwrap();
    let nested =
        Hwpt::alloc_nested(&mock, &parent, &testing::nested_data(testing::IOTLB_DEFAULT), HwptFlags::empty())
            .unwrap();
    mock.replace(&nested).unwrap();
    for entry in 0..testing::IOTLB_ENTRIES {
        testing::check_iotlb(&iommufd, nested.id(), entry, testing::IOTLB_DEFAULT).unwrap();
    }
    assert_eq!(errno(testing::check_iotlb(&iommufd, nested.id(), 0, 1)), Some(Errno::INVAL));

    let one = testing::hwpt_invalidations(&[Some(2)]);
    assert_eq!(nested.invalidate(&one.entries()).unwrap(), 1);
    testing::check_iotlb(&iommufd, nested.id(), 2, 0).unwrap();
    testing::check_iotlb(&iommufd, nested.id(), 1, testing::IOTLB_DEFAULT).unwrap();
    let all = testing::hwpt_invalidations(&[None]);
    assert_eq!(nested.invalidate(&all.entries()).unwrap(), 1);
    for entry in 0..testing::IOTLB_ENTRIES {
        testing::check_iotlb(&iommufd, nested.id(), entry, 0).unwrap();
    }
    // A paging HWPT is not a nested mock domain.
    assert_eq!(errno(testing::check_iotlb(&iommufd, parent.id(), 0, 0)), Some(Errno::NOENT));
    mock.replace(&ioas).unwrap();
}

#[test]
#[ignore = "needs /dev/iommu with CONFIG_IOMMUFD_TEST: run by cargo xtask vm-test"]
fn viommu_events_and_device_cache_invalidation() {
    if common::mock_devices_unavailable() {
        return;
    }
    let iommufd = Iommufd::open().unwrap();
    let ioas = iommufd.alloc_ioas().unwrap();
    let mock = MockDevice::new(&ioas).unwrap();
    for entry in 0..testing::DEV_CACHE_ENTRIES {
        let r = mock.check_dev_cache(entry, testing::DEV_CACHE_DEFAULT);
        if common::unsupported_here(&r, "IOMMU_TEST_OP_DEV_CHECK_CACHE", "6.14", iommufd::Errno::OPNOTSUPP) {
            return;
        }
        r.unwrap();
    }
    assert_eq!(errno(mock.check_dev_cache(0, 0)), Some(Errno::INVAL));
    // No vDEVICE, no event.
    assert_eq!(errno(mock.trigger_vevent()), Some(Errno::NOENT));

    let parent = Hwpt::alloc(&mock, &ioas, HwptFlags::NEST_PARENT).unwrap();
    let viommu = Viommu::alloc(&mock, &parent, testing::VIOMMU_TYPE, None).unwrap();
    let mut queue = Veventq::alloc(&viommu, testing::VEVENTQ_TYPE, 16).unwrap();
    let vdev = Vdevice::alloc(&viommu, &mock, 0x42).unwrap();
    // The vDEVICE holds a clone of the device, so the device outlives it.
    assert!(matches!(mock.clone().close(), Err(Error::InUse { .. })));

    // Events come from a device attached to a nested table of the vIOMMU.
    let nested = Hwpt::alloc_nested(&mock, &viommu, &testing::nested_data(0), HwptFlags::empty()).unwrap();
    mock.replace(&nested).unwrap();
    mock.trigger_vevent().unwrap();
    mock.trigger_vevent().unwrap();
    let records = queue.read_timeout(Some(Duration::from_secs(5))).unwrap();
    let ids: Vec<Option<u32>> = records
        .iter()
        .map(|r| match r {
            VeventRecord::Event(e) => testing::vevent_virt_id(e),
            other => panic!("unexpected record {other:?}"),
        })
        .collect();
    assert_eq!(ids, [Some(0x42), Some(0x42)]);

    let invalidations = testing::viommu_invalidations(&[(0x42, Some(1))]);
    assert_eq!(viommu.invalidate(&invalidations.entries()).unwrap(), 1);
    mock.check_dev_cache(1, 0).unwrap();
    mock.check_dev_cache(0, testing::DEV_CACHE_DEFAULT).unwrap();
    let invalidations = testing::viommu_invalidations(&[(0x42, None)]);
    assert_eq!(viommu.invalidate(&invalidations.entries()).unwrap(), 1);
    for entry in 0..testing::DEV_CACHE_ENTRIES {
        mock.check_dev_cache(entry, 0).unwrap();
    }
    // An unknown virtual id is refused.
    let bad = testing::viommu_invalidations(&[(0x43, None)]);
    assert!(viommu.invalidate(&bad.entries()).is_err());

    mock.replace(&ioas).unwrap();
    nested.destroy().unwrap();
    vdev.destroy().unwrap();
    queue.close().unwrap();
    viommu.destroy().unwrap();
}

#[test]
#[ignore = "needs /dev/iommu with CONFIG_IOMMUFD_TEST: run by cargo xtask vm-test"]
fn teardown_destroys_every_object() {
    if common::mock_devices_unavailable() {
        return;
    }
    let iommufd = Iommufd::open().unwrap();
    let ioas = iommufd.alloc_ioas().unwrap();
    let ioas_id = ioas.id();

    // Explicit teardown, children first.
    let mock = MockDevice::new(&ioas).unwrap();
    let (mock_id, auto_domain) = (mock.id(), mock.hwpt_id());
    let hwpt = Hwpt::alloc(&mock, &ioas, HwptFlags::DIRTY_TRACKING).unwrap();
    let hwpt_id = hwpt.id();
    let (buf, va) = buffer(1, 0x99);
    let mapping = map_at_aperture(&ioas, buf);
    let _buf = mapping.unmap().unwrap();
    hwpt.destroy().unwrap();
    mock.close().unwrap();
    for (id, what) in [(mock_id, "mock device"), (auto_domain, "automatic domain"), (hwpt_id, "HWPT")] {
        assert_gone(&iommufd, id, what);
    }
    testing::check_refs(&iommufd, va, page_size(), 0).unwrap();

    // Teardown by drop, in any order: the handles keep what they depend on alive.
    let mock = MockDevice::new(&ioas).unwrap();
    let hwpt = Hwpt::alloc(&mock, &ioas, HwptFlags::NEST_PARENT).unwrap();
    mock.replace(&hwpt).unwrap();
    let (mock_id, hwpt_id) = (mock.id(), hwpt.id());
    let access = MockAccess::with_pinning(&ioas).unwrap();
    let (buf, va) = buffer(1, 0x98);
    let mapping = map_at_aperture(&ioas, buf);
    access.pin_pages(mapping.iova(), page_size() as u64, Access::READ).unwrap();
    drop(hwpt);
    drop(ioas); // the device, the HWPT and the mapping still hold it
    drop(access);
    // Unmapped through the guard (dropping it would free the buffer, and `va` with it).
    let _buf = mapping.unmap().unwrap();
    drop(mock); // the last holder of the HWPT, and through it of the IOAS
    for (id, what) in [(mock_id, "mock device"), (hwpt_id, "HWPT"), (ioas_id, "IOAS")] {
        assert_gone(&iommufd, id, what);
    }
    testing::check_refs(&iommufd, va, page_size(), 0).unwrap();
}

#[test]
#[ignore = "needs /dev/iommu with CONFIG_IOMMUFD_TEST: run by cargo xtask vm-test"]
fn mock_ids_belong_to_their_iommufd() {
    if common::mock_devices_unavailable() {
        return;
    }
    let iommufd = Iommufd::open().unwrap();
    let ioas = iommufd.alloc_ioas().unwrap();
    let mock = MockDevice::new(&ioas).unwrap();
    let other = Iommufd::open().unwrap();
    // Another iommufd knows no such HWPT.
    let (_buf, va) = buffer(1, 0);
    let r = testing::check_map(&other, mock.hwpt_id(), testing::APERTURE.start, va, page_size());
    assert_eq!(errno(r), Some(Errno::NOENT));
}

/// A mock dma-buf mapped with `map_file`, revoked and restored, then unmapped. Per kernel: before
/// 6.19 the mock has no dma-buf ops (`Unsupported`, refused before the ioctl); Linux 7.3.4's mock
/// installs the dma-buf fd but returns 0 instead of its number, which the crate reports as a protocol
/// error (the fd number is lost) and this test asserts exactly, so that a kernel that fixes it fails
/// here until the success path is asserted for it too.
#[test]
#[ignore = "needs /dev/iommu with CONFIG_IOMMUFD_TEST: run by cargo xtask vm-test"]
fn dmabuf_maps_by_file_and_can_be_revoked() {
    if common::mock_devices_unavailable() {
        return;
    }
    let fd = Iommufd::open().unwrap();
    let ioas = fd.alloc_ioas().unwrap();
    let _mock = MockDevice::new(&ioas).unwrap();
    let len = 2 * page_size() as u64;
    let got = testing::dmabuf_get(&fd, len as u32);
    if common::predates("6.19") {
        common::assert_unsupported(&got, "IOMMU_TEST_OP_DMABUF_GET", "6.19", Errno::OPNOTSUPP);
        return;
    }
    let buf = match got {
        Err(iommufd::Error::Protocol { op, detail }) if common::kernel().as_deref() == Some("7.3.4") => {
            assert_eq!(op, "IOMMU_TEST_OP_DMABUF_GET");
            assert!(detail.contains("returned 0, not the dma-buf fd"), "{detail}");
            return;
        }
        other => other.unwrap(),
    };
    let m = ioas.map_file(&buf, 0, len, Iova::Fixed(testing::APERTURE.start), Access::READ_WRITE).unwrap();
    assert_eq!(m.len(), len);
    testing::dmabuf_revoke(&fd, &buf, true).unwrap();
    testing::dmabuf_revoke(&fd, &buf, false).unwrap();
    m.unmap().unwrap();
}
