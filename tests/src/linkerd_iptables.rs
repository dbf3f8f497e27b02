//! The rules Linkerd's init container (`linkerd-init`, linkerd2-proxy-init)
//! writes into a pod, generated from the same inputs, for the differential
//! test of weir against real iptables.
//!
//! Written from the behaviour of linkerd/linkerd2-proxy-init
//! (`pkg/iptables/iptables.go`: which rules, in which order;
//! `proxy-init/cmd/root.go`: flags, IPv4 then IPv6 runs) and of the
//! injector in linkerd/linkerd2 (`charts/partials/templates/_proxy-init.tpl`,
//! the defaults of `charts/linkerd-control-plane/values.yaml`,
//! `pkg/inject/inject.go`: which annotation replaces which value). No code
//! is shared with them.
//!
//! Two layers, as for Istio: [`LinkerdPod`] is what a user writes (pod
//! annotations, and the cluster's `disableIPv6` Helm value), and
//! [`ProxyInit`] the `linkerd-init` arguments the injector makes of it.
//! [`ProxyInit::restore`] gives the `iptables-restore` input equivalent to
//! the `iptables -t nat …` commands proxy-init runs one by one.
//!
//! What proxy-init does, in short:
//!
//! - inbound (`PREROUTING -j PROXY_INIT_REDIRECT`): ignored ports
//!   (`-p tcp -m multiport --dports`, at most 15 port references per rule,
//!   a range counting two), then ignored *source* subnets
//!   (`--subnets-to-ignore`, `-s SUBNET -j RETURN`), then every TCP
//!   connection to the inbound port;
//! - outbound (`OUTPUT -j PROXY_INIT_OUTPUT`): the proxy's UID and GID
//!   (only when > 0), everything leaving through `lo`, ignored ports, then
//!   every TCP connection to the outbound port. No DNS rule, no
//!   "proxy to its own pod" rule, no `127.0.0.6` rule, no `::6` address;
//! - the same rules for IPv6 with `ip6tables` unless `--ipv6=false`, which
//!   the injector passes while `disableIPv6` is true (its default). The
//!   subnets go to both runs unfiltered, so any subnet fails one of them
//!   and the container fails (linkerd2-proxy-init#696);
//! - port lists are split on commas without trimming; an item that is not
//!   a port or a `low-high` range is logged and skipped.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::IpAddr;

use crate::istio_iptables::{Restore, Unsupported};

/// Annotation keys (Linkerd's names) and weir's.
pub mod keys {
    /// Inbound ports (and ranges) not redirected; replaces
    /// `proxyInit.ignoreInboundPorts`.
    pub const SKIP_INBOUND_PORTS: &str = "config.linkerd.io/skip-inbound-ports";
    /// Outbound ports (and ranges) not redirected; replaces
    /// `proxyInit.ignoreOutboundPorts`.
    pub const SKIP_OUTBOUND_PORTS: &str = "config.linkerd.io/skip-outbound-ports";
    /// `--subnets-to-ignore`: inbound sources not redirected.
    pub const SKIP_SUBNETS: &str = "config.linkerd.io/skip-subnets";
    /// The proxy's UID (`--proxy-uid`).
    pub const PROXY_UID: &str = "config.linkerd.io/proxy-uid";
    /// The proxy's GID (`--proxy-gid`, only when >= 0).
    pub const PROXY_GID: &str = "config.linkerd.io/proxy-gid";
    /// weir: IPv6 capture (Linkerd: the cluster's `disableIPv6`).
    pub const WEIR_CAPTURE_IPV6: &str = "weir.dev/capture-ipv6";
}

/// The proxy's inbound port (`proxy.ports.inbound`).
pub const INBOUND_PORT: u16 = 4143;
/// The proxy's outbound port (`proxy.ports.outbound`).
pub const OUTBOUND_PORT: u16 = 4140;
/// The proxy's control port (`proxy.ports.control`), always skipped inbound.
pub const CONTROL_PORT: u16 = 4190;
/// The proxy's admin port (`proxy.ports.admin`), always skipped inbound.
pub const ADMIN_PORT: u16 = 4191;
/// The proxy's UID (`proxy.uid`).
pub const PROXY_UID: i64 = 2102;
/// `proxyInit.ignoreInboundPorts` and `ignoreOutboundPorts` (Galera).
pub const DEFAULT_IGNORED_PORTS: &str = "4567,4568";
/// proxy-init's limit of port references in one multiport rule.
const MULTIPORT_LIMIT: usize = 15;

