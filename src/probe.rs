//! Capability probing: which iommufd and VFIO device ioctls the running kernel knows, and which newer
//! structure fields it accepts, found at run time without side effects.
//!
//! [`Iommufd::probe`] answers for the 22 iommufd ioctls of Linux 7.3 ([`Ioctl`]) and a set of
//! field-level features ([`Capabilities`]); [`BoundDevice::probe`] answers for the VFIO device cdev
//! ioctls ([`DeviceIoctl`]), the device's [features](crate::DeviceFeature) and PASID attachment
//! ([`DeviceCapabilities`]). [`Iommufd::capabilities`] caches the first answer.
//!
//! # How, and why nothing happens
//!
//! Every iommufd ioctl goes through one dispatcher (`iommufd_fops_ioctl` in
//! `drivers/iommu/iommufd/main.c`), which for each request knows the size of its argument structure
//! (`size`) and the end of its last mandatory field (`min_size`), and runs, in this order:
//!
//! 1. an unknown request number: `ENOTTY`;
//! 2. `get_user(user_size)`, then `user_size < min_size`: `EINVAL`;
//! 3. `copy_struct_from_user(buf, size, arg, user_size)`: if `user_size > size`, the bytes the kernel
//!    does not know must be zero (`E2BIG` otherwise); a fault reading them, or reading the known part,
//!    is `EFAULT`;
//! 4. only then the operation itself.
//!
//! **Existence.** The probe sends `user_size = 0`: a known ioctl stops at step 2 with `EINVAL`, an
//! unknown one at step 1 with `ENOTTY`. Neither reaches step 4.
//!
//! **Structure size.** To learn whether the kernel's structure extends past byte `S` (that is,
//! whether it knows a field starting there), the probe places the argument at the end of a readable
//! page followed by an inaccessible (`PROT_NONE`) guard page, so that bytes `0..S+8` are readable,
//! byte `S` is non-zero and the rest zero, and passes `user_size = S + 16`, which reaches 8 bytes into
//! the guard page. If the kernel's `size <= S`, step 3 scans the unknown tail from `size` upward,
//! meets the non-zero byte `S` before the guard page and fails with `E2BIG`. If `size > S`, every read
//! step 3 makes covers the guard page (the unknown tail past `size`, or the known part up to `size`),
//! and it fails with `EFAULT`. So the answer is always `E2BIG` or `EFAULT` (or `EINVAL` at step 2 when
//! `S + 16 < min_size`, which also means `size > S`), and **step 4 never runs**: the probe cannot
//! create, change or destroy anything. A binary search over `S` gives the kernel's exact `size`
//! ([`Capabilities::arg_size`]), from which the field-level booleans follow.
//!
//! A few features did not grow a structure; they are told apart by an argument that an older kernel
//! rejects before looking at it and a newer one rejects a step later, always before any state is
//! touched (each is described on its [`Capabilities`] field).
//!
//! The VFIO device ioctls (`vfio_device_fops_unl_ioctl` and vfio-pci) check `argsz` first: the probe
//! sends `argsz = 0` and reads `EINVAL` as "known" and `ENOTTY` as "unknown". Features are probed with
//! `VFIO_DEVICE_FEATURE_PROBE`, which the uAPI defines as a pure query. PASID attachment is probed with
//! the guard-page technique on `VFIO_DEVICE_ATTACH_IOMMUFD_PT` (see
//! [`DeviceCapabilities::pasid_attach`]).

use std::ffi::c_int;
use std::mem::offset_of;
use std::os::fd::{AsFd, BorrowedFd};
use std::ptr::NonNull;

use iommufd_sys as sys;

use crate::device::{BoundDevice, DeviceFeature, DeviceFlags, FeatureOps};
use crate::dma::page_size;
use crate::error::{Errno, Error, Result};
use crate::ioctl::{self, Op, Sized32};
use crate::iommufd::Iommufd;

