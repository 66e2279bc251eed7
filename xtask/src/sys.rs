//! `cargo xtask gen-sys` / `cargo xtask check-sys`: the pinned bindings generator for `iommufd-sys`.
//!
//! Two generated files, both committed:
//!
//! - `sys/src/bindings.rs` from the uAPI headers `linux/iommufd.h` and `linux/vfio.h`, taken from Debian's
//!   `linux-libc-dev` at one pinned version;
//! - `sys/src/testing.rs` (the `testing` feature) from `drivers/iommu/iommufd/iommufd_test.h`, the kernel's
//!   mock IOMMU command interface. It is not an installed uAPI header and changes between kernels, so it is
//!   taken from the source of the test VM's kernel (Debian's `linux-source-7.3`, the version pinned in
//!   `kernel.rs`). Only the items that header defines are emitted; what it uses from `linux/iommufd.h`
//!   refers to the crate root (`use crate::*;`).
//!
//! Both packages are downloaded into the cache (never installed, never committed). bindgen runs with the
//! options recorded in each generated file's header, configured in `sys/gen/options.rs`, which the
//! `iommufd-sys` build script includes too (its feature `bindgen` regenerates `bindings.rs` at build
//! time): both generators share one definition. A C program compiled from the same headers then checks
//! every integer constant (ioctl request numbers included) and every named struct's size.
//!
//! Ioctl request numbers depend on the architecture (`asm/ioctl.h`: powerpc, mips and sparc encode the
//! direction differently), so they are not emitted as the x86_64 numbers bindgen computes but as
//! `_IO(type, nr)` expressions that `iommufd-sys` evaluates at compile time with the target's encoding.
//! Besides the x86_64 oracle, a C program per architecture (the `asm/` directory of each architecture
//! that `linux-libc-dev` ships) checks every request number against the same encoding, [`ARCHES`].

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::apt::Apt;
use crate::kernel::{Kernel, LTS_6_12, PINNED};
use crate::{Result, cache_dir, run, workspace_root};

/// The pinned kernel uAPI: Debian package and version of `linux-libc-dev`.
pub const HEADERS_PACKAGE: &str = "linux-libc-dev";
pub const HEADERS_VERSION: &str = "7.3.4-1~bpo13+1";
/// The kernel version those headers export.
pub const KERNEL_VERSION: &str = "7.3.4";
/// The bindgen version the generator is pinned to (Cargo.toml pins the same with `=`).
pub const BINDGEN_VERSION: &str = "0.73.2";

/// The generator options of `bindings.rs` (and the builder `testing.rs` shares), also used by the
/// `iommufd-sys` build script (feature `bindgen`): one definition for both generators.
mod options {
    include!("../../sys/gen/options.rs");
}
use options::{HEADERS, OPTIONS};

/// Where bindgen's wrapper headers and `clang_macro_fallback` scratch files go.
fn macro_fallback_dir() -> PathBuf {
    cache_dir().join("bindgen-macro-fallback")
}

/// The mock IOMMU's header, relative to the top of the kernel source tree.
const TEST_HEADER: &str = "drivers/iommu/iommufd/iommufd_test.h";

/// The bindgen options of `testing.rs`, recorded verbatim in that file.
const TEST_OPTIONS: &[&str] = &[
    "target x86_64-unknown-linux-gnu (the 64-bit layout, identical on aarch64/riscv64/ppc64le/s390x)",
    "allowlist_file iommufd_test.h: only the items that header defines",
    "blocklist_file linux/*, asm/*, asm-generic/*: their items come from the crate root (use crate::*)",
    "blocklisted __u8..__s64 declared plain integers (derives and Rust unions as for bindings.rs)",
    "use_core, ctypes_prefix ::core::ffi",
    "prepend_enum_name(false), default enum style (consts + type alias)",
    "derive Default, Debug, Copy, Clone; layout tests (compile-time asserts)",
    "clang_macro_fallback (IOMMU_TEST_CMD from its _IO macro)",
    "ioctl request numbers emitted as _IO(type, nr), evaluated per target architecture by iommufd-sys",
    "kernel-doc comments kept, fenced as ```text so they never run as doctests",
];

