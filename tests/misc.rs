//! The rest of the uAPI: capability probing, IOMMU_IOAS_CHANGE_PROCESS, IOMMU_VFIO_IOAS,
//! IOMMU_IOAS_NOIOMMU_GET_PA, VFIO device features (DMA logging, bus master, dma-buf export), PCI hot
//! reset and PASID attachment, with the exact answers the VM's kernel (Linux 7.3.4, edu on the q35
//! root bus, intel-iommu or virtio-iommu) gives and why.

mod common;

use std::mem::size_of;

use common::{bind, iommu};
use iommufd::{
    Access, DeviceFeature, DeviceIoctl, DmaBuffer, Errno, Error, FeatureOps, Hwpt, HwptFlags, Ioctl, Iommufd,
    Iova, IovaRange, RegionRange, RlimitMode, sys,
};

fn page() -> u64 {
    iommufd::page_size() as u64
}

fn memfd(len: u64) -> std::os::fd::OwnedFd {
    let fd = rustix::fs::memfd_create("iommufd-misc", rustix::fs::MemfdFlags::CLOEXEC).unwrap();
    rustix::fs::ftruncate(&fd, len).unwrap();
    fd
}

/// True inside the test VM (edu on the q35 root bus), false on real hardware (`cargo xtask hw-test`).
fn in_vm() -> bool {
    iommu() != "hardware"
}

/// The VM's edu device, bound (these tests assert edu's answers; without edu they fail, never skip).
fn edu(fd: &Iommufd) -> iommufd::BoundDevice {
    iommufd::VfioDevice::open_pci(&common::edu_address()).unwrap().bind(fd).unwrap()
}

fn errno<T: std::fmt::Debug>(r: iommufd::Result<T>) -> Errno {
    let e = r.unwrap_err();
    e.errno().unwrap_or_else(|| panic!("no errno in {e:?}"))
}

/// The kernel's argument size for each iommufd ioctl in Linux 7.3: the uAPI structures the bindings
/// were generated from.
fn sizes_7_3() -> Vec<(Ioctl, usize)> {
    vec![
        (Ioctl::Destroy, size_of::<sys::iommu_destroy>()),
        (Ioctl::IoasAlloc, size_of::<sys::iommu_ioas_alloc>()),
        (Ioctl::IoasAllowIovas, size_of::<sys::iommu_ioas_allow_iovas>()),
        (Ioctl::IoasCopy, size_of::<sys::iommu_ioas_copy>()),
        (Ioctl::IoasIovaRanges, size_of::<sys::iommu_ioas_iova_ranges>()),
        (Ioctl::IoasMap, size_of::<sys::iommu_ioas_map>()),
        (Ioctl::IoasUnmap, size_of::<sys::iommu_ioas_unmap>()),
        (Ioctl::IommuOption, size_of::<sys::iommu_option>()),
        (Ioctl::VfioIoas, size_of::<sys::iommu_vfio_ioas>()),
        (Ioctl::HwptAlloc, size_of::<sys::iommu_hwpt_alloc>()),
        (Ioctl::GetHwInfo, size_of::<sys::iommu_hw_info>()),
        (Ioctl::HwptSetDirtyTracking, size_of::<sys::iommu_hwpt_set_dirty_tracking>()),
        (Ioctl::HwptGetDirtyBitmap, size_of::<sys::iommu_hwpt_get_dirty_bitmap>()),
        (Ioctl::HwptInvalidate, size_of::<sys::iommu_hwpt_invalidate>()),
        (Ioctl::FaultQueueAlloc, size_of::<sys::iommu_fault_alloc>()),
        (Ioctl::IoasMapFile, size_of::<sys::iommu_ioas_map_file>()),
        (Ioctl::ViommuAlloc, size_of::<sys::iommu_viommu_alloc>()),
        (Ioctl::VdeviceAlloc, size_of::<sys::iommu_vdevice_alloc>()),
        (Ioctl::IoasChangeProcess, size_of::<sys::iommu_ioas_change_process>()),
        (Ioctl::VeventqAlloc, size_of::<sys::iommu_veventq_alloc>()),
        (Ioctl::HwQueueAlloc, size_of::<sys::iommu_hw_queue_alloc>()),
        (Ioctl::IoasNoiommuGetPa, size_of::<sys::iommu_ioas_noiommu_get_pa>()),
    ]
}

