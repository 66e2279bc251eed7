//! VFIO device cdevs: [`VfioDevice`] (opened, not yet bound), [`BoundDevice`] (bound to an
//! [`Iommufd`]) and [`Attachment`] (the device's DMA pointed at a page table).
//!
//! The device is the unit of this API: the code that owns a device chooses its page table, PASIDs and
//! features. Its IOMMU group is only reported, as an isolation fact ([`BoundDevice::group`]).

mod access;
mod display;
mod feature;
mod group;
mod hw_info;
mod pci;

pub use access::*;
pub use display::*;
pub use feature::*;
pub use group::*;
pub use hw_info::*;
pub use pci::*;

use std::collections::BTreeSet;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use iommufd_sys as sys;

use crate::error::{Error, Result};
use crate::hwpt::{PageTable, PtRef};
use crate::ioctl::{self, Sized32};
use crate::iommufd::Iommufd;

/// A VFIO device cdev (`/dev/vfio/devices/vfioN`), opened but not yet bound to an iommufd.
///
/// A cdev accepts no other ioctl until it is bound, so this type offers only [`bind`](Self::bind).
#[derive(Debug)]
pub struct VfioDevice {
    fd: OwnedFd,
    name: Option<String>,
}

impl VfioDevice {
    /// Opens a device cdev by path.
    pub fn open(path: impl AsRef<Path>) -> Result<VfioDevice> {
        let path = path.as_ref();
        let fd = rustix::fs::open(
            path,
            rustix::fs::OFlags::RDWR | rustix::fs::OFlags::CLOEXEC,
            rustix::fs::Mode::empty(),
        )
        .map_err(|e| Error::open(path, e))?;
        let name = path.file_name().and_then(|n| n.to_str()).and_then(pci::cdev_device_name);
        Ok(VfioDevice { fd, name })
    }

    /// Opens the cdev of the PCI device at `address` (`0000:00:03.0`), found through
    /// `/sys/bus/pci/devices/<address>/vfio-dev/vfioN`.
    pub fn open_pci(address: &str) -> Result<VfioDevice> {
        let address: PciAddress = address.parse()?;
        let cdev = address.vfio_cdev_path()?;
        let mut dev = Self::open(&cdev)?;
        dev.name = Some(address.to_string());
        Ok(dev)
    }

    /// Adopts an already-open device cdev (for example passed by a management process).
    ///
    /// The device's sysfs name is recovered from `/proc/self/fd` when possible, for group facts.
    pub fn from_fd(fd: OwnedFd) -> VfioDevice {
        let link = std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd())).ok();
        let name = link
            .as_deref()
            .and_then(|p| p.file_name())
            .and_then(|n| n.to_str())
            .and_then(pci::cdev_device_name);
        VfioDevice { fd, name }
    }

    /// The device's sysfs name (a PCI address), when known.
    pub fn name(&self) -> Option<&str> {
        self.name.as_deref()
    }

    /// Binds the device to `iommufd` (`VFIO_DEVICE_BIND_IOMMUFD`, Linux 6.6). On failure the cdev is
    /// closed.
    pub fn bind(self, iommufd: &Iommufd) -> Result<BoundDevice> {
        self.bind_inner(iommufd, None)
    }

    /// Binds a PF or VF that requires a VF token (the UUID shared between a PF's and its VFs' users).
    pub fn bind_with_token(self, iommufd: &Iommufd, token: [u8; 16]) -> Result<BoundDevice> {
        self.bind_inner(iommufd, Some(token))
    }

    fn bind_inner(self, iommufd: &Iommufd, token: Option<[u8; 16]>) -> Result<BoundDevice> {
        let mut arg = sys::vfio_device_bind_iommufd::new();
        arg.iommufd = iommufd.as_raw_fd();
        if let Some(token) = &token {
            arg.flags = sys::VFIO_DEVICE_BIND_FLAG_TOKEN;
            arg.token_uuid_ptr = token.as_ptr() as u64;
        }
        // SAFETY: VFIO_DEVICE_BIND_IOMMUFD on a device cdev takes `vfio_device_bind_iommufd`, sized by
        // `new()`; `iommufd` is borrowed open for the call and `token_uuid_ptr` is null or points at the
        // 16 readable bytes of `token`, alive until the call returns.
        unsafe { ioctl::call(self.fd.as_fd(), &ioctl::DEVICE_BIND_IOMMUFD, &mut arg) }?;
        if let Some(name) = &self.name {
            iommufd.register_bound(name);
        }
        Ok(BoundDevice {
            inner: Arc::new(DeviceInner {
                fd: self.fd,
                iommufd: iommufd.clone(),
                dev_id: arg.out_devid,
                name: self.name,
                attached: Mutex::new(BTreeSet::new()),
            }),
        })
    }
}

