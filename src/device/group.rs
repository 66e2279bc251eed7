//! IOMMU group facts.
//!
//! The IOMMU group is the set of devices the IOMMU cannot isolate from each other: they share DMA
//! translation, so any of them can reach what the others map. With device cdevs the group is not a
//! handle (nothing is opened through it); it is reported here, from sysfs, so callers can decide
//! whether a device is isolated enough for their purpose.

use std::path::{Path, PathBuf};

use super::{BoundDevice, PciAddress};
use crate::error::{Errno, Error, Result};

/// Where the kernel lists IOMMU groups.
const IOMMU_GROUPS: &str = "/sys/kernel/iommu_groups";

/// One device in an IOMMU group.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct GroupMember {
    /// The device's sysfs name (a PCI address such as `0000:00:03.0`, or a platform device name).
    pub name: String,
    /// The driver bound to it (`vfio-pci`, `pcieport`, ...), if any.
    pub driver: Option<String>,
    /// Whether it is bound, through this crate, to the same [`Iommufd`](crate::Iommufd) as the device
    /// the facts were read for.
    pub bound_here: bool,
}

/// The IOMMU group of a device, as facts read from sysfs ([`BoundDevice::group`]).
///
/// The facts are a snapshot: drivers may bind and unbind afterwards.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct GroupFacts {
    /// The group number (`/sys/kernel/iommu_groups/<number>`).
    pub number: u32,
    /// Every device in the group, sorted by name (the device itself included).
    pub devices: Vec<GroupMember>,
}

impl GroupFacts {
    /// True if the device is alone in its group: the IOMMU isolates it from every other device.
    pub fn is_singleton(&self) -> bool {
        self.devices.len() == 1
    }

    /// True if every device of the group is bound to the same iommufd, so no other user shares the
    /// group's DMA view.
    pub fn all_bound_here(&self) -> bool {
        self.devices.iter().all(|d| d.bound_here)
    }
}

impl BoundDevice {
    /// The device's IOMMU group, read from sysfs: its number, and each member with its driver and
    /// whether it is bound to this device's iommufd.
    ///
    /// The device is the one behind the cdev's device number (`/sys/dev/char/MAJOR:MINOR`), whatever
    /// path or fd it was opened from. Where sysfs was not mounted when the device was opened, its name
    /// is unknown and this gives [`Error::InvalidArgument`].
    ///
    /// A mediated device (mdev) has no IOMMU: it uses iommufd's emulated access path, its device id
    /// names an access object (so [`hw_info`](Self::hw_info) gives `ENOENT`) and it attaches only to
    /// an IOAS. With `CONFIG_VFIO_GROUP` the kernel still gives it a group of its own (named
    /// `vfio-noiommu` in sysfs): this reports that singleton group, holding only the mdev (named by
    /// its UUID, its driver the mdev driver such as `mtty`). Without `CONFIG_VFIO_GROUP` there is no
    /// group and this gives [`Error::Open`] (`ENOENT` on `iommu_group`).
    pub fn group(&self) -> Result<GroupFacts> {
        const OP: &str = "BoundDevice::group";
        let dir = match (self.sysfs_path(), self.name()) {
            (Some(dir), _) => dir,
            (None, Some(name)) => {
                return Err(Error::invalid(OP, format!("no device named {name:?} under /sys/bus/*/devices")));
            }
            (None, None) => {
                return Err(Error::invalid(
                    OP,
                    "the device's sysfs entry is unknown (sysfs was not mounted when its cdev was opened)",
                ));
            }
        };
        let number = group_of_sysfs_dir(&dir)?;
        let bound = self.iommufd().bound_device_names();
        let members_dir = Path::new(IOMMU_GROUPS).join(number.to_string()).join("devices");
        let entries = std::fs::read_dir(&members_dir).map_err(|e| Error::open(&members_dir, io_errno(&e)))?;
        let mut devices = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|e| Error::open(&members_dir, io_errno(&e)))?;
            let Some(member) = entry.file_name().to_str().map(str::to_string) else {
                continue;
            };
            let driver = link_name(&entry.path().join("driver"));
            let bound_here = bound.contains(&member);
            devices.push(GroupMember { name: member, driver, bound_here });
        }
        devices.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(GroupFacts { number, devices })
    }
}

