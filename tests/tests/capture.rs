//! Kernel tests of weir's capture, outbound and inbound, against Istio's
//! semantics. Each test builds its own node (cgroup, bpffs, agent) and pod
//! network namespaces; they need root and run one at a time.

use std::time::Duration;

use serde_json::Value;
use weir_tests::node::{Node, PodEntry, sidecar_log};
use weir_tests::{NetNs, require_root, veth_pair, wait_until};

const APP_UID: u32 = 1000;
const PROXY_UID: u32 = 1337;

/// Two pods joined by a veth: "client" 198.18.1.1 / 2001:2:0:1::1 and
/// "server" 198.18.1.2 / 2001:2:0:1::2.
struct TwoPods {
    client: NetNs,
    server: NetNs,
    _veth: weir_tests::Veth,
}

fn two_pods() -> TwoPods {
    let client = NetNs::new("cli");
    let server = NetNs::new("srv");
    let veth = veth_pair(
        &client,
        &["198.18.1.1/24", "2001:2:0:1::1/64"],
        &server,
        &["198.18.1.2/24", "2001:2:0:1::2/64"],
    );
    TwoPods {
        client,
        server,
        _veth: veth,
    }
}

fn client_pod(p: &TwoPods) -> PodEntry {
    PodEntry::new("client", &p.client, &["198.18.1.1", "2001:2:0:1::1"])
}

fn server_pod(p: &TwoPods) -> PodEntry {
    PodEntry::new("server", &p.server, &["198.18.1.2", "2001:2:0:1::2"])
}

fn records(log: &std::path::Path) -> Vec<Value> {
    sidecar_log(log)
}

fn wait_records(log: &std::path::Path, n: usize) -> Vec<Value> {
    wait_until(Duration::from_secs(5), "sidecar log records", || {
        records(log).len() >= n
    });
    records(log)
}

// ---------------------------------------------------------------------------
// Outbound (issue: foundation)
// ---------------------------------------------------------------------------

fn outbound_captured(dst: &str, client_ip: &str) {
    let p = two_pods();
    let mut node = Node::with_agent();
    node.set_pods(&[client_pod(&p)]);
    let log = node.sidecar(&p.client, "client-sidecar");
    node.echo(&p.server, 8080, "upstream", APP_UID);

    let r = node.client(&p.client, APP_UID, dst);
    assert!(r.ok(), "request failed: {:?}", r.json);
    // The application still sees the destination it dialled...
    assert_eq!(
        r.peer(),
        dst,
        "getpeername must return the original destination"
    );
    // ...also once the proxy has passed the upstream's EOF on.
    assert_eq!(r.peer_after_eof(), dst, "{:?}", r.json);
    // ...from its pod address, as with REDIRECT.
    assert!(
        r.local().contains(client_ip),
        "app local address {}",
        r.local()
    );

    let recs = wait_records(&log, 1);
    assert_eq!(recs.len(), 1, "{recs:?}");
    let rec = &recs[0];
    assert_eq!(rec["listener"], "outbound");
    assert_eq!(rec["orig_dst"], dst, "SO_ORIGINAL_DST");
    // The proxy's peer is the application's address and port.
    assert_eq!(rec["peer"], Value::String(r.local()), "proxy peer");
    assert!(rec["local"].as_str().unwrap().ends_with(":15001"), "{rec}");
    // The proxy's own upstream connection was not captured again: the
    // upstream saw the sidecar's connection, not another redirect.
    let reply = r.reply();
    assert_eq!(reply["server"], "upstream");
    assert_eq!(
        reply["peer"], rec["upstream_local"],
        "upstream peer is the sidecar"
    );

    let c = node.counters("client");
    assert_eq!(c["outbound_captured"], 1, "{c}");
    assert_eq!(c["orig_dst_answered"], 1, "{c}");
    assert!(
        c["outbound_bypassed"].as_u64().unwrap() >= 1,
        "proxy connection counted as bypass: {c}"
    );
}

