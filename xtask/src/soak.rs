//! `cargo xtask soak`: weir under load and faults (issue 6).
//!
//! Builds everything in release mode (as `cargo xtask bench` does), then
//! runs `weir-soak run`, which builds a node of network namespaces per
//! scenario with its own `weir run` agent, prints the figures and writes
//! `results.json` and `results.md` under `target/soak/`. The sizes default
//! to the (100 agent restarts, 10,000 churn cycles, 100,000
//! concurrent connections, 1.25 x the `PENDING_FLOWS` capacity of
//! handshakes in flight, 20 proxy restarts); the run stops starting new
//! work after `--time-limit-s`. The exit code is the driver's: non-zero
//! when a check failed.

use std::ffi::OsString;
use std::path::Path;
use std::process::ExitCode;

use anyhow::Result;

/// What `cargo xtask soak` was asked to do (its command line).
#[derive(Debug, Clone, Default, clap::Args)]
pub struct Options {
    /// The CI sizes (5 restarts, 200 churn cycles, 5,000 connections,
    /// PENDING_FLOWS of 1,024, 4 proxy restarts): under a minute.
    #[arg(long)]
    pub quick: bool,
    /// Agent SIGKILLs under traffic [default: 100].
    #[arg(long)]
    pub restarts: Option<usize>,
    /// Pods enrolled and removed [default: 10,000].
    #[arg(long)]
    pub churn: Option<usize>,
    /// Concurrent captured connections [default: 100,000].
    #[arg(long)]
    pub conns: Option<u64>,
    /// Handshakes in flight at once [default: 1.25 x the PENDING_FLOWS
    /// capacity].
    #[arg(long)]
    pub flood: Option<u64>,
    /// PENDING_FLOWS capacity, the agent's --max-pending [default: the
    /// agent's, 32 per pod, at least 4,096].
    #[arg(long)]
    pub max_pending: Option<u32>,
    /// Sidecar restarts under traffic [default: 20].
    #[arg(long)]
    pub proxy_restarts: Option<usize>,
    /// Only these scenarios (comma list): restarts, churn, conns,
    /// map-full, faults.
    #[arg(long, value_delimiter = ',')]
    pub only: Vec<String>,
    /// Start no new work after this many seconds [default: 1800].
    #[arg(long)]
    pub time_limit_s: Option<u64>,
    /// Further arguments for `weir-soak run` (see `weir-soak run --help`).
    #[arg(last = true, value_name = "ARGS")]
    pub args: Vec<OsString>,
}

/// The CI sizes, as `--quick` gives them.
const QUICK: [(&str, &str); 5] = [
    ("--restarts", "5"),
    ("--churn", "200"),
    ("--conns", "5000"),
    ("--max-pending", "1024"),
    ("--proxy-restarts", "4"),
];

/// The `weir-soak run` arguments for `options`, writing into `out`.
fn soak_args(options: &Options, out: &Path) -> Vec<OsString> {
    let mut given: Vec<(&str, Option<String>)> = vec![
        ("--restarts", options.restarts.map(|v| v.to_string())),
        ("--churn", options.churn.map(|v| v.to_string())),
        ("--conns", options.conns.map(|v| v.to_string())),
        ("--flood", options.flood.map(|v| v.to_string())),
        ("--max-pending", options.max_pending.map(|v| v.to_string())),
        (
            "--proxy-restarts",
            options.proxy_restarts.map(|v| v.to_string()),
        ),
        (
            "--time-limit-s",
            options.time_limit_s.map(|v| v.to_string()),
        ),
    ];
    if options.quick {
        for (flag, value) in QUICK {
            if let Some(entry) = given.iter_mut().find(|(f, v)| *f == flag && v.is_none()) {
                entry.1 = Some(value.to_string());
            }
        }
    }
    let flags = given
        .into_iter()
        .filter_map(|(flag, value)| value.map(|v| format!("{flag}={v}")));
    crate::release_tool_args(out, flags, &options.only, &options.args)
}

/// Builds (release) and runs the soak; returns its exit code.
pub fn run(root: &Path, options: &Options) -> Result<ExitCode> {
    crate::run_release_tool(
        root,
        "soak",
        "weir-soak",
        "it creates network namespaces and cgroups (its own only) and loads eBPF programs",
        |out| soak_args(options, out),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn full_size_passes_only_what_was_given() {
        let args = soak_args(&Options::default(), Path::new("/w/target/soak"));
        assert_eq!(args, ["run", "--out", "/w/target/soak"].map(OsString::from));
        let options = Options {
            restarts: Some(7),
            only: vec!["churn".into(), "faults".into()],
            args: vec!["--flood=100".into()],
            ..Options::default()
        };
        assert_eq!(
            soak_args(&options, Path::new("o")),
            [
                "run",
                "--out",
                "o",
                "--restarts=7",
                "--only=churn,faults",
                "--flood=100"
            ]
            .map(OsString::from)
        );
    }

    #[test]
    fn quick_gives_the_ci_sizes_unless_overridden() {
        let options = Options {
            quick: true,
            conns: Some(20_000),
            ..Options::default()
        };
        let args = soak_args(&options, Path::new("o"));
        let args: Vec<String> = args
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        assert!(args.contains(&"--restarts=5".to_string()), "{args:?}");
        assert!(args.contains(&"--conns=20000".to_string()), "{args:?}");
        assert!(args.contains(&"--max-pending=1024".to_string()), "{args:?}");
        assert!(!args.iter().any(|a| a == "--conns=5000"), "{args:?}");
    }
}
