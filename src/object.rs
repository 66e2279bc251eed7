//! A kernel object owned by a handle: destroyed exactly once, explicitly or on drop.

use std::fmt;

use crate::error::Result;
use crate::ioctl;
use crate::iommufd::Iommufd;
use std::os::fd::AsFd;

/// An iommufd object id with its owning iommufd. Destroys the object on drop (best effort, logged).
pub(crate) struct Object {
    iommufd: Iommufd,
    id: u32,
    kind: &'static str,
    live: bool,
}

impl Object {
    pub(crate) fn new(iommufd: &Iommufd, id: u32, kind: &'static str) -> Self {
        Object { iommufd: iommufd.clone(), id, kind, live: true }
    }

    pub(crate) fn id(&self) -> u32 {
        self.id
    }

    pub(crate) fn iommufd(&self) -> &Iommufd {
        &self.iommufd
    }

    /// Destroys the object now, reporting failure. On failure the object stays live: its owner can
    /// try again, and dropping it tries again (and logs), so a refused destroy never leaks the kernel
    /// object silently.
    pub(crate) fn try_destroy(&mut self) -> Result<()> {
        if !self.live {
            return Ok(());
        }
        self.iommufd.check_process("IOMMU_DESTROY")?;
        ioctl::destroy(self.iommufd.as_fd(), self.id)?;
        self.live = false;
        Ok(())
    }

    /// [`try_destroy`](Self::try_destroy) for an owner that gives its handle up either way. On
    /// failure the caller has the error and keeps alive (leaks) what the kernel object still holds,
    /// so the object is not tried again on drop: a later success there would release it under
    /// dependencies the caller already gave up. It lives until the iommufd is closed.
    pub(crate) fn destroy(mut self) -> Result<()> {
        let r = self.try_destroy();
        self.live = false;
        r
    }
}

impl Drop for Object {
    fn drop(&mut self) {
        // In a fork()ed child the id is the parent's object: leave it alone.
        if !self.live || !self.iommufd.in_owner_process() {
            return;
        }
        if let Err(e) = ioctl::destroy(self.iommufd.as_fd(), self.id) {
            log::error!("iommufd: failed to destroy {} {} on drop: {e}", self.kind, self.id);
        }
    }
}

impl fmt::Debug for Object {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.kind, self.id)
    }
}
