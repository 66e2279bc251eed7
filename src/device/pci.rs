//! PCI addresses and the sysfs lookups that lead from one to a VFIO cdev.

use std::fmt;
use std::path::PathBuf;
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
        let dir = self.sysfs_path().join("vfio-dev");
        let entries = std::fs::read_dir(&dir).map_err(|e| {
            let errno = rustix::io::Errno::from_io_error(&e).unwrap_or(rustix::io::Errno::NOENT);
            if errno == rustix::io::Errno::NOENT {
                Error::Open {
                    path: dir.clone(),
                    errno,
                    hint: Some(
                        "the device is not bound to vfio-pci, or the kernel lacks CONFIG_VFIO_DEVICE_CDEV",
                    ),
                }
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
        Err(Error::Open {
            path: dir,
            errno: rustix::io::Errno::NOENT,
            hint: Some("no vfioN entry in vfio-dev"),
        })
    }

    /// The driver currently bound to the device (`vfio-pci`, `edu`, ...), if any.
    pub fn driver(&self) -> Option<String> {
        let link = std::fs::read_link(self.sysfs_path().join("driver")).ok()?;
        link.file_name()?.to_str().map(str::to_string)
    }
}

/// The sysfs device name behind a cdev name `vfioN` (`/sys/class/vfio-dev/vfioN/device`).
pub(crate) fn cdev_device_name(cdev: &str) -> Option<String> {
    let link = std::fs::read_link(format!("/sys/class/vfio-dev/{cdev}/device")).ok()?;
    link.file_name()?.to_str().map(str::to_string)
}

#[cfg(test)]
mod tests {
    use super::*;

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
