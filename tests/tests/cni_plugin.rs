//! Kernel tests of the `weir-cni` chained plugin, run exactly as a
//! container runtime runs it (CNI environment, configuration with
//! `prevResult` on stdin) against a running agent and real network
//! namespaces. The agent runs in local mode here (the pods file says which
//! pods are meshed); `k8s_agent.rs` runs it against a fake API server.

mod k8s_support;

use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use k8s_support::CniCall;
use serde_json::{Value, json};
use weir_tests::node::{Node, sidecar_log};
use weir_tests::{NetNs, Proc, require_root, spawn_in, veth_pair, wait_until, weir_bin};

/// A node whose agent serves the CNI socket.
struct CniNode {
    agent: Option<Proc>,
    socket: PathBuf,
    node: Node,
}

impl CniNode {
    /// A node with `pods` (pods-file YAML) and an agent that only
    /// re-reads the file when it changes (no periodic resync), so every
    /// enrollment seen in a test was made by the CNI request.
    fn new(pods_yaml: &str) -> CniNode {
        let node = Node::new();
        node.write_pods_raw(pods_yaml);
        let socket = node.dir.join("run/cni.sock");
        let mut n = CniNode {
            agent: None,
            socket,
            node,
        };
        n.start();
        n
    }

    fn start(&mut self) {
        let mut cmd = Command::new(weir_bin());
        cmd.env("RUST_LOG", "info")
            .arg("run")
            .arg("--pods-file")
            .arg(&self.node.pods_file)
            .arg("--cgroup")
            .arg(self.node.cgroup.path())
            .arg("--bpffs")
            .arg(self.node.bpffs.path())
            .arg("--metrics-addr")
            .arg(format!("127.0.0.1:{}", self.node.metrics_port))
            .args(["--reload-ms", "50", "--resync-secs", "3600"])
            .arg("--cni-socket")
            .arg(&self.socket);
        let mut p = spawn_in(None, None, cmd);
        p.wait_for_output("pods file applied", Duration::from_secs(20));
        assert!(self.socket.exists(), "no CNI socket:\n{}", p.logs());
        self.agent = Some(p);
    }

    fn stop(&mut self) {
        if let Some(mut p) = self.agent.take() {
            p.signal(nix::sys::signal::Signal::SIGTERM);
            p.wait_timeout(Duration::from_secs(10))
                .unwrap_or_else(|| panic!("agent did not stop:\n{}", p.logs()));
        }
    }

    fn logs(&self) -> String {
        self.agent.as_ref().map(Proc::logs).unwrap_or_default()
    }

    /// `namespace/name` -> netns cookie, from `weir status`.
    fn enrolled(&self) -> Vec<(String, u64)> {
        let st = self.node.status();
        st["pods"]
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|p| {
                        (
                            format!(
                                "{}/{}",
                                p["namespace"].as_str().unwrap(),
                                p["name"].as_str().unwrap()
                            ),
                            p["netns_cookie"].as_u64().unwrap(),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default()
    }
}

impl Drop for CniNode {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("--- agent logs ---\n{}", self.logs());
        }
        self.stop();
    }
}

/// The pods file: `web` is meshed. Its netns is only known at CNI ADD time
/// (the entry's path does not exist, so the file alone enrolls nothing).
fn pods_yaml(extra: &str) -> String {
    format!(
        "pods:\n  - name: web\n    netns: /var/run/netns/weir-test-not-yet-{pid}\n    ips: ['198.18.6.1']\n{extra}",
        pid = std::process::id()
    )
}

