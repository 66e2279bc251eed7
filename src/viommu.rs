//! Virtual IOMMUs: [`Viommu`] (`IOMMU_VIOMMU_ALLOC`, Linux 6.13) and what hangs off one:
//! [`Vdevice`] (`IOMMU_VDEVICE_ALLOC`, 6.13), [`Veventq`] (`IOMMU_VEVENTQ_ALLOC`, 6.15) and
//! [`HwQueue`] (`IOMMU_HW_QUEUE_ALLOC`, 6.17).
//!
//! A vIOMMU is the slice of a physical IOMMU given to one VM: it wraps a nest-parent (stage-2)
//! [`Hwpt`], and nested page tables, virtual devices, event queues and hardware queues are allocated
//! on it. The kernel's teardown order is encoded in the handles:
//!
//! ```text
//! Ioas <- Hwpt (NEST_PARENT) <- Viommu <- Vdevice | Veventq | HwQueue (<- HwQueue of the next index)
//!                                      <- nested Hwpt (Hwpt::alloc_nested on the vIOMMU)
//! ```
//!
//! Each child holds its parent's `Arc`, so a vEVENTQ, vDEVICE or HW queue is destroyed before its
//! vIOMMU, which is destroyed before its nest parent. Every handle also has an explicit, fallible
//! `destroy`/`close` refused with [`Error::InUse`] while children still hold it; `Drop` does the same
//! best-effort and logs failures.

use std::any::Any;
use std::collections::HashMap;
use std::mem::size_of;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use iommufd_sys as sys;
use rustix::io::Errno;

use crate::device::IommuDevice;
use crate::dma::Memory;
use crate::error::{Error, Result};
use crate::fault::{deadline, poll_readable};
use crate::hwpt::{Hwpt, HwptFlags, HwptInner, HwptKind, NestParent, ObjRef, sealed};
use crate::ioas::Mapping;
use crate::ioctl::{self, Sized32};
use crate::iommufd::Iommufd;
use crate::nested::{InvalidateEntries, InvalidateError, invalidate_object};
use crate::object::Object;

const VIOMMU_ALLOC: &str = "IOMMU_VIOMMU_ALLOC";
const VDEVICE_ALLOC: &str = "IOMMU_VDEVICE_ALLOC";
const VEVENTQ_ALLOC: &str = "IOMMU_VEVENTQ_ALLOC";
const HW_QUEUE_ALLOC: &str = "IOMMU_HW_QUEUE_ALLOC";

/// The kind of a virtual IOMMU (`enum iommu_viommu_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ViommuType {
    /// `IOMMU_VIOMMU_TYPE_DEFAULT`: reserved by the kernel, which refuses it with `EOPNOTSUPP`.
    Default,
    /// ARM SMMUv3 (`IOMMU_VIOMMU_TYPE_ARM_SMMUV3`).
    ArmSmmuv3,
    /// ARM SMMUv3 with NVIDIA Tegra241 CMDQV (`IOMMU_VIOMMU_TYPE_TEGRA241_CMDQV`).
    Tegra241Cmdqv,
    /// Any other value, for example the mock IOMMU's `IOMMU_VIOMMU_TYPE_SELFTEST`.
    Raw(u32),
}

impl ViommuType {
    /// The kernel's value.
    pub fn raw(self) -> u32 {
        match self {
            ViommuType::Default => sys::IOMMU_VIOMMU_TYPE_DEFAULT,
            ViommuType::ArmSmmuv3 => sys::IOMMU_VIOMMU_TYPE_ARM_SMMUV3,
            ViommuType::Tegra241Cmdqv => sys::IOMMU_VIOMMU_TYPE_TEGRA241_CMDQV,
            ViommuType::Raw(v) => v,
        }
    }

    /// The variant for a kernel value (named variants for the values this crate knows).
    pub fn from_raw(v: u32) -> ViommuType {
        match v {
            sys::IOMMU_VIOMMU_TYPE_DEFAULT => ViommuType::Default,
            sys::IOMMU_VIOMMU_TYPE_ARM_SMMUV3 => ViommuType::ArmSmmuv3,
            sys::IOMMU_VIOMMU_TYPE_TEGRA241_CMDQV => ViommuType::Tegra241Cmdqv,
            v => ViommuType::Raw(v),
        }
    }
}

/// HW queues of one vIOMMU by (type, index), so a queue can hold the one of the index below it.
type QueueRegistry = HashMap<(u32, u32), Weak<HwQueueInner>>;

pub(crate) struct ViommuInner {
    /// Declared first so it is dropped first: the vIOMMU is destroyed before its nest parent is
    /// released.
    pub(crate) obj: Object,
    nest_parent: Arc<HwptInner>,
    kind: ViommuType,
    hw_queues: Mutex<QueueRegistry>,
}

/// A virtual IOMMU (`IOMMU_VIOMMU_ALLOC`, Linux 6.13): a VM's slice of a physical IOMMU, wrapping a
/// nest-parent [`Hwpt`].
///
/// It is the parent of nested page tables ([`Hwpt::alloc_nested`] accepts it as a [`NestParent`]),
/// of virtual devices ([`Vdevice`]), event queues ([`Veventq`]) and hardware queues ([`HwQueue`]).
/// It keeps its nest parent alive; its children keep it alive. Cloning shares the kernel object.
#[derive(Clone)]
pub struct Viommu {
    pub(crate) inner: Arc<ViommuInner>,
}

impl std::fmt::Debug for Viommu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Viommu")
            .field("id", &self.id())
            .field("kind", &self.kind())
            .field("nest_parent", &self.inner.nest_parent.obj.id())
            .finish()
    }
}

/// The operation that names `IOMMU_VIOMMU_ALLOC`'s newer data fields in its errors.
const VIOMMU_ALLOC_DATA: &str = "IOMMU_VIOMMU_ALLOC (data_len/data_uptr)";

fn user_len(op: &'static str, what: &str, len: usize) -> Result<u32> {
    u32::try_from(len).map_err(|_| Error::invalid(op, format!("{what} of {len} bytes exceeds u32::MAX")))
}

impl Viommu {
    /// Allocates a virtual IOMMU of `kind` on the physical IOMMU behind `device`, wrapping
    /// `nest_parent` (`IOMMU_VIOMMU_ALLOC`, Linux 6.13).
    ///
    /// `nest_parent` must be a paging HWPT allocated with [`HwptFlags::NEST_PARENT`]; anything else is
    /// rejected before the ioctl (the kernel would answer `EINVAL`). `data` is the driver-specific
    /// structure for `kind` (for example `struct iommu_viommu_tegra241_cmdqv`), read and written back
    /// by the kernel in place (Linux 6.17; an older kernel gives [`Error::Unsupported`], checked before
    /// the ioctl). A `kind` the IOMMU driver does not implement, and [`ViommuType::Default`], give
    /// `EOPNOTSUPP` ([`Error::is_unsupported`]).
    pub fn alloc(
        device: &impl IommuDevice,
        nest_parent: &Hwpt,
        kind: ViommuType,
        data: Option<&mut [u8]>,
    ) -> Result<Viommu> {
        let iommufd = device.iommufd();
        iommufd.check_same(nest_parent.iommufd(), VIOMMU_ALLOC)?;
        if nest_parent.kind() != HwptKind::Paging || !nest_parent.flags().contains(HwptFlags::NEST_PARENT) {
            return Err(Error::invalid(
                VIOMMU_ALLOC,
                format!(
                    "HWPT {} is not a paging HWPT allocated with HwptFlags::NEST_PARENT",
                    nest_parent.id()
                ),
            ));
        }
        if data.is_some() {
            let caps = iommufd.capabilities()?;
            // Where the ioctl exists without the data fields (6.13 to 6.16), the kernel refuses their
            // non-zero bytes with E2BIG; where it does not exist at all, the ioctl says so below.
            let known = caps.viommu_alloc_data || !caps.supports(crate::probe::Ioctl::ViommuAlloc);
            caps.require_field(known, VIOMMU_ALLOC_DATA, "6.17", crate::Errno::TOOBIG)?;
        }
        let mut arg = sys::iommu_viommu_alloc::new();
        arg.type_ = kind.raw();
        arg.dev_id = device.dev_id();
        arg.hwpt_id = nest_parent.id();
        if let Some(data) = data {
            arg.data_len = user_len(VIOMMU_ALLOC, "driver data", data.len())?;
            arg.data_uptr = data.as_mut_ptr() as u64;
        }
        iommufd.check_process(ioctl::VIOMMU_ALLOC.name)?;
        // SAFETY: IOMMU_VIOMMU_ALLOC takes `iommu_viommu_alloc`, sized by `new()`. Its one user
        // pointer, `data_uptr`, is null with `data_len` 0 or points at the `data_len` bytes of `data`,
        // a slice exclusively borrowed for the whole call, which the kernel reads and writes (at most
        // `data_len` bytes).
        unsafe { ioctl::call(iommufd.as_fd(), &ioctl::VIOMMU_ALLOC, &mut arg) }?;
        Ok(Viommu {
            inner: Arc::new(ViommuInner {
                obj: Object::new(iommufd, arg.out_viommu_id, "vIOMMU"),
                nest_parent: nest_parent.inner.clone(),
                kind,
                hw_queues: Mutex::new(HashMap::new()),
            }),
        })
    }

