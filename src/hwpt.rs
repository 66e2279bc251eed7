//! [`Hwpt`]: a hardware page table, either *paging* (built by the kernel from an IOAS's mappings) or
//! *nested* (a user-managed stage-1 table on top of a nest-parent), and the traits naming what a page
//! table hangs off: [`PageTable`] (attach targets), [`NestParent`] (parents of nested tables) and
//! [`FaultSource`] (where I/O page faults of a table are delivered).
//!
//! Nested allocation and cache invalidation live in `nested.rs`, dirty tracking in `dirty.rs`; both
//! extend [`Hwpt`] with more methods.

use std::any::Any;
use std::os::fd::AsFd;
use std::sync::Arc;

use iommufd_sys as sys;

use crate::device::IommuDevice;
use crate::error::{CloseError, Errno, Error, Result};
use crate::ioas::{Ioas, IoasInner};
use crate::ioctl::{self, Sized32};
use crate::iommufd::Iommufd;
use crate::object::Object;

bitflags::bitflags! {
    /// Flags for [`Hwpt::alloc`] and [`Hwpt::alloc_nested`] (`IOMMU_HWPT_ALLOC_*`).
    ///
    /// `IOMMU_HWPT_FAULT_ID_VALID` is not among them: it is set by passing a [`FaultSource`]
    /// ([`Hwpt::alloc_with_faults`], [`Hwpt::alloc_nested_with_faults`]), which also keeps the fault
    /// queue alive as long as the page table.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
    pub struct HwptFlags: u32 {
        /// The page table may serve as the parent (stage 2) of nested page tables (Linux 6.7).
        const NEST_PARENT = sys::IOMMU_HWPT_ALLOC_NEST_PARENT;
        /// Allocate with dirty tracking support; turn tracking on with
        /// [`Hwpt::set_dirty_tracking`] (Linux 6.7).
        const DIRTY_TRACKING = sys::IOMMU_HWPT_ALLOC_DIRTY_TRACKING;
        /// The page table may be attached to PASIDs as well as to the whole device (Linux 6.15; an
        /// older kernel gives [`Error::Unsupported`], checked before the ioctl).
        const PASID = sys::IOMMU_HWPT_ALLOC_PASID;
        // Bits the kernel knows and this crate does not yet name survive round trips.
        const _ = !0;
    }
}

/// Whether a [`Hwpt`] is a kernel-managed paging table or a user-managed nested one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum HwptKind {
    /// Built by the kernel from an IOAS's mappings (`IOMMUFD_OBJ_HWPT_PAGING`). Its parent is the IOAS.
    Paging,
    /// A user-managed (stage-1) table translated through a nest-parent paging HWPT or a vIOMMU
    /// (`IOMMUFD_OBJ_HWPT_NESTED`). Its parent is that HWPT or vIOMMU.
    Nested,
}

/// A reference to an iommufd object that keeps the object's handle alive: what a page table holds of
/// its nest parent or fault queue.
///
/// Other modules of this crate build one from their handle's `Arc` (for example a vIOMMU for
/// [`NestParent`], a fault queue for [`FaultSource`]); outside the crate it is opaque.
#[doc(hidden)]
#[derive(Clone)]
pub struct ObjRef {
    iommufd: Iommufd,
    id: u32,
    /// Dropped after the child's own `Object` (field order in `HwptInner`), so the kernel sees the
    /// child destroyed before the parent's handle can destroy the parent.
    _keep: Arc<dyn Any + Send + Sync>,
}

impl ObjRef {
    /// A reference to object `id` of `iommufd` that keeps `keep` (the object's owning handle) alive.
    pub(crate) fn new(iommufd: &Iommufd, id: u32, keep: Arc<dyn Any + Send + Sync>) -> ObjRef {
        ObjRef { iommufd: iommufd.clone(), id, _keep: keep }
    }

    pub(crate) fn id(&self) -> u32 {
        self.id
    }

    pub(crate) fn iommufd(&self) -> &Iommufd {
        &self.iommufd
    }
}

/// What a HWPT hangs off, kept alive as long as the HWPT.
enum Parent {
    /// A paging HWPT's IOAS.
    Ioas(Arc<IoasInner>),
    /// A nested HWPT's nest-parent HWPT or vIOMMU.
    Nest(ObjRef),
}

