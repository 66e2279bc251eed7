//! [`Ioas`]: an I/O address space, and the [`Mapping`] guards that own its IOVA ranges.

use std::collections::BTreeMap;
use std::os::fd::{AsFd, AsRawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use iommufd_sys as sys;

use crate::dma::{self, DmaBuffer, FileMemory, Memory, Shareable, UserMemory, page_size};
use crate::error::{CloseError, Error, Result};
use crate::ioctl::{self, Sized32};
use crate::iommufd::Iommufd;
use crate::object::Object;
use crate::placement::FreeSpace;

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
///
/// Which to use:
/// - [`Fixed`](Iova::Fixed) when the address is decided elsewhere (a guest physical address, a
///   device's fixed window).
/// - [`Auto`](Iova::Auto) for a few thousand mappings: the kernel places them, honouring every
///   reserved range, but its search walks the IOAS's areas on every map, so the cost per map grows
///   with the number of mappings.
/// - [`Below`](Iova::Below) for many mappings, or for a device that can address only part of the
///   IOVA space (a 32-bit DMA mask: `Iova::Below(u32::MAX.into())`): this crate places them in
///   O(log n) from the IOAS's usable ranges, with the kernel's alignment rules, below the limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Iova {
    /// Exactly this IOVA (`IOMMU_IOAS_MAP_FIXED_IOVA`); it must be free and aligned.
    Fixed(u64),
    /// Wherever the kernel finds room (it picks an address aligned to the mapping's size class).
    Auto,
    /// Placed by this crate so that the mapping's last IOVA is at most this limit (`u64::MAX` for no
    /// limit), in a free range of the IOAS's usable ranges (those [`Ioas::iova_ranges`] reports,
    /// page 0 excluded), aligned like the kernel's automatic placement (the length rounded up to a
    /// power of two, capped at 2 MiB and by the memory's own alignment, and at least the IOAS's
    /// alignment). The usable ranges are read once and re-read when the kernel refuses a placement
    /// (after an attach added reserved ranges, for example). `ENOSPC` if nothing fits.
    Below(u64),
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

    /// Number of IOVAs in the range (saturating at `u64::MAX` for the full space); 0 for an inverted
    /// range (`start > last`), which holds no IOVA.
    pub fn len(&self) -> u64 {
        match self.last.checked_sub(self.start) {
            Some(d) => d.saturating_add(1),
            None => 0,
        }
    }

    /// True for an inverted range (`start > last`): an inclusive range otherwise holds at least one
    /// IOVA. Operations that take ranges reject inverted ones.
    pub fn is_empty(&self) -> bool {
        self.start > self.last
    }

    /// True if the ranges share an IOVA.
    pub fn overlaps(&self, other: &IovaRange) -> bool {
        !self.is_empty() && !other.is_empty() && self.start <= other.last && other.start <= self.last
    }

    /// True if `other` lies inside `self`.
    pub fn contains(&self, other: &IovaRange) -> bool {
        !self.is_empty() && !other.is_empty() && self.start <= other.start && other.last <= self.last
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

/// Who stands behind an area this crate created in an IOAS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Owner {
    /// The live [`Mapping`] guard with this id.
    Guard(u64),
    /// Nobody: the guard was [leaked](Mapping::leak); [`Ioas::unmap_range`] may remove it.
    Leaked,
}

/// The IOVA areas this crate created in one IOAS, keyed by `(start, guard id)`.
///
/// Every change to the kernel's areas made through this crate happens with this registry locked, from
/// the check of the arguments through the ioctl to the update of the registry, so it always equals the
/// kernel's view of the areas made through this crate. Entries are removed by guard identity, never by
/// start address alone.
#[derive(Debug, Default)]
pub(crate) struct Areas {
    map: BTreeMap<(u64, u64), (u64, Owner)>,
    next_id: u64,
    /// The free space for [`Iova::Below`], built on its first use and kept up to date from then on.
    free: Option<FreeSpace>,
}

impl Areas {
    /// Areas overlapping `range`, in IOVA order.
    fn overlapping(&self, range: IovaRange) -> impl Iterator<Item = (IovaRange, Owner)> + '_ {
        // Areas do not overlap each other, so only the last one starting before `range.start` can
        // reach into it from below.
        let below =
            self.map.range(..(range.start, 0)).next_back().filter(|(_, (last, _))| *last >= range.start);
        below
            .into_iter()
            .chain(self.map.range((range.start, 0)..=(range.last, u64::MAX)))
            .map(|(&(start, _), &(last, owner))| (IovaRange { start, last }, owner))
    }

    fn first_overlap(&self, range: IovaRange) -> Option<(IovaRange, Owner)> {
        self.overlapping(range).next()
    }

    /// Records a new area owned by a guard; returns the guard's id.
    fn insert_guard(&mut self, range: IovaRange) -> u64 {
        self.next_id = self.next_id.wrapping_add(1);
        let id = self.next_id;
        self.map.insert((range.start, id), (range.last, Owner::Guard(id)));
        if let Some(free) = &mut self.free {
            free.occupy(range);
        }
        id
    }

    /// Records an area no guard owns.
    fn insert_leaked(&mut self, range: IovaRange) {
        self.next_id = self.next_id.wrapping_add(1);
        self.map.insert((range.start, self.next_id), (range.last, Owner::Leaked));
        if let Some(free) = &mut self.free {
            free.occupy(range);
        }
    }

    fn remove_guard(&mut self, start: u64, id: u64) {
        if let Some((last, _)) = self.map.remove(&(start, id)) {
            if let Some(free) = &mut self.free {
                free.release(IovaRange { start, last });
            }
        }
    }

    fn leak_guard(&mut self, start: u64, id: u64) {
        if let Some(entry) = self.map.get_mut(&(start, id)) {
            entry.1 = Owner::Leaked;
        }
    }

    fn guards(&self) -> usize {
        self.map.values().filter(|(_, o)| matches!(o, Owner::Guard(_))).count()
    }

    /// Removes every leaked area inside `range` (after the kernel unmapped them), visiting only the
    /// entries that start inside it.
    fn remove_leaked_in(&mut self, range: IovaRange) {
        if range.is_empty() {
            return;
        }
        let doomed: Vec<((u64, u64), u64)> = self
            .map
            .range((range.start, 0)..=(range.last, u64::MAX))
            .filter(|(_, (last, owner))| *owner == Owner::Leaked && *last <= range.last)
            .map(|(&key, &(last, _))| (key, last))
            .collect();
        for (key, last) in doomed {
            self.map.remove(&key);
            if let Some(free) = &mut self.free {
                free.release(IovaRange { start: key.0, last });
            }
        }
    }
}

