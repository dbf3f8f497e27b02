//! `cargo xtask bench`: the benchmark of direct vs iptables vs weir (and
//! weir with its fast path).
//!
//! Builds everything in release mode (setup, the kernel object, then the
//! agent and the test tools, exactly as `cargo xtask build` does: only
//! release builds are measured), then runs `weir-bench run`, which builds
//! the node of network namespaces four ways, runs the workloads, and
//! writes `results.md`, `results.json` and `latency.svg` under
//! `target/bench/`. A missed target is reported, not an error: the exit
//! code is the benchmark's own (non-zero only when it could not run).

use std::ffi::OsString;
use std::path::Path;
use std::process::ExitCode;

use anyhow::Result;

/// What `cargo xtask bench` was asked to do (its command line).
#[derive(Debug, Clone, Default, clap::Args)]
pub struct Options {
    /// Fewer repetitions and less work per run (about a minute).
    #[arg(long)]
    pub quick: bool,
    /// Repetitions of each workload [default: 9, --quick 3].
    #[arg(long)]
    pub reps: Option<usize>,
    /// Only these workloads (comma list): crr, crr-upstream,
    /// rr-sidecar, rr-full, bulk, scale, enroll.
    #[arg(long, value_delimiter = ',')]
    pub only: Vec<String>,
    /// Further arguments for `weir-bench run` (see `weir-bench run --help`).
    #[arg(last = true, value_name = "ARGS")]
    pub args: Vec<OsString>,
}

/// The `weir-bench run` arguments for `options`, writing into `out`.
fn bench_args(options: &Options, out: &Path) -> Vec<OsString> {
    let mut flags = Vec::new();
    if options.quick {
        flags.push("--quick".to_string());
    }
    if let Some(reps) = options.reps {
        flags.push(format!("--reps={reps}"));
    }
    crate::release_tool_args(out, flags, &options.only, &options.args)
}

/// Builds (release) and runs the benchmark; returns its exit code.
pub fn run(root: &Path, options: &Options) -> Result<ExitCode> {
    crate::run_release_tool(
        root,
        "bench",
        "weir-bench",
        "it creates network namespaces, cgroups and iptables rules (inside its own namespaces only) and loads eBPF programs",
        |out| bench_args(options, out),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passes_options_on() {
        let options = Options {
            quick: true,
            reps: Some(7),
            only: vec!["crr".into(), "enroll".into()],
            args: vec!["--crr-threads=1".into()],
        };
        let args = bench_args(&options, Path::new("/w/target/bench"));
        assert_eq!(
            args,
            [
                "run",
                "--out",
                "/w/target/bench",
                "--quick",
                "--reps=7",
                "--only=crr,enroll",
                "--crr-threads=1"
            ]
            .map(OsString::from)
        );
        assert_eq!(
            bench_args(&Options::default(), Path::new("o")),
            ["run", "--out", "o"].map(OsString::from)
        );
    }
}
