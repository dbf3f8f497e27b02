//! The benchmark's node, built once per mode.
//!
//! ```text
//!  node netns (one per mode): bridge br0
//!    ├─ veth ─ pod "a"     198.18.M.2  sidecar            + load generator runs
//!    ├─ veth ─ pod "b"     198.18.M.3  sidecar + server (8080 behind the
//!    │                                  sidecar, 8081 excluded from capture)
//!    ├─ veth ─ pod "r10"   198.18.M.4  sidecar, 10 excluded CIDRs and ports
//!    └─ veth ─ pod "r5000" 198.18.M.5  sidecar, 5,000 excluded CIDRs and ports
//! ```
//!
//! `M` is 1 for direct, 2 for iptables, 3 for weir, 4 for weir with the
//! fast path (`--fast-path`), so the four nodes live side by side and the
//! workloads can alternate between them. The rule scaling pods exist only
//! in the iptables and weir nodes. Every pod process runs in
//! the mode's own child cgroup (the one weir's programs attach to in weir
//! mode), the application as UID 1000 and the sidecar as UID 1337.
//!
//! Every pod gets `tcp_tw_reuse = 1` and a wide ephemeral port range (both
//! per-namespace sysctls), so the connection-rate loops never run out of
//! ports behind their own TIME_WAIT sockets. Nothing outside the namespaces
//! created here is touched.

use std::collections::BTreeMap;
use std::io::Write;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use nix::sys::signal::Signal;
use serde_json::Value;
use weir_tests::istio_iptables::{Family, IstioPod, keys};
use weir_tests::node::{PodEntry, is_fully_captured};
use weir_tests::{Bridge, Cgroup, NetNs, Proc, Veth, spawn_in};

/// UID (and GID) of the applications.
pub const APP_UID: u32 = 1000;
/// UID (and GID) of the sidecars: Istio's proxy user.
pub const PROXY_UID: u32 = 1337;
/// Envoy's virtualOutbound port.
pub const OUTBOUND_PORT: u16 = 15001;
/// Envoy's virtualInbound port.
pub const INBOUND_PORT: u16 = 15006;
/// Direct mode only: a sidecar port that relays to the server's plain port.
pub const DIRECT_UPSTREAM_PORT: u16 = 15002;
/// Direct mode only: a sidecar port that relays to the peer's sidecar.
pub const DIRECT_PEER_PORT: u16 = 15003;
/// Captured connections to this port are answered by the sidecar itself.
pub const RESPOND_PORT: u16 = 80;
/// The server's port behind its sidecar.
pub const SERVER_PORT: u16 = 8080;
/// The server's port excluded from inbound capture.
pub const SERVER_PLAIN_PORT: u16 = 8081;

/// How the node captures traffic.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Mode {
    /// No capture; applications dial the sidecar's ports.
    Direct,
    /// istio-iptables' rules, REDIRECT mode.
    Iptables,
    /// weir.
    Weir,
    /// weir with the socket-level fast path (`weir run --fast-path`).
    WeirFast,
}

impl Mode {
    /// All modes, in table order.
    pub const ALL: [Mode; 4] = [Mode::Direct, Mode::Iptables, Mode::Weir, Mode::WeirFast];

    /// Lower-case name (JSON keys, column headers).
    pub fn name(self) -> &'static str {
        match self {
            Mode::Direct => "direct",
            Mode::Iptables => "iptables",
            Mode::Weir => "weir",
            Mode::WeirFast => "weir_fast",
        }
    }

    /// Column header in the report.
    pub fn title(self) -> &'static str {
        match self {
            Mode::WeirFast => "weir + fast path",
            m => m.name(),
        }
    }

    /// Whether connections are captured (iptables or weir).
    pub fn captures(self) -> bool {
        self != Mode::Direct
    }

    fn subnet(self) -> u8 {
        match self {
            Mode::Direct => 1,
            Mode::Iptables => 2,
            Mode::Weir => 3,
            Mode::WeirFast => 4,
        }
    }
}

