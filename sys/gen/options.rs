// The bindgen configuration of `src/bindings.rs`, in one place for its two users: `cargo xtask gen-sys`
// (xtask/src/sys.rs, which commits the file) and this crate's build script (build.rs, feature `bindgen`,
// which writes it into OUT_DIR). Both `include!` this file into a module, so the two generators cannot
// drift apart: from the same headers they produce the same text (CI diffs the two).
//
// It needs only `std` and `bindgen`.

use std::fmt::Write as _;
use std::path::Path;

/// The headers bound, relative to the include directory (`usr/include`).
pub const HEADERS: &[&str] = &["linux/iommufd.h", "linux/vfio.h"];

/// The bindgen options of `bindings.rs`, recorded verbatim in the generated file's header.
pub const OPTIONS: &[&str] = &[
    "target x86_64-unknown-linux-gnu (the 64-bit layout, identical on aarch64/riscv64/ppc64le/s390x)",
    "allowlist: iommu_*, iommufd_*, vfio_*, IOMMU*, VFIO* and what they reference",
    "use_core, ctypes_prefix ::core::ffi",
    "prepend_enum_name(false), default enum style (consts + type alias)",
    "derive Default, Debug, Copy, Clone; layout tests (compile-time asserts)",
    "clang_macro_fallback (ioctl request numbers from _IO macros)",
    "ioctl request numbers emitted as _IO(type, nr), evaluated per target architecture by iommufd-sys",
    "kernel-doc comments kept, fenced as ```text so they never run as doctests",
];

/// Kernel-doc comments become ```` ```text ```` blocks, so rustdoc never runs them as doctests.
#[derive(Debug)]
pub struct FenceComments;

impl bindgen::callbacks::ParseCallbacks for FenceComments {
    fn process_comment(&self, comment: &str) -> Option<String> {
        let body: Vec<&str> = comment.lines().map(str::trim_end).collect();
        let body = body.join("\n");
        let body = body.trim_matches('\n');
        if body.trim().is_empty() {
            return Some(String::new());
        }
        Some(format!("```text\n{body}\n```"))
    }
}

/// Writes a wrapper header named `name` including `includes` into `work_dir` (clang_macro_fallback needs
/// a real file, not in-memory contents; its scratch files go there too) and returns a builder with the
/// options every generated file shares, searching `dirs` (and nothing of the host: `-nostdinc`).
pub fn builder(
    work_dir: &Path,
    name: &str,
    includes: &[&str],
    dirs: &[&Path],
) -> Result<bindgen::Builder, String> {
    std::fs::create_dir_all(work_dir).map_err(|e| format!("{}: {e}", work_dir.display()))?;
    let wrapper: String = includes.iter().map(|h| format!("#include <{h}>\n")).collect();
    let wrapper_path = work_dir.join(name);
    std::fs::write(&wrapper_path, &wrapper).map_err(|e| format!("{}: {e}", wrapper_path.display()))?;
    let mut builder = bindgen::Builder::default()
        .header(wrapper_path.to_str().ok_or_else(|| format!("non-UTF-8 path {}", wrapper_path.display()))?)
        .clang_arg("--target=x86_64-unknown-linux-gnu")
        .clang_arg("-nostdinc");
    for dir in dirs {
        builder = builder.clang_arg(format!("-I{}", dir.display()));
    }
    Ok(builder
        .use_core()
        .ctypes_prefix("::core::ffi")
        .prepend_enum_name(false)
        .derive_default(true)
        .derive_debug(true)
        .derive_copy(true)
        .layout_tests(true)
        .generate_comments(true)
        .clang_macro_fallback()
        .clang_macro_fallback_build_dir(work_dir)
        .parse_callbacks(Box::new(FenceComments))
        .formatter(bindgen::Formatter::Prettyplease))
}

/// Every `#define NAME _IO(...)` in `files`: the ioctl request numbers that must be present.
pub fn ioctl_macros(files: &[&Path]) -> Result<Vec<String>, String> {
    let mut names = Vec::new();
    for file in files {
        // Join backslash-continued lines: some defines wrap before `_IO(`.
        let text = std::fs::read_to_string(file)
            .map_err(|e| format!("{}: {e}", file.display()))?
            .replace("\\\n", " ");
        for line in text.lines() {
            let mut words = line.split_whitespace();
            if words.next() != Some("#define") {
                continue;
            }
            let (Some(name), Some(value)) = (words.next(), words.next()) else { continue };
            if value.starts_with("_IO(") {
                names.push(name.to_string());
            }
        }
    }
    Ok(names)
}

/// Rewrites bindgen's `pub const NAME: u32 = <x86_64 number>;` for every request in `ioctls` as
/// `pub const NAME: u32 = _IO(0xTT, 0xNN);`. bindgen evaluated the macro for x86_64, whose `_IO` has
/// direction 0 and size 0, so the number is `type << 8 | nr`; anything else is an error.
pub fn emit_requests(src: &str, ioctls: &[String]) -> Result<String, String> {
    let mut out = String::with_capacity(src.len());
    let mut done = Vec::new();
    for line in src.split_inclusive('\n') {
        let request = line.strip_prefix("pub const ").and_then(|rest| {
            let (name, value) = rest.split_once(": u32 = ")?;
            let value = value.trim_end().strip_suffix(';')?;
            ioctls.contains(&name.to_string()).then_some((name, value))
        });
        let Some((name, value)) = request else {
            out.push_str(line);
            continue;
        };
        let number: u32 =
            value.parse().map_err(|_| format!("{name}: request number {value:?} is not a u32"))?;
        if number >> 16 != 0 {
            return Err(format!("{name} = {number:#x} is not an x86_64 _IO request (direction or size set)"));
        }
        writeln!(out, "pub const {name}: u32 = _IO({:#x}, {:#x});", number >> 8, number & 0xff)
            .map_err(|e| e.to_string())?;
        done.push(name.to_string());
    }
    let missing: Vec<_> = ioctls.iter().filter(|n| !done.contains(n)).collect();
    if !missing.is_empty() {
        return Err(format!("ioctl request numbers not emitted as `pub const NAME: u32`: {missing:?}"));
    }
    Ok(out)
}

/// The body of `bindings.rs` (everything after the header of `//` comments its writer puts on top),
/// generated from the [`HEADERS`] in `include` (a `usr/include`), with `asm_dirs` searched after it for
/// `asm/` (on Debian, its multiarch directory such as `usr/include/x86_64-linux-gnu`). `work_dir` holds
/// the wrapper header and bindgen's scratch files.
pub fn generate_bindings(work_dir: &Path, include: &Path, asm_dirs: &[&Path]) -> Result<String, String> {
    let files: Vec<_> = HEADERS.iter().map(|h| include.join(h)).collect();
    let ioctls = ioctl_macros(&files.iter().map(|f| f.as_path()).collect::<Vec<_>>())?;
    let mut dirs = vec![include];
    dirs.extend_from_slice(asm_dirs);
    let bindings = builder(work_dir, "iommufd-sys-wrapper.h", HEADERS, &dirs)?
        .allowlist_type("(iommu|iommufd|vfio)_.*")
        .allowlist_var("(IOMMU|IOMMUFD|VFIO)_.*")
        .allowlist_type("(IOMMU|IOMMUFD|VFIO)_.*")
        .generate()
        .map_err(|e| format!("bindgen failed: {e}"))?;
    emit_requests(&bindings.to_string(), &ioctls)
}
