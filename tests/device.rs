//! Device: open by PCI address, bind, attach to an IOAS and to an allocated HWPT, replace, detach,
//! hw_info, IOVA ranges seen through the IOMMU, and IOMMU group facts. Device-generic: also run
//! against real hardware by `cargo xtask hw-test`.

mod common;

use common::{bind, device_address, iommu};
use iommufd::{Errno, Error, HwInfoData, Hwpt, HwptFlags, Iommufd, IovaRange, VfioDevice};

#[test]
#[ignore = "needs /dev/iommu and a VFIO device: run by cargo xtask vm-test"]
fn open_by_pci_address_and_bind() {
    let fd = Iommufd::open().unwrap();
    let dev = VfioDevice::open_pci(&device_address()).unwrap();
    assert_eq!(dev.name(), Some(device_address().as_str()));
    let dev = dev.bind(&fd).unwrap();
    assert_eq!(dev.name(), Some(device_address().as_str()));
    assert_eq!(fd.bound_device_names(), vec![device_address()]);
    dev.close().unwrap();
    assert!(fd.bound_device_names().is_empty());
    // After close the device can be opened and bound again.
    let again = bind(&fd);
    assert!(again.dev_id() != 0);
}

#[test]
#[ignore = "needs /dev/iommu and a VFIO device: run by cargo xtask vm-test"]
fn open_by_cdev_path_and_by_fd() {
    let fd = Iommufd::open().unwrap();
    let cdev = device_address().parse::<iommufd::PciAddress>().unwrap().vfio_cdev_path().unwrap();
    let dev = VfioDevice::open(&cdev).unwrap();
    assert_eq!(dev.name(), Some(device_address().as_str()), "name recovered from sysfs");
    drop(dev);
    let raw: std::os::fd::OwnedFd =
        std::fs::OpenOptions::new().read(true).write(true).open(&cdev).unwrap().into();
    let dev = VfioDevice::from_fd(raw).unwrap();
    assert_eq!(dev.name(), Some(device_address().as_str()), "name recovered from the fd's device number");
    dev.bind(&fd).unwrap();
}

