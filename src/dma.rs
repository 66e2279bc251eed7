//! DMA memory and mappings: the soundness core.
//!
//! A device that can reach an IOVA can write the memory behind it at any time, outside Rust's view.
//! The rules this module enforces:
//!
//! - A [`DmaBuffer`] is plain memory the caller owns: it may be borrowed as `&[u8]`/`&mut [u8]`
//!   because no device can reach it.
//! - [`Ioas::map`](crate::Ioas::map) *moves* the buffer into the returned [`Mapping`](crate::Mapping). From then on no
//!   Rust reference to the bytes exists; [`Mapping::read_at`](crate::Mapping::read_at)/[`Mapping::write_at`](crate::Mapping::write_at) copy with relaxed
//!   atomic accesses, well defined while threads and devices use the memory at once. The buffer cannot be dropped, moved out of, or borrowed while mapped because the caller
//!   no longer has it.
//! - The memory is released only after the kernel confirms the unmap of every IOVA range that refers to
//!   it (a [`copy`](crate::Ioas::copy) shares it). If an unmap fails, or the [`Mapping`](crate::Mapping) is
//!   `mem::forget`-ed, the memory is leaked, never freed.
//! - Memory not owned by a mapping is either pinned by the kernel from a file
//!   ([`Ioas::map_file`](crate::Ioas::map_file)), or mapped through the `unsafe`
//!   [`Ioas::map_user`](crate::Ioas::map_user), whose contract puts the lifetime on the caller.

use std::os::fd::BorrowedFd;
use std::ptr::NonNull;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::error::{Error, Result};

/// The system page size.
pub fn page_size() -> usize {
    rustix::param::page_size()
}

/// An anonymous, page-aligned, private memory region (owned; unmapped with `munmap` on drop).
#[doc(hidden)]
#[derive(Debug)]
pub struct Region {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: `Region` owns its mmap-ed memory exclusively; moving it to or sharing it with another thread
// moves or shares only the address. Byte access goes through `&mut DmaBuffer` (exclusive) or the
// relaxed atomic copies of `Mapping`, which are well defined from any number of threads.
unsafe impl Send for Region {}
// SAFETY: as above; `&Region` gives no access to the bytes by itself.
unsafe impl Sync for Region {}

impl Region {
    fn new(len: usize) -> Result<Region> {
        use rustix::mm::{MapFlags, ProtFlags};
        // SAFETY: a fresh anonymous private mapping at a kernel-chosen address aliases no existing
        // memory; the null hint asks the kernel to choose.
        let ptr = unsafe {
            rustix::mm::mmap_anonymous(
                std::ptr::null_mut(),
                len,
                ProtFlags::READ | ProtFlags::WRITE,
                MapFlags::PRIVATE,
            )
        }
        .map_err(|e| Error::os("mmap", e))?;
        let ptr = NonNull::new(ptr.cast::<u8>()).ok_or(Error::os("mmap", rustix::io::Errno::NOMEM))?;
        // No MADV_DONTFORK: at fork() the kernel copies pages that are pinned for DMA into the child
        // instead of sharing them copy-on-write (`folio_needs_cow_for_dma`, in every kernel that has
        // iommufd), so the parent keeps exactly the pages the device reaches, and the child gets a
        // private copy, valid memory behind its copy of every buffer.
        Ok(Region { ptr, len })
    }

    pub(crate) fn addr(&self) -> u64 {
        self.ptr.as_ptr() as u64
    }

