//! IOMMU dirty tracking for live migration: [`Hwpt::set_dirty_tracking`], [`Hwpt::read_dirty`] and
//! the [`DirtyBitmap`] it fills.
//!
//! The migration protocol is documented on [`DirtyBitmap`] (module docs of private modules are not
//! rendered).

use std::os::fd::AsFd;

use iommufd_sys as sys;

use crate::error::{Errno, Error, Result};
use crate::hwpt::{Hwpt, HwptFlags, HwptKind};
use crate::ioas::IovaRange;
use crate::ioctl::{self, Sized32};

const SET_TRACKING: &str = "IOMMU_HWPT_SET_DIRTY_TRACKING";
const GET_BITMAP: &str = "IOMMU_HWPT_GET_DIRTY_BITMAP";

/// Which pages of an IOVA range were written by devices: one bit per `page_size` bytes, as returned
/// by [`Hwpt::read_dirty`].
///
/// Bit `i` stands for `[iova + i * page_size, iova + (i + 1) * page_size)`. The bits are held in
/// `u64` words, the layout the kernel writes (`IOMMU_HWPT_GET_DIRTY_BITMAP`).
///
/// An IOMMU with dirty tracking sets a dirty bit in its page table entries when a device writes
/// through them. For a VMM migrating a guest with an assigned device, those bits say which guest pages
/// the device wrote since the last look, so they are copied again.
///
/// # Migration: the read-and-clear protocol
///
/// 1. Allocate the device's paging page table with [`HwptFlags::DIRTY_TRACKING`] (the kernel answers
///    `EOPNOTSUPP` at allocation if the IOMMU cannot track) and attach the device to it.
/// 2. [`set_dirty_tracking(true)`](Hwpt::set_dirty_tracking) when migration starts. Enabling clears
///    every stale dirty bit first, so the first read reports only writes made after it.
/// 3. Pre-copy rounds: [`read_dirty(.., clear = true)`](Hwpt::read_dirty) over each mapped range
///    returns the pages written since the previous read *and* clears their bits; the kernel then
///    flushes the IOTLB so that the next write through a cleared entry sets its bit again. Copy those
///    pages; repeat until the dirty set is small.
/// 4. Stop the device (no more DMA), do a last read-and-clear, copy what it reports.
/// 5. [`set_dirty_tracking(false)`](Hwpt::set_dirty_tracking).
///
/// `clear = false` (`IOMMU_HWPT_GET_DIRTY_BITMAP_NO_CLEAR`) only reads. Use it right before unmapping
/// the range: the unmap discards the entries (and their dirty bits) anyway, so clearing would be wasted
/// work, but the bits must be read first or the writes they record are lost.
///
/// # Choosing the windows
///
/// The kernel reports dirtiness per IOMMU page-table entry, and the IOAS maps physically contiguous
/// memory with huge entries (2 MiB, 1 GiB) unless [`Ioas::set_huge_pages`](crate::Ioas::set_huge_pages)
/// turned them off before a device was attached. For a read of the window `[iova, iova + length)`:
///
/// - A dirty entry is reported whole: every page of it inside the window is dirty, even if the device
///   wrote one byte. Its bits past the window are dropped (the bitmap's buffer has room for them).
/// - An entry that **begins before** the window's start is not reported at all: the kernel sets no
///   bit before the window's first page, and drops the whole entry. With `clear` its dirty bit is
///   cleared all the same, so that write is lost to every later read.
/// - The kernel walks the mappings from the window's start and stops, still reporting success, at
///   the first IOVA that is not mapped: a window that begins in unmapped space reports nothing, and
///   one with a hole reports nothing past the hole.
///
/// So read whole mappings ([`Mapping::range`](crate::Mapping::range) of each, or runs of adjacent
/// ones), or windows that begin where a mapping begins or at a multiple of the largest IOMMU page the
/// IOAS may use; windows may end anywhere.
#[derive(Clone, PartialEq, Eq)]
pub struct DirtyBitmap {
    iova: u64,
    length: u64,
    page_size: u64,
    /// Number of valid bits: `length / page_size`.
    pages: u64,
    buf: KernelBitmap,
}

impl std::fmt::Debug for DirtyBitmap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DirtyBitmap")
            .field("range", &self.range())
            .field("page_size", &self.page_size)
            .field("dirty_pages", &self.dirty_pages())
            .finish()
    }
}

impl DirtyBitmap {
    /// An all-clean bitmap for `[iova, iova + length)` at `page_size` granularity, for
    /// [`Hwpt::read_dirty_into`] (which reuses it round after round).
    ///
    /// `page_size` must be a power of two (the kernel takes it as a shift), and `iova` and `length` its
    /// multiples; `length` must be non-zero and the range must not wrap. The kernel additionally wants
    /// `iova` and `length` aligned to the IOAS's IOVA alignment (`EINVAL` otherwise).
    ///
    /// The bitmap proper takes `length / page_size / 8` bytes, rounded up to whole `u64`s. The kernel
    /// records a dirty huge IOMMU page (2 MiB, 1 GiB) as a whole and so may set bits past the
    /// requested length, as far as the end of the bitmap pages it pinned, which can be one page past
    /// the bitmap's last: the buffer handed to it is page-aligned and has room for all of them (they
    /// are dropped; only the requested range is reported). It takes the bitmap rounded up to whole
    /// pages plus three: that page, a guard page after it, and alignment.
    pub fn new(iova: u64, length: u64, page_size: u64) -> Result<DirtyBitmap> {
        let words = bitmap_words(iova, length, page_size)?;
        let buf = KernelBitmap::new(GET_BITMAP, words)?;
        Ok(DirtyBitmap { iova, length, page_size, pages: length / page_size, buf })
    }

