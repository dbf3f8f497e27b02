//! `/metrics` (Prometheus), `/healthz` and `/readyz`.
//!
//! Counters live in per-CPU kernel maps; each scrape reads and sums them
//! into a fresh registry (so the exported values are the kernel's absolute
//! counts). No per-packet work happens in userspace.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use prometheus::{
    Encoder, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};

use crate::reconcile::Reconciler;

#[derive(Clone)]
struct AppState {
    rec: Arc<Mutex<Reconciler>>,
    ready: Arc<AtomicBool>,
}

/// Serves the endpoints until the process ends.
pub async fn serve(
    listener: tokio::net::TcpListener,
    rec: Arc<Mutex<Reconciler>>,
    ready: Arc<AtomicBool>,
) {
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .with_state(AppState { rec, ready });
    if let Err(e) = axum::serve(listener, app).await {
        log::error!("metrics server stopped: {e}");
    }
}

async fn readyz(State(s): State<AppState>) -> impl IntoResponse {
    if s.ready.load(Ordering::Relaxed) {
        (StatusCode::OK, "ready\n")
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: first reconcile pending\n",
        )
    }
}

async fn metrics(State(s): State<AppState>) -> impl IntoResponse {
    let rec = s.rec.clone();
    match tokio::task::spawn_blocking(move || render(&rec)).await {
        Ok(Ok(body)) => (
            StatusCode::OK,
            [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
            body,
        )
            .into_response(),
        Ok(Err(e)) => (StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")).into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")).into_response(),
    }
}

