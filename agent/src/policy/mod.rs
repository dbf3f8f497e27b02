//! Pod annotations -> per-pod capture rules -> BPF map entries.
//!
//! Pure logic, no kernel: everything here is unit tested. Parsing follows
//! `istio-iptables` (split on commas, trim spaces, skip empty items; `*`
//! means every value, an empty list means none).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::IpAddr;

use ipnet::IpNet;
use weir_common::*;

/// The mesh whose sidecar conventions a pod follows.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mesh {
    /// Istio: 15001/15006, UID/GID 1337, tunnel 15008.
    #[default]
    Istio,
    /// Linkerd: 4140/4143, UID 2102.
    Linkerd,
    /// Kuma: 15001/15006, UID 5678.
    Kuma,
    /// Istio ambient mode: no sidecar; ztunnel listens inside the pod on
    /// 15001/15006/15008/15053 and marks its own sockets 0x539.
    Ambient,
}

impl fmt::Display for Mesh {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Mesh::Istio => "istio",
            Mesh::Linkerd => "linkerd",
            Mesh::Kuma => "kuma",
            Mesh::Ambient => "ambient",
        })
    }
}

/// Defaults of a mesh profile.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Profile {
    /// Outbound capture port.
    pub outbound_port: u16,
    /// Inbound capture port.
    pub inbound_port: u16,
    /// Never-captured tunnel port (0: none).
    pub tunnel_port: u16,
    /// DNS capture port.
    pub dns_port: u16,
    /// Proxy UIDs.
    pub uids: Vec<u32>,
    /// Proxy GIDs.
    pub gids: Vec<u32>,
    /// Inbound ports always excluded (besides the status port).
    pub always_excluded_inbound: Vec<u16>,
    /// Default status port (Istio's `status.sidecar.istio.io/port`).
    pub status_port: u16,
}

impl Mesh {
    /// The profile's defaults.
    pub fn profile(self) -> Profile {
        match self {
            Mesh::Istio => Profile {
                outbound_port: 15001,
                inbound_port: 15006,
                tunnel_port: 15008,
                dns_port: 15053,
                uids: vec![1337],
                gids: vec![1337],
                // Envoy's Prometheus port and the readiness port, which the
                // injector always adds to excludeInboundPorts.
                always_excluded_inbound: vec![15090, 15021],
                status_port: 15020,
            },
            Mesh::Linkerd => Profile {
                outbound_port: 4140,
                inbound_port: 4143,
                tunnel_port: 0,
                dns_port: 0,
                uids: vec![2102],
                gids: vec![],
                // linkerd-proxy's admin and control ports.
                always_excluded_inbound: vec![4190, 4191],
                status_port: 0,
            },
            Mesh::Kuma => Profile {
                outbound_port: 15001,
                inbound_port: 15006,
                tunnel_port: 0,
                dns_port: 15053,
                uids: vec![5678],
                gids: vec![],
                // kuma-dp's readiness port (the injector excludes it while
                // Envoy's admin API is on a Unix socket, the default); the
                // probe proxy port (9001) comes from its annotation.
                always_excluded_inbound: vec![9902],
                status_port: 0,
            },
            // istio-cni's in-pod rules: no proxy identity (ztunnel's
            // sockets are told by their mark), nothing excluded inbound
            // but the HBONE port.
            Mesh::Ambient => Profile {
                outbound_port: 15001,
                inbound_port: 15006,
                tunnel_port: 15008,
                dns_port: 15053,
                uids: vec![],
                gids: vec![],
                always_excluded_inbound: vec![],
                status_port: 0,
            },
        }
    }
}

/// Sources and destinations istio-cni never captures in ambient pods: the
/// address its host rule SNATs kubelet probes to
/// (`HOST_PROBE_SNAT_ADDRESS`, 169.254.7.127) and Istio's IPv6 default for
/// it. weir adds the node's own addresses as inbound sources (it has no
/// host SNAT rule; docs/ambient.md).
pub const PROBE_SOURCES: [IpAddr; 2] = [
    IpAddr::V4(std::net::Ipv4Addr::new(169, 254, 7, 127)),
    IpAddr::V6(std::net::Ipv6Addr::new(
        0xfd16, 0x9254, 0x7127, 0x1337, 0xffff, 0xffff, 0xffff, 0xffff,
    )),
];

/// Annotation keys (Kubernetes pod annotations, Istio's names).
pub mod keys {
    /// Ambient pods: `"true"`/`"false"` turns ztunnel's DNS capture on or
    /// off for this pod, over the node's default (on).
    pub const AMBIENT_DNS_CAPTURE: &str = "ambient.istio.io/dns-capture";
    /// Ambient pods: `"true"` leaves inbound traffic alone (ingress
    /// gateways in ambient mode: istio-cni's `IngressMode`).
    pub const AMBIENT_BYPASS_INBOUND: &str = "ambient.istio.io/bypass-inbound-capture";
    /// `REDIRECT` (default), `TPROXY`, or `NONE`.
    pub const INTERCEPTION_MODE: &str = "sidecar.istio.io/interceptionMode";
    /// Outbound CIDRs to capture (`*` = all).
    pub const INCLUDE_OUTBOUND_IP_RANGES: &str = "traffic.sidecar.istio.io/includeOutboundIPRanges";
    /// Outbound CIDRs never captured.
    pub const EXCLUDE_OUTBOUND_IP_RANGES: &str = "traffic.sidecar.istio.io/excludeOutboundIPRanges";
    /// Outbound ports always captured.
    pub const INCLUDE_OUTBOUND_PORTS: &str = "traffic.sidecar.istio.io/includeOutboundPorts";
    /// Outbound ports never captured.
    pub const EXCLUDE_OUTBOUND_PORTS: &str = "traffic.sidecar.istio.io/excludeOutboundPorts";
    /// Inbound ports to capture (`*` = all).
    pub const INCLUDE_INBOUND_PORTS: &str = "traffic.sidecar.istio.io/includeInboundPorts";
    /// Inbound ports never captured (with `*`).
    pub const EXCLUDE_INBOUND_PORTS: &str = "traffic.sidecar.istio.io/excludeInboundPorts";
    /// The sidecar's status port, never captured inbound.
    pub const STATUS_PORT: &str = "status.sidecar.istio.io/port";
    /// weir: proxy UIDs (comma list), replacing the mesh default.
    pub const PROXY_UIDS: &str = "weir.dev/proxy-uids";
    /// weir: proxy GIDs (comma list), replacing the mesh default.
    pub const PROXY_GIDS: &str = "weir.dev/proxy-gids";
    /// weir: outbound capture port, replacing the mesh default.
    pub const OUTBOUND_PORT: &str = "weir.dev/outbound-port";
    /// weir: inbound capture port, replacing the mesh default.
    pub const INBOUND_PORT: &str = "weir.dev/inbound-port";
    /// Interfaces whose traffic is never captured (istio-iptables `-c`).
    pub const EXCLUDE_INTERFACES: &str = "traffic.sidecar.istio.io/excludeInterfaces";
    /// KubeVirt virtual interfaces whose TCP connections go to the
    /// outbound port (istio-iptables `-k`).
    pub const REROUTE_VIRTUAL_INTERFACES: &str = "istio.io/reroute-virtual-interfaces";
    /// The deprecated name of [`REROUTE_VIRTUAL_INTERFACES`], read only
    /// when that one is absent.
    pub const KUBEVIRT_INTERFACES: &str = "traffic.sidecar.istio.io/kubevirtInterfaces";
    /// Istio's per-pod ProxyConfig; weir reads
    /// `proxyMetadata.ISTIO_META_DNS_CAPTURE` from it.
    pub const PROXY_CONFIG: &str = "proxy.istio.io/config";
    /// weir: DNS capture on/off (overrides the ProxyConfig).
    pub const DNS_CAPTURE: &str = "weir.dev/dns-capture";
    /// weir: the pod's resolvers whose port 53 is captured, or `*` (the
    /// default, like istio-cni's "capture all DNS").
    pub const DNS_SERVERS: &str = "weir.dev/dns-servers";
    /// weir: `ISTIO_OUTBOUND_OWNER_GROUPS` (numeric GIDs, or `*`).
    pub const OWNER_GROUPS: &str = "weir.dev/outbound-owner-groups";
    /// weir: `ISTIO_OUTBOUND_OWNER_GROUPS_EXCLUDE` (numeric GIDs).
    pub const OWNER_GROUPS_EXCLUDE: &str = "weir.dev/outbound-owner-groups-exclude";
    /// Linkerd: inbound ports (and ranges) not captured.
    pub const LINKERD_SKIP_INBOUND: &str = "config.linkerd.io/skip-inbound-ports";
    /// Linkerd: outbound ports (and ranges) not captured.
    pub const LINKERD_SKIP_OUTBOUND: &str = "config.linkerd.io/skip-outbound-ports";
    /// Linkerd: outbound CIDRs not captured.
    pub const LINKERD_SKIP_SUBNETS: &str = "config.linkerd.io/skip-subnets";
    /// Kuma: inbound ports (and ranges) not captured.
    pub const KUMA_EXCLUDE_INBOUND: &str = "traffic.kuma.io/exclude-inbound-ports";
    /// Kuma: outbound ports (and ranges) not captured.
    pub const KUMA_EXCLUDE_OUTBOUND: &str = "traffic.kuma.io/exclude-outbound-ports";
    /// Kuma: outbound CIDRs not captured.
    pub const KUMA_EXCLUDE_OUTBOUND_IPS: &str = "traffic.kuma.io/exclude-outbound-ips";
    /// Kuma: sources whose inbound connections are not captured
    /// (addresses or CIDRs).
    pub const KUMA_EXCLUDE_INBOUND_IPS: &str = "traffic.kuma.io/exclude-inbound-ips";
    /// Kuma: `dualstack` (default) or `ipv4` (no IPv6 rules).
    pub const KUMA_IP_FAMILY_MODE: &str = "kuma.io/transparent-proxying-ip-family-mode";
    /// Kuma: the application probe proxy's port (default 9001, `0`: off),
    /// never captured inbound.
    pub const KUMA_PROBE_PROXY_PORT: &str = "kuma.io/application-probe-proxy-port";
    /// Linkerd: the proxy's UID (replaces 2102; 0 or less: none).
    pub const LINKERD_PROXY_UID: &str = "config.linkerd.io/proxy-uid";
    /// Linkerd: the proxy's GID (default none; 0 or less: none).
    pub const LINKERD_PROXY_GID: &str = "config.linkerd.io/proxy-gid";
    /// weir: whether the pod's IPv6 connections are captured at all (the
    /// mesh wrote `ip6tables` rules). Default: Istio yes; Linkerd no (its
    /// `disableIPv6` Helm value defaults to true); Kuma per
    /// [`KUMA_IP_FAMILY_MODE`].
    pub const CAPTURE_IPV6: &str = "weir.dev/capture-ipv6";
}

