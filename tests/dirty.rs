//! Dirty tracking on the kernel's mock IOMMU (`CONFIG_IOMMUFD_TEST`) with huge IOMMU pages and large
//! bitmaps: what `IOMMU_HWPT_GET_DIRTY_BITMAP` writes past the requested range, and bitmaps of many
//! `u64` words.
//!
//! The kernel records a dirty page-table entry whole (`iova_bitmap_set` of the entry's start and
//! size, `drivers/iommu/generic_pt/iommu_pt.h`), so a dirty 2 MiB entry reaching past the requested
//! window sets bits past the bitmap, up to the end of the bitmap pages it pinned
//! (`drivers/iommu/iommufd/iova_bitmap.c`). These tests make the kernel do exactly that and check that
//! every bit it wrote landed in the buffer [`DirtyBitmap`] handed it, that the guard page after that
//! buffer is untouched, and that only the window is reported.
#![cfg(feature = "testing")]

mod common;

use std::os::fd::OwnedFd;

use iommufd::testing::{self, MockDevice};
use iommufd::{Access, DirtyBitmap, DmaBuffer, Hwpt, HwptFlags, Ioas, Iommufd, Iova, IovaRange};

const PAGE: u64 = 4096;
const HUGE: u64 = 2 << 20;
const MIB: u64 = 1 << 20;

/// A mock device on `ioas` attached to a fresh dirty-tracking HWPT, tracking on.
fn tracking(ioas: &Ioas) -> (MockDevice, Hwpt) {
    let dev = MockDevice::new(ioas).expect("mock device (needs CONFIG_IOMMUFD_TEST)");
    let hwpt = Hwpt::alloc(&dev, ioas, HwptFlags::DIRTY_TRACKING).expect("dirty-tracking HWPT");
    dev.replace(&hwpt).unwrap();
    hwpt.set_dirty_tracking(true).unwrap();
    (dev, hwpt)
}

/// A memfd of `len` bytes in 2 MiB huge pages (the test VM boots with huge pages reserved).
fn hugetlb_memfd(len: u64) -> OwnedFd {
    use rustix::fs::MemfdFlags;
    let fd = rustix::fs::memfd_create(
        "iommufd-dirty",
        MemfdFlags::CLOEXEC | MemfdFlags::HUGETLB | MemfdFlags::HUGE_2MB,
    )
    .expect("hugetlb memfd (the VM kernel reserves 2 MiB huge pages)");
    rustix::fs::ftruncate(&fd, len).unwrap();
    fd
}

/// A 2 MiB hugetlb page mapped at `iova` (2 MiB-aligned) of an IOAS with huge IOMMU pages on, with one
/// 4 KiB page of it written: one dirty 2 MiB IOPTE. Checked through a whole-entry read.
struct DirtyHugePage {
    fd: Iommufd,
    ioas: Ioas,
    dev: MockDevice,
    hwpt: Hwpt,
    iova: u64,
    mapping: iommufd::Mapping<iommufd::FileMemory>,
}

impl DirtyHugePage {
    /// `None` on a kernel without `map_file` (6.12), after asserting its exact refusal.
    fn new() -> Option<DirtyHugePage> {
        let fd = Iommufd::open().expect("open /dev/iommu");
        let ioas = fd.alloc_ioas().unwrap();
        assert!(ioas.huge_pages().unwrap(), "huge IOMMU pages are on by default");
        let (dev, hwpt) = tracking(&ioas);
        let iova = testing::APERTURE.start;
        assert_eq!(iova % HUGE, 0);
        let file = hugetlb_memfd(HUGE);
        let r = ioas.map_file(&file, 0, HUGE, Iova::Fixed(iova), Access::READ_WRITE);
        if common::unsupported_here(&r, "IOMMU_IOAS_MAP_FILE", "6.13", iommufd::Errno::NOTTY) {
            return None;
        }
        let h = DirtyHugePage { fd, ioas, dev, hwpt, iova, mapping: r.unwrap() };
        h.dirty_one_page();
        Some(h)
    }

