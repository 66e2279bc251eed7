//! What a VMM does with the crate, on the edu device: guest RAM of `vm-memory` mapped at IOVA = GPA
//! receives real DMA (and keeps receiving it after the VMM drops its own guest memory object),
//! memory hotplug, the identity map of a guest without a vIOMMU, `vmm-sys-util` eventfds for MSI
//! (one vector updated in place), INTx with an unmask eventfd, an ioeventfd, and the host address of
//! a mapped BAR.

mod common;

use std::sync::Arc;

use common::{Edu, bind, iommu, pattern};
use iommufd::{
    Access, Error, EventFdExt, GuestMemoryMapping, GuestRam, IdentityMap, Iommufd, IrqFlags, PciIrq,
    PciRegion,
};
use vm_memory::{
    Bytes, GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryBackend, GuestMemoryMmap,
    GuestMemoryRegion, GuestRegionMmap, MmapRegion, VolatileMemory,
};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

const LEN: usize = 4096;
/// Low RAM below the legacy VGA hole, and RAM from 1 MiB: a PC's layout, inside edu's 28-bit DMA mask.
const LOW: (u64, usize) = (0, 0xa_0000);
const HIGH: (u64, usize) = (0x10_0000, 0x40_0000);

fn guest_memory(ranges: &[(u64, usize)]) -> GuestMemoryMmap {
    let ranges: Vec<_> = ranges.iter().map(|&(gpa, len)| (GuestAddress(gpa), len)).collect();
    GuestMemoryMmap::from_ranges(&ranges).unwrap()
}

fn region(gpa: u64, len: usize) -> Arc<GuestRegionMmap> {
    Arc::new(GuestRegionMmap::from_range(GuestAddress(gpa), len, None).unwrap())
}

fn read_mmap(mmap: &MmapRegion, offset: usize, len: usize) -> Vec<u8> {
    let mut out = vec![0u8; len];
    mmap.as_volatile_slice().offset(offset).unwrap().copy_to(&mut out[..]);
    out
}

/// The GPAs the guard maps, each at IOVA = GPA.
fn mapped(guard: &GuestMemoryMapping<GuestRam>) -> Vec<(u64, u64)> {
    guard.regions().map(|m| (m.iova(), m.len())).collect()
}

#[test]
#[ignore = "needs /dev/iommu and the edu device: run by cargo xtask vm-test"]
fn guest_memory_receives_edu_dma_at_its_guest_addresses() {
    let fd = Iommufd::open().unwrap();
    let dev = bind(&fd);
    let ioas = fd.alloc_ioas().unwrap();
    let _att = dev.attach(&ioas).unwrap();
    let edu = Edu::new(&dev);

    let mem = guest_memory(&[LOW, HIGH]);
    let guard = ioas.map_guest_memory(&mem, Access::READ_WRITE).unwrap();
    assert_eq!(mapped(&guard), vec![(LOW.0, LOW.1 as u64), (HIGH.0, HIGH.1 as u64)]);

    // The VMM writes guest RAM through vm-memory; edu copies it from one region into the other.
    let data = pattern(7, LEN);
    let (src, dst) = (GuestAddress(HIGH.0 + 0x2000), GuestAddress(LOW.0 + 0x8000));
    mem.write_slice(&data, src).unwrap();
    edu.ram_to_device(src.0, LEN as u64);
    edu.device_to_ram(dst.0, LEN as u64);
    let mut got = vec![0u8; LEN];
    mem.read_slice(&mut got, dst).unwrap();
    assert_eq!(got, data, "guest RAM at GPA {:#x} received the DMA", dst.0);

    // The guard's ranges are owned: the IOAS refuses to remove them behind it.
    let e = ioas.unmap_range(HIGH.0, HIGH.1 as u64).unwrap_err();
    assert!(matches!(e, Error::InvalidArgument { .. }), "{e}");

    // The VMM drops its guest memory object: the mappings hold the regions, so DMA still lands in
    // them, and removing a region hands its memory back with the device's bytes in it.
    drop(mem);
    let last = GuestAddress(HIGH.0 + HIGH.1 as u64 - LEN as u64);
    edu.device_to_ram(last.0, LEN as u64);
    let mut guard = guard;
    let mmap = guard.remove_region(GuestAddress(HIGH.0)).unwrap();
    assert_eq!(read_mmap(&mmap, HIGH.1 - LEN, LEN), data, "DMA after the VMM dropped its memory object");
    assert_eq!(mapped(&guard), vec![(LOW.0, LOW.1 as u64)]);
    // Unmapped: a device write there no longer reaches the region.
    edu.ram_to_device(LOW.0, LEN as u64); // low RAM is zero: edu's buffer becomes zeros
    edu.device_to_ram(last.0, LEN as u64);
    assert_eq!(read_mmap(&mmap, HIGH.1 - LEN, LEN), data, "a DMA to an unmapped GPA changed the region");
    let e = guard.remove_region(GuestAddress(HIGH.0)).unwrap_err();
    assert!(matches!(e, Error::InvalidArgument { .. }), "{e}");

    guard.unmap().unwrap();
    // Nothing of the guest's memory is left in the IOAS.
    assert_eq!(ioas.unmap_all().unwrap(), 0);
}

