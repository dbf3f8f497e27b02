//! `weir-cni`: a chained CNI plugin that enrolls each new pod's network
//! namespace with the node's weir agent before any container of the pod
//! runs, so there is no moment in which the application is not captured
//! (what `istio-init`'s iptables rules guarantee).
//!
//! The container runtime runs it as the last plugin of the node's
//! `.conflist`, after the plugin that wired the pod's network, as the CNI
//! specification describes: the command in `CNI_COMMAND`, the sandbox in
//! `CNI_CONTAINERID` / `CNI_NETNS` / `CNI_IFNAME`, the pod in `CNI_ARGS`
//! (`K8S_POD_NAMESPACE`, `K8S_POD_NAME`, `K8S_POD_UID`), the network
//! configuration with the previous plugin's `prevResult` on stdin.
//!
//! Its own configuration keys (all optional):
//!
//! ```json
//! {"type": "weir-cni", "socket": "/var/run/weir/cni.sock", "failOpen": false, "timeoutSeconds": 30}
//! ```
//!
//! - ADD asks the agent to enroll the pod and waits for the answer. On
//!   success (or when the pod is not meshed) it prints `prevResult`
//!   unchanged. When the agent cannot enroll it, or cannot be reached, the
//!   ADD fails with a CNI error (code 11, "try again later", when the agent
//!   is unreachable; 100 when it refused) and the kubelet retries the pod's
//!   sandbox later: fail closed. `"failOpen": true` lets the pod start
//!   anyway; the agent's watcher then enrolls it once it sees it.
//!   When the agent is not reachable, two kinds of pods start anyway, as
//!   no capture is lost on them: pods of `excludeNamespaces` (written by
//!   the agent's installer, default `kube-system`), without asking
//!   anything; and pods the Kubernetes API shows are not meshed, read with
//!   the `kubeconfig` the agent writes next to the CNI configuration and
//!   classified by the agent's own code (`k8s/classify.rs`). A meshed pod,
//!   or one the API cannot tell about, fails as above.
//! - DEL tells the agent, best effort, and always succeeds.
//! - CHECK asks whether the pod is enrolled. STATUS (CNI 1.1) whether the
//!   agent answers. GC has nothing to collect. VERSION lists the versions.
//!
//! It is copied onto every node and runs for every pod: std and serde on
//! the path with the agent up; the Kubernetes client (kube-rs) only runs
//! when the agent is not reachable.

#[path = "../cni/protocol.rs"]
mod protocol;

// The agent's pod classification, compiled in as is (with the policy
// module it names), so the plugin decides "meshed" exactly as the agent.
#[path = "../ambient/enroll.rs"]
#[allow(dead_code)]
mod ambient;
#[path = "../k8s/classify.rs"]
#[allow(dead_code)]
mod classify;
#[path = "../pod.rs"]
#[allow(dead_code)]
mod pod;
#[path = "../policy/mod.rs"]
#[allow(dead_code)]
mod policy;

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use protocol::{Command, PodRef, Request, Response};
use serde_json::{Value, json};