impl AsFd for VfioDevice {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl AsRawFd for VfioDevice {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

impl FromRawFd for VfioDevice {
    /// # Safety
    ///
    /// `fd` must be an open VFIO device cdev owned by the caller; ownership moves to the new value.
    unsafe fn from_raw_fd(fd: RawFd) -> Self {
        // SAFETY: the caller transfers ownership of the open fd (this function's contract).
        Self::from_fd(unsafe { OwnedFd::from_raw_fd(fd) })
    }
}

impl From<VfioDevice> for OwnedFd {
    fn from(dev: VfioDevice) -> OwnedFd {
        dev.fd
    }
}

/// The key of an attachment: the whole device (`None`) or one PASID.
type AttachKey = Option<u32>;

pub(crate) struct DeviceInner {
    pub(crate) fd: OwnedFd,
    pub(crate) iommufd: Iommufd,
    pub(crate) dev_id: u32,
    pub(crate) name: Option<String>,
    attached: Mutex<BTreeSet<AttachKey>>,
}

impl DeviceInner {
    fn attached(&self) -> MutexGuard<'_, BTreeSet<AttachKey>> {
        self.attached.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Drop for DeviceInner {
    fn drop(&mut self) {
        // Closing the cdev (the `fd` field, dropped after this) unbinds the device from the iommufd.
        if let Some(name) = &self.name {
            self.iommufd.unregister_bound(name);
        }
    }
}

/// A device known to an iommufd by a device id: what HWPT allocation, `IOMMU_GET_HW_INFO` and (later)
/// vIOMMU and vDEVICE allocation take. Implemented by [`BoundDevice`] and, with the `testing`
/// feature, by the kernel's mock devices.
pub trait IommuDevice {
    /// The device id in its iommufd.
    fn dev_id(&self) -> u32;
    /// The iommufd the device is bound to.
    fn iommufd(&self) -> &Iommufd;
}

impl IommuDevice for BoundDevice {
    fn dev_id(&self) -> u32 {
        self.inner.dev_id
    }
    fn iommufd(&self) -> &Iommufd {
        &self.inner.iommufd
    }
}

/// A VFIO device bound to an [`Iommufd`]: it has a device id there and accepts VFIO ioctls.
///
/// Cloning shares the cdev. Attachments keep the device open; the device is unbound when the last
/// clone and attachment are gone (closing the cdev detaches and unbinds it in the kernel).
#[derive(Clone)]
pub struct BoundDevice {
    pub(crate) inner: Arc<DeviceInner>,
}

impl std::fmt::Debug for BoundDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BoundDevice")
            .field("dev_id", &self.inner.dev_id)
            .field("name", &self.inner.name)
            .finish()
    }
}

impl BoundDevice {
    /// The device id in its iommufd (what `IOMMU_HWPT_ALLOC` and `IOMMU_GET_HW_INFO` take).
    pub fn dev_id(&self) -> u32 {
        self.inner.dev_id
    }

    /// The iommufd the device is bound to.
    pub fn iommufd(&self) -> &Iommufd {
        &self.inner.iommufd
    }

    /// The device's sysfs name (its PCI address), when known.
    pub fn name(&self) -> Option<&str> {
        self.inner.name.as_deref()
    }

    /// The sysfs directory of the device, when its name is known.
    pub fn sysfs_path(&self) -> Option<PathBuf> {
        self.name().map(|n| PathBuf::from("/sys/bus/pci/devices").join(n))
    }

    /// Points the whole device's DMA at `pt` (`VFIO_DEVICE_ATTACH_IOMMUFD_PT`). Only one whole-device
    /// attachment exists at a time: use [`Attachment::replace`] to switch page tables atomically.
    pub fn attach(&self, pt: &impl PageTable) -> Result<Attachment> {
        self.attach_inner(None, pt)
    }

    /// Points one PASID of the device at `pt` (`VFIO_DEVICE_ATTACH_IOMMUFD_PT` with
    /// `VFIO_DEVICE_ATTACH_PASID`, Linux 6.15).
    pub fn attach_pasid(&self, pasid: u32, pt: &impl PageTable) -> Result<Attachment> {
        self.attach_inner(Some(pasid), pt)
    }

    fn attach_inner(&self, pasid: Option<u32>, pt: &impl PageTable) -> Result<Attachment> {
        const OP: &str = "VFIO_DEVICE_ATTACH_IOMMUFD_PT";
        let pt = pt.pt_ref();
        self.inner.iommufd.check_same(pt.iommufd(), OP)?;
        let mut attached = self.inner.attached();
        if attached.contains(&pasid) {
            return Err(Error::invalid(
                OP,
                match pasid {
                    None => "the device is already attached: use Attachment::replace".to_string(),
                    Some(p) => format!("PASID {p} is already attached: use Attachment::replace"),
                },
            ));
        }
        if let Err(e) = attach_ioctl(self.inner.fd.as_fd(), pasid, pt.id()) {
            // Before Linux 6.15 the PASID flag itself is refused with EINVAL, indistinguishable from a
            // bad page table; a side-effect-free probe (only on this error path) tells which it was.
            if pasid.is_some()
                && e.errno() == Some(crate::Errno::INVAL)
                && matches!(crate::probe::probe_pasid_attach(self.inner.fd.as_fd()), Ok(false))
            {
                return Err(Error::Unsupported {
                    op: "VFIO_DEVICE_ATTACH_IOMMUFD_PT (PASID)",
                    since: "6.15",
                });
            }
            return Err(e);
        }
        attached.insert(pasid);
        Ok(Attachment { dev: self.inner.clone(), pasid, pt: Some(pt) })
    }