#[test]
#[ignore = "needs /dev/iommu and the edu device: run by cargo xtask vm-test"]
fn memory_hotplug_follows_the_guest_memory_snapshots() {
    let fd = Iommufd::open().unwrap();
    let dev = bind(&fd);
    let ioas = fd.alloc_ioas().unwrap();
    let _att = dev.attach(&ioas).unwrap();
    let edu = Edu::new(&dev);

    let atomic = GuestMemoryAtomic::new(guest_memory(&[HIGH]));
    let mut guard = ioas.map_guest_memory(&atomic.memory(), Access::READ_WRITE).unwrap();
    assert_eq!(guard.len(), 1);

    // Hot-plug one region by hand.
    let plugged = region(0x80_0000, 0x20_0000);
    guard.add_region(&plugged).unwrap();
    let data = pattern(3, LEN);
    plugged.write_slice(&data, vm_memory::MemoryRegionAddress(0x1000)).unwrap();
    edu.ram_to_device(0x80_1000, LEN as u64);
    edu.device_to_ram(HIGH.0, LEN as u64);
    let mut got = vec![0u8; LEN];
    atomic.memory().read_slice(&mut got, GuestAddress(HIGH.0)).unwrap();
    assert_eq!(got, data, "DMA out of the hot-plugged region");
    // A region over a mapped one is refused.
    let e = guard.add_region(&region(0x80_0000, LEN)).unwrap_err();
    assert!(matches!(e, Error::InvalidArgument { .. }), "{e}");
    guard.remove_region(GuestAddress(0x80_0000)).unwrap();

    // The VMM's way: a new snapshot with a region added, then one with the first region removed.
    let added = region(0x100_0000, 0x10_0000);
    let next = atomic.memory().insert_region(added.clone()).unwrap();
    atomic.lock().unwrap().replace(next);
    guard.update(&atomic.memory()).unwrap();
    assert_eq!(mapped(&guard), vec![(HIGH.0, HIGH.1 as u64), (0x100_0000, 0x10_0000)]);
    edu.device_to_ram(0x100_0000, LEN as u64);
    added.read_slice(&mut got, vm_memory::MemoryRegionAddress(0)).unwrap();
    assert_eq!(got, data, "DMA into the region the new snapshot added");
    // An unchanged snapshot changes nothing.
    guard.update(&atomic.memory()).unwrap();
    assert_eq!(guard.len(), 2);

    let (next, removed) = atomic.memory().remove_region(GuestAddress(HIGH.0), HIGH.1 as u64).unwrap();
    atomic.lock().unwrap().replace(next);
    guard.update(&atomic.memory()).unwrap();
    assert_eq!(mapped(&guard), vec![(0x100_0000, 0x10_0000)]);
    let before = read_mmap(&removed.get_mmap(), 0, LEN);
    // Load edu with bytes the removed region does not hold, so a DMA reaching it would show.
    let fresh = pattern(9, LEN);
    assert_ne!(fresh, before);
    added.write_slice(&fresh, vm_memory::MemoryRegionAddress(LEN as u64)).unwrap();
    edu.ram_to_device(0x100_0000 + LEN as u64, LEN as u64);
    edu.device_to_ram(HIGH.0, LEN as u64);
    assert_eq!(read_mmap(&removed.get_mmap(), 0, LEN), before, "DMA reached a removed region");

    // A snapshot whose new region lies outside the usable IOVA space is refused before any change.
    let ranges = ioas.iova_ranges().unwrap().ranges;
    let beyond = ranges.last().unwrap().last.checked_add(1).expect("the IOVA space ends below 2^64");
    let outside = atomic.memory().insert_region(region(beyond, LEN)).unwrap();
    let e = guard.update(&outside).unwrap_err();
    assert!(
        matches!(&e, Error::InvalidArgument { reason, .. } if reason.contains("usable IOVA ranges")),
        "{e}"
    );
    assert_eq!(mapped(&guard), vec![(0x100_0000, 0x10_0000)]);
}

