//! Device features (`VFIO_DEVICE_FEATURE`, Linux 5.7) and PCI hot reset.
//!
//! - [`BoundDevice::feature_probe`]: which [`DeviceFeature`]s the device's driver implements;
//! - [`BoundDevice::set_bus_master_feature`], for `VFIO_DEVICE_FEATURE_BUS_MASTER`;
//! - [`BoundDevice::dma_logging_start`] and the [`DmaLog`] guard: device-side dirty tracking for
//!   migration (`VFIO_DEVICE_FEATURE_DMA_LOGGING_START`/`STOP`/`REPORT`);
//! - [`BoundDevice::export_dma_buf`]: a BAR range as a [`DmaBuf`] (`VFIO_DEVICE_FEATURE_DMA_BUF`), which
//!   [`Ioas::map_file`](crate::Ioas::map_file) maps for peer-to-peer DMA;
//! - [`BoundDevice::hot_reset_info`] and [`BoundDevice::hot_reset`]: PCI bus/slot reset in the iommufd
//!   ("dev id") flavour of `VFIO_DEVICE_GET_PCI_HOT_RESET_INFO` and `VFIO_DEVICE_PCI_HOT_RESET`.

use std::ffi::c_int;
use std::mem::size_of;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::sync::Arc;

use iommufd_sys as sys;

use super::{BoundDevice, DeviceInner, PciAddress};
use crate::dirty::KernelBitmap;
use crate::error::{Errno, Error, Result};
use crate::ioas::IovaRange;
use crate::ioctl::{self, Sized32};

/// A device feature: the 16-bit index `VFIO_DEVICE_FEATURE` selects (`VFIO_DEVICE_FEATURE_*`).
///
/// The constants name those of Linux 7.3; [`DeviceFeature::new`] makes any other index.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DeviceFeature(u16);

macro_rules! features {
    ($($(#[$m:meta])* $konst:ident = $sys:ident, $since:expr;)*) => {
        impl DeviceFeature {
            $($(#[$m])* pub const $konst: DeviceFeature = DeviceFeature(sys::$sys as u16);)*

            /// Every feature Linux 7.3 defines, by index.
            pub const ALL: &'static [DeviceFeature] = &[$(DeviceFeature::$konst),*];

            /// The kernel's name (`VFIO_DEVICE_FEATURE_DMA_BUF`), or `VFIO_DEVICE_FEATURE` for an index
            /// this crate does not know.
            pub fn name(self) -> &'static str {
                $(if self == DeviceFeature::$konst { return stringify!($sys); })*
                "VFIO_DEVICE_FEATURE"
            }

            /// The first Linux release that defines it, when recorded here.
            pub fn since(self) -> Option<&'static str> {
                $(if self == DeviceFeature::$konst { return $since; })*
                None
            }
        }
    };
}

features! {
    /// Set the VF token (a UUID shared by a PF's and its VFs' users) on a PF (5.7).
    PCI_VF_TOKEN = VFIO_DEVICE_FEATURE_PCI_VF_TOKEN, Some("5.7");
    /// Migration support flags (5.18).
    MIGRATION = VFIO_DEVICE_FEATURE_MIGRATION, Some("5.18");
    /// Migration state machine (5.18).
    MIG_DEVICE_STATE = VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE, Some("5.18");
    /// Runtime low-power entry (6.0).
    LOW_POWER_ENTRY = VFIO_DEVICE_FEATURE_LOW_POWER_ENTRY, Some("6.0");
    /// Runtime low-power entry with a wakeup eventfd (6.0).
    LOW_POWER_ENTRY_WITH_WAKEUP = VFIO_DEVICE_FEATURE_LOW_POWER_ENTRY_WITH_WAKEUP, Some("6.0");
    /// Runtime low-power exit (6.0).
    LOW_POWER_EXIT = VFIO_DEVICE_FEATURE_LOW_POWER_EXIT, Some("6.0");
    /// Start device-side DMA logging (6.2).
    DMA_LOGGING_START = VFIO_DEVICE_FEATURE_DMA_LOGGING_START, Some("6.2");
    /// Stop device-side DMA logging (6.2).
    DMA_LOGGING_STOP = VFIO_DEVICE_FEATURE_DMA_LOGGING_STOP, Some("6.2");
    /// Read and clear the DMA log (6.2).
    DMA_LOGGING_REPORT = VFIO_DEVICE_FEATURE_DMA_LOGGING_REPORT, Some("6.2");
    /// Estimated stop-copy migration data size (6.2).
    MIG_DATA_SIZE = VFIO_DEVICE_FEATURE_MIG_DATA_SIZE, Some("6.2");
    /// Bus mastering for devices without an in-band control (vfio-cdx only; 6.7).
    BUS_MASTER = VFIO_DEVICE_FEATURE_BUS_MASTER, Some("6.7");
    /// Export MMIO ranges as a dma-buf (6.19).
    DMA_BUF = VFIO_DEVICE_FEATURE_DMA_BUF, Some("6.19");
    /// Version 2 of the pre-copy info (after 6.19).
    MIG_PRECOPY_INFO_V2 = VFIO_DEVICE_FEATURE_MIG_PRECOPY_INFOv2, None;
    /// s390 zPCI error information (after 6.19).
    ZPCI_ERROR = VFIO_DEVICE_FEATURE_ZPCI_ERROR, None;
}

impl DeviceFeature {
    /// The feature with index `index`.
    pub const fn new(index: u16) -> DeviceFeature {
        DeviceFeature(index)
    }

    /// The feature's index.
    pub const fn index(self) -> u16 {
        self.0
    }
}

impl std::fmt::Debug for DeviceFeature {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.name() {
            "VFIO_DEVICE_FEATURE" => write!(f, "DeviceFeature({})", self.0),
            name => f.write_str(name),
        }
    }
}

bitflags::bitflags! {
    /// How a feature can be used: read (`GET`) and/or written (`SET`).
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
    pub struct FeatureOps: u32 {
        /// `VFIO_DEVICE_FEATURE_GET`.
        const GET = sys::VFIO_DEVICE_FEATURE_GET;
        /// `VFIO_DEVICE_FEATURE_SET`.
        const SET = sys::VFIO_DEVICE_FEATURE_SET;
    }
}

/// `struct vfio_device_feature` with its payload `D` in place of the flexible `data[]`.
#[repr(C)]
struct FeatureArg<D> {
    argsz: u32,
    flags: u32,
    data: D,
}

// The payload starts where `vfio_device_feature.data` does, for every payload alignment used here.
const _: () = {
    assert!(
        std::mem::offset_of!(FeatureArg<()>, data) == std::mem::offset_of!(sys::vfio_device_feature, data)
    );
    assert!(
        std::mem::offset_of!(FeatureArg<u32>, data) == std::mem::offset_of!(sys::vfio_device_feature, data)
    );
    assert!(
        std::mem::offset_of!(FeatureArg<u64>, data) == std::mem::offset_of!(sys::vfio_device_feature, data)
    );
    assert!(size_of::<FeatureArg<()>>() == size_of::<sys::vfio_device_feature>());
};

fn feature_hint(feature: DeviceFeature) -> &'static str {
    match feature {
        DeviceFeature::DMA_BUF => {
            "the driver does not export dma-bufs (vfio-pci needs CONFIG_VFIO_PCI_DMABUF: PCI_P2PDMA and DMA_SHARED_BUFFER)"
        }
        DeviceFeature::BUS_MASTER => {
            "only vfio-cdx implements it; PCI devices control bus mastering in config space (set_bus_master)"
        }
        DeviceFeature::DMA_LOGGING_START
        | DeviceFeature::DMA_LOGGING_STOP
        | DeviceFeature::DMA_LOGGING_REPORT => {
            "the driver has no DMA logging (a migration-capable variant driver such as mlx5-vfio-pci does)"
        }
        DeviceFeature::MIGRATION
        | DeviceFeature::MIG_DEVICE_STATE
        | DeviceFeature::MIG_DATA_SIZE
        | DeviceFeature::MIG_PRECOPY_INFO_V2 => {
            "the device's driver has no migration support (vfio-pci needs a migration-capable variant \
             driver; mediated drivers such as mtty implement it themselves)"
        }
        _ => "the device's VFIO driver does not implement this feature",
    }
}

