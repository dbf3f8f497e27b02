//! Property-based fuzzing of the two parsers that read operator and pod
//! author input: the annotation parser ([`pod_rules`]) and the pods-file
//! parser ([`podsfile::parse`]).
//!
//! The strategies build realistic-but-nasty input from fragments (ports
//! around the edges of `u16`, `*`, empty items, stray separators, CIDRs with
//! bad prefixes, IPv4-mapped IPv6, odd Unicode, very long values, YAML of
//! random shape and wrong types), and the properties check more than "no
//! panic": an accepted input gives internally consistent rules and map
//! entries, a refused one names the annotation (or the file and the pod).
//!
//! Each property runs [`DEFAULT_CASES`] cases, so `cargo test` stays fast.
//! Set `WEIR_FUZZ_CASES` for a long run, e.g.
//!
//! ```text
//! WEIR_FUZZ_CASES=1000000 cargo test --release -p weir-agent fuzz_ -- --test-threads=2
//! ```
//!
//! Failing inputs proptest finds are kept in
//! `agent/proptest-regressions/fuzz_tests.txt` and replayed first on every
//! run; the bugs found so far also have explicit tests at the end of this
//! file.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::Path;

use ipnet::IpNet;
use proptest::prelude::*;
use proptest::sample::select;
use weir_common::*;

use crate::podsfile;
use crate::policy::{AnnotationError, Mesh, PodRules, keys, pod_rules};

/// Cases per property in a normal test run.
const DEFAULT_CASES: u32 = 2000;

/// Cases per property: `WEIR_FUZZ_CASES`, else [`DEFAULT_CASES`].
fn cases() -> u32 {
    std::env::var("WEIR_FUZZ_CASES")
        .ok()
        .and_then(|v| v.trim().replace('_', "").parse().ok())
        .unwrap_or(DEFAULT_CASES)
}

fn config() -> ProptestConfig {
    ProptestConfig {
        cases: cases(),
        // Shrinking a long value can take many steps; keep it bounded.
        max_shrink_iters: 20_000,
        ..ProptestConfig::default()
    }
}

/// Every annotation key weir reads.
const KNOWN_KEYS: &[&str] = &[
    keys::INTERCEPTION_MODE,
    keys::INCLUDE_OUTBOUND_IP_RANGES,
    keys::EXCLUDE_OUTBOUND_IP_RANGES,
    keys::INCLUDE_OUTBOUND_PORTS,
    keys::EXCLUDE_OUTBOUND_PORTS,
    keys::INCLUDE_INBOUND_PORTS,
    keys::EXCLUDE_INBOUND_PORTS,
    keys::STATUS_PORT,
    keys::PROXY_UIDS,
    keys::PROXY_GIDS,
    keys::OUTBOUND_PORT,
    keys::INBOUND_PORT,
    keys::PROXY_CONFIG,
    keys::DNS_CAPTURE,
    keys::DNS_SERVERS,
    keys::OWNER_GROUPS,
    keys::OWNER_GROUPS_EXCLUDE,
    keys::LINKERD_SKIP_INBOUND,
    keys::LINKERD_SKIP_OUTBOUND,
    keys::LINKERD_SKIP_SUBNETS,
    keys::KUMA_EXCLUDE_INBOUND,
    keys::KUMA_EXCLUDE_OUTBOUND,
    keys::KUMA_EXCLUDE_OUTBOUND_IPS,
    keys::KUMA_IP_FAMILY_MODE,
    keys::KUMA_PROBE_PROXY_PORT,
    keys::LINKERD_PROXY_UID,
    keys::LINKERD_PROXY_GID,
    keys::CAPTURE_IPV6,
    keys::EXCLUDE_INTERFACES,
    keys::REROUTE_VIRTUAL_INTERFACES,
    keys::KUBEVIRT_INTERFACES,
    keys::KUMA_EXCLUDE_INBOUND_IPS,
];

/// Keys of the other meshes' annotations (ignored for Istio pods).
const OTHER_MESH_KEYS: &[&str] = &[
    keys::LINKERD_SKIP_INBOUND,
    keys::LINKERD_SKIP_OUTBOUND,
    keys::LINKERD_SKIP_SUBNETS,
    keys::KUMA_EXCLUDE_INBOUND,
    keys::KUMA_EXCLUDE_OUTBOUND,
    keys::KUMA_EXCLUDE_OUTBOUND_IPS,
    keys::KUMA_EXCLUDE_INBOUND_IPS,
    keys::KUMA_IP_FAMILY_MODE,
    keys::KUMA_PROBE_PROXY_PORT,
    keys::LINKERD_PROXY_UID,
    keys::LINKERD_PROXY_GID,
];

// ---------------------------------------------------------------------------
// Strategies: annotation values
// ---------------------------------------------------------------------------

/// Numbers at and around every limit the parsers care about.
const NUMBERS: &[&str] = &[
    "0",
    "00",
    "1",
    "53",
    "80",
    "443",
    "1337",
    "15001",
    "15006",
    "15008",
    "15020",
    "15053",
    "65535",
    "65536",
    "-1",
    "-0",
    "+80",
    "0x50",
    "080",
    "1e3",
    "80.0",
    "4294967295",
    "4294967296",
    "18446744073709551616",
    "99999999999999999999999999999999",
    "\u{663}",          // ARABIC-INDIC DIGIT THREE
    "\u{ff18}\u{ff10}", // FULLWIDTH "80"
    "\u{1d7ea}",        // MATHEMATICAL DIGIT
];

/// Words the parsers treat specially, and near misses.
const WORDS: &[&str] = &[
    "*",
    " * ",
    "**",
    "",
    " ",
    "\t",
    ",",
    ",,",
    "-",
    "/",
    "REDIRECT",
    "TPROXY",
    "NONE",
    "redirect",
    " NONE ",
    "none",
    "true",
    "false",
    "TRUE",
    "yes",
    "no",
    "maybe",
    "null",
    "~",
    "http",
    "1-65535",
    "65535-1",
    "5-5",
    "0-10",
    "10-0",
    "1-",
    "-5",
    "1-2-3",
    "1 - 3",
    "4000-4100",
];

/// CIDRs and addresses, valid and not.
const NETS: &[&str] = &[
    "0.0.0.0/0",
    "10.0.0.0/8",
    "10.1.2.3/8",
    "10.1.2.3/32",
    "10.1.2.3",
    "10.0.0.0/33",
    "10.0.0.0/-1",
    "10.0.0.0/",
    "10.0.0.0/08",
    "10.0.0.0/ 8",
    "256.0.0.0/8",
    "10.0.0/8",
    "127.0.0.0/8",
    "127.0.0.1/32",
    "169.254.0.0/16",
    "::/0",
    "::1/128",
    "fd00::/8",
    "2001:2::/48",
    "2001:2::/129",
    "2001:2::1",
    "::ffff:10.0.0.0/104",
    "::ffff:127.0.0.1/128",
    "::ffff:1.2.3.4",
    "fe80::1%eth0/64",
    "fe80::1%lo",
    "[::1]/128",
    "10.96.0.10",
    "198.18.0.1",
];

/// YAML and JSON documents for `proxy.istio.io/config`.
const PROXY_CONFIGS: &[&str] = &[
    "proxyMetadata:\n  ISTIO_META_DNS_CAPTURE: \"true\"\n",
    "proxyMetadata:\n  ISTIO_DUAL_STACK: \"false\"\n",
    "proxyMetadata:\n  ISTIO_DUAL_STACK: true\n  ISTIO_META_DNS_CAPTURE: \"true\"\n",
    "proxyMetadata:\n  ISTIO_DUAL_STACK: sometimes\n",
    "proxyMetadata:\n  ISTIO_META_DNS_CAPTURE: true\n",
    "proxyMetadata:\n  ISTIO_META_DNS_CAPTURE: \"false\"\n",
    "proxyMetadata:\n  ISTIO_META_DNS_CAPTURE: 1\n",
    "proxyMetadata:\n  ISTIO_META_DNS_CAPTURE: [true]\n",
    "proxyMetadata:\n  ISTIO_META_DNS_CAPTURE: maybe\n",
    "{\"proxyMetadata\":{\"ISTIO_META_DNS_CAPTURE\":\"yes\"}}",
    "{\"proxyMetadata\":{\"ISTIO_META_DNS_CAPTURE\":null}}",
    "{\"proxyMetadata\":[1,2,3]}",
    "proxyMetadata: 5",
    "[1, 2]",
    "a: [",
    "a: {",
    "\"unterminated",
    "!!binary aGVsbG8=",
    "!custom {a: 1}",
    "&a [*a]",
    "a: &x 1\nb: *x\n",
    "a: *undefined",
    "? [a]\n: b\n",
    "a: 1\na: 2\n",
    "proxyMetadata: {}\nproxyMetadata: {}\n",
    "---\n---\n",
    "%YAML 1.2\n---\nproxyMetadata: {}\n",
    "proxyMetadata:\n\tISTIO_META_DNS_CAPTURE: true\n",
];

