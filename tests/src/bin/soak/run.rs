//! `weir-soak run`: the scenarios one after another, each on its own node,
//! then `results.json` and `results.md`.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Args;
use serde_json::json;

use crate::common::{Ctx, ScenarioResult, Severity};
use crate::proto::{self, interrupted};
use crate::{churn, conns, faults, restarts};

/// Every scenario, in the order they run.
pub const SCENARIOS: [&str; 5] = ["restarts", "churn", "conns", "map-full", "faults"];

#[derive(Args, Debug, Clone)]
pub struct RunArgs {
    /// Directory for results.json and results.md.
    #[arg(long, default_value = "target/soak")]
    pub out: PathBuf,
    /// Scenario 1: SIGKILLs of the agent under traffic.
    #[arg(long, default_value_t = 100)]
    pub restarts: usize,
    /// Scenario 2: pods enrolled and removed.
    #[arg(long, default_value_t = 10_000)]
    pub churn: usize,
    /// Scenario 3: concurrent captured connections.
    #[arg(long, default_value_t = 100_000)]
    pub conns: u64,
    /// Scenario 3 (map full): handshakes in flight at once [default: 1.25
    /// times the PENDING_FLOWS capacity].
    #[arg(long)]
    pub flood: Option<u64>,
    /// Scenario 3 (map full): the agent's --max-pending (PENDING_FLOWS
    /// capacity) [default: the agent's, 32 per pod, at least 4096].
    #[arg(long)]
    pub max_pending: Option<u32>,
    /// Scenario 4: sidecar restarts under traffic.
    #[arg(long, default_value_t = 20)]
    pub proxy_restarts: usize,
    /// Only these scenarios (comma list): restarts, churn, conns, map-full,
    /// faults.
    #[arg(long, value_delimiter = ',')]
    pub only: Vec<String>,
    /// Stop starting new work after this many seconds (a scenario cut
    /// short is reported as incomplete).
    #[arg(long, default_value_t = 1800)]
    pub time_limit_s: u64,
}

fn selected(args: &RunArgs) -> Result<Vec<&'static str>> {
    for o in &args.only {
        if !SCENARIOS.contains(&o.as_str()) {
            bail!("unknown scenario {o:?}; known: {}", SCENARIOS.join(", "));
        }
    }
    Ok(SCENARIOS
        .iter()
        .copied()
        .filter(|s| args.only.is_empty() || args.only.iter().any(|o| o == s))
        .collect())
}

/// Runs one scenario, turning an error or a panic into a failed result
/// (keeping what it measured before).
fn guarded(
    key: &str,
    title: &str,
    f: impl FnOnce(&mut ScenarioResult) -> Result<()>,
) -> ScenarioResult {
    let started = Instant::now();
    let mut r = ScenarioResult::new(key, title);
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(&mut r)));
    let error = match outcome {
        Ok(Ok(())) => None,
        Ok(Err(e)) => Some(format!("{e:#}")),
        Err(p) => Some(
            p.downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "panic".into()),
        ),
    };
    if error.is_some() {
        r.complete = false;
        r.error = error;
    }
    r.seconds = started.elapsed().as_secs_f64();
    r
}

