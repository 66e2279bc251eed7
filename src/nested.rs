//! Nested translation: allocating user-managed (stage-1) page tables on a nest parent
//! ([`Hwpt::alloc_nested`]) and invalidating their caches ([`Hwpt::invalidate`]).
//!
//! A VMM that gives a guest a virtual IOMMU lets the guest own the stage-1 page table (the guest's
//! IOVA -> guest physical address), while the host keeps a stage-2 *nest parent* (guest physical ->
//! host physical) built from an [`Ioas`](crate::Ioas). The nested HWPT is described by
//! driver-specific data ([`NestedData`]: the guest's VT-d PASID-table fields, SMMUv3 stream table
//! entry or AMD device table entry) and, because the IOMMU caches the guest's table, every change the
//! guest makes is followed by a cache invalidation the VMM forwards ([`InvalidateEntries`]).

use std::os::fd::AsFd;

use iommufd_sys as sys;

use crate::device::IommuDevice;
use crate::error::{Error, Result};
use crate::hwpt::{self, AllocData, FaultSource, Hwpt, HwptFlags, HwptKind, NestParent};
use crate::ioctl::{self, Sized32};
use crate::iommufd::Iommufd;

const INVALIDATE: &str = "IOMMU_HWPT_INVALIDATE";

/// The VT-d page size invalidation ranges are counted in.
const VTD_PAGE: u64 = 4096;

bitflags::bitflags! {
    /// Attributes of a VT-d stage-1 page table (`IOMMU_VTD_S1_*`), from the guest's scalable-mode PASID
    /// table entry.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
    pub struct VtdS1Flags: u64 {
        /// Supervisor requests are allowed (`SRE`). The kernel refuses the attach with `EINVAL` if the
        /// IOMMU lacks supervisor request support.
        const SRE = sys::IOMMU_VTD_S1_SRE as u64;
        /// Extended access flag enable (`EAFE`). Refused at attach if the IOMMU lacks it.
        const EAFE = sys::IOMMU_VTD_S1_EAFE as u64;
        /// Write protect enable (`WPE`): supervisor writes honour read-only entries. Only meaningful
        /// together with [`SRE`](Self::SRE).
        const WPE = sys::IOMMU_VTD_S1_WPE as u64;
        // Bits a newer kernel defines survive.
        const _ = !0;
    }
}

/// The paging mode of a VT-d stage-1 table, which fixes its address width.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum VtdPagingLevels {
    /// 4-level paging, 48-bit input addresses.
    Four,
    /// 5-level paging, 57-bit input addresses (the IOMMU must support it, or attach fails with
    /// `EINVAL`).
    Five,
}

impl VtdPagingLevels {
    /// The `addr_width` the kernel expects: 48 or 57.
    pub fn addr_width(self) -> u32 {
        match self {
            VtdPagingLevels::Four => 48,
            VtdPagingLevels::Five => 57,
        }
    }
}

/// Intel VT-d stage-1 page table description (`struct iommu_hwpt_vtd_s1`,
/// `IOMMU_HWPT_DATA_VTD_S1`, Linux 6.8).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct VtdS1 {
    flags: VtdS1Flags,
    pgtbl_addr: u64,
    levels: VtdPagingLevels,
}

impl VtdS1 {
    /// A stage-1 table rooted at `pgtbl_addr` (a guest physical address, translated by the nest
    /// parent), which must be 4 KiB aligned.
    pub fn new(pgtbl_addr: u64, levels: VtdPagingLevels) -> Result<VtdS1> {
        if pgtbl_addr % VTD_PAGE != 0 {
            return Err(Error::invalid(
                hwpt::HWPT_ALLOC,
                format!("VT-d stage-1 table address {pgtbl_addr:#x} is not 4 KiB aligned"),
            ));
        }
        Ok(VtdS1 { flags: VtdS1Flags::empty(), pgtbl_addr, levels })
    }

    /// The same table with `flags`.
    pub fn with_flags(self, flags: VtdS1Flags) -> VtdS1 {
        VtdS1 { flags, ..self }
    }

    /// The attributes.
    pub fn flags(&self) -> VtdS1Flags {
        self.flags
    }

    /// The table's root address.
    pub fn pgtbl_addr(&self) -> u64 {
        self.pgtbl_addr
    }

    /// The paging mode.
    pub fn levels(&self) -> VtdPagingLevels {
        self.levels
    }

    fn to_sys(self) -> sys::iommu_hwpt_vtd_s1 {
        sys::iommu_hwpt_vtd_s1 {
            flags: self.flags.bits(),
            pgtbl_addr: self.pgtbl_addr,
            addr_width: self.levels.addr_width(),
            __reserved: 0,
        }
    }
}

/// The first two 64-bit words of an ARM SMMUv3 Stream Table Entry for a nested domain
/// (`struct iommu_hwpt_arm_smmuv3`, `IOMMU_HWPT_DATA_ARM_SMMUV3`).
///
/// SMMUv3 nested tables are allocated on a vIOMMU, not directly on a nest-parent HWPT. The words are
/// held in host byte order and converted to the little-endian layout the kernel wants. The kernel
/// accepts only V, Config (abort, bypass or stage-1 translate), S1Fmt, S1ContextPtr and S1CDMax in
/// word 0 and S1DSS, S1CIR, S1COR, S1CSH, S1STALLD and EATS in word 1, and answers `EIO` for any other
/// bit; an entry with V clear is treated as all-zero.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ArmSmmuv3Ste {
    words: [u64; 2],
}