/// The proxy closes its side entirely first (Envoy's TCP proxy does when
/// the upstream closes): its socket's close takes the connection out of
/// `PENDING_FLOWS`, while the application, in CLOSE_WAIT, may still ask
/// `getpeername()`. With REDIRECT it still names the original
/// destination; so must weir (the answer moves to the socket).
fn proxy_closes_first(dst: &str) {
    let p = two_pods();
    let mut node = Node::with_agent();
    node.set_pods(&[client_pod(&p)]);
    node.sidecar_with(
        &p.client,
        "client-sidecar",
        &["--uid", "1337"],
        &["--full-close"],
    );
    node.echo(&p.server, 8080, "upstream", APP_UID);
    let r = node.client_with(
        &p.client,
        &["--uid", &APP_UID.to_string()],
        dst,
        &["--after-eof-ms", "300"],
    );
    assert!(r.ok(), "{:?}", r.json);
    assert_eq!(r.reply()["server"], "upstream");
    assert_eq!(r.peer(), dst, "{:?}", r.json);
    assert_eq!(r.peer_after_eof(), dst, "{:?}", r.json);
}

#[test]
fn getpeername_is_the_original_after_the_proxy_closed_first_ipv4() {
    if !require_root() {
        return;
    }
    proxy_closes_first("198.18.1.2:8080");
}

#[test]
fn getpeername_is_the_original_after_the_proxy_closed_first_ipv6() {
    if !require_root() {
        return;
    }
    proxy_closes_first("[2001:2:0:1::2]:8080");
}

/// The hand-off from `connect4` to `TCP_CONNECT_CB` when the task moved
/// to another CPU in between (`CONNECTING` is per CPU): the socket's slot
/// is found on the other CPU, the proxy and the application get its
/// original destination, the slot is emptied, and the move is counted in
/// `weir_connect_handoffs_total{cpu="other"}`. A move cannot be forced in
/// the middle of `connect()`, so the client leaves the slot on CPU 1
/// itself and connects from CPU 0 straight to the proxy's port (loopback:
/// not redirected, so `connect4` leaves no slot of its own).
#[test]
fn connect_handoff_is_found_on_another_cpu() {
    if !require_root() {
        return;
    }
    let p = two_pods();
    let mut node = Node::with_agent();
    node.set_pods(&[client_pod(&p)]);
    let log = node.sidecar(&p.client, "client-sidecar");
    node.echo(&p.server, 8080, "upstream", APP_UID);
    let series = "weir_connect_handoffs_total{cpu=\"other\"}";
    let before = metric(&node.metrics(), series);
    let map = node.bpffs.join("weir/maps/CONNECTING");
    // As root (no `--uid`): the client writes weir's pinned map.
    let r = node.client_with(
        &p.client,
        &[],
        "127.0.0.1:15001",
        &[
            "--handoff-map",
            map.to_str().expect("UTF-8 path"),
            "--handoff-to",
            "198.18.1.2:8080",
        ],
    );
    assert!(r.ok(), "{:?}", r.json);
    // The proxy got the destination left on the other CPU, and went there.
    let recs = wait_records(&log, 1);
    assert_eq!(recs[0]["orig_dst"], "198.18.1.2:8080", "{recs:?}");
    assert_eq!(r.reply()["server"], "upstream", "{:?}", r.json);
    // The application's getpeername() names it too.
    assert_eq!(r.peer(), "198.18.1.2:8080", "{:?}", r.json);
    assert_eq!(
        metric(&node.metrics(), series),
        before + 1,
        "the move between CPUs is counted"
    );
    // The slot was taken: no CPU's slot holds the socket any more.
    let cookie = r.json["handoff_cookie"].as_u64().expect("handoff_cookie");
    let data = aya::maps::MapData::from_pin(&map).expect("CONNECTING pinned");
    let slots: aya::maps::PerCpuArray<_, weir_common::Connecting> =
        aya::maps::PerCpuArray::try_from(aya::maps::Map::PerCpuArray(data)).expect("per-CPU array");
    for i in 0..weir_common::CONNECTING_SLOTS {
        let values = slots.get(&i, 0).expect("slot");
        assert!(
            values.iter().all(|c| c.sock != cookie),
            "slot {i} still holds socket {cookie}"
        );
    }
}

/// The value of one series (`name{labels}`) in a Prometheus text page; 0
/// when absent.
fn metric(text: &str, series: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse::<f64>().ok())
        .unwrap_or(0.0) as u64
}

