//! `cargo xtask vm-test` / `cargo xtask vm-demo`: the root crate's tests inside QEMU VMs.
//!
//! The VM boots the kernel from `cargo xtask kernel` with an initramfs holding busybox, the root crate's
//! test binaries and examples (linked statically), and `guest_init.sh` as `/init`. The guest binds the
//! `edu` device to vfio-pci, runs every test binary with `--include-ignored --test-threads=1` (tests that
//! need `/dev/iommu` are `#[ignore]` on the host), then every example (one check each), then rehearses
//! the hardware tier on a virtio-rng device that starts on its Linux driver (`lsiommu` and `vfio-bind`
//! of iommufd-tools, built statically too, bind it for the generic test binaries and restore it, checked
//! one check each; see `guest_init.sh`). It reports
//! on a second serial port that only `/init` writes to, which the host parses after QEMU exits. The
//! machine is TCG-only (q35, 2 vCPUs, 2 GiB), under intel-iommu and then virtio-iommu.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use cpio::newc::ModeFileType;

use crate::host::{self, Pkg};
use crate::kernel::{self, KERNELS, Kernel, PINNED};
use crate::process::Guarded;
use crate::{Result, cache_dir, workspace_root};

const GUEST_INIT: &str = include_str!("guest_init.sh");
const TARGET: &str = "x86_64-unknown-linux-gnu";
pub const DEFAULT_TIMEOUT_SECS: u64 = 150;
/// 2 MiB huge pages reserved at boot (hugetlbfs tests).
const HUGEPAGES: u32 = 64;

/// QEMU 10.0 from bookworm-backports (bookworm's 7.2 has a broken edu DMA bounds check) and busybox.
const VM_DEPS: &[Pkg] = &[
    Pkg { name: "qemu-system-x86", suite: Some("bookworm-backports"), version_prefixes: &["1:10."] },
    Pkg::plain("busybox-static"),
];

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Iommu {
    Intel,
    Virtio,
}

impl Iommu {
    fn name(self) -> &'static str {
        match self {
            Iommu::Intel => "intel",
            Iommu::Virtio => "virtio",
        }
    }

    fn qemu_args(self) -> &'static [&'static str] {
        match self {
            Iommu::Intel => &["-device", "intel-iommu,intremap=on,caching-mode=on"],
            Iommu::Virtio => &["-device", "virtio-iommu-pci"],
        }
    }

    fn cmdline(self) -> &'static str {
        match self {
            Iommu::Intel => "intel_iommu=on",
            // Without interrupt remapping, binding a device to iommufd fails with EPERM unless allowed.
            Iommu::Virtio => "iommufd.allow_unsafe_interrupts=1 vfio_iommu_type1.allow_unsafe_interrupts=1",
        }
    }
}

/// One VM of the matrix: a test kernel under an emulated IOMMU.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
struct Vm {
    kernel: &'static Kernel,
    iommu: Iommu,
}

impl Vm {
    /// `vm(7.3/intel)`: how the VM is named in progress lines and the summary.
    fn tag(self) -> String {
        format!("vm({}/{})", self.kernel.name, self.iommu.name())
    }

    /// The file name part shared by this VM's console log and results.
    fn key(self) -> String {
        format!("{}-{}", self.kernel.name, self.iommu.name())
    }

    fn console_path(self) -> PathBuf {
        cache_dir().join("vm").join(format!("console-{}.log", self.key()))
    }

    /// Why the kernel's mock IOMMU cannot be tested in this VM, if it cannot (a token without spaces:
    /// it travels on the kernel command line as `IOMMUFD_TEST_NO_MOCK`, and the tests that need a
    /// mock device report themselves skipped with it).
    ///
    /// On a kernel that hands mock devices to the first IOMMU registered without a firmware node
    /// ([`Kernel::intel_takes_mock_devices`]), under intel-iommu the mock device is probed by the Intel
    /// driver and every mock-domain operation fails with EINVAL. virtio-iommu registers with a firmware
    /// node, so under it the mock works on every kernel.
    fn no_mock(self) -> Option<&'static str> {
        (self.iommu == Iommu::Intel && self.kernel.intel_takes_mock_devices)
            .then_some("mock-device-probed-by-intel-iommu")
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    Test,
    Demo,
    Bench,
}

struct Options {
    kernels: Vec<&'static Kernel>,
    iommus: Vec<Iommu>,
    timeout: Duration,
    verbose: bool,
    test_args: Vec<String>,
}

fn parse_options(args: &[String], demo: bool) -> Result<Options> {
    let mut opts = Options {
        kernels: KERNELS.to_vec(),
        iommus: vec![Iommu::Intel, Iommu::Virtio],
        timeout: Duration::from_secs(DEFAULT_TIMEOUT_SECS),
        verbose: demo,
        test_args: Vec::new(),
    };
    if demo {
        opts.kernels = vec![&PINNED];
        opts.iommus = vec![Iommu::Intel];
    }
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--iommu" => {
                opts.iommus = match it.next().map(String::as_str) {
                    Some("intel") => vec![Iommu::Intel],
                    Some("virtio") => vec![Iommu::Virtio],
                    Some("both") => vec![Iommu::Intel, Iommu::Virtio],
                    other => return Err(format!("--iommu wants intel, virtio or both, got {other:?}").into()),
                }
            }
            "--kernel" if !demo => opts.kernels = kernel::kernels_named(it.next().map(String::as_str))?,
            "--timeout" => {
                let secs = it.next().and_then(|s| s.parse::<u64>().ok()).ok_or("--timeout wants seconds")?;
                opts.timeout = Duration::from_secs(secs);
            }
            "-v" | "--verbose" => opts.verbose = true,
            "--" if !demo => {
                opts.test_args = it.by_ref().cloned().collect();
            }
            other => return Err(format!("unknown option {other:?} (see `cargo xtask`)").into()),
        }
    }
    Ok(opts)
}

/// `cargo xtask vm-test [--kernel NAME|all] [--iommu intel|virtio|both] [--timeout SECS] [-v] [-- ARGS]`.
pub fn vm_test(args: &[String]) -> Result<()> {
    let started = Instant::now();
    let opts = parse_options(args, false)?;
    let prepared = prepare(&opts, Mode::Test)?;
    let mut runs = Vec::new();
    for vm in matrix(&opts) {
        // A guest that does not finish in time fails the run; it is not booted again. A hang is either
        // a bug (a deadlock in the kernel or in the code under test, which a second boot may simply
        // not hit) or a broken environment, and neither may turn into a pass: a retry that passes
        // would hide exactly the intermittent deadlock that most needs a look. Its console log stays
        // in `console-<iommu>.log` and the summary names it.
        let outcome = boot(&prepared, vm, Mode::Test, &opts)?;
        runs.push((vm, outcome));
    }
    eprintln!("vm-test: finished in {:.1}s", started.elapsed().as_secs_f64());
    let (lines, ok) = summarize(&runs, opts.timeout);
    for line in &lines {
        println!("{line}");
    }
    if ok { Ok(()) } else { Err("vm-test failed (see above)".into()) }
}