/// A YAML "billion laughs": nine levels of aliases to aliases.
fn alias_bomb() -> String {
    let mut s = String::from(
        "a0: &a0 [\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\"]\n",
    );
    for i in 1..10 {
        let p = i - 1;
        s.push_str(&format!(
            "a{i}: &a{i} [*a{p},*a{p},*a{p},*a{p},*a{p},*a{p},*a{p},*a{p},*a{p}]\n"
        ));
    }
    s.push_str("proxyMetadata: *a9\n");
    s
}

fn ip() -> impl Strategy<Value = IpAddr> {
    prop_oneof![
        3 => any::<[u8; 4]>().prop_map(|o| IpAddr::V4(Ipv4Addr::from(o))),
        2 => any::<[u8; 16]>().prop_map(|o| IpAddr::V6(Ipv6Addr::from(o))),
        1 => any::<[u8; 4]>().prop_map(|o| IpAddr::V6(Ipv4Addr::from(o).to_ipv6_mapped())),
        2 => select(vec![
            "127.0.0.1", "0.0.0.0", "255.255.255.255", "::", "::1", "10.96.0.10",
            "198.18.0.1", "198.18.0.2", "2001:2::1", "::ffff:198.18.0.1", "::ffff:127.0.0.1",
            "fe80::1",
        ])
        .prop_map(|s| s.parse().unwrap()),
    ]
}

/// Short strings of arbitrary Unicode (control characters, surrogates are
/// impossible in `String`, but bidi overrides, NUL, BOM and U+10FFFF are
/// all there).
fn unicode() -> impl Strategy<Value = String> {
    prop_oneof![
        proptest::collection::vec(any::<char>(), 0..8).prop_map(String::from_iter),
        select(vec![
            "\u{0}",
            "\u{feff}",
            "\u{202e}",
            "\u{2028}",
            "\u{10ffff}",
            "\u{1f980}",
            "\u{e9}",
            "e\u{301}",
            "\u{ff2e}\u{ff2f}\u{ff2e}\u{ff25}",
            "\r\n",
            "\\",
            "\"",
            "'",
            "#",
            ":",
            "{",
            "}",
            "[",
            "]",
            "&",
            "!",
            "|",
            ">",
            "%",
        ])
        .prop_map(str::to_string),
    ]
}

/// One item of a list value.
fn fragment() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => select(NUMBERS).prop_map(str::to_string),
        2 => any::<u32>().prop_map(|n| n.to_string()),
        1 => any::<i64>().prop_map(|n| n.to_string()),
        2 => (0u32..=70_000).prop_map(|n| n.to_string()),
        2 => ((1u32..=65_600), (0u32..=200)).prop_map(|(a, d)| format!("{a}-{}", a.saturating_add(d))),
        1 => ((0u32..=70_000), (0u32..=70_000)).prop_map(|(a, b)| format!("{a}-{b}")),
        3 => select(WORDS).prop_map(str::to_string),
        3 => select(NETS).prop_map(str::to_string),
        2 => (ip(), 0u16..=140).prop_map(|(ip, len)| format!("{ip}/{len}")),
        2 => ip().prop_map(|ip| ip.to_string()),
        2 => unicode(),
    ]
}

fn separator() -> impl Strategy<Value = &'static str> {
    select(vec![
        ",", ",", ",", ", ", " ,", " , ", ",,", ", ,", " ", "", "\t,", ",\n", ";", "-", "/",
    ])
}

/// A list-shaped value: fragments joined by (mostly) commas, with optional
/// leading and trailing junk.
fn list_value() -> impl Strategy<Value = String> {
    (
        proptest::collection::vec((fragment(), separator()), 0..8),
        select(vec!["", "", " ", ","]),
        any::<bool>(),
    )
        .prop_map(|(items, lead, drop_last_sep)| {
            let mut s = String::from(lead);
            let n = items.len();
            for (i, (f, sep)) in items.into_iter().enumerate() {
                s.push_str(&f);
                if !(drop_last_sep && i + 1 == n) {
                    s.push_str(sep);
                }
            }
            s
        })
}

/// A very long value (up to ~200 KB: a Kubernetes object's annotations may
/// total 256 KiB). Items are cheap ones: the cost of wide port ranges is
/// checked separately ([`wide_port_ranges_stay_cheap`]).
fn long_value() -> impl Strategy<Value = String> {
    (
        select(vec![
            "80,",
            "1,",
            "10.0.0.0/8,",
            "fd00::/8,",
            "a",
            "\u{e9}",
            " ,",
            "65536,",
            "*,",
            "1337,",
            "10.96.0.10,",
            "1-3,",
        ]),
        1usize..20_000,
    )
        .prop_map(|(f, n)| f.repeat(n))
}

/// Any annotation value.
fn value() -> impl Strategy<Value = String> {
    prop_oneof![
        8 => list_value(),
        3 => fragment(),
        1 => unicode(),
        1 => long_value(),
        2 => select(PROXY_CONFIGS).prop_map(str::to_string),
        1 => Just(alias_bomb()),
        1 => (1usize..300).prop_map(|n| format!("{}{}", "[".repeat(n), "]".repeat(n))),
        1 => (1usize..300).prop_map(|n| "a: {".repeat(n)),
    ]
}

/// An annotation key: mostly the known ones, sometimes near misses or
/// random text.
fn key() -> impl Strategy<Value = String> {
    prop_oneof![
        12 => select(KNOWN_KEYS).prop_map(str::to_string),
        1 => select(KNOWN_KEYS).prop_map(|k| k.to_uppercase()),
        1 => select(KNOWN_KEYS).prop_map(|k| format!("{k} ")),
        1 => select(KNOWN_KEYS).prop_map(|k| k.replace('/', ".")),
        2 => unicode(),
    ]
}

fn annotations() -> impl Strategy<Value = BTreeMap<String, String>> {
    proptest::collection::btree_map(key(), value(), 0..10)
}

fn mesh() -> impl Strategy<Value = Mesh> {
    select(vec![Mesh::Istio, Mesh::Linkerd, Mesh::Kuma])
}

fn addrs() -> impl Strategy<Value = Vec<IpAddr>> {
    proptest::collection::vec(ip(), 0..5)
}

// ---------------------------------------------------------------------------
// Properties: annotations
// ---------------------------------------------------------------------------

/// The flags weir defines; nothing else may be set.
const ALL_FLAGS: u32 = POLICY_CAPTURE_OUTBOUND
    | POLICY_CAPTURE_INBOUND
    | POLICY_OUTBOUND_ALL_CIDRS
    | POLICY_INBOUND_ALL_PORTS
    | POLICY_INCLUDE_HAS_LOOPBACK
    | POLICY_HAS_IP4
    | POLICY_HAS_IP6
    | POLICY_CAPTURE_DNS
    | POLICY_DNS_ALL_SERVERS
    | POLICY_OWNER_GROUPS_ONLY
    | POLICY_OWNER_GROUPS_EXCEPT
    | POLICY_LOOPBACK_SIMPLE
    | POLICY_INBOUND_SKIP_SOURCES
    | POLICY_EXCLUDE_IFACES
    | POLICY_KUMA_ORDER;

fn has(flags: u32, f: u32) -> bool {
    flags & f != 0
}