/// CNI versions this plugin speaks (chaining needs 0.3.0 or later).
const SUPPORTED: &[&str] = &["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];

/// The version reported by VERSION when stdin names none.
const LATEST: &str = "1.1.0";

/// A CNI error result (the specification's well-known codes; 100 and up are
/// this plugin's own).
#[derive(Debug, PartialEq, Eq)]
struct CniError {
    code: u32,
    msg: String,
    details: String,
}

const ERR_INCOMPATIBLE_VERSION: u32 = 1;
const ERR_INVALID_ENV: u32 = 4;
const ERR_IO: u32 = 5;
const ERR_DECODE: u32 = 6;
const ERR_INVALID_CONFIG: u32 = 7;
const ERR_TRY_AGAIN_LATER: u32 = 11;
const ERR_NOT_AVAILABLE: u32 = 50;
const ERR_AGENT_REFUSED: u32 = 100;

fn fail(code: u32, msg: impl Into<String>, details: impl Into<String>) -> CniError {
    CniError {
        code,
        msg: msg.into(),
        details: details.into(),
    }
}

/// The plugin's part of the network configuration.
#[derive(Debug)]
struct NetConf {
    cni_version: String,
    socket: String,
    fail_open: bool,
    timeout: Duration,
    prev_result: Option<Value>,
    exclude_namespaces: Vec<String>,
    kubeconfig: Option<String>,
}

fn parse_conf(stdin: &str) -> Result<NetConf, CniError> {
    let v: Value = serde_json::from_str(stdin).map_err(|e| {
        fail(
            ERR_DECODE,
            "the network configuration on stdin is not JSON",
            e.to_string(),
        )
    })?;
    let cni_version = v["cniVersion"].as_str().unwrap_or_default().to_string();
    if !SUPPORTED.contains(&cni_version.as_str()) {
        return Err(fail(
            ERR_INCOMPATIBLE_VERSION,
            format!(
                "cniVersion {cni_version:?} is not supported; use one of {}",
                SUPPORTED.join(", ")
            ),
            "",
        ));
    }
    let socket = match &v["socket"] {
        Value::Null => protocol::DEFAULT_SOCKET.to_string(),
        Value::String(s) if s.starts_with('/') => s.clone(),
        other => {
            return Err(fail(
                ERR_INVALID_CONFIG,
                "\"socket\" must be an absolute path",
                format!("got {other}"),
            ));
        }
    };
    let fail_open = match &v["failOpen"] {
        Value::Null => false,
        Value::Bool(b) => *b,
        other => {
            return Err(fail(
                ERR_INVALID_CONFIG,
                "\"failOpen\" must be true or false",
                format!("got {other}"),
            ));
        }
    };
    let timeout = match &v["timeoutSeconds"] {
        Value::Null => Duration::from_secs(30),
        t => match t.as_u64() {
            Some(s) if (1..=600).contains(&s) => Duration::from_secs(s),
            _ => {
                return Err(fail(
                    ERR_INVALID_CONFIG,
                    "\"timeoutSeconds\" must be a whole number from 1 to 600",
                    format!("got {t}"),
                ));
            }
        },
    };
    let exclude_namespaces = match &v["excludeNamespaces"] {
        Value::Null => Vec::new(),
        Value::Array(a) if a.iter().all(Value::is_string) => a
            .iter()
            .filter_map(|n| n.as_str().map(str::to_string))
            .collect(),
        other => {
            return Err(fail(
                ERR_INVALID_CONFIG,
                "\"excludeNamespaces\" must be a list of namespace names",
                format!("got {other}"),
            ));
        }
    };
    let kubeconfig = match &v["kubeconfig"] {
        Value::Null => None,
        Value::String(s) if s.starts_with('/') => Some(s.clone()),
        other => {
            return Err(fail(
                ERR_INVALID_CONFIG,
                "\"kubeconfig\" must be an absolute path",
                format!("got {other}"),
            ));
        }
    };
    let prev_result = v.get("prevResult").filter(|p| !p.is_null()).cloned();
    Ok(NetConf {
        cni_version,
        socket,
        fail_open,
        timeout,
        prev_result,
        exclude_namespaces,
        kubeconfig,
    })
}

/// `K8S_POD_*` from `CNI_ARGS` (`K1=V1;K2=V2`); `None` when the sandbox is
/// not a Kubernetes pod.
fn pod_ref(cni_args: &str) -> Option<PodRef> {
    let mut p = PodRef::default();
    for kv in cni_args.split(';') {
        let Some((k, v)) = kv.split_once('=') else {
            continue;
        };
        match k.trim() {
            "K8S_POD_NAMESPACE" => p.namespace = v.trim().to_string(),
            "K8S_POD_NAME" => p.name = v.trim().to_string(),
            "K8S_POD_UID" => p.uid = v.trim().to_string(),
            _ => {}
        }
    }
    (!p.namespace.is_empty() && !p.name.is_empty()).then_some(p)
}

/// The pod's addresses from the previous plugin's result: `ips` (0.3.0
/// and later) on interfaces inside the sandbox (or with no interface
/// given), then the old `ip4`/`ip6`.
fn pod_ips(prev: &Value) -> Vec<String> {
    let mut out = Vec::new();
    let ifaces = prev["interfaces"].as_array();
    for ip in prev["ips"].as_array().into_iter().flatten() {
        let Some(addr) = ip["address"].as_str() else {
            continue;
        };
        let in_sandbox = match ip["interface"].as_u64() {
            None => true,
            Some(i) => ifaces
                .and_then(|a| a.get(i as usize))
                .is_none_or(|ifc| ifc["sandbox"].as_str().is_some_and(|s| !s.is_empty())),
        };
        if in_sandbox {
            out.push(addr.split('/').next().unwrap_or(addr).to_string());
        }
    }
    for k in ["ip4", "ip6"] {
        if let Some(addr) = prev[k]["ip"].as_str() {
            out.push(addr.split('/').next().unwrap_or(addr).to_string());
        }
    }
    out.dedup();
    out
}

/// Talks to the agent: one request, one answer.
fn ask(socket: &str, req: &Request, timeout: Duration) -> std::io::Result<Response> {
    let mut s = UnixStream::connect(socket)?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    let mut line = serde_json::to_vec(req)?;
    line.push(b'\n');
    s.write_all(&line)?;
    let mut buf = Vec::new();
    BufReader::new(s.take(protocol::MAX_MESSAGE as u64)).read_until(b'\n', &mut buf)?;
    serde_json::from_slice(&buf).map_err(|e| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("not a weir answer ({e})"),
        )
    })
}

/// How long the plugin waits for the Kubernetes API when the agent is
/// not reachable.
const API_TIMEOUT: Duration = Duration::from_secs(5);

