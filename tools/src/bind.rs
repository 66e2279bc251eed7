//! Binding PCI devices to `vfio-pci` and restoring their original drivers.
//!
//! [`plan`] checks a request without touching anything and refuses it (unless
//! [`force`](BindOptions::force)d) when a device:
//! - shares its IOMMU group with a device bound to another driver (VFIO needs the whole group: such a
//!   sibling makes the group unusable, or would be taken away from its driver by a later bind);
//! - backs a mounted filesystem or active swap (found from `/proc/self/mountinfo` and `/proc/swaps`
//!   through `/sys/dev/block` and the block device's sysfs ancestry, following device-mapper and md
//!   `slaves/`);
//! - carries a network interface that has IPv4 or IPv6 routes (`/sys/class/net/*/device` and
//!   `/proc/net/route`, `/proc/net/ipv6_route`, following bridges and bonds on top of it).
//!
//! [`bind`] records each device's original driver and `driver_override` in a [`StateFile`] *before*
//! touching it, then writes `vfio-pci` to `driver_override`, unbinds the device from its driver and
//! asks the PCI core to probe it (`drivers_probe`). If `vfio-pci` is not loaded nothing is touched; if
//! it does not take a device, that device goes back to its driver, the devices bound before it in the
//! same call are restored, and the error says so. [`Bound::restore`] (and [`restore`], from a state
//! file, for `vfio-bind --restore`) clears the override (or puts the original one back), unbinds the
//! device from vfio-pci and binds it to its original driver.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::sysfs::link_name;
use crate::{Bdf, Error, Host, Result};

/// The driver the tools bind devices to.
pub const VFIO_PCI: &str = "vfio-pci";

/// Drivers that may share an IOMMU group with a VFIO device (the kernel lets VFIO use a group whose
/// other devices are driverless, on a VFIO driver, or on one of these, which do no DMA of their own).
const GROUP_SAFE_DRIVERS: &[&str] = &["pci-stub", "pcieport"];

/// How cautious [`plan`] is.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BindOptions {
    /// Turn the safeguards' refusals into warnings.
    pub force: bool,
}

/// One device's state before the bind: what [`Bound::restore`] and [`restore`] put back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// The device.
    pub address: Bdf,
    /// Its driver before the bind (`None`: it had none).
    pub driver: Option<String>,
    /// Its `driver_override` before the bind.
    pub driver_override: Option<String>,
}

/// What [`bind`] would do, from [`plan`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// The devices to rebind, with their current state.
    pub rebind: Vec<Record>,
    /// The devices already on vfio-pci (left alone).
    pub already_bound: Vec<Bdf>,
    /// Refusals overridden by [`BindOptions::force`].
    pub warnings: Vec<String>,
}

impl Plan {
    /// What binding would do, one line a device (the `--dry-run` output).
    pub fn describe(&self) -> String {
        let mut out = String::new();
        for w in &self.warnings {
            out.push_str(&format!("warning (forced): {w}\n"));
        }
        for a in &self.already_bound {
            out.push_str(&format!("{a}: already on {VFIO_PCI}, left as it is\n"));
        }
        for r in &self.rebind {
            let from = r.driver.as_deref().map(|d| format!("unbind from {d}, ")).unwrap_or_default();
            out.push_str(&format!(
                "{}: {} -> {VFIO_PCI}: write {VFIO_PCI} to driver_override, {from}write {} to \
                 bus/pci/drivers_probe; restore puts back driver {} and driver_override {}\n",
                r.address,
                r.driver.as_deref().unwrap_or("no driver"),
                r.address,
                r.driver.as_deref().unwrap_or("(none)"),
                r.driver_override.as_deref().unwrap_or("(none)"),
            ));
        }
        out
    }
}

/// Checks the request and returns what binding would change; touches nothing.
///
/// Errors: [`Error::Invalid`] for a device that does not exist or has no IOMMU group,
/// [`Error::Failed`] if `vfio-pci` is not loaded (so nothing would bind), and [`Error::Refused`] with
/// every safeguard that objects (see the [module documentation](self)) unless `options.force`.
pub fn plan(host: &Host, devices: &[Bdf], options: BindOptions) -> Result<Plan> {
    let mut wanted: Vec<Bdf> = devices.to_vec();
    wanted.sort_unstable();
    wanted.dedup();
    if wanted.is_empty() {
        return Err(Error::Invalid("no device given".into()));
    }
    let mut plan = Plan { rebind: Vec::new(), already_bound: Vec::new(), warnings: Vec::new() };
    let mut refusals = Vec::new();
    let usage = Usage::scan(host)?;
    for &address in &wanted {
        let dev = host.pci_device(address)?;
        let group = dev.group.ok_or_else(|| {
            Error::Invalid(format!(
                "{address} has no IOMMU group: the IOMMU is off or does not cover it, and vfio-pci cannot \
                 take it"
            ))
        })?;
        for member in host.group(group)?.devices {
            let sibling = member.name.parse::<Bdf>().ok();
            if sibling.is_some_and(|s| wanted.contains(&s)) {
                continue;
            }
            match member.driver.as_deref() {
                None => {}
                Some(d) if d.starts_with("vfio") || GROUP_SAFE_DRIVERS.contains(&d) => {}
                Some(d) => refusals.push(format!(
                    "{address} shares IOMMU group {group} with {} (bound to {d}): VFIO needs every device \
                     of the group driverless or on vfio-pci; name it too to bind it as well",
                    member.name
                )),
            }
        }
        refusals.extend(usage.uses_of(host, address)?);
        if dev.driver.as_deref() == Some(VFIO_PCI) {
            plan.already_bound.push(address);
        } else {
            plan.rebind.push(Record { address, driver: dev.driver, driver_override: dev.driver_override });
        }
    }
    if !plan.rebind.is_empty() && !host.pci_driver_dir(VFIO_PCI).is_dir() {
        return Err(Error::Failed(format!(
            "{VFIO_PCI} is not loaded ({} is missing): load it with `modprobe vfio-pci`; nothing was changed",
            host.pci_driver_dir(VFIO_PCI).display()
        )));
    }
    if options.force {
        plan.warnings = refusals;
    } else if !refusals.is_empty() {
        return Err(Error::Refused(refusals));
    }
    Ok(plan)
}

