//! What operators see: Prometheus counters that match the traffic, kernel
//! log records at a level changed at run time, bpftool-readable maps.

use std::process::Command;

use weir_tests::node::{Node, PodEntry};
use weir_tests::{NetNs, require_root, veth_pair, wait_until, weir_bin};

fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<u64> {
    text.lines()
        .filter(|l| l.starts_with(name) && !l.starts_with('#'))
        .find(|l| {
            labels
                .iter()
                .all(|(k, v)| l.contains(&format!("{k}=\"{v}\"")))
        })
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

#[test]
fn metrics_match_the_traffic_sent() {
    if !require_root() {
        return;
    }
    let client = NetNs::new("obc");
    let server = NetNs::new("obs");
    let _v = veth_pair(&client, &["198.18.6.1/24"], &server, &["198.18.6.2/24"]);
    let mut node = Node::with_agent();
    node.set_pods(&[
        PodEntry::new("client", &client, &["198.18.6.1"])
            .annotate("traffic.sidecar.istio.io/excludeOutboundPorts", "9999"),
        PodEntry::new("server", &server, &["198.18.6.2"]),
    ]);
    node.sidecar(&client, "client-sidecar");
    node.sidecar(&server, "server-sidecar");
    node.echo(&server, 8080, "app", 1000);
    node.echo(&server, 9999, "app-9999", 1000);
    for _ in 0..5 {
        assert!(node.client(&client, 1000, "198.18.6.2:8080").ok());
    }
    for _ in 0..3 {
        assert!(node.client(&client, 1000, "198.18.6.2:9999").ok());
    }
    let m = node.metrics();
    let pod = |n: &'static str| [("namespace", "default"), ("pod", n)];
    let c = pod("client");
    let s = pod("server");
    assert_eq!(metric(&m, "weir_pods_enrolled", &[]), Some(2), "{m}");
    assert_eq!(
        metric(
            &m,
            "weir_connections_captured_total",
            &[c[0], c[1], ("direction", "outbound")]
        ),
        Some(5),
        "{m}"
    );
    assert_eq!(
        metric(
            &m,
            "weir_connections_bypassed_total",
            &[c[0], c[1], ("reason", "excluded_port")]
        ),
        Some(3),
        "{m}"
    );
    // The client proxy's 5 upstream connections are its own (not captured).
    assert_eq!(
        metric(
            &m,
            "weir_connections_bypassed_total",
            &[c[0], c[1], ("reason", "proxy_identity")]
        ),
        Some(5),
        "{m}"
    );
    // The server captured the 5 proxied and the 3 direct connections.
    assert_eq!(
        metric(
            &m,
            "weir_connections_captured_total",
            &[s[0], s[1], ("direction", "inbound")]
        ),
        Some(8),
        "{m}"
    );
    assert_eq!(
        metric(
            &m,
            "weir_original_dst_lookups_total",
            &[c[0], c[1], ("result", "answered")]
        ),
        Some(5),
        "{m}"
    );
    assert!(m.contains("weir_build_info{commit=\""), "{m}");
    // The agent's own health: passes that applied every pod, and the
    // process collector.
    assert!(
        metric(&m, "weir_reconcile_passes_total", &[("result", "ok")]).is_some_and(|n| n >= 1),
        "{m}"
    );
    assert!(
        metric(&m, "weir_reconcile_duration_seconds_count", &[]).is_some_and(|n| n >= 1),
        "{m}"
    );
    assert!(m.contains("\nprocess_resident_memory_bytes "), "{m}");
    // The mixed-unit family of earlier versions is gone.
    assert!(!m.contains("weir_node_events_total"), "{m}");
}

#[test]
fn kernel_log_level_changes_at_run_time() {
    if !require_root() {
        return;
    }
    let client = NetNs::new("olc");
    let server = NetNs::new("ols");
    let _v = veth_pair(&client, &["198.18.7.1/24"], &server, &["198.18.7.2/24"]);
    let mut node = Node::new();
    node.start_agent_with(&["--kernel-log-level", "info"]);
    node.set_pods(&[PodEntry::new("client", &client, &["198.18.7.1"])]);
    node.sidecar(&client, "client-sidecar");
    wait_until(
        std::time::Duration::from_secs(5),
        "listener log record",
        || node.agent_logs().contains("proxy listener recorded"),
    );
    node.echo(&server, 8080, "app", 1000);
    assert!(node.client(&client, 1000, "198.18.7.2:8080").ok());
    assert!(
        !node.agent_logs().contains("connect pod="),
        "trace records are off at info"
    );
    let out = Command::new(weir_bin())
        .args(["log-level", "trace", "--bpffs"])
        .arg(node.bpffs.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(node.client(&client, 1000, "198.18.7.2:8080").ok());
    wait_until(
        std::time::Duration::from_secs(5),
        "trace log record",
        || node.agent_logs().contains("connect pod="),
    );
}

#[test]
fn bpftool_shows_named_programs_and_readable_maps() {
    if !require_root() {
        return;
    }
    let ns = NetNs::new("obt");
    ns.ip(&["addr", "add", "198.18.8.1/32", "dev", "lo"]);
    let node = Node::with_agent();
    node.set_pods(&[PodEntry::new("shown", &ns, &["198.18.8.1"])]);
    let progs = String::from_utf8(
        Command::new("bpftool")
            .args(["prog", "show"])
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap();
    for p in [
        "weir_connect4",
        "weir_connect6",
        "weir_sockops",
        "weir_getsockopt",
        "weir_sk_lookup",
    ] {
        assert!(progs.contains(p), "{p} missing from bpftool prog show");
    }
    let pinned = node.bpffs.join("weir/maps/POD_POLICY");
    let dump = String::from_utf8(
        Command::new("bpftool")
            .args(["map", "dump", "pinned"])
            .arg(&pinned)
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap();
    for field in [
        "\"outbound_port\": 15001",
        "\"inbound_port\": 15006",
        "\"lo_id\": 1337",
    ] {
        assert!(dump.contains(field), "{field} not in:\n{dump}");
    }
}

#[test]
fn map_usage_is_exported_against_capacity() {
    if !require_root() {
        return;
    }
    let ns = NetNs::new("obm");
    ns.ip(&["addr", "add", "198.18.8.9/32", "dev", "lo"]);
    let node = Node::with_agent();
    node.set_pods(&[PodEntry::new("m", &ns, &["198.18.8.9"]).annotate(
        "traffic.sidecar.istio.io/excludeOutboundIPRanges",
        "10.0.0.0/8,10.1.0.0/16",
    )]);
    let m = node.metrics();
    assert_eq!(
        metric(&m, "weir_map_entries", &[("map", "POD_POLICY")]),
        Some(1),
        "{m}"
    );
    assert_eq!(
        metric(&m, "weir_map_entries", &[("map", "CIDR_EXCLUDE")]),
        Some(2),
        "{m}"
    );
    assert_eq!(
        // The default capacity without --max-pods (and no Kubernetes node).
        metric(&m, "weir_map_capacity", &[("map", "POD_POLICY")]),
        Some(256),
        "{m}"
    );
}

#[test]
fn json_log_lines_and_the_version_line() {
    if !require_root() {
        return;
    }
    let ns = NetNs::new("ojs");
    ns.ip(&["addr", "add", "198.18.8.17/32", "dev", "lo"]);
    let mut node = Node::new();
    node.start_agent_with(&["--log-format", "json", "--log-level", "debug"]);
    node.set_pods(&[PodEntry::new("j", &ns, &["198.18.8.17"])]);
    let logs = node.agent_logs();
    // The agent logs on stderr (the harness's section of the output).
    let stderr = logs
        .split_once("--- stderr ---\n")
        .map(|(_, e)| e.trim_end().trim_end_matches("-----"))
        .unwrap_or_else(|| panic!("no stderr section in {logs}"));
    let records: Vec<serde_json::Value> = stderr
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not a JSON line ({e}): {l:?}")))
        .collect();
    assert!(!records.is_empty(), "no log lines");
    for r in &records {
        for k in ["time", "level", "target", "message"] {
            assert!(r[k].is_string(), "{k} missing in {r}");
        }
    }
    // The first line says what runs where; --log-level debug lets debug
    // records through (RUST_LOG=info in the environment does not win).
    let first = records[0]["message"].as_str().unwrap();
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
    assert!(
        first.starts_with("weir ") && first.contains("(commit ") && first.ends_with(kernel.trim()),
        "{first}"
    );
    assert!(records.iter().any(|r| r["level"] == "DEBUG"), "{logs}");
}

/// The agent keeps weir-cni chained in the node's CNI configuration and
/// says so per file (`weir_cni_chain_installed`).
#[test]
fn cni_chain_gauge_follows_the_configuration_file() {
    if !require_root() {
        return;
    }
    let mut node = Node::new();
    let conf_dir = node.dir.join("net.d");
    std::fs::create_dir_all(&conf_dir).unwrap();
    let conf = conf_dir.join("10-test.conflist");
    std::fs::write(
        &conf,
        r#"{"cniVersion":"1.0.0","name":"test","plugins":[{"type":"bridge"}]}"#,
    )
    .unwrap();
    let socket = node.dir.join("run/cni.sock");
    node.start_agent_with(&[
        "--cni-socket",
        socket.to_str().unwrap(),
        "--cni-conf-dir",
        conf_dir.to_str().unwrap(),
    ]);
    node.wait_log("chained weir-cni into");
    let series = format!("weir_cni_chain_installed{{file=\"{}\"}} 1", conf.display());
    wait_until(std::time::Duration::from_secs(10), "chain gauge", || {
        node.metrics().contains(&series)
    });
    assert!(
        std::fs::read_to_string(&conf).unwrap().contains("weir-cni"),
        "the file was not changed"
    );
}
