//! Safe, device-centric Rust API for the Linux IOMMU user API (`/dev/iommu`) and VFIO device cdevs.
//!
//! ```no_run
//! use iommufd::{Access, DmaBuffer, Iommufd, Iova, VfioDevice};
//!
//! # fn main() -> iommufd::Result<()> {
//! let iommufd = Iommufd::open()?;
//! let device = VfioDevice::open_pci("0000:00:03.0")?.bind(&iommufd)?;
//! let ioas = iommufd.alloc_ioas()?;
//! let _attachment = device.attach(&ioas)?;
//!
//! let mut buffer = DmaBuffer::new(4096)?;
//! buffer.as_mut_slice()[..5].copy_from_slice(b"hello");
//! let mapping = ioas.map(buffer, Iova::Fixed(0x10_0000), Access::READ_WRITE)?;
//! // ... program the device to DMA at mapping.iova() ...
//! let mut out = [0u8; 5];
//! mapping.read_at(0, &mut out)?;
//! let buffer = mapping.unmap()?.expect("not shared");
//! # drop(buffer);
//! # Ok(())
//! # }
//! ```
//!
//! # Design: the device is the unit
//!
//! A [`VfioDevice`] is opened by cdev path, PCI address or fd, then [bound](VfioDevice::bind) to an
//! [`Iommufd`]. The code that owns the device decides everything about its DMA: which [`Ioas`] or
//! [`Hwpt`] it is [attached](BoundDevice::attach) to, which flags that page table has (nest parent,
//! dirty tracking, PASID), and which PASIDs are attached where. The IOMMU group is not a handle: it is
//! reported as an isolation fact by [`BoundDevice::group`] (its number, the other devices in it, and
//! whether they are bound to this iommufd).
//!
//! # Object graph and teardown
//!
//! Every handle holds what it depends on through an `Arc`, so handles are `'static`, cheap to clone
//! and can be stored in a VMM's long-lived structures:
//!
//! ```text
//! Iommufd <- Ioas <- Mapping              (a mapping keeps its IOAS)
//!            Ioas <- Hwpt (paging)         (a paging HWPT keeps its IOAS)
//!   Hwpt (nest parent) | Viommu <- Hwpt (nested)   (a nested HWPT keeps its parent)
//!   Hwpt (nest parent) <- Viommu <- Vdevice | Veventq | HwQueue
//!   FaultQueue <- Hwpt (allocated with a fault queue)
//! Iommufd <- BoundDevice <- Attachment -> Ioas | Hwpt
//! ```
//!
//! This encodes the kernel's teardown order: vEVENTQ, vDEVICE and HW queues go before their vIOMMU,
//! which goes before its nest parent, which goes before its IOAS.
//!
//! Teardown follows from the references: an attachment detaches before it lets go of its page table,
//! so the kernel never sees an attached IOAS or HWPT destroyed; an IOAS is destroyed only after its
//! last mapping, HWPT and attachment. Each handle also has an explicit, fallible close
//! ([`Mapping::unmap`], [`Attachment::detach`], [`Hwpt::destroy`], [`Ioas::destroy`],
//! [`BoundDevice::close`]); `Drop` does the same best-effort, never panics, and logs failures through
//! the `log` crate.
//!
//! # Soundness model
//!
//! Mapping memory into an IOAS lets a device write it at any time. The safe API guarantees that no
//! memory reachable by a device is freed, reused or aliased by a Rust reference:
//!
//! - [`Ioas::map`] takes a [`DmaBuffer`] **by value**. While mapped, its bytes are reached only by
//!   copies made of relaxed atomic accesses ([`Mapping::read_at`], [`Mapping::write_at`]), well
//!   defined while other threads and the device use the same memory; it comes back from
//!   [`Mapping::unmap`] only after the kernel confirms the range is gone. A failed unmap or a
//!   `mem::forget` leaks the memory instead of freeing it. `IOMMU_IOAS_COPY` mappings share the
//!   buffer, which returns only when the last copy is unmapped.
//! - Each IOAS keeps a registry of the areas made through it; every call that changes them holds the
//!   IOAS's lock from its checks through the ioctl to the registry update, and guards are removed by
//!   identity. So no interleaving of threads leaves a guard whose range the kernel no longer maps.
//! - [`Ioas::map_file`] is safe because the kernel pins the file's pages itself; the crate checks the
//!   fd's access mode and write seals, which the kernel does not.
//! - [`Ioas::map_user`] (raw virtual addresses, such as guest RAM) is `unsafe` with a precise contract,
//!   and so is copying such a mapping ([`Ioas::copy_user`]).
//! - Ranges owned by guards cannot be removed behind them: [`Ioas::unmap_range`] and
//!   [`Ioas::unmap_all`] refuse to touch them.
//! - Handles act only in the process that opened their [`Iommufd`]: in a `fork()`ed child, drops do
//!   nothing and state-changing calls fail with [`Error::ForeignProcess`]
//!   ([`Iommufd::in_owner_process`]).
//!
//! # Live migration
//!
//! VFIO migration v2 is typed: [`BoundDevice::migration_flags`], [`MigState`] and
//! [`BoundDevice::set_migration_state`], which accepts any reachable target state (the kernel walks
//! the path), refuses what the uAPI forbids before any ioctl, and returns the data session it opens
//! as a [`MigrationData`] (`Read` when saving, `Write` when resuming, with a safe
//! [`precopy_info`](MigrationData::precopy_info)).
//!
//! # For VMMs
//!
//! With feature `vm-memory`, [`Ioas::map_guest_memory`] maps the RAM of a `vm-memory` guest memory
//! object at IOVA = guest physical address and returns one [`GuestMemoryMapping`] guard (safe: the
//! guard holds the regions' reference-counted mmaps), which follows memory hotplug; [`IdentityMap`]
//! is the whole setup for a guest without a vIOMMU. With feature `vmm-sys-util`, [`EventFdExt`] lends
//! an `EventFd` to every API that takes an fd. [`BoundDevice::set_irq_vector`] updates one MSI/MSI-X
//! vector in place, [`BoundDevice::set_irq_unmask_eventfd`] gives INTx its unmask (KVM resample)
//! eventfd, and [`RegionMapping::host_address`] hands a mapped BAR to a KVM memory slot.
//!
//! Ordering rules a VMM must keep:
//!
//! - **KVM learns the device file before the bind.** Add the cdev to KVM's VFIO device
//!   (`KVM_DEV_VFIO_FILE_ADD` with the fd of the [`VfioDevice`], which implements `AsFd`) *before*
//!   [`VfioDevice::bind`], and with that same open file: the kernel records the KVM in the open file
//!   and hands it to the device when that file is bound, so a file added after the bind (or another
//!   open of the same cdev) leaves the device without it, and drivers that need KVM when they open
//!   (some mediated vGPUs) fail the bind.
//! - **Attach, then map guest RAM.** Attaching tells the IOAS the device's reserved IOVA ranges (the
//!   x86 interrupt window at `0xfee00000`); mapping afterwards lets a RAM region there be refused
//!   with a clear error, while attaching after the map fails in the kernel with `EADDRINUSE`.
//! - **Hotplug order.** Map new RAM before the guest is told about it; unmap removed RAM after the
//!   guest gave it up and before the VMM frees it (a [`GuestMemoryMapping`] holds it until then).
//! - **Interrupts.** Set INTx's trigger eventfd before its unmask eventfd. INTx, MSI and MSI-X
//!   exclude each other; MSI fixes its vector count when it is first enabled (enable all the
//!   vectors the guest enabled at once), MSI-X can grow later.
//! - **BAR memory slots.** Delete a KVM memory slot over a BAR before dropping its [`RegionMapping`]
//!   (the address may be reused by any other mapping afterwards). A BAR holding the MSI-X table is
//!   mappable only in the areas the kernel offers, unless the region reports
//!   [`RegionInfo::msix_mappable`].
//! - **Bus mastering.** vfio-pci leaves it off; the guest's driver turns it on through config-space
//!   writes the VMM forwards ([`BoundDevice::write_config_u16`]), and without it DMA does nothing.
//!
//! # Errors
//!
//! One [`Error`] type. Kernel failures carry the operation and errno, plus a hint where the errno has a
//! well-known cause. `ENOTTY` becomes [`Error::Unsupported`] naming the kernel release that introduced
//! the ioctl. Bad arguments are rejected with [`Error::InvalidArgument`] or [`Error::ForeignObject`]
//! before any ioctl is issued.
#![cfg_attr(docsrs, feature(doc_cfg))]
#![deny(unsafe_op_in_unsafe_fn)]
#![deny(clippy::undocumented_unsafe_blocks)]
#![warn(missing_docs)]

