//! Kernel tests of the socket-level fast path (`weir run --fast-path`):
//! bytes between two sockets of enrolled pods on this node go straight from
//! one socket to the other (sockops + sk_msg), and must arrive exactly as
//! TCP would deliver them: in order, complete, with half closes, early
//! closes, sendfile and splice senders. Connections that are not between
//! two local sockets of enrolled pods must not join it.
//!
//! Every test builds its own node (cgroup, bpffs, agent) and pods; they
//! need root and run one at a time.
//!
//! Whether a connection went socket to socket is read from the client
//! socket itself: `TCP_INFO`'s `tcpi_bytes_received` (sequence space, so
//! the peer's FIN counts one) stays at most 1 when every byte of the reply
//! skipped TCP.

use std::path::PathBuf;
use std::time::Duration;

use serde_json::Value;
use weir_tests::node::{Node, PodEntry, sidecar_log};
use weir_tests::{NetNs, Veth, require_root, spawn_in, testkit_command, veth_pair, wait_until};

const APP_UID: u32 = 1000;
const PROXY_UID: u32 = 1337;
const MB: u64 = 1 << 20;

/// The application server behind pod B's sidecar (captured inbound).
const MESH_V4: &str = "198.18.1.2:8080";
const MESH_V6: &str = "[2001:2:0:1::2]:8080";
/// Pod A's own server on loopback (never captured, but local).
const LOOPBACK: &str = "127.0.0.1:9090";
/// Pod C's server: C is not enrolled.
const OUTSIDE: &str = "198.18.2.2:8080";

/// Pods A (198.18.1.1, 2001:2:0:1::1) and B (198.18.1.2, 2001:2:0:1::2),
/// enrolled, each with the testkit sidecar; A also runs a server on
/// 127.0.0.1:9090, B one on 8080 (behind its sidecar). Pod C
/// (198.18.2.2, joined to A by a second veth) runs in the node's cgroup
/// too, with servers on 8080 and 127.0.0.1:9090, but is not enrolled.
struct Fixture {
    node: Node,
    a: NetNs,
    _b: NetNs,
    c: NetNs,
    a_sidecar: PathBuf,
    b_server: PathBuf,
    _veths: Vec<Veth>,
}

fn fixture(fast_path: bool) -> Fixture {
    let a = NetNs::new("fpa");
    let b = NetNs::new("fpb");
    let c = NetNs::new("fpc");
    let veths = vec![
        veth_pair(
            &a,
            &["198.18.1.1/24", "2001:2:0:1::1/64"],
            &b,
            &["198.18.1.2/24", "2001:2:0:1::2/64"],
        ),
        veth_pair(&a, &["198.18.2.1/24"], &c, &["198.18.2.2/24"]),
    ];
    let mut node = Node::new();
    start_agent(&mut node, fast_path);
    node.set_pods(&[
        PodEntry::new("a", &a, &["198.18.1.1", "2001:2:0:1::1"]),
        PodEntry::new("b", &b, &["198.18.1.2", "2001:2:0:1::2"]),
    ]);
    let a_sidecar = node.sidecar(&a, "a-sidecar");
    node.sidecar(&b, "b-sidecar");
    let b_server = fast_server(&mut node, &b, 8080);
    fast_server(&mut node, &a, 9090);
    fast_server(&mut node, &c, 8080);
    fast_server(&mut node, &c, 9090);
    Fixture {
        node,
        a,
        _b: b,
        c,
        a_sidecar,
        b_server,
        _veths: veths,
    }
}

fn start_agent(node: &mut Node, fast_path: bool) {
    if fast_path {
        node.start_agent_with(&["--fast-path"]);
    } else {
        node.start_agent();
    }
}

/// Runs `weir-testkit fast-server` in `pod` on `port` as the application
/// user; returns its log.
fn fast_server(node: &mut Node, pod: &NetNs, port: u16) -> PathBuf {
    let log = node
        .dir
        .join(format!("fast-server-{}-{port}.log", pod.name()));
    let port = port.to_string();
    let log_arg = log.to_string_lossy().into_owned();
    node.daemon(
        pod,
        &[
            "--uid",
            &APP_UID.to_string(),
            "fast-server",
            "--port",
            &port,
            "--log",
            &log_arg,
        ],
    );
    log
}

