//! `cargo xtask test`: the whole CI suite, one announced and timed step at a
//! time, ending with a table of what ran and how long it took.
//!
//! The kernel tests run with `WEIR_REQUIRE_KERNEL_TESTS=1`, so on a machine
//! where they cannot run (no root, no BPF) they fail instead of quietly
//! skipping: CI must never pass without having loaded the programs.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use crate::build::{self, EBPF_OBJECT_ENV};
use crate::cmd::Cmd;
use crate::host;
use crate::image;
use crate::toolchain::{self, Toolchain};

/// What `cargo xtask test` was asked to do.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// Only setup, build-ebpf and the kernel tests.
    pub kernel_only: bool,
    /// Everything but the kernel tests (for machines without BPF rights).
    pub unit_only: bool,
    /// Linux series whose kernel-feature tests run in a VM after the
    /// host's kernel tests (`kernel-matrix` step); empty for none.
    pub kernels: Vec<String>,
    /// Passed to the test binaries after `--` (e.g. a test name filter).
    pub test_args: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    Setup,
    Fmt,
    BuildEbpf,
    Clippy,
    UnitTests,
    Manifests,
    BuildAgent,
    Images,
    KernelTests,
    PeerZtunnel,
    KernelMatrix,
}

impl Step {
    /// In the order they run: each step relies on the ones before it.
    const ALL: [Step; 11] = [
        Step::Setup,
        Step::Fmt,
        Step::BuildEbpf,
        Step::Clippy,
        Step::UnitTests,
        Step::Manifests,
        Step::BuildAgent,
        Step::Images,
        Step::KernelTests,
        Step::PeerZtunnel,
        Step::KernelMatrix,
    ];

    fn name(self) -> &'static str {
        match self {
            Step::Setup => "setup",
            Step::Fmt => "fmt",
            Step::BuildEbpf => "build-ebpf",
            Step::Clippy => "clippy",
            Step::UnitTests => "unit-tests",
            Step::Manifests => "manifests",
            Step::BuildAgent => "build-agent",
            Step::Images => "images",
            Step::KernelTests => "kernel-tests",
            Step::PeerZtunnel => "peer-ztunnel",
            Step::KernelMatrix => "kernel-matrix",
        }
    }

    /// Why `options` leave this step out, if they do.
    fn skipped_by(self, options: &Options) -> Option<&'static str> {
        match self {
            Step::Fmt | Step::Clippy | Step::UnitTests | Step::Manifests if options.kernel_only => {
                Some("--kernel-only")
            }
            Step::BuildAgent
            | Step::Images
            | Step::KernelTests
            | Step::PeerZtunnel
            | Step::KernelMatrix
                if options.unit_only =>
            {
                Some("--unit-only")
            }
            Step::KernelMatrix if options.kernels.is_empty() => Some("--kernel none"),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, Copy)]
enum Outcome {
    Passed(Duration),
    Failed(Duration),
    Skipped(&'static str),
    NotRun,
}

/// Runs the suite; the error names the step that failed.
pub fn run(root: &Path, options: &Options) -> Result<()> {
    let plan: Vec<Step> = Step::ALL
        .into_iter()
        .filter(|step| step.skipped_by(options).is_none())
        .collect();
    let mut outcomes: Vec<(Step, Outcome)> = Step::ALL
        .into_iter()
        .map(|step| {
            (
                step,
                step.skipped_by(options)
                    .map_or(Outcome::NotRun, Outcome::Skipped),
            )
        })
        .collect();
    let mut suite = Suite {
        root,
        options,
        toolchain: None,
        object: None,
    };
    let started = Instant::now();

    for (index, &step) in plan.iter().enumerate() {
        println!(
            "\n==> weir test [{}/{}] {}",
            index + 1,
            plan.len(),
            step.name()
        );
        let step_started = Instant::now();
        let result = suite.run_step(step);
        let elapsed = step_started.elapsed();
        let outcome = match result {
            Ok(()) => Outcome::Passed(elapsed),
            Err(_) => Outcome::Failed(elapsed),
        };
        if let Some(entry) = outcomes.iter_mut().find(|(s, _)| *s == step) {
            entry.1 = outcome;
        }
        if let Err(err) = result {
            print_summary(&outcomes, started.elapsed());
            return Err(err.context(format!("weir test: step `{}` failed", step.name())));
        }
        println!("==> {} ok ({})", step.name(), seconds(elapsed));
    }

    print_summary(&outcomes, started.elapsed());
    println!("weir test: all steps passed");
    Ok(())
}

/// What earlier steps produced for later ones.
struct Suite<'a> {
    root: &'a Path,
    options: &'a Options,
    toolchain: Option<Toolchain>,
    object: Option<PathBuf>,
}

