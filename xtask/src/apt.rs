//! Fetching pinned Debian packages into the project's cache without touching the system's apt state.
//!
//! A private sources list, lists directory and archive directory live under the cache, so the host's
//! `/etc/apt` is never edited and nothing is installed into the system by these helpers.

use std::path::PathBuf;
use std::process::Command;

use crate::{Result, cache_dir, run};

/// Suites the project pulls pinned packages from.
const SOURCES: &str = "\
deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian trixie-backports main
deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian bookworm-backports main
";

/// Private apt configuration rooted in the cache.
pub struct Apt {
    root: PathBuf,
}

impl Apt {
    pub fn new() -> Result<Self> {
        let root = cache_dir().join("apt");
        for d in ["etc/sources.list.d", "lists/partial", "archives/partial", "debs"] {
            std::fs::create_dir_all(root.join(d))?;
        }
        std::fs::write(root.join("etc/sources.list"), SOURCES)?;
        Ok(Apt { root })
    }

    fn opts(&self) -> Vec<String> {
        let r = self.root.display();
        vec![
            format!("-oDir::Etc::SourceList={r}/etc/sources.list"),
            format!("-oDir::Etc::SourceParts={r}/etc/sources.list.d"),
            format!("-oDir::State::Lists={r}/lists"),
            format!("-oDir::Cache::Archives={r}/archives"),
            "-oAPT::Sandbox::User=root".to_string(),
            "-qq".to_string(),
        ]
    }

    fn update(&self) -> Result<()> {
        let stamp = self.root.join("lists/.updated");
        if stamp.exists() {
            return Ok(());
        }
        eprintln!("apt: refreshing private package lists (trixie-backports, bookworm-backports)");
        run(Command::new("apt-get").args(self.opts()).arg("update"))?;
        std::fs::write(stamp, b"")?;
        Ok(())
    }

    /// Downloads `name=version` (once) and returns the path of the `.deb`.
    pub fn download(&self, name: &str, version: &str) -> Result<PathBuf> {
        let debs = self.root.join("debs");
        let file_version = version.replace(':', "%3a");
        let deb = debs.join(format!("{name}_{file_version}_all.deb"));
        let deb_arch = debs.join(format!("{name}_{file_version}_amd64.deb"));
        for candidate in [&deb, &deb_arch] {
            if candidate.exists() {
                return Ok(candidate.clone());
            }
        }
        self.update()?;
        eprintln!("apt: downloading {name} {version}");
        run(Command::new("apt-get")
            .current_dir(&debs)
            .args(self.opts())
            .arg("download")
            .arg(format!("{name}={version}")))?;
        for candidate in [deb, deb_arch] {
            if candidate.exists() {
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