/// The `_IO` encoding of each 64-bit architecture Rust builds Linux code for, as its `asm/ioctl.h` defines
/// it: (`linux-libc-dev` multiarch directory, `_IOC_NONE`, `_IOC_DIRSHIFT`). `sys/src/lib.rs` selects the
/// same two encodings by `target_arch`; the per-architecture oracle checks this table against the kernel's
/// headers for every request number.
pub const ARCHES: &[(&str, u32, u32)] = &[
    ("x86_64-linux-gnu", 0, 30),
    ("aarch64-linux-gnu", 0, 30),
    ("riscv64-linux-gnu", 0, 30),
    ("s390x-linux-gnu", 0, 30),
    ("loongarch64-linux-gnu", 0, 30),
    ("powerpc64le-linux-gnu", 1, 29),
    ("powerpc64-linux-gnu", 1, 29),
    ("mips64el-linux-gnuabi64", 1, 29),
    ("sparc64-linux-gnu", 1, 29),
];

/// `_IO(ty, nr)` with an architecture's encoding from [`ARCHES`].
fn io_request(none: u32, dir_shift: u32, ty: u32, nr: u32) -> u64 {
    u64::from(none << dir_shift | ty << 8 | nr)
}

/// The `(type, nr)` of a `_IO(0xTT, 0xNN)` expression as [`options::emit_requests`] writes it.
fn parse_io(value: &str) -> Option<(u32, u32)> {
    let args = value.strip_prefix("_IO(")?.strip_suffix(')')?;
    let (ty, nr) = args.split_once(',')?;
    let hex = |s: &str| u32::from_str_radix(s.trim().strip_prefix("0x")?, 16).ok();
    Some((hex(ty)?, hex(nr)?))
}

pub fn generated_path() -> PathBuf {
    workspace_root().join("sys/src/bindings.rs")
}

pub fn testing_path() -> PathBuf {
    workspace_root().join("sys/src/testing.rs")
}

/// Unpacks the pinned headers and returns their `usr/include` directory.
fn headers() -> Result<PathBuf> {
    let apt = Apt::new()?;
    let dir = apt.unpack(HEADERS_PACKAGE, HEADERS_VERSION, &format!("headers-{HEADERS_VERSION}"))?;
    Ok(dir.join("usr/include"))
}

/// The variable naming the include directory `iommufd-sys`'s build script generates from (feature
/// `bindgen`).
pub const HEADERS_VAR: &str = "IOMMUFD_SYS_HEADERS";

/// What a build with feature `bindgen` needs (`--all-features` builds included): libclang installed,
/// and the pinned headers unpacked. Returns their include directory, the value for [`HEADERS_VAR`]:
/// generated from them, the bindings equal the committed ones.
pub fn bindgen_headers() -> Result<PathBuf> {
    crate::host::ensure("iommufd-sys's feature `bindgen`", &[crate::host::Pkg::plain("libclang-dev")])?;
    headers()
}

/// `cargo xtask sys-headers`: prints the pinned headers' include directory, after making sure that it
/// and libclang are there (`export IOMMUFD_SYS_HEADERS=$(cargo xtask sys-headers)`).
pub fn sys_headers() -> Result<()> {
    println!("{}", bindgen_headers()?.display());
    Ok(())
}

/// Extracts [`TEST_HEADER`] alone from `kernel`'s source package (once) and returns the directory that
/// stands for the top of the source tree (it holds only that file).
fn test_header_root(kernel: &Kernel) -> Result<PathBuf> {
    let (package, version) = (kernel.package, kernel.version);
    let root = cache_dir().join(format!("kernel-test-header-{version}"));
    let stamp = root.join(".extracted");
    if stamp.exists() {
        return Ok(root);
    }
    let deb = Apt::new()?.download(package, version)?;
    if root.exists() {
        std::fs::remove_dir_all(&root)?;
    }
    std::fs::create_dir_all(&root)?;
    eprintln!("gen-sys: extracting {TEST_HEADER} from {}", deb.display());
    // The .deb holds usr/src/<package>.tar.xz; stream it out and pick the one member from it.
    let script = "dpkg-deb --fsys-tarfile \"$1\" | tar -xOf - \"./usr/src/$2.tar.xz\" \
                  | tar -xJf - -C \"$3\" --strip-components=1 \"$2/$4\"";
    run(Command::new("bash")
        .args(["-c", &format!("set -o pipefail; {script}"), "bash"])
        .arg(&deb)
        .arg(package)
        .arg(&root)
        .arg(TEST_HEADER))?;
    if !root.join(TEST_HEADER).exists() {
        return Err(format!("{} has no {package}/{TEST_HEADER}", deb.display()).into());
    }
    std::fs::write(&stamp, format!("{package} {version}\n"))?;
    Ok(root)
}

