//! `cargo xtask kernel`: the test VMs' kernels, built from Debian's `linux-source` at pinned versions.
//!
//! Config: `make allnoconfig`, merge the committed fragment `xtask/kernel.config`
//! (`scripts/kconfig/merge_config.sh -m`), `make olddefconfig`, then check that every line of the fragment
//! holds in the final `.config`. A kernel that predates some of the fragment's options names them in
//! [`Kernel::drop_options`]: their lines are left out of its fragment, and its final `.config` must not
//! know them at all. Each bzImage is cached under `<cache>/kernel/` keyed by the source version and a hash
//! of the fragment it was configured with, so a second run returns at once; each source version has its
//! own build directory.

use std::collections::{BTreeMap, VecDeque};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use crate::apt::Apt;
use crate::host::{self, Pkg};
use crate::process::Guarded;
use crate::{Result, cache_dir, run, workspace_root};

/// One test kernel: a Debian kernel source package at a pinned version.
#[derive(Debug, PartialEq, Eq)]
pub struct Kernel {
    /// The short name that `--kernel` takes (the upstream series).
    pub name: &'static str,
    /// Debian package holding the kernel source tarball, and its pinned version.
    pub package: &'static str,
    pub version: &'static str,
    /// The upstream release (`uname -r` without local suffixes), passed to the guest's tests.
    pub release: &'static str,
    /// Fragment options this kernel does not have (added in later releases): left out of its
    /// fragment, not verified, and required to be unknown to its final `.config`.
    pub drop_options: &'static [&'static str],
    /// The IOMMU core probes the mock IOMMU's devices (`CONFIG_IOMMUFD_TEST`) with the ops of the first
    /// IOMMU registered without a firmware node, which under intel-iommu is VT-d: the mock devices then
    /// belong to the Intel driver and every mock-domain operation fails. Later kernels give mock
    /// devices the mock IOMMU's own firmware node (`iommu_mock_device_add`).
    pub intel_takes_mock_devices: bool,
}

/// The kernel whose uAPI and test headers the committed bindings come from: built in
/// `<cache>/kernel/build`, with the whole fragment.
pub const PINNED: Kernel = Kernel {
    name: "7.3",
    package: "linux-source-7.3",
    version: "7.3.4-1~bpo13+1",
    release: "7.3.4",
    drop_options: &[],
    intel_takes_mock_devices: false,
};

/// The oldest kernel the VM suite runs on: Debian's 6.12 long-term kernel (bookworm-backports). The
/// generic page-table library and its AMDv1 format (used by the mock IOMMU since 6.19) do not exist in it.
pub const LTS_6_12: Kernel = Kernel {
    name: "6.12",
    package: "linux-source-6.12",
    version: "6.12.95-1~bpo12+1",
    release: "6.12.95",
    drop_options: &["CONFIG_GENERIC_PT", "CONFIG_IOMMU_PT", "CONFIG_IOMMU_PT_AMDV1"],
    intel_takes_mock_devices: true,
};

/// Every test kernel, the pinned one first.
pub const KERNELS: [&Kernel; 2] = [&PINNED, &LTS_6_12];

impl Kernel {
    /// The kernel whose `name` is given (`7.3`, `6.12`).
    pub fn by_name(name: &str) -> Option<&'static Kernel> {
        KERNELS.into_iter().find(|k| k.name == name)
    }

    /// Suffix of this kernel's build directory and logs: none for the pinned kernel (its paths predate
    /// the second kernel and its objects are reused), the source version for the others.
    fn suffix(&self) -> String {
        if *self == PINNED { String::new() } else { format!("-{}", self.version) }
    }

    fn build_dir(&self) -> PathBuf {
        cache_dir().join(format!("kernel/build{}", self.suffix()))
    }

    fn log(&self, what: &str) -> PathBuf {
        cache_dir().join(format!("kernel/{what}{}.log", self.suffix()))
    }

    /// This kernel's fragment: the committed one without the lines that set a dropped option.
    /// Unchanged (byte for byte, so the cache key stays the same) when nothing is dropped.
    fn fragment(&self, committed: &str) -> String {
        if self.drop_options.is_empty() {
            return committed.to_string();
        }
        let mut out = String::new();
        for line in committed.lines() {
            if !self.drop_options.iter().any(|o| option_of(line) == Some(*o)) {
                out.push_str(line);
                out.push('\n');
            }
        }
        out
    }

    /// The top directory of the unpacked source.
    pub fn source_dir(&self) -> PathBuf {
        cache_dir().join(format!("kernel/src-{}", self.version)).join(self.package)
    }
}

