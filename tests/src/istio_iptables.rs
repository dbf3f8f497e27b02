//! The rules `istio-iptables` writes into a pod, generated from the same
//! inputs, for the differential test of weir against real iptables.
//!
//! Two layers, as in a real cluster:
//!
//! - [`IstioPod`] holds what a user controls: pod annotations, the proxy
//!   UID, the proxy metadata (the environment of the `istio-init`
//!   container), the pod's resolvers and address families.
//!   [`IstioPod::capture_config`] turns it into the flags and environment
//!   the sidecar injector hands to `istio-iptables` (the `istio-init`
//!   arguments of Istio's injection template), and
//!   [`IstioPod::weir_annotations`] into the pod annotations weir reads.
//! - [`CaptureConfig`] is `istio-iptables`' own configuration (its flags:
//!   `-p -z -u -g -m -b -d -i -x -q -o -c -k`, DNS capture, owner groups,
//!   IPv6). [`CaptureConfig::restore`] produces the exact
//!   `iptables-restore` / `ip6tables-restore` input it applies (the `nat`
//!   table, and `mangle` / `raw` when TPROXY, invalid-packet dropping or DNS
//!   capture need them); [`CaptureConfig::weir_annotations`] gives weir
//!   annotations with the same meaning.
//!
//! The generator is written from the documented behaviour of
//! `tools/istio-iptables/pkg/capture/run.go` and
//! `tools/istio-iptables/pkg/builder/iptables_builder_impl.go` in
//! istio/istio (which rules, in which order, in which table; how the
//! restore text is laid out) — it shares no code with them. List values are
//! split the way `istio-iptables` splits them: on commas, dropping empty
//! items, without trimming spaces.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::IpAddr;

/// An IP family: `iptables` (IPv4) or `ip6tables` (IPv6).
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub enum Family {
    /// IPv4, `iptables-restore`.
    V4,
    /// IPv6, `ip6tables-restore`.
    V6,
}

impl Family {
    /// The restore command for this family.
    pub fn restore_command(self) -> &'static str {
        match self {
            Family::V4 => "iptables-restore",
            Family::V6 => "ip6tables-restore",
        }
    }

    /// The save command for this family.
    pub fn save_command(self) -> &'static str {
        match self {
            Family::V4 => "iptables-save",
            Family::V6 => "ip6tables-save",
        }
    }
}

/// `istio-iptables -m`: how inbound connections reach the proxy.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum InterceptionMode {
    /// `REDIRECT` (NAT to the inbound port).
    Redirect,
    /// `TPROXY` (mangle table, policy routing; the original source is kept).
    Tproxy,
}

impl InterceptionMode {
    /// The flag value.
    pub fn as_str(self) -> &'static str {
        match self {
            InterceptionMode::Redirect => "REDIRECT",
            InterceptionMode::Tproxy => "TPROXY",
        }
    }
}

/// Annotation keys and proxy-metadata names used on both sides.
pub mod keys {
    /// `REDIRECT`, `TPROXY` or `NONE`.
    pub const INTERCEPTION_MODE: &str = "sidecar.istio.io/interceptionMode";
    /// `-i`.
    pub const INCLUDE_OUTBOUND_IP_RANGES: &str = "traffic.sidecar.istio.io/includeOutboundIPRanges";
    /// `-x`.
    pub const EXCLUDE_OUTBOUND_IP_RANGES: &str = "traffic.sidecar.istio.io/excludeOutboundIPRanges";
    /// `-q`.
    pub const INCLUDE_OUTBOUND_PORTS: &str = "traffic.sidecar.istio.io/includeOutboundPorts";
    /// `-o`.
    pub const EXCLUDE_OUTBOUND_PORTS: &str = "traffic.sidecar.istio.io/excludeOutboundPorts";
    /// `-b`.
    pub const INCLUDE_INBOUND_PORTS: &str = "traffic.sidecar.istio.io/includeInboundPorts";
    /// Part of `-d`.
    pub const EXCLUDE_INBOUND_PORTS: &str = "traffic.sidecar.istio.io/excludeInboundPorts";
    /// Part of `-d`.
    pub const STATUS_PORT: &str = "status.sidecar.istio.io/port";
    /// `-c`.
    pub const EXCLUDE_INTERFACES: &str = "traffic.sidecar.istio.io/excludeInterfaces";
    /// `-k`.
    pub const REROUTE_VIRTUAL_INTERFACES: &str = "istio.io/reroute-virtual-interfaces";
    /// `-k`, the older name (used when the newer one is absent).
    pub const KUBEVIRT_INTERFACES: &str = "traffic.sidecar.istio.io/kubevirtInterfaces";
    /// Per-pod proxy configuration; its `proxyMetadata` becomes the
    /// environment of `istio-init` (and of the proxy).
    pub const PROXY_CONFIG: &str = "proxy.istio.io/config";
    /// weir: proxy UIDs (istio-iptables `-u`).
    pub const WEIR_PROXY_UIDS: &str = "weir.dev/proxy-uids";
    /// weir: proxy GIDs (istio-iptables `-g`).
    pub const WEIR_PROXY_GIDS: &str = "weir.dev/proxy-gids";
    /// weir: outbound capture port (istio-iptables `-p`).
    pub const WEIR_OUTBOUND_PORT: &str = "weir.dev/outbound-port";
    /// weir: inbound capture port (istio-iptables `-z`).
    pub const WEIR_INBOUND_PORT: &str = "weir.dev/inbound-port";
    /// weir: the resolvers whose port 53 is captured, or `*` (all; weir's
    /// default). Istio reads them from the pod's `/etc/resolv.conf`.
    pub const WEIR_DNS_SERVERS: &str = "weir.dev/dns-servers";
    /// weir: `ISTIO_OUTBOUND_OWNER_GROUPS`.
    pub const WEIR_OWNER_GROUPS: &str = "weir.dev/outbound-owner-groups";
    /// weir: `ISTIO_OUTBOUND_OWNER_GROUPS_EXCLUDE`.
    pub const WEIR_OWNER_GROUPS_EXCLUDE: &str = "weir.dev/outbound-owner-groups-exclude";

    /// Proxy metadata: DNS capture (`istio-iptables --redirect-dns`).
    pub const META_DNS_CAPTURE: &str = "ISTIO_META_DNS_CAPTURE";
    /// Proxy metadata: capture DNS to every server, not only the resolvers.
    pub const META_CAPTURE_ALL_DNS: &str = "CAPTURE_ALL_DNS";
    /// Proxy metadata: owner groups whose traffic is captured (`*` = all).
    pub const META_OWNER_GROUPS: &str = "ISTIO_OUTBOUND_OWNER_GROUPS";
    /// Proxy metadata: owner groups whose traffic is not captured.
    pub const META_OWNER_GROUPS_EXCLUDE: &str = "ISTIO_OUTBOUND_OWNER_GROUPS_EXCLUDE";
    /// Proxy metadata: dual stack (IPv6 rules for a pod whose first address
    /// is IPv4).
    pub const META_DUAL_STACK: &str = "ISTIO_DUAL_STACK";
    /// Proxy metadata: `istio-iptables -g` (defaults to the `-u` value).
    pub const META_PROXY_GID: &str = "PROXY_GID";
}

/// A value that cannot be expressed on the other side (or that
/// `istio-iptables` itself rejects).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Unsupported(pub String);