/// A Linkerd-meshed pod as a user describes it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LinkerdPod {
    /// Pod annotations.
    pub annotations: BTreeMap<String, String>,
    /// IPv6 rules: the cluster's Helm value `disableIPv6` is false (it
    /// defaults to true).
    pub ipv6: bool,
}

impl LinkerdPod {
    /// A pod without annotations in a cluster with Linkerd's defaults.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds an annotation.
    pub fn annotate(mut self, k: &str, v: &str) -> Self {
        self.annotations.insert(k.to_string(), v.to_string());
        self
    }

    /// With `disableIPv6: false`.
    pub fn with_ipv6(mut self) -> Self {
        self.ipv6 = true;
        self
    }

    fn ann(&self, k: &str) -> Option<&str> {
        self.annotations.get(k).map(String::as_str)
    }

    /// The `linkerd-init` arguments the injector writes for this pod.
    pub fn proxy_init(&self) -> ProxyInit {
        // The injector overrides proxy.uid/gid with what parses as an
        // integer and ignores the rest.
        let id = |k: &str, d: i64| self.ann(k).and_then(|v| v.parse::<i64>().ok()).unwrap_or(d);
        let ignored_in = self
            .ann(keys::SKIP_INBOUND_PORTS)
            .unwrap_or(DEFAULT_IGNORED_PORTS);
        let mut inbound = format!("{CONTROL_PORT},{ADMIN_PORT}");
        if !ignored_in.is_empty() {
            inbound.push(',');
            inbound.push_str(ignored_in);
        }
        let outbound = self
            .ann(keys::SKIP_OUTBOUND_PORTS)
            .unwrap_or(DEFAULT_IGNORED_PORTS);
        ProxyInit {
            incoming_proxy_port: INBOUND_PORT,
            outgoing_proxy_port: OUTBOUND_PORT,
            proxy_uid: id(keys::PROXY_UID, PROXY_UID),
            proxy_gid: id(keys::PROXY_GID, -1),
            inbound_ports_to_ignore: string_slice(&inbound),
            // `{{- if .Values.proxyInit.ignoreOutboundPorts }}`: no flag
            // for an empty value.
            outbound_ports_to_ignore: string_slice(outbound),
            subnets_to_ignore: string_slice(self.ann(keys::SKIP_SUBNETS).unwrap_or("")),
            ipv6: self.ipv6,
        }
    }

    /// The UID the proxy runs as (for the sidecar stand-in).
    pub fn proxy_uid(&self) -> u32 {
        u32::try_from(self.proxy_init().proxy_uid).unwrap_or(0)
    }

    /// The annotations weir reads for this pod: Linkerd's own, and
    /// `weir.dev/capture-ipv6` for the cluster's `disableIPv6`.
    pub fn weir_annotations(&self) -> BTreeMap<String, String> {
        let mut a = self.annotations.clone();
        if self.ipv6 {
            a.insert(keys::WEIR_CAPTURE_IPV6.into(), "true".into());
        }
        a
    }
}

/// A cobra `StringSlice` flag value: comma-separated (CSV), not trimmed;
/// empty for an empty value.
fn string_slice(v: &str) -> Vec<String> {
    if v.is_empty() {
        return Vec::new();
    }
    v.split(',').map(str::to_string).collect()
}

/// `linkerd-init`'s configuration: its flags.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProxyInit {
    /// `--incoming-proxy-port`.
    pub incoming_proxy_port: u16,
    /// `--outgoing-proxy-port`.
    pub outgoing_proxy_port: u16,
    /// `--proxy-uid` (no rule unless > 0).
    pub proxy_uid: i64,
    /// `--proxy-gid` (no rule unless > 0).
    pub proxy_gid: i64,
    /// `--inbound-ports-to-ignore` items, as given.
    pub inbound_ports_to_ignore: Vec<String>,
    /// `--outbound-ports-to-ignore` items, as given.
    pub outbound_ports_to_ignore: Vec<String>,
    /// `--subnets-to-ignore` items, as given.
    pub subnets_to_ignore: Vec<String>,
    /// `--ipv6` (the second, `ip6tables` run).
    pub ipv6: bool,
}

