//! The module that issues iommufd and VFIO ioctls.
//!
//! Each request is described by an [`Op`] (name, request number, the kernel that introduced it), so a
//! failure is reported with its name and an `ENOTTY` becomes [`Error::Unsupported`] naming the kernel
//! release that added the ioctl. The only `unsafe` here is the `ioctl(2)` call itself, behind
//! [`call`], whose contract ties the argument type to the request.

use std::ffi::c_int;
use std::os::fd::{AsRawFd, BorrowedFd};

use iommufd_sys as sys;

use crate::error::{Errno, Error, Result};

/// One ioctl request: its name, number and the kernel release that introduced it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Op {
    pub name: &'static str,
    pub request: u32,
    pub since: &'static str,
}

macro_rules! ops {
    ($($konst:ident = $req:ident, $since:literal;)*) => {
        $(#[allow(dead_code)] pub(crate) const $konst: Op = Op { name: stringify!($req), request: sys::$req, since: $since };)*
        /// Every operation this module knows, for capability probing and tests.
        #[allow(dead_code)]
        pub(crate) const ALL: &[Op] = &[$($konst),*];
    };
}

ops! {
    DESTROY = IOMMU_DESTROY, "6.2";
    IOAS_ALLOC = IOMMU_IOAS_ALLOC, "6.2";
    IOAS_ALLOW_IOVAS = IOMMU_IOAS_ALLOW_IOVAS, "6.2";
    IOAS_COPY = IOMMU_IOAS_COPY, "6.2";
    IOAS_IOVA_RANGES = IOMMU_IOAS_IOVA_RANGES, "6.2";
    IOAS_MAP = IOMMU_IOAS_MAP, "6.2";
    IOAS_UNMAP = IOMMU_IOAS_UNMAP, "6.2";
    OPTION = IOMMU_OPTION, "6.2";
    VFIO_IOAS = IOMMU_VFIO_IOAS, "6.2";
    HWPT_ALLOC = IOMMU_HWPT_ALLOC, "6.6";
    GET_HW_INFO = IOMMU_GET_HW_INFO, "6.6";
    HWPT_SET_DIRTY_TRACKING = IOMMU_HWPT_SET_DIRTY_TRACKING, "6.7";
    HWPT_GET_DIRTY_BITMAP = IOMMU_HWPT_GET_DIRTY_BITMAP, "6.7";
    HWPT_INVALIDATE = IOMMU_HWPT_INVALIDATE, "6.8";
    FAULT_QUEUE_ALLOC = IOMMU_FAULT_QUEUE_ALLOC, "6.11";
    IOAS_MAP_FILE = IOMMU_IOAS_MAP_FILE, "6.13";
    VIOMMU_ALLOC = IOMMU_VIOMMU_ALLOC, "6.13";
    VDEVICE_ALLOC = IOMMU_VDEVICE_ALLOC, "6.13";
    IOAS_CHANGE_PROCESS = IOMMU_IOAS_CHANGE_PROCESS, "6.13";
    VEVENTQ_ALLOC = IOMMU_VEVENTQ_ALLOC, "6.15";
    HW_QUEUE_ALLOC = IOMMU_HW_QUEUE_ALLOC, "6.17";
    IOAS_NOIOMMU_GET_PA = IOMMU_IOAS_NOIOMMU_GET_PA, "7.3";
    DEVICE_GET_INFO = VFIO_DEVICE_GET_INFO, "3.6";
    DEVICE_GET_REGION_INFO = VFIO_DEVICE_GET_REGION_INFO, "3.6";
    DEVICE_GET_IRQ_INFO = VFIO_DEVICE_GET_IRQ_INFO, "3.6";
    DEVICE_SET_IRQS = VFIO_DEVICE_SET_IRQS, "3.6";
    DEVICE_RESET = VFIO_DEVICE_RESET, "3.6";
    DEVICE_GET_PCI_HOT_RESET_INFO = VFIO_DEVICE_GET_PCI_HOT_RESET_INFO, "3.12";
    DEVICE_PCI_HOT_RESET = VFIO_DEVICE_PCI_HOT_RESET, "3.12";
    DEVICE_QUERY_GFX_PLANE = VFIO_DEVICE_QUERY_GFX_PLANE, "4.16";
    DEVICE_GET_GFX_DMABUF = VFIO_DEVICE_GET_GFX_DMABUF, "4.16";
    DEVICE_IOEVENTFD = VFIO_DEVICE_IOEVENTFD, "4.17";
    DEVICE_FEATURE = VFIO_DEVICE_FEATURE, "5.7";
    DEVICE_BIND_IOMMUFD = VFIO_DEVICE_BIND_IOMMUFD, "6.6";
    DEVICE_ATTACH_IOMMUFD_PT = VFIO_DEVICE_ATTACH_IOMMUFD_PT, "6.6";
    DEVICE_DETACH_IOMMUFD_PT = VFIO_DEVICE_DETACH_IOMMUFD_PT, "6.6";
    MIG_GET_PRECOPY_INFO = VFIO_MIG_GET_PRECOPY_INFO, "6.2";
}

/// A hint for an errno that has a well-known cause for this operation.
///
/// Each cause is what the running kernel's source does for that errno, not a guess: for example pages
/// are pinned (and charged against `RLIMIT_MEMLOCK`) when a mapping meets a domain, which happens at
/// map time if the IOAS already has one, and at attach or HWPT allocation time for the mappings it
/// already holds; a process with `CAP_IPC_LOCK` is never charged (`iopt_alloc_pages`).
fn hint(op: &Op, errno: Errno) -> Option<&'static str> {
    Some(match (op.request, errno) {
        (sys::IOMMU_IOAS_MAP | sys::IOMMU_IOAS_MAP_FILE | sys::IOMMU_IOAS_COPY, Errno::NOMEM) => {
            "pinning exceeded RLIMIT_MEMLOCK (raise it, or see Iommufd::set_rlimit_mode); a process with \
             CAP_IPC_LOCK is never limited, so for it memory itself ran out"
        }
        (sys::VFIO_DEVICE_ATTACH_IOMMUFD_PT | sys::IOMMU_HWPT_ALLOC, Errno::NOMEM) => {
            "pinning the IOAS's existing mappings for the new domain exceeded RLIMIT_MEMLOCK (raise it, or \
             see Iommufd::set_rlimit_mode); a process with CAP_IPC_LOCK is never limited, so for it memory \
             itself ran out"
        }
        (sys::IOMMU_IOAS_MAP | sys::IOMMU_IOAS_MAP_FILE | sys::IOMMU_IOAS_COPY, Errno::EXIST) => {
            "the IOVA range overlaps an existing mapping"
        }
        (sys::IOMMU_IOAS_MAP | sys::IOMMU_IOAS_MAP_FILE | sys::IOMMU_IOAS_COPY, Errno::NOSPC) => {
            "no free IOVA range of that size (check iova_ranges())"
        }
        (sys::IOMMU_IOAS_UNMAP, Errno::NOENT) => "no mapping starts and ends exactly at this range's bounds",
        (sys::IOMMU_DESTROY, Errno::BUSY) => "the object is still in use (attached device or child object)",
        (sys::IOMMU_DESTROY, Errno::NOENT) => "no object with this id exists in this iommufd",
        (sys::IOMMU_HWPT_ALLOC, Errno::OPNOTSUPP) => {
            "the IOMMU driver does not support the requested flags or data type"
        }
        (sys::VFIO_DEVICE_BIND_IOMMUFD, Errno::PERM) => {
            "no interrupt remapping: set iommufd.allow_unsafe_interrupts=1 if the platform is trusted"
        }
        (sys::VFIO_DEVICE_BIND_IOMMUFD, Errno::INVAL) => {
            "the device is already bound to an iommufd (a cdev can be opened many times, but the device \
             bound through only one of them at a time)"
        }
        (sys::VFIO_DEVICE_BIND_IOMMUFD, Errno::BUSY) => {
            "the device's IOMMU group is open through the legacy VFIO group interface (/dev/vfio/<group>)"
        }
        (sys::VFIO_DEVICE_ATTACH_IOMMUFD_PT, Errno::INVAL) => {
            "the page table is incompatible with this device, or the id names no IOAS/HWPT"
        }
        _ => return None,
    })
}

