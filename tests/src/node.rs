//! A test "node": a child cgroup, a private bpffs, a pods file and a running
//! `weir run` agent, plus helpers to run the testkit's sidecar, echo server
//! and client inside pod network namespaces.
//!
//! Everything is torn down on drop: the agent is stopped, `weir uninstall`
//! removes its pins, the cgroup's processes are killed and the bpffs is
//! unmounted.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use nix::sys::signal::Signal;
use serde_json::Value;

pub use crate::podsfile::PodEntry;
use crate::podsfile::{pods_yaml, write_atomically};
use crate::{Bpffs, Cgroup, NetNs, Proc, TempDir, spawn_in, testkit_command, wait_until, weir_bin};

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
    /// What `getpeername` answered after the reply's end (the other side
    /// had closed first).
    pub fn peer_after_eof(&self) -> String {
        self.json["peer_after_eof"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    }
    /// The echo server's reply, parsed.
    pub fn reply(&self) -> Value {
        let raw = self.json["reply"].as_str().unwrap_or_default();
        serde_json::from_str(raw.trim()).unwrap_or(Value::Null)
    }
}

/// The `weir run` line the agent logs after each apply of the pods file,
/// followed by the time it took (`pods file applied in N ms`).
pub const APPLIED: &str = "pods file applied in ";

/// How a [`Node`] is made: which cgroup, which agent binary and flags,
/// whether `/metrics` is served. [`Node::builder`] starts one with the
/// kernel tests' settings.
pub struct NodeBuilder {
    prefix: String,
    cgroup: Option<Cgroup>,
    weir: Option<PathBuf>,
    agent_args: Vec<String>,
    metrics: bool,
    launcher: Option<Launcher>,
    start_timeout: Duration,
    stop: Option<fn() -> bool>,
}

/// Makes the command that runs the agent binary (see
/// [`NodeBuilder::agent_launcher`]).
type Launcher = Box<dyn Fn(&Path) -> Command + Send + Sync>;

impl NodeBuilder {
    /// Prefix of the node's cgroup and scratch directory names (`node`).
    pub fn name(mut self, prefix: &str) -> Self {
        self.prefix = prefix.to_string();
        self
    }

    /// The cgroup the agent attaches to and pod processes run in (by
    /// default a new one under the cgroup2 mount).
    pub fn cgroup(mut self, cgroup: Cgroup) -> Self {
        self.cgroup = Some(cgroup);
        self
    }

    /// The agent binary (by default [`weir_bin`]).
    pub fn weir(mut self, weir: &Path) -> Self {
        self.weir = Some(weir.to_path_buf());
        self
    }

    /// The `weir run` flags every start of the agent gets, after the
    /// node's own (`--pods-file`, `--cgroup`, `--bpffs`, `--metrics-addr`).
    /// Replaces the default, `--reload-ms 50 --resync-secs 1`.
    pub fn agent_args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.agent_args = args.into_iter().map(Into::into).collect();
        self
    }

    /// Whether the agent serves `/metrics` on a free port of 127.0.0.1
    /// (default) or not at all (`--metrics-addr off`).
    pub fn metrics(mut self, on: bool) -> Self {
        self.metrics = on;
        self
    }

    /// How the agent binary is started: `launch(weir)` returns the command
    /// that runs it (for example inside a memory cgroup); the node adds
    /// the arguments.
    pub fn agent_launcher(
        mut self,
        launch: impl Fn(&Path) -> Command + Send + Sync + 'static,
    ) -> Self {
        self.launcher = Some(Box::new(launch));
        self
    }

    /// How long a start of the agent may take to apply the pods file once
    /// (20 s, times [`crate::patience`]).
    pub fn start_timeout(mut self, timeout: Duration) -> Self {
        self.start_timeout = timeout;
        self
    }

    /// A check that ends every wait for the agent early with an error
    /// (an interrupted benchmark or soak).
    pub fn stop_when(mut self, stop: fn() -> bool) -> Self {
        self.stop = Some(stop);
        self
    }

    /// The node, with an empty pods file and no agent yet.
    pub fn build(self) -> Node {
        let dir = TempDir::new(&self.prefix);
        let pods_file = dir.join("pods.yaml");
        std::fs::write(&pods_file, crate::podsfile::pods_yaml(&[])).expect("writing pods file");
        Node {
            cgroup: self.cgroup.unwrap_or_else(|| Cgroup::new(&self.prefix)),
            bpffs: Bpffs::new(),
            dir,
            pods_file,
            metrics_port: crate::free_tcp_port(),
            metrics: self.metrics,
            weir: self.weir.unwrap_or_else(weir_bin),
            agent_args: self.agent_args,
            launcher: self.launcher,
            start_timeout: self.start_timeout,
            stop: self.stop,
            agent: None,
            log_offset: 0,
            old_agents: Vec::new(),
            procs: Vec::new(),
            counter: 0,
            changes: 0,
        }
    }

    /// The node with its agent started (see [`Node::start_agent`]).
    pub fn start(self) -> Node {
        let mut n = self.build();
        n.start_agent();
        n
    }
}