/// Runs one `fast-client` scenario from `pod` as `uid` and returns its JSON
/// line. The harness gives it 20 s: a stream that hangs fails the test.
fn client(node: &Node, pod: &NetNs, uid: u32, dst: &str, scenario: &str, extra: &[&str]) -> Value {
    let uid = uid.to_string();
    let mut args = vec![
        "--uid",
        uid.as_str(),
        "fast-client",
        "--connect",
        dst,
        "--scenario",
        scenario,
    ];
    args.extend(extra);
    let out = node.run_in_pod(pod, &args);
    let line = out.lines().last().unwrap_or_default();
    serde_json::from_str(line).unwrap_or_else(|e| panic!("{scenario} to {dst}: {out:?}: {e}"))
}

/// The node's fast-path figures from `weir status`.
fn fast(node: &Node) -> Value {
    node.status()["fast_path"].clone()
}

fn num(v: &Value, k: &str) -> u64 {
    v[k].as_u64()
        .unwrap_or_else(|| panic!("{k} missing or not a number in {v}"))
}

/// The server's log records (one per connection).
fn server_records(log: &std::path::Path) -> Vec<Value> {
    sidecar_log(log)
}

/// Asserts that the reply bytes the client got skipped TCP (only the
/// peer's FIN, one sequence number, went through it).
fn assert_socket_to_socket(r: &Value, what: &str) {
    assert!(
        num(r, "tcp_bytes_received") <= 1,
        "{what}: the client's socket received payload through TCP: {r}"
    );
}

/// Asserts that the reply's `bytes` went through TCP.
fn assert_through_tcp(r: &Value, bytes: u64, what: &str) {
    assert!(
        num(r, "tcp_bytes_received") >= bytes,
        "{what}: the reply did not go through TCP: {r}"
    );
}

// ---------------------------------------------------------------------------
// Correctness
// ---------------------------------------------------------------------------

/// Writes of 1 byte to 1 MiB, 8 MiB in all, echoed back: every byte in
/// order, over loopback in one pod and over the whole mesh path (app ->
/// sidecar -> other pod's sidecar -> server, three fast-path hops), IPv4
/// and IPv6; all of it socket to socket.
#[test]
fn streams_arrive_in_order_and_intact() {
    if !require_root() {
        return;
    }
    let f = fixture(true);
    let before = fast(&f.node);
    assert_eq!(before["enabled"], true, "{before}");
    for dst in [LOOPBACK, MESH_V4, MESH_V6] {
        let r = client(&f.node, &f.a, APP_UID, dst, "echo", &["--bytes", "8388608"]);
        assert_eq!(r["ok"], true, "{dst}: {r}");
        assert_socket_to_socket(&r, dst);
    }
    // The mesh connections really went through both sidecars.
    let recs = sidecar_log(&f.a_sidecar);
    for dst in [MESH_V4, MESH_V6] {
        assert!(
            recs.iter().any(|r| r["orig_dst"] == dst),
            "no capture of {dst}: {recs:?}"
        );
    }
    let served = server_records(&f.b_server);
    assert_eq!(served.len(), 2, "{served:?}");
    for s in &served {
        assert_eq!(s["bytes"], 8 * MB, "{s}");
        assert!(s["mismatch"].is_null(), "{s}");
        assert_eq!(s["end"], "eof", "{s}");
    }
    let after = fast(&f.node);
    // Loopback: 2 sockets; each mesh connection: 3 hops of 2 sockets.
    assert!(
        num(&after, "sockets_added") >= num(&before, "sockets_added") + 14,
        "{after}"
    );
    assert!(
        num(&after, "bytes_redirected") >= num(&before, "bytes_redirected") + 3 * 2 * 8 * MB,
        "{after}"
    );
    assert_eq!(num(&after, "add_failed"), 0, "{after}");
}

/// Single writes and reads of 8 MiB, 32 MiB in all, over the mesh path.
#[test]
fn messages_of_several_megabytes() {
    if !require_root() {
        return;
    }
    let f = fixture(true);
    for dst in [MESH_V4, LOOPBACK] {
        let r = client(
            &f.node,
            &f.a,
            APP_UID,
            dst,
            "echo",
            &["--bytes", "33554432", "--chunk", "8388608"],
        );
        assert_eq!(r["ok"], true, "{dst}: {r}");
        assert_socket_to_socket(&r, dst);
    }
}

