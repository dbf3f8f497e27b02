//! Full maps: a pod that does not fit is refused with the map and the flag
//! to raise, nothing of it is left half-written, the pods already enrolled
//! keep their capture, and it is enrolled once there is room.

use std::time::Duration;

use weir_tests::node::{Node, PodEntry, sidecar_log};
use weir_tests::{NetNs, require_root, veth_pair, wait_until};

/// The value of the `weir_map_entries` / `weir_map_capacity` sample of `map`.
fn map_gauge(node: &Node, metric: &str, map: &str) -> i64 {
    let prefix = format!("{metric}{{map=\"{map}\"}} ");
    node.metrics()
        .lines()
        .find_map(|l| l.strip_prefix(&prefix).and_then(|v| v.trim().parse().ok()))
        .unwrap_or_else(|| panic!("no {prefix} in /metrics"))
}

fn gauge(node: &Node, metric: &str) -> i64 {
    let prefix = format!("{metric} ");
    node.metrics()
        .lines()
        .find_map(|l| l.strip_prefix(&prefix).and_then(|v| v.trim().parse().ok()))
        .unwrap_or_else(|| panic!("no {metric} in /metrics"))
}

fn cidrs(n: usize) -> String {
    (0..n)
        .map(|i| format!("10.{}.{}.0/24", i / 256, i % 256))
        .collect::<Vec<_>>()
        .join(",")
}

#[test]
fn full_maps_refuse_the_pod_that_does_not_fit_and_spare_the_others() {
    if !require_root() {
        return;
    }
    let cli = NetNs::new("mpc");
    let srv = NetNs::new("mps");
    let _veth = veth_pair(&cli, &["198.18.6.1/24"], &srv, &["198.18.6.2/24"]);
    let extra: Vec<NetNs> = (0..3).map(|i| NetNs::new(&format!("mp{i}"))).collect();
    let mut node = Node::new();
    node.start_agent_with(&["--max-cidrs", "64", "--max-pods", "3"]);
    // --max-cidrs sizes every CIDR map, as its help says.
    for map in [
        "CIDR_EXCLUDE",
        "CIDR_INCLUDE",
        "CIDR_DNS",
        "CIDR_IFACE",
        "CIDR_SKIP_SRC",
        "SRC_ROUTES",
    ] {
        assert_eq!(map_gauge(&node, "weir_map_capacity", map), 64, "{map}");
    }
    assert_eq!(map_gauge(&node, "weir_map_capacity", "POD_POLICY"), 3);

    let good = PodEntry::new("good", &cli, &["198.18.6.1"]).annotate(
        "traffic.sidecar.istio.io/excludeOutboundIPRanges",
        &cidrs(10),
    );
    node.set_pods(std::slice::from_ref(&good));
    let log = node.sidecar(&cli, "good-sidecar");
    node.echo(&srv, 8080, "upstream", 1000);
    let mut seen = 0;
    let mut captured = |node: &Node| {
        seen += 1;
        let r = node.client(&cli, 1000, "198.18.6.2:8080");
        assert!(r.ok(), "{:?}\n{}", r.json, node.agent_logs());
        wait_until(Duration::from_secs(5), "sidecar record", || {
            sidecar_log(&log).len() >= seen
        });
        assert_eq!(sidecar_log(&log)[seen - 1]["orig_dst"], "198.18.6.2:8080");
    };
    captured(&node);
    assert_eq!(map_gauge(&node, "weir_map_entries", "CIDR_EXCLUDE"), 10);

    // 60 more ranges do not fit in the 54 entries left: the pod is refused
    // by name, with the map and the flag, and leaves no entry behind.
    let wide = PodEntry::new("wide", &extra[0], &[]).annotate(
        "traffic.sidecar.istio.io/excludeOutboundIPRanges",
        &cidrs(60),
    );
    node.write_pods_yaml(&[good.clone(), wide.clone()]);
    node.wait_log("pod default/wide: not enrolled: CIDR_EXCLUDE full (raise --max-cidrs)");
    assert_eq!(node.enrolled(), vec!["good"]);
    assert_eq!(map_gauge(&node, "weir_map_entries", "CIDR_EXCLUDE"), 10);
    assert_eq!(map_gauge(&node, "weir_map_entries", "POD_POLICY"), 1);
    assert_eq!(gauge(&node, "weir_pods_failed"), 1);
    captured(&node);

    // Room again (fewer ranges): enrolled on the next pass.
    let wide = PodEntry::new("wide", &extra[0], &[]).annotate(
        "traffic.sidecar.istio.io/excludeOutboundIPRanges",
        &cidrs(50),
    );
    node.set_pods(&[good.clone(), wide.clone()]);
    assert_eq!(map_gauge(&node, "weir_map_entries", "CIDR_EXCLUDE"), 60);
    assert_eq!(gauge(&node, "weir_pods_failed"), 0);

    // A fourth pod with room for three: the new pod applied last (in name
    // order) is refused, naming --max-pods; the three others stay captured.
    let p1 = PodEntry::new("p1", &extra[1], &[]);
    let p2 = PodEntry::new("p2", &extra[2], &[]);
    node.write_pods_yaml(&[good.clone(), wide.clone(), p1.clone(), p2.clone()]);
    node.wait_log("pod default/p2: not enrolled: ");
    let logs = node.agent_logs();
    assert!(
        logs.contains("full (raise --max-pods)"),
        "no --max-pods advice in\n{logs}"
    );
    assert_eq!(node.enrolled(), vec!["good", "p1", "wide"]);
    assert_eq!(gauge(&node, "weir_pods_failed"), 1);
    captured(&node);

    // One pod leaves: the refused one takes its place.
    node.set_pods(&[good.clone(), wide.clone(), p2.clone()]);
    assert_eq!(node.enrolled(), vec!["good", "p2", "wide"]);
    assert_eq!(map_gauge(&node, "weir_map_entries", "POD_POLICY"), 3);
    captured(&node);
}

