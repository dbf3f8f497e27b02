//! The Grafana dashboard (`deploy/grafana/weir-dashboard.json`) only
//! queries series the agent exports: every metric name and every label in
//! its PromQL is checked against the sources that declare the exported
//! series: `agent/src/metrics.rs` and the counter tables of
//! `ebpf/common/src/counters.rs` (each counter's family and label value).
//! No root needed.

use std::collections::BTreeSet;
use std::path::Path;

use serde_json::Value;

fn repo_file(rel: &str) -> String {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(rel);
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("reading {}: {e}", p.display()))
}

/// The files that declare exported series.
const METRIC_SOURCES: [&str; 2] = ["agent/src/metrics.rs", "ebpf/common/src/counters.rs"];

/// Every `"weir_…"` string literal of metrics.rs: the exported metric names.
fn defined_metrics(src: &str) -> BTreeSet<String> {
    src.split('"')
        .skip(1)
        .step_by(2)
        .filter(|s| {
            s.starts_with("weir_")
                && s.chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        })
        .map(str::to_string)
        .collect()
}

/// Every string literal of metrics.rs (label names and values are among
/// them).
fn literals(src: &str) -> BTreeSet<String> {
    src.split('"')
        .skip(1)
        .step_by(2)
        .map(str::to_string)
        .collect()
}

const KEYWORDS: &[&str] = &[
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "bool",
    "and",
    "or",
    "unless",
    "offset",
    "inf",
    "nan",
];

/// Label names Prometheus adds when it scrapes the agent, and `le` of
/// histogram buckets.
const TARGET_LABELS: &[&str] = &["instance", "job", "le"];

/// What a PromQL expression refers to.
#[derive(Debug, Default)]
struct Refs {
    metrics: BTreeSet<String>,
    /// (label, value or regex) of `{…}` matchers.
    matchers: Vec<(String, String)>,
    /// Labels of `by (…)` / `without (…)` / `on (…)` / `ignoring (…)`.
    grouping: BTreeSet<String>,
    functions: BTreeSet<String>,
}

fn is_ident_start(c: char) -> bool {
    c.is_ascii_alphabetic() || c == '_' || c == ':'
}

fn is_ident(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_' || c == ':'
}

/// A small PromQL scanner: enough to find metric names, label matchers,
/// grouping labels and function names (panics on unbalanced brackets).
fn scan(expr: &str) -> Refs {
    let chars: Vec<char> = expr.chars().collect();
    let mut r = Refs::default();
    let mut i = 0;
    let mut pending_grouping = false;
    while i < chars.len() {
        let c = chars[i];
        if c == '"' || c == '\'' || c == '`' {
            let end = chars[i + 1..]
                .iter()
                .position(|&d| d == c)
                .unwrap_or_else(|| panic!("unterminated string in {expr:?}"));
            i += end + 2;
        } else if c == '[' {
            let end = chars[i..]
                .iter()
                .position(|&d| d == ']')
                .unwrap_or_else(|| panic!("unterminated range in {expr:?}"));
            i += end + 1;
        } else if c == '{' {
            let end = chars[i..]
                .iter()
                .position(|&d| d == '}')
                .unwrap_or_else(|| panic!("unterminated matcher in {expr:?}"));
            let body: String = chars[i + 1..i + end].iter().collect();
            for m in body.split(',').map(str::trim).filter(|m| !m.is_empty()) {
                let op = m
                    .find(['=', '!'])
                    .unwrap_or_else(|| panic!("bad matcher {m:?} in {expr:?}"));
                let label = m[..op].trim().to_string();
                let value = m[op..]
                    .trim_start_matches(['=', '!', '~'])
                    .trim()
                    .trim_matches('"')
                    .to_string();
                r.matchers.push((label, value));
            }
            i += end + 1;
        } else if c == '(' && pending_grouping {
            let end = chars[i..]
                .iter()
                .position(|&d| d == ')')
                .unwrap_or_else(|| panic!("unterminated grouping in {expr:?}"));
            let body: String = chars[i + 1..i + end].iter().collect();
            r.grouping.extend(
                body.split(',')
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .map(str::to_string),
            );
            pending_grouping = false;
            i += end + 1;
        } else if c == '$' {
            // A Grafana variable outside a string ($__range in a range is
            // skipped with the range).
            i += 1;
            while i < chars.len() && is_ident(chars[i]) {
                i += 1;
            }
        } else if c.is_ascii_digit()
            || (c == '.' && chars.get(i + 1).is_some_and(char::is_ascii_digit))
        {
            while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '.') {
                i += 1;
            }
        } else if is_ident_start(c) {
            let start = i;
            while i < chars.len() && is_ident(chars[i]) {
                i += 1;
            }
            let word: String = chars[start..i].iter().collect();
            let rest: String = chars[i..].iter().collect();
            let rest = rest.trim_start();
            let next = rest.chars().next();
            // `sum by (…) (…)`: an aggregation with its grouping first.
            let grouped_aggregation = ["by", "without"].iter().any(|kw| {
                rest.strip_prefix(kw)
                    .is_some_and(|after| !after.starts_with(is_ident))
            });
            if [
                "by",
                "without",
                "on",
                "ignoring",
                "group_left",
                "group_right",
            ]
            .contains(&word.as_str())
            {
                pending_grouping = true;
            } else if KEYWORDS.contains(&word.to_lowercase().as_str()) {
            } else if next == Some('(') || grouped_aggregation {
                r.functions.insert(word);
            } else {
                r.metrics.insert(word);
            }
        } else {
            i += 1;
        }
    }
    r
}

