//! The rules Kuma's transparent proxy (`kumactl install
//! transparent-proxy`, run by the `kuma-init` container or `kuma-cni`)
//! writes into a pod, generated from the same inputs, for the differential
//! test of weir against real iptables.
//!
//! Written from the behaviour of kumahq/kuma: the rule builder
//! (`pkg/transparentproxy/iptables/builder/builder_table_nat.go`,
//! `builder_table_raw.go`), its configuration and defaults
//! (`pkg/transparentproxy/config/`), what the injector makes of a pod's
//! annotations on Kubernetes (`pkg/transparentproxy/kubernetes/`,
//! `pkg/plugins/runtime/k8s/webhooks/injector/injector.go`), the Helm
//! chart's transparent-proxy ConfigMap (`deployments/charts/kuma/values.yaml`)
//! and the golden files of `test/transparentproxy/testdata/`. No code is
//! shared with them.
//!
//! Two layers: [`KumaPod`] is what a user writes (pod annotations, the
//! cluster's transparent-proxy ConfigMap, the pod's resolvers and
//! addresses), [`KumaConfig`] the configuration `kuma-init` runs with.
//!
//! The rules, per family (Kubernetes defaults: kuma-dp UID 5678, 15001 /
//! 15006, DNS to 15053 for every server, dual stack):
//!
//! ```text
//! nat OUTPUT:  -d <exclude-outbound-ip> -j RETURN            (each)
//!              -p udp --dport 53 --uid-owner 5678 -j RETURN  (DNS on)
//!              -p udp --dport 53 [-d <resolver>] -j REDIRECT --to-ports 15053
//!              -p tcp --dport 53 ! --uid-owner 5678 -j RETURN
//!              -p tcp -j KUMA_MESH_OUTBOUND
//! KUMA_MESH_OUTBOUND: -p tcp --dport <exclude-outbound-port> -j RETURN (each)
//!              -s 127.0.0.6/32 -o lo -j RETURN
//!              ! -d 127.0.0.1/32 -o lo -p tcp --uid-owner 5678 -j KUMA_MESH_INBOUND_REDIRECT
//!              -o lo -p tcp ! --uid-owner 5678 -j RETURN
//!              --uid-owner 5678 -j RETURN
//!              -d 127.0.0.1/32 -j RETURN
//!              -j KUMA_MESH_OUTBOUND_REDIRECT             (to 15001)
//! nat PREROUTING: -p tcp -j KUMA_MESH_INBOUND
//! KUMA_MESH_INBOUND: -p tcp --dport <excluded inbound port> -j RETURN (each)
//!              -p tcp -j KUMA_MESH_INBOUND_REDIRECT       (to 15006)
//! raw:         conntrack zones for DNS (with DNS capture)
//! ```
//!
//! IPv6 rules (with `::6/128` added to `lo`) are written in `dualstack`
//! mode when the pod has any non-loopback IPv6 address (a link-local one
//! counts); a family whose resolvers are all of the other family gets no
//! DNS rule at all when not every server is captured.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::IpAddr;

use crate::istio_iptables::{Restore, Unsupported};

/// Annotation keys (Kuma's names) and weir's.
pub mod keys {
    /// Inbound ports not redirected (replaces the runtime default).
    pub const EXCLUDE_INBOUND_PORTS: &str = "traffic.kuma.io/exclude-inbound-ports";
    /// Outbound ports not redirected (TCP only).
    pub const EXCLUDE_OUTBOUND_PORTS: &str = "traffic.kuma.io/exclude-outbound-ports";
    /// Outbound addresses not redirected (any protocol, DNS included).
    pub const EXCLUDE_OUTBOUND_IPS: &str = "traffic.kuma.io/exclude-outbound-ips";
    /// Sources whose inbound connections are not redirected (addresses or
    /// CIDRs; `-s ADDR -j RETURN` first in `KUMA_MESH_INBOUND`).
    pub const EXCLUDE_INBOUND_IPS: &str = "traffic.kuma.io/exclude-inbound-ips";
    /// `dualstack` or `ipv4`.
    pub const IP_FAMILY_MODE: &str = "kuma.io/transparent-proxying-ip-family-mode";
    /// The application probe proxy's port (default 9001; excluded inbound).
    pub const PROBE_PROXY_PORT: &str = "kuma.io/application-probe-proxy-port";
    /// weir: DNS capture on/off.
    pub const WEIR_DNS_CAPTURE: &str = "weir.dev/dns-capture";
    /// weir: the resolvers (or `*`).
    pub const WEIR_DNS_SERVERS: &str = "weir.dev/dns-servers";
}

