//! Differential test: weir against the iptables rules the meshes' init
//! containers write (`istio-iptables`, Linkerd's `linkerd-init`, Kuma's
//! `kuma-init`), connection by connection.
//!
//! For every configuration of the table ([`cases`]) two identical "worlds"
//! are built side by side, each a pod network namespace joined by two veths
//! (`eth0`, `net1`) to a peer namespace that holds the remote services:
//!
//! - in the **iptables** world the pod gets the exact `iptables-restore` /
//!   `ip6tables-restore` input the mesh's init container would apply for
//!   the pod ([`IstioPod::capture_config`], [`LinkerdPod::proxy_init`],
//!   [`KumaPod::config`], and their `restore()`) and its processes run
//!   outside weir's cgroup;
//! - in the **weir** world the pod is a Pod object as the mesh's injector
//!   writes it (`MeshPod::pod_object`: the mesh's containers, their
//!   environment, the annotations), served by a fake API server to
//!   `weir run --kubernetes`, so it goes through the agent's
//!   classification; its processes run in the pod's cgroup under the node
//!   cgroup weir is attached to (`WEIR_DIFF_PODS_FILE=1`: the pods file
//!   with `mesh:` and `weir_annotations()` instead).
//!
//! Besides the configurations written for weir, the meshes' own golden
//! rule sets (`../shared/reference/peers/`) are applied as they are in the
//! iptables world ([`golden_cases`]).
//!
//! Both worlds run the same sidecar (the mesh's proxy UID and ports:
//! Istio 1337, 15001/15006; Linkerd 2102, 4140/4143; Kuma 5678,
//! 15001/15006), the same application echo servers and the same peer
//! services, use the same addresses, and get the same matrix of
//! connections ([`matrix`]):
//! application, proxy, proxy-GID-only and other identities; loopback,
//! 127.0.0.6 sources, the pod's own addresses, remote addresses in and out
//! of the configured ranges and ports, IPv4, IPv6 and IPv4-mapped, DNS over
//! TCP and UDP; inbound connections from the peer to included and excluded
//! ports (and the other meshes' own ports). Every outcome
//! is reduced to what a proxy and an application can observe (which
//! listener accepted, `SO_ORIGINAL_DST`, the addresses the application
//! saw; ephemeral ports replaced by the role of the socket that owns them)
//! and must be identical, except for the deliberate deviations documented in
//! `docs/differential.md` (normalised here, and counted).
//!
//! `cargo test -p weir-tests --test differential -- --nocapture` prints the
//! whole matrix; on failure the differing rows are in the panic message.

mod k8s_support;

use std::fmt::Write as _;
use std::io::Write as _;
use std::net::IpAddr;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use std::collections::BTreeMap;

use serde_json::{Value, json};
use weir_tests::fake_api::FakeApi;
use weir_tests::goldens::{self, IstioCase};
use weir_tests::istio_iptables::{Family, IstioPod, Restore, keys};
use weir_tests::kuma_iptables::{self, KumaPod};
use weir_tests::linkerd_iptables::{self, LinkerdPod};
use weir_tests::node::{Node, PodEntry, sidecar_log};
use weir_tests::{
    Cgroup, NetNs, Proc, TempDir, Veth, require_root, spawn_in, testkit_command, veth_named,
};

// ---------------------------------------------------------------------------
// The configurations
// ---------------------------------------------------------------------------

/// What to do with a configuration.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
enum Status {
    /// Outcomes must be identical (up to the documented deviations).
    Compare,
    /// weir does not implement this yet: run both worlds and report the
    /// differences, without failing. Enabling it is changing the status.
    /// (No option is pending at the moment; kept for the next one.)
    #[allow(dead_code)]
    Pending(&'static str),
    /// A documented, deliberate deviation: run, report, do not fail.
    /// (No configuration needs it at the moment.)
    #[allow(dead_code)]
    Deviation(&'static str),
    /// Not run at all.
    Skip(&'static str),
}

// Options weir gained (or will gain) after the rest: each status is one
// line; `Status::Pending` runs the configurations and reports without
// failing, `Status::Compare` holds weir to them.

/// DNS capture (`ISTIO_META_DNS_CAPTURE`, `CAPTURE_ALL_DNS`).
const DNS_STATUS: Status = Status::Compare;
/// Owner groups (`ISTIO_OUTBOUND_OWNER_GROUPS[_EXCLUDE]`).
const OWNER_GROUPS_STATUS: Status = Status::Compare;
/// `traffic.sidecar.istio.io/excludeInterfaces`.
const EXCLUDE_INTERFACES_STATUS: Status = Status::Compare;
/// `istio.io/reroute-virtual-interfaces`.
const REROUTE_VIRTUAL_INTERFACES_STATUS: Status = Status::Compare;

/// A configuration's pod, in its mesh's own terms: what the user wrote
/// (annotations, proxy UID, proxy metadata, the cluster's mesh settings).
#[derive(Clone, Debug)]
enum MeshPod {
    Istio(IstioPod),
    Linkerd(LinkerdPod),
    Kuma(KumaPod),
    /// One of Istio's golden files (istio-sidecar/NAME.golden) applied as
    /// it is: the iptables world gets the golden's rules, weir the pod
    /// whose annotations give `istio-iptables` the golden's flags.
    IstioGolden(Box<IstioCase>),
    /// Kuma's golden files (IPv4, IPv6) applied as they are, and the Kuma
    /// pod (annotations and ConfigMap) with the same configuration.
    KumaGolden(KumaPod, &'static str, &'static str),
}

/// Reads a golden file of the peers' reference data (a missing file fails
/// the suite: this test only runs as root, under `cargo xtask test`).
fn peer_file(rel: &str) -> String {
    goldens::read_peer_file(rel).unwrap_or_else(|| {
        panic!("{rel}: the differential compares against the peers' golden files")
    })
}

/// What the mesh's init container does to a pod.
struct Capture {
    /// Its command line (for the report).
    command_line: String,
    /// The restore input, or why the init container fails.
    restore: Result<Restore, String>,
    /// `ip` commands besides the rules.
    ip_commands: Vec<Vec<String>>,
}

/// The mesh's ports and proxy identity, as the sidecar stand-in uses them.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
struct MeshPorts {
    mesh: &'static str,
    outbound: u16,
    inbound: u16,
    /// The proxy's UID.
    proxy_uid: u32,
    /// The UID of the DNS proxy stand-in (Istio's agent, kuma-dp).
    dns_uid: u32,
    /// A golden's configuration: the rows for the goldens' own ranges and
    /// ports run too.
    golden: bool,
}

/// The proxy's UID in one of Istio's goldens (the first of `-u`).
fn golden_proxy_uid(c: &IstioCase) -> u32 {
    c.config
        .proxy_uid
        .split(',')
        .next()
        .and_then(|u| u.trim().parse().ok())
        .expect("numeric proxy UID")
}

impl MeshPod {
    /// The init container's work; `None` when there is none (Istio's
    /// interception mode `NONE`).
    fn capture(&self) -> Option<Capture> {
        match self {
            MeshPod::Istio(p) => p.capture_config().map(|c| Capture {
                command_line: c.command_line(),
                restore: c.restore().map_err(|e| e.to_string()),
                ip_commands: c.ip_commands(),
            }),
            MeshPod::Linkerd(p) => {
                let c = p.proxy_init();
                Some(Capture {
                    command_line: c.command_line(),
                    restore: c.restore().map_err(|e| e.to_string()),
                    ip_commands: c.ip_commands(),
                })
            }
            MeshPod::IstioGolden(c) => {
                let file = format!("istio-sidecar/{}.golden", c.name);
                Some(Capture {
                    command_line: format!("{file} ({})", c.config.command_line()),
                    restore: goldens::istio_golden(&peer_file(&file)),
                    // The goldens hold the rules only; istio-iptables' `ip`
                    // commands (`::6` on lo with IPv6) are the generator's.
                    ip_commands: c.config.ip_commands(),
                })
            }
            MeshPod::KumaGolden(p, v4, v6) => {
                let cfg = p.config().expect("the Kuma golden's pod");
                Some(Capture {
                    command_line: format!("kuma/{v4}, kuma/{v6} ({})", cfg.command_line()),
                    restore: Ok(Restore {
                        v4: goldens::kuma_golden(&peer_file(&format!("kuma/{v4}"))),
                        v6: Some(goldens::kuma_golden(&peer_file(&format!("kuma/{v6}")))),
                    }),
                    ip_commands: cfg.ip_commands(),
                })
            }
            MeshPod::Kuma(p) => Some(match p.config() {
                Ok(c) => Capture {
                    command_line: c.command_line(),
                    restore: c.restore().map_err(|e| e.to_string()),
                    ip_commands: c.ip_commands(),
                },
                Err(e) => Capture {
                    command_line: "kumactl install transparent-proxy (refused)".into(),
                    restore: Err(e.to_string()),
                    ip_commands: Vec::new(),
                },
            }),
        }
    }

    fn weir_annotations(&self) -> BTreeMap<String, String> {
        match self {
            MeshPod::Istio(p) => p.weir_annotations(),
            MeshPod::Linkerd(p) => p.weir_annotations(),
            MeshPod::Kuma(p) | MeshPod::KumaGolden(p, ..) => p.weir_annotations(),
            MeshPod::IstioGolden(c) => {
                let mut a = c
                    .config
                    .weir_annotations()
                    .unwrap_or_else(|e| panic!("{}: weir cannot express it: {e}", c.name));
                // IPv6 rules: the injector's ISTIO_DUAL_STACK (proxy
                // metadata, next to the DNS capture switch if any).
                if c.config.enable_ipv6 {
                    let mut cfg: Value = a
                        .get(keys::PROXY_CONFIG)
                        .map(|v| serde_json::from_str(v).expect("proxy config is JSON"))
                        .unwrap_or_else(|| serde_json::json!({"proxyMetadata": {}}));
                    cfg["proxyMetadata"][keys::META_DUAL_STACK] = "true".into();
                    a.insert(keys::PROXY_CONFIG.into(), cfg.to_string());
                }
                a
            }
        }
    }

    /// Whether weir's classification meshes the pod (Istio's
    /// interceptionMode NONE is left alone).
    fn meshed(&self) -> bool {
        !matches!(self, MeshPod::Istio(p) if p.annotations.get(keys::INTERCEPTION_MODE).map(|m| m.trim()) == Some("NONE"))
    }

    /// The Pod object as the API server serves it after the mesh's
    /// injector (with weir in place of the init container: no
    /// `istio-init`/`linkerd-init`/`kuma-init`): the mesh's containers and
    /// their environment, the injector's status annotation, the user's
    /// annotations, and `weir.dev/*` only for what has no annotation (a
    /// list of proxy UIDs/GIDs, the resolvers, the cluster's mesh
    /// settings that the pod does not show).
    fn pod_object(&self, name: &str, uid: &str, ips: &[String]) -> Value {
        let app = json!({"name": "app", "image": "app:1"});
        let env = |m: &BTreeMap<String, String>| -> Vec<Value> {
            m.iter()
                .map(|(k, v)| json!({"name": k, "value": v}))
                .collect()
        };
        let (annotations, containers, init): (BTreeMap<String, String>, Vec<Value>, Vec<Value>) =
            match self {
                MeshPod::Istio(_) | MeshPod::IstioGolden(_) => {
                    let (meta, uid) = match self {
                        MeshPod::Istio(p) => (
                            p.proxy_metadata.clone(),
                            p.proxy_uid.clone().unwrap_or_else(|| "1337".into()),
                        ),
                        MeshPod::IstioGolden(c) => {
                            let mut m = BTreeMap::new();
                            if c.config.enable_ipv6 {
                                m.insert(keys::META_DUAL_STACK.to_string(), "true".to_string());
                            }
                            if c.config.redirect_dns {
                                m.insert(keys::META_DNS_CAPTURE.to_string(), "true".to_string());
                            }
                            (m, c.config.proxy_uid.clone())
                        }
                        _ => unreachable!(),
                    };
                    let run_as: u32 = uid
                        .split(',')
                        .next()
                        .and_then(|u| u.parse().ok())
                        .unwrap_or(1337);
                    let mut a = self.weir_annotations();
                    // One proxy UID is the istio-proxy container's
                    // runAsUser (and istio-init's -u), its GID the same or
                    // PROXY_GID from the environment: no weir annotation.
                    // Only a list of UIDs needs weir.dev/proxy-uids.
                    let gids_from_pod = match self {
                        MeshPod::IstioGolden(c) => c.config.effective_gids() == uid,
                        _ => true,
                    };
                    if !uid.contains(',') && gids_from_pod {
                        a.remove(keys::WEIR_PROXY_UIDS);
                        a.remove(keys::WEIR_PROXY_GIDS);
                    }
                    a.insert(
                        "sidecar.istio.io/status".into(),
                        r#"{"initContainers":["istio-validation"],"containers":["istio-proxy"],"volumes":["istio-envoy"],"revision":"default"}"#.into(),
                    );
                    let proxy = json!({
                        "name": "istio-proxy", "image": "docker.io/istio/proxyv2:1.24.0",
                        "args": ["proxy", "sidecar", "--domain", "$(POD_NAMESPACE).svc.cluster.local"],
                        "env": env(&meta),
                        "securityContext": {"runAsUser": run_as, "runAsGroup": run_as}
                    });
                    let validation = json!({
                        "name": "istio-validation", "image": "docker.io/istio/proxyv2:1.24.0",
                        "args": ["istio-iptables", "--run-validation", "--skip-rule-apply"]
                    });
                    (a, vec![app, proxy], vec![validation])
                }
                MeshPod::Linkerd(p) => {
                    // The injector sets the proxy's IPv6 listeners exactly
                    // when the cluster's disableIPv6 is false.
                    let listen = if p.ipv6 {
                        "127.0.0.1:4140,[::1]:4140"
                    } else {
                        "127.0.0.1:4140"
                    };
                    let mut m = BTreeMap::new();
                    m.insert(
                        "LINKERD2_PROXY_OUTBOUND_LISTEN_ADDRS".to_string(),
                        listen.to_string(),
                    );
                    let proxy = json!({"name": "linkerd-proxy", "image": "cr.l5d.io/linkerd/proxy:stable", "env": env(&m)});
                    (p.annotations.clone(), vec![app, proxy], Vec::new())
                }
                MeshPod::Kuma(p) | MeshPod::KumaGolden(p, ..) => {
                    let sidecar = json!({"name": "kuma-sidecar", "image": "kumahq/kuma-dp:2.9"});
                    (p.weir_annotations(), vec![app, sidecar], Vec::new())
                }
            };
        json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": name, "namespace": "default", "uid": uid,
                         "labels": {"app": name}, "annotations": annotations},
            "spec": {"nodeName": "node-a", "containers": containers, "initContainers": init},
            "status": {"phase": "Running",
                       "podIPs": ips.iter().map(|ip| json!({"ip": ip})).collect::<Vec<_>>()}
        })
    }