/// The IOMMU group number of the PCI device at `address` (`<sysfs>/iommu_group`).
///
/// Fails with [`Error::Open`] if the device does not exist, or has no group (no IOMMU translates for
/// it: IOMMU disabled, for example without `intel_iommu=on`).
pub fn iommu_group_of(address: &PciAddress) -> Result<u32> {
    let dir = address.sysfs_path();
    if !dir.exists() {
        return Err(Error::Open {
            path: dir,
            errno: Errno::NOENT,
            hint: Some("no PCI device at this address"),
        });
    }
    group_of_sysfs_dir(&dir)
}

/// Reads `<dir>/iommu_group` (a link to `/sys/kernel/iommu_groups/<n>`) and returns `n`.
fn group_of_sysfs_dir(dir: &Path) -> Result<u32> {
    let link_path = dir.join("iommu_group");
    let target = std::fs::read_link(&link_path).map_err(|e| {
        let errno = io_errno(&e);
        let hint = (errno == Errno::NOENT)
            .then_some("the device has no IOMMU group: no IOMMU translates for it (is the IOMMU enabled?)");
        Error::Open { path: link_path.clone(), errno, hint }
    })?;
    parse_group_link(&target).ok_or_else(|| Error::Protocol {
        op: "read iommu_group link",
        detail: format!("{} points to {}, not an IOMMU group", link_path.display(), target.display()),
    })
}

/// The group number at the end of an `iommu_group` link target (`../../../kernel/iommu_groups/12`).
fn parse_group_link(target: &Path) -> Option<u32> {
    let number = target.file_name()?.to_str()?;
    // `u32::from_str` accepts a leading '+'; sysfs never writes one, so insist on plain digits.
    if number.is_empty() || !number.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let parent = target.parent()?.file_name()?;
    (parent == "iommu_groups").then(|| number.parse().ok()).flatten()
}

/// The sysfs directory of the device called `name`: `/sys/bus/pci/devices/<name>` for PCI, otherwise
/// the first bus that has it.
pub(super) fn device_sysfs_dir(name: &str) -> Option<PathBuf> {
    if name.is_empty() || name.contains('/') || name == "." || name == ".." {
        return None;
    }
    let pci = Path::new("/sys/bus/pci/devices").join(name);
    if pci.exists() {
        return Some(pci);
    }
    std::fs::read_dir("/sys/bus")
        .ok()?
        .flatten()
        .map(|bus| bus.path().join("devices").join(name))
        .find(|p| p.exists())
}

/// The last component of the link at `path` (a driver's name), if it is a link.
fn link_name(path: &Path) -> Option<String> {
    let target = std::fs::read_link(path).ok()?;
    target.file_name()?.to_str().map(str::to_string)
}

fn io_errno(e: &std::io::Error) -> Errno {
    Errno::from_io_error(e).unwrap_or(Errno::IO)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn group_links() {
        assert_eq!(parse_group_link(Path::new("../../../kernel/iommu_groups/12")), Some(12));
        assert_eq!(parse_group_link(Path::new("/sys/kernel/iommu_groups/0")), Some(0));
        for bad in
            ["../../../kernel/iommu_groups/", "../kernel/iommu_groups/+3", "../kernel/other/3", "7", ""]
        {
            assert_eq!(parse_group_link(Path::new(bad)), None, "{bad:?}");
        }
    }

    #[test]
    fn facts_helpers() {
        let member = |name: &str, bound_here| GroupMember {
            name: name.to_string(),
            driver: Some("vfio-pci".to_string()),
            bound_here,
        };
        let single = GroupFacts { number: 3, devices: vec![member("0000:00:03.0", true)] };
        assert!(single.is_singleton() && single.all_bound_here());
        let shared = GroupFacts {
            number: 4,
            devices: vec![member("0000:01:00.0", true), member("0000:01:00.1", false)],
        };
        assert!(!shared.is_singleton() && !shared.all_bound_here());
    }

    #[test]
    fn unsafe_names_are_refused() {
        for bad in ["", ".", "..", "../x", "a/b"] {
            assert_eq!(device_sysfs_dir(bad), None, "{bad:?}");
        }
    }
}
