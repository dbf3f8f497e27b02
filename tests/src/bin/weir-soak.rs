//! `weir-soak`: weir under load and faults (issue 6), run by `cargo xtask
//! soak` at full size and by `tests/tests/soak.rs` at CI size.
//!
//! `weir-soak run` builds a node of network namespaces per scenario, with a
//! `weir run` agent, and checks what must hold whatever happens:
//!
//! 1. `restarts`: the agent SIGKILLed and restarted N times while pods
//!    connect continuously, out and in: no connection escapes capture or
//!    fails;
//! 2. `churn`: N pods enrolled and removed (netns deleted while enrolled,
//!    pods re-created, addresses reused): every map, pin and link returns
//!    to where it was;
//! 3. `conns`: N captured connections open at once, each answered with its
//!    own original destination; `map-full`: more handshakes in flight than
//!    `PENDING_FLOWS` holds;
//! 4. `faults`: proxies and applications restarting, a proxy listening
//!    late, a pod IP change.
//!
//! It prints the figures, writes `results.json` and `results.md`, and exits
//! non-zero when a check fails. The other subcommands are the processes the
//! scenarios run inside the pods (they drop privileges with `--uid`, after
//! raising their file limit with `--nofile`).

#![warn(missing_docs)]

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use nix::unistd::{Gid, Uid, setgid, setgroups, setuid};

#[path = "soak/bpf.rs"]
mod bpf;
#[path = "soak/churn.rs"]
mod churn;
#[path = "soak/clients.rs"]
mod clients;
#[path = "soak/common.rs"]
mod common;
#[path = "soak/conns.rs"]
mod conns;
#[path = "soak/faults.rs"]
mod faults;
#[path = "soak/node.rs"]
mod node;
#[path = "soak/procs.rs"]
mod procs;
#[path = "soak/proto.rs"]
mod proto;
#[path = "soak/report.rs"]
mod report;
#[path = "soak/restarts.rs"]
mod restarts;
#[path = "soak/run.rs"]
mod run;

#[derive(Parser, Debug)]
#[command(name = "weir-soak", about = "weir under load and faults (issue 6)")]
struct Cli {
    /// Raise RLIMIT_NOFILE to this many descriptors first (as root).
    #[arg(long, global = true, display_order = 100)]
    nofile: Option<u64>,
    /// Then switch to this user (and group) id.
    #[arg(long, global = true, display_order = 100)]
    uid: Option<u32>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the scenarios and write the report (needs root).
    Run(run::RunArgs),
    /// Sidecar: answers every captured connection with its SO_ORIGINAL_DST.
    Sidecar(procs::SidecarArgs),
    /// Server at an original destination: answers `direct`.
    Direct(procs::DirectArgs),
    /// Listens on ports and never accepts (churned pods' proxies).
    Listen(procs::ListenArgs),
    /// Application: connects continuously and judges every answer.
    Load(procs::LoadArgs),
    /// Application: opens N connections, checks them, holds them open.
    Hold(clients::HoldArgs),
    /// Application: starts N handshakes at once, then judges the answers.
    Flood(clients::FloodArgs),
}

fn main() -> std::process::ExitCode {
    match real_main() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // By hand rather than with `{:?}`: anyhow's Debug adds a
            // backtrace whenever RUST_BACKTRACE is set.
            eprintln!("weir-soak: error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn real_main() -> Result<()> {
    let cli = Cli::parse();
    if let Some(n) = cli.nofile {
        proto::raise_nofile(n)?;
    }
    if let Some(uid) = cli.uid {
        drop_privileges(uid)?;
    }
    match cli.command {
        Command::Run(args) => run::run(args),
        Command::Sidecar(args) => procs::sidecar(args),
        Command::Direct(args) => procs::direct(args),
        Command::Listen(args) => procs::listen(args),
        Command::Load(args) => {
            proto::catch_signals()?;
            procs::load(args)
        }
        Command::Hold(args) => {
            proto::catch_signals()?;
            clients::hold(args)
        }
        Command::Flood(args) => {
            proto::catch_signals()?;
            clients::flood(args)
        }
    }
}

/// setgroups + setgid + setuid to `uid` (group `uid`), in that order.
fn drop_privileges(uid: u32) -> Result<()> {
    let gid = Gid::from_raw(uid);
    setgroups(&[gid]).with_context(|| format!("setgroups([{uid}])"))?;
    setgid(gid).with_context(|| format!("setgid({uid})"))?;
    setuid(Uid::from_raw(uid)).with_context(|| format!("setuid({uid})"))?;
    Ok(())
}