    /// Whether the pod reroutes a virtual interface (the VM rows run).
    fn has_vm(&self) -> bool {
        match self {
            MeshPod::Istio(p) => p
                .annotations
                .get(keys::REROUTE_VIRTUAL_INTERFACES)
                .is_some_and(|v| !v.trim().is_empty()),
            _ => false,
        }
    }

    /// `mesh:` of the pods-file entry (`None`: the default, Istio).
    fn weir_mesh(&self) -> Option<String> {
        match self {
            MeshPod::Istio(_) | MeshPod::IstioGolden(_) => None,
            MeshPod::Linkerd(_) => Some("linkerd".into()),
            MeshPod::Kuma(_) | MeshPod::KumaGolden(..) => Some("kuma".into()),
        }
    }

    fn ports(&self) -> MeshPorts {
        match self {
            MeshPod::Istio(_) => MeshPorts {
                mesh: "istio",
                outbound: 15001,
                inbound: 15006,
                proxy_uid: 1337,
                dns_uid: 1337,
                golden: false,
            },
            MeshPod::IstioGolden(c) => {
                let uid = golden_proxy_uid(c);
                MeshPorts {
                    mesh: "istio",
                    outbound: 15001,
                    inbound: 15006,
                    proxy_uid: uid,
                    dns_uid: uid,
                    golden: true,
                }
            }
            MeshPod::Linkerd(p) => MeshPorts {
                mesh: "linkerd",
                outbound: linkerd_iptables::OUTBOUND_PORT,
                inbound: linkerd_iptables::INBOUND_PORT,
                proxy_uid: p.proxy_uid(),
                dns_uid: p.proxy_uid(),
                golden: false,
            },
            MeshPod::Kuma(_) | MeshPod::KumaGolden(..) => MeshPorts {
                mesh: "kuma",
                outbound: kuma_iptables::OUTBOUND_PORT,
                inbound: kuma_iptables::INBOUND_PORT,
                proxy_uid: kuma_iptables::KUMA_DP_UID,
                dns_uid: kuma_iptables::KUMA_DP_UID,
                golden: matches!(self, MeshPod::KumaGolden(..)),
            },
        }
    }
}

/// One row of the configuration table.
struct Case {
    name: &'static str,
    pod: MeshPod,
    /// Whether the pod has IPv6 addresses.
    ipv6: bool,
    /// The UID the sidecar runs as (the proxy's first UID).
    sidecar_uid: u32,
    status: Status,
}

const POD4: &str = "198.18.0.1";
const POD6: &str = "2001:2::1";
const RESOLVER4: &str = "198.18.53.53";
const RESOLVER6: &str = "2001:2:0:53::53";

fn case(name: &'static str, f: impl FnOnce(IstioPod) -> IstioPod) -> Case {
    let addrs: Vec<IpAddr> = [POD4, POD6].iter().map(|a| a.parse().unwrap()).collect();
    let pod = IstioPod::new(&addrs).meta(keys::META_DUAL_STACK, "true");
    Case {
        name,
        pod: MeshPod::Istio(f(pod)),
        ipv6: true,
        sidecar_uid: 1337,
        status: Status::Compare,
    }
}

/// A dual-stack pod meshed by Linkerd (the cluster's defaults, so no IPv6
/// rules unless `f` asks for them).
fn linkerd_case(name: &'static str, f: impl FnOnce(LinkerdPod) -> LinkerdPod) -> Case {
    let pod = f(LinkerdPod::new());
    Case {
        name,
        sidecar_uid: pod.proxy_uid(),
        pod: MeshPod::Linkerd(pod),
        ipv6: true,
        status: Status::Compare,
    }
}

/// A dual-stack pod meshed by Kuma on Kubernetes (the Helm chart's
/// defaults), with the suite's resolvers.
fn kuma_case(name: &'static str, f: impl FnOnce(KumaPod) -> KumaPod) -> Case {
    let addrs: Vec<IpAddr> = [POD4, POD6].iter().map(|a| a.parse().unwrap()).collect();
    let mut pod = KumaPod::new(&addrs);
    pod.nameservers = [RESOLVER4, RESOLVER6]
        .iter()
        .map(|a| a.parse().unwrap())
        .collect();
    Case {
        name,
        pod: MeshPod::Kuma(f(pod)),
        ipv6: true,
        sidecar_uid: kuma_iptables::KUMA_DP_UID,
        status: Status::Compare,
    }
}

impl Case {
    fn status(mut self, s: Status) -> Self {
        self.status = s;
        self
    }
}