impl std::fmt::Display for Unsupported {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Unsupported {}

/// `istio-iptables`' configuration: its flags and the environment it reads.
///
/// String fields hold flag values verbatim (comma lists, `*`), so odd
/// spellings reach the generator exactly as they would reach
/// `istio-iptables`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CaptureConfig {
    /// `-p`: outbound capture port.
    pub proxy_port: String,
    /// `-z`: inbound capture port.
    pub inbound_capture_port: String,
    /// `-e`: tunnel port, never captured inbound.
    pub inbound_tunnel_port: String,
    /// `-u`: proxy UIDs.
    pub proxy_uid: String,
    /// `-g`: proxy GIDs; empty means "the `-u` value".
    pub proxy_gid: String,
    /// `-m`.
    pub interception_mode: InterceptionMode,
    /// `-b`: inbound ports (`*` all, empty none).
    pub inbound_ports_include: String,
    /// `-d`: inbound ports not captured (with `-b '*'`).
    pub inbound_ports_exclude: String,
    /// `-i`: outbound CIDRs (`*` all, empty none).
    pub outbound_ip_ranges_include: String,
    /// `-x`: outbound CIDRs never captured.
    pub outbound_ip_ranges_exclude: String,
    /// `-q`: outbound ports always captured.
    pub outbound_ports_include: String,
    /// `-o`: outbound ports never captured (TCP and UDP).
    pub outbound_ports_exclude: String,
    /// `-c`: interfaces whose traffic is never captured.
    pub exclude_interfaces: String,
    /// `-k`: interfaces whose inbound traffic is treated as outbound.
    pub reroute_virtual_interfaces: String,
    /// `--redirect-dns` (`ISTIO_META_DNS_CAPTURE`).
    pub redirect_dns: bool,
    /// `--capture-all-dns` (`CAPTURE_ALL_DNS`).
    pub capture_all_dns: bool,
    /// IPv4 resolvers (from the pod's `/etc/resolv.conf`).
    pub dns_servers_v4: Vec<String>,
    /// IPv6 resolvers.
    pub dns_servers_v6: Vec<String>,
    /// `ISTIO_OUTBOUND_OWNER_GROUPS` (default `*`).
    pub owner_groups_include: String,
    /// `ISTIO_OUTBOUND_OWNER_GROUPS_EXCLUDE`.
    pub owner_groups_exclude: String,
    /// Whether IPv6 rules are written at all (`ENABLE_INBOUND_IPV6`, which
    /// `istio-iptables` derives from the pod's addresses).
    pub enable_ipv6: bool,
    /// `--drop-invalid` (`INVALID_DROP`).
    pub drop_invalid: bool,
    /// `ISTIO_OUTBOUND_IPV4_LOOPBACK_CIDR` (default `127.0.0.1/32`).
    pub host_ipv4_loopback_cidr: String,
    /// `-t`: TPROXY mark.
    pub inbound_tproxy_mark: String,
    /// `-r`: TPROXY route table.
    pub inbound_tproxy_route_table: String,
}

impl Default for CaptureConfig {
    fn default() -> Self {
        Self::injected()
    }
}

/// The `istio-iptables` restore input for one pod.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Restore {
    /// `iptables-restore --noflush` input.
    pub v4: String,
    /// `ip6tables-restore --noflush` input; `None` when IPv6 is off.
    pub v6: Option<String>,
}

impl Restore {
    /// The input for `family` (empty for IPv6 when it is off).
    pub fn get(&self, family: Family) -> &str {
        match family {
            Family::V4 => &self.v4,
            Family::V6 => self.v6.as_deref().unwrap_or(""),
        }
    }
}

/// Splits a list as `istio-iptables` does: on commas, dropping empty items,
/// keeping spaces.
pub fn split(s: &str) -> Vec<&str> {
    s.split(',').filter(|i| !i.is_empty()).collect()
}

// Chains.
const INBOUND: &str = "ISTIO_INBOUND";
const REDIRECT: &str = "ISTIO_REDIRECT";
const IN_REDIRECT: &str = "ISTIO_IN_REDIRECT";
const OUTPUT: &str = "ISTIO_OUTPUT";
const OUTPUT_DNS: &str = "ISTIO_OUTPUT_DNS";
const DIVERT: &str = "ISTIO_DIVERT";
const TPROXY: &str = "ISTIO_TPROXY";
const DROP: &str = "ISTIO_DROP";
/// Mark of the proxy's own loopback packets in TPROXY mode.
const OUTBOUND_MARK: &str = "1338";
/// The DNS proxy port of the Istio agent.
const DNS_PORT: &str = "15053";
/// Placeholder for the family-specific value of a versioned rule.
const V: &str = "\u{0}family-specific";

/// Chains (and targets) of the kernel that are never created.
fn builtin(chain: &str) -> bool {
    matches!(
        chain,
        "INPUT"
            | "OUTPUT"
            | "FORWARD"
            | "PREROUTING"
            | "POSTROUTING"
            | "ACCEPT"
            | "RETURN"
            | "DROP"
    )
}

struct Rule {
    table: &'static str,
    chain: String,
    /// `-A CHAIN params…` or `-I CHAIN N params…`.
    words: Vec<String>,
}

/// Rules of both families, in the order they are written.
struct Rules {
    v4: Vec<Rule>,
    v6: Vec<Rule>,
    ipv6: bool,
}

impl Rules {
    fn add(&mut self, fam: Option<Family>, table: &'static str, chain: &str, op: Vec<String>) {
        let rule = |op: Vec<String>| Rule {
            table,
            chain: chain.to_string(),
            words: op,
        };
        if fam != Some(Family::V6) {
            self.v4.push(rule(op.clone()));
        }
        if fam != Some(Family::V4) && self.ipv6 {
            self.v6.push(rule(op));
        }
    }

    fn append_in(&mut self, fam: Option<Family>, chain: &str, table: &'static str, p: &[&str]) {
        let mut w = vec!["-A".to_string(), chain.to_string()];
        w.extend(p.iter().map(|s| s.to_string()));
        self.add(fam, table, chain, w);
    }

    fn append(&mut self, chain: &str, table: &'static str, p: &[&str]) {
        self.append_in(None, chain, table, p);
    }

    fn append_v4(&mut self, chain: &str, table: &'static str, p: &[&str]) {
        self.append_in(Some(Family::V4), chain, table, p);
    }

    fn append_v6(&mut self, chain: &str, table: &'static str, p: &[&str]) {
        self.append_in(Some(Family::V6), chain, table, p);
    }

    fn insert_in(
        &mut self,
        fam: Option<Family>,
        chain: &str,
        table: &'static str,
        pos: u32,
        p: &[&str],
    ) {
        let mut w = vec!["-I".to_string(), chain.to_string(), pos.to_string()];
        w.extend(p.iter().map(|s| s.to_string()));
        self.add(fam, table, chain, w);
    }

    /// One rule per family with [`V`] replaced by `v4` / `v6`.
    fn append_versioned(
        &mut self,
        v4: &str,
        v6: &str,
        chain: &str,
        table: &'static str,
        p: &[&str],
    ) {
        fn sub<'a>(p: &[&'a str], val: &'a str) -> Vec<&'a str> {
            p.iter().map(|w| if *w == V { val } else { *w }).collect()
        }
        self.append_v4(chain, table, &sub(p, v4));
        self.append_v6(chain, table, &sub(p, v6));
    }

    /// The restore text of one family: per table (alphabetical, only
    /// tables with rules), `-N` for every non-built-in chain that has rules
    /// (in order of first use) and then for every chain only jumped to
    /// (`-j CHAIN` as the last two words), then the rules in order.
    fn restore(rules: &[Rule]) -> String {
        let mut tables: BTreeMap<&str, Vec<String>> = BTreeMap::new();
        let mut seen: Vec<(String, &str)> = Vec::new();
        let mut new_chain = |tables: &mut BTreeMap<&str, Vec<String>>, chain: &str, table| {
            let key = (chain.to_string(), table);
            if seen.contains(&key) {
                return;
            }
            seen.push(key);
            if !builtin(chain) {
                tables.entry(table).or_default().push(format!("-N {chain}"));
            }
        };
        for r in rules {
            new_chain(&mut tables, &r.chain, r.table);
        }
        for r in rules {
            let n = r.words.len();
            if n >= 2 && r.words[n - 2] == "-j" {
                new_chain(&mut tables, &r.words[n - 1], r.table);
            }
        }
        for r in rules {
            tables.entry(r.table).or_default().push(r.words.join(" "));
        }
        let mut out = String::new();
        for (table, lines) in tables {
            if lines.is_empty() {
                continue;
            }
            let _ = writeln!(out, "* {table}");
            for l in lines {
                let _ = writeln!(out, "{l}");
            }
            let _ = writeln!(out, "COMMIT");
        }
        out
    }
}

/// A parsed CIDR list of one family (`istio-iptables`' `NetworkRange`).
#[derive(Default)]
struct Ranges {
    wildcard: bool,
    cidrs: Vec<String>,
    has_loopback: bool,
}

/// Canonical text of an address as Go's `netip` prints it.
fn canonical(ip: IpAddr) -> String {
    ip.to_string()
}

/// Splits a CIDR list into IPv4 and IPv6 ranges, as `SeparateV4V6`: every
/// item must be `address/bits` (no bare addresses, no spaces), the address
/// is kept as written (not masked), and a range "has loopback" when its
/// address (not the range) is a loopback address.
fn separate(list: &str) -> Result<(Ranges, Ranges), Unsupported> {
    if list == "*" {
        return Ok((
            Ranges {
                wildcard: true,
                ..Ranges::default()
            },
            Ranges {
                wildcard: true,
                ..Ranges::default()
            },
        ));
    }
    let (mut v4, mut v6) = (Ranges::default(), Ranges::default());
    for item in split(list) {
        let bad = || Unsupported(format!("{item:?} is not a CIDR (address/bits)"));
        let (a, bits) = item.split_once('/').ok_or_else(bad)?;
        let ip: IpAddr = a.parse().map_err(|_| bad())?;
        // Digits only, no leading zero (Go's netip.ParsePrefix).
        let digits = !bits.is_empty() && bits.bytes().all(|b| b.is_ascii_digit());
        if !digits || (bits.len() > 1 && bits.starts_with('0')) {
            return Err(bad());
        }
        let bits: u8 = bits.parse().map_err(|_| bad())?;
        let max = if ip.is_ipv4() { 32 } else { 128 };
        if bits > max {
            return Err(bad());
        }
        let text = format!("{}/{bits}", canonical(ip));
        match ip {
            IpAddr::V4(v) => {
                v4.has_loopback |= v.is_loopback();
                v4.cidrs.push(text);
            }
            IpAddr::V6(v) => {
                v6.has_loopback |=
                    v.is_loopback() || v.to_ipv4_mapped().is_some_and(|m| m.is_loopback());
                v6.cidrs.push(text);
            }
        }
    }
    Ok((v4, v6))
}

