//! The crate's one error type.
//!
//! Every failure names the operation that failed. Kernel failures carry the errno and, where the errno
//! has a well-known cause, a hint. Four classes matter to callers:
//!
//! - **not supported**: [`Error::is_unsupported`] is the one test. It is true for every way the
//!   system can lack what was asked:
//!   - [`Error::Unsupported`]: the running kernel does not know the ioctl at all (`ENOTTY` from an
//!     iommufd ioctl, or from a VFIO ioctl the device's driver does not implement), or predates a
//!     newer flag or field of it (refused before the ioctl, from the probe); the variant names the
//!     kernel release that added it and the errno an older kernel answers;
//!   - [`Error::Ioctl`] with `EOPNOTSUPP`: the kernel knows the ioctl but the IOMMU driver, or this
//!     kernel, lacks the requested flag, data type or feature (for example dirty tracking, or a HWPT
//!     allocation flag on virtio-iommu); the errno and hint are kept because they tell which;
//!   - [`Error::Ioctl`] with `ENOTTY` from `VFIO_DEVICE_FEATURE`: the device's driver lacks that
//!     feature (the ioctl itself exists, so no kernel release can be named);
//!   - [`Error::NotCapable`]: this crate found, before any ioctl, that the device or its IOMMU lacks
//!     the capability (for example PASID).
//!
//!   Match on the variants only to tell these apart; to decide whether to fall back, ask
//!   [`is_unsupported`](Error::is_unsupported).
//! - **caller bugs**: [`Error::InvalidArgument`], [`Error::ForeignObject`], [`Error::ForeignProcess`]
//!   and [`Error::WrongFile`], raised before any ioctl;
//! - **retryable**: [`Error::is_retryable`] (`EINTR`, `EAGAIN`, `EBUSY` while a device is in use);
//! - **handed back**: an explicit close that fails returns the handle with the error in a
//!   [`CloseError`] (for example `Attachment::detach` returns `Err(CloseError<Attachment>)`), so the
//!   caller can retry; it converts into [`Error`] with `?` (dropping the handle, which then cleans up
//!   as its `Drop` does).
//!
//! `Drop` never fails: a failure there is logged through the [`log`](https://docs.rs/log) crate.

use std::path::PathBuf;

pub use rustix::io::Errno;