/// The option a fragment line sets (`CONFIG_X=...` or `# CONFIG_X is not set`).
fn option_of(line: &str) -> Option<&str> {
    let line = line.trim();
    if let Some(rest) = line.strip_prefix("# ") {
        rest.strip_suffix(" is not set").filter(|n| n.starts_with("CONFIG_"))
    } else if line.starts_with("CONFIG_") {
        line.split_once('=').map(|(name, _)| name)
    } else {
        None
    }
}

/// Host packages needed to unpack and build the kernel.
const BUILD_DEPS: &[Pkg] = &[
    Pkg::plain("build-essential"),
    Pkg::plain("bc"),
    Pkg::plain("flex"),
    Pkg::plain("bison"),
    Pkg::plain("libelf-dev"),
    Pkg::plain("libssl-dev"),
    Pkg::plain("xz-utils"),
];

pub fn fragment_path() -> PathBuf {
    workspace_root().join("xtask/kernel.config")
}

/// FNV-1a, 64 bit: a stable hash for cache keys (std's hashers are not stable across releases).
pub fn fnv64(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3))
}

/// Where the bzImage for `kernel` configured with `fragment` (its own) is (or will be) cached.
fn cached_image(kernel: &Kernel, fragment: &str) -> PathBuf {
    let key = format!("{}-{:016x}", kernel.version, fnv64(fragment.as_bytes()));
    cache_dir().join("kernel").join(format!("bzImage-{key}"))
}

/// `cargo xtask kernel [--kernel NAME|all]`.
pub fn kernel(args: &[String]) -> Result<()> {
    for k in parse_kernels(args, &[&PINNED])? {
        let image = ensure_kernel(k)?;
        println!("{}", image.display());
    }
    Ok(())
}

/// The kernels named by `--kernel NAME|all` in `args` (`default` without one). Other arguments are
/// refused.
pub fn parse_kernels(args: &[String], default: &[&'static Kernel]) -> Result<Vec<&'static Kernel>> {
    let mut it = args.iter();
    let mut chosen = default.to_vec();
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--kernel" => chosen = kernels_named(it.next().map(String::as_str))?,
            other => return Err(format!("unknown option {other:?} (see `cargo xtask`)").into()),
        }
    }
    Ok(chosen)
}

/// The value of a `--kernel` option: one kernel's name or `all`.
pub fn kernels_named(value: Option<&str>) -> Result<Vec<&'static Kernel>> {
    match value {
        Some("all") => Ok(KERNELS.to_vec()),
        other => other.and_then(Kernel::by_name).map(|k| vec![k]).ok_or_else(|| {
            let names: Vec<&str> = KERNELS.iter().map(|k| k.name).collect();
            format!("--kernel wants {} or all, got {other:?}", names.join(", ")).into()
        }),
    }
}