impl CaptureConfig {
    /// What Istio's injector passes for a pod without capture annotations:
    /// `-p 15001 -z 15006 -u 1337 -m REDIRECT -i '*' -x '' -b '*'
    /// -d 15090,15021,15020`; IPv4 only.
    pub fn injected() -> Self {
        CaptureConfig {
            proxy_port: "15001".into(),
            inbound_capture_port: "15006".into(),
            inbound_tunnel_port: "15008".into(),
            proxy_uid: "1337".into(),
            proxy_gid: String::new(),
            interception_mode: InterceptionMode::Redirect,
            inbound_ports_include: "*".into(),
            inbound_ports_exclude: "15090,15021,15020".into(),
            outbound_ip_ranges_include: "*".into(),
            outbound_ip_ranges_exclude: String::new(),
            outbound_ports_include: String::new(),
            outbound_ports_exclude: String::new(),
            exclude_interfaces: String::new(),
            reroute_virtual_interfaces: String::new(),
            redirect_dns: false,
            capture_all_dns: false,
            dns_servers_v4: Vec::new(),
            dns_servers_v6: Vec::new(),
            owner_groups_include: "*".into(),
            owner_groups_exclude: String::new(),
            enable_ipv6: false,
            drop_invalid: false,
            host_ipv4_loopback_cidr: "127.0.0.1/32".into(),
            inbound_tproxy_mark: "1337".into(),
            inbound_tproxy_route_table: "133".into(),
        }
    }

    /// The effective `-g` value.
    pub fn effective_gids(&self) -> &str {
        if self.proxy_gid.is_empty() {
            &self.proxy_uid
        } else {
            &self.proxy_gid
        }
    }

    /// The `istio-iptables` command line (flags only) for this
    /// configuration, with the environment it reads, for reports.
    pub fn command_line(&self) -> String {
        let q = |s: &str| {
            if s.is_empty() || s.contains(['*', ' ', ',']) {
                format!("'{s}'")
            } else {
                s.to_string()
            }
        };
        let mut s = format!(
            "istio-iptables -p {} -z {} -u {} -g {} -m {} -i {} -x {} -b {} -d {}",
            q(&self.proxy_port),
            q(&self.inbound_capture_port),
            q(&self.proxy_uid),
            q(self.effective_gids()),
            self.interception_mode.as_str(),
            q(&self.outbound_ip_ranges_include),
            q(&self.outbound_ip_ranges_exclude),
            q(&self.inbound_ports_include),
            q(&self.inbound_ports_exclude),
        );
        for (flag, v) in [
            ("-q", &self.outbound_ports_include),
            ("-o", &self.outbound_ports_exclude),
            ("-c", &self.exclude_interfaces),
            ("-k", &self.reroute_virtual_interfaces),
        ] {
            if !v.is_empty() {
                let _ = write!(s, " {flag} {}", q(v));
            }
        }
        if self.redirect_dns {
            s.push_str(" --redirect-dns");
        }
        if self.capture_all_dns {
            s.push_str(" --capture-all-dns");
        }
        if self.drop_invalid {
            s.push_str(" --drop-invalid");
        }
        if self.owner_groups_include != "*" {
            let _ = write!(
                s,
                " ISTIO_OUTBOUND_OWNER_GROUPS={}",
                q(&self.owner_groups_include)
            );
        }
        if !self.owner_groups_exclude.is_empty() {
            let _ = write!(
                s,
                " ISTIO_OUTBOUND_OWNER_GROUPS_EXCLUDE={}",
                q(&self.owner_groups_exclude)
            );
        }
        if !self.dns_servers_v4.is_empty() || !self.dns_servers_v6.is_empty() {
            let mut all = self.dns_servers_v4.clone();
            all.extend(self.dns_servers_v6.iter().cloned());
            let _ = write!(s, " (resolvers {})", all.join(","));
        }
        let _ = write!(s, " (IPv6 {})", if self.enable_ipv6 { "on" } else { "off" });
        s
    }

    /// The `iptables-restore` / `ip6tables-restore` input `istio-iptables`
    /// applies (with `--noflush`) for this configuration. Fails where
    /// `istio-iptables` fails: a malformed CIDR, or `-x '*'`.
    pub fn restore(&self) -> Result<Restore, Unsupported> {
        let r = self.rules()?;
        Ok(Restore {
            v4: Rules::restore(&r.v4),
            v6: self.enable_ipv6.then(|| Rules::restore(&r.v6)),
        })
    }

    /// `ip` commands `istio-iptables` runs besides the rules (its
    /// `ConfigureRoutes`): `::6/128` on `lo` for IPv6, the TPROXY policy
    /// routing. Each is an argument list for `ip`.
    pub fn ip_commands(&self) -> Vec<Vec<String>> {
        let s = |v: &[&str]| v.iter().map(|w| w.to_string()).collect::<Vec<_>>();
        let mut out = Vec::new();
        if self.enable_ipv6 {
            out.push(s(&["-6", "addr", "add", "::6/128", "dev", "lo"]));
        }
        if !self.inbound_ports_include.is_empty()
            && self.interception_mode == InterceptionMode::Tproxy
        {
            let mark = self.inbound_tproxy_mark.as_str();
            let table = self.inbound_tproxy_route_table.as_str();
            let mut fams = vec!["-4"];
            if self.enable_ipv6 {
                fams.push("-6");
            }
            for f in &fams {
                out.push(s(&[f, "rule", "add", "fwmark", mark, "lookup", table]));
            }
            for (f, dst) in fams.iter().zip(["0.0.0.0/0", "::/0"]) {
                out.push(s(&[
                    f, "route", "add", "local", dst, "dev", "lo", "table", table,
                ]));
            }
        }
        out
    }

