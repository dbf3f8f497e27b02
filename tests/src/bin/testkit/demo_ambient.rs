//! `weir-testkit demo --ambient`: the same Bookinfo node with Istio's
//! ambient data plane instead of sidecars.
//!
//! The pods are ambient pods of weir (`mesh: ambient` in the pods file):
//! weir captures them in place (docs/ambient.md) and hands them to a real
//! ztunnel over ZDS (`weir run --zds-socket`). ztunnel runs in shared mode
//! in a network namespace of its own (`weir-demo-ztunnel`: its admin ports
//! stay private), with a local XDS file describing the pods as HBONE
//! workloads and its fake CA, the way tests/tests/zds.rs starts it. Its
//! process sits in the captured cgroup (`pods/ztunnel`): weir answers
//! `SO_ORIGINAL_DST` and marks ztunnel's connections into the pods (0x111)
//! from cgroup programs, which see only the processes of that cgroup.
//!
//! Each hop is matched with ztunnel's own access log (`LOG_FORMAT=json`,
//! one "connection complete" record per connection and direction): the
//! caller's proxy must have carried the call out over HBONE (its outbound
//! record: the application's address, `dst.hbone_addr` the destination
//! dialled, `dst.addr` port 15008) and the callee's proxy in (its inbound
//! record, with the caller's SPIFFE identity from mTLS). The demo's client
//! in the node namespace is not in the mesh: its request reaches
//! productpage's ztunnel in plain text (inbound, no HBONE).

use std::collections::{BTreeSet, HashSet};
use std::fmt::Write as _;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};

use serde_json::{Value, json};

use super::{HopIn, HopOut, HopStart, NAMESPACE, PODS, Pod};

/// ztunnel's network namespace (its admin, stats and readiness ports).
pub(super) const ZTUNNEL_NS: &str = "weir-demo-ztunnel";
/// ztunnel's HBONE port: it listens there in every pod it serves.
pub(super) const HBONE_PORT: u16 = 15008;
/// The node name ztunnel runs as, and the XDS workloads' node: ztunnel
/// serves only pods of its own node.
const NODE_NAME: &str = "weir-demo-node";
/// SPIFFE trust domain of the fake CA's certificates.
const TRUST_DOMAIN: &str = "cluster.local";

/// Where ztunnel's binary is cached by `cargo xtask ztunnel`.
pub(super) fn default_ztunnel_bin() -> Option<PathBuf> {
    std::env::var_os("HOME")
        .map(|h| PathBuf::from(h).join(".cache/weir/ztunnel/62d82653/bin/ztunnel"))
}

/// The pod's service account (Bookinfo's own names).
pub(super) fn service_account(pod: &Pod) -> String {
    format!("bookinfo-{}", pod.role.name())
}

/// The SPIFFE identity ztunnel's fake CA gives the pod.
fn identity(pod: &Pod) -> String {
    format!(
        "spiffe://{TRUST_DOMAIN}/ns/{NAMESPACE}/sa/{}",
        service_account(pod)
    )
}

/// ztunnel's local XDS file (`LOCAL_XDS_PATH`; ztunnel's `LocalConfig`):
/// every pod an HBONE workload on this node, and each Bookinfo service
/// (no VIP: without kube-proxy the applications dial pod addresses).
pub(super) fn local_xds() -> String {
    let mut s = String::from("# weir-testkit demo --ambient: ztunnel's local XDS\nworkloads:\n");
    for pod in PODS {
        let svc = pod.role.name();
        let _ = write!(
            s,
            "- uid: Kubernetes//Pod/{NAMESPACE}/{name}\n  name: {name}\n  namespace: {NAMESPACE}\n  \
             serviceAccount: {sa}\n  trustDomain: {TRUST_DOMAIN}\n  workloadIps: [\"{ip}\"]\n  \
             protocol: HBONE\n  node: {NODE_NAME}\n  network: \"\"\n  workloadName: {name}\n  \
             canonicalName: {svc}\n  canonicalRevision: {version}\n  services:\n    \
             \"{NAMESPACE}/{svc}.{NAMESPACE}.svc.cluster.local\":\n      {port}: {port}\n",
            name = pod.name,
            sa = service_account(pod),
            ip = pod.ip,
            version = pod.version,
            port = super::bookinfo::PORT,
        );
    }
    s.push_str("services:\n");
    let roles: BTreeSet<&str> = PODS.iter().map(|p| p.role.name()).collect();
    for svc in roles {
        let _ = write!(
            s,
            "- name: {svc}\n  namespace: {NAMESPACE}\n  hostname: {svc}.{NAMESPACE}.svc.cluster.local\n  \
             vips: []\n  ports:\n    {port}: {port}\n",
            port = super::bookinfo::PORT,
        );
    }
    s
}