    pub(crate) fn len(&self) -> usize {
        self.len
    }
}

impl Drop for Region {
    fn drop(&mut self) {
        // SAFETY: `ptr..ptr+len` is a mapping this value created and owns; every path that could leave
        // it reachable by a device (a `Mapping` whose unmap failed, or a forgotten one) leaks the
        // `Region` instead of dropping it, so by now no IOVA refers to it.
        if let Err(e) = unsafe { rustix::mm::munmap(self.ptr.as_ptr().cast(), self.len) } {
            log::error!("iommufd: munmap of a DMA buffer failed: {e}");
        }
    }
}

/// Page-aligned memory owned by the caller, ready to be mapped for DMA.
///
/// While the caller holds it, no device can reach it, so it can be read and written as a slice.
/// Mapping it moves it into a [`Mapping`](crate::Mapping); unmapping gives it back.
///
/// Safe code cannot reach the bytes while the buffer is mapped. Each of these fails to compile
/// (the error codes are checked), while the same code without the offending line compiles:
///
/// ```
/// # use iommufd::{DmaBuffer, Ioas, Iova, Access};
/// # fn f(ioas: &Ioas) -> iommufd::Result<()> {
/// let mut buf = DmaBuffer::new(4096)?;
/// buf.as_mut_slice()[0] = 1; // fine: not mapped yet
/// let mapping = ioas.map(buf, Iova::Auto, Access::READ_WRITE)?;
/// mapping.write_at(0, &[2])?; // the one way in while mapped: an atomic copy
/// let buf = mapping.unmap()?.expect("no copy shares it"); // unmapped: the buffer comes back
/// assert_eq!(buf.as_slice()[0], 2);
/// # Ok(()) }
/// ```
///
/// Mutably borrowing it while mapped:
/// ```compile_fail,E0382
/// # use iommufd::{DmaBuffer, Ioas, Iova, Access};
/// # fn f(ioas: &Ioas) -> iommufd::Result<()> {
/// let mut buf = DmaBuffer::new(4096)?;
/// let mapping = ioas.map(buf, Iova::Auto, Access::READ_WRITE)?;
/// buf.as_mut_slice()[0] = 1; // error: the buffer moved into the mapping
/// # Ok(()) }
/// ```
///
/// Dropping (freeing) it while mapped:
/// ```compile_fail,E0382
/// # use iommufd::{DmaBuffer, Ioas, Iova, Access};
/// # fn f(ioas: &Ioas) -> iommufd::Result<()> {
/// let buf = DmaBuffer::new(4096)?;
/// let mapping = ioas.map(buf, Iova::Auto, Access::READ_WRITE)?;
/// drop(buf); // error: use of moved value
/// # Ok(()) }
/// ```
///
/// Keeping a borrow across the map:
/// ```compile_fail,E0505
/// # use iommufd::{DmaBuffer, Ioas, Iova, Access};
/// # fn f(ioas: &Ioas) -> iommufd::Result<()> {
/// let buf = DmaBuffer::new(4096)?;
/// let slice = buf.as_slice();
/// let mapping = ioas.map(buf, Iova::Auto, Access::READ_WRITE)?; // error: `buf` is borrowed
/// println!("{}", slice[0]);
/// # Ok(()) }
/// ```
///
/// Moving it out of the mapping (there is no field or method that yields it while mapped):
/// ```compile_fail,E0616
/// # use iommufd::{DmaBuffer, Ioas, Iova, Access};
/// # fn f(ioas: &Ioas) -> iommufd::Result<()> {
/// let mapping = ioas.map(DmaBuffer::new(4096)?, Iova::Auto, Access::READ_WRITE)?;
/// let stolen = mapping.held; // error: field `held` is private
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct DmaBuffer {
    /// Shared with nobody while the caller holds the buffer: a mapping (and its copies) share it while
    /// mapped, and it comes back as a `DmaBuffer` only once they are all gone. Allocated once, so a
    /// map and unmap of the same buffer allocate nothing.
    region: Arc<Region>,
}

impl DmaBuffer {
    /// Allocates `len` bytes of zeroed, page-aligned memory, rounded up to a whole number of pages.
    pub fn new(len: usize) -> Result<DmaBuffer> {
        if len == 0 {
            return Err(Error::invalid("DmaBuffer::new", "length is zero"));
        }
        let page = page_size();
        let rounded = len
            .checked_next_multiple_of(page)
            .ok_or_else(|| Error::invalid("DmaBuffer::new", format!("length {len:#x} overflows")))?;
        Ok(DmaBuffer { region: Arc::new(Region::new(rounded)?) })
    }

    /// Length in bytes (a multiple of the page size).
    pub fn len(&self) -> usize {
        self.region.len
    }

    /// Always false: buffers are at least one page.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// The bytes. No device can reach them while the caller holds the buffer.
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: the region is `len` readable bytes owned by `self` alone (no mapping shares the `Arc`
        // while a `DmaBuffer` exists); it is not mapped for DMA (mapping consumes the buffer), so
        // nothing else writes it during the borrow.
        unsafe { std::slice::from_raw_parts(self.region.ptr.as_ptr(), self.region.len) }
    }

    /// The bytes, mutably.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as in `as_slice`, and `&mut self` makes this the only borrow.
        unsafe { std::slice::from_raw_parts_mut(self.region.ptr.as_ptr(), self.region.len) }
    }
}

pub(crate) mod sealed {
    pub trait Sealed {}
}

