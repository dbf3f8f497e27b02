//! `weir status`: what is attached and enrolled, read from the pinned maps
//! (works while an agent runs and on a node where it crashed).

use std::path::Path;

use anyhow::Result;
use aya::maps::{Array, HashMap, Map, MapData, PerCpuArray, PerCpuHashMap, SockHash};
use serde::Serialize;
use weir_common::*;

use crate::datapath::Pins;
use crate::policy::ip_of;

/// Output format of `weir status`.
#[derive(Copy, Clone, Debug, clap::ValueEnum)]
pub enum Format {
    /// Human-readable.
    Text,
    /// JSON.
    Json,
}

/// One enrolled pod as the maps describe it.
#[derive(Debug, Serialize)]
pub struct PodStatus {
    /// Kubernetes namespace.
    pub namespace: String,
    /// Pod name.
    pub name: String,
    /// Netns cookie.
    pub netns_cookie: u64,
    /// Outbound capture port.
    pub outbound_port: u16,
    /// Inbound capture port.
    pub inbound_port: u16,
    /// Whether capture is on.
    pub capture: bool,
    /// `istio` ambient mode (ztunnel's in-pod rules, `POLICY_AMBIENT`),
    /// or `sidecar` (the sidecar meshes' rules).
    pub mode: &'static str,
    /// Primary IPv4 address.
    pub ip4: Option<String>,
    /// Primary IPv6 address.
    pub ip6: Option<String>,
    /// Whether its sk_lookup link is pinned.
    pub inbound_attached: bool,
    /// Why an ambient pod is ambient (`pod label ...`, `namespace label
    /// ...`), as the Kubernetes agent recorded it (`--state-file`).
    pub reason: Option<String>,
    /// Counters summed over CPUs.
    pub counters: Counters,
}

/// Counters of one pod.
#[derive(Debug, Serialize, Default)]
pub struct Counters {
    /// Outbound captured.
    pub outbound_captured: u64,
    /// Proxy-to-own-pod connections sent to the inbound port.
    pub outbound_to_inbound: u64,
    /// Inbound captured.
    pub inbound_captured: u64,
    /// Outbound not captured (all reasons: the sum of
    /// `weir_connections_bypassed_total{direction="outbound"}`).
    pub outbound_bypassed: u64,
    /// Inbound not captured.
    pub inbound_bypassed: u64,
    /// Refused while the proxy was not listening.
    pub fail_closed: u64,
    /// SO_ORIGINAL_DST answered.
    pub orig_dst_answered: u64,
    /// TCP connections to port 53 sent to the DNS port.
    pub dns_captured: u64,
    /// UDP sockets connect()ed to port 53 pointed at the DNS port.
    pub dns_udp_sockets_captured: u64,
    /// Datagrams of unconnected UDP sockets sent to the DNS port.
    pub dns_udp_datagrams_captured: u64,
    /// Connections from virtual interfaces sent to the outbound port.
    pub virt_captured: u64,
    /// Packets from virtual interfaces dropped (see `PodCounters`).
    pub virt_dropped: u64,
}

/// The socket-level fast path (`--fast-path`), node-wide.
#[derive(Debug, Serialize, Default)]
pub struct FastPathStatus {
    /// Whether new local connections join it.
    pub enabled: bool,
    /// Sockets in `FAST_SOCKS` now.
    pub sockets: usize,
    /// Sockets added since the maps were created.
    pub sockets_added: u64,
    /// Sockets that could not be added (map full).
    pub add_failed: u64,
    /// Messages moved socket to socket.
    pub msgs_redirected: u64,
    /// Bytes moved socket to socket.
    pub bytes_redirected: u64,
    /// Messages of fast-path sockets that went through TCP.
    pub msgs_passed: u64,
}

/// The whole status.
#[derive(Debug, Serialize)]
pub struct Status {
    /// Where the pins are.
    pub pin_dir: String,
    /// Whether the last agent finished a reconcile.
    pub ready: bool,
    /// Map layout version.
    pub layout_version: u32,
    /// Pinned links.
    pub links: Vec<String>,
    /// Enrolled pods.
    pub pods: Vec<PodStatus>,
    /// The fast path (absent with maps of an older layout).
    pub fast_path: Option<FastPathStatus>,
    /// Kernel features some annotations need and this kernel lacks, each
    /// with what is refused because of it (empty: all there).
    pub kernel_lacks: Vec<String>,
}

