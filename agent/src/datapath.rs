//! Loading weir's kernel programs, pinning them, and writing the maps.
//!
//! Layout under the bpffs (`--bpffs`, default `/sys/fs/bpf`):
//!
//! ```text
//! <bpffs>/weir/maps/<MAP>                      every map, reused on restart
//! <bpffs>/weir/links/cgroup-<cgid>-<program>   cgroup attachments
//! <bpffs>/weir/links/netns-<cookie>            per-pod sk_lookup attachments
//! ```
//!
//! Links are pinned, so capture goes on while the agent is down; a new agent
//! swaps its freshly loaded programs into the existing links
//! (`BPF_LINK_UPDATE`, atomic) instead of attaching a second copy.
//!
//! The fast path's `sk_msg` program (only with `--fast-path`) is attached
//! to the pinned `FAST_SOCKS` map itself, which keeps it: it too outlives
//! the agent, and a new agent's program replaces it.

use std::collections::BTreeSet;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use aya::maps::{Array, HashMap, MapData, PerCpuArray, PerCpuHashMap, PerCpuValues, SockHash};
use aya::programs::links::FdLink;
use aya::programs::{SchedClassifier, SkLookup, SkMsg};
use aya::{Ebpf, EbpfLoader};
use aya_obj::generated::bpf_attach_type::{
    BPF_CGROUP_GETSOCKOPT, BPF_CGROUP_INET4_CONNECT, BPF_CGROUP_INET4_GETPEERNAME,
    BPF_CGROUP_INET6_CONNECT, BPF_CGROUP_INET6_GETPEERNAME, BPF_CGROUP_SOCK_OPS,
    BPF_CGROUP_UDP4_RECVMSG, BPF_CGROUP_UDP4_SENDMSG, BPF_CGROUP_UDP6_RECVMSG,
    BPF_CGROUP_UDP6_SENDMSG, BPF_TCX_EGRESS, BPF_TCX_INGRESS,
};
use log::{debug, info, warn};
use weir_common::schema::{self, Sizing};
use weir_common::*;

use crate::pod_tables::{PodEntries, PodMaps};
use crate::policy::PodRules;
use crate::sys;

/// The kernel object, built by `cargo xtask build-ebpf` and embedded here
/// (`build.rs` says from where; empty when the agent was built without it).
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(env!("WEIR_EBPF_OBJECT_PATH"));

/// The embedded kernel object, or an error saying how to build a `weir`
/// that has one.
pub fn kernel_object() -> Result<&'static [u8]> {
    anyhow::ensure!(
        !EBPF_OBJECT.is_empty(),
        "this weir binary was built without its kernel object (WEIR_EBPF_OBJECT was not \
         set when it was compiled, e.g. by a plain `cargo build`); build it with \
         `cargo xtask build`"
    );
    Ok(EBPF_OBJECT)
}

/// Every map of the object, all pinned under `weir/maps/`
/// (`weir_common::schema` declares them).
pub fn map_names() -> impl Iterator<Item = &'static str> {
    schema::maps().map(|m| m.name)
}

/// The tc programs of virtual interfaces, with their TCX attach types
/// (`BPF_TCX_INGRESS`, `BPF_TCX_EGRESS`) and pin suffixes.
const VIRT_PROGRAMS: &[(&str, u32, &str)] = &[
    ("weir_virt_in", BPF_TCX_INGRESS as u32, "in"),
    ("weir_virt_out", BPF_TCX_EGRESS as u32, "out"),
];

/// Programs attached to the cgroup.
/// (name, `enum bpf_attach_type`)
const CGROUP_PROGRAMS: &[(&str, u32)] = &[
    ("weir_connect4", BPF_CGROUP_INET4_CONNECT as u32),
    ("weir_connect6", BPF_CGROUP_INET6_CONNECT as u32),
    ("weir_getpeer4", BPF_CGROUP_INET4_GETPEERNAME as u32),
    ("weir_getpeer6", BPF_CGROUP_INET6_GETPEERNAME as u32),
    ("weir_sendmsg4", BPF_CGROUP_UDP4_SENDMSG as u32),
    ("weir_sendmsg6", BPF_CGROUP_UDP6_SENDMSG as u32),
    ("weir_recvmsg4", BPF_CGROUP_UDP4_RECVMSG as u32),
    ("weir_recvmsg6", BPF_CGROUP_UDP6_RECVMSG as u32),
    ("weir_sockops", BPF_CGROUP_SOCK_OPS as u32),
    ("weir_getsockopt", BPF_CGROUP_GETSOCKOPT as u32),
];

/// The sk_lookup program, attached to each pod's network namespace.
const SK_LOOKUP: &str = "weir_sk_lookup";

/// The fast path's sk_msg program, attached to `FAST_SOCKS`.
const FAST_REDIRECT: &str = "weir_fast_redirect";

