//! `weir explain`: what weir does with one connection of one pod, and which
//! rule decides it.
//!
//! The pod's tables are read back from the pinned maps (so this works while
//! an agent runs and on a node where it crashed) and handed to
//! [`decide_outbound`] / [`decide_inbound`], the very functions the kernel
//! programs run. The kernel programs' own checks around those calls (the
//! inbound "is this one of the pod's addresses" and "does this come from
//! inside the pod" tests of `weir_sk_lookup`) are reproduced here too.

use std::cell::RefCell;
use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::io::Write as _;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::Path;

use anyhow::{Context, Result, bail};
use aya::maps::lpm_trie::{Key, LpmTrie};
use aya::maps::{Array, HashMap, Map, MapData, MapError, SockHash};
use ipnet::IpNet;
use serde::Serialize;
use weir_common::*;

use crate::datapath::Pins;
use crate::policy::{addr_of, ip_of};

/// Output format of `weir explain`.
#[derive(Copy, Clone, Debug, clap::ValueEnum)]
pub enum Format {
    /// Human-readable.
    Text,
    /// JSON.
    Json,
}

/// The connection to explain.
#[derive(Clone, Debug)]
pub struct Query {
    /// `NAMESPACE/NAME` of the pod.
    pub pod: String,
    /// Destination address and port.
    pub dst: SocketAddr,
    /// UID of the connecting process (outbound only).
    pub uid: u32,
    /// GID of the connecting process (outbound only).
    pub gid: u32,
    /// Outbound: the address the socket is bound to before `connect()`.
    /// Inbound: the remote peer's address.
    pub src: Option<IpAddr>,
    /// Explain an inbound connection (arriving at the pod) instead of an
    /// outbound one (made by a process of the pod).
    pub inbound: bool,
    /// Outbound UDP (only DNS is ever captured) instead of TCP.
    pub udp: bool,
    /// The socket's mark (ambient pods: ztunnel's sockets carry 0x539).
    pub mark: u32,
}

/// One pod's tables, read back from the pinned maps.
#[derive(Clone, Debug, Default)]
pub struct PodView {
    /// Kubernetes namespace.
    pub namespace: String,
    /// Pod name.
    pub name: String,
    /// Netns cookie (the key of every per-pod map).
    pub cookie: u64,
    /// `POD_POLICY` entry.
    pub policy: PodPolicy,
    /// `PORT_RULES` entries as (`PORT_*` kind, port).
    pub ports: BTreeSet<(u16, u16)>,
    /// Proxy UIDs (`PROXY_IDS`).
    pub uids: BTreeSet<u32>,
    /// Proxy GIDs (`PROXY_IDS`).
    pub gids: BTreeSet<u32>,
    /// `CIDR_EXCLUDE` entries.
    pub exclude: Vec<IpNet>,
    /// `CIDR_INCLUDE` entries.
    pub include: Vec<IpNet>,
    /// `CIDR_DNS` entries (the pod's resolvers, for DNS capture).
    pub dns: Vec<IpNet>,
    /// Owner-group filter GIDs (`PROXY_IDS` entries of kind
    /// `IDKEY_OWNER_GROUP`).
    pub owner_groups: BTreeSet<u32>,
    /// `CIDR_IFACE` entries (subnets behind `excludeInterfaces`).
    pub iface_routes: Vec<IpNet>,
    /// `CIDR_SKIP_SRC` entries (Linkerd's `skip-subnets`: inbound sources
    /// not captured).
    pub skip_sources: Vec<IpNet>,
    /// Interface indexes of `excludeInterfaces` (`PROXY_IDS` entries of
    /// kind `IDKEY_EXCLUDED_IFINDEX`).
    pub excluded_ifindexes: BTreeSet<u32>,
    /// `POD_ADDRS` entries pointing at this pod.
    pub addrs: BTreeSet<IpAddr>,
    /// `LISTENERS` keys of this pod as (port, address family).
    pub listeners: BTreeSet<(u16, u16)>,
}

impl PodView {
    fn ports_of(&self, kind: u16) -> Vec<u16> {
        self.ports
            .iter()
            .filter(|(k, _)| *k == kind)
            .map(|(_, p)| *p)
            .collect()
    }
}

/// In-memory lookups over the reconstructed tables. CIDR lookups go to the
/// pinned tries instead when they are open (see [`PinnedTables`]).
impl PodTables for PodView {
    fn has_port(&self, kind: u16, port: u16) -> bool {
        self.ports.contains(&(kind, port))
    }
    fn has_id(&self, kind: u32, id: u32) -> bool {
        match kind {
            IDKEY_UID => self.uids.contains(&id),
            IDKEY_GID => self.gids.contains(&id),
            IDKEY_OWNER_GROUP => self.owner_groups.contains(&id),
            IDKEY_EXCLUDED_IFINDEX => self.excluded_ifindexes.contains(&id),
            _ => false,
        }
    }
    fn in_cidrs(&self, list: CidrList, addr: &Addr) -> bool {
        let ip = ip_of(addr);
        let nets = match list {
            CidrList::OutboundExclude => &self.exclude,
            CidrList::OutboundInclude => &self.include,
            CidrList::DnsServers => &self.dns,
            CidrList::ExcludedInterfaceRoutes => &self.iface_routes,
            CidrList::InboundSkipSources => &self.skip_sources,
        };
        nets.iter().any(|n| n.contains(&ip))
    }
    fn is_pod_addr(&self, addr: &Addr) -> bool {
        self.addrs.contains(&ip_of(addr))
    }
}

/// [`PodTables`] as the kernel sees them: CIDR membership is a longest
/// prefix match in the pinned `CIDR_EXCLUDE`/`CIDR_INCLUDE` tries with a
/// full-length key, exactly like `KernelTables::in_cidrs`.
struct PinnedTables<'a> {
    view: &'a PodView,
    exclude: &'a LpmTrie<MapData, CidrData, u32>,
    include: &'a LpmTrie<MapData, CidrData, u32>,
    dns: &'a LpmTrie<MapData, CidrData, u32>,
    iface: &'a LpmTrie<MapData, CidrData, u32>,
    skip_src: &'a LpmTrie<MapData, CidrData, u32>,
    error: RefCell<Option<String>>,
}

impl PodTables for PinnedTables<'_> {
    fn has_port(&self, kind: u16, port: u16) -> bool {
        self.view.has_port(kind, port)
    }
    fn has_id(&self, kind: u32, id: u32) -> bool {
        self.view.has_id(kind, id)
    }
    fn in_cidrs(&self, list: CidrList, addr: &Addr) -> bool {
        let key = Key::new(
            CIDR_COOKIE_BITS + 128,
            CidrData {
                netns_cookie: self.view.cookie.to_ne_bytes(),
                addr: addr_octets(addr),
            },
        );
        let (trie, name) = match list {
            CidrList::OutboundExclude => (self.exclude, "CIDR_EXCLUDE"),
            CidrList::OutboundInclude => (self.include, "CIDR_INCLUDE"),
            CidrList::DnsServers => (self.dns, "CIDR_DNS"),
            CidrList::ExcludedInterfaceRoutes => (self.iface, "CIDR_IFACE"),
            CidrList::InboundSkipSources => (self.skip_src, "CIDR_SKIP_SRC"),
        };
        match trie.get(&key, 0) {
            Ok(_) => true,
            Err(MapError::KeyNotFound) => false,
            Err(e) => {
                self.error
                    .borrow_mut()
                    .get_or_insert_with(|| format!("looking up {name}: {e}"));
                false
            }
        }
    }
    fn is_pod_addr(&self, addr: &Addr) -> bool {
        self.view.is_pod_addr(addr)
    }
}

/// What decided the connection's fate.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The shared decision function returned this verdict.
    Decided(Verdict),
    /// Inbound: the destination is not in `POD_ADDRS` for this pod, so
    /// `weir_sk_lookup` cannot tell which pod it is for and passes it on.
    NotPodAddress,
    /// Inbound: the source is inside the pod (loopback or a pod address);
    /// `weir_sk_lookup` leaves it to the outbound rules.
    FromInsidePod,
}

