//! Guest RAM of the `vm-memory` crate mapped into an IOAS at IOVA = guest physical address (feature
//! `vm-memory`).
//!
//! A VMM keeps guest RAM in a `vm-memory` guest memory object: a [`GuestMemoryMmap`] (often the
//! snapshot a `GuestMemoryAtomic` hands out), a sorted collection of [`GuestRegionMmap`]s, each an
//! `Arc`-counted [`MmapRegion`] placed at a guest physical address. For a guest without a vIOMMU the
//! device's DMA addresses are guest physical addresses, so every region is mapped at IOVA = GPA:
//!
//! - [`Ioas::map_guest_memory`] maps every region of a guest memory object and returns one
//!   [`GuestMemoryMapping`] guard that unmaps them all on drop. It is safe: each region's mapping holds
//!   a reference to the region's [`MmapRegion`], so the memory stays allocated while any device can
//!   reach it, and `vm-memory` reaches guest memory only through volatile and atomic accessors (the
//!   guest writes it behind the VMM's back as well), so device writes break no Rust reference.
//! - [`GuestMemoryMapping::add_region`] and [`GuestMemoryMapping::remove_region`] follow memory
//!   hotplug one region at a time; [`GuestMemoryMapping::update`] brings the mapping in line with a
//!   new snapshot of the guest memory (what a VMM does after swapping its `GuestMemoryAtomic`).
//! - [`IdentityMap`] is the whole setup for a guest without a vIOMMU: one IOAS, the devices attached
//!   to it first (so the IOAS knows their reserved IOVA ranges), then every RAM region mapped at its
//!   GPA, each region checked against the usable ranges before anything is mapped.
//! - [`Ioas::map_guest_memory_unchecked`] maps a guest memory object of any other backend (whose
//!   regions are not reference-counted mmaps) from the regions' host addresses; it is `unsafe`, with
//!   the contract of [`Ioas::map_user`].
//!
//! Every mapping goes through the IOAS's area registry like any other, so the soundness rules of the
//! crate hold unchanged: a failed unmap leaks the region's reference rather than letting the memory
//! go, and ranges a guard owns cannot be removed behind it.

use std::collections::BTreeMap;
use std::marker::PhantomData;
use std::sync::Arc;

use vm_memory::bitmap::Bitmap;
use vm_memory::{
    GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion, GuestRegionMmap,
    MemoryRegionAddress, MmapRegion,
};

use crate::dma::{Memory, Shareable, UserMemory, page_size, sealed};
use crate::error::{CloseError, Error, Result};
use crate::ioas::{Access, Ioas, Iova, IovaRange, Mapping};
use crate::{Attachment, BoundDevice, Iommufd};

/// The bitmaps a mapped [`MmapRegion`] may carry (`()` for none, or `vm-memory`'s dirty bitmaps):
/// whatever a [`Mapping`] can hold and share between threads.
#[cfg_attr(docsrs, doc(cfg(feature = "vm-memory")))]
pub trait RamBitmap: Bitmap + std::fmt::Debug + Send + Sync + 'static {}
impl<B: Bitmap + std::fmt::Debug + Send + Sync + 'static> RamBitmap for B {}

/// Guest RAM of `vm-memory` mapped for DMA: the [`Mapping`] holds the region's reference-counted
/// [`MmapRegion`], so the memory outlives every IOVA range that reaches it. Unmapping hands the
/// reference back.
///
/// Such mappings may be [copied](Ioas::copy) into another IOAS by safe code: a copy holds the region
/// too.
///
/// What this relies on is what `vm-memory`'s own safe accessors rely on: the memory of an
/// [`MmapRegion`] stays mapped while the `MmapRegion` lives. For regions it mmaps itself `vm-memory`
/// unmaps them when the last reference goes; for externally managed memory
/// (`MmapRegion::build_raw`) it is the promise made by the `unsafe` call that built the region.
#[cfg_attr(docsrs, doc(cfg(feature = "vm-memory")))]
#[derive(Debug)]
pub struct GuestRam<B = ()>(PhantomData<fn() -> B>);

impl<B> sealed::Sealed for GuestRam<B> {}
impl<B: RamBitmap> Memory for GuestRam<B> {
    #[doc(hidden)]
    type Held = Arc<MmapRegion<B>>;
    /// The region's [`MmapRegion`] (the mapping's reference to it).
    type Unmapped = Arc<MmapRegion<B>>;
    fn release(held: Arc<MmapRegion<B>>) -> Arc<MmapRegion<B>> {
        held
    }
}
impl<B: RamBitmap> Shareable for GuestRam<B> {}

