//! weir as ztunnel's node agent (ZDS), against the real ztunnel binary
//! (`WEIR_ZTUNNEL_BIN`, built by `cargo xtask test` from the shared source;
//! xtask/src/ztunnel.rs).
//!
//! ztunnel runs in shared (in-pod) mode in a network namespace of its own
//! (so its admin, stats and readiness ports are private to the test), with
//! a local XDS file and the fake CA. What it does with what weir hands it
//! is read from ztunnel itself: its admin `config_dump` (`workloadState`:
//! the pods whose proxies it runs) and the sockets it opens inside each
//! pod's network namespace (its HBONE listener, port 15008). The listener's
//! inode tells whether a proxy kept running or was restarted.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

mod k8s_support;

use serde_json::Value;
use weir_tests::{NetNs, Proc, TempDir, spawn_in, wait_until, weir_bin};

/// ztunnel's HBONE port: it listens there in every pod it serves.
const HBONE_PORT: u16 = 15008;

/// A pod: a network namespace and its workload entry.
struct Pod {
    uid: String,
    name: String,
    ns: NetNs,
}

impl Pod {
    fn new(name: &str) -> Pod {
        Pod {
            uid: format!("uid-{name}-{}", std::process::id()),
            name: name.to_string(),
            ns: NetNs::new("zp"),
        }
    }

    /// The inode of ztunnel's HBONE listener in this pod, if there is one.
    fn hbone_listener(&self) -> Option<u64> {
        hbone_listener(&self.ns)
    }
}

/// The inode of ztunnel's HBONE listener in `ns`, if there is one.
fn hbone_listener(ns: &NetNs) -> Option<u64> {
    ns.run_in(|| {
        let port = format!(":{HBONE_PORT:04X}");
        ["tcp6", "tcp"].iter().find_map(|f| {
            let text = std::fs::read_to_string(format!("/proc/thread-self/net/{f}")).ok()?;
            text.lines().skip(1).find_map(|l| {
                let cols: Vec<&str> = l.split_whitespace().collect();
                // local_address, state 0A (LISTEN), inode.
                (cols.len() > 9 && cols[1].ends_with(&port) && cols[3] == "0A")
                    .then(|| cols[9].parse().ok())
                    .flatten()
            })
        })
    })
}

/// One workloads-file entry.
fn entry(p: &Pod, netns: Option<&Path>) -> String {
    let mut s = format!(
        "  - uid: {}\n    name: {}\n    namespace: zds-test\n    service_account: sa-{}\n",
        p.uid, p.name, p.name
    );
    if let Some(n) = netns {
        s.push_str(&format!("    netns: {}\n", n.display()));
    }
    s
}

/// The test's node: the socket, the workloads file, weir zds-serve.
struct Node {
    dir: TempDir,
    socket: PathBuf,
    file: PathBuf,
    agent: Option<Proc>,
}

impl Node {
    fn new() -> Node {
        let dir = TempDir::new("zds");
        let socket = dir.join("run/ztunnel.sock");
        let file = dir.join("workloads.yaml");
        let n = Node {
            socket,
            file,
            dir,
            agent: None,
        };
        n.write("workloads: []\n");
        n
    }

    /// Replaces the workloads file atomically.
    fn write(&self, text: &str) {
        let tmp = self.dir.join("workloads.yaml.tmp");
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, &self.file).unwrap();
    }

    fn set(&self, entries: &[String]) {
        let mut s = String::from("workloads:\n");
        for e in entries {
            s.push_str(e);
        }
        self.write(&s);
    }

    fn start_agent(&mut self) {
        let mut cmd = Command::new(weir_bin());
        cmd.env("RUST_LOG", "info")
            .arg("zds-serve")
            .arg("--socket")
            .arg(&self.socket)
            .arg("--workloads")
            .arg(&self.file)
            .args(["--reload-ms", "50"]);
        let mut p = spawn_in(None, None, cmd);
        p.wait_for_output("workloads file applied", Duration::from_secs(10));
        self.agent = Some(p);
    }

    fn kill_agent(&mut self) {
        if let Some(mut p) = self.agent.take() {
            p.kill();
        }
    }

    fn agent_logs(&self) -> String {
        self.agent.as_ref().map(Proc::logs).unwrap_or_default()
    }

    fn wait_log(&self, needle: &str) {
        wait_until(Duration::from_secs(15), needle, || {
            self.agent_logs().contains(needle)
        });
    }

    fn count_log(&self, needle: &str) -> usize {
        self.agent_logs().matches(needle).count()
    }
}

