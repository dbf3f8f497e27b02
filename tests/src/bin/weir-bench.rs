//! `weir-bench`: the benchmark of issue 8, run by `cargo xtask bench`.
//!
//! One run builds the same small node of network namespaces four ways and
//! drives the same workloads through each:
//!
//! - **direct**: the application dials its sidecar's port itself (no
//!   interception: the limit);
//! - **iptables**: the `nat` rules `istio-iptables` writes for Istio's
//!   defaults (REDIRECT mode), in each pod's network namespace;
//! - **weir**: the same pods enrolled in a `weir run` agent;
//! - **weir + fast path**: the same with `weir run --fast-path` (local
//!   connections go socket to socket); latency, bulk and connection-rate
//!   workloads only.
//!
//! Subcommands:
//!
//! - `run` (what xtask calls): builds the node, runs every workload, writes
//!   `results.md`, `results.json` and `latency.svg`, prints the table;
//! - `sidecar`: a lean transparent proxy in the role of Envoy (a thread pool
//!   per listener, blocking sockets, preallocated buffers); it answers
//!   requests itself or relays them to the original destination;
//! - `server`: the application server (answers requests, sinks bulk data);
//! - `load`: the load generator (`crr`, `rr`, `bulk`), one JSON line out.
//!
//! The pod processes drop privileges themselves (`--uid`), as the testkit
//! does: the binary may live where other users cannot exec it from.

#![warn(missing_docs)]

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use nix::unistd::{Gid, Uid, setgid, setgroups, setuid};

#[path = "bench/bpfstats.rs"]
mod bpfstats;
#[path = "bench/cpu.rs"]
mod cpu;
#[path = "bench/enroll.rs"]
mod enroll;
#[path = "bench/load.rs"]
mod load;
#[path = "bench/machine.rs"]
mod machine;
#[path = "bench/memory.rs"]
mod memory;
#[path = "bench/node.rs"]
mod node;
#[path = "bench/plot.rs"]
mod plot;
#[path = "bench/proto.rs"]
mod proto;
#[path = "bench/report.rs"]
mod report;
#[path = "bench/run.rs"]
mod run;
#[path = "bench/sidecar.rs"]
mod sidecar;
#[path = "bench/stats.rs"]
mod stats;

#[derive(Parser, Debug)]
#[command(
    name = "weir-bench",
    about = "weir's benchmark: direct vs iptables vs weir (and its fast path), in network namespaces"
)]
struct Cli {
    /// Switch to this user (and group) id right after starting.
    #[arg(long, global = true, display_order = 100)]
    uid: Option<u32>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Build the node four ways, run every workload, write the report.
    Run(run::RunArgs),
    /// Benchmark sidecar: answers or relays captured connections.
    Sidecar(sidecar::SidecarArgs),
    /// Application server: answers requests, sinks bulk transfers.
    Server(sidecar::ServerArgs),
    /// Load generator: prints one JSON line with the measurements.
    Load(LoadCommand),
}

#[derive(Args, Debug)]
struct LoadCommand {
    /// Run on this CPU only (and so do the threads).
    #[arg(long)]
    cpu: Option<usize>,
    /// Run at this nice value (-20..19; set before dropping privileges).
    #[arg(long, allow_hyphen_values = true)]
    nice: Option<i32>,
    #[command(subcommand)]
    kind: load::LoadKind,
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    // CPU and priority first: raising the priority needs the privileges
    // the --uid switch gives up. Threads spawned later inherit both.
    if let Command::Load(args) = &cli.command {
        let me = nix::unistd::Pid::from_raw(0);
        if let Some(cpu) = args.cpu {
            pin_to(me, Some(cpu))?;
        }
        if let Some(nice) = args.nice {
            set_nice(me, nice)?;
        }
    }
    if let Some(uid) = cli.uid {
        drop_privileges(uid)?;
    }
    match cli.command {
        Command::Run(args) => run::run(args),
        Command::Sidecar(args) => sidecar::run_sidecar(args),
        Command::Server(args) => sidecar::run_server(args),
        Command::Load(args) => load::run(args.kind),
    }
}

/// Sets the nice value of thread `tid` (0: the calling thread; on Linux
/// `PRIO_PROCESS` with a thread id applies to that thread only).
pub fn set_nice(tid: nix::unistd::Pid, nice: i32) -> Result<()> {
    // SAFETY: setpriority only reads its integer arguments.
    let rc = unsafe { libc::setpriority(libc::PRIO_PROCESS, tid.as_raw() as libc::id_t, nice) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("setpriority({tid}, {nice})"));
    }
    Ok(())
}

/// Restricts thread `tid` (0: the calling thread) to `cpu`, or lets it run
/// on every CPU again (`None`).
pub fn pin_to(tid: nix::unistd::Pid, cpu: Option<usize>) -> Result<()> {
    use nix::sched::{CpuSet, sched_setaffinity};
    let mut set = CpuSet::new();
    match cpu {
        Some(c) => set.set(c)?,
        None => {
            let n = std::thread::available_parallelism().map_or(1, |n| n.get());
            for c in 0..n.min(CpuSet::count()) {
                set.set(c)?;
            }
        }
    }
    sched_setaffinity(tid, &set).with_context(|| format!("sched_setaffinity({tid}, {cpu:?})"))
}

/// setgroups + setgid + setuid to `uid` (group `uid`), in that order.
fn drop_privileges(uid: u32) -> Result<()> {
    let gid = Gid::from_raw(uid);
    setgroups(&[gid]).with_context(|| format!("setgroups([{uid}])"))?;
    setgid(gid).with_context(|| format!("setgid({uid})"))?;
    setuid(Uid::from_raw(uid)).with_context(|| format!("setuid({uid})"))?;
    Ok(())
}