/// One region as the checks and the map see it.
#[derive(Clone, Copy)]
struct RegionSpec {
    gpa: u64,
    len: u64,
    host: *mut u8,
}

impl RegionSpec {
    fn of<R: GuestMemoryRegion>(op: &'static str, region: &R) -> Result<RegionSpec> {
        let gpa = region.start_addr().0;
        let len = region.len();
        let host = region.get_host_address(MemoryRegionAddress(0)).map_err(|e| {
            Error::invalid(op, format!("the region at GPA {gpa:#x} has no host address: {e}"))
        })?;
        Self::checked(op, gpa, len, host)
    }

    fn checked(op: &'static str, gpa: u64, len: u64, host: *mut u8) -> Result<RegionSpec> {
        let page = page_size() as u64;
        let what = |why: String| Error::invalid(op, format!("the region at GPA {gpa:#x}+{len:#x} {why}"));
        if host.is_null() {
            return Err(what("is not mapped in this process (null host address)".into()));
        }
        if len == 0 || gpa % page != 0 || len % page != 0 || (host as u64) % page != 0 {
            return Err(what(format!(
                "must be page-aligned in guest and host addresses and a whole number of pages \
                 (host address {host:p}, page size {page:#x})"
            )));
        }
        if IovaRange::from_len(gpa, len).is_none() {
            return Err(what("overflows the address space".into()));
        }
        Ok(RegionSpec { gpa, len, host })
    }

    fn range(&self) -> IovaRange {
        // Checked non-empty and non-overflowing by `checked`.
        IovaRange { start: self.gpa, last: self.gpa + (self.len - 1) }
    }
}

/// The host view of a `vm-memory` region: its [`MmapRegion`] and where the guest sees it.
fn mmap_spec<B: RamBitmap>(
    op: &'static str,
    region: &GuestRegionMmap<B>,
) -> Result<(RegionSpec, Arc<MmapRegion<B>>)> {
    let mmap = region.get_mmap();
    let spec = RegionSpec::checked(op, region.start_addr().0, mmap.size() as u64, mmap.as_ptr())?;
    Ok((spec, mmap))
}

/// Checks that every region lies inside one of the IOAS's usable IOVA ranges (with a device attached,
/// its reserved ranges, such as the x86 interrupt window at `0xfee00000`, are holes in them).
fn check_usable<'a>(
    op: &'static str,
    ioas: &Ioas,
    specs: impl IntoIterator<Item = &'a RegionSpec>,
) -> Result<()> {
    let usable = ioas.iova_ranges()?;
    for spec in specs {
        let range = spec.range();
        if !usable.ranges.iter().any(|u| u.contains(&range)) {
            return Err(Error::invalid(
                op,
                format!(
                    "guest RAM at GPA {:#x}..={:#x} is not inside the IOAS's usable IOVA ranges {:#x?} \
                     (an attached device's reserved range, or the IOMMU's address width, excludes it): \
                     a guest without a vIOMMU cannot DMA there, so its RAM must not be placed there",
                    range.start, range.last, usable.ranges
                ),
            ));
        }
    }
    Ok(())
}

impl Ioas {
    /// Maps every region of `memory` at IOVA = its guest physical address (`IOMMU_IOAS_MAP`, one per
    /// region), and returns one guard that unmaps them all.
    ///
    /// Safe: each region's mapping holds a reference to the region's [`MmapRegion`], so the memory
    /// stays allocated until the kernel confirms its IOVA range is gone, even if the VMM drops its
    /// guest memory object meanwhile. A `GuestMemoryAtomic`'s snapshot is passed as
    /// `&atomic.memory()`.
    ///
    /// Checked before any map: every region must be page-aligned (guest and host address, length) and
    /// lie inside the IOAS's usable IOVA ranges ([`iova_ranges`](Self::iova_ranges); attach devices
    /// first, so that their reserved ranges are known). If one map fails, the regions already mapped
    /// are unmapped again (the guard made so far is dropped) and its error is returned.
    #[cfg_attr(docsrs, doc(cfg(feature = "vm-memory")))]
    pub fn map_guest_memory<B: RamBitmap>(
        &self,
        memory: &GuestMemoryMmap<B>,
        access: Access,
    ) -> Result<GuestMemoryMapping<GuestRam<B>>> {
        const OP: &str = "Ioas::map_guest_memory";
        let regions = memory.iter().map(|r| mmap_spec(OP, r)).collect::<Result<Vec<_>>>()?;
        check_usable(OP, self, regions.iter().map(|(s, _)| s))?;
        let mut guard = GuestMemoryMapping::new(self, access);
        for (spec, mmap) in regions {
            guard.map_one(spec, mmap)?;
        }
        Ok(guard)
    }