#[test]
fn outbound_ipv4_is_captured_with_original_destination() {
    if !require_root() {
        return;
    }
    outbound_captured("198.18.1.2:8080", "198.18.1.1:");
}

#[test]
fn outbound_ipv6_is_captured_with_original_destination() {
    if !require_root() {
        return;
    }
    outbound_captured("[2001:2:0:1::2]:8080", "[2001:2:0:1::1]:");
}

#[test]
fn unenrolled_pod_is_not_touched() {
    if !require_root() {
        return;
    }
    let p = two_pods();
    let mut node = Node::with_agent();
    // Only the server is enrolled; the client has no sidecar at all.
    node.set_pods(&[server_pod(&p)]);
    node.echo(&p.client, 8080, "client-local", APP_UID);
    node.echo(&p.server, 9999, "server-app", APP_UID);
    let r = node.client(&p.server, APP_UID, "198.18.1.1:8080");
    // The server pod is enrolled but has no sidecar: its outbound is
    // refused (fail closed)...
    assert!(
        !r.ok(),
        "enrolled pod without proxy must fail closed: {:?}",
        r.json
    );
    assert_eq!(
        r.errno(),
        Some(111),
        "ECONNREFUSED like iptables: {:?}",
        r.json
    );
    // ...while the unenrolled client pod connects directly.
    let r = node.client(&p.client, APP_UID, "198.18.1.1:8080");
    assert!(r.ok(), "{:?}", r.json);
    assert_eq!(r.reply()["server"], "client-local");
    assert_eq!(r.peer(), "198.18.1.1:8080");
    let c = node.counters("server");
    assert_eq!(c["fail_closed"], 1, "{c}");
}

#[test]
fn loopback_and_localhost_are_not_captured() {
    if !require_root() {
        return;
    }
    let p = two_pods();
    let mut node = Node::with_agent();
    node.set_pods(&[client_pod(&p)]);
    let log = node.sidecar(&p.client, "client-sidecar");
    node.echo(&p.client, 8080, "local-app", APP_UID);
    for dst in [
        "127.0.0.1:8080",
        "[::1]:8080",
        "198.18.1.1:8080",
        "127.0.0.5:8080",
    ] {
        let r = node.client(&p.client, APP_UID, dst);
        assert!(r.ok(), "{dst}: {:?}", r.json);
        assert_eq!(r.reply()["server"], "local-app", "{dst}");
    }
    // Nothing went through the sidecar.
    std::thread::sleep(Duration::from_millis(200));
    assert!(records(&log).is_empty(), "{:?}", records(&log));
    let c = node.counters("client");
    assert_eq!(c["outbound_captured"], 0, "{c}");
    assert_eq!(c["outbound_bypassed"], 4, "{c}");
}

#[test]
fn removing_a_pod_stops_its_capture() {
    if !require_root() {
        return;
    }
    let p = two_pods();
    let mut node = Node::with_agent();
    node.set_pods(&[client_pod(&p)]);
    let log = node.sidecar(&p.client, "client-sidecar");
    node.echo(&p.server, 8080, "upstream", APP_UID);
    assert!(node.client(&p.client, APP_UID, "198.18.1.2:8080").ok());
    assert_eq!(wait_records(&log, 1).len(), 1);

    node.set_pods(&[]);
    let r = node.client(&p.client, APP_UID, "198.18.1.2:8080");
    assert!(r.ok(), "{:?}", r.json);
    // Went direct: the upstream saw the application's own address.
    assert_eq!(r.reply()["peer"], Value::String(r.local()));
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(records(&log).len(), 1, "no new sidecar connection");
    // And the pod's sk_lookup link is gone.
    let links = node.status()["links"].clone();
    assert!(!links.to_string().contains("netns-"), "{links}");
}