/// STE word 0 fields (SMMUv3 architecture, "Stream Table Entry").
const STE0_V: u64 = 1;
const STE0_CFG_SHIFT: u32 = 1;
const STE0_CFG_ABORT: u64 = 0;
const STE0_CFG_BYPASS: u64 = 4;
const STE0_CFG_S1_TRANS: u64 = 5;
const STE0_S1FMT_SHIFT: u32 = 4;
const STE0_S1CTXPTR_MASK: u64 = ((1 << 52) - 1) & !((1 << 6) - 1);
const STE0_S1CDMAX_SHIFT: u32 = 59;

impl ArmSmmuv3Ste {
    /// Words as the guest wrote them to its stream table (in host byte order).
    pub const fn from_words(words: [u64; 2]) -> ArmSmmuv3Ste {
        ArmSmmuv3Ste { words }
    }

    /// A valid entry that aborts all traffic (Config = abort).
    pub const fn abort() -> ArmSmmuv3Ste {
        ArmSmmuv3Ste { words: [STE0_V | STE0_CFG_ABORT << STE0_CFG_SHIFT, 0] }
    }

    /// A valid entry that bypasses stage 1 (Config = bypass): the device is translated by the nest
    /// parent alone.
    pub const fn bypass() -> ArmSmmuv3Ste {
        ArmSmmuv3Ste { words: [STE0_V | STE0_CFG_BYPASS << STE0_CFG_SHIFT, 0] }
    }

    /// A valid stage-1 translating entry whose context descriptor table is at `cd_table` (a guest
    /// physical address, 64-byte aligned, below 2^52), in format `s1fmt` (0 linear, 1 two-level with
    /// 4 KiB leaves, 2 two-level with 64 KiB leaves) holding `2^s1cdmax` descriptors (`s1cdmax` <= 31).
    /// Word 1 is zero (S1DSS terminate, non-cacheable table walks, ATS off); use
    /// [`from_words`](Self::from_words) for anything else.
    pub fn s1_translate(cd_table: u64, s1fmt: u8, s1cdmax: u8) -> Result<ArmSmmuv3Ste> {
        if cd_table & !STE0_S1CTXPTR_MASK != 0 {
            return Err(Error::invalid(
                hwpt::HWPT_ALLOC,
                format!("SMMUv3 context descriptor table {cd_table:#x} is not 64-byte aligned below 2^52"),
            ));
        }
        if s1fmt > 2 {
            return Err(Error::invalid(hwpt::HWPT_ALLOC, format!("SMMUv3 S1Fmt {s1fmt} is reserved")));
        }
        if s1cdmax > 31 {
            return Err(Error::invalid(
                hwpt::HWPT_ALLOC,
                format!("SMMUv3 S1CDMax {s1cdmax} does not fit its 5-bit field"),
            ));
        }
        let word0 = STE0_V
            | STE0_CFG_S1_TRANS << STE0_CFG_SHIFT
            | u64::from(s1fmt) << STE0_S1FMT_SHIFT
            | cd_table
            | u64::from(s1cdmax) << STE0_S1CDMAX_SHIFT;
        Ok(ArmSmmuv3Ste { words: [word0, 0] })
    }

    /// The two words, in host byte order.
    pub const fn words(&self) -> [u64; 2] {
        self.words
    }

    fn to_sys(self) -> sys::iommu_hwpt_arm_smmuv3 {
        sys::iommu_hwpt_arm_smmuv3 { ste: [self.words[0].to_le(), self.words[1].to_le()] }
    }
}

/// An AMD IOMMU guest Device Table Entry for a nested domain (`struct iommu_hwpt_amd_guest`,
/// `IOMMU_HWPT_DATA_AMD_GUEST`), as the guest wrote it to its device table.
///
/// The kernel takes the guest-translation fields (GV, GLX, GCR3 table root, guest paging mode, PPR)
/// and answers `EINVAL` for a host-owned field that is set (Mode, host TRP), a valid GV entry without a
/// GCR3 root, a reserved GLX or paging mode, and `EOPNOTSUPP` for 5-level guest paging the IOMMU lacks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct AmdGuestDte {
    words: [u64; 4],
}

impl AmdGuestDte {
    /// The entry's four 64-bit words, in host byte order.
    pub const fn from_words(words: [u64; 4]) -> AmdGuestDte {
        AmdGuestDte { words }
    }

    /// The four words.
    pub const fn words(&self) -> [u64; 4] {
        self.words
    }

    fn to_sys(self) -> sys::iommu_hwpt_amd_guest {
        sys::iommu_hwpt_amd_guest { dte: self.words }
    }
}

/// The driver-specific description of a nested page table (`data_type` + data of
/// `IOMMU_HWPT_ALLOC`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum NestedData {
    /// Intel VT-d stage-1 (`IOMMU_HWPT_DATA_VTD_S1`).
    VtdS1(VtdS1),
    /// ARM SMMUv3 nested stream table entry (`IOMMU_HWPT_DATA_ARM_SMMUV3`).
    ArmSmmuv3(ArmSmmuv3Ste),
    /// AMD IOMMU guest device table entry (`IOMMU_HWPT_DATA_AMD_GUEST`).
    AmdGuest(AmdGuestDte),
    /// Any other type, with its structure's bytes in native byte order: a type this crate does not
    /// name yet, or the kernel's mock driver (`IOMMU_HWPT_DATA_SELFTEST`, 0xdead, with
    /// `struct iommu_hwpt_selftest`) under `CONFIG_IOMMUFD_TEST`.
    Raw {
        /// The `enum iommu_hwpt_data_type` value; not `IOMMU_HWPT_DATA_NONE` (0).
        data_type: u32,
        /// The structure, at most `u32::MAX` bytes and not empty.
        bytes: Vec<u8>,
    },
}