/// Reads pod `pod` from the Kubernetes API with the kubeconfig at `path`
/// and classifies it as the agent does.
fn read_pod(path: &str, pod: &PodRef) -> Result<classify::MeshVerdict, String> {
    use k8s_openapi::api::core::v1::Pod;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("starting the API client: {e}"))?;
    let key = format!("{}/{}", pod.namespace, pod.name);
    rt.block_on(async {
        let kc = kube::config::Kubeconfig::read_from(path)
            .map_err(|e| format!("kubeconfig {path}: {e}"))?;
        let mut cfg =
            kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
                .await
                .map_err(|e| format!("kubeconfig {path}: {e}"))?;
        cfg.connect_timeout = Some(API_TIMEOUT);
        cfg.read_timeout = Some(API_TIMEOUT);
        cfg.default_retry = false;
        let client = kube::Client::try_from(cfg).map_err(|e| format!("kubeconfig {path}: {e}"))?;
        let api: kube::Api<Pod> = kube::Api::namespaced(client.clone(), &pod.namespace);
        let got = tokio::time::timeout(API_TIMEOUT, api.get_opt(&pod.name))
            .await
            .map_err(|_| format!("no answer within {} s", API_TIMEOUT.as_secs()))?
            .map_err(|e| e.to_string())?;
        let p = got.ok_or_else(|| format!("pod {key} is not in the API"))?;
        let uid = p.metadata.uid.clone().unwrap_or_default();
        if !pod.uid.is_empty() && uid != pod.uid {
            return Err(format!(
                "pod {key} in the API has UID {uid}, the runtime says {}",
                pod.uid
            ));
        }
        if !classify::needs_namespace(&p) {
            return Ok(classify::verdict_in(
                &p,
                classify::NamespaceLabels::Known(None),
            ));
        }
        // The namespace's istio.io/dataplane-mode can make it ambient.
        type Ns = kube::core::PartialObjectMeta<k8s_openapi::api::core::v1::Namespace>;
        let api: kube::Api<Ns> = kube::Api::all(client);
        let got = tokio::time::timeout(API_TIMEOUT, api.get_opt(&pod.namespace))
            .await
            .map_err(|_| {
                format!(
                    "reading namespace {}: no answer within {} s",
                    pod.namespace,
                    API_TIMEOUT.as_secs()
                )
            })?;
        let labels = match got {
            Ok(ns) => ns.and_then(|n| n.metadata.labels),
            // No permission to read namespaces: pod labels only, as the
            // agent decides then too.
            Err(kube::Error::Api(s)) if s.code == 403 => {
                return Ok(classify::verdict_in(&p, classify::NamespaceLabels::Unknown));
            }
            Err(e) => return Err(format!("reading namespace {}: {e}", pod.namespace)),
        };
        Ok(classify::verdict_in(
            &p,
            classify::NamespaceLabels::Known(labels.as_ref()),
        ))
    })
}

/// The environment, as a function so tests can give their own.
type Env<'a> = &'a dyn Fn(&str) -> Option<String>;
/// The agent, likewise.
type Agent<'a> = &'a dyn Fn(&str, &Request, Duration) -> std::io::Result<Response>;
/// The Kubernetes API (kubeconfig, pod), likewise.
type PodApi<'a> = &'a dyn Fn(&str, &PodRef) -> Result<classify::MeshVerdict, String>;

/// Whether a pod the agent cannot enroll now may start anyway because no
/// capture is lost on it: `Ok(why)` to let it start, `Err(why not)`.
fn starts_without_agent(conf: &NetConf, pod: &PodRef, api: PodApi) -> Result<String, String> {
    if conf.exclude_namespaces.contains(&pod.namespace) {
        return Ok(format!(
            "namespace {} is in excludeNamespaces",
            pod.namespace
        ));
    }
    let Some(kc) = &conf.kubeconfig else {
        return Err(
            "no kubeconfig in weir-cni's configuration to tell whether it is meshed".into(),
        );
    };
    match api(kc, pod) {
        Ok(classify::MeshVerdict::NotMeshed(why)) => Ok(format!("not meshed: {why}")),
        Ok(classify::MeshVerdict::Meshed(mesh)) => Err(format!("it is meshed ({mesh})")),
        Err(e) => Err(format!(
            "whether it is meshed is unknown: reading it from the Kubernetes API failed: {e}"
        )),
    }
}

fn required(env: Env, name: &str) -> Result<String, CniError> {
    env(name).filter(|v| !v.is_empty()).ok_or_else(|| {
        fail(
            ERR_INVALID_ENV,
            format!("{name} is not set; the container runtime sets it"),
            "",
        )
    })
}

fn request(env: Env, command: Command, conf: &NetConf, pod: PodRef) -> Request {
    Request {
        version: protocol::VERSION,
        command,
        container_id: env("CNI_CONTAINERID").unwrap_or_default(),
        netns: env("CNI_NETNS").unwrap_or_default(),
        ifname: env("CNI_IFNAME").unwrap_or_default(),
        pod,
        ips: conf.prev_result.as_ref().map(pod_ips).unwrap_or_default(),
    }
}

/// What happened, to print on stdout (or nothing) and for the log line.
struct Done {
    stdout: Option<String>,
    log: Option<String>,
}

fn passthrough(conf: &NetConf) -> Result<String, CniError> {
    let mut prev = conf.prev_result.clone().ok_or_else(|| {
        fail(
            ERR_INVALID_CONFIG,
            "no prevResult; weir-cni is a chained plugin and must come after the plugin that sets up the pod's network in a .conflist",
            "",
        )
    })?;
    if let Some(obj) = prev.as_object_mut() {
        obj.insert("cniVersion".into(), conf.cni_version.clone().into());
    }
    Ok(prev.to_string())
}

