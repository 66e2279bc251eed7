//! Mediated devices: the kernel's `mtty` (a 16550 serial port with migration v2) and `mbochs` (a
//! bochs display with dma-buf planes) samples, created through the mdev sysfs interface, opened
//! through their VFIO cdevs and bound to iommufd's emulated access path. VM-only: the test kernel
//! builds both samples in.

mod common;

mod mdev {
    use std::io::{Read, Write};
    use std::os::fd::AsRawFd;

    use iommufd::{
        Access, DataDirection, DeviceFeature, DmaBuffer, Errno, Error, FeatureOps, GfxPlane, GfxPlaneKind,
        Hwpt, HwptFlags, Iommufd, Iova, MigState, MigrationFlags, PciRegion, RegionType,
    };

    use super::common::{self, Mdev};

    // 16550 registers of an mtty port (one port per I/O BAR), byte offsets.
    const UART_RX_TX: u64 = 0;
    const UART_LSR: u64 = 5;
    const UART_SCR: u64 = 7;
    const LSR_DATA_READY: u8 = 0x01;

    /// mtty's migration stream: a 24-byte header (magic, version, port count, flags), then one
    /// 36-byte `struct serial_port` per port.
    const MTTY_HEADER: usize = 24;
    const MTTY_PORT: usize = 36;
    const MTTY_MAGIC: u64 = 0x7e9d_0989_8c3e_2c4e;

    fn port_bar(port: u8) -> u32 {
        PciRegion::Bar(port).index()
    }

    fn put(dev: &iommufd::BoundDevice, port: u8, reg: u64, value: u8) {
        dev.write_region(port_bar(port), reg, &[value]).unwrap();
    }

    fn get(dev: &iommufd::BoundDevice, port: u8, reg: u64) -> u8 {
        let mut b = [0u8];
        dev.read_region(port_bar(port), reg, &mut b).unwrap();
        b[0]
    }

    /// Writes `bytes` to the port's transmitter, which mtty loops back into its receive FIFO.
    fn send(dev: &iommufd::BoundDevice, port: u8, bytes: &[u8]) {
        for &b in bytes {
            put(dev, port, UART_RX_TX, b);
        }
    }

    /// Drains the port's receive FIFO.
    fn receive(dev: &iommufd::BoundDevice, port: u8) -> Vec<u8> {
        let mut out = Vec::new();
        while get(dev, port, UART_LSR) & LSR_DATA_READY != 0 {
            out.push(get(dev, port, UART_RX_TX));
            assert!(out.len() <= 16, "the FIFO holds 16 bytes");
        }
        out
    }

    #[test]
    #[ignore = "needs the mtty/mbochs mdev samples and /dev/iommu: run by cargo xtask vm-test"]
    fn mtty_uses_the_emulated_access_path_and_a_singleton_vfio_group() {
        let mdev = Mdev::create("mtty", "mtty-1");
        let fd = Iommufd::open().unwrap();
        let dev = mdev.bind(&fd);
        assert_eq!(dev.name(), Some(mdev.uuid.as_str()), "the cdev's device is the mdev, named by its UUID");
        let info = dev.info().unwrap();
        assert!(info.flags.contains(iommufd::DeviceFlags::PCI), "{info:?}");

        // No IOMMU translates for an mdev: VFIO gives it a group of its own, named vfio-noiommu,
        // holding only the mdev (its driver is the mdev driver, mtty).
        let group = dev.group().unwrap();
        assert!(group.is_singleton() && group.all_bound_here(), "{group:?}");
        assert_eq!(group.devices[0].name, mdev.uuid);
        assert_eq!(group.devices[0].driver.as_deref(), Some("mtty"));
        let name =
            std::fs::read_to_string(format!("/sys/kernel/iommu_groups/{}/name", group.number)).unwrap();
        assert_eq!(name.trim(), "vfio-noiommu");

        // The device id names an iommufd access object, not an IOMMU-backed device: no hardware info.
        let e = dev.hw_info().unwrap_err();
        assert_eq!(e.errno(), Some(Errno::NOENT), "{e}");

        // The emulated path attaches to an IOAS (mappings are then reachable through the access)...
        let ioas = fd.alloc_ioas().unwrap();
        let attachment = dev.attach(&ioas).unwrap();
        assert_eq!(attachment.pt_id(), ioas.id());
        let mapping =
            ioas.map(DmaBuffer::new(4096).unwrap(), Iova::Fixed(0x10_0000), Access::READ_WRITE).unwrap();
        mapping.unmap().unwrap().expect("not shared");
        attachment.detach().unwrap();
        // ...but not to a HWPT, which only IOMMU-backed devices can use: the id is looked up as an IOAS.
        let edu = common::bind(&fd);
        let hwpt = Hwpt::alloc(&edu, &ioas, HwptFlags::empty()).unwrap();
        let e = dev.attach(&hwpt).unwrap_err();
        assert_eq!(e.errno(), Some(Errno::NOENT), "{e}");
        drop(dev);
    }