impl Outcome {
    /// Short machine-readable name (`redirect_outbound`, …).
    pub fn name(self) -> &'static str {
        match self {
            Outcome::Decided(v) => verdict_name(v),
            Outcome::NotPodAddress => "pass_not_pod_address",
            Outcome::FromInsidePod => "pass_from_inside_pod",
        }
    }

    /// Whether the connection goes to the proxy.
    pub fn captured(self) -> bool {
        matches!(self, Outcome::Decided(v) if v.captured())
    }
}

/// Short machine-readable name of a verdict.
pub fn verdict_name(v: Verdict) -> &'static str {
    match v {
        Verdict::RedirectOutbound => "redirect_outbound",
        Verdict::RedirectInbound => "redirect_inbound",
        Verdict::BypassExcludedPort => "bypass_excluded_port",
        Verdict::BypassPassthrough => "bypass_passthrough",
        Verdict::BypassLoopback => "bypass_loopback",
        Verdict::BypassProxy => "bypass_proxy",
        Verdict::BypassLocalhost => "bypass_localhost",
        Verdict::BypassExcludedCidr => "bypass_excluded_cidr",
        Verdict::BypassNotIncluded => "bypass_not_included",
        Verdict::BypassTunnel => "bypass_tunnel",
        Verdict::BypassDisabled => "bypass_disabled",
        Verdict::BypassOwnerGroup => "bypass_owner_group",
        Verdict::BypassExcludedInterface => "bypass_excluded_interface",
        Verdict::BypassNoRoute => "bypass_no_route",
        Verdict::RedirectDns => "redirect_dns",
        Verdict::BypassZtunnel => "bypass_ztunnel",
    }
}

/// The answer of `weir explain`.
#[derive(Debug, Serialize)]
pub struct Explanation {
    /// `namespace/name`.
    pub pod: String,
    /// The pod's netns cookie.
    pub netns_cookie: u64,
    /// `outbound` or `inbound`.
    pub direction: &'static str,
    /// Destination asked about.
    pub dst: String,
    /// Source asked about (outbound: bound address; inbound: peer).
    pub src: Option<String>,
    /// UID of the connecting process (outbound only).
    pub uid: Option<u32>,
    /// GID of the connecting process (outbound only).
    pub gid: Option<u32>,
    /// `tcp` or `udp`.
    pub protocol: &'static str,
    /// Short name of the outcome (`redirect_outbound`, `bypass_proxy`, …).
    pub verdict: &'static str,
    /// Whether the connection goes to the proxy.
    pub captured: bool,
    /// Which rule decided, in words.
    pub rule: String,
    /// The `istio-iptables` rule weir reproduces here.
    pub istio_rule: String,
    /// Where the connection ends up.
    pub target: String,
    /// The Prometheus series this connection adds to.
    pub counter: Option<String>,
    /// For captured connections: whether weir recorded a proxy listener on
    /// the target port of this pod (`LISTENERS`).
    pub proxy_listening: Option<bool>,
    /// Further remarks.
    pub notes: Vec<String>,
}

fn open(pins: &Pins, name: &str) -> Result<MapData> {
    let p = pins.maps().join(name);
    MapData::from_pin(&p).with_context(|| {
        format!(
            "cannot open {} (is weir installed on this node, and --bpffs right?)",
            p.display()
        )
    })
}

fn cstr(b: &[u8]) -> String {
    let end = b.iter().position(|c| *c == 0).unwrap_or(b.len());
    String::from_utf8_lossy(&b[..end]).into_owned()
}

/// An LPM-trie key of a per-pod CIDR map back to the network it stands for.
fn net_of_key(k: &Key<CidrData>) -> Option<IpNet> {
    let bits = k.prefix_len().checked_sub(CIDR_COOKIE_BITS)?;
    let data = k.data();
    let addr = addr_from_octets(data.addr);
    match ip_of(&addr) {
        IpAddr::V4(v4) if bits >= 96 => IpNet::new(IpAddr::V4(v4), (bits - 96) as u8).ok(),
        _ => IpNet::new(IpAddr::V6(Ipv6Addr::from(data.addr)), bits as u8).ok(),
    }
}

fn split_pod(pod: &str) -> Result<(&str, &str)> {
    match pod.split_once('/') {
        Some((ns, name)) if !ns.is_empty() && !name.is_empty() && !name.contains('/') => {
            Ok((ns, name))
        }
        _ => bail!("--pod {pod:?}: expected NAMESPACE/NAME, for example default/productpage-v1"),
    }
}

/// Answers `q` from the pins under `bpffs`.
pub fn explain(bpffs: &Path, q: &Query) -> Result<Explanation> {
    let (want_ns, want_name) = split_pod(&q.pod)?;
    if let Some(src) = q.src
        && src.is_ipv4() != q.dst.ip().is_ipv4()
    {
        bail!(
            "--src {src} and --dst {} are of different address families; give both as IPv4 or both as IPv6",
            q.dst
        );
    }
    if q.udp && q.inbound {
        bail!("--udp and --inbound: weir captures inbound TCP only; drop one of them");
    }
    let pins = Pins::new(bpffs);
    let wm: Array<MapData, WeirMeta> = Array::try_from(Map::Array(open(&pins, "WEIR_META")?))?;
    let layout = wm.get(&0, 0).context("reading WEIR_META")?.layout_version;
    if layout != LAYOUT_VERSION {
        bail!(
            "the maps pinned under {} have map layout v{layout}, this weir reads v{LAYOUT_VERSION}: \
             run the `weir explain` of the weir version that wrote them (the running agent's binary)",
            pins.maps().display()
        );
    }
    let meta: HashMap<MapData, u64, PodMeta> =
        HashMap::try_from(Map::HashMap(open(&pins, "POD_META")?))?;
    let policy: HashMap<MapData, u64, PodPolicy> =
        HashMap::try_from(Map::HashMap(open(&pins, "POD_POLICY")?))?;
    // Names are stored truncated to 63 bytes.
    let trunc = |s: &str| -> String {
        let b = s.as_bytes();
        String::from_utf8_lossy(&b[..b.len().min(63)]).into_owned()
    };
    let (want_ns, want_name) = (trunc(want_ns), trunc(want_name));
    let mut known = Vec::new();
    let mut found = None;
    for entry in meta.iter() {
        let (cookie, m) = entry.context("reading POD_META")?;
        let (ns, name) = (cstr(&m.namespace), cstr(&m.name));
        if ns == want_ns && name == want_name {
            found = Some(cookie);
        }
        known.push(format!("{ns}/{name}"));
    }
    let Some(cookie) = found else {
        known.sort();
        // The one kernel-dependent reason a pod is refused (the agent's
        // log names the pod).
        let refused = crate::sys::virt_unsupported()
            .map(|why| format!("; if it has that annotation, it was refused: {why}"))
            .unwrap_or_default();
        bail!(
            "pod {} is not enrolled on this node (enrolled: {}); `weir status` lists the enrolled pods{refused}",
            q.pod,
            if known.is_empty() {
                "none".to_string()
            } else {
                known.join(", ")
            }
        );
    };
    let p = policy.get(&cookie, 0).with_context(|| {
        format!(
            "pod {} (netns cookie {cookie}) has a name in POD_META but no POD_POLICY entry: \
             it is being enrolled or removed right now; try again",
            q.pod
        )
    })?;

    let mut view = PodView {
        namespace: want_ns,
        name: want_name,
        cookie,
        policy: p,
        ..Default::default()
    };
    let ports: HashMap<MapData, PortKey, u32> =
        HashMap::try_from(Map::HashMap(open(&pins, "PORT_RULES")?))?;
    for k in ports.keys() {
        let k = k.context("reading PORT_RULES")?;
        if k.netns_cookie == cookie {
            view.ports.insert((k.kind, k.port));
        }
    }
    let ids: HashMap<MapData, IdKey, u32> =
        HashMap::try_from(Map::HashMap(open(&pins, "PROXY_IDS")?))?;
    for k in ids.keys() {
        let k = k.context("reading PROXY_IDS")?;
        if k.netns_cookie != cookie {
            continue;
        }
        match k.kind {
            IDKEY_UID => view.uids.insert(k.id),
            IDKEY_GID => view.gids.insert(k.id),
            IDKEY_OWNER_GROUP => view.owner_groups.insert(k.id),
            IDKEY_EXCLUDED_IFINDEX => view.excluded_ifindexes.insert(k.id),
            _ => false,
        };
    }
    let exclude: LpmTrie<MapData, CidrData, u32> =
        LpmTrie::try_from(Map::LpmTrie(open(&pins, "CIDR_EXCLUDE")?))?;
    let include: LpmTrie<MapData, CidrData, u32> =
        LpmTrie::try_from(Map::LpmTrie(open(&pins, "CIDR_INCLUDE")?))?;
    let dns: LpmTrie<MapData, CidrData, u32> =
        LpmTrie::try_from(Map::LpmTrie(open(&pins, "CIDR_DNS")?))?;
    let iface: LpmTrie<MapData, CidrData, u32> =
        LpmTrie::try_from(Map::LpmTrie(open(&pins, "CIDR_IFACE")?))?;
    let skip_src: LpmTrie<MapData, CidrData, u32> =
        LpmTrie::try_from(Map::LpmTrie(open(&pins, "CIDR_SKIP_SRC")?))?;
    for (trie, out, name) in [
        (&exclude, &mut view.exclude, "CIDR_EXCLUDE"),
        (&include, &mut view.include, "CIDR_INCLUDE"),
        (&dns, &mut view.dns, "CIDR_DNS"),
        (&iface, &mut view.iface_routes, "CIDR_IFACE"),
        (&skip_src, &mut view.skip_sources, "CIDR_SKIP_SRC"),
    ] {
        for k in trie.keys() {
            let k = k.with_context(|| format!("reading {name}"))?;
            if k.data().netns_cookie == cookie.to_ne_bytes()
                && let Some(n) = net_of_key(&k)
            {
                out.push(n);
            }
        }
        out.sort();
    }
    let addrs: HashMap<MapData, Addr, u64> =
        HashMap::try_from(Map::HashMap(open(&pins, "POD_ADDRS")?))?;
    for e in addrs.iter() {
        let (a, c) = e.context("reading POD_ADDRS")?;
        if c == cookie {
            view.addrs.insert(ip_of(&a));
        }
    }
    let listeners: SockHash<MapData, ListenerKey> =
        SockHash::try_from(Map::SockHash(open(&pins, "LISTENERS")?))?;
    for k in listeners.keys() {
        let k = k.context("reading LISTENERS")?;
        if k.netns_cookie == cookie {
            view.listeners.insert((k.port, k.family));
        }
    }

    let tables = PinnedTables {
        view: &view,
        exclude: &exclude,
        include: &include,
        dns: &dns,
        iface: &iface,
        skip_src: &skip_src,
        error: RefCell::new(None),
    };
    let outcome = if q.inbound {
        decide_in(&view, q, &tables)
    } else {
        Outcome::Decided(decide_out(&view.policy, q, &tables))
    };
    if let Some(e) = tables.error.into_inner() {
        bail!("{e}");
    }
    Ok(describe(&view, q, outcome))
}

