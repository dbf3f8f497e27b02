//! Scenario 1: the agent is SIGKILLed and restarted again and again while
//! pods open connections continuously, outbound and inbound.
//!
//! ```text
//!  pod "app" 198.18.60.2: load (uid 1000) --> ext:8080, captured to app's sidecar :15001
//!  pod "srv" 198.18.60.3: sidecar :15006; its own server on :8080 answers `direct`
//!  "ext"     198.18.60.4: not enrolled; server on :8080 answers `direct`;
//!                         load --> srv:8080, captured to srv's sidecar :15006
//! ```
//!
//! Each sidecar answers every connection itself with what `SO_ORIGINAL_DST`
//! said and the peer it saw; the client checks both against the address it
//! dialled and its own address. A connection that reaches a `direct`
//! server escaped capture. Every fourth restart, the new agent is killed
//! again during its start (before its first reconcile finished).
//!
//! Nothing but the agent changes during the scenario: both sidecars and
//! both servers run throughout, so every attempt that is not captured
//! correctly counts against weir.

use std::time::{Duration, Instant};

use anyhow::Result;
use serde_json::json;

use crate::common::{self, APP_PORT, Ctx, Load, Rng, ScenarioResult, thousands};
use crate::node::Lan;
use crate::procs::{LoadSummary, read_events};
use crate::proto::Verdict;

/// Runs scenario 1 with `restarts` SIGKILLs of a running agent.
pub fn run(ctx: &Ctx, r: &mut ScenarioResult, restarts: usize) -> Result<()> {
    let mut lan = Lan::new(60);
    lan.add("app", 2)?;
    lan.add("srv", 3)?;
    lan.add("ext", 4)?;
    let mut node = ctx.node("soakr", &[], false)?;
    node.apply_pods(&[lan.pod("app").spec(), lan.pod("srv").spec()])?;

    let _app_sidecar = common::sidecar(ctx, &node, &lan.pod("app").ns, "app", &[]);
    let _srv_sidecar = common::sidecar(ctx, &node, &lan.pod("srv").ns, "srv", &[]);
    let _ext_server = common::direct(ctx, &node, &lan.pod("ext").ns, "ext", APP_PORT);
    let _srv_server = common::direct(ctx, &node, &lan.pod("srv").ns, "srv-app", APP_PORT);

    let load_args = ["--threads", "2", "--pause-us", "300"];
    let (out_load, in_load) = Load::out_and_in(ctx, &node, &lan, &load_args);

    let mut rng = Rng::new(0x5eed_0001);
    let mut ready_ms = Vec::new();
    let mut done = 0usize;
    let mut killed_starting = 0usize;
    std::thread::sleep(Duration::from_millis(500));
    while done < restarts {
        if ctx.out_of_time() {
            r.complete = false;
            break;
        }
        std::thread::sleep(rng.pause(50, 400));
        node.kill_agent();
        done += 1;
        std::thread::sleep(rng.pause(0, 100));
        if done.is_multiple_of(4) {
            // Killed again while it loads its programs and swaps them into
            // the pinned links, before its first reconcile finished.
            node.spawn_agent();
            std::thread::sleep(rng.pause(0, 250));
            node.kill_agent();
            killed_starting += 1;
        }
        let t = Instant::now();
        node.try_start_agent()?;
        ready_ms.push(t.elapsed().as_secs_f64() * 1e3);
        if done.is_multiple_of(10) {
            eprintln!("weir-soak: restarts: {done}/{restarts}");
        }
    }
    std::thread::sleep(Duration::from_millis(500));
    let (out_events, in_events) = (out_load.events.clone(), in_load.events.clone());
    let out: LoadSummary = out_load.stop()?;
    let inn: LoadSummary = in_load.stop()?;
    let counters_app = node.try_counters("app")?;
    let counters_srv = node.try_counters("srv")?;
    std::thread::sleep(Duration::from_millis(200));
    let pending = crate::bpf::count_entries(node.bpffs.path(), "PENDING_FLOWS")?;
    let agent_errors = node.agent_log_lines(" ERROR ");

    let total = |s: &LoadSummary, v| s.count(v);
    let attempted = out.attempted + inn.attempted;
    let captured = total(&out, Verdict::Captured) + total(&inn, Verdict::Captured);
    let escaped = total(&out, Verdict::Escaped) + total(&inn, Verdict::Escaped);
    let wrong = total(&out, Verdict::WrongAnswer) + total(&inn, Verdict::WrongAnswer);
    let failed = attempted - captured - escaped - wrong;
    let (ready_med, ready_max) = common::median_max(&ready_ms);

    r.figure("agent SIGKILLs of a running agent", done);
    r.figure("of which also killed again while starting", killed_starting);
    r.figure(
        "agent start to first reconcile, median / max (ms)",
        format!("{ready_med:.0} / {ready_max:.0}"),
    );
    r.figure("connections attempted", thousands(attempted));
    r.figure(
        "  outbound (app -> ext:8080 via app's sidecar)",
        thousands(out.attempted),
    );
    r.figure(
        "  inbound (ext -> srv:8080 via srv's sidecar)",
        thousands(inn.attempted),
    );
    r.figure("captured correctly", thousands(captured));
    r.figure("escaped capture (reached ext or srv's app)", escaped);
    r.figure("wrong SO_ORIGINAL_DST answer", wrong);
    r.figure("failed (refused, reset, timed out, other)", failed);
    r.figure(
        "connection rate during the scenario (conn/s)",
        format!("{:.0}", attempted as f64 / out.elapsed_s.max(0.001)),
    );
    r.figure("PENDING_FLOWS entries left", pending);

    r.must(
        &format!("{restarts} restarts"),
        done == restarts,
        format!("{done} done"),
    );
    r.must("no connection escaped capture", escaped == 0, escaped);
    r.must("no wrong SO_ORIGINAL_DST answer", wrong == 0, wrong);
    r.must(
        "no connection failed",
        failed == 0,
        format!(
            "{failed} (outbound {:?}, inbound {:?})",
            out.verdicts, inn.verdicts
        ),
    );
    r.must(
        "traffic flowed in both directions",
        total(&out, Verdict::Captured) > 0 && total(&inn, Verdict::Captured) > 0,
        format!(
            "outbound {} inbound {}",
            total(&out, Verdict::Captured),
            total(&inn, Verdict::Captured)
        ),
    );
    r.must(
        "weir counted at least every captured connection",
        counters_app["outbound_captured"].as_u64().unwrap_or(0) >= total(&out, Verdict::Captured)
            && counters_srv["inbound_captured"].as_u64().unwrap_or(0)
                >= total(&inn, Verdict::Captured),
        format!(
            "outbound_captured {} inbound_captured {}",
            counters_app["outbound_captured"], counters_srv["inbound_captured"]
        ),
    );
    r.must("PENDING_FLOWS empty afterwards", pending == 0, pending);
    r.must(
        "no ERROR in the agents' logs",
        agent_errors.is_empty(),
        agent_errors.first().cloned().unwrap_or_default(),
    );
    let out_events = read_events(&out_events);
    let in_events = read_events(&in_events);
    r.data = json!({
        "restarts": done,
        "killed_while_starting": killed_starting,
        "agent_ready_ms": ready_ms,
        "outbound": out,
        "inbound": inn,
        "weir_counters": {"app": counters_app, "srv": counters_srv},
        "pending_flows_after": pending,
        "failures": out_events.iter().chain(in_events.iter()).take(50).collect::<Vec<_>>(),
    });
    Ok(())
}
