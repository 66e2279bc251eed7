//! Smoke test of the kernel's mock IOMMU (`CONFIG_IOMMUFD_TEST`) through `IOMMU_TEST_CMD`: create a
//! mock device attached to an IOAS, map memory, and have the mock domain confirm the translation.
//!
//! `struct iommu_test_cmd` is not an installed uAPI header (it lives in the kernel source's
//! `drivers/iommu/iommufd/iommufd_test.h` and changes between kernels); this layout is that of the
//! test kernel, Linux 7.3.4.

mod common;

use std::os::fd::{AsFd, AsRawFd};

use iommufd::{Access, Errno, Iommufd, Iova, page_size};

/// `IOMMU_TEST_CMD` = `_IO(IOMMUFD_TYPE, IOMMUFD_CMD_BASE + 32)`.
const IOMMU_TEST_CMD: u32 = (iommufd::sys::IOMMUFD_TYPE as u32) << 8 | (0x80 + 32);
const OP_MOCK_DOMAIN: u32 = 2;
const OP_MD_CHECK_MAP: u32 = 3;
/// The mock domain's aperture (MOCK_APERTURE_START/LAST).
const APERTURE_START: u64 = 1 << 24;

#[repr(C)]
#[derive(Default)]
struct TestCmd {
    size: u32,
    op: u32,
    id: u32,
    reserved: u32,
    /// The union of per-op arguments, 56 bytes, 8-byte aligned.
    data: [u64; 7],
}

fn test_cmd(fd: &Iommufd, op: u32, id: u32, data: [u64; 7]) -> Result<TestCmd, Errno> {
    let mut cmd = TestCmd { size: std::mem::size_of::<TestCmd>() as u32, op, id, reserved: 0, data };
    // SAFETY: IOMMU_TEST_CMD takes `struct iommu_test_cmd`, whose 7.3.4 layout `TestCmd` reproduces
    // (72 bytes, checked below); for the ops used here the union holds only integers and, for
    // MD_CHECK_MAP, a user pointer to memory this test keeps mapped for the call.
    let r = unsafe { libc::ioctl(fd.as_fd().as_raw_fd(), IOMMU_TEST_CMD as _, &mut cmd as *mut TestCmd) };
    if r < 0 { Err(Errno::from_io_error(&std::io::Error::last_os_error()).unwrap()) } else { Ok(cmd) }
}

#[test]
#[ignore = "needs /dev/iommu with CONFIG_IOMMUFD_TEST: run by cargo xtask vm-test"]
fn mock_domain_attach_map_and_check() {
    assert_eq!(std::mem::size_of::<TestCmd>(), 72);
    assert_eq!(IOMMU_TEST_CMD, 0x3ba0);
    let fd = Iommufd::open().unwrap();
    let ioas = fd.alloc_ioas().unwrap();
    let out = test_cmd(&fd, OP_MOCK_DOMAIN, ioas.id(), [0; 7]).expect("IOMMU_TEST_OP_MOCK_DOMAIN");
    let stdev_id = out.data[0] as u32;
    let hwpt_id = (out.data[0] >> 32) as u32;
    let idev_id = out.data[1] as u32;
    assert!(stdev_id != 0 && hwpt_id != 0 && idev_id != 0);

    let len = 4 * page_size();
    // SAFETY: a fresh private anonymous mapping, unmapped only after the IOVA mapping is gone.
    let va = unsafe {
        rustix::mm::mmap_anonymous(
            std::ptr::null_mut(),
            len,
            rustix::mm::ProtFlags::READ | rustix::mm::ProtFlags::WRITE,
            rustix::mm::MapFlags::PRIVATE | rustix::mm::MapFlags::POPULATE,
        )
    }
    .unwrap();
    // SAFETY: `va..va+len` stays mapped until after `m` is unmapped; no Rust reference to it exists;
    // the mock device performs no DMA.
    let m =
        unsafe { ioas.map_user(va.cast(), len, Iova::Fixed(APERTURE_START), Access::READ_WRITE) }.unwrap();
    // The mock domain confirms IOVA -> the pages behind `va`.
    test_cmd(&fd, OP_MD_CHECK_MAP, hwpt_id, [m.iova(), len as u64, va as u64, 0, 0, 0, 0])
        .expect("MD_CHECK_MAP");
    // Checking against other memory fails: the check is real.
    let wrong = test_cmd(
        &fd,
        OP_MD_CHECK_MAP,
        hwpt_id,
        [m.iova(), len as u64, va as u64 + page_size() as u64, 0, 0, 0, 0],
    );
    assert_eq!(wrong.err(), Some(Errno::INVAL));
    m.unmap().unwrap();
    // Unmapped: the mock domain no longer translates the range.
    assert!(
        test_cmd(&fd, OP_MD_CHECK_MAP, hwpt_id, [APERTURE_START, len as u64, va as u64, 0, 0, 0, 0]).is_err()
    );
    // SAFETY: nothing refers to the memory any more.
    unsafe { rustix::mm::munmap(va, len) }.unwrap();
    // Destroying the mock device detaches it; its automatic domain goes with it.
    // SAFETY: the mock device is not owned by any handle of the crate.
    unsafe { fd.destroy_raw(stdev_id) }.unwrap();
    // SAFETY: as above; it must be gone.
    let e = unsafe { fd.destroy_raw(hwpt_id) }.unwrap_err();
    assert_eq!(e.errno(), Some(Errno::NOENT));
}