    /// The IOVA range covered.
    pub fn range(&self) -> IovaRange {
        // `new` checked that the range is non-empty and does not wrap.
        IovaRange { start: self.iova, last: self.iova + (self.length - 1) }
    }

    /// The bytes each bit stands for.
    pub fn page_size(&self) -> u64 {
        self.page_size
    }

    /// The number of pages (bits) covered.
    pub fn pages(&self) -> u64 {
        self.pages
    }

    /// The number of dirty pages.
    pub fn dirty_pages(&self) -> u64 {
        let (full, rest) = ((self.pages / 64) as usize, self.pages % 64);
        let words = self.buf.words();
        let mut n: u64 = words[..full].iter().map(|w| u64::from(w.count_ones())).sum();
        if rest != 0 {
            n += u64::from((words[full] & ((1u64 << rest) - 1)).count_ones());
        }
        n
    }

    /// True if no page is dirty.
    pub fn is_clean(&self) -> bool {
        self.dirty_pages() == 0
    }

    /// True if the page holding `iova` is dirty; false for an IOVA outside the range.
    pub fn is_dirty(&self, iova: u64) -> bool {
        if iova < self.iova || iova - self.iova >= self.length {
            return false;
        }
        let bit = (iova - self.iova) / self.page_size;
        self.buf.words()[(bit / 64) as usize] & (1 << (bit % 64)) != 0
    }

    /// The dirty IOVA ranges, in order, with adjacent dirty pages merged into one range.
    pub fn iter_ranges(&self) -> DirtyRanges<'_> {
        DirtyRanges { bitmap: self, next_bit: 0 }
    }

    /// The raw words: bit `i % 64` of word `i / 64` is page `i`. Bits past the last page are zero.
    pub fn as_words(&self) -> &[u64] {
        self.buf.words()
    }

    /// Marks every page clean.
    pub fn clear(&mut self) {
        self.buf.reset();
    }

    /// The whole buffer the kernel may write and the guard page after it.
    #[cfg(feature = "testing")]
    pub(crate) fn kernel_buffer(&self) -> (&[u64], &[u64]) {
        (self.buf.span(), self.buf.guard())
    }

    /// Index of the first bit at or after `from` that is set (`set`) or clear (`!set`), or
    /// `self.pages` if there is none before the end.
    fn find(&self, from: u64, set: bool) -> u64 {
        let mut i = from;
        while i < self.pages {
            let w = (i / 64) as usize;
            let word = if set { self.buf.words()[w] } else { !self.buf.words()[w] };
            let word = word & (!0u64 << (i % 64));
            if word != 0 {
                return (w as u64 * 64 + u64::from(word.trailing_zeros())).min(self.pages);
            }
            i = (w as u64 + 1) * 64;
        }
        self.pages
    }
}

/// The buffer handed to the kernel for a dirty bitmap (`IOMMU_HWPT_GET_DIRTY_BITMAP`, and
/// `VFIO_DEVICE_FEATURE_DMA_LOGGING_REPORT`, which share the kernel's `iova_bitmap` code): `words`
/// `u64`s of bitmap, page-aligned, followed by all the room the kernel may write past them, then a
/// guard page.
///
/// The kernel records a dirty page-table entry as a whole (`iova_bitmap_set` of the entry's start
/// and size), so a dirty 2 MiB or 1 GiB IOPTE that reaches past the requested length sets bits past
/// the bitmap's last word. Those writes are bounded by the user pages the kernel pinned for the
/// bitmap, not by the IOPTE size: `iova_bitmap_set` writes only into pinned pages and gives up on
/// bits past them. `iova_bitmap_get` pins, for a base word index `i < words`, the pages from the one
/// holding word `i` on, `ceil((words - i) * 8 / PAGE_SIZE)` of them plus one more when word `i` is
/// not at a page start. From a page-aligned buffer that ends at most at page
/// `ceil(i * 8 / PAGE_SIZE) + ceil((words - i) * 8 / PAGE_SIZE)`, which is at most
/// `ceil(words * 8 / PAGE_SIZE) + 1`: so the kernel may write [`span`](Self::span) bytes, that many
/// whole pages. Bits before word 0 are never written (an entry starting before the requested IOVA
/// fails `iova_bitmap_advance_to` and is dropped).
///
/// The guard page after the span is never pinned by the kernel; it is checked after every call, so
/// that a kernel writing further than the bound above is reported (as [`Error::Protocol`]) while its
/// writes still land in memory this buffer owns.
pub(crate) struct KernelBitmap {
    /// The allocation: alignment slack, then `span` bytes, then the guard page.
    buf: Vec<u64>,
    /// Index in `buf` of word 0 (page-aligned).
    start: usize,
    /// Words of bitmap proper.
    words: usize,
    /// Words the kernel may write from `start` on (whole pages).
    span: usize,
    /// Words in the guard page after the span (and in a page).
    guard: usize,
}

impl KernelBitmap {
    /// A zeroed buffer for a `words`-word bitmap (`words > 0`).
    pub(crate) fn new(op: &'static str, words: usize) -> Result<KernelBitmap> {
        Self::with_page_size(op, words, crate::dma::page_size())
    }