/// kuma-dp's UID (`runtime.kubernetes.injector.sidecarContainer.uid`).
pub const KUMA_DP_UID: u32 = 5678;
/// Envoy's inbound port.
pub const INBOUND_PORT: u16 = 15006;
/// Envoy's outbound port.
pub const OUTBOUND_PORT: u16 = 15001;
/// kuma-dp's DNS proxy port.
pub const DNS_PORT: u16 = 15053;
/// kuma-dp's readiness reporter, excluded inbound while Envoy's admin API
/// is on a Unix socket (the control plane's default).
pub const READINESS_PORT: u16 = 9902;
/// The application probe proxy's default port.
pub const PROBE_PROXY_PORT: u16 = 9001;

/// A Kuma-meshed pod on Kubernetes as a user describes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KumaPod {
    /// Pod annotations.
    pub annotations: BTreeMap<String, String>,
    /// The transparent-proxy ConfigMap's `redirect.dns.enabled` (Helm
    /// default true).
    pub dns_enabled: bool,
    /// Its `redirect.dns.captureAll` (Helm default true).
    pub dns_capture_all: bool,
    /// Nameservers of the pod's `/etc/resolv.conf`.
    pub nameservers: Vec<IpAddr>,
    /// The pod's addresses.
    pub addresses: Vec<IpAddr>,
    /// The pod's interfaces have link-local IPv6 addresses (IPv6 enabled
    /// in the pod, as usual).
    pub link_local_ipv6: bool,
}

impl KumaPod {
    /// A pod with `addresses`, no annotations, the Helm chart's defaults.
    pub fn new(addresses: &[IpAddr]) -> Self {
        KumaPod {
            annotations: BTreeMap::new(),
            dns_enabled: true,
            dns_capture_all: true,
            nameservers: Vec::new(),
            addresses: addresses.to_vec(),
            link_local_ipv6: true,
        }
    }

    /// Adds an annotation.
    pub fn annotate(mut self, k: &str, v: &str) -> Self {
        self.annotations.insert(k.to_string(), v.to_string());
        self
    }

    fn ann(&self, k: &str) -> Option<&str> {
        self.annotations.get(k).map(String::as_str)
    }