/// What the running system uses block and network devices for.
struct Usage {
    /// (what, canonical sysfs path of a block device in use).
    block: Vec<(String, PathBuf)>,
    /// Interfaces with routes.
    routed: Vec<String>,
}

impl Usage {
    fn scan(host: &Host) -> Result<Usage> {
        let mut block = Vec::new();
        let mountinfo = host.proc.join("self/mountinfo");
        let text = fs::read_to_string(&mountinfo).map_err(|e| Error::io("read", &mountinfo, e))?;
        for line in text.lines() {
            // "ID PARENT MAJ:MIN ROOT MOUNTPOINT OPTIONS [TAGS...] - FSTYPE SOURCE SUPEROPTIONS"
            let fields: Vec<&str> = line.split(' ').collect();
            let (Some(majmin), Some(at)) = (fields.get(2), fields.get(4)) else { continue };
            let source = fields.iter().position(|f| *f == "-").and_then(|i| fields.get(i + 2));
            let what = format!("the filesystem mounted at {}", unescape(at));
            for path in block_paths(host, majmin, source.copied()) {
                block.push((what.clone(), path));
            }
        }
        let swaps = host.proc.join("swaps");
        if let Ok(text) = fs::read_to_string(&swaps) {
            for line in text.lines().skip(1) {
                let Some(source) = line.split_whitespace().next() else { continue };
                for path in block_paths(host, "", Some(source)) {
                    block.push((format!("swap on {}", unescape(source)), path));
                }
            }
        }
        let mut routed = Vec::new();
        let route = host.proc.join("net/route");
        if let Ok(text) = fs::read_to_string(&route) {
            routed
                .extend(text.lines().skip(1).filter_map(|l| l.split_whitespace().next()).map(str::to_string));
        }
        let route6 = host.proc.join("net/ipv6_route");
        if let Ok(text) = fs::read_to_string(&route6) {
            routed.extend(text.lines().filter_map(|l| l.split_whitespace().nth(9)).map(str::to_string));
        }
        routed.retain(|i| i != "lo");
        routed.sort();
        routed.dedup();
        Ok(Usage { block, routed })
    }

    /// Why touching `address` would disturb the running system (empty: it would not, as far as
    /// mounts, swap and routes tell).
    fn uses_of(&self, host: &Host, address: Bdf) -> Result<Vec<String>> {
        let dir = host.pci_dir(address);
        let dir = fs::canonicalize(&dir).map_err(|e| Error::io("resolve", &dir, e))?;
        let mut found = Vec::new();
        for (what, path) in &self.block {
            if path.starts_with(&dir) {
                let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("?");
                found.push(format!("{address} backs {what} (block device {name})"));
            }
        }
        let net = host.sys.join("class/net");
        for iface in fs::read_dir(&net).into_iter().flatten().flatten() {
            let Some(name) = iface.file_name().to_str().map(str::to_string) else { continue };
            let Ok(parent) = fs::canonicalize(iface.path().join("device")) else { continue };
            if !parent.starts_with(&dir) {
                continue;
            }
            for carried in upper_interfaces(host, &name) {
                if self.routed.contains(&carried) {
                    let via = if carried == name { String::new() } else { format!(" through {carried}") };
                    found.push(format!("{address} carries network interface {name}, which has routes{via}"));
                }
            }
        }
        found.sort();
        found.dedup();
        Ok(found)
    }
}

/// `/proc/self/mountinfo` and `/proc/swaps` escape space, tab, newline and backslash as octal.
fn unescape(s: &str) -> String {
    let mut out = String::new();
    let mut rest = s;
    while let Some(i) = rest.find('\\') {
        out.push_str(&rest[..i]);
        let code = rest.get(i + 1..i + 4).and_then(|o| u8::from_str_radix(o, 8).ok());
        match code {
            Some(c) => {
                out.push(char::from(c));
                rest = &rest[i + 4..];
            }
            None => {
                out.push('\\');
                rest = &rest[i + 1..];
            }
        }
    }
    out.push_str(rest);
    out
}