/// Ports Linkerd's proxy-init skips in both directions unless the pod's
/// `skip-inbound-ports` / `skip-outbound-ports` annotation replaces them
/// (the Helm values `proxyInit.ignoreInboundPorts`/`ignoreOutboundPorts`:
/// Galera's ports).
pub const LINKERD_DEFAULT_SKIP_PORTS: &str = "4567,4568";
/// Kuma's default application probe proxy port.
pub const KUMA_DEFAULT_PROBE_PROXY_PORT: u16 = 9001;

/// A bad annotation value: names the annotation, the bad item and the fix.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("annotation {key}: {problem} (value {value:?}); {fix}")]
pub struct AnnotationError {
    /// The annotation key.
    pub key: String,
    /// The whole value.
    pub value: String,
    /// What is wrong, naming the bad item.
    pub problem: String,
    /// How to fix it.
    pub fix: &'static str,
}

/// Every rule weir needs for one pod, before it gets a cookie.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PodRules {
    /// The fixed-size part (ports, flags, primary addresses); `pod_id` is
    /// assigned at enrollment.
    pub policy: PodPolicy,
    /// Outbound ports always captured.
    pub out_include_ports: BTreeSet<u16>,
    /// Outbound ports never captured.
    pub out_exclude_ports: BTreeSet<u16>,
    /// Inbound ports captured (when not `*`).
    pub in_include_ports: BTreeSet<u16>,
    /// Inbound ports not captured (with `*`).
    pub in_exclude_ports: BTreeSet<u16>,
    /// Proxy UIDs, in order (the first one matters, see `decide_outbound`).
    pub uids: Vec<u32>,
    /// Proxy GIDs, in order.
    pub gids: Vec<u32>,
    /// Outbound CIDRs never captured.
    pub exclude_cidrs: BTreeSet<IpNet>,
    /// Outbound CIDRs captured (when not `*`).
    pub include_cidrs: BTreeSet<IpNet>,
    /// The pod's addresses.
    pub addrs: BTreeSet<IpAddr>,
    /// The capture ports of this pod (proxy listeners weir records).
    pub listen_ports: BTreeSet<u16>,
    /// DNS servers whose port 53 is captured (DNS capture without `*`).
    pub dns_servers: BTreeSet<IpAddr>,
    /// GIDs of the owner-group filter (see `POLICY_OWNER_GROUPS_*`).
    pub owner_groups: BTreeSet<u32>,
    /// `excludeInterfaces`: interface names inside the pod.
    pub exclude_ifaces: BTreeSet<String>,
    /// Resolved from `exclude_ifaces` in the pod's netns by the agent:
    /// their interface indexes...
    pub excluded_ifindexes: BTreeSet<u32>,
    /// ...and the subnets they connect to (outbound connections there
    /// leave through them).
    pub iface_routes: BTreeSet<IpNet>,
    /// The pod's connected subnets and its address on each (discovered):
    /// the source the kernel picks for destinations there.
    pub src_routes: BTreeMap<IpNet, IpAddr>,
    /// The mesh writes no IPv6 rule for this pod (Linkerd's default,
    /// Kuma's `ipv4` mode, `weir.dev/capture-ipv6: "false"`): its IPv6
    /// connections are never touched, and its IPv6 addresses are not
    /// steered inbound (left out of `POD_ADDRS`).
    pub skip_ipv6: bool,
    /// Linkerd's `skip-subnets`: inbound connections *from* these sources
    /// are not captured (`CIDR_SKIP_SRC`, checked by `weir_sk_lookup`).
    pub inbound_skip_sources: BTreeSet<IpNet>,
    /// `istio.io/reroute-virtual-interfaces`: interface names inside the
    /// pod whose TCP connections go to the outbound port.
    pub virt_ifaces: BTreeSet<String>,
    /// Resolved from `virt_ifaces` in the pod's netns by the agent:
    /// interface index -> its redirect addresses (`VIRT_IFACES`).
    pub virt: BTreeMap<u32, VirtIface>,
}

mod parse;
pub use parse::istio_proxy_metadata;
use parse::*;

/// What every step of [`pod_rules`] reads: the pod's mesh (and its
/// profile), its addresses and its annotations.
struct Input<'a> {
    mesh: Mesh,
    prof: Profile,
    addrs: &'a [IpAddr],
    annotations: &'a BTreeMap<String, String>,
}

impl Input<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.annotations.get(key).map(String::as_str)
    }
}

