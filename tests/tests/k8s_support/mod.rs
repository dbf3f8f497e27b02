//! Shared by the Kubernetes and CNI kernel tests: running `weir-cni` as a
//! container runtime would, and the fake Kubernetes API server
//! ([`weir_tests::fake_api::FakeApi`]).
#![allow(dead_code)] // each test file uses a different part

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use weir_tests::weir_bin;

/// `weir run --kubernetes` for `node` as node `node-a`, with the
/// kubeconfig [`weir_tests::fake_api::FakeApi::kubeconfig`] wrote into the node's directory,
/// its cgroup, bpffs and metrics port, resyncing every second; callers add
/// their own flags.
pub fn kubernetes_agent_command(node: &weir_tests::node::Node) -> Command {
    let mut cmd = Command::new(weir_bin());
    cmd.env("RUST_LOG", "info")
        .env_remove("KUBECONFIG")
        .args([
            "run",
            "--kubernetes",
            "--node-name",
            "node-a",
            "--kubeconfig",
        ])
        .arg(node.dir.join("kubeconfig"))
        .arg("--cgroup")
        .arg(node.cgroup.path())
        .arg("--bpffs")
        .arg(node.bpffs.path())
        .arg("--metrics-addr")
        .arg(format!("127.0.0.1:{}", node.metrics_port))
        .arg("--state-file")
        .arg(state_file(node))
        .args(["--resync-secs", "1"]);
    cmd
}

/// The agent's `--state-file` (why each pod is enrolled) in the node's
/// directory; `weir status --state-file` reads it.
pub fn state_file(node: &weir_tests::node::Node) -> PathBuf {
    node.dir.join("run/pods.json")
}

/// Starts a process of the pod (its "pause" container) in `ns` and puts
/// it in the pod's cgroup (systemd driver layout, containerd) under the
/// node's cgroup, as the kubelet would; the agent finds the pod's network
/// namespace through it.
pub fn pod_process(
    node: &weir_tests::node::Node,
    ns: &weir_tests::NetNs,
    uid: &str,
) -> weir_tests::Proc {
    let mut sleep = Command::new("sleep");
    sleep.arg("3600");
    let p = weir_tests::spawn_in(Some(ns), Some(&node.cgroup), sleep);
    let uid_ = uid.replace('-', "_");
    let dir = node.cgroup.path().join(format!(
        "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{uid_}.slice/cri-containerd-{}.scope",
        &uid[..8]
    ));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("cgroup.procs"), p.pid().to_string()).unwrap();
    p
}

/// The `weir-cni` binary: `WEIR_CNI_BIN`, else next to the agent.
pub fn weir_cni_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("WEIR_CNI_BIN") {
        return PathBuf::from(p);
    }
    let p = weir_bin().with_file_name("weir-cni");
    assert!(
        p.is_file(),
        "{} not found: build it with the agent (cargo xtask build) or set WEIR_CNI_BIN",
        p.display()
    );
    p
}

/// What one plugin run printed.
#[derive(Debug)]
pub struct CniOutput {
    /// Exit code.
    pub code: i32,
    /// stdout as JSON (`Null` when empty).
    pub json: Value,
    /// stderr.
    pub stderr: String,
    /// How long the run took.
    pub took: Duration,
}

/// One plugin invocation, as containerd or CRI-O makes it.
pub struct CniCall {
    /// `CNI_COMMAND`.
    pub command: String,
    /// `CNI_NETNS`.
    pub netns: PathBuf,
    /// `K8S_POD_NAMESPACE` / `K8S_POD_NAME` / `K8S_POD_UID`.
    pub pod: (String, String, String),
    /// `CNI_CONTAINERID`.
    pub container_id: String,
    /// The network configuration (without `prevResult`).
    pub conf: Value,
    /// `prevResult`.
    pub prev_result: Option<Value>,
}

/// The result a primary plugin (bridge, Calico, …) hands on: the pod's
/// interface in the sandbox and its addresses.
pub fn prev_result(netns: &Path, ips: &[&str]) -> Value {
    json!({
        "cniVersion": "1.0.0",
        "interfaces": [
            {"name": "veth1234", "mac": "ee:ee:ee:ee:ee:ee"},
            {"name": "eth0", "mac": "0a:58:c6:12:06:01", "sandbox": netns.to_string_lossy()}
        ],
        "ips": ips.iter().map(|ip| json!({"address": format!("{ip}/24"), "interface": 1})).collect::<Vec<_>>(),
        "dns": {}
    })
}