/// The canonical sysfs paths of the block device `majmin` or `source` (a `/dev/...` path), and of every
/// block device under it (device-mapper and md `slaves/`, recursively).
fn block_paths(host: &Host, majmin: &str, source: Option<&str>) -> Vec<PathBuf> {
    let mut start = Vec::new();
    if !majmin.is_empty() {
        start.extend(fs::canonicalize(host.sys.join("dev/block").join(majmin)));
    }
    if let Some(rel) = source.and_then(|s| s.strip_prefix("/dev/")) {
        // `/dev/mapper/root` is a symlink to `../dm-0`: the kernel name is the target's file name.
        let name = fs::canonicalize(host.dev.join(unescape(rel)))
            .ok()
            .and_then(|p| p.file_name().map(|n| n.to_owned()))
            .or_else(|| Path::new(rel).file_name().map(|n| n.to_owned()));
        if let Some(name) = name {
            start.extend(fs::canonicalize(host.sys.join("class/block").join(name)));
        }
    }
    let mut all = Vec::new();
    let mut todo: Vec<(PathBuf, usize)> = start.into_iter().map(|p| (p, 0)).collect();
    while let Some((path, depth)) = todo.pop() {
        if all.contains(&path) {
            continue;
        }
        // Stacks of block devices are shallow; the bound only guards against a cycle.
        if depth < 16 {
            for slave in fs::read_dir(path.join("slaves")).into_iter().flatten().flatten() {
                if let Ok(p) = fs::canonicalize(slave.path()) {
                    todo.push((p, depth + 1));
                }
            }
        }
        all.push(path);
    }
    all
}

/// `iface` and the interfaces stacked on it (bridges, bonds, VLANs: `upper_*` links), recursively.
fn upper_interfaces(host: &Host, iface: &str) -> Vec<String> {
    let mut all = vec![iface.to_string()];
    let mut i = 0;
    while i < all.len() && all.len() < 64 {
        let dir = host.sys.join("class/net").join(&all[i]);
        for entry in fs::read_dir(&dir).into_iter().flatten().flatten() {
            let name = entry.file_name();
            let upper = name.to_str().and_then(|n| n.strip_prefix("upper_"));
            if let Some(upper) = upper.filter(|u| !all.iter().any(|a| a == u)) {
                all.push(upper.to_string());
            }
        }
        i += 1;
    }
    all
}

impl Host {
    /// Writes `value` to the sysfs attribute `path`.
    pub(crate) fn write_attr(&self, path: &Path, value: &str) -> Result<()> {
        #[cfg(test)]
        if let Some(fake) = &self.fake {
            return fake.write(self, path, value).map_err(|e| Error::io("write to", path, e));
        }
        fs::write(path, value).map_err(|e| Error::io(format!("write {value:?} to"), path, e))
    }

    fn driver_of(&self, address: Bdf) -> Option<String> {
        link_name(&self.pci_dir(address).join("driver"))
    }

