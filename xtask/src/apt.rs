//! Fetching pinned Debian packages into the project's cache without touching the system's apt state.
//!
//! A private sources list, lists directory and archive directory live under the cache, so the host's
//! `/etc/apt` is never edited and nothing is installed into the system by these helpers.
//!
//! The package lists are kept in `lists-<hash of the sources>`, so a change to [`SOURCES`] starts from
//! fresh lists, and are refreshed before a download when older than [`LISTS_MAX_AGE`]. A `.deb` is
//! checked against the SHA-256 that the archive's metadata gives for it, both after the download and
//! whenever a cached copy is reused; a copy that does not match is deleted and downloaded again.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, SystemTime};

use sha2::{Digest, Sha256};

use crate::{Result, cache_dir, run};

/// Suites the project pulls pinned packages from.
const SOURCES: &str = "\
deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian trixie-backports main
deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian bookworm-backports main
";

/// Package lists older than this are refreshed before a download.
const LISTS_MAX_AGE: Duration = Duration::from_secs(24 * 60 * 60);

/// Private apt configuration rooted in the cache.
pub struct Apt {
    root: PathBuf,
    /// `lists-<key>`: the package lists for exactly [`SOURCES`].
    lists: PathBuf,
}

/// Lower-case hex SHA-256 of `data`.
pub fn sha256_hex(data: impl AsRef<[u8]>) -> String {
    hex(&Sha256::digest(data.as_ref()))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Lower-case hex SHA-256 of a file's contents, read in chunks.
fn sha256_file(path: &Path) -> Result<String> {
    let mut file = std::fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0; 1 << 20];
    loop {
        let n = std::io::Read::read(&mut file, &mut buf).map_err(|e| format!("{}: {e}", path.display()))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex(&hasher.finalize()))
}

/// The directory name for the package lists of `sources`.
fn lists_dir_name(sources: &str) -> String {
    format!("lists-{}", &sha256_hex(sources)[..16])
}

/// True if a list stamp written at `stamp` is still fresh at `now`. A stamp from the future (a clock
/// that was set back) counts as stale.
fn is_fresh(stamp: SystemTime, now: SystemTime, max_age: Duration) -> bool {
    now.duration_since(stamp).is_ok_and(|age| age < max_age)
}

/// What the archive's metadata (`apt-cache show`) says about one package version.
#[derive(Debug, PartialEq, Eq)]
pub struct PackageInfo {
    pub sha256: String,
    pub size: Option<u64>,
}

/// Finds `name`'s `version` in `apt-cache show` output (RFC 822 stanzas separated by blank lines).
/// The same version can be listed by several suites; they must agree on the hash.
fn parse_package_info(text: &str, name: &str, version: &str) -> Result<Option<PackageInfo>> {
    let mut found: Option<PackageInfo> = None;
    for stanza in text.split("\n\n") {
        let field = |key: &str| {
            stanza.lines().find_map(|l| {
                let (k, v) = l.split_once(':')?;
                (!l.starts_with([' ', '\t']) && k == key).then(|| v.trim())
            })
        };
        if field("Package") != Some(name) || field("Version") != Some(version) {
            continue;
        }
        let Some(sha256) = field("SHA256") else {
            return Err(format!("apt metadata for {name} {version} has no SHA256 field").into());
        };
        if sha256.len() != 64 || !sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(format!("apt metadata for {name} {version}: bad SHA256 {sha256:?}").into());
        }
        let info = PackageInfo {
            sha256: sha256.to_ascii_lowercase(),
            size: field("Size").and_then(|s| s.parse().ok()),
        };
        match &found {
            Some(prev) if prev.sha256 != info.sha256 => {
                return Err(format!(
                    "apt metadata lists {name} {version} twice with different hashes ({} and {})",
                    prev.sha256, info.sha256
                )
                .into());
            }
            Some(_) => {}
            None => found = Some(info),
        }
    }
    Ok(found)
}

impl Apt {
    pub fn new() -> Result<Self> {
        Self::at(cache_dir().join("apt"))
    }

