//! `weir-testkit demo`: a Bookinfo-shaped node on this machine, captured by
//! weir, with no iptables rule anywhere.
//!
//! Layout (every name starts with `weir-demo`, so a later run finds and
//! removes what a crashed one left behind):
//!
//! ```text
//! netns weir-demo-node            bridge br0 198.18.0.1/24 (the "node")
//! netns weir-demo-<pod>           eth0 198.18.0.1x/24, veth to br0
//!   productpage-v1 .10   details-v1 .11   reviews-v1/v2/v3 .12/.13/.14
//!   ratings-v1 .15       each: the app (uid 1000, :9080) and the sidecar
//!                        (uid 1337, :15001/:15006)
//! cgroup <cgroup2>/weir-demo/agent         the weir agent
//! cgroup <cgroup2>/weir-demo/pods/<pod>    the pod's processes; weir's
//!                                          programs are attached to .../pods
//! /tmp/weir-demo/                          pods file, logs, bpffs mount
//! ```
//!
//! Requests go from the node namespace to productpage, which calls details
//! and reviews (round robin over v1, v2, v3); reviews v2 and v3 call
//! ratings. Each hop is matched against the sidecars' connection logs: the
//! caller's sidecar must have carried it out (outbound listener) and the
//! callee's sidecar in (inbound listener).
//!
//! With `--ambient` the pods have no sidecars: they are Istio ambient pods,
//! captured in place by weir and served by a real ztunnel that weir feeds
//! over ZDS; each hop is matched with ztunnel's access log instead
//! (demo_ambient.rs).

use std::collections::BTreeMap;
use std::fs::File;
use std::io::BufRead;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Args;
use nix::mount::{MntFlags, umount2};
use nix::sys::signal::{SaFlags, SigAction, SigHandler, SigSet, Signal, kill, sigaction};
use nix::unistd::Pid;
use serde_json::{Value, json};
use weir_tests::podsfile::{PodEntry, pods_yaml, write_atomically};
use weir_tests::{
    find_cgroup2_mount, is_mount_point, join_before_exec, kill_subtree, mount_bpffs,
    remove_subtree, run_in_netns, subtree_pids, try_ip,
};

use crate::bookinfo::{self, Role};

#[path = "demo_ambient.rs"]
mod ambient;

/// Everything on disk lives here (pods file, logs, the bpffs mount).
const STATE_DIR: &str = "/tmp/weir-demo";
/// Prefix of every network namespace the demo creates.
const NETNS_PREFIX: &str = "weir-demo-";
/// The node's network namespace (the bridge, and the demo's client).
const NODE_NS: &str = "weir-demo-node";
/// The demo's cgroup, under the cgroup v2 mount.
const CGROUP_NAME: &str = "weir-demo";
/// The node's address on the bridge.
const NODE_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
/// Kubernetes namespace of the pods.
const NAMESPACE: &str = "default";
/// Applications run as this user.
const APP_UID: u32 = 1000;
/// The sidecars run as Istio's proxy user.
const PROXY_UID: u32 = 1337;
/// How long killed processes get to leave their cgroup.
const KILL_TIMEOUT: Duration = Duration::from_secs(5);
/// How long start-up steps may take.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// One pod of the demo.
struct Pod {
    name: &'static str,
    role: Role,
    version: &'static str,
    ip: Ipv4Addr,
    /// The node side of its veth (at most 15 bytes).
    iface: &'static str,
}

const PODS: &[Pod] = &[
    Pod {
        name: "productpage-v1",
        role: Role::Productpage,
        version: "v1",
        ip: Ipv4Addr::new(198, 18, 0, 10),
        iface: "wd-pp-v1",
    },
    Pod {
        name: "details-v1",
        role: Role::Details,
        version: "v1",
        ip: Ipv4Addr::new(198, 18, 0, 11),
        iface: "wd-det-v1",
    },
    Pod {
        name: "reviews-v1",
        role: Role::Reviews,
        version: "v1",
        ip: Ipv4Addr::new(198, 18, 0, 12),
        iface: "wd-rev-v1",
    },
    Pod {
        name: "reviews-v2",
        role: Role::Reviews,
        version: "v2",
        ip: Ipv4Addr::new(198, 18, 0, 13),
        iface: "wd-rev-v2",
    },
    Pod {
        name: "reviews-v3",
        role: Role::Reviews,
        version: "v3",
        ip: Ipv4Addr::new(198, 18, 0, 14),
        iface: "wd-rev-v3",
    },
    Pod {
        name: "ratings-v1",
        role: Role::Ratings,
        version: "v1",
        ip: Ipv4Addr::new(198, 18, 0, 15),
        iface: "wd-rat-v1",
    },
];

impl Pod {
    fn netns(&self) -> String {
        format!("{NETNS_PREFIX}{}", self.name)
    }

    fn addr(&self) -> SocketAddr {
        SocketAddr::from((self.ip, bookinfo::PORT))
    }

    fn by_ip(ip: IpAddr) -> Option<&'static Pod> {
        PODS.iter().find(|p| IpAddr::V4(p.ip) == ip)
    }

    fn by_name(name: &str) -> Option<&'static Pod> {
        PODS.iter().find(|p| p.name == name)
    }
}

/// The pods of one service, as `--upstream` wants them.
fn upstream(role: Role) -> String {
    let addrs: Vec<String> = PODS
        .iter()
        .filter(|p| p.role == role)
        .map(|p| p.addr().to_string())
        .collect();
    format!("{}={}", role.name(), addrs.join(","))
}

#[derive(Args, Debug)]
pub(crate) struct DemoArgs {
    /// Requests to send to productpage (reviews versions take turns).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    requests: u32,
    /// Bounded run (CI): send the requests, print, remove everything, and
    /// exit 0 only if every request went through the expected sidecars.
    #[arg(long, conflicts_with = "keep_running")]
    non_interactive: bool,
    /// After the requests, keep everything running until Ctrl-C or SIGTERM
    /// (press Enter to send another request). The default unless
    /// --non-interactive.
    #[arg(long)]
    keep_running: bool,
    /// Port of weir's /metrics on 127.0.0.1 (0: a free port).
    #[arg(long, default_value_t = 0)]
    metrics_port: u16,
    /// Only remove what an earlier run left behind, then exit.
    #[arg(long, conflicts_with_all = ["non_interactive", "keep_running"])]
    cleanup: bool,
    /// The weir agent binary [default: `weir` next to this binary].
    #[arg(long, env = "WEIR_BIN")]
    weir_bin: Option<PathBuf>,
    /// Istio ambient instead of sidecars: the pods are ambient pods, served
    /// by a real ztunnel (shared mode, local XDS, fake CA) connected to
    /// weir's ZDS socket; every hop between pods goes over HBONE.
    #[arg(long)]
    ambient: bool,
    /// The ztunnel binary for --ambient [default: the one `cargo xtask
    /// ztunnel` builds, ~/.cache/weir/ztunnel/62d82653/bin/ztunnel].
    #[arg(long, env = "WEIR_ZTUNNEL_BIN")]
    ztunnel_bin: Option<PathBuf>,
    /// Copy the logs (the agent's, ztunnel's access log, the sidecars')
    /// into this directory before removing everything (tests read them).
    #[arg(long)]
    keep_logs: Option<PathBuf>,
}

