//! `istio.io/reroute-virtual-interfaces` (istio-iptables `-k`, KubeVirt):
//! TCP connections of a "VM" behind a virtual interface of the pod go to
//! the proxy's outbound port with their original destination, through
//! weir's tc programs; everything else from that interface is forwarded
//! untouched and is never inbound-captured. Kernel tests: they need root
//! and run one at a time.
//!
//! Topology (all in namespaces the test makes):
//!
//! ```text
//! vm (198.18.32.2, 2001:2:32::2) --[eth0 | k6t0]-- pod (198.18.30.1) --[veth]-- srv (198.18.30.2)
//!                                                    forwards                    198.18.31.1, 2001:2:31::1 on lo
//! ```
//!
//! The differential suite compares the same option against Istio's own
//! rules; these tests pin the mechanics (port reuse, fail closed, agent
//! restart, removal).

use std::time::Duration;

use serde_json::Value;
use weir_tests::node::{ClientResult, Node, PodEntry, sidecar_log};
use weir_tests::{NetNs, Veth, kernel_has_tcx, require_root, veth_named, wait_until};

const REROUTE: &str = "istio.io/reroute-virtual-interfaces";
const SERVICE4: &str = "198.18.31.1:80";
const SERVICE6: &str = "[2001:2:31::1]:80";

struct World {
    // The links first: dropped before their namespaces.
    _links: [Veth; 2],
    pod: NetNs,
    vm: NetNs,
    srv: NetNs,
}

fn world() -> World {
    let pod = NetNs::new("vpod");
    let vm = NetNs::new("vvm");
    let srv = NetNs::new("vsrv");
    let links = [
        veth_named(
            &pod,
            "eth0",
            &["198.18.30.1/24", "2001:2:30::1/64"],
            &srv,
            "eth0",
            &["198.18.30.2/24", "2001:2:30::2/64"],
        ),
        veth_named(
            &pod,
            "k6t0",
            &["198.18.32.1/24", "2001:2:32::1/64"],
            &vm,
            "eth0",
            &["198.18.32.2/24", "2001:2:32::2/64"],
        ),
    ];
    srv.ip(&["addr", "add", "198.18.31.1/32", "dev", "lo"]);
    srv.ip(&["addr", "add", "2001:2:31::1/128", "dev", "lo", "nodad"]);
    srv.ip(&["link", "set", "lo", "up"]);
    srv.ip(&["route", "add", "198.18.32.0/24", "via", "198.18.30.1"]);
    srv.ip(&[
        "-6",
        "route",
        "add",
        "2001:2:32::/64",
        "via",
        "2001:2:30::1",
    ]);
    pod.ip(&["route", "add", "default", "via", "198.18.30.2"]);
    pod.ip(&["-6", "route", "add", "default", "via", "2001:2:30::2"]);
    vm.ip(&["route", "add", "default", "via", "198.18.32.1"]);
    vm.ip(&["-6", "route", "add", "default", "via", "2001:2:32::1"]);
    for s in ["net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1"] {
        pod.exec_ok(&["sysctl", "-q", "-w", s]);
    }
    World {
        _links: links,
        pod,
        vm,
        srv,
    }
}

fn pod_entry(w: &World, annotations: &[(&str, &str)]) -> PodEntry {
    let mut e = PodEntry::new("vmpod", &w.pod, &["198.18.30.1", "2001:2:30::1"]);
    for (k, v) in annotations {
        e = e.annotate(k, v);
    }
    e
}

fn from_vm(node: &Node, w: &World, dst: &str) -> ClientResult {
    node.client(&w.vm, 0, dst)
}

/// The client address the answering server saw: the VM's when the
/// connection was forwarded untouched, the pod's when it went through the
/// proxy (its upstream connection).
fn server_saw(r: &ClientResult) -> String {
    r.reply()["peer"].as_str().unwrap_or_default().to_string()
}

fn records_for(log: &std::path::Path, n: usize) -> Vec<Value> {
    wait_until(Duration::from_secs(10), "sidecar records", || {
        sidecar_log(log).len() >= n
    });
    sidecar_log(log)
}

/// Starts the agent with the pod enrolled and waits until the tc programs
/// are on the virtual interface. On a kernel without TCX links (before
/// 6.6) checks instead that the pod is refused, by name and with the
/// reason, and returns `None`: the test has nothing more to check there.
fn enrolled_node(w: &World, annotations: &[(&str, &str)]) -> Option<Node> {
    let mut node = Node::with_agent();
    if !kernel_has_tcx() {
        node.write_pods_yaml(&[pod_entry(w, annotations)]);
        assert_refused_without_tcx(&node, w);
        return None;
    }
    node.set_pods(&[pod_entry(w, annotations)]);
    node.wait_log("rerouting TCP from 1 virtual interface(s)");
    assert_eq!(
        node.status()["kernel_lacks"],
        serde_json::json!([]),
        "this kernel has TCX"
    );
    node.echo(&w.srv, 80, "svc", 0);
    Some(node)
}