/// Renames a `VFIO_DEVICE_FEATURE` failure after the feature. `ENOTTY` here means the driver lacks the
/// feature (the ioctl itself is in every kernel with cdevs), so it is not [`Error::Unsupported`].
fn feature_error(feature: DeviceFeature, e: Error) -> Error {
    match e.errno() {
        Some(Errno::NOTTY) => {
            Error::Ioctl { op: feature.name(), errno: Errno::NOTTY, hint: Some(feature_hint(feature)) }
        }
        Some(errno) => Error::Ioctl { op: feature.name(), errno, hint: None },
        None => e,
    }
}

/// Issues `VFIO_DEVICE_FEATURE` for `feature` with `flags` (GET/SET/PROBE) and payload `data`; returns
/// the ioctl's result and the payload as the kernel left it.
///
/// # Safety
///
/// `D` must be the payload structure the kernel reads (and writes) for `feature` with `flags`, and
/// every user pointer inside `data` must be valid for the kernel's reads and writes through it for the
/// duration of the call.
pub(super) unsafe fn feature_call<D: Copy>(
    fd: BorrowedFd<'_>,
    feature: DeviceFeature,
    flags: u32,
    data: D,
) -> Result<(c_int, D)> {
    let mut arg =
        FeatureArg { argsz: size_of::<FeatureArg<D>>() as u32, flags: flags | u32::from(feature.0), data };
    // SAFETY: `FeatureArg<D>` is `vfio_device_feature` (argsz, flags) followed by the payload at the
    // offset of its `data[]` (checked at compile time above), with `argsz` covering exactly header and
    // payload; that `D` is the payload for this feature and its pointers are valid is this function's
    // contract.
    let r = unsafe { ioctl::call(fd, &ioctl::DEVICE_FEATURE, &mut arg) };
    r.map(|n| (n, arg.data)).map_err(|e| feature_error(feature, e))
}

/// `VFIO_DEVICE_FEATURE_PROBE` of `feature` with `ops` (0, GET or SET): the kernel's raw answer.
fn feature_probe_raw(fd: BorrowedFd<'_>, feature: DeviceFeature, ops: u32) -> Result<()> {
    // SAFETY: a probe carries no payload (the kernel checks only the flags and returns before reading
    // any data); `()` adds none.
    unsafe { feature_call(fd, feature, sys::VFIO_DEVICE_FEATURE_PROBE | ops, ()) }.map(drop)
}

impl BoundDevice {
    /// How `feature` is supported (`VFIO_DEVICE_FEATURE` with `VFIO_DEVICE_FEATURE_PROBE`, Linux 5.7):
    /// [`FeatureOps::GET`] and/or [`FeatureOps::SET`], or empty if the device's driver does not
    /// implement it.
    ///
    /// The kernel answers an unimplemented feature with `ENOTTY` (or `EOPNOTSUPP`/`EINVAL` for some
    /// that depend on the device, such as `DMA_BUF` in variant drivers without it); all three read as
    /// empty here. Probing is a pure query by the uAPI's definition.
    pub fn feature_probe(&self, feature: DeviceFeature) -> Result<FeatureOps> {
        let probe = |ops: u32| -> Result<bool> {
            match feature_probe_raw(self.as_fd(), feature, ops) {
                Ok(()) => Ok(true),
                Err(e) if matches!(e.errno(), Some(Errno::NOTTY | Errno::OPNOTSUPP | Errno::INVAL)) => {
                    Ok(false)
                }
                Err(e) => Err(e),
            }
        };
        if !probe(0)? {
            return Ok(FeatureOps::empty());
        }
        let mut ops = FeatureOps::empty();
        if probe(sys::VFIO_DEVICE_FEATURE_GET)? {
            ops |= FeatureOps::GET;
        }
        if probe(sys::VFIO_DEVICE_FEATURE_SET)? {
            ops |= FeatureOps::SET;
        }
        Ok(ops)
    }
}

impl BoundDevice {
    /// Turns bus mastering on or off through `VFIO_DEVICE_FEATURE_BUS_MASTER` (Linux 6.7).
    ///
    /// Only vfio-cdx implements this feature: vfio-pci answers `ENOTTY` (PCI devices control bus
    /// mastering through config space; use [`set_bus_master`](Self::set_bus_master) for them).
    pub fn set_bus_master_feature(&self, enable: bool) -> Result<()> {
        self.check_process(DeviceFeature::BUS_MASTER.name())?;
        let op =
            if enable { sys::VFIO_DEVICE_FEATURE_SET_MASTER } else { sys::VFIO_DEVICE_FEATURE_CLEAR_MASTER };
        let data = sys::vfio_device_feature_bus_master { op };
        // SAFETY: BUS_MASTER with SET takes `vfio_device_feature_bus_master`, which holds no pointers.
        unsafe { feature_call(self.as_fd(), DeviceFeature::BUS_MASTER, sys::VFIO_DEVICE_FEATURE_SET, data) }
            .map(drop)
    }

    /// Starts device-side DMA logging of `ranges` (`VFIO_DEVICE_FEATURE_DMA_LOGGING_START`, Linux 6.2):
    /// the device records which pages it writes, for the pre-copy phase of live migration. `page_size`
    /// is a hint (a power of two); the returned [`DmaLog`] tells what the driver chose, reads the log,
    /// and stops logging when dropped.
    ///
    /// Ranges must be non-empty, aligned to `page_size` and must not overlap (checked here). Only
    /// migration-capable variant drivers implement this; others answer `ENOTTY`. One log at a time
    /// (`EBUSY`, or a driver error, for a second start).
    pub fn dma_logging_start(&self, page_size: u64, ranges: &[IovaRange]) -> Result<DmaLog> {
        let feature = DeviceFeature::DMA_LOGGING_START;
        self.check_process(feature.name())?;
        let op = feature.name();
        let raw = logging_ranges(op, page_size, ranges)?;
        let num_ranges =
            u32::try_from(raw.len()).map_err(|_| Error::invalid(op, format!("{} ranges", raw.len())))?;
        let data = sys::vfio_device_feature_dma_logging_control {
            page_size,
            num_ranges,
            __reserved: 0,
            ranges: raw.as_ptr() as u64,
        };
        // SAFETY: DMA_LOGGING_START with SET takes `vfio_device_feature_dma_logging_control`; `ranges`
        // points at `num_ranges` readable entries owned by `raw`, alive until the call returns. The
        // kernel writes the chosen page size back into the control structure (the payload).
        let (_, data) = unsafe { feature_call(self.as_fd(), feature, sys::VFIO_DEVICE_FEATURE_SET, data) }?;
        // From here on, dropping the log stops it.
        let log = DmaLog { dev: Some(self.inner.clone()), page_size: data.page_size };
        if !data.page_size.is_power_of_two() {
            return Err(Error::Protocol {
                op,
                detail: format!("the driver chose the page size {:#x}, not a power of two", data.page_size),
            });
        }
        Ok(log)
    }

