//! The first demo: real DMA through an IOMMU with QEMU's `edu` PCI device.
//!
//! Run it inside the bundled VM with `cargo xtask vm-demo`, or on any machine whose edu device is bound
//! to vfio-pci: `cargo run --example edu_dma -- 0000:00:03.0`.

use std::time::{Duration, Instant};

use iommufd::{Access, DmaBuffer, Iommufd, Iova, PciRegion, RegionMapping, VfioDevice};

const EDU_BUF: u64 = 0x40000;

fn wait_idle(bar: &RegionMapping) -> iommufd::Result<()> {
    let start = Instant::now();
    while bar.read_u64(0x98)? & 1 != 0 {
        if start.elapsed() > Duration::from_secs(20) {
            panic!("edu DMA did not finish in 20 s");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    Ok(())
}

fn dma(bar: &RegionMapping, src: u64, dst: u64, len: u64, to_ram: bool) -> iommufd::Result<()> {
    wait_idle(bar)?;
    bar.write_u64(0x80, src)?;
    bar.write_u64(0x88, dst)?;
    bar.write_u64(0x90, len)?;
    bar.write_u64(0x98, 1 | if to_ram { 2 } else { 0 })?;
    wait_idle(bar)
}

fn main() -> iommufd::Result<()> {
    let address = std::env::args()
        .nth(1)
        .or_else(|| std::env::var("IOMMUFD_TEST_EDU_BDF").ok())
        .expect("usage: edu_dma <PCI address of an edu device bound to vfio-pci>");

    println!("1. Open /dev/iommu: the context that owns address spaces and bound devices.");
    let iommufd = Iommufd::open()?;

    println!("2. Open the edu device's VFIO cdev by PCI address ({address}) and bind it to the iommufd.");
    let device = VfioDevice::open_pci(&address)?.bind(&iommufd)?;
    println!("   device id {} in this iommufd; IOMMU: {:?}", device.dev_id(), device.hw_info()?.data);
    let group = device.group()?;
    println!(
        "   isolation fact: IOMMU group {} with {} device(s), all bound here: {}",
        group.number,
        group.devices.len(),
        group.all_bound_here()
    );

    println!("3. Allocate an I/O address space (IOAS) and attach the device to it.");
    let ioas = iommufd.alloc_ioas()?;
    let attachment = device.attach(&ioas)?;
    let ranges = ioas.iova_ranges()?;
    println!("   usable IOVA ranges: {:x?}, alignment {:#x}", ranges.ranges, ranges.alignment);

    println!("4. Map BAR0 (edu's registers) and turn bus mastering on (vfio-pci leaves it off).");
    let bar = device.map_region(PciRegion::Bar(0).index())?;
    println!("   edu id register: {:#010x}", bar.read_u32(0)?);
    device.set_bus_master(true)?;

    println!("5. Map two DMA buffers. The IOAS takes ownership: no Rust reference can alias device writes.");
    let message = b"Hello from RAM, copied by a PCI device through the IOMMU!";
    let mut src = DmaBuffer::new(4096)?;
    src.as_mut_slice()[..message.len()].copy_from_slice(message);
    let src = ioas.map(src, Iova::Fixed(0x10_0000), Access::READ)?;
    let dst = ioas.map(DmaBuffer::new(4096)?, Iova::Fixed(0x20_0000), Access::READ_WRITE)?;
    println!(
        "   source at IOVA {:#x} (device may only read), destination at IOVA {:#x}",
        src.iova(),
        dst.iova()
    );

    println!("6. edu DMA: RAM (IOVA {:#x}) -> device buffer -> RAM (IOVA {:#x}).", src.iova(), dst.iova());
    dma(&bar, src.iova(), EDU_BUF, 4096, false)?;
    dma(&bar, EDU_BUF, dst.iova(), 4096, true)?;
    let mut got = vec![0u8; message.len()];
    dst.read_at(0, &mut got)?;
    println!("   destination now reads: {:?}", String::from_utf8_lossy(&got));
    assert_eq!(&got, message);

    println!("7. DMA to an IOVA nothing is mapped at (0x50_0000): the IOMMU blocks it.");
    dst.write_at(0, &[0u8; 4096])?;
    dma(&bar, EDU_BUF, 0x50_0000, 4096, true)?;
    let mut src_bytes = vec![0u8; 4096];
    src_bytes[..message.len()].copy_from_slice(message);
    assert_eq!(src.to_vec()?, src_bytes, "a blocked DMA changed the source buffer");
    assert!(dst.to_vec()?.iter().all(|&b| b == 0), "a blocked DMA changed the destination buffer");
    println!(
        "   the DMA completed from the device's view, but no buffer changed (the kernel logs a DMAR fault)."
    );

    println!("8. A write into the read-only source mapping is blocked too.");
    dma(&bar, EDU_BUF, src.iova(), 4096, true)?;
    let mut head = vec![0u8; message.len()];
    src.read_at(0, &mut head)?;
    assert_eq!(&head, message);
    println!("   source unchanged: {:?}", String::from_utf8_lossy(&head));

    println!("9. Unmap: the buffer comes back only after the kernel confirms the IOVA range is gone.");
    let back = dst.unmap()?.expect("not shared");
    println!(
        "   got the destination buffer back ({} bytes); first bytes {:?}",
        back.len(),
        &back.as_slice()[..5]
    );
    drop(src);

    println!("10. Detach and tear down (dropping would do the same, in the order the kernel requires).");
    device.set_bus_master(false)?;
    drop(bar);
    attachment.detach()?;
    ioas.destroy()?;
    device.close()?;
    println!("Done: DMA went through the IOMMU both ways, and stray DMA was blocked.");
    Ok(())
}
