//! Kernel tests of DNS capture: UDP (connected and unconnected) and TCP
//! port 53 go to the pod's DNS port (15053), answers come back from the
//! address the application asked, and the proxy's own queries are not
//! captured.

use serde_json::Value;
use weir_tests::node::{Node, PodEntry};
use weir_tests::{NetNs, require_root, veth_pair};

struct World {
    client: NetNs,
    server: NetNs,
    _veth: weir_tests::Veth,
}

fn world() -> World {
    let client = NetNs::new("dnc");
    let server = NetNs::new("dns");
    let veth = veth_pair(
        &client,
        &["198.18.4.1/24", "2001:2:0:4::1/64"],
        &server,
        &["198.18.4.2/24", "198.18.4.3/24", "2001:2:0:4::2/64"],
    );
    World {
        client,
        server,
        _veth: veth,
    }
}

fn pod(w: &World) -> PodEntry {
    PodEntry::new("app", &w.client, &["198.18.4.1", "2001:2:0:4::1"])
}

fn udp(node: &Node, w: &World, uid: u32, to: &str, connected: bool) -> Value {
    let uid = uid.to_string();
    let mut args = vec!["--uid", &uid, "udp-client", "--to", to];
    if connected {
        args.push("--connected");
    }
    let out = node.run_in_pod(&w.client, &args);
    serde_json::from_str(out.lines().last().unwrap_or("{}")).unwrap()
}

fn setup(annotations: &[(&str, &str)]) -> (World, Node) {
    let w = world();
    let mut node = Node::with_agent();
    let mut p = pod(&w);
    for (k, v) in annotations {
        p = p.annotate(k, v);
    }
    node.set_pods(&[p]);
    // The real DNS server, and the proxy's DNS listener on loopback:15053.
    node.daemon(
        &w.server,
        &["dns-server", "--port", "53", "--name", "upstream"],
    );
    node.daemon(
        &w.client,
        &[
            "--uid",
            "1337",
            "dns-server",
            "--port",
            "15053",
            "--name",
            "dns-proxy",
            "--loopback",
        ],
    );
    (w, node)
}

#[test]
fn without_dns_capture_queries_go_to_the_server() {
    if !require_root() {
        return;
    }
    let (w, node) = setup(&[]);
    let r = udp(&node, &w, 1000, "198.18.4.2:53", false);
    assert_eq!(r["reply"]["server"], "upstream", "{r}");
    assert_eq!(r["from"], "198.18.4.2:53");
}

#[test]
fn udp_dns_is_captured_and_answers_come_from_the_server_asked() {
    if !require_root() {
        return;
    }
    let (w, node) = setup(&[(
        "proxy.istio.io/config",
        "proxyMetadata:\n  ISTIO_META_DNS_CAPTURE: \"true\"\n",
    )]);
    for (to, connected) in [
        ("198.18.4.2:53", false),
        ("198.18.4.2:53", true),
        ("[2001:2:0:4::2]:53", false),
        ("[2001:2:0:4::2]:53", true),
    ] {
        let r = udp(&node, &w, 1000, to, connected);
        assert_eq!(r["ok"], true, "{to} connected={connected}: {r}");
        assert_eq!(
            r["reply"]["server"], "dns-proxy",
            "{to} connected={connected}: {r}"
        );
        assert_eq!(r["from"], to, "recvfrom shows the server asked: {r}");
        if connected {
            assert_eq!(r["peer"], to, "getpeername: {r}");
        }
    }
    // Sockets and datagrams are counted apart, and apart from the TCP
    // connections of `dns_captured`.
    let c = node.counters("app");
    assert_eq!(c["dns_udp_datagrams_captured"], 2, "{c}");
    assert_eq!(c["dns_udp_sockets_captured"], 2, "{c}");
    assert_eq!(c["dns_captured"], 0, "{c}");
    let m = node.metrics();
    for (family, result, n) in [
        ("weir_dns_udp_datagrams_total", "captured", 2),
        ("weir_dns_udp_sockets_total", "captured", 2),
    ] {
        let line = format!("{family}{{namespace=\"default\",pod=\"app\",result=\"{result}\"}} {n}");
        assert!(m.contains(&line), "{line} not in:\n{m}");
    }
    assert!(
        m.contains(
            "weir_connections_captured_total{direction=\"dns\",namespace=\"default\",pod=\"app\"} 0"
        ),
        "{m}"
    );
}

