//! Istio's capture rule order as one pure function per direction.
//!
//! The rules mirror what `istio-iptables` writes into a pod's `nat` table
//! (`tools/istio-iptables/pkg/capture/run.go` in istio/istio), evaluated for
//! one connection at `connect()` time (outbound) or at socket lookup time
//! (inbound). The kernel calls these with map lookups behind [`PodTables`];
//! the agent calls them with in-memory sets. Keep them loop-free and small:
//! they are inlined into verifier-checked programs.

use crate::*;

/// What weir does with one connection, and which rule decided it.
#[repr(u32)]
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Sent to the pod's outbound port (Istio rule: `ISTIO_REDIRECT`).
    RedirectOutbound = 1,
    /// Sent to the pod's inbound port (Istio: `ISTIO_IN_REDIRECT`): the
    /// proxy calling its own pod over loopback, or an inbound connection.
    RedirectInbound = 2,
    /// Not captured: the destination port is excluded.
    BypassExcludedPort = 10,
    /// Not captured: source 127.0.0.6 / ::6 on loopback (the proxy's inbound
    /// passthrough to the application).
    BypassPassthrough = 11,
    /// Not captured: loopback traffic of a process that is not the proxy.
    BypassLoopback = 12,
    /// Not captured: the proxy's own connection (UID/GID).
    BypassProxy = 13,
    /// Not captured: destination 127.0.0.1 / ::1.
    BypassLocalhost = 14,
    /// Not captured: destination in an excluded CIDR.
    BypassExcludedCidr = 15,
    /// Not captured: no include rule (port or CIDR) matched.
    BypassNotIncluded = 16,
    /// Not captured: the tunnel port (15008) is never captured.
    BypassTunnel = 17,
    /// Not captured: capture is off for this pod in this direction.
    BypassDisabled = 18,
    /// Not captured: the owner-group filter (`ISTIO_OUTBOUND_OWNER_GROUPS`).
    BypassOwnerGroup = 19,
    /// Sent to the pod's DNS port (Istio: `ISTIO_OUTPUT_DNS`).
    RedirectDns = 3,
    /// Not captured: through an interface of `excludeInterfaces`
    /// (istio-iptables `-c`: `-o IFACE -j RETURN`, `-i IFACE -j RETURN`).
    BypassExcludedInterface = 20,
    /// Not captured: the pod has no address of the destination's family,
    /// so the kernel refuses the connection (`ENETUNREACH`) before any
    /// iptables rule would have seen it; weir must not turn it into a
    /// working loopback connection.
    BypassNoRoute = 21,
    /// Not captured: a socket of Istio's ztunnel (ambient mode: mark
    /// 0x539/0xfff), or the application's side of a connection ztunnel
    /// made into the pod (mark 0x111/0xfff).
    BypassZtunnel = 22,
}

impl Verdict {
    /// Whether the connection is redirected to the proxy.
    #[inline(always)]
    pub const fn captured(self) -> bool {
        matches!(
            self,
            Verdict::RedirectOutbound | Verdict::RedirectInbound | Verdict::RedirectDns
        )
    }
}

/// Lists of CIDRs a pod policy can hold.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum CidrList {
    /// `excludeOutboundIPRanges`.
    OutboundExclude,
    /// `includeOutboundIPRanges` (unless `*`).
    OutboundInclude,
    /// The pod's DNS servers (DNS capture without "all servers").
    DnsServers,
    /// Subnets reached through an interface of `excludeInterfaces`.
    ExcludedInterfaceRoutes,
    /// Sources whose inbound connections are not captured (Linkerd's
    /// `skip-subnets`: `-s SUBNET -j RETURN` in `PROXY_INIT_REDIRECT`).
    InboundSkipSources,
}

/// Lookups into one pod's tables. Implemented with BPF maps in the kernel
/// and with ordinary collections in the agent.
pub trait PodTables {
    /// Whether `port` is in the pod's port list of kind `kind` (`PORT_*`).
    fn has_port(&self, kind: u16, port: u16) -> bool;
    /// Whether `id` is one of the pod's proxy identities of kind `kind`
    /// (`IDKEY_UID` / `IDKEY_GID`).
    fn has_id(&self, kind: u32, id: u32) -> bool;
    /// Whether `addr` falls in one of the pod's CIDRs of `list`.
    fn in_cidrs(&self, list: CidrList, addr: &Addr) -> bool;
    /// Whether `addr` is an address of the pod itself (routed over `lo`).
    fn is_pod_addr(&self, addr: &Addr) -> bool;
}

/// One outbound TCP connection as seen at `connect()`.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct OutboundQuery {
    /// Destination the application dialled (IPv4-mapped for IPv4).
    pub dst: Addr,
    /// Destination port, host order.
    pub dport: u16,
    /// Source address the socket is bound to (all zero when unbound).
    pub src: Addr,
    /// UID of the connecting process.
    pub uid: u32,
    /// GID of the connecting process.
    pub gid: u32,
    /// UDP (`true`) or TCP.
    pub udp: bool,
}

const V4_LOCALHOST: u32 = u32::from_ne_bytes([127, 0, 0, 1]);
const V4_PASSTHROUGH: u32 = u32::from_ne_bytes([127, 0, 0, 6]);
const V6_LAST_1: u32 = u32::from_ne_bytes([0, 0, 0, 1]);
const V6_LAST_6: u32 = u32::from_ne_bytes([0, 0, 0, 6]);

/// `127.0.0.1` or `::1`.
#[inline(always)]
pub const fn is_localhost(a: &Addr) -> bool {
    if is_v4_mapped(a) {
        a[3] == V4_LOCALHOST
    } else {
        a[0] == 0 && a[1] == 0 && a[2] == 0 && a[3] == V6_LAST_1
    }
}

/// `127.0.0.6` or `::6`: the source Istio's proxy binds for its inbound
/// passthrough connections to the application.
#[inline(always)]
pub const fn is_passthrough_source(a: &Addr) -> bool {
    if is_v4_mapped(a) {
        a[3] == V4_PASSTHROUGH
    } else {
        a[0] == 0 && a[1] == 0 && a[2] == 0 && a[3] == V6_LAST_6
    }
}

