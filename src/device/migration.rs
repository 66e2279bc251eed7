//! VFIO live migration, version 2: the device's migration flags (`VFIO_DEVICE_FEATURE_MIGRATION`,
//! Linux 5.18), its state machine (`VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE`), the stop-copy size
//! estimate (`VFIO_DEVICE_FEATURE_MIG_DATA_SIZE`, 6.2) and the migration data fd with its pre-copy
//! query (`VFIO_MIG_GET_PRECOPY_INFO`, 6.2).
//!
//! See [`MigState`] for the state machine and how transitions are checked.

use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::sync::{Mutex, MutexGuard, OnceLock};

use iommufd_sys as sys;

use super::feature::feature_call;
use super::{BoundDevice, DeviceFeature};
use crate::error::{Errno, Error, Result};
use crate::ioctl::{self, Sized32};

bitflags::bitflags! {
    /// What a device's migration driver implements (`VFIO_DEVICE_FEATURE_MIGRATION`).
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
    pub struct MigrationFlags: u64 {
        /// The base state machine: `RUNNING`, `STOP`, `STOP_COPY`, `RESUMING` (every driver has it).
        const STOP_COPY = sys::VFIO_MIGRATION_STOP_COPY as u64;
        /// The peer-to-peer quiescent state `RUNNING_P2P`.
        const P2P = sys::VFIO_MIGRATION_P2P as u64;
        /// Pre-copy: `PRE_COPY` (and `PRE_COPY_P2P` with [`P2P`](Self::P2P)).
        const PRE_COPY = sys::VFIO_MIGRATION_PRE_COPY as u64;
    }
}

/// A state of the migration state machine (`enum vfio_device_mig_state`).
///
/// # The state machine
///
/// A migration driver implements single arcs between [`MigState`]s; which arcs exist depends on its
/// [`MigrationFlags`] (`P2P` adds `RUNNING_P2P`, `PRE_COPY` adds `PRE_COPY`, both add
/// `PRE_COPY_P2P`). Any other request is a *combination transition*: the kernel walks the shortest
/// path of single arcs whose interior holds no state of the saving group (`PRE_COPY`,
/// `PRE_COPY_P2P`, `STOP_COPY`), except a path that stays inside that group.
/// [`MigState::path`] computes the same path, so
/// [`BoundDevice::set_migration_state`] accepts **any target reachable from the current state** and
/// issues one ioctl for it; the kernel performs the steps under the driver's lock.
///
/// Before that ioctl the crate reads the device's current state from the kernel (the kernel is the
/// only record: a failed transition can stop anywhere along its path, and `VFIO_DEVICE_RESET`
/// returns the device to `RUNNING` behind any cached value) and refuses, with no ioctl issued:
/// `ERROR` as a target, any transition out of `ERROR` (only a reset leaves it), a state the device's
/// flags do not include ([`Error::NotCapable`]), and `STOP_COPY` to `PRE_COPY`/`PRE_COPY_P2P`, which
/// the uAPI forbids. Transitions of one device are serialised across its clones.
///
/// # Data sessions
///
/// Entering the saving group from outside it (`RUNNING -> PRE_COPY`, `RUNNING_P2P -> PRE_COPY_P2P`,
/// `STOP -> STOP_COPY`) starts a saving session, and `STOP -> RESUMING` a resuming one: the call
/// returns the session's [`MigrationData`], to [`Read`] the device state from or [`Write`] it into.
/// Moving inside the saving group (`PRE_COPY -> STOP_COPY`) keeps the session and its fd; leaving
/// the group or `RESUMING` ends it (the fd then reads or writes nothing more).
///
/// Non-exhaustive: the uAPI reserves the right to add states (a state this crate does not know, read
/// from the kernel, is an [`Error::Protocol`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[non_exhaustive]
pub enum MigState {
    /// The device failed a transition and could not return to a valid state; only a reset
    /// ([`BoundDevice::reset`]) leaves it, to `RUNNING`. Never a valid target.
    Error,
    /// Stopped: no DMA, interrupts or internal state changes.
    Stop,
    /// Running normally (the state after open and after a reset).
    Running,
    /// Stopped, with the device state streaming out through the saving session's fd.
    StopCopy,
    /// Stopped, loading a device state written into the resuming session's fd.
    Resuming,
    /// Running, but initiating no peer-to-peer DMA ([`MigrationFlags::P2P`]).
    RunningP2p,
    /// Running, with the initial state (and later changes) streaming out ([`MigrationFlags::PRE_COPY`]).
    PreCopy,
    /// `PRE_COPY` in the peer-to-peer quiescent state (both flags).
    PreCopyP2p,
}