/// The configuration table: every `istio-iptables` option, alone and in
/// the combinations whose rule order matters.
fn cases() -> Vec<Case> {
    use keys::*;
    let resolvers: Vec<IpAddr> = [RESOLVER4, RESOLVER6]
        .iter()
        .map(|a| a.parse().unwrap())
        .collect();
    vec![
        case("defaults", |p| p),
        {
            let mut c = case("ipv4-only", |p| {
                let mut p = p;
                p.addresses.retain(IpAddr::is_ipv4);
                p.proxy_metadata.remove(META_DUAL_STACK);
                p
            });
            c.ipv6 = false;
            c
        },
        case("include-cidrs", |p| {
            p.annotate(
                INCLUDE_OUTBOUND_IP_RANGES,
                "198.18.10.0/24,2001:2:0:10::/64",
            )
        }),
        case("include-empty", |p| {
            p.annotate(INCLUDE_OUTBOUND_IP_RANGES, "")
        }),
        case("exclude-cidrs", |p| {
            p.annotate(
                EXCLUDE_OUTBOUND_IP_RANGES,
                "198.18.11.0/24,2001:2:0:11::/64",
            )
        }),
        case("include-exclude-overlap", |p| {
            p.annotate(INCLUDE_OUTBOUND_IP_RANGES, "198.18.0.0/16,2001:2::/48")
                .annotate(
                    EXCLUDE_OUTBOUND_IP_RANGES,
                    "198.18.10.1/32,2001:2:0:10::1/128,198.18.10.0/24",
                )
        }),
        case("include-host-routes", |p| {
            p.annotate(
                INCLUDE_OUTBOUND_IP_RANGES,
                "198.18.10.1/32,,2001:2:0:10::1/128,",
            )
        }),
        case("include-zero-prefix", |p| {
            p.annotate(INCLUDE_OUTBOUND_IP_RANGES, "0.0.0.0/0,::/0")
        }),
        case("exclude-zero-prefix", |p| {
            p.annotate(EXCLUDE_OUTBOUND_IP_RANGES, "0.0.0.0/0,::/0")
        }),
        case("include-loopback-range", |p| {
            p.annotate(INCLUDE_OUTBOUND_IP_RANGES, "127.0.0.0/8,198.18.10.0/24")
        }),
        case("include-loopback-host-bits", |p| {
            // The address as written is loopback, the range (0.0.0.0/1) is
            // not: istio-iptables looks at the address.
            p.annotate(INCLUDE_OUTBOUND_IP_RANGES, "127.0.0.1/1,198.18.10.0/24")
        }),
        case("exclude-outbound-ports", |p| {
            p.annotate(EXCLUDE_OUTBOUND_PORTS, "3306,8080")
        }),
        case("include-outbound-ports-only", |p| {
            p.annotate(INCLUDE_OUTBOUND_IP_RANGES, "")
                .annotate(INCLUDE_OUTBOUND_PORTS, "3306")
        }),
        case("ports-and-cidrs", |p| {
            p.annotate(
                INCLUDE_OUTBOUND_IP_RANGES,
                "198.18.10.0/24,2001:2:0:10::/64",
            )
            .annotate(INCLUDE_OUTBOUND_PORTS, "8080,53")
            .annotate(EXCLUDE_OUTBOUND_PORTS, "3306")
            .annotate(EXCLUDE_OUTBOUND_IP_RANGES, "198.18.0.2/32")
        }),
        case("include-inbound-ports", |p| {
            p.annotate(INCLUDE_INBOUND_PORTS, "8080,15008,15020")
        }),
        case("include-inbound-empty", |p| {
            p.annotate(INCLUDE_INBOUND_PORTS, "")
        }),
        case("exclude-inbound-ports", |p| {
            p.annotate(EXCLUDE_INBOUND_PORTS, "9090,7070,")
        }),
        case("status-port", |p| p.annotate(STATUS_PORT, "15030")),
        case("status-port-zero", |p| {
            p.annotate(STATUS_PORT, "0")
                .annotate(EXCLUDE_INBOUND_PORTS, "9090")
        }),
        case("proxy-uid-list", |p| IstioPod {
            proxy_uid: Some("1337,1338".into()),
            ..p
        }),
        case("proxy-gid-list", |p| p.meta(META_PROXY_GID, "1337,3000")),
        {
            let mut c = case("proxy-uid-other", |p| IstioPod {
                proxy_uid: Some("1338".into()),
                ..p
            });
            c.sidecar_uid = 1338;
            c
        },
        case("interception-none", |p| {
            p.annotate(INTERCEPTION_MODE, "NONE")
        }),
        case("everything-redirect", |p| {
            IstioPod {
                proxy_uid: Some("1337,1338".into()),
                ..p
            }
            .meta(META_PROXY_GID, "1337,3000")
            .annotate(INCLUDE_OUTBOUND_IP_RANGES, "198.18.0.0/15,2001:2::/48")
            .annotate(
                EXCLUDE_OUTBOUND_IP_RANGES,
                "198.18.11.0/24,2001:2:0:11::/64",
            )
            .annotate(INCLUDE_OUTBOUND_PORTS, "53")
            .annotate(EXCLUDE_OUTBOUND_PORTS, "3306")
            .annotate(INCLUDE_INBOUND_PORTS, "*")
            .annotate(EXCLUDE_INBOUND_PORTS, "9090")
            .annotate(STATUS_PORT, "15030")
        }),
        case("dns-capture", |p| {
            IstioPod {
                nameservers: resolvers.clone(),
                ..p
            }
            .meta(META_DNS_CAPTURE, "true")
        })
        .status(DNS_STATUS),
        case("dns-capture-all", |p| {
            IstioPod {
                nameservers: resolvers.clone(),
                ..p
            }
            .meta(META_DNS_CAPTURE, "true")
            .meta(META_CAPTURE_ALL_DNS, "true")
        })
        .status(DNS_STATUS),
        case("owner-groups-include", |p| {
            p.meta(META_OWNER_GROUPS, "1000")
        })
        .status(OWNER_GROUPS_STATUS),
        case("owner-groups-exclude", |p| {
            p.meta(META_OWNER_GROUPS_EXCLUDE, "2000,3000")
        })
        .status(OWNER_GROUPS_STATUS),
        case("exclude-interfaces", |p| {
            p.annotate(EXCLUDE_INTERFACES, "net1")
        })
        .status(EXCLUDE_INTERFACES_STATUS),
        case("reroute-virtual-interfaces", |p| {
            p.annotate(REROUTE_VIRTUAL_INTERFACES, VM_IFACE)
        })
        .status(REROUTE_VIRTUAL_INTERFACES_STATUS),
        case("reroute-virtual-interfaces-ranges", |p| {
            p.annotate(REROUTE_VIRTUAL_INTERFACES, VM_IFACE).annotate(
                INCLUDE_OUTBOUND_IP_RANGES,
                "198.18.10.0/24,2001:2:0:10::/64",
            )
        })
        .status(REROUTE_VIRTUAL_INTERFACES_STATUS),
        case("dual-stack-off", |p| {
            let mut p = p;
            p.proxy_metadata.remove(META_DUAL_STACK);
            p
        })
        .status(Status::Compare),
        case("tproxy", |p| p.annotate(INTERCEPTION_MODE, "TPROXY")).status(Status::Skip(
            "weir refuses TPROXY per pod (annotation error); REDIRECT gives the proxy the same \
             original destination",
        )),
        // Linkerd (linkerd2-proxy-init, as its injector runs it).
        linkerd_case("linkerd-defaults", |p| p),
        linkerd_case("linkerd-skip-ports", |p| {
            use linkerd_iptables::keys::*;
            p.with_ipv6()
                .annotate(SKIP_INBOUND_PORTS, "9090,7000-7100,7070")
                .annotate(SKIP_OUTBOUND_PORTS, "3306,8000-8100,8080")
        }),
        // Subnets fail linkerd-init with IPv6 on (linkerd2-proxy-init#696).
        linkerd_case("linkerd-skip-subnets", |p| {
            p.annotate(
                linkerd_iptables::keys::SKIP_SUBNETS,
                "198.18.100.0/24,198.18.10.0/24",
            )
        }),
        // With IPv6 and the default port lists.
        linkerd_case("linkerd-proxy-ids", |p| {
            use linkerd_iptables::keys::*;
            p.with_ipv6()
                .annotate(PROXY_UID, "2103")
                .annotate(PROXY_GID, "3000")
        }),
        // Kuma (kuma-init on Kubernetes).
        kuma_case("kuma-defaults", |p| p),
        kuma_case("kuma-exclude-ports", |p| {
            use kuma_iptables::keys::*;
            p.annotate(EXCLUDE_INBOUND_PORTS, "9090,7070,9001")
                .annotate(EXCLUDE_OUTBOUND_PORTS, "3306,8080, 53,3306")
        }),
        kuma_case("kuma-exclude-outbound-ips", |p| {
            p.annotate(
                kuma_iptables::keys::EXCLUDE_OUTBOUND_IPS,
                "198.18.10.0/24,198.18.10.1,2001:2:0:11::1,198.18.53.53,198.18.0.1/32",
            )
        }),
        kuma_case("kuma-exclude-inbound-ips", |p| {
            p.annotate(
                kuma_iptables::keys::EXCLUDE_INBOUND_IPS,
                "198.18.100.0/24, 2001:2::2,198.18.0.9",
            )
        }),
        kuma_case("kuma-ipv4-mode", |p| {
            p.annotate(kuma_iptables::keys::IP_FAMILY_MODE, "ipv4")
        }),
        kuma_case("kuma-dns-resolvers", |p| KumaPod {
            dns_capture_all: false,
            ..p
        }),
        kuma_case("kuma-dns-off", |p| {
            KumaPod {
                dns_enabled: false,
                ..p
            }
            .annotate(kuma_iptables::keys::PROBE_PROXY_PORT, "0")
        }),
    ]
    .into_iter()
    .chain(golden_cases())
    .collect()
}

/// Istio's goldens weir cannot be configured for, and why (each still
/// listed in the run, as skipped). The TPROXY ones are checked to be
/// refused per pod ([`weir_refuses_tproxy_goldens`]).
const GOLDEN_SKIPS: &[(&str, &str)] = &[
    (
        "inbound-ports-wildcard",
        "-b '*' without -d: weir always keeps 15090 and 15021 out of inbound capture, as \
         Istio's injector always passes them in -d",
    ),
    ("tproxy", TPROXY_SKIP),
    ("inbound-ports-tproxy", TPROXY_SKIP),
    ("inbound-ports-wildcard-tproxy", TPROXY_SKIP),
    (
        "outbound-owner-groups",
        "owner groups by name (java): weir takes numeric GIDs only (istio-iptables resolves \
         names in the init container's /etc/group)",
    ),
    (
        "outbound-owner-groups-exclude",
        "owner groups by name (ftp): weir takes numeric GIDs only",
    ),
    (
        "ipv6-dns-outbound-owner-groups",
        "owner groups by name (java): weir takes numeric GIDs only",
    ),
    (
        "ipv6-dns-outbound-owner-groups-exclude",
        "owner groups by name (ftp): weir takes numeric GIDs only",
    ),
    (
        "drop-invalid",
        "--drop-invalid (a mangle rule dropping conntrack-INVALID packets) has no weir \
         equivalent",
    ),
    (
        "host-ipv4-loopback-cidr",
        "ISTIO_OUTBOUND_IPV4_LOOPBACK_CIDR=127.0.0.1/8: weir's localhost is always \
         127.0.0.1/32",
    ),
];

const TPROXY_SKIP: &str = "TPROXY: weir refuses it per pod (tested by weir_refuses_tproxy_goldens)";

/// Every golden of Istio's run_test.go (`golden-NAME`) and Kuma's default
/// goldens, applied as they are.
fn golden_cases() -> Vec<Case> {
    let mut v: Vec<Case> = goldens::istio_cases()
        .into_iter()
        .map(|c| {
            let name: &'static str = Box::leak(format!("golden-{}", c.name).into_boxed_str());
            let status = GOLDEN_SKIPS
                .iter()
                .find(|(n, _)| *n == c.name)
                .map_or(Status::Compare, |(_, why)| Status::Skip(why));
            Case {
                name,
                ipv6: c.config.enable_ipv6,
                sidecar_uid: golden_proxy_uid(&c),
                pod: MeshPod::IstioGolden(Box::new(c)),
                status,
            }
        })
        .collect();
    let (v4, v6) = goldens::KUMA_DEFAULT_GOLDENS[0];
    // `kumactl install transparent-proxy` without flags: no DNS
    // redirection (the ConfigMap's DNS off), no excluded inbound port (the
    // probe proxy port 0; kuma-dp's readiness port 9902 weir always
    // excludes: see golden_gaps()).
    let mut kuma = kuma_case("golden-kuma-default", |p| {
        KumaPod {
            dns_enabled: false,
            ..p
        }
        .annotate(kuma_iptables::keys::PROBE_PROXY_PORT, "0")
    });
    kuma.pod = match kuma.pod {
        MeshPod::Kuma(p) => MeshPod::KumaGolden(p, v4, v6),
        other => other,
    };
    v.push(kuma);
    v
}

// ---------------------------------------------------------------------------
// The connection matrix
// ---------------------------------------------------------------------------

/// A process identity.
#[derive(Copy, Clone, Debug)]
struct Who {
    name: &'static str,
    uid: u32,
    gid: u32,
    /// Extra supplementary groups.
    groups: &'static str,
}

