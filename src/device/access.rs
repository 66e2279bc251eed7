//! Device access: info, regions, IRQs, reset, bus mastering.
//!
//! Everything here is a method of [`BoundDevice`] (a cdev accepts these ioctls only once bound) or a
//! type those methods return:
//!
//! - [`BoundDevice::info`], [`BoundDevice::region_info`], [`BoundDevice::irq_info`]: what the device
//!   has (`VFIO_DEVICE_GET_INFO`, `..._GET_REGION_INFO`, `..._GET_IRQ_INFO`);
//! - [`BoundDevice::read_region`] / [`BoundDevice::write_region`]: `pread`/`pwrite` through the cdev,
//!   and the PCI config-space shorthands built on them;
//! - [`BoundDevice::map_region`]: an `mmap` of a region, as a [`RegionMapping`] that only offers
//!   volatile, bounds- and alignment-checked accessors (no Rust reference to MMIO ever exists);
//! - [`BoundDevice::set_irq_eventfds`] and friends (`VFIO_DEVICE_SET_IRQS`);
//! - [`BoundDevice::reset`] and [`BoundDevice::set_bus_master`].
//!
//! Every offset and length is checked against the region before any syscall is made; a bad one is an
//! [`Error::InvalidArgument`].

use std::mem::{offset_of, size_of};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};
use std::ptr::NonNull;
use std::sync::Arc;

use iommufd_sys as sys;

use super::{BoundDevice, DeviceInner};
use crate::error::{Errno, Error, Result};
use crate::ioctl::{self, Sized32};

bitflags::bitflags! {
    /// What kind of device this is and what it supports (`VFIO_DEVICE_FLAGS_*`).
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
    pub struct DeviceFlags: u32 {
        /// The device supports [`BoundDevice::reset`].
        const RESET = sys::VFIO_DEVICE_FLAGS_RESET;
        /// A PCI device (vfio-pci): region and IRQ indices follow [`PciRegion`] and [`PciIrq`].
        const PCI = sys::VFIO_DEVICE_FLAGS_PCI;
        /// A platform device (vfio-platform).
        const PLATFORM = sys::VFIO_DEVICE_FLAGS_PLATFORM;
        /// An ARM AMBA device.
        const AMBA = sys::VFIO_DEVICE_FLAGS_AMBA;
        /// An s390 channel-command-word device.
        const CCW = sys::VFIO_DEVICE_FLAGS_CCW;
        /// An s390 adjunct-processor (crypto) device.
        const AP = sys::VFIO_DEVICE_FLAGS_AP;
        /// A Freescale/NXP fsl-mc device.
        const FSL_MC = sys::VFIO_DEVICE_FLAGS_FSL_MC;
        /// The kernel has a device-info capability chain (not parsed by this crate).
        const CAPS = sys::VFIO_DEVICE_FLAGS_CAPS;
        /// An AMD CDX bus device.
        const CDX = sys::VFIO_DEVICE_FLAGS_CDX;
        // Bits the kernel knows and this crate does not yet name survive round trips.
        const _ = !0;
    }
}

bitflags::bitflags! {
    /// What can be done with a region (`VFIO_REGION_INFO_FLAG_*`).
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
    pub struct RegionFlags: u32 {
        /// The region can be read ([`BoundDevice::read_region`]).
        const READ = sys::VFIO_REGION_INFO_FLAG_READ;
        /// The region can be written ([`BoundDevice::write_region`]).
        const WRITE = sys::VFIO_REGION_INFO_FLAG_WRITE;
        /// The region can be mapped ([`BoundDevice::map_region`]).
        const MMAP = sys::VFIO_REGION_INFO_FLAG_MMAP;
        /// The region has a capability chain ([`RegionInfo::sparse_mmap`], ...).
        const CAPS = sys::VFIO_REGION_INFO_FLAG_CAPS;
        // Bits the kernel knows and this crate does not yet name survive round trips.
        const _ = !0;
    }
}

bitflags::bitflags! {
    /// Properties of an interrupt index (`VFIO_IRQ_INFO_*`).
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
    pub struct IrqFlags: u32 {
        /// The interrupts can be signalled through eventfds ([`BoundDevice::set_irq_eventfds`]).
        const EVENTFD = sys::VFIO_IRQ_INFO_EVENTFD;
        /// The interrupts can be masked and unmasked ([`BoundDevice::unmask_irq`]).
        const MASKABLE = sys::VFIO_IRQ_INFO_MASKABLE;
        /// The kernel masks the interrupt when it fires (level-triggered INTx): unmask it after
        /// servicing.
        const AUTOMASKED = sys::VFIO_IRQ_INFO_AUTOMASKED;
        /// The set of enabled vectors cannot grow without disabling them all first (MSI).
        const NORESIZE = sys::VFIO_IRQ_INFO_NORESIZE;
        // Bits the kernel knows and this crate does not yet name survive round trips.
        const _ = !0;
    }
}

/// What `VFIO_DEVICE_GET_INFO` reports about a device.
///
/// The device-info capability chain (s390 zPCI facts, PCIe atomic completer support) is not parsed:
/// the request is made with the fixed-size structure, and the kernel then leaves the chain out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct DeviceInfo {
    /// Device kind and capabilities. Unknown bits are kept.
    pub flags: DeviceFlags,
    /// Number of regions (region indices are `0..num_regions`).
    pub num_regions: u32,
    /// Number of interrupt indices (`0..num_irqs`).
    pub num_irqs: u32,
}

/// One mmap-able part of a region whose mapping is restricted (`VFIO_REGION_INFO_CAP_SPARSE_MMAP`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SparseMmapArea {
    /// Offset of the area inside the region.
    pub offset: u64,
    /// Length of the area in bytes.
    pub size: u64,
}

/// A device-specific region's type (`VFIO_REGION_INFO_CAP_TYPE`), for regions beyond the bus's fixed
/// ones (for example an Intel IGD OpRegion).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct RegionType {
    /// `VFIO_REGION_TYPE_*`; the high bit marks a PCI vendor type (low 16 bits: the vendor id).
    pub kind: u32,
    /// `VFIO_REGION_SUBTYPE_*`, meaningful within `kind`.
    pub subtype: u32,
}

/// What `VFIO_DEVICE_GET_REGION_INFO` reports about a region.
///
/// [`BoundDevice::region_info`] reads the capability chain too: when the kernel asks for a larger
/// `argsz` to hold it, the request is repeated with a buffer of that size and the sparse-mmap, type and
/// MSI-X-mappable capabilities are decoded (others are skipped).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct RegionInfo {
    /// The region index.
    pub index: u32,
    /// What the region allows. Unknown bits are kept.
    pub flags: RegionFlags,
    /// Size in bytes (0 for an unimplemented region, such as an absent BAR).
    pub size: u64,
    /// Where the region starts in the device cdev's file offsets (for `pread`/`pwrite`/`mmap`).
    pub offset: u64,
    /// With [`RegionFlags::MMAP`]: if present, only these areas can be mapped (for example around a
    /// BAR's MSI-X table on old kernels).
    pub sparse_mmap: Option<Vec<SparseMmapArea>>,
    /// The region's type, for device-specific regions.
    pub region_type: Option<RegionType>,
    /// The MSI-X table inside this BAR may be mapped along with the rest of the BAR.
    pub msix_mappable: bool,
}

impl RegionInfo {
    fn from_raw(raw: &sys::vfio_region_info) -> RegionInfo {
        RegionInfo {
            index: raw.index,
            flags: RegionFlags::from_bits_retain(raw.flags),
            size: raw.size,
            offset: raw.offset,
            sparse_mmap: None,
            region_type: None,
            msix_mappable: false,
        }
    }
}

/// The fixed region indices of a vfio-pci device (`VFIO_PCI_*_REGION_INDEX`).
///
/// Device-specific regions follow them, at indices from 9 up to [`DeviceInfo::num_regions`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PciRegion {
    /// Base address register 0..=5.
    Bar(u8),
    /// The expansion ROM.
    Rom,
    /// PCI configuration space (virtualised by vfio-pci).
    Config,
    /// Legacy VGA ranges (VGA devices only).
    Vga,
}

impl PciRegion {
    /// `Bar(n)` checked: [`Error::InvalidArgument`] unless `n` is 0..=5.
    pub fn bar(n: u8) -> Result<PciRegion> {
        if n > 5 {
            return Err(Error::invalid("PciRegion::bar", format!("BAR {n} does not exist (0..=5)")));
        }
        Ok(PciRegion::Bar(n))
    }

    /// The region index.
    ///
    /// A nonexistent `Bar(n)` (`n > 5`) gives [`NO_REGION`], which every region method refuses with
    /// [`Error::InvalidArgument`] before any syscall (use [`bar`](Self::bar) to check early).
    pub const fn index(self) -> u32 {
        match self {
            PciRegion::Bar(n @ 0..=5) => sys::VFIO_PCI_BAR0_REGION_INDEX + n as u32,
            PciRegion::Bar(_) => NO_REGION,
            PciRegion::Rom => sys::VFIO_PCI_ROM_REGION_INDEX,
            PciRegion::Config => sys::VFIO_PCI_CONFIG_REGION_INDEX,
            PciRegion::Vga => sys::VFIO_PCI_VGA_REGION_INDEX,
        }
    }
}

/// The index [`PciRegion::index`] gives for a nonexistent BAR. No device has this many regions, and
/// the region methods refuse it before any syscall.
pub const NO_REGION: u32 = u32::MAX;