#[test]
fn excluded_outbound_port_and_cidr_are_not_captured() {
    if !require_root() {
        return;
    }
    let p = two_pods();
    let mut node = Node::with_agent();
    node.set_pods(&[client_pod(&p)
        .annotate("traffic.sidecar.istio.io/excludeOutboundPorts", "8081")
        .annotate(
            "traffic.sidecar.istio.io/excludeOutboundIPRanges",
            "2001:2:0:1::2/128",
        )]);
    let log = node.sidecar(&p.client, "client-sidecar");
    node.echo(&p.server, 8080, "upstream", APP_UID);
    node.echo(&p.server, 8081, "upstream-8081", APP_UID);
    let direct = node.client(&p.client, APP_UID, "198.18.1.2:8081");
    assert!(direct.ok(), "{:?}", direct.json);
    assert_eq!(direct.reply()["peer"], Value::String(direct.local()));
    let direct6 = node.client(&p.client, APP_UID, "[2001:2:0:1::2]:8080");
    assert!(direct6.ok(), "{:?}", direct6.json);
    assert_eq!(direct6.reply()["peer"], Value::String(direct6.local()));
    let captured = node.client(&p.client, APP_UID, "198.18.1.2:8080");
    assert!(captured.ok());
    assert_eq!(wait_records(&log, 1).len(), 1);
}

// ---------------------------------------------------------------------------
// Inbound
// ---------------------------------------------------------------------------

fn both_directions(dst: &str) {
    let p = two_pods();
    let mut node = Node::with_agent();
    node.set_pods(&[client_pod(&p), server_pod(&p)]);
    let clog = node.sidecar(&p.client, "client-sidecar");
    let slog = node.sidecar(&p.server, "server-sidecar");
    node.echo(&p.server, 8080, "server-app", APP_UID);

    let r = node.client(&p.client, APP_UID, dst);
    assert!(r.ok(), "{:?}", r.json);
    let c = wait_records(&clog, 1);
    let s = wait_records(&slog, 1);
    assert_eq!(c.len(), 1, "client sidecar: {c:?}");
    assert_eq!(s.len(), 1, "server sidecar: {s:?}");
    assert_eq!(c[0]["orig_dst"], dst);
    assert_eq!(s[0]["listener"], "inbound");
    assert_eq!(s[0]["orig_dst"], dst, "inbound SO_ORIGINAL_DST");
    // sk_lookup keeps the original destination as the local address.
    assert_eq!(s[0]["local"], dst);
    // The server proxy's peer is the client proxy's upstream socket.
    assert_eq!(s[0]["peer"], c[0]["upstream_local"]);
    // The application saw the inbound passthrough source, and only once.
    let reply = r.reply();
    assert_eq!(reply["server"], "server-app");
    let from = reply["peer"].as_str().unwrap();
    assert!(
        from.starts_with("127.0.0.6:") || from.starts_with("[::6]:"),
        "app peer {from}"
    );
    assert_eq!(reply["peer"], s[0]["upstream_local"]);
    let sc = node.counters("server");
    assert_eq!(sc["inbound_captured"], 1, "{sc}");
    assert_eq!(sc["orig_dst_answered"], 1, "{sc}");
}

#[test]
fn pod_to_pod_ipv4_goes_through_both_proxies() {
    if !require_root() {
        return;
    }
    both_directions("198.18.1.2:8080");
}

#[test]
fn pod_to_pod_ipv6_goes_through_both_proxies() {
    if !require_root() {
        return;
    }
    both_directions("[2001:2:0:1::2]:8080");
}

/// A client that is not enrolled, and one in a namespace that plays another
/// node (routed through a "node" namespace), both reach the server only
/// through its proxy.
#[test]
fn unenrolled_and_remote_clients_reach_the_server_through_its_proxy() {
    if !require_root() {
        return;
    }
    let p = two_pods();
    let node_ns = NetNs::new("node");
    let other = NetNs::new("other");
    let _v1 = veth_pair(&p.server, &["198.18.2.2/24"], &node_ns, &["198.18.2.1/24"]);
    let _v2 = veth_pair(&node_ns, &["198.18.3.1/24"], &other, &["198.18.3.2/24"]);
    other.ip(&["route", "add", "default", "via", "198.18.3.1"]);
    p.server
        .ip(&["route", "add", "198.18.3.0/24", "via", "198.18.2.1"]);
    node_ns.exec_ok(&["sysctl", "-qw", "net.ipv4.ip_forward=1"]);
    let mut node = Node::with_agent();
    node.set_pods(&[server_pod(&p)]);
    let slog = node.sidecar(&p.server, "server-sidecar");
    node.echo(&p.server, 8080, "server-app", APP_UID);

    let r = node.client(&p.client, APP_UID, "198.18.1.2:8080");
    assert!(r.ok(), "{:?}", r.json);
    assert!(
        r.reply()["peer"]
            .as_str()
            .unwrap()
            .starts_with("127.0.0.6:")
    );
    let r = node.client(&other, APP_UID, "198.18.2.2:8080");
    assert!(r.ok(), "{:?}", r.json);
    assert!(
        r.reply()["peer"]
            .as_str()
            .unwrap()
            .starts_with("127.0.0.6:")
    );
    let s = wait_records(&slog, 2);
    assert_eq!(
        s[0]["peer"],
        Value::String(format!("198.18.1.1:{}", r_port(&s[0])))
    );
    assert_eq!(s[1]["orig_dst"], "198.18.2.2:8080");
    assert!(
        s[1]["peer"].as_str().unwrap().starts_with("198.18.3.2:"),
        "{}",
        s[1]
    );
}