macro_rules! ioctl_enum {
    ($(#[$meta:meta])* $vis:vis enum $name:ident { $($(#[$vmeta:meta])* $variant:ident = $op:ident,)* }) => {
        $(#[$meta])*
        $vis enum $name {
            $($(#[$vmeta])* $variant,)*
        }

        impl $name {
            /// Every variant, in request-number order.
            pub const ALL: &'static [$name] = &[$($name::$variant),*];

            fn op(self) -> &'static Op {
                match self {
                    $($name::$variant => &ioctl::$op,)*
                }
            }

            fn index(self) -> usize {
                self as usize
            }
        }
    };
}

ioctl_enum! {
    /// An iommufd ioctl (`/dev/iommu`): the 22 of Linux 7.3, in request-number order.
    ///
    /// [`name`](Self::name) gives the kernel's name and [`since`](Self::since) the release that
    /// introduced it.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
    #[non_exhaustive]
    pub enum Ioctl {
        /// `IOMMU_DESTROY` (6.2).
        Destroy = DESTROY,
        /// `IOMMU_IOAS_ALLOC` (6.2).
        IoasAlloc = IOAS_ALLOC,
        /// `IOMMU_IOAS_ALLOW_IOVAS` (6.2).
        IoasAllowIovas = IOAS_ALLOW_IOVAS,
        /// `IOMMU_IOAS_COPY` (6.2).
        IoasCopy = IOAS_COPY,
        /// `IOMMU_IOAS_IOVA_RANGES` (6.2).
        IoasIovaRanges = IOAS_IOVA_RANGES,
        /// `IOMMU_IOAS_MAP` (6.2).
        IoasMap = IOAS_MAP,
        /// `IOMMU_IOAS_UNMAP` (6.2).
        IoasUnmap = IOAS_UNMAP,
        /// `IOMMU_OPTION` (6.2).
        IommuOption = OPTION,
        /// `IOMMU_VFIO_IOAS` (6.2).
        VfioIoas = VFIO_IOAS,
        /// `IOMMU_HWPT_ALLOC` (6.6).
        HwptAlloc = HWPT_ALLOC,
        /// `IOMMU_GET_HW_INFO` (6.6).
        GetHwInfo = GET_HW_INFO,
        /// `IOMMU_HWPT_SET_DIRTY_TRACKING` (6.7).
        HwptSetDirtyTracking = HWPT_SET_DIRTY_TRACKING,
        /// `IOMMU_HWPT_GET_DIRTY_BITMAP` (6.7).
        HwptGetDirtyBitmap = HWPT_GET_DIRTY_BITMAP,
        /// `IOMMU_HWPT_INVALIDATE` (6.8).
        HwptInvalidate = HWPT_INVALIDATE,
        /// `IOMMU_FAULT_QUEUE_ALLOC` (6.11).
        FaultQueueAlloc = FAULT_QUEUE_ALLOC,
        /// `IOMMU_IOAS_MAP_FILE` (6.13).
        IoasMapFile = IOAS_MAP_FILE,
        /// `IOMMU_VIOMMU_ALLOC` (6.13).
        ViommuAlloc = VIOMMU_ALLOC,
        /// `IOMMU_VDEVICE_ALLOC` (6.13).
        VdeviceAlloc = VDEVICE_ALLOC,
        /// `IOMMU_IOAS_CHANGE_PROCESS` (6.13).
        IoasChangeProcess = IOAS_CHANGE_PROCESS,
        /// `IOMMU_VEVENTQ_ALLOC` (6.15).
        VeventqAlloc = VEVENTQ_ALLOC,
        /// `IOMMU_HW_QUEUE_ALLOC` (6.17).
        HwQueueAlloc = HW_QUEUE_ALLOC,
        /// `IOMMU_IOAS_NOIOMMU_GET_PA` (7.3).
        IoasNoiommuGetPa = IOAS_NOIOMMU_GET_PA,
    }
}

ioctl_enum! {
    /// A VFIO device cdev ioctl (`/dev/vfio/devices/vfioN`).
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
    #[non_exhaustive]
    pub enum DeviceIoctl {
        /// `VFIO_DEVICE_GET_INFO` (3.6).
        GetInfo = DEVICE_GET_INFO,
        /// `VFIO_DEVICE_GET_REGION_INFO` (3.6).
        GetRegionInfo = DEVICE_GET_REGION_INFO,
        /// `VFIO_DEVICE_GET_IRQ_INFO` (3.6).
        GetIrqInfo = DEVICE_GET_IRQ_INFO,
        /// `VFIO_DEVICE_SET_IRQS` (3.6).
        SetIrqs = DEVICE_SET_IRQS,
        /// `VFIO_DEVICE_RESET` (3.6).
        Reset = DEVICE_RESET,
        /// `VFIO_DEVICE_GET_PCI_HOT_RESET_INFO` (3.12; the dev-id flavour for cdevs since 6.6).
        GetPciHotResetInfo = DEVICE_GET_PCI_HOT_RESET_INFO,
        /// `VFIO_DEVICE_PCI_HOT_RESET` (3.12; the zero-group-fd flavour for cdevs since 6.6).
        PciHotReset = DEVICE_PCI_HOT_RESET,
        /// `VFIO_DEVICE_IOEVENTFD` (4.17).
        Ioeventfd = DEVICE_IOEVENTFD,
        /// `VFIO_DEVICE_FEATURE` (5.7).
        Feature = DEVICE_FEATURE,
        /// `VFIO_DEVICE_BIND_IOMMUFD` (6.6).
        BindIommufd = DEVICE_BIND_IOMMUFD,
        /// `VFIO_DEVICE_ATTACH_IOMMUFD_PT` (6.6).
        AttachIommufdPt = DEVICE_ATTACH_IOMMUFD_PT,
        /// `VFIO_DEVICE_DETACH_IOMMUFD_PT` (6.6).
        DetachIommufdPt = DEVICE_DETACH_IOMMUFD_PT,
    }
}

impl Ioctl {
    /// The kernel's name (`IOMMU_IOAS_MAP`).
    pub fn name(self) -> &'static str {
        self.op().name
    }

    /// The first Linux release that has it (`"6.2"`).
    pub fn since(self) -> &'static str {
        self.op().since
    }

    /// The request number.
    pub fn request(self) -> u32 {
        self.op().request
    }
}

impl DeviceIoctl {
    /// The kernel's name (`VFIO_DEVICE_GET_INFO`).
    pub fn name(self) -> &'static str {
        self.op().name
    }

    /// The first Linux release that has it.
    pub fn since(self) -> &'static str {
        self.op().since
    }

    /// The request number (unique only among VFIO device ioctls).
    pub fn request(self) -> u32 {
        self.op().request
    }
}

const IOCTLS: usize = 22;
const DEVICE_IOCTLS: usize = 12;
const _: () = assert!(Ioctl::ALL.len() == IOCTLS && DeviceIoctl::ALL.len() == DEVICE_IOCTLS);

/// End offset of a field, as the kernel's `offsetofend`.
macro_rules! offset_end {
    ($t:ty, $field:ident) => {{
        let v = <$t>::default();
        offset_of!($t, $field) + std::mem::size_of_val(&v.$field)
    }};
}

