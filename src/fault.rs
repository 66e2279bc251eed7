//! I/O page faults: a [`FaultQueue`] (`IOMMU_FAULT_QUEUE_ALLOC`, Linux 6.11) delivers the page requests
//! of devices attached to HWPTs allocated with its id, and takes the responses.
//!
//! The kernel hands out two things for one fault queue: an object id (passed as `fault_id` when a HWPT
//! is allocated with `IOMMU_HWPT_FAULT_ID_VALID`) and a file descriptor. Reading the fd yields
//! `struct iommu_hwpt_pgfault` records, a whole fault group at a time; writing
//! `struct iommu_hwpt_page_response` records answers a group by its cookie. The fd is pollable
//! (`POLLIN` while faults are pending) but never blocks: a read with nothing pending returns no
//! records, so waiting is done with [`FaultQueue::wait`] (or, with the `tokio` feature,
//! `AsyncFaultQueue`).

use std::mem::{offset_of, size_of};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use iommufd_sys as sys;
use rustix::event::{PollFd, PollFlags, Timespec};
use rustix::io::Errno;

use crate::error::{Error, Result};
use crate::hwpt::{FaultSource, ObjRef, sealed};
use crate::ioctl::{self, Sized32};
use crate::iommufd::Iommufd;
use crate::object::Object;

bitflags::bitflags! {
    /// Flags of a [`PageFault`] (`enum iommu_hwpt_pgfault_flags`).
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
    pub struct PageFaultFlags: u32 {
        /// The [`pasid`](PageFault::pasid) field is valid (`IOMMU_PGFAULT_FLAGS_PASID_VALID`).
        const PASID_VALID = sys::IOMMU_PGFAULT_FLAGS_PASID_VALID;
        /// The last fault of its group: answer the group once this one has been handled
        /// (`IOMMU_PGFAULT_FLAGS_LAST_PAGE`).
        const LAST_PAGE = sys::IOMMU_PGFAULT_FLAGS_LAST_PAGE;
        // Bits a newer kernel may report survive.
        const _ = !0;
    }
}

bitflags::bitflags! {
    /// The access a faulting request asked for (`enum iommu_hwpt_pgfault_perm`).
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
    pub struct FaultPerm: u32 {
        /// Read permission (`IOMMU_PGFAULT_PERM_READ`).
        const READ = sys::IOMMU_PGFAULT_PERM_READ;
        /// Write permission (`IOMMU_PGFAULT_PERM_WRITE`).
        const WRITE = sys::IOMMU_PGFAULT_PERM_WRITE;
        /// Execute Requested bit of the PASID TLP prefix (`IOMMU_PGFAULT_PERM_EXEC`).
        const EXEC = sys::IOMMU_PGFAULT_PERM_EXEC;
        /// Privileged Mode Requested bit of the PASID TLP prefix (`IOMMU_PGFAULT_PERM_PRIV`).
        const PRIV = sys::IOMMU_PGFAULT_PERM_PRIV;
        // Bits a newer kernel may report survive.
        const _ = !0;
    }
}

/// One I/O page fault, as read from a [`FaultQueue`] (`struct iommu_hwpt_pgfault`).
///
/// Faults come in groups (a PCI Page Request Group): every fault of a group carries the same
/// [`cookie`](Self::cookie), and the last one has [`PageFaultFlags::LAST_PAGE`]. A group is answered
/// once, with [`FaultQueue::respond`] and that cookie.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct PageFault {
    /// Flags.
    pub flags: PageFaultFlags,
    /// The iommufd device id of the faulting device.
    pub dev_id: u32,
    /// The PASID of the request; meaningful only with [`PageFaultFlags::PASID_VALID`] (see
    /// [`pasid`](Self::pasid)).
    pub pasid: u32,
    /// The Page Request Group Index.
    pub grpid: u32,
    /// The access requested.
    pub perm: FaultPerm,
    /// The faulting address (an IOVA of the HWPT the device is attached to).
    pub addr: u64,
    /// A hint of how many bytes the device expects to access from `addr`; 0 when there is no hint.
    pub length: u32,
    /// The kernel's cookie for the fault's group, echoed in the response.
    pub cookie: u32,
}

