//! `weir`: the node agent that replaces a service mesh's per-pod iptables
//! capture rules with eBPF programs.

mod adopt;
mod ambient;
mod caps;
mod cni;
mod datapath;
#[cfg(test)]
mod datapath_tests;
mod explain;
#[cfg(test)]
mod fuzz_tests;
mod k8s;
mod logging;
mod metrics;
mod netlink;
mod pod;
mod pod_tables;
mod podsfile;
mod policy;
mod reasons;
mod reconcile;
mod routes;
#[cfg(test)]
mod rules_model_tests;
mod status;
mod sys;
#[cfg(test)]
mod testutil;
mod version;
mod zds;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
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
#[command(version = version::LONG, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    #[command(flatten)]
    log: logging::LogArgs,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Load the programs and keep the pods of this node captured.
    Run(Box<RunArgs>),
    /// Show attached programs and enrolled pods (reads the pinned maps).
    Status(StatusArgs),
    /// Explain what weir does with one connection of a pod and which rule
    /// decides it (reads the pinned maps; runs the kernel's decision code).
    Explain(ExplainArgs),
    /// Remove every program, link and pin weir made.
    Uninstall(BpffsArg),
    /// Change the kernel log level of a running weir (no restart).
    LogLevel(LogLevelArgs),
    /// Put the weir-cni plugin into the node's CNI configuration, or take
    /// it out.
    Cni(cni::CniCommand),
    /// Capture this process's own network namespace for Istio ambient
    /// mode (ztunnel), through a running agent's CNI socket (hosts
    /// without Kubernetes, ztunnel's namespaced test suite).
    InpodEnroll(ambient::inpod::InpodArgs),
    /// Serve ztunnel's ZDS socket from a workloads file, without loading
    /// any kernel program (for tests, and for trying ztunnel by hand; `weir
    /// run --zds-socket` serves the node's ambient pods).
    ZdsServe(ZdsServeArgs),
}

#[derive(clap::Args, Debug)]
struct ZdsServeArgs {
    /// The unix socket ztunnel connects to (its INPOD_UDS).
    #[arg(long, env = "WEIR_ZDS_SOCKET", default_value = DEFAULT_ZDS_SOCKET)]
    socket: PathBuf,
    /// YAML file of the workloads to hand over (see `weir zds-serve` in
    /// docs/ambient.md); re-read when it changes.
    #[arg(long, env = "WEIR_ZDS_WORKLOADS")]
    workloads: PathBuf,
    /// How often the workloads file is checked for changes, in
    /// milliseconds.
    #[arg(long, default_value_t = 500, value_parser = clap::value_parser!(u64).range(10..=60_000))]
    reload_ms: u64,
}

/// Where ztunnel looks for its node agent by default (ztunnel's INPOD_UDS).
const DEFAULT_ZDS_SOCKET: &str = "/var/run/ztunnel/ztunnel.sock";

#[derive(clap::Args, Debug, Clone)]
struct BpffsArg {
    /// bpffs mount where weir keeps its pins (under `weir/`).
    #[arg(long, env = "WEIR_BPFFS", default_value = "/sys/fs/bpf")]
    bpffs: PathBuf,
}

