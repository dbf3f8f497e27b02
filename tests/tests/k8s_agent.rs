//! Kernel tests of `weir run --kubernetes` against a fake API server: the
//! watcher enrolls, updates and removes pods from the served list and
//! watch events; pods' network namespaces are found from their cgroups
//! through /proc (real processes in real namespaces); an API outage or an
//! expired watch never disturbs enrolled pods; the CNI plugin enrolls pods
//! the watcher has not seen yet.

mod k8s_support;

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use k8s_support::{CniCall, pod_json};
use serde_json::Value;
use weir_tests::fake_api::FakeApi;
use weir_tests::node::{Node, sidecar_log};
use weir_tests::{NetNs, Proc, Veth, require_root, spawn_in, veth_pair, wait_until, weir_bin};

const TIMEOUT: Duration = Duration::from_secs(15);

/// A node whose agent watches the fake API server.
struct K8sNode {
    agent: Option<Proc>,
    procs: Vec<Proc>,
    socket: PathBuf,
    api: FakeApi,
    node: Node,
}

impl K8sNode {
    fn start() -> K8sNode {
        let api = FakeApi::start();
        let node = Node::new();
        api.kubeconfig(&node.dir.join("kubeconfig"));
        let socket = node.dir.join("run/cni.sock");
        let agent = spawn_agent(&node, &socket);
        K8sNode {
            agent: Some(agent),
            procs: Vec::new(),
            socket,
            api,
            node,
        }
    }

    fn logs(&self) -> String {
        self.agent.as_ref().map(Proc::logs).unwrap_or_default()
    }

    /// Enrolled pods from `weir status`: name -> (cookie, outbound port).
    fn enrolled(&self) -> Vec<(String, u64, u64)> {
        self.node.status()["pods"]
            .as_array()
            .map(|a| {
                let mut v: Vec<(String, u64, u64)> = a
                    .iter()
                    .map(|p| {
                        (
                            p["name"].as_str().unwrap().to_string(),
                            p["netns_cookie"].as_u64().unwrap(),
                            p["outbound_port"].as_u64().unwrap(),
                        )
                    })
                    .collect();
                v.sort();
                v
            })
            .unwrap_or_default()
    }

    fn wait_enrolled(&self, what: &str, want: &[(&str, u64, u64)]) {
        let want: Vec<(String, u64, u64)> = want
            .iter()
            .map(|(n, c, p)| (n.to_string(), *c, *p))
            .collect();
        let mut last = Vec::new();
        let ok = (0..(TIMEOUT.as_millis() / 50)).any(|_| {
            last = self.enrolled();
            let done = last == want;
            if !done {
                std::thread::sleep(Duration::from_millis(50));
            }
            done
        });
        assert!(
            ok,
            "{what}: enrolled {last:?}, want {want:?}\n--- agent ---\n{}",
            self.logs()
        );
    }

    /// Starts a process of the pod (its "pause" container) in `ns` and
    /// puts it in the pod's cgroup (systemd driver layout, containerd)
    /// under the node's cgroup, as the kubelet would.
    fn pod_process(&mut self, ns: &NetNs, uid: &str) {
        let p = k8s_support::pod_process(&self.node, ns, uid);
        self.procs.push(p);
    }
}

impl Drop for K8sNode {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("--- agent logs ---\n{}", self.logs());
        }
        self.procs.clear();
        if let Some(mut p) = self.agent.take() {
            p.signal(nix::sys::signal::Signal::SIGTERM);
            let _ = p.wait_timeout(Duration::from_secs(10));
        }
    }
}

const UID_APP: &str = "6f1e2d3c-0000-4000-8000-00000000a001";
const UID_B: &str = "6f1e2d3c-0000-4000-8000-00000000b002";
const UID_FRESH: &str = "6f1e2d3c-0000-4000-8000-00000000c003";
const UID_BAD: &str = "6f1e2d3c-0000-4000-8000-00000000d004";
const UID_PLAIN: &str = "6f1e2d3c-0000-4000-8000-00000000e005";
const UID_SHOP: &str = "6f1e2d3c-0000-4000-8000-00000000e006";

fn istio(name: &str, uid: &str, ip: &str, ann: &[(&str, &str)]) -> Value {
    let mut a = vec![(
        "sidecar.istio.io/status",
        r#"{"containers":["istio-proxy"]}"#,
    )];
    a.extend_from_slice(ann);
    let ips: Vec<&str> = [ip].into_iter().filter(|i| !i.is_empty()).collect();
    pod_json(name, uid, &ips, &["app", "istio-proxy"], &a)
}