const APP: Who = Who {
    name: "app",
    uid: 1000,
    gid: 1000,
    groups: "",
};
const PROXY: Who = Who {
    name: "uid1337",
    uid: 1337,
    gid: 1337,
    groups: "",
};
const PROXY2: Who = Who {
    name: "uid1338",
    uid: 1338,
    gid: 1338,
    groups: "",
};
const GID_ONLY: Who = Who {
    name: "gid1337",
    uid: 1000,
    gid: 1337,
    groups: "",
};
const GID3000: Who = Who {
    name: "gid3000",
    uid: 1000,
    gid: 3000,
    groups: "",
};
const SUPPL: Who = Who {
    name: "g3000+1000",
    uid: 2000,
    gid: 3000,
    groups: "1000",
};
const OTHER: Who = Who {
    name: "uid2000",
    uid: 2000,
    gid: 2000,
    groups: "",
};
/// GID 1, a proxy GID of several goldens (`-g 1,2`).
const GID1: Who = Who {
    name: "gid1",
    uid: 1000,
    gid: 1,
    groups: "",
};
const ROOT: Who = Who {
    name: "root",
    uid: 0,
    gid: 0,
    groups: "",
};

/// Where a connection starts.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
enum Origin {
    /// Inside the pod (outbound).
    Pod,
    /// From the peer namespace (inbound).
    Peer,
    /// From a virtual machine behind the pod's virtual interface
    /// ([`VM_IFACE`]; KubeVirt), through the pod.
    Vm,
}

/// One connection of the matrix.
#[derive(Clone, Debug)]
struct Conn {
    label: String,
    from: Origin,
    who: Who,
    bind: Option<&'static str>,
    dst: &'static str,
    /// `None`: TCP; `Some(connected)`: a UDP query, from a connected
    /// socket or with `sendto`.
    udp: Option<bool>,
}

impl Conn {
    /// `who [udp|udp/conn] [bind -> ]dst`, stable across matrix changes.
    fn key(&self) -> String {
        format!(
            "{} {}{}{}",
            self.who.name,
            match self.udp {
                None => "",
                Some(false) => "udp ",
                Some(true) => "udp/conn ",
            },
            self.bind.map(|b| format!("{b} -> ")).unwrap_or_default(),
            self.dst
        )
    }
}

/// The connections a configuration gets, in both worlds: the same for
/// every mesh, with the mesh's proxy UID, plus a few rows for the other
/// meshes' own ports (appended, so Istio's rows keep their labels).
fn matrix(m: &MeshPorts, vm: bool) -> Vec<Conn> {
    let leak = |s: String| -> &'static str { Box::leak(s.into_boxed_str()) };
    let (proxy, gid_only) = if m.mesh == "istio" && m.proxy_uid == PROXY.uid {
        (PROXY, GID_ONLY)
    } else {
        (
            Who {
                name: leak(format!("uid{}", m.proxy_uid)),
                uid: m.proxy_uid,
                gid: m.proxy_uid,
                groups: "",
            },
            Who {
                name: leak(format!("gid{}", m.proxy_uid)),
                uid: 1000,
                gid: m.proxy_uid,
                groups: "",
            },
        )
    };
    let mut v = Vec::new();
    let mut add_any = |prefix: &str,
                       from: Origin,
                       who: Who,
                       bind: Option<&'static str>,
                       dst,
                       udp: Option<bool>| {
        let n = v.len() + 1;
        v.push(Conn {
            label: format!("{prefix}{n:02}"),
            from,
            who,
            bind,
            dst,
            udp,
        });
    };
    let mut add = |prefix: &str, from: Origin, who: Who, bind, dst| {
        add_any(prefix, from, who, bind, dst, None)
    };
    use Origin::*;
    // Outbound to remote services (peer namespace).
    for dst in [
        "198.18.10.1:80",
        "198.18.11.1:80",
        "198.18.10.1:3306",
        "198.18.0.2:8080",
        "198.19.0.1:80",
        "[2001:2:0:10::1]:80",
        "[2001:2:0:11::1]:3306",
        "[2001:2::2]:8080",
        "[2001:2:1::1]:80",
        "[::ffff:198.18.10.1]:80",
        "198.18.110.1:80",
        "[2001:2:0:110::1]:80",
        "198.18.53.53:53",
        "198.18.10.1:53",
        "[2001:2:0:53::53]:53",
    ] {
        add("o", Pod, APP, None, dst);
    }
    // Loopback and the pod's own addresses.
    for dst in [
        "127.0.0.1:8080",
        "127.0.0.5:8080",
        "[::1]:8080",
        "198.18.0.1:8080",
        "[2001:2::1]:8080",
        "198.18.100.1:8080",
        "127.0.0.1:15001",
        "[::ffff:127.0.0.1]:8080",
    ] {
        add("l", Pod, APP, None, dst);
    }
    add("l", Pod, APP, Some("127.0.0.6"), "198.18.0.1:8080");
    add("l", Pod, APP, Some("::6"), "[2001:2::1]:8080");
    add("l", Pod, APP, Some("127.0.0.6"), "127.0.0.1:8080");
    // A resolver on the pod's loopback (DNS over TCP).
    add("l", Pod, APP, None, "127.0.0.53:53");
    // The proxy's identities.
    for dst in [
        "198.18.10.1:80",
        "198.18.0.1:8080",
        "[2001:2::1]:8080",
        "127.0.0.1:8080",
        "[::1]:8080",
        "127.0.0.6:15002",
        "198.18.0.1:15008",
        "127.0.0.5:8080",
    ] {
        add("p", Pod, proxy, None, dst);
    }
    for who in [PROXY2, gid_only, GID3000] {
        add("p", Pod, who, None, "198.18.10.1:80");
        add("p", Pod, who, None, "198.18.0.1:8080");
    }
    add("p", Pod, PROXY2, None, "[2001:2:0:10::1]:80");
    // Other processes.
    for who in [OTHER, SUPPL, ROOT] {
        add("x", Pod, who, None, "198.18.10.1:80");
    }
    add("x", Pod, OTHER, None, "198.18.0.1:8080");
    // Inbound from the peer.
    for dst in [
        "198.18.0.1:8080",
        "198.18.0.1:9090",
        "198.18.0.1:7070",
        "[2001:2::1]:8080",
        "[2001:2::1]:9090",
        "198.18.0.1:15008",
        "198.18.0.1:15020",
        "198.18.0.1:15021",
        "198.18.0.1:15030",
        "198.18.0.1:15090",
        "198.18.0.1:15006",
        "198.18.0.1:15001",
        "198.18.0.1:6666",
        "198.18.100.1:8080",
        "[2001:2:0:100::1]:8080",
        "[2001:2::1]:15006",
    ] {
        add("i", Peer, ROOT, None, dst);
    }
    // DNS over UDP: unconnected (sendto) and connected sockets, to the
    // resolvers, another server and a resolver on loopback.
    for (who, dst, connected) in [
        (APP, "198.18.53.53:53", false),
        (APP, "198.18.53.53:53", true),
        (APP, "[2001:2:0:53::53]:53", false),
        (APP, "[2001:2:0:53::53]:53", true),
        (APP, "198.18.10.1:53", false),
        (APP, "[2001:2:0:10::1]:53", false),
        (APP, "127.0.0.53:53", false),
        (proxy, "198.18.53.53:53", false),
        (gid_only, "198.18.53.53:53", true),
        (OTHER, "198.18.53.53:53", false),
    ] {
        add_any("u", Pod, who, None, dst, Some(connected));
    }
    // A VM behind the pod's virtual interface (only for the
    // configurations that reroute it): remote services in and out of the
    // include ranges, the pod's own addresses, DNS over UDP.
    if vm {
        for dst in [
            "198.18.10.1:80",
            "198.18.10.1:3306",
            "198.18.11.1:80",
            "[2001:2:0:10::1]:80",
            "[2001:2:0:11::1]:80",
            "198.18.0.1:8080",
            "198.18.200.1:8080",
            "198.18.0.1:15008",
        ] {
            add_any("v", Vm, ROOT, None, dst, None);
        }
        add_any("v", Vm, ROOT, None, "198.18.53.53:53", Some(false));
    }
    // The goldens' own ranges and ports (their flags name 9.9.0.0/16,
    // 1.1.0.0/16, 10.0.0.0/8, 2001:db8::/32, 127.1.2.3/32, inbound ports
    // 4000, 5000, 6000, 31000, 32000, outbound ports 31000, 32000); these
    // addresses exist only on the peer namespace's loopback.
    if m.golden {
        for dst in [
            "9.9.0.1:80",
            "1.1.0.1:80",
            "10.0.0.1:80",
            "[2001:db8::1]:80",
            "127.1.2.3:8080",
            "198.18.10.1:31000",
            "198.18.10.1:32000",
        ] {
            add_any("g", Pod, APP, None, dst, None);
        }
        add_any("g", Pod, proxy, None, "127.1.2.3:8080", None);
        add_any("g", Pod, GID1, None, "198.18.10.1:80", None);
        // A proxy GID's DNS over TCP to a resolver on loopback (with DNS
        // capture Istio's GID rule sends it inbound; see decide.rs).
        add_any("g", Pod, GID1, None, "127.0.0.53:53", None);
        for dst in [
            "198.18.0.1:4000",
            "198.18.0.1:5000",
            "198.18.0.1:6000",
            "198.18.0.1:31000",
            "198.18.0.1:32000",
            "[2001:2::1]:4000",
        ] {
            add_any("g", Peer, ROOT, None, dst, None);
        }
    }
    // The other meshes' ports.
    match m.mesh {
        "linkerd" => {
            let mut add = |prefix: &str, from: Origin, who: Who, dst| {
                add_any(prefix, from, who, None, dst, None)
            };
            // Skipped both ways by default (Galera).
            add("o", Pod, APP, "198.18.10.1:4567");
            add("l", Pod, APP, "127.0.0.1:4140");
            for dst in [
                "198.18.0.1:4143",
                "198.18.0.1:4140",
                "198.18.0.1:4190",
                "198.18.0.1:4191",
                "198.18.0.1:4567",
                "[2001:2::1]:4143",
            ] {
                add("i", Peer, ROOT, dst);
            }
        }
        "kuma" => {
            let mut add = |prefix: &str, from: Origin, who: Who, dst| {
                add_any(prefix, from, who, None, dst, None)
            };
            // The proxy to its own pod on port 53 (no DNS exception).
            add("p", Pod, proxy, "198.18.0.1:53");
            for dst in ["198.18.0.1:9001", "198.18.0.1:9902", "198.18.0.1:9901"] {
                add("i", Peer, ROOT, dst);
            }
        }
        _ => {}
    }
    v
}

/// Ports the application listens on in the pod.
/// (Linkerd's proxy admin/control ports and Kuma's probe, readiness and
/// admin ports too, so an uncaptured connection there has an answer.)
/// (And the goldens' inbound ports.)
const APP_PORTS: &[u16] = &[
    8080, 9090, 7070, 15008, 15020, 15021, 15030, 15090, 4190, 4191, 4567, 9001, 9902, 9901, 4000,
    5000, 6000, 31000, 32000,
];
/// Ports the remote services listen on in the peer namespace.
const PEER_PORTS: &[u16] = &[80, 3306, 8080, 4567, 31000, 32000];
/// The DNS proxy's port (Istio's agent, kuma-dp); a stand-in answers there.
const DNS_PROXY_PORT: u16 = 15053;