/// The blocklisted `linux/types.h` integers that `testing.rs` takes from the crate root are plain
/// integers: telling bindgen so lets it derive `Copy`, `Debug`, `Default` and the rest for the structs
/// that contain them (it assumes nothing of a blocklisted type), and emit C unions as Rust unions.
#[derive(Debug)]
struct PlainIntegers;

impl bindgen::callbacks::ParseCallbacks for PlainIntegers {
    fn blocklisted_type_implements_trait(
        &self,
        name: &str,
        _derive_trait: bindgen::callbacks::DeriveTrait,
    ) -> Option<bindgen::callbacks::ImplementsTrait> {
        let bits = name.strip_prefix("__u").or_else(|| name.strip_prefix("__s"))?;
        matches!(bits, "8" | "16" | "32" | "64").then_some(bindgen::callbacks::ImplementsTrait::Yes)
    }
}

/// Runs bindgen for `bindings.rs` and returns the generated source (with our header).
fn generate(include: &Path) -> Result<String> {
    let asm_include = include.join("x86_64-linux-gnu");
    let body = options::generate_bindings(&macro_fallback_dir(), include, &[&asm_include])?;
    let mut out = String::new();
    writeln!(out, "// Generated by `cargo xtask gen-sys`. Do not edit: regenerate instead.")?;
    writeln!(out, "//")?;
    writeln!(out, "// kernel uAPI: Linux {KERNEL_VERSION}")?;
    writeln!(out, "// headers:     Debian {HEADERS_PACKAGE} {HEADERS_VERSION}")?;
    writeln!(out, "// files:       {}", HEADERS.join(", "))?;
    writeln!(out, "// bindgen:     {BINDGEN_VERSION}")?;
    for o in OPTIONS {
        writeln!(out, "// option:      {o}")?;
    }
    writeln!(out)?;
    out.push_str(&body);
    Ok(out)
}

/// Runs bindgen for `testing.rs` and returns the generated source (with our header).
fn generate_testing(include: &Path, source: &Path, ioctls: &[String]) -> Result<String> {
    let asm_include = include.join("x86_64-linux-gnu");
    let bindings = options::builder(
        &macro_fallback_dir(),
        "iommufd-sys-testing-wrapper.h",
        &[TEST_HEADER],
        &[source, include, &asm_include],
    )?
    .allowlist_file(".*/iommufd_test\\.h")
    .blocklist_file(".*/(linux|asm|asm-generic)/.*")
    .raw_line("use crate::*;")
    .parse_callbacks(Box::new(PlainIntegers))
    .generate()
    .map_err(|e| format!("bindgen failed on {TEST_HEADER}: {e}"))?;
    let mut out = String::new();
    writeln!(out, "// Generated by `cargo xtask gen-sys`. Do not edit: regenerate instead.")?;
    writeln!(out, "//")?;
    writeln!(
        out,
        "// The kernel's mock IOMMU interface (CONFIG_IOMMUFD_TEST). Not an installed uAPI header: it"
    )?;
    writeln!(out, "// changes between kernels, and this file is pinned to the test VM's kernel.")?;
    writeln!(out, "//")?;
    writeln!(out, "// kernel:      Linux {KERNEL_VERSION}")?;
    writeln!(out, "// source:      Debian {} {}", PINNED.package, PINNED.version)?;
    writeln!(out, "// file:        {TEST_HEADER}")?;
    writeln!(
        out,
        "// includes:    linux/iommufd.h from Debian {HEADERS_PACKAGE} {HEADERS_VERSION} (bindings.rs)"
    )?;
    writeln!(out, "// bindgen:     {BINDGEN_VERSION}")?;
    for o in TEST_OPTIONS {
        writeln!(out, "// option:      {o}")?;
    }
    writeln!(out)?;
    out.push_str(&options::emit_requests(&bindings.to_string(), ioctls)?);
    Ok(out)
}

