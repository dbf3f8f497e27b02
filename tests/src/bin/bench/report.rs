//! The report: summaries, ratios and targets, as Markdown (`results.md`),
//! JSON (`results.json`) and the latency plot (`latency.svg`).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use anyhow::{Context, Result};
use serde_json::{Value, json};

use crate::node::Mode;
use crate::plot::{self, Curve, Panel};
use crate::run::{Measured, raw_json};
use crate::stats::{Summary, paired_ratio};

/// One row of the main table.
struct Row {
    key: &'static str,
    title: String,
    unit: &'static str,
    higher_is_better: bool,
    decimals: usize,
    runs: BTreeMap<Mode, Vec<f64>>,
}

impl Row {
    fn summary(&self, mode: Mode) -> Option<Summary> {
        self.runs.get(&mode).and_then(|r| Summary::of(r))
    }

    fn ratio(&self, a: Mode, b: Mode) -> Option<Summary> {
        paired_ratio(self.runs.get(&a)?, self.runs.get(&b)?)
    }
}

/// One figure per mode from each run of workload `key`.
fn extract(m: &Measured, key: &str, f: impl Fn(&Value) -> Option<f64>) -> BTreeMap<Mode, Vec<f64>> {
    m.raw
        .get(key)
        .map(|by| {
            by.iter()
                .map(|(mode, runs)| (*mode, runs.iter().filter_map(&f).collect()))
                .collect()
        })
        .unwrap_or_default()
}

fn rows(m: &Measured) -> Vec<Row> {
    let big = m.settings.scale_rules;
    let rate = |v: &Value| v["rate"].as_f64();
    let us = |k: &'static str| move |v: &Value| v[k].as_f64().map(|ns| ns / 1e3);
    let mut rows = vec![
        Row {
            key: "crr",
            title: "Connection rate: app → own sidecar (answers itself)".into(),
            unit: "conn/s",
            higher_is_better: true,
            decimals: 0,
            runs: extract(m, "crr", rate),
        },
        Row {
            key: "crr_cpu",
            title: "CPU time per connection: app → own sidecar".into(),
            unit: "µs",
            higher_is_better: false,
            decimals: 1,
            runs: extract(m, "crr", |v| v["cpu_us_per_conn"].as_f64()),
        },
        Row {
            key: "crr_podsrc",
            title: "Connection rate: app bound to its pod address → own sidecar".into(),
            unit: "conn/s",
            higher_is_better: true,
            decimals: 0,
            runs: extract(m, "crr_podsrc", rate),
        },
        Row {
            key: "crr_upstream",
            title: "Connection rate: app → sidecar → upstream".into(),
            unit: "conn/s",
            higher_is_better: true,
            decimals: 0,
            runs: extract(m, "crr_upstream", rate),
        },
        Row {
            key: "rr_sidecar_p50",
            title: "Latency app → sidecar, p50".into(),
            unit: "µs",
            higher_is_better: false,
            decimals: 1,
            runs: extract(m, "rr_sidecar", us("p50_ns")),
        },
        Row {
            key: "rr_sidecar_p99",
            title: "Latency app → sidecar, p99".into(),
            unit: "µs",
            higher_is_better: false,
            decimals: 1,
            runs: extract(m, "rr_sidecar", us("p99_ns")),
        },
        Row {
            key: "rr_full_p50",
            title: "Latency app → proxy → proxy → app, p50".into(),
            unit: "µs",
            higher_is_better: false,
            decimals: 1,
            runs: extract(m, "rr_full", us("p50_ns")),
        },
        Row {
            key: "rr_full_p99",
            title: "Latency app → proxy → proxy → app, p99".into(),
            unit: "µs",
            higher_is_better: false,
            decimals: 1,
            runs: extract(m, "rr_full", us("p99_ns")),
        },
        Row {
            key: "bulk",
            title: "Bulk throughput app → sidecar → upstream".into(),
            unit: "Gbit/s",
            higher_is_better: true,
            decimals: 2,
            runs: extract(m, "bulk", |v| v["gbit_s"].as_f64()),
        },
        Row {
            key: "scale_10",
            title: "Connection rate, 10 excluded CIDRs + 10 ports".into(),
            unit: "conn/s",
            higher_is_better: true,
            decimals: 0,
            runs: extract(m, "scale_10", rate),
        },
        Row {
            key: "scale_big",
            title: format!(
                "Connection rate, {} excluded CIDRs + {} ports",
                thousands(big as f64, 0),
                thousands(big as f64, 0)
            ),
            unit: "conn/s",
            higher_is_better: true,
            decimals: 0,
            runs: extract(m, "scale_big", rate),
        },
    ];
    // Rule scaling as a ratio per repetition: the two rule sets of one
    // mode ran in the same repetition.
    let small = extract(m, "scale_10", rate);
    let large = extract(m, "scale_big", rate);
    let mut ratio = BTreeMap::new();
    for mode in Mode::ALL {
        if let (Some(s), Some(l)) = (small.get(&mode), large.get(&mode)) {
            let r: Vec<f64> = l.iter().zip(s).map(|(l, s)| l / s).collect();
            ratio.insert(mode, r);
        }
    }
    rows.push(Row {
        key: "scale_ratio",
        title: format!(
            "Rule scaling: rate with {} rules ÷ rate with 10",
            thousands(big as f64, 0)
        ),
        unit: "×",
        higher_is_better: true,
        decimals: 3,
        runs: ratio,
    });
    rows.retain(|r| !r.runs.is_empty());
    rows
}

