//! What an open file is, from its device number: `fstat` gives the character device's major and
//! minor number and `/sys/dev/char/MAJOR:MINOR` links to the kernel device behind it.
//!
//! Names and paths say nothing reliable about a file descriptor: a path can be a symlink or a bind
//! mount with another name, and an fd passed from another process (or mount namespace) may have been
//! opened anywhere. The device number is the kernel's own identity of a character device, and sysfs
//! maps it to the device: the iommufd misc device links to `.../misc/iommu`, a VFIO device cdev to
//! `<the physical device>/vfio-dev/vfioN`.

use std::os::fd::BorrowedFd;
use std::path::{Component, Path, PathBuf};

use crate::error::{Error, Result};

/// Where sysfs lists character devices by number.
const SYS_DEV_CHAR: &str = "/sys/dev/char";

/// The misc character devices' major number (`MISC_MAJOR`), /dev/iommu's among them.
const MISC_MAJOR: u32 = 10;

/// An open file, as far as its identity goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct FileIdentity {
    /// `(major, minor)` for a character device; `None` for any other kind of file.
    pub rdev: Option<(u32, u32)>,
    /// What the file is, for messages: `character device 1:3`, `a regular file`, ...
    pub kind: String,
    /// Where `/sys/dev/char/MAJOR:MINOR` points, for a character device sysfs knows.
    pub sysfs: Option<PathBuf>,
    /// True if `/sys/dev/char` itself is missing (sysfs not mounted here), so sysfs could not tell.
    pub no_sysfs: bool,
}

impl FileIdentity {
    /// `kind`, with the sysfs device it links to when known.
    pub fn describe(&self) -> String {
        match &self.sysfs {
            Some(target) => format!("{} ({})", self.kind, sysfs_tail(target)),
            None => self.kind.clone(),
        }
    }
}

/// `fstat`s `fd` and, for a character device, reads its `/sys/dev/char` link.
pub(crate) fn identify(fd: BorrowedFd<'_>) -> Result<FileIdentity> {
    use rustix::fs::FileType;
    let st = rustix::fs::fstat(fd).map_err(|e| Error::os("fstat", e))?;
    let file_type = FileType::from_raw_mode(st.st_mode);
    if file_type != FileType::CharacterDevice {
        let kind = match file_type {
            FileType::RegularFile => "a regular file",
            FileType::Directory => "a directory",
            FileType::Symlink => "a symbolic link",
            FileType::Fifo => "a pipe or FIFO",
            FileType::Socket => "a socket",
            FileType::BlockDevice => "a block device",
            _ => "not a character device",
        };
        return Ok(FileIdentity { rdev: None, kind: kind.to_string(), sysfs: None, no_sysfs: false });
    }
    let (major, minor) = (rustix::fs::major(st.st_rdev), rustix::fs::minor(st.st_rdev));
    let kind = format!("character device {major}:{minor}");
    let (sysfs, no_sysfs) = match std::fs::read_link(format!("{SYS_DEV_CHAR}/{major}:{minor}")) {
        Ok(target) => (Some(target), false),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => (None, !Path::new(SYS_DEV_CHAR).is_dir()),
        // Anything else (ENOMEM, EACCES, ...) says nothing about the file: report it as what it is,
        // not as a file of the wrong kind.
        Err(e) => {
            let errno = rustix::io::Errno::from_io_error(&e).unwrap_or(rustix::io::Errno::IO);
            return Err(Error::os("readlink(/sys/dev/char)", errno));
        }
    };
    Ok(FileIdentity { rdev: Some((major, minor)), kind, sysfs, no_sysfs })
}

/// The normal components of a sysfs link target, as strings (`..` and `.` dropped).
fn names(target: &Path) -> Vec<&str> {
    target
        .components()
        .filter_map(|c| match c {
            Component::Normal(n) => n.to_str(),
            _ => None,
        })
        .collect()
}

/// The last two components (`misc/iommu`, `vfio-dev/vfio0`), for messages.
fn sysfs_tail(target: &Path) -> String {
    let names = names(target);
    names[names.len().saturating_sub(3)..].join("/")
}

/// What sysfs says a character device is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum SysfsKind {
    /// The iommufd misc device (`/dev/iommu`).
    Iommu,
    /// The `vfio` misc device (`/dev/vfio/vfio`): iommufd's VFIO container emulation with
    /// `CONFIG_IOMMUFD_VFIO_CONTAINER`, otherwise the legacy VFIO container.
    VfioContainer,
    /// A VFIO device cdev of the device with this sysfs name (`0000:00:03.0`).
    VfioCdev(String),
    /// Anything else.
    Other,
}