/// Before Linux 6.6 (no TCX links) the agent refuses a pod listing virtual
/// interfaces rather than enrolling it with its VM uncaptured: the log
/// names the pod, the annotation and the kernel it needs, the pass counts
/// it failed, `weir status` and `weir explain` say why, and the VM's
/// traffic goes on, untouched.
fn assert_refused_without_tcx(node: &Node, w: &World) {
    let why = format!("has no TCX links, which {REROUTE} needs (Linux >= 6.6)");
    node.wait_log("pod default/vmpod: not enrolled: this kernel (Linux ");
    // The pass's closing line comes after the pod's.
    node.wait_log("0 pod(s) enrolled, 0 updated, 1 failed");
    let logs = node.agent_logs();
    assert!(logs.contains(&why), "{logs}");
    assert!(!logs.contains("rerouting TCP"), "{logs}");
    let status = node.status();
    assert_eq!(status["pods"], serde_json::json!([]), "{status}");
    let lacks = status["kernel_lacks"].to_string();
    assert!(
        lacks.contains(&why) && lacks.contains("refused"),
        "{status}"
    );
    let explain = std::process::Command::new(weir_tests::weir_bin())
        .args([
            "explain",
            "--pod",
            "default/vmpod",
            "--dst",
            SERVICE4,
            "--bpffs",
        ])
        .arg(node.bpffs.path())
        .output()
        .expect("running weir explain");
    let err = String::from_utf8_lossy(&explain.stderr);
    assert!(!explain.status.success(), "{err}");
    assert!(err.contains("not enrolled") && err.contains(&why), "{err}");
    // Nothing of weir's is on the VM's interface.
    let progs = w.pod.exec_ok(&["bpftool", "prog", "show"]);
    assert!(!progs.contains("weir_virt"), "{progs}");
}

#[test]
fn vm_connections_go_to_the_outbound_port_with_their_original_destination() {
    if !require_root() {
        return;
    }
    let w = world();
    let Some(mut node) = enrolled_node(&w, &[(REROUTE, "k6t0")]) else {
        return;
    };
    let log = node.sidecar(&w.pod, "sidecar");
    let mut seen = 0;
    for (dst, vm_addr, pod_side) in [
        (SERVICE4, "198.18.32.2", "198.18.32.1:15001"),
        (SERVICE6, "2001:2:32::2", "[2001:2:32::1]:15001"),
    ] {
        let r = from_vm(&node, &w, dst);
        assert!(r.ok(), "{dst}: {:?}\n{}", r.json, node.agent_logs());
        // The VM sees the destination it dialled...
        assert_eq!(r.peer(), dst, "{:?}", r.json);
        // ...and the answer came through the proxy (its upstream socket is
        // the pod's, not the VM's).
        assert_eq!(r.reply()["server"], "svc", "{:?}", r.json);
        let upstream_peer = server_saw(&r);
        assert!(
            upstream_peer.contains("198.18.30.1") || upstream_peer.contains("2001:2:30::1"),
            "the service's peer must be the pod (via the proxy), got {upstream_peer}"
        );
        seen += 1;
        let recs = records_for(&log, seen);
        let rec = &recs[seen - 1];
        assert_eq!(rec["listener"], "outbound", "{rec}");
        assert_eq!(rec["orig_dst"], dst, "{rec}");
        // As with REDIRECT: the proxy accepted on the interface's address
        // and its outbound port, from the VM's address.
        assert_eq!(rec["local"], pod_side, "{rec}");
        assert!(
            rec["peer"].as_str().unwrap_or_default().contains(vm_addr),
            "{rec}"
        );
    }
    // Operators see the attachments and the connections' state.
    // (bpftool before 7.3 prints TCX links as "type 11" and leaves them
    // out of `net show`; the programs are named in any version.)
    let progs = w.pod.exec_ok(&["bpftool", "prog", "show"]);
    assert!(
        progs.contains("weir_virt_in") && progs.contains("weir_virt_out"),
        "bpftool prog show:\n{progs}"
    );
    let links = w.pod.exec_ok(&["bpftool", "link", "show"]);
    assert!(
        links.contains("tcx") || links.matches("type 11").count() >= 2,
        "bpftool link show:\n{links}"
    );
    let flows = String::from_utf8(
        std::process::Command::new("bpftool")
            .args(["map", "dump", "pinned"])
            .arg(node.bpffs.join("weir/maps/VIRT_FLOWS"))
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap();
    assert!(
        flows.contains("\"peer_port\"") && flows.contains("\"local_port\": 15001"),
        "{flows}"
    );
    let c = node.counters("vmpod");
    assert_eq!(c["virt_captured"], 2, "{c}");
    assert_eq!(c["virt_dropped"], 0, "{c}");
    let metrics = node.metrics();
    assert!(
        metrics.contains("direction=\"virtual_interface\""),
        "metrics lack the virtual_interface series:\n{metrics}"
    );
    // Two entries per connection (both directions), counted on scrape.
    let flows = metrics
        .lines()
        .find(|l| l.starts_with("weir_map_entries{map=\"VIRT_FLOWS\"}"))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse::<f64>().ok());
    assert_eq!(flows, Some(4.0), "{metrics}");
}

