//! Property test of the capture decision against an independent model of
//! the meshes' iptables chains.
//!
//! For a random pod (Istio's `istio-iptables` flags, Linkerd's and Kuma's
//! annotations) and a random connection (identity, source, destination,
//! port, TCP or UDP, outbound or inbound), weir's answer — the pod's
//! annotations through [`pod_rules`], then [`decide_outbound`] /
//! [`decide_inbound`], the functions the kernel programs run — must be the
//! answer of the rules the mesh's init container writes for the same pod
//! (the generators of `weir-tests`, which reproduce the meshes' golden
//! files), walked first match wins by `weir_tests::iptables_model`. Both
//! are reduced to "redirected to port N" or "left alone".
//!
//! This reaches rule-order combinations the differential suite's fixed
//! configurations do not. [`DEFAULT_CASES`] cases per mesh in a normal
//! run; `WEIR_MODEL_CASES` for a long one:
//!
//! ```text
//! WEIR_MODEL_CASES=200000 cargo test --release -p weir-agent rules_model -- --test-threads=2
//! ```

use std::collections::BTreeMap;
use std::net::IpAddr;

use proptest::prelude::*;
use proptest::sample::{select, subsequence};
use weir_common::decide::{Verdict, decide_inbound, decide_outbound, ipv6_rules};
use weir_common::*;
use weir_tests::iptables_model::{Outcome, Packet, Ruleset};
use weir_tests::istio_iptables::{CaptureConfig, Restore};
use weir_tests::kuma_iptables::{self, KumaPod};
use weir_tests::linkerd_iptables::{self, LinkerdPod};

use crate::policy::{Mesh, PodRules, addr_of, pod_rules};

/// Cases per mesh in a normal test run.
const DEFAULT_CASES: u32 = 300;

fn config() -> ProptestConfig {
    ProptestConfig {
        cases: std::env::var("WEIR_MODEL_CASES")
            .ok()
            .and_then(|v| v.trim().replace('_', "").parse().ok())
            .unwrap_or(DEFAULT_CASES),
        max_shrink_iters: 5_000,
        ..ProptestConfig::default()
    }
}

const POD4: &str = "198.18.0.1";
const POD6: &str = "2001:2::1";