/// A port or range of proxy-init's port lists, in multiport syntax, or
/// `None` for an item it skips (`util.ParsePortRange`: integers 0-65535,
/// `low-high` with low <= high, no spaces).
fn port_item(item: &str) -> Option<(String, usize)> {
    let bounds: Vec<&str> = item.split('-').collect();
    let num = |s: &str| {
        // strconv.Atoi: an optional sign and digits.
        let digits = s.strip_prefix(['+', '-']).unwrap_or(s);
        if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        s.parse::<i64>().ok().filter(|p| (0..=65535).contains(p))
    };
    let (lo, hi) = match bounds.as_slice() {
        [one] => (num(one)?, num(one)?),
        [lo, hi] => (num(lo)?, num(hi)?),
        _ => return None,
    };
    if hi < lo {
        return None;
    }
    Some(if lo == hi {
        (lo.to_string(), 1)
    } else {
        (format!("{lo}:{hi}"), 2)
    })
}

/// proxy-init's `makeMultiportDestinations`: the valid items in order,
/// in groups of at most 15 port references.
fn multiport_groups(items: &[String]) -> Vec<Vec<String>> {
    let mut groups = Vec::new();
    if items.is_empty() {
        return groups;
    }
    let (mut cur, mut count) = (Vec::new(), 0);
    for i in items {
        let Some((dest, n)) = port_item(i) else {
            continue;
        };
        if count + n > MULTIPORT_LIMIT {
            groups.push(std::mem::take(&mut cur));
            count = 0;
        }
        cur.push(dest);
        count += n;
    }
    groups.push(cur);
    groups
}

impl ProxyInit {
    /// The command line, for reports.
    pub fn command_line(&self) -> String {
        let mut s = format!(
            "linkerd-init --incoming-proxy-port {} --outgoing-proxy-port {} --proxy-uid {}",
            self.incoming_proxy_port, self.outgoing_proxy_port, self.proxy_uid
        );
        if self.proxy_gid >= 0 {
            let _ = write!(s, " --proxy-gid {}", self.proxy_gid);
        }
        for (flag, v) in [
            ("--inbound-ports-to-ignore", &self.inbound_ports_to_ignore),
            ("--outbound-ports-to-ignore", &self.outbound_ports_to_ignore),
            ("--subnets-to-ignore", &self.subnets_to_ignore),
        ] {
            if !v.is_empty() {
                let _ = write!(s, " {flag} '{}'", v.join(","));
            }
        }
        if !self.ipv6 {
            s.push_str(" --ipv6=false");
        }
        s
    }

    /// The rules of one run (`iptables` or `ip6tables`), as restore lines
    /// (without the table header). Fails where proxy-init fails: a subnet
    /// of the other family (or not a CIDR).
    fn rules(&self, v6: bool) -> Result<Vec<String>, Unsupported> {
        const REDIRECT: &str = "PROXY_INIT_REDIRECT";
        const OUTPUT: &str = "PROXY_INIT_OUTPUT";
        let comment = |c: &str| format!("-m comment --comment proxy-init/{c}");
        let mut r = vec![format!("-N {REDIRECT}"), format!("-N {OUTPUT}")];
        let ignore_ports = |r: &mut Vec<String>, chain: &str, items: &[String]| {
            for g in multiport_groups(items) {
                let d = g.join(",");
                r.push(format!(
                    "-A {chain} -p tcp --match multiport --dports {d} -j RETURN {}",
                    comment(&format!("ignore-port-{d}"))
                ));
            }
        };
        // Inbound.
        ignore_ports(&mut r, REDIRECT, &self.inbound_ports_to_ignore);
        for s in &self.subnets_to_ignore {
            let s = s.trim();
            let family_v6 = s
                .split_once('/')
                .and_then(|(a, bits)| {
                    let a: IpAddr = a.parse().ok()?;
                    let bits: u8 = bits.parse().ok()?;
                    (bits <= if a.is_ipv4() { 32 } else { 128 }).then_some(a.is_ipv6())
                })
                .ok_or_else(|| Unsupported(format!("{s} is not a valid CIDR address")))?;
            if family_v6 != v6 {
                return Err(Unsupported(format!(
                    "linkerd-init fails: {} rejects subnet {s} (linkerd2-proxy-init#696)",
                    if v6 { "ip6tables" } else { "iptables" }
                )));
            }
            r.push(format!(
                "-A {REDIRECT} -p all -j RETURN -s {s} {}",
                comment(&format!("ignore-subnet-{s}"))
            ));
        }
        r.push(format!(
            "-A {REDIRECT} -p tcp -j REDIRECT --to-port {} {}",
            self.incoming_proxy_port,
            comment("redirect-all-incoming-to-proxy-port")
        ));
        r.push(format!(
            "-A PREROUTING -j {REDIRECT} {}",
            comment("install-proxy-init-prerouting")
        ));
        // Outbound.
        if self.proxy_uid > 0 {
            r.push(format!(
                "-A {OUTPUT} -m owner --uid-owner {} -j RETURN {}",
                self.proxy_uid,
                comment("ignore-proxy-user-id")
            ));
        }
        if self.proxy_gid > 0 {
            r.push(format!(
                "-A {OUTPUT} -m owner --gid-owner {} -j RETURN {}",
                self.proxy_gid,
                comment("ignore-proxy-group-id")
            ));
        }
        r.push(format!(
            "-A {OUTPUT} -o lo -j RETURN {}",
            comment("ignore-loopback")
        ));
        ignore_ports(&mut r, OUTPUT, &self.outbound_ports_to_ignore);
        r.push(format!(
            "-A {OUTPUT} -p tcp -j REDIRECT --to-port {} {}",
            self.outgoing_proxy_port,
            comment("redirect-all-outgoing-to-proxy-port")
        ));
        r.push(format!(
            "-A OUTPUT -j {OUTPUT} {}",
            comment("install-proxy-init-output")
        ));
        Ok(r)
    }