/// A [`NestedData`] laid out for the kernel; borrowed by the `data_uptr` of one ioctl.
enum Encoded<'a> {
    VtdS1(sys::iommu_hwpt_vtd_s1),
    ArmSmmuv3(sys::iommu_hwpt_arm_smmuv3),
    AmdGuest(sys::iommu_hwpt_amd_guest),
    Bytes(&'a [u8]),
}

fn ptr_len<T>(value: &T) -> (u64, u32) {
    (value as *const T as u64, std::mem::size_of::<T>() as u32)
}

impl NestedData {
    /// The `enum iommu_hwpt_data_type` value passed to the kernel.
    pub fn data_type(&self) -> u32 {
        match self {
            NestedData::VtdS1(_) => sys::IOMMU_HWPT_DATA_VTD_S1,
            NestedData::ArmSmmuv3(_) => sys::IOMMU_HWPT_DATA_ARM_SMMUV3,
            NestedData::AmdGuest(_) => sys::IOMMU_HWPT_DATA_AMD_GUEST,
            NestedData::Raw { data_type, .. } => *data_type,
        }
    }

    fn encode(&self) -> Result<Encoded<'_>> {
        Ok(match self {
            NestedData::VtdS1(v) => Encoded::VtdS1(v.to_sys()),
            NestedData::ArmSmmuv3(s) => Encoded::ArmSmmuv3(s.to_sys()),
            NestedData::AmdGuest(d) => Encoded::AmdGuest(d.to_sys()),
            NestedData::Raw { data_type, bytes } => {
                if *data_type == sys::IOMMU_HWPT_DATA_NONE {
                    return Err(Error::invalid(
                        hwpt::HWPT_ALLOC,
                        "a nested page table needs a data type other than IOMMU_HWPT_DATA_NONE",
                    ));
                }
                if bytes.is_empty() || u32::try_from(bytes.len()).is_err() {
                    return Err(Error::invalid(
                        hwpt::HWPT_ALLOC,
                        format!("nested data of {} bytes (1 to u32::MAX bytes needed)", bytes.len()),
                    ));
                }
                Encoded::Bytes(bytes)
            }
        })
    }
}

impl Encoded<'_> {
    /// Points at the encoded data; valid while `self` is alive and not moved.
    fn alloc_data(&self, data_type: u32) -> AllocData {
        let (uptr, len) = match self {
            Encoded::VtdS1(v) => ptr_len(v),
            Encoded::ArmSmmuv3(s) => ptr_len(s),
            Encoded::AmdGuest(d) => ptr_len(d),
            // Length checked against u32 by `NestedData::encode`.
            Encoded::Bytes(b) => (b.as_ptr() as u64, b.len() as u32),
        };
        AllocData { data_type, uptr, len }
    }
}

impl Hwpt {
    /// Allocates a nested (user-managed, stage-1) page table for `device` on `parent`
    /// (`IOMMU_HWPT_ALLOC` with a nest-parent HWPT, Linux 6.7; with a vIOMMU, Linux 6.13).
    ///
    /// `parent` is a paging [`Hwpt`] allocated with [`HwptFlags::NEST_PARENT`] (anything else is
    /// rejected before the ioctl; the kernel would answer `EINVAL`) or a vIOMMU. The new table keeps
    /// `parent` alive. `flags` may hold only [`HwptFlags::PASID`]: nest-parent and dirty tracking are
    /// properties of the stage-2 parent and are rejected here.
    ///
    /// The kernel answers `EOPNOTSUPP` for a data type the device's IOMMU driver does not implement
    /// ([`Error::is_unsupported`]) and `EINVAL` (`EIO` for SMMUv3) for data it refuses.
    pub fn alloc_nested(
        device: &impl IommuDevice,
        parent: &impl NestParent,
        data: &NestedData,
        flags: HwptFlags,
    ) -> Result<Hwpt> {
        Self::alloc_nested_inner(device, parent, data, flags, None)
    }

    /// Like [`alloc_nested`](Self::alloc_nested), and delivers the table's I/O page faults (the
    /// guest's page requests) to `faults` (`IOMMU_HWPT_FAULT_ID_VALID`, Linux 6.11). The HWPT keeps
    /// the fault queue alive.
    pub fn alloc_nested_with_faults(
        device: &impl IommuDevice,
        parent: &impl NestParent,
        data: &NestedData,
        flags: HwptFlags,
        faults: &impl FaultSource,
    ) -> Result<Hwpt> {
        Self::alloc_nested_inner(device, parent, data, flags, Some(faults.fault_ref()))
    }

    fn alloc_nested_inner(
        device: &impl IommuDevice,
        parent: &impl NestParent,
        data: &NestedData,
        flags: HwptFlags,
        faults: Option<hwpt::ObjRef>,
    ) -> Result<Hwpt> {
        let stage2 = flags & (HwptFlags::NEST_PARENT | HwptFlags::DIRTY_TRACKING);
        if !stage2.is_empty() {
            return Err(Error::invalid(
                hwpt::HWPT_ALLOC,
                format!("{stage2:?} applies to the stage-2 parent, not to a nested page table"),
            ));
        }
        let target = Hwpt::nested_target(device, parent)?;
        let encoded = data.encode()?;
        let alloc_data = encoded.alloc_data(data.data_type());
        // SAFETY: `alloc_data` points at the `len` bytes of `encoded` (a local, or the caller's
        // `data`), which is neither moved nor modified until this function returns, after the ioctl.
        unsafe { Hwpt::alloc_raw(device, target, &alloc_data, flags, faults) }
    }