#[test]
fn probe_of_a_non_iommufd_finds_nothing() {
    // /dev/null answers every ioctl with ENOTTY: the probe reports everything unsupported, no error.
    let null: std::os::fd::OwnedFd =
        std::fs::OpenOptions::new().read(true).write(true).open("/dev/null").unwrap().into();
    // SAFETY: the fd is freshly opened and owned; it is deliberately not an iommufd.
    let fd = unsafe {
        <Iommufd as std::os::fd::FromRawFd>::from_raw_fd(std::os::fd::IntoRawFd::into_raw_fd(null))
    };
    let caps = fd.probe().unwrap();
    assert!(caps.supported().is_empty(), "{caps:?}");
    assert_eq!(caps.unsupported(), Ioctl::ALL.to_vec());
    assert!(!caps.hwpt_alloc_data && !caps.hw_info_input_type && !caps.noiommu);
    assert!(matches!(caps.require(Ioctl::IoasChangeProcess), Err(Error::Unsupported { since: "6.13", .. })));
}

#[test]
#[ignore = "needs /dev/iommu and a VFIO device: run by cargo xtask vm-test"]
fn probe_finds_every_ioctl_of_the_kernel_with_its_exact_size() {
    let fd = Iommufd::open().unwrap();
    let caps = fd.probe().unwrap();
    let lts = common::predates("6.13");
    if lts {
        // Linux 6.12: the 15 ioctls up to IOMMU_FAULT_QUEUE_ALLOC (6.11), with 7.3's sizes.
        let release = |i: &Ioctl| {
            let (major, minor) = i.since().split_once('.').unwrap();
            (major.parse::<u32>().unwrap(), minor.parse::<u32>().unwrap())
        };
        let old: Vec<Ioctl> = Ioctl::ALL.iter().copied().filter(|i| release(i) <= (6, 12)).collect();
        assert_eq!(old.len(), 15);
        assert_eq!(caps.supported(), old, "Linux 6.12 has the 15 ioctls up to 6.11");
        assert!(caps.predates("6.13") && !caps.predates("6.12"));
    } else {
        assert_eq!(caps.supported(), Ioctl::ALL.to_vec(), "Linux 7.3.4 has all 22");
        assert!(!caps.predates("7.3"));
    }
    for (ioctl, size) in sizes_7_3() {
        let want = (!lts || caps.supports(ioctl)).then_some(size as u32);
        assert_eq!(caps.arg_size(ioctl), want, "{}", ioctl.name());
    }
    assert!(caps.hwpt_alloc_data && caps.hwpt_alloc_fault_id && caps.hw_info_capabilities);
    // 6.12.95 reports the PASID width (hw_info_max_pasid) without the 6.15 PASID flags.
    assert!(caps.hw_info_max_pasid);
    assert_eq!((caps.hw_info_input_type, caps.viommu_alloc_data), (!lts, !lts));
    assert_eq!((caps.hwpt_paging_fault_id, caps.hwpt_alloc_pasid), (!lts, !lts));
    // The VM kernel is built without CONFIG_VFIO_NOIOMMU, so CONFIG_IOMMUFD_NOIOMMU is off: the
    // ioctl exists but is the EOPNOTSUPP stub.
    if in_vm() {
        assert!(!caps.noiommu);
    }
    assert_eq!(fd.capabilities().unwrap(), &caps);
    assert!(std::ptr::eq(fd.capabilities().unwrap(), fd.capabilities().unwrap()), "cached");
}

