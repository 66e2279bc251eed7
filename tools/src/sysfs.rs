//! What sysfs says about IOMMU groups, the IOMMUs behind them and PCI devices.

use std::fs;
use std::path::{Path, PathBuf};

use crate::{Bdf, Error, Result};

/// The filesystem roots the tools read and write: sysfs, procfs and devtmpfs.
#[derive(Debug, Clone)]
pub struct Host {
    /// sysfs (`/sys`).
    pub sys: PathBuf,
    /// procfs (`/proc`).
    pub proc: PathBuf,
    /// devtmpfs (`/dev`).
    pub dev: PathBuf,
    #[cfg(test)]
    pub(crate) fake: Option<std::sync::Arc<crate::fake::Kernel>>,
}

/// A PCI device's identity and driver, from `/sys/bus/pci/devices/<address>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PciDevice {
    /// The address.
    pub address: Bdf,
    /// The 24-bit class code (`class`: base class, subclass, programming interface).
    pub class: Option<u32>,
    /// The vendor id.
    pub vendor: Option<u16>,
    /// The device id.
    pub device: Option<u16>,
    /// The bound driver's name, if any.
    pub driver: Option<String>,
    /// The `driver_override` value, if one is set.
    pub driver_override: Option<String>,
    /// The IOMMU group, if the device has one.
    pub group: Option<u32>,
}

impl PciDevice {
    /// The name of the class code's base class (as `lspci` names them), or `None` if it is not one the
    /// PCI specification defines.
    pub fn class_name(&self) -> Option<&'static str> {
        class_name(self.class? >> 16)
    }
}

/// The base class names of the PCI Code and ID Assignment specification.
fn class_name(base: u32) -> Option<&'static str> {
    Some(match base {
        0x00 => "Unclassified device",
        0x01 => "Mass storage controller",
        0x02 => "Network controller",
        0x03 => "Display controller",
        0x04 => "Multimedia controller",
        0x05 => "Memory controller",
        0x06 => "Bridge",
        0x07 => "Communication controller",
        0x08 => "Generic system peripheral",
        0x09 => "Input device controller",
        0x0a => "Docking station",
        0x0b => "Processor",
        0x0c => "Serial bus controller",
        0x0d => "Wireless controller",
        0x0e => "Intelligent controller",
        0x0f => "Satellite communications controller",
        0x10 => "Encryption controller",
        0x11 => "Signal processing controller",
        0x12 => "Processing accelerators",
        0x13 => "Non-Essential Instrumentation",
        0x40 => "Coprocessor",
        0xff => "Unassigned class",
        _ => return None,
    })
}

/// One device of an IOMMU group (PCI or not).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupMember {
    /// The device's name in sysfs (a PCI address for PCI devices).
    pub name: String,
    /// The PCI facts, for a PCI device.
    pub pci: Option<PciDevice>,
    /// The bound driver's name, if any.
    pub driver: Option<String>,
}

/// An IOMMU unit (`/sys/class/iommu/<name>`).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct IommuUnit {
    /// Its name: `dmar0` (Intel VT-d), `ivhd0` (AMD-Vi), the virtio-iommu's PCI address, ...
    pub name: String,
    /// The driver behind it: `intel-iommu`, `amd-iommu`, or the driver of the device that provides
    /// it (`virtio_iommu`, `arm-smmu-v3`, ...).
    pub driver: Option<String>,
}

/// An IOMMU group (`/sys/kernel/iommu_groups/<number>`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Group {
    /// The group number.
    pub number: u32,
    /// The default domain type (`DMA`, `DMA-FQ`, `identity`, ...), from `type`.
    pub kind: Option<String>,
    /// The IOMMU its devices are behind.
    pub iommu: Option<IommuUnit>,
    /// Its devices, sorted by name.
    pub devices: Vec<GroupMember>,
}

/// The file name of the target of the symlink `link` (a driver's or group's name).
pub(crate) fn link_name(link: &Path) -> Option<String> {
    fs::read_link(link).ok()?.file_name()?.to_str().map(str::to_string)
}

/// A sysfs attribute's text without its trailing newline, or `None` if it cannot be read.
fn attr(path: &Path) -> Option<String> {
    fs::read_to_string(path).ok().map(|s| s.trim_end_matches('\n').to_string())
}

fn hex_attr(path: &Path) -> Option<u32> {
    let text = attr(path)?;
    let digits = text.strip_prefix("0x")?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    u32::from_str_radix(digits, 16).ok()
}

fn read_dir_names(dir: &Path) -> Result<Vec<String>> {
    let mut names = Vec::new();
    for entry in fs::read_dir(dir).map_err(|e| Error::io("read directory", dir, e))? {
        let entry = entry.map_err(|e| Error::io("read directory", dir, e))?;
        if let Some(name) = entry.file_name().to_str() {
            names.push(name.to_string());
        }
    }
    names.sort();
    Ok(names)
}

impl Host {
    /// The running machine: `/sys`, `/proc` and `/dev`.
    pub fn system() -> Host {
        Host::under(Path::new("/"))
    }

    /// `root/sys`, `root/proc` and `root/dev`.
    pub fn under(root: &Path) -> Host {
        Host {
            sys: root.join("sys"),
            proc: root.join("proc"),
            dev: root.join("dev"),
            #[cfg(test)]
            fake: None,
        }
    }