/// Memory whose mappings safe code may [copy](crate::Ioas::copy) into another IOVA range: memory the
/// mapping owns ([`DmaBuffer`], shared by the copies) or that the kernel pins itself ([`FileMemory`]).
/// Caller-managed memory ([`UserMemory`]) is not: a copy would outlive the `unsafe` contract of
/// [`Ioas::map_user`](crate::Ioas::map_user), so it is copied with the `unsafe`
/// [`Ioas::copy_user`](crate::Ioas::copy_user).
///
/// Safe code cannot copy a mapping of user memory:
/// ```compile_fail,E0277
/// # use iommufd::{Access, Ioas, Iova, Mapping, UserMemory};
/// fn extend(ioas: &Ioas, user: &Mapping<UserMemory>) -> iommufd::Result<Mapping<UserMemory>> {
///     ioas.copy(user, Iova::Auto, Access::READ) // error: `UserMemory` is not `Shareable`
/// }
/// ```
/// while the same call on a [`DmaBuffer`] mapping compiles:
/// ```
/// # use iommufd::{Access, DmaBuffer, Ioas, Iova, Mapping};
/// fn share(ioas: &Ioas, buf: &Mapping<DmaBuffer>) -> iommufd::Result<Mapping<DmaBuffer>> {
///     ioas.copy(buf, Iova::Auto, Access::READ)
/// }
/// ```
pub trait Shareable: Memory {}
impl Shareable for DmaBuffer {}
impl Shareable for FileMemory {}

/// What a [`Mapping`](crate::Mapping) keeps alive for as long as an IOVA range refers to it.
pub trait Memory: sealed::Sealed {
    /// What the mapping holds.
    #[doc(hidden)]
    type Held: std::fmt::Debug + Send + Sync;
    /// What a successful [`Mapping::unmap`](crate::Mapping::unmap) gives back.
    type Unmapped;
    #[doc(hidden)]
    fn release(held: Self::Held) -> Self::Unmapped;
}

impl sealed::Sealed for DmaBuffer {}
impl Memory for DmaBuffer {
    type Held = Arc<Region>;
    /// The buffer, unless a copy of the mapping in another IOAS still shares it (then `None`: the
    /// memory is freed when the last copy is unmapped). When the last two copies are unmapped on two
    /// threads at once, each may see the other's reference: both get `None` and the memory is freed
    /// (never handed out twice).
    type Unmapped = Option<DmaBuffer>;
    fn release(mut held: Arc<Region>) -> Option<DmaBuffer> {
        // `get_mut` succeeds only for the last reference (no other copy's guard holds the region), and
        // a concurrent last release on another thread then sees a count of 1 only after this one has
        // dropped its reference: exactly one of them gets the buffer, or, if both drop together,
        // nobody does and the region is freed.
        if Arc::get_mut(&mut held).is_some() { Some(DmaBuffer { region: held }) } else { None }
    }
}

/// File-backed memory mapped with [`Ioas::map_file`](crate::Ioas::map_file): the kernel pins the
/// file's pages itself, so the mapping holds nothing of the caller's.
#[derive(Debug)]
pub struct FileMemory(());
impl sealed::Sealed for FileMemory {}
impl Memory for FileMemory {
    type Held = ();
    type Unmapped = ();
    fn release(_: ()) {}
}

/// Caller-managed memory mapped with the `unsafe` [`Ioas::map_user`](crate::Ioas::map_user).
#[derive(Debug)]
pub struct UserMemory(());
impl sealed::Sealed for UserMemory {}
impl Memory for UserMemory {
    type Held = ();
    type Unmapped = ();
    fn release(_: ()) {}
}

pub(crate) fn dma_region(buffer: DmaBuffer) -> Arc<Region> {
    buffer.region
}

/// The 8-byte-aligned words that overlap `start..start+len`: the first word's address and the
/// number of words.
fn words(start: usize, len: usize) -> (usize, usize) {
    let first = start & !7;
    (first, (start + len - first).div_ceil(8))
}

/// Copy out of device-visible memory, with relaxed atomic loads of whole aligned 8-byte words.
///
/// Atomic rather than volatile: a device, other threads (through `&Mapping` or a copy of it) and this
/// thread may all access the bytes at once, and only atomic accesses make that well defined. Every
/// access is an `AtomicU64` on an aligned word, whatever the offset and length (bytes at the edges are
/// taken from their whole word), so concurrent copies never race accesses of different sizes on the
/// same bytes. Relaxed atomics compile to plain loads and stores on every supported architecture.
///
/// # Safety
///
/// Every 8-byte-aligned word overlapping `src..src+dst.len()` must be memory of this process that is
/// readable and writable (the atomic types require both) and stays mapped for the call, and no Rust
/// reference may cover it. A range inside page-aligned memory satisfies the first part: pages are
/// whole words.
pub(crate) unsafe fn copy_from_device(src: *const u8, dst: &mut [u8]) {
    if dst.is_empty() {
        return;
    }
    let (first, n) = words(src as usize, dst.len());
    let skip = src as usize - first;
    let mut out = 0;
    for w in 0..n {
        // SAFETY: word `w` is an aligned word overlapping the caller's range, which the caller
        // guarantees is read-write memory of this process that no Rust reference covers.
        let word = unsafe { AtomicU64::from_ptr((first + 8 * w) as *mut u64) }.load(Ordering::Relaxed);
        let bytes = word.to_ne_bytes();
        let from = if w == 0 { skip } else { 0 };
        let take = (8 - from).min(dst.len() - out);
        dst[out..out + take].copy_from_slice(&bytes[from..from + take]);
        out += take;
    }
}

