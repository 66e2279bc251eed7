//! RAII: build device + attachment + mapping + HWPT + IOAS, drop them in every order, and check that
//! no kernel object remains (the old ids give ENOENT on destroy) and no fd leaked.

mod common;

use std::os::fd::{AsRawFd, RawFd};

use common::{bind, busy, fd_count, gone, logs};
use iommufd::{Access, BoundDevice, DmaBuffer, Errno, Error, Hwpt, HwptFlags, Iommufd, Iova, VfioDevice};

fn permutations(n: usize) -> Vec<Vec<usize>> {
    if n == 0 {
        return vec![vec![]];
    }
    let mut out = Vec::new();
    for p in permutations(n - 1) {
        for i in 0..=p.len() {
            let mut q = p.clone();
            q.insert(i, n - 1);
            out.push(q);
        }
    }
    out
}

fn assert_gone(fd: &Iommufd, what: &str, id: u32) {
    // SAFETY: every handle that owned `id` has been dropped; a destroy must find nothing.
    let e = unsafe { fd.destroy_raw(id) }.expect_err(what);
    assert_eq!(e.errno(), Some(Errno::NOENT), "{what} {id} still exists: {e}");
}

#[test]
#[ignore = "needs /dev/iommu and a VFIO device: run by cargo xtask vm-test"]
fn drop_in_every_order_leaves_nothing_behind() {
    let fd = Iommufd::open().unwrap();
    let fds_before = fd_count();
    let orders = permutations(5);
    assert_eq!(orders.len(), 120);
    for order in &orders {
        let dev = bind(&fd);
        let ioas = fd.alloc_ioas().unwrap();
        let hwpt = Hwpt::alloc(&dev, &ioas, HwptFlags::empty()).unwrap();
        let att = dev.attach(&hwpt).unwrap();
        let map = ioas.map(DmaBuffer::new(4096).unwrap(), Iova::Fixed(0x10_0000), Access::READ_WRITE);
        let map: Option<Box<dyn std::any::Any>> = if common::allocated_hwpt_has_no_aperture() {
            // The kernel's limitation (see the helper): every order is still run, without a mapping.
            assert_eq!(map.unwrap_err().errno(), Some(Errno::INVAL), "6.12 virtio-iommu: no usable IOVA");
            None
        } else {
            Some(Box::new(map.unwrap()))
        };
        let ids = [("device", dev.dev_id()), ("IOAS", ioas.id()), ("HWPT", hwpt.id())];
        let mut slots: [Option<Box<dyn std::any::Any>>; 5] =
            [Some(Box::new(dev)), Some(Box::new(att)), map, Some(Box::new(hwpt)), Some(Box::new(ioas))];
        for &i in order {
            drop(slots[i].take());
        }
        for (what, id) in ids {
            assert_gone(&fd, what, id);
        }
        assert_eq!(fd_count(), fds_before, "fd leaked in order {order:?}");
    }
}

#[test]
#[ignore = "needs /dev/iommu and a VFIO device: run by cargo xtask vm-test"]
fn explicit_close_in_kernel_order() {
    let fd = Iommufd::open().unwrap();
    let fds_before = fd_count();
    let dev = bind(&fd);
    let ioas = fd.alloc_ioas().unwrap();
    let hwpt = Hwpt::alloc(&dev, &ioas, HwptFlags::empty()).unwrap();
    let att = dev.attach(&hwpt).unwrap();
    let map = ioas.map(DmaBuffer::new(4096).unwrap(), Iova::Auto, Access::READ);
    let map = if common::allocated_hwpt_has_no_aperture() {
        // The kernel's limitation (see the helper): the rest of the teardown order is still checked.
        assert_eq!(map.unwrap_err().errno(), Some(Errno::NOSPC), "6.12 virtio-iommu: no usable IOVA");
        None
    } else {
        Some(map.unwrap())
    };
    let (ioas_id, hwpt_id, dev_id) = (ioas.id(), hwpt.id(), dev.dev_id());
    // Parents refuse to go first, before any ioctl.
    let refused = ioas.clone().destroy().unwrap_err();
    assert!(matches!(refused.error(), iommufd::Error::InUse { .. }));
    assert_eq!(refused.into_inner().id(), ioas_id, "the refused handle comes back");
    let dev2 = dev.clone();
    assert!(matches!(dev2.close().map_err(iommufd::Error::from), Err(iommufd::Error::InUse { .. })));
    if let Some(map) = map {
        map.unmap().unwrap().unwrap();
    }
    att.detach().unwrap();
    hwpt.destroy().unwrap();
    ioas.destroy().unwrap();
    dev.close().unwrap();
    assert_gone(&fd, "IOAS", ioas_id);
    assert_gone(&fd, "HWPT", hwpt_id);
    assert_gone(&fd, "device", dev_id);
    assert_eq!(fd_count(), fds_before);
}

