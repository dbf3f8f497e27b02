//! Enrollment: how long a `weir run` agent takes from a pods-file change
//! listing 1,000 pods to all of them captured, and its memory with them.
//!
//! The 1,000 network namespaces are created first and timed on their own
//! (creating namespaces is the container runtime's work, not weir's): a
//! helper thread `unshare(CLONE_NEWNET)`s into each new one in turn and
//! bind-mounts it on a file under a private directory, the way `ip netns
//! add` names one, without starting 1,000 processes. They have only `lo`;
//! enrollment does not need more.
//!
//! Each repetition then atomically replaces the pods file (empty -> 1,000
//! pods), waits for the agent's `pods file applied in N ms` line, checks
//! with `weir status -o json` that every pod is captured with its inbound
//! link attached, reads the agent's RSS, and empties the file again (timing
//! the removal too). The wall-clock figure includes the detection latency of
//! the local pod source (inotify on the pods file's directory, with a poll
//! every `--reload-ms` as fallback) on top of the apply time the agent logs.
//! Each change is made after a random pause of up to one poll interval, so
//! it lands at a random point of the agent's polling cycle (as a real
//! change would) rather than always just after a poll.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use serde::Serialize;
use weir_tests::node::{Node, PodEntry, fully_captured};
use weir_tests::podsfile::pods_yaml;
use weir_tests::{NsFile, TempDir};

use crate::stats::Summary;

/// How long one apply may take before the bench gives up.
pub(crate) const APPLY_TIMEOUT: Duration = Duration::from_secs(120);

/// What the enrollment benchmark measured.
#[derive(Debug, Serialize)]
pub struct EnrollResult {
    /// Pods enrolled.
    pub pods: usize,
    /// Seconds to create the pods' network namespaces (not weir's work).
    pub netns_create_s: f64,
    /// The agent's `--reload-ms` (pods-file poll interval).
    pub reload_ms: u64,
    /// Pods-file change to all pods captured (wall clock), ms.
    pub enroll_wall_ms: Summary,
    /// The apply time the agent logged, ms.
    pub enroll_apply_ms: Summary,
    /// Pods-file emptied to all pods removed (wall clock), ms.
    pub remove_wall_ms: Summary,
    /// The removal apply time the agent logged, ms.
    pub remove_apply_ms: Summary,
    /// Agent VmRSS with all pods enrolled, KiB (largest over repetitions).
    pub rss_kib: u64,
    /// Agent VmHWM (peak RSS) at the end, KiB.
    pub hwm_kib: u64,
    /// Memory of the BPF maps the agent holds open (sum of `memlock` in
    /// fdinfo, per map), KiB: kernel memory, not part of the RSS.
    pub bpf_map_kib: u64,
}

/// Network namespaces bind-mounted on files `pod-NNNN` of one directory;
/// unmounted (and so freed, once nothing else holds them) on drop.
pub(crate) struct NetnsSet {
    pub(crate) files: Vec<PathBuf>,
    _ns: Vec<NsFile>,
}

impl NetnsSet {
    pub(crate) fn create(dir: &Path, n: usize, interrupted: &AtomicBool) -> Result<NetnsSet> {
        std::fs::create_dir_all(dir)?;
        let files: Vec<PathBuf> = (0..n).map(|i| dir.join(format!("pod-{i:04}"))).collect();
        let ns = NsFile::create_all(&files, &|| interrupted.load(Ordering::Relaxed))?;
        Ok(NetnsSet { files, _ns: ns })
    }
}

/// The pods-file entries of every namespace of `set`.
pub(crate) fn pod_entries(set: &NetnsSet) -> Vec<PodEntry> {
    set.files
        .iter()
        .enumerate()
        .map(|(i, f)| {
            PodEntry::at(&format!("pod-{i:04}"), f, &[&pod_ip(i).to_string()]).namespace("enroll")
        })
        .collect()
}

/// Pod `i`'s address, in 198.18.128.0/17 (apart from the traffic nodes).
pub(crate) fn pod_ip(i: usize) -> Ipv4Addr {
    let n = i + 1;
    Ipv4Addr::new(198, 18, 128 + (n / 256) as u8, (n % 256) as u8)
}

/// A small xorshift generator for the random pauses (no cryptography).
struct Rng(u64);

impl Rng {
    fn seeded() -> Rng {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64);
        Rng(t | 1)
    }

    /// A number in `0..n`.
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

/// `VmRSS` and `VmHWM` of `pid`, KiB.
fn rss_kib(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// Sum of `memlock` over the distinct BPF maps `pid` has open, KiB.
pub(crate) fn bpf_map_kib(pid: u32) -> u64 {
    let mut seen = std::collections::BTreeSet::new();
    let mut bytes = 0u64;
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/fdinfo")) else {
        return 0;
    };
    for entry in dir.flatten() {
        let Ok(info) = std::fs::read_to_string(entry.path()) else {
            continue;
        };
        let get = |k: &str| {
            info.lines()
                .find_map(|l| l.strip_prefix(k))
                .and_then(|v| v.trim().parse::<u64>().ok())
        };
        if let (Some(id), Some(memlock)) = (get("map_id:"), get("memlock:"))
            && seen.insert(id)
        {
            bytes += memlock;
        }
    }
    bytes / 1024
}