/// ztunnel in shared mode on weir's ZDS socket with the demo's local XDS
/// (`weir_tests::ztunnel_command`), JSON logs with the access log at info.
pub(super) fn ztunnel_command(bin: &Path, socket: &Path, xds: &Path) -> std::process::Command {
    let mut cmd = weir_tests::ztunnel_command(bin, socket, xds, NODE_NAME);
    cmd.env("LOG_FORMAT", "json");
    cmd
}

/// Whether a TCP socket listens on `port` in the calling thread's network
/// namespace (`/proc/thread-self/net/tcp{,6}`, state 0A).
pub(super) fn listens(port: u16) -> bool {
    let port = format!(":{port:04X}");
    ["tcp", "tcp6"].iter().any(|f| {
        std::fs::read_to_string(format!("/proc/thread-self/net/{f}"))
            .unwrap_or_default()
            .lines()
            .skip(1)
            .any(|l| {
                let cols: Vec<&str> = l.split_whitespace().collect();
                cols.len() > 3 && cols[1].ends_with(&port) && cols[3] == "0A"
            })
    })
}

/// ztunnel's access log records ("connection complete"), in log order.
pub(super) fn access_records(log_text: &str) -> Vec<Value> {
    log_text
        .lines()
        .filter(|l| l.starts_with('{'))
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v["scope"] == json!("access") && v["message"] == json!("connection complete"))
        .collect()
}

fn field<'a>(r: &'a Value, name: &str) -> &'a str {
    r[name].as_str().unwrap_or("")
}

fn ip_of(addr: &str) -> Option<IpAddr> {
    addr.parse::<SocketAddr>().ok().map(|a| a.ip())
}

/// The first unused record that `pred` accepts; marks it used.
fn take<'a>(
    records: &'a [Value],
    used: &mut HashSet<usize>,
    pred: impl Fn(&Value) -> bool,
) -> Option<(usize, &'a Value)> {
    let found = records
        .iter()
        .enumerate()
        .find(|(i, r)| !used.contains(i) && pred(r));
    if let Some((i, _)) = found {
        used.insert(i);
    }
    found
}