    /// The `iptables-restore` / `ip6tables-restore` input (`--noflush`)
    /// equivalent to proxy-init's commands.
    pub fn restore(&self) -> Result<Restore, Unsupported> {
        let text = |lines: Vec<String>| {
            let mut s = String::from("* nat\n");
            for l in lines {
                s.push_str(&l);
                s.push('\n');
            }
            s.push_str("COMMIT\n");
            s
        };
        let v4 = text(self.rules(false)?);
        let v6 = if self.ipv6 {
            Some(text(self.rules(true)?))
        } else {
            None
        };
        Ok(Restore { v4, v6 })
    }

    /// `ip` commands besides the rules: none (proxy-init adds no address).
    pub fn ip_commands(&self) -> Vec<Vec<String>> {
        Vec::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(s: &str) -> Vec<&str> {
        s.lines().collect()
    }

    #[test]
    fn injected_defaults() {
        let p = LinkerdPod::new().proxy_init();
        assert_eq!(
            p.command_line(),
            "linkerd-init --incoming-proxy-port 4143 --outgoing-proxy-port 4140 --proxy-uid 2102 \
             --inbound-ports-to-ignore '4190,4191,4567,4568' --outbound-ports-to-ignore \
             '4567,4568' --ipv6=false"
        );
        let r = p.restore().unwrap();
        assert_eq!(r.v6, None, "disableIPv6 defaults to true");
        assert_eq!(
            lines(&r.v4),
            vec![
                "* nat",
                "-N PROXY_INIT_REDIRECT",
                "-N PROXY_INIT_OUTPUT",
                "-A PROXY_INIT_REDIRECT -p tcp --match multiport --dports 4190,4191,4567,4568 -j RETURN -m comment --comment proxy-init/ignore-port-4190,4191,4567,4568",
                "-A PROXY_INIT_REDIRECT -p tcp -j REDIRECT --to-port 4143 -m comment --comment proxy-init/redirect-all-incoming-to-proxy-port",
                "-A PREROUTING -j PROXY_INIT_REDIRECT -m comment --comment proxy-init/install-proxy-init-prerouting",
                "-A PROXY_INIT_OUTPUT -m owner --uid-owner 2102 -j RETURN -m comment --comment proxy-init/ignore-proxy-user-id",
                "-A PROXY_INIT_OUTPUT -o lo -j RETURN -m comment --comment proxy-init/ignore-loopback",
                "-A PROXY_INIT_OUTPUT -p tcp --match multiport --dports 4567,4568 -j RETURN -m comment --comment proxy-init/ignore-port-4567,4568",
                "-A PROXY_INIT_OUTPUT -p tcp -j REDIRECT --to-port 4140 -m comment --comment proxy-init/redirect-all-outgoing-to-proxy-port",
                "-A OUTPUT -j PROXY_INIT_OUTPUT -m comment --comment proxy-init/install-proxy-init-output",
                "COMMIT",
            ]
        );
    }

    #[test]
    fn annotations_replace_the_default_lists() {
        let p = LinkerdPod::new()
            .with_ipv6()
            .annotate(keys::SKIP_INBOUND_PORTS, "9090,7000-7100")
            .annotate(keys::SKIP_OUTBOUND_PORTS, "")
            .proxy_init();
        let r = p.restore().unwrap();
        let v6 = r.v6.expect("IPv6 rules");
        assert!(r.v4.contains("--dports 4190,4191,9090,7000:7100 -j RETURN"));
        assert!(!r.v4.contains("4567"), "{}", r.v4);
        assert!(
            !r.v4
                .contains("-A PROXY_INIT_OUTPUT -p tcp --match multiport")
        );
        assert_eq!(r.v4, v6, "the same rules for both families");
        // An empty inbound annotation leaves the proxy's own ports.
        let p = LinkerdPod::new()
            .annotate(keys::SKIP_INBOUND_PORTS, "")
            .proxy_init();
        assert_eq!(p.inbound_ports_to_ignore, vec!["4190", "4191"]);
    }

    #[test]
    fn port_items_like_proxy_init() {
        assert_eq!(port_item("80"), Some(("80".into(), 1)));
        assert_eq!(port_item("0"), Some(("0".into(), 1)));
        assert_eq!(port_item("10-10"), Some(("10".into(), 1)));
        assert_eq!(port_item("10-20"), Some(("10:20".into(), 2)));
        // Skipped (logged) by proxy-init: spaces, names, reversed or
        // open ranges, out of range.
        for bad in [" 80", "http", "20-10", "10-", "1-2-3", "65536", ""] {
            assert_eq!(port_item(bad), None, "{bad:?}");
        }
        let items: Vec<String> = (1..=20).map(|p| p.to_string()).collect();
        let g = multiport_groups(&items);
        assert_eq!(g.len(), 2);
        assert_eq!(g[0].len(), 15);
        // A range counts twice.
        let items: Vec<String> = ["1-2"; 8].iter().map(|s| s.to_string()).collect();
        let g = multiport_groups(&items);
        assert_eq!((g[0].len(), g[1].len()), (7, 1));
    }

    #[test]
    fn subnets_are_inbound_sources_and_one_family_only() {
        let pod = LinkerdPod::new().annotate(keys::SKIP_SUBNETS, "198.18.100.0/24,10.1.2.3/8");
        let v4 = pod.proxy_init().restore().unwrap().v4;
        assert!(v4.contains(
            "-A PROXY_INIT_REDIRECT -p all -j RETURN -s 198.18.100.0/24 -m comment --comment proxy-init/ignore-subnet-198.18.100.0/24"
        ));
        assert!(v4.contains("-s 10.1.2.3/8"));
        // Not an outbound exclusion.
        assert!(!v4.contains("-A PROXY_INIT_OUTPUT -d"));
        // IPv6 on: the IPv4 subnets reach ip6tables, which refuses them.
        assert!(pod.clone().with_ipv6().proxy_init().restore().is_err());
        // An IPv6 subnet fails the IPv4 run.
        let pod = LinkerdPod::new().annotate(keys::SKIP_SUBNETS, "2001:2::/64");
        assert!(pod.proxy_init().restore().is_err());
        let pod = LinkerdPod::new().annotate(keys::SKIP_SUBNETS, "10.0.0.0/8,");
        assert!(pod.proxy_init().restore().is_err(), "an empty item");
    }

    #[test]
    fn proxy_identities() {
        let p = LinkerdPod::new()
            .annotate(keys::PROXY_UID, "2103")
            .annotate(keys::PROXY_GID, "3000")
            .proxy_init();
        let v4 = p.restore().unwrap().v4;
        assert!(v4.contains("-A PROXY_INIT_OUTPUT -m owner --uid-owner 2103 -j RETURN"));
        assert!(v4.contains("-A PROXY_INIT_OUTPUT -m owner --gid-owner 3000 -j RETURN"));
        let p = LinkerdPod::new()
            .annotate(keys::PROXY_UID, "0")
            .annotate(keys::PROXY_GID, "nobody")
            .proxy_init();
        assert_eq!((p.proxy_uid, p.proxy_gid), (0, -1));
        let v4 = p.restore().unwrap().v4;
        assert!(!v4.contains("owner"), "{v4}");
    }

    #[test]
    fn weir_annotations() {
        let pod = LinkerdPod::new().annotate(keys::SKIP_SUBNETS, "10.0.0.0/8");
        assert_eq!(pod.weir_annotations(), pod.annotations);
        let a = pod.with_ipv6().weir_annotations();
        assert_eq!(a[keys::WEIR_CAPTURE_IPV6], "true");
    }
}
