//! I/O page faults handled on demand, on tokio: the device touches IOVAs nothing is mapped at, the
//! handler maps memory there and answers the fault, and the device's retried access succeeds.
//!
//! This is the loop behind demand paging of DMA memory (and behind forwarding faults to a guest with a
//! vIOMMU, where the answer comes from the guest instead). The kernel's mock IOMMU
//! (`CONFIG_IOMMUFD_TEST`, feature `testing`) plays the device: `trigger_iopf` raises a fault as a
//! PRI-capable device would, and its emulated access path reads the page afterwards. Needs features
//! `testing` and `tokio`; run it in the bundled VM (`cargo xtask vm-test`).

use std::collections::HashMap;
use std::sync::mpsc;
use std::time::Duration;

use iommufd::testing::{self, MockAccess, MockDevice, PageRequest};
use iommufd::{
    Access, AsyncFaultQueue, DmaBuffer, FaultPerm, FaultQueue, Hwpt, HwptFlags, Iommufd, Iova, Mapping,
    ResponseCode,
};

const PAGE: u64 = 4096;
/// The IOVAs the device touches, in the mock's aperture, none mapped beforehand.
const TOUCHED: [u64; 5] = [0x10, 0x11, 0x40, 0x41, 0x2000];

fn main() {
    if let Err(e) = run() {
        eprintln!("error: {e}");
        // Exit status 77: the kernel or IOMMU lacks what this needs (the message names it).
        std::process::exit(
            if e.downcast_ref::<iommufd::Error>().is_some_and(iommufd::Error::is_unsupported) {
                77
            } else {
                1
            },
        );
    }
}

fn run() -> Result<(), Box<dyn std::error::Error>> {
    let iommufd = Iommufd::open()?;
    let ioas = iommufd.alloc_ioas()?;
    let device = MockDevice::new(&ioas)?;
    // Faults of the device's page table go to this queue instead of failing the DMA.
    let queue = FaultQueue::alloc(&iommufd)?;
    let hwpt = Hwpt::alloc_with_faults(&device, &ioas, HwptFlags::empty(), &queue)?;
    device.replace(&hwpt)?;
    let iovas: Vec<u64> = TOUCHED.iter().map(|page| testing::APERTURE.start + page * PAGE).collect();

    // The device, on its own thread: raise a fault per IOVA, wait for its answer, retry the access.
    let (answered_tx, answered_rx) = mpsc::channel::<u64>();
    let device_thread = {
        let (device, ioas, iovas) = (device.clone(), ioas.clone(), iovas.clone());
        std::thread::spawn(move || -> iommufd::Result<Vec<u8>> {
            let access = MockAccess::new(&ioas)?;
            let mut seen = Vec::new();
            for (group, &iova) in iovas.iter().enumerate() {
                let perm = FaultPerm::READ | FaultPerm::WRITE;
                device.trigger_iopf(&PageRequest { pasid: None, group: group as u32, perm, addr: iova })?;
                let answered = answered_rx.recv_timeout(Duration::from_secs(10)).expect("fault answered");
                assert_eq!(answered, iova);
                let mut byte = [0u8];
                access.read(iova, &mut byte)?; // mapped now: the retried access succeeds
                seen.push(byte[0]);
            }
            Ok(seen)
        })
    };

    // The handler: map a page where the device faulted, then answer the fault group.
    let runtime = tokio::runtime::Builder::new_current_thread().enable_io().build()?;
    let mut mapped: HashMap<u64, Mapping<DmaBuffer>> = HashMap::new();
    runtime.block_on(async {
        let queue = AsyncFaultQueue::new(queue.clone())?;
        while mapped.len() < iovas.len() {
            for fault in queue.read().await? {
                let page = fault.addr & !(PAGE - 1);
                println!(
                    "fault: device {} group {} at {:#x} ({:?})",
                    fault.dev_id, fault.grpid, fault.addr, fault.perm
                );
                if !mapped.contains_key(&page) {
                    let mut memory = DmaBuffer::new(PAGE as usize)?;
                    memory.as_mut_slice()[0] = mapped.len() as u8 + 1; // something to read back
                    mapped.insert(page, ioas.map(memory, Iova::Fixed(page), Access::READ_WRITE)?);
                }
                if fault.is_last() {
                    queue.respond(&fault.response(ResponseCode::Success))?;
                    answered_tx.send(page).expect("the device thread waits for answers");
                }
            }
        }
        Ok::<(), iommufd::Error>(())
    })?;

    let seen = device_thread.join().expect("device thread")?;
    println!("the device read {seen:?} from the pages mapped on demand");
    assert_eq!(seen, (1..=iovas.len() as u8).collect::<Vec<_>>());

    for (_, mapping) in mapped {
        mapping.unmap()?;
    }
    device.replace(&ioas)?;
    hwpt.destroy()?;
    Ok(())
}
