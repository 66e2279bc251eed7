//! Safe, device-centric Rust API for the Linux IOMMU user API (`/dev/iommu`) and VFIO device cdevs.
#![deny(unsafe_op_in_unsafe_fn)]
#![deny(clippy::undocumented_unsafe_blocks)]

#[cfg(not(target_os = "linux"))]
compile_error!("iommufd binds a Linux kernel interface and builds only for Linux targets");

mod device;
mod dma;
mod error;
mod hwpt;
mod ioas;
mod ioctl;
mod iommufd;
mod object;

pub use device::*;
pub use dma::{DmaBuffer, FileMemory, Memory, UserMemory, page_size};
pub use error::{Errno, Error, Result};
pub use hwpt::{Hwpt, HwptFlags, PageTable};
pub use ioas::{Access, Ioas, Iova, IovaRange, IovaRanges, Mapping};
pub use iommufd::{DEV_IOMMU, Iommufd, RlimitMode};

/// Raw bindings, re-exported for the rare field this crate does not type.
pub use iommufd_sys as sys;