/// shutdown(SHUT_WR) after the request: the server still reads every byte
/// and then EOF, and its reply comes back over the half-closed connection,
/// followed by EOF.
#[test]
fn half_close_delivers_eof_and_the_reply() {
    if !require_root() {
        return;
    }
    let f = fixture(true);
    for dst in [LOOPBACK, MESH_V4, MESH_V6] {
        for bytes in ["1", "1048576"] {
            let r = client(
                &f.node,
                &f.a,
                APP_UID,
                dst,
                "half-close",
                &["--bytes", bytes],
            );
            assert_eq!(r["ok"], true, "{dst} {bytes}: {r}");
            assert_eq!(r["server"]["end"], "eof", "{dst}: {r}");
            assert_socket_to_socket(&r, dst);
        }
    }
}

/// A connection closed mid-stream by either side ends promptly on the
/// other side (never hangs), the way it does without the fast path. The
/// one documented difference: a peer that closes with bytes unread sends a
/// FIN instead of a reset (TCP's receive queue is empty: the unread bytes
/// sat on the socket's fast-path queue), so the writer reads EOF where TCP
/// would report a reset.
#[test]
fn closing_mid_stream_never_hangs() {
    if !require_root() {
        return;
    }
    let mut outcomes = Vec::new();
    for fast_path in [false, true] {
        let f = fixture(fast_path);
        // The server closes after 64 KiB; the client writes up to 32 MiB,
        // then reads.
        let closes = client(
            &f.node,
            &f.a,
            APP_UID,
            LOOPBACK,
            "peer-closes",
            &["--bytes", "33554432"],
        );
        // The client resets the connection after 1 MiB.
        let sink_log = f
            .node
            .dir
            .join(format!("fast-server-{}-9090.log", f.a.name()));
        let aborts = client(
            &f.node,
            &f.a,
            APP_UID,
            LOOPBACK,
            "abort",
            &["--bytes", "1048576"],
        );
        wait_until(
            Duration::from_secs(15),
            "the server to see the reset",
            || {
                server_records(&sink_log)
                    .iter()
                    .any(|r| r["scenario"] == "sink")
            },
        );
        let aborted = server_records(&sink_log)
            .into_iter()
            .find(|r| r["scenario"] == "sink")
            .unwrap();
        // The same through the mesh (the sidecars turn resets into closes).
        let mesh_closes = client(
            &f.node,
            &f.a,
            APP_UID,
            MESH_V4,
            "peer-closes",
            &["--bytes", "33554432"],
        );
        client(
            &f.node,
            &f.a,
            APP_UID,
            MESH_V4,
            "abort",
            &["--bytes", "1048576"],
        );
        wait_until(
            Duration::from_secs(15),
            "the mesh server to see the end",
            || {
                server_records(&f.b_server)
                    .iter()
                    .any(|r| r["scenario"] == "sink")
            },
        );
        let mesh_aborted = server_records(&f.b_server)
            .into_iter()
            .find(|r| r["scenario"] == "sink")
            .unwrap();
        for (what, r) in [("peer-closes", &closes), ("mesh peer-closes", &mesh_closes)] {
            let ended = !r["write_error"].is_null()
                || matches!(r["end"].as_str(), Some("eof" | "reset" | "epipe"));
            assert!(ended, "fast path {fast_path}: {what} did not end: {r}");
        }
        for (what, r) in [("abort", &aborted), ("mesh abort", &mesh_aborted)] {
            assert!(
                matches!(r["end"].as_str(), Some("eof" | "reset")),
                "fast path {fast_path}: {what}: server saw {r}"
            );
            assert!(r["mismatch"].is_null(), "{what}: {r}");
            assert!(num(r, "bytes") <= MB, "{what}: {r}");
        }
        outcomes.push((closes, aborts, aborted));
    }
    let (tcp, fast) = (&outcomes[0], &outcomes[1]);
    // A reset stays a reset: the server reads what arrived, then the reset
    // (with TCP, bytes still unsent at the reset are lost; on the fast path
    // every write had already arrived when it returned).
    assert_eq!(
        fast.2["end"], tcp.2["end"],
        "abort: {} vs {}",
        fast.2, tcp.2
    );
    assert_eq!(fast.2["bytes"], MB, "abort: {}", fast.2);
    // An early close: the same end, or EOF where TCP says reset.
    let (t, f) = (&tcp.0["end"], &fast.0["end"]);
    assert!(
        t == f || (t == "reset" && f == "eof"),
        "peer-closes: without fast path {}, with {}",
        tcp.0,
        fast.0
    );
}