fn r_port(rec: &Value) -> String {
    rec["peer"]
        .as_str()
        .unwrap()
        .rsplit(':')
        .next()
        .unwrap()
        .to_string()
}

#[test]
fn inbound_exclusions_and_status_ports_are_not_captured() {
    if !require_root() {
        return;
    }
    let p = two_pods();
    let mut node = Node::with_agent();
    node.set_pods(&[server_pod(&p)
        .annotate("traffic.sidecar.istio.io/excludeInboundPorts", "9090")
        .annotate("status.sidecar.istio.io/port", "15030")]);
    let slog = node.sidecar(&p.server, "server-sidecar");
    for port in [9090u16, 15008, 15021, 15090, 15030, 8080] {
        node.echo(&p.server, port, &format!("app-{port}"), 0);
    }
    for port in [9090u16, 15008, 15021, 15090, 15030] {
        let r = node.client(&p.client, APP_UID, &format!("198.18.1.2:{port}"));
        assert!(r.ok(), "{port}: {:?}", r.json);
        assert_eq!(r.reply()["server"], format!("app-{port}"));
        // Direct: the app saw the client's own address.
        assert_eq!(r.reply()["peer"], Value::String(r.local()), "{port}");
    }
    assert!(records(&slog).is_empty(), "{:?}", records(&slog));
    let r = node.client(&p.client, APP_UID, "198.18.1.2:8080");
    assert!(r.ok());
    assert_eq!(wait_records(&slog, 1).len(), 1);
}

#[test]
fn explicit_inbound_port_list_captures_only_those_ports() {
    if !require_root() {
        return;
    }
    let p = two_pods();
    let mut node = Node::with_agent();
    node.set_pods(&[
        server_pod(&p).annotate("traffic.sidecar.istio.io/includeInboundPorts", "8080")
    ]);
    let slog = node.sidecar(&p.server, "server-sidecar");
    node.echo(&p.server, 8080, "app-8080", APP_UID);
    node.echo(&p.server, 8081, "app-8081", APP_UID);
    let r = node.client(&p.client, APP_UID, "198.18.1.2:8081");
    assert_eq!(r.reply()["peer"], Value::String(r.local()));
    let r = node.client(&p.client, APP_UID, "198.18.1.2:8080");
    assert!(r.ok());
    let s = wait_records(&slog, 1);
    assert_eq!(s.len(), 1);
    assert_eq!(s[0]["orig_dst"], "198.18.1.2:8080");
}

/// Istio's rule 3: the proxy calling its own pod's IP over loopback goes to
/// the inbound port (an app calling its own service through the mesh).
#[test]
fn proxy_to_own_pod_ip_goes_to_the_inbound_port() {
    if !require_root() {
        return;
    }
    let p = two_pods();
    let mut node = Node::with_agent();
    node.set_pods(&[server_pod(&p)]);
    let slog = node.sidecar(&p.server, "server-sidecar");
    node.echo(&p.server, 8080, "server-app", APP_UID);
    let r = node.client(&p.server, PROXY_UID, "198.18.1.2:8080");
    assert!(r.ok(), "{:?}", r.json);
    let s = wait_records(&slog, 1);
    assert_eq!(s[0]["listener"], "inbound", "{s:?}");
    assert_eq!(s[0]["orig_dst"], "198.18.1.2:8080");
    assert_eq!(r.peer(), "198.18.1.2:8080");
    // To 127.0.0.1 the proxy is not redirected.
    let r = node.client(&p.server, PROXY_UID, "127.0.0.1:8080");
    assert!(r.ok());
    assert_eq!(records(&slog).len(), 1);
    assert_eq!(node.counters("server")["outbound_to_inbound"], 1);
}