fn pods_with_upstream(prefix: &str, ip: &str) -> (NetNs, NetNs, Veth) {
    let pod = NetNs::new(prefix);
    let up = NetNs::new("k8sup");
    let veth = veth_pair(&pod, &[&format!("{ip}/24")], &up, &["198.18.7.254/24"]);
    (pod, up, veth)
}

#[test]
fn k8s_watcher_enrolls_updates_and_removes_pods() {
    if !require_root() {
        return;
    }
    let mut k = K8sNode::start();
    let (app_ns, up_ns, _veth) = pods_with_upstream("k8sapp", "198.18.7.1");
    let b_ns = NetNs::new("k8sb");
    let plain_ns = NetNs::new("k8spl");
    k.pod_process(&app_ns, UID_APP);
    k.pod_process(&b_ns, UID_B);
    k.pod_process(&plain_ns, UID_PLAIN);
    k.node.echo(&up_ns, 8080, "upstream", 1000);
    k.api.apply(istio("app", UID_APP, "198.18.7.1", &[]));
    k.api.apply(istio("b", UID_B, "198.18.7.50", &[]));
    // Not meshed: never enrolled although it has a process and a netns.
    k.api.apply(pod_json(
        "plain",
        UID_PLAIN,
        &["198.18.7.60"],
        &["nginx"],
        &[],
    ));

    k.wait_enrolled(
        "both meshed pods, found through their cgroups",
        &[("app", app_ns.cookie(), 15001), ("b", b_ns.cookie(), 15001)],
    );
    // The sidecar container starts; the app's connection is captured.
    let app_log = k.node.sidecar(&app_ns, "app-sidecar");
    let r = k.node.client(&app_ns, 1000, "198.18.7.254:8080");
    assert!(r.ok(), "{:?} sidecar: {:?}", r.json, sidecar_log(&app_log));
    assert_eq!(sidecar_log(&app_log)[0]["orig_dst"], "198.18.7.254:8080");

    // An annotation changes the policy.
    k.api.apply(istio(
        "app",
        UID_APP,
        "198.18.7.1",
        &[("weir.dev/outbound-port", "15009")],
    ));
    k.wait_enrolled(
        "the new outbound port",
        &[("app", app_ns.cookie(), 15009), ("b", b_ns.cookie(), 15001)],
    );
    // An invalid annotation keeps the last good policy and is logged.
    k.api.apply(istio(
        "app",
        UID_APP,
        "198.18.7.1",
        &[("weir.dev/outbound-port", "http")],
    ));
    wait_until(TIMEOUT, "the annotation error in the log", || {
        k.logs().contains("annotation weir.dev/outbound-port")
    });
    assert_eq!(k.enrolled()[0], ("app".into(), app_ns.cookie(), 15009));

    // Deleted in the API: removed.
    k.api.delete("app");
    k.wait_enrolled("app deleted", &[("b", b_ns.cookie(), 15001)]);
    // Its network namespace disappears (the pod's processes are gone)
    // while the API still lists it: removed too.
    for p in k.procs.iter_mut() {
        let pid = p.pid();
        let cg = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap_or_default();
        if cg.contains(&UID_B.replace('-', "_")) {
            p.kill();
        }
    }
    k.wait_enrolled("b's netns gone", &[]);
    let reqs = k.api.requests();
    assert!(
        reqs.iter().all(|r| !r.starts_with("/api/v1/pods")
            || r.contains("fieldSelector=spec.nodeName%3Dnode-a")),
        "{reqs:?}"
    );
}

