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
pub(crate) mod ident;
mod irq;
mod migration;
mod pci;

pub use access::*;
pub use display::*;
pub use feature::*;
pub use group::*;
pub use hw_info::*;
pub use irq::*;
pub use migration::*;
pub use pci::*;

use std::collections::BTreeMap;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

use iommufd_sys as sys;

use crate::error::{CloseError, Error, Result};
use crate::hwpt::{PageTable, PtRef};
use crate::ioctl::{self, Sized32};
use crate::iommufd::Iommufd;

/// A VFIO device cdev (`/dev/vfio/devices/vfioN`), opened but not yet bound to an iommufd.
///
/// A cdev accepts no other ioctl until it is bound, so this type offers only [`bind`](Self::bind).
///
/// Which device a cdev is comes from the fd itself, never from a path or link text: `fstat` gives
/// its device number and `/sys/dev/char/MAJOR:MINOR` links to `<device>/vfio-dev/vfioN`, so a
/// symlink, a renamed bind mount or an fd opened in another mount namespace still names the right
/// device ([`name`](Self::name)).
#[derive(Debug)]
pub struct VfioDevice {
    fd: OwnedFd,
    device: Option<ident::CdevDevice>,
}

/// The operation [`VfioDevice::bind_with_token`] names in its errors.
const BIND_TOKEN: &str = "VFIO_DEVICE_BIND_IOMMUFD (VFIO_DEVICE_BIND_FLAG_TOKEN)";

impl VfioDevice {
    /// Opens a device cdev by path. A file that is not a VFIO device cdev (a legacy group node
    /// `/dev/vfio/N`, `/dev/vfio/vfio`, `/dev/iommu`, ...) gives [`Error::WrongFile`] and is closed.
    pub fn open(path: impl AsRef<Path>) -> Result<VfioDevice> {
        let path = path.as_ref();
        let fd = rustix::fs::open(
            path,
            rustix::fs::OFlags::RDWR | rustix::fs::OFlags::CLOEXEC,
            rustix::fs::Mode::empty(),
        )
        .map_err(|e| Error::open(path, e))?;
        let device = ident::check_vfio_cdev("VfioDevice::open", fd.as_fd())?;
        Ok(VfioDevice { fd, device })
    }

    /// Opens the cdev of the PCI device at `address` (`0000:00:03.0`), found through
    /// `/sys/bus/pci/devices/<address>/vfio-dev/vfioN`.
    pub fn open_pci(address: &str) -> Result<VfioDevice> {
        let address: PciAddress = address.parse()?;
        let cdev = address.vfio_cdev_path()?;
        let dev = Self::open(&cdev)?;
        let want = address.to_string();
        match dev.name() {
            Some(name) if name != want => Err(Error::Protocol {
                op: "VfioDevice::open_pci",
                detail: format!(
                    "{} belongs to {name}, not {want} (was the device unbound and another bound meanwhile?)",
                    cdev.display()
                ),
            }),
            Some(_) => Ok(dev),
            None => Ok(VfioDevice { device: Some(ident::CdevDevice { name: want, dir: None }), ..dev }),
        }
    }

    /// Opens the cdev of the mediated device `uuid` (`/sys/bus/mdev/devices/<uuid>/vfio-dev/vfioN`),
    /// for example an instance created through `mdev_supported_types/<type>/create`. Anything but a
    /// canonical UUID (`8-4-4-4-12` hexadecimal digits) is refused before the file system is touched.
    ///
    /// A mediated device uses iommufd's emulated access path: it binds and attaches to an IOAS like
    /// any device, has no IOMMU group of its own (see [`BoundDevice::group`]), and cannot attach to a
    /// HWPT.
    pub fn open_mdev(uuid: &str) -> Result<VfioDevice> {
        const OP: &str = "VfioDevice::open_mdev";
        if !pci::is_uuid(uuid) {
            return Err(Error::invalid(
                OP,
                format!("{uuid:?} is not a UUID (8-4-4-4-12 hexadecimal digits)"),
            ));
        }
        let dir = Path::new("/sys/bus/mdev/devices").join(uuid);
        let cdev =
            pci::cdev_of(&dir, "no such mediated device, or the kernel lacks CONFIG_VFIO_DEVICE_CDEV")?;
        let dev = Self::open(&cdev)?;
        match dev.name() {
            Some(name) if !name.eq_ignore_ascii_case(uuid) => Err(Error::Protocol {
                op: OP,
                detail: format!(
                    "{} belongs to {name}, not {uuid} (was the device removed meanwhile?)",
                    cdev.display()
                ),
            }),
            _ => Ok(dev),
        }
    }