/// Everything an accepted set of annotations must satisfy.
fn check_rules(
    mesh: Mesh,
    addrs: &[IpAddr],
    ann: &BTreeMap<String, String>,
    r: &PodRules,
) -> Result<(), TestCaseError> {
    let p = &r.policy;
    let f = p.flags;
    prop_assert_eq!(f & !ALL_FLAGS, 0, "unknown flag bits");
    prop_assert_eq!(p.pod_id, 0, "pod_id is assigned at enrollment");

    // Ports: the capture ports are real ports, listened on, and the inbound
    // port is never captured inbound (it would loop to itself).
    prop_assert_ne!(p.outbound_port, 0);
    prop_assert_ne!(p.inbound_port, 0);
    prop_assert!(r.in_exclude_ports.contains(&p.inbound_port));
    prop_assert!(r.listen_ports.contains(&p.outbound_port));
    prop_assert!(r.listen_ports.contains(&p.inbound_port));
    let mut want_listen: BTreeSet<u16> = [p.outbound_port, p.inbound_port].into();
    if has(f, POLICY_CAPTURE_DNS) {
        prop_assert_ne!(p.dns_port, 0);
        want_listen.insert(p.dns_port);
    }
    prop_assert_eq!(&r.listen_ports, &want_listen);
    for set in [
        &r.out_include_ports,
        &r.out_exclude_ports,
        &r.in_include_ports,
        &r.in_exclude_ports,
    ] {
        prop_assert!(!set.contains(&0), "port 0 in a port set");
    }
    let prof = mesh.profile();
    prop_assert_eq!(p.tunnel_port, prof.tunnel_port);
    prop_assert_eq!(p.dns_port, prof.dns_port);
    for port in &prof.always_excluded_inbound {
        prop_assert!(r.in_exclude_ports.contains(port));
    }

    // Flags agree with the sets.
    if has(f, POLICY_OUTBOUND_ALL_CIDRS) {
        prop_assert!(r.include_cidrs.is_empty());
    }
    if has(f, POLICY_INBOUND_ALL_PORTS) {
        prop_assert!(r.in_include_ports.is_empty());
    }
    prop_assert_eq!(
        has(f, POLICY_CAPTURE_OUTBOUND),
        has(f, POLICY_CAPTURE_INBOUND)
    );
    let mode = ann
        .get(keys::INTERCEPTION_MODE)
        .map(|m| m.trim())
        .unwrap_or("REDIRECT");
    // An IPv6-only pod whose mesh writes no IPv6 rules is not captured.
    let v6_only_uncaptured = r.skip_ipv6 && !addrs.is_empty() && addrs.iter().all(|a| a.is_ipv6());
    prop_assert_eq!(
        has(f, POLICY_CAPTURE_OUTBOUND),
        mode != "NONE" && !v6_only_uncaptured
    );
    prop_assert_eq!(has(f, POLICY_KUMA_ORDER), mesh == Mesh::Kuma);
    if has(f, POLICY_DNS_ALL_SERVERS) {
        prop_assert!(has(f, POLICY_CAPTURE_DNS));
        prop_assert!(r.dns_servers.is_empty());
    }
    if !r.dns_servers.is_empty() {
        prop_assert!(has(f, POLICY_CAPTURE_DNS) && !has(f, POLICY_DNS_ALL_SERVERS));
    }
    prop_assert!(!(has(f, POLICY_OWNER_GROUPS_ONLY) && has(f, POLICY_OWNER_GROUPS_EXCEPT)));
    if has(f, POLICY_OWNER_GROUPS_EXCEPT) {
        prop_assert!(!r.owner_groups.is_empty());
    }
    if !r.owner_groups.is_empty() {
        prop_assert!(has(f, POLICY_OWNER_GROUPS_ONLY) || has(f, POLICY_OWNER_GROUPS_EXCEPT));
    }
    prop_assert_eq!(has(f, POLICY_LOOPBACK_SIMPLE), mesh == Mesh::Linkerd);
    prop_assert_eq!(
        has(f, POLICY_INBOUND_SKIP_SOURCES),
        !r.inbound_skip_sources.is_empty()
    );
    // istio-iptables judges the include ranges' addresses as written
    // (127.0.0.1/1 counts although it covers 0.0.0.0/1).
    let include = ann
        .get(keys::INCLUDE_OUTBOUND_IP_RANGES)
        .map(String::as_str)
        .unwrap_or("*");
    let loopback_written = include.trim() != "*"
        && include
            .split(',')
            .filter_map(|i| i.trim().parse::<IpNet>().ok())
            .any(|n| n.addr().is_loopback());
    prop_assert_eq!(has(f, POLICY_INCLUDE_HAS_LOOPBACK), loopback_written);

    // Identities: unique, in order, and the first one is `lo_id`.
    let uniq: BTreeSet<_> = r.uids.iter().collect();
    prop_assert_eq!(uniq.len(), r.uids.len(), "duplicate uid");
    let uniq: BTreeSet<_> = r.gids.iter().collect();
    prop_assert_eq!(uniq.len(), r.gids.len(), "duplicate gid");
    match (r.uids.first(), r.gids.first()) {
        (Some(u), _) => prop_assert_eq!((p.lo_id_kind, p.lo_id), (ID_KIND_UID, *u)),
        (None, Some(g)) => prop_assert_eq!((p.lo_id_kind, p.lo_id), (ID_KIND_GID, *g)),
        (None, None) => prop_assert_eq!((p.lo_id_kind, p.lo_id), (ID_KIND_NONE, 0)),
    }

    // CIDRs: canonical (host bits cleared, as iptables does) and they
    // parse back to themselves.
    for n in r.exclude_cidrs.iter().chain(&r.include_cidrs) {
        prop_assert_eq!(*n, n.trunc());
        let back: IpNet = n.to_string().parse().unwrap();
        prop_assert_eq!(back, *n);
    }

    // Addresses: the first of each family is the primary one.
    let want_addrs: BTreeSet<IpAddr> = addrs.iter().copied().collect();
    prop_assert_eq!(&r.addrs, &want_addrs);
    let v4 = addrs.iter().find_map(|a| match a {
        IpAddr::V4(v) => Some(*v),
        IpAddr::V6(_) => None,
    });
    prop_assert_eq!(has(f, POLICY_HAS_IP4), v4.is_some());
    if let Some(v4) = v4 {
        prop_assert_eq!(p.pod_ip4, u32::from_ne_bytes(v4.octets()));
    }
    let v6 = addrs.iter().find_map(|a| match a {
        IpAddr::V6(v) => Some(*v),
        IpAddr::V4(_) => None,
    });
    prop_assert_eq!(has(f, POLICY_HAS_IP6), v6.is_some() && !r.skip_ipv6);
    if let Some(v6) = v6
        && !r.skip_ipv6
    {
        prop_assert_eq!(p.pod_ip6, addr_from_octets(v6.octets()));
    }

    // Interface names: what Linux accepts, never resolved by the parser.
    for name in r.exclude_ifaces.iter().chain(&r.virt_ifaces) {
        prop_assert!(
            !name.is_empty()
                && name.len() <= 15
                && name != "."
                && name != ".."
                && !name.contains(['/', ':'])
                && !name.contains(char::is_whitespace),
            "interface name {:?}",
            name
        );
    }
    prop_assert!(r.virt.is_empty() && r.excluded_ifindexes.is_empty());
    // Istio without dual stack: IPv6 rules only for an IPv6-first pod.
    if mesh == Mesh::Istio
        && !ann.contains_key(keys::CAPTURE_IPV6)
        && ann
            .get(keys::PROXY_CONFIG)
            .and_then(|c| crate::policy::istio_proxy_metadata(c, "ISTIO_DUAL_STACK").ok())
            .flatten()
            == Some(false)
    {
        let first_v6 = addrs
            .iter()
            .find(|a| !a.is_loopback())
            .is_some_and(|a| a.is_ipv6());
        prop_assert_eq!(r.skip_ipv6, !first_v6);
    }

    // Map entries: one per set element, every one carrying the cookie,
    // and no two elements collapsing onto the same key.
    let cookie = 0x0123_4567_89ab_cdef;
    let e = r.entries(cookie);
    prop_assert_eq!(
        e.port_rules.len(),
        r.out_include_ports.len()
            + r.out_exclude_ports.len()
            + r.in_include_ports.len()
            + r.in_exclude_ports.len()
    );
    prop_assert!(
        e.port_rules
            .keys()
            .all(|k| k.netns_cookie == cookie && k.port != 0)
    );
    prop_assert_eq!(
        e.proxy_ids.len(),
        r.uids.len() + r.gids.len() + r.owner_groups.len()
    );
    prop_assert!(e.proxy_ids.keys().all(|k| k.netns_cookie == cookie));
    for (list, set) in [
        (&e.cidr_exclude, &r.exclude_cidrs),
        (&e.cidr_include, &r.include_cidrs),
    ] {
        // Each range gives the keys `cidr_keys` derives for it (one, or the
        // prefixes around the IPv4-mapped block for a wide IPv6 range,
        // checked against ipnet semantics in `policy::tests`).
        let want: BTreeSet<_> = set
            .iter()
            .flat_map(|n| crate::policy::cidr_keys(cookie, n))
            .collect();
        let got: BTreeSet<_> = list.keys().copied().collect();
        prop_assert_eq!(got, want);
        for (bits, d) in list.keys() {
            prop_assert!(*bits <= 64 + 128);
            prop_assert_eq!(d.netns_cookie, cookie.to_ne_bytes());
        }
    }
    prop_assert_eq!(e.cidr_dns.len(), r.dns_servers.len());
    let distinct: BTreeSet<_> = e.cidr_dns.keys().map(|(b, d)| (*b, d.addr)).collect();
    prop_assert_eq!(
        distinct.len(),
        e.cidr_dns.len(),
        "two DNS servers map to one key"
    );
    // Without IPv6 rules the pod's IPv6 addresses are not steered.
    let steered: Vec<&IpAddr> = r
        .addrs
        .iter()
        .filter(|a| !(r.skip_ipv6 && a.to_canonical().is_ipv6()))
        .collect();
    // 127.0.0.1 and ::ffff:127.0.0.1 are one address to the kernel.
    let distinct: BTreeSet<_> = e.pod_addrs.keys().collect();
    prop_assert!(e.pod_addrs.values().all(|c| *c == cookie));
    let canonical: BTreeSet<_> = steered.iter().map(|a| a.to_canonical()).collect();
    prop_assert_eq!(
        distinct.len(),
        canonical.len(),
        "two pod addresses map to one key"
    );
    Ok(())
}