    /// A private apt configuration under `root`.
    fn at(root: PathBuf) -> Result<Self> {
        let lists = root.join(lists_dir_name(SOURCES));
        for d in [root.join("etc/sources.list.d"), lists.join("partial"), root.join("archives/partial")] {
            std::fs::create_dir_all(d)?;
        }
        std::fs::create_dir_all(root.join("debs"))?;
        std::fs::write(root.join("etc/sources.list"), SOURCES)?;
        Ok(Apt { root, lists })
    }

    fn opts(&self) -> Vec<String> {
        let r = self.root.display();
        vec![
            format!("-oDir::Etc::SourceList={r}/etc/sources.list"),
            format!("-oDir::Etc::SourceParts={r}/etc/sources.list.d"),
            format!("-oDir::State::Lists={}", self.lists.display()),
            format!("-oDir::Cache::Archives={r}/archives"),
            // No binary caches: apt would otherwise write ones built from these private lists over
            // the system's own (`/var/cache/apt/*.bin`).
            "-oDir::Cache::pkgcache=".to_string(),
            "-oDir::Cache::srcpkgcache=".to_string(),
            "-oAPT::Sandbox::User=root".to_string(),
            "-qq".to_string(),
        ]
    }

    fn stamp(&self) -> PathBuf {
        self.lists.join(".updated")
    }

    /// `apt-get update` of the private lists, unless they are younger than [`LISTS_MAX_AGE`] (or
    /// `force`).
    fn update(&self, force: bool) -> Result<()> {
        let stamp = self.stamp();
        let fresh = std::fs::metadata(&stamp)
            .and_then(|m| m.modified())
            .is_ok_and(|t| is_fresh(t, SystemTime::now(), LISTS_MAX_AGE));
        if fresh && !force {
            return Ok(());
        }
        eprintln!("apt: refreshing private package lists (trixie-backports, bookworm-backports)");
        run(Command::new("apt-get").args(self.opts()).arg("update"))?;
        std::fs::write(stamp, b"")?;
        Ok(())
    }

    /// The archive's metadata for `name=version`, from the private lists (fetched first if there are
    /// none; refreshed once if the version is not in them).
    fn info(&self, name: &str, version: &str) -> Result<Option<PackageInfo>> {
        if !self.stamp().exists() {
            self.update(true)?;
        }
        let show = || -> Result<Option<PackageInfo>> {
            let out = Command::new("apt-cache")
                .args(self.opts())
                .arg("show")
                .arg(format!("{name}={version}"))
                .output()
                .map_err(|e| format!("apt-cache: {e}"))?;
            // apt-cache fails when the version is unknown: that is "not listed", not an error.
            parse_package_info(&String::from_utf8_lossy(&out.stdout), name, version)
        };
        match show()? {
            Some(info) => Ok(Some(info)),
            None => {
                self.update(false)?;
                show()
            }
        }
    }

    /// Checks a `.deb` against the archive's SHA-256 for it; without metadata for the version (it
    /// left the archive), at least that dpkg can read it.
    fn verify(&self, deb: &Path, name: &str, version: &str) -> Result<()> {
        match self.info(name, version)? {
            Some(info) => {
                if let Some(size) = info.size {
                    let got = std::fs::metadata(deb)?.len();
                    if got != size {
                        return Err(format!("{}: {got} bytes, the archive says {size}", deb.display()).into());
                    }
                }
                let got = sha256_file(deb)?;
                if got != info.sha256 {
                    return Err(format!(
                        "{}: SHA-256 {got}, the archive says {}",
                        deb.display(),
                        info.sha256
                    )
                    .into());
                }
                Ok(())
            }
            None => {
                eprintln!(
                    "apt: WARNING: {name} {version} is not in the package lists any more; checking {} \
                     with dpkg-deb only",
                    deb.display()
                );
                let out = Command::new("dpkg-deb").arg("--info").arg(deb).output()?;
                if out.status.success() {
                    Ok(())
                } else {
                    Err(format!(
                        "{} is not a valid .deb: {}",
                        deb.display(),
                        String::from_utf8_lossy(&out.stderr).trim()
                    )
                    .into())
                }
            }
        }
    }