/// Checks one hop against ztunnel's access log, then the calls made while
/// serving it. `used` holds the records already matched (a record stands
/// for one connection).
pub(super) fn walk(
    hop: &HopIn,
    records: &[Value],
    used: &mut HashSet<usize>,
    out: &mut Vec<HopOut>,
) {
    let HopStart {
        from,
        target,
        to,
        mut problems,
    } = HopStart::of(hop);
    let mut lines = Vec::new();
    let errored = |r: &Value| r["level"] != json!("info") || !field(r, "error").is_empty();
    match (hop.from, target) {
        (_, None) => problems.push(format!("{} is not a pod of the demo", hop.dst)),
        // Pod to pod: out through the caller's ztunnel over HBONE, in
        // through the callee's.
        (Some(caller), Some(t)) => {
            let outbound = take(records, used, |r| {
                field(r, "direction") == "outbound"
                    && field(r, "src.addr") == hop.local
                    && field(r, "dst.hbone_addr") == hop.dst
            });
            match outbound {
                Some((_, r)) => {
                    let want = SocketAddr::from((t.ip, HBONE_PORT)).to_string();
                    if field(r, "dst.addr") != want {
                        problems.push(format!(
                            "{}'s ztunnel connected to {}, not to {want} (HBONE)",
                            caller.name,
                            field(r, "dst.addr")
                        ));
                    }
                    if field(r, "dst.identity") != identity(t) {
                        problems.push(format!(
                            "{}'s ztunnel saw peer identity {:?}, not {} (mTLS)",
                            caller.name,
                            field(r, "dst.identity"),
                            identity(t)
                        ));
                    }
                    if errored(r) {
                        problems.push(format!(
                            "{}'s ztunnel logged an error: {}",
                            caller.name,
                            field(r, "error")
                        ));
                    }
                    lines.push(format!(
                        "        {:<24} outbound  app {} -> HBONE {} (mTLS, peer {})",
                        format!("{} ztunnel", caller.name),
                        hop.local,
                        field(r, "dst.addr"),
                        field(r, "dst.identity"),
                    ));
                }
                None => problems.push(format!(
                    "no outbound HBONE connection from {} to {} in ztunnel's access log: the call was not captured",
                    hop.local, hop.dst
                )),
            }
            let inbound = take(records, used, |r| {
                field(r, "direction") == "inbound"
                    && field(r, "dst.hbone_addr") == hop.dst
                    && ip_of(field(r, "src.addr")) == Some(IpAddr::V4(caller.ip))
            });
            match inbound {
                Some((_, r)) => {
                    if field(r, "src.identity") != identity(caller) {
                        problems.push(format!(
                            "{}'s ztunnel saw client identity {:?}, not {} (mTLS)",
                            t.name,
                            field(r, "src.identity"),
                            identity(caller)
                        ));
                    }
                    if errored(r) {
                        problems.push(format!(
                            "{}'s ztunnel logged an error: {}",
                            t.name,
                            field(r, "error")
                        ));
                    }
                    lines.push(format!(
                        "        {:<24} inbound   HBONE from {} ({}) -> app {}",
                        format!("{} ztunnel", t.name),
                        field(r, "src.addr"),
                        field(r, "src.identity"),
                        hop.dst,
                    ));
                }
                None => problems.push(format!(
                    "no inbound HBONE connection for {} from {} in ztunnel's access log: the request reached {} without its ztunnel",
                    hop.dst, caller.ip, t.name
                )),
            }
            check_transparent(hop, caller.ip.into(), t, &mut problems);
        }
        // The node's client (not in the mesh): plain text into the
        // callee's ztunnel.
        (None, Some(t)) => {
            let inbound = take(records, used, |r| {
                field(r, "direction") == "inbound"
                    && field(r, "src.addr") == hop.local
                    && field(r, "dst.addr") == hop.dst
            });
            match inbound {
                Some((_, r)) => {
                    if errored(r) {
                        problems.push(format!(
                            "{}'s ztunnel logged an error: {}",
                            t.name,
                            field(r, "error")
                        ));
                    }
                    lines.push(format!(
                        "        {:<24} inbound   plain text from {} (not in the mesh) -> app {}",
                        format!("{} ztunnel", t.name),
                        hop.local,
                        hop.dst,
                    ));
                }
                None => problems.push(format!(
                    "no inbound connection from {} in ztunnel's access log: the request reached {} without its ztunnel",
                    hop.local, t.name
                )),
            }
            if let Some(ip) = ip_of(&hop.local) {
                check_transparent(hop, ip, t, &mut problems);
            }
        }
    }
    out.push(HopOut::report(from, &to, lines, &problems));
    let callee = hop.response["pod"].as_str().and_then(Pod::by_name);
    for next in super::calls_of(hop, callee) {
        walk(&next, records, used, out);
    }
}

/// ztunnel connects to the application from the client's own address (a
/// transparent socket): the application must see the caller's address.
fn check_transparent(hop: &HopIn, caller: IpAddr, callee: &Pod, problems: &mut Vec<String>) {
    let served = hop.response["served"]["peer"].as_str().unwrap_or("");
    if ip_of(served) != Some(caller) {
        problems.push(format!(
            "{}'s application was reached from {served:?}, not from the caller's address {caller}",
            callee.name
        ));
    }
}

/// The explain calls the ambient demo prints: (what, arguments).
pub(super) fn explains() -> Vec<(&'static str, Vec<String>)> {
    let pp = &PODS[0];
    let details = &PODS[1];
    let pod = |p: &Pod| format!("{NAMESPACE}/{}", p.name);
    vec![
        (
            "the application's call to details",
            vec![
                "explain".into(),
                "--pod".into(),
                pod(pp),
                "--dst".into(),
                details.addr().to_string(),
            ],
        ),
        (
            "ztunnel's own HBONE connection (mark 0x539)",
            vec![
                "explain".into(),
                "--pod".into(),
                pod(pp),
                "--dst".into(),
                SocketAddr::from((details.ip, HBONE_PORT)).to_string(),
                "--mark".into(),
                "0x539".into(),
            ],
        ),
        (
            "a plain-text request arriving at details",
            vec![
                "explain".into(),
                "--pod".into(),
                pod(details),
                "--dst".into(),
                details.addr().to_string(),
                "--inbound".into(),
            ],
        ),
        (
            "HBONE arriving at details",
            vec![
                "explain".into(),
                "--pod".into(),
                pod(details),
                "--dst".into(),
                SocketAddr::from((details.ip, HBONE_PORT)).to_string(),
                "--inbound".into(),
            ],
        ),
    ]
}