#[test]
fn cni_add_enrolls_the_pod_before_it_returns() {
    if !require_root() {
        return;
    }
    let pod = NetNs::new("cniweb");
    let upstream = NetNs::new("cniup");
    let _veth = veth_pair(&pod, &["198.18.6.1/24"], &upstream, &["198.18.6.2/24"]);
    let mut n = CniNode::new(&pods_yaml(""));

    // The socket is root-only.
    let meta = std::fs::metadata(&n.socket).unwrap();
    assert!(meta.file_type().is_socket());
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);

    // Before ADD: nothing is enrolled.
    assert!(n.enrolled().is_empty(), "{:?}", n.enrolled());

    let out = CniCall::add("web", "uid-web", pod.path(), &n.socket, &["198.18.6.1"]).run();
    assert_eq!(out.code, 0, "ADD failed: {:?} {}", out.json, out.stderr);
    // The moment ADD has returned, the pod is enrolled with its netns...
    let enrolled = n.enrolled();
    assert_eq!(
        enrolled,
        vec![("default/web".to_string(), pod.cookie())],
        "enrolled right after ADD returned (took {:?})",
        out.took
    );
    // ...and the plugin passed the previous result through unchanged.
    assert_eq!(
        out.json,
        k8s_support::prev_result(pod.path(), &["198.18.6.1"]),
        "prevResult passthrough"
    );
    // The pod's containers start (the sidecar first, as Istio orders
    // them); the application's very first connection is captured.
    let sidecar_log_path = n.node.sidecar(&pod, "web-sidecar");
    n.node.echo(&upstream, 8080, "upstream", 1000);
    let r = n.node.client(&pod, 1000, "198.18.6.2:8080");
    assert!(r.ok(), "{:?}", r.json);
    let recs = sidecar_log(&sidecar_log_path);
    assert_eq!(
        recs.len(),
        1,
        "first connection through the sidecar: {recs:?}"
    );
    assert_eq!(recs[0]["orig_dst"], "198.18.6.2:8080");
    assert!(
        n.logs().contains("CNI ADD default/web: enrolled"),
        "{}",
        n.logs()
    );

    // CHECK agrees; a second ADD (a runtime retry) is harmless.
    let check = CniCall::add("web", "uid-web", pod.path(), &n.socket, &["198.18.6.1"])
        .with_command("CHECK")
        .run();
    assert_eq!(check.code, 0, "{:?} {}", check.json, check.stderr);
    let again = CniCall::add("web", "uid-web", pod.path(), &n.socket, &["198.18.6.1"]).run();
    assert_eq!(again.code, 0, "{:?}", again.json);
    assert_eq!(
        n.enrolled(),
        vec![("default/web".to_string(), pod.cookie())]
    );

    // DEL succeeds.
    let del = CniCall::add("web", "uid-web", pod.path(), &n.socket, &[])
        .with_command("DEL")
        .run();
    assert_eq!(del.code, 0, "{:?} {}", del.json, del.stderr);
    assert_eq!(del.json, Value::Null);

    // The agent counted each request by command and result, with its
    // latency.
    let m = n.node.metrics();
    for series in [
        "weir_cni_requests_total{command=\"add\",result=\"enrolled\"} 2",
        "weir_cni_requests_total{command=\"check\",result=\"ok\"} 1",
        "weir_cni_requests_total{command=\"del\",result=\"ok\"} 1",
        "weir_cni_request_duration_seconds_count{command=\"add\"} 2",
    ] {
        assert!(m.contains(series), "{series} not in:\n{m}");
    }
}