/// Reads the status from the pins under `bpffs`, with the reasons
/// recorded in `state_file`.
pub fn read(bpffs: &Path, state_file: &Path) -> Result<Status> {
    let reasons = crate::reasons::Reasons::read(state_file);
    let pins = Pins::new(bpffs);
    let policy: HashMap<MapData, u64, PodPolicy> =
        HashMap::try_from(Map::HashMap(pins.open_map("POD_POLICY")?))?;
    let meta: HashMap<MapData, u64, PodMeta> =
        HashMap::try_from(Map::HashMap(pins.open_map("POD_META")?))?;
    let counters: PerCpuHashMap<MapData, u64, PodCounters> =
        PerCpuHashMap::try_from(Map::PerCpuHashMap(pins.open_map("POD_COUNTERS")?))?;
    let wm: Array<MapData, WeirMeta> = Array::try_from(Map::Array(pins.open_map("WEIR_META")?))?;
    let wm = wm.get(&0, 0).unwrap_or_default();
    let mut links: Vec<String> = std::fs::read_dir(pins.links())
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    links.sort();
    let mut pods = Vec::new();
    for entry in policy.iter() {
        let (cookie, p) = entry?;
        let m = meta.get(&cookie, 0).unwrap_or_default();
        let c = counters
            .get(&cookie, 0)
            .map(|v| PodCounters::sum(v.iter()))
            .unwrap_or_default();
        let (namespace, name) = crate::datapath::pod_meta_names(&m);
        pods.push(PodStatus {
            reason: reasons
                .reason(&format!("{namespace}/{name}"), cookie)
                .map(str::to_string),
            namespace,
            name,
            netns_cookie: cookie,
            outbound_port: p.outbound_port,
            inbound_port: p.inbound_port,
            capture: p.flags & (POLICY_CAPTURE_OUTBOUND | POLICY_CAPTURE_INBOUND) != 0,
            mode: if p.flags & POLICY_AMBIENT != 0 {
                "ambient"
            } else {
                "sidecar"
            },
            ip4: (p.flags & POLICY_HAS_IP4 != 0).then(|| ip_of(&v4_mapped(p.pod_ip4)).to_string()),
            ip6: (p.flags & POLICY_HAS_IP6 != 0).then(|| ip_of(&p.pod_ip6).to_string()),
            inbound_attached: links.contains(&format!("netns-{cookie}")),
            counters: Counters {
                outbound_captured: c.outbound_captured,
                outbound_to_inbound: c.outbound_to_inbound,
                inbound_captured: c.inbound_captured,
                outbound_bypassed: crate::metrics::outbound_bypassed(&c)
                    .iter()
                    .map(|(_, v)| v)
                    .sum(),
                inbound_bypassed: c.inbound_bypass,
                fail_closed: c.inbound_fail_closed + c.outbound_fail_closed,
                orig_dst_answered: c.orig_dst_answered,
                dns_captured: c.dns_tcp_captured,
                dns_udp_sockets_captured: c.dns_udp_connects_captured,
                dns_udp_datagrams_captured: c.dns_udp_datagrams_captured,
                virt_captured: c.virt_captured,
                virt_dropped: c.virt_dropped,
            },
        });
    }
    pods.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
    Ok(Status {
        pin_dir: pins.root.display().to_string(),
        ready: wm.ready != 0,
        layout_version: wm.layout_version,
        links,
        pods,
        kernel_lacks: kernel_lacks(),
        fast_path: fast_path(&pins).ok(),
    })
}

fn fast_path(pins: &Pins) -> Result<FastPathStatus> {
    let switch: Array<MapData, u32> = Array::try_from(Map::Array(pins.open_map("FAST_PATH")?))?;
    let socks: SockHash<MapData, FastKey> =
        SockHash::try_from(Map::SockHash(pins.open_map("FAST_SOCKS")?))?;
    let node: PerCpuArray<MapData, NodeCounters> =
        PerCpuArray::try_from(Map::PerCpuArray(pins.open_map("NODE_COUNTERS")?))?;
    let n = node
        .get(&0, 0)
        .map(|v| NodeCounters::sum(v.iter()))
        .unwrap_or_default();
    Ok(FastPathStatus {
        enabled: switch.get(&0, 0).is_ok_and(|v| v != 0),
        sockets: socks.keys().filter(|k| k.is_ok()).count(),
        sockets_added: n.fast_sockets_added,
        add_failed: n.fast_add_failed,
        msgs_redirected: n.fast_msgs_redirected,
        bytes_redirected: n.fast_bytes_redirected,
        msgs_passed: n.fast_msgs_passed,
    })
}

/// Prints the status.
/// What the kernel lacks (see [`Status::kernel_lacks`]).
fn kernel_lacks() -> Vec<String> {
    crate::sys::virt_unsupported()
        .map(|why| format!("{why}: pods with that annotation are refused"))
        .into_iter()
        .collect()
}

pub fn print(bpffs: &Path, state_file: &Path, format: Format) -> Result<()> {
    let s = read(bpffs, state_file)?;
    match format {
        Format::Json => println!("{}", serde_json::to_string_pretty(&s)?),
        Format::Text => {
            println!(
                "pins:   {} (layout v{}, ready: {})",
                s.pin_dir, s.layout_version, s.ready
            );
            println!("links:  {}", s.links.join(", "));
            println!(
                "kernel: {} ({})",
                crate::sys::kernel_release(),
                if s.kernel_lacks.is_empty() {
                    "every feature weir uses".to_string()
                } else {
                    s.kernel_lacks.join("; ")
                }
            );
            if let Some(f) = &s.fast_path {
                println!(
                    "fast path: {}  sockets={} (added {}, add failed {})  redirected {} msgs / {} bytes, passed {} msgs",
                    if f.enabled { "on" } else { "off" },
                    f.sockets,
                    f.sockets_added,
                    f.add_failed,
                    f.msgs_redirected,
                    f.bytes_redirected,
                    f.msgs_passed
                );
            }
            println!("pods:   {}", s.pods.len());
            for p in &s.pods {
                println!(
                    "  {}/{}  mode={} cookie={} out=:{} in=:{} ip4={} ip6={} capture={} inbound_attached={}",
                    p.namespace,
                    p.name,
                    p.mode,
                    p.netns_cookie,
                    p.outbound_port,
                    p.inbound_port,
                    p.ip4.as_deref().unwrap_or("-"),
                    p.ip6.as_deref().unwrap_or("-"),
                    p.capture,
                    p.inbound_attached
                );
                if let Some(why) = &p.reason {
                    println!("      {} because: {why}", p.mode);
                }
                let c = &p.counters;
                println!(
                    "      captured out={} in={} out->in={}  bypassed out={} in={}  fail_closed={}  orig_dst_answered={}",
                    c.outbound_captured,
                    c.inbound_captured,
                    c.outbound_to_inbound,
                    c.outbound_bypassed,
                    c.inbound_bypassed,
                    c.fail_closed,
                    c.orig_dst_answered
                );
            }
        }
    }
    Ok(())
}