#[test]
fn k8s_api_outage_and_expired_watches_do_not_disturb_enrolled_pods() {
    if !require_root() {
        return;
    }
    let mut k = K8sNode::start();
    let app_ns = NetNs::new("k8sapp");
    k.pod_process(&app_ns, UID_APP);
    k.api.apply(istio("app", UID_APP, "198.18.7.1", &[]));
    k.wait_enrolled("app", &[("app", app_ns.cookie(), 15001)]);
    let cookie = app_ns.cookie();

    // The API server goes away for a while: several resync passes run,
    // nothing changes.
    k.api.set_down(true);
    std::thread::sleep(Duration::from_secs(4));
    assert_eq!(k.enrolled(), vec![("app".into(), cookie, 15001)]);
    assert!(k.logs().contains("Kubernetes API:"), "{}", k.logs());

    // It comes back with a change made meanwhile.
    k.api.apply(istio(
        "app",
        UID_APP,
        "198.18.7.1",
        &[("weir.dev/outbound-port", "15011")],
    ));
    k.api.set_down(false);
    k.wait_enrolled("after the outage", &[("app", cookie, 15011)]);

    // A bookmark, then the watch expires (410 Gone): re-list, no change.
    k.api.bookmark();
    k.api.expire_watches();
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(k.enrolled(), vec![("app".into(), cookie, 15011)]);
    assert!(
        !k.logs().contains("pod default/app: removed"),
        "enrolled pod flapped:\n{}",
        k.logs()
    );
    let lists = k
        .api
        .requests()
        .iter()
        .filter(|r| r.starts_with("/api/v1/pods?") && !r.contains("watch=true"))
        .count();
    assert!(lists >= 2, "no re-list after 410: {:?}", k.api.requests());

    // A restarted agent with the API down keeps the pinned state as is.
    k.api.set_down(true);
    if let Some(mut p) = k.agent.take() {
        p.signal(nix::sys::signal::Signal::SIGTERM);
        p.wait_timeout(Duration::from_secs(10)).unwrap();
    }
    k.agent = Some(spawn_agent(&k.node, &k.socket));
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(k.enrolled(), vec![("app".into(), cookie, 15011)]);
    k.api.set_down(false);
    k.wait_enrolled("after the restart", &[("app", cookie, 15011)]);
}

/// `weir run --kubernetes` against the node's kubeconfig.
fn spawn_agent(node: &Node, socket: &std::path::Path) -> Proc {
    spawn_agent_with(node, socket, &[])
}

/// The same with extra arguments.
fn spawn_agent_with(node: &Node, socket: &std::path::Path, extra: &[&str]) -> Proc {
    let mut cmd = k8s_support::kubernetes_agent_command(node);
    cmd.arg("--cni-socket").arg(socket).args(extra);
    let mut p = spawn_in(None, None, cmd);
    p.wait_for_output("watching the pods of node node-a", TIMEOUT);
    p
}

#[test]
fn k8s_cni_add_enrolls_pods_the_watcher_has_not_seen() {
    if !require_root() {
        return;
    }
    let k = K8sNode::start();
    let fresh_ns = NetNs::new("k8sfr");
    let bad_ns = NetNs::new("k8sbad");
    k.api
        .apply(pod_json("other", UID_PLAIN, &[], &["nginx"], &[]));
    k.wait_enrolled("nothing", &[]);

    // The pod exists in the API, but the watcher has not seen it (the
    // event is late), and it has no process yet: only the plugin knows
    // its netns.
    k.api.insert_quietly(istio("fresh", UID_FRESH, "", &[]));
    let out = CniCall::add(
        "fresh",
        UID_FRESH,
        fresh_ns.path(),
        &k.socket,
        &["198.18.8.1"],
    )
    .run();
    assert_eq!(out.code, 0, "{:?} {}\n{}", out.json, out.stderr, k.logs());
    assert_eq!(
        k.enrolled(),
        vec![("fresh".into(), fresh_ns.cookie(), 15001)],
        "enrolled before ADD returned"
    );
    // Watcher passes (every second) keep it.
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(
        k.enrolled(),
        vec![("fresh".into(), fresh_ns.cookie(), 15001)]
    );
    // The watcher catches up (with the pod's address): still the same
    // netns, from the plugin.
    k.api.apply(istio("fresh", UID_FRESH, "198.18.8.1", &[]));
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        k.enrolled(),
        vec![("fresh".into(), fresh_ns.cookie(), 15001)]
    );

    // A meshed pod whose annotation is invalid does not start.
    k.api.apply(istio(
        "bad",
        UID_BAD,
        "",
        &[("traffic.sidecar.istio.io/includeInboundPorts", "8080,web")],
    ));
    let out = CniCall::add("bad", UID_BAD, bad_ns.path(), &k.socket, &["198.18.8.2"]).run();
    assert_eq!(out.json["code"], 100, "{:?}", out.json);
    let msg = out.json["msg"].as_str().unwrap();
    assert!(
        msg.contains("traffic.sidecar.istio.io/includeInboundPorts") && msg.contains("\"web\""),
        "{msg}"
    );
    // A pod the API does not have: the runtime retries later.
    let out = CniCall::add("ghost", UID_BAD, bad_ns.path(), &k.socket, &["198.18.8.3"]).run();
    assert_eq!(out.json["code"], 100, "{:?}", out.json);
    assert!(
        out.json["msg"]
            .as_str()
            .unwrap()
            .contains("not in the Kubernetes API")
    );
    // A pod that is not meshed: passed through.
    let out = CniCall::add(
        "other",
        UID_PLAIN,
        bad_ns.path(),
        &k.socket,
        &["198.18.8.4"],
    )
    .run();
    assert_eq!(out.code, 0, "{:?}", out.json);

    // The sandbox goes (DEL) and the pod is deleted: removed.
    let del = CniCall::add("fresh", UID_FRESH, fresh_ns.path(), &k.socket, &[])
        .with_command("DEL")
        .run();
    assert_eq!(del.code, 0);
    k.api.delete("fresh");
    k.wait_enrolled("fresh removed", &[]);
}