/// The VMs to boot, in order: each kernel under each IOMMU.
fn matrix(opts: &Options) -> Vec<Vm> {
    opts.kernels
        .iter()
        .flat_map(|&kernel| opts.iommus.iter().map(move |&iommu| Vm { kernel, iommu }))
        .collect()
}

/// The final summary of a `vm-test` run: one line per VM (a hang stands out), then the totals.
/// Returns the lines and whether the run passed.
fn summarize(runs: &[(Vm, Outcome)], timeout: Duration) -> (Vec<String>, bool) {
    let mut lines = Vec::new();
    let (mut passed, mut failed, mut skipped, mut ok) = (0, 0, 0, true);
    for (vm, outcome) in runs {
        if outcome.timed_out {
            lines.push(format!(
                "{}: HUNG: the guest did not finish within {}s and QEMU was killed (console: {})",
                vm.tag(),
                timeout.as_secs(),
                vm.console_path().display()
            ));
        }
        lines.push(outcome.summary_line(*vm));
        passed += outcome.passed;
        failed += outcome.failed;
        skipped += outcome.skipped;
        ok &= outcome.ok();
    }
    let skipped = if skipped > 0 { format!(", {skipped} skipped by design") } else { String::new() };
    lines.push(format!("{passed} passed, {failed} failed{skipped}"));
    (lines, ok)
}

/// `cargo xtask vm-demo [--timeout SECS]`: only the `edu_dma` example, under intel-iommu, output streamed.
pub fn vm_demo(args: &[String]) -> Result<()> {
    let opts = parse_options(args, true)?;
    let prepared = prepare(&opts, Mode::Demo)?;
    if !prepared.has_edu_dma {
        return Err("the root crate has no `edu_dma` example (examples/edu_dma.rs) yet".into());
    }
    let outcome = boot(&prepared, Vm { kernel: &PINNED, iommu: Iommu::Intel }, Mode::Demo, &opts)?;
    if outcome.ok() { Ok(()) } else { Err("vm-demo failed (see above)".into()) }
}

/// `cargo xtask bench [--timeout SECS]`: the SDK/raw benchmark (`benches/sdk_vs_raw.rs`, built with
/// the bench profile) in one VM boot under intel-iommu, output streamed. Every ratio it prints comes
/// from that one boot.
pub fn vm_bench(args: &[String]) -> Result<()> {
    let mut opts = parse_options(args, true)?;
    if !args.iter().any(|a| a == "--timeout") {
        opts.timeout = Duration::from_secs(BENCH_TIMEOUT_SECS);
    }
    let prepared = prepare(&opts, Mode::Bench)?;
    let outcome = boot(&prepared, Vm { kernel: &PINNED, iommu: Iommu::Intel }, Mode::Bench, &opts)?;
    if outcome.ok() { Ok(()) } else { Err("bench failed (see above)".into()) }
}

/// The bench's default guest timeout: its heavy operations take minutes under TCG.
pub const BENCH_TIMEOUT_SECS: u64 = 900;

