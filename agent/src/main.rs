//! `weir`: the node agent that replaces a service mesh's per-pod iptables
//! capture rules with eBPF programs.

mod datapath;
mod metrics;
mod netlink;
mod podsfile;
mod policy;
mod reconcile;
mod status;
mod sys;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use log::{error, info, warn};

use crate::datapath::{Capacities, Datapath};
use crate::reconcile::Reconciler;

/// weir: transparent sidecar capture (Istio, Linkerd, Kuma) with eBPF
/// instead of iptables.
#[derive(Parser, Debug)]
#[command(version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Load the programs and keep the pods of this node captured.
    Run(RunArgs),
    /// Show attached programs and enrolled pods (reads the pinned maps).
    Status(StatusArgs),
    /// Remove every program, link and pin weir made.
    Uninstall(BpffsArg),
}

#[derive(clap::Args, Debug, Clone)]
struct BpffsArg {
    /// bpffs mount where weir keeps its pins (under `weir/`).
    #[arg(long, env = "WEIR_BPFFS", default_value = "/sys/fs/bpf")]
    bpffs: PathBuf,
}

#[derive(clap::Args, Debug)]
struct RunArgs {
    /// YAML file listing the pods of this node (local mode).
    #[arg(long, env = "WEIR_PODS_FILE")]
    pods_file: PathBuf,
    /// cgroup v2 directory the socket programs attach to [default: the
    /// cgroup v2 root found in /proc/self/mounts].
    #[arg(long, env = "WEIR_CGROUP")]
    cgroup: Option<PathBuf>,
    #[command(flatten)]
    bpffs: BpffsArg,
    /// Address of the /metrics, /healthz and /readyz endpoints ("off" to
    /// disable).
    #[arg(long, env = "WEIR_METRICS_ADDR", default_value = "127.0.0.1:9464")]
    metrics_addr: String,
    /// How often the pods file is checked for changes, in milliseconds.
    #[arg(long, env = "WEIR_RELOAD_MS", default_value_t = 500, value_parser = clap::value_parser!(u64).range(10..=60_000))]
    reload_ms: u64,
    /// How often every pod's network namespace is re-checked, in seconds.
    #[arg(long, env = "WEIR_RESYNC_SECS", default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=3600))]
    resync_secs: u64,
    /// Capacity of the per-pod maps (pods per node).
    #[arg(long, env = "WEIR_MAX_PODS", default_value_t = 16384, value_parser = clap::value_parser!(u32).range(1..=1_048_576))]
    max_pods: u32,
    /// Capacity of the port-rule map (entries over all pods).
    #[arg(long, env = "WEIR_MAX_PORT_RULES", default_value_t = 262_144, value_parser = clap::value_parser!(u32).range(1..=16_777_216))]
    max_port_rules: u32,
    /// Capacity of each CIDR map (entries over all pods).
    #[arg(long, env = "WEIR_MAX_CIDRS", default_value_t = 262_144, value_parser = clap::value_parser!(u32).range(1..=16_777_216))]
    max_cidrs: u32,
    /// Capacity of the map of connections between connect() and accept().
    #[arg(long, env = "WEIR_MAX_PENDING", default_value_t = 65536, value_parser = clap::value_parser!(u32).range(1024..=16_777_216))]
    max_pending: u32,
}

#[derive(clap::Args, Debug)]
struct StatusArgs {
    #[command(flatten)]
    bpffs: BpffsArg,
    /// Output format.
    #[arg(short, long, value_enum, default_value = "text")]
    output: status::Format,
}

fn main() {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let cli = Cli::parse();
    let res = match cli.command {
        Command::Run(a) => run(a),
        Command::Status(a) => status::print(&a.bpffs.bpffs, a.output),
        Command::Uninstall(a) => uninstall(&a),
    };
    if let Err(e) = res {
        error!("{e:#}");
        std::process::exit(1);
    }
}