/// Size of one fault record on the fd.
const FAULT_RECORD: usize = size_of::<sys::iommu_hwpt_pgfault>();
/// Size of one response record on the fd.
const RESPONSE_RECORD: usize = size_of::<sys::iommu_hwpt_page_response>();

fn u32_at(b: &[u8], off: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[off..off + 4]);
    u32::from_ne_bytes(a)
}

fn u64_at(b: &[u8], off: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[off..off + 8]);
    u64::from_ne_bytes(a)
}

impl PageFault {
    /// The PASID, if the request carried one.
    pub fn pasid(&self) -> Option<u32> {
        self.flags.contains(PageFaultFlags::PASID_VALID).then_some(self.pasid)
    }

    /// True for the last fault of its group (the one to answer).
    pub fn is_last(&self) -> bool {
        self.flags.contains(PageFaultFlags::LAST_PAGE)
    }

    /// The response that answers this fault's group with `code`.
    pub fn response(&self, code: ResponseCode) -> PageResponse {
        PageResponse { cookie: self.cookie, code }
    }

    /// Decodes one `struct iommu_hwpt_pgfault` record (native endian, as the kernel writes it).
    pub(crate) fn from_record(r: &[u8; FAULT_RECORD]) -> PageFault {
        type F = sys::iommu_hwpt_pgfault;
        PageFault {
            flags: PageFaultFlags::from_bits_retain(u32_at(r, offset_of!(F, flags))),
            dev_id: u32_at(r, offset_of!(F, dev_id)),
            pasid: u32_at(r, offset_of!(F, pasid)),
            grpid: u32_at(r, offset_of!(F, grpid)),
            perm: FaultPerm::from_bits_retain(u32_at(r, offset_of!(F, perm))),
            addr: u64_at(r, offset_of!(F, addr)),
            length: u32_at(r, offset_of!(F, length)),
            cookie: u32_at(r, offset_of!(F, cookie)),
        }
    }

    /// Encodes the record the kernel would write for this fault (for tests of the decoder).
    #[cfg(test)]
    pub(crate) fn to_record(self) -> [u8; FAULT_RECORD] {
        type F = sys::iommu_hwpt_pgfault;
        let mut r = [0u8; FAULT_RECORD];
        let mut put = |off: usize, bytes: &[u8]| r[off..off + bytes.len()].copy_from_slice(bytes);
        put(offset_of!(F, flags), &self.flags.bits().to_ne_bytes());
        put(offset_of!(F, dev_id), &self.dev_id.to_ne_bytes());
        put(offset_of!(F, pasid), &self.pasid.to_ne_bytes());
        put(offset_of!(F, grpid), &self.grpid.to_ne_bytes());
        put(offset_of!(F, perm), &self.perm.bits().to_ne_bytes());
        put(offset_of!(F, addr), &self.addr.to_ne_bytes());
        put(offset_of!(F, length), &self.length.to_ne_bytes());
        put(offset_of!(F, cookie), &self.cookie.to_ne_bytes());
        r
    }
}

/// How a fault group was handled (`enum iommufd_page_response_code`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ResponseCode {
    /// The page tables now map the faulting addresses: the device retries the access
    /// (`IOMMUFD_PAGE_RESP_SUCCESS`, PCI "Success").
    Success,
    /// The fault could not be handled: the device does not retry (`IOMMUFD_PAGE_RESP_INVALID`, PCI
    /// "Invalid Request").
    Invalid,
}

impl ResponseCode {
    /// The kernel's value.
    pub fn raw(self) -> u32 {
        match self {
            ResponseCode::Success => sys::IOMMUFD_PAGE_RESP_SUCCESS,
            ResponseCode::Invalid => sys::IOMMUFD_PAGE_RESP_INVALID,
        }
    }
}

/// The answer to one fault group (`struct iommu_hwpt_page_response`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PageResponse {
    /// The [`cookie`](PageFault::cookie) of the group's faults.
    pub cookie: u32,
    /// The outcome.
    pub code: ResponseCode,
}

