//! `weir-bench run`: builds the three nodes, runs the workloads alternating
//! between them, then the enrollment benchmark, and writes the report.
//!
//! Every workload is a fixed amount of work, repeated. Within a repetition
//! the modes run back to back, in an order rotated from one repetition to
//! the next, so slow drifts of the machine hit every mode alike; ratios are
//! taken per repetition (paired) and then summarized. One untimed warm-up
//! run per mode precedes each workload.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Args;
use serde_json::{Value, json};
use weir_tests::Cgroup;

use crate::bpfstats::{self, ProgCost};
use crate::cpu::CpuMeter;
use crate::enroll::{self, EnrollResult};
use crate::machine::{self, Machine};
use crate::memory::{self, MemoryResult};
use crate::node::{Mode, Node, NodeSettings, Route};
use crate::report;

/// Set by SIGINT / SIGTERM: stop at the next run boundary and clean up.
static INTERRUPTED: AtomicBool = AtomicBool::new(false);

/// How long one load-generator run may take.
const RUN_TIMEOUT: Duration = Duration::from_secs(180);

#[derive(Args, Debug, Clone)]
pub struct RunArgs {
    /// Directory for results.md, results.json and latency.svg.
    #[arg(long, default_value = "target/bench")]
    pub out: PathBuf,
    /// Fewer repetitions and less work per run (about a minute).
    #[arg(long)]
    pub quick: bool,
    /// Repetitions of each workload [default: 9, --quick 3].
    #[arg(long)]
    pub reps: Option<usize>,
    /// Workloads to run (comma list) [default: all]: crr, crr-upstream,
    /// crr-podsrc, rr-sidecar, rr-full, bulk, scale, enroll, memory.
    #[arg(long, value_delimiter = ',')]
    pub only: Vec<String>,
    /// Modes to run the workloads in (comma list) [default: all]: direct,
    /// iptables, weir, weir_fast. One mode alone is for profiling (`perf
    /// record` sees that mode only); the ratios need the modes they compare.
    #[arg(long, value_delimiter = ',')]
    pub modes: Vec<String>,
    /// Concurrent connections of the connection-rate loops.
    #[arg(long, default_value_t = 1)]
    pub crr_threads: u64,
    /// Excluded CIDRs (and as many excluded ports) of the large rule set.
    #[arg(long, default_value_t = 5000)]
    pub scale_rules: usize,
    /// Pods of the enrollment benchmark.
    #[arg(long, default_value_t = 1000)]
    pub enroll_pods: usize,
    /// The enrollment agent's --reload-ms (pods-file poll interval; the
    /// agent's default is 500).
    #[arg(long, default_value_t = 500)]
    pub reload_ms: u64,
    /// Before each measured run, wait up to this many seconds for other
    /// processes to leave the CPUs alone (below 5% of them); only with
    /// `--nice 0` or higher.
    #[arg(long, default_value_t = 10)]
    pub quiet_wait: u64,
    /// Longest total time spent waiting for quiet and repeating disturbed
    /// runs, in seconds; past it, runs are measured as they come (and the
    /// report says how disturbed they were).
    #[arg(long, default_value_t = 180)]
    pub quiet_budget: u64,
    /// Let the workloads' processes run on any CPU (by default the latency
    /// and bulk workloads, and the connection-rate loops, run with every
    /// process of the path pinned to one CPU; see docs/benchmarks.md).
    #[arg(long)]
    pub unpinned: bool,
    /// Nice value of every process on the measured path (-20, the highest
    /// priority, by default: on a machine other work shares, they then get
    /// their CPU almost to themselves; 0 to leave them as they are).
    #[arg(long, default_value_t = -20, allow_hyphen_values = true)]
    pub nice: i32,
    /// Repeat a run (up to 3 times, keeping the least disturbed) when other
    /// processes used more than this share of the CPUs during it.
    #[arg(long, default_value_t = 0.08)]
    pub max_foreign: f64,
}

