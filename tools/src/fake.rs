//! A fake machine for the unit tests: a sysfs/procfs/devtmpfs tree in a temporary directory, laid out
//! as the kernel lays them out (device directories under `devices/`, symlinks from `bus/`, `class/`,
//! `kernel/iommu_groups/` and `dev/block/`), and a fake kernel that answers the writes a bind and a
//! restore make (driver_override, unbind, bind, drivers_probe) by moving the `driver` symlinks.

use std::fs;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use crate::Host;

/// The tree; removed on drop.
pub struct Tree {
    pub root: PathBuf,
    pub host: Host,
}

impl Drop for Tree {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.root);
    }
}

fn write(path: &Path, text: &str) {
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    fs::write(path, text).unwrap();
}

fn link(target: &Path, at: &Path) {
    fs::create_dir_all(at.parent().unwrap()).unwrap();
    symlink(target, at).unwrap();
}

impl Tree {
    pub fn new() -> Tree {
        static N: AtomicUsize = AtomicUsize::new(0);
        let root = std::env::temp_dir().join(format!(
            "iommufd-tools-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = fs::remove_dir_all(&root);
        for d in ["sys/bus/pci/devices", "sys/bus/pci/drivers", "proc/self", "proc/net", "dev"] {
            fs::create_dir_all(root.join(d)).unwrap();
        }
        write(&root.join("sys/bus/pci/drivers_probe"), "");
        write(&root.join("proc/self/mountinfo"), "");
        write(&root.join("proc/swaps"), "Filename\tType\tSize\tUsed\tPriority\n");
        write(
            &root.join("proc/net/route"),
            "Iface\tDestination\tGateway\tFlags\tRefCnt\tUse\tMetric\tMask\n",
        );
        write(&root.join("proc/net/ipv6_route"), "");
        let mut host = Host::under(&root);
        host.fake = Some(Arc::new(Kernel::default()));
        Tree { root, host }
    }

    pub fn sys(&self, rel: &str) -> PathBuf {
        self.host.sys.join(rel)
    }

    /// A PCI driver directory (`bus/pci/drivers/<name>` with `bind` and `unbind`).
    pub fn driver(&self, name: &str) -> PathBuf {
        let dir = self.sys("bus/pci/drivers").join(name);
        if !dir.exists() {
            write(&dir.join("bind"), "");
            write(&dir.join("unbind"), "");
        }
        dir
    }

    pub fn dmar(&self, name: &str) -> PathBuf {
        let dir = self.sys("devices/virtual/iommu").join(name);
        fs::create_dir_all(dir.join("intel-iommu")).unwrap();
        link(&dir, &self.sys("class/iommu").join(name));
        dir
    }

    /// A virtio-iommu provided by the PCI function `provider` (its virtio child is driven by
    /// virtio_iommu).
    pub fn virtio_iommu(&self, provider: &str) -> PathBuf {
        let virtio = self.sys("devices/pci0000:00").join(provider).join("virtio1");
        let dir = virtio.join("iommu").join(provider);
        fs::create_dir_all(&dir).unwrap();
        link(&virtio, &dir.join("device"));
        link(&self.sys("bus/virtio/drivers/virtio_iommu"), &virtio.join("driver"));
        fs::create_dir_all(self.sys("bus/virtio/drivers/virtio_iommu")).unwrap();
        link(&dir, &self.sys("class/iommu").join(provider));
        dir
    }

    fn group_dir(&self, group: u32) -> PathBuf {
        let dir = self.sys("kernel/iommu_groups").join(group.to_string());
        if !dir.exists() {
            write(&dir.join("type"), "DMA\n");
            fs::create_dir_all(dir.join("devices")).unwrap();
        }
        dir
    }

    /// A PCI function; `native` is the driver a plain probe binds (None: none matches).
    pub fn pci(
        &self,
        bdf: &str,
        ids: (u16, u16, u32),
        native: Option<&str>,
        bound: bool,
        group: u32,
        iommu: &Path,
    ) -> PathBuf {
        let dir = self.sys("devices/pci0000:00").join(bdf);
        write(&dir.join("vendor"), &format!("{:#06x}\n", ids.0));
        write(&dir.join("device"), &format!("{:#06x}\n", ids.1));
        write(&dir.join("class"), &format!("{:#08x}\n", ids.2));
        write(&dir.join("driver_override"), "(null)\n");
        write(&dir.join(".native"), native.unwrap_or(""));
        if let Some(d) = native.filter(|_| bound) {
            link(&self.driver(d), &dir.join("driver"));
        }
        let g = self.group_dir(group);
        link(&g, &dir.join("iommu_group"));
        link(&dir, &g.join("devices").join(bdf));
        link(iommu, &dir.join("iommu"));
        link(&dir, &self.sys("bus/pci/devices").join(bdf));
        dir
    }

    /// Binds `bdf` to `driver` (as a prior `vfio-bind` or the administrator would have).
    pub fn bind_to(&self, bdf: &str, driver: &str) {
        let at = self.sys("bus/pci/devices").join(bdf).join("driver");
        let _ = fs::remove_file(&at);
        link(&self.driver(driver), &at);
    }

    /// A block device `name` (`maj:min`) at `below` under the PCI function `bdf`'s directory.
    pub fn block(&self, bdf: &str, below: &str, name: &str, majmin: &str) -> PathBuf {
        let dir = self.sys("devices/pci0000:00").join(bdf).join(below).join(name);
        write(&dir.join("dev"), &format!("{majmin}\n"));
        link(&dir, &self.sys("dev/block").join(majmin));
        link(&dir, &self.sys("class/block").join(name));
        dir
    }

    /// A virtual block device (device mapper) over the block devices `slaves`.
    pub fn dm(&self, name: &str, majmin: &str, slaves: &[&str]) {
        let dir = self.sys("devices/virtual/block").join(name);
        fs::create_dir_all(dir.join("slaves")).unwrap();
        for s in slaves {
            link(&fs::canonicalize(self.sys("class/block").join(s)).unwrap(), &dir.join("slaves").join(s));
        }
        link(&dir, &self.sys("dev/block").join(majmin));
        link(&dir, &self.sys("class/block").join(name));
    }

    pub fn mount(&self, majmin: &str, source: &str, at: &str) {
        let path = self.host.proc.join("self/mountinfo");
        let mut text = fs::read_to_string(&path).unwrap();
        let n = text.lines().count() + 20;
        text.push_str(&format!("{n} 1 {majmin} / {at} rw,relatime shared:1 - ext4 {source} rw\n"));
        fs::write(path, text).unwrap();
    }

    pub fn swap(&self, source: &str) {
        let path = self.host.proc.join("swaps");
        let mut text = fs::read_to_string(&path).unwrap();
        text.push_str(&format!("{source}\tpartition\t1048572\t0\t-2\n"));
        fs::write(path, text).unwrap();
    }

    /// A network interface under the PCI function `bdf` (through its virtio child).
    pub fn net(&self, bdf: &str, iface: &str) -> PathBuf {
        let parent = self.sys("devices/pci0000:00").join(bdf).join("virtio0");
        let dir = parent.join("net").join(iface);
        fs::create_dir_all(&dir).unwrap();
        link(&parent, &dir.join("device"));
        link(&dir, &self.sys("class/net").join(iface));
        dir
    }

    /// A virtual interface (bridge) over `lower`.
    pub fn bridge(&self, name: &str, lower: &str) {
        let dir = self.sys("devices/virtual/net").join(name);
        fs::create_dir_all(&dir).unwrap();
        link(&dir, &self.sys("class/net").join(name));
        let lower_dir = fs::canonicalize(self.sys("class/net").join(lower)).unwrap();
        link(&dir, &lower_dir.join(format!("upper_{name}")));
    }

    pub fn route(&self, iface: &str) {
        let path = self.host.proc.join("net/route");
        let mut text = fs::read_to_string(&path).unwrap();
        text.push_str(&format!("{iface}\t00000000\t0202000A\t0003\t0\t0\t0\t00000000\n"));
        fs::write(path, text).unwrap();
    }

    pub fn route6(&self, iface: &str) {
        let path = self.host.proc.join("net/ipv6_route");
        let mut text = fs::read_to_string(&path).unwrap();
        let z = "0".repeat(32);
        text.push_str(&format!("{z} 00 {z} 00 {z} 00000100 00000001 00000000 00000001 {iface:>8}\n"));
        fs::write(path, text).unwrap();
    }

    /// The machine most tests use:
    /// - group 0: 0000:00:00.0, a host bridge with no driver (dmar0);
    /// - group 1: 0000:00:01.0, a virtio NIC (virtio-pci) with eth0, which carries the default route;
    /// - group 2: 0000:00:03.0, edu, on vfio-pci;
    /// - group 3: 0000:00:04.0, virtio-rng on virtio-pci (behind the virtio-iommu 0000:00:02.0);
    /// - group 4: 0000:00:05.0 (e1000e), 0000:00:05.1 (no driver), 0000:00:05.2 (pcieport);
    /// - group 5: 0000:00:06.0, a disk controller whose sda1 is mounted at `/`;
    /// - group 10: a platform device (serial8250).
    pub fn standard(&self) {
        let dmar = self.dmar("dmar0");
        let viommu = self.virtio_iommu("0000:00:02.0");
        self.driver("vfio-pci");
        self.pci("0000:00:00.0", (0x8086, 0x29c0, 0x060000), None, false, 0, &dmar);
        self.pci("0000:00:01.0", (0x1af4, 0x1041, 0x020000), Some("virtio-pci"), true, 1, &dmar);
        self.net("0000:00:01.0", "eth0");
        self.route("eth0");
        self.pci("0000:00:03.0", (0x1234, 0x11e8, 0x00ff00), Some("edu"), false, 2, &dmar);
        self.bind_to("0000:00:03.0", "vfio-pci");
        self.pci("0000:00:04.0", (0x1af4, 0x1044, 0x00ff00), Some("virtio-pci"), true, 3, &viommu);
        self.pci("0000:00:05.0", (0x8086, 0x10d3, 0x020000), Some("e1000e"), true, 4, &dmar);
        self.pci("0000:00:05.1", (0x8086, 0x10d3, 0x020000), None, false, 4, &dmar);
        self.pci("0000:00:05.2", (0x8086, 0x2a40, 0x060400), Some("pcieport"), true, 4, &dmar);
        self.pci("0000:00:06.0", (0x1af4, 0x1042, 0x010000), Some("virtio-pci"), true, 5, &dmar);
        self.block("0000:00:06.0", "virtio2/block/vda", "vda1", "254:1");
        self.mount("254:1", "/dev/vda1", "/");
        let platform = self.sys("devices/platform/serial8250");
        fs::create_dir_all(&platform).unwrap();
        fs::create_dir_all(self.sys("bus/platform/drivers/serial8250")).unwrap();
        link(&self.sys("bus/platform/drivers/serial8250"), &platform.join("driver"));
        let g = self.group_dir(10);
        link(&platform, &g.join("devices/serial8250"));
        link(&dmar, &platform.join("iommu"));
    }

    /// The writes the fake kernel saw, as (path relative to sysfs, value).
    pub fn writes(&self) -> Vec<(String, String)> {
        self.host.fake.as_ref().unwrap().log.lock().unwrap().clone()
    }

    /// Makes the fake kernel's probe of `driver` fail for `bdf` (as vfio-pci's does for a device it
    /// cannot take).
    pub fn refuse(&self, driver: &str, bdf: &str) {
        self.host.fake.as_ref().unwrap().refusals.lock().unwrap().push((driver.into(), bdf.into()));
    }

    pub fn driver_of(&self, bdf: &str) -> Option<String> {
        crate::sysfs::link_name(&self.sys("bus/pci/devices").join(bdf).join("driver"))
    }

    pub fn override_of(&self, bdf: &str) -> String {
        fs::read_to_string(self.sys("bus/pci/devices").join(bdf).join("driver_override")).unwrap()
    }
}

/// The fake kernel behind a [`Tree`]'s [`Host`].
#[derive(Default, Debug)]
pub struct Kernel {
    log: Mutex<Vec<(String, String)>>,
    refusals: Mutex<Vec<(String, String)>>,
}

fn einval(why: &str) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidInput, why.to_string())
}

