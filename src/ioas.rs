//! [`Ioas`]: an I/O address space, and the [`Mapping`] guards that own its IOVA ranges.

use std::collections::BTreeMap;
use std::os::fd::{AsFd, AsRawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use iommufd_sys as sys;

use crate::dma::{self, DmaBuffer, FileMemory, Memory, Region, UserMemory, page_size};
use crate::error::{Error, Result};
use crate::ioctl::{self, Sized32};
use crate::iommufd::Iommufd;
use crate::object::Object;

bitflags::bitflags! {
    /// What a device may do through a mapping.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
    pub struct Access: u32 {
        /// The device may read the memory (`IOMMU_IOAS_MAP_READABLE`).
        const READ = sys::IOMMU_IOAS_MAP_READABLE;
        /// The device may write the memory (`IOMMU_IOAS_MAP_WRITEABLE`).
        const WRITE = sys::IOMMU_IOAS_MAP_WRITEABLE;
        /// Both.
        const READ_WRITE = Self::READ.bits() | Self::WRITE.bits();
    }
}

/// Where a mapping goes in the IOVA space.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Iova {
    /// Exactly this IOVA (`IOMMU_IOAS_MAP_FIXED_IOVA`); it must be free and aligned.
    Fixed(u64),
    /// Wherever the kernel finds room (it picks an address aligned to the mapping's size class).
    Auto,
}

/// An inclusive IOVA range `[start, last]`, as the kernel reports and accepts them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct IovaRange {
    /// First IOVA.
    pub start: u64,
    /// Last IOVA (inclusive).
    pub last: u64,
}

impl IovaRange {
    /// The range `[start, start + len - 1]`; `None` if `len` is zero or the range overflows.
    pub fn from_len(start: u64, len: u64) -> Option<IovaRange> {
        let last = start.checked_add(len.checked_sub(1)?)?;
        Some(IovaRange { start, last })
    }

    /// Number of IOVAs in the range (saturating at `u64::MAX` for the full space).
    pub fn len(&self) -> u64 {
        (self.last - self.start).saturating_add(1)
    }

    /// Always false: an inclusive range holds at least one IOVA.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// True if the ranges share an IOVA.
    pub fn overlaps(&self, other: &IovaRange) -> bool {
        self.start <= other.last && other.start <= self.last
    }

    /// True if `other` lies inside `self`.
    pub fn contains(&self, other: &IovaRange) -> bool {
        self.start <= other.start && other.last <= self.last
    }
}

/// The usable IOVA space of an IOAS (`IOMMU_IOAS_IOVA_RANGES`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IovaRanges {
    /// Ranges that may be mapped, sorted. Narrowed by attached devices' reserved regions.
    pub ranges: Vec<IovaRange>,
    /// Fixed IOVAs and lengths must be multiples of this (the smallest page of any attached IOMMU).
    pub alignment: u64,
}

/// A physically contiguous range behind an IOVA, from [`Ioas::noiommu_get_pa`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PhysRange {
    /// The physical address the queried IOVA maps to.
    pub phys: u64,
    /// Bytes from `phys` that are physically contiguous and mapped, at most the length asked for.
    pub len: u64,
}

pub(crate) struct IoasInner {
    pub(crate) obj: Object,
    /// IOVA ranges owned by live `Mapping` guards: start -> last.
    owned: Mutex<BTreeMap<u64, u64>>,
    /// Alignment last reported by the kernel (0 until `iova_ranges` is called).
    alignment: AtomicU64,
}

impl IoasInner {
    pub(crate) fn id(&self) -> u32 {
        self.obj.id()
    }

    pub(crate) fn iommufd(&self) -> &Iommufd {
        self.obj.iommufd()
    }

    fn owned(&self) -> MutexGuard<'_, BTreeMap<u64, u64>> {
        self.owned.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn owned_overlap(&self, range: IovaRange) -> Option<IovaRange> {
        let owned = self.owned();
        // The only candidate below `range.last` that can overlap is the one starting last at or before it.
        owned
            .range(..=range.last)
            .next_back()
            .map(|(&start, &last)| IovaRange { start, last })
            .filter(|r| r.overlaps(&range))
    }