/// What the running kernel's iommufd supports, from [`Iommufd::probe`].
///
/// The booleans name structure fields and flags added after their ioctl; each is false when the ioctl
/// itself is missing.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Capabilities {
    /// For each [`Ioctl`] (by index): the kernel's argument structure size, if it knows the ioctl.
    sizes: [Option<u32>; IOCTLS],
    /// `iommu_hwpt_alloc.data_type/data_len/data_uptr` (6.7): driver-specific (nested) HWPT data.
    /// From the structure size.
    pub hwpt_alloc_data: bool,
    /// `iommu_hwpt_alloc.fault_id` and `IOMMU_HWPT_FAULT_ID_VALID` (6.11): IO page fault delivery.
    /// From the structure size.
    pub hwpt_alloc_fault_id: bool,
    /// `iommu_hw_info.out_capabilities` (6.7). From the structure size.
    pub hw_info_capabilities: bool,
    /// `iommu_hw_info.out_max_pasid_log2` (6.15, with PASID attachment). The field took one byte of
    /// `__reserved`, so the size did not change: the probe sets that byte with `dev_id` 0 (no object
    /// has id 0). Older kernels refuse the non-zero `__reserved` with `EOPNOTSUPP` first; newer ones
    /// ignore the output field and fail the device lookup with `ENOENT`. The ioctl is a query either
    /// way.
    pub hw_info_max_pasid: bool,
    /// `IOMMU_HW_INFO_FLAG_INPUT_TYPE` with `iommu_hw_info.in_data_type` (6.17). Probed like
    /// [`hw_info_max_pasid`](Self::hw_info_max_pasid): the flag with `dev_id` 0 gives `ENOENT` where
    /// it is known and `EOPNOTSUPP` (unknown flag, checked first) where it is not.
    pub hw_info_input_type: bool,
    /// `iommu_viommu_alloc.data_len/data_uptr` (6.17): driver-specific vIOMMU data. From the structure
    /// size.
    pub viommu_alloc_data: bool,
    /// `IOMMU_HWPT_FAULT_ID_VALID` on a paging (not nested) HWPT (6.13; nested ones take it since 6.11).
    /// The kernel checks the flag only after looking up the device and page table, so no call can
    /// probe it without side effects: it is inferred from the ioctls that came in the same release
    /// (`IOMMU_IOAS_CHANGE_PROCESS` and the rest of 6.13).
    pub hwpt_paging_fault_id: bool,
    /// `IOMMU_HWPT_ALLOC_PASID` (6.15): PASID-compatible page tables. Checked by the kernel only at
    /// allocation, like [`hwpt_paging_fault_id`](Self::hwpt_paging_fault_id): inferred from the
    /// ioctl that came in the same release (`IOMMU_VEVENTQ_ALLOC`). Not from
    /// [`hw_info_max_pasid`](Self::hw_info_max_pasid): stable 6.12 kernels report the PASID width
    /// without taking the flag.
    pub hwpt_alloc_pasid: bool,
    /// `IOMMU_IOAS_NOIOMMU_GET_PA` is implemented (the kernel has `CONFIG_IOMMUFD_NOIOMMU`, selected by
    /// `CONFIG_VFIO_NOIOMMU`); without it the ioctl exists but always answers `EOPNOTSUPP`. Probed with
    /// `length` 0, which an implementing kernel refuses with `EINVAL` (or `EPERM` without
    /// `CAP_SYS_RAWIO`) before looking up anything.
    pub noiommu: bool,
}

impl Capabilities {
    /// True if the running kernel knows `ioctl`.
    pub fn supports(&self, ioctl: Ioctl) -> bool {
        self.sizes[ioctl.index()].is_some()
    }

    /// The size of the kernel's argument structure for `ioctl` (`None` if unsupported). A kernel newer
    /// than the bindings may report more than `size_of` the binding's structure; an older one less.
    pub fn arg_size(&self, ioctl: Ioctl) -> Option<u32> {
        self.sizes[ioctl.index()]
    }

    /// The supported ioctls, in request-number order.
    pub fn supported(&self) -> Vec<Ioctl> {
        Ioctl::ALL.iter().copied().filter(|&i| self.supports(i)).collect()
    }

    /// The ioctls the running kernel lacks.
    pub fn unsupported(&self) -> Vec<Ioctl> {
        Ioctl::ALL.iter().copied().filter(|&i| !self.supports(i)).collect()
    }

    /// `Ok` if `ioctl` is supported, otherwise the [`Error::Unsupported`] the ioctl would give, naming
    /// the release that introduced it.
    pub fn require(&self, ioctl: Ioctl) -> Result<()> {
        if self.supports(ioctl) {
            Ok(())
        } else {
            Err(Error::unsupported(ioctl.name(), ioctl.since(), Errno::NOTTY))
        }
    }

    /// True if the running kernel is known to be older than Linux `release` (`"6.19"`): it lacks an
    /// iommufd ioctl that `release` or an earlier release introduced. Every iommufd ioctl is built
    /// into every kernel of its release (none depends on a config option), so a missing one dates the
    /// kernel. False when nothing says so (the kernel may still be older, if no ioctl came between it
    /// and `release`); false for a `release` that does not parse as `MAJOR.MINOR`.
    pub fn predates(&self, release: &str) -> bool {
        let Some(wanted) = parse_release(release) else { return false };
        self.unsupported().iter().any(|i| parse_release(i.since()).is_some_and(|since| since <= wanted))
    }

    /// `Ok` unless `known` is false: then the [`Error::Unsupported`] for the newer flag or field `op`,
    /// added in `since`, with the errno a kernel without it answers.
    pub(crate) fn require_field(
        &self,
        known: bool,
        op: &'static str,
        since: &'static str,
        errno: Errno,
    ) -> Result<()> {
        if known { Ok(()) } else { Err(Error::unsupported(op, since, errno)) }
    }

