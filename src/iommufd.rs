//! [`Iommufd`]: an open `/dev/iommu`, the context every IOAS, page table and bound device lives in.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::path::Path;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, Once, OnceLock};

use iommufd_sys as sys;

use crate::error::{Errno, Error, Result};
use crate::ioas::Ioas;
use crate::ioctl::{self, Sized32};
use crate::probe::Capabilities;

/// The iommufd device node.
pub const DEV_IOMMU: &str = "/dev/iommu";

/// An open iommufd: the context in which IOASes, page tables and bound devices live.
///
/// Cloning is cheap and shares the one file descriptor: every object allocated from it holds a clone,
/// so the fd stays open until the last object is gone. Object ids are local to one iommufd; passing
/// an object of another iommufd is refused with [`Error::ForeignObject`] before any ioctl.
#[derive(Clone)]
pub struct Iommufd {
    inner: Arc<Inner>,
}

struct Inner {
    fd: OwnedFd,
    /// sysfs names (PCI addresses) of the devices currently bound to this iommufd.
    bound: Mutex<Vec<String>>,
    /// The first successful [`Iommufd::probe`], for [`Iommufd::capabilities`].
    caps: OnceLock<Capabilities>,
    /// The process that opened (or adopted) the fd: the only one whose handles act on the kernel.
    pid: u32,
}

/// The calling process's id, cached; a `fork()`ed child refreshes it in an atfork handler.
static PID: AtomicU32 = AtomicU32::new(0);

extern "C" fn refresh_pid_in_child() {
    // getpid is async-signal-safe, as an atfork child handler requires.
    PID.store(rustix::process::getpid().as_raw_nonzero().get() as u32, Ordering::Relaxed);
}

/// The id of the calling process.
///
/// Cached in a static that a `pthread_atfork` child handler refreshes, so the check every handle makes
/// costs one atomic load. A child made by a raw `clone` system call that bypasses the C library's
/// `fork()` is not seen; such a child must not touch this crate's handles.
pub(crate) fn current_pid() -> u32 {
    static REGISTER: Once = Once::new();
    let pid = PID.load(Ordering::Relaxed);
    if pid != 0 {
        return pid;
    }
    REGISTER.call_once(|| {
        // SAFETY: registers a child handler only (no prepare/parent hooks); the handler is a plain
        // `extern "C" fn` that calls only the async-signal-safe getpid and stores to an atomic.
        let rc = unsafe { libc::pthread_atfork(None, None, Some(refresh_pid_in_child)) };
        if rc != 0 {
            log::error!("iommufd: pthread_atfork failed ({rc}); fork() detection falls back to getpid");
        }
    });
    // Registered first, stored second: a fork between the two leaves 0 in the child, which then
    // reads its own pid here.
    let pid = rustix::process::getpid().as_raw_nonzero().get() as u32;
    PID.store(pid, Ordering::Relaxed);
    pid
}

/// How pinned pages are charged against `RLIMIT_MEMLOCK` (`IOMMU_OPTION_RLIMIT_MODE`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RlimitMode {
    /// Charged to the user (`user->locked_vm`), the kernel's default.
    PerUser,
    /// Charged to the process (`mm->pinned_vm`), as the VFIO type1 container does.
    PerProcess,
}

impl std::fmt::Debug for Iommufd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Iommufd").field("fd", &self.inner.fd.as_raw_fd()).finish()
    }
}

impl Iommufd {
    /// Opens `/dev/iommu`.
    ///
    /// `ENOENT` is reported with the hint that the running kernel lacks `CONFIG_IOMMUFD`.
    pub fn open() -> Result<Self> {
        Self::open_path(DEV_IOMMU)
    }