struct Prepared {
    /// Each kernel's bzImage.
    kernels: Vec<(&'static Kernel, PathBuf)>,
    initramfs: PathBuf,
    has_edu_dma: bool,
    /// Held until the last VM has exited.
    _lock: std::fs::File,
}

fn prepare(opts: &Options, mode: Mode) -> Result<Prepared> {
    // The initramfs, console logs and result files are shared paths: one vm-test/vm-demo at a time.
    let lock = host::lock(&cache_dir().join("vm/.lock"), "vm")?;
    host::ensure("cargo xtask vm-test", VM_DEPS)?;
    let mut kernels = Vec::new();
    for &k in &opts.kernels {
        kernels.push((k, kernel::ensure_kernel(k)?));
    }
    let t = Instant::now();
    let bins = build_binaries(mode)?;
    let (n_tests, n_examples, secs) = (bins.tests.len(), bins.examples.len(), t.elapsed().as_secs_f64());
    let n_tools = bins.tools.len();
    eprintln!("vm: built {n_tests} test binaries, {n_examples} examples and {n_tools} tools in {secs:.1}s");
    let has_edu_dma = bins.examples.iter().any(|(name, _)| name == "edu_dma");
    let initramfs = pack_initramfs(&bins, &opts.test_args)?;
    Ok(Prepared { kernels, initramfs, has_edu_dma, _lock: lock })
}

// ---------------------------------------------------------------------------------------------------
// Building the binaries.

struct Binaries {
    /// (file name in the guest, path on the host)
    tests: Vec<(String, PathBuf)>,
    examples: Vec<(String, PathBuf)>,
    benches: Vec<(String, PathBuf)>,
    /// `lsiommu` and `vfio-bind` (iommufd-tools), for the hardware-tier rehearsal.
    tools: Vec<(String, PathBuf)>,
}

fn cargo(what: &[&str]) -> Command {
    // The suite includes the mock-IOMMU (`testing`), async (`tokio`) and VMM (`vm-memory`,
    // `vmm-sys-util`) tests.
    cargo_packages(what, &["iommufd"], "testing,tokio,vm-memory,vmm-sys-util")
}

fn cargo_packages(what: &[&str], packages: &[&str], features: &str) -> Command {
    let mut cmd = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    cmd.current_dir(workspace_root()).args(what);
    for package in packages {
        cmd.args(["-p", package]);
    }
    cmd.args(["--target", TARGET, "--message-format=json-render-diagnostics"])
        .args(["--features", features, "--locked"])
        // A separate --target keeps these static builds from invalidating the host build's artifacts.
        .env("RUSTFLAGS", "-C target-feature=+crt-static")
        // Line tables keep backtraces' file:line but halve the binaries (and so the initramfs, which
        // the guest unpacks at about 50 MiB/s under TCG).
        .env("CARGO_PROFILE_DEV_DEBUG", "line-tables-only")
        .env("CARGO_PROFILE_TEST_DEBUG", "line-tables-only")
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    cmd
}

/// Runs a cargo build command and returns the executables it reports as (target kind, name, path).
fn cargo_executables(mut cmd: Command) -> Result<Vec<(String, String, PathBuf)>> {
    let out = cmd.output().map_err(|e| format!("{cmd:?}: {e}"))?;
    if !out.status.success() {
        return Err(format!("{cmd:?} failed: {}", out.status).into());
    }
    parse_executables(&out.stdout)
}

/// The fields of cargo's `compiler-artifact` message that are used here.
#[derive(serde::Deserialize)]
struct ArtifactMessage {
    reason: String,
    target: Option<ArtifactTarget>,
    executable: Option<PathBuf>,
}

#[derive(serde::Deserialize)]
struct ArtifactTarget {
    name: String,
    kind: Vec<String>,
}

/// The executables in cargo's `--message-format=json` output, as (target kind, name, path).
///
/// Lines that are not JSON objects are skipped (with `json-render-diagnostics` cargo prints only JSON
/// on stdout, but a build script may print anything); a line that is a JSON object but not a message
/// of the expected shape is an error, so a change in cargo's format is not silently taken for "no
/// binaries".
fn parse_executables(stdout: &[u8]) -> Result<Vec<(String, String, PathBuf)>> {
    let mut found = Vec::new();
    for (i, line) in stdout.split(|&b| b == b'\n').enumerate() {
        let line = line.trim_ascii();
        if !line.starts_with(b"{") {
            continue;
        }
        let msg: ArtifactMessage =
            serde_json::from_slice(line).map_err(|e| format!("cargo message on line {}: {e}", i + 1))?;
        if msg.reason != "compiler-artifact" {
            continue;
        }
        let Some(exe) = msg.executable else { continue };
        let target =
            msg.target.ok_or_else(|| format!("compiler-artifact without a target on line {}", i + 1))?;
        let kind = target.kind.into_iter().next().unwrap_or_else(|| "unknown".to_string());
        found.push((kind, target.name, exe));
    }
    Ok(found)
}

fn build_binaries(mode: Mode) -> Result<Binaries> {
    if mode == Mode::Bench {
        eprintln!("vm: building the root crate's benchmark (static, bench profile, --target {TARGET})");
        let mut benches = Vec::new();
        for (kind, name, path) in cargo_executables(cargo(&["bench", "--no-run", "--bench", "sdk_vs_raw"]))? {
            if kind == "bench" {
                if !is_static(&path)? {
                    return Err(format!("{name} ({}) is not statically linked", path.display()).into());
                }
                benches.push((name, path));
            }
        }
        return Ok(Binaries { tests: Vec::new(), examples: Vec::new(), benches, tools: Vec::new() });
    }
    eprintln!("vm: building the root crate's tests and examples (static, --target {TARGET})");
    let mut tests = Vec::new();
    for (kind, name, path) in cargo_executables(cargo(&["test", "--no-run", "--tests"]))? {
        // Integration tests keep their name; the library's unit tests become "lib-iommufd".
        tests.push((if kind == "test" { name } else { format!("{kind}-{name}") }, path));
    }
    // The examples and the tools in one build: the tools then use the root crate as the examples
    // build it (with its dev-dependencies' features), so it is compiled once.
    let (mut examples, mut tools) = (Vec::new(), Vec::new());
    let build = cargo_packages(
        &["build", "--examples", "--bins"],
        &["iommufd", "iommufd-tools"],
        "iommufd/testing,iommufd/tokio,iommufd/vm-memory,iommufd/vmm-sys-util",
    );
    for (kind, name, path) in cargo_executables(build)? {
        match kind.as_str() {
            "example" => examples.push((name, path)),
            "bin" => tools.push((name, path)),
            _ => {}
        }
    }
    tests.sort();
    examples.sort();
    tools.sort();
    for (name, path) in tests.iter().chain(&examples).chain(&tools) {
        if !is_static(path)? {
            return Err(format!("{name} ({}) is not statically linked", path.display()).into());
        }
    }
    Ok(Binaries { tests, examples, benches: Vec::new(), tools })
}

/// True if the ELF file has no PT_INTERP program header (no dynamic loader needed).
fn is_static(path: &Path) -> Result<bool> {
    let data = std::fs::read(path)?;
    let u16_at = |o: usize| u16::from_le_bytes([data[o], data[o + 1]]) as usize;
    let u32_at = |o: usize| u32::from_le_bytes(data[o..o + 4].try_into().unwrap_or_default());
    let u64_at = |o: usize| u64::from_le_bytes(data[o..o + 8].try_into().unwrap_or_default()) as usize;
    if data.len() < 64 || &data[..4] != b"\x7fELF" || data[4] != 2 {
        return Err(format!("{} is not a 64-bit ELF file", path.display()).into());
    }
    let (phoff, phentsize, phnum) = (u64_at(0x20), u16_at(0x36), u16_at(0x38));
    for i in 0..phnum {
        let o = phoff + i * phentsize;
        if o + 4 > data.len() {
            break;
        }
        if u32_at(o) == 3 {
            return Ok(false); // PT_INTERP
        }
    }
    Ok(true)
}

// ---------------------------------------------------------------------------------------------------
// The initramfs: a cpio (newc) archive. Left uncompressed: under TCG the guest kernel
// takes about 2 s longer to gunzip an 80 MiB archive than QEMU takes to load it raw, and gzip -1 on
// the host costs another 2 s.

fn busybox() -> Result<PathBuf> {
    for p in ["/bin/busybox", "/usr/bin/busybox"] {
        let p = Path::new(p);
        if p.exists() && is_static(p)? {
            return Ok(p.to_path_buf());
        }
    }
    Err("no static busybox in /bin or /usr/bin (package busybox-static)".into())
}

/// Quotes a word for a POSIX shell.
fn shell_quote(word: &str) -> String {
    format!("'{}'", word.replace('\'', r"'\''"))
}

fn pack_initramfs(bins: &Binaries, test_args: &[String]) -> Result<PathBuf> {
    let dir = cache_dir().join("vm");
    std::fs::create_dir_all(&dir)?;
    let cpio_path = dir.join("initramfs.cpio");
    let mut w = Initramfs::new(std::io::BufWriter::new(std::fs::File::create(&cpio_path)?));
    for d in ["bin", "dev", "etc", "proc", "sys", "tmp", "root", "run", "tests", "examples", "bench", "tools"]
    {
        w.dir(d)?;
    }
    w.char_dev("dev/console", 5, 1)?;
    w.file("init", 0o755, GUEST_INIT.as_bytes())?;
    w.file("bin/busybox", 0o755, &std::fs::read(busybox()?)?)?;
    let args: Vec<String> = test_args.iter().map(|a| shell_quote(a)).collect();
    w.file("etc/xtask-test-args", 0o644, format!("{}\n", args.join(" ")).as_bytes())?;
    for (name, path) in &bins.tests {
        w.file(&format!("tests/{name}"), 0o755, &std::fs::read(path)?)?;
    }
    for (name, path) in &bins.examples {
        w.file(&format!("examples/{name}"), 0o755, &std::fs::read(path)?)?;
    }
    for (name, path) in &bins.benches {
        w.file(&format!("bench/{name}"), 0o755, &std::fs::read(path)?)?;
    }
    for (name, path) in &bins.tools {
        w.file(&format!("tools/{name}"), 0o755, &std::fs::read(path)?)?;
    }
    // Examples that need the kernel's mock IOMMU are skipped by design where mock devices are.
    let mock: Vec<&str> = bins
        .examples
        .iter()
        .map(|(n, _)| n.as_str())
        .filter(|n| uses_the_mock(&workspace_root(), n))
        .collect();
    w.file("etc/xtask-mock-examples", 0o644, format!("{}\n", mock.join("\n")).as_bytes())?;
    // The hardware-tier rehearsal runs what `hw-test` runs: the generic test binaries without the
    // edu-only tests.
    let hw_tests = crate::hw::GENERIC_TESTS;
    w.file("etc/xtask-hw-tests", 0o644, format!("{}\n", hw_tests.join(" ")).as_bytes())?;
    let skip: Vec<String> = crate::hw::edu_only_tests(&workspace_root())?
        .iter()
        .flat_map(|t| ["--skip".to_string(), shell_quote(t)])
        .collect();
    w.file("etc/xtask-hw-skip", 0o644, format!("{}\n", skip.join(" ")).as_bytes())?;
    w.finish()?.flush()?;
    eprintln!(
        "vm: initramfs {} ({:.1} MiB)",
        cpio_path.display(),
        std::fs::metadata(&cpio_path)?.len() as f64 / (1 << 20) as f64
    );
    Ok(cpio_path)
}

/// The initramfs entries, written with the `cpio` crate's newc writer: owner root, mtime 0 (so the
/// archive is reproducible), one inode number per entry.
struct Initramfs<W: Write> {
    out: Option<W>,
    ino: u32,
}

impl<W: Write> Initramfs<W> {
    fn new(out: W) -> Self {
        Initramfs { out: Some(out), ino: 1 }
    }