/// One step of [`pod_rules`]: reads its annotations, fills its part of the
/// rules, or names the annotation that is wrong.
type Step = fn(&Input<'_>, &mut PodRules) -> Result<(), AnnotationError>;

/// [`pod_rules`]' steps, in order. The order is part of the behaviour: the
/// first bad annotation is the one reported, and the last two steps may take
/// back the capture switches the first one set.
const STEPS: [Step; 13] = [
    interception_mode,
    capture_ports,
    proxy_identity,
    outbound_cidrs,
    outbound_ports,
    inbound_ports,
    mesh_extras,
    ipv6_capture,
    dns_capture,
    interfaces,
    owner_groups,
    ambient_ingress,
    addresses,
];

/// Builds a pod's rules from its mesh, addresses and annotations: each
/// [`STEPS`] entry in turn.
pub fn pod_rules(
    mesh: Mesh,
    addrs: &[IpAddr],
    annotations: &BTreeMap<String, String>,
) -> Result<PodRules, AnnotationError> {
    let input = Input {
        mesh,
        prof: mesh.profile(),
        addrs,
        annotations,
    };
    let mut r = PodRules::default();
    for step in STEPS {
        step(&input, &mut r)?;
    }
    Ok(r)
}

/// `sidecar.istio.io/interceptionMode`: REDIRECT captures, NONE does not,
/// TPROXY is refused.
fn interception_mode(a: &Input<'_>, r: &mut PodRules) -> Result<(), AnnotationError> {
    let mode = a.get(keys::INTERCEPTION_MODE).unwrap_or("REDIRECT");
    match mode.trim() {
        "REDIRECT" | "" => r.policy.flags |= POLICY_CAPTURE_OUTBOUND | POLICY_CAPTURE_INBOUND,
        "NONE" => {}
        "TPROXY" => {
            return Err(err(
                keys::INTERCEPTION_MODE,
                mode,
                "TPROXY is not supported by weir".into(),
                "use REDIRECT (the proxy sees the same original destination) or NONE",
            ));
        }
        other => {
            return Err(err(
                keys::INTERCEPTION_MODE,
                mode,
                format!("unknown mode {other:?}"),
                "use REDIRECT, TPROXY or NONE",
            ));
        }
    }
    Ok(())
}

/// The proxy's ports: outbound and inbound (annotations over the profile),
/// tunnel and DNS (the profile's).
fn capture_ports(a: &Input<'_>, r: &mut PodRules) -> Result<(), AnnotationError> {
    let p = &mut r.policy;
    p.outbound_port = match a.get(keys::OUTBOUND_PORT) {
        Some(v) => single_port(keys::OUTBOUND_PORT, v)?,
        None => a.prof.outbound_port,
    };
    p.inbound_port = match a.get(keys::INBOUND_PORT) {
        Some(v) => single_port(keys::INBOUND_PORT, v)?,
        None => a.prof.inbound_port,
    };
    p.tunnel_port = a.prof.tunnel_port;
    p.dns_port = a.prof.dns_port;
    r.listen_ports = [p.outbound_port, p.inbound_port].into_iter().collect();
    Ok(())
}

/// The proxy's UIDs and GIDs: the mesh's own identity annotations
/// (Linkerd's), then weir's; the first one is the loopback rule's identity.
fn proxy_identity(a: &Input<'_>, r: &mut PodRules) -> Result<(), AnnotationError> {
    let (mut def_uids, mut def_gids) = (a.prof.uids.clone(), a.prof.gids.clone());
    if a.mesh == Mesh::Linkerd {
        if let Some(v) = a.get(keys::LINKERD_PROXY_UID) {
            def_uids = linkerd_id(keys::LINKERD_PROXY_UID, v)?;
        }
        if let Some(v) = a.get(keys::LINKERD_PROXY_GID) {
            def_gids = linkerd_id(keys::LINKERD_PROXY_GID, v)?;
        }
    }
    r.uids = match a.get(keys::PROXY_UIDS) {
        Some(v) => parse_ids(keys::PROXY_UIDS, v)?,
        None => def_uids,
    };
    r.gids = match a.get(keys::PROXY_GIDS) {
        Some(v) => parse_ids(keys::PROXY_GIDS, v)?,
        None => def_gids,
    };
    let p = &mut r.policy;
    (p.lo_id_kind, p.lo_id) = match (r.uids.first(), r.gids.first()) {
        (Some(u), _) => (ID_KIND_UID, *u),
        (None, Some(g)) => (ID_KIND_GID, *g),
        (None, None) => (ID_KIND_NONE, 0),
    };
    Ok(())
}

/// `includeOutboundIPRanges` / `excludeOutboundIPRanges`.
fn outbound_cidrs(a: &Input<'_>, r: &mut PodRules) -> Result<(), AnnotationError> {
    let include = a.get(keys::INCLUDE_OUTBOUND_IP_RANGES).unwrap_or("*");
    match parse_cidrs(keys::INCLUDE_OUTBOUND_IP_RANGES, include)? {
        None => r.policy.flags |= POLICY_OUTBOUND_ALL_CIDRS,
        Some(set) => r.include_cidrs = set,
    }
    if let Some(v) = a.get(keys::EXCLUDE_OUTBOUND_IP_RANGES) {
        r.exclude_cidrs = parse_cidrs(keys::EXCLUDE_OUTBOUND_IP_RANGES, v)?.ok_or_else(|| {
            err(
                keys::EXCLUDE_OUTBOUND_IP_RANGES,
                v,
                "\"*\" is not allowed here (istio-iptables refuses it too)".into(),
                "to capture nothing outbound, set includeOutboundIPRanges to \"\"",
            )
        })?;
    }
    // istio-iptables skips its "other processes on lo: RETURN" rule when an
    // include range's address *as written* is a loopback address
    // (127.0.0.1/1 counts, although it covers 0.0.0.0/1).
    if items(include)
        .filter_map(|i| i.parse::<IpNet>().ok())
        .any(|n| n.addr().is_loopback())
    {
        r.policy.flags |= POLICY_INCLUDE_HAS_LOOPBACK;
    }
    Ok(())
}

/// `includeOutboundPorts` / `excludeOutboundPorts`.
fn outbound_ports(a: &Input<'_>, r: &mut PodRules) -> Result<(), AnnotationError> {
    if let Some(v) = a.get(keys::INCLUDE_OUTBOUND_PORTS) {
        r.out_include_ports =
            parse_ports(keys::INCLUDE_OUTBOUND_PORTS, v, false)?.unwrap_or_default();
    }
    if let Some(v) = a.get(keys::EXCLUDE_OUTBOUND_PORTS) {
        r.out_exclude_ports =
            parse_ports(keys::EXCLUDE_OUTBOUND_PORTS, v, false)?.unwrap_or_default();
    }
    Ok(())
}

/// `includeInboundPorts` / `excludeInboundPorts`, the status port and the
/// ports the profile always excludes.
fn inbound_ports(a: &Input<'_>, r: &mut PodRules) -> Result<(), AnnotationError> {
    let inc = a.get(keys::INCLUDE_INBOUND_PORTS).unwrap_or("*");
    match parse_ports(keys::INCLUDE_INBOUND_PORTS, inc, true)? {
        None => r.policy.flags |= POLICY_INBOUND_ALL_PORTS,
        Some(set) => r.in_include_ports = set,
    }
    if let Some(v) = a.get(keys::EXCLUDE_INBOUND_PORTS) {
        r.in_exclude_ports =
            parse_ports(keys::EXCLUDE_INBOUND_PORTS, v, false)?.unwrap_or_default();
    }
    let status_port = match a.get(keys::STATUS_PORT) {
        Some(v) if v.trim() == "0" => 0,
        Some(v) => single_port(keys::STATUS_PORT, v)?,
        None => a.prof.status_port,
    };
    r.in_exclude_ports
        .extend(a.prof.always_excluded_inbound.iter().copied());
    if status_port != 0 {
        r.in_exclude_ports.insert(status_port);
    }
    // A connection to the inbound port itself would be steered to the very
    // same listener: excluding it only saves a lookup.
    r.in_exclude_ports.insert(r.policy.inbound_port);
    Ok(())
}

/// The other meshes' own annotations and conventions.
fn mesh_extras(a: &Input<'_>, r: &mut PodRules) -> Result<(), AnnotationError> {
    match a.mesh {
        Mesh::Istio => Ok(()),
        Mesh::Ambient => {
            ambient_extras(r);
            Ok(())
        }
        Mesh::Linkerd => linkerd_extras(a, r),
        Mesh::Kuma => kuma_extras(a, r),
    }
}

/// Ambient: connections to the probe address are never captured
/// (`-d 169.254.7.127 -p tcp -j ACCEPT`), and neither are those from it or
/// from the node itself (kubelet probes; the agent adds the node's
/// addresses, docs/ambient.md).
fn ambient_extras(r: &mut PodRules) {
    r.policy.flags |= POLICY_AMBIENT;
    for a in PROBE_SOURCES {
        let net = IpNet::from(a);
        r.exclude_cidrs.insert(net);
        r.inbound_skip_sources.insert(net);
    }
    r.policy.flags |= POLICY_INBOUND_SKIP_SOURCES;
}

/// linkerd proxy-init: the proxy's UID and everything on lo are never
/// captured; no "proxy to own pod" rule; its skip-ports and skip-subnets.
fn linkerd_extras(a: &Input<'_>, r: &mut PodRules) -> Result<(), AnnotationError> {
    r.policy.flags |= POLICY_LOOPBACK_SIMPLE;
    // The annotations replace the injector's default list (the proxy's own
    // ports, in the profile, are always skipped).
    let v = a
        .get(keys::LINKERD_SKIP_INBOUND)
        .unwrap_or(LINKERD_DEFAULT_SKIP_PORTS);
    r.in_exclude_ports
        .extend(parse_port_ranges(keys::LINKERD_SKIP_INBOUND, v)?);
    let v = a
        .get(keys::LINKERD_SKIP_OUTBOUND)
        .unwrap_or(LINKERD_DEFAULT_SKIP_PORTS);
    r.out_exclude_ports
        .extend(parse_port_ranges(keys::LINKERD_SKIP_OUTBOUND, v)?);
    // `--subnets-to-ignore` only returns inbound connections *from* these
    // subnets (PREROUTING, `-s`); outbound connections to them are captured
    // like any other.
    if let Some(v) = a.get(keys::LINKERD_SKIP_SUBNETS) {
        r.inbound_skip_sources = parse_subnets(keys::LINKERD_SKIP_SUBNETS, v)?;
        if !r.inbound_skip_sources.is_empty() {
            r.policy.flags |= POLICY_INBOUND_SKIP_SOURCES;
        }
    }
    Ok(())
}

/// Kuma: its rule order (excluded addresses and DNS first; the
/// applications' DNS over TCP never captured), its exclusions and its
/// probe proxy port.
fn kuma_extras(a: &Input<'_>, r: &mut PodRules) -> Result<(), AnnotationError> {
    r.policy.flags |= POLICY_KUMA_ORDER;
    if let Some(v) = a.get(keys::KUMA_EXCLUDE_INBOUND) {
        r.in_exclude_ports
            .extend(parse_port_ranges(keys::KUMA_EXCLUDE_INBOUND, v)?);
    }
    let probe = match a.get(keys::KUMA_PROBE_PROXY_PORT) {
        Some(v) if v.trim() == "0" => 0,
        Some(v) => single_port(keys::KUMA_PROBE_PROXY_PORT, v)?,
        None => KUMA_DEFAULT_PROBE_PROXY_PORT,
    };
    if probe != 0 {
        r.in_exclude_ports.insert(probe);
    }
    if let Some(v) = a.get(keys::KUMA_EXCLUDE_OUTBOUND) {
        r.out_exclude_ports
            .extend(parse_port_ranges(keys::KUMA_EXCLUDE_OUTBOUND, v)?);
    }
    if let Some(v) = a.get(keys::KUMA_EXCLUDE_OUTBOUND_IPS) {
        r.exclude_cidrs
            .extend(parse_kuma_ips(keys::KUMA_EXCLUDE_OUTBOUND_IPS, v)?);
    }
    // `-s ADDR -j RETURN` in KUMA_MESH_INBOUND: like Linkerd's
    // skip-subnets, inbound connections from these sources.
    if let Some(v) = a.get(keys::KUMA_EXCLUDE_INBOUND_IPS) {
        r.inbound_skip_sources
            .extend(parse_kuma_ips(keys::KUMA_EXCLUDE_INBOUND_IPS, v)?);
        if !r.inbound_skip_sources.is_empty() {
            r.policy.flags |= POLICY_INBOUND_SKIP_SOURCES;
        }
    }
    Ok(())
}

/// IPv6 capture: whether the mesh writes IPv6 rules for the pod, over which
/// weir's own annotation wins.
fn ipv6_capture(a: &Input<'_>, r: &mut PodRules) -> Result<(), AnnotationError> {
    let ipv6_default = match a.mesh {
        // istio-cni writes IPv6 rules whenever the node has IPv6.
        Mesh::Ambient => true,
        // istio-iptables writes IPv6 rules with ISTIO_DUAL_STACK, else only
        // when the pod's first address is IPv6. Without the setting weir
        // captures every family (in Kubernetes the agent fills it in from
        // the istio-proxy container, where Istio's default, off, applies).
        Mesh::Istio => match a.get(keys::PROXY_CONFIG) {
            Some(v) => match istio_proxy_metadata(v, "ISTIO_DUAL_STACK")? {
                Some(false) => a
                    .addrs
                    .iter()
                    .find(|a| !a.is_loopback())
                    .is_some_and(|a| a.is_ipv6()),
                _ => true,
            },
            None => true,
        },
        // Linkerd's Helm value `disableIPv6` defaults to true.
        Mesh::Linkerd => false,
        Mesh::Kuma => match a.get(keys::KUMA_IP_FAMILY_MODE) {
            None => true,
            // kuma-init accepts these spellings, but only the exact
            // lowercase `ipv4` turns IPv6 off.
            Some(v) => match v.to_ascii_lowercase().as_str() {
                "" | "dualstack" => true,
                "ipv4" => v != "ipv4",
                _ => {
                    return Err(err(
                        keys::KUMA_IP_FAMILY_MODE,
                        v,
                        format!("unknown IP family mode {v:?}"),
                        "use dualstack or ipv4",
                    ));
                }
            },
        },
    };
    r.skip_ipv6 = !match a.get(keys::CAPTURE_IPV6) {
        Some(v) => parse_bool(keys::CAPTURE_IPV6, v, v)?,
        None => ipv6_default,
    };
    Ok(())
}

/// DNS capture: Istio's ISTIO_META_DNS_CAPTURE, ambient's per-pod switch
/// (on by default, as istio-cni), or weir's switch; Kuma captures DNS (to
/// every server) by default on Kubernetes. Then the resolvers it applies to.
fn dns_capture(a: &Input<'_>, r: &mut PodRules) -> Result<(), AnnotationError> {
    let mut dns = match a.get(keys::PROXY_CONFIG) {
        Some(v) => istio_dns_capture(v)?.unwrap_or(false),
        None => a.mesh == Mesh::Kuma,
    };
    if a.mesh == Mesh::Ambient {
        dns = match a.get(keys::AMBIENT_DNS_CAPTURE) {
            Some(v) => parse_bool(keys::AMBIENT_DNS_CAPTURE, v, v)?,
            None => true,
        };
    }
    if let Some(v) = a.get(keys::DNS_CAPTURE) {
        dns = parse_bool(keys::DNS_CAPTURE, v, v)?;
    }
    if !dns || r.policy.dns_port == 0 {
        return Ok(());
    }
    r.policy.flags |= POLICY_CAPTURE_DNS;
    r.listen_ports.insert(r.policy.dns_port);
    match a.get(keys::DNS_SERVERS).map(str::trim) {
        None | Some("*") => r.policy.flags |= POLICY_DNS_ALL_SERVERS,
        Some(v) => {
            for i in items(v) {
                let ip = i.parse::<IpAddr>().map_err(|_| {
                    err(
                        keys::DNS_SERVERS,
                        v,
                        format!("{i:?} is not an IP address"),
                        "list the pod's resolvers (as in its /etc/resolv.conf), or \"*\"",
                    )
                })?;
                r.dns_servers.insert(ip);
            }
        }
    }
    Ok(())
}

/// Excluded interfaces, and KubeVirt's virtual interfaces (the older
/// annotation counts only without the newer one, as in Istio's injector).
fn interfaces(a: &Input<'_>, r: &mut PodRules) -> Result<(), AnnotationError> {
    if let Some(v) = a.get(keys::EXCLUDE_INTERFACES) {
        r.exclude_ifaces = interface_names(
            keys::EXCLUDE_INTERFACES,
            v,
            "list interface names as seen inside the pod, e.g. net1,net2",
        )?;
        if !r.exclude_ifaces.is_empty() {
            r.policy.flags |= POLICY_EXCLUDE_IFACES;
        }
    }
    let virt = a
        .get(keys::REROUTE_VIRTUAL_INTERFACES)
        .map(|v| (keys::REROUTE_VIRTUAL_INTERFACES, v))
        .or_else(|| {
            a.get(keys::KUBEVIRT_INTERFACES)
                .map(|v| (keys::KUBEVIRT_INTERFACES, v))
        });
    if let Some((key, v)) = virt {
        r.virt_ifaces = interface_names(
            key,
            v,
            "list interface names as seen inside the pod, e.g. k6t-eth0",
        )?;
    }
    Ok(())
}

/// A comma-separated list of interface names as seen inside the pod;
/// `fix` is the error's advice.
fn interface_names(
    key: &str,
    value: &str,
    fix: &'static str,
) -> Result<BTreeSet<String>, AnnotationError> {
    items(value)
        .map(|i| {
            if is_interface_name(i) {
                Ok(i.to_string())
            } else {
                Err(err(
                    key,
                    value,
                    format!("{i:?} is not an interface name"),
                    fix,
                ))
            }
        })
        .collect()
}

/// Owner groups (ISTIO_OUTBOUND_OWNER_GROUPS[_EXCLUDE]): "*" with
/// exclusions, or an include list ("" includes nobody, as in Istio).
fn owner_groups(a: &Input<'_>, r: &mut PodRules) -> Result<(), AnnotationError> {
    let include_groups = a.get(keys::OWNER_GROUPS).unwrap_or("*");
    if include_groups.trim() == "*" {
        if let Some(v) = a.get(keys::OWNER_GROUPS_EXCLUDE) {
            r.owner_groups = parse_ids(keys::OWNER_GROUPS_EXCLUDE, v)?
                .into_iter()
                .collect();
            if !r.owner_groups.is_empty() {
                r.policy.flags |= POLICY_OWNER_GROUPS_EXCEPT;
            }
        }
    } else {
        r.owner_groups = parse_ids(keys::OWNER_GROUPS, include_groups)?
            .into_iter()
            .collect();
        r.policy.flags |= POLICY_OWNER_GROUPS_ONLY;
    }
    Ok(())
}

/// istio-cni's ingress mode for an ambient pod: no inbound rule at all.
fn ambient_ingress(a: &Input<'_>, r: &mut PodRules) -> Result<(), AnnotationError> {
    if a.mesh == Mesh::Ambient
        && let Some(v) = a.get(keys::AMBIENT_BYPASS_INBOUND)
        && parse_bool(keys::AMBIENT_BYPASS_INBOUND, v, v)?
    {
        r.policy.flags &= !POLICY_CAPTURE_INBOUND;
    }
    Ok(())
}

/// Addresses: the first of each family is the pod's primary address. An
/// IPv6-only pod whose mesh writes no IPv6 rules is not meshed: its rules
/// would only ever see IPv4 loopback traffic.
fn addresses(a: &Input<'_>, r: &mut PodRules) -> Result<(), AnnotationError> {
    r.addrs.extend(a.addrs.iter().copied());
    let p = &mut r.policy;
    if let Some(v4) = a.addrs.iter().find_map(|a| match a {
        IpAddr::V4(v) => Some(*v),
        IpAddr::V6(_) => None,
    }) {
        p.flags |= POLICY_HAS_IP4;
        p.pod_ip4 = u32::from_ne_bytes(v4.octets());
    }
    let v6 = a.addrs.iter().find_map(|a| match a {
        IpAddr::V6(v) => Some(*v),
        IpAddr::V4(_) => None,
    });
    if let Some(v6) = v6
        && !r.skip_ipv6
    {
        p.flags |= POLICY_HAS_IP6;
        p.pod_ip6 = addr_from_octets(v6.octets());
    }
    if r.skip_ipv6 && v6.is_some() && p.flags & POLICY_HAS_IP4 == 0 {
        p.flags &= !(POLICY_CAPTURE_OUTBOUND | POLICY_CAPTURE_INBOUND);
    }
    Ok(())
}

/// Why `ip` cannot be a pod's own address, if it cannot: weir steers
/// inbound connections to a pod by its addresses (`POD_ADDRS`), so a
/// loopback, unspecified, multicast or broadcast address there would claim
/// traffic that is not the pod's (`127.0.0.1` is every pod's loopback).
pub fn pod_ip_problem(ip: IpAddr) -> Option<&'static str> {
    let ip = ip.to_canonical();
    if ip.is_unspecified() {
        Some("is the unspecified address")
    } else if ip.is_loopback() {
        Some("is a loopback address")
    } else if ip.is_multicast() {
        Some("is a multicast address")
    } else if matches!(ip, IpAddr::V4(v) if v.is_broadcast()) {
        Some("is the broadcast address")
    } else {
        None
    }
}

