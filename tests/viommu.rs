//! vIOMMU, vDEVICE, vEVENTQ and HW queue on the kernel's mock IOMMU (`CONFIG_IOMMUFD_TEST`): the
//! success paths, the kernel's refusals, and teardown order (children before the vIOMMU, the vIOMMU
//! before its nest parent), proven by `ENOENT` from `IOMMU_DESTROY` once the handles are gone.
#![cfg(feature = "testing")]

use std::sync::Arc;
use std::time::Duration;

mod common;
use common::{busy, gone, logs};

use iommufd::sys::testing as tsys;
use iommufd::testing::{self, MockDevice};
use iommufd::{
    Access, DmaBuffer, Errno, Error, HwQueue, HwQueueType, Hwpt, HwptFlags, InvalidateEntries, Iommufd, Iova,
    LostEvents, NestedData, Vdevice, Vevent, VeventData, VeventRecord, Veventq, VeventqType, Viommu,
    ViommuType, page_size,
};

const MOCK_VIOMMU: ViommuType = ViommuType::Raw(tsys::IOMMU_VIOMMU_TYPE_SELFTEST);
/// The mock's events carry `struct iommu_viommu_event_selftest` (the device's virtual id, a u32).
const MOCK_VEVENTQ: VeventqType = VeventqType::Raw { kind: tsys::IOMMU_VEVENTQ_TYPE_SELFTEST, data_len: 4 };
const MOCK_HW_QUEUE: HwQueueType = HwQueueType::Raw(tsys::IOMMU_HW_QUEUE_TYPE_SELFTEST);
const VIRT_ID: u64 = 0x42;

#[track_caller]
fn errno<T: std::fmt::Debug>(r: iommufd::Result<T>) -> Errno {
    match r {
        Err(e) => e.errno().unwrap_or_else(|| panic!("expected a kernel error, got {e}")),
        Ok(v) => panic!("expected a kernel error, got Ok({v:?})"),
    }
}

#[track_caller]
fn assert_in_use<T: std::fmt::Debug>(r: iommufd::Result<T>) {
    match r {
        Err(Error::InUse { .. }) => {}
        other => panic!("expected Error::InUse, got {other:?}"),
    }
}

#[track_caller]
fn assert_invalid<T: std::fmt::Debug>(r: iommufd::Result<T>) {
    match r {
        Err(Error::InvalidArgument { .. }) => {}
        other => panic!("expected Error::InvalidArgument, got {other:?}"),
    }
}

/// A mock device on an IOAS and a nest-parent HWPT for it.
fn setup() -> (Iommufd, iommufd::Ioas, MockDevice, Hwpt) {
    let iommufd = Iommufd::open().expect("open /dev/iommu");
    let ioas = iommufd.alloc_ioas().unwrap();
    let dev = MockDevice::new(&ioas).expect("mock device (CONFIG_IOMMUFD_TEST)");
    let parent = Hwpt::alloc(&dev, &ioas, HwptFlags::NEST_PARENT).expect("nest-parent HWPT");
    (iommufd, ioas, dev, parent)
}

/// A mock vIOMMU on `parent`; `None` on a kernel older than 6.13, after asserting the exact
/// `Unsupported` it gives (the calling test then ends).
fn mock_viommu(dev: &MockDevice, parent: &Hwpt, data: Option<&mut [u8]>) -> Option<Viommu> {
    let r = Viommu::alloc(dev, parent, MOCK_VIOMMU, data);
    if common::unsupported_here(&r, "IOMMU_VIOMMU_ALLOC", "6.13", Errno::NOTTY) {
        return None;
    }
    Some(r.expect("IOMMU_VIOMMU_ALLOC"))
}

/// `struct iommu_hwpt_selftest` for a nested mock domain.
fn mock_nested_data() -> NestedData {
    let mut bytes = tsys::IOMMU_TEST_IOTLB_DEFAULT.to_ne_bytes().to_vec();
    bytes.extend_from_slice(&0u32.to_ne_bytes());
    NestedData::Raw { data_type: tsys::IOMMU_HWPT_DATA_SELFTEST, bytes }
}