    /// Invalidates the IOMMU's caches of this nested table after its owner (the guest) changed it
    /// (`IOMMU_HWPT_INVALIDATE`, Linux 6.8). Returns how many entries the kernel handled: all of them.
    ///
    /// The kernel handles entries in order and stops at the first one it refuses. A failure is an
    /// [`InvalidateError`]: its [`handled`](InvalidateError::handled) entries (a prefix of `entries`)
    /// took effect, entry number `handled` is the one refused (or the call failed before any entry),
    /// and the rest were not looked at. A VMM reports the refused entry to the guest and may resubmit
    /// the rest. `?` converts it into the crate's [`Error`], dropping the count.
    ///
    /// An empty list ([`InvalidateEntries::probe`]) asks the kernel whether the table supports the
    /// data type: `Ok(0)` if it does. Lists longer than the kernel's per-call limit (2^19 entries) are
    /// sent in several calls, with the same prefix semantics.
    ///
    /// Only nested tables have user-managed caches: a paging HWPT is rejected before the ioctl (the
    /// kernel would answer `EINVAL`).
    pub fn invalidate(&self, entries: &InvalidateEntries<'_>) -> Result<u32, InvalidateError> {
        if self.kind() != HwptKind::Nested {
            return Err(InvalidateError {
                handled: 0,
                error: Error::invalid(
                    INVALIDATE,
                    format!("HWPT {} is a paging table: only nested tables take invalidations", self.id()),
                ),
            });
        }
        invalidate_object(self.iommufd(), self.id(), entries)
    }
}

/// A VT-d stage-1 cache invalidation (`struct iommu_hwpt_vtd_s1_invalidate`,
/// `IOMMU_HWPT_INVALIDATE_DATA_VTD_S1`, Linux 6.8), laid out as the kernel reads it so a slice is
/// passed without copying. The device TLB is invalidated too when ATS is on.
#[repr(transparent)]
#[derive(Debug, Clone, Copy)]
pub struct VtdS1Invalidate(sys::iommu_hwpt_vtd_s1_invalidate);

impl VtdS1Invalidate {
    /// Invalidates `npages` 4 KiB pages from `addr` (4 KiB aligned; the range must not wrap).
    pub fn range(addr: u64, npages: u64) -> Result<VtdS1Invalidate> {
        if addr % VTD_PAGE != 0 {
            return Err(Error::invalid(
                INVALIDATE,
                format!("VT-d invalidation address {addr:#x} is not 4 KiB aligned"),
            ));
        }
        let fits = npages.checked_mul(VTD_PAGE).and_then(|len| addr.checked_add(len.checked_sub(1)?));
        if npages == 0 || fits.is_none() {
            return Err(Error::invalid(
                INVALIDATE,
                format!("VT-d invalidation of {npages} pages at {addr:#x} is empty or wraps (use all())"),
            ));
        }
        Ok(VtdS1Invalidate(sys::iommu_hwpt_vtd_s1_invalidate { addr, npages, flags: 0, __reserved: 0 }))
    }

    /// Invalidates every cached translation of the table (`addr` 0, `npages` `U64_MAX`).
    pub fn all() -> VtdS1Invalidate {
        VtdS1Invalidate(sys::iommu_hwpt_vtd_s1_invalidate {
            addr: 0,
            npages: u64::MAX,
            flags: 0,
            __reserved: 0,
        })
    }

    /// Only the leaf entries changed: the paging-structure caches may be kept
    /// (`IOMMU_VTD_INV_FLAGS_LEAF`).
    pub fn leaf_only(mut self) -> VtdS1Invalidate {
        self.0.flags |= sys::IOMMU_VTD_INV_FLAGS_LEAF;
        self
    }

    /// The first address.
    pub fn addr(&self) -> u64 {
        self.0.addr
    }

    /// The number of 4 KiB pages (`u64::MAX` for all).
    pub fn npages(&self) -> u64 {
        self.0.npages
    }

    /// True for a leaf-only invalidation.
    pub fn is_leaf_only(&self) -> bool {
        self.0.flags & sys::IOMMU_VTD_INV_FLAGS_LEAF != 0
    }
}

/// An ARM SMMUv3 invalidation command (`struct iommu_viommu_arm_smmuv3_invalidate`,
/// `IOMMU_VIOMMU_INVALIDATE_DATA_ARM_SMMUV3`), as the guest queued it in its command
/// queue. These go to a vIOMMU, not to a nested HWPT. Laid out as the kernel reads it (two
/// little-endian words), so a slice is passed without copying.
///
/// The kernel accepts TLBI_NSNH_ALL, TLBI_NH_VA, TLBI_NH_VAA, TLBI_NH_ALL, TLBI_NH_ASID, ATC_INV,
/// CFGI_CD and CFGI_CD_ALL, and answers `EIO` for any other opcode or unsupported field.
#[repr(transparent)]
#[derive(Debug, Clone, Copy)]
pub struct ArmSmmuv3Invalidate(sys::iommu_viommu_arm_smmuv3_invalidate);

impl ArmSmmuv3Invalidate {
    /// The command's two 64-bit words, in host byte order.
    pub fn from_words(words: [u64; 2]) -> ArmSmmuv3Invalidate {
        ArmSmmuv3Invalidate(sys::iommu_viommu_arm_smmuv3_invalidate {
            cmd: [words[0].to_le(), words[1].to_le()],
        })
    }