/// Whether a connection to `a` leaves through `lo` (`-o lo` in iptables):
/// 127.0.0.0/8, ::1, ::6, or one of the pod's own addresses.
#[inline(always)]
pub fn is_loopback_route<T: PodTables>(a: &Addr, t: &T) -> bool {
    is_loopback_addr(a) || t.is_pod_addr(a)
}

/// Whether `a` is a loopback address (127.0.0.0/8, ::1) or `::6`, the
/// part of [`is_loopback_route`] that needs no table.
#[inline(always)]
pub fn is_loopback_addr(a: &Addr) -> bool {
    if is_v4_mapped(a) {
        a[3].to_ne_bytes()[0] == 127
    } else {
        a[0] == 0 && a[1] == 0 && a[2] == 0 && (a[3] == V6_LAST_1 || a[3] == V6_LAST_6)
    }
}

/// Whether the pod has IPv6 rules at all: not when it has an IPv4 address
/// and no (captured) IPv6 address, as for an IPv4-only pod, a Linkerd pod
/// without IPv6 support, or Kuma's `ipv4` mode. Without them nothing
/// touches its IPv6 connections, and, with no `ip6tables` NAT rule, no
/// conntrack answers `IP6T_SO_ORIGINAL_DST` for them either (`ENOENT`).
#[inline(always)]
pub const fn ipv6_rules(p: &PodPolicy) -> bool {
    p.flags & POLICY_HAS_IP6 != 0 || p.flags & POLICY_HAS_IP4 == 0
}

/// Whether the connecting process carries one of the pod's proxy identities.
#[inline(always)]
fn is_proxy<T: PodTables>(q: &OutboundQuery, t: &T) -> bool {
    t.has_id(IDKEY_UID, q.uid) || t.has_id(IDKEY_GID, q.gid)
}

/// Istio's outbound rule order (`ISTIO_OUTPUT`), first match wins:
///
/// 1. excluded outbound port (TCP and UDP): not captured;
/// 2. source 127.0.0.6 / ::6 on loopback: not captured;
/// 3. for the *first* proxy identity: TCP on loopback, destination not
///    127.0.0.1 / ::1, port not the tunnel port (nor 53 with DNS capture):
///    to the inbound port;
/// 4. for the first proxy identity: any *other* process on loopback: not
///    captured (skipped when an include range is a loopback range; with DNS
///    capture only TCP to ports other than 53);
/// 5. any proxy UID/GID: not captured;
/// 6. the owner-group filter;
/// 7. DNS capture: TCP/UDP port 53 to the pod's resolvers (or any server):
///    to the DNS port;
/// 8. destination 127.0.0.1 / ::1: not captured;
/// 9. excluded CIDR: not captured;
/// 10. TCP: included port, `*`, or included CIDR: to the outbound port.
///
/// Rules 3 to 5 are written by istio-iptables once per identity (UIDs
/// first, then GIDs); the first identity's rule 4 returns every loopback
/// connection not made by it, so later identities never reach their rule 3
/// unless rule 4 is skipped. This function reproduces that. UDP is only
/// ever redirected by rule 7.
///
/// With `POLICY_LOOPBACK_SIMPLE` (Linkerd's proxy-init) rules 2 to 4 are
/// one rule: anything on loopback is not captured.
///
/// With [`POLICY_KUMA_ORDER`] (Kuma's transparent proxy) three rules come
/// before rule 1, in Kuma's `OUTPUT` chain: an excluded CIDR (any
/// protocol, any process: `exclude-outbound-ips`), then with DNS capture
/// UDP port 53 (the proxy's own queries: not captured; to the resolvers,
/// or any server: to the DNS port) and TCP port 53 of any process but the
/// proxy (never captured); every other UDP is not captured. Rule 1 then
/// concerns TCP only, rules 3 and 4 have no port-53 exception, and rule 7
/// is not used.
///
/// A pod with an IPv4 address and no (captured) IPv6 address gets no IPv6
/// rule at all (no `ip6tables` rules: IPv6 disabled in the mesh, or an
/// IPv4-only pod), so every IPv6 destination, `::1` included, is left
/// alone; an IPv6-only pod still has IPv4 rules for IPv4 loopback.
#[inline(always)]
pub fn decide_outbound<T: PodTables>(p: &PodPolicy, q: &OutboundQuery, t: &T) -> Verdict {
    if p.flags & POLICY_CAPTURE_OUTBOUND == 0 {
        return Verdict::BypassDisabled;
    }
    // One lookup for both uses below (the kernel pays per map lookup).
    let on_lo = is_loopback_route(&q.dst, t);
    // No address of that family in the pod (no route, no NAT either), or
    // no IPv6 rules for it (see `ipv6_rules`).
    let has4 = p.flags & POLICY_HAS_IP4 != 0;
    let has6 = p.flags & POLICY_HAS_IP6 != 0;
    let v4 = is_v4_mapped(&q.dst);
    if (v4 && has6 && !has4 && !on_lo) || (!v4 && !ipv6_rules(p)) {
        return Verdict::BypassNoRoute;
    }
    // 0. `excludeInterfaces`: istio-iptables' very first OUTPUT rule.
    if p.flags & POLICY_EXCLUDE_IFACES != 0 && t.in_cidrs(CidrList::ExcludedInterfaceRoutes, &q.dst)
    {
        return Verdict::BypassExcludedInterface;
    }
    let dns = p.flags & POLICY_CAPTURE_DNS != 0;
    let kuma = p.flags & POLICY_KUMA_ORDER != 0;
    if kuma {
        // Kuma's OUTPUT chain, before TCP enters KUMA_MESH_OUTBOUND.
        if t.in_cidrs(CidrList::OutboundExclude, &q.dst) {
            return Verdict::BypassExcludedCidr;
        }
        if dns && q.dport == 53 {
            let proxy = is_proxy(q, t);
            if q.udp {
                if proxy {
                    return Verdict::BypassProxy;
                }
                if p.flags & POLICY_DNS_ALL_SERVERS != 0 || t.in_cidrs(CidrList::DnsServers, &q.dst)
                {
                    return Verdict::RedirectDns;
                }
            } else if !proxy {
                // The applications' DNS over TCP is never captured.
                return Verdict::BypassNotIncluded;
            }
        }
        if q.udp {
            return Verdict::BypassNotIncluded;
        }
    }
    // With Istio's DNS capture, the loopback rules spare port 53.
    let dns_lo = dns && !kuma;
    // 1.
    if t.has_port(PORT_OUT_EXCLUDE, q.dport) {
        return Verdict::BypassExcludedPort;
    }
    let proxy = is_proxy(q, t);
    if p.flags & POLICY_LOOPBACK_SIMPLE != 0 {
        if on_lo {
            return Verdict::BypassLoopback;
        }
    } else {
        // 2.
        if on_lo && is_passthrough_source(&q.src) {
            return Verdict::BypassPassthrough;
        }
        let rule3_gid = !q.udp
            && on_lo
            && !is_localhost(&q.dst)
            && (p.tunnel_port == 0 || q.dport != p.tunnel_port);
        // With DNS capture istio-iptables spares port 53 in the UIDs'
        // rule 3 only (`! --dports 53,15008`); the GIDs' rule 3 names the
        // tunnel port alone.
        let rule3_uid = rule3_gid && !(dns_lo && q.dport == 53);
        // Rule 3 of the identity the process matches first (UIDs come
        // before GIDs), then its rule 5.
        let rule3_or_5 = |by_uid: bool| {
            if (by_uid && rule3_uid) || (!by_uid && rule3_gid) {
                Verdict::RedirectInbound
            } else {
                Verdict::BypassProxy
            }
        };
        // With DNS capture, rule 4 only returns TCP to ports other than 53.
        let rule4 = on_lo && (!dns_lo || (!q.udp && q.dport != 53));
        if p.lo_id_kind != ID_KIND_NONE {
            let is_first = (p.lo_id_kind == ID_KIND_UID && q.uid == p.lo_id)
                || (p.lo_id_kind == ID_KIND_GID && q.gid == p.lo_id);
            if p.flags & POLICY_INCLUDE_HAS_LOOPBACK == 0 {
                if is_first {
                    // 3., else 5. for the first identity.
                    return rule3_or_5(p.lo_id_kind == ID_KIND_UID);
                }
                // 4.
                if rule4 {
                    return Verdict::BypassLoopback;
                }
                // Rule 4 let it through (port 53 with DNS capture): the
                // later identities reach their own rule 3.
                if proxy {
                    return rule3_or_5(t.has_id(IDKEY_UID, q.uid));
                }
            } else if proxy {
                // Without rule 4 every identity reaches its own rule 3.
                return rule3_or_5(t.has_id(IDKEY_UID, q.uid));
            }
        }
    }
    // 5.
    if proxy {
        return Verdict::BypassProxy;
    }
    // 6.
    if p.flags & POLICY_OWNER_GROUPS_ONLY != 0 && !t.has_id(IDKEY_OWNER_GROUP, q.gid) {
        return Verdict::BypassOwnerGroup;
    }
    if p.flags & POLICY_OWNER_GROUPS_EXCEPT != 0 && t.has_id(IDKEY_OWNER_GROUP, q.gid) {
        return Verdict::BypassOwnerGroup;
    }
    // 7.
    if dns_lo
        && q.dport == 53
        && (p.flags & POLICY_DNS_ALL_SERVERS != 0 || t.in_cidrs(CidrList::DnsServers, &q.dst))
    {
        return Verdict::RedirectDns;
    }
    // 8.
    if is_localhost(&q.dst) {
        return Verdict::BypassLocalhost;
    }
    if q.udp {
        return Verdict::BypassNotIncluded;
    }
    // 9. (Kuma looked the excluded CIDRs up first.)
    if !kuma && t.in_cidrs(CidrList::OutboundExclude, &q.dst) {
        return Verdict::BypassExcludedCidr;
    }
    // 10.
    if t.has_port(PORT_OUT_INCLUDE, q.dport)
        || p.flags & POLICY_OUTBOUND_ALL_CIDRS != 0
        || t.in_cidrs(CidrList::OutboundInclude, &q.dst)
    {
        return Verdict::RedirectOutbound;
    }
    Verdict::BypassNotIncluded
}