/// One pod of the node.
#[derive(Clone, Debug)]
pub struct PodDef {
    /// Pod name.
    pub name: &'static str,
    host: u8,
    /// Runs the application server.
    server: bool,
    /// Excluded outbound CIDRs and ports (each list this long).
    excluded: usize,
}

/// The pods of a node in `mode`; `scale` is the large rule count.
pub fn pod_defs(mode: Mode, scale: usize) -> Vec<PodDef> {
    let mut defs = vec![
        PodDef {
            name: "a",
            host: 2,
            server: false,
            excluded: 0,
        },
        PodDef {
            name: "b",
            host: 3,
            server: true,
            excluded: 0,
        },
    ];
    if matches!(mode, Mode::Iptables | Mode::Weir) {
        defs.push(PodDef {
            name: "r10",
            host: 4,
            server: false,
            excluded: 10,
        });
        defs.push(PodDef {
            name: "rbig",
            host: 5,
            server: false,
            excluded: scale,
        });
    }
    defs
}

/// Settings shared by every node.
pub struct NodeSettings<'a> {
    /// This executable (sidecar, server, load generator).
    pub exe: &'a Path,
    /// The weir agent.
    pub weir: &'a Path,
    /// Parent of the mode's cgroup.
    pub parent_cgroup: &'a Cgroup,
    /// Large rule count for the scaling pod.
    pub scale: usize,
    /// Threads per sidecar listener.
    pub sidecar_threads: usize,
}

/// A running pod.
pub struct Pod {
    /// Its definition.
    pub def: PodDef,
    /// Its address.
    pub ip: Ipv4Addr,
    /// Sidecar and (pod b) server, by name.
    procs: Vec<(&'static str, Proc)>,
    _veth: Veth,
    /// Its network namespace.
    pub ns: NetNs,
}

/// One mode's node. Fields drop in order: the pods (their processes and
/// namespaces), then the shared node (agent, pins, cgroup, files), then
/// the bridge's namespace.
pub struct Node {
    /// The capture mode.
    pub mode: Mode,
    /// Its pods.
    pub pods: Vec<Pod>,
    /// The cgroup every pod process runs in, the scratch directory and,
    /// in the weir modes, the agent and its pins.
    host: weir_tests::node::Node,
    /// The bridge every pod hangs off.
    _bridge: Bridge,
    exe: PathBuf,
}

impl Node {
    /// Builds the node: namespaces, bridge, capture (rules or agent), then
    /// the pod processes, and waits until they all listen.
    pub fn build(mode: Mode, s: &NodeSettings<'_>) -> Result<Node> {
        let mut agent_args = Vec::new();
        if mode == Mode::WeirFast {
            agent_args.push("--fast-path");
        }
        let host = weir_tests::node::Node::builder()
            .name("bench")
            .cgroup(s.parent_cgroup.child(mode.name()))
            .weir(s.weir)
            .agent_args(agent_args)
            .metrics(false)
            .start_timeout(Duration::from_secs(60))
            .build();
        let bridge = Bridge::new("wbn");
        let mut pods = Vec::new();
        for def in pod_defs(mode, s.scale) {
            let ns = NetNs::new("wbp");
            let ip = Ipv4Addr::new(198, 18, mode.subnet(), def.host);
            let veth = bridge.attach(&ns, &format!("{ip}/24"));
            ns.set_sysctls(&[
                ("net/ipv4/tcp_tw_reuse", "1"),
                ("net/ipv4/ip_local_port_range", "10000 65000"),
            ])?;
            pods.push(Pod {
                def,
                ip,
                procs: Vec::new(),
                _veth: veth,
                ns,
            });
        }
        let mut node = Node {
            mode,
            pods,
            host,
            _bridge: bridge,
            exe: s.exe.to_path_buf(),
        };
        match mode {
            Mode::Direct => {}
            Mode::Iptables => node.install_iptables()?,
            // The agent first: weir records the proxy's listeners when they
            // call listen(), so the sidecars start after it.
            Mode::Weir | Mode::WeirFast => node.start_weir()?,
        }
        node.start_processes(s.sidecar_threads)?;
        Ok(node)
    }