/// Renders every metric in the Prometheus text format.
pub fn render(rec: &Mutex<Reconciler>) -> prometheus::Result<String> {
    let reg = Registry::new();
    let labels = &["namespace", "pod"];
    let captured = IntCounterVec::new(
        Opts::new(
            "weir_connections_captured_total",
            "Connections redirected to the proxy.",
        ),
        &["namespace", "pod", "direction"],
    )?;
    let bypassed = IntCounterVec::new(
        Opts::new(
            "weir_connections_bypassed_total",
            "Connections of enrolled pods not captured, by the rule that decided it.",
        ),
        &["namespace", "pod", "direction", "reason"],
    )?;
    let refused = IntCounterVec::new(
        Opts::new(
            "weir_fail_closed_total",
            "Captured connections refused because the proxy was not listening.",
        ),
        &["namespace", "pod", "direction"],
    )?;
    let orig = IntCounterVec::new(
        Opts::new(
            "weir_original_dst_lookups_total",
            "SO_ORIGINAL_DST queries on sockets of enrolled pods.",
        ),
        &["namespace", "pod", "result"],
    )?;
    let bind_failed = IntCounterVec::new(
        Opts::new(
            "weir_source_bind_failed_total",
            "Redirected connections whose pod-IP source could not be bound.",
        ),
        labels,
    )?;
    let enrolled = IntGauge::new("weir_pods_enrolled", "Pods enrolled on this node.")?;
    let failed = IntGauge::new(
        "weir_pods_failed",
        "Pods the last pass could not enroll or update (netns gone, a map full, ...; the agent's log says why).",
    )?;
    let map_entries = IntGaugeVec::new(
        Opts::new("weir_map_entries", "Entries in a per-pod BPF map."),
        &["map"],
    )?;
    let map_capacity = IntGaugeVec::new(
        Opts::new(
            "weir_map_capacity",
            "Capacity (max_entries) of a per-pod BPF map.",
        ),
        &["map"],
    )?;
    let node = IntCounterVec::new(
        Opts::new("weir_node_events_total", "Node-wide datapath events."),
        &["event"],
    )?;
    let fast_on = IntGauge::new(
        "weir_fast_path_enabled",
        "1 when the socket-level fast path is on (--fast-path).",
    )?;
    let fast_bytes = IntCounter::new(
        "weir_fast_path_redirected_bytes_total",
        "Bytes moved straight from socket to socket by the fast path.",
    )?;
    let build = IntGaugeVec::new(
        Opts::new("weir_build_info", "weir build information."),
        &["version", "layout"],
    )?;
    for c in [&captured, &bypassed, &refused, &orig, &bind_failed, &node] {
        reg.register(Box::new(c.clone()))?;
    }
    reg.register(Box::new(enrolled.clone()))?;
    reg.register(Box::new(failed.clone()))?;
    reg.register(Box::new(map_entries.clone()))?;
    reg.register(Box::new(map_capacity.clone()))?;
    reg.register(Box::new(build.clone()))?;
    reg.register(Box::new(fast_on.clone()))?;
    reg.register(Box::new(fast_bytes.clone()))?;
    build
        .with_label_values(&[
            env!("CARGO_PKG_VERSION"),
            &weir_common::LAYOUT_VERSION.to_string(),
        ])
        .set(1);

    let r = rec.lock().unwrap_or_else(|p| p.into_inner());
    enrolled.set(r.pods.len() as i64);
    failed.set(r.failed_last_pass() as i64);
    for p in r.pods.values() {
        let Some(c) = r.dp.pod_counters(p.cookie) else {
            continue;
        };
        let (ns, name) = (p.spec.namespace.as_str(), p.spec.name.as_str());
        captured
            .with_label_values(&[ns, name, "outbound"])
            .inc_by(c.outbound_captured);
        captured
            .with_label_values(&[ns, name, "inbound"])
            .inc_by(c.inbound_captured);
        captured
            .with_label_values(&[ns, name, "outbound_to_inbound"])
            .inc_by(c.outbound_to_inbound);
        captured
            .with_label_values(&[ns, name, "dns"])
            .inc_by(c.dns_captured);
        captured
            .with_label_values(&[ns, name, "virtual_interface"])
            .inc_by(c.virt_captured);
        for (reason, v) in [
            ("excluded_port", c.bypass_excluded_port),
            ("inbound_passthrough", c.bypass_passthrough),
            ("loopback", c.bypass_loopback),
            ("proxy_identity", c.bypass_proxy),
            ("localhost", c.bypass_localhost),
            ("excluded_cidr", c.bypass_excluded_cidr),
            ("not_included", c.bypass_not_included),
            ("owner_group", c.bypass_owner_group),
            ("excluded_interface", c.bypass_excluded_iface),
        ] {
            bypassed
                .with_label_values(&[ns, name, "outbound", reason])
                .inc_by(v);
        }
        bypassed
            .with_label_values(&[ns, name, "inbound", "port_rule"])
            .inc_by(c.inbound_bypass);
        refused
            .with_label_values(&[ns, name, "inbound"])
            .inc_by(c.inbound_fail_closed);
        refused
            .with_label_values(&[ns, name, "outbound"])
            .inc_by(c.outbound_fail_closed);
        refused
            .with_label_values(&[ns, name, "virtual_interface"])
            .inc_by(c.virt_dropped);
        orig.with_label_values(&[ns, name, "answered"])
            .inc_by(c.orig_dst_answered);
        orig.with_label_values(&[ns, name, "missed"])
            .inc_by(c.orig_dst_missed);
        bind_failed
            .with_label_values(&[ns, name])
            .inc_by(c.source_bind_failed);
    }
    for (map, entries, capacity) in r.dp.map_usage() {
        map_entries.with_label_values(&[map]).set(entries as i64);
        map_capacity
            .with_label_values(&[map])
            .set(i64::from(capacity));
    }
    let n = r.dp.node_counters();
    fast_on.set(i64::from(r.dp.fast_path_on()));
    drop(r);
    fast_bytes.inc_by(n.fast_bytes_redirected);
    for (ev, v) in [
        ("not_enrolled_connect", n.not_enrolled),
        ("orig_dst_store_failed", n.orig_dst_store_failed),
        ("pending_insert_failed", n.pending_insert_failed),
        ("orig_dst_lost", n.orig_dst_lost),
        ("listener_recorded", n.listeners_recorded),
        ("listener_record_failed", n.listeners_record_failed),
        ("fast_socket_added", n.fast_sockets_added),
        ("fast_socket_add_failed", n.fast_add_failed),
        ("fast_msg_redirected", n.fast_msgs_redirected),
        ("fast_msg_passed", n.fast_msgs_passed),
    ] {
        node.with_label_values(&[ev]).inc_by(v);
    }
    let mut buf = Vec::new();
    TextEncoder::new().encode(&reg.gather(), &mut buf)?;
    String::from_utf8(buf).map_err(|e| prometheus::Error::Msg(e.to_string()))
}