#[test]
#[ignore = "needs /dev/iommu with CONFIG_IOMMUFD_TEST: run by cargo xtask vm-test"]
fn viommu_children_and_explicit_teardown() {
    if common::mock_devices_unavailable() {
        return;
    }
    let (iommufd, _ioas, dev, parent) = setup();
    let Some(viommu) = mock_viommu(&dev, &parent, None) else { return };
    assert_ne!(viommu.id(), 0);
    assert_eq!(viommu.kind(), MOCK_VIOMMU);
    assert_eq!(viommu.nest_parent().id(), parent.id());

    // The vIOMMU holds its nest parent: refused here, and by the kernel.
    assert_in_use(parent.clone().destroy().map_err(Error::from));
    assert!(busy(&iommufd, parent.id()));

    let vdev = Vdevice::alloc(&viommu, &dev, VIRT_ID).expect("IOMMU_VDEVICE_ALLOC");
    assert_eq!((vdev.virt_id(), vdev.dev_id(), vdev.viommu_id()), (VIRT_ID, dev.dev_id(), viommu.id()));
    let veventq = Veventq::alloc(&viommu, MOCK_VEVENTQ, 8).expect("IOMMU_VEVENTQ_ALLOC");
    assert_eq!((veventq.viommu_id(), veventq.depth()), (viommu.id(), 8));

    // Children hold the vIOMMU: our InUse before any ioctl, and the kernel's EBUSY.
    assert_in_use(viommu.clone().destroy());
    assert!(busy(&iommufd, viommu.id()));
    // The vDEVICE holds its device: it cannot be closed under it.
    assert_in_use(dev.clone().close());

    let (vdev_id, veventq_id, viommu_id, parent_id) = (vdev.id(), veventq.id(), viommu.id(), parent.id());
    vdev.destroy().unwrap();
    veventq.close().unwrap();
    assert!(gone(&iommufd, vdev_id) && gone(&iommufd, veventq_id));
    viommu.destroy().unwrap();
    assert!(gone(&iommufd, viommu_id));
    parent.destroy().unwrap();
    assert!(gone(&iommufd, parent_id));
    dev.close().unwrap();
}

#[test]
#[ignore = "needs /dev/iommu with CONFIG_IOMMUFD_TEST: run by cargo xtask vm-test"]
fn dropping_parents_first_still_tears_down_children_first() {
    if common::mock_devices_unavailable() {
        return;
    }
    logs::start();
    let (iommufd, ioas, dev, parent) = setup();
    let Some(viommu) = mock_viommu(&dev, &parent, None) else { return };
    let vdev = Vdevice::alloc(&viommu, &dev, VIRT_ID).unwrap();
    let veventq = Veventq::alloc(&viommu, MOCK_VEVENTQ, 4).unwrap();
    let ids = [vdev.id(), veventq.id(), viommu.id(), parent.id()];

    // Drop the parents' handles first: the children keep them alive in the kernel.
    drop(parent);
    drop(viommu);
    assert!(busy(&iommufd, ids[2]), "the vIOMMU outlives its handle while children exist");
    assert!(busy(&iommufd, ids[3]), "the nest parent outlives its handle while the vIOMMU exists");

    drop(vdev);
    assert!(busy(&iommufd, ids[2]), "the vEVENTQ still holds the vIOMMU");
    // The last child goes, and with it the vIOMMU and then the nest parent, in that order.
    drop(veventq);
    for id in ids {
        assert!(gone(&iommufd, id), "object {id} leaked");
    }
    drop(dev);
    ioas.destroy().unwrap();
    assert_eq!(logs::take(), Vec::<String>::new(), "every drop succeeded");
}

#[test]
#[ignore = "needs /dev/iommu with CONFIG_IOMMUFD_TEST: run by cargo xtask vm-test"]
fn viommu_driver_data_is_read_and_written_back() {
    if common::mock_devices_unavailable() {
        return;
    }
    let (_iommufd, _ioas, dev, parent) = setup();
    // struct iommu_viommu_selftest { in_data, out_data, out_mmap_offset, out_mmap_length }.
    let mut data = [0u8; 24];
    data[..4].copy_from_slice(&0xcafe_f00du32.to_ne_bytes());
    let Some(viommu) = mock_viommu(&dev, &parent, Some(&mut data)) else { return };
    assert_eq!(u32::from_ne_bytes(data[4..8].try_into().unwrap()), 0xcafe_f00d, "out_data loops back");
    let mmap_len = u64::from_ne_bytes(data[16..24].try_into().unwrap());
    assert_eq!(mmap_len, 2 * page_size() as u64, "out_mmap_length");
    drop(viommu);

    // Too short for the driver's structure (it needs at least up to `out_data`).
    let mut short = [0u8; 2];
    assert_eq!(errno(Viommu::alloc(&dev, &parent, MOCK_VIOMMU, Some(&mut short))), Errno::INVAL);
}