/// Everything a refusal must satisfy: it names a known annotation that is
/// present, quotes its value, and says what is wrong and how to fix it.
fn check_error(ann: &BTreeMap<String, String>, e: &AnnotationError) -> Result<(), TestCaseError> {
    prop_assert!(
        KNOWN_KEYS.contains(&e.key.as_str()),
        "unknown key {}",
        e.key
    );
    let given = ann.get(&e.key);
    prop_assert!(given.is_some(), "error names {} which is not set", e.key);
    let given = given.unwrap();
    prop_assert_eq!(given.trim(), e.value.trim(), "error quotes another value");
    prop_assert!(!e.problem.is_empty() && !e.fix.is_empty());
    let msg = e.to_string();
    let prefix = format!("annotation {}: ", e.key);
    prop_assert!(msg.starts_with(&prefix), "{}", msg);
    Ok(())
}

fn same_outcome(
    a: &Result<PodRules, AnnotationError>,
    b: &Result<PodRules, AnnotationError>,
) -> bool {
    match (a, b) {
        (Ok(a), Ok(b)) => a == b,
        (Err(a), Err(b)) => a.key == b.key,
        _ => false,
    }
}

proptest! {
    #![proptest_config(config())]

    /// `pod_rules` never panics; what it accepts is consistent, what it
    /// refuses names the annotation.
    #[test]
    fn fuzz_pod_rules(mesh in mesh(), addrs in addrs(), ann in annotations()) {
        match pod_rules(mesh, &addrs, &ann) {
            Ok(r) => check_rules(mesh, &addrs, &ann, &r)?,
            Err(e) => check_error(&ann, &e)?,
        }
    }

    /// Annotations weir does not read change nothing, and the other meshes'
    /// annotations change nothing for an Istio pod.
    #[test]
    fn fuzz_pod_rules_ignores_foreign_keys(
        mesh in mesh(),
        addrs in addrs(),
        ann in annotations(),
        extra in proptest::collection::btree_map(unicode(), value(), 0..4),
    ) {
        let base = pod_rules(mesh, &addrs, &ann);
        let mut more = ann.clone();
        for (k, v) in extra {
            if !KNOWN_KEYS.contains(&k.as_str()) {
                more.insert(k, v);
            }
        }
        prop_assert!(same_outcome(&base, &pod_rules(mesh, &addrs, &more)));
        if mesh == Mesh::Istio {
            let mut fewer = ann.clone();
            fewer.retain(|k, _| !OTHER_MESH_KEYS.contains(&k.as_str()));
            prop_assert!(same_outcome(&base, &pod_rules(mesh, &addrs, &fewer)));
        }
    }
}

// ---------------------------------------------------------------------------
// Strategies: pods files
// ---------------------------------------------------------------------------

/// JSON quoting is valid YAML double-quoted scalar syntax.
fn quote(s: &str) -> String {
    serde_json::to_string(s).unwrap()
}

fn name_value() -> impl Strategy<Value = String> {
    prop_oneof![
        6 => select(vec!["a", "b", "c", "productpage-v1", "a ", "A"]).prop_map(quote),
        1 => select(vec!["", " ", "\t"]).prop_map(quote),
        1 => unicode().prop_map(|s| quote(&s)),
        1 => select(vec!["[a]", "{a: b}", "5", "null", "~", "true", "''", "[]", "a: b", "&x a", "*x"])
            .prop_map(str::to_string),
        1 => (1usize..5000).prop_map(|n| quote(&"n".repeat(n))),
    ]
}

fn netns_value() -> impl Strategy<Value = String> {
    prop_oneof![
        6 => select(vec![
            "/var/run/netns/a", "/var/run/netns/b", "/var/run/netns/c", "/proc/1/ns/net",
            "/", "//x", "/var/run/netns/../a",
        ])
        .prop_map(quote),
        2 => select(vec!["relative/x", "", ".", "./a", "~/x", " /var/run/netns/a"]).prop_map(quote),
        1 => unicode().prop_map(|s| quote(&format!("/{s}"))),
        1 => select(vec!["[/a]", "{a: b}", "5", "null", "true"]).prop_map(str::to_string),
    ]
}

fn ip_text() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => ip().prop_map(|ip| ip.to_string()),
        1 => select(vec![
            "198.18.0.1", "198.18.0.2", "2001:2::1", " 198.18.0.3 ", "not-an-ip", "",
            "198.18.0.1/32", "256.1.1.1", "fe80::1%eth0", "::ffff:198.18.0.1", "1.2.3",
        ])
        .prop_map(str::to_string),
        1 => unicode(),
    ]
}

fn ips_value() -> impl Strategy<Value = String> {
    prop_oneof![
        8 => proptest::collection::vec(ip_text(), 0..5)
            .prop_map(|v| format!("[{}]", v.iter().map(|s| quote(s)).collect::<Vec<_>>().join(", "))),
        1 => proptest::collection::vec(ip_text(), 50..200)
            .prop_map(|v| format!("[{}]", v.iter().map(|s| quote(s)).collect::<Vec<_>>().join(", "))),
        1 => ip_text().prop_map(|s| quote(&s)),
        1 => select(vec!["[[198.18.0.1]]", "[5]", "[{a: 1}]", "{a: b}", "null", "[null]", "198.18.0.1"])
            .prop_map(str::to_string),
    ]
}

fn mesh_value() -> impl Strategy<Value = String> {
    select(vec![
        "istio",
        "linkerd",
        "kuma",
        "Istio",
        "consul",
        "\"\"",
        "5",
        "[istio]",
        "null",
        "{istio: 1}",
    ])
    .prop_map(str::to_string)
}

fn annotations_value() -> impl Strategy<Value = String> {
    prop_oneof![
        6 => proptest::collection::vec((key(), value()), 0..6).prop_map(|kv| {
            let items: Vec<String> = kv.iter().map(|(k, v)| format!("{}: {}", quote(k), quote(v))).collect();
            format!("{{{}}}", items.join(", "))
        }),
        1 => (key(), key(), value(), value()).prop_map(|(k1, _k2, v1, v2)| {
            // Duplicate key in the same mapping.
            format!("{{{}: {}, {}: {}}}", quote(&k1), quote(&v1), quote(&k1), quote(&v2))
        }),
        1 => select(vec![
            "{a: [1]}", "{a: 5}", "{a: null}", "{a: true}", "{5: a}", "[a]", "5", "null", "''",
            "{a: {b: c}}",
        ])
        .prop_map(str::to_string),
    ]
}