/// The environment variables the specification requires for `command`
/// (as libcni's `skel` checks them): an error naming every one missing.
fn required_env(env: Env, command: &str) -> Result<(), CniError> {
    let needed: &[&str] = match command {
        "ADD" | "CHECK" => &["CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME"],
        "DEL" => &["CNI_CONTAINERID", "CNI_IFNAME"],
        _ => &[],
    };
    let missing: Vec<&str> = needed
        .iter()
        .copied()
        .filter(|n| env(n).is_none_or(|v| v.is_empty()))
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    Err(fail(
        ERR_INVALID_ENV,
        format!(
            "{} not set for {command}; the container runtime sets {}",
            missing.join(", "),
            if missing.len() == 1 { "it" } else { "them" }
        ),
        "",
    ))
}

/// Whether `version` (one of [`SUPPORTED`]) is `min` or later.
fn at_least(version: &str, min: &str) -> bool {
    let at = |v: &str| SUPPORTED.iter().position(|s| *s == v);
    at(version) >= at(min)
}

/// The answer to VERSION. The specification says to echo the `cniVersion`
/// of the input; an input version this plugin does not speak (or none) is
/// answered with the latest it does, as libcni's `skel` always answers, so
/// the runtime never reads a claim to speak a version it cannot use.
fn version_info(stdin: &str) -> String {
    let v: Value = serde_json::from_str(stdin).unwrap_or(Value::Null);
    let version = v["cniVersion"]
        .as_str()
        .filter(|v| SUPPORTED.contains(v))
        .unwrap_or(LATEST);
    json!({"cniVersion": version, "supportedVersions": SUPPORTED}).to_string()
}

fn run(env: Env, stdin: &str, agent: Agent) -> Result<Done, CniError> {
    run_with(env, stdin, agent, &read_pod)
}

fn run_with(env: Env, stdin: &str, agent: Agent, api: PodApi) -> Result<Done, CniError> {
    let command = required(env, "CNI_COMMAND")?;
    if command == "VERSION" {
        return Ok(Done {
            stdout: Some(version_info(stdin)),
            log: None,
        });
    }
    required_env(env, &command)?;
    let conf = parse_conf(stdin)?;
    // CHECK exists from 0.4.0, STATUS and GC from 1.1.0; a configuration
    // of an older version must not be asked them.
    let since = match command.as_str() {
        "CHECK" => "0.4.0",
        "STATUS" | "GC" => "1.1.0",
        _ => "0.3.0",
    };
    if !at_least(&conf.cni_version, since) {
        return Err(fail(
            ERR_INCOMPATIBLE_VERSION,
            format!(
                "{command} needs cniVersion {since} or later; the configuration says {}",
                conf.cni_version
            ),
            "",
        ));
    }
    let pod = pod_ref(&env("CNI_ARGS").unwrap_or_default());
    match command.as_str() {
        "ADD" => {
            let out = passthrough(&conf)?;
            let Some(pod) = pod else {
                // Not a Kubernetes pod: nothing weir knows about.
                return Ok(Done {
                    stdout: Some(out),
                    log: None,
                });
            };
            let key = format!("{}/{}", pod.namespace, pod.name);
            let req = request(env, Command::Add, &conf, pod.clone());
            let mut log = None;
            let refused = match agent(&conf.socket, &req, conf.timeout) {
                Ok(Response::Enrolled { .. }) | Ok(Response::Skipped { .. }) => None,
                Ok(Response::Ok { .. }) => None,
                Ok(Response::Failed { message }) => Some(fail(
                    ERR_AGENT_REFUSED,
                    format!("pod {key} could not be enrolled for capture: {message}"),
                    "the pod's traffic would not reach its sidecar proxy, so its network set-up fails; the kubelet retries it",
                )),
                Err(e) => match starts_without_agent(&conf, &pod, api) {
                    Ok(why) => {
                        log = Some(format!(
                            "the weir agent is not reachable at {} ({e}); pod {key} starts: {why}",
                            conf.socket
                        ));
                        None
                    }
                    Err(why_not) => Some(fail(
                        ERR_TRY_AGAIN_LATER,
                        format!(
                            "the weir agent on this node is not reachable at {} ({e}); pod {key} cannot be enrolled for capture, and cannot start without it: {why_not}",
                            conf.socket
                        ),
                        "check that the weir DaemonSet pod runs on this node (kubectl -n weir-system get pods -o wide); the kubelet retries the pod",
                    )),
                },
            };
            match refused {
                None => Ok(Done {
                    stdout: Some(out),
                    log,
                }),
                Some(e) if conf.fail_open => Ok(Done {
                    stdout: Some(out),
                    log: Some(format!("failOpen: starting the pod anyway: {}", e.msg)),
                }),
                Some(e) => Err(e),
            }
        }
        "DEL" => {
            // DEL must succeed even when things are gone; the agent's
            // watcher removes the pod anyway when its netns disappears.
            let log = match pod {
                Some(pod) => {
                    let req = request(env, Command::Del, &conf, pod);
                    match agent(&conf.socket, &req, conf.timeout.min(Duration::from_secs(5))) {
                        Ok(_) => None,
                        Err(e) => Some(format!("DEL: agent not reachable ({e}); ignored")),
                    }
                }
                None => None,
            };
            Ok(Done { stdout: None, log })
        }
        "CHECK" => {
            passthrough(&conf)?;
            let Some(pod) = pod else {
                return Ok(Done {
                    stdout: None,
                    log: None,
                });
            };
            let key = format!("{}/{}", pod.namespace, pod.name);
            let req = request(env, Command::Check, &conf, pod);
            let problem = match agent(&conf.socket, &req, conf.timeout) {
                Ok(Response::Failed { message }) => Some(fail(
                    ERR_AGENT_REFUSED,
                    format!("pod {key} is not enrolled as it should be: {message}"),
                    "",
                )),
                Ok(_) => None,
                Err(e) => Some(fail(
                    ERR_TRY_AGAIN_LATER,
                    format!(
                        "the weir agent on this node is not reachable at {} ({e})",
                        conf.socket
                    ),
                    "",
                )),
            };
            match problem {
                Some(e) if !conf.fail_open => Err(e),
                _ => Ok(Done {
                    stdout: None,
                    log: None,
                }),
            }
        }
        "STATUS" => {
            let req = request(env, Command::Status, &conf, PodRef::default());
            match agent(&conf.socket, &req, conf.timeout) {
                Ok(Response::Failed { message }) if !conf.fail_open => Err(fail(
                    ERR_NOT_AVAILABLE,
                    format!("the weir agent is not ready: {message}"),
                    "",
                )),
                Err(e) if !conf.fail_open => Err(fail(
                    ERR_NOT_AVAILABLE,
                    format!(
                        "the weir agent on this node is not reachable at {} ({e})",
                        conf.socket
                    ),
                    "",
                )),
                _ => Ok(Done {
                    stdout: None,
                    log: None,
                }),
            }
        }
        "GC" => Ok(Done {
            stdout: None,
            log: None,
        }),
        other => Err(fail(
            ERR_INVALID_ENV,
            format!(
                "unknown CNI_COMMAND {other:?}; expected ADD, DEL, CHECK, STATUS, GC or VERSION"
            ),
            "",
        )),
    }
}