/// Returns the path of `kernel`'s bzImage, building it first if it is not cached.
pub fn ensure_kernel(kernel: &Kernel) -> Result<PathBuf> {
    let fragment_file = fragment_path();
    let committed = std::fs::read_to_string(&fragment_file)
        .map_err(|e| format!("reading {}: {e}", fragment_file.display()))?;
    let fragment = kernel.fragment(&committed);
    let image = cached_image(kernel, &fragment);
    if image.exists() {
        eprintln!("kernel: cached {}", image.display());
        return Ok(image);
    }
    let wanted = parse_fragment(&fragment)?;
    // One build at a time: they would only share the cores.
    let _lock = host::lock(&cache_dir().join("kernel/.lock"), "kernel")?;
    if image.exists() {
        eprintln!("kernel: cached {} (built by the other run)", image.display());
        return Ok(image);
    }
    host::ensure("cargo xtask kernel", BUILD_DEPS)?;
    let src = source_tree(kernel)?;
    let build = kernel.build_dir();
    std::fs::create_dir_all(&build)?;
    let started = Instant::now();

    // The pinned kernel merges the committed file itself (as it always has); another kernel merges its
    // own copy without the dropped lines.
    let merged_fragment = if kernel.drop_options.is_empty() {
        fragment_file.clone()
    } else {
        let own = build.join("xtask-kernel.config");
        std::fs::write(&own, &fragment)?;
        own
    };
    eprintln!(
        "kernel: configuring {} {} (allnoconfig + {} + olddefconfig)",
        kernel.package,
        kernel.version,
        merged_fragment.display()
    );
    let log_path = kernel.log("config");
    let _ = std::fs::remove_file(&log_path);
    let config = build.join(".config");
    make(&src, &build, &["allnoconfig"], &log_path)?;
    let merge = Command::new("sh")
        .current_dir(&src)
        .arg("scripts/kconfig/merge_config.sh")
        .args(["-m", "-O"])
        .arg(&build)
        .arg(&config)
        .arg(&merged_fragment)
        .output()?;
    if !merge.status.success() {
        return Err(format!(
            "merge_config.sh failed: {}\n{}{}",
            merge.status,
            String::from_utf8_lossy(&merge.stdout),
            String::from_utf8_lossy(&merge.stderr)
        )
        .into());
    }
    make(&src, &build, &["olddefconfig"], &log_path)?;
    let final_config = std::fs::read_to_string(&config)?;
    verify_config(&wanted, &final_config)?;
    verify_dropped(kernel.drop_options, &final_config)?;
    eprintln!("kernel: all {} fragment options hold in {}", wanted.len(), config.display());

    let jobs = std::thread::available_parallelism().map_or(1, |n| n.get());
    let log_path = kernel.log("build");
    eprintln!("kernel: building bzImage with -j{jobs} (full log: {})", log_path.display());
    build_logged(&src, &build, jobs, &log_path)?;

    let built = build.join("arch/x86/boot/bzImage");
    let tmp = image.with_extension("tmp");
    std::fs::copy(&built, &tmp)?;
    std::fs::copy(&config, image.with_file_name(format!("config-{}", file_key(&image))))?;
    std::fs::rename(&tmp, &image)?;
    let size = std::fs::metadata(&image)?.len();
    eprintln!(
        "kernel: built in {:.0?} ({:.1} MiB): {}",
        started.elapsed(),
        size as f64 / (1 << 20) as f64,
        image.display()
    );
    Ok(image)
}

/// Fails if the final `.config` knows an option that was dropped as absent from this kernel: then it
/// is not absent, and dropping it would build a kernel without something the fragment asks for.
fn verify_dropped(dropped: &[&str], config: &str) -> Result<()> {
    let known: Vec<&str> =
        dropped.iter().copied().filter(|o| config.lines().any(|l| option_of(l) == Some(*o))).collect();
    if known.is_empty() {
        Ok(())
    } else {
        Err(format!("dropped as absent from this kernel, but its .config has them: {}", known.join(", "))
            .into())
    }
}

fn file_key(image: &Path) -> String {
    let name = image.file_name().unwrap_or_default().to_string_lossy();
    name.trim_start_matches("bzImage-").to_string()
}

/// Unpacks `kernel`'s pinned source (once) and returns its top directory.
pub fn source_tree(kernel: &Kernel) -> Result<PathBuf> {
    let (package, version) = (kernel.package, kernel.version);
    let top = kernel.source_dir();
    let root = top.parent().ok_or("source directory without a parent")?.to_path_buf();
    let stamp = root.join(".extracted");
    if stamp.exists() {
        return Ok(top);
    }
    let deb_dir = Apt::new()?.unpack(package, version, &format!("kernel/deb-{version}"))?;
    let tarball = deb_dir.join(format!("usr/src/{package}.tar.xz"));
    if root.exists() {
        std::fs::remove_dir_all(&root)?;
    }
    std::fs::create_dir_all(&root)?;
    eprintln!("kernel: extracting {}", tarball.display());
    let t = Instant::now();
    run(Command::new("tar").arg("-xf").arg(&tarball).arg("-C").arg(&root))?;
    if !top.join("Makefile").exists() {
        return Err(format!("{} has no {package}/Makefile", tarball.display()).into());
    }
    std::fs::write(&stamp, format!("{package} {version}\n"))?;
    // The tarball is no longer needed once extracted; keep the .deb in the apt cache.
    std::fs::remove_dir_all(&deb_dir)?;
    eprintln!("kernel: extracted in {:.0?}", t.elapsed());
    Ok(top)
}