// ---------------------------------------------------------------------------
// Worlds
// ---------------------------------------------------------------------------

#[derive(Copy, Clone, Debug, PartialEq, Eq)]
enum Side {
    Iptables,
    Weir,
}

/// A pod namespace and its peer namespace, with the sidecar, the
/// applications and the remote services running.
struct World {
    // Dropped first: the processes, then the namespaces.
    procs: Vec<Proc>,
    /// The VM's link and namespace behind [`VM_IFACE`], for configurations
    /// that reroute it.
    vm: Option<(Veth, NetNs)>,
    pod: NetNs,
    peer: NetNs,
    dir: TempDir,
    log: PathBuf,
    side: Side,
    counter: usize,
}

/// Addresses of one link: (pod side, peer side), IPv4 then IPv6.
const LINKS: &[(&str, &str, [&str; 2], [&str; 2])] = &[
    (
        "eth0",
        "veth0",
        ["198.18.0.1/24", "2001:2::1/64"],
        ["198.18.0.2/24", "2001:2::2/64"],
    ),
    (
        "net1",
        "veth1",
        ["198.18.100.1/24", "2001:2:0:100::1/64"],
        ["198.18.100.2/24", "2001:2:0:100::2/64"],
    ),
];

/// The peer's address on the link to the pod address in `dst`.
fn peer_source(dst: &str) -> &'static str {
    let ip = ip_part(dst);
    match (
        ip.contains(':'),
        ip.starts_with("198.18.100.") || ip.starts_with("2001:2:0:100:"),
    ) {
        (false, false) => "198.18.0.2",
        (false, true) => "198.18.100.2",
        (true, false) => "2001:2::2",
        (true, true) => "2001:2:0:100::2",
    }
}

/// The pod's virtual interface (KubeVirt's `k6t-eth0`) in the
/// `reroute-virtual-interfaces` configurations.
const VM_IFACE: &str = "k6t0";

/// Remote service addresses on the peer's `lo`.
const PEER_SERVICES: &[&str] = &[
    "198.18.10.1/32",
    "198.18.11.1/32",
    "198.19.0.1/32",
    "198.18.53.53/32",
    "198.18.110.1/32",
    "2001:2:0:10::1/128",
    "2001:2:0:11::1/128",
    "2001:2:1::1/128",
    "2001:2:0:53::53/128",
    "2001:2:0:110::1/128",
    // The goldens' ranges.
    "9.9.0.1/32",
    "1.1.0.1/32",
    "10.0.0.1/32",
    "2001:db8::1/128",
];

impl World {
    fn new(side: Side, ipv6: bool, with_vm: bool) -> World {
        let tag = match side {
            Side::Iptables => "dipt",
            Side::Weir => "dweir",
        };
        let pod = NetNs::new(&format!("{tag}p"));
        let peer = NetNs::new(&format!("{tag}r"));
        for (pod_if, peer_if, pod_addrs, peer_addrs) in LINKS {
            peer.ip(&[
                "link",
                "add",
                peer_if,
                "type",
                "veth",
                "peer",
                "name",
                pod_if,
                "netns",
                pod.name(),
            ]);
            for (ns, dev, addrs) in [(&pod, pod_if, pod_addrs), (&peer, peer_if, peer_addrs)] {
                for a in addrs.iter().filter(|a| ipv6 || !a.contains(':')) {
                    let mut args = vec!["addr", "add", a, "dev", dev];
                    if a.contains(':') {
                        args.push("nodad");
                    }
                    ns.ip(&args);
                }
                ns.ip(&["link", "set", dev, "up"]);
            }
        }
        for a in PEER_SERVICES.iter().filter(|a| ipv6 || !a.contains(':')) {
            let mut args = vec!["addr", "add", a, "dev", "lo"];
            if a.contains(':') {
                args.push("nodad");
            }
            peer.ip(&args);
        }
        // The DNS server answers UDP from a wildcard socket: make its
        // answers leave from the resolver's address, as a real resolver's
        // would. (Inbound clients bind their source explicitly.)
        peer.ip(&[
            "route",
            "replace",
            "198.18.0.0/24",
            "dev",
            "veth0",
            "src",
            RESOLVER4,
        ]);
        if ipv6 {
            // Replaces the kernel's route (IPv6 routes are matched by
            // metric); retried while the new address may still be settling.
            let args = [
                "ip",
                "-6",
                "route",
                "replace",
                "2001:2::/64",
                "dev",
                "veth0",
                "src",
                RESOLVER6,
                "metric",
                "256",
                "proto",
                "kernel",
            ];
            weir_tests::wait_until(
                Duration::from_secs(3),
                "the peer's IPv6 source route",
                || peer.exec(&args).status.success(),
            );
        }
        pod.ip(&["route", "add", "default", "via", "198.18.0.2"]);
        pod.ip(&["route", "add", "198.18.110.0/24", "via", "198.18.100.2"]);
        if ipv6 {
            pod.ip(&["-6", "route", "add", "default", "via", "2001:2::2"]);
            pod.ip(&[
                "-6",
                "route",
                "add",
                "2001:2:0:110::/64",
                "via",
                "2001:2:0:100::2",
            ]);
        }
        let vm = with_vm.then(|| World::add_vm(&pod, &peer, ipv6, tag));
        let dir = TempDir::new("diff");
        let log = dir.join("sidecar.log");
        World {
            procs: Vec::new(),
            pod,
            peer,
            vm,
            dir,
            log,
            side,
            counter: 0,
        }
    }

