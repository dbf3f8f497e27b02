//! Istio ambient mode's in-pod rules (ztunnel), as plain Rust.
//!
//! istio-cni writes these into an ambient pod's netns
//! (`cni/pkg/iptables/iptables.go` in istio/istio; goldens in
//! `../shared/reference/peers/istio-ambient/`). ztunnel listens inside
//! the pod: 15001 outbound, 15006 inbound, 15008 HBONE, 15053 DNS; every
//! socket ztunnel makes in the pod carries mark [`ZTUNNEL_MARK`].
//!
//! nat `OUTPUT`, first match wins:
//! 1. TCP to the probe address (169.254.7.127): `ACCEPT`;
//! 2. DNS capture: UDP port 53 not out of `lo`, not marked: to 15053;
//! 3. DNS capture: TCP port 53 not to 127.0.0.1, not marked: to 15053;
//! 4. TCP marked [`CONNMARK_MARK`] (connections ztunnel made into the pod,
//!    answered by the application): `ACCEPT`;
//! 5. anything out of `lo` not to 127.0.0.1: `ACCEPT`;
//! 6. TCP not to 127.0.0.1, not marked: to 15001.
//!
//! nat `PREROUTING` (inbound): from the probe address `ACCEPT`; TCP not
//! to 127.0.0.1, not to 15008, not marked: to 15006. weir's sk_lookup
//! sees no packet mark; see [`decide_ambient_inbound`].

use crate::*;

/// Policy flag: the pod is an Istio ambient pod (ztunnel's in-pod rules,
/// [`decide_ambient_outbound`], instead of the sidecar rules).
pub const POLICY_AMBIENT: u32 = 1 << 17;

/// The mark ztunnel sets on every socket it makes in a pod (its own
/// traffic is never captured).
pub const ZTUNNEL_MARK: u32 = 0x539;
/// The part of the mark istio-cni compares (`--mark 0x539/0xfff`).
pub const ZTUNNEL_MARK_MASK: u32 = 0xfff;
/// istio-cni's connection mark for connections ztunnel made into the pod
/// (`CONNMARK --set-xmark 0x111/0xfff`): the application's answers carry
/// it and policy routing (`fwmark 0x111/0xfff lookup 100`, `local default
/// dev lo table 100`) delivers them back to ztunnel's transparent socket.
/// weir sets it on ztunnel's socket itself (sockops), and the pod's
/// `tcp_fwmark_accept` gives it to the application's accepted socket.
pub const CONNMARK_MARK: u32 = 0x111;
/// The routing table of the `fwmark 0x111/0xfff` rule (istio-cni's).
pub const CONNMARK_TABLE: u32 = 100;
/// The priority of that rule (istio-cni's).
pub const CONNMARK_RULE_PRIORITY: u32 = 32764;

/// Whether a socket mark is ztunnel's ([`ZTUNNEL_MARK`] under the mask).
#[inline(always)]
pub const fn is_ztunnel_mark(mark: u32) -> bool {
    mark & ZTUNNEL_MARK_MASK == ZTUNNEL_MARK
}

/// Whether a socket mark is the connection mark of a ztunnel-to-pod
/// connection ([`CONNMARK_MARK`] under the mask).
#[inline(always)]
pub const fn is_connmark(mark: u32) -> bool {
    mark & ZTUNNEL_MARK_MASK == CONNMARK_MARK
}

/// istio-cni's outbound rules (module docs) for one connection of an
/// ambient pod, `mark` being the socket's mark. The probe address is
/// the pod's `OutboundExclude` list (the agent writes it there: ambient
/// pods have no other outbound exclusions).
#[inline(always)]
pub fn decide_ambient_outbound<T: PodTables>(
    p: &PodPolicy,
    q: &OutboundQuery,
    mark: u32,
    t: &T,
) -> Verdict {
    if p.flags & POLICY_CAPTURE_OUTBOUND == 0 {
        return Verdict::BypassDisabled;
    }
    let on_lo = is_loopback_route(&q.dst, t);
    let has4 = p.flags & POLICY_HAS_IP4 != 0;
    let has6 = p.flags & POLICY_HAS_IP6 != 0;
    let v4 = is_v4_mapped(&q.dst);
    if (v4 && has6 && !has4 && !on_lo) || (!v4 && !ipv6_rules(p)) {
        return Verdict::BypassNoRoute;
    }
    let ztunnel = is_ztunnel_mark(mark);
    let localhost = is_localhost(&q.dst);
    // 1.
    if !q.udp && t.in_cidrs(CidrList::OutboundExclude, &q.dst) {
        return Verdict::BypassExcludedCidr;
    }
    // 2. and 3.
    if p.flags & POLICY_CAPTURE_DNS != 0 && q.dport == 53 && !ztunnel {
        if q.udp && !on_lo {
            return Verdict::RedirectDns;
        }
        if !q.udp && !localhost {
            return Verdict::RedirectDns;
        }
    }
    // 4.
    if !q.udp && is_connmark(mark) {
        return Verdict::BypassZtunnel;
    }
    // 5.
    if on_lo && !localhost {
        return Verdict::BypassLoopback;
    }
    if q.udp {
        return Verdict::BypassNotIncluded;
    }
    if localhost {
        return Verdict::BypassLocalhost;
    }
    // 6.
    if ztunnel {
        return Verdict::BypassZtunnel;
    }
    Verdict::RedirectOutbound
}