impl std::fmt::Display for MigState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl MigState {
    /// Every state, in the kernel's numbering.
    pub const ALL: [MigState; 8] = [
        MigState::Error,
        MigState::Stop,
        MigState::Running,
        MigState::StopCopy,
        MigState::Resuming,
        MigState::RunningP2p,
        MigState::PreCopy,
        MigState::PreCopyP2p,
    ];

    /// The kernel's value (`VFIO_DEVICE_STATE_*`).
    pub const fn raw(self) -> u32 {
        match self {
            MigState::Error => sys::VFIO_DEVICE_STATE_ERROR,
            MigState::Stop => sys::VFIO_DEVICE_STATE_STOP,
            MigState::Running => sys::VFIO_DEVICE_STATE_RUNNING,
            MigState::StopCopy => sys::VFIO_DEVICE_STATE_STOP_COPY,
            MigState::Resuming => sys::VFIO_DEVICE_STATE_RESUMING,
            MigState::RunningP2p => sys::VFIO_DEVICE_STATE_RUNNING_P2P,
            MigState::PreCopy => sys::VFIO_DEVICE_STATE_PRE_COPY,
            MigState::PreCopyP2p => sys::VFIO_DEVICE_STATE_PRE_COPY_P2P,
        }
    }

    /// The state with kernel value `raw`, if this crate knows it.
    pub fn from_raw(raw: u32) -> Option<MigState> {
        MigState::ALL.into_iter().find(|s| s.raw() == raw)
    }

    /// The uAPI's name (`RUNNING_P2P`).
    pub const fn name(self) -> &'static str {
        match self {
            MigState::Error => "ERROR",
            MigState::Stop => "STOP",
            MigState::Running => "RUNNING",
            MigState::StopCopy => "STOP_COPY",
            MigState::Resuming => "RESUMING",
            MigState::RunningP2p => "RUNNING_P2P",
            MigState::PreCopy => "PRE_COPY",
            MigState::PreCopyP2p => "PRE_COPY_P2P",
        }
    }

    /// The flags a device needs for this state to exist (all flags for `ERROR`, which is never
    /// requested).
    pub fn required_flags(self) -> MigrationFlags {
        match self {
            MigState::Error => MigrationFlags::all(),
            MigState::Stop | MigState::Running | MigState::StopCopy | MigState::Resuming => {
                MigrationFlags::STOP_COPY
            }
            MigState::RunningP2p => MigrationFlags::STOP_COPY | MigrationFlags::P2P,
            MigState::PreCopy => MigrationFlags::STOP_COPY | MigrationFlags::PRE_COPY,
            MigState::PreCopyP2p => MigrationFlags::all(),
        }
    }

    /// True if a device with `flags` has this state (never for `ERROR`, which cannot be requested).
    pub fn is_supported_by(self, flags: MigrationFlags) -> bool {
        self != MigState::Error && flags.contains(self.required_flags())
    }

    /// True for the saving group (`PRE_COPY`, `PRE_COPY_P2P`, `STOP_COPY`), whose states share one
    /// saving session.
    pub const fn is_saving(self) -> bool {
        matches!(self, MigState::PreCopy | MigState::PreCopyP2p | MigState::StopCopy)
    }

    /// True if a driver with `flags` implements the single arc `self -> to` (the uAPI's list).
    pub fn has_arc(self, to: MigState, flags: MigrationFlags) -> bool {
        use MigState::*;
        if !self.is_supported_by(flags) || !to.is_supported_by(flags) {
            return false;
        }
        let p2p = flags.contains(MigrationFlags::P2P);
        match (self, to) {
            // The base machine.
            (Stop, Resuming) | (Resuming, Stop) | (Stop, StopCopy) | (StopCopy, Stop) => true,
            // Without P2P, RUNNING and STOP are one arc apart; with it, RUNNING_P2P is between them.
            (Running, Stop) | (Stop, Running) => !p2p,
            (Running, RunningP2p) | (RunningP2p, Running) | (RunningP2p, Stop) | (Stop, RunningP2p) => true,
            // Pre-copy.
            (Running, PreCopy) | (PreCopy, Running) => true,
            (PreCopy, StopCopy) => !p2p,
            (PreCopy, PreCopyP2p)
            | (PreCopyP2p, PreCopy)
            | (PreCopyP2p, RunningP2p)
            | (PreCopyP2p, StopCopy)
            | (RunningP2p, PreCopyP2p) => true,
            _ => false,
        }
    }

    /// The states a device with `flags` passes through from `from` to `to`, `to` included (empty
    /// when they are equal): the path the kernel takes for a combination transition, the shortest
    /// chain of single arcs with no saving-group state inside it (a path that stays inside the saving
    /// group, such as `PRE_COPY -> PRE_COPY_P2P -> STOP_COPY`, keeps its session and is allowed).
    ///
    /// Refused ([`Error::InvalidArgument`]): `ERROR` as either end and `STOP_COPY` to a pre-copy
    /// state. A target `flags` lack gives [`Error::NotCapable`]; a `from` they lack gives
    /// [`Error::Protocol`] (for [`BoundDevice::set_migration_state`] it is the kernel's answer).
    pub fn path(from: MigState, to: MigState, flags: MigrationFlags) -> Result<Vec<MigState>> {
        const OP: &str = "VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE";
        if !flags.contains(MigrationFlags::STOP_COPY) {
            return Err(Error::NotCapable {
                op: OP,
                reason: format!("migration flags {flags:?} lack STOP_COPY, which every migration driver has"),
            });
        }
        if to == MigState::Error {
            return Err(Error::invalid(OP, "ERROR cannot be requested (only a failed transition enters it)"));
        }
        if from == MigState::Error {
            return Err(Error::invalid(
                OP,
                format!(
                    "the device is in ERROR and cannot go to {to}: only a reset (BoundDevice::reset) leaves it"
                ),
            ));
        }
        if !from.is_supported_by(flags) {
            return Err(Error::Protocol {
                op: OP,
                detail: format!(
                    "the device reports state {from}, which its migration flags {flags:?} exclude"
                ),
            });
        }
        if !to.is_supported_by(flags) {
            return Err(Error::NotCapable {
                op: OP,
                reason: format!(
                    "{to} needs migration flags {:?}; the device has {flags:?}",
                    to.required_flags()
                ),
            });
        }
        if from == MigState::StopCopy && matches!(to, MigState::PreCopy | MigState::PreCopyP2p) {
            return Err(Error::invalid(
                OP,
                format!("{from} -> {to} is not permitted: a saving session cannot return to pre-copy"),
            ));
        }
        if from == to {
            return Ok(Vec::new());
        }
        // Inside the saving group the session carries over, so a path may stay inside it; otherwise
        // saving-group states are only ever end points (the session starts or ends with the path).
        let inside = (from.is_saving() && to.is_saving())
            .then(|| shortest_path(from, to, flags, MigState::is_saving))
            .flatten();
        let outside = shortest_path(from, to, flags, |s| !s.is_saving());
        match (inside, outside) {
            (Some(a), Some(b)) => Ok(if b.len() < a.len() { b } else { a }),
            (Some(p), None) | (None, Some(p)) => Ok(p),
            (None, None) => Err(Error::invalid(
                OP,
                format!("{to} is not reachable from {from} with migration flags {flags:?}"),
            )),
        }
    }

    /// The session the last arc `prev -> to` of a transition opens, if any.
    fn opens_session(prev: MigState, to: MigState) -> Option<DataDirection> {
        if to == MigState::Resuming {
            Some(DataDirection::Resume)
        } else if to.is_saving() && !prev.is_saving() {
            Some(DataDirection::Save)
        } else {
            None
        }
    }
}