/// Classifies a `/sys/dev/char/MAJOR:MINOR` link target.
pub(crate) fn classify(target: &Path) -> SysfsKind {
    let names = names(target);
    match names.as_slice() {
        [.., "misc", "iommu"] => SysfsKind::Iommu,
        [.., "misc", "vfio"] => SysfsKind::VfioContainer,
        [.., device, "vfio-dev", cdev]
            if cdev
                .strip_prefix("vfio")
                .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
                && !device.is_empty() =>
        {
            SysfsKind::VfioCdev(device.to_string())
        }
        _ => SysfsKind::Other,
    }
}

/// The major number the kernel registered under `name` in `/proc/devices` (character devices).
fn proc_devices_major(name: &str) -> Option<u32> {
    let text = std::fs::read_to_string("/proc/devices").ok()?;
    parse_proc_devices(&text, name)
}

/// Finds `name`'s major number in the character-device section of a `/proc/devices` text.
fn parse_proc_devices(text: &str, name: &str) -> Option<u32> {
    let mut in_char = false;
    for line in text.lines() {
        let line = line.trim();
        if line.ends_with(':') {
            in_char = line == "Character devices:";
            continue;
        }
        if !in_char {
            continue;
        }
        let mut parts = line.split_whitespace();
        if let (Some(major), Some(n), None) = (parts.next(), parts.next(), parts.next()) {
            if n == name {
                return major.parse().ok();
            }
        }
    }
    None
}

/// Checks that `fd` is an iommufd before any typed ioctl is issued on it.
///
/// A character device whose `/sys/dev/char` entry is the `iommu` misc device is one. The `vfio` misc
/// device (`/dev/vfio/vfio`) is one only when iommufd provides it: `is_iommufd` (a side-effect-free
/// iommufd query) decides, as it does for a misc device when sysfs is not mounted.
pub(crate) fn check_iommufd(
    op: &'static str,
    fd: BorrowedFd<'_>,
    is_iommufd: impl FnOnce() -> bool,
) -> Result<()> {
    const EXPECTED: &str = "an iommufd";
    let id = identify(fd)?;
    let wrong = |found: String| Error::WrongFile { op, expected: EXPECTED, found };
    let Some((major, _)) = id.rdev else { return Err(wrong(id.describe())) };
    match id.sysfs.as_deref().map(classify) {
        Some(SysfsKind::Iommu) => Ok(()),
        Some(SysfsKind::VfioContainer) => {
            if is_iommufd() {
                Ok(())
            } else {
                Err(wrong(format!(
                    "{} (the legacy VFIO container: the kernel lacks CONFIG_IOMMUFD_VFIO_CONTAINER)",
                    id.describe()
                )))
            }
        }
        Some(_) => Err(wrong(id.describe())),
        None if id.no_sysfs && major == MISC_MAJOR && is_iommufd() => Ok(()),
        None => Err(wrong(id.describe())),
    }
}

/// The device behind a VFIO device cdev, as sysfs names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct CdevDevice {
    /// The device's sysfs name (`0000:00:03.0`).
    pub name: String,
    /// The device's sysfs directory (`/sys/devices/pci0000:00/0000:00:03.0`), when it resolves.
    pub dir: Option<PathBuf>,
}