    fn rules(&self) -> Result<Rules, Unsupported> {
        let mut b = Rules {
            v4: Vec::new(),
            v6: Vec::new(),
            ipv6: self.enable_ipv6,
        };
        let tproxy = self.interception_mode == InterceptionMode::Tproxy;
        let (ex4, ex6) = separate(&self.outbound_ip_ranges_exclude)?;
        if ex4.wildcard {
            return Err(Unsupported(
                "invalid value for OUTBOUND_IP_RANGES_EXCLUDE (\"*\")".into(),
            ));
        }
        let (in4, in6) = separate(&self.outbound_ip_ranges_include)?;
        let redirect_dns = self.redirect_dns
            && (self.capture_all_dns
                || !self.dns_servers_v4.is_empty()
                || !self.dns_servers_v6.is_empty());
        let lo4 = self.host_ipv4_loopback_cidr.as_str();
        let tunnel = self.inbound_tunnel_port.as_str();

        // Excluded interfaces: nothing arriving on / leaving through them.
        for i in split(&self.exclude_interfaces) {
            b.append("PREROUTING", "nat", &["-i", i, "-j", "RETURN"]);
            b.append("OUTPUT", "nat", &["-o", i, "-j", "RETURN"]);
        }
        if tproxy {
            for i in split(&self.exclude_interfaces) {
                b.append("PREROUTING", "mangle", &["-i", i, "-j", "RETURN"]);
                b.append("OUTPUT", "mangle", &["-o", i, "-j", "RETURN"]);
            }
        }
        // Virtual interfaces are not inbound traffic.
        for i in split(&self.reroute_virtual_interfaces) {
            b.insert_in(None, "PREROUTING", "nat", 1, &["-i", i, "-j", "RETURN"]);
        }
        if self.drop_invalid {
            b.append(
                "PREROUTING",
                "mangle",
                &["-m", "conntrack", "--ctstate", "INVALID", "-j", DROP],
            );
            b.append(DROP, "mangle", &["-j", "DROP"]);
        }
        b.append(
            INBOUND,
            "nat",
            &["-p", "tcp", "--dport", tunnel, "-j", "RETURN"],
        );
        b.append(
            REDIRECT,
            "nat",
            &[
                "-p",
                "tcp",
                "-j",
                "REDIRECT",
                "--to-ports",
                &self.proxy_port,
            ],
        );
        b.append(
            IN_REDIRECT,
            "nat",
            &[
                "-p",
                "tcp",
                "-j",
                "REDIRECT",
                "--to-ports",
                &self.inbound_capture_port,
            ],
        );
        self.inbound_rules(&mut b, lo4);

        b.append("OUTPUT", "nat", &["-j", OUTPUT]);
        for port in split(&self.outbound_ports_exclude) {
            b.append(
                OUTPUT,
                "nat",
                &["-p", "tcp", "--dport", port, "-j", "RETURN"],
            );
            b.append(
                OUTPUT,
                "nat",
                &["-p", "udp", "--dport", port, "-j", "RETURN"],
            );
        }
        b.append_versioned(
            "127.0.0.6/32",
            "::6/128",
            OUTPUT,
            "nat",
            &["-o", "lo", "-s", V, "-j", "RETURN"],
        );
        let keep_lo_return = !in4.has_loopback && !in6.has_loopback;
        let gids = self.effective_gids().to_string();
        for (owner, list) in [("--uid-owner", &self.proxy_uid), ("--gid-owner", &gids)] {
            for id in split(list) {
                // The proxy calling its own pod over loopback: inbound port.
                if redirect_dns && owner == "--uid-owner" {
                    b.append_versioned(
                        lo4,
                        "::1/128",
                        OUTPUT,
                        "nat",
                        &[
                            "-o",
                            "lo",
                            "!",
                            "-d",
                            V,
                            "-p",
                            "tcp",
                            "-m",
                            "multiport",
                            "!",
                            "--dports",
                            &format!("53,{tunnel}"),
                            "-m",
                            "owner",
                            owner,
                            id,
                            "-j",
                            IN_REDIRECT,
                        ],
                    );
                } else {
                    b.append_versioned(
                        lo4,
                        "::1/128",
                        OUTPUT,
                        "nat",
                        &[
                            "-o",
                            "lo",
                            "!",
                            "-d",
                            V,
                            "-p",
                            "tcp",
                            "!",
                            "--dport",
                            tunnel,
                            "-m",
                            "owner",
                            owner,
                            id,
                            "-j",
                            IN_REDIRECT,
                        ],
                    );
                }
                // Anyone else on loopback: not captured.
                if keep_lo_return {
                    if redirect_dns {
                        b.append(
                            OUTPUT,
                            "nat",
                            &[
                                "-o", "lo", "-p", "tcp", "!", "--dport", "53", "-m", "owner", "!",
                                owner, id, "-j", "RETURN",
                            ],
                        );
                    } else {
                        b.append(
                            OUTPUT,
                            "nat",
                            &["-o", "lo", "-m", "owner", "!", owner, id, "-j", "RETURN"],
                        );
                    }
                }
                // The proxy's own traffic: never captured.
                b.append(OUTPUT, "nat", &["-m", "owner", owner, id, "-j", "RETURN"]);
            }
        }
        // Owner groups.
        if self.owner_groups_include == "*" {
            for g in split(&self.owner_groups_exclude) {
                b.append(
                    OUTPUT,
                    "nat",
                    &["-m", "owner", "--gid-owner", g, "-j", "RETURN"],
                );
            }
        } else {
            let groups = split(&self.owner_groups_include);
            let mut p: Vec<&str> = Vec::new();
            for g in &groups {
                p.extend(["-m", "owner", "!", "--gid-owner", g]);
            }
            p.extend(["-j", "RETURN"]);
            b.append(OUTPUT, "nat", &p);
        }
        if redirect_dns {
            self.dns_rules(&mut b);
        }
        b.append_versioned(lo4, "::1/128", OUTPUT, "nat", &["-d", V, "-j", "RETURN"]);
        for c in &ex4.cidrs {
            b.append_v4(OUTPUT, "nat", &["-d", c, "-j", "RETURN"]);
        }
        for c in &ex6.cidrs {
            b.append_v6(OUTPUT, "nat", &["-d", c, "-j", "RETURN"]);
        }
        for port in split(&self.outbound_ports_include) {
            b.append(
                OUTPUT,
                "nat",
                &["-p", "tcp", "--dport", port, "-j", REDIRECT],
            );
        }
        for (fam, ranges) in [(Family::V4, &in4), (Family::V6, &in6)] {
            let virt = split(&self.reroute_virtual_interfaces);
            if ranges.wildcard {
                b.append_in(Some(fam), OUTPUT, "nat", &["-j", REDIRECT]);
                for i in &virt {
                    b.insert_in(
                        Some(fam),
                        "PREROUTING",
                        "nat",
                        1,
                        &["-i", i, "-j", REDIRECT],
                    );
                }
            } else {
                for c in &ranges.cidrs {
                    for i in &virt {
                        b.insert_in(
                            Some(fam),
                            "PREROUTING",
                            "nat",
                            1,
                            &["-i", i, "-d", c, "-j", REDIRECT],
                        );
                    }
                    b.append_in(Some(fam), OUTPUT, "nat", &["-d", c, "-j", REDIRECT]);
                }
            }
        }
        if tproxy {
            self.tproxy_tail(&mut b, lo4);
        }
        Ok(b)
    }

    fn inbound_rules(&self, b: &mut Rules, lo4: &str) {
        if self.inbound_ports_include.is_empty() {
            return;
        }
        let tproxy = self.interception_mode == InterceptionMode::Tproxy;
        let mark = self.inbound_tproxy_mark.as_str();
        let table = if tproxy {
            b.append(DIVERT, "mangle", &["-j", "MARK", "--set-mark", mark]);
            b.append(DIVERT, "mangle", &["-j", "ACCEPT"]);
            let tmark = format!("{mark}/0xffffffff");
            b.append_versioned(
                lo4,
                "::1/128",
                TPROXY,
                "mangle",
                &[
                    "!",
                    "-d",
                    V,
                    "-p",
                    "tcp",
                    "-j",
                    "TPROXY",
                    "--tproxy-mark",
                    &tmark,
                    "--on-port",
                    &self.inbound_capture_port,
                ],
            );
            "mangle"
        } else {
            "nat"
        };
        b.append("PREROUTING", table, &["-p", "tcp", "-j", INBOUND]);
        if self.inbound_ports_include == "*" {
            for port in split(&self.inbound_ports_exclude) {
                b.append(
                    INBOUND,
                    table,
                    &["-p", "tcp", "--dport", port, "-j", "RETURN"],
                );
            }
            if tproxy {
                b.append(
                    INBOUND,
                    "mangle",
                    &[
                        "-p",
                        "tcp",
                        "-m",
                        "conntrack",
                        "--ctstate",
                        "RELATED,ESTABLISHED",
                        "-j",
                        DIVERT,
                    ],
                );
                b.append(INBOUND, "mangle", &["-p", "tcp", "-j", TPROXY]);
            } else {
                b.append(INBOUND, "nat", &["-p", "tcp", "-j", IN_REDIRECT]);
            }
        } else {
            for port in split(&self.inbound_ports_include) {
                if tproxy {
                    b.append(
                        INBOUND,
                        "mangle",
                        &[
                            "-p",
                            "tcp",
                            "--dport",
                            port,
                            "-m",
                            "conntrack",
                            "--ctstate",
                            "RELATED,ESTABLISHED",
                            "-j",
                            DIVERT,
                        ],
                    );
                    b.append(
                        INBOUND,
                        "mangle",
                        &["-p", "tcp", "--dport", port, "-j", TPROXY],
                    );
                } else {
                    b.append(
                        INBOUND,
                        "nat",
                        &["-p", "tcp", "--dport", port, "-j", IN_REDIRECT],
                    );
                }
            }
        }
    }