/// All `pub const NAME: T = value;` integer constants in generated source.
fn rust_consts(src: &str) -> BTreeMap<String, u64> {
    let mut map = BTreeMap::new();
    for line in src.lines() {
        let Some(rest) = line.trim().strip_prefix("pub const ") else { continue };
        let Some((name, rest)) = rest.split_once(':') else { continue };
        let Some((_, value)) = rest.split_once('=') else { continue };
        let value = value.trim().trim_end_matches(';').trim();
        // Typed literals such as `59u8`.
        let value = ["u8", "u16", "u32", "u64", "i8", "i16", "i32", "i64"]
            .iter()
            .find_map(|s| value.strip_suffix(s))
            .unwrap_or(value);
        // Request numbers: the x86_64 value, which the C oracle computes.
        let parsed = if let Some((ty, nr)) = parse_io(value) {
            Some(io_request(0, 30, ty, nr))
        } else if let Some(hex) = value.strip_prefix("0x") {
            u64::from_str_radix(hex, 16).ok()
        } else {
            value.parse::<i64>().ok().map(|v| v as u64)
        };
        if let Some(v) = parsed {
            map.insert(name.trim().to_string(), v);
        }
    }
    map
}

/// The size bindgen's layout assertions give every named C struct or union in generated source, keyed
/// by the C type (`struct NAME`/`union NAME`). bindgen's own names for anonymous members are skipped.
fn rust_sizes(src: &str) -> BTreeMap<String, u64> {
    let mut kinds = BTreeMap::new();
    for line in src.lines() {
        for kind in ["struct", "union"] {
            let Some(rest) = line.strip_prefix(&format!("pub {kind} ")) else { continue };
            let name = rest.split(|c: char| !(c.is_alphanumeric() || c == '_')).next().unwrap_or("");
            if !name.is_empty() && !name.starts_with('_') && !name.contains("__bindgen") {
                kinds.insert(name.to_string(), kind);
            }
        }
    }
    let mut sizes = BTreeMap::new();
    // `["Size of NAME"][::core::mem::size_of::<NAME>() - 72usize];`, possibly wrapped over lines.
    for (name, kind) in &kinds {
        let pattern = format!("::core::mem::size_of::<{name}>() - ");
        let Some(at) = src.find(&pattern) else { continue };
        let rest = &src[at + pattern.len()..];
        let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
        if let Ok(size) = digits.parse::<u64>() {
            sizes.insert(format!("{kind} {name}"), size);
        }
    }
    sizes
}

/// What a C oracle checks: the generated constants and type sizes against `includes`.
struct Oracle<'a> {
    name: &'a str,
    includes: Vec<String>,
    /// Include directories, the architecture's `asm/` directory excluded (it is added per architecture).
    dirs: Vec<PathBuf>,
    /// The `usr/include` holding one `asm/` directory per architecture (`<multiarch>/asm`).
    include: PathBuf,
}

/// Compiles and runs a C program, `body` being the statements of `main`, against `oracle`'s headers
/// with the `asm/` directory of `arch` (a multiarch directory of [`ARCHES`]); returns its output.
fn run_c(oracle: &Oracle<'_>, arch: &str, body: &str) -> Result<String> {
    let dir = cache_dir().join("oracle");
    std::fs::create_dir_all(&dir)?;
    let mut c = String::new();
    c.push_str("#include <stdio.h>\n");
    for h in &oracle.includes {
        writeln!(c, "#include <{h}>")?;
    }
    writeln!(c, "int main(void) {{\n{body}  return 0;\n}}")?;
    let stem = format!("{}-{arch}", oracle.name);
    let c_path = dir.join(format!("{stem}.c"));
    let bin = dir.join(&stem);
    std::fs::write(&c_path, c)?;
    // The program's own <stdio.h> comes from the host; the uAPI headers from the pinned package first.
    // asm/ioctl.h is plain preprocessor arithmetic, so the host compiler evaluates any architecture's.
    let mut cc = Command::new("cc");
    cc.arg("-o").arg(&bin);
    for d in &oracle.dirs {
        cc.arg(format!("-I{}", d.display()));
    }
    cc.arg(format!("-I{}", oracle.include.join(arch).display()));
    run(cc.arg(&c_path))?;
    let out = Command::new(&bin).output()?;
    if !out.status.success() {
        return Err(format!("C oracle {stem} failed to run").into());
    }
    Ok(String::from_utf8(out.stdout)?)
}