/// Settings derived from the arguments.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Settings {
    /// Repetitions per workload.
    pub reps: usize,
    /// `--quick`.
    pub quick: bool,
    /// Connections per connection-rate run.
    pub crr_conns: u64,
    /// Concurrent connections of the connection-rate loops.
    pub crr_threads: u64,
    /// `--modes` (empty: all).
    pub modes: Vec<String>,
    /// Round trips per latency run.
    pub rr_requests: usize,
    /// Bytes per bulk run.
    pub bulk_bytes: u64,
    /// Large rule count.
    pub scale_rules: usize,
    /// Enrollment pods.
    pub enroll_pods: usize,
    /// Enrollment repetitions.
    pub enroll_reps: usize,
    /// Threads per sidecar listener.
    pub sidecar_threads: usize,
    /// `--quiet-wait`, seconds.
    pub quiet_wait_s: u64,
    /// `--quiet-budget`, seconds.
    pub quiet_budget_s: u64,
    /// `--max-foreign`.
    pub max_foreign: f64,
    /// The CPU the pinned workloads run on (`None`: not pinned).
    pub pin_cpu: Option<usize>,
    /// Nice value of the measured processes.
    pub nice: i32,
}

impl Settings {
    fn from_args(a: &RunArgs) -> Settings {
        let q = a.quick;
        Settings {
            reps: a.reps.unwrap_or(if q { 3 } else { 9 }).max(1),
            quick: q,
            crr_conns: if q { 4_000 } else { 10_000 },
            crr_threads: a.crr_threads.max(1),
            modes: a.modes.clone(),
            rr_requests: if q { 5_000 } else { 20_000 },
            bulk_bytes: if q { 128 << 20 } else { 512 << 20 },
            scale_rules: a.scale_rules,
            enroll_pods: a.enroll_pods,
            enroll_reps: if q { 2 } else { 5 },
            sidecar_threads: 8,
            quiet_wait_s: a.quiet_wait,
            quiet_budget_s: a.quiet_budget,
            max_foreign: a.max_foreign,
            nice: a.nice.clamp(-20, 19),
            pin_cpu: (!a.unpinned)
                .then(|| std::thread::available_parallelism().map_or(1, |n| n.get()) - 1),
        }
    }
}

/// What a workload's load generator does.
#[derive(Clone, Copy, Debug)]
enum Kind {
    Crr,
    Rr,
    Bulk,
}

/// One workload: a load, a path, the modes it runs in.
#[derive(Clone, Debug)]
struct Workload {
    key: &'static str,
    pod: &'static str,
    route: Route,
    kind: Kind,
    modes: &'static [Mode],
    /// The application binds its pod address before connecting (so that
    /// the direct path has the addresses `REDIRECT` gives a captured one).
    bind_pod: bool,
}

const ALL_MODES: &[Mode] = &[Mode::Direct, Mode::Iptables, Mode::Weir, Mode::WeirFast];
const CAPTURE_MODES: &[Mode] = &[Mode::Iptables, Mode::Weir];
const PODSRC_MODES: &[Mode] = &[Mode::Direct, Mode::Iptables, Mode::Weir];

fn workloads() -> Vec<(&'static str, Workload)> {
    let w = |key, pod, route, kind, modes| Workload {
        key,
        pod,
        route,
        kind,
        modes,
        bind_pod: false,
    };
    vec![
        (
            "crr",
            w("crr", "a", Route::OwnSidecar, Kind::Crr, ALL_MODES),
        ),
        (
            "crr-podsrc",
            Workload {
                bind_pod: true,
                ..w(
                    "crr_podsrc",
                    "a",
                    Route::OwnSidecar,
                    Kind::Crr,
                    PODSRC_MODES,
                )
            },
        ),
        (
            "crr-upstream",
            w("crr_upstream", "a", Route::Upstream, Kind::Crr, ALL_MODES),
        ),
        (
            "rr-sidecar",
            w("rr_sidecar", "a", Route::OwnSidecar, Kind::Rr, ALL_MODES),
        ),
        (
            "rr-full",
            w("rr_full", "a", Route::FullPath, Kind::Rr, ALL_MODES),
        ),
        (
            "bulk",
            w("bulk", "a", Route::Upstream, Kind::Bulk, ALL_MODES),
        ),
        (
            "scale",
            w(
                "scale_10",
                "r10",
                Route::OwnSidecar,
                Kind::Crr,
                CAPTURE_MODES,
            ),
        ),
        (
            "scale",
            w(
                "scale_big",
                "rbig",
                Route::OwnSidecar,
                Kind::Crr,
                CAPTURE_MODES,
            ),
        ),
    ]
}