    fn entry(&mut self, name: &str, kind: ModeFileType, perm: u32, data: &[u8]) -> std::io::Result<()> {
        self.entry_dev(name, kind, perm, (0, 0), data)
    }

    fn entry_dev(
        &mut self,
        name: &str,
        kind: ModeFileType,
        perm: u32,
        rdev: (u32, u32),
        data: &[u8],
    ) -> std::io::Result<()> {
        let size = u32::try_from(data.len()).map_err(|_| {
            std::io::Error::other(format!("{name}: {} bytes is too big for cpio", data.len()))
        })?;
        self.ino += 1;
        let nlink = if matches!(kind, ModeFileType::Directory) { 2 } else { 1 };
        let out = self.out.take().ok_or_else(|| std::io::Error::other("initramfs writer already failed"))?;
        let mut w = cpio::NewcBuilder::new(name)
            .ino(self.ino)
            .mode(perm)
            .set_mode_file_type(kind)
            .nlink(nlink)
            .rdev_major(rdev.0)
            .rdev_minor(rdev.1)
            .write(out, size);
        w.write_all(data)?;
        self.out = Some(w.finish()?);
        Ok(())
    }

    fn dir(&mut self, name: &str) -> std::io::Result<()> {
        self.entry(name, ModeFileType::Directory, 0o755, &[])
    }

    fn file(&mut self, name: &str, perm: u32, data: &[u8]) -> std::io::Result<()> {
        self.entry(name, ModeFileType::Regular, perm, data)
    }

    fn char_dev(&mut self, name: &str, major: u32, minor: u32) -> std::io::Result<()> {
        self.entry_dev(name, ModeFileType::Char, 0o600, (major, minor), &[])
    }

    fn finish(mut self) -> std::io::Result<W> {
        let out = self.out.take().ok_or_else(|| std::io::Error::other("initramfs writer already failed"))?;
        cpio::newc::trailer(out)
    }
}

// ---------------------------------------------------------------------------------------------------
// Booting and parsing the results.

#[derive(Default)]
struct Outcome {
    passed: usize,
    failed: usize,
    /// Problems other than failed tests: timeout, missing results, crashes.
    problems: Vec<String>,
    /// The status in the guest's `done` marker.
    guest_status: Option<i32>,
    /// Binaries that exited non-zero or never finished ("test/NAME", "example/NAME").
    failed_binaries: Vec<String>,
    /// The guest did not finish in time and QEMU was killed.
    timed_out: bool,
    /// Tests that reported themselves skipped by design (counted by libtest as passed, and taken out
    /// of `passed` here), and the reasons they gave.
    skipped: usize,
    skip_reasons: Vec<String>,
}

impl Outcome {
    fn ok(&self) -> bool {
        self.failed == 0 && self.problems.is_empty()
    }

    fn summary_line(&self, vm: Vm) -> String {
        let mut line = format!("{}: {} passed, {} failed", vm.tag(), self.passed, self.failed);
        if self.skipped > 0 {
            line += &format!(", {} skipped by design ({})", self.skipped, self.skip_reasons.join(", "));
        }
        line
    }

