//! `cargo xtask vm-test` / `cargo xtask vm-demo`: the root crate's tests inside QEMU VMs.
//!
//! The VM boots the kernel from `cargo xtask kernel` with an initramfs holding busybox, the root crate's
//! test binaries and examples (linked statically), and `guest_init.sh` as `/init`. The guest binds the
//! `edu` device to vfio-pci, runs every test binary with `--include-ignored --test-threads=1` (tests that
//! need `/dev/iommu` are `#[ignore]` on the host), then the `edu_dma` example if there is one. It reports
//! on a second serial port that only `/init` writes to, which the host parses after QEMU exits. The
//! machine is TCG-only (q35, 2 vCPUs, 2 GiB), under intel-iommu and then virtio-iommu.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use crate::host::{self, Pkg};
use crate::{Result, cache_dir, kernel, workspace_root};

const GUEST_INIT: &str = include_str!("guest_init.sh");
const TARGET: &str = "x86_64-unknown-linux-gnu";
const DEFAULT_TIMEOUT_SECS: u64 = 150;
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

#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    Test,
    Demo,
}

struct Options {
    iommus: Vec<Iommu>,
    timeout: Duration,
    verbose: bool,
    test_args: Vec<String>,
}

fn parse_options(args: &[String], demo: bool) -> Result<Options> {
    let mut opts = Options {
        iommus: vec![Iommu::Intel, Iommu::Virtio],
        timeout: Duration::from_secs(DEFAULT_TIMEOUT_SECS),
        verbose: demo,
        test_args: Vec::new(),
    };
    if demo {
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

/// `cargo xtask vm-test [--iommu intel|virtio] [--timeout SECS] [-v] [-- ARGS]`.
pub fn vm_test(args: &[String]) -> Result<()> {
    let started = Instant::now();
    let opts = parse_options(args, false)?;
    let prepared = prepare(&opts)?;
    let mut totals = (0usize, 0usize);
    let mut lines = Vec::new();
    let mut ok = true;
    for &iommu in &opts.iommus {
        let mut outcome = boot(&prepared, iommu, Mode::Test, &opts)?;
        if outcome.timed_out {
            // A guest that freezes is an environment failure, not a test result (see `qemu_command`):
            // keep its console and boot once more. A second hang fails the run.
            let dir = cache_dir().join("vm");
            let kept = dir.join(format!("console-{}-hung.log", iommu.name()));
            std::fs::rename(dir.join(format!("console-{}.log", iommu.name())), &kept)?;
            eprintln!(
                "vm({}): WARNING: the guest hung; its console is kept in {}; booting once more",
                iommu.name(),
                kept.display()
            );
            outcome = boot(&prepared, iommu, Mode::Test, &opts)?;
            if outcome.ok() {
                lines.push(format!("vm({}): passed on the second boot after a guest hang", iommu.name()));
            }
        }
        totals.0 += outcome.passed;
        totals.1 += outcome.failed;
        ok &= outcome.ok();
        lines.push(outcome.summary_line(iommu));
    }
    eprintln!("vm-test: finished in {:.1}s", started.elapsed().as_secs_f64());
    for line in &lines {
        println!("{line}");
    }
    println!("{} passed, {} failed", totals.0, totals.1);
    if ok { Ok(()) } else { Err("vm-test failed (see above)".into()) }
}

/// `cargo xtask vm-demo [--timeout SECS]`: only the `edu_dma` example, under intel-iommu, output streamed.
pub fn vm_demo(args: &[String]) -> Result<()> {
    let opts = parse_options(args, true)?;
    let prepared = prepare(&opts)?;
    if !prepared.has_edu_dma {
        return Err("the root crate has no `edu_dma` example (examples/edu_dma.rs) yet".into());
    }
    let outcome = boot(&prepared, Iommu::Intel, Mode::Demo, &opts)?;
    if outcome.ok() { Ok(()) } else { Err("vm-demo failed (see above)".into()) }
}

struct Prepared {
    kernel: PathBuf,
    initramfs: PathBuf,
    has_edu_dma: bool,
    /// Held until the last VM has exited.
    _lock: std::fs::File,
}

fn prepare(opts: &Options) -> Result<Prepared> {
    // The initramfs, console logs and result files are shared paths: one vm-test/vm-demo at a time.
    let lock = host::lock(&cache_dir().join("vm/.lock"), "vm")?;
    host::ensure("cargo xtask vm-test", VM_DEPS)?;
    let kernel = kernel::ensure_kernel()?;
    let t = Instant::now();
    let bins = build_binaries()?;
    let (n_tests, n_examples, secs) = (bins.tests.len(), bins.examples.len(), t.elapsed().as_secs_f64());
    eprintln!("vm: built {n_tests} test binaries and {n_examples} examples in {secs:.1}s");
    let has_edu_dma = bins.examples.iter().any(|(name, _)| name == "edu_dma");
    let initramfs = pack_initramfs(&bins, &opts.test_args)?;
    Ok(Prepared { kernel, initramfs, has_edu_dma, _lock: lock })
}

// ---------------------------------------------------------------------------------------------------
// Building the binaries.

struct Binaries {
    /// (file name in the guest, path on the host)
    tests: Vec<(String, PathBuf)>,
    examples: Vec<(String, PathBuf)>,
}

fn cargo(what: &[&str]) -> Command {
    let mut cmd = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    cmd.current_dir(workspace_root())
        .args(what)
        .args(["-p", "iommufd", "--target", TARGET, "--message-format=json-render-diagnostics"])
        // The suite includes the mock-IOMMU (`testing`) and async (`tokio`) tests.
        .args(["--features", "testing,tokio", "--locked"])
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
    let mut found = Vec::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Ok(msg) = json::parse(line) else { continue };
        if msg.get("reason").and_then(json::Value::as_str) != Some("compiler-artifact") {
            continue;
        }
        let Some(exe) = msg.get("executable").and_then(json::Value::as_str) else { continue };
        let target = msg.get("target");
        let name = target.and_then(|t| t.get("name")).and_then(json::Value::as_str).unwrap_or("unnamed");
        let kind = target
            .and_then(|t| t.get("kind"))
            .and_then(|k| k.as_array())
            .and_then(|k| k.first())
            .and_then(json::Value::as_str)
            .unwrap_or("unknown");
        found.push((kind.to_string(), name.to_string(), PathBuf::from(exe)));
    }
    Ok(found)
}

fn build_binaries() -> Result<Binaries> {
    eprintln!("vm: building the root crate's tests and examples (static, --target {TARGET})");
    let mut tests = Vec::new();
    for (kind, name, path) in cargo_executables(cargo(&["test", "--no-run", "--tests"]))? {
        // Integration tests keep their name; the library's unit tests become "lib-iommufd".
        tests.push((if kind == "test" { name } else { format!("{kind}-{name}") }, path));
    }
    let mut examples = Vec::new();
    for (kind, name, path) in cargo_executables(cargo(&["build", "--examples"]))? {
        if kind == "example" {
            examples.push((name, path));
        }
    }
    tests.sort();
    examples.sort();
    for (name, path) in tests.iter().chain(&examples) {
        if !is_static(path)? {
            return Err(format!("{name} ({}) is not statically linked", path.display()).into());
        }
    }
    Ok(Binaries { tests, examples })
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
// The initramfs: a cpio (newc) archive written here. Left uncompressed: under TCG the guest kernel
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
    let mut w = cpio::Writer::new(std::io::BufWriter::new(std::fs::File::create(&cpio_path)?));
    for d in ["bin", "dev", "etc", "proc", "sys", "tmp", "root", "tests", "examples"] {
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
    w.finish()?.flush()?;
    eprintln!(
        "vm: initramfs {} ({:.1} MiB)",
        cpio_path.display(),
        std::fs::metadata(&cpio_path)?.len() as f64 / (1 << 20) as f64
    );
    Ok(cpio_path)
}

mod cpio {
    //! A writer for the "newc" cpio format the kernel unpacks as an initramfs.
    use std::io::{Result, Write};

    pub struct Writer<W: Write> {
        out: W,
        offset: usize,
        ino: u32,
    }

    impl<W: Write> Writer<W> {
        pub fn new(out: W) -> Self {
            Writer { out, offset: 0, ino: 1 }
        }

        fn pad(&mut self) -> Result<()> {
            let n = (4 - self.offset % 4) % 4;
            self.write(&[0; 3][..n])
        }

        fn write(&mut self, data: &[u8]) -> Result<()> {
            self.out.write_all(data)?;
            self.offset += data.len();
            Ok(())
        }

        fn entry(&mut self, name: &str, mode: u32, rdev: (u32, u32), data: &[u8]) -> Result<()> {
            self.ino += 1;
            let fields = [
                self.ino,
                mode,
                0, // uid
                0, // gid
                if mode & 0o170000 == 0o040000 { 2 } else { 1 },
                0, // mtime: reproducible
                u32::try_from(data.len()).map_err(std::io::Error::other)?,
                0, // devmajor
                0, // devminor
                rdev.0,
                rdev.1,
                name.len() as u32 + 1,
                0, // check
            ];
            let mut header = String::from("070701");
            for f in fields {
                header.push_str(&format!("{f:08x}"));
            }
            self.write(header.as_bytes())?;
            self.write(name.as_bytes())?;
            self.write(&[0])?;
            self.pad()?;
            self.write(data)?;
            self.pad()
        }

        pub fn dir(&mut self, name: &str) -> Result<()> {
            self.entry(name, 0o040755, (0, 0), &[])
        }

        pub fn file(&mut self, name: &str, perm: u32, data: &[u8]) -> Result<()> {
            self.entry(name, 0o100000 | perm, (0, 0), data)
        }

        pub fn char_dev(&mut self, name: &str, major: u32, minor: u32) -> Result<()> {
            self.entry(name, 0o020600, (major, minor), &[])
        }

        pub fn finish(mut self) -> Result<W> {
            self.entry("TRAILER!!!", 0, (0, 0), &[])?;
            Ok(self.out)
        }
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
}

impl Outcome {
    fn ok(&self) -> bool {
        self.failed == 0 && self.problems.is_empty()
    }

    fn summary_line(&self, iommu: Iommu) -> String {
        format!("vm({}): {} passed, {} failed", iommu.name(), self.passed, self.failed)
    }
}

fn qemu_command(p: &Prepared, iommu: Iommu, mode: Mode, results: &Path) -> Command {
    let mode = match mode {
        Mode::Test => "test",
        Mode::Demo => "demo",
    };
    let cmdline = format!(
        "console=ttyS0 panic=-1 quiet hung_task_timeout_secs=15 hugepages={HUGEPAGES} {} \
         IOMMUFD_TEST_IOMMU={} IOMMUFD_VM_MODE={mode}",
        iommu.cmdline(),
        iommu.name()
    );
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
    .args(["-device", "isa-debug-exit,iobase=0xf4,iosize=0x04"])
    .args(["-serial", "mon:stdio"])
    .arg("-serial")
    .arg(format!("file:{}", results.display()))
    .arg("-kernel")
    .arg(&p.kernel)
    .arg("-initrd")
    .arg(&p.initramfs)
    .arg("-append")
    .arg(cmdline)
    .stdin(Stdio::null())
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    cmd
}

fn boot(p: &Prepared, iommu: Iommu, mode: Mode, opts: &Options) -> Result<Outcome> {
    let tag = format!("vm({})", iommu.name());
    let dir = cache_dir().join("vm");
    std::fs::create_dir_all(&dir)?;
    let console_path = dir.join(format!("console-{}.log", iommu.name()));
    let results_path = dir.join(format!("results-{}.txt", iommu.name()));
    let _ = std::fs::remove_file(&results_path);

    let mut cmd = qemu_command(p, iommu, mode, &results_path);
    eprintln!(
        "{tag}: booting (TCG, timeout {}s); console: {}",
        opts.timeout.as_secs(),
        console_path.display()
    );
    let started = Instant::now();
    let mut child = cmd.spawn().map_err(|e| format!("qemu-system-x86_64: {e}"))?;
    let console = std::fs::File::create(&console_path)?;
    let (tx, rx) = mpsc::channel();
    let stdout = child.stdout.take().ok_or("no qemu stdout")?;
    let stderr = child.stderr.take().ok_or("no qemu stderr")?;
    let readers =
        [forward_lines(stdout, console.try_clone()?, tx.clone()), forward_lines(stderr, console, tx)];

    let mut booted = None;
    let mut timed_out = false;
    let status = loop {
        while let Ok(line) = rx.try_recv() {
            show_line(&tag, &line, opts.verbose, started, &mut booted);
        }
        if let Some(status) = child.try_wait()? {
            break Some(status);
        }
        if started.elapsed() > opts.timeout {
            timed_out = true;
            kill(&mut child);
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

fn kill(child: &mut Child) {
    let _ = child.kill();
    let _ = child.wait();
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
                if name.starts_with("example/") {
                    // An example is one check: it passes when it exits 0.
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

// ---------------------------------------------------------------------------------------------------

mod json {
    //! Just enough JSON to read cargo's `--message-format=json` lines.

    pub enum Value {
        Null,
        Bool(#[allow(dead_code)] bool),
        Number,
        String(String),
        Array(Vec<Value>),
        Object(Vec<(String, Value)>),
    }

    impl Value {
        pub fn get(&self, key: &str) -> Option<&Value> {
            match self {
                Value::Object(fields) => fields.iter().find(|(k, _)| k == key).map(|(_, v)| v),
                _ => None,
            }
        }

        pub fn as_str(&self) -> Option<&str> {
            match self {
                Value::String(s) => Some(s),
                _ => None,
            }
        }

        pub fn as_array(&self) -> Option<&[Value]> {
            match self {
                Value::Array(a) => Some(a),
                _ => None,
            }
        }
    }

    pub fn parse(text: &str) -> Result<Value, String> {
        let mut p = Parser { s: text.as_bytes(), i: 0 };
        let v = p.value()?;
        p.ws();
        if p.i != p.s.len() {
            return Err(format!("trailing data at {}", p.i));
        }
        Ok(v)
    }

    struct Parser<'a> {
        s: &'a [u8],
        i: usize,
    }

    impl Parser<'_> {
        fn ws(&mut self) {
            while self.i < self.s.len() && self.s[self.i].is_ascii_whitespace() {
                self.i += 1;
            }
        }

        fn peek(&mut self) -> Option<u8> {
            self.ws();
            self.s.get(self.i).copied()
        }

        fn expect(&mut self, c: u8) -> Result<(), String> {
            if self.peek() == Some(c) {
                self.i += 1;
                Ok(())
            } else {
                Err(format!("expected '{}' at {}", c as char, self.i))
            }
        }

        fn literal(&mut self, word: &str, v: Value) -> Result<Value, String> {
            if self.s[self.i..].starts_with(word.as_bytes()) {
                self.i += word.len();
                Ok(v)
            } else {
                Err(format!("bad literal at {}", self.i))
            }
        }

        fn value(&mut self) -> Result<Value, String> {
            match self.peek().ok_or("unexpected end")? {
                b'{' => {
                    self.i += 1;
                    let mut fields = Vec::new();
                    if self.peek() == Some(b'}') {
                        self.i += 1;
                        return Ok(Value::Object(fields));
                    }
                    loop {
                        self.ws();
                        let k = self.string()?;
                        self.expect(b':')?;
                        fields.push((k, self.value()?));
                        match self.peek() {
                            Some(b',') => self.i += 1,
                            Some(b'}') => {
                                self.i += 1;
                                return Ok(Value::Object(fields));
                            }
                            _ => return Err(format!("bad object at {}", self.i)),
                        }
                    }
                }
                b'[' => {
                    self.i += 1;
                    let mut items = Vec::new();
                    if self.peek() == Some(b']') {
                        self.i += 1;
                        return Ok(Value::Array(items));
                    }
                    loop {
                        items.push(self.value()?);
                        match self.peek() {
                            Some(b',') => self.i += 1,
                            Some(b']') => {
                                self.i += 1;
                                return Ok(Value::Array(items));
                            }
                            _ => return Err(format!("bad array at {}", self.i)),
                        }
                    }
                }
                b'"' => Ok(Value::String(self.string()?)),
                b't' => self.literal("true", Value::Bool(true)),
                b'f' => self.literal("false", Value::Bool(false)),
                b'n' => self.literal("null", Value::Null),
                _ => {
                    let start = self.i;
                    while self.i < self.s.len()
                        && matches!(self.s[self.i], b'-' | b'+' | b'.' | b'e' | b'E' | b'0'..=b'9')
                    {
                        self.i += 1;
                    }
                    if self.i == start {
                        return Err(format!("unexpected byte at {start}"));
                    }
                    Ok(Value::Number)
                }
            }
        }

        fn hex4(&mut self) -> Result<u32, String> {
            let h = self.s.get(self.i..self.i + 4).ok_or("short \\u escape")?;
            self.i += 4;
            u32::from_str_radix(std::str::from_utf8(h).map_err(|e| e.to_string())?, 16)
                .map_err(|e| e.to_string())
        }

        fn string(&mut self) -> Result<String, String> {
            if self.s.get(self.i) != Some(&b'"') {
                return Err(format!("expected string at {}", self.i));
            }
            self.i += 1;
            let mut out = Vec::new();
            loop {
                let c = *self.s.get(self.i).ok_or("unterminated string")?;
                self.i += 1;
                match c {
                    b'"' => return String::from_utf8(out).map_err(|e| e.to_string()),
                    b'\\' => {
                        let e = *self.s.get(self.i).ok_or("unterminated escape")?;
                        self.i += 1;
                        let ch = match e {
                            b'n' => '\n',
                            b't' => '\t',
                            b'r' => '\r',
                            b'b' => '\u{8}',
                            b'f' => '\u{c}',
                            b'u' => {
                                let mut code = self.hex4()?;
                                if (0xd800..0xdc00).contains(&code) && self.s[self.i..].starts_with(b"\\u") {
                                    self.i += 2;
                                    let low = self.hex4()?;
                                    code = 0x10000
                                        + ((code - 0xd800) << 10)
                                        + (low.wrapping_sub(0xdc00) & 0x3ff);
                                }
                                char::from_u32(code).unwrap_or('\u{fffd}')
                            }
                            other => other as char,
                        };
                        let mut buf = [0; 4];
                        out.extend_from_slice(ch.encode_utf8(&mut buf).as_bytes());
                    }
                    _ => out.push(c),
                }
            }
        }
    }
}