/// istio-iptables' own check: a client with the proxy UID dials
/// 127.0.0.6:15002; a server on 15001/15006 must read port 15002 from
/// SO_ORIGINAL_DST.
#[test]
fn istio_redirect_validation_passes() {
    if !require_root() {
        return;
    }
    let p = two_pods();
    let node = Node::with_agent();
    node.set_pods(&[server_pod(&p)]);
    let out = node.run_in_pod(
        &p.server,
        &[
            "validate",
            "--server-uid",
            "1337",
            "--client-uid",
            "1337",
            "--timeout-ms",
            "5000",
        ],
    );
    let v: Value = serde_json::from_str(out.lines().last().unwrap_or("{}")).unwrap();
    assert_eq!(v["ok"], true, "{out}");
    assert!(v["orig_dst"].as_str().unwrap().ends_with(":15002"), "{v}");
    assert_eq!(v["accepted_on"], 15006, "{v}");
}

/// While the proxy is down, captured inbound connections are refused (never
/// delivered to the app behind the proxy's back), and capture resumes as
/// soon as the proxy listens again, without the agent.
#[test]
fn inbound_fails_closed_while_proxy_is_down() {
    if !require_root() {
        return;
    }
    let p = two_pods();
    let mut node = Node::with_agent();
    node.set_pods(&[server_pod(&p)]);
    node.echo(&p.server, 8080, "server-app", APP_UID);
    for dst in ["198.18.1.2:8080", "[2001:2:0:1::2]:8080"] {
        let r = node.client(&p.client, APP_UID, dst);
        assert!(!r.ok(), "{dst} must be refused: {:?}", r.json);
        assert_eq!(
            r.errno(),
            Some(111),
            "{dst}: RST like iptables: {:?}",
            r.json
        );
    }
    assert_eq!(node.counters("server")["fail_closed"], 2);
    // The agent is gone; the proxy starts: capture works at once.
    node.kill_agent();
    let slog = node.sidecar(&p.server, "server-sidecar");
    let r = node.client(&p.client, APP_UID, "198.18.1.2:8080");
    assert!(r.ok(), "{:?}", r.json);
    assert_eq!(wait_records(&slog, 1)[0]["orig_dst"], "198.18.1.2:8080");
}

/// `::6/128` is added to an IPv6 pod's loopback, as istio-init does.
#[test]
fn ipv6_pods_get_the_passthrough_address() {
    if !require_root() {
        return;
    }
    let p = two_pods();
    let node = Node::with_agent();
    node.set_pods(&[server_pod(&p)]);
    let addrs = p.server.ip(&["-6", "addr", "show", "dev", "lo"]);
    assert!(addrs.contains("::6/128"), "{addrs}");
}

/// Other getsockopt calls behave exactly as without weir, also for option
/// buffers larger than a page.
#[test]
fn other_getsockopt_calls_are_untouched() {
    if !require_root() {
        return;
    }
    let p = two_pods();
    let node = Node::with_agent();
    node.set_pods(&[client_pod(&p)]);
    let out = node.run_in_pod(&p.client, &["sockopt-check"]);
    let v: Value = serde_json::from_str(out.lines().last().unwrap_or("{}")).unwrap_or(Value::Null);
    assert_eq!(v["ok"], true, "{out}");
}