    /// Takes the tests that reported themselves skipped (`@@xtask skip NAME REASON` lines on the
    /// console, written by the tests' common helpers) out of the passed ones.
    fn count_skips(&mut self, console: &str) {
        for line in console.lines() {
            let line = strip_escapes(line);
            let Some(rest) = line.find("@@xtask skip ").map(|i| &line[i + "@@xtask skip ".len()..]) else {
                continue;
            };
            self.skipped += 1;
            let reason = rest.split_whitespace().nth(1).unwrap_or("?").to_string();
            if !self.skip_reasons.contains(&reason) {
                self.skip_reasons.push(reason);
            }
        }
        self.passed = self.passed.saturating_sub(self.skipped);
    }
}

/// True if `examples/NAME.rs` uses the kernel's mock IOMMU (the `testing` module).
fn uses_the_mock(root: &Path, name: &str) -> bool {
    std::fs::read_to_string(root.join("examples").join(format!("{name}.rs")))
        .is_ok_and(|source| source.contains("iommufd::testing"))
}

fn qemu_command(image: &Path, p: &Prepared, vm: Vm, mode: Mode, results: &Path) -> Command {
    let mode = match mode {
        Mode::Test => "test",
        Mode::Demo => "demo",
        Mode::Bench => "bench",
    };
    // no_timer_check: under TCG on a loaded host the guest's check that the timer interrupt arrives
    // through the (interrupt-remapped) IO-APIC can time out and panic the boot; the timer works.
    let iommu = vm.iommu;
    let mut cmdline = format!(
        "console=ttyS0 panic=-1 quiet no_timer_check hung_task_timeout_secs=15 hugepages={HUGEPAGES} {} \
         IOMMUFD_TEST_IOMMU={} IOMMUFD_TEST_KERNEL={} IOMMUFD_VM_MODE={mode}",
        iommu.cmdline(),
        iommu.name(),
        vm.kernel.release
    );
    if let Some(reason) = vm.no_mock() {
        cmdline += &format!(" IOMMUFD_TEST_NO_MOCK={reason}");
    }
    // On a kernel older than the pinned one, an example that exits with 77 (the kernel lacks what it
    // needs, and it printed which) is skipped by design; on the pinned kernel it fails.
    if vm.kernel.name != crate::kernel::PINNED.name {
        cmdline += " IOMMUFD_TEST_OLDER_KERNEL=1";
    }
    let mut cmd = Command::new("qemu-system-x86_64");
    // One vCPU: with two, about 1 boot in 10 froze outright under TCG (no hung-task or soft-lockup
    // report, at a process exit or an unmap, where the kernel sends TLB-shootdown IPIs); with one, 20
    // boots in a row (40 suite runs) never did, at the same speed.
    cmd.args([
        "-machine",
        "q35,kernel-irqchip=split",
        "-accel",
        "tcg",
        "-cpu",
        "max",
        "-smp",
        "1",
        "-m",
        "2G",
    ])
    .args(iommu.qemu_args())
    .args(["-device", "edu", "-nic", "none", "-nographic", "-no-reboot"])
    // A device that starts on its Linux driver (virtio-pci, virtio_rng), behind the same IOMMU: the
    // hardware tier's bind/test/restore is rehearsed on it.
    .args(["-device", "virtio-rng-pci,disable-legacy=on,iommu_platform=on"])
    .args(["-device", "isa-debug-exit,iobase=0xf4,iosize=0x04"])
    .args(["-serial", "mon:stdio"])
    .arg("-serial")
    .arg(format!("file:{}", results.display()))
    .arg("-kernel")
    .arg(image)
    .arg("-initrd")
    .arg(&p.initramfs)
    .arg("-append")
    .arg(cmdline)
    .stdin(Stdio::null())
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    cmd
}

fn boot(p: &Prepared, vm: Vm, mode: Mode, opts: &Options) -> Result<Outcome> {
    let tag = vm.tag();
    let dir = cache_dir().join("vm");
    std::fs::create_dir_all(&dir)?;
    let console_path = vm.console_path();
    let results_path = dir.join(format!("results-{}.txt", vm.key()));
    let _ = std::fs::remove_file(&results_path);
    let image = p
        .kernels
        .iter()
        .find(|(k, _)| *k == vm.kernel)
        .map(|(_, image)| image)
        .ok_or_else(|| format!("{tag}: kernel {} was not prepared", vm.kernel.name))?;

    let mut cmd = qemu_command(image, p, vm, mode, &results_path);
    eprintln!(
        "{tag}: booting (TCG, timeout {}s); console: {}",
        opts.timeout.as_secs(),
        console_path.display()
    );
    let started = Instant::now();
    // From here on every way out, `?` included, kills and reaps QEMU (2 GiB of guest memory); if
    // xtask itself is killed, the kernel kills QEMU.
    let mut qemu = Guarded::spawn(&mut cmd).map_err(|e| format!("qemu-system-x86_64: {e}"))?;
    let console = std::fs::File::create(&console_path)?;
    let (tx, rx) = mpsc::channel();
    let stdout = qemu.child().stdout.take().ok_or("no qemu stdout")?;
    let stderr = qemu.child().stderr.take().ok_or("no qemu stderr")?;
    let readers =
        [forward_lines(stdout, console.try_clone()?, tx.clone()), forward_lines(stderr, console, tx)];

    let mut booted = None;
    let mut timed_out = false;
    let status = loop {
        while let Ok(line) = rx.try_recv() {
            show_line(&tag, &line, opts.verbose, started, &mut booted);
        }
        if let Some(status) = qemu.try_wait()? {
            break Some(status);
        }
        if started.elapsed() > opts.timeout {
            timed_out = true;
            qemu.kill()?;
            break None;
        }
        if let Ok(line) = rx.recv_timeout(Duration::from_millis(100)) {
            show_line(&tag, &line, opts.verbose, started, &mut booted);
        }
    };
    for r in readers {
        let _ = r.join();
    }
    while let Ok(line) = rx.try_recv() {
        show_line(&tag, &line, opts.verbose, started, &mut booted);
    }
    let wall = started.elapsed();

    let results = std::fs::read_to_string(&results_path).unwrap_or_default();
    let mut outcome = parse_results(&results);
    outcome.timed_out = timed_out;
    outcome.count_skips(&String::from_utf8_lossy(&std::fs::read(&console_path).unwrap_or_default()));
    if timed_out {
        outcome.problems.push(format!("timed out after {}s (QEMU killed)", opts.timeout.as_secs()));
    }
    if let Some(status) = status {
        // isa-debug-exit: guest status s gives exit code (s << 1) | 1; 0 means a poweroff or a reset
        // (a panic, with panic=-1 and -no-reboot), which the `done` marker (or its absence) tells apart.
        let expected = outcome.guest_status.map(|s| (s << 1) | 1);
        match status.code() {
            Some(0) => {}
            Some(code) if Some(code) == expected => {}
            other => outcome.problems.push(format!(
                "QEMU exited with {other:?} but the guest reported status {:?}",
                outcome.guest_status
            )),
        }
    }
    if !outcome.ok() && outcome.failed == 0 {
        outcome.failed = 1; // the run itself failed: never report "0 failed" for it
    }
    let boot_time =
        booted.map(|b: Duration| format!(", booted in {:.1}s", b.as_secs_f64())).unwrap_or_default();
    eprintln!("{tag}: QEMU ran {:.1}s{boot_time}", wall.as_secs_f64());
    if !outcome.ok() {
        for p in &outcome.problems {
            eprintln!("{tag}: PROBLEM: {p}");
        }
        let console = String::from_utf8_lossy(&std::fs::read(&console_path).unwrap_or_default()).into_owned();
        for name in &outcome.failed_binaries {
            print_failure(&tag, &console, name);
        }
        print_tail(&console_path, 40);
        eprintln!("{tag}: whole console log: {}", console_path.display());
    }
    Ok(outcome)
}

fn forward_lines<R: std::io::Read + Send + 'static>(
    from: R,
    mut log: std::fs::File,
    tx: mpsc::Sender<String>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let mut reader = BufReader::new(from);
        let mut buf = Vec::new();
        loop {
            buf.clear();
            match reader.read_until(b'\n', &mut buf) {
                Ok(0) | Err(_) => break,
                Ok(_) => {
                    let _ = log.write_all(&buf);
                    let line = String::from_utf8_lossy(&buf);
                    let _ = tx.send(line.trim_end_matches(['\r', '\n']).to_string());
                }
            }
        }
    })
}