    /// The two words, in host byte order.
    pub fn words(&self) -> [u64; 2] {
        [u64::from_le(self.0.cmd[0]), u64::from_le(self.0.cmd[1])]
    }
}

/// A list of cache invalidation requests of one type, for [`Hwpt::invalidate`] (and a vIOMMU's
/// invalidation).
#[derive(Debug, Clone, Copy)]
#[non_exhaustive]
pub enum InvalidateEntries<'a> {
    /// VT-d stage-1 invalidations (`IOMMU_HWPT_INVALIDATE_DATA_VTD_S1`), for a nested HWPT.
    VtdS1(&'a [VtdS1Invalidate]),
    /// SMMUv3 commands (`IOMMU_VIOMMU_INVALIDATE_DATA_ARM_SMMUV3`), for a vIOMMU.
    ArmSmmuv3(&'a [ArmSmmuv3Invalidate]),
    /// Entries of any other type: `bytes` holds `bytes.len() / entry_len` entries of `entry_len`
    /// bytes each, in the driver's layout (for example the mock driver's
    /// `struct iommu_hwpt_invalidate_selftest`, type `IOMMU_HWPT_INVALIDATE_DATA_SELFTEST`).
    Raw {
        /// The `enum iommu_hwpt_invalidate_data_type` value.
        data_type: u32,
        /// Bytes per entry: at least 1, at most the page size. Ignored for an empty list.
        entry_len: u32,
        /// The entries, back to back; a multiple of `entry_len` long.
        bytes: &'a [u8],
    },
}

/// An `IOMMU_HWPT_INVALIDATE` request in the kernel's terms.
struct RawEntries {
    data_type: u32,
    entry_len: u32,
    ptr: *const u8,
    count: usize,
}

/// The kernel's cap on `entry_num` per call (`IOMMU_HWPT_INVALIDATE_ENTRY_NUM_MAX`, Linux 7.3).
const MAX_ENTRIES_PER_CALL: usize = 1 << 19;

impl InvalidateEntries<'_> {
    /// An empty list of type `data_type`: invalidating with it asks whether the target supports the
    /// type (the kernel's documented probe), without invalidating anything.
    pub fn probe(data_type: u32) -> InvalidateEntries<'static> {
        InvalidateEntries::Raw { data_type, entry_len: 0, bytes: &[] }
    }

    /// The `enum iommu_hwpt_invalidate_data_type` value passed to the kernel.
    pub fn data_type(&self) -> u32 {
        match self {
            InvalidateEntries::VtdS1(_) => sys::IOMMU_HWPT_INVALIDATE_DATA_VTD_S1,
            InvalidateEntries::ArmSmmuv3(_) => sys::IOMMU_VIOMMU_INVALIDATE_DATA_ARM_SMMUV3,
            InvalidateEntries::Raw { data_type, .. } => *data_type,
        }
    }

    /// The number of entries (for `Raw`, whole entries of `entry_len` bytes).
    pub fn len(&self) -> usize {
        match self {
            InvalidateEntries::VtdS1(e) => e.len(),
            InvalidateEntries::ArmSmmuv3(e) => e.len(),
            InvalidateEntries::Raw { entry_len: 0, .. } => 0,
            InvalidateEntries::Raw { entry_len, bytes, .. } => bytes.len() / *entry_len as usize,
        }
    }

    /// True if there are no entries (a probe).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn raw(&self) -> Result<RawEntries> {
        fn typed<T>(data_type: u32, entries: &[T]) -> RawEntries {
            RawEntries {
                data_type,
                entry_len: std::mem::size_of::<T>() as u32,
                ptr: entries.as_ptr().cast(),
                count: entries.len(),
            }
        }
        let raw = match *self {
            InvalidateEntries::VtdS1(e) => typed(self.data_type(), e),
            InvalidateEntries::ArmSmmuv3(e) => typed(self.data_type(), e),
            InvalidateEntries::Raw { data_type, entry_len, bytes } => {
                if bytes.is_empty() {
                    return Ok(RawEntries { data_type, entry_len: 0, ptr: std::ptr::null(), count: 0 });
                }
                let page = crate::dma::page_size() as u64;
                if entry_len == 0 || u64::from(entry_len) > page {
                    return Err(Error::invalid(
                        INVALIDATE,
                        format!("entry length {entry_len} is not between 1 and the page size ({page})"),
                    ));
                }
                if bytes.len() % entry_len as usize != 0 {
                    return Err(Error::invalid(
                        INVALIDATE,
                        format!("{} bytes are not a whole number of {entry_len}-byte entries", bytes.len()),
                    ));
                }
                RawEntries {
                    data_type,
                    entry_len,
                    ptr: bytes.as_ptr(),
                    count: bytes.len() / entry_len as usize,
                }
            }
        };
        if u32::try_from(raw.count).is_err() {
            return Err(Error::invalid(INVALIDATE, format!("{} entries (at most u32::MAX)", raw.count)));
        }
        Ok(raw)
    }
}

/// A failed [`Hwpt::invalidate`]: the kernel handled the first `handled` entries, then refused entry
/// number `handled` (or failed before looking at any) with `error`.
///
/// Converts into the crate's [`Error`] (keeping `error`, dropping the count), so `?` works in
/// functions returning [`crate::Result`].
#[derive(Debug, thiserror::Error)]
#[error("{error} (after the kernel handled {handled} entries)")]
pub struct InvalidateError {
    /// How many entries, from the start of the list, took effect.
    pub handled: u32,
    /// Why the next entry (or the call) failed.
    pub error: Error,
}

impl From<InvalidateError> for Error {
    fn from(e: InvalidateError) -> Error {
        e.error
    }
}

