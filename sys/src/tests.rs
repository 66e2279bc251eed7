//! Request numbers recomputed independently with `rustix::ioctl::opcode`, and struct sizes the kernel
//! checks against (`ucmd->user_size` minimums and the fixed VFIO argsz), as a C compiler reports them
//! for the same headers.

use super::*;
use rustix::ioctl::opcode;

fn io(nr: u32) -> u32 {
    opcode::none(b';', nr as u8) as u32
}

/// `_IO(';', nr)` for the host architecture, worked out from the kernel's `asm/ioctl.h` for each family
/// rather than from this crate's `_IOC`: the direction "none" sits above 8 bits of type, 8 of number
/// and the size field (14 bits generically; 13 on powerpc, mips and sparc, whose "none" is 1, not 0).
fn io_by_formula(nr: u32) -> u32 {
    let (none, size_bits) = if OTHER_ENCODING { (1u32, 13) } else { (0, 14) };
    none << (16 + size_bits) | u32::from(b';') << 8 | nr
}

/// Whether the host uses the powerpc/mips/sparc encoding rather than the generic one.
const OTHER_ENCODING: bool = cfg!(any(
    target_arch = "powerpc64",
    target_arch = "powerpc",
    target_arch = "mips64",
    target_arch = "mips64r6",
    target_arch = "mips",
    target_arch = "mips32r6",
    target_arch = "sparc64",
    target_arch = "sparc"
));

/// The direction bits of `_IO` on the host, to add to a number written as the generic encoding gives it.
const DIR_NONE: u32 = if OTHER_ENCODING { 0x2000_0000 } else { 0 };

#[test]
fn request_numbers_match_the_architecture_formula() {
    for (request, nr) in [
        (IOMMU_DESTROY, 0x80),
        (IOMMU_IOAS_ALLOC, 0x81),
        (IOMMU_IOAS_MAP, 0x85),
        (IOMMU_IOAS_NOIOMMU_GET_PA, 0x95),
        (VFIO_GET_API_VERSION, 0x64),
        (VFIO_DEVICE_BIND_IOMMUFD, 0x76),
        (VFIO_DEVICE_FEATURE, 0x75),
    ] {
        assert_eq!(request, io_by_formula(nr), "request number {nr:#x}");
        assert_eq!(request, io(nr), "rustix agrees for {nr:#x}");
    }
    #[cfg(target_arch = "x86_64")]
    assert_eq!(IOMMU_IOAS_ALLOC, 0x3b81);
    #[cfg(target_arch = "powerpc64")]
    assert_eq!(IOMMU_IOAS_ALLOC, 0x2000_3b81);
}

#[cfg(feature = "testing")]
#[test]
fn test_cmd_request_number() {
    assert_eq!(testing::IOMMU_TEST_CMD, io_by_formula(0xa0));
    assert_eq!(testing::IOMMU_TEST_CMD, io(0xa0));
}

#[test]
fn iommufd_request_numbers() {
    let table: [(u32, u32); 22] = [
        (IOMMU_DESTROY, IOMMUFD_CMD_DESTROY),
        (IOMMU_IOAS_ALLOC, IOMMUFD_CMD_IOAS_ALLOC),
        (IOMMU_IOAS_ALLOW_IOVAS, IOMMUFD_CMD_IOAS_ALLOW_IOVAS),
        (IOMMU_IOAS_COPY, IOMMUFD_CMD_IOAS_COPY),
        (IOMMU_IOAS_IOVA_RANGES, IOMMUFD_CMD_IOAS_IOVA_RANGES),
        (IOMMU_IOAS_MAP, IOMMUFD_CMD_IOAS_MAP),
        (IOMMU_IOAS_UNMAP, IOMMUFD_CMD_IOAS_UNMAP),
        (IOMMU_OPTION, IOMMUFD_CMD_OPTION),
        (IOMMU_VFIO_IOAS, IOMMUFD_CMD_VFIO_IOAS),
        (IOMMU_HWPT_ALLOC, IOMMUFD_CMD_HWPT_ALLOC),
        (IOMMU_GET_HW_INFO, IOMMUFD_CMD_GET_HW_INFO),
        (IOMMU_HWPT_SET_DIRTY_TRACKING, IOMMUFD_CMD_HWPT_SET_DIRTY_TRACKING),
        (IOMMU_HWPT_GET_DIRTY_BITMAP, IOMMUFD_CMD_HWPT_GET_DIRTY_BITMAP),
        (IOMMU_HWPT_INVALIDATE, IOMMUFD_CMD_HWPT_INVALIDATE),
        (IOMMU_FAULT_QUEUE_ALLOC, IOMMUFD_CMD_FAULT_QUEUE_ALLOC),
        (IOMMU_IOAS_MAP_FILE, IOMMUFD_CMD_IOAS_MAP_FILE),
        (IOMMU_VIOMMU_ALLOC, IOMMUFD_CMD_VIOMMU_ALLOC),
        (IOMMU_VDEVICE_ALLOC, IOMMUFD_CMD_VDEVICE_ALLOC),
        (IOMMU_IOAS_CHANGE_PROCESS, IOMMUFD_CMD_IOAS_CHANGE_PROCESS),
        (IOMMU_VEVENTQ_ALLOC, IOMMUFD_CMD_VEVENTQ_ALLOC),
        (IOMMU_HW_QUEUE_ALLOC, IOMMUFD_CMD_HW_QUEUE_ALLOC),
        (IOMMU_IOAS_NOIOMMU_GET_PA, IOMMUFD_CMD_IOAS_NOIOMMU_GET_PA),
    ];
    for (i, (request, cmd)) in table.iter().enumerate() {
        assert_eq!(*cmd, 0x80 + i as u32, "command numbers are dense from 0x80");
        assert_eq!(*request, io(*cmd), "request number for command {cmd:#x}");
    }
    // Values checked by hand against the C headers.
    assert_eq!(IOMMU_IOAS_MAP, DIR_NONE | 0x3b85);
    assert_eq!(IOMMU_IOAS_NOIOMMU_GET_PA, DIR_NONE | 0x3b95);
}

