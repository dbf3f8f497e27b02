//! Building the kernel object (`build-ebpf`) and the userspace binaries
//! (`build`).
//!
//! The eBPF crate is built on its own, into its own target directory, with
//! the compiler [`crate::toolchain::setup`] found: its flags and compiler
//! differ from the host build's, and sharing `target/` would make each build
//! invalidate the other's cache. The agent then embeds the object through
//! `WEIR_EBPF_OBJECT`.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, ensure};

use crate::cmd::Cmd;
use crate::host;
use crate::toolchain::{BPF_TARGET, Compiler, Toolchain};

/// Read by the agent's build script, which embeds the object in `weir`.
pub const EBPF_OBJECT_ENV: &str = "WEIR_EBPF_OBJECT";

/// Variables that would leak host settings into the BPF build: host
/// rustflags (e.g. `-C target-cpu=native`) are rejected by the BPF backend,
/// and wrappers such as sccache do not know the eBPF compiler.
const HOST_BUILD_ENV: &[&str] = &[
    "RUSTFLAGS",
    "CARGO_ENCODED_RUSTFLAGS",
    "CARGO_BUILD_RUSTFLAGS",
    "RUSTC_WRAPPER",
    "RUSTC_WORKSPACE_WRAPPER",
    "CARGO_BUILD_RUSTC_WRAPPER",
    "CARGO_BUILD_RUSTC_WORKSPACE_WRAPPER",
    "CARGO_BUILD_RUSTC",
];

/// `-C debuginfo=2` plus bpf-linker's `--btf` turn the debug info into BTF
/// in the object, so the kernel and bpftool can describe its maps and
/// programs by type. Debug info needs the release profile's `debug = 2` for
/// weir-ebpf too (root Cargo.toml).
const BPF_RUSTFLAGS: &str = "-C debuginfo=2 -C link-arg=--btf";

/// Where `build-ebpf` writes the kernel object.
pub fn ebpf_object(root: &Path) -> PathBuf {
    ebpf_target_dir(root)
        .join(BPF_TARGET)
        .join("release")
        .join("weir-ebpf")
}

fn ebpf_target_dir(root: &Path) -> PathBuf {
    root.join("target").join("ebpf")
}

/// Where host builds put their binaries: `target/`, unless the caller moved
/// it with `CARGO_TARGET_DIR` (relative to the workspace root, where cargo
/// runs).
pub fn host_target_dir(root: &Path) -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR").filter(|d| !d.is_empty()) {
        Some(dir) => root.join(dir),
        None => root.join("target"),
    }
}

/// Builds `weir-ebpf` for [`BPF_TARGET`] and returns the object's path.
pub fn build_ebpf(root: &Path, toolchain: &Toolchain) -> Result<PathBuf> {
    ebpf_build_cmd(root, toolchain)
        .run()
        .context("building the eBPF object (package weir-ebpf) failed")?;

    let object = ebpf_object(root);
    ensure!(
        object.is_file(),
        "cargo built weir-ebpf but {} does not exist",
        object.display()
    );
    println!("weir build-ebpf: object {}", object.display());
    Ok(object)
}

/// The cargo command line for the kernel object, for either kind of
/// [`Compiler`].
fn ebpf_build_cmd(root: &Path, toolchain: &Toolchain) -> Cmd {
    let cargo = match &toolchain.compiler {
        Compiler::Prebuilt { rustc, .. } => Cmd::new(host::cargo()).env("RUSTC", rustc),
        // `rustup run nightly cargo` rather than `cargo +nightly`: the latter
        // only works through the rustup proxy, and CARGO may be a real binary.
        Compiler::NightlyBuildStd => Cmd::new("rustup")
            .args(["run", "nightly", "cargo"])
            .env("RUSTUP_AUTO_INSTALL", "0")
            .env_remove("RUSTC"),
    };
    let mut cmd = cargo
        .args(["build", "--package", "weir-ebpf", "--release"])
        .args(["--target", BPF_TARGET, "--target-dir"])
        .arg(ebpf_target_dir(root));
    if matches!(toolchain.compiler, Compiler::NightlyBuildStd) {
        cmd = cmd.args(["-Z", "build-std=core"]);
    }
    for var in HOST_BUILD_ENV {
        cmd = cmd.env_remove(var);
    }
    // bpf-linker is passed by full path, but PATH must still reach cargo's
    // own tools (and rustup's proxies) when they live in $CARGO_HOME/bin.
    if let Some(path) = host::path_with(&toolchain.cargo_bin) {
        cmd = cmd.env("PATH", path);
    }
    // RUSTC_BOOTSTRAP: aya-ebpf uses nightly-only features, and the stable
    // or Debian compilers refuse them without it. Scoped to this build.
    cmd.env("RUSTC_BOOTSTRAP", "1")
        .env("CARGO_TARGET_BPFEL_UNKNOWN_NONE_RUSTFLAGS", BPF_RUSTFLAGS)
        .env("CARGO_TARGET_BPFEL_UNKNOWN_NONE_LINKER", &toolchain.linker)
        .dir(root)
}