/// Refuses [`NO_REGION`].
fn check_region_index(op: &'static str, index: u32) -> Result<()> {
    if index == NO_REGION {
        return Err(Error::invalid(op, "no such region (a PciRegion::Bar above 5?)"));
    }
    Ok(())
}

impl TryFrom<u32> for PciRegion {
    type Error = Error;

    /// The fixed PCI region at `index`; [`Error::InvalidArgument`] for device-specific indices (>= 9).
    fn try_from(index: u32) -> Result<PciRegion> {
        Ok(match index {
            sys::VFIO_PCI_BAR0_REGION_INDEX..=sys::VFIO_PCI_BAR5_REGION_INDEX => {
                // The range bounds make this at most 5.
                PciRegion::Bar((index - sys::VFIO_PCI_BAR0_REGION_INDEX) as u8)
            }
            sys::VFIO_PCI_ROM_REGION_INDEX => PciRegion::Rom,
            sys::VFIO_PCI_CONFIG_REGION_INDEX => PciRegion::Config,
            sys::VFIO_PCI_VGA_REGION_INDEX => PciRegion::Vga,
            _ => {
                return Err(Error::invalid(
                    "PciRegion::try_from",
                    format!("region index {index} is not a fixed PCI region"),
                ));
            }
        })
    }
}

/// The interrupt indices of a vfio-pci device (`VFIO_PCI_*_IRQ_INDEX`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PciIrq {
    /// Legacy INTx (level-triggered, automasked).
    Intx,
    /// MSI.
    Msi,
    /// MSI-X.
    Msix,
    /// PCIe AER error notification.
    Err,
    /// Device release request (the host wants the device back).
    Req,
}

impl PciIrq {
    /// The interrupt index.
    pub const fn index(self) -> u32 {
        match self {
            PciIrq::Intx => sys::VFIO_PCI_INTX_IRQ_INDEX,
            PciIrq::Msi => sys::VFIO_PCI_MSI_IRQ_INDEX,
            PciIrq::Msix => sys::VFIO_PCI_MSIX_IRQ_INDEX,
            PciIrq::Err => sys::VFIO_PCI_ERR_IRQ_INDEX,
            PciIrq::Req => sys::VFIO_PCI_REQ_IRQ_INDEX,
        }
    }
}

impl TryFrom<u32> for PciIrq {
    type Error = Error;

    /// The PCI interrupt at `index`; [`Error::InvalidArgument`] for an unknown index.
    fn try_from(index: u32) -> Result<PciIrq> {
        Ok(match index {
            sys::VFIO_PCI_INTX_IRQ_INDEX => PciIrq::Intx,
            sys::VFIO_PCI_MSI_IRQ_INDEX => PciIrq::Msi,
            sys::VFIO_PCI_MSIX_IRQ_INDEX => PciIrq::Msix,
            sys::VFIO_PCI_ERR_IRQ_INDEX => PciIrq::Err,
            sys::VFIO_PCI_REQ_IRQ_INDEX => PciIrq::Req,
            _ => {
                return Err(Error::invalid(
                    "PciIrq::try_from",
                    format!("interrupt index {index} is not a PCI interrupt"),
                ));
            }
        })
    }
}

/// What `VFIO_DEVICE_GET_IRQ_INFO` reports about an interrupt index.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct IrqInfo {
    /// The interrupt index.
    pub index: u32,
    /// Its properties. Unknown bits are kept.
    pub flags: IrqFlags,
    /// How many vectors (sub-indices) it has; 0 if the device lacks this kind of interrupt.
    pub count: u32,
}

/// The PCI command register's offset in config space.
const PCI_COMMAND: u64 = 0x04;
/// The command register's Bus Master Enable bit.
const PCI_COMMAND_MASTER: u16 = 1 << 2;

impl BoundDevice {
    /// What the device is and how many regions and interrupt indices it has (`VFIO_DEVICE_GET_INFO`).
    ///
    /// The device-info capability chain is not requested (see [`DeviceInfo`]).
    pub fn info(&self) -> Result<DeviceInfo> {
        let mut arg = sys::vfio_device_info::new();
        // SAFETY: VFIO_DEVICE_GET_INFO on a device cdev takes `vfio_device_info`, whose `argsz` `new()`
        // sets to its size; it holds no pointers. The kernel writes the answer (and a larger `argsz`
        // if it has capabilities, which it then does not copy) through the exclusive borrow.
        unsafe { ioctl::call(self.as_fd(), &ioctl::DEVICE_GET_INFO, &mut arg) }?;
        Ok(DeviceInfo {
            flags: DeviceFlags::from_bits_retain(arg.flags),
            num_regions: arg.num_regions,
            num_irqs: arg.num_irqs,
        })
    }

    /// A region's size, file offset, flags and capabilities (`VFIO_DEVICE_GET_REGION_INFO`).
    ///
    /// For PCI devices, [`PciRegion::index`] gives the fixed indices.
    pub fn region_info(&self, index: u32) -> Result<RegionInfo> {
        let (raw, mut info) = region_info_fixed(self.as_fd(), index)?;
        let base = size_of::<sys::vfio_region_info>();
        if !info.flags.contains(RegionFlags::CAPS) || raw.argsz as usize <= base {
            return Ok(info);
        }
        // The kernel has a capability chain and said how large a buffer it needs. Repeat the request
        // with that much room; a few rounds cover a chain that grew in between (never seen in practice).
        let mut want = raw.argsz as usize;
        for _ in 0..4 {
            if want > MAX_REGION_INFO_ARGSZ {
                break;
            }
            let mut buf = vec![0u8; want];
            put_u32(&mut buf, offset_of!(sys::vfio_region_info, argsz), want as u32);
            put_u32(&mut buf, offset_of!(sys::vfio_region_info, index), index);
            // SAFETY: `buf` starts with a `vfio_region_info` (VFIO_DEVICE_GET_REGION_INFO's argument)
            // whose `argsz` is `buf.len()`, so the kernel writes the structure and its capability
            // chain only inside `buf`; no field is a pointer. The kernel copies with
            // copy_to_user/copy_from_user, which need no alignment, and this code reads the answer
            // back byte by byte.
            unsafe { ioctl::call_buf(self.as_fd(), &ioctl::DEVICE_GET_REGION_INFO, &mut buf) }?;
            let argsz = get_u32(&buf, offset_of!(sys::vfio_region_info, argsz)).unwrap_or(0) as usize;
            if argsz > want {
                want = argsz;
                continue;
            }
            let flags = get_u32(&buf, offset_of!(sys::vfio_region_info, flags)).unwrap_or(0);
            info.flags = RegionFlags::from_bits_retain(flags);
            info.size = get_u64(&buf, offset_of!(sys::vfio_region_info, size)).unwrap_or(info.size);
            info.offset = get_u64(&buf, offset_of!(sys::vfio_region_info, offset)).unwrap_or(info.offset);
            let cap_offset = get_u32(&buf, offset_of!(sys::vfio_region_info, cap_offset)).unwrap_or(0);
            if cap_offset != 0 {
                let caps = parse_region_caps(&buf, cap_offset as usize)?;
                info.sparse_mmap = caps.sparse_mmap;
                info.region_type = caps.region_type;
                info.msix_mappable = caps.msix_mappable;
            }
            return Ok(info);
        }
        Err(Error::Protocol {
            op: ioctl::DEVICE_GET_REGION_INFO.name,
            detail: format!(
                "region {index}: capability chain needs {want} bytes of argsz, more than expected"
            ),
        })
    }

    /// Reads `buf.len()` bytes at `offset` inside region `index` (`pread` on the cdev, repeated until
    /// complete).
    ///
    /// The region must be readable and `offset..offset + buf.len()` inside it.
    pub fn read_region(&self, index: u32, offset: u64, buf: &mut [u8]) -> Result<()> {
        const OP: &str = "BoundDevice::read_region";
        let (_, info) = region_info_fixed(self.as_fd(), index)?;
        let start = region_file_offset(OP, &info, RegionFlags::READ, offset, buf.len())?;
        let mut done = 0;
        while done < buf.len() {
            match rustix::io::pread(self.as_fd(), &mut buf[done..], start + done as u64) {
                Ok(0) => {
                    return Err(Error::Protocol {
                        op: "pread(VFIO region)",
                        detail: format!(
                            "region {index}: end of file after {done} of {} bytes at offset {offset:#x}",
                            buf.len()
                        ),
                    });
                }
                Ok(n) => done += n,
                Err(Errno::INTR) => {}
                Err(e) => return Err(Error::os("pread(VFIO region)", e)),
            }
        }
        Ok(())
    }

    /// Writes `data` at `offset` inside region `index` (`pwrite` on the cdev, repeated until complete).
    ///
    /// The region must be writable and `offset..offset + data.len()` inside it.
    pub fn write_region(&self, index: u32, offset: u64, data: &[u8]) -> Result<()> {
        const OP: &str = "BoundDevice::write_region";
        self.check_process(OP)?;
        let (_, info) = region_info_fixed(self.as_fd(), index)?;
        let start = region_file_offset(OP, &info, RegionFlags::WRITE, offset, data.len())?;
        let mut done = 0;
        while done < data.len() {
            match rustix::io::pwrite(self.as_fd(), &data[done..], start + done as u64) {
                Ok(0) => {
                    return Err(Error::Protocol {
                        op: "pwrite(VFIO region)",
                        detail: format!(
                            "region {index}: wrote nothing after {done} of {} bytes at offset {offset:#x}",
                            data.len()
                        ),
                    });
                }
                Ok(n) => done += n,
                Err(Errno::INTR) => {}
                Err(e) => return Err(Error::os("pwrite(VFIO region)", e)),
            }
        }
        Ok(())
    }