/// `IOMMU_HWPT_INVALIDATE` on object `id` of `iommufd`: a nested HWPT or a vIOMMU (the vIOMMU module
/// calls this with its own id). Validates `entries`, then sends them in calls of at most the kernel's
/// per-call limit, stopping at the first failure; see [`Hwpt::invalidate`] for the result.
pub(crate) fn invalidate_object(
    iommufd: &Iommufd,
    id: u32,
    entries: &InvalidateEntries<'_>,
) -> Result<u32, InvalidateError> {
    let raw = entries.raw().map_err(|error| InvalidateError { handled: 0, error })?;
    if raw.count == 0 {
        // The probe: one call with no entries; the kernel ignores `entry_len` and `data_uptr`.
        // SAFETY: a null pointer with no entries.
        unsafe { invalidate_call(iommufd, id, raw.data_type, 0, std::ptr::null(), 0) }
            .map_err(|(handled, error)| InvalidateError { handled, error })?;
        return Ok(0);
    }
    let mut handled: u32 = 0;
    let mut start = 0usize;
    while start < raw.count {
        let n = (raw.count - start).min(MAX_ENTRIES_PER_CALL);
        // Entries `start..start + n` of the `count` that make up the slice `entries` borrows.
        let ptr = raw.ptr.wrapping_add(start * raw.entry_len as usize);
        // `n` <= MAX_ENTRIES_PER_CALL fits u32; `handled` <= count, which `raw()` bounded by u32::MAX.
        // SAFETY: `ptr` addresses `n * entry_len` bytes inside the slice `entries` borrows (its
        // `count * entry_len` bytes, checked by `raw()`), alive and shared-borrowed for the call.
        let done = unsafe { invalidate_call(iommufd, id, raw.data_type, raw.entry_len, ptr, n as u32) }
            .map_err(|(done, error)| InvalidateError { handled: handled + done, error })?;
        handled += done;
        if done != n as u32 {
            return Err(InvalidateError {
                handled,
                error: Error::Protocol {
                    op: INVALIDATE,
                    detail: format!("the kernel reported success after handling {done} of {n} entries"),
                },
            });
        }
        start += n;
    }
    Ok(handled)
}