#[test]
#[ignore = "needs /dev/iommu with CONFIG_IOMMUFD_TEST: run by cargo xtask vm-test"]
fn viommu_alloc_errors() {
    if common::mock_devices_unavailable() {
        return;
    }
    let (iommufd, ioas, dev, parent) = setup();

    // Not a nest parent: refused before the ioctl (the kernel would say EINVAL).
    let plain = Hwpt::alloc(&dev, &ioas, HwptFlags::empty()).unwrap();
    assert_invalid(Viommu::alloc(&dev, &plain, MOCK_VIOMMU, None));

    // Before 6.13 there is no vIOMMU at all.
    let r = Viommu::alloc(&dev, &parent, MOCK_VIOMMU, None);
    if common::unsupported_here(&r, "IOMMU_VIOMMU_ALLOC", "6.13", Errno::NOTTY) {
        return;
    }
    drop(r);

    // Types the mock driver does not implement, and the reserved default type.
    for kind in
        [ViommuType::Default, ViommuType::ArmSmmuv3, ViommuType::Tegra241Cmdqv, ViommuType::Raw(0x1234)]
    {
        let e = Viommu::alloc(&dev, &parent, kind, None).unwrap_err();
        assert_eq!(e.errno(), Some(Errno::OPNOTSUPP), "{kind:?}: {e}");
        assert!(e.is_unsupported());
    }

    // A device of another iommufd.
    let other = Iommufd::open().unwrap();
    let other_ioas = other.alloc_ioas().unwrap();
    let other_dev = MockDevice::new(&other_ioas).unwrap();
    assert!(matches!(
        Viommu::alloc(&other_dev, &parent, MOCK_VIOMMU, None),
        Err(Error::ForeignObject { .. })
    ));

    // A raw IOMMU_DESTROY of the nest parent while a vIOMMU wraps it: EBUSY.
    let viommu = Viommu::alloc(&dev, &parent, MOCK_VIOMMU, None).unwrap();
    assert!(busy(&iommufd, parent.id()));
    drop(viommu);
}

#[test]
#[ignore = "needs /dev/iommu with CONFIG_IOMMUFD_TEST: run by cargo xtask vm-test"]
fn vdevice_errors() {
    if common::mock_devices_unavailable() {
        return;
    }
    let (iommufd, ioas, dev, parent) = setup();
    let dev2 = MockDevice::new(&ioas).unwrap();
    let Some(viommu) = mock_viommu(&dev, &parent, None) else { return };
    let vdev = Vdevice::alloc(&viommu, &dev, VIRT_ID).unwrap();
    // One vDEVICE per device, and one device per virtual id.
    assert_eq!(errno(Vdevice::alloc(&viommu, &dev, VIRT_ID + 1)), Errno::EXIST);
    assert_eq!(errno(Vdevice::alloc(&viommu, &dev2, VIRT_ID)), Errno::EXIST);
    let vdev2 = Vdevice::alloc(&viommu, &dev2, VIRT_ID + 1).unwrap();
    // A destroyed vDEVICE frees its virtual id.
    let id = vdev.id();
    vdev.destroy().unwrap();
    assert!(gone(&iommufd, id));
    let again = Vdevice::alloc(&viommu, &dev, VIRT_ID).unwrap();
    drop((again, vdev2));
    viommu.destroy().unwrap();
}

#[test]
#[ignore = "needs /dev/iommu with CONFIG_IOMMUFD_TEST: run by cargo xtask vm-test"]
fn veventq_errors() {
    if common::mock_devices_unavailable() {
        return;
    }
    let (_iommufd, _ioas, dev, parent) = setup();
    let Some(viommu) = mock_viommu(&dev, &parent, None) else { return };
    assert_eq!(errno(Veventq::alloc(&viommu, VeventqType::Default, 8)), Errno::OPNOTSUPP);
    assert_invalid(Veventq::alloc(&viommu, MOCK_VEVENTQ, 0));
    assert_eq!(errno(Veventq::alloc(&viommu, MOCK_VEVENTQ, (1 << 19) + 1)), Errno::INVAL);
    let q = Veventq::alloc(&viommu, MOCK_VEVENTQ, 1 << 19).unwrap();
    // One queue per type and vIOMMU.
    assert_eq!(errno(Veventq::alloc(&viommu, MOCK_VEVENTQ, 8)), Errno::EXIST);
    // The queue's fd holds its object: only closing it first lets the destroy succeed (which
    // `close` does); a duplicate of the fd keeps it busy.
    let dup = rustix::io::dup(&q).unwrap();
    assert_eq!(errno(q.close()), Errno::BUSY);
    drop(dup);
}

