//! PCI addresses and the sysfs lookups that lead from one to a VFIO cdev.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use crate::error::{Error, Result};

/// A PCI address `domain:bus:device.function`, as sysfs names devices (`0000:00:03.0`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PciAddress {
    /// PCI domain (segment).
    pub domain: u32,
    /// Bus number.
    pub bus: u8,
    /// Device number (0..32).
    pub device: u8,
    /// Function number (0..8).
    pub function: u8,
}

impl FromStr for PciAddress {
    type Err = Error;

    /// Parses `dddd:bb:dd.f`, or `bb:dd.f` with domain 0.
    fn from_str(s: &str) -> Result<Self> {
        let bad = |why: &str| Error::invalid("PciAddress::from_str", format!("{s:?}: {why}"));
        let (rest, function) = s.rsplit_once('.').ok_or_else(|| bad("missing '.function'"))?;
        let parts: Vec<&str> = rest.split(':').collect();
        let (domain, bus, device) = match parts.as_slice() {
            [d, b, dev] => (*d, *b, *dev),
            [b, dev] => ("0", *b, *dev),
            _ => return Err(bad("expected domain:bus:device.function")),
        };
        let domain = u32::from_str_radix(domain, 16).map_err(|_| bad("bad domain"))?;
        let bus = u8::from_str_radix(bus, 16).map_err(|_| bad("bad bus"))?;
        let device = u8::from_str_radix(device, 16).map_err(|_| bad("bad device"))?;
        let function = u8::from_str_radix(function, 16).map_err(|_| bad("bad function"))?;
        if device >= 32 || function >= 8 {
            return Err(bad("device must be < 0x20 and function < 8"));
        }
        Ok(PciAddress { domain, bus, device, function })
    }
}

impl fmt::Display for PciAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:04x}:{:02x}:{:02x}.{:x}", self.domain, self.bus, self.device, self.function)
    }
}

impl PciAddress {
    /// `/sys/bus/pci/devices/<address>`.
    pub fn sysfs_path(&self) -> PathBuf {
        PathBuf::from(format!("/sys/bus/pci/devices/{self}"))
    }

    /// The device's VFIO cdev, `/dev/vfio/devices/vfioN`, from `<sysfs>/vfio-dev/vfioN`.
    pub fn vfio_cdev_path(&self) -> Result<PathBuf> {
        cdev_of(
            &self.sysfs_path(),
            "the device is not bound to vfio-pci, or the kernel lacks CONFIG_VFIO_DEVICE_CDEV",
        )
    }

    /// The driver currently bound to the device (`vfio-pci`, `edu`, ...), if any.
    pub fn driver(&self) -> Option<String> {
        let link = std::fs::read_link(self.sysfs_path().join("driver")).ok()?;
        link.file_name()?.to_str().map(str::to_string)
    }

    /// The vendor and device ids, from sysfs `vendor` and `device` (for example `(0x1234, 0x11e8)` for
    /// QEMU's edu device).
    pub fn vendor_device(&self) -> Result<(u16, u16)> {
        let dir = self.existing_sysfs_path()?;
        Ok((read_sysfs_id(&dir.join("vendor"))?, read_sysfs_id(&dir.join("device"))?))
    }

    /// Binds the device to the `vfio-pci` driver through sysfs: writes `vfio-pci` to its
    /// `driver_override`, unbinds it from its current driver, writes its address to
    /// `/sys/bus/pci/drivers_probe`, and checks that `vfio-pci` now drives it. Does nothing if it
    /// already does.
    ///
    /// Needs root (or write access to those sysfs files) and `vfio-pci` built in or loaded (nothing
    /// here loads modules). `driver_override` stays set, so the device returns to `vfio-pci` if it is
    /// re-probed. Unbinding a device from its driver takes it away from the host: use this only on
    /// devices meant for passthrough.
    pub fn bind_to_vfio_pci(&self) -> Result<()> {
        const VFIO_PCI: &str = "vfio-pci";
        let dir = self.existing_sysfs_path()?;
        if self.driver().as_deref() == Some(VFIO_PCI) {
            return Ok(());
        }
        let address = self.to_string();
        let write = |op: &'static str, path: PathBuf, value: &str| {
            std::fs::write(path, value).map_err(|e| {
                Error::os(op, rustix::io::Errno::from_io_error(&e).unwrap_or(rustix::io::Errno::IO))
            })
        };
        write("write <device>/driver_override", dir.join("driver_override"), VFIO_PCI)?;
        if self.driver().is_some() {
            write("write <device>/driver/unbind", dir.join("driver").join("unbind"), &address)?;
        }
        write("write /sys/bus/pci/drivers_probe", PathBuf::from("/sys/bus/pci/drivers_probe"), &address)?;
        // Probing is synchronous for vfio-pci; allow a short while in case a kernel makes it async.
        for _ in 0..100 {
            match self.driver() {
                Some(d) if d == VFIO_PCI => return Ok(()),
                Some(_) => break,
                None => std::thread::sleep(std::time::Duration::from_millis(10)),
            }
        }
        Err(Error::Protocol {
            op: "PciAddress::bind_to_vfio_pci",
            detail: format!(
                "{address} is bound to {} after drivers_probe, not vfio-pci (is vfio-pci built in or loaded?)",
                self.driver().as_deref().unwrap_or("no driver")
            ),
        })
    }

    /// The sysfs directory, or [`Error::Open`] if no such PCI device exists.
    fn existing_sysfs_path(&self) -> Result<PathBuf> {
        let dir = self.sysfs_path();
        if !dir.exists() {
            return Err(Error::Open {
                path: dir,
                errno: rustix::io::Errno::NOENT,
                hint: Some("no PCI device at this address"),
            });
        }
        Ok(dir)
    }
}