    /// Adopts an already-open device cdev (for example passed by a management process).
    ///
    /// The fd is identified by its device number (`fstat` and `/sys/dev/char/MAJOR:MINOR`) before any
    /// ioctl: any other file gives [`Error::WrongFile`] ("not a VFIO device cdev") and is closed. The
    /// device's sysfs name comes from the same lookup. Where sysfs is not mounted, the cdev is
    /// recognised by the major number `/proc/devices` lists as `vfio-dev`, and the name is unknown.
    pub fn from_fd(fd: OwnedFd) -> Result<VfioDevice> {
        let device = ident::check_vfio_cdev("VfioDevice::from_fd", fd.as_fd())?;
        Ok(VfioDevice { fd, device })
    }

    /// The device's sysfs name (a PCI address, or a platform device's name), read from sysfs through
    /// the cdev's device number; `None` only where sysfs is not mounted.
    pub fn name(&self) -> Option<&str> {
        self.device.as_ref().map(|d| d.name.as_str())
    }

    /// Binds the device to `iommufd` (`VFIO_DEVICE_BIND_IOMMUFD`, Linux 6.6). On failure the cdev is
    /// closed.
    ///
    /// A cdev can be opened any number of times, but the device is bound through one open file at a
    /// time: binding while it is bound (through this or another open of its cdev, to any iommufd)
    /// fails with `EINVAL`. `EBUSY` means its IOMMU group is open through the legacy VFIO group
    /// interface (`/dev/vfio/<group>`); `EPERM` that the platform lacks interrupt remapping.
    pub fn bind(self, iommufd: &Iommufd) -> Result<BoundDevice> {
        self.bind_inner(iommufd, None)
    }

    /// Binds a PF or VF that requires a VF token (the UUID shared between a PF's and its VFs' users)
    /// (`VFIO_DEVICE_BIND_FLAG_TOKEN`, Linux 6.17).
    ///
    /// An older kernel refuses the token flag with `EINVAL`, which also means "already bound": so the
    /// kernel is asked first, without side effects ([`DeviceCapabilities::bind_token`](crate::DeviceCapabilities)),
    /// and one without the flag gives [`Error::Unsupported`] (with errno `EINVAL`) before the bind.
    pub fn bind_with_token(self, iommufd: &Iommufd, token: [u8; 16]) -> Result<BoundDevice> {
        if !crate::probe::probe_bind_token(self.fd.as_fd())? {
            return Err(Error::unsupported(BIND_TOKEN, "6.17", crate::Errno::INVAL));
        }
        self.bind_inner(iommufd, Some(token))
    }