#[test]
#[ignore = "needs /dev/iommu and a VFIO device: run by cargo xtask vm-test"]
fn probing_creates_nothing() {
    // Changing the rlimit mode is allowed only while the iommufd holds no object at all: after a probe
    // it still is, so the probe left nothing behind.
    let fd = Iommufd::open().unwrap();
    let fds = common::fd_count();
    fd.probe().unwrap();
    assert_eq!(common::fd_count(), fds, "no fault/vEVENTQ fd was created");
    fd.set_rlimit_mode(RlimitMode::PerProcess).unwrap();
    fd.set_rlimit_mode(RlimitMode::PerUser).unwrap();
    // Ids are handed out lowest-free: two IOASes around a probe get consecutive ids.
    let a = fd.alloc_ioas().unwrap();
    fd.probe().unwrap();
    let b = fd.alloc_ioas().unwrap();
    assert_eq!(b.id(), a.id() + 1);
    // SAFETY: no handle owns id b+1; it must not exist.
    assert_eq!(errno(unsafe { fd.destroy_raw(b.id() + 1) }), Errno::NOENT);

    // With a device bound, neither probe changes its state.
    let dev = bind(&fd);
    assert_eq!(dev.dev_id(), b.id() + 1, "a bound device takes the next object id");
    dev.set_bus_master(true).unwrap();
    let before = dev.read_config_u16(4).unwrap();
    let dcaps = dev.probe().unwrap();
    fd.probe().unwrap();
    assert_eq!(dev.read_config_u16(4).unwrap(), before, "no reset happened (command register kept)");
    assert_eq!(dcaps.pasid_attach, !common::predates("6.15"), "vfio-pci attaches PASIDs from 6.15 on");
    // The PASID probe attached nothing: attaching PASID 1 to an IOAS would have allocated an automatic
    // HWPT, taking the next id, and the whole device attaches normally.
    let c = fd.alloc_ioas().unwrap();
    assert_eq!(c.id(), dev.dev_id() + 1, "the device probe allocated nothing");
    dev.attach(&a).unwrap().detach().unwrap();
}

#[test]
#[ignore = "needs /dev/iommu and a VFIO device: run by cargo xtask vm-test"]
fn device_probe_on_edu() {
    let fd = Iommufd::open().unwrap();
    let dev = bind(&fd);
    let caps = dev.probe().unwrap();
    eprintln!("device capabilities: {caps:?}");
    assert_eq!(caps.bind_token, !common::predates("6.17"), "cdevs bind with a VF token from 6.17 on");
    assert_eq!(caps.pasid_attach, !common::predates("6.15"), "vfio-pci implements PASID attach (6.15)");
    if in_vm() {
        // edu has no FLR and no PM reset, and sits on the root bus: vfio-pci finds no way to reset it
        // and clears VFIO_DEVICE_FLAGS_RESET.
        let all_but_reset: Vec<DeviceIoctl> =
            DeviceIoctl::ALL.iter().copied().filter(|&i| i != DeviceIoctl::Reset).collect();
        assert_eq!(caps.supported(), all_but_reset);
        // vfio-pci implements the runtime power-management features (SET only) for every device; edu
        // has no VF token (not an SR-IOV PF), no migration driver, and the VM kernel has no dma-buf
        // export (CONFIG_PCI_P2PDMA off) and no s390 zPCI.
        assert_eq!(
            caps.features,
            vec![
                (DeviceFeature::LOW_POWER_ENTRY, FeatureOps::SET),
                (DeviceFeature::LOW_POWER_ENTRY_WITH_WAKEUP, FeatureOps::SET),
                (DeviceFeature::LOW_POWER_EXIT, FeatureOps::SET),
            ]
        );
    }
    for (f, ops) in &caps.features {
        assert_eq!(dev.feature_probe(*f).unwrap(), *ops);
    }
}