/// Checks every request number of generated source, evaluated with each architecture's encoding of
/// [`ARCHES`], against a C program compiled with that architecture's `asm/ioctl.h`. Returns the number
/// of architectures checked.
fn arch_oracle(oracle: &Oracle<'_>, src: &str, ioctls: &[String]) -> Result<usize> {
    let requests: BTreeMap<String, (u32, u32)> = src
        .lines()
        .filter_map(|line| {
            let (name, value) = line.strip_prefix("pub const ")?.split_once(": u32 = ")?;
            Some((name.to_string(), parse_io(value.strip_suffix(';')?)?))
        })
        .collect();
    let mut body = String::new();
    for name in ioctls {
        writeln!(body, "  printf(\"%s %llu\\n\", \"{name}\", (unsigned long long)({name}));")?;
    }
    let mut bad = Vec::new();
    for &(arch, none, dir_shift) in ARCHES {
        if !oracle.include.join(arch).join("asm/ioctl.h").exists() {
            return Err(format!("{HEADERS_PACKAGE} {HEADERS_VERSION} has no {arch}/asm/ioctl.h").into());
        }
        let text = run_c(oracle, arch, &body)?;
        for line in text.lines() {
            let (name, value) = line.rsplit_once(' ').ok_or("bad oracle line")?;
            let c_value: u64 = value.parse()?;
            let (ty, nr) =
                requests.get(name).ok_or_else(|| format!("{name} is not emitted as _IO(type, nr)"))?;
            let rust = io_request(none, dir_shift, *ty, *nr);
            if rust != c_value {
                bad.push(format!("{arch}: {name}: _IO({ty:#x}, {nr:#x}) = {rust:#x} != C {c_value:#x}"));
            }
        }
    }
    if !bad.is_empty() {
        return Err(format!(
            "{} differs from the per-architecture C oracle:\n{}",
            oracle.name,
            bad.join("\n")
        )
        .into());
    }
    Ok(ARCHES.len())
}

/// Compiles a C program from the same headers printing every constant and size, and compares.
/// Returns (constants checked, sizes checked).
fn c_oracle(oracle: &Oracle<'_>, src: &str, ioctls: &[String]) -> Result<(usize, usize)> {
    let consts = rust_consts(src);
    let sizes = rust_sizes(src);
    let mut body = String::new();
    for name in consts.keys() {
        writeln!(body, "  printf(\"%s %llu\\n\", \"{name}\", (unsigned long long)({name}));")?;
    }
    for ty in sizes.keys() {
        writeln!(body, "  printf(\"sizeof(%s) %llu\\n\", \"{ty}\", (unsigned long long)sizeof({ty}));")?;
    }
    // The layouts bindgen generated for (x86_64), and the request numbers as x86_64 encodes them.
    let text = run_c(oracle, "x86_64-linux-gnu", &body)?;
    let (mut checked, mut sized) = (0, 0);
    let mut bad = Vec::new();
    for line in text.lines() {
        let (name, value) = line.rsplit_once(' ').ok_or("bad oracle line")?;
        let c_value: u64 = value.parse()?;
        if let Some(ty) = name.strip_prefix("sizeof(").and_then(|n| n.strip_suffix(')')) {
            let rust = sizes[ty];
            if rust != c_value {
                bad.push(format!("sizeof({ty}): rust {rust} != C {c_value}"));
            }
            sized += 1;
            continue;
        }
        let rust = consts[name];
        // A C `int` expression such as `(1 << 31)` sign-extends when widened; bindgen types it u32.
        let c_int_widened = c_value >> 32 == 0xffff_ffff && rust == c_value & 0xffff_ffff;
        if rust != c_value && !c_int_widened {
            bad.push(format!("{name}: rust {rust:#x} != C {c_value:#x}"));
        }
        checked += 1;
    }
    let missing: Vec<_> = ioctls.iter().filter(|n| !consts.contains_key(*n)).collect();
    if !missing.is_empty() {
        return Err(format!("ioctl request numbers missing from {}: {missing:?}", oracle.name).into());
    }
    if !bad.is_empty() {
        return Err(format!("{} differs from the C oracle:\n{}", oracle.name, bad.join("\n")).into());
    }
    Ok((checked, sized))
}

