//! weir's build and CI tasks, run as `cargo xtask <command>` (an alias in
//! `.cargo/config.toml`).
//!
//! The kernel programs need a different compiler setup from the rest of the
//! workspace (see [`toolchain`]), so plain `cargo build` cannot build a
//! runnable weir on its own (it type-checks, with an empty kernel object:
//! `agent/build.rs`); these commands put the two builds together, and `test` is what
//! CI runs (`.ci/run`).

mod bench;
mod build;
mod cmd;
mod host;
mod image;
mod kernel;
mod soak;
mod test;
mod toolchain;
mod ztunnel;

use std::ffi::OsString;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{ExitCode, ExitStatus};

use anyhow::{Context, Result, ensure};
use clap::{Parser, Subcommand};

use crate::build::Profile;
use crate::cmd::Cmd;

#[derive(Debug, Parser)]
#[command(
    bin_name = "cargo xtask",
    about = "Build, test and run weir (eBPF replacement for Istio's iptables capture)"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Find or install the eBPF compiler, bpf-linker and the test tools
    /// (ip, bpftool, iptables, containerd, runc, the CNI plugins, protoc).
    ///
    /// The eBPF compiler is the first of: $WEIR_BPF_RUSTC; rustup nightly
    /// with rust-src; /usr/bin/rustc with a bpfel-unknown-none core library;
    /// Debian's rustc-web and libstd-rust-web-dev-bpf, installed with apt-get.
    Setup,
    /// Build the kernel object into target/ebpf/bpfel-unknown-none/release/weir-ebpf.
    BuildEbpf,
    /// Build the kernel object, then the agent (`weir`) and the test tools
    /// with the object embedded.
    Build {
        /// Build the userspace binaries without --release (the kernel object
        /// is always a release build).
        #[arg(long)]
        debug: bool,
    },
    /// Run the CI suite: setup, fmt, build-ebpf, clippy, unit tests, kernel
    /// tests, then the kernel-feature tests on Linux 6.1 in a VM
    /// (kernel-matrix; docs/kernels.md).
    ///
    /// The kernel tests run as WEIR_REQUIRE_KERNEL_TESTS=1: they fail rather
    /// than skip when they cannot load programs (not root, no BPF).
    Test {
        /// Only setup, build-ebpf and the kernel tests.
        #[arg(long, conflicts_with = "unit_only")]
        kernel_only: bool,
        /// Everything but the kernel tests.
        #[arg(long)]
        unit_only: bool,
        /// Also run the kernel-feature tests on these Linux series in a VM
        /// (`cargo xtask kernel-test`); `none` for no VM.
        #[arg(long = "kernel", value_name = "VERSION", default_value = "6.1")]
        kernels: Vec<String>,
        /// Arguments for the test binaries, e.g. a test name filter.
        #[arg(last = true, value_name = "TEST_ARGS")]
        test_args: Vec<String>,
    },
    /// Run kernel tests on another Linux kernel in a qemu VM (TCG, slow):
    /// downloads Debian's generic kernel of that series once (unpacked,
    /// never installed), installs qemu and virtme-ng, exits non-zero on
    /// any failed test (docs/kernels.md).
    KernelTest {
        /// A Linux series Debian has, e.g. 6.1 or 6.12.
        version: String,
        /// Test files (comma list of tests/tests/*.rs names), `features`
        /// (the kernel-feature subset CI runs) or `all` (everything but the
        /// differential).
        #[arg(long, value_delimiter = ',', default_value = "features")]
        tests: Vec<String>,
        /// Give up on the VM after this many minutes.
        #[arg(long, default_value_t = 75)]
        timeout_min: u64,
        /// Arguments for every test executable, e.g. a test name filter.
        #[arg(last = true, value_name = "TEST_ARGS")]
        test_args: Vec<String>,
    },
    /// Build ztunnel (Istio ambient's node proxy) from the shared source
    /// once per machine (~6 min cold, cached under ~/.cache/weir/ztunnel;
    /// xtask/src/ztunnel.rs) and print the binary's path: the tests of
    /// weir as ztunnel's ZDS server run it (WEIR_ZTUNNEL_BIN).
    Ztunnel,
    /// Build, then run `weir-testkit demo` with WEIR_BIN set.
    Run {
        /// The ambient demo (`weir-testkit demo --ambient`): a real ztunnel
        /// served by weir over ZDS, HBONE between the pods. Builds ztunnel
        /// once per machine (~6 min cold, cached in ~/.cache/weir/ztunnel)
        /// and passes it as WEIR_ZTUNNEL_BIN.
        #[arg(long)]
        ambient: bool,
        /// Arguments for `weir-testkit demo`.
        #[arg(last = true, value_name = "ARGS")]
        args: Vec<OsString>,
    },
    /// Build (release), then benchmark direct vs iptables vs weir in
    /// network namespaces; writes target/bench/results.md, results.json and
    /// latency.svg and prints the table (needs root; a few minutes).
    Bench(bench::Options),
    /// Build (release), then soak weir under load and faults (issue 6):
    /// agent SIGKILLs under traffic, pod churn, concurrent connections, a
    /// full PENDING_FLOWS, proxy restarts and pod changes; writes
    /// target/soak/results.json and results.md and prints the figures (needs
    /// root; about 5 minutes at the default sizes on 2 CPUs, bounded by
    /// --time-limit-s).
    Soak(soak::Options),
    /// Build weir's OCI image archive with no daemon and no registry:
    /// `weir` and `weir-cni` (release, kernel object embedded), bpftool, and
    /// the libraries they link, as ghcr.io/weir-dev/weir:<version> in
    /// target/image/weir-<version>.oci.tar (load it with `ctr images
    /// import`, `podman load`; publish it with `skopeo copy
    /// oci-archive:FILE docker://REGISTRY/weir:TAG`). Reproducible: set
    /// SOURCE_DATE_EPOCH (default: the last commit's time).
    Image {
        /// Write the archive here instead.
        #[arg(long)]
        out: Option<PathBuf>,
        /// Also write the real-runtime test's images (pause, tools) to
        /// target/image/test/.
        #[arg(long)]
        test_images: bool,
    },
    /// Run clippy on the host crates (builds the kernel object first, which
    /// the agent embeds).
    Clippy,
    /// Format the whole workspace (cargo fmt --all).
    Fmt,
    /// Run ztunnel's namespaced suite (Istio ambient's node proxy, 30
    /// tests) with weir capturing each pod in place of the suite's
    /// iptables script; asserts 30/30 and no iptables/nft rule in any pod.
    /// Builds ztunnel once per machine (cached in ~/.cache/weir/ztunnel).
    PeerZtunnel {
        /// Only build (once) the ztunnel binary and print its path (for the
        /// ZDS tests and the ambient demo).
        #[arg(long)]
        binary: bool,
        /// Test name filters for the suite.
        #[arg(last = true, value_name = "FILTER")]
        filter: Vec<String>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli.command) {
        Ok(code) => code,
        Err(err) => {
            // Printed by hand rather than with `{:?}`: anyhow's Debug adds a
            // backtrace whenever RUST_BACKTRACE is set, which buries the
            // message in CI logs.
            eprintln!("\nerror: {err}");
            for cause in err.chain().skip(1) {
                eprintln!("  caused by: {cause}");
            }
            ExitCode::FAILURE
        }
    }
}