/// Where weir keeps its pins.
#[derive(Clone, Debug)]
pub struct Pins {
    /// `<bpffs>/weir`.
    pub root: PathBuf,
}

impl Pins {
    /// Pins under `<bpffs>/weir`.
    pub fn new(bpffs: &Path) -> Self {
        Self {
            root: bpffs.join("weir"),
        }
    }
    /// `<root>/maps`.
    pub fn maps(&self) -> PathBuf {
        self.root.join("maps")
    }
    /// `<root>/links`.
    pub fn links(&self) -> PathBuf {
        self.root.join("links")
    }
    /// Pins of the tc links on one virtual interface of a pod start with
    /// this (then `<ifindex>-in` / `-out`).
    pub fn virt_prefix(cookie: u64) -> String {
        format!("virt-{cookie}-")
    }

    /// Pin of a pod's sk_lookup link.
    pub fn netns_link(&self, cookie: u64) -> PathBuf {
        self.links().join(format!("netns-{cookie}"))
    }

    /// Opens the pinned map `name` (for `weir status` / `explain`), with
    /// an error that says what to check.
    pub fn open_map(&self, name: &str) -> Result<MapData> {
        let p = self.maps().join(name);
        MapData::from_pin(&p).with_context(|| {
            format!(
                "cannot open {} (is weir installed on this node, and --bpffs right?)",
                p.display()
            )
        })
    }
}

/// A pod's namespace and name from its `POD_META` entry (NUL-padded).
pub fn pod_meta_names(m: &PodMeta) -> (String, String) {
    fn text(b: &[u8]) -> String {
        let end = b.iter().position(|c| *c == 0).unwrap_or(b.len());
        String::from_utf8_lossy(&b[..end]).into_owned()
    }
    (text(&m.namespace), text(&m.name))
}

/// Makes sure `bpffs` is a bpffs mount (mounting one if nothing is there).
pub fn ensure_bpffs(bpffs: &Path) -> Result<()> {
    if sys::is_bpffs(bpffs) {
        return Ok(());
    }
    info!("no bpffs at {}: mounting one", bpffs.display());
    sys::mount_bpffs(bpffs).with_context(|| {
        format!(
            "--bpffs {}: not a bpffs and mounting one failed; mount it (mount -t bpf bpf {0}) or point --bpffs at one",
            bpffs.display()
        )
    })
}

/// Map capacities (set at first load; pinned maps keep theirs).
///
/// Only the bucket arrays of hash maps (16 bytes a slot), the LRU maps
/// and the socket maps' buckets cost kernel memory up front; hash map
/// entries and LPM trie nodes are allocated when inserted. So these are
/// limits sized from the node's pod capacity ([`Capacities::for_pods`]),
/// not reservations.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Capacities {
    /// Pods per node.
    pub pods: u32,
    /// Redirected connections, from connect() until the proxy's socket
    /// closes (an LRU map: preallocated).
    pub pending_flows: u32,
    /// Port entries over all pods.
    pub port_rules: u32,
    /// CIDR entries over all pods, per list (LPM tries: nothing up front).
    pub cidrs: u32,
    /// Sockets on the fast path at once (two per local connection); the
    /// map is this large only while the fast path is on.
    pub fast_sockets: u32,
    /// Entries of `VIRT_FLOWS` (two per connection rerouted from a
    /// virtual interface; an LRU map, created when a pod first needs it).
    pub virt_flows: u32,
}

impl Capacities {
    /// Pods per node when neither `--max-pods` nor the Kubernetes node's
    /// `status.capacity.pods` says (Kubernetes' default is 110; managed
    /// clusters go up to 250).
    pub const DEFAULT_PODS: u32 = 256;

    /// The capacities of a node that runs at most `pods` pods.
    pub fn for_pods(pods: u32) -> Self {
        Self {
            pods,
            // One entry per open redirected connection (an LRU map: when
            // full, the least recently used go first): 32 a pod.
            pending_flows: pods.saturating_mul(32).max(4096),
            // 64 ports a pod (lists of inbound/outbound ports), at least
            // room for one pod with thousands.
            port_rules: pods.saturating_mul(64).max(8192),
            // LPM tries cost nothing until used: a plain limit.
            cidrs: 262_144,
            fast_sockets: pods.saturating_mul(64).max(1024),
            virt_flows: 32768,
        }
    }
}

impl Default for Capacities {
    fn default() -> Self {
        Self::for_pods(Self::DEFAULT_PODS)
    }
}