impl Suite<'_> {
    fn run_step(&mut self, step: Step) -> Result<()> {
        match step {
            Step::Setup => {
                self.toolchain = Some(toolchain::setup()?);
                Ok(())
            }
            Step::Fmt => fmt_check(self.root),
            Step::BuildEbpf => {
                let toolchain = self.toolchain.as_ref().context("setup did not run")?;
                self.object = Some(build::build_ebpf(self.root, toolchain)?);
                Ok(())
            }
            Step::Clippy => clippy(self.root, self.object()?),
            Step::UnitTests => self.unit_tests(),
            Step::Manifests => manifests(self.root),
            Step::BuildAgent => self.build_agent(),
            Step::Images => self.images(),
            Step::KernelTests => self.kernel_tests(),
            // ztunnel's namespaced suite with weir's ambient capture (~20 s
            // once ztunnel is built; the first run on a machine builds it,
            // ~8 min, cached outside the checkout).
            Step::PeerZtunnel => {
                let weir = build::host_target_dir(self.root).join("release/weir");
                crate::ztunnel::run(self.root, &weir, &[])
            }
            Step::KernelMatrix => self.kernel_matrix(),
        }
    }

    fn object(&self) -> Result<&Path> {
        self.object.as_deref().context("build-ebpf did not run")
    }

    fn unit_tests(&self) -> Result<()> {
        // weir-tests holds the kernel tests; they run in their own step, one
        // at a time and as root.
        Cmd::new(host::cargo())
            .args([
                "test",
                "--workspace",
                "--exclude",
                "weir-ebpf",
                "--exclude",
                "weir-tests",
            ])
            .args(harness_args(&self.options.test_args))
            .env(EBPF_OBJECT_ENV, self.object()?)
            .dir(self.root)
            .run()
    }

    /// The kernel tests start the `weir` binary, so it is built first (and
    /// the test tools, which the real-runtime test's images hold).
    fn build_agent(&self) -> Result<()> {
        Cmd::new(host::cargo())
            .args(["build", "--release", "--package", "weir-agent"])
            .args(["--package", "weir-tests", "--bins"])
            .env(EBPF_OBJECT_ENV, self.object()?)
            .dir(self.root)
            .run()
    }

    /// weir's image (`cargo xtask image`) and the real-runtime test's
    /// images, which `tests/tests/cri_node.rs` imports into containerd.
    fn images(&self) -> Result<()> {
        let bin_dir = build::host_target_dir(self.root).join("release");
        let archive = image::default_archive(self.root);
        let written = image::weir_image(self.root, &bin_dir, &archive)?;
        println!(
            "weir test: image {} {} -> {}",
            image::weir_image_name(),
            written.manifest_digest,
            archive.display()
        );
        image::test_images(self.root, &bin_dir, &image::test_images_dir(self.root))
    }

    fn kernel_tests(&self) -> Result<()> {
        if !host::is_root() {
            println!(
                "weir test: warning: not root; the kernel tests need root (or CAP_BPF, \
                 CAP_NET_ADMIN, CAP_SYS_ADMIN) and will fail"
            );
        }
        let weir = build::host_target_dir(self.root)
            .join("release")
            .join("weir");
        // The real ztunnel for tests/tests/zds.rs (built once per
        // machine). Without it those tests fail (they may not skip here),
        // and the others still run.
        let ztunnel = match crate::ztunnel::ensure_ztunnel_binary(self.root) {
            Ok(bin) => bin,
            Err(e) => {
                println!("weir test: warning: no ztunnel binary, the ZDS tests will fail: {e:#}");
                PathBuf::new()
            }
        };
        // One test at a time: the tests attach programs to cgroups and
        // network namespaces, and pinned maps are shared kernel state.
        Cmd::new(host::cargo())
            .args(["test", "--release", "--package", "weir-tests"])
            .args(["--", "--test-threads=1"])
            .args(&self.options.test_args)
            .env(EBPF_OBJECT_ENV, self.object()?)
            .env("WEIR_BIN", weir)
            .env(crate::ztunnel::BIN_ENV, ztunnel)
            .env("WEIR_REQUIRE_KERNEL_TESTS", "1")
            .env("WEIR_IMAGE", image::default_archive(self.root))
            .env("WEIR_TEST_IMAGES", image::test_images_dir(self.root))
            .dir(self.root)
            .run()
    }
}