/// `v` with `decimals` decimals and `,` between thousands.
fn thousands(v: f64, decimals: usize) -> String {
    let s = format!("{:.*}", decimals, v.abs());
    let (int, frac) = s
        .split_once('.')
        .map_or((s.as_str(), None), |(i, f)| (i, Some(f)));
    let mut out = String::new();
    for (i, c) in int.chars().enumerate() {
        if i > 0 && (int.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    if let Some(f) = frac {
        out.push('.');
        out.push_str(f);
    }
    if v < 0.0 { format!("-{out}") } else { out }
}

fn cell(s: Option<&Summary>, decimals: usize, suffix: &str) -> String {
    match s {
        None => "—".into(),
        Some(s) if s.runs.len() == 1 => format!("{}{suffix}", thousands(s.median, decimals)),
        Some(s) => format!(
            "{}{suffix} ({}–{})",
            thousands(s.median, decimals),
            thousands(s.min, decimals),
            thousands(s.max, decimals)
        ),
    }
}

/// A target and what was measured against it.
struct Target {
    name: String,
    measured: String,
    /// `None`: not measured (not built yet, or the workload did not run).
    pass: Option<bool>,
    value: Option<f64>,
}

fn targets(m: &Measured, rows: &[Row]) -> Vec<Target> {
    let row = |k: &str| rows.iter().find(|r| r.key == k);
    let mut t = Vec::new();
    let crr_vs_direct = row("crr").and_then(|r| r.ratio(Mode::Weir, Mode::Direct));
    t.push(match crr_vs_direct {
        Some(r) => Target {
            name: "weir connection rate ≥ 0.97× direct (app → own sidecar)".into(),
            measured: format!("{:.3}× ({:.3}–{:.3})", r.median, r.min, r.max),
            pass: Some(r.median >= 0.97),
            value: Some(r.median),
        },
        None => not_measured("weir connection rate ≥ 0.97× direct"),
    });
    // The same with the application bound to its pod address: the direct
    // path then has the addresses REDIRECT gives a captured connection
    // (pod address -> 127.0.0.1), and with them the kernel's own costs of
    // those addresses (the proxy's answers from 127.0.0.1 to a pod address
    // get an uncached route).
    if let Some(r) = row("crr_podsrc").and_then(|r| r.ratio(Mode::Weir, Mode::Direct)) {
        t.push(Target {
            name: "(not an issue target) weir ÷ direct, both from the pod's address".into(),
            measured: format!("{:.3}× ({:.3}–{:.3})", r.median, r.min, r.max),
            pass: Some(r.median >= 0.97),
            value: Some(r.median),
        });
    }
    // Never below iptables: every connection-rate row, median of the
    // paired ratios.
    let vs_ipt: Vec<(&str, Summary)> =
        ["crr", "crr_podsrc", "crr_upstream", "scale_10", "scale_big"]
            .iter()
            .filter_map(|k| Some((*k, row(k)?.ratio(Mode::Weir, Mode::Iptables)?)))
            .collect();
    t.push(
        match vs_ipt
            .iter()
            .min_by(|a, b| a.1.median.total_cmp(&b.1.median))
        {
            Some((k, worst)) => Target {
                name: "weir connection rate never below iptables (every connection-rate row)"
                    .into(),
                measured: format!(
                    "lowest weir ÷ iptables {:.3}× ({k}); {} of {} rows ≥ 1",
                    worst.median,
                    vs_ipt.iter().filter(|(_, s)| s.median >= 1.0).count(),
                    vs_ipt.len()
                ),
                pass: Some(worst.median >= 1.0),
                value: Some(worst.median),
            },
            None => not_measured("weir connection rate never below iptables"),
        },
    );
    let scale = row("scale_ratio").and_then(|r| r.summary(Mode::Weir));
    let ipt_scale = row("scale_ratio").and_then(|r| r.summary(Mode::Iptables));
    t.push(match scale {
        Some(s) => Target {
            name: format!(
                "{} rules cost weir ≤ 5% of its connection rate at 10",
                thousands(m.settings.scale_rules as f64, 0)
            ),
            measured: format!(
                "{:+.1}% (iptables: {:+.1}%)",
                (s.median - 1.0) * 100.0,
                ipt_scale.map_or(f64::NAN, |i| (i.median - 1.0) * 100.0)
            ),
            pass: Some(s.median >= 0.95),
            value: Some(s.median),
        },
        None => not_measured("rule scaling"),
    });
    match &m.enroll {
        Some(e) => {
            t.push(Target {
                name: format!(
                    "{} pods enrolled ≤ 1 s (pods-file change → all captured, wall clock)",
                    thousands(e.pods as f64, 0)
                ),
                measured: format!(
                    "{:.0} ms (agent apply {:.0} ms)",
                    e.enroll_wall_ms.median, e.enroll_apply_ms.median
                ),
                pass: Some(e.enroll_wall_ms.median <= 1000.0),
                value: Some(e.enroll_wall_ms.median),
            });
            let mb = e.rss_kib as f64 * 1024.0 / 1e6;
            t.push(Target {
                name: format!("agent RSS ≤ 30 MB at {} pods", thousands(e.pods as f64, 0)),
                measured: format!("{mb:.1} MB"),
                pass: Some(mb <= 30.0),
                value: Some(mb),
            });
        }
        None => {
            t.push(not_measured("1,000 pods enrolled ≤ 1 s"));
            t.push(not_measured("agent RSS ≤ 30 MB"));
        }
    }
    match &m.memory {
        Some(mem) => {
            for r in mem
                .rows
                .iter()
                .filter(|r| r.pods == crate::memory::NODE_CAPACITY)
            {
                let mb = r.weir_maps_bytes as f64 / 1e6;
                t.push(Target {
                    name: format!("weir's kernel memory ≤ 8 MB at {} pods", r.pods),
                    measured: format!(
                        "{mb:.2} MB of maps (iptables' rules: {:.2} MB)",
                        r.iptables_kmem_bytes as f64 / 1e6
                    ),
                    pass: Some(mb <= 8.0),
                    value: Some(mb),
                });
            }
        }
        None => t.push(not_measured("weir's kernel memory ≤ 8 MB at 110 pods")),
    }
    let p99 = row("rr_sidecar_p99").and_then(|r| r.ratio(Mode::Weir, Mode::Iptables));
    let name = "weir (no fast path): p99 app → sidecar ≤ 0.9× iptables";
    t.push(match p99 {
        Some(s) => Target {
            name: name.into(),
            measured: format!("{:.3}× ({:.3}–{:.3})", s.median, s.min, s.max),
            pass: Some(s.median <= 0.9),
            value: Some(s.median),
        },
        None => not_measured(name),
    });
    for (key, name, limit) in [
        (
            "rr_sidecar_p99",
            "weir + fast path: p99 app → sidecar ≤ 0.8× iptables",
            0.8,
        ),
        (
            "rr_full_p99",
            "weir + fast path: full-path p99 ≤ 0.85× iptables",
            0.85,
        ),
    ] {
        let r = row(key).and_then(|r| Some((r.ratio(Mode::WeirFast, Mode::Iptables)?, r)));
        t.push(match r {
            Some((s, r)) => {
                let vs_weir = r
                    .ratio(Mode::WeirFast, Mode::Weir)
                    .map_or(String::new(), |w| {
                        format!("; ÷ weir without it {:.3}×", w.median)
                    });
                Target {
                    name: name.into(),
                    measured: format!("{:.3}× ({:.3}–{:.3}){vs_weir}", s.median, s.min, s.max),
                    pass: Some(s.median <= limit),
                    value: Some(s.median),
                }
            }
            None => not_measured(name),
        });
    }
    t
}

fn not_measured(name: &str) -> Target {
    Target {
        name: name.into(),
        measured: "not measured in this run".into(),
        pass: None,
        value: None,
    }
}

fn verdict(pass: Option<bool>) -> &'static str {
    match pass {
        Some(true) => "PASS",
        Some(false) => "MISS",
        None => "—",
    }
}

fn markdown(m: &Measured, rows: &[Row], targets: &[Target]) -> String {
    let mut s = String::new();
    let mc = &m.machine;
    let _ = writeln!(s, "### Benchmark results\n");
    let _ = writeln!(
        s,
        "Machine: {} × {} cores{}, {:.1} GiB RAM; Linux {}; {}; workspace {}, agent {} built {} \
         (release); run {}, {:.0} s.",
        mc.cpu,
        mc.cores,
        if mc.virtualized {
            " (virtual machine)"
        } else {
            ""
        },
        mc.memory_mib as f64 / 1024.0,
        mc.kernel,
        mc.iptables,
        mc.commit,
        mc.weir_bin,
        mc.weir_built,
        mc.started,
        m.duration_s
    );
    let _ = writeln!(
        s,
        "Each figure is the median of {} repetitions (min–max in brackets){}; ratios are taken \
         per repetition, the modes having run back to back, then summarized the same way.\n",
        m.settings.reps,
        if m.settings.quick { ", --quick" } else { "" }
    );
    match m.settings.pin_cpu {
        Some(cpu) => {
            let _ = writeln!(
                s,
                "Every process on the measured path (application, sidecars, server) runs pinned \
                 to CPU {cpu} at nice {}, so the figures are one core's costs, free of the \
                 cross-CPU wake-ups whose latency varies from run to run on a virtual machine; \
                 connection-rate loops use {} connection{} at a time.\n",
                m.settings.nice,
                m.settings.crr_threads,
                if m.settings.crr_threads == 1 { "" } else { "s" }
            );
        }
        None => {
            let _ = writeln!(
                s,
                "Processes run unpinned (--unpinned); connection-rate loops use {} connections \
                 at a time.\n",
                m.settings.crr_threads
            );
        }
    }
    if let Some(f) = Summary::of(&m.foreign) {
        let _ = writeln!(
            s,
            "Other processes on the machine used a median {:.1}% (max {:.1}%) of the measured \
             CPU{} during the runs; {} run{} disturbed by more than {:.0}% {} repeated ({:.0} s spent \
             waiting for quiet and repeating).\n",
            f.median * 100.0,
            f.max * 100.0,
            if m.settings.pin_cpu.is_some() {
                ""
            } else {
                "s"
            },
            m.repeated,
            if m.repeated == 1 { "" } else { "s" },
            m.settings.max_foreign * 100.0,
            if m.repeated == 1 { "was" } else { "were" },
            m.quiet_spent_s,
        );
    }
    if !rows.is_empty() {
        let _ = writeln!(
            s,
            "| figure | direct | iptables | weir | weir + fast path | iptables ÷ direct | weir ÷ direct | weir ÷ iptables | weir + fast path ÷ iptables |"
        );
        let _ = writeln!(s, "|---|---:|---:|---:|---:|---:|---:|---:|---:|");
        for r in rows {
            let suffix = if r.unit == "×" { "×" } else { "" };
            let unit = if r.unit == "×" {
                String::new()
            } else {
                format!(
                    " ({}{})",
                    r.unit,
                    if r.higher_is_better {
                        ", higher is better"
                    } else {
                        ", lower is better"
                    }
                )
            };
            let ratio = |a, b| {
                if r.unit == "×" {
                    return "—".to_owned();
                }
                cell(r.ratio(a, b).as_ref(), 3, "×")
            };
            let _ = writeln!(
                s,
                "| {}{unit} | {} | {} | {} | {} | {} | {} | {} | {} |",
                r.title,
                cell(r.summary(Mode::Direct).as_ref(), r.decimals, suffix),
                cell(r.summary(Mode::Iptables).as_ref(), r.decimals, suffix),
                cell(r.summary(Mode::Weir).as_ref(), r.decimals, suffix),
                cell(r.summary(Mode::WeirFast).as_ref(), r.decimals, suffix),
                ratio(Mode::Iptables, Mode::Direct),
                ratio(Mode::Weir, Mode::Direct),
                ratio(Mode::Weir, Mode::Iptables),
                ratio(Mode::WeirFast, Mode::Iptables),
            );
        }
        s.push('\n');
    }
    if let Some(e) = &m.enroll {
        let _ = writeln!(
            s,
            "Enrollment ({} pods, {} repetition{}; the agent watches the pods file with inotify and polls it every {} ms):\n",
            thousands(e.pods as f64, 0),
            e.enroll_wall_ms.runs.len(),
            if e.enroll_wall_ms.runs.len() == 1 {
                ""
            } else {
                "s"
            },
            e.reload_ms
        );
        let _ = writeln!(s, "| figure | value |");
        let _ = writeln!(s, "|---|---:|");
        let _ = writeln!(
            s,
            "| create {} network namespaces (container runtime's work, not weir's) | {:.2} s |",
            thousands(e.pods as f64, 0),
            e.netns_create_s
        );
        let _ = writeln!(
            s,
            "| pods-file change → all pods captured (wall clock) | {} |",
            cell(Some(&e.enroll_wall_ms), 0, " ms")
        );
        let _ = writeln!(
            s,
            "| of which the agent's apply (its log) | {} |",
            cell(Some(&e.enroll_apply_ms), 0, " ms")
        );
        let _ = writeln!(
            s,
            "| pods-file emptied → all pods removed (wall clock / apply) | {} / {} |",
            cell(Some(&e.remove_wall_ms), 0, " ms"),
            cell(Some(&e.remove_apply_ms), 0, " ms")
        );
        let _ = writeln!(
            s,
            "| agent RSS with all pods enrolled (peak RSS) | {:.1} MB ({:.1} MB) |",
            e.rss_kib as f64 * 1024.0 / 1e6,
            e.hwm_kib as f64 * 1024.0 / 1e6
        );
        let _ = writeln!(
            s,
            "| BPF maps (kernel memory, not in the RSS) | {:.1} MB |\n",
            e.bpf_map_kib as f64 * 1024.0 / 1e6
        );
    }
    if let Some(mem) = &m.memory {
        memory_table(&mut s, mem);
    }
    if let Some((costs, run)) = &m.bpf_cost {
        let total: f64 = costs.iter().map(|c| c.ns_per_conn).sum();
        let _ = writeln!(
            s,
            "weir's programs per connection of the app → own sidecar loop (one extra run with \
             the kernel's BPF run-time statistics on, {:.0} conn/s): {:.2} µs in total.\n",
            run["rate"].as_f64().unwrap_or(f64::NAN),
            total / 1e3
        );
        let _ = writeln!(
            s,
            "| program | runs per connection | ns per run | ns per connection |"
        );
        let _ = writeln!(s, "|---|---:|---:|---:|");
        for c in costs {
            let _ = writeln!(
                s,
                "| {} | {:.2} | {:.0} | {:.0} |",
                c.name, c.runs_per_conn, c.ns_per_run, c.ns_per_conn
            );
        }
        s.push('\n');
    }
    if let Some(f) = &m.fast_path {
        let g = |k: &str| f[k].as_u64().unwrap_or(0);
        let _ = writeln!(
            s,
            "Fast path (weir + fast path node, whole run): {} sockets joined it ({} could not), \
             {} messages ({:.1} MB) went socket to socket, {} messages of its sockets went \
             through TCP.\n",
            thousands(g("sockets_added") as f64, 0),
            thousands(g("add_failed") as f64, 0),
            thousands(g("msgs_redirected") as f64, 0),
            g("bytes_redirected") as f64 / 1e6,
            thousands(g("msgs_passed") as f64, 0),
        );
    }
    let _ = writeln!(s, "Targets:\n");
    let _ = writeln!(s, "| target | measured | result |");
    let _ = writeln!(s, "|---|---|---|");
    for t in targets {
        let _ = writeln!(s, "| {} | {} | {} |", t.name, t.measured, verdict(t.pass));
    }
    s.push('\n');
    if m.problems.is_empty() {
        let _ = writeln!(
            s,
            "Checks: every reply and every sidecar counter agreed with the mode (all connections \
             of the capture modes were captured, none of direct's), no connection failed."
        );
    } else {
        let _ = writeln!(s, "**Checks failed** (figures above are suspect):\n");
        for p in &m.problems {
            let _ = writeln!(s, "- {p}");
        }
    }
    s
}

fn color(mode: Mode) -> &'static str {
    match mode {
        Mode::Direct => "#555555",
        Mode::Iptables => "#d62728",
        Mode::Weir => "#1f77b4",
        Mode::WeirFast => "#2ca02c",
    }
}

