//! Kernel memory: weir's BPF maps next to iptables' rules, for nodes of
//! 10, 110 and 1,000 pods.
//!
//! For each size the same set of pod network namespaces (only `lo`, as in
//! the enrollment benchmark) is made once, then:
//!
//! - **weir**: a `weir run` agent sized for the node (`--max-pods`: the
//!   node's pod capacity, Kubernetes' default 110, or the pod count when
//!   larger) enrolls every pod from a pods file. Measured: the sum of
//!   `memlock` over the BPF maps the agent holds (`/proc/PID/fdinfo`, the
//!   kernel's own per-map figure, which counts what a map has allocated:
//!   preallocated maps in full, the others entry by entry), and the kernel
//!   memory charged to the agent's own memory cgroup (maps, programs and
//!   the agent's kernel objects).
//! - **iptables**: Istio's rules (`istio-iptables` for a plain pod, the
//!   same generator as the traffic benchmark's iptables node) are written
//!   into every pod with `iptables-restore`, each run inside one memory
//!   cgroup made for the purpose. Measured: the kernel memory charged to
//!   that cgroup (nf_tables objects are charged to the memory cgroup of
//!   the process that creates them, and stay charged after it exits).
//!
//! Kernel memory of a memory cgroup is `memory.kmem.usage_in_bytes` on a
//! cgroup v1 memory hierarchy and the `kernel` line of `memory.stat` on
//! cgroup v2. Connections add to both sides: conntrack keeps one entry per
//! connection (from the `nf_conntrack` line of `/proc/slabinfo`, its
//! object size is reported), weir a small storage on each of the two
//! sockets of a redirected connection (freed with the socket), and nothing
//! in its maps once the handshake is over.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use serde::Serialize;
use weir_tests::TempDir;
use weir_tests::istio_iptables::{Family, IstioPod};
use weir_tests::node::{Node, fully_captured};

use crate::enroll::{self, NetnsSet};

/// Pod counts measured.
pub const POD_COUNTS: [usize; 3] = [10, 110, 1000];

/// Kubernetes' default pod capacity of a node (kubelet `maxPods`).
pub const NODE_CAPACITY: usize = 110;

/// One node size.
#[derive(Debug, Serialize, Clone)]
pub struct MemoryRow {
    /// Pods enrolled / with rules.
    pub pods: usize,
    /// The agent's `--max-pods`.
    pub max_pods: usize,
    /// Sum of `memlock` of the agent's BPF maps, bytes.
    pub weir_maps_bytes: u64,
    /// Kernel memory charged to the agent's memory cgroup, bytes.
    pub weir_kmem_bytes: u64,
    /// Kernel memory charged by writing Istio's rules into every pod,
    /// bytes.
    pub iptables_kmem_bytes: u64,
    /// iptables rules written over all pods.
    pub iptables_rules: usize,
    /// `memlock` per map (name -> bytes).
    pub weir_maps: BTreeMap<String, u64>,
}

/// What the memory benchmark measured.
#[derive(Debug, Serialize, Clone)]
pub struct MemoryResult {
    /// One row per node size.
    pub rows: Vec<MemoryRow>,
    /// Size of one conntrack entry (`nf_conntrack` in /proc/slabinfo),
    /// bytes, if the module is loaded.
    pub conntrack_entry_bytes: Option<u64>,
    /// How kernel memory of a cgroup was read.
    pub kmem_source: String,
}

/// A memory cgroup made for one measurement; its kernel memory counter.
struct KmemCgroup {
    path: PathBuf,
    v1: bool,
}