#[derive(clap::Args, Debug)]
struct RunArgs {
    /// YAML file listing the pods of this node (local mode).
    #[arg(
        long,
        env = "WEIR_PODS_FILE",
        required_unless_present = "kubernetes",
        conflicts_with = "kubernetes"
    )]
    pods_file: Option<PathBuf>,
    // Kubernetes pod source (`--kubernetes`, `--node-name`, …): k8s/mod.rs.
    #[command(flatten)]
    kube: k8s::KubeArgs,
    // The weir-cni plugin's socket and installation: cni/mod.rs.
    #[command(flatten)]
    cni: cni::CniArgs,
    /// cgroup v2 directory the socket programs attach to [default: the
    /// cgroup v2 root found in /proc/self/mounts].
    #[arg(long, env = "WEIR_CGROUP")]
    cgroup: Option<PathBuf>,
    #[command(flatten)]
    bpffs: BpffsArg,
    /// Serve ztunnel's ZDS socket at this path (Istio ambient mode: weir
    /// hands the node's ambient pods and their network namespaces to
    /// ztunnel, as istio-cni's node agent does; ztunnel's INPOD_UDS,
    /// usually /var/run/ztunnel/ztunnel.sock) [default: off].
    #[arg(long, env = "WEIR_ZDS_SOCKET")]
    zds_socket: Option<PathBuf>,
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
    /// Pods this node runs at most: sizes the per-pod maps [default: the
    /// Kubernetes node's status.capacity.pods with --kubernetes, else
    /// 256]. Maps keep the size they were created with until `weir
    /// uninstall`.
    #[arg(long, env = "WEIR_MAX_PODS", value_parser = clap::value_parser!(u32).range(1..=1_048_576))]
    max_pods: Option<u32>,
    /// Capacity of the port-rule map (entries over all pods) [default:
    /// 64 per pod, at least 8192].
    #[arg(long, env = "WEIR_MAX_PORT_RULES", value_parser = clap::value_parser!(u32).range(1..=16_777_216))]
    max_port_rules: Option<u32>,
    /// Capacity of each CIDR map (entries over all pods; allocated as
    /// entries are added): CIDR_EXCLUDE, CIDR_INCLUDE, CIDR_DNS,
    /// CIDR_IFACE, CIDR_SKIP_SRC, SRC_ROUTES.
    #[arg(long, env = "WEIR_MAX_CIDRS", default_value_t = 262_144, value_parser = clap::value_parser!(u32).range(1..=16_777_216))]
    max_cidrs: u32,
    /// Capacity of the map of redirected connections' original
    /// destinations, from connect() until the proxy's socket closes (an
    /// LRU map: the least recently used go first; preallocated, about 120
    /// bytes an entry) [default: 32 per pod, at least 4096].
    #[arg(long, env = "WEIR_MAX_PENDING", value_parser = clap::value_parser!(u32).range(1024..=16_777_216))]
    max_pending: Option<u32>,
    /// Capacity of the map of connections rerouted from virtual
    /// interfaces (two entries a connection; preallocated, created when a
    /// pod first needs it).
    #[arg(long, env = "WEIR_MAX_VIRT_FLOWS", default_value_t = 32768, value_parser = clap::value_parser!(u32).range(2..=16_777_216))]
    max_virt_flows: u32,
    /// The socket-level fast path: established TCP connections between two
    /// sockets of this node's enrolled pods (an application and its
    /// sidecar over loopback, or two pods' sidecars) move their bytes
    /// straight from one socket to the other (sockops + sk_msg), skipping
    /// TCP/IP. Off by default; see docs/operations.md before turning it on.
    #[arg(long, env = "WEIR_FAST_PATH")]
    fast_path: bool,
    /// Capacity of the fast path's socket map (two entries per local
    /// connection; sockets beyond it simply use TCP) [default: 64 per
    /// pod, at least 1024].
    #[arg(long, env = "WEIR_MAX_FAST_SOCKETS", value_parser = clap::value_parser!(u32).range(2..=16_777_216))]
    max_fast_sockets: Option<u32>,
    /// Kernel log level (aya-log records from the programs, printed by the
    /// agent through RUST_LOG's logger). `trace` logs every capture
    /// decision: for debugging, not for production.
    #[arg(
        long,
        env = "WEIR_KERNEL_LOG_LEVEL",
        value_enum,
        default_value = "warn"
    )]
    kernel_log_level: datapath::KernelLogLevel,
}

#[derive(clap::Args, Debug)]
struct LogLevelArgs {
    /// The new kernel log level.
    #[arg(value_enum, env = "WEIR_KERNEL_LOG_LEVEL")]
    level: datapath::KernelLogLevel,
    #[command(flatten)]
    bpffs: BpffsArg,
}