/// The shortest chain of arcs from `from` to `to` (`to` included) whose interior states all satisfy
/// `interior`, found breadth first.
fn shortest_path(
    from: MigState,
    to: MigState,
    flags: MigrationFlags,
    interior: fn(MigState) -> bool,
) -> Option<Vec<MigState>> {
    let mut parent: [Option<MigState>; 8] = [None; 8];
    let mut queue = std::collections::VecDeque::from([from]);
    while let Some(state) = queue.pop_front() {
        for next in MigState::ALL {
            if next == from || parent[next as usize].is_some() || !state.has_arc(next, flags) {
                continue;
            }
            parent[next as usize] = Some(state);
            if next == to {
                let mut path = vec![to];
                let mut at = state;
                while at != from {
                    path.push(at);
                    at = parent[at as usize]?;
                }
                path.reverse();
                return Some(path);
            }
            if interior(next) {
                queue.push_back(next);
            }
        }
    }
    None
}

/// Per-device migration bookkeeping, shared by the device's clones.
#[derive(Debug, Default)]
pub(crate) struct MigrationShared {
    /// Held from reading the current state through the transition ioctl.
    lock: Mutex<()>,
    /// The driver's flags, which never change while the device exists.
    flags: OnceLock<MigrationFlags>,
}

impl MigrationShared {
    fn lock(&self) -> MutexGuard<'_, ()> {
        self.lock.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The hint attached to a failed transition.
const TRANSITION_FAILED: &str = "the device may be in any state along the path, or in ERROR: read \
    migration_state(); reset() returns it to RUNNING";

fn get_state(fd: BorrowedFd<'_>) -> Result<MigState> {
    let feature = DeviceFeature::MIG_DEVICE_STATE;
    let data = sys::vfio_device_feature_mig_state { device_state: 0, data_fd: -1 };
    // SAFETY: MIG_DEVICE_STATE with GET takes `vfio_device_feature_mig_state`, which holds no
    // pointers; the kernel writes the state back into it and opens no fd.
    let (_, data) = unsafe { feature_call(fd, feature, sys::VFIO_DEVICE_FEATURE_GET, data) }?;
    MigState::from_raw(data.device_state).ok_or_else(|| Error::Protocol {
        op: feature.name(),
        detail: format!("unknown migration state {}", data.device_state),
    })
}

impl BoundDevice {
    /// What the device's migration driver implements (`VFIO_DEVICE_FEATURE_MIGRATION` with GET, Linux
    /// 5.18). A device without migration support answers `ENOTTY` (vfio-pci itself has none: a variant
    /// driver or a mediated driver provides it). Read once and remembered.
    pub fn migration_flags(&self) -> Result<MigrationFlags> {
        if let Some(flags) = self.inner.migration.flags.get() {
            return Ok(*flags);
        }
        let data = sys::vfio_device_feature_migration::default();
        // SAFETY: MIGRATION with GET takes `vfio_device_feature_migration` (one u64), no pointers.
        let (_, data) = unsafe {
            feature_call(self.as_fd(), DeviceFeature::MIGRATION, sys::VFIO_DEVICE_FEATURE_GET, data)
        }?;
        let flags = MigrationFlags::from_bits_retain(data.flags);
        Ok(*self.inner.migration.flags.get_or_init(|| flags))
    }