/// Istio's inbound rule order (`ISTIO_INBOUND`) for a TCP connection that
/// arrives at the pod from outside (never for traffic on `lo`, which
/// iptables' PREROUTING does not see either):
///
/// 0. arriving through an interface of `excludeInterfaces`: not captured;
/// 1. the tunnel port (15008): not captured;
/// 2. with `includeInboundPorts: "*"`: an excluded port is not captured,
///    every other port goes to the inbound port;
/// 3. otherwise only the listed ports go to the inbound port;
///
/// with Linkerd's `skip-subnets` checked after the port rules, before the
/// redirect (a connection from one of those sources is not captured).
#[inline(always)]
pub fn decide_inbound<T: PodTables>(
    p: &PodPolicy,
    dport: u16,
    ifindex: u32,
    src: &Addr,
    t: &T,
) -> Verdict {
    if p.flags & POLICY_CAPTURE_INBOUND == 0 {
        return Verdict::BypassDisabled;
    }
    if p.flags & POLICY_EXCLUDE_IFACES != 0 && t.has_id(IDKEY_EXCLUDED_IFINDEX, ifindex) {
        return Verdict::BypassExcludedInterface;
    }
    if p.tunnel_port != 0 && dport == p.tunnel_port {
        return Verdict::BypassTunnel;
    }
    let skipped_source = || {
        p.flags & POLICY_INBOUND_SKIP_SOURCES != 0 && t.in_cidrs(CidrList::InboundSkipSources, src)
    };
    if p.flags & POLICY_INBOUND_ALL_PORTS != 0 {
        if t.has_port(PORT_IN_EXCLUDE, dport) {
            return Verdict::BypassExcludedPort;
        }
        if skipped_source() {
            return Verdict::BypassExcludedCidr;
        }
        return Verdict::RedirectInbound;
    }
    if t.has_port(PORT_IN_INCLUDE, dport) {
        if skipped_source() {
            return Verdict::BypassExcludedCidr;
        }
        return Verdict::RedirectInbound;
    }
    Verdict::BypassNotIncluded
}