    /// A VM namespace behind the pod's [`VM_IFACE`] (a veth), routed
    /// through the pod (which forwards), as KubeVirt's launcher pod does
    /// it.
    fn add_vm(pod: &NetNs, peer: &NetNs, ipv6: bool, tag: &str) -> (Veth, NetNs) {
        let vm = NetNs::new(&format!("{tag}v"));
        let family = |a: &[&'static str; 2]| if ipv6 { a.to_vec() } else { vec![a[0]] };
        let link = veth_named(
            pod,
            VM_IFACE,
            &family(&["198.18.200.1/24", "2001:2:0:200::1/64"]),
            &vm,
            "eth0",
            &family(&["198.18.200.2/24", "2001:2:0:200::2/64"]),
        );
        vm.ip(&["route", "add", "default", "via", "198.18.200.1"]);
        peer.ip(&["route", "add", "198.18.200.0/24", "via", "198.18.0.1"]);
        pod.exec_ok(&["sysctl", "-q", "-w", "net.ipv4.ip_forward=1"]);
        if ipv6 {
            vm.ip(&["-6", "route", "add", "default", "via", "2001:2:0:200::1"]);
            peer.ip(&[
                "-6",
                "route",
                "add",
                "2001:2:0:200::/64",
                "via",
                "2001:2::1",
            ]);
            pod.exec_ok(&["sysctl", "-q", "-w", "net.ipv6.conf.all.forwarding=1"]);
        }
        (link, vm)
    }

    /// Applies what the mesh's init container would (nothing for `None`,
    /// Istio's interception mode NONE): its `ip` commands, then the rules.
    fn apply_capture(&self, cfg: Option<&Capture>) {
        let Some(cfg) = cfg else { return };
        for args in &cfg.ip_commands {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            self.pod.ip(&args);
        }
        let restore = cfg
            .restore
            .as_ref()
            .unwrap_or_else(|e| panic!("the init container would fail: {e}"));
        for fam in [Family::V4, Family::V6] {
            let text = restore.get(fam);
            if text.is_empty() {
                continue;
            }
            let mut child = Command::new("ip")
                .args([
                    "netns",
                    "exec",
                    self.pod.name(),
                    fam.restore_command(),
                    "--noflush",
                ])
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap_or_else(|e| panic!("running {}: {e}", fam.restore_command()));
            child
                .stdin
                .take()
                .unwrap()
                .write_all(text.as_bytes())
                .unwrap();
            let out = child.wait_with_output().unwrap();
            assert!(
                out.status.success(),
                "{} failed: {}\ninput:\n{text}",
                fam.restore_command(),
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }

    fn ready_file(&mut self) -> PathBuf {
        self.counter += 1;
        self.dir.join(format!("ready-{}", self.counter))
    }

    /// Starts a long-running testkit process and waits for its ready file.
    fn start(&mut self, in_pod: bool, cgroup: Option<&Cgroup>, args: &[String]) {
        let ready = self.ready_file();
        let mut cmd = testkit_command(args);
        cmd.arg("--ready-file").arg(&ready);
        let ns = if in_pod { &self.pod } else { &self.peer };
        let mut p = spawn_in(Some(ns), cgroup, cmd);
        p.wait_for_file(&ready, Duration::from_secs(10));
        self.procs.push(p);
    }

    /// The sidecar, the application, the DNS stand-in and the peer
    /// services. `cgroup` is weir's node cgroup for the weir world's pod.
    fn start_processes(&mut self, cgroup: Option<&Cgroup>, sidecar_uid: u32, m: &MeshPorts) {
        let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        let mut sidecar = s(&[
            "--uid",
            &sidecar_uid.to_string(),
            "sidecar",
            "--name",
            "sidecar",
            "--outbound-port",
            &m.outbound.to_string(),
            "--inbound-port",
            &m.inbound.to_string(),
        ]);
        sidecar.push("--log".into());
        sidecar.push(self.log.display().to_string());
        self.start(true, cgroup, &sidecar);
        let mut app = s(&["--uid", "1000", "echo", "--name", "app"]);
        for p in APP_PORTS {
            app.extend(["--port".to_string(), p.to_string()]);
        }
        self.start(true, cgroup, &app);
        // istio-agent's (kuma-dp's) DNS proxy listens on loopback only.
        let dns = s(&[
            "--uid",
            &m.dns_uid.to_string(),
            "dns-server",
            "--name",
            "dns-proxy",
            "--loopback",
            "--port",
            &DNS_PROXY_PORT.to_string(),
        ]);
        self.start(true, cgroup, &dns);
        // A resolver on the pod's own loopback (like 127.0.0.53).
        self.start(
            true,
            cgroup,
            &s(&["dns-server", "--name", "local-dns", "--port", "53"]),
        );
        let mut peer = s(&["echo", "--name", "peer"]);
        for p in PEER_PORTS {
            peer.extend(["--port".to_string(), p.to_string()]);
        }
        self.start(false, None, &peer);
        self.start(
            false,
            None,
            &s(&["dns-server", "--name", "peer-dns", "--port", "53"]),
        );
    }

    /// Runs one connection; returns the client's report and the sidecar
    /// records it caused.
    fn run(&self, c: &Conn, cgroup: Option<&Cgroup>) -> Observation {
        let before = sidecar_log(&self.log).len();
        let mut args = vec![
            "--uid".to_string(),
            c.who.uid.to_string(),
            "--gid".to_string(),
            c.who.gid.to_string(),
        ];
        if !c.who.groups.is_empty() {
            args.extend(["--groups".to_string(), c.who.groups.to_string()]);
        }
        let sub: &[&str] = match c.udp {
            None => &["client", "--connect", c.dst, "--timeout-ms", "2000"],
            Some(false) => &["udp-client", "--to", c.dst, "--timeout-ms", "1500"],
            Some(true) => &[
                "udp-client",
                "--to",
                c.dst,
                "--timeout-ms",
                "1500",
                "--connected",
            ],
        };
        args.extend(sub.iter().map(|s| s.to_string()));
        if let Some(b) = c.bind {
            args.extend(["--bind".to_string(), b.to_string()]);
        }
        let (ns, cg) = match c.from {
            Origin::Pod => (&self.pod, cgroup),
            Origin::Peer => (&self.peer, None),
            Origin::Vm => (
                &self
                    .vm
                    .as_ref()
                    .expect("a VM row in a world without a VM")
                    .1,
                None,
            ),
        };
        if c.from == Origin::Peer && c.bind.is_none() {
            args.extend(["--bind".to_string(), peer_source(c.dst).to_string()]);
        }
        let mut p = spawn_in(Some(ns), cg, testkit_command(&args));
        if p.wait_timeout(Duration::from_secs(15)).is_none() {
            panic!(
                "{} ({:?}) did not finish:\n{}",
                c.label,
                self.side,
                p.logs()
            );
        }
        let out = p.stdout();
        let client: Value = out
            .lines()
            .last()
            .and_then(|l| serde_json::from_str(l).ok())
            .unwrap_or_else(|| panic!("{}: client output {out:?}\n{}", c.label, p.logs()));
        let records = sidecar_log(&self.log).split_off(before);
        Observation {
            client,
            records,
            udp: c.udp.is_some(),
        }
    }
}

// ---------------------------------------------------------------------------
// Outcomes
// ---------------------------------------------------------------------------

/// What one connection did, raw.
#[derive(Clone, Debug)]
struct Observation {
    client: Value,
    records: Vec<Value>,
    /// `client` is a `udp-client` report.
    udp: bool,
}

/// What one connection did, reduced to what must be identical.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Outcome {
    /// `reply`, `closed` (connected, no reply), or the failed step and
    /// errno.
    client: String,
    /// The client's own address (ephemeral port dropped).
    client_local: String,
    /// The client's `getpeername`.
    client_peer: String,
    /// The server that answered, with what it saw: `name local <- peer`.
    server: String,
    /// Each sidecar record: listener, `SO_ORIGINAL_DST`, local and peer
    /// addresses, upstream source, errors.
    sidecar: Vec<String>,
}

/// Deviations applied while normalising one observation.
#[derive(Default, Debug, Clone, Copy)]
struct Applied {
    /// The inbound listener's local address (REDIRECT: pod IP and 15006;
    /// weir's sk_lookup: the original destination).
    inbound_local: bool,
}

fn s(v: &Value) -> String {
    v.as_str().unwrap_or("").to_string()
}

/// `ip` of an `ip:port` / `[ip]:port` endpoint.
fn ip_part(ep: &str) -> &str {
    let host = ep.rsplit_once(':').map_or(ep, |(h, _)| h);
    host.trim_start_matches('[').trim_end_matches(']')
}

fn port_part(ep: &str) -> Option<u16> {
    ep.rsplit_once(':').and_then(|(_, p)| p.parse().ok())
}

/// `ip:port` of an endpoint written like the testkit does.
fn endpoint(ip: &str, port: u16) -> String {
    if ip.contains(':') {
        format!("[{ip}]:{port}")
    } else {
        format!("{ip}:{port}")
    }
}

/// Replaces an endpoint with an ephemeral port by the role of the socket
/// that owns it (the client, or the sidecar's n-th upstream socket), or by
/// `ip:eph`; fixed ports stay.
fn token(ep: &str, client_local: &str, upstreams: &[String]) -> String {
    if ep.is_empty() {
        return "-".into();
    }
    if ep == client_local {
        return format!("client@{}", ip_part(ep));
    }
    if let Some(i) = upstreams.iter().position(|u| u == ep) {
        return format!("sidecar-up{i}@{}", ip_part(ep));
    }
    match port_part(ep) {
        Some(p) if p >= 32768 => format!("{}:eph", ip_part(ep)),
        _ => ep.to_string(),
    }
}

impl Observation {
    fn normalise(&self, side: Side, inbound_port: u16) -> (Outcome, Applied) {
        let c = &self.client;
        let client_local = s(&c["local"]);
        // Records of one connection chain are written in either order: put
        // them in chain order (the record whose peer is the client first)
        // before naming the sidecar's upstream sockets.
        let mut records = self.records.clone();
        records.sort_by_key(|r| {
            (
                s(&r["peer"]) != client_local,
                s(&r["listener"]),
                s(&r["orig_dst"]),
            )
        });
        let ups: Vec<String> = records
            .iter()
            .map(|r| s(&r["upstream_local"]))
            .filter(|u| !u.is_empty())
            .collect();
        let tok = |ep: &str| token(ep, &client_local, &ups);
        let error = s(&c["error"]);
        let step = error.split(':').next().unwrap_or("").to_string();
        let reply: Value = if self.udp {
            c["reply"].clone()
        } else {
            c["reply"]
                .as_str()
                .and_then(|r| serde_json::from_str(r.trim()).ok())
                .unwrap_or(Value::Null)
        };
        let client = if self.udp {
            if c["ok"] == true {
                "reply".to_string()
            } else {
                format!("udp {error}")
            }
        } else if c["ok"] == true && !reply.is_null() {
            "reply".to_string()
        } else if client_local.is_empty() {
            format!("{step} errno {}", c["errno"])
        } else if reply.is_null() {
            "closed".to_string()
        } else {
            "reply".to_string()
        };
        let server = if reply.is_null() {
            "-".to_string()
        } else {
            let mut d = format!(
                "{} {} <- {}",
                s(&reply["server"]),
                s(&reply["local"]),
                tok(&s(&reply["peer"]))
            );
            // The DNS servers also report SO_ORIGINAL_DST of TCP queries.
            if !reply["orig_dst"].is_null() {
                let _ = write!(d, " orig={}", s(&reply["orig_dst"]));
            }
            d
        };
        let mut applied = Applied::default();
        let sidecar = records
            .iter()
            .map(|r| {
                let listener = s(&r["listener"]);
                let orig = s(&r["orig_dst"]);
                let mut local = s(&r["local"]);
                if listener == "inbound" && !orig.is_empty() {
                    // Deviation 1 (docs/differential.md): REDIRECT rewrites
                    // an inbound connection's destination to the pod IP and
                    // the inbound port; sk_lookup keeps the original
                    // destination. Proxy-side SO_ORIGINAL_DST is the same.
                    let redirected = endpoint(ip_part(&orig), inbound_port);
                    let expected = match side {
                        Side::Iptables => redirected.as_str(),
                        Side::Weir => orig.as_str(),
                    };
                    if local == expected && ip_part(&orig) == ip_part(&local) {
                        applied.inbound_local |= redirected != orig;
                        local = "<orig-dst ip>:*".into();
                    }
                }
                let mut line = format!(
                    "{listener} orig={} local={local} peer={} up={}",
                    if orig.is_empty() { "-" } else { &orig },
                    tok(&s(&r["peer"])),
                    tok(&s(&r["upstream_local"])),
                );
                for k in ["orig_dst_error", "upstream_error", "note"] {
                    if !r[k].is_null() {
                        let _ = write!(line, " {k}={}", s(&r[k]));
                    }
                }
                line
            })
            .collect::<Vec<_>>();
        (
            Outcome {
                client,
                client_local: if client_local.is_empty() {
                    "-".into()
                } else {
                    ip_part(&client_local).to_string()
                },
                client_peer: {
                    let p = s(&c["peer"]);
                    let p = if p.is_empty() { "-".into() } else { p };
                    if self.udp {
                        // recvfrom's source: the address the query went to.
                        format!("{p} from={}", s(&c["from"]))
                    } else {
                        p
                    }
                },
                server,
                sidecar,
            },
            applied,
        )
    }
}

impl Outcome {
    /// One short line for the matrix table.
    fn short(&self) -> String {
        let mut out = String::new();
        for r in &self.sidecar {
            let mut w = r.split_whitespace();
            let listener = w.next().unwrap_or("?");
            let orig = w
                .next()
                .and_then(|o| o.strip_prefix("orig="))
                .unwrap_or("?");
            let err = if r.contains("upstream_error") {
                "!"
            } else {
                ""
            };
            let _ = write!(out, "{}[{orig}]{err} ", &listener[..listener.len().min(3)]);
        }
        if self.server != "-" {
            let _ = write!(out, "=> {}", self.server);
        } else {
            out.push_str(&self.client);
        }
        if let Some((_, from)) = self.client_peer.split_once("from=") {
            let _ = write!(out, " (answer from {from})");
        }
        out
    }

    fn long(&self) -> String {
        format!(
            "client={} local={} peer={} server=[{}] sidecar={:?}",
            self.client, self.client_local, self.client_peer, self.server, self.sidecar
        )
    }
}

// ---------------------------------------------------------------------------
// Known differences
// ---------------------------------------------------------------------------

/// The sidecar records' `peer=` of the two sides differ only in how the
/// peer's ephemeral port was labelled (`client@ADDR` when the harness could
/// attribute it to the client, `ADDR:PORT` when it could not: the
/// attribution races with the client's own report). Addresses must still
/// be equal, and nothing outside the sidecar records is touched.
fn same_but_sidecar_peer_port(ipt: &Outcome, weir: &Outcome) -> bool {
    fn norm(long: &str) -> String {
        let Some(at) = long.find("sidecar=") else {
            return long.to_string();
        };
        let (head, tail) = long.split_at(at);
        let mut out = String::from(head);
        let mut rest = tail;
        while let Some(i) = rest.find("peer=") {
            out.push_str(&rest[..i + 5]);
            rest = &rest[i + 5..];
            let end = rest.find([' ', '"']).unwrap_or(rest.len());
            let token = &rest[..end];
            let addr = if let Some(labelled) = token.strip_prefix("client@") {
                // `client@ADDR`: the address alone (IPv6 without brackets).
                labelled
            } else if let Some(v6) = token.strip_prefix('[') {
                v6.split(']').next().unwrap_or(v6)
            } else {
                token.rsplit_once(':').map(|(a, _)| a).unwrap_or(token)
            };
            out.push_str(addr);
            rest = &rest[end..];
        }
        out.push_str(rest);
        out
    }
    let (a, b) = (ipt.long(), weir.long());
    a != b && norm(&a) == norm(&b)
}

/// Deviation 2 (by design, harmless): with weir the application's socket is
/// connected to 127.0.0.1:15001, so the kernel may give the proxy's
/// upstream connection (to the original destination) the same local port;
/// with REDIRECT the application's socket still names the original
/// destination and the port is never reused. Ports are labelled by owner,
/// so the collision shows as the upstream port belonging to `client`.
/// Identical otherwise.
fn port_reuse_only(ipt: &Outcome, weir: &Outcome) -> bool {
    let w = weir.long();
    w.contains("up=client@")
        && w.replace("up=client@", "up=sidecar-up0@")
            .replace("<- client@", "<- sidecar-up0@")
            == ipt.long()
}

/// weir bugs found by this suite and reported, as (configuration,
/// connection, summary). Such a difference is reported but does not fail
/// the suite (set `WEIR_DIFF_STRICT=1` to fail anyway); an entry that no
/// longer differs fails the suite, so fixed bugs are removed from this
/// list.
fn known_bugs() -> Vec<(&'static str, &'static str, &'static str)> {
    let mut v = Vec::new();
    let mut add = |configs: &[&'static str], conns: &[&'static str], why| {
        for c in configs {
            for k in conns {
                v.push((*c, *k, why));
            }
        }
    };
    // None at the moment; add(&[configs], &[connection keys], WHY).
    let _ = &mut add;
    v
}

// B1 (source address of a capture through a second interface), B2
// (IPv4-only pod), B3 (loopback include judged after masking) and B4
// (interceptionMode NONE answering SO_ORIGINAL_DST) were found by this
// suite and are fixed, and so are B6 (Linkerd's skip-subnets), B7
// (IP6T_SO_ORIGINAL_DST without IPv6 rules) and B8 (::6 added to Linkerd
// pods), and B5 (a captured UDP DNS query from a connected socket bound to
// the wildcard address with a port arrived at the DNS proxy from
// loopback: it now goes to the pod's address and the DNS port, and
// `weir_sk_lookup` hands it to the DNS proxy's socket, which the agent
// records on every pass).

/// Differences between a golden and weir that are neither weir bugs nor
/// harness problems: what the golden's flags do that no real pod's
/// annotations can ask weir for (the golden was made by flags a mesh's
/// injector never passes). As (configuration, connection, why); shown,
/// counted, not failing; an entry that no longer differs fails the suite.
fn golden_gaps() -> Vec<(&'static str, &'static str, &'static str)> {
    vec![(
        "golden-kuma-default",
        "root 198.18.0.1:9902",
        "kumactl without flags captures inbound 9902; Kuma's injector always excludes \
         kuma-dp's readiness port 9902 (--exclude-inbound-ports), and so does weir for every \
         Kuma pod",
    )]
}

fn golden_gap(config: &str, conn: &str) -> Option<&'static str> {
    golden_gaps()
        .into_iter()
        .find(|(c, l, _)| *c == config && *l == conn)
        .map(|(_, _, why)| why)
}

/// The known bug behind the difference between the two worlds for
/// connection `conn` of `config`, if it is one.
fn known_bug(config: &str, conn: &str) -> Option<&'static str> {
    known_bugs()
        .into_iter()
        .find(|(c, l, _)| *c == config && *l == conn)
        .map(|(_, _, why)| why)
}