    /// The kernel's id for the vIOMMU (a `pt_id` for nested HWPTs, an `hwpt_id` for invalidation).
    pub fn id(&self) -> u32 {
        self.inner.obj.id()
    }

    /// The kind it was allocated as.
    pub fn kind(&self) -> ViommuType {
        self.inner.kind
    }

    /// The nest-parent HWPT it wraps.
    pub fn nest_parent(&self) -> Hwpt {
        Hwpt { inner: self.inner.nest_parent.clone() }
    }

    /// The iommufd it belongs to.
    pub fn iommufd(&self) -> &Iommufd {
        self.inner.obj.iommufd()
    }

    /// Invalidates caches the vIOMMU owns on behalf of the guest: device caches (ATC), context
    /// descriptor caches and the TLB entries of its nested tables, from commands the guest queued
    /// (`IOMMU_HWPT_INVALIDATE` on a vIOMMU id, Linux 6.13). Returns how many entries the kernel
    /// handled: all of them.
    ///
    /// Entries are typically [`InvalidateEntries::ArmSmmuv3`]; the semantics are those of
    /// [`Hwpt::invalidate`]: the kernel stops at the first entry it refuses, and the
    /// [`InvalidateError`] says how many took effect before it. An empty list
    /// ([`InvalidateEntries::probe`]) asks whether the vIOMMU supports the data type.
    pub fn invalidate(&self, entries: &InvalidateEntries<'_>) -> Result<u32, InvalidateError> {
        invalidate_object(self.iommufd(), self.id(), entries)
    }

    /// Destroys the vIOMMU now, reporting failure; refused with [`Error::InUse`] while clones or
    /// children (vDEVICEs, vEVENTQs, HW queues, nested HWPTs) still hold it. The nest parent is
    /// released only after the kernel destroyed the vIOMMU.
    pub fn destroy(self) -> Result<()> {
        match Arc::try_unwrap(self.inner) {
            Ok(ViommuInner { obj, nest_parent, .. }) => {
                let r = obj.destroy();
                if r.is_err() {
                    // The kernel still holds the nest parent: keep its handle rather than have it
                    // fail (and log) its own destroy.
                    std::mem::forget(nest_parent);
                }
                r
            }
            Err(inner) => Err(Error::InUse { op: "IOMMU_DESTROY", users: Arc::strong_count(&inner) - 1 }),
        }
    }
}

impl sealed::Sealed for Viommu {}
impl NestParent for Viommu {
    fn nest_parent_id(&self) -> u32 {
        self.id()
    }

    fn nest_parent_ref(&self) -> Result<ObjRef> {
        Ok(ObjRef::new(self.iommufd(), self.id(), self.inner.clone()))
    }
}

/// A virtual device (`IOMMU_VDEVICE_ALLOC`, Linux 6.13): a physical device as the VM sees it behind
/// a vIOMMU, identified by its virtual id there (the vSID of an ARM SMMUv3, the vDeviceID of an AMD
/// IOMMU, the vRID of Intel VT-d).
///
/// It keeps its vIOMMU and a clone of its device alive, so it is destroyed before both: the kernel
/// wants a vDEVICE destroyed before its physical device (closing the device first would destroy the
/// vDEVICE behind the handle and retire its id until the iommufd is closed).
pub struct Vdevice {
    // Field order is drop order: the vDEVICE first, then the vIOMMU and the device.
    obj: Object,
    viommu: Arc<ViommuInner>,
    _device: Box<dyn Any + Send + Sync>,
    dev_id: u32,
    virt_id: u64,
}

impl std::fmt::Debug for Vdevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vdevice")
            .field("id", &self.id())
            .field("viommu", &self.viommu.obj.id())
            .field("dev_id", &self.dev_id)
            .field("virt_id", &self.virt_id)
            .finish()
    }
}

impl Vdevice {
    /// Allocates the virtual instance of `device` on `viommu` with virtual id `virt_id`
    /// (`IOMMU_VDEVICE_ALLOC`, Linux 6.13). The handle keeps a clone of `device` (a
    /// [`BoundDevice`](crate::BoundDevice) or a mock device: cloning shares the device).
    ///
    /// The kernel answers `EEXIST` if the device already has a vDEVICE or `virt_id` is taken on this
    /// vIOMMU, and `EINVAL` if the device is behind another physical IOMMU than the vIOMMU.
    pub fn alloc<D>(viommu: &Viommu, device: &D, virt_id: u64) -> Result<Vdevice>
    where
        D: IommuDevice + Clone + Send + Sync + 'static,
    {
        let iommufd = viommu.iommufd();
        iommufd.check_same(device.iommufd(), VDEVICE_ALLOC)?;
        let mut arg = sys::iommu_vdevice_alloc::new();
        arg.viommu_id = viommu.id();
        arg.dev_id = device.dev_id();
        arg.virt_id = virt_id;
        iommufd.check_process(ioctl::VDEVICE_ALLOC.name)?;
        // SAFETY: IOMMU_VDEVICE_ALLOC takes `iommu_vdevice_alloc`, sized by `new()`; it holds no
        // pointers, and the kernel writes the new id back through the exclusive borrow.
        unsafe { ioctl::call(iommufd.as_fd(), &ioctl::VDEVICE_ALLOC, &mut arg) }?;
        Ok(Vdevice {
            obj: Object::new(iommufd, arg.out_vdevice_id, "vDEVICE"),
            viommu: viommu.inner.clone(),
            _device: Box::new(device.clone()),
            dev_id: device.dev_id(),
            virt_id,
        })
    }

    /// The kernel's id for the vDEVICE.
    pub fn id(&self) -> u32 {
        self.obj.id()
    }

    /// The virtual id it was allocated with.
    pub fn virt_id(&self) -> u64 {
        self.virt_id
    }

    /// The iommufd device id of the physical device.
    pub fn dev_id(&self) -> u32 {
        self.dev_id
    }

    /// The id of its vIOMMU.
    pub fn viommu_id(&self) -> u32 {
        self.viommu.obj.id()
    }

    /// Destroys the vDEVICE now, reporting failure. The vIOMMU and the device are released only
    /// after the kernel destroyed it.
    pub fn destroy(self) -> Result<()> {
        let Vdevice { obj, viommu, _device, .. } = self;
        let r = obj.destroy();
        if r.is_err() {
            std::mem::forget(viommu);
            std::mem::forget(_device);
        }
        r
    }
}

/// The kind of a vEVENTQ (`enum iommu_veventq_type`), which also fixes the size of its events'
/// payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum VeventqType {
    /// `IOMMU_VEVENTQ_TYPE_DEFAULT`: reserved by the kernel, which refuses it with `EOPNOTSUPP`.
    Default,
    /// ARM SMMUv3 event records (`IOMMU_VEVENTQ_TYPE_ARM_SMMUV3`, `struct iommu_vevent_arm_smmuv3`).
    ArmSmmuv3,
    /// Tegra241 CMDQV error maps (`IOMMU_VEVENTQ_TYPE_TEGRA241_CMDQV`,
    /// `struct iommu_vevent_tegra241_cmdqv`).
    Tegra241Cmdqv,
    /// Any other type, with the size of its events' payload (the mock IOMMU's
    /// `IOMMU_VEVENTQ_TYPE_SELFTEST` carries a 4-byte `struct iommu_viommu_event_selftest`). A wrong
    /// `data_len` makes reads fail with [`Error::Protocol`] or misparse.
    Raw {
        /// The kernel's type value.
        kind: u32,
        /// Bytes of payload after each event header.
        data_len: usize,
    },
}

