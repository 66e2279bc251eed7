//! Host packages the VM test bed needs, installed into the system with `apt-get` when missing.
//!
//! Each task names the Debian packages it needs; those already installed (per `dpkg-query`) are left
//! alone, the rest are installed with `apt-get install -y`, which needs root. The system's `/etc/apt` is
//! never edited: packages from `bookworm-backports` are installed through a private copy of the system's
//! sources plus a backports entry, with private package lists, all under the cache.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::{Result, cache_dir};

/// A host package requirement: a Debian package, optionally from a given suite with a minimum version.
pub struct Pkg {
    pub name: &'static str,
    /// When set, the package is installed with `-t <suite>` through the private sources.
    pub suite: Option<&'static str>,
    /// When set, an installed version that does not start with one of these prefixes is upgraded.
    pub version_prefixes: &'static [&'static str],
}

impl Pkg {
    pub const fn plain(name: &'static str) -> Self {
        Pkg { name, suite: None, version_prefixes: &[] }
    }
}

/// The installed version of `name`, if it is installed.
pub fn installed_version(name: &str) -> Option<String> {
    let out = Command::new("dpkg-query").args(["-W", "-f=${Status}\t${Version}", name]).output().ok()?;
    if !out.status.success() {
        return None;
    }
    parse_installed(&String::from_utf8_lossy(&out.stdout))
}

/// The version in `dpkg-query -f '${Status}\t${Version}'` output, if the package is installed.
fn parse_installed(text: &str) -> Option<String> {
    let (status, version) = text.split_once('\t')?;
    (status.trim() == "install ok installed").then(|| version.trim().to_string())
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status").is_ok_and(|s| status_says_root(&s))
}

/// True if `/proc/<pid>/status` text gives a real UID of 0.
fn status_says_root(status: &str) -> bool {
    status.lines().find_map(|l| l.strip_prefix("Uid:")).and_then(|l| l.split_whitespace().next()) == Some("0")
}

fn needs_install(p: &Pkg) -> bool {
    match installed_version(p.name) {
        None => true,
        Some(v) => !p.version_prefixes.is_empty() && !p.version_prefixes.iter().any(|pre| v.starts_with(pre)),
    }
}

/// Makes sure every package in `pkgs` is installed (as required), installing what is missing.
pub fn ensure(what: &str, pkgs: &[Pkg]) -> Result<()> {
    let missing: Vec<&Pkg> = pkgs.iter().filter(|p| needs_install(p)).collect();
    if missing.is_empty() {
        return Ok(());
    }
    let describe = |p: &&Pkg| {
        let mut text = p.name.to_string();
        if let Some(suite) = p.suite {
            text += &format!(" (from {suite}, version {}*", p.version_prefixes.join("* or "));
            if let Some(v) = installed_version(p.name) {
                text += &format!("; {v} is installed");
            }
            text += ")";
        }
        text
    };
    let names: Vec<String> = missing.iter().map(describe).collect();
    if !is_root() {
        return Err(format!(
            "{what} needs these host packages, which are missing and can only be installed as root: {}\n\
             (run as root, or install them yourself)",
            names.join(", ")
        )
        .into());
    }
    eprintln!("host: installing packages for {what}: {}", names.join(", "));

    let plain: Vec<&str> = missing.iter().filter(|p| p.suite.is_none()).map(|p| p.name).collect();
    if !plain.is_empty() {
        system_update()?;
        apt_logged(apt_get().args(["install", "-y", "--no-install-recommends"]).args(&plain))?;
    }
    let mut suites: Vec<&str> = missing.iter().filter_map(|p| p.suite).collect();
    suites.dedup();
    for suite in suites {
        let names: Vec<&str> = missing.iter().filter(|p| p.suite == Some(suite)).map(|p| p.name).collect();
        let opts = private_sources(suite)?;
        eprintln!(
            "host: apt-get update with {suite} added (private lists under {})",
            cache_dir().join("apt-host").display()
        );
        apt_logged(apt_get().args(&opts).arg("update"))?;
        apt_logged(
            apt_get()
                .args(&opts)
                .args(["install", "-y", "--no-install-recommends", "-t", suite])
                .args(&names),
        )?;
    }
    for p in &missing {
        if needs_install(p) {
            return Err(format!("{} is still not installed as required after apt-get install", p.name).into());
        }
        eprintln!("host: {} {} installed", p.name, installed_version(p.name).unwrap_or_default());
    }
    Ok(())
}