fn run(command: Command) -> Result<ExitCode> {
    let root = workspace_root();
    match command {
        Command::Setup => {
            toolchain::setup()?;
        }
        Command::BuildEbpf => {
            build_ebpf(&root)?;
        }
        Command::Build { debug } => {
            let profile = if debug {
                Profile::Debug
            } else {
                Profile::Release
            };
            build_all(&root, profile)?;
        }
        Command::Test {
            kernel_only,
            unit_only,
            kernels,
            test_args,
        } => {
            let options = test::Options {
                kernel_only,
                unit_only,
                kernels: kernels.into_iter().filter(|k| k != "none").collect(),
                test_args,
            };
            test::run(&root, &options)?;
        }
        Command::KernelTest {
            version,
            tests,
            timeout_min,
            test_args,
        } => {
            let object = build_ebpf(&root)?;
            let options = kernel::Options {
                version,
                tests: kernel::Options::test_files(&tests),
                test_args,
                timeout: std::time::Duration::from_secs(timeout_min * 60),
            };
            kernel::run(&root, &object, &options)?;
        }
        Command::Ztunnel => {
            println!("{}", ztunnel::ensure_ztunnel_binary(&root)?.display());
        }
        Command::Run { ambient, args } => return run_demo(&root, ambient, &args),
        Command::PeerZtunnel { binary: true, .. } => {
            println!("{}", ztunnel::ensure_ztunnel_binary(&root)?.display());
        }
        Command::PeerZtunnel { filter, .. } => {
            let bin_dir = build_all(&root, Profile::Release)?;
            ztunnel::run(&root, &bin_dir.join("weir"), &filter)?;
        }
        Command::Bench(options) => return bench::run(&root, &options),
        Command::Soak(options) => return soak::run(&root, &options),
        Command::Image { out, test_images } => {
            let bin_dir = build_all(&root, Profile::Release)?;
            let out = out.unwrap_or_else(|| image::default_archive(&root));
            let written = image::weir_image(&root, &bin_dir, &out)?;
            println!(
                "weir image: {} {} ({} KiB compressed) -> {}",
                image::weir_image_name(),
                written.manifest_digest,
                written.layer_size / 1024,
                out.display()
            );
            if test_images {
                image::test_images(&root, &bin_dir, &image::test_images_dir(&root))?;
            }
        }
        Command::Clippy => {
            let object = build_ebpf(&root)?;
            test::clippy(&root, &object)?;
        }
        Command::Fmt => test::fmt(&root)?,
    }
    Ok(ExitCode::SUCCESS)
}