    /// The device's current migration state, read from the kernel (`VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE`
    /// with GET, Linux 5.18).
    pub fn migration_state(&self) -> Result<MigState> {
        get_state(self.as_fd())
    }

    /// The states a transition to `target` would pass through now ([`MigState::path`] from the current
    /// state, with the device's flags); the same checks as
    /// [`set_migration_state`](Self::set_migration_state), without changing anything.
    pub fn migration_path(&self, target: MigState) -> Result<Vec<MigState>> {
        let flags = self.migration_flags()?;
        MigState::path(self.migration_state()?, target, flags)
    }

    /// Moves the device to `target` (`VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE` with SET, Linux 5.18),
    /// through as many arcs as the state machine needs (see [`MigState::path`]).
    ///
    /// The current state is read from the kernel first and the transition checked against the
    /// device's flags; a refused one issues no transition ioctl (see the module documentation). When
    /// the last arc starts a data session the session's [`MigrationData`] is returned: a saving one
    /// when entering `PRE_COPY`, `PRE_COPY_P2P` or `STOP_COPY` from outside the saving group, a
    /// resuming one when entering `RESUMING`. Otherwise `None`, and `None` with no ioctl at all when
    /// the device is already in `target`.
    ///
    /// If the driver fails the transition, the device may have stopped at any state along the path,
    /// or in `ERROR`: [`migration_state`](Self::migration_state) tells which.
    pub fn set_migration_state(&self, target: MigState) -> Result<Option<MigrationData>> {
        let feature = DeviceFeature::MIG_DEVICE_STATE;
        let op = feature.name();
        self.check_process(op)?;
        let flags = self.migration_flags()?;
        let _serial = self.inner.migration.lock();
        let current = get_state(self.as_fd())?;
        let path = MigState::path(current, target, flags)?;
        let Some(&last) = path.last() else {
            return Ok(None);
        };
        let prev = path.len().checked_sub(2).map_or(current, |i| path[i]);
        let session = MigState::opens_session(prev, last);
        let data = sys::vfio_device_feature_mig_state { device_state: target.raw(), data_fd: -1 };
        // SAFETY: MIG_DEVICE_STATE with SET takes `vfio_device_feature_mig_state`, which holds no
        // pointers; on success the kernel stores a new fd (or -1) in `data_fd`, adopted below.
        let r = unsafe { feature_call(self.as_fd(), feature, sys::VFIO_DEVICE_FEATURE_SET, data) };
        let data = match r {
            Ok((_, data)) => data,
            Err(Error::Ioctl { op, errno, hint: None }) if errno != Errno::NOTTY => {
                return Err(Error::Ioctl { op, errno, hint: Some(TRANSITION_FAILED) });
            }
            Err(e) => return Err(e),
        };
        let fd = (data.data_fd >= 0).then(|| {
            // SAFETY: a successful SET stores in `data_fd` either -1 or a new fd installed in this
            // process's table for the caller, owned by nothing else.
            unsafe { OwnedFd::from_raw_fd(data.data_fd) }
        });
        match (session, fd) {
            (Some(direction), Some(fd)) => {
                Ok(Some(MigrationData { fd, direction, iommufd: Some(self.iommufd().clone()) }))
            }
            (None, None) => Ok(None),
            (Some(_), None) => Err(Error::Protocol {
                op,
                detail: format!("{prev} -> {last} starts a data session, but the driver returned no fd"),
            }),
            // The fd is closed on the way out.
            (None, Some(_)) => Err(Error::Protocol {
                op,
                detail: format!(
                    "the driver returned a data fd for {prev} -> {last}, which starts no session"
                ),
            }),
        }
    }

