//! Shared by the Kubernetes and CNI kernel tests: running `weir-cni` as a
//! container runtime would, and a fake Kubernetes API server.
#![allow(dead_code)] // each test file uses a different part

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use weir_tests::weir_bin;

/// `weir run --kubernetes` for `node` as node `node-a`, with the
/// kubeconfig [`FakeApi::kubeconfig`] wrote into the node's directory,
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
        .args(["--resync-secs", "1"]);
    cmd
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

#[derive(Default)]
struct ApiState {
    pods: BTreeMap<String, Value>,
    rv: u64,
    /// Every event sent, by resource version: a watch from version N
    /// first gets the events after N, as from the API server's cache.
    history: Vec<(u64, String)>,
    watchers: Vec<mpsc::Sender<Option<String>>>,
    requests: Vec<String>,
}

/// A fake Kubernetes API server on 127.0.0.1: pods only (list, watch with
/// chunked JSON-lines streams, get), HTTP/1.1 keep-alive, one thread per
/// connection. Tests change pods and the server sends the watch events.
pub struct FakeApi {
    port: u16,
    state: Arc<Mutex<ApiState>>,
    down: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
}

impl FakeApi {
    /// Starts the server.
    pub fn start() -> FakeApi {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let port = listener.local_addr().unwrap().port();
        let api = FakeApi {
            port,
            state: Arc::default(),
            down: Arc::default(),
            stop: Arc::default(),
        };
        let (state, down, stop) = (api.state.clone(), api.down.clone(), api.stop.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((s, _)) => {
                        let (state, down) = (state.clone(), down.clone());
                        std::thread::spawn(move || serve(s, &state, &down));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        api
    }

    /// A kubeconfig file for it, written to `path`.
    pub fn kubeconfig(&self, path: &Path) -> PathBuf {
        let text = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: http://127.0.0.1:{}\nusers:\n- name: fake\n  user: {{}}\ncontexts:\n- name: fake\n  context:\n    cluster: fake\n    user: fake\n    namespace: default\ncurrent-context: fake\n",
            self.port
        );
        std::fs::write(path, text).unwrap();
        path.to_path_buf()
    }

    /// Adds or updates a pod (and tells the watchers).
    pub fn apply(&self, pod: Value) {
        let mut s = self.state.lock().unwrap();
        s.rv += 1;
        let mut pod = pod;
        pod["metadata"]["resourceVersion"] = s.rv.to_string().into();
        let key = format!(
            "{}/{}",
            pod["metadata"]["namespace"].as_str().unwrap(),
            pod["metadata"]["name"].as_str().unwrap()
        );
        let kind = if s.pods.contains_key(&key) {
            "MODIFIED"
        } else {
            "ADDED"
        };
        s.pods.insert(key, pod.clone());
        broadcast(&mut s, json!({"type": kind, "object": pod}).to_string());
    }

    /// Adds a pod without telling the watchers (a late watch event): only
    /// a list or a direct read shows it.
    pub fn insert_quietly(&self, pod: Value) {
        let mut s = self.state.lock().unwrap();
        s.rv += 1;
        let mut pod = pod;
        pod["metadata"]["resourceVersion"] = s.rv.to_string().into();
        let key = format!("default/{}", pod["metadata"]["name"].as_str().unwrap());
        s.pods.insert(key, pod);
    }

    /// Deletes a pod.
    pub fn delete(&self, name: &str) {
        let mut s = self.state.lock().unwrap();
        s.rv += 1;
        if let Some(mut pod) = s.pods.remove(&format!("default/{name}")) {
            pod["metadata"]["resourceVersion"] = s.rv.to_string().into();
            broadcast(
                &mut s,
                json!({"type": "DELETED", "object": pod}).to_string(),
            );
        }
    }

    /// Sends a BOOKMARK to the watchers.
    pub fn bookmark(&self) {
        let mut s = self.state.lock().unwrap();
        let rv = s.rv.to_string();
        broadcast(
            &mut s,
            json!({"type": "BOOKMARK", "object": {"kind": "Pod", "apiVersion": "v1", "metadata": {"resourceVersion": rv}}}).to_string(),
        );
    }

    /// Expires every watch with `ERROR 410 Gone` (as after a compaction).
    pub fn expire_watches(&self) {
        let mut s = self.state.lock().unwrap();
        broadcast(
            &mut s,
            json!({"type": "ERROR", "object": {"kind": "Status", "apiVersion": "v1", "metadata": {},
                   "status": "Failure", "message": "too old resource version", "reason": "Expired", "code": 410}})
            .to_string(),
        );
        for w in s.watches_drain() {
            let _ = w.send(None);
        }
    }

    /// `true`: every request gets 503 and open watches are closed, as
    /// when the API server is away; `false`: serving again.
    pub fn set_down(&self, down: bool) {
        self.down.store(down, Ordering::Relaxed);
        if down {
            let mut s = self.state.lock().unwrap();
            for w in s.watches_drain() {
                let _ = w.send(None);
            }
        }
    }

    /// The request lines served so far.
    pub fn requests(&self) -> Vec<String> {
        self.state.lock().unwrap().requests.clone()
    }
}

impl ApiState {
    fn watches_drain(&mut self) -> Vec<mpsc::Sender<Option<String>>> {
        std::mem::take(&mut self.watchers)
    }
}

impl Drop for FakeApi {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        self.set_down(true);
    }
}

