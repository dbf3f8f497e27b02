//! Kernel tests of weir's Istio ambient capture (docs/ambient.md): each
//! rule istio-cni writes in an ambient pod, with a ztunnel stand-in (the
//! testkit sidecar with `--ztunnel`: upstream sockets marked 0x539,
//! inbound connections made transparently from the client's address).
//! ztunnel itself runs against weir in `cargo xtask peer-ztunnel`.

use std::time::Duration;

use serde_json::Value;
use weir_tests::node::{Node, PodEntry, sidecar_log};
use weir_tests::{NetNs, require_root, veth_pair, wait_until};

const APP_UID: u32 = 1000;

struct TwoPods {
    client: NetNs,
    server: NetNs,
    _veth: weir_tests::Veth,
}

fn two_pods() -> TwoPods {
    let client = NetNs::new("acli");
    let server = NetNs::new("asrv");
    let veth = veth_pair(
        &client,
        &["198.18.5.1/24", "2001:2:0:5::1/64"],
        &server,
        &["198.18.5.2/24", "2001:2:0:5::2/64"],
    );
    TwoPods {
        client,
        server,
        _veth: veth,
    }
}

fn ambient(name: &str, ns: &NetNs, ips: &[&str]) -> PodEntry {
    let mut p = PodEntry::new(name, ns, ips);
    p.mesh = Some("ambient".into());
    p
}

fn wait_records(log: &std::path::Path, n: usize) -> Vec<Value> {
    wait_until(Duration::from_secs(5), "ztunnel stand-in records", || {
        sidecar_log(log).len() >= n
    });
    sidecar_log(log)
}

/// A ztunnel stand-in in `pod` (root: transparent sockets need
/// CAP_NET_ADMIN).
fn ztunnel(node: &mut Node, pod: &NetNs, name: &str) -> std::path::PathBuf {
    node.sidecar_with(pod, name, &[], &["--ztunnel"])
}

/// Client and server both ambient: the client's connection goes through
/// its ztunnel (outbound, 15001), whose marked upstream is not captured
/// again; the server's ztunnel gets it inbound (15006) and connects to
/// the application *from the client's address*; the application's
/// answers come back to ztunnel through the pod's policy routing (mark
/// 0x111 set by weir's sockops), so the client gets its reply.
fn pod_to_pod(dst: &str, client_ip: &str) {
    let p = two_pods();
    let mut node = Node::with_agent();
    node.set_pods(&[
        ambient("client", &p.client, &["198.18.5.1", "2001:2:0:5::1"]),
        ambient("server", &p.server, &["198.18.5.2", "2001:2:0:5::2"]),
    ]);
    let zc = ztunnel(&mut node, &p.client, "ztunnel-client");
    let zs = ztunnel(&mut node, &p.server, "ztunnel-server");
    node.echo(&p.server, 8080, "app", APP_UID);

    let r = node.client(&p.client, APP_UID, dst);
    assert!(r.ok(), "request failed: {:?}", r.json);
    assert_eq!(r.peer(), dst, "getpeername shows the destination dialled");
    let reply = r.reply();
    assert_eq!(reply["server"], "app");
    // The application saw the client's own address: ztunnel's transparent
    // connection, answered through the pod's routing.
    assert!(
        reply["peer"].as_str().unwrap().contains(client_ip),
        "app's peer {reply}"
    );

    let out = wait_records(&zc, 1);
    assert_eq!(out.len(), 1, "{out:?}");
    assert_eq!(out[0]["listener"], "outbound");
    assert_eq!(out[0]["orig_dst"], dst, "SO_ORIGINAL_DST");
    let inb = wait_records(&zs, 1);
    assert_eq!(inb.len(), 1, "{inb:?}");
    assert_eq!(inb[0]["listener"], "inbound");
    assert_eq!(inb[0]["orig_dst"], dst);

    let c = node.counters("client");
    assert_eq!(c["outbound_captured"], 1, "{c}");
    // `weir status` says which rules each pod gets.
    let st = node.status();
    let pods = st["pods"].as_array().expect("status pods");
    assert_eq!(pods.len(), 2, "{st}");
    assert!(pods.iter().all(|p| p["mode"] == "ambient"), "{st}");
    let s = node.counters("server");
    assert_eq!(s["inbound_captured"], 1, "{s}");

    // What istio-cni adds besides iptables, inside the pod only.
    let rules = p.server.ip(&["rule", "show"]);
    assert!(
        rules.contains("fwmark 0x111/0xfff lookup 100"),
        "ip rule in the pod: {rules}"
    );
    let table = p.server.ip(&["route", "show", "table", "100"]);
    assert!(table.contains("local default dev lo"), "table 100: {table}");
    let accept = p
        .server
        .exec_ok(&["cat", "/proc/sys/net/ipv4/tcp_fwmark_accept"]);
    assert_eq!(accept.trim(), "1");
    // No iptables rule anywhere in the pods.
    for ns in [&p.client, &p.server] {
        let out = ns.exec_ok(&["iptables-save"]);
        assert!(!out.lines().any(|l| l.starts_with("-A")), "{out}");
    }
}