/// One `IOMMU_HWPT_INVALIDATE` call with `count` entries at `ptr`; returns the kernel's handled count,
/// with the error on failure.
///
/// # Safety
///
/// `ptr` must be null with `count` 0, or point at `count * entry_len` readable bytes that stay alive
/// and unmodified for the call.
unsafe fn invalidate_call(
    iommufd: &Iommufd,
    id: u32,
    data_type: u32,
    entry_len: u32,
    ptr: *const u8,
    count: u32,
) -> std::result::Result<u32, (u32, Error)> {
    let mut arg = sys::iommu_hwpt_invalidate::new();
    arg.hwpt_id = id;
    arg.data_type = data_type;
    arg.entry_len = entry_len;
    arg.entry_num = count;
    arg.data_uptr = ptr as u64;
    // SAFETY: IOMMU_HWPT_INVALIDATE takes `iommu_hwpt_invalidate`, sized by `new()`. Its one user
    // pointer, `data_uptr`, is null with `entry_num` 0 (the kernel then ignores it) or addresses
    // `entry_num * entry_len` readable bytes alive for the call (this function's contract); the kernel
    // only reads them, and writes `entry_num` back into `arg`.
    let r = unsafe { ioctl::call(iommufd.as_fd(), &ioctl::HWPT_INVALIDATE, &mut arg) };
    match r {
        Ok(_) => Ok(arg.entry_num.min(count)),
        // ENOTTY: the kernel never ran the command, so `entry_num` still holds our input.
        Err(e @ Error::Unsupported { .. }) => Err((0, e)),
        Err(e) => Err((arg.entry_num.min(count), e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::tests::assert_invalid;

    #[test]
    fn vtd_s1_encodes_the_kernel_layout() {
        let v = VtdS1::new(0x1234_5000, VtdPagingLevels::Five)
            .unwrap()
            .with_flags(VtdS1Flags::SRE | VtdS1Flags::WPE);
        let s = v.to_sys();
        assert_eq!(s.flags, (sys::IOMMU_VTD_S1_SRE | sys::IOMMU_VTD_S1_WPE) as u64);
        assert_eq!(s.pgtbl_addr, 0x1234_5000);
        assert_eq!(s.addr_width, 57);
        assert_eq!(VtdPagingLevels::Four.addr_width(), 48);
        let data = NestedData::VtdS1(v);
        assert_eq!(data.data_type(), sys::IOMMU_HWPT_DATA_VTD_S1);
        let enc = data.encode().unwrap();
        let d = enc.alloc_data(data.data_type());
        assert_eq!(d.len, 24);
        assert_invalid(VtdS1::new(0x1234_5008, VtdPagingLevels::Four), "IOMMU_HWPT_ALLOC", "4 KiB aligned");
    }

    #[test]
    fn smmuv3_ste_fields() {
        assert_eq!(ArmSmmuv3Ste::abort().words(), [1, 0]);
        assert_eq!(ArmSmmuv3Ste::bypass().words(), [1 | 4 << 1, 0]);
        let ste = ArmSmmuv3Ste::s1_translate(0x8_0000_0040, 1, 10).unwrap();
        let w0 = ste.words()[0];
        assert_eq!(w0 & 1, 1, "V");
        assert_eq!((w0 >> 1) & 7, 5, "Config = S1 translate");
        assert_eq!((w0 >> 4) & 3, 1, "S1Fmt");
        assert_eq!(w0 & STE0_S1CTXPTR_MASK, 0x8_0000_0040, "S1ContextPtr");
        assert_eq!(w0 >> 59, 10, "S1CDMax");
        assert_eq!(ste.to_sys().ste[0], w0.to_le());
        assert_invalid(ArmSmmuv3Ste::s1_translate(0x1001, 0, 0), "IOMMU_HWPT_ALLOC", "64-byte aligned");
        assert_invalid(ArmSmmuv3Ste::s1_translate(1 << 52, 0, 0), "IOMMU_HWPT_ALLOC", "below 2^52");
        assert_invalid(ArmSmmuv3Ste::s1_translate(0, 3, 0), "IOMMU_HWPT_ALLOC", "reserved");
        assert_invalid(ArmSmmuv3Ste::s1_translate(0, 0, 32), "IOMMU_HWPT_ALLOC", "5-bit");
        let data = NestedData::ArmSmmuv3(ste);
        assert_eq!(data.encode().unwrap().alloc_data(data.data_type()).len, 16);
        let amd = NestedData::AmdGuest(AmdGuestDte::from_words([1, 2, 3, 4]));
        assert_eq!(amd.data_type(), sys::IOMMU_HWPT_DATA_AMD_GUEST);
        assert_eq!(amd.encode().unwrap().alloc_data(amd.data_type()).len, 32);
    }

    #[test]
    fn raw_nested_data_is_validated() {
        let none = NestedData::Raw { data_type: 0, bytes: vec![1, 2, 3, 4] };
        assert_invalid(none.encode().map(drop), "IOMMU_HWPT_ALLOC", "IOMMU_HWPT_DATA_NONE");
        let empty = NestedData::Raw { data_type: 0xdead, bytes: vec![] };
        assert_invalid(empty.encode().map(drop), "IOMMU_HWPT_ALLOC", "0 bytes");
        let ok = NestedData::Raw { data_type: 0xdead, bytes: vec![0; 8] };
        let enc = ok.encode().unwrap();
        let d = enc.alloc_data(ok.data_type());
        assert_eq!((d.data_type, d.len), (0xdead, 8));
        let NestedData::Raw { bytes, .. } = &ok else { unreachable!() };
        assert_eq!(d.uptr, bytes.as_ptr() as u64, "points at the caller's bytes, no copy");
    }

    #[test]
    fn vtd_invalidation_entries() {
        let e = VtdS1Invalidate::range(0x20_0000, 16).unwrap().leaf_only();
        assert_eq!((e.addr(), e.npages(), e.is_leaf_only()), (0x20_0000, 16, true));
        assert_eq!(VtdS1Invalidate::all().npages(), u64::MAX);
        assert_eq!(std::mem::size_of::<VtdS1Invalidate>(), 24);
        assert_invalid(VtdS1Invalidate::range(0x20_0800, 1), INVALIDATE, "4 KiB aligned");
        assert_invalid(VtdS1Invalidate::range(0, 0), INVALIDATE, "empty or wraps");
        assert_invalid(VtdS1Invalidate::range(u64::MAX - 4095, 2), INVALIDATE, "empty or wraps");
        let list = [e, VtdS1Invalidate::all()];
        let entries = InvalidateEntries::VtdS1(&list);
        let raw = entries.raw().unwrap();
        assert_eq!(
            (raw.data_type, raw.entry_len, raw.count),
            (sys::IOMMU_HWPT_INVALIDATE_DATA_VTD_S1, 24, 2)
        );
        assert_eq!(raw.ptr, list.as_ptr().cast(), "the slice itself is passed");
    }

    #[test]
    fn smmuv3_commands_are_little_endian() {
        let c = ArmSmmuv3Invalidate::from_words([0x12, 0x3400]);
        assert_eq!(c.words(), [0x12, 0x3400]);
        assert_eq!(c.0.cmd[0], 0x12u64.to_le());
        assert_eq!(std::mem::size_of::<ArmSmmuv3Invalidate>(), 16);
        let list = [c];
        let e = InvalidateEntries::ArmSmmuv3(&list);
        assert_eq!((e.data_type(), e.len()), (sys::IOMMU_VIOMMU_INVALIDATE_DATA_ARM_SMMUV3, 1));
    }

    #[test]
    fn raw_invalidation_entries_are_validated() {
        let bytes = [0u8; 24];
        let raw = |entry_len, bytes| InvalidateEntries::Raw { data_type: 7, entry_len, bytes };
        assert_eq!(raw(8, &bytes[..]).len(), 3);
        assert_eq!(raw(8, &bytes[..]).raw().unwrap().count, 3);
        assert_invalid(raw(0, &bytes[..]).raw().map(drop), INVALIDATE, "between 1 and the page size");
        let huge = crate::dma::page_size() as u32 + 1;
        assert_invalid(raw(huge, &bytes[..]).raw().map(drop), INVALIDATE, "between 1 and the page size");
        assert_invalid(raw(5, &bytes[..]).raw().map(drop), INVALIDATE, "whole number");
        // Empty lists are the kernel's probe: allowed, with a null pointer and no entry length.
        let probe = InvalidateEntries::probe(7).raw().unwrap();
        assert_eq!((probe.count, probe.entry_len, probe.ptr), (0, 0, std::ptr::null()));
        assert!(InvalidateEntries::probe(7).is_empty());
        assert_eq!(raw(0, &[]).raw().unwrap().count, 0);
    }

    use crate::tests::fake;

    struct FakeDevice(Iommufd);
    impl IommuDevice for FakeDevice {
        fn dev_id(&self) -> u32 {
            3
        }
        fn iommufd(&self) -> &Iommufd {
            &self.0
        }
    }

    fn selftest_data() -> NestedData {
        NestedData::Raw { data_type: 0xdead, bytes: vec![0; 8] }
    }

    #[test]
    fn nested_alloc_is_validated_before_the_ioctl() {
        let (fd, ioas) = fake();
        let dev = FakeDevice(fd.clone());
        let data = selftest_data();
        let plain = Hwpt::fake(&ioas, 8, HwptKind::Paging, HwptFlags::empty());
        assert_invalid(
            Hwpt::alloc_nested(&dev, &plain, &data, HwptFlags::empty()),
            "IOMMU_HWPT_ALLOC",
            "NEST_PARENT",
        );
        let nested = Hwpt::fake(&ioas, 9, HwptKind::Nested, HwptFlags::empty());
        assert_invalid(
            Hwpt::alloc_nested(&dev, &nested, &data, HwptFlags::empty()),
            "IOMMU_HWPT_ALLOC",
            "is nested",
        );
        let parent = Hwpt::fake(&ioas, 10, HwptKind::Paging, HwptFlags::NEST_PARENT);
        for bad in [HwptFlags::NEST_PARENT, HwptFlags::DIRTY_TRACKING] {
            assert_invalid(
                Hwpt::alloc_nested(&dev, &parent, &data, bad),
                "IOMMU_HWPT_ALLOC",
                "stage-2 parent",
            );
        }
        let fault_bit = HwptFlags::from_bits_retain(sys::IOMMU_HWPT_FAULT_ID_VALID);
        assert_invalid(
            Hwpt::alloc_nested(&dev, &parent, &data, fault_bit),
            "IOMMU_HWPT_ALLOC",
            "fault queue",
        );
        assert_invalid(Hwpt::alloc(&dev, &ioas, fault_bit), "IOMMU_HWPT_ALLOC", "fault queue");
        let raw_none = NestedData::Raw { data_type: 0, bytes: vec![0; 4] };
        assert_invalid(
            Hwpt::alloc_nested(&dev, &parent, &raw_none, HwptFlags::empty()),
            "IOMMU_HWPT_ALLOC",
            "NONE",
        );
        // A parent of another iommufd.
        let (other_fd, other_ioas) = fake();
        let foreign = Hwpt::fake(&other_ioas, 11, HwptKind::Paging, HwptFlags::NEST_PARENT);
        assert!(matches!(
            Hwpt::alloc_nested(&dev, &foreign, &data, HwptFlags::empty()),
            Err(Error::ForeignObject { .. })
        ));
        drop(other_fd);
        // A valid request reaches the (fake) kernel: ENOTTY.
        let e = Hwpt::alloc_nested(&dev, &parent, &data, HwptFlags::empty()).unwrap_err();
        assert!(matches!(e, Error::Unsupported { op: "IOMMU_HWPT_ALLOC", .. }), "{e:?}");
        // A newer flag the (fake) kernel's probe lacks is refused before the ioctl, with the errno an
        // older kernel gives it.
        let e = Hwpt::alloc_nested(&dev, &parent, &data, HwptFlags::PASID).unwrap_err();
        assert!(
            matches!(
                e,
                Error::Unsupported {
                    op: "IOMMU_HWPT_ALLOC (IOMMU_HWPT_ALLOC_PASID)",
                    since: "6.15",
                    errno: crate::Errno::OPNOTSUPP
                }
            ),
            "{e:?}"
        );
    }

    #[test]
    fn invalidate_is_validated_before_the_ioctl() {
        let (_fd, ioas) = fake();
        let paging = Hwpt::fake(&ioas, 8, HwptKind::Paging, HwptFlags::NEST_PARENT);
        let e = paging.invalidate(&InvalidateEntries::probe(1)).unwrap_err();
        assert_eq!(e.handled, 0);
        assert_invalid::<()>(Err(e.error), INVALIDATE, "paging table");
        let nested = Hwpt::fake(&ioas, 9, HwptKind::Nested, HwptFlags::empty());
        let bytes = [0u8; 12];
        let e = nested
            .invalidate(&InvalidateEntries::Raw { data_type: 1, entry_len: 8, bytes: &bytes })
            .unwrap_err();
        assert_eq!(e.handled, 0);
        assert_invalid::<()>(Err(e.error), INVALIDATE, "whole number");
        // Valid lists reach the (fake) kernel; ENOTTY means the kernel handled none of them, even though
        // the argument still holds the input count.
        let list = [VtdS1Invalidate::all(); 3];
        let e = nested.invalidate(&InvalidateEntries::VtdS1(&list)).unwrap_err();
        assert_eq!(e.handled, 0);
        assert!(matches!(e.error, Error::Unsupported { op: "IOMMU_HWPT_INVALIDATE", since: "6.8", .. }));
        let e = nested.invalidate(&InvalidateEntries::probe(1)).unwrap_err();
        assert!(matches!(e.error, Error::Unsupported { .. }));
    }

    #[test]
    fn invalidate_error_converts_and_displays_once() {
        let e = InvalidateError {
            handled: 2,
            error: Error::Ioctl { op: INVALIDATE, errno: crate::Errno::INVAL, hint: None },
        };
        assert_eq!(
            e.to_string(),
            "IOMMU_HWPT_INVALIDATE failed: Invalid argument (os error 22) (after the kernel handled 2 entries)"
        );
        assert!(std::error::Error::source(&e).is_none(), "the cause is printed, not also chained");
        let back: Error = e.into();
        assert_eq!(back.errno(), Some(crate::Errno::INVAL));
    }
}