#[test]
#[ignore = "needs /dev/iommu and the edu device: run by cargo xtask vm-test"]
fn identity_map_for_a_guest_without_a_viommu() {
    let fd = Iommufd::open().unwrap();
    let dev = bind(&fd);
    // The usable IOVA space with the device attached: its end, and the first hole in it (a range the
    // IOMMU reserves for the device).
    let (hole, beyond) = {
        let ioas = fd.alloc_ioas().unwrap();
        let _att = dev.attach(&ioas).unwrap();
        let ranges = ioas.iova_ranges().unwrap().ranges;
        (ranges.windows(2).next().map(|w| w[0].last + 1), ranges.last().unwrap().last + 1)
    };
    if iommu() == "intel" {
        // The x86 interrupt window, reserved for interrupt remapping (measured).
        assert_eq!(hole, Some(0xfee0_0000), "intel-iommu's reserved interrupt window");
    }
    // RAM there is refused before anything is mapped, and the device is detached again (the next
    // attach succeeds).
    for gpa in hole.into_iter().chain([beyond]) {
        let bad = guest_memory(&[HIGH, (gpa, LEN)]);
        match IdentityMap::new(&fd, &[&dev], &bad) {
            Err(Error::InvalidArgument { reason, .. }) => {
                assert!(reason.contains(&format!("GPA {gpa:#x}")), "{reason}")
            }
            other => panic!("RAM at GPA {gpa:#x} was not refused: {other:?}"),
        }
    }
    // The ordering rule: RAM mapped over the hole before the attach makes the kernel refuse the attach.
    if let Some(gpa) = hole {
        let ioas = fd.alloc_ioas().unwrap();
        let ram = guest_memory(&[(gpa, LEN)]);
        let _guard = ioas.map_guest_memory(&ram, Access::READ_WRITE).unwrap();
        let e = dev.attach(&ioas).unwrap_err();
        assert_eq!(e.errno(), Some(iommufd::Errno::ADDRINUSE), "{e}");
    }

    let mem = guest_memory(&[LOW, HIGH]);
    let mut map = IdentityMap::new(&fd, &[&dev], &mem).unwrap();
    assert_eq!(map.attachments().len(), 1);
    assert_eq!(map.attachments()[0].pt_id(), map.ioas().id());
    let edu = Edu::new(&dev);
    let data = pattern(11, LEN);
    mem.write_slice(&data, GuestAddress(0x1000)).unwrap();
    edu.ram_to_device(0x1000, LEN as u64);
    edu.device_to_ram(HIGH.0 + 0x10_0000, LEN as u64);
    let mut got = vec![0u8; LEN];
    mem.read_slice(&mut got, GuestAddress(HIGH.0 + 0x10_0000)).unwrap();
    assert_eq!(got, data);
    // Memory hotplug through the identity map.
    let plugged = region(0x80_0000, LEN);
    map.mapping_mut().add_region(&plugged).unwrap();
    edu.device_to_ram(0x80_0000, LEN as u64);
    plugged.read_slice(&mut got, vm_memory::MemoryRegionAddress(0)).unwrap();
    assert_eq!(got, data);
    // Attaching a device that is attached already is refused; the map is unchanged.
    let e = map.attach(&dev).unwrap_err();
    assert!(matches!(e, Error::InvalidArgument { .. }), "{e}");
    assert_eq!(map.attachments().len(), 1);
    drop(map);
    // Teardown detached the device: it attaches again.
    let ioas = fd.alloc_ioas().unwrap();
    dev.attach(&ioas).unwrap().detach().unwrap();
}