    /// The driver's estimate of the data the `STOP_COPY` state will stream, in bytes
    /// (`VFIO_DEVICE_FEATURE_MIG_DATA_SIZE`, Linux 6.2).
    pub fn stop_copy_size(&self) -> Result<u64> {
        let data = sys::vfio_device_feature_mig_data_size::default();
        // SAFETY: MIG_DATA_SIZE with GET takes `vfio_device_feature_mig_data_size` (one u64), no pointers.
        let (_, data) = unsafe {
            feature_call(self.as_fd(), DeviceFeature::MIG_DATA_SIZE, sys::VFIO_DEVICE_FEATURE_GET, data)
        }?;
        Ok(data.stop_copy_length)
    }

    /// Opts in to version 2 of the pre-copy query (`VFIO_DEVICE_FEATURE_MIG_PRECOPY_INFOv2`, after
    /// Linux 6.19): from then on [`PrecopyInfo::reinit`] is reported. Needs
    /// [`MigrationFlags::PRE_COPY`] ([`Error::NotCapable`] otherwise, checked first).
    ///
    /// A kernel the probe dates before 6.19 lacks the feature: that is [`Error::Unsupported`]
    /// (`since` 7.0, the first release after 6.19; errno `ENOTTY`, the older kernel's answer), before
    /// any ioctl, rather than `ENOTTY` blaming the driver.
    pub fn enable_precopy_info_v2(&self) -> Result<()> {
        let feature = DeviceFeature::MIG_PRECOPY_INFO_V2;
        self.check_process(feature.name())?;
        let flags = self.migration_flags()?;
        if !flags.contains(MigrationFlags::PRE_COPY) {
            return Err(Error::NotCapable {
                op: feature.name(),
                reason: format!("the driver has no pre-copy (migration flags {flags:?})"),
            });
        }
        if self.iommufd().capabilities()?.predates("6.19") {
            return Err(Error::unsupported(feature.name(), "7.0", Errno::NOTTY));
        }
        // SAFETY: MIG_PRECOPY_INFOv2 with SET carries no payload; `()` adds none.
        unsafe { feature_call(self.as_fd(), feature, sys::VFIO_DEVICE_FEATURE_SET, ()) }.map(drop)
    }
}

/// Which way a migration data session carries the device state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DataDirection {
    /// A saving session (pre-copy or stop-copy): read-only.
    Save,
    /// A resuming session: write-only.
    Resume,
}

/// The driver's estimate of the data still to send in the pre-copy phase of a migration
/// ([`MigrationData::precopy_info`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct PrecopyInfo {
    /// Bytes of initial state not yet read.
    pub initial_bytes: u64,
    /// Bytes of state changed since it was read.
    pub dirty_bytes: u64,
    /// New initial data is on the stream (`VFIO_PRECOPY_INFO_REINIT`); reported only after
    /// [`BoundDevice::enable_precopy_info_v2`], `false` before.
    pub reinit: bool,
}

/// A migration data session's fd, returned by [`BoundDevice::set_migration_state`]: a saving session
/// implements [`Read`] (the device state, an opaque byte stream to send as is), a resuming one
/// [`Write`] (the stream from a compatible device). Using it the other way gives
/// [`io::ErrorKind::Unsupported`] without a system call.
///
/// Like every handle, it acts only in the process that opened its device's iommufd: in a `fork()`ed
/// child, reads and writes fail ([`Error::ForeignProcess`], as an [`io::Error`] of kind `Other`).
///
/// In `STOP_COPY` a read of 0 bytes is the end of the state. In a pre-copy state the stream has
/// temporary ends: the uAPI has the driver answer `ENOMSG` (some drivers return 0 instead) until more
/// data appears; [`read_available`](Self::read_available) reads up to such an end.
#[derive(Debug)]
pub struct MigrationData {
    fd: OwnedFd,
    direction: DataDirection,
    /// The device's iommufd, whose process alone uses the session (`None` only in unit tests).
    iommufd: Option<crate::Iommufd>,
}

impl MigrationData {
    /// Whether this is a saving or a resuming session.
    pub fn direction(&self) -> DataDirection {
        self.direction
    }

    /// The driver's pre-copy estimate (`VFIO_MIG_GET_PRECOPY_INFO`, Linux 6.2). Drivers answer it
    /// only while the device is in `PRE_COPY` or `PRE_COPY_P2P` (`EINVAL` in other states); a resuming
    /// session gives [`Error::InvalidArgument`] before any ioctl.
    pub fn precopy_info(&self) -> Result<PrecopyInfo> {
        self.check_process(ioctl::MIG_GET_PRECOPY_INFO.name)?;
        if self.direction != DataDirection::Save {
            return Err(Error::invalid(
                ioctl::MIG_GET_PRECOPY_INFO.name,
                "a resuming session has no pre-copy estimate (it belongs to saving sessions)",
            ));
        }
        // SAFETY: the fd is a VFIO migration data fd: it was returned by MIG_DEVICE_STATE and is
        // owned by this value.
        unsafe { precopy_ioctl(self.fd.as_fd()) }
    }