/// The shared outbound decision the kernel takes for this pod: Istio's
/// ambient rules (ztunnel) or the sidecar rules.
fn decide_out<T: PodTables>(p: &PodPolicy, q: &Query, t: &T) -> Verdict {
    if p.flags & POLICY_AMBIENT != 0 {
        decide_ambient_outbound(p, &out_query(q), q.mark, t)
    } else {
        decide_outbound(p, &out_query(q), t)
    }
}

fn out_query(q: &Query) -> OutboundQuery {
    OutboundQuery {
        dst: addr_of(q.dst.ip()),
        dport: q.dst.port(),
        src: q.src.map(addr_of).unwrap_or([0; 4]),
        uid: q.uid,
        gid: q.gid,
        udp: q.udp && !q.inbound,
    }
}

/// `weir_sk_lookup`'s steps for an inbound connection.
fn decide_in<T: PodTables>(view: &PodView, q: &Query, t: &T) -> Outcome {
    // As the kernel sees it: IPv4-mapped IPv6 is IPv4.
    if !view.addrs.contains(&ip_of(&addr_of(q.dst.ip()))) {
        return Outcome::NotPodAddress;
    }
    if let Some(src) = q.src
        && is_loopback_route(&addr_of(src), t)
    {
        return Outcome::FromInsidePod;
    }
    // The arriving interface is not asked for: 0 matches no
    // excludeInterfaces entry (it is reported in the notes instead).
    // Without a source, skip-subnets is not asked either.
    let mut policy = view.policy;
    let src = match q.src {
        Some(ip) => addr_of(ip),
        None => {
            policy.flags &= !POLICY_INBOUND_SKIP_SOURCES;
            [0; 4]
        }
    };
    if policy.flags & POLICY_AMBIENT != 0 {
        // A marked connection arriving from outside the pod is not one
        // ztunnel made from inside it: only its own are left alone.
        return Outcome::Decided(decide_ambient_inbound(
            &policy,
            q.dst.port(),
            &src,
            is_ztunnel_mark(q.mark),
            t,
        ));
    }
    Outcome::Decided(decide_inbound(&policy, q.dst.port(), 0, &src, t))
}

fn id_word(kind: u32) -> (&'static str, &'static str) {
    if kind == ID_KIND_GID {
        ("gid", "--gid-owner")
    } else {
        ("uid", "--uid-owner")
    }
}

fn localhost_cidr(v6: bool) -> &'static str {
    if v6 { "::1/128" } else { "127.0.0.1/32" }
}

fn list_or_none<T: std::fmt::Display>(items: &[T]) -> String {
    if items.is_empty() {
        "empty".to_string()
    } else {
        items
            .iter()
            .map(|i| i.to_string())
            .collect::<Vec<_>>()
            .join(",")
    }
}

/// The proxy's loopback address for a redirected connection to `dst`.
fn proxy_addr(dst: IpAddr, port: u16) -> SocketAddr {
    match dst {
        IpAddr::V4(_) => SocketAddr::from((Ipv4Addr::LOCALHOST, port)),
        IpAddr::V6(v6) if v6.to_ipv4_mapped().is_some() => {
            SocketAddr::from((Ipv4Addr::LOCALHOST.to_ipv6_mapped(), port))
        }
        IpAddr::V6(_) => SocketAddr::from((Ipv6Addr::LOCALHOST, port)),
    }
}

fn listening(view: &PodView, port: u16, v6: bool) -> bool {
    let fam = |f: u32| view.listeners.contains(&(port, f as u16));
    // A dual-stack [::] listener takes IPv4 connections too.
    fam(AF_INET6) || (!v6 && fam(AF_INET))
}