#[test]
#[ignore = "needs /dev/iommu and the edu device: run by cargo xtask vm-test"]
fn other_backends_map_through_host_addresses() {
    let fd = Iommufd::open().unwrap();
    let dev = bind(&fd);
    let ioas = fd.alloc_ioas().unwrap();
    let _att = dev.attach(&ioas).unwrap();
    let edu = Edu::new(&dev);
    let mem = guest_memory(&[LOW, HIGH]);
    // SAFETY: `mem` owns the regions' memory and outlives `guard` (dropped first, at the end of the
    // test); vm-memory reaches it only through volatile accesses, so no Rust reference aliases it.
    let guard = unsafe { ioas.map_guest_memory_unchecked(&mem, Access::READ_WRITE) }.unwrap();
    let ranges: Vec<_> = guard.regions().map(|m| (m.iova(), m.len())).collect();
    let want: Vec<_> = mem.iter().map(|r| (r.start_addr().0, r.len())).collect();
    assert_eq!(ranges, want);
    let data = pattern(5, LEN);
    mem.write_slice(&data, GuestAddress(HIGH.0)).unwrap();
    edu.ram_to_device(HIGH.0, LEN as u64);
    edu.device_to_ram(0x2000, LEN as u64);
    let mut got = vec![0u8; LEN];
    mem.read_slice(&mut got, GuestAddress(0x2000)).unwrap();
    assert_eq!(got, data);
    guard.unmap().unwrap();
}

fn eventfd() -> EventFd {
    EventFd::new(EFD_NONBLOCK).unwrap()
}

/// Waits up to 5 s for `efd` to be signalled and returns its counter.
fn wait(efd: &EventFd) -> u64 {
    use rustix::event::{PollFd, PollFlags, Timespec, poll};
    let fd = efd.borrow_fd();
    let mut fds = [PollFd::new(&fd, PollFlags::IN)];
    let n = poll(&mut fds, Some(&Timespec { tv_sec: 5, tv_nsec: 0 })).unwrap();
    assert_eq!(n, 1, "no interrupt within 5 s");
    efd.read().unwrap()
}

/// True if `efd` has not been signalled (its counter is 0: a non-blocking read finds nothing).
fn quiet(efd: &EventFd) -> bool {
    efd.read().is_err_and(|e| e.kind() == std::io::ErrorKind::WouldBlock)
}

/// edu's interrupt registers: raise (0x60) sets status bits and interrupts, acknowledge (0x64) clears.
const RAISE: usize = 0x60;
const ACK: usize = 0x64;
const STATUS: usize = 0x24;