impl CniCall {
    /// An ADD for pod `default/name` in `netns`, talking to `socket`.
    pub fn add(name: &str, uid: &str, netns: &Path, socket: &Path, ips: &[&str]) -> CniCall {
        CniCall {
            command: "ADD".into(),
            netns: netns.to_path_buf(),
            pod: ("default".into(), name.into(), uid.into()),
            container_id: format!("sandbox-{name}-{uid}"),
            conf: json!({
                "cniVersion": "1.0.0",
                "name": "weir-test-net",
                "type": "weir-cni",
                "socket": socket.to_string_lossy(),
                "timeoutSeconds": 20,
            }),
            prev_result: Some(prev_result(netns, ips)),
        }
    }

    /// The same call with another command.
    pub fn with_command(mut self, command: &str) -> CniCall {
        self.command = command.into();
        self
    }

    /// The same call for a pod of namespace `ns`.
    pub fn in_namespace(mut self, ns: &str) -> CniCall {
        self.pod.0 = ns.into();
        self
    }

    /// The network configuration the runtime passes for weir's entry
    /// `entry` of the list `list` (the list's name and version, as libcni
    /// sets them), without `prevResult`.
    pub fn with_entry(mut self, list: &Value, entry: &Value) -> CniCall {
        let mut conf = entry.clone();
        conf["name"] = list["name"].clone();
        conf["cniVersion"] = list["cniVersion"].clone();
        self.conf = conf;
        self
    }

    /// Sets a configuration key.
    pub fn set(mut self, key: &str, value: Value) -> CniCall {
        self.conf[key] = value;
        self
    }

    /// Runs the plugin with a runtime's environment (and nothing else of
    /// ours) and the configuration on stdin.
    pub fn run(&self) -> CniOutput {
        let mut conf = self.conf.clone();
        if let Some(p) = &self.prev_result {
            conf["prevResult"] = p.clone();
        }
        let (ns, name, uid) = &self.pod;
        let args = format!(
            "IgnoreUnknown=1;K8S_POD_NAMESPACE={ns};K8S_POD_NAME={name};K8S_POD_INFRA_CONTAINER_ID={};K8S_POD_UID={uid}",
            self.container_id
        );
        let started = Instant::now();
        let mut child = Command::new(weir_cni_bin())
            .env_clear()
            .env("CNI_COMMAND", &self.command)
            .env("CNI_CONTAINERID", &self.container_id)
            .env("CNI_NETNS", &self.netns)
            .env("CNI_IFNAME", "eth0")
            .env("CNI_ARGS", args)
            .env("CNI_PATH", "/opt/cni/bin")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("starting weir-cni");
        child
            .stdin
            .take()
            .unwrap()
            .write_all(conf.to_string().as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        CniOutput {
            code: out.status.code().unwrap_or(-1),
            json: if stdout.trim().is_empty() {
                Value::Null
            } else {
                serde_json::from_str(&stdout)
                    .unwrap_or_else(|e| panic!("weir-cni printed non-JSON ({e}): {stdout}"))
            },
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
            took: started.elapsed(),
        }
    }
}

/// A pod object as the API server serves it, on node `node-a`.
pub fn pod_json(
    name: &str,
    uid: &str,
    ips: &[&str],
    containers: &[&str],
    annotations: &[(&str, &str)],
) -> Value {
    let ann: BTreeMap<&str, &str> = annotations.iter().copied().collect();
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": "default", "uid": uid,
                     "labels": {"app": name}, "annotations": ann},
        "spec": {"nodeName": "node-a",
                 "containers": containers.iter().map(|c| json!({"name": c, "image": format!("{c}:1")})).collect::<Vec<_>>()},
        "status": {"phase": if ips.is_empty() { "Pending" } else { "Running" },
                   "podIPs": ips.iter().map(|ip| json!({"ip": ip})).collect::<Vec<_>>()}
    })
}
