//! Guest RAM for a VMM: the setup a VMM makes for a device it assigns to a guest without a vIOMMU.
//!
//! Guest RAM lives in `vm-memory` (two regions, as a PC has below and above 1 MiB) and is mapped at
//! IOVA = guest physical address, so the device's DMA addresses are the guest's own; the device's MSI
//! and INTx go to `vmm-sys-util` eventfds (which a VMM would hand to KVM as irqfds). The edu device
//! plays the assigned device: it copies guest RAM from one region into the other and interrupts.
//!
//! Run it where an edu device is bound to vfio-pci (the test VM does):
//! `cargo run --example vmm_guest_ram --features vm-memory,vmm-sys-util -- 0000:00:03.0`.

use iommufd::{EventFdExt, IdentityMap, Iommufd, PciIrq, PciRegion, RegionMapping, VfioDevice};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

/// Waits for an interrupt on `efd` (at most 5 s).
fn wait(efd: &EventFd) -> Result<(), Box<dyn std::error::Error>> {
    use rustix::event::{PollFd, PollFlags, Timespec, poll};
    let fd = efd.borrow_fd();
    let timeout = Timespec { tv_sec: 5, tv_nsec: 0 };
    if poll(&mut [PollFd::new(&fd, PollFlags::IN)], Some(&timeout))? == 0 {
        return Err("no interrupt within 5 s".into());
    }
    efd.read()?;
    Ok(())
}

/// edu copies `len` bytes from `src` to `dst` (one of them its internal buffer at 0x40000) and
/// interrupts when done (command bit 2).
fn edu_dma(bar: &RegionMapping, src: u64, dst: u64, to_ram: bool) -> iommufd::Result<()> {
    bar.write_u64(0x80, src)?;
    bar.write_u64(0x88, dst)?;
    bar.write_u64(0x90, 4096)?;
    bar.write_u64(0x98, 1 | 4 | if to_ram { 2 } else { 0 })
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let address = std::env::args()
        .nth(1)
        .or_else(|| std::env::var("IOMMUFD_TEST_EDU_BDF").ok())
        .ok_or("usage: vmm_guest_ram <PCI address of an edu device bound to vfio-pci>")?;

    // The guest's RAM: 640 KiB at 0 and 4 MiB at 1 MiB.
    let ram = GuestMemoryMmap::<()>::from_ranges(&[
        (GuestAddress(0), 0xa_0000),
        (GuestAddress(0x10_0000), 0x40_0000),
    ])?;

    // The device, attached to an IOAS that maps all guest RAM at IOVA = GPA.
    let iommufd = Iommufd::open()?;
    let device = VfioDevice::open_pci(&address)?.bind(&iommufd)?;
    let dma = IdentityMap::new(&iommufd, &[&device], &ram)?;
    for region in dma.mapping().regions() {
        println!("guest RAM at GPA = IOVA {:#x}, {:#x} bytes", region.iova(), region.len());
    }
    let bar = device.map_region(PciRegion::Bar(0).index())?;
    device.set_bus_master(true)?; // the guest's driver would do this

    // MSI into an eventfd. The guest's driver asks edu for a DMA from high RAM into low RAM.
    let msi = EventFd::new(EFD_NONBLOCK)?;
    device.set_irq_eventfds(PciIrq::Msi.index(), 0, &[msi.borrow_fd()])?;
    let message = b"written by the guest at GPA 0x200000, copied by the device to GPA 0x8000";
    ram.write_slice(message, GuestAddress(0x20_0000))?;
    edu_dma(&bar, 0x20_0000, 0x40000, false)?;
    wait(&msi)?;
    bar.write_u32(0x64, 0x100)?; // acknowledge edu's DMA interrupt
    edu_dma(&bar, 0x40000, 0x8000, true)?;
    wait(&msi)?;
    bar.write_u32(0x64, 0x100)?;
    let mut copy = vec![0u8; message.len()];
    ram.read_slice(&mut copy, GuestAddress(0x8000))?;
    assert_eq!(&copy[..], &message[..], "the DMA did not reach guest RAM");
    println!("MSI: DMA done, guest RAM at GPA 0x8000 reads {:?}", String::from_utf8_lossy(&copy));
    device.disable_irqs(PciIrq::Msi.index())?;

    // INTx is level-triggered: the trigger eventfd, plus the unmask eventfd the guest's end of
    // interrupt signals (KVM's resample eventfd).
    let (intx, unmask) = (EventFd::new(EFD_NONBLOCK)?, EventFd::new(EFD_NONBLOCK)?);
    device.set_irq_eventfds(PciIrq::Intx.index(), 0, &[intx.borrow_fd()])?;
    device.set_irq_unmask_eventfd(PciIrq::Intx.index(), 0, unmask.borrow_fd())?;
    for round in 1..=2 {
        bar.write_u32(0x60, round)?; // edu raises its interrupt line
        wait(&intx)?;
        println!("INTx {round}: edu's interrupt status {:#x}", bar.read_u32(0x24)?);
        bar.write_u32(0x64, round)?; // the guest services the device ...
        unmask.write(1)?; // ... and ends the interrupt, which unmasks the line
    }
    device.disable_irqs(PciIrq::Intx.index())?;

    // Teardown: dropping `dma` detaches the device, unmaps the guest RAM and destroys the IOAS.
    device.set_bus_master(false)?;
    drop(dma);
    println!("done: guest RAM received the device's DMA at its guest physical addresses");
    Ok(())
}