#[test]
#[ignore = "needs /dev/iommu with CONFIG_IOMMUFD_TEST: run by cargo xtask vm-test"]
fn vevents_are_delivered_and_losses_accounted() {
    if common::mock_devices_unavailable() {
        return;
    }
    let (iommufd, ioas, dev, parent) = setup();
    let Some(viommu) = mock_viommu(&dev, &parent, None) else { return };
    let vdev = Vdevice::alloc(&viommu, &dev, VIRT_ID).unwrap();
    // The mock reports events for a device attached to a nested table of the vIOMMU.
    let nested = Hwpt::alloc_nested(&dev, &viommu, &mock_nested_data(), HwptFlags::empty()).unwrap();
    assert_eq!(nested.parent_id(), viommu.id());
    dev.replace(&nested).unwrap();

    // No queue of the mock's type yet: the kernel has nowhere to put the event.
    assert_eq!(errno(dev.trigger_vevent()), Errno::OPNOTSUPP);

    let mut q = Veventq::alloc(&viommu, MOCK_VEVENTQ, 2).unwrap();
    assert!(!q.wait(Some(Duration::from_millis(20))).unwrap(), "nothing pending yet");
    assert!(q.read().unwrap().is_empty());
    dev.trigger_vevent().unwrap();
    assert!(q.wait(Some(Duration::from_secs(5))).unwrap());
    let payload = VeventData::Raw((VIRT_ID as u32).to_ne_bytes().to_vec());
    let event = |sequence| VeventRecord::Event(Vevent { sequence, data: payload.clone() });
    assert_eq!(q.read().unwrap(), [event(0)]);

    // Overflow a queue of depth 2 with four events: two arrive, two are reported lost.
    for _ in 0..4 {
        dev.trigger_vevent().unwrap();
    }
    assert_eq!(
        q.read().unwrap(),
        [event(1), event(2), VeventRecord::Lost(LostEvents { first_sequence: 3, count: 2 })]
    );
    assert_eq!(q.lost_events(), 2);
    // The stream continues without a further gap.
    dev.trigger_vevent().unwrap();
    assert_eq!(q.read_timeout(Some(Duration::from_secs(5))).unwrap(), [event(5)]);
    assert_eq!(q.lost_events(), 2);

    // Teardown: move the device off the nested table, then children before parents.
    dev.replace(&ioas).unwrap();
    let ids = [q.id(), vdev.id(), nested.id(), viommu.id(), parent.id()];
    q.close().unwrap();
    vdev.destroy().unwrap();
    nested.destroy().unwrap();
    viommu.destroy().unwrap();
    parent.destroy().unwrap();
    for id in ids {
        assert!(gone(&iommufd, id), "object {id} leaked");
    }
}

/// Runs `f` on another thread and waits at most 20 s for it: a read that spins or hangs fails the
/// test instead of stalling the suite.
#[track_caller]
fn within_20s<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(Duration::from_secs(20)).expect("the read returns instead of spinning or hanging")
}