#[test]
fn only_included_ranges_are_captured_and_nothing_from_the_vm_is_inbound() {
    if !require_root() {
        return;
    }
    let w = world();
    let Some(mut node) = enrolled_node(
        &w,
        &[
            (REROUTE, "k6t0"),
            (
                "traffic.sidecar.istio.io/includeOutboundIPRanges",
                "198.18.99.0/24",
            ),
        ],
    ) else {
        return;
    };
    let log = node.sidecar(&w.pod, "sidecar");
    node.echo(&w.pod, 8080, "app", 1000);
    // Not in the include ranges: forwarded, the service sees the VM.
    let r = from_vm(&node, &w, SERVICE4);
    assert!(r.ok(), "{:?}", r.json);
    assert_eq!(r.reply()["server"], "svc");
    assert!(server_saw(&r).starts_with("198.18.32.2:"), "{:?}", r.json);
    // The pod's own address from the VM: Istio's `-i k6t0 -j RETURN`
    // keeps it away from inbound capture too; the application answers.
    let r = from_vm(&node, &w, "198.18.30.1:8080");
    assert!(r.ok(), "{:?}", r.json);
    assert_eq!(r.reply()["server"], "app");
    std::thread::sleep(Duration::from_millis(300));
    assert!(sidecar_log(&log).is_empty(), "{:?}", sidecar_log(&log));
}

#[test]
fn a_vm_port_reused_towards_two_destinations_keeps_both_apart() {
    if !require_root() {
        return;
    }
    let w = world();
    w.srv.ip(&["addr", "add", "198.18.31.2/32", "dev", "lo"]);
    let Some(mut node) = enrolled_node(&w, &[(REROUTE, "k6t0")]) else {
        return;
    };
    let log = node.sidecar(&w.pod, "sidecar");
    for (i, dst) in ["198.18.31.1:80", "198.18.31.2:80"].iter().enumerate() {
        let out = node.run_in_pod(
            &w.vm,
            &[
                "fixed-port-client",
                "--connect",
                dst,
                "--bind",
                "198.18.32.2",
                "--first-port",
                "41000",
            ],
        );
        let r: Value = serde_json::from_str(out.lines().last().unwrap_or_default())
            .unwrap_or_else(|e| panic!("{out}: {e}"));
        assert_eq!(r["ok"], true, "{r}\n{}", node.agent_logs());
        assert_eq!(r["peer"], *dst, "{r}");
        let recs = records_for(&log, i + 1);
        assert_eq!(recs[i]["orig_dst"], *dst, "{}", recs[i]);
    }
}

#[test]
fn without_a_proxy_vm_connections_are_refused_not_forwarded() {
    if !require_root() {
        return;
    }
    let w = world();
    let Some(node) = enrolled_node(&w, &[(REROUTE, "k6t0")]) else {
        return;
    };
    let r = from_vm(&node, &w, SERVICE4);
    assert!(
        !r.ok(),
        "{:?}\n{}\n{}",
        r.json,
        node.agent_logs(),
        w.pod.exec_ok(&["bpftool", "net", "show"])
    );
    assert_eq!(r.errno(), Some(libc::ECONNREFUSED as i64), "{:?}", r.json);
}

#[test]
fn restart_keeps_rerouting_and_removal_stops_it() {
    if !require_root() {
        return;
    }
    let w = world();
    let Some(mut node) = enrolled_node(&w, &[(REROUTE, "k6t0")]) else {
        return;
    };
    let log = node.sidecar(&w.pod, "sidecar");
    node.kill_agent();
    // Pinned links and maps: capture goes on without the agent.
    let r = from_vm(&node, &w, SERVICE4);
    assert!(r.ok(), "{:?}", r.json);
    assert_eq!(records_for(&log, 1)[0]["orig_dst"], SERVICE4);
    node.start_agent();
    node.wait_log("rerouting TCP from 1 virtual interface(s)");
    let r = from_vm(&node, &w, SERVICE4);
    assert!(r.ok(), "{:?}", r.json);
    assert_eq!(records_for(&log, 2)[1]["orig_dst"], SERVICE4);
    // Dropping the annotation detaches the tc programs: forwarded again.
    node.set_pods(&[pod_entry(&w, &[])]);
    wait_until(
        Duration::from_secs(15),
        "VM connections to be forwarded again",
        || {
            let r = from_vm(&node, &w, SERVICE4);
            r.ok() && server_saw(&r).starts_with("198.18.32.2:")
        },
    );
    assert_eq!(sidecar_log(&log).len(), 2, "{:?}", sidecar_log(&log));
}