    /// Opens an iommufd device node at `path` (for a non-standard `/dev`).
    ///
    /// The opened file is checked as [`from_fd`](Self::from_fd) checks: any other file (`/dev/null`,
    /// a VFIO cdev, a regular file) gives [`Error::WrongFile`] ("not an iommufd") and is closed.
    pub fn open_path(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let fd = rustix::fs::open(
            path,
            rustix::fs::OFlags::RDWR | rustix::fs::OFlags::CLOEXEC,
            rustix::fs::Mode::empty(),
        )
        .map_err(|e| Error::open(path, e))?;
        Self::checked("Iommufd::open_path", fd)
    }

    /// Adopts an already-open iommufd, for example one passed by a management process over a UNIX
    /// socket (QEMU's `-object iommufd,fd=N`).
    ///
    /// Before any typed ioctl the fd is identified by its device number: it must be a character device
    /// whose `/sys/dev/char/MAJOR:MINOR` entry is the `iommu` misc device (`/dev/iommu`), or the
    /// `vfio` misc device (`/dev/vfio/vfio`) when iommufd provides it
    /// (`CONFIG_IOMMUFD_VFIO_CONTAINER`, confirmed with a side-effect-free `IOMMU_OPTION` query, as
    /// is a misc device where sysfs is not mounted). Any other file gives [`Error::WrongFile`]
    /// ("not an iommufd") and is closed.
    pub fn from_fd(fd: OwnedFd) -> Result<Self> {
        Self::checked("Iommufd::from_fd", fd)
    }

    fn checked(op: &'static str, fd: OwnedFd) -> Result<Self> {
        let this = Self::from_owned(fd);
        crate::device::ident::check_iommufd(op, this.as_fd(), || this.rlimit_mode().is_ok())?;
        Ok(this)
    }

    fn from_owned(fd: OwnedFd) -> Self {
        Iommufd {
            inner: Arc::new(Inner {
                fd,
                bound: Mutex::new(Vec::new()),
                caps: OnceLock::new(),
                pid: current_pid(),
            }),
        }
    }

    /// Converts into the underlying fd if no object of this iommufd is alive; otherwise returns `self`.
    pub fn try_into_fd(self) -> std::result::Result<OwnedFd, Self> {
        match Arc::try_unwrap(self.inner) {
            Ok(inner) => Ok(inner.fd),
            Err(inner) => Err(Iommufd { inner }),
        }
    }

    /// True if `self` and `other` are the same open iommufd.
    pub fn same(&self, other: &Iommufd) -> bool {
        Arc::ptr_eq(&self.inner, &other.inner)
    }

    /// True in the process that opened this iommufd; false in a `fork()`ed child, which shares the fd
    /// (and so every kernel object) with its parent. Handles do nothing in such a child: `Drop` is a
    /// no-op and explicit calls that change kernel state fail with [`Error::ForeignProcess`].
    pub fn in_owner_process(&self) -> bool {
        self.inner.pid == current_pid()
    }

    /// Refuses `op` in a process other than the one that opened this iommufd.
    pub(crate) fn check_process(&self, op: &'static str) -> Result<()> {
        if self.in_owner_process() {
            Ok(())
        } else {
            Err(Error::ForeignProcess { op, owner: self.inner.pid })
        }
    }

    pub(crate) fn check_same(&self, other: &Iommufd, op: &'static str) -> Result<()> {
        if self.same(other) { Ok(()) } else { Err(Error::ForeignObject { op }) }
    }

    /// Allocates a new, empty I/O address space.
    pub fn alloc_ioas(&self) -> Result<Ioas> {
        Ioas::alloc(self)
    }

    fn option(&self, option_id: u32, op: u16, object_id: u32, val64: u64) -> Result<u64> {
        let mut arg = sys::iommu_option::new();
        arg.option_id = option_id;
        arg.op = op;
        arg.object_id = object_id;
        arg.val64 = val64;
        self.check_process(ioctl::OPTION.name)?;
        // SAFETY: `iommu_option` is IOMMU_OPTION's argument, sized by `new()`; it holds no pointers.
        unsafe { ioctl::call(self.as_fd(), &ioctl::OPTION, &mut arg) }?;
        Ok(arg.val64)
    }

