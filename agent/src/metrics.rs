//! `/metrics` (Prometheus), `/healthz` and `/readyz`.
//!
//! Two kinds of metrics:
//!
//! - the datapath's counters, which live in per-CPU kernel maps: each
//!   scrape reads and sums them into a fresh registry (so the exported
//!   values are the kernel's absolute counts; no per-packet work happens in
//!   userspace). Every kernel counter is exported in exactly one series
//!   ([`pod_series`], [`node_series`]), and each family counts one unit
//!   ([`POD_FAMILIES`], [`NODE_FAMILIES`]), so that a sum over its labels
//!   means something;
//! - the agent's own health ([`agent`]): CNI requests, the CNI chain,
//!   reconcile passes, Kubernetes watch errors, and the process (CPU,
//!   memory, file descriptors).
//!
//! docs/operations.md lists every family with its unit (a unit test checks
//! that it does).

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, LazyLock, Mutex};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};
use weir_common::{NodeCounter, NodeCounters, PodCounter, PodCounters, outbound_bypass_reason};

use crate::cni::protocol::{Command, Response};
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

/// A counter family fed from the kernel's counters.
#[derive(Debug)]
pub struct Family {
    /// Metric name.
    pub name: &'static str,
    /// HELP text.
    pub help: &'static str,
    /// What one increment counts (docs/operations.md says the same).
    pub unit: &'static str,
    /// Labels (after `namespace` and `pod` for per-pod families).
    pub labels: &'static [&'static str],
}

/// Per-pod families (labels `namespace`, `pod`, then [`Family::labels`]).
pub const POD_FAMILIES: &[Family] = &[
    Family {
        name: "weir_connections_captured_total",
        help: "TCP connections redirected to the proxy (direction dns: TCP connections to port 53 sent to the DNS port).",
        unit: "connections",
        labels: &["direction"],
    },
    Family {
        name: "weir_connections_bypassed_total",
        help: "TCP connections of enrolled pods not captured, by the rule that decided it.",
        unit: "connections",
        labels: &["direction", "reason"],
    },
    Family {
        name: "weir_fail_closed_total",
        help: "Captured TCP connections refused because the proxy was not listening.",
        unit: "connections",
        labels: &["direction"],
    },
    Family {
        name: "weir_dns_udp_sockets_total",
        help: "UDP sockets connect()ed to port 53, by whether they were pointed at the DNS port.",
        unit: "sockets",
        labels: &["result"],
    },
    Family {
        name: "weir_dns_udp_datagrams_total",
        help: "Datagrams of unconnected UDP sockets to port 53, by whether they were sent to the DNS port.",
        unit: "datagrams",
        labels: &["result"],
    },
    Family {
        name: "weir_virtual_interface_dropped_packets_total",
        help: "Packets from reroute-virtual-interfaces dropped (no address of the family, no state for a rerouted connection, no free port).",
        unit: "packets",
        labels: &[],
    },
    Family {
        name: "weir_original_dst_lookups_total",
        help: "SO_ORIGINAL_DST queries on sockets of enrolled pods.",
        unit: "queries",
        labels: &["result"],
    },
    Family {
        name: "weir_source_bind_failed_total",
        help: "Redirected TCP connections whose pod-IP source could not be bound (they went on from loopback).",
        unit: "connections",
        labels: &[],
    },
];

/// Node-wide families.
pub const NODE_FAMILIES: &[Family] = &[
    Family {
        name: "weir_unenrolled_connections_total",
        help: "TCP connections from network namespaces that are not enrolled (not captured; normal).",
        unit: "connections",
        labels: &[],
    },
    Family {
        name: "weir_original_dst_failures_total",
        help: "Redirected connections whose original destination could not be kept (store_failed: refused; pending_insert_failed, lost: SO_ORIGINAL_DST fails; peer_lost: getpeername() named the proxy).",
        unit: "connections",
        labels: &["reason"],
    },
    Family {
        name: "weir_dns_datagram_store_failed_total",
        help: "DNS datagrams to capture whose server could not be stored on the socket (sent uncaptured).",
        unit: "datagrams",
        labels: &[],
    },
    Family {
        name: "weir_connect_handoffs_total",
        help: "Redirected TCP connects whose original destination was handed from connect() to the connection's port on another CPU (the task moved in between; answered as usual).",
        unit: "connections",
        labels: &["cpu"],
    },
    Family {
        name: "weir_proxy_listeners_total",
        help: "Proxy listening sockets seen by weir, by whether they could be recorded in LISTENERS.",
        unit: "sockets",
        labels: &["result"],
    },
    Family {
        name: "weir_fast_path_sockets_total",
        help: "Established local sockets offered to the fast path, by whether they joined it.",
        unit: "sockets",
        labels: &["result"],
    },
    Family {
        name: "weir_fast_path_messages_total",
        help: "Messages of fast-path sockets: moved socket to socket, or passed through TCP.",
        unit: "messages",
        labels: &["result"],
    },
    Family {
        name: "weir_fast_path_redirected_bytes_total",
        help: "Bytes moved straight from socket to socket by the fast path.",
        unit: "bytes",
        labels: &[],
    },
];