/// A connection of the pod, or to it.
#[derive(Clone, Debug)]
struct Conn {
    inbound: bool,
    udp: bool,
    dst: IpAddr,
    dport: u16,
    /// Outbound: the bound source (`None`: unbound). Inbound: the peer.
    src: Option<IpAddr>,
    uid: u32,
    gid: u32,
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn conn() -> impl Strategy<Value = Conn> {
    let dsts = select(vec![
        "198.18.10.1",
        "198.18.11.1",
        "198.18.0.2",
        "198.18.53.53",
        "10.1.2.3",
        "127.0.0.1",
        "127.0.0.5",
        "127.0.0.6",
        "127.0.0.53",
        POD4,
        "::1",
        POD6,
        "2001:2:0:10::1",
        "2001:2:0:11::1",
        "2001:2:0:53::53",
    ]);
    let ports = select(vec![
        80u16, 53, 3306, 8080, 9090, 7070, 15001, 15006, 15008, 15020, 15021, 15090, 4140, 4143,
        4190, 4567, 9001, 9902,
    ]);
    let ids = select(vec![
        1000u32, 1337, 1338, 3, 4, 1, 2, 0, 2000, 2102, 2103, 3000, 5678,
    ]);
    let peers = select(vec!["198.18.0.2", "198.18.100.2", "10.0.0.5", "2001:2::2"]);
    (
        any::<bool>(),
        any::<bool>(),
        dsts,
        ports,
        0..4u8,
        peers,
        ids.clone(),
        ids,
    )
        .prop_map(|(inbound, udp, dst, dport, bind, peer, uid, gid)| {
            let dst = ip(dst);
            if inbound {
                let pod = if ip(peer).is_ipv6() { POD6 } else { POD4 };
                return Conn {
                    inbound,
                    udp: false,
                    dst: ip(pod),
                    dport,
                    src: Some(ip(peer)),
                    uid,
                    gid,
                };
            }
            // Sources a process of the pod can bind for this destination.
            let src = match (bind, dst.is_ipv6()) {
                (1, false) if dst.to_string().starts_with("127.") || dst == ip(POD4) => {
                    Some(ip("127.0.0.6"))
                }
                (1, true) if dst == ip("::1") || dst == ip(POD6) => Some(ip("::6")),
                (2, false) if !dst.is_loopback() => Some(ip(POD4)),
                (2, true) if !dst.is_loopback() => Some(ip(POD6)),
                _ => None,
            };
            Conn {
                inbound,
                udp,
                dst,
                dport,
                src,
                uid,
                gid,
            }
        })
}

/// What a connection gets: redirected to a port, or left alone.
fn weir_answer(rules: &PodRules, c: &Conn) -> Option<u16> {
    let p = &rules.policy;
    let t = rules.tables();
    let v = if c.inbound {
        // weir_sk_lookup steers only the pod's own addresses, and not the
        // IPv6 ones of a pod without IPv6 rules.
        if c.dst.is_ipv6() && !ipv6_rules(p) {
            return None;
        }
        decide_inbound(p, c.dport, 2, &addr_of(c.src.unwrap()), &t)
    } else {
        let q = decide::OutboundQuery {
            dst: addr_of(c.dst),
            dport: c.dport,
            src: c.src.map(addr_of).unwrap_or([0; 4]),
            uid: c.uid,
            gid: c.gid,
            udp: c.udp,
        };
        decide_outbound(p, &q, &t)
    };
    match v {
        Verdict::RedirectOutbound => Some(p.outbound_port),
        Verdict::RedirectInbound => Some(p.inbound_port),
        Verdict::RedirectDns => Some(p.dns_port),
        _ => None,
    }
}

/// Whether the kernel routes `dst` over `lo` from the pod (loopback, or
/// one of its own addresses).
fn on_lo(dst: IpAddr, pod: &[IpAddr]) -> bool {
    dst.is_loopback() || pod.contains(&dst)
}

/// The model's answer: the restore input of the destination's family,
/// walked in `nat` `OUTPUT` (outbound) or `PREROUTING` (inbound).
fn model_answer(restore: &Restore, pod: &[IpAddr], c: &Conn) -> Result<Option<u16>, String> {
    let v6 = c.dst.is_ipv6();
    let text = match (v6, &restore.v6) {
        (false, _) => &restore.v4,
        (true, Some(t)) => t,
        (true, None) => return Ok(None),
    };
    if v6 && !pod.iter().any(IpAddr::is_ipv6) && !c.dst.is_loopback() {
        // No route (connect fails before any rule).
        return Ok(None);
    }
    let nat = Ruleset::parse(text)?.table("nat");
    let lo = on_lo(c.dst, pod);
    let pkt = if c.inbound {
        Packet {
            proto: "tcp",
            src: c.src.unwrap(),
            dst: c.dst,
            sport: 40000,
            dport: c.dport,
            in_iface: Some("eth0".into()),
            out_iface: None,
            uid: None,
            gid: None,
        }
    } else {
        // The source routing picks for an unbound socket: the local
        // route's preferred source (127.0.0.1 for 127/8, the address
        // itself for the pod's own), else the pod's address.
        let src = c.src.unwrap_or_else(|| match (v6, lo) {
            (false, true) if c.dst.is_loopback() => ip("127.0.0.1"),
            (_, true) => c.dst,
            (false, false) => ip(POD4),
            (true, false) => ip(POD6),
        });
        Packet {
            proto: if c.udp { "udp" } else { "tcp" },
            src,
            dst: c.dst,
            sport: 40000,
            dport: c.dport,
            in_iface: None,
            out_iface: Some(if lo { "lo" } else { "eth0" }.into()),
            uid: Some(c.uid),
            gid: Some(c.gid),
        }
    };
    let chain = if c.inbound { "PREROUTING" } else { "OUTPUT" };
    Ok(match nat.eval(chain, &pkt)?.outcome {
        Outcome::Redirect(p) => Some(p),
        Outcome::Accept => None,
    })
}

fn list(items: Vec<&'static str>) -> impl Strategy<Value = String> {
    let n = items.len();
    subsequence(items, 0..=n).prop_map(|v| v.join(","))
}

/// Random `istio-iptables` flags weir can express (no TPROXY, the
/// injector's `-d` with `-b '*'`, numeric owner groups, no interfaces).
fn istio_config() -> impl Strategy<Value = CaptureConfig> {
    let include_ranges = prop_oneof![
        Just("*".to_string()),
        list(vec![
            "198.18.10.0/24",
            "2001:2:0:10::/64",
            "127.0.0.0/8",
            "127.0.0.1/1",
            "0.0.0.0/0",
            "::/0",
            "198.18.0.0/16",
            "10.0.0.0/8",
            "198.18.10.1/32",
        ]),
    ];
    let exclude_ranges = list(vec![
        "198.18.11.0/24",
        "198.18.10.1/32",
        "2001:2:0:11::/64",
        "198.18.0.2/32",
        "0.0.0.0/0",
    ]);
    let inbound = prop_oneof![
        list(vec!["9090", "7070", "15020"]).prop_map(|d| ("*".to_string(), d)),
        list(vec!["8080", "9090", "15008", "15020"]).prop_map(|b| (b, String::new())),
    ];
    let uids = select(vec!["1337", "1337,1338", "3,4", "1338"]);
    let gids = select(vec!["", "1337", "1,2", "1337,3000"]);
    let groups = prop_oneof![
        Just(("*".to_string(), String::new())),
        list(vec!["1000", "3000"])
            .prop_map(|g| (if g.is_empty() { "*".into() } else { g }, String::new())),
        list(vec!["2000", "3000", "1000"]).prop_map(|g| ("*".to_string(), g)),
    ];
    let dns = (
        any::<bool>(),
        any::<bool>(),
        list(vec!["198.18.53.53", "127.0.0.53"]),
        list(vec!["2001:2:0:53::53"]),
    );
    (
        (include_ranges, exclude_ranges, inbound, uids, gids),
        (
            list(vec!["3306", "53", "8080"]),
            list(vec!["3306", "8080", "53", "15001"]),
            groups,
            dns,
            any::<bool>(),
        ),
    )
        .prop_map(
            |((inc, exc, (b, d), uid, gid), (q, o, (og, oge), (rdns, all, d4, d6), v6))| {
                let mut c = CaptureConfig::injected();
                c.outbound_ip_ranges_include = inc;
                c.outbound_ip_ranges_exclude = exc;
                c.inbound_ports_include = b.clone();
                c.inbound_ports_exclude = if b == "*" {
                    let mut d2 = "15090,15021".to_string();
                    if !d.is_empty() {
                        d2.push(',');
                        d2.push_str(&d);
                    }
                    d2
                } else {
                    d
                };
                c.proxy_uid = uid.into();
                c.proxy_gid = gid.into();
                c.outbound_ports_include = q;
                c.outbound_ports_exclude = o;
                c.owner_groups_include = og;
                c.owner_groups_exclude = oge;
                c.redirect_dns = rdns;
                c.capture_all_dns = all;
                c.dns_servers_v4 = split_list(&d4);
                c.dns_servers_v6 = if v6 { split_list(&d6) } else { Vec::new() };
                c.enable_ipv6 = v6;
                c
            },
        )
}

fn split_list(s: &str) -> Vec<String> {
    s.split(',')
        .filter(|x| !x.is_empty())
        .map(str::to_string)
        .collect()
}

fn addrs(v6: bool) -> Vec<IpAddr> {
    let mut a = vec![ip(POD4)];
    if v6 {
        a.push(ip(POD6));
    }
    a
}

/// Runs one pod and connection through both; `Err` describes a
/// difference.
fn compare(
    mesh: Mesh,
    restore: &Restore,
    pod: &[IpAddr],
    annotations: &BTreeMap<String, String>,
    c: &Conn,
) -> Result<(), TestCaseError> {
    let rules = pod_rules(mesh, pod, annotations)
        .map_err(|e| TestCaseError::fail(format!("weir refused the pod: {e}")))?;
    // An inbound connection to the port it would be redirected to reaches
    // the same listener either way.
    let same_port = |a: Option<u16>| a.filter(|p| !(c.inbound && *p == c.dport));
    let model = same_port(model_answer(restore, pod, c).map_err(TestCaseError::fail)?);
    let weir = same_port(weir_answer(&rules, c));
    prop_assert_eq!(
        weir,
        model,
        "\nconnection {:?}\nannotations {:#?}\nrules:\n{}{}",
        c,
        annotations,
        restore.v4,
        restore.v6.clone().unwrap_or_default()
    );
    Ok(())
}

proptest! {
    #![proptest_config(config())]

    /// Istio: random `istio-iptables` flags (the goldens' generator) x
    /// random connections.
    #[test]
    fn rules_model_istio(cfg in istio_config(), conns in prop::collection::vec(conn(), 8)) {
        let restore = cfg.restore().map_err(|e| TestCaseError::reject(e.to_string()))?;
        let mut ann = cfg
            .weir_annotations()
            .map_err(|e| TestCaseError::reject(e.to_string()))?;
        // A dual-stack pod's IPv6 rules follow ISTIO_DUAL_STACK; this pod
        // is IPv4-only unless the flags write IPv6 rules.
        ann.insert("weir.dev/capture-ipv6".into(), cfg.enable_ipv6.to_string());
        let pod = addrs(cfg.enable_ipv6);
        for c in &conns {
            compare(Mesh::Istio, &restore, &pod, &ann, c)?;
        }
    }

    /// Linkerd: random skip lists, proxy UID/GID and IPv6 support.
    #[test]
    fn rules_model_linkerd(
        inb in list(vec!["9090", "7000-7100", "7070", "15020"]),
        out in list(vec!["3306", "8000-8100", "8080", "53"]),
        uid in select(vec!["", "2103", "1337"]),
        gid in select(vec!["", "3000"]),
        subnets in list(vec!["198.18.100.0/24", "10.0.0.0/8"]),
        v6 in any::<bool>(),
        set_inb in any::<bool>(),
        set_out in any::<bool>(),
        conns in prop::collection::vec(conn(), 8),
    ) {
        use linkerd_iptables::keys::*;
        let mut p = LinkerdPod::new();
        if v6 { p = p.with_ipv6(); }
        if set_inb { p = p.annotate(SKIP_INBOUND_PORTS, &inb); }
        if set_out { p = p.annotate(SKIP_OUTBOUND_PORTS, &out); }
        if !uid.is_empty() { p = p.annotate(PROXY_UID, uid); }
        if !gid.is_empty() { p = p.annotate(PROXY_GID, gid); }
        if !subnets.is_empty() && !v6 { p = p.annotate(SKIP_SUBNETS, &subnets); }
        let restore = p.proxy_init().restore().map_err(|e| TestCaseError::reject(e.to_string()))?;
        let ann = p.weir_annotations();
        let pod = addrs(true);
        for c in &conns {
            compare(Mesh::Linkerd, &restore, &pod, &ann, c)?;
        }
    }

    /// Kuma: random exclusions, DNS settings and IP family mode.
    #[test]
    fn rules_model_kuma(
        inb in list(vec!["9090", "7070", "9001"]),
        out in list(vec!["3306", "8080", "53"]),
        out_ips in list(vec!["198.18.10.0/24", "198.18.10.1", "2001:2:0:11::1", "198.18.53.53"]),
        in_ips in list(vec!["198.18.100.0/24", "2001:2::2", "10.0.0.5"]),
        dns in 0..3u8,
        ipv4_mode in any::<bool>(),
        probe_off in any::<bool>(),
        conns in prop::collection::vec(conn(), 8),
    ) {
        use kuma_iptables::keys::*;
        let pod = addrs(true);
        let mut p = KumaPod::new(&pod);
        p.nameservers = vec![ip("198.18.53.53"), ip("2001:2:0:53::53")];
        p.dns_enabled = dns != 0;
        p.dns_capture_all = dns == 2;
        for (k, v) in [
            (EXCLUDE_INBOUND_PORTS, &inb),
            (EXCLUDE_OUTBOUND_PORTS, &out),
            (EXCLUDE_OUTBOUND_IPS, &out_ips),
            (EXCLUDE_INBOUND_IPS, &in_ips),
        ] {
            if !v.is_empty() { p = p.annotate(k, v); }
        }
        if ipv4_mode { p = p.annotate(IP_FAMILY_MODE, "ipv4"); }
        if probe_off { p = p.annotate(PROBE_PROXY_PORT, "0"); }
        let cfg = p.config().map_err(|e| TestCaseError::reject(e.to_string()))?;
        let restore = cfg.restore().map_err(|e| TestCaseError::reject(e.to_string()))?;
        let ann = p.weir_annotations();
        for c in &conns {
            compare(Mesh::Kuma, &restore, &pod, &ann, c)?;
        }
    }
}
