//! I/O page fault queues on the kernel's mock IOMMU (`CONFIG_IOMMUFD_TEST`): faults a mock device
//! raises arrive on the queue of the HWPT it is attached to, are answered by cookie, and the queue is
//! torn down after the HWPTs that report to it.
#![cfg(feature = "testing")]

use std::os::fd::AsRawFd;
use std::time::Duration;

mod common;
use common::{busy, gone, logs};

use iommufd::testing::{MockDevice, PageRequest};
use iommufd::{
    Errno, Error, FaultPerm, FaultQueue, Hwpt, HwptFlags, Iommufd, PageFault, PageFaultFlags, PageResponse,
    ResponseCode,
};

const WAIT: Option<Duration> = Some(Duration::from_secs(5));

#[track_caller]
fn errno<T: std::fmt::Debug>(r: iommufd::Result<T>) -> Errno {
    match r {
        Err(e) => e.errno().unwrap_or_else(|| panic!("expected a kernel error, got {e}")),
        Ok(v) => panic!("expected a kernel error, got Ok({v:?})"),
    }
}

fn request(group: u32, addr: u64) -> PageRequest {
    PageRequest { pasid: None, group, perm: FaultPerm::READ | FaultPerm::WRITE, addr }
}

/// An iommufd with a mock device attached to a paging HWPT whose faults go to a fresh queue.
fn setup() -> (Iommufd, iommufd::Ioas, MockDevice, FaultQueue, Hwpt) {
    let iommufd = Iommufd::open().expect("open /dev/iommu");
    let ioas = iommufd.alloc_ioas().unwrap();
    let dev = MockDevice::new(&ioas).expect("mock device (CONFIG_IOMMUFD_TEST)");
    let faults = FaultQueue::alloc(&iommufd).expect("IOMMU_FAULT_QUEUE_ALLOC");
    let hwpt = Hwpt::alloc_with_faults(&dev, &ioas, HwptFlags::empty(), &faults).expect("HWPT with fault id");
    dev.replace(&hwpt).unwrap();
    (iommufd, ioas, dev, faults, hwpt)
}

/// Before 6.13 a paging HWPT takes no fault queue: asserts that exact refusal (made before the
/// ioctl) and returns true, ending a test that needs one.
fn paging_faults_unsupported() -> bool {
    let iommufd = Iommufd::open().unwrap();
    let ioas = iommufd.alloc_ioas().unwrap();
    let dev = MockDevice::new(&ioas).unwrap();
    let faults = FaultQueue::alloc(&iommufd).unwrap();
    let r = Hwpt::alloc_with_faults(&dev, &ioas, HwptFlags::empty(), &faults);
    let op = "IOMMU_HWPT_ALLOC (IOMMU_HWPT_FAULT_ID_VALID on a paging table)";
    common::unsupported_here(&r, op, "6.13", iommufd::Errno::OPNOTSUPP)
}

#[test]
#[ignore = "needs /dev/iommu with CONFIG_IOMMUFD_TEST: run by cargo xtask vm-test"]
fn faults_are_read_and_answered() {
    if common::mock_devices_unavailable() {
        return;
    }
    if paging_faults_unsupported() {
        return;
    }
    let (_iommufd, ioas, dev, faults, _hwpt) = setup();
    assert_ne!(faults.id(), 0);
    assert!(faults.as_raw_fd() >= 0);
    assert!(faults.read().unwrap().is_empty(), "nothing pending: the read does not block");
    assert!(!faults.wait(Some(Duration::from_millis(20))).unwrap());

    dev.trigger_iopf(&request(3, 0x1234_5000)).unwrap();
    assert!(faults.wait(WAIT).unwrap(), "POLLIN once a fault is pending");
    let got = faults.read().unwrap();
    assert_eq!(got.len(), 1);
    let f = got[0];
    assert_eq!(
        f,
        PageFault {
            flags: PageFaultFlags::LAST_PAGE,
            dev_id: dev.dev_id(),
            pasid: 0,
            grpid: 3,
            perm: FaultPerm::READ | FaultPerm::WRITE,
            addr: 0x1234_5000,
            length: 0,
            cookie: f.cookie,
        }
    );
    assert!(f.is_last() && f.pasid().is_none());
    faults.respond(&f.response(ResponseCode::Success)).unwrap();
    // The group is answered: its cookie is no longer known.
    assert_eq!(errno(faults.respond(&f.response(ResponseCode::Success))), Errno::INVAL);
    assert_eq!(
        errno(faults.respond(&PageResponse { cookie: 0xdead, code: ResponseCode::Invalid })),
        Errno::INVAL
    );

    // Several groups read at once, each with its own cookie, answered in one write.
    for g in 0..3 {
        dev.trigger_iopf(&request(g, 0x2000_0000 + u64::from(g) * 0x1000)).unwrap();
    }
    let got = faults.read_timeout(WAIT).unwrap();
    assert_eq!(got.iter().map(|f| f.grpid).collect::<Vec<_>>(), [0, 1, 2]);
    let mut cookies: Vec<u32> = got.iter().map(|f| f.cookie).collect();
    cookies.dedup();
    assert_eq!(cookies.len(), 3, "one cookie per group");
    let answers: Vec<PageResponse> = got.iter().map(|f| f.response(ResponseCode::Invalid)).collect();
    assert_eq!(faults.respond_all(&answers[..2]).unwrap(), 2);
    // The kernel applies responses up to the first it rejects.
    let mixed = [answers[2], answers[0]];
    assert_eq!(faults.respond_all(&mixed).unwrap(), 1);

    // read_faults needs room for a whole group.
    dev.trigger_iopf(&request(9, 0x3000_0000)).unwrap();
    assert!(faults.wait(WAIT).unwrap());
    assert!(matches!(faults.read_faults(&mut []), Err(Error::InvalidArgument { .. })));
    let mut buf = [PageFault::default(); 4];
    assert_eq!(faults.read_faults(&mut buf).unwrap(), 1);
    assert_eq!(buf[0].grpid, 9);
    // Left unanswered: moving the device off the HWPT answers it "invalid" in the kernel.
    dev.replace(&ioas).unwrap();
    assert_eq!(errno(faults.respond(&buf[0].response(ResponseCode::Success))), Errno::INVAL);
}