const UID_V4: &str = "6f1e2d3c-0000-4000-8000-00000000f104";
const UID_V6: &str = "6f1e2d3c-0000-4000-8000-00000000f106";
const UID_DUAL: &str = "6f1e2d3c-0000-4000-8000-00000000f146";

/// An Istio pod (no dual stack) with `ips` in its status.
fn istio_ips(name: &str, uid: &str, ips: &[&str]) -> Value {
    pod_json(
        name,
        uid,
        ips,
        &["app", "istio-proxy"],
        &[(
            "sidecar.istio.io/status",
            r#"{"containers":["istio-proxy"]}"#,
        )],
    )
}

/// As the kubelet does it: the pod is in the API without addresses, CNI
/// ADD gives them, and only later does the kubelet write status.podIPs.
/// Capture follows the ADD's addresses from the moment ADD returns, the
/// watcher's passes in between never take it away (its view has no
/// addresses), and the status update changes nothing. IPv4-only,
/// IPv6-only (Istio captures IPv6 for an IPv6-first pod) and dual stack
/// (IPv4 first: Istio without ISTIO_DUAL_STACK captures IPv4 only).
#[test]
fn k8s_cni_add_addresses_decide_capture_until_the_api_has_them() {
    if !require_root() {
        return;
    }
    let mut k = K8sNode::start();
    struct Case {
        name: &'static str,
        uid: &'static str,
        ips: &'static [&'static str],
        cidrs: &'static [&'static str],
        up: &'static [&'static str],
        /// Destination and whether the sidecar sees it.
        conns: &'static [(&'static str, bool)],
    }
    let cases = [
        Case {
            name: "v4only",
            uid: UID_V4,
            ips: &["198.18.9.1"],
            cidrs: &["198.18.9.1/24"],
            up: &["198.18.9.254/24"],
            conns: &[("198.18.9.254:8080", true)],
        },
        Case {
            name: "v6only",
            uid: UID_V6,
            ips: &["2001:2:0:9::1"],
            cidrs: &["2001:2:0:9::1/64"],
            up: &["2001:2:0:9::fe/64"],
            conns: &[("[2001:2:0:9::fe]:8080", true)],
        },
        Case {
            name: "dual",
            uid: UID_DUAL,
            ips: &["198.18.10.1", "2001:2:0:10::1"],
            cidrs: &["198.18.10.1/24", "2001:2:0:10::1/64"],
            up: &["198.18.10.254/24", "2001:2:0:10::fe/64"],
            conns: &[
                ("198.18.10.254:8080", true),
                ("[2001:2:0:10::fe]:8080", false),
            ],
        },
    ];
    let mut pods = Vec::new();
    for c in &cases {
        let ns = NetNs::new(&format!("k8s{}", &c.name[..4]));
        let up = NetNs::new("k8sup");
        let veth = veth_pair(&ns, c.cidrs, &up, c.up);
        k.node.echo(&up, 8080, "upstream", 1000);
        // Scheduled: in the API (and the watcher's store), no addresses.
        k.api.apply(istio_ips(c.name, c.uid, &[]));
        pods.push((ns, up, veth));
    }
    for c in &cases {
        wait_until(TIMEOUT, "the watcher has the pods", || {
            k.logs().contains(&format!(
                "pod default/{}: meshed, but no network namespace",
                c.name
            ))
        });
    }
    let mut logs = Vec::new();
    for (c, (ns, _, _)) in cases.iter().zip(&pods) {
        // The runtime's order: netns, CNI ADD, then the sandbox's process.
        let out = CniCall::add(c.name, c.uid, ns.path(), &k.socket, c.ips).run();
        assert_eq!(out.code, 0, "{}: {:?} {}", c.name, out.json, out.stderr);
        k.pod_process(ns, c.uid);
        logs.push(k.node.sidecar(ns, &format!("{}-sidecar", c.name)));
    }
    let check = |k: &K8sNode, when: &str| {
        for ((c, (ns, _, _)), log) in cases.iter().zip(&pods).zip(&logs) {
            for (dst, captured) in c.conns {
                let before = sidecar_log(log).len();
                let r = k.node.client(ns, 1000, dst);
                assert!(r.ok(), "{when}: {} -> {dst}: {:?}", c.name, r.json);
                let recs = sidecar_log(log);
                if *captured {
                    assert_eq!(
                        recs.len(),
                        before + 1,
                        "{when}: {} -> {dst} not captured\n{}",
                        c.name,
                        k.logs()
                    );
                    assert_eq!(recs[before]["orig_dst"], *dst, "{when}: {}", c.name);
                } else {
                    assert_eq!(recs.len(), before, "{when}: {} -> {dst} captured", c.name);
                }
            }
        }
    };
    check(&k, "right after ADD");
    // Watcher passes (every second) with no podIPs in the API.
    std::thread::sleep(Duration::from_secs(3));
    check(&k, "after watcher passes without podIPs");
    // The kubelet reports the addresses.
    for c in &cases {
        k.api.apply(istio_ips(c.name, c.uid, c.ips));
    }
    std::thread::sleep(Duration::from_secs(2));
    check(&k, "after the status update");
    let mut want: Vec<(&str, u64, u64)> = cases
        .iter()
        .zip(&pods)
        .map(|(c, (ns, _, _))| (c.name, ns.cookie(), 15001))
        .collect();
    want.sort();
    k.wait_enrolled("all three", &want);
}