#[test]
#[ignore = "needs /dev/iommu with CONFIG_IOMMUFD_TEST: run by cargo xtask vm-test"]
fn a_veventq_type_that_does_not_match_its_events_is_an_error_not_a_spin() {
    if common::mock_devices_unavailable() {
        return;
    }
    let (_iommufd, ioas, dev, parent) = setup();
    let Some(viommu) = mock_viommu(&dev, &parent, None) else { return };
    let _vdev = Vdevice::alloc(&viommu, &dev, VIRT_ID).unwrap();
    let nested = Hwpt::alloc_nested(&dev, &viommu, &mock_nested_data(), HwptFlags::empty()).unwrap();
    dev.replace(&nested).unwrap();

    // A payload size smaller than the mock's 4 bytes: events do not fit a record.
    let too_small = VeventqType::Raw { kind: tsys::IOMMU_VEVENTQ_TYPE_SELFTEST, data_len: 0 };
    let mut q = Veventq::alloc(&viommu, too_small, 8).unwrap();
    dev.trigger_vevent().unwrap();
    dev.trigger_vevent().unwrap();
    assert!(q.wait(Some(Duration::from_secs(5))).unwrap());
    // What the kernel answers a buffer smaller than the first event: EINVAL (kernels before a 2026
    // fix: 0), handing out nothing, with the fd still readable.
    let mut small = [0u8; 11];
    let raw = rustix::io::read(&q, &mut small);
    eprintln!("read(2) of 11 bytes with a 12-byte event pending: {raw:?}");
    assert!(matches!(raw, Err(Errno::INVAL) | Ok(0)), "{raw:?}");
    assert!(q.wait(Some(Duration::ZERO)).unwrap(), "the event is still pending");
    // The SDK's reads: a clear error each time, never an endless empty read, and never two 12-byte
    // events misparsed as three 8-byte ones: nothing is handed out.
    let r = q.read();
    assert!(matches!(r, Err(Error::Protocol { .. })), "{r:?}");
    assert!(q.wait(Some(Duration::ZERO)).unwrap(), "the events are still pending");
    let (q, r) = within_20s(move || {
        let r = q.read_timeout(None);
        (q, r)
    });
    let e = r.unwrap_err();
    assert!(e.to_string().contains("does not match its events"), "{e}");
    #[cfg(feature = "tokio")]
    let q = within_20s(move || {
        let rt = tokio::runtime::Builder::new_current_thread().enable_io().build().unwrap();
        rt.block_on(async {
            let mut q = iommufd::AsyncVeventq::new(q).unwrap();
            assert!(matches!(q.read().await, Err(Error::Protocol { .. })));
            q.into_inner()
        })
    });
    q.close().unwrap();

    // A payload size larger than the mock's: the event read is shorter than a record.
    let too_large = VeventqType::Raw { kind: tsys::IOMMU_VEVENTQ_TYPE_SELFTEST, data_len: 8 };
    let mut q = Veventq::alloc(&viommu, too_large, 8).unwrap();
    dev.trigger_vevent().unwrap();
    assert!(matches!(q.read_timeout(Some(Duration::from_secs(5))), Err(Error::Protocol { .. })));
    q.close().unwrap();

    // The right size reads the same kind of event; a wait without limit does not overflow the clock.
    let mut q = Veventq::alloc(&viommu, MOCK_VEVENTQ, 8).unwrap();
    dev.trigger_vevent().unwrap();
    dev.trigger_vevent().unwrap();
    assert!(q.wait(Some(Duration::MAX)).unwrap());
    let got = q.read_timeout(Some(Duration::MAX)).unwrap();
    assert_eq!(got.len(), 2, "{got:?}");
    assert!(matches!(got[1], VeventRecord::Event(Vevent { sequence: 1, .. })));
    // A payload size no kernel can produce is refused before the ioctl.
    let huge = VeventqType::Raw { kind: tsys::IOMMU_VEVENTQ_TYPE_SELFTEST, data_len: usize::MAX };
    assert_invalid(Veventq::alloc(&viommu, huge, 8));
    q.close().unwrap();
    dev.replace(&ioas).unwrap();
}

#[test]
#[ignore = "needs /dev/iommu with CONFIG_IOMMUFD_TEST: run by cargo xtask vm-test"]
fn viommu_invalidation_reaches_the_device_cache() {
    if common::mock_devices_unavailable() {
        return;
    }
    let (_iommufd, _ioas, dev, parent) = setup();
    let Some(viommu) = mock_viommu(&dev, &parent, None) else { return };
    let _vdev = Vdevice::alloc(&viommu, &dev, VIRT_ID).unwrap();
    let probe = InvalidateEntries::probe(tsys::IOMMU_VIOMMU_INVALIDATE_DATA_SELFTEST);
    assert_eq!(viommu.invalidate(&probe).unwrap(), 0);

    // struct iommu_viommu_invalidate_selftest { flags, vdev_id, cache_id }.
    let entry = |flags: u32, vdev_id: u32, cache_id: u32| {
        [flags, vdev_id, cache_id].iter().flat_map(|w| w.to_ne_bytes()).collect::<Vec<u8>>()
    };
    for i in 0..testing::DEV_CACHE_ENTRIES {
        dev.check_dev_cache(i, testing::DEV_CACHE_DEFAULT).unwrap();
    }
    let one = entry(0, VIRT_ID as u32, 2);
    let raw = |bytes| InvalidateEntries::Raw {
        data_type: tsys::IOMMU_VIOMMU_INVALIDATE_DATA_SELFTEST,
        entry_len: 12,
        bytes,
    };
    assert_eq!(viommu.invalidate(&raw(&one)).unwrap(), 1);
    dev.check_dev_cache(2, 0).unwrap();
    dev.check_dev_cache(1, testing::DEV_CACHE_DEFAULT).unwrap();

    // The kernel stops at the first bad entry (cache id out of range) and says how many it handled.
    let two = [entry(0, VIRT_ID as u32, 1), entry(0, VIRT_ID as u32, 99)].concat();
    let e = viommu.invalidate(&raw(&two)).unwrap_err();
    assert_eq!(e.handled, 1);
    assert_eq!(e.error.errno(), Some(Errno::INVAL));
    dev.check_dev_cache(1, 0).unwrap();
}