impl VeventqType {
    /// The kernel's value.
    pub fn raw(self) -> u32 {
        match self {
            VeventqType::Default => sys::IOMMU_VEVENTQ_TYPE_DEFAULT,
            VeventqType::ArmSmmuv3 => sys::IOMMU_VEVENTQ_TYPE_ARM_SMMUV3,
            VeventqType::Tegra241Cmdqv => sys::IOMMU_VEVENTQ_TYPE_TEGRA241_CMDQV,
            VeventqType::Raw { kind, .. } => kind,
        }
    }

    /// Bytes of payload after each event header.
    pub fn data_len(self) -> usize {
        match self {
            VeventqType::Default => 0,
            VeventqType::ArmSmmuv3 => size_of::<sys::iommu_vevent_arm_smmuv3>(),
            VeventqType::Tegra241Cmdqv => size_of::<sys::iommu_vevent_tegra241_cmdqv>(),
            VeventqType::Raw { data_len, .. } => data_len,
        }
    }
}

/// The payload of one vEVENT, decoded by the queue's [`VeventqType`].
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum VeventData {
    /// A 256-bit ARM SMMUv3 event record (`evt`, converted from little endian). Its StreamID field
    /// holds the virtual id of the [`Vdevice`].
    ArmSmmuv3([u64; 4]),
    /// The 128-bit Tegra241 logical VCMDQ error map (`lvcmdq_err_map`, converted from little endian).
    Tegra241Cmdqv([u64; 2]),
    /// The payload of a [`VeventqType::Raw`] queue, as the kernel wrote it.
    Raw(Vec<u8>),
}

/// One vEVENT.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Vevent {
    /// Its sequence number in the queue, in `0..=i32::MAX` (wrapping to 0).
    pub sequence: u32,
    /// The type-specific payload.
    pub data: VeventData,
}

/// Events the kernel dropped (the queue was full, or it could not allocate memory for them).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct LostEvents {
    /// The sequence number of the first lost event.
    pub first_sequence: u32,
    /// How many consecutive events were lost.
    pub count: u32,
}

/// What a read of a [`Veventq`] yields, in queue order.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum VeventRecord {
    /// An event.
    Event(Vevent),
    /// Events lost at this point of the stream: found from a gap in the sequence numbers or from
    /// the kernel's `IOMMU_VEVENTQ_FLAG_LOST_EVENTS` header at the tail of the queue.
    Lost(LostEvents),
}

/// The largest payload one vEVENT can have: the kernel allocates each event with one `kmalloc`,
/// whose limit (`KMALLOC_MAX_SIZE`, 2^(MAX_PAGE_ORDER + PAGE_SHIFT)) is at most 512 MiB in any
/// default configuration (4 MiB on x86-64).
pub(crate) const MAX_VEVENT_DATA: usize = 512 << 20;

/// vEVENT sequence numbers run over `0..=INT_MAX` and wrap to 0.
const SEQ_MASK: u32 = i32::MAX as u32;
const VEVENT_HEADER: usize = size_of::<sys::iommufd_vevent_header>();

/// Lost-event accounting from the sequence numbers of a vEVENTQ's records.
///
/// The kernel numbers every event it accepts or drops. A dropped event leaves a gap before the next
/// delivered one; if nothing was delivered after it yet, the queue ends with a `LOST_EVENTS` header
/// carrying the sequence number of the last dropped event.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct SeqTracker {
    /// The sequence number the next record should have (0 for a new queue).
    next: u32,
}

impl SeqTracker {
    fn advance(&mut self, seq: u32) {
        self.next = (seq & SEQ_MASK).wrapping_add(1) & SEQ_MASK;
    }

    /// A delivered event numbered `seq`: the events lost just before it, if any.
    pub(crate) fn event(&mut self, seq: u32) -> Option<LostEvents> {
        let gap = seq.wrapping_sub(self.next) & SEQ_MASK;
        let lost = (gap > 0).then_some(LostEvents { first_sequence: self.next, count: gap });
        self.advance(seq);
        lost
    }

    /// A `LOST_EVENTS` header numbered `seq` (the last dropped event): the events lost up to it.
    pub(crate) fn lost_header(&mut self, seq: u32) -> LostEvents {
        let count = (seq.wrapping_sub(self.next) & SEQ_MASK) + 1;
        let lost = LostEvents { first_sequence: self.next, count };
        self.advance(seq);
        lost
    }
}

fn le_words<const N: usize>(b: &[u8]) -> [u64; N] {
    let mut out = [0u64; N];
    for (w, chunk) in out.iter_mut().zip(b.chunks_exact(8)) {
        let mut a = [0u8; 8];
        a.copy_from_slice(chunk);
        *w = u64::from_le_bytes(a);
    }
    out
}

fn decode_payload(kind: VeventqType, b: &[u8]) -> VeventData {
    match kind {
        VeventqType::ArmSmmuv3 => VeventData::ArmSmmuv3(le_words::<4>(b)),
        VeventqType::Tegra241Cmdqv => VeventData::Tegra241Cmdqv(le_words::<2>(b)),
        VeventqType::Default | VeventqType::Raw { .. } => VeventData::Raw(b.to_vec()),
    }
}

/// Decodes the bytes of one read of a vEVENTQ into records, updating the lost-event accounting.
/// Returns how many events were reported lost.
pub(crate) fn parse_vevents(
    kind: VeventqType,
    mut bytes: &[u8],
    tracker: &mut SeqTracker,
    out: &mut Vec<VeventRecord>,
) -> Result<u64> {
    let torn = |detail: String| Error::Protocol { op: "read(vEVENTQ)", detail };
    let data_len = kind.data_len();
    let mut lost_total = 0u64;
    while !bytes.is_empty() {
        if bytes.len() < VEVENT_HEADER {
            return Err(torn(format!("{} trailing bytes are not an event header", bytes.len())));
        }
        let (header, rest) = bytes.split_at(VEVENT_HEADER);
        let mut a = [0u8; 4];
        a.copy_from_slice(&header[std::mem::offset_of!(sys::iommufd_vevent_header, flags)..][..4]);
        let flags = u32::from_ne_bytes(a);
        a.copy_from_slice(&header[std::mem::offset_of!(sys::iommufd_vevent_header, sequence)..][..4]);
        let sequence = u32::from_ne_bytes(a);
        if flags & sys::IOMMU_VEVENTQ_FLAG_LOST_EVENTS != 0 {
            // A lost-events header has no payload.
            let lost = tracker.lost_header(sequence);
            lost_total += u64::from(lost.count);
            out.push(VeventRecord::Lost(lost));
            bytes = rest;
            continue;
        }
        if rest.len() < data_len {
            return Err(torn(format!(
                "event {sequence} has {} payload bytes, its type needs {data_len}",
                rest.len()
            )));
        }
        let (payload, rest) = rest.split_at(data_len);
        if let Some(lost) = tracker.event(sequence) {
            lost_total += u64::from(lost.count);
            out.push(VeventRecord::Lost(lost));
        }
        out.push(VeventRecord::Event(Vevent { sequence, data: decode_payload(kind, payload) }));
        bytes = rest;
    }
    Ok(lost_total)
}

/// A virtual event queue (`IOMMU_VEVENTQ_ALLOC`, Linux 6.15): events the physical IOMMU reports for
/// a vIOMMU (for example SMMUv3 translation faults of a guest's stage-1 table), owned as the kernel
/// object id and its file descriptor.
///
/// The fd is pollable ([`AsFd`]; `POLLIN` while events are pending) and never blocks: read with
/// [`read`](Self::read), wait with [`wait`](Self::wait). Events beyond the queue's depth are dropped
/// by the kernel; the handle tracks sequence numbers and reports drops as
/// [`VeventRecord::Lost`] in the stream, with a running total in [`lost_events`](Self::lost_events).
///
/// The handle keeps its vIOMMU alive. Closing closes the fd first and then destroys the object (the
/// open fd holds the object: the other order fails with `EBUSY`).
pub struct Veventq {
    // Field order is drop order: fd, object, then the vIOMMU.
    fd: OwnedFd,
    obj: Object,
    viommu: Arc<ViommuInner>,
    depth: u32,
    reader: EventReader,
}

impl std::fmt::Debug for Veventq {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Veventq")
            .field("id", &self.id())
            .field("fd", &self.fd.as_raw_fd())
            .field("viommu", &self.viommu.obj.id())
            .field("kind", &self.reader.kind)
            .field("depth", &self.depth)
            .field("lost", &self.reader.lost)
            .finish()
    }
}

/// A vEVENTQ's fd as [`EventReader`] sees it (a trait so the read logic can be tested against a
/// model of the kernel).
pub(crate) trait VeventFd {
    /// One `read(2)` of at most `len` bytes (`ENOMEM` if no buffer of that size can be had).
    fn read(&mut self, len: usize) -> rustix::io::Result<Vec<u8>>;
    /// Whether an event is pending now (`POLLIN`), without waiting.
    fn readable(&mut self) -> Result<bool>;
}