fn field() -> impl Strategy<Value = (String, String)> {
    prop_oneof![
        4 => name_value().prop_map(|v| ("name".to_string(), v)),
        3 => netns_value().prop_map(|v| ("netns".to_string(), v)),
        1 => select(vec!["default", "istio-system", "", "a/b"]).prop_map(|v| ("namespace".to_string(), quote(v))),
        1 => select(vec!["5", "[x]", "null"]).prop_map(|v| ("namespace".to_string(), v.to_string())),
        3 => ips_value().prop_map(|v| ("ips".to_string(), v)),
        1 => mesh_value().prop_map(|v| ("mesh".to_string(), v)),
        3 => annotations_value().prop_map(|v| ("annotations".to_string(), v)),
        1 => (select(vec!["nmae", "meshh", "ip", "labels", "Name", "\"\""]), value())
            .prop_map(|(k, v)| (k.to_string(), quote(&v))),
    ]
}

/// One pods-list entry as block-mapping lines (fields may repeat), or a
/// value of the wrong type.
fn pod_entry() -> impl Strategy<Value = String> {
    prop_oneof![
        12 => (name_value(), netns_value(), proptest::collection::vec(field(), 0..5)).prop_map(
            |(name, netns, more)| {
                let mut s = format!("  - name: {name}\n    netns: {netns}\n");
                for (k, v) in more {
                    s.push_str(&format!("    {k}: {v}\n"));
                }
                s
            }
        ),
        3 => proptest::collection::vec(field(), 0..6).prop_map(|fields| {
            if fields.is_empty() {
                return "  - {}\n".to_string();
            }
            let mut s = String::new();
            for (i, (k, v)) in fields.iter().enumerate() {
                s.push_str(if i == 0 { "  - " } else { "    " });
                s.push_str(&format!("{k}: {v}\n"));
            }
            s
        }),
        1 => select(vec!["  - null\n", "  - 5\n", "  - [a, b]\n", "  - a\n", "  - \"\"\n", "  -\n"])
            .prop_map(str::to_string),
    ]
}

fn structured_file() -> impl Strategy<Value = String> {
    (
        proptest::collection::vec(pod_entry(), 0..8),
        select(vec![
            "",
            "",
            "",
            "---\n",
            "# comment\n",
            "extra: 1\n",
            "pods: []\n",
            "%YAML 1.2\n---\n",
        ]),
        select(vec![
            "",
            "",
            "",
            "\n",
            "other: x\n",
            "pods: []\n",
            "---\n",
            "...\n",
        ]),
    )
        .prop_map(|(pods, head, tail)| {
            let mut s = String::from(head);
            s.push_str("pods:\n");
            for p in pods {
                s.push_str(&p);
            }
            s.push_str(tail);
            s
        })
}

/// A YAML value of random shape.
fn yaml_tree() -> impl Strategy<Value = serde_yaml_ng::Value> {
    use serde_yaml_ng::Value as V;
    let leaf = prop_oneof![
        Just(V::Null),
        any::<bool>().prop_map(V::Bool),
        any::<i64>().prop_map(|n| V::Number(n.into())),
        any::<f64>().prop_map(|n| V::Number(n.into())),
        select(vec![
            "pods",
            "name",
            "netns",
            "ips",
            "mesh",
            "annotations",
            "namespace",
            "/a",
            "a"
        ])
        .prop_map(|s| V::String(s.to_string())),
        unicode().prop_map(V::String),
    ];
    leaf.prop_recursive(5, 64, 8, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..8).prop_map(V::Sequence),
            proptest::collection::vec((inner.clone(), inner), 0..8)
                .prop_map(|kv| { V::Mapping(kv.into_iter().collect()) }),
        ]
    })
}

/// Text mutations: truncate, delete a character, or insert YAML syntax.
fn mutate(text: String, at: usize, how: u8, ins: &str) -> String {
    let mut cut = at % (text.len() + 1);
    while !text.is_char_boundary(cut) {
        cut -= 1;
    }
    match how % 3 {
        0 => text[..cut].to_string(),
        1 => {
            let mut t = text;
            if cut < t.len() {
                t.remove(cut);
            }
            t
        }
        _ => {
            let mut t = text;
            t.insert_str(cut, ins);
            t
        }
    }
}

fn pods_text() -> impl Strategy<Value = String> {
    prop_oneof![
        10 => structured_file(),
        3 => (
            structured_file(),
            any::<usize>(),
            any::<u8>(),
            select(vec![":", "-", " ", "\n", "[", "{", "\"", "'", "&a ", "*a", "!", "#", "\t", "%", "? ", "|", ">", "\u{0}"]),
        )
            .prop_map(|(t, at, how, ins)| mutate(t, at, how, ins)),
        2 => yaml_tree().prop_map(|v| serde_yaml_ng::to_string(&v).unwrap_or_default()),
        2 => yaml_tree().prop_map(|v| {
            let mut m = serde_yaml_ng::Mapping::new();
            m.insert("pods".into(), v);
            serde_yaml_ng::to_string(&m).unwrap_or_default()
        }),
        1 => unicode(),
        1 => select(vec![
            "", " ", "\n", "pods:", "pods: null", "pods: ~", "pods: {}", "pods: 5", "pods: [", "pod: []",
            "pods: []\npods: []\n", "[]", "5", "null", "\u{feff}pods: []", "pods:\n- &p {name: a, netns: /a}\n- *p\n",
        ])
        .prop_map(str::to_string),
        1 => (1usize..300).prop_map(|n| {
            // Many pods: a node's worth and more.
            let mut s = String::from("pods:\n");
            for i in 0..n {
                s.push_str(&format!("  - {{name: p{i}, netns: /var/run/netns/p{i}, ips: [198.18.{}.{}]}}\n", i / 256, i % 256));
            }
            s
        }),
        1 => Just(format!("pods:\n  - name: a\n    netns: /a\n    annotations:\n      {}: {}\n",
            quote(keys::PROXY_CONFIG), quote(&alias_bomb()))),
        1 => Just(format!("{}pods: *a9\n", alias_bomb().replace("proxyMetadata: *a9\n", ""))),
        1 => (1usize..200).prop_map(|n| format!("pods: {}{}", "[".repeat(n), "]".repeat(n))),
    ]
}

fn path() -> impl Strategy<Value = String> {
    select(vec![
        "/etc/weir/pods.yaml",
        "pods.yaml",
        "/tmp/p\u{e9}ds file.yaml",
        "",
    ])
    .prop_map(str::to_string)
}

// ---------------------------------------------------------------------------
// Properties: pods files
// ---------------------------------------------------------------------------

/// What each entry of the `pods:` list is called in messages, or `None`
/// when the text has no such list.
fn entry_labels(text: &str) -> Option<Vec<String>> {
    let v: serde_yaml_ng::Value = serde_yaml_ng::from_str(text).ok()?;
    let list = v.get("pods")?.as_sequence()?;
    Some(
        list.iter()
            .enumerate()
            .map(|(i, e)| match e.get("name").and_then(|n| n.as_str()) {
                Some(n) => format!("pod {n:?}"),
                None => format!("pod #{}", i + 1),
            })
            .collect(),
    )
}