/// Converts a failed call into the crate's error.
pub(crate) fn error(op: &Op, errno: Errno) -> Error {
    if errno == Errno::NOTTY {
        return Error::unsupported(op.name, op.since, Errno::NOTTY);
    }
    Error::Ioctl { op: op.name, errno, hint: hint(op, errno) }
}

/// Issues `op` on `fd` with `arg`, returning the ioctl's non-negative result.
///
/// # Safety
///
/// `T` must be the argument structure the kernel defines for `op.request` on the kind of file `fd`
/// is (an iommufd or a VFIO device cdev), initialised with a correct `size`/`argsz` field, and every
/// user pointer inside `arg` must be valid for the reads and writes the kernel performs through it for
/// the length the structure declares, for the duration of the call.
pub(crate) unsafe fn call<T>(fd: BorrowedFd<'_>, op: &Op, arg: &mut T) -> Result<c_int> {
    // SAFETY: the caller guarantees `arg` is the structure for `op.request` with valid embedded
    // pointers; `arg` is a live exclusive borrow, so the kernel may read and write it in place, and
    // `fd` is borrowed open for the duration of the call.
    let ret = unsafe { libc::ioctl(fd.as_raw_fd(), op.request as _, arg as *mut T) };
    check(op, ret)
}

/// Maps a raw ioctl return value to the crate's result, reading `errno` on failure.
fn check(op: &Op, ret: c_int) -> Result<c_int> {
    if ret < 0 {
        let errno = Errno::from_io_error(&std::io::Error::last_os_error()).unwrap_or(Errno::IO);
        return Err(error(op, errno));
    }
    Ok(ret)
}