    /// Exports `ranges` of region `index` (for vfio-pci, a BAR number) as a dma-buf
    /// (`VFIO_DEVICE_FEATURE_DMA_BUF`, Linux 6.19). Map it into an IOAS with
    /// [`Ioas::map_file`](crate::Ioas::map_file) (offset 0, the dma-buf's [`len`](DmaBuf::len)) to let
    /// other devices reach this device's MMIO peer to peer; iommufd accepts single-range dma-bufs only.
    ///
    /// Offsets and lengths must be page-aligned and non-zero (checked here). The kernel revokes the
    /// dma-buf (and iommufd unmaps it) while the device's memory is disabled or reset, and for good
    /// when the device is closed. The fd cannot be `mmap`-ed.
    ///
    /// vfio-pci has this feature only when built with `CONFIG_VFIO_PCI_DMABUF` (which needs
    /// `CONFIG_PCI_P2PDMA` and `CONFIG_DMA_SHARED_BUFFER`); otherwise `ENOTTY`. A BAR index past the
    /// BARs, or a BAR vfio-pci has not claimed, gives `ENODEV`; a range outside the BAR `EINVAL`.
    pub fn export_dma_buf(&self, index: u32, ranges: &[RegionRange]) -> Result<DmaBuf> {
        let feature = DeviceFeature::DMA_BUF;
        let (mut buf, len) = dma_buf_arg(feature.name(), index, ranges)?;
        // A kernel known to predate the feature answers ENOTTY as a driver without it would: name the
        // release instead of blaming the driver's configuration.
        if self.inner.iommufd.capabilities()?.predates("6.19") {
            return Err(Error::unsupported(feature.name(), "6.19", Errno::NOTTY));
        }
        // SAFETY: `buf` is `vfio_device_feature` + `vfio_device_feature_dma_buf` + `nr_ranges`
        // `vfio_region_dma_range`s laid out by `dma_buf_arg`, with `argsz` its exact byte length; it
        // holds no pointers (the ranges are inline).
        let r = unsafe { ioctl::call_buf(self.as_fd(), &ioctl::DEVICE_FEATURE, &mut buf) };
        let fd = r.map_err(|e| feature_error(feature, e))?;
        // SAFETY: on success DMA_BUF returns a new file descriptor for the dma-buf, installed in this
        // process's table by the call and owned by nothing else yet.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(DmaBuf { fd, index, len })
    }

    /// Which devices a PCI hot reset of this device would also reset, and whether this iommufd owns
    /// them all (`VFIO_DEVICE_GET_PCI_HOT_RESET_INFO`; the dev-id flavour, for cdevs, since Linux 6.6).
    ///
    /// `ENODEV` means the device can be reset neither through its slot nor its bus: for example a
    /// device on a root bus (no bridge above it to reset) and not in a hotplug slot.
    pub fn hot_reset_info(&self) -> Result<HotResetInfo> {
        let header = size_of::<sys::vfio_pci_hot_reset_info>() / 4;
        let entry = size_of::<sys::vfio_pci_dependent_device>() / 4;
        let mut capacity = 8usize;
        for _ in 0..4 {
            let mut buf = vec![0u32; header + capacity * entry];
            buf[0] = (buf.len() * 4) as u32;
            // SAFETY: `buf` starts with `vfio_pci_hot_reset_info` with `argsz` its byte length, followed
            // by room for `capacity` `vfio_pci_dependent_device`s; it holds no pointers. The kernel
            // writes the header and at most as many entries as fit in `argsz`.
            let r = unsafe { ioctl::call_buf(self.as_fd(), &ioctl::DEVICE_GET_PCI_HOT_RESET_INFO, &mut buf) };
            let count = buf.get(2).map_or(0, |&c| c as usize);
            match r {
                Ok(_) => return parse_hot_reset_info(&buf),
                // Too small: the kernel wrote the count it needs into the header.
                Err(e) if e.errno() == Some(Errno::NOSPC) && count > capacity => {
                    if count > MAX_HOT_RESET_DEVICES {
                        return Err(Error::Protocol {
                            op: ioctl::DEVICE_GET_PCI_HOT_RESET_INFO.name,
                            detail: format!("the kernel claims {count} affected devices"),
                        });
                    }
                    capacity = count
                }
                Err(e) => return Err(e),
            }
        }
        Err(Error::Protocol {
            op: ioctl::DEVICE_GET_PCI_HOT_RESET_INFO.name,
            detail: "the count kept growing".into(),
        })
    }

    /// Resets the bus or slot the device is on (`VFIO_DEVICE_PCI_HOT_RESET` with no group fds: the
    /// iommufd flavour for cdevs, Linux 6.6). Every affected device must be bound to a VFIO driver and
    /// owned by this device's iommufd (bound to it, or in an IOMMU group that is): see
    /// [`hot_reset_info`](Self::hot_reset_info). Otherwise `EINVAL`; `ENODEV` if the device cannot be
    /// hot reset at all.
    ///
    /// Like [`reset`](Self::reset), the kernel saves every affected device's PCI config space first and
    /// restores it afterwards (`pci_reset_bus`), so bus mastering, BARs, MSI/MSI-X setup and VFIO's
    /// interrupt eventfds survive; the devices' internal state is lost.
    pub fn hot_reset(&self) -> Result<()> {
        self.check_process(ioctl::DEVICE_PCI_HOT_RESET.name)?;
        let mut arg = sys::vfio_pci_hot_reset::new();
        // SAFETY: VFIO_DEVICE_PCI_HOT_RESET takes `vfio_pci_hot_reset`, whose `argsz` `new()` sets to
        // its 12-byte header; with `count` 0 the kernel reads no group fds past it and writes nothing.
        unsafe { ioctl::call(self.as_fd(), &ioctl::DEVICE_PCI_HOT_RESET, &mut arg) }.map(drop)
    }
}

