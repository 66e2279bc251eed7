//! Model-based test of one IOAS on the kernel's mock IOMMU: a reference model of the IOAS (its areas,
//! allowed and reserved ranges, alignment and huge-page option) is driven by random operation
//! sequences, each operation is also issued through the SDK against the real kernel, and every
//! divergence fails the test with the seed, the operation index and the operation log:
//!
//! - the SDK's result (success, refusal before the ioctl, or the kernel's errno) must be the one the
//!   model predicts, and so must the IOVA an automatic placement picks and the bytes an unmap reports;
//! - after every operation, each area of the model must translate to its memory in the mock domain
//!   (`check_map`); areas the operation removed must no longer translate to their memory
//!   (`check_map` fails), and neither their IOVAs nor random IOVAs the model says are free may be
//!   reachable by an emulated device (`MockAccess`); after changes of allowed or
//!   reserved ranges or of the huge-page option, `IOMMU_IOAS_IOVA_RANGES` must report what the model
//!   holds.
//!
//! Kernel semantics the model encodes, from `drivers/iommu/iommufd/io_pagetable.c` and `ioas.c`
//! (Linux 7.3), are noted where they are used. Single-operation tests at the end cover behaviours of
//! the kernel's own selftests (`tools/testing/selftests/iommu/iommufd.c`) that the rest of the suite
//! does not.
//!
//! Build with `--features testing`; every test needs `/dev/iommu` from a kernel with
//! `CONFIG_IOMMUFD_TEST`, so each is ignored on the host and run by `cargo xtask vm-test`.
#![cfg(feature = "testing")]

mod common;
use std::collections::{BTreeMap, HashMap};
use std::os::fd::AsFd;
use std::time::Instant;

use iommufd::testing::{self, MockAccess, MockDevice};
use iommufd::{
    Access, DmaBuffer, Errno, Error, FileMemory, Hwpt, HwptFlags, Ioas, Iommufd, Iova, IovaRange, Mapping,
    page_size,
};

/// Seeds of the random operation sequences (each gets a fresh IOAS and mock device).
const SEEDS: [u64; 16] = [
    1,
    2,
    3,
    42,
    0xdead_beef,
    0x1234_5678_9abc_def0,
    7,
    99,
    1000,
    0x5eed,
    31337,
    0xfeed_face,
    65537,
    2024,
    0xabad_1dea,
    0xc0ff_ee00,
];
/// Operations per seed.
const OPS_PER_SEED: usize = 600;
/// Wall-clock budget of the whole model run.
const MODEL_BUDGET_SECS: u64 = 60;
/// Fixed IOVAs, explicit unmaps, allowed and reserved ranges fall in this many pages from the start
/// of the mock aperture, so operations collide often.
const WINDOW_PAGES: u64 = 128;
/// Largest buffer or file range mapped, in pages.
const MAX_MAP_PAGES: u64 = 8;
/// Pages of the memfd that `map_file` maps ranges of.
const FILE_PAGES: u64 = 32;
/// Above this many areas, the generator prefers operations that remove areas.
const MAX_AREAS: usize = 24;
/// Random IOVAs probed after each operation.
const PROBES_PER_OP: usize = 2;
/// `HPAGE_SIZE` on x86-64: automatic placement aligns to at most this (with THP configured).
const HPAGE: u64 = 2 << 20;

/// Writes a line straight to stderr, past the test harness's output capture, so it shows in the VM
/// console for passing tests too.
fn report(line: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "{line}");
}

fn page() -> u64 {
    page_size() as u64
}

/// xorshift64*: small, deterministic, good enough to pick operations.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        // Never zero (xorshift's fixed point); mixes small seeds apart.
        Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
    }

    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform in `0..n` (n > 0).
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    /// True with probability `percent`/100.
    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }

    fn pick<'a, T>(&mut self, items: &'a [T]) -> Option<&'a T> {
        if items.is_empty() { None } else { items.get(self.below(items.len() as u64) as usize) }
    }
}

/// What an SDK call came back with, coarsely: what the model predicts.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Class {
    Ok,
    /// Refused by the SDK before any ioctl (`Error::InvalidArgument`).
    Refused,
    /// The kernel's errno.
    Errno(Errno),
    /// Anything else (always a divergence).
    Other(String),
}

fn class<T>(r: &iommufd::Result<T>) -> Class {
    match r {
        Ok(_) => Class::Ok,
        Err(Error::InvalidArgument { .. }) => Class::Refused,
        Err(e) => match e.errno() {
            Some(errno) => Class::Errno(errno),
            None => Class::Other(format!("{e:?}")),
        },
    }
}

/// What backs an area, for `check_map`.
#[derive(Debug, Clone, Copy)]
enum Backing {
    /// A `DmaBuffer` (its id in `Harness::buffers`) at this address.
    Buffer { id: usize, va: usize },
    /// The memfd at this offset.
    File { offset: u64 },
}

/// One area of the IOAS, as the model holds it.
#[derive(Debug, Clone, Copy)]
struct Area {
    iova: u64,
    len: u64,
    backing: Backing,
    /// The kernel's `iopt_pages` are writable (mapped with WRITE at first; copies inherit it).
    writable: bool,
    /// Owned by a live `Mapping` guard (else leaked: an ordinary kernel mapping).
    guarded: bool,
    /// The area's own permissions (a copy may have fewer than its source).
    access: Access,
}

impl Area {
    fn last(&self) -> u64 {
        self.iova + self.len - 1
    }

    /// The address automatic placement keeps the alignment of (`iopt_alloc_area_pages`): the user VA
    /// for memory, the file offset for a file.
    fn addr(&self) -> u64 {
        match self.backing {
            Backing::Buffer { va, .. } => va as u64,
            Backing::File { offset } => offset,
        }
    }
}

/// An explicit close's error (whatever handle it may give back) as the crate's error.
fn closed<T, E: Into<Error>>(r: std::result::Result<T, E>) -> iommufd::Result<T> {
    r.map_err(Into::into)
}

fn overlaps(a: (u64, u64), b: (u64, u64)) -> bool {
    a.0 <= b.1 && b.0 <= a.1
}

/// Sorted, merged (overlapping or adjacent) ranges.
fn merge(mut ranges: Vec<(u64, u64)>) -> Vec<(u64, u64)> {
    ranges.sort();
    let mut out: Vec<(u64, u64)> = Vec::new();
    for (s, l) in ranges {
        match out.last_mut() {
            Some(last) if s <= last.1.saturating_add(1) => last.1 = last.1.max(l),
            _ => out.push((s, l)),
        }
    }
    out
}

/// The holes of `[start, last]` not covered by `used` (sorted, merged).
fn holes(start: u64, last: u64, used: &[(u64, u64)]) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    let mut cur = start;
    for &(s, l) in used {
        if l < cur {
            continue;
        }
        if s > last {
            break;
        }
        if s > cur {
            out.push((cur, s - 1));
        }
        match l.checked_add(1) {
            Some(next) => cur = next,
            None => return out,
        }
        if cur > last {
            return out;
        }
    }
    out.push((cur, last));
    out
}

/// `__alloc_iova_check_range`: align `start` up, and check `len` fits before `last`.
fn fit(start: u64, last: u64, len: u64, align: u64) -> Option<u64> {
    let aligned = start.checked_add(align - 1)? & !(align - 1);
    if aligned >= last || last - aligned < len - 1 { None } else { Some(aligned) }
}

/// The reference model of one IOAS with one mock domain attached.
#[derive(Debug, Clone)]
struct Model {
    areas: BTreeMap<u64, Area>,
    /// As last set by a successful `allow_iovas` (unmerged, as given).
    allowed: Vec<(u64, u64)>,
    /// Reserved ranges: what the attached domain reserves (outside its aperture) and `add_reserved`.
    reserved: Vec<(u64, u64)>,
    huge_disabled: bool,
    /// The IOVA alignment the mock domain imposes (its smallest page).
    domain_alignment: u64,
}

impl Model {
    fn alignment(&self) -> u64 {
        // iopt_calculate_iova_alignment: PAGE_SIZE with large pages disabled, else 1, then the largest
        // smallest-page of every domain (and access).
        let base = if self.huge_disabled { page() } else { 1 };
        base.max(self.domain_alignment)
    }