    fn dns_rules(&self, b: &mut Rules) {
        let all = self.capture_all_dns;
        let (s4, s6) = (&self.dns_servers_v4, &self.dns_servers_v6);
        b.append("OUTPUT", "raw", &["-j", OUTPUT_DNS]);
        if all || !s4.is_empty() {
            b.append_v4(OUTPUT, "nat", &["-j", OUTPUT_DNS]);
        }
        if all || !s6.is_empty() {
            b.append_v6(OUTPUT, "nat", &["-j", OUTPUT_DNS]);
        }
        let redirect = |proto: &'static str, to: &'static str| -> [&'static str; 2] { [proto, to] };
        // TCP, then UDP (which spells the option --to-port).
        for [proto, to] in [redirect("tcp", "--to-ports"), redirect("udp", "--to-port")] {
            if all {
                b.append(
                    OUTPUT_DNS,
                    "nat",
                    &["-p", proto, "--dport", "53", "-j", "REDIRECT", to, DNS_PORT],
                );
            } else {
                for s in s4 {
                    let d = format!("{s}/32");
                    b.append_v4(
                        OUTPUT_DNS,
                        "nat",
                        &[
                            "-p", proto, "--dport", "53", "-d", &d, "-j", "REDIRECT", to, DNS_PORT,
                        ],
                    );
                }
                for s in s6 {
                    let d = format!("{s}/128");
                    b.append_v6(
                        OUTPUT_DNS,
                        "nat",
                        &[
                            "-p", proto, "--dport", "53", "-d", &d, "-j", "REDIRECT", to, DNS_PORT,
                        ],
                    );
                }
            }
        }
        // Conntrack zones keep the proxy's upstream queries apart from the
        // applications' queries.
        let gids = self.effective_gids().to_string();
        for (owner, list) in [("--uid-owner", &self.proxy_uid), ("--gid-owner", &gids)] {
            for id in split(list) {
                b.append(
                    OUTPUT_DNS,
                    "raw",
                    &[
                        "-p", "udp", "--dport", "53", "-m", "owner", owner, id, "-j", "CT",
                        "--zone", "1",
                    ],
                );
                b.append(
                    OUTPUT_DNS,
                    "raw",
                    &[
                        "-p", "udp", "--sport", DNS_PORT, "-m", "owner", owner, id, "-j", "CT",
                        "--zone", "2",
                    ],
                );
            }
        }
        if all {
            b.append("PREROUTING", "raw", &["-j", INBOUND]);
            b.append(
                OUTPUT_DNS,
                "raw",
                &["-p", "udp", "--dport", "53", "-j", "CT", "--zone", "2"],
            );
            b.append(
                INBOUND,
                "raw",
                &["-p", "udp", "--sport", "53", "-j", "CT", "--zone", "1"],
            );
        } else {
            for (fam, servers, bits) in [(Family::V4, s4, 32), (Family::V6, s6, 128)] {
                if !servers.is_empty() {
                    b.append_in(Some(fam), "PREROUTING", "raw", &["-j", INBOUND]);
                }
                for s in servers {
                    let a = format!("{s}/{bits}");
                    b.append_in(
                        Some(fam),
                        OUTPUT_DNS,
                        "raw",
                        &[
                            "-p", "udp", "--dport", "53", "-d", &a, "-j", "CT", "--zone", "2",
                        ],
                    );
                    b.append_in(
                        Some(fam),
                        INBOUND,
                        "raw",
                        &[
                            "-p", "udp", "--sport", "53", "-s", &a, "-j", "CT", "--zone", "1",
                        ],
                    );
                }
            }
        }
    }

    fn tproxy_tail(&self, b: &mut Rules, lo4: &str) {
        let mark = self.inbound_tproxy_mark.as_str();
        b.append(
            "PREROUTING",
            "mangle",
            &[
                "-p",
                "tcp",
                "-m",
                "mark",
                "--mark",
                mark,
                "-j",
                "CONNMARK",
                "--save-mark",
            ],
        );
        b.append(
            "OUTPUT",
            "mangle",
            &[
                "-p", "tcp", "-o", "lo", "-m", "mark", "--mark", mark, "-j", "RETURN",
            ],
        );
        let gids = self.effective_gids().to_string();
        for (owner, list) in [("--uid-owner", &self.proxy_uid), ("--gid-owner", &gids)] {
            for id in split(list) {
                b.append_versioned(
                    lo4,
                    "::1/128",
                    "OUTPUT",
                    "mangle",
                    &[
                        "!",
                        "-d",
                        V,
                        "-p",
                        "tcp",
                        "-o",
                        "lo",
                        "-m",
                        "owner",
                        owner,
                        id,
                        "-j",
                        "MARK",
                        "--set-mark",
                        OUTBOUND_MARK,
                    ],
                );
            }
        }
        b.append(
            "OUTPUT",
            "mangle",
            &[
                "-p",
                "tcp",
                "-m",
                "connmark",
                "--mark",
                mark,
                "-j",
                "CONNMARK",
                "--restore-mark",
            ],
        );
        b.insert_in(
            None,
            INBOUND,
            "mangle",
            1,
            &["-p", "tcp", "-m", "mark", "--mark", mark, "-j", "RETURN"],
        );
        b.insert_in(
            Some(Family::V4),
            INBOUND,
            "mangle",
            2,
            &[
                "-p",
                "tcp",
                "-s",
                "127.0.0.6/32",
                "-i",
                "lo",
                "-j",
                "RETURN",
            ],
        );
        b.insert_in(
            Some(Family::V6),
            INBOUND,
            "mangle",
            2,
            &["-p", "tcp", "-s", "::6/128", "-i", "lo", "-j", "RETURN"],
        );
        b.insert_in(
            None,
            INBOUND,
            "mangle",
            3,
            &[
                "-p",
                "tcp",
                "-i",
                "lo",
                "-m",
                "mark",
                "!",
                "--mark",
                OUTBOUND_MARK,
                "-j",
                "RETURN",
            ],
        );
    }

    /// Pod annotations that give weir the same capture rules.
    ///
    /// `-d` maps to `excludeInboundPorts` with the status port turned off
    /// (`status.sidecar.istio.io/port: "0"`), since `-d` already lists it.
    /// Fails for what weir cannot express: a `-d` without the ports weir
    /// always excludes (15090, 15021) while `-b '*'`, another tunnel port
    /// than 15008, a loopback CIDR other than `127.0.0.1/32`, resolvers
    /// (weir finds them itself), or `--drop-invalid`.
    pub fn weir_annotations(&self) -> Result<BTreeMap<String, String>, Unsupported> {
        let mut a = BTreeMap::new();
        let mut set = |k: &str, v: &str| {
            a.insert(k.to_string(), v.to_string());
        };
        if self.inbound_tunnel_port != "15008" {
            return Err(Unsupported("weir's tunnel port is always 15008".into()));
        }
        if self.host_ipv4_loopback_cidr != "127.0.0.1/32" {
            return Err(Unsupported(
                "weir's localhost is always 127.0.0.1/32 (ISTIO_OUTBOUND_IPV4_LOOPBACK_CIDR)"
                    .into(),
            ));
        }
        if self.drop_invalid {
            return Err(Unsupported("--drop-invalid has no weir equivalent".into()));
        }
        if self.inbound_ports_include == "*" {
            let d = split(&self.inbound_ports_exclude);
            for always in ["15090", "15021"] {
                if !d.contains(&always) {
                    return Err(Unsupported(format!(
                        "weir always excludes inbound port {always}; -d lacks it"
                    )));
                }
            }
        }
        if self.proxy_port != "15001" {
            set(keys::WEIR_OUTBOUND_PORT, &self.proxy_port);
        }
        if self.inbound_capture_port != "15006" {
            set(keys::WEIR_INBOUND_PORT, &self.inbound_capture_port);
        }
        set(keys::WEIR_PROXY_UIDS, &self.proxy_uid);
        set(keys::WEIR_PROXY_GIDS, self.effective_gids());
        set(keys::INTERCEPTION_MODE, self.interception_mode.as_str());
        set(
            keys::INCLUDE_OUTBOUND_IP_RANGES,
            &self.outbound_ip_ranges_include,
        );
        set(
            keys::EXCLUDE_OUTBOUND_IP_RANGES,
            &self.outbound_ip_ranges_exclude,
        );
        set(keys::INCLUDE_INBOUND_PORTS, &self.inbound_ports_include);
        set(keys::EXCLUDE_INBOUND_PORTS, &self.inbound_ports_exclude);
        set(keys::STATUS_PORT, "0");
        if !self.outbound_ports_include.is_empty() {
            set(keys::INCLUDE_OUTBOUND_PORTS, &self.outbound_ports_include);
        }
        if !self.outbound_ports_exclude.is_empty() {
            set(keys::EXCLUDE_OUTBOUND_PORTS, &self.outbound_ports_exclude);
        }
        if !self.exclude_interfaces.is_empty() {
            set(keys::EXCLUDE_INTERFACES, &self.exclude_interfaces);
        }
        if !self.reroute_virtual_interfaces.is_empty() {
            set(
                keys::REROUTE_VIRTUAL_INTERFACES,
                &self.reroute_virtual_interfaces,
            );
        }
        if self.owner_groups_include != "*" {
            set(keys::WEIR_OWNER_GROUPS, &self.owner_groups_include);
        }
        if !self.owner_groups_exclude.is_empty() {
            set(keys::WEIR_OWNER_GROUPS_EXCLUDE, &self.owner_groups_exclude);
        }
        // istio-iptables turns DNS capture off when it has neither
        // resolvers nor "capture all".
        let servers: Vec<&str> = self
            .dns_servers_v4
            .iter()
            .chain(&self.dns_servers_v6)
            .map(String::as_str)
            .collect();
        if self.redirect_dns && (self.capture_all_dns || !servers.is_empty()) {
            let mut meta = BTreeMap::new();
            meta.insert(keys::META_DNS_CAPTURE, "true".to_string());
            set(keys::PROXY_CONFIG, &proxy_config(&meta));
            if self.capture_all_dns {
                set(keys::WEIR_DNS_SERVERS, "*");
            } else {
                set(keys::WEIR_DNS_SERVERS, &servers.join(","));
            }
        }
        Ok(a)
    }
}

/// `proxy.istio.io/config` with `proxyMetadata` (JSON, which is YAML).
fn proxy_config(meta: &BTreeMap<&str, String>) -> String {
    let obj: serde_json::Map<String, serde_json::Value> = meta
        .iter()
        .map(|(k, v)| (k.to_string(), serde_json::Value::String(v.clone())))
        .collect();
    serde_json::json!({ "proxyMetadata": obj }).to_string()
}

/// A meshed pod as a user describes it: what Istio's injector and
/// `istio-iptables` read, and what weir reads.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct IstioPod {
    /// Pod annotations (Istio's names).
    pub annotations: BTreeMap<String, String>,
    /// The injector's proxy UID (`.ProxyUID`, default 1337).
    pub proxy_uid: Option<String>,
    /// Proxy metadata (environment of `istio-init`), e.g.
    /// `ISTIO_META_DNS_CAPTURE`, `ISTIO_OUTBOUND_OWNER_GROUPS`,
    /// `ISTIO_DUAL_STACK`, `PROXY_GID`.
    pub proxy_metadata: BTreeMap<String, String>,
    /// Nameservers of the pod's `/etc/resolv.conf`.
    pub nameservers: Vec<IpAddr>,
    /// The pod's addresses in the order the pod's interfaces list them
    /// (decides whether `istio-iptables` writes IPv6 rules).
    pub addresses: Vec<IpAddr>,
}