/// Everything measured, for the report.
pub struct Measured {
    /// The machine.
    pub machine: Machine,
    /// The settings.
    pub settings: Settings,
    /// Raw load-generator results: workload key -> mode -> one per rep.
    pub raw: BTreeMap<&'static str, BTreeMap<Mode, Vec<Value>>>,
    /// Pooled latency samples (ns, sorted): workload key -> mode.
    pub samples: BTreeMap<&'static str, BTreeMap<Mode, Vec<u32>>>,
    /// The enrollment benchmark, when it ran.
    pub enroll: Option<EnrollResult>,
    /// Kernel memory at 10, 110 and 1,000 pods, when it ran.
    pub memory: Option<MemoryResult>,
    /// Sidecar and server counters at the end: mode -> pod/process -> JSON.
    pub counters: BTreeMap<Mode, BTreeMap<String, Value>>,
    /// Problems found by the checks (empty when every check passed).
    pub problems: Vec<String>,
    /// Share of the CPUs other processes used during each recorded run.
    pub foreign: Vec<f64>,
    /// Runs repeated because other processes disturbed them.
    pub repeated: usize,
    /// Time spent waiting for quiet and repeating disturbed runs, seconds.
    pub quiet_spent_s: f64,
    /// weir's programs' cost per connection (one extra run with BPF
    /// statistics on), with that run's result.
    pub bpf_cost: Option<(Vec<ProgCost>, Value)>,
    /// The fast-path node's `weir status` fast-path figures at the end.
    pub fast_path: Option<Value>,
    /// Wall-clock duration of the whole run.
    pub duration_s: f64,
}

extern "C" fn on_signal(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::Relaxed);
}

fn install_signal_handlers() -> Result<()> {
    use nix::sys::signal::{SaFlags, SigAction, SigHandler, SigSet, Signal, sigaction};
    let action = SigAction::new(
        SigHandler::Handler(on_signal),
        SaFlags::SA_RESTART,
        SigSet::empty(),
    );
    for sig in [Signal::SIGINT, Signal::SIGTERM] {
        // SAFETY: the handler only stores to an atomic, which is
        // async-signal-safe.
        unsafe { sigaction(sig, &action) }.with_context(|| format!("installing {sig} handler"))?;
    }
    Ok(())
}

fn check_interrupted() -> Result<()> {
    if INTERRUPTED.load(Ordering::Relaxed) {
        bail!("interrupted; cleaning up");
    }
    Ok(())
}

