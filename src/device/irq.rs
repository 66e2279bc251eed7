//! Interrupt updates as a VMM makes them: one MSI/MSI-X vector at a time, and the INTx unmask
//! (resample) eventfd for level-triggered interrupts. With the `vmm-sys-util` feature,
//! [`EventFdExt`] lends a `vmm-sys-util` `EventFd` to every API that takes an fd.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};

use iommufd_sys as sys;

use super::access::irq_set_buffer;
use super::{BoundDevice, IrqFlags};
use crate::error::{Error, Result};
use crate::ioctl;

/// The fd entry that tells `VFIO_DEVICE_SET_IRQS` to detach a vector's eventfd.
const NO_FD: RawFd = -1;

impl BoundDevice {
    /// Points vector `vector` of interrupt `index` at `eventfd` and leaves every other vector as it
    /// is (`VFIO_DEVICE_SET_IRQS`, `DATA_EVENTFD | ACTION_TRIGGER` with `start = vector`,
    /// `count = 1`): what a VMM does when the guest reprograms one MSI or MSI-X vector.
    ///
    /// A vector that had an eventfd is switched to the new one. On an index that is not enabled yet,
    /// the kernel enables it with `vector + 1` vectors (MSI fixes its vector count at that moment:
    /// enable MSI with [`set_irq_eventfds`](Self::set_irq_eventfds) over all the vectors the guest
    /// enabled; MSI-X can add vectors later where the platform allocates MSI-X vectors dynamically,
    /// since Linux 6.5). INTx and MSI/MSI-X exclude each other: while one is
    /// enabled, the kernel refuses the other with `EINVAL`.
    pub fn set_irq_vector(&self, index: u32, vector: u32, eventfd: impl AsFd) -> Result<()> {
        self.set_irq_vectors(index, vector, &[Some(eventfd.as_fd())])
    }

    /// Detaches the eventfd of vector `vector` of interrupt `index` and leaves every other vector as
    /// it is (the kernel's `-1` entry). The index stays enabled: the vector can be given an eventfd
    /// again with [`set_irq_vector`](Self::set_irq_vector), and [`disable_irqs`](Self::disable_irqs)
    /// disables the whole index. On an index that is not enabled, the kernel enables it, with this
    /// vector detached.
    pub fn clear_irq_vector(&self, index: u32, vector: u32) -> Result<()> {
        self.set_irq_vectors(index, vector, &[None])
    }

    /// Updates vectors `start..start + eventfds.len()` of interrupt `index`: `Some(fd)` signals the
    /// vector through `fd`, `None` detaches its eventfd (the kernel's `-1` entry). Vectors outside the
    /// range are left as they are. An empty slice is refused ([`Error::InvalidArgument`]).
    pub fn set_irq_vectors(&self, index: u32, start: u32, eventfds: &[Option<BorrowedFd<'_>>]) -> Result<()> {
        const OP: &str = "BoundDevice::set_irq_vectors";
        let raw: Vec<RawFd> = eventfds.iter().map(|f| f.map_or(NO_FD, |f| f.as_raw_fd())).collect();
        self.set_irq_fds(OP, sys::VFIO_IRQ_SET_ACTION_TRIGGER, index, start, &raw)
    }

    /// Gives the kernel an unmask eventfd for vector `subindex` of interrupt `index`
    /// (`VFIO_DEVICE_SET_IRQS`, `DATA_EVENTFD | ACTION_UNMASK`): each signal of `eventfd` unmasks the
    /// interrupt, as [`unmask_irq`](Self::unmask_irq) does, without a system call from the VMM.
    ///
    /// This is how VMMs run level-triggered INTx ([`PciIrq::Intx`](crate::PciIrq), the one index
    /// vfio-pci implements it for; `subindex` 0): vfio-pci masks INTx when it fires
    /// ([`IrqFlags::AUTOMASKED`](crate::IrqFlags)) and signals the trigger eventfd; the guest services
    /// the device and ends the interrupt, and that end signals the unmask eventfd (with KVM, the
    /// resample eventfd of a `KVM_IRQFD_FLAG_RESAMPLE` irqfd). If the device still asserts the line
    /// when it is unmasked, the kernel signals the trigger eventfd again.
    ///
    /// Set the trigger eventfd first ([`set_irq_eventfds`](Self::set_irq_eventfds)): without INTx
    /// enabled the kernel refuses with `EINVAL`. Disabling INTx drops the unmask eventfd too. An index
    /// the device does not report [`IrqFlags::MASKABLE`] is refused before the ioctl
    /// ([`Error::NotCapable`]).
    pub fn set_irq_unmask_eventfd(&self, index: u32, subindex: u32, eventfd: impl AsFd) -> Result<()> {
        const OP: &str = "BoundDevice::set_irq_unmask_eventfd";
        self.check_maskable(OP, index)?;
        let raw = [eventfd.as_fd().as_raw_fd()];
        self.set_irq_fds(OP, sys::VFIO_IRQ_SET_ACTION_UNMASK, index, subindex, &raw)
    }

    /// Removes the unmask eventfd of vector `subindex` of interrupt `index` (the kernel's `-1`
    /// entry); the interrupt stays enabled and is unmasked from then on only by
    /// [`unmask_irq`](Self::unmask_irq).
    pub fn clear_irq_unmask_eventfd(&self, index: u32, subindex: u32) -> Result<()> {
        const OP: &str = "BoundDevice::clear_irq_unmask_eventfd";
        self.check_maskable(OP, index)?;
        self.set_irq_fds(OP, sys::VFIO_IRQ_SET_ACTION_UNMASK, index, subindex, &[NO_FD])
    }

    /// Refuses an index the device cannot mask (vfio-pci masks only INTx), which the kernel would
    /// answer with `ENOTTY`, as if `VFIO_DEVICE_SET_IRQS` itself were missing.
    fn check_maskable(&self, op: &'static str, index: u32) -> Result<()> {
        let info = self.irq_info(index)?;
        if !info.flags.contains(IrqFlags::MASKABLE) {
            return Err(Error::NotCapable {
                op,
                reason: format!("interrupt index {index} cannot be masked ({:?})", info.flags),
            });
        }
        Ok(())
    }

    /// `VFIO_DEVICE_SET_IRQS` with `DATA_EVENTFD | action` over `start..start + fds.len()`; the fds
    /// are borrowed open (or `-1`) by the callers for the call.
    pub(super) fn set_irq_fds(
        &self,
        op: &'static str,
        action: u32,
        index: u32,
        start: u32,
        fds: &[RawFd],
    ) -> Result<()> {
        self.check_process(op)?;
        if fds.is_empty() {
            return Err(Error::invalid(op, "no vectors given"));
        }
        let count = u32::try_from(fds.len())
            .map_err(|_| Error::invalid(op, format!("{} vectors is too many", fds.len())))?;
        let mut buf = irq_set_buffer(op, sys::VFIO_IRQ_SET_DATA_EVENTFD | action, index, start, count, fds)?;
        // SAFETY: `buf` is a `vfio_irq_set` header followed by `count` i32 entries, with `argsz` equal to
        // its byte length (built by `irq_set_buffer`), 4-byte aligned like the structure. It holds no
        // pointers; each entry is -1 or an fd the caller borrows open for the duration of the call.
        unsafe { ioctl::call_buf(self.as_fd(), &ioctl::DEVICE_SET_IRQS, &mut buf) }.map(drop)
    }
}

#[cfg(feature = "vmm-sys-util")]
mod eventfd {
    use std::os::fd::{AsRawFd, BorrowedFd};