/// The loaded programs and open maps.
pub struct Datapath {
    ebpf: Ebpf,
    pins: Pins,
    pod_policy: HashMap<MapData, u64, PodPolicy>,
    /// The per-pod tables (`weir_common::pod_tables!`).
    tables: PodMaps,
    /// `LISTEN_PORTS`, a bitmap of the capture ports.
    listen_ports: Array<MapData, u64>,
    /// What this agent last wrote to `LISTEN_PORTS` (read back at load:
    /// the agent is its only writer).
    listen_bits: Vec<u64>,
    listeners: aya::maps::SockHash<MapData, ListenerKey>,
    pod_counters: PerCpuHashMap<MapData, u64, PodCounters>,
    node_counters: PerCpuArray<MapData, NodeCounters>,
    pod_meta: HashMap<MapData, u64, PodMeta>,
    weir_meta: Array<MapData, WeirMeta>,
    log_level: Array<MapData, u32>,
    fast_path: Array<MapData, u32>,
    fast_socks: SockHash<MapData, FastKey>,
    capacities: Capacities,
    logger: Option<aya_log::EbpfLogger<&'static dyn log::Log>>,
}

fn take<T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>>(
    ebpf: &mut Ebpf,
    name: &str,
) -> Result<T> {
    let map = ebpf
        .take_map(name)
        .with_context(|| format!("map {name} missing from the kernel object"))?;
    T::try_from(map).with_context(|| format!("map {name} has an unexpected type"))
}

impl Datapath {
    /// Loads the programs (reusing pinned maps), and attaches the cgroup
    /// programs to `cgroup` (reusing pinned links). With `fast_path`, also
    /// loads the fast path's `sk_msg` program, attaches it to `FAST_SOCKS`
    /// and turns the fast path on; without, turns it off for new
    /// connections (connections already on it stay on it until they close).
    pub fn load(
        bpffs: &Path,
        cgroup: &Path,
        capacities: &Capacities,
        fast_path: bool,
    ) -> Result<Self> {
        ensure_bpffs(bpffs)?;
        let pins = Pins::new(bpffs);
        for dir in [pins.maps(), pins.links()] {
            std::fs::create_dir_all(&dir).with_context(|| {
                format!("cannot create {} (is --bpffs writable?)", dir.display())
            })?;
        }
        if fast_path {
            grow_fast_socks(&pins, capacities.fast_sockets)?;
        }
        let mut loader = EbpfLoader::new();
        let map_paths = map_paths(&pins);
        configure_loader(&mut loader, &map_paths, capacities, Some(fast_path));
        // Refuse pinned maps of another layout *before* the loader reuses
        // them: a program verified against a map of another value size
        // would be refused with a confusing verifier error, or misread.
        check_pinned_layout(&pins, bpffs)?;
        let mut ebpf = loader.load(kernel_object()?).context(
            "loading weir's kernel object failed (needs Linux >= 5.15 with BTF, root or CAP_BPF+CAP_NET_ADMIN; \
             if pinned maps from another weir version exist, run `weir uninstall` first)",
        )?;

        let mut weir_meta: Array<MapData, WeirMeta> = take(&mut ebpf, "WEIR_META")?;
        let meta = weir_meta.get(&0, 0).context("reading WEIR_META")?;
        if meta.layout_version != 0 && meta.layout_version != LAYOUT_VERSION {
            bail!(
                "the maps pinned under {} were written by a weir with map layout v{} (this weir: v{}); \
                 they cannot be reused safely: run `weir uninstall --bpffs {}` (capture stops until this agent starts)",
                pins.maps().display(),
                meta.layout_version,
                LAYOUT_VERSION,
                bpffs.display()
            );
        }
        weir_meta
            .set(
                0,
                WeirMeta {
                    layout_version: LAYOUT_VERSION,
                    ready: meta.ready,
                },
                0,
            )
            .context("writing WEIR_META")?;

        // Kernel log records (aya-log); a failure here costs logs, not
        // capture.
        let logger = match aya_log::EbpfLogger::init(&mut ebpf) {
            Ok(l) => Some(l),
            Err(e) => {
                warn!("kernel logging unavailable: {e}");
                None
            }
        };
        let mut dp = Self {
            log_level: take(&mut ebpf, "LOG_LEVEL")?,
            fast_path: take(&mut ebpf, "FAST_PATH")?,
            fast_socks: take(&mut ebpf, "FAST_SOCKS")?,
            capacities: capacities.clone(),
            logger,
            pod_policy: take(&mut ebpf, "POD_POLICY")?,
            tables: PodMaps::take(&mut ebpf)?,
            listen_ports: take(&mut ebpf, "LISTEN_PORTS")?,
            listen_bits: Vec::new(),
            listeners: take(&mut ebpf, "LISTENERS")?,
            pod_counters: take(&mut ebpf, "POD_COUNTERS")?,
            node_counters: take(&mut ebpf, "NODE_COUNTERS")?,
            pod_meta: take(&mut ebpf, "POD_META")?,
            weir_meta,
            ebpf,
            pins,
        };
        dp.read_listen_bits();
        let prog: &mut SkLookup = dp
            .ebpf
            .program_mut(SK_LOOKUP)
            .context("sk_lookup program missing")?
            .try_into()?;
        prog.load()
            .context("the kernel refused program weir_sk_lookup")?;
        if fast_path {
            dp.attach_fast_path()?;
        } else {
            dp.fast_path
                .set(0, 0, 0)
                .context("writing FAST_PATH (off)")?;
        }
        dp.attach_cgroup(cgroup)?;
        Ok(dp)
    }