/// Cargo profile of the userspace build.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Profile {
    Release,
    Debug,
}

impl Profile {
    /// The `target/` subdirectory cargo writes this profile's binaries to.
    pub fn dir_name(self) -> &'static str {
        match self {
            Profile::Release => "release",
            Profile::Debug => "debug",
        }
    }

    fn cargo_flags(self) -> &'static [&'static str] {
        match self {
            Profile::Release => &["--release"],
            Profile::Debug => &[],
        }
    }
}

/// Builds the agent and the test tools with the kernel object embedded, and
/// returns the executables cargo reports.
pub fn build_userspace(root: &Path, object: &Path, profile: Profile) -> Result<Vec<PathBuf>> {
    // JSON messages name each executable exactly, whatever binaries the
    // packages declare; human diagnostics still go to stderr.
    let stdout = Cmd::new(host::cargo())
        .arg("build")
        .args(profile.cargo_flags())
        .args(["--package", "weir-agent", "--package", "weir-tests"])
        .arg("--message-format=json-render-diagnostics")
        .env(EBPF_OBJECT_ENV, object)
        .dir(root)
        .run_capture_stdout()
        .context("building weir-agent and weir-tests failed")?;
    let executables = executables_from_cargo_json(&stdout)?;
    for executable in &executables {
        println!("weir build: {}", executable.display());
    }
    Ok(executables)
}

/// The `executable` of each `compiler-artifact` message in cargo's
/// `--message-format=json` output.
fn executables_from_cargo_json(stdout: &str) -> Result<Vec<PathBuf>> {
    let mut executables = Vec::new();
    for line in stdout.lines().filter(|l| l.starts_with('{')) {
        let message: serde_json::Value =
            serde_json::from_str(line).context("cargo printed a malformed JSON message")?;
        if message["reason"] != "compiler-artifact" {
            continue;
        }
        if let Some(path) = message["executable"].as_str() {
            executables.push(PathBuf::from(path));
        }
    }
    Ok(executables)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn object_path_is_the_release_binary_of_the_bpf_target() {
        assert_eq!(
            ebpf_object(Path::new("/w")),
            Path::new("/w/target/ebpf/bpfel-unknown-none/release/weir-ebpf")
        );
    }

    fn toolchain(compiler: Compiler) -> Toolchain {
        Toolchain {
            compiler,
            linker: PathBuf::from("/c/bin/bpf-linker"),
            // Always on PATH, so the rendered command has no PATH= in it.
            cargo_bin: std::env::split_paths(&std::env::var_os("PATH").unwrap())
                .next()
                .unwrap(),
        }
    }

    #[test]
    fn prebuilt_core_build_points_cargo_at_that_rustc() {
        let toolchain = toolchain(Compiler::Prebuilt {
            rustc: PathBuf::from("/usr/bin/rustc"),
            origin: "test",
        });
        let line = ebpf_build_cmd(Path::new("/w"), &toolchain).to_string();
        assert!(
            line.starts_with("RUSTC=/usr/bin/rustc RUSTC_BOOTSTRAP=1 "),
            "{line}"
        );
        assert!(
            line.contains("CARGO_TARGET_BPFEL_UNKNOWN_NONE_LINKER=/c/bin/bpf-linker "),
            "{line}"
        );
        assert!(
            line.ends_with(
                "build --package weir-ebpf --release --target bpfel-unknown-none \
                 --target-dir /w/target/ebpf"
            ),
            "{line}"
        );
        assert!(!line.contains("build-std"), "{line}");
    }

    #[test]
    fn nightly_build_compiles_core_from_source() {
        let toolchain = toolchain(Compiler::NightlyBuildStd);
        let line = ebpf_build_cmd(Path::new("/w"), &toolchain).to_string();
        assert!(!line.contains("RUSTC="), "{line}");
        assert!(line.contains(" rustup run nightly cargo build "), "{line}");
        assert!(line.ends_with(" -Z build-std=core"), "{line}");
    }

    #[test]
    fn picks_executables_from_artifact_messages() {
        let stdout = concat!(
            r#"{"reason":"compiler-artifact","executable":null,"target":{"name":"libc"}}"#,
            "\n",
            r#"{"reason":"compiler-artifact","executable":"/w/target/release/weir"}"#,
            "\n",
            r#"{"reason":"build-finished","success":true}"#,
            "\n"
        );
        assert_eq!(
            executables_from_cargo_json(stdout).unwrap(),
            vec![PathBuf::from("/w/target/release/weir")]
        );
    }
}