/// Checks DMA logging ranges and converts them to the kernel's form.
fn logging_ranges(
    op: &'static str,
    page_size: u64,
    ranges: &[IovaRange],
) -> Result<Vec<sys::vfio_device_feature_dma_logging_range>> {
    if !page_size.is_power_of_two() {
        return Err(Error::invalid(op, format!("page size {page_size:#x} is not a power of two")));
    }
    if ranges.is_empty() {
        return Err(Error::invalid(op, "no ranges"));
    }
    let raw = ranges
        .iter()
        .map(|r| {
            if r.start > r.last {
                return Err(Error::invalid(op, format!("range {r:?} is inverted (start > last)")));
            }
            // `start <= last`: no underflow; `None` only for the whole 2^64-byte space.
            let Some(length) = (r.last - r.start).checked_add(1) else {
                return Err(Error::invalid(op, format!("range {r:?} spans the whole IOVA space")));
            };
            if r.start % page_size != 0 || length % page_size != 0 {
                return Err(Error::invalid(op, format!("range {r:?} is not aligned to {page_size:#x}")));
            }
            Ok(sys::vfio_device_feature_dma_logging_range { iova: r.start, length })
        })
        .collect::<Result<Vec<_>>>()?;
    let mut sorted = ranges.to_vec();
    sorted.sort();
    for pair in sorted.windows(2) {
        if pair[0].overlaps(&pair[1]) {
            return Err(Error::invalid(op, format!("ranges {:?} and {:?} overlap", pair[0], pair[1])));
        }
    }
    Ok(raw)
}

/// Device-side DMA logging, started by [`BoundDevice::dma_logging_start`]. Stops logging when dropped
/// (failures are logged), or explicitly with [`stop`](Self::stop).
pub struct DmaLog {
    dev: Option<Arc<DeviceInner>>,
    /// The tracking granularity the driver chose: a power of two (checked at start).
    page_size: u64,
}

impl std::fmt::Debug for DmaLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DmaLog")
            .field("dev_id", &self.dev.as_ref().map(|d| d.dev_id))
            .field("page_size", &self.page_size)
            .finish()
    }
}

/// Pages a device wrote, from [`DmaLog::report`]: one bit per [`page_size`](Self::page_size) page
/// from [`iova`](Self::iova).
///
/// Only [`DmaLog::report`] makes one, so its page size is a valid one (a power of two, at least
/// 4096) and its range does not wrap:
///
/// ```compile_fail,E0451
/// let report = iommufd::DmaLogReport { iova: 0, length: 4096, page_size: 0, bitmap: vec![0] };
/// ```
#[derive(Clone, PartialEq, Eq)]
pub struct DmaLogReport {
    iova: u64,
    length: u64,
    /// A power of two, at least 4096.
    page_size: u64,
    bitmap: KernelBitmap,
}

impl std::fmt::Debug for DmaLogReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DmaLogReport")
            .field("iova", &self.iova)
            .field("length", &self.length)
            .field("page_size", &self.page_size)
            .field("bitmap", &self.bitmap.words())
            .finish()
    }
}

impl DmaLogReport {
    /// First IOVA covered.
    pub fn iova(&self) -> u64 {
        self.iova
    }

    /// Bytes covered (non-zero; `iova + length` does not overflow).
    pub fn length(&self) -> u64 {
        self.length
    }

    /// Bytes per bit (a power of two, at least 4096).
    pub fn page_size(&self) -> u64 {
        self.page_size
    }

    /// The bitmap: bit `n` (bit `n % 64` of word `n / 64`) is page `iova + n * page_size`. Bits past
    /// the covered range are zero.
    pub fn bitmap(&self) -> &[u64] {
        self.bitmap.words()
    }

    /// The number of pages (bits) covered: `length / page_size`, rounded up.
    pub fn pages(&self) -> u64 {
        self.length.div_ceil(self.page_size)
    }

    /// True if the page holding `iova` was written (false outside the covered range).
    pub fn is_dirty(&self, iova: u64) -> bool {
        if iova < self.iova || iova - self.iova >= self.length {
            return false;
        }
        let n = (iova - self.iova) / self.page_size;
        self.bitmap().get((n / 64) as usize).is_some_and(|w| w & (1 << (n % 64)) != 0)
    }

    /// First IOVAs of the written pages, ascending (pages whose IOVA would pass `u64::MAX` are not
    /// reported).
    pub fn dirty_pages(&self) -> impl Iterator<Item = u64> + '_ {
        let pages = self.pages();
        self.bitmap()
            .iter()
            .enumerate()
            .flat_map(move |(w, &word)| {
                (0..64u64).filter(move |b| word & (1 << b) != 0).map(move |b| w as u64 * 64 + b)
            })
            .take_while(move |&n| n < pages)
            // `n < pages`, so `n * page_size < length` and `iova + length` does not overflow.
            .map(move |n| self.iova + n * self.page_size)
    }
}

/// Checks a report request against the log's tracking page size and returns the words of its
/// bitmap (the kernel's `iova_bitmap` sizing: one bit per page, rounded up to whole `u64`s).
///
/// The driver records each tracked page whole. With `iova` aligned to the tracked page size and
/// report pages at least that large, every tracked page that begins in the window lies in one report
/// page inside the bitmap, and none begins before the window (where the kernel would drop it).
fn report_words(op: &'static str, tracked: u64, iova: u64, length: u64, page_size: u64) -> Result<usize> {
    if length == 0 {
        return Err(Error::invalid(op, "length is zero"));
    }
    if !page_size.is_power_of_two() || page_size < 4096 {
        return Err(Error::invalid(op, format!("page size {page_size:#x} must be a power of two >= 4096")));
    }
    if page_size < tracked {
        return Err(Error::invalid(
            op,
            format!("page size {page_size:#x} is smaller than the tracked page size {tracked:#x}"),
        ));
    }
    if !tracked.is_power_of_two() || iova % tracked != 0 {
        return Err(Error::invalid(
            op,
            format!("IOVA {iova:#x} is not aligned to the tracked page size {tracked:#x}"),
        ));
    }
    if iova.checked_add(length).is_none() {
        return Err(Error::invalid(op, "range overflows the IOVA space"));
    }
    usize::try_from((length - 1) / page_size / 64 + 1).map_err(|_| Error::invalid(op, "bitmap too large"))
}

impl DmaLog {
    /// The tracking granularity the driver chose (bytes per logged page; a power of two).
    pub fn page_size(&self) -> u64 {
        self.page_size
    }

    /// Reads and clears the log for `[iova, iova + length)` at `page_size` bytes per bit
    /// (`VFIO_DEVICE_FEATURE_DMA_LOGGING_REPORT`, Linux 6.2).
    ///
    /// `iova` must be a multiple of the tracked [`page_size`](Self::page_size), and `page_size` a power
    /// of two, at least 4096 and at least the tracked page size; `length` must be non-zero and the
    /// range must not wrap (all checked before the ioctl). The driver records whole tracked pages:
    /// a report window starting inside one would miss it, and finer report pages could not say
    /// which part of it was written.
    ///
    /// After any error the log should be considered lost: treat everything as dirty and restart.
    pub fn report(&self, iova: u64, length: u64, page_size: u64) -> Result<DmaLogReport> {
        let feature = DeviceFeature::DMA_LOGGING_REPORT;
        let op = feature.name();
        let words = report_words(op, self.page_size, iova, length, page_size)?;
        let Some(dev) = self.dev.as_ref() else {
            return Err(Error::invalid(op, "DMA logging was stopped"));
        };
        let mut bitmap = KernelBitmap::new(op, words)?;
        // Reading the log clears it: the parent's log.
        dev.iommufd.check_process(op)?;
        let data = sys::vfio_device_feature_dma_logging_report {
            iova,
            length,
            page_size,
            bitmap: bitmap.kernel_ptr(),
        };
        // SAFETY: DMA_LOGGING_REPORT with GET takes `vfio_device_feature_dma_logging_report`; `bitmap`
        // points at the page-aligned start of a zeroed `KernelBitmap` of `words` words, whose span
        // covers every byte the kernel's `iova_bitmap` may write for them (the rest of the pages it
        // pins; see `KernelBitmap`). It is owned here and nothing else points into it; it stays alive
        // and in place until the call returns.
        unsafe { feature_call(dev.fd.as_fd(), feature, sys::VFIO_DEVICE_FEATURE_GET, data) }?;
        bitmap.finish(op, length.div_ceil(page_size))?;
        Ok(DmaLogReport { iova, length, page_size, bitmap })
    }