    #[test]
    #[ignore = "needs the mtty/mbochs mdev samples and /dev/iommu: run by cargo xtask vm-test"]
    fn mtty_state_migrates_into_a_second_instance() {
        let (src_mdev, dst_mdev) = (Mdev::create("mtty", "mtty-2"), Mdev::create("mtty", "mtty-2"));
        let fd = Iommufd::open().unwrap();
        let (src, dst) = (src_mdev.bind(&fd), dst_mdev.bind(&fd));
        let flags = src.migration_flags().unwrap();
        assert_eq!(flags, MigrationFlags::STOP_COPY | MigrationFlags::P2P | MigrationFlags::PRE_COPY);
        // The migration features as the feature probe sees them on a real migration driver.
        for (feature, ops) in [
            (DeviceFeature::MIGRATION, FeatureOps::GET),
            (DeviceFeature::MIG_DEVICE_STATE, FeatureOps::GET | FeatureOps::SET),
            (DeviceFeature::MIG_DATA_SIZE, FeatureOps::GET),
        ] {
            assert_eq!(src.feature_probe(feature).unwrap(), ops, "{feature:?}");
        }
        // Version 2 of the pre-copy query came after 6.19: older kernels do not know the feature.
        let v2 = if common::predates("6.19") { FeatureOps::empty() } else { FeatureOps::SET };
        assert_eq!(src.feature_probe(DeviceFeature::MIG_PRECOPY_INFO_V2).unwrap(), v2);
        assert_eq!(src.migration_state().unwrap(), MigState::Running);
        assert_eq!(dst.migration_state().unwrap(), MigState::Running);

        // State in both ports: bytes in the receive FIFOs and the scratch register.
        send(&src, 0, b"hello");
        send(&src, 1, b"xy");
        put(&src, 0, UART_SCR, 0x5a);
        assert!(receive(&dst, 0).is_empty() && get(&dst, 0, UART_SCR) == 0, "the destination starts empty");

        let size = src.stop_copy_size().unwrap();
        assert_eq!(size, (MTTY_HEADER + 2 * MTTY_PORT) as u64);
        assert_eq!(
            src.migration_path(MigState::StopCopy).unwrap(),
            [MigState::RunningP2p, MigState::Stop, MigState::StopCopy]
        );
        assert!(
            src.set_migration_state(MigState::Stop).unwrap().is_none(),
            "RUNNING -> STOP opens no session"
        );
        let mut save =
            src.set_migration_state(MigState::StopCopy).unwrap().expect("STOP -> STOP_COPY opens a session");
        assert_eq!(save.direction(), DataDirection::Save);
        assert_eq!(save.write(b"x").unwrap_err().kind(), std::io::ErrorKind::Unsupported);
        let mut stream = Vec::new();
        save.read_to_end(&mut stream).unwrap();
        assert_eq!(stream.len() as u64, size, "the stream is as long as MIG_DATA_SIZE said");
        assert_eq!(u64::from_ne_bytes(stream[..8].try_into().unwrap()), MTTY_MAGIC);

        // The destination goes RUNNING -> RUNNING_P2P -> STOP -> RESUMING in one call.
        assert_eq!(dst.migration_path(MigState::Resuming).unwrap().len(), 3);
        let mut resume =
            dst.set_migration_state(MigState::Resuming).unwrap().expect("RESUMING opens a session");
        assert_eq!(resume.direction(), DataDirection::Resume);
        assert_eq!(resume.read(&mut [0u8; 4]).unwrap_err().kind(), std::io::ErrorKind::Unsupported);
        resume.write_all(&stream).unwrap();
        assert!(dst.set_migration_state(MigState::Running).unwrap().is_none());
        assert_eq!(dst.migration_state().unwrap(), MigState::Running);
        drop(resume);

        assert_eq!(receive(&dst, 0), b"hello");
        assert_eq!(receive(&dst, 1), b"xy");
        assert_eq!(get(&dst, 0, UART_SCR), 0x5a);

        // Reading the state out consumed nothing on the source, which runs on as before.
        drop(save);
        assert!(src.set_migration_state(MigState::Running).unwrap().is_none());
        assert_eq!(receive(&src, 0), b"hello");
        drop((src, dst));
    }