/// An [`IpAddr`] in map form (IPv4-mapped for IPv4).
pub fn addr_of(ip: IpAddr) -> Addr {
    match ip {
        IpAddr::V4(v) => v4_mapped(u32::from_ne_bytes(v.octets())),
        IpAddr::V6(v) => addr_from_octets(v.octets()),
    }
}

/// An address in map form back to an [`IpAddr`].
pub fn ip_of(a: &Addr) -> IpAddr {
    let o = addr_octets(a);
    if is_v4_mapped(a) {
        IpAddr::V4(std::net::Ipv4Addr::new(o[12], o[13], o[14], o[15]))
    } else {
        IpAddr::V6(std::net::Ipv6Addr::from(o))
    }
}

/// An LPM key (prefix length, data) for `net` in pod `cookie`.
pub fn cidr_key(cookie: u64, net: &IpNet) -> (u32, CidrData) {
    let (addr, bits) = match net {
        IpNet::V4(n) => (
            addr_of(IpAddr::V4(n.network())),
            96 + u32::from(n.prefix_len()),
        ),
        IpNet::V6(n) => (addr_of(IpAddr::V6(n.network())), u32::from(n.prefix_len())),
    };
    (
        CIDR_COOKIE_BITS + bits,
        CidrData {
            netns_cookie: cookie.to_ne_bytes(),
            addr: addr_octets(&addr),
        },
    )
}