/// `weir-bench run`.
pub fn run(args: RunArgs) -> Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!("weir-bench run needs root (network namespaces, cgroups, eBPF, iptables)");
    }
    install_signal_handlers()?;
    let started = Instant::now();
    let settings = Settings::from_args(&args);
    let wanted = |name: &str| args.only.is_empty() || args.only.iter().any(|o| o == name);
    for o in &args.only {
        let known = workloads().iter().any(|(n, _)| n == o) || o == "enroll" || o == "memory";
        if !known {
            bail!("--only {o}: unknown workload");
        }
    }
    for name in &args.modes {
        if !Mode::ALL.iter().any(|m| m.name() == name) {
            bail!("--modes {name}: unknown mode (direct, iptables, weir, weir_fast)");
        }
    }
    let exe = std::env::current_exe().context("finding this executable")?;
    let weir = weir_tests::weir_bin();
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let machine = machine::describe(&workspace, &weir);
    eprintln!(
        "weir-bench: {} ({} cores), kernel {}, weir {}",
        machine.cpu,
        machine.cores,
        machine.kernel,
        weir.display()
    );
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;

    let mut m = Measured {
        machine,
        settings: settings.clone(),
        raw: BTreeMap::new(),
        samples: BTreeMap::new(),
        enroll: None,
        memory: None,
        counters: BTreeMap::new(),
        problems: Vec::new(),
        foreign: Vec::new(),
        repeated: 0,
        quiet_spent_s: 0.0,
        bpf_cost: None,
        fast_path: None,
        duration_s: 0.0,
    };

    let selected: Vec<Workload> = workloads()
        .into_iter()
        .filter(|(n, _)| wanted(n))
        .map(|(_, w)| w)
        .collect();
    if !selected.is_empty() {
        run_traffic(&exe, &weir, &settings, &selected, &mut m)?;
    }
    if wanted("enroll") {
        check_interrupted()?;
        m.enroll = Some(enroll::run(
            &weir,
            settings.enroll_pods,
            settings.enroll_reps,
            args.reload_ms,
            settings.nice,
            &INTERRUPTED,
        )?);
    }
    if wanted("memory") {
        check_interrupted()?;
        m.memory = Some(memory::run(&weir, &INTERRUPTED)?);
    }
    m.duration_s = started.elapsed().as_secs_f64();
    let table = report::write(&args.out, &m)?;
    println!("\n{table}");
    eprintln!(
        "weir-bench: done in {:.0} s; wrote {}/results.md, results.json, latency.svg",
        m.duration_s,
        args.out.display()
    );
    Ok(())
}

fn run_traffic(
    exe: &Path,
    weir: &Path,
    s: &Settings,
    selected: &[Workload],
    m: &mut Measured,
) -> Result<()> {
    let top = Cgroup::new("wbench");
    let ns = NodeSettings {
        exe,
        weir,
        parent_cgroup: &top,
        scale: s.scale_rules,
        sidecar_threads: s.sidecar_threads,
    };
    let mut nodes: BTreeMap<Mode, Node> = BTreeMap::new();
    for mode in Mode::ALL {
        check_interrupted()?;
        let t = Instant::now();
        nodes.insert(mode, Node::build(mode, &ns)?);
        eprintln!(
            "weir-bench: {} node up in {:.1} s",
            mode.name(),
            t.elapsed().as_secs_f64()
        );
    }
    let meter = CpuMeter::new(top.path(), s.pin_cpu);
    let mut result = run_workloads(&nodes, s, selected, &meter, m);
    if result.is_ok()
        && let Some(w) = selected.iter().find(|w| w.key == "crr")
    {
        match bpf_cost(&nodes[&Mode::Weir], w, s) {
            Ok(c) => m.bpf_cost = Some(c),
            Err(e) => {
                eprintln!("weir-bench: measuring the programs' cost failed: {e:#}");
                result = Err(e);
            }
        }
    }
    if let Some(node) = nodes.get(&Mode::WeirFast) {
        match node.fast_path_status() {
            Ok(v) => {
                check_fast_path(&v, &mut m.problems);
                m.fast_path = Some(v);
            }
            Err(e) => m
                .problems
                .push(format!("weir_fast: reading the fast path's status: {e:#}")),
        }
    }
    for (mode, node) in &mut nodes {
        let counters = node.stop_processes();
        check_counters(*mode, &counters, &mut m.problems);
        m.counters.insert(*mode, counters);
    }
    // Nodes (and their processes, pins, namespaces) go before the cgroup.
    drop(nodes);
    drop(top);
    result
}