    #[test]
    #[ignore = "needs the mtty/mbochs mdev samples and /dev/iommu: run by cargo xtask vm-test"]
    fn mtty_pre_copy_streams_the_header_then_stop_copy_the_ports() {
        let (src_mdev, dst_mdev) = (Mdev::create("mtty", "mtty-1"), Mdev::create("mtty", "mtty-1"));
        let fd = Iommufd::open().unwrap();
        let (src, dst) = (src_mdev.bind(&fd), dst_mdev.bind(&fd));
        let v2 = src.enable_precopy_info_v2();
        if !common::unsupported_here(&v2, "VFIO_DEVICE_FEATURE_MIG_PRECOPY_INFOv2", "7.0", Errno::NOTTY) {
            v2.unwrap();
        }
        send(&src, 0, b"abc");

        let mut save =
            src.set_migration_state(MigState::PreCopy).unwrap().expect("RUNNING -> PRE_COPY opens a session");
        let info = save.precopy_info().unwrap();
        assert_eq!((info.initial_bytes, info.dirty_bytes, info.reinit), (MTTY_HEADER as u64, 0, false));
        let mut stream = Vec::new();
        assert_eq!(save.read_available(&mut stream).unwrap(), MTTY_HEADER);
        assert_eq!(save.precopy_info().unwrap().initial_bytes, 0);

        // Moving inside the saving group keeps the session: no new fd.
        assert!(src.set_migration_state(MigState::PreCopyP2p).unwrap().is_none());
        assert_eq!(save.precopy_info().unwrap().initial_bytes, 0);
        assert_eq!(src.migration_path(MigState::StopCopy).unwrap(), [MigState::StopCopy]);
        assert!(src.set_migration_state(MigState::StopCopy).unwrap().is_none());
        // The pre-copy query belongs to the pre-copy states.
        let e = save.precopy_info().unwrap_err();
        assert_eq!(e.errno(), Some(Errno::INVAL), "{e}");
        assert_eq!(save.read_available(&mut stream).unwrap(), MTTY_PORT);
        assert_eq!(stream.len() as u64, src.stop_copy_size().unwrap());

        let mut resume = dst.set_migration_state(MigState::Resuming).unwrap().unwrap();
        resume.write_all(&stream).unwrap();
        assert!(dst.set_migration_state(MigState::Running).unwrap().is_none());
        assert_eq!(receive(&dst, 0), b"abc");
        drop((save, resume, src, dst));
    }