    /// Loads `weir_fast_redirect`, attaches it to `FAST_SOCKS` and only
    /// then turns the switch on: a socket added to the map before its
    /// program is attached would never run it.
    fn attach_fast_path(&mut self) -> Result<()> {
        let prog: &mut SkMsg = self
            .ebpf
            .program_mut(FAST_REDIRECT)
            .context("sk_msg program missing from the kernel object")?
            .try_into()?;
        prog.load()
            .context("the kernel refused program weir_fast_redirect (--fast-path)")?;
        // BPF_PROG_ATTACH to the map replaces the program a previous agent
        // attached, if any; sockets already in the map keep the program
        // they joined with until they close.
        let id = prog
            .attach(self.fast_socks.fd())
            .context("attaching weir_fast_redirect to FAST_SOCKS")?;
        let link = prog.take_link(id)?;
        // The map holds the attachment; dropping the link would detach the
        // program when the agent exits, and the fast path, like capture,
        // must go on while the agent is down or restarting.
        std::mem::forget(link);
        self.fast_path
            .set(0, 1, 0)
            .context("writing FAST_PATH (on)")?;
        info!("fast path on: local connections of enrolled pods go socket to socket");
        Ok(())
    }

    fn attach_cgroup(&mut self, cgroup: &Path) -> Result<()> {
        let cg = std::fs::File::open(cgroup).with_context(|| {
            format!(
                "--cgroup {}: cannot open it; pass a cgroup v2 directory",
                cgroup.display()
            )
        })?;
        let cgid = nix::sys::stat::fstat(cg.as_fd())
            .with_context(|| format!("stat {}", cgroup.display()))?
            .st_ino;
        // Load everything before attaching anything: a refused program
        // must not leave half of weir attached.
        for (name, _) in CGROUP_PROGRAMS {
            let program = self
                .ebpf
                .program_mut(name)
                .with_context(|| format!("program {name} missing from the kernel object"))?;
            let loaded = match program {
                aya::programs::Program::CgroupSockAddr(p) => p.load(),
                aya::programs::Program::CgroupSockopt(p) => p.load(),
                aya::programs::Program::SockOps(p) => p.load(),
                _ => bail!("program {name} has an unexpected type"),
            };
            loaded.with_context(|| format!("the kernel refused program {name}"))?;
        }
        for (name, attach_type) in CGROUP_PROGRAMS {
            let pin = self.pins.links().join(format!("cgroup-{cgid}-{name}"));
            let program = self
                .ebpf
                .program(name)
                .with_context(|| format!("program {name} missing from the kernel object"))?;
            let fd = program.fd()?.as_fd();
            // Swap into the existing link (atomic, no gap), or attach anew.
            if update_pinned(&pin, fd)?.is_some() {
                info!(
                    "updated {name} in its pinned link on cgroup {}",
                    cgroup.display()
                );
                continue;
            }
            let link = sys::link_create(fd, cg.as_fd(), *attach_type)
                .with_context(|| format!("attaching {name} to cgroup {}", cgroup.display()))?;
            sys::obj_pin(link.as_fd(), &pin)
                .with_context(|| format!("pinning {}", pin.display()))?;
            info!("attached {name} to cgroup {}", cgroup.display());
        }
        Ok(())
    }

    /// Attaches (or updates) the sk_lookup program in a pod's netns.
    pub fn attach_netns(&mut self, cookie: u64, netns: &Path) -> Result<()> {
        let pin = self.pins.netns_link(cookie);
        let prog: &mut SkLookup = self
            .ebpf
            .program_mut(SK_LOOKUP)
            .context("sk_lookup program missing")?
            .try_into()?;
        if update_pinned(&pin, prog.fd()?.as_fd())?.is_some() {
            return Ok(());
        }
        let ns = std::fs::File::open(netns)
            .with_context(|| format!("opening netns {}", netns.display()))?;
        let id = prog
            .attach(&ns)
            .context("attaching weir_sk_lookup to the pod's netns")?;
        let link: FdLink = prog.take_link(id)?.into();
        link.pin(&pin)
            .with_context(|| format!("pinning {}", pin.display()))?;
        Ok(())
    }

    /// Detaches the sk_lookup program from a pod's netns, and the tc
    /// programs from its virtual interfaces.
    pub fn detach_netns(&mut self, cookie: u64) {
        remove_pin(&self.pins.netns_link(cookie));
        for (_, pin) in self.virt_pins(&Pins::virt_prefix(cookie)) {
            remove_pin(&pin);
        }
    }