    /// Derives the field-level booleans that follow from structure sizes; the flag-probed ones are
    /// passed in.
    fn from_sizes(sizes: [Option<u32>; IOCTLS], flags: ProbedFlags) -> Capabilities {
        let at_least = |ioctl: Ioctl, end: usize| sizes[ioctl.index()].is_some_and(|s| s as usize >= end);
        Capabilities {
            hwpt_alloc_data: at_least(Ioctl::HwptAlloc, offset_end!(sys::iommu_hwpt_alloc, data_uptr)),
            hwpt_alloc_fault_id: at_least(Ioctl::HwptAlloc, offset_end!(sys::iommu_hwpt_alloc, fault_id)),
            hw_info_capabilities: at_least(
                Ioctl::GetHwInfo,
                offset_end!(sys::iommu_hw_info, out_capabilities),
            ),
            hw_info_max_pasid: sizes[Ioctl::GetHwInfo.index()].is_some() && flags.hw_info_max_pasid,
            hw_info_input_type: sizes[Ioctl::GetHwInfo.index()].is_some() && flags.hw_info_input_type,
            viommu_alloc_data: at_least(Ioctl::ViommuAlloc, offset_end!(sys::iommu_viommu_alloc, data_uptr)),
            hwpt_paging_fault_id: at_least(Ioctl::HwptAlloc, offset_end!(sys::iommu_hwpt_alloc, fault_id))
                && sizes[Ioctl::IoasChangeProcess.index()].is_some(),
            hwpt_alloc_pasid: sizes[Ioctl::HwptAlloc.index()].is_some()
                && sizes[Ioctl::VeventqAlloc.index()].is_some(),
            noiommu: sizes[Ioctl::IoasNoiommuGetPa.index()].is_some() && flags.noiommu,
            sizes,
        }
    }
}

/// `"6.15"` as `(6, 15)`.
fn parse_release(release: &str) -> Option<(u32, u32)> {
    let (major, minor) = release.split_once('.')?;
    Some((major.parse().ok()?, minor.parse().ok()?))
}

#[derive(Debug, Clone, Copy, Default)]
struct ProbedFlags {
    hw_info_max_pasid: bool,
    hw_info_input_type: bool,
    noiommu: bool,
}

/// What a bound VFIO device's kernel and driver support, from [`BoundDevice::probe`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct DeviceCapabilities {
    supported: [bool; DEVICE_IOCTLS],
    /// `VFIO_DEVICE_ATTACH_PASID`/`VFIO_DEVICE_DETACH_PASID` (6.15) are accepted by the kernel and the
    /// device's driver. This says nothing about whether the device and IOMMU can do PASID (see
    /// [`HwInfo::max_pasid_log2`](crate::HwInfo)).
    ///
    /// Probed by attaching with the PASID flag and an argument whose `pasid` field lies on an
    /// inaccessible page: a kernel that knows the flag reads the field and fails with `EFAULT` before
    /// attaching anything; one that does not refuses the flag (`EINVAL`) without reading it; a driver
    /// without PASID support gives `EOPNOTSUPP` first.
    pub pasid_attach: bool,
    /// `VFIO_DEVICE_BIND_FLAG_TOKEN` with `vfio_device_bind_iommufd.token_uuid_ptr`: binding a cdev with
    /// a VF token (6.17). Probed by structure size (as for iommufd) with `iommufd = -1`, so that a
    /// kernel that predates the field refuses the argument with `EINVAL` before looking further.
    pub bind_token: bool,
    /// The [features](DeviceFeature) the device supports and how (`VFIO_DEVICE_FEATURE_PROBE`), for
    /// every feature in [`DeviceFeature::ALL`] that is supported at all.
    pub features: Vec<(DeviceFeature, FeatureOps)>,
}

impl DeviceCapabilities {
    /// True if the device accepts `ioctl`. [`DeviceIoctl::Reset`] (which takes no argument and so
    /// cannot be probed) counts as supported when the device reports [`DeviceFlags::RESET`].
    pub fn supports(&self, ioctl: DeviceIoctl) -> bool {
        self.supported[ioctl.index()]
    }

    /// The supported ioctls.
    pub fn supported(&self) -> Vec<DeviceIoctl> {
        DeviceIoctl::ALL.iter().copied().filter(|&i| self.supports(i)).collect()
    }

    /// How `feature` is supported (empty if it is not).
    pub fn feature(&self, feature: DeviceFeature) -> FeatureOps {
        self.features.iter().find(|(f, _)| *f == feature).map_or(FeatureOps::empty(), |&(_, ops)| ops)
    }
}

/// Two pages: the first readable and writable, the second inaccessible. Arguments placed at the end
/// of the first page make the kernel fault (`EFAULT`) on any read past them.
struct GuardPage {
    base: NonNull<u8>,
    page: usize,
}

impl GuardPage {
    fn new() -> Result<GuardPage> {
        use rustix::mm::{MapFlags, MprotectFlags, ProtFlags};
        let page = page_size();
        // SAFETY: a fresh anonymous private mapping at a kernel-chosen address (null hint) aliases no
        // existing memory.
        let ptr = unsafe {
            rustix::mm::mmap_anonymous(
                std::ptr::null_mut(),
                2 * page,
                ProtFlags::READ | ProtFlags::WRITE,
                MapFlags::PRIVATE,
            )
        }
        .map_err(|e| Error::os("mmap", e))?;
        let base = NonNull::new(ptr.cast::<u8>()).ok_or(Error::os("mmap", Errno::NOMEM))?;
        let guard = GuardPage { base, page };
        // SAFETY: the second page belongs to the mapping just created and owned by `guard`; no
        // reference into it exists, and none is ever made.
        unsafe { rustix::mm::mprotect(ptr.cast::<u8>().add(page).cast(), page, MprotectFlags::empty()) }
            .map_err(|e| Error::os("mprotect", e))?;
        Ok(guard)
    }