    /// Reads a byte of PCI configuration space (through the config region, as vfio-pci virtualises it).
    pub fn read_config_u8(&self, offset: u64) -> Result<u8> {
        let mut b = [0u8; 1];
        self.config_read("BoundDevice::read_config_u8", offset, &mut b)?;
        Ok(b[0])
    }

    /// Reads a little-endian 16-bit PCI config register (`offset` 2-byte aligned).
    pub fn read_config_u16(&self, offset: u64) -> Result<u16> {
        let mut b = [0u8; 2];
        self.config_read("BoundDevice::read_config_u16", offset, &mut b)?;
        Ok(u16::from_le_bytes(b))
    }

    /// Reads a little-endian 32-bit PCI config register (`offset` 4-byte aligned).
    pub fn read_config_u32(&self, offset: u64) -> Result<u32> {
        let mut b = [0u8; 4];
        self.config_read("BoundDevice::read_config_u32", offset, &mut b)?;
        Ok(u32::from_le_bytes(b))
    }

    /// Writes a byte of PCI configuration space. vfio-pci filters config writes: fields it virtualises
    /// or protects may ignore the value.
    pub fn write_config_u8(&self, offset: u64, value: u8) -> Result<()> {
        self.config_write("BoundDevice::write_config_u8", offset, &[value])
    }

    /// Writes a little-endian 16-bit PCI config register (`offset` 2-byte aligned).
    pub fn write_config_u16(&self, offset: u64, value: u16) -> Result<()> {
        self.config_write("BoundDevice::write_config_u16", offset, &value.to_le_bytes())
    }

    /// Writes a little-endian 32-bit PCI config register (`offset` 4-byte aligned).
    pub fn write_config_u32(&self, offset: u64, value: u32) -> Result<()> {
        self.config_write("BoundDevice::write_config_u32", offset, &value.to_le_bytes())
    }

    fn config_read(&self, op: &'static str, offset: u64, buf: &mut [u8]) -> Result<()> {
        check_aligned(op, offset, buf.len())?;
        self.read_region(sys::VFIO_PCI_CONFIG_REGION_INDEX, offset, buf)
    }

    fn config_write(&self, op: &'static str, offset: u64, data: &[u8]) -> Result<()> {
        check_aligned(op, offset, data.len())?;
        self.write_region(sys::VFIO_PCI_CONFIG_REGION_INDEX, offset, data)
    }

    /// Whether PCI bus mastering (the device's own DMA) is enabled: bit 2 of the command register.
    pub fn bus_master(&self) -> Result<bool> {
        Ok(self.read_config_u16(PCI_COMMAND)? & PCI_COMMAND_MASTER != 0)
    }

    /// Enables or disables PCI bus mastering. vfio-pci leaves it off when the device is opened, so a
    /// device's DMA does nothing until this is called with `true`.
    ///
    /// This is a read-modify-write of the command register (offset 4, bit 2) through the config
    /// region, which every vfio-pci kernel supports (`VFIO_DEVICE_FEATURE_BUS_MASTER` is newer and
    /// not used). The other command bits are written back unchanged.
    pub fn set_bus_master(&self, enable: bool) -> Result<()> {
        let cmd = self.read_config_u16(PCI_COMMAND)?;
        let new = if enable { cmd | PCI_COMMAND_MASTER } else { cmd & !PCI_COMMAND_MASTER };
        if new == cmd {
            return Ok(());
        }
        self.write_config_u16(PCI_COMMAND, new)
    }

    /// Maps all of region `index` (`mmap`, `MAP_SHARED`, readable/writable as the region allows).
    ///
    /// Refused with [`Error::InvalidArgument`] if the region lacks [`RegionFlags::MMAP`], is empty, or
    /// allows mapping only some areas ([`RegionInfo::sparse_mmap`]: use
    /// [`map_region_range`](Self::map_region_range) for each of them).
    pub fn map_region(&self, index: u32) -> Result<RegionMapping> {
        const OP: &str = "BoundDevice::map_region";
        let info = self.region_info(index)?;
        let len = usize::try_from(info.size).map_err(|_| {
            Error::invalid(OP, format!("region {index} ({:#x} bytes) exceeds the address space", info.size))
        })?;
        self.map_checked(OP, &info, 0, len)
    }

    /// Maps `len` bytes of region `index` from `offset` (a multiple of the page size).
    ///
    /// For a region with sparse-mmap areas the range must lie inside one of them.
    pub fn map_region_range(&self, index: u32, offset: u64, len: usize) -> Result<RegionMapping> {
        let info = self.region_info(index)?;
        self.map_checked("BoundDevice::map_region_range", &info, offset, len)
    }

    fn map_checked(
        &self,
        op: &'static str,
        info: &RegionInfo,
        offset: u64,
        len: usize,
    ) -> Result<RegionMapping> {
        use rustix::mm::{MapFlags, ProtFlags};
        let file_offset = check_mmap(op, info, offset, len, rustix::param::page_size())?;
        let mut prot = ProtFlags::empty();
        let mut access = RegionFlags::empty();
        if info.flags.contains(RegionFlags::READ) {
            prot |= ProtFlags::READ;
            access |= RegionFlags::READ;
        }
        if info.flags.contains(RegionFlags::WRITE) {
            prot |= ProtFlags::WRITE;
            access |= RegionFlags::WRITE;
        }
        // SAFETY: a shared mapping of the device cdev at a kernel-chosen address (null hint) aliases no
        // memory Rust knows about; `file_offset..+len` lies inside the region (checked above), which
        // the kernel validates again.
        let ptr = unsafe {
            rustix::mm::mmap(std::ptr::null_mut(), len, prot, MapFlags::SHARED, self.as_fd(), file_offset)
        }
        .map_err(|e| Error::os("mmap(VFIO region)", e))?;
        let ptr = NonNull::new(ptr.cast::<u8>()).ok_or(Error::os("mmap(VFIO region)", Errno::NOMEM))?;
        Ok(RegionMapping { ptr, len, access, index: info.index, offset, _dev: self.inner.clone() })
    }

    /// An interrupt index's properties and vector count (`VFIO_DEVICE_GET_IRQ_INFO`).
    ///
    /// For PCI devices, [`PciIrq::index`] gives the indices.
    pub fn irq_info(&self, index: u32) -> Result<IrqInfo> {
        let mut arg = sys::vfio_irq_info::new();
        arg.index = index;
        // SAFETY: VFIO_DEVICE_GET_IRQ_INFO on a device cdev takes `vfio_irq_info`, sized by `new()`,
        // with no pointers; the kernel writes `flags` and `count` through the exclusive borrow.
        unsafe { ioctl::call(self.as_fd(), &ioctl::DEVICE_GET_IRQ_INFO, &mut arg) }?;
        Ok(IrqInfo { index, flags: IrqFlags::from_bits_retain(arg.flags), count: arg.count })
    }

    /// Signals vectors `start..start + fds.len()` of interrupt `index` through `fds` (eventfds):
    /// `VFIO_DEVICE_SET_IRQS` with `DATA_EVENTFD | ACTION_TRIGGER`.
    ///
    /// For MSI and MSI-X this also enables the vectors. The kernel keeps its own references to the
    /// eventfds, so they may be closed here afterwards. Use [`disable_irqs`](Self::disable_irqs) to
    /// tear the index down.
    pub fn set_irq_eventfds(&self, index: u32, start: u32, fds: &[impl AsFd]) -> Result<()> {
        const OP: &str = "BoundDevice::set_irq_eventfds";
        if fds.is_empty() {
            return Err(Error::invalid(OP, "no eventfds given (use disable_irqs to disable the index)"));
        }
        let raw: Vec<RawFd> = fds.iter().map(|f| f.as_fd().as_raw_fd()).collect();
        self.set_irq_fds(OP, sys::VFIO_IRQ_SET_ACTION_TRIGGER, index, start, &raw)
    }

    /// Disables every vector of interrupt `index` and releases its eventfds
    /// (`DATA_NONE | ACTION_TRIGGER`, count 0).
    pub fn disable_irqs(&self, index: u32) -> Result<()> {
        self.set_irqs_none(
            "BoundDevice::disable_irqs",
            sys::VFIO_IRQ_SET_DATA_NONE | sys::VFIO_IRQ_SET_ACTION_TRIGGER,
            index,
            0,
            0,
        )
    }

    /// Fires vector `subindex` of interrupt `index` from software, as if the device had raised it
    /// (`DATA_NONE | ACTION_TRIGGER`, count 1): its eventfd is signalled. Useful for loopback tests.
    pub fn trigger_irq(&self, index: u32, subindex: u32) -> Result<()> {
        self.set_irqs_none(
            "BoundDevice::trigger_irq",
            sys::VFIO_IRQ_SET_DATA_NONE | sys::VFIO_IRQ_SET_ACTION_TRIGGER,
            index,
            subindex,
            1,
        )
    }

    /// Masks vector `subindex` of interrupt `index` (`DATA_NONE | ACTION_MASK`); the index must be
    /// [`IrqFlags::MASKABLE`].
    pub fn mask_irq(&self, index: u32, subindex: u32) -> Result<()> {
        self.set_irqs_none(
            "BoundDevice::mask_irq",
            sys::VFIO_IRQ_SET_DATA_NONE | sys::VFIO_IRQ_SET_ACTION_MASK,
            index,
            subindex,
            1,
        )
    }