    /// A device write to one 4 KiB page (the sixth) of the huge page.
    fn dirty_one_page(&self) {
        assert_eq!(
            testing::set_dirty(&self.fd, self.hwpt.id(), self.iova + 5 * PAGE, PAGE, &[1]).unwrap(),
            1
        );
        // The mapping is one 2 MiB IOPTE: the whole entry reads dirty.
        let whole = self.hwpt.read_dirty(self.iova, HUGE, PAGE, false).unwrap();
        assert_eq!(whole.dirty_pages(), 512, "the memfd's huge page is mapped by one 2 MiB IOPTE");
    }

    fn teardown(self) {
        let DirtyHugePage { fd: _, ioas, dev, hwpt, iova: _, mapping } = self;
        mapping.unmap().unwrap();
        dev.replace(&ioas).unwrap();
        hwpt.destroy().unwrap();
        dev.close().unwrap();
    }
}

/// Asserts that the kernel's writes for `bitmap` stayed in its buffer: the guard page is clean.
fn assert_guard_clean(bitmap: &DirtyBitmap) {
    let (_, guard) = testing::dirty_bitmap_buffer(bitmap);
    assert!(!guard.is_empty());
    assert!(guard.iter().all(|&w| w == 0), "the kernel wrote into the guard page");
}

#[test]
#[ignore = "needs /dev/iommu with CONFIG_IOMMUFD_TEST: run by cargo xtask vm-test"]
fn a_dirty_huge_page_is_reported_only_inside_small_windows() {
    if common::mock_devices_unavailable() {
        return;
    }
    let Some(h) = DirtyHugePage::new() else { return };
    for window in [PAGE, 16 * PAGE] {
        let pages = window / PAGE;
        for clear in [false, true] {
            let b = h.hwpt.read_dirty(h.iova, window, PAGE, clear).unwrap();
            // Only the window is reported: all of it, since the whole entry is dirty.
            assert_eq!((b.pages(), b.dirty_pages()), (pages, pages), "window {window:#x}");
            assert_eq!(b.as_words(), &[(1u64 << pages) - 1]);
            assert_eq!(
                b.iter_ranges().collect::<Vec<_>>(),
                vec![IovaRange::from_len(h.iova, window).unwrap()]
            );
            assert!(!b.is_dirty(h.iova + window));
            // The kernel set all 512 bits of the entry: 56 bytes past the one-word bitmap. They are in
            // the buffer handed to it (a bitmap sized for the window alone overflowed here).
            let (span, _) = testing::dirty_bitmap_buffer(&b);
            assert!(span.len() >= 8, "the buffer has room for the entry's 512 bits");
            assert_eq!(span[0], (1u64 << pages) - 1);
            assert!(span[1..8].iter().all(|&w| w == !0), "the kernel wrote the entry's bits past the window");
            assert!(span[8..].iter().all(|&w| w == 0), "nothing past the entry");
            assert_guard_clean(&b);
            if clear {
                // Read-and-clear cleaned the whole entry.
                assert!(h.hwpt.read_dirty(h.iova, HUGE, PAGE, false).unwrap().is_clean());
                h.dirty_one_page();
            }
        }
    }
    // A reused bitmap: the kernel's spill from one read is gone before the next.
    let mut b = DirtyBitmap::new(h.iova, PAGE, PAGE).unwrap();
    h.hwpt.read_dirty_into(&mut b, true).unwrap();
    assert_eq!(b.as_words(), &[1]);
    h.hwpt.read_dirty_into(&mut b, true).unwrap();
    assert!(b.is_clean());
    assert!(testing::dirty_bitmap_buffer(&b).0.iter().all(|&w| w == 0));
    // At 2 MiB per bit, the entry is one bit.
    h.dirty_one_page();
    let b = h.hwpt.read_dirty(h.iova, HUGE, HUGE, false).unwrap();
    assert_eq!(b.as_words(), &[1]);
    h.teardown();
}