    /// Keeps weir's tc programs on exactly the virtual interfaces
    /// `ifindexes` of a pod (`reroute-virtual-interfaces`): attaches them
    /// (TCX, ingress and egress, pinned) where missing, swaps the program
    /// in where a pin exists, and removes the pins of interfaces no longer
    /// listed or gone. Returns the problems, one per interface.
    pub fn sync_virt_links(
        &mut self,
        cookie: u64,
        netns: &Path,
        ifindexes: &BTreeSet<u32>,
    ) -> Vec<String> {
        let prefix = Pins::virt_prefix(cookie);
        let mut problems = Vec::new();
        // Pins of interfaces no longer wanted.
        for (ifindex, pin) in self.virt_pins(&prefix) {
            if !ifindexes.contains(&ifindex) {
                remove_pin(&pin);
            }
        }
        if ifindexes.is_empty() {
            return problems;
        }
        // This pod's own copy of the two programs (see VIRT_NETNS_COOKIE
        // in the kernel code); the pinned links keep them alive.
        let mut obj = match self.load_virt_programs(cookie) {
            Ok(o) => o,
            Err(e) => {
                problems.push(format!("{e:#}"));
                return problems;
            }
        };
        for ifindex in ifindexes {
            for (name, attach_type, dir) in VIRT_PROGRAMS {
                let pin = self.pins.links().join(format!("{prefix}{ifindex}-{dir}"));
                let attached = virt_program_fd(&mut obj, name).and_then(|fd| {
                    attach_virt(name, fd.as_fd(), *attach_type, &pin, netns, *ifindex)
                });
                if let Err(e) = attached {
                    problems.push(format!("interface {ifindex} ({dir}): {e:#}"));
                }
            }
        }
        problems
    }

    /// Loads the tc programs of virtual interfaces for the pod `cookie`,
    /// sharing the pinned maps.
    fn load_virt_programs(&self, cookie: u64) -> Result<Ebpf> {
        let paths = map_paths(&self.pins);
        let mut loader = EbpfLoader::new();
        configure_loader(&mut loader, &paths, &self.capacities, None);
        loader.override_global("VIRT_NETNS_COOKIE", &cookie, true);
        let mut obj = loader
            .load(kernel_object()?)
            .context("loading weir's kernel object for the pod's virtual interfaces")?;
        for (name, _, _) in VIRT_PROGRAMS {
            let prog: &mut SchedClassifier = obj
                .program_mut(name)
                .with_context(|| format!("program {name} missing"))?
                .try_into()?;
            prog.load()
                .with_context(|| format!("the kernel refused program {name}"))?;
        }
        Ok(obj)
    }

    /// (interface index, pin) of the virtual-interface pins starting with
    /// `prefix`.
    fn virt_pins(&self, prefix: &str) -> Vec<(u32, PathBuf)> {
        let Ok(rd) = std::fs::read_dir(self.pins.links()) else {
            return Vec::new();
        };
        rd.filter_map(|e| e.ok())
            .filter_map(|e| {
                let name = e.file_name().to_str()?.to_string();
                let rest = name.strip_prefix(prefix)?;
                let ifindex = rest.split('-').next()?.parse().ok()?;
                Some((ifindex, e.path()))
            })
            .collect()
    }

    /// Cookies of the pods that have a pinned sk_lookup link.
    pub fn pinned_netns_links(&self) -> Vec<u64> {
        let Ok(rd) = std::fs::read_dir(self.pins.links()) else {
            return Vec::new();
        };
        rd.filter_map(|e| e.ok())
            .filter_map(|e| e.file_name().to_str()?.strip_prefix("netns-")?.parse().ok())
            .collect()
    }

    /// Cookies present in `POD_POLICY` (pods enrolled by any agent).
    pub fn enrolled_cookies(&self) -> Vec<u64> {
        self.pod_policy.keys().filter_map(|k| k.ok()).collect()
    }

    /// Writes (or rewrites) one pod's entries. New entries are inserted
    /// before stale ones are removed, and the policy is written last on
    /// enrollment and first on update, so no connection sees a half state.
    pub fn write_pod(
        &mut self,
        cookie: u64,
        pod_id: u32,
        meta: &PodMeta,
        rules: &PodRules,
        old: Option<&PodEntries>,
    ) -> Result<PodEntries> {
        let new = rules.entries(cookie);
        let mut policy = rules.policy;
        policy.pod_id = pod_id;
        new.describe_in(&mut policy);
        for &p in &rules.listen_ports {
            let (word, bit) = listen_port_bit(p);
            let want = self.listen_bits[word as usize] | bit;
            self.set_listen_word(word, want)?;
        }
        if self.pod_counters.get(&cookie, 0).is_err() {
            let zero = PerCpuValues::try_from(vec![
                PodCounters::default();
                aya::util::nr_cpus().map_err(|(_, e)| e)?
            ])?;
            self.pod_counters
                .insert(cookie, zero, 0)
                .context("POD_COUNTERS full (raise --max-pods)")?;
        }
        self.pod_meta
            .insert(cookie, meta, 0)
            .context("POD_META full")?;
        self.tables.write(&new)?;
        self.pod_policy
            .insert(cookie, policy, 0)
            .context("POD_POLICY full (raise --max-pods)")?;
        if let Some(old) = old {
            self.remove_stale(old, &new);
        }
        Ok(new)
    }