// ---------------------------------------------------------------------------
// The test
// ---------------------------------------------------------------------------

/// How many outcomes each tolerance made equal.
#[derive(Default)]
struct Tolerated {
    /// [`port_reuse_only`].
    port_reuse: usize,
    /// [`same_but_sidecar_peer_port`].
    peer_port_label: usize,
}

struct Row {
    label: String,
    /// Stable name of the connection (identity, protocol, source,
    /// destination), for `known_bugs()`.
    key: String,
    desc: String,
    ipt: Outcome,
    weir: Outcome,
    applied: Applied,
}

/// Runs one configuration in both worlds.
fn run_case(wn: &WeirNode, idx: usize, c: &Case, conns: &[Conn]) -> (Vec<Row>, String) {
    let node = &wn.node;
    let cfg = c.pod.capture();
    let ports = c.pod.ports();
    let name = format!("diff-{idx:02}");
    // Kubernetes mode: the weir world's processes live in the pod's
    // cgroup (cgroupfs layout, `pod<uid>` under the node cgroup), where
    // the agent finds the pod's network namespace. Declared before the
    // worlds, so it is removed after their processes.
    let uid = format!("d1ff0000-0000-4000-8000-{idx:012}");
    let pod_cgroup = wn
        .k8s
        .as_ref()
        .map(|_| node.cgroup.child_named(&format!("pod{uid}")));
    let cgroup = pod_cgroup.as_ref().unwrap_or(&node.cgroup);
    let mut ipt = World::new(Side::Iptables, c.ipv6, c.pod.has_vm());
    let mut weir = World::new(Side::Weir, c.ipv6, c.pod.has_vm());
    ipt.apply_capture(cfg.as_ref());
    let mut ips = vec![POD4.to_string()];
    if c.ipv6 {
        ips.push(POD6.to_string());
    }
    let enrolled = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        if let Some(k) = &wn.k8s {
            // The pod's "pause" process, then the Pod object.
            let mut pause = Command::new("sleep");
            pause.arg("3600");
            weir.procs
                .push(spawn_in(Some(&weir.pod), Some(cgroup), pause));
            k.api.apply(c.pod.pod_object(&name, &uid, &ips));
            let want = if c.pod.meshed() {
                vec![name.clone()]
            } else {
                Vec::new()
            };
            weir_tests::wait_until(Duration::from_secs(15), "the pod enrolled", || {
                node.enrolled() == want
            });
            if !c.pod.meshed() {
                // Nothing to wait for (the agent logs nothing for a pod it
                // leaves alone): give it two passes (--resync-secs 1).
                std::thread::sleep(Duration::from_secs(2));
            }
        } else {
            let mut entry = PodEntry::new(&name, &weir.pod, &[]);
            entry.ips = ips.clone();
            entry.annotations = c.pod.weir_annotations();
            entry.mesh = c.pod.weir_mesh();
            node.set_pods(&[entry]);
        }
    }));
    if enrolled.is_err() {
        let logs = wn.logs();
        let why = logs
            .lines()
            .rfind(|l| {
                l.contains(&format!("\"{name}\""))
                    || l.contains(&format!("/{name}:"))
                    || l.contains(&format!("/{name}"))
            })
            .unwrap_or("(nothing in the agent's log)");
        panic!("weir did not enroll configuration {}: {why}", c.name);
    }
    ipt.start_processes(None, c.sidecar_uid, &ports);
    weir.start_processes(Some(cgroup), c.sidecar_uid, &ports);
    // With DNS capture, the agent records the DNS proxy's socket on its
    // next pass (queries from connected sockets need it): wait for it, so
    // the outcome does not depend on timing.
    let dns_capture = cfg.as_ref().is_some_and(|c| {
        c.restore.as_ref().is_ok_and(|r| {
            [Family::V4, Family::V6]
                .iter()
                .any(|f| r.get(*f).contains(&DNS_PROXY_PORT.to_string()))
        })
    });
    if dns_capture {
        let needle = format!("{name}: DNS proxy on :{DNS_PROXY_PORT} recorded");
        weir_tests::wait_until(Duration::from_secs(10), &needle, || {
            wn.logs().contains(&needle)
        });
    }

    let (a, b) = std::thread::scope(|s| {
        let ta = s.spawn(|| conns.iter().map(|k| ipt.run(k, None)).collect::<Vec<_>>());
        let tb = s.spawn(|| {
            conns
                .iter()
                .map(|k| weir.run(k, Some(cgroup)))
                .collect::<Vec<_>>()
        });
        (ta.join().unwrap(), tb.join().unwrap())
    });
    let rows = conns
        .iter()
        .zip(a.iter().zip(b.iter()))
        .map(|(k, (oa, ob))| {
            let (ipt, ap_a) = oa.normalise(Side::Iptables, ports.inbound);
            let (weir, ap_b) = ob.normalise(Side::Weir, ports.inbound);
            Row {
                label: k.label.clone(),
                key: k.key(),
                desc: format!(
                    "{:<10} {}{}{}",
                    k.who.name,
                    match k.udp {
                        None => "",
                        Some(false) => "udp ",
                        Some(true) => "udp/conn ",
                    },
                    k.bind.map(|b| format!("{b} -> ")).unwrap_or_default(),
                    k.dst
                ),
                ipt,
                weir,
                applied: Applied {
                    inbound_local: ap_a.inbound_local && ap_b.inbound_local,
                },
            }
        })
        .collect();
    let rules = cfg
        .as_ref()
        .and_then(|c| c.restore.as_ref().ok())
        .map(|r| format!("{}{}", r.v4, r.v6.clone().unwrap_or_default()))
        .unwrap_or_else(|| "(no istio-init: no rules)".into());
    if let Some(k) = &wn.k8s {
        k.api.delete(&name);
        weir_tests::wait_until(Duration::from_secs(15), "the pod removed", || {
            node.enrolled().is_empty()
        });
    }
    (rows, rules)
}

/// The weir side's node: the agent in Kubernetes mode against a fake API
/// server serving the configurations' Pod objects (the default), or with
/// a pods file (`WEIR_DIFF_PODS_FILE=1`).
struct WeirNode {
    k8s: Option<K8sAgent>,
    node: Node,
}

/// `weir run --kubernetes` and its API server.
struct K8sAgent {
    agent: Proc,
    api: FakeApi,
}

impl WeirNode {
    fn start() -> WeirNode {
        if std::env::var_os("WEIR_DIFF_PODS_FILE").is_some() {
            return WeirNode {
                k8s: None,
                node: Node::with_agent(),
            };
        }
        let node = Node::new();
        let api = FakeApi::start();
        api.kubeconfig(&node.dir.join("kubeconfig"));
        let cmd = k8s_support::kubernetes_agent_command(&node);
        let mut agent = spawn_in(None, None, cmd);
        agent.wait_for_output("watching the pods of node node-a", Duration::from_secs(15));
        WeirNode {
            k8s: Some(K8sAgent { agent, api }),
            node,
        }
    }

    fn logs(&self) -> String {
        match &self.k8s {
            Some(k) => k.agent.logs(),
            None => self.node.agent_logs(),
        }
    }

    fn mode(&self) -> &'static str {
        if self.k8s.is_some() {
            "Kubernetes mode: Pod objects through the agent's classification"
        } else {
            "pods file"
        }
    }
}

impl Drop for WeirNode {
    fn drop(&mut self) {
        if let Some(k) = &mut self.k8s {
            if std::thread::panicking() {
                eprintln!("--- agent logs ---\n{}", k.agent.logs());
            }
            k.agent.signal(nix::sys::signal::Signal::SIGTERM);
            let _ = k.agent.wait_timeout(Duration::from_secs(10));
        }
    }
}