#[cfg(not(target_os = "linux"))]
compile_error!("iommufd binds a Linux kernel interface and builds only for Linux targets");

mod compat;
mod device;
mod dirty;
mod dma;
mod error;
mod fault;
mod hwpt;
mod ioas;
mod ioctl;
mod iommufd;
mod nested;
mod object;
mod placement;
pub mod probe;
#[cfg(feature = "testing")]
#[cfg_attr(docsrs, doc(cfg(feature = "testing")))]
pub mod testing;
#[cfg(test)]
mod tests;
mod viommu;
#[cfg(feature = "vm-memory")]
mod vm_memory;

pub use compat::VfioCompatIoas;
pub use device::*;
pub use dirty::{DirtyBitmap, DirtyRanges};
pub use dma::{DmaBuffer, FileMemory, Memory, Shareable, UserMemory, page_size};
pub use error::{CloseError, Errno, Error, Result};
#[cfg(feature = "tokio")]
pub use fault::AsyncFaultQueue;
pub use fault::{FaultPerm, FaultQueue, PageFault, PageFaultFlags, PageResponse, ResponseCode};
pub use hwpt::{FaultSource, Hwpt, HwptFlags, HwptKind, NestParent, PageTable};
pub use ioas::PhysRange;
pub use ioas::{Access, Ioas, Iova, IovaRange, IovaRanges, Mapping};
pub use iommufd::{DEV_IOMMU, Iommufd, RlimitMode};
pub use nested::{
    AmdGuestDte, ArmSmmuv3Invalidate, ArmSmmuv3Ste, InvalidateEntries, InvalidateError, NestedData,
    VtdPagingLevels, VtdS1, VtdS1Flags, VtdS1Invalidate,
};
pub use probe::{Capabilities, DeviceCapabilities, DeviceIoctl, Ioctl};
#[cfg(feature = "tokio")]
pub use viommu::AsyncVeventq;
pub use viommu::{
    HwQueue, HwQueueType, LostEvents, Vdevice, Vevent, VeventData, VeventRecord, Veventq, VeventqType,
    Viommu, ViommuType,
};

#[cfg(feature = "vm-memory")]
pub use self::vm_memory::{GuestMemoryMapping, GuestRam, IdentityMap, RamBitmap};

/// Raw bindings, re-exported for the rare field this crate does not type.
pub use iommufd_sys as sys;