/// istio-cni's inbound rules for a TCP connection arriving at an ambient
/// pod from outside (the caller never asks for traffic on `lo` or from
/// the pod's own addresses):
///
/// 1. a connection ztunnel itself made into the pod (`from_ztunnel`: its
///    socket was marked, which weir records in sockops, since sk_lookup
///    cannot see marks): not captured;
/// 2. from a probe source (`InboundSkipSources`: 169.254.7.127, and the
///    node's own addresses, see docs/ambient.md): not captured;
/// 3. to the tunnel port (15008, ztunnel's HBONE listener): not captured;
/// 4. bypass-inbound-capture (no `POLICY_CAPTURE_INBOUND`): not captured;
/// 5. anything else: to the inbound port (15006).
#[inline(always)]
pub fn decide_ambient_inbound<T: PodTables>(
    p: &PodPolicy,
    dport: u16,
    src: &Addr,
    from_ztunnel: bool,
    t: &T,
) -> Verdict {
    if from_ztunnel {
        return Verdict::BypassZtunnel;
    }
    if p.flags & POLICY_CAPTURE_INBOUND == 0 {
        return Verdict::BypassDisabled;
    }
    if p.flags & POLICY_INBOUND_SKIP_SOURCES != 0 && t.in_cidrs(CidrList::InboundSkipSources, src) {
        return Verdict::BypassExcludedCidr;
    }
    if p.tunnel_port != 0 && dport == p.tunnel_port {
        return Verdict::BypassTunnel;
    }
    if dport == p.inbound_port {
        // REDIRECT to the same port: the same listener either way.
        return Verdict::BypassExcludedPort;
    }
    Verdict::RedirectInbound
}