fn uninstall(a: &BpffsArg) -> Result<()> {
    let removed = datapath::uninstall(&a.bpffs)?;
    if removed.is_empty() {
        println!("nothing to remove under {}", a.bpffs.join("weir").display());
    }
    for p in removed {
        println!("removed {}", p.display());
    }
    Ok(())
}

fn run(a: RunArgs) -> Result<()> {
    if !nix::unistd::geteuid().is_root() {
        warn!(
            "not running as root: loading BPF programs needs CAP_BPF, CAP_NET_ADMIN and CAP_SYS_ADMIN"
        );
    }
    let metrics_addr: Option<SocketAddr> = match a.metrics_addr.as_str() {
        "off" | "" => None,
        s => Some(s.parse().with_context(|| {
            format!(
                "--metrics-addr {s:?}: not an address; use IP:PORT like 0.0.0.0:9464, or \"off\""
            )
        })?),
    };
    let cgroup = match &a.cgroup {
        Some(c) => c.clone(),
        None => sys::cgroup2_mount()?,
    };
    let caps = Capacities {
        pods: a.max_pods,
        pending_flows: a.max_pending,
        port_rules: a.max_port_rules,
        cidrs: a.max_cidrs,
    };
    let dp = Datapath::load(&a.bpffs.bpffs, &cgroup, &caps)?;
    info!(
        "programs attached to cgroup {} (pins under {})",
        cgroup.display(),
        a.bpffs.bpffs.join("weir").display()
    );
    let rec = Arc::new(Mutex::new(Reconciler::new(dp)));
    let ready = Arc::new(AtomicBool::new(false));

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async move {
        if let Some(addr) = metrics_addr {
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("--metrics-addr {addr}: cannot listen"))?;
            info!("serving /metrics, /healthz, /readyz on {addr}");
            tokio::spawn(metrics::serve(listener, rec.clone(), ready.clone()));
        }
        watch_pods_file(&a, rec, ready).await
    })
}

/// Applies the pods file now, whenever its content changes, and every
/// resync interval; returns on SIGTERM or SIGINT.
async fn watch_pods_file(
    a: &RunArgs,
    rec: Arc<Mutex<Reconciler>>,
    ready: Arc<AtomicBool>,
) -> Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut tick = tokio::time::interval(Duration::from_millis(a.reload_ms));
    let resync = Duration::from_secs(a.resync_secs);
    let mut last: Option<String> = None;
    let mut last_apply = tokio::time::Instant::now();
    loop {
        tokio::select! {
            _ = term.recv() => { info!("SIGTERM: stopping (capture stays in place)"); break; }
            _ = int.recv() => { info!("SIGINT: stopping (capture stays in place)"); break; }
            _ = tick.tick() => {}
        }
        let text = match tokio::fs::read_to_string(&a.pods_file).await {
            Ok(t) => t,
            Err(e) => {
                if last.is_some() || !ready.load(Ordering::Relaxed) {
                    warn!(
                        "pods file {}: cannot read it ({e}); keeping the current pods",
                        a.pods_file.display()
                    );
                }
                last = None;
                continue;
            }
        };
        let changed = last.as_deref() != Some(text.as_str());
        if !changed && last_apply.elapsed() < resync {
            continue;
        }
        let parsed = match podsfile::parse(&a.pods_file, &text) {
            Ok(p) => p,
            Err(e) => {
                if changed {
                    error!("{e}; keeping the current pods");
                }
                last = Some(text);
                continue;
            }
        };
        if changed {
            for e in &parsed.errors {
                error!("{e}");
            }
        }
        let rec = rec.clone();
        let started = std::time::Instant::now();
        tokio::task::spawn_blocking(move || {
            let mut r = rec.lock().unwrap_or_else(|p| p.into_inner());
            r.apply(&parsed.pods, &parsed.invalid);
            r.dp.set_ready(true);
        })
        .await?;
        if changed {
            info!("pods file applied in {} ms", started.elapsed().as_millis());
        }
        ready.store(true, Ordering::Relaxed);
        last = Some(text);
        last_apply = tokio::time::Instant::now();
    }
    Ok(())
}