    /// Maps every region of a guest memory object of any `vm-memory` backend at IOVA = its guest
    /// physical address, from the regions' host addresses (`get_host_address`), with the checks of
    /// [`map_guest_memory`](Self::map_guest_memory). For backends whose regions are not
    /// reference-counted mmaps (memory this crate cannot hold).
    ///
    /// # Safety
    ///
    /// For the memory of every region, the caller takes on [`Ioas::map_user`]'s contract until the
    /// returned guard (or the region's mapping, once removed from it) is unmapped or dropped: the host
    /// memory must stay mapped and must not be reused, no Rust reference to it may exist while a
    /// device may write it, and it must be leaked if the guard is leaked.
    #[cfg_attr(docsrs, doc(cfg(feature = "vm-memory")))]
    pub unsafe fn map_guest_memory_unchecked<G: GuestMemoryBackend>(
        &self,
        memory: &G,
        access: Access,
    ) -> Result<GuestMemoryMapping<UserMemory>> {
        const OP: &str = "Ioas::map_guest_memory_unchecked";
        let specs = memory.iter().map(|r| RegionSpec::of(OP, r)).collect::<Result<Vec<_>>>()?;
        check_usable(OP, self, &specs)?;
        let mut guard = GuestMemoryMapping::new(self, access);
        for spec in specs {
            guard.map_one(spec, ())?;
        }
        Ok(guard)
    }
}

/// Guest RAM mapped into an IOAS at IOVA = guest physical address: one [`Mapping`] per region,
/// keyed by guest physical address ([`Ioas::map_guest_memory`]).
///
/// Dropping the guard unmaps every region (failures are logged and that region's memory is leaked,
/// never freed); [`unmap`](Self::unmap) does the same and reports failure. Regions come and go with
/// memory hotplug through [`add_region`](Self::add_region), [`remove_region`](Self::remove_region)
/// and [`update`](Self::update); the guard always lists exactly the regions the kernel maps.
#[cfg_attr(docsrs, doc(cfg(feature = "vm-memory")))]
#[must_use = "dropping a GuestMemoryMapping unmaps the guest RAM at once"]
pub struct GuestMemoryMapping<M: Memory = GuestRam> {
    ioas: Ioas,
    access: Access,
    regions: BTreeMap<u64, Mapping<M>>,
}

impl<M: Memory> std::fmt::Debug for GuestMemoryMapping<M> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GuestMemoryMapping")
            .field("ioas", &self.ioas.id())
            .field("access", &self.access)
            .field("regions", &self.regions.values().collect::<Vec<_>>())
            .finish()
    }
}

impl<M: Memory> GuestMemoryMapping<M> {
    fn new(ioas: &Ioas, access: Access) -> Self {
        GuestMemoryMapping { ioas: ioas.clone(), access, regions: BTreeMap::new() }
    }

    /// Maps one checked region at IOVA = GPA into the set.
    fn map_one(&mut self, spec: RegionSpec, held: M::Held) -> Result<()> {
        let len = usize::try_from(spec.len)
            .map_err(|_| Error::invalid("IOMMU_IOAS_MAP", "region longer than the address space"))?;
        let mapping = self.ioas.map_va_held::<M>(spec.host, len, Iova::Fixed(spec.gpa), self.access, held)?;
        self.regions.insert(spec.gpa, mapping);
        Ok(())
    }

    /// The IOAS the regions are mapped in.
    pub fn ioas(&self) -> &Ioas {
        &self.ioas
    }

    /// What devices may do with the regions.
    pub fn access(&self) -> Access {
        self.access
    }