    #[test]
    #[ignore = "needs the mtty/mbochs mdev samples and /dev/iommu: run by cargo xtask vm-test"]
    fn mtty_invalid_and_failed_transitions() {
        let mdev = Mdev::create("mtty", "mtty-1");
        let fd = Iommufd::open().unwrap();
        let dev = mdev.bind(&fd);

        // Already there: nothing to do, no session.
        assert!(dev.set_migration_state(MigState::Running).unwrap().is_none());
        // Refused by the crate before the transition ioctl (the kernel's refusal would be an Ioctl
        // error), and the device stays where it was.
        let e = dev.set_migration_state(MigState::Error).unwrap_err();
        assert!(matches!(e, Error::InvalidArgument { .. }), "{e}");
        let save = dev.set_migration_state(MigState::StopCopy).unwrap().unwrap();
        for to in [MigState::PreCopy, MigState::PreCopyP2p] {
            let e = dev.set_migration_state(to).unwrap_err();
            assert!(
                matches!(e, Error::InvalidArgument { .. }) && e.to_string().contains("not permitted"),
                "{e}"
            );
            assert!(matches!(dev.migration_path(to), Err(Error::InvalidArgument { .. })));
        }
        assert_eq!(dev.migration_state().unwrap(), MigState::StopCopy);
        drop(save);

        // A resume with a truncated stream: the driver refuses RESUMING -> STOP and stays in RESUMING.
        let mut resume = dev.set_migration_state(MigState::Resuming).unwrap().unwrap();
        let mut header = Vec::from(MTTY_MAGIC.to_ne_bytes());
        header.extend([1, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0]);
        resume.write_all(&header).unwrap();
        let e = dev.set_migration_state(MigState::Running).unwrap_err();
        assert!(matches!(e, Error::Ioctl { errno: Errno::INVAL, hint: Some(_), .. }), "{e}");
        assert_eq!(dev.migration_state().unwrap(), MigState::Resuming);
        // A reset returns the device to RUNNING.
        dev.reset().unwrap();
        assert_eq!(dev.migration_state().unwrap(), MigState::Running);
        drop(resume);

        // vfio-pci without a variant driver has no migration: named after the feature, with a hint.
        let edu = common::bind(&fd);
        let e = edu.migration_flags().unwrap_err();
        assert!(
            matches!(
                e,
                Error::Ioctl { op: "VFIO_DEVICE_FEATURE_MIGRATION", errno: Errno::NOTTY, hint: Some(_) }
            ),
            "{e}"
        );
        let e = edu.set_migration_state(MigState::Stop).unwrap_err();
        assert_eq!(e.errno(), Some(Errno::NOTTY), "{e}");
        let e = edu.stop_copy_size().unwrap_err();
        assert!(matches!(e, Error::Ioctl { op: "VFIO_DEVICE_FEATURE_MIG_DATA_SIZE", .. }), "{e}");
        drop(dev);
    }

    /// The peer-to-peer quiescent states: single arcs, and a saving session opened from `RUNNING_P2P`.
    #[test]
    #[ignore = "needs the mtty/mbochs mdev samples and /dev/iommu: run by cargo xtask vm-test"]
    fn mtty_p2p_states_and_a_session_opened_from_them() {
        let mdev = Mdev::create("mtty", "mtty-1");
        let fd = Iommufd::open().unwrap();
        let dev = mdev.bind(&fd);
        send(&dev, 0, b"p2p");
        assert_eq!(dev.migration_path(MigState::RunningP2p).unwrap(), [MigState::RunningP2p]);
        assert!(dev.set_migration_state(MigState::RunningP2p).unwrap().is_none());
        assert_eq!(dev.migration_state().unwrap(), MigState::RunningP2p);
        let mut save = dev
            .set_migration_state(MigState::PreCopyP2p)
            .unwrap()
            .expect("RUNNING_P2P -> PRE_COPY_P2P opens a session");
        assert_eq!(save.precopy_info().unwrap().initial_bytes, MTTY_HEADER as u64);
        // PRE_COPY_P2P -> PRE_COPY -> RUNNING: back inside the group, then out of it, ending the session.
        assert!(dev.set_migration_state(MigState::PreCopy).unwrap().is_none());
        assert_eq!(
            dev.migration_path(MigState::Stop).unwrap(),
            [MigState::Running, MigState::RunningP2p, MigState::Stop]
        );
        assert!(dev.set_migration_state(MigState::Running).unwrap().is_none());
        let e = save.precopy_info().unwrap_err();
        assert_eq!(e.errno(), Some(Errno::INVAL), "{e}");
        let mut rest = Vec::new();
        let e = save.read_available(&mut rest).unwrap_err();
        assert_eq!(e.errno(), Some(Errno::NODEV), "an ended session reads nothing more: {e}");
        // The device ran through all of it untouched.
        assert_eq!(receive(&dev, 0), b"p2p");
        drop((save, dev));
    }