/// A ztunnel in shared mode, in its own network namespace.
struct Ztunnel {
    ns: NetNs,
    proc: Proc,
    _dir: TempDir,
}

impl Ztunnel {
    fn start(bin: &Path, socket: &Path) -> Ztunnel {
        let dir = TempDir::new("zt");
        let xds = dir.join("xds.yaml");
        std::fs::write(&xds, "workloads: []\nservices: []\n").unwrap();
        let ns = NetNs::new("zt");
        let cmd = weir_tests::ztunnel_command(bin, socket, &xds, "zds-test-node");
        let mut proc = spawn_in(Some(&ns), None, cmd);
        proc.wait_for_output("in-pod mode enabled", Duration::from_secs(20));
        Ztunnel {
            ns,
            proc,
            _dir: dir,
        }
    }

    /// `workloadState` of ztunnel's config dump: uid -> entry.
    fn workloads(&self) -> BTreeMap<String, Value> {
        let body = self.ns.run_in(|| {
            let mut s = TcpStream::connect(("127.0.0.1", 15000)).ok()?;
            s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
            s.write_all(
                b"GET /config_dump HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
            )
            .ok()?;
            let mut out = Vec::new();
            s.read_to_end(&mut out).ok()?;
            Some(String::from_utf8_lossy(&out).into_owned())
        });
        let Some(body) = body else {
            return BTreeMap::new();
        };
        let json = body.split_once("\r\n\r\n").map_or("", |(_, b)| b);
        let v: Value = serde_json::from_str(json).unwrap_or(Value::Null);
        v["workloadState"]
            .as_object()
            .map(|m| m.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
            .unwrap_or_default()
    }

    /// UIDs whose proxy is up.
    fn up(&self) -> Vec<String> {
        self.workloads()
            .into_iter()
            .filter(|(_, v)| v["state"] == "Up")
            .map(|(k, _)| k)
            .collect()
    }

    fn wait_up(&self, want: &[&Pod]) {
        let mut want: Vec<String> = want.iter().map(|p| p.uid.clone()).collect();
        want.sort();
        wait_until(
            Duration::from_secs(15),
            &format!("ztunnel serving exactly {want:?}"),
            || self.up() == want,
        );
    }

    fn logs(&self) -> String {
        self.proc.logs()
    }
}

/// Root and the ztunnel binary, or `None` to skip (outside CI).
fn setup() -> Option<PathBuf> {
    if !weir_tests::require_root() {
        return None;
    }
    weir_tests::ztunnel_bin()
}

#[test]
fn snapshot_hands_the_listed_pods_to_ztunnel() {
    let Some(bin) = setup() else { return };
    let (a, b, c) = (Pod::new("a"), Pod::new("b"), Pod::new("c"));
    let mut node = Node::new();
    node.set(&[
        entry(&a, Some(a.ns.path())),
        entry(&b, Some(b.ns.path())),
        // No network namespace yet: kept, not added.
        entry(&c, None),
    ]);
    node.start_agent();
    let zt = Ztunnel::start(&bin, &node.socket);
    zt.wait_up(&[&a, &b]);
    node.wait_log("pods added, 1 kept");
    assert!(node.agent_logs().contains("2 pods added, 1 kept"));
    let w = zt.workloads();
    let info = &w[&a.uid]["info"];
    assert_eq!(info["name"], "a", "{w:?}");
    assert_eq!(info["namespace"], "zds-test");
    assert_eq!(info["serviceAccount"], "sa-a");
    assert!(!w.contains_key(&c.uid), "c was only kept: {w:?}");
    // ztunnel's proxies run inside the pods' namespaces.
    assert!(a.hbone_listener().is_some(), "{}", zt.logs());
    assert!(b.hbone_listener().is_some());
    assert!(c.hbone_listener().is_none());
}

#[test]
fn pods_added_and_deleted_after_the_snapshot() {
    let Some(bin) = setup() else { return };
    let (a, b) = (Pod::new("a"), Pod::new("b"));
    let mut node = Node::new();
    node.start_agent();
    let zt = Ztunnel::start(&bin, &node.socket);
    node.wait_log("0 pods added, 0 kept");
    node.set(&[entry(&a, Some(a.ns.path()))]);
    zt.wait_up(&[&a]);
    wait_until(Duration::from_secs(5), "a's HBONE listener", || {
        a.hbone_listener().is_some()
    });
    node.set(&[entry(&b, Some(b.ns.path()))]);
    zt.wait_up(&[&b]);
    // a's proxy is gone from its namespace.
    wait_until(Duration::from_secs(10), "a's listener closed", || {
        a.hbone_listener().is_none()
    });
    assert!(b.hbone_listener().is_some());
}

/// Pods `a` and `b`, an agent listing both, and ztunnel serving them.
fn two_pods_served(bin: &Path) -> (Pod, Pod, Node, Ztunnel) {
    let (a, b) = (Pod::new("a"), Pod::new("b"));
    let mut node = Node::new();
    node.set(&[entry(&a, Some(a.ns.path())), entry(&b, Some(b.ns.path()))]);
    node.start_agent();
    let zt = Ztunnel::start(bin, &node.socket);
    zt.wait_up(&[&a, &b]);
    (a, b, node, zt)
}

#[test]
fn keep_saves_a_pod_whose_netns_cannot_be_opened() {
    let Some(bin) = setup() else { return };
    let (a, b, mut node, zt) = two_pods_served(&bin);
    let a_listener = a.hbone_listener().expect("a's proxy listens");
    // A new agent that cannot open a's namespace (and no longer lists b):
    // a is kept, b is dropped by ztunnel at the end of the snapshot.
    node.kill_agent();
    node.set(&[entry(&a, Some(Path::new("/nonexistent/netns/a")))]);
    node.start_agent();
    node.wait_log("0 pods added, 1 kept");
    zt.wait_up(&[&a]);
    wait_until(Duration::from_secs(10), "b's listener closed", || {
        b.hbone_listener().is_none()
    });
    assert_eq!(
        a.hbone_listener(),
        Some(a_listener),
        "a's proxy kept running (same listener)"
    );
    // Once the namespace can be opened again, a is handed over (the same
    // netns: ztunnel keeps the proxy it runs).
    node.set(&[entry(&a, Some(a.ns.path()))]);
    node.wait_log(&format!("pod zds-test/a (uid {}) handed to ztunnel", a.uid));
    assert_eq!(a.hbone_listener(), Some(a_listener));
    assert_eq!(zt.up(), vec![a.uid.clone()]);
}

#[test]
fn ztunnel_reconnect_gets_a_fresh_snapshot() {
    let Some(bin) = setup() else { return };
    let (a, b, node, zt) = two_pods_served(&bin);
    drop(zt);
    wait_until(Duration::from_secs(10), "ztunnel's proxies gone", || {
        a.hbone_listener().is_none() && b.hbone_listener().is_none()
    });
    let zt = Ztunnel::start(&bin, &node.socket);
    zt.wait_up(&[&a, &b]);
    assert!(a.hbone_listener().is_some() && b.hbone_listener().is_some());
    assert_eq!(
        node.count_log("2 pods added, 0 kept"),
        2,
        "one snapshot per connection"
    );
}

#[test]
fn a_pod_deleted_while_ztunnel_is_down_is_not_served_after() {
    let Some(bin) = setup() else { return };
    let (a, b, node, zt) = two_pods_served(&bin);
    drop(zt);
    node.wait_log("closed");
    node.set(&[entry(&a, Some(a.ns.path()))]);
    node.wait_log("workloads file applied: 1 workloads");
    let zt = Ztunnel::start(&bin, &node.socket);
    zt.wait_up(&[&a]);
    node.wait_log("1 pods added, 0 kept");
    assert!(b.hbone_listener().is_none());
    assert!(a.hbone_listener().is_some());
}

#[test]
fn agent_restart_leaves_ztunnel_serving_its_pods() {
    let Some(bin) = setup() else { return };
    let (a, b, mut node, zt) = two_pods_served(&bin);
    let before = (a.hbone_listener(), b.hbone_listener());
    assert!(before.0.is_some() && before.1.is_some());
    node.kill_agent();
    // Agent down: ztunnel goes on serving both pods.
    std::thread::sleep(Duration::from_millis(500));
    zt.wait_up(&[&a, &b]);
    assert_eq!((a.hbone_listener(), b.hbone_listener()), before);
    // A new agent: the same pods in its snapshot, nothing restarted.
    node.start_agent();
    node.wait_log("2 pods added, 0 kept");
    zt.wait_up(&[&a, &b]);
    assert_eq!(
        (a.hbone_listener(), b.hbone_listener()),
        before,
        "the proxies kept running across the agent restart\n{}",
        zt.logs()
    );
}

/// A ztunnel upgrade: the new ztunnel connects while the old one still
/// runs. New pods go to the newest connection only; deletions to both.
#[test]
fn adds_go_to_the_newest_ztunnel_and_deletes_to_both() {
    let Some(bin) = setup() else { return };
    let (a, b) = (Pod::new("a"), Pod::new("b"));
    let mut node = Node::new();
    node.set(&[entry(&a, Some(a.ns.path()))]);
    node.start_agent();
    let old = Ztunnel::start(&bin, &node.socket);
    old.wait_up(&[&a]);
    let new = Ztunnel::start(&bin, &node.socket);
    new.wait_up(&[&a]);
    node.set(&[entry(&a, Some(a.ns.path())), entry(&b, Some(b.ns.path()))]);
    new.wait_up(&[&a, &b]);
    assert_eq!(
        old.up(),
        vec![a.uid.clone()],
        "the old ztunnel gets no new pod"
    );
    node.set(&[entry(&b, Some(b.ns.path()))]);
    new.wait_up(&[&b]);
    old.wait_up(&[]);
}

/// `weir run --zds-socket`: the agent's own reconcile pass (pods file)
/// feeds ZDS with the ambient pods it enrolled; sidecar pods and pods it
/// could not enroll are not handed over.
#[test]
fn weir_run_hands_its_enrolled_ambient_pods_to_ztunnel() {
    use weir_tests::node::{Node as WeirNode, PodEntry};
    let Some(bin) = setup() else { return };
    let (a, b) = (NetNs::new("zp"), NetNs::new("zp"));
    let sidecar = NetNs::new("zp");
    let dir = TempDir::new("zds");
    let socket = dir.join("ztunnel.sock");
    let ambient = |name: &str, ns: &NetNs, ip: &str| PodEntry {
        mesh: Some("ambient".into()),
        ..PodEntry::new(name, ns, &[ip])
    };
    let gone = PodEntry {
        netns: PathBuf::from("/nonexistent/netns/gone"),
        ..ambient("gone", &b, "198.18.7.3")
    };
    let mut node = WeirNode::new();
    node.write_pods_yaml(&[
        ambient("a", &a, "198.18.7.1"),
        ambient("b", &b, "198.18.7.2"),
        PodEntry::new("side", &sidecar, &["198.18.7.4"]),
        // Cannot be enrolled (no such netns): kept, never handed over.
        gone.clone(),
    ]);
    let sock = socket.to_str().unwrap().to_string();
    node.start_agent_with(&["--zds-socket", &sock]);
    let zt = Ztunnel::start(&bin, &socket);
    let up = |want: &[&str]| {
        let mut want: Vec<String> = want.iter().map(|s| s.to_string()).collect();
        want.sort();
        wait_until(
            Duration::from_secs(15),
            &format!("ztunnel serving {want:?}"),
            || {
                let mut names: Vec<String> = zt
                    .workloads()
                    .values()
                    .filter(|v| v["state"] == "Up")
                    .filter_map(|v| v["info"]["name"].as_str().map(str::to_string))
                    .collect();
                names.sort();
                names == want
            },
        );
    };
    up(&["a", "b"]);
    node.wait_log("2 pods added, 1 kept");
    assert!(hbone_listener(&a).is_some() && hbone_listener(&b).is_some());
    assert!(
        hbone_listener(&sidecar).is_none(),
        "the sidecar pod is not ztunnel's"
    );
    // b leaves the pods file: ztunnel stops its proxy; "gone" stays kept
    // (no delete for it).
    node.write_pods_yaml(&[ambient("a", &a, "198.18.7.1"), gone]);
    up(&["a"]);
    wait_until(Duration::from_secs(5), "b's listener closed", || {
        hbone_listener(&b).is_none()
    });
    let m = node.metrics();
    assert!(m.contains("weir_zds_connections 1"), "{m}");
    assert!(m.contains("weir_zds_workloads 2"), "{m}");
    assert!(
        m.contains("weir_zds_requests_total{kind=\"del\",result=\"acked\"} 1"),
        "{m}"
    );
}

/// A CNI ADD of an ambient pod hands it to ztunnel and returns only once
/// ztunnel runs its proxy (as istio-cni does), and fails, naming ztunnel,
/// while no ztunnel is connected.
#[test]
fn cni_add_of_an_ambient_pod_returns_once_ztunnel_serves_it() {
    use k8s_support::CniCall;
    use weir_tests::node::Node as WeirNode;
    let Some(bin) = setup() else { return };
    let pod = NetNs::new("zp");
    let mut node = WeirNode::new();
    // The file's netns does not exist: only the ADD knows the pod's.
    node.write_pods_raw(&format!(
        "pods:\n  - name: web\n    mesh: ambient\n    uid: uid-web\n    netns: /var/run/netns/weir-test-not-yet-{}\n    ips: ['198.18.6.1']\n",
        std::process::id()
    ));
    let cni = node.dir.join("run/cni.sock");
    let zsock = node.dir.join("run/ztunnel.sock");
    node.start_agent_with(&[
        "--zds-socket",
        zsock.to_str().unwrap(),
        "--cni-socket",
        cni.to_str().unwrap(),
    ]);
    let add = || CniCall::add("web", "uid-web", pod.path(), &cni, &["198.18.6.1"]).run();
    let out = add();
    assert_ne!(out.code, 0, "no ztunnel: the ADD fails");
    let said = format!("{} {}", out.json, out.stderr);
    assert!(said.contains("no ztunnel is connected"), "{said}");
    let zt = Ztunnel::start(&bin, &zsock);
    // Its snapshot keeps the pod (not enrolled from the file alone).
    node.wait_log("0 pods added, 1 kept");
    let out = add();
    assert_eq!(out.code, 0, "{} {}", out.json, out.stderr);
    // The moment ADD returned, ztunnel runs the pod's proxy in its netns.
    assert_eq!(zt.up(), vec!["uid-web".to_string()], "{}", zt.logs());
    assert!(hbone_listener(&pod).is_some());
}

/// `weir run --kubernetes --zds-socket` against the fake API server, with
/// the real ztunnel: a pod labelled ambient and a pod whose *namespace*
/// is labelled ambient are captured and handed over; a pod labelled
/// `none` in that namespace and a plain pod are not. Removing the
/// namespace's label deletes its pod from ztunnel and removes its
/// capture; labelling it again hands it over again. `weir status` and
/// `weir explain` name the label that decided.
#[test]
fn k8s_mode_enrolls_by_pod_and_namespace_label_and_follows_relabelling() {
    use k8s_support::{kubernetes_agent_command, pod_json, pod_process, state_file};
    use weir_tests::fake_api::FakeApi;
    use weir_tests::node::Node as WeirNode;
    let Some(bin) = setup() else { return };
    const AMBIENT: (&str, &str) = ("istio.io/dataplane-mode", "ambient");
    let api = FakeApi::start();
    api.apply_namespace("shop", &[AMBIENT]);
    api.apply_namespace("plain", &[]);
    let node = WeirNode::new();
    api.kubeconfig(&node.dir.join("kubeconfig"));
    // (name, namespace, pod labels, uid, address)
    let pods = [
        (
            "own",
            "plain",
            Some("ambient"),
            "7a000001-0000-4000-8000-000000000001",
            "198.18.9.1",
        ),
        (
            "web",
            "shop",
            None,
            "7a000002-0000-4000-8000-000000000002",
            "198.18.9.2",
        ),
        (
            "out",
            "shop",
            Some("none"),
            "7a000003-0000-4000-8000-000000000003",
            "198.18.9.3",
        ),
        (
            "db",
            "plain",
            None,
            "7a000004-0000-4000-8000-000000000004",
            "198.18.9.4",
        ),
    ];
    let mut netns = BTreeMap::new();
    let mut procs = Vec::new();
    for (name, ns, mode, uid, ip) in pods {
        let mut p = pod_json(name, uid, &[ip], &["app"], &[]);
        p["metadata"]["namespace"] = ns.into();
        p["spec"]["serviceAccountName"] = format!("sa-{name}").into();
        if let Some(m) = mode {
            p["metadata"]["labels"][AMBIENT.0] = m.into();
        }
        api.apply(p);
        let n = NetNs::new("zk");
        procs.push(pod_process(&node, &n, uid));
        netns.insert(name, n);
    }
    let zsock = node.dir.join("run/ztunnel.sock");
    let mut cmd = kubernetes_agent_command(&node);
    cmd.arg("--cni-socket")
        .arg(node.dir.join("run/cni.sock"))
        .arg("--zds-socket")
        .arg(&zsock);
    let started = std::time::Instant::now();
    let agent = spawn_in(None, None, cmd);
    let zt = Ztunnel::start(&bin, &zsock);
    let served = || -> Vec<String> {
        let mut names: Vec<String> = zt
            .workloads()
            .values()
            .filter(|v| v["state"] == "Up")
            .filter_map(|v| {
                Some(format!(
                    "{}/{}",
                    v["info"]["namespace"].as_str()?,
                    v["info"]["name"].as_str()?
                ))
            })
            .collect();
        names.sort();
        names
    };
    let status = || -> Value {
        let out = Command::new(weir_bin())
            .args(["status", "-o", "json", "--bpffs"])
            .arg(node.bpffs.path())
            .arg("--state-file")
            .arg(state_file(&node))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    };
    // name -> (mode, reason) of the enrolled pods.
    let enrolled = || -> BTreeMap<String, (String, String)> {
        status()["pods"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| {
                (
                    format!(
                        "{}/{}",
                        p["namespace"].as_str().unwrap(),
                        p["name"].as_str().unwrap()
                    ),
                    (
                        p["mode"].as_str().unwrap_or("").to_string(),
                        p["reason"].as_str().unwrap_or("").to_string(),
                    ),
                )
            })
            .collect()
    };
    let wait = |what: &str, want: &[&str]| {
        let want: Vec<String> = want.iter().map(|s| s.to_string()).collect();
        let ok = (0..300).any(|_| {
            let done = served() == want && enrolled().keys().cloned().collect::<Vec<_>>() == want;
            if !done {
                std::thread::sleep(Duration::from_millis(50));
            }
            done
        });
        assert!(
            ok,
            "{what}: ztunnel serves {:?}, weir enrolled {:?}, want {want:?}\n--- agent ---\n{}\n--- ztunnel ---\n{}",
            served(),
            enrolled(),
            agent.logs(),
            zt.logs()
        );
    };
    wait("at start", &["plain/own", "shop/web"]);
    let handed_over = started.elapsed();
    let e = enrolled();
    assert_eq!(
        e["shop/web"],
        (
            "ambient".into(),
            "namespace label istio.io/dataplane-mode=ambient".into()
        )
    );
    assert_eq!(
        e["plain/own"],
        (
            "ambient".into(),
            "pod label istio.io/dataplane-mode=ambient".into()
        )
    );
    let w = zt.workloads();
    let web = &w["7a000002-0000-4000-8000-000000000002"]["info"];
    assert_eq!(web["serviceAccount"], "sa-web", "{w:?}");
    for (name, listens) in [("own", true), ("web", true), ("out", false), ("db", false)] {
        assert_eq!(
            hbone_listener(&netns[name]).is_some(),
            listens,
            "{name}: ztunnel's HBONE listener\n{}",
            zt.logs()
        );
    }
    // The text forms say it too.
    let text = Command::new(weir_bin())
        .args(["status", "--bpffs"])
        .arg(node.bpffs.path())
        .arg("--state-file")
        .arg(state_file(&node))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(
        text.contains("ambient because: namespace label istio.io/dataplane-mode=ambient"),
        "{text}"
    );
    let explain = Command::new(weir_bin())
        .args([
            "explain",
            "--pod",
            "shop/web",
            "--dst",
            "198.18.9.1:9080",
            "--bpffs",
        ])
        .arg(node.bpffs.path())
        .arg("--state-file")
        .arg(state_file(&node))
        .output()
        .unwrap();
    let explain = String::from_utf8_lossy(&explain.stdout);
    assert!(
        explain.contains("ambient:  namespace label istio.io/dataplane-mode=ambient")
            && explain.contains("CAPTURED"),
        "{explain}"
    );

    // The namespace loses its label: web is deleted from ztunnel (its
    // proxy stops) and its capture removed; the pod-labelled one stays.
    let own_listener = hbone_listener(&netns["own"]);
    api.apply_namespace("shop", &[("team", "x")]);
    wait("namespace unlabelled", &["plain/own"]);
    wait_until(
        Duration::from_secs(10),
        "web's HBONE listener closed",
        || hbone_listener(&netns["web"]).is_none(),
    );
    assert_eq!(
        hbone_listener(&netns["own"]),
        own_listener,
        "own's proxy untouched"
    );
    let m = node.metrics();
    assert!(
        m.contains("weir_zds_requests_total{kind=\"del\",result=\"acked\"} 1"),
        "{m}"
    );

    // Labelled again: handed over again; `none` still opts out.
    api.apply_namespace("shop", &[AMBIENT]);
    wait("namespace labelled again", &["plain/own", "shop/web"]);
    assert!(hbone_listener(&netns["web"]).is_some());
    assert!(hbone_listener(&netns["out"]).is_none());
    eprintln!(
        "k8s ZDS: pods handed to ztunnel {} ms after the agent started",
        handed_over.as_millis()
    );
    drop(procs);
}