fn make_cmd(src: &Path, build: &Path) -> Command {
    let mut cmd = Command::new("make");
    cmd.current_dir(src).arg(format!("O={}", build.display()));
    cmd
}

/// Runs a short make target with its output captured into `log`; fails with the output.
fn make(src: &Path, build: &Path, args: &[&str], log: &Path) -> Result<()> {
    let out = make_cmd(src, build).args(args).output()?;
    let mut f = std::fs::OpenOptions::new().create(true).append(true).open(log)?;
    f.write_all(&out.stdout)?;
    f.write_all(&out.stderr)?;
    if !out.status.success() {
        return Err(format!(
            "make {} failed: {}\n{}{}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
        .into());
    }
    Ok(())
}

/// What the fragment asks for: option name -> value (`None` for "is not set").
fn parse_fragment(text: &str) -> Result<BTreeMap<String, Option<String>>> {
    let mut wanted = BTreeMap::new();
    for line in text.lines().map(str::trim) {
        if let Some(rest) = line.strip_prefix("# CONFIG_") {
            if let Some(name) = rest.strip_suffix(" is not set") {
                wanted.insert(format!("CONFIG_{name}"), None);
            }
        } else if line.starts_with("CONFIG_") {
            let (name, value) = line.split_once('=').ok_or_else(|| format!("bad fragment line: {line}"))?;
            wanted.insert(name.to_string(), Some(value.to_string()));
        } else if !line.is_empty() && !line.starts_with('#') {
            return Err(format!("bad fragment line: {line}").into());
        }
    }
    Ok(wanted)
}

/// Fails listing every fragment option that the final `.config` does not have as requested.
fn verify_config(wanted: &BTreeMap<String, Option<String>>, config: &str) -> Result<()> {
    let mut have: BTreeMap<&str, &str> = BTreeMap::new();
    for line in config.lines() {
        if line.starts_with("CONFIG_")
            && let Some((name, value)) = line.split_once('=')
        {
            have.insert(name, value);
        }
    }
    let mut bad = Vec::new();
    for (name, want) in wanted {
        let got = have.get(name.as_str()).copied();
        let ok = match want {
            Some(v) => got == Some(v.as_str()),
            None => got.is_none() || got == Some("n"),
        };
        if !ok {
            let want = want.as_deref().unwrap_or("not set");
            bad.push(format!("  {name}: wanted {want}, got {}", got.unwrap_or("not set")));
        }
    }
    if bad.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "{} fragment option(s) did not end up as requested (unmet dependencies?):\n{}",
            bad.len(),
            bad.join("\n")
        )
        .into())
    }
}

/// `make bzImage`, full output to `log`, a progress line on the terminal every 15 s.
fn build_logged(src: &Path, build: &Path, jobs: usize, log_path: &Path) -> Result<()> {
    let mut cmd = make_cmd(src, build);
    cmd.arg(format!("-j{jobs}")).arg("bzImage");
    let started = Instant::now();
    let mut progress = Progress::new(started);
    let (status, tail) = run_logged(cmd, log_path, |line| progress.line(line))?;
    if !status.success() {
        return Err(format!(
            "make bzImage failed ({status}); last lines of {}:\n{}",
            log_path.display(),
            tail.join("\n")
        )
        .into());
    }
    eprintln!(
        "kernel: make finished in {:.0?}: {} compiled, {} linked",
        started.elapsed(),
        progress.compiled,
        progress.linked
    );
    Ok(())
}

/// Counts kbuild's step lines and prints the milestones and a line every 15 s.
struct Progress {
    started: Instant,
    last: Instant,
    compiled: usize,
    linked: usize,
}

impl Progress {
    fn new(started: Instant) -> Self {
        Progress { started, last: started, compiled: 0, linked: 0 }
    }

    fn line(&mut self, line: &str) {
        let step = line.split_whitespace().next().unwrap_or("");
        match step {
            "CC" | "AS" => self.compiled += 1,
            "LD" | "AR" | "OBJCOPY" => self.linked += 1,
            _ => {}
        }
        if line.contains("vmlinux") && step == "LD" || line.contains("bzImage") && step == "BUILD" {
            eprintln!("kernel: [{:>4}s] {}", self.started.elapsed().as_secs(), line.trim());
        }
        if self.last.elapsed() >= Duration::from_secs(15) {
            eprintln!(
                "kernel: [{:>4}s] still building: {} compiled, {} linked",
                self.started.elapsed().as_secs(),
                self.compiled,
                self.linked
            );
            self.last = Instant::now();
        }
    }
}