    /// Reads what the saving session has now, appending it to `out`, until the end of the stream or
    /// a temporary end (`ENOMSG`); returns the number of bytes appended. In `STOP_COPY` this reads the
    /// rest of the device state.
    pub fn read_available(&mut self, out: &mut Vec<u8>) -> Result<usize> {
        const OP: &str = "read(migration data)";
        self.check_process(OP)?;
        if self.direction != DataDirection::Save {
            return Err(Error::invalid(OP, "a resuming session is write-only"));
        }
        const CHUNK: usize = 64 * 1024;
        let start = out.len();
        // Read straight into `out`, grown by a chunk at a time and cut back to what arrived.
        loop {
            let filled = out.len();
            out.resize(filled + CHUNK, 0);
            let r = rustix::io::read(&self.fd, &mut out[filled..]);
            out.truncate(filled + *r.as_ref().unwrap_or(&0));
            match r {
                Ok(0) | Err(Errno::NOMSG) => return Ok(out.len() - start),
                Ok(_) | Err(Errno::INTR) => {}
                Err(e) => return Err(Error::os(OP, e)),
            }
        }
    }

    /// Refuses, in a `fork()`ed child, a call that would consume or feed the parent's session.
    fn check_process(&self, op: &'static str) -> Result<()> {
        self.iommufd.as_ref().map_or(Ok(()), |fd| fd.check_process(op))
    }

    fn check(&self, want: DataDirection) -> io::Result<()> {
        if let Err(e) = self.check_process("migration data") {
            return Err(io::Error::other(e));
        }
        if self.direction == want {
            Ok(())
        } else {
            let what = match self.direction {
                DataDirection::Save => "a saving migration session is read-only",
                DataDirection::Resume => "a resuming migration session is write-only",
            };
            Err(io::Error::new(io::ErrorKind::Unsupported, what))
        }
    }
}

impl Read for &MigrationData {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.check(DataDirection::Save)?;
        Ok(rustix::io::read(&self.fd, buf)?)
    }
}

impl Read for MigrationData {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        (&*self).read(buf)
    }
}