#[test]
fn vfio_device_request_numbers() {
    let base = VFIO_BASE;
    let table = [
        (VFIO_GET_API_VERSION, 0),
        (VFIO_CHECK_EXTENSION, 1),
        (VFIO_SET_IOMMU, 2),
        (VFIO_GROUP_GET_STATUS, 3),
        (VFIO_GROUP_SET_CONTAINER, 4),
        (VFIO_GROUP_UNSET_CONTAINER, 5),
        (VFIO_GROUP_GET_DEVICE_FD, 6),
        (VFIO_DEVICE_GET_INFO, 7),
        (VFIO_DEVICE_GET_REGION_INFO, 8),
        (VFIO_DEVICE_GET_IRQ_INFO, 9),
        (VFIO_DEVICE_SET_IRQS, 10),
        (VFIO_DEVICE_RESET, 11),
        (VFIO_DEVICE_GET_PCI_HOT_RESET_INFO, 12),
        (VFIO_DEVICE_PCI_HOT_RESET, 13),
        (VFIO_DEVICE_QUERY_GFX_PLANE, 14),
        (VFIO_DEVICE_GET_GFX_DMABUF, 15),
        (VFIO_DEVICE_IOEVENTFD, 16),
        (VFIO_DEVICE_FEATURE, 17),
        (VFIO_DEVICE_BIND_IOMMUFD, 18),
        (VFIO_DEVICE_ATTACH_IOMMUFD_PT, 19),
        (VFIO_DEVICE_DETACH_IOMMUFD_PT, 20),
        (VFIO_MIG_GET_PRECOPY_INFO, 21),
    ];
    for (request, offset) in table {
        assert_eq!(request, io(base + offset), "VFIO_BASE + {offset}");
    }
    assert_eq!(VFIO_DEVICE_BIND_IOMMUFD, DIR_NONE | 0x3b76);
    // Unique only per fd type: a device ioctl and a container ioctl share this number.
    assert_eq!(VFIO_DEVICE_BIND_IOMMUFD, VFIO_IOMMU_SPAPR_UNREGISTER_MEMORY);
}

#[test]
fn struct_sizes() {
    use core::mem::size_of;
    assert_eq!(size_of::<iommu_destroy>(), 8);
    assert_eq!(size_of::<iommu_ioas_alloc>(), 12);
    assert_eq!(size_of::<iommu_ioas_map>(), 40);
    assert_eq!(size_of::<iommu_ioas_map_file>(), 40);
    assert_eq!(size_of::<iommu_ioas_unmap>(), 24);
    assert_eq!(size_of::<iommu_ioas_copy>(), 40);
    assert_eq!(size_of::<iommu_ioas_iova_ranges>(), 32);
    assert_eq!(size_of::<iommu_iova_range>(), 16);
    assert_eq!(size_of::<iommu_option>(), 24);
    assert_eq!(size_of::<iommu_hwpt_alloc>(), 48);
    assert_eq!(size_of::<iommu_hw_info>(), 40);
    assert_eq!(size_of::<vfio_device_bind_iommufd>(), 24);
    assert_eq!(size_of::<vfio_device_attach_iommufd_pt>(), 16);
    assert_eq!(size_of::<vfio_device_detach_iommufd_pt>(), 12);
    assert_eq!(size_of::<vfio_device_info>(), 24);
    assert_eq!(size_of::<vfio_region_info>(), 32);
    assert_eq!(size_of::<vfio_irq_info>(), 16);
    assert_eq!(size_of::<vfio_irq_set>(), 20);
}