impl Kernel {
    /// Answers a write of `value` to `path` as the kernel would.
    pub fn write(&self, host: &Host, path: &Path, value: &str) -> std::io::Result<()> {
        let rel = path.strip_prefix(&host.sys).map_err(|_| einval("outside sysfs"))?;
        self.log.lock().unwrap().push((rel.display().to_string(), value.to_string()));
        let parts: Vec<&str> = rel.iter().map(|c| c.to_str().unwrap()).collect();
        let devices = host.sys.join("bus/pci/devices");
        let bdf = value.trim_end_matches('\n');
        let dev = devices.join(bdf);
        let bound_to = |d: &Path| crate::sysfs::link_name(&d.join("driver"));
        let override_of = |d: &Path| {
            let o = fs::read_to_string(d.join("driver_override")).unwrap_or_default();
            let o = o.trim_end().to_string();
            if o == "(null)" || o.is_empty() { None } else { Some(o) }
        };
        let attach = |driver: &str| -> std::io::Result<()> {
            if self.refusals.lock().unwrap().iter().any(|(d, b)| d == driver && b == bdf) {
                return Err(std::io::Error::from_raw_os_error(19)); // ENODEV from the probe
            }
            symlink(host.sys.join("bus/pci/drivers").join(driver), dev.join("driver"))
        };
        match parts.as_slice() {
            ["bus", "pci", "devices", name, "driver_override"] => {
                let v = value.trim_end_matches('\n');
                let text = if v.is_empty() { "(null)\n".to_string() } else { format!("{v}\n") };
                fs::write(devices.join(name).join("driver_override"), text)
            }
            ["bus", "pci", "devices", name, "driver", "unbind"] => {
                if *name != bdf || bound_to(&dev).is_none() {
                    return Err(std::io::Error::from_raw_os_error(19));
                }
                fs::remove_file(dev.join("driver"))
            }
            ["bus", "pci", "drivers", driver, "bind"] => {
                if !dev.is_dir() || bound_to(&dev).is_some() {
                    return Err(std::io::Error::from_raw_os_error(16)); // EBUSY
                }
                if override_of(&dev).is_some_and(|o| o != *driver) {
                    return Err(std::io::Error::from_raw_os_error(19)); // the override excludes it
                }
                attach(driver)
            }
            ["bus", "pci", "drivers_probe"] => {
                if !dev.is_dir() {
                    return Err(std::io::Error::from_raw_os_error(19));
                }
                if bound_to(&dev).is_some() {
                    return Ok(());
                }
                let native = fs::read_to_string(dev.join(".native")).unwrap_or_default();
                let want = override_of(&dev).or((!native.is_empty()).then_some(native));
                match want {
                    // A probe that finds no driver, or whose driver fails, still "succeeds".
                    Some(d) if host.sys.join("bus/pci/drivers").join(&d).is_dir() => {
                        let _ = attach(&d);
                        Ok(())
                    }
                    _ => Ok(()),
                }
            }
            _ => Err(einval("the fake kernel has no such attribute")),
        }
    }
}