    fn bind_inner(self, iommufd: &Iommufd, token: Option<[u8; 16]>) -> Result<BoundDevice> {
        iommufd.check_process(ioctl::DEVICE_BIND_IOMMUFD.name)?;
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
        if let Some(name) = self.name() {
            iommufd.register_bound(name);
        }
        Ok(BoundDevice {
            inner: Arc::new(DeviceInner {
                fd: self.fd,
                iommufd: iommufd.clone(),
                dev_id: arg.out_devid,
                name: self.device.as_ref().map(|d| d.name.clone()),
                sysfs: self.device.and_then(|d| d.dir),
                attached: Mutex::new(BTreeMap::new()),
                migration: Default::default(),
                pasid: OnceLock::new(),
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
    /// Adopts `fd` without refusing it; prefer [`VfioDevice::from_fd`], which checks. The name is still
    /// read from the fd's device number (and is `None` if it is not a VFIO device cdev).
    ///
    /// # Safety
    ///
    /// `fd` must be an open VFIO device cdev owned by the caller; ownership moves to the new value.
    unsafe fn from_raw_fd(fd: RawFd) -> Self {
        // SAFETY: the caller transfers ownership of the open fd (this function's contract).
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let device = ident::check_vfio_cdev("VfioDevice::from_raw_fd", fd.as_fd()).ok().flatten();
        VfioDevice { fd, device }
    }
}

impl From<VfioDevice> for OwnedFd {
    fn from(dev: VfioDevice) -> OwnedFd {
        dev.fd
    }
}

/// The key of an attachment: the whole device (`None`) or one PASID.
type AttachKey = Option<u32>;

/// The state of one attachment slot (the whole device, or one PASID) of a device.
enum Slot {
    /// An [`Attachment`] handle owns the slot.
    Live,
    /// The handle was dropped but its detach failed: the kernel may still point the slot at this page
    /// table, so the device keeps it alive. The next attach of the slot replaces it in the kernel
    /// (`VFIO_DEVICE_ATTACH_IOMMUFD_PT` on an attached slot is a replace) and releases it.
    Orphaned(#[allow(dead_code)] PtRef),
}

pub(crate) struct DeviceInner {
    /// Declared first so that it is closed first: closing the cdev detaches and unbinds the device in
    /// the kernel, after which page tables of orphaned slots (in `attached`) can be destroyed.
    pub(crate) fd: OwnedFd,
    pub(crate) iommufd: Iommufd,
    pub(crate) dev_id: u32,
    pub(crate) name: Option<String>,
    /// The device's sysfs directory, resolved from the cdev's device number.
    pub(crate) sysfs: Option<PathBuf>,
    attached: Mutex<BTreeMap<AttachKey, Slot>>,
    /// Serialises migration state transitions and remembers the migration flags.
    migration: migration::MigrationShared,
    /// PASID support, fixed for the bound device's life: who refuses PASID attachment (`None`: nobody),
    /// and `max_pasid_log2`. Found on the first PASID attach.
    pasid: OnceLock<(Option<crate::Errno>, u8)>,
}

impl DeviceInner {
    fn attached(&self) -> MutexGuard<'_, BTreeMap<AttachKey, Slot>> {
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

    /// The device's sysfs name (its PCI address), read through the cdev's device number when it was
    /// opened (see [`VfioDevice::name`]).
    pub fn name(&self) -> Option<&str> {
        self.inner.name.as_deref()
    }

    /// The sysfs directory of the device (`/sys/devices/pci0000:00/0000:00:03.0`), resolved from the
    /// cdev's device number; for a device known only by name, the entry of that name under
    /// `/sys/bus/*/devices` (any bus: PCI, platform, mdev).
    pub fn sysfs_path(&self) -> Option<PathBuf> {
        self.inner.sysfs.clone().or_else(|| self.name().and_then(group::device_sysfs_dir))
    }

    /// Points the whole device's DMA at `pt` (`VFIO_DEVICE_ATTACH_IOMMUFD_PT`). Only one whole-device
    /// attachment exists at a time: use [`Attachment::replace`] to switch page tables atomically.
    pub fn attach(&self, pt: &impl PageTable) -> Result<Attachment> {
        self.attach_inner(None, pt)
    }

    /// Points one PASID of the device at `pt` (`VFIO_DEVICE_ATTACH_IOMMUFD_PT` with
    /// `VFIO_DEVICE_ATTACH_PASID`, Linux 6.15).
    ///
    /// Checked before the attach ioctl: PASID 0 is [`Error::InvalidArgument`] (to the kernel it means
    /// "no PASID", the whole device: use [`attach`](Self::attach)); a device whose IOMMU reports no
    /// PASID support (`IOMMU_GET_HW_INFO`'s `max_pasid_log2` is 0, see [`HwInfo`]) gives
    /// [`Error::NotCapable`], and a PASID at or past `1 << max_pasid_log2` gives
    /// [`Error::InvalidArgument`]. A kernel older than 6.15 gives [`Error::Unsupported`].
    pub fn attach_pasid(&self, pasid: u32, pt: &impl PageTable) -> Result<Attachment> {
        self.attach_inner(Some(pasid), pt)
    }

    /// Refuses a PASID the device cannot use, before any attach ioctl.
    fn check_pasid(&self, pasid: u32) -> Result<()> {
        const OP: &str = "VFIO_DEVICE_ATTACH_IOMMUFD_PT (PASID)";
        if pasid == 0 {
            return Err(Error::invalid(
                OP,
                "PASID 0 means no PASID to the kernel (IOMMU_NO_PASID), a whole-device attach: use attach()",
            ));
        }
        let (refusal, log2) = self.pasid_support()?;
        match refusal {
            None => {}
            Some(crate::Errno::INVAL) => return Err(Error::unsupported(OP, "6.15", crate::Errno::INVAL)),
            Some(_) => {
                return Err(Error::NotCapable {
                    op: OP,
                    reason: "the device's VFIO driver does not implement PASID attachment (EOPNOTSUPP)"
                        .into(),
                });
            }
        }
        if log2 == 0 {
            let who = self.name().map_or_else(String::new, |n| format!(" {n}"));
            return Err(Error::NotCapable {
                op: OP,
                reason: format!(
                    "device{who} has no PASID support: IOMMU_GET_HW_INFO reports max_pasid_log2 0 (the \
                     device lacks the PCI PASID capability, or its IOMMU does not enable PASID)"
                ),
            });
        }
        // A width of 32 or more bits admits every u32.
        if pasid.checked_shr(u32::from(log2)).unwrap_or(0) != 0 {
            return Err(Error::invalid(
                OP,
                format!("PASID {pasid:#x} is out of the device's range (max_pasid_log2 {log2})"),
            ));
        }
        Ok(())
    }

    /// Who refuses PASID attachment and the device's `max_pasid_log2`, asked once. A kernel before
    /// 6.15 refuses the PASID flag with `EINVAL`, which also means a bad page table, so a
    /// side-effect-free probe tells first whether the kernel or the driver lacks it.
    fn pasid_support(&self) -> Result<(Option<crate::Errno>, u8)> {
        if let Some(&known) = self.inner.pasid.get() {
            return Ok(known);
        }
        let refusal = crate::probe::pasid_attach_refusal(self.inner.fd.as_fd())?;
        let log2 = if refusal.is_none() { self.hw_info()?.max_pasid_log2 } else { 0 };
        Ok(*self.inner.pasid.get_or_init(|| (refusal, log2)))
    }

    fn attach_inner(&self, pasid: Option<u32>, pt: &impl PageTable) -> Result<Attachment> {
        const OP: &str = "VFIO_DEVICE_ATTACH_IOMMUFD_PT";
        self.inner.iommufd.check_process(OP)?;
        let pt = pt.pt_ref();
        self.inner.iommufd.check_same(pt.iommufd(), OP)?;
        if let Some(pasid) = pasid {
            self.check_pasid(pasid)?;
        }
        let mut attached = self.inner.attached();
        if matches!(attached.get(&pasid), Some(Slot::Live)) {
            return Err(Error::invalid(
                OP,
                match pasid {
                    None => "the device is already attached: use Attachment::replace".to_string(),
                    Some(p) => format!("PASID {p} is already attached: use Attachment::replace"),
                },
            ));
        }
        attach_ioctl(self.inner.fd.as_fd(), pasid, pt.id())?;
        // An orphaned slot was just replaced in the kernel: its old page table is released here.
        let orphan = attached.insert(pasid, Slot::Live);
        drop(attached);
        drop(orphan);
        Ok(Attachment { dev: self.inner.clone(), pasid, pt: Some(pt) })
    }

    /// Unbinds now. Refused with [`Error::InUse`] while clones, attachments or other handles of the
    /// device exist, and with [`Error::ForeignProcess`] in a `fork()`ed child; either way the handle
    /// comes back with the error, so the caller can retry. (Closing the cdev itself cannot fail in a
    /// way the caller could act on; this exists so teardown order can be asserted.)
    pub fn close(self) -> std::result::Result<(), CloseError<BoundDevice>> {
        const OP: &str = "close(VFIO device)";
        if let Err(e) = self.inner.iommufd.check_process(OP) {
            return Err(CloseError::new(e, self));
        }
        match Arc::try_unwrap(self.inner) {
            Ok(inner) => {
                drop(inner);
                Ok(())
            }
            Err(inner) => {
                let users = Arc::strong_count(&inner) - 1;
                Err(CloseError::new(Error::InUse { op: OP, users }, BoundDevice { inner }))
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
        self.dev.iommufd.check_process(OP)?;
        let new = pt.pt_ref();
        self.dev.iommufd.check_same(new.iommufd(), OP)?;
        attach_ioctl(self.dev.fd.as_fd(), self.pasid, new.id())?;
        self.pt = Some(new);
        Ok(())
    }

    fn do_detach(&mut self) -> Result<()> {
        let mut attached = self.dev.attached();
        detach_ioctl(self.dev.fd.as_fd(), self.pasid)?;
        attached.remove(&self.pasid);
        drop(attached);
        self.pt = None;
        Ok(())
    }

    /// Detaches now and reports failure. On failure (or with [`Error::ForeignProcess`] in a `fork()`ed
    /// child) the device stays attached, and the attachment comes back with the error, still owning
    /// the slot and keeping the page table alive, so the caller can retry.
    pub fn detach(mut self) -> std::result::Result<(), CloseError<Attachment>> {
        if let Err(e) = self.dev.iommufd.check_process("VFIO_DEVICE_DETACH_IOMMUFD_PT") {
            return Err(CloseError::new(e, self));
        }
        match self.do_detach() {
            Ok(()) => Ok(()),
            Err(e) => Err(CloseError::new(e, self)),
        }
    }
}

impl Drop for Attachment {
    fn drop(&mut self) {
        // In a fork()ed child the attachment is the parent's: leave it (and its page table) alone.
        if self.pt.is_none() || !self.dev.iommufd.in_owner_process() {
            return;
        }
        if let Err(e) = self.do_detach() {
            log::error!(
                "iommufd: detaching device {} (pasid {:?}) on drop failed; the device keeps the page \
                 table alive until the slot is attached again or the device is closed: {e}",
                self.dev.dev_id,
                self.pasid
            );
            if let Some(pt) = self.pt.take() {
                self.dev.attached().insert(self.pasid, Slot::Orphaned(pt));
            }
        }
    }
}

/// Cases per property test: 1000 on the host; 64 inside the test VM (`IOMMUFD_TEST_IOMMU` is set),
/// where the same pure functions run again under emulation and more cases would add time, not
/// coverage.
#[cfg(test)]
pub(crate) fn prop_cases() -> u32 {
    if std::env::var_os("IOMMUFD_TEST_IOMMU").is_some() { 64 } else { 1000 }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_that_are_not_a_vfio_cdev_are_refused() {
        let e = VfioDevice::open("/dev/null").unwrap_err();
        assert!(matches!(e, Error::WrongFile { op: "VfioDevice::open", .. }), "{e}");
        assert!(e.to_string().contains("not a VFIO device cdev"), "{e}");
        let null = std::fs::OpenOptions::new().read(true).write(true).open("/dev/null").unwrap();
        let e = VfioDevice::from_fd(null.into()).unwrap_err();
        assert!(matches!(e, Error::WrongFile { op: "VfioDevice::from_fd", .. }), "{e}");
        let file = std::fs::File::open("/proc/self/exe").unwrap();
        let e = VfioDevice::from_fd(file.into()).unwrap_err();
        assert!(e.to_string().ends_with("the file is a regular file"), "{e}");
        // Unchecked adoption keeps the fd but knows no device name for it.
        let null = std::fs::File::open("/dev/null").unwrap();
        // SAFETY: the fd is freshly opened and its ownership moves to the value; it is deliberately
        // not a cdev, which only makes later ioctls fail.
        let dev = unsafe { VfioDevice::from_raw_fd(std::os::fd::IntoRawFd::into_raw_fd(null)) };
        assert_eq!(dev.name(), None);
    }
}