    /// The pod named `name`.
    pub fn pod(&self, name: &str) -> &Pod {
        self.pods
            .iter()
            .find(|p| p.def.name == name)
            .unwrap_or_else(|| panic!("no pod {name} in the {} node", self.mode.name()))
    }

    /// The server pod's address.
    pub fn server_ip(&self) -> Ipv4Addr {
        self.pod("b").ip
    }

    /// The weir node's own bpffs (weir modes).
    pub fn bpffs_path(&self) -> Option<&Path> {
        matches!(self.mode, Mode::Weir | Mode::WeirFast).then(|| self.host.bpffs.path())
    }

    /// The fast path's figures from `weir status` (weir modes), e.g. how
    /// many messages went socket to socket.
    pub fn fast_path_status(&self) -> Result<Value> {
        self.bpffs_path().context("not a weir node")?;
        Ok(self.host.try_status()?["fast_path"].take())
    }

    /// The pod as Istio sees it: its address and annotations. The iptables
    /// rules and weir's annotations are both derived from it, by the same
    /// generator as the differential test's.
    fn istio_pod(pod: &Pod) -> IstioPod {
        let mut p = IstioPod::new(&[IpAddr::V4(pod.ip)]);
        if pod.def.server {
            p = p.annotate(keys::EXCLUDE_INBOUND_PORTS, &SERVER_PLAIN_PORT.to_string());
        }
        if pod.def.excluded > 0 {
            let ports: Vec<String> = bench_ports(pod.def.excluded)
                .iter()
                .map(u16::to_string)
                .collect();
            p = p
                .annotate(
                    keys::EXCLUDE_OUTBOUND_IP_RANGES,
                    &bench_cidrs(pod.def.excluded).join(","),
                )
                .annotate(keys::EXCLUDE_OUTBOUND_PORTS, &ports.join(","));
        }
        p
    }

    fn install_iptables(&self) -> Result<()> {
        for pod in &self.pods {
            let config = Self::istio_pod(pod)
                .capture_config()
                .context("the injector would not capture this pod")?;
            let restore = config.restore().map_err(|e| {
                anyhow::anyhow!("istio-iptables would refuse pod {}: {e}", pod.def.name)
            })?;
            let rules = restore.get(Family::V4);
            let mut child = Command::new("ip")
                .args([
                    "netns",
                    "exec",
                    pod.ns.name(),
                    Family::V4.restore_command(),
                    "--noflush",
                ])
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .context("starting iptables-restore (is iptables installed?)")?;
            child
                .stdin
                .take()
                .context("iptables-restore stdin")?
                .write_all(rules.as_bytes())?;
            let out = child.wait_with_output()?;
            ensure!(
                out.status.success(),
                "iptables-restore in pod {} failed: {}",
                pod.def.name,
                String::from_utf8_lossy(&out.stderr)
            );
            let saved = pod.ns.exec_ok(&[Family::V4.save_command()]);
            let n = saved.lines().filter(|l| l.starts_with("-A ")).count();
            let want = rules.lines().filter(|l| l.starts_with("-A ")).count();
            ensure!(
                n == want,
                "pod {}: iptables-save shows {n} rules, wrote {want}",
                pod.def.name
            );
        }
        Ok(())
    }

    /// The pods file's entries: every pod, in namespace `bench`, with
    /// the annotations Istio's injector would give it.
    fn pod_entries(&self) -> Vec<PodEntry> {
        self.pods
            .iter()
            .map(|pod| {
                PodEntry::at(pod.def.name, pod.ns.path(), &[&pod.ip.to_string()])
                    .namespace("bench")
                    .annotate_all(Self::istio_pod(pod).weir_annotations())
            })
            .collect()
    }

