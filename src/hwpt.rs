//! [`Hwpt`]: a hardware page table allocated on an IOAS, and the [`PageTable`] trait for attach targets.

use std::os::fd::AsFd;
use std::sync::Arc;

use iommufd_sys as sys;

use crate::device::IommuDevice;
use crate::error::{Error, Result};
use crate::ioas::{Ioas, IoasInner};
use crate::ioctl::{self, Sized32};
use crate::iommufd::Iommufd;
use crate::object::Object;

bitflags::bitflags! {
    /// Flags for [`Hwpt::alloc`] (`IOMMU_HWPT_ALLOC_*`).
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
    pub struct HwptFlags: u32 {
        /// The page table may serve as the parent (stage 2) of nested page tables.
        const NEST_PARENT = sys::IOMMU_HWPT_ALLOC_NEST_PARENT;
        /// Allocate with dirty tracking support (enable it later with set_dirty_tracking).
        const DIRTY_TRACKING = sys::IOMMU_HWPT_ALLOC_DIRTY_TRACKING;
        /// The page table may be attached to PASIDs as well as to the whole device.
        const PASID = sys::IOMMU_HWPT_ALLOC_PASID;
        // Bits the kernel knows and this crate does not yet name survive round trips.
        const _ = !0;
    }
}

pub(crate) struct HwptInner {
    pub(crate) obj: Object,
    /// The IOAS this paging page table translates; kept alive as long as the HWPT.
    _ioas: Arc<IoasInner>,
    flags: HwptFlags,
}

/// A paging hardware page table: an IOMMU domain built from an IOAS's mappings, with explicit flags.
///
/// Attaching a device to an [`Ioas`] lets the kernel pick or share a domain; allocating a `Hwpt`
/// instead lets the device's owner choose nest-parent, dirty tracking or PASID capability. The HWPT
/// keeps its IOAS alive; attachments keep the HWPT alive. Cloning shares the kernel object.
#[derive(Clone)]
pub struct Hwpt {
    pub(crate) inner: Arc<HwptInner>,
}

impl std::fmt::Debug for Hwpt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hwpt").field("id", &self.id()).field("flags", &self.inner.flags).finish()
    }
}

impl Hwpt {
    /// Allocates a paging page table for `device` on `ioas` (`IOMMU_HWPT_ALLOC`, Linux 6.6).
    ///
    /// Flags the IOMMU cannot honour are answered by the kernel with `EOPNOTSUPP`
    /// ([`Error::is_unsupported`]); for example Intel VT-d without second-stage dirty bits rejects
    /// [`HwptFlags::DIRTY_TRACKING`].
    pub fn alloc(device: &impl IommuDevice, ioas: &Ioas, flags: HwptFlags) -> Result<Hwpt> {
        const OP: &str = "IOMMU_HWPT_ALLOC";
        device.iommufd().check_same(ioas.iommufd(), OP)?;
        let mut arg = sys::iommu_hwpt_alloc::new();
        arg.flags = flags.bits();
        arg.dev_id = device.dev_id();
        arg.pt_id = ioas.id();
        arg.data_type = sys::IOMMU_HWPT_DATA_NONE;
        // SAFETY: IOMMU_HWPT_ALLOC takes `iommu_hwpt_alloc`, sized by `new()`; `data_uptr` is null with
        // `data_len` 0 (no driver data for a paging table), so the kernel reads no user memory.
        unsafe { ioctl::call(ioas.iommufd().as_fd(), &ioctl::HWPT_ALLOC, &mut arg) }?;
        Ok(Hwpt {
            inner: Arc::new(HwptInner {
                obj: Object::new(ioas.iommufd(), arg.out_hwpt_id, "HWPT"),
                _ioas: ioas.inner.clone(),
                flags,
            }),
        })
    }

    /// The kernel's id for this page table.
    pub fn id(&self) -> u32 {
        self.inner.obj.id()
    }

    /// The flags it was allocated with (the kernel accepted all of them).
    pub fn flags(&self) -> HwptFlags {
        self.inner.flags
    }

    /// The iommufd it belongs to.
    pub fn iommufd(&self) -> &Iommufd {
        self.inner.obj.iommufd()
    }

    /// Destroys the page table now, reporting failure; refused with [`Error::InUse`] while clones or
    /// attachments still refer to it.
    pub fn destroy(self) -> Result<()> {
        match Arc::try_unwrap(self.inner) {
            Ok(inner) => inner.obj.destroy(),
            Err(inner) => Err(Error::InUse { op: "IOMMU_DESTROY", users: Arc::strong_count(&inner) - 1 }),
        }
    }
}

/// What an attachment keeps alive: the page table it points the device at.
#[doc(hidden)]
#[derive(Clone)]
pub struct PtRef(PtKind);

#[derive(Clone)]
enum PtKind {
    Ioas(Arc<IoasInner>),
    Hwpt(Arc<HwptInner>),
}

impl PtRef {
    pub(crate) fn id(&self) -> u32 {
        match &self.0 {
            PtKind::Ioas(i) => i.id(),
            PtKind::Hwpt(h) => h.obj.id(),
        }
    }

    pub(crate) fn iommufd(&self) -> &Iommufd {
        match &self.0 {
            PtKind::Ioas(i) => i.iommufd(),
            PtKind::Hwpt(h) => h.obj.iommufd(),
        }
    }
}

mod sealed {
    pub trait Sealed {}
}

/// Something a device can be attached to: an [`Ioas`] (the kernel picks or shares a domain) or a
/// [`Hwpt`].
pub trait PageTable: sealed::Sealed {
    /// The object id passed to the kernel as `pt_id`.
    fn pt_id(&self) -> u32;
    #[doc(hidden)]
    fn pt_ref(&self) -> PtRef;
}

impl sealed::Sealed for Ioas {}
impl PageTable for Ioas {
    fn pt_id(&self) -> u32 {
        self.id()
    }
    fn pt_ref(&self) -> PtRef {
        PtRef(PtKind::Ioas(self.inner.clone()))
    }
}

impl sealed::Sealed for Hwpt {}
impl PageTable for Hwpt {
    fn pt_id(&self) -> u32 {
        self.id()
    }
    fn pt_ref(&self) -> PtRef {
        PtRef(PtKind::Hwpt(self.inner.clone()))
    }
}