/// Puts the outcome into words. Pure: unit tested.
pub fn describe(view: &PodView, q: &Query, outcome: Outcome) -> Explanation {
    let p = &view.policy;
    let dst = q.dst;
    let dip = dst.ip();
    let d = dst.port();
    let v6 = dip.is_ipv6() && !matches!(dip, IpAddr::V6(a) if a.to_ipv4_mapped().is_some());
    let (id_name, owner) = id_word(p.lo_id_kind);
    let labels = format!("namespace=\"{}\",pod=\"{}\"", view.namespace, view.name);
    let bypassed = |dir: &str, reason: &str| {
        Some(format!(
            "weir_connections_bypassed_total{{{labels},direction=\"{dir}\",reason=\"{reason}\"}}"
        ))
    };
    let captured = |dir: &str| {
        Some(format!(
            "weir_connections_captured_total{{{labels},direction=\"{dir}\"}}"
        ))
    };
    let mut notes = Vec::new();
    let untouched = format!("{dst} (untouched)");
    // Why capture is off altogether: the pod's policy has no address of a
    // family its mesh captures (an IPv6-only pod without IPv6 rules), or
    // interceptionMode NONE (which keeps the pod's addresses).
    let (off_rule, off_istio): (String, String) =
        if p.flags & (POLICY_HAS_IP4 | POLICY_HAS_IP6) == 0 {
            (
                "capture is off for this pod: it has no address of a family its mesh captures \
                 (an IPv6-only pod whose mesh writes no IPv6 rules: Istio without ISTIO_DUAL_STACK \
                 when its first address is IPv4, Linkerd without IPv6, Kuma's ipv4 mode, \
                 weir.dev/capture-ipv6: \"false\"; or interceptionMode NONE on a pod listed \
                 without addresses)"
                    .into(),
                "none: istio-iptables writes no rules of the pod's family".into(),
            )
        } else {
            (
                "capture is off for this pod (sidecar.istio.io/interceptionMode: NONE)".into(),
                "none: istio-iptables writes no capture rules for interceptionMode NONE".into(),
            )
        };
    let (rule, istio, target, counter, listen): (String, String, String, Option<String>, _) =
        match (q.inbound, outcome) {
            (_, Outcome::NotPodAddress) => (
                format!(
                    "{dip} is not one of this pod's addresses in POD_ADDRS ({}): weir_sk_lookup cannot tell \
                     which pod the connection is for and lets the kernel deliver it normally",
                    list_or_none(&view.addrs.iter().collect::<Vec<_>>())
                ),
                "none: istio-iptables' PREROUTING rules live in the pod's netns and see only its traffic"
                    .into(),
                untouched,
                None,
                None,
            ),
            (_, Outcome::FromInsidePod) => (
                format!(
                    "source {} is inside the pod (127.0.0.0/8, ::1, ::6 or a pod address): such \
                     connections never cross PREROUTING; the outbound rules decided them at connect() \
                     (run weir explain without --inbound)",
                    q.src.map(|s| s.to_string()).unwrap_or_default()
                ),
                "none: locally generated traffic does not traverse ISTIO_INBOUND".into(),
                untouched,
                None,
                None,
            ),
            (false, Outcome::Decided(v)) => match v {
                Verdict::BypassNoRoute if dip.is_ipv6() && p.flags & POLICY_HAS_IP4 != 0 => (
                    "the pod has no IPv6 rules (no IPv6 address, or its mesh does not capture \
                     IPv6: Linkerd without IPv6 support, Kuma's ipv4 mode, weir.dev/capture-ipv6: \
                     \"false\"): its IPv6 connections, ::1 included, are left alone"
                        .to_string(),
                    "none: no ip6tables rule".into(),
                    untouched.clone(),
                    bypassed("outbound", "not_included"),
                    None,
                ),
                Verdict::BypassNoRoute => (
                    format!(
                        "the pod has no {} address: the kernel refuses the connection \
                         (ENETUNREACH) before any capture rule, as without weir",
                        if dip.is_ipv4() { "IPv4" } else { "IPv6" }
                    ),
                    "none: no route, so no iptables rule is reached".into(),
                    untouched.clone(),
                    bypassed("outbound", "not_included"),
                    None,
                ),
                Verdict::BypassZtunnel => (
                    format!(
                        "mark {:#x}: {} (ambient mode)",
                        q.mark,
                        if is_connmark(q.mark) {
                            "the application's side of a connection ztunnel made into the pod \
                             (connection mark 0x111/0xfff): its answers go back to ztunnel"
                        } else {
                            "a socket of ztunnel (mark 0x539/0xfff): ztunnel's own traffic is never \
                             captured"
                        }
                    ),
                    if is_connmark(q.mark) {
                        "-A ISTIO_OUTPUT -p tcp -m mark --mark 0x111/0xfff -j ACCEPT".into()
                    } else {
                        "-A ISTIO_OUTPUT ! -d 127.0.0.1/32 -p tcp -m mark ! --mark 0x539/0xfff \
                         -j REDIRECT --to-ports 15001 (does not match)"
                            .into()
                    },
                    untouched.clone(),
                    bypassed("outbound", "proxy_identity"),
                    None,
                ),
                Verdict::BypassExcludedInterface => (
                    format!(
                        "{dip} is reached through an interface of excludeInterfaces (subnets: {})",
                        list_or_none(&view.iface_routes.iter().collect::<Vec<_>>())
                    ),
                    "-A OUTPUT -o <interface> -j RETURN (before ISTIO_OUTPUT)".into(),
                    untouched.clone(),
                    bypassed("outbound", "excluded_interface"),
                    None,
                ),
                Verdict::RedirectOutbound => {
                    let (why, ist) = if view.has_port(PORT_OUT_INCLUDE, d) {
                        (
                            format!("port {d} is in includeOutboundPorts"),
                            format!("-A ISTIO_OUTPUT -p tcp --dport {d} -j ISTIO_REDIRECT"),
                        )
                    } else if p.flags & POLICY_OUTBOUND_ALL_CIDRS != 0 {
                        (
                            "includeOutboundIPRanges is \"*\" (every destination)".to_string(),
                            "-A ISTIO_OUTPUT -j ISTIO_REDIRECT".to_string(),
                        )
                    } else {
                        let net = view
                            .include
                            .iter()
                            .filter(|n| n.contains(&dip))
                            .max_by_key(|n| n.prefix_len())
                            .map(|n| n.to_string())
                            .unwrap_or_else(|| dip.to_string());
                        (
                            format!("{dip} is in includeOutboundIPRanges ({net})"),
                            format!("-A ISTIO_OUTPUT -d {net} -j ISTIO_REDIRECT"),
                        )
                    };
                    (
                        format!(
                            "ISTIO_OUTPUT: no earlier rule returned and {why}: redirected to the \
                             proxy's outbound listener"
                        ),
                        format!(
                            "{ist}; -A ISTIO_REDIRECT -p tcp -j REDIRECT --to-ports {}",
                            p.outbound_port
                        ),
                        format!(
                            "{} (the proxy reads {dst} with SO_ORIGINAL_DST; the application's \
                             getpeername() still says {dst})",
                            proxy_addr(dip, p.outbound_port)
                        ),
                        captured("outbound"),
                        Some((p.outbound_port, v6)),
                    )
                }
                Verdict::RedirectInbound => {
                    let tunnel = if p.tunnel_port != 0 {
                        format!(" ! --dport {}", p.tunnel_port)
                    } else {
                        String::new()
                    };
                    (
                        format!(
                            "ISTIO_OUTPUT: the proxy ({id_name} {}) dials {dst}, which is routed over \
                             lo (127.0.0.0/8, ::6 or the pod's own address) but is not {} nor the tunnel \
                             port: the proxy calling its own pod goes through its inbound listener",
                            p.lo_id,
                            if v6 { "::1" } else { "127.0.0.1" }
                        ),
                        format!(
                            "-A ISTIO_OUTPUT ! -d {} -o lo -p tcp{tunnel} -m owner {owner} {} -j ISTIO_IN_REDIRECT; \
                             -A ISTIO_IN_REDIRECT -p tcp -j REDIRECT --to-ports {}",
                            localhost_cidr(v6),
                            p.lo_id,
                            p.inbound_port
                        ),
                        format!(
                            "{} (the proxy's inbound listener; SO_ORIGINAL_DST says {dst})",
                            proxy_addr(dip, p.inbound_port)
                        ),
                        captured("outbound_to_inbound"),
                        Some((p.inbound_port, v6)),
                    )
                }
                Verdict::BypassExcludedPort => (
                    format!("ISTIO_OUTPUT: port {d} is in excludeOutboundPorts"),
                    format!("-A ISTIO_OUTPUT -p tcp --dport {d} -j RETURN"),
                    untouched,
                    bypassed("outbound", "excluded_port"),
                    None,
                ),
                Verdict::BypassPassthrough => (
                    format!(
                        "ISTIO_OUTPUT: the socket is bound to {}, the proxy's inbound passthrough \
                         source, and {dip} is routed over lo",
                        q.src.map(|s| s.to_string()).unwrap_or_default()
                    ),
                    format!(
                        "-A ISTIO_OUTPUT -o lo -s {} -j RETURN",
                        if v6 { "::6/128" } else { "127.0.0.6/32" }
                    ),
                    untouched,
                    bypassed("outbound", "inbound_passthrough"),
                    None,
                ),
                Verdict::BypassLoopback if p.flags & POLICY_LOOPBACK_SIMPLE != 0 => (
                    format!(
                        "loopback rule: {dip} is routed over lo (127.0.0.0/8, ::1 or the pod's own address); \
                         this pod's mesh (Linkerd's proxy-init) leaves every loopback connection alone, the \
                         proxy's included"
                    ),
                    "-A PROXY_INIT_OUTPUT -o lo -j RETURN".into(),
                    untouched,
                    bypassed("outbound", "loopback"),
                    None,
                ),
                Verdict::BypassLoopback => {
                    if view.has_id(IDKEY_UID, q.uid) || view.has_id(IDKEY_GID, q.gid) {
                        notes.push(format!(
                            "uid {} / gid {} is a proxy identity of this pod, but not the first one \
                             ({id_name} {}); istio-iptables writes the first identity's loopback rule \
                             first, and it returns every other process",
                            q.uid, q.gid, p.lo_id
                        ));
                    }
                    (
                        format!(
                            "ISTIO_OUTPUT: {dip} is routed over lo (127.0.0.0/8, ::1, ::6 or the pod's \
                             own address) and the process is not the proxy ({id_name} {}): traffic inside \
                             the pod is not captured",
                            p.lo_id
                        ),
                        format!(
                            "-A ISTIO_OUTPUT -o lo -m owner ! {owner} {} -j RETURN",
                            p.lo_id
                        ),
                        untouched,
                        bypassed("outbound", "loopback"),
                        None,
                    )
                }
                Verdict::BypassProxy => {
                    let (w, o, id) = if view.has_id(IDKEY_UID, q.uid) {
                        ("uid", "--uid-owner", q.uid)
                    } else {
                        ("gid", "--gid-owner", q.gid)
                    };
                    let is_first = (p.lo_id_kind == ID_KIND_UID && q.uid == p.lo_id)
                        || (p.lo_id_kind == ID_KIND_GID && q.gid == p.lo_id);
                    if is_first && is_loopback_route(&addr_of(dip), view) {
                        notes.push(format!(
                            "{dst} is routed over lo, but the proxy-to-its-own-pod rule (ISTIO_IN_REDIRECT) \
                             does not apply: the destination is {}, the tunnel port {}, UDP, or port 53 \
                             with DNS capture",
                            if v6 { "::1" } else { "127.0.0.1" },
                            p.tunnel_port
                        ));
                    }
                    (
                        format!(
                            "ISTIO_OUTPUT: the connecting process is the proxy ({w} {id} is one of the \
                             pod's proxy identities): the proxy's own upstream connections are not captured"
                        ),
                        format!("-A ISTIO_OUTPUT -m owner {o} {id} -j RETURN"),
                        untouched,
                        bypassed("outbound", "proxy_identity"),
                        None,
                    )
                }
                Verdict::BypassLocalhost => (
                    format!(
                        "ISTIO_OUTPUT: the destination is {}",
                        if v6 { "::1" } else { "127.0.0.1" }
                    ),
                    format!("-A ISTIO_OUTPUT -d {} -j RETURN", localhost_cidr(v6)),
                    untouched,
                    bypassed("outbound", "localhost"),
                    None,
                ),
                Verdict::BypassExcludedCidr => {
                    let net = view
                        .exclude
                        .iter()
                        .filter(|n| n.contains(&dip))
                        .max_by_key(|n| n.prefix_len())
                        .map(|n| n.to_string())
                        .unwrap_or_else(|| dip.to_string());
                    (
                        format!("ISTIO_OUTPUT: {dip} is in excludeOutboundIPRanges ({net})"),
                        format!("-A ISTIO_OUTPUT -d {net} -j RETURN"),
                        untouched,
                        bypassed("outbound", "excluded_cidr"),
                        None,
                    )
                }
                Verdict::BypassNotIncluded
                    if !q.udp
                        && d == 53
                        && p.flags & POLICY_KUMA_ORDER != 0
                        && p.flags & POLICY_CAPTURE_DNS != 0 =>
                {
                    (
                        "Kuma's DNS capture: DNS over TCP of any process but the proxy is never \
                         captured"
                            .to_string(),
                        "-A OUTPUT -p tcp --dport 53 -m owner ! --uid-owner <proxy> -j RETURN"
                            .into(),
                        untouched,
                        bypassed("outbound", "not_included"),
                        None,
                    )
                }
                Verdict::BypassNotIncluded if q.udp => (
                    format!(
                        "UDP is only captured for DNS (port 53, with DNS capture on{}): {dst} is not a DNS query \
                         the proxy resolves",
                        if p.flags & POLICY_CAPTURE_DNS == 0 {
                            "; it is off for this pod"
                        } else {
                            ""
                        }
                    ),
                    "none: istio-iptables only redirects UDP port 53 (-A OUTPUT -p udp --dport 53 … -j REDIRECT)"
                        .into(),
                    untouched,
                    bypassed("outbound", "not_included"),
                    None,
                ),
                Verdict::BypassOwnerGroup => {
                    let groups = list_or_none(&view.owner_groups.iter().collect::<Vec<_>>());
                    let (why, ist) = if p.flags & POLICY_OWNER_GROUPS_EXCEPT != 0 {
                        (
                            format!(
                                "gid {} is in the owner groups excluded from capture \
                                 (ISTIO_OUTBOUND_OWNER_GROUPS_EXCLUDE: {groups})",
                                q.gid
                            ),
                            format!("-A ISTIO_OUTPUT -m owner --gid-owner {} -j RETURN", q.gid),
                        )
                    } else {
                        (
                            format!(
                                "gid {} is not one of the owner groups whose traffic is captured \
                                 (ISTIO_OUTBOUND_OWNER_GROUPS: {groups})",
                                q.gid
                            ),
                            format!(
                                "-A ISTIO_OUTPUT -m owner ! --gid-owner <each of {groups}> -j RETURN"
                            ),
                        )
                    };
                    (
                        format!("ISTIO_OUTPUT owner-group filter: {why}"),
                        ist,
                        untouched,
                        bypassed("outbound", "owner_group"),
                        None,
                    )
                }
                Verdict::RedirectDns => {
                    let server = if p.flags & POLICY_DNS_ALL_SERVERS != 0 {
                        "any server (DNS capture for every server)".to_string()
                    } else {
                        let net = view
                            .dns
                            .iter()
                            .filter(|n| n.contains(&dip))
                            .max_by_key(|n| n.prefix_len())
                            .map(|n| n.to_string())
                            .unwrap_or_else(|| dip.to_string());
                        format!("{dip}, one of the pod's resolvers ({net})")
                    };
                    let dash_d = if p.flags & POLICY_DNS_ALL_SERVERS != 0 {
                        String::new()
                    } else {
                        format!(" -d {}", IpNet::from(dip))
                    };
                    let (proto, chain) = if q.udp {
                        ("udp", "OUTPUT")
                    } else {
                        ("tcp", "ISTIO_OUTPUT")
                    };
                    (
                        format!(
                            "DNS capture: {proto} port 53 to {server}: redirected to the proxy's DNS listener"
                        ),
                        format!(
                            "-A {chain}{dash_d} -p {proto} --dport 53 -j REDIRECT --to-ports {}",
                            p.dns_port
                        ),
                        format!(
                            "{} (the proxy's DNS listener; replies appear to come from {dst})",
                            proxy_addr(dip, p.dns_port)
                        ),
                        captured("dns"),
                        if q.udp {
                            None
                        } else {
                            Some((p.dns_port, v6))
                        },
                    )
                }
                Verdict::BypassNotIncluded => (
                    format!(
                        "no ISTIO_OUTPUT rule matched: port {d} is not in includeOutboundPorts ({}) and {dip} \
                         is not in includeOutboundIPRanges ({})",
                        list_or_none(&view.ports_of(PORT_OUT_INCLUDE)),
                        list_or_none(&view.include)
                    ),
                    "end of ISTIO_OUTPUT: the connection leaves the chain unchanged".into(),
                    untouched,
                    bypassed("outbound", "not_included"),
                    None,
                ),
                Verdict::BypassTunnel | Verdict::BypassDisabled => (
                    off_rule,
                    off_istio,
                    untouched,
                    None,
                    None,
                ),
            },
            (true, Outcome::Decided(v)) => match v {
                Verdict::BypassExcludedInterface => (
                    "the connection arrives through an interface of excludeInterfaces".into(),
                    "-A PREROUTING -i <interface> -j RETURN".into(),
                    untouched.clone(),
                    bypassed("inbound", "port_rule"),
                    None,
                ),
                Verdict::RedirectInbound | Verdict::RedirectOutbound => {
                    let (why, ist) = if p.flags & POLICY_INBOUND_ALL_PORTS != 0 {
                        (
                            format!("includeInboundPorts is \"*\" and port {d} is not excluded"),
                            "-A ISTIO_INBOUND -p tcp -j ISTIO_IN_REDIRECT".to_string(),
                        )
                    } else {
                        (
                            format!("port {d} is in includeInboundPorts"),
                            format!("-A ISTIO_INBOUND -p tcp --dport {d} -j ISTIO_IN_REDIRECT"),
                        )
                    };
                    (
                        format!("ISTIO_INBOUND: {why}: steered to the proxy's inbound listener"),
                        format!(
                            "{ist}; -A ISTIO_IN_REDIRECT -p tcp -j REDIRECT --to-ports {}",
                            p.inbound_port
                        ),
                        format!(
                            "the proxy's listener on port {} (weir_sk_lookup; the local address stays {dst}, \
                             which SO_ORIGINAL_DST reports)",
                            p.inbound_port
                        ),
                        captured("inbound"),
                        Some((p.inbound_port, v6)),
                    )
                }
                Verdict::BypassTunnel => (
                    format!(
                        "ISTIO_INBOUND: port {d} is the HBONE tunnel port, never captured"
                    ),
                    format!("-A ISTIO_INBOUND -p tcp --dport {d} -j RETURN"),
                    untouched,
                    bypassed("inbound", "port_rule"),
                    None,
                ),
                Verdict::BypassExcludedPort => (
                    format!(
                        "ISTIO_INBOUND: port {d} is in excludeInboundPorts (which also holds the sidecar's \
                         status and Prometheus ports and the inbound port itself)"
                    ),
                    format!("-A ISTIO_INBOUND -p tcp --dport {d} -j RETURN"),
                    untouched,
                    bypassed("inbound", "port_rule"),
                    None,
                ),
                Verdict::BypassExcludedCidr => (
                    format!(
                        "the source is in the pod's skip-subnets ({}): Linkerd's proxy-init returns \
                         inbound connections from there before its redirect",
                        list_or_none(&view.skip_sources.iter().collect::<Vec<_>>())
                    ),
                    "-A PROXY_INIT_REDIRECT -s <subnet> -j RETURN".into(),
                    untouched,
                    bypassed("inbound", "port_rule"),
                    None,
                ),
                Verdict::BypassNotIncluded => (
                    format!(
                        "no ISTIO_INBOUND rule matched: port {d} is not in includeInboundPorts ({})",
                        list_or_none(&view.ports_of(PORT_IN_INCLUDE))
                    ),
                    "end of ISTIO_INBOUND: the connection reaches the application directly".into(),
                    untouched,
                    bypassed("inbound", "port_rule"),
                    None,
                ),
                _ => (
                    off_rule,
                    off_istio,
                    untouched,
                    bypassed("inbound", "port_rule"),
                    None,
                ),
            },
        };
    let proxy_listening = listen.map(|(port, v6)| listening(view, port, v6));
    let mut counter = counter;
    if q.udp && !q.inbound {
        // UDP is counted in datagrams (sockets when connected), apart from
        // TCP connections, and only to port 53.
        counter = (d == 53).then(|| {
            let result = if outcome.captured() {
                "captured"
            } else {
                "bypassed"
            };
            notes.push(
                "a UDP socket connect()ed to the server is counted once, in weir_dns_udp_sockets_total, instead"
                    .into(),
            );
            format!("weir_dns_udp_datagrams_total{{{labels},result=\"{result}\"}}")
        });
    }
    if proxy_listening == Some(false) {
        let (port, _) = listen.unwrap_or_default();
        if q.inbound {
            notes.push(format!(
                "no proxy listener on port {port} is recorded in LISTENERS for this pod: the connection \
                 is refused with RST (fail closed), never delivered to the application behind the proxy's back"
            ));
            counter = Some(format!(
                "weir_fail_closed_total{{{labels},direction=\"inbound\"}}"
            ));
        } else {
            notes.push(format!(
                "no proxy listener on port {port} is recorded in LISTENERS for this pod: if the proxy is \
                 not listening, connect() is refused (fail closed, weir_fail_closed_total{{direction=\"outbound\"}})"
            ));
        }
    }
    if q.inbound && (q.uid != DEFAULT_UID || q.gid != DEFAULT_UID) {
        notes.push("--uid/--gid do not matter for inbound connections".into());
    }
    Explanation {
        pod: format!("{}/{}", view.namespace, view.name),
        netns_cookie: view.cookie,
        direction: if q.inbound { "inbound" } else { "outbound" },
        dst: dst.to_string(),
        src: q.src.map(|s| s.to_string()),
        uid: (!q.inbound).then_some(q.uid),
        gid: (!q.inbound).then_some(q.gid),
        protocol: if q.udp && !q.inbound { "udp" } else { "tcp" },
        verdict: outcome.name(),
        captured: outcome.captured(),
        rule,
        istio_rule: istio,
        target,
        counter,
        proxy_listening,
        notes,
    }
}

