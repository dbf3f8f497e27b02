//! Keeps the kernel maps in step with the desired pods.
//!
//! The reconciler owns the [`Datapath`]. Each pass takes the full desired
//! set (from the pods file, later from Kubernetes), enrolls new pods,
//! rewrites changed ones, removes gone ones, and purges state left in the
//! pinned maps by an earlier agent for pods that no longer exist. One bad
//! pod (unreadable netns, full map) is logged and skipped; it never stops
//! the others.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;
use std::path::Path;

use anyhow::{Context, Result};
use log::{debug, info, warn};
use weir_common::PodMeta;

use crate::datapath::Datapath;
use crate::pod::PodSpec;
use crate::pod_tables::PodEntries;
use crate::policy::PodRules;

/// A pod weir has written into the maps.
#[derive(Clone, Debug)]
pub struct Enrolled {
    /// The desired spec it was enrolled from.
    pub spec: PodSpec,
    /// Its netns cookie.
    pub cookie: u64,
    /// Its pod number.
    pub pod_id: u32,
    /// Its map entries (to diff on update and to remove).
    pub entries: PodEntries,
}

/// What one pod's pass did.
enum Applied {
    Enrolled,
    Updated,
    Unchanged,
}

/// The reconciler.
pub struct Reconciler {
    /// The kernel side.
    pub dp: Datapath,
    /// Enrolled pods by `namespace/name`.
    pub pods: BTreeMap<String, Enrolled>,
    next_id: u32,
    /// The host's /proc (to find proxies that listened before weir).
    proc_root: std::path::PathBuf,
    /// Processes by netns inode, read once per pass when needed.
    proc_index: Option<BTreeMap<u64, Vec<u32>>>,
    /// Pods the last full pass failed to enroll or update.
    failed: usize,
    /// Per pod (netns cookie), the inodes of the DNS proxy sockets last
    /// recorded in `LISTENERS`: while the proxy keeps them, nothing to do.
    dns_recorded: BTreeMap<u64, BTreeSet<u64>>,
    /// Pods enrolled by `weir inpod-enroll` (ambient), kept in every pass.
    pub inpod: BTreeMap<String, crate::ambient::inpod::InpodPod>,
    /// The node's own addresses (the agent's network namespace), read
    /// once: ambient pods leave connections from them to the application
    /// (kubelet probes; docs/ambient.md).
    node_addrs: Option<Vec<IpAddr>>,
}

fn meta(spec: &PodSpec) -> PodMeta {
    let mut m = PodMeta::default();
    let ns = spec.namespace.as_bytes();
    let name = spec.name.as_bytes();
    let n = ns.len().min(m.namespace.len() - 1);
    m.namespace[..n].copy_from_slice(&ns[..n]);
    let n = name.len().min(m.name.len() - 1);
    m.name[..n].copy_from_slice(&name[..n]);
    m
}

impl Reconciler {
    /// A reconciler over a loaded datapath.
    pub fn new(dp: Datapath) -> Self {
        Self {
            dp,
            pods: BTreeMap::new(),
            next_id: 1,
            proc_root: "/proc".into(),
            proc_index: None,
            dns_recorded: BTreeMap::new(),
            failed: 0,
            inpod: BTreeMap::new(),
            node_addrs: None,
        }
    }

    /// Uses `proc_root` as the host's /proc (a DaemonSet mounts it
    /// elsewhere).
    pub fn with_proc_root(mut self, proc_root: std::path::PathBuf) -> Self {
        self.proc_root = proc_root;
        self
    }