    fn unmap_ioctl(&self, iova: u64, length: u64) -> Result<u64> {
        let mut arg = sys::iommu_ioas_unmap::new();
        arg.ioas_id = self.id();
        arg.iova = iova;
        arg.length = length;
        // SAFETY: `iommu_ioas_unmap` is IOMMU_IOAS_UNMAP's argument, sized by `new()`; no pointers.
        // The kernel writes the unmapped length back through the exclusive borrow.
        unsafe { ioctl::call(self.iommufd().as_fd(), &ioctl::IOAS_UNMAP, &mut arg) }?;
        Ok(arg.length)
    }
}

/// An I/O address space: the IOVA -> memory translation that devices attached to it (directly or
/// through a [`Hwpt`](crate::Hwpt)) use for DMA.
///
/// Cloning shares the one kernel object. The object is destroyed when the last clone, mapping, page
/// table and attachment referring to it is gone (each holds it), so the kernel never sees a destroy of
/// a busy IOAS from this crate; [`Ioas::destroy`] does it explicitly and reports failure.
#[doc(alias = "ioasid")]
#[derive(Clone)]
pub struct Ioas {
    pub(crate) inner: Arc<IoasInner>,
}

impl std::fmt::Debug for Ioas {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ioas").field("id", &self.id()).finish()
    }
}

fn validate_range(op: &'static str, iova: u64, len: u64, alignment: u64) -> Result<IovaRange> {
    if len == 0 {
        return Err(Error::invalid(op, "length is zero"));
    }
    let range = IovaRange::from_len(iova, len)
        .ok_or_else(|| Error::invalid(op, format!("range {iova:#x}+{len:#x} overflows the IOVA space")))?;
    if iova % alignment != 0 || len % alignment != 0 {
        return Err(Error::invalid(
            op,
            format!(
                "IOVA {iova:#x} and length {len:#x} must be multiples of the IOVA alignment {alignment:#x}"
            ),
        ));
    }
    Ok(range)
}

impl Ioas {
    pub(crate) fn alloc(iommufd: &Iommufd) -> Result<Ioas> {
        let mut arg = sys::iommu_ioas_alloc::new();
        // SAFETY: `iommu_ioas_alloc` is IOMMU_IOAS_ALLOC's argument, sized by `new()`; no pointers.
        unsafe { ioctl::call(iommufd.as_fd(), &ioctl::IOAS_ALLOC, &mut arg) }?;
        Ok(Ioas {
            inner: Arc::new(IoasInner {
                obj: Object::new(iommufd, arg.out_ioas_id, "IOAS"),
                owned: Mutex::new(BTreeMap::new()),
                alignment: AtomicU64::new(0),
            }),
        })
    }

    /// An IOAS handle for an id the kernel never allocated, for validation tests.
    #[cfg(test)]
    pub(crate) fn fake(iommufd: &Iommufd, id: u32) -> Ioas {
        Ioas {
            inner: Arc::new(IoasInner {
                obj: Object::new(iommufd, id, "IOAS"),
                owned: Mutex::new(BTreeMap::new()),
                alignment: AtomicU64::new(0),
            }),
        }
    }

    /// The kernel's id for this IOAS (what `VFIO_DEVICE_ATTACH_IOMMUFD_PT` takes as `pt_id`).
    pub fn id(&self) -> u32 {
        self.inner.id()
    }

    /// The iommufd this IOAS belongs to.
    pub fn iommufd(&self) -> &Iommufd {
        self.inner.iommufd()
    }

    /// The alignment fixed IOVAs must have: the page size, or the larger alignment the kernel last
    /// reported through [`iova_ranges`](Self::iova_ranges).
    fn alignment(&self) -> u64 {
        self.inner.alignment.load(Ordering::Relaxed).max(page_size() as u64)
    }