#[test]
fn ambient_pod_to_pod_ipv4_through_both_ztunnels() {
    if !require_root() {
        return;
    }
    pod_to_pod("198.18.5.2:8080", "198.18.5.1");
}

#[test]
fn ambient_pod_to_pod_ipv6_through_both_ztunnels() {
    if !require_root() {
        return;
    }
    pod_to_pod("[2001:2:0:5::2]:8080", "2001:2:0:5::1");
}

/// From a client outside the mesh: every port goes to ztunnel's 15006
/// except 15008 (HBONE, ztunnel's own listener in the pod).
#[test]
fn ambient_inbound_every_port_but_hbone() {
    if !require_root() {
        return;
    }
    let p = two_pods();
    let mut node = Node::with_agent();
    node.set_pods(&[ambient(
        "server",
        &p.server,
        &["198.18.5.2", "2001:2:0:5::2"],
    )]);
    let zs = ztunnel(&mut node, &p.server, "ztunnel-server");
    node.echo(&p.server, 8080, "app", APP_UID);
    node.echo(&p.server, 15008, "hbone", APP_UID);

    let hbone = node.client(&p.client, APP_UID, "198.18.5.2:15008");
    assert!(hbone.ok(), "{:?}", hbone.json);
    assert_eq!(hbone.reply()["server"], "hbone");
    assert!(sidecar_log(&zs).is_empty(), "15008 must not be captured");

    let app = node.client(&p.client, APP_UID, "198.18.5.2:8080");
    assert!(app.ok(), "{:?}", app.json);
    assert_eq!(app.reply()["server"], "app");
    let inb = wait_records(&zs, 1);
    assert_eq!(inb[0]["listener"], "inbound");
    assert_eq!(
        app.reply()["peer"].as_str().unwrap().split(':').next(),
        Some("198.18.5.1"),
        "transparent: the app sees the client"
    );
}

/// `ambient.istio.io/bypass-inbound-capture` (istio-cni's ingress mode):
/// no inbound capture, outbound still captured.
#[test]
fn ambient_bypass_inbound_capture() {
    if !require_root() {
        return;
    }
    let p = two_pods();
    let mut node = Node::with_agent();
    let mut server = ambient("server", &p.server, &["198.18.5.2", "2001:2:0:5::2"]);
    server.annotations.insert(
        "ambient.istio.io/bypass-inbound-capture".into(),
        "true".into(),
    );
    node.set_pods(&[server]);
    let zs = ztunnel(&mut node, &p.server, "ztunnel-server");
    node.echo(&p.server, 8080, "app", APP_UID);
    let r = node.client(&p.client, APP_UID, "198.18.5.2:8080");
    assert!(r.ok(), "{:?}", r.json);
    assert_eq!(r.reply()["server"], "app");
    assert!(sidecar_log(&zs).is_empty(), "inbound must not be captured");
}