    fn usable(&self) -> Vec<(u64, u64)> {
        holes(0, u64::MAX, &merge(self.reserved.clone()))
    }

    fn reserved_hit(&self, r: (u64, u64)) -> bool {
        self.reserved.iter().any(|&x| overlaps(x, r))
    }

    fn areas_in(&self, r: (u64, u64)) -> Vec<Area> {
        self.areas.values().filter(|a| overlaps((a.iova, a.last()), r)).copied().collect()
    }

    fn covering(&self, iova: u64) -> Option<Area> {
        self.areas.range(..=iova).next_back().map(|(_, a)| *a).filter(|a| a.last() >= iova)
    }

    /// `iopt_alloc_iova`: first fit over the allowed spans (the whole space but the first and last
    /// page when none are set), skipping reserved ranges and areas. The alignment keeps that of the
    /// address behind the mapping, capped by the length rounded up to a power of two and by
    /// `HPAGE_SIZE`.
    fn auto_iova(&self, addr: u64, len: u64) -> Option<u64> {
        let mut align = len.next_power_of_two();
        if addr != 0 {
            align = align.min(1 << addr.trailing_zeros());
        }
        align = align.min(HPAGE);
        // addr % PAGE_SIZE is 0 for every mapping here, so the page offset adds nothing.
        let (lo, hi) = (page(), u64::MAX - page());
        let spans = if self.allowed.is_empty() {
            vec![(lo, hi)]
        } else {
            merge(self.allowed.clone())
                .into_iter()
                .filter(|&(s, l)| l >= lo && s <= hi)
                .map(|(s, l)| (s.max(lo), l.min(hi)))
                .collect()
        };
        let mut used: Vec<(u64, u64)> = self.reserved.clone();
        used.extend(self.areas.values().map(|a| (a.iova, a.last())));
        let used = merge(used);
        for (s, l) in spans {
            let Some(start) = fit(s, l, len, align) else { continue };
            for (hs, hl) in holes(start, l, &used) {
                if let Some(iova) = fit(hs, hl, len, align) {
                    return Some(iova);
                }
            }
        }
        None
    }
}

/// A live guard.
enum Guard {
    Buffer(Mapping<DmaBuffer>),
    File(Mapping<FileMemory>),
}

/// How often each buffer's memory is still held: by live guards and by leaked ones (forever).
#[derive(Debug, Default, Clone, Copy)]
struct BufferRefs {
    live: u32,
    leaked: u32,
}

/// An operation on the IOAS.
#[derive(Debug, Clone)]
enum Op {
    MapBuffer { pages: u64, at: Option<u64>, access: Access },
    MapFile { offset_pages: u64, pages: u64, at: Option<u64>, access: Access },
    Copy { src: u64, at: Option<u64>, access: Access },
    Unmap { iova: u64 },
    Leak { iova: u64 },
    UnmapRange { start: u64, len: u64 },
    UnmapAll,
    Allow(Vec<(u64, u64)>),
    Reserve((u64, u64)),
    HugePages(bool),
}

/// The memfd `map_file` maps, mapped shared into this process for `check_map`.
type File = common::SharedMemfd;

/// A [`File`] of `pages` pages (hugetlb pages if asked), every page written.
fn memfd_file(pages: u64, hugetlb: bool) -> File {
    let step = if hugetlb { HPAGE as usize } else { page_size() };
    common::SharedMemfd::new("model", (pages * page()) as usize, hugetlb, step)
}

/// The real IOAS and everything the model run holds.
struct Harness {
    iommufd: Iommufd,
    ioas: Ioas,
    dev: MockDevice,
    access: MockAccess,
    file: File,
    guards: BTreeMap<u64, Guard>,
    buffers: HashMap<usize, BufferRefs>,
    next_buffer: usize,
    /// Addresses of buffers whose memory a leaked guard keeps forever, for the pin check at the end.
    leaked_buffers: Vec<(usize, usize)>,
    /// Buffers the last operation got back, alive until the checks after it.
    returned: Vec<DmaBuffer>,
    model: Model,
    log: Vec<String>,
    seed: u64,
    /// The kernel predates `IOMMU_IOAS_MAP_FILE` (6.13): every `map_file` must be refused, exactly,
    /// and the model stays as it was.
    no_map_file: bool,
}

impl Harness {
    fn new(seed: u64) -> Harness {
        let iommufd = Iommufd::open().expect("open /dev/iommu");
        let ioas = iommufd.alloc_ioas().unwrap();
        let dev = MockDevice::new(&ioas).expect("mock device (CONFIG_IOMMUFD_TEST)");
        // A copying access (no pinning: it adds no alignment of its own) to probe IOVAs.
        let access = MockAccess::new(&ioas).unwrap();
        let ranges = ioas.iova_ranges().unwrap();
        // The attached domain reserves everything outside its aperture (iopt_table_add_domain).
        let reserved =
            holes(0, u64::MAX, &ranges.ranges.iter().map(|r| (r.start, r.last)).collect::<Vec<_>>());
        assert_eq!(ranges.ranges, vec![testing::APERTURE], "a mock domain's IOAS spans its aperture");
        let model = Model {
            areas: BTreeMap::new(),
            allowed: Vec::new(),
            reserved,
            huge_disabled: !ioas.huge_pages().unwrap(),
            domain_alignment: ranges.alignment,
        };
        Harness {
            iommufd,
            ioas,
            dev,
            access,
            file: memfd_file(FILE_PAGES, false),
            guards: BTreeMap::new(),
            buffers: HashMap::new(),
            next_buffer: 0,
            leaked_buffers: Vec::new(),
            returned: Vec::new(),
            model,
            log: Vec::new(),
            seed,
            no_map_file: common::predates("6.13"),
        }
    }

    #[track_caller]
    fn diverged(&self, step: usize, what: String) -> ! {
        let mut log = String::new();
        for line in &self.log {
            log.push_str("\n    ");
            log.push_str(line);
        }
        panic!(
            "model divergence: seed {:#x}, op {step}: {what}\n  model areas: {:#x?}\n  allowed: {:#x?}\n  \
             op log:{log}",
            self.seed,
            self.model.areas.values().map(|a| (a.iova, a.len, a.guarded)).collect::<Vec<_>>(),
            self.model.allowed,
        );
    }

    fn window_iova(&self, rng: &mut Rng) -> u64 {
        testing::APERTURE.start + rng.below(WINDOW_PAGES) * page()
    }

    fn random_access(rng: &mut Rng) -> Access {
        match rng.below(4) {
            0 => Access::READ,
            1 => Access::WRITE,
            _ => Access::READ_WRITE,
        }
    }

    /// A fixed IOVA (often near existing areas, sometimes misaligned) or automatic placement.
    fn random_at(&self, rng: &mut Rng) -> Option<u64> {
        if rng.chance(40) {
            return None;
        }
        let areas: Vec<Area> = self.model.areas.values().copied().collect();
        let mut iova = match rng.pick(&areas) {
            Some(a) if rng.chance(40) => {
                let delta = rng.below(2 * MAX_MAP_PAGES + 1) * page();
                (a.iova + delta).saturating_sub(MAX_MAP_PAGES * page())
            }
            _ => self.window_iova(rng),
        };
        if rng.chance(5) {
            // Half a system page: the mock domain would take it (2 KiB pages), the SDK refuses it.
            iova += page() / 2;
        }
        if rng.chance(3) {
            // Below the aperture: reserved by the domain.
            iova = testing::APERTURE.start - 4 * page();
        }
        Some(iova)
    }