/// Every (where, PromQL) pair of the dashboard: panel targets and the
/// queries of template variables (`label_values(metric{…}, label)`).
fn queries(dash: &Value) -> Vec<(String, String)> {
    fn walk(v: &Value, path: &str, out: &mut Vec<(String, String)>) {
        match v {
            Value::Object(m) => {
                if let Some(Value::String(e)) = m.get("expr") {
                    out.push((path.to_string(), e.clone()));
                }
                for (k, v) in m {
                    let title = m.get("title").and_then(Value::as_str).unwrap_or("");
                    walk(v, &format!("{path}/{title}.{k}"), out);
                }
            }
            Value::Array(a) => {
                for (i, v) in a.iter().enumerate() {
                    walk(v, &format!("{path}[{i}]"), out);
                }
            }
            _ => {}
        }
    }
    let mut out = Vec::new();
    walk(&dash["panels"], "panels", &mut out);
    for var in dash["templating"]["list"].as_array().unwrap() {
        if var["type"] != "query" {
            continue;
        }
        let q = var["query"]["query"]
            .as_str()
            .or_else(|| var["query"].as_str())
            .unwrap();
        let inner = q
            .strip_prefix("label_values(")
            .and_then(|s| s.strip_suffix(')'))
            .unwrap_or_else(|| panic!("variable {}: unexpected query {q:?}", var["name"]));
        let (selector, _label) = inner.rsplit_once(',').unwrap();
        out.push((format!("variable {}", var["name"]), selector.to_string()));
    }
    out
}

#[test]
fn scanner_finds_metrics_labels_and_functions() {
    let r = scan(
        "sum by (namespace, pod) (rate(weir_x_total{a=~\"$b\",c!=\"d\"}[$__rate_interval])) / on (pod) group_left weir_y > 0.5",
    );
    assert_eq!(
        r.metrics,
        ["weir_x_total", "weir_y"].map(String::from).into()
    );
    assert_eq!(r.functions, ["rate", "sum"].map(String::from).into());
    assert_eq!(r.grouping, ["namespace", "pod"].map(String::from).into());
    assert_eq!(r.matchers[0], ("a".into(), "$b".into()));
    assert_eq!(r.matchers[1], ("c".into(), "d".into()));
}

