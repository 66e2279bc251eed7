//! `cargo xtask hw-test --device ADDR [--bind [--force]]`: the device-generic part of the integration
//! suite on a real machine with a VFIO-capable IOMMU, against the PCI device at ADDR.
//!
//! The device must already be bound to vfio-pci, or `--bind` binds it with `iommufd-tools`' bind logic
//! (the one `vfio-bind` uses): the address is parsed strictly, a device whose IOMMU group holds
//! devices on other drivers, that backs a mounted filesystem or swap, or whose network interface has
//! routes is refused (`--force` overrides), its driver is recorded in vfio-bind's state file before it
//! is touched, and after the tests, whether they passed, failed or panicked, the original driver is
//! bound again and `driver_override` cleared. If vfio-pci is not loaded, nothing is touched. Without
//! `--bind`, a device on another driver is refused: taking a device away from its driver is a decision
//! for the person running the job.
//!
//! Tests that need the VM's edu device (their `#[ignore]` reason names "the edu device") are skipped
//! by name: [`edu_only_tests`] reads them from the test sources, so a new one cannot slip through and
//! fail for want of an edu device.

use std::path::Path;
use std::process::Command;

use iommufd_tools::bind::{self, DEFAULT_STATE, VFIO_PCI};
use iommufd_tools::{Bdf, BindOptions, Host, StateFile};

use crate::{Result, run, workspace_root};

/// The test binaries that need only a bound device (no edu, no mock IOMMU).
pub const GENERIC_TESTS: &[&str] = &["ioas", "device", "raii"];

/// The `#[ignore]` reason that marks a test needing the VM's edu device.
const EDU_REASON: &str = "the edu device";

/// The tests of `tests/<name>.rs` (for each of [`GENERIC_TESTS`]) whose `#[ignore]` reason names the
/// edu device, as libtest names them.
pub fn edu_only_tests(root: &Path) -> Result<Vec<String>> {
    let mut found = Vec::new();
    for name in GENERIC_TESTS {
        let path = root.join("tests").join(format!("{name}.rs"));
        let text = std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        found.extend(edu_only_in(&text));
    }
    Ok(found)
}

/// The functions of one test file that follow an `#[ignore = "..."]` naming the edu device.
fn edu_only_in(source: &str) -> Vec<String> {
    let mut found = Vec::new();
    let mut pending = false;
    for line in source.lines().map(str::trim) {
        if line.starts_with("#[ignore") {
            pending = line.contains(EDU_REASON);
        } else if let Some(rest) = line.strip_prefix("fn ").or_else(|| line.strip_prefix("async fn ")) {
            if pending {
                found.push(rest.split(['(', '<']).next().unwrap_or(rest).trim().to_string());
            }
            pending = false;
        }
    }
    found
}

/// `hw-test`'s arguments.
#[derive(Debug, PartialEq)]
struct Args {
    device: Bdf,
    bind: bool,
    force: bool,
    rest: Vec<String>,
}

fn parse_args(args: &[String]) -> Result<Args> {
    let mut device = None;
    let (mut bind, mut force) = (false, false);
    let mut rest = Vec::new();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--device" => {
                let value = it.next().ok_or("hw-test: --device wants an address")?;
                device = Some(value.parse::<Bdf>().map_err(|e| format!("hw-test: --device: {e}"))?);
            }
            "--bind" => bind = true,
            "--force" => force = true,
            "--" => rest.extend(it.by_ref().cloned()),
            other => return Err(format!("hw-test: unknown argument {other:?}").into()),
        }
    }
    let device = device.ok_or("hw-test: --device 0000:BB:DD.F is required")?;
    if force && !bind {
        return Err("hw-test: --force only applies to --bind".into());
    }
    Ok(Args { device, bind, force, rest })
}

/// The `cargo test` command for the generic tests, without the libtest arguments.
fn cargo_test() -> Command {
    let mut cmd = Command::new(env!("CARGO"));
    cmd.current_dir(workspace_root()).args(["test", "--locked", "-p", "iommufd"]);
    for t in GENERIC_TESTS {
        cmd.args(["--test", t]);
    }
    cmd
}

/// The libtest arguments: every ignored test, one at a time, without the edu-only ones.
fn libtest_args(skip: &[String], rest: &[String]) -> Vec<String> {
    let mut args: Vec<String> = vec!["--include-ignored".into(), "--test-threads=1".into()];
    for name in skip {
        args.extend(["--skip".to_string(), name.clone()]);
    }
    args.extend(rest.iter().cloned());
    args
}