    /// Applies the desired pods. `keep` names pods whose desired entry was
    /// invalid this time: they keep their last good policy.
    pub fn apply(&mut self, desired: &[PodSpec], keep: &BTreeSet<String>) {
        let started = std::time::Instant::now();
        self.proc_index = None;
        let mut want: BTreeMap<String, &PodSpec> = BTreeMap::new();
        // `weir inpod-enroll`'s pods first: the source's own entry wins.
        let inpod: Vec<PodSpec> = self.inpod.values().map(|p| p.spec.clone()).collect();
        for s in inpod.iter().chain(desired) {
            want.insert(s.key(), s);
        }
        // Removals first: a new pod may reuse a gone pod's address.
        let gone: Vec<String> = self
            .pods
            .keys()
            .filter(|k| !want.contains_key(*k) && !keep.contains(*k))
            .cloned()
            .collect();
        for k in gone {
            self.remove(&k);
        }
        // Every pod's namespace is visited on every pass (its addresses may
        // have changed), by a few threads for the whole pass.
        let targets: Vec<(&Path, crate::netlink::Names<'_>)> = want
            .values()
            .map(|s| (s.netns.as_path(), names(s)))
            .collect();
        let probes = crate::netlink::probe_all(&targets);
        let mut owners = self.address_owners();
        let (mut enrolled, mut updated, mut failed) = (0usize, 0usize, 0usize);
        for ((key, spec), probe) in want.into_iter().zip(probes) {
            match self.apply_one(&key, spec, probe, &mut owners) {
                Ok(Applied::Enrolled) => enrolled += 1,
                Ok(Applied::Updated) => updated += 1,
                Ok(Applied::Unchanged) => {}
                Err(e) => {
                    failed += 1;
                    warn!("pod {key}: not enrolled: {e:#}");
                }
            }
        }
        self.failed = failed;
        if enrolled + updated + failed > 0 {
            info!(
                "pass: {enrolled} pod(s) enrolled, {updated} updated, {failed} failed, {} enrolled in all",
                self.pods.len()
            );
        }
        // Anything else in the pinned maps belongs to no desired pod.
        let live: BTreeSet<u64> = self.pods.values().map(|p| p.cookie).collect();
        let mut stale: BTreeSet<u64> = self.dp.enrolled_cookies().into_iter().collect();
        stale.extend(self.dp.pinned_netns_links());
        for cookie in stale.difference(&live) {
            info!("removing leftover state of netns cookie {cookie} (no such pod any more)");
            self.dp.purge_cookie(*cookie);
        }
        let ports: BTreeSet<u16> = self
            .pods
            .values()
            .flat_map(|p| p.spec.rules.listen_ports.iter().copied())
            .collect();
        self.dp.sync_listen_ports(&ports);
        self.adopt_dns_proxies();
        crate::metrics::agent().reconcile_pass(Some(self.failed), started.elapsed());
    }

    /// Records the DNS proxy socket (UDP, bound to loopback on the DNS
    /// port) of every pod with DNS capture in `LISTENERS`, so that queries
    /// from connected, wildcard-bound sockets can reach it from the pod's
    /// address (see `connect` in the kernel code). The proxy starts after
    /// the pod is enrolled and may restart, so every pass looks again;
    /// until it is recorded such queries go to loopback.
    fn adopt_dns_proxies(&mut self) {
        let wanted: Vec<(String, std::path::PathBuf, u64, u16)> = self
            .pods
            .iter()
            .filter(|(_, p)| p.spec.rules.policy.flags & weir_common::POLICY_CAPTURE_DNS != 0)
            .map(|(k, p)| {
                (
                    k.clone(),
                    p.spec.netns.clone(),
                    p.cookie,
                    p.spec.rules.policy.dns_port,
                )
            })
            .collect();
        let live: BTreeSet<u64> = wanted.iter().map(|w| w.2).collect();
        self.dns_recorded.retain(|c, _| live.contains(c));
        for (key, netns, cookie, port) in wanted {
            let pids = match self.adopt_candidates(&netns) {
                Ok(p) => p,
                Err(e) => {
                    debug!("pod {key}: looking for its DNS proxy: {e}");
                    continue;
                }
            };
            // The same sockets as recorded last time: still in the map
            // (a closed socket leaves the sockhash, and its inode goes).
            let inodes = crate::adopt::dns_proxy_inodes(&self.proc_root, &pids, port);
            if inodes.is_empty() || self.dns_recorded.get(&cookie) == Some(&inodes) {
                continue;
            }
            match crate::adopt::find_dns_proxy(&self.proc_root, &pids, port) {
                Ok(found) if !found.is_empty() => {
                    let n = self.dp.record_listeners(cookie, &found);
                    if n > 0 {
                        info!("pod {key}: DNS proxy on :{port} recorded ({n} socket(s))");
                    }
                    // Look again next pass unless every socket was recorded.
                    if n == inodes.len() {
                        self.dns_recorded.insert(cookie, inodes);
                    }
                }
                Ok(_) => {}
                Err(e) => debug!("pod {key}: looking for its DNS proxy: {e}"),
            }
        }
    }

    /// Which pod owns each address of the enrolled pods.
    fn address_owners(&self) -> HashMap<IpAddr, String> {
        let mut owners = HashMap::new();
        for (k, p) in &self.pods {
            for a in &p.spec.rules.addrs {
                owners.entry(*a).or_insert_with(|| k.clone());
            }
        }
        owners
    }

    fn apply_one(
        &mut self,
        key: &str,
        spec: &PodSpec,
        probe: crate::netlink::Probe,
        owners: &mut HashMap<IpAddr, String>,
    ) -> Result<Applied> {
        let cookie = match probe.cookie {
            Ok(c) => c,
            Err(e) => {
                // Its netns is gone (or not there yet): it cannot be
                // captured, and stale entries must not linger.
                if self.pods.contains_key(key) {
                    self.remove(key);
                }
                return Err(e).with_context(|| format!("netns {}", spec.netns.display()));
            }
        };
        let mut discovered = with_discovered_addrs(spec, probe.facts);
        if discovered.mesh == crate::policy::Mesh::Ambient {
            // Kubelet probes come from the node itself: istio-cni SNATs
            // them to 169.254.7.127 on the host; weir, with no host rule,
            // lets the node's own addresses through instead.
            for a in self.node_addrs() {
                discovered
                    .rules
                    .inbound_skip_sources
                    .insert(ipnet::IpNet::from(a));
            }
        }
        // An address found in this netns that another enrolled pod owns
        // (lists, or had discovered first) is never claimed: a pod with
        // CAP_NET_ADMIN could otherwise add a neighbour's IP to its own
        // `lo` and have the neighbour's inbound connections steered to it.
        let listed: BTreeSet<IpAddr> = spec.ips.iter().copied().collect();
        discovered.rules.addrs.retain(|a| {
            let keep = listed.contains(a) || owners.get(a).is_none_or(|o| o == key);
            if !keep {
                warn!("pod {key}: address {a} in its netns belongs to another pod; not claimed");
            }
            keep
        });
        let spec = &discovered;
        let applied = self.write_one(key, spec, cookie)?;
        if let Some(p) = self.pods.get(key) {
            for a in &p.spec.rules.addrs {
                owners.entry(*a).or_insert_with(|| key.to_string());
            }
        }
        Ok(applied)
    }

    fn write_one(&mut self, key: &str, spec: &PodSpec, cookie: u64) -> Result<Applied> {
        // A pod whose VM would go uncaptured is refused whole rather than
        // reported enrolled (docs/kernels.md).
        if !spec.rules.virt_ifaces.is_empty()
            && let Some(why) = crate::sys::virt_unsupported()
        {
            if self.pods.contains_key(key) {
                self.remove(key);
            }
            anyhow::bail!(
                "{why}: the pod is refused, since its virtual interfaces' traffic would \
                 not be captured; remove the annotation or run the node on Linux >= 6.6"
            );
        }
        if let Some(cur) = self.pods.get(key) {
            if cur.cookie == cookie {
                if cur.spec == *spec {
                    return Ok(Applied::Unchanged);
                }
                let old = cur.entries.clone();
                let pod_id = cur.pod_id;
                // The tc programs are loaded per pod: only again when the
                // virtual interfaces changed (enrollment, including the
                // first pass of a restarted agent, always attaches).
                let virt_changed = cur.spec.rules.virt != spec.rules.virt;
                let entries =
                    self.dp
                        .write_pod(cookie, pod_id, &meta(spec), &spec.rules, Some(&old))?;
                setup_netns(&spec.netns, &spec.rules);
                if virt_changed {
                    self.sync_virt(key, spec, cookie);
                }
                info!("pod {key}: policy updated");
                self.record(key, spec, cookie, pod_id, entries);
                return Ok(Applied::Updated);
            }
            // Same name, new network namespace: the pod was re-created.
            self.remove(key);
        }
        let pod_id = self.next_id;
        self.next_id += 1;
        setup_netns(&spec.netns, &spec.rules);
        // Order matters: the pod's POD_POLICY entry is the switch that
        // turns capture on (written last by write_pod). Before it, the
        // sk_lookup program must be attached and the proxy's listeners
        // known, so that inbound capture starts together with outbound,
        // never after it.
        self.dp.attach_netns(cookie, &spec.netns)?;
        // A proxy that already listens was never seen by sockops.
        match self.adopt_candidates(&spec.netns).and_then(|pids| {
            crate::adopt::find_listeners(&self.proc_root, &pids, &spec.rules.listen_ports)
        }) {
            Ok(found) if !found.is_empty() => {
                let n = self.dp.record_listeners(cookie, &found);
                info!("pod {key}: adopted {n} proxy listener(s) that were already listening");
            }
            Ok(_) => {}
            Err(e) => warn!("pod {key}: looking for already-listening proxies: {e}"),
        }
        let entries = match self
            .dp
            .write_pod(cookie, pod_id, &meta(spec), &spec.rules, None)
        {
            Ok(e) => e,
            Err(e) => {
                // Leave nothing half-written behind (e.g. a full map).
                self.dp.purge_cookie(cookie);
                return Err(e);
            }
        };
        self.sync_virt(key, spec, cookie);
        log::debug!(
            "pod {key}: enrolled (netns {}, cookie {cookie}, mesh {}, outbound :{}, inbound :{})",
            spec.netns.display(),
            spec.mesh,
            spec.rules.policy.outbound_port,
            spec.rules.policy.inbound_port
        );
        self.record(key, spec, cookie, pod_id, entries);
        Ok(Applied::Enrolled)
    }

    /// Attaches the tc programs to the pod's virtual interfaces that exist
    /// (after `VIRT_IFACES` is written, so they find their entries), and
    /// names the listed ones that do not exist yet (the next pass attaches
    /// them when they appear).
    fn sync_virt(&mut self, key: &str, spec: &PodSpec, cookie: u64) {
        let ifindexes: BTreeSet<u32> = spec.rules.virt.keys().copied().collect();
        let t0 = std::time::Instant::now();
        let problems = self.dp.sync_virt_links(cookie, &spec.netns, &ifindexes);
        for problem in &problems {
            warn!("pod {key}: reroute-virtual-interfaces: {problem}");
        }
        if !ifindexes.is_empty() && problems.is_empty() {
            info!(
                "pod {key}: rerouting TCP from {} virtual interface(s) ({} ms)",
                ifindexes.len(),
                t0.elapsed().as_millis()
            );
        }
        let found = spec.rules.virt.len();
        if found < spec.rules.virt_ifaces.len() {
            debug!(
                "pod {key}: {} of {} reroute-virtual-interfaces exist so far",
                found,
                spec.rules.virt_ifaces.len()
            );
        }
    }

    fn record(&mut self, key: &str, spec: &PodSpec, cookie: u64, pod_id: u32, entries: PodEntries) {
        self.pods.insert(
            key.to_string(),
            Enrolled {
                spec: spec.clone(),
                cookie,
                pod_id,
                entries,
            },
        );
    }

    /// Pods the last full pass could not enroll or update (they are named
    /// in the log).
    pub fn failed_last_pass(&self) -> usize {
        self.failed
    }

    /// The processes of the netns at `netns` (for listener adoption).
    fn adopt_candidates(&mut self, netns: &Path) -> std::io::Result<Vec<u32>> {
        use std::os::unix::fs::MetadataExt;
        let ino = std::fs::metadata(netns)?.ino();
        if self.proc_index.is_none() {
            self.proc_index = Some(crate::adopt::netns_pids(&self.proc_root)?);
        }
        Ok(self
            .proc_index
            .as_ref()
            .and_then(|m| m.get(&ino).cloned())
            .unwrap_or_default())
    }

    /// The node's addresses (those of the agent's own network namespace,
    /// loopback and link-local left out), read on first use.
    fn node_addrs(&mut self) -> Vec<IpAddr> {
        if let Some(a) = &self.node_addrs {
            return a.clone();
        }
        let own = Path::new("/proc/self/ns/net");
        let probe = crate::netlink::probe_all(&[(
            own,
            crate::netlink::Names {
                exclude: None,
                virt: None,
            },
        )])
        .pop();
        let addrs: Vec<IpAddr> = match probe.map(|p| p.facts) {
            Some(Ok(f)) => f
                .addrs
                .into_iter()
                .filter(|a| {
                    !a.is_loopback()
                        && match a {
                            IpAddr::V4(v) => !v.is_link_local(),
                            IpAddr::V6(v) => v.segments()[0] & 0xffc0 != 0xfe80,
                        }
                })
                .collect(),
            other => {
                warn!(
                    "reading the node's addresses for ambient probe sources failed ({:?}); kubelet probes of ambient pods go through ztunnel",
                    other.map(|r| r.err().map(|e| e.to_string()))
                );
                Vec::new()
            }
        };
        info!(
            "ambient: connections from the node's addresses {addrs:?} are not captured (kubelet probes)"
        );
        self.node_addrs = Some(addrs.clone());
        addrs
    }

    /// Removes one pod now (for `weir inpod-enroll`, replacing a stale
    /// pod).
    pub fn remove_pod(&mut self, key: &str) {
        self.remove(key);
    }

    fn remove(&mut self, key: &str) {
        if let Some(p) = self.pods.remove(key) {
            self.dp.remove_pod(p.cookie, &p.entries);
            info!("pod {key}: removed (netns cookie {})", p.cookie);
        }
    }

    /// Enrolls (or updates) one pod right now, leaving every other pod as
    /// it is, and returns its netns cookie. For the CNI plugin, which must
    /// have capture in place before the pod's containers start. The next
    /// full [`Reconciler::apply`] must list the pod, or it is removed
    /// again (the Kubernetes source merges CNI-enrolled pods into its
    /// desired set).
    pub fn enroll_now(&mut self, spec: &PodSpec) -> Result<u64> {
        self.proc_index = None;
        let key = spec.key();
        let probe = crate::netlink::probe_all(&[(spec.netns.as_path(), names(spec))])
            .pop()
            .context("netns probe did not run")?;
        let mut owners = self.address_owners();
        self.apply_one(&key, spec, probe, &mut owners)?;
        let ports: BTreeSet<u16> = self
            .pods
            .values()
            .flat_map(|p| p.spec.rules.listen_ports.iter().copied())
            .collect();
        self.dp.sync_listen_ports(&ports);
        self.pods
            .get(&key)
            .map(|p| p.cookie)
            .with_context(|| format!("pod {key}: not recorded after enrollment"))
    }
}

/// The interface names to resolve in a pod's netns.
fn names(spec: &PodSpec) -> crate::netlink::Names<'_> {
    crate::netlink::Names {
        exclude: Some(&spec.rules.exclude_ifaces),
        virt: Some(&spec.rules.virt_ifaces),
    }
}

