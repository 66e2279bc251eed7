//! `lsiommu`'s report: the kernel's iommufd support, the IOMMU units, and every IOMMU group with its
//! devices, as text or JSON.

use std::collections::BTreeMap;

use crate::json::Value;
use crate::{Group, Host, Result};

/// What the running kernel's iommufd supports (from the `iommufd` crate's probe, see [`probe`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Support {
    /// `/dev/iommu` cannot be opened; the text says why (missing: the kernel lacks `CONFIG_IOMMUFD`).
    Unavailable(String),
    /// The probe's answer.
    Probed {
        /// Every iommufd ioctl the bindings know: (kernel name, first release, supported).
        ioctls: Vec<(String, String, bool)>,
        /// Field-level features: (name, supported).
        features: Vec<(String, bool)>,
    },
    /// This build has no probe (the `probe` feature is off).
    NotBuilt,
}

/// Everything `lsiommu` prints.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    /// The kernel release (`/proc/sys/kernel/osrelease`).
    pub kernel: Option<String>,
    /// What iommufd supports.
    pub support: Support,
    /// `vfio-pci` is loaded (or built in).
    pub vfio_pci: bool,
    /// VFIO device cdevs exist (`/dev/vfio/devices`, `CONFIG_VFIO_DEVICE_CDEV`).
    pub vfio_cdev: bool,
    /// The IOMMU groups.
    pub groups: Vec<Group>,
}

/// Opens `/dev/iommu` and probes it (`Iommufd::probe`), without side effects.
#[cfg(feature = "probe")]
pub fn probe() -> Support {
    let fd = match iommufd::Iommufd::open() {
        Ok(fd) => fd,
        Err(e) => return Support::Unavailable(e.to_string()),
    };
    match fd.probe() {
        Ok(caps) => Support::Probed {
            ioctls: iommufd::Ioctl::ALL
                .iter()
                .map(|&i| (i.name().to_string(), i.since().to_string(), caps.supports(i)))
                .collect(),
            features: [
                ("hwpt_alloc_data", caps.hwpt_alloc_data),
                ("hwpt_alloc_fault_id", caps.hwpt_alloc_fault_id),
                ("hw_info_capabilities", caps.hw_info_capabilities),
                ("hw_info_max_pasid", caps.hw_info_max_pasid),
                ("hw_info_input_type", caps.hw_info_input_type),
                ("viommu_alloc_data", caps.viommu_alloc_data),
                ("noiommu", caps.noiommu),
            ]
            .into_iter()
            .map(|(n, b)| (n.to_string(), b))
            .collect(),
        },
        Err(e) => Support::Unavailable(format!("/dev/iommu opened but the probe failed: {e}")),
    }
}

/// Without the `probe` feature.
#[cfg(not(feature = "probe"))]
pub fn probe() -> Support {
    Support::NotBuilt
}

impl Report {
    /// Reads the groups and the VFIO facts from `host`; `support` comes from [`probe`].
    pub fn scan(host: &Host, support: Support) -> Result<Report> {
        Ok(Report {
            kernel: std::fs::read_to_string(host.proc.join("sys/kernel/osrelease"))
                .ok()
                .map(|s| s.trim().to_string()),
            support,
            vfio_pci: host.pci_driver_dir(crate::bind::VFIO_PCI).is_dir(),
            vfio_cdev: host.dev.join("vfio/devices").is_dir(),
            groups: host.groups()?,
        })
    }

    /// The IOMMU units and the groups behind each: (name, driver, group numbers).
    pub fn iommus(&self) -> Vec<(String, Option<String>, Vec<u32>)> {
        let mut units: BTreeMap<(String, Option<String>), Vec<u32>> = BTreeMap::new();
        for g in &self.groups {
            if let Some(u) = &g.iommu {
                units.entry((u.name.clone(), u.driver.clone())).or_default().push(g.number);
            }
        }
        units.into_iter().map(|((n, d), g)| (n, d, g)).collect()
    }

