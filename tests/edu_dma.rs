//! Real DMA through the IOMMU with QEMU's edu device, both directions, byte-compared; DMA to an
//! unmapped IOVA, after an unmap, and into a read-only mapping must leave memory untouched.

mod common;

use common::{Edu, bind, pattern};
use iommufd::{Access, DmaBuffer, Hwpt, HwptFlags, Iommufd, Iova, page_size};

const LEN: u64 = 4096;

fn buffer_with(bytes: &[u8]) -> DmaBuffer {
    let mut b = DmaBuffer::new(bytes.len()).unwrap();
    b.as_mut_slice()[..bytes.len()].copy_from_slice(bytes);
    b
}

#[test]
#[ignore = "needs /dev/iommu and the edu device: run by cargo xtask vm-test"]
fn dma_round_trip_through_the_iommu() {
    let fd = Iommufd::open().unwrap();
    let dev = bind(&fd);
    let ioas = fd.alloc_ioas().unwrap();
    let _att = dev.attach(&ioas).unwrap();
    let edu = Edu::new(&dev);

    let data = pattern(1, LEN as usize);
    let src = ioas.map(buffer_with(&data), Iova::Fixed(0x10_0000), Access::READ).unwrap();
    let dst = ioas.map(DmaBuffer::new(LEN as usize).unwrap(), Iova::Auto, Access::READ_WRITE).unwrap();
    assert!(dst.iova() + LEN <= 1 << 28, "edu's default DMA mask is 28 bits: {dst:?}");
    edu.ram_to_device(src.iova(), LEN);
    edu.device_to_ram(dst.iova(), LEN);
    assert_eq!(dst.to_vec().unwrap(), data, "RAM -> edu -> RAM through IOVAs");
    let back = dst.unmap().unwrap().unwrap();
    assert_eq!(back.as_slice(), &data[..]);
}

#[test]
#[ignore = "needs /dev/iommu and the edu device: run by cargo xtask vm-test"]
fn dma_through_an_allocated_hwpt_and_a_file_mapping() {
    let fd = Iommufd::open().unwrap();
    let dev = bind(&fd);
    let ioas = fd.alloc_ioas().unwrap();
    let hwpt = Hwpt::alloc(&dev, &ioas, HwptFlags::empty()).unwrap();
    let _att = dev.attach(&hwpt).unwrap();
    let edu = Edu::new(&dev);

    let data = pattern(2, LEN as usize);
    let file = rustix::fs::memfd_create("edu-src", rustix::fs::MemfdFlags::CLOEXEC).unwrap();
    rustix::fs::ftruncate(&file, LEN).unwrap();
    rustix::io::pwrite(&file, &data, 0).unwrap();
    let r = ioas.map_file(&file, 0, LEN, Iova::Fixed(0x20_0000), Access::READ);
    if common::unsupported_here(&r, "IOMMU_IOAS_MAP_FILE", "6.13", iommufd::Errno::NOTTY) {
        return;
    }
    let src = r.unwrap();
    let dst = ioas.map(DmaBuffer::new(LEN as usize).unwrap(), Iova::Fixed(0x30_0000), Access::WRITE).unwrap();
    edu.ram_to_device(src.iova(), LEN);
    edu.device_to_ram(dst.iova(), LEN);
    assert_eq!(dst.to_vec().unwrap(), data, "file pages -> edu -> buffer, translated by the HWPT");
}