/// Percentile curve points `[percentile, µs]` for the JSON.
fn curve_points(sorted: &[u32]) -> Vec<[f64; 2]> {
    [
        0.0, 10.0, 25.0, 50.0, 75.0, 90.0, 95.0, 99.0, 99.5, 99.9, 99.95, 99.99, 100.0,
    ]
    .iter()
    .map(|&p| [p, crate::stats::percentile(sorted, p) as f64 / 1e3])
    .collect()
}

/// Writes results.md, results.json and latency.svg under `out`; returns
/// the Markdown.
pub fn write(out: &Path, m: &Measured) -> Result<String> {
    let rows = rows(m);
    let targets = targets(m, &rows);
    let md = markdown(m, &rows, &targets);
    std::fs::write(out.join("results.md"), &md).context("writing results.md")?;

    let mut panels = Vec::new();
    for (key, title) in [
        ("rr_sidecar", "app → own sidecar (persistent connection)"),
        ("rr_full", "app → proxy → proxy → app (same node)"),
    ] {
        if let Some(by) = m.samples.get(key) {
            panels.push(Panel {
                title,
                curves: by
                    .iter()
                    .map(|(mode, v)| Curve {
                        label: mode.title(),
                        color: color(*mode),
                        sorted_ns: v,
                    })
                    .collect(),
            });
        }
    }
    if !panels.is_empty() {
        let svg = plot::latency_svg(
            &format!(
                "Request latency, 64-byte request/response ({}, {} cores, Linux {})",
                m.machine.cpu, m.machine.cores, m.machine.kernel
            ),
            &panels,
        );
        std::fs::write(out.join("latency.svg"), svg).context("writing latency.svg")?;
    }

    let figures: Vec<Value> = rows
        .iter()
        .map(|r| {
            let modes: BTreeMap<&str, Summary> = Mode::ALL
                .iter()
                .filter_map(|&mo| Some((mo.name(), r.summary(mo)?)))
                .collect();
            let mut ratios = serde_json::Map::new();
            if r.unit != "×" {
                for (name, a, b) in [
                    ("weir/direct", Mode::Weir, Mode::Direct),
                    ("weir/iptables", Mode::Weir, Mode::Iptables),
                    ("iptables/direct", Mode::Iptables, Mode::Direct),
                    ("weir_fast/iptables", Mode::WeirFast, Mode::Iptables),
                    ("weir_fast/weir", Mode::WeirFast, Mode::Weir),
                ] {
                    if let Some(s) = r.ratio(a, b) {
                        ratios.insert(name.into(), json!(s));
                    }
                }
            }
            json!({
                "key": r.key,
                "title": r.title,
                "unit": r.unit,
                "higher_is_better": r.higher_is_better,
                "modes": modes,
                "ratios": ratios,
            })
        })
        .collect();
    let latency: BTreeMap<&str, BTreeMap<&str, Vec<[f64; 2]>>> = m
        .samples
        .iter()
        .map(|(k, by)| {
            (
                *k,
                by.iter()
                    .map(|(mode, v)| (mode.name(), curve_points(v)))
                    .collect(),
            )
        })
        .collect();
    let doc = json!({
        "schema": 1,
        "machine": m.machine,
        "settings": m.settings,
        "duration_s": m.duration_s,
        "figures": figures,
        "enrollment": m.enroll,
        "memory": m.memory,
        "targets": targets.iter().map(|t| json!({
            "target": t.name,
            "measured": t.measured,
            "value": t.value,
            "result": verdict(t.pass),
        })).collect::<Vec<_>>(),
        "problems": m.problems,
        "foreign_cpu": Summary::of(&m.foreign),
        "repeated_runs": m.repeated,
        "fast_path": m.fast_path,
        "weir_program_cost": m.bpf_cost.as_ref().map(|(c, run)| json!({
            "per_program": c,
            "run": run,
        })),
        "latency_percentiles_us": latency,
        "raw": raw_json(m),
    });
    std::fs::write(
        out.join("results.json"),
        serde_json::to_string_pretty(&doc)? + "\n",
    )
    .context("writing results.json")?;
    Ok(md)
}