    /// What `kuma-init` runs with for this pod. Fails where the injector
    /// or kuma-init refuse the pod.
    pub fn config(&self) -> Result<KumaConfig, Unsupported> {
        let ports = |k: &str| -> Result<Vec<u16>, Unsupported> {
            let mut out = Vec::new();
            for p in self.ann(k).unwrap_or("").split(',') {
                let p = p.trim();
                if p.is_empty() {
                    continue;
                }
                out.push(
                    p.parse::<u16>()
                        .ok()
                        .filter(|p| *p != 0)
                        .ok_or_else(|| Unsupported(format!("{k}: {p:?} is not a valid port")))?,
                );
            }
            Ok(out)
        };
        let mut inbound_exclude = ports(keys::EXCLUDE_INBOUND_PORTS)?;
        match self.ann(keys::PROBE_PROXY_PORT) {
            // Probe proxying off: the injector excludes the containers'
            // probe ports instead (none here).
            Some("0") => {}
            Some(v) => inbound_exclude.push(
                v.parse::<u16>()
                    .map_err(|_| Unsupported(format!("bad probe proxy port {v:?}")))?,
            ),
            None => inbound_exclude.push(PROBE_PROXY_PORT),
        }
        inbound_exclude.push(READINESS_PORT);
        let ips = |key: &str| -> Result<Vec<(bool, String)>, Unsupported> {
            let mut out = Vec::new();
            for ip in self.ann(key).unwrap_or("").split(',') {
                let ip = ip.trim();
                if ip.is_empty() {
                    continue;
                }
                let addr = ip.split_once('/').map_or(ip, |(a, _)| a);
                let a: IpAddr = addr
                    .parse()
                    .map_err(|_| Unsupported(format!("invalid IP address: {ip:?}")))?;
                out.push((a.is_ipv6(), ip.to_string()));
            }
            Ok(out)
        };
        let exclude_ips = ips(keys::EXCLUDE_OUTBOUND_IPS)?;
        let inbound_exclude_ips = ips(keys::EXCLUDE_INBOUND_IPS)?;
        let mode = self.ann(keys::IP_FAMILY_MODE).unwrap_or("");
        let dual = match mode.to_ascii_lowercase().as_str() {
            // Accepted case-insensitively, compared with "ipv4" as written.
            "" | "dualstack" | "ipv4" => mode != "ipv4",
            _ => return Err(Unsupported(format!("invalid IP family mode {mode:?}"))),
        };
        let has_v6 = self.link_local_ipv6
            || self
                .addresses
                .iter()
                .any(|a| a.is_ipv6() && !a.is_loopback());
        Ok(KumaConfig {
            kuma_dp_uid: KUMA_DP_UID,
            inbound_port: INBOUND_PORT,
            outbound_port: OUTBOUND_PORT,
            dns_port: DNS_PORT,
            inbound_exclude_ports: inbound_exclude,
            outbound_exclude_ports: ports(keys::EXCLUDE_OUTBOUND_PORTS)?,
            outbound_exclude_ips: exclude_ips,
            inbound_exclude_ips,
            dns_enabled: self.dns_enabled,
            dns_capture_all: self.dns_capture_all,
            nameservers: self.nameservers.clone(),
            ipv6: dual && has_v6,
        })
    }

    /// The annotations weir reads for this pod: Kuma's own, and weir's
    /// DNS keys for what Kuma takes from its ConfigMap and the pod's
    /// `/etc/resolv.conf`.
    pub fn weir_annotations(&self) -> BTreeMap<String, String> {
        let mut a = self.annotations.clone();
        if !self.dns_enabled {
            a.insert(keys::WEIR_DNS_CAPTURE.into(), "false".into());
        } else if !self.dns_capture_all {
            let list: Vec<String> = self.nameservers.iter().map(IpAddr::to_string).collect();
            a.insert(keys::WEIR_DNS_SERVERS.into(), list.join(","));
        }
        a
    }
}

/// kuma-init's configuration for one pod.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KumaConfig {
    /// kuma-dp's UID.
    pub kuma_dp_uid: u32,
    /// `redirect.inbound.port`.
    pub inbound_port: u16,
    /// `redirect.outbound.port`.
    pub outbound_port: u16,
    /// `redirect.dns.port`.
    pub dns_port: u16,
    /// `redirect.inbound.excludePorts` (annotation, probe proxy port,
    /// readiness port).
    pub inbound_exclude_ports: Vec<u16>,
    /// `redirect.outbound.excludePorts`.
    pub outbound_exclude_ports: Vec<u16>,
    /// `redirect.outbound.excludePortsForIPs`: (is IPv6, as written).
    pub outbound_exclude_ips: Vec<(bool, String)>,
    /// `--exclude-inbound-ips`: (is IPv6, address or CIDR as written).
    pub inbound_exclude_ips: Vec<(bool, String)>,
    /// `redirect.dns.enabled`.
    pub dns_enabled: bool,
    /// `redirect.dns.captureAll`.
    pub dns_capture_all: bool,
    /// The resolvers (`/etc/resolv.conf`).
    pub nameservers: Vec<IpAddr>,
    /// IPv6 rules are written.
    pub ipv6: bool,
}