    /// The text report.
    pub fn text(&self) -> String {
        let mut out = String::new();
        out.push_str(&format!("Kernel: {}\n", self.kernel.as_deref().unwrap_or("unknown")));
        match &self.support {
            Support::Unavailable(why) => out.push_str(&format!("iommufd: unavailable: {why}\n")),
            Support::NotBuilt => out.push_str("iommufd: not probed (built without the probe feature)\n"),
            Support::Probed { ioctls, features } => {
                let known = ioctls.iter().filter(|i| i.2).count();
                out.push_str(&format!("iommufd: /dev/iommu, {known} of {} ioctls\n", ioctls.len()));
                let missing: Vec<String> =
                    ioctls.iter().filter(|i| !i.2).map(|(n, s, _)| format!("{n} ({s})")).collect();
                if !missing.is_empty() {
                    out.push_str(&format!("  missing: {}\n", missing.join(", ")));
                }
                let list = |want: bool| -> String {
                    let v: Vec<&str> =
                        features.iter().filter(|f| f.1 == want).map(|f| f.0.as_str()).collect();
                    if v.is_empty() { "-".into() } else { v.join(" ") }
                };
                out.push_str(&format!("  features: {}\n", list(true)));
                out.push_str(&format!("  lacking: {}\n", list(false)));
            }
        }
        let yes = |b: bool| if b { "yes" } else { "no" };
        out.push_str(&format!(
            "VFIO: vfio-pci loaded: {}, device cdevs (/dev/vfio/devices): {}\n",
            yes(self.vfio_pci),
            yes(self.vfio_cdev)
        ));
        let iommus = self.iommus();
        if iommus.is_empty() {
            out.push_str("IOMMUs: none (no IOMMU groups: the IOMMU is off or absent)\n");
        }
        for (name, driver, groups) in &iommus {
            let groups: Vec<String> = groups.iter().map(u32::to_string).collect();
            out.push_str(&format!(
                "IOMMU {name} ({}): groups {}\n",
                driver.as_deref().unwrap_or("unknown driver"),
                groups.join(" ")
            ));
        }
        for g in &self.groups {
            for d in &g.devices {
                let what = match &d.pci {
                    Some(p) => format!(
                        "{} [{}] [{}:{}]",
                        p.class_name().unwrap_or("Unknown class"),
                        p.class.map_or("????".into(), |c| format!("{:04x}", c >> 8)),
                        p.vendor.map_or("????".into(), |v| format!("{v:04x}")),
                        p.device.map_or("????".into(), |v| format!("{v:04x}")),
                    ),
                    None => "(not PCI)".into(),
                };
                out.push_str(&format!(
                    "IOMMU Group {}  {}  {what}  {}\n",
                    g.number,
                    d.name,
                    d.driver.as_deref().unwrap_or("(no driver)")
                ));
            }
        }
        out
    }

