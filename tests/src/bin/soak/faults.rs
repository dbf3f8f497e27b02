//! Scenario 4: the pod's own processes fail, and pods change.
//!
//! 1. **Proxies and applications restarting under traffic.** Continuous
//!    outbound and inbound load (as in scenario 1) while each round
//!    SIGKILLs and restarts a sidecar (the client's and the server's in
//!    turn), an extra application that connects through it, and the
//!    server's application. While a sidecar is down its connections must
//!    be refused (fail closed) or reset (it died holding them), never
//!    escape; once it listens again they must be captured, with no agent
//!    action. Each failure is lined up with the sidecar's down window on
//!    CLOCK_MONOTONIC; a failure outside every window counts against weir.
//! 2. **A proxy that listens late.** A pod enrolled before its sidecar
//!    starts: its connections, both ways, are refused (and counted as
//!    fail-closed) until the sidecar listens, then captured.
//! 3. **A pod whose IP changes.** The pod's address moves (interface and
//!    pods file); the new address is captured, the old one is no longer
//!    claimed, and a new pod that takes the old address gets its own
//!    capture.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::time::Duration;

use anyhow::{Context, Result};
use serde_json::json;
use weir_tests::Proc;

use crate::common::{self, APP_PORT, Ctx, Load, Route, ScenarioResult, thousands};
use weir_tests::node::{Node, PodEntry};

use crate::node::{Lan, metric};
use crate::procs::{LoadEvent, LoadSummary, read_events};
use crate::proto::{Verdict, now_ms};

/// Attempts per check of parts 2 and 3.
const PROBES: &str = "40";

/// The netns cookie of pod `name` (from `weir status`).
fn cookie(node: &Node, name: &str) -> Result<u64> {
    node.try_status()?["pods"]
        .as_array()
        .and_then(|a| a.iter().find(|p| p["name"] == name))
        .and_then(|p| p["netns_cookie"].as_u64())
        .with_context(|| format!("pod {name} is not enrolled"))
}

/// Failures of `events` outside every window of `windows` (with the
/// verdicts that are never acceptable counted apart).
fn attribute(
    events: &[LoadEvent],
    windows: &[(f64, f64)],
) -> (BTreeMap<String, u64>, Vec<LoadEvent>) {
    let mut expected = BTreeMap::new();
    let mut unexpected = Vec::new();
    for e in events {
        let in_window = windows.iter().any(|(a, b)| e.t1 >= *a && e.t0 <= *b);
        let acceptable = matches!(e.verdict.as_str(), "refused" | "reset");
        if in_window && acceptable {
            *expected.entry(e.verdict.clone()).or_default() += 1;
        } else {
            unexpected.push(e.clone());
        }
    }
    (expected, unexpected)
}

fn probe(
    ctx: &Ctx,
    node: &Node,
    lan: &Lan,
    from: &str,
    to: std::net::SocketAddr,
    listener: &str,
    pod: &str,
) -> Result<LoadSummary> {
    Load::start(
        ctx,
        node,
        &lan.pod(from).ns,
        &format!("probe-{from}"),
        Route {
            target: to,
            listener,
            pod,
        },
        &["--threads", "1", "--count", PROBES, "--timeout-ms", "3000"],
    )
    .finish(Duration::from_secs(120))
}

