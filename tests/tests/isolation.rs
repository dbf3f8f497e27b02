//! Isolation kernel tests: one pod can never read or influence another
//! pod's state through weir, and no process other than the proxy's
//! identity escapes capture. Each test builds its own node (child cgroup,
//! private bpffs, agent) and pod network namespaces; they need root and run
//! one at a time.

use std::time::Duration;

use serde_json::Value;
use weir_tests::node::{Node, PodEntry, sidecar_log};
use weir_tests::{NetNs, require_root, veth_pair, wait_until};

const APP_UID: u32 = 1000;

fn wait_records(log: &std::path::Path, n: usize) -> Vec<Value> {
    wait_until(Duration::from_secs(10), "sidecar log records", || {
        sidecar_log(log).len() >= n
    });
    sidecar_log(log)
}

fn lines(out: &str) -> Vec<Value> {
    out.lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// An "island": an application pod and a server joined by a veth, with the
/// same addresses in every island (198.18.5.1 and 198.18.5.2).
struct Island {
    pod: NetNs,
    server: NetNs,
    _veth: weir_tests::Veth,
}

fn island(name: &str) -> Island {
    let pod = NetNs::new(name);
    let server = NetNs::new("srv");
    let veth = veth_pair(&pod, &["198.18.5.1/24"], &server, &["198.18.5.2/24"]);
    Island {
        pod,
        server,
        _veth: veth,
    }
}

/// Two enrolled pods whose application sockets have exactly the same
/// address and port at the same moment (each pod is its own island with
/// the same addresses), connecting to different original destinations.
/// Only the network-namespace cookie tells the flows apart: each proxy
/// (UID 1337) must read its own pod's original destination with
/// `SO_ORIGINAL_DST`, never the other pod's, on every connection.
#[test]
fn original_destinations_never_cross_pods() {
    if !require_root() {
        return;
    }
    let a = island("isoa");
    let b = island("isob");
    let mut node = Node::with_agent();
    // No `ips`: both pods' addresses are found in their namespaces.
    node.set_pods(&[
        PodEntry::new("pod-a", &a.pod, &[]),
        PodEntry::new("pod-b", &b.pod, &[]),
    ]);
    let alog = node.sidecar(&a.pod, "sidecar-a");
    let blog = node.sidecar(&b.pod, "sidecar-b");
    for (isl, tag) in [(&a, "a"), (&b, "b")] {
        for port in [8081u16, 8082] {
            node.echo(&isl.server, port, &format!("{tag}-{port}"), APP_UID);
        }
    }
    const N: u16 = 40;
    let run = |pod: &NetNs, port: u16| {
        node.run_in_pod(
            pod,
            &[
                "--uid",
                "1000",
                "fixed-port-client",
                "--connect",
                &format!("198.18.5.2:{port}"),
                "--bind",
                "198.18.5.1",
                "--first-port",
                "41000",
                "--count",
                &N.to_string(),
            ],
        )
    };
    // Both pods at once, so the same (address, port) is in flight in both.
    let (out_a, out_b) = std::thread::scope(|s| {
        let ta = s.spawn(|| run(&a.pod, 8081));
        let tb = s.spawn(|| run(&b.pod, 8082));
        (ta.join().unwrap(), tb.join().unwrap())
    });
    for (out, want_dst, want_server) in [
        (&out_a, "198.18.5.2:8081", "a-8081"),
        (&out_b, "198.18.5.2:8082", "b-8082"),
    ] {
        let recs = lines(out);
        assert_eq!(recs.len(), N as usize, "{out}");
        for (i, r) in recs.iter().enumerate() {
            assert_eq!(r["ok"], true, "{r}\n{}", node.agent_logs());
            assert_eq!(r["local"], format!("198.18.5.1:{}", 41000 + i), "{r}");
            assert_eq!(r["peer"], want_dst, "getpeername: {r}");
            let reply: Value = serde_json::from_str(r["reply"].as_str().unwrap().trim()).unwrap();
            assert_eq!(reply["server"], want_server, "{r}");
        }
    }
    for (log, want_dst) in [(&alog, "198.18.5.2:8081"), (&blog, "198.18.5.2:8082")] {
        let recs = wait_records(log, N as usize);
        assert_eq!(recs.len(), N as usize, "{recs:?}");
        for r in &recs {
            assert_eq!(r["listener"], "outbound", "{r}");
            assert_eq!(r["orig_dst"], want_dst, "SO_ORIGINAL_DST crossed pods: {r}");
        }
        let mut ports: Vec<String> = recs.iter().map(|r| r["peer"].to_string()).collect();
        ports.sort();
        ports.dedup();
        assert_eq!(ports.len(), N as usize, "one record per app connection");
    }
    for name in ["pod-a", "pod-b"] {
        let c = node.counters(name);
        assert_eq!(c["outbound_captured"], N, "{name}: {c}");
        assert_eq!(c["orig_dst_answered"], N, "{name}: {c}");
    }
}

/// Two pods on one link; while pod A's application connects out, pod B's
/// proxy identity (UID 1337) reads `SO_ORIGINAL_DST` on every socket it
/// accepts and gets only B's destinations: with distinct pod addresses
/// (the normal case), concurrently.
#[test]
fn proxy_of_one_pod_never_sees_another_pods_destinations() {
    if !require_root() {
        return;
    }
    let a = NetNs::new("isoa");
    let b = NetNs::new("isob");
    let srv = NetNs::new("srv");
    let _va = veth_pair(&a, &["198.18.6.1/24"], &srv, &["198.18.6.2/24"]);
    let _vb = veth_pair(&b, &["198.18.7.1/24"], &srv, &["198.18.7.2/24"]);
    let mut node = Node::with_agent();
    node.set_pods(&[
        PodEntry::new("pod-a", &a, &["198.18.6.1"]),
        PodEntry::new("pod-b", &b, &["198.18.7.1"]),
    ]);
    let alog = node.sidecar(&a, "sidecar-a");
    let blog = node.sidecar(&b, "sidecar-b");
    node.echo(&srv, 8081, "s-8081", APP_UID);
    node.echo(&srv, 8082, "s-8082", APP_UID);
    const N: u32 = 30;
    let run = |pod: &NetNs, dst: &str| {
        node.run_in_pod(
            pod,
            &[
                "--uid",
                "1000",
                "client",
                "--connect",
                dst,
                "--count",
                &N.to_string(),
                "--interval-ms",
                "0",
            ],
        )
    };
    let (out_a, out_b) = std::thread::scope(|s| {
        let ta = s.spawn(|| run(&a, "198.18.6.2:8081"));
        let tb = s.spawn(|| run(&b, "198.18.7.2:8082"));
        (ta.join().unwrap(), tb.join().unwrap())
    });
    assert!(lines(&out_a).iter().all(|r| r["ok"] == true), "{out_a}");
    assert!(lines(&out_b).iter().all(|r| r["ok"] == true), "{out_b}");
    for (log, want) in [(&alog, "198.18.6.2:8081"), (&blog, "198.18.7.2:8082")] {
        let recs = wait_records(log, N as usize);
        assert_eq!(recs.len(), N as usize);
        assert!(recs.iter().all(|r| r["orig_dst"] == want), "{recs:?}");
    }
}

/// Only the proxy's identity goes direct. Istio's rules: UID 1337 or
/// (primary) GID 1337 is the proxy; everyone else is captured, root
/// included, whatever their supplementary groups.
#[test]
fn only_the_proxy_identity_escapes_capture() {
    if !require_root() {
        return;
    }
    let pod = NetNs::new("iso");
    let srv = NetNs::new("srv");
    let _v = veth_pair(&pod, &["198.18.8.1/24"], &srv, &["198.18.8.2/24"]);
    let mut node = Node::with_agent();
    node.set_pods(&[PodEntry::new("pod", &pod, &["198.18.8.1"])]);
    let log = node.sidecar(&pod, "sidecar");
    node.echo(&srv, 8080, "upstream", APP_UID);
    let captured: &[(u32, u32, &str)] = &[
        (0, 0, ""),
        (1000, 1000, ""),
        (1336, 1336, ""),
        (1338, 1338, ""),
        (65534, 65534, ""),
        (1000, 1000, "1337"),
        (0, 1338, "1337"),
    ];
    let mut seen = 0;
    for (uid, gid, groups) in captured {
        let mut global = vec![
            "--uid".to_string(),
            uid.to_string(),
            "--gid".into(),
            gid.to_string(),
        ];
        if !groups.is_empty() {
            global.extend(["--groups".into(), groups.to_string()]);
        }
        let g: Vec<&str> = global.iter().map(String::as_str).collect();
        let r = node.client_with(&pod, &g, "198.18.8.2:8080", &[]);
        assert!(r.ok(), "uid {uid} gid {gid}: {:?}", r.json);
        seen += 1;
        let recs = wait_records(&log, seen);
        let rec = &recs[seen - 1];
        assert_eq!(
            rec["peer"],
            Value::String(r.local()),
            "uid {uid} gid {gid} groups {groups:?} must be captured: {rec}"
        );
        assert_eq!(rec["orig_dst"], "198.18.8.2:8080");
        assert_eq!(r.reply()["peer"], rec["upstream_local"]);
    }
    for (uid, gid) in [(1337u32, 1337u32), (1337, 1000), (1000, 1337)] {
        let g = ["--uid", &uid.to_string(), "--gid", &gid.to_string()].map(str::to_string);
        let g: Vec<&str> = g.iter().map(String::as_str).collect();
        let r = node.client_with(&pod, &g, "198.18.8.2:8080", &[]);
        assert!(r.ok(), "uid {uid} gid {gid}: {:?}", r.json);
        assert_eq!(
            r.reply()["peer"],
            Value::String(r.local()),
            "uid {uid} gid {gid} is the proxy and goes direct"
        );
    }
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(sidecar_log(&log).len(), seen, "no record for the proxy");
    let c = node.counters("pod");
    assert_eq!(c["outbound_captured"], seen, "{c}");
}

/// A pod that puts another pod's address on one of its own interfaces
/// (any pod with CAP_NET_ADMIN can) must not take that pod's inbound
/// connections, nor change how they are captured.
///
/// BUG (reported to the lead): the agent adds every address found in a
/// pod's netns to that pod (`with_discovered_addrs`), so `POD_ADDRS` maps
/// B's address to A's cookie; B's `sk_lookup` then assigns B's inbound
/// SYNs to A's listener in A's namespace (the kernel does not refuse a
/// socket of another netns): counted as A's `inbound_captured`, and B's
/// clients time out.
#[test]
fn a_pod_cannot_claim_another_pods_address() {
    if !require_root() {
        return;
    }
    let a = NetNs::new("isoa");
    let b = NetNs::new("isob");
    let client = NetNs::new("cli");
    let _va = veth_pair(&a, &["198.18.10.1/24"], &client, &["198.18.10.3/24"]);
    let _vb = veth_pair(&b, &["198.18.11.2/24"], &client, &["198.18.11.3/24"]);
    let mut node = Node::with_agent();
    node.set_pods(&[
        PodEntry::new("pod-a", &a, &["198.18.10.1"]),
        PodEntry::new("pod-b", &b, &["198.18.11.2"]),
    ]);
    let alog = node.sidecar(&a, "sidecar-a");
    let blog = node.sidecar(&b, "sidecar-b");
    node.echo(&b, 8080, "b-app", APP_UID);
    let r = node.client(&client, APP_UID, "198.18.11.2:8080");
    assert!(r.ok(), "{:?}", r.json);
    assert_eq!(wait_records(&blog, 1)[0]["orig_dst"], "198.18.11.2:8080");

    // Pod A claims B's address, and waits for the agent's resync (1 s).
    a.ip(&["addr", "add", "198.18.11.2/32", "dev", "lo"]);
    std::thread::sleep(Duration::from_millis(2500));

    let r = node.client(&client, APP_UID, "198.18.11.2:8080");
    assert!(
        r.ok(),
        "B's inbound must still work: {:?}\ncounters A {} B {}\nsidecar A {:?}\n{}",
        r.json,
        node.counters("pod-a"),
        node.counters("pod-b"),
        sidecar_log(&alog),
        node.agent_logs()
    );
    assert_eq!(r.reply()["server"], "b-app");
    let brecs = wait_records(&blog, 2);
    assert_eq!(brecs[1]["orig_dst"], "198.18.11.2:8080", "{brecs:?}");
    assert!(
        sidecar_log(&alog).is_empty(),
        "pod A's proxy received B's inbound connection: {:?}",
        sidecar_log(&alog)
    );
}