#[test]
#[ignore = "needs /dev/iommu and the edu device: run by cargo xtask vm-test"]
fn dma_to_unmapped_iova_and_after_unmap_is_blocked() {
    let fd = Iommufd::open().unwrap();
    let dev = bind(&fd);
    let ioas = fd.alloc_ioas().unwrap();
    let _att = dev.attach(&ioas).unwrap();
    let edu = Edu::new(&dev);

    // Load edu's buffer with a pattern.
    let data = pattern(3, LEN as usize);
    let src = ioas.map(buffer_with(&data), Iova::Fixed(0x10_0000), Access::READ).unwrap();
    edu.ram_to_device(src.iova(), LEN);

    // A mapped victim buffer, and a write to an IOVA nothing is mapped at.
    let victim =
        ioas.map(DmaBuffer::new(LEN as usize).unwrap(), Iova::Fixed(0x40_0000), Access::READ_WRITE).unwrap();
    edu.device_to_ram(0x50_0000, LEN);
    assert!(victim.to_vec().unwrap().iter().all(|&b| b == 0), "blocked DMA must not land anywhere");

    // The device can write the victim while it is mapped...
    edu.device_to_ram(victim.iova(), LEN);
    assert_eq!(victim.to_vec().unwrap(), data);
    // ...and no longer once it is unmapped, although the buffer still exists.
    let old_iova = victim.iova();
    let mut buf = victim.unmap().unwrap().unwrap();
    buf.as_mut_slice().fill(0);
    let other = pattern(4, LEN as usize);
    let src2 = ioas.map(buffer_with(&other), Iova::Fixed(0x60_0000), Access::READ).unwrap();
    edu.ram_to_device(src2.iova(), LEN);
    edu.device_to_ram(old_iova, LEN);
    assert!(buf.as_slice().iter().all(|&b| b == 0), "DMA after unmap reached the old buffer");
}

#[test]
#[ignore = "needs /dev/iommu and the edu device: run by cargo xtask vm-test"]
fn read_only_mapping_blocks_device_writes() {
    let fd = Iommufd::open().unwrap();
    let dev = bind(&fd);
    let ioas = fd.alloc_ioas().unwrap();
    let _att = dev.attach(&ioas).unwrap();
    let edu = Edu::new(&dev);

    let original = pattern(5, LEN as usize);
    let ro = ioas.map(buffer_with(&original), Iova::Fixed(0x10_0000), Access::READ).unwrap();
    // Reads are allowed: the device copies the read-only buffer into its own.
    edu.ram_to_device(ro.iova(), LEN);
    let check =
        ioas.map(DmaBuffer::new(LEN as usize).unwrap(), Iova::Fixed(0x20_0000), Access::WRITE).unwrap();
    edu.device_to_ram(check.iova(), LEN);
    assert_eq!(check.to_vec().unwrap(), original, "device read the read-only mapping");
    // Writes are not: load different data into edu and try to write it over the read-only buffer.
    let other = pattern(6, LEN as usize);
    let src = ioas.map(buffer_with(&other), Iova::Fixed(0x30_0000), Access::READ).unwrap();
    edu.ram_to_device(src.iova(), LEN);
    edu.device_to_ram(ro.iova(), LEN);
    assert_eq!(ro.to_vec().unwrap(), original, "the IOMMU must block writes to a read-only mapping");
    assert_eq!(page_size() as u64 % LEN, 0);
}