    /// Unmasks vector `subindex` of interrupt `index` (`DATA_NONE | ACTION_UNMASK`), for example INTx
    /// after servicing it ([`IrqFlags::AUTOMASKED`]).
    pub fn unmask_irq(&self, index: u32, subindex: u32) -> Result<()> {
        self.set_irqs_none(
            "BoundDevice::unmask_irq",
            sys::VFIO_IRQ_SET_DATA_NONE | sys::VFIO_IRQ_SET_ACTION_UNMASK,
            index,
            subindex,
            1,
        )
    }

    fn set_irqs_none(&self, op: &'static str, flags: u32, index: u32, start: u32, count: u32) -> Result<()> {
        self.check_process(op)?;
        let mut buf = irq_set_buffer(op, flags, index, start, count, &[])?;
        // SAFETY: `buf` is a bare `vfio_irq_set` header with `argsz` equal to its byte length and
        // DATA_NONE, so the kernel reads no payload; it holds no pointers.
        unsafe { ioctl::call_buf(self.as_fd(), &ioctl::DEVICE_SET_IRQS, &mut buf) }.map(drop)
    }

    /// Resets the device (`VFIO_DEVICE_RESET`; the device must report [`DeviceFlags::RESET`], else
    /// `EINVAL`).
    ///
    /// The kernel saves the device's PCI config space before the reset and restores it afterwards
    /// (`pci_try_reset_function`), so bus mastering, the BARs and the MSI/MSI-X setup survive, and
    /// VFIO keeps the interrupt eventfds set with [`set_irq_eventfds`](Self::set_irq_eventfds). What is
    /// lost is the device's internal state (its registers and any DMA in flight). `EAGAIN` if the
    /// device is locked by another reset at the moment.
    pub fn reset(&self) -> Result<()> {
        self.check_process(ioctl::DEVICE_RESET.name)?;
        ioctl::call_none(self.as_fd(), &ioctl::DEVICE_RESET).map(drop)
    }

    /// Refuses `op`, which changes the device's state, in a `fork()`ed child
    /// ([`Error::ForeignProcess`]): the device is the parent's.
    pub(crate) fn check_process(&self, op: &'static str) -> Result<()> {
        self.inner.iommufd.check_process(op)
    }
}

/// The largest `argsz` accepted for a region-info capability chain (real chains are a few hundred
/// bytes).
const MAX_REGION_INFO_ARGSZ: usize = 64 * 1024;

/// `VFIO_DEVICE_GET_REGION_INFO` with the fixed-size structure (no capability chain).
fn region_info_fixed(fd: BorrowedFd<'_>, index: u32) -> Result<(sys::vfio_region_info, RegionInfo)> {
    check_region_index(ioctl::DEVICE_GET_REGION_INFO.name, index)?;
    let mut arg = sys::vfio_region_info::new();
    arg.index = index;
    // SAFETY: VFIO_DEVICE_GET_REGION_INFO on a device cdev takes `vfio_region_info`, whose `argsz`
    // `new()` sets to its size, so the kernel writes no capability chain past it; it holds no
    // pointers and the kernel writes the answer through the exclusive borrow.
    unsafe { ioctl::call(fd, &ioctl::DEVICE_GET_REGION_INFO, &mut arg) }?;
    let info = RegionInfo::from_raw(&arg);
    Ok((arg, info))
}

/// Builds a `vfio_irq_set` argument: the 20-byte header followed by `fds` as `i32`s, as `u32` words
/// (so the buffer has the structure's 4-byte alignment), with `argsz` set to the total byte length.
///
/// Checks, as the kernel will: `start + count` must not overflow; with `DATA_EVENTFD`, `fds` must have
/// `count` entries, and without it none.
pub(super) fn irq_set_buffer(
    op: &'static str,
    flags: u32,
    index: u32,
    start: u32,
    count: u32,
    fds: &[RawFd],
) -> Result<Vec<u32>> {
    if count >= u32::MAX - start {
        return Err(Error::invalid(op, format!("vectors {start} + {count} overflow")));
    }
    let eventfds = flags & sys::VFIO_IRQ_SET_DATA_TYPE_MASK == sys::VFIO_IRQ_SET_DATA_EVENTFD;
    let want = if eventfds { count as usize } else { 0 };
    if fds.len() != want {
        return Err(Error::invalid(op, format!("{} eventfds for {want} vectors", fds.len())));
    }
    const HEADER: usize = size_of::<sys::vfio_irq_set>();
    const WORD: usize = size_of::<u32>();
    let bytes = HEADER + std::mem::size_of_val(fds);
    let argsz = u32::try_from(bytes).map_err(|_| Error::invalid(op, "too many eventfds"))?;
    let mut buf = vec![0u32; bytes / WORD];
    buf[offset_of!(sys::vfio_irq_set, argsz) / WORD] = argsz;
    buf[offset_of!(sys::vfio_irq_set, flags) / WORD] = flags;
    buf[offset_of!(sys::vfio_irq_set, index) / WORD] = index;
    buf[offset_of!(sys::vfio_irq_set, start) / WORD] = start;
    buf[offset_of!(sys::vfio_irq_set, count) / WORD] = count;
    let data = offset_of!(sys::vfio_irq_set, data) / WORD;
    for (slot, fd) in buf[data..].iter_mut().zip(fds) {
        *slot = *fd as u32;
    }
    Ok(buf)
}

/// Checks that `offset..offset + len` lies inside a region of `size` bytes.
fn check_range(op: &'static str, index: u32, size: u64, offset: u64, len: usize) -> Result<()> {
    let end = offset.checked_add(len as u64);
    match end {
        Some(end) if end <= size => Ok(()),
        _ => Err(Error::invalid(
            op,
            format!("{len:#x} bytes at offset {offset:#x} exceed region {index} ({size:#x} bytes)"),
        )),
    }
}

/// Checks that an access of `width` bytes at `offset` is naturally aligned.
fn check_aligned(op: &'static str, offset: u64, width: usize) -> Result<()> {
    if width > 1 && offset % width as u64 != 0 {
        return Err(Error::invalid(op, format!("offset {offset:#x} is not aligned to {width} bytes")));
    }
    Ok(())
}

/// Validates a `pread`/`pwrite` of `len` bytes at `offset` in the region and returns the cdev file
/// offset.
fn region_file_offset(
    op: &'static str,
    info: &RegionInfo,
    need: RegionFlags,
    offset: u64,
    len: usize,
) -> Result<u64> {
    if !info.flags.contains(need) {
        let what = if need.contains(RegionFlags::WRITE) { "writable" } else { "readable" };
        return Err(Error::invalid(op, format!("region {} is not {what}", info.index)));
    }
    check_range(op, info.index, info.size, offset, len)?;
    info.offset.checked_add(offset).ok_or_else(|| {
        Error::invalid(
            op,
            format!("region {} file offset {:#x} + {offset:#x} overflows", info.index, info.offset),
        )
    })
}

/// Validates an `mmap` of `len` bytes at `offset` in the region and returns the cdev file offset.
fn check_mmap(op: &'static str, info: &RegionInfo, offset: u64, len: usize, page: usize) -> Result<u64> {
    let index = info.index;
    if !info.flags.contains(RegionFlags::MMAP) {
        return Err(Error::invalid(op, format!("region {index} cannot be mmap-ed (no MMAP flag)")));
    }
    if !info.flags.intersects(RegionFlags::READ | RegionFlags::WRITE) {
        return Err(Error::invalid(op, format!("region {index} is neither readable nor writable")));
    }
    if len == 0 {
        return Err(Error::invalid(op, format!("empty mapping of region {index} ({:#x} bytes)", info.size)));
    }
    check_range(op, index, info.size, offset, len)?;
    let file_offset = info.offset.checked_add(offset).ok_or_else(|| {
        Error::invalid(op, format!("region {index} file offset {:#x} + {offset:#x} overflows", info.offset))
    })?;
    if file_offset % page as u64 != 0 {
        return Err(Error::invalid(
            op,
            format!("offset {offset:#x} in region {index} is not page-aligned ({page:#x})"),
        ));
    }
    if let Some(areas) = &info.sparse_mmap {
        let end = offset + len as u64; // checked by check_range
        if !areas.iter().any(|a| a.offset <= offset && a.offset.checked_add(a.size).is_some_and(|e| end <= e))
        {
            return Err(Error::invalid(
                op,
                format!(
                    "region {index} can be mapped only in its sparse areas {areas:x?}; \
                     {len:#x} bytes at {offset:#x} are not inside one (use map_region_range)"
                ),
            ));
        }
    }
    Ok(file_offset)
}

/// The capabilities decoded from a region-info chain.
#[derive(Debug, Default, PartialEq, Eq)]
struct RegionCaps {
    sparse_mmap: Option<Vec<SparseMmapArea>>,
    region_type: Option<RegionType>,
    msix_mappable: bool,
}