#[test]
#[ignore = "needs /dev/iommu with CONFIG_IOMMUFD_TEST: run by cargo xtask vm-test"]
fn hw_queues_pin_their_memory_and_chain() {
    if common::mock_devices_unavailable() {
        return;
    }
    let (iommufd, ioas, dev, parent) = setup();
    let page = page_size() as u64;
    let iova = testing::APERTURE.start;
    let mapping = Arc::new(
        ioas.map(DmaBuffer::new(2 * page as usize).unwrap(), Iova::Fixed(iova), Access::READ_WRITE).unwrap(),
    );
    let Some(viommu) = mock_viommu(&dev, &parent, None) else { return };

    // Refused before the ioctl: empty, overflowing, or outside the mapping given as the memory.
    assert_invalid(HwQueue::alloc(&viommu, MOCK_HW_QUEUE, 0, &mapping, iova, 0));
    assert_invalid(HwQueue::alloc(&viommu, MOCK_HW_QUEUE, 0, &mapping, u64::MAX, 2));
    assert_invalid(HwQueue::alloc(&viommu, MOCK_HW_QUEUE, 0, &mapping, iova + 16 * page, page));
    assert_invalid(HwQueue::alloc(&viommu, MOCK_HW_QUEUE, 0, &mapping, iova + page, 2 * page));
    assert_invalid(HwQueue::alloc(&viommu, MOCK_HW_QUEUE, 0, &mapping, iova - page, page));
    // A mapping of another IOAS.
    let other_ioas = iommufd.alloc_ioas().unwrap();
    let elsewhere = Arc::new(
        other_ioas
            .map(DmaBuffer::new(page as usize).unwrap(), Iova::Fixed(iova), Access::READ_WRITE)
            .unwrap(),
    );
    assert_invalid(HwQueue::alloc(&viommu, MOCK_HW_QUEUE, 0, &elsewhere, iova, page));
    // The kernel's answers: reserved and unknown types, an index out of order.
    assert_eq!(
        errno(HwQueue::alloc(&viommu, HwQueueType::Default, 0, &mapping, iova, page)),
        Errno::OPNOTSUPP
    );
    assert_eq!(
        errno(HwQueue::alloc(&viommu, HwQueueType::Raw(0x1234), 0, &mapping, iova, page)),
        Errno::OPNOTSUPP
    );
    assert_eq!(errno(HwQueue::alloc(&viommu, MOCK_HW_QUEUE, 1, &mapping, iova, page)), Errno::IO);
    assert_eq!(Arc::strong_count(&mapping), 1, "failed allocations hold nothing");

    let q0 = HwQueue::alloc(&viommu, MOCK_HW_QUEUE, 0, &mapping, iova, page).expect("IOMMU_HW_QUEUE_ALLOC");
    assert_eq!((q0.index(), q0.range(), q0.viommu_id()), (0, (iova, page), viommu.id()));
    assert_eq!(errno(HwQueue::alloc(&viommu, MOCK_HW_QUEUE, 0, &mapping, iova, page)), Errno::EXIST);
    let q1 = HwQueue::alloc(&viommu, MOCK_HW_QUEUE, 1, &mapping, iova + page, page).unwrap();
    assert_eq!(errno(HwQueue::alloc(&viommu, MOCK_HW_QUEUE, 2, &mapping, iova, page)), Errno::INVAL);

    // Queue 1 depends on queue 0 in the kernel, and its handle holds queue 0's.
    let (q0_id, q1_id, viommu_id) = (q0.id(), q1.id(), viommu.id());
    assert!(busy(&iommufd, q0_id));
    assert_in_use(q0.destroy());
    assert!(busy(&iommufd, q0_id), "queue 0 lives on, held by queue 1");
    // The queues hold the vIOMMU.
    assert_in_use(viommu.clone().destroy());
    assert!(busy(&iommufd, viommu_id));

    // The queue memory is pinned, and the queues hold its mapping: the guard cannot be taken back to
    // unmap it, and the IOAS-wide unmaps leave it alone.
    let mapping = Arc::try_unwrap(mapping).expect_err("the queues hold the mapping");
    assert_invalid(ioas.unmap_range(iova, page));
    assert_invalid(ioas.unmap_all());

    // Dropping queue 1 destroys it, then queue 0, then releases the mapping.
    logs::start();
    drop(q1);
    assert!(gone(&iommufd, q1_id) && gone(&iommufd, q0_id));
    assert_eq!(logs::take(), Vec::<String>::new(), "both destroys succeeded");
    let buffer = Arc::into_inner(mapping).expect("the guard is given back").unmap().expect("unmap");
    assert!(buffer.is_some(), "the buffer comes back");
    viommu.destroy().unwrap();
    assert!(gone(&iommufd, viommu_id));
}