#[test]
#[ignore = "needs /dev/iommu and the edu device: run by cargo xtask vm-test"]
fn map_file_pins_with_a_domain_attached_and_refuses_what_it_cannot_pin() {
    // Without an IOMMU domain the kernel records a file mapping without pinning it; with a device
    // attached it pins at once, so files it cannot pin are refused at map time.
    let fd = Iommufd::open().unwrap();
    let dev = bind(&fd);
    let ioas = fd.alloc_ioas().unwrap();
    let _att = dev.attach(&ioas).unwrap();
    let file = rustix::fs::memfd_create("short", rustix::fs::MemfdFlags::CLOEXEC).unwrap();
    rustix::fs::ftruncate(&file, LEN).unwrap();
    let r = ioas.map_file(&file, 0, LEN, Iova::Fixed(0x10_0000), Access::READ);
    if common::unsupported_here(&r, "IOMMU_IOAS_MAP_FILE", "6.13", iommufd::Errno::NOTTY) {
        return;
    }
    r.unwrap().unmap().unwrap();
    // Past the end of the file: refused by this crate before the ioctl, attached or not.
    match ioas.map_file(&file, 0, 2 * LEN, Iova::Fixed(0x10_0000), Access::READ) {
        Err(iommufd::Error::InvalidArgument { reason, .. }) => {
            assert!(reason.contains("past the end"), "{reason}")
        }
        other => panic!("expected a refusal before the ioctl, got {other:?}"),
    }
    // A pipe cannot be pinned: Linux 7.3.4 answers EINVAL (measured in the VM).
    let (pipe_r, _pipe_w) = rustix::pipe::pipe().unwrap();
    let e = ioas.map_file(&pipe_r, 0, LEN, Iova::Fixed(0x20_0000), Access::READ).unwrap_err();
    assert!(matches!(e, iommufd::Error::Ioctl { op: "IOMMU_IOAS_MAP_FILE", .. }), "{e}");
    assert_eq!(e.errno(), Some(iommufd::Errno::INVAL), "{e}");
    assert_eq!(ioas.unmap_all().unwrap(), 0, "nothing left behind by the failed maps");
}

/// Waits up to 5 s for `efd` to be signalled and returns its counter.
fn wait_eventfd(efd: &std::os::fd::OwnedFd) -> u64 {
    use rustix::event::{PollFd, PollFlags, Timespec, poll};
    let mut fds = [PollFd::new(efd, PollFlags::IN)];
    let timeout = Timespec { tv_sec: 5, tv_nsec: 0 };
    let n = poll(&mut fds, Some(&timeout)).unwrap();
    assert_eq!(n, 1, "no interrupt within 5 s");
    let mut counter = [0u8; 8];
    rustix::io::read(efd, &mut counter).unwrap();
    u64::from_ne_bytes(counter)
}

#[test]
#[ignore = "needs /dev/iommu and the edu device: run by cargo xtask vm-test"]
fn interrupts_reach_an_eventfd() {
    use iommufd::{IrqFlags, PciIrq, PciRegion};
    let fd = Iommufd::open().unwrap();
    let dev = bind(&fd);
    let intx = PciIrq::Intx.index();
    let info = dev.irq_info(intx).unwrap();
    assert_eq!(info.count, 1, "{info:?}");
    assert!(info.flags.contains(IrqFlags::EVENTFD | IrqFlags::MASKABLE | IrqFlags::AUTOMASKED), "{info:?}");
    assert!(dev.irq_info(PciIrq::Msi.index()).unwrap().count >= 1, "edu has MSI");
    let efd = rustix::event::eventfd(
        0,
        rustix::event::EventfdFlags::CLOEXEC | rustix::event::EventfdFlags::NONBLOCK,
    )
    .unwrap();
    dev.set_irq_eventfds(intx, 0, &[&efd]).unwrap();
    // Loopback: VFIO signals the eventfd as if the interrupt fired.
    dev.trigger_irq(intx, 0).unwrap();
    assert_eq!(wait_eventfd(&efd), 1);
    // A real interrupt: edu raises INTx when its raise register (0x60) is written; status is at 0x24,
    // acknowledged through 0x64. vfio-pci masks the line when it fires (AUTOMASKED): unmask first.
    dev.unmask_irq(intx, 0).unwrap();
    let bar = dev.map_region(PciRegion::Bar(0).index()).unwrap();
    bar.write_u32(0x60, 0x5a).unwrap();
    assert!(wait_eventfd(&efd) >= 1);
    assert_eq!(bar.read_u32(0x24).unwrap(), 0x5a, "edu's interrupt status");
    bar.write_u32(0x64, 0x5a).unwrap();
    assert_eq!(bar.read_u32(0x24).unwrap(), 0);
    dev.disable_irqs(intx).unwrap();
    // Disabled: a loopback trigger has nowhere to go and is refused.
    assert!(dev.trigger_irq(intx, 0).is_err());
}
