//! RAII: build device + attachment + mapping + HWPT + IOAS, drop them in every order, and check that
//! no kernel object remains (the old ids give ENOENT on destroy) and no fd leaked.

mod common;

use common::{bind, fd_count};
use iommufd::{Access, DmaBuffer, Errno, Hwpt, HwptFlags, Iommufd, Iova};

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
        let map =
            ioas.map(DmaBuffer::new(4096).unwrap(), Iova::Fixed(0x10_0000), Access::READ_WRITE).unwrap();
        let ids = [("device", dev.dev_id()), ("IOAS", ioas.id()), ("HWPT", hwpt.id())];
        let mut slots: [Option<Box<dyn std::any::Any>>; 5] = [
            Some(Box::new(dev)),
            Some(Box::new(att)),
            Some(Box::new(map)),
            Some(Box::new(hwpt)),
            Some(Box::new(ioas)),
        ];
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
    let map = ioas.map(DmaBuffer::new(4096).unwrap(), Iova::Auto, Access::READ).unwrap();
    let (ioas_id, hwpt_id, dev_id) = (ioas.id(), hwpt.id(), dev.dev_id());
    // Parents refuse to go first, before any ioctl.
    let refused = ioas.clone().destroy().unwrap_err();
    assert!(matches!(refused.error(), iommufd::Error::InUse { .. }));
    assert_eq!(refused.into_inner().id(), ioas_id, "the refused handle comes back");
    let dev2 = dev.clone();
    assert!(matches!(dev2.close(), Err(iommufd::Error::InUse { .. })));
    map.unmap().unwrap().unwrap();
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
