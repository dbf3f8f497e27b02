//! Build facts for the agent:
//!
//! - the git commit it is built from (`weir --version`, the start-up line,
//!   `weir_build_info`): `WEIR_GIT_COMMIT` when set (image builds without a
//!   git checkout), else `git rev-parse`, else "unknown";
//! - the kernel object it embeds: `WEIR_EBPF_OBJECT`, set by `cargo xtask
//!   build`/`test`. Without it (plain `cargo check`, `cargo clippy`,
//!   rust-analyzer on a machine without the eBPF toolchain) an empty
//!   placeholder is embedded instead, so the agent still type-checks; such a
//!   binary refuses to load with an error that says how to build it
//!   (`datapath::kernel_object`). This is the approach aya's own integration
//!   tests take when their kernel build is skipped.

use std::path::PathBuf;
use std::process::Command;

fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git").args(args).output().ok()?;
    if !out.status.success() {
        return None;
    }
    let s = String::from_utf8(out.stdout).ok()?.trim().to_string();
    (!s.is_empty()).then_some(s)
}

/// Where the embedded object comes from: `WEIR_EBPF_OBJECT`, or an empty
/// placeholder in `OUT_DIR`.
fn kernel_object() -> PathBuf {
    println!("cargo:rerun-if-env-changed=WEIR_EBPF_OBJECT");
    match std::env::var_os("WEIR_EBPF_OBJECT").filter(|p| !p.is_empty()) {
        Some(path) => PathBuf::from(path),
        None => {
            let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
            let placeholder = out.join("weir-ebpf.placeholder");
            std::fs::write(&placeholder, b"").expect("writing the placeholder object");
            println!(
                "cargo:warning=WEIR_EBPF_OBJECT is not set: embedding an empty kernel object \
                 (fine for check/clippy; build a runnable weir with `cargo xtask build`)"
            );
            placeholder
        }
    }
}

fn main() {
    println!(
        "cargo:rustc-env=WEIR_EBPF_OBJECT_PATH={}",
        kernel_object().display()
    );
    println!("cargo:rerun-if-env-changed=WEIR_GIT_COMMIT");
    let commit = match std::env::var("WEIR_GIT_COMMIT") {
        Ok(c) if !c.is_empty() => c,
        _ => {
            // Build again when HEAD moves (a commit, a checkout).
            for path in [
                git(&["rev-parse", "--git-path", "HEAD"]),
                git(&["symbolic-ref", "-q", "HEAD"])
                    .and_then(|r| git(&["rev-parse", "--git-path", &r])),
                git(&["rev-parse", "--git-path", "packed-refs"]),
            ]
            .into_iter()
            .flatten()
            {
                if std::path::Path::new(&path).exists() {
                    println!("cargo:rerun-if-changed={path}");
                }
            }
            git(&["rev-parse", "--short=12", "HEAD"]).unwrap_or_else(|| "unknown".into())
        }
    };
    println!("cargo:rustc-env=WEIR_BUILD_COMMIT={commit}");
}