impl VeventFd for BorrowedFd<'_> {
    fn read(&mut self, len: usize) -> rustix::io::Result<Vec<u8>> {
        let mut buf: Vec<u8> = Vec::new();
        buf.try_reserve_exact(len).map_err(|_| Errno::NOMEM)?;
        // Read into uninitialised spare capacity, exactly `len` bytes of it: a large buffer is not
        // touched beyond what the kernel writes.
        let window = buf.spare_capacity_mut().get_mut(..len).ok_or(Errno::NOMEM)?;
        let (got, _) = rustix::io::read(*self, window)?;
        Ok(got.to_vec())
    }

    fn readable(&mut self) -> Result<bool> {
        poll_readable(*self, Some(Duration::ZERO), "poll(vEVENTQ)")
    }
}

/// The read side of a vEVENTQ: its type, lost-event accounting and what a read held back.
#[derive(Debug)]
struct EventReader {
    kind: VeventqType,
    tracker: SeqTracker,
    lost: u64,
    /// An error [`Veventq::read`] held back because it returned the records read before it.
    pending: Option<Error>,
    /// Whether an event of the size the type gives has been read (reads take one event at a time
    /// until then).
    sized: bool,
}

impl EventReader {
    /// How many events one `read(2)` asks for, at most.
    const BATCH: usize = 64;
    /// The read buffer's size: [`BATCH`](Self::BATCH) events, fewer if they are large (but always
    /// room for one).
    const READ_BYTES: usize = 64 << 10;
    /// A read returns after this many `read(2)`s that filled the buffer, so that a vIOMMU that keeps
    /// reporting cannot keep one call reading forever.
    const MAX_READS: usize = 64;

    fn new(kind: VeventqType) -> EventReader {
        EventReader { kind, tracker: SeqTracker::default(), lost: 0, pending: None, sized: false }
    }

    /// [`Veventq::read`] on `fd`.
    fn read(&mut self, fd: &mut dyn VeventFd) -> Result<Vec<VeventRecord>> {
        if let Some(e) = self.pending.take() {
            return Err(e);
        }
        let mut out = Vec::new();
        match self.read_into(fd, &mut out) {
            Ok(()) => Ok(out),
            Err(e) if out.is_empty() => Err(e),
            Err(e) => {
                self.pending = Some(e);
                Ok(out)
            }
        }
    }

    /// Reads pending events into `out` until none is left (or [`MAX_READS`](Self::MAX_READS) full
    /// buffers were read); on error, `out` keeps what was read before it.
    fn read_into(&mut self, fd: &mut dyn VeventFd, out: &mut Vec<VeventRecord>) -> Result<()> {
        const OP: &str = "read(vEVENTQ)";
        let data_len = self.kind.data_len();
        // `alloc` bounds `data_len`, so neither sum overflows.
        let record = VEVENT_HEADER.saturating_add(data_len);
        let batch_len = record.saturating_mul((Self::READ_BYTES / record).clamp(1, Self::BATCH));
        let kind = self.kind;
        let too_small = || Error::Protocol {
            op: OP,
            detail: format!(
                "the next event is larger than {record} bytes (an event header and {data_len} bytes of \
                 payload): the queue's type, {kind:?}, does not match its events"
            ),
        };
        // Whether the last read(2) returned nothing while the fd was readable.
        let mut empty_but_readable = false;
        for _ in 0..Self::MAX_READS {
            // Until an event of the expected size has been read, read one record at a time: the
            // kernel refuses an event larger than the buffer rather than handing it out, so a type
            // whose events are larger than `data_len` is caught before anything is misparsed.
            let len = if self.sized { batch_len } else { record };
            let got = match fd.read(len) {
                Ok(got) => got,
                // Current kernels: the first pending event does not fit the buffer.
                Err(Errno::INVAL) => return Err(too_small()),
                Err(e) => return Err(Error::os(OP, e)),
            };
            if got.is_empty() {
                // Either the queue is empty, or its first event does not fit: kernels before a
                // 2026 fix answer 0 rather than EINVAL then, and the fd stays readable. A readable
                // fd is read once more (an event that merely arrived in between is read then);
                // nothing again means the event does not fit.
                if !fd.readable()? {
                    return Ok(());
                }
                if empty_but_readable {
                    return Err(too_small());
                }
                empty_but_readable = true;
                continue;
            }
            empty_but_readable = false;
            let n = got.len();
            if n > len {
                return Err(Error::Protocol {
                    op: OP,
                    detail: format!("the kernel reported {n} bytes read into a {len}-byte buffer"),
                });
            }
            let before = out.len();
            let lost = parse_vevents(kind, &got, &mut self.tracker, out)?;
            self.lost = self.lost.saturating_add(lost);
            // A whole event read into a one-record buffer: the events have the expected size.
            self.sized |=
                out.get(before..).is_some_and(|new| new.iter().any(|r| matches!(r, VeventRecord::Event(_))));
            // The kernel stops early only when the queue is empty or the next event does not fit
            // (a lost-events header is shorter than a record, so room for a whole record means
            // nothing more was pending, or an event too large for its type is next: the next call
            // reports that).
            if len - n >= record {
                return Ok(());
            }
        }
        Ok(())
    }
}

impl Veventq {
    /// Allocates an event queue of `kind` holding at most `depth` events on `viommu`
    /// (`IOMMU_VEVENTQ_ALLOC`, Linux 6.15).
    ///
    /// A vIOMMU has at most one queue per type (`EEXIST`). The kernel caps `depth` (2^19 in Linux
    /// 7.3, `EINVAL` above); a zero depth is rejected before the ioctl. A type the driver does not
    /// report, and [`VeventqType::Default`], give `EOPNOTSUPP`.
    pub fn alloc(viommu: &Viommu, kind: VeventqType, depth: u32) -> Result<Veventq> {
        if depth == 0 {
            return Err(Error::invalid(VEVENTQ_ALLOC, "the depth is zero"));
        }
        if kind.data_len() > MAX_VEVENT_DATA {
            return Err(Error::invalid(
                VEVENTQ_ALLOC,
                format!(
                    "a payload of {} bytes per event is more than the kernel can allocate for one \
                     event ({MAX_VEVENT_DATA} bytes)",
                    kind.data_len()
                ),
            ));
        }
        let iommufd = viommu.iommufd();
        let mut arg = sys::iommu_veventq_alloc::new();
        arg.viommu_id = viommu.id();
        arg.type_ = kind.raw();
        arg.veventq_depth = depth;
        iommufd.check_process(ioctl::VEVENTQ_ALLOC.name)?;
        // SAFETY: IOMMU_VEVENTQ_ALLOC takes `iommu_veventq_alloc`, sized by `new()`; it holds no
        // pointers, and the kernel writes the new id and fd back through the exclusive borrow.
        unsafe { ioctl::call(iommufd.as_fd(), &ioctl::VEVENTQ_ALLOC, &mut arg) }?;
        // SAFETY: on success the kernel installed `out_veventq_fd` in this process's fd table as a
        // new O_CLOEXEC file that nothing else refers to; ownership passes to us here, at once.
        let fd = unsafe { OwnedFd::from_raw_fd(arg.out_veventq_fd as RawFd) };
        Ok(Veventq {
            fd,
            obj: Object::new(iommufd, arg.out_veventq_id, "vEVENTQ"),
            viommu: viommu.inner.clone(),
            depth,
            reader: EventReader::new(kind),
        })
    }

    /// The kernel's id for the queue.
    pub fn id(&self) -> u32 {
        self.obj.id()
    }

    /// The type it was allocated with.
    pub fn kind(&self) -> VeventqType {
        self.reader.kind
    }

    /// The most events the kernel holds before dropping new ones.
    pub fn depth(&self) -> u32 {
        self.depth
    }

    /// The id of its vIOMMU.
    pub fn viommu_id(&self) -> u32 {
        self.viommu.obj.id()
    }

    /// How many events the kernel dropped so far, as seen by the reads of this handle.
    pub fn lost_events(&self) -> u64 {
        self.reader.lost
    }