    /// The last `len` bytes of the accessible page, zeroed. The guard page follows them directly.
    fn tail(&mut self, len: usize) -> &mut [u8] {
        assert!(len <= self.page, "probe argument larger than a page");
        // SAFETY: `base + page - len .. base + page` lies in the first page of the mapping `self` owns,
        // which is readable and writable; the `&mut self` borrow makes this the only reference to it.
        let s = unsafe { std::slice::from_raw_parts_mut(self.base.as_ptr().add(self.page - len), len) };
        s.fill(0);
        s
    }
}

impl Drop for GuardPage {
    fn drop(&mut self) {
        // SAFETY: `base..base+2*page` is the mapping `new` created and this value owns; the only
        // references into it were borrows of `self`, which have ended.
        if let Err(e) = unsafe { rustix::mm::munmap(self.base.as_ptr().cast(), 2 * self.page) } {
            log::error!("iommufd: munmap of the probe guard page failed: {e}");
        }
    }
}

fn put_u32(buf: &mut [u8], at: usize, v: u32) {
    buf[at..at + 4].copy_from_slice(&v.to_ne_bytes());
}

/// Turns an ioctl result into the errno the probe classifies (`Ok` = the call succeeded).
fn errno_of(r: Result<c_int>) -> Result<(), Errno> {
    match r {
        Ok(_) => Ok(()),
        Err(e) => Err(e.errno().unwrap_or(Errno::IO)),
    }
}

fn unexpected(op: &'static str, what: &str, answer: Result<(), Errno>) -> Error {
    let answer = match answer {
        Ok(()) => "success".to_string(),
        Err(e) => format!("{e}"),
    };
    Error::Protocol { op, detail: format!("probe ({what}) got an unexpected answer: {answer}") }
}

/// The existence probe: `op` with a zero size/argsz in a zeroed 128-byte buffer. True if the kernel
/// answers EINVAL (known, size below its minimum), false for ENOTTY (unknown).
fn probe_exists(fd: BorrowedFd<'_>, op: &Op) -> Result<bool> {
    let mut buf = [0u64; 16];
    // SAFETY: `buf` starts with the op's `size`/`argsz` field, set to 0 (no larger than the buffer),
    // and holds no pointers. The kernel reads at most the op's fixed header (under 128 bytes for every
    // op probed here), finds the size below the minimum and returns before writing anything.
    let r = errno_of(unsafe { ioctl::call_buf(fd, op, &mut buf) });
    match r {
        Err(Errno::INVAL) => Ok(true),
        Err(Errno::NOTTY) => Ok(false),
        other => Err(unexpected(op.name, "zero size", other)),
    }
}

/// One step of the size search: true if the kernel's structure for `op` ends at or before byte `s`.
///
/// `prefix` bytes are written at the start of the argument (after the size field, which this sets).
fn size_at_most(
    fd: BorrowedFd<'_>,
    op: &Op,
    guard: &mut GuardPage,
    s: usize,
    prefix: &[(usize, u32)],
) -> Result<Option<bool>> {
    let buf = guard.tail(s + 8);
    put_u32(buf, 0, (s + 16) as u32);
    for &(at, v) in prefix {
        put_u32(buf, at, v);
    }
    buf[s] = 1;
    // SAFETY: this deliberately passes a size 8 bytes larger than `buf`: those 8 bytes are the start of
    // the guard page right after `buf`, mapped PROT_NONE and owned by `guard`, with no Rust reference
    // to it. The kernel's reads there fault and fail the call with EFAULT; no other memory is read.
    // The kernel writes nothing: every answer this request can get (E2BIG or EFAULT from
    // `copy_struct_from_user`, EINVAL from the minimum-size check, or EINVAL from a pre-extension VFIO
    // bind refusing `iommufd = -1`) is returned before the operation runs (module documentation).
    let r = errno_of(unsafe { ioctl::call_buf(fd, op, buf) });
    match r {
        Err(Errno::TOOBIG) => Ok(Some(true)),
        Err(Errno::FAULT) => Ok(Some(false)),
        Err(Errno::INVAL) => Ok(None),
        other => Err(unexpected(op.name, "structure size", other)),
    }
}

/// Largest structure size searched for; `union ucmd_buffer` in 7.3 is under 100 bytes.
const MAX_ARG_SIZE: usize = 1024;

/// The kernel's argument size for an iommufd `op` it supports (binary search on [`size_at_most`]).
fn arg_size(fd: BorrowedFd<'_>, op: &Op, guard: &mut GuardPage) -> Result<u32> {
    // Invariant: the size is > lo and <= hi. Sizes are multiples of 4 (every structure starts with a
    // u32 size field).
    let (mut lo, mut hi) = (4usize, MAX_ARG_SIZE);
    if size_at_most(fd, op, guard, hi, &[])? != Some(true) {
        return Err(Error::Protocol {
            op: op.name,
            detail: format!("probe: argument structure larger than {MAX_ARG_SIZE} bytes"),
        });
    }
    while hi - lo > 4 {
        let mid = (lo + hi) / 2 / 4 * 4;
        // EINVAL (below the minimum size) also means the structure is larger than `mid`.
        if size_at_most(fd, op, guard, mid, &[])?.unwrap_or(false) {
            hi = mid;
        } else {
            lo = mid;
        }
    }
    Ok(hi as u32)
}