/// sendfile(2) from a file and splice(2) from a pipe into a fast-path
/// socket deliver identical bytes (the server checks all of them).
#[test]
fn sendfile_and_splice_senders_deliver_identical_bytes() {
    if !require_root() {
        return;
    }
    let f = fixture(true);
    for dst in [LOOPBACK, MESH_V4] {
        for scenario in ["sendfile", "splice-send"] {
            let r = client(
                &f.node,
                &f.a,
                APP_UID,
                dst,
                scenario,
                &["--bytes", "8388608"],
            );
            assert_eq!(r["ok"], true, "{scenario} to {dst}: {r}");
            assert_eq!(r["server"]["bytes"], 8 * MB, "{scenario} to {dst}: {r}");
            assert_socket_to_socket(&r, dst);
        }
    }
}

// ---------------------------------------------------------------------------
// Who joins
// ---------------------------------------------------------------------------

/// Only sockets of enrolled pods whose peer is on this node (loopback, or
/// another enrolled pod) join: a connection to an unenrolled pod, an
/// unenrolled pod's own loopback traffic, and everything while the switch
/// is off go through TCP as usual.
#[test]
fn sockets_not_both_local_and_enrolled_stay_on_tcp() {
    if !require_root() {
        return;
    }
    let mut f = fixture(true);
    let before = fast(&f.node);
    // Enrolled A (as the proxy: not captured) to unenrolled C.
    let r = client(
        &f.node,
        &f.a,
        PROXY_UID,
        OUTSIDE,
        "echo",
        &["--bytes", "1048576"],
    );
    assert_eq!(r["ok"], true, "{r}");
    assert_through_tcp(&r, MB, "A -> C");
    // C's own loopback traffic: C is in the node's cgroup, but not enrolled.
    let r = client(
        &f.node,
        &f.c,
        APP_UID,
        LOOPBACK,
        "echo",
        &["--bytes", "1048576"],
    );
    assert_eq!(r["ok"], true, "{r}");
    assert_through_tcp(&r, MB, "C's loopback");
    let after = fast(&f.node);
    assert_eq!(
        num(&after, "sockets_added"),
        num(&before, "sockets_added"),
        "sockets joined the fast path: {before} -> {after}"
    );
    assert_eq!(
        num(&after, "msgs_redirected"),
        num(&before, "msgs_redirected"),
        "{before} -> {after}"
    );

    // Switched off: the same local connection as above goes through TCP.
    f.node.stop_agent();
    start_agent(&mut f.node, false);
    let off = fast(&f.node);
    assert_eq!(off["enabled"], false, "{off}");
    let r = client(
        &f.node,
        &f.a,
        APP_UID,
        LOOPBACK,
        "echo",
        &["--bytes", "1048576"],
    );
    assert_eq!(r["ok"], true, "{r}");
    assert_through_tcp(&r, MB, "fast path off");
    assert_eq!(
        num(&fast(&f.node), "sockets_added"),
        num(&off, "sockets_added"),
        "a socket joined while the fast path was off"
    );
}