#[test]
#[ignore = "needs /dev/iommu with CONFIG_IOMMUFD_TEST: run by cargo xtask vm-test"]
fn waits_without_limit_and_reads_of_many_batches() {
    if common::mock_devices_unavailable() {
        return;
    }
    if paging_faults_unsupported() {
        return;
    }
    let (_iommufd, ioas, dev, faults, _hwpt) = setup();
    // A timeout the clock cannot add to now is no limit (it used to panic on Instant overflow).
    dev.trigger_iopf(&request(1, 0x6000)).unwrap();
    assert!(faults.wait(Some(Duration::MAX)).unwrap());
    let got = faults.read_timeout(Some(Duration::MAX)).unwrap();
    assert_eq!(got.len(), 1);
    faults.respond(&got[0].response(ResponseCode::Success)).unwrap();

    // More groups than one batch holds: one read gets them all, in order.
    for g in 0..150u32 {
        dev.trigger_iopf(&request(g, 0x10_0000 + u64::from(g) * 0x1000)).unwrap();
    }
    let got = faults.read().unwrap();
    assert_eq!(got.iter().map(|f| f.grpid).collect::<Vec<_>>(), (0..150).collect::<Vec<_>>());
    assert!(got.iter().all(|f| f.is_last()));
    let answers: Vec<PageResponse> = got.iter().map(|f| f.response(ResponseCode::Success)).collect();
    assert_eq!(faults.respond_all(&answers).unwrap(), 150);
    assert!(faults.read().unwrap().is_empty());
    dev.replace(&ioas).unwrap();
}

#[test]
#[ignore = "needs /dev/iommu with CONFIG_IOMMUFD_TEST: run by cargo xtask vm-test"]
fn pasid_faults_carry_the_pasid() {
    if common::mock_devices_unavailable() {
        return;
    }
    let iommufd = Iommufd::open().unwrap();
    let ioas = iommufd.alloc_ioas().unwrap();
    let Some(dev) = common::pasid_mock_device(&ioas) else { return };
    // PASID attachment needs PASID-capable tables for the whole device and the PASID.
    let whole = Hwpt::alloc(&dev, &ioas, HwptFlags::PASID).unwrap();
    dev.replace(&whole).unwrap();
    let faults = FaultQueue::alloc(&iommufd).unwrap();
    let hwpt = Hwpt::alloc_with_faults(&dev, &ioas, HwptFlags::PASID, &faults).unwrap();
    dev.attach_pasid(5, &hwpt).unwrap();

    dev.trigger_iopf(&PageRequest { pasid: Some(5), group: 1, perm: FaultPerm::READ, addr: 0x4000 }).unwrap();
    let got = faults.read_timeout(WAIT).unwrap();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].pasid(), Some(5));
    assert!(got[0].flags.contains(PageFaultFlags::PASID_VALID | PageFaultFlags::LAST_PAGE));
    assert_eq!(got[0].perm, FaultPerm::READ);
    faults.respond(&got[0].response(ResponseCode::Success)).unwrap();
    dev.detach_pasid(5).unwrap();
}