/// KubeVirt creates the VM's interface after the pod is enrolled: the
/// agent attaches to it on its next pass (every `--resync-secs`, 1 s
/// here), and until then the VM's traffic is forwarded untouched.
#[test]
fn an_interface_that_appears_later_is_attached_on_a_later_pass() {
    if !require_root() {
        return;
    }
    let w = world();
    let mut node = Node::with_agent();
    if !kernel_has_tcx() {
        // Refused although vm1 does not exist yet: it may appear any time.
        node.write_pods_yaml(&[pod_entry(&w, &[(REROUTE, "vm1")])]);
        assert_refused_without_tcx(&node, &w);
        return;
    }
    node.set_pods(&[pod_entry(&w, &[(REROUTE, "vm1")])]);
    wait_until(Duration::from_secs(15), "the pod to be enrolled", || {
        node.enrolled().iter().any(|p| p.ends_with("vmpod"))
    });
    node.echo(&w.srv, 80, "svc", 0);
    let log = node.sidecar(&w.pod, "sidecar");
    let r = from_vm(&node, &w, SERVICE4);
    assert!(r.ok(), "{:?}", r.json);
    assert!(
        server_saw(&r).starts_with("198.18.32.2:"),
        "no vm1 yet, so forwarded: {:?}",
        r.json
    );
    // The interface "appears" (renamed into the listed name).
    w.pod.ip(&["link", "set", "k6t0", "down"]);
    w.pod.ip(&["link", "set", "k6t0", "name", "vm1"]);
    w.pod.ip(&["link", "set", "vm1", "up"]);
    node.wait_log("rerouting TCP from 1 virtual interface(s)");
    let r = from_vm(&node, &w, SERVICE4);
    assert!(r.ok(), "{:?}\n{}", r.json, node.agent_logs());
    assert_eq!(records_for(&log, 1)[0]["orig_dst"], SERVICE4);
    assert!(
        server_saw(&r).starts_with("198.18.30.1:"),
        "through the proxy now: {:?}",
        r.json
    );
}

/// Not a check: prints what the tc programs cost per packet
/// (`kernel.bpf_stats_enabled` for the duration) over 500 rerouted
/// connections. `cargo test -p weir-tests --test virt -- --ignored
/// --nocapture virt_program_cost`.
#[test]
#[ignore]
fn virt_program_cost() {
    if !require_root() {
        return;
    }
    let w = world();
    let Some(mut node) = enrolled_node(&w, &[(REROUTE, "k6t0")]) else {
        return;
    };
    let log = node.sidecar(&w.pod, "sidecar");
    let stats = std::fs::read_to_string("/proc/sys/kernel/bpf_stats_enabled").unwrap_or_default();
    std::fs::write("/proc/sys/kernel/bpf_stats_enabled", "1").unwrap();
    let t = std::time::Instant::now();
    let out = node.run_in_pod(
        &w.vm,
        &[
            "fixed-port-client",
            "--connect",
            SERVICE4,
            "--bind",
            "198.18.32.2",
            "--first-port",
            "42000",
            "--count",
            "500",
        ],
    );
    let elapsed = t.elapsed();
    let ok = out.lines().filter(|l| l.contains("\"ok\":true")).count();
    let progs: Value = serde_json::from_str(
        &String::from_utf8(
            std::process::Command::new("bpftool")
                .args(["-j", "prog", "show"])
                .output()
                .unwrap()
                .stdout,
        )
        .unwrap(),
    )
    .unwrap();
    std::fs::write("/proc/sys/kernel/bpf_stats_enabled", stats.trim()).unwrap();
    println!(
        "{ok}/500 connections in {elapsed:?}; sidecar records {}; counters {}",
        sidecar_log(&log).len(),
        node.counters("vmpod")
    );
    for p in progs.as_array().unwrap() {
        let name = p["name"].as_str().unwrap_or_default();
        if name.starts_with("weir_virt") || name == "weir_sockops" {
            let (n, ns) = (
                p["run_cnt"].as_u64().unwrap_or(0),
                p["run_time_ns"].as_u64().unwrap_or(0),
            );
            if let Some(per) = ns.checked_div(n) {
                println!("{name}: {n} runs, {per} ns per run");
            }
        }
    }
}