/// Both generated files, checked: (bindings.rs, testing.rs).
fn generate_checked() -> Result<(String, String)> {
    // bindgen loads libclang at run time; the C oracle needs a C compiler; the mock IOMMU's header
    // comes out of an xz tarball.
    crate::host::ensure(
        "the bindings generator",
        &[
            crate::host::Pkg::plain("libclang-dev"),
            crate::host::Pkg::plain("gcc"),
            crate::host::Pkg::plain("xz-utils"),
        ],
    )?;
    let include = headers()?;

    let files: Vec<PathBuf> = HEADERS.iter().map(|h| include.join(h)).collect();
    let ioctls = options::ioctl_macros(&files.iter().map(PathBuf::as_path).collect::<Vec<_>>())?;
    let src = generate(&include)?;
    let oracle = Oracle {
        name: "bindings",
        includes: HEADERS.iter().map(|h| h.to_string()).collect(),
        dirs: vec![include.clone()],
        include: include.clone(),
    };
    let (checked, sized) = c_oracle(&oracle, &src, &ioctls)?;
    let arches = arch_oracle(&oracle, &src, &ioctls)?;
    let iommu = ioctls.iter().filter(|n| n.starts_with("IOMMU_")).count();
    eprintln!(
        "gen-sys: bindings.rs: {} ioctl request numbers ({iommu} IOMMU_*), {checked} constants and {sized} \
         struct sizes equal to the C oracle; request numbers equal on {arches} architectures",
        ioctls.len()
    );
    if iommu != 22 {
        return Err(format!("expected 22 IOMMU_* ioctls in {KERNEL_VERSION}, found {iommu}").into());
    }

    let source = test_header_root(&PINNED)?;
    let ioctls = options::ioctl_macros(&[&source.join(TEST_HEADER)])?;
    let testing = generate_testing(&include, &source, &ioctls)?;
    let oracle = Oracle {
        name: "testing",
        includes: vec!["linux/iommufd.h".to_string(), TEST_HEADER.to_string()],
        dirs: vec![source.clone(), include.clone()],
        include: include.clone(),
    };
    let (checked, sized) = c_oracle(&oracle, &testing, &ioctls)?;
    let arches = arch_oracle(&oracle, &testing, &ioctls)?;
    eprintln!(
        "gen-sys: testing.rs: {} ioctl request number(s), {checked} constants and {sized} struct sizes equal \
         to the C oracle; request numbers equal on {arches} architectures",
        ioctls.len()
    );
    if ioctls != ["IOMMU_TEST_CMD"] {
        return Err(format!("expected IOMMU_TEST_CMD alone in {TEST_HEADER}, found {ioctls:?}").into());
    }
    Ok((src, testing))
}

/// `sys/README.md` names the pinned kernel, headers package and bindgen versions: after a version bump it
/// must be updated with the generated files.
fn check_readme_pins() -> Result<()> {
    let path = workspace_root().join("sys/README.md");
    let readme = std::fs::read_to_string(&path)?;
    let stale: Vec<&str> = [KERNEL_VERSION, HEADERS_VERSION, BINDGEN_VERSION]
        .into_iter()
        .filter(|v| !readme.contains(v))
        .collect();
    if !stale.is_empty() {
        return Err(
            format!("{} does not name the pinned version(s) {stale:?}: update it", path.display()).into()
        );
    }
    Ok(())
}

pub fn gen_sys() -> Result<()> {
    let (bindings, testing) = generate_checked()?;
    for (path, src) in [(generated_path(), bindings), (testing_path(), testing)] {
        std::fs::write(&path, src)?;
        eprintln!("gen-sys: wrote {}", path.display());
    }
    check_readme_pins()
}