    /// The IOVA ranges that may currently be mapped and the required alignment.
    pub fn iova_ranges(&self) -> Result<IovaRanges> {
        let mut ranges: Vec<sys::iommu_iova_range> = Vec::new();
        loop {
            let mut arg = sys::iommu_ioas_iova_ranges::new();
            arg.ioas_id = self.id();
            arg.num_iovas = ranges.len() as u32;
            arg.allowed_iovas = ranges.as_mut_ptr() as u64;
            // SAFETY: IOMMU_IOAS_IOVA_RANGES takes `iommu_ioas_iova_ranges`, sized by `new()`;
            // `allowed_iovas` points at `num_iovas` writable `iommu_iova_range`s owned by `ranges`,
            // which outlives the call. The kernel writes at most `num_iovas` entries.
            let r = unsafe { ioctl::call(self.iommufd().as_fd(), &ioctl::IOAS_IOVA_RANGES, &mut arg) };
            match r {
                Ok(_) => {
                    // The kernel reports the true count; it wrote min(count, capacity) entries.
                    if (arg.num_iovas as usize) <= ranges.len() {
                        ranges.truncate(arg.num_iovas as usize);
                        self.inner.alignment.store(arg.out_iova_alignment, Ordering::Relaxed);
                        return Ok(IovaRanges {
                            ranges: ranges
                                .iter()
                                .map(|r| IovaRange { start: r.start, last: r.last })
                                .collect(),
                            alignment: arg.out_iova_alignment,
                        });
                    }
                    ranges.resize(arg.num_iovas as usize, Default::default());
                }
                Err(e) if e.errno() == Some(rustix::io::Errno::MSGSIZE) => {
                    ranges.resize(arg.num_iovas as usize, Default::default());
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Restricts automatic IOVA allocation to `ranges` (`IOMMU_IOAS_ALLOW_IOVAS`); an empty slice
    /// lifts the restriction. Fixed mappings outside the allowed ranges still work.
    pub fn allow_iovas(&self, ranges: &[IovaRange]) -> Result<()> {
        const OP: &str = "IOMMU_IOAS_ALLOW_IOVAS";
        for r in ranges {
            if r.start > r.last {
                return Err(Error::invalid(OP, format!("range start {:#x} > last {:#x}", r.start, r.last)));
            }
        }
        let mut raw: Vec<sys::iommu_iova_range> =
            ranges.iter().map(|r| sys::iommu_iova_range { start: r.start, last: r.last }).collect();
        let mut arg = sys::iommu_ioas_allow_iovas::new();
        arg.ioas_id = self.id();
        arg.num_iovas = u32::try_from(raw.len()).map_err(|_| Error::invalid(OP, "too many ranges"))?;
        arg.allowed_iovas = raw.as_mut_ptr() as u64;
        // SAFETY: IOMMU_IOAS_ALLOW_IOVAS takes `iommu_ioas_allow_iovas`, sized by `new()`;
        // `allowed_iovas` points at `num_iovas` readable entries owned by `raw`, alive for the call.
        unsafe { ioctl::call(self.iommufd().as_fd(), &ioctl::IOAS_ALLOW_IOVAS, &mut arg) }.map(drop)
    }

    fn check_free(&self, op: &'static str, at: Iova, len: u64) -> Result<(u32, u64)> {
        match at {
            Iova::Fixed(iova) => {
                let range = validate_range(op, iova, len, self.alignment())?;
                if let Some(r) = self.inner.owned_overlap(range) {
                    return Err(Error::invalid(
                        op,
                        format!(
                            "IOVA range {iova:#x}+{len:#x} overlaps a live mapping at {:#x}..={:#x}",
                            r.start, r.last
                        ),
                    ));
                }
                Ok((sys::IOMMU_IOAS_MAP_FIXED_IOVA, iova))
            }
            Iova::Auto => {
                validate_range(op, 0, len, page_size() as u64)?;
                Ok((0, 0))
            }
        }
    }

    fn check_access(op: &'static str, access: Access) -> Result<()> {
        if access.is_empty() {
            return Err(Error::invalid(op, "access is empty: a mapping must allow READ, WRITE or both"));
        }
        Ok(())
    }

    pub(crate) fn guard<M: Memory>(&self, iova: u64, len: u64, access: Access, held: M::Held) -> Mapping<M> {
        let range = IovaRange::from_len(iova, len).expect("validated before the ioctl");
        self.inner.owned().insert(range.start, range.last);
        Mapping { ioas: self.inner.clone(), iova, len, access, held: Some(held) }
    }

    /// Maps `buffer` for DMA, moving it into the returned guard.
    ///
    /// The buffer is released only by a successful [`Mapping::unmap`] (or the guard's drop), after the
    /// kernel confirms the IOVA range is gone. If the map fails, the buffer is freed: nothing was mapped.
    pub fn map(&self, buffer: DmaBuffer, at: Iova, access: Access) -> Result<Mapping<DmaBuffer>> {
        const OP: &str = "IOMMU_IOAS_MAP";
        Self::check_access(OP, access)?;
        let len = buffer.len() as u64;
        let (flags, iova) = self.check_free(OP, at, len)?;
        let region = dma::dma_region(buffer);
        let iova = self.map_va(region.addr(), len, flags | access.bits(), iova)?;
        Ok(self.guard(iova, len, access, region))
    }

    fn map_va(&self, va: u64, len: u64, flags: u32, iova: u64) -> Result<u64> {
        let mut arg = sys::iommu_ioas_map::new();
        arg.ioas_id = self.id();
        arg.flags = flags;
        arg.user_va = va;
        arg.length = len;
        arg.iova = iova;
        // SAFETY: IOMMU_IOAS_MAP takes `iommu_ioas_map`, sized by `new()`. The kernel pins the pages of
        // `user_va..+length` in this process; it dereferences no pointer in the struct itself. That the
        // memory may then be accessed by a device is covered by the callers: `map` moved an owned
        // buffer into the guard, `map_user` passes on its caller's `# Safety` contract.
        unsafe { ioctl::call(self.iommufd().as_fd(), &ioctl::IOAS_MAP, &mut arg) }?;
        Ok(arg.iova)
    }

    /// Maps `len` bytes of caller-managed memory at `va` (`IOMMU_IOAS_MAP`): the escape hatch for
    /// memory this crate does not own, such as a VMM's guest RAM.
    ///
    /// `va` and `len` must be page-aligned. The returned guard unmaps on drop but frees nothing.
    ///
    /// # Safety
    ///
    /// From this call until every IOVA range that refers to the memory is unmapped (this mapping's
    /// guard is unmapped or dropped, and so is every [`copy`](Self::copy) of it):
    ///
    /// - `va..va+len` must stay a valid mapping of this process that is not unmapped, remapped or
    ///   returned to an allocator that could reuse it, because devices reachable through this IOAS may
    ///   read it (with [`Access::READ`]) and write it (with [`Access::WRITE`]) at any time;
    /// - with [`Access::WRITE`], no Rust reference (`&` or `&mut`) to any byte of it may exist or be
    ///   created, since device writes would break the reference's aliasing guarantees: access it only
    ///   through raw pointers (volatile), or through memory that is shared with a guest/another process;
    /// - if the guard is leaked (`mem::forget`), the memory must be leaked too.
    pub unsafe fn map_user(
        &self,
        va: *mut u8,
        len: usize,
        at: Iova,
        access: Access,
    ) -> Result<Mapping<UserMemory>> {
        const OP: &str = "IOMMU_IOAS_MAP";
        Self::check_access(OP, access)?;
        let page = page_size();
        if (va as usize) % page != 0 {
            return Err(Error::invalid(OP, format!("user address {va:p} is not page-aligned")));
        }
        if (va as usize).checked_add(len).is_none() {
            return Err(Error::invalid(OP, "user address range overflows"));
        }
        let len = len as u64;
        let (flags, iova) = self.check_free(OP, at, len)?;
        let iova = self.map_va(va as u64, len, flags | access.bits(), iova)?;
        Ok(self.guard(iova, len, access, ()))
    }

    /// Maps `len` bytes of `file` starting at `offset` (`IOMMU_IOAS_MAP_FILE`, Linux 6.13). The kernel
    /// pins the file's pages itself, so this is safe: no memory of this process is exposed. Use a memfd
    /// (or hugetlbfs/guest_memfd file) shared with whoever produces the data.
    ///
    /// While no device or access is attached to the IOAS, the kernel records the mapping without
    /// pinning; a file it cannot pin (a pipe, a range past the end of the file) is then refused only
    /// when something attaches. With a domain attached it is refused here, with `EINVAL`.
    pub fn map_file(
        &self,
        file: impl AsFd,
        offset: u64,
        len: u64,
        at: Iova,
        access: Access,
    ) -> Result<Mapping<FileMemory>> {
        const OP: &str = "IOMMU_IOAS_MAP_FILE";
        Self::check_access(OP, access)?;
        if offset % page_size() as u64 != 0 {
            return Err(Error::invalid(OP, format!("file offset {offset:#x} is not page-aligned")));
        }
        if offset.checked_add(len).is_none() {
            return Err(Error::invalid(OP, "file range overflows"));
        }
        let (flags, iova) = self.check_free(OP, at, len)?;
        let mut arg = sys::iommu_ioas_map_file::new();
        arg.ioas_id = self.id();
        arg.flags = flags | access.bits();
        arg.fd = file.as_fd().as_raw_fd();
        arg.start = offset;
        arg.length = len;
        arg.iova = iova;
        // SAFETY: IOMMU_IOAS_MAP_FILE takes `iommu_ioas_map_file`, sized by `new()`, with no pointers;
        // `fd` is borrowed open for the call. The kernel pins the file's pages and holds them itself.
        unsafe { ioctl::call(self.iommufd().as_fd(), &ioctl::IOAS_MAP_FILE, &mut arg) }?;
        Ok(self.guard(arg.iova, len, access, ()))
    }

    /// Maps the memory behind `src` (a mapping in any IOAS of the same iommufd) into this IOAS too
    /// (`IOMMU_IOAS_COPY`), without pinning the pages again. The new guard shares `src`'s memory: a
    /// [`DmaBuffer`] is returned to the caller only when the last of them is unmapped.
    pub fn copy<M: Memory>(&self, src: &Mapping<M>, at: Iova, access: Access) -> Result<Mapping<M>>
    where
        M::Held: Clone,
    {
        const OP: &str = "IOMMU_IOAS_COPY";
        self.iommufd().check_same(src.ioas.iommufd(), OP)?;
        Self::check_access(OP, access)?;
        let (flags, iova) = self.check_free(OP, at, src.len)?;
        let mut arg = sys::iommu_ioas_copy::new();
        arg.flags = flags | access.bits();
        arg.dst_ioas_id = self.id();
        arg.src_ioas_id = src.ioas.id();
        arg.length = src.len;
        arg.dst_iova = iova;
        arg.src_iova = src.iova;
        // SAFETY: IOMMU_IOAS_COPY takes `iommu_ioas_copy`, sized by `new()`, with no pointers. The new
        // range shares pages the source guard keeps alive; the new guard holds them too.
        unsafe { ioctl::call(self.iommufd().as_fd(), &ioctl::IOAS_COPY, &mut arg) }?;
        let held = src.held.clone().expect("a live mapping holds its memory");
        Ok(self.guard(arg.dst_iova, src.len, access, held))
    }

    /// Unmaps every mapping fully inside `[iova, iova+len)` that no [`Mapping`] guard owns
    /// (`IOMMU_IOAS_UNMAP`); returns the number of bytes the kernel unmapped.
    ///
    /// Ranges owned by guards are refused: unmap those through their guard, so their memory is
    /// released exactly when it becomes unreachable.
    pub fn unmap_range(&self, iova: u64, len: u64) -> Result<u64> {
        const OP: &str = "IOMMU_IOAS_UNMAP";
        let range = validate_range(OP, iova, len, self.alignment())?;
        if let Some(r) = self.inner.owned_overlap(range) {
            return Err(Error::invalid(
                OP,
                format!(
                    "range overlaps the live mapping {:#x}..={:#x}: unmap it through its guard",
                    r.start, r.last
                ),
            ));
        }
        self.inner.unmap_ioctl(iova, len)
    }

    /// Unmaps everything (`IOMMU_IOAS_UNMAP` of the whole space); returns the bytes unmapped. Refused
    /// while any [`Mapping`] guard of this IOAS is alive.
    pub fn unmap_all(&self) -> Result<u64> {
        const OP: &str = "IOMMU_IOAS_UNMAP";
        let live = self.inner.owned().len();
        if live != 0 {
            return Err(Error::invalid(OP, format!("{live} mapping guard(s) are alive: unmap them first")));
        }
        self.inner.unmap_ioctl(0, u64::MAX)
    }

    /// Whether this IOAS may use huge IOMMU pages (`IOMMU_OPTION_HUGE_PAGES`; default on).
    pub fn huge_pages(&self) -> Result<bool> {
        Ok(self.iommufd().get_option(sys::IOMMU_OPTION_HUGE_PAGES, self.id())? != 0)
    }

    /// Allows or forbids huge IOMMU pages for this IOAS. Turning them off makes every mapping
    /// splittable at page granularity (needed to unmap parts of a range). Only possible before any
    /// device is attached.
    pub fn set_huge_pages(&self, enabled: bool) -> Result<()> {
        self.iommufd().set_option(sys::IOMMU_OPTION_HUGE_PAGES, self.id(), enabled as u64)
    }

    /// The physical address behind `iova` and how many bytes from it, up to `max_len`, are physically
    /// contiguous (`IOMMU_IOAS_NOIOMMU_GET_PA`, Linux 7.3).
    ///
    /// This is for devices in VFIO no-IOMMU mode, which DMA to physical addresses without translation:
    /// the IOAS then only pins pages and records them in a software page table, and the program
    /// programs the device with what this returns. It works only where that table exists: the kernel
    /// needs `CONFIG_IOMMUFD_NOIOMMU` (selected by `CONFIG_VFIO_NOIOMMU`; see
    /// [`Capabilities::noiommu`](crate::Capabilities::noiommu)) and the IOVA must be mapped through a
    /// no-IOMMU device's domain. Answers: `EOPNOTSUPP` without that option, or when a real IOMMU
    /// translates the IOVA (the physical address would be meaningless to the device); `EPERM` without
    /// `CAP_SYS_RAWIO`; `ENOENT` if `iova` is not mapped; `EOVERFLOW` for an IOVA past `ULONG_MAX`.
    ///
    /// `max_len` must be non-zero (checked here).
    pub fn noiommu_get_pa(&self, iova: u64, max_len: u64) -> Result<PhysRange> {
        if max_len == 0 {
            return Err(Error::invalid("IOMMU_IOAS_NOIOMMU_GET_PA", "length is zero"));
        }
        let mut arg = sys::iommu_ioas_noiommu_get_pa::new();
        arg.ioas_id = self.id();
        arg.iova = iova;
        arg.length = max_len;
        // SAFETY: IOMMU_IOAS_NOIOMMU_GET_PA takes `iommu_ioas_noiommu_get_pa`, sized by `new()`, with no
        // pointers; the kernel writes `length` and `out_phys` back through the exclusive borrow.
        unsafe { ioctl::call(self.iommufd().as_fd(), &ioctl::IOAS_NOIOMMU_GET_PA, &mut arg) }?;
        Ok(PhysRange { phys: arg.out_phys, len: arg.length })
    }

    /// Destroys the IOAS now, reporting failure. Refused (with [`Error::InUse`], before any ioctl)
    /// while clones, mappings, page tables or attachments still refer to it.
    pub fn destroy(self) -> Result<()> {
        match Arc::try_unwrap(self.inner) {
            Ok(inner) => inner.obj.destroy(),
            Err(inner) => Err(Error::InUse { op: "IOMMU_DESTROY", users: Arc::strong_count(&inner) - 1 }),
        }
    }
}

/// An IOVA range mapped in an [`Ioas`], owning (or standing for) the memory behind it.
///
/// Dropping the guard unmaps the range and then releases the memory; if the unmap fails, the error is
/// logged and the memory is leaked (never freed while a device might reach it). [`Mapping::unmap`]
/// does the same but reports the failure. `mem::forget` leaks the memory too.
///
/// A mapping keeps its IOAS alive.
#[must_use = "dropping a Mapping unmaps it at once"]
pub struct Mapping<M: Memory = DmaBuffer> {
    ioas: Arc<IoasInner>,
    iova: u64,
    len: u64,
    access: Access,
    held: Option<M::Held>,
}

impl<M: Memory> std::fmt::Debug for Mapping<M> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mapping")
            .field("ioas", &self.ioas.id())
            .field("iova", &format_args!("{:#x}", self.iova))
            .field("len", &format_args!("{:#x}", self.len))
            .field("access", &self.access)
            .finish()
    }
}

impl<M: Memory> Mapping<M> {
    /// First IOVA of the range.
    pub fn iova(&self) -> u64 {
        self.iova
    }

    /// Length in bytes.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Always false: mappings are at least one page.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// The range as an inclusive [`IovaRange`].
    pub fn range(&self) -> IovaRange {
        IovaRange::from_len(self.iova, self.len).expect("validated at map time")
    }

    /// The device's permissions.
    pub fn access(&self) -> Access {
        self.access
    }

    /// Id of the IOAS the range lives in.
    pub fn ioas_id(&self) -> u32 {
        self.ioas.id()
    }

    fn do_unmap(&mut self) -> Result<()> {
        let unmapped = self.ioas.unmap_ioctl(self.iova, self.len)?;
        if unmapped != self.len {
            return Err(Error::Protocol {
                op: "IOMMU_IOAS_UNMAP",
                detail: format!("unmapped {unmapped:#x} bytes at {:#x}, expected {:#x}", self.iova, self.len),
            });
        }
        self.ioas.owned().remove(&self.iova);
        Ok(())
    }

    /// Unmaps the range, checking the length the kernel reports, and gives back the memory
    /// ([`DmaBuffer`] mappings return `Some(buffer)` unless a copy still shares it).
    ///
    /// On failure the memory stays leaked (it might still be reachable) and the range stays recorded
    /// as owned, so [`Ioas::unmap_range`] will not touch it either.
    pub fn unmap(mut self) -> Result<M::Unmapped> {
        let result = self.do_unmap();
        let held = self.held.take();
        match result {
            Ok(()) => Ok(M::release(held.expect("a live mapping holds its memory"))),
            Err(e) => {
                std::mem::forget(held);
                Err(e)
            }
        }
    }
}

impl<M: Memory> Mapping<M> {
    /// Gives up the guard and leaves the range mapped: the memory it holds is leaked (never freed,
    /// since a device may still reach it), and the range becomes an ordinary kernel mapping that
    /// [`Ioas::unmap_range`] and [`Ioas::unmap_all`] may remove. Returns the range.
    pub fn leak(mut self) -> IovaRange {
        std::mem::forget(self.held.take());
        self.ioas.owned().remove(&self.iova);
        self.range()
    }
}

impl Mapping<DmaBuffer> {
    fn region(&self) -> &Region {
        self.held.as_ref().expect("a live mapping holds its memory")
    }

    fn check(&self, op: &'static str, offset: usize, len: usize) -> Result<*mut u8> {
        let region = self.region();
        match offset.checked_add(len) {
            Some(end) if end <= region.len() => Ok((region.addr() as usize + offset) as *mut u8),
            _ => Err(Error::invalid(
                op,
                format!("{offset:#x}+{len:#x} is outside the {:#x}-byte buffer", region.len()),
            )),
        }
    }

    /// Copies `dst.len()` bytes at `offset` out of the mapped buffer (volatile reads: the device may be
    /// writing them).
    pub fn read_at(&self, offset: usize, dst: &mut [u8]) -> Result<()> {
        let src = self.check("Mapping::read_at", offset, dst.len())?;
        // SAFETY: `src..src+dst.len()` lies inside the region this guard keeps mapped (checked above).
        unsafe { dma::copy_from_device(src, dst) };
        Ok(())
    }

    /// Copies `src` into the mapped buffer at `offset` (volatile writes: the device may be reading).
    pub fn write_at(&self, offset: usize, src: &[u8]) -> Result<()> {
        let dst = self.check("Mapping::write_at", offset, src.len())?;
        // SAFETY: `dst..dst+src.len()` lies inside the region this guard keeps mapped (checked above).
        unsafe { dma::copy_to_device(src, dst) };
        Ok(())
    }

    /// Copies the whole buffer out.
    pub fn to_vec(&self) -> Vec<u8> {
        let mut v = vec![0; self.region().len()];
        self.read_at(0, &mut v).expect("the whole buffer is in range");
        v
    }
}

impl<M: Memory> Drop for Mapping<M> {
    fn drop(&mut self) {
        let Some(held) = self.held.take() else { return };
        match self.do_unmap() {
            Ok(()) => drop(M::release(held)),
            Err(e) => {
                log::error!(
                    "iommufd: unmap of IOAS {} range {:#x}+{:#x} failed on drop, leaking its memory: {e}",
                    self.ioas.id(),
                    self.iova,
                    self.len
                );
                std::mem::forget(held);
            }
        }
    }
}
