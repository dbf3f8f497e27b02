//! What weir's programs cost per connection, from the kernel's own BPF run
//! statistics.
//!
//! `BPF_ENABLE_STATS` turns on per-program run time and run count
//! accounting for as long as the returned descriptor stays open (no sysctl
//! is changed, and closing it, even by dying, turns it off again). The
//! bench opens it only around one extra, untimed connection-rate run in weir
//! mode, and reads the counters of the programs behind the links pinned
//! under that node's own bpffs (so other weir agents on the machine do not
//! count) with `bpftool`.

use std::collections::BTreeMap;
use std::os::fd::{FromRawFd, OwnedFd};
use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result, bail};
use serde::Serialize;
use serde_json::Value;

/// `BPF_ENABLE_STATS` from `<linux/bpf.h>`.
const BPF_ENABLE_STATS: libc::c_long = 32;
/// `BPF_STATS_RUN_TIME`.
const BPF_STATS_RUN_TIME: u32 = 0;

/// Statistics stay on while this lives.
pub struct StatsOn(#[expect(dead_code, reason = "held only to keep the stats on")] OwnedFd);

/// Turns on run-time statistics for every BPF program.
pub fn enable() -> Result<StatsOn> {
    // The attr of BPF_ENABLE_STATS is a single u32 (`enable_stats.type`);
    // a few bytes more, zeroed, are accepted.
    let mut attr = [0u8; 16];
    attr[..4].copy_from_slice(&BPF_STATS_RUN_TIME.to_ne_bytes());
    // SAFETY: bpf(2) reads `attr.len()` bytes from a live, initialized
    // buffer; on success it returns a new descriptor we now own.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_ENABLE_STATS,
            attr.as_mut_ptr(),
            attr.len() as libc::c_uint,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error()).context("bpf(BPF_ENABLE_STATS)");
    }
    // SAFETY: a fresh descriptor returned by the kernel, owned by nobody
    // else.
    Ok(StatsOn(unsafe { OwnedFd::from_raw_fd(fd as i32) }))
}

fn bpftool(args: &[&str]) -> Result<Value> {
    let out = Command::new("bpftool")
        .arg("-j")
        .args(args)
        .output()
        .context("running bpftool (is it installed? `cargo xtask setup` installs it)")?;
    if !out.status.success() {
        bail!(
            "bpftool {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    serde_json::from_slice(&out.stdout).context("bpftool printed something else than JSON")
}

/// The programs behind the links pinned under `<bpffs>/weir/links`:
/// program id -> program name.
pub fn weir_programs(bpffs: &Path) -> Result<BTreeMap<u64, String>> {
    let dir = bpffs.join("weir").join("links");
    let mut ids = BTreeMap::new();
    for entry in std::fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))? {
        let path = entry?.path();
        let link = bpftool(&["link", "show", "pinned", &path.to_string_lossy()])?;
        if let Some(id) = link["prog_id"].as_u64() {
            ids.insert(id, String::new());
        }
    }
    for (id, name) in ids.iter_mut() {
        let prog = bpftool(&["prog", "show", "id", &id.to_string()])?;
        *name = prog["name"].as_str().unwrap_or("?").to_owned();
    }
    Ok(ids)
}

/// `(run_time_ns, run_cnt)` of each program.
pub fn snapshot(progs: &BTreeMap<u64, String>) -> Result<BTreeMap<u64, (u64, u64)>> {
    progs
        .keys()
        .map(|id| {
            let p = bpftool(&["prog", "show", "id", &id.to_string()])?;
            Ok((
                *id,
                (
                    p["run_time_ns"].as_u64().unwrap_or(0),
                    p["run_cnt"].as_u64().unwrap_or(0),
                ),
            ))
        })
        .collect()
}

/// One program's cost over a run.
#[derive(Clone, Debug, Serialize)]
pub struct ProgCost {
    /// Program name.
    pub name: String,
    /// Runs per connection.
    pub runs_per_conn: f64,
    /// Mean time per run, ns.
    pub ns_per_run: f64,
    /// Time per connection, ns.
    pub ns_per_conn: f64,
}

/// The per-connection cost of each program between two snapshots over
/// `conns` connections, most expensive first.
pub fn costs(
    progs: &BTreeMap<u64, String>,
    before: &BTreeMap<u64, (u64, u64)>,
    after: &BTreeMap<u64, (u64, u64)>,
    conns: u64,
) -> Vec<ProgCost> {
    let conns = conns.max(1) as f64;
    let mut v: Vec<ProgCost> = progs
        .iter()
        .filter_map(|(id, name)| {
            let (t0, c0) = before.get(id).copied().unwrap_or_default();
            let (t1, c1) = after.get(id).copied()?;
            let (dt, dc) = (t1.saturating_sub(t0), c1.saturating_sub(c0));
            (dc > 0).then(|| ProgCost {
                name: name.clone(),
                runs_per_conn: dc as f64 / conns,
                ns_per_run: dt as f64 / dc as f64,
                ns_per_conn: dt as f64 / conns,
            })
        })
        .collect();
    v.sort_by(|a, b| b.ns_per_conn.total_cmp(&a.ns_per_conn));
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn costs_are_per_connection_and_sorted() {
        let progs = BTreeMap::from([(1, "a".to_owned()), (2, "b".to_owned()), (3, "c".into())]);
        let before = BTreeMap::from([(1, (100, 10)), (2, (0, 0)), (3, (5, 5))]);
        let after = BTreeMap::from([(1, (1100, 30)), (2, (4000, 10)), (3, (5, 5))]);
        let c = costs(&progs, &before, &after, 10);
        assert_eq!(c.len(), 2, "{c:?}");
        assert_eq!(c[0].name, "b");
        assert_eq!(c[0].ns_per_conn, 400.0);
        assert_eq!(c[1].runs_per_conn, 2.0);
        assert_eq!(c[1].ns_per_run, 50.0);
    }
}