    fn with_page_size(op: &'static str, words: usize, page: usize) -> Result<KernelBitmap> {
        let too_big = || Error::invalid(op, format!("a {words}-word bitmap does not fit in memory"));
        if words == 0 || page < 8 || !page.is_power_of_two() {
            return Err(Error::invalid(op, "empty bitmap"));
        }
        let page_words = page / 8;
        let span = words.div_ceil(page_words).checked_add(1).and_then(|p| p.checked_mul(page_words));
        let span = span.ok_or_else(too_big)?;
        // Slack to reach a page boundary from the allocation's (8-byte aligned) start, and the guard.
        let total = span.checked_add(2 * page_words).ok_or_else(too_big)?;
        if total.checked_mul(8).is_none_or(|b| b > isize::MAX as usize) {
            return Err(too_big());
        }
        let mut buf = Vec::new();
        buf.try_reserve_exact(total).map_err(|_| Error::os(op, Errno::NOMEM))?;
        buf.resize(total, 0);
        let start = aligned_start(&buf, page);
        Ok(KernelBitmap { buf, start, words, span, guard: page_words })
    }

    /// The bitmap proper.
    pub(crate) fn words(&self) -> &[u64] {
        &self.buf[self.start..self.start + self.words]
    }

    pub(crate) fn words_mut(&mut self) -> &mut [u64] {
        let (start, words) = (self.start, self.words);
        &mut self.buf[start..start + words]
    }

    /// Everything the kernel may write: the bitmap and the room after it.
    #[cfg(any(test, feature = "testing"))]
    pub(crate) fn span(&self) -> &[u64] {
        &self.buf[self.start..self.start + self.span]
    }

    /// Everything the kernel may write, for tests that write as the kernel does.
    #[cfg(test)]
    pub(crate) fn span_mut(&mut self) -> &mut [u64] {
        let (start, span) = (self.start, self.span);
        &mut self.buf[start..start + span]
    }

    /// The guard page after the span (all zero unless the kernel wrote past its bound).
    pub(crate) fn guard(&self) -> &[u64] {
        &self.buf[self.start + self.span..self.start + self.span + self.guard]
    }

    /// Zeroes everything the kernel may write, before a call (the kernel only sets bits).
    pub(crate) fn reset(&mut self) {
        let (start, span) = (self.start, self.span);
        self.buf[start..start + span].fill(0);
    }

    /// The address of word 0 for the kernel. Valid while `self` is neither moved nor resized: the
    /// `Vec`'s heap block does not move with `self`.
    pub(crate) fn kernel_ptr(&mut self) -> u64 {
        self.buf[self.start..].as_mut_ptr() as u64
    }

    /// After a kernel call: checks the guard page and clears the bits at and past `valid_bits` in the
    /// last word, so that the words hold only the requested range.
    pub(crate) fn finish(&mut self, op: &'static str, valid_bits: u64) -> Result<()> {
        if self.guard().iter().any(|&w| w != 0) {
            let detail = "the kernel wrote past the room it may use after the dirty bitmap".to_string();
            let (start, span, guard) = (self.start, self.span, self.guard);
            self.buf[start + span..start + span + guard].fill(0);
            return Err(Error::Protocol { op, detail });
        }
        let rest = valid_bits % 64;
        if rest != 0 {
            if let Some(last) = self.words_mut().last_mut() {
                *last &= (1u64 << rest) - 1;
            }
        }
        Ok(())
    }
}

/// Index of the first page-aligned word of `buf` (less than a page in: `buf`'s elements are `u64`s).
fn aligned_start(buf: &[u64], page: usize) -> usize {
    (page - buf.as_ptr() as usize % page) % page / 8
}

impl Clone for KernelBitmap {
    fn clone(&self) -> KernelBitmap {
        // A copy of the `Vec` would not keep the page alignment: lay the words out in a fresh buffer
        // of the same size (which has the same slack). Like `Vec::clone`, this aborts if the
        // allocation fails.
        let mut buf = vec![0u64; self.buf.len()];
        let start = aligned_start(&buf, self.guard * 8);
        buf[start..start + self.words].copy_from_slice(self.words());
        KernelBitmap { buf, start, ..*self }
    }
}

impl PartialEq for KernelBitmap {
    fn eq(&self, other: &KernelBitmap) -> bool {
        self.words() == other.words()
    }
}

impl Eq for KernelBitmap {}

/// Validates a bitmap request and returns how many `u64` words its bitmap takes.
fn bitmap_words(iova: u64, length: u64, page_size: u64) -> Result<usize> {
    if !page_size.is_power_of_two() {
        return Err(Error::invalid(GET_BITMAP, format!("page size {page_size:#x} is not a power of two")));
    }
    if length == 0 {
        return Err(Error::invalid(GET_BITMAP, "length is zero"));
    }
    if IovaRange::from_len(iova, length).is_none() {
        return Err(Error::invalid(
            GET_BITMAP,
            format!("range {iova:#x}+{length:#x} overflows the IOVA space"),
        ));
    }
    if iova % page_size != 0 || length % page_size != 0 {
        return Err(Error::invalid(
            GET_BITMAP,
            format!(
                "IOVA {iova:#x} and length {length:#x} must be multiples of the page size {page_size:#x}"
            ),
        ));
    }
    let words = (length / page_size).div_ceil(64);
    usize::try_from(words).map_err(|_| Error::invalid(GET_BITMAP, "the bitmap does not fit in memory"))
}

/// Iterator over the coalesced dirty ranges of a [`DirtyBitmap`] ([`DirtyBitmap::iter_ranges`]).
#[derive(Debug, Clone)]
pub struct DirtyRanges<'a> {
    bitmap: &'a DirtyBitmap,
    next_bit: u64,
}