    use vmm_sys_util::eventfd::EventFd;

    mod sealed {
        pub trait Sealed {}
        impl Sealed for vmm_sys_util::eventfd::EventFd {}
    }

    /// Lends a `vmm-sys-util` [`EventFd`] (which implements `AsRawFd` only) to the APIs of this crate
    /// that take `impl AsFd`, with no `unsafe` in the caller:
    ///
    /// ```no_run
    /// use iommufd::{EventFdExt, PciIrq};
    /// use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};
    ///
    /// # fn f(device: &iommufd::BoundDevice) -> Result<(), Box<dyn std::error::Error>> {
    /// let msi = [EventFd::new(EFD_NONBLOCK)?, EventFd::new(EFD_NONBLOCK)?];
    /// device.set_irq_eventfds(PciIrq::Msi.index(), 0, &[msi[0].borrow_fd(), msi[1].borrow_fd()])?;
    /// // The guest reprogrammed vector 1:
    /// let moved = EventFd::new(EFD_NONBLOCK)?;
    /// device.set_irq_vector(PciIrq::Msi.index(), 1, moved.borrow_fd())?;
    /// # Ok(()) }
    /// ```
    #[cfg_attr(docsrs, doc(cfg(feature = "vmm-sys-util")))]
    pub trait EventFdExt: sealed::Sealed {
        /// The eventfd's fd, borrowed for as long as the `EventFd`.
        fn borrow_fd(&self) -> BorrowedFd<'_>;
    }

    impl EventFdExt for EventFd {
        fn borrow_fd(&self) -> BorrowedFd<'_> {
            // SAFETY: an `EventFd` owns its fd (a `File` inside it) from creation until it is dropped or
            // consumed by `into_raw_fd`; the returned borrow is tied to `&self`, so the fd stays open
            // for as long as the borrow lives.
            unsafe { BorrowedFd::borrow_raw(self.as_raw_fd()) }
        }
    }
}

#[cfg(feature = "vmm-sys-util")]
pub use eventfd::EventFdExt;

#[cfg(test)]
mod tests {
    use std::mem::offset_of;

    use super::*;

    #[test]
    fn detached_vectors_are_minus_one_entries_in_place() {
        let flags = sys::VFIO_IRQ_SET_DATA_EVENTFD | sys::VFIO_IRQ_SET_ACTION_TRIGGER;
        let buf = irq_set_buffer("t", flags, 2, 5, 3, &[7, NO_FD, 9]).unwrap();
        let data = offset_of!(sys::vfio_irq_set, data) / 4;
        assert_eq!(buf[offset_of!(sys::vfio_irq_set, start) / 4], 5);
        assert_eq!(buf[offset_of!(sys::vfio_irq_set, count) / 4], 3);
        assert_eq!(&buf[data..], &[7, u32::MAX, 9], "-1 is 0xffffffff, in the vector's own slot");
    }

    #[cfg(feature = "vmm-sys-util")]
    #[test]
    fn an_eventfd_lends_its_own_fd() {
        use vmm_sys_util::eventfd::EventFd;
        let efd = EventFd::new(0).unwrap();
        let fd = efd.borrow_fd();
        assert_eq!(fd.as_raw_fd(), efd.as_raw_fd());
        // The borrow reaches the same eventfd: a write through it is read back through the EventFd.
        rustix::io::write(fd, &3u64.to_ne_bytes()).unwrap();
        assert_eq!(efd.read().unwrap(), 3);
    }
}