fn load_args(w: &Workload, node: &Node, s: &Settings, scale: u64) -> Vec<String> {
    let addr = node.target(w.route).to_string();
    let a = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
    let mut args = vec![format!("--nice={}", s.nice)];
    if let Some(cpu) = s.pin_cpu {
        args.push(format!("--cpu={cpu}"));
    }
    args.extend(match w.kind {
        Kind::Crr => a(&[
            "crr",
            "--connect",
            &addr,
            "--conns",
            &(s.crr_conns / scale).max(s.crr_threads).to_string(),
            "--threads",
            &s.crr_threads.to_string(),
        ]),
        Kind::Rr => a(&[
            "rr",
            "--connect",
            &addr,
            "--requests",
            &(s.rr_requests / scale as usize).max(1).to_string(),
            "--samples",
        ]),
        Kind::Bulk => a(&[
            "bulk",
            "--connect",
            &addr,
            "--bytes",
            &(s.bulk_bytes / scale).to_string(),
        ]),
    });
    if w.bind_pod {
        args.extend(["--bind".to_string(), node.pod(w.pod).ip.to_string()]);
    }
    args
}

/// The status byte every reply of `w` should carry in `mode`.
fn expected_status(w: &Workload, mode: Mode) -> &'static str {
    match (w.route, mode) {
        (Route::OwnSidecar, Mode::Direct) => "D",
        (Route::OwnSidecar, _) => "C",
        _ => "S",
    }
}

/// Checks one load result; returns the problem, if any.
fn check_result(w: &Workload, mode: Mode, v: &Value) -> Option<String> {
    let want = expected_status(w, mode);
    let name = format!("{} ({})", w.key, mode.name());
    match w.kind {
        Kind::Crr => {
            let ok = v["ok"].as_u64().unwrap_or(0);
            let errors = v["errors"].as_u64().unwrap_or(0);
            let key = match want {
                "C" => "captured",
                "D" => "direct",
                _ => "server",
            };
            let matching = v["status"][key].as_u64().unwrap_or(0);
            if errors > 0 {
                return Some(format!(
                    "{name}: {errors} failed connections (first: {})",
                    v["first_error"]
                ));
            }
            if matching != ok {
                return Some(format!(
                    "{name}: {matching} of {ok} replies had status {want} ({})",
                    v["status"]
                ));
            }
        }
        Kind::Rr | Kind::Bulk => {
            if v["status"] != want {
                return Some(format!(
                    "{name}: reply status {} instead of {want}",
                    v["status"]
                ));
            }
        }
    }
    None
}

/// Share of the CPUs other work may use while the runner waits before a run.
const QUIET: f64 = 0.05;
/// Attempts at a run disturbed by other work.
const ATTEMPTS: usize = 3;

/// One recorded run: waits for a quiet machine, runs, and repeats the run
/// when other work took more than `max_foreign` of the CPUs meanwhile
/// (keeping the least disturbed attempt). Adds `foreign_cpu` to the result.
fn measured_run(
    node: &Node,
    w: &Workload,
    s: &Settings,
    meter: &CpuMeter,
    m: &mut Measured,
) -> Result<Value> {
    let mut best: Option<(f64, Value)> = None;
    for attempt in 0..ATTEMPTS {
        check_interrupted()?;
        // With raised priority other work yields the CPU as soon as a run
        // starts, so only its share *during* the run matters; waiting for
        // it to go away first would wait for nothing (it takes the idle
        // CPU between runs).
        if s.nice >= 0 {
            let budget = (s.quiet_budget_s as f64 - m.quiet_spent_s).max(0.0);
            let wait = Duration::from_secs_f64(budget.min(s.quiet_wait_s as f64));
            m.quiet_spent_s += meter.wait_quiet(QUIET, wait).as_secs_f64();
        }
        let a = meter.snap();
        let v = node.run_load(w.pod, &load_args(w, node, s, 1), RUN_TIMEOUT)?;
        let b = meter.snap();
        let foreign = meter.foreign(&a, &b);
        let mut v = v;
        if let Some(ok) = v["ok"].as_u64().filter(|ok| *ok > 0) {
            // Connection-rate runs: CPU time per connection, all of it.
            v["cpu_us_per_conn"] = json!(meter.ours_us(&a, &b) / ok as f64);
        }
        let took = b.elapsed_since(&a).as_secs_f64();
        if best.as_ref().is_none_or(|(f, _)| foreign < *f) {
            best = Some((foreign, v));
        }
        if foreign <= s.max_foreign
            || attempt + 1 == ATTEMPTS
            || m.quiet_spent_s >= s.quiet_budget_s as f64
        {
            break;
        }
        m.repeated += 1;
        m.quiet_spent_s += took;
        eprintln!(
            "weir-bench: other processes used {:.0}% of the CPUs during a {} run of {}; \
             repeating it",
            foreign * 100.0,
            node.mode.name(),
            w.key
        );
    }
    let (foreign, mut v) = best.expect("at least one attempt");
    m.foreign.push(foreign);
    v["foreign_cpu"] = json!(foreign);
    Ok(v)
}

