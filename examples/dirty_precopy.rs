//! Dirty tracking for live migration: the pre-copy loop a VMM runs while the guest keeps running.
//!
//! Guest RAM is mapped through a HWPT allocated with dirty tracking. Each round reads and clears the
//! dirty bitmap, copies only the pages the device wrote since the last round to the destination, and
//! stops once a round leaves little enough to send while the device is stopped (stop-and-copy).
//!
//! The kernel's mock IOMMU (`CONFIG_IOMMUFD_TEST`, feature `testing`) plays the device: it cannot write
//! memory itself, so each "device write" here is a CPU write plus the mock marking the IOPTE dirty,
//! which is what a real IOMMU's dirty bit records. Run it where the mock is available, e.g. in the
//! bundled VM (`cargo xtask vm-test`). On real hardware, the same loop works with a device attached
//! to a dirty-tracking HWPT (`Hwpt::alloc(.., HwptFlags::DIRTY_TRACKING)` fails with an `Unsupported`
//! error when the IOMMU cannot track dirty pages).

use iommufd::testing::{self, MockDevice};
use iommufd::{Access, DirtyBitmap, DmaBuffer, Hwpt, HwptFlags, Iommufd, Iova, Mapping};

const PAGE: u64 = 4096;
const PAGES: u64 = 1024; // 4 MiB of guest RAM
/// Rounds stop when fewer pages than this are dirty: they are sent with the device stopped.
const STOP_COPY_BELOW: u64 = 16;

/// A tiny deterministic PRNG, so the example needs no dependency and its run is reproducible.
struct XorShift(u64);
impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// Copies the pages `bitmap` marks dirty from `ram` to the same offsets of `destination`; returns the
/// bytes sent.
fn send_dirty(
    ram: &Mapping<DmaBuffer>,
    bitmap: &DirtyBitmap,
    destination: &mut [u8],
) -> iommufd::Result<usize> {
    let mut sent = 0;
    for range in bitmap.iter_ranges() {
        let (offset, len) = ((range.start - ram.iova()) as usize, range.len() as usize);
        ram.read_at(offset, &mut destination[offset..offset + len])?;
        sent += len;
    }
    Ok(sent)
}

fn main() {
    if let Err(e) = run() {
        eprintln!("error: {e}");
        // Exit status 77: the kernel or IOMMU lacks what this needs (the message names it).
        std::process::exit(if e.is_unsupported() { 77 } else { 1 });
    }
}

fn run() -> iommufd::Result<()> {
    let iommufd = Iommufd::open()?;
    let ioas = iommufd.alloc_ioas()?;
    // 4 KiB IOPTEs, so the dirty bitmap has page granularity.
    ioas.set_huge_pages(false)?;
    let device = MockDevice::new(&ioas)?;
    let hwpt = Hwpt::alloc(&device, &ioas, HwptFlags::DIRTY_TRACKING)?;
    device.replace(&hwpt)?;

    let gpa = testing::APERTURE.start;
    let ram = ioas.map(DmaBuffer::new((PAGES * PAGE) as usize)?, Iova::Fixed(gpa), Access::READ_WRITE)?;
    // Start tracking, then take the first full copy: everything written from here on is caught.
    hwpt.set_dirty_tracking(true)?;
    let mut destination = vec![0u8; (PAGES * PAGE) as usize];
    ram.read_at(0, &mut destination)?;
    println!("round 0: full copy of {} pages", PAGES);

    let mut rng = XorShift(0x2545_f491_4f6c_dd1d);
    let mut bitmap = DirtyBitmap::new(gpa, PAGES * PAGE, PAGE)?;
    let mut writes_per_round = 400;
    for round in 1.. {
        // The running device writes some pages (fewer each round: the loop converges).
        let mut marks = vec![0u64; PAGES.div_ceil(64) as usize];
        for _ in 0..writes_per_round {
            let page = rng.next() % PAGES;
            let value = rng.next().to_ne_bytes();
            ram.write_at((page * PAGE + rng.next() % (PAGE - 8)) as usize, &value)?;
            marks[(page / 64) as usize] |= 1 << (page % 64);
        }
        testing::set_dirty(&iommufd, hwpt.id(), gpa, PAGE, &marks)?;
        writes_per_round /= 3;

        // Read and clear in one call: a page written after this read shows up in the next round.
        hwpt.read_dirty_into(&mut bitmap, true)?;
        let dirty = bitmap.dirty_pages();
        let sent = send_dirty(&ram, &bitmap, &mut destination)?;
        let expected: u64 = marks.iter().map(|w| u64::from(w.count_ones())).sum();
        println!("round {round}: {dirty} dirty pages ({} KiB sent)", sent / 1024);
        if dirty != expected {
            eprintln!("the bitmap reported {dirty} dirty pages, the device wrote {expected}");
            std::process::exit(1);
        }
        if dirty < STOP_COPY_BELOW {
            break;
        }
    }

    // The device's last writes before it is stopped.
    let mut marks = vec![0u64; PAGES.div_ceil(64) as usize];
    for page in [1, PAGES / 2, PAGES - 1] {
        ram.write_at((page * PAGE) as usize, &rng.next().to_ne_bytes())?;
        marks[(page / 64) as usize] |= 1 << (page % 64);
    }
    testing::set_dirty(&iommufd, hwpt.id(), gpa, PAGE, &marks)?;

    // Stop-and-copy: the device is quiesced; one last read and clear, and the pages it names are sent.
    hwpt.read_dirty_into(&mut bitmap, true)?;
    let sent = send_dirty(&ram, &bitmap, &mut destination)?;
    println!("stop-and-copy: {} dirty pages left ({} KiB sent)", bitmap.dirty_pages(), sent / 1024);
    hwpt.set_dirty_tracking(false)?;

    let mut source = vec![0u8; destination.len()];
    ram.read_at(0, &mut source)?;
    if source != destination {
        eprintln!("the destination differs from the source after the last round");
        std::process::exit(1);
    }
    println!("destination matches the source: {} MiB migrated", (PAGES * PAGE) >> 20);

    // Teardown in the kernel's order: unmap, move the device off the HWPT, destroy it.
    ram.unmap()?;
    device.replace(&ioas)?;
    hwpt.destroy()?;
    Ok(())
}
