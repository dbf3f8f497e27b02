//! The soak's node: a child cgroup, a private bpffs, a pods file and a
//! `weir run` agent that can be killed and restarted at will; the pods'
//! network (a bridge in a "node" namespace, one veth per pod); and cheap
//! network namespaces for pod churn.
//!
//! Every object is a guard: dropping the node stops its agent, runs `weir
//! uninstall` on its bpffs, kills what is left in its cgroup, unmounts the
//! bpffs and removes its files.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use nix::mount::{MntFlags, MsFlags, mount, umount2};
use nix::sched::{CloneFlags, unshare};
use serde_json::Value;
use weir_tests::{Bpffs, Cgroup, NetNs, Proc, TempDir, Veth, spawn_in, veth_pair};

use crate::proto::interrupted;

/// One pod of the pods file.
#[derive(Clone, Debug)]
pub struct PodSpec {
    /// Pod name (namespace `soak`).
    pub name: String,
    /// Its network namespace file.
    pub netns: PathBuf,
    /// Its addresses.
    pub ips: Vec<IpAddr>,
}

/// The pods file text for `pods`.
pub fn pods_yaml(pods: &[PodSpec]) -> String {
    let mut y = String::with_capacity(64 + pods.len() * 120);
    y.push_str("pods:\n");
    for p in pods {
        let ips: Vec<String> = p.ips.iter().map(|i| format!("'{i}'")).collect();
        y.push_str(&format!(
            "  - name: {}\n    namespace: soak\n    netns: {}\n    ips: [{}]\n",
            p.name,
            p.netns.display(),
            ips.join(", ")
        ));
    }
    y
}

/// The running agent and the log it writes.
struct Agent {
    child: Child,
    log: PathBuf,
    /// How far the log has been read.
    offset: u64,
}

/// The node: cgroup, bpffs, pods file, agent.
pub struct SoakNode {
    /// The cgroup weir attaches to; every pod process runs in it.
    pub cgroup: Cgroup,
    /// The agent's bpffs.
    pub bpffs: Bpffs,
    /// Scratch directory (pods file, logs, markers), world-writable.
    pub dir: TempDir,
    pods_file: PathBuf,
    weir: PathBuf,
    agent_args: Vec<String>,
    agent: Option<Agent>,
    starts: usize,
    changes: usize,
    /// Port of the agent's `/metrics` on 127.0.0.1, when enabled.
    pub metrics_port: Option<u16>,
}

impl SoakNode {
    /// A node with an empty pods file and no agent yet. `agent_args` are
    /// added to every `weir run`; `metrics` enables `/metrics`.
    pub fn new(weir: &Path, name: &str, agent_args: &[String], metrics: bool) -> Result<SoakNode> {
        let dir = TempDir::new(name);
        let pods_file = dir.join("pods.yaml");
        std::fs::write(&pods_file, "pods: []\n")?;
        Ok(SoakNode {
            cgroup: Cgroup::new(name),
            bpffs: Bpffs::new(),
            dir,
            pods_file,
            weir: weir.to_path_buf(),
            agent_args: agent_args.to_vec(),
            agent: None,
            starts: 0,
            changes: 0,
            metrics_port: metrics.then(weir_tests::free_tcp_port),
        })
    }