pub(crate) struct HwptInner {
    /// Declared first so it is dropped first: the HWPT is destroyed before its parent and fault queue
    /// are released.
    pub(crate) obj: Object,
    parent: Parent,
    /// The fault queue I/O page faults are delivered to, if any (`IOMMU_HWPT_FAULT_ID_VALID`).
    _faults: Option<ObjRef>,
    pub(crate) flags: HwptFlags,
}

impl HwptInner {
    pub(crate) fn kind(&self) -> HwptKind {
        match self.parent {
            Parent::Ioas(_) => HwptKind::Paging,
            Parent::Nest(_) => HwptKind::Nested,
        }
    }
}

/// A hardware page table (an IOMMU domain) with explicit flags.
///
/// A **paging** HWPT ([`Hwpt::alloc`]) is built by the kernel from an IOAS's mappings; attaching a
/// device to one instead of to the [`Ioas`] lets the device's owner choose nest-parent, dirty tracking
/// or PASID capability. A **nested** HWPT ([`Hwpt::alloc_nested`]) is a user-managed stage-1 table
/// (for example a guest's I/O page table) whose output is translated by a nest-parent HWPT.
///
/// Each HWPT keeps its parent alive (the IOAS of a paging table, the nest parent or vIOMMU of a nested
/// one) and attachments keep the HWPT alive, so the kernel always sees children destroyed first.
/// Cloning shares the kernel object.
#[derive(Clone)]
pub struct Hwpt {
    pub(crate) inner: Arc<HwptInner>,
}

impl std::fmt::Debug for Hwpt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hwpt")
            .field("id", &self.id())
            .field("kind", &self.kind())
            .field("parent_id", &self.parent_id())
            .field("flags", &self.inner.flags)
            .finish()
    }
}

/// Where an allocated HWPT hangs: the ioctl's `pt_id` plus what the new handle keeps alive.
pub(crate) struct AllocTarget {
    pub(crate) pt_id: u32,
    parent: Parent,
}

/// The data part of an `IOMMU_HWPT_ALLOC` call: `(data_type, data_uptr, data_len)`.
pub(crate) struct AllocData {
    pub(crate) data_type: u32,
    pub(crate) uptr: u64,
    pub(crate) len: u32,
}

pub(crate) const HWPT_ALLOC: &str = "IOMMU_HWPT_ALLOC";
/// The operations that name a newer flag of `IOMMU_HWPT_ALLOC` in their errors.
const ALLOC_PASID: &str = "IOMMU_HWPT_ALLOC (IOMMU_HWPT_ALLOC_PASID)";
const PAGING_FAULTS: &str = "IOMMU_HWPT_ALLOC (IOMMU_HWPT_FAULT_ID_VALID on a paging table)";

impl Hwpt {
    /// Allocates a paging page table for `device` on `ioas` (`IOMMU_HWPT_ALLOC`, Linux 6.6).
    ///
    /// Flags the IOMMU cannot honour are answered by the kernel with `EOPNOTSUPP`
    /// ([`Error::is_unsupported`]); for example Intel VT-d without second-stage dirty bits rejects
    /// [`HwptFlags::DIRTY_TRACKING`].
    pub fn alloc(device: &impl IommuDevice, ioas: &Ioas, flags: HwptFlags) -> Result<Hwpt> {
        Self::alloc_paging(device, ioas, flags, None)
    }

    /// Like [`alloc`](Self::alloc), and delivers the table's I/O page faults to `faults`
    /// (`IOMMU_HWPT_FAULT_ID_VALID`, on paging tables since Linux 6.13; an older kernel gives
    /// [`Error::Unsupported`], checked before the ioctl). The HWPT keeps the fault queue alive.
    ///
    /// The kernel refuses a fault queue on a [`HwptFlags::NEST_PARENT`] table (faults are reported
    /// by the nested tables), so that combination is rejected before the ioctl.
    pub fn alloc_with_faults(
        device: &impl IommuDevice,
        ioas: &Ioas,
        flags: HwptFlags,
        faults: &impl FaultSource,
    ) -> Result<Hwpt> {
        if flags.contains(HwptFlags::NEST_PARENT) {
            return Err(Error::invalid(
                HWPT_ALLOC,
                "a nest-parent page table cannot take a fault queue (give it to the nested tables)",
            ));
        }
        Self::alloc_paging(device, ioas, flags, Some(faults.fault_ref()))
    }