/// Decodes a region-info capability chain. `buf` is the whole ioctl argument and `first` the
/// `cap_offset` the kernel reported; every `next` offset counts from the start of `buf` too.
///
/// Bounds-checked: any content of `buf` and any offsets give a value or an [`Error::Protocol`], never
/// a panic or a read past `buf`; offsets must increase, so the walk ends.
fn parse_region_caps(buf: &[u8], first: usize) -> Result<RegionCaps> {
    let bad = |detail: String| Error::Protocol { op: ioctl::DEVICE_GET_REGION_INFO.name, detail };
    let mut caps = RegionCaps::default();
    let mut off = first;
    let mut prev = size_of::<sys::vfio_region_info>().saturating_sub(1);
    while off != 0 {
        // The kernel appends capabilities after the structure, each after the previous one: anything
        // else is corrupt (and a backwards link could loop).
        if off <= prev {
            return Err(bad(format!("capability at {off:#x} does not follow the previous one ({prev:#x})")));
        }
        let id = get_u16(buf, off.saturating_add(offset_of!(sys::vfio_info_cap_header, id)));
        let next = get_u32(buf, off.saturating_add(offset_of!(sys::vfio_info_cap_header, next)));
        let (Some(id), Some(next)) = (id, next) else {
            return Err(bad(format!("capability header at {off:#x} overruns {} bytes", buf.len())));
        };
        match u32::from(id) {
            sys::VFIO_REGION_INFO_CAP_SPARSE_MMAP => {
                let nr = get_u32(
                    buf,
                    off.saturating_add(offset_of!(sys::vfio_region_info_cap_sparse_mmap, nr_areas)),
                )
                .ok_or_else(|| bad(format!("sparse-mmap capability at {off:#x} is truncated")))?;
                let areas_at = off.saturating_add(offset_of!(sys::vfio_region_info_cap_sparse_mmap, areas));
                let area = size_of::<sys::vfio_region_sparse_mmap_area>();
                let fits = (nr as usize)
                    .checked_mul(area)
                    .and_then(|n| n.checked_add(areas_at))
                    .is_some_and(|end| end <= buf.len());
                if !fits {
                    return Err(bad(format!("sparse-mmap capability at {off:#x} claims {nr} areas")));
                }
                let areas = (0..nr as usize)
                    .filter_map(|i| {
                        let at = areas_at + i * area;
                        Some(SparseMmapArea {
                            offset: get_u64(buf, at + offset_of!(sys::vfio_region_sparse_mmap_area, offset))?,
                            size: get_u64(buf, at + offset_of!(sys::vfio_region_sparse_mmap_area, size))?,
                        })
                    })
                    .collect();
                caps.sparse_mmap = Some(areas);
            }
            sys::VFIO_REGION_INFO_CAP_TYPE => {
                let kind =
                    get_u32(buf, off.saturating_add(offset_of!(sys::vfio_region_info_cap_type, type_)));
                let subtype =
                    get_u32(buf, off.saturating_add(offset_of!(sys::vfio_region_info_cap_type, subtype)));
                let (Some(kind), Some(subtype)) = (kind, subtype) else {
                    return Err(bad(format!("type capability at {off:#x} is truncated")));
                };
                caps.region_type = Some(RegionType { kind, subtype });
            }
            sys::VFIO_REGION_INFO_CAP_MSIX_MAPPABLE => caps.msix_mappable = true,
            _ => {} // Capabilities this crate does not decode are skipped.
        }
        prev = off;
        off = next as usize;
    }
    Ok(caps)
}

fn get_u16(buf: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_ne_bytes(buf.get(at..at.checked_add(2)?)?.try_into().ok()?))
}

fn get_u32(buf: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(buf.get(at..at.checked_add(4)?)?.try_into().ok()?))
}

fn get_u64(buf: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_ne_bytes(buf.get(at..at.checked_add(8)?)?.try_into().ok()?))
}

/// Writes `v` at `at`; `at + 4` must be inside `buf` (only used for header fields of a buffer at
/// least as large as the header).
fn put_u32(buf: &mut [u8], at: usize, v: u32) {
    if let Some(dst) = buf.get_mut(at..at + 4) {
        dst.copy_from_slice(&v.to_ne_bytes());
    }
}

/// A region of a device mapped into this process ([`BoundDevice::map_region`]).
///
/// The memory is device memory mapped from the VFIO device, outside any Rust allocation: it is only
/// ever accessed through single volatile loads and stores of the requested width, after bounds and
/// alignment checks, and never lent out as a Rust reference. Volatile, not atomic, because a device
/// register must see exactly the access width asked for and a region may be mapped read-only. The
/// mapping is `Sync`: accesses from several threads at once reach the device as separate accesses,
/// in an order the threads do not control (what two racing register writes do is the device's
/// business; serialise them if the device needs it). The mapping keeps the device open; it is
/// unmapped on drop.
///
/// Touching the mapping while the device cannot answer (for example with memory decoding disabled in
/// its command register, or during a reset) makes the kernel raise `SIGBUS`, which kills the process
/// unless handled: that is a crash, not memory unsafety.
pub struct RegionMapping {
    ptr: NonNull<u8>,
    len: usize,
    access: RegionFlags,
    index: u32,
    offset: u64,
    _dev: Arc<DeviceInner>,
}

// SAFETY: the mapping is device memory outside any Rust allocation, owned by this value. It is touched
// only through volatile accesses on raw pointers, whose effect (including from several threads at
// once) the hardware defines; no reference to it is ever created. `Arc<DeviceInner>` is Send + Sync.
unsafe impl Send for RegionMapping {}
// SAFETY: as above: `&RegionMapping` only allows the same volatile accesses.
unsafe impl Sync for RegionMapping {}

impl std::fmt::Debug for RegionMapping {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegionMapping")
            .field("dev_id", &self._dev.dev_id)
            .field("region", &self.index)
            .field("offset", &self.offset)
            .field("len", &self.len)
            .field("access", &self.access)
            .finish()
    }
}

impl RegionMapping {
    /// Length of the mapping in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Always false: empty mappings are refused.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// The region index this maps.
    pub fn region_index(&self) -> u32 {
        self.index
    }

    /// Where in the region the mapping starts.
    pub fn region_offset(&self) -> u64 {
        self.offset
    }