/// Runs the enrollment benchmark.
pub fn run(
    weir: &Path,
    pods: usize,
    reps: usize,
    reload_ms: u64,
    nice: i32,
    interrupted: &AtomicBool,
) -> Result<EnrollResult> {
    let dir = TempDir::new("enroll");
    eprintln!("weir-bench: enrollment: creating {pods} network namespaces");
    let started = Instant::now();
    let set = NetnsSet::create(&dir.join("netns"), pods, interrupted)?;
    let netns_create_s = started.elapsed().as_secs_f64();
    eprintln!("weir-bench: enrollment: {pods} namespaces in {netns_create_s:.2} s");

    let mut node = Node::builder()
        .name("wbenroll")
        .weir(weir)
        .metrics(false)
        .agent_args([
            format!("--reload-ms={reload_ms}"),
            // A node that runs this many pods says so (status.capacity.pods).
            format!("--max-pods={}", pods.max(crate::memory::NODE_CAPACITY)),
        ])
        .build();
    node.spawn_agent();
    let pid = node.agent_pid().context("the agent's pid")?;
    node.wait_applied(Duration::from_secs(60))
        .context("the agent's first (empty) apply")?;
    // The same priority as the traffic workloads' processes, so other work
    // on the machine slows the apply as little as it slows them. Threads
    // the agent starts later inherit it from the thread starting them.
    for entry in std::fs::read_dir(format!("/proc/{pid}/task"))? {
        let tid: i32 = entry?.file_name().to_string_lossy().parse()?;
        crate::set_nice(nix::unistd::Pid::from_raw(tid), nice)?;
    }

    let yaml = pods_yaml(&pod_entries(&set));
    let empty_yaml = pods_yaml(&[]);
    let mut rng = Rng::seeded();
    let pause = |rng: &mut Rng| Duration::from_millis(rng.below(reload_ms.max(1)));
    let (mut wall, mut apply, mut rwall, mut rapply) = (vec![], vec![], vec![], vec![]);
    let mut rss = 0;
    for rep in 0..reps {
        if interrupted.load(Ordering::Relaxed) {
            bail!("interrupted");
        }
        std::thread::sleep(pause(&mut rng));
        node.mark();
        // The clock starts before the write: taken after it, a preemption
        // of this thread while the agent already applies would hide time.
        let t0 = Instant::now();
        node.write_pods_raw(&yaml);
        let (ms, seen) = node.wait_applied(APPLY_TIMEOUT)?;
        wall.push(seen.duration_since(t0).as_secs_f64() * 1e3);
        apply.push(ms as f64);
        rss = rss.max(rss_kib(pid).0);
        let status = node.try_status()?;
        let captured = fully_captured(&status);
        ensure!(
            captured == pods,
            "after the apply, weir status shows {captured} of {pods} pods captured"
        );
        eprintln!(
            "weir-bench: enrollment {}/{reps}: {pods} pods captured {:.0} ms after the change \
             (agent apply {ms} ms)",
            rep + 1,
            wall[rep]
        );

        std::thread::sleep(pause(&mut rng));
        node.mark();
        // The clock starts before the write: taken after it, a preemption
        // of this thread while the agent already applies would hide time.
        let t0 = Instant::now();
        node.write_pods_raw(&empty_yaml);
        let (ms, seen) = node.wait_applied(APPLY_TIMEOUT)?;
        rwall.push(seen.duration_since(t0).as_secs_f64() * 1e3);
        rapply.push(ms as f64);
    }
    let (_, hwm) = rss_kib(pid);
    let bpf = bpf_map_kib(pid);
    drop(node);
    let empty = Summary::default();
    Ok(EnrollResult {
        pods,
        netns_create_s,
        reload_ms,
        enroll_wall_ms: Summary::of(&wall).unwrap_or_else(|| empty.clone()),
        enroll_apply_ms: Summary::of(&apply).unwrap_or_else(|| empty.clone()),
        remove_wall_ms: Summary::of(&rwall).unwrap_or_else(|| empty.clone()),
        remove_apply_ms: Summary::of(&rapply).unwrap_or(empty),
        rss_kib: rss,
        hwm_kib: hwm,
        bpf_map_kib: bpf,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pod_addresses_are_distinct_benchmark_addresses() {
        let ips: std::collections::BTreeSet<_> = (0..1000).map(pod_ip).collect();
        assert_eq!(ips.len(), 1000);
        assert_eq!(pod_ip(0), Ipv4Addr::new(198, 18, 128, 1));
        assert_eq!(pod_ip(999), Ipv4Addr::new(198, 18, 131, 232));
    }
}
