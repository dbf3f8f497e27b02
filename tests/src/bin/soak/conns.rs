//! Scenario 3: many captured connections at once.
//!
//! **Concurrent connections.** N connections, spread over pods (at most
//! 25,000 per pod: each pod's redirected connections all go from its one
//! address to 127.0.0.1:15001, so its ephemeral ports bound them; fewer
//! when one process may not open that many descriptors), each to
//! its own original destination, all open at the same time. Every pod's
//! sidecar answers each connection with its `SO_ORIGINAL_DST`; the
//! application checks that it is this connection's destination (never
//! another connection's, never another pod's) and that the sidecar's peer
//! is this connection's source.
//!
//! **Map full.** `PENDING_FLOWS` (an LRU hash) holds a redirected
//! connection's original destination from the application's `connect()`
//! until the proxy's side of the handshake completes. Here the proxies
//! listen with a queue of one and accept nothing, so the SYNs of M > its
//! capacity connects are dropped and retried: M handshakes are in flight
//! at once. Then the proxies accept everything, and each answer is judged:
//! the right destination, none (`ENOENT`), the proxy's own listener, or a
//! wrong one (another connection's: must never happen).

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use serde_json::{Value, json};

use crate::bpf;
use crate::clients::{FloodSummary, HoldSummary};
use crate::common::{Ctx, ScenarioResult, read_json, thousands, wait_file};
use weir_tests::node::Node;

use crate::node::{Lan, metric};
use crate::proto::Verdict;

/// At most this many held connections per pod (its ephemeral ports).
const PER_POD: u64 = 25_000;
/// At most this many flooded handshakes per pod.
const FLOOD_PER_POD: u64 = 50_000;
/// Descriptors a pod process needs besides its connections.
const FD_SLACK: u64 = 1024;

/// Connections per pod: the ports' limit, or what one process may open.
/// Runs this binary's subcommand `args` in `ns` as `uid`, with `nofile`
/// descriptors allowed (one soak process per pod and role).
fn spawn_client(
    ctx: &Ctx,
    node: &Node,
    ns: &weir_tests::NetNs,
    nofile: u64,
    uid: u32,
    args: &[&str],
) -> weir_tests::Proc {
    let mut all = vec![
        "--nofile".to_string(),
        nofile.to_string(),
        "--uid".to_string(),
        uid.to_string(),
    ];
    all.extend(args.iter().map(|a| a.to_string()));
    node.spawn(&ctx.exe, Some(ns), &all)
}

fn per_pod(ctx: &Ctx, ports_limit: u64) -> u64 {
    ports_limit.min(ctx.nofile.saturating_sub(FD_SLACK)).max(1)
}

/// Splits `n` over `pods` as evenly as possible.
fn split(n: u64, pods: u64) -> Vec<u64> {
    (0..pods)
        .map(|i| n / pods + u64::from(i < n % pods))
        .collect()
}