impl Iommufd {
    /// Finds out which iommufd ioctls and newer structure fields the running kernel supports, without
    /// side effects (see the [module documentation](crate::probe) for the technique and why it cannot
    /// change any state). About 200 ioctls that all fail early; a few microseconds each.
    ///
    /// [`capabilities`](Self::capabilities) caches the answer.
    pub fn probe(&self) -> Result<Capabilities> {
        let fd = self.as_fd();
        let mut guard = GuardPage::new()?;
        let mut sizes = [None; IOCTLS];
        for &ioctl in Ioctl::ALL {
            if probe_exists(fd, ioctl.op())? {
                sizes[ioctl.index()] = Some(arg_size(fd, ioctl.op(), &mut guard)?);
            }
        }
        let mut flags = ProbedFlags::default();
        if sizes[Ioctl::GetHwInfo.index()].is_some() {
            flags.hw_info_max_pasid = hw_info_probe(fd, |a| a.out_max_pasid_log2 = 1)?;
            flags.hw_info_input_type = hw_info_probe(fd, |a| a.flags = sys::IOMMU_HW_INFO_FLAG_INPUT_TYPE)?;
        }
        if sizes[Ioctl::IoasNoiommuGetPa.index()].is_some() {
            flags.noiommu = noiommu_probe(fd)?;
        }
        Ok(Capabilities::from_sizes(sizes, flags))
    }
}

/// `IOMMU_GET_HW_INFO` for device id 0 with one input set by `set`: `ENOENT` means the kernel got past
/// its input checks (it knows the input), `EOPNOTSUPP` that it refused the input.
fn hw_info_probe(fd: BorrowedFd<'_>, set: impl FnOnce(&mut sys::iommu_hw_info)) -> Result<bool> {
    let mut arg = sys::iommu_hw_info::new();
    set(&mut arg);
    // SAFETY: IOMMU_GET_HW_INFO takes `iommu_hw_info`, sized by `new()`; `data_uptr` is null with
    // `data_len` 0, so the kernel writes no data. It fails before answering (no device has id 0).
    let r = errno_of(unsafe { ioctl::call(fd, &ioctl::GET_HW_INFO, &mut arg) });
    match r {
        Err(Errno::NOENT) => Ok(true),
        Err(Errno::OPNOTSUPP) => Ok(false),
        other => Err(unexpected(ioctl::GET_HW_INFO.name, "input field", other)),
    }
}

/// `IOMMU_IOAS_NOIOMMU_GET_PA` with length 0: `EINVAL`/`EPERM` if implemented, `EOPNOTSUPP` if the
/// kernel lacks `CONFIG_IOMMUFD_NOIOMMU`.
fn noiommu_probe(fd: BorrowedFd<'_>) -> Result<bool> {
    let mut arg = sys::iommu_ioas_noiommu_get_pa::new();
    // SAFETY: IOMMU_IOAS_NOIOMMU_GET_PA takes `iommu_ioas_noiommu_get_pa`, sized by `new()`, with no
    // pointers; with `length` 0 it fails before any lookup and writes nothing back.
    let r = errno_of(unsafe { ioctl::call(fd, &ioctl::IOAS_NOIOMMU_GET_PA, &mut arg) });
    match r {
        Err(Errno::INVAL | Errno::PERM) => Ok(true),
        Err(Errno::OPNOTSUPP) => Ok(false),
        other => Err(unexpected(ioctl::IOAS_NOIOMMU_GET_PA.name, "length 0", other)),
    }
}

impl BoundDevice {
    /// Finds out which VFIO device ioctls, features and PASID attachment the running kernel and this
    /// device's driver support, without side effects (see the [module documentation](crate::probe)).
    pub fn probe(&self) -> Result<DeviceCapabilities> {
        let fd = self.as_fd();
        let mut supported = [false; DEVICE_IOCTLS];
        for &ioctl in DeviceIoctl::ALL {
            supported[ioctl.index()] = match ioctl {
                // No argument to make invalid: the device's own flag says whether it can reset.
                DeviceIoctl::Reset => self.info()?.flags.contains(DeviceFlags::RESET),
                // Bound through the cdev: the kernel has the cdev ioctls (6.6).
                DeviceIoctl::BindIommufd | DeviceIoctl::AttachIommufdPt | DeviceIoctl::DetachIommufdPt => {
                    true
                }
                _ => probe_exists(fd, ioctl.op())?,
            };
        }
        let mut guard = GuardPage::new()?;
        let pasid_attach = pasid_probe(fd, &mut guard)?;
        let bind_token = bind_token_probe(fd, &mut guard)?;
        let mut features = Vec::new();
        for &feature in DeviceFeature::ALL {
            let ops = self.feature_probe(feature)?;
            if !ops.is_empty() {
                features.push((feature, ops));
            }
        }
        Ok(DeviceCapabilities { supported, pasid_attach, bind_token, features })
    }
}

/// Whether the kernel binds cdevs with a VF token ([`DeviceCapabilities::bind_token`]). Works on a
/// cdev whether or not it is bound yet: every answer comes before the bind is attempted.
pub(crate) fn probe_bind_token(cdev: BorrowedFd<'_>) -> Result<bool> {
    bind_token_probe(cdev, &mut GuardPage::new()?)
}

/// Who lacks PASID attachment, if anyone: `Ok(None)` if the kernel and driver accept it,
/// `Some(Errno::INVAL)` if the kernel predates the flag (6.15), `Some(Errno::OPNOTSUPP)` if the
/// device's driver does not implement it. The cdev must be bound.
pub(crate) fn pasid_attach_refusal(cdev: BorrowedFd<'_>) -> Result<Option<Errno>> {
    pasid_answer(cdev, &mut GuardPage::new()?)
}