/// With the agent down only new meshed pods wait: pods of the excluded
/// namespaces and pods the API shows are not meshed start, through the
/// entry and kubeconfig the agent installed. Once the agent is back, the
/// kubelet's retry of the meshed pod enrolls it.
#[test]
fn k8s_agent_down_only_meshed_pods_wait() {
    if !require_root() {
        return;
    }
    let mut k = K8sNode::start();
    // The agent again, now installing weir-cni into a node's CNI
    // configuration (bridge + host-local, as on the real node).
    let conf_dir = k.node.dir.join("net.d");
    std::fs::create_dir_all(&conf_dir).unwrap();
    let bridge = serde_json::json!({"cniVersion": "1.0.0", "name": "weir-test", "plugins": [
        {"type": "bridge", "bridge": "cni0", "ipam": {"type": "host-local", "ranges": [[{"subnet": "198.18.11.0/24"}]]}},
        {"type": "portmap", "capabilities": {"portMappings": true}}]});
    let list_path = conf_dir.join("10-bridge.conflist");
    std::fs::write(&list_path, bridge.to_string()).unwrap();
    let conf_arg = conf_dir.to_string_lossy().into_owned();
    let restart = |k: &mut K8sNode| {
        if let Some(mut p) = k.agent.take() {
            p.signal(nix::sys::signal::Signal::SIGTERM);
            p.wait_timeout(Duration::from_secs(10)).unwrap();
        }
        k.agent = Some(spawn_agent_with(
            &k.node,
            &k.socket,
            &["--cni-conf-dir", &conf_arg],
        ));
    };
    restart(&mut k);
    let kubeconfig = conf_dir.join("weir-kubeconfig");
    wait_until(TIMEOUT, "weir-cni chained", || {
        std::fs::read_to_string(&list_path).is_ok_and(|t| t.contains("weir-cni"))
            && kubeconfig.exists()
    });
    let list: Value = serde_json::from_str(&std::fs::read_to_string(&list_path).unwrap()).unwrap();
    let entry = list["plugins"][2].clone();
    assert_eq!(entry["type"], "weir-cni");
    assert_eq!(
        entry["excludeNamespaces"],
        serde_json::json!(["kube-system"])
    );
    assert_eq!(entry["kubeconfig"], kubeconfig.to_string_lossy().as_ref());
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&kubeconfig).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);

    let web_ns = NetNs::new("k8sweb");
    let other_ns = NetNs::new("k8soth");
    k.api.apply(istio("web", UID_APP, "", &[]));
    k.api
        .apply(pod_json("plain", UID_PLAIN, &[], &["nginx"], &[]));
    let socket = k.socket.clone();
    let call = |name: &str, uid: &str, ns: &NetNs, ip: &str| {
        CniCall::add(name, uid, ns.path(), &socket, &[ip]).with_entry(&list, &entry)
    };

    // The agent is down.
    if let Some(mut p) = k.agent.take() {
        p.signal(nix::sys::signal::Signal::SIGTERM);
        p.wait_timeout(Duration::from_secs(10)).unwrap();
    }
    let web = call("web", UID_APP, &web_ns, "198.18.11.2").run();
    assert_eq!(web.code, 1, "{:?}", web.json);
    assert_eq!(web.json["code"], 11, "{:?}", web.json);
    let msg = web.json["msg"].as_str().unwrap();
    assert!(
        msg.contains("not reachable")
            && msg.contains("default/web")
            && msg.contains("meshed (istio)"),
        "{msg}"
    );
    assert!(
        !web.stderr.contains("weir-cni: weir-cni:"),
        "{}",
        web.stderr
    );
    // Not meshed (read from the API): starts.
    let plain = call("plain", UID_PLAIN, &other_ns, "198.18.11.3").run();
    assert_eq!(plain.code, 0, "{:?} {}", plain.json, plain.stderr);
    assert_eq!(
        plain.json,
        k8s_support::prev_result(other_ns.path(), &["198.18.11.3"])
    );
    assert!(plain.stderr.contains("not meshed"), "{}", plain.stderr);
    // kube-system: starts without the API (CoreDNS is not in this API).
    let dns = call("coredns-5d78c9869d-x2x7k", UID_B, &other_ns, "198.18.11.4")
        .in_namespace("kube-system")
        .run();
    assert_eq!(dns.code, 0, "{:?} {}", dns.json, dns.stderr);
    assert!(dns.stderr.contains("excludeNamespaces"), "{}", dns.stderr);
    // No mesh label of its own, in a namespace labelled ambient: weir-cni
    // reads the namespace, so the pod is meshed (ambient) and waits.
    k.api
        .apply_namespace("shop", &[("istio.io/dataplane-mode", "ambient")]);
    let mut shopper = pod_json("shopper", UID_SHOP, &[], &["app"], &[]);
    shopper["metadata"]["namespace"] = "shop".into();
    k.api.apply(shopper);
    let shop_call = || {
        call("shopper", UID_SHOP, &other_ns, "198.18.11.5")
            .in_namespace("shop")
            .run()
    };
    let shop = shop_call();
    assert_eq!(shop.code, 1, "{:?} {}", shop.json, shop.stderr);
    assert_eq!(shop.json["code"], 11, "{:?}", shop.json);
    let msg = shop.json["msg"].as_str().unwrap();
    assert!(
        msg.contains("shop/shopper") && msg.contains("meshed (ambient)"),
        "{msg}"
    );
    // Not allowed to read namespaces (403): the pod's own labels decide,
    // as in the agent; it has none, so it is not meshed and starts.
    k.api.forbid_namespaces(true);
    let shop = shop_call();
    assert_eq!(shop.code, 0, "{:?} {}", shop.json, shop.stderr);
    assert!(shop.stderr.contains("not meshed"), "{}", shop.stderr);
    k.api.forbid_namespaces(false);
    k.api.delete_in("shop", "shopper");
    k.api.delete_namespace("shop");
    // The API away too: whether "plain" is meshed is unknown, so it waits.
    k.api.set_down(true);
    let unknown = call("plain", UID_PLAIN, &other_ns, "198.18.11.3").run();
    assert_eq!(unknown.json["code"], 11, "{:?}", unknown.json);
    assert!(
        unknown.json["msg"].as_str().unwrap().contains("unknown"),
        "{:?}",
        unknown.json
    );
    k.api.set_down(false);
    assert!(k.enrolled().is_empty());

    // The agent is back: the kubelet's retry of the meshed pod enrolls it.
    restart(&mut k);
    let web = call("web", UID_APP, &web_ns, "198.18.11.2").run();
    assert_eq!(web.code, 0, "{:?} {}", web.json, web.stderr);
    assert_eq!(k.enrolled(), vec![("web".into(), web_ns.cookie(), 15001)]);

    // `weir cni uninstall` leaves the node as it was.
    if let Some(mut p) = k.agent.take() {
        p.signal(nix::sys::signal::Signal::SIGTERM);
        p.wait_timeout(Duration::from_secs(10)).unwrap();
    }
    let out = Command::new(weir_bin())
        .args(["cni", "uninstall", "--cni-conf-dir", &conf_arg])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let after: Value = serde_json::from_str(&std::fs::read_to_string(&list_path).unwrap()).unwrap();
    assert_eq!(after, bridge);
    assert!(!kubeconfig.exists());
}