/// One series: family name, label values (after `namespace`/`pod` for
/// per-pod families), value.
pub type Series = (&'static str, Vec<&'static str>, u64);

/// The outbound bypass reasons of a pod's counters, as the `reason` label
/// values of `weir_connections_bypassed_total{direction="outbound"}`: the
/// one list `/metrics` and `weir status` both use (from the counters'
/// declaration, `weir_common::counters`).
pub fn outbound_bypassed(c: &PodCounters) -> Vec<(&'static str, u64)> {
    PodCounter::ALL
        .iter()
        .filter_map(|k| outbound_bypass_reason(*k).map(|r| (r, c.get(*k))))
        .collect()
}

/// Every series of one pod's counters (each counter exactly once, as
/// `weir_common::counters` declares it).
pub fn pod_series(c: &PodCounters) -> Vec<Series> {
    PodCounter::ALL
        .iter()
        .map(|k| {
            let (family, labels) = k.series();
            (family, labels.to_vec(), c.get(*k))
        })
        .collect()
}

/// Every series of the node's counters (each counter exactly once).
pub fn node_series(n: &NodeCounters) -> Vec<Series> {
    NodeCounter::ALL
        .iter()
        .map(|k| {
            let (family, labels) = k.series();
            (family, labels.to_vec(), n.get(*k))
        })
        .collect()
}

/// The label names of per-pod family `family` (after `namespace`, `pod`).
pub fn pod_label_names(family: &str) -> &'static [&'static str] {
    POD_FAMILIES
        .iter()
        .find(|f| f.name == family)
        .map_or(&[], |f| f.labels)
}

fn counter_vecs(
    reg: &Registry,
    families: &[Family],
    per_pod: bool,
) -> prometheus::Result<Vec<IntCounterVec>> {
    families
        .iter()
        .map(|f| {
            let mut labels: Vec<&str> = if per_pod {
                vec!["namespace", "pod"]
            } else {
                Vec::new()
            };
            labels.extend_from_slice(f.labels);
            let help = format!("{} Unit: {}.", f.help, f.unit);
            let v = IntCounterVec::new(Opts::new(f.name, help), &labels)?;
            reg.register(Box::new(v.clone()))?;
            Ok(v)
        })
        .collect()
}

fn family_index(families: &[Family], name: &str) -> prometheus::Result<usize> {
    families
        .iter()
        .position(|f| f.name == name)
        .ok_or_else(|| prometheus::Error::Msg(format!("{name}: not a declared family")))
}