    /// Downloads `name=version` (once) and returns the path of the `.deb`, checked against the
    /// archive's hash (a cached copy that fails the check is downloaded again).
    pub fn download(&self, name: &str, version: &str) -> Result<PathBuf> {
        let debs = self.root.join("debs");
        let file_version = version.replace(':', "%3a");
        let deb = debs.join(format!("{name}_{file_version}_all.deb"));
        let deb_arch = debs.join(format!("{name}_{file_version}_amd64.deb"));
        for candidate in [&deb, &deb_arch] {
            if candidate.exists() {
                match self.verify(candidate, name, version) {
                    Ok(()) => return Ok(candidate.clone()),
                    Err(e) => {
                        eprintln!("apt: cached {name} {version} is corrupt ({e}); downloading it again");
                        std::fs::remove_file(candidate)?;
                    }
                }
            }
        }
        self.update(false)?;
        eprintln!("apt: downloading {name} {version}");
        run(Command::new("apt-get")
            .current_dir(&debs)
            .args(self.opts())
            .arg("download")
            .arg(format!("{name}={version}")))?;
        for candidate in [deb, deb_arch] {
            if candidate.exists() {
                if let Err(e) = self.verify(&candidate, name, version) {
                    std::fs::remove_file(&candidate)?;
                    return Err(format!("downloaded {name} {version} is corrupt: {e}").into());
                }
                return Ok(candidate);
            }
        }
        Err(format!("apt-get download {name}={version} produced no .deb in {}", debs.display()).into())
    }

    /// Downloads and unpacks `name=version` into `cache/<dir>` (once); returns that directory.
    pub fn unpack(&self, name: &str, version: &str, dir: &str) -> Result<PathBuf> {
        let dest = cache_dir().join(dir);
        let stamp = dest.join(".unpacked");
        if stamp.exists() {
            return Ok(dest);
        }
        let deb = self.download(name, version)?;
        if dest.exists() {
            std::fs::remove_dir_all(&dest)?;
        }
        std::fs::create_dir_all(&dest)?;
        run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&dest))?;
        std::fs::write(stamp, format!("{name} {version}\n"))?;
        Ok(dest)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SHOW: &str = "\
Package: linux-source-7.3
Source: linux
Version: 7.3.4-1~bpo13+1
Architecture: all
Description: Linux kernel source for version 7.3 with Debian patches
 This package provides source code for the Linux kernel version 7.3.
 SHA256: 0000000000000000000000000000000000000000000000000000000000000000
Filename: pool/main/l/linux/linux-source-7.3_7.3.4-1~bpo13+1_all.deb
Size: 166780612
SHA256: 703E369DDD4CCE971452F5A593EE55DF3A5C10C83CAF0FA0DF039633ED181EE3