/// Istio's rule for a TCP connection that arrives through one of the
/// pod's virtual interfaces (`istio.io/reroute-virtual-interfaces`,
/// istio-iptables `-k`; KubeVirt's VM traffic), whatever its destination:
/// `PREROUTING -i IFACE [-d INCLUDED] -j ISTIO_REDIRECT`, then
/// `-i IFACE -j RETURN`.
///
/// 1. no outbound capture for the pod, or an IPv6 destination for a pod
///    whose mesh writes no IPv6 rules: not captured;
/// 2. a destination in the outbound include ranges (or any, with `*`):
///    sent to the outbound port, as if the pod itself had dialled it;
/// 3. anything else: not captured, and not inbound either (the caller
///    must not apply [`decide_inbound`] to it).
///
/// Exclusions (ports, CIDRs, identities) do not apply: Istio's rule sits
/// in `PREROUTING`, before any of them.
#[inline(always)]
pub fn decide_virt<T: PodTables>(p: &PodPolicy, dst: &Addr, t: &T) -> Verdict {
    if p.flags & POLICY_CAPTURE_OUTBOUND == 0 {
        return Verdict::BypassDisabled;
    }
    if !is_v4_mapped(dst) && !ipv6_rules(p) {
        return Verdict::BypassDisabled;
    }
    if p.flags & POLICY_OUTBOUND_ALL_CIDRS != 0 || t.in_cidrs(CidrList::OutboundInclude, dst) {
        return Verdict::RedirectOutbound;
    }
    Verdict::BypassNotIncluded
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;
    use std::vec::Vec;

    #[derive(Default)]
    struct Tables {
        ports: Vec<(u16, u16)>,
        ids: Vec<(u32, u32)>,
        exclude: Vec<(Addr, u32)>,
        include: Vec<(Addr, u32)>,
        dns: Vec<(Addr, u32)>,
        iface_routes: Vec<(Addr, u32)>,
        skip_sources: Vec<(Addr, u32)>,
        pod_addrs: Vec<Addr>,
    }

    /// A remote client's address for the inbound tests.
    const SRC: Addr = [
        0,
        0,
        0xffff_u32.to_be(),
        u32::from_ne_bytes([198, 18, 7, 7]),
    ];

    fn in_prefix(a: &Addr, net: &Addr, bits: u32) -> bool {
        let a = u128::from_be_bytes(addr_octets(a));
        let n = u128::from_be_bytes(addr_octets(net));
        bits == 0 || (a >> (128 - bits)) == (n >> (128 - bits))
    }

    impl PodTables for Tables {
        fn has_port(&self, kind: u16, port: u16) -> bool {
            self.ports.contains(&(kind, port))
        }
        fn has_id(&self, kind: u32, id: u32) -> bool {
            self.ids.contains(&(kind, id))
        }
        fn in_cidrs(&self, list: CidrList, addr: &Addr) -> bool {
            let l = match list {
                CidrList::OutboundExclude => &self.exclude,
                CidrList::OutboundInclude => &self.include,
                CidrList::DnsServers => &self.dns,
                CidrList::ExcludedInterfaceRoutes => &self.iface_routes,
                CidrList::InboundSkipSources => &self.skip_sources,
            };
            l.iter().any(|(n, b)| in_prefix(addr, n, *b))
        }
        fn is_pod_addr(&self, addr: &Addr) -> bool {
            self.pod_addrs.contains(addr)
        }
    }

    fn v4(a: u8, b: u8, c: u8, d: u8) -> Addr {
        v4_mapped(u32::from_ne_bytes([a, b, c, d]))
    }

    fn istio() -> (PodPolicy, Tables) {
        let p = PodPolicy {
            flags: POLICY_CAPTURE_OUTBOUND
                | POLICY_CAPTURE_INBOUND
                | POLICY_OUTBOUND_ALL_CIDRS
                | POLICY_INBOUND_ALL_PORTS,
            outbound_port: 15001,
            inbound_port: 15006,
            tunnel_port: 15008,
            lo_id: 1337,
            lo_id_kind: ID_KIND_UID,
            ..Default::default()
        };
        let t = Tables {
            ids: std::vec![(IDKEY_UID, 1337), (IDKEY_GID, 1337)],
            ports: std::vec![(PORT_IN_EXCLUDE, 15090), (PORT_IN_EXCLUDE, 15021)],
            pod_addrs: std::vec![v4(198, 18, 0, 1)],
            ..Default::default()
        };
        (p, t)
    }

    fn q(dst: Addr, dport: u16, uid: u32) -> OutboundQuery {
        OutboundQuery {
            dst,
            dport,
            src: [0; 4],
            uid,
            gid: uid,
            udp: false,
        }
    }

    fn udp(dst: Addr, dport: u16, uid: u32) -> OutboundQuery {
        OutboundQuery {
            udp: true,
            ..q(dst, dport, uid)
        }
    }

    #[test]
    fn udp_is_only_captured_for_dns() {
        let (mut p, mut t) = istio();
        assert_eq!(
            decide_outbound(&p, &udp(v4(198, 18, 0, 2), 53, 1000), &t),
            Verdict::BypassNotIncluded
        );
        p.flags |= POLICY_CAPTURE_DNS;
        t.dns.push((v4(198, 18, 0, 53), 128));
        assert_eq!(
            decide_outbound(&p, &udp(v4(198, 18, 0, 53), 53, 1000), &t),
            Verdict::RedirectDns
        );
        assert_eq!(
            decide_outbound(&p, &q(v4(198, 18, 0, 53), 53, 1000), &t),
            Verdict::RedirectDns
        );
        // Not a resolver of the pod.
        assert_eq!(
            decide_outbound(&p, &udp(v4(198, 18, 0, 2), 53, 1000), &t),
            Verdict::BypassNotIncluded
        );
        assert_eq!(
            decide_outbound(&p, &q(v4(198, 18, 0, 2), 53, 1000), &t),
            Verdict::RedirectOutbound
        );
        p.flags |= POLICY_DNS_ALL_SERVERS;
        assert_eq!(
            decide_outbound(&p, &udp(v4(198, 18, 0, 2), 53, 1000), &t),
            Verdict::RedirectDns
        );
        // The proxy's own queries are not captured.
        assert_eq!(
            decide_outbound(&p, &udp(v4(198, 18, 0, 2), 53, 1337), &t),
            Verdict::BypassProxy
        );
        // Other UDP is never captured.
        assert_eq!(
            decide_outbound(&p, &udp(v4(198, 18, 0, 2), 5353, 1000), &t),
            Verdict::BypassNotIncluded
        );
        // Excluded ports apply to UDP as well.
        t.ports.push((PORT_OUT_EXCLUDE, 53));
        assert_eq!(
            decide_outbound(&p, &udp(v4(198, 18, 0, 2), 53, 1000), &t),
            Verdict::BypassExcludedPort
        );
    }

    #[test]
    fn dns_on_localhost_resolver_is_captured() {
        // A resolver on 127.0.0.53: Istio exempts port 53 from its loopback
        // RETURN rule so that DNS to a local resolver is still captured.
        let (mut p, t) = istio();
        p.flags |= POLICY_CAPTURE_DNS | POLICY_DNS_ALL_SERVERS;
        assert_eq!(
            decide_outbound(&p, &udp(v4(127, 0, 0, 53), 53, 1000), &t),
            Verdict::RedirectDns
        );
        assert_eq!(
            decide_outbound(&p, &q(v4(127, 0, 0, 53), 53, 1000), &t),
            Verdict::RedirectDns
        );
        // The proxy to its own pod on port 53 is not sent inbound.
        assert_eq!(
            decide_outbound(&p, &q(v4(198, 18, 0, 1), 53, 1337), &t),
            Verdict::BypassProxy
        );
        // Other loopback traffic is still left alone.
        assert_eq!(
            decide_outbound(&p, &q(v4(127, 0, 0, 1), 80, 1000), &t),
            Verdict::BypassLoopback
        );
    }

    #[test]
    fn dns_over_tcp_to_loopback_from_a_proxy_gid() {
        // istio-iptables with DNS capture (dns-uid-gid.golden): the UIDs'
        // loopback rule spares port 53, the GIDs' does not, and the first
        // UID's "other processes on lo" rule lets port 53 through, so a
        // process that is the proxy by its GID only is sent inbound when
        // it calls a resolver on loopback over TCP (found by the property
        // test against the rules, agent/src/rules_model_tests.rs).
        let (mut p, mut t) = istio();
        p.flags |= POLICY_CAPTURE_DNS | POLICY_DNS_ALL_SERVERS;
        t.ids.push((IDKEY_GID, 3000));
        let by_gid = |gid| OutboundQuery {
            gid,
            ..q(v4(127, 0, 0, 53), 53, 1000)
        };
        assert_eq!(
            decide_outbound(&p, &by_gid(1337), &t),
            Verdict::RedirectInbound
        );
        assert_eq!(
            decide_outbound(&p, &by_gid(3000), &t),
            Verdict::RedirectInbound
        );
        // The UIDs' rule spares it; other ports are returned by rule 4.
        assert_eq!(
            decide_outbound(&p, &q(v4(127, 0, 0, 53), 53, 1337), &t),
            Verdict::BypassProxy
        );
        assert_eq!(
            decide_outbound(
                &p,
                &OutboundQuery {
                    dport: 80,
                    ..by_gid(3000)
                },
                &t
            ),
            Verdict::BypassLoopback
        );
        // 127.0.0.1 is never sent inbound.
        assert_eq!(
            decide_outbound(
                &p,
                &OutboundQuery {
                    dst: v4(127, 0, 0, 1),
                    ..by_gid(3000)
                },
                &t
            ),
            Verdict::BypassProxy
        );
    }

    #[test]
    fn owner_groups() {
        let (mut p, mut t) = istio();
        t.ids.push((IDKEY_OWNER_GROUP, 2000));
        p.flags |= POLICY_OWNER_GROUPS_ONLY;
        let mut query = q(v4(198, 18, 0, 2), 80, 1000);
        assert_eq!(decide_outbound(&p, &query, &t), Verdict::BypassOwnerGroup);
        query.gid = 2000;
        assert_eq!(decide_outbound(&p, &query, &t), Verdict::RedirectOutbound);
        p.flags &= !POLICY_OWNER_GROUPS_ONLY;
        p.flags |= POLICY_OWNER_GROUPS_EXCEPT;
        assert_eq!(decide_outbound(&p, &query, &t), Verdict::BypassOwnerGroup);
        query.gid = 1000;
        assert_eq!(decide_outbound(&p, &query, &t), Verdict::RedirectOutbound);
    }

    #[test]
    fn no_capture_for_a_family_the_pod_lacks() {
        let (mut p, t) = istio();
        p.flags |= POLICY_HAS_IP4;
        let remote6 = addr_from_octets([0x20, 1, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2]);
        assert_eq!(
            decide_outbound(&p, &q(remote6, 80, 1000), &t),
            Verdict::BypassNoRoute
        );
        assert_eq!(
            decide_outbound(&p, &q(v4(198, 18, 0, 2), 80, 1000), &t),
            Verdict::RedirectOutbound
        );
        // No IPv6 rules at all: ::1 and ::6 are left alone too, the
        // proxy's included.
        let mut one = [0u32; 4];
        one[3] = V6_LAST_1;
        assert_eq!(
            decide_outbound(&p, &q(one, 80, 1000), &t),
            Verdict::BypassNoRoute
        );
        let mut six = [0u32; 4];
        six[3] = V6_LAST_6;
        assert_eq!(
            decide_outbound(&p, &q(six, 80, 1337), &t),
            Verdict::BypassNoRoute
        );
        assert!(!ipv6_rules(&p));
        // An IPv6-only pod keeps its IPv4 loopback rules.
        p.flags = p.flags & !POLICY_HAS_IP4 | POLICY_HAS_IP6;
        assert!(ipv6_rules(&p));
        assert_eq!(
            decide_outbound(&p, &q(v4(127, 0, 0, 5), 80, 1337), &t),
            Verdict::RedirectInbound
        );
        assert_eq!(
            decide_outbound(&p, &q(v4(198, 18, 0, 2), 80, 1000), &t),
            Verdict::BypassNoRoute
        );
        p.flags = p.flags & !POLICY_HAS_IP6 | POLICY_HAS_IP4;
        // A pod with no listed address at all is not restricted.
        p.flags &= !POLICY_HAS_IP4;
        assert_eq!(
            decide_outbound(&p, &q(remote6, 80, 1000), &t),
            Verdict::RedirectOutbound
        );
    }

    #[test]
    fn excluded_interfaces_come_first() {
        let (mut p, mut t) = istio();
        p.flags |= POLICY_EXCLUDE_IFACES;
        t.iface_routes.push((v4(198, 19, 0, 0), 96 + 16));
        t.ids.push((IDKEY_EXCLUDED_IFINDEX, 7));
        // Even the proxy-to-own-pod rule comes after it.
        assert_eq!(
            decide_outbound(&p, &q(v4(198, 19, 0, 9), 80, 1000), &t),
            Verdict::BypassExcludedInterface
        );
        assert_eq!(
            decide_outbound(&p, &q(v4(198, 18, 0, 9), 80, 1000), &t),
            Verdict::RedirectOutbound
        );
        assert_eq!(
            decide_inbound(&p, 8080, 7, &SRC, &t),
            Verdict::BypassExcludedInterface
        );
        assert_eq!(
            decide_inbound(&p, 8080, 2, &SRC, &t),
            Verdict::RedirectInbound
        );
    }

    #[test]
    fn linkerd_loopback_rule() {
        let (mut p, t) = istio();
        p.flags |= POLICY_LOOPBACK_SIMPLE;
        p.lo_id_kind = ID_KIND_NONE;
        assert_eq!(
            decide_outbound(&p, &q(v4(198, 18, 0, 1), 8080, 1337), &t),
            Verdict::BypassLoopback
        );
        assert_eq!(
            decide_outbound(&p, &q(v4(198, 18, 0, 2), 8080, 1337), &t),
            Verdict::BypassProxy
        );
        assert_eq!(
            decide_outbound(&p, &q(v4(198, 18, 0, 2), 8080, 1000), &t),
            Verdict::RedirectOutbound
        );
    }

    fn kuma() -> (PodPolicy, Tables) {
        let (mut p, mut t) = istio();
        p.flags |= POLICY_KUMA_ORDER | POLICY_CAPTURE_DNS | POLICY_DNS_ALL_SERVERS;
        p.tunnel_port = 0;
        p.lo_id = 5678;
        t.ids = std::vec![(IDKEY_UID, 5678)];
        (p, t)
    }

    #[test]
    fn kuma_excluded_cidrs_come_first() {
        let (p, mut t) = kuma();
        t.exclude.push((v4(198, 18, 0, 1), 128));
        t.exclude.push((v4(198, 18, 53, 53), 128));
        // Before the proxy-to-own-pod rule...
        assert_eq!(
            decide_outbound(&p, &q(v4(198, 18, 0, 1), 8080, 5678), &t),
            Verdict::BypassExcludedCidr
        );
        // ...and before DNS capture, UDP included.
        assert_eq!(
            decide_outbound(&p, &udp(v4(198, 18, 53, 53), 53, 1000), &t),
            Verdict::BypassExcludedCidr
        );
        assert_eq!(
            decide_outbound(&p, &udp(v4(198, 18, 53, 54), 53, 1000), &t),
            Verdict::RedirectDns
        );
    }

    #[test]
    fn kuma_dns() {
        let (mut p, mut t) = kuma();
        // UDP to any server, the local resolver included.
        assert_eq!(
            decide_outbound(&p, &udp(v4(127, 0, 0, 53), 53, 1000), &t),
            Verdict::RedirectDns
        );
        // Not the proxy's own queries.
        assert_eq!(
            decide_outbound(&p, &udp(v4(198, 18, 0, 2), 53, 5678), &t),
            Verdict::BypassProxy
        );
        // DNS over TCP of the applications: never captured.
        assert_eq!(
            decide_outbound(&p, &q(v4(198, 18, 0, 2), 53, 1000), &t),
            Verdict::BypassNotIncluded
        );
        // The proxy's TCP to its own pod on 53 goes inbound (no port-53
        // exception in Kuma's loopback rule).
        assert_eq!(
            decide_outbound(&p, &q(v4(198, 18, 0, 1), 53, 5678), &t),
            Verdict::RedirectInbound
        );
        // Excluded ports are TCP only: UDP DNS is still captured.
        t.ports.push((PORT_OUT_EXCLUDE, 53));
        assert_eq!(
            decide_outbound(&p, &udp(v4(198, 18, 0, 2), 53, 1000), &t),
            Verdict::RedirectDns
        );
        // Only the resolvers.
        p.flags &= !POLICY_DNS_ALL_SERVERS;
        t.dns.push((v4(198, 18, 53, 53), 128));
        assert_eq!(
            decide_outbound(&p, &udp(v4(198, 18, 0, 2), 53, 1000), &t),
            Verdict::BypassNotIncluded
        );
        assert_eq!(
            decide_outbound(&p, &udp(v4(198, 18, 53, 53), 53, 1000), &t),
            Verdict::RedirectDns
        );
        // Without DNS capture TCP 53 is ordinary TCP (here excluded).
        p.flags &= !POLICY_CAPTURE_DNS;
        assert_eq!(
            decide_outbound(&p, &q(v4(198, 18, 0, 2), 53, 1000), &t),
            Verdict::BypassExcludedPort
        );
        t.ports.clear();
        assert_eq!(
            decide_outbound(&p, &q(v4(198, 18, 0, 2), 53, 1000), &t),
            Verdict::RedirectOutbound
        );
        assert_eq!(
            decide_outbound(&p, &udp(v4(198, 18, 53, 53), 53, 1000), &t),
            Verdict::BypassNotIncluded
        );
    }

    #[test]
    fn kuma_loopback_rules_are_istios() {
        let (p, t) = kuma();
        assert_eq!(
            decide_outbound(&p, &q(v4(198, 18, 0, 1), 15008, 5678), &t),
            Verdict::RedirectInbound
        );
        assert_eq!(
            decide_outbound(&p, &q(v4(198, 18, 0, 1), 8080, 1000), &t),
            Verdict::BypassLoopback
        );
        let mut query = q(v4(198, 18, 0, 1), 8080, 5678);
        query.src = v4(127, 0, 0, 6);
        assert_eq!(decide_outbound(&p, &query, &t), Verdict::BypassPassthrough);
        assert_eq!(
            decide_outbound(&p, &q(v4(198, 18, 0, 2), 80, 1000), &t),
            Verdict::RedirectOutbound
        );
    }

    #[test]
    fn app_to_remote_is_captured() {
        let (p, t) = istio();
        let v = decide_outbound(&p, &q(v4(198, 18, 0, 2), 80, 1000), &t);
        assert_eq!(v, Verdict::RedirectOutbound);
    }

    #[test]
    fn proxy_to_remote_is_not_captured() {
        let (p, t) = istio();
        assert_eq!(
            decide_outbound(&p, &q(v4(198, 18, 0, 2), 80, 1337), &t),
            Verdict::BypassProxy
        );
    }

    #[test]
    fn proxy_gid_alone_is_not_captured() {
        let (p, t) = istio();
        let mut query = q(v4(198, 18, 0, 2), 80, 1000);
        query.gid = 1337;
        assert_eq!(decide_outbound(&p, &query, &t), Verdict::BypassProxy);
    }

    #[test]
    fn localhost_is_not_captured() {
        let (p, t) = istio();
        assert_eq!(
            decide_outbound(&p, &q(v4(127, 0, 0, 1), 80, 1000), &t),
            Verdict::BypassLoopback
        );
        assert_eq!(
            decide_outbound(&p, &q(v4(127, 0, 0, 1), 80, 1337), &t),
            Verdict::BypassProxy
        );
    }

    #[test]
    fn app_to_own_pod_ip_is_not_captured() {
        let (p, t) = istio();
        assert_eq!(
            decide_outbound(&p, &q(v4(198, 18, 0, 1), 8080, 1000), &t),
            Verdict::BypassLoopback
        );
    }

    #[test]
    fn proxy_to_own_pod_ip_goes_inbound() {
        let (p, t) = istio();
        assert_eq!(
            decide_outbound(&p, &q(v4(198, 18, 0, 1), 8080, 1337), &t),
            Verdict::RedirectInbound
        );
        // ...but not to the tunnel port.
        assert_eq!(
            decide_outbound(&p, &q(v4(198, 18, 0, 1), 15008, 1337), &t),
            Verdict::BypassProxy
        );
    }

    #[test]
    fn validation_probe_goes_inbound() {
        // istio's redirect validation: proxy UID dials 127.0.0.6:15002.
        let (p, t) = istio();
        assert_eq!(
            decide_outbound(&p, &q(v4(127, 0, 0, 6), 15002, 1337), &t),
            Verdict::RedirectInbound
        );
    }

    #[test]
    fn passthrough_source_is_not_captured() {
        let (p, t) = istio();
        let mut query = q(v4(198, 18, 0, 1), 8080, 1337);
        query.src = v4(127, 0, 0, 6);
        assert_eq!(decide_outbound(&p, &query, &t), Verdict::BypassPassthrough);
    }

    #[test]
    fn excluded_port_wins_over_everything() {
        let (p, mut t) = istio();
        t.ports.push((PORT_OUT_EXCLUDE, 3306));
        assert_eq!(
            decide_outbound(&p, &q(v4(198, 18, 0, 2), 3306, 1000), &t),
            Verdict::BypassExcludedPort
        );
    }

    #[test]
    fn excluded_cidr_wins_over_star_and_over_narrower_include() {
        let (mut p, mut t) = istio();
        t.exclude.push((v4(198, 18, 0, 0), 96 + 16));
        assert_eq!(
            decide_outbound(&p, &q(v4(198, 18, 0, 2), 80, 1000), &t),
            Verdict::BypassExcludedCidr
        );
        p.flags &= !POLICY_OUTBOUND_ALL_CIDRS;
        t.include.push((v4(198, 18, 0, 2), 128));
        assert_eq!(
            decide_outbound(&p, &q(v4(198, 18, 0, 2), 80, 1000), &t),
            Verdict::BypassExcludedCidr
        );
    }

    #[test]
    fn virtual_interfaces_follow_only_the_include_ranges() {
        let (mut p, mut t) = istio();
        let remote = v4(198, 18, 10, 1);
        assert_eq!(decide_virt(&p, &remote, &t), Verdict::RedirectOutbound);
        // Exclusions sit in ISTIO_OUTPUT, after PREROUTING's -k rules.
        t.exclude.push((remote, 128));
        t.ports.push((PORT_OUT_EXCLUDE, 80));
        assert_eq!(decide_virt(&p, &remote, &t), Verdict::RedirectOutbound);
        // Only the include ranges count, not the include ports.
        p.flags &= !POLICY_OUTBOUND_ALL_CIDRS;
        t.ports.push((PORT_OUT_INCLUDE, 80));
        assert_eq!(decide_virt(&p, &remote, &t), Verdict::BypassNotIncluded);
        t.include.push((v4(198, 18, 10, 0), 96 + 24));
        assert_eq!(decide_virt(&p, &remote, &t), Verdict::RedirectOutbound);
        assert_eq!(
            decide_virt(&p, &v4(198, 18, 11, 1), &t),
            Verdict::BypassNotIncluded
        );
        // No IPv6 rules for an IPv4 pod (ISTIO_DUAL_STACK unset).
        p.flags |= POLICY_OUTBOUND_ALL_CIDRS | POLICY_HAS_IP4;
        let v6: Addr = [u32::to_be(0x2001_0002), 0, 0, u32::to_be(1)];
        assert_eq!(decide_virt(&p, &v6, &t), Verdict::BypassDisabled);
        p.flags |= POLICY_HAS_IP6;
        assert_eq!(decide_virt(&p, &v6, &t), Verdict::RedirectOutbound);
        // interceptionMode NONE.
        p.flags &= !POLICY_CAPTURE_OUTBOUND;
        assert_eq!(decide_virt(&p, &remote, &t), Verdict::BypassDisabled);
    }

    #[test]
    fn included_port_captures_even_outside_included_cidrs() {
        let (mut p, mut t) = istio();
        p.flags &= !POLICY_OUTBOUND_ALL_CIDRS;
        assert_eq!(
            decide_outbound(&p, &q(v4(198, 18, 0, 2), 80, 1000), &t),
            Verdict::BypassNotIncluded
        );
        t.ports.push((PORT_OUT_INCLUDE, 80));
        assert_eq!(
            decide_outbound(&p, &q(v4(198, 18, 0, 2), 80, 1000), &t),
            Verdict::RedirectOutbound
        );
    }

    #[test]
    fn second_proxy_uid_is_shadowed_on_loopback_as_in_istio() {
        let (p, mut t) = istio();
        t.ids.push((IDKEY_UID, 1338));
        // uid 1338 is a proxy, but the first uid's "! --uid-owner 1337 on lo"
        // RETURN catches it before its own rule 3.
        assert_eq!(
            decide_outbound(&p, &q(v4(198, 18, 0, 1), 8080, 1338), &t),
            Verdict::BypassLoopback
        );
        assert_eq!(
            decide_outbound(&p, &q(v4(198, 18, 0, 2), 8080, 1338), &t),
            Verdict::BypassProxy
        );
    }

    #[test]
    fn include_with_loopback_disables_rule_four() {
        let (mut p, t) = istio();
        p.flags |= POLICY_INCLUDE_HAS_LOOPBACK;
        assert_eq!(
            decide_outbound(&p, &q(v4(127, 0, 0, 5), 80, 1000), &t),
            Verdict::RedirectOutbound
        );
        assert_eq!(
            decide_outbound(&p, &q(v4(127, 0, 0, 1), 80, 1000), &t),
            Verdict::BypassLocalhost
        );
    }

    #[test]
    fn ipv6_loopback_rules() {
        let (mut p, mut t) = istio();
        let mut six = [0u32; 4];
        six[3] = V6_LAST_6;
        let mut one = [0u32; 4];
        one[3] = V6_LAST_1;
        let pod6 = addr_from_octets([0x20, 1, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]);
        t.pod_addrs.push(pod6);
        p.flags |= POLICY_HAS_IP6;
        assert_eq!(
            decide_outbound(&p, &q(one, 80, 1000), &t),
            Verdict::BypassLoopback
        );
        assert_eq!(
            decide_outbound(&p, &q(one, 80, 1337), &t),
            Verdict::BypassProxy
        );
        assert_eq!(
            decide_outbound(&p, &q(pod6, 80, 1337), &t),
            Verdict::RedirectInbound
        );
        let mut query = q(pod6, 80, 1337);
        query.src = six;
        assert_eq!(decide_outbound(&p, &query, &t), Verdict::BypassPassthrough);
        let remote6 = addr_from_octets([0x20, 1, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2]);
        assert_eq!(
            decide_outbound(&p, &q(remote6, 80, 1000), &t),
            Verdict::RedirectOutbound
        );
    }

    #[test]
    fn capture_disabled() {
        let (mut p, t) = istio();
        p.flags = 0;
        assert_eq!(
            decide_outbound(&p, &q(v4(198, 18, 0, 2), 80, 1000), &t),
            Verdict::BypassDisabled
        );
        assert_eq!(decide_inbound(&p, 80, 2, &SRC, &t), Verdict::BypassDisabled);
    }

    #[test]
    fn inbound_rules() {
        let (mut p, mut t) = istio();
        assert_eq!(
            decide_inbound(&p, 8080, 2, &SRC, &t),
            Verdict::RedirectInbound
        );
        assert_eq!(
            decide_inbound(&p, 15008, 2, &SRC, &t),
            Verdict::BypassTunnel
        );
        assert_eq!(
            decide_inbound(&p, 15090, 2, &SRC, &t),
            Verdict::BypassExcludedPort
        );
        p.flags &= !POLICY_INBOUND_ALL_PORTS;
        assert_eq!(
            decide_inbound(&p, 8080, 2, &SRC, &t),
            Verdict::BypassNotIncluded
        );
        t.ports.push((PORT_IN_INCLUDE, 8080));
        assert_eq!(
            decide_inbound(&p, 8080, 2, &SRC, &t),
            Verdict::RedirectInbound
        );
        // Exclusions only matter with "*".
        t.ports.push((PORT_IN_EXCLUDE, 8080));
        assert_eq!(
            decide_inbound(&p, 8080, 2, &SRC, &t),
            Verdict::RedirectInbound
        );
    }

    /// Linkerd's `skip-subnets`: after the port rules, before the redirect.
    #[test]
    fn inbound_skip_sources() {
        let (mut p, mut t) = istio();
        p.flags |= POLICY_INBOUND_ALL_PORTS;
        assert_eq!(
            decide_inbound(&p, 8080, 2, &SRC, &t),
            Verdict::RedirectInbound
        );
        t.skip_sources.push((v4(198, 18, 0, 0), 96 + 16));
        // The flag switches the lookup on.
        assert_eq!(
            decide_inbound(&p, 8080, 2, &SRC, &t),
            Verdict::RedirectInbound
        );
        p.flags |= POLICY_INBOUND_SKIP_SOURCES;
        assert_eq!(
            decide_inbound(&p, 8080, 2, &SRC, &t),
            Verdict::BypassExcludedCidr
        );
        let other = v4(203, 0, 113, 9);
        assert_eq!(
            decide_inbound(&p, 8080, 2, &other, &t),
            Verdict::RedirectInbound
        );
        t.ports.push((PORT_IN_EXCLUDE, 8080));
        assert_eq!(
            decide_inbound(&p, 8080, 2, &SRC, &t),
            Verdict::BypassExcludedPort
        );
    }
}
