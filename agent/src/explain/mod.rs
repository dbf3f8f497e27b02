//! `weir explain`: what weir does with one connection of one pod, and which
//! rule decides it.
//!
//! The pod's tables are read back from the pinned maps (so this works while
//! an agent runs and on a node where it crashed) and handed to
//! [`decide_outbound`] / [`decide_inbound`], the very functions the kernel
//! programs run. The kernel programs' own checks around those calls (the
//! inbound "is this one of the pod's addresses" and "does this come from
//! inside the pod" tests of `weir_sk_lookup`) are reproduced here too.

use std::collections::BTreeSet;
use std::io::Write as _;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::path::Path;

use anyhow::{Context, Result, bail};
use aya::maps::lpm_trie::Key;
use aya::maps::{Array, HashMap, Map, MapData, SockHash};
use ipnet::IpNet;
use serde::Serialize;
use weir_common::*;

use crate::datapath::Pins;
use crate::pod_tables::{PodEntries, PodMaps};
use crate::policy::{addr_of, ip_of};

mod describe;
pub use describe::{DEFAULT_UID, describe, render_text};

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
pub struct EnrolledPod {
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
    /// `POD_ADDRS` entries pointing at this pod.
    pub addrs: BTreeSet<IpAddr>,
    /// `LISTENERS` keys of this pod as (port, address family).
    pub listeners: BTreeSet<(u16, u16)>,
    /// The pod's entries in the per-pod tables, as read back: what the
    /// decision looks up (the fields above are their readable form).
    pub entries: PodEntries,
}

impl EnrolledPod {
    /// The view of pod `namespace/name` with policy `policy` and the
    /// per-pod table entries `entries` (listeners left empty).
    pub fn new(namespace: String, name: String, policy: PodPolicy, entries: PodEntries) -> Self {
        let ids = |kind: u32| -> BTreeSet<u32> {
            entries
                .proxy_ids
                .keys()
                .filter(|k| k.kind == kind)
                .map(|k| k.id)
                .collect()
        };
        let nets = |keys: &std::collections::BTreeMap<(u32, CidrData), u32>| -> Vec<IpNet> {
            let mut v: Vec<IpNet> = keys
                .keys()
                .filter_map(|(bits, data)| net_of_key(&Key::new(*bits, *data)))
                .collect();
            v.sort();
            v
        };
        EnrolledPod {
            namespace,
            name,
            cookie: entries.cookie,
            policy,
            ports: entries
                .port_rules
                .keys()
                .map(|k| (k.kind, k.port))
                .collect(),
            owner_groups: ids(IDKEY_OWNER_GROUP),
            exclude: nets(&entries.cidr_exclude),
            include: nets(&entries.cidr_include),
            dns: nets(&entries.cidr_dns),
            iface_routes: nets(&entries.cidr_iface),
            skip_sources: nets(&entries.cidr_skip_src),
            addrs: entries.pod_addrs.keys().map(ip_of).collect(),
            listeners: BTreeSet::new(),
            entries,
        }
    }

    fn ports_of(&self, kind: u16) -> Vec<u16> {
        self.ports
            .iter()
            .filter(|(k, _)| *k == kind)
            .map(|(_, p)| *p)
            .collect()
    }
}

/// The pod's entries answer as the kernel's lookups in its maps do.
impl PodTables for EnrolledPod {
    fn has_port(&self, kind: u16, port: u16) -> bool {
        self.entries.has_port(kind, port)
    }
    fn has_id(&self, kind: u32, id: u32) -> bool {
        self.entries.has_id(kind, id)
    }
    fn in_cidrs(&self, list: CidrList, addr: &Addr) -> bool {
        self.entries.in_cidrs(list, addr)
    }
    fn is_pod_addr(&self, addr: &Addr) -> bool {
        self.entries.is_pod_addr(addr)
    }
    fn is_virt_iface(&self, ifindex: u32) -> bool {
        self.entries.is_virt_iface(ifindex)
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
    /// Inbound: it arrives through one of the pod's virtual interfaces
    /// (`reroute-virtual-interfaces`); `weir_sk_lookup` passes it on.
    VirtualInterface,
}

impl Outcome {
    /// Short machine-readable name (`redirect_outbound`, …).
    pub fn name(self) -> &'static str {
        match self {
            Outcome::Decided(v) => v.name(),
            Outcome::NotPodAddress => "pass_not_pod_address",
            Outcome::FromInsidePod => "pass_from_inside_pod",
            Outcome::VirtualInterface => "pass_virtual_interface",
        }
    }

