//! `cargo xtask kernel`: the test VM's kernel, built from Debian's `linux-source` at a pinned version.
//!
//! Config: `make allnoconfig`, merge the committed fragment `xtask/kernel.config`
//! (`scripts/kconfig/merge_config.sh -m`), `make olddefconfig`, then check that every line of the fragment
//! holds in the final `.config`. The bzImage is cached under `<cache>/kernel/` keyed by the source version
//! and a hash of the fragment, so a second run returns at once.

use std::collections::{BTreeMap, VecDeque};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use crate::apt::Apt;
use crate::host::{self, Pkg};
use crate::process::Guarded;
use crate::{Result, cache_dir, run, workspace_root};

/// Debian package holding the kernel source tarball, and its pinned version.
pub const SOURCE_PACKAGE: &str = "linux-source-7.3";
pub const SOURCE_VERSION: &str = "7.3.4-1~bpo13+1";

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

/// Where the bzImage for the current fragment is (or will be) cached.
fn cached_image(fragment: &str) -> PathBuf {
    let key = format!("{SOURCE_VERSION}-{:016x}", fnv64(fragment.as_bytes()));
    cache_dir().join("kernel").join(format!("bzImage-{key}"))
}

/// `cargo xtask kernel`.
pub fn kernel() -> Result<()> {
    let image = ensure_kernel()?;
    println!("{}", image.display());
    Ok(())
}

/// Returns the path of the test kernel's bzImage, building it first if it is not cached.
pub fn ensure_kernel() -> Result<PathBuf> {
    let fragment_file = fragment_path();
    let fragment = std::fs::read_to_string(&fragment_file)
        .map_err(|e| format!("reading {}: {e}", fragment_file.display()))?;
    let image = cached_image(&fragment);
    if image.exists() {
        eprintln!("kernel: cached {}", image.display());
        return Ok(image);
    }
    let wanted = parse_fragment(&fragment)?;
    // One build at a time: the build directory is shared.
    let _lock = host::lock(&cache_dir().join("kernel/.lock"), "kernel")?;
    if image.exists() {
        eprintln!("kernel: cached {} (built by the other run)", image.display());
        return Ok(image);
    }
    host::ensure("cargo xtask kernel", BUILD_DEPS)?;
    let src = source_tree()?;
    let build = cache_dir().join("kernel/build");
    std::fs::create_dir_all(&build)?;
    let started = Instant::now();

    eprintln!("kernel: configuring (allnoconfig + {} + olddefconfig)", fragment_file.display());
    let log_path = cache_dir().join("kernel/config.log");
    let _ = std::fs::remove_file(&log_path);
    let config = build.join(".config");
    make(&src, &build, &["allnoconfig"], &log_path)?;
    let merge = Command::new("sh")
        .current_dir(&src)
        .arg("scripts/kconfig/merge_config.sh")
        .args(["-m", "-O"])
        .arg(&build)
        .arg(&config)
        .arg(&fragment_file)
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
    verify_config(&wanted, &std::fs::read_to_string(&config)?)?;
    eprintln!("kernel: all {} fragment options hold in {}", wanted.len(), config.display());

    let jobs = std::thread::available_parallelism().map_or(1, |n| n.get());
    let log_path = cache_dir().join("kernel/build.log");
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

fn file_key(image: &Path) -> String {
    let name = image.file_name().unwrap_or_default().to_string_lossy();
    name.trim_start_matches("bzImage-").to_string()
}

/// Unpacks the pinned kernel source (once) and returns its top directory.
fn source_tree() -> Result<PathBuf> {
    let root = cache_dir().join(format!("kernel/src-{SOURCE_VERSION}"));
    let stamp = root.join(".extracted");
    let top = root.join(SOURCE_PACKAGE);
    if stamp.exists() {
        return Ok(top);
    }
    let deb_dir =
        Apt::new()?.unpack(SOURCE_PACKAGE, SOURCE_VERSION, &format!("kernel/deb-{SOURCE_VERSION}"))?;
    let tarball = deb_dir.join(format!("usr/src/{SOURCE_PACKAGE}.tar.xz"));
    if root.exists() {
        std::fs::remove_dir_all(&root)?;
    }
    std::fs::create_dir_all(&root)?;
    eprintln!("kernel: extracting {}", tarball.display());
    let t = Instant::now();
    run(Command::new("tar").arg("-xf").arg(&tarball).arg("-C").arg(&root))?;
    if !top.join("Makefile").exists() {
        return Err(format!("{} has no {SOURCE_PACKAGE}/Makefile", tarball.display()).into());
    }
    std::fs::write(&stamp, format!("{SOURCE_PACKAGE} {SOURCE_VERSION}\n"))?;
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
    fn the_committed_fragment_parses_and_keys_the_cache_stably() {
        let fragment = std::fs::read_to_string(fragment_path()).unwrap();
        assert!(!parse_fragment(&fragment).unwrap().is_empty());
        // The cache key must not change with the toolchain: FNV-1a's published test vectors.
        assert_eq!(fnv64(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv64(b"a"), 0xaf63_dc4c_8601_ec8c);
    }
}