/// Copy into device-visible memory, with relaxed atomic stores of whole aligned 8-byte words; a word
/// only partly written (at the edges) is merged with a compare-and-exchange loop, so bytes of it
/// outside the range that a device or another thread changes meanwhile are kept.
///
/// # Safety
///
/// As for [`copy_from_device`]: every 8-byte-aligned word overlapping `dst..dst+src.len()` must be
/// readable and writable memory of this process that stays mapped for the call, covered by no Rust
/// reference.
pub(crate) unsafe fn copy_to_device(src: &[u8], dst: *mut u8) {
    if src.is_empty() {
        return;
    }
    let (first, n) = words(dst as usize, src.len());
    let skip = dst as usize - first;
    let mut used = 0;
    for w in 0..n {
        // SAFETY: word `w` is an aligned word overlapping the caller's range, which the caller
        // guarantees is read-write memory of this process that no Rust reference covers.
        let atom = unsafe { AtomicU64::from_ptr((first + 8 * w) as *mut u64) };
        let from = if w == 0 { skip } else { 0 };
        let take = (8 - from).min(src.len() - used);
        let part = &src[used..used + take];
        used += take;
        if take == 8 {
            atom.store(u64::from_ne_bytes(part.try_into().expect("8 bytes")), Ordering::Relaxed);
            continue;
        }
        let mut old = atom.load(Ordering::Relaxed);
        loop {
            let mut bytes = old.to_ne_bytes();
            bytes[from..from + take].copy_from_slice(part);
            match atom.compare_exchange_weak(
                old,
                u64::from_ne_bytes(bytes),
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => break,
                Err(now) => old = now,
            }
        }
    }
}

/// Checks that `file` may be mapped with `access` up to byte `end`: the kernel's
/// `IOMMU_IOAS_MAP_FILE` checks neither the fd's access mode nor its seals, so a device could
/// otherwise write a file opened read-only or sealed against writes, or read one opened write-only.
pub(crate) fn check_file_access(
    op: &'static str,
    file: BorrowedFd<'_>,
    access: crate::Access,
    end: u64,
) -> Result<()> {
    use rustix::fs::{OFlags, SealFlags};
    let flags = rustix::fs::fcntl_getfl(file).map_err(|e| Error::os("fcntl(F_GETFL)", e))?;
    if flags.contains(OFlags::PATH) {
        return Err(Error::invalid(op, "the fd is an O_PATH fd, which gives no access to the file"));
    }
    let mode = flags & OFlags::RWMODE;
    let readable = mode == OFlags::RDONLY || mode == OFlags::RDWR;
    let writable = mode == OFlags::WRONLY || mode == OFlags::RDWR;
    if access.contains(crate::Access::READ) && !readable {
        return Err(Error::invalid(op, "Access::READ needs an fd open for reading (it is open write-only)"));
    }
    if access.contains(crate::Access::WRITE) {
        if !writable {
            return Err(Error::invalid(
                op,
                "Access::WRITE needs an fd open for writing (it is open read-only)",
            ));
        }
        // Files that cannot be sealed answer EINVAL: they have no seals. Any other failure says nothing
        // about the seals, so it refuses the map rather than assuming none.
        let seals = match rustix::fs::fcntl_get_seals(file) {
            Ok(seals) => seals,
            Err(rustix::io::Errno::INVAL) => SealFlags::empty(),
            Err(e) => return Err(Error::os("fcntl(F_GET_SEALS)", e)),
        };
        if seals.intersects(SealFlags::WRITE | SealFlags::FUTURE_WRITE) {
            return Err(Error::invalid(
                op,
                "Access::WRITE on a file sealed against writes (F_SEAL_WRITE or F_SEAL_FUTURE_WRITE)",
            ));
        }
    }
    let stat = rustix::fs::fstat(file).map_err(|e| Error::os("fstat", e))?;
    if rustix::fs::FileType::from_raw_mode(stat.st_mode) == rustix::fs::FileType::RegularFile {
        let size = u64::try_from(stat.st_size).unwrap_or(0);
        let page = page_size() as u64;
        let pages_end = size.checked_next_multiple_of(page).unwrap_or(u64::MAX);
        if end > pages_end {
            return Err(Error::invalid(
                op,
                format!("the range ends at {end:#x}, past the end of the {size:#x}-byte file"),
            ));
        }
    }
    Ok(())
}