impl PageResponse {
    fn to_record(self) -> [u8; RESPONSE_RECORD] {
        type R = sys::iommu_hwpt_page_response;
        let mut r = [0u8; RESPONSE_RECORD];
        r[offset_of!(R, cookie)..][..4].copy_from_slice(&self.cookie.to_ne_bytes());
        r[offset_of!(R, code)..][..4].copy_from_slice(&self.code.raw().to_ne_bytes());
        r
    }
}

/// Decodes a buffer of whole fault records.
pub(crate) fn parse_faults(bytes: &[u8], out: &mut [PageFault]) -> Result<usize> {
    if bytes.len() % FAULT_RECORD != 0 || bytes.len() / FAULT_RECORD > out.len() {
        return Err(Error::Protocol {
            op: "read(fault queue)",
            detail: format!(
                "{} bytes is not a whole number of {FAULT_RECORD}-byte records, or more than the {} asked for",
                bytes.len(),
                out.len()
            ),
        });
    }
    let mut n = 0;
    for (record, slot) in bytes.chunks_exact(FAULT_RECORD).zip(out.iter_mut()) {
        let mut r = [0u8; FAULT_RECORD];
        r.copy_from_slice(record);
        *slot = PageFault::from_record(&r);
        n += 1;
    }
    Ok(n)
}

/// Waits until `fd` is readable or `timeout` passes (`None`: forever). Retries on `EINTR`.
pub(crate) fn poll_readable(fd: BorrowedFd<'_>, timeout: Option<Duration>, op: &'static str) -> Result<bool> {
    let deadline = timeout.map(|t| Instant::now() + t);
    loop {
        let remaining = deadline.map(|d| d.saturating_duration_since(Instant::now()));
        let ts =
            remaining.map(|r| Timespec::try_from(r).unwrap_or(Timespec { tv_sec: i64::MAX, tv_nsec: 0 }));
        let mut fds = [PollFd::from_borrowed_fd(fd, PollFlags::IN)];
        match rustix::event::poll(&mut fds, ts.as_ref()) {
            Ok(0) => return Ok(false),
            Ok(_) => {
                let revents = fds[0].revents();
                if revents.intersects(PollFlags::ERR | PollFlags::NVAL) {
                    return Err(Error::os(op, Errno::IO));
                }
                return Ok(revents.contains(PollFlags::IN));
            }
            Err(Errno::INTR) => continue,
            Err(e) => return Err(Error::os(op, e)),
        }
    }
}

struct FaultInner {
    // Field order is teardown order: the fd holds a reference on the kernel object (destroying it
    // while the fd is open gives EBUSY), so it is closed before the object is destroyed.
    fd: OwnedFd,
    obj: Object,
}

/// An I/O page fault queue (`IOMMU_FAULT_QUEUE_ALLOC`, Linux 6.11): the kernel object id and its
/// file descriptor, owned together.
///
/// Pass the queue to [`Hwpt::alloc_with_faults`](crate::Hwpt::alloc_with_faults) (or the nested
/// variant), which allocates the HWPT with this queue's [`id`](Self::id) as its fault id
/// (`IOMMU_HWPT_FAULT_ID_VALID`): page requests of devices attached to that HWPT then arrive here. Read them with
/// [`read`](Self::read) (never blocks), wait with [`wait`](Self::wait) or poll the fd
/// ([`AsFd`]), and answer each group with [`respond`](Self::respond).
///
/// Cloning shares the queue (for example a reader thread and a responder). When the last clone is
/// dropped the fd is closed and then the object destroyed (the open fd holds the object, so the
/// other order fails with `EBUSY`). Groups still unanswered then are answered "invalid" by the
/// kernel. A HWPT allocated with the queue holds the kernel object, and its handle holds this one,
/// so the HWPT is destroyed first.
#[derive(Clone)]
pub struct FaultQueue {
    inner: Arc<FaultInner>,
}

impl std::fmt::Debug for FaultQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FaultQueue").field("id", &self.id()).field("fd", &self.inner.fd.as_raw_fd()).finish()
    }
}

impl FaultQueue {
    /// The most faults [`read`](Self::read) asks the kernel for at once, and the largest group it can
    /// take.
    const MAX_BATCH: usize = 4096;