    fn do_stop(&mut self) -> Result<()> {
        let Some(dev) = self.dev.take() else { return Ok(()) };
        // In a fork()ed child the log is the parent's: leave it running.
        dev.iommufd.check_process(DeviceFeature::DMA_LOGGING_STOP.name())?;
        // SAFETY: DMA_LOGGING_STOP with SET takes no payload.
        let r = unsafe {
            feature_call(dev.fd.as_fd(), DeviceFeature::DMA_LOGGING_STOP, sys::VFIO_DEVICE_FEATURE_SET, ())
        };
        r.map(drop)
    }

    /// Stops logging now and reports failure (`VFIO_DEVICE_FEATURE_DMA_LOGGING_STOP`).
    pub fn stop(mut self) -> Result<()> {
        self.do_stop()
    }
}

impl Drop for DmaLog {
    fn drop(&mut self) {
        if self.dev.as_ref().is_some_and(|d| !d.iommufd.in_owner_process()) {
            return;
        }
        if let Err(e) = self.do_stop() {
            log::error!("iommufd: stopping DMA logging on drop failed: {e}");
        }
    }
}

/// A byte range of a device region, for [`BoundDevice::export_dma_buf`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct RegionRange {
    /// Offset into the region (page-aligned).
    pub offset: u64,
    /// Length (page-aligned, non-zero).
    pub len: u64,
}

/// Lays out a `VFIO_DEVICE_FEATURE_DMA_BUF` GET argument in `u64` words (the structures' alignment):
/// header, `vfio_device_feature_dma_buf`, then the ranges. Returns the words and the total length.
fn dma_buf_arg(op: &'static str, index: u32, ranges: &[RegionRange]) -> Result<(Vec<u64>, u64)> {
    if ranges.is_empty() {
        return Err(Error::invalid(op, "no ranges"));
    }
    let page = crate::dma::page_size() as u64;
    let mut total = 0u64;
    for r in ranges {
        if r.len == 0 || r.offset % page != 0 || r.len % page != 0 {
            return Err(Error::invalid(op, format!("range {r:?} must be non-empty and page-aligned")));
        }
        if r.offset.checked_add(r.len).is_none() {
            return Err(Error::invalid(op, format!("range {r:?} overflows")));
        }
        total = total.checked_add(r.len).ok_or_else(|| Error::invalid(op, "total length overflows"))?;
    }
    let nr = u32::try_from(ranges.len()).map_err(|_| Error::invalid(op, "too many ranges"))?;
    let argsz = size_of::<sys::vfio_device_feature>()
        + size_of::<sys::vfio_device_feature_dma_buf>()
        + ranges.len() * size_of::<sys::vfio_region_dma_range>();
    let argsz = u32::try_from(argsz).map_err(|_| Error::invalid(op, "too many ranges"))?;
    let mut bytes = Vec::with_capacity(argsz as usize);
    let open_flags = (libc::O_RDWR | libc::O_CLOEXEC) as u32;
    let flags = sys::VFIO_DEVICE_FEATURE_GET | sys::VFIO_DEVICE_FEATURE_DMA_BUF;
    for v in [argsz, flags, index, open_flags, 0, nr] {
        bytes.extend_from_slice(&v.to_ne_bytes());
    }
    for r in ranges {
        bytes.extend_from_slice(&r.offset.to_ne_bytes());
        bytes.extend_from_slice(&r.len.to_ne_bytes());
    }
    debug_assert_eq!(bytes.len(), argsz as usize);
    let words = bytes.chunks(8).map(|c| {
        let mut w = [0u8; 8];
        w[..c.len()].copy_from_slice(c);
        u64::from_ne_bytes(w)
    });
    Ok((words.collect(), total))
}

/// MMIO of a device exported as a dma-buf by [`BoundDevice::export_dma_buf`]: an fd to map into an
/// IOAS with [`Ioas::map_file`](crate::Ioas::map_file) or hand to another importer.
#[derive(Debug)]
pub struct DmaBuf {
    fd: OwnedFd,
    index: u32,
    len: u64,
}

impl DmaBuf {
    /// Its size in bytes (the sum of the exported ranges).
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Always false: a dma-buf has at least one page.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// The region it was exported from.
    pub fn region_index(&self) -> u32 {
        self.index
    }
}

impl AsFd for DmaBuf {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl AsRawFd for DmaBuf {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

impl From<DmaBuf> for OwnedFd {
    fn from(buf: DmaBuf) -> OwnedFd {
        buf.fd
    }
}

/// The answer of [`BoundDevice::hot_reset_info`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HotResetInfo {
    /// Every device the reset affects, this one included.
    pub devices: Vec<HotResetDep>,
    /// True if all of them are owned through this iommufd (`VFIO_PCI_HOT_RESET_FLAG_DEV_ID_OWNED`), so
    /// [`BoundDevice::hot_reset`] is allowed.
    pub all_owned: bool,
}

/// A device a hot reset affects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HotResetDep {
    /// Its PCI address.
    pub address: PciAddress,
    /// Whether this iommufd owns it.
    pub owner: HotResetOwner,
}

/// How a device affected by a hot reset relates to the caller's iommufd.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HotResetOwner {
    /// Bound to the caller's iommufd with this device id.
    DevId(u32),
    /// Not bound, but in an IOMMU group with a device that is (`VFIO_PCI_DEVID_OWNED`).
    Owned,
    /// Not owned: not bound to a VFIO driver, or bound elsewhere (`VFIO_PCI_DEVID_NOT_OWNED`).
    NotOwned,
    /// Its IOMMU group (the legacy group flavour, which a cdev never gets).
    Group(u32),
}

/// The most devices a hot reset is believed to affect (a PCI bus has at most 256 functions; a slot
/// or bus reset below a bridge can reach deeper buses). A larger count from the kernel is refused
/// rather than allocated for.
const MAX_HOT_RESET_DEVICES: usize = 1 << 16;