    fn random_op(&self, rng: &mut Rng) -> Op {
        let guarded: Vec<u64> = self.guards.keys().copied().collect();
        let crowded = self.model.areas.len() > MAX_AREAS;
        loop {
            let roll = rng.below(100);
            let op = match roll {
                0..=21 if !crowded => Op::MapBuffer {
                    pages: 1 + rng.below(MAX_MAP_PAGES),
                    at: self.random_at(rng),
                    access: Self::random_access(rng),
                },
                22..=31 if !crowded => {
                    let pages = 1 + rng.below(MAX_MAP_PAGES);
                    Op::MapFile {
                        offset_pages: if rng.chance(30) { 0 } else { rng.below(FILE_PAGES - pages + 1) },
                        pages,
                        at: self.random_at(rng),
                        access: Self::random_access(rng),
                    }
                }
                32..=41 if !crowded => match rng.pick(&guarded) {
                    Some(&src) => Op::Copy { src, at: self.random_at(rng), access: Self::random_access(rng) },
                    None => continue,
                },
                42..=58 => match rng.pick(&guarded) {
                    Some(&iova) => Op::Unmap { iova },
                    None => continue,
                },
                59..=66 => match rng.pick(&guarded) {
                    Some(&iova) => Op::Leak { iova },
                    None => continue,
                },
                67..=86 => self.random_unmap_range(rng),
                87..=88 => Op::UnmapAll,
                89..=93 => Op::Allow(self.random_allowed(rng)),
                94..=96 => {
                    let start = self.window_iova(rng);
                    let len = (1 + rng.below(3)) * page();
                    Op::Reserve((start, start + len - 1))
                }
                97..=99 => {
                    let enable = if self.model.huge_disabled { rng.chance(80) } else { rng.chance(20) };
                    Op::HugePages(enable)
                }
                _ => continue,
            };
            return op;
        }
    }

    /// Ranges that cover, split and straddle areas, or fall in gaps.
    fn random_unmap_range(&self, rng: &mut Rng) -> Op {
        let mut areas: Vec<Area> = self.model.areas.values().copied().collect();
        // Mostly around leaked areas: only those can be removed by range.
        let leaked: Vec<Area> = areas.iter().filter(|a| !a.guarded).copied().collect();
        if !leaked.is_empty() && rng.chance(70) {
            areas = leaked;
        }
        let p = page();
        let (start, end) = match (rng.pick(&areas), rng.pick(&areas)) {
            (Some(a), Some(b)) => {
                let (a, b) = if a.iova <= b.iova { (a, b) } else { (b, a) };
                match rng.below(6) {
                    // Exactly one area.
                    0 => (a.iova, a.iova + a.len),
                    // Several areas, with slack on both sides.
                    1 => (a.iova.saturating_sub(rng.below(3) * p), b.iova + b.len + rng.below(3) * p),
                    // A piece inside an area: areas are never split by IOMMU_IOAS_UNMAP.
                    2 => (a.iova + p.min(a.len - p), a.iova + a.len),
                    // Straddling the start of an area.
                    3 => (a.iova.saturating_sub(p), a.iova + p),
                    // From one area's start into the middle of another.
                    4 => (a.iova, b.iova + b.len.div_ceil(2 * p) * p),
                    _ => {
                        let s = self.window_iova(rng);
                        (s, s + (1 + rng.below(16)) * p)
                    }
                }
            }
            _ => {
                let s = self.window_iova(rng);
                (s, s + (1 + rng.below(16)) * p)
            }
        };
        let mut len = end.saturating_sub(start);
        if rng.chance(3) {
            len = 0;
        }
        Op::UnmapRange { start, len }
    }

    fn random_allowed(&self, rng: &mut Rng) -> Vec<(u64, u64)> {
        let n = rng.below(4);
        (0..n)
            .map(|_| {
                let start = if rng.chance(5) { 0x10_0000 } else { self.window_iova(rng) };
                let last = match rng.below(20) {
                    // A single IOVA: the kernel wants start < last.
                    0 => start,
                    _ => start + (1 + rng.below(32)) * page() - 1,
                };
                (start, last)
            })
            .collect()
    }

    /// Predicts `op`'s outcome (and the value it returns) and applies it to the model.
    fn predict(&mut self, op: &Op) -> (Vec<Class>, Option<u64>) {
        let p = page();
        let m = &mut self.model;
        match op {
            Op::MapBuffer { .. } | Op::MapFile { .. } | Op::Copy { .. } => {
                unreachable!("predicted with the buffer")
            }
            Op::Unmap { iova } => {
                m.areas.remove(iova);
                (vec![Class::Ok], None)
            }
            Op::Leak { iova } => {
                if let Some(a) = m.areas.get_mut(iova) {
                    a.guarded = false;
                }
                (vec![Class::Ok], None)
            }
            &Op::UnmapRange { start, len } => {
                if len == 0 || start % p != 0 || len % p != 0 {
                    return (vec![Class::Refused], None);
                }
                let r = (start, start + len - 1);
                let hit = m.areas_in(r);
                if hit.iter().any(|a| a.guarded) {
                    return (vec![Class::Refused], None);
                }
                // iopt_unmap_iova_range walks the areas in IOVA order and unmaps each one that lies
                // fully inside the range; the first one that sticks out ends the walk with ENOENT,
                // after the ones before it are gone. IOMMU_IOAS_UNMAP never splits an area (only the
                // VFIO compatibility path does). The SDK therefore refuses, before any ioctl, a range
                // that cuts a leaked area it knows of, so nothing is unmapped half way.
                if hit.iter().any(|a| a.iova < r.0 || a.last() > r.1) {
                    return (vec![Class::Refused], None);
                }
                // Unmapping nothing is ENOENT (iommufd_ioas_unmap), not a zero-length success.
                if hit.is_empty() {
                    return (vec![Class::Errno(Errno::NOENT)], None);
                }
                let mut unmapped = 0;
                for a in &hit {
                    m.areas.remove(&a.iova);
                    unmapped += a.len;
                }
                (vec![Class::Ok], Some(unmapped))
            }
            Op::UnmapAll => {
                if m.areas.values().any(|a| a.guarded) {
                    return (vec![Class::Refused], None);
                }
                let total = m.areas.values().map(|a| a.len).sum();
                m.areas.clear();
                (vec![Class::Ok], Some(total))
            }
            Op::Allow(ranges) => {
                // iommufd_ioas_load_iovas: each range needs start < last (a single IOVA is EINVAL); the
                // SDK refuses such a range itself. Ranges must not overlap an earlier one either.
                if ranges.iter().any(|&(s, l)| s >= l) {
                    return (vec![Class::Refused], None);
                }
                for (i, &a) in ranges.iter().enumerate() {
                    if ranges[..i].iter().any(|&b| overlaps(a, b)) {
                        return (vec![Class::Errno(Errno::INVAL)], None);
                    }
                }
                // iopt_set_allow_iova: no allowed range may touch a reserved one. Areas outside the
                // allowed ranges are fine: they restrict only automatic placement.
                if ranges.iter().any(|&r| m.reserved_hit(r)) {
                    return (vec![Class::Errno(Errno::ADDRINUSE)], None);
                }
                m.allowed = ranges.clone();
                (vec![Class::Ok], None)
            }
            &Op::Reserve(r) => {
                // iopt_reserve_iova: refused over an area or an allowed range; overlapping another
                // reservation is fine.
                if !m.areas_in(r).is_empty() || m.allowed.iter().any(|&a| overlaps(a, r)) {
                    return (vec![Class::Errno(Errno::ADDRINUSE)], None);
                }
                m.reserved.push(r);
                (vec![Class::Ok], None)
            }
            &Op::HugePages(enable) => {
                // iopt_disable_large_pages: refused once a domain is attached and an area exists;
                // enabling always works. Either recomputes the alignment.
                if !enable && !m.huge_disabled && !m.areas.is_empty() {
                    return (vec![Class::Errno(Errno::INVAL)], None);
                }
                m.huge_disabled = !enable;
                (vec![Class::Ok], None)
            }
        }
    }

    /// Predicts a new mapping of `len` bytes whose placement follows `addr`, at `at`.
    fn predict_map(
        &self,
        at: Option<u64>,
        addr: u64,
        len: u64,
        writable: bool,
        write: bool,
    ) -> (Vec<Class>, Option<u64>) {
        let p = page();
        let m = &self.model;
        let iova = match at {
            Some(iova) => {
                if iova % p != 0 {
                    return (vec![Class::Refused], None);
                }
                let r = (iova, iova + len - 1);
                // The SDK knows every area here (guarded or leaked) and refuses an overlap before the
                // ioctl; the kernel would answer EEXIST (iopt_check_iova).
                if !m.areas_in(r).is_empty() {
                    return (vec![Class::Refused], None);
                }
                // iopt_check_iova: a reserved range is EINVAL.
                if m.reserved_hit(r) {
                    return (vec![Class::Errno(Errno::INVAL)], None);
                }
                iova
            }
            None => match m.auto_iova(addr, len) {
                Some(iova) => iova,
                None => return (vec![Class::Errno(Errno::NOSPC)], None),
            },
        };
        // iopt_insert_area, after placement: a writable mapping of pages that were pinned read-only
        // (a copy of a mapping made without WRITE) is EPERM.
        if write && !writable {
            return (vec![Class::Errno(Errno::PERM)], None);
        }
        (vec![Class::Ok], Some(iova))
    }