#[test]
#[ignore = "needs /dev/iommu and a VFIO device: run by cargo xtask vm-test"]
fn change_process_moves_file_mappings_only() {
    let fd = Iommufd::open().unwrap();
    let r = fd.change_process();
    if common::unsupported_here(&r, "IOMMU_IOAS_CHANGE_PROCESS", "6.13", iommufd::Errno::NOTTY) {
        return;
    }
    r.unwrap();
    let ioas = fd.alloc_ioas().unwrap();
    let file = memfd(4 * page());
    let m = ioas.map_file(&file, 0, 4 * page(), Iova::Auto, Access::READ_WRITE).unwrap();
    fd.change_process().expect("file mappings move (here: to the process that already owns them)");

    // An anonymous mapping cannot move: the kernel refuses with EINVAL and changes nothing.
    let anon = ioas.map(DmaBuffer::new(page() as usize).unwrap(), Iova::Auto, Access::READ_WRITE).unwrap();
    let e = fd.change_process().unwrap_err();
    assert_eq!(e.errno(), Some(Errno::INVAL), "{e}");
    assert!(e.to_string().contains("map_file"), "the hint names the cause: {e}");
    // Even in another IOAS of the same iommufd: the ioctl covers the whole context.
    anon.unmap().unwrap();
    let other = fd.alloc_ioas().unwrap();
    let anon = other.map(DmaBuffer::new(page() as usize).unwrap(), Iova::Auto, Access::READ).unwrap();
    assert_eq!(errno(fd.change_process()), Errno::INVAL);
    anon.unmap().unwrap();

    // The live-update handoff: a child process (which inherited the iommufd) takes the file mapping
    // over, then the parent takes it back.
    let code = common::in_child(|| match fd.change_process() {
        Ok(()) => 0,
        Err(e) => e.errno().map_or(255, |e| e.raw_os_error()),
    });
    assert_eq!(code, 0, "the child's IOMMU_IOAS_CHANGE_PROCESS failed with that errno");
    fd.change_process().expect("the parent takes the pages back from the exited child");
    assert_eq!(m.unmap().unwrap(), ());
}

#[test]
#[ignore = "needs /dev/iommu and a VFIO device: run by cargo xtask vm-test"]
fn vfio_compat_ioas_get_set_clear() {
    let fd = Iommufd::open().unwrap();
    let compat = fd.vfio_compat_ioas();
    assert_eq!(compat.get().unwrap(), None, "none until set (the kernel answers ENODEV)");
    let ioas = fd.alloc_ioas().unwrap();
    compat.set(&ioas).unwrap();
    assert_eq!(compat.get().unwrap(), Some(ioas.id()));
    let other = fd.alloc_ioas().unwrap();
    compat.set(&other).unwrap();
    assert_eq!(compat.get().unwrap(), Some(other.id()));
    compat.clear().unwrap();
    assert_eq!(compat.get().unwrap(), None);
    // Clearing destroyed nothing; destroying the compat IOAS unsets it.
    compat.set(&ioas).unwrap();
    let id = ioas.id();
    ioas.destroy().unwrap();
    assert_eq!(compat.get().unwrap(), None, "IOAS {id} was destroyed");
    let foreign = Iommufd::open().unwrap().alloc_ioas().unwrap();
    assert!(matches!(compat.set(&foreign), Err(Error::ForeignObject { .. })));
}

#[test]
#[ignore = "needs /dev/iommu and a VFIO device: run by cargo xtask vm-test"]
fn noiommu_get_pa_is_refused_under_a_real_iommu() {
    let fd = Iommufd::open().unwrap();
    let dev = bind(&fd);
    let ioas = fd.alloc_ioas().unwrap();
    let _att = dev.attach(&ioas).unwrap();
    let m = ioas.map(DmaBuffer::new(page() as usize).unwrap(), Iova::Auto, Access::READ_WRITE).unwrap();
    assert!(matches!(ioas.noiommu_get_pa(m.iova(), 0), Err(Error::InvalidArgument { .. })));
    // EOPNOTSUPP for two reasons, either sufficient: the VM kernel lacks CONFIG_IOMMUFD_NOIOMMU (the
    // ioctl is its stub), and the IOVA is translated by a real IOMMU domain (intel-iommu or
    // virtio-iommu), not the no-IOMMU software table whose physical addresses a device could use.
    let r = ioas.noiommu_get_pa(m.iova(), page());
    if common::unsupported_here(&r, "IOMMU_IOAS_NOIOMMU_GET_PA", "7.3", Errno::NOTTY) {
        return;
    }
    let e = r.unwrap_err();
    assert_eq!(e.errno(), Some(Errno::OPNOTSUPP), "{e}");
    assert!(e.is_unsupported());
    // Unmapped IOVAs give the same stub answer (the stub checks nothing).
    if in_vm() {
        assert_eq!(errno(ioas.noiommu_get_pa(0xdead_0000, page())), Errno::OPNOTSUPP);
    }
    m.unmap().unwrap();
}