impl Suite<'_> {
    /// The kernel-feature tests on each older kernel, in a VM, one kernel
    /// after the other (TCG needs both CPUs).
    fn kernel_matrix(&self) -> Result<()> {
        for version in &self.options.kernels {
            let options = crate::kernel::Options {
                version: version.clone(),
                tests: crate::kernel::Options::test_files(&[]),
                test_args: self.options.test_args.clone(),
                timeout: Duration::from_secs(45 * 60),
            };
            crate::kernel::run(self.root, self.object()?, &options)
                .with_context(|| format!("kernel tests on Linux {version}"))?;
        }
        Ok(())
    }
}

/// `-- <args>` for the test harness, or nothing when there are none.
fn harness_args(test_args: &[String]) -> Vec<&str> {
    if test_args.is_empty() {
        return Vec::new();
    }
    std::iter::once("--")
        .chain(test_args.iter().map(String::as_str))
        .collect()
}

/// Validates the Kubernetes manifests (and their kustomize renderings)
/// against the API schemas, offline: `deploy/validate.sh`.
fn manifests(root: &Path) -> Result<()> {
    Cmd::new("bash")
        .arg(root.join("deploy/validate.sh"))
        .dir(root)
        .run()
        .context("the Kubernetes manifests in deploy/ do not validate")
}

/// Fails when any file is not formatted as `cargo fmt` would.
fn fmt_check(root: &Path) -> Result<()> {
    Cmd::new(host::cargo())
        .args(["fmt", "--all", "--", "--check"])
        .dir(root)
        .run()
        .context("files are not formatted; run `cargo xtask fmt`")
}

/// Formats the whole workspace.
pub fn fmt(root: &Path) -> Result<()> {
    Cmd::new(host::cargo())
        .args(["fmt", "--all"])
        .dir(root)
        .run()
}

/// Clippy on every host crate with warnings as errors. weir-ebpf is left out:
/// it only compiles for the BPF target, with the eBPF toolchain.
pub fn clippy(root: &Path, object: &Path) -> Result<()> {
    Cmd::new(host::cargo())
        .args([
            "clippy",
            "--workspace",
            "--exclude",
            "weir-ebpf",
            "--all-targets",
        ])
        .args(["--", "-D", "warnings"])
        .env(EBPF_OBJECT_ENV, object)
        .dir(root)
        .run()
}

fn print_summary(outcomes: &[(Step, Outcome)], total: Duration) {
    println!("\nweir test summary");
    println!("  {:<14} {:<8} {:>8}", "step", "result", "time");
    for (step, outcome) in outcomes {
        let (result, time) = match outcome {
            Outcome::Passed(d) => ("ok".to_owned(), seconds(*d)),
            Outcome::Failed(d) => ("FAILED".to_owned(), seconds(*d)),
            Outcome::Skipped(reason) => (format!("skipped ({reason})"), String::new()),
            Outcome::NotRun => ("not run".to_owned(), String::new()),
        };
        if time.is_empty() {
            println!("  {:<14} {result}", step.name());
        } else {
            println!("  {:<14} {result:<8} {time:>8}", step.name());
        }
    }
    println!("  {:<14} {:<8} {:>8}", "total", "", seconds(total));
}

fn seconds(duration: Duration) -> String {
    format!("{:.1}s", duration.as_secs_f64())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn planned(options: &Options) -> Vec<&'static str> {
        Step::ALL
            .into_iter()
            .filter(|s| s.skipped_by(options).is_none())
            .map(Step::name)
            .collect()
    }

    #[test]
    fn full_suite_runs_every_step() {
        let options = Options {
            kernels: vec!["6.1".into()],
            ..Options::default()
        };
        assert_eq!(planned(&options).len(), Step::ALL.len());
        // `--kernel none`: no VM.
        assert!(!planned(&Options::default()).contains(&"kernel-matrix"));
    }

    #[test]
    fn kernel_only_keeps_the_builds_and_kernel_tests() {
        let options = Options {
            kernel_only: true,
            kernels: vec!["6.1".into()],
            ..Options::default()
        };
        assert_eq!(
            planned(&options),
            [
                "setup",
                "build-ebpf",
                "build-agent",
                "images",
                "kernel-tests",
                "peer-ztunnel",
                "kernel-matrix"
            ]
        );
    }

    #[test]
    fn unit_only_drops_the_kernel_steps() {
        let options = Options {
            unit_only: true,
            ..Options::default()
        };
        assert_eq!(
            planned(&options),
            [
                "setup",
                "fmt",
                "build-ebpf",
                "clippy",
                "unit-tests",
                "manifests"
            ]
        );
    }
}
