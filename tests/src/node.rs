//! A test "node": a child cgroup, a private bpffs, a pods file and a running
//! `weir run` agent, plus helpers to run the testkit's sidecar, echo server
//! and client inside pod network namespaces.
//!
//! Everything is torn down on drop: the agent is stopped, `weir uninstall`
//! removes its pins, the cgroup's processes are killed and the bpffs is
//! unmounted.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use nix::sys::signal::Signal;
use serde_json::Value;

use crate::{Bpffs, Cgroup, NetNs, Proc, TempDir, spawn_in, testkit_command, wait_until, weir_bin};

/// One entry of the pods file.
#[derive(Clone, Debug, Default)]
pub struct PodEntry {
    /// Pod name (namespace is always `default`).
    pub name: String,
    /// The pod's network namespace path.
    pub netns: PathBuf,
    /// The pod's addresses.
    pub ips: Vec<String>,
    /// `istio` (default), `linkerd` or `kuma`.
    pub mesh: Option<String>,
    /// Pod annotations.
    pub annotations: BTreeMap<String, String>,
}

impl PodEntry {
    /// An Istio pod in `ns` with `ips`.
    pub fn new(name: &str, ns: &NetNs, ips: &[&str]) -> Self {
        Self {
            name: name.to_string(),
            netns: ns.path().to_path_buf(),
            ips: ips.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        }
    }

    /// Adds an annotation.
    pub fn annotate(mut self, k: &str, v: &str) -> Self {
        self.annotations.insert(k.to_string(), v.to_string());
        self
    }
}

/// The result line of `weir-testkit client`.
#[derive(Clone, Debug)]
pub struct ClientResult {
    /// The whole JSON object.
    pub json: Value,
}

impl ClientResult {
    /// Whether the exchange succeeded.
    pub fn ok(&self) -> bool {
        self.json["ok"].as_bool().unwrap_or(false)
    }
    /// The errno of a failure.
    pub fn errno(&self) -> Option<i64> {
        self.json["errno"].as_i64()
    }
    /// The client's local address (as it saw it).
    pub fn local(&self) -> String {
        self.json["local"].as_str().unwrap_or_default().to_string()
    }
    /// The client's peer address (as `getpeername` answered).
    pub fn peer(&self) -> String {
        self.json["peer"].as_str().unwrap_or_default().to_string()
    }
    /// The echo server's reply, parsed.
    pub fn reply(&self) -> Value {
        let raw = self.json["reply"].as_str().unwrap_or_default();
        serde_json::from_str(raw.trim()).unwrap_or(Value::Null)
    }
}

/// A test node with a running agent.
pub struct Node {
    /// The child cgroup the agent attaches to; pod processes run in it.
    pub cgroup: Cgroup,
    /// Private bpffs for the agent's pins.
    pub bpffs: Bpffs,
    /// Scratch directory (world-writable) for the pods file and logs.
    pub dir: TempDir,
    /// The pods file.
    pub pods_file: PathBuf,
    /// Port of the agent's metrics endpoint.
    pub metrics_port: u16,
    agent: Option<Proc>,
    procs: Vec<Proc>,
    counter: usize,
}

impl Default for Node {
    fn default() -> Self {
        Self::new()
    }
}

impl Node {
    /// A node with an empty pods file and no agent yet.
    pub fn new() -> Node {
        let dir = TempDir::new("node");
        let pods_file = dir.join("pods.yaml");
        std::fs::write(&pods_file, "pods: []\n").expect("writing pods file");
        Node {
            cgroup: Cgroup::new("node"),
            bpffs: Bpffs::new(),
            dir,
            pods_file,
            metrics_port: crate::free_tcp_port(),
            agent: None,
            procs: Vec::new(),
            counter: 0,
        }
    }

    /// A node whose agent attaches to `cgroup` (e.g. a child of another
    /// node's cgroup), with no agent yet.
    pub fn in_cgroup(cgroup: Cgroup) -> Node {
        let mut n = Node::new();
        n.cgroup = cgroup;
        n
    }

    /// A node with a running agent.
    pub fn with_agent() -> Node {
        let mut n = Node::new();
        n.start_agent();
        n
    }

    /// Starts `weir run` on this node and waits until it applied the pods
    /// file once.
    pub fn start_agent(&mut self) {
        self.start_agent_with(&[]);
    }