/// The workspace root: xtask lives in `<root>/xtask`.
fn workspace_root() -> PathBuf {
    let manifest_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest_dir.parent().unwrap_or(manifest_dir).to_path_buf()
}

fn build_ebpf(root: &Path) -> Result<PathBuf> {
    let toolchain = toolchain::setup()?;
    build::build_ebpf(root, &toolchain)
}

/// Builds everything in release mode, then runs the release binary `tool`
/// (`weir-bench`, `weir-soak`) as root with `WEIR_BIN` set and the args
/// `args(out)` gives for its results directory `target/<name>`; returns
/// its exit code. `needs_root` says why it must run as root.
fn run_release_tool(
    root: &Path,
    name: &str,
    tool: &str,
    needs_root: &str,
    args: impl FnOnce(&Path) -> Vec<OsString>,
) -> Result<ExitCode> {
    ensure!(
        host::is_root(),
        "cargo xtask {name} needs root: {needs_root}"
    );
    let bin_dir = build_all(root, Profile::Release)?;
    let tool_bin = bin_dir.join(tool);
    let weir = bin_dir.join("weir");
    for bin in [&tool_bin, &weir] {
        ensure!(bin.is_file(), "{} was not built", bin.display());
    }
    let out = build::host_target_dir(root).join(name);
    println!("\n==> weir {name}: results go to {}", out.display());
    let status = Cmd::new(&tool_bin)
        .args(args(&out))
        .env("WEIR_BIN", &weir)
        .dir(root)
        .status()
        .with_context(|| format!("running {tool}"))?;
    Ok(exit_code(status))
}

/// `run --out OUT`, then `flags`, `--only=A,B` when given and the
/// caller's further arguments: the command line of `weir-bench run` and
/// `weir-soak run`.
fn release_tool_args(
    out: &Path,
    flags: impl IntoIterator<Item = String>,
    only: &[String],
    extra: &[OsString],
) -> Vec<OsString> {
    let mut args: Vec<OsString> = vec!["run".into(), "--out".into(), out.into()];
    args.extend(flags.into_iter().map(OsString::from));
    if !only.is_empty() {
        args.push(format!("--only={}", only.join(",")).into());
    }
    args.extend(extra.iter().cloned());
    args
}

fn build_all(root: &Path, profile: Profile) -> Result<PathBuf> {
    let object = build_ebpf(root)?;
    build::build_userspace(root, &object, profile)?;
    Ok(build::host_target_dir(root).join(profile.dir_name()))
}

/// Runs the demo and hands its exit code back to our caller.
fn run_demo(root: &Path, ambient: bool, args: &[OsString]) -> Result<ExitCode> {
    let ztunnel = if ambient {
        Some(ztunnel::ensure_ztunnel_binary(root)?)
    } else {
        None
    };
    let bin_dir = build_all(root, Profile::Release)?;
    let testkit = bin_dir.join("weir-testkit");
    ensure!(
        testkit.is_file(),
        "{} does not exist: the weir-tests package has no `weir-testkit` binary yet",
        testkit.display()
    );
    let mut cmd = Cmd::new(&testkit).arg("demo");
    if let Some(ztunnel) = ztunnel {
        cmd = cmd.arg("--ambient").env(ztunnel::BIN_ENV, ztunnel);
    }
    let status = cmd
        .args(args)
        .env("WEIR_BIN", bin_dir.join("weir"))
        .dir(root)
        .status()
        .context("running the demo")?;
    Ok(exit_code(status))
}

/// The exit code a shell would report for `status`: the child's own code,
/// or 128 + the signal that killed it.
fn exit_code(status: ExitStatus) -> ExitCode {
    let code = status
        .code()
        .or_else(|| status.signal().map(|signal| 128 + signal))
        .unwrap_or(1);
    ExitCode::from(u8::try_from(code).unwrap_or(1))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_well_formed() {
        Cli::command().debug_assert();
    }

    #[test]
    fn test_args_follow_a_double_dash() {
        let cli =
            Cli::try_parse_from(["xtask", "test", "--kernel-only", "--", "sk_lookup"]).unwrap();
        let Command::Test {
            kernel_only,
            test_args,
            ..
        } = cli.command
        else {
            panic!("parsed {:?}", cli.command);
        };
        assert!(kernel_only);
        assert_eq!(test_args, ["sk_lookup"]);
    }

    #[test]
    fn kernel_only_and_unit_only_conflict() {
        assert!(Cli::try_parse_from(["xtask", "test", "--kernel-only", "--unit-only"]).is_err());
    }

    #[test]
    fn root_holds_the_workspace_manifest() {
        assert!(workspace_root().join("Cargo.toml").is_file());
        assert!(workspace_root().join("xtask").is_dir());
    }
}