    fn alloc_paging(
        device: &impl IommuDevice,
        ioas: &Ioas,
        flags: HwptFlags,
        faults: Option<ObjRef>,
    ) -> Result<Hwpt> {
        device.iommufd().check_same(ioas.iommufd(), HWPT_ALLOC)?;
        if let Some(faults) = &faults {
            device.iommufd().check_same(faults.iommufd(), HWPT_ALLOC)?;
            let caps = device.iommufd().capabilities()?;
            // Before 6.13 the kernel refuses the flag on a paging table with EOPNOTSUPP, as an IOMMU
            // driver without fault support would.
            caps.require_field(caps.hwpt_paging_fault_id, PAGING_FAULTS, "6.13", Errno::OPNOTSUPP)?;
        }
        let target = AllocTarget { pt_id: ioas.id(), parent: Parent::Ioas(ioas.inner.clone()) };
        let data = AllocData { data_type: sys::IOMMU_HWPT_DATA_NONE, uptr: 0, len: 0 };
        // SAFETY: no driver data for a paging table: a null pointer with length 0.
        unsafe { Self::alloc_raw(device, target, &data, flags, faults) }
    }

    /// Issues `IOMMU_HWPT_ALLOC` and wraps the new object.
    ///
    /// # Safety
    ///
    /// `data.uptr` must be null with `data.len == 0`, or point at `data.len` readable bytes that stay
    /// alive and unmodified for the call.
    pub(crate) unsafe fn alloc_raw(
        device: &impl IommuDevice,
        target: AllocTarget,
        data: &AllocData,
        flags: HwptFlags,
        faults: Option<ObjRef>,
    ) -> Result<Hwpt> {
        let iommufd = device.iommufd();
        if flags.bits() & sys::IOMMU_HWPT_FAULT_ID_VALID != 0 {
            return Err(Error::invalid(
                HWPT_ALLOC,
                "IOMMU_HWPT_FAULT_ID_VALID is set by passing a fault queue, not as a flag",
            ));
        }
        if flags.contains(HwptFlags::PASID) {
            let caps = iommufd.capabilities()?;
            // An older kernel refuses the unknown flag with EOPNOTSUPP, as an IOMMU without PASID would.
            caps.require_field(caps.hwpt_alloc_pasid, ALLOC_PASID, "6.15", Errno::OPNOTSUPP)?;
        }
        let mut arg = sys::iommu_hwpt_alloc::new();
        arg.flags = flags.bits();
        if let Some(faults) = &faults {
            iommufd.check_same(faults.iommufd(), HWPT_ALLOC)?;
            arg.flags |= sys::IOMMU_HWPT_FAULT_ID_VALID;
            arg.fault_id = faults.id();
        }
        arg.dev_id = device.dev_id();
        arg.pt_id = target.pt_id;
        arg.data_type = data.data_type;
        arg.data_len = data.len;
        arg.data_uptr = data.uptr;
        iommufd.check_process(ioctl::HWPT_ALLOC.name)?;
        // SAFETY: IOMMU_HWPT_ALLOC takes `iommu_hwpt_alloc`, sized by `new()`. Its one user pointer,
        // `data_uptr`, is null with `data_len` 0 or points at `data_len` readable bytes alive for the
        // call (this function's contract); the kernel only reads them.
        unsafe { ioctl::call(iommufd.as_fd(), &ioctl::HWPT_ALLOC, &mut arg) }?;
        Ok(Hwpt {
            inner: Arc::new(HwptInner {
                obj: Object::new(iommufd, arg.out_hwpt_id, "HWPT"),
                parent: target.parent,
                _faults: faults,
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

    /// Paging or nested.
    pub fn kind(&self) -> HwptKind {
        self.inner.kind()
    }

    /// The id of what the table hangs off: its IOAS (paging) or its nest-parent HWPT or vIOMMU
    /// (nested). The handle keeps that object alive.
    pub fn parent_id(&self) -> u32 {
        match &self.inner.parent {
            Parent::Ioas(ioas) => ioas.id(),
            Parent::Nest(parent) => parent.id(),
        }
    }

    /// The iommufd it belongs to.
    pub fn iommufd(&self) -> &Iommufd {
        self.inner.obj.iommufd()
    }

    /// Destroys the page table now (`IOMMU_DESTROY`), reporting failure.
    ///
    /// Refused with [`Error::InUse`] while clones, attachments or nested tables still refer to it. On
    /// any failure (refused, or the kernel's error) the handle comes back with the error, unchanged:
    /// try again later, or drop it, which tries again and logs a failure. Its parent (IOAS, nest
    /// parent or vIOMMU) and fault queue are released only after the kernel destroyed it.
    pub fn destroy(self) -> std::result::Result<(), CloseError<Hwpt>> {
        match Arc::try_unwrap(self.inner) {
            Ok(mut inner) => match inner.obj.try_destroy() {
                // Dropping `inner` now releases the parent and fault queue (the object is gone).
                Ok(()) => Ok(()),
                Err(e) => Err(CloseError::new(e, Hwpt { inner: Arc::new(inner) })),
            },
            Err(inner) => {
                let users = Arc::strong_count(&inner).saturating_sub(1);
                Err(CloseError::new(Error::InUse { op: "IOMMU_DESTROY", users }, Hwpt { inner }))
            }
        }
    }

    /// A HWPT handle for an id the kernel never allocated, for validation tests.
    #[cfg(test)]
    pub(crate) fn fake(ioas: &Ioas, id: u32, kind: HwptKind, flags: HwptFlags) -> Hwpt {
        let parent = match kind {
            HwptKind::Paging => Parent::Ioas(ioas.inner.clone()),
            HwptKind::Nested => Parent::Nest(ObjRef::new(ioas.iommufd(), ioas.id(), ioas.inner.clone())),
        };
        Hwpt {
            inner: Arc::new(HwptInner {
                obj: Object::new(ioas.iommufd(), id, "HWPT"),
                parent,
                _faults: None,
                flags,
            }),
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

/// Seals [`PageTable`], [`NestParent`] and [`FaultSource`]: only this crate's handles implement them.
/// Crate-visible so that other modules (vIOMMU, fault queue) can implement them for their handles.
pub(crate) mod sealed {
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

/// What a nested page table can be allocated on ([`Hwpt::alloc_nested`]): a paging [`Hwpt`]
/// allocated with [`HwptFlags::NEST_PARENT`] or, on IOMMUs with a vIOMMU object (ARM SMMUv3, and
/// the other drivers from Linux 6.13 on), a vIOMMU wrapping such a HWPT.
///
/// The nested table keeps its parent's handle alive.
pub trait NestParent: sealed::Sealed {
    /// The object id passed to the kernel as `pt_id`.
    fn nest_parent_id(&self) -> u32;
    /// Checks that the object can be a nest parent and returns the reference the nested table keeps.
    #[doc(hidden)]
    fn nest_parent_ref(&self) -> Result<ObjRef>;
}

impl NestParent for Hwpt {
    fn nest_parent_id(&self) -> u32 {
        self.id()
    }

    fn nest_parent_ref(&self) -> Result<ObjRef> {
        if self.kind() != HwptKind::Paging {
            return Err(Error::invalid(
                HWPT_ALLOC,
                format!("HWPT {} is nested: only a paging HWPT can be a nest parent", self.id()),
            ));
        }
        if !self.flags().contains(HwptFlags::NEST_PARENT) {
            return Err(Error::invalid(
                HWPT_ALLOC,
                format!("HWPT {} was not allocated with HwptFlags::NEST_PARENT", self.id()),
            ));
        }
        Ok(ObjRef::new(self.iommufd(), self.id(), self.inner.clone()))
    }
}

/// Where a page table's I/O page faults are delivered: an iommufd fault queue
/// (`IOMMU_FAULT_QUEUE_ALLOC`, Linux 6.11). Passing one to [`Hwpt::alloc_with_faults`] or
/// [`Hwpt::alloc_nested_with_faults`] sets `IOMMU_HWPT_FAULT_ID_VALID`; the HWPT keeps the queue
/// alive (the kernel refuses to destroy a queue a HWPT still reports to).
pub trait FaultSource: sealed::Sealed {
    /// The fault queue's object id (the `fault_id` of `IOMMU_HWPT_ALLOC`).
    fn fault_id(&self) -> u32;
    #[doc(hidden)]
    fn fault_ref(&self) -> ObjRef;
}

impl Hwpt {
    /// Resolves a nest parent into the allocation target of a nested table.
    pub(crate) fn nested_target(device: &impl IommuDevice, parent: &impl NestParent) -> Result<AllocTarget> {
        let parent = parent.nest_parent_ref()?;
        device.iommufd().check_same(parent.iommufd(), HWPT_ALLOC)?;
        Ok(AllocTarget { pt_id: parent.id(), parent: Parent::Nest(parent) })
    }
}