#[test]
#[ignore = "needs /dev/iommu and a VFIO device: run by cargo xtask vm-test"]
fn edu_has_no_dma_logging_and_no_bus_master_feature() {
    let fd = Iommufd::open().unwrap();
    let dev = bind(&fd);
    for f in
        [DeviceFeature::DMA_LOGGING_START, DeviceFeature::DMA_LOGGING_STOP, DeviceFeature::DMA_LOGGING_REPORT]
    {
        assert_eq!(dev.feature_probe(f).unwrap(), FeatureOps::empty(), "{f:?}");
    }
    // Plain vfio-pci has no DMA logging (only migration variant drivers do): the VFIO core answers
    // ENOTTY because the device has no log_ops.
    let range = IovaRange::from_len(0x10_0000, 0x10_0000).unwrap();
    let e = dev.dma_logging_start(4096, &[range]).unwrap_err();
    assert!(
        matches!(e, Error::Ioctl { op: "VFIO_DEVICE_FEATURE_DMA_LOGGING_START", errno: Errno::NOTTY, .. }),
        "{e:?}"
    );
    assert!(e.to_string().contains("DMA logging"), "{e}");
    assert!(matches!(dev.dma_logging_start(4096, &[]), Err(Error::InvalidArgument { .. })));

    // VFIO_DEVICE_FEATURE_BUS_MASTER is implemented by vfio-cdx only; vfio-pci falls through to ENOTTY.
    assert_eq!(dev.feature_probe(DeviceFeature::BUS_MASTER).unwrap(), FeatureOps::empty());
    let e = dev.set_bus_master_feature(true).unwrap_err();
    assert!(
        matches!(e, Error::Ioctl { op: "VFIO_DEVICE_FEATURE_BUS_MASTER", errno: Errno::NOTTY, .. }),
        "{e:?}"
    );
    // The config-space path works.
    dev.set_bus_master(true).unwrap();
    assert!(dev.bus_master().unwrap());
}

#[test]
#[ignore = "needs /dev/iommu and a VFIO device: run by cargo xtask vm-test"]
fn dma_buf_export_of_a_bar() {
    let fd = Iommufd::open().unwrap();
    let dev = bind(&fd);
    let range = RegionRange { offset: 0, len: page() };
    assert!(matches!(dev.export_dma_buf(0, &[]), Err(Error::InvalidArgument { .. })));
    assert!(matches!(
        dev.export_dma_buf(0, &[RegionRange { offset: 1, len: page() }]),
        Err(Error::InvalidArgument { .. })
    ));
    if dev.feature_probe(DeviceFeature::DMA_BUF).unwrap().contains(FeatureOps::GET) {
        // A kernel with CONFIG_VFIO_PCI_DMABUF: export BAR0's first page and map it for peer-to-peer.
        let buf = dev.export_dma_buf(0, &[range]).unwrap();
        assert_eq!((buf.len(), buf.region_index()), (page(), 0));
        let ioas = fd.alloc_ioas().unwrap();
        let _att = dev.attach(&ioas).unwrap();
        let m = ioas.map_file(&buf, 0, buf.len(), Iova::Auto, Access::READ_WRITE).unwrap();
        assert_eq!(m.len(), page());
        m.unmap().unwrap();
        return;
    }
    // The VM kernel: vfio-pci is built without CONFIG_VFIO_PCI_DMABUF (it needs CONFIG_PCI_P2PDMA, which
    // the test kernel leaves off), so the feature is the ENOTTY stub.
    assert!(!in_vm() || dev.feature_probe(DeviceFeature::DMA_BUF).unwrap().is_empty());
    let r = dev.export_dma_buf(0, &[range]);
    // A kernel known to predate the feature: refused before the ioctl, naming the release.
    if common::unsupported_here(&r, "VFIO_DEVICE_FEATURE_DMA_BUF", "6.19", Errno::NOTTY) {
        return;
    }
    let e = r.unwrap_err();
    assert!(
        matches!(e, Error::Ioctl { op: "VFIO_DEVICE_FEATURE_DMA_BUF", errno: Errno::NOTTY, .. }),
        "{e:?}"
    );
    assert!(e.to_string().contains("CONFIG_VFIO_PCI_DMABUF"), "{e}");
}