/// Issues `op` with a variable-length argument held in `buf` (a structure followed by its flexible
/// array or capability chain).
///
/// # Safety
///
/// `buf` must begin with the argument structure the kernel defines for `op.request` on the kind of
/// file `fd` is, with its `argsz` no larger than `size_of_val(buf)`, and hold no user pointers (so the
/// kernel reads and writes only inside `buf`).
pub(crate) unsafe fn call_buf<T: Copy>(fd: BorrowedFd<'_>, op: &Op, buf: &mut [T]) -> Result<c_int> {
    // SAFETY: the caller guarantees `buf` starts with `op`'s argument and that the kernel, bounded by
    // `argsz`, stays inside `buf`, which is exclusively borrowed for the call; `fd` is borrowed open.
    let ret = unsafe { libc::ioctl(fd.as_raw_fd(), op.request as _, buf.as_mut_ptr()) };
    check(op, ret)
}

/// Issues `op` on `fd` with no argument (for example `VFIO_DEVICE_RESET`).
pub(crate) fn call_none(fd: BorrowedFd<'_>, op: &Op) -> Result<c_int> {
    // SAFETY: the requests passed here take no argument (the kernel ignores the third parameter), so
    // no memory is read or written through it.
    let ret = unsafe { libc::ioctl(fd.as_raw_fd(), op.request as _, 0usize) };
    check(op, ret)
}

/// Implements `Sized` argument structs with a leading `size`/`argsz` field set to their own size.
pub(crate) trait Sized32: Default {
    fn new() -> Self;
}

macro_rules! sized {
    ($($t:ident . $field:ident),* $(,)?) => {$(
        impl Sized32 for sys::$t {
            fn new() -> Self {
                sys::$t { $field: std::mem::size_of::<sys::$t>() as u32, ..Default::default() }
            }
        }
    )*};
}