    fn check_class<T>(&self, step: usize, r: &iommufd::Result<T>, expect: &[Class]) {
        let got = class(r);
        if !expect.contains(&got) {
            let detail = match r {
                Err(e) => format!("{e}"),
                Ok(_) => "Ok".to_string(),
            };
            self.diverged(step, format!("expected one of {expect:?}, the SDK returned {got:?} ({detail})"));
        }
    }

    /// Runs one operation through the SDK and the model; returns the areas it removed.
    fn apply(&mut self, step: usize, op: &Op) -> Vec<Area> {
        let before: Vec<Area> = self.model.areas.values().copied().collect();
        let mut entry = format!("{step}: {op:x?}");
        match op {
            &Op::MapBuffer { pages, at, access } => {
                let len = pages * page();
                let mut buffer = DmaBuffer::new(len as usize).unwrap();
                buffer.as_mut_slice().fill(step as u8);
                let va = buffer.as_slice().as_ptr() as usize;
                let (expect, iova) = self.predict_map(at, va as u64, len, true, false);
                let r = self.ioas.map(buffer, at.map_or(Iova::Auto, Iova::Fixed), access);
                entry.push_str(&format!(" va {va:#x} => {:?}", r.as_ref().map(|m| m.iova())));
                self.log.push(entry);
                self.check_class(step, &r, &expect);
                if let Ok(mapping) = r {
                    self.check_iova(step, mapping.iova(), iova);
                    let id = self.next_buffer;
                    self.next_buffer += 1;
                    self.buffers.insert(id, BufferRefs { live: 1, leaked: 0 });
                    let area = Area {
                        iova: mapping.iova(),
                        len,
                        backing: Backing::Buffer { id, va },
                        writable: access.contains(Access::WRITE),
                        guarded: true,
                        access,
                    };
                    self.model.areas.insert(area.iova, area);
                    self.guards.insert(area.iova, Guard::Buffer(mapping));
                }
            }
            &Op::MapFile { offset_pages, pages, at, access } => {
                let (offset, len) = (offset_pages * page(), pages * page());
                let (expect, iova) = self.predict_map(at, offset, len, true, false);
                let r = self.ioas.map_file(
                    self.file.fd.as_fd(),
                    offset,
                    len,
                    at.map_or(Iova::Auto, Iova::Fixed),
                    access,
                );
                entry.push_str(&format!(" => {:?}", r.as_ref().map(|m| m.iova())));
                self.log.push(entry);
                if self.no_map_file {
                    // Arguments the crate refuses before any ioctl are refused first, as the model says.
                    if matches!(r, Err(iommufd::Error::InvalidArgument { .. })) {
                        self.check_class(step, &r, &expect);
                    } else {
                        common::assert_unsupported(&r, "IOMMU_IOAS_MAP_FILE", "6.13", iommufd::Errno::NOTTY);
                    }
                    return Vec::new();
                }
                self.check_class(step, &r, &expect);
                if let Ok(mapping) = r {
                    self.check_iova(step, mapping.iova(), iova);
                    let area = Area {
                        iova: mapping.iova(),
                        len,
                        backing: Backing::File { offset },
                        writable: access.contains(Access::WRITE),
                        guarded: true,
                        access,
                    };
                    self.model.areas.insert(area.iova, area);
                    self.guards.insert(area.iova, Guard::File(mapping));
                }
            }
            &Op::Copy { src, at, access } => {
                let src_area = self.model.areas[&src];
                let (expect, iova) = self.predict_map(
                    at,
                    src_area.addr(),
                    src_area.len,
                    src_area.writable,
                    access.contains(Access::WRITE),
                );
                let at = at.map_or(Iova::Auto, Iova::Fixed);
                let (r, guard) = match &self.guards[&src] {
                    Guard::Buffer(m) => {
                        let r = self.ioas.copy(m, at, access);
                        (class(&r), r.ok().map(Guard::Buffer))
                    }
                    Guard::File(m) => {
                        let r = self.ioas.copy(m, at, access);
                        (class(&r), r.ok().map(Guard::File))
                    }
                };
                let new_iova = guard.as_ref().map(|g| match g {
                    Guard::Buffer(m) => m.iova(),
                    Guard::File(m) => m.iova(),
                });
                entry.push_str(&format!(" => {r:?} at {new_iova:x?}"));
                self.log.push(entry);
                if !expect.contains(&r) {
                    self.diverged(step, format!("expected one of {expect:?}, the SDK returned {r:?}"));
                }
                if let (Some(guard), Some(new_iova)) = (guard, new_iova) {
                    self.check_iova(step, new_iova, iova);
                    if let Backing::Buffer { id, .. } = src_area.backing {
                        self.buffers.entry(id).or_default().live += 1;
                    }
                    let area = Area { iova: new_iova, guarded: true, access, ..src_area };
                    self.model.areas.insert(new_iova, area);
                    self.guards.insert(new_iova, guard);
                }
            }
            &Op::Unmap { iova } => {
                let area = self.model.areas[&iova];
                let (expect, _) = self.predict(op);
                let guard = self.guards.remove(&iova).expect("a guard for every guarded area");
                match guard {
                    Guard::Buffer(m) => {
                        let Backing::Buffer { id, .. } = area.backing else { unreachable!() };
                        let refs = self.buffers.get_mut(&id).expect("buffer refs");
                        // The buffer comes back only from the last mapping that holds it, and never
                        // once a leaked guard holds it too.
                        let sole = refs.live == 1 && refs.leaked == 0;
                        refs.live -= 1;
                        let r = closed(m.unmap());
                        entry.push_str(&format!(" => {:?}", r.as_ref().map(|b| b.is_some())));
                        self.log.push(entry);
                        self.check_class(step, &r, &expect);
                        if let Ok(back) = r {
                            if back.is_some() != sole {
                                self.diverged(
                                    step,
                                    format!("unmap gave the buffer back: {}", back.is_some()),
                                );
                            }
                            // Kept until the checks after this operation, so its pages can be
                            // looked up there.
                            self.returned.extend(back);
                        }
                    }
                    Guard::File(m) => {
                        let r = closed(m.unmap());
                        entry.push_str(&format!(" => {r:?}"));
                        self.log.push(entry);
                        self.check_class(step, &r, &expect);
                    }
                }
            }
            &Op::Leak { iova } => {
                let area = self.model.areas[&iova];
                self.predict(op);
                let range = match self.guards.remove(&iova).expect("a guard for every guarded area") {
                    Guard::Buffer(m) => m.leak(),
                    Guard::File(m) => m.leak(),
                };
                if let Backing::Buffer { id, va } = area.backing {
                    let refs = self.buffers.get_mut(&id).expect("buffer refs");
                    refs.live -= 1;
                    refs.leaked += 1;
                    self.leaked_buffers.push((va, area.len as usize));
                }
                entry.push_str(&format!(" => {range:x?}"));
                self.log.push(entry);
                if range != IovaRange::from_len(area.iova, area.len).unwrap() {
                    self.diverged(step, format!("leak returned {range:x?}"));
                }
            }
            &Op::UnmapRange { start, len } => {
                let (expect, bytes) = self.predict(op);
                let r = self.ioas.unmap_range(start, len);
                entry.push_str(&format!(" => {r:x?}"));
                self.log.push(entry);
                self.check_class(step, &r, &expect);
                if let Ok(n) = r {
                    if Some(n) != bytes {
                        self.diverged(
                            step,
                            format!("unmap_range unmapped {n:#x} bytes, the model {bytes:x?}"),
                        );
                    }
                }
            }
            Op::UnmapAll => {
                let (expect, bytes) = self.predict(op);
                let r = self.ioas.unmap_all();
                entry.push_str(&format!(" => {r:x?}"));
                self.log.push(entry);
                self.check_class(step, &r, &expect);
                if let Ok(n) = r {
                    if Some(n) != bytes {
                        self.diverged(step, format!("unmap_all unmapped {n:#x} bytes, the model {bytes:x?}"));
                    }
                }
            }
            Op::Allow(ranges) => {
                let (expect, _) = self.predict(op);
                let raw: Vec<IovaRange> =
                    ranges.iter().map(|&(start, last)| IovaRange { start, last }).collect();
                let r = self.ioas.allow_iovas(&raw);
                entry.push_str(&format!(" => {r:?}"));
                self.log.push(entry);
                self.check_class(step, &r, &expect);
            }
            &Op::Reserve((start, last)) => {
                let (expect, _) = self.predict(op);
                let r = testing::add_reserved(&self.ioas, IovaRange { start, last });
                entry.push_str(&format!(" => {r:?}"));
                self.log.push(entry);
                self.check_class(step, &r, &expect);
            }
            &Op::HugePages(enable) => {
                let (expect, _) = self.predict(op);
                let r = self.ioas.set_huge_pages(enable);
                entry.push_str(&format!(" => {r:?}"));
                self.log.push(entry);
                self.check_class(step, &r, &expect);
            }
        }
        before.into_iter().filter(|a| !self.model.areas.contains_key(&a.iova)).collect()
    }