    /// Allocates a fault queue (`IOMMU_FAULT_QUEUE_ALLOC`, Linux 6.11).
    pub fn alloc(iommufd: &Iommufd) -> Result<FaultQueue> {
        let mut arg = sys::iommu_fault_alloc::new();
        // SAFETY: IOMMU_FAULT_QUEUE_ALLOC takes `iommu_fault_alloc`, sized by `new()`; it holds no
        // pointers, and the kernel writes the new id and fd back through the exclusive borrow.
        unsafe { ioctl::call(iommufd.as_fd(), &ioctl::FAULT_QUEUE_ALLOC, &mut arg) }?;
        // SAFETY: on success the kernel installed `out_fault_fd` in this process's fd table as a new
        // O_CLOEXEC file that nothing else refers to; ownership passes to us here, at once.
        let fd = unsafe { OwnedFd::from_raw_fd(arg.out_fault_fd as RawFd) };
        let obj = Object::new(iommufd, arg.out_fault_id, "fault queue");
        Ok(FaultQueue { inner: Arc::new(FaultInner { fd, obj }) })
    }

    /// The kernel's id for the queue: the `fault_id` a HWPT is allocated with.
    pub fn id(&self) -> u32 {
        self.inner.obj.id()
    }

    /// The iommufd the queue belongs to.
    pub fn iommufd(&self) -> &Iommufd {
        self.inner.obj.iommufd()
    }

    /// Reads pending faults into `buf` without blocking and returns how many were stored (0: none
    /// pending).
    ///
    /// The kernel hands out whole groups only: if the next group has more faults than `buf` holds,
    /// nothing is read and [`Error::InvalidArgument`] is returned (use [`read`](Self::read), which
    /// sizes its buffer). Faults read here have been handed over: each group must be answered with
    /// [`respond`](Self::respond), or the device waits until the queue is closed.
    pub fn read_faults(&self, buf: &mut [PageFault]) -> Result<usize> {
        const OP: &str = "read(fault queue)";
        if buf.is_empty() {
            return Err(Error::invalid(OP, "the buffer holds no fault"));
        }
        let mut bytes = vec![0u8; buf.len() * FAULT_RECORD];
        match rustix::io::read(self.inner.fd.as_fd(), &mut bytes) {
            Ok(n) => parse_faults(&bytes[..n], buf),
            Err(Errno::INVAL) => Err(Error::invalid(
                OP,
                format!("the next fault group has more than {} faults: pass a larger buffer", buf.len()),
            )),
            Err(e) => Err(Error::os(OP, e)),
        }
    }

    /// Reads every pending fault without blocking (an empty vector: none pending).
    pub fn read(&self) -> Result<Vec<PageFault>> {
        let mut out = Vec::new();
        let mut batch = 64;
        loop {
            let mut buf = vec![PageFault::default(); batch];
            match self.read_faults(&mut buf) {
                Ok(0) => return Ok(out),
                Ok(n) => out.extend_from_slice(&buf[..n]),
                // A group larger than the buffer: retry with a larger one.
                Err(Error::InvalidArgument { .. }) if batch < Self::MAX_BATCH => batch *= 4,
                Err(e) => return Err(e),
            }
        }
    }

    /// Waits until a fault is pending or `timeout` passes (`None`: no limit). Returns whether a fault
    /// is pending.
    pub fn wait(&self, timeout: Option<Duration>) -> Result<bool> {
        poll_readable(self.inner.fd.as_fd(), timeout, "poll(fault queue)")
    }

    /// Waits as [`wait`](Self::wait) does, then reads every pending fault (empty on timeout).
    pub fn read_timeout(&self, timeout: Option<Duration>) -> Result<Vec<PageFault>> {
        let deadline = timeout.map(|t| Instant::now() + t);
        loop {
            let remaining = deadline.map(|d| d.saturating_duration_since(Instant::now()));
            if !self.wait(remaining)? {
                return Ok(Vec::new());
            }
            let faults = self.read()?;
            if !faults.is_empty() || deadline.is_some_and(|d| Instant::now() >= d) {
                return Ok(faults);
            }
        }
    }