/// A test node: a cgroup, a private bpffs, a scratch directory with the
/// pods file, and a `weir run` agent that can be started, killed and
/// restarted. The kernel tests, the benchmark and the soak all use it.
pub struct Node {
    /// The child cgroup the agent attaches to; pod processes run in it.
    pub cgroup: Cgroup,
    /// Private bpffs for the agent's pins.
    pub bpffs: Bpffs,
    /// Scratch directory (world-writable) for the pods file and logs.
    pub dir: TempDir,
    /// The pods file.
    pub pods_file: PathBuf,
    /// Port of the agent's metrics endpoint (unused when metrics are off).
    pub metrics_port: u16,
    metrics: bool,
    weir: PathBuf,
    agent_args: Vec<String>,
    launcher: Option<Launcher>,
    start_timeout: Duration,
    stop: Option<fn() -> bool>,
    agent: Option<Proc>,
    /// How far the current agent's log has been read (see [`Node::mark`]).
    log_offset: u64,
    /// Agents killed or stopped earlier (their logs stay readable).
    old_agents: Vec<Proc>,
    procs: Vec<Proc>,
    counter: usize,
    changes: usize,
}

impl Default for Node {
    fn default() -> Self {
        Self::new()
    }
}

impl Node {
    /// A builder with the kernel tests' settings: a new cgroup, the agent
    /// from [`weir_bin`] with `--reload-ms 50 --resync-secs 1`, metrics on.
    pub fn builder() -> NodeBuilder {
        NodeBuilder {
            prefix: "node".to_string(),
            cgroup: None,
            weir: None,
            agent_args: ["--reload-ms", "50", "--resync-secs", "1"]
                .map(String::from)
                .to_vec(),
            metrics: true,
            launcher: None,
            start_timeout: Duration::from_secs(20),
            stop: None,
        }
    }

    /// A node with an empty pods file and no agent yet.
    pub fn new() -> Node {
        Node::builder().build()
    }

    /// A node whose agent attaches to `cgroup` (e.g. a child of another
    /// node's cgroup), with no agent yet.
    pub fn in_cgroup(cgroup: Cgroup) -> Node {
        Node::builder().cgroup(cgroup).build()
    }

    /// A node with a running agent.
    pub fn with_agent() -> Node {
        Node::builder().start()
    }

    /// The agent binary this node runs.
    pub fn weir(&self) -> &Path {
        &self.weir
    }

    /// `127.0.0.1:PORT` of `/metrics`, or `off`.
    pub fn metrics_addr(&self) -> String {
        if self.metrics {
            format!("127.0.0.1:{}", self.metrics_port)
        } else {
            "off".to_string()
        }
    }

    /// Starts `weir run` on this node and waits until it applied the pods
    /// file once.
    pub fn start_agent(&mut self) {
        self.start_agent_with(&[]);
    }