    /// Reads every pending event without blocking (an empty vector: none pending). Dropped events
    /// appear as [`VeventRecord::Lost`] where they were dropped.
    ///
    /// Lost-event accounting assumes every read of the fd goes through this handle.
    ///
    /// If the events are larger than the queue's type says (a [`VeventqType::Raw`] whose `data_len`
    /// is too small), the kernel hands out nothing and this returns [`Error::Protocol`] (every later
    /// read does too: the event stays at the head of the queue); the first read of a queue takes
    /// one event only, to check its size before reading in batches. A `data_len` that is too large
    /// fails with [`Error::Protocol`] too, or (rarely, when several events happen to add up to one
    /// record) misparses.
    ///
    /// Events are never dropped: if a later `read(2)` of the same call fails after some events were
    /// read, those are returned and the error is held back for the next `read` or `read_timeout`.
    pub fn read(&mut self) -> Result<Vec<VeventRecord>> {
        self.reader.read(&mut self.fd.as_fd())
    }

    /// Waits until an event is pending or `timeout` passes (`None`, or a timeout too long for the
    /// clock: no limit). Returns whether one is pending.
    pub fn wait(&self, timeout: Option<Duration>) -> Result<bool> {
        poll_readable(self.fd.as_fd(), timeout, "poll(vEVENTQ)")
    }

    /// Waits as [`wait`](Self::wait) does, then reads every pending event (empty on timeout). An
    /// error held back by an earlier read is returned at once.
    pub fn read_timeout(&mut self, timeout: Option<Duration>) -> Result<Vec<VeventRecord>> {
        if let Some(e) = self.reader.pending.take() {
            return Err(e);
        }
        let deadline = deadline(timeout);
        loop {
            let remaining = deadline.map(|d| d.saturating_duration_since(Instant::now()));
            if !self.wait(remaining)? {
                return Ok(Vec::new());
            }
            let records = self.read()?;
            if !records.is_empty() || deadline.is_some_and(|d| Instant::now() >= d) {
                return Ok(records);
            }
        }
    }

    /// Closes the fd, then destroys the object, reporting failure (`EBUSY` if a duplicate of the fd
    /// is still open). The vIOMMU is released only after the kernel destroyed the queue.
    pub fn close(self) -> Result<()> {
        let Veventq { fd, obj, viommu, .. } = self;
        drop(fd);
        let r = obj.destroy();
        if r.is_err() {
            std::mem::forget(viommu);
        }
        r
    }
}

impl AsFd for Veventq {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl AsRawFd for Veventq {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

/// A [`Veventq`] registered with the tokio reactor (feature `tokio`).
#[cfg(feature = "tokio")]
#[cfg_attr(docsrs, doc(cfg(feature = "tokio")))]
#[derive(Debug)]
pub struct AsyncVeventq {
    inner: tokio::io::unix::AsyncFd<Veventq>,
}

#[cfg(feature = "tokio")]
impl AsyncVeventq {
    /// Registers `queue` for readiness with the current tokio runtime.
    ///
    /// # Panics
    ///
    /// If called outside a tokio runtime, or in one built without I/O (`enable_io`).
    pub fn new(queue: Veventq) -> Result<AsyncVeventq> {
        // SAFETY: the `Veventq` moves into the `AsyncFd` and owns its fd: `as_raw_fd` always returns
        // that one fd, which stays open until the `Veventq` is dropped, after the `AsyncFd` has
        // deregistered it (on drop or `into_inner`).
        let inner =
            unsafe { tokio::io::unix::AsyncFd::register_with_interest(queue, tokio::io::Interest::READABLE) }
                .map_err(|e| {
                    Error::os(
                        "AsyncFd::register(vEVENTQ)",
                        Errno::from_io_error(&e.into()).unwrap_or(Errno::IO),
                    )
                })?;
        Ok(AsyncVeventq { inner })
    }

    /// Waits for events and reads every pending one (never empty), as [`Veventq::read`] does. An
    /// error held back by an earlier read is returned at once.
    pub async fn read(&mut self) -> Result<Vec<VeventRecord>> {
        if let Some(e) = self.inner.get_mut().reader.pending.take() {
            return Err(e);
        }
        loop {
            let mut guard = self
                .inner
                .readable_mut()
                .await
                .map_err(|e| Error::os("poll(vEVENTQ)", Errno::from_io_error(&e).unwrap_or(Errno::IO)))?;
            let records = guard.get_inner_mut().read()?;
            if !records.is_empty() {
                return Ok(records);
            }
            guard.clear_ready();
        }
    }

    /// The queue.
    pub fn get_ref(&self) -> &Veventq {
        self.inner.get_ref()
    }

    /// Deregisters from the reactor and returns the queue.
    pub fn into_inner(self) -> Veventq {
        self.inner.into_inner()
    }
}

/// The kind of a hardware queue (`enum iommu_hw_queue_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum HwQueueType {
    /// `IOMMU_HW_QUEUE_TYPE_DEFAULT`: reserved by the kernel, which refuses it with `EOPNOTSUPP`.
    Default,
    /// An NVIDIA Tegra241 CMDQV virtual command queue (`IOMMU_HW_QUEUE_TYPE_TEGRA241_CMDQV`).
    Tegra241Cmdqv,
    /// Any other value, for example the mock IOMMU's `IOMMU_HW_QUEUE_TYPE_SELFTEST`.
    Raw(u32),
}

impl HwQueueType {
    /// The kernel's value.
    pub fn raw(self) -> u32 {
        match self {
            HwQueueType::Default => sys::IOMMU_HW_QUEUE_TYPE_DEFAULT,
            HwQueueType::Tegra241Cmdqv => sys::IOMMU_HW_QUEUE_TYPE_TEGRA241_CMDQV,
            HwQueueType::Raw(v) => v,
        }
    }
}

/// What a HW queue holds on to: its queue memory's mapping, type-erased.
type HeldMapping = Arc<dyn Any + Send + Sync>;

struct HwQueueInner {
    /// `None` once destroyed (explicitly or by `Drop`).
    obj: Option<Object>,
    // Released after the queue is destroyed, in this order: the queue of the index below, the
    // vIOMMU, the queue memory's mapping.
    prev: Option<Arc<HwQueueInner>>,
    viommu: Option<Arc<ViommuInner>>,
    memory: Option<HeldMapping>,
    viommu_id: u32,
    kind: HwQueueType,
    index: u32,
    iova: u64,
    length: u64,
}

impl HwQueueInner {
    /// Destroys the queue. On failure the kernel may still use the queue, so what it holds is never
    /// released: the vIOMMU and the queue below stay alive and the mapping is never unmapped (its
    /// memory is leaked rather than freed while the hardware may read it).
    fn destroy(&mut self) -> Result<()> {
        let Some(obj) = self.obj.take() else { return Ok(()) };
        let r = obj.destroy();
        if r.is_err() {
            std::mem::forget(self.prev.take());
            std::mem::forget(self.viommu.take());
            std::mem::forget(self.memory.take());
        }
        r
    }
}

impl Drop for HwQueueInner {
    fn drop(&mut self) {
        let id = self.obj.as_ref().map(Object::id);
        match self.destroy() {
            Ok(()) => {}
            // In a fork()ed child the queue is the parent's: leave it (and what it holds) alone.
            Err(Error::ForeignProcess { .. }) => {}
            Err(e) => log::error!(
                "iommufd: failed to destroy HW queue {} on drop, leaking its memory: {e}",
                id.unwrap_or_default()
            ),
        }
    }
}

/// A hardware-accelerated queue of a vIOMMU (`IOMMU_HW_QUEUE_ALLOC`, Linux 6.17), such as a Tegra241
/// CMDQV virtual command queue that the hardware reads directly from guest memory.
///
/// The queue memory is given as an address range in the **nest parent's IOAS** (a guest physical
/// address when the nest parent maps guest RAM), inside a [`Mapping`] of that IOAS. The kernel
/// requires the range to be backed by physically contiguous pages (`EFAULT` otherwise; a single
/// page always is) and pins it for the queue's lifetime: until the queue is destroyed, unmapping the
/// range fails with `EBUSY`. So the queue holds a clone of the mapping's `Arc`: while a queue
/// exists the mapping cannot be unmapped ([`Arc::into_inner`] gives the guard back only once every
/// queue on it is gone), [`Ioas::unmap_range`](crate::Ioas::unmap_range) and
/// [`Ioas::unmap_all`](crate::Ioas::unmap_all) leave it alone, and dropping the caller's `Arc`
/// leaves the unmap to the last queue, after the kernel destroyed it.
///
/// The handle keeps its vIOMMU alive. Drivers make a queue depend on the queue of the same type and
/// the index below it (the kernel refuses to destroy that one first): the handle of a queue with
/// index `n > 0` keeps the handle of index `n - 1` alive, if this crate allocated it.
pub struct HwQueue {
    inner: Arc<HwQueueInner>,
}

impl std::fmt::Debug for HwQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HwQueue")
            .field("id", &self.id())
            .field("viommu", &self.inner.viommu_id)
            .field("kind", &self.inner.kind)
            .field("index", &self.inner.index)
            .field("iova", &self.inner.iova)
            .field("length", &self.inner.length)
            .finish()
    }
}