/// How many placements [`Iova::Below`] tries before giving up (each failed one teaches it something:
/// an unknown area, or changed usable ranges).
const PLACEMENT_TRIES: usize = 8;

pub(crate) struct IoasInner {
    pub(crate) obj: Object,
    /// The areas made through this crate; see [`Areas`].
    areas: Mutex<Areas>,
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

    /// Locks the area registry for an operation that changes the IOAS's areas; refused in a process
    /// other than the one that opened the iommufd (checked first, so a child never waits on a lock a
    /// parent thread held at `fork()`).
    fn lock(&self, op: &'static str) -> Result<MutexGuard<'_, Areas>> {
        self.iommufd().check_process(op)?;
        // A panic while the lock was held cannot leave the registry inconsistent with the kernel:
        // every update follows its ioctl without a panicking step in between.
        Ok(self.areas.lock().unwrap_or_else(|e| e.into_inner()))
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
        iommufd.check_process(ioctl::IOAS_ALLOC.name)?;
        // SAFETY: `iommu_ioas_alloc` is IOMMU_IOAS_ALLOC's argument, sized by `new()`; no pointers.
        unsafe { ioctl::call(iommufd.as_fd(), &ioctl::IOAS_ALLOC, &mut arg) }?;
        Ok(Ioas {
            inner: Arc::new(IoasInner {
                obj: Object::new(iommufd, arg.out_ioas_id, "IOAS"),
                areas: Mutex::new(Areas::default()),
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
                areas: Mutex::new(Areas::default()),
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
            if r.start >= r.last {
                return Err(Error::invalid(
                    OP,
                    format!(
                        "range {:#x}..={:#x} is empty or a single IOVA: start must be below last",
                        r.start, r.last
                    ),
                ));
            }
        }
        let mut raw: Vec<sys::iommu_iova_range> =
            ranges.iter().map(|r| sys::iommu_iova_range { start: r.start, last: r.last }).collect();
        let mut arg = sys::iommu_ioas_allow_iovas::new();
        arg.ioas_id = self.id();
        arg.num_iovas = u32::try_from(raw.len()).map_err(|_| Error::invalid(OP, "too many ranges"))?;
        arg.allowed_iovas = raw.as_mut_ptr() as u64;
        // The usable ranges change: placement by this crate must learn them again.
        let mut areas = self.inner.lock(OP)?;
        areas.free = None;
        // SAFETY: IOMMU_IOAS_ALLOW_IOVAS takes `iommu_ioas_allow_iovas`, sized by `new()`;
        // `allowed_iovas` points at `num_iovas` readable entries owned by `raw`, alive for the call.
        unsafe { ioctl::call(self.iommufd().as_fd(), &ioctl::IOAS_ALLOW_IOVAS, &mut arg) }.map(drop)
    }

    /// Checks where a new area of `len` bytes goes, against the registry held locked by the caller.
    fn check_free(&self, areas: &Areas, op: &'static str, at: Iova, len: u64) -> Result<(u32, u64)> {
        match at {
            Iova::Fixed(iova) => {
                let range = validate_range(op, iova, len, self.alignment())?;
                if let Some((r, owner)) = areas.first_overlap(range) {
                    let what = match owner {
                        Owner::Guard(_) => "a live mapping",
                        Owner::Leaked => "a leaked mapping",
                    };
                    return Err(Error::invalid(
                        op,
                        format!(
                            "IOVA range {iova:#x}+{len:#x} overlaps {what} at {:#x}..={:#x}",
                            r.start, r.last
                        ),
                    ));
                }
                Ok((sys::IOMMU_IOAS_MAP_FIXED_IOVA, iova))
            }
            Iova::Auto | Iova::Below(_) => {
                validate_range(op, 0, len, page_size() as u64)?;
                Ok((0, 0))
            }
        }
    }

    /// Places a new area of `len` bytes and maps it with `ioctl(flags, iova)`, which returns the IOVA
    /// the kernel used. `hint` is the address the memory starts at (or the file offset), whose
    /// alignment [`Iova::Below`] keeps, as the kernel's automatic placement does. On failure returns
    /// the error with the flags and IOVA of the last attempt.
    fn place_and_map(
        &self,
        areas: &mut Areas,
        op: &'static str,
        at: Iova,
        len: u64,
        hint: u64,
        mut ioctl: impl FnMut(u32, u64) -> Result<u64>,
    ) -> std::result::Result<u64, (Error, u32, u64)> {
        use rustix::io::Errno;
        let Iova::Below(limit) = at else {
            let (flags, iova) = self.check_free(areas, op, at, len).map_err(|e| (e, 0, 0))?;
            return ioctl(flags, iova).map_err(|e| (e, flags, iova));
        };
        let no_room = || {
            let hint = Some("no free IOVA range of that size below the limit (check iova_ranges())");
            (Error::Ioctl { op, errno: Errno::NOSPC, hint }, 0, 0)
        };
        validate_range(op, 0, len, page_size() as u64).map_err(|e| (e, 0, 0))?;
        let fixed = sys::IOMMU_IOAS_MAP_FIXED_IOVA;
        let mut refreshed = false;
        for _ in 0..PLACEMENT_TRIES {
            if areas.free.is_none() {
                self.build_free_space(areas).map_err(|e| (e, 0, 0))?;
                refreshed = true;
            }
            let align = self.placement_alignment(len, hint);
            let Some(iova) = areas.free.as_ref().and_then(|f| f.find(len, align, limit)) else {
                if refreshed {
                    return Err(no_room());
                }
                // The space may have grown (allow_iovas, a detach): look again once.
                areas.free = None;
                continue;
            };
            match ioctl(fixed, iova) {
                Ok(iova) => return Ok(iova),
                // An area this crate did not make (raw ioctls) is there: never offer it again.
                Err(e) if e.errno() == Some(Errno::EXIST) => {
                    if let Some(free) = &mut areas.free {
                        free.occupy(IovaRange { start: iova, last: iova + (len - 1) });
                    }
                }
                // Reserved, disallowed or newly misaligned: the usable ranges changed. Re-read them once.
                Err(e)
                    if matches!(e.errno(), Some(Errno::ADDRINUSE | Errno::INVAL | Errno::NOENT))
                        && !refreshed =>
                {
                    areas.free = None;
                }
                Err(e) => return Err((e, fixed, iova)),
            }
        }
        Err(no_room())
    }

    /// Builds the free space of [`Iova::Below`] from the kernel's usable ranges and the registry.
    fn build_free_space(&self, areas: &mut Areas) -> Result<()> {
        let page = page_size() as u64;
        let usable = self.iova_ranges()?.ranges.into_iter().filter_map(|r| {
            // Page 0 is never offered, as the kernel's own placement never does.
            let start = r.start.max(page);
            (start <= r.last).then_some(IovaRange { start, last: r.last })
        });
        let mut free = FreeSpace::new(usable);
        for (r, _) in areas.overlapping(IovaRange { start: 0, last: u64::MAX }) {
            free.occupy(r);
        }
        areas.free = Some(free);
        Ok(())
    }

    /// The alignment of a placed area: the length rounded up to a power of two, no more than the
    /// memory's own alignment (`hint`) nor 2 MiB, and at least the IOAS's alignment.
    fn placement_alignment(&self, len: u64, hint: u64) -> u64 {
        let mut align = len.checked_next_power_of_two().unwrap_or(1 << 63);
        if hint != 0 {
            align = align.min(1 << hint.trailing_zeros());
        }
        align.min(2 << 20).max(self.alignment())
    }

    fn check_access(op: &'static str, access: Access) -> Result<()> {
        if access.is_empty() {
            return Err(Error::invalid(op, "access is empty: a mapping must allow READ, WRITE or both"));
        }
        Ok(())
    }

    /// Records the area the kernel just created and wraps it in a guard. `areas` is the registry the
    /// caller has held locked since before the ioctl.
    fn guard<M: Memory>(
        &self,
        areas: &mut Areas,
        iova: u64,
        len: u64,
        access: Access,
        held: M::Held,
    ) -> Mapping<M> {
        // `len` was validated non-zero and non-overflowing before the ioctl, and the kernel placed the
        // area inside the IOVA space, so `last` cannot wrap; saturate rather than trust that blindly.
        let range = IovaRange { start: iova, last: iova.saturating_add(len - 1) };
        let id = areas.insert_guard(range);
        Mapping { ioas: self.inner.clone(), iova, len, access, id, held: Some(held) }
    }

    /// Handles a failed map, copy or map_file, with the registry still locked. `EFAULT` is the one
    /// failure after which the kernel may have kept the new area (it maps first and copies its answer
    /// out last, without undoing the map if that copy faults; it also answers `EFAULT` when pinning
    /// fails, having kept nothing). For a fixed IOVA an unmap of exactly that range tells the two
    /// apart and removes a kept area; otherwise (an automatic IOVA is unknown) the memory is leaked,
    /// never freed.
    fn failed_map<H>(&self, areas: &mut Areas, e: &Error, flags: u32, iova: u64, len: u64, held: H) {
        if e.errno() != Some(rustix::io::Errno::FAULT) {
            return; // the kernel undid everything; `held` is released
        }
        if flags & sys::IOMMU_IOAS_MAP_FIXED_IOVA != 0 {
            match self.inner.unmap_ioctl(iova, len) {
                Ok(n) if n == len => return, // it was kept, and is gone now
                Err(u) if u.errno() == Some(rustix::io::Errno::NOENT) => return, // nothing was kept
                _ => {
                    if let Some(last) = iova.checked_add(len.saturating_sub(1)) {
                        areas.insert_leaked(IovaRange { start: iova, last });
                    }
                }
            }
        }
        log::error!("iommufd: a map failed with EFAULT and may have been kept; leaking its memory");
        std::mem::forget(held);
    }

    /// A guard as a successful map would have produced, for tests of the registry without a kernel.
    #[cfg(test)]
    pub(crate) fn fake_guard<M: Memory>(
        &self,
        iova: u64,
        len: u64,
        access: Access,
        held: M::Held,
    ) -> Mapping<M> {
        let mut areas = self.inner.lock("test").expect("same process");
        self.guard(&mut areas, iova, len, access, held)
    }

    /// Maps `buffer` for DMA, moving it into the returned guard.
    ///
    /// The buffer is released only by a successful [`Mapping::unmap`] (or the guard's drop), after the
    /// kernel confirms the IOVA range is gone. If the map fails, the buffer is freed: nothing was mapped.
    pub fn map(&self, buffer: DmaBuffer, at: Iova, access: Access) -> Result<Mapping<DmaBuffer>> {
        let region = dma::dma_region(buffer);
        let (va, len) = (region.addr() as *mut u8, region.len());
        self.map_va_held::<DmaBuffer>(va, len, at, access, region)
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
    /// The guard cannot be [copied](Self::copy) by safe code: [`copy_user`](Self::copy_user) is
    /// `unsafe`, so nobody can extend the time the memory stays reachable without taking on this
    /// contract for the copy.
    ///
    /// # Safety
    ///
    /// From this call until the returned guard is unmapped or dropped (and every copy made of it with
    /// [`copy_user`](Self::copy_user), whose caller takes on this contract for the copy):
    ///
    /// - `va..va+len` must stay a valid mapping of this process that is not unmapped, remapped or
    ///   returned to an allocator that could reuse it, because devices reachable through this IOAS may
    ///   read it (with [`Access::READ`]) and write it (with [`Access::WRITE`]) at any time;
    /// - with [`Access::WRITE`], no Rust reference (`&` or `&mut`) to any byte of it may exist or be
    ///   created, since device writes would break the reference's aliasing guarantees: access it only
    ///   through raw pointers (volatile or atomic), or through memory that is shared with a guest or
    ///   another process;
    /// - if the guard is leaked (`mem::forget` or [`Mapping::leak`]), the memory must be leaked too.
    pub unsafe fn map_user(
        &self,
        va: *mut u8,
        len: usize,
        at: Iova,
        access: Access,
    ) -> Result<Mapping<UserMemory>> {
        self.map_va_held::<UserMemory>(va, len, at, access, ())
    }

    /// `IOMMU_IOAS_MAP` of `va..va+len` into a guard holding `held`. The caller answers for the
    /// memory: `held` keeps it alive, or the caller is under [`map_user`](Self::map_user)'s contract.
    pub(crate) fn map_va_held<M: Memory>(
        &self,
        va: *mut u8,
        len: usize,
        at: Iova,
        access: Access,
        held: M::Held,
    ) -> Result<Mapping<M>> {
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
        let mut areas = self.inner.lock(OP)?;
        let va = va as u64;
        self.map_guarded(&mut areas, OP, at, len, va, access, held, |flags, iova| {
            self.map_va(va, len, flags | access.bits(), iova)
        })
    }

    /// Places and maps a new area with `ioctl` ([`place_and_map`](Self::place_and_map)), with the
    /// registry `areas` locked by the caller: a guard holding `held` on success, the failed-map
    /// handling ([`failed_map`](Self::failed_map)) otherwise.
    #[allow(clippy::too_many_arguments)]
    fn map_guarded<M: Memory>(
        &self,
        areas: &mut Areas,
        op: &'static str,
        at: Iova,
        len: u64,
        hint: u64,
        access: Access,
        held: M::Held,
        ioctl: impl FnMut(u32, u64) -> Result<u64>,
    ) -> Result<Mapping<M>> {
        match self.place_and_map(areas, op, at, len, hint, ioctl) {
            Ok(iova) => Ok(self.guard(areas, iova, len, access, held)),
            Err((e, flags, iova)) => {
                self.failed_map(areas, &e, flags, iova, len, held);
                Err(e)
            }
        }
    }

    /// Maps `len` bytes of `file` starting at `offset` (`IOMMU_IOAS_MAP_FILE`, Linux 6.13). The kernel
    /// pins the file's pages itself, so this is safe: no memory of this process is exposed. Use a memfd
    /// (or hugetlbfs/guest_memfd file) shared with whoever produces the data.
    ///
    /// The kernel checks neither the fd's access mode nor its seals, so this does, before the ioctl:
    /// [`Access::WRITE`] needs an fd open for writing whose file is not write-sealed (`F_SEAL_WRITE`,
    /// `F_SEAL_FUTURE_WRITE`), and [`Access::READ`] needs an fd open for reading. A seal added after the
    /// map does not stop the device: seal before mapping. For a regular file (memfd, hugetlbfs, tmpfs)
    /// the range must lie inside the file (rounded up to whole pages).
    ///
    /// While no device or access is attached to the IOAS, the kernel records the mapping without
    /// pinning; a file it cannot pin (a pipe) is then refused only when something attaches. With a
    /// domain attached it is refused here, with `EINVAL`.
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
        let Some(end) = offset.checked_add(len) else {
            return Err(Error::invalid(OP, "file range overflows"));
        };
        let file = file.as_fd();
        dma::check_file_access(OP, file, access, end)?;
        let mut areas = self.inner.lock(OP)?;
        self.map_guarded(&mut areas, OP, at, len, offset, access, (), |flags, iova| {
            let mut arg = sys::iommu_ioas_map_file::new();
            arg.ioas_id = self.id();
            arg.flags = flags | access.bits();
            arg.fd = file.as_raw_fd();
            arg.start = offset;
            arg.length = len;
            arg.iova = iova;
            // SAFETY: IOMMU_IOAS_MAP_FILE takes `iommu_ioas_map_file`, sized by `new()`, with no
            // pointers; `fd` is borrowed open for the call. The kernel pins the file's pages and holds
            // them itself.
            unsafe { ioctl::call(self.iommufd().as_fd(), &ioctl::IOAS_MAP_FILE, &mut arg) }?;
            Ok(arg.iova)
        })
    }

    /// Maps the memory behind `src` (a mapping in any IOAS of the same iommufd, this one included) into
    /// this IOAS too (`IOMMU_IOAS_COPY`), without pinning the pages again. The new guard shares `src`'s
    /// memory: a [`DmaBuffer`] is returned to the caller only when the last of them is unmapped.
    ///
    /// Mappings of caller-managed memory ([`map_user`](Self::map_user)) are copied with the `unsafe`
    /// [`copy_user`](Self::copy_user) instead: a copy keeps that memory reachable after the original
    /// guard is gone, which only the caller of `map_user` can allow.
    pub fn copy<M: Shareable>(&self, src: &Mapping<M>, at: Iova, access: Access) -> Result<Mapping<M>>
    where
        M::Held: Clone,
    {
        self.copy_inner(src, at, access)
    }

    /// [`copy`](Self::copy) for a mapping of caller-managed memory made with
    /// [`map_user`](Self::map_user).
    ///
    /// # Safety
    ///
    /// The caller takes on [`map_user`](Self::map_user)'s contract for the memory behind `src` until
    /// the returned guard (and every copy made of it) is unmapped or dropped, which may be after
    /// `src`'s guard is gone.
    pub unsafe fn copy_user(
        &self,
        src: &Mapping<UserMemory>,
        at: Iova,
        access: Access,
    ) -> Result<Mapping<UserMemory>> {
        self.copy_inner(src, at, access)
    }

    fn copy_inner<M: Memory>(&self, src: &Mapping<M>, at: Iova, access: Access) -> Result<Mapping<M>>
    where
        M::Held: Clone,
    {
        const OP: &str = "IOMMU_IOAS_COPY";
        self.iommufd().check_same(src.ioas.iommufd(), OP)?;
        Self::check_access(OP, access)?;
        let Some(held) = src.held.clone() else {
            return Err(Error::Protocol { op: OP, detail: "the source mapping holds no memory".into() });
        };
        // Only this IOAS's areas change. The source range cannot go away meanwhile: it is owned by
        // `src`, which is borrowed for the call, and `unmap_range`/`unmap_all` refuse owned ranges.
        let mut areas = self.inner.lock(OP)?;
        self.map_guarded(&mut areas, OP, at, src.len, src.iova, access, held, |flags, iova| {
            let mut arg = sys::iommu_ioas_copy::new();
            arg.flags = flags | access.bits();
            arg.dst_ioas_id = self.id();
            arg.src_ioas_id = src.ioas.id();
            arg.length = src.len;
            arg.dst_iova = iova;
            arg.src_iova = src.iova;
            // SAFETY: IOMMU_IOAS_COPY takes `iommu_ioas_copy`, sized by `new()`, with no pointers. The
            // new range shares pages the source guard keeps alive; the new guard holds them too.
            unsafe { ioctl::call(self.iommufd().as_fd(), &ioctl::IOAS_COPY, &mut arg) }?;
            Ok(arg.dst_iova)
        })
    }

    /// Unmaps every area fully inside `[iova, iova+len)` that no [`Mapping`] guard owns
    /// (`IOMMU_IOAS_UNMAP`); returns the number of bytes unmapped.
    ///
    /// Refused before any ioctl if the range overlaps an area a guard owns (unmap those through their
    /// guard, so their memory is released exactly when it becomes unreachable), or partly overlaps a
    /// [leaked](Mapping::leak) area (the kernel unmaps whole areas only). Areas this crate made are
    /// unmapped one at a time, so that a failure part way ([`Error::PartialUnmap`]) says how many
    /// bytes were already unmapped; a last ioctl over the whole range removes areas made by other
    /// means (raw ioctls). `ENOENT` if nothing was mapped in the range.
    pub fn unmap_range(&self, iova: u64, len: u64) -> Result<u64> {
        const OP: &str = "IOMMU_IOAS_UNMAP";
        let range = validate_range(OP, iova, len, self.alignment())?;
        let mut areas = self.inner.lock(OP)?;
        let mut leaked = Vec::new();
        for (r, owner) in areas.overlapping(range) {
            match owner {
                Owner::Guard(_) => {
                    return Err(Error::invalid(
                        OP,
                        format!(
                            "range overlaps the live mapping {:#x}..={:#x}: unmap it through its guard",
                            r.start, r.last
                        ),
                    ));
                }
                Owner::Leaked if !range.contains(&r) => {
                    return Err(Error::invalid(
                        OP,
                        format!(
                            "range cuts the mapping {:#x}..={:#x}: the kernel unmaps whole mappings only",
                            r.start, r.last
                        ),
                    ));
                }
                Owner::Leaked => leaked.push(r),
            }
        }
        self.unmap_areas(&mut areas, OP, range, &leaked)
    }

    /// Unmaps the known `leaked` areas inside `range` one by one, then the rest of `range`.
    fn unmap_areas(
        &self,
        areas: &mut Areas,
        op: &'static str,
        range: IovaRange,
        leaked: &[IovaRange],
    ) -> Result<u64> {
        let mut unmapped = 0u64;
        let partial = |unmapped: u64, e: Error| {
            if unmapped == 0 { e } else { Error::PartialUnmap { op, unmapped, source: Box::new(e) } }
        };
        for r in leaked {
            match self.inner.unmap_ioctl(r.start, r.len()) {
                Ok(n) => {
                    unmapped = unmapped.saturating_add(n);
                    areas.remove_leaked_in(*r);
                }
                Err(e) => return Err(partial(unmapped, e)),
            }
        }
        // Areas this crate did not make (raw ioctls): the kernel finds them. ENOENT means none.
        let (start, length) = if range.start == 0 && range.last == u64::MAX {
            (0, u64::MAX) // the kernel's "unmap everything" form
        } else {
            (range.start, range.len())
        };
        match self.inner.unmap_ioctl(start, length) {
            Ok(n) => unmapped = unmapped.saturating_add(n),
            Err(e) if e.errno() == Some(rustix::io::Errno::NOENT) && unmapped != 0 => {}
            Err(e) => return Err(partial(unmapped, e)),
        }
        Ok(unmapped)
    }

    /// Unmaps everything (`IOMMU_IOAS_UNMAP` of the whole space); returns the bytes unmapped. Refused
    /// while any [`Mapping`] guard of this IOAS is alive. [`Error::PartialUnmap`] if it fails part way.
    pub fn unmap_all(&self) -> Result<u64> {
        const OP: &str = "IOMMU_IOAS_UNMAP";
        let mut areas = self.inner.lock(OP)?;
        let live = areas.guards();
        if live != 0 {
            return Err(Error::invalid(OP, format!("{live} mapping guard(s) are alive: unmap them first")));
        }
        let all = IovaRange { start: 0, last: u64::MAX };
        let leaked: Vec<IovaRange> = areas.overlapping(all).map(|(r, _)| r).collect();
        self.unmap_areas(&mut areas, OP, all, &leaked)
    }

    /// Whether this IOAS may use huge IOMMU pages (`IOMMU_OPTION_HUGE_PAGES`; default on).
    pub fn huge_pages(&self) -> Result<bool> {
        Ok(self.iommufd().get_option(sys::IOMMU_OPTION_HUGE_PAGES, self.id())? != 0)
    }

    /// Allows or forbids huge IOMMU pages for this IOAS (`IOMMU_OPTION_HUGE_PAGES`). With them off the
    /// kernel maps every area with the smallest IOMMU page and the IOVA alignment that
    /// [`iova_ranges`](Self::iova_ranges) reports becomes at least the CPU page size.
    ///
    /// Allowing them always succeeds. Forbidding them works while devices are attached, and while
    /// mappings exist, but not both at once: once the IOAS has a domain (an attached device, or a HWPT
    /// allocated on it) and holds a mapping, the kernel refuses with `EINVAL` (the mappings may already
    /// use huge IOPTEs). `EADDRINUSE` if an existing mapping is not aligned to the new alignment.
    pub fn set_huge_pages(&self, enabled: bool) -> Result<()> {
        const OP: &str = "IOMMU_OPTION";
        // Under the area lock: the kernel's answer depends on whether areas exist.
        let mut areas = self.inner.lock(OP)?;
        areas.free = None;
        self.iommufd().set_option(sys::IOMMU_OPTION_HUGE_PAGES, self.id(), enabled as u64)?;
        // The alignment may have changed; the next fixed map re-learns it from the kernel.
        self.inner.alignment.store(0, Ordering::Relaxed);
        Ok(())
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
    /// while clones, mappings, page tables or attachments still refer to it; the handle comes back in
    /// the [`CloseError`] so the call can be retried once they are gone. If the kernel refuses, the
    /// handle comes back too (its `Drop` tries again and logs a failure).
    pub fn destroy(self) -> std::result::Result<(), CloseError<Ioas>> {
        const OP: &str = "IOMMU_DESTROY";
        if let Err(error) = self.iommufd().check_process(OP) {
            return Err(CloseError::new(error, self));
        }
        match Arc::try_unwrap(self.inner) {
            Ok(mut inner) => match inner.obj.try_destroy() {
                Ok(()) => Ok(()),
                Err(error) => Err(CloseError::new(error, Ioas { inner: Arc::new(inner) })),
            },
            Err(inner) => {
                let users = Arc::strong_count(&inner) - 1;
                Err(CloseError::new(Error::InUse { op: OP, users }, Ioas { inner }))
            }
        }
    }
}

/// An IOVA range mapped in an [`Ioas`], owning (or standing for) the memory behind it.
///
/// Dropping the guard unmaps the range and then releases the memory; if the unmap fails, the error is
/// logged and the memory is leaked (never freed while a device might reach it). [`Mapping::unmap`]
/// does the same but reports the failure and hands the guard back. `mem::forget` leaks the memory too.
///
/// A mapping keeps its IOAS alive. It is `Send` and `Sync`: [`read_at`](Mapping::read_at) and
/// [`write_at`](Mapping::write_at) from several threads at once (or on copies of one mapping) are
/// well defined, since every byte is moved with a relaxed atomic access; concurrent writes to the same
/// bytes leave one of the written values per aligned 8-byte word, as with any shared memory, and so
/// does a device writing while the CPU does.
///
/// In a `fork()`ed child (which shares the parent's iommufd) a guard does nothing: its accessors and
/// [`unmap`](Mapping::unmap) fail with [`Error::ForeignProcess`] and its drop leaves the parent's
/// mapping alone.
#[must_use = "dropping a Mapping unmaps it at once"]
pub struct Mapping<M: Memory = DmaBuffer> {
    ioas: Arc<IoasInner>,
    iova: u64,
    len: u64,
    access: Access,
    /// Identity of this guard's entry in the IOAS's area registry.
    id: u64,
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
        // Non-empty and non-wrapping: validated before the map.
        IovaRange { start: self.iova, last: self.iova.saturating_add(self.len - 1) }
    }

    /// The device's permissions.
    pub fn access(&self) -> Access {
        self.access
    }

    /// What the guard keeps alive for the range (`None` only once it has been released).
    pub(crate) fn held(&self) -> Option<&M::Held> {
        self.held.as_ref()
    }

    /// Id of the IOAS the range lives in.
    pub fn ioas_id(&self) -> u32 {
        self.ioas.id()
    }

    /// The iommufd of the IOAS the range lives in.
    pub(crate) fn iommufd(&self) -> &Iommufd {
        self.ioas.iommufd()
    }

    /// Unmaps this guard's range with the registry locked; the entry goes only once the kernel
    /// confirmed the whole range is gone.
    fn do_unmap(&self) -> Result<()> {
        const OP: &str = "IOMMU_IOAS_UNMAP";
        let mut areas = self.ioas.lock(OP)?;
        let unmapped = self.ioas.unmap_ioctl(self.iova, self.len)?;
        if unmapped != self.len {
            // Cannot happen while the registry matches the kernel (the range is exactly one area); keep
            // the entry and the memory, since what is still reachable is unknown.
            return Err(Error::Protocol {
                op: OP,
                detail: format!("unmapped {unmapped:#x} bytes at {:#x}, expected {:#x}", self.iova, self.len),
            });
        }
        areas.remove_guard(self.iova, self.id);
        Ok(())
    }

    /// Unmaps the range, checking the length the kernel reports, and gives back the memory
    /// ([`DmaBuffer`] mappings return `Some(buffer)` unless a copy still shares it).
    ///
    /// On failure the guard comes back in the [`CloseError`] with the range still mapped and owned,
    /// so the call can be retried (for example after `EBUSY` from an access or queue that pins the
    /// range). `?` converts the error into [`Error`], dropping the guard, whose drop tries once more
    /// and leaks the memory if that fails too.
    pub fn unmap(mut self) -> std::result::Result<M::Unmapped, CloseError<Mapping<M>>> {
        match self.do_unmap() {
            Ok(()) => match self.held.take() {
                Some(held) => Ok(M::release(held)),
                None => Err(CloseError::new(
                    Error::Protocol { op: "IOMMU_IOAS_UNMAP", detail: "the mapping held no memory".into() },
                    self,
                )),
            },
            Err(e) => Err(CloseError::new(e, self)),
        }
    }

    /// Gives up the guard and leaves the range mapped: the memory it holds is leaked (never freed,
    /// since a device may still reach it), and the range becomes an ordinary kernel mapping that
    /// [`Ioas::unmap_range`] and [`Ioas::unmap_all`] may remove. Returns the range.
    pub fn leak(mut self) -> IovaRange {
        std::mem::forget(self.held.take());
        if self.ioas.iommufd().in_owner_process() {
            let mut areas = self.ioas.areas.lock().unwrap_or_else(|e| e.into_inner());
            areas.leak_guard(self.iova, self.id);
        }
        self.range()
    }
}

impl Mapping<DmaBuffer> {
    fn check(&self, op: &'static str, offset: usize, len: usize) -> Result<*mut u8> {
        self.ioas.iommufd().check_process(op)?;
        let Some(region) = self.held.as_ref() else {
            return Err(Error::Protocol { op, detail: "the mapping holds no memory".into() });
        };
        match offset.checked_add(len) {
            Some(end) if end <= region.len() => Ok((region.addr() as usize + offset) as *mut u8),
            _ => Err(Error::invalid(
                op,
                format!("{offset:#x}+{len:#x} is outside the {:#x}-byte buffer", region.len()),
            )),
        }
    }

    /// Copies `dst.len()` bytes at `offset` out of the mapped buffer. The device may be writing them:
    /// every byte is read through relaxed atomic loads of whole aligned 8-byte words, so the copy is
    /// well defined but not a snapshot; order it after the device's completion signal.
    pub fn read_at(&self, offset: usize, dst: &mut [u8]) -> Result<()> {
        let src = self.check("Mapping::read_at", offset, dst.len())?;
        // SAFETY: `src..src+dst.len()` lies inside the read-write anonymous region this guard keeps
        // mapped (checked above, in the process that mapped it); the region is page-aligned and whole
        // pages long, so every aligned word overlapping the range is inside it too.
        unsafe { dma::copy_from_device(src, dst) };
        Ok(())
    }

    /// Copies `src` into the mapped buffer at `offset` with relaxed atomic stores of aligned 8-byte
    /// words (edge words merged by compare-and-exchange, keeping their other bytes): the device may be
    /// reading, other threads may be copying too.
    pub fn write_at(&self, offset: usize, src: &[u8]) -> Result<()> {
        let dst = self.check("Mapping::write_at", offset, src.len())?;
        // SAFETY: `dst..dst+src.len()` lies inside the read-write anonymous region this guard keeps
        // mapped (checked above, in the process that mapped it); the region is page-aligned and whole
        // pages long, so every aligned word overlapping the range is inside it too.
        unsafe { dma::copy_to_device(src, dst) };
        Ok(())
    }

    /// Copies the whole buffer out.
    pub fn to_vec(&self) -> Result<Vec<u8>> {
        let len = self.held.as_ref().map_or(0, |r| r.len());
        let mut v = vec![0; len];
        self.read_at(0, &mut v)?;
        Ok(v)
    }
}

impl<M: Memory> Drop for Mapping<M> {
    fn drop(&mut self) {
        let Some(held) = self.held.take() else { return };
        if !self.ioas.iommufd().in_owner_process() {
            // A fork()ed child's copy of the guard: the range is the parent's. Touch neither it nor
            // the memory (the child's copy of which is freed with the child).
            std::mem::forget(held);
            return;
        }
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
                // The memory is leaked, so the range may now be removed like any leaked mapping.
                let mut areas = self.ioas.areas.lock().unwrap_or_else(|e| e.into_inner());
                areas.leak_guard(self.iova, self.id);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The registry's overlap query against a linear scan, over random non-overlapping area sets and
    /// random queries (a deterministic generator: the same cases every run).
    #[test]
    fn registry_overlap_matches_a_linear_scan() {
        let mut state = 0x243f_6a88_85a3_08d3u64;
        let mut next = move |n: u64| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state % n
        };
        for _case in 0..300 {
            let mut areas = Areas::default();
            let mut naive: Vec<(IovaRange, Owner)> = Vec::new();
            let mut cursor = next(4);
            while naive.len() < 12 {
                let start = cursor + next(3);
                let range = IovaRange { start, last: start + next(4) };
                cursor = range.last + 1;
                if next(2) == 0 {
                    let id = areas.insert_guard(range);
                    naive.push((range, Owner::Guard(id)));
                } else {
                    let id = areas.insert_guard(range);
                    areas.leak_guard(range.start, id);
                    naive.push((range, Owner::Leaked));
                }
            }
            for _query in 0..40 {
                let start = next(cursor + 2);
                let query = IovaRange { start, last: start + next(6) };
                let got: Vec<_> = areas.overlapping(query).collect();
                let want: Vec<_> = naive.iter().copied().filter(|(r, _)| r.overlaps(&query)).collect();
                assert_eq!(got, want, "query {query:?} over {naive:?}");
            }
            let guards = naive.iter().filter(|(_, o)| matches!(o, Owner::Guard(_))).count();
            assert_eq!(areas.guards(), guards);
            // Removing leaked areas inside a range keeps everything else.
            let cut = IovaRange { start: next(cursor), last: cursor };
            areas.remove_leaked_in(cut);
            let kept: Vec<_> = areas.overlapping(IovaRange { start: 0, last: u64::MAX }).collect();
            let want: Vec<_> =
                naive.iter().copied().filter(|(r, o)| *o != Owner::Leaked || !cut.contains(r)).collect();
            assert_eq!(kept, want);
        }
    }

    #[test]
    fn guards_are_removed_by_identity_not_by_start() {
        let mut areas = Areas::default();
        let range = IovaRange { start: 0x1000, last: 0x1fff };
        let first = areas.insert_guard(range);
        // A second entry at the same start (only possible if the kernel and the registry disagreed)
        // must not be clobbered by the first guard's removal.
        let second = areas.insert_guard(range);
        areas.remove_guard(range.start, first);
        assert_eq!(areas.overlapping(range).collect::<Vec<_>>(), vec![(range, Owner::Guard(second))]);
        areas.remove_guard(range.start, first);
        assert_eq!(areas.guards(), 1, "a stale removal is a no-op");
    }
}