impl Iterator for DirtyRanges<'_> {
    type Item = IovaRange;

    fn next(&mut self) -> Option<IovaRange> {
        let b = self.bitmap;
        let start = b.find(self.next_bit, true);
        if start >= b.pages {
            self.next_bit = b.pages;
            return None;
        }
        let end = b.find(start, false);
        self.next_bit = end;
        // `start < end <= pages`, so `end * page_size <= length`, and `iova + (length - 1)` does not
        // overflow (checked by `new`; `iova + length` may: the range may end at the top of the space).
        Some(IovaRange { start: b.iova + start * b.page_size, last: b.iova + (end * b.page_size - 1) })
    }
}

impl std::iter::FusedIterator for DirtyRanges<'_> {}

impl Hwpt {
    fn check_dirty_capable(&self, op: &'static str) -> Result<()> {
        if self.kind() != HwptKind::Paging {
            return Err(Error::invalid(
                op,
                format!("HWPT {} is nested: dirty tracking belongs to its paging parent", self.id()),
            ));
        }
        if !self.flags().contains(HwptFlags::DIRTY_TRACKING) {
            return Err(Error::invalid(
                op,
                format!("HWPT {} was not allocated with HwptFlags::DIRTY_TRACKING", self.id()),
            ));
        }
        Ok(())
    }

    /// Turns the IOMMU's dirty tracking on or off for this page table
    /// (`IOMMU_HWPT_SET_DIRTY_TRACKING`, Linux 6.7). Enabling clears any stale dirty bits first.
    ///
    /// The table must be a paging HWPT allocated with [`HwptFlags::DIRTY_TRACKING`]; anything else is
    /// rejected before the ioctl. See the
    /// [read-and-clear protocol](DirtyBitmap#migration-the-read-and-clear-protocol) for migration.
    pub fn set_dirty_tracking(&self, enable: bool) -> Result<()> {
        self.check_dirty_capable(SET_TRACKING)?;
        let mut arg = sys::iommu_hwpt_set_dirty_tracking::new();
        arg.hwpt_id = self.id();
        arg.flags = if enable { sys::IOMMU_HWPT_DIRTY_TRACKING_ENABLE } else { 0 };
        self.iommufd().check_process(ioctl::HWPT_SET_DIRTY_TRACKING.name)?;
        // SAFETY: IOMMU_HWPT_SET_DIRTY_TRACKING takes `iommu_hwpt_set_dirty_tracking`, sized by `new()`;
        // it holds no pointers.
        unsafe { ioctl::call(self.iommufd().as_fd(), &ioctl::HWPT_SET_DIRTY_TRACKING, &mut arg) }.map(drop)
    }

    /// Reads which pages of `[iova, iova + length)` devices wrote, at `page_size` granularity
    /// (`IOMMU_HWPT_GET_DIRTY_BITMAP`, Linux 6.7), and with `clear` also clears those dirty bits
    /// (without it, `IOMMU_HWPT_GET_DIRTY_BITMAP_NO_CLEAR`: read only, for a range about to be
    /// unmapped).
    ///
    /// See [`DirtyBitmap::new`] for the constraints on the range, checked before the ioctl, the
    /// [read-and-clear protocol](DirtyBitmap#migration-the-read-and-clear-protocol) for migration, and
    /// [how to choose the windows](DirtyBitmap#choosing-the-windows): a window that begins inside a
    /// dirty huge IOMMU page misses it. Use [`read_dirty_into`](Self::read_dirty_into) to reuse one
    /// bitmap across rounds.
    pub fn read_dirty(&self, iova: u64, length: u64, page_size: u64, clear: bool) -> Result<DirtyBitmap> {
        self.check_dirty_capable(GET_BITMAP)?;
        let mut bitmap = DirtyBitmap::new(iova, length, page_size)?;
        self.read_dirty_into(&mut bitmap, clear)?;
        Ok(bitmap)
    }