/// bpftool's description of the map pinned as `name` (its `max_entries`,
/// `flags`, `bytes_memlock`), or None when nothing is pinned there.
fn pinned_map(node: &Node, name: &str) -> Option<serde_json::Value> {
    let path = node.bpffs.join(format!("weir/maps/{name}"));
    if !path.exists() {
        return None;
    }
    let out = std::process::Command::new("bpftool")
        .args(["-j", "map", "show", "pinned"])
        .arg(&path)
        .output()
        .expect("running bpftool");
    assert!(out.status.success(), "bpftool map show pinned {name}");
    Some(serde_json::from_slice(&out.stdout).expect("bpftool's JSON"))
}

fn memlock(node: &Node, name: &str) -> u64 {
    pinned_map(node, name).unwrap()["bytes_memlock"]
        .as_u64()
        .unwrap()
}

#[test]
fn maps_are_sized_for_the_node_and_allocated_as_used() {
    if !require_root() {
        return;
    }
    let ns = NetNs::new("mga");
    let mut node = Node::new();
    node.start_agent_with(&["--max-pods", "110"]);
    // Hash maps: sized from the pod count, entries allocated on insert
    // (BPF_F_NO_PREALLOC, flag 1).
    for (name, cap) in [
        ("POD_POLICY", 110),
        ("POD_COUNTERS", 110),
        ("POD_META", 110),
        ("POD_ADDRS", 440),
        ("PROXY_IDS", 440),
        ("VIRT_IFACES", 440),
        ("PORT_RULES", 8192),
    ] {
        let m = pinned_map(&node, name).unwrap();
        assert_eq!(m["max_entries"], cap, "{name}: {m}");
        assert_eq!(m["flags"].as_u64().unwrap() & 1, 1, "{name}: {m}");
    }
    // The capture ports: a bitmap of every port (8 KiB), read by the
    // programs several times per connection without a helper call.
    let m = pinned_map(&node, "LISTEN_PORTS").unwrap();
    assert_eq!(m["type"], "array", "{m}");
    assert_eq!(m["max_entries"], 1024, "{m}");
    assert_eq!(m["bytes_value"], 8, "{m}");
    // The preallocated LRU map is sized for handshakes in flight; the
    // fast path's map has two slots while it is off; VIRT_FLOWS waits for
    // a pod with virtual interfaces.
    assert_eq!(
        pinned_map(&node, "PENDING_FLOWS").unwrap()["max_entries"],
        4096
    );
    assert_eq!(pinned_map(&node, "FAST_SOCKS").unwrap()["max_entries"], 2);
    assert!(pinned_map(&node, "VIRT_FLOWS").is_none());

    // Enrolling a pod allocates its entries: the maps grow with it.
    let before: u64 = ["POD_POLICY", "PORT_RULES", "PROXY_IDS", "POD_ADDRS"]
        .iter()
        .map(|m| memlock(&node, m))
        .sum();
    node.set_pods(&[PodEntry::new("grow", &ns, &["198.18.7.1"])]);
    let after: u64 = ["POD_POLICY", "PORT_RULES", "PROXY_IDS", "POD_ADDRS"]
        .iter()
        .map(|m| memlock(&node, m))
        .sum();
    assert!(after > before, "memlock {before} -> {after} with one pod");

    // An agent started with the fast path replaces the empty two-slot map
    // with one of --max-fast-sockets; the pod stays enrolled.
    node.stop_agent();
    node.start_agent_with(&[
        "--max-pods",
        "110",
        "--fast-path",
        "--max-fast-sockets",
        "4096",
    ]);
    assert_eq!(
        pinned_map(&node, "FAST_SOCKS").unwrap()["max_entries"],
        4096
    );
    assert_eq!(node.enrolled(), ["grow".to_string()]);
}