/// Runs the concurrent-connections half of scenario 3.
pub fn concurrent(ctx: &Ctx, r: &mut ScenarioResult, n: u64) -> Result<()> {
    let pods = n.div_ceil(per_pod(ctx, PER_POD)).max(2);
    let shares = split(n, pods);
    let mut lan = Lan::new(70);
    for i in 0..pods {
        lan.add(&format!("h{i}"), 2 + i as u8)?;
    }
    let mut node = ctx.node("soakh", &["--reload-ms".into(), "50".into()], true)?;
    node.apply_pods(&lan.pods.iter().map(|p| p.spec()).collect::<Vec<_>>())?;

    let mut sidecars = Vec::new();
    let mut clients = Vec::new();
    let mut outs = Vec::new();
    for (i, pod) in lan.pods.iter().enumerate() {
        let stats = node.dir.join(format!("{}-sidecar.stats", pod.name));
        let ready = node.dir.join(format!("{}-sidecar.ready", pod.name));
        let args = [
            "sidecar",
            "--name",
            &pod.name,
            "--hold",
            "--stats",
            &stats.display().to_string(),
            "--ready-file",
            &ready.display().to_string(),
        ];
        let mut p = spawn_client(ctx, &node, &pod.ns, shares[i] + FD_SLACK, 1337, &args);
        p.wait_for_file(&ready, Duration::from_secs(30));
        sidecars.push((p, stats));
    }
    let t0 = Instant::now();
    for (i, pod) in lan.pods.iter().enumerate() {
        let out = node.dir.join(format!("{}-hold.json", pod.name));
        let args = [
            "hold",
            "--index",
            &i.to_string(),
            "--pod",
            &pod.name,
            "--count",
            &shares[i].to_string(),
            "--threads",
            "4",
            "--out",
            &out.display().to_string(),
        ];
        clients.push(spawn_client(
            ctx,
            &node,
            &pod.ns,
            shares[i] + FD_SLACK,
            1000,
            &args,
        ));
        outs.push(out);
    }
    let mut summaries: Vec<HoldSummary> = Vec::new();
    for (out, c) in outs.iter().zip(clients.iter()) {
        if let Err(e) = wait_file(out, Duration::from_secs(900), "the hold clients") {
            anyhow::bail!("{e}\n{}", c.logs());
        }
        summaries.push(read_json(out)?);
    }
    let open_s = t0.elapsed().as_secs_f64();
    // Everything is open now: look at the kernel's side.
    let pending_open = bpf::count_entries(node.bpffs.path(), "PENDING_FLOWS")?;
    let established = count_established(&lan)?;
    // The sidecars write their counters every 200 ms.
    std::thread::sleep(Duration::from_millis(450));
    let sidecar_stats: Vec<Value> = sidecars
        .iter()
        .map(|(_, s)| read_json(s).unwrap_or(Value::Null))
        .collect();
    let status = node.try_status()?;
    let answered: u64 = status["pods"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|p| p["counters"]["orig_dst_answered"].as_u64().unwrap_or(0))
                .sum()
        })
        .unwrap_or(0);
    for c in &mut clients {
        c.signal(nix::sys::signal::Signal::SIGTERM);
    }
    for c in &mut clients {
        let _ = c.wait_timeout(Duration::from_secs(60));
    }
    drop(sidecars);
    std::thread::sleep(Duration::from_millis(500));
    let pending_after = bpf::count_entries(node.bpffs.path(), "PENDING_FLOWS")?;
    let metrics = node.try_metrics().unwrap_or_default();
    let node_events = |ev: &str| {
        metric(
            &metrics,
            &format!(
                "weir_original_dst_failures_total{{reason=\"{}\"}}",
                failure_reason(ev)
            ),
        )
        .unwrap_or(0.0) as u64
    };

    let sum = |f: &dyn Fn(&HoldSummary) -> u64| summaries.iter().map(f).sum::<u64>();
    let attempted = sum(&|s| s.attempted);
    let open = sum(&|s| s.open);
    let captured = sum(&|s| {
        s.verdicts
            .get(Verdict::Captured.name())
            .copied()
            .unwrap_or(0)
    });
    let wrong = sum(&|s| {
        s.verdicts
            .get(Verdict::WrongAnswer.name())
            .copied()
            .unwrap_or(0)
    });
    let escaped = sum(&|s| {
        s.verdicts
            .get(Verdict::Escaped.name())
            .copied()
            .unwrap_or(0)
    });
    let other_pod = sum(&|s| s.other_pod);
    let failed = attempted - captured - wrong - escaped;
    let sidecar_errno: u64 = sidecar_stats
        .iter()
        .map(|s| s["errno"].as_u64().unwrap_or(0))
        .sum();

    r.figure("connections", thousands(n));
    r.figure("pods (each with its sidecar)", pods);
    r.figure("open at the same time", thousands(open));
    r.figure(
        "  established TCP sockets in the pods (both ends)",
        thousands(established),
    );
    r.figure(
        "time to open them all (s), rate (conn/s)",
        format!("{open_s:.1}, {:.0}", attempted as f64 / open_s.max(0.001)),
    );
    r.figure(
        "answered with their own original destination",
        thousands(captured),
    );
    r.figure("wrong answer (another connection's or pod's)", wrong);
    r.figure("  of which another pod's destination", other_pod);
    r.figure("failed (no connection or no answer)", failed);
    r.figure(
        "SO_ORIGINAL_DST answered (weir counters)",
        thousands(answered),
    );
    r.figure(
        "PENDING_FLOWS entries with all open / after",
        format!("{pending_open} / {pending_after}"),
    );
    r.must(
        "every connection open at once",
        open == n && attempted == n,
        format!("{open} of {n}"),
    );
    r.must(
        "every answer is the connection's own destination and peer",
        captured == n && wrong == 0,
        format!("{captured} right, {wrong} wrong, {other_pod} another pod's"),
    );
    r.must("no connection escaped capture", escaped == 0, escaped);
    r.must(
        "no SO_ORIGINAL_DST failed at the sidecars",
        sidecar_errno == 0,
        sidecar_errno,
    );
    r.must(
        "PENDING_FLOWS empty afterwards",
        pending_after == 0,
        pending_after,
    );
    r.must(
        "no datapath error counted",
        node_events("pending_insert_failed") == 0 && node_events("orig_dst_store_failed") == 0,
        format!(
            "pending_insert_failed {}, orig_dst_store_failed {}",
            node_events("pending_insert_failed"),
            node_events("orig_dst_store_failed")
        ),
    );
    r.data = json!({
        "connections": n,
        "pods": pods,
        "open_seconds": open_s,
        "clients": summaries,
        "sidecars": sidecar_stats,
        "established_sockets": established,
        "pending_flows": {"all_open": pending_open, "after": pending_after},
        "orig_dst_answered": answered,
    });
    Ok(())
}