#[test]
#[ignore = "needs /dev/iommu: run by cargo xtask vm-test"]
fn forgetting_a_mapping_leaks_instead_of_freeing() {
    let fd = Iommufd::open().unwrap();
    let ioas = fd.alloc_ioas().unwrap();
    let m = ioas.map(DmaBuffer::new(4096).unwrap(), Iova::Fixed(0x10_0000), Access::READ_WRITE).unwrap();
    std::mem::forget(m);
    // The range stays mapped and owned: the crate refuses to unmap it behind the (forgotten) guard.
    assert!(matches!(ioas.unmap_all(), Err(iommufd::Error::InvalidArgument { .. })));
    // The range stays recorded as owned: a fixed map on top is refused before any ioctl.
    let e = ioas.map(DmaBuffer::new(4096).unwrap(), Iova::Fixed(0x10_0000), Access::READ).unwrap_err();
    assert!(matches!(e, iommufd::Error::InvalidArgument { .. }), "{e}");
}

/// Points a bound device's fd number at `/dev/null` (which answers every ioctl with `ENOTTY`) until
/// [`restore`](Self::restore), so that the next ioctl on the device fails in the kernel.
struct BrokenFd {
    number: RawFd,
    saved: RawFd,
}

impl BrokenFd {
    fn new(dev: &BoundDevice) -> BrokenFd {
        let number = dev.as_raw_fd();
        let null = std::fs::File::open("/dev/null").unwrap();
        // SAFETY: dup of an open fd, which creates a new fd owned here (closed by `restore`).
        let saved = unsafe { libc::dup(number) };
        assert!(saved >= 0);
        // SAFETY: the device keeps its fd number; its file stays open through `saved` and comes back
        // in `restore`. The test uses the device only for the call that is meant to fail meanwhile.
        assert_eq!(unsafe { libc::dup2(null.as_raw_fd(), number) }, number);
        BrokenFd { number, saved }
    }

    fn restore(self) {
        // SAFETY: puts the device's own file back under its fd number, then closes the extra fd this
        // value owns.
        unsafe {
            assert_eq!(libc::dup2(self.saved, self.number), self.number);
            libc::close(self.saved);
        }
    }
}

#[test]
#[ignore = "needs /dev/iommu and a VFIO device: run by cargo xtask vm-test"]
fn a_refused_close_or_failed_detach_hands_the_handle_back() {
    let fd = Iommufd::open().unwrap();
    let dev = bind(&fd);
    let dev_id = dev.dev_id();
    let ioas = fd.alloc_ioas().unwrap();
    let att = dev.attach(&ioas).unwrap();
    // The attachment holds the device: close is refused and the device comes back, still bound.
    let (e, dev) = dev.close().unwrap_err().into_parts();
    assert!(matches!(e, Error::InUse { users: 1, .. }), "{e}");
    // A detach the kernel fails: the attachment comes back and still owns its slot.
    let broken = BrokenFd::new(&dev);
    let (e, att) = att.detach().unwrap_err().into_parts();
    broken.restore();
    assert_eq!(e.errno(), Some(Errno::NOTTY), "{e}");
    assert!(matches!(dev.attach(&ioas), Err(Error::InvalidArgument { .. })), "the slot is still owned");
    // Both retries succeed.
    att.detach().unwrap();
    dev.close().unwrap();
    assert_gone(&fd, "device", dev_id);
    ioas.destroy().unwrap();
}

/// Attaches `dev` to a fresh HWPT on `ioas`, drops the HWPT's handle, then drops the attachment while
/// the device fd is broken: the detach fails (logged once), leaving an orphaned slot that holds the
/// HWPT. Returns the HWPT's id.
fn orphan_a_hwpt(dev: &BoundDevice, ioas: &iommufd::Ioas) -> u32 {
    let hwpt = Hwpt::alloc(dev, ioas, HwptFlags::empty()).unwrap();
    let hwpt_id = hwpt.id();
    let att = dev.attach(&hwpt).unwrap();
    drop(hwpt);
    logs::start();
    let broken = BrokenFd::new(dev);
    drop(att);
    broken.restore();
    let logged = logs::take();
    assert!(logged.len() == 1 && logged[0].contains("detaching device"), "{logged:?}");
    hwpt_id
}