/// Default `--uid` of `weir explain`: an ordinary application user.
pub const DEFAULT_UID: u32 = 1000;

/// Formats an explanation for people.
pub fn render_text(e: &Explanation) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "pod:      {} (netns cookie {})", e.pod, e.netns_cookie);
    let mut conn = format!("{} {} to {}", e.direction, e.protocol.to_uppercase(), e.dst);
    if let Some(src) = &e.src {
        let _ = write!(conn, " from {src}");
    }
    if let (Some(u), Some(g)) = (e.uid, e.gid) {
        let _ = write!(conn, " by uid {u} gid {g}");
    }
    let _ = writeln!(s, "query:    {conn}");
    let _ = writeln!(
        s,
        "verdict:  {} ({})",
        if e.captured {
            "CAPTURED"
        } else {
            "NOT CAPTURED"
        },
        e.verdict
    );
    let _ = writeln!(s, "rule:     {}", e.rule);
    let _ = writeln!(s, "istio:    {}", e.istio_rule);
    let _ = writeln!(s, "target:   {}", e.target);
    if let Some(l) = e.proxy_listening {
        let _ = writeln!(
            s,
            "listener: {}",
            if l {
                "recorded (the proxy is listening)"
            } else {
                "NOT recorded"
            }
        );
    }
    if let Some(c) = &e.counter {
        let _ = writeln!(s, "counter:  {c}");
    }
    for n in &e.notes {
        let _ = writeln!(s, "note:     {n}");
    }
    s
}