    /// Like [`Node::start_agent`], with extra `weir run` arguments.
    pub fn start_agent_with(&mut self, extra: &[&str]) {
        if let Err(e) = self.try_start_agent_with(extra) {
            panic!("{e:#}\n{}", self.agent_logs());
        }
    }

    /// Like [`Node::start_agent`], returning an error instead of
    /// panicking; on success the apply time the agent logged (ms).
    pub fn try_start_agent(&mut self) -> anyhow::Result<u64> {
        self.try_start_agent_with(&[])
    }

    /// Like [`Node::try_start_agent`], with extra `weir run` arguments.
    pub fn try_start_agent_with(&mut self, extra: &[&str]) -> anyhow::Result<u64> {
        self.spawn_agent_with(extra);
        let (ms, _) = self.wait_applied(self.start_timeout)?;
        Ok(ms)
    }

    /// Starts `weir run` without waiting for it.
    pub fn spawn_agent(&mut self) {
        self.spawn_agent_with(&[]);
    }

    /// Like [`Node::spawn_agent`], with extra `weir run` arguments.
    pub fn spawn_agent_with(&mut self, extra: &[&str]) {
        assert!(self.agent.is_none(), "an agent is already running");
        let mut cmd = match &self.launcher {
            Some(launch) => launch(&self.weir),
            None => Command::new(&self.weir),
        };
        cmd.env("RUST_LOG", "info")
            .arg("run")
            .arg("--pods-file")
            .arg(&self.pods_file)
            .arg("--cgroup")
            .arg(self.cgroup.path())
            .arg("--bpffs")
            .arg(self.bpffs.path())
            .arg("--metrics-addr")
            .arg(self.metrics_addr())
            .args(&self.agent_args)
            .args(extra);
        self.agent = Some(spawn_in(None, None, cmd));
        self.log_offset = 0;
    }

    /// Stops the agent with SIGTERM (capture stays pinned).
    pub fn stop_agent(&mut self) {
        if let Some(mut p) = self.agent.take() {
            p.signal(Signal::SIGTERM);
            let stopped = p.wait_timeout(Duration::from_secs(10)).is_some();
            let logs = p.logs();
            self.old_agents.push(p);
            if !stopped {
                panic!("agent did not stop on SIGTERM:\n{logs}");
            }
        }
    }

    /// Kills the agent with SIGKILL.
    pub fn kill_agent(&mut self) {
        if let Some(mut p) = self.agent.take() {
            p.kill();
            self.old_agents.push(p);
        }
    }

    /// Whether an agent was started and is still running (reaps it when
    /// it has exited).
    pub fn agent_is_running(&mut self) -> bool {
        self.agent.as_mut().is_some_and(Proc::is_running)
    }