fn check_pods_file(path: &Path, text: &str) -> Result<(), TestCaseError> {
    let res = podsfile::parse(path, text);
    let file = format!("pods file {}: ", path.display());
    let f = match res {
        Err(e) => {
            let msg = e.to_string();
            prop_assert!(msg.starts_with(&file), "{}", msg);
            if text.trim().is_empty() {
                prop_assert!(msg.contains("the file is empty"), "{}", msg);
            } else {
                prop_assert!(
                    msg.contains("expected a mapping with a `pods:` list"),
                    "{}",
                    msg
                );
            }
            return Ok(());
        }
        Ok(f) => f,
    };
    // Every entry gives exactly one pod or one message.
    let labels = entry_labels(text).unwrap_or_default();
    prop_assert_eq!(
        f.pods.len() + f.errors.len(),
        labels.len(),
        "{:?}",
        f.errors
    );
    // Every message names the file and the entry.
    for e in &f.errors {
        prop_assert!(
            labels
                .iter()
                .any(|l| e.starts_with(&format!("{file}{l}: "))),
            "{} names no entry of {:?}",
            e,
            labels
        );
    }
    prop_assert!(f.invalid.len() <= f.errors.len());
    // The accepted pods are valid and distinct.
    let mut names = BTreeSet::new();
    let mut netns = BTreeSet::new();
    let mut ips = BTreeSet::new();
    for p in &f.pods {
        prop_assert!(!p.name.trim().is_empty());
        // One pod may list an address twice (harmless); two pods may not
        // share one.
        let own: BTreeSet<IpAddr> = p.ips.iter().copied().collect();
        prop_assert!(p.netns.is_absolute());
        prop_assert!(names.insert(p.key()), "pod {} twice", p.key());
        prop_assert!(netns.insert(p.netns.clone()), "netns {:?} twice", p.netns);
        for ip in &own {
            prop_assert!(ips.insert(*ip), "address {} in two pods", ip);
        }
        let rules = pod_rules(p.mesh, &p.ips, &p.annotations);
        prop_assert!(rules.is_ok());
        prop_assert_eq!(&rules.unwrap(), &p.rules);
        check_rules(p.mesh, &p.ips, &p.annotations, &p.rules)?;
        // The kernel keys addresses IPv4-mapped: the file's addresses are
        // canonical, so the distinctness above is the kernel's.
        prop_assert!(p.ips.iter().all(|ip| *ip == ip.to_canonical()));
    }
    // Deterministic.
    let again = podsfile::parse(path, text).unwrap();
    prop_assert_eq!(&again.pods, &f.pods);
    prop_assert_eq!(&again.errors, &f.errors);
    Ok(())
}

/// A valid pod for the round-trip property.
#[derive(Clone, Debug)]
struct GoodPod {
    name: String,
    ips: Vec<IpAddr>,
    mesh: Mesh,
}

fn good_pods() -> impl Strategy<Value = Vec<GoodPod>> {
    proptest::collection::vec(
        (
            // Names YAML can hold, not blank: a control character or a
            // character YAML refuses (U+FFFE, U+FFFF) becomes 'x'; a
            // leading 'p' keeps the name non-blank.
            proptest::collection::vec(any::<char>(), 0..12).prop_map(|cs| {
                let mut n = String::from("p");
                n.extend(cs.into_iter().map(|c| {
                    if c.is_control() || c == '\u{fffe}' || c == '\u{ffff}' {
                        'x'
                    } else {
                        c
                    }
                }));
                n
            }),
            proptest::collection::btree_set(
                prop_oneof![
                    any::<[u8; 4]>().prop_map(|o| IpAddr::V4(o.into())),
                    any::<[u8; 16]>().prop_map(|o| IpAddr::V6(o.into())),
                ],
                0..3,
            ),
            mesh(),
        ),
        0..10,
    )
    .prop_map(|v| {
        let mut seen_names = BTreeSet::new();
        let mut seen_ips = BTreeSet::new();
        v.into_iter()
            .filter(|(n, _, _)| seen_names.insert(n.clone()))
            .map(|(name, ips, mesh)| GoodPod {
                name,
                ips: ips
                    .into_iter()
                    .filter(|ip| crate::policy::pod_ip_problem(*ip).is_none())
                    .filter(|ip| seen_ips.insert(*ip))
                    .collect(),
                mesh,
            })
            .collect()
    })
}

proptest! {
    #![proptest_config(config())]

    /// `podsfile::parse` never panics; what it accepts is valid and
    /// distinct, and every refused entry is reported once, naming the file
    /// and the pod.
    #[test]
    fn fuzz_pods_file(path in path(), text in pods_text()) {
        check_pods_file(Path::new(&path), &text)?;
    }

    /// A file written from valid pods reads back as exactly those pods.
    #[test]
    fn fuzz_pods_file_round_trip(pods in good_pods()) {
        let mut text = String::from("pods:\n");
        for (i, p) in pods.iter().enumerate() {
            text.push_str(&format!(
                "  - name: {}\n    netns: /var/run/netns/p{i}\n    ips: [{}]\n    mesh: {}\n",
                quote(&p.name),
                p.ips.iter().map(|ip| quote(&ip.to_string())).collect::<Vec<_>>().join(", "),
                p.mesh,
            ));
        }
        let f = podsfile::parse(Path::new("pods.yaml"), &text).unwrap();
        prop_assert!(f.errors.is_empty(), "{:?}\n{}", f.errors, text);
        prop_assert_eq!(f.pods.len(), pods.len());
        for (got, want) in f.pods.iter().zip(&pods) {
            prop_assert_eq!(&got.name, &want.name);
            prop_assert_eq!(&got.namespace, "default");
            prop_assert_eq!(&got.ips, &want.ips);
            prop_assert_eq!(got.mesh, want.mesh);
        }
    }
}

// ---------------------------------------------------------------------------
// Explicit regression tests for what the fuzzers found
// ---------------------------------------------------------------------------