impl Write for &MigrationData {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.check(DataDirection::Resume)?;
        Ok(rustix::io::write(&self.fd, buf)?)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Write for MigrationData {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        (&*self).write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl AsFd for MigrationData {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl AsRawFd for MigrationData {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

impl From<MigrationData> for OwnedFd {
    fn from(data: MigrationData) -> OwnedFd {
        data.fd
    }
}

/// `VFIO_MIG_GET_PRECOPY_INFO` on `fd`.
///
/// # Safety
///
/// `fd` must be a VFIO migration data fd or a VFIO device cdev (see [`precopy_info`]).
unsafe fn precopy_ioctl(fd: BorrowedFd<'_>) -> Result<PrecopyInfo> {
    let mut arg = sys::vfio_precopy_info::new();
    // SAFETY: on a VFIO migration fd, VFIO_MIG_GET_PRECOPY_INFO takes `vfio_precopy_info`, sized by
    // `new()`, with no pointers; a device cdev does not define the number (ENOTTY, nothing touched).
    // The caller guarantees the fd is one of the two.
    unsafe { ioctl::call(fd, &ioctl::MIG_GET_PRECOPY_INFO, &mut arg) }?;
    Ok(PrecopyInfo {
        initial_bytes: arg.initial_bytes,
        dirty_bytes: arg.dirty_bytes,
        reinit: arg.flags & sys::VFIO_PRECOPY_INFO_REINIT != 0,
    })
}

/// Queries a migration data fd obtained some other way (for example passed by another process) for
/// the pre-copy estimate (`VFIO_MIG_GET_PRECOPY_INFO`, Linux 6.2). Prefer
/// [`MigrationData::precopy_info`], which is safe.
///
/// # Safety
///
/// `migration_fd` must be a VFIO migration data fd or a VFIO device cdev: ioctl numbers are unique
/// only per file type, and another driver could read or write this argument as something larger.
pub unsafe fn precopy_info(migration_fd: impl AsFd) -> Result<PrecopyInfo> {
    // SAFETY: forwarded from this function's contract.
    unsafe { precopy_ioctl(migration_fd.as_fd()) }
}

#[cfg(test)]
mod tests {
    use super::MigState::{PreCopy, PreCopyP2p, Resuming, Running, RunningP2p, Stop, StopCopy};
    use super::*;

    const FULL: MigrationFlags = MigrationFlags::all();

    fn flag_sets() -> impl Iterator<Item = MigrationFlags> {
        (0..8u64).map(MigrationFlags::from_bits_truncate)
    }

    #[test]
    fn raw_values_round_trip() {
        for s in MigState::ALL {
            assert_eq!(MigState::from_raw(s.raw()), Some(s));
            assert_eq!(s as u32, s.raw(), "the enum's order is the kernel's numbering");
        }
        assert_eq!(MigState::from_raw(8), None);
        assert_eq!(MigState::from_raw(u32::MAX), None);
    }

    /// The combination transitions the uAPI documents for a driver with every flag.
    #[test]
    fn documented_combination_paths() {
        let cases: &[(MigState, &[MigState])] = &[
            (PreCopy, &[PreCopyP2p, StopCopy]),
            (PreCopy, &[Running, RunningP2p]),
            (PreCopy, &[Running, RunningP2p, Stop]),
            (PreCopy, &[Running, RunningP2p, Stop, Resuming]),
            (PreCopyP2p, &[RunningP2p, Running]),
            (PreCopyP2p, &[RunningP2p, Stop]),
            (PreCopyP2p, &[RunningP2p, Stop, Resuming]),
            (Resuming, &[Stop, RunningP2p]),
            (Resuming, &[Stop, RunningP2p, PreCopyP2p]),
            (Resuming, &[Stop, RunningP2p, Running]),
            (Resuming, &[Stop, RunningP2p, Running, PreCopy]),
            (Resuming, &[Stop, StopCopy]),
            (Running, &[RunningP2p, PreCopyP2p]),
            (Running, &[RunningP2p, Stop]),
            (Running, &[RunningP2p, Stop, Resuming]),
            (Running, &[RunningP2p, Stop, StopCopy]),
            (RunningP2p, &[Running, PreCopy]),
            (RunningP2p, &[Stop, Resuming]),
            (RunningP2p, &[Stop, StopCopy]),
            (Stop, &[RunningP2p, PreCopyP2p]),
            (Stop, &[RunningP2p, Running]),
            (Stop, &[RunningP2p, Running, PreCopy]),
            (StopCopy, &[Stop, Resuming]),
            (StopCopy, &[Stop, RunningP2p]),
            (StopCopy, &[Stop, RunningP2p, Running]),
        ];
        for (from, path) in cases {
            let to = *path.last().unwrap();
            assert_eq!(MigState::path(*from, to, FULL).unwrap(), *path, "{from} -> {to}");
        }
    }

    #[test]
    fn paths_without_optional_states() {
        let base = MigrationFlags::STOP_COPY;
        assert_eq!(MigState::path(Running, StopCopy, base).unwrap(), [Stop, StopCopy]);
        assert_eq!(MigState::path(Resuming, Running, base).unwrap(), [Stop, Running]);
        let pre = MigrationFlags::STOP_COPY | MigrationFlags::PRE_COPY;
        assert_eq!(MigState::path(PreCopy, StopCopy, pre).unwrap(), [StopCopy]);
        assert_eq!(MigState::path(PreCopy, Stop, pre).unwrap(), [Running, Stop]);
        assert_eq!(MigState::path(Stop, PreCopy, pre).unwrap(), [Running, PreCopy]);
        let p2p = MigrationFlags::STOP_COPY | MigrationFlags::P2P;
        assert_eq!(MigState::path(Running, Stop, p2p).unwrap(), [RunningP2p, Stop]);
    }

    #[test]
    fn refused_transitions() {
        for to in [PreCopy, PreCopyP2p] {
            let e = MigState::path(StopCopy, to, FULL).unwrap_err();
            assert!(
                matches!(e, Error::InvalidArgument { .. }) && e.to_string().contains("not permitted"),
                "{e}"
            );
        }
        let e = MigState::path(Running, MigState::Error, FULL).unwrap_err();
        assert!(matches!(e, Error::InvalidArgument { .. }), "{e}");
        let e = MigState::path(MigState::Error, Running, FULL).unwrap_err();
        assert!(e.to_string().contains("reset"), "{e}");
        let base = MigrationFlags::STOP_COPY;
        for to in [RunningP2p, PreCopy, PreCopyP2p] {
            let e = MigState::path(Running, to, base).unwrap_err();
            assert!(matches!(e, Error::NotCapable { .. }), "{e}");
        }
        let e = MigState::path(RunningP2p, Running, base).unwrap_err();
        assert!(matches!(e, Error::Protocol { .. }), "{e}");
        let e = MigState::path(Running, Stop, MigrationFlags::P2P).unwrap_err();
        assert!(matches!(e, Error::NotCapable { .. }), "{e}");
        assert_eq!(MigState::path(Stop, Stop, base).unwrap(), []);
    }

    /// True if `path` (from its start) keeps to the uAPI's rule: saving-group states only at its
    /// ends, unless it runs entirely inside the saving group.
    fn valid_interior(path: &[MigState]) -> bool {
        path.iter().all(|s| s.is_saving()) || path[1..path.len() - 1].iter().all(|s| !s.is_saving())
    }

    /// Counts the shortest valid paths from `from` to `to`, and gives their length.
    fn count_shortest(from: MigState, to: MigState, flags: MigrationFlags) -> (usize, usize) {
        let mut frontier = vec![vec![from]];
        for len in 1..=8 {
            let mut next = Vec::new();
            for p in &frontier {
                let last = *p.last().unwrap();
                for s in MigState::ALL {
                    if last.has_arc(s, flags) && !p.contains(&s) {
                        let mut q = p.clone();
                        q.push(s);
                        next.push(q);
                    }
                }
            }
            let n = next.iter().filter(|p| *p.last().unwrap() == to && valid_interior(p)).count();
            if n > 0 {
                return (len, n);
            }
            frontier = next;
        }
        (0, 0)
    }

    /// For every flag set and pair of states: a path is either refused or the unique shortest chain
    /// of arcs ending at the target, with no saving state inside unless it stays in the saving group.
    #[test]
    fn every_path_is_the_unique_shortest_chain_of_arcs() {
        for flags in flag_sets() {
            for from in MigState::ALL {
                for to in MigState::ALL {
                    let Ok(path) = MigState::path(from, to, flags) else {
                        continue;
                    };
                    assert!(from.is_supported_by(flags) && to.is_supported_by(flags));
                    if from == to {
                        assert!(path.is_empty());
                        continue;
                    }
                    assert_eq!(path.last(), Some(&to));
                    let mut at = from;
                    for &s in &path {
                        assert!(at.has_arc(s, flags), "{flags:?}: {at} -> {s} is no arc");
                        at = s;
                    }
                    let full: Vec<MigState> = std::iter::once(from).chain(path.iter().copied()).collect();
                    assert!(valid_interior(&full), "{flags:?}: {from} -> {to} via {path:?}");
                    assert_eq!(count_shortest(from, to, flags), (path.len(), 1), "{flags:?}: {from} -> {to}");
                }
            }
        }
    }

    #[test]
    fn every_supported_pair_is_reachable_except_the_forbidden_ones() {
        for flags in flag_sets().filter(|f| f.contains(MigrationFlags::STOP_COPY)) {
            for from in MigState::ALL.into_iter().filter(|s| s.is_supported_by(flags)) {
                for to in MigState::ALL.into_iter().filter(|s| s.is_supported_by(flags)) {
                    let forbidden = from == StopCopy && matches!(to, PreCopy | PreCopyP2p);
                    assert_eq!(
                        MigState::path(from, to, flags).is_ok(),
                        !forbidden,
                        "{flags:?}: {from} -> {to}"
                    );
                }
            }
        }
    }

    #[test]
    fn sessions_open_on_entering_the_saving_group_or_resuming() {
        assert_eq!(MigState::opens_session(Running, PreCopy), Some(DataDirection::Save));
        assert_eq!(MigState::opens_session(RunningP2p, PreCopyP2p), Some(DataDirection::Save));
        assert_eq!(MigState::opens_session(Stop, StopCopy), Some(DataDirection::Save));
        assert_eq!(MigState::opens_session(PreCopyP2p, StopCopy), None);
        assert_eq!(MigState::opens_session(PreCopy, StopCopy), None);
        assert_eq!(MigState::opens_session(PreCopy, PreCopyP2p), None);
        assert_eq!(MigState::opens_session(Stop, Resuming), Some(DataDirection::Resume));
        assert_eq!(MigState::opens_session(Resuming, Stop), None);
        assert_eq!(MigState::opens_session(StopCopy, Stop), None);
    }

    #[test]
    fn a_session_is_used_only_its_way() {
        let (r, w) = rustix::pipe::pipe().unwrap();
        let mut save = MigrationData { fd: r, direction: DataDirection::Save, iommufd: None };
        let mut resume = MigrationData { fd: w, direction: DataDirection::Resume, iommufd: None };
        assert_eq!(save.write(b"x").unwrap_err().kind(), io::ErrorKind::Unsupported);
        assert_eq!(resume.read(&mut [0]).unwrap_err().kind(), io::ErrorKind::Unsupported);
        assert!(matches!(resume.precopy_info(), Err(Error::InvalidArgument { .. })));
        assert!(matches!(resume.read_available(&mut Vec::new()), Err(Error::InvalidArgument { .. })));
        resume.write_all(b"state").unwrap();
        drop(resume);
        let mut got = Vec::new();
        assert_eq!(save.read_available(&mut got).unwrap(), 5);
        assert_eq!(got, b"state");
    }
}