impl KumaConfig {
    /// The configuration, for reports.
    pub fn command_line(&self) -> String {
        let mut s = format!(
            "kumactl install transparent-proxy --kuma-dp-user {} --redirect-inbound-port {} \
             --redirect-outbound-port {} --ip-family-mode {}",
            self.kuma_dp_uid,
            self.inbound_port,
            self.outbound_port,
            if self.ipv6 { "dualstack" } else { "ipv4" }
        );
        let join = |v: &[u16]| v.iter().map(u16::to_string).collect::<Vec<_>>().join(",");
        let _ = write!(
            s,
            " --exclude-inbound-ports {}",
            join(&self.inbound_exclude_ports)
        );
        if !self.outbound_exclude_ports.is_empty() {
            let _ = write!(
                s,
                " --exclude-outbound-ports {}",
                join(&self.outbound_exclude_ports)
            );
        }
        if !self.outbound_exclude_ips.is_empty() {
            let ips: Vec<&str> = self
                .outbound_exclude_ips
                .iter()
                .map(|(_, ip)| ip.as_str())
                .collect();
            let _ = write!(s, " --exclude-outbound-ips {}", ips.join(","));
        }
        if self.dns_enabled && self.dns_capture_all {
            s.push_str(" --redirect-all-dns-traffic");
        } else if self.dns_enabled {
            let ns: Vec<String> = self.nameservers.iter().map(IpAddr::to_string).collect();
            let _ = write!(s, " --redirect-dns (resolvers {})", ns.join(","));
        }
        s
    }

    /// The DNS servers of one family whose queries are redirected, or
    /// `None` when DNS is not redirected for the family.
    fn dns_servers(&self, v6: bool) -> Option<Vec<IpAddr>> {
        if !self.dns_enabled {
            return None;
        }
        if self.dns_capture_all {
            return Some(Vec::new());
        }
        let servers: Vec<IpAddr> = self
            .nameservers
            .iter()
            .copied()
            .filter(|a| a.to_canonical().is_ipv6() == v6)
            .collect();
        (!servers.is_empty()).then_some(servers)
    }