    /// Starts `weir run` (without waiting for it).
    pub fn spawn_agent(&mut self) -> Result<()> {
        ensure!(self.agent.is_none(), "an agent is already running");
        self.starts += 1;
        let log = self.dir.join(format!("agent-{}.log", self.starts));
        let metrics = match self.metrics_port {
            Some(p) => format!("127.0.0.1:{p}"),
            None => "off".to_string(),
        };
        let child = Command::new(&self.weir)
            .env("RUST_LOG", "info")
            .arg("run")
            .arg("--pods-file")
            .arg(&self.pods_file)
            .arg("--cgroup")
            .arg(self.cgroup.path())
            .arg("--bpffs")
            .arg(self.bpffs.path())
            .args(["--metrics-addr", &metrics])
            .args(&self.agent_args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(File::create(&log)?)
            .spawn()
            .with_context(|| format!("starting {}", self.weir.display()))?;
        self.agent = Some(Agent {
            child,
            log,
            offset: 0,
        });
        Ok(())
    }

    /// Starts the agent and waits until it applied the pods file once.
    pub fn start_agent(&mut self) -> Result<u64> {
        self.spawn_agent()?;
        self.wait_applied(Duration::from_secs(60))
            .context("the agent's first apply")
    }

    /// Kills the agent with SIGKILL (capture stays pinned).
    pub fn kill_agent(&mut self) {
        if let Some(mut a) = self.agent.take() {
            let _ = a.child.kill();
            let _ = a.child.wait();
        }
    }

    /// Stops the agent with SIGTERM.
    pub fn stop_agent(&mut self) {
        if let Some(mut a) = self.agent.take() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(a.child.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = a.child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            let _ = a.child.kill();
            let _ = a.child.wait();
        }
    }

    /// The agent's process id.
    pub fn agent_pid(&self) -> Option<u32> {
        self.agent.as_ref().map(|a| a.child.id())
    }

    /// Open file descriptors of the agent.
    pub fn agent_fds(&self) -> Option<usize> {
        let pid = self.agent_pid()?;
        std::fs::read_dir(format!("/proc/{pid}/fd"))
            .ok()
            .map(|d| d.count())
    }

    /// The agent's VmRSS, KiB.
    pub fn agent_rss_kib(&self) -> Option<u64> {
        let pid = self.agent_pid()?;
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
    }

    /// Lines of every agent log so far that contain `needle`.
    pub fn agent_log_lines(&self, needle: &str) -> Vec<String> {
        let mut out = Vec::new();
        for n in 1..=self.starts {
            let text = std::fs::read_to_string(self.dir.join(format!("agent-{n}.log")))
                .unwrap_or_default();
            out.extend(
                text.lines()
                    .filter(|l| l.contains(needle))
                    .map(str::to_string),
            );
        }
        out
    }

    /// Skips everything the agent logged so far (see [`Self::wait_applied`]).
    pub fn mark(&mut self) {
        if let Some(a) = &mut self.agent {
            a.offset = std::fs::metadata(&a.log).map_or(0, |m| m.len());
        }
    }

    /// Waits for the next `pods file applied in N ms` after the mark; returns N.
    pub fn wait_applied(&mut self, timeout: Duration) -> Result<u64> {
        let needle = "pods file applied in ";
        let deadline = Instant::now() + timeout;
        let Some(a) = &mut self.agent else {
            bail!("no agent running");
        };
        let mut text = String::new();
        loop {
            let mut f = File::open(&a.log)?;
            f.seek(SeekFrom::Start(a.offset))?;
            text.clear();
            f.read_to_string(&mut text)?;
            if let Some(at) = text.find(needle) {
                let rest = &text[at + needle.len()..];
                let ms = rest
                    .split_whitespace()
                    .next()
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0);
                let end = rest
                    .find('\n')
                    .map_or(text.len(), |e| at + needle.len() + e);
                a.offset += end as u64;
                return Ok(ms);
            }
            if let Some(end) = text.rfind('\n') {
                a.offset += end as u64 + 1;
            }
            if let Some(status) = a.child.try_wait()? {
                bail!(
                    "the agent exited ({status}):\n{}",
                    std::fs::read_to_string(&a.log).unwrap_or_default()
                );
            }
            if interrupted() {
                bail!("interrupted");
            }
            if Instant::now() > deadline {
                let log = std::fs::read_to_string(&a.log).unwrap_or_default();
                let lines: Vec<&str> = log.lines().collect();
                bail!(
                    "no `{needle}` within {timeout:?}; the agent's last log lines:\n{}",
                    lines[lines.len().saturating_sub(20)..].join("\n")
                );
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// Writes the pods file (atomically) without waiting. Each write
    /// starts with a numbered comment, so the agent sees a change (and
    /// logs its apply) even when the pods are the same: what changed may
    /// be outside the file (a network namespace deleted or re-created).
    pub fn write_pods(&mut self, pods: &[PodSpec]) -> Result<()> {
        self.changes += 1;
        let tmp = self.dir.join("pods.yaml.tmp");
        std::fs::write(
            &tmp,
            format!("# change {}\n{}", self.changes, pods_yaml(pods)),
        )?;
        std::fs::rename(&tmp, &self.pods_file)?;
        Ok(())
    }

    /// Writes the pods file and waits until the agent applied it; returns
    /// the apply time the agent logged (ms).
    pub fn set_pods(&mut self, pods: &[PodSpec]) -> Result<u64> {
        self.mark();
        self.write_pods(pods)?;
        self.wait_applied(Duration::from_secs(120))
    }

    /// `weir status -o json`.
    pub fn status(&self) -> Result<Value> {
        let out = Command::new(&self.weir)
            .args(["status", "-o", "json", "--bpffs"])
            .arg(self.bpffs.path())
            .output()
            .context("running weir status")?;
        ensure!(
            out.status.success(),
            "weir status: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).context("weir status -o json")
    }

    /// The counters of pod `name` from `weir status`.
    pub fn pod_counters(&self, name: &str) -> Result<Value> {
        let s = self.status()?;
        Ok(s["pods"]
            .as_array()
            .and_then(|a| a.iter().find(|p| p["name"] == name).cloned())
            .map(|p| p["counters"].clone())
            .unwrap_or(Value::Null))
    }

    /// The body of `/metrics`.
    pub fn metrics(&self) -> Result<String> {
        let port = self.metrics_port.context("metrics are off on this node")?;
        let mut s = std::net::TcpStream::connect(("127.0.0.1", port))?;
        s.set_read_timeout(Some(Duration::from_secs(30)))?;
        s.write_all(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n")?;
        let mut body = String::new();
        s.read_to_string(&mut body)?;
        Ok(body)
    }

    /// Runs this binary (`exe args…`) in `netns` inside the node's cgroup.
    pub fn spawn(&self, exe: &Path, netns: Option<&NetNs>, args: &[String]) -> Proc {
        let mut cmd = Command::new(exe);
        cmd.args(args);
        spawn_in(netns, Some(&self.cgroup), cmd)
    }

    /// A fresh marker path in the node's directory.
    pub fn marker(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }
}

impl Drop for SoakNode {
    fn drop(&mut self) {
        self.stop_agent();
        let _ = Command::new(&self.weir)
            .arg("uninstall")
            .arg("--bpffs")
            .arg(self.bpffs.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// The value of a Prometheus series: `name{labels}` exactly as the agent
/// prints it (labels in its order), or `name` alone.
pub fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|l| {
        let rest = l.strip_prefix(series)?;
        rest.strip_prefix(' ')?.trim().parse().ok()
    })
}

/// Per-namespace sysctls every soak pod gets: TIME_WAIT reuse, the whole
/// ephemeral port range, long listen queues.
pub fn tune_netns(ns: &NetNs) -> Result<()> {
    ns.run_in(|| -> Result<()> {
        for (key, value) in [
            ("net/ipv4/tcp_tw_reuse", "1"),
            ("net/ipv4/ip_local_port_range", "1024 65535"),
            ("net/core/somaxconn", "65535"),
            ("net/ipv4/tcp_max_syn_backlog", "65535"),
        ] {
            let path = Path::new("/proc/sys").join(key);
            std::fs::write(&path, value).with_context(|| format!("writing {}", path.display()))?;
        }
        Ok(())
    })
}

/// A pod on the [`Lan`].
pub struct LanPod {
    /// Its name.
    pub name: String,
    /// Its address.
    pub ip: Ipv4Addr,
    veth: Veth,
    /// Its network namespace.
    pub ns: NetNs,
}

impl LanPod {
    /// The pods-file entry for this pod.
    pub fn spec(&self) -> PodSpec {
        PodSpec {
            name: self.name.clone(),
            netns: self.ns.path().to_path_buf(),
            ips: vec![IpAddr::V4(self.ip)],
        }
    }

    /// `ip:port` of this pod.
    pub fn addr(&self, port: u16) -> SocketAddr {
        SocketAddr::from((self.ip, port))
    }
}

/// Pods on one bridge in a "node" namespace, 198.18.`subnet`.0/24.
pub struct Lan {
    /// The pods.
    pub pods: Vec<LanPod>,
    subnet: u8,
    node_ns: NetNs,
}

impl Lan {
    /// An empty bridge.
    pub fn new(subnet: u8) -> Lan {
        let node_ns = NetNs::new("wsn");
        node_ns.ip(&["link", "add", "br0", "type", "bridge"]);
        node_ns.ip(&["link", "set", "br0", "up"]);
        Lan {
            pods: Vec::new(),
            subnet,
            node_ns,
        }
    }

    /// Adds pod `name` with address 198.18.`subnet`.`host`.
    pub fn add(&mut self, name: &str, host: u8) -> Result<&LanPod> {
        let ns = NetNs::new("wsp");
        let ip = Ipv4Addr::new(198, 18, self.subnet, host);
        let veth = veth_pair(&ns, &[&format!("{ip}/24")], &self.node_ns, &[]);
        self.node_ns
            .ip(&["link", "set", veth.b_name(), "master", "br0"]);
        tune_netns(&ns)?;
        self.pods.push(LanPod {
            name: name.to_string(),
            ip,
            veth,
            ns,
        });
        Ok(self.pods.last().expect("just pushed"))
    }

    /// The pod named `name`.
    pub fn pod(&self, name: &str) -> &LanPod {
        self.pods
            .iter()
            .find(|p| p.name == name)
            .unwrap_or_else(|| panic!("no pod {name}"))
    }

    /// Changes pod `name`'s address to 198.18.`subnet`.`host` (the old one
    /// is removed from its interface).
    pub fn readdress(&mut self, name: &str, host: u8) -> Result<Ipv4Addr> {
        let subnet = self.subnet;
        let pod = self
            .pods
            .iter_mut()
            .find(|p| p.name == name)
            .with_context(|| format!("no pod {name}"))?;
        let new = Ipv4Addr::new(198, 18, subnet, host);
        let dev = pod.veth.a_name().to_string();
        // The old one first: deleting a subnet's primary address would
        // take the new (secondary) one with it.
        pod.ns
            .ip(&["addr", "del", &format!("{}/24", pod.ip), "dev", &dev]);
        pod.ns
            .ip(&["addr", "add", &format!("{new}/24"), "dev", &dev]);
        pod.ip = new;
        Ok(new)
    }
}

/// A network namespace kept alive by a bind mount on a plain file (what
/// `ip netns add` does, without starting `ip`): pod churn makes thousands.
/// Dropping it unmounts the file; the namespace goes once no process is
/// left in it.
pub struct NsFile {
    path: PathBuf,
    mounted: bool,
}

impl NsFile {
    /// A new network namespace bound on `path` (created).
    pub fn create(path: &Path) -> Result<NsFile> {
        File::create(path).with_context(|| format!("creating {}", path.display()))?;
        let mut ns = NsFile {
            path: path.to_path_buf(),
            mounted: false,
        };
        let target = path.to_path_buf();
        // unshare() moves only the calling thread: a short-lived thread
        // makes the namespace, the process stays where it is.
        std::thread::spawn(move || -> Result<()> {
            unshare(CloneFlags::CLONE_NEWNET).context("unshare(CLONE_NEWNET)")?;
            mount(
                Some("/proc/thread-self/ns/net"),
                &target,
                None::<&str>,
                MsFlags::MS_BIND,
                None::<&str>,
            )
            .with_context(|| format!("bind-mounting a netns on {}", target.display()))
        })
        .join()
        .map_err(|_| anyhow::anyhow!("netns thread panicked"))??;
        ns.mounted = true;
        Ok(ns)
    }

    /// The namespace file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Unmounts and removes the file: the pod's network namespace is
    /// deleted (as `ip netns del` does).
    pub fn delete(&mut self) {
        if self.mounted {
            let _ = umount2(&self.path, MntFlags::MNT_DETACH);
            self.mounted = false;
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

impl Drop for NsFile {
    fn drop(&mut self) {
        self.delete();
    }
}