    fn remove_stale(&mut self, old: &PodEntries, new: &PodEntries) {
        self.tables.remove_stale(old, new);
    }

    /// Removes every entry of a pod. The policy goes first, so the
    /// programs stop capturing before the tables disappear.
    pub fn remove_pod(&mut self, cookie: u64, old: &PodEntries) {
        let _ = self.pod_policy.remove(&cookie);
        self.remove_stale(old, &PodEntries::default());
        let _ = self.pod_meta.remove(&cookie);
        let _ = self.pod_counters.remove(&cookie);
        self.detach_netns(cookie);
    }

    /// Removes every trace of a pod known only by its cookie (left over by
    /// an earlier agent): scans the keyed maps for that cookie.
    pub fn purge_cookie(&mut self, cookie: u64) {
        let _ = self.pod_policy.remove(&cookie);
        self.tables.purge(cookie);
        let _ = self.pod_meta.remove(&cookie);
        let _ = self.pod_counters.remove(&cookie);
        self.detach_netns(cookie);
        debug!("purged leftover state of netns cookie {cookie}");
    }

    /// Records listening sockets found in a pod (see `adopt`).
    pub fn record_listeners(&mut self, cookie: u64, found: &[crate::adopt::Found]) -> usize {
        let mut n = 0;
        for f in found {
            let key = ListenerKey {
                netns_cookie: cookie,
                port: f.port,
                family: f.family as u16,
                protocol: if f.udp { LISTENER_UDP } else { LISTENER_TCP },
            };
            match self
                .listeners
                .insert(key, std::os::fd::AsRawFd::as_raw_fd(&f.fd), 0)
            {
                Ok(()) => n += 1,
                Err(e) => warn!(
                    "recording listener :{} of netns cookie {cookie}: {e}",
                    f.port
                ),
            }
        }
        n
    }

    /// Keeps exactly `ports` in `LISTEN_PORTS`.
    pub fn sync_listen_ports(&mut self, ports: &BTreeSet<u16>) {
        let mut bits = vec![0u64; LISTEN_PORT_WORDS as usize];
        for &p in ports {
            let (word, bit) = listen_port_bit(p);
            bits[word as usize] |= bit;
        }
        for (word, want) in (0..LISTEN_PORT_WORDS).zip(bits) {
            if let Err(e) = self.set_listen_word(word, want) {
                warn!("{e:#}");
            }
        }
    }

    /// Sets word `word` of the `LISTEN_PORTS` bitmap to `want` (no write
    /// when it already holds it).
    fn set_listen_word(&mut self, word: u32, want: u64) -> Result<()> {
        let have = &mut self.listen_bits[word as usize];
        if *have != want {
            self.listen_ports
                .set(word, want, 0)
                .context("writing LISTEN_PORTS")?;
            *have = want;
        }
        Ok(())
    }

    /// Reads the `LISTEN_PORTS` bitmap as pinned (an earlier agent may have
    /// written it).
    fn read_listen_bits(&mut self) {
        self.listen_bits = (0..LISTEN_PORT_WORDS)
            .map(|i| self.listen_ports.get(&i, 0).unwrap_or(0))
            .collect();
    }

    /// Entries and capacity of the per-pod maps, for `weir_map_entries`
    /// and `weir_map_capacity` (counting keys costs one syscall per entry;
    /// it runs on scrape only).
    pub fn map_usage(&self) -> Vec<(&'static str, usize, u32)> {
        schema::maps()
            .filter(|m| m.usage)
            .map(|m| {
                let (entries, capacity) =
                    MapData::from_pin(self.pins.maps().join(m.name)).map_or((0, 0), |md| {
                        let capacity = md.info().map(|i| i.max_entries()).unwrap_or(0);
                        let entries = md
                            .info()
                            .and_then(|i| Ok(sys::map_key_count(md.fd().as_fd(), i.key_size())?))
                            .unwrap_or(0);
                        (entries, capacity)
                    });
                (m.name, entries, capacity)
            })
            .collect()
    }

    /// Sets the kernel log level (0 off .. 5 trace).
    pub fn set_kernel_log_level(&mut self, level: u32) -> Result<()> {
        self.log_level.set(0, level, 0).context("writing LOG_LEVEL")
    }

