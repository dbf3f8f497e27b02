//! Scenario 2: pod churn. Thousands of pods are enrolled and removed
//! through pods-file changes, in every way a node sees them go:
//!
//! - removed from the pods file, then its network namespace deleted;
//! - network namespace deleted while still enrolled (and listed), removed
//!   from the file only at the next change;
//! - re-created: same name, same IP, a new network namespace at the same
//!   path (a restarted sandbox);
//! - a new pod taking the IP a removed pod had, in the same change (the
//!   addresses come from a small pool, freed addresses first);
//! - some pods run a proxy that listens on 15001/15006 before they are
//!   enrolled (adopted into `LISTENERS`), killed when the pod goes.
//!
//! A sentinel pod stays enrolled throughout. Before and after, with the
//! same pods enrolled (the sentinel alone), the entries of every pinned
//! map, the pins under the bpffs, weir's `sk_lookup` links in the kernel
//! and the agent's open files must be the same: anything more is a leak.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use serde::Serialize;
use serde_json::json;
use weir_tests::{NsFile, Proc, spawn_in_netns_path};

use crate::bpf::{self, Occupancy};
use crate::common::{self, Ctx, Rng, ScenarioResult, thousands};
use weir_tests::node::{Node, PodEntry};

use crate::node::pod_entry;

/// Pods enrolled at once (besides the sentinel).
const LIVE: usize = 24;
/// Steps a pod stays enrolled.
const LIFETIME: usize = 2;
/// Size of the address pool.
const POOL: u8 = 64;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Variant {
    Plain,
    DeleteWhileEnrolled,
    Recreate,
}

struct ChurnPod {
    name: String,
    ns: NsFile,
    ip: Ipv4Addr,
    variant: Variant,
    listener: Option<Proc>,
    age: usize,
    /// Its netns was deleted while it is still listed.
    dead: bool,
}

impl ChurnPod {
    fn spec(&self) -> PodEntry {
        pod_entry(&self.name, self.ns.path(), self.ip)
    }
}

/// What weir holds in the kernel at one moment.
#[derive(Debug, Serialize, Clone)]
struct Snapshot {
    maps: BTreeMap<String, Occupancy>,
    link_pins: Vec<String>,
    /// Kernel links running weir's sk_lookup program (any netns).
    sk_lookup_links: usize,
    /// Of those, links whose network namespace is gone.
    sk_lookup_links_detached: usize,
    agent_fds: usize,
    agent_rss_kib: u64,
}

fn snapshot(node: &Node, sk_prog: u32) -> Result<Snapshot> {
    let pins = node.bpffs.join("weir/links");
    let mut link_pins: Vec<String> = std::fs::read_dir(&pins)
        .with_context(|| format!("listing {}", pins.display()))?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    link_pins.sort();
    let ours: Vec<bpf::LinkInfo> = bpf::all_links()?
        .into_iter()
        .filter(|l| l.link_type == bpf::LINK_TYPE_NETNS && l.prog_id == sk_prog)
        .collect();
    Ok(Snapshot {
        maps: bpf::occupancy(node.bpffs.path())?,
        link_pins,
        sk_lookup_links: ours.len(),
        sk_lookup_links_detached: ours.iter().filter(|l| l.netns_ino == 0).count(),
        agent_fds: node.agent_fds().unwrap_or(0),
        agent_rss_kib: node.agent_rss_kib().unwrap_or(0),
    })
}

fn start_listener(ctx: &Ctx, node: &Node, ns: &Path, name: &str) -> Proc {
    let ready = node
        .dir
        .join(format!("{name}-listen-{}.ready", common::unique()));
    let mut cmd = Command::new(&ctx.exe);
    cmd.args([
        "--uid", "1337", "listen", "--port", "15001", "--port", "15006",
    ])
    .arg("--ready-file")
    .arg(&ready);
    let mut p = spawn_in_netns_path(Some(ns), Some(&node.cgroup), cmd);
    p.wait_for_file(&ready, Duration::from_secs(30));
    p
}

