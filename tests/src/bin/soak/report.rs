//! The soak's report: a block of text per scenario on stdout, a summary,
//! and `results.md`.

use std::fmt::Write as _;

use serde_json::Value;

use crate::common::{ScenarioResult, Severity};

fn mark(r: &ScenarioResult) -> &'static str {
    if !r.passed() {
        "FAIL"
    } else if r.complete {
        "PASS"
    } else {
        // Its checks held as far as it got, but it did not run to its
        // size: not a pass (the run exits non-zero).
        "INCOMPLETE"
    }
}

fn check_mark(pass: bool, severity: Severity) -> &'static str {
    match (pass, severity) {
        (true, _) => "ok",
        (false, Severity::Must) => "FAIL",
        (false, Severity::Should) => "WARN",
    }
}

/// One scenario as plain text.
pub fn scenario_text(r: &ScenarioResult) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "\n{} [{}] ({:.0} s)", r.title, mark(r), r.seconds);
    let width = r.figures.iter().map(|(l, _)| l.len()).max().unwrap_or(0);
    for (label, value) in &r.figures {
        let _ = writeln!(s, "  {label:<width$}  {value}");
    }
    for c in &r.checks {
        let _ = writeln!(
            s,
            "  [{}] {}{}",
            check_mark(c.pass, c.severity),
            c.name,
            if c.pass {
                String::new()
            } else {
                format!(": {}", c.detail)
            }
        );
    }
    if let Some(e) = &r.error {
        let _ = writeln!(s, "  ERROR: {e}");
    }
    s
}

/// The closing summary.
pub fn summary_text(results: &[ScenarioResult], seconds: f64) -> String {
    let mut s = String::from("weir-soak summary\n");
    for r in results {
        let _ = writeln!(s, "  {:<10} {:<18} {:>6.0} s", r.key, mark(r), r.seconds);
    }
    let _ = writeln!(s, "  {:<10} {:<18} {:>6.0} s", "total", "", seconds);
    s
}

/// `results.md`.
pub fn markdown(
    machine: &Value,
    settings: &Value,
    results: &[ScenarioResult],
    seconds: f64,
) -> String {
    let mut s = String::from("# weir soak results\n\n");
    let _ = writeln!(
        s,
        "Run {} on Linux {} ({} CPUs, {} GiB), agent `{}`; {:.0} s in all.\n",
        machine["date"].as_str().unwrap_or("?"),
        machine["kernel"].as_str().unwrap_or("?"),
        machine["cpus"],
        machine["memory_gib"],
        machine["weir"].as_str().unwrap_or("?"),
        seconds
    );
    let _ = writeln!(s, "Settings: `{settings}`\n");
    s.push_str("| scenario | result | seconds |\n|---|---|---:|\n");
    for r in results {
        let _ = writeln!(s, "| {} | {} | {:.0} |", r.title, mark(r), r.seconds);
    }
    for r in results {
        let _ = writeln!(s, "\n## {} ({})\n", r.title, mark(r));
        if let Some(e) = &r.error {
            let _ = writeln!(s, "**Error:** `{}`\n", e.replace('`', "'"));
        }
        if !r.figures.is_empty() {
            s.push_str("| figure | value |\n|---|---:|\n");
            for (label, value) in &r.figures {
                let _ = writeln!(s, "| {} | {} |", label.trim_start(), value);
            }
            s.push('\n');
        }
        if !r.checks.is_empty() {
            s.push_str("| check | result | measured |\n|---|---|---|\n");
            for c in &r.checks {
                let _ = writeln!(
                    s,
                    "| {} | {} | {} |",
                    c.name,
                    check_mark(c.pass, c.severity),
                    c.detail.replace('|', "\\|")
                );
            }
        }
    }
    s
}