    /// The address in this process the mapping starts at, for handing the BAR to a hypervisor: a KVM
    /// memory slot (`KVM_SET_USER_MEMORY_REGION`'s `userspace_addr`) over it lets the guest reach the
    /// device's registers without a trap to the VMM.
    ///
    /// Only regions that allow it can be mapped at all ([`RegionFlags::MMAP`], and for a BAR that
    /// holds the MSI-X table, only the sparse areas the kernel offers, or the whole BAR where the
    /// region reports the MSI-X-mappable capability).
    ///
    /// # Safety
    ///
    /// The address is the caller's to use only while this `RegionMapping` lives. Dropping it unmaps
    /// the range, and the kernel may then put any other mapping of this process there, which a user
    /// still holding the address (a memory slot, another thread) would read and write instead.
    /// Therefore the caller must:
    ///
    /// - make every user it hands the address to stop using it before this mapping is dropped (for
    ///   KVM: delete the memory slot, by setting its size to 0, before dropping the mapping);
    /// - never create a Rust reference (`&`/`&mut`) to the memory, which is device memory whose bytes
    ///   change outside Rust's view: access it only through volatile loads and stores of the widths
    ///   the device expects;
    /// - not unmap, remap or change the protection of the range through the address.
    ///
    /// In a `fork()`ed child the address is the parent's mapping of the parent's device: the child
    /// must not use it.
    pub unsafe fn host_address(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    /// Validates an access of `width` bytes at `offset` and returns its address.
    fn at(&self, op: &'static str, need: RegionFlags, offset: usize, width: usize) -> Result<*mut u8> {
        // A fork()ed child inherits the shared mapping: its stores would drive the parent's device,
        // and so can its loads (registers that clear on read).
        self._dev.iommufd.check_process(op)?;
        if !self.access.contains(need) {
            let what = if need.contains(RegionFlags::WRITE) { "writable" } else { "readable" };
            return Err(Error::invalid(op, format!("region {} is not mapped {what}", self.index)));
        }
        check_range(op, self.index, self.len as u64, offset as u64, width)?;
        // The mapping starts page-aligned, so an aligned offset is an aligned address.
        check_aligned(op, offset as u64, width)?;
        Ok(self.ptr.as_ptr().wrapping_add(offset))
    }

    /// Reads the byte at `offset`.
    pub fn read_u8(&self, offset: usize) -> Result<u8> {
        let p = self.at("RegionMapping::read_u8", RegionFlags::READ, offset, 1)?;
        // SAFETY: `p` is inside the readable mapping this value owns (checked by `at`); volatile
        // because it is device memory.
        Ok(unsafe { p.read_volatile() })
    }

    /// Reads the 16-bit value at `offset` (2-byte aligned), in native byte order.
    pub fn read_u16(&self, offset: usize) -> Result<u16> {
        let p = self.at("RegionMapping::read_u16", RegionFlags::READ, offset, 2)?;
        // SAFETY: `p..p+2` is inside the readable mapping this value owns and 2-byte aligned (checked
        // by `at`); volatile because it is device memory.
        Ok(unsafe { p.cast::<u16>().read_volatile() })
    }

    /// Reads the 32-bit value at `offset` (4-byte aligned), in native byte order.
    pub fn read_u32(&self, offset: usize) -> Result<u32> {
        let p = self.at("RegionMapping::read_u32", RegionFlags::READ, offset, 4)?;
        // SAFETY: `p..p+4` is inside the readable mapping this value owns and 4-byte aligned (checked
        // by `at`); volatile because it is device memory.
        Ok(unsafe { p.cast::<u32>().read_volatile() })
    }

    /// Reads the 64-bit value at `offset` (8-byte aligned), in native byte order. (On 64-bit targets
    /// this is a single access; a device that needs that should not be driven from a 32-bit one.)
    pub fn read_u64(&self, offset: usize) -> Result<u64> {
        let p = self.at("RegionMapping::read_u64", RegionFlags::READ, offset, 8)?;
        // SAFETY: `p..p+8` is inside the readable mapping this value owns and 8-byte aligned (checked
        // by `at`); volatile because it is device memory.
        Ok(unsafe { p.cast::<u64>().read_volatile() })
    }

    /// Writes the byte at `offset`.
    pub fn write_u8(&self, offset: usize, value: u8) -> Result<()> {
        let p = self.at("RegionMapping::write_u8", RegionFlags::WRITE, offset, 1)?;
        // SAFETY: `p` is inside the writable mapping this value owns (checked by `at`); volatile
        // because it is device memory. No Rust reference to it exists.
        unsafe { p.write_volatile(value) };
        Ok(())
    }

    /// Writes the 16-bit `value` at `offset` (2-byte aligned), in native byte order.
    pub fn write_u16(&self, offset: usize, value: u16) -> Result<()> {
        let p = self.at("RegionMapping::write_u16", RegionFlags::WRITE, offset, 2)?;
        // SAFETY: `p..p+2` is inside the writable mapping this value owns and 2-byte aligned (checked
        // by `at`); volatile because it is device memory. No Rust reference to it exists.
        unsafe { p.cast::<u16>().write_volatile(value) };
        Ok(())
    }

    /// Writes the 32-bit `value` at `offset` (4-byte aligned), in native byte order.
    pub fn write_u32(&self, offset: usize, value: u32) -> Result<()> {
        let p = self.at("RegionMapping::write_u32", RegionFlags::WRITE, offset, 4)?;
        // SAFETY: `p..p+4` is inside the writable mapping this value owns and 4-byte aligned (checked
        // by `at`); volatile because it is device memory. No Rust reference to it exists.
        unsafe { p.cast::<u32>().write_volatile(value) };
        Ok(())
    }

    /// Writes the 64-bit `value` at `offset` (8-byte aligned), in native byte order.
    pub fn write_u64(&self, offset: usize, value: u64) -> Result<()> {
        let p = self.at("RegionMapping::write_u64", RegionFlags::WRITE, offset, 8)?;
        // SAFETY: `p..p+8` is inside the writable mapping this value owns and 8-byte aligned (checked
        // by `at`); volatile because it is device memory. No Rust reference to it exists.
        unsafe { p.cast::<u64>().write_volatile(value) };
        Ok(())
    }

    /// Copies `buf.len()` bytes from `offset` with single-byte volatile loads (for memory-like BARs;
    /// registers usually need [`read_u32`](Self::read_u32) and friends).
    pub fn read_bytes(&self, offset: usize, buf: &mut [u8]) -> Result<()> {
        let p = self.at("RegionMapping::read_bytes", RegionFlags::READ, offset, 0)?;
        check_range("RegionMapping::read_bytes", self.index, self.len as u64, offset as u64, buf.len())?;
        for (i, b) in buf.iter_mut().enumerate() {
            // SAFETY: `p + i` is inside the readable mapping this value owns (checked above), which
            // stays mapped while `self` is borrowed; volatile because it is device memory (which may
            // be mapped read-only, so not through an atomic type).
            *b = unsafe { p.add(i).read_volatile() };
        }
        Ok(())
    }

    /// Copies `data` to `offset` with single-byte volatile stores.
    pub fn write_bytes(&self, offset: usize, data: &[u8]) -> Result<()> {
        let p = self.at("RegionMapping::write_bytes", RegionFlags::WRITE, offset, 0)?;
        check_range("RegionMapping::write_bytes", self.index, self.len as u64, offset as u64, data.len())?;
        for (i, b) in data.iter().enumerate() {
            // SAFETY: `p + i` is inside the writable mapping this value owns (checked above), which
            // stays mapped while `self` is borrowed; volatile because it is device memory.
            unsafe { p.add(i).write_volatile(*b) };
        }
        Ok(())
    }
}

impl Drop for RegionMapping {
    fn drop(&mut self) {
        // SAFETY: `ptr..ptr+len` is the mapping this value created and owns; no reference into it
        // exists (accessors only make volatile accesses that end before they return).
        if let Err(e) = unsafe { rustix::mm::munmap(self.ptr.as_ptr().cast(), self.len) } {
            log::error!("iommufd: munmap of VFIO region {} failed: {e}", self.index);
        }
    }
}

/// An ioeventfd registered on a device region (`VFIO_DEVICE_IOEVENTFD`, Linux 4.17): each signal of
/// the eventfd makes the kernel write `data` to the register, without a round trip through the VMM.
/// De-assigned on drop (failures logged) or with [`Ioeventfd::remove`]. Keeps the device open.
pub struct Ioeventfd {
    dev: Arc<DeviceInner>,
    arg: sys::vfio_device_ioeventfd,
    live: bool,
}

impl std::fmt::Debug for Ioeventfd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ioeventfd")
            .field("file_offset", &format_args!("{:#x}", self.arg.offset))
            .field("data", &format_args!("{:#x}", self.arg.data))
            .field("width", &(self.arg.flags & sys::VFIO_DEVICE_IOEVENTFD_SIZE_MASK))
            .finish()
    }
}

fn ioeventfd_ioctl(fd: BorrowedFd<'_>, arg: &mut sys::vfio_device_ioeventfd) -> Result<()> {
    // SAFETY: VFIO_DEVICE_IOEVENTFD on a device cdev takes `vfio_device_ioeventfd`, sized by `new()`;
    // it holds no pointers, and its `fd` is either -1 (de-assign) or an eventfd borrowed open for the
    // call (the kernel takes its own reference).
    unsafe { ioctl::call(fd, &ioctl::DEVICE_IOEVENTFD, arg) }.map(drop)
}

impl BoundDevice {
    /// Registers `eventfd` so that each signal writes `data` (`width` bytes: 1, 2, 4 or 8) at `offset`
    /// in region `index` (`VFIO_DEVICE_IOEVENTFD`). vfio-pci accepts BAR regions only; `offset` must be
    /// aligned to `width`.
    pub fn ioeventfd(
        &self,
        index: u32,
        offset: u64,
        width: usize,
        data: u64,
        eventfd: impl AsFd,
    ) -> Result<Ioeventfd> {
        const OP: &str = "VFIO_DEVICE_IOEVENTFD";
        self.check_process(OP)?;
        let size_flag = match width {
            1 => sys::VFIO_DEVICE_IOEVENTFD_8,
            2 => sys::VFIO_DEVICE_IOEVENTFD_16,
            4 => sys::VFIO_DEVICE_IOEVENTFD_32,
            8 => sys::VFIO_DEVICE_IOEVENTFD_64,
            _ => return Err(Error::invalid(OP, format!("width {width} is not 1, 2, 4 or 8"))),
        };
        if offset % width as u64 != 0 {
            return Err(Error::invalid(OP, format!("offset {offset:#x} is not aligned to {width} bytes")));
        }
        if width < 8 && data >> (8 * width) != 0 {
            return Err(Error::invalid(OP, format!("data {data:#x} does not fit in {width} bytes")));
        }
        let (_, info) = region_info_fixed(self.as_fd(), index)?;
        let file_offset = region_file_offset(OP, &info, RegionFlags::WRITE, offset, width)?;
        let mut arg = sys::vfio_device_ioeventfd::new();
        arg.flags = size_flag;
        arg.offset = file_offset;
        arg.data = data;
        arg.fd = eventfd.as_fd().as_raw_fd();
        ioeventfd_ioctl(self.as_fd(), &mut arg)?;
        arg.fd = -1;
        Ok(Ioeventfd { dev: self.inner.clone(), arg, live: true })
    }
}

impl Ioeventfd {
    fn deassign(&mut self) -> Result<()> {
        self.live = false;
        let mut arg = self.arg;
        ioeventfd_ioctl(self.dev.fd.as_fd(), &mut arg)
    }

    /// De-assigns the ioeventfd now, reporting failure. In a `fork()`ed child this is refused with
    /// [`Error::ForeignProcess`] and the ioeventfd stays (it is the parent's).
    pub fn remove(mut self) -> Result<()> {
        if let Err(e) = self.dev.iommufd.check_process(ioctl::DEVICE_IOEVENTFD.name) {
            self.live = false;
            return Err(e);
        }
        self.deassign()
    }
}