    /// Like [`read_dirty`](Self::read_dirty), into an existing bitmap (its range and page size),
    /// which is cleared first: afterwards it holds exactly this read's dirty pages.
    pub fn read_dirty_into(&self, bitmap: &mut DirtyBitmap, clear: bool) -> Result<()> {
        self.check_dirty_capable(GET_BITMAP)?;
        // The kernel only sets bits: start from a clean buffer.
        bitmap.clear();
        let mut arg = sys::iommu_hwpt_get_dirty_bitmap::new();
        arg.hwpt_id = self.id();
        arg.flags = if clear { 0 } else { sys::IOMMU_HWPT_GET_DIRTY_BITMAP_NO_CLEAR };
        arg.iova = bitmap.iova;
        arg.length = bitmap.length;
        arg.page_size = bitmap.page_size;
        arg.data = bitmap.buf.kernel_ptr();
        self.iommufd().check_process(ioctl::HWPT_GET_DIRTY_BITMAP.name)?;
        // SAFETY: IOMMU_HWPT_GET_DIRTY_BITMAP takes `iommu_hwpt_get_dirty_bitmap`, sized by `new()`. Its
        // one user pointer, `data`, addresses the page-aligned start of `bitmap.buf`, whose span covers
        // every byte the kernel may write for this iova/length/page_size: the
        // `ceil(length / page_size / 64)` words and the rest of the pages the kernel pins for them,
        // where a dirty huge IOPTE reaching past `length` sets its bits (see `KernelBitmap`).
        // `DirtyBitmap::new` checked page_size is a power of two, the shift the kernel uses. The buffer
        // is exclusively borrowed through `bitmap` for the call, and nothing else points into it.
        unsafe { ioctl::call(self.iommufd().as_fd(), &ioctl::HWPT_GET_DIRTY_BITMAP, &mut arg) }?;
        bitmap.buf.finish(GET_BITMAP, bitmap.pages)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bitmap(iova: u64, pages: u64, page_size: u64, dirty: &[u64]) -> DirtyBitmap {
        let mut b = DirtyBitmap::new(iova, pages * page_size, page_size).unwrap();
        for &p in dirty {
            b.buf.words_mut()[(p / 64) as usize] |= 1 << (p % 64);
        }
        b
    }

    fn r(start: u64, last: u64) -> IovaRange {
        IovaRange { start, last }
    }

    fn assert_invalid<T: std::fmt::Debug>(res: Result<T>, needle: &str) {
        match res {
            Err(Error::InvalidArgument { op, reason }) => {
                assert_eq!(op, GET_BITMAP);
                assert!(reason.contains(needle), "reason {reason:?} lacks {needle:?}");
            }
            other => panic!("expected InvalidArgument(..{needle}..), got {other:?}"),
        }
    }

    #[test]
    fn size_is_whole_u64_words() {
        assert_eq!(bitmap_words(0, 4096, 4096).unwrap(), 1);
        assert_eq!(bitmap_words(0, 64 * 4096, 4096).unwrap(), 1);
        assert_eq!(bitmap_words(0, 65 * 4096, 4096).unwrap(), 2);
        assert_eq!(bitmap_words(1 << 30, 1 << 30, 1 << 21).unwrap(), 8);
        // 1 TiB at 4 KiB pages: 2^28 bits = 32 MiB of bitmap.
        assert_eq!(bitmap_words(0, 1 << 40, 4096).unwrap(), 1 << 22);
        let b = DirtyBitmap::new(0x10_0000, 100 * 4096, 4096).unwrap();
        assert_eq!((b.pages(), b.as_words().len()), (100, 2));
        assert_eq!(b.range(), r(0x10_0000, 0x10_0000 + 100 * 4096 - 1));
        assert!(b.is_clean());
    }

    #[test]
    fn bad_requests_are_rejected() {
        assert_invalid(DirtyBitmap::new(0, 4096, 0), "power of two");
        assert_invalid(DirtyBitmap::new(0, 3 * 4096, 3 * 4096), "power of two");
        assert_invalid(DirtyBitmap::new(0, 0, 4096), "length is zero");
        assert_invalid(DirtyBitmap::new(u64::MAX - 4095, 8192, 4096), "overflows");
        assert_invalid(DirtyBitmap::new(0x800, 4096, 4096), "multiples of the page size");
        assert_invalid(DirtyBitmap::new(0, 4096 + 512, 4096), "multiples of the page size");
        // The last page of the IOVA space is a valid range.
        let b = DirtyBitmap::new(u64::MAX - 4095, 4096, 4096).unwrap();
        assert_eq!(b.range().last, u64::MAX);
    }

    #[test]
    fn ranges_coalesce_adjacent_pages() {
        let base = 0x100_0000;
        let ps = 4096;
        let b = bitmap(base, 200, ps, &[0, 1, 2, 5, 63, 64, 65, 130, 199]);
        let ranges: Vec<_> = b.iter_ranges().collect();
        assert_eq!(
            ranges,
            vec![
                r(base, base + 3 * ps - 1),
                r(base + 5 * ps, base + 6 * ps - 1),
                r(base + 63 * ps, base + 66 * ps - 1), // across a word boundary
                r(base + 130 * ps, base + 131 * ps - 1),
                r(base + 199 * ps, base + 200 * ps - 1), // the last page
            ]
        );
        assert_eq!(b.dirty_pages(), 9);
        assert!(b.is_dirty(base) && b.is_dirty(base + 2 * ps + ps - 1) && !b.is_dirty(base + 3 * ps));
        assert!(!b.is_dirty(base - 1) && !b.is_dirty(base + 200 * ps));
        // The iterator is fused.
        let mut it = b.iter_ranges();
        assert_eq!(it.by_ref().count(), 5);
        assert_eq!(it.next(), None);
    }

    #[test]
    fn ranges_edge_cases() {
        let ps = 1 << 21;
        assert_eq!(bitmap(0, 10, ps, &[]).iter_ranges().count(), 0);
        let all: Vec<_> = bitmap(0, 128, ps, &(0..128).collect::<Vec<_>>()).iter_ranges().collect();
        assert_eq!(all, vec![r(0, 128 * ps - 1)]);
        let all: Vec<_> = bitmap(0, 100, ps, &(0..100).collect::<Vec<_>>()).iter_ranges().collect();
        assert_eq!(all, vec![r(0, 100 * ps - 1)]);
        // Alternating bits never coalesce.
        let alt = bitmap(0, 64, 4096, &(0..64).step_by(2).collect::<Vec<_>>());
        assert_eq!(alt.iter_ranges().count(), 32);
        assert_eq!(alt.dirty_pages(), 32);
    }

    #[test]
    fn dirty_calls_are_validated_before_the_ioctl() {
        let null: std::os::fd::OwnedFd =
            std::fs::OpenOptions::new().read(true).write(true).open("/dev/null").unwrap().into();
        // SAFETY: the fd is freshly opened and owned; it is not an iommufd, so any ioctl that gets
        // through fails with ENOTTY.
        let fd = unsafe {
            <crate::Iommufd as std::os::fd::FromRawFd>::from_raw_fd(std::os::fd::IntoRawFd::into_raw_fd(null))
        };
        let ioas = crate::Ioas::fake(&fd, 7);
        let invalid = |r: Result<_>, op: &str, needle: &str| match r {
            Err(Error::InvalidArgument { op: o, reason }) => {
                assert_eq!(o, op);
                assert!(reason.contains(needle), "{reason:?} lacks {needle:?}");
            }
            other => panic!("expected InvalidArgument, got {other:?}"),
        };
        let plain = Hwpt::fake(&ioas, 8, HwptKind::Paging, HwptFlags::empty());
        invalid(plain.set_dirty_tracking(true), SET_TRACKING, "DIRTY_TRACKING");
        invalid(plain.read_dirty(0, 4096, 4096, true).map(drop), GET_BITMAP, "DIRTY_TRACKING");
        let nested = Hwpt::fake(&ioas, 9, HwptKind::Nested, HwptFlags::DIRTY_TRACKING);
        invalid(nested.set_dirty_tracking(false), SET_TRACKING, "nested");
        let tracking = Hwpt::fake(&ioas, 10, HwptKind::Paging, HwptFlags::DIRTY_TRACKING);
        invalid(tracking.read_dirty(0, 4096, 3000, true).map(drop), GET_BITMAP, "power of two");
        invalid(tracking.read_dirty(0x800, 4096, 4096, false).map(drop), GET_BITMAP, "multiples");
        // Valid calls reach the (fake) kernel.
        for r in [tracking.set_dirty_tracking(true), tracking.read_dirty(0, 1 << 20, 4096, true).map(drop)] {
            assert!(matches!(r, Err(Error::Unsupported { since: "6.7", .. })), "{r:?}");
        }
        // The kernel only sets bits, so a reused bitmap is cleared before each read.
        let mut b = bitmap(0, 10, 4096, &[1, 2]);
        let _ = tracking.read_dirty_into(&mut b, true);
        assert!(b.is_clean());
    }

    #[test]
    fn ranges_at_the_top_of_the_iova_space() {
        // The last range ends at u64::MAX: `iova + length` overflows, `iova + (length - 1)` does not.
        let b = bitmap(u64::MAX - 4 * 4096 + 1, 4, 4096, &[1, 2, 3]);
        assert_eq!(b.iter_ranges().collect::<Vec<_>>(), vec![r(u64::MAX - 3 * 4096 + 1, u64::MAX)]);
        assert!(b.is_dirty(u64::MAX) && !b.is_dirty(u64::MAX - 3 * 4096));
    }

    #[test]
    fn bits_past_the_end_are_ignored() {
        // The kernel never sets them, but a stray bit in the last word's tail must not count.
        let mut b = bitmap(0, 10, 4096, &[9]);
        b.buf.words_mut()[0] |= 1 << 10 | 1 << 63;
        assert_eq!(b.dirty_pages(), 1);
        assert_eq!(b.iter_ranges().collect::<Vec<_>>(), vec![r(9 * 4096, 10 * 4096 - 1)]);
        b.clear();
        assert!(b.is_clean());
        assert_eq!(b.as_words(), &[0]);
    }
}

/// Property tests: the request validation, the buffer layout against a model of the kernel's
/// `iova_bitmap.c`, and the decoding of whatever bits the kernel leaves, for any input.
#[cfg(test)]
mod proptests {
    use proptest::prelude::*;