#[derive(clap::Args, Debug)]
struct StatusArgs {
    #[command(flatten)]
    bpffs: BpffsArg,
    #[command(flatten)]
    state: reasons::StateFileArg,
    /// Output format.
    #[arg(short, long, env = "WEIR_OUTPUT", value_enum, default_value = "text")]
    output: status::Format,
}

#[derive(clap::Args, Debug)]
struct ExplainArgs {
    /// The pod, as NAMESPACE/NAME (see `weir status`).
    #[arg(long, env = "WEIR_EXPLAIN_POD", value_name = "NS/NAME")]
    pod: String,
    /// Destination of the connection: `IP:PORT` or `[IPv6]:PORT` (for
    /// --inbound, one of the pod's addresses).
    #[arg(long, env = "WEIR_EXPLAIN_DST", value_name = "ADDR:PORT")]
    dst: std::net::SocketAddr,
    /// UID of the process making an outbound connection.
    #[arg(long, env = "WEIR_EXPLAIN_UID", default_value_t = explain::DEFAULT_UID)]
    uid: u32,
    /// GID of the process making an outbound connection [default: the
    /// --uid value].
    #[arg(long, env = "WEIR_EXPLAIN_GID")]
    gid: Option<u32>,
    /// Outbound: the address the socket is bound to before connect() (e.g.
    /// 127.0.0.6 for the proxy's inbound passthrough). Inbound: the remote
    /// peer [default: a peer outside the pod].
    #[arg(long, env = "WEIR_EXPLAIN_SRC", value_name = "ADDR")]
    src: Option<std::net::IpAddr>,
    /// Explain a connection arriving at the pod instead of one it makes.
    #[arg(long, env = "WEIR_EXPLAIN_INBOUND")]
    inbound: bool,
    /// An outbound UDP datagram (weir captures only DNS) instead of TCP.
    #[arg(long, env = "WEIR_EXPLAIN_UDP", conflicts_with = "inbound")]
    udp: bool,
    /// The socket's mark (ambient pods: 0x539 for ztunnel's sockets,
    /// 0x111 for the application's side of ztunnel's connections into
    /// the pod; inbound: 0x539 asks about ztunnel's own connection).
    #[arg(long, env = "WEIR_EXPLAIN_MARK", value_parser = parse_mark, default_value = "0")]
    mark: u32,
    #[command(flatten)]
    bpffs: BpffsArg,
    #[command(flatten)]
    state: reasons::StateFileArg,
    /// Output format.
    #[arg(short, long, env = "WEIR_OUTPUT", value_enum, default_value = "text")]
    output: explain::Format,
}

impl ExplainArgs {
    fn query(&self) -> explain::Query {
        explain::Query {
            pod: self.pod.clone(),
            dst: self.dst,
            uid: self.uid,
            gid: self.gid.unwrap_or(self.uid),
            src: self.src,
            inbound: self.inbound,
            udp: self.udp,
            mark: self.mark,
        }
    }
}

/// A mark in decimal or `0x` hexadecimal.
fn parse_mark(s: &str) -> Result<u32, String> {
    let r = match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(h) => u32::from_str_radix(h, 16),
        None => s.parse(),
    };
    r.map_err(|_| format!("{s:?} is not a mark; use e.g. 0x539 or 1337"))
}

/// At most two glibc malloc arenas. glibc gives each thread that
/// allocates under contention an arena of its own (up to eight per CPU),
/// and freed memory stays in the arena that held it: the agent's RSS then
/// grows with how its work happened to spread over tokio's threads (the
/// bench saw 24-31 MB at 1,000 pods from run to run). The agent is not
/// allocation-bound, so two arenas cost nothing measurable and keep its
/// memory, which every node pays, lower and steadier.
fn few_malloc_arenas() {
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt only sets an allocator parameter; called first thing
    // in main, before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
}