    /// Answers one fault group (writes a `struct iommu_hwpt_page_response`).
    ///
    /// A cookie that names no group awaiting an answer (never read, or already answered) is rejected
    /// by the kernel with `EINVAL`.
    pub fn respond(&self, response: &PageResponse) -> Result<()> {
        match self.respond_all(std::slice::from_ref(response))? {
            1 => Ok(()),
            n => {
                Err(Error::Protocol { op: "write(fault queue)", detail: format!("{n} responses taken of 1") })
            }
        }
    }

    /// Answers several groups in one write. The kernel stops at the first response it rejects; those
    /// before it are applied. Returns how many were applied, or the error if the first one was
    /// rejected.
    pub fn respond_all(&self, responses: &[PageResponse]) -> Result<usize> {
        const OP: &str = "write(fault queue)";
        if responses.is_empty() {
            return Ok(0);
        }
        let bytes: Vec<u8> = responses.iter().flat_map(|r| r.to_record()).collect();
        let n = rustix::io::write(self.inner.fd.as_fd(), &bytes).map_err(|e| Error::os(OP, e))?;
        Ok(n / RESPONSE_RECORD)
    }

    /// Closes the fd, then destroys the object, reporting failure. Refused with [`Error::InUse`]
    /// while clones or HWPTs allocated with the queue exist. The kernel answers `EBUSY` if a
    /// duplicate of the fd is still open (or a HWPT this crate does not own uses the queue); the
    /// object then lives until the iommufd is closed.
    pub fn close(self) -> Result<()> {
        match Arc::try_unwrap(self.inner) {
            Ok(FaultInner { fd, obj }) => {
                drop(fd);
                obj.destroy()
            }
            Err(inner) => Err(Error::InUse { op: "IOMMU_DESTROY", users: Arc::strong_count(&inner) - 1 }),
        }
    }
}

impl AsFd for FaultQueue {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.inner.fd.as_fd()
    }
}

impl AsRawFd for FaultQueue {
    fn as_raw_fd(&self) -> RawFd {
        self.inner.fd.as_raw_fd()
    }
}

impl sealed::Sealed for FaultQueue {}
impl FaultSource for FaultQueue {
    fn fault_id(&self) -> u32 {
        self.id()
    }

    fn fault_ref(&self) -> ObjRef {
        ObjRef::new(self.iommufd(), self.id(), self.inner.clone())
    }
}

/// A [`FaultQueue`] registered with the tokio reactor (feature `tokio`).
#[cfg(feature = "tokio")]
#[derive(Debug)]
pub struct AsyncFaultQueue {
    inner: tokio::io::unix::AsyncFd<FaultQueue>,
}

#[cfg(feature = "tokio")]
impl AsyncFaultQueue {
    /// Registers `queue` for readiness with the current tokio runtime.
    ///
    /// # Panics
    ///
    /// If called outside a tokio runtime, or in one built without I/O (`enable_io`).
    pub fn new(queue: FaultQueue) -> Result<AsyncFaultQueue> {
        // SAFETY: the `FaultQueue` moves into the `AsyncFd` and owns its fd: `as_raw_fd` always returns
        // that one fd, which stays open until the `FaultQueue` is dropped, after the `AsyncFd` has
        // deregistered it (on drop or `into_inner`).
        let inner =
            unsafe { tokio::io::unix::AsyncFd::register_with_interest(queue, tokio::io::Interest::READABLE) }
                .map_err(|e| {
                    Error::os(
                        "AsyncFd::register(fault queue)",
                        Errno::from_io_error(&e.into()).unwrap_or(Errno::IO),
                    )
                })?;
        Ok(AsyncFaultQueue { inner })
    }

    /// Waits for faults and reads every pending one (never empty).
    pub async fn read(&self) -> Result<Vec<PageFault>> {
        loop {
            let mut guard =
                self.inner.readable().await.map_err(|e| {
                    Error::os("poll(fault queue)", Errno::from_io_error(&e).unwrap_or(Errno::IO))
                })?;
            let faults = guard.get_inner().read()?;
            if !faults.is_empty() {
                return Ok(faults);
            }
            // Drained: wait for the next wake-up. Readiness that arrived after `readable()` returned
            // is kept by tokio, so no fault is missed.
            guard.clear_ready();
        }
    }