pub fn hw_test(args: &[String]) -> Result<()> {
    let args = parse_args(args)?;
    let host = Host::system();
    let device = host.pci_device(args.device).map_err(|e| format!("hw-test: {e}"))?;
    if !Path::new("/dev/iommu").exists() {
        return Err("hw-test: /dev/iommu is missing: the kernel lacks CONFIG_IOMMUFD".into());
    }
    let skip = edu_only_tests(&workspace_root())?;
    // Build first: the device stays on its driver while the tests compile.
    run(cargo_test().arg("--no-run"))?;
    let mut test = cargo_test();
    test.arg("--").args(libtest_args(&skip, &args.rest));
    test.env("IOMMUFD_TEST_DEVICE", args.device.to_string()).env("IOMMUFD_TEST_IOMMU", "hardware");
    for edu in ["IOMMUFD_TEST_EDU_BDF", "IOMMUFD_TEST_EDU_CDEV", "IOMMUFD_TEST_EDU_GROUP"] {
        test.env_remove(edu);
    }
    eprintln!("hw-test: running {GENERIC_TESTS:?} against {} (skipping the edu-only {skip:?})", args.device);
    if device.driver.as_deref() == Some(VFIO_PCI) {
        return run(&mut test);
    }
    if !args.bind {
        return Err(format!(
            "hw-test: {} is bound to {}, not vfio-pci; pass --bind to rebind it for the run (its driver is \
             restored afterwards)",
            args.device,
            device.driver.as_deref().unwrap_or("no driver")
        )
        .into());
    }
    let plan = bind::plan(&host, &[args.device], BindOptions { force: args.force })
        .map_err(|e| format!("hw-test: {e}"))?;
    for w in &plan.warnings {
        eprintln!("hw-test: warning (forced): {w}");
    }
    // The same bind/run/restore as `vfio-bind ADDR -- COMMAND` (which the VM tier rehearses).
    let state = StateFile::new(DEFAULT_STATE);
    let (tests, restored) = bind::while_bound(&host, &plan, &state, || {
        eprintln!("hw-test: {} bound to vfio-pci (was on {:?})", args.device, device.driver);
        run(&mut test)
    })
    .map_err(|e| format!("hw-test: {e}"))?;
    match &restored {
        Ok(()) => eprintln!("hw-test: {} is back on {:?}", args.device, device.driver),
        Err(e) => eprintln!(
            "hw-test: RESTORE FAILED: {e} (the record stays in {DEFAULT_STATE}; `vfio-bind --restore` retries)"
        ),
    }
    tests?;
    Ok(restored?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn arguments_are_parsed() {
        let a = parse_args(&args(&["--device", "0000:00:03.0", "--", "ioas", "--bind"])).unwrap();
        assert_eq!(a.device.to_string(), "0000:00:03.0");
        assert!(!a.bind && !a.force);
        assert_eq!(a.rest, args(&["ioas", "--bind"]));
        let a = parse_args(&args(&["--bind", "--force", "--device", "0000:3B:00.1"])).unwrap();
        assert!(a.bind && a.force && a.rest.is_empty());
        assert_eq!(a.device.to_string(), "0000:3b:00.1");
    }

    #[test]
    fn bad_arguments_are_refused() {
        for bad in [
            &[][..],
            &["--device"],
            &["--bind"],
            &["--device", "x", "--frob"],
            &["--device", "../../../kernel/x"],
            &["--device", "0000:00:03.0/../../0000:00:04.0"],
            &["--device", "00:03.0"],
            &["--device", "0000:00:03.0", "--force"],
        ] {
            assert!(parse_args(&args(bad)).is_err(), "{bad:?} was accepted");
        }
    }

    #[test]
    fn edu_only_tests_are_found_by_their_ignore_reason() {
        let src = r#"
#[test]
#[ignore = "needs /dev/iommu and a VFIO device: run by cargo xtask vm-test"]
fn generic() {}

#[test]
#[ignore = "needs /dev/iommu and the edu device: run by cargo xtask vm-test"]
fn needs_edu() {
    let x = 1;
}

#[test]
#[ignore = "needs /dev/iommu and the edu device: run by cargo xtask vm-test"]
async fn needs_edu_too<T>() {}

fn helper() {}
"#;
        assert_eq!(edu_only_in(src), ["needs_edu", "needs_edu_too"]);
        let args = libtest_args(&edu_only_in(src), &args(&["ioas"]));
        assert_eq!(
            args,
            [
                "--include-ignored",
                "--test-threads=1",
                "--skip",
                "needs_edu",
                "--skip",
                "needs_edu_too",
                "ioas"
            ]
        );
    }

    /// Every test of the generic files that uses the edu device (its address, its driver) is marked as
    /// edu-only, so hw-test skips it rather than letting it fail on a machine without edu.
    #[test]
    fn every_generic_test_that_uses_edu_is_skipped_on_hardware() {
        let root = workspace_root();
        let skipped = edu_only_tests(&root).unwrap();
        for name in
            ["ioeventfd_writes_a_register_when_signalled", "display_and_precopy_ioctls_are_not_vfio_pci_ones"]
        {
            assert!(skipped.iter().any(|s| s == name), "{name} is not skipped: {skipped:?}");
        }
        for file in GENERIC_TESTS {
            let text = std::fs::read_to_string(root.join("tests").join(format!("{file}.rs"))).unwrap();
            // Split the file at each `#[test]`: a chunk is one test's attributes and body.
            for chunk in text.split("#[test]").skip(1) {
                let name = chunk.lines().find_map(|l| l.trim().strip_prefix("fn ")).unwrap_or("?");
                let name = name.split('(').next().unwrap();
                let uses_edu = chunk.contains("edu_address()") || chunk.contains("Edu::new");
                assert_eq!(
                    uses_edu,
                    skipped.iter().any(|s| s == name),
                    "tests/{file}.rs: {name} uses edu: {uses_edu}; its #[ignore] must name {EDU_REASON:?} \
                     exactly when it does"
                );
            }
        }
    }
}