/// A directory for this test's files, removed first if a previous run left it.
fn scratch(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("iommufd-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
#[ignore = "needs /dev/iommu and a VFIO device: run by cargo xtask vm-test"]
fn device_name_comes_from_the_device_number_not_the_path() {
    let cdev = device_address().parse::<iommufd::PciAddress>().unwrap().vfio_cdev_path().unwrap();
    let dir = scratch("names");
    // A symlink whose name is no cdev's name: the path's file name says nothing about the device.
    let link = dir.join("vfio4242");
    std::os::unix::fs::symlink(&cdev, &link).unwrap();
    let dev = VfioDevice::open(&link).unwrap();
    assert_eq!(dev.name(), Some(device_address().as_str()), "opened through a symlink");
    drop(dev);
    // A bind mount of the cdev on a file with another name: /proc/self/fd shows the mount's path.
    let target = dir.join("not-a-vfio-name");
    std::fs::write(&target, b"").unwrap();
    let c = |p: &std::path::Path| std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).unwrap();
    let (src, dst) = (c(&cdev), c(&target));
    // SAFETY: both arguments are NUL-terminated paths alive for the call; the other pointers are null,
    // which MS_BIND allows.
    let rc =
        unsafe { libc::mount(src.as_ptr(), dst.as_ptr(), std::ptr::null(), libc::MS_BIND, std::ptr::null()) };
    assert_eq!(rc, 0, "bind mount: {}", std::io::Error::last_os_error());
    let raw: std::os::fd::OwnedFd =
        std::fs::OpenOptions::new().read(true).write(true).open(&target).unwrap().into();
    let shown =
        std::fs::read_link(format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(&raw))).unwrap();
    assert_eq!(shown, target, "the fd's link text names the bind mount, not the cdev");
    let dev = VfioDevice::from_fd(raw).unwrap();
    assert_eq!(dev.name(), Some(device_address().as_str()), "adopted from a bind mount");
    let fd = Iommufd::open().unwrap();
    let dev = dev.bind(&fd).unwrap();
    assert_eq!(fd.bound_device_names(), vec![device_address()]);
    assert!(dev.group().unwrap().devices.iter().any(|d| d.name == device_address() && d.bound_here));
    let real = std::fs::canonicalize(format!("/sys/bus/pci/devices/{}", device_address())).unwrap();
    assert_eq!(dev.sysfs_path(), Some(real), "the device's own sysfs directory");
    drop(dev);
    // SAFETY: `dst` is a NUL-terminated path alive for the call.
    assert_eq!(unsafe { libc::umount2(dst.as_ptr(), 0) }, 0, "{}", std::io::Error::last_os_error());
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
#[ignore = "needs /dev/iommu and a VFIO device: run by cargo xtask vm-test"]
fn files_of_the_wrong_kind_are_refused_before_any_ioctl() {
    let cdev = device_address().parse::<iommufd::PciAddress>().unwrap().vfio_cdev_path().unwrap();
    let open = |p: &std::path::Path| -> std::os::fd::OwnedFd {
        std::fs::OpenOptions::new().read(true).write(true).open(p).unwrap().into()
    };
    // A VFIO cdev is not an iommufd (the kernel would answer IOMMU_OPTION with a bare EINVAL).
    let e = Iommufd::from_fd(open(&cdev)).unwrap_err();
    assert!(matches!(e, Error::WrongFile { expected: "an iommufd", .. }), "{e}");
    assert!(e.to_string().contains("not an iommufd") && e.to_string().contains("vfio-dev"), "{e}");
    let e = Iommufd::open_path(&cdev).unwrap_err();
    assert!(e.to_string().contains("not an iommufd"), "{e}");
    // /dev/iommu is not a VFIO device cdev.
    let e = VfioDevice::from_fd(open(std::path::Path::new("/dev/iommu"))).unwrap_err();
    assert!(matches!(e, Error::WrongFile { .. }), "{e}");
    assert!(e.to_string().contains("misc/iommu"), "{e}");
    let e = VfioDevice::open("/dev/iommu").unwrap_err();
    assert!(matches!(e, Error::WrongFile { .. }), "{e}");
    // A legacy VFIO group node is not a device cdev.
    let group = std::fs::read_link(format!("/sys/bus/pci/devices/{}/iommu_group", device_address())).unwrap();
    let group_node = std::path::Path::new("/dev/vfio").join(group.file_name().unwrap());
    let e = VfioDevice::open(&group_node).unwrap_err();
    assert!(matches!(e, Error::WrongFile { .. }), "{e}");
    if iommu() != "hardware" {
        // The VM kernel has the legacy VFIO container (CONFIG_VFIO_CONTAINER), not iommufd's
        // emulation of it: /dev/vfio/vfio is the vfio misc device, and IOMMU_OPTION fails there.
        let e = Iommufd::open_path("/dev/vfio/vfio").unwrap_err();
        assert!(e.to_string().contains("legacy VFIO container"), "{e}");
    }
    // The real ones pass.
    Iommufd::from_fd(open(std::path::Path::new("/dev/iommu"))).unwrap();
    Iommufd::open_path("/dev/iommu").unwrap();
    VfioDevice::from_fd(open(&cdev)).unwrap();
}

#[test]
#[ignore = "needs /dev/iommu and a VFIO device: run by cargo xtask vm-test"]
fn attach_ioas_hwpt_replace_detach() {
    let fd = Iommufd::open().unwrap();
    let dev = bind(&fd);
    let ioas = fd.alloc_ioas().unwrap();
    let ioas2 = fd.alloc_ioas().unwrap();
    let mut att = dev.attach(&ioas).unwrap();
    assert_eq!(att.pt_id(), ioas.id());
    // One whole-device attachment at a time.
    assert!(matches!(dev.attach(&ioas2), Err(Error::InvalidArgument { .. })));
    let hwpt = Hwpt::alloc(&dev, &ioas2, HwptFlags::empty()).unwrap();
    assert_ne!(hwpt.id(), ioas2.id());
    att.replace(&hwpt).unwrap();
    assert_eq!(att.pt_id(), hwpt.id());
    // The HWPT is attached: an explicit destroy is refused before the kernel sees it.
    let hwpt_id = hwpt.id();
    assert!(matches!(hwpt.destroy().map_err(Error::from), Err(Error::InUse { .. })));
    att.replace(&ioas).unwrap();
    att.detach().unwrap();
    // SAFETY: the attachment is gone and the Hwpt handle was consumed by destroy(), whose refusal
    // dropped the last reference; the id must be gone.
    let e = unsafe { fd.destroy_raw(hwpt_id) }.unwrap_err();
    assert_eq!(e.errno(), Some(Errno::NOENT), "{e}");
    // Attach again after detach.
    let att = dev.attach(&ioas2).unwrap();
    att.detach().unwrap();
}

#[test]
#[ignore = "needs /dev/iommu and a VFIO device: run by cargo xtask vm-test"]
fn objects_of_another_iommufd_are_refused() {
    let fd1 = Iommufd::open().unwrap();
    let fd2 = Iommufd::open().unwrap();
    let dev = bind(&fd1);
    let foreign = fd2.alloc_ioas().unwrap();
    assert!(matches!(dev.attach(&foreign), Err(Error::ForeignObject { .. })));
    assert!(matches!(Hwpt::alloc(&dev, &foreign, HwptFlags::empty()), Err(Error::ForeignObject { .. })));
}

#[test]
#[ignore = "needs /dev/iommu and a VFIO device: run by cargo xtask vm-test"]
fn hw_info_matches_the_iommu() {
    let fd = Iommufd::open().unwrap();
    let dev = bind(&fd);
    let info = dev.hw_info().unwrap();
    match iommu().as_str() {
        "intel" => match info.data {
            HwInfoData::IntelVtd { cap_reg, ecap_reg, .. } => {
                assert_ne!(cap_reg, 0, "VT-d capability register");
                assert_ne!(ecap_reg, 0, "VT-d extended capability register");
            }
            other => panic!("expected Intel VT-d under intel-iommu, got {other:?}"),
        },
        "virtio" => assert_eq!(info.data, HwInfoData::None, "virtio-iommu reports no driver data"),
        _ => assert!(!matches!(info.data, HwInfoData::Unknown { .. }), "{info:?}"),
    }
}

#[test]
#[ignore = "needs /dev/iommu and a VFIO device: run by cargo xtask vm-test"]
fn hwpt_flags_are_accepted_or_refused_as_the_iommu_answers() {
    let fd = Iommufd::open().unwrap();
    let dev = bind(&fd);
    let ioas = fd.alloc_ioas().unwrap();
    let caps = dev.hw_info().unwrap().capabilities;
    for flags in [HwptFlags::NEST_PARENT, HwptFlags::DIRTY_TRACKING] {
        let r = Hwpt::alloc(&dev, &ioas, flags);
        match (iommu().as_str(), flags) {
            // QEMU's VT-d has no second-stage dirty bits and its iommufd driver offers no nesting on
            // this kernel; the kernel answers EOPNOTSUPP for both (measured on 7.3.4).
            ("intel", _) => {
                let e = r.unwrap_err();
                assert_eq!(e.errno(), Some(Errno::OPNOTSUPP), "{flags:?} on QEMU intel-iommu: {e}");
                assert!(e.is_unsupported());
            }
            // virtio-iommu has neither nesting nor dirty tracking in Linux 7.3.
            ("virtio", _) => {
                let e = r.unwrap_err();
                assert_eq!(e.errno(), Some(Errno::OPNOTSUPP), "{flags:?} on virtio-iommu: {e}");
            }
            (_, f)
                if f == HwptFlags::DIRTY_TRACKING
                    && !caps.contains(iommufd::HwCapabilities::DIRTY_TRACKING) =>
            {
                assert!(r.unwrap_err().is_unsupported());
            }
            _ => match r {
                Ok(h) => assert_eq!(h.flags(), flags),
                Err(e) => assert!(e.is_unsupported(), "{flags:?}: {e}"),
            },
        }
    }
}

#[test]
#[ignore = "needs /dev/iommu and a VFIO device: run by cargo xtask vm-test"]
fn iova_ranges_reflect_the_attached_iommu() {
    let fd = Iommufd::open().unwrap();
    let dev = bind(&fd);
    let ioas = fd.alloc_ioas().unwrap();
    let _att = dev.attach(&ioas).unwrap();
    let r = ioas.iova_ranges().unwrap();
    assert_eq!(r.alignment, iommufd::page_size() as u64);
    match iommu().as_str() {
        // VT-d reserves the MSI window 0xfee00000..0xfeefffff; QEMU's VT-d has 48-bit IOVAs.
        "intel" => assert_eq!(
            r.ranges,
            vec![
                IovaRange { start: 0, last: 0xfedf_ffff },
                IovaRange { start: 0xfef0_0000, last: 0xffff_ffff_ffff }
            ]
        ),
        // virtio-iommu in QEMU offers a 39-bit input range by default (aw-bits=39).
        "virtio" => assert_eq!(r.ranges.last().unwrap().last, (1 << 39) - 1, "{r:?}"),
        _ => assert!(!r.ranges.is_empty()),
    }
}

#[test]
#[ignore = "needs /dev/iommu and a VFIO device: run by cargo xtask vm-test"]
fn group_facts_match_sysfs() {
    let fd = Iommufd::open().unwrap();
    let dev = bind(&fd);
    let group = dev.group().unwrap();
    let link = std::fs::read_link(format!("/sys/bus/pci/devices/{}/iommu_group", device_address())).unwrap();
    let number: u32 = link.file_name().unwrap().to_str().unwrap().parse().unwrap();
    assert_eq!(group.number, number);
    if let Ok(env) = std::env::var("IOMMUFD_TEST_EDU_GROUP") {
        assert_eq!(group.number.to_string(), env);
    }
    let mut sysfs: Vec<String> = std::fs::read_dir(format!("/sys/kernel/iommu_groups/{number}/devices"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    sysfs.sort();
    let mut ours: Vec<String> = group.devices.iter().map(|d| d.name.clone()).collect();
    ours.sort();
    assert_eq!(ours, sysfs);
    let me = group.devices.iter().find(|d| d.name == device_address()).unwrap();
    assert!(me.bound_here);
    assert_eq!(me.driver.as_deref(), Some("vfio-pci"));
    drop(dev);
    // `bound_here` is relative to the iommufd asked: after rebinding to another, it is true there.
    let fd2 = Iommufd::open().unwrap();
    let dev2 = bind(&fd2);
    assert!(dev2.group().unwrap().devices.iter().any(|d| d.name == device_address() && d.bound_here));
}

#[test]
#[ignore = "needs /dev/iommu and a VFIO device: run by cargo xtask vm-test"]
fn device_info_regions_and_reset() {
    let fd = Iommufd::open().unwrap();
    let dev = bind(&fd);
    let info = dev.info().unwrap();
    assert!(info.num_regions >= 7, "PCI devices have BAR0-5, ROM and config: {info:?}");
    let config = dev.region_info(iommufd::PciRegion::Config.index()).unwrap();
    assert!(config.size >= 256, "{config:?}");
    let vendor = dev.read_config_u16(0).unwrap();
    let sysfs_vendor =
        std::fs::read_to_string(format!("/sys/bus/pci/devices/{}/vendor", device_address())).unwrap();
    assert_eq!(format!("{vendor:#06x}"), sysfs_vendor.trim());
    dev.set_bus_master(true).unwrap();
    assert!(dev.bus_master().unwrap());
    dev.set_bus_master(false).unwrap();
    assert!(!dev.bus_master().unwrap());
    // VFIO reports whether the device can be reset; the ioctl must agree.
    if info.flags.contains(iommufd::DeviceFlags::RESET) {
        // The kernel saves and restores config space around the reset: bus mastering survives.
        dev.set_bus_master(true).unwrap();
        dev.reset().unwrap();
        assert!(dev.bus_master().unwrap(), "bus mastering was lost by the reset");
        dev.set_bus_master(false).unwrap();
    } else {
        assert!(dev.reset().is_err(), "reset succeeded on a device that reports no reset");
    }
}

#[test]
#[ignore = "needs /dev/iommu and the edu device: run by cargo xtask vm-test"]
fn ioeventfd_writes_a_register_when_signalled() {
    use iommufd::PciRegion;
    let fd = Iommufd::open().unwrap();
    let dev = VfioDevice::open_pci(&common::edu_address()).unwrap().bind(&fd).unwrap();
    let bar0 = PciRegion::Bar(0).index();
    let efd = rustix::event::eventfd(0, rustix::event::EventfdFlags::CLOEXEC).unwrap();
    // Bad arguments are refused before the ioctl.
    assert!(matches!(dev.ioeventfd(bar0, 4, 3, 0, &efd), Err(Error::InvalidArgument { .. })));
    assert!(matches!(dev.ioeventfd(bar0, 2, 4, 0, &efd), Err(Error::InvalidArgument { .. })));
    assert!(matches!(dev.ioeventfd(bar0, 4, 2, 0x1_0000, &efd), Err(Error::InvalidArgument { .. })));
    // edu's liveness register (BAR0 + 4) reads back the complement of what was written.
    let value = 0x1122_3344u32;
    let ioeventfd = dev.ioeventfd(bar0, 4, 4, value.into(), &efd).unwrap();
    let mut reg = [0u8; 4];
    dev.read_region(bar0, 4, &mut reg).unwrap();
    assert_ne!(u32::from_le_bytes(reg), !value, "nothing written before the signal");
    rustix::io::write(&efd, &1u64.to_ne_bytes()).unwrap();
    let start = std::time::Instant::now();
    loop {
        dev.read_region(bar0, 4, &mut reg).unwrap();
        if u32::from_le_bytes(reg) == !value {
            break;
        }
        assert!(start.elapsed() < std::time::Duration::from_secs(5), "the kernel never wrote the register");
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    ioeventfd.remove().unwrap();
    // De-assigned: the same registration is accepted again (a live duplicate would be EEXIST).
    let again = dev.ioeventfd(bar0, 4, 4, value.into(), &efd).unwrap();
    let dup = dev.ioeventfd(bar0, 4, 4, value.into(), &efd).unwrap_err();
    assert_eq!(dup.errno(), Some(iommufd::Errno::EXIST), "{dup}");
    drop(again);
}

#[test]
#[ignore = "needs /dev/iommu and the edu device: run by cargo xtask vm-test"]
fn display_and_precopy_ioctls_are_not_vfio_pci_ones() {
    use iommufd::GfxPlaneKind;
    let fd = Iommufd::open().unwrap();
    let dev = VfioDevice::open_pci(&common::edu_address()).unwrap().bind(&fd).unwrap();
    // vfio-pci (edu has no mediated display) implements neither gfx ioctl: ENOTTY, named after it.
    for kind in [GfxPlaneKind::DmaBuf, GfxPlaneKind::Region] {
        let e = dev.gfx_plane_supported(kind).unwrap_err();
        assert!(matches!(e, Error::Unsupported { op: "VFIO_DEVICE_QUERY_GFX_PLANE", .. }), "{e}");
        let e = dev.query_gfx_plane(kind, 1).unwrap_err();
        assert_eq!(e.errno(), Some(Errno::NOTTY), "{e}");
    }
    let e = dev.gfx_dmabuf(0).unwrap_err();
    assert!(matches!(e, Error::Unsupported { op: "VFIO_DEVICE_GET_GFX_DMABUF", .. }), "{e}");
    // The pre-copy query belongs to a migration data fd; edu has no migration driver, and the device
    // cdev itself does not define the request.
    // SAFETY: the fd is a VFIO device cdev, which the contract allows.
    let e = unsafe { iommufd::precopy_info(&dev) }.unwrap_err();
    assert!(matches!(e, Error::Unsupported { op: "VFIO_MIG_GET_PRECOPY_INFO", .. }), "{e}");
}

#[test]
#[ignore = "needs /dev/iommu and a VFIO device: run by cargo xtask vm-test"]
fn a_cdev_opens_many_times_but_binds_once() {
    let fd = Iommufd::open().unwrap();
    let first = VfioDevice::open_pci(&device_address()).unwrap();
    let second = VfioDevice::open_pci(&device_address()).unwrap();
    let third = VfioDevice::open_pci(&device_address()).unwrap();
    let bound = first.bind(&fd).unwrap();
    // Opening succeeded three times; binding a second time, to any iommufd, is EINVAL.
    let e = second.bind(&fd).unwrap_err();
    assert_eq!(e.errno(), Some(Errno::INVAL), "{e}");
    assert!(e.to_string().contains("already bound"), "{e}");
    let e = third.bind(&Iommufd::open().unwrap()).unwrap_err();
    assert_eq!(e.errno(), Some(Errno::INVAL), "{e}");
    drop(bound);
    // Once unbound, a fresh open binds again.
    bind(&fd).close().unwrap();
}
