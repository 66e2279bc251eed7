//! Feature `bindgen` only: regenerates `bindings.rs` into `OUT_DIR` from kernel headers at build time,
//! with the generator options of `cargo xtask gen-sys` (`gen/options.rs`, shared by both). Without the
//! feature this script does nothing and the crate uses the committed `src/bindings.rs`: no libclang,
//! no kernel headers.
//!
//! The headers are those of `IOMMUFD_SYS_HEADERS` (a directory holding `linux/iommufd.h`, such as an
//! installed `usr/include`), else the system's `/usr/include`. `asm/` is looked up in that directory
//! and in its multiarch subdirectory (`x86_64-linux-gnu/`, or another `*-linux-*` one holding
//! `asm/ioctl.h`).

fn main() {
    println!("cargo::rerun-if-changed=build.rs");
    #[cfg(feature = "bindgen")]
    if let Err(e) = generate::run() {
        // A build script's error is its panic message: say exactly what to do.
        panic!("iommufd-sys (feature `bindgen`): {e}");
    }
}

#[cfg(feature = "bindgen")]
mod options {
    include!("gen/options.rs");
}

#[cfg(feature = "bindgen")]
mod generate {
    use std::fmt::Write as _;
    use std::path::{Path, PathBuf};

    use crate::options;

    const HEADERS_VAR: &str = "IOMMUFD_SYS_HEADERS";

    /// The directories bindgen searches after the include directory for `asm/`.
    fn asm_dirs(include: &Path) -> Vec<PathBuf> {
        let mut dirs = Vec::new();
        // The layout bindgen generates for is x86_64's (identical on every 64-bit target), so its
        // multiarch directory comes first; any other is fine for `asm/ioctl.h` and `asm/types.h`.
        let x86 = include.join("x86_64-linux-gnu");
        if x86.join("asm/ioctl.h").exists() {
            dirs.push(x86);
        } else if let Ok(entries) = std::fs::read_dir(include) {
            let mut multiarch: Vec<PathBuf> = entries
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| {
                    p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.contains("-linux-"))
                        && p.join("asm/ioctl.h").exists()
                })
                .collect();
            multiarch.sort();
            dirs.extend(multiarch.into_iter().take(1));
        }
        dirs
    }

    pub fn run() -> Result<(), String> {
        println!("cargo::rerun-if-env-changed={HEADERS_VAR}");
        println!("cargo::rerun-if-changed=gen/options.rs");
        let (include, origin) = match std::env::var_os(HEADERS_VAR) {
            Some(dir) => (PathBuf::from(dir), format!("${HEADERS_VAR}")),
            None => (PathBuf::from("/usr/include"), "the system (set IOMMUFD_SYS_HEADERS to choose)".into()),
        };
        for header in options::HEADERS {
            let path = include.join(header);
            if !path.exists() {
                return Err(format!(
                    "{} does not exist (headers from {origin}): install kernel uAPI headers that have it \
                     (Debian: linux-libc-dev), or set {HEADERS_VAR} to an include directory \
                     holding {}",
                    path.display(),
                    options::HEADERS.join(" and ")
                ));
            }
            println!("cargo::rerun-if-changed={}", path.display());
        }
        let out_dir = PathBuf::from(std::env::var_os("OUT_DIR").ok_or("OUT_DIR is not set")?);
        let asm = asm_dirs(&include);
        let asm_refs: Vec<&Path> = asm.iter().map(PathBuf::as_path).collect();
        let body =
            options::generate_bindings(&out_dir.join("bindgen"), &include, &asm_refs).map_err(|e| {
                format!("{e} (headers: {}; bindgen needs libclang: see LIBCLANG_PATH)", include.display())
            })?;

        let mut out = String::new();
        let mut line = |text: &str| {
            let _ = writeln!(out, "{text}");
        };
        line("// Generated at build time by the iommufd-sys build script (feature `bindgen`), with the");
        line("// generator options of `cargo xtask gen-sys`.");
        line("//");
        line(&format!("// headers:     {} ({origin})", include.display()));
        line(&format!("// files:       {}", options::HEADERS.join(", ")));
        for o in options::OPTIONS {
            line(&format!("// option:      {o}"));
        }
        line("");
        out.push_str(&body);
        let path = out_dir.join("bindings.rs");
        std::fs::write(&path, out).map_err(|e| format!("{}: {e}", path.display()))
    }
}