#[test]
#[ignore = "needs /dev/iommu and a VFIO device: run by cargo xtask vm-test"]
fn hot_reset_of_edu_on_the_root_bus() {
    let fd = Iommufd::open().unwrap();
    let dev = edu(&fd);
    // edu sits on the q35 root bus (00:xx.0): there is no bridge above it whose secondary bus could be
    // reset, and no hotplug slot, so vfio-pci answers ENODEV (pci_probe_reset_slot and
    // pci_probe_reset_bus both fail) for the query and for the reset itself.
    assert_eq!(dev.name().map(|n| &n[..8]), Some("0000:00:"));
    assert_eq!(errno(dev.hot_reset_info()), Errno::NODEV);
    assert_eq!(errno(dev.hot_reset()), Errno::NODEV);
}

#[test]
#[ignore = "needs /dev/iommu and a VFIO device: run by cargo xtask vm-test"]
fn attach_pasid_on_edu() {
    let fd = Iommufd::open().unwrap();
    let dev = edu(&fd);
    let info = dev.hw_info().unwrap();
    assert_eq!(info.max_pasid_log2, 0, "edu has no PASID capability");
    let ioas = fd.alloc_ioas().unwrap();
    // PASID 0 is IOMMU_NO_PASID to the kernel, a whole-device attach in disguise: refused up front.
    let e = dev.attach_pasid(0, &ioas).unwrap_err();
    assert!(matches!(e, Error::InvalidArgument { .. }), "{e}");
    assert!(e.to_string().contains("attach()"), "{e}");
    // A kernel without PASID attachment (6.12): refused before the attach ioctl, after a
    // side-effect-free probe, with the EINVAL such a kernel answers; so is a PASID-capable HWPT.
    let r = dev.attach_pasid(1, &ioas);
    if common::unsupported_here(&r, "VFIO_DEVICE_ATTACH_IOMMUFD_PT (PASID)", "6.15", Errno::INVAL) {
        let hwpt = Hwpt::alloc(&dev, &ioas, HwptFlags::PASID);
        common::assert_unsupported(
            &hwpt,
            "IOMMU_HWPT_ALLOC (IOMMU_HWPT_ALLOC_PASID)",
            "6.15",
            Errno::OPNOTSUPP,
        );
        dev.attach(&ioas).unwrap().detach().unwrap();
        return;
    }
    // A device without PASID support is refused by the crate, before the attach ioctl, whatever the
    // page table and whatever the IOMMU driver would say.
    let e = r.unwrap_err();
    assert!(matches!(e, Error::NotCapable { .. }), "{e}");
    assert!(e.is_unsupported() && e.to_string().contains("max_pasid_log2 0"), "{e}");
    let hwpt = Hwpt::alloc(&dev, &ioas, HwptFlags::PASID);
    match iommu().as_str() {
        "intel" => {
            // VT-d allocates a PASID-compatible HWPT. Linux 7.3 itself would accept attaching PASID 1 of
            // edu to it (iommu_attach_device_pasid skips validation for a device whose max_pasids is 0,
            // and nothing is programmed): a vacuous attachment the crate now refuses.
            let hwpt = hwpt.unwrap();
            let e = dev.attach_pasid(1, &hwpt).unwrap_err();
            assert!(matches!(e, Error::NotCapable { .. }), "{e}");
            // A PASID-compatible HWPT serves the whole device.
            dev.attach(&hwpt).unwrap().detach().unwrap();
        }
        "virtio" => {
            // virtio-iommu has no domain_alloc_paging_flags, so iommufd refuses any allocation flag,
            // IOMMU_HWPT_ALLOC_PASID included, with EOPNOTSUPP: no PASID-capable page table exists.
            let e = hwpt.unwrap_err();
            assert_eq!(e.errno(), Some(Errno::OPNOTSUPP));
            assert!(e.is_unsupported(), "{e}");
        }
        other => panic!("unknown IOMMU {other}"),
    }
    // Nothing was recorded or attached: the whole device attaches to the IOAS normally.
    dev.attach(&ioas).unwrap().detach().unwrap();
}