/// Reads a sysfs id file such as `vendor` (`0x1234` and a newline).
fn read_sysfs_id(path: &std::path::Path) -> Result<u16> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        Error::open(path, rustix::io::Errno::from_io_error(&e).unwrap_or(rustix::io::Errno::IO))
    })?;
    parse_sysfs_id(&text).ok_or_else(|| Error::Protocol {
        op: "read PCI id from sysfs",
        detail: format!("{}: {text:?} is not a 16-bit hex id", path.display()),
    })
}

/// Parses `0x1234\n` (the form sysfs uses for PCI ids).
fn parse_sysfs_id(text: &str) -> Option<u16> {
    let hex = text.trim().strip_prefix("0x")?;
    if hex.is_empty() || hex.starts_with('+') {
        return None;
    }
    u16::from_str_radix(hex, 16).ok()
}

/// The VFIO cdev `/dev/vfio/devices/vfioN` of the device whose sysfs directory is `dir`, from
/// `<dir>/vfio-dev/vfioN`; `absent` is the hint when `<dir>/vfio-dev` does not exist.
pub(super) fn cdev_of(dir: &Path, absent: &'static str) -> Result<PathBuf> {
    let dir = dir.join("vfio-dev");
    let entries = std::fs::read_dir(&dir).map_err(|e| {
        let errno = rustix::io::Errno::from_io_error(&e).unwrap_or(rustix::io::Errno::NOENT);
        if errno == rustix::io::Errno::NOENT {
            Error::Open { path: dir.clone(), errno, hint: Some(absent) }
        } else {
            Error::open(dir.clone(), errno)
        }
    })?;
    for entry in entries.flatten() {
        let name = entry.file_name();
        if let Some(name) = name.to_str().filter(|n| n.starts_with("vfio")) {
            return Ok(PathBuf::from("/dev/vfio/devices").join(name));
        }
    }
    Err(Error::Open { path: dir, errno: rustix::io::Errno::NOENT, hint: Some("no vfioN entry in vfio-dev") })
}

/// True if `uuid` is a UUID in its canonical text form (`8-4-4-4-12` hexadecimal digits), the name of
/// a mediated device.
pub(super) fn is_uuid(uuid: &str) -> bool {
    let groups: Vec<&str> = uuid.split('-').collect();
    groups.len() == 5
        && groups
            .iter()
            .zip([8, 4, 4, 4, 12])
            .all(|(g, n)| g.len() == n && g.bytes().all(|b| b.is_ascii_hexdigit()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mdev_names_are_canonical_uuids() {
        assert!(is_uuid("83b8f4f2-509f-382f-3c1e-e6bfe0fa1001"));
        assert!(is_uuid("83B8F4F2-509F-382F-3C1E-E6BFE0FA1001"));
        for bad in [
            "",
            "83b8f4f2509f382f3c1ee6bfe0fa1001",
            "83b8f4f2-509f-382f-3c1e-e6bfe0fa100",
            "83b8f4f2-509f-382f-3c1e-e6bfe0fa1001-",
            "../../../../etc/passwd-aaaa-bbbb-cccc",
            "83b8f4f2-509f-382f-3c1e-e6bfe0fa10g1",
            "83b8f4f2-509f-382f-3c1e/e6bfe0fa1001",
        ] {
            assert!(!is_uuid(bad), "{bad:?}");
            let e = crate::VfioDevice::open_mdev(bad).unwrap_err();
            assert!(matches!(e, Error::InvalidArgument { .. }), "{bad:?}: {e}");
        }
    }

    #[test]
    fn sysfs_ids() {
        assert_eq!(parse_sysfs_id("0x1234\n"), Some(0x1234));
        assert_eq!(parse_sysfs_id("0x11e8"), Some(0x11e8));
        for bad in ["", "0x", "1234", "0x12345", "0x+1", "0xzz\n"] {
            assert_eq!(parse_sysfs_id(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn parse_and_display() {
        let a: PciAddress = "0000:00:03.0".parse().unwrap();
        assert_eq!(a, PciAddress { domain: 0, bus: 0, device: 3, function: 0 });
        assert_eq!(a.to_string(), "0000:00:03.0");
        let b: PciAddress = "3a:1f.7".parse().unwrap();
        assert_eq!(b.to_string(), "0000:3a:1f.7");
        for bad in ["", "00:03", "0000:00:20.0", "0000:00:03.8", "zz:00:03.0", "1:2:3:4.0"] {
            let e = bad.parse::<PciAddress>().unwrap_err();
            assert!(matches!(e, Error::InvalidArgument { .. }), "{bad:?} gave {e}");
        }
    }
}