fn ann(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// The YAML alias bomb in `proxy.istio.io/config` is refused quickly rather
/// than expanded.
#[test]
fn proxy_config_alias_bomb_is_refused() {
    let t = std::time::Instant::now();
    let r = pod_rules(
        Mesh::Istio,
        &[],
        &ann(&[(keys::PROXY_CONFIG, &alias_bomb())]),
    );
    assert!(
        t.elapsed() < std::time::Duration::from_secs(2),
        "{:?}",
        t.elapsed()
    );
    let e = r.unwrap_err();
    assert_eq!(e.key, keys::PROXY_CONFIG);
    assert!(e.to_string().contains("not YAML: "), "{e}");
}

/// Deeply nested YAML is refused (recursion limit), not a stack overflow.
#[test]
fn deeply_nested_yaml_is_refused() {
    let deep = format!("{}{}", "[".repeat(5_000), "]".repeat(5_000));
    let e = pod_rules(Mesh::Istio, &[], &ann(&[(keys::PROXY_CONFIG, &deep)])).unwrap_err();
    assert_eq!(e.key, keys::PROXY_CONFIG);
    let e = podsfile::parse(Path::new("p.yaml"), &format!("pods: {deep}")).unwrap_err();
    assert!(e.to_string().starts_with("pods file p.yaml: "), "{e}");
}

/// The widest port-range values a pod may carry (its annotations total at
/// most 256 KiB in Kubernetes) must be parsed in bounded time: the agent
/// parses annotations on its reconcile path, so a slow parse stalls every
/// pod of the node.
///
/// Found by review: `parse_port_ranges` used to insert every port of every
/// range one by one, so 256 KiB of `1-65535,` was ~2 billion set
/// insertions (104 s in a release build): a pod author could stall the
/// agent with one Linkerd or Kuma annotation. Ranges are now merged first.
#[test]
fn wide_port_ranges_stay_cheap() {
    let value = "1-65535,".repeat(256 * 1024 / 8);
    let t = std::time::Instant::now();
    let r = pod_rules(
        Mesh::Linkerd,
        &[],
        &ann(&[(keys::LINKERD_SKIP_OUTBOUND, &value)]),
    )
    .unwrap();
    assert_eq!(r.out_exclude_ports.len(), 65535);
    let took = t.elapsed();
    assert!(
        took < std::time::Duration::from_secs(2),
        "256 KiB of 1-65535 ranges took {took:?}"
    );
}

/// Found by `fuzz_pods_file`: `198.18.0.1` and `::ffff:198.18.0.1` are
/// one address to the kernel (weir keys every address IPv4-mapped), so two
/// pods listing them would overwrite each other's `POD_ADDRS` entry and one
/// would receive the other's inbound connections. The pods file now
/// canonicalises addresses, which makes the duplicate check see it.
#[test]
fn ipv4_mapped_pod_ip_is_the_ipv4_address() {
    let f = podsfile::parse(
        Path::new("pods.yaml"),
        "pods:\n  - {name: a, netns: /n/a, ips: [198.18.0.1]}\n  - {name: b, netns: /n/b, ips: ['::ffff:198.18.0.1']}\n  - {name: c, netns: /n/c, ips: ['::ffff:198.18.0.3']}\n",
    )
    .unwrap();
    assert_eq!(f.pods.len(), 2, "{:?}", f.errors);
    assert_eq!(f.errors.len(), 1);
    assert!(
        f.errors[0].contains("pod \"b\": field `ips`: an address is already used by pod default/a"),
        "{:?}",
        f.errors
    );
    let c = &f.pods[1];
    assert_eq!(c.ips, vec!["198.18.0.3".parse::<IpAddr>().unwrap()]);
    assert_ne!(c.rules.policy.flags & POLICY_HAS_IP4, 0);
    assert_eq!(c.rules.policy.flags & POLICY_HAS_IP6, 0);
}

/// Found by `fuzz_pod_rules`: the same address written as IPv4 and as
/// IPv4-mapped IPv6 gives one `POD_ADDRS` key (harmless: same pod).
#[test]
fn same_address_twice_is_one_map_entry() {
    let ips: Vec<IpAddr> = vec![
        "127.0.0.1".parse().unwrap(),
        "::ffff:127.0.0.1".parse().unwrap(),
    ];
    let r = pod_rules(Mesh::Istio, &ips, &BTreeMap::new()).unwrap();
    let e = r.entries(1);
    let distinct: BTreeSet<_> = e.pod_addrs.keys().collect();
    assert_eq!(distinct.len(), 1);
}

/// Found by `fuzz_pods_file`: a second entry with the name of a valid pod
/// and a bad field is refused, and the first pod stays (its name is also
/// in `invalid`, which only matters for pods missing from the file).
#[test]
fn duplicate_with_bad_field_keeps_the_first_pod() {
    let f = podsfile::parse(
        Path::new("pods.yaml"),
        "pods:\n  - {name: a, netns: /n/a}\n  - {name: a, netns: /n/a, namespace: 5}\n",
    )
    .unwrap();
    assert_eq!(f.pods.len(), 1);
    assert_eq!(f.errors.len(), 1);
    assert!(
        f.errors[0].contains("pod \"a\": invalid type: integer `5`"),
        "{:?}",
        f.errors
    );
}

/// In Istio an IPv6 range goes to ip6tables only and never matches IPv4
/// traffic; weir keys IPv4 destinations as `::ffff:a.b.c.d` in the same LPM
/// trie, so an IPv6 range covering `::ffff:0:0/96` (`::/0`, `::/64`, ...)
/// also matches every IPv4 destination.
///
/// This was a bug: `includeOutboundIPRanges: "::/0"` captured IPv4 traffic
/// that Istio would not capture, and `excludeOutboundIPRanges: "::/0"` let
/// all IPv4 traffic bypass the proxy. `cidr_keys` now writes such a range
/// as the prefixes around `::ffff:0:0/96`.
#[test]
fn ipv6_ranges_never_match_ipv4_destinations() {
    let r = pod_rules(
        Mesh::Istio,
        &[],
        &ann(&[(keys::EXCLUDE_OUTBOUND_IP_RANGES, "::/0, 2001:2::/32")]),
    )
    .unwrap();
    let mapped = crate::policy::cidr_key(7, &"::ffff:0.0.0.0/96".parse().unwrap());
    for (bits, data) in r.entries(7).cidr_exclude.into_keys() {
        // The key covers the mapped range when its prefix is no longer
        // than 64 + 96 bits and agrees with ::ffff:0:0 on those bits.
        let covers = bits <= mapped.0 && {
            let a = u128::from_be_bytes(data.addr);
            let m = u128::from_be_bytes(mapped.1.addr);
            let len = bits - 64;
            len == 0 || (a ^ m) >> (128 - len) == 0
        };
        assert!(!covers, "an IPv6 exclude entry /{} matches IPv4", bits - 64);
    }
}

/// A node's worth of pods (and more) in one file: every one accepted.
#[test]
fn large_pods_file_parses() {
    let mut text = String::from("pods:\n");
    for i in 0..5000 {
        text.push_str(&format!(
            "  - {{name: p{i}, netns: /var/run/netns/p{i}, ips: [198.18.{}.{}, '2001:2::{i:x}']}}\n",
            i / 256,
            i % 256
        ));
    }
    let f = podsfile::parse(Path::new("pods.yaml"), &text).unwrap();
    assert!(f.errors.is_empty(), "{:?}", &f.errors[..1]);
    assert_eq!(f.pods.len(), 5000);
}

// ---------------------------------------------------------------------------
// docs/bad-input.md: every parsing row, checked against the parsers and the
// document (each fragment must appear in both)
// ---------------------------------------------------------------------------

const BAD_INPUT_DOC: &str = include_str!("../../docs/bad-input.md");

/// (annotation, value, mesh, fragment of the message).
const BAD_ANNOTATIONS: &[(&str, &str, Mesh, &str)] = &[
    (
        keys::INTERCEPTION_MODE,
        "TPROXY",
        Mesh::Istio,
        "TPROXY is not supported by weir",
    ),
    (
        keys::INTERCEPTION_MODE,
        "bogus",
        Mesh::Istio,
        "unknown mode \"bogus\"",
    ),
    (
        keys::INCLUDE_OUTBOUND_IP_RANGES,
        "10.0.0.0/33",
        Mesh::Istio,
        "\"10.0.0.0/33\" is not a CIDR",
    ),
    (
        keys::INCLUDE_OUTBOUND_IP_RANGES,
        "10.1.2.3",
        Mesh::Istio,
        "add the prefix length, e.g. 10.1.2.3/32",
    ),
    (
        keys::EXCLUDE_OUTBOUND_IP_RANGES,
        "*",
        Mesh::Istio,
        "\"*\" is not allowed here",
    ),
    (
        keys::EXCLUDE_OUTBOUND_IP_RANGES,
        "fd00::/129",
        Mesh::Istio,
        "\"fd00::/129\" is not a CIDR",
    ),
    (
        keys::INCLUDE_OUTBOUND_PORTS,
        "80,http",
        Mesh::Istio,
        "\"http\" is not a port",
    ),
    (
        keys::INCLUDE_OUTBOUND_PORTS,
        "*",
        Mesh::Istio,
        "\"*\" must be the whole value",
    ),
    (
        keys::EXCLUDE_OUTBOUND_PORTS,
        "0",
        Mesh::Istio,
        "\"0\" is not a port",
    ),
    (
        keys::EXCLUDE_OUTBOUND_PORTS,
        "65536",
        Mesh::Istio,
        "\"65536\" is not a port",
    ),
    (
        keys::EXCLUDE_OUTBOUND_PORTS,
        "-1",
        Mesh::Istio,
        "\"-1\" is not a port",
    ),
    (
        keys::INCLUDE_INBOUND_PORTS,
        "8080,*",
        Mesh::Istio,
        "\"*\" must be the whole value",
    ),
    (
        keys::EXCLUDE_INBOUND_PORTS,
        "1-5",
        Mesh::Istio,
        "\"1-5\" is not a port",
    ),
    (
        keys::STATUS_PORT,
        "abc",
        Mesh::Istio,
        "\"abc\" is not a port",
    ),
    (
        keys::PROXY_UIDS,
        "envoy",
        Mesh::Istio,
        "\"envoy\" is not a numeric id",
    ),
    (
        keys::PROXY_UIDS,
        "4294967296",
        Mesh::Istio,
        "\"4294967296\" is not a numeric id",
    ),
    (
        keys::PROXY_GIDS,
        "-1",
        Mesh::Istio,
        "\"-1\" is not a numeric id",
    ),
    (
        keys::OUTBOUND_PORT,
        "15001,15002",
        Mesh::Istio,
        "\"15001,15002\" is not a port",
    ),
    (keys::INBOUND_PORT, "0", Mesh::Istio, "\"0\" is not a port"),
    (keys::PROXY_CONFIG, "a: [", Mesh::Istio, "not YAML: "),
    (
        keys::PROXY_CONFIG,
        "proxyMetadata: {ISTIO_META_DNS_CAPTURE: maybe}",
        Mesh::Istio,
        "\"maybe\" is not a boolean",
    ),
    (
        keys::DNS_CAPTURE,
        "on",
        Mesh::Istio,
        "\"on\" is not a boolean",
    ),
    (
        keys::OWNER_GROUPS,
        "wheel",
        Mesh::Istio,
        "\"wheel\" is not a numeric id",
    ),
    (
        keys::OWNER_GROUPS_EXCLUDE,
        "3000,x",
        Mesh::Istio,
        "\"x\" is not a numeric id",
    ),
    (
        keys::LINKERD_SKIP_INBOUND,
        "9-3",
        Mesh::Linkerd,
        "range \"9-3\" ends before it starts",
    ),
    (
        keys::LINKERD_SKIP_OUTBOUND,
        "0-10",
        Mesh::Linkerd,
        "\"0\" is not a port",
    ),
    (
        keys::LINKERD_SKIP_SUBNETS,
        "10.0.0.0/40",
        Mesh::Linkerd,
        "\"10.0.0.0/40\" is not a CIDR",
    ),
    (
        keys::LINKERD_SKIP_SUBNETS,
        "*",
        Mesh::Linkerd,
        "\"*\" is not a CIDR",
    ),
    (
        keys::KUMA_EXCLUDE_INBOUND,
        "a-b",
        Mesh::Kuma,
        "\"a\" is not a port",
    ),
    (
        keys::KUMA_EXCLUDE_OUTBOUND,
        "70000",
        Mesh::Kuma,
        "\"70000\" is not a port",
    ),
    (
        keys::KUMA_EXCLUDE_OUTBOUND_IPS,
        "10.0.0.0/33",
        Mesh::Kuma,
        "\"10.0.0.0/33\" is not an IP address or CIDR",
    ),
    (
        keys::KUMA_EXCLUDE_INBOUND_IPS,
        "10.0.0.0/8,nope",
        Mesh::Kuma,
        "\"nope\" is not an IP address or CIDR",
    ),
    (
        keys::EXCLUDE_INTERFACES,
        "eth0,net/1",
        Mesh::Istio,
        "\"net/1\" is not an interface name",
    ),
    (
        keys::REROUTE_VIRTUAL_INTERFACES,
        "k6t-eth0,a-name-longer-than-15",
        Mesh::Istio,
        "\"a-name-longer-than-15\" is not an interface name",
    ),
    (
        keys::KUBEVIRT_INTERFACES,
        "..",
        Mesh::Istio,
        "\"..\" is not an interface name",
    ),
    (
        keys::PROXY_CONFIG,
        "proxyMetadata: {ISTIO_DUAL_STACK: sometimes}",
        Mesh::Istio,
        "\"sometimes\" is not a boolean",
    ),
    (
        keys::KUMA_IP_FAMILY_MODE,
        "ipv6",
        Mesh::Kuma,
        "unknown IP family mode \"ipv6\"",
    ),
    (
        keys::LINKERD_PROXY_UID,
        "proxy",
        Mesh::Linkerd,
        "\"proxy\" is not a numeric id",
    ),
];

#[test]
fn bad_annotation_table() {
    for (key, value, mesh, fragment) in BAD_ANNOTATIONS {
        let e = pod_rules(*mesh, &[], &ann(&[(key, value)])).unwrap_err();
        let msg = e.to_string();
        assert_eq!(e.key, *key, "{msg}");
        assert!(msg.starts_with(&format!("annotation {key}: ")), "{msg}");
        assert!(msg.contains(fragment), "{key}={value:?}: {msg}");
        assert!(
            BAD_INPUT_DOC.contains(fragment),
            "docs/bad-input.md lacks {fragment:?} ({key})"
        );
    }
    // DNS servers are only read with DNS capture on.
    let e = pod_rules(
        Mesh::Istio,
        &[],
        &ann(&[
            (keys::DNS_CAPTURE, "true"),
            (keys::DNS_SERVERS, "10.96.0.10/32"),
        ]),
    )
    .unwrap_err();
    assert!(
        e.to_string()
            .contains("\"10.96.0.10/32\" is not an IP address"),
        "{e}"
    );
    assert!(BAD_INPUT_DOC.contains("\"10.96.0.10/32\" is not an IP address"));
    // Every annotation weir reads has a row.
    for key in KNOWN_KEYS {
        assert!(BAD_INPUT_DOC.contains(key), "docs/bad-input.md lacks {key}");
    }
}

/// (pods-file text, fragment of the message).
const BAD_PODS_FILES: &[(&str, &str)] = &[
    ("pods: [", "expected a mapping with a `pods:` list"),
    ("pod: []", "unknown field `pod`, expected `pods`"),
    ("pods: 5", "invalid type: integer `5`, expected a sequence"),
    ("pods:\n  - netns: /n/a\n", "pod #1: missing field `name`"),
    (
        "pods:\n  - {name: [1], netns: /n/a}\n",
        "pod #1: invalid type: sequence, expected a string",
    ),
    (
        "pods:\n  - {name: ' ', netns: /n/a}\n",
        "field `name` is empty; give the pod a name",
    ),
    ("pods:\n  - {name: a}\n", "pod \"a\": missing field `netns`"),
    (
        "pods:\n  - {name: a, netns: n/a}\n",
        "field `netns`: \"n/a\" is not an absolute path",
    ),
    (
        "pods:\n  - {name: a, netns: /n/a, ips: [10.0.0.300]}\n",
        "field `ips`: \"10.0.0.300\" is not an IP address",
    ),
    (
        "pods:\n  - {name: a, netns: /n/a, ips: 10.0.0.1}\n",
        "invalid type: string \"10.0.0.1\", expected a sequence",
    ),
    (
        "pods:\n  - {name: a, netns: /n/a, meshh: istio}\n",
        "pod \"a\": unknown field `meshh`",
    ),
    (
        "pods:\n  - {name: a, netns: /n/a, mesh: consul}\n",
        "unknown variant `consul`, expected one of `istio`, `linkerd`, `kuma`",
    ),
    (
        "pods:\n  - {name: a, netns: /n/a, annotations: {a: [1]}}\n",
        "pod \"a\": invalid type: sequence, expected a string",
    ),
    (
        "pods:\n  - {name: a, netns: /n/a, annotations: {traffic.sidecar.istio.io/excludeOutboundPorts: x}}\n",
        "pod \"a\": field `annotations`: annotation traffic.sidecar.istio.io/excludeOutboundPorts: \"x\" is not a port",
    ),
    (
        "pods:\n  - {name: a, netns: /n/a}\n  - {name: a, netns: /n/b}\n",
        "pod default/a is listed twice; keep one entry",
    ),
    (
        "pods:\n  - {name: a, netns: /n/a}\n  - {name: b, netns: /n/a}\n",
        "field `netns`: /n/a is already the netns of pod default/a; each pod has its own",
    ),
    (
        "pods:\n  - {name: a, netns: /n/a, ips: [198.18.0.1]}\n  - {name: b, netns: /n/b, ips: ['::ffff:198.18.0.1']}\n",
        "field `ips`: an address is already used by pod default/a",
    ),
    (
        "pods:\n  - {name: a, netns: /n/a}\n  - {name: a, netns: /n/a}\n",
        "pod default/a is listed twice",
    ),
    (
        "pods:\n  - {name: a, netns: /n/a, ips: [127.0.0.1]}\n",
        "is a loopback address, not a pod's own address; list the addresses of the pod's interfaces",
    ),
    ("\n", "the file is empty (still being written?)"),
];

#[test]
fn bad_pods_file_table() {
    for (text, fragment) in BAD_PODS_FILES {
        let msgs = match podsfile::parse(Path::new("/etc/weir/pods.yaml"), text) {
            Err(e) => vec![e.to_string()],
            Ok(f) => f.errors,
        };
        assert!(!msgs.is_empty(), "{text:?} was accepted");
        assert!(
            msgs.iter()
                .all(|m| m.starts_with("pods file /etc/weir/pods.yaml: ")),
            "{msgs:?}"
        );
        assert!(
            msgs.iter().any(|m| m.contains(fragment)),
            "{text:?}: {msgs:?}"
        );
        assert!(
            BAD_INPUT_DOC.contains(fragment),
            "docs/bad-input.md lacks {fragment:?}"
        );
    }
    // Blank and empty files are refused (a writer may be half-way);
    // `pods: []` is "no pods".
    for text in ["", "  \n"] {
        let e = podsfile::parse(Path::new("p"), text).unwrap_err();
        assert!(e.to_string().contains("the file is empty"), "{e}");
    }
    let f = podsfile::parse(Path::new("p"), "pods: []").unwrap();
    assert!(f.pods.is_empty() && f.errors.is_empty());
}