#[test]
fn tcp_dns_is_captured_with_original_destination() {
    if !require_root() {
        return;
    }
    let (w, node) = setup(&[("weir.dev/dns-capture", "true")]);
    let r = node.client(&w.client, 1000, "198.18.4.2:53");
    assert!(r.ok(), "{:?}", r.json);
    let reply = r.reply();
    assert_eq!(reply["server"], "dns-proxy", "{reply}");
    assert_eq!(reply["orig_dst"], "198.18.4.2:53", "{reply}");
    assert_eq!(r.peer(), "198.18.4.2:53");
    // A TCP connection: counted with the connections, not the datagrams.
    let c = node.counters("app");
    assert_eq!(c["dns_captured"], 1, "{c}");
    assert_eq!(c["dns_udp_datagrams_captured"], 0, "{c}");
}

#[test]
fn the_proxys_own_queries_are_not_captured() {
    if !require_root() {
        return;
    }
    let (w, node) = setup(&[("weir.dev/dns-capture", "true")]);
    let r = udp(&node, &w, 1337, "198.18.4.2:53", false);
    assert_eq!(r["reply"]["server"], "upstream", "{r}");
    let line =
        "weir_dns_udp_datagrams_total{namespace=\"default\",pod=\"app\",result=\"bypassed\"} 1";
    let m = node.metrics();
    assert!(m.contains(line), "{line} not in:\n{m}");
}

#[test]
fn only_the_listed_resolvers_are_captured() {
    if !require_root() {
        return;
    }
    let (w, node) = setup(&[
        ("weir.dev/dns-capture", "true"),
        ("weir.dev/dns-servers", "198.18.4.3"),
    ]);
    let r = udp(&node, &w, 1000, "198.18.4.3:53", false);
    assert_eq!(r["reply"]["server"], "dns-proxy", "{r}");
    assert_eq!(r["from"], "198.18.4.3:53");
    let r = udp(&node, &w, 1000, "198.18.4.2:53", false);
    assert_eq!(r["reply"]["server"], "upstream", "{r}");
}

/// With REDIRECT a captured query keeps its source address, so the DNS
/// proxy sees the pod's address as the client. weir gives unconnected
/// sockets a per-message source; a socket connected after a bind to the
/// wildcard address with a port (the udp-client's sockets) is connected to
/// the pod's own address and the DNS port once the agent has recorded the
/// DNS proxy's socket, and `weir_sk_lookup` hands the query to it.
#[test]
fn the_dns_proxy_sees_the_pods_address_as_the_client() {
    if !require_root() {
        return;
    }
    let (w, node) = setup(&[("weir.dev/dns-capture", "true")]);
    node.wait_log("DNS proxy on :15053 recorded");
    for (to, connected, pod_ip) in [
        ("198.18.4.2:53", false, "198.18.4.1:"),
        ("198.18.4.2:53", true, "198.18.4.1:"),
        ("[2001:2:0:4::2]:53", false, "[2001:2:0:4::1]:"),
        ("[2001:2:0:4::2]:53", true, "[2001:2:0:4::1]:"),
    ] {
        let r = udp(&node, &w, 1000, to, connected);
        assert_eq!(r["ok"], true, "{to} connected={connected}: {r}");
        assert_eq!(r["reply"]["server"], "dns-proxy", "{r}");
        let client = r["reply"]["peer"].as_str().unwrap_or_default();
        assert!(
            client.starts_with(pod_ip),
            "{to} connected={connected}: the DNS proxy saw {client}: {r}"
        );
        assert_eq!(r["from"], to, "recvfrom shows the server asked: {r}");
        if connected {
            assert_eq!(r["peer"], to, "getpeername: {r}");
        }
    }
}
