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
use std::sync::{Arc, Mutex};
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

/// Decodes a buffer of whole fault records into `out`, returning how many were stored.
///
/// Never panics and never reads past `bytes`: a length that is not a whole number of records, or more
/// records than `out` holds, is an [`Error::Protocol`] (the kernel writes whole records only, and no
/// more than it was asked for).
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

/// The deadline `timeout` from now: `None` for no timeout, and for a timeout so long that the
/// clock cannot represent its end (which is no deadline either).
pub(crate) fn deadline(timeout: Option<Duration>) -> Option<Instant> {
    timeout.and_then(|t| Instant::now().checked_add(t))
}

/// Waits until `fd` is readable or `timeout` passes (`None`: forever). Retries on `EINTR`.
pub(crate) fn poll_readable(fd: BorrowedFd<'_>, timeout: Option<Duration>, op: &'static str) -> Result<bool> {
    let deadline = deadline(timeout);
    loop {
        let remaining = deadline.map(|d| d.saturating_duration_since(Instant::now()));
        // A wait too long for a `timespec` is a wait without limit.
        let ts = remaining.and_then(|r| Timespec::try_from(r).ok());
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

/// A fault queue's fd as [`read_all`] sees it (a trait so the read logic can be tested against a
/// model of the kernel).
pub(crate) trait FaultFd {
    /// One `read(2)`: whole groups only; `EINVAL` (current kernels) or 0 (kernels before a 2026
    /// fix) if the first pending group does not fit.
    fn read(&mut self, buf: &mut [u8]) -> rustix::io::Result<usize>;
    /// Whether a fault is pending now (`POLLIN`), without waiting.
    fn readable(&mut self) -> Result<bool>;
}

impl FaultFd for BorrowedFd<'_> {
    fn read(&mut self, buf: &mut [u8]) -> rustix::io::Result<usize> {
        rustix::io::read(*self, buf)
    }

    fn readable(&mut self) -> Result<bool> {
        poll_readable(*self, Some(Duration::ZERO), "poll(fault queue)")
    }
}

/// Why one batch read failed.
enum BatchError {
    /// The next group has more faults than the buffer holds; nothing was read.
    TooSmall,
    /// Anything else.
    Failed(Error),
}

const READ_OP: &str = "read(fault queue)";

/// The most records one `read(2)` asks for (a bound on the byte buffer, well below the kernel's
/// per-read limit).
const MAX_READ_RECORDS: usize = 1 << 20;

/// Reads one batch of whole groups into `buf` from `fd`, using `bytes` as the byte buffer.
///
/// Kernels before a 2026 fix return 0 rather than `EINVAL` when the first pending group does not
/// fit, while the fd stays readable. A read that returns nothing on a readable fd is therefore
/// tried once more: nothing again means the group does not fit (a group that merely arrived in
/// between is read by the second try).
fn read_batch(
    fd: &mut dyn FaultFd,
    buf: &mut [PageFault],
    bytes: &mut Vec<u8>,
) -> std::result::Result<usize, BatchError> {
    // At most 2^20 records of 40 bytes: no overflow.
    let len = buf.len().min(MAX_READ_RECORDS) * FAULT_RECORD;
    if bytes.len() < len {
        bytes
            .try_reserve_exact(len - bytes.len())
            .map_err(|_| BatchError::Failed(Error::os(READ_OP, Errno::NOMEM)))?;
        bytes.resize(len, 0);
    }
    let window = &mut bytes[..len];
    let mut tried_again = false;
    loop {
        match fd.read(window) {
            Ok(0) => {
                if tried_again || !fd.readable().map_err(BatchError::Failed)? {
                    return if tried_again { Err(BatchError::TooSmall) } else { Ok(0) };
                }
                tried_again = true;
            }
            Ok(n) => {
                let got = window.get(..n).ok_or_else(|| {
                    BatchError::Failed(Error::Protocol {
                        op: READ_OP,
                        detail: format!("the kernel reported {n} bytes read into a {len}-byte buffer"),
                    })
                })?;
                return parse_faults(got, buf).map_err(BatchError::Failed);
            }
            Err(Errno::INVAL) => return Err(BatchError::TooSmall),
            Err(e) => return Err(BatchError::Failed(Error::os(READ_OP, e))),
        }
    }
}

/// The first batch size of [`read_all`], in faults.
const FIRST_BATCH: usize = 64;
/// The largest group [`read_all`] can take, in faults (the kernel sets no limit; PCI page request
/// groups are far smaller).
pub(crate) const MAX_GROUP: usize = 1 << 16;
/// [`read_all`] returns once it has gathered this many faults, so that a device that keeps faulting
/// cannot keep one call reading forever; the rest stays queued for the next call.
const MAX_FAULTS_PER_CALL: usize = 1 << 16;

/// Reads pending groups from `fd` until none is left (or [`MAX_FAULTS_PER_CALL`] faults were
/// gathered), growing the buffer for groups that do not fit. Returns the faults read and, if a batch
/// failed, its error: faults gathered before the failure are returned with it, never dropped (the
/// kernel handed them out, so they must be answered). A failed batch hands out nothing: the kernel
/// puts its groups back.
pub(crate) fn read_all(fd: &mut dyn FaultFd) -> (Vec<PageFault>, Option<Error>) {
    let mut out = Vec::new();
    let mut buf = vec![PageFault::default(); FIRST_BATCH];
    let mut bytes = Vec::new();
    while out.len() < MAX_FAULTS_PER_CALL {
        match read_batch(fd, &mut buf, &mut bytes) {
            Ok(0) => return (out, None),
            Ok(n) => out.extend_from_slice(&buf[..n.min(buf.len())]),
            // A group larger than the buffer: retry with a larger one.
            Err(BatchError::TooSmall) if buf.len() < MAX_GROUP => {
                let grown = buf.len().saturating_mul(4).min(MAX_GROUP);
                buf.resize(grown, PageFault::default());
            }
            Err(BatchError::TooSmall) => {
                let e = Error::Protocol {
                    op: READ_OP,
                    detail: format!(
                        "the next fault group has more than {MAX_GROUP} faults; read it with \
                         FaultQueue::read_faults and a larger buffer"
                    ),
                };
                return (out, Some(e));
            }
            Err(BatchError::Failed(e)) => return (out, Some(e)),
        }
    }
    (out, None)
}

struct FaultInner {
    // Field order is teardown order: the fd holds a reference on the kernel object (destroying it
    // while the fd is open gives EBUSY), so it is closed before the object is destroyed.
    fd: OwnedFd,
    obj: Object,
    /// An error [`FaultQueue::read`] held back because it returned the faults read before it.
    pending: Mutex<Option<Error>>,
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
    /// Allocates a fault queue (`IOMMU_FAULT_QUEUE_ALLOC`, Linux 6.11).
    pub fn alloc(iommufd: &Iommufd) -> Result<FaultQueue> {
        let mut arg = sys::iommu_fault_alloc::new();
        iommufd.check_process(ioctl::FAULT_QUEUE_ALLOC.name)?;
        // SAFETY: IOMMU_FAULT_QUEUE_ALLOC takes `iommu_fault_alloc`, sized by `new()`; it holds no
        // pointers, and the kernel writes the new id and fd back through the exclusive borrow.
        unsafe { ioctl::call(iommufd.as_fd(), &ioctl::FAULT_QUEUE_ALLOC, &mut arg) }?;
        // SAFETY: on success the kernel installed `out_fault_fd` in this process's fd table as a new
        // O_CLOEXEC file that nothing else refers to; ownership passes to us here, at once.
        let fd = unsafe { OwnedFd::from_raw_fd(arg.out_fault_fd as RawFd) };
        let obj = Object::new(iommufd, arg.out_fault_id, "fault queue");
        Ok(FaultQueue { inner: Arc::new(FaultInner { fd, obj, pending: Mutex::new(None) }) })
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
    /// sizes its buffer). At most 2^20 faults are read at once. Faults read here have been handed
    /// over: each group must be answered with [`respond`](Self::respond), or the device waits until
    /// the queue is closed. An error held back by an earlier [`read`](Self::read) is returned first.
    pub fn read_faults(&self, buf: &mut [PageFault]) -> Result<usize> {
        if let Some(e) = self.take_pending() {
            return Err(e);
        }
        if buf.is_empty() {
            return Err(Error::invalid(READ_OP, "the buffer holds no fault"));
        }
        let mut bytes = Vec::new();
        match read_batch(&mut self.inner.fd.as_fd(), buf, &mut bytes) {
            Ok(n) => Ok(n),
            Err(BatchError::TooSmall) => Err(Error::invalid(
                READ_OP,
                format!(
                    "the next fault group has more than {} faults: pass a larger buffer",
                    buf.len().min(MAX_READ_RECORDS)
                ),
            )),
            Err(BatchError::Failed(e)) => Err(e),
        }
    }

    /// Reads every pending fault without blocking (an empty vector: none pending).
    ///
    /// Groups of any size up to 65536 faults are read whole (the buffer grows as needed). One call
    /// returns at most about 65536 faults; more stay queued for the next call.
    ///
    /// Faults are never dropped: if a later batch of the same call fails after some faults were
    /// read, those faults are returned (they have been handed over and must be answered) and the
    /// error is held back and returned by the next `read`, `read_faults` or `read_timeout` of any
    /// clone of the queue. A failed batch itself hands out nothing: the kernel keeps its groups
    /// queued.
    pub fn read(&self) -> Result<Vec<PageFault>> {
        self.read_from(&mut self.inner.fd.as_fd())
    }

    /// [`read`](Self::read) on `fd`.
    fn read_from(&self, fd: &mut dyn FaultFd) -> Result<Vec<PageFault>> {
        if let Some(e) = self.take_pending() {
            return Err(e);
        }
        let (faults, error) = read_all(fd);
        match error {
            None => Ok(faults),
            Some(e) if faults.is_empty() => Err(e),
            Some(e) => {
                *self.inner.pending.lock().unwrap_or_else(|p| p.into_inner()) = Some(e);
                Ok(faults)
            }
        }
    }

    /// The error a [`read`](Self::read) held back, if any.
    fn take_pending(&self) -> Option<Error> {
        self.inner.pending.lock().unwrap_or_else(|p| p.into_inner()).take()
    }

    /// Waits until a fault is pending or `timeout` passes (`None`, or a timeout too long for the
    /// clock: no limit). Returns whether a fault is pending.
    pub fn wait(&self, timeout: Option<Duration>) -> Result<bool> {
        poll_readable(self.inner.fd.as_fd(), timeout, "poll(fault queue)")
    }

    /// Waits as [`wait`](Self::wait) does, then reads every pending fault as [`read`](Self::read)
    /// does (empty on timeout). An error held back by an earlier read is returned at once.
    pub fn read_timeout(&self, timeout: Option<Duration>) -> Result<Vec<PageFault>> {
        if let Some(e) = self.take_pending() {
            return Err(e);
        }
        let deadline = deadline(timeout);
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
        self.inner.obj.iommufd().check_process(OP)?;
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
            Ok(FaultInner { fd, obj, .. }) => {
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
#[cfg_attr(docsrs, doc(cfg(feature = "tokio")))]
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

    /// Waits for faults and reads every pending one (never empty), as [`FaultQueue::read`] does. An
    /// error held back by an earlier read is returned at once.
    pub async fn read(&self) -> Result<Vec<PageFault>> {
        if let Some(e) = self.get_ref().take_pending() {
            return Err(e);
        }
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
pub(crate) mod tests {
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

    /// A model of the kernel's fault queue read (`iommufd_fault_fops_read`): whole groups in order,
    /// the first group that does not fit answered with `EINVAL` (`old_kernel`: 0), a failure of the
    /// `fail_at`-th group handed out (the kernel's `xa_alloc` or `copy_to_user`) stopping the read
    /// with nothing of that group consumed.
    struct ModelQueue {
        groups: std::collections::VecDeque<Vec<PageFault>>,
        old_kernel: bool,
        fail_at: Option<(usize, Errno)>,
        handed_out: usize,
        reads: usize,
    }

    impl ModelQueue {
        fn new(sizes: &[usize], old_kernel: bool) -> ModelQueue {
            let mut cookie = 0;
            let groups = sizes
                .iter()
                .map(|&n| {
                    cookie += 1;
                    (0..n)
                        .map(|i| PageFault {
                            flags: if i + 1 == n {
                                PageFaultFlags::LAST_PAGE
                            } else {
                                PageFaultFlags::empty()
                            },
                            dev_id: 1,
                            grpid: cookie,
                            addr: i as u64 * 4096,
                            cookie,
                            ..Default::default()
                        })
                        .collect()
                })
                .collect();
            ModelQueue { groups, old_kernel, fail_at: None, handed_out: 0, reads: 0 }
        }

        fn all(&self) -> Vec<PageFault> {
            self.groups.iter().flatten().copied().collect()
        }
    }

    impl FaultFd for ModelQueue {
        fn read(&mut self, buf: &mut [u8]) -> rustix::io::Result<usize> {
            self.reads += 1;
            if buf.len() % FAULT_RECORD != 0 {
                return Err(Errno::SPIPE);
            }
            let mut done = 0;
            while let Some(group) = self.groups.front() {
                if group.len() * FAULT_RECORD > buf.len() - done {
                    if done == 0 && !self.old_kernel {
                        return Err(Errno::INVAL);
                    }
                    break;
                }
                if let Some((at, errno)) = self.fail_at {
                    if at == self.handed_out {
                        self.fail_at = None;
                        return if done == 0 { Err(errno) } else { Ok(done) };
                    }
                }
                for f in group {
                    buf[done..done + FAULT_RECORD].copy_from_slice(&f.to_record());
                    done += FAULT_RECORD;
                }
                self.groups.pop_front();
                self.handed_out += 1;
            }
            Ok(done)
        }

        fn readable(&mut self) -> Result<bool> {
            Ok(!self.groups.is_empty())
        }
    }

    #[test]
    fn groups_larger_than_the_buffer_are_read_whole() {
        for old_kernel in [false, true] {
            // Groups that fit the first buffer, and ones that need it grown once, twice, three times.
            let mut q = ModelQueue::new(&[1, 3, 64, 65, 300, 2, 1500, 4097, 1], old_kernel);
            let want = q.all();
            let (got, error) = read_all(&mut q);
            assert!(error.is_none(), "{error:?}");
            assert_eq!(got, want, "old kernel: {old_kernel}");
            assert!(q.groups.is_empty());
            // Each group ends with its LAST_PAGE fault, in one piece.
            assert_eq!(got.iter().filter(|f| f.is_last()).count(), 9);
        }
    }

    #[test]
    fn a_group_too_large_to_read_keeps_the_faults_before_it() {
        for old_kernel in [false, true] {
            let mut q = ModelQueue::new(&[2, 5, MAX_GROUP + 1, 1], old_kernel);
            let want = q.all()[..7].to_vec();
            let (got, error) = read_all(&mut q);
            assert_eq!(got, want, "the seven faults read before the huge group are returned");
            assert!(matches!(error, Some(Error::Protocol { .. })), "{error:?}");
            // The huge group stays queued; reading again reports it again, and reads nothing.
            let (got, error) = read_all(&mut q);
            assert!(got.is_empty() && error.is_some());
            assert_eq!(q.groups.len(), 2);
        }
    }

    #[test]
    fn a_failed_later_batch_keeps_the_faults_already_read() {
        // 100 one-fault groups: the first batch takes 64; the second read fails at once.
        let mut q = ModelQueue::new(&[1; 100], false);
        let want = q.all();
        q.fail_at = Some((64, Errno::NOMEM));
        let (first, error) = read_all(&mut q);
        assert_eq!(first, want[..64], "faults handed over before the failure are returned");
        assert_eq!(error.and_then(|e| e.errno()), Some(Errno::NOMEM));
        // Nothing was lost: the rest comes with the next read.
        let (rest, error) = read_all(&mut q);
        assert!(error.is_none());
        assert_eq!([first, rest].concat(), want);
    }

    #[test]
    fn an_old_kernel_that_answers_nothing_for_a_large_group_does_not_spin() {
        // The group of 100 does not fit 64 records: an old kernel answers 0 with POLLIN still set.
        let mut q = ModelQueue::new(&[100], true);
        let mut buf = [PageFault::default(); 64];
        let mut bytes = Vec::new();
        assert!(matches!(read_batch(&mut q, &mut buf, &mut bytes), Err(BatchError::TooSmall)));
        assert_eq!(q.reads, 2, "one retry tells a large group from an empty queue");
        let (got, error) = read_all(&mut q);
        assert!(error.is_none());
        assert_eq!(got.len(), 100);
        // An empty queue is one read.
        q.reads = 0;
        assert!(matches!(read_batch(&mut q, &mut buf, &mut bytes), Ok(0)));
        assert_eq!(q.reads, 1);
    }

    /// A fault queue handle on the host: a fake iommufd, and an eventfd as its fd (readable while
    /// its counter is not 0). Reads go through [`FaultQueue::read_from`] and a model.
    fn host_queue(readable: bool) -> FaultQueue {
        let (iommufd, _ioas) = crate::tests::fake();
        let obj = Object::new(&iommufd, 99, "fault queue");
        let fd = rustix::event::eventfd(u32::from(readable), rustix::event::EventfdFlags::CLOEXEC).unwrap();
        FaultQueue { inner: Arc::new(FaultInner { fd, obj, pending: Mutex::new(None) }) }
    }

    #[test]
    fn read_returns_the_faults_read_and_holds_a_later_error_back() {
        let queue = host_queue(false);
        let mut kernel = ModelQueue::new(&[1; 100], false);
        let want = kernel.all();
        kernel.fail_at = Some((64, Errno::NOMEM));
        assert_eq!(
            queue.read_from(&mut kernel).unwrap(),
            want[..64],
            "the 64 faults are handed back, not dropped"
        );
        // The error comes with the next call, through any clone, and only once.
        let e = queue.clone().read_faults(&mut [PageFault::default(); 4]).unwrap_err();
        assert_eq!(e.errno(), Some(Errno::NOMEM));
        assert_eq!(queue.read_from(&mut kernel).unwrap(), want[64..]);
        // A failure before anything was read is the call's error.
        let mut kernel = ModelQueue::new(&[1], false);
        kernel.fail_at = Some((0, Errno::NOMEM));
        assert_eq!(queue.read_from(&mut kernel).unwrap_err().errno(), Some(Errno::NOMEM));
        assert!(queue.take_pending().is_none());
        // `read_timeout` returns a held-back error at once, before waiting (the fd is not readable).
        let mut kernel = ModelQueue::new(&[1; 70], false);
        kernel.fail_at = Some((64, Errno::FAULT));
        assert_eq!(queue.read_from(&mut kernel).unwrap().len(), 64);
        assert_eq!(queue.read_timeout(None).unwrap_err().errno(), Some(Errno::FAULT));
    }

    #[test]
    fn waits_without_limit_do_not_overflow_the_clock() {
        assert!(deadline(Some(Duration::MAX)).is_none(), "no representable end: no deadline");
        assert!(deadline(Some(Duration::from_secs(1))).is_some());
        let fd = rustix::event::eventfd(1, rustix::event::EventfdFlags::CLOEXEC).unwrap();
        for t in
            [Duration::MAX, Duration::from_secs(u64::MAX / 2), Duration::new(i64::MAX as u64, 999_999_999)]
        {
            assert!(poll_readable(fd.as_fd(), Some(t), "poll").unwrap());
        }
        // These used to panic adding the timeout to `Instant::now()`.
        let queue = host_queue(true);
        assert!(queue.wait(Some(Duration::MAX)).unwrap());
        // The eventfd answers a read with its 8-byte counter: not a fault record.
        assert!(matches!(queue.read_timeout(Some(Duration::MAX)), Err(Error::Protocol { .. })));
    }

    mod prop {
        use super::*;
        use proptest::prelude::*;

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(512))]

            /// Any bytes of any length: a count of whole records or a protocol error, never a panic.
            #[test]
            fn parse_faults_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..400), room in 0usize..12) {
                let mut out = vec![PageFault::default(); room];
                match parse_faults(&bytes, &mut out) {
                    Ok(n) => {
                        prop_assert_eq!(n * FAULT_RECORD, bytes.len());
                        prop_assert!(n <= room);
                        for (i, f) in out[..n].iter().enumerate() {
                            let mut r = [0u8; FAULT_RECORD];
                            r.copy_from_slice(&bytes[i * FAULT_RECORD..][..FAULT_RECORD]);
                            prop_assert_eq!(*f, PageFault::from_record(&r));
                        }
                    }
                    Err(e) => prop_assert!(matches!(e, Error::Protocol { .. }), "{e:?}"),
                }
            }

            /// Decoding is the inverse of encoding, reserved word aside.
            #[test]
            fn fault_records_round_trip(
                flags: u32, dev_id: u32, pasid: u32, grpid: u32, perm: u32, addr: u64, length: u32, cookie: u32,
            ) {
                let f = PageFault {
                    flags: PageFaultFlags::from_bits_retain(flags),
                    dev_id,
                    pasid,
                    grpid,
                    perm: FaultPerm::from_bits_retain(perm),
                    addr,
                    length,
                    cookie,
                };
                prop_assert_eq!(PageFault::from_record(&f.to_record()), f);
            }
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(128))]

            /// Groups of any size up to past the largest batch, kernel failures anywhere, old and new
            /// kernels: repeated reads hand out every fault exactly once, in order, whole groups only.
            #[test]
            fn reads_never_drop_or_repeat_faults(
                sizes in proptest::collection::vec(prop_oneof![6 => 1usize..8, 2 => 8usize..300, 1 => 1000usize..1400], 0..24),
                fail in proptest::option::of((0usize..40, prop_oneof![Just(Errno::NOMEM), Just(Errno::FAULT)])),
                old_kernel: bool,
            ) {
                let mut q = ModelQueue::new(&sizes, old_kernel);
                q.fail_at = fail;
                let want = q.all();
                let mut got = Vec::new();
                let mut errors = 0;
                for _ in 0..4 {
                    let (faults, error) = read_all(&mut q);
                    // Whole groups only: each call ends on a group boundary.
                    prop_assert!(faults.last().is_none_or(|f| f.is_last()));
                    got.extend(faults);
                    errors += usize::from(error.is_some());
                }
                prop_assert!(errors <= 1, "one injected failure, reported once");
                prop_assert_eq!(got, want);
            }
        }
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