impl HwQueue {
    /// Allocates queue `index` of `kind` on `viommu`, reading the `length` bytes at `iova` of the
    /// nest parent's IOAS (`IOMMU_HW_QUEUE_ALLOC`, Linux 6.17). The range must lie inside `memory`,
    /// a mapping of that IOAS; the queue keeps a clone of `memory` until the kernel destroyed it.
    ///
    /// Rejected before the ioctl: a zero length, a range that overflows or is not inside `memory`,
    /// and a mapping of another IOAS. The kernel answers `EOPNOTSUPP` for a type the vIOMMU lacks
    /// (and for [`HwQueueType::Default`]), and the driver decides which indexes are valid (`EEXIST`
    /// for a taken one; drivers that chain queues refuse index `n` before `n - 1` exists).
    pub fn alloc<M>(
        viommu: &Viommu,
        kind: HwQueueType,
        index: u32,
        memory: &Arc<Mapping<M>>,
        iova: u64,
        length: u64,
    ) -> Result<HwQueue>
    where
        M: Memory + 'static,
        Mapping<M>: Send + Sync,
    {
        if length == 0 {
            return Err(Error::invalid(HW_QUEUE_ALLOC, "the queue length is zero"));
        }
        let Some(end) = iova.checked_add(length) else {
            return Err(Error::invalid(
                HW_QUEUE_ALLOC,
                format!("range {iova:#x}+{length:#x} overflows the address space"),
            ));
        };
        let (map_start, map_len) = (memory.iova(), memory.len());
        if iova < map_start || map_start.checked_add(map_len).is_none_or(|map_end| end > map_end) {
            return Err(Error::invalid(
                HW_QUEUE_ALLOC,
                format!(
                    "range {iova:#x}+{length:#x} is not inside the mapping {map_start:#x}+{map_len:#x} \
                     given as its memory"
                ),
            ));
        }
        viommu.iommufd().check_same(memory.iommufd(), HW_QUEUE_ALLOC)?;
        let ioas_id = viommu.nest_parent().parent_id();
        if memory.ioas_id() != ioas_id {
            return Err(Error::invalid(
                HW_QUEUE_ALLOC,
                format!(
                    "the mapping is in IOAS {}, the vIOMMU's nest parent in IOAS {ioas_id}",
                    memory.ioas_id()
                ),
            ));
        }
        let iommufd = viommu.iommufd();
        let mut arg = sys::iommu_hw_queue_alloc::new();
        arg.viommu_id = viommu.id();
        arg.type_ = kind.raw();
        arg.index = index;
        arg.nesting_parent_iova = iova;
        arg.length = length;
        // The registry lock is held across the ioctl so that two allocations on one vIOMMU cannot
        // miss each other's entries.
        let mut registry = viommu.inner.hw_queues.lock().unwrap_or_else(|e| e.into_inner());
        let prev = index.checked_sub(1).and_then(|p| registry.get(&(kind.raw(), p))).and_then(Weak::upgrade);
        iommufd.check_process(ioctl::HW_QUEUE_ALLOC.name)?;
        // SAFETY: IOMMU_HW_QUEUE_ALLOC takes `iommu_hw_queue_alloc`, sized by `new()`; it holds no
        // user pointers (`nesting_parent_iova` is an IOVA the kernel resolves through the IOAS and pins
        // itself), and the kernel writes the new id back through the exclusive borrow.
        unsafe { ioctl::call(iommufd.as_fd(), &ioctl::HW_QUEUE_ALLOC, &mut arg) }?;
        let held: HeldMapping = memory.clone();
        let inner = Arc::new(HwQueueInner {
            obj: Some(Object::new(iommufd, arg.out_hw_queue_id, "HW queue")),
            prev,
            viommu: Some(viommu.inner.clone()),
            memory: Some(held),
            viommu_id: viommu.id(),
            kind,
            index,
            iova,
            length,
        });
        registry.retain(|_, q| q.strong_count() > 0);
        registry.insert((kind.raw(), index), Arc::downgrade(&inner));
        Ok(HwQueue { inner })
    }

    /// The kernel's id for the queue.
    pub fn id(&self) -> u32 {
        self.inner.obj.as_ref().map(Object::id).unwrap_or_default()
    }

    /// The type it was allocated with.
    pub fn kind(&self) -> HwQueueType {
        self.inner.kind
    }

    /// Its index among the vIOMMU's queues of its type.
    pub fn index(&self) -> u32 {
        self.inner.index
    }

    /// The queue memory: its address in the nest parent's IOAS and its length.
    pub fn range(&self) -> (u64, u64) {
        (self.inner.iova, self.inner.length)
    }

    /// The id of its vIOMMU.
    pub fn viommu_id(&self) -> u32 {
        self.inner.viommu_id
    }