    fn tables(&self, v6: bool) -> String {
        let uid = self.kuma_dp_uid;
        let (lo, passthrough, localhost) = if v6 {
            ("lo", "::6/128", "::1/128")
        } else {
            ("lo", "127.0.0.6/32", "127.0.0.1/32")
        };
        let host = |a: &IpAddr| {
            if a.is_ipv6() {
                format!("{a}/128")
            } else {
                format!("{a}/32")
            }
        };
        let dns = self.dns_servers(v6);
        let mut out = String::new();
        // raw: conntrack zones, so that the proxy's own upstream queries and
        // the applications' redirected queries do not share entries.
        if let Some(servers) = &dns {
            let _ = writeln!(out, "* raw");
            let mut pre = Vec::new();
            let mut output = vec![
                format!("-A OUTPUT -p udp --dport 53 -m owner --uid-owner {uid} -j CT --zone 1"),
                format!(
                    "-A OUTPUT -p udp --sport {} -m owner --uid-owner {uid} -j CT --zone 2",
                    self.dns_port
                ),
            ];
            if self.dns_capture_all {
                output.push("-A OUTPUT -p udp --dport 53 -j CT --zone 2".into());
                pre.push("-A PREROUTING -p udp --sport 53 -j CT --zone 1".to_string());
            } else {
                for s in servers {
                    output.push(format!(
                        "-A OUTPUT -d {} -p udp --dport 53 -j CT --zone 2",
                        host(s)
                    ));
                    if s.is_loopback() {
                        output.push(format!(
                            "-A OUTPUT -s {} -d {localhost} -p udp -j CT --zone 1",
                            host(s)
                        ));
                    }
                    pre.push(format!(
                        "-A PREROUTING -s {} -p udp --sport 53 -j CT --zone 1",
                        host(s)
                    ));
                }
            }
            for l in pre.iter().chain(&output) {
                let _ = writeln!(out, "{l}");
            }
            let _ = writeln!(out, "COMMIT");
        }
        let _ = writeln!(out, "* nat");
        for c in [
            "KUMA_MESH_INBOUND",
            "KUMA_MESH_INBOUND_REDIRECT",
            "KUMA_MESH_OUTBOUND",
            "KUMA_MESH_OUTBOUND_REDIRECT",
        ] {
            let _ = writeln!(out, "-N {c}");
        }
        let mut rules = vec!["-A PREROUTING -p tcp -j KUMA_MESH_INBOUND".to_string()];
        for (ip6, ip) in &self.outbound_exclude_ips {
            if *ip6 == v6 {
                rules.push(format!("-A OUTPUT -d {ip} -j RETURN"));
            }
        }
        if let Some(servers) = &dns {
            rules.push(format!(
                "-A OUTPUT -p udp --dport 53 -m owner --uid-owner {uid} -j RETURN"
            ));
            if self.dns_capture_all {
                rules.push(format!(
                    "-A OUTPUT -p udp --dport 53 -j REDIRECT --to-ports {}",
                    self.dns_port
                ));
            } else {
                for s in servers {
                    rules.push(format!(
                        "-A OUTPUT -d {} -p udp --dport 53 -j REDIRECT --to-ports {}",
                        host(s),
                        self.dns_port
                    ));
                }
            }
            rules.push(format!(
                "-A OUTPUT -p tcp --dport 53 -m owner ! --uid-owner {uid} -j RETURN"
            ));
        }
        rules.push("-A OUTPUT -p tcp -j KUMA_MESH_OUTBOUND".into());
        for (ip6, ip) in &self.inbound_exclude_ips {
            if *ip6 == v6 {
                rules.push(format!("-A KUMA_MESH_INBOUND -s {ip} -j RETURN"));
            }
        }
        for p in &self.inbound_exclude_ports {
            rules.push(format!("-A KUMA_MESH_INBOUND -p tcp --dport {p} -j RETURN"));
        }
        rules.push("-A KUMA_MESH_INBOUND -p tcp -j KUMA_MESH_INBOUND_REDIRECT".into());
        rules.push(format!(
            "-A KUMA_MESH_INBOUND_REDIRECT -p tcp -j REDIRECT --to-ports {}",
            self.inbound_port
        ));
        for p in &self.outbound_exclude_ports {
            rules.push(format!(
                "-A KUMA_MESH_OUTBOUND -p tcp --dport {p} -j RETURN"
            ));
        }
        rules.extend([
            format!("-A KUMA_MESH_OUTBOUND -s {passthrough} -o {lo} -j RETURN"),
            format!(
                "-A KUMA_MESH_OUTBOUND ! -d {localhost} -o {lo} -p tcp -m owner --uid-owner {uid} \
                 -j KUMA_MESH_INBOUND_REDIRECT"
            ),
            format!("-A KUMA_MESH_OUTBOUND -o {lo} -p tcp -m owner ! --uid-owner {uid} -j RETURN"),
            format!("-A KUMA_MESH_OUTBOUND -m owner --uid-owner {uid} -j RETURN"),
            format!("-A KUMA_MESH_OUTBOUND -d {localhost} -j RETURN"),
            "-A KUMA_MESH_OUTBOUND -j KUMA_MESH_OUTBOUND_REDIRECT".into(),
            format!(
                "-A KUMA_MESH_OUTBOUND_REDIRECT -p tcp -j REDIRECT --to-ports {}",
                self.outbound_port
            ),
        ]);
        for l in rules {
            let _ = writeln!(out, "{l}");
        }
        let _ = writeln!(out, "COMMIT");
        out
    }

    /// The `iptables-restore` / `ip6tables-restore` input (`--noflush`).
    pub fn restore(&self) -> Result<Restore, Unsupported> {
        Ok(Restore {
            v4: self.tables(false),
            v6: self.ipv6.then(|| self.tables(true)),
        })
    }