impl KmemCgroup {
    /// A new memory cgroup: on the cgroup v1 memory hierarchy when the
    /// machine has one (hybrid systems), else on cgroup v2 with the
    /// memory controller.
    fn new(prefix: &str) -> Result<KmemCgroup> {
        let mounts = std::fs::read_to_string("/proc/self/mounts")?;
        let v1 = mounts.lines().find_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() > 3 && f[2] == "cgroup" && f[3].split(',').any(|o| o == "memory"))
                .then(|| PathBuf::from(f[1]))
        });
        let (parent, v1) = match v1 {
            Some(p) => (p, true),
            None => (weir_tests::cgroup2_mount().to_path_buf(), false),
        };
        let path = parent.join(format!("weir-bench-{}", weir_tests::unique_name(prefix)));
        std::fs::create_dir(&path).with_context(|| format!("creating {}", path.display()))?;
        let cg = KmemCgroup { path, v1 };
        if !v1 {
            let controllers =
                std::fs::read_to_string(cg.path.join("cgroup.controllers")).unwrap_or_default();
            ensure!(
                controllers.split_whitespace().any(|c| c == "memory"),
                "cgroup v2 without the memory controller for {} (enable +memory in the parent's \
                 cgroup.subtree_control): cannot measure kernel memory",
                cg.path.display()
            );
        }
        Ok(cg)
    }

    /// Kernel memory charged to the cgroup, bytes.
    fn kernel_bytes(&self) -> Result<u64> {
        if self.v1 {
            let f = self.path.join("memory.kmem.usage_in_bytes");
            let t = std::fs::read_to_string(&f).with_context(|| format!("{}", f.display()))?;
            return t.trim().parse().context("memory.kmem.usage_in_bytes");
        }
        let stat = std::fs::read_to_string(self.path.join("memory.stat"))?;
        stat.lines()
            .find_map(|l| l.strip_prefix("kernel "))
            .and_then(|v| v.trim().parse().ok())
            .context("no `kernel` line in memory.stat (Linux >= 5.18)")
    }

    /// `program args...`, started inside this cgroup (a shell moves itself
    /// in, then execs it).
    /// Commands that run a program inside this cgroup (from its first
    /// instruction: the shell moves itself in, then execs it).
    fn launcher(&self) -> impl Fn(&Path) -> Command + Send + Sync + 'static {
        let path = self.path.clone();
        move |program| {
            let mut c = Command::new("sh");
            c.arg("-c")
                .arg(r#"echo $$ > "$0/cgroup.procs" && exec "$@""#)
                .arg(&path)
                .arg(program);
            c
        }
    }

    fn source(&self) -> &'static str {
        if self.v1 {
            "memory.kmem.usage_in_bytes (cgroup v1)"
        } else {
            "memory.stat kernel (cgroup v2)"
        }
    }
}