    fn check_iova(&self, step: usize, got: u64, predicted: Option<u64>) {
        if Some(got) != predicted {
            self.diverged(
                step,
                format!("the mapping landed at {got:#x}, the model predicted {predicted:x?}"),
            );
        }
    }

    fn va_of(&self, area: &Area) -> *const u8 {
        match area.backing {
            Backing::Buffer { va, .. } => va as *const u8,
            Backing::File { offset } => self.file.va.wrapping_add(offset as usize),
        }
    }

    /// Compares the kernel with the model after `op`.
    fn verify(&self, step: usize, op: &Op, removed: &[Area], rng: &mut Rng) {
        let hwpt = self.dev.hwpt_id();
        for area in self.model.areas.values() {
            if let Err(e) =
                testing::check_map(&self.iommufd, hwpt, area.iova, self.va_of(area), area.len as usize)
            {
                self.diverged(
                    step,
                    format!("area {:#x}+{:#x} does not translate to its memory: {e}", area.iova, area.len),
                );
            }
        }
        for area in removed {
            // The domain no longer translates the range to the area's memory (which still exists:
            // file pages, memory a leaked or live guard holds, or a buffer just given back).
            let r = testing::check_map(&self.iommufd, hwpt, area.iova, self.va_of(area), area.len as usize);
            if class(&r) != Class::Errno(Errno::INVAL) {
                self.diverged(
                    step,
                    format!("removed area {:#x}+{:#x}: check_map gives {r:?}", area.iova, area.len),
                );
            }
            for iova in [area.iova, area.last()] {
                let got = class(&self.access.read(iova, &mut [0u8; 1]));
                if got != Class::Errno(Errno::NOENT) {
                    self.diverged(
                        step,
                        format!(
                            "removed area {:#x}+{:#x}: an access read at {iova:#x} gives {got:?}",
                            area.iova, area.len
                        ),
                    );
                }
            }
        }
        for _ in 0..PROBES_PER_OP {
            let iova = self.window_iova(rng) + rng.below(page());
            let got = class(&self.access.read(iova, &mut [0u8; 1]));
            // iommufd_access_rw: an IOVA no area covers is ENOENT; reading an area mapped without
            // READ is EPERM.
            let expect = match self.model.covering(iova) {
                None => Class::Errno(Errno::NOENT),
                Some(a) if a.access.contains(Access::READ) => Class::Ok,
                Some(_) => Class::Errno(Errno::PERM),
            };
            if got != expect {
                self.diverged(
                    step,
                    format!("an access read at IOVA {iova:#x} gives {got:?}, the model expects {expect:?}"),
                );
            }
        }
        if matches!(op, Op::Allow(_) | Op::Reserve(_) | Op::HugePages(_)) {
            let ranges = self.ioas.iova_ranges().unwrap();
            let got: Vec<(u64, u64)> = ranges.ranges.iter().map(|r| (r.start, r.last)).collect();
            if got != self.model.usable() || ranges.alignment != self.model.alignment() {
                self.diverged(
                    step,
                    format!(
                        "IOVA ranges {got:#x?} alignment {:#x}; the model has {:#x?} alignment {:#x}",
                        ranges.alignment,
                        self.model.usable(),
                        self.model.alignment()
                    ),
                );
            }
            if self.ioas.huge_pages().unwrap() == self.model.huge_disabled {
                self.diverged(step, "the huge-page option differs".to_string());
            }
        }
    }

    /// Tears everything down and checks that no page stays pinned.
    fn finish(self) {
        let Harness { iommufd, ioas, dev, access, file, guards, leaked_buffers, seed, .. } = self;
        drop(access);
        drop(guards);
        drop(dev);
        let ioas_id = ioas.id();
        drop(ioas);
        // SAFETY: every handle of the IOAS is gone; the destroy only probes that the id is free.
        let r = unsafe { iommufd.destroy_raw(ioas_id) };
        assert_eq!(
            r.err().and_then(|e| e.errno()),
            Some(Errno::NOENT),
            "seed {seed:#x}: the IOAS outlived its handles"
        );
        testing::check_refs(&iommufd, file.va, file.len, 0)
            .unwrap_or_else(|e| panic!("seed {seed:#x}: file pages still pinned: {e}"));
        // Leaked guards leak their memory (never freed), but the kernel unpinned it with the IOAS.
        for (va, len) in leaked_buffers {
            testing::check_refs(&iommufd, va as *const u8, len, 0)
                .unwrap_or_else(|e| panic!("seed {seed:#x}: leaked buffer {va:#x} still pinned: {e}"));
        }
    }
}

#[test]
#[ignore = "needs /dev/iommu with CONFIG_IOMMUFD_TEST: run by cargo xtask vm-test"]
fn model_random_operation_sequences() {
    if common::mock_devices_unavailable() {
        return;
    }
    let started = Instant::now();
    let mut counts: BTreeMap<&'static str, (u32, u32)> = BTreeMap::new();
    for seed in SEEDS {
        let mut h = Harness::new(seed);
        let mut rng = Rng::new(seed);
        for step in 0..OPS_PER_SEED {
            let op = h.random_op(&mut rng);
            let removed = h.apply(step, &op);
            h.verify(step, &op, &removed, &mut rng);
            h.returned.clear();
            let name = match op {
                Op::MapBuffer { .. } => "map",
                Op::MapFile { .. } => "map_file",
                Op::Copy { .. } => "copy",
                Op::Unmap { .. } => "unmap",
                Op::Leak { .. } => "leak",
                Op::UnmapRange { .. } => "unmap_range",
                Op::UnmapAll => "unmap_all",
                Op::Allow(_) => "allow_iovas",
                Op::Reserve(_) => "add_reserved",
                Op::HugePages(_) => "set_huge_pages",
            };
            let ok = h.log.last().is_some_and(|l| !l.contains("Err"));
            let c = counts.entry(name).or_default();
            c.0 += 1;
            c.1 += ok as u32;
        }
        h.finish();
        assert!(
            started.elapsed().as_secs() < MODEL_BUDGET_SECS,
            "the model run took over {MODEL_BUDGET_SECS} s (after seed {seed:#x})"
        );
    }
    report(&format!(
        "model: {} seeds x {OPS_PER_SEED} ops in {:.1} s, no divergence; ops (count, succeeded): {counts:?}",
        SEEDS.len(),
        started.elapsed().as_secs_f64()
    ));
}

// Single-operation tests of kernel behaviours the model relies on (after the kernel's own selftests in
// tools/testing/selftests/iommu/iommufd.c).

fn mock_ioas() -> (Iommufd, Ioas, MockDevice) {
    let iommufd = Iommufd::open().expect("open /dev/iommu");
    let ioas = iommufd.alloc_ioas().unwrap();
    let dev = MockDevice::new(&ioas).expect("mock device (CONFIG_IOMMUFD_TEST)");
    (iommufd, ioas, dev)
}