    /// `ip` commands besides the rules: `::6/128` on `lo` with IPv6.
    pub fn ip_commands(&self) -> Vec<Vec<String>> {
        if self.ipv6 {
            vec![
                ["-6", "addr", "add", "::6/128", "dev", "lo"]
                    .iter()
                    .map(|s| s.to_string())
                    .collect(),
            ]
        } else {
            Vec::new()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod() -> KumaPod {
        KumaPod::new(&["198.18.0.1".parse().unwrap(), "2001:2::1".parse().unwrap()])
    }

    #[test]
    fn kubernetes_defaults() {
        let c = pod().config().unwrap();
        assert!(c.ipv6);
        assert_eq!(c.inbound_exclude_ports, vec![9001, 9902]);
        let r = c.restore().unwrap();
        let nat = r.v4.split("* nat\n").nth(1).unwrap();
        assert_eq!(
            nat.lines().collect::<Vec<_>>(),
            vec![
                "-N KUMA_MESH_INBOUND",
                "-N KUMA_MESH_INBOUND_REDIRECT",
                "-N KUMA_MESH_OUTBOUND",
                "-N KUMA_MESH_OUTBOUND_REDIRECT",
                "-A PREROUTING -p tcp -j KUMA_MESH_INBOUND",
                "-A OUTPUT -p udp --dport 53 -m owner --uid-owner 5678 -j RETURN",
                "-A OUTPUT -p udp --dport 53 -j REDIRECT --to-ports 15053",
                "-A OUTPUT -p tcp --dport 53 -m owner ! --uid-owner 5678 -j RETURN",
                "-A OUTPUT -p tcp -j KUMA_MESH_OUTBOUND",
                "-A KUMA_MESH_INBOUND -p tcp --dport 9001 -j RETURN",
                "-A KUMA_MESH_INBOUND -p tcp --dport 9902 -j RETURN",
                "-A KUMA_MESH_INBOUND -p tcp -j KUMA_MESH_INBOUND_REDIRECT",
                "-A KUMA_MESH_INBOUND_REDIRECT -p tcp -j REDIRECT --to-ports 15006",
                "-A KUMA_MESH_OUTBOUND -s 127.0.0.6/32 -o lo -j RETURN",
                "-A KUMA_MESH_OUTBOUND ! -d 127.0.0.1/32 -o lo -p tcp -m owner --uid-owner 5678 -j KUMA_MESH_INBOUND_REDIRECT",
                "-A KUMA_MESH_OUTBOUND -o lo -p tcp -m owner ! --uid-owner 5678 -j RETURN",
                "-A KUMA_MESH_OUTBOUND -m owner --uid-owner 5678 -j RETURN",
                "-A KUMA_MESH_OUTBOUND -d 127.0.0.1/32 -j RETURN",
                "-A KUMA_MESH_OUTBOUND -j KUMA_MESH_OUTBOUND_REDIRECT",
                "-A KUMA_MESH_OUTBOUND_REDIRECT -p tcp -j REDIRECT --to-ports 15001",
                "COMMIT",
            ]
        );
        assert!(r.v4.starts_with(
            "* raw\n-A PREROUTING -p udp --sport 53 -j CT --zone 1\n-A OUTPUT -p udp --dport 53 -m owner --uid-owner 5678 -j CT --zone 1\n"
        ));
        let v6 = r.v6.unwrap();
        assert!(v6.contains("-A KUMA_MESH_OUTBOUND -s ::6/128 -o lo -j RETURN"));
        assert!(v6.contains("! -d ::1/128 -o lo"));
        assert_eq!(c.ip_commands().len(), 1);
    }

    #[test]
    fn exclusions_per_family_and_in_order() {
        let c = pod()
            .annotate(
                keys::EXCLUDE_OUTBOUND_IPS,
                "198.18.10.1, 10.1.2.3/16,fd00::1",
            )
            .annotate(keys::EXCLUDE_OUTBOUND_PORTS, "3306, 53")
            .annotate(keys::EXCLUDE_INBOUND_PORTS, "9090")
            .config()
            .unwrap();
        let r = c.restore().unwrap();
        let v6 = r.v6.unwrap();
        // Addresses as written, first in OUTPUT, before DNS.
        let nat = r.v4.split("* nat\n").nth(1).unwrap();
        let ex = nat.find("-A OUTPUT -d 198.18.10.1 -j RETURN").unwrap();
        assert!(nat.contains("-A OUTPUT -d 10.1.2.3/16 -j RETURN"));
        assert!(ex < nat.find("-A OUTPUT -p udp --dport 53").unwrap());
        assert!(!r.v4.contains("fd00"));
        assert!(v6.contains("-A OUTPUT -d fd00::1 -j RETURN"));
        // Excluded ports: TCP, in KUMA_MESH_OUTBOUND.
        assert!(r.v4.contains("-A KUMA_MESH_OUTBOUND -p tcp --dport 53 -j RETURN"));
        assert!(!r.v4.contains("-p udp --dport 3306"));
        assert!(r.v4.contains("-A KUMA_MESH_INBOUND -p tcp --dport 9090 -j RETURN\n-A KUMA_MESH_INBOUND -p tcp --dport 9001"));
        // kuma-init refuses ranges and bad addresses.
        assert!(
            pod()
                .annotate(keys::EXCLUDE_OUTBOUND_PORTS, "3000-4000")
                .config()
                .is_err()
        );
        assert!(
            pod()
                .annotate(keys::EXCLUDE_OUTBOUND_IPS, "10.0.0.0/8,x")
                .config()
                .is_err()
        );
    }

    #[test]
    fn ip_family_mode_and_probe_port() {
        let c = pod()
            .annotate(keys::IP_FAMILY_MODE, "ipv4")
            .annotate(keys::PROBE_PROXY_PORT, "0")
            .config()
            .unwrap();
        assert!(!c.ipv6);
        assert_eq!(c.restore().unwrap().v6, None);
        assert!(c.ip_commands().is_empty());
        assert_eq!(c.inbound_exclude_ports, vec![9902]);
        // Accepted, but not "ipv4": dual stack.
        let c = pod()
            .annotate(keys::IP_FAMILY_MODE, "IPv4")
            .config()
            .unwrap();
        assert!(c.ipv6);
        assert!(pod().annotate(keys::IP_FAMILY_MODE, "v6").config().is_err());
        // A link-local IPv6 address is enough for IPv6 rules.
        let mut p = KumaPod::new(&["198.18.0.1".parse().unwrap()]);
        assert!(p.config().unwrap().ipv6);
        p.link_local_ipv6 = false;
        assert!(!p.config().unwrap().ipv6);
    }

    #[test]
    fn dns_modes() {
        let mut p = pod();
        p.dns_capture_all = false;
        p.nameservers = vec!["198.18.53.53".parse().unwrap()];
        let r = p.config().unwrap().restore().unwrap();
        assert!(r.v4.contains(
            "-A OUTPUT -d 198.18.53.53/32 -p udp --dport 53 -j REDIRECT --to-ports 15053"
        ));
        assert!(r.v4.contains("-A PREROUTING -s 198.18.53.53/32 -p udp --sport 53 -j CT --zone 1"));
        // No IPv6 resolver: no DNS rule at all for IPv6, TCP 53 included.
        let v6 = r.v6.unwrap();
        assert!(!v6.contains("--dport 53"), "{v6}");
        assert!(!v6.contains("* raw"));
        assert_eq!(p.weir_annotations()[keys::WEIR_DNS_SERVERS], "198.18.53.53");
        p.dns_enabled = false;
        let r = p.config().unwrap().restore().unwrap();
        assert!(!r.v4.contains("53"), "{}", r.v4);
        assert_eq!(p.weir_annotations()[keys::WEIR_DNS_CAPTURE], "false");
    }
}