/// A connection on the fast path keeps working across agent restarts: with
/// the fast path still on (the new agent's program replaces the old one's),
/// and after a restart with it off (connections already on it stay on it
/// until they close; new ones use TCP).
#[test]
fn agent_restarts_keep_fast_path_connections_working() {
    if !require_root() {
        return;
    }
    let mut f = fixture(true);
    let go = f.node.dir.join("go-");
    let go_arg = go.to_string_lossy().into_owned();
    let mut cmd = testkit_command([
        "--uid",
        &APP_UID.to_string(),
        "fast-client",
        "--connect",
        MESH_V4,
        "--scenario",
        "rounds",
        "--rounds",
        "3",
        "--bytes",
        "262144",
        "--go-prefix",
        &go_arg,
    ]);
    cmd.env("RUST_BACKTRACE", "1");
    let mut p = spawn_in(Some(&f.a), Some(&f.node.cgroup), cmd);
    p.wait_for_output("round 1 ok", Duration::from_secs(10));

    f.node.stop_agent();
    start_agent(&mut f.node, true);
    std::fs::write(format!("{go_arg}2"), b"").unwrap();
    p.wait_for_output("round 2 ok", Duration::from_secs(10));

    f.node.stop_agent();
    start_agent(&mut f.node, false);
    std::fs::write(format!("{go_arg}3"), b"").unwrap();
    p.wait_for_output("round 3 ok", Duration::from_secs(10));
    assert!(
        p.wait_timeout(Duration::from_secs(10))
            .is_some_and(|s| s.success()),
        "{}",
        p.logs()
    );
    let out = p.stdout();
    let r: Value = serde_json::from_str(out.lines().last().unwrap_or_default())
        .unwrap_or_else(|e| panic!("{out:?}: {e}"));
    assert_eq!(r["ok"], true, "{r}");
    for round in r["rounds"].as_array().unwrap() {
        assert!(
            round["tcp_bytes_received"].as_u64().unwrap_or(u64::MAX) <= 1,
            "still socket to socket: {r}"
        );
    }
    // A new connection, with the fast path off now, uses TCP.
    let r = client(
        &f.node,
        &f.a,
        APP_UID,
        LOOPBACK,
        "echo",
        &["--bytes", "65536"],
    );
    assert_eq!(r["ok"], true, "{r}");
    assert_through_tcp(&r, 65536, "new connection, fast path off");
}

// ---------------------------------------------------------------------------
// Known limitations (kernel behaviour of sockmap redirects; documented in
// docs/operations.md). They are why the fast path is off by default; this
// test runs in CI on every kernel of the matrix (docs/kernels.md) and fails
// when one of them is gone, so the docs (and the default) can change.
// ---------------------------------------------------------------------------

/// What the fast path cannot do like TCP, on this kernel: a blocking read
/// woken without data returns `EAGAIN` (here: by a signal whose handler has
/// `SA_RESTART`, where TCP restarts the read), a receiver that reads with splice(2)
/// never sees the redirected bytes (they are not on TCP's receive queue),
/// recv(MSG_WAITALL) returns early, and a writer is not held back by a
/// receiver that stops reading (no flow control). Each is checked, and
/// every one found fixed is named.
#[test]
fn known_limitations_of_socket_redirects_still_exist() {
    if !require_root() {
        return;
    }
    let f = fixture(true);
    let mut fixed: Vec<String> = Vec::new();
    // A blocking read interrupted by a signal (SA_RESTART): TCP restarts
    // it (pod C is not enrolled), the fast path returns EAGAIN.
    let tcp = client(&f.node, &f.c, APP_UID, LOOPBACK, "blocking-signal", &[]);
    assert_eq!(tcp["first_read"], "eof", "without the fast path: {tcp}");
    let fast = client(&f.node, &f.a, APP_UID, LOOPBACK, "blocking-signal", &[]);
    if fast["first_read"] != "eagain" {
        fixed.push(format!(
            "a signal-interrupted blocking read no longer returns EAGAIN: {fast}"
        ));
    }
    let r = client(
        &f.node,
        &f.a,
        APP_UID,
        LOOPBACK,
        "splice-recv",
        &["--bytes", "65536"],
    );
    if r["server"]["bytes"] != 0 {
        fixed.push(format!("a splice(2) reader now sees the bytes: {r}"));
    }
    let r = client(
        &f.node,
        &f.a,
        APP_UID,
        LOOPBACK,
        "waitall",
        &["--bytes", "10000"],
    );
    if r["server"]["first_recv"].as_i64().unwrap_or(0) >= 10000 {
        fixed.push(format!(
            "recv(MSG_WAITALL) now waits for all the bytes: {r}"
        ));
    }
    let r = client(
        &f.node,
        &f.a,
        APP_UID,
        LOOPBACK,
        "flood",
        &["--bytes", "67108864"],
    );
    if num(&r, "taken") <= 32 * MB {
        fixed.push(format!(
            "a receiver that stops reading now holds the writer back: {r}"
        ));
    }
    assert!(
        fixed.is_empty(),
        "fast-path limitations fixed on Linux {:?} (update the list in docs/operations.md \
         and this test; the fast path may be worth turning on):\n{}",
        weir_tests::kernel_version(),
        fixed.join("\n")
    );
}