/// The spec with every address found in the pod's netns added to its
/// rules (the pods file or the API may list only the primary IPs).
fn with_discovered_addrs(spec: &PodSpec, facts: Result<crate::netlink::NetnsFacts>) -> PodSpec {
    let mut spec = spec.clone();
    match facts {
        Ok(facts) => {
            spec.rules.addrs.extend(facts.addrs);
            // The source the kernel picks for each routed prefix, then the
            // first address on each connected subnet for what the routes
            // do not say.
            spec.rules.src_routes = crate::routes::source_routes(&facts.routes, &facts.iface_addrs);
            for (net, ip) in facts.subnets {
                spec.rules.src_routes.entry(net).or_insert(ip);
            }
            if !spec.rules.exclude_ifaces.is_empty() {
                // Everything routed out of an excluded interface (its
                // connected subnets and its gateway routes), as
                // `-o IFACE -j RETURN` decides it.
                let mut region =
                    crate::routes::excluded_region(&facts.routes, &facts.excluded.ifindexes);
                if facts.routes.is_empty() {
                    region.extend(facts.excluded.subnets);
                }
                spec.rules.excluded_ifindexes = facts.excluded.ifindexes;
                spec.rules.iface_routes = region;
            }
            spec.rules.virt = facts.virt;
        }
        Err(e) => warn!("netns {}: {e:#}", spec.netns.display()),
    }
    spec
}