    /// Unbinds now: refused with [`Error::InUse`] while clones or attachments exist. (Closing the cdev
    /// cannot fail in a way the caller could act on; this exists so teardown order can be asserted.)
    pub fn close(self) -> Result<()> {
        match Arc::try_unwrap(self.inner) {
            Ok(inner) => {
                drop(inner);
                Ok(())
            }
            Err(inner) => {
                Err(Error::InUse { op: "close(VFIO device)", users: Arc::strong_count(&inner) - 1 })
            }
        }
    }
}

impl AsFd for BoundDevice {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.inner.fd.as_fd()
    }
}

impl AsRawFd for BoundDevice {
    fn as_raw_fd(&self) -> RawFd {
        self.inner.fd.as_raw_fd()
    }
}

fn attach_ioctl(fd: BorrowedFd<'_>, pasid: Option<u32>, pt_id: u32) -> Result<()> {
    let mut arg = sys::vfio_device_attach_iommufd_pt::new();
    arg.pt_id = pt_id;
    if let Some(pasid) = pasid {
        arg.flags = sys::VFIO_DEVICE_ATTACH_PASID;
        arg.pasid = pasid;
    }
    // SAFETY: VFIO_DEVICE_ATTACH_IOMMUFD_PT on a device cdev takes `vfio_device_attach_iommufd_pt`,
    // sized by `new()`, with no pointers; the kernel writes `pt_id` back through the exclusive borrow.
    unsafe { ioctl::call(fd, &ioctl::DEVICE_ATTACH_IOMMUFD_PT, &mut arg) }.map(drop)
}

fn detach_ioctl(fd: BorrowedFd<'_>, pasid: Option<u32>) -> Result<()> {
    let mut arg = sys::vfio_device_detach_iommufd_pt::new();
    if let Some(pasid) = pasid {
        arg.flags = sys::VFIO_DEVICE_DETACH_PASID;
        arg.pasid = pasid;
    }
    // SAFETY: VFIO_DEVICE_DETACH_IOMMUFD_PT takes `vfio_device_detach_iommufd_pt`, sized by `new()`,
    // with no pointers.
    unsafe { ioctl::call(fd, &ioctl::DEVICE_DETACH_IOMMUFD_PT, &mut arg) }.map(drop)
}

/// A device (or one of its PASIDs) attached to a page table. Keeps both alive; detaches on drop
/// (failures are logged), or explicitly with [`detach`](Self::detach).
pub struct Attachment {
    dev: Arc<DeviceInner>,
    pasid: Option<u32>,
    pt: Option<PtRef>,
}

impl std::fmt::Debug for Attachment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Attachment")
            .field("dev_id", &self.dev.dev_id)
            .field("pasid", &self.pasid)
            .field("pt_id", &self.pt_id())
            .finish()
    }
}

impl Attachment {
    /// The id of the page table the device is attached to.
    pub fn pt_id(&self) -> u32 {
        self.pt.as_ref().map_or(0, PtRef::id)
    }

    /// The PASID, for a PASID attachment.
    pub fn pasid(&self) -> Option<u32> {
        self.pasid
    }

    /// Switches the device to `pt` atomically (the kernel replaces the domain without a window of
    /// blocked DMA). On failure the device stays attached to the old page table.
    pub fn replace(&mut self, pt: &impl PageTable) -> Result<()> {
        const OP: &str = "VFIO_DEVICE_ATTACH_IOMMUFD_PT";
        let new = pt.pt_ref();
        self.dev.iommufd.check_same(new.iommufd(), OP)?;
        attach_ioctl(self.dev.fd.as_fd(), self.pasid, new.id())?;
        self.pt = Some(new);
        Ok(())
    }

    fn do_detach(&mut self) -> Result<()> {
        detach_ioctl(self.dev.fd.as_fd(), self.pasid)?;
        self.dev.attached().remove(&self.pasid);
        self.pt = None;
        Ok(())
    }

    /// Detaches now and reports failure. On failure the device stays attached and the page table is
    /// kept alive (leaked) rather than destroyed under it.
    pub fn detach(mut self) -> Result<()> {
        let r = self.do_detach();
        if r.is_err() {
            std::mem::forget(self.pt.take());
        }
        r
    }
}

impl Drop for Attachment {
    fn drop(&mut self) {
        if self.pt.is_none() {
            return;
        }
        if let Err(e) = self.do_detach() {
            log::error!(
                "iommufd: detaching device {} (pasid {:?}) on drop failed, keeping its page table: {e}",
                self.dev.dev_id,
                self.pasid
            );
            std::mem::forget(self.pt.take());
        }
    }
}
