//! The IOAS that iommufd's VFIO container compatibility layer uses ([`Iommufd::vfio_compat_ioas`]).

use std::os::fd::AsFd;

use iommufd_sys as sys;

use crate::error::{Errno, Result};
use crate::ioas::Ioas;
use crate::ioctl::{self, Sized32};
use crate::iommufd::Iommufd;

/// The compatibility IOAS of an [`Iommufd`] (`IOMMU_VFIO_IOAS`, Linux 6.2), from
/// [`Iommufd::vfio_compat_ioas`].
///
/// The legacy VFIO type1 ioctls (`VFIO_IOMMU_MAP_DMA` and friends, issued on an iommufd that serves as a
/// VFIO container, and VFIO groups attached to it) carry no IOAS id: they act on this one IOAS. When a
/// group is attached and none is set, the kernel creates one itself; [`get`](Self::get) reports its id.
/// Setting or clearing it destroys nothing, and a group already attached keeps the IOAS it got.
///
/// This crate issues no type1 ioctls. Raw ones on this iommufd's fd (for example a VFIO container
/// `VFIO_IOMMU_UNMAP_DMA`) act on the compatibility IOAS behind the [`Mapping`](crate::Mapping) guards
/// of this crate, like any raw ioctl on [`as_raw_fd`](std::os::fd::AsRawFd::as_raw_fd): keep ranges
/// owned by guards out of their reach.
#[derive(Debug, Clone, Copy)]
pub struct VfioCompatIoas<'a> {
    iommufd: &'a Iommufd,
}

impl Iommufd {
    /// The IOAS the VFIO container compatibility layer uses (`IOMMU_VFIO_IOAS`, Linux 6.2).
    pub fn vfio_compat_ioas(&self) -> VfioCompatIoas<'_> {
        VfioCompatIoas { iommufd: self }
    }
}

impl VfioCompatIoas<'_> {
    fn op(&self, op: u32, ioas_id: u32) -> Result<u32> {
        let mut arg = sys::iommu_vfio_ioas::new();
        arg.op = op as u16;
        arg.ioas_id = ioas_id;
        self.iommufd.check_process(ioctl::VFIO_IOAS.name)?;
        // SAFETY: IOMMU_VFIO_IOAS takes `iommu_vfio_ioas`, sized by `new()`, with no pointers; the
        // kernel writes `ioas_id` back (GET) through the exclusive borrow.
        unsafe { ioctl::call(self.iommufd.as_fd(), &ioctl::VFIO_IOAS, &mut arg) }?;
        Ok(arg.ioas_id)
    }

    /// The id of the compatibility IOAS, or `None` if there is none (never set, cleared, or destroyed;
    /// the kernel answers `ENODEV`). Compare with [`Ioas::id`]: the IOAS may also be one the kernel
    /// created for an attached VFIO group, which no handle of this crate owns.
    pub fn get(&self) -> Result<Option<u32>> {
        match self.op(sys::IOMMU_VFIO_IOAS_GET, 0) {
            Ok(id) => Ok(Some(id)),
            Err(e) if e.errno() == Some(Errno::NODEV) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Makes `ioas` the compatibility IOAS. The kernel keeps no reference: once `ioas` is destroyed,
    /// [`get`](Self::get) answers `None`.
    pub fn set(&self, ioas: &Ioas) -> Result<()> {
        self.iommufd.check_same(ioas.iommufd(), "IOMMU_VFIO_IOAS")?;
        self.op(sys::IOMMU_VFIO_IOAS_SET, ioas.id()).map(drop)
    }

    /// Unsets the compatibility IOAS (destroying nothing).
    pub fn clear(&self) -> Result<()> {
        self.op(sys::IOMMU_VFIO_IOAS_CLEAR, 0).map(drop)
    }
}