    /// Like [`Node::start_agent`], with extra `weir run` arguments.
    pub fn start_agent_with(&mut self, extra: &[&str]) {
        let mut cmd = Command::new(weir_bin());
        cmd.env("RUST_LOG", "info")
            .arg("run")
            .arg("--pods-file")
            .arg(&self.pods_file)
            .arg("--cgroup")
            .arg(self.cgroup.path())
            .arg("--bpffs")
            .arg(self.bpffs.path())
            .arg("--metrics-addr")
            .arg(format!("127.0.0.1:{}", self.metrics_port))
            .arg("--reload-ms")
            .arg("50")
            .arg("--resync-secs")
            .arg("1")
            .args(extra);
        let mut p = spawn_in(None, None, cmd);
        p.wait_for_output("pods file applied", Duration::from_secs(20));
        self.agent = Some(p);
    }

    /// Stops the agent with SIGTERM (capture stays pinned).
    pub fn stop_agent(&mut self) {
        if let Some(mut p) = self.agent.take() {
            p.signal(Signal::SIGTERM);
            if p.wait_timeout(Duration::from_secs(10)).is_none() {
                panic!("agent did not stop on SIGTERM:\n{}", p.logs());
            }
        }
    }

    /// Kills the agent with SIGKILL.
    pub fn kill_agent(&mut self) {
        if let Some(mut p) = self.agent.take() {
            p.kill();
        }
    }

    /// The agent's logs so far.
    pub fn agent_logs(&self) -> String {
        self.agent.as_ref().map(Proc::logs).unwrap_or_default()
    }

    /// Writes the pods file (atomically) and waits until exactly these pods
    /// are enrolled.
    pub fn set_pods(&self, pods: &[PodEntry]) {
        self.write_pods_yaml(pods);
        let mut want: Vec<String> = pods.iter().map(|p| p.name.clone()).collect();
        want.sort();
        wait_until(Duration::from_secs(10), "pods enrolled", || {
            self.enrolled() == want
        });
    }