    use super::*;

    fn config(cases: u32) -> ProptestConfig {
        ProptestConfig { cases, failure_persistence: None, ..ProptestConfig::default() }
    }

    /// The kernel's `drivers/iommu/iommufd/iova_bitmap.c` (Linux 7.3), for a user bitmap at a
    /// page-aligned address: records which bits `iova_bitmap_set` writes, as `(first bit, count)`
    /// runs counted from the bitmap's start, with every pin succeeding.
    struct KernelModel {
        page: u64,
        iova: u64,
        length: u64,
        pgshift: u32,
        total: u64,
        base: u64,
        /// The pinned window: first page (from the bitmap's start), count, and what it maps.
        first_page: u64,
        npages: u64,
        m_iova: u64,
        m_length: u64,
        pgoff: u64,
        written: Vec<(u64, u64)>,
    }

    impl KernelModel {
        fn new(page: u64, iova: u64, length: u64, page_size: u64) -> KernelModel {
            let pgshift = page_size.trailing_zeros();
            let total = ((length - 1) >> pgshift) / 64 + 1;
            KernelModel {
                page,
                iova,
                length,
                pgshift,
                total,
                base: 0,
                first_page: 0,
                npages: 0,
                m_iova: iova,
                m_length: 0,
                pgoff: 0,
                written: Vec::new(),
            }
        }

        fn index_to_offset(&self, index: u64) -> u64 {
            (index * 64) << self.pgshift
        }

        /// `iova_bitmap_get`.
        fn get(&mut self) {
            let addr = self.base * 8;
            let npages = ((self.total - self.base) * 8).div_ceil(self.page);
            self.npages = (npages + u64::from(addr % self.page != 0)).min(self.page / 8);
            self.first_page = addr / self.page;
            self.m_iova = self.iova.wrapping_add(self.index_to_offset(self.base));
            self.pgoff = addr % self.page;
            // `iova_bitmap_mapped_length`.
            let max_iova = self.iova.wrapping_add(self.length).wrapping_sub(1);
            let bytes = self.npages * self.page - self.pgoff;
            let remaining = (self.total - self.base).min(bytes.div_ceil(8));
            let mut remaining = self.index_to_offset(remaining);
            let end = self.m_iova.wrapping_add(remaining).wrapping_sub(1);
            if end > max_iova {
                remaining -= end - max_iova;
            }
            self.m_length = remaining;
        }