    /// Waits (up to 2 s: probing is synchronous for PCI drivers, this only allows for a kernel that
    /// defers it) until `address` is driven by `want`; returns the driver it has then.
    fn settle(&self, address: Bdf, want: Option<&str>) -> Option<String> {
        let start = Instant::now();
        loop {
            let now = self.driver_of(address);
            if now.as_deref() == want || start.elapsed() > Duration::from_secs(2) {
                return now;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Binds one device (its state already recorded); on failure leaves it as [`restore_one`] can.
fn bind_one(host: &Host, r: &Record) -> Result<()> {
    let dir = host.pci_dir(r.address);
    let address = r.address.to_string();
    host.write_attr(&dir.join("driver_override"), VFIO_PCI)?;
    if host.driver_of(r.address).is_some() {
        host.write_attr(&dir.join("driver/unbind"), &address)?;
    }
    host.write_attr(&host.sys.join("bus/pci/drivers_probe"), &address)?;
    match host.settle(r.address, Some(VFIO_PCI)) {
        Some(d) if d == VFIO_PCI => Ok(()),
        other => Err(Error::Failed(format!(
            "{address}: {VFIO_PCI} did not take it (it is on {}; the kernel log says why)",
            other.as_deref().unwrap_or("no driver")
        ))),
    }
}

/// Puts one device back as `r` records it.
fn restore_one(host: &Host, r: &Record) -> Result<()> {
    let dir = host.pci_dir(r.address);
    let address = r.address.to_string();
    // Writing a newline clears driver_override.
    host.write_attr(&dir.join("driver_override"), r.driver_override.as_deref().unwrap_or("\n"))?;
    let now = host.driver_of(r.address);
    if now == r.driver {
        return Ok(());
    }
    if now.is_some() {
        host.write_attr(&dir.join("driver/unbind"), &address)?;
    }
    if let Some(original) = &r.driver {
        // The original driver by name; if it does not accept the bind (a driver that matches only
        // through its id table may refuse a direct bind), a probe finds it.
        if host.write_attr(&host.pci_driver_dir(original).join("bind"), &address).is_err() {
            host.write_attr(&host.sys.join("bus/pci/drivers_probe"), &address)?;
        }
    }
    match host.settle(r.address, r.driver.as_deref()) {
        now if now == r.driver => Ok(()),
        now => Err(Error::Failed(format!(
            "{address}: restoring {} left it on {}",
            r.driver.as_deref().unwrap_or("no driver"),
            now.as_deref().unwrap_or("no driver")
        ))),
    }
}

/// Restores every record (all are tried); the error lists each one that failed.
fn restore_all(host: &Host, records: &[Record]) -> Result<()> {
    let failures: Vec<String> =
        records.iter().rev().filter_map(|r| restore_one(host, r).err()).map(|e| e.to_string()).collect();
    if failures.is_empty() { Ok(()) } else { Err(Error::Failed(failures.join("; "))) }
}

/// Binds the devices of `plan` to vfio-pci, recording their original state in `state` first.
///
/// If a device cannot be bound, it and the devices bound before it are restored (and their records
/// removed) before the error is returned.
pub fn bind(host: &Host, plan: &Plan, state: &StateFile) -> Result<Bound> {
    let mut done: Vec<Record> = Vec::new();
    for r in &plan.rebind {
        if host.driver_of(r.address) != r.driver {
            let e = Error::Failed(format!("{}: its driver changed since the plan was made", r.address));
            return Err(undo(host, state, &done, e));
        }
        if let Err(e) = state.add(std::slice::from_ref(r)) {
            return Err(undo(host, state, &done, e));
        }
        done.push(r.clone());
        if let Err(e) = bind_one(host, r) {
            return Err(undo(host, state, &done, e));
        }
    }
    Ok(Bound { host: host.clone(), state: state.clone(), records: done, restored: false })
}

/// Binds the devices of `plan` (see [`bind`]), runs `f` while they are bound, and restores them
/// whatever `f` did: it returns, panics (the restore runs while unwinding, then the panic goes on), or
/// the process gets SIGINT, SIGTERM or SIGHUP while `f` runs or the devices are restored. Those three
/// are caught from the bind until the restore is done (by a handler that does nothing; they are not
/// ignored, so a child process `f` starts gets their default action), and put back as they were
/// afterwards. Meant for `f`s that run a child process, as `vfio-bind ... -- COMMAND` and the
/// repository's `hw-test` do: a signal to the process group (Ctrl-C) stops the child, `f` returns and
/// the devices are restored; a signal sent to this process alone does not stop the child (stop the
/// child, or the group, instead), so it cannot cut a restore short either.
///
/// Returns `f`'s result and the restore's; an error binding means `f` never ran.
pub fn while_bound<T>(
    host: &Host,
    plan: &Plan,
    state: &StateFile,
    f: impl FnOnce() -> T,
) -> Result<(T, Result<()>)> {
    let _signals = CaughtSignals::install();
    let bound = bind(host, plan, state)?;
    let value = f();
    Ok((value, bound.restore()))
}

/// SIGINT, SIGTERM and SIGHUP caught by a do-nothing handler until dropped.
struct CaughtSignals {
    previous: [(libc::c_int, libc::sighandler_t); 3],
}

extern "C" fn ignore_signal(_: libc::c_int) {}

impl CaughtSignals {
    fn install() -> CaughtSignals {
        let handler = ignore_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
        let previous = [libc::SIGINT, libc::SIGTERM, libc::SIGHUP].map(|sig| {
            // SAFETY: `ignore_signal` is async-signal-safe (it does nothing), and the disposition of
            // these signals is this process's alone; the previous one is put back on drop.
            (sig, unsafe { libc::signal(sig, handler) })
        });
        CaughtSignals { previous }
    }
}

impl Drop for CaughtSignals {
    fn drop(&mut self) {
        for (sig, old) in self.previous {
            if old != libc::SIG_ERR {
                // SAFETY: puts back the disposition `signal` returned for this signal.
                unsafe { libc::signal(sig, old) };
            }
        }
    }
}

/// Restores `done` after a failed bind; the error says how that went.
fn undo(host: &Host, state: &StateFile, done: &[Record], e: Error) -> Error {
    if done.is_empty() {
        return e;
    }
    match restore_all(host, done) {
        Ok(()) => {
            let _ = state.remove(&done.iter().map(|r| r.address).collect::<Vec<_>>());
            let list: Vec<String> = done.iter().map(|r| r.address.to_string()).collect();
            Error::Failed(format!("{e}; restored {} to the original drivers", list.join(", ")))
        }
        Err(r) => Error::Failed(format!(
            "{e}; restoring failed too ({r}); the state file {} still records them: \
             retry with vfio-bind --restore",
            state.path.display()
        )),
    }
}

/// Devices bound by [`bind`]: [`restore`](Self::restore) puts them back; dropping it without that
/// restores them too, best effort (a failure is printed to stderr; the state file keeps the record).
#[derive(Debug)]
pub struct Bound {
    host: Host,
    state: StateFile,
    records: Vec<Record>,
    restored: bool,
}

impl Bound {
    /// The devices this bind changed, with their original state.
    pub fn records(&self) -> &[Record] {
        &self.records
    }

    /// Restores the original drivers and overrides, and removes the records from the state file.
    pub fn restore(mut self) -> Result<()> {
        self.restored = true;
        self.restore_now()
    }

    /// Keeps the devices on vfio-pci; the state file keeps their records for `vfio-bind --restore`.
    pub fn keep(mut self) -> Vec<Record> {
        self.restored = true;
        std::mem::take(&mut self.records)
    }

    fn restore_now(&self) -> Result<()> {
        restore_all(&self.host, &self.records)?;
        self.state.remove(&self.records.iter().map(|r| r.address).collect::<Vec<_>>())
    }
}

impl Drop for Bound {
    fn drop(&mut self) {
        if self.restored {
            return;
        }
        if let Err(e) = self.restore_now() {
            eprintln!("vfio-bind: restoring the original drivers failed: {e}");
        }
    }
}

/// Restores the devices recorded in `state` (all of them, or those in `only`), and removes their
/// records. Returns the records restored.
pub fn restore(host: &Host, state: &StateFile, only: &[Bdf]) -> Result<Vec<Record>> {
    let records: Vec<Record> =
        state.load()?.into_iter().filter(|r| only.is_empty() || only.contains(&r.address)).collect();
    if let Some(missing) = only.iter().find(|a| !records.iter().any(|r| r.address == **a)) {
        return Err(Error::Invalid(format!("{missing} is not recorded in {}", state.path.display())));
    }
    let mut failures = Vec::new();
    let mut restored = Vec::new();
    for r in &records {
        match restore_one(host, r) {
            Ok(()) => restored.push(r.clone()),
            Err(e) => failures.push(e.to_string()),
        }
    }
    state.remove(&restored.iter().map(|r| r.address).collect::<Vec<_>>())?;
    if failures.is_empty() { Ok(restored) } else { Err(Error::Failed(failures.join("; "))) }
}

/// The file that records the original state of bound devices, so that a later run can restore them
/// (`/run/iommufd-tools/vfio-bind.state` by default).
///
/// One line a device: `ADDRESS driver=NAME|- override=NAME|-`. Lines are validated when read (the
/// address strictly, driver names as kernel names without `/`), so an edited file cannot steer a write
/// outside the device's sysfs directory and its original driver's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StateFile {
    /// Where the file is.
    pub path: PathBuf,
}

/// The default state file.
pub const DEFAULT_STATE: &str = "/run/iommufd-tools/vfio-bind.state";

const STATE_HEADER: &str = "# vfio-bind state: the original driver of each device bound to vfio-pci \
                            (vfio-bind --restore puts it back)";

fn valid_driver_name(name: &str) -> bool {
    !name.is_empty()
        && name != "."
        && name != ".."
        && name.len() <= 64
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"_-.+:".contains(&b))
}

impl StateFile {
    /// The state file at `path`.
    pub fn new(path: impl Into<PathBuf>) -> StateFile {
        StateFile { path: path.into() }
    }

    /// The records; none if the file does not exist.
    pub fn load(&self) -> Result<Vec<Record>> {
        let text = match fs::read_to_string(&self.path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(Error::io("read", &self.path, e)),
        };
        let bad = |n: usize, why: &str| Error::Invalid(format!("{}:{n}: {why}", self.path.display()));
        let mut records = Vec::new();
        for (i, line) in text.lines().enumerate() {
            if line.starts_with('#') || line.trim().is_empty() {
                continue;
            }
            let words: Vec<&str> = line.split(' ').collect();
            let [address, driver, over] = words.as_slice() else {
                return Err(bad(i + 1, "want `ADDRESS driver=NAME|- override=NAME|-`"));
            };
            let name = |field: &str, key: &str| -> Result<Option<String>> {
                let v = field.strip_prefix(key).ok_or_else(|| bad(i + 1, &format!("missing {key}")))?;
                if v == "-" {
                    Ok(None)
                } else if valid_driver_name(v) {
                    Ok(Some(v.to_string()))
                } else {
                    Err(bad(i + 1, &format!("{v:?} is not a driver name")))
                }
            };
            records.push(Record {
                address: address.parse().map_err(|e: Error| bad(i + 1, &e.to_string()))?,
                driver: name(driver, "driver=")?,
                driver_override: name(over, "override=")?,
            });
        }
        Ok(records)
    }

    fn save(&self, records: &[Record]) -> Result<()> {
        if records.is_empty() {
            return match fs::remove_file(&self.path) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(Error::io("remove", &self.path, e)),
                _ => Ok(()),
            };
        }
        let mut text = format!("{STATE_HEADER}\n");
        for r in records {
            let opt = |o: &Option<String>| o.clone().unwrap_or_else(|| "-".into());
            text.push_str(&format!(
                "{} driver={} override={}\n",
                r.address,
                opt(&r.driver),
                opt(&r.driver_override)
            ));
        }
        if let Some(dir) = self.path.parent().filter(|d| !d.as_os_str().is_empty()) {
            fs::create_dir_all(dir).map_err(|e| Error::io("create directory", dir, e))?;
        }
        // Written beside and renamed over: a crash leaves the old file or the new one, never half.
        let tmp = self.path.with_extension("tmp");
        fs::write(&tmp, text).map_err(|e| Error::io("write", &tmp, e))?;
        fs::rename(&tmp, &self.path).map_err(|e| Error::io("rename over", &self.path, e))
    }

    /// Adds records; a device already recorded keeps its first (oldest) record.
    pub fn add(&self, new: &[Record]) -> Result<()> {
        let mut records = self.load()?;
        for r in new {
            if !records.iter().any(|old| old.address == r.address) {
                records.push(r.clone());
            }
        }
        self.save(&records)
    }

    /// Removes the records of `addresses`.
    pub fn remove(&self, addresses: &[Bdf]) -> Result<()> {
        let mut records = self.load()?;
        let before = records.len();
        records.retain(|r| !addresses.contains(&r.address));
        if records.len() == before { Ok(()) } else { self.save(&records) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fake::Tree;

    fn bdf(s: &str) -> Bdf {
        s.parse().unwrap()
    }

    fn state(t: &Tree) -> StateFile {
        StateFile::new(t.root.join("run/vfio-bind.state"))
    }

    /// 0000:00:04.0 is back on virtio-pci with no driver_override, and nothing is recorded.
    fn assert_rng_restored(t: &Tree, s: &StateFile) {
        assert_eq!(t.driver_of("0000:00:04.0").as_deref(), Some("virtio-pci"));
        assert_eq!(t.override_of("0000:00:04.0"), "(null)\n", "driver_override cleared");
        assert!(!s.path.exists(), "the last record removed the file");
    }

    #[test]
    fn a_free_device_is_planned_bound_and_restored() {
        let t = Tree::new();
        t.standard();
        let plan = plan(&t.host, &[bdf("0000:00:04.0")], BindOptions::default()).unwrap();
        assert_eq!(
            plan.rebind,
            [Record {
                address: bdf("0000:00:04.0"),
                driver: Some("virtio-pci".into()),
                driver_override: None
            }]
        );
        assert!(plan.warnings.is_empty() && plan.already_bound.is_empty());
        assert!(plan.describe().contains("0000:00:04.0: virtio-pci -> vfio-pci"), "{}", plan.describe());
        assert!(t.writes().is_empty(), "planning writes nothing");

        let s = state(&t);
        let bound = bind(&t.host, &plan, &s).unwrap();
        assert_eq!(t.driver_of("0000:00:04.0").as_deref(), Some("vfio-pci"));
        assert_eq!(t.override_of("0000:00:04.0"), "vfio-pci\n");
        assert_eq!(s.load().unwrap(), plan.rebind, "recorded while bound");
        assert_eq!(
            t.writes(),
            [
                ("bus/pci/devices/0000:00:04.0/driver_override".into(), "vfio-pci".into()),
                ("bus/pci/devices/0000:00:04.0/driver/unbind".into(), "0000:00:04.0".into()),
                ("bus/pci/drivers_probe".into(), "0000:00:04.0".into()),
            ]
        );
        bound.restore().unwrap();
        assert_rng_restored(&t, &s);
    }

    #[test]
    fn while_bound_restores_after_a_return_a_panic_or_a_signal() {
        let t = Tree::new();
        t.standard();
        let p = plan(&t.host, &[bdf("0000:00:04.0")], BindOptions::default()).unwrap();
        let s = state(&t);
        let on_vfio = || t.driver_of("0000:00:04.0").as_deref() == Some("vfio-pci");
        let (value, restored) = while_bound(&t.host, &p, &s, || {
            assert!(on_vfio());
            // SAFETY: SIGINT is caught while `f` runs; without the handler this process would end.
            assert_eq!(unsafe { libc::raise(libc::SIGINT) }, 0);
            7
        })
        .unwrap();
        assert_eq!(value, 7, "the interrupted closure went on");
        restored.unwrap();
        assert_rng_restored(&t, &s);

        // The panic unwinds through `while_bound`: dropping the binding restores it.
        let panicked = std::panic::catch_unwind(|| {
            while_bound(&t.host, &p, &s, || {
                assert!(on_vfio());
                panic!("a test failed while bound");
            })
        });
        assert!(panicked.is_err());
        assert_rng_restored(&t, &s);
    }

    #[test]
    fn kept_bindings_are_restored_from_the_state_file() {
        let t = Tree::new();
        t.standard();
        // An override set by someone else is put back as it was.
        t.host.write_attr(&t.sys("bus/pci/devices/0000:00:04.0/driver_override"), "virtio-pci").unwrap();
        let p = plan(&t.host, &[bdf("0000:00:04.0"), bdf("0000:00:03.0")], BindOptions::default()).unwrap();
        assert_eq!(p.already_bound, [bdf("0000:00:03.0")], "edu is on vfio-pci already");
        assert_eq!(p.rebind[0].driver_override.as_deref(), Some("virtio-pci"));
        let s = state(&t);
        let kept = bind(&t.host, &p, &s).unwrap().keep();
        assert_eq!(kept.len(), 1);
        assert_eq!(t.driver_of("0000:00:04.0").as_deref(), Some("vfio-pci"));
        let e = restore(&t.host, &s, &[bdf("0000:00:03.0")]).unwrap_err();
        assert!(e.to_string().contains("0000:00:03.0 is not recorded"), "{e}");
        let restored = restore(&t.host, &s, &[]).unwrap();
        assert_eq!(restored, kept);
        assert_eq!(t.driver_of("0000:00:04.0").as_deref(), Some("virtio-pci"));
        assert_eq!(t.override_of("0000:00:04.0"), "virtio-pci\n");
        assert_eq!(t.driver_of("0000:00:03.0").as_deref(), Some("vfio-pci"), "edu untouched");
        assert!(restore(&t.host, &s, &[]).unwrap().is_empty(), "nothing left to restore");
    }

    #[test]
    fn without_vfio_pci_nothing_is_touched() {
        let t = Tree::new();
        t.standard();
        fs::remove_dir_all(t.sys("bus/pci/drivers/vfio-pci")).unwrap();
        let e = plan(&t.host, &[bdf("0000:00:04.0")], BindOptions { force: true }).unwrap_err();
        assert!(matches!(e, Error::Failed(_)) && e.to_string().contains("modprobe vfio-pci"), "{e}");
        assert_eq!(t.driver_of("0000:00:04.0").as_deref(), Some("virtio-pci"));
        assert!(t.writes().is_empty());
        // The edu device is already on vfio-pci: asking for it needs no driver load.
        t.bind_to("0000:00:03.0", "edu");
        assert!(plan(&t.host, &[bdf("0000:00:03.0")], BindOptions::default()).is_err());
    }

    #[test]
    fn a_device_vfio_pci_refuses_goes_back_with_the_others() {
        let t = Tree::new();
        t.standard();
        t.refuse("vfio-pci", "0000:00:05.0");
        // 00:05.0 comes after 00:04.0: 00:04.0 is bound first and must be rolled back.
        let all = [bdf("0000:00:05.0"), bdf("0000:00:04.0"), bdf("0000:00:05.1"), bdf("0000:00:05.2")];
        let p = plan(&t.host, &all, BindOptions::default()).unwrap();
        let s = state(&t);
        let e = bind(&t.host, &p, &s).unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains("0000:00:05.0: vfio-pci did not take it"), "{msg}");
        assert!(msg.contains("restored 0000:00:04.0, 0000:00:05.0"), "{msg}");
        for (d, want) in [("0000:00:04.0", Some("virtio-pci")), ("0000:00:05.0", Some("e1000e"))] {
            assert_eq!(t.driver_of(d).as_deref(), want, "{d}");
            assert_eq!(t.override_of(d), "(null)\n", "{d}");
        }
        assert_eq!(t.driver_of("0000:00:05.1"), None, "never touched");
        assert!(s.load().unwrap().is_empty());
    }

    #[test]
    fn group_siblings_on_other_drivers_are_refused() {
        let t = Tree::new();
        t.standard();
        // 00:05.0 is alone on e1000e... but its group has 00:05.1 (no driver: fine) and 00:05.2
        // (pcieport: fine). Binding 00:05.1 alone leaves 00:05.0 on e1000e: refused.
        assert!(plan(&t.host, &[bdf("0000:00:05.0")], BindOptions::default()).is_ok());
        let e = plan(&t.host, &[bdf("0000:00:05.1")], BindOptions::default()).unwrap_err();
        let Error::Refused(reasons) = &e else { panic!("{e}") };
        assert_eq!(reasons.len(), 1, "{reasons:?}");
        assert!(reasons[0].contains("shares IOMMU group 4 with 0000:00:05.0 (bound to e1000e)"), "{e}");
        // Naming the sibling too is accepted; --force turns the refusal into a warning.
        assert!(plan(&t.host, &[bdf("0000:00:05.1"), bdf("0000:00:05.0")], BindOptions::default()).is_ok());
        let p = plan(&t.host, &[bdf("0000:00:05.1")], BindOptions { force: true }).unwrap();
        assert_eq!(p.warnings, *reasons);
        assert!(p.describe().starts_with("warning (forced): 0000:00:05.1 shares"), "{}", p.describe());
        assert!(p.describe().contains("0000:00:05.1: no driver -> vfio-pci"), "{}", p.describe());
    }

    #[test]
    fn devices_under_mounts_swap_and_routes_are_refused() {
        let t = Tree::new();
        t.standard();
        // The root filesystem is on 00:06.0's vda1.
        let e = plan(&t.host, &[bdf("0000:00:06.0")], BindOptions::default()).unwrap_err();
        assert!(
            e.to_string().contains("0000:00:06.0 backs the filesystem mounted at / (block device vda1)"),
            "{e}"
        );
        // The default route goes through 00:01.0's eth0.
        let e = plan(&t.host, &[bdf("0000:00:01.0")], BindOptions::default()).unwrap_err();
        assert!(e.to_string().contains("carries network interface eth0, which has routes"), "{e}");
        assert!(plan(&t.host, &[bdf("0000:00:01.0")], BindOptions { force: true }).is_ok());
        assert!(t.writes().is_empty());
    }

    #[test]
    fn stacked_block_and_network_devices_are_followed() {
        let t = Tree::new();
        t.standard();
        let free = [bdf("0000:00:04.0")];
        assert!(plan(&t.host, &free, BindOptions::default()).is_ok());
        // A device-mapper volume over a partition of 00:04.0, mounted by its /dev/mapper name with an
        // escaped space in the mount point: the mountinfo number leads there too, so name it only
        // by source to test that path.
        t.block("0000:00:04.0", "virtio3/block/vdb", "vdb2", "254:18");
        t.dm("dm-0", "253:0", &["vdb2"]);
        fs::create_dir_all(t.host.dev.join("mapper")).unwrap();
        std::os::unix::fs::symlink("../dm-0", t.host.dev.join("mapper/data")).unwrap();
        fs::write(t.host.dev.join("dm-0"), "").unwrap();
        t.mount("0:99", "/dev/mapper/data", "/srv/my\\040data");
        let e = plan(&t.host, &free, BindOptions::default()).unwrap_err();
        assert!(
            e.to_string().contains("backs the filesystem mounted at /srv/my data (block device vdb2)"),
            "{e}"
        );
    }

    #[test]
    fn swap_bridges_and_ipv6_routes_count() {
        let t = Tree::new();
        t.standard();
        let free = [bdf("0000:00:04.0")];
        t.block("0000:00:04.0", "virtio3/block/vdb", "vdb1", "254:17");
        t.swap("/dev/vdb1");
        let e = plan(&t.host, &free, BindOptions::default()).unwrap_err();
        assert!(e.to_string().contains("backs swap on /dev/vdb1 (block device vdb1)"), "{e}");

        let t = Tree::new();
        t.standard();
        t.net("0000:00:04.0", "eth1");
        t.bridge("br0", "eth1");
        assert!(plan(&t.host, &free, BindOptions::default()).is_ok(), "no routes yet");
        t.route6("br0");
        let e = plan(&t.host, &free, BindOptions::default()).unwrap_err();
        assert!(
            e.to_string().contains("carries network interface eth1, which has routes through br0"),
            "{e}"
        );
    }

    #[test]
    fn missing_and_groupless_devices_are_errors() {
        let t = Tree::new();
        t.standard();
        let e = plan(&t.host, &[bdf("0000:00:09.0")], BindOptions { force: true }).unwrap_err();
        assert!(e.to_string().contains("no PCI device 0000:00:09.0"), "{e}");
        fs::remove_file(t.sys("bus/pci/devices/0000:00:04.0/iommu_group")).unwrap();
        let e = plan(&t.host, &[bdf("0000:00:04.0")], BindOptions { force: true }).unwrap_err();
        assert!(e.to_string().contains("has no IOMMU group"), "{e}");
        assert!(plan(&t.host, &[], BindOptions::default()).is_err());
    }

    #[test]
    fn state_files_round_trip_and_reject_tampering() {
        let t = Tree::new();
        let s = state(&t);
        assert!(s.load().unwrap().is_empty(), "no file: nothing recorded");
        let a =
            Record { address: bdf("0000:00:04.0"), driver: Some("virtio-pci".into()), driver_override: None };
        let b =
            Record { address: bdf("0001:02:1f.7"), driver: None, driver_override: Some("pci-stub".into()) };
        s.add(std::slice::from_ref(&a)).unwrap();
        s.add(&[Record { driver: Some("other".into()), ..a.clone() }, b.clone()]).unwrap();
        assert_eq!(s.load().unwrap(), [a.clone(), b.clone()], "the first record of a device is kept");
        s.remove(&[a.address]).unwrap();
        assert_eq!(s.load().unwrap(), [b]);
        for bad in [
            "0000:00:04.0 driver=../../../../kernel override=-",
            "0000:00:04.0 driver=a/b override=-",
            "0000:00:04.0 driver=.. override=-",
            "../0000:00:04.0 driver=x override=-",
            "0000:00:04.0 driver= override=-",
            "0000:00:04.0 driver=x",
            "0000:00:04.0 override=- driver=x",
            "0000:00:04.0 driver=x override=- extra",
        ] {
            fs::write(&s.path, format!("# header\n{bad}\n")).unwrap();
            let e = s.load().unwrap_err();
            assert!(e.to_string().contains(":2:"), "{bad}: {e}");
        }
    }

    #[test]
    fn mount_escapes() {
        assert_eq!(unescape(r"/a\040b\011c\134d\012"), "/a b\tc\\d\n");
        assert_eq!(unescape(r"/trailing\"), "/trailing\\");
        assert_eq!(unescape(r"\9zz"), r"\9zz");
    }
}