/// The kernel memory table: weir's maps and iptables' rules per node
/// size, then weir's largest maps at the node capacity.
fn memory_table(s: &mut String, mem: &crate::memory::MemoryResult) {
    let mb = |b: u64| format!("{:.2} MB", b as f64 / 1e6);
    let _ = writeln!(
        s,
        "Kernel memory (weir: `memlock` of the agent's BPF maps, and everything charged to the \
         agent's memory cgroup; iptables: what writing Istio's rules into every pod charged to \
         a memory cgroup, read from {}):\n",
        mem.kmem_source
    );
    let _ = writeln!(
        s,
        "| pods | weir --max-pods | weir maps | weir agent kernel memory | iptables rules (rules) | weir maps ÷ iptables |"
    );
    let _ = writeln!(s, "|---:|---:|---:|---:|---:|---:|");
    for r in &mem.rows {
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} ({}) | {:.2}× |",
            thousands(r.pods as f64, 0),
            thousands(r.max_pods as f64, 0),
            mb(r.weir_maps_bytes),
            mb(r.weir_kmem_bytes),
            mb(r.iptables_kmem_bytes),
            thousands(r.iptables_rules as f64, 0),
            r.weir_maps_bytes as f64 / r.iptables_kmem_bytes.max(1) as f64
        );
    }
    if let Some(b) = mem.conntrack_entry_bytes {
        let _ = writeln!(
            s,
            "\nEach connection adds one conntrack entry with iptables ({b} bytes, `nf_conntrack` \
             in /proc/slabinfo; it stays for the TIME_WAIT timeout after the close); with weir, \
             a redirected connection's entry in `PENDING_FLOWS` (preallocated, above) lives \
             until the proxy's socket closes (and is then copied onto the application's socket, \
             freed with it, only if the proxy closed first)."
        );
    }
    if let Some(r) = mem
        .rows
        .iter()
        .find(|r| r.pods == crate::memory::NODE_CAPACITY)
    {
        let mut maps: Vec<(&String, &u64)> = r.weir_maps.iter().collect();
        maps.sort_by(|a, b| b.1.cmp(a.1));
        let list: Vec<String> = maps
            .iter()
            .take(8)
            .map(|(n, b)| format!("{n} {:.0} KB", **b as f64 / 1e3))
            .collect();
        let _ = writeln!(
            s,
            "\nweir's largest maps at {} pods: {}.",
            r.pods,
            list.join(", ")
        );
    }
    s.push('\n');
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_thousands() {
        assert_eq!(thousands(1234567.4, 0), "1,234,567");
        assert_eq!(thousands(999.0, 0), "999");
        assert_eq!(thousands(1000.0, 1), "1,000.0");
        assert_eq!(thousands(0.98765, 3), "0.988");
        assert_eq!(thousands(-1234.0, 0), "-1,234");
    }

    #[test]
    fn cells_show_median_and_range() {
        let s = Summary::of(&[10.0, 12.0, 11.0]).unwrap();
        assert_eq!(cell(Some(&s), 0, ""), "11 (10–12)");
        assert_eq!(cell(None, 0, ""), "—");
        let one = Summary::of(&[0.5]).unwrap();
        assert_eq!(cell(Some(&one), 2, "×"), "0.50×");
    }
}