    /// Takes the kernel log reader (to poll it from an async task).
    pub fn take_logger(&mut self) -> Option<aya_log::EbpfLogger<&'static dyn log::Log>> {
        self.logger.take()
    }

    /// Marks the pinned state as reconciled (for `weir status`).
    pub fn set_ready(&mut self, ready: bool) {
        let _ = self.weir_meta.set(
            0,
            WeirMeta {
                layout_version: LAYOUT_VERSION,
                ready: u32::from(ready),
            },
            0,
        );
    }

    /// One pod's counters summed over CPUs.
    pub fn pod_counters(&self, cookie: u64) -> Option<PodCounters> {
        let v = self.pod_counters.get(&cookie, 0).ok()?;
        Some(PodCounters::sum(v.iter()))
    }

    /// Node counters summed over CPUs.
    pub fn node_counters(&self) -> NodeCounters {
        match self.node_counters.get(&0, 0) {
            Ok(v) => NodeCounters::sum(v.iter()),
            Err(_) => NodeCounters::default(),
        }
    }

    /// Whether the fast path is on (the `FAST_PATH` switch).
    pub fn fast_path_on(&self) -> bool {
        self.fast_path.get(&0, 0).is_ok_and(|v| v != 0)
    }
}

/// Kernel log levels, as `LOG_LEVEL` holds them.
#[derive(Copy, Clone, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum KernelLogLevel {
    /// No kernel log records.
    Off = 0,
    /// Errors only.
    Error = 1,
    /// Warnings (e.g. a full map).
    Warn = 2,
    /// Rare events (proxy listeners recorded).
    Info = 3,
    /// Fail-closed refusals and misses.
    Debug = 4,
    /// Every capture decision (hot path; for debugging one pod).
    Trace = 5,
}

/// Sets the kernel log level in the pinned `LOG_LEVEL` map (works while
/// an agent runs).
pub fn set_pinned_log_level(bpffs: &Path, level: KernelLogLevel) -> Result<()> {
    let path = Pins::new(bpffs).maps().join("LOG_LEVEL");
    let md = aya::maps::MapData::from_pin(&path).with_context(|| {
        format!(
            "opening {} (is weir installed, and --bpffs right?)",
            path.display()
        )
    })?;
    let mut m: Array<MapData, u32> = Array::try_from(aya::maps::Map::Array(md))?;
    m.set(0, level as u32, 0).context("writing LOG_LEVEL")
}

/// Fails when `WEIR_META` is pinned with a layout version other than ours.
fn check_pinned_layout(pins: &Pins, bpffs: &Path) -> Result<()> {
    let path = pins.maps().join("WEIR_META");
    if !path.exists() {
        return Ok(());
    }
    let md = aya::maps::MapData::from_pin(&path)
        .with_context(|| format!("opening pinned {}", path.display()))?;
    let meta: Array<MapData, WeirMeta> = Array::try_from(aya::maps::Map::Array(md))
        .with_context(|| format!("{} is not weir's WEIR_META map", path.display()))?;
    let m = meta.get(&0, 0).context("reading pinned WEIR_META")?;
    if m.layout_version != 0 && m.layout_version != LAYOUT_VERSION {
        bail!(
            "the maps pinned under {} were written by a weir with map layout v{} (this weir: v{}); \
             they cannot be reused safely: run `weir uninstall --bpffs {}`, then start this agent \
             (capture stops in between)",
            pins.maps().display(),
            m.layout_version,
            LAYOUT_VERSION,
            bpffs.display()
        );
    }
    Ok(())
}

/// If a link is pinned at `pin`, swaps `prog` into it and returns Some.
fn update_pinned(pin: &Path, prog: std::os::fd::BorrowedFd<'_>) -> Result<Option<()>> {
    match sys::obj_get(pin) {
        Ok(link) => {
            sys::link_update(link.as_fd(), prog)
                .with_context(|| format!("BPF_LINK_UPDATE on {}", pin.display()))?;
            Ok(Some(()))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("opening pinned link {}", pin.display())),
    }
}

/// Every map's pin path.
fn map_paths(pins: &Pins) -> Vec<(&'static str, PathBuf)> {
    map_names().map(|n| (n, pins.maps().join(n))).collect()
}

/// Points `loader` at the pinned maps and sets the capacities of maps it
/// creates. `fast_path` is `Some(on)` for the agent's own object, whose
/// `FAST_SOCKS` is as large as `--max-fast-sockets` only with the fast
/// path on, and whose `VIRT_FLOWS` is a private one-entry stand-in (its
/// programs never use it); `None` for the per-pod objects of virtual
/// interfaces, which create the pinned `VIRT_FLOWS` when the first pod
/// needs it.
fn configure_loader<'a>(
    loader: &mut EbpfLoader<'a>,
    map_paths: &'a [(&'static str, PathBuf)],
    capacities: &Capacities,
    fast_path: Option<bool>,
) {
    let main_object = fast_path.is_some();
    for (name, path) in map_paths {
        if main_object && *name == "VIRT_FLOWS" {
            continue;
        }
        loader.map_pin_path(name, path.as_path());
    }
    for m in schema::maps() {
        let size = match m.sizing {
            Sizing::Object => continue,
            Sizing::PerPod(n) => capacities.pods.saturating_mul(n),
            Sizing::Fixed(n) => n,
            Sizing::PortRules => capacities.port_rules,
            Sizing::Cidrs => capacities.cidrs,
            Sizing::PendingFlows => capacities.pending_flows,
            Sizing::FastSockets => match fast_path {
                Some(false) => FAST_SOCKS_OFF,
                _ => capacities.fast_sockets,
            },
            Sizing::VirtFlows if main_object => 1,
            Sizing::VirtFlows => capacities.virt_flows,
        };
        loader.map_max_entries(m.name, size);
    }
}