    /// The mapped regions in guest physical address order; each mapping's IOVA is the region's GPA.
    pub fn regions(&self) -> impl Iterator<Item = &Mapping<M>> + '_ {
        self.regions.values()
    }

    /// Number of mapped regions.
    pub fn len(&self) -> usize {
        self.regions.len()
    }

    /// True when no region is mapped (every one was removed).
    pub fn is_empty(&self) -> bool {
        self.regions.is_empty()
    }

    /// Unmaps the region that starts at guest physical address `gpa` (hot-unplug) and returns what
    /// its mapping held (for [`GuestRam`], the region's [`MmapRegion`]). Unplug the memory from the
    /// guest's view first; once this returns, no device can reach it.
    ///
    /// [`Error::InvalidArgument`] if no mapped region starts at `gpa`. If the unmap fails the region
    /// stays mapped and listed, and the call can be retried.
    pub fn remove_region(&mut self, gpa: GuestAddress) -> Result<M::Unmapped> {
        let Some(mapping) = self.regions.remove(&gpa.0) else {
            return Err(Error::invalid(
                "GuestMemoryMapping::remove_region",
                format!("no mapped region starts at GPA {:#x}", gpa.0),
            ));
        };
        match mapping.unmap() {
            Ok(unmapped) => Ok(unmapped),
            Err(e) => {
                let (error, mapping) = e.into_parts();
                self.regions.insert(gpa.0, mapping);
                Err(error)
            }
        }
    }

    /// Unmaps every region now, reporting the first failure. On failure the guard comes back with the
    /// regions that are still mapped, so the call can be retried.
    pub fn unmap(mut self) -> std::result::Result<(), CloseError<GuestMemoryMapping<M>>> {
        let gpas: Vec<u64> = self.regions.keys().copied().collect();
        for gpa in gpas {
            if let Err(e) = self.remove_region(GuestAddress(gpa)) {
                return Err(CloseError::new(e, self));
            }
        }
        Ok(())
    }
}

impl<B: RamBitmap> GuestMemoryMapping<GuestRam<B>> {
    /// Maps one more region at IOVA = its GPA (memory hot-plug): call it before the guest is told
    /// about the memory. The region is checked like those of [`Ioas::map_guest_memory`]; it must not
    /// overlap a mapped region.
    pub fn add_region(&mut self, region: &GuestRegionMmap<B>) -> Result<()> {
        const OP: &str = "GuestMemoryMapping::add_region";
        let (spec, mmap) = mmap_spec(OP, region)?;
        check_usable(OP, &self.ioas, [&spec])?;
        self.map_one(spec, mmap)
    }

    /// Brings the mapping in line with `memory`, a new snapshot of the guest memory (after memory
    /// hotplug swapped the VMM's `GuestMemoryAtomic`): regions that are gone or whose GPA, length or
    /// backing [`MmapRegion`] changed are unmapped, new ones are mapped, the others are left alone.
    ///
    /// The new regions are checked before anything changes. If an unmap or map fails part way, the
    /// guard still lists exactly what is mapped, and calling `update` again resumes.
    pub fn update(&mut self, memory: &GuestMemoryMmap<B>) -> Result<()> {
        const OP: &str = "GuestMemoryMapping::update";
        let wanted = memory.iter().map(|r| mmap_spec(OP, r)).collect::<Result<Vec<_>>>()?;
        let same = |m: &Mapping<GuestRam<B>>, spec: &RegionSpec, mmap: &Arc<MmapRegion<B>>| {
            m.len() == spec.len && m.held().is_some_and(|h| Arc::ptr_eq(h, mmap))
        };
        let stale: Vec<u64> = self
            .regions
            .iter()
            .filter(|(gpa, m)| !wanted.iter().any(|(s, mmap)| s.gpa == **gpa && same(m, s, mmap)))
            .map(|(gpa, _)| *gpa)
            .collect();
        let new: Vec<(RegionSpec, Arc<MmapRegion<B>>)> = wanted
            .into_iter()
            .filter(|(s, mmap)| !self.regions.get(&s.gpa).is_some_and(|m| same(m, s, mmap)))
            .collect();
        check_usable(OP, &self.ioas, new.iter().map(|(s, _)| s))?;
        for gpa in stale {
            self.remove_region(GuestAddress(gpa))?;
        }
        for (spec, mmap) in new {
            self.map_one(spec, mmap)?;
        }
        Ok(())
    }
}

/// DMA for a guest without a vIOMMU: one IOAS holding all guest RAM at IOVA = guest physical
/// address, with the guest's assigned devices attached to it.
///
/// [`new`](Self::new) attaches the devices before mapping, so the IOAS knows their reserved IOVA
/// ranges and a RAM region inside one is refused with a clear error before anything is mapped
/// (attaching after mapping fails in the kernel instead, with `EADDRINUSE`, when a mapping covers
/// a device's reserved range). Dropping it detaches the devices, then unmaps the RAM, then destroys
/// the IOAS, in the order the kernel requires.
#[cfg_attr(docsrs, doc(cfg(feature = "vm-memory")))]
#[derive(Debug)]
pub struct IdentityMap<B: RamBitmap = ()> {
    // Declared in teardown order: detach, unmap, destroy.
    attachments: Vec<Attachment>,
    ram: GuestMemoryMapping<GuestRam<B>>,
}