fn truthy(v: Option<&String>) -> bool {
    v.is_some_and(|v| v.trim().eq_ignore_ascii_case("true") || v.trim() == "1")
}

/// The injector's `excludeInboundPort`: appends the status port to the
/// excluded inbound ports unless it is 0, empty or already listed.
fn exclude_inbound_port(status: &str, excluded: &str) -> String {
    let port = status.trim();
    if port.is_empty() || port == "0" {
        return excluded.to_string();
    }
    let mut out = Vec::new();
    for p in excluded.split(',') {
        if p == port {
            return excluded.to_string();
        }
        let p = p.trim();
        if !p.is_empty() {
            out.push(p);
        }
    }
    out.push(port);
    out.join(",")
}

impl IstioPod {
    /// A pod with `addresses` and no annotations.
    pub fn new(addresses: &[IpAddr]) -> Self {
        IstioPod {
            addresses: addresses.to_vec(),
            ..Default::default()
        }
    }

    /// Adds an annotation.
    pub fn annotate(mut self, k: &str, v: &str) -> Self {
        self.annotations.insert(k.to_string(), v.to_string());
        self
    }

    /// Adds a proxy-metadata entry.
    pub fn meta(mut self, k: &str, v: &str) -> Self {
        self.proxy_metadata.insert(k.to_string(), v.to_string());
        self
    }

    fn ann(&self, k: &str) -> Option<&str> {
        self.annotations.get(k).map(String::as_str)
    }

    /// What the injector and `istio-iptables` make of this pod; `None` when
    /// the injector adds no `istio-init` at all (interception mode `NONE`).
    pub fn capture_config(&self) -> Option<CaptureConfig> {
        let mode = self.ann(keys::INTERCEPTION_MODE).unwrap_or("REDIRECT");
        let interception_mode = match mode {
            "NONE" => return None,
            "TPROXY" => InterceptionMode::Tproxy,
            _ => InterceptionMode::Redirect,
        };
        let mut c = CaptureConfig::injected();
        c.interception_mode = interception_mode;
        c.proxy_uid = if interception_mode == InterceptionMode::Tproxy {
            "1337".into()
        } else {
            self.proxy_uid.clone().unwrap_or_else(|| "1337".into())
        };
        c.proxy_gid = self
            .proxy_metadata
            .get(keys::META_PROXY_GID)
            .cloned()
            .unwrap_or_default();
        let get = |k: &str, d: &str| self.ann(k).unwrap_or(d).to_string();
        c.outbound_ip_ranges_include = get(keys::INCLUDE_OUTBOUND_IP_RANGES, "*");
        c.outbound_ip_ranges_exclude = get(keys::EXCLUDE_OUTBOUND_IP_RANGES, "");
        c.inbound_ports_include = get(keys::INCLUDE_INBOUND_PORTS, "*");
        let extra = exclude_inbound_port(
            &get(keys::STATUS_PORT, "15020"),
            &get(keys::EXCLUDE_INBOUND_PORTS, ""),
        );
        c.inbound_ports_exclude = if extra.is_empty() {
            "15090,15021".into()
        } else {
            format!("15090,15021,{extra}")
        };
        c.outbound_ports_include = get(keys::INCLUDE_OUTBOUND_PORTS, "");
        c.outbound_ports_exclude = get(keys::EXCLUDE_OUTBOUND_PORTS, "");
        c.reroute_virtual_interfaces = self
            .ann(keys::REROUTE_VIRTUAL_INTERFACES)
            .or(self.ann(keys::KUBEVIRT_INTERFACES))
            .unwrap_or("")
            .to_string();
        c.exclude_interfaces = get(keys::EXCLUDE_INTERFACES, "");
        let meta = |k: &str| self.proxy_metadata.get(k);
        c.redirect_dns = truthy(meta(keys::META_DNS_CAPTURE));
        c.capture_all_dns = truthy(meta(keys::META_CAPTURE_ALL_DNS));
        if c.redirect_dns && !c.capture_all_dns {
            for ns in &self.nameservers {
                match ns {
                    IpAddr::V4(a) => c.dns_servers_v4.push(a.to_string()),
                    IpAddr::V6(a) => c.dns_servers_v6.push(a.to_string()),
                }
            }
        }
        c.owner_groups_include = meta(keys::META_OWNER_GROUPS)
            .cloned()
            .unwrap_or_else(|| "*".into());
        c.owner_groups_exclude = meta(keys::META_OWNER_GROUPS_EXCLUDE)
            .cloned()
            .unwrap_or_default();
        // getLocalIP: the first global address decides, unless dual stack,
        // where any IPv6 address turns IPv6 on.
        let dual = truthy(meta(keys::META_DUAL_STACK)) || truthy(meta("DUAL_STACK"));
        let global: Vec<&IpAddr> = self
            .addresses
            .iter()
            .filter(|a| !a.is_loopback() && !is_link_local(a))
            .collect();
        c.enable_ipv6 = if dual {
            global.iter().any(|a| a.is_ipv6())
        } else {
            global.first().is_some_and(|a| a.is_ipv6())
        };
        Some(c)
    }

    /// The annotations weir reads for this pod: the Istio annotations as
    /// they are; weir's own keys for what Istio takes from elsewhere: the
    /// proxy identities (flags), the owner groups (proxy metadata) and the
    /// resolvers (the pod's `/etc/resolv.conf`); and
    /// `proxy.istio.io/config` with `ISTIO_META_DNS_CAPTURE`.
    pub fn weir_annotations(&self) -> BTreeMap<String, String> {
        let mut a = self.annotations.clone();
        let uid = self.proxy_uid.clone().unwrap_or_else(|| "1337".into());
        let gid = self
            .proxy_metadata
            .get(keys::META_PROXY_GID)
            .cloned()
            .unwrap_or_else(|| uid.clone());
        if uid != "1337" {
            a.insert(keys::WEIR_PROXY_UIDS.into(), uid);
        }
        if gid != "1337" {
            a.insert(keys::WEIR_PROXY_GIDS.into(), gid);
        }
        let meta = |k: &str| self.proxy_metadata.get(k);
        if let Some(g) = meta(keys::META_OWNER_GROUPS) {
            a.insert(keys::WEIR_OWNER_GROUPS.into(), g.clone());
        }
        if let Some(g) = meta(keys::META_OWNER_GROUPS_EXCLUDE) {
            a.insert(keys::WEIR_OWNER_GROUPS_EXCLUDE.into(), g.clone());
        }
        // istio-iptables turns DNS capture off when it has neither
        // resolvers nor "capture all".
        let all = truthy(meta(keys::META_CAPTURE_ALL_DNS));
        // The proxy metadata weir reads from the pod's proxy config (in
        // Kubernetes the agent reads ISTIO_DUAL_STACK from the istio-proxy
        // container's environment the same way): dual stack, always
        // written, as istio-init always knows it; DNS capture.
        let mut m = BTreeMap::new();
        let dual = truthy(meta(keys::META_DUAL_STACK)) || truthy(meta("DUAL_STACK"));
        m.insert(keys::META_DUAL_STACK, dual.to_string());
        let dns = truthy(meta(keys::META_DNS_CAPTURE)) && (all || !self.nameservers.is_empty());
        if dns {
            m.insert(keys::META_DNS_CAPTURE, "true".to_string());
        }
        a.entry(keys::PROXY_CONFIG.into())
            .or_insert_with(|| proxy_config(&m));
        if dns {
            let servers = if all {
                "*".to_string()
            } else {
                let list: Vec<String> = self.nameservers.iter().map(IpAddr::to_string).collect();
                list.join(",")
            };
            a.insert(keys::WEIR_DNS_SERVERS.into(), servers);
        }
        a
    }
}