#[test]
fn dashboard_queries_only_exported_metrics() {
    let dash: Value = serde_json::from_str(&repo_file("deploy/grafana/weir-dashboard.json"))
        .expect("weir-dashboard.json is not valid JSON");
    let src = METRIC_SOURCES
        .iter()
        .map(|f| repo_file(f))
        .collect::<Vec<_>>()
        .join("\n");
    let defined = defined_metrics(&src);
    let lits = literals(&src);
    assert!(
        defined.contains("weir_connections_captured_total") && defined.len() >= 8,
        "found only {defined:?} in metrics.rs"
    );
    let known_fns: BTreeSet<&str> = [
        "sum",
        "rate",
        "increase",
        "topk",
        "count",
        "max",
        "min",
        "avg",
        "irate",
        "clamp_min",
        "histogram_quantile",
    ]
    .into();
    // Series of a histogram (`_bucket`, `_sum`, `_count`), and the process
    // collector's `process_*` series when metrics.rs registers it.
    let exported = |m: &str| {
        defined.contains(m)
            || ["_bucket", "_sum", "_count"]
                .iter()
                .any(|s| m.strip_suffix(s).is_some_and(|b| defined.contains(b)))
            || (m.starts_with("process_") && src.contains("ProcessCollector::for_self()"))
    };
    let base = |m: &str| -> String {
        ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| m.strip_suffix(s).filter(|b| defined.contains(*b)))
            .unwrap_or(m)
            .to_string()
    };

    let qs = queries(&dash);
    assert!(qs.len() >= 10, "only {} queries in the dashboard", qs.len());
    let mut used = BTreeSet::new();
    for (at, expr) in &qs {
        let r = scan(expr);
        assert!(!r.metrics.is_empty(), "{at}: no metric in {expr:?}");
        for m in &r.metrics {
            assert!(
                exported(m),
                "{at}: {m} is not an exported metric (the sources defines {defined:?}); expr {expr:?}"
            );
            used.insert(base(m));
        }
        for f in &r.functions {
            assert!(
                known_fns.contains(f.as_str()),
                "{at}: unexpected function {f} in {expr:?}"
            );
        }
        for l in r.grouping.iter().chain(r.matchers.iter().map(|(l, _)| l)) {
            assert!(
                TARGET_LABELS.contains(&l.as_str()) || lits.contains(l),
                "{at}: label {l} is not exported (metrics.rs, counters.rs); expr {expr:?}"
            );
        }
        // Fixed label values (not variables, regex alternations split).
        for (l, v) in &r.matchers {
            if TARGET_LABELS.contains(&l.as_str()) || v.contains('$') {
                continue;
            }
            for alt in v.split('|') {
                assert!(
                    lits.contains(alt),
                    "{at}: {l}=\"{alt}\" is not a label value of metrics.rs or counters.rs; expr {expr:?}"
                );
            }
        }
    }
    // Every exported metric is on the dashboard.
    let unused: Vec<&String> = defined.difference(&used).collect();
    assert!(
        unused.is_empty(),
        "metrics not on the dashboard: {unused:?}"
    );
}

#[test]
fn dashboard_is_well_formed() {
    let dash: Value =
        serde_json::from_str(&repo_file("deploy/grafana/weir-dashboard.json")).unwrap();
    assert_eq!(dash["uid"], "weir-capture");
    assert!(dash["title"].as_str().is_some_and(|t| !t.is_empty()));
    let vars: Vec<&str> = dash["templating"]["list"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["name"].as_str().unwrap())
        .collect();
    let mut ids = BTreeSet::new();
    for p in dash["panels"].as_array().unwrap() {
        let title = p["title"].as_str().unwrap_or("?");
        assert!(
            ids.insert(p["id"].as_u64().unwrap()),
            "duplicate id: {title}"
        );
        for k in ["h", "w", "x", "y"] {
            assert!(p["gridPos"][k].is_u64(), "{title}: gridPos.{k}");
        }
        assert!(p["gridPos"]["x"].as_u64().unwrap() + p["gridPos"]["w"].as_u64().unwrap() <= 24);
        if p["type"] == "row" {
            continue;
        }
        assert_eq!(p["datasource"]["uid"], "${datasource}", "{title}");
        assert!(
            p["description"].as_str().is_some_and(|d| !d.is_empty()),
            "{title}"
        );
        for t in p["targets"].as_array().unwrap() {
            let expr = t["expr"].as_str().unwrap();
            // Every $variable a query uses is defined (or a Grafana one).
            for var in expr.split('$').skip(1) {
                let name: String = var
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                assert!(
                    name.starts_with("__") || vars.contains(&name.as_str()),
                    "{title}: ${name} is not a dashboard variable"
                );
            }
        }
    }
}