#[test]
#[ignore = "needs /dev/iommu and the edu device: run by cargo xtask vm-test"]
fn one_msi_vector_is_updated_in_place() {
    let fd = Iommufd::open().unwrap();
    let dev = bind(&fd);
    let msi = PciIrq::Msi.index();
    assert_eq!(dev.irq_info(msi).unwrap().count, 1, "edu has one MSI vector");
    let bar = dev.map_region(PciRegion::Bar(0).index()).unwrap();
    // An MSI is a memory write by the device: it needs bus mastering, which vfio-pci leaves off.
    dev.set_bus_master(true).unwrap();
    let (first, second, third) = (eventfd(), eventfd(), eventfd());
    dev.set_irq_eventfds(msi, 0, &[first.borrow_fd()]).unwrap();
    bar.write_u32(RAISE, 1).unwrap();
    assert!(wait(&first) >= 1, "edu's MSI reached the eventfd");
    bar.write_u32(ACK, 1).unwrap();

    // The guest moved the vector: only the new eventfd hears it.
    dev.set_irq_vector(msi, 0, second.borrow_fd()).unwrap();
    bar.write_u32(RAISE, 2).unwrap();
    assert!(wait(&second) >= 1);
    assert!(quiet(&first), "the replaced eventfd was signalled");
    bar.write_u32(ACK, 2).unwrap();

    // Detaching the vector (-1) keeps MSI enabled: INTx is still refused, and the vector takes a new
    // eventfd without re-enabling the index.
    dev.clear_irq_vector(msi, 0).unwrap();
    let intx = dev.set_irq_eventfds(PciIrq::Intx.index(), 0, &[third.borrow_fd()]).unwrap_err();
    assert_eq!(intx.errno(), Some(iommufd::Errno::INVAL), "INTx while MSI is enabled: {intx}");
    dev.set_irq_vectors(msi, 0, &[Some(third.borrow_fd())]).unwrap();
    bar.write_u32(RAISE, 4).unwrap();
    assert!(wait(&third) >= 1);
    assert!(quiet(&second), "the detached eventfd was signalled");
    assert_eq!(bar.read_u32(STATUS).unwrap(), 4);
    bar.write_u32(ACK, 4).unwrap();

    // Past the vectors the device has: the kernel refuses (EINVAL), the vector keeps its eventfd.
    let e = dev.set_irq_vector(msi, 1, first.borrow_fd()).unwrap_err();
    assert_eq!(e.errno(), Some(iommufd::Errno::INVAL), "{e}");
    assert!(matches!(dev.set_irq_vectors(msi, 0, &[]), Err(Error::InvalidArgument { .. })));
    dev.disable_irqs(msi).unwrap();
}

#[test]
#[ignore = "needs /dev/iommu and the edu device: run by cargo xtask vm-test"]
fn intx_with_an_unmask_eventfd_resamples_a_level_interrupt() {
    let fd = Iommufd::open().unwrap();
    let dev = bind(&fd);
    let intx = PciIrq::Intx.index();
    assert!(dev.irq_info(intx).unwrap().flags.contains(IrqFlags::MASKABLE | IrqFlags::AUTOMASKED));
    let bar = dev.map_region(PciRegion::Bar(0).index()).unwrap();
    let (trigger, unmask) = (eventfd(), eventfd());
    // The unmask eventfd needs INTx enabled first.
    let e = dev.set_irq_unmask_eventfd(intx, 0, unmask.borrow_fd()).unwrap_err();
    assert_eq!(e.errno(), Some(iommufd::Errno::INVAL), "{e}");
    // MSI has no masking in vfio-pci: refused before the ioctl.
    let e = dev.set_irq_unmask_eventfd(PciIrq::Msi.index(), 0, unmask.borrow_fd()).unwrap_err();
    assert!(matches!(e, Error::NotCapable { .. }), "{e}");

    dev.set_irq_eventfds(intx, 0, &[trigger.borrow_fd()]).unwrap();
    dev.set_irq_unmask_eventfd(intx, 0, unmask.borrow_fd()).unwrap();
    bar.write_u32(RAISE, 1).unwrap();
    assert!(wait(&trigger) >= 1, "edu's INTx");
    // vfio-pci masked the line. The guest ends the interrupt without servicing the device: the
    // unmask eventfd (KVM's resample eventfd) finds the line still asserted and fires it again.
    unmask.write(1).unwrap();
    assert!(wait(&trigger) >= 1, "the still-asserted line fired again after the unmask eventfd");
    // Serviced: the device lowers the line, and the unmask eventfd unmasks it for the next one.
    bar.write_u32(ACK, 1).unwrap();
    assert_eq!(bar.read_u32(STATUS).unwrap(), 0);
    unmask.write(1).unwrap();
    // No unmask_irq call anywhere: only the eventfd can have unmasked the line for this interrupt.
    bar.write_u32(RAISE, 2).unwrap();
    assert!(wait(&trigger) >= 1, "a new interrupt after the unmask eventfd unmasked the line");
    bar.write_u32(ACK, 2).unwrap();

    dev.clear_irq_unmask_eventfd(intx, 0).unwrap();
    // The line is masked since the last interrupt. Raised again, it stays masked: the cleared eventfd
    // no longer unmasks it; the VMM unmasks by ioctl.
    bar.write_u32(RAISE, 4).unwrap();
    unmask.write(1).unwrap();
    // The kernel acts on an eventfd signal from a work item: give it time to (wrongly) act.
    std::thread::sleep(std::time::Duration::from_millis(300));
    assert!(quiet(&trigger), "the cleared unmask eventfd still unmasked the line");
    dev.unmask_irq(intx, 0).unwrap();
    assert!(wait(&trigger) >= 1, "the ioctl unmasked the still-asserted line");
    bar.write_u32(ACK, 4).unwrap();
    dev.disable_irqs(intx).unwrap();
    // Disabling INTx dropped the unmask eventfd with it: setting one needs INTx again.
    let e = dev.set_irq_unmask_eventfd(intx, 0, unmask.borrow_fd()).unwrap_err();
    assert_eq!(e.errno(), Some(iommufd::Errno::INVAL), "{e}");
}