/// The IPv4-mapped IPv6 block `::ffff:0:0/96`, where weir keys IPv4.
const V4_MAPPED_BLOCK: u128 = 0xffff_u128 << 32;

/// The LPM keys for `net` in pod `cookie`, keeping address families apart.
///
/// weir keys IPv4 destinations as `::ffff:a.b.c.d` in the same tries as
/// IPv6, but in Istio an IPv6 range goes to ip6tables only and never
/// matches IPv4 traffic. So an IPv6 range that covers `::ffff:0:0/96`
/// (`::/0`, `::/64`, ...) is written as the prefixes that make up the range
/// without that block (at most 96 keys), and an IPv6 range inside it
/// (`::ffff:10.0.0.0/104`) matches nothing and gives no key.
pub fn cidr_keys(cookie: u64, net: &IpNet) -> Vec<(u32, CidrData)> {
    let IpNet::V6(n) = net else {
        return vec![cidr_key(cookie, net)];
    };
    let len = u32::from(n.prefix_len());
    let base = u128::from(n.network());
    let in_block = |l: u32| l == 0 || (base ^ V4_MAPPED_BLOCK) >> (128 - l) == 0;
    if len > 96 {
        // Inside the block or disjoint from it.
        if (base ^ V4_MAPPED_BLOCK) >> 32 == 0 {
            return Vec::new();
        }
        return vec![cidr_key(cookie, net)];
    }
    if !in_block(len) {
        return vec![cidr_key(cookie, net)];
    }
    // `net` covers the block: one key per level below `len`, the sibling of
    // the block's path at that level.
    (len..96)
        .map(|depth| {
            let flipped = V4_MAPPED_BLOCK ^ (1u128 << (127 - depth));
            let prefix = (depth + 1) as u8;
            let sibling = ipnet::Ipv6Net::new(std::net::Ipv6Addr::from(flipped), prefix)
                .expect("prefix <= 96")
                .trunc();
            cidr_key(cookie, &IpNet::V6(sibling))
        })
        .collect()
}

