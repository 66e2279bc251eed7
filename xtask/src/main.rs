//! Project tasks: `cargo xtask <task>`. Unpublished.

mod apt;
mod host;
mod hw;
mod kernel;
mod process;
mod sys;
mod vm;

use std::path::PathBuf;
use std::process::Command;

pub type Result<T, E = Box<dyn std::error::Error>> = std::result::Result<T, E>;

/// The workspace root (this crate lives in `<root>/xtask`).
pub fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).parent().expect("xtask has a parent").to_path_buf()
}

/// Where downloads, unpacked packages, kernels and images are cached (`IOMMUFD_CACHE` overrides).
pub fn cache_dir() -> PathBuf {
    std::env::var_os("IOMMUFD_CACHE").map(PathBuf::from).unwrap_or_else(|| workspace_root().join(".cache"))
}

/// Runs a command, failing with its command line if it does not succeed.
pub fn run(cmd: &mut Command) -> Result<()> {
    let status = cmd.status().map_err(|e| format!("{cmd:?}: {e}"))?;
    if !status.success() {
        return Err(format!("{cmd:?} failed: {status}").into());
    }
    Ok(())
}

/// The usage text (its defaults come from the code that applies them).
fn usage() -> String {
    format!(
        "\
usage: cargo xtask <task>
  gen-sys     regenerate sys/src/bindings.rs from the pinned uAPI headers (needs libclang)
  check-sys   regenerate into the cache and fail if the committed bindings differ (drift check)
  sys-headers print the pinned uAPI headers' include directory (unpacked into the cache, libclang
              installed): the IOMMUFD_SYS_HEADERS of builds with iommufd-sys's feature `bindgen`
  kernel [--kernel {names}|all]
              build (or reuse the cached) test-VM kernel from Debian's pinned linux-source (default
              {pinned}); prints its path
  vm-test [--kernel {names}|all] [--iommu intel|virtio|both] [--timeout SECS] [-v] [-- ARGS]
              run tests/*.rs and every example inside QEMU VMs, each kernel (default all: {names})
              under intel-iommu then virtio-iommu (or just the ones named); ARGS go to every test
              binary; -v streams the guest console (always saved to
              .cache/vm/console-<kernel>-<iommu>.log); default timeout {timeout} s a VM; a VM that times
              out fails the run; tests a kernel cannot run report themselves skipped by design
  test [--host-only]
              every test: the workspace's unit, doc and compile-fail tests on the host (tests that need
              /dev/iommu are ignored there; all features, so with IOMMUFD_SYS_HEADERS unset the pinned
              headers are used for feature `bindgen`), then the VM suite (vm-test) on every kernel
  hw-test --device ADDR [--bind [--force]] [-- ARGS]
              run the device-generic tests (ioas, device, raii; not the edu-only ones) against the real
              PCI device ADDR, which must be bound to vfio-pci; --bind binds it for the run and restores
              its driver afterwards, as `vfio-bind ADDR -- ...` does (refusing a device whose group has
              devices on other drivers, or that backs a mount, swap or a routed interface: --force)
  vm-demo [--timeout SECS]
              boot the VM (intel-iommu) and run only the edu_dma example, streaming its output
  bench [--timeout SECS]
              boot the VM (intel-iommu) once and run benches/sdk_vs_raw (bench profile): the SDK/raw
              time ratio per operation, with its spread over rounds (default timeout {bench_timeout} s)
",
        timeout = vm::DEFAULT_TIMEOUT_SECS,
        names = kernel::KERNELS.map(|k| k.name).join("|"),
        pinned = kernel::PINNED.name,
        bench_timeout = vm::BENCH_TIMEOUT_SECS
    )
}

/// `cargo xtask test`: the project's one test command.
fn test(args: &[String]) -> Result<()> {
    if let Some(bad) = args.iter().find(|a| *a != "--host-only") {
        return Err(format!("test: unknown argument {bad:?} (the only one is --host-only)").into());
    }
    let host_only = !args.is_empty();
    eprintln!("== host tests (cargo test --workspace --all-features)");
    let mut cargo = Command::new(env!("CARGO"));
    // `--all-features` includes iommufd-sys's `bindgen`: unless told otherwise, generate from the
    // pinned headers (the committed bindings' own).
    if std::env::var_os(sys::HEADERS_VAR).is_none() {
        cargo.env(sys::HEADERS_VAR, sys::bindgen_headers()?);
    }
    run(cargo.current_dir(workspace_root()).args(["test", "--workspace", "--all-features", "--locked"]))?;
    if host_only {
        return Ok(());
    }
    eprintln!("== VM tests");
    vm::vm_test(&[])
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("gen-sys") => sys::gen_sys(),
        Some("check-sys") => sys::check_sys(),
        Some("sys-headers") => sys::sys_headers(),
        Some("kernel") => kernel::kernel(&args[1..]),
        Some("vm-test") => vm::vm_test(&args[1..]),
        Some("vm-demo") => vm::vm_demo(&args[1..]),
        Some("bench") => vm::vm_bench(&args[1..]),
        Some("test") => test(&args[1..]),
        Some("hw-test") => hw::hw_test(&args[1..]),
        _ => {
            eprint!("{}", usage());
            std::process::exit(2);
        }
    };
    if let Err(e) = result {
        eprintln!("xtask: {e}");
        std::process::exit(1);
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn usage_states_the_default_timeout_the_code_uses() {
        let text = super::usage();
        let stated = format!("default timeout {} s", super::vm::DEFAULT_TIMEOUT_SECS);
        assert!(text.contains(&stated), "usage does not say {stated:?}:\n{text}");
    }
}