/// The mock IOMMU interface of the oldest test kernel, as far as the `testing` module relies on it:
/// its test ops are the pinned header's up to `IOMMU_TEST_OP_TRIGGER_IOPF` (the later ones were
/// appended, and `testing` refuses them there as `Unsupported`), and its `struct iommu_hwpt_selftest`
/// is `iotlb` alone (`testing::nested_data` sends only that).
fn check_lts_test_header() -> Result<()> {
    let header = |k: &Kernel| -> Result<String> {
        let path = test_header_root(k)?.join(TEST_HEADER);
        std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()).into())
    };
    let (pinned, lts) = (header(&PINNED)?, header(&LTS_6_12)?);
    let (pinned_ops, lts_ops) = (test_ops(&pinned), test_ops(&lts));
    let last = "IOMMU_TEST_OP_TRIGGER_IOPF";
    if lts_ops.last().map(String::as_str) != Some(last) || !pinned_ops.starts_with(&lts_ops) {
        return Err(format!(
            "{}'s test ops are not the pinned ones up to {last}: {lts_ops:?} vs {pinned_ops:?}",
            LTS_6_12.release
        )
        .into());
    }
    if struct_fields(&lts, "iommu_hwpt_selftest") != ["iotlb"] {
        return Err(format!("{}'s struct iommu_hwpt_selftest is not `iotlb` alone", LTS_6_12.release).into());
    }
    eprintln!(
        "check-sys: {}'s mock interface is the pinned one's first {} ops, with the 4-byte nested data",
        LTS_6_12.release,
        lts_ops.len()
    );
    Ok(())
}

/// The `IOMMU_TEST_OP_*` names of a test header's op enum, in order.
fn test_ops(header: &str) -> Vec<String> {
    let Some(start) = header.find("IOMMU_TEST_OP_ADD_RESERVED") else { return Vec::new() };
    let body = &header[start..header[start..].find("};").map_or(header.len(), |e| start + e)];
    body.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|w| w.starts_with("IOMMU_TEST_OP_"))
        .map(str::to_string)
        .collect()
}

/// The field names of `struct NAME { ... };` in a header (one `type name;` a line).
fn struct_fields(header: &str, name: &str) -> Vec<String> {
    let Some(start) = header.find(&format!("struct {name} {{")) else { return Vec::new() };
    let body = &header[start..];
    let body = &body[body.find('{').map_or(0, |i| i + 1)..body.find("};").unwrap_or(body.len())];
    body.lines()
        .filter_map(|l| l.trim().strip_suffix(';'))
        .filter_map(|l| l.split_whitespace().last())
        .map(str::to_string)
        .collect()
}

pub fn check_sys() -> Result<()> {
    check_readme_pins()?;
    check_lts_test_header()?;
    let (bindings, testing) = generate_checked()?;
    let mut stale = Vec::new();
    for (path, src) in [(generated_path(), bindings), (testing_path(), testing)] {
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("?").to_string();
        let committed = std::fs::read_to_string(&path).unwrap_or_default();
        if committed != src {
            let fresh = cache_dir().join(format!("{name}.fresh"));
            std::fs::write(&fresh, &src)?;
            let _ = Command::new("diff").arg("-u").arg(&path).arg(&fresh).status();
            stale.push(format!("sys/src/{name}"));
        } else {
            eprintln!("check-sys: sys/src/{name} matches a fresh generation");
        }
    }
    if !stale.is_empty() {
        return Err(format!(
            "{} differ(s) from a fresh generation: run `cargo xtask gen-sys`",
            stale.join(", ")
        )
        .into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_header_ops_and_fields_are_parsed() {
        let h = "enum {\n\tIOMMU_TEST_OP_ADD_RESERVED = 1,\n\tIOMMU_TEST_OP_MOCK_DOMAIN,\n};\n\
                 struct iommu_hwpt_selftest {\n\t__u32 iotlb;\n\t__u32 pagetable_type;\n};\n";
        assert_eq!(test_ops(h), ["IOMMU_TEST_OP_ADD_RESERVED", "IOMMU_TEST_OP_MOCK_DOMAIN"]);
        assert_eq!(struct_fields(h, "iommu_hwpt_selftest"), ["iotlb", "pagetable_type"]);
        assert!(struct_fields(h, "missing").is_empty());
    }
}