impl PodRules {
    /// Whether the source route `net -> ip` answers what the kernel
    /// programs answer without it: `ip` is the pod's primary address of
    /// its family, and no wider route to another address contains `net`
    /// (which would answer for it once it is removed). Such routes are
    /// left out of `SRC_ROUTES`: a pod with one interface then costs its
    /// connections no trie lookup.
    pub fn src_route_is_default(&self, net: &IpNet, ip: &IpAddr) -> bool {
        let p = &self.policy;
        let primary = match ip {
            IpAddr::V4(v4) => {
                p.flags & POLICY_HAS_IP4 != 0 && p.pod_ip4 == u32::from_ne_bytes(v4.octets())
            }
            IpAddr::V6(v6) => {
                p.flags & POLICY_HAS_IP6 != 0 && p.pod_ip6 == addr_from_octets(v6.octets())
            }
        };
        primary
            && !self
                .src_routes
                .iter()
                .any(|(n, a)| a != ip && n.prefix_len() < net.prefix_len() && n.contains(net))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ann(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn ips(s: &[&str]) -> Vec<IpAddr> {
        s.iter().map(|a| a.parse().unwrap()).collect()
    }

    #[test]
    fn istio_defaults() {
        let r = pod_rules(Mesh::Istio, &ips(&["198.18.0.1"]), &BTreeMap::new()).unwrap();
        assert_eq!(r.policy.outbound_port, 15001);
        assert_eq!(r.policy.inbound_port, 15006);
        assert_eq!(r.policy.tunnel_port, 15008);
        assert_ne!(r.policy.flags & POLICY_OUTBOUND_ALL_CIDRS, 0);
        assert_ne!(r.policy.flags & POLICY_INBOUND_ALL_PORTS, 0);
        assert_ne!(r.policy.flags & POLICY_CAPTURE_OUTBOUND, 0);
        assert_eq!(r.uids, vec![1337]);
        assert_eq!((r.policy.lo_id_kind, r.policy.lo_id), (ID_KIND_UID, 1337));
        let excl: Vec<u16> = r.in_exclude_ports.iter().copied().collect();
        assert_eq!(excl, vec![15006, 15020, 15021, 15090]);
        assert_eq!(r.policy.pod_ip4, u32::from_ne_bytes([198, 18, 0, 1]));
    }

    #[test]
    fn virtual_interfaces_are_parsed_like_istio() {
        let get = |pairs: &[(&str, &str)]| pod_rules(Mesh::Istio, &[], &ann(pairs));
        let r = get(&[(keys::REROUTE_VIRTUAL_INTERFACES, " k6t-eth0, ,tap0,")]).unwrap();
        let names: Vec<&str> = r.virt_ifaces.iter().map(String::as_str).collect();
        assert_eq!(names, ["k6t-eth0", "tap0"]);
        // The deprecated key counts only without the new one.
        let r = get(&[(keys::KUBEVIRT_INTERFACES, "old0")]).unwrap();
        assert!(r.virt_ifaces.contains("old0"));
        let r = get(&[
            (keys::KUBEVIRT_INTERFACES, "old0"),
            (keys::REROUTE_VIRTUAL_INTERFACES, "new0"),
        ])
        .unwrap();
        let names: Vec<&str> = r.virt_ifaces.iter().map(String::as_str).collect();
        assert_eq!(names, ["new0"]);
        assert!(
            get(&[(keys::REROUTE_VIRTUAL_INTERFACES, "")])
                .unwrap()
                .virt_ifaces
                .is_empty()
        );
        for bad in ["a/b", "name-longer-than-15", "..", "eth0:1", "a b"] {
            let e = get(&[(keys::REROUTE_VIRTUAL_INTERFACES, bad)]).unwrap_err();
            assert_eq!(e.key, keys::REROUTE_VIRTUAL_INTERFACES, "{bad}");
            assert!(e.to_string().contains("is not an interface name"), "{e}");
        }
        let e = get(&[(keys::KUBEVIRT_INTERFACES, "x/y")]).unwrap_err();
        assert_eq!(e.key, keys::KUBEVIRT_INTERFACES);
    }

    #[test]
    fn istio_dual_stack_off_leaves_ipv6_alone_unless_the_pod_is_ipv6_first() {
        let cfg = |v: &str| format!("proxyMetadata:\n  ISTIO_DUAL_STACK: \"{v}\"\n");
        let rules = |addrs: &[&str], c: Option<String>| {
            let a = match &c {
                Some(c) => ann(&[(keys::PROXY_CONFIG, c.as_str())]),
                None => BTreeMap::new(),
            };
            pod_rules(Mesh::Istio, &ips(addrs), &a).unwrap()
        };
        let v4_first = ["198.18.0.1", "2001:2::1"];
        assert!(rules(&v4_first, Some(cfg("false"))).skip_ipv6);
        assert!(!rules(&["2001:2::1", "198.18.0.1"], Some(cfg("false"))).skip_ipv6);
        assert!(!rules(&v4_first, Some(cfg("true"))).skip_ipv6);
        // Not said: weir's local default captures every family.
        assert!(!rules(&v4_first, None).skip_ipv6);
        assert!(
            pod_rules(
                Mesh::Istio,
                &ips(&v4_first),
                &ann(&[(keys::PROXY_CONFIG, &cfg("maybe"))])
            )
            .is_err()
        );
    }

    #[test]
    fn kuma_exclude_inbound_ips_are_skipped_sources() {
        let r = pod_rules(
            Mesh::Kuma,
            &ips(&["198.18.0.1"]),
            &ann(&[(
                keys::KUMA_EXCLUDE_INBOUND_IPS,
                "198.18.100.7/24, 2001:2::2,",
            )]),
        )
        .unwrap();
        assert_ne!(r.policy.flags & POLICY_INBOUND_SKIP_SOURCES, 0);
        let nets: Vec<String> = r
            .inbound_skip_sources
            .iter()
            .map(|n| n.to_string())
            .collect();
        assert_eq!(nets, ["198.18.100.0/24", "2001:2::2/128"]);
        // Outbound is untouched by it.
        assert!(r.exclude_cidrs.is_empty());
        let e = pod_rules(
            Mesh::Kuma,
            &[],
            &ann(&[(keys::KUMA_EXCLUDE_INBOUND_IPS, "10.0.0.0/8,nope")]),
        )
        .unwrap_err();
        assert_eq!(e.key, keys::KUMA_EXCLUDE_INBOUND_IPS);
        assert!(e.to_string().contains("\"nope\""), "{e}");
        // Not a Kuma pod: not Kuma's annotation.
        let r = pod_rules(
            Mesh::Istio,
            &[],
            &ann(&[(keys::KUMA_EXCLUDE_INBOUND_IPS, "10.0.0.0/8")]),
        )
        .unwrap();
        assert!(r.inbound_skip_sources.is_empty());
    }

    #[test]
    fn lists_are_parsed_like_istio() {
        let r = pod_rules(
            Mesh::Istio,
            &[],
            &ann(&[
                (keys::EXCLUDE_OUTBOUND_PORTS, " 3306, ,5432,"),
                (
                    keys::INCLUDE_OUTBOUND_IP_RANGES,
                    "10.0.0.0/8, 198.18.0.7/32 ,fd00::/8,",
                ),
                (keys::EXCLUDE_OUTBOUND_IP_RANGES, ""),
                (keys::INCLUDE_INBOUND_PORTS, "8080,9090"),
            ]),
        )
        .unwrap();
        assert_eq!(r.out_exclude_ports, [3306, 5432].into_iter().collect());
        assert_eq!(r.include_cidrs.len(), 3);
        assert!(r.include_cidrs.contains(&"198.18.0.7/32".parse().unwrap()));
        assert_eq!(r.policy.flags & POLICY_OUTBOUND_ALL_CIDRS, 0);
        assert_eq!(r.policy.flags & POLICY_INBOUND_ALL_PORTS, 0);
        assert_eq!(r.in_include_ports, [8080, 9090].into_iter().collect());
    }

    #[test]
    fn empty_include_means_none() {
        let r = pod_rules(
            Mesh::Istio,
            &[],
            &ann(&[
                (keys::INCLUDE_OUTBOUND_IP_RANGES, ""),
                (keys::INCLUDE_INBOUND_PORTS, ""),
            ]),
        )
        .unwrap();
        assert_eq!(r.policy.flags & POLICY_OUTBOUND_ALL_CIDRS, 0);
        assert!(r.include_cidrs.is_empty());
        assert_eq!(r.policy.flags & POLICY_INBOUND_ALL_PORTS, 0);
        assert!(r.in_include_ports.is_empty());
    }

    #[test]
    fn bad_values_name_annotation_and_item() {
        let e = pod_rules(
            Mesh::Istio,
            &[],
            &ann(&[(keys::EXCLUDE_OUTBOUND_PORTS, "80,http")]),
        )
        .unwrap_err();
        assert_eq!(e.key, keys::EXCLUDE_OUTBOUND_PORTS);
        assert!(e.to_string().contains("\"http\" is not a port"), "{e}");
        let e = pod_rules(
            Mesh::Istio,
            &[],
            &ann(&[(keys::EXCLUDE_OUTBOUND_IP_RANGES, "10.0.0.0/33")]),
        )
        .unwrap_err();
        assert!(e.to_string().contains("10.0.0.0/33"), "{e}");
        let e = pod_rules(
            Mesh::Istio,
            &[],
            &ann(&[(keys::INCLUDE_INBOUND_PORTS, "80,0")]),
        )
        .unwrap_err();
        assert!(e.to_string().contains("\"0\" is not a port"), "{e}");
        let e = pod_rules(
            Mesh::Istio,
            &[],
            &ann(&[(keys::INTERCEPTION_MODE, "TPROXY")]),
        )
        .unwrap_err();
        assert!(e.to_string().contains("TPROXY is not supported"), "{e}");
    }

    #[test]
    fn interception_none_disables_capture() {
        let r = pod_rules(Mesh::Istio, &[], &ann(&[(keys::INTERCEPTION_MODE, "NONE")])).unwrap();
        assert_eq!(
            r.policy.flags & (POLICY_CAPTURE_OUTBOUND | POLICY_CAPTURE_INBOUND),
            0
        );
    }

    #[test]
    fn include_with_loopback_is_flagged() {
        let r = pod_rules(
            Mesh::Istio,
            &[],
            &ann(&[(keys::INCLUDE_OUTBOUND_IP_RANGES, "127.0.0.0/8")]),
        )
        .unwrap();
        assert_ne!(r.policy.flags & POLICY_INCLUDE_HAS_LOOPBACK, 0);
    }

    #[test]
    fn loopback_include_is_judged_as_written() {
        let r = pod_rules(
            Mesh::Istio,
            &[],
            &ann(&[(keys::INCLUDE_OUTBOUND_IP_RANGES, "127.0.0.1/1")]),
        )
        .unwrap();
        assert_ne!(r.policy.flags & POLICY_INCLUDE_HAS_LOOPBACK, 0);
        assert!(r.include_cidrs.contains(&"0.0.0.0/1".parse().unwrap()));
    }

    #[test]
    fn istio_cidr_rules_are_exact() {
        let e = pod_rules(
            Mesh::Istio,
            &[],
            &ann(&[(keys::EXCLUDE_OUTBOUND_IP_RANGES, "10.1.2.3")]),
        )
        .unwrap_err();
        assert!(e.to_string().contains("add the prefix length"), "{e}");
        let e = pod_rules(
            Mesh::Istio,
            &[],
            &ann(&[(keys::EXCLUDE_OUTBOUND_IP_RANGES, "*")]),
        )
        .unwrap_err();
        assert!(e.to_string().contains("not allowed"), "{e}");
        // 0.0.0.0/0 contains 127.0.0.1 but is not a loopback range.
        let r = pod_rules(
            Mesh::Istio,
            &[],
            &ann(&[(keys::INCLUDE_OUTBOUND_IP_RANGES, "0.0.0.0/0")]),
        )
        .unwrap();
        assert_eq!(r.policy.flags & POLICY_INCLUDE_HAS_LOOPBACK, 0);
        // Non-canonical prefixes are truncated like iptables does.
        let r = pod_rules(
            Mesh::Istio,
            &[],
            &ann(&[(keys::INCLUDE_OUTBOUND_IP_RANGES, "10.1.2.3/8")]),
        )
        .unwrap();
        assert!(r.include_cidrs.contains(&"10.0.0.0/8".parse().unwrap()));
    }

    #[test]
    fn dns_capture_from_proxy_config_and_switch() {
        let r = pod_rules(
            Mesh::Istio,
            &[],
            &ann(&[(
                keys::PROXY_CONFIG,
                "proxyMetadata:\n  ISTIO_META_DNS_CAPTURE: \"true\"\n",
            )]),
        )
        .unwrap();
        assert_ne!(r.policy.flags & POLICY_CAPTURE_DNS, 0);
        assert_ne!(r.policy.flags & POLICY_DNS_ALL_SERVERS, 0);
        assert!(r.listen_ports.contains(&15053));
        let r = pod_rules(
            Mesh::Istio,
            &[],
            &ann(&[
                (keys::DNS_CAPTURE, "true"),
                (keys::DNS_SERVERS, "10.96.0.10, fd00::a"),
            ]),
        )
        .unwrap();
        assert_eq!(r.policy.flags & POLICY_DNS_ALL_SERVERS, 0);
        assert_eq!(r.dns_servers.len(), 2);
        let e = pod_rules(Mesh::Istio, &[], &ann(&[(keys::DNS_CAPTURE, "maybe")])).unwrap_err();
        assert!(e.to_string().contains("not a boolean"), "{e}");
        let e = pod_rules(Mesh::Istio, &[], &ann(&[(keys::PROXY_CONFIG, "a: [")])).unwrap_err();
        assert_eq!(e.key, keys::PROXY_CONFIG);
    }

    #[test]
    fn owner_groups_follow_istio() {
        let r = pod_rules(Mesh::Istio, &[], &BTreeMap::new()).unwrap();
        assert_eq!(
            r.policy.flags & (POLICY_OWNER_GROUPS_ONLY | POLICY_OWNER_GROUPS_EXCEPT),
            0
        );
        let r = pod_rules(
            Mesh::Istio,
            &[],
            &ann(&[(keys::OWNER_GROUPS_EXCLUDE, "3000,3001")]),
        )
        .unwrap();
        assert_ne!(r.policy.flags & POLICY_OWNER_GROUPS_EXCEPT, 0);
        assert_eq!(r.owner_groups.len(), 2);
        let r = pod_rules(Mesh::Istio, &[], &ann(&[(keys::OWNER_GROUPS, "")])).unwrap();
        assert_ne!(r.policy.flags & POLICY_OWNER_GROUPS_ONLY, 0);
        assert!(
            r.owner_groups.is_empty(),
            "empty include list captures nobody"
        );
        let e = pod_rules(Mesh::Istio, &[], &ann(&[(keys::OWNER_GROUPS, "wheel")])).unwrap_err();
        assert!(e.to_string().contains("numeric"), "{e}");
    }

    #[test]
    fn linkerd_and_kuma_annotations() {
        let r = pod_rules(
            Mesh::Linkerd,
            &[],
            &ann(&[
                (keys::LINKERD_SKIP_OUTBOUND, "3306,5000-5002"),
                (keys::LINKERD_SKIP_INBOUND, "9000"),
                (keys::LINKERD_SKIP_SUBNETS, "10.0.0.0/8"),
            ]),
        )
        .unwrap();
        assert_eq!(
            r.out_exclude_ports,
            [3306, 5000, 5001, 5002].into_iter().collect()
        );
        assert!(r.in_exclude_ports.contains(&9000));
        // skip-subnets is about inbound sources, not outbound destinations.
        assert!(r.exclude_cidrs.is_empty());
        assert!(
            r.inbound_skip_sources
                .contains(&"10.0.0.0/8".parse().unwrap())
        );
        assert_ne!(r.policy.flags & POLICY_LOOPBACK_SIMPLE, 0);
        let e = pod_rules(
            Mesh::Linkerd,
            &[],
            &ann(&[(keys::LINKERD_SKIP_OUTBOUND, "9-3")]),
        )
        .unwrap_err();
        assert!(e.to_string().contains("ends before it starts"), "{e}");
        let r = pod_rules(
            Mesh::Kuma,
            &[],
            &ann(&[
                (keys::KUMA_EXCLUDE_OUTBOUND, "1-3"),
                (keys::KUMA_EXCLUDE_INBOUND, "8081"),
            ]),
        )
        .unwrap();
        assert_eq!(r.out_exclude_ports.len(), 3);
        assert!(r.in_exclude_ports.contains(&8081));
        assert_eq!(r.uids, vec![5678]);
        // Istio annotations are not read for other meshes' own lists.
        let r = pod_rules(
            Mesh::Istio,
            &[],
            &ann(&[(keys::KUMA_EXCLUDE_OUTBOUND, "1-3")]),
        )
        .unwrap();
        assert!(r.out_exclude_ports.is_empty());
    }

    #[test]
    fn linkerd_profile() {
        let r = pod_rules(Mesh::Linkerd, &[], &BTreeMap::new()).unwrap();
        assert_eq!(
            (r.policy.outbound_port, r.policy.inbound_port),
            (4140, 4143)
        );
        assert_eq!(r.uids, vec![2102]);
        assert_eq!(r.policy.tunnel_port, 0);
    }

    #[test]
    fn linkerd_defaults_follow_the_injector() {
        let r = pod_rules(
            Mesh::Linkerd,
            &ips(&["198.18.0.1", "2001:2::1"]),
            &BTreeMap::new(),
        )
        .unwrap();
        let inbound: Vec<u16> = r.in_exclude_ports.iter().copied().collect();
        assert_eq!(inbound, vec![4143, 4190, 4191, 4567, 4568]);
        let outbound: Vec<u16> = r.out_exclude_ports.iter().copied().collect();
        assert_eq!(outbound, vec![4567, 4568]);
        assert!(r.gids.is_empty());
        // disableIPv6 defaults to true: no IPv6 rules, no IPv6 steering.
        assert!(r.skip_ipv6);
        assert_eq!(r.policy.flags & POLICY_HAS_IP6, 0);
        assert_ne!(r.policy.flags & POLICY_HAS_IP4, 0);
        // The annotations replace the default lists, not the proxy's ports.
        let r = pod_rules(
            Mesh::Linkerd,
            &ips(&["198.18.0.1", "2001:2::1"]),
            &ann(&[
                (keys::LINKERD_SKIP_INBOUND, "9090"),
                (keys::LINKERD_SKIP_OUTBOUND, ""),
                (keys::CAPTURE_IPV6, "true"),
            ]),
        )
        .unwrap();
        let inbound: Vec<u16> = r.in_exclude_ports.iter().copied().collect();
        assert_eq!(inbound, vec![4143, 4190, 4191, 9090]);
        assert!(r.out_exclude_ports.is_empty());
        assert!(!r.skip_ipv6);
        assert_ne!(r.policy.flags & POLICY_HAS_IP6, 0);
    }

    #[test]
    fn linkerd_proxy_identities() {
        let r = pod_rules(
            Mesh::Linkerd,
            &[],
            &ann(&[
                (keys::LINKERD_PROXY_UID, "2103"),
                (keys::LINKERD_PROXY_GID, "3000"),
            ]),
        )
        .unwrap();
        assert_eq!((r.uids.clone(), r.gids.clone()), (vec![2103], vec![3000]));
        // proxy-init writes no owner rule for 0 or less.
        let r = pod_rules(
            Mesh::Linkerd,
            &[],
            &ann(&[
                (keys::LINKERD_PROXY_UID, "0"),
                (keys::LINKERD_PROXY_GID, "-1"),
            ]),
        )
        .unwrap();
        assert!(r.uids.is_empty() && r.gids.is_empty());
        assert_eq!(r.policy.lo_id_kind, ID_KIND_NONE);
        // weir's own keys win.
        let r = pod_rules(
            Mesh::Linkerd,
            &[],
            &ann(&[(keys::LINKERD_PROXY_UID, "2103"), (keys::PROXY_UIDS, "7")]),
        )
        .unwrap();
        assert_eq!(r.uids, vec![7]);
        let e = pod_rules(
            Mesh::Linkerd,
            &[],
            &ann(&[(keys::LINKERD_PROXY_UID, "proxy")]),
        )
        .unwrap_err();
        assert!(e.to_string().contains("not a numeric id"), "{e}");
    }

    #[test]
    fn kuma_defaults_follow_the_injector() {
        let r = pod_rules(
            Mesh::Kuma,
            &ips(&["198.18.0.1", "2001:2::1"]),
            &BTreeMap::new(),
        )
        .unwrap();
        let inbound: Vec<u16> = r.in_exclude_ports.iter().copied().collect();
        assert_eq!(inbound, vec![9001, 9902, 15006]);
        assert!(r.out_exclude_ports.is_empty());
        let f = r.policy.flags;
        assert_ne!(f & POLICY_KUMA_ORDER, 0);
        assert_ne!(f & POLICY_CAPTURE_DNS, 0);
        assert_ne!(f & POLICY_DNS_ALL_SERVERS, 0);
        assert_ne!(f & POLICY_HAS_IP6, 0);
        assert!(r.listen_ports.contains(&15053));
        assert_eq!(f & POLICY_LOOPBACK_SIMPLE, 0);
        let r = pod_rules(
            Mesh::Kuma,
            &ips(&["198.18.0.1", "2001:2::1"]),
            &ann(&[
                (keys::KUMA_PROBE_PROXY_PORT, "0"),
                (keys::DNS_CAPTURE, "false"),
                (keys::KUMA_IP_FAMILY_MODE, "ipv4"),
                (
                    keys::KUMA_EXCLUDE_OUTBOUND_IPS,
                    "10.0.0.1, 10.2.3.4/16,fd00::1,",
                ),
            ]),
        )
        .unwrap();
        assert!(!r.in_exclude_ports.contains(&9001));
        assert_eq!(r.policy.flags & POLICY_CAPTURE_DNS, 0);
        assert!(r.skip_ipv6);
        let want: BTreeSet<IpNet> = ["10.0.0.1/32", "10.2.0.0/16", "fd00::1/128"]
            .iter()
            .map(|n| n.parse().unwrap())
            .collect();
        assert_eq!(r.exclude_cidrs, want);
        // kuma-init accepts "IPv4" but compares it with "ipv4": dual stack.
        let r = pod_rules(
            Mesh::Kuma,
            &[],
            &ann(&[(keys::KUMA_IP_FAMILY_MODE, "IPv4")]),
        )
        .unwrap();
        assert!(!r.skip_ipv6);
        let e = pod_rules(
            Mesh::Kuma,
            &[],
            &ann(&[(keys::KUMA_IP_FAMILY_MODE, "ipv6")]),
        )
        .unwrap_err();
        assert!(e.to_string().contains("unknown IP family mode"), "{e}");
        let e = pod_rules(
            Mesh::Kuma,
            &[],
            &ann(&[(keys::KUMA_EXCLUDE_OUTBOUND_IPS, "10.0.0.0/33")]),
        )
        .unwrap_err();
        assert!(e.to_string().contains("not an IP address or CIDR"), "{e}");
    }

    #[test]
    fn ipv6_only_pod_without_ipv6_rules_is_not_captured() {
        let r = pod_rules(Mesh::Linkerd, &ips(&["2001:2::1"]), &BTreeMap::new()).unwrap();
        assert_eq!(
            r.policy.flags & (POLICY_CAPTURE_OUTBOUND | POLICY_CAPTURE_INBOUND),
            0
        );
    }

    /// The LPM keys of a range match exactly the addresses Istio's rules
    /// would: an IPv6 range only IPv6 addresses, an IPv4 range only IPv4.
    #[test]
    fn cidr_keys_keep_families_apart() {
        let nets = [
            "::/0",
            "::/1",
            "::/64",
            "::/95",
            "::/96",
            "::ffff:0:0/96",
            "::ffff:0:0/95",
            "::ffff:10.0.0.0/104",
            "::fffe:0:0/96",
            "::ffff:0:0/94",
            "2001:db8::/32",
            "0.0.0.0/0",
            "10.0.0.0/8",
            "198.18.0.1/32",
        ];
        let addrs: Vec<IpAddr> = [
            "0.0.0.0",
            "10.1.2.3",
            "198.18.0.1",
            "255.255.255.255",
            "::",
            "::1",
            "::fffe:1.2.3.4",
            "::1:ffff:1.2.3.4",
            "2001:db8::1",
            "8000::",
            "ffff::1",
        ]
        .iter()
        .map(|a| a.parse().unwrap())
        .collect();
        for net in nets {
            let net: IpNet = net.parse().unwrap();
            let keys = cidr_keys(7, &net);
            assert!(keys.len() <= 96, "{net}: {} keys", keys.len());
            for a in &addrs {
                let want = match (net, a) {
                    (IpNet::V4(n), IpAddr::V4(v)) => n.contains(v),
                    (IpNet::V6(n), IpAddr::V6(v)) => n.contains(v),
                    _ => false,
                };
                let key = u128::from_be_bytes(addr_octets(&addr_of(*a)));
                let got = keys.iter().any(|(bits, data)| {
                    let len = bits - CIDR_COOKIE_BITS;
                    len == 0 || (u128::from_be_bytes(data.addr) ^ key) >> (128 - len) == 0
                });
                assert_eq!(got, want, "{net} vs {a}");
            }
        }
    }

    #[test]
    fn overlapping_port_ranges_merge() {
        let r = parse_port_ranges("k", "5-10, 1-3, 8-20, 20, 2, 65535, 65530-65535").unwrap();
        let want: BTreeSet<u16> = (1..=3).chain(5..=20).chain(65530..=65535).collect();
        assert_eq!(r, want);
    }
}