/// Capacity of `FAST_SOCKS` created while the fast path is off (the
/// kernel wants at least one slot; nothing joins it).
const FAST_SOCKS_OFF: u32 = 2;

/// Before a load with the fast path on: a pinned `FAST_SOCKS` smaller
/// than `want` (made while the fast path was off) is unpinned so the load
/// creates a full-size one, if it holds no socket. One that holds sockets
/// is kept (taking them out would cut their connections' bytes in
/// flight); the fast path then has its smaller capacity until `weir
/// uninstall`, and sockets beyond it use TCP.
fn grow_fast_socks(pins: &Pins, want: u32) -> Result<()> {
    let path = pins.maps().join("FAST_SOCKS");
    if !path.exists() {
        return Ok(());
    }
    let md = MapData::from_pin(&path).with_context(|| format!("opening {}", path.display()))?;
    let have = md.info().map(|i| i.max_entries()).unwrap_or(want);
    if have >= want {
        return Ok(());
    }
    let map: SockHash<MapData, FastKey> = SockHash::try_from(aya::maps::Map::SockHash(md))
        .with_context(|| format!("{} is not weir's FAST_SOCKS map", path.display()))?;
    if map.keys().next().is_some() {
        warn!(
            "FAST_SOCKS holds sockets and has {have} slots (fewer than --max-fast-sockets {want}): \
             kept; run `weir uninstall` to resize it"
        );
        return Ok(());
    }
    info!("FAST_SOCKS made while the fast path was off ({have} slots): replaced by one of {want}");
    remove_pin(&path);
    Ok(())
}

/// The fd of a loaded tc program of `obj`.
fn virt_program_fd(obj: &mut Ebpf, name: &str) -> Result<std::os::fd::OwnedFd> {
    let prog: &mut SchedClassifier = obj
        .program_mut(name)
        .with_context(|| format!("program {name} missing"))?
        .try_into()?;
    Ok(prog.fd()?.as_fd().try_clone_to_owned()?)
}

/// Attaches `prog` (TCX, `attach_type`) to interface `ifindex` of the
/// pod's netns and pins the link at `pin`, or swaps it into the link
/// pinned there.
fn attach_virt(
    name: &str,
    prog: std::os::fd::BorrowedFd<'_>,
    attach_type: u32,
    pin: &Path,
    netns: &Path,
    ifindex: u32,
) -> Result<()> {
    match update_pinned(pin, prog) {
        Ok(Some(())) => return Ok(()),
        Ok(None) => {}
        Err(e) => {
            // A link whose interface went away cannot be updated:
            // replace it.
            debug!("{e:#}; attaching anew");
            remove_pin(pin);
        }
    }
    let ns =
        std::fs::File::open(netns).with_context(|| format!("opening netns {}", netns.display()))?;
    let link = sys::in_netns(ns.as_fd(), || {
        sys::link_create_tcx(prog, ifindex, attach_type)
    })
    .with_context(|| format!("attaching {name} (TCX) to interface {ifindex} in the pod"))?;
    sys::obj_pin(link.as_fd(), pin).with_context(|| format!("pinning {}", pin.display()))?;
    Ok(())
}

/// Removes one pin (a missing pin is fine).
fn remove_pin(pin: &Path) {
    if let Err(e) = std::fs::remove_file(pin)
        && e.kind() != std::io::ErrorKind::NotFound
    {
        warn!("removing {}: {e}", pin.display());
    }
}

/// Removes every pin weir made under `<bpffs>/weir` (detaching every
/// program whose last reference was a pin). Returns what was removed.
pub fn uninstall(bpffs: &Path) -> Result<Vec<PathBuf>> {
    let pins = Pins::new(bpffs);
    let mut removed = Vec::new();
    for dir in [pins.links(), pins.maps()] {
        let Ok(rd) = std::fs::read_dir(&dir) else {
            continue;
        };
        for e in rd.filter_map(|e| e.ok()) {
            std::fs::remove_file(e.path())
                .with_context(|| format!("removing {}", e.path().display()))?;
            removed.push(e.path());
        }
        let _ = std::fs::remove_dir(&dir);
    }
    let _ = std::fs::remove_dir(&pins.root);
    Ok(removed)
}