/// A buffer of `pages` pages, touched so its pages exist, and its address.
fn buffer(pages: u64) -> (DmaBuffer, *const u8) {
    let mut buffer = DmaBuffer::new((pages * page()) as usize).unwrap();
    for (i, chunk) in buffer.as_mut_slice().chunks_mut(page_size()).enumerate() {
        chunk.fill((i as u8).wrapping_add(1));
    }
    let va = buffer.as_slice().as_ptr();
    (buffer, va)
}

#[track_caller]
fn errno_of<T: std::fmt::Debug>(r: iommufd::Result<T>) -> Errno {
    match r {
        Err(e) => e.errno().unwrap_or_else(|| panic!("expected a kernel error, got {e}")),
        Ok(v) => panic!("expected a kernel error, got Ok({v:?})"),
    }
}

/// Leaks a mapping of `pages` pages at `iova`: an ordinary kernel area that `unmap_range` may remove.
fn leaked_area(ioas: &Ioas, iova: u64, pages: u64) -> (u64, *const u8) {
    let (buf, va) = buffer(pages);
    let range = ioas.map(buf, Iova::Fixed(iova), Access::READ_WRITE).unwrap().leak();
    (range.start, va)
}

#[test]
#[ignore = "needs /dev/iommu with CONFIG_IOMMUFD_TEST: run by cargo xtask vm-test"]
fn unmap_range_removes_only_fully_contained_areas() {
    if common::mock_devices_unavailable() {
        return;
    }
    let (iommufd, ioas, dev) = mock_ioas();
    let p = page();
    let base = testing::APERTURE.start + 4 * p;
    let areas: Vec<(u64, *const u8)> = (0..4).map(|i| leaked_area(&ioas, base + i * 16 * p, 8)).collect();
    let all_there = |n: usize| {
        for &(iova, va) in &areas[4 - n..] {
            testing::check_map(&iommufd, dev.hwpt_id(), iova, va, (8 * p) as usize).unwrap();
        }
    };

    // A range that sticks out of the first area, or of the last, or lies inside one: the kernel would
    // unmap the areas before the first one it cannot take whole and then fail with ENOENT (it never
    // splits an area), so the SDK refuses such a range before the ioctl, and nothing is unmapped.
    for (start, len) in
        [(base - 4 * p, 8 * p), (base + 3 * 16 * p + 4 * p, 8 * p), (base + p, p), (base, 16 * p + 4 * p)]
    {
        let r = ioas.unmap_range(start, len);
        assert!(matches!(r, Err(Error::InvalidArgument { .. })), "{start:#x}+{len:#x}: {r:?}");
        all_there(4);
    }
    let access = MockAccess::new(&ioas).unwrap();
    // The first area whole: fine.
    assert_eq!(ioas.unmap_range(base, 16 * p).unwrap(), 8 * p);
    assert_eq!(errno_of(access.read(base, &mut [0u8; 1])), Errno::NOENT, "the first area was unmapped");
    all_there(3);

    // Gaps around fully contained areas do not matter: everything inside goes, and the length says so.
    let unmapped = ioas.unmap_range(base - 4 * p, 3 * 16 * p + 8 * p + 4 * p).unwrap();
    assert_eq!(unmapped, 3 * 8 * p);
    for &(iova, _) in &areas {
        assert_eq!(errno_of(access.read(iova, &mut [0u8; 1])), Errno::NOENT);
    }
    // Nothing left to unmap in the range: ENOENT, not a zero-length success.
    assert_eq!(errno_of(ioas.unmap_range(base - 4 * p, 64 * p)), Errno::NOENT);
    // unmap_all of an empty IOAS succeeds with zero bytes.
    assert_eq!(ioas.unmap_all().unwrap(), 0);
}

#[test]
#[ignore = "needs /dev/iommu with CONFIG_IOMMUFD_TEST: run by cargo xtask vm-test"]
fn automatic_iova_alignment_follows_length_and_address() {
    if common::mock_devices_unavailable() {
        return;
    }
    let (iommufd, ioas, dev) = mock_ioas();
    let p = page();
    let file = memfd_file(16, false);
    let mut mappings = Vec::new();
    let mut files: Vec<Mapping<FileMemory>> = Vec::new();
    for pages in 1..=10u64 {
        let len = pages * p;
        let (buf, va) = buffer(pages);
        let m = ioas.map(buf, Iova::Auto, Access::READ_WRITE).unwrap();
        // The kernel keeps the alignment of the user address, capped by the length rounded up to a
        // power of two and by HPAGE_SIZE. The kernel's selftest checks alignment to the length's lowest
        // set bit, which holds only for its 2 MiB-aligned buffer: a buffer at an address aligned to
        // 4 KiB gets an IOVA aligned to 4 KiB, whatever its length.
        let expect = len.next_power_of_two().min(1 << (va as u64).trailing_zeros()).min(HPAGE);
        assert_eq!(m.iova() % expect, 0, "{pages} pages at {:#x} (va {va:p})", m.iova());
        assert!(testing::APERTURE.contains(&m.range()), "{:#x?} is outside the aperture", m.range());
        testing::check_map(&iommufd, dev.hwpt_id(), m.iova(), va, len as usize).unwrap();
        mappings.push(m);

        // A file mapped from offset 0 has no address to follow: the length rounded up decides.
        let r = ioas.map_file(file.fd.as_fd(), 0, len, Iova::Auto, Access::READ);
        if common::unsupported_here(&r, "IOMMU_IOAS_MAP_FILE", "6.13", iommufd::Errno::NOTTY) {
            return;
        }
        let f = r.unwrap();
        assert_eq!(f.iova() % len.next_power_of_two(), 0, "file {pages} pages at {:#x}", f.iova());
        testing::check_map(&iommufd, dev.hwpt_id(), f.iova(), file.va, len as usize).unwrap();
        files.push(f);
    }
    drop(files);
    drop(mappings);

    // Placement avoids a reserved range.
    let reserved = IovaRange::from_len(testing::APERTURE.start + 4 * p, 100 * p).unwrap();
    testing::add_reserved(&ioas, reserved).unwrap();
    let mut mappings = Vec::new();
    for pages in 1..=10u64 {
        let m = ioas.map(buffer(pages).0, Iova::Auto, Access::READ_WRITE).unwrap();
        assert!(!m.range().overlaps(&reserved), "{:#x?} overlaps the reserved {reserved:#x?}", m.range());
        mappings.push(m);
    }
    drop(mappings);

    // An allowed range may not intersect a reserved one; one that does not confines placement.
    let overlapping =
        IovaRange { start: testing::APERTURE.start + p, last: testing::APERTURE.start + 600 * p - 1 };
    assert_eq!(errno_of(ioas.allow_iovas(&[overlapping])), Errno::ADDRINUSE);
    let allowed = IovaRange { start: reserved.last + 1 + p, last: reserved.last + 600 * p };
    ioas.allow_iovas(&[allowed]).unwrap();
    let mut mappings = Vec::new();
    for pages in 1..=10u64 {
        let m = ioas.map(buffer(pages).0, Iova::Auto, Access::READ_WRITE).unwrap();
        assert!(allowed.contains(&m.range()), "{:#x?} is outside the allowed {allowed:#x?}", m.range());
        mappings.push(m);
    }
}