fn run_workloads(
    nodes: &BTreeMap<Mode, Node>,
    s: &Settings,
    selected: &[Workload],
    meter: &CpuMeter,
    m: &mut Measured,
) -> Result<()> {
    for node in nodes.values() {
        node.pin(s.pin_cpu, s.nice)?;
    }
    for w in selected {
        let modes: Vec<Mode> = w
            .modes
            .iter()
            .copied()
            .filter(|m| s.modes.is_empty() || s.modes.iter().any(|n| n == m.name()))
            .collect();
        // Warm-up: a fifth of the work, not recorded.
        for &mode in &modes {
            check_interrupted()?;
            let node = &nodes[&mode];
            node.run_load(w.pod, &load_args(w, node, s, 5), RUN_TIMEOUT)?;
        }
        for rep in 0..s.reps {
            let mut line = format!("weir-bench: {:<12} {}/{}:", w.key, rep + 1, s.reps);
            for i in 0..modes.len() {
                check_interrupted()?;
                let mode = modes[(i + rep) % modes.len()];
                let node = &nodes[&mode];
                let mut v = measured_run(node, w, s, meter, m)?;
                if let Some(p) = check_result(w, mode, &v) {
                    eprintln!("weir-bench: CHECK FAILED: {p}");
                    m.problems.push(p);
                }
                if let Some(samples) = v.get_mut("samples_ns").map(Value::take) {
                    let pooled = m.samples.entry(w.key).or_default().entry(mode).or_default();
                    pooled.extend(
                        samples
                            .as_array()
                            .into_iter()
                            .flatten()
                            .filter_map(|x| x.as_u64())
                            .map(|x| x as u32),
                    );
                    if let Some(o) = v.as_object_mut() {
                        o.remove("samples_ns");
                    }
                }
                line.push_str(&format!("  {} {}", mode.name(), headline(w.kind, &v)));
                m.raw
                    .entry(w.key)
                    .or_default()
                    .entry(mode)
                    .or_default()
                    .push(v);
            }
            eprintln!("{line}");
        }
    }
    for pooled in m.samples.values_mut().flat_map(|by| by.values_mut()) {
        pooled.sort_unstable();
    }
    Ok(())
}

fn headline(kind: Kind, v: &Value) -> String {
    let f = |k: &str| v[k].as_f64().unwrap_or(f64::NAN);
    match kind {
        Kind::Crr => format!("{:.0}/s", f("rate")),
        Kind::Rr => format!(
            "p50 {:.1}µs p99 {:.1}µs",
            f("p50_ns") / 1e3,
            f("p99_ns") / 1e3
        ),
        Kind::Bulk => format!("{:.2} Gbit/s", f("gbit_s")),
    }
}

/// One extra connection-rate run in weir mode with BPF run-time statistics
/// on: what each of weir's programs costs per connection.
fn bpf_cost(node: &Node, w: &Workload, s: &Settings) -> Result<(Vec<ProgCost>, Value)> {
    let bpffs = node.bpffs_path().context("the weir node has no bpffs")?;
    let progs = bpfstats::weir_programs(bpffs)?;
    let stats = bpfstats::enable()?;
    let before = bpfstats::snapshot(&progs)?;
    let v = node.run_load(w.pod, &load_args(w, node, s, 1), RUN_TIMEOUT)?;
    let after = bpfstats::snapshot(&progs)?;
    drop(stats);
    let conns = v["ok"].as_u64().unwrap_or(0);
    let costs = bpfstats::costs(&progs, &before, &after, conns);
    let total: f64 = costs.iter().map(|c| c.ns_per_conn).sum();
    eprintln!(
        "weir-bench: weir's programs: {:.0} ns per connection in total ({})",
        total,
        costs
            .iter()
            .map(|c| format!("{} {:.0}", c.name, c.ns_per_conn))
            .collect::<Vec<_>>()
            .join(", ")
    );
    Ok((costs, v))
}