/// `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in this crate.
///
/// # "Not supported": one test
///
/// [`is_unsupported`](Error::is_unsupported) is the one test for "the system lacks what was asked",
/// whoever lacks it. The variants keep what each case knows:
///
/// - [`Unsupported`](Error::Unsupported): the ioctl is unknown (`ENOTTY`), or the kernel predates a
///   newer flag or field of it; it names the kernel release that added it;
/// - [`Ioctl`](Error::Ioctl) with `EOPNOTSUPP`: the kernel knows the ioctl but this kernel or the IOMMU
///   driver lacks the requested flag, data type or feature (dirty tracking, a HWPT allocation flag on
///   virtio-iommu, ...); the errno and hint are kept because they tell which;
/// - [`Ioctl`](Error::Ioctl) with `ENOTTY` from `VFIO_DEVICE_FEATURE`: the device's driver lacks the
///   feature (the ioctl exists, so no release can be named);
/// - [`NotCapable`](Error::NotCapable): found by this crate before any ioctl (for example a PASID
///   attachment on a device without PASID support).
///
/// Code that falls back when something is missing asks `is_unsupported()`, not for a variant.
///
/// # Handles handed back
///
/// An explicit close that fails returns its handle with the error in a [`CloseError`] (for example
/// [`Attachment::detach`](crate::Attachment::detach)), so the call can be retried. `?` converts it
/// into this error, dropping the handle (which then cleans up as its `Drop` does). `Drop` itself
/// never fails: it logs failures through the `log` crate.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The running kernel does not know this ioctl (it answered `ENOTTY`), or predates a newer flag or
    /// field of an ioctl it knows. The crate refuses a newer flag or field before the ioctl, from the
    /// running kernel's [capabilities](crate::Iommufd::capabilities), so that an old kernel's answer
    /// to it (often `EINVAL`, which also means a bad argument) is not misread.
    #[error("{op} is not supported by the running kernel{} (it needs Linux {since} or newer)", driver_suffix(.op))]
    Unsupported {
        /// The operation, named after its ioctl (and the flag or field, for a newer one).
        op: &'static str,
        /// The first kernel release that has it.
        since: &'static str,
        /// What a kernel without it answers: `ENOTTY` for an unknown ioctl; for a newer flag or field
        /// the errno an older kernel gives (`EINVAL` or `EOPNOTSUPP`), whether it was received or
        /// the crate refused the call before sending it.
        errno: Errno,
    },
    /// An ioctl failed.
    #[error("{op} failed: {errno}{}", hint_suffix(.hint))]
    Ioctl {
        /// The operation, named after its ioctl.
        op: &'static str,
        /// What the kernel answered.
        errno: Errno,
        /// A likely cause, when the errno has a well-known one for this operation.
        hint: Option<&'static str>,
    },
    /// Opening a device node or sysfs file failed.
    #[error("cannot open {}: {errno}{}", .path.display(), hint_suffix(.hint))]
    Open {
        /// What was opened.
        path: PathBuf,
        /// What the kernel answered.
        errno: Errno,
        /// A likely cause (for example a kernel built without `CONFIG_IOMMUFD`).
        hint: Option<&'static str>,
    },
    /// A system call other than an iommufd/VFIO ioctl failed (mmap, memfd_create, read, ...).
    #[error("{op} failed: {errno}")]
    Os {
        /// The operation.
        op: &'static str,
        /// What the kernel answered.
        errno: Errno,
    },
    /// An argument was rejected before any ioctl was issued.
    #[error("{op}: invalid argument: {reason}")]
    InvalidArgument {
        /// The operation.
        op: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// An object belonging to a different [`Iommufd`](crate::Iommufd) was passed.
    #[error("{op}: the object belongs to a different iommufd (object ids are per-iommufd)")]
    ForeignObject {
        /// The operation.
        op: &'static str,
    },
    /// An explicit close/destroy was refused because other handles still depend on the object.
    #[error("{op}: still in use by {users} other handle(s) (mappings, page tables or attachments)")]
    InUse {
        /// The operation.
        op: &'static str,
        /// How many other handles hold the object.
        users: usize,
    },
    /// A handle was used in a process other than the one that opened its iommufd (a `fork()`ed child
    /// shares the fd, so acting there would change the parent's mappings and devices).
    #[error("{op}: the handle belongs to process {owner}; a fork()ed child cannot use it")]
    ForeignProcess {
        /// The operation.
        op: &'static str,
        /// The process that owns the handle.
        owner: u32,
    },
    /// An operation over several kernel objects failed after it had already changed some of them: an
    /// unmap of a range that removed `unmapped` bytes of mappings and then failed. The cause is
    /// [`source`](std::error::Error::source).
    #[error("{op} failed after unmapping {unmapped:#x} bytes")]
    PartialUnmap {
        /// The operation.
        op: &'static str,
        /// Bytes already unmapped when it failed.
        unmapped: u64,
        /// Why it stopped.
        #[source]
        source: Box<Error>,
    },
    /// A file descriptor or path is not the kind of file the call needs, found with `fstat` and
    /// `/sys/dev/char/MAJOR:MINOR` before any ioctl (for example `/dev/null` passed as an iommufd).
    #[error("{op}: not {expected}: the file is {found}")]
    WrongFile {
        /// The operation.
        op: &'static str,
        /// What the file should be (`an iommufd`, `a VFIO device cdev`).
        expected: &'static str,
        /// What it is.
        found: String,
    },
    /// The device or its IOMMU lacks a capability the call needs, found before any ioctl (for example a
    /// PASID attachment on a device whose IOMMU reports no PASID support). [`Error::is_unsupported`]
    /// is true for it.
    #[error("{op}: not supported by this device: {reason}")]
    NotCapable {
        /// The operation.
        op: &'static str,
        /// What is missing.
        reason: String,
    },
    /// The kernel answered with data this crate cannot interpret.
    #[error("{op}: unexpected kernel answer: {detail}")]
    Protocol {
        /// The operation.
        op: &'static str,
        /// What was unexpected.
        detail: String,
    },
}

/// VFIO ioctls are answered by the device's (or migration fd's) driver: `ENOTTY` may mean it lacks
/// the ioctl on a kernel that has it.
fn driver_suffix(op: &str) -> &'static str {
    if op.starts_with("VFIO_") { " or by the device's driver" } else { "" }
}