#[test]
#[ignore = "needs /dev/iommu with CONFIG_IOMMUFD_TEST: run by cargo xtask vm-test"]
fn allowed_and_reserved_ranges_exclude_each_other() {
    if common::mock_devices_unavailable() {
        return;
    }
    let (_iommufd, ioas, _dev) = mock_ioas();
    let p = page();
    let base = testing::APERTURE.start;
    let allowed = IovaRange { start: base, last: base + 600 * p };
    let inside = IovaRange { start: base + p, last: base + 2 * p - 1 };

    // A reservation inside an allowed range is refused; once the restriction is lifted it works.
    ioas.allow_iovas(&[allowed]).unwrap();
    assert_eq!(errno_of(testing::add_reserved(&ioas, inside)), Errno::ADDRINUSE);
    ioas.allow_iovas(&[]).unwrap();
    testing::add_reserved(&ioas, inside).unwrap();
    // And now the allowed range is refused, because it intersects the reservation.
    assert_eq!(errno_of(ioas.allow_iovas(&[allowed])), Errno::ADDRINUSE);
    // The reservation shows in the usable ranges.
    let ranges = ioas.iova_ranges().unwrap().ranges;
    assert_eq!(
        ranges,
        vec![
            IovaRange { start: base, last: inside.start - 1 },
            IovaRange { start: inside.last + 1, last: testing::APERTURE.last }
        ]
    );
    // Nothing maps into a reserved range, even at a fixed IOVA (EINVAL, not EEXIST).
    assert_eq!(errno_of(ioas.map(buffer(1).0, Iova::Fixed(inside.start), Access::READ)), Errno::INVAL);
    // A reservation over a mapping is refused.
    let m = ioas.map(buffer(1).0, Iova::Fixed(base + 8 * p), Access::READ).unwrap();
    assert_eq!(errno_of(testing::add_reserved(&ioas, m.range())), Errno::ADDRINUSE);

    // Allowed ranges restrict only automatic placement: a fixed mapping outside them works.
    let elsewhere = IovaRange { start: base + 100 * p, last: base + 200 * p - 1 };
    ioas.allow_iovas(&[elsewhere]).unwrap();
    let fixed = ioas.map(buffer(1).0, Iova::Fixed(base + 300 * p), Access::READ).unwrap();
    assert!(!elsewhere.contains(&fixed.range()));
    // Overlapping allowed ranges, and a single-IOVA range, are invalid.
    let a = IovaRange { start: base + 10 * p, last: base + 20 * p - 1 };
    let b = IovaRange { start: base + 15 * p, last: base + 30 * p - 1 };
    assert_eq!(errno_of(ioas.allow_iovas(&[a, b])), Errno::INVAL);
    let single = IovaRange { start: base + 10 * p, last: base + 10 * p };
    let r = ioas.allow_iovas(&[single]);
    assert!(
        matches!(r, Err(Error::InvalidArgument { .. })),
        "a single-IOVA allowed range (the kernel's EINVAL): {r:?}"
    );
    // Ranges outside the aperture hit the domain's reservations.
    assert_eq!(errno_of(ioas.allow_iovas(&[IovaRange { start: 0x1000, last: 0x1fff }])), Errno::ADDRINUSE);
}

#[test]
#[ignore = "needs /dev/iommu with CONFIG_IOMMUFD_TEST: run by cargo xtask vm-test"]
fn huge_page_option_changes_the_iova_alignment() {
    if common::mock_devices_unavailable() {
        return;
    }
    let p = page();
    let iommufd = Iommufd::open().unwrap();

    // Without a domain the IOAS needs no alignment; disabling huge pages makes it PAGE_SIZE, and
    // works with mappings present (they are page aligned).
    let ioas = iommufd.alloc_ioas().unwrap();
    assert!(ioas.huge_pages().unwrap());
    assert_eq!(ioas.iova_ranges().unwrap().alignment, 1);
    let m = ioas.map(buffer(1).0, Iova::Fixed(testing::APERTURE.start), Access::READ).unwrap();
    ioas.set_huge_pages(false).unwrap();
    assert!(!ioas.huge_pages().unwrap());
    assert_eq!(ioas.iova_ranges().unwrap().alignment, p);
    ioas.set_huge_pages(true).unwrap();
    assert_eq!(ioas.iova_ranges().unwrap().alignment, 1);
    drop(m);

    // With a mock domain (2 KiB pages) the alignment is the domain's smallest page; disabling huge
    // pages raises it to PAGE_SIZE, but only while the IOAS has no mapping.
    let (_iommufd, ioas, _dev) = mock_ioas();
    assert_eq!(ioas.iova_ranges().unwrap().alignment, testing::PAGE_SIZE);
    let m = ioas.map(buffer(1).0, Iova::Auto, Access::READ).unwrap();
    assert_eq!(errno_of(ioas.set_huge_pages(false)), Errno::INVAL);
    assert!(ioas.huge_pages().unwrap());
    // Enabling (already enabled) always works.
    ioas.set_huge_pages(true).unwrap();
    closed(m.unmap()).unwrap();
    ioas.set_huge_pages(false).unwrap();
    assert_eq!(ioas.iova_ranges().unwrap().alignment, p);
    // Disabling twice is fine, even with a mapping now.
    let m = ioas.map(buffer(1).0, Iova::Auto, Access::READ).unwrap();
    ioas.set_huge_pages(false).unwrap();
    // Enabling again with a mapping present works and lowers the alignment back.
    ioas.set_huge_pages(true).unwrap();
    assert_eq!(ioas.iova_ranges().unwrap().alignment, testing::PAGE_SIZE);
    drop(m);
}

#[test]
#[ignore = "needs /dev/iommu with CONFIG_IOMMUFD_TEST: run by cargo xtask vm-test"]
fn iova_allocation_for_odd_lengths() {
    if common::mock_devices_unavailable() {
        return;
    }
    let (iommufd, ioas, dev) = mock_ioas();
    let p = page();
    let file = memfd_file(32, false);
    let mut ranges: Vec<IovaRange> = Vec::new();
    let mut keep: Vec<Mapping<FileMemory>> = Vec::new();
    let mut keep_buffers = Vec::new();
    for pages in (1..=17u64).step_by(2) {
        let len = pages * p;
        let r = ioas.map_file(file.fd.as_fd(), 0, len, Iova::Auto, Access::READ_WRITE);
        if common::unsupported_here(&r, "IOMMU_IOAS_MAP_FILE", "6.13", iommufd::Errno::NOTTY) {
            return;
        }
        let f = r.unwrap();
        assert_eq!(f.iova() % len.next_power_of_two(), 0, "{pages} pages at {:#x}", f.iova());
        testing::check_map(&iommufd, dev.hwpt_id(), f.iova(), file.va, len as usize).unwrap();
        let (buf, va) = buffer(pages);
        let m = ioas.map(buf, Iova::Auto, Access::READ_WRITE).unwrap();
        testing::check_map(&iommufd, dev.hwpt_id(), m.iova(), va, len as usize).unwrap();
        for r in [f.range(), m.range()] {
            assert!(ranges.iter().all(|o| !o.overlaps(&r)), "{r:#x?} overlaps one of {ranges:#x?}");
            ranges.push(r);
        }
        keep.push(f);
        keep_buffers.push(m);
    }
    // Lengths that are not whole pages are refused before the ioctl, at any placement.
    for len in [1, p / 2, p + 1, 3 * p - 1] {
        for at in [Iova::Auto, Iova::Fixed(testing::APERTURE.start + 512 * p)] {
            let r = ioas.map_file(file.fd.as_fd(), 0, len, at, Access::READ);
            assert!(matches!(r, Err(Error::InvalidArgument { .. })), "length {len:#x} at {at:?}: {r:?}");
        }
    }
}