/// Decodes a `vfio_pci_hot_reset_info` answer held in `buf` (header words `argsz`, `flags`, `count`,
/// then `count` two-word `vfio_pci_dependent_device` entries). Bounds-checked: any content gives a
/// value or an [`Error::Protocol`], never a panic or a read past `buf`.
fn parse_hot_reset_info(buf: &[u32]) -> Result<HotResetInfo> {
    const OP: &str = "VFIO_DEVICE_GET_PCI_HOT_RESET_INFO";
    let header = size_of::<sys::vfio_pci_hot_reset_info>() / 4;
    let (Some(&flags), Some(&count)) = (buf.get(1), buf.get(2)) else {
        return Err(Error::Protocol {
            op: OP,
            detail: format!("{}-byte answer has no header", buf.len() * 4),
        });
    };
    let count = count as usize;
    let end = count.checked_mul(2).and_then(|n| n.checked_add(header));
    let entries = end.and_then(|end| buf.get(header..end)).ok_or_else(|| Error::Protocol {
        op: OP,
        detail: format!("{count} devices do not fit the {}-byte buffer", buf.len() * 4),
    })?;
    let dev_id = flags & sys::VFIO_PCI_HOT_RESET_FLAG_DEV_ID != 0;
    let devices = entries
        .chunks_exact(2)
        .map(|e| {
            let [s0, s1, bus, devfn] = e[1].to_ne_bytes();
            let owner = match e[0] {
                _ if !dev_id => HotResetOwner::Group(e[0]),
                sys::VFIO_PCI_DEVID_OWNED => HotResetOwner::Owned,
                id if id == sys::VFIO_PCI_DEVID_NOT_OWNED as u32 => HotResetOwner::NotOwned,
                id => HotResetOwner::DevId(id),
            };
            let address = PciAddress {
                domain: u32::from(u16::from_ne_bytes([s0, s1])),
                bus,
                device: devfn >> 3,
                function: devfn & 7,
            };
            HotResetDep { address, owner }
        })
        .collect();
    Ok(HotResetInfo { devices, all_owned: dev_id && flags & sys::VFIO_PCI_HOT_RESET_FLAG_DEV_ID_OWNED != 0 })
}

#[cfg(test)]
mod tests {
    use std::mem::offset_of;

    use super::*;

    #[test]
    fn feature_names_and_indices() {
        assert_eq!(DeviceFeature::ALL.len(), 14);
        for (i, f) in DeviceFeature::ALL.iter().enumerate() {
            assert_eq!(f.index() as usize, i, "{f:?}");
            assert!(f.name().starts_with("VFIO_DEVICE_FEATURE_"), "{}", f.name());
        }
        assert_eq!(DeviceFeature::DMA_BUF.name(), "VFIO_DEVICE_FEATURE_DMA_BUF");
        assert_eq!(DeviceFeature::DMA_LOGGING_START.since(), Some("6.2"));
        assert_eq!(DeviceFeature::new(99).name(), "VFIO_DEVICE_FEATURE");
        assert_eq!(format!("{:?}", DeviceFeature::new(99)), "DeviceFeature(99)");
        assert_eq!(format!("{:?}", DeviceFeature::BUS_MASTER), "VFIO_DEVICE_FEATURE_BUS_MASTER");
        assert_eq!(FeatureOps::GET.bits(), 1 << 16);
        assert_eq!(FeatureOps::SET.bits(), 1 << 17);
    }

    #[test]
    fn feature_errors_name_the_feature() {
        let e = feature_error(
            DeviceFeature::DMA_LOGGING_START,
            Error::unsupported("VFIO_DEVICE_FEATURE", "5.7", Errno::NOTTY),
        );
        assert_eq!(e.errno(), Some(Errno::NOTTY));
        assert!(e.to_string().starts_with("VFIO_DEVICE_FEATURE_DMA_LOGGING_START failed"), "{e}");
        let e = feature_error(
            DeviceFeature::DMA_BUF,
            Error::Ioctl { op: "VFIO_DEVICE_FEATURE", errno: Errno::NODEV, hint: None },
        );
        assert!(matches!(e, Error::Ioctl { op: "VFIO_DEVICE_FEATURE_DMA_BUF", errno: Errno::NODEV, .. }));
    }

    #[test]
    fn payload_layouts() {
        assert_eq!(size_of::<FeatureArg<sys::vfio_device_feature_dma_logging_control>>(), 32);
        assert_eq!(offset_of!(FeatureArg<sys::vfio_device_feature_dma_logging_report>, data), 8);
        assert_eq!(size_of::<FeatureArg<sys::vfio_device_feature_bus_master>>(), 12);
        assert_eq!(size_of::<sys::vfio_device_feature_dma_buf>(), 16);
        assert_eq!(offset_of!(sys::vfio_device_feature_dma_buf, dma_ranges), 16);
    }

    #[test]
    fn dma_buf_argument() {
        let page = crate::dma::page_size() as u64;
        let (words, len) = dma_buf_arg(
            "t",
            2,
            &[RegionRange { offset: 0, len: page }, RegionRange { offset: 4 * page, len: 2 * page }],
        )
        .unwrap();
        assert_eq!(len, 3 * page);
        let bytes: Vec<u8> = words.iter().flat_map(|w| w.to_ne_bytes()).collect();
        let u32_at = |o: usize| u32::from_ne_bytes(bytes[o..o + 4].try_into().unwrap());
        let u64_at = |o: usize| u64::from_ne_bytes(bytes[o..o + 8].try_into().unwrap());
        assert_eq!(u32_at(0), 8 + 16 + 2 * 16, "argsz");
        assert_eq!(u32_at(4), sys::VFIO_DEVICE_FEATURE_GET | sys::VFIO_DEVICE_FEATURE_DMA_BUF);
        let data = 8;
        assert_eq!(u32_at(data + offset_of!(sys::vfio_device_feature_dma_buf, region_index)), 2);
        assert_eq!(
            u32_at(data + offset_of!(sys::vfio_device_feature_dma_buf, open_flags)),
            (libc::O_RDWR | libc::O_CLOEXEC) as u32
        );
        assert_eq!(u32_at(data + offset_of!(sys::vfio_device_feature_dma_buf, flags)), 0);
        assert_eq!(u32_at(data + offset_of!(sys::vfio_device_feature_dma_buf, nr_ranges)), 2);
        assert_eq!((u64_at(24), u64_at(32), u64_at(40), u64_at(48)), (0, page, 4 * page, 2 * page));
        for bad in [&[][..], &[RegionRange { offset: 0, len: 0 }], &[RegionRange { offset: 1, len: page }]] {
            assert!(matches!(dma_buf_arg("t", 0, bad), Err(Error::InvalidArgument { .. })), "{bad:?}");
        }
        assert!(dma_buf_arg("t", 0, &[RegionRange { offset: u64::MAX - page + 1, len: page }]).is_err());
    }

    #[test]
    fn logging_range_checks() {
        let r = |start: u64, len: u64| IovaRange::from_len(start, len).unwrap();
        let ok = logging_ranges("t", 4096, &[r(0x1000, 0x2000), r(0x10000, 0x1000)]).unwrap();
        assert_eq!((ok[0].iova, ok[0].length, ok[1].iova, ok[1].length), (0x1000, 0x2000, 0x10000, 0x1000));
        assert!(logging_ranges("t", 4096, &[]).is_err());
        assert!(logging_ranges("t", 3000, &[r(0, 3000)]).is_err());
        assert!(logging_ranges("t", 4096, &[r(0x800, 0x1000)]).is_err());
        assert!(logging_ranges("t", 4096, &[r(0, 0x2000), r(0x1000, 0x1000)]).is_err(), "overlap");
        assert!(logging_ranges("t", 4096, &[IovaRange { start: 0, last: u64::MAX }]).is_err());
        // An inverted range is an error, not an overflow panic.
        let e = logging_ranges("t", 4096, &[IovaRange { start: 0x2000, last: 0xfff }]).unwrap_err();
        assert!(e.to_string().contains("inverted"), "{e}");
        let e =
            logging_ranges("t", 4096, &[r(0, 0x1000), IovaRange { start: u64::MAX, last: 0 }]).unwrap_err();
        assert!(e.to_string().contains("inverted"), "{e}");
    }