#[test]
#[ignore = "needs /dev/iommu and a VFIO device: run by cargo xtask vm-test"]
fn a_failed_detach_on_drop_does_not_wedge_the_slot() {
    let fd = Iommufd::open().unwrap();
    let dev = bind(&fd);
    let ioas = fd.alloc_ioas().unwrap();
    let hwpt_id = orphan_a_hwpt(&dev, &ioas);
    // The kernel still has the device on the HWPT, so the HWPT was kept alive rather than destroyed.
    assert!(busy(&fd, hwpt_id), "the orphaned HWPT must stay alive while attached");
    // The slot is not wedged: attaching again replaces the orphaned HWPT in the kernel and releases it.
    let att = dev.attach(&ioas).unwrap();
    assert!(gone(&fd, hwpt_id), "the orphaned HWPT is released once replaced");
    assert_eq!(att.pt_id(), ioas.id());
    att.detach().unwrap();
    assert!(logs::take().is_empty());
}

#[test]
#[ignore = "needs /dev/iommu and a VFIO device: run by cargo xtask vm-test"]
fn an_orphaned_slot_is_released_when_the_device_closes() {
    let fd = Iommufd::open().unwrap();
    let dev = bind(&fd);
    let ioas = fd.alloc_ioas().unwrap();
    let hwpt_id = orphan_a_hwpt(&dev, &ioas);
    // Closing the cdev detaches the device in the kernel; then the orphaned HWPT is destroyed.
    dev.close().unwrap();
    assert!(gone(&fd, hwpt_id), "the orphaned HWPT leaked past the device");
    assert!(logs::take().is_empty());
    ioas.destroy().unwrap();
}

#[test]
#[ignore = "needs /dev/iommu and the edu device: run by cargo xtask vm-test"]
fn a_forked_child_leaves_the_parents_device_alone() {
    let fd = Iommufd::open().unwrap();
    let dev = VfioDevice::open_pci(&common::edu_address()).unwrap().bind(&fd).unwrap();
    let ioas = fd.alloc_ioas().unwrap();
    let att = dev.attach(&ioas).unwrap();
    let edu = common::Edu::new(&dev);
    let map = ioas.map(DmaBuffer::new(4096).unwrap(), Iova::Auto, Access::READ_WRITE).unwrap();
    let data = common::pattern(7, 256);
    map.write_at(0, &data).unwrap();
    edu.ram_to_device(map.iova(), 256);
    let efd = rustix::event::eventfd(0, rustix::event::EventfdFlags::CLOEXEC).unwrap();
    let ioeventfd = dev.ioeventfd(iommufd::PciRegion::Bar(0).index(), 4, 4, 1, &efd).unwrap();

    // SAFETY: the VM suite runs tests one at a time (--test-threads=1), so no other thread holds a
    // lock the child could need; the child only uses this crate's handles and then _exits.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork: {}", std::io::Error::last_os_error());
    if pid == 0 {
        let mut failed = 0;
        // Every explicit call that would change the parent's device is refused...
        let foreign = |e: &Error| matches!(e, Error::ForeignProcess { .. });
        if !dev.clone().close().is_err_and(|e| foreign(e.error())) {
            failed |= 1;
        }
        if !dev.reset().is_err_and(|e| foreign(&e)) || !dev.set_bus_master(false).is_err_and(|e| foreign(&e))
        {
            failed |= 2;
        }
        if !edu.bar.write_u32(0x80, 0).is_err_and(|e| foreign(&e))
            || !edu.bar.read_u32(0x00).is_err_and(|e| foreign(&e))
        {
            failed |= 4;
        }
        if !dev.attach(&ioas).is_err_and(|e| foreign(&e)) {
            failed |= 8;
        }
        // ...and handles that are dropped (or explicitly closed) leave it alone.
        match att.detach() {
            Err(e) if foreign(e.error()) => drop(e.into_inner()),
            _ => failed |= 16,
        }
        drop(ioeventfd);
        drop(edu);
        drop(dev);
        // SAFETY: ends the child without running the parent's test harness or destructors.
        unsafe { libc::_exit(failed) };
    }
    let mut status = 0;
    // SAFETY: waits for the child just forked; `status` is a valid out-pointer.
    assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
    // The parent's attachment still works: the device writes RAM through the IOMMU.
    map.write_at(0, &[0u8; 256]).unwrap();
    edu.device_to_ram(map.iova(), 256);
    let mut out = vec![0u8; 256];
    map.read_at(0, &mut out).unwrap();
    assert_eq!(out, data, "the device's DMA no longer reaches the mapping");
    assert!(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0, "child failed: status {status:#x}");
    // The ioeventfd is still registered: a duplicate is refused with EEXIST.
    let dup = dev.ioeventfd(iommufd::PciRegion::Bar(0).index(), 4, 4, 1, &efd).unwrap_err();
    assert_eq!(dup.errno(), Some(Errno::EXIST), "{dup}");
    drop(ioeventfd);
    att.detach().unwrap();
}