    /// Whether the connection goes to the proxy.
    pub fn captured(self) -> bool {
        matches!(self, Outcome::Decided(v) if v.captured())
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
    /// Why the pod is ambient (`pod label ...`, `namespace label ...`), as
    /// the Kubernetes agent recorded it (`--state-file`).
    pub enrolled_because: Option<String>,
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
pub fn explain(bpffs: &Path, state_file: &Path, q: &Query) -> Result<Explanation> {
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
    let wm: Array<MapData, WeirMeta> = Array::try_from(Map::Array(pins.open_map("WEIR_META")?))?;
    let layout = wm.get(&0, 0).context("reading WEIR_META")?.layout_version;
    if layout != LAYOUT_VERSION {
        bail!(
            "the maps pinned under {} have map layout v{layout}, this weir reads v{LAYOUT_VERSION}: \
             run the `weir explain` of the weir version that wrote them (the running agent's binary)",
            pins.maps().display()
        );
    }
    let meta: HashMap<MapData, u64, PodMeta> =
        HashMap::try_from(Map::HashMap(pins.open_map("POD_META")?))?;
    let policy: HashMap<MapData, u64, PodPolicy> =
        HashMap::try_from(Map::HashMap(pins.open_map("POD_POLICY")?))?;
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
        let (ns, name) = crate::datapath::pod_meta_names(&m);
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

    let entries = PodMaps::open_pinned(&pins.maps())?.entries_of(cookie)?;
    let key = format!("{want_ns}/{want_name}");
    let mut view = EnrolledPod::new(want_ns, want_name, p, entries);
    let listeners: SockHash<MapData, ListenerKey> =
        SockHash::try_from(Map::SockHash(pins.open_map("LISTENERS")?))?;
    for k in listeners.keys() {
        let k = k.context("reading LISTENERS")?;
        if k.netns_cookie == cookie {
            view.listeners.insert((k.port, k.family));
        }
    }

    let outcome = if q.inbound {
        decide_in(&view, q, &view)
    } else {
        Outcome::Decided(decide_out(&view.policy, q, &view))
    };
    let mut e = describe(&view, q, outcome);
    e.enrolled_because = crate::reasons::Reasons::read(state_file)
        .reason(&key, cookie)
        .map(str::to_string);
    Ok(e)
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
fn decide_in<T: PodTables>(view: &EnrolledPod, q: &Query, t: &T) -> Outcome {
    // As the kernel sees it: IPv4-mapped IPv6 is IPv4.
    if !view.addrs.contains(&ip_of(&addr_of(q.dst.ip()))) {
        return Outcome::NotPodAddress;
    }
    // The kernel's checks before the capture rules. The arriving
    // interface is not asked for: 0 is none of the pod's interfaces.
    if let Some(src) = q.src {
        match inbound_pass(&addr_of(src), 0, t) {
            Some(InboundPass::FromInsidePod) => return Outcome::FromInsidePod,
            Some(InboundPass::VirtualInterface) => return Outcome::VirtualInterface,
            None => {}
        }
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

/// Runs `weir explain` and prints the answer.
pub fn print(bpffs: &Path, state_file: &Path, q: &Query, format: Format) -> Result<()> {
    let e = explain(bpffs, state_file, q)?;
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
    fn view(annotations: &[(&str, &str)]) -> EnrolledPod {
        view_of(Mesh::Istio, annotations)
    }

    fn view_of(mesh: Mesh, annotations: &[(&str, &str)]) -> EnrolledPod {
        let ann: BTreeMap<String, String> = annotations
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let ips: [IpAddr; 2] = ["198.18.0.1".parse().unwrap(), "2001:2::1".parse().unwrap()];
        let r = pod_rules(mesh, &ips, &ann).unwrap();
        // Built from the map entries the agent writes, as `explain` reads
        // them back.
        let mut v = EnrolledPod::new("default".into(), "app".into(), r.policy, r.entries(7));
        v.listeners = [(15001, AF_INET as u16), (15006, AF_INET as u16)]
            .into_iter()
            .collect();
        v
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
    fn run(v: &EnrolledPod, q: &Query) -> Explanation {
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

    /// An ambient pod's redirects are istio-cni's in-pod rules (ztunnel),
    /// not istio-iptables' sidecar rules.
    #[test]
    fn ambient_redirects_name_istio_cni_rules() {
        let v = view_of(Mesh::Ambient, &[]);
        let e = run(&v, &q("198.18.0.2:9080", 1000, false));
        assert_eq!(e.verdict, "redirect_outbound");
        assert!(e.rule.contains("ambient pod"), "{}", e.rule);
        assert!(
            e.target.contains("ztunnel's outbound listener"),
            "{}",
            e.target
        );
        assert_eq!(
            e.istio_rule,
            "-A ISTIO_OUTPUT ! -d 127.0.0.1/32 -p tcp -m mark ! --mark 0x539/0xfff -j REDIRECT --to-ports 15001"
        );
        let e = run(&v, &q("[2001:2::2]:9080", 1000, false));
        assert!(
            e.istio_rule.starts_with("-A ISTIO_OUTPUT ! -d ::1/128 "),
            "{}",
            e.istio_rule
        );

        let e = run(&v, &q("198.18.0.1:9080", 0, true));
        assert_eq!(e.verdict, "redirect_inbound");
        assert_eq!(
            e.istio_rule,
            "-A ISTIO_PRERT ! -d 127.0.0.1/32 -p tcp ! --dport 15008 -m mark ! --mark 0x539/0xfff -j REDIRECT --to-ports 15006"
        );
        assert!(
            e.target.starts_with("ztunnel's listener on port 15006"),
            "{}",
            e.target
        );
        let e = run(&v, &q("198.18.0.1:15008", 0, true));
        assert_eq!(e.verdict, "bypass_tunnel");
        assert!(e.rule.contains("ztunnel's HBONE port"), "{}", e.rule);
        assert!(!e.captured);

        // Sidecar pods keep istio-iptables' wording.
        let e = run(&view(&[]), &q("198.18.0.1:9080", 0, true));
        assert!(e.rule.starts_with("ISTIO_INBOUND"), "{}", e.rule);
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
        let v = view(&[]);
        for verdict in Verdict::ALL.iter().copied() {
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
                    let family = crate::metrics::POD_FAMILIES
                        .iter()
                        .find(|f| f.name == name)
                        .unwrap_or_else(|| panic!("{name} is not a family of /metrics"));
                    let (names, values): (Vec<&str>, Vec<&str>) = labels
                        .trim_end_matches('}')
                        .split(',')
                        .map(|kv| kv.split_once('=').unwrap())
                        .filter(|(k, _)| *k != "namespace" && *k != "pod")
                        .map(|(k, v)| (k, v.trim_matches('"')))
                        .unzip();
                    assert_eq!(names, family.labels, "{c}");
                    assert!(
                        PodCounter::ALL
                            .iter()
                            .any(|k| k.series() == (name, values.as_slice())),
                        "{c} is no counter's series"
                    );
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
        for verdict in Verdict::ALL.iter().copied() {
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
