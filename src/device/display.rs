//! Mediated display planes (`VFIO_DEVICE_QUERY_GFX_PLANE`, `VFIO_DEVICE_GET_GFX_DMABUF`, Linux 4.16).
//!
//! The display ioctls are implemented by mediated display drivers (a vGPU's framebuffer exported as
//! a dma-buf or a region, such as the kernel's `mbochs` sample); vfio-pci answers `ENOTTY`. A VMM
//! polls [`BoundDevice::query_gfx_plane`] for the guest's current plane and, for a dma-buf plane,
//! imports [`BoundDevice::gfx_dmabuf`] into its renderer.

use std::os::fd::{AsFd, FromRawFd, OwnedFd};

use iommufd_sys as sys;

use super::BoundDevice;
use crate::error::{Error, Result};
use crate::ioctl::{self, Sized32};

/// Which kind of plane a query asks about (`VFIO_GFX_PLANE_TYPE_*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GfxPlaneKind {
    /// A plane exported as a dma-buf ([`BoundDevice::gfx_dmabuf`]).
    DmaBuf,
    /// A plane in a device region.
    Region,
}

impl GfxPlaneKind {
    fn flag(self) -> u32 {
        match self {
            GfxPlaneKind::DmaBuf => sys::VFIO_GFX_PLANE_TYPE_DMABUF,
            GfxPlaneKind::Region => sys::VFIO_GFX_PLANE_TYPE_REGION,
        }
    }
}

/// A display plane as the driver describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GfxPlane {
    /// DRM plane type ([`GfxPlane::PRIMARY`], [`GfxPlane::CURSOR`]).
    pub drm_plane_type: u32,
    /// DRM fourcc format.
    pub drm_format: u32,
    /// DRM format modifier.
    pub drm_format_mod: u64,
    /// Width in pixels.
    pub width: u32,
    /// Height in pixels.
    pub height: u32,
    /// Bytes per line.
    pub stride: u32,
    /// Size in bytes.
    pub size: u32,
    /// Position (cursor planes).
    pub position: (u32, u32),
    /// Cursor hotspot.
    pub hotspot: (u32, u32),
    /// The dma-buf id ([`GfxPlaneKind::DmaBuf`]) or the region index ([`GfxPlaneKind::Region`]).
    pub id: u32,
}

impl GfxPlane {
    /// `DRM_PLANE_TYPE_OVERLAY`.
    pub const OVERLAY: u32 = 0;
    /// `DRM_PLANE_TYPE_PRIMARY`: the framebuffer.
    pub const PRIMARY: u32 = 1;
    /// `DRM_PLANE_TYPE_CURSOR`.
    pub const CURSOR: u32 = 2;
}

fn gfx_query(
    device: &BoundDevice,
    flags: u32,
    drm_plane_type: u32,
) -> Result<sys::vfio_device_gfx_plane_info> {
    let mut arg = sys::vfio_device_gfx_plane_info::new();
    arg.flags = flags;
    arg.drm_plane_type = drm_plane_type;
    // SAFETY: VFIO_DEVICE_QUERY_GFX_PLANE on a device cdev takes `vfio_device_gfx_plane_info`, sized by
    // `new()`, with no pointers; the driver writes the plane description back through the borrow.
    unsafe { ioctl::call(device.as_fd(), &ioctl::DEVICE_QUERY_GFX_PLANE, &mut arg) }?;
    Ok(arg)
}

impl BoundDevice {
    /// Asks whether the device exposes display planes of `kind` (`VFIO_GFX_PLANE_TYPE_PROBE`).
    /// vfio-pci devices answer `ENOTTY`: only mediated display drivers implement it.
    pub fn gfx_plane_supported(&self, kind: GfxPlaneKind) -> Result<bool> {
        match gfx_query(self, sys::VFIO_GFX_PLANE_TYPE_PROBE | kind.flag(), 0) {
            Ok(_) => Ok(true),
            Err(e) if e.errno() == Some(crate::Errno::INVAL) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Describes the current plane `drm_plane_type` ([`GfxPlane::PRIMARY`], ...) of `kind`
    /// (`VFIO_DEVICE_QUERY_GFX_PLANE`); `None` while the guest shows nothing on it (the driver
    /// answers with a zero format and size, for example before the guest sets a display mode).
    pub fn query_gfx_plane(&self, kind: GfxPlaneKind, drm_plane_type: u32) -> Result<Option<GfxPlane>> {
        let a = gfx_query(self, kind.flag(), drm_plane_type)?;
        if a.drm_format == 0 && a.size == 0 {
            return Ok(None);
        }
        // SAFETY: both members of the union are u32; the driver wrote the one `kind` selects.
        let id = unsafe { a.__bindgen_anon_1.dmabuf_id };
        Ok(Some(GfxPlane {
            drm_plane_type: a.drm_plane_type,
            drm_format: a.drm_format,
            drm_format_mod: a.drm_format_mod,
            width: a.width,
            height: a.height,
            stride: a.stride,
            size: a.size,
            position: (a.x_pos, a.y_pos),
            hotspot: (a.x_hot, a.y_hot),
            id,
        }))
    }

    /// Exports the plane with dma-buf id `dmabuf_id` (from [`query_gfx_plane`](Self::query_gfx_plane))
    /// as a dma-buf fd (`VFIO_DEVICE_GET_GFX_DMABUF`). The fd is made close-on-exec (drivers may
    /// install it without the flag).
    pub fn gfx_dmabuf(&self, dmabuf_id: u32) -> Result<OwnedFd> {
        self.check_process("VFIO_DEVICE_GET_GFX_DMABUF")?;
        let mut id = dmabuf_id;
        // SAFETY: VFIO_DEVICE_GET_GFX_DMABUF takes a pointer to a u32 plane id, which `id` is (readable
        // for the call); the kernel returns a new fd as the ioctl's result.
        let fd = unsafe { ioctl::call(self.as_fd(), &ioctl::DEVICE_GET_GFX_DMABUF, &mut id) }?;
        // SAFETY: a successful GET_GFX_DMABUF returns a newly installed fd that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        rustix::io::fcntl_setfd(&fd, rustix::io::FdFlags::CLOEXEC)
            .map_err(|e| Error::os("fcntl(F_SETFD) on a display dma-buf", e))?;
        Ok(fd)
    }
}