/// Checks that `fd` is a VFIO device cdev and returns its device (`None` only when sysfs is not
/// mounted, in which case the major number registered as `vfio-dev` in `/proc/devices` identifies the
/// cdev).
pub(crate) fn check_vfio_cdev(op: &'static str, fd: BorrowedFd<'_>) -> Result<Option<CdevDevice>> {
    const EXPECTED: &str = "a VFIO device cdev (/dev/vfio/devices/vfioN)";
    let id = identify(fd)?;
    let wrong = |found: String| Error::WrongFile { op, expected: EXPECTED, found };
    let Some((major, _)) = id.rdev else { return Err(wrong(id.describe())) };
    match id.sysfs.as_deref().map(classify) {
        Some(SysfsKind::VfioCdev(name)) => {
            // `/sys/dev/char/M:m` resolves to `<device>/vfio-dev/vfioN`.
            let dir = id
                .rdev
                .and_then(|(major, minor)| {
                    std::fs::canonicalize(format!("{SYS_DEV_CHAR}/{major}:{minor}")).ok()
                })
                .and_then(|cdev| Some(cdev.parent()?.parent()?.to_path_buf()))
                .filter(|dir| dir.file_name().is_some_and(|n| n.to_str() == Some(name.as_str())));
            Ok(Some(CdevDevice { name, dir }))
        }
        Some(SysfsKind::VfioContainer) => {
            Err(wrong(format!("{} (the VFIO container /dev/vfio/vfio, not a device)", id.describe())))
        }
        Some(_) => Err(wrong(id.describe())),
        None if id.no_sysfs && proc_devices_major("vfio-dev") == Some(major) => Ok(None),
        None => Err(wrong(id.describe())),
    }
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsFd;

    use super::*;

    #[test]
    fn sysfs_targets_are_classified() {
        let cases = [
            ("../../devices/virtual/misc/iommu", SysfsKind::Iommu),
            ("../../devices/virtual/misc/vfio", SysfsKind::VfioContainer),
            (
                "../../devices/pci0000:00/0000:00:03.0/vfio-dev/vfio0",
                SysfsKind::VfioCdev("0000:00:03.0".into()),
            ),
            (
                "../../devices/pci0000:00/0000:00:1c.0/0000:01:00.1/vfio-dev/vfio12",
                SysfsKind::VfioCdev("0000:01:00.1".into()),
            ),
            (
                "../../devices/platform/fff51000.ethernet/vfio-dev/vfio3",
                SysfsKind::VfioCdev("fff51000.ethernet".into()),
            ),
            ("../../devices/virtual/mem/null", SysfsKind::Other),
            ("../../devices/virtual/vfio/3", SysfsKind::Other),
            ("../../devices/x/vfio-dev/vfio", SysfsKind::Other),
            ("../../devices/x/vfio-dev/vfiox", SysfsKind::Other),
            ("vfio-dev/vfio0", SysfsKind::Other),
            ("iommu", SysfsKind::Other),
            ("", SysfsKind::Other),
        ];
        for (target, want) in cases {
            assert_eq!(classify(Path::new(target)), want, "{target}");
        }
        assert_eq!(sysfs_tail(Path::new("../../devices/virtual/mem/null")), "virtual/mem/null");
        assert_eq!(sysfs_tail(Path::new("null")), "null");
    }

    #[test]
    fn proc_devices_is_parsed_by_section() {
        let text =
            "Character devices:\n  1 mem\n 10 misc\n240 vfio-dev\n\nBlock devices:\n  7 loop\n241 vfio-dev\n";
        assert_eq!(parse_proc_devices(text, "vfio-dev"), Some(240));
        assert_eq!(parse_proc_devices(text, "misc"), Some(10));
        assert_eq!(parse_proc_devices(text, "loop"), None, "block devices are not character devices");
        assert_eq!(parse_proc_devices("", "mem"), None);
        assert_eq!(parse_proc_devices("Character devices:\nx mem\n", "mem"), None);
    }

    #[test]
    fn dev_null_and_regular_files_are_identified() {
        let null = std::fs::File::open("/dev/null").unwrap();
        let id = identify(null.as_fd()).unwrap();
        assert_eq!(id.rdev, Some((1, 3)));
        assert_eq!(id.kind, "character device 1:3");
        if let Some(target) = &id.sysfs {
            assert_eq!(classify(target), SysfsKind::Other);
            assert!(id.describe().ends_with("mem/null)"), "{}", id.describe());
        }
        let e = check_iommufd("t", null.as_fd(), || panic!("no ioctl for /dev/null")).unwrap_err();
        assert!(e.to_string().contains("not an iommufd"), "{e}");
        let e = check_vfio_cdev("t", null.as_fd()).unwrap_err();
        assert!(matches!(e, Error::WrongFile { .. }), "{e}");

        let file = std::fs::File::open("/proc/self/exe").unwrap();
        let id = identify(file.as_fd()).unwrap();
        assert_eq!((id.rdev, id.kind.as_str()), (None, "a regular file"));
        let e = check_iommufd("t", file.as_fd(), || true).unwrap_err();
        assert_eq!(e.to_string(), "t: not an iommufd: the file is a regular file");
        let dir = std::fs::File::open("/").unwrap();
        let e = check_vfio_cdev("t", dir.as_fd()).unwrap_err();
        assert!(e.to_string().ends_with("the file is a directory"), "{e}");
    }
}