sized! {
    iommu_destroy.size, iommu_ioas_alloc.size, iommu_ioas_iova_ranges.size,
    iommu_ioas_allow_iovas.size, iommu_ioas_map.size, iommu_ioas_map_file.size,
    iommu_ioas_copy.size, iommu_ioas_unmap.size, iommu_option.size, iommu_hwpt_alloc.size,
    iommu_hw_info.size, vfio_device_bind_iommufd.argsz, vfio_device_attach_iommufd_pt.argsz,
    vfio_device_detach_iommufd_pt.argsz, vfio_device_info.argsz, vfio_region_info.argsz,
    vfio_irq_info.argsz,
    vfio_device_ioeventfd.argsz,
    vfio_device_gfx_plane_info.argsz,
    vfio_precopy_info.argsz,
    iommu_fault_alloc.size, iommu_viommu_alloc.size, iommu_vdevice_alloc.size, iommu_veventq_alloc.size,
    iommu_hw_queue_alloc.size,
    iommu_hwpt_invalidate.size, iommu_hwpt_set_dirty_tracking.size, iommu_hwpt_get_dirty_bitmap.size,
    iommu_vfio_ioas.size, iommu_ioas_change_process.size, iommu_ioas_noiommu_get_pa.size,
    vfio_pci_hot_reset.argsz,
}

/// `IOMMU_DESTROY`: destroys object `id`.
pub(crate) fn destroy(fd: BorrowedFd<'_>, id: u32) -> Result<()> {
    let mut arg = sys::iommu_destroy::new();
    arg.id = id;
    // SAFETY: `iommu_destroy` is IOMMU_DESTROY's argument, sized by `new()`; it holds no pointers.
    unsafe { call(fd, &DESTROY, &mut arg) }.map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memlock_hints_match_the_kernel() {
        for op in [&IOAS_MAP, &IOAS_MAP_FILE, &IOAS_COPY, &DEVICE_ATTACH_IOMMUFD_PT, &HWPT_ALLOC] {
            let h = hint(op, Errno::NOMEM).unwrap_or_else(|| panic!("{} has no ENOMEM hint", op.name));
            assert!(h.contains("RLIMIT_MEMLOCK") && h.contains("CAP_IPC_LOCK is never limited"), "{h}");
        }
        assert!(hint(&DEVICE_ATTACH_IOMMUFD_PT, Errno::NOMEM).unwrap().contains("existing mappings"));
    }

    #[test]
    fn bind_hints_match_the_kernel() {
        let h = hint(&DEVICE_BIND_IOMMUFD, Errno::INVAL).unwrap();
        assert!(h.contains("already bound") && h.contains("opened many times"), "{h}");
        let h = hint(&DEVICE_BIND_IOMMUFD, Errno::BUSY).unwrap();
        assert!(h.contains("legacy VFIO group"), "{h}");
        // Opening a cdev never answers EBUSY: no hint claims it does.
        let e = Error::open("/dev/vfio/devices/vfio0", Errno::BUSY);
        assert!(matches!(e, Error::Open { hint: None, .. }), "{e}");
    }

    #[test]
    fn not_supported_has_one_test() {
        assert!(error(&HWPT_ALLOC, Errno::NOTTY).is_unsupported());
        assert!(matches!(error(&HWPT_ALLOC, Errno::NOTTY), Error::Unsupported { since: "6.6", .. }));
        let e = error(&HWPT_ALLOC, Errno::OPNOTSUPP);
        assert!(e.is_unsupported() && matches!(e, Error::Ioctl { hint: Some(_), .. }), "{e}");
        assert!(Error::NotCapable { op: "x", reason: "y".into() }.is_unsupported());
        assert!(!error(&HWPT_ALLOC, Errno::INVAL).is_unsupported());
        assert!(!Error::invalid("x", "y").is_unsupported());
    }

    #[test]
    fn a_handed_back_handle_converts_into_its_error() {
        fn close() -> std::result::Result<(), crate::CloseError<Vec<u8>>> {
            Err(crate::CloseError::new(Error::invalid("close", "refused"), vec![1]))
        }
        fn caller() -> Result<()> {
            close()?;
            Ok(())
        }
        assert!(matches!(caller(), Err(Error::InvalidArgument { op: "close", .. })));
    }
}