#[test]
#[ignore = "needs /dev/iommu with CONFIG_IOMMUFD_TEST: run by cargo xtask vm-test"]
fn a_hw_queue_unmaps_its_memory_after_it_is_destroyed() {
    if common::mock_devices_unavailable() {
        return;
    }
    logs::start();
    let (iommufd, ioas, dev, parent) = setup();
    let page = page_size() as u64;
    let iova = testing::APERTURE.start;
    let mapping = Arc::new(
        ioas.map(DmaBuffer::new(page as usize).unwrap(), Iova::Fixed(iova), Access::READ_WRITE).unwrap(),
    );
    let Some(viommu) = mock_viommu(&dev, &parent, None) else { return };
    let q = HwQueue::alloc(&viommu, MOCK_HW_QUEUE, 0, &mapping, iova, page).unwrap();
    let q_id = q.id();
    // The caller lets go of the mapping first: it used to be unmapped here, which the kernel refused
    // (EBUSY) while the queue pinned it, leaking the buffer and the range for good.
    drop(mapping);
    assert_invalid(ioas.unmap_range(iova, page));
    drop(q);
    assert!(gone(&iommufd, q_id));
    // The queue's release unmapped the range: no guard is left, the IOAS has nothing mapped, and the
    // same IOVA maps again.
    assert_eq!(ioas.unmap_all().unwrap(), 0);
    let again = ioas.map(DmaBuffer::new(page as usize).unwrap(), Iova::Fixed(iova), Access::READ_WRITE);
    assert!(again.is_ok(), "{again:?}");
    drop((again, viommu));
    assert_eq!(logs::take(), Vec::<String>::new(), "every destroy and unmap succeeded");
}

#[cfg(feature = "tokio")]
#[test]
#[ignore = "needs /dev/iommu with CONFIG_IOMMUFD_TEST: run by cargo xtask vm-test"]
fn async_veventq_wakes_on_an_event() {
    if common::mock_devices_unavailable() {
        return;
    }
    let (_iommufd, ioas, dev, parent) = setup();
    let Some(viommu) = mock_viommu(&dev, &parent, None) else { return };
    let vdev = Vdevice::alloc(&viommu, &dev, VIRT_ID).unwrap();
    let nested = Hwpt::alloc_nested(&dev, &viommu, &mock_nested_data(), HwptFlags::empty()).unwrap();
    dev.replace(&nested).unwrap();
    let q = Veventq::alloc(&viommu, MOCK_VEVENTQ, 8).unwrap();

    let rt = tokio::runtime::Builder::new_current_thread().enable_io().build().unwrap();
    let records = std::thread::scope(|s| {
        s.spawn(|| {
            std::thread::sleep(Duration::from_millis(100));
            dev.trigger_vevent().unwrap();
        });
        rt.block_on(async {
            let mut q = iommufd::AsyncVeventq::new(q).unwrap();
            let records = q.read().await.unwrap();
            q.into_inner().close().unwrap();
            records
        })
    });
    assert_eq!(records.len(), 1);
    assert!(matches!(records[0], VeventRecord::Event(Vevent { sequence: 0, .. })));
    dev.replace(&ioas).unwrap();
    drop((vdev, nested));
}
