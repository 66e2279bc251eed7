//! `cargo xtask hw-test --device ADDR [--bind]`: the device-generic part of the integration suite on a
//! real machine with a VFIO-capable IOMMU, against the PCI device at ADDR.
//!
//! The device must already be bound to vfio-pci; `--bind` binds it (through sysfs `driver_override`
//! and `drivers_probe`), detaching it from its current driver. Without `--bind`, a device on another
//! driver is refused: taking a device away from its driver (a NIC carrying the runner's network, a
//! disk) is a decision for the person running the job.

use std::path::PathBuf;
use std::process::Command;

use crate::{Result, run, workspace_root};

/// The test binaries that need only a bound device (no edu, no mock IOMMU).
const GENERIC_TESTS: &[&str] = &["ioas", "device", "raii"];

fn driver(sysfs: &std::path::Path) -> Option<String> {
    let link = std::fs::read_link(sysfs.join("driver")).ok()?;
    Some(link.file_name()?.to_string_lossy().into_owned())
}

fn bind_vfio_pci(addr: &str, sysfs: &std::path::Path) -> Result<()> {
    eprintln!("hw-test: binding {addr} to vfio-pci (it was on {:?})", driver(sysfs));
    std::fs::write(sysfs.join("driver_override"), "vfio-pci")?;
    if sysfs.join("driver").exists() {
        std::fs::write(sysfs.join("driver/unbind"), addr)?;
    }
    std::fs::write("/sys/bus/pci/drivers_probe", addr)?;
    match driver(sysfs).as_deref() {
        Some("vfio-pci") => Ok(()),
        other => {
            Err(format!("{addr} is on {other:?} after binding; is vfio-pci loaded (modprobe vfio-pci)?")
                .into())
        }
    }
}

/// `hw-test`'s arguments: the device address, `--bind`, and the arguments for the test binaries.
fn parse_args(args: &[String]) -> Result<(String, bool, Vec<String>)> {
    let mut device = None;
    let mut bind = false;
    let mut rest = Vec::new();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--device" => device = Some(it.next().ok_or("hw-test: --device wants an address")?.clone()),
            "--bind" => bind = true,
            "--" => rest.extend(it.by_ref().cloned()),
            other => return Err(format!("hw-test: unknown argument {other:?}").into()),
        }
    }
    let addr = device.ok_or("hw-test: --device 0000:BB:DD.F is required")?;
    Ok((addr, bind, rest))
}

pub fn hw_test(args: &[String]) -> Result<()> {
    let (addr, bind, rest) = parse_args(args)?;
    let sysfs = PathBuf::from("/sys/bus/pci/devices").join(&addr);
    if !sysfs.exists() {
        return Err(format!("hw-test: no PCI device {addr} in sysfs").into());
    }
    if !std::path::Path::new("/dev/iommu").exists() {
        return Err("hw-test: /dev/iommu is missing: the kernel lacks CONFIG_IOMMUFD".into());
    }
    match driver(&sysfs).as_deref() {
        Some("vfio-pci") => {}
        _ if bind => bind_vfio_pci(&addr, &sysfs)?,
        other => {
            return Err(format!(
                "hw-test: {addr} is bound to {other:?}, not vfio-pci; pass --bind to rebind it (this detaches it from its driver)"
            )
            .into());
        }
    }
    let mut cmd = Command::new(env!("CARGO"));
    cmd.current_dir(workspace_root()).args(["test", "--locked", "-p", "iommufd"]);
    for t in GENERIC_TESTS {
        cmd.args(["--test", t]);
    }
    cmd.args(["--", "--include-ignored", "--test-threads=1"]).args(&rest);
    cmd.env("IOMMUFD_TEST_DEVICE", &addr).env("IOMMUFD_TEST_IOMMU", "hardware");
    eprintln!("hw-test: running {GENERIC_TESTS:?} against {addr}");
    run(&mut cmd)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn arguments_are_parsed() {
        let (addr, bind, rest) =
            parse_args(&args(&["--device", "0000:00:03.0", "--", "ioas", "--bind"])).unwrap();
        assert_eq!((addr.as_str(), bind, rest), ("0000:00:03.0", false, args(&["ioas", "--bind"])));
        let (_, bind, rest) = parse_args(&args(&["--bind", "--device", "0000:00:03.0"])).unwrap();
        assert!(bind && rest.is_empty());
    }

    #[test]
    fn bad_arguments_are_refused() {
        for bad in [&[][..], &["--device"], &["--bind"], &["--device", "x", "--frob"]] {
            assert!(parse_args(&args(bad)).is_err(), "{bad:?} was accepted");
        }
    }
}