    fn start_weir(&mut self) -> Result<()> {
        self.host.write_pods_yaml(&self.pod_entries());
        self.host.try_start_agent()?;
        let status = self.host.try_status()?;
        for pod in &self.pods {
            let found = status["pods"].as_array().and_then(|pods| {
                pods.iter()
                    .find(|p| p["name"] == pod.def.name && p["namespace"] == "bench")
            });
            let ok = found.is_some_and(is_fully_captured);
            if !ok {
                bail!(
                    "weir did not enroll pod {} (status: {found:?})\n{}",
                    pod.def.name,
                    self.host.agent_logs()
                );
            }
        }
        Ok(())
    }

    fn start_processes(&mut self, threads: usize) -> Result<()> {
        let server = self.server_ip();
        let threads = threads.to_string();
        for i in 0..self.pods.len() {
            let pod_ip = self.pods[i].ip;
            let ready = self
                .host
                .dir
                .join(format!("{}-sidecar.ready", self.pods[i].def.name));
            let listen = [
                format!("{OUTBOUND_PORT}:out:respond"),
                format!("{DIRECT_UPSTREAM_PORT}:out:{server}:{SERVER_PLAIN_PORT}"),
                format!("{DIRECT_PEER_PORT}:out:{server}:{INBOUND_PORT}"),
                format!("{INBOUND_PORT}:in:{pod_ip}:{SERVER_PORT}"),
            ];
            let mut cmd = Command::new(&self.exe);
            cmd.args(["--uid", &PROXY_UID.to_string(), "sidecar"]);
            for l in &listen {
                cmd.args(["--listen", l]);
            }
            cmd.args(["--respond-port", &RESPOND_PORT.to_string()])
                .args(["--threads", &threads])
                .arg("--ready-file")
                .arg(&ready);
            let mut p = spawn_in(Some(&self.pods[i].ns), Some(&self.host.cgroup), cmd);
            p.wait_for_file(&ready, Duration::from_secs(20));
            self.pods[i].procs.push(("sidecar", p));
            if self.pods[i].def.server {
                let ready = self.host.dir.join("server.ready");
                let mut cmd = Command::new(&self.exe);
                cmd.args(["--uid", &APP_UID.to_string(), "server"])
                    .args(["--port", &SERVER_PORT.to_string()])
                    .args(["--port", &SERVER_PLAIN_PORT.to_string()])
                    .args(["--threads", &threads])
                    .arg("--ready-file")
                    .arg(&ready);
                let mut p = spawn_in(Some(&self.pods[i].ns), Some(&self.host.cgroup), cmd);
                p.wait_for_file(&ready, Duration::from_secs(20));
                self.pods[i].procs.push(("server", p));
            }
        }
        Ok(())
    }

    /// Runs the load generator in pod `pod` as the application user with
    /// `args` (after `load`), and returns its JSON result.
    pub fn run_load(&self, pod: &str, args: &[String], timeout: Duration) -> Result<Value> {
        let pod = self.pod(pod);
        let mut cmd = Command::new(&self.exe);
        cmd.args(["--uid", &APP_UID.to_string(), "load"]).args(args);
        let mut p = spawn_in(Some(&pod.ns), Some(&self.host.cgroup), cmd);
        match p.wait_timeout(timeout) {
            None => {
                p.kill();
                bail!(
                    "{} load in pod {} did not finish within {timeout:?}\n{}",
                    self.mode.name(),
                    pod.def.name,
                    p.logs()
                );
            }
            Some(st) if !st.success() => bail!(
                "{} load in pod {} failed ({st})\n{}",
                self.mode.name(),
                pod.def.name,
                p.logs()
            ),
            Some(_) => {}
        }
        let out = p.stdout();
        let line = out.lines().last().unwrap_or_default();
        serde_json::from_str(line)
            .with_context(|| format!("load generator printed {line:?}\n{}", p.logs()))
    }

    /// Pins every thread of the pod processes (sidecars, server) to `cpu`
    /// (or lets them run anywhere, `None`) and gives them the nice value
    /// `nice`.
    pub fn pin(&self, cpu: Option<usize>, nice: i32) -> Result<()> {
        for pod in &self.pods {
            for (name, p) in &pod.procs {
                let tasks = format!("/proc/{}/task", p.pid());
                for entry in
                    std::fs::read_dir(&tasks).with_context(|| format!("reading {tasks}"))?
                {
                    let tid: i32 = entry?.file_name().to_string_lossy().parse()?;
                    let tid = nix::unistd::Pid::from_raw(tid);
                    crate::pin_to(tid, cpu)
                        .and_then(|()| crate::set_nice(tid, nice))
                        .with_context(|| {
                            format!(
                                "pinning {} {name} of the {} node",
                                pod.def.name,
                                self.mode.name()
                            )
                        })?;
                }
            }
        }
        Ok(())
    }