/// cgroup programs attached to the ancestors of weir's node cgroup (up to
/// the root) also run for the weir world's processes and can change their
/// outcomes (another agent attached to the root cgroup overwrites
/// `SO_ORIGINAL_DST` answers, for example). Returns a description of any.
fn foreign_cgroup_programs(node: &Node) -> Option<String> {
    let mut found = String::new();
    let mut dir = node.cgroup.path().parent();
    while let Some(d) = dir {
        let out = Command::new("bpftool")
            .args(["cgroup", "show"])
            .arg(d)
            .output();
        // Without bpftool the check cannot run: a failure under CI.
        let out = match out {
            Ok(out) if out.status.success() => out,
            Ok(out) => {
                weir_tests::unavailable(&format!(
                    "`bpftool cgroup show {}` failed: {}",
                    d.display(),
                    String::from_utf8_lossy(&out.stderr).trim()
                ));
                return None;
            }
            Err(e) => {
                weir_tests::unavailable(&format!(
                    "bpftool, to look for foreign cgroup programs: {e}"
                ));
                return None;
            }
        };
        let text = String::from_utf8_lossy(&out.stdout);
        // Only the hooks weir uses can change these outcomes.
        let relevant: Vec<&str> = text
            .lines()
            .filter(|l| {
                [
                    "connect",
                    "getpeername",
                    "getsockopt",
                    "sock_ops",
                    "sendmsg",
                    "recvmsg",
                ]
                .iter()
                .any(|h| l.contains(h))
            })
            .collect();
        if !relevant.is_empty() {
            let _ = writeln!(found, "{}:\n{}", d.display(), relevant.join("\n"));
        }
        if d == weir_tests::cgroup2_mount() {
            break;
        }
        dir = d.parent();
    }
    (!found.is_empty()).then_some(found)
}

#[test]
fn weir_matches_istio_iptables() {
    if !require_root() {
        return;
    }
    let started = Instant::now();
    let cases = cases();
    assert!(cases.len() >= 20, "the table covers every option");
    let wn = WeirNode::start();
    let node = &wn.node;
    println!("weir world configured by: {}", wn.mode());
    let strict = std::env::var_os("WEIR_DIFF_STRICT").is_some();
    // WEIR_DIFF_ONLY=name,name runs only the configurations whose names
    // contain one of these (for debugging one difference).
    let only = std::env::var("WEIR_DIFF_ONLY").ok();

    let mut report = String::new();
    let mut failures = String::new();
    let (mut compared_cases, mut compared) = (0usize, 0usize);
    let mut inbound_local_deviation = 0usize;
    let mut known_seen: Vec<(&str, String)> = Vec::new();
    let mut gaps_seen: Vec<(&str, String)> = Vec::new();
    let mut tolerated = Tolerated::default();
    let mut ran: Vec<&str> = Vec::new();
    let mut summary = Vec::new();
    for (idx, c) in cases.iter().enumerate() {
        let head = format!(
            "== [{idx:02}] {} ({:?})\n   {}\n",
            c.name,
            c.status,
            c.pod
                .capture()
                .map(|cfg| cfg.command_line)
                .unwrap_or_else(|| "no istio-init (interceptionMode NONE)".into())
        );
        if let Some(only) = &only
            && !only.split(',').any(|o| c.name.contains(o))
        {
            continue;
        }
        if let Status::Skip(why) = c.status {
            let _ = write!(report, "{head}   skipped: {why}\n\n");
            summary.push(format!("{:<28} skipped", c.name));
            continue;
        }
        if let Some(progs) = foreign_cgroup_programs(node) {
            panic!(
                "cgroup programs attached above the node cgroup would run for the weir world \
                 too and make this comparison meaningless (is another agent attached to the \
                 root cgroup?):\n{progs}"
            );
        }
        let t = Instant::now();
        let conns = matrix(&c.pod.ports(), c.pod.has_vm());
        let (rows, rules) = run_case(&wn, idx, c, &conns);
        ran.push(c.name);
        let mut table = String::new();
        let mut diffs = 0;
        let mut unexpected = 0;
        for r in &rows {
            // Each tolerance is tried only when the outcomes differ, and
            // counted (docs/differential.md, "Tolerances").
            let exact = r.ipt == r.weir;
            let reuse = !exact && port_reuse_only(&r.ipt, &r.weir);
            let peer_port = !exact && !reuse && same_but_sidecar_peer_port(&r.ipt, &r.weir);
            let same = exact || reuse || peer_port;
            if !same {
                diffs += 1;
            }
            tolerated.port_reuse += usize::from(reuse);
            tolerated.peer_port_label += usize::from(peer_port);
            inbound_local_deviation += usize::from(same && r.applied.inbound_local);
            let gap = (!same).then(|| golden_gap(c.name, &r.key)).flatten();
            if gap.is_some() {
                gaps_seen.push((c.name, r.key.clone()));
            }
            let known = (!same && gap.is_none())
                .then(|| known_bug(c.name, &r.key))
                .flatten()
                .or(gap);
            if known.is_some() && gap.is_none() {
                known_seen.push((c.name, r.key.clone()));
            }
            let counts = c.status == Status::Compare
                && !same
                && gap.is_none()
                && (known.is_none() || strict);
            if counts {
                unexpected += 1;
            }
            let mark = if same {
                " "
            } else if known.is_some() {
                "k"
            } else if c.status == Status::Compare {
                "X"
            } else {
                "~"
            };
            let _ = writeln!(
                table,
                " {mark} {} {:<44} {}",
                r.label,
                r.desc,
                r.ipt.short()
            );
            if !same {
                let _ = writeln!(table, "        iptables: {}", r.ipt.long());
                let _ = writeln!(table, "        weir:     {}", r.weir.long());
                if let Some(why) = gap {
                    let _ = writeln!(table, "        golden weir cannot express: {why}");
                } else if let Some(why) = known {
                    let _ = writeln!(table, "        known weir bug: {why}");
                }
            }
        }
        let _ = writeln!(report, "{head}{table}");
        if c.status == Status::Compare {
            compared_cases += 1;
            compared += rows.len();
        }
        summary.push(format!(
            "{:<28} {:>2} differences {}({:.1}s)",
            c.name,
            diffs,
            match c.status {
                Status::Compare => "",
                Status::Pending(_) => "[pending, not failing] ",
                Status::Deviation(_) => "[documented deviation] ",
                Status::Skip(_) => "",
            },
            t.elapsed().as_secs_f32()
        ));
        if matches!(c.status, Status::Pending(_))
            && rows
                .iter()
                .all(|r| r.ipt == r.weir || known_bug(c.name, &r.key).is_some())
        {
            let _ = writeln!(
                report,
                "   {} now matches istio-iptables: set its status to Status::Compare\n",
                c.name
            );
        }
        if unexpected > 0 {
            let _ = write!(
                failures,
                "{head}   {unexpected} unexpected differences (X); istio-iptables rules:\n{}\n{table}\n",
                rules
                    .lines()
                    .map(|l| format!("      {l}"))
                    .collect::<Vec<_>>()
                    .join("\n")
            );
        }
    }
    for (list, seen, name) in [
        (known_bugs(), &known_seen, "known_bugs()"),
        (golden_gaps(), &gaps_seen, "golden_gaps()"),
    ] {
        for (c, l, _) in &list {
            // A filtered run only vouches for the configurations it ran.
            if !ran.contains(c) {
                continue;
            }
            if !seen.iter().any(|(sc, sl)| c == sc && l == sl) {
                let _ = writeln!(
                    failures,
                    "({c}, {l}) no longer differs: remove it from {name}"
                );
            }
        }
    }
    let per_mesh: Vec<String> = ["istio", "linkerd", "kuma"]
        .iter()
        .map(|m| {
            let compared: Vec<&Case> = cases
                .iter()
                .filter(|c| {
                    c.pod.ports().mesh == *m && c.status == Status::Compare && ran.contains(&c.name)
                })
                .collect();
            let n = compared.len();
            // Configurations with a VM get a few more rows.
            let conns: usize = compared
                .iter()
                .map(|c| matrix(&c.pod.ports(), c.pod.has_vm()).len())
                .sum();
            format!("{m} {n}: {conns}")
        })
        .collect();
    let goldens_compared = cases
        .iter()
        .filter(|c| {
            c.name.starts_with("golden-") && c.status == Status::Compare && ran.contains(&c.name)
        })
        .count();
    let totals = format!(
        "differential: {compared_cases} configurations ({}; {goldens_compared} of them the \
         peers' goldens) = {compared} outcomes compared in {:.0?}\n\
         tolerances: inbound listener local address (deviation 1) {} outcomes; ephemeral \
         port reuse {}; sidecar peer port label {}; golden gaps {}; known-bug differences {}",
        per_mesh.join(", "),
        started.elapsed(),
        inbound_local_deviation,
        tolerated.port_reuse,
        tolerated.peer_port_label,
        gaps_seen.len(),
        known_seen.len()
    );
    let totals = format!("{totals}\nweir world configured by: {}", wn.mode());
    println!("{report}\n{}\n{totals}", summary.join("\n"));
    if wn.k8s.is_none() {
        node.set_pods(&[]);
    }
    drop(wn);
    assert!(
        failures.is_empty(),
        "weir differs from istio-iptables:\n\n{failures}\n{}\n{totals}",
        summary.join("\n")
    );
    assert!(
        only.is_some() || inbound_local_deviation > 0,
        "inbound captures never observed"
    );
}

/// Istio's TPROXY goldens: weir refuses the pod (an annotation error that
/// names `sidecar.istio.io/interceptionMode`), and the pod is not
/// enrolled; another pod in the same file still is.
#[test]
fn weir_refuses_tproxy_goldens() {
    if !require_root() {
        return;
    }
    let node = Node::with_agent();
    let tproxy: Vec<IstioCase> = goldens::istio_cases()
        .into_iter()
        .filter(|c| {
            c.config.interception_mode == weir_tests::istio_iptables::InterceptionMode::Tproxy
        })
        .collect();
    assert_eq!(
        tproxy.len(),
        3,
        "tproxy, inbound-ports-tproxy, inbound-ports-wildcard-tproxy"
    );
    for c in &tproxy {
        // The golden exists and is a TPROXY rule set.
        let golden =
            goldens::istio_golden(&peer_file(&format!("istio-sidecar/{}.golden", c.name))).unwrap();
        assert!(golden.v4.contains("TPROXY"), "{}: {}", c.name, golden.v4);
        let ns = NetNs::new("dtpx");
        let ok_ns = NetNs::new("dtpo");
        let name = format!("tproxy-{}", c.name);
        let mut entry = PodEntry::new(&name, &ns, &[POD4]);
        // As the injector would configure it: its -d always holds 15090
        // and 15021 with -b '*' (these goldens were made without).
        let mut cfg = c.config.clone();
        if cfg.inbound_ports_include == "*" && cfg.inbound_ports_exclude.is_empty() {
            cfg.inbound_ports_exclude = "15090,15021,15020".into();
        }
        entry.annotations = cfg.weir_annotations().expect("expressible but for TPROXY");
        assert_eq!(entry.annotations[keys::INTERCEPTION_MODE], "TPROXY");
        let fine = PodEntry::new("tproxy-neighbour", &ok_ns, &["198.18.0.9"]);
        node.write_pods_yaml(&[entry, fine]);
        weir_tests::wait_until(
            Duration::from_secs(10),
            "the refusal in the agent's log",
            || {
                node.agent_logs().lines().any(|l| {
                    l.contains(&name) && l.contains(keys::INTERCEPTION_MODE) && l.contains("TPROXY")
                })
            },
        );
        weir_tests::wait_until(Duration::from_secs(10), "the neighbour enrolled", || {
            node.enrolled() == vec!["tproxy-neighbour".to_string()]
        });
    }
    node.set_pods(&[]);
}