    /// A report as `DmaLog::report` builds it, with `bits` set as the kernel would (those past the
    /// room the kernel may write are left out).
    fn report(iova: u64, length: u64, page_size: u64, bits: &[u64]) -> DmaLogReport {
        let words = report_words("t", 4096, iova, length, page_size).unwrap();
        let mut bitmap = KernelBitmap::new("t", words).unwrap();
        let span = bitmap.span_mut();
        for &b in bits {
            if let Some(w) = span.get_mut((b / 64) as usize) {
                *w |= 1 << (b % 64);
            }
        }
        bitmap.finish("t", length.div_ceil(page_size)).unwrap();
        DmaLogReport { iova, length, page_size, bitmap }
    }

    #[test]
    fn report_bitmap() {
        let words = |length, page_size| report_words("t", 4096, 0, length, page_size).unwrap();
        assert_eq!(words(4096, 4096), 1);
        assert_eq!(words(64 * 4096, 4096), 1);
        assert_eq!(words(64 * 4096 + 1, 4096), 2);
        assert_eq!(words(1 << 30, 1 << 21), 8);
        let rep = report(0x10_0000, 70 * 4096, 4096, &[0, 2, 69, 70, 127]);
        assert_eq!(
            (rep.iova(), rep.length(), rep.page_size(), rep.pages()),
            (0x10_0000, 70 * 4096, 4096, 70)
        );
        // Bits past the covered pages (as a tracked page reaching past the end sets) are dropped.
        assert_eq!(rep.bitmap(), &[0b101, 1 << 5]);
        assert!(rep.is_dirty(0x10_0000) && rep.is_dirty(0x10_2fff) && !rep.is_dirty(0x10_1000));
        assert!(
            rep.is_dirty(0x10_0000 + 69 * 4096)
                && !rep.is_dirty(0xf_f000)
                && !rep.is_dirty(0x10_0000 + 70 * 4096)
        );
        assert_eq!(rep.dirty_pages().collect::<Vec<_>>(), vec![0x10_0000, 0x10_2000, 0x10_0000 + 69 * 4096]);
        // The last page of the IOVA space, with a length that is not a page multiple.
        let rep = report(u64::MAX - 0xfff - 0x1000, 0x1800, 0x1000, &[0, 1]);
        assert_eq!(rep.dirty_pages().collect::<Vec<_>>(), vec![u64::MAX - 0x1fff, u64::MAX - 0xfff]);
        assert!(rep.is_dirty(u64::MAX - 0x1000) && !rep.is_dirty(u64::MAX));
    }

    #[test]
    fn report_requests_are_checked_against_the_tracked_page_size() {
        let invalid = |r: Result<usize>, needle: &str| match r {
            Err(Error::InvalidArgument { reason, .. }) => assert!(reason.contains(needle), "{reason}"),
            other => panic!("expected InvalidArgument({needle}), got {other:?}"),
        };
        invalid(report_words("t", 4096, 0, 0, 4096), "length is zero");
        invalid(report_words("t", 4096, 0, 4096, 0), "power of two");
        invalid(report_words("t", 4096, 0, 4096, 2048), "power of two");
        invalid(report_words("t", 4096, 0, 4096, 3 << 12), "power of two");
        // Finer report pages than the tracked ones: a tracked page would set bits past the bitmap.
        invalid(report_words("t", 1 << 21, 0, 1 << 21, 4096), "smaller than the tracked");
        // A window starting inside a tracked page would miss it.
        invalid(report_words("t", 8192, 0x1000, 0x2000, 8192), "not aligned to the tracked");
        invalid(report_words("t", 4096, u64::MAX - 0xfff, 0x1000, 4096), "overflows");
        // A tracked page size the driver could not have chosen never divides by zero.
        invalid(report_words("t", 0, 0, 4096, 4096), "not aligned to the tracked");
        assert_eq!(report_words("t", 1 << 21, 1 << 21, 1 << 30, 1 << 21).unwrap(), 8);
        assert_eq!(report_words("t", 4096, 0, u64::MAX, 1 << 63).unwrap(), 1);
        assert_eq!(report_words("t", 4096, 0x1000, u64::MAX - 0x1000, 4096).unwrap(), 1 << 46);
    }
    mod props {
        use proptest::prelude::*;

        use super::*;

        fn config() -> ProptestConfig {
            ProptestConfig {
                cases: crate::device::prop_cases(),
                failure_persistence: None,
                ..ProptestConfig::default()
            }
        }

        fn pow2_or_any() -> impl Strategy<Value = u64> {
            prop_oneof![any::<u64>(), (0u32..64).prop_map(|s| 1u64 << s), Just(0)]
        }

        proptest! {
            #![proptest_config(config())]

            /// Report requests never panic, and are accepted exactly when well-formed for the
            /// tracked page size.
            #[test]
            fn report_requests(
                tracked in pow2_or_any(),
                iova in prop_oneof![any::<u64>(), (0u64..1 << 24).prop_map(|p| p << 12)],
                length in prop_oneof![any::<u64>(), 0u64..1 << 30],
                page_size in pow2_or_any(),
            ) {
                let ok = length != 0
                    && page_size.is_power_of_two()
                    && page_size >= 4096
                    && page_size >= tracked
                    && tracked.is_power_of_two()
                    && iova % tracked == 0
                    && iova.checked_add(length).is_some();
                match report_words("t", tracked, iova, length, page_size) {
                    Ok(words) => {
                        prop_assert!(ok);
                        prop_assert_eq!(words as u64, length.div_ceil(page_size).div_ceil(64));
                    }
                    Err(Error::InvalidArgument { .. }) => prop_assert!(!ok),
                    Err(e) => prop_assert!(false, "unexpected error {:?}", e),
                }
            }

            /// Any ranges, inverted or not: an error or well-formed kernel ranges, never a panic.
            #[test]
            fn logging_ranges_never_panic(
                page_size in pow2_or_any(),
                ranges in proptest::collection::vec(
                    prop_oneof![
                        any::<(u64, u64)>(),
                        (0u64..64, 0u64..64).prop_map(|(a, b)| (a << 12, (b << 12) | 0xfff)),
                    ],
                    0..6,
                ),
            ) {
                let ranges: Vec<IovaRange> =
                    ranges.into_iter().map(|(start, last)| IovaRange { start, last }).collect();
                if let Ok(raw) = logging_ranges("t", page_size, &ranges) {
                    prop_assert_eq!(raw.len(), ranges.len());
                    for (k, r) in raw.iter().zip(&ranges) {
                        prop_assert!(r.start <= r.last && k.length != 0);
                        prop_assert_eq!((k.iova, k.iova + (k.length - 1)), (r.start, r.last));
                        prop_assert!(k.iova % page_size == 0 && k.length % page_size == 0);
                    }
                }
            }

            /// Decoding a report with any bits set (past the end too) agrees with itself.
            #[test]
            fn reports_decode(
                shift in 12u32..=30,
                length in 1u64..1 << 40,
                at_top in any::<bool>(),
                bits in proptest::collection::vec(any::<u64>(), 0..20),
            ) {
                let page_size = 1u64 << shift;
                let length = length.min(page_size * 2000);
                let iova = if at_top { (u64::MAX - length + 1) & !4095 } else { 0x10_0000 };
                prop_assume!(iova.checked_add(length).is_some());
                let pages = length.div_ceil(page_size);
                let rep = report(iova, length, page_size, &bits.iter().map(|b| b % (pages + 64)).collect::<Vec<_>>());
                let dirty: Vec<u64> = rep.dirty_pages().collect();
                prop_assert!(dirty.windows(2).all(|w| w[0] < w[1]));
                for &p in &dirty {
                    prop_assert!(rep.is_dirty(p) && p >= iova && p - iova < length);
                }
                let set: u64 = rep.bitmap().iter().map(|w| u64::from(w.count_ones())).sum();
                prop_assert_eq!(set, dirty.len() as u64);
                prop_assert!(!rep.is_dirty(iova.wrapping_sub(1)) || iova == 0);
            }
        }
    }

