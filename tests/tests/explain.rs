//! `weir explain` against a running agent: one pod with known annotations,
//! every answer checked, and two of them checked against what the kernel
//! really does with the connection. Needs root (skips without it unless
//! WEIR_REQUIRE_KERNEL_TESTS or CI is set).

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use serde_json::Value;
use weir_tests::node::{Node, PodEntry};
use weir_tests::{NetNs, require_root, spawn_in, veth_pair, wait_until, weir_bin};

const TESTKIT: &str = env!("CARGO_BIN_EXE_weir-testkit");
const TIMEOUT: Duration = Duration::from_secs(20);
const POD_IP: &str = "198.18.3.2";
const NODE_IP: &str = "198.18.3.1";

fn weir(bpffs: &Path, args: &[&str]) -> std::process::Output {
    Command::new(weir_bin())
        .args(args)
        .arg("--bpffs")
        .arg(bpffs)
        .output()
        .expect("running weir")
}

/// `weir explain … -o json`, parsed.
fn explain(bpffs: &Path, args: &[&str]) -> Value {
    let mut full = vec!["explain", "--pod", "shop/app", "-o", "json"];
    full.extend_from_slice(args);
    let out = weir(bpffs, &full);
    assert!(
        out.status.success(),
        "weir {full:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "weir {full:?}: not JSON ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

fn check(v: &Value, verdict: &str, captured: bool, target_prefix: &str) {
    assert_eq!(v["verdict"], verdict, "{v:#}");
    assert_eq!(v["captured"], captured, "{v:#}");
    let target = v["target"].as_str().unwrap();
    assert!(
        target.starts_with(target_prefix),
        "target {target:?}: {v:#}"
    );
    assert!(!v["rule"].as_str().unwrap().is_empty(), "{v:#}");
    assert!(!v["istio_rule"].as_str().unwrap().is_empty(), "{v:#}");
}

#[test]
fn explain_answers_from_the_pinned_maps() {
    if !require_root() {
        return;
    }
    let pod = NetNs::new("xpod");
    let node = NetNs::new("xnode");
    let _veth = veth_pair(
        &pod,
        &[&format!("{POD_IP}/24")],
        &node,
        &[&format!("{NODE_IP}/24")],
    );
    let mut host = Node::builder()
        .name("xpl")
        .agent_args(Vec::<String>::new())
        .metrics(false)
        .build();
    host.write_pods_yaml(&[PodEntry::new("app", &pod, &[POD_IP])
        .namespace("shop")
        .annotate("traffic.sidecar.istio.io/excludeOutboundPorts", "3306")
        .annotate("traffic.sidecar.istio.io/excludeInboundPorts", "8081")
        .annotate(
            "traffic.sidecar.istio.io/excludeOutboundIPRanges",
            "198.18.5.0/24",
        )]);
    host.spawn_agent();
    let fs = host.bpffs.path().to_path_buf();
    let dir = host.dir.path().to_path_buf();
    wait_until(TIMEOUT, "the pod to be enrolled", || {
        assert!(
            host.agent_is_running(),
            "weir run exited\n{}",
            host.agent_logs()
        );
        let out = weir(fs.as_path(), &["status", "-o", "json"]);
        out.status.success()
            && serde_json::from_slice::<Value>(&out.stdout).is_ok_and(|s| {
                s["ready"] == true && s["pods"].as_array().is_some_and(|p| p.len() == 1)
            })
    });
    let ready = dir.join("sidecar.ready");
    let sidecar_log = dir.join("sidecar.jsonl");
    let mut sidecar = spawn_in(Some(&pod), Some(&host.cgroup), {
        let mut c = Command::new(TESTKIT);
        c.args(["--uid", "1337", "sidecar", "--name", "app"])
            .arg("--log")
            .arg(&sidecar_log)
            .arg("--ready-file")
            .arg(&ready);
        c
    });
    sidecar.wait_for_file(&ready, TIMEOUT);
    let bpffs = fs.as_path();
    let remote = format!("{NODE_IP}:80");

    // Outbound.
    let v = explain(bpffs, &["--dst", &remote]);
    check(&v, "redirect_outbound", true, "127.0.0.1:15001");
    assert_eq!(v["pod"], "shop/app");
    assert_eq!(v["uid"], 1000);
    assert_eq!(v["proxy_listening"], true, "{v:#}");
    assert_eq!(
        v["counter"],
        "weir_connections_captured_total{namespace=\"shop\",pod=\"app\",direction=\"outbound\"}"
    );
    let v = explain(bpffs, &["--dst", &format!("{NODE_IP}:3306")]);
    check(
        &v,
        "bypass_excluded_port",
        false,
        &format!("{NODE_IP}:3306"),
    );
    assert_eq!(
        v["istio_rule"],
        "-A ISTIO_OUTPUT -p tcp --dport 3306 -j RETURN"
    );
    let v = explain(bpffs, &["--dst", &remote, "--uid", "1337"]);
    check(&v, "bypass_proxy", false, &remote);
    let v = explain(bpffs, &["--dst", "127.0.0.1:8080"]);
    check(&v, "bypass_loopback", false, "127.0.0.1:8080");
    let v = explain(
        bpffs,
        &["--dst", &format!("{POD_IP}:8080"), "--uid", "1337"],
    );
    check(&v, "redirect_inbound", true, "127.0.0.1:15006");
    let v = explain(bpffs, &["--dst", "198.18.5.7:80"]);
    check(&v, "bypass_excluded_cidr", false, "198.18.5.7:80");
    assert_eq!(
        v["istio_rule"],
        "-A ISTIO_OUTPUT -d 198.18.5.0/24 -j RETURN"
    );
    let v = explain(
        bpffs,
        &[
            "--dst",
            &format!("{POD_IP}:8080"),
            "--uid",
            "1337",
            "--src",
            "127.0.0.6",
        ],
    );
    check(&v, "bypass_passthrough", false, &format!("{POD_IP}:8080"));

    // Inbound.
    let v = explain(bpffs, &["--inbound", "--dst", &format!("{POD_IP}:8080")]);
    check(
        &v,
        "redirect_inbound",
        true,
        "the proxy's listener on port 15006",
    );
    assert_eq!(v["proxy_listening"], true, "{v:#}");
    let v = explain(bpffs, &["--inbound", "--dst", &format!("{POD_IP}:8081")]);
    check(&v, "bypass_excluded_port", false, &format!("{POD_IP}:8081"));
    let v = explain(bpffs, &["--inbound", "--dst", &format!("{POD_IP}:15008")]);
    check(&v, "bypass_tunnel", false, &format!("{POD_IP}:15008"));
    let v = explain(bpffs, &["--inbound", "--dst", "198.18.3.9:8080"]);
    check(&v, "pass_not_pod_address", false, "198.18.3.9:8080");

    // Text output, and errors that say what to do.
    let out = weir(
        bpffs,
        &[
            "explain",
            "--pod",
            "shop/app",
            "--dst",
            &format!("{NODE_IP}:3306"),
        ],
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success());
    assert!(
        text.contains("NOT CAPTURED (bypass_excluded_port)"),
        "{text}"
    );
    assert!(text.contains("excludeOutboundPorts"), "{text}");
    let out = weir(bpffs, &["explain", "--pod", "shop/nope", "--dst", &remote]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("pod shop/nope is not enrolled") && err.contains("shop/app"),
        "{err}"
    );

    // What the kernel does agrees: the captured connection reaches the
    // sidecar with its original destination, the excluded port does not.
    let listener = node.run_in(|| std::net::TcpListener::bind(format!("{NODE_IP}:0")).unwrap());
    let port = listener.local_addr().unwrap().port();
    let v = explain(bpffs, &["--dst", &format!("{NODE_IP}:{port}")]);
    assert_eq!(v["verdict"], "redirect_outbound");
    for dst in [format!("{NODE_IP}:{port}"), format!("{NODE_IP}:3306")] {
        let mut client = spawn_in(Some(&pod), Some(&host.cgroup), {
            let mut c = Command::new(TESTKIT);
            c.args([
                "--uid",
                "1000",
                "client",
                "--connect",
                &dst,
                "--timeout-ms",
                "2000",
            ]);
            c
        });
        client.wait_timeout(TIMEOUT).expect("client finishes");
        drop(client);
    }
    let log = std::fs::read_to_string(&sidecar_log).unwrap_or_default();
    let dsts: Vec<String> = log
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter_map(|r| r["orig_dst"].as_str().map(str::to_string))
        .collect();
    assert_eq!(
        dsts,
        vec![format!("{NODE_IP}:{port}")],
        "sidecar log:\n{log}"
    );

    // The pins answer with the agent gone (as after a crash).
    host.kill_agent();
    let v = explain(bpffs, &["--dst", &format!("{NODE_IP}:3306")]);
    assert_eq!(v["verdict"], "bypass_excluded_port");

    drop(sidecar);
    let out = weir(bpffs, &["uninstall"]);
    assert!(out.status.success());
}