/// Whether sockops must give a ztunnel socket the connection mark: a
/// socket marked [`ZTUNNEL_MARK`] connecting to one of the pod's own
/// addresses (`to_pod`), i.e. ztunnel's transparent connection to the
/// application, whose answers must come back to ztunnel.
#[inline(always)]
pub const fn ztunnel_to_app(mark: u32, to_pod: bool) -> bool {
    is_ztunnel_mark(mark) && to_pod
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;
    use std::vec::Vec;

    #[derive(Default)]
    struct T {
        pod: Vec<Addr>,
        probe: Vec<Addr>,
        skip: Vec<Addr>,
    }
    impl PodTables for T {
        fn has_port(&self, _: u16, _: u16) -> bool {
            false
        }
        fn has_id(&self, _: u32, _: u32) -> bool {
            false
        }
        fn in_cidrs(&self, list: CidrList, a: &Addr) -> bool {
            match list {
                CidrList::OutboundExclude => self.probe.contains(a),
                CidrList::InboundSkipSources => self.skip.contains(a),
                _ => false,
            }
        }
        fn is_pod_addr(&self, a: &Addr) -> bool {
            self.pod.contains(a)
        }
    }

    fn v4(a: u8, b: u8, c: u8, d: u8) -> Addr {
        v4_mapped(u32::from_ne_bytes([a, b, c, d]))
    }

    fn ambient(dns: bool) -> (PodPolicy, T) {
        let mut flags = POLICY_AMBIENT
            | POLICY_CAPTURE_OUTBOUND
            | POLICY_CAPTURE_INBOUND
            | POLICY_HAS_IP4
            | POLICY_INBOUND_SKIP_SOURCES;
        if dns {
            flags |= POLICY_CAPTURE_DNS | POLICY_DNS_ALL_SERVERS;
        }
        let p = PodPolicy {
            flags,
            outbound_port: 15001,
            inbound_port: 15006,
            tunnel_port: 15008,
            dns_port: 15053,
            ..Default::default()
        };
        let t = T {
            pod: std::vec![v4(198, 18, 0, 1)],
            probe: std::vec![v4(169, 254, 7, 127)],
            skip: std::vec![v4(169, 254, 7, 127), v4(198, 18, 0, 254)],
        };
        (p, t)
    }

    fn q(dst: Addr, dport: u16, udp: bool) -> OutboundQuery {
        OutboundQuery {
            dst,
            dport,
            src: [0; 4],
            uid: 1000,
            gid: 1000,
            udp,
        }
    }

    #[test]
    fn outbound_rules_in_istio_cni_order() {
        let (p, t) = ambient(true);
        let remote = v4(10, 0, 0, 5);
        let d = |dst, port, udp, mark| decide_ambient_outbound(&p, &q(dst, port, udp), mark, &t);
        assert_eq!(d(remote, 80, false, 0), Verdict::RedirectOutbound);
        // ztunnel's own sockets, by the masked mark only.
        assert_eq!(d(remote, 80, false, 0x539), Verdict::BypassZtunnel);
        assert_eq!(d(remote, 80, false, 0x1539), Verdict::BypassZtunnel);
        assert_eq!(d(remote, 80, false, 0x538), Verdict::RedirectOutbound);
        // Connection-marked sockets (the application's side of ztunnel's
        // connections into the pod).
        assert_eq!(d(remote, 80, false, 0x111), Verdict::BypassZtunnel);
        // Probe address, loopback, localhost.
        assert_eq!(
            d(v4(169, 254, 7, 127), 80, false, 0),
            Verdict::BypassExcludedCidr
        );
        assert_eq!(d(v4(198, 18, 0, 1), 80, false, 0), Verdict::BypassLoopback);
        assert_eq!(d(v4(127, 0, 0, 2), 80, false, 0), Verdict::BypassLoopback);
        assert_eq!(d(v4(127, 0, 0, 1), 80, false, 0), Verdict::BypassLocalhost);
        // DNS: UDP not on lo, TCP not to 127.0.0.1 (the pod's own address
        // and 127.0.0.53 included), never ztunnel's.
        assert_eq!(d(remote, 53, true, 0), Verdict::RedirectDns);
        assert_eq!(d(v4(127, 0, 0, 53), 53, true, 0), Verdict::BypassLoopback);
        assert_eq!(d(v4(127, 0, 0, 53), 53, false, 0), Verdict::RedirectDns);
        assert_eq!(d(v4(198, 18, 0, 1), 53, false, 0), Verdict::RedirectDns);
        assert_eq!(d(v4(127, 0, 0, 1), 53, false, 0), Verdict::BypassLocalhost);
        assert_eq!(d(remote, 53, true, 0x539), Verdict::BypassNotIncluded);
        assert_eq!(d(remote, 53, false, 0x539), Verdict::BypassZtunnel);
        // DNS ahead of the connection mark and the probe rule for UDP.
        assert_eq!(d(remote, 53, false, 0x111), Verdict::RedirectDns);
        assert_eq!(d(v4(169, 254, 7, 127), 53, true, 0), Verdict::RedirectDns);
        // Other UDP is never captured.
        assert_eq!(d(remote, 5353, true, 0), Verdict::BypassNotIncluded);
        let (p, t) = ambient(false);
        let d = |dst, port, udp| decide_ambient_outbound(&p, &q(dst, port, udp), 0, &t);
        assert_eq!(d(remote, 53, true), Verdict::BypassNotIncluded);
        assert_eq!(d(remote, 53, false), Verdict::RedirectOutbound);
    }

    #[test]
    fn inbound_rules() {
        let (mut p, t) = ambient(false);
        let client = v4(10, 0, 2, 7);
        assert_eq!(
            decide_ambient_inbound(&p, 8080, &client, false, &t),
            Verdict::RedirectInbound
        );
        assert_eq!(
            decide_ambient_inbound(&p, 15008, &client, false, &t),
            Verdict::BypassTunnel
        );
        assert_eq!(
            decide_ambient_inbound(&p, 8080, &client, true, &t),
            Verdict::BypassZtunnel
        );
        for probe in [v4(169, 254, 7, 127), v4(198, 18, 0, 254)] {
            assert_eq!(
                decide_ambient_inbound(&p, 8080, &probe, false, &t),
                Verdict::BypassExcludedCidr
            );
        }
        p.flags &= !POLICY_CAPTURE_INBOUND;
        assert_eq!(
            decide_ambient_inbound(&p, 8080, &client, false, &t),
            Verdict::BypassDisabled
        );
    }

    #[test]
    fn only_ztunnel_sockets_to_the_pod_get_the_connection_mark() {
        assert!(ztunnel_to_app(0x539, true));
        assert!(!ztunnel_to_app(0x539, false));
        assert!(!ztunnel_to_app(0, true));
        assert!(!ztunnel_to_app(0x111, true));
    }
}
