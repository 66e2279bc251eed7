//! The crate's one error type.
//!
//! Every failure names the operation that failed. Kernel failures carry the errno and, where the errno
//! has a well-known cause, a hint. Three classes matter to callers:
//!
//! - **this kernel lacks it**: [`Error::Unsupported`] (the ioctl is unknown to the running kernel) and
//!   [`Error::is_unsupported`], which also covers `EOPNOTSUPP` answers for a feature the IOMMU lacks;
//! - **caller bugs**: [`Error::InvalidArgument`] and [`Error::ForeignObject`], raised before any ioctl;
//! - **retryable**: [`Error::is_retryable`] (`EINTR`, `EAGAIN`, `EBUSY` while a device is in use).

use std::path::PathBuf;

pub use rustix::io::Errno;

/// `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in this crate.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The running kernel does not know this ioctl (it answered `ENOTTY`).
    #[error("{op} is not supported by the running kernel{} (it needs Linux {since} or newer)", driver_suffix(.op))]
    Unsupported {
        /// The operation, named after its ioctl.
        op: &'static str,
        /// The first kernel release that has the ioctl.
        since: &'static str,
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
            Error::Unsupported { .. } => Some(Errno::NOTTY),
            _ => None,
        }
    }

    /// True if the running kernel, IOMMU or device driver lacks the requested feature: an unknown ioctl
    /// or VFIO device feature (`ENOTTY`), or an `EOPNOTSUPP` answer (for example dirty tracking on an
    /// IOMMU without it).
    pub fn is_unsupported(&self) -> bool {
        // ENOTTY also comes back as `Error::Ioctl` for VFIO device features the driver lacks.
        matches!(self.errno(), Some(Errno::NOTTY | Errno::OPNOTSUPP))
    }

    /// True if the same call may succeed later unchanged.
    pub fn is_retryable(&self) -> bool {
        matches!(self.errno(), Some(Errno::INTR | Errno::AGAIN | Errno::BUSY))
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
            Errno::BUSY => Some("the device is already opened by another process or through its VFIO group"),
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