/// Checks that the fast-path node really moved bytes socket to socket
/// (the report shows how many messages still went through TCP).
fn check_fast_path(v: &Value, problems: &mut Vec<String>) {
    if v["enabled"] != true {
        problems.push(format!("weir_fast: the fast path is not on ({v})"));
    }
    if v["msgs_redirected"].as_u64().unwrap_or(0) == 0 {
        problems.push(format!("weir_fast: no message went socket to socket ({v})"));
    }
    if v["add_failed"].as_u64().unwrap_or(0) > 0 {
        problems.push(format!(
            "weir_fast: sockets could not join the fast path ({v})"
        ));
    }
}

/// Checks the sidecars' own counters: in the capture modes every accepted
/// connection must have had an original destination; in direct mode none.
fn check_counters(mode: Mode, counters: &BTreeMap<String, Value>, problems: &mut Vec<String>) {
    let mut sum = BTreeMap::<&str, u64>::new();
    for (name, c) in counters {
        if c.is_null() {
            problems.push(format!(
                "{}: {name} did not report its counters",
                mode.name()
            ));
            continue;
        }
        if !name.ends_with("/sidecar") {
            continue;
        }
        for key in [
            "accepted",
            "orig_dst",
            "fallback",
            "upstream_errors",
            "loops",
        ] {
            *sum.entry(key).or_default() += c[key].as_u64().unwrap_or(0);
        }
    }
    let g = |k: &str| sum.get(k).copied().unwrap_or(0);
    if mode.captures() && g("fallback") > 0 {
        problems.push(format!(
            "{}: {} sidecar connections had no original destination (not captured)",
            mode.name(),
            g("fallback")
        ));
    }
    if !mode.captures() && g("orig_dst") > 0 {
        problems.push(format!(
            "direct: {} sidecar connections had an original destination",
            g("orig_dst")
        ));
    }
    for k in ["upstream_errors", "loops"] {
        if g(k) > 0 {
            problems.push(format!("{}: sidecar {k} = {}", mode.name(), g(k)));
        }
    }
}

/// The JSON form of the settings and raw results (the report adds the
/// summaries).
pub fn raw_json(m: &Measured) -> Value {
    let raw: BTreeMap<&str, BTreeMap<&str, &Vec<Value>>> = m
        .raw
        .iter()
        .map(|(k, by)| (*k, by.iter().map(|(mode, v)| (mode.name(), v)).collect()))
        .collect();
    let counters: BTreeMap<&str, &BTreeMap<String, Value>> =
        m.counters.iter().map(|(k, v)| (k.name(), v)).collect();
    json!({ "runs": raw, "counters": counters })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn workload_names_are_unique_per_key() {
        let keys: std::collections::BTreeSet<_> = workloads().iter().map(|(_, w)| w.key).collect();
        assert_eq!(keys.len(), workloads().len());
    }

    #[test]
    fn crr_results_are_checked_for_capture() {
        let w = &workloads()[0].1;
        let good =
            json!({"ok": 10, "errors": 0, "status": {"captured": 10, "direct": 0, "server": 0}});
        assert!(check_result(w, Mode::Weir, &good).is_none());
        assert!(check_result(w, Mode::Direct, &good).is_some());
        let failed =
            json!({"ok": 9, "errors": 1, "first_error": "refused", "status": {"captured": 9}});
        assert!(check_result(w, Mode::Iptables, &failed).is_some());
    }
}