// ---------------------------------------------------------------------------
// Signals
// ---------------------------------------------------------------------------

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

fn stopping() -> bool {
    STOP.load(Ordering::SeqCst)
}

fn check_stop() -> Result<()> {
    if stopping() {
        bail!("interrupted");
    }
    Ok(())
}

/// SIGINT and SIGTERM only set a flag: the demo checks it between steps
/// and then removes everything in order.
fn install_signal_handlers() -> Result<()> {
    let action = SigAction::new(
        SigHandler::Handler(on_signal),
        SaFlags::empty(),
        SigSet::empty(),
    );
    for sig in [Signal::SIGINT, Signal::SIGTERM] {
        // SAFETY: the handler only stores to an atomic, which is
        // async-signal-safe.
        unsafe { sigaction(sig, &action) }
            .with_context(|| format!("installing a {sig} handler"))?;
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// Small system helpers
// ---------------------------------------------------------------------------

fn demo_netns() -> Vec<String> {
    try_ip(&["netns", "list"])
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| n.starts_with(NETNS_PREFIX))
        .map(str::to_string)
        .collect()
}

/// Runs `f` on a thread inside network namespace `name`.
fn in_netns<R: Send>(name: &str, f: impl FnOnce() -> R + Send) -> Result<R> {
    Ok(run_in_netns(&Path::new("/var/run/netns").join(name), f)?)
}

// ---------------------------------------------------------------------------
// Child processes
// ---------------------------------------------------------------------------

/// A process the demo started, its output going to `log`.
struct Proc {
    what: String,
    child: Child,
    log: PathBuf,
}

impl Proc {
    /// Starts `cmd` in `cgroup` and (when given) network namespace `netns`,
    /// in its own process group (so Ctrl-C reaches only the demo, which then
    /// stops everything in order). Both are joined before `exec`: `ip netns
    /// exec` would also remount /sys, which hides the cgroup v2 mount.
    fn spawn(
        what: String,
        mut cmd: Command,
        netns: Option<&str>,
        cgroup: &Path,
        log: &Path,
    ) -> Result<Proc> {
        let out = File::create(log).with_context(|| format!("creating {}", log.display()))?;
        let err = out.try_clone()?;
        cmd.stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .process_group(0);
        let ns_path = netns.map(|n| Path::new("/var/run/netns").join(n));
        join_before_exec(&mut cmd, ns_path.as_deref(), Some(cgroup))?;
        let child = cmd
            .spawn()
            .with_context(|| format!("starting {what} ({cmd:?})"))?;
        Ok(Proc {
            what,
            child,
            log: log.to_path_buf(),
        })
    }

    fn pid(&self) -> Pid {
        Pid::from_raw(self.child.id() as i32)
    }

    /// The last lines of its log.
    fn tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(15)..].join("\n")
    }

    /// Fails (with its log) if it has exited.
    fn check_alive(&mut self) -> Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!(
                "{} exited ({status}); its log {}:\n{}",
                self.what,
                self.log.display(),
                self.tail()
            );
        }
        Ok(())
    }

    /// Waits for `done`, failing when the process exits, on Ctrl-C, or
    /// after START_TIMEOUT.
    fn wait_for(&mut self, what: &str, mut done: impl FnMut() -> bool) -> Result<()> {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if done() {
                return Ok(());
            }
            self.check_alive()?;
            check_stop()?;
            if Instant::now() > deadline {
                bail!(
                    "{} did not get {what} within {START_TIMEOUT:?}; its log {}:\n{}",
                    self.what,
                    self.log.display(),
                    self.tail()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGTERM, then SIGKILL after `grace`; reaps it.
    fn stop(&mut self, grace: Duration) {
        if self.child.try_wait().ok().flatten().is_some() {
            return;
        }
        let _ = kill(self.pid(), Signal::SIGTERM);
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if self.child.try_wait().ok().flatten().is_some() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ---------------------------------------------------------------------------
// HTTP to the agent's metrics endpoint (host network namespace)
// ---------------------------------------------------------------------------

fn http_get_local(addr: SocketAddr, path: &str) -> Result<(u16, String)> {
    let r = bookinfo::http_get(addr, "localhost", path, Duration::from_secs(3))?;
    let text = match r.body {
        Value::String(s) => s,
        other => other.to_string(),
    };
    Ok((r.status, text))
}

// ---------------------------------------------------------------------------
// The demo
// ---------------------------------------------------------------------------

struct Paths {
    state: PathBuf,
    bpffs: PathBuf,
    logs: PathBuf,
    run: PathBuf,
    pods_file: PathBuf,
    pid_file: PathBuf,
    cgroup: PathBuf,
}

impl Paths {
    fn new() -> Result<Paths> {
        let state = PathBuf::from(STATE_DIR);
        Ok(Paths {
            bpffs: state.join("bpffs"),
            logs: state.join("logs"),
            run: state.join("run"),
            pods_file: state.join("pods.yaml"),
            pid_file: state.join("demo.pid"),
            cgroup: find_cgroup2_mount()
                .context("no cgroup2 file system in /proc/self/mounts: the demo needs cgroup v2")?
                .join(CGROUP_NAME),
            state,
        })
    }

    fn pods_cgroup(&self) -> PathBuf {
        self.cgroup.join("pods")
    }

    fn sidecar_log(&self, pod: &Pod) -> PathBuf {
        self.logs.join(format!("{}.sidecar.jsonl", pod.name))
    }

    fn ztunnel_log(&self) -> PathBuf {
        self.logs.join("ztunnel.jsonl")
    }

    fn zds_socket(&self) -> PathBuf {
        self.run.join("ztunnel.sock")
    }
}

/// Refuses to run next to a live demo (whose state the clean-up would
/// destroy).
fn check_no_other_demo(paths: &Paths) -> Result<()> {
    let Ok(text) = std::fs::read_to_string(&paths.pid_file) else {
        return Ok(());
    };
    let Ok(pid) = text.trim().parse::<i32>() else {
        return Ok(());
    };
    if pid == std::process::id() as i32 {
        return Ok(());
    }
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
    if cmdline.contains("weir-testkit") && cmdline.contains(" demo") {
        bail!(
            "another demo is running (pid {pid}: {}); stop it (Ctrl-C in its terminal, or kill {pid}) first",
            cmdline.trim()
        );
    }
    Ok(())
}

/// Removes everything the demo makes, whether this run or a crashed one
/// made it; returns a line per kind of thing removed.
fn teardown(paths: &Paths, weir: Option<&Path>, agent: Option<&mut Proc>) -> Vec<String> {
    let mut done = Vec::new();
    // The pods first (the agent keeps capture in place anyway), then the
    // agent, gracefully, then whatever else is left in the cgroup.
    let pods_cg = paths.pods_cgroup();
    let n = subtree_pids(&pods_cg).len();
    if n > 0 {
        kill_subtree(&pods_cg, KILL_TIMEOUT);
        done.push(format!("stopped {n} pod processes"));
    }
    if let Some(agent) = agent {
        agent.stop(Duration::from_secs(5));
        done.push("stopped the weir agent (SIGTERM)".to_string());
    }
    let n = subtree_pids(&paths.cgroup).len();
    if n > 0 {
        kill_subtree(&paths.cgroup, KILL_TIMEOUT);
        done.push(format!("killed {n} leftover processes"));
    }
    if is_mount_point(&paths.bpffs) {
        let mut note = String::new();
        if let Some(weir) = weir {
            match Command::new(weir)
                .args(["uninstall", "--bpffs"])
                .arg(&paths.bpffs)
                .stdin(Stdio::null())
                .output()
            {
                Ok(out) if out.status.success() => {
                    let n = String::from_utf8_lossy(&out.stdout)
                        .lines()
                        .filter(|l| l.starts_with("removed "))
                        .count();
                    note = format!("`weir uninstall` removed {n} pins; ");
                }
                Ok(out) => {
                    note = format!(
                        "`weir uninstall` failed ({}); ",
                        String::from_utf8_lossy(&out.stderr).trim()
                    )
                }
                Err(e) => note = format!("cannot run {}: {e}; ", weir.display()),
            }
        }
        match umount2(&paths.bpffs, MntFlags::MNT_DETACH) {
            Ok(()) => done.push(format!("{note}unmounted bpffs {}", paths.bpffs.display())),
            Err(e) => done.push(format!(
                "{note}cannot unmount {}: {e}",
                paths.bpffs.display()
            )),
        }
    }
    let netns = demo_netns();
    if !netns.is_empty() {
        let mut failed = Vec::new();
        for n in &netns {
            if try_ip(&["netns", "del", n]).is_err() {
                failed.push(n.clone());
            }
        }
        done.push(format!(
            "deleted {} network namespaces{}",
            netns.len() - failed.len(),
            if failed.is_empty() {
                String::new()
            } else {
                format!(" (could not delete {})", failed.join(", "))
            }
        ));
    }
    if paths.cgroup.exists() {
        let (removed, total, _) = remove_subtree(&paths.cgroup);
        done.push(format!(
            "removed {removed} of {total} cgroups under {}",
            paths.cgroup.display()
        ));
    }
    if paths.state.exists() && !is_mount_point(&paths.bpffs) {
        match std::fs::remove_dir_all(&paths.state) {
            Ok(()) => done.push(format!("removed {}", paths.state.display())),
            Err(e) => done.push(format!("cannot remove {}: {e}", paths.state.display())),
        }
    }
    done
}

/// Starts `cmd` (`what`, logging to `log`) in `pod`'s network namespace
/// and its cgroup under `paths`, and waits until it creates `ready.1` (it
/// got `ready.0`). It joins `procs` (and so is stopped at teardown) even
/// when it fails.
fn start_in_pod(
    procs: &mut Vec<Proc>,
    paths: &Paths,
    pod: &Pod,
    (what, cmd, log): (String, Command, &Path),
    ready: (&str, &Path),
) -> Result<()> {
    let mut proc = Proc::spawn(
        what,
        cmd,
        Some(&pod.netns()),
        &paths.pods_cgroup().join(pod.name),
        log,
    )?;
    let res = proc.wait_for(ready.0, || ready.1.exists());
    procs.push(proc);
    res
}

struct Demo {
    paths: Paths,
    weir: PathBuf,
    testkit: PathBuf,
    /// ztunnel's binary: the ambient demo.
    ztunnel: Option<PathBuf>,
    metrics: SocketAddr,
    agent: Option<Proc>,
    procs: Vec<Proc>,
    /// Ambient: how many of ztunnel's access records earlier requests
    /// matched (a later request looks only at the records after them).
    ztunnel_seen: std::cell::Cell<usize>,
    torn_down: bool,
}

impl Drop for Demo {
    fn drop(&mut self) {
        // Also on a panic: never leave the node captured.
        if !self.torn_down {
            self.teardown();
        }
    }
}

impl Demo {
    fn teardown(&mut self) -> Vec<String> {
        self.torn_down = true;
        let lines = teardown(&self.paths, Some(&self.weir), self.agent.as_mut());
        for p in &mut self.procs {
            let _ = p.child.try_wait();
        }
        lines
    }

    fn setup(&mut self) -> Result<()> {
        let p = &self.paths;
        for dir in [&p.state, &p.logs, &p.run] {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        // The sidecars and applications drop privileges before they create
        // their ready files.
        std::fs::set_permissions(&p.run, std::fs::Permissions::from_mode(0o1777))?;
        std::fs::write(&p.pid_file, std::process::id().to_string())?;

        std::fs::create_dir_all(&p.bpffs)?;
        mount_bpffs(&p.bpffs).with_context(|| format!("mount -t bpf bpf {}", p.bpffs.display()))?;
        step(&format!("bpffs mounted on {}", p.bpffs.display()));

        for dir in [p.cgroup.join("agent"), p.pods_cgroup()] {
            std::fs::create_dir_all(&dir)
                .with_context(|| format!("creating cgroup {}", dir.display()))?;
        }
        for pod in PODS {
            std::fs::create_dir(p.pods_cgroup().join(pod.name))?;
        }
        if self.ztunnel.is_some() {
            std::fs::create_dir(p.pods_cgroup().join("ztunnel"))?;
        }
        step(&format!(
            "cgroups {0}/agent and {0}/pods/<pod>",
            p.cgroup.display()
        ));
        check_stop()?;

        try_ip(&["netns", "add", NODE_NS])?;
        try_ip(&["-n", NODE_NS, "link", "set", "lo", "up"])?;
        try_ip(&["-n", NODE_NS, "link", "add", "br0", "type", "bridge"])?;
        try_ip(&[
            "-n",
            NODE_NS,
            "addr",
            "add",
            &format!("{NODE_IP}/24"),
            "dev",
            "br0",
        ])?;
        try_ip(&["-n", NODE_NS, "link", "set", "br0", "up"])?;
        for pod in PODS {
            let ns = pod.netns();
            try_ip(&["netns", "add", &ns])?;
            try_ip(&["-n", &ns, "link", "set", "lo", "up"])?;
            try_ip(&[
                "-n", &ns, "link", "add", "eth0", "type", "veth", "peer", "name", pod.iface,
                "netns", NODE_NS,
            ])?;
            try_ip(&[
                "-n",
                &ns,
                "addr",
                "add",
                &format!("{}/24", pod.ip),
                "dev",
                "eth0",
            ])?;
            try_ip(&["-n", &ns, "link", "set", "eth0", "up"])?;
            try_ip(&["-n", NODE_NS, "link", "set", pod.iface, "master", "br0"])?;
            try_ip(&["-n", NODE_NS, "link", "set", pod.iface, "up"])?;
        }
        step(&format!(
            "network namespaces {NODE_NS} (bridge br0, {NODE_IP}/24) and {}",
            PODS.iter()
                .map(|p| format!("{}{} {}", NETNS_PREFIX, p.name, p.ip))
                .collect::<Vec<_>>()
                .join(", ")
        ));
        check_stop()?;

        let ambient = self.ztunnel.is_some();
        let entries: Vec<PodEntry> = PODS
            .iter()
            .map(|pod| {
                let mut e = PodEntry::at(
                    pod.name,
                    &Path::new("/var/run/netns").join(pod.netns()),
                    &[&pod.ip.to_string()],
                )
                .namespace(NAMESPACE);
                if ambient {
                    e.mesh = Some("ambient".into());
                    e.service_account = Some(ambient::service_account(pod));
                }
                e
            })
            .collect();
        write_atomically(
            &p.pods_file,
            &format!(
                "# weir-testkit demo: the pods of this node\n{}",
                pods_yaml(&entries)
            ),
        )?;
        step(&format!("pods file {}", p.pods_file.display()));

        // The agent, in its own cgroup (not the captured one).
        let mut cmd = Command::new(&self.weir);
        cmd.arg("run")
            .arg("--pods-file")
            .arg(&p.pods_file)
            .arg("--cgroup")
            .arg(p.pods_cgroup())
            .arg("--bpffs")
            .arg(&p.bpffs)
            .arg("--metrics-addr")
            .arg(self.metrics.to_string())
            .args(
                ambient
                    .then(|| ["--zds-socket".into(), p.zds_socket().into_os_string()])
                    .into_iter()
                    .flatten(),
            )
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
            );
        let mut agent = Proc::spawn(
            "the weir agent".into(),
            cmd,
            None,
            &p.cgroup.join("agent"),
            &p.logs.join("weir.log"),
        )?;
        let metrics = self.metrics;
        let res = agent.wait_for("ready (/readyz)", || {
            http_get_local(metrics, "/readyz").is_ok_and(|(s, _)| s == 200)
        });
        self.agent = Some(agent);
        res?;
        step(&format!(
            "weir run --pods-file {} --cgroup {} --bpffs {} --metrics-addr {}{}: ready",
            p.pods_file.display(),
            p.pods_cgroup().display(),
            p.bpffs.display(),
            self.metrics,
            if ambient {
                format!(" --zds-socket {}", p.zds_socket().display())
            } else {
                String::new()
            }
        ));

        if let Some(bin) = self.ztunnel.clone() {
            self.start_ztunnel(&bin)?;
        } else {
            self.start_sidecars()?;
        }
        self.start_apps()
    }

    /// ztunnel in shared mode on weir's ZDS socket (demo_ambient.rs), in
    /// its own network namespace and the captured cgroup; waits until its
    /// proxy listens (HBONE, 15008) in every pod.
    fn start_ztunnel(&mut self, bin: &Path) -> Result<()> {
        let p = &self.paths;
        try_ip(&["netns", "add", ambient::ZTUNNEL_NS])?;
        try_ip(&["-n", ambient::ZTUNNEL_NS, "link", "set", "lo", "up"])?;
        let xds = p.state.join("ztunnel-xds.yaml");
        write_atomically(&xds, &ambient::local_xds())?;
        let cmd = ambient::ztunnel_command(bin, &p.zds_socket(), &xds);
        let mut proc = Proc::spawn(
            "ztunnel".into(),
            cmd,
            Some(ambient::ZTUNNEL_NS),
            &p.pods_cgroup().join("ztunnel"),
            &p.ztunnel_log(),
        )?;
        let started = Instant::now();
        let res = proc.wait_for("its proxy listening in every pod", || {
            PODS.iter().all(|pod| {
                in_netns(&pod.netns(), || ambient::listens(ambient::HBONE_PORT)).unwrap_or(false)
            })
        });
        self.procs.push(proc);
        res?;
        step(&format!(
            "ztunnel (PROXY_MODE=shared, INPOD_UDS={}, LOCAL_XDS_PATH={}, FAKE_CA) in netns {} and cgroup {}: \
             weir handed it the {} ambient pods over ZDS, its proxies listen in each ({} ms)",
            p.zds_socket().display(),
            xds.display(),
            ambient::ZTUNNEL_NS,
            p.pods_cgroup().join("ztunnel").display(),
            PODS.len(),
            started.elapsed().as_millis()
        ));
        Ok(())
    }

    fn start_sidecars(&mut self) -> Result<()> {
        let p = &self.paths;
        // Sidecars first (their listeners are recorded as they listen),
        // then the applications.
        for pod in PODS {
            let ready = p.run.join(format!("{}.sidecar.ready", pod.name));
            let mut cmd = Command::new(&self.testkit);
            cmd.args([
                "--uid",
                &PROXY_UID.to_string(),
                "sidecar",
                "--name",
                pod.name,
            ])
            .arg("--log")
            .arg(p.sidecar_log(pod))
            .arg("--ready-file")
            .arg(&ready);
            let log = p.logs.join(format!("{}.sidecar.stderr", pod.name));
            start_in_pod(
                &mut self.procs,
                p,
                pod,
                (format!("the sidecar of {}", pod.name), cmd, &log),
                ("its listeners up", &ready),
            )?;
        }
        step(&format!(
            "sidecars (weir-testkit --uid {PROXY_UID} sidecar, :15001/:15006) in every pod"
        ));
        Ok(())
    }

    fn start_apps(&mut self) -> Result<()> {
        let p = &self.paths;
        for pod in PODS {
            let ready = p.run.join(format!("{}.app.ready", pod.name));
            let mut cmd = Command::new(&self.testkit);
            cmd.args([
                "--uid",
                &APP_UID.to_string(),
                "bookinfo",
                "--role",
                pod.role.name(),
                "--version",
                pod.version,
                "--pod",
                pod.name,
            ])
            .arg("--ready-file")
            .arg(&ready);
            match (pod.role, pod.version) {
                (Role::Productpage, _) => {
                    cmd.args(["--upstream", &upstream(Role::Details)]);
                    cmd.args(["--upstream", &upstream(Role::Reviews)]);
                }
                (Role::Reviews, "v2" | "v3") => {
                    cmd.args(["--upstream", &upstream(Role::Ratings)]);
                }
                _ => {}
            }
            let log = p.logs.join(format!("{}.app.log", pod.name));
            start_in_pod(
                &mut self.procs,
                p,
                pod,
                (format!("the {} application", pod.name), cmd, &log),
                ("listening", &ready),
            )?;
        }
        step(&format!(
            "applications (weir-testkit --uid {APP_UID} bookinfo, :{}) in every pod",
            bookinfo::PORT
        ));
        Ok(())
    }

    /// Sends request `n` and prints its hops; returns whether every hop
    /// went through the expected sidecars.
    fn request(&self, n: u32, of: Option<u32>) -> Result<bool> {
        let pp = &PODS[0];
        let dst = pp.addr();
        let res = in_netns(NODE_NS, || {
            bookinfo::http_get(dst, "productpage", "/productpage", Duration::from_secs(10))
        })?;
        let label = match of {
            Some(of) => format!("request {n}/{of}"),
            None => format!("request {n}"),
        };
        let reply = match res {
            Ok(r) => r,
            Err(e) => {
                println!("\n{label}  GET http://{dst}/productpage  FAILED: {e:#}");
                return Ok(false);
            }
        };
        println!(
            "\n{label}  GET http://{dst}/productpage  {}  {} ms",
            reply.status,
            reply.elapsed.as_millis()
        );
        println!("  {}", summary(&reply.body));
        let entry = HopIn {
            from: None,
            local: fmt(reply.local),
            dst: fmt(dst),
            service: "productpage".into(),
            ok: reply.status == 200 && reply.body["ok"] == json!(true),
            error: (reply.status != 200).then(|| format!("HTTP status {}", reply.status)),
            peer: None,
            response: reply.body.clone(),
        };
        // The sidecars log each connection before relaying it, so every
        // record is on disk once the reply is in; ztunnel logs a connection
        // once it is closed. Read again briefly in case a write is still in
        // flight.
        let deadline = Instant::now() + Duration::from_secs(2);
        loop {
            let mut hops = Vec::new();
            if self.ztunnel.is_some() {
                let text = std::fs::read_to_string(self.paths.ztunnel_log()).unwrap_or_default();
                let records = ambient::access_records(&text);
                let seen = self.ztunnel_seen.get().min(records.len());
                let mut used = std::collections::HashSet::new();
                ambient::walk(&entry, &records[seen..], &mut used, &mut hops);
                if hops.iter().all(|h| h.ok) || Instant::now() > deadline {
                    self.ztunnel_seen.set(records.len());
                }
            } else {
                walk(&entry, &self.sidecar_logs(), &mut hops);
            }
            if hops.iter().all(|h| h.ok) || Instant::now() > deadline {
                for h in &hops {
                    for line in &h.lines {
                        println!("{line}");
                    }
                }
                return Ok(hops.iter().all(|h| h.ok));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn sidecar_logs(&self) -> BTreeMap<&'static str, Vec<Value>> {
        PODS.iter()
            .map(|pod| {
                let text = std::fs::read_to_string(self.paths.sidecar_log(pod)).unwrap_or_default();
                let records = text
                    .lines()
                    .filter_map(|l| serde_json::from_str(l).ok())
                    .collect();
                (pod.name, records)
            })
            .collect()
    }

    fn weir_output(&self, args: &[&str]) -> String {
        let mut cmd = Command::new(&self.weir);
        cmd.args(args).arg("--bpffs").arg(&self.paths.bpffs);
        match cmd.output() {
            Ok(o) => format!(
                "{}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            ),
            Err(e) => format!("cannot run {}: {e}\n", self.weir.display()),
        }
    }

    /// Prints the iptables rule count of the demo's namespaces; returns
    /// whether it is zero (or could not be checked).
    fn show_iptables(&self) -> bool {
        let netns = demo_netns();
        let mut rules = 0;
        for ns in &netns {
            for tool in ["iptables-save", "ip6tables-save"] {
                match Command::new("ip")
                    .args(["netns", "exec", ns, tool])
                    .stdin(Stdio::null())
                    .output()
                {
                    Ok(out) if out.status.success() => {
                        rules += String::from_utf8_lossy(&out.stdout)
                            .lines()
                            .filter(|l| l.starts_with("-A "))
                            .count();
                    }
                    _ => {
                        println!("\niptables rules: not checked ({tool} is not available)");
                        return true;
                    }
                }
            }
        }
        println!(
            "\niptables rules in the {} network namespaces of the demo (iptables-save, ip6tables-save): {rules}",
            netns.len()
        );
        rules == 0 && self.show_nft(&netns)
    }

    /// Prints the nft rule count of `netns` (`nft -j list ruleset`);
    /// returns whether it is zero (or could not be checked).
    fn show_nft(&self, netns: &[String]) -> bool {
        let mut rules = 0;
        for ns in netns {
            match Command::new("ip")
                .args(["netns", "exec", ns, "nft", "-j", "list", "ruleset"])
                .stdin(Stdio::null())
                .output()
            {
                Ok(out) if out.status.success() => {
                    let v: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
                    rules += v["nftables"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .filter(|o| o.get("rule").is_some())
                        .count();
                }
                _ => {
                    println!("nft rules: not checked (nft is not available)");
                    return true;
                }
            }
        }
        println!(
            "nft rules in the {} network namespaces of the demo (nft list ruleset): {rules}",
            netns.len()
        );
        rules == 0
    }

    fn show_state(&self) {
        println!("\n$ weir status --bpffs {}", self.paths.bpffs.display());
        print!("{}", indent(&self.weir_output(&["status"])));
        let pp = &PODS[0];
        let details = &PODS[1];
        let sidecar_explains = [
            (
                "the application's call to details",
                vec![
                    "explain".to_string(),
                    "--pod".into(),
                    format!("{NAMESPACE}/{}", pp.name),
                    "--dst".into(),
                    details.addr().to_string(),
                ],
            ),
            (
                "the sidecar's own upstream connection",
                vec![
                    "explain".to_string(),
                    "--pod".into(),
                    format!("{NAMESPACE}/{}", pp.name),
                    "--dst".into(),
                    details.addr().to_string(),
                    "--uid".into(),
                    PROXY_UID.to_string(),
                ],
            ),
            (
                "a request arriving at details",
                vec![
                    "explain".to_string(),
                    "--pod".into(),
                    format!("{NAMESPACE}/{}", details.name),
                    "--dst".into(),
                    details.addr().to_string(),
                    "--inbound".into(),
                ],
            ),
        ];
        let explains = if self.ztunnel.is_some() {
            ambient::explains()
        } else {
            sidecar_explains.into()
        };
        for (what, args) in explains {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            println!(
                "\n$ weir {} --bpffs {}    # {what}",
                args.join(" "),
                self.paths.bpffs.display()
            );
            print!("{}", indent(&self.weir_output(&args)));
        }
        println!("\n$ curl -s http://{}/metrics    # a sample", self.metrics);
        match http_get_local(self.metrics, "/metrics") {
            Ok((200, text)) => {
                for line in metrics_sample(&text, pp.name) {
                    println!("    {line}");
                }
            }
            Ok((status, text)) => println!("    HTTP {status}: {}", text.trim()),
            Err(e) => println!("    cannot fetch /metrics: {e:#}"),
        }
    }
}

fn step(what: &str) {
    println!("  + {what}");
}

fn indent(text: &str) -> String {
    text.lines().map(|l| format!("    {l}\n")).collect()
}

fn fmt(a: SocketAddr) -> String {
    weir_tests::net::fmt_addr(a)
}

/// The book, and who reviewed it, in one line.
fn summary(body: &Value) -> String {
    let calls = body["calls"].as_array().cloned().unwrap_or_default();
    let find = |s: &str| calls.iter().find(|c| c["service"] == json!(s)).cloned();
    let mut out = format!("book: {}", body["product"]["title"].as_str().unwrap_or("?"));
    if let Some(d) = find("details") {
        let d = &d["response"]["details"];
        if let (Some(a), Some(y)) = (d["author"].as_str(), d["year"].as_u64()) {
            out.push_str(&format!(" by {a} ({y})"));
        }
    }
    if let Some(r) = find("reviews") {
        let r = &r["response"];
        let pod = r["pod"].as_str().unwrap_or("?");
        let stars: Vec<String> = r["reviews"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|rv| {
                let n = rv["rating"]["stars"].as_u64()?;
                let color = rv["rating"]["color"].as_str().unwrap_or("");
                Some(format!(
                    "{} {}{} ({color})",
                    rv["reviewer"].as_str().unwrap_or("?"),
                    "★".repeat(n as usize),
                    "☆".repeat(5usize.saturating_sub(n as usize)),
                ))
            })
            .collect();
        if stars.is_empty() {
            out.push_str(&format!("; reviews from {pod}: no ratings"));
        } else {
            out.push_str(&format!("; reviews from {pod}: {}", stars.join(", ")));
        }
    }
    out
}

/// The weir series of one pod and the node-wide ones, without zeros.
fn metrics_sample(text: &str, pod: &str) -> Vec<String> {
    text.lines()
        .filter(|l| l.starts_with("weir_"))
        .filter(|l| !l.contains("pod=") || l.contains(&format!("pod=\"{pod}\"")))
        .filter(|l| !l.ends_with(" 0"))
        .map(str::to_string)
        .collect()
}

/// One connection of the request tree: who made it and what it got.
struct HopIn {
    /// The calling pod (None: the demo's client in the node namespace).
    from: Option<&'static Pod>,
    /// The caller's socket address.
    local: String,
    /// The destination the caller dialled.
    dst: String,
    service: String,
    /// What getpeername() said on the caller's socket.
    peer: Option<String>,
    ok: bool,
    error: Option<String>,
    response: Value,
}

struct HopOut {
    ok: bool,
    lines: Vec<String>,
}

impl HopOut {
    /// A hop's report: a title line (✓ or ✗, `from -> to`), `lines`, then
    /// one line per problem.
    fn report(from: &str, to: &str, mut lines: Vec<String>, problems: &[String]) -> HopOut {
        let ok = problems.is_empty();
        lines.insert(
            0,
            format!("  {} {from} -> {to}", if ok { "✓" } else { "✗" }),
        );
        lines.extend(problems.iter().map(|p| format!("        PROBLEM: {p}")));
        HopOut { ok, lines }
    }
}

fn find<'a>(records: &'a [Value], listener: &str, peer: &str) -> Option<&'a Value> {
    records
        .iter()
        .find(|r| r["listener"] == json!(listener) && r["peer"] == json!(peer))
}

/// What both demos' walks start a hop with: its caller and callee as the
/// demo prints them, and what the hop's own record already says went wrong
/// (an error, a failed call behind it, a caller that saw another peer).
struct HopStart {
    /// The caller's pod name, or "client" for the node's client.
    from: &'static str,
    /// The demo pod the hop was dialled to, if it is one.
    target: Option<&'static Pod>,
    /// The callee as printed.
    to: String,
    /// Problems found so far.
    problems: Vec<String>,
}

impl HopStart {
    fn of(hop: &HopIn) -> HopStart {
        let from = hop.from.map(|p| p.name).unwrap_or("client");
        let target = hop
            .dst
            .parse::<SocketAddr>()
            .ok()
            .and_then(|a| Pod::by_ip(a.ip()));
        let to = match (target, hop.service.as_str()) {
            (Some(t), "reviews") => format!("{} {} ({})", hop.service, hop.dst, t.name),
            (Some(t), "productpage") => format!("{} {}", t.name, hop.dst),
            _ => format!("{} {}", hop.service, hop.dst),
        };
        let mut problems = Vec::new();
        if let Some(e) = &hop.error {
            problems.push(e.clone());
        } else if !hop.ok {
            problems.push("the reply says a call behind it failed".into());
        }
        if let Some(peer) = &hop.peer
            && peer != &hop.dst
        {
            problems.push(format!(
                "getpeername() on the caller's socket says {peer}, not {}",
                hop.dst
            ));
        }
        HopStart {
            from,
            target,
            to,
            problems,
        }
    }
}

/// Checks one hop against the sidecar logs, then the calls made while
/// serving it.
fn walk(hop: &HopIn, logs: &BTreeMap<&'static str, Vec<Value>>, out: &mut Vec<HopOut>) {
    let HopStart {
        from,
        target,
        to,
        mut problems,
    } = HopStart::of(hop);
    let mut lines = Vec::new();
    // Outbound: the caller's own sidecar.
    let mut upstream_src = Some(hop.local.clone());
    if let Some(caller) = hop.from {
        let recs = logs.get(caller.name).map(Vec::as_slice).unwrap_or(&[]);
        match find(recs, "outbound", &hop.local) {
            Some(r) => {
                if r["orig_dst"] != json!(hop.dst) {
                    problems.push(format!(
                        "{}'s sidecar saw original destination {}, not {}",
                        caller.name, r["orig_dst"], hop.dst
                    ));
                }
                upstream_src = r["upstream_local"].as_str().map(str::to_string);
                lines.push(format!(
                    "        {:<24} outbound :{}  app {} -> upstream from {}",
                    format!("{} sidecar", caller.name),
                    r["listener_port"],
                    hop.local,
                    upstream_src.as_deref().unwrap_or("-")
                ));
            }
            None => {
                upstream_src = None;
                problems.push(format!(
                    "no connection from {} in {}'s sidecar log: the call was not captured",
                    hop.local, caller.name
                ));
            }
        }
    }
    // Inbound: the callee's sidecar.
    if let (Some(t), Some(src)) = (target, &upstream_src) {
        let recs = logs.get(t.name).map(Vec::as_slice).unwrap_or(&[]);
        match find(recs, "inbound", src) {
            Some(r) => {
                let to_app = r["upstream_local"].as_str().unwrap_or("-");
                if r["orig_dst"] != json!(hop.dst) {
                    problems.push(format!(
                        "{}'s sidecar saw original destination {}, not {}",
                        t.name, r["orig_dst"], hop.dst
                    ));
                }
                let served_peer = hop.response["served"]["peer"].as_str().unwrap_or("");
                if served_peer != to_app {
                    problems.push(format!(
                        "{}'s application was reached from {served_peer}, not by its sidecar ({to_app})",
                        t.name
                    ));
                }
                lines.push(format!(
                    "        {:<24} inbound  :{}  from {src} -> app from {to_app}",
                    format!("{} sidecar", t.name),
                    r["listener_port"],
                ));
            }
            None => problems.push(format!(
                "no connection from {src} in {}'s sidecar log: the request reached {} without its sidecar",
                t.name, t.name
            )),
        }
    } else if target.is_none() {
        problems.push(format!("{} is not a pod of the demo", hop.dst));
    }
    out.push(HopOut::report(from, &to, lines, &problems));
    // The calls made while serving this hop.
    let callee = hop.response["pod"].as_str().and_then(Pod::by_name);
    for next in calls_of(hop, callee) {
        walk(&next, logs, out);
    }
}

/// The calls `callee` made while serving `hop`, as the reply describes them.
fn calls_of(hop: &HopIn, callee: Option<&'static Pod>) -> Vec<HopIn> {
    hop.response["calls"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|call| HopIn {
            from: callee,
            local: call["local"].as_str().unwrap_or("-").to_string(),
            dst: call["dst"].as_str().unwrap_or("-").to_string(),
            service: call["service"].as_str().unwrap_or("?").to_string(),
            peer: call["peer"].as_str().map(str::to_string),
            ok: call["ok"] == json!(true),
            error: call["error"].as_str().map(str::to_string).or_else(|| {
                (call["status"] != json!(200)).then(|| format!("HTTP status {}", call["status"]))
            }),
            response: call["response"].clone(),
        })
        .collect()
}

fn find_weir(flag: Option<PathBuf>) -> Result<PathBuf> {
    if let Some(p) = flag {
        if !p.is_file() {
            bail!(
                "WEIR_BIN / --weir-bin {}: no such file; build it with `cargo xtask build`",
                p.display()
            );
        }
        return p
            .canonicalize()
            .with_context(|| format!("WEIR_BIN {}", p.display()));
    }
    let exe = std::env::current_exe().context("finding this executable")?;
    let sibling = exe.with_file_name("weir");
    if sibling.is_file() {
        return Ok(sibling);
    }
    bail!(
        "no weir agent binary next to {}: run the demo with `cargo xtask run`, or set WEIR_BIN",
        exe.display()
    )
}

/// Copies the files of `from` into `to` (created); returns how many.
fn copy_logs(from: &Path, to: &Path) -> Result<usize> {
    std::fs::create_dir_all(to).with_context(|| format!("creating {}", to.display()))?;
    let mut n = 0;
    for e in std::fs::read_dir(from).with_context(|| format!("reading {}", from.display()))? {
        let e = e?;
        if e.file_type()?.is_file() {
            std::fs::copy(e.path(), to.join(e.file_name()))
                .with_context(|| format!("copying {}", e.path().display()))?;
            n += 1;
        }
    }
    Ok(n)
}

fn find_ztunnel(flag: Option<PathBuf>) -> Result<PathBuf> {
    let Some(p) = flag.or_else(ambient::default_ztunnel_bin) else {
        bail!("no ztunnel binary: set WEIR_ZTUNNEL_BIN or --ztunnel-bin");
    };
    if !p.is_file() {
        bail!(
            "no ztunnel binary at {}: build it with `cargo xtask ztunnel` (about 6 minutes the first time), \
             or set WEIR_ZTUNNEL_BIN / --ztunnel-bin",
            p.display()
        );
    }
    Ok(p)
}

fn free_port() -> Result<u16> {
    let l = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .context("finding a free port for /metrics")?;
    Ok(l.local_addr()?.port())
}

pub(crate) fn run(args: DemoArgs) -> Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!(
            "the demo needs root (network namespaces, cgroups, eBPF): run `sudo -E cargo xtask run`, or run it as root"
        );
    }
    install_signal_handlers()?;
    let paths = Paths::new()?;
    check_no_other_demo(&paths)?;
    let weir = if args.cleanup {
        find_weir(args.weir_bin.clone()).ok()
    } else {
        Some(find_weir(args.weir_bin.clone())?)
    };
    let leftovers = teardown(&paths, weir.as_deref(), None);
    if !leftovers.is_empty() {
        println!("removed what an earlier run left behind:");
        for l in &leftovers {
            println!("  - {l}");
        }
    }
    if args.cleanup {
        if leftovers.is_empty() {
            println!("nothing to remove");
        }
        return Ok(());
    }
    let weir = weir.expect("found above");
    let ztunnel = if args.ambient {
        Some(find_ztunnel(args.ztunnel_bin.clone())?)
    } else {
        None
    };
    let metrics_port = match args.metrics_port {
        0 => free_port()?,
        p => p,
    };
    let mut demo = Demo {
        paths,
        weir,
        testkit: std::env::current_exe().context("finding this executable")?,
        ztunnel,
        ztunnel_seen: std::cell::Cell::new(0),
        metrics: SocketAddr::from((Ipv4Addr::LOCALHOST, metrics_port)),
        agent: None,
        procs: Vec::new(),
        torn_down: false,
    };
    match &demo.ztunnel {
        Some(zt) => println!(
            "weir demo (ambient): a Bookinfo node with no iptables rule, captured by {} and served by ztunnel {}",
            demo.weir.display(),
            zt.display()
        ),
        None => println!(
            "weir demo: a Bookinfo node with no iptables rule, captured by {}",
            demo.weir.display()
        ),
    }
    let outcome = run_demo(&mut demo, &args);
    if let Some(dir) = &args.keep_logs {
        match copy_logs(&demo.paths.logs, dir) {
            Ok(n) => println!("\ncopied {n} logs to {}", dir.display()),
            Err(e) => println!("\ncannot copy the logs to {}: {e:#}", dir.display()),
        }
    }
    println!("\nremoving everything:");
    for l in demo.teardown() {
        println!("  - {l}");
    }
    drop(demo);
    match outcome {
        Ok(true) => Ok(()),
        Ok(false) => {
            eprintln!("weir demo: some requests did not go through the expected proxies");
            std::process::exit(1);
        }
        Err(e) if stopping() => {
            eprintln!("weir demo: {e:#}");
            std::process::exit(130);
        }
        Err(e) => Err(e),
    }
}

fn run_demo(demo: &mut Demo, args: &DemoArgs) -> Result<bool> {
    demo.setup()?;
    let mut all_ok = true;
    let mut good = 0;
    for i in 1..=args.requests {
        check_stop()?;
        let ok = demo.request(i, Some(args.requests))?;
        good += u32::from(ok);
        all_ok &= ok;
    }
    if args.ambient {
        println!(
            "\n{good}/{} requests went through ztunnel (HBONE between the pods: the caller's ztunnel \
             outbound, the callee's ztunnel inbound, with mTLS identities, on every hop)",
            args.requests
        );
    } else {
        println!(
            "\n{good}/{} requests went through the expected sidecars (outbound listener of the caller, \
             inbound listener of the callee, on every hop)",
            args.requests
        );
    }
    all_ok &= demo.show_iptables();
    demo.show_state();
    if args.non_interactive {
        return Ok(all_ok);
    }
    let bpffs = demo.paths.bpffs.display().to_string();
    let weir = demo.weir.display().to_string();
    println!(
        "\nThe demo keeps running. In another terminal, as root:\n\
         \x20 ip netns exec {NODE_NS} curl -s http://{}/productpage\n\
         \x20 {weir} status --bpffs {bpffs}\n\
         \x20 {weir} explain --bpffs {bpffs} --pod {NAMESPACE}/productpage-v1 --dst {}\n\
         \x20 curl -s http://{}/metrics | grep ^weir_\n\
         \x20 bpftool prog show name weir_connect4; bpftool cgroup tree {}\n\
         \x20 logs: {}{}\n\
         Press Enter to send another request; Ctrl-C (or SIGTERM) stops and removes everything.",
        PODS[0].addr(),
        PODS[1].addr(),
        demo.metrics,
        demo.paths.pods_cgroup().display(),
        demo.paths.logs.display(),
        if demo.ztunnel.is_some() {
            format!("\n  {}", ambient::hint(&demo.paths.ztunnel_log()))
        } else {
            String::new()
        },
    );
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::stdin().lock().lines() {
            if line.is_err() || tx.send(()).is_err() {
                break;
            }
        }
    });
    let mut n = args.requests;
    while !stopping() {
        match rx.recv_timeout(Duration::from_millis(200)) {
            Ok(()) => {
                n += 1;
                all_ok &= demo.request(n, None)?;
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            // stdin closed: keep running until a signal.
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                std::thread::sleep(Duration::from_millis(200))
            }
        }
        if let Some(agent) = demo.agent.as_mut()
            && let Err(e) = agent.check_alive()
        {
            println!("\n{e:#}");
            return Ok(false);
        }
    }
    println!("\nstopping");
    // Ctrl-C is how the interactive demo ends: not a failure.
    Ok(all_ok)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pod_names_fit() {
        for p in PODS {
            assert!(p.iface.len() <= 15, "{}", p.iface);
            assert!(p.netns().starts_with(NETNS_PREFIX));
            assert!(Pod::by_ip(IpAddr::V4(p.ip)).is_some());
        }
        assert_eq!(
            upstream(Role::Reviews),
            "reviews=198.18.0.12:9080,198.18.0.13:9080,198.18.0.14:9080"
        );
    }

    /// A productpage -> reviews-v2 -> ratings chain, as the logs show it.
    #[test]
    fn hops_are_matched_with_sidecar_logs() {
        let rating = json!({
            "pod": "ratings-v1", "served": {"peer": "127.0.0.6:4003"}, "calls": []
        });
        let reviews = json!({
            "pod": "reviews-v2", "served": {"peer": "127.0.0.6:3003"},
            "calls": [{"service": "ratings", "dst": "198.18.0.15:9080", "local": "198.18.0.13:3100",
                       "peer": "198.18.0.15:9080", "ok": true, "status": 200, "response": rating}]
        });
        let body = json!({
            "pod": "productpage-v1", "ok": true, "served": {"peer": "127.0.0.6:2003"},
            "calls": [{"service": "reviews", "dst": "198.18.0.13:9080", "local": "198.18.0.10:2100",
                       "peer": "198.18.0.13:9080", "ok": true, "status": 200, "response": reviews}]
        });
        let rec = |listener: &str, peer: &str, dst: &str, up: &str| {
            json!({"listener": listener, "listener_port": if listener == "inbound" {15006} else {15001},
                   "peer": peer, "orig_dst": dst, "upstream_local": up})
        };
        let mut logs: BTreeMap<&'static str, Vec<Value>> = BTreeMap::new();
        logs.insert(
            "productpage-v1",
            vec![
                rec(
                    "inbound",
                    "198.18.0.1:1000",
                    "198.18.0.10:9080",
                    "127.0.0.6:2003",
                ),
                rec(
                    "outbound",
                    "198.18.0.10:2100",
                    "198.18.0.13:9080",
                    "198.18.0.10:2101",
                ),
            ],
        );
        logs.insert(
            "reviews-v2",
            vec![
                rec(
                    "inbound",
                    "198.18.0.10:2101",
                    "198.18.0.13:9080",
                    "127.0.0.6:3003",
                ),
                rec(
                    "outbound",
                    "198.18.0.13:3100",
                    "198.18.0.15:9080",
                    "198.18.0.13:3101",
                ),
            ],
        );
        logs.insert(
            "ratings-v1",
            vec![rec(
                "inbound",
                "198.18.0.13:3101",
                "198.18.0.15:9080",
                "127.0.0.6:4003",
            )],
        );
        let entry = HopIn {
            from: None,
            local: "198.18.0.1:1000".into(),
            dst: "198.18.0.10:9080".into(),
            service: "productpage".into(),
            peer: None,
            ok: true,
            error: None,
            response: body,
        };
        let mut hops = Vec::new();
        walk(&entry, &logs, &mut hops);
        assert_eq!(hops.len(), 3);
        assert!(
            hops.iter().all(|h| h.ok),
            "{:?}",
            hops.iter().map(|h| &h.lines).collect::<Vec<_>>()
        );

        // The reviews-v2 -> ratings call bypassed reviews-v2's sidecar.
        logs.get_mut("reviews-v2").unwrap().pop();
        let mut hops = Vec::new();
        walk(&entry, &logs, &mut hops);
        assert!(hops[0].ok && hops[1].ok);
        assert!(!hops[2].ok);
        assert!(
            hops[2].lines.join("\n").contains("not captured"),
            "{:?}",
            hops[2].lines
        );
    }

    #[test]
    fn metrics_sample_keeps_one_pod_and_drops_zeros() {
        let text = "# HELP x\nweir_pods_enrolled 6\nweir_connections_captured_total{direction=\"outbound\",namespace=\"default\",pod=\"productpage-v1\"} 4\nweir_connections_captured_total{direction=\"outbound\",namespace=\"default\",pod=\"details-v1\"} 0\nweir_fail_closed_total{direction=\"inbound\",namespace=\"default\",pod=\"productpage-v1\"} 0\n";
        let s = metrics_sample(text, "productpage-v1");
        assert_eq!(s.len(), 2, "{s:?}");
    }
}