    /// The report as JSON.
    pub fn json(&self) -> Value {
        let support = match &self.support {
            Support::Unavailable(why) => {
                Value::object([("available", Value::Bool(false)), ("error", Value::String(why.clone()))])
            }
            Support::NotBuilt => {
                Value::object([("available", Value::Null), ("error", Value::String("not probed".into()))])
            }
            Support::Probed { ioctls, features } => Value::object([
                ("available", Value::Bool(true)),
                (
                    "ioctls",
                    Value::Array(
                        ioctls
                            .iter()
                            .map(|(n, s, ok)| {
                                Value::object([
                                    ("name", Value::String(n.clone())),
                                    ("since", Value::String(s.clone())),
                                    ("supported", Value::Bool(*ok)),
                                ])
                            })
                            .collect(),
                    ),
                ),
                ("features", Value::object(features.iter().map(|(n, b)| (n.clone(), Value::Bool(*b))))),
            ]),
        };
        let iommus = self.iommus().into_iter().map(|(name, driver, groups)| {
            Value::object([
                ("name", Value::String(name)),
                ("driver", Value::opt_str(driver)),
                ("groups", Value::Array(groups.into_iter().map(|g| Value::Number(g.into())).collect())),
            ])
        });
        let groups = self.groups.iter().map(|g| {
            let devices = g.devices.iter().map(|d| {
                let pci = d.pci.as_ref();
                let hex = |v: Option<u32>, width: usize| Value::opt_str(v.map(|v| format!("{v:0width$x}")));
                Value::object([
                    ("name", Value::String(d.name.clone())),
                    ("pci", Value::Bool(pci.is_some())),
                    ("class", hex(pci.and_then(|p| p.class), 6)),
                    ("class_name", Value::opt_str(pci.and_then(|p| p.class_name()))),
                    ("vendor", hex(pci.and_then(|p| p.vendor).map(u32::from), 4)),
                    ("device", hex(pci.and_then(|p| p.device).map(u32::from), 4)),
                    ("driver", Value::opt_str(d.driver.clone())),
                    ("driver_override", Value::opt_str(pci.and_then(|p| p.driver_override.clone()))),
                ])
            });
            Value::object([
                ("group", Value::Number(g.number.into())),
                ("type", Value::opt_str(g.kind.clone())),
                ("iommu", Value::opt_str(g.iommu.as_ref().map(|u| u.name.clone()))),
                ("iommu_driver", Value::opt_str(g.iommu.as_ref().and_then(|u| u.driver.clone()))),
                ("devices", Value::Array(devices.collect())),
            ])
        });
        Value::object([
            ("kernel", Value::opt_str(self.kernel.clone())),
            ("iommufd", support),
            (
                "vfio",
                Value::object([
                    ("vfio_pci", Value::Bool(self.vfio_pci)),
                    ("cdev", Value::Bool(self.vfio_cdev)),
                ]),
            ),
            ("iommus", Value::Array(iommus.collect())),
            ("groups", Value::Array(groups.collect())),
        ])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fake::Tree;

    fn probed() -> Support {
        Support::Probed {
            ioctls: vec![
                ("IOMMU_DESTROY".into(), "6.2".into(), true),
                ("IOMMU_HW_QUEUE_ALLOC".into(), "6.17".into(), false),
            ],
            features: vec![("hwpt_alloc_data".into(), true), ("noiommu".into(), false)],
        }
    }

    #[test]
    fn the_text_report_lists_every_device_with_its_driver() {
        let t = Tree::new();
        t.standard();
        std::fs::create_dir_all(t.host.proc.join("sys/kernel")).unwrap();
        std::fs::write(t.host.proc.join("sys/kernel/osrelease"), "7.3.4\n").unwrap();
        let text = Report::scan(&t.host, probed()).unwrap().text();
        for line in [
            "Kernel: 7.3.4",
            "iommufd: /dev/iommu, 1 of 2 ioctls",
            "  missing: IOMMU_HW_QUEUE_ALLOC (6.17)",
            "  features: hwpt_alloc_data",
            "  lacking: noiommu",
            "VFIO: vfio-pci loaded: yes, device cdevs (/dev/vfio/devices): no",
            "IOMMU 0000:00:02.0 (virtio_iommu): groups 3",
            "IOMMU dmar0 (intel-iommu): groups 0 1 2 4 5 10",
            "IOMMU Group 0  0000:00:00.0  Bridge [0600] [8086:29c0]  (no driver)",
            "IOMMU Group 2  0000:00:03.0  Unclassified device [00ff] [1234:11e8]  vfio-pci",
            "IOMMU Group 3  0000:00:04.0  Unclassified device [00ff] [1af4:1044]  virtio-pci",
            "IOMMU Group 4  0000:00:05.2  Bridge [0604] [8086:2a40]  pcieport",
            "IOMMU Group 10  serial8250  (not PCI)  serial8250",
        ] {
            assert!(text.lines().any(|l| l == line), "no line {line:?} in:\n{text}");
        }
        assert_eq!(text.lines().filter(|l| l.starts_with("IOMMU Group ")).count(), 9, "{text}");
    }

    #[test]
    fn without_dev_iommu_or_groups_the_report_says_so() {
        let t = Tree::new();
        let r = Report::scan(&t.host, Support::Unavailable("open /dev/iommu: ENOENT".into())).unwrap();
        let text = r.text();
        assert!(text.contains("iommufd: unavailable: open /dev/iommu: ENOENT"), "{text}");
        assert!(text.contains("IOMMUs: none"), "{text}");
        assert!(text.contains("Kernel: unknown") && text.contains("vfio-pci loaded: no"), "{text}");
        let json: serde_json::Value = serde_json::from_str(&r.json().to_pretty()).unwrap();
        assert_eq!(json["iommufd"]["available"], false);
        assert_eq!(json["iommufd"]["error"], "open /dev/iommu: ENOENT");
        assert!(json["groups"].as_array().unwrap().is_empty());
    }

    #[test]
    fn the_json_report_parses_and_has_every_device() {
        let t = Tree::new();
        t.standard();
        let text = Report::scan(&t.host, probed()).unwrap().json().to_pretty();
        let json: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(json["iommufd"]["available"], true);
        assert_eq!(json["iommufd"]["ioctls"][1]["name"], "IOMMU_HW_QUEUE_ALLOC");
        assert_eq!(json["iommufd"]["ioctls"][1]["supported"], false);
        assert_eq!(json["iommufd"]["features"]["hwpt_alloc_data"], true);
        assert_eq!(json["iommus"][1]["name"], "dmar0");
        assert_eq!(json["iommus"][1]["groups"][5], 10);
        let groups = json["groups"].as_array().unwrap();
        assert_eq!(groups.len(), 7);
        let g3 = groups.iter().find(|g| g["group"] == 3).unwrap();
        assert_eq!(g3["iommu"], "0000:00:02.0");
        assert_eq!(g3["iommu_driver"], "virtio_iommu");
        let rng = &g3["devices"][0];
        assert_eq!(rng["name"], "0000:00:04.0");
        assert_eq!(
            (&rng["vendor"], &rng["device"], &rng["class"]),
            (&"1af4".into(), &"1044".into(), &"00ff00".into())
        );
        assert_eq!(rng["driver"], "virtio-pci");
        assert!(rng["driver_override"].is_null());
        // Each device is one line (what the VM test greps).
        assert!(
            text.lines()
                .any(|l| l.contains(r#""name": "0000:00:03.0""#) && l.contains(r#""driver": "vfio-pci""#)),
            "{text}"
        );
    }
}