    /// Writes the pods file (atomically) listing `pods`, without waiting.
    pub fn write_pods_yaml(&self, pods: &[PodEntry]) {
        let mut y = String::from("pods:\n");
        for p in pods {
            let _ = writeln!(y, "  - name: {}", p.name);
            let _ = writeln!(y, "    netns: {}", p.netns.display());
            let _ = writeln!(
                y,
                "    ips: [{}]",
                p.ips
                    .iter()
                    .map(|i| format!("'{i}'"))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
            if let Some(m) = &p.mesh {
                let _ = writeln!(y, "    mesh: {m}");
            }
            if !p.annotations.is_empty() {
                let _ = writeln!(y, "    annotations:");
                for (k, v) in &p.annotations {
                    let _ = writeln!(y, "      {k}: {}", serde_json::to_string(v).unwrap());
                }
            }
        }
        self.write_pods_raw(&y);
    }

    /// Waits (10 s at most) until the agent has logged `needle`.
    pub fn wait_log(&self, needle: &str) {
        wait_until(Duration::from_secs(10), needle, || {
            self.agent_logs().contains(needle)
        });
    }

    /// Names of the enrolled pods (`weir status`), sorted.
    pub fn enrolled(&self) -> Vec<String> {
        let mut v: Vec<String> = self.status()["pods"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|p| p["name"].as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default();
        v.sort();
        v
    }

    /// Writes raw pods-file text (atomically, by rename).
    pub fn write_pods_raw(&self, text: &str) {
        let tmp = self.dir.join("pods.yaml.tmp");
        std::fs::write(&tmp, text).expect("writing pods file");
        std::fs::rename(&tmp, &self.pods_file).expect("renaming pods file");
    }

    /// `weir status -o json` against this node's pins.
    pub fn status(&self) -> Value {
        let out = Command::new(weir_bin())
            .args(["status", "-o", "json", "--bpffs"])
            .arg(self.bpffs.path())
            .output()
            .expect("running weir status");
        serde_json::from_slice(&out.stdout).unwrap_or(Value::Null)
    }

    /// Counters of pod `name` from `weir status`.
    pub fn counters(&self, name: &str) -> Value {
        self.status()["pods"]
            .as_array()
            .and_then(|a| a.iter().find(|p| p["name"] == name).cloned())
            .map(|p| p["counters"].clone())
            .unwrap_or(Value::Null)
    }

    /// Fetches `/metrics`.
    pub fn metrics(&self) -> String {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(("127.0.0.1", self.metrics_port))
            .expect("connecting to /metrics");
        s.write_all(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n")
            .unwrap();
        let mut body = String::new();
        s.read_to_string(&mut body).unwrap();
        body
    }

    fn next(&mut self, what: &str) -> PathBuf {
        self.counter += 1;
        self.dir.join(format!("{what}-{}", self.counter))
    }

    /// Runs the testkit sidecar in `pod` as UID 1337 and waits until it
    /// listens. Returns the path of its JSON-lines log.
    pub fn sidecar(&mut self, pod: &NetNs, name: &str) -> PathBuf {
        self.sidecar_with(pod, name, &["--uid", "1337"], &[])
    }

    /// Runs the testkit sidecar with extra global and subcommand args.
    pub fn sidecar_with(
        &mut self,
        pod: &NetNs,
        name: &str,
        global: &[&str],
        args: &[&str],
    ) -> PathBuf {
        let log = self.next("sidecar.log");
        let ready = self.next("ready");
        let mut cmd = testkit_command(global);
        cmd.args(["sidecar", "--name", name, "--log"])
            .arg(&log)
            .arg("--ready-file")
            .arg(&ready)
            .args(args);
        let mut p = spawn_in(Some(pod), Some(&self.cgroup), cmd);
        p.wait_for_file(&ready, Duration::from_secs(10));
        self.procs.push(p);
        log
    }

    /// Runs the testkit echo server in `pod` on `port` as `uid`.
    pub fn echo(&mut self, pod: &NetNs, port: u16, name: &str, uid: u32) {
        let ready = self.next("ready");
        let mut cmd = testkit_command(["--uid", &uid.to_string()]);
        cmd.args([
            "echo",
            "--port",
            &port.to_string(),
            "--name",
            name,
            "--ready-file",
        ])
        .arg(&ready);
        let mut p = spawn_in(Some(pod), Some(&self.cgroup), cmd);
        p.wait_for_file(&ready, Duration::from_secs(10));
        self.procs.push(p);
    }

    /// Runs a long-lived testkit subcommand in `pod` (inside the node
    /// cgroup), appending `--ready-file F` to `args`, and waits for it.
    pub fn daemon(&mut self, pod: &NetNs, args: &[&str]) {
        let ready = self.next("ready");
        let mut cmd = testkit_command(args);
        cmd.arg("--ready-file").arg(&ready);
        let mut p = spawn_in(Some(pod), Some(&self.cgroup), cmd);
        p.wait_for_file(&ready, Duration::from_secs(10));
        self.procs.push(p);
    }

    /// Runs the testkit in `pod` (inside the node cgroup) to completion and
    /// returns its stdout.
    pub fn run_in_pod(&self, pod: &NetNs, args: &[&str]) -> String {
        let mut p = spawn_in(Some(pod), Some(&self.cgroup), testkit_command(args));
        if p.wait_timeout(Duration::from_secs(20)).is_none() {
            panic!("{args:?} did not finish:\n{}", p.logs());
        }
        p.stdout()
    }

    /// Connects from `pod` as `uid` to `dst` and returns the client's
    /// report.
    pub fn client(&self, pod: &NetNs, uid: u32, dst: &str) -> ClientResult {
        self.client_with(pod, &["--uid", &uid.to_string()], dst, &[])
    }

    /// Like [`Node::client`] with extra global and client args.
    pub fn client_with(
        &self,
        pod: &NetNs,
        global: &[&str],
        dst: &str,
        args: &[&str],
    ) -> ClientResult {
        let mut all: Vec<&str> = global.to_vec();
        all.extend(["client", "--connect", dst, "--timeout-ms", "3000"]);
        all.extend(args);
        let out = self.run_in_pod(pod, &all);
        let line = out.lines().last().unwrap_or_default();
        ClientResult {
            json: serde_json::from_str(line)
                .unwrap_or_else(|e| panic!("client output {out:?}: {e}")),
        }
    }
}

/// Reads a sidecar's JSON-lines log.
pub fn sidecar_log(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

impl Drop for Node {
    fn drop(&mut self) {
        if std::thread::panicking()
            && let Some(a) = &self.agent
        {
            eprintln!("--- agent logs ---\n{}", a.logs());
        }
        self.procs.clear();
        if let Some(mut p) = self.agent.take() {
            p.signal(Signal::SIGTERM);
            let _ = p.wait_timeout(Duration::from_secs(5));
        }
        let _ = Command::new(weir_bin())
            .arg("uninstall")
            .arg("--bpffs")
            .arg(self.bpffs.path())
            .output();
    }
}