/// Runs scenario 4 with `rounds` proxy restarts.
pub fn run(ctx: &Ctx, r: &mut ScenarioResult, rounds: usize) -> Result<()> {
    let mut lan = Lan::new(80);
    for (name, host) in [
        ("app", 2),
        ("srv", 3),
        ("ext", 4),
        ("late", 5),
        ("mover", 6),
    ] {
        lan.add(name, host)?;
    }
    let enrolled = |lan: &Lan, names: &[&str]| -> Vec<PodEntry> {
        names.iter().map(|n| lan.pod(n).spec()).collect()
    };
    let mut node = ctx.node("soakf", &["--reload-ms".into(), "50".into()], true)?;
    node.apply_pods(&enrolled(&lan, &["app", "srv", "late", "mover"]))?;

    // ---- 1. proxies and applications restarting under traffic ----------
    let mut sidecars: BTreeMap<&str, Proc> = BTreeMap::new();
    for pod in ["app", "srv"] {
        sidecars.insert(pod, common::sidecar(ctx, &node, &lan.pod(pod).ns, pod, &[]));
    }
    let _ext_server = common::direct(ctx, &node, &lan.pod("ext").ns, "ext", APP_PORT);
    let mut srv_app = common::direct(ctx, &node, &lan.pod("srv").ns, "srv-app", APP_PORT);
    let load_args = ["--threads", "2", "--pause-us", "300"];
    let (out_load, in_load) = Load::out_and_in(ctx, &node, &lan, &load_args);
    let extra_app = |node: &Node| {
        Load::start(
            ctx,
            node,
            &lan.pod("app").ns,
            "extra",
            Route {
                target: lan.pod("ext").addr(APP_PORT),
                listener: "outbound",
                pod: "app",
            },
            &["--threads", "1", "--pause-us", "300"],
        )
    };
    let mut extra = extra_app(&node);
    let mut windows: BTreeMap<&str, Vec<(f64, f64)>> = BTreeMap::new();
    let mut done = 0;
    std::thread::sleep(Duration::from_millis(300));
    for round in 0..rounds {
        if ctx.out_of_time() {
            r.complete = false;
            break;
        }
        // The applications: SIGKILL and start again.
        extra.proc.kill();
        extra = extra_app(&node);
        srv_app.kill();
        srv_app = common::direct(ctx, &node, &lan.pod("srv").ns, "srv-app", APP_PORT);
        // A sidecar, the client's and the server's in turn.
        let which = if round % 2 == 0 { "app" } else { "srv" };
        let t_kill = now_ms();
        if let Some(mut p) = sidecars.remove(which) {
            p.kill();
        }
        std::thread::sleep(Duration::from_millis(200));
        let p = common::sidecar(ctx, &node, &lan.pod(which).ns, which, &[]);
        let t_ready = now_ms();
        sidecars.insert(which, p);
        windows.entry(which).or_default().push((t_kill, t_ready));
        done += 1;
        std::thread::sleep(Duration::from_millis(300));
    }
    std::thread::sleep(Duration::from_millis(300));
    extra.proc.kill();
    let (out_ev, in_ev) = (out_load.events.clone(), in_load.events.clone());
    let out = out_load.stop()?;
    let inn = in_load.stop()?;
    let (out_expected, out_unexpected) =
        attribute(&read_events(&out_ev), windows.get("app").map_or(&[], |v| v));
    let (in_expected, in_unexpected) =
        attribute(&read_events(&in_ev), windows.get("srv").map_or(&[], |v| v));
    std::thread::sleep(Duration::from_millis(300));
    let pending_after_restarts = crate::bpf::count_entries(node.bpffs.path(), "PENDING_FLOWS")?;
    let m = node.try_metrics()?;
    let fail_closed = |pod: &str, dir: &str| {
        metric(
            &m,
            &format!(
                "weir_fail_closed_total{{direction=\"{dir}\",namespace=\"soak\",pod=\"{pod}\"}}"
            ),
        )
        .unwrap_or(0.0) as u64
    };
    let fc_app_out = fail_closed("app", "outbound");
    let fc_srv_in = fail_closed("srv", "inbound");
    let escaped = out.count(Verdict::Escaped) + inn.count(Verdict::Escaped);
    let wrong = out.count(Verdict::WrongAnswer) + inn.count(Verdict::WrongAnswer);
    let captured = out.count(Verdict::Captured) + inn.count(Verdict::Captured);
    let unexpected = out_unexpected.len() + in_unexpected.len();
    let refused_in_windows = out_expected.get("refused").copied().unwrap_or(0)
        + in_expected.get("refused").copied().unwrap_or(0);
    let reset_in_windows = out_expected.get("reset").copied().unwrap_or(0)
        + in_expected.get("reset").copied().unwrap_or(0);
    let down_ms: Vec<f64> = windows.values().flatten().map(|(a, b)| b - a).collect();
    let (down_med, _) = common::median_max(&down_ms);

    r.figure("sidecar restarts (SIGKILL, start again)", done);
    r.figure(
        "application restarts (client and server, SIGKILL)",
        done * 2,
    );
    r.figure("sidecar down window, median (ms)", format!("{down_med:.0}"));
    r.figure(
        "connections attempted",
        thousands(out.attempted + inn.attempted),
    );
    r.figure("captured correctly", thousands(captured));
    r.figure(
        "refused / reset while their sidecar was down",
        format!("{refused_in_windows} / {reset_in_windows}"),
    );
    r.figure(
        "weir_fail_closed_total app outbound / srv inbound",
        format!("{fc_app_out} / {fc_srv_in}"),
    );
    r.figure("escaped capture", escaped);
    r.figure("wrong SO_ORIGINAL_DST answer", wrong);
    r.figure("failed while the sidecar was up", unexpected);
    r.figure("PENDING_FLOWS entries afterwards", pending_after_restarts);
    r.must(
        &format!("{rounds} proxy restarts"),
        done == rounds,
        format!("{done} done"),
    );
    r.must("no connection escaped capture", escaped == 0, escaped);
    r.must("no wrong SO_ORIGINAL_DST answer", wrong == 0, wrong);
    r.must(
        "no failure while the sidecar was listening",
        unexpected == 0,
        out_unexpected
            .iter()
            .chain(in_unexpected.iter())
            .take(3)
            .map(|e| format!("{} ({})", e.verdict, e.detail))
            .collect::<Vec<_>>()
            .join("; "),
    );
    r.must(
        "connections were refused while a sidecar was down (fail closed)",
        done == 0 || refused_in_windows > 0,
        refused_in_windows,
    );
    r.must(
        "weir_fail_closed_total counted every refusal",
        fc_app_out >= out.count(Verdict::Refused) && fc_srv_in >= inn.count(Verdict::Refused),
        format!(
            "outbound {fc_app_out} (the client's {} and the restarted application's), inbound {fc_srv_in} ({})",
            out.count(Verdict::Refused),
            inn.count(Verdict::Refused)
        ),
    );
    r.must(
        "PENDING_FLOWS empty afterwards (killed applications leave nothing)",
        pending_after_restarts == 0,
        pending_after_restarts,
    );
    drop(sidecars);

    // ---- 2. a proxy that listens late ------------------------------------
    let _late_app = common::direct(ctx, &node, &lan.pod("late").ns, "late-app", APP_PORT);
    let ext_addr = lan.pod("ext").addr(APP_PORT);
    let late_addr = lan.pod("late").addr(APP_PORT);
    let out_before = probe(ctx, &node, &lan, "late", ext_addr, "outbound", "late")?;
    let in_before = probe(ctx, &node, &lan, "ext", late_addr, "inbound", "late")?;
    let m = node.try_metrics()?;
    let late_fc_out = metric(
        &m,
        "weir_fail_closed_total{direction=\"outbound\",namespace=\"soak\",pod=\"late\"}",
    )
    .unwrap_or(0.0) as u64;
    let late_fc_in = metric(
        &m,
        "weir_fail_closed_total{direction=\"inbound\",namespace=\"soak\",pod=\"late\"}",
    )
    .unwrap_or(0.0) as u64;
    let _late_sidecar = common::sidecar(ctx, &node, &lan.pod("late").ns, "late", &[]);
    let out_late = probe(ctx, &node, &lan, "late", ext_addr, "outbound", "late")?;
    let in_late = probe(ctx, &node, &lan, "ext", late_addr, "inbound", "late")?;
    let n: u64 = PROBES.parse().unwrap_or(0);
    r.figure(
        "late proxy: refused before it listened, outbound / inbound",
        format!(
            "{} / {} of {n}",
            out_before.count(Verdict::Refused),
            in_before.count(Verdict::Refused)
        ),
    );
    r.figure(
        "late proxy: weir_fail_closed_total outbound / inbound",
        format!("{late_fc_out} / {late_fc_in}"),
    );
    r.figure(
        "late proxy: captured once it listened, outbound / inbound",
        format!(
            "{} / {} of {n}",
            out_late.count(Verdict::Captured),
            in_late.count(Verdict::Captured)
        ),
    );
    r.must(
        "late proxy: every connection refused before it listened (none escaped)",
        out_before.count(Verdict::Refused) == n && in_before.count(Verdict::Refused) == n,
        format!(
            "outbound {:?}, inbound {:?}",
            out_before.verdicts, in_before.verdicts
        ),
    );
    r.must(
        "late proxy: the refusals were counted as fail-closed",
        late_fc_out >= n && late_fc_in >= n,
        format!("outbound {late_fc_out}, inbound {late_fc_in}"),
    );
    r.must(
        "late proxy: every connection captured once it listened",
        out_late.count(Verdict::Captured) == n && in_late.count(Verdict::Captured) == n,
        format!(
            "outbound {:?}, inbound {:?}",
            out_late.verdicts, in_late.verdicts
        ),
    );

    // ---- 3. a pod whose IP changes ---------------------------------------
    let _mover_sidecar = common::sidecar(ctx, &node, &lan.pod("mover").ns, "mover", &[]);
    let old_ip = lan.pod("mover").ip;
    let in_old = probe(
        ctx,
        &node,
        &lan,
        "ext",
        lan.pod("mover").addr(APP_PORT),
        "inbound",
        "mover",
    )?;
    let new_ip = lan.readdress("mover", 7)?;
    lan.pod("ext").ns.ip(&["neigh", "flush", "all"]);
    node.apply_pods(&enrolled(&lan, &["app", "srv", "late", "mover"]))?;
    let mover_cookie = cookie(&node, "mover")?;
    let addrs = crate::bpf::pod_addrs(node.bpffs.path())?;
    let old_claimed = addrs.get(&IpAddr::V4(old_ip)).copied();
    let new_owner = addrs.get(&IpAddr::V4(new_ip)).copied();
    let in_new = probe(
        ctx,
        &node,
        &lan,
        "ext",
        lan.pod("mover").addr(APP_PORT),
        "inbound",
        "mover",
    )?;
    let out_new = probe(ctx, &node, &lan, "mover", ext_addr, "outbound", "mover")?;
    let m = node.try_metrics()?;
    let bind_failed = metric(
        &m,
        "weir_source_bind_failed_total{namespace=\"soak\",pod=\"mover\"}",
    )
    .unwrap_or(0.0) as u64;
    let status_ip = node.try_status()?["pods"]
        .as_array()
        .and_then(|a| a.iter().find(|p| p["name"] == "mover").cloned())
        .map(|p| p["ip4"].as_str().unwrap_or_default().to_string())
        .unwrap_or_default();
    // A new pod takes the old address.
    lan.add("newcomer", 6)?;
    lan.pod("ext").ns.ip(&["neigh", "flush", "all"]);
    node.apply_pods(&enrolled(
        &lan,
        &["app", "srv", "late", "mover", "newcomer"],
    ))?;
    let _newcomer_sidecar = common::sidecar(ctx, &node, &lan.pod("newcomer").ns, "newcomer", &[]);
    let newcomer_cookie = cookie(&node, "newcomer")?;
    let old_owner = crate::bpf::pod_addrs(node.bpffs.path())?
        .get(&IpAddr::V4(old_ip))
        .copied();
    let in_newcomer = probe(
        ctx,
        &node,
        &lan,
        "ext",
        lan.pod("newcomer").addr(APP_PORT),
        "inbound",
        "newcomer",
    )?;
    r.figure(
        "IP change: captured at the old address before / the new one after",
        format!(
            "{} / {} of {n}",
            in_old.count(Verdict::Captured),
            in_new.count(Verdict::Captured)
        ),
    );
    r.figure(
        "IP change: outbound captured after, pod IP bound as source",
        format!(
            "{} of {n}, {bind_failed} bind failures",
            out_new.count(Verdict::Captured)
        ),
    );
    r.figure(
        "IP change: new pod on the old address captured by its own sidecar",
        format!("{} of {n}", in_newcomer.count(Verdict::Captured)),
    );
    r.must(
        "IP change: inbound captured at the old address before the change",
        in_old.count(Verdict::Captured) == n,
        format!("{:?}", in_old.verdicts),
    );
    r.must(
        "IP change: the old address is no longer claimed by the pod",
        old_claimed.is_none(),
        format!("POD_ADDRS[{old_ip}] = {old_claimed:?} (pod cookie {mover_cookie})"),
    );
    r.must(
        "IP change: the new address belongs to the pod",
        new_owner == Some(mover_cookie) && status_ip == new_ip.to_string(),
        format!("POD_ADDRS[{new_ip}] = {new_owner:?}, weir status ip4 {status_ip}"),
    );
    r.must(
        "IP change: inbound to the new address captured",
        in_new.count(Verdict::Captured) == n,
        format!("{:?}", in_new.verdicts),
    );
    r.must(
        "IP change: outbound captured with the new address as source",
        out_new.count(Verdict::Captured) == n && bind_failed == 0,
        format!("{:?}, bind failures {bind_failed}", out_new.verdicts),
    );
    r.must(
        "IP change: a new pod on the old address is captured by its own sidecar",
        in_newcomer.count(Verdict::Captured) == n && old_owner == Some(newcomer_cookie),
        format!(
            "{:?}, POD_ADDRS[{old_ip}] = {old_owner:?} (newcomer {newcomer_cookie})",
            in_newcomer.verdicts
        ),
    );

    r.data = json!({
        "restarts": {
            "rounds": done,
            "outbound": out,
            "inbound": inn,
            "expected_failures": {"outbound": out_expected, "inbound": in_expected},
            "unexpected_failures": out_unexpected.iter().chain(in_unexpected.iter()).take(50).collect::<Vec<_>>(),
            "down_windows_ms": down_ms,
            "fail_closed": {"app_outbound": fc_app_out, "srv_inbound": fc_srv_in},
            "pending_flows_after": pending_after_restarts,
        },
        "late_proxy": {
            "before": {"outbound": out_before, "inbound": in_before},
            "fail_closed": {"outbound": late_fc_out, "inbound": late_fc_in},
            "after": {"outbound": out_late, "inbound": in_late},
        },
        "ip_change": {
            "old": old_ip.to_string(),
            "new": new_ip.to_string(),
            "inbound_old_before": in_old,
            "inbound_new_after": in_new,
            "outbound_after": out_new,
            "newcomer_inbound": in_newcomer,
        },
    });
    Ok(())
}