#[test]
fn cni_add_fails_closed_when_the_agent_cannot_enroll() {
    if !require_root() {
        return;
    }
    let pod = NetNs::new("cnidn");
    let mut n = CniNode::new(&pods_yaml(
        "  - name: badann\n    netns: /var/run/netns/weir-test-none\n    annotations:\n      traffic.sidecar.istio.io/excludeOutboundPorts: '80,http'\n",
    ));

    // A pod the pods file does not list is not meshed: passed through,
    // not enrolled.
    let plain = CniCall::add("plain", "uid-plain", pod.path(), &n.socket, &["198.18.6.9"]).run();
    assert_eq!(plain.code, 0, "{:?} {}", plain.json, plain.stderr);
    assert!(plain.json["ips"].is_array());
    assert!(n.enrolled().is_empty());

    // A meshed pod whose entry is invalid: refused, with the reason.
    let bad = CniCall::add("badann", "uid-bad", pod.path(), &n.socket, &["198.18.6.9"]).run();
    assert_eq!(bad.code, 1, "{:?}", bad.json);
    assert_eq!(bad.json["code"], 100, "{:?}", bad.json);
    assert!(
        bad.json["msg"].as_str().unwrap().contains("default/badann"),
        "{:?}",
        bad.json
    );

    // A netns path that does not exist: refused, naming the path.
    let missing = PathBuf::from("/var/run/netns/weir-test-no-such-netns");
    let gone = CniCall::add("web", "uid-web", &missing, &n.socket, &["198.18.6.1"]).run();
    assert_eq!(gone.json["code"], 100, "{:?}", gone.json);
    assert!(
        gone.json["msg"]
            .as_str()
            .unwrap()
            .contains("weir-test-no-such-netns"),
        "{:?}",
        gone.json
    );

    // The agent is down: ADD fails with "try again later", and the kubelet
    // would retry; nothing was enrolled.
    n.stop();
    let down = CniCall::add("web", "uid-web", pod.path(), &n.socket, &["198.18.6.1"]).run();
    assert_eq!(down.code, 1, "{:?}", down.json);
    assert_eq!(down.json["code"], 11, "{:?}", down.json);
    assert_eq!(down.json["cniVersion"], "1.0.0");
    let msg = down.json["msg"].as_str().unwrap();
    assert!(
        msg.contains("not reachable") && msg.contains("default/web"),
        "{msg}"
    );
    assert!(n.enrolled().is_empty());

    // failOpen: the operator's switch lets the pod start.
    let open = CniCall::add("web", "uid-web", pod.path(), &n.socket, &["198.18.6.1"])
        .set("failOpen", json!(true))
        .run();
    assert_eq!(open.code, 0, "{:?}", open.json);
    assert!(open.stderr.contains("failOpen"), "{}", open.stderr);
    assert_eq!(
        open.json,
        k8s_support::prev_result(pod.path(), &["198.18.6.1"])
    );

    // DEL never fails, even without an agent; CHECK and STATUS do.
    let del = CniCall::add("web", "uid-web", pod.path(), &n.socket, &[])
        .with_command("DEL")
        .run();
    assert_eq!(del.code, 0, "{}", del.stderr);
    let check = CniCall::add("web", "uid-web", pod.path(), &n.socket, &["198.18.6.1"])
        .with_command("CHECK")
        .run();
    assert_eq!(check.json["code"], 11, "{:?}", check.json);
    let status = CniCall::add("web", "uid-web", pod.path(), &n.socket, &[])
        .with_command("STATUS")
        .set("cniVersion", json!("1.1.0"))
        .run();
    assert_eq!(status.json["code"], 50, "{:?}", status.json);

    // The agent is back: the same ADD now enrolls.
    n.start();
    let ok = CniCall::add("web", "uid-web", pod.path(), &n.socket, &["198.18.6.1"]).run();
    assert_eq!(ok.code, 0, "{:?} {}", ok.json, ok.stderr);
    wait_until(Duration::from_secs(1), "enrolled", || {
        n.enrolled() == vec![("default/web".to_string(), pod.cookie())]
    });
}

#[test]
fn cni_version_and_bad_input() {
    if !require_root() {
        return;
    }
    let pod = NetNs::new("cniver");
    let sock = PathBuf::from("/nonexistent/weir/cni.sock");
    let v = CniCall::add("x", "u", pod.path(), &sock, &[])
        .with_command("VERSION")
        .run();
    assert_eq!(v.code, 0);
    let versions: Vec<&str> = v.json["supportedVersions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap())
        .collect();
    for want in ["0.3.1", "0.4.0", "1.0.0", "1.1.0"] {
        assert!(versions.contains(&want), "{versions:?}");
    }
    // Not chained after a network plugin: no prevResult.
    let mut c = CniCall::add("x", "u", pod.path(), &sock, &[]);
    c.prev_result = None;
    let out = c.run();
    assert_eq!(out.json["code"], 7, "{:?}", out.json);
    assert!(out.json["msg"].as_str().unwrap().contains("chained"));
    let out = CniCall::add("x", "u", pod.path(), &sock, &[])
        .set("cniVersion", json!("0.2.0"))
        .run();
    assert_eq!(out.json["code"], 1, "{:?}", out.json);
}