impl<B: RamBitmap> IdentityMap<B> {
    /// Allocates an IOAS in `iommufd`, attaches `devices` to it, and maps every region of `memory`
    /// at its guest physical address for reading and writing.
    pub fn new(iommufd: &Iommufd, devices: &[&BoundDevice], memory: &GuestMemoryMmap<B>) -> Result<Self> {
        let ioas = iommufd.alloc_ioas()?;
        let attachments = devices.iter().map(|d| d.attach(&ioas)).collect::<Result<Vec<_>>>()?;
        let ram = ioas.map_guest_memory(memory, Access::READ_WRITE)?;
        Ok(IdentityMap { attachments, ram })
    }

    /// Attaches one more device (device hotplug). The kernel refuses it (`EADDRINUSE`) if guest RAM
    /// is mapped over one of its reserved IOVA ranges.
    pub fn attach(&mut self, device: &BoundDevice) -> Result<()> {
        self.attachments.push(device.attach(self.ram.ioas())?);
        Ok(())
    }

    /// The IOAS (to attach more page tables to, or read its usable ranges).
    pub fn ioas(&self) -> &Ioas {
        self.ram.ioas()
    }

    /// The guest RAM mapping.
    pub fn mapping(&self) -> &GuestMemoryMapping<GuestRam<B>> {
        &self.ram
    }

    /// The guest RAM mapping, for memory hotplug ([`GuestMemoryMapping::add_region`],
    /// [`GuestMemoryMapping::remove_region`], [`GuestMemoryMapping::update`]).
    pub fn mapping_mut(&mut self) -> &mut GuestMemoryMapping<GuestRam<B>> {
        &mut self.ram
    }

    /// The device attachments, in the order they were made.
    pub fn attachments(&self) -> &[Attachment] {
        &self.attachments
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn region_checks_refuse_what_cannot_be_mapped() {
        let page = page_size() as u64;
        let mut backing = vec![0u8; 4 * page as usize];
        let base = backing.as_mut_ptr();
        let aligned = base.wrapping_add(base.align_offset(page as usize));
        let op = "t";
        assert!(RegionSpec::checked(op, 0x10_0000, page, aligned).is_ok());
        let cases: [(u64, u64, *mut u8, &str); 6] = [
            (0x10_0000, page, std::ptr::null_mut(), "null host address"),
            (0x10_0000, 0, aligned, "page-aligned"),
            (0x10_0001, page, aligned, "page-aligned"),
            (0x10_0000, page + 1, aligned, "page-aligned"),
            (0x10_0000, page, aligned.wrapping_add(1), "page-aligned"),
            (u64::MAX - page + 1, 2 * page, aligned, "overflows"),
        ];
        for (gpa, len, host, want) in cases {
            match RegionSpec::checked(op, gpa, len, host) {
                Err(Error::InvalidArgument { reason, .. }) => assert!(reason.contains(want), "{reason}"),
                Err(e) => panic!("{gpa:#x}+{len:#x}: {e}"),
                Ok(_) => panic!("{gpa:#x}+{len:#x} at {host:p} was accepted"),
            }
        }
    }

    #[test]
    fn mmap_regions_are_seen_at_their_guest_address() {
        let page = page_size();
        let mem = GuestMemoryMmap::<()>::from_ranges(&[
            (GuestAddress(0), 4 * page),
            (GuestAddress(0x10_0000), 2 * page),
        ])
        .unwrap();
        let specs: Vec<_> = mem.iter().map(|r| mmap_spec("t", r).unwrap()).collect();
        assert_eq!(specs.len(), 2);
        assert_eq!((specs[0].0.gpa, specs[0].0.len), (0, 4 * page as u64));
        assert_eq!((specs[1].0.gpa, specs[1].0.len), (0x10_0000, 2 * page as u64));
        for ((spec, mmap), region) in specs.iter().zip(mem.iter()) {
            // The held reference is the region's own mmap, at the address vm-memory reports.
            assert!(Arc::ptr_eq(mmap, &region.get_mmap()));
            assert_eq!(spec.host, region.get_host_address(MemoryRegionAddress(0)).unwrap());
        }
    }
}