    /// Answers one fault group (see [`FaultQueue::respond`]).
    pub fn respond(&self, response: &PageResponse) -> Result<()> {
        self.inner.get_ref().respond(response)
    }

    /// The queue.
    pub fn get_ref(&self) -> &FaultQueue {
        self.inner.get_ref()
    }

    /// Deregisters from the reactor and returns the queue.
    pub fn into_inner(self) -> FaultQueue {
        self.inner.into_inner()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_layout() {
        assert_eq!(FAULT_RECORD, 40);
        assert_eq!(RESPONSE_RECORD, 8);
    }

    #[test]
    fn fault_record_round_trip() {
        let f = PageFault {
            flags: PageFaultFlags::PASID_VALID | PageFaultFlags::LAST_PAGE,
            dev_id: 7,
            pasid: 0x1234,
            grpid: 3,
            perm: FaultPerm::READ | FaultPerm::WRITE,
            addr: 0xdead_b000,
            length: 4096,
            cookie: 42,
        };
        let r = f.to_record();
        assert_eq!(PageFault::from_record(&r), f);
        assert_eq!(f.pasid(), Some(0x1234));
        assert!(f.is_last());
        assert_eq!(
            f.response(ResponseCode::Success),
            PageResponse { cookie: 42, code: ResponseCode::Success }
        );
        // The reserved word stays untouched at offset 20.
        assert_eq!(&r[20..24], &[0; 4]);
        assert_eq!(u64_at(&r, 24), 0xdead_b000);
    }

    #[test]
    fn unknown_bits_survive() {
        let f = PageFault {
            flags: PageFaultFlags::from_bits_retain(0x8000_0000),
            perm: FaultPerm::from_bits_retain(0x100),
            ..Default::default()
        };
        let g = PageFault::from_record(&f.to_record());
        assert_eq!(g.flags.bits(), 0x8000_0000);
        assert_eq!(g.perm.bits(), 0x100);
        assert_eq!(g.pasid(), None);
        assert!(!g.is_last());
    }

    #[test]
    fn parse_batches() {
        let a = PageFault { dev_id: 1, cookie: 1, ..Default::default() };
        let b = PageFault { dev_id: 2, cookie: 1, flags: PageFaultFlags::LAST_PAGE, ..Default::default() };
        let bytes: Vec<u8> = [a, b].iter().flat_map(|f| f.to_record()).collect();
        let mut out = [PageFault::default(); 4];
        assert_eq!(parse_faults(&bytes, &mut out).unwrap(), 2);
        assert_eq!(&out[..2], &[a, b]);
        assert_eq!(parse_faults(&[], &mut out).unwrap(), 0);
        // A torn record or more records than room are protocol errors, not silent truncation.
        assert!(matches!(parse_faults(&bytes[..41], &mut out), Err(Error::Protocol { .. })));
        assert!(matches!(parse_faults(&bytes, &mut out[..1]), Err(Error::Protocol { .. })));
    }

    #[test]
    fn response_record() {
        let r = PageResponse { cookie: 0x0102_0304, code: ResponseCode::Invalid }.to_record();
        assert_eq!(u32_at(&r, 0), 0x0102_0304);
        assert_eq!(u32_at(&r, 4), sys::IOMMUFD_PAGE_RESP_INVALID);
        assert_eq!(ResponseCode::Success.raw(), 0);
    }

    #[test]
    fn wait_times_out_on_a_quiet_fd() {
        // An eventfd whose counter is 0 is never readable: the timeout path.
        let fd = rustix::event::eventfd(0, rustix::event::EventfdFlags::CLOEXEC).unwrap();
        assert!(!poll_readable(fd.as_fd(), Some(Duration::from_millis(10)), "poll").unwrap());
        rustix::io::write(&fd, &1u64.to_ne_bytes()).unwrap();
        assert!(poll_readable(fd.as_fd(), None, "poll").unwrap());
    }
}