/// Enrolled pods according to `weir status`.
fn enrolled(node: &Node) -> Result<BTreeSet<String>> {
    Ok(node.try_status()?["pods"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|p| p["name"].as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default())
}

/// Runs scenario 2 with `cycles` pod enrollments (each one removed again).
pub fn run(ctx: &Ctx, r: &mut ScenarioResult, cycles: usize) -> Result<()> {
    let mut node = ctx.node("soakc", &["--reload-ms".into(), "20".into()], true)?;
    let nsdir: PathBuf = node.dir.join("netns");
    std::fs::create_dir(&nsdir)?;

    let sentinel_ns = NsFile::create(&nsdir.join("sentinel"))?;
    let sentinel = pod_entry(
        "sentinel",
        sentinel_ns.path(),
        Ipv4Addr::new(198, 18, 99, 1),
    );
    node.apply_pods(std::slice::from_ref(&sentinel))?;
    let cookie = node.try_status()?["pods"][0]["netns_cookie"]
        .as_u64()
        .context("sentinel cookie")?;
    let sk_prog = bpf::pinned_link(&node.bpffs.join(format!("weir/links/netns-{cookie}")))?.prog_id;
    std::thread::sleep(Duration::from_millis(300));
    let before = snapshot(&node, sk_prog)?;

    let mut rng = Rng::new(0x5eed_0002);
    let mut pool: VecDeque<Ipv4Addr> = (1..=POOL).map(|h| Ipv4Addr::new(198, 18, 100, h)).collect();
    let mut live: Vec<ChurnPod> = Vec::new();
    let mut next_name = 0usize;
    let (mut enrollments, mut removals) = (0usize, 0usize);
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    let mut apply_ms = Vec::new();
    let mut steps = 0usize;
    let mut status_checks = 0usize;
    let mut status_mismatch: Vec<String> = Vec::new();
    let mut same_ip_reuse = 0usize;
    let mut last_freed: BTreeSet<Ipv4Addr> = BTreeSet::new();

    loop {
        let finishing = enrollments >= cycles || ctx.out_of_time();
        if finishing && live.is_empty() {
            break;
        }
        if ctx.out_of_time() && enrollments < cycles {
            r.complete = false;
        }
        let mut freed = Vec::new();
        // Removals: pods whose time is up, and pods whose netns is gone.
        let mut keep = Vec::new();
        for mut p in live.drain(..) {
            if finishing || p.dead || p.age >= LIFETIME {
                if let Some(mut l) = p.listener.take() {
                    l.kill();
                }
                p.ns.delete();
                freed.push(p.ip);
                removals += 1;
            } else {
                keep.push(p);
            }
        }
        live = keep;
        // Faults on pods that stay listed.
        for p in &mut live {
            if p.age != 1 {
                continue;
            }
            match p.variant {
                Variant::DeleteWhileEnrolled => {
                    // The netns goes while the pod is enrolled and still in
                    // the pods file (its proxy, if any, keeps running in it).
                    p.ns.delete();
                    p.dead = true;
                    *counts.entry("netns deleted while enrolled").or_default() += 1;
                }
                Variant::Recreate => {
                    if let Some(mut l) = p.listener.take() {
                        l.kill();
                    }
                    let path = p.ns.path().to_path_buf();
                    p.ns.delete();
                    p.ns = NsFile::create(&path)?;
                    if rng.below(2) == 0 {
                        p.listener = Some(start_listener(ctx, &node, &path, &p.name));
                    }
                    enrollments += 1;
                    removals += 1;
                    *counts
                        .entry("re-created (same name, IP and netns path)")
                        .or_default() += 1;
                }
                Variant::Plain => {}
            }
        }
        // Freed addresses first: new pods take them in this same change.
        for ip in freed.iter().rev() {
            pool.push_front(*ip);
        }
        while !finishing && live.len() < LIVE && enrollments < cycles {
            let ip = pool.pop_front().context("address pool empty")?;
            if last_freed.contains(&ip) || freed.contains(&ip) {
                same_ip_reuse += 1;
            }
            let name = format!("c{next_name}");
            next_name += 1;
            let ns = NsFile::create(&nsdir.join(&name))?;
            let variant = match rng.below(10) {
                0 => Variant::DeleteWhileEnrolled,
                1 => Variant::Recreate,
                _ => Variant::Plain,
            };
            let listener = (rng.below(20) == 0).then(|| {
                *counts
                    .entry("with a proxy listening before enrollment")
                    .or_default() += 1;
                start_listener(ctx, &node, ns.path(), &name)
            });
            live.push(ChurnPod {
                name,
                ns,
                ip,
                variant,
                listener,
                age: 0,
                dead: false,
            });
            enrollments += 1;
        }
        last_freed = freed.into_iter().collect();
        let mut pods = vec![sentinel.clone()];
        pods.extend(live.iter().map(ChurnPod::spec));
        apply_ms.push(node.apply_pods(&pods)? as f64);
        steps += 1;
        for p in &mut live {
            p.age += 1;
        }
        if steps.is_multiple_of(25) {
            status_checks += 1;
            let want: BTreeSet<String> = std::iter::once("sentinel".to_string())
                .chain(live.iter().filter(|p| !p.dead).map(|p| p.name.clone()))
                .collect();
            let have = enrolled(&node)?;
            if have != want && status_mismatch.len() < 5 {
                status_mismatch.push(format!(
                    "step {steps}: missing {:?}, unexpected {:?}",
                    want.difference(&have).collect::<Vec<_>>(),
                    have.difference(&want).collect::<Vec<_>>()
                ));
            }
        }
        if steps.is_multiple_of(100) {
            eprintln!("weir-soak: churn: {enrollments}/{cycles} pods enrolled, {removals} removed");
        }
    }
    // Let a resync pass and every kernel object go.
    std::thread::sleep(Duration::from_millis(1500));
    let have = enrolled(&node)?;
    let mut after = snapshot(&node, sk_prog)?;
    // Links and sockets are freed asynchronously (RCU): look again for a
    // few seconds before calling anything a leak.
    let settle = Instant::now();
    while (after.maps != before.maps
        || after.sk_lookup_links != before.sk_lookup_links
        || after.link_pins != before.link_pins)
        && settle.elapsed() < Duration::from_secs(10)
    {
        std::thread::sleep(Duration::from_millis(250));
        after = snapshot(&node, sk_prog)?;
    }
    let not_enrolled_warnings = node.agent_log_lines("not enrolled").len();
    let metrics = node.try_metrics().unwrap_or_default();
    drop(sentinel_ns);

    let (apply_med, apply_max) = common::median_max(&apply_ms);
    r.figure(
        "pods enrolled and removed (cycles)",
        thousands(enrollments as u64),
    );
    for (k, v) in &counts {
        r.figure(&format!("  {k}"), thousands(*v as u64));
    }
    r.figure(
        "  new pod given an address freed in the same change",
        thousands(same_ip_reuse as u64),
    );
    r.figure("pods-file changes", thousands(steps as u64));
    r.figure(
        "apply per change, median / max (ms)",
        format!("{apply_med:.0} / {apply_max:.0}"),
    );
    for (name, b) in &before.maps {
        let a = after.maps.get(name).map_or(0, |o| o.entries);
        r.figure(
            &format!("{name} entries before / after (capacity)"),
            format!(
                "{} / {} ({})",
                b.entries,
                a,
                thousands(u64::from(b.capacity))
            ),
        );
    }
    r.figure(
        "link pins before / after",
        format!("{} / {}", before.link_pins.len(), after.link_pins.len()),
    );
    r.figure(
        "weir sk_lookup links in the kernel before / after",
        format!("{} / {}", before.sk_lookup_links, after.sk_lookup_links),
    );
    r.figure(
        "agent open files before / after",
        format!("{} / {}", before.agent_fds, after.agent_fds),
    );
    r.figure(
        "agent RSS before / after (MiB)",
        format!(
            "{:.1} / {:.1}",
            before.agent_rss_kib as f64 / 1024.0,
            after.agent_rss_kib as f64 / 1024.0
        ),
    );

    r.must(
        &format!("{cycles} cycles"),
        enrollments >= cycles,
        format!("{enrollments} enrolled, {removals} removed"),
    );
    let leaked: Vec<String> = before
        .maps
        .iter()
        .filter_map(|(name, b)| {
            let a = after.maps.get(name).map_or(0, |o| o.entries);
            (a != b.entries).then(|| format!("{name}: {} -> {a}", b.entries))
        })
        .collect();
    r.must(
        "every map back to its entries before the churn",
        leaked.is_empty(),
        if leaked.is_empty() {
            format!("{} maps compared", before.maps.len())
        } else {
            leaked.join(", ")
        },
    );
    r.must(
        "link pins back to baseline",
        after.link_pins == before.link_pins,
        format!("{:?} -> {:?}", before.link_pins.len(), after.link_pins),
    );
    r.must(
        "no weir sk_lookup link left in the kernel",
        after.sk_lookup_links == before.sk_lookup_links,
        format!("{} -> {}", before.sk_lookup_links, after.sk_lookup_links),
    );
    r.must(
        "agent holds no more open files",
        after.agent_fds <= before.agent_fds + 8,
        format!("{} -> {}", before.agent_fds, after.agent_fds),
    );
    r.must(
        "weir status matched the pods file at every check",
        status_mismatch.is_empty(),
        if status_mismatch.is_empty() {
            format!("{status_checks} checks")
        } else {
            status_mismatch.join("; ")
        },
    );
    r.must(
        "only the sentinel is enrolled at the end",
        have == BTreeSet::from(["sentinel".to_string()]),
        format!("{have:?}"),
    );
    r.data = json!({
        "enrollments": enrollments,
        "removals": removals,
        "variants": counts,
        "same_ip_reuse": same_ip_reuse,
        "steps": steps,
        "apply_ms": {"median": apply_med, "max": apply_max},
        "before": before,
        "after": after,
        "not_enrolled_warnings": not_enrolled_warnings,
        "metrics_map_entries": metrics.lines().filter(|l| l.starts_with("weir_map_entries")).collect::<Vec<_>>(),
    });
    Ok(())
}