/// A hint for the interactive run: where ztunnel's side is.
pub(super) fn hint(log: &Path) -> String {
    format!(
        "ztunnel's access log: {}; its admin: ip netns exec {ZTUNNEL_NS} curl -s localhost:15000/config_dump",
        log.display()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(
        dir: &str,
        src: &str,
        dst: &str,
        hbone: Option<&str>,
        src_id: &str,
        dst_id: &str,
    ) -> Value {
        let mut r = json!({
            "level": "info", "scope": "access", "message": "connection complete",
            "direction": dir, "src.addr": src, "dst.addr": dst,
        });
        if let Some(h) = hbone {
            r["dst.hbone_addr"] = json!(h);
        }
        if !src_id.is_empty() {
            r["src.identity"] = json!(src_id);
        }
        if !dst_id.is_empty() {
            r["dst.identity"] = json!(dst_id);
        }
        r
    }

    const PP: &str = "spiffe://cluster.local/ns/default/sa/bookinfo-productpage";
    const DET: &str = "spiffe://cluster.local/ns/default/sa/bookinfo-details";

    fn entry() -> HopIn {
        let details =
            json!({"pod": "details-v1", "served": {"peer": "198.18.0.10:5555"}, "calls": []});
        let body = json!({
            "pod": "productpage-v1", "ok": true, "served": {"peer": "198.18.0.1:1000"},
            "calls": [{"service": "details", "dst": "198.18.0.11:9080", "local": "198.18.0.10:2100",
                       "peer": "198.18.0.11:9080", "ok": true, "status": 200, "response": details}]
        });
        HopIn {
            from: None,
            local: "198.18.0.1:1000".into(),
            dst: "198.18.0.10:9080".into(),
            service: "productpage".into(),
            peer: None,
            ok: true,
            error: None,
            response: body,
        }
    }

    #[test]
    fn hops_are_matched_with_ztunnel_access_logs() {
        let records = vec![
            rec(
                "outbound",
                "198.18.0.10:2100",
                "198.18.0.11:15008",
                Some("198.18.0.11:9080"),
                "",
                DET,
            ),
            rec(
                "inbound",
                "198.18.0.10:40000",
                "198.18.0.11:9080",
                Some("198.18.0.11:9080"),
                PP,
                "",
            ),
            rec(
                "inbound",
                "198.18.0.1:1000",
                "198.18.0.10:9080",
                None,
                "",
                "",
            ),
        ];
        let mut hops = Vec::new();
        walk(&entry(), &records, &mut HashSet::new(), &mut hops);
        assert_eq!(hops.len(), 2);
        assert!(
            hops.iter().all(|h| h.ok),
            "{:?}",
            hops.iter().map(|h| &h.lines).collect::<Vec<_>>()
        );

        // Plain TCP between the pods (no HBONE record): not accepted.
        let plain = vec![
            rec(
                "outbound",
                "198.18.0.10:2100",
                "198.18.0.11:9080",
                None,
                "",
                "",
            ),
            rec(
                "inbound",
                "198.18.0.10:40000",
                "198.18.0.11:9080",
                None,
                "",
                "",
            ),
            records[2].clone(),
        ];
        let mut hops = Vec::new();
        walk(&entry(), &plain, &mut HashSet::new(), &mut hops);
        assert!(hops[0].ok && !hops[1].ok);
        assert!(
            hops[1].lines.join("\n").contains("not captured"),
            "{:?}",
            hops[1].lines
        );

        // A record already matched by an earlier hop is not used twice.
        let mut used = HashSet::from([1]);
        let mut hops = Vec::new();
        walk(&entry(), &records, &mut used, &mut hops);
        assert!(!hops[1].ok, "{:?}", hops[1].lines);
    }

    #[test]
    fn local_xds_describes_every_pod_as_hbone() {
        let x = local_xds();
        assert_eq!(x.matches("protocol: HBONE").count(), PODS.len(), "{x}");
        assert!(x.contains("serviceAccount: bookinfo-reviews"), "{x}");
        assert!(x.contains("workloadIps: [\"198.18.0.15\"]"), "{x}");
        assert!(
            x.contains("hostname: ratings.default.svc.cluster.local"),
            "{x}"
        );
    }

    #[test]
    fn only_access_records_are_read() {
        let log = "{\"level\":\"info\",\"scope\":\"access\",\"message\":\"connection complete\",\"direction\":\"inbound\"}\n\
                   {\"level\":\"info\",\"scope\":\"ztunnel::inpod\",\"message\":\"pod added\"}\nnot json\n";
        assert_eq!(access_records(log).len(), 1);
    }
}