    /// The running agent's process id.
    pub fn agent_pid(&self) -> Option<u32> {
        self.agent.as_ref().map(Proc::pid)
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

    /// The agent's logs so far.
    pub fn agent_logs(&self) -> String {
        self.agent.as_ref().map(Proc::logs).unwrap_or_default()
    }

    /// Lines that contain `needle` in the logs of every agent this node
    /// ran (the killed and stopped ones too), oldest first.
    pub fn agent_log_lines(&self, needle: &str) -> Vec<String> {
        self.old_agents
            .iter()
            .chain(&self.agent)
            .flat_map(|p| {
                p.stderr()
                    .lines()
                    .filter(|l| l.contains(needle))
                    .map(str::to_string)
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    /// Skips everything the agent logged so far (see [`Node::wait_applied`]).
    pub fn mark(&mut self) {
        if let Some(a) = &self.agent {
            self.log_offset = std::fs::metadata(a.stderr_path()).map_or(0, |m| m.len());
        }
    }

    /// Waits for the agent's next `pods file applied in N ms` after the
    /// mark; returns N and when the line was seen, and moves the mark past
    /// it. Fails when the agent exits, the node's stop check says so, or
    /// `timeout` (times [`crate::patience`]) passes.
    pub fn wait_applied(&mut self, timeout: Duration) -> anyhow::Result<(u64, Instant)> {
        let timeout = crate::patience(timeout);
        let deadline = Instant::now() + timeout;
        let Some(a) = &mut self.agent else {
            anyhow::bail!("no agent running");
        };
        let log = a.stderr_path();
        let mut text = String::new();
        loop {
            let mut f = File::open(&log)?;
            f.seek(SeekFrom::Start(self.log_offset))?;
            text.clear();
            f.read_to_string(&mut text)?;
            if let Some((ms, end)) = find_applied(&text) {
                let seen = Instant::now();
                let ms = ms.with_context(|| format!("cannot read the time in {text:?}"))?;
                self.log_offset += end as u64;
                return Ok((ms, seen));
            }
            // Nothing yet: skip the complete lines read so far next time.
            if let Some(end) = text.rfind('\n') {
                self.log_offset += end as u64 + 1;
            }
            let last_lines = |a: &Proc| {
                let log = a.stderr();
                let lines: Vec<&str> = log.lines().collect();
                lines[lines.len().saturating_sub(20)..].join("\n")
            };
            if let Some(status) = a.try_status() {
                anyhow::bail!(
                    "the agent exited ({status}) before `{APPLIED}…`; its last log lines:\n{}",
                    last_lines(a)
                );
            }
            if self.stop.is_some_and(|stop| stop()) {
                anyhow::bail!("interrupted");
            }
            if Instant::now() > deadline {
                anyhow::bail!(
                    "no `{APPLIED}…` within {timeout:?}; the agent's last log lines:\n{}",
                    last_lines(a)
                );
            }
            std::thread::sleep(Duration::from_millis(2));
        }
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
        self.write_pods_raw(&pods_yaml(pods));
    }

    /// Writes the pods file listing `pods` after a numbered comment, so
    /// the agent sees a change (and logs an apply) even when the pods are
    /// the same: what changed may be outside the file (a network namespace
    /// deleted or re-created). Does not wait.
    pub fn rewrite_pods(&mut self, pods: &[PodEntry]) {
        self.changes += 1;
        self.write_pods_raw(&format!("# change {}\n{}", self.changes, pods_yaml(pods)));
    }

    /// [`Node::rewrite_pods`], then waits (2 minutes at most) until the
    /// agent applied it; returns the apply time it logged (ms).
    pub fn apply_pods(&mut self, pods: &[PodEntry]) -> anyhow::Result<u64> {
        self.mark();
        self.rewrite_pods(pods);
        Ok(self.wait_applied(Duration::from_secs(120))?.0)
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
        write_atomically(&self.pods_file, text).expect("writing pods file");
    }

    /// `weir status -o json` against this node's pins (`Null` when it
    /// fails).
    pub fn status(&self) -> Value {
        self.try_status().unwrap_or(Value::Null)
    }

    /// `weir status -o json` against this node's pins.
    pub fn try_status(&self) -> anyhow::Result<Value> {
        weir_status(&self.weir, self.bpffs.path())
    }

    /// Counters of pod `name` from `weir status`.
    pub fn counters(&self, name: &str) -> Value {
        pod_counters(&self.status(), name)
    }

    /// Counters of pod `name` from `weir status` (`Null` when the agent
    /// does not list it).
    pub fn try_counters(&self, name: &str) -> anyhow::Result<Value> {
        Ok(pod_counters(&self.try_status()?, name))
    }

    /// Fetches `/metrics`.
    pub fn metrics(&self) -> String {
        self.try_metrics()
            .unwrap_or_else(|e| panic!("fetching /metrics: {e:#}"))
    }

    /// Fetches `/metrics` (an error when metrics are off).
    pub fn try_metrics(&self) -> anyhow::Result<String> {
        use std::io::Write;
        anyhow::ensure!(self.metrics, "metrics are off on this node");
        let mut s = std::net::TcpStream::connect(("127.0.0.1", self.metrics_port))
            .context("connecting to /metrics")?;
        s.set_read_timeout(Some(Duration::from_secs(30)))?;
        s.write_all(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n")?;
        let mut body = String::new();
        s.read_to_string(&mut body)?;
        Ok(body)
    }

    /// Runs `program args…` in `netns` (optional) inside the node's cgroup.
    pub fn spawn(&self, program: &Path, netns: Option<&NetNs>, args: &[String]) -> Proc {
        let mut cmd = Command::new(program);
        cmd.args(args);
        spawn_in(netns, Some(&self.cgroup), cmd)
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
        let _ = Command::new(&self.weir)
            .arg("uninstall")
            .arg("--bpffs")
            .arg(self.bpffs.path())
            .output();
    }
}

/// The first `pods file applied in N ms` line in `text`: N (`None` when
/// it is not a number) and the offset of the line's end (where the next
/// search starts).
fn find_applied(text: &str) -> Option<(Option<u64>, usize)> {
    let at = text.find(APPLIED)?;
    let rest = &text[at + APPLIED.len()..];
    let ms = rest.split_whitespace().next().and_then(|v| v.parse().ok());
    let end = rest
        .find('\n')
        .map_or(text.len(), |e| at + APPLIED.len() + e);
    Some((ms, end))
}

/// `weir status -o json` of the agent pinned under `bpffs`.
pub fn weir_status(weir: &Path, bpffs: &Path) -> anyhow::Result<Value> {
    let out = Command::new(weir)
        .args(["status", "-o", "json", "--bpffs"])
        .arg(bpffs)
        .output()
        .context("running weir status")?;
    anyhow::ensure!(
        out.status.success(),
        "weir status failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).context("weir status -o json printed something else")
}

/// The counters of pod `name` in a `weir status -o json` answer.
fn pod_counters(status: &Value, name: &str) -> Value {
    status["pods"]
        .as_array()
        .and_then(|a| a.iter().find(|p| p["name"] == name).cloned())
        .map(|p| p["counters"].clone())
        .unwrap_or(Value::Null)
}

/// Whether a pod of a `weir status -o json` answer is captured both ways:
/// outbound capture on and its inbound (`sk_lookup`) link attached.
pub fn is_fully_captured(pod: &Value) -> bool {
    pod["capture"] == true && pod["inbound_attached"] == true
}

/// How many pods of a `weir status -o json` answer are
/// [fully captured](is_fully_captured).
pub fn fully_captured(status: &Value) -> usize {
    status["pods"]
        .as_array()
        .map_or(0, |p| p.iter().filter(|p| is_fully_captured(p)).count())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_apply_time_and_where_its_line_ends() {
        let log = "[INFO] watching\n[INFO weir] pods file applied in 12 ms\n[INFO] pods file applied in 3 ms\n";
        let (ms, end) = find_applied(log).unwrap();
        assert_eq!(ms, Some(12));
        assert_eq!(&log[end..end + 1], "\n");
        // The next search, from there, finds the next apply.
        assert_eq!(find_applied(&log[end..]).unwrap().0, Some(3));
        assert_eq!(
            find_applied("[INFO] pods file applied in x ms").unwrap().0,
            None
        );
        assert!(find_applied("[INFO] pods file read\n").is_none());
    }

    #[test]
    fn counts_pods_captured_both_ways() {
        let status = serde_json::json!({"pods": [
            {"name": "a", "capture": true, "inbound_attached": true, "counters": {"x": 1}},
            {"name": "b", "capture": true, "inbound_attached": false},
            {"name": "c", "capture": false, "inbound_attached": true},
        ]});
        assert_eq!(fully_captured(&status), 1);
        assert_eq!(fully_captured(&Value::Null), 0);
        assert_eq!(pod_counters(&status, "a")["x"], 1);
        assert_eq!(pod_counters(&status, "z"), Value::Null);
    }
}