/// Lowers this process's RLIMIT_MEMLOCK to `bytes`.
fn limit_memlock(bytes: u64) {
    let lim = libc::rlimit { rlim_cur: bytes, rlim_max: bytes };
    // SAFETY: `lim` is a valid rlimit for the call.
    assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &lim) }, 0);
}

#[test]
#[ignore = "needs /dev/iommu and a VFIO device: run by cargo xtask vm-test"]
fn memlock_is_charged_at_attach_time_and_never_to_cap_ipc_lock() {
    const LEN: usize = 1 << 20;
    // Root (CAP_IPC_LOCK) is never charged: a 1 MiB mapping attaches under a 64 KiB limit.
    let code = common::in_child(|| {
        limit_memlock(64 << 10);
        let fd = Iommufd::open().unwrap();
        let dev = edu(&fd);
        let ioas = fd.alloc_ioas().unwrap();
        let _map = ioas.map(DmaBuffer::new(LEN).unwrap(), Iova::Auto, Access::READ_WRITE).unwrap();
        let att = dev.attach(&ioas).unwrap();
        att.detach().unwrap();
        0
    });
    assert_eq!(code, 0, "root was limited by RLIMIT_MEMLOCK");
    // Without CAP_IPC_LOCK, a mapping made before any domain pins nothing; the pinning, and so the
    // ENOMEM, comes when a domain is filled: at HWPT allocation or at attach.
    let code = common::in_child(|| {
        let fd = Iommufd::open().unwrap();
        let cdev = iommufd::VfioDevice::open_pci(&common::edu_address()).unwrap();
        limit_memlock(64 << 10);
        // Dropping root (all uids non-zero) clears the capabilities, CAP_IPC_LOCK included.
        // SAFETY: plain system call on integers.
        assert_eq!(unsafe { libc::setresuid(65534, 65534, 65534) }, 0);
        let ioas = fd.alloc_ioas().unwrap();
        let _map = ioas.map(DmaBuffer::new(LEN).unwrap(), Iova::Auto, Access::READ_WRITE).unwrap();
        let dev = cdev.bind(&fd).unwrap();
        let memlock_hint =
            |e: &Error| e.errno() == Some(Errno::NOMEM) && e.to_string().contains("RLIMIT_MEMLOCK");
        match Hwpt::alloc(&dev, &ioas, HwptFlags::empty()) {
            Err(e) if memlock_hint(&e) => {}
            // 6.12 under virtio-iommu: the allocated domain's aperture is still empty, so the area
            // mapped before lies outside it and iommufd refuses the domain (EADDRINUSE) before
            // pinning anything; the attach below still charges the pins.
            Err(e) if common::allocated_hwpt_has_no_aperture() && e.errno() == Some(Errno::ADDRINUSE) => {}
            other => {
                let _ = std::io::Write::write_fmt(
                    &mut std::io::stderr(),
                    format_args!("HWPT alloc: {other:?}\n"),
                );
                return 2;
            }
        }
        match dev.attach(&ioas) {
            Err(e) if memlock_hint(&e) => {
                eprintln!("{e}");
                0
            }
            other => {
                let _ =
                    std::io::Write::write_fmt(&mut std::io::stderr(), format_args!("attach: {other:?}\n"));
                3
            }
        }
    });
    assert_eq!(code, 0, "expected ENOMEM with the memlock hint at HWPT allocation and attach");
}