    pub(crate) fn get_option(&self, option_id: u32, object_id: u32) -> Result<u64> {
        self.option(option_id, sys::IOMMU_OPTION_OP_GET as u16, object_id, 0)
    }

    pub(crate) fn set_option(&self, option_id: u32, object_id: u32, value: u64) -> Result<()> {
        self.option(option_id, sys::IOMMU_OPTION_OP_SET as u16, object_id, value).map(drop)
    }

    /// How this iommufd charges pinned pages against `RLIMIT_MEMLOCK`.
    pub fn rlimit_mode(&self) -> Result<RlimitMode> {
        match self.get_option(sys::IOMMU_OPTION_RLIMIT_MODE, 0)? {
            0 => Ok(RlimitMode::PerUser),
            1 => Ok(RlimitMode::PerProcess),
            v => Err(Error::Protocol { op: "IOMMU_OPTION", detail: format!("unknown rlimit mode {v}") }),
        }
    }

    /// Sets the rlimit accounting mode. Needs `CAP_SYS_RESOURCE` (`EPERM` otherwise), and only works
    /// while this iommufd holds no object at all (`EBUSY` otherwise): set it right after opening.
    pub fn set_rlimit_mode(&self, mode: RlimitMode) -> Result<()> {
        let v = match mode {
            RlimitMode::PerUser => 0,
            RlimitMode::PerProcess => 1,
        };
        self.set_option(sys::IOMMU_OPTION_RLIMIT_MODE, 0, v)
    }

    /// Destroys the kernel object `id` directly.
    ///
    /// This is a diagnostic escape hatch: the typed handles destroy their own objects. A destroy of an
    /// id that no longer exists gives `ENOENT`, which is how tests prove nothing leaked.
    ///
    /// # Safety
    ///
    /// No live handle of this crate may own `id`: destroying an IOAS behind a [`Mapping`](crate::Mapping)
    /// guard, for example, would make the guard's later unmap fail (it then leaks its memory rather
    /// than freeing it) and would let a new object reuse the id under the guard.
    pub unsafe fn destroy_raw(&self, id: u32) -> Result<()> {
        ioctl::destroy(self.as_fd(), id)
    }

    /// What the running kernel supports ([`probe`](Self::probe)), probed on first use and cached.
    ///
    /// Code that sends newer structure fields or flags checks here first, so that one binary runs on
    /// every kernel from 6.6 on and a missing feature is reported as [`Error::Unsupported`] rather than
    /// as whatever the older kernel answers for the unknown input.
    pub fn capabilities(&self) -> Result<&Capabilities> {
        if let Some(caps) = self.inner.caps.get() {
            return Ok(caps);
        }
        let caps = self.probe()?;
        // A concurrent first call may have won the race with an identical answer; either is fine.
        Ok(self.inner.caps.get_or_init(|| caps))
    }