    /// A `fork()`ed child shares the session's fd: reading there would take the parent's stream.
    #[test]
    #[ignore = "needs the mtty/mbochs mdev samples and /dev/iommu: run by cargo xtask vm-test"]
    fn mtty_session_is_refused_in_a_forked_child() {
        let mdev = Mdev::create("mtty", "mtty-1");
        let fd = Iommufd::open().unwrap();
        let dev = mdev.bind(&fd);
        let mut save = dev.set_migration_state(MigState::StopCopy).unwrap().unwrap();
        let code = common::in_child(|| {
            let mut code = 0;
            let foreign = |e: &std::io::Error| {
                matches!(
                    e.get_ref().and_then(|i| i.downcast_ref::<Error>()),
                    Some(Error::ForeignProcess { .. })
                )
            };
            if !(&save).read(&mut [0u8; 8]).is_err_and(|e| foreign(&e)) {
                code |= 1;
            }
            if !matches!(save.read_available(&mut Vec::new()), Err(Error::ForeignProcess { .. })) {
                code |= 2;
            }
            if !matches!(dev.set_migration_state(MigState::Running), Err(Error::ForeignProcess { .. })) {
                code |= 4;
            }
            code
        });
        assert_eq!(code, 0, "child checks failed (bits: 1 read, 2 read_available, 4 set state)");
        // The child took nothing: the whole state is still there for the parent.
        let mut stream = Vec::new();
        save.read_to_end(&mut stream).unwrap();
        assert_eq!(stream.len(), MTTY_HEADER + MTTY_PORT);
        assert_eq!(dev.migration_state().unwrap(), MigState::StopCopy);
        drop((save, dev));
    }

    // The bochs display interface of mbochs: 16-bit registers in BAR2 at 0x500 + 2 * index.
    const VBE_ID: u64 = 0;
    const VBE_XRES: u64 = 1;
    const VBE_YRES: u64 = 2;
    const VBE_BPP: u64 = 3;
    const VBE_ENABLE: u64 = 4;
    const VBE_ID5: u16 = 0xb0c5;
    /// `DRM_FORMAT_XRGB8888`, the fourcc "XR24".
    const XRGB8888: u32 = u32::from_le_bytes(*b"XR24");
    /// mbochs's EDID region, the one after the PCI regions.
    const MBOCHS_EDID_REGION: u32 = 9;

    fn vbe_write(dev: &iommufd::BoundDevice, index: u64, value: u16) {
        dev.write_region(PciRegion::Bar(2).index(), 0x500 + 2 * index, &value.to_le_bytes()).unwrap();
    }

    fn vbe_read(dev: &iommufd::BoundDevice, index: u64) -> u16 {
        let mut b = [0u8; 2];
        dev.read_region(PciRegion::Bar(2).index(), 0x500 + 2 * index, &mut b).unwrap();
        u16::from_le_bytes(b)
    }

