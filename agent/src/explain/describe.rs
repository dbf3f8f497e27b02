//! Putting an outcome into words: the rule, the iptables rule weir
//! reproduces, where the connection ends up, its counter. Pure: unit
//! tested (in the parent module).

use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use ipnet::IpNet;
use weir_common::*;

use super::{EnrolledPod, Explanation, Outcome, Query};
use crate::metrics;
use crate::policy::addr_of;

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

fn listening(view: &EnrolledPod, port: u16, v6: bool) -> bool {
    let fam = |f: u32| view.listeners.contains(&(port, f as u16));
    // A dual-stack [::] listener takes IPv4 connections too.
    fam(AF_INET6) || (!v6 && fam(AF_INET))
}

/// Puts the outcome into words. Pure: unit tested.
pub fn describe(view: &EnrolledPod, q: &Query, outcome: Outcome) -> Explanation {
    let p = &view.policy;
    let dst = q.dst;
    let dip = dst.ip();
    let d = dst.port();
    let v6 = dip.is_ipv6() && !matches!(dip, IpAddr::V6(a) if a.to_ipv4_mapped().is_some());
    let (id_name, owner) = id_word(p.lo_id_kind);
    let labels = format!("namespace=\"{}\",pod=\"{}\"", view.namespace, view.name);
    // The series the kernel adds this connection to, named as /metrics
    // exports it.
    let series = |c: PodCounter| {
        let (family, values) = c.series();
        let mut s = format!("{family}{{{labels}");
        for (name, value) in metrics::pod_label_names(family).iter().zip(values) {
            let _ = write!(s, ",{name}=\"{value}\"");
        }
        s.push('}');
        s
    };
    let mut notes = Vec::new();
    let untouched = format!("{dst} (untouched)");
    // Ambient pods get istio-cni's in-pod rules (docs/ambient.md), not
    // istio-iptables' sidecar rules: their redirects are described as such.
    let ambient = p.flags & POLICY_AMBIENT != 0;
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
    let (rule, istio, target, listen): (String, String, String, _) =
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
            ),
            (_, Outcome::VirtualInterface) => (
                "the connection arrives through one of the pod's virtual interfaces \
                 (reroute-virtual-interfaces): never inbound traffic; its TCP connections were \
                 redirected on the way in by weir_virt_in"
                    .into(),
                "-A ISTIO_INBOUND -i <interface> -j RETURN".into(),
                untouched.clone(),
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
            ),
            (false, Outcome::Decided(v)) => match v {
                Verdict::BypassNoRoute if dip.is_ipv6() && p.flags & POLICY_HAS_IP4 != 0 => (
                    "the pod has no IPv6 rules (no IPv6 address, or its mesh does not capture \
                     IPv6: Linkerd without IPv6 support, Kuma's ipv4 mode, weir.dev/capture-ipv6: \
                     \"false\"): its IPv6 connections, ::1 included, are left alone"
                        .to_string(),
                    "none: no ip6tables rule".into(),
                    untouched.clone(),
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
                    None,
                ),
                Verdict::BypassExcludedInterface => (
                    format!(
                        "{dip} is reached through an interface of excludeInterfaces (subnets: {})",
                        list_or_none(&view.iface_routes.iter().collect::<Vec<_>>())
                    ),
                    "-A OUTPUT -o <interface> -j RETURN (before ISTIO_OUTPUT)".into(),
                    untouched.clone(),
                    None,
                ),
                Verdict::RedirectOutbound if ambient => (
                    format!(
                        "ambient pod (istio-cni's in-pod rules): a TCP connection to {dip}, not {}, from a \
                         socket not marked 0x539/0xfff (not ztunnel's): redirected to ztunnel's outbound \
                         listener in the pod",
                        if v6 { "::1" } else { "127.0.0.1" }
                    ),
                    format!(
                        "-A ISTIO_OUTPUT ! -d {} -p tcp -m mark ! --mark 0x539/0xfff -j REDIRECT --to-ports {}",
                        localhost_cidr(v6),
                        p.outbound_port
                    ),
                    format!(
                        "{} (ztunnel's outbound listener, which reads {dst} with SO_ORIGINAL_DST; the \
                         application's getpeername() still says {dst})",
                        proxy_addr(dip, p.outbound_port)
                    ),
                    Some((p.outbound_port, v6)),
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
                        Some((p.inbound_port, v6)),
                    )
                }
                Verdict::BypassExcludedPort => (
                    format!("ISTIO_OUTPUT: port {d} is in excludeOutboundPorts"),
                    format!("-A ISTIO_OUTPUT -p tcp --dport {d} -j RETURN"),
                    untouched,
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
                    None,
                ),
                Verdict::BypassTunnel | Verdict::BypassDisabled => (
                    off_rule,
                    off_istio,
                    untouched,
                    None,
                ),
            },
            (true, Outcome::Decided(v)) => match v {
                Verdict::BypassExcludedInterface => (
                    "the connection arrives through an interface of excludeInterfaces".into(),
                    "-A PREROUTING -i <interface> -j RETURN".into(),
                    untouched.clone(),
                    None,
                ),
                Verdict::RedirectInbound | Verdict::RedirectOutbound if ambient => (
                    format!(
                        "ambient pod (istio-cni's in-pod rules): TCP to port {d}, not ztunnel's HBONE \
                         port {} and not from ztunnel (mark 0x539/0xfff): handed to ztunnel's inbound \
                         plain-text listener in the pod",
                        p.tunnel_port
                    ),
                    format!(
                        "-A ISTIO_PRERT ! -d {} -p tcp ! --dport {} -m mark ! --mark 0x539/0xfff \
                         -j REDIRECT --to-ports {}",
                        localhost_cidr(v6),
                        p.tunnel_port,
                        p.inbound_port
                    ),
                    format!(
                        "ztunnel's listener on port {} (weir_sk_lookup; the local address stays {dst}, \
                         which SO_ORIGINAL_DST reports)",
                        p.inbound_port
                    ),
                    Some((p.inbound_port, v6)),
                ),
                Verdict::BypassTunnel if ambient => (
                    format!(
                        "ambient pod: port {d} is ztunnel's HBONE port: ztunnel's own listener in the \
                         pod takes it (mTLS from the peer's ztunnel), never redirected"
                    ),
                    format!(
                        "-A ISTIO_PRERT ! -d {} -p tcp ! --dport {d} ... -j REDIRECT --to-ports {} \
                         (does not match)",
                        localhost_cidr(v6),
                        p.inbound_port
                    ),
                    untouched.clone(),
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
                        Some((p.inbound_port, v6)),
                    )
                }
                Verdict::BypassTunnel => (
                    format!(
                        "ISTIO_INBOUND: port {d} is the HBONE tunnel port, never captured"
                    ),
                    format!("-A ISTIO_INBOUND -p tcp --dport {d} -j RETURN"),
                    untouched,
                    None,
                ),
                Verdict::BypassExcludedPort => (
                    format!(
                        "ISTIO_INBOUND: port {d} is in excludeInboundPorts (which also holds the sidecar's \
                         status and Prometheus ports and the inbound port itself)"
                    ),
                    format!("-A ISTIO_INBOUND -p tcp --dport {d} -j RETURN"),
                    untouched,
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
                    None,
                ),
                Verdict::BypassNotIncluded => (
                    format!(
                        "no ISTIO_INBOUND rule matched: port {d} is not in includeInboundPorts ({})",
                        list_or_none(&view.ports_of(PORT_IN_INCLUDE))
                    ),
                    "end of ISTIO_INBOUND: the connection reaches the application directly".into(),
                    untouched,
                    None,
                ),
                _ => (
                    off_rule,
                    off_istio,
                    untouched,
                    None,
                ),
            },
        };
    let proxy_listening = listen.map(|(port, v6)| listening(view, port, v6));
    let mut counter = match outcome {
        Outcome::Decided(v) if q.inbound => Some(v.inbound_counter()),
        Outcome::Decided(v) if q.udp => {
            if d == 53 {
                notes.push(
                    "a UDP socket connect()ed to the server is counted once, in weir_dns_udp_sockets_total, instead"
                        .into(),
                );
            }
            udp_datagram_counter(v, d)
        }
        Outcome::Decided(v) => v.outbound_counter(),
        Outcome::NotPodAddress | Outcome::FromInsidePod | Outcome::VirtualInterface => None,
    }
    .map(series);
    if proxy_listening == Some(false) {
        let (port, _) = listen.unwrap_or_default();
        if q.inbound {
            notes.push(format!(
                "no proxy listener on port {port} is recorded in LISTENERS for this pod: the connection \
                 is refused with RST (fail closed), never delivered to the application behind the proxy's back"
            ));
            counter = Some(series(PodCounter::InboundFailClosed));
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
        enrolled_because: None,
    }
}

/// Default `--uid` of `weir explain`: an ordinary application user.
pub const DEFAULT_UID: u32 = 1000;

/// Formats an explanation for people.
pub fn render_text(e: &Explanation) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "pod:      {} (netns cookie {})", e.pod, e.netns_cookie);
    if let Some(why) = &e.enrolled_because {
        let _ = writeln!(s, "ambient:  {why}");
    }
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