#[test]
#[ignore = "needs /dev/iommu with CONFIG_IOMMUFD_TEST: run by cargo xtask vm-test"]
fn a_window_starting_inside_a_dirty_huge_page_misses_it() {
    if common::mock_devices_unavailable() {
        return;
    }
    // The documented kernel behaviour (`DirtyBitmap`, "Choosing the windows"): the entry begins before
    // the window, `iova_bitmap_set` drops it, and with clear the entry is cleaned all the same.
    let Some(h) = DirtyHugePage::new() else { return };
    let inside = h.iova + 16 * PAGE;
    let b = h.hwpt.read_dirty(inside, 16 * PAGE, PAGE, false).unwrap();
    assert!(b.is_clean(), "the kernel now reports an entry that begins before the window: update the docs");
    assert!(testing::dirty_bitmap_buffer(&b).0.iter().all(|&w| w == 0), "no bit before the window is set");
    assert_guard_clean(&b);
    // Still dirty: a read without clear changed nothing.
    assert_eq!(h.hwpt.read_dirty(h.iova, HUGE, PAGE, false).unwrap().dirty_pages(), 512);
    // Read-and-clear of the inner window reports nothing and loses the write.
    assert!(h.hwpt.read_dirty(inside, 16 * PAGE, PAGE, true).unwrap().is_clean());
    assert!(h.hwpt.read_dirty(h.iova, HUGE, PAGE, false).unwrap().is_clean(), "the entry was cleaned");
    h.teardown();
}

#[test]
#[ignore = "needs /dev/iommu with CONFIG_IOMMUFD_TEST: run by cargo xtask vm-test"]
fn the_kernel_may_write_one_page_past_the_bitmap_pages() {
    if common::mock_devices_unavailable() {
        return;
    }
    // A one-page (512-word) bitmap whose only dirty entry begins in word 508: the kernel pins from the
    // page holding word 508 on, `ceil(4 * 8 / 4096)` pages plus one because word 508 is not at a page
    // start, and sets the entry's 512 bits from bit 32512 on, 256 of them in the second page. Rounding
    // the bitmap up to whole pages is not enough; the buffer has that page too.
    let fd = Iommufd::open().expect("open /dev/iommu");
    let ioas = fd.alloc_ioas().unwrap();
    let (dev, hwpt) = tracking(&ioas);
    let huge_iova = testing::APERTURE.start + 128 * MIB;
    let window = IovaRange { start: huge_iova - 127 * MIB, last: huge_iova + MIB - 1 };
    // The kernel walks the window from its start through contiguous mappings only: fill the 127 MiB
    // before the huge page.
    let low = ioas
        .map(DmaBuffer::new((127 * MIB) as usize).unwrap(), Iova::Fixed(window.start), Access::READ_WRITE)
        .unwrap();
    let file = hugetlb_memfd(HUGE);
    let r = ioas.map_file(&file, 0, HUGE, Iova::Fixed(huge_iova), Access::READ_WRITE);
    if common::unsupported_here(&r, "IOMMU_IOAS_MAP_FILE", "6.13", iommufd::Errno::NOTTY) {
        return;
    }
    let huge = r.unwrap();
    testing::set_dirty(&fd, hwpt.id(), huge_iova, PAGE, &[1]).unwrap();

    let b = hwpt.read_dirty(window.start, window.len(), PAGE, false).unwrap();
    assert_eq!(b.pages(), 32768);
    assert_eq!(b.as_words().len(), 512);
    // Reported: the entry's first 1 MiB, inside the window.
    assert_eq!(b.iter_ranges().collect::<Vec<_>>(), vec![IovaRange { start: huge_iova, last: window.last }]);
    let (span, _) = testing::dirty_bitmap_buffer(&b);
    assert!(span.len() >= 1024, "two bitmap pages");
    // Written by the kernel: words 508..516, the last four in the page after the bitmap's.
    assert!(span[508..516].iter().all(|&w| w == !0), "the kernel wrote the entry's bits into the next page");
    assert!(span[..508].iter().chain(&span[516..]).all(|&w| w == 0));
    assert_guard_clean(&b);

    huge.unmap().unwrap();
    low.unmap().unwrap();
    dev.replace(&ioas).unwrap();
    hwpt.destroy().unwrap();
}