/// Established TCP sockets in the pods' namespaces (`/proc/net/tcp`, state
/// 01), both ends of every loopback connection.
fn count_established(lan: &Lan) -> Result<u64> {
    let mut n = 0;
    for pod in &lan.pods {
        n += pod.ns.run_in(|| -> Result<u64> {
            let text = std::fs::read_to_string("/proc/thread-self/net/tcp")
                .context("reading /proc/thread-self/net/tcp")?;
            Ok(text
                .lines()
                .skip(1)
                .filter(|l| l.split_whitespace().nth(3) == Some("01"))
                .count() as u64)
        })?;
    }
    Ok(n)
}

/// Runs the map-full half of scenario 3: `flood` handshakes in flight at
/// once (default: 1.25 times the capacity), against `PENDING_FLOWS` of
/// `max_pending` entries (default: the agent's).
pub fn map_full(
    ctx: &Ctx,
    r: &mut ScenarioResult,
    flood: Option<u64>,
    max_pending: Option<u32>,
) -> Result<()> {
    let mut extra: Vec<String> = vec!["--reload-ms".into(), "50".into()];
    if let Some(m) = max_pending {
        extra.extend(["--max-pending".into(), m.to_string()]);
    }
    let mut node = ctx.node("soakm", &extra, true)?;
    let capacity = {
        let fd = bpf::obj_get(&node.bpffs.join("weir/maps/PENDING_FLOWS"))?;
        u64::from(bpf::map_info(&fd)?.max_entries)
    };
    let m = flood.unwrap_or(capacity + capacity / 4);
    let pods = m.div_ceil(per_pod(ctx, FLOOD_PER_POD)).max(2);
    let shares = split(m, pods);
    let mut lan = Lan::new(71);
    for i in 0..pods {
        lan.add(&format!("f{i}"), 2 + i as u8)?;
    }
    node.apply_pods(&lan.pods.iter().map(|p| p.spec()).collect::<Vec<_>>())?;
    let trigger = node.dir.join("accept-now");
    let mut sidecars = Vec::new();
    for (i, pod) in lan.pods.iter().enumerate() {
        let stats = node.dir.join(format!("{}-sidecar.stats", pod.name));
        let ready = node.dir.join(format!("{}-sidecar.ready", pod.name));
        let args = [
            "sidecar",
            "--name",
            &pod.name,
            "--workers",
            "2",
            "--stall-until",
            &trigger.display().to_string(),
            "--stats",
            &stats.display().to_string(),
            "--ready-file",
            &ready.display().to_string(),
        ];
        let mut p = spawn_client(ctx, &node, &pod.ns, shares[i] + FD_SLACK, 1337, &args);
        p.wait_for_file(&ready, Duration::from_secs(30));
        sidecars.push((p, stats));
    }
    let metrics_before = node.try_metrics()?;
    let mut clients = Vec::new();
    let mut files = Vec::new();
    for (i, pod) in lan.pods.iter().enumerate() {
        let flooded = node.dir.join(format!("{}-flooded.json", pod.name));
        let out = node.dir.join(format!("{}-flood.json", pod.name));
        let args = [
            "flood",
            "--index",
            &i.to_string(),
            "--pod",
            &pod.name,
            "--count",
            &shares[i].to_string(),
            "--flooded-file",
            &flooded.display().to_string(),
            "--out",
            &out.display().to_string(),
        ];
        clients.push(spawn_client(
            ctx,
            &node,
            &pod.ns,
            shares[i] + FD_SLACK,
            1000,
            &args,
        ));
        files.push((flooded, out));
    }
    let t0 = Instant::now();
    for ((flooded, _), c) in files.iter().zip(clients.iter()) {
        if let Err(e) = wait_file(flooded, Duration::from_secs(600), "the flood") {
            anyhow::bail!("{e}\n{}", c.logs());
        }
    }
    let flood_s = t0.elapsed().as_secs_f64();
    // Every handshake is in flight now.
    let pending_full = bpf::count_entries(node.bpffs.path(), "PENDING_FLOWS")?;
    let metrics_full = node.try_metrics()?;
    crate::proto::touch(&trigger)?;
    let t1 = Instant::now();
    let mut summaries: Vec<FloodSummary> = Vec::new();
    for ((_, out), c) in files.iter().zip(clients.iter()) {
        if let Err(e) = wait_file(out, Duration::from_secs(300), "the flood's answers") {
            anyhow::bail!("{e}\n{}", c.logs());
        }
        summaries.push(read_json(out)?);
    }
    let drain_s = t1.elapsed().as_secs_f64();
    // The sidecars write their counters every 200 ms.
    std::thread::sleep(Duration::from_millis(450));
    let sidecar_stats: Vec<Value> = sidecars
        .iter()
        .map(|(_, s)| read_json(s).unwrap_or(Value::Null))
        .collect();
    drop(clients);
    std::thread::sleep(Duration::from_millis(500));
    let pending_after = bpf::count_entries(node.bpffs.path(), "PENDING_FLOWS")?;
    let metrics_after = node.try_metrics()?;
    let status = node.try_status()?;
    let answered: u64 = status["pods"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|p| p["counters"]["orig_dst_answered"].as_u64().unwrap_or(0))
                .sum()
        })
        .unwrap_or(0);
    drop(sidecars);

    let ev = |text: &str, e: &str| {
        metric(
            text,
            &format!(
                "weir_original_dst_failures_total{{reason=\"{}\"}}",
                failure_reason(e)
            ),
        )
        .unwrap_or(0.0) as u64
    };
    let insert_failed =
        ev(&metrics_after, "pending_insert_failed") - ev(&metrics_before, "pending_insert_failed");
    let insert_failed_full =
        ev(&metrics_full, "pending_insert_failed") - ev(&metrics_before, "pending_insert_failed");
    let store_failed = ev(&metrics_after, "orig_dst_store_failed");
    let lost_counted = ev(&metrics_after, "orig_dst_lost") - ev(&metrics_before, "orig_dst_lost");
    let sum = |f: &dyn Fn(&FloodSummary) -> u64| summaries.iter().map(f).sum::<u64>();
    let started_n = sum(&|s| s.started);
    let correct = sum(&|s| s.correct);
    let own = sum(&|s| s.own_listener);
    let wrong = sum(&|s| s.wrong);
    let no_answer = sum(&|s| s.no_answer.values().sum());
    let failed = sum(&|s| s.failed.values().sum());
    let unfinished = sum(&|s| s.unfinished);
    let start_errors = sum(&|s| s.start_errors.values().sum());
    let not_right = own + no_answer;

    r.figure("PENDING_FLOWS capacity", thousands(capacity));
    r.figure(
        "handshakes in flight at once (pods)",
        format!("{} ({pods})", thousands(started_n)),
    );
    r.figure("time to start them (s)", format!("{flood_s:.1}"));
    r.figure(
        "PENDING_FLOWS entries with all in flight",
        thousands(pending_full as u64),
    );
    r.figure(
        "pending_insert_failed while full / in all",
        format!("{insert_failed_full} / {insert_failed}"),
    );
    r.figure(
        "after the proxies accepted: right destination",
        thousands(correct),
    );
    r.figure(
        "  proxy got its own listener (127.0.0.1:15001)",
        thousands(own),
    );
    r.figure("  proxy got no answer (ENOENT)", thousands(no_answer));
    r.figure("  proxy got a wrong destination", wrong);
    r.figure(
        "  connection failed / unfinished",
        format!("{failed} / {unfinished}"),
    );
    r.figure("time to drain (s)", format!("{drain_s:.1}"));
    r.figure(
        "SO_ORIGINAL_DST answered (weir counters)",
        thousands(answered),
    );
    r.figure("PENDING_FLOWS entries afterwards", pending_after);

    r.must(
        "the flood exceeded the capacity",
        started_n > capacity,
        format!("{started_n} > {capacity}"),
    );
    r.must("every connect started", start_errors == 0, start_errors);
    r.must(
        "no proxy ever got another connection's destination",
        wrong == 0,
        summaries
            .iter()
            .flat_map(|s| s.wrong_examples.iter())
            .take(3)
            .cloned()
            .collect::<Vec<_>>()
            .join("; "),
    );
    r.must(
        "every connection was answered (right, or not at all)",
        failed == 0 && unfinished == 0,
        format!("{failed} failed, {unfinished} unfinished"),
    );
    // The kernel's LRU hash keeps per-CPU free lists and evicts in
    // batches of up to 128 entries, so it starts evicting a little before
    // it is full: up to 128 entries per CPU (and one batch) are slack.
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get()) as u64;
    let slack = 128 * (cpus + 1);
    r.must(
        "only handshakes beyond the capacity lost their destination",
        not_right <= started_n.saturating_sub(capacity) + slack,
        format!(
            "{not_right} lost, {} beyond the capacity (LRU slack {slack})",
            started_n.saturating_sub(capacity)
        ),
    );
    r.must(
        "the proxies got ENOENT (not their own address) when the destination was lost",
        own == 0,
        format!("{own} got 127.0.0.1:15001, {no_answer} got ENOENT"),
    );
    r.must(
        "the node counter orig_dst_lost counts every lost destination",
        lost_counted == not_right,
        format!(
            "{not_right} lost, orig_dst_lost +{lost_counted}, pending_insert_failed +{insert_failed}, orig_dst_store_failed {store_failed}"
        ),
    );
    let peer = |k: &str| sum(&|s| s.peer.get(k).copied().unwrap_or(0));
    let (peer_original, peer_proxy, peer_other) = (peer("original"), peer("proxy"), peer("other"));
    let peer_lost = ev(&metrics_after, "peer_lost") - ev(&metrics_before, "peer_lost");
    r.figure(
        "application's getpeername(): original / proxy / other",
        format!(
            "{} / {} / {peer_other}",
            thousands(peer_original),
            thousands(peer_proxy)
        ),
    );
    r.must(
        "the application's getpeername() named what it dialled, or the proxy once its entry was evicted",
        peer_other == 0,
        format!("{peer_other} named something else"),
    );
    r.must(
        "getpeername() named the proxy exactly for the connections whose destination was lost",
        peer_proxy == not_right,
        format!("{peer_proxy} named the proxy, {not_right} lost at the proxy"),
    );
    r.must(
        "the node counter peer_lost counts each of them",
        peer_lost == peer_proxy,
        format!("peer_lost +{peer_lost}, {peer_proxy} named the proxy"),
    );
    r.must(
        "PENDING_FLOWS empty afterwards",
        pending_after == 0,
        pending_after,
    );
    r.data = json!({
        "capacity": capacity,
        "flood": m,
        "pods": pods,
        "flood_seconds": flood_s,
        "drain_seconds": drain_s,
        "pending_flows": {"full": pending_full, "after": pending_after},
        "pending_insert_failed": {"while_full": insert_failed_full, "total": insert_failed},
        "orig_dst_answered": answered,
        "clients": summaries,
        "sidecars": sidecar_stats,
    });
    Ok(())
}

/// The `reason` of `weir_original_dst_failures_total` for the kernel's
/// counter names used in this file's reports.
fn failure_reason(counter: &str) -> &str {
    match counter {
        "orig_dst_store_failed" => "store_failed",
        "orig_dst_lost" => "lost",
        other => other,
    }
}