    #[test]
    #[ignore = "needs the mtty/mbochs mdev samples and /dev/iommu: run by cargo xtask vm-test"]
    fn mbochs_exports_its_framebuffer_as_a_dmabuf_plane() {
        let mdev = Mdev::create("mbochs", "mbochs-small");
        let fd = Iommufd::open().unwrap();
        let dev = mdev.bind(&fd);
        assert!(dev.gfx_plane_supported(GfxPlaneKind::DmaBuf).unwrap());
        assert!(!dev.gfx_plane_supported(GfxPlaneKind::Region).unwrap());
        let edid = dev.region_info(MBOCHS_EDID_REGION).unwrap();
        assert_eq!(
            edid.region_type,
            Some(RegionType {
                kind: iommufd::sys::VFIO_REGION_TYPE_GFX,
                subtype: iommufd::sys::VFIO_REGION_SUBTYPE_GFX_EDID
            })
        );
        // No display mode yet: no plane.
        assert_eq!(dev.query_gfx_plane(GfxPlaneKind::DmaBuf, GfxPlane::PRIMARY).unwrap(), None);

        // Set 640x480x32 through the dispi registers.
        let (width, height) = (640u32, 480u32);
        let size = (width * height * 4) as usize;
        assert_eq!(vbe_read(&dev, VBE_ID), VBE_ID5);
        vbe_write(&dev, VBE_XRES, width as u16);
        vbe_write(&dev, VBE_YRES, height as u16);
        vbe_write(&dev, VBE_BPP, 32);
        vbe_write(&dev, VBE_ENABLE, 1);

        // The 7.3 sample creates the plane's buffer on the first query of a new mode but answers that
        // query ENOMEM; the next one reports the plane.
        let e = dev.query_gfx_plane(GfxPlaneKind::DmaBuf, GfxPlane::PRIMARY).unwrap_err();
        assert_eq!(e.errno(), Some(Errno::NOMEM), "{e}");
        let plane = dev.query_gfx_plane(GfxPlaneKind::DmaBuf, GfxPlane::PRIMARY).unwrap().expect("a plane");
        assert_eq!(
            (plane.drm_plane_type, plane.drm_format, plane.width, plane.height, plane.stride, plane.size),
            (GfxPlane::PRIMARY, XRGB8888, width, height, width * 4, size as u32)
        );
        assert_eq!(dev.query_gfx_plane(GfxPlaneKind::DmaBuf, GfxPlane::CURSOR).unwrap(), None);

        // The plane's dma-buf, exported by mbochs with the plane's size (the sample exports it as a
        // read-only file, so it cannot be mapped shared here to compare pixels).
        let buf = dev.gfx_dmabuf(plane.id).unwrap();
        assert!(rustix::io::fcntl_getfd(&buf).unwrap().contains(rustix::io::FdFlags::CLOEXEC));
        assert_eq!(rustix::fs::seek(&buf, rustix::fs::SeekFrom::End(0)).unwrap(), size as u64);
        let fdinfo = std::fs::read_to_string(format!("/proc/self/fdinfo/{}", buf.as_raw_fd())).unwrap();
        assert!(fdinfo.lines().any(|l| l.split_whitespace().eq(["exp_name:", "mbochs"])), "{fdinfo}");
        assert!(fdinfo.lines().any(|l| l.split_whitespace().eq(["size:", &size.to_string()])), "{fdinfo}");

        // Each mode has its own buffer and id: a new mode gets a new one (after the same ENOMEM), and
        // the first mode, shown again, finds its buffer at once.
        vbe_write(&dev, VBE_XRES, 800);
        vbe_write(&dev, VBE_YRES, 600);
        let e = dev.query_gfx_plane(GfxPlaneKind::DmaBuf, GfxPlane::PRIMARY).unwrap_err();
        assert_eq!(e.errno(), Some(Errno::NOMEM), "{e}");
        let large = dev.query_gfx_plane(GfxPlaneKind::DmaBuf, GfxPlane::PRIMARY).unwrap().unwrap();
        assert_eq!((large.width, large.height, large.stride), (800, 600, 3200));
        assert_ne!(large.id, plane.id);
        vbe_write(&dev, VBE_XRES, width as u16);
        vbe_write(&dev, VBE_YRES, height as u16);
        assert_eq!(
            dev.query_gfx_plane(GfxPlaneKind::DmaBuf, GfxPlane::PRIMARY).unwrap(),
            Some(plane.clone())
        );

        let e = dev.gfx_dmabuf(plane.id + 100).unwrap_err();
        assert_eq!(e.errno(), Some(Errno::NOENT), "{e}");
        // Display off: no plane again.
        vbe_write(&dev, VBE_ENABLE, 0);
        assert_eq!(dev.query_gfx_plane(GfxPlaneKind::DmaBuf, GfxPlane::PRIMARY).unwrap(), None);
        drop((buf, dev));
    }
}