#[test]
#[ignore = "needs /dev/iommu with CONFIG_IOMMUFD_TEST: run by cargo xtask vm-test"]
fn two_domains_on_one_ioas_hold_the_same_mappings() {
    if common::mock_devices_unavailable() {
        return;
    }
    let (iommufd, ioas, dev1) = mock_ioas();
    let p = page();
    let (buf_a, va_a) = buffer(4);
    let a = ioas.map(buf_a, Iova::Auto, Access::READ_WRITE).unwrap();

    // A second domain: an explicitly allocated HWPT on the same IOAS, with a device on it. It is
    // filled with what the IOAS already maps.
    let hwpt = Hwpt::alloc(&dev1, &ioas, HwptFlags::empty()).unwrap();
    let dev2 = MockDevice::new(&hwpt).unwrap();
    assert_ne!(dev1.hwpt_id(), dev2.hwpt_id());
    let domains = [dev1.hwpt_id(), dev2.hwpt_id()];
    for d in domains {
        testing::check_map(&iommufd, d, a.iova(), va_a, (4 * p) as usize).unwrap();
    }
    // A device attached to the IOAS itself shares the existing automatic domain.
    let dev3 = MockDevice::new(&ioas).unwrap();
    assert_eq!(dev3.hwpt_id(), dev1.hwpt_id(), "a compatible automatic domain is reused");

    // New mappings go into both; the pages are pinned once however many domains map them.
    let (buf_b, va_b) = buffer(2);
    let b = ioas.map(buf_b, Iova::Auto, Access::READ).unwrap();
    for d in domains {
        testing::check_map(&iommufd, d, b.iova(), va_b, (2 * p) as usize).unwrap();
    }
    testing::check_refs(&iommufd, va_a, (4 * p) as usize, 1).unwrap();

    // An unmap leaves both.
    let (a_iova, b_iova) = (a.iova(), b.iova());
    let buf_a = closed(a.unmap()).unwrap().expect("the buffer comes back");
    for d in domains {
        assert_eq!(errno_of(testing::check_map(&iommufd, d, a_iova, va_a, (4 * p) as usize)), Errno::INVAL);
        testing::check_map(&iommufd, d, b_iova, va_b, (2 * p) as usize).unwrap();
    }
    testing::check_refs(&iommufd, va_a, (4 * p) as usize, 0).unwrap();
    drop(buf_a);

    // Removing the second domain leaves the first intact.
    closed(dev2.close()).unwrap();
    drop(hwpt);
    testing::check_map(&iommufd, dev1.hwpt_id(), b_iova, va_b, (2 * p) as usize).unwrap();
    drop(b);
    drop(dev3);
}

#[test]
#[ignore = "needs /dev/iommu with CONFIG_IOMMUFD_TEST: run by cargo xtask vm-test"]
fn access_pin_and_rw_sweeps() {
    if common::mock_devices_unavailable() {
        return;
    }
    let (iommufd, ioas, _dev) = mock_ioas();
    let p = page();
    let pages = 4u64;
    let (buf, va) = buffer(pages);
    let m = ioas.map(buf, Iova::Fixed(testing::APERTURE.start), Access::READ_WRITE).unwrap();
    let iova = m.iova();

    // Pins of every page count from every start page, checked against the buffer's own pages.
    let pinning = MockAccess::with_pinning(&ioas).unwrap();
    let mut pins = 0;
    for first in 0..pages {
        for n in 1..=pages - first {
            let off = first * p;
            let id = pinning
                .pin_pages_checked(iova + off, n * p, Access::READ_WRITE, va.wrapping_add(off as usize))
                .unwrap_or_else(|e| panic!("pin {n} pages from page {first}: {e}"));
            pinning.unpin_pages(id).unwrap();
            pins += 1;
        }
    }
    assert_eq!(pins, pages * (pages + 1) / 2);
    // A pin past the mapping, or of nothing mapped, fails.
    assert!(pinning.pin_pages(iova + (pages - 1) * p, 2 * p, Access::READ).is_err());
    assert!(pinning.pin_pages(iova + pages * p, p, Access::READ).is_err());

    // Byte copies at offsets and lengths around page boundaries, through both kernel paths, checked
    // from the mapping's side in both directions.
    let mut access = MockAccess::new(&ioas).unwrap();
    let total = (pages * p) as usize;
    let ps = page_size();
    let offsets = [0, 1, ps - 1, ps, ps + 1, 2 * ps - 3];
    let lengths = [1, 2, 3, ps - 1, ps, ps + 1, 2 * ps + 5];
    let mut sweeps = 0;
    for slow in [false, true] {
        access.set_slow_path(slow);
        for &off in &offsets {
            for &len in &lengths {
                if off + len > total {
                    continue;
                }
                let data: Vec<u8> = (0..len).map(|i| (i * 7 + off + len + slow as usize) as u8).collect();
                access.write(iova + off as u64, &data).unwrap();
                let mut seen = vec![0u8; len];
                m.read_at(off, &mut seen).unwrap();
                assert_eq!(seen, data, "access write at {off:#x}+{len:#x} (slow {slow})");
                let back: Vec<u8> = data.iter().map(|b| !b).collect();
                m.write_at(off, &back).unwrap();
                let mut read = vec![0u8; len];
                access.read(iova + off as u64, &mut read).unwrap();
                assert_eq!(read, back, "access read at {off:#x}+{len:#x} (slow {slow})");
                sweeps += 1;
            }
        }
    }
    assert!(sweeps > 60, "{sweeps} copies");
    // A copy that runs past the mapping fails without copying a byte beyond it.
    assert!(access.read(iova + (pages * p) - 1, &mut [0u8; 2]).is_err());

    // Unmapping a range an access has pinned: the kernel asks the access to unpin first, so the unmap
    // succeeds and the pin is gone.
    let id = pinning.pin_pages(iova, pages * p, Access::READ_WRITE).unwrap();
    let buf = closed(m.unmap()).unwrap().expect("the buffer comes back");
    assert_eq!(errno_of(pinning.unpin_pages(id)), Errno::NOENT);
    testing::check_refs(&iommufd, va, total, 0).unwrap();
    drop(buf);
}

#[test]
#[ignore = "needs /dev/iommu with CONFIG_IOMMUFD_TEST and hugetlb pages: run by cargo xtask vm-test"]
fn huge_page_backed_mappings_translate_whole() {
    if common::mock_devices_unavailable() {
        return;
    }
    let (iommufd, ioas, dev) = mock_ioas();
    // A hugetlbfs memfd of one 2 MiB page (the VM reserves huge pages at boot).
    let file = memfd_file(HPAGE / page(), true);
    let r = ioas.map_file(file.fd.as_fd(), 0, HPAGE, Iova::Auto, Access::READ_WRITE);
    if common::unsupported_here(&r, "IOMMU_IOAS_MAP_FILE", "6.13", iommufd::Errno::NOTTY) {
        return;
    }
    let f = r.unwrap();
    // Offset 0 and a 2 MiB length: placed on a 2 MiB boundary, so the domain can use a huge IOPTE.
    assert_eq!(f.iova() % HPAGE, 0, "{:#x}", f.iova());
    testing::check_map(&iommufd, dev.hwpt_id(), f.iova(), file.va, HPAGE as usize).unwrap();
    // A copy of it is placed the same way and translates to the same memory.
    let c = ioas.copy(&f, Iova::Auto, Access::READ).unwrap();
    assert_eq!(c.iova() % HPAGE, 0);
    testing::check_map(&iommufd, dev.hwpt_id(), c.iova(), file.va, HPAGE as usize).unwrap();
    // An emulated device reaches the last byte of the huge page through either.
    let access = MockAccess::new(&ioas).unwrap();
    access.write(f.iova() + HPAGE - 1, &[0x77]).unwrap();
    let mut b = [0u8; 1];
    access.read(c.iova() + HPAGE - 1, &mut b).unwrap();
    assert_eq!(b[0], 0x77);
    // SAFETY: the byte is inside the shared mapping of the memfd, which stays mapped until `file` drops.
    assert_eq!(unsafe { file.va.add(HPAGE as usize - 1).read_volatile() }, 0x77);
    drop(access);
    drop(c);
    closed(f.unmap()).unwrap();

    // A part of the huge page (from an offset inside it) maps at page granularity.
    let part = ioas.map_file(file.fd.as_fd(), 4 * page(), 8 * page(), Iova::Auto, Access::READ).unwrap();
    testing::check_map(
        &iommufd,
        dev.hwpt_id(),
        part.iova(),
        file.va.wrapping_add(4 * page_size()),
        8 * page_size(),
    )
    .unwrap();
    drop(part);

    // Transparent huge pages behind a 4 MiB buffer: whatever the kernel backs it with, the domain
    // translates every page to it, and placement follows the buffer's address alignment.
    let (buf, va) = buffer(2 * HPAGE / page());
    let m = ioas.map(buf, Iova::Auto, Access::READ_WRITE).unwrap();
    let expect = (2 * HPAGE).min(1 << (va as u64).trailing_zeros()).min(HPAGE);
    assert_eq!(m.iova() % expect, 0, "{:#x} for va {va:p}", m.iova());
    testing::check_map(&iommufd, dev.hwpt_id(), m.iova(), va, 2 * HPAGE as usize).unwrap();
    drop(m);
    testing::check_refs(&iommufd, file.va, HPAGE as usize, 0).unwrap();
}