#[test]
#[ignore = "needs /dev/iommu with CONFIG_IOMMUFD_TEST: run by cargo xtask vm-test"]
fn multi_word_dirty_bitmaps() {
    if common::mock_devices_unavailable() {
        return;
    }
    // As the kernel selftests: 64 MiB and more, 4 KiB IOMMU pages, dirty pages in many words.
    const PAGES: u64 = 16384 + 3 * 64 + 5; // 64 MiB + 3 words + 5 pages: a partial last word
    let fd = Iommufd::open().expect("open /dev/iommu");
    let ioas = fd.alloc_ioas().unwrap();
    ioas.set_huge_pages(false).unwrap();
    let (dev, hwpt) = tracking(&ioas);
    let iova = testing::APERTURE.start;
    let len = PAGES * PAGE;
    let mapping =
        ioas.map(DmaBuffer::new(len as usize).unwrap(), Iova::Fixed(iova), Access::READ_WRITE).unwrap();

    let dirty: Vec<u64> =
        (0..PAGES).filter(|p| p % 37 == 0 || [63, 64, 127, 128, PAGES - 1].contains(p)).collect();
    let mut marks = vec![0u64; PAGES.div_ceil(64) as usize];
    for &p in &dirty {
        marks[(p / 64) as usize] |= 1 << (p % 64);
    }
    assert_eq!(testing::set_dirty(&fd, hwpt.id(), iova, PAGE, &marks).unwrap(), dirty.len() as u64);
    let words = |first: u64, pages: u64, per_bit: u64| {
        let mut w = vec![0u64; pages.div_ceil(64) as usize];
        for &p in dirty.iter().filter(|&&p| p >= first && p < first + pages * per_bit) {
            let bit = (p - first) / per_bit;
            w[(bit / 64) as usize] |= 1 << (bit % 64);
        }
        w
    };

    let b = hwpt.read_dirty(iova, len, PAGE, false).unwrap();
    assert_eq!(b.as_words(), &marks[..]);
    assert_eq!(b.dirty_pages(), dirty.len() as u64);
    assert_eq!(b.iter_ranges().map(|r| r.len() / PAGE).sum::<u64>(), dirty.len() as u64);
    assert_guard_clean(&b);
    // Windows from a word boundary and from an odd page: the kernel shifts the bits to the window.
    for (first, pages) in [(64, 200), (7, 1000), (PAGES - 300, 300), (1, PAGES - 1)] {
        let b = hwpt.read_dirty(iova + first * PAGE, pages * PAGE, PAGE, false).unwrap();
        assert_eq!(b.as_words(), &words(first, pages, 1)[..], "window at page {first}, {pages} pages");
        assert_guard_clean(&b);
    }
    // Coarser granularity: 64 KiB (16 pages) per bit.
    let b = hwpt.read_dirty(iova, len - 5 * PAGE - 3 * 64 * PAGE, 16 * PAGE, false).unwrap();
    assert_eq!(b.as_words(), &words(0, 1024, 16)[..]);
    // Read and clear: the same bits, then none.
    let mut b = DirtyBitmap::new(iova, len, PAGE).unwrap();
    hwpt.read_dirty_into(&mut b, true).unwrap();
    assert_eq!(b.as_words(), &marks[..]);
    hwpt.read_dirty_into(&mut b, true).unwrap();
    assert!(b.is_clean());

    mapping.unmap().unwrap();
    dev.replace(&ioas).unwrap();
    hwpt.destroy().unwrap();
}