fn main() {
    few_malloc_arenas();
    let cli = Cli::parse();
    logging::init(&cli.log);
    if !matches!(cli.command, Command::Run(_)) {
        // One-shot commands behave like other CLI tools when their output
        // pipe closes (`weir status | head`): end quietly instead of
        // panicking in println!.
        // SAFETY: restoring the default disposition of SIGPIPE before any
        // other thread exists.
        unsafe {
            let _ = nix::sys::signal::signal(
                nix::sys::signal::Signal::SIGPIPE,
                nix::sys::signal::SigHandler::SigDfl,
            );
        }
    }
    let res = match cli.command {
        Command::Run(a) => run(*a),
        Command::Status(a) => status::print(&a.bpffs.bpffs, &a.state.state_file, a.output),
        Command::Explain(a) => {
            explain::print(&a.bpffs.bpffs, &a.state.state_file, &a.query(), a.output)
        }
        Command::Uninstall(a) => uninstall(&a),
        Command::LogLevel(a) => datapath::set_pinned_log_level(&a.bpffs.bpffs, a.level)
            .map(|()| println!("kernel log level: {:?}", a.level)),
        Command::Cni(c) => cni::command(&c),
        Command::InpodEnroll(a) => ambient::inpod::command(&a),
        Command::ZdsServe(a) => zds_serve(&a),
    };
    if let Err(e) = res {
        error!("{e:#}");
        std::process::exit(1);
    }
}