fn show_line(tag: &str, line: &str, verbose: bool, started: Instant, booted: &mut Option<Duration>) {
    let line = strip_escapes(line);
    // The first marker may follow the terminal resets that the firmware and kernel print.
    let marker = line.find("@@xtask ").map(|i| &line[i + "@@xtask ".len()..]);
    if let Some(marker) = marker
        && marker.starts_with("init ")
        && booted.is_none()
    {
        *booted = Some(started.elapsed());
    }
    if verbose {
        println!("{line}");
    } else if let Some(marker) = marker
        && (marker.starts_with("result ") || marker.starts_with("end ") || marker.starts_with("error "))
    {
        eprintln!("{tag}: [{:>5.1}s] {marker}", started.elapsed().as_secs_f64());
    }
}

/// Drops terminal escape sequences (SeaBIOS and the kernel reset the terminal) and other control bytes.
fn strip_escapes(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\x1b' => {
                if chars.next_if_eq(&'[').is_some() {
                    // CSI: parameters and intermediates up to a final byte in @..~
                    for c in chars.by_ref() {
                        if ('@'..='~').contains(&c) {
                            break;
                        }
                    }
                } else {
                    chars.next();
                }
            }
            '\t' => out.push(c),
            c if c.is_control() => {}
            c => out.push(c),
        }
    }
    out
}

/// Prints what a failed binary wrote to the console: from libtest's "failures:" on if it got there,
/// else the end of its output.
fn print_failure(tag: &str, console: &str, name: &str) {
    let begin = format!("@@xtask begin {name}");
    let end = format!("@@xtask end {name} ");
    let lines: Vec<&str> = console
        .lines()
        .skip_while(|l| !l.contains(&begin))
        .skip(1)
        .take_while(|l| !l.contains(&end))
        .collect();
    let from = lines.iter().position(|l| l.trim_end() == "failures:").unwrap_or(0);
    let shown = &lines[from.max(lines.len().saturating_sub(150))..];
    eprintln!("---- {tag}: {name} failed; its output{} ----", if from > 0 { " from failures:" } else { "" });
    for l in shown {
        eprintln!("{}", strip_escapes(l));
    }
}

fn print_tail(path: &Path, lines: usize) {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    eprintln!("---- last {} lines of {} ----", lines.min(all.len()), path.display());
    for l in &all[all.len().saturating_sub(lines)..] {
        eprintln!("{}", strip_escapes(l));
    }
    eprintln!("----");
}

/// Parses the guest's marker lines (second serial port).
fn parse_results(text: &str) -> Outcome {
    let mut outcome = Outcome::default();
    let mut open: Option<String> = None;
    let mut summaries = 0usize;
    let mut done = false;
    for line in text.lines().map(|l| l.trim_end_matches('\r')) {
        let (word, rest) = line.split_once(' ').unwrap_or((line, ""));
        match word {
            "begin" => {
                open = Some(rest.to_string());
                summaries = 0;
            }
            "result" => {
                // "result NAME test result: ok. 2 passed; 0 failed; 1 ignored; ..."
                let counts = rest.split_once("test result:").map_or("", |(_, c)| c);
                outcome.passed += count(counts, "passed");
                outcome.failed += count(counts, "failed");
                summaries += 1;
            }
            "end" => {
                let (name, rc) = rest.rsplit_once(" rc=").unwrap_or((rest, "?"));
                let rc_ok = rc == "0";
                if !rc_ok {
                    outcome.failed_binaries.push(name.to_string());
                }
                if name.starts_with("example/") || name.starts_with("check/") {
                    // An example, or a check of the guest script, is one check: it passes when it
                    // exits 0.
                    if rc_ok { outcome.passed += 1 } else { outcome.failed += 1 }
                } else if !rc_ok && summaries == 0 {
                    outcome.failed += 1;
                    outcome.problems.push(format!("{name} exited with {rc} without a libtest summary"));
                } else if !rc_ok && !outcome_has_failures(text, name) {
                    outcome.failed += 1;
                    outcome.problems.push(format!("{name} exited with {rc} although its tests passed"));
                }
                open = None;
            }
            "done" => {
                done = true;
                outcome.guest_status = rest.strip_prefix("status=").and_then(|s| s.parse().ok());
                if outcome.guest_status != Some(0) && outcome.failed == 0 && outcome.problems.is_empty() {
                    outcome.problems.push(format!("the guest finished with {rest}"));
                }
            }
            "error" => outcome.problems.push(format!("guest: {rest}")),
            _ => {}
        }
    }
    if let Some(name) = open {
        outcome.failed_binaries.push(name.clone());
        outcome.failed += 1;
        outcome.problems.push(format!("{name} never finished"));
    }
    if !done {
        outcome.problems.push("the guest never reported completion (no `done` marker)".to_string());
    }
    outcome
}

/// True if any libtest summary of `name` reported failures.
fn outcome_has_failures(text: &str, name: &str) -> bool {
    let prefix = format!("result {name} ");
    text.lines().filter_map(|l| l.strip_prefix(&prefix)).any(|l| count(l, "failed") > 0)
}

