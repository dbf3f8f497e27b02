//! The meshes' own golden rule sets, read from
//! `../shared/reference/peers/` (relative to the project root; never
//! copied into the project), turned mechanically into `iptables-restore`
//! input, with the flags each was made with.
//!
//! - Istio: `istio-sidecar/*.golden`, made by
//!   `tools/istio-iptables/pkg/capture/run_test.go` (its cases are
//!   [`istio_cases`], transcribed flag by flag from `getCommonTestCases`
//!   and `constructTestConfig`). A golden file is the list of what
//!   `istio-iptables` ran with a stub for its dependencies: the
//!   `iptables-save` / `ip6tables-save` calls it makes to check the state,
//!   and the stdin of each `iptables-restore` / `ip6tables-restore` (`*
//!   table` ... `COMMIT` blocks, IPv4 first). [`istio_golden`] drops the
//!   save calls and splits the blocks by family: the IPv6 input starts
//!   where a table name comes round again.
//! - Kuma: `kuma/*.golden`, `iptables-save` output of `kumactl install
//!   transparent-proxy` run in a container, one file per family, with the
//!   loopback interface written `ifPlaceholder` (Kuma's test replaces the
//!   container's interface name); [`kuma_golden`] puts `lo` back.

use std::path::PathBuf;

use crate::istio_iptables::{CaptureConfig, InterceptionMode, Restore};

/// Environment variable that makes a missing reference file a skip
/// instead of a failure, outside CI.
const CI_ENVS: &[&str] = &["CI", crate::REQUIRE_KERNEL_TESTS_ENV];

/// `../shared/reference/peers` from the project root.
pub fn peers_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/reference/peers")
}

/// Reads a file of the peers' reference data. `None` (with a message)
/// when it is missing outside CI; under CI (`CI` or
/// `WEIR_REQUIRE_KERNEL_TESTS` set) a missing file is a failure.
pub fn read_peer_file(rel: &str) -> Option<String> {
    let p = peers_dir().join(rel);
    match std::fs::read_to_string(&p) {
        Ok(s) => Some(s),
        Err(e) => {
            if CI_ENVS.iter().any(|v| std::env::var_os(v).is_some()) {
                panic!(
                    "{}: {e}; the peers' reference data must be at ../shared/reference/peers \
                     from the project root",
                    p.display()
                );
            }
            eprintln!(
                "skipped: {} is missing ({e}); it is required under CI",
                p.display()
            );
            None
        }
    }
}

/// Splits an Istio golden file into the restore input of each family.
pub fn istio_golden(text: &str) -> Result<Restore, String> {
    let mut groups: Vec<Vec<String>> = vec![Vec::new()];
    let mut seen_tables: Vec<String> = Vec::new();
    let mut in_block = false;
    let mut saw_v6_save_after = false;
    let mut restored = false;
    for line in text.lines() {
        let l = line.trim_end();
        if l.trim().is_empty() {
            continue;
        }
        if !in_block && (l == "iptables-save" || l == "ip6tables-save") {
            if restored && l == "ip6tables-save" {
                saw_v6_save_after = true;
            }
            continue;
        }
        if let Some(t) = l.strip_prefix('*') {
            let name = t.trim().to_string();
            if seen_tables.contains(&name) {
                // The same table again: the next family's input.
                groups.push(Vec::new());
                seen_tables.clear();
            }
            seen_tables.push(name);
            in_block = true;
        } else if !in_block {
            return Err(format!("unexpected line outside a restore block: {l:?}"));
        }
        groups.last_mut().expect("one group").push(l.to_string());
        if l == "COMMIT" {
            in_block = false;
            restored = true;
        }
    }
    if in_block {
        return Err("a block without COMMIT".into());
    }
    let text_of = |g: Vec<String>| {
        let mut s = g.join("\n");
        s.push('\n');
        s
    };
    match groups.len() {
        1 => {
            if saw_v6_save_after {
                return Err("ip6tables-save after the rules but no IPv6 rules".into());
            }
            Ok(Restore {
                v4: text_of(groups.remove(0)),
                v6: None,
            })
        }
        2 => {
            if !saw_v6_save_after {
                return Err("IPv6 rules but no final ip6tables-save".into());
            }
            let v6 = text_of(groups.remove(1));
            Ok(Restore {
                v4: text_of(groups.remove(0)),
                v6: Some(v6),
            })
        }
        n => Err(format!("{n} groups of restore blocks (expected 1 or 2)")),
    }
}