        /// `iova_bitmap_advance_to`.
        fn advance_to(&mut self, iova: u64) -> bool {
            let index = (iova.wrapping_sub(self.iova) >> self.pgshift) / 64;
            if index >= self.total {
                return false;
            }
            self.base = index;
            self.get();
            true
        }

        /// `iova_bitmap_mapped_range`.
        fn mapped_range(&self, iova: u64, length: u64) -> bool {
            self.npages != 0
                && iova >= self.m_iova
                && iova.wrapping_add(length).wrapping_sub(1)
                    <= self.m_iova.wrapping_add(self.m_length).wrapping_sub(1)
        }

        /// `iova_bitmap_set`.
        fn set(&mut self, mut iova: u64, mut length: u64) {
            let bits_per_page = self.page * 8;
            'update: loop {
                if !self.mapped_range(iova, length) && !self.advance_to(iova) {
                    return;
                }
                let last_page_idx = self.npages - 1;
                let mut cur_bit = (iova.wrapping_sub(self.m_iova) >> self.pgshift) + self.pgoff * 8;
                let last_bit = (iova.wrapping_add(length).wrapping_sub(1).wrapping_sub(self.m_iova)
                    >> self.pgshift)
                    + self.pgoff * 8;
                loop {
                    let page_idx = cur_bit / bits_per_page;
                    let offset = cur_bit % bits_per_page;
                    let nbits = (bits_per_page - offset).min(last_bit - cur_bit + 1);
                    if page_idx > last_page_idx {
                        let left = (last_bit - cur_bit + 1) << self.pgshift;
                        iova = iova.wrapping_add(length - left);
                        length = left;
                        continue 'update;
                    }
                    self.written.push(((self.first_page + page_idx) * bits_per_page + offset, nbits));
                    cur_bit += nbits;
                    if cur_bit > last_bit {
                        return;
                    }
                }
            }
        }
    }

    /// A read request and the dirty IOPTEs the page-table walk finds in it (each intersects the
    /// window; in walk order).
    #[derive(Debug, Clone)]
    struct Scenario {
        iova: u64,
        length: u64,
        page_size: u64,
        entries: Vec<(u64, u64)>,
    }

    fn scenario() -> impl Strategy<Value = Scenario> {
        let words = prop_oneof![4 => 1u64..2100, 1 => 262_000u64..263_200];
        (12u32..=21, words, 0u64..64, 1u64 << 20..1u64 << 27)
            .prop_flat_map(|(shift, words, short, k)| {
                let page_size = 1u64 << shift;
                let pages = (words * 64 - short).max(1);
                let (iova, length) = (k << shift, pages << shift);
                let entry = (12u32..=30, -(1i64 << 31)..(length as i64)).prop_map(move |(s, off)| {
                    let size = 1u64 << s;
                    let at = iova.checked_add_signed(off).unwrap() & !(size - 1);
                    (at, size)
                });
                let entries = proptest::collection::vec(entry, 0..6);
                (Just((iova, length, page_size)), entries)
            })
            .prop_map(|((iova, length, page_size), mut entries)| {
                // The walk visits entries intersecting the window, in IOVA order, each once.
                entries.retain(|&(at, size)| at < iova + length && at + size > iova);
                entries.sort();
                entries.dedup_by(|b, a| b.0 < a.0 + a.1);
                Scenario { iova, length, page_size, entries }
            })
    }

    /// The model reproduces what the VM tests (`tests/dirty.rs`) observe of the real kernel.
    #[test]
    fn model_matches_the_kernel() {
        let (mib, page) = (1u64 << 20, 4096);
        // One dirty 2 MiB IOPTE read through a 4 KiB window: 512 bits, 56 bytes past the one word.
        let mut m = KernelModel::new(page, 16 * mib, 4096, 4096);
        m.set(16 * mib, 2 * mib);
        assert_eq!(m.written, vec![(0, 512)]);
        // A 512-word (one page) bitmap whose dirty entry begins in word 508: the kernel pins the
        // page after the bitmap's and writes 256 bits there.
        let mut m = KernelModel::new(page, 17 * mib, 128 * mib, 4096);
        m.set(144 * mib, 2 * mib);
        assert_eq!((m.first_page, m.npages), (0, 2));
        assert_eq!(m.written, vec![(32512, 256), (32768, 256)]);
        let b = DirtyBitmap::new(17 * mib, 128 * mib, 4096).unwrap();
        assert!(b.buf.span as u64 * 64 >= 32768 + 256);
        // An entry beginning before the window sets nothing.
        let mut m = KernelModel::new(page, 16 * mib + 65536, 65536, 4096);
        m.set(16 * mib, 2 * mib);
        assert!(m.written.is_empty());
    }