/// A proxy that was already listening when its pod was enrolled (weir
/// installed on a running node) is adopted at once: inbound capture works
/// without restarting the proxy.
#[test]
fn proxies_listening_before_enrollment_are_adopted() {
    if !require_root() {
        return;
    }
    let p = two_pods();
    let mut node = Node::with_agent();
    let slog = node.sidecar(&p.server, "server-sidecar");
    node.echo(&p.server, 8080, "server-app", APP_UID);
    // Enrolled only now, long after the sidecar's listen().
    node.set_pods(&[server_pod(&p)]);
    for dst in ["198.18.1.2:8080", "[2001:2:0:1::2]:8080"] {
        let r = node.client(&p.client, APP_UID, dst);
        assert!(r.ok(), "{dst}: {:?}\n{}", r.json, node.agent_logs());
    }
    let s = wait_records(&slog, 2);
    assert_eq!(s[0]["orig_dst"], "198.18.1.2:8080");
    assert_eq!(s[1]["orig_dst"], "[2001:2:0:1::2]:8080");
    assert!(
        node.agent_logs().contains("adopted"),
        "{}",
        node.agent_logs()
    );
}

/// Two weir agents at two levels of the cgroup tree (or weir below another
/// tool's cgroup programs): the outer one, which knows nothing about the
/// pod, must not undo the inner one's SO_ORIGINAL_DST answer.
#[test]
fn nested_agents_do_not_disturb_each_other() {
    if !require_root() {
        return;
    }
    let p = two_pods();
    let outer = Node::with_agent();
    let mut inner = Node::in_cgroup(outer.cgroup.child("inner"));
    inner.start_agent();
    inner.set_pods(&[client_pod(&p)]);
    let log = inner.sidecar(&p.client, "client-sidecar");
    inner.echo(&p.server, 8080, "upstream", APP_UID);
    let r = inner.client(&p.client, APP_UID, "198.18.1.2:8080");
    assert!(r.ok(), "{:?}", r.json);
    assert_eq!(wait_records(&log, 1)[0]["orig_dst"], "198.18.1.2:8080");
    let out = inner.run_in_pod(&p.client, &["sockopt-check"]);
    assert!(out.contains("\"ok\":true"), "{out}");
}

/// `traffic.sidecar.istio.io/excludeInterfaces`: traffic through the named
/// interface is never captured, in either direction (istio-iptables `-c`).
#[test]
fn excluded_interface_is_not_captured() {
    if !require_root() {
        return;
    }
    let p = two_pods();
    let side = NetNs::new("sid");
    let v = veth_pair(&p.server, &["198.18.9.1/24"], &side, &["198.18.9.2/24"]);
    let mut node = Node::with_agent();
    node.set_pods(&[
        server_pod(&p).annotate("traffic.sidecar.istio.io/excludeInterfaces", v.a_name())
    ]);
    let slog = node.sidecar(&p.server, "server-sidecar");
    node.echo(&p.server, 8080, "server-app", APP_UID);
    node.echo(&side, 8080, "side-app", APP_UID);
    node.echo(&p.client, 8080, "client-app", APP_UID);
    // Outbound through the excluded interface: direct.
    let r = node.client(&p.server, APP_UID, "198.18.9.2:8080");
    assert!(r.ok(), "{:?}", r.json);
    assert_eq!(r.reply()["peer"], Value::String(r.local()));
    // Inbound through it: direct to the app.
    let r = node.client(&side, APP_UID, "198.18.9.1:8080");
    assert!(r.ok(), "{:?}", r.json);
    assert_eq!(r.reply()["server"], "server-app");
    assert_eq!(r.reply()["peer"], Value::String(r.local()));
    std::thread::sleep(Duration::from_millis(200));
    assert!(records(&slog).is_empty(), "{:?}", records(&slog));
    // Counted, and `weir status`'s outbound_bypassed (all reasons)
    // includes it.
    let c = node.counters("server");
    assert_eq!(c["outbound_bypassed"], 1, "{c}");
    let m = node.metrics();
    let line = "weir_connections_bypassed_total{direction=\"outbound\",namespace=\"default\",pod=\"server\",reason=\"excluded_interface\"} 1";
    assert!(m.contains(line), "{line} not in:\n{m}");
    // The other interface is captured as usual, both ways.
    let r = node.client(&p.server, APP_UID, "198.18.1.1:8080");
    assert!(r.ok(), "{:?}", r.json);
    let r = node.client(&p.client, APP_UID, "198.18.1.2:8080");
    assert!(r.ok(), "{:?}", r.json);
    let s = wait_records(&slog, 2);
    assert_eq!(s.len(), 2, "{s:?}");
}