pub fn run(args: RunArgs) -> Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!("weir-soak run needs root (network namespaces, cgroups, eBPF)");
    }
    proto::catch_signals()?;
    let scenarios = selected(&args)?;
    let weir = weir_tests::weir_bin();
    let exe = std::env::current_exe().context("this executable's path")?;
    let started = Instant::now();
    let ctx = Ctx {
        exe,
        weir: weir.clone(),
        deadline: started + Duration::from_secs(args.time_limit_s),
        agent_args: vec!["--resync-secs".into(), "1".into()],
        nofile: proto::nofile_budget(),
    };
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    let machine = machine(&weir);
    eprintln!(
        "weir-soak: {} on {}; scenarios: {}; up to {} descriptors per process",
        weir.display(),
        machine["kernel"].as_str().unwrap_or("?"),
        scenarios.join(", "),
        ctx.nofile
    );
    let mut results: Vec<ScenarioResult> = Vec::new();
    for s in scenarios {
        if interrupted() {
            break;
        }
        eprintln!("\nweir-soak: == {s} ==");
        let r = match s {
            "restarts" => guarded(
                "restarts",
                "Agent SIGKILLed and restarted under continuous traffic",
                |r| restarts::run(&ctx, r, args.restarts),
            ),
            "churn" => guarded(
                "churn",
                "Pod churn: enroll/remove cycles, leak check",
                |r| churn::run(&ctx, r, args.churn),
            ),
            "conns" => guarded(
                "conns",
                "Concurrent captured connections: every SO_ORIGINAL_DST answer is its own",
                |r| conns::concurrent(&ctx, r, args.conns),
            ),
            "map-full" => guarded(
                "map_full",
                "More handshakes in flight than PENDING_FLOWS holds",
                |r| conns::map_full(&ctx, r, args.flood, args.max_pending),
            ),
            "faults" => guarded(
                "faults",
                "Proxy and application restarts, a proxy listening late, a pod IP change",
                |r| faults::run(&ctx, r, args.proxy_restarts),
            ),
            _ => unreachable!("checked by selected()"),
        };
        print!("{}", crate::report::scenario_text(&r));
        results.push(r);
        write(&args, &machine, &results, started)?;
    }
    let total = started.elapsed().as_secs_f64();
    println!("\n{}", crate::report::summary_text(&results, total));
    write(&args, &machine, &results, started)?;
    println!(
        "weir-soak: results in {} and {}",
        args.out.join("results.json").display(),
        args.out.join("results.md").display()
    );
    if interrupted() {
        bail!("interrupted");
    }
    if !results.iter().all(ScenarioResult::passed) {
        bail!("soak failed: see the checks marked FAIL above");
    }
    let short: Vec<&str> = results
        .iter()
        .filter(|r| !r.complete)
        .map(|r| r.key.as_str())
        .collect();
    if !short.is_empty() {
        bail!(
            "soak incomplete: {} cut short by --time-limit-s {} before reaching the size asked for; \
             raise --time-limit-s or lower the sizes",
            short.join(", "),
            args.time_limit_s
        );
    }
    Ok(())
}

fn write(
    args: &RunArgs,
    machine: &serde_json::Value,
    results: &[ScenarioResult],
    started: Instant,
) -> Result<()> {
    let total = started.elapsed().as_secs_f64();
    let settings = json!({
        "restarts": args.restarts,
        "churn": args.churn,
        "conns": args.conns,
        "flood": args.flood,
        "max_pending": args.max_pending,
        "proxy_restarts": args.proxy_restarts,
        "time_limit_s": args.time_limit_s,
    });
    let pass = results.iter().all(ScenarioResult::passed);
    let warnings: Vec<String> = results
        .iter()
        .flat_map(|r| {
            r.checks
                .iter()
                .filter(|c| !c.pass && c.severity == Severity::Should)
                .map(move |c| format!("{}: {}", r.key, c.name))
        })
        .collect();
    let doc = json!({
        "machine": machine,
        "settings": settings,
        "seconds": total,
        "pass": pass,
        "warnings": warnings,
        "scenarios": results,
    });
    proto::write_json(&args.out.join("results.json"), &doc)?;
    let md = crate::report::markdown(machine, &settings, results, total);
    std::fs::write(args.out.join("results.md"), md)
        .with_context(|| format!("writing {}", args.out.join("results.md").display()))
}

fn machine(weir: &Path) -> serde_json::Value {
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_default();
    let mem_kib: u64 = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
        })
        .unwrap_or(0);
    let date = std::process::Command::new("date")
        .args(["-u", "+%Y-%m-%dT%H:%M:%SZ"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    json!({
        "kernel": kernel,
        "cpus": std::thread::available_parallelism().map_or(1, |n| n.get()),
        "memory_gib": (mem_kib as f64 / 1024.0 / 1024.0 * 10.0).round() / 10.0,
        "weir": weir.display().to_string(),
        "date": date,
    })
}