    proptest! {
        #![proptest_config(config(256))]

        /// Whatever dirty IOPTEs the kernel records, every bit it writes lies in the buffer's span
        /// (never before it, never in the guard), and the bitmap reports exactly the pages of the
        /// entries that begin inside the window.
        #[test]
        fn kernel_writes_stay_in_the_span(s in scenario()) {
            let page = crate::dma::page_size() as u64;
            let mut model = KernelModel::new(page, s.iova, s.length, s.page_size);
            for &(at, size) in &s.entries {
                model.set(at, size);
            }
            let mut b = DirtyBitmap::new(s.iova, s.length, s.page_size).unwrap();
            let span_bits = b.buf.span as u64 * 64;
            let start = b.buf.start;
            for &(first, n) in &model.written {
                prop_assert!(first + n <= span_bits, "bits {first}+{n} past the {span_bits}-bit span");
                for bit in first..first + n {
                    b.buf.buf[start + (bit / 64) as usize] |= 1 << (bit % 64);
                }
            }
            b.buf.finish(GET_BITMAP, b.pages).unwrap();
            let mut expected = vec![0u64; b.as_words().len()];
            for &(at, size) in s.entries.iter().filter(|&&(at, _)| at >= s.iova) {
                let first = (at - s.iova) / s.page_size;
                let last = ((at + size - 1 - s.iova) / s.page_size).min(b.pages - 1);
                for bit in first..=last {
                    expected[(bit / 64) as usize] |= 1 << (bit % 64);
                }
            }
            prop_assert_eq!(b.as_words(), &expected[..]);
        }

        /// Request validation never panics, and accepts exactly the well-formed requests.
        #[test]
        fn bitmap_requests_are_validated(
            iova in prop_oneof![any::<u64>(), (0u64..1 << 20).prop_map(|p| p << 12)],
            length in prop_oneof![any::<u64>(), (0u64..1 << 20).prop_map(|p| p << 12)],
            page_size in prop_oneof![any::<u64>(), (0u32..64).prop_map(|s| 1u64 << s)],
        ) {
            let ok = page_size.is_power_of_two()
                && length != 0
                && iova.checked_add(length - 1).is_some()
                && iova % page_size == 0
                && length % page_size == 0;
            match bitmap_words(iova, length, page_size) {
                Ok(words) => {
                    prop_assert!(ok);
                    prop_assert_eq!(words as u64, (length / page_size).div_ceil(64));
                }
                Err(Error::InvalidArgument { .. }) => prop_assert!(!ok),
                Err(e) => prop_assert!(false, "unexpected error {:?}", e),
            }
        }

        /// The buffer is page-aligned, covers whole pages plus one past the bitmap, keeps a guard
        /// page after that, and clones keep all of it.
        #[test]
        fn buffer_layout(words in 1usize..200_000, page_shift in 12u32..=16) {
            let page = 1usize << page_shift;
            let kb = KernelBitmap::with_page_size("t", words, page).unwrap();
            for k in [&kb, &kb.clone()] {
                prop_assert_eq!(k.words().as_ptr() as usize % page, 0);
                prop_assert_eq!(k.span().len() * 8, ((words * 8).div_ceil(page) + 1) * page);
                prop_assert_eq!(k.guard().len() * 8, page);
                prop_assert!(k.start + k.span + k.guard <= k.buf.len());
                prop_assert_eq!(k.words().len(), words);
            }
        }

        /// Decoding any bits the kernel may leave (including past the last page): ranges are in
        /// order, disjoint, non-adjacent and inside the window, and agree with `is_dirty`,
        /// `dirty_pages` and the words, up to the top of the IOVA space.
        #[test]
        fn ranges_agree_with_the_bits(
            shift in 12u32..=30,
            pages in 1u64..700,
            at_top in any::<bool>(),
            k in 0u64..1 << 20,
            raw in proptest::collection::vec(any::<u64>(), 11),
            density in 0u32..4,
        ) {
            let page_size = 1u64 << shift;
            let length = pages << shift;
            let iova = if at_top { (u64::MAX - length) + 1 } else { k << shift };
            let mut b = DirtyBitmap::new(iova, length, page_size).unwrap();
            let n = b.as_words().len();
            for (i, w) in b.buf.words_mut().iter_mut().enumerate() {
                // Sparse to dense words.
                *w = (0..density).fold(raw[i % raw.len()].rotate_left(i as u32), |acc, d| acc & raw[(i + d as usize + 1) % raw.len()]);
            }
            b.buf.finish(GET_BITMAP, pages).unwrap();
            prop_assert_eq!(b.as_words().len(), n);
            let ranges: Vec<IovaRange> = b.iter_ranges().collect();
            let mut counted = 0;
            for (i, r) in ranges.iter().enumerate() {
                prop_assert!(r.start <= r.last && b.range().contains(r));
                prop_assert_eq!((r.start - iova) % page_size, 0);
                prop_assert_eq!((r.last - iova + 1) % page_size, 0);
                prop_assert!(b.is_dirty(r.start) && b.is_dirty(r.last));
                if let Some(next) = ranges.get(i + 1) {
                    prop_assert!(r.last + 1 < next.start, "{:?} and {:?} not disjoint and apart", r, next);
                    prop_assert!(!b.is_dirty(r.last + 1));
                }
                counted += (r.last - r.start) / page_size + 1;
            }
            prop_assert_eq!(counted, b.dirty_pages());
            let bits: u64 = b.as_words().iter().map(|w| u64::from(w.count_ones())).sum();
            prop_assert_eq!(bits, counted);
            for p in 0..pages {
                let bit = b.as_words()[(p / 64) as usize] & (1 << (p % 64)) != 0;
                prop_assert_eq!(b.is_dirty(iova + p * page_size + (p % page_size)), bit);
            }
            prop_assert!(!b.is_dirty(iova.wrapping_sub(1)) || iova == 0);
            prop_assert!(iova.checked_add(length).is_none_or(|end| !b.is_dirty(end)));
        }
    }
}