    #[test]
    fn hot_reset_info_parsing() {
        let devfn = |d: u8, f: u8| (d << 3) | f;
        let entry = |id: u32, seg: u16, bus: u8, df: u8| {
            let s = seg.to_ne_bytes();
            [id, u32::from_ne_bytes([s[0], s[1], bus, df])]
        };
        let flags = sys::VFIO_PCI_HOT_RESET_FLAG_DEV_ID | sys::VFIO_PCI_HOT_RESET_FLAG_DEV_ID_OWNED;
        let mut buf = vec![0, flags, 3];
        buf.extend(entry(5, 0, 1, devfn(0, 0)));
        buf.extend(entry(sys::VFIO_PCI_DEVID_OWNED, 1, 1, devfn(0, 1)));
        buf.extend(entry(sys::VFIO_PCI_DEVID_NOT_OWNED as u32, 0, 2, devfn(31, 7)));
        let info = parse_hot_reset_info(&buf).unwrap();
        assert!(info.all_owned);
        let addr = |domain, bus, device, function| PciAddress { domain, bus, device, function };
        assert_eq!(
            info.devices,
            vec![
                HotResetDep { address: addr(0, 1, 0, 0), owner: HotResetOwner::DevId(5) },
                HotResetDep { address: addr(1, 1, 0, 1), owner: HotResetOwner::Owned },
                HotResetDep { address: addr(0, 2, 31, 7), owner: HotResetOwner::NotOwned },
            ]
        );
        // Group flavour: ids are groups and DEV_ID_OWNED is reserved.
        let mut buf = vec![0, sys::VFIO_PCI_HOT_RESET_FLAG_DEV_ID_OWNED, 1];
        buf.extend(entry(12, 0, 0, devfn(3, 0)));
        let info = parse_hot_reset_info(&buf).unwrap();
        assert!(!info.all_owned);
        assert_eq!(info.devices[0].owner, HotResetOwner::Group(12));
        // A count past the buffer is a protocol error, not a panic.
        assert!(matches!(parse_hot_reset_info(&[0, 1, 5, 0, 0]), Err(Error::Protocol { .. })));
    }
}

/// Property tests of the hot-reset-info decoder (kernel-written data) and of the DMA-logging and
/// dma-buf validation: any input gives a value or an error, never a panic or an out-of-bounds read.
#[cfg(test)]
mod props {
    use proptest::prelude::*;

    use super::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(crate::device::prop_cases()))]

        #[test]
        fn hot_reset_info_of_any_words_is_decoded_or_refused(
            mut buf in proptest::collection::vec(any::<u32>(), 0..24),
            count in prop_oneof![0u32..12, any::<u32>()],
        ) {
            if buf.len() > 2 {
                buf[2] = count;
            }
            if let Ok(info) = parse_hot_reset_info(&buf) {
                prop_assert_eq!(info.devices.len(), buf[2] as usize);
                prop_assert!(3 + 2 * info.devices.len() <= buf.len());
                for dep in &info.devices {
                    prop_assert!(dep.address.device < 32 && dep.address.function < 8);
                    prop_assert!(dep.address.domain <= 0xffff);
                }
            }
        }

        #[test]
        fn hot_reset_info_round_trips(
            dev_id in any::<bool>(),
            owned in any::<bool>(),
            entries in proptest::collection::vec((any::<u32>(), any::<u16>(), any::<u8>(), any::<u8>()), 0..10),
            slack in 0usize..6,
        ) {
            let mut flags = 0;
            if dev_id {
                flags |= sys::VFIO_PCI_HOT_RESET_FLAG_DEV_ID;
            }
            if owned {
                flags |= sys::VFIO_PCI_HOT_RESET_FLAG_DEV_ID_OWNED;
            }
            let mut buf = vec![0, flags, entries.len() as u32];
            for (id, seg, bus, devfn) in &entries {
                let s = seg.to_ne_bytes();
                buf.extend([*id, u32::from_ne_bytes([s[0], s[1], *bus, *devfn])]);
            }
            buf.resize(buf.len() + slack, 0xdead_beef);
            let info = parse_hot_reset_info(&buf).unwrap();
            prop_assert_eq!(info.all_owned, dev_id && owned);
            for (dep, (id, seg, bus, devfn)) in info.devices.iter().zip(&entries) {
                let want = PciAddress { domain: u32::from(*seg), bus: *bus, device: devfn >> 3, function: devfn & 7 };
                prop_assert_eq!(dep.address, want);
                let owner = match *id {
                    _ if !dev_id => HotResetOwner::Group(*id),
                    sys::VFIO_PCI_DEVID_OWNED => HotResetOwner::Owned,
                    id if id == sys::VFIO_PCI_DEVID_NOT_OWNED as u32 => HotResetOwner::NotOwned,
                    id => HotResetOwner::DevId(id),
                };
                prop_assert_eq!(dep.owner, owner);
            }
        }

        #[test]
        fn dma_buf_arguments_are_laid_out_or_refused(
            index in any::<u32>(),
            ranges in proptest::collection::vec(
                prop_oneof![any::<(u64, u64)>(), (0u64..16, 1u64..16).prop_map(|(o, l)| (o << 12, l << 12))],
                0..5,
            ),
        ) {
            let ranges: Vec<RegionRange> = ranges.into_iter().map(|(offset, len)| RegionRange { offset, len }).collect();
            if let Ok((words, total)) = dma_buf_arg("t", index, &ranges) {
                let argsz = (words[0] & 0xffff_ffff) as usize;
                prop_assert!(argsz <= words.len() * 8);
                prop_assert_eq!(total, ranges.iter().map(|r| r.len).sum::<u64>());
            }
        }
    }
}