/// Renders every metric in the Prometheus text format.
pub fn render(rec: &Mutex<Reconciler>) -> prometheus::Result<String> {
    let reg = Registry::new();
    let pod_vecs = counter_vecs(&reg, POD_FAMILIES, true)?;
    let node_vecs = counter_vecs(&reg, NODE_FAMILIES, false)?;
    let enrolled = IntGauge::new("weir_pods_enrolled", "Pods enrolled on this node.")?;
    let ambient = IntGauge::new(
        "weir_ambient_pods",
        "Enrolled pods in Istio ambient mode (captured for ztunnel; handed to it over ZDS).",
    )?;
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
    let fast_on = IntGauge::new(
        "weir_fast_path_enabled",
        "1 when the socket-level fast path is on (--fast-path).",
    )?;
    let build = IntGaugeVec::new(
        Opts::new("weir_build_info", "weir build information."),
        &["version", "layout", "commit"],
    )?;
    reg.register(Box::new(enrolled.clone()))?;
    reg.register(Box::new(ambient.clone()))?;
    reg.register(Box::new(failed.clone()))?;
    reg.register(Box::new(map_entries.clone()))?;
    reg.register(Box::new(map_capacity.clone()))?;
    reg.register(Box::new(build.clone()))?;
    reg.register(Box::new(fast_on.clone()))?;
    build
        .with_label_values(&[
            env!("CARGO_PKG_VERSION"),
            &weir_common::LAYOUT_VERSION.to_string(),
            crate::version::COMMIT,
        ])
        .set(1);

    let r = rec.lock().unwrap_or_else(|p| p.into_inner());
    enrolled.set(r.pods.len() as i64);
    ambient.set(crate::ambient::enrolled_pods(&r.pods).len() as i64);
    failed.set(r.failed_last_pass() as i64);
    for p in r.pods.values() {
        let Some(c) = r.dp.pod_counters(p.cookie) else {
            continue;
        };
        let (ns, name) = (p.spec.namespace.as_str(), p.spec.name.as_str());
        for (family, labels, v) in pod_series(&c) {
            let mut values = vec![ns, name];
            values.extend(labels);
            pod_vecs[family_index(POD_FAMILIES, family)?]
                .with_label_values(&values)
                .inc_by(v);
        }
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
    for (family, labels, v) in node_series(&n) {
        node_vecs[family_index(NODE_FAMILIES, family)?]
            .with_label_values(&labels)
            .inc_by(v);
    }
    let mut families = reg.gather();
    families.extend(agent().registry.gather());
    let mut buf = Vec::new();
    TextEncoder::new().encode(&families, &mut buf)?;
    String::from_utf8(buf).map_err(|e| prometheus::Error::Msg(e.to_string()))
}

/// The agent's own health metrics, in one process-wide registry (the
/// datapath's counters are read afresh on each scrape instead).
pub struct Agent {
    registry: Registry,
    cni_requests: IntCounterVec,
    cni_duration: HistogramVec,
    cni_chain: IntGaugeVec,
    cni_chain_files: Mutex<BTreeSet<String>>,
    reconcile_passes: IntCounterVec,
    reconcile_duration: Histogram,
    watch_errors: IntCounter,
    zds_connections: IntGauge,
    zds_workloads: IntGauge,
    zds_requests: IntCounterVec,
}

/// Buckets of the CNI request and reconcile latencies, in seconds: an
/// enrollment takes milliseconds; a pod's start waits for it.
const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

impl Agent {
    fn new() -> prometheus::Result<Self> {
        let registry = Registry::new();
        let cni_requests = IntCounterVec::new(
            Opts::new(
                "weir_cni_requests_total",
                "Requests of the weir-cni plugin, by command (add, del, check, status, invalid) and result (enrolled, skipped, ok, failed).",
            ),
            &["command", "result"],
        )?;
        let cni_duration = HistogramVec::new(
            HistogramOpts::new(
                "weir_cni_request_duration_seconds",
                "Time the agent took to answer a weir-cni request (a pod's start waits for ADD).",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
            &["command"],
        )?;
        let cni_chain = IntGaugeVec::new(
            Opts::new(
                "weir_cni_chain_installed",
                "1 when weir-cni is chained in this CNI configuration file (the last check found it there or put it there), 0 when it is not.",
            ),
            &["file"],
        )?;
        let reconcile_passes = IntCounterVec::new(
            Opts::new(
                "weir_reconcile_passes_total",
                "Reconcile passes, by result: ok (every pod applied), pods_failed (some pods could not be enrolled or updated; weir_pods_failed says how many), error (the pass could not run).",
            ),
            &["result"],
        )?;
        let reconcile_duration = Histogram::with_opts(
            HistogramOpts::new(
                "weir_reconcile_duration_seconds",
                "Duration of the reconcile passes that ran.",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
        )?;
        let watch_errors = IntCounter::new(
            "weir_kubernetes_watch_errors_total",
            "Errors of the Kubernetes pod watch (each is retried with backoff; enrolled pods stay captured).",
        )?;
        registry.register(Box::new(cni_requests.clone()))?;
        registry.register(Box::new(cni_duration.clone()))?;
        registry.register(Box::new(cni_chain.clone()))?;
        registry.register(Box::new(reconcile_passes.clone()))?;
        registry.register(Box::new(reconcile_duration.clone()))?;
        let zds_connections = IntGauge::new(
            "weir_zds_connections",
            "ztunnel connections to the ZDS socket (--zds-socket) that said hello.",
        )?;
        let zds_workloads = IntGauge::new(
            "weir_zds_workloads",
            "Ambient pods the agent hands to ztunnel (the last full list).",
        )?;
        let zds_requests = IntCounterVec::new(
            Opts::new(
                "weir_zds_requests_total",
                "ZDS requests sent to ztunnel, by kind (add, keep, del, snapshot_sent) and result (acked, refused: ztunnel answered with an error, failed: no answer, the connection was dropped).",
            ),
            &["kind", "result"],
        )?;
        registry.register(Box::new(watch_errors.clone()))?;
        registry.register(Box::new(zds_connections.clone()))?;
        registry.register(Box::new(zds_workloads.clone()))?;
        registry.register(Box::new(zds_requests.clone()))?;
        // process_cpu_seconds_total, process_resident_memory_bytes,
        // process_open_fds, ... of the agent itself.
        registry.register(Box::new(
            prometheus::process_collector::ProcessCollector::for_self(),
        ))?;
        Ok(Self {
            registry,
            cni_requests,
            cni_duration,
            cni_chain,
            cni_chain_files: Mutex::new(BTreeSet::new()),
            reconcile_passes,
            reconcile_duration,
            watch_errors,
            zds_connections,
            zds_workloads,
            zds_requests,
        })
    }

    /// Counts one weir-cni request and its latency.
    fn cni_request(&self, command: &str, result: &str, took: Duration) {
        self.cni_requests
            .with_label_values(&[command, result])
            .inc();
        self.cni_duration
            .with_label_values(&[command])
            .observe(took.as_secs_f64());
    }

    /// Counts one answered weir-cni request (`command` is `None` for a
    /// request that did not parse).
    pub fn cni_response(&self, command: Option<Command>, resp: &Response, took: Duration) {
        let command = match command {
            Some(Command::Add) => "add",
            Some(Command::Del) => "del",
            Some(Command::Check) => "check",
            Some(Command::Status) => "status",
            Some(Command::Inpod) => "inpod",
            None => "invalid",
        };
        let result = match resp {
            Response::Enrolled { .. } => "enrolled",
            Response::Skipped { .. } => "skipped",
            Response::Ok { .. } => "ok",
            Response::Failed { .. } => "failed",
        };
        self.cni_request(command, result, took);
    }

    /// Records where weir-cni is chained now: `Some(file)` after a check
    /// found (or put) it in that configuration file, `None` when it is in
    /// none (no configuration yet, or removed with `--cni-mode off`). Files
    /// seen before stay exported, at 0.
    pub fn cni_chain(&self, file: Option<&Path>) {
        let mut files = self
            .cni_chain_files
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        for f in files.iter() {
            self.cni_chain.with_label_values(&[f.as_str()]).set(0);
        }
        if let Some(f) = file {
            let f = f.display().to_string();
            self.cni_chain.with_label_values(&[f.as_str()]).set(1);
            files.insert(f);
        }
    }

    /// Counts one reconcile pass: `Some(failed pods)` for a pass that ran
    /// (with its duration), `None` for one that could not run.
    pub fn reconcile_pass(&self, failed_pods: Option<usize>, took: Duration) {
        let result = match failed_pods {
            Some(0) => "ok",
            Some(_) => "pods_failed",
            None => "error",
        };
        self.reconcile_passes.with_label_values(&[result]).inc();
        if failed_pods.is_some() {
            self.reconcile_duration.observe(took.as_secs_f64());
        }
    }

    /// Counts one error of the Kubernetes pod watch.
    pub fn watch_error(&self) {
        self.watch_errors.inc();
    }

    /// A ztunnel connection opened (`true`) or closed.
    pub fn zds_connection(&self, opened: bool) {
        if opened {
            self.zds_connections.inc();
        } else {
            self.zds_connections.dec();
        }
    }

    /// The number of ambient pods handed to ztunnel.
    pub fn zds_workloads(&self, n: usize) {
        self.zds_workloads.set(i64::try_from(n).unwrap_or(i64::MAX));
    }

    /// Counts one ZDS request by kind and result.
    pub fn zds_request(&self, kind: &str, result: &str) {
        self.zds_requests.with_label_values(&[kind, result]).inc();
    }
}

/// The agent's health metrics.
pub fn agent() -> &'static Agent {
    static AGENT: LazyLock<Agent> =
        LazyLock::new(|| Agent::new().expect("the agent's metric definitions are valid"));
    &AGENT
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Counters with field `i` set to `1 << i`: a sum of series then shows
    /// which fields it took, each bit once.
    fn tagged<T: Default + Copy, const N: usize>() -> T {
        assert_eq!(std::mem::size_of::<T>(), N * 8, "all fields are u64");
        let words: [u64; N] = std::array::from_fn(|i| 1u64 << i);
        let mut t = T::default();
        // SAFETY: T is a #[repr(C)] struct of exactly N u64 fields (checked
        // above and by weir-common's layout tests), so it has the layout
        // of [u64; N] and every bit pattern is valid.
        unsafe { std::ptr::copy_nonoverlapping(words.as_ptr().cast::<T>(), &mut t, 1) };
        t
    }

    fn each_field_once(series: &[Series], fields: usize) {
        let mut seen = 0u64;
        for (name, _, v) in series {
            assert_eq!(v.count_ones(), 1, "{name}: {v:#b} is not one counter");
            assert_eq!(seen & v, 0, "{name}: counter {v:#b} exported twice");
            seen |= v;
        }
        assert_eq!(
            seen,
            (1u64 << fields) - 1,
            "counters not exported: {:#b}",
            !seen & ((1u64 << fields) - 1)
        );
    }

    #[test]
    fn every_pod_counter_is_exported_exactly_once() {
        const N: usize = std::mem::size_of::<PodCounters>() / 8;
        let c: PodCounters = tagged::<PodCounters, N>();
        each_field_once(&pod_series(&c), N);
    }

    #[test]
    fn every_node_counter_is_exported_exactly_once() {
        const N: usize = std::mem::size_of::<NodeCounters>() / 8;
        let n: NodeCounters = tagged::<NodeCounters, N>();
        each_field_once(&node_series(&n), N);
    }

    #[test]
    fn every_outbound_bypass_reason_is_in_the_list() {
        const N: usize = std::mem::size_of::<PodCounters>() / 8;
        let c: PodCounters = tagged::<PodCounters, N>();
        let from_list: u64 = outbound_bypassed(&c).iter().map(|(_, v)| v).sum();
        let from_series: u64 = pod_series(&c)
            .iter()
            .filter(|(n, l, _)| *n == "weir_connections_bypassed_total" && l[0] == "outbound")
            .map(|(_, _, v)| v)
            .sum();
        assert_eq!(from_list, from_series);
        // excluded_interface was once left out of `weir status`.
        assert!(
            outbound_bypassed(&c)
                .iter()
                .any(|(r, v)| *r == "excluded_interface" && *v == c.bypass_excluded_iface)
        );
    }

    /// Series use declared families with the declared number of labels;
    /// every declared family is used.
    #[test]
    fn series_match_their_families() {
        const NP: usize = std::mem::size_of::<PodCounters>() / 8;
        const NN: usize = std::mem::size_of::<NodeCounters>() / 8;
        for (families, series) in [
            (POD_FAMILIES, pod_series(&tagged::<PodCounters, NP>())),
            (NODE_FAMILIES, node_series(&tagged::<NodeCounters, NN>())),
        ] {
            for (name, labels, _) in &series {
                let f = &families[family_index(families, name).unwrap()];
                assert_eq!(labels.len(), f.labels.len(), "{name}: {labels:?}");
            }
            for f in families {
                assert!(
                    series.iter().any(|(n, _, _)| *n == f.name),
                    "{} has no series",
                    f.name
                );
            }
        }
    }

    const UNITS: &[&str] = &[
        "connections",
        "sockets",
        "datagrams",
        "packets",
        "queries",
        "messages",
        "bytes",
    ];

    /// Counter names end in `_total`, units are from one short list, and
    /// a family named after a unit (`..._packets_total`) counts that unit.
    #[test]
    fn family_names_and_units() {
        for f in POD_FAMILIES.iter().chain(NODE_FAMILIES) {
            assert!(f.name.starts_with("weir") && f.name.ends_with("_total"));
            assert!(UNITS.contains(&f.unit), "{}: unit {}", f.name, f.unit);
            for u in UNITS {
                if f.name.contains(&format!("_{u}_")) {
                    assert_eq!(f.unit, *u, "{}", f.name);
                }
            }
        }
    }

    /// docs/operations.md has a row for every metric family with its unit.
    #[test]
    fn operations_doc_lists_every_family_with_its_unit() {
        let doc = include_str!("../../docs/operations.md");
        let row = |name: &str| {
            doc.lines()
                .find(|l| l.starts_with(&format!("| `{name}`")))
                .unwrap_or_else(|| panic!("docs/operations.md has no row for {name}"))
        };
        for f in POD_FAMILIES.iter().chain(NODE_FAMILIES) {
            let r = row(f.name);
            assert!(
                r.contains(&format!("| {} |", f.unit)),
                "{}: the row does not give unit {}: {r}",
                f.name,
                f.unit
            );
        }
        let agent = agent().registry.gather();
        for m in &agent {
            if m.name().starts_with("weir") {
                row(m.name());
            }
        }
        for name in [
            "weir_pods_enrolled",
            "weir_ambient_pods",
            "weir_pods_failed",
            "weir_map_entries",
            "weir_map_capacity",
            "weir_fast_path_enabled",
            "weir_build_info",
        ] {
            row(name);
        }
    }

    #[test]
    fn agent_metrics_record_what_happened() {
        let a = Agent::new().unwrap();
        let enrolled = Response::Enrolled {
            cookie: 1,
            message: String::new(),
        };
        let failed = Response::Failed {
            message: String::new(),
        };
        a.cni_response(Some(Command::Add), &enrolled, Duration::from_millis(3));
        a.cni_response(Some(Command::Add), &failed, Duration::from_millis(30));
        a.cni_response(None, &failed, Duration::from_millis(1));
        a.cni_chain(Some(Path::new("/host/etc/cni/net.d/10-flannel.conflist")));
        a.cni_chain(None);
        a.reconcile_pass(Some(0), Duration::from_millis(2));
        a.reconcile_pass(Some(2), Duration::from_millis(2));
        a.reconcile_pass(None, Duration::ZERO);
        a.watch_error();
        a.zds_connection(true);
        a.zds_connection(true);
        a.zds_connection(false);
        a.zds_workloads(3);
        a.zds_request("add", "acked");
        a.zds_request("keep", "refused");
        let mut buf = Vec::new();
        TextEncoder::new()
            .encode(&a.registry.gather(), &mut buf)
            .unwrap();
        let text = String::from_utf8(buf).unwrap();
        for line in [
            "weir_cni_requests_total{command=\"add\",result=\"enrolled\"} 1",
            "weir_cni_requests_total{command=\"add\",result=\"failed\"} 1",
            "weir_cni_requests_total{command=\"invalid\",result=\"failed\"} 1",
            "weir_cni_request_duration_seconds_count{command=\"add\"} 2",
            "weir_cni_request_duration_seconds_bucket{command=\"add\",le=\"0.005\"} 1",
            "weir_cni_chain_installed{file=\"/host/etc/cni/net.d/10-flannel.conflist\"} 0",
            "weir_reconcile_passes_total{result=\"ok\"} 1",
            "weir_reconcile_passes_total{result=\"pods_failed\"} 1",
            "weir_reconcile_passes_total{result=\"error\"} 1",
            "weir_reconcile_duration_seconds_count 2",
            "weir_kubernetes_watch_errors_total 1",
            "weir_zds_connections 1",
            "weir_zds_workloads 3",
            "weir_zds_requests_total{kind=\"add\",result=\"acked\"} 1",
            "weir_zds_requests_total{kind=\"keep\",result=\"refused\"} 1",
        ] {
            assert!(text.contains(line), "{line} not in:\n{text}");
        }
        // The process collector (Linux): memory and CPU of the agent.
        assert!(text.contains("process_resident_memory_bytes "), "{text}");
        assert!(text.contains("process_cpu_seconds_total "), "{text}");
    }
}