    /// Moves the pinned-page accounting and the source `mm` of every mapping in this iommufd to the
    /// calling process (`IOMMU_IOAS_CHANGE_PROCESS`, Linux 6.13).
    ///
    /// For handing a running device over to another process (userland live update): the new process
    /// receives the iommufd (and device) fds, then calls this, so that pinned pages are charged to it
    /// and the old process can exit. It applies to the whole iommufd, every IOAS at once; calling it
    /// from the process that already owns everything changes nothing and succeeds.
    ///
    /// Only mappings made from files ([`Ioas::map_file`](crate::Ioas::map_file)) can move: their pages
    /// belong to the file, not to the old process's address space. If any other mapping exists
    /// ([`Ioas::map`](crate::Ioas::map) of a [`DmaBuffer`](crate::DmaBuffer), or
    /// [`Ioas::map_user`](crate::Ioas::map_user)), the kernel refuses with `EINVAL`; `EBUSY` if a
    /// mapping is still being set up; `ENOMEM` if the new process's `RLIMIT_MEMLOCK` cannot cover the
    /// pages. On failure nothing changes.
    ///
    /// Pages pinned by a process with `CAP_IPC_LOCK` (root, typically) were never charged: for those
    /// only the recorded process and `mm` move. The others keep the accounting chosen when they were
    /// pinned, so they are charged to the new process even if it has `CAP_IPC_LOCK`.
    pub fn change_process(&self) -> Result<()> {
        let mut arg = sys::iommu_ioas_change_process::new();
        // SAFETY: IOMMU_IOAS_CHANGE_PROCESS takes `iommu_ioas_change_process`, sized by `new()`, with no
        // pointers; the kernel changes accounting only and touches no memory of this process.
        match unsafe { ioctl::call(self.as_fd(), &ioctl::IOAS_CHANGE_PROCESS, &mut arg) } {
            Ok(_) => Ok(()),
            Err(Error::Ioctl { op, errno: errno @ (Errno::INVAL | Errno::BUSY), .. }) => Err(Error::Ioctl {
                op,
                errno,
                hint: Some(if errno == Errno::INVAL {
                    "a mapping not made from a file exists (only map_file mappings can change process)"
                } else {
                    "a mapping is being set up concurrently"
                }),
            }),
            Err(e) => Err(e),
        }
    }

    pub(crate) fn register_bound(&self, name: &str) {
        self.inner.bound.lock().unwrap_or_else(|e| e.into_inner()).push(name.to_string());
    }

    pub(crate) fn unregister_bound(&self, name: &str) {
        let mut bound = self.inner.bound.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(i) = bound.iter().position(|n| n == name) {
            bound.swap_remove(i);
        }
    }

    /// sysfs names (PCI addresses, `0000:00:03.0`) of the devices currently bound to this iommufd
    /// through this crate.
    pub fn bound_device_names(&self) -> Vec<String> {
        self.inner.bound.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

impl AsFd for Iommufd {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.inner.fd.as_fd()
    }
}

impl AsRawFd for Iommufd {
    fn as_raw_fd(&self) -> RawFd {
        self.inner.fd.as_raw_fd()
    }
}

impl FromRawFd for Iommufd {
    /// Adopts `fd` without checking it; prefer [`Iommufd::from_fd`], which checks.
    ///
    /// # Safety
    ///
    /// `fd` must be an open iommufd owned by the caller, whose ownership moves to the new value.
    unsafe fn from_raw_fd(fd: RawFd) -> Self {
        // SAFETY: the caller transfers ownership of the open fd `fd` (this function's contract).
        Self::from_owned(unsafe { OwnedFd::from_raw_fd(fd) })
    }
}

impl TryFrom<Iommufd> for OwnedFd {
    type Error = Iommufd;

    /// The fd, if no object of this iommufd is alive (see [`Iommufd::try_into_fd`]). The conversion is
    /// fallible because live objects share the fd: handing it out would let it be closed under them.
    fn try_from(value: Iommufd) -> std::result::Result<Self, Self::Error> {
        value.try_into_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_that_are_not_an_iommufd_are_refused_before_any_ioctl() {
        let file = std::env::temp_dir().join(format!("iommufd-not-an-iommufd-{}", std::process::id()));
        std::fs::write(&file, b"").unwrap();
        for path in [Path::new("/dev/null"), Path::new("/dev/zero"), &file] {
            let e = Iommufd::open_path(path).unwrap_err();
            assert!(matches!(e, Error::WrongFile { op: "Iommufd::open_path", .. }), "{path:?}: {e}");
            assert!(e.to_string().contains("not an iommufd"), "{e}");
        }
        std::fs::remove_file(&file).unwrap();
        let null = std::fs::OpenOptions::new().read(true).write(true).open("/dev/null").unwrap();
        let e = Iommufd::from_fd(null.into()).unwrap_err();
        assert!(
            e.to_string().starts_with("Iommufd::from_fd: not an iommufd: the file is character device 1:3"),
            "{e}"
        );
        assert!(!e.is_unsupported(), "a wrong file is a caller bug, not a missing kernel feature");
    }
}