/// What istio-init does to the pod's network besides iptables: an IPv6 pod
/// gets `::6/128` on `lo`, so the proxy can bind it as the source of its
/// inbound passthrough connections (IPv4 can bind any 127/8 address).
fn setup_netns(netns: &Path, rules: &PodRules) {
    use weir_common::{
        POLICY_CAPTURE_INBOUND, POLICY_CAPTURE_OUTBOUND, POLICY_HAS_IP6, POLICY_LOOPBACK_SIMPLE,
    };
    let f = rules.policy.flags;
    if f & weir_common::POLICY_AMBIENT != 0 {
        if let Err(e) = crate::netlink::setup_ambient(netns) {
            warn!(
                "netns {}: {e:#}; ztunnel's connections to the application will not get their answers",
                netns.display()
            );
        }
        return;
    }
    // Only pods that are IPv6 pods (by their listed addresses) and
    // captured, as istio-init does it only with IPv6 enabled and rules;
    // never for a pod whose mesh writes no IPv6 rules, nor for Linkerd
    // (its proxy-init adds no address: no 127.0.0.6/::6 passthrough).
    if f & POLICY_HAS_IP6 == 0
        || f & (POLICY_CAPTURE_OUTBOUND | POLICY_CAPTURE_INBOUND) == 0
        || f & POLICY_LOOPBACK_SIMPLE != 0
        || rules.skip_ipv6
    {
        return;
    }
    if let Err(e) =
        crate::netlink::add_lo_addr6(netns, std::net::Ipv6Addr::new(0, 0, 0, 0, 0, 0, 0, 6))
    {
        warn!(
            "netns {}: adding ::6/128 to lo failed: {e:#}; the proxy's IPv6 inbound passthrough may be captured again",
            netns.display()
        );
    }
}
