//! `vfio-bind`: binds PCI devices to vfio-pci with safeguards, records their original drivers, and
//! restores them.

use std::process::{Command, ExitCode};

use iommufd_tools::bind::{self, DEFAULT_STATE};
use iommufd_tools::{Bdf, BindOptions, Error, Host, Plan, StateFile};

const USAGE: &str = "\
usage: vfio-bind [--force] [--dry-run] [--state FILE] ADDRESS... [-- COMMAND [ARG...]]
       vfio-bind --restore [--dry-run] [--state FILE] [ADDRESS...]

Binds the PCI devices ADDRESS (domain:bus:device.function, e.g. 0000:3b:00.1) to vfio-pci, after
recording their drivers in the state file (default /run/iommufd-tools/vfio-bind.state). With
`-- COMMAND`, runs COMMAND while they are bound and then restores them whatever it did, exiting with
its status. --restore puts back the recorded drivers (of every recorded device, or those named) and
clears driver_override.

Refused unless --force: a device whose IOMMU group has devices on other drivers, a device that backs a
mounted filesystem or swap, a device whose network interface has routes. vfio-pci must be loaded
(modprobe vfio-pci): if it is not, nothing is changed. --dry-run prints what would be done.
";

struct Args {
    restore: bool,
    force: bool,
    dry_run: bool,
    state: StateFile,
    devices: Vec<Bdf>,
    command: Vec<String>,
}

fn parse(args: &[String]) -> Result<Args, String> {
    let mut a = Args {
        restore: false,
        force: false,
        dry_run: false,
        state: StateFile::new(DEFAULT_STATE),
        devices: Vec::new(),
        command: Vec::new(),
    };
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--restore" => a.restore = true,
            "--force" => a.force = true,
            "--dry-run" | "-n" => a.dry_run = true,
            "--state" => a.state = StateFile::new(it.next().ok_or("--state wants a file")?),
            "--" => {
                a.command = it.by_ref().cloned().collect();
                if a.command.is_empty() {
                    return Err("`--` wants a command".into());
                }
            }
            s if s.starts_with('-') => return Err(format!("unknown option {s:?}")),
            s => a.devices.push(s.parse().map_err(|e: Error| e.to_string())?),
        }
    }
    if a.restore && (a.force || !a.command.is_empty()) {
        return Err("--restore takes neither --force nor a command".into());
    }
    if !a.restore && a.devices.is_empty() {
        return Err("no device given".into());
    }
    Ok(a)
}

fn run(a: &Args) -> Result<ExitCode, Error> {
    let host = Host::system();
    if a.restore {
        if a.dry_run {
            for r in a.state.load()?.iter().filter(|r| a.devices.is_empty() || a.devices.contains(&r.address))
            {
                println!(
                    "{}: would clear driver_override{} and bind it to {}",
                    r.address,
                    r.driver_override.as_deref().map(|o| format!(" (back to {o})")).unwrap_or_default(),
                    r.driver.as_deref().unwrap_or("no driver")
                );
            }
            return Ok(ExitCode::SUCCESS);
        }
        for r in bind::restore(&host, &a.state, &a.devices)? {
            println!("{}: back on {}", r.address, r.driver.as_deref().unwrap_or("no driver"));
        }
        return Ok(ExitCode::SUCCESS);
    }
    let plan = bind::plan(&host, &a.devices, BindOptions { force: a.force })?;
    if a.dry_run {
        print!("{}", plan.describe());
        return Ok(ExitCode::SUCCESS);
    }
    for w in &plan.warnings {
        eprintln!("vfio-bind: warning (forced): {w}");
    }
    if a.command.is_empty() {
        let bound = bind::bind(&host, &plan, &a.state)?;
        report_bound(&plan);
        println!("recorded in {} (vfio-bind --restore puts the drivers back)", a.state.path.display());
        bound.keep();
        return Ok(ExitCode::SUCCESS);
    }
    let (status, restored) = bind::while_bound(&host, &plan, &a.state, || {
        report_bound(&plan);
        Command::new(&a.command[0]).args(&a.command[1..]).status()
    })?;
    let code = match &status {
        Ok(s) => s.code().unwrap_or_else(|| {
            use std::os::unix::process::ExitStatusExt;
            128 + s.signal().unwrap_or(0)
        }),
        Err(e) => {
            eprintln!("vfio-bind: {}: {e}", a.command[0]);
            127
        }
    };
    restored?;
    for r in &plan.rebind {
        println!("{}: back on {}", r.address, r.driver.as_deref().unwrap_or("no driver"));
    }
    Ok(ExitCode::from(u8::try_from(code).unwrap_or(1)))
}

fn report_bound(plan: &Plan) {
    for r in &plan.rebind {
        println!("{}: {} -> vfio-pci", r.address, r.driver.as_deref().unwrap_or("no driver"));
    }
    for addr in &plan.already_bound {
        println!("{addr}: already on vfio-pci");
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "-h" || a == "--help") && !args.contains(&"--".to_string()) {
        print!("{USAGE}");
        return ExitCode::SUCCESS;
    }
    let a = match parse(&args) {
        Ok(a) => a,
        Err(e) => {
            eprint!("vfio-bind: {e}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    match run(&a) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("vfio-bind: {e}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn arguments_are_parsed() {
        let a =
            parse(&args(&["--force", "0000:00:04.0", "--state", "/tmp/s", "--", "cmd", "--force"])).unwrap();
        assert!(a.force && !a.restore && !a.dry_run);
        assert_eq!(a.devices, ["0000:00:04.0".parse().unwrap()]);
        assert_eq!(a.state.path.to_str(), Some("/tmp/s"));
        assert_eq!(a.command, ["cmd", "--force"], "everything after -- is the command's");
        let a = parse(&args(&["--restore"])).unwrap();
        assert!(a.restore && a.devices.is_empty());
        assert_eq!(a.state.path.to_str(), Some(DEFAULT_STATE));
    }

    #[test]
    fn bad_arguments_are_refused() {
        for bad in [
            &[][..],
            &["--force"],
            &["00:04.0"],
            &["../0000:00:04.0"],
            &["0000:00:04.0", "--frob"],
            &["0000:00:04.0", "--"],
            &["--state"],
            &["--restore", "--force"],
            &["--restore", "--", "true"],
        ] {
            assert!(parse(&args(bad)).is_err(), "{bad:?} was accepted");
        }
    }
}