fn hint_suffix(hint: &Option<&'static str>) -> String {
    match hint {
        Some(h) => format!(" ({h})"),
        None => String::new(),
    }
}

impl Error {
    /// The errno behind this error, if the kernel produced one.
    pub fn errno(&self) -> Option<Errno> {
        match self {
            Error::Ioctl { errno, .. } | Error::Open { errno, .. } | Error::Os { errno, .. } => Some(*errno),
            Error::Unsupported { errno, .. } => Some(*errno),
            _ => None,
        }
    }

    /// True if the running kernel, IOMMU, device driver or device lacks the requested feature: an
    /// unknown ioctl or VFIO device feature (`ENOTTY`), an `EOPNOTSUPP` answer (for example dirty
    /// tracking on an IOMMU without it), or [`Error::NotCapable`]. This is the one test for "not
    /// supported": match on the variants only to tell its cases apart.
    pub fn is_unsupported(&self) -> bool {
        // ENOTTY also comes back as `Error::Ioctl` for VFIO device features the driver lacks.
        matches!(self, Error::NotCapable { .. } | Error::Unsupported { .. })
            || matches!(self.errno(), Some(Errno::NOTTY | Errno::OPNOTSUPP))
    }

    /// True if the same call may succeed later unchanged.
    pub fn is_retryable(&self) -> bool {
        matches!(self.errno(), Some(Errno::INTR | Errno::AGAIN | Errno::BUSY))
    }

    /// The running kernel lacks `op`, added in Linux `since`; a kernel without it answers `errno`.
    pub(crate) fn unsupported(op: &'static str, since: &'static str, errno: Errno) -> Error {
        Error::Unsupported { op, since, errno }
    }

    pub(crate) fn invalid(op: &'static str, reason: impl Into<String>) -> Error {
        Error::InvalidArgument { op, reason: reason.into() }
    }

    pub(crate) fn os(op: &'static str, errno: Errno) -> Error {
        Error::Os { op, errno }
    }

    pub(crate) fn open(path: impl Into<PathBuf>, errno: Errno) -> Error {
        let path = path.into();
        let hint = match errno {
            Errno::NOENT if path.file_name().is_some_and(|n| n == "iommu") => {
                Some("the running kernel lacks CONFIG_IOMMUFD, or devtmpfs is not mounted on /dev")
            }
            Errno::NOENT if path.starts_with("/dev/vfio/devices") => Some(
                "no VFIO device cdev: the kernel lacks CONFIG_VFIO_DEVICE_CDEV or the device is not bound to vfio-pci",
            ),
            Errno::ACCESS | Errno::PERM => Some("insufficient permissions on the device node"),
            _ => None,
        };
        Error::Open { path, errno, hint }
    }
}

impl From<Error> for std::io::Error {
    fn from(e: Error) -> Self {
        match e.errno() {
            Some(errno) => std::io::Error::new(errno.kind(), e),
            None => std::io::Error::new(std::io::ErrorKind::InvalidInput, e),
        }
    }
}

/// A refused explicit close (unmap, destroy, detach) that hands the handle back, so the caller can
/// retry once the cause is gone (as `std::io::IntoInnerError` does for a writer).
///
/// `?` converts it into [`Error`], dropping the handle: its `Drop` then tries once more, best effort,
/// and logs a failure.
pub struct CloseError<T> {
    error: Error,
    handle: T,
}

impl<T> CloseError<T> {
    pub(crate) fn new(error: Error, handle: T) -> Self {
        CloseError { error, handle }
    }

    /// Why the close failed.
    pub fn error(&self) -> &Error {
        &self.error
    }

    /// The handle, still open, for a retry.
    pub fn into_inner(self) -> T {
        self.handle
    }

    /// The error and the handle.
    pub fn into_parts(self) -> (Error, T) {
        (self.error, self.handle)
    }
}

impl<T> std::fmt::Debug for CloseError<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CloseError")
            .field("error", &self.error)
            .field("handle", &std::any::type_name::<T>())
            .finish()
    }
}

impl<T> std::fmt::Display for CloseError<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(&self.error, f)
    }
}

impl<T> std::error::Error for CloseError<T> {
    /// The same as the inner error's: `Display` already prints the inner error itself.
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        std::error::Error::source(&self.error)
    }
}

impl<T> From<CloseError<T>> for Error {
    fn from(e: CloseError<T>) -> Error {
        e.error
    }
}
