//! DMA memory and mappings: the soundness core.
//!
//! A device that can reach an IOVA can write the memory behind it at any time, outside Rust's view.
//! The rules this module enforces:
//!
//! - A [`DmaBuffer`] is plain memory the caller owns: it may be borrowed as `&[u8]`/`&mut [u8]`
//!   because no device can reach it.
//! - [`Ioas::map`](crate::Ioas::map) *moves* the buffer into the returned [`Mapping`](crate::Mapping). From then on no
//!   Rust reference to the bytes exists; [`Mapping::read_at`](crate::Mapping::read_at)/[`Mapping::write_at`](crate::Mapping::write_at) copy with volatile
//!   accesses. The buffer cannot be dropped, moved out of, or borrowed while mapped because the caller
//!   no longer has it.
//! - The memory is released only after the kernel confirms the unmap of every IOVA range that refers to
//!   it (a [`copy`](crate::Ioas::copy) shares it). If an unmap fails, or the [`Mapping`](crate::Mapping) is
//!   `mem::forget`-ed, the memory is leaked, never freed.
//! - Memory not owned by a mapping is either pinned by the kernel from a file
//!   ([`Ioas::map_file`](crate::Ioas::map_file)), or mapped through the `unsafe`
//!   [`Ioas::map_user`](crate::Ioas::map_user), whose contract puts the lifetime on the caller.

use std::ptr::NonNull;
use std::sync::Arc;

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
// moves or shares only the address. Byte access goes through `&mut DmaBuffer` (exclusive) or volatile
// copies in `Mapping`, both of which are thread-agnostic.
unsafe impl Send for Region {}
// SAFETY: as above; `&Region` gives no access to the bytes by itself.
unsafe impl Sync for Region {}

impl Region {
    fn new(len: usize) -> Result<Region> {
        use rustix::mm::{Advice, MapFlags, ProtFlags};
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
        let region = Region { ptr, len };
        // A forked child would share these pages copy-on-write; the parent's next write would move it
        // to a new page the device cannot see. DONTFORK keeps the pinned pages the parent's.
        // SAFETY: the range is exactly the mapping just created and owned by `region`.
        unsafe { rustix::mm::madvise(ptr.as_ptr().cast(), len, Advice::LinuxDontFork) }
            .map_err(|e| Error::os("madvise(MADV_DONTFORK)", e))?;
        Ok(region)
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
/// mapping.write_at(0, &[2])?; // the one way in while mapped: a volatile copy
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
    region: Region,
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
        Ok(DmaBuffer { region: Region::new(rounded)? })
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
        // SAFETY: the region is `len` readable bytes owned by `self`; it is not mapped for DMA (mapping
        // consumes the buffer), so nothing else writes it during the borrow.
        unsafe { std::slice::from_raw_parts(self.region.ptr.as_ptr(), self.region.len) }
    }

    /// The bytes, mutably.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as in `as_slice`, and `&mut self` makes this the only borrow.
        unsafe { std::slice::from_raw_parts_mut(self.region.ptr.as_ptr(), self.region.len) }
    }
}

mod sealed {
    pub trait Sealed {}
}

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
    /// memory is freed when the last copy is unmapped).
    type Unmapped = Option<DmaBuffer>;
    fn release(held: Arc<Region>) -> Option<DmaBuffer> {
        Arc::try_unwrap(held).ok().map(|region| DmaBuffer { region })
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
    Arc::new(buffer.region)
}

/// Volatile copy out of device-visible memory.
///
/// # Safety
///
/// `src..src+dst.len()` must be readable memory that stays mapped for the call.
pub(crate) unsafe fn copy_from_device(src: *const u8, dst: &mut [u8]) {
    for (i, d) in dst.iter_mut().enumerate() {
        // SAFETY: `src + i` is inside the readable range the caller guarantees; volatile because a
        // device may write it concurrently, outside the compiler's knowledge.
        *d = unsafe { std::ptr::read_volatile(src.add(i)) };
    }
}

/// Volatile copy into device-visible memory.
///
/// # Safety
///
/// `dst..dst+src.len()` must be writable memory that stays mapped for the call.
pub(crate) unsafe fn copy_to_device(src: &[u8], dst: *mut u8) {
    for (i, s) in src.iter().enumerate() {
        // SAFETY: `dst + i` is inside the writable range the caller guarantees; volatile because a
        // device may read it concurrently.
        unsafe { std::ptr::write_volatile(dst.add(i), *s) };
    }
}
