//! IOVA placement by this crate (`Iova::Below`): free, aligned ranges under a device's limit, kept
//! away from reserved ranges the kernel adds later, and cheap at many thousands of mappings.
#![cfg(feature = "testing")]

mod common;

use std::time::Instant;

use iommufd::testing::{self, MockDevice};
use iommufd::{Access, DmaBuffer, Errno, Error, Iommufd, Iova, IovaRange, Mapping, page_size};

/// Mappings made in the scale test (bounded: each is one map and one unmap ioctl under TCG).
const SCALE_MAPPINGS: usize = 10_000;

fn page() -> u64 {
    page_size() as u64
}

/// Prints to the console even when libtest captures test output.
macro_rules! console {
    ($($t:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), $($t)*);
    }};
}

fn assert_disjoint(mappings: &[Mapping]) {
    let mut ranges: Vec<IovaRange> = mappings.iter().map(Mapping::range).collect();
    ranges.sort();
    for w in ranges.windows(2) {
        assert!(w[0].last < w[1].start, "{:?} and {:?} overlap", w[0], w[1]);
    }
}

#[test]
#[ignore = "needs /dev/iommu with CONFIG_IOMMUFD_TEST: run by cargo xtask vm-test"]
fn placement_below_a_limit_is_free_aligned_and_under_the_limit() {
    if common::mock_devices_unavailable() {
        return;
    }
    let iommufd = Iommufd::open().unwrap();
    let ioas = iommufd.alloc_ioas().unwrap();
    let _mock = MockDevice::new(&ioas).unwrap();
    let limit = testing::APERTURE.start + 64 * page() - 1;
    let mut maps = Vec::new();
    for pages in [1usize, 2, 3, 4, 1, 8] {
        let buf = DmaBuffer::new(pages * page_size()).unwrap();
        let m = ioas.map(buf, Iova::Below(limit), Access::READ_WRITE).unwrap();
        assert_eq!(m.iova() % page(), 0, "{m:?}");
        assert!(m.range().last <= limit, "{m:?} under {limit:#x}");
        assert!(testing::APERTURE.contains(&m.range()), "{m:?} inside the mock aperture");
        maps.push(m);
    }
    // With no memory alignment to keep (a file at offset 0), the kernel's rule applies whole: the
    // length rounded up to a power of two.
    let memfd = rustix::fs::memfd_create("placement", rustix::fs::MemfdFlags::CLOEXEC).unwrap();
    rustix::fs::ftruncate(&memfd, 4 * page()).unwrap();
    for pages in [2u64, 3, 4] {
        let r = ioas.map_file(&memfd, 0, pages * page(), Iova::Below(u64::MAX), Access::READ);
        if common::unsupported_here(&r, "IOMMU_IOAS_MAP_FILE", "6.13", Errno::NOTTY) {
            return;
        }
        let m = r.unwrap();
        let align = (pages * page()).next_power_of_two();
        assert_eq!(m.iova() % align, 0, "{m:?} aligned to {align:#x}");
        drop(m);
    }
    assert_disjoint(&maps);
    // Full below the limit: refused with ENOSPC, before any ioctl.
    let e =
        ioas.map(DmaBuffer::new(64 * page_size()).unwrap(), Iova::Below(limit), Access::READ).unwrap_err();
    assert_eq!(e.errno(), Some(Errno::NOSPC), "{e}");
    // A freed range is offered again.
    maps.remove(0).unmap().map_err(Error::from).unwrap();
    let again = ioas.map(DmaBuffer::new(page_size()).unwrap(), Iova::Below(limit), Access::READ).unwrap();
    assert!(again.range().last <= limit);
    maps.push(again);
    assert_disjoint(&maps);
    // Fixed and automatic mappings share the space: placement keeps clear of both.
    let fixed = ioas.map(DmaBuffer::new(page_size()).unwrap(), Iova::Fixed(limit + 1), Access::READ).unwrap();
    let auto = ioas.map(DmaBuffer::new(page_size()).unwrap(), Iova::Auto, Access::READ).unwrap();
    for _ in 0..4 {
        maps.push(
            ioas.map(DmaBuffer::new(page_size()).unwrap(), Iova::Below(u64::MAX), Access::READ).unwrap(),
        );
    }
    maps.push(fixed);
    maps.push(auto);
    assert_disjoint(&maps);
}

#[test]
#[ignore = "needs /dev/iommu with CONFIG_IOMMUFD_TEST: run by cargo xtask vm-test"]
fn placement_learns_reserved_ranges_added_after_it_looked() {
    if common::mock_devices_unavailable() {
        return;
    }
    let iommufd = Iommufd::open().unwrap();
    let ioas = iommufd.alloc_ioas().unwrap();
    let _mock = MockDevice::new(&ioas).unwrap();
    let base = testing::APERTURE.start;
    // Place once, so the crate reads the usable ranges: the lowest free page of the aperture.
    let first = ioas.map(DmaBuffer::new(page_size()).unwrap(), Iova::Below(u64::MAX), Access::READ).unwrap();
    assert_eq!(first.iova(), base);
    // The kernel now reserves the next pages (as an attach of a device with reserved regions would):
    // the crate's next choice is refused by the kernel, and it re-reads the usable ranges.
    let reserved = IovaRange { start: base + page(), last: base + 8 * page() - 1 };
    testing::add_reserved(&ioas, reserved).unwrap();
    let next = ioas.map(DmaBuffer::new(page_size()).unwrap(), Iova::Below(u64::MAX), Access::READ).unwrap();
    assert!(!next.range().overlaps(&reserved), "{next:?} lands in the reserved {reserved:?}");
    assert!(next.iova() >= base + 8 * page(), "{next:?}");
}

/// Many thousands of mappings placed by the crate: every one is distinct, and the time per map does
/// not grow with the number of mappings (printed for the record, never asserted: TCG timings vary).
#[test]
#[ignore = "needs /dev/iommu with CONFIG_IOMMUFD_TEST: run by cargo xtask vm-test"]
fn placement_scales_to_many_mappings() {
    let iommufd = Iommufd::open().unwrap();
    let ioas = iommufd.alloc_ioas().unwrap();
    let t = Instant::now();
    let mut maps = Vec::with_capacity(SCALE_MAPPINGS);
    let mut first_half = None;
    for i in 0..SCALE_MAPPINGS {
        if i == SCALE_MAPPINGS / 2 {
            first_half = Some(t.elapsed());
        }
        let buf = DmaBuffer::new(page_size()).unwrap();
        maps.push(ioas.map(buf, Iova::Below(u64::MAX), Access::READ).unwrap());
    }
    let total = t.elapsed();
    assert_disjoint(&maps);
    let first_half = first_half.unwrap_or_default();
    console!(
        "placement: {SCALE_MAPPINGS} Iova::Below maps in {:.2} s (first half {:.2} s, second half {:.2} s)",
        total.as_secs_f64(),
        first_half.as_secs_f64(),
        (total - first_half).as_secs_f64()
    );
    let t = Instant::now();
    drop(maps);
    console!("placement: {SCALE_MAPPINGS} unmaps in {:.2} s", t.elapsed().as_secs_f64());
    assert_eq!(ioas.unmap_all().unwrap(), 0, "every guard unmapped its range");
}
