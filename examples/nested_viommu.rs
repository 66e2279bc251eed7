//! Nested translation for a guest with a virtual IOMMU: the setup a VMM does for an assigned device.
//!
//! Stage 2 (GPA -> host memory) is a nest-parent HWPT on the IOAS holding guest RAM at IOVA = GPA.
//! The vIOMMU object represents the guest's IOMMU instance on that parent; the device gets a vDEVICE
//! (its virtual id: the ID the guest's IOMMU driver uses for it). Stage 1 (the guest's own I/O page
//! table) is a nested HWPT allocated from the guest's table description. Guest invalidation commands
//! are forwarded to the HWPT (IOTLB) or the vIOMMU (device caches), and events the physical IOMMU
//! reports for the device arrive on a vEVENTQ to be injected into the guest.
//!
//! The kernel's mock IOMMU (`CONFIG_IOMMUFD_TEST`, feature `testing`) stands in for an IOMMU with
//! nesting (Intel VT-d scalable mode, ARM SMMUv3, AMD): its driver data types are the mock's. Run it
//! in the bundled VM (`cargo xtask vm-test`).

use std::time::Duration;

use iommufd::testing::{self, MockDevice};
use iommufd::{Access, DmaBuffer, Hwpt, HwptFlags, Iommufd, Iova, Vdevice, VeventRecord, Veventq, Viommu};

/// The guest's ID for the device (a PCI requester ID for VT-d, a stream ID for SMMUv3).
const VIRT_ID: u64 = 0x42;

fn main() {
    if let Err(e) = run() {
        eprintln!("error: {e}");
        // Exit status 77: the kernel or IOMMU lacks what this needs (the message names it).
        std::process::exit(if e.is_unsupported() { 77 } else { 1 });
    }
}

fn run() -> iommufd::Result<()> {
    let iommufd = Iommufd::open()?;

    println!("1. Guest RAM at IOVA = GPA in an IOAS, and a nest-parent HWPT on it (stage 2).");
    let ioas = iommufd.alloc_ioas()?;
    let device = MockDevice::new(&ioas)?;
    let gpa = testing::APERTURE.start;
    let guest_ram = ioas.map(DmaBuffer::new(16 << 20)?, Iova::Fixed(gpa), Access::READ_WRITE)?;
    let stage2 = Hwpt::alloc(&device, &ioas, HwptFlags::NEST_PARENT)?;

    println!("2. The vIOMMU on the nest parent, and the device's vDEVICE (virtual id {VIRT_ID:#x}).");
    let viommu = Viommu::alloc(&device, &stage2, testing::VIOMMU_TYPE, None)?;
    let vdevice = Vdevice::alloc(&viommu, &device, VIRT_ID)?;
    let mut events = Veventq::alloc(&viommu, testing::VEVENTQ_TYPE, 16)?;

    println!("3. The guest programs its IOMMU: a nested HWPT (stage 1) from its table description.");
    let stage1 = Hwpt::alloc_nested(
        &device,
        &viommu,
        &testing::nested_data(testing::IOTLB_DEFAULT),
        HwptFlags::empty(),
    )?;
    device.replace(&stage1)?;
    println!(
        "   device {} now translates through HWPT {} nested in vIOMMU {}",
        device.dev_id(),
        stage1.id(),
        viommu.id()
    );

    println!("4. The guest invalidates: IOTLB entries of its table, then a device cache entry.");
    let iotlb = testing::hwpt_invalidations(&[Some(0), Some(2)]);
    let handled = stage1.invalidate(&iotlb.entries()).map_err(|e| e.error)?;
    testing::check_iotlb(&iommufd, stage1.id(), 0, 0)?;
    testing::check_iotlb(&iommufd, stage1.id(), 1, testing::IOTLB_DEFAULT)?;
    let caches = testing::viommu_invalidations(&[(VIRT_ID as u32, Some(1))]);
    let handled_dev = viommu.invalidate(&caches.entries()).map_err(|e| e.error)?;
    device.check_dev_cache(1, 0)?;
    println!("   {handled} IOTLB and {handled_dev} device-cache invalidation(s) reached the IOMMU");

    println!("5. The IOMMU reports an event for the device: it arrives with the guest's id for it.");
    device.trigger_vevent()?;
    let records = events.read_timeout(Some(Duration::from_secs(5)))?;
    for record in &records {
        match record {
            VeventRecord::Event(event) => {
                let id = testing::vevent_virt_id(event).expect("a mock event carries a virtual id");
                println!("   event #{} for virtual id {id:#x}: inject it into the guest", event.sequence);
                assert_eq!(u64::from(id), VIRT_ID);
            }
            VeventRecord::Lost(lost) => println!("   {} event(s) lost", lost.count),
        }
    }
    assert_eq!(records.len(), 1);

    println!(
        "6. Teardown, children first: device off stage 1, then queue, vDEVICE, stage 1, vIOMMU, stage 2."
    );
    device.replace(&ioas)?;
    events.close()?;
    vdevice.destroy()?;
    stage1.destroy()?;
    viommu.destroy()?;
    stage2.destroy()?;
    guest_ram.unmap()?;
    Ok(())
}
