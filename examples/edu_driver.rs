//! A minimal userspace driver for QEMU's `edu` device, driven by interrupts instead of polling: the
//! device's MSI is delivered to an eventfd, and the driver sleeps in `poll` until the device is done.
//!
//! It computes a factorial on the device and has it copy a buffer through the IOMMU, each time
//! waiting for the completion interrupt, reading edu's interrupt status and acknowledging it.
//!
//! Run it where an edu device is bound to vfio-pci (the test VM does):
//! `cargo run --example edu_driver -- 0000:00:03.0`.

use std::os::fd::{AsFd, OwnedFd};

use iommufd::{Access, DmaBuffer, Iommufd, Iova, PciIrq, PciRegion, RegionMapping, VfioDevice};
use rustix::event::{EventfdFlags, PollFd, PollFlags, Timespec, eventfd, poll};

// edu's registers (BAR0).
const FACTORIAL: usize = 0x08;
const STATUS: usize = 0x20;
const STATUS_IRQ_ON_FACTORIAL: u32 = 0x80;
const IRQ_STATUS: usize = 0x24;
const IRQ_ACK: usize = 0x64;
const DMA_SRC: usize = 0x80;
const DMA_DST: usize = 0x88;
const DMA_COUNT: usize = 0x90;
const DMA_CMD: usize = 0x98;
const DMA_START: u64 = 1;
const DMA_TO_RAM: u64 = 2;
const DMA_IRQ: u64 = 4;
const EDU_BUFFER: u64 = 0x40000;
/// edu addresses 28 bits of IOVA by default.
const EDU_DMA_LIMIT: u64 = (1 << 28) - 1;
// What edu reports in its interrupt status for each completion.
const IRQ_FACTORIAL: u32 = 0x1;
const IRQ_DMA: u32 = 0x100;

/// The driver: the device's registers and the eventfd its MSI signals.
struct Edu {
    bar: RegionMapping,
    msi: OwnedFd,
}

impl Edu {
    /// Sleeps until the device interrupts (at most 5 s), then acknowledges the interrupt `expect`.
    fn wait_interrupt(&self, expect: u32) -> Result<(), Box<dyn std::error::Error>> {
        let timeout = Timespec { tv_sec: 5, tv_nsec: 0 };
        if poll(&mut [PollFd::new(&self.msi, PollFlags::IN)], Some(&timeout))? == 0 {
            return Err("edu did not interrupt within 5 s".into());
        }
        let mut count = [0u8; 8];
        rustix::io::read(self.msi.as_fd(), &mut count)?; // reset the eventfd's counter
        let status = self.bar.read_u32(IRQ_STATUS)?;
        if status & expect == 0 {
            return Err(format!("interrupt status {status:#x}, expected {expect:#x}").into());
        }
        self.bar.write_u32(IRQ_ACK, expect)?;
        Ok(())
    }

    fn factorial(&self, n: u32) -> Result<u32, Box<dyn std::error::Error>> {
        self.bar.write_u32(STATUS, STATUS_IRQ_ON_FACTORIAL)?;
        self.bar.write_u32(FACTORIAL, n)?;
        self.wait_interrupt(IRQ_FACTORIAL)?;
        Ok(self.bar.read_u32(FACTORIAL)?)
    }

    fn dma(&self, src: u64, dst: u64, len: u64, to_ram: bool) -> Result<(), Box<dyn std::error::Error>> {
        self.bar.write_u64(DMA_SRC, src)?;
        self.bar.write_u64(DMA_DST, dst)?;
        self.bar.write_u64(DMA_COUNT, len)?;
        self.bar.write_u64(DMA_CMD, DMA_START | DMA_IRQ | if to_ram { DMA_TO_RAM } else { 0 })?;
        self.wait_interrupt(IRQ_DMA)
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let address = std::env::args()
        .nth(1)
        .or_else(|| std::env::var("IOMMUFD_TEST_EDU_BDF").ok())
        .ok_or("usage: edu_driver <PCI address of an edu device bound to vfio-pci>")?;

    // Probe: bind the device, give it an address space, map its registers, let it master the bus.
    let iommufd = Iommufd::open()?;
    let device = VfioDevice::open_pci(&address)?.bind(&iommufd)?;
    let ioas = iommufd.alloc_ioas()?;
    let _attachment = device.attach(&ioas)?;
    let bar = device.map_region(PciRegion::Bar(0).index())?;
    println!("edu {address}: id {:#010x}", bar.read_u32(0)?);
    device.set_bus_master(true)?;

    // Interrupts: the device's one MSI vector signals an eventfd.
    let msi = eventfd(0, EventfdFlags::CLOEXEC | EventfdFlags::NONBLOCK)?;
    device.set_irq_eventfds(PciIrq::Msi.index(), 0, &[&msi])?;
    let edu = Edu { bar, msi };

    let n = 10;
    let result = edu.factorial(n)?;
    println!("{n}! = {result} (computed by the device, completion by MSI)");
    assert_eq!(result, (1..=n).product::<u32>());

    // DMA: a buffer the device reads and one it writes, both mapped through the IOMMU.
    let text = b"copied by edu's DMA engine, completion signalled by MSI";
    let mut src = DmaBuffer::new(4096)?;
    src.as_mut_slice()[..text.len()].copy_from_slice(text);
    let src = ioas.map(src, Iova::Below(EDU_DMA_LIMIT), Access::READ)?;
    let dst = ioas.map(DmaBuffer::new(4096)?, Iova::Below(EDU_DMA_LIMIT), Access::WRITE)?;
    edu.dma(src.iova(), EDU_BUFFER, 4096, false)?;
    edu.dma(EDU_BUFFER, dst.iova(), 4096, true)?;
    let mut got = vec![0u8; text.len()];
    dst.read_at(0, &mut got)?;
    assert_eq!(&got[..], &text[..]);
    println!(
        "DMA IOVA {:#x} -> device -> IOVA {:#x}: {:?}",
        src.iova(),
        dst.iova(),
        String::from_utf8_lossy(&got)
    );

    // Remove: interrupts off, bus mastering off; the drops unmap, detach and unbind.
    device.disable_irqs(PciIrq::Msi.index())?;
    device.set_bus_master(false)?;
    println!("done");
    Ok(())
}