impl Drop for KmemCgroup {
    fn drop(&mut self) {
        let procs = std::fs::read_to_string(self.path.join("cgroup.procs")).unwrap_or_default();
        for pid in procs.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        for _ in 0..100 {
            if std::fs::remove_dir(&self.path).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// `memlock` of each BPF map `pid` holds, by map name (bpftool's JSON).
fn map_memlock(pid: u32) -> Result<BTreeMap<String, u64>> {
    let mut ids = std::collections::BTreeSet::new();
    for entry in std::fs::read_dir(format!("/proc/{pid}/fdinfo"))?.flatten() {
        let Ok(info) = std::fs::read_to_string(entry.path()) else {
            continue;
        };
        if let Some(id) = info
            .lines()
            .find_map(|l| l.strip_prefix("map_id:"))
            .and_then(|v| v.trim().parse::<u64>().ok())
        {
            ids.insert(id);
        }
    }
    let out = Command::new("bpftool")
        .args(["-j", "map", "show"])
        .output()
        .context("running bpftool (is it installed?)")?;
    ensure!(out.status.success(), "bpftool map show failed");
    let maps: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let mut by_name = BTreeMap::new();
    for m in maps.as_array().into_iter().flatten() {
        let Some(id) = m["id"].as_u64() else { continue };
        if !ids.contains(&id) {
            continue;
        }
        let name = m["name"].as_str().unwrap_or("?").to_string();
        let bytes = m["bytes_memlock"].as_u64().unwrap_or(0);
        *by_name.entry(name).or_insert(0) += bytes;
    }
    Ok(by_name)
}

/// Istio's iptables rules for a plain pod at `ip` (the rules of one pod
/// do not depend on its address).
fn istio_rules(ip: std::net::Ipv4Addr) -> Result<String> {
    let config = IstioPod::new(&[std::net::IpAddr::V4(ip)])
        .capture_config()
        .context("the injector would not capture this pod")?;
    let restore = config
        .restore()
        .map_err(|e| anyhow::anyhow!("istio-iptables would refuse the pod: {e}"))?;
    Ok(restore.get(Family::V4).to_string())
}

/// The object size of `nf_conntrack` in /proc/slabinfo.
fn conntrack_entry_bytes() -> Option<u64> {
    let slab = std::fs::read_to_string("/proc/slabinfo").ok()?;
    slab.lines()
        .find(|l| l.split_whitespace().next() == Some("nf_conntrack"))
        .and_then(|l| l.split_whitespace().nth(3)?.parse().ok())
}

/// weir's figures for the pods of `set`.
fn measure_weir(
    weir: &Path,
    set: &NetnsSet,
    max_pods: usize,
) -> Result<(u64, u64, BTreeMap<String, u64>)> {
    let kmem = KmemCgroup::new("memweir")?;
    let mut node = Node::builder()
        .name("wbmem")
        .weir(weir)
        .metrics(false)
        .agent_args([format!("--max-pods={max_pods}")])
        .agent_launcher(kmem.launcher())
        .build();
    node.spawn_agent();
    let pid = node.agent_pid().context("the agent's pid")?;
    if let Err(e) = node.wait_applied(Duration::from_secs(60)) {
        bail!("the agent's first (empty) apply: {e:#}");
    }
    node.mark();
    node.write_pods_yaml(&enroll::pod_entries(set));
    node.wait_applied(enroll::APPLY_TIMEOUT)?;
    // A pod the first pass could not finish is retried by the next ones:
    // the memory is measured once every pod is captured (or the run
    // fails, saying which pods and why).
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        let status = node.try_status()?;
        if fully_captured(&status) == set.files.len() || Instant::now() > deadline {
            break status;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let captured = fully_captured(&status);
    if captured != set.files.len() {
        let missing: Vec<String> = status["pods"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|p| !weir_tests::node::is_fully_captured(p))
            .take(5)
            .map(|p| p.to_string())
            .collect();
        let problems: Vec<String> = node
            .agent_logs()
            .lines()
            .filter(|l| l.contains("WARN") || l.contains("ERROR"))
            .take(10)
            .map(str::to_string)
            .collect();
        bail!(
            "weir status shows {captured} of {} pods captured 20 s after the apply; not captured (first 5): {missing:?}; the agent's warnings: {problems:?}",
            set.files.len()
        );
    }
    let maps = map_memlock(pid)?;
    let kib = enroll::bpf_map_kib(pid);
    let total: u64 = maps.values().sum();
    ensure!(
        total / 1024 == kib || total.abs_diff(kib * 1024) < 64 * 1024,
        "bpftool ({total} bytes) and fdinfo ({kib} KiB) disagree on the agent's maps"
    );
    let kernel = kmem.kernel_bytes()?;
    drop(node);
    Ok((total, kernel, maps))
}

/// iptables' figures for the pods of `set`: kernel memory charged, and
/// rules written.
fn measure_iptables(set: &NetnsSet) -> Result<(u64, usize, &'static str)> {
    let kmem = KmemCgroup::new("memipt")?;
    let before = kmem.kernel_bytes()?;
    let mut rules = 0;
    for (i, f) in set.files.iter().enumerate() {
        let text = istio_rules(enroll::pod_ip(i))?;
        rules += text.lines().filter(|l| l.starts_with("-A ")).count();
        let mut child = kmem.launcher()(Path::new("nsenter"))
            .arg(format!("--net={}", f.display()))
            .args([Family::V4.restore_command(), "--noflush"])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting nsenter iptables-restore")?;
        child
            .stdin
            .take()
            .context("iptables-restore stdin")?
            .write_all(text.as_bytes())?;
        let out = child.wait_with_output()?;
        if !out.status.success() {
            bail!(
                "iptables-restore in {} failed: {}",
                f.display(),
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
    let after = kmem.kernel_bytes()?;
    Ok((after.saturating_sub(before), rules, kmem.source()))
}

/// Runs the memory benchmark.
pub fn run(weir: &Path, interrupted: &AtomicBool) -> Result<MemoryResult> {
    let mut rows = Vec::new();
    let mut source = "";
    for pods in POD_COUNTS {
        let dir = TempDir::new("memory");
        eprintln!("weir-bench: memory: {pods} pods");
        let set = NetnsSet::create(&dir.join("netns"), pods, interrupted)?;
        let max_pods = pods.max(NODE_CAPACITY);
        let (weir_maps_bytes, weir_kmem_bytes, weir_maps) = measure_weir(weir, &set, max_pods)?;
        let (iptables_kmem_bytes, iptables_rules, s) = measure_iptables(&set)?;
        source = s;
        eprintln!(
            "weir-bench: memory: {pods} pods: weir maps {} KiB (agent kernel memory {} KiB), \
             iptables rules {} KiB",
            weir_maps_bytes / 1024,
            weir_kmem_bytes / 1024,
            iptables_kmem_bytes / 1024
        );
        rows.push(MemoryRow {
            pods,
            max_pods,
            weir_maps_bytes,
            weir_kmem_bytes,
            iptables_kmem_bytes,
            iptables_rules,
            weir_maps,
        });
    }
    Ok(MemoryResult {
        rows,
        conntrack_entry_bytes: conntrack_entry_bytes(),
        kmem_source: source.to_string(),
    })
}