Package: linux-source-7.3
Version: 7.3.3-1~bpo13+1
Filename: pool/main/l/linux/linux-source-7.3_7.3.3-1~bpo13+1_all.deb
Size: 1
SHA256: 1111111111111111111111111111111111111111111111111111111111111111
";

    #[test]
    fn package_info_picks_the_requested_version() {
        let info = parse_package_info(SHOW, "linux-source-7.3", "7.3.4-1~bpo13+1").unwrap().unwrap();
        assert_eq!(
            info,
            PackageInfo {
                sha256: "703e369ddd4cce971452f5a593ee55df3a5c10c83caf0fa0df039633ed181ee3".into(),
                size: Some(166_780_612),
            }
        );
        let older = parse_package_info(SHOW, "linux-source-7.3", "7.3.3-1~bpo13+1").unwrap().unwrap();
        assert_eq!(older.size, Some(1));
    }

    #[test]
    fn package_info_is_none_for_an_unlisted_version_or_package() {
        assert_eq!(parse_package_info(SHOW, "linux-source-7.3", "7.3.9-1").unwrap(), None);
        assert_eq!(parse_package_info(SHOW, "linux-source", "7.3.4-1~bpo13+1").unwrap(), None);
        assert_eq!(parse_package_info("", "a", "1").unwrap(), None);
    }

    #[test]
    fn package_info_rejects_a_missing_or_malformed_hash() {
        assert!(parse_package_info("Package: a\nVersion: 1\nSize: 3\n", "a", "1").is_err());
        assert!(parse_package_info("Package: a\nVersion: 1\nSHA256: 12zz\n", "a", "1").is_err());
    }

    #[test]
    fn package_info_rejects_suites_that_disagree() {
        let h1 = "1".repeat(64);
        let h2 = "2".repeat(64);
        let text = format!("Package: a\nVersion: 1\nSHA256: {h1}\n\nPackage: a\nVersion: 1\nSHA256: {h1}\n");
        assert!(parse_package_info(&text, "a", "1").unwrap().is_some());
        let text = format!("Package: a\nVersion: 1\nSHA256: {h1}\n\nPackage: a\nVersion: 1\nSHA256: {h2}\n");
        assert!(parse_package_info(&text, "a", "1").is_err());
    }

    #[test]
    fn lists_are_keyed_by_their_sources() {
        let a = lists_dir_name(SOURCES);
        assert_eq!(a, lists_dir_name(SOURCES));
        assert_ne!(a, lists_dir_name(&SOURCES.replace("trixie-backports", "trixie")));
        assert!(a.starts_with("lists-") && a.len() == "lists-".len() + 16);
    }

    #[test]
    fn lists_expire() {
        let now = SystemTime::now();
        let hour = Duration::from_secs(3600);
        assert!(is_fresh(now - hour, now, LISTS_MAX_AGE));
        assert!(!is_fresh(now - 25 * hour, now, LISTS_MAX_AGE));
        assert!(!is_fresh(now + hour, now, LISTS_MAX_AGE), "a stamp from the future is stale");
    }

    /// The versions of `name` that the lists know (the first stanza's first).
    fn listed_versions(apt: &Apt, name: &str) -> Vec<String> {
        let out = Command::new("apt-cache").args(apt.opts()).arg("show").arg(name).output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        text.lines().filter_map(|l| l.strip_prefix("Version: ")).map(str::to_string).collect()
    }

    #[test]
    #[ignore = "needs deb.debian.org and root (apt-get)"]
    fn a_corrupt_cached_deb_is_downloaded_again() {
        let root = std::env::temp_dir().join(format!("xtask-apt-{}", std::process::id()));
        let result = std::panic::catch_unwind(|| {
            let apt = Apt::at(root.clone()).unwrap();
            apt.update(true).unwrap();
            // The `linux-source` metapackage: about 1 KiB, in both backports suites.
            let name = "linux-source";
            let version = listed_versions(&apt, name).into_iter().next().expect("linux-source is listed");
            let deb = apt.download(name, &version).unwrap();
            let good = std::fs::read(&deb).unwrap();
            assert_eq!(sha256_hex(&good), apt.info(name, &version).unwrap().unwrap().sha256);

            // Same size, one byte changed: only the hash can tell.
            let mut bad = good.clone();
            let last = bad.len() - 1;
            bad[last] ^= 0xff;
            std::fs::write(&deb, &bad).unwrap();
            assert!(apt.verify(&deb, name, &version).is_err());
            let again = apt.download(name, &version).unwrap();
            assert_eq!(std::fs::read(&again).unwrap(), good, "the corrupt copy was reused");

            // Truncated.
            std::fs::write(&deb, &good[..good.len() / 2]).unwrap();
            let again = apt.download(name, &version).unwrap();
            assert_eq!(std::fs::read(&again).unwrap(), good, "the truncated copy was reused");
        });
        let _ = std::fs::remove_dir_all(&root);
        if let Err(panic) = result {
            std::panic::resume_unwind(panic);
        }
    }

    #[test]
    fn sha256_matches_the_standard_vectors() {
        assert_eq!(sha256_hex(""), "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
        assert_eq!(sha256_hex("abc"), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
        let path = std::env::temp_dir().join(format!("xtask-sha256-{}", std::process::id()));
        std::fs::write(&path, "abc").unwrap();
        let got = sha256_file(&path);
        let _ = std::fs::remove_file(&path);
        assert_eq!(got.unwrap(), sha256_hex("abc"));
    }
}