#[test]
#[ignore = "needs /dev/iommu with CONFIG_IOMMUFD_TEST: run by cargo xtask vm-test"]
fn queue_outlives_the_hwpts_reporting_to_it() {
    if common::mock_devices_unavailable() {
        return;
    }
    if paging_faults_unsupported() {
        return;
    }
    logs::start();
    let (iommufd, ioas, dev, faults, hwpt) = setup();
    let (fault_id, hwpt_id) = (faults.id(), hwpt.id());

    // The HWPT holds the queue: refused here, and by the kernel.
    assert!(matches!(faults.clone().close(), Err(Error::InUse { .. })));
    assert!(busy(&iommufd, fault_id));

    // Drop every handle of the queue: the HWPT keeps it (fd and object) alive.
    let raw_fd = faults.as_raw_fd();
    drop(faults);
    assert!(busy(&iommufd, fault_id));
    assert!(is_fault_fd(raw_fd), "the fd stays open");

    // Moving the device off the HWPT and dropping it destroys the HWPT, then the queue.
    dev.replace(&ioas).unwrap();
    drop(hwpt);
    assert!(!is_fault_fd(raw_fd), "the fd is closed");
    assert!(gone(&iommufd, hwpt_id) && gone(&iommufd, fault_id));
    assert_eq!(logs::take(), Vec::<String>::new(), "the drops destroyed everything without error");
    dev.close().unwrap();

    // An explicit close with nothing holding the queue closes the fd, then destroys the object.
    let faults = FaultQueue::alloc(&iommufd).unwrap();
    let id = faults.id();
    faults.close().unwrap();
    assert!(gone(&iommufd, id));

    // A duplicate of the fd keeps the kernel object busy: the destroy is refused.
    // The caller has the error; the handle is given up without a second try on drop (which would
    // log, or release the object under what the caller gave up), and the object stays in the kernel.
    let faults = FaultQueue::alloc(&iommufd).unwrap();
    let id = faults.id();
    let dup = rustix::io::dup(&faults).unwrap();
    logs::start();
    assert_eq!(errno(faults.close()), Errno::BUSY);
    assert_eq!(logs::take(), Vec::<String>::new(), "a refused close is not retried on drop");
    drop(dup);
    // SAFETY: the handle for `id` is gone; the object it left behind is destroyed here.
    unsafe { iommufd.destroy_raw(id) }.expect("the object outlived the refused close");
}

/// True if fd number `raw` of this process is an iommufd fault queue.
fn is_fault_fd(raw: std::os::fd::RawFd) -> bool {
    std::fs::read_link(format!("/proc/self/fd/{raw}"))
        .is_ok_and(|target| target.to_string_lossy().contains("iommufd-pgfault"))
}

#[test]
#[ignore = "needs /dev/iommu with CONFIG_IOMMUFD_TEST: run by cargo xtask vm-test"]
fn bad_combinations_are_refused() {
    if common::mock_devices_unavailable() {
        return;
    }
    let iommufd = Iommufd::open().unwrap();
    let ioas = iommufd.alloc_ioas().unwrap();
    let dev = MockDevice::new(&ioas).unwrap();
    let faults = FaultQueue::alloc(&iommufd).unwrap();
    // The kernel reports faults of nested tables, never of a nest parent: refused before the ioctl.
    assert!(matches!(
        Hwpt::alloc_with_faults(&dev, &ioas, HwptFlags::NEST_PARENT, &faults),
        Err(Error::InvalidArgument { .. })
    ));
    // A queue of another iommufd.
    let other = Iommufd::open().unwrap();
    let foreign = FaultQueue::alloc(&other).unwrap();
    assert!(matches!(
        Hwpt::alloc_with_faults(&dev, &ioas, HwptFlags::empty(), &foreign),
        Err(Error::ForeignObject { .. })
    ));
    // A device on a HWPT without a queue raises faults nobody reads; the trigger itself succeeds.
    let plain = Hwpt::alloc(&dev, &ioas, HwptFlags::empty()).unwrap();
    dev.replace(&plain).unwrap();
    dev.trigger_iopf(&request(0, 0x1000)).unwrap();
    assert!(faults.read().unwrap().is_empty());
}

#[cfg(feature = "tokio")]
#[test]
#[ignore = "needs /dev/iommu with CONFIG_IOMMUFD_TEST: run by cargo xtask vm-test"]
fn async_fault_queue_wakes_on_a_fault() {
    if common::mock_devices_unavailable() {
        return;
    }
    if paging_faults_unsupported() {
        return;
    }
    let (_iommufd, ioas, dev, faults, _hwpt) = setup();
    let rt = tokio::runtime::Builder::new_current_thread().enable_io().build().unwrap();
    let got = std::thread::scope(|s| {
        s.spawn(|| {
            std::thread::sleep(Duration::from_millis(100));
            dev.trigger_iopf(&request(7, 0x5000)).unwrap();
        });
        rt.block_on(async {
            let q = iommufd::AsyncFaultQueue::new(faults.clone()).unwrap();
            let got = q.read().await.unwrap();
            for f in &got {
                q.respond(&f.response(ResponseCode::Success)).unwrap();
            }
            drop(q.into_inner());
            got
        })
    });
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].grpid, 7);
    dev.replace(&ioas).unwrap();
}