    /// `/sys/bus/pci/devices/<address>`.
    pub fn pci_dir(&self, address: Bdf) -> PathBuf {
        self.sys.join("bus/pci/devices").join(address.to_string())
    }

    /// `/sys/bus/pci/drivers/<driver>`.
    pub fn pci_driver_dir(&self, driver: &str) -> PathBuf {
        self.sys.join("bus/pci/drivers").join(driver)
    }

    /// The device at `address`, or [`Error::Invalid`] if there is none.
    pub fn pci_device(&self, address: Bdf) -> Result<PciDevice> {
        let dir = self.pci_dir(address);
        if !dir.is_dir() {
            return Err(Error::Invalid(format!(
                "no PCI device {address} ({} does not exist)",
                dir.display()
            )));
        }
        Ok(PciDevice {
            address,
            class: hex_attr(&dir.join("class")),
            vendor: hex_attr(&dir.join("vendor")).and_then(|v| u16::try_from(v).ok()),
            device: hex_attr(&dir.join("device")).and_then(|v| u16::try_from(v).ok()),
            driver: link_name(&dir.join("driver")),
            driver_override: attr(&dir.join("driver_override")).filter(|o| !o.is_empty() && o != "(null)"),
            group: link_name(&dir.join("iommu_group")).and_then(|g| g.parse().ok()),
        })
    }

    /// Every IOMMU group, by number. No `/sys/kernel/iommu_groups` (no IOMMU) gives none.
    pub fn groups(&self) -> Result<Vec<Group>> {
        let dir = self.sys.join("kernel/iommu_groups");
        if !dir.is_dir() {
            return Ok(Vec::new());
        }
        let mut numbers: Vec<u32> = read_dir_names(&dir)?.iter().filter_map(|n| n.parse().ok()).collect();
        numbers.sort_unstable();
        numbers.into_iter().map(|n| self.group(n)).collect()
    }

    /// The IOMMU group `number`.
    pub fn group(&self, number: u32) -> Result<Group> {
        let dir = self.sys.join("kernel/iommu_groups").join(number.to_string());
        let mut devices = Vec::new();
        let mut iommu = None;
        for name in read_dir_names(&dir.join("devices"))? {
            let path = dir.join("devices").join(&name);
            let pci = match name.parse::<Bdf>() {
                Ok(address) if self.pci_dir(address).is_dir() => Some(self.pci_device(address)?),
                _ => None,
            };
            if iommu.is_none() {
                iommu = self.iommu_of(&path);
            }
            devices.push(GroupMember { driver: link_name(&path.join("driver")), name, pci });
        }
        Ok(Group { number, kind: attr(&dir.join("type")), iommu, devices })
    }

    /// The IOMMU unit behind the device whose sysfs directory is `device`.
    fn iommu_of(&self, device: &Path) -> Option<IommuUnit> {
        let unit = fs::canonicalize(device.join("iommu")).ok()?;
        let name = unit.file_name()?.to_str()?.to_string();
        // VT-d and AMD-Vi register attribute groups named after the driver; other IOMMUs are provided
        // by a device whose driver names them (virtio-iommu's virtio device, an SMMU's platform device).
        let driver = ["intel-iommu", "amd-iommu"]
            .into_iter()
            .find(|d| unit.join(d).is_dir())
            .map(str::to_string)
            .or_else(|| link_name(&unit.join("device/driver")));
        Some(IommuUnit { name, driver })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fake::Tree;

    #[test]
    fn groups_devices_and_iommus_are_read() {
        let t = Tree::new();
        t.standard();
        let groups = t.host.groups().unwrap();
        let numbers: Vec<u32> = groups.iter().map(|g| g.number).collect();
        assert_eq!(numbers, [0, 1, 2, 3, 4, 5, 10]);
        let g = &groups[2];
        assert_eq!(g.kind.as_deref(), Some("DMA"));
        assert_eq!(g.iommu, Some(IommuUnit { name: "dmar0".into(), driver: Some("intel-iommu".into()) }));
        let edu = g.devices[0].pci.as_ref().unwrap();
        assert_eq!(edu.address.to_string(), "0000:00:03.0");
        assert_eq!((edu.class, edu.vendor, edu.device), (Some(0x00ff00), Some(0x1234), Some(0x11e8)));
        assert_eq!(edu.class_name(), Some("Unclassified device"));
        assert_eq!(edu.driver.as_deref(), Some("vfio-pci"));
        assert_eq!(edu.group, Some(2));
        // Group 3 is behind a virtio-iommu: the driver of the device providing it.
        let behind = groups[3].iommu.as_ref().unwrap();
        assert_eq!(behind.driver.as_deref(), Some("virtio_iommu"));
        // A non-PCI member has no PCI facts but its driver.
        let platform = &groups[6].devices[0];
        assert_eq!((platform.name.as_str(), platform.pci.is_none()), ("serial8250", true));
        assert_eq!(platform.driver.as_deref(), Some("serial8250"));
        assert!(groups[0].iommu.as_ref().is_some());
    }

    #[test]
    fn no_iommu_means_no_groups() {
        let t = Tree::new();
        assert!(t.host.groups().unwrap().is_empty());
        let e = t.host.pci_device("0000:00:09.0".parse().unwrap()).unwrap_err();
        assert!(e.to_string().contains("no PCI device 0000:00:09.0"), "{e}");
    }

    #[test]
    fn class_names() {
        assert_eq!(class_name(0x02), Some("Network controller"));
        assert_eq!(class_name(0x14), None);
    }
}