/// Runs `cmd` with stdout and stderr (merged) written to `log_path` and each line, decoded lossily
/// (a compiler may quote non-UTF-8 bytes from a source file), passed to `on_line`. Returns the exit
/// status and the last 40 lines. The child is always waited for: if reading or logging fails, it is
/// killed first (and if xtask dies, the kernel kills it).
fn run_logged(
    mut cmd: Command,
    log_path: &Path,
    mut on_line: impl FnMut(&str),
) -> Result<(ExitStatus, Vec<String>)> {
    let (reader, writer) = std::io::pipe()?;
    cmd.stdin(Stdio::null()).stdout(writer.try_clone()?).stderr(writer);
    let program = cmd.get_program().to_string_lossy().into_owned();
    let mut child = Guarded::spawn(&mut cmd).map_err(|e| format!("{program}: {e}"))?;
    drop(cmd); // closes our copies of the pipe's write end, so the reader sees EOF when the child exits
    let mut tail: VecDeque<String> = VecDeque::new();
    let copy = || -> Result<()> {
        let mut log = std::io::BufWriter::new(std::fs::File::create(log_path)?);
        let mut reader = BufReader::new(reader);
        let mut buf = Vec::new();
        loop {
            buf.clear();
            if reader.read_until(b'\n', &mut buf)? == 0 {
                break;
            }
            log.write_all(&buf)?;
            let line = String::from_utf8_lossy(&buf);
            let line = line.trim_end_matches(['\r', '\n']);
            on_line(line);
            if tail.len() == 40 {
                tail.pop_front();
            }
            tail.push_back(line.to_string());
        }
        log.flush()?;
        Ok(())
    };
    let copied = copy();
    if let Err(e) = copied {
        let status = child.kill()?;
        return Err(format!(
            "{program} (killed, {status}): reading its output into {}: {e}",
            log_path.display()
        )
        .into());
    }
    let status = child.wait()?;
    Ok((status, tail.into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_path(name: &str) -> PathBuf {
        std::env::temp_dir().join(format!("xtask-{name}-{}", std::process::id()))
    }

    #[test]
    fn non_utf8_output_is_logged_and_the_child_waited_for() {
        let log = temp_path("run-logged.log");
        let mut cmd = Command::new("sh");
        cmd.args(["-c", r"printf 'CC a.o\n\377\376 bad byte\n'; printf 'LD vmlinux\n' >&2; exit 3"]);
        let mut seen = Vec::new();
        let result = run_logged(cmd, &log, |l| seen.push(l.to_string()));
        let logged = std::fs::read(&log);
        let _ = std::fs::remove_file(&log);
        let (status, tail) = result.unwrap();
        assert_eq!(status.code(), Some(3), "the exit status is the child's");
        assert_eq!(seen, ["CC a.o", "\u{fffd}\u{fffd} bad byte", "LD vmlinux"]);
        assert_eq!(tail, seen);
        assert_eq!(
            logged.unwrap(),
            b"CC a.o\n\xff\xfe bad byte\nLD vmlinux\n",
            "the log keeps the raw bytes"
        );
    }

    #[test]
    fn a_log_that_cannot_be_written_kills_and_reaps_the_child() {
        let log = temp_path("no-such-dir").join("build.log");
        let mut cmd = Command::new("sleep");
        cmd.arg("1000");
        let started = Instant::now();
        let err = run_logged(cmd, &log, |_| {}).unwrap_err().to_string();
        assert!(err.contains("killed"), "{err}");
        assert!(started.elapsed() < Duration::from_secs(60), "waited for the child instead of killing it");
    }

    #[test]
    fn progress_counts_kbuild_steps() {
        let mut p = Progress::new(Instant::now());
        for l in [
            "  CC      mm/mmap.o",
            "  AS      arch/x86/a.o",
            "  LD      vmlinux",
            "  AR      lib.a",
            "make[1]: x",
        ] {
            p.line(l);
        }
        assert_eq!((p.compiled, p.linked), (2, 2));
    }

    #[test]
    fn fragment_lines_are_parsed() {
        let wanted =
            parse_fragment("# comment\n\nCONFIG_A=y\nCONFIG_B=\"x=y\"\n# CONFIG_C is not set\n").unwrap();
        let expect: BTreeMap<String, Option<String>> = [
            ("CONFIG_A".to_string(), Some("y".to_string())),
            ("CONFIG_B".to_string(), Some("\"x=y\"".to_string())),
            ("CONFIG_C".to_string(), None),
        ]
        .into();
        assert_eq!(wanted, expect);
        assert!(parse_fragment("CONFIG_A\n").is_err(), "an option without a value");
        assert!(parse_fragment("A=y\n").is_err(), "not an option");
    }

    #[test]
    fn config_verification_lists_every_unmet_option() {
        let wanted =
            parse_fragment("CONFIG_A=y\nCONFIG_B=m\n# CONFIG_C is not set\n# CONFIG_D is not set\n").unwrap();
        verify_config(&wanted, "CONFIG_A=y\nCONFIG_B=m\n# CONFIG_C is not set\nCONFIG_D=n\n").unwrap();
        let err = verify_config(&wanted, "CONFIG_A=m\nCONFIG_C=y\n").unwrap_err().to_string();
        assert!(err.starts_with("3 fragment option(s)"), "{err}");
        assert!(err.contains("CONFIG_A: wanted y, got m"), "{err}");
        assert!(err.contains("CONFIG_B: wanted m, got not set"), "{err}");
        assert!(err.contains("CONFIG_C: wanted not set, got y"), "{err}");
    }

    #[test]
    fn each_kernel_gets_its_fragment_and_build_directory() {
        let committed = std::fs::read_to_string(fragment_path()).unwrap();
        // The pinned kernel keeps the committed text byte for byte: its cached image stays valid.
        assert_eq!(PINNED.fragment(&committed), committed);
        let older = LTS_6_12.fragment(&committed);
        let dropped: Vec<&str> = committed.lines().filter(|l| !older.lines().any(|o| o == *l)).collect();
        assert_eq!(dropped, ["CONFIG_GENERIC_PT=y", "CONFIG_IOMMU_PT=y", "CONFIG_IOMMU_PT_AMDV1=y"]);
        assert_eq!(parse_fragment(&older).unwrap().len() + 3, parse_fragment(&committed).unwrap().len());
        assert_ne!(cached_image(&PINNED, &committed), cached_image(&LTS_6_12, &older));
        assert!(PINNED.build_dir().ends_with("kernel/build"), "the pinned kernel's objects are reused");
        assert!(LTS_6_12.build_dir().ends_with("kernel/build-6.12.95-1~bpo12+1"));
        assert_eq!(Kernel::by_name("6.12"), Some(&LTS_6_12));
        assert_eq!(Kernel::by_name("7.3"), Some(&PINNED));
        assert_eq!(Kernel::by_name("7"), None);
        assert_eq!(kernels_named(Some("all")).unwrap().len(), KERNELS.len());
        assert!(kernels_named(None).is_err());
    }

    #[test]
    fn fragment_lines_name_their_option() {
        assert_eq!(option_of("CONFIG_A=y"), Some("CONFIG_A"));
        assert_eq!(option_of("# CONFIG_B is not set"), Some("CONFIG_B"));
        assert_eq!(option_of("# a comment"), None);
        assert_eq!(option_of(""), None);
        // A dropped option must be unknown to the final .config, set or not.
        let dropped = ["CONFIG_GENERIC_PT"];
        verify_dropped(&dropped, "CONFIG_A=y\n").unwrap();
        assert!(verify_dropped(&dropped, "# CONFIG_GENERIC_PT is not set\n").is_err());
        assert!(verify_dropped(&dropped, "CONFIG_GENERIC_PT=y\n").is_err());
    }

    #[test]
    fn the_committed_fragment_parses_and_keys_the_cache_stably() {
        let fragment = std::fs::read_to_string(fragment_path()).unwrap();
        assert!(!parse_fragment(&fragment).unwrap().is_empty());
        // The cache key must not change with the toolchain: FNV-1a's published test vectors.
        assert_eq!(fnv64(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv64(b"a"), 0xaf63_dc4c_8601_ec8c);
    }
}