fn is_link_local(a: &IpAddr) -> bool {
    match a {
        IpAddr::V4(v) => v.is_link_local(),
        IpAddr::V6(v) => (v.segments()[0] & 0xffc0) == 0xfe80,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(s: &str) -> Vec<&str> {
        s.lines().collect()
    }

    #[test]
    fn injected_defaults_ipv4() {
        let r = CaptureConfig::injected().restore().unwrap();
        assert_eq!(r.v6, None);
        assert_eq!(
            lines(&r.v4),
            vec![
                "* nat",
                "-N ISTIO_INBOUND",
                "-N ISTIO_REDIRECT",
                "-N ISTIO_IN_REDIRECT",
                "-N ISTIO_OUTPUT",
                "-A ISTIO_INBOUND -p tcp --dport 15008 -j RETURN",
                "-A ISTIO_REDIRECT -p tcp -j REDIRECT --to-ports 15001",
                "-A ISTIO_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15006",
                "-A PREROUTING -p tcp -j ISTIO_INBOUND",
                "-A ISTIO_INBOUND -p tcp --dport 15090 -j RETURN",
                "-A ISTIO_INBOUND -p tcp --dport 15021 -j RETURN",
                "-A ISTIO_INBOUND -p tcp --dport 15020 -j RETURN",
                "-A ISTIO_INBOUND -p tcp -j ISTIO_IN_REDIRECT",
                "-A OUTPUT -j ISTIO_OUTPUT",
                "-A ISTIO_OUTPUT -o lo -s 127.0.0.6/32 -j RETURN",
                "-A ISTIO_OUTPUT -o lo ! -d 127.0.0.1/32 -p tcp ! --dport 15008 -m owner --uid-owner 1337 -j ISTIO_IN_REDIRECT",
                "-A ISTIO_OUTPUT -o lo -m owner ! --uid-owner 1337 -j RETURN",
                "-A ISTIO_OUTPUT -m owner --uid-owner 1337 -j RETURN",
                "-A ISTIO_OUTPUT -o lo ! -d 127.0.0.1/32 -p tcp ! --dport 15008 -m owner --gid-owner 1337 -j ISTIO_IN_REDIRECT",
                "-A ISTIO_OUTPUT -o lo -m owner ! --gid-owner 1337 -j RETURN",
                "-A ISTIO_OUTPUT -m owner --gid-owner 1337 -j RETURN",
                "-A ISTIO_OUTPUT -d 127.0.0.1/32 -j RETURN",
                "-A ISTIO_OUTPUT -j ISTIO_REDIRECT",
                "COMMIT",
            ]
        );
    }

    #[test]
    fn empty_inbound_and_outbound_lists_capture_nothing() {
        let mut c = CaptureConfig::injected();
        c.inbound_ports_include = String::new();
        c.outbound_ip_ranges_include = String::new();
        let v4 = c.restore().unwrap().v4;
        assert!(!v4.contains("PREROUTING"), "{v4}");
        assert!(!v4.contains("-j ISTIO_REDIRECT"), "{v4}");
        // The chain is still created (it has a rule).
        assert!(v4.contains("-N ISTIO_REDIRECT"), "{v4}");
    }

    #[test]
    fn cidrs_split_by_family_and_loopback_include_drops_rule_four() {
        let mut c = CaptureConfig::injected();
        c.enable_ipv6 = true;
        c.outbound_ip_ranges_include = "198.18.10.0/24,2001:2:0:10::/64,127.1.2.3/32".into();
        c.outbound_ip_ranges_exclude = "198.18.10.7/32,,2001:2:0:10::7/128".into();
        let r = c.restore().unwrap();
        let v6 = r.v6.unwrap();
        assert!(r.v4.contains("-A ISTIO_OUTPUT -d 198.18.10.0/24 -j ISTIO_REDIRECT"));
        assert!(r.v4.contains("-A ISTIO_OUTPUT -d 198.18.10.7/32 -j RETURN"));
        assert!(!r.v4.contains("2001"));
        assert!(v6.contains("-A ISTIO_OUTPUT -d 2001:2:0:10::/64 -j ISTIO_REDIRECT"));
        assert!(v6.contains("-A ISTIO_OUTPUT -o lo -s ::6/128 -j RETURN"));
        assert!(v6.contains("! -d ::1/128"));
        // 127.1.2.3 is loopback: no "-o lo ! --uid-owner" RETURN, in
        // either family.
        assert!(!r.v4.contains("-o lo -m owner !"), "{}", r.v4);
        assert!(!v6.contains("-o lo -m owner !"), "{v6}");
    }

    #[test]
    fn zero_prefix_is_not_loopback() {
        // The address of 0.0.0.0/0 is not a loopback address, so the
        // "-o lo ! --uid-owner" rule stays although the range contains
        // 127.0.0.1.
        let mut c = CaptureConfig::injected();
        c.outbound_ip_ranges_include = "0.0.0.0/0".into();
        let v4 = c.restore().unwrap().v4;
        assert!(v4.contains("-A ISTIO_OUTPUT -o lo -m owner ! --uid-owner 1337 -j RETURN"));
        assert!(v4.contains("-A ISTIO_OUTPUT -d 0.0.0.0/0 -j ISTIO_REDIRECT"));
    }

    #[test]
    fn bad_cidrs_and_star_exclusion_fail_like_istio() {
        let mut c = CaptureConfig::injected();
        c.outbound_ip_ranges_include = "10.0.0.1".into();
        assert!(c.restore().is_err());
        c.outbound_ip_ranges_include = "10.0.0.0/33".into();
        assert!(c.restore().is_err());
        c.outbound_ip_ranges_include = " 10.0.0.0/8".into();
        assert!(c.restore().is_err());
        c.outbound_ip_ranges_include = "*".into();
        c.outbound_ip_ranges_exclude = "*".into();
        assert!(c.restore().is_err());
    }

    #[test]
    fn ports_uids_and_gids() {
        let mut c = CaptureConfig::injected();
        c.outbound_ports_exclude = "3306,,5432".into();
        c.outbound_ports_include = "8080".into();
        c.proxy_uid = "1337,1338".into();
        c.proxy_gid = "2000".into();
        c.inbound_ports_include = "8080,9090".into();
        let v4 = c.restore().unwrap().v4;
        let l = lines(&v4);
        let pos = |s: &str| {
            l.iter()
                .position(|x| *x == s)
                .unwrap_or_else(|| panic!("{s} not in\n{v4}"))
        };
        assert!(
            pos("-A ISTIO_OUTPUT -p tcp --dport 3306 -j RETURN")
                < pos("-A ISTIO_OUTPUT -p udp --dport 3306 -j RETURN")
        );
        assert!(
            pos("-A ISTIO_OUTPUT -p udp --dport 5432 -j RETURN")
                < pos("-A ISTIO_OUTPUT -o lo -s 127.0.0.6/32 -j RETURN")
        );
        assert!(
            pos("-A ISTIO_OUTPUT -m owner --uid-owner 1338 -j RETURN")
                < pos("-A ISTIO_OUTPUT -o lo -m owner ! --gid-owner 2000 -j RETURN")
        );
        assert!(
            pos("-A ISTIO_OUTPUT -d 127.0.0.1/32 -j RETURN")
                < pos("-A ISTIO_OUTPUT -p tcp --dport 8080 -j ISTIO_REDIRECT")
        );
        assert!(
            pos("-A ISTIO_OUTPUT -p tcp --dport 8080 -j ISTIO_REDIRECT")
                < pos("-A ISTIO_OUTPUT -j ISTIO_REDIRECT")
        );
        pos("-A ISTIO_INBOUND -p tcp --dport 9090 -j ISTIO_IN_REDIRECT");
        assert!(!v4.contains("--dport 15090"), "exclusions only with *");
    }

    #[test]
    fn owner_groups() {
        let mut c = CaptureConfig::injected();
        c.owner_groups_include = "1000,2000".into();
        let v4 = c.restore().unwrap().v4;
        assert!(v4.contains(
            "-A ISTIO_OUTPUT -m owner ! --gid-owner 1000 -m owner ! --gid-owner 2000 -j RETURN\n-A ISTIO_OUTPUT -d 127.0.0.1/32 -j RETURN"
        ));
        let mut c = CaptureConfig::injected();
        c.owner_groups_exclude = "3000".into();
        let v4 = c.restore().unwrap().v4;
        assert!(v4.contains("-A ISTIO_OUTPUT -m owner --gid-owner 3000 -j RETURN\n"));
    }

    #[test]
    fn dns_capture_adds_raw_table_and_spares_port_53_on_loopback() {
        let mut c = CaptureConfig::injected();
        c.redirect_dns = true;
        c.dns_servers_v4 = vec!["198.18.53.53".into()];
        let v4 = c.restore().unwrap().v4;
        assert!(v4.starts_with("* nat\n"), "{v4}");
        assert!(v4.contains("-N ISTIO_OUTPUT_DNS"));
        assert!(v4.contains(
            "-m multiport ! --dports 53,15008 -m owner --uid-owner 1337 -j ISTIO_IN_REDIRECT"
        ));
        assert!(
            v4.contains("-p tcp ! --dport 15008 -m owner --gid-owner 1337 -j ISTIO_IN_REDIRECT")
        );
        assert!(v4.contains(
            "-A ISTIO_OUTPUT -o lo -p tcp ! --dport 53 -m owner ! --uid-owner 1337 -j RETURN"
        ));
        assert!(v4.contains(
            "-A ISTIO_OUTPUT_DNS -p tcp --dport 53 -d 198.18.53.53/32 -j REDIRECT --to-ports 15053"
        ));
        assert!(v4.contains(
            "-A ISTIO_OUTPUT_DNS -p udp --dport 53 -d 198.18.53.53/32 -j REDIRECT --to-port 15053"
        ));
        let raw = v4.split("* raw\n").nth(1).expect("raw table");
        assert!(
            raw.starts_with(
                "-N ISTIO_OUTPUT_DNS\n-N ISTIO_INBOUND\n-A OUTPUT -j ISTIO_OUTPUT_DNS\n"
            )
        );
        assert!(
            raw.contains("-A ISTIO_INBOUND -p udp --sport 53 -s 198.18.53.53/32 -j CT --zone 1")
        );
        // Without resolvers and without capture-all, DNS capture is off.
        c.dns_servers_v4.clear();
        assert!(!c.restore().unwrap().v4.contains("DNS"));
    }

    #[test]
    fn interfaces() {
        let mut c = CaptureConfig::injected();
        c.exclude_interfaces = "net1".into();
        c.reroute_virtual_interfaces = "virt0,virt1".into();
        let v4 = c.restore().unwrap().v4;
        let l = lines(&v4);
        assert_eq!(l[5], "-A PREROUTING -i net1 -j RETURN");
        assert_eq!(l[6], "-A OUTPUT -o net1 -j RETURN");
        assert_eq!(l[7], "-I PREROUTING 1 -i virt0 -j RETURN");
        assert_eq!(l[8], "-I PREROUTING 1 -i virt1 -j RETURN");
        assert!(v4.ends_with(
            "-A ISTIO_OUTPUT -j ISTIO_REDIRECT\n-I PREROUTING 1 -i virt0 -j ISTIO_REDIRECT\n-I PREROUTING 1 -i virt1 -j ISTIO_REDIRECT\nCOMMIT\n"
        ));
    }

    #[test]
    fn tproxy_uses_mangle() {
        let mut c = CaptureConfig::injected();
        c.interception_mode = InterceptionMode::Tproxy;
        c.enable_ipv6 = true;
        let r = c.restore().unwrap();
        assert!(r.v4.starts_with("* mangle\n-N ISTIO_DIVERT\n-N ISTIO_TPROXY\n-N ISTIO_INBOUND\n"));
        assert!(r.v4.contains(
            "-A ISTIO_TPROXY ! -d 127.0.0.1/32 -p tcp -j TPROXY --tproxy-mark 1337/0xffffffff --on-port 15006"
        ));
        assert!(r.v4.contains("-I ISTIO_INBOUND 2 -p tcp -s 127.0.0.6/32 -i lo -j RETURN"));
        assert!(
            r.v6.unwrap()
                .contains("-I ISTIO_INBOUND 2 -p tcp -s ::6/128 -i lo -j RETURN")
        );
        assert_eq!(c.ip_commands().len(), 5);
    }

    #[test]
    fn injector_builds_exclusions_and_ipv6() {
        let v4: IpAddr = "198.18.0.1".parse().unwrap();
        let v6: IpAddr = "2001:2::1".parse().unwrap();
        let pod = IstioPod::new(&[v4, v6]);
        let c = pod.capture_config().unwrap();
        assert_eq!(c.inbound_ports_exclude, "15090,15021,15020");
        assert!(!c.enable_ipv6, "first address is IPv4 and no dual stack");
        let c = pod
            .clone()
            .meta(keys::META_DUAL_STACK, "true")
            .annotate(keys::EXCLUDE_INBOUND_PORTS, "9090, 15020")
            .capture_config()
            .unwrap();
        assert!(c.enable_ipv6);
        // " 15020" is not "15020": the status port is appended again.
        assert_eq!(c.inbound_ports_exclude, "15090,15021,9090,15020,15020");
        let c = pod
            .clone()
            .annotate(keys::STATUS_PORT, "0")
            .capture_config()
            .unwrap();
        assert_eq!(c.inbound_ports_exclude, "15090,15021");
        assert!(
            pod.annotate(keys::INTERCEPTION_MODE, "NONE")
                .capture_config()
                .is_none()
        );
    }

    #[test]
    fn weir_annotations_from_pod() {
        let v4: IpAddr = "198.18.0.1".parse().unwrap();
        let pod = IstioPod {
            proxy_uid: Some("1337,1338".into()),
            nameservers: vec!["198.18.53.53".parse().unwrap()],
            ..IstioPod::new(&[v4])
        }
        .annotate(keys::EXCLUDE_OUTBOUND_PORTS, "3306")
        .meta(keys::META_DNS_CAPTURE, "true")
        .meta(keys::META_OWNER_GROUPS_EXCLUDE, "2000");
        let a = pod.weir_annotations();
        assert_eq!(a[keys::EXCLUDE_OUTBOUND_PORTS], "3306");
        assert_eq!(a[keys::WEIR_PROXY_UIDS], "1337,1338");
        assert_eq!(a[keys::WEIR_PROXY_GIDS], "1337,1338");
        assert_eq!(a[keys::WEIR_OWNER_GROUPS_EXCLUDE], "2000");
        assert_eq!(a[keys::WEIR_DNS_SERVERS], "198.18.53.53");
        assert!(a[keys::PROXY_CONFIG].contains("ISTIO_META_DNS_CAPTURE"));
        let c = pod.capture_config().unwrap();
        assert_eq!(c.effective_gids(), "1337,1338");
        assert_eq!(c.dns_servers_v4, vec!["198.18.53.53".to_string()]);
        assert_eq!(c.owner_groups_exclude, "2000");
    }

    #[test]
    fn weir_annotations_from_flags() {
        let mut c = CaptureConfig::injected();
        c.proxy_uid = "1337,1338".into();
        c.owner_groups_include = "1000".into();
        let a = c.weir_annotations().unwrap();
        assert_eq!(a[keys::WEIR_PROXY_UIDS], "1337,1338");
        assert_eq!(a[keys::WEIR_PROXY_GIDS], "1337,1338");
        assert_eq!(a[keys::STATUS_PORT], "0");
        assert_eq!(a[keys::WEIR_OWNER_GROUPS], "1000");
        assert!(!a.contains_key(keys::PROXY_CONFIG));
        c.redirect_dns = true;
        assert!(
            !c.weir_annotations()
                .unwrap()
                .contains_key(keys::PROXY_CONFIG),
            "no resolvers, no capture-all: istio-iptables turns DNS capture off"
        );
        c.dns_servers_v4 = vec!["198.18.53.53".into()];
        let a = c.weir_annotations().unwrap();
        assert_eq!(
            a[keys::PROXY_CONFIG],
            r#"{"proxyMetadata":{"ISTIO_META_DNS_CAPTURE":"true"}}"#
        );
        assert_eq!(a[keys::WEIR_DNS_SERVERS], "198.18.53.53");
        c.inbound_ports_exclude = "9090".into();
        assert!(c.weir_annotations().is_err());
    }
}