fn bind_token_probe(fd: BorrowedFd<'_>, guard: &mut GuardPage) -> Result<bool> {
    // Kernels before the token field refuse `iommufd = -1` (offset 8) with EINVAL before anything else.
    let iommufd_at = offset_of!(sys::vfio_device_bind_iommufd, iommufd);
    let end = offset_end!(sys::vfio_device_bind_iommufd, out_devid);
    let at_most = size_at_most(fd, &ioctl::DEVICE_BIND_IOMMUFD, guard, end, &[(iommufd_at, u32::MAX)])?;
    Ok(at_most == Some(false))
}

/// The PASID attach probe ([`DeviceCapabilities::pasid_attach`]).
fn pasid_probe(fd: BorrowedFd<'_>, guard: &mut GuardPage) -> Result<bool> {
    Ok(pasid_answer(fd, guard)?.is_none())
}

/// The PASID attach probe's answer: `None` if accepted, else the errno of the refusal.
fn pasid_answer(fd: BorrowedFd<'_>, guard: &mut GuardPage) -> Result<Option<Errno>> {
    let op = &ioctl::DEVICE_ATTACH_IOMMUFD_PT;
    let pasid_at = offset_of!(sys::vfio_device_attach_iommufd_pt, pasid);
    let buf = guard.tail(pasid_at);
    put_u32(buf, offset_of!(sys::vfio_device_attach_iommufd_pt, argsz), size_of_attach());
    put_u32(buf, offset_of!(sys::vfio_device_attach_iommufd_pt, flags), sys::VFIO_DEVICE_ATTACH_PASID);
    // SAFETY: `buf` holds `vfio_device_attach_iommufd_pt` up to (not including) `pasid`, whose 4 bytes
    // are the start of the PROT_NONE guard page owned by `guard`, with no Rust reference to it. A
    // kernel that reads `pasid` faults and returns EFAULT before attaching; an older one refuses the
    // flag (EINVAL) without reading it; a driver without PASID support returns EOPNOTSUPP first. None
    // of these writes anything (the kernel writes `pt_id` back only after a successful attach).
    let r = errno_of(unsafe { ioctl::call_buf(fd, op, buf) });
    match r {
        Err(Errno::FAULT) => Ok(None),
        Err(e @ (Errno::INVAL | Errno::OPNOTSUPP)) => Ok(Some(e)),
        other => Err(unexpected(op.name, "PASID flag", other)),
    }
}