/// The number before `word` in "N passed; M failed; ..." (0 if absent).
fn count(summary: &str, word: &str) -> usize {
    let words: Vec<&str> = summary.split(|c: char| c.is_whitespace() || c == ';' || c == '.').collect();
    words.windows(2).find(|w| w[1] == word).and_then(|w| w[0].parse().ok()).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn options_default_to_both_iommus_and_the_default_timeout() {
        let o = parse_options(&[], false).unwrap();
        assert_eq!(o.iommus, [Iommu::Intel, Iommu::Virtio]);
        assert_eq!(o.timeout, Duration::from_secs(DEFAULT_TIMEOUT_SECS));
        assert!(!o.verbose && o.test_args.is_empty());
        let demo = parse_options(&[], true).unwrap();
        assert_eq!(demo.iommus, [Iommu::Intel]);
        assert!(demo.verbose, "the demo streams the console");
    }

    #[test]
    fn options_are_parsed() {
        let o = parse_options(
            &args(&["--iommu", "virtio", "--timeout", "30", "-v", "--", "ioas", "--exact"]),
            false,
        )
        .unwrap();
        assert_eq!(o.iommus, [Iommu::Virtio]);
        assert_eq!(o.timeout, Duration::from_secs(30));
        assert!(o.verbose);
        assert_eq!(o.test_args, ["ioas", "--exact"]);
        let o = parse_options(&args(&["--iommu", "both", "--", "--", "-v"]), false).unwrap();
        assert_eq!(o.iommus, [Iommu::Intel, Iommu::Virtio]);
        assert_eq!(o.test_args, ["--", "-v"], "everything after `--` goes to the tests");
    }

    #[test]
    fn bad_options_are_refused() {
        for bad in [
            &["--iommu"][..],
            &["--iommu", "amd"],
            &["--timeout"],
            &["--timeout", "soon"],
            &["--timeout", "-1"],
            &["--frobnicate"],
        ] {
            assert!(parse_options(&args(bad), false).is_err(), "{bad:?} was accepted");
        }
        assert!(parse_options(&args(&["--", "x"]), true).is_err(), "the demo takes no test arguments");
    }

    #[test]
    fn cargo_messages_give_the_executables() {
        let stdout = br#"{"reason":"compiler-artifact","package_id":"path+file:///w#iommufd@0.1.0","manifest_path":"/w/Cargo.toml","target":{"kind":["lib"],"crate_types":["lib"],"name":"iommufd","src_path":"/w/src/lib.rs","edition":"2024","doc":true,"doctest":true,"test":true},"profile":{"opt_level":"0","debuginfo":1,"debug_assertions":true,"overflow_checks":true,"test":true},"features":["testing"],"filenames":["/w/target/debug/deps/iommufd-1"],"executable":"/w/target/x86_64-unknown-linux-gnu/debug/deps/iommufd-1","fresh":true}
{"reason":"compiler-artifact","target":{"kind":["test"],"name":"ioas \"quoted\" \u00e9"},"executable":"/w/t/ioas-2","fresh":false}
{"reason":"compiler-artifact","target":{"kind":["lib"],"name":"libc"},"executable":null,"filenames":[]}
{"reason":"build-script-executed","package_id":"x","linked_libs":[],"linked_paths":[],"cfgs":[],"env":[],"out_dir":"/o"}
{"reason":"compiler-message","package_id":"x","message":{"rendered":"warning: x\n","level":"warning"}}
not json: a build script's stray line
{"reason":"compiler-artifact","target":{"kind":["example"],"name":"edu_dma"},"executable":"/w/e/edu_dma"}
{"reason":"build-finished","success":true}
"#;
        let found = parse_executables(stdout).unwrap();
        let found: Vec<(&str, &str, &Path)> =
            found.iter().map(|(k, n, p)| (k.as_str(), n.as_str(), p.as_path())).collect();
        assert_eq!(
            found,
            [
                ("lib", "iommufd", Path::new("/w/target/x86_64-unknown-linux-gnu/debug/deps/iommufd-1")),
                ("test", "ioas \"quoted\" é", Path::new("/w/t/ioas-2")),
                ("example", "edu_dma", Path::new("/w/e/edu_dma")),
            ]
        );
    }

    #[test]
    fn malformed_cargo_messages_are_errors() {
        assert!(parse_executables(br#"{"reason":"compiler-artifact","executable":"/x""#).is_err());
        assert!(parse_executables(br#"{"executable":"/x"}"#).is_err(), "no reason");
        assert!(
            parse_executables(br#"{"reason":"compiler-artifact","executable":"/x"}"#).is_err(),
            "no target"
        );
        assert!(parse_executables(b"").unwrap().is_empty());
    }

    #[test]
    fn the_initramfs_reads_back_as_written() {
        let mut w = Initramfs::new(Vec::new());
        w.dir("bin").unwrap();
        w.char_dev("dev/console", 5, 1).unwrap();
        w.file("init", 0o755, b"#!/bin/sh\n").unwrap();
        w.file("etc/odd", 0o644, b"abcde").unwrap(); // sizes that need padding
        w.file("empty", 0o600, b"").unwrap();
        let archive = w.finish().unwrap();
        assert_eq!(archive.len() % 4, 0);

        let mut entries = Vec::new();
        let mut rest = archive.as_slice();
        loop {
            let mut r = cpio::NewcReader::new(rest).unwrap();
            let e = r.entry();
            if e.is_trailer() {
                break;
            }
            let meta = (e.name().to_string(), e.mode(), e.nlink(), e.rdev_major(), e.rdev_minor(), e.ino());
            assert_eq!((e.uid(), e.gid(), e.mtime()), (0, 0, 0), "owned by root, reproducible");
            let mut data = Vec::new();
            std::io::Read::read_to_end(&mut r, &mut data).unwrap();
            entries.push((meta, data));
            rest = r.finish().unwrap();
        }
        let inodes: std::collections::BTreeSet<u32> = entries.iter().map(|((.., ino), _)| *ino).collect();
        assert_eq!(inodes.len(), entries.len(), "one inode per entry");
        let got: Vec<_> = entries.into_iter().map(|((n, m, l, ma, mi, _), d)| (n, m, l, ma, mi, d)).collect();
        assert_eq!(
            got,
            [
                ("bin".to_string(), 0o040755, 2, 0, 0, vec![]),
                ("dev/console".to_string(), 0o020600, 1, 5, 1, vec![]),
                ("init".to_string(), 0o100755, 1, 0, 0, b"#!/bin/sh\n".to_vec()),
                ("etc/odd".to_string(), 0o100644, 1, 0, 0, b"abcde".to_vec()),
                ("empty".to_string(), 0o100600, 1, 0, 0, vec![]),
            ]
        );
    }

    fn outcome(passed: usize, failed: usize, timed_out: bool) -> Outcome {
        let mut o = Outcome { passed, failed, timed_out, ..Outcome::default() };
        if timed_out {
            o.problems.push("timed out".into());
            o.failed = o.failed.max(1);
        }
        o
    }

    const INTEL_7_3: Vm = Vm { kernel: &PINNED, iommu: Iommu::Intel };
    const VIRTIO_7_3: Vm = Vm { kernel: &PINNED, iommu: Iommu::Virtio };

    #[test]
    fn a_hung_guest_fails_the_run_and_is_named_in_the_summary() {
        let t = Duration::from_secs(150);
        let (lines, ok) =
            summarize(&[(INTEL_7_3, outcome(100, 0, true)), (VIRTIO_7_3, outcome(155, 0, false))], t);
        assert!(!ok, "a hang must fail the run");
        assert!(
            lines[0].starts_with("vm(7.3/intel): HUNG: the guest did not finish within 150s"),
            "{lines:?}"
        );
        assert_eq!(lines.last().unwrap(), "255 passed, 1 failed");

        let (lines, ok) = summarize(&[(INTEL_7_3, outcome(155, 0, false))], t);
        assert!(ok);
        assert_eq!(lines, ["vm(7.3/intel): 155 passed, 0 failed", "155 passed, 0 failed"]);
    }

    #[test]
    fn the_matrix_is_every_kernel_under_every_iommu_and_names_its_vms() {
        let o = parse_options(&[], false).unwrap();
        let vms: Vec<String> = matrix(&o).into_iter().map(Vm::tag).collect();
        assert_eq!(vms, ["vm(7.3/intel)", "vm(7.3/virtio)", "vm(6.12/intel)", "vm(6.12/virtio)"]);
        let o = parse_options(&args(&["--kernel", "6.12", "--iommu", "virtio"]), false).unwrap();
        assert_eq!(matrix(&o), [Vm { kernel: &kernel::LTS_6_12, iommu: Iommu::Virtio }]);
        let o = parse_options(&args(&["--kernel", "all"]), false).unwrap();
        assert_eq!(o.kernels.len(), 2);
        assert!(parse_options(&args(&["--kernel", "5.10"]), false).is_err());
        assert!(parse_options(&args(&["--kernel"]), false).is_err());
        assert!(
            parse_options(&args(&["--kernel", "6.12"]), true).is_err(),
            "the demo boots the pinned kernel"
        );
        let demo = parse_options(&[], true).unwrap();
        assert_eq!(demo.kernels, [&PINNED]);
    }

    #[test]
    fn the_mock_tier_is_skipped_only_where_the_kernel_gives_mock_devices_to_intel_iommu() {
        let six_twelve = |iommu| Vm { kernel: &kernel::LTS_6_12, iommu };
        assert!(six_twelve(Iommu::Intel).no_mock().is_some());
        assert_eq!(six_twelve(Iommu::Virtio).no_mock(), None);
        assert_eq!(INTEL_7_3.no_mock(), None);
        assert_eq!(VIRTIO_7_3.no_mock(), None);
        let reason = six_twelve(Iommu::Intel).no_mock().unwrap();
        assert!(!reason.contains(char::is_whitespace), "it travels on the kernel command line");
    }

    #[test]
    fn the_mock_examples_are_known() {
        let root = workspace_root();
        assert!(uses_the_mock(&root, "dirty_precopy") && uses_the_mock(&root, "nested_viommu"));
        assert!(!uses_the_mock(&root, "edu_dma"));
        assert!(!uses_the_mock(&root, "no_such_example"));
    }

    #[test]
    fn skipped_tests_are_taken_out_of_the_passed_ones_and_summarized() {
        let mut o = outcome(10, 0, false);
        o.count_skips(
            "noise\n\x1b[0m@@xtask skip mock::a mock-device-probed-by-intel-iommu\n\
             test mock::a ... ok\n@@xtask skip hwpt::b mock-device-probed-by-intel-iommu\n",
        );
        assert_eq!((o.passed, o.skipped), (8, 2));
        let vm = Vm { kernel: &kernel::LTS_6_12, iommu: Iommu::Intel };
        let (lines, ok) = summarize(&[(vm, o)], Duration::from_secs(1));
        assert!(ok, "skipped by design is not a failure");
        assert_eq!(
            lines,
            [
                "vm(6.12/intel): 8 passed, 0 failed, 2 skipped by design (mock-device-probed-by-intel-iommu)",
                "8 passed, 0 failed, 2 skipped by design"
            ]
        );
    }

    #[test]
    fn guest_results_are_counted() {
        let text = "\
init
begin test/ioas
result test/ioas test result: ok. 12 passed; 0 failed; 3 ignored; 0 measured; 0 filtered out
end test/ioas rc=0
begin test/mock
result test/mock test result: FAILED. 4 passed; 2 failed; 0 ignored
end test/mock rc=101
begin example/edu_dma
end example/edu_dma rc=0
begin check/vfio-bind
end check/vfio-bind rc=0
begin check/lsiommu
end check/lsiommu rc=1
done status=1
";
        let o = parse_results(text);
        assert_eq!((o.passed, o.failed), (18, 3));
        assert_eq!(o.failed_binaries, ["test/mock", "check/lsiommu"]);
        assert_eq!(o.guest_status, Some(1));
        assert!(o.problems.is_empty(), "{:?}", o.problems);
    }

    #[test]
    fn unfinished_or_crashed_guests_are_failures() {
        let o = parse_results("begin test/ioas\nresult test/ioas test result: ok. 3 passed; 0 failed\n");
        assert!(!o.ok());
        assert_eq!(o.failed_binaries, ["test/ioas"]);
        assert!(o.problems.iter().any(|p| p.contains("never finished")));
        assert!(o.problems.iter().any(|p| p.contains("no `done` marker")));

        let o = parse_results("begin test/raii\nend test/raii rc=139\ndone status=1\n");
        assert_eq!(o.failed, 1);
        assert!(o.problems.iter().any(|p| p.contains("without a libtest summary")), "{:?}", o.problems);

        let o = parse_results(
            "begin test/a\nresult test/a test result: ok. 2 passed; 0 failed\nend test/a rc=1\ndone status=1\n",
        );
        assert!(o.problems.iter().any(|p| p.contains("although its tests passed")), "{:?}", o.problems);
        assert!(!parse_results("error no edu device\ndone status=0\n").ok());
    }

    #[test]
    fn summary_counts() {
        let s = " ok. 12 passed; 1 failed; 3 ignored; 0 measured; 0 filtered out; finished in 1.2s";
        assert_eq!((count(s, "passed"), count(s, "failed"), count(s, "ignored")), (12, 1, 3));
        assert_eq!(count(s, "leaked"), 0);
        assert_eq!(count("", "passed"), 0);
    }

    #[test]
    fn console_escapes_are_stripped() {
        assert_eq!(strip_escapes("\x1b[2J\x1b[01;01H@@xtask init\r"), "@@xtask init");
        assert_eq!(strip_escapes("a\x1bcb\tc\x07"), "ab\tc");
        assert_eq!(strip_escapes("\x1b[0"), "", "an unterminated sequence");
    }

    #[test]
    fn shell_words_are_quoted() {
        assert_eq!(shell_quote("ioas"), "'ioas'");
        assert_eq!(shell_quote("it's $HOME"), r"'it'\''s $HOME'");
    }

    #[test]
    fn static_and_dynamic_elf_files_are_told_apart() {
        // This test binary is dynamically linked (it has a PT_INTERP).
        let me = std::env::current_exe().unwrap();
        assert!(!is_static(&me).unwrap());
        let mut elf = vec![0u8; 64];
        elf[..5].copy_from_slice(b"\x7fELF\x02");
        assert!(is_static(Path::new("/dev/null")).is_err());
        let path = std::env::temp_dir().join(format!("xtask-elf-{}", std::process::id()));
        std::fs::write(&path, &elf).unwrap();
        let got = is_static(&path);
        let _ = std::fs::remove_file(&path);
        assert!(got.unwrap(), "no program headers: nothing to load");
    }
}