fn apt_get() -> Command {
    let mut cmd = Command::new("apt-get");
    cmd.env("DEBIAN_FRONTEND", "noninteractive").arg("-q");
    cmd
}

/// `apt-get update` of the system's own lists, once per xtask run.
fn system_update() -> Result<()> {
    static DONE: std::sync::Once = std::sync::Once::new();
    let mut result = Ok(());
    DONE.call_once(|| {
        eprintln!("host: apt-get update");
        result = apt_logged(apt_get().arg("update"));
    });
    result
}

/// Runs apt-get with its output appended to `<cache>/apt-host/apt.log`; on failure prints the log's tail.
fn apt_logged(cmd: &mut Command) -> Result<()> {
    let dir = cache_dir().join("apt-host");
    std::fs::create_dir_all(&dir)?;
    let log_path = dir.join("apt.log");
    let log = std::fs::OpenOptions::new().create(true).append(true).open(&log_path)?;
    let status = cmd.stdout(log.try_clone()?).stderr(log).status().map_err(|e| format!("{cmd:?}: {e}"))?;
    if !status.success() {
        let text = std::fs::read_to_string(&log_path).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        let tail = lines[lines.len().saturating_sub(30)..].join("\n");
        return Err(format!("{cmd:?} failed: {status}; last lines of {}:\n{tail}", log_path.display()).into());
    }
    Ok(())
}

/// Writes a private apt configuration: the system's sources plus `suite`, with lists under the cache.
/// Returns the `-o` options that select it.
fn private_sources(suite: &str) -> Result<Vec<String>> {
    let root = cache_dir().join("apt-host");
    let parts = root.join("sources.list.d");
    if parts.exists() {
        std::fs::remove_dir_all(&parts)?;
    }
    for d in [parts.as_path(), &root.join("lists/partial")] {
        std::fs::create_dir_all(d)?;
    }
    copy_sources(Path::new("/etc/apt/sources.list.d"), &parts)?;
    let list = root.join("sources.list");
    let system_list = std::fs::read_to_string("/etc/apt/sources.list").unwrap_or_default();
    std::fs::write(&list, system_list)?;
    std::fs::write(
        parts.join(format!("xtask-{suite}.sources")),
        format!(
            "Types: deb\nURIs: http://deb.debian.org/debian\nSuites: {suite}\nComponents: main\n\
             Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n"
        ),
    )?;
    Ok(vec![
        format!("-oDir::Etc::SourceList={}", list.display()),
        format!("-oDir::Etc::SourceParts={}", parts.display()),
        format!("-oDir::State::Lists={}", root.join("lists").display()),
    ])
}

fn copy_sources(from: &Path, to: &Path) -> Result<()> {
    let Ok(entries) = std::fs::read_dir(from) else { return Ok(()) };
    for entry in entries {
        let path: PathBuf = entry?.path();
        let keep = path.extension().is_some_and(|e| e == "list" || e == "sources");
        if keep && let Some(name) = path.file_name() {
            std::fs::copy(&path, to.join(name))?;
        }
    }
    Ok(())
}

/// Takes an exclusive lock on `path` (created if missing), waiting for another xtask that holds it.
/// The lock is released when the returned file is dropped (or the process exits).
pub fn lock(path: &Path, what: &str) -> Result<std::fs::File> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let file = std::fs::OpenOptions::new().create(true).truncate(false).write(true).open(path)?;
    match file.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => {
            eprintln!("{what}: waiting for another xtask run that holds {}", path.display());
            file.lock()?;
        }
        Err(std::fs::TryLockError::Error(e)) => return Err(format!("locking {}: {e}", path.display()).into()),
    }
    Ok(file)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dpkg_query_output_is_parsed() {
        assert_eq!(
            parse_installed("install ok installed\t1:10.0.7+ds-1~bpo12+1"),
            Some("1:10.0.7+ds-1~bpo12+1".into())
        );
        assert_eq!(parse_installed("deinstall ok config-files\t1.36.1-9"), None);
        assert_eq!(parse_installed("unknown ok not-installed\t"), None);
        assert_eq!(parse_installed(""), None);
    }

    #[test]
    fn root_is_read_from_the_real_uid() {
        assert!(status_says_root("Name:\tx\nUid:\t0\t0\t0\t0\nGid:\t0\t0\t0\t0\n"));
        assert!(!status_says_root("Uid:\t1000\t0\t0\t0\n"), "only the real UID counts");
        assert!(!status_says_root("Name:\tx\n"));
    }
}