/// Runs `weir explain` and prints the answer.
pub fn print(bpffs: &Path, q: &Query, format: Format) -> Result<()> {
    let e = explain(bpffs, q)?;
    let text = match format {
        Format::Json => format!("{}\n", serde_json::to_string_pretty(&e)?),
        Format::Text => render_text(&e),
    };
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        // `weir explain ... | head` closed the pipe: not an error.
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        r => r.context("writing to stdout"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::{Mesh, pod_rules};
    use std::collections::BTreeMap;

    /// A view as the agent would write it for an Istio pod at 198.18.0.1.
    fn view(annotations: &[(&str, &str)]) -> PodView {
        view_of(Mesh::Istio, annotations)
    }

    fn view_of(mesh: Mesh, annotations: &[(&str, &str)]) -> PodView {
        let ann: BTreeMap<String, String> = annotations
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let ips: [IpAddr; 2] = ["198.18.0.1".parse().unwrap(), "2001:2::1".parse().unwrap()];
        let r = pod_rules(mesh, &ips, &ann).unwrap();
        let e = r.entries(7);
        let nets = |keys: &[(u32, CidrData)]| -> Vec<IpNet> {
            keys.iter()
                .map(|(bits, data)| net_of_key(&Key::new(*bits, *data)).unwrap())
                .collect()
        };
        let ids = |kind: u32| -> BTreeSet<u32> {
            e.ids
                .iter()
                .filter(|k| k.kind == kind)
                .map(|k| k.id)
                .collect()
        };
        // Built from the map entries the agent writes, as `explain` reads
        // them back.
        PodView {
            namespace: "default".into(),
            name: "app".into(),
            cookie: 7,
            policy: r.policy,
            ports: e.ports.iter().map(|k| (k.kind, k.port)).collect(),
            uids: ids(IDKEY_UID),
            gids: ids(IDKEY_GID),
            owner_groups: ids(IDKEY_OWNER_GROUP),
            exclude: nets(&e.exclude),
            include: nets(&e.include),
            dns: nets(&e.dns),
            iface_routes: Vec::new(),
            skip_sources: nets(&e.skip_src),
            excluded_ifindexes: BTreeSet::new(),
            addrs: e.addrs.iter().map(ip_of).collect(),
            listeners: [(15001, AF_INET as u16), (15006, AF_INET as u16)]
                .into_iter()
                .collect(),
        }
    }

    fn q(dst: &str, uid: u32, inbound: bool) -> Query {
        Query {
            pod: "default/app".into(),
            dst: dst.parse().unwrap(),
            uid,
            gid: uid,
            src: None,
            inbound,
            udp: false,
            mark: 0,
        }
    }

    /// Runs the shared decision over the in-memory view and describes it.
    fn run(v: &PodView, q: &Query) -> Explanation {
        let outcome = if q.inbound {
            decide_in(v, q, v)
        } else {
            Outcome::Decided(decide_out(&v.policy, q, v))
        };
        describe(v, q, outcome)
    }

    #[test]
    fn captured_outbound_names_the_redirect() {
        let e = run(&view(&[]), &q("198.18.0.2:80", 1000, false));
        assert_eq!(e.verdict, "redirect_outbound");
        assert!(e.captured);
        assert!(e.target.starts_with("127.0.0.1:15001"), "{}", e.target);
        assert!(e.rule.contains("\"*\""), "{}", e.rule);
        assert_eq!(
            e.istio_rule,
            "-A ISTIO_OUTPUT -j ISTIO_REDIRECT; -A ISTIO_REDIRECT -p tcp -j REDIRECT --to-ports 15001"
        );
        assert_eq!(
            e.counter.as_deref(),
            Some(
                "weir_connections_captured_total{namespace=\"default\",pod=\"app\",direction=\"outbound\"}"
            )
        );
        assert_eq!(e.proxy_listening, Some(true));
        assert!(e.notes.is_empty(), "{:?}", e.notes);
    }

    #[test]
    fn a_family_the_pod_lacks_is_not_captured() {
        let ann: BTreeMap<String, String> = BTreeMap::new();
        let r = pod_rules(Mesh::Istio, &["198.18.0.1".parse().unwrap()], &ann).unwrap();
        let mut v = view(&[]);
        v.policy = r.policy;
        let e = run(&v, &q("[2001:2::2]:80", 1000, false));
        assert_eq!(e.verdict, "bypass_no_route");
        assert!(!e.captured);
    }

    #[test]
    fn ipv6_redirect_targets_ipv6_loopback() {
        let e = run(&view(&[]), &q("[2001:2::2]:80", 1000, false));
        assert_eq!(e.verdict, "redirect_outbound");
        assert!(e.target.starts_with("[::1]:15001"), "{}", e.target);
        // Only an IPv4 listener is recorded in this view.
        assert_eq!(e.proxy_listening, Some(false));
        assert!(e.notes[0].contains("fail closed"), "{:?}", e.notes);
    }

    #[test]
    fn excluded_port_quotes_the_return_rule() {
        let v = view(&[("traffic.sidecar.istio.io/excludeOutboundPorts", "3306")]);
        let e = run(&v, &q("198.18.0.2:3306", 1000, false));
        assert_eq!(e.verdict, "bypass_excluded_port");
        assert!(!e.captured);
        assert!(e.rule.contains("excludeOutboundPorts"), "{}", e.rule);
        assert_eq!(
            e.istio_rule,
            "-A ISTIO_OUTPUT -p tcp --dport 3306 -j RETURN"
        );
        assert_eq!(e.target, "198.18.0.2:3306 (untouched)");
        assert!(e.counter.unwrap().contains("reason=\"excluded_port\""));
        assert_eq!(e.proxy_listening, None);
    }

    #[test]
    fn proxy_uid_and_loopback_rules() {
        let v = view(&[]);
        let e = run(&v, &q("198.18.0.2:80", 1337, false));
        assert_eq!(e.verdict, "bypass_proxy");
        assert_eq!(
            e.istio_rule,
            "-A ISTIO_OUTPUT -m owner --uid-owner 1337 -j RETURN"
        );
        assert!(e.counter.unwrap().contains("reason=\"proxy_identity\""));

        let e = run(&v, &q("127.0.0.1:8080", 1000, false));
        assert_eq!(e.verdict, "bypass_loopback");
        assert_eq!(
            e.istio_rule,
            "-A ISTIO_OUTPUT -o lo -m owner ! --uid-owner 1337 -j RETURN"
        );

        // The proxy to 127.0.0.1: no ISTIO_IN_REDIRECT, its own RETURN.
        let e = run(&v, &q("127.0.0.1:8080", 1337, false));
        assert_eq!(e.verdict, "bypass_proxy");
        assert!(e.notes[0].contains("ISTIO_IN_REDIRECT"), "{:?}", e.notes);

        // The proxy to its own pod IP: to the inbound listener.
        let e = run(&v, &q("198.18.0.1:8080", 1337, false));
        assert_eq!(e.verdict, "redirect_inbound");
        assert_eq!(
            e.istio_rule,
            "-A ISTIO_OUTPUT ! -d 127.0.0.1/32 -o lo -p tcp ! --dport 15008 -m owner --uid-owner 1337 \
             -j ISTIO_IN_REDIRECT; -A ISTIO_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15006"
        );
        assert!(e.target.starts_with("127.0.0.1:15006"), "{}", e.target);
        assert!(
            e.counter
                .unwrap()
                .contains("direction=\"outbound_to_inbound\"")
        );
    }

    #[test]
    fn passthrough_and_cidr_rules() {
        let v = view(&[
            (
                "traffic.sidecar.istio.io/excludeOutboundIPRanges",
                "198.18.5.0/24",
            ),
            (
                "traffic.sidecar.istio.io/includeOutboundIPRanges",
                "198.18.0.0/16",
            ),
        ]);
        let mut query = q("198.18.0.1:9080", 1337, false);
        query.src = Some("127.0.0.6".parse().unwrap());
        let e = run(&v, &query);
        assert_eq!(e.verdict, "bypass_passthrough");
        assert_eq!(
            e.istio_rule,
            "-A ISTIO_OUTPUT -o lo -s 127.0.0.6/32 -j RETURN"
        );

        let e = run(&v, &q("198.18.5.9:80", 1000, false));
        assert_eq!(e.verdict, "bypass_excluded_cidr");
        assert_eq!(e.istio_rule, "-A ISTIO_OUTPUT -d 198.18.5.0/24 -j RETURN");

        let e = run(&v, &q("198.18.7.9:80", 1000, false));
        assert_eq!(e.verdict, "redirect_outbound");
        assert!(
            e.istio_rule
                .starts_with("-A ISTIO_OUTPUT -d 198.18.0.0/16 -j ISTIO_REDIRECT")
        );

        let e = run(&v, &q("10.1.2.3:80", 1000, false));
        assert_eq!(e.verdict, "bypass_not_included");
        assert!(e.rule.contains("198.18.0.0/16"), "{}", e.rule);
    }

    #[test]
    fn inbound_rules_and_sk_lookup_checks() {
        let v = view(&[("traffic.sidecar.istio.io/excludeInboundPorts", "8081")]);
        let e = run(&v, &q("198.18.0.1:8080", DEFAULT_UID, true));
        assert_eq!(e.verdict, "redirect_inbound");
        assert!(e.target.contains("port 15006"), "{}", e.target);
        assert_eq!(
            e.istio_rule,
            "-A ISTIO_INBOUND -p tcp -j ISTIO_IN_REDIRECT; -A ISTIO_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15006"
        );
        assert_eq!(e.uid, None);
        assert!(e.counter.unwrap().contains("direction=\"inbound\""));

        let e = run(&v, &q("198.18.0.1:8081", DEFAULT_UID, true));
        assert_eq!(e.verdict, "bypass_excluded_port");
        assert_eq!(
            e.istio_rule,
            "-A ISTIO_INBOUND -p tcp --dport 8081 -j RETURN"
        );
        assert!(e.counter.unwrap().contains("reason=\"port_rule\""));

        let e = run(&v, &q("198.18.0.1:15008", DEFAULT_UID, true));
        assert_eq!(e.verdict, "bypass_tunnel");
        let e = run(&v, &q("[::ffff:198.18.0.1]:8080", DEFAULT_UID, true));
        assert_eq!(e.verdict, "redirect_inbound");

        let e = run(&v, &q("198.18.0.9:8080", DEFAULT_UID, true));
        assert_eq!(e.verdict, "pass_not_pod_address");
        assert!(e.rule.contains("198.18.0.1"), "{}", e.rule);

        let mut query = q("198.18.0.1:8080", DEFAULT_UID, true);
        query.src = Some("127.0.0.1".parse().unwrap());
        assert_eq!(run(&v, &query).verdict, "pass_from_inside_pod");
    }

    #[test]
    fn inbound_without_listener_fails_closed() {
        let mut v = view(&[]);
        v.listeners.clear();
        let e = run(&v, &q("198.18.0.1:8080", DEFAULT_UID, true));
        assert_eq!(e.proxy_listening, Some(false));
        assert!(e.counter.unwrap().starts_with("weir_fail_closed_total"));
        assert!(e.notes[0].contains("RST"), "{:?}", e.notes);
    }

    #[test]
    fn dns_capture() {
        let v = view(&[
            ("weir.dev/dns-capture", "true"),
            ("weir.dev/dns-servers", "198.18.0.53"),
        ]);
        let mut query = q("198.18.0.53:53", 1000, false);
        query.udp = true;
        let e = run(&v, &query);
        assert_eq!(e.verdict, "redirect_dns");
        assert_eq!(e.protocol, "udp");
        assert_eq!(
            e.istio_rule,
            "-A OUTPUT -d 198.18.0.53/32 -p udp --dport 53 -j REDIRECT --to-ports 15053"
        );
        assert!(e.target.starts_with("127.0.0.1:15053"), "{}", e.target);
        assert!(render_text(&e).contains("outbound UDP to 198.18.0.53:53"));
        // Another server: UDP is left alone, TCP goes to the outbound port.
        query.dst = "198.18.0.9:53".parse().unwrap();
        let e = run(&v, &query);
        assert_eq!(e.verdict, "bypass_not_included");
        assert!(
            e.rule.contains("UDP is only captured for DNS"),
            "{}",
            e.rule
        );
        query.udp = false;
        assert_eq!(run(&v, &query).verdict, "redirect_outbound");
    }

    #[test]
    fn owner_groups_and_linkerd_loopback() {
        let v = view(&[("weir.dev/outbound-owner-groups-exclude", "2000")]);
        let mut query = q("198.18.0.2:80", 1000, false);
        query.gid = 2000;
        let e = run(&v, &query);
        assert_eq!(e.verdict, "bypass_owner_group");
        assert_eq!(
            e.istio_rule,
            "-A ISTIO_OUTPUT -m owner --gid-owner 2000 -j RETURN"
        );
        assert!(
            e.rule.contains("ISTIO_OUTBOUND_OWNER_GROUPS_EXCLUDE"),
            "{}",
            e.rule
        );

        let v = view_of(Mesh::Linkerd, &[]);
        let e = run(&v, &q("198.18.0.1:8080", 2102, false));
        assert_eq!(e.verdict, "bypass_loopback");
        assert_eq!(e.istio_rule, "-A PROXY_INIT_OUTPUT -o lo -j RETURN");
    }

    /// Every series `weir explain` names is one `/metrics` exports.
    #[test]
    fn counters_exist_in_metrics() {
        let metrics = include_str!("metrics.rs");
        let v = view(&[]);
        for verdict in [
            Verdict::RedirectOutbound,
            Verdict::RedirectInbound,
            Verdict::BypassExcludedPort,
            Verdict::BypassPassthrough,
            Verdict::BypassLoopback,
            Verdict::BypassProxy,
            Verdict::BypassLocalhost,
            Verdict::BypassExcludedCidr,
            Verdict::BypassNotIncluded,
            Verdict::BypassTunnel,
            Verdict::BypassDisabled,
            Verdict::BypassOwnerGroup,
            Verdict::RedirectDns,
            Verdict::BypassExcludedInterface,
            Verdict::BypassNoRoute,
            Verdict::BypassZtunnel,
        ] {
            for (inbound, udp) in [(false, false), (true, false), (false, true)] {
                let query = Query {
                    udp,
                    ..q(
                        if udp {
                            "198.18.0.1:53"
                        } else {
                            "198.18.0.1:80"
                        },
                        1000,
                        inbound,
                    )
                };
                let mut e = describe(&v, &query, Outcome::Decided(verdict));
                if udp {
                    assert!(
                        e.counter
                            .as_deref()
                            .is_some_and(|c| c.starts_with("weir_dns_udp_datagrams_total")),
                        "{verdict:?}: {:?}",
                        e.counter
                    );
                }
                let mut counters: Vec<String> = e.counter.take().into_iter().collect();
                let mut closed = v.clone();
                closed.listeners.clear();
                let e2 = describe(&closed, &query, Outcome::Decided(verdict));
                counters.extend(e2.counter);
                for c in counters {
                    let (name, labels) = c.split_once('{').unwrap();
                    assert!(
                        metrics.contains(&format!("\"{name}\"")),
                        "{name} is not a metric of metrics.rs"
                    );
                    for kv in labels.trim_end_matches('}').split(',') {
                        let (k, val) = kv.split_once('=').unwrap();
                        if k == "namespace" || k == "pod" {
                            continue;
                        }
                        assert!(
                            metrics.contains(val),
                            "label {k}={val} of {name} does not appear in metrics.rs"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn capture_disabled() {
        let v = view(&[("sidecar.istio.io/interceptionMode", "NONE")]);
        let e = run(&v, &q("198.18.0.2:80", 1000, false));
        assert_eq!(e.verdict, "bypass_disabled");
        assert!(e.rule.contains("NONE"));
        assert_eq!(e.counter, None);
    }

    #[test]
    fn ipv6_only_pod_without_ipv6_rules_is_not_blamed_on_interception_mode() {
        // An Istio pod without dual stack whose only address is IPv6 but
        // enrolled with capture-ipv6 false: nothing of its family captured.
        let ann: BTreeMap<String, String> = [("weir.dev/capture-ipv6", "false")]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let r = pod_rules(Mesh::Istio, &["2001:2::1".parse().unwrap()], &ann).unwrap();
        let mut v = view(&[]);
        v.policy = r.policy;
        let e = run(&v, &q("[2001:2::2]:80", 1000, false));
        assert_eq!(e.verdict, "bypass_disabled");
        assert!(
            e.rule.contains("no address of a family its mesh captures")
                && e.rule.contains("capture-ipv6"),
            "{}",
            e.rule
        );
        assert!(
            !e.rule.starts_with("capture is off for this pod (sidecar"),
            "{}",
            e.rule
        );
    }

    #[test]
    fn every_verdict_has_a_name_and_text() {
        let v = view(&[]);
        for verdict in [
            Verdict::RedirectOutbound,
            Verdict::RedirectInbound,
            Verdict::BypassExcludedPort,
            Verdict::BypassPassthrough,
            Verdict::BypassLoopback,
            Verdict::BypassProxy,
            Verdict::BypassLocalhost,
            Verdict::BypassExcludedCidr,
            Verdict::BypassNotIncluded,
            Verdict::BypassTunnel,
            Verdict::BypassDisabled,
            Verdict::BypassOwnerGroup,
            Verdict::RedirectDns,
            Verdict::BypassExcludedInterface,
            Verdict::BypassNoRoute,
        ] {
            for inbound in [false, true] {
                let e = describe(
                    &v,
                    &q("198.18.0.1:80", 1000, inbound),
                    Outcome::Decided(verdict),
                );
                assert!(!e.rule.is_empty() && !e.istio_rule.is_empty());
                assert!(e.verdict.starts_with("redirect_") || e.verdict.starts_with("bypass_"));
                let text = render_text(&e);
                assert!(text.contains(e.verdict), "{text}");
            }
        }
    }

    #[test]
    fn cidr_keys_round_trip() {
        for s in ["198.18.5.0/24", "0.0.0.0/0", "2001:2:5::/48", "::/0"] {
            let net: IpNet = s.parse().unwrap();
            let (bits, data) = crate::policy::cidr_key(7, &net);
            assert_eq!(net_of_key(&Key::new(bits, data)), Some(net), "{s}");
        }
    }

    #[test]
    fn pod_argument_is_checked() {
        assert_eq!(split_pod("default/app").unwrap(), ("default", "app"));
        for bad in ["app", "/app", "default/", "a/b/c"] {
            let e = split_pod(bad).unwrap_err().to_string();
            assert!(e.contains("NAMESPACE/NAME"), "{e}");
        }
    }
}