fn main() {
    let mut stdin = String::new();
    let read = std::io::stdin().read_to_string(&mut stdin);
    let env = |k: &str| std::env::var(k).ok();
    let result = match read {
        Ok(_) => run(&env, &stdin, &ask),
        Err(e) => Err(fail(ERR_IO, "cannot read stdin", e.to_string())),
    };
    match result {
        Ok(done) => {
            if let Some(l) = done.log {
                eprintln!("weir-cni: {l}");
            }
            if let Some(out) = done.stdout {
                println!("{out}");
            }
        }
        Err(e) => {
            let version = serde_json::from_str::<Value>(&stdin)
                .ok()
                .and_then(|v| v["cniVersion"].as_str().map(str::to_string))
                .filter(|v| SUPPORTED.contains(&v.as_str()))
                .unwrap_or_else(|| LATEST.to_string());
            let mut err = json!({"cniVersion": version, "code": e.code, "msg": e.msg});
            if !e.details.is_empty() {
                err["details"] = e.details.into();
            }
            println!("{err}");
            eprintln!("weir-cni: {}", e.msg);
            std::process::exit(1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;
    use std::collections::BTreeMap;

    const PREV: &str = r#"{"cniVersion":"1.0.0","interfaces":[
        {"name":"cali12ab","mac":"ee:ee:ee:ee:ee:ee"},
        {"name":"eth0","mac":"0a:58:0a:f4:01:11","sandbox":"/var/run/netns/cni-1"}],
        "ips":[{"address":"10.244.1.17/24","gateway":"10.244.1.1","interface":1},
               {"address":"fd00:10:244:1::11/64","interface":1},
               {"address":"169.254.1.1/32","interface":0}],
        "dns":{}}"#;

    fn conf(extra: &str) -> String {
        format!(
            r#"{{"cniVersion":"1.0.0","name":"k8s-pod-network","type":"weir-cni"{extra},"prevResult":{PREV}}}"#
        )
    }

    fn env_of(cmd: &str) -> impl Fn(&str) -> Option<String> {
        let mut m = BTreeMap::new();
        m.insert("CNI_COMMAND", cmd.to_string());
        m.insert("CNI_CONTAINERID", "4f6c".to_string());
        m.insert("CNI_NETNS", "/var/run/netns/cni-1".to_string());
        m.insert("CNI_IFNAME", "eth0".to_string());
        m.insert(
            "CNI_ARGS",
            "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=web-0;K8S_POD_INFRA_CONTAINER_ID=4f6c;K8S_POD_UID=3f1c".to_string(),
        );
        move |k: &str| m.get(k).cloned()
    }

    #[test]
    fn add_sends_the_pod_and_passes_prev_result_through() {
        let seen = RefCell::new(None);
        let agent = |sock: &str, r: &Request, _t: Duration| {
            assert_eq!(sock, "/run/x.sock");
            *seen.borrow_mut() = Some(r.clone());
            Ok(Response::Enrolled {
                cookie: 7,
                message: String::new(),
            })
        };
        let done = run(&env_of("ADD"), &conf(r#","socket":"/run/x.sock""#), &agent).unwrap();
        let r = seen.into_inner().unwrap();
        assert_eq!(r.command, Command::Add);
        assert_eq!(r.netns, "/var/run/netns/cni-1");
        assert_eq!(r.container_id, "4f6c");
        assert_eq!(
            r.pod,
            PodRef {
                namespace: "default".into(),
                name: "web-0".into(),
                uid: "3f1c".into(),
                service_account: String::new(),
            }
        );
        // The host-side interface's address is not the pod's.
        assert_eq!(r.ips, ["10.244.1.17", "fd00:10:244:1::11"]);
        let out: Value = serde_json::from_str(&done.stdout.unwrap()).unwrap();
        let prev: Value = serde_json::from_str(PREV).unwrap();
        assert_eq!(out, prev);
    }

    #[test]
    fn add_fails_closed_unless_fail_open() {
        let down = |_: &str, _: &Request, _: Duration| -> std::io::Result<Response> {
            Err(std::io::ErrorKind::ConnectionRefused.into())
        };
        let e = run(&env_of("ADD"), &conf(""), &down).err().unwrap();
        assert_eq!(e.code, ERR_TRY_AGAIN_LATER);
        assert!(e.msg.contains("/var/run/weir/cni.sock"), "{}", e.msg);
        let refused = |_: &str, _: &Request, _: Duration| {
            Ok(Response::Failed {
                message: "annotation x: bad".into(),
            })
        };
        let e = run(&env_of("ADD"), &conf(""), &refused).err().unwrap();
        assert_eq!(e.code, ERR_AGENT_REFUSED);
        assert!(e.msg.contains("default/web-0") && e.msg.contains("annotation x"));
        let done = run(&env_of("ADD"), &conf(r#","failOpen":true"#), &down).unwrap();
        assert!(done.stdout.is_some() && done.log.unwrap().contains("failOpen"));
    }

    #[test]
    fn not_a_pod_and_not_chained() {
        let never = |_: &str, _: &Request, _: Duration| -> std::io::Result<Response> {
            panic!("must not ask the agent")
        };
        let env = |k: &str| match k {
            "CNI_COMMAND" => Some("ADD".into()),
            "CNI_CONTAINERID" => Some("c".into()),
            "CNI_NETNS" => Some("/var/run/netns/x".into()),
            "CNI_IFNAME" => Some("eth0".into()),
            _ => None,
        };
        assert!(run(&env, &conf(""), &never).unwrap().stdout.is_some());
        let e = run(
            &env_of("ADD"),
            r#"{"cniVersion":"1.0.0","name":"n","type":"weir-cni"}"#,
            &never,
        )
        .err()
        .unwrap();
        assert_eq!(e.code, ERR_INVALID_CONFIG);
        assert!(e.msg.contains("chained"));
    }

    #[test]
    fn config_and_environment_errors() {
        let never = |_: &str, _: &Request, _: Duration| -> std::io::Result<Response> {
            panic!("must not ask the agent")
        };
        let e = run(&env_of("ADD"), "{", &never).err().unwrap();
        assert_eq!(e.code, ERR_DECODE);
        let e = run(
            &env_of("ADD"),
            r#"{"cniVersion":"0.2.0","name":"n","type":"weir-cni"}"#,
            &never,
        )
        .err()
        .unwrap();
        assert_eq!(e.code, ERR_INCOMPATIBLE_VERSION);
        let e = run(&env_of("ADD"), &conf(r#","failOpen":"yes""#), &never)
            .err()
            .unwrap();
        assert_eq!(e.code, ERR_INVALID_CONFIG);
        assert!(e.msg.contains("failOpen"));
        let e = run(&env_of("ADD"), &conf(r#","socket":"relative""#), &never)
            .err()
            .unwrap();
        assert!(e.msg.contains("socket"));
        let e = run(&env_of("FROB"), &conf(""), &never).err().unwrap();
        assert_eq!(e.code, ERR_INVALID_ENV);
        let e = run(&|_: &str| None, &conf(""), &never).err().unwrap();
        assert!(e.msg.contains("CNI_COMMAND"));
    }

    #[test]
    fn del_always_succeeds_and_version_lists() {
        let down = |_: &str, _: &Request, _: Duration| -> std::io::Result<Response> {
            Err(std::io::ErrorKind::NotFound.into())
        };
        let done = run(&env_of("DEL"), &conf(""), &down).unwrap();
        assert!(done.stdout.is_none());
        let done = run(&env_of("VERSION"), r#"{"cniVersion":"0.4.0"}"#, &down).unwrap();
        let v: Value = serde_json::from_str(&done.stdout.unwrap()).unwrap();
        assert_eq!(v["cniVersion"], "0.4.0");
        assert!(v["supportedVersions"].as_array().unwrap().len() >= 4);
        let v11 = conf("").replacen("1.0.0", "1.1.0", 1);
        let e = run(&env_of("STATUS"), &v11, &down).err().unwrap();
        assert_eq!(e.code, ERR_NOT_AVAILABLE);
        assert!(run(&env_of("GC"), &v11, &down).unwrap().stdout.is_none());
    }

    fn env_pod(cmd: &str, ns: &str, name: &str) -> impl Fn(&str) -> Option<String> {
        let env = env_of(cmd);
        let args = format!("K8S_POD_NAMESPACE={ns};K8S_POD_NAME={name};K8S_POD_UID=u-{name}");
        move |k: &str| {
            if k == "CNI_ARGS" {
                Some(args.clone())
            } else {
                env(k)
            }
        }
    }

    #[test]
    fn agent_down_lets_pods_start_that_lose_no_capture() {
        use classify::MeshVerdict;
        let down = |_: &str, _: &Request, _: Duration| -> std::io::Result<Response> {
            Err(std::io::ErrorKind::ConnectionRefused.into())
        };
        let asked = RefCell::new(Vec::new());
        let api = |kc: &str, p: &PodRef| {
            assert_eq!(kc, "/etc/cni/net.d/weir-kubeconfig");
            assert_eq!(p.uid, format!("u-{}", p.name));
            asked.borrow_mut().push(p.name.clone());
            match p.name.as_str() {
                "web" => Ok(MeshVerdict::Meshed(policy::Mesh::Istio)),
                "plain" => Ok(MeshVerdict::NotMeshed("no sidecar".into())),
                _ => Err("connection refused".to_string()),
            }
        };
        let c = conf(
            r#","excludeNamespaces":["kube-system"],"kubeconfig":"/etc/cni/net.d/weir-kubeconfig""#,
        );
        // Meshed: fails as before, saying why it cannot start.
        let e = run_with(&env_pod("ADD", "default", "web"), &c, &down, &api)
            .err()
            .unwrap();
        assert_eq!(e.code, ERR_TRY_AGAIN_LATER);
        assert!(
            e.msg.contains("not reachable") && e.msg.contains("meshed (istio)"),
            "{}",
            e.msg
        );
        // Clearly not meshed: starts, and says so on stderr.
        let done = run_with(&env_pod("ADD", "default", "plain"), &c, &down, &api).unwrap();
        assert!(done.stdout.is_some());
        let log = done.log.unwrap();
        assert!(
            log.contains("default/plain starts: not meshed: no sidecar"),
            "{log}"
        );
        // The API cannot tell: fails.
        let e = run_with(&env_pod("ADD", "default", "other"), &c, &down, &api)
            .err()
            .unwrap();
        assert_eq!(e.code, ERR_TRY_AGAIN_LATER);
        assert!(
            e.msg.contains("unknown") && e.msg.contains("connection refused"),
            "{}",
            e.msg
        );
        // Excluded namespace: starts without asking the API.
        asked.borrow_mut().clear();
        let done = run_with(&env_pod("ADD", "kube-system", "coredns-1"), &c, &down, &api).unwrap();
        assert!(done.log.unwrap().contains("excludeNamespaces"));
        assert!(asked.borrow().is_empty());
        // Without a kubeconfig, only the excluded namespaces start.
        let no_kc = conf(r#","excludeNamespaces":["kube-system"]"#);
        let e = run_with(&env_pod("ADD", "default", "plain"), &no_kc, &down, &api)
            .err()
            .unwrap();
        assert!(e.msg.contains("no kubeconfig"), "{}", e.msg);
        assert!(run_with(&env_pod("ADD", "kube-system", "x"), &no_kc, &down, &api).is_ok());
        // With the agent up, it decides; the API is never read.
        asked.borrow_mut().clear();
        let refused = |_: &str, _: &Request, _: Duration| {
            Ok(Response::Failed {
                message: "bad annotation".into(),
            })
        };
        let e = run_with(&env_pod("ADD", "kube-system", "x"), &c, &refused, &api)
            .err()
            .unwrap();
        assert_eq!(e.code, ERR_AGENT_REFUSED);
        assert!(asked.borrow().is_empty());
        // Bad settings are refused by name.
        for (extra, key) in [
            (r#","excludeNamespaces":"kube-system""#, "excludeNamespaces"),
            (r#","kubeconfig":"relative""#, "kubeconfig"),
        ] {
            let e = run_with(&env_of("ADD"), &conf(extra), &down, &api)
                .err()
                .unwrap();
            assert_eq!(e.code, ERR_INVALID_CONFIG);
            assert!(e.msg.contains(key), "{}", e.msg);
        }
    }

    fn without(cmd: &str, unset: &'static [&'static str]) -> impl Fn(&str) -> Option<String> {
        let env = env_of(cmd);
        move |k: &str| if unset.contains(&k) { None } else { env(k) }
    }

    #[test]
    fn required_environment_per_command() {
        let up = |_: &str, _: &Request, _: Duration| {
            Ok(Response::Ok {
                message: String::new(),
            })
        };
        // CHECK without CNI_NETNS: invalid environment (4), naming it,
        // before the agent is asked anything.
        let e = run(&without("CHECK", &["CNI_NETNS"]), &conf(""), &up)
            .err()
            .unwrap();
        assert_eq!(e.code, ERR_INVALID_ENV);
        assert!(e.msg.contains("CNI_NETNS"), "{}", e.msg);
        // Every missing variable is named.
        let e = run(
            &without("ADD", &["CNI_IFNAME", "CNI_CONTAINERID"]),
            &conf(""),
            &up,
        )
        .err()
        .unwrap();
        assert_eq!(e.code, ERR_INVALID_ENV);
        assert!(
            e.msg.contains("CNI_IFNAME") && e.msg.contains("CNI_CONTAINERID"),
            "{}",
            e.msg
        );
        // DEL does not need a netns (it may be gone), but a sandbox.
        assert!(run(&without("DEL", &["CNI_NETNS"]), &conf(""), &up).is_ok());
        let e = run(&without("DEL", &["CNI_CONTAINERID"]), &conf(""), &up)
            .err()
            .unwrap();
        assert_eq!(e.code, ERR_INVALID_ENV);
        // VERSION needs nothing but the command.
        assert!(run(&without("VERSION", &["CNI_NETNS", "CNI_IFNAME"]), "", &up).is_ok());
    }

    #[test]
    fn commands_are_refused_below_their_spec_version() {
        let up = |_: &str, _: &Request, _: Duration| {
            Ok(Response::Ok {
                message: String::new(),
            })
        };
        let with_version = |v: &str| {
            conf("").replacen(
                r#""cniVersion":"1.0.0""#,
                &format!(r#""cniVersion":"{v}""#),
                1,
            )
        };
        for v in ["0.3.0", "0.3.1"] {
            let e = run(&env_of("CHECK"), &with_version(v), &up).err().unwrap();
            assert_eq!(e.code, ERR_INCOMPATIBLE_VERSION, "CHECK at {v}");
            assert!(e.msg.contains("0.4.0"), "{}", e.msg);
            // ADD and DEL are fine at those versions.
            assert!(run(&env_of("ADD"), &with_version(v), &up).is_ok());
            assert!(run(&env_of("DEL"), &with_version(v), &up).is_ok());
        }
        for v in ["0.4.0", "1.0.0", "1.1.0"] {
            assert!(run(&env_of("CHECK"), &with_version(v), &up).is_ok(), "{v}");
        }
        for cmd in ["STATUS", "GC"] {
            let e = run(&env_of(cmd), &with_version("1.0.0"), &up)
                .err()
                .unwrap();
            assert_eq!(e.code, ERR_INCOMPATIBLE_VERSION, "{cmd}");
            assert!(run(&env_of(cmd), &with_version("1.1.0"), &up).is_ok());
        }
    }

    #[test]
    fn version_answers_with_a_version_it_speaks() {
        let never = |_: &str, _: &Request, _: Duration| -> std::io::Result<Response> {
            panic!("must not ask the agent")
        };
        let answer = |stdin: &str| -> Value {
            let done = run(&env_of("VERSION"), stdin, &never).unwrap();
            serde_json::from_str(&done.stdout.unwrap()).unwrap()
        };
        assert_eq!(answer(r#"{"cniVersion":"0.3.1"}"#)["cniVersion"], "0.3.1");
        for unsupported in [
            r#"{"cniVersion":"0.2.0"}"#,
            r#"{"cniVersion":"9.9.9"}"#,
            "",
            "{",
        ] {
            assert_eq!(answer(unsupported)["cniVersion"], LATEST, "{unsupported}");
        }
    }

    #[test]
    fn messages_carry_no_prefix_of_their_own() {
        // stderr adds "weir-cni: " once; the messages must not repeat it.
        let down = |_: &str, _: &Request, _: Duration| -> std::io::Result<Response> {
            Err(std::io::ErrorKind::ConnectionRefused.into())
        };
        let mut errors = vec![
            run(&env_of("ADD"), &conf(""), &down).err().unwrap(),
            run(&env_of("ADD"), "{", &down).err().unwrap(),
            run(&env_of("FROB"), &conf(""), &down).err().unwrap(),
            run(&env_of("ADD"), &conf(r#","socket":"x""#), &down)
                .err()
                .unwrap(),
            run(&without("ADD", &["CNI_NETNS"]), &conf(""), &down)
                .err()
                .unwrap(),
        ];
        errors.push(
            run(
                &env_of("ADD"),
                r#"{"cniVersion":"1.0.0","name":"n","type":"weir-cni"}"#,
                &down,
            )
            .err()
            .unwrap(),
        );
        for e in errors {
            assert!(
                !e.msg.starts_with("weir-cni:") && !e.msg.starts_with("weir:"),
                "{}",
                e.msg
            );
        }
    }

    #[test]
    fn old_result_formats() {
        let prev = json!({"ip4": {"ip": "10.1.0.5/16"}, "ip6": {"ip": "fd00::5/64"}});
        assert_eq!(pod_ips(&prev), ["10.1.0.5", "fd00::5"]);
        let prev = json!({"ips": [{"version": "4", "address": "10.1.0.6/16"}]});
        assert_eq!(pod_ips(&prev), ["10.1.0.6"]);
        assert!(pod_ips(&json!({})).is_empty());
        assert_eq!(pod_ref("K8S_POD_NAME=a"), None);
    }
}
