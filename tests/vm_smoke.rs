//! Throwaway smoke test for the VM test bed (`cargo xtask vm-test`); to be replaced by the real suite.

use std::path::Path;

#[test]
#[ignore = "needs /dev/iommu: run by cargo xtask vm-test"]
fn dev_iommu_exists() {
    assert!(Path::new("/dev/iommu").exists(), "/dev/iommu is missing");
}

#[test]
#[ignore = "needs /dev/iommu: run by cargo xtask vm-test"]
fn vfio_device_cdev_opens_read_write() {
    let path = Path::new("/dev/vfio/devices/vfio0");
    assert!(path.exists(), "{} is missing", path.display());
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap_or_else(|e| panic!("opening {} O_RDWR: {e}", path.display()));
}