impl Drop for Ioeventfd {
    fn drop(&mut self) {
        // In a fork()ed child the ioeventfd is the parent's: leave it.
        if self.live && self.dev.iommufd.in_owner_process() {
            if let Err(e) = self.deassign() {
                log::error!("iommufd: de-assigning {self:?} on drop failed: {e}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn region(flags: RegionFlags, size: u64, offset: u64) -> RegionInfo {
        RegionInfo {
            index: 0,
            flags,
            size,
            offset,
            sparse_mmap: None,
            region_type: None,
            msix_mappable: false,
        }
    }

    #[test]
    fn pci_indices() {
        for n in 0..=5u8 {
            let idx = PciRegion::Bar(n).index();
            assert_eq!(PciRegion::bar(n).unwrap(), PciRegion::Bar(n));
            assert_eq!(idx, sys::VFIO_PCI_BAR0_REGION_INDEX + u32::from(n));
            assert_eq!(PciRegion::try_from(idx).unwrap(), PciRegion::Bar(n));
        }
        assert_eq!(PciRegion::Bar(5).index(), sys::VFIO_PCI_BAR5_REGION_INDEX);
        assert_eq!(PciRegion::Rom.index(), sys::VFIO_PCI_ROM_REGION_INDEX);
        assert_eq!(PciRegion::Config.index(), sys::VFIO_PCI_CONFIG_REGION_INDEX);
        assert_eq!(PciRegion::Vga.index(), sys::VFIO_PCI_VGA_REGION_INDEX);
        assert_eq!(PciRegion::try_from(7).unwrap(), PciRegion::Config);
        assert!(matches!(PciRegion::bar(6), Err(Error::InvalidArgument { .. })));
        // A nonexistent BAR never aliases a real region, and is refused before any syscall.
        assert_eq!(PciRegion::Bar(6).index(), NO_REGION);
        assert_eq!(PciRegion::Bar(255).index(), NO_REGION);
        assert!(matches!(check_region_index("t", NO_REGION), Err(Error::InvalidArgument { .. })));
        assert!(check_region_index("t", 8).is_ok());
        assert!(PciRegion::try_from(NO_REGION).is_err());
        assert!(matches!(PciRegion::try_from(9), Err(Error::InvalidArgument { .. })));

        let irqs = [PciIrq::Intx, PciIrq::Msi, PciIrq::Msix, PciIrq::Err, PciIrq::Req];
        let want = [
            sys::VFIO_PCI_INTX_IRQ_INDEX,
            sys::VFIO_PCI_MSI_IRQ_INDEX,
            sys::VFIO_PCI_MSIX_IRQ_INDEX,
            sys::VFIO_PCI_ERR_IRQ_INDEX,
            sys::VFIO_PCI_REQ_IRQ_INDEX,
        ];
        for (irq, idx) in irqs.into_iter().zip(want) {
            assert_eq!(irq.index(), idx);
            assert_eq!(PciIrq::try_from(idx).unwrap(), irq);
        }
        assert!(PciIrq::try_from(5).is_err());
    }

    #[test]
    fn unknown_flag_bits_survive() {
        let f = RegionFlags::from_bits_retain(0x8000_0003);
        assert!(f.contains(RegionFlags::READ | RegionFlags::WRITE));
        assert_eq!(f.bits(), 0x8000_0003);
        assert_eq!(DeviceFlags::from_bits_retain(0x1_0003).bits(), 0x1_0003);
        assert_eq!(IrqFlags::from_bits_retain(0x41).bits(), 0x41);
    }

    #[test]
    fn irq_set_layout() {
        let flags = sys::VFIO_IRQ_SET_DATA_EVENTFD | sys::VFIO_IRQ_SET_ACTION_TRIGGER;
        let buf = irq_set_buffer("t", flags, 2, 3, 2, &[10, 11]).unwrap();
        assert_eq!(size_of::<sys::vfio_irq_set>(), 20);
        assert_eq!(buf.len() * 4, 28);
        // Read it back as the kernel would: header then i32 data.
        let bytes: Vec<u8> = buf.iter().flat_map(|w| w.to_ne_bytes()).collect();
        let field = |o: usize| u32::from_ne_bytes(bytes[o..o + 4].try_into().unwrap());
        assert_eq!(field(offset_of!(sys::vfio_irq_set, argsz)), 28);
        assert_eq!(field(offset_of!(sys::vfio_irq_set, flags)), flags);
        assert_eq!(field(offset_of!(sys::vfio_irq_set, index)), 2);
        assert_eq!(field(offset_of!(sys::vfio_irq_set, start)), 3);
        assert_eq!(field(offset_of!(sys::vfio_irq_set, count)), 2);
        let data = offset_of!(sys::vfio_irq_set, data);
        assert_eq!(data, 20);
        assert_eq!(i32::from_ne_bytes(bytes[data..data + 4].try_into().unwrap()), 10);
        assert_eq!(i32::from_ne_bytes(bytes[data + 4..data + 8].try_into().unwrap()), 11);
        // The buffer is aligned as the structure is.
        assert!(std::mem::align_of::<u32>() >= std::mem::align_of::<sys::vfio_irq_set>());

        let none = sys::VFIO_IRQ_SET_DATA_NONE | sys::VFIO_IRQ_SET_ACTION_TRIGGER;
        let buf = irq_set_buffer("t", none, 1, 0, 0, &[]).unwrap();
        assert_eq!(buf, vec![20, none, 1, 0, 0]);
        let buf = irq_set_buffer("t", none, 0, 4, 1, &[]).unwrap();
        assert_eq!(buf, vec![20, none, 0, 4, 1]);
    }

    #[test]
    fn irq_set_validation() {
        let efd = sys::VFIO_IRQ_SET_DATA_EVENTFD | sys::VFIO_IRQ_SET_ACTION_TRIGGER;
        let none = sys::VFIO_IRQ_SET_DATA_NONE | sys::VFIO_IRQ_SET_ACTION_TRIGGER;
        for r in [
            irq_set_buffer("t", efd, 0, 0, 2, &[1]),
            irq_set_buffer("t", none, 0, 0, 1, &[1]),
            irq_set_buffer("t", none, 0, u32::MAX, 1, &[]),
            irq_set_buffer("t", none, 0, 1, u32::MAX - 1, &[]),
        ] {
            assert!(matches!(r, Err(Error::InvalidArgument { .. })), "{r:?}");
        }
    }

    #[test]
    fn range_checks() {
        assert!(check_range("t", 0, 256, 0, 256).is_ok());
        assert!(check_range("t", 0, 256, 256, 0).is_ok());
        assert!(check_range("t", 0, 256, 252, 4).is_ok());
        for (off, len) in [(253u64, 4usize), (257, 0), (u64::MAX, 1), (0, 257)] {
            let e = check_range("t", 0, 256, off, len).unwrap_err();
            assert!(matches!(e, Error::InvalidArgument { .. }), "{off} {len}: {e}");
        }
        assert!(check_range("t", 0, 0, 0, 1).is_err());
        assert!(check_aligned("t", 6, 2).is_ok());
        assert!(check_aligned("t", 6, 4).is_err());
        assert!(check_aligned("t", 7, 1).is_ok());
        assert!(check_aligned("t", 8, 8).is_ok());
        assert!(check_aligned("t", 4, 8).is_err());
    }

    #[test]
    fn region_file_offsets() {
        let rw = RegionFlags::READ | RegionFlags::WRITE;
        let r = region(rw, 0x100, 7 << 40);
        assert_eq!(region_file_offset("t", &r, RegionFlags::READ, 4, 2).unwrap(), (7 << 40) + 4);
        assert!(region_file_offset("t", &r, RegionFlags::READ, 0xff, 2).is_err());
        let ro = region(RegionFlags::READ, 0x100, 0);
        assert!(region_file_offset("t", &ro, RegionFlags::WRITE, 0, 1).is_err());
        let wrap = region(rw, u64::MAX, u64::MAX - 1);
        assert!(region_file_offset("t", &wrap, RegionFlags::READ, 4, 1).is_err());
    }

    #[test]
    fn mmap_checks() {
        let page = 4096;
        let all = RegionFlags::READ | RegionFlags::WRITE | RegionFlags::MMAP;
        let r = region(all, 0x10_0000, 1 << 40);
        assert_eq!(check_mmap("t", &r, 0, 0x10_0000, page).unwrap(), 1 << 40);
        assert_eq!(check_mmap("t", &r, 0x1000, 0x1000, page).unwrap(), (1 << 40) + 0x1000);
        let bad = [
            check_mmap("t", &region(RegionFlags::READ, 0x1000, 0), 0, 0x1000, page),
            check_mmap("t", &region(RegionFlags::MMAP, 0x1000, 0), 0, 0x1000, page),
            check_mmap("t", &r, 0, 0, page),
            check_mmap("t", &r, 0x800, 0x800, page),
            check_mmap("t", &r, 0x1000, 0x10_0000, page),
        ];
        for b in bad {
            assert!(matches!(b, Err(Error::InvalidArgument { .. })), "{b:?}");
        }
        let mut sparse = region(all, 0x4000, 0);
        sparse.sparse_mmap = Some(vec![SparseMmapArea { offset: 0x2000, size: 0x2000 }]);
        assert!(check_mmap("t", &sparse, 0, 0x4000, page).is_err());
        assert!(check_mmap("t", &sparse, 0x2000, 0x2000, page).is_ok());
        assert!(check_mmap("t", &sparse, 0x3000, 0x1000, page).is_ok());
    }

    /// Builds a region-info buffer the way the kernel lays it out.
    fn caps_buffer() -> Vec<u8> {
        let mut buf = vec![0u8; 32];
        let push16 = |b: &mut Vec<u8>, v: u16| b.extend_from_slice(&v.to_ne_bytes());
        let push32 = |b: &mut Vec<u8>, v: u32| b.extend_from_slice(&v.to_ne_bytes());
        let push64 = |b: &mut Vec<u8>, v: u64| b.extend_from_slice(&v.to_ne_bytes());
        // Sparse mmap at 32: header, nr_areas 2, reserved, two areas (16 + 32 = 48 bytes).
        push16(&mut buf, sys::VFIO_REGION_INFO_CAP_SPARSE_MMAP as u16);
        push16(&mut buf, 1);
        push32(&mut buf, 80);
        push32(&mut buf, 2);
        push32(&mut buf, 0);
        push64(&mut buf, 0);
        push64(&mut buf, 0x1000);
        push64(&mut buf, 0x3000);
        push64(&mut buf, 0x1000);
        // Type at 80.
        push16(&mut buf, sys::VFIO_REGION_INFO_CAP_TYPE as u16);
        push16(&mut buf, 1);
        push32(&mut buf, 96);
        push32(&mut buf, 0x8000_8086);
        push32(&mut buf, 1);
        // MSI-X mappable at 96, then an unknown one at 104, last.
        push16(&mut buf, sys::VFIO_REGION_INFO_CAP_MSIX_MAPPABLE as u16);
        push16(&mut buf, 1);
        push32(&mut buf, 104);
        push16(&mut buf, 0x7777);
        push16(&mut buf, 1);
        push32(&mut buf, 0);
        buf
    }

    #[test]
    fn region_caps_chain() {
        let buf = caps_buffer();
        let caps = parse_region_caps(&buf, 32).unwrap();
        assert_eq!(
            caps.sparse_mmap,
            Some(vec![
                SparseMmapArea { offset: 0, size: 0x1000 },
                SparseMmapArea { offset: 0x3000, size: 0x1000 }
            ])
        );
        assert_eq!(caps.region_type, Some(RegionType { kind: 0x8000_8086, subtype: 1 }));
        assert!(caps.msix_mappable);
    }

    #[test]
    fn region_caps_corrupt() {
        let buf = caps_buffer();
        // Truncated inside the sparse areas.
        assert!(matches!(parse_region_caps(&buf[..64], 32), Err(Error::Protocol { .. })));
        // A first capability inside the fixed structure.
        assert!(parse_region_caps(&buf, 8).is_err());
        // A backwards link (a loop).
        let mut looped = buf.clone();
        looped[100..104].copy_from_slice(&32u32.to_ne_bytes());
        assert!(parse_region_caps(&looped, 32).is_err());
        // Past the end.
        assert!(parse_region_caps(&buf, buf.len()).is_err());
        // Too many areas.
        let mut many = buf.clone();
        many[40..44].copy_from_slice(&u32::MAX.to_ne_bytes());
        assert!(parse_region_caps(&many, 32).is_err());
    }
}

/// Property tests of the decoders of kernel-written data (region capability chains) and of the
/// validation in front of region and interrupt ioctls: any input gives a value or an error, never a
/// panic, and the decoders only ever read through bounds-checked accessors.
#[cfg(test)]
mod props {
    use proptest::prelude::*;

    use super::*;

    /// One capability of a generated chain.
    #[derive(Debug, Clone)]
    enum Cap {
        Sparse(Vec<(u64, u64)>),
        Type(u32, u32),
        Msix,
        Unknown(u16, Vec<u8>),
    }

    fn cap() -> impl Strategy<Value = Cap> {
        prop_oneof![
            proptest::collection::vec(any::<(u64, u64)>(), 0..5).prop_map(Cap::Sparse),
            any::<(u32, u32)>().prop_map(|(k, s)| Cap::Type(k, s)),
            Just(Cap::Msix),
            (4u16.., proptest::collection::vec(any::<u8>(), 0..24)).prop_map(|(id, b)| Cap::Unknown(id, b)),
        ]
    }

    /// Lays `caps` out after a 32-byte `vfio_region_info` as the kernel does (each `next` the offset
    /// of the following capability from the buffer's start, 0 for the last), with `gaps` bytes of
    /// padding before each. Returns the buffer and the first offset (0 for an empty chain).
    fn encode(caps: &[Cap], gaps: &[usize]) -> (Vec<u8>, usize) {
        let mut buf = vec![0u8; size_of::<sys::vfio_region_info>()];
        let mut heads = Vec::new();
        for (i, cap) in caps.iter().enumerate() {
            buf.resize(buf.len() + gaps.get(i).copied().unwrap_or(0), 0xee);
            heads.push(buf.len());
            let (id, body): (u32, Vec<u8>) = match cap {
                Cap::Sparse(areas) => {
                    let mut b = Vec::new();
                    b.extend_from_slice(&(areas.len() as u32).to_ne_bytes());
                    b.extend_from_slice(&0u32.to_ne_bytes());
                    for (o, s) in areas {
                        b.extend_from_slice(&o.to_ne_bytes());
                        b.extend_from_slice(&s.to_ne_bytes());
                    }
                    (sys::VFIO_REGION_INFO_CAP_SPARSE_MMAP, b)
                }
                Cap::Type(k, s) => {
                    (sys::VFIO_REGION_INFO_CAP_TYPE, [k.to_ne_bytes(), s.to_ne_bytes()].concat())
                }
                Cap::Msix => (sys::VFIO_REGION_INFO_CAP_MSIX_MAPPABLE, Vec::new()),
                Cap::Unknown(id, b) => (u32::from(*id), b.clone()),
            };
            buf.extend_from_slice(&(id as u16).to_ne_bytes());
            buf.extend_from_slice(&1u16.to_ne_bytes());
            buf.extend_from_slice(&0u32.to_ne_bytes()); // next, patched below
            buf.extend_from_slice(&body);
        }
        for pair in heads.windows(2) {
            put_u32(&mut buf, pair[0] + 4, pair[1] as u32);
        }
        (buf, heads.first().copied().unwrap_or(0))
    }

    fn expected(caps: &[Cap]) -> RegionCaps {
        let mut want = RegionCaps::default();
        for cap in caps {
            match cap {
                Cap::Sparse(areas) => {
                    want.sparse_mmap =
                        Some(areas.iter().map(|&(offset, size)| SparseMmapArea { offset, size }).collect())
                }
                Cap::Type(kind, subtype) => {
                    want.region_type = Some(RegionType { kind: *kind, subtype: *subtype })
                }
                Cap::Msix => want.msix_mappable = true,
                Cap::Unknown(..) => {}
            }
        }
        want
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(crate::device::prop_cases()))]

        #[test]
        fn well_formed_chains_decode_to_what_was_encoded(
            caps in proptest::collection::vec(cap(), 0..6),
            gaps in proptest::collection::vec(0usize..16, 6),
        ) {
            let (buf, first) = encode(&caps, &gaps);
            prop_assert_eq!(parse_region_caps(&buf, first).unwrap(), expected(&caps));
        }

        #[test]
        fn corrupted_chains_never_panic(
            caps in proptest::collection::vec(cap(), 1..6),
            flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 0..8),
            cut in any::<usize>(),
            first_delta in -8isize..8,
        ) {
            let (mut buf, first) = encode(&caps, &[]);
            for (at, v) in flips {
                let n = buf.len();
                buf[at % n] ^= v;
            }
            buf.truncate(cut % (buf.len() + 1));
            let first = first.saturating_add_signed(first_delta);
            let _ = parse_region_caps(&buf, first);
        }

        #[test]
        fn arbitrary_bytes_never_panic(
            buf in proptest::collection::vec(any::<u8>(), 0..256),
            first in any::<usize>(),
        ) {
            if let Ok(caps) = parse_region_caps(&buf, first) {
                // Whatever was decoded came from inside the buffer.
                let areas = caps.sparse_mmap.map_or(0, |a| a.len());
                prop_assert!(areas * size_of::<sys::vfio_region_sparse_mmap_area>() <= buf.len());
            }
        }

        #[test]
        fn irq_set_buffers_are_well_formed_or_refused(
            data in prop_oneof![
                Just(sys::VFIO_IRQ_SET_DATA_NONE),
                Just(sys::VFIO_IRQ_SET_DATA_BOOL),
                Just(sys::VFIO_IRQ_SET_DATA_EVENTFD),
                any::<u32>(),
            ],
            index in any::<u32>(),
            start in prop_oneof![0u32..16, any::<u32>()],
            count in prop_oneof![0u32..8, any::<u32>()],
            fds in proptest::collection::vec(any::<i32>(), 0..8),
        ) {
            let flags = data | sys::VFIO_IRQ_SET_ACTION_TRIGGER;
            match irq_set_buffer("t", flags, index, start, count, &fds) {
                Ok(buf) => {
                    const WORD: usize = size_of::<u32>();
                    prop_assert!(start.checked_add(count).is_some());
                    prop_assert_eq!(buf.len(), size_of::<sys::vfio_irq_set>() / WORD + fds.len());
                    prop_assert_eq!(buf[0] as usize, buf.len() * WORD);
                    prop_assert_eq!(buf[offset_of!(sys::vfio_irq_set, count) / WORD], count);
                    let data_at = offset_of!(sys::vfio_irq_set, data) / WORD;
                    prop_assert!(buf[data_at..].iter().zip(&fds).all(|(w, fd)| *w == *fd as u32));
                }
                Err(e) => prop_assert!(matches!(e, Error::InvalidArgument { .. }), "{}", e),
            }
        }

        #[test]
        fn region_and_irq_indices_round_trip(value in any::<u32>()) {
            if let Ok(region) = PciRegion::try_from(value) {
                prop_assert_eq!(region.index(), value);
            }
            if let Ok(irq) = PciIrq::try_from(value) {
                prop_assert_eq!(irq.index(), value);
            }
        }

        #[test]
        fn mmap_and_file_offset_checks_never_panic(
            flags in any::<u32>(),
            size in any::<u64>(),
            region_offset in any::<u64>(),
            areas in proptest::option::of(proptest::collection::vec(any::<(u64, u64)>(), 0..4)),
            offset in any::<u64>(),
            len in any::<usize>(),
        ) {
            let mut info = RegionInfo {
                index: 0,
                flags: RegionFlags::from_bits_retain(flags),
                size,
                offset: region_offset,
                sparse_mmap: None,
                region_type: None,
                msix_mappable: false,
            };
            info.sparse_mmap =
                areas.map(|a| a.into_iter().map(|(offset, size)| SparseMmapArea { offset, size }).collect());
            if let Ok(file_offset) = check_mmap("t", &info, offset, len, 4096) {
                prop_assert_eq!(Some(file_offset), region_offset.checked_add(offset));
                prop_assert!(offset.checked_add(len as u64).is_some_and(|end| end <= size));
            }
            for need in [RegionFlags::READ, RegionFlags::WRITE] {
                if let Ok(file_offset) = region_file_offset("t", &info, need, offset, len) {
                    prop_assert_eq!(Some(file_offset), region_offset.checked_add(offset));
                }
            }
        }
    }
}