#[test]
#[ignore = "needs /dev/iommu and the edu device: run by cargo xtask vm-test"]
fn an_eventfd_drives_an_ioeventfd() {
    let fd = Iommufd::open().unwrap();
    let dev = bind(&fd);
    let bar = dev.map_region(PciRegion::Bar(0).index()).unwrap();
    let efd = eventfd();
    // edu's liveness register (0x04) reads back the inverse of what was written.
    let ioeventfd = dev.ioeventfd(PciRegion::Bar(0).index(), 4, 4, 0x5555_aaaa, efd.borrow_fd()).unwrap();
    efd.write(1).unwrap();
    // The kernel writes from its eventfd wakeup: poll the register until it changes.
    let start = std::time::Instant::now();
    while bar.read_u32(4).unwrap() != !0x5555_aaaau32 {
        assert!(start.elapsed() < std::time::Duration::from_secs(5), "the ioeventfd wrote nothing in 5 s");
        std::thread::yield_now();
    }
    ioeventfd.remove().unwrap();
}

#[test]
#[ignore = "needs /dev/iommu and the edu device: run by cargo xtask vm-test"]
fn a_mapped_bar_has_a_host_address_for_memory_slots() {
    let fd = Iommufd::open().unwrap();
    let dev = bind(&fd);
    let bar = dev.map_region(PciRegion::Bar(0).index()).unwrap();
    // SAFETY: the address is used only below, while `bar` is alive, through volatile accesses of the
    // width edu's registers take; no reference to the memory is made.
    let host = unsafe { bar.host_address() };
    assert_eq!(host as usize % iommufd::page_size(), 0);
    // SAFETY: offset 0 is edu's 4-byte id register inside the mapped BAR (1 MiB), 4-byte aligned.
    let id = unsafe { host.cast::<u32>().read_volatile() };
    assert_eq!(id, bar.read_u32(0).unwrap());
    assert_eq!(id & 0xffff, 0x00ed, "edu's id register through the host address");
    // SAFETY: offset 4 is edu's liveness register, as above; a write through the address reaches the
    // device just as `write_u32` does.
    unsafe { host.add(4).cast::<u32>().write_volatile(0x0f0f_0f0f) };
    assert_eq!(bar.read_u32(4).unwrap(), !0x0f0f_0f0fu32);
}