/// `weir zds-serve`: the ZDS server fed from a workloads file until
/// SIGTERM/SIGINT.
fn zds_serve(a: &ZdsServeArgs) -> Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    info!("{}", version::startup_line());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let server = zds::Zds::new();
        server.listen(&a.socket)?;
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        let mut tick = tokio::time::interval(Duration::from_millis(a.reload_ms));
        let watch = podsfile::Watch::new(&a.workloads).ok();
        let mut last: Option<String> = None;
        loop {
            tokio::select! {
                _ = term.recv() => { info!("SIGTERM: stopping"); break; }
                _ = int.recv() => { info!("SIGINT: stopping"); break; }
                _ = tick.tick() => {}
                _ = async {
                    match &watch {
                        Some(w) => w.changed().await,
                        None => std::future::pending().await,
                    }
                } => {}
            }
            let text = match podsfile::read(&a.workloads).await {
                Ok(t) => t,
                Err(e) => {
                    if last.take().is_some() {
                        warn!(
                            "workloads file {}: cannot read it ({e}); keeping the current workloads",
                            a.workloads.display()
                        );
                    }
                    continue;
                }
            };
            if last.as_deref() == Some(text.as_str()) {
                continue;
            }
            match zds::workloads::parse(&a.workloads, &text) {
                Ok(f) => {
                    for e in &f.errors {
                        error!("{e}");
                    }
                    let n = f.workloads.len();
                    server.update(f.workloads);
                    info!("workloads file applied: {n} workloads");
                }
                Err(e) => error!("{e}; keeping the current workloads"),
            }
            last = Some(text);
        }
        Ok(())
    })
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
    info!("{}", version::startup_line());
    // Checked before anything is loaded (WEIR_KUBERNETES=false counts as
    // "given" for clap).
    if !a.kube.kubernetes && a.pods_file.is_none() {
        anyhow::bail!("no pod source: pass --pods-file FILE, or --kubernetes");
    }
    let metrics_addr: Option<SocketAddr> = match a.metrics_addr.as_str() {
        "off" | "" => None,
        s => Some(s.parse().with_context(|| {
            format!(
                "--metrics-addr {s:?}: not an address; use IP:PORT like 0.0.0.0:9464, or \"off\""
            )
        })?),
    };
    caps::preflight(a.cgroup.as_deref())?;
    let cgroup = match &a.cgroup {
        Some(c) => c.clone(),
        None => sys::cgroup2_mount()?,
    };
    if a.kube.kubernetes {
        k8s::preflight(&a.kube, &a.bpffs.bpffs)?;
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let pods = match a.max_pods {
        Some(p) => p,
        None if a.kube.kubernetes => rt.block_on(k8s::node_pod_capacity(&a.kube)),
        None => Capacities::DEFAULT_PODS,
    };
    let mut capacities = Capacities::for_pods(pods);
    capacities.cidrs = a.max_cidrs;
    capacities.virt_flows = a.max_virt_flows;
    if let Some(v) = a.max_port_rules {
        capacities.port_rules = v;
    }
    if let Some(v) = a.max_pending {
        capacities.pending_flows = v;
    }
    if let Some(v) = a.max_fast_sockets {
        capacities.fast_sockets = v;
    }
    info!("map capacities for {pods} pods: {capacities:?}");
    let mut dp = Datapath::load(&a.bpffs.bpffs, &cgroup, &capacities, a.fast_path)?;
    dp.set_kernel_log_level(a.kernel_log_level as u32)?;
    let kernel_logger = dp.take_logger();
    info!(
        "programs attached to cgroup {} (pins under {})",
        cgroup.display(),
        a.bpffs.bpffs.join("weir").display()
    );
    let rec = Arc::new(Mutex::new(
        Reconciler::new(dp).with_proc_root(a.kube.host_proc.clone()),
    ));
    let ready = Arc::new(AtomicBool::new(false));

    rt.block_on(async move {
        if let Some(logger) = kernel_logger {
            tokio::spawn(read_kernel_logs(logger));
        }
        let zds = match &a.zds_socket {
            Some(path) => {
                let server = zds::Zds::new();
                server.listen(path)?;
                Some(server)
            }
            None => None,
        };
        if let Some(addr) = metrics_addr {
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("--metrics-addr {addr}: cannot listen"))?;
            info!("serving /metrics, /healthz, /readyz on {addr}");
            tokio::spawn(metrics::serve(listener, rec.clone(), ready.clone()));
        }
        if a.kube.kubernetes {
            let resync = Duration::from_secs(a.resync_secs);
            return k8s::run(&a.kube, &a.cni, resync, rec, ready, zds).await;
        }
        if let Some(pods_file) = &a.pods_file {
            let server = cni::Server::new(
                rec.clone(),
                Box::new(podsfile::PodsFileSource(pods_file.clone())),
                a.kube.host_proc.clone(),
                None,
                None,
            )
            .with_zds(zds.clone());
            cni::start(&a.cni, a.cni.socket(false), server).await?;
        }
        let pods_file = a
            .pods_file
            .as_deref()
            .context("--pods-file is required without --kubernetes")?;
        podsfile::run(
            pods_file,
            Duration::from_millis(a.reload_ms),
            Duration::from_secs(a.resync_secs),
            rec,
            ready,
            zds,
        )
        .await
    })
}

/// Forwards the programs' aya-log records to the agent's logger as they
/// arrive (the ring buffer's fd becomes readable).
async fn read_kernel_logs(logger: aya_log::EbpfLogger<&'static dyn log::Log>) {
    // SAFETY: the logger owns its ring buffer's map fd for its whole life
    // and always returns that same fd; the AsyncFd owns the logger.
    let registered = unsafe {
        tokio::io::unix::AsyncFd::register_with_interest(logger, tokio::io::Interest::READABLE)
    };
    let mut fd = match registered {
        Ok(fd) => fd,
        Err(e) => {
            warn!("kernel logging unavailable: {e}");
            return;
        }
    };
    loop {
        match fd.readable_mut().await {
            Ok(mut guard) => {
                guard.get_inner_mut().flush();
                guard.clear_ready();
            }
            Err(e) => {
                warn!("kernel log reader stopped: {e}");
                return;
            }
        }
    }
}