    /// Stops the sidecars and servers (SIGTERM) and returns what each
    /// counted, as `pod/process -> counters`.
    pub fn stop_processes(&mut self) -> BTreeMap<String, Value> {
        let mut out = BTreeMap::new();
        for pod in &mut self.pods {
            for (name, p) in &mut pod.procs {
                p.signal(Signal::SIGTERM);
                let key = format!("{}/{name}", pod.def.name);
                let value = match p.wait_timeout(Duration::from_secs(5)) {
                    Some(_) => p
                        .stdout()
                        .lines()
                        .last()
                        .and_then(|l| serde_json::from_str(l).ok())
                        .unwrap_or(Value::Null),
                    None => Value::Null,
                };
                out.insert(key, value);
            }
        }
        out
    }

    /// Where the mode's destinations for a workload are.
    pub fn target(&self, route: Route) -> SocketAddr {
        let server = self.server_ip();
        let local = Ipv4Addr::LOCALHOST;
        let addr = match (self.mode, route) {
            (Mode::Direct, Route::OwnSidecar) => (local, OUTBOUND_PORT),
            (Mode::Direct, Route::Upstream) => (local, DIRECT_UPSTREAM_PORT),
            (Mode::Direct, Route::FullPath) => (local, DIRECT_PEER_PORT),
            (_, Route::OwnSidecar) => (server, RESPOND_PORT),
            (_, Route::Upstream) => (server, SERVER_PLAIN_PORT),
            (_, Route::FullPath) => (server, SERVER_PORT),
        };
        SocketAddr::from(addr)
    }
}

/// Which path a workload's connections take.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Route {
    /// Application -> its own sidecar, which answers.
    OwnSidecar,
    /// Application -> its sidecar -> the server's port excluded from
    /// capture (one proxy).
    Upstream,
    /// Application -> its sidecar -> the server's sidecar -> the server.
    FullPath,
}

/// `n` distinct /30 blocks inside 198.19.0.0/16 (benchmark space, never
/// routed anywhere): the excluded CIDRs of the rule-scaling pods.
pub fn bench_cidrs(n: usize) -> Vec<String> {
    (0..n)
        .map(|i| {
            let block = i * 4;
            format!("198.19.{}.{}/30", block / 256, block % 256)
        })
        .collect()
}

/// `n` distinct ports from 20000 up: the excluded ports of the
/// rule-scaling pods (none of them is a port the workloads use).
pub fn bench_ports(n: usize) -> Vec<u16> {
    (0..n).map(|i| 20000 + i as u16).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capture_modes_have_the_scaling_pods() {
        let names = |m| pod_defs(m, 5000).iter().map(|d| d.name).collect::<Vec<_>>();
        assert_eq!(names(Mode::Direct), ["a", "b"]);
        assert_eq!(names(Mode::Weir), ["a", "b", "r10", "rbig"]);
        assert_eq!(names(Mode::WeirFast), ["a", "b"]);
        assert_eq!(pod_defs(Mode::Iptables, 5000)[3].excluded, 5000);
    }

    #[test]
    fn bench_lists_are_distinct_and_in_benchmark_space() {
        let cidrs = bench_cidrs(5000);
        let unique: std::collections::BTreeSet<_> = cidrs.iter().collect();
        assert_eq!(unique.len(), 5000);
        assert_eq!(cidrs[64], "198.19.1.0/30");
        assert!(cidrs.iter().all(|c| c.starts_with("198.19.")));
        let ports = bench_ports(5000);
        assert_eq!((ports[0], ports[4999]), (20000, 24999));
    }
}
