//! The agent's lifecycle: capture goes on while it is down or restarting
//! (pinned links and maps), a restart or upgrade swaps programs in place,
//! a pinned map layout it does not know is refused, and `weir uninstall`
//! leaves nothing behind.

use std::process::Command;
use std::time::Duration;

use serde_json::Value;
use weir_tests::node::{Node, PodEntry, sidecar_log};
use weir_tests::{NetNs, require_root, spawn_in, testkit_command, veth_pair, wait_until, weir_bin};

struct TwoPods {
    client: NetNs,
    server: NetNs,
    _veth: weir_tests::Veth,
}

fn two_pods() -> TwoPods {
    let client = NetNs::new("lcc");
    let server = NetNs::new("lcs");
    let veth = veth_pair(&client, &["198.18.5.1/24"], &server, &["198.18.5.2/24"]);
    TwoPods {
        client,
        server,
        _veth: veth,
    }
}

fn pods(p: &TwoPods) -> Vec<PodEntry> {
    vec![
        PodEntry::new("client", &p.client, &["198.18.5.1"]),
        PodEntry::new("server", &p.server, &["198.18.5.2"]),
    ]
}

fn bpftool(args: &[&str]) -> String {
    let out = Command::new("bpftool")
        .args(args)
        .output()
        .expect("running bpftool");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Continuous traffic while the agent is killed (SIGKILL) and restarted
/// again and again: every connection goes through both proxies; none
/// escapes capture, none fails.
#[test]
fn agent_restarts_under_traffic_lose_no_capture() {
    if !require_root() {
        return;
    }
    let p = two_pods();
    let mut node = Node::with_agent();
    node.set_pods(&pods(&p));
    let clog = node.sidecar(&p.client, "client-sidecar");
    node.sidecar(&p.server, "server-sidecar");
    node.echo(&p.server, 8080, "server-app", 1000);

    // The traffic lasts until every restart is done (`--until-file`), on
    // a fast machine or a slow one (a kernel under emulation takes seconds
    // to start the agent); the count is only a cap.
    const RESTARTS: usize = 10;
    let stop = node.dir.join("stop-traffic");
    let mut traffic = spawn_in(
        Some(&p.client),
        Some(&node.cgroup),
        testkit_command([
            "--uid",
            "1000",
            "client",
            "--connect",
            "198.18.5.2:8080",
            "--count",
            "1000000",
            "--interval-ms",
            "10",
            "--until-file",
            &stop.to_string_lossy(),
        ]),
    );
    let made = |t: &weir_tests::Proc| t.stdout().lines().count();
    let mut during = Vec::new();
    for restart in 0..RESTARTS {
        std::thread::sleep(Duration::from_millis(200));
        assert!(
            traffic.is_running(),
            "traffic stopped before restart {restart}"
        );
        let before = made(&traffic);
        node.kill_agent();
        std::thread::sleep(Duration::from_millis(100));
        node.start_agent();
        // Connections were made while this agent was down or starting.
        wait_until(
            Duration::from_secs(30),
            "connections after the restart",
            || made(&traffic) > before,
        );
        during.push(made(&traffic) - before);
    }
    std::fs::write(&stop, "").unwrap();
    assert!(
        traffic.wait_timeout(Duration::from_secs(60)).is_some(),
        "traffic did not stop"
    );
    let lines: Vec<Value> = traffic
        .stdout()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let n = lines.len();
    assert_eq!(n, traffic.stdout().lines().count(), "every line is JSON");
    let failed: Vec<&Value> = lines.iter().filter(|l| l["ok"] != true).collect();
    let escaped: Vec<&Value> = lines
        .iter()
        .filter(|l| {
            let reply: Value = serde_json::from_str(l["reply"].as_str().unwrap_or("").trim())
                .unwrap_or(Value::Null);
            !reply["peer"]
                .as_str()
                .unwrap_or("")
                .starts_with("127.0.0.6:")
        })
        .collect();
    eprintln!(
        "restarts: {RESTARTS}, connections: {n} ({during:?} across each restart), failed: {}, escaped capture: {}",
        failed.len(),
        escaped.len()
    );
    assert!(failed.is_empty(), "{failed:?}");
    assert!(escaped.is_empty(), "{escaped:?}");
    assert_eq!(
        sidecar_log(&clog).len(),
        n,
        "every connection went through the client proxy"
    );
}

/// A second agent takes over the pinned state: the programs are swapped
/// into the existing links (one attachment per hook, never two), and the
/// maps keep their entries and counters.
#[test]
fn restart_reuses_pinned_links_and_maps() {
    if !require_root() {
        return;
    }
    let p = two_pods();
    let mut node = Node::with_agent();
    node.set_pods(&pods(&p));
    node.sidecar(&p.client, "client-sidecar");
    node.echo(&p.server, 8081, "app", 1000);
    let _ = node.client(&p.client, 1000, "198.18.5.2:8081");
    let before = node.counters("client");
    let cg = node.cgroup.path().to_string_lossy().into_owned();
    let attached = |tree: &str| tree.matches("weir_").count();
    let tree_before = bpftool(&["cgroup", "show", &cg]);
    node.stop_agent();
    node.start_agent();
    let tree_after = bpftool(&["cgroup", "show", &cg]);
    assert_eq!(attached(&tree_before), 10, "{tree_before}");
    assert_eq!(
        attached(&tree_after),
        10,
        "one program per hook after restart:\n{tree_after}"
    );
    assert_ne!(
        tree_before, tree_after,
        "program ids change: new programs were swapped in"
    );
    let after = node.counters("client");
    assert_eq!(
        before["outbound_captured"], after["outbound_captured"],
        "counters survive"
    );
    assert!(
        node.agent_logs()
            .contains("updated weir_connect4 in its pinned link")
    );
}

/// Pinned maps written with another map layout are refused with a clear
/// message, never misread.
#[test]
fn foreign_map_layout_is_refused() {
    if !require_root() {
        return;
    }
    let mut node = Node::with_agent();
    node.stop_agent();
    let meta = node.bpffs.join("weir/maps/WEIR_META");
    let meta = meta.to_string_lossy();
    // layout_version = 999, ready = 1
    let out = Command::new("bpftool")
        .args([
            "map", "update", "pinned", &meta, "key", "0", "0", "0", "0", "value", "0xe7", "0x03",
            "0", "0", "1", "0", "0", "0",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = Command::new(weir_bin())
        .args(["run", "--pods-file"])
        .arg(&node.pods_file)
        .arg("--cgroup")
        .arg(node.cgroup.path())
        .arg("--bpffs")
        .arg(node.bpffs.path())
        .args(["--metrics-addr", "off"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("map layout v999") && err.contains("weir uninstall"),
        "{err}"
    );
}

/// `weir uninstall` removes every pin; with them every program and link
/// goes, and the node is as before.
#[test]
fn uninstall_leaves_nothing_behind() {
    if !require_root() {
        return;
    }
    let p = two_pods();
    let mut node = Node::with_agent();
    node.set_pods(&pods(&p));
    node.stop_agent();
    let cg = node.cgroup.path().to_string_lossy().into_owned();
    assert!(bpftool(&["cgroup", "show", &cg]).contains("weir_connect4"));
    let ino = format!("netns_ino {}", p.server.inode());
    assert!(
        bpftool(&["link", "show"]).contains(&ino),
        "sk_lookup link pinned while the agent is down"
    );
    let out = Command::new(weir_bin())
        .args(["uninstall", "--bpffs"])
        .arg(node.bpffs.path())
        .output()
        .unwrap();
    assert!(out.status.success());
    let listing = String::from_utf8_lossy(&out.stdout);
    assert!(listing.contains("links/netns-"), "{listing}");
    assert!(!node.bpffs.join("weir").exists(), "pin directory removed");
    // Programs are freed asynchronously after the last reference goes.
    weir_tests::wait_until(Duration::from_secs(5), "cgroup programs detached", || {
        !bpftool(&["cgroup", "show", &cg]).contains("weir_")
    });
    for ns in [&p.client, &p.server] {
        let ino = format!("netns_ino {}", ns.inode());
        weir_tests::wait_until(Duration::from_secs(5), "sk_lookup links gone", || {
            !bpftool(&["link", "show"]).contains(&ino)
        });
    }
    // Traffic flows as without weir.
    node.echo(&p.server, 8082, "app", 1000);
    let r = node.client(&p.client, 1000, "198.18.5.2:8082");
    assert!(r.ok(), "{:?}", r.json);
    assert_eq!(r.reply()["peer"], Value::String(r.local()));
}