fn size_of_attach() -> u32 {
    std::mem::size_of::<sys::vfio_device_attach_iommufd_pt>() as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ioctl_tables_match_the_op_table() {
        assert_eq!(Ioctl::ALL.len(), 22);
        // The 22 iommufd ioctls are exactly the iommufd ops of ioctl.rs, in request order 0x80..0x95.
        let iommufd_ops: Vec<u32> =
            ioctl::ALL.iter().filter(|o| o.name.starts_with("IOMMU_")).map(|o| o.request).collect();
        let ours: Vec<u32> = Ioctl::ALL.iter().map(|i| i.request()).collect();
        assert_eq!(ours, iommufd_ops);
        for (n, i) in Ioctl::ALL.iter().enumerate() {
            assert_eq!(i.request() & 0xff, 0x80 + n as u32, "{}", i.name());
            assert_eq!(i.index(), n);
        }
        assert_eq!(Ioctl::IoasNoiommuGetPa.name(), "IOMMU_IOAS_NOIOMMU_GET_PA");
        assert_eq!(Ioctl::IoasNoiommuGetPa.since(), "7.3");
        assert_eq!(Ioctl::IoasChangeProcess.since(), "6.13");
        // Every device ioctl but the mediated-display pair, which only vGPU drivers implement and whose
        // GET_GFX_DMABUF argument is a bare plane id (no argsz to probe with).
        let vfio_ops: Vec<u32> = ioctl::ALL
            .iter()
            .filter(|o| o.name.starts_with("VFIO_DEVICE_") && !o.name.contains("_GFX_"))
            .map(|o| o.request)
            .collect();
        let ours: Vec<u32> = DeviceIoctl::ALL.iter().map(|i| i.request()).collect();
        assert_eq!(ours, vfio_ops);
    }

    #[test]
    fn offsetofend_matches_the_kernel_layout() {
        assert_eq!(offset_end!(sys::iommu_hwpt_alloc, __reserved), 24);
        assert_eq!(offset_end!(sys::iommu_hwpt_alloc, data_uptr), 40);
        assert_eq!(offset_end!(sys::iommu_hwpt_alloc, fault_id), 44);
        assert_eq!(offset_end!(sys::iommu_hw_info, out_capabilities), 40);
        assert_eq!(offset_end!(sys::iommu_viommu_alloc, data_uptr), 40);
        assert_eq!(offset_end!(sys::vfio_device_bind_iommufd, out_devid), 16);
        assert_eq!(offset_of!(sys::vfio_device_attach_iommufd_pt, pasid), 12);
    }

    fn sizes_of(kernel: &[(Ioctl, u32)]) -> [Option<u32>; IOCTLS] {
        let mut sizes = [None; IOCTLS];
        for &(i, s) in kernel {
            sizes[i.index()] = Some(s);
        }
        sizes
    }

    #[test]
    fn field_booleans_follow_structure_sizes() {
        // A 6.6 kernel: HWPT_ALLOC 24 bytes, GET_HW_INFO 32, no vIOMMU.
        let six_six = Capabilities::from_sizes(
            sizes_of(&[(Ioctl::IoasAlloc, 12), (Ioctl::HwptAlloc, 24), (Ioctl::GetHwInfo, 32)]),
            ProbedFlags::default(),
        );
        assert!(six_six.supports(Ioctl::HwptAlloc) && !six_six.supports(Ioctl::ViommuAlloc));
        assert!(!six_six.hwpt_alloc_data && !six_six.hwpt_alloc_fault_id && !six_six.hw_info_capabilities);
        assert!(!six_six.viommu_alloc_data && !six_six.noiommu);
        assert_eq!(six_six.supported(), vec![Ioctl::IoasAlloc, Ioctl::HwptAlloc, Ioctl::GetHwInfo]);
        assert_eq!(six_six.unsupported().len(), 19);
        match six_six.require(Ioctl::IoasMapFile) {
            Err(Error::Unsupported { op, since, errno }) => {
                assert_eq!((op, since, errno), ("IOMMU_IOAS_MAP_FILE", "6.13", Errno::NOTTY))
            }
            other => panic!("{other:?}"),
        }
        assert!(six_six.require(Ioctl::HwptAlloc).is_ok());

        // 6.7: the data fields, out_capabilities; not yet fault_id.
        let six_seven = Capabilities::from_sizes(
            sizes_of(&[(Ioctl::HwptAlloc, 40), (Ioctl::GetHwInfo, 40)]),
            ProbedFlags::default(),
        );
        assert!(
            six_seven.hwpt_alloc_data && six_seven.hw_info_capabilities && !six_seven.hwpt_alloc_fault_id
        );

        // 7.3: everything, with the flag probes; flag answers without their ioctl count for nothing.
        let all = ProbedFlags { hw_info_max_pasid: true, hw_info_input_type: true, noiommu: true };
        let seven_three = Capabilities::from_sizes(
            sizes_of(&[(Ioctl::HwptAlloc, 48), (Ioctl::GetHwInfo, 40), (Ioctl::ViommuAlloc, 40)]),
            all,
        );
        assert!(seven_three.hwpt_alloc_fault_id && seven_three.viommu_alloc_data);
        assert!(seven_three.hw_info_max_pasid && seven_three.hw_info_input_type);
        assert!(!seven_three.noiommu, "NOIOMMU_GET_PA is not in this kernel's list");
        assert_eq!(seven_three.arg_size(Ioctl::HwptAlloc), Some(48));
        assert_eq!(seven_three.arg_size(Ioctl::Destroy), None);
    }

    #[test]
    fn newer_flags_follow_the_ioctls_of_their_release_and_date_the_kernel() {
        // A 6.12 kernel: the 15 ioctls up to 6.11, reporting the PASID width (stable 6.12 does).
        let six_twelve: Vec<(Ioctl, u32)> = Ioctl::ALL
            .iter()
            .filter(|i| parse_release(i.since()) <= Some((6, 12)))
            .map(|&i| (i, 48))
            .collect();
        assert_eq!(six_twelve.len(), 15);
        let flags = ProbedFlags { hw_info_max_pasid: true, ..ProbedFlags::default() };
        let lts = Capabilities::from_sizes(sizes_of(&six_twelve), flags);
        assert!(lts.hwpt_alloc_fault_id && lts.hw_info_max_pasid);
        assert!(!lts.hwpt_paging_fault_id && !lts.hwpt_alloc_pasid, "6.13 and 6.15 flags");
        assert!(lts.predates("6.13") && lts.predates("6.19") && lts.predates("7.3"));
        assert!(!lts.predates("6.12") && !lts.predates("6.2"));
        assert!(!lts.predates("seven"), "an unparsable release dates nothing");
        let e = lts.require_field(lts.hwpt_alloc_pasid, "op", "6.15", Errno::OPNOTSUPP).unwrap_err();
        assert!(
            matches!(e, Error::Unsupported { op: "op", since: "6.15", errno: Errno::OPNOTSUPP }),
            "{e:?}"
        );
        assert_eq!(e.errno(), Some(Errno::OPNOTSUPP));
        assert!(e.is_unsupported());
        // Every ioctl: nothing predates, every inferred flag is there.
        let all: Vec<(Ioctl, u32)> = Ioctl::ALL.iter().map(|&i| (i, 48)).collect();
        let new = Capabilities::from_sizes(sizes_of(&all), flags);
        assert!(new.hwpt_paging_fault_id && new.hwpt_alloc_pasid && !new.predates("7.3"));
        assert!(new.require_field(new.hwpt_alloc_pasid, "op", "6.15", Errno::OPNOTSUPP).is_ok());
    }

    #[test]
    fn guard_page_faults_past_the_tail() {
        let mut g = GuardPage::new().unwrap();
        let t = g.tail(24);
        t[23] = 7;
        assert_eq!(t.len(), 24);
        let end = t.as_ptr() as usize + 24;
        assert_eq!(end % page_size(), 0, "the tail ends at the guard page");
        // The kernel sees the guard page as inaccessible: a read(2) into it is EFAULT.
        let mut fds = [0; 2];
        // SAFETY: `fds` has room for the two descriptors pipe(2) writes.
        assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
        // SAFETY: `fds[1]` is the pipe's open write end; one byte is read from a 1-byte buffer.
        assert_eq!(unsafe { libc::write(fds[1], b"x".as_ptr().cast(), 1) }, 1);
        // SAFETY: the destination is the guard page, which no reference covers; the kernel's write
        // to it faults (the point of the test) and stores nothing.
        let r = unsafe { libc::read(fds[0], end as *mut libc::c_void, 1) };
        assert_eq!(r, -1);
        assert_eq!(std::io::Error::last_os_error().raw_os_error(), Some(libc::EFAULT));
        // SAFETY: both fds were opened above and are closed once.
        unsafe {
            libc::close(fds[0]);
            libc::close(fds[1]);
        }
    }
}