/// A Kuma golden file (`iptables-save` output) as restore input: the
/// loopback placeholder back to `lo`.
pub fn kuma_golden(text: &str) -> String {
    text.replace("ifPlaceholder", "lo")
}

/// One case of `run_test.go`: the golden's name and the configuration
/// `istio-iptables` ran with.
#[derive(Clone, Debug)]
pub struct IstioCase {
    /// The golden file's name without `.golden`.
    pub name: &'static str,
    /// `istio-iptables`' configuration.
    pub config: CaptureConfig,
}

/// `constructTestConfig()` of `run_test.go`: every list empty (so no
/// inbound capture and no outbound CIDR rule unless a case sets them),
/// proxy UID and GID 1337, IPv4 only.
fn test_base() -> CaptureConfig {
    CaptureConfig {
        proxy_port: "15001".into(),
        inbound_capture_port: "15006".into(),
        inbound_tunnel_port: "15008".into(),
        proxy_uid: "1337".into(),
        proxy_gid: "1337".into(),
        interception_mode: InterceptionMode::Redirect,
        inbound_ports_include: String::new(),
        inbound_ports_exclude: String::new(),
        outbound_ip_ranges_include: String::new(),
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

/// The 27 cases of `run_test.go` (`getCommonTestCases`), in its order.
pub fn istio_cases() -> Vec<IstioCase> {
    let s = |v: &str| v.to_string();
    let mut v = Vec::new();
    let mut case = |name: &'static str, f: &dyn Fn(&mut CaptureConfig)| {
        let mut config = test_base();
        f(&mut config);
        v.push(IstioCase { name, config });
    };
    case("ipv6-empty-inbound-ports", &|c| {
        c.inbound_ports_include = s("");
        c.enable_ipv6 = true;
    });
    case("ip-range", &|c| {
        c.outbound_ip_ranges_exclude = s("1.1.0.0/16");
        c.outbound_ip_ranges_include = s("9.9.0.0/16");
        c.redirect_dns = true;
        c.enable_ipv6 = false;
        c.proxy_gid = s("1,2");
        c.proxy_uid = s("3,4");
        c.dns_servers_v4 = vec![s("127.0.0.53")];
    });
    case("tproxy", &|c| {
        c.interception_mode = InterceptionMode::Tproxy;
        c.inbound_ports_include = s("*");
        c.outbound_ip_ranges_exclude = s("1.1.0.0/16");
        c.outbound_ip_ranges_include = s("9.9.0.0/16");
        c.redirect_dns = true;
        c.dns_servers_v4 = vec![s("127.0.0.53")];
        c.proxy_gid = s("1337");
        c.proxy_uid = s("1337");
        c.exclude_interfaces = s("not-istio-nic");
        c.enable_ipv6 = true;
    });
    case("ipv6-inbound-ports", &|c| {
        c.inbound_ports_include = s("4000,5000");
        c.enable_ipv6 = true;
    });
    case("ipv6-virt-interfaces", &|c| {
        c.inbound_ports_include = s("4000,5000");
        c.reroute_virtual_interfaces = s("eth0,eth1");
        c.enable_ipv6 = true;
    });
    case("ipv6-ipnets", &|c| {
        c.inbound_ports_include = s("4000,5000");
        c.inbound_ports_exclude = s("6000,7000,");
        c.reroute_virtual_interfaces = s("eth0,eth1");
        c.outbound_ip_ranges_exclude = s("2001:db8::/32");
        c.outbound_ip_ranges_include = s("2001:db8::/32");
        c.enable_ipv6 = true;
    });
    case("ipv6-uid-gid", &|c| {
        c.inbound_ports_include = s("4000,5000");
        c.inbound_ports_exclude = s("6000,7000");
        c.reroute_virtual_interfaces = s("eth0,eth1");
        c.proxy_gid = s("1,2");
        c.proxy_uid = s("3,4");
        c.enable_ipv6 = true;
        c.outbound_ip_ranges_exclude = s("2001:db8::/32");
        c.outbound_ip_ranges_include = s("2001:db8::/32");
    });
    case("ipv6-outbound-ports", &|c| {
        c.inbound_ports_include = s("");
        c.outbound_ports_include = s("32000,31000");
        c.enable_ipv6 = true;
    });
    case("empty", &|_| {});
    case("kube-virt-interfaces", &|c| {
        c.reroute_virtual_interfaces = s("eth1,eth2");
        c.outbound_ip_ranges_include = s("*");
    });
    case("ipnets", &|c| {
        c.outbound_ip_ranges_include = s("10.0.0.0/8");
    });
    case("ipnets-with-kube-virt-interfaces", &|c| {
        c.reroute_virtual_interfaces = s("eth1,eth2");
        c.outbound_ip_ranges_include = s("10.0.0.0/8");
    });
    case("inbound-ports-include", &|c| {
        c.inbound_ports_include = s("32000,31000");
    });
    case("inbound-ports-wildcard", &|c| {
        c.inbound_ports_include = s("*");
    });
    case("inbound-ports-tproxy", &|c| {
        c.inbound_ports_include = s("32000,31000");
        c.interception_mode = InterceptionMode::Tproxy;
    });
    case("inbound-ports-wildcard-tproxy", &|c| {
        c.inbound_ports_include = s("*");
        c.interception_mode = InterceptionMode::Tproxy;
    });
    case("dns-uid-gid", &|c| {
        c.redirect_dns = true;
        c.dns_servers_v4 = vec![s("127.0.0.53")];
        c.dns_servers_v6 = vec![s("::127.0.0.53")];
        c.proxy_gid = s("1,2");
        c.proxy_uid = s("3,4");
        c.enable_ipv6 = true;
    });
    case("ipv6-dns-uid-gid", &|c| {
        c.enable_ipv6 = true;
        c.redirect_dns = true;
        c.proxy_gid = s("1,2");
        c.proxy_uid = s("3,4");
    });
    case("outbound-owner-groups", &|c| {
        c.owner_groups_include = s("java,202");
    });
    case("outbound-owner-groups-exclude", &|c| {
        c.owner_groups_exclude = s("888,ftp");
    });
    case("ipv6-dns-outbound-owner-groups", &|c| {
        c.enable_ipv6 = true;
        c.redirect_dns = true;
        c.owner_groups_include = s("java,202");
    });
    case("ipv6-dns-outbound-owner-groups-exclude", &|c| {
        c.enable_ipv6 = true;
        c.redirect_dns = true;
        c.owner_groups_exclude = s("888,ftp");
    });
    case("outbound-ports-include", &|c| {
        c.outbound_ports_include = s("32000,31000");
    });
    case("loopback-outbound-iprange", &|c| {
        c.outbound_ip_ranges_include = s("127.1.2.3/32");
        c.redirect_dns = true;
        c.dns_servers_v4 = vec![s("127.0.0.53")];
        c.enable_ipv6 = false;
        c.proxy_gid = s("1,2");
        c.proxy_uid = s("3,4");
    });
    case("basic-exclude-nic", &|c| {
        c.exclude_interfaces = s("not-istio-nic");
    });
    case("drop-invalid", &|c| {
        c.drop_invalid = true;
    });
    case("host-ipv4-loopback-cidr", &|c| {
        c.host_ipv4_loopback_cidr = s("127.0.0.1/8");
    });
    v
}

/// Kuma's goldens the generator claims (`kumactl install
/// transparent-proxy` without flags), with the generator's equivalent
/// configuration.
pub const KUMA_DEFAULT_GOLDENS: &[(&str, &str)] = &[
    (
        "debian-12-default.iptables-nft.golden",
        "debian-12-default.ip6tables-nft.golden",
    ),
    (
        "debian-12.iptables-nft.golden",
        "debian-12.ip6tables-nft.golden",
    ),
];

#[cfg(test)]
mod tests {
    use super::*;
    use crate::iptables_model::Ruleset;
    use crate::kuma_iptables::KumaConfig;

    fn lines(s: &str) -> Vec<&str> {
        s.lines()
            .map(str::trim_end)
            .filter(|l| !l.is_empty())
            .collect()
    }

    /// Every golden file of istio-sidecar/ is one of run_test.go's cases,
    /// and the generator writes each of them line for line, per family.
    #[test]
    fn generator_reproduces_every_istio_golden() {
        let cases = istio_cases();
        assert_eq!(cases.len(), 27, "run_test.go has 27 cases");
        let Ok(dir) = std::fs::read_dir(peers_dir().join("istio-sidecar")) else {
            assert!(read_peer_file("istio-sidecar/run_test.go").is_none());
            return;
        };
        let mut files: Vec<String> = dir
            .filter_map(|e| e.ok())
            .filter_map(|e| {
                e.file_name()
                    .to_str()
                    .and_then(|n| n.strip_suffix(".golden"))
                    .map(str::to_string)
            })
            .collect();
        files.sort();
        let mut names: Vec<String> = cases.iter().map(|c| c.name.to_string()).collect();
        names.sort();
        assert_eq!(files, names, "golden files and run_test.go's cases");
        let mut failures = Vec::new();
        for c in &cases {
            let text = read_peer_file(&format!("istio-sidecar/{}.golden", c.name)).unwrap();
            let golden = istio_golden(&text).unwrap_or_else(|e| panic!("{}: {e}", c.name));
            let ours = c
                .config
                .restore()
                .unwrap_or_else(|e| panic!("{}: {e}", c.name));
            for (fam, g, o) in [
                ("IPv4", Some(golden.v4.as_str()), Some(ours.v4.as_str())),
                ("IPv6", golden.v6.as_deref(), ours.v6.as_deref()),
            ] {
                if g.map(lines) != o.map(lines) {
                    failures.push(format!(
                        "{} ({fam}):\n--- golden\n{}\n--- generator\n{}",
                        c.name,
                        g.unwrap_or("(none)"),
                        o.unwrap_or("(none)")
                    ));
                }
                // The model reads both alike (what the property test and
                // the differential rely on).
                if let (Some(g), Some(o)) = (g, o) {
                    let (g, o) = (Ruleset::parse(g).unwrap(), Ruleset::parse(o).unwrap());
                    assert!(g.diff(&o).is_empty() || !failures.is_empty());
                }
            }
        }
        assert!(
            failures.is_empty(),
            "the generator differs from {} of Istio's goldens:\n{}",
            failures.len(),
            failures.join("\n\n")
        );
    }

    /// The splitter: save calls dropped, families split where the tables
    /// start over, and the final ip6tables-save must agree.
    #[test]
    fn istio_golden_splitting() {
        let two = "iptables-save\nip6tables-save\n* nat\n-A OUTPUT -j X\nCOMMIT\n* raw\nCOMMIT\n\
                   * nat\n-A OUTPUT -j Y\nCOMMIT\niptables-save\nip6tables-save\n";
        let r = istio_golden(two).unwrap();
        assert_eq!(r.v4, "* nat\n-A OUTPUT -j X\nCOMMIT\n* raw\nCOMMIT\n");
        assert_eq!(r.v6.as_deref(), Some("* nat\n-A OUTPUT -j Y\nCOMMIT\n"));
        let one = "iptables-save\nip6tables-save\n* nat\nCOMMIT\niptables-save\n";
        assert_eq!(istio_golden(one).unwrap().v6, None);
        assert!(
            istio_golden("iptables-save\n* nat\nCOMMIT\n* nat\nCOMMIT\niptables-save\n").is_err()
        );
        assert!(istio_golden("* nat\n-A OUTPUT -j X\n").is_err());
    }

    /// Kuma's default goldens (both families) are, rule for rule, what the
    /// generator writes for `kumactl install transparent-proxy` without
    /// flags: no DNS redirection, no excluded port, dual stack.
    #[test]
    fn generator_reproduces_kuma_default_goldens() {
        let cfg = KumaConfig {
            kuma_dp_uid: 5678,
            inbound_port: 15006,
            outbound_port: 15001,
            dns_port: 15053,
            inbound_exclude_ports: Vec::new(),
            outbound_exclude_ports: Vec::new(),
            outbound_exclude_ips: Vec::new(),
            inbound_exclude_ips: Vec::new(),
            dns_enabled: false,
            dns_capture_all: false,
            nameservers: Vec::new(),
            ipv6: true,
        };
        let ours = cfg.restore().unwrap();
        for (v4, v6) in KUMA_DEFAULT_GOLDENS {
            for (file, o) in [
                (v4, ours.v4.as_str()),
                (v6, ours.get(crate::istio_iptables::Family::V6)),
            ] {
                let Some(text) = read_peer_file(&format!("kuma/{file}")) else {
                    return;
                };
                let g = Ruleset::parse(&kuma_golden(&text)).unwrap();
                let o = Ruleset::parse(o).unwrap();
                let d = g.diff(&o);
                assert!(d.is_empty(), "{file}:\n{}", d.join("\n"));
            }
        }
    }
}