fn broadcast(s: &mut ApiState, line: String) {
    let rv = s.rv;
    s.history.push((rv, line.clone()));
    s.watchers.retain(|w| w.send(Some(line.clone())).is_ok());
}

fn respond(s: &mut TcpStream, code: u16, body: &str) -> std::io::Result<()> {
    let reason = match code {
        200 => "OK",
        404 => "Not Found",
        _ => "Service Unavailable",
    };
    write!(
        s,
        "HTTP/1.1 {code} {reason}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
}

fn status(code: u16, reason: &str, message: &str) -> String {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
           "message": message, "reason": reason, "code": code})
    .to_string()
}

fn serve(stream: TcpStream, state: &Mutex<ApiState>, down: &AtomicBool) {
    let mut out = stream.try_clone().unwrap();
    let mut rd = BufReader::new(stream);
    loop {
        let mut line = String::new();
        if rd.read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
        let mut len = 0usize;
        loop {
            let mut h = String::new();
            if rd.read_line(&mut h).unwrap_or(0) == 0 {
                return;
            }
            if h == "\r\n" {
                break;
            }
            if let Some(v) = h.to_ascii_lowercase().strip_prefix("content-length:") {
                len = v.trim().parse().unwrap_or(0);
            }
        }
        let mut body = vec![0; len];
        if rd.read_exact(&mut body).is_err() {
            return;
        }
        let target = line.split_whitespace().nth(1).unwrap_or("/").to_string();
        state.lock().unwrap().requests.push(target.clone());
        if down.load(Ordering::Relaxed) {
            let _ = respond(
                &mut out,
                503,
                &status(503, "ServiceUnavailable", "the server is down"),
            );
            continue;
        }
        let (path, query) = target.split_once('?').unwrap_or((&target, ""));
        let watch = query
            .split('&')
            .any(|kv| kv == "watch=true" || kv == "watch=1");
        let ok = if path == "/api/v1/pods" && watch {
            // A chunked stream of events until told to stop.
            let since: u64 = query
                .split('&')
                .find_map(|kv| kv.strip_prefix("resourceVersion="))
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            let (tx, rx) = mpsc::channel();
            {
                let mut s = state.lock().unwrap();
                for (rv, line) in &s.history {
                    if *rv > since && !line.contains("\"BOOKMARK\"") && !line.contains("\"ERROR\"")
                    {
                        let _ = tx.send(Some(line.clone()));
                    }
                }
                s.watchers.push(tx);
            }
            if write!(
                out,
                "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
            )
            .is_err()
            {
                return;
            }
            while let Ok(Some(ev)) = rx.recv() {
                let data = format!("{ev}\n");
                if write!(out, "{:x}\r\n{data}\r\n", data.len()).is_err() {
                    return;
                }
                let _ = out.flush();
            }
            let _ = write!(out, "0\r\n\r\n");
            return;
        } else if path == "/api/v1/pods" {
            let s = state.lock().unwrap();
            let items: Vec<&Value> = s.pods.values().collect();
            let list = json!({"apiVersion": "v1", "kind": "PodList",
                              "metadata": {"resourceVersion": s.rv.to_string()}, "items": items});
            respond(&mut out, 200, &list.to_string())
        } else if let Some(rest) = path.strip_prefix("/api/v1/namespaces/") {
            let parts: Vec<&str> = rest.split('/').collect();
            match parts.as_slice() {
                [ns, "pods", name] => {
                    let s = state.lock().unwrap();
                    match s.pods.get(&format!("{ns}/{name}")) {
                        Some(p) => respond(&mut out, 200, &p.to_string()),
                        None => respond(
                            &mut out,
                            404,
                            &status(404, "NotFound", &format!("pods \"{name}\" not found")),
                        ),
                    }
                }
                _ => respond(&mut out, 404, &status(404, "NotFound", "no such path")),
            }
        } else {
            respond(&mut out, 404, &status(404, "NotFound", "no such path"))
        };
        if ok.is_err() {
            return;
        }
    }
}