    /// Destroys the queue now, reporting failure; refused with [`Error::InUse`] while the queue of
    /// the next index still holds it. The vIOMMU, the queue below and the mapping of the queue
    /// memory are released only after the kernel destroyed it (never, if it failed).
    pub fn destroy(self) -> Result<()> {
        match Arc::try_unwrap(self.inner) {
            Ok(mut inner) => inner.destroy(),
            Err(inner) => Err(Error::InUse { op: "IOMMU_DESTROY", users: Arc::strong_count(&inner) - 1 }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(flags: u32, sequence: u32) -> Vec<u8> {
        let mut v = flags.to_ne_bytes().to_vec();
        v.extend_from_slice(&sequence.to_ne_bytes());
        v
    }

    const SELFTEST: VeventqType = VeventqType::Raw { kind: 0xbeef_beef, data_len: 4 };

    fn event(sequence: u32, virt_id: u32) -> Vec<u8> {
        let mut v = header(0, sequence);
        v.extend_from_slice(&virt_id.to_ne_bytes());
        v
    }

    fn lost(sequence: u32) -> Vec<u8> {
        header(sys::IOMMU_VEVENTQ_FLAG_LOST_EVENTS, sequence)
    }

    #[test]
    fn type_values() {
        assert_eq!(ViommuType::ArmSmmuv3.raw(), 1);
        assert_eq!(ViommuType::from_raw(2), ViommuType::Tegra241Cmdqv);
        assert_eq!(ViommuType::from_raw(0xdead_beef), ViommuType::Raw(0xdead_beef));
        assert_eq!(ViommuType::from_raw(ViommuType::Default.raw()), ViommuType::Default);
        assert_eq!(VeventqType::ArmSmmuv3.data_len(), 32);
        assert_eq!(VeventqType::Tegra241Cmdqv.data_len(), 16);
        assert_eq!(HwQueueType::Tegra241Cmdqv.raw(), 1);
        assert_eq!(VEVENT_HEADER, 8);
    }

    #[test]
    fn in_order_stream_loses_nothing() {
        let mut t = SeqTracker::default();
        let mut out = Vec::new();
        let bytes = [event(0, 5), event(1, 5), event(2, 6)].concat();
        assert_eq!(parse_vevents(SELFTEST, &bytes, &mut t, &mut out).unwrap(), 0);
        assert_eq!(out.len(), 3);
        assert_eq!(
            out[2],
            VeventRecord::Event(Vevent { sequence: 2, data: VeventData::Raw(6u32.to_ne_bytes().to_vec()) })
        );
        assert_eq!(t.next, 3);
    }

    #[test]
    fn overflow_tail_header_counts_every_dropped_event() {
        // Depth 2, four events reported: 0 and 1 queued, 2 and 3 dropped; the kernel leaves one
        // lost-events header numbered 3 at the tail.
        let mut t = SeqTracker::default();
        let mut out = Vec::new();
        let bytes = [event(0, 1), event(1, 1), lost(3)].concat();
        assert_eq!(parse_vevents(SELFTEST, &bytes, &mut t, &mut out).unwrap(), 2);
        assert_eq!(out[2], VeventRecord::Lost(LostEvents { first_sequence: 2, count: 2 }));
        // The next delivered event follows without a gap.
        out.clear();
        assert_eq!(parse_vevents(SELFTEST, &event(4, 1), &mut t, &mut out).unwrap(), 0);
        assert_eq!(out.len(), 1);
    }

    #[test]
    fn gap_before_an_event_is_reported_before_it() {
        let mut t = SeqTracker::default();
        let mut out = Vec::new();
        let bytes = [event(0, 1), event(3, 1)].concat();
        assert_eq!(parse_vevents(SELFTEST, &bytes, &mut t, &mut out).unwrap(), 2);
        assert_eq!(out[1], VeventRecord::Lost(LostEvents { first_sequence: 1, count: 2 }));
        assert!(matches!(out[2], VeventRecord::Event(Vevent { sequence: 3, .. })));
    }

    #[test]
    fn lost_header_first_thing_in_a_new_queue() {
        // A kernel that could not allocate the very first event reports it with a header numbered 0.
        let mut t = SeqTracker::default();
        let mut out = Vec::new();
        assert_eq!(parse_vevents(SELFTEST, &lost(0), &mut t, &mut out).unwrap(), 1);
        assert_eq!(out, [VeventRecord::Lost(LostEvents { first_sequence: 0, count: 1 })]);
    }

    #[test]
    fn sequence_wraps_at_int_max() {
        let max = i32::MAX as u32;
        let mut t = SeqTracker { next: max - 1 };
        assert_eq!(t.event(max - 1), None);
        assert_eq!(t.event(max), None);
        assert_eq!(t.event(0), None);
        // After the wrap, next is 1: event 2 means event 1 was lost.
        assert_eq!(t.event(2), Some(LostEvents { first_sequence: 1, count: 1 }));
        let mut t = SeqTracker { next: max };
        assert_eq!(t.event(1), Some(LostEvents { first_sequence: max, count: 2 }));
        let mut t = SeqTracker { next: max };
        assert_eq!(t.lost_header(0), LostEvents { first_sequence: max, count: 2 });
        assert_eq!(t.next, 1);
    }

    #[test]
    fn typed_payloads_are_little_endian() {
        let mut t = SeqTracker::default();
        let mut out = Vec::new();
        let mut bytes = header(0, 0);
        for w in [1u64, 2, 3, 0x0102_0304_0506_0708] {
            bytes.extend_from_slice(&w.to_le_bytes());
        }
        parse_vevents(VeventqType::ArmSmmuv3, &bytes, &mut t, &mut out).unwrap();
        assert_eq!(
            out,
            [VeventRecord::Event(Vevent {
                sequence: 0,
                data: VeventData::ArmSmmuv3([1, 2, 3, 0x0102_0304_0506_0708])
            })]
        );
        let mut bytes = header(0, 1);
        bytes.extend_from_slice(&5u64.to_le_bytes());
        bytes.extend_from_slice(&6u64.to_le_bytes());
        out.clear();
        parse_vevents(VeventqType::Tegra241Cmdqv, &bytes, &mut t, &mut out).unwrap();
        assert_eq!(
            out,
            [VeventRecord::Event(Vevent { sequence: 1, data: VeventData::Tegra241Cmdqv([5, 6]) })]
        );
    }

    /// A vIOMMU handle over a made-up nest parent on a fake iommufd (`/dev/null`).
    fn fake_viommu() -> Viommu {
        let (iommufd, ioas) = crate::tests::fake();
        let parent = Hwpt::fake(&ioas, 8, HwptKind::Paging, HwptFlags::NEST_PARENT);
        Viommu {
            inner: Arc::new(ViommuInner {
                obj: Object::new(&iommufd, 9, "vIOMMU"),
                nest_parent: parent.inner.clone(),
                kind: ViommuType::Raw(0),
                hw_queues: Mutex::new(HashMap::new()),
            }),
        }
    }

    /// A vEVENTQ handle on the host: a fake vIOMMU, and a non-blocking eventfd as its fd (readable
    /// while its counter is not 0).
    fn host_veventq(kind: VeventqType, readable: bool) -> Veventq {
        let viommu = fake_viommu();
        let flags = rustix::event::EventfdFlags::CLOEXEC | rustix::event::EventfdFlags::NONBLOCK;
        Veventq {
            fd: rustix::event::eventfd(u32::from(readable), flags).unwrap(),
            obj: Object::new(viommu.iommufd(), 10, "vEVENTQ"),
            viommu: viommu.inner.clone(),
            depth: 8,
            reader: EventReader::new(kind),
        }
    }

    /// A model of the kernel's vEVENTQ read (`iommufd_veventq_fops_read`): whole events in order, a
    /// lost-events header wherever 8 bytes are left, the first event that does not fit answered with
    /// `EINVAL` (`old_kernel`: 0, the fd staying readable), and a scripted failure of one read.
    struct ModelEventq {
        items: std::collections::VecDeque<Vec<u8>>,
        old_kernel: bool,
        /// Fail the read with this number (counting from 1).
        fail_at: Option<(usize, Errno)>,
        /// Answer the first read with nothing, as if the events arrived just after it.
        arrive_late: bool,
        reads: usize,
    }

    impl ModelEventq {
        fn new(items: Vec<Vec<u8>>, old_kernel: bool) -> ModelEventq {
            ModelEventq { items: items.into(), old_kernel, fail_at: None, arrive_late: false, reads: 0 }
        }
    }

    impl VeventFd for ModelEventq {
        fn read(&mut self, len: usize) -> rustix::io::Result<Vec<u8>> {
            self.reads += 1;
            if let Some((at, errno)) = self.fail_at {
                if at == self.reads {
                    return Err(errno);
                }
            }
            if std::mem::take(&mut self.arrive_late) {
                return Ok(Vec::new());
            }
            let mut out = Vec::new();
            while let Some(item) = self.items.front() {
                let lost_header = item.len() == VEVENT_HEADER && item[0] & 1 != 0;
                let room = len - out.len();
                if room < VEVENT_HEADER || (!lost_header && item.len() > room) {
                    if out.is_empty() && !self.old_kernel {
                        return Err(Errno::INVAL);
                    }
                    break;
                }
                out.extend_from_slice(item);
                self.items.pop_front();
            }
            Ok(out)
        }

        fn readable(&mut self) -> Result<bool> {
            Ok(!self.items.is_empty())
        }
    }

    #[test]
    fn an_event_larger_than_its_type_is_an_error_not_an_endless_empty_read() {
        // The mock's 12-byte events read as a type without payload (8-byte records).
        let too_small = VeventqType::Raw { kind: 0xbeef_beef, data_len: 0 };
        for old_kernel in [false, true] {
            let mut kernel = ModelEventq::new(vec![event(0, 7), event(1, 7)], old_kernel);
            let mut reader = EventReader::new(too_small);
            for _ in 0..2 {
                let e = reader.read(&mut kernel).unwrap_err();
                assert!(e.to_string().contains("larger than 8 bytes"), "{e}");
            }
            assert_eq!(kernel.items.len(), 2, "nothing was handed out, nothing misparsed");
            // An old kernel's 0 is read twice (the second read tells it from a late arrival).
            assert_eq!(kernel.reads, if old_kernel { 4 } else { 2 });
        }
        // An empty queue is an empty read, not an error.
        let mut reader = EventReader::new(SELFTEST);
        assert_eq!(reader.read(&mut ModelEventq::new(vec![], true)).unwrap(), []);
        // A first 0 with events pending is an arrival after the read: they are read.
        let mut kernel = ModelEventq::new(vec![event(0, 7), event(1, 7)], true);
        kernel.arrive_late = true;
        assert_eq!(reader.read(&mut kernel).unwrap().len(), 2);
    }

    #[test]
    fn the_first_read_checks_the_event_size_then_reads_in_batches() {
        let mut kernel = ModelEventq::new((0..200).map(|i| event(i, 7)).collect(), false);
        let mut reader = EventReader::new(SELFTEST);
        assert_eq!(reader.read(&mut kernel).unwrap().len(), 200);
        // One event, then batches of 64: 1 + 64 + 64 + 64 + 7.
        assert_eq!(kernel.reads, 5);
        assert!(reader.sized);
        // A payload size larger than the events': the short event is a protocol error.
        let too_large = VeventqType::Raw { kind: 0xbeef_beef, data_len: 8 };
        let mut kernel = ModelEventq::new(vec![event(0, 7)], false);
        assert!(matches!(EventReader::new(too_large).read(&mut kernel), Err(Error::Protocol { .. })));
    }

    #[test]
    fn events_read_before_a_failing_read_are_returned_and_the_error_held_back() {
        for old_kernel in [false, true] {
            let mut kernel = ModelEventq::new((0..70).map(|i| event(i, 7)).collect(), old_kernel);
            // Read 1 takes one event, read 2 a batch of 64, read 3 fails.
            kernel.fail_at = Some((3, Errno::NOMEM));
            let mut reader = EventReader::new(SELFTEST);
            let got = reader.read(&mut kernel).unwrap();
            assert_eq!(got.len(), 65, "the 65 events are returned, not dropped");
            assert_eq!(
                got[64],
                VeventRecord::Event(Vevent {
                    sequence: 64,
                    data: VeventData::Raw(7u32.to_ne_bytes().to_vec())
                })
            );
            // The error comes next, once; then the rest, without a gap.
            assert_eq!(reader.read(&mut kernel).unwrap_err().errno(), Some(Errno::NOMEM));
            let rest = reader.read(&mut kernel).unwrap();
            assert_eq!(rest.len(), 5);
            assert_eq!(reader.lost, 0);
        }
        // A torn read after good ones: the good ones are returned, the protocol error next.
        let mut torn = event(1, 7);
        torn.truncate(10);
        let mut kernel = ModelEventq::new(vec![event(0, 7), torn], false);
        let mut reader = EventReader::new(SELFTEST);
        assert_eq!(reader.read(&mut kernel).unwrap().len(), 1);
        assert!(matches!(reader.read(&mut kernel), Err(Error::Protocol { .. })));
        // `read_timeout` returns a held-back error at once, before waiting.
        let mut q = host_veventq(SELFTEST, false);
        q.reader.pending = Some(Error::os("read(vEVENTQ)", Errno::NOMEM));
        assert_eq!(q.read_timeout(None).unwrap_err().errno(), Some(Errno::NOMEM));
    }

    #[test]
    fn huge_payload_sizes_are_refused_not_aborted_on() {
        let viommu = fake_viommu();
        for data_len in [usize::MAX, usize::MAX - 7, MAX_VEVENT_DATA + 1] {
            let kind = VeventqType::Raw { kind: 0xbeef_beef, data_len };
            match Veventq::alloc(&viommu, kind, 8) {
                Err(Error::InvalidArgument { op: VEVENTQ_ALLOC, reason }) => {
                    assert!(reason.contains("payload"))
                }
                other => panic!("expected InvalidArgument, got {other:?}"),
            }
        }
        // The largest payload the kernel can produce is accepted, and a read with a buffer for it
        // neither aborts nor touches the memory it does not need (the eventfd answers EAGAIN).
        let mut q = host_veventq(VeventqType::Raw { kind: 0xbeef_beef, data_len: MAX_VEVENT_DATA }, false);
        assert_eq!(q.read().unwrap_err().errno(), Some(Errno::AGAIN));
    }

    #[test]
    fn waits_without_limit_do_not_overflow_the_clock() {
        // These used to panic adding the timeout to `Instant::now()`.
        let mut q = host_veventq(SELFTEST, true);
        assert!(q.wait(Some(Duration::MAX)).unwrap());
        // The eventfd's counter (1) reads as a lost-events header numbered 0.
        assert_eq!(
            q.read_timeout(Some(Duration::MAX)).unwrap(),
            [VeventRecord::Lost(LostEvents { first_sequence: 0, count: 1 })]
        );
    }

    mod prop {
        use super::*;
        use proptest::prelude::*;

        fn any_kind() -> impl Strategy<Value = VeventqType> {
            prop_oneof![
                Just(VeventqType::Default),
                Just(VeventqType::ArmSmmuv3),
                Just(VeventqType::Tegra241Cmdqv),
                (any::<u32>(), 0usize..48).prop_map(|(kind, data_len)| VeventqType::Raw { kind, data_len }),
            ]
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(512))]

            /// Any bytes of any length, any type, any accounting state: records or a protocol error,
            /// never a panic; the lost total is the sum of the lost records.
            #[test]
            fn parse_vevents_never_panics(
                kind in any_kind(),
                bytes in proptest::collection::vec(any::<u8>(), 0..300),
                next in 0u32..=SEQ_MASK,
            ) {
                let mut tracker = SeqTracker { next };
                let mut out = Vec::new();
                if let Ok(lost) = parse_vevents(kind, &bytes, &mut tracker, &mut out) {
                    let counted: u64 = out
                        .iter()
                        .map(|r| match r { VeventRecord::Lost(l) => u64::from(l.count), _ => 0 })
                        .sum();
                    prop_assert_eq!(lost, counted);
                    for r in &out {
                        match r {
                            VeventRecord::Event(e) => {
                                let len = match &e.data {
                                    VeventData::ArmSmmuv3(_) => 32,
                                    VeventData::Tegra241Cmdqv(_) => 16,
                                    VeventData::Raw(b) => b.len(),
                                };
                                prop_assert_eq!(len, kind.data_len());
                            }
                            VeventRecord::Lost(l) => {
                                prop_assert!(l.count >= 1 && l.count <= SEQ_MASK + 1);
                                prop_assert!(l.first_sequence <= SEQ_MASK);
                            }
                        }
                    }
                    prop_assert!(tracker.next <= SEQ_MASK);
                }
            }

            /// A stream the kernel could write (events numbered with gaps where events were dropped,
            /// a lost-events header possibly at the end) decodes to every event, and the losses
            /// counted are exactly the numbers skipped.
            #[test]
            fn kernel_streams_decode_with_exact_loss_accounting(
                start in 0u32..=SEQ_MASK,
                steps in proptest::collection::vec((0u32..4, any::<u32>()), 0..40),
                tail_lost in proptest::option::of(0u32..4),
                kind in any_kind(),
            ) {
                let data_len = kind.data_len();
                let mut tracker = SeqTracker { next: start };
                let mut seq = start;
                let mut bytes = Vec::new();
                let mut want_lost = 0u64;
                let mut want_events = Vec::new();
                for (gap, payload_seed) in &steps {
                    seq = seq.wrapping_add(*gap) & SEQ_MASK;
                    want_lost += u64::from(*gap);
                    bytes.extend_from_slice(&header(0, seq));
                    let payload: Vec<u8> = (0..data_len).map(|i| (payload_seed.wrapping_add(i as u32)) as u8).collect();
                    bytes.extend_from_slice(&payload);
                    want_events.push((seq, payload));
                    seq = seq.wrapping_add(1) & SEQ_MASK;
                }
                if let Some(extra) = tail_lost {
                    // The header carries the number of the last dropped event.
                    let last = seq.wrapping_add(extra) & SEQ_MASK;
                    bytes.extend_from_slice(&header(sys::IOMMU_VEVENTQ_FLAG_LOST_EVENTS, last));
                    want_lost += u64::from(extra) + 1;
                }
                let mut out = Vec::new();
                let lost = parse_vevents(kind, &bytes, &mut tracker, &mut out).unwrap();
                prop_assert_eq!(lost, want_lost);
                let events: Vec<(u32, Vec<u8>)> = out
                    .iter()
                    .filter_map(|r| match r {
                        VeventRecord::Event(e) => Some((e.sequence, e.data.clone())),
                        VeventRecord::Lost(_) => None,
                    })
                    .map(|(s, d)| {
                        let raw = match d {
                            VeventData::ArmSmmuv3(w) => w.iter().flat_map(|x| x.to_le_bytes()).collect(),
                            VeventData::Tegra241Cmdqv(w) => w.iter().flat_map(|x| x.to_le_bytes()).collect(),
                            VeventData::Raw(b) => b,
                        };
                        (s, raw)
                    })
                    .collect();
                prop_assert_eq!(events, want_events);
            }

            /// The sequence tracker: any state, any number: no panic, numbers stay in range.
            #[test]
            fn seq_tracker_stays_in_range(next in 0u32..=SEQ_MASK, seq: u32, lost_header: bool) {
                let mut t = SeqTracker { next };
                if lost_header {
                    let l = t.lost_header(seq);
                    prop_assert!(l.count >= 1 && l.count <= SEQ_MASK + 1);
                } else if let Some(l) = t.event(seq) {
                    prop_assert!(l.count >= 1 && l.count <= SEQ_MASK);
                    prop_assert_eq!(l.first_sequence, next);
                }
                prop_assert_eq!(t.next, (seq & SEQ_MASK).wrapping_add(1) & SEQ_MASK);
            }
        }
    }

    #[test]
    fn torn_records_are_protocol_errors() {
        let mut out = Vec::new();
        let bytes = event(0, 1);
        for cut in [3, 8, 11] {
            let mut t = SeqTracker::default();
            assert!(matches!(
                parse_vevents(SELFTEST, &bytes[..cut], &mut t, &mut out),
                Err(Error::Protocol { .. })
            ));
        }
    }
}
