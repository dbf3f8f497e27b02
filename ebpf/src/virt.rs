//! Virtual interfaces (`istio.io/reroute-virtual-interfaces`): tc, per pod
//! interface. A VM behind such an interface (KubeVirt) sends its traffic
//! through the pod; Istio's `PREROUTING -i IFACE -j REDIRECT` sends its TCP
//! connections to the outbound port. Those packets are forwarded, not
//! delivered, so no socket hook sees them: `weir_virt_in` rewrites them the
//! way REDIRECT's NAT does (destination: the interface's address and the
//! outbound port), and `weir_virt_out` rewrites the answers back.

use aya_ebpf::{bindings, macros::classifier, programs::TcContext};
use weir_common::*;

use crate::tables::*;

const TC_ACT_OK: i32 = bindings::TC_ACT_OK as i32;
const TC_ACT_SHOT: i32 = bindings::TC_ACT_SHOT as i32;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86DD;
const IPPROTO_TCP_U8: u8 = 6;
const BPF_F_PSEUDO_HDR: u64 = bindings::BPF_F_PSEUDO_HDR as u64;
const TCP_FLAG_SYN: u8 = 0x02;
const TCP_FLAG_ACK: u8 = 0x10;
/// Offset of the checksum in the TCP header.
const TCP_CSUM: usize = 16;
/// Other ports tried when a VM's port already names another rerouted
/// connection to the same interface address (conntrack's NAT would also
/// pick another source port then).
const VIRT_PORT_TRIES: u32 = 8;

/// The parts of a TCP packet the rewrite needs. Addresses are in the
/// packet's byte order (IPv4-mapped for IPv4); ports in host order.
struct TcpPacket {
    v6: bool,
    l3: usize,
    l4: usize,
    src: Addr,
    dst: Addr,
    sport: u16,
    dport: u16,
    flags: u8,
}

/// The TCP packet at `l3` (IPv4 without fragments, or IPv6 with TCP as the
/// first header), else `None` (left alone).
#[inline(always)]
fn tcp_packet(ctx: &TcContext, l3: usize) -> Option<TcpPacket> {
    let proto = u16::from_be(ctx.skb.protocol() as u16);
    let (v6, l4, src, dst) = if proto == ETH_P_IP {
        let vihl: u8 = ctx.load(l3).ok()?;
        let ihl = usize::from(vihl & 0x0f) * 4;
        if vihl >> 4 != 4 || ihl < 20 {
            return None;
        }
        let frag: u16 = ctx.load(l3 + 6).ok()?;
        if u16::from_be(frag) & 0x3fff != 0 {
            return None;
        }
        if ctx.load::<u8>(l3 + 9).ok()? != IPPROTO_TCP_U8 {
            return None;
        }
        let src: u32 = ctx.load(l3 + 12).ok()?;
        let dst: u32 = ctx.load(l3 + 16).ok()?;
        (false, l3 + ihl, v4_mapped(src), v4_mapped(dst))
    } else if proto == ETH_P_IPV6 {
        if ctx.load::<u8>(l3 + 6).ok()? != IPPROTO_TCP_U8 {
            return None;
        }
        let src: Addr = ctx.load(l3 + 8).ok()?;
        let dst: Addr = ctx.load(l3 + 24).ok()?;
        (true, l3 + 40, src, dst)
    } else {
        return None;
    };
    let sport: u16 = ctx.load(l4).ok()?;
    let dport: u16 = ctx.load(l4 + 2).ok()?;
    let flags: u8 = ctx.load(l4 + 13).ok()?;
    Some(TcpPacket {
        v6,
        l3,
        l4,
        src,
        dst,
        sport: u16::from_be(sport),
        dport: u16::from_be(dport),
        flags,
    })
}

/// Rewrites the source (`dst == false`) or destination address of `p` to
/// `new`, fixing the IPv4 header checksum and the TCP checksum.
#[inline(always)]
fn set_addr(ctx: &TcContext, p: &TcpPacket, dst: bool, new: &Addr) -> Result<(), i64> {
    let old = if dst { p.dst } else { p.src };
    let csum = p.l4 + TCP_CSUM;
    if p.v6 {
        for i in 0..4 {
            if old[i] != new[i] {
                ctx.l4_csum_replace(
                    csum,
                    u64::from(old[i]),
                    u64::from(new[i]),
                    BPF_F_PSEUDO_HDR | 4,
                )?;
            }
        }
        ctx.store(p.l3 + if dst { 24 } else { 8 }, new, 0)?;
    } else {
        let (o, n) = (u64::from(old[3]), u64::from(new[3]));
        ctx.l3_csum_replace(p.l3 + 10, o, n, 4)?;
        ctx.l4_csum_replace(csum, o, n, BPF_F_PSEUDO_HDR | 4)?;
        ctx.store(p.l3 + if dst { 16 } else { 12 }, &new[3], 0)?;
    }
    Ok(())
}

/// Rewrites the TCP port at `off` (0 source, 2 destination) from `old` to
/// `new` (host order), fixing the checksum.
#[inline(always)]
fn set_port(ctx: &TcContext, p: &TcpPacket, off: usize, old: u16, new: u16) -> Result<(), i64> {
    if old == new {
        return Ok(());
    }
    let (o, n) = (old.to_be(), new.to_be());
    ctx.l4_csum_replace(p.l4 + TCP_CSUM, u64::from(o), u64::from(n), 2)?;
    ctx.store(p.l4 + off, &n, 0)?;
    Ok(())
}

/// The netns cookie of the pod whose interface this copy of the tc
/// programs is attached to. tc programs cannot learn it from a packet
/// (`bpf_get_netns_cookie` answers the initial namespace for packets
/// without a socket), so the agent loads the two programs once per pod
/// with this constant set (`override_global`).
#[unsafe(no_mangle)]
static VIRT_NETNS_COOKIE: u64 = 0;

/// The pod and interface a tc program runs for, and what weir knows of it.
#[inline(always)]
fn virt_iface(ctx: &TcContext) -> Option<(u64, VirtIface)> {
    // SAFETY: a plain read of our own constant; volatile so that the
    // value set at load time is read, not the compile-time zero.
    let cookie = unsafe { core::ptr::read_volatile(&VIRT_NETNS_COOKIE) };
    if cookie == 0 {
        return None;
    }
    // SAFETY: field read on the program's own context.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    let key = VirtKey {
        netns_cookie: cookie,
        ifindex,
        _pad: 0,
    };
    // SAFETY: pointer from a successful lookup, read once.
    VIRT_IFACES.get_ptr(&key).map(|v| (cookie, unsafe { *v }))
}

/// Packets arriving from a virtual interface: TCP connections that Istio
/// would redirect go to the interface's address and the outbound port.
#[classifier]
pub fn weir_virt_in(ctx: TcContext) -> i32 {
    virt_in(&ctx)
}

#[inline(always)]
fn virt_in(ctx: &TcContext) -> i32 {
    let Some((cookie, vi)) = virt_iface(ctx) else {
        return TC_ACT_OK;
    };
    let Some(p) = tcp_packet(ctx, vi.l3_offset as usize) else {
        return TC_ACT_OK;
    };
    let key = virt_flow_key(cookie, &p, true);
    // A connection already rerouted: rewritten as decided at its SYN (like
    // conntrack's NAT), without looking at the policy again.
    // SAFETY: pointer from a successful lookup, read once.
    if let Some(flow) = VIRT_FLOWS.get_ptr(&key).map(|f| unsafe { *f }) {
        return virt_rewrite(ctx, cookie, &p, true, &flow);
    }
    let Some(policy) = pod_policy(cookie) else {
        return TC_ACT_OK;
    };
    let t = KernelTables::of(cookie, &policy);
    if decide_virt(&policy, &p.dst, &t) != Verdict::RedirectOutbound {
        return TC_ACT_OK;
    }
    if p.flags & (TCP_FLAG_SYN | TCP_FLAG_ACK) != TCP_FLAG_SYN {
        // Mid-connection without state (evicted, or begun before the
        // pod was enrolled): never let it reach the destination past the
        // proxy.
        return virt_drop(cookie);
    }
    match virt_new_flow(&policy, &vi, &p, &key) {
        Some(flow) => {
            bump_pod(cookie, PodCounter::VirtCaptured);
            virt_rewrite(ctx, cookie, &p, true, &flow)
        }
        None => virt_drop(cookie),
    }
}

/// The `VIRT_FLOWS` key of packet `p`: the VM's end is the source on the
/// way in (`way_in`), the destination on the way back.
#[inline(always)]
fn virt_flow_key(cookie: u64, p: &TcpPacket, way_in: bool) -> VirtFlowKey {
    let (peer_addr, local_addr, peer_port, local_port) = if way_in {
        (p.src, p.dst, p.sport, p.dport)
    } else {
        (p.dst, p.src, p.dport, p.sport)
    };
    VirtFlowKey {
        netns_cookie: cookie,
        peer_addr,
        local_addr,
        peer_port,
        local_port,
        _pad: 0,
    }
}

/// Rewrites packet `p` by `flow`: its pod-side end (the destination on the
/// way in, the source on the way back) becomes `flow.addr`:`flow.port`, the
/// VM's port `flow.peer_port`. A packet that cannot be rewritten is dropped.
#[inline(always)]
fn virt_rewrite(ctx: &TcContext, cookie: u64, p: &TcpPacket, way_in: bool, flow: &VirtFlow) -> i32 {
    let (local_off, local_port, peer_off, peer_port) = if way_in {
        (2, p.dport, 0, p.sport)
    } else {
        (0, p.sport, 2, p.dport)
    };
    let done = set_addr(ctx, p, way_in, &flow.addr)
        .and_then(|_| set_port(ctx, p, local_off, local_port, flow.port))
        .and_then(|_| set_port(ctx, p, peer_off, peer_port, flow.peer_port));
    if done.is_err() {
        return virt_drop(cookie);
    }
    TC_ACT_OK
}

#[inline(always)]
fn virt_drop(cookie: u64) -> i32 {
    bump_pod(cookie, PodCounter::VirtDropped);
    TC_ACT_SHOT
}

/// Records a new rerouted connection (both directions, and its original
/// destination for the proxy's `SO_ORIGINAL_DST`) and returns the rewrite
/// of its way in; `None` when it cannot be redirected (no address of its
/// family on the interface, no free port, full maps).
#[inline(always)]
fn virt_new_flow(
    policy: &PodPolicy,
    vi: &VirtIface,
    p: &TcpPacket,
    key: &VirtFlowKey,
) -> Option<VirtFlow> {
    // REDIRECT's address: the interface's own (it drops the packet when
    // the interface has none of that family).
    let local = if p.v6 {
        if vi.flags & VIRT_HAS6 == 0 {
            return None;
        }
        vi.addr6
    } else {
        if vi.flags & VIRT_HAS4 == 0 {
            return None;
        }
        v4_mapped(vi.addr4)
    };
    let out_port = policy.outbound_port;
    let back = VirtFlow {
        addr: p.dst,
        port: p.dport,
        peer_port: p.sport,
        _pad: 0,
    };
    // The VM's port, unless it already names another rerouted connection
    // (the VM may use one port towards two destinations; both would become
    // the same connection to the proxy).
    let mut port = p.sport;
    let mut free = false;
    for i in 0..VIRT_PORT_TRIES {
        let rkey = VirtFlowKey {
            netns_cookie: key.netns_cookie,
            peer_addr: p.src,
            local_addr: local,
            peer_port: port,
            local_port: out_port,
            _pad: 0,
        };
        // SAFETY: pointer from a successful lookup, read once.
        match VIRT_FLOWS.get_ptr(&rkey).map(|f| unsafe { *f }) {
            Some(f) if f != back => {
                let h = u32::from(p.sport)
                    .wrapping_mul(2_654_435_761)
                    .wrapping_add(u32::from(p.dport))
                    .wrapping_add(p.dst[3])
                    .wrapping_add((i + 1).wrapping_mul(40_503));
                port = 1024 + (h % 64_512) as u16;
            }
            _ => {
                if VIRT_FLOWS.insert(&rkey, &back, 0).is_err() {
                    return None;
                }
                free = true;
                break;
            }
        }
    }
    if !free {
        return None;
    }
    let way_in = VirtFlow {
        addr: local,
        port: out_port,
        peer_port: port,
        _pad: 0,
    };
    if VIRT_FLOWS.insert(key, &way_in, 0).is_err() {
        return None;
    }
    // The proxy's accepted socket will see peer = VM:port, local port =
    // the outbound port: the same hand-over as for the pod's own
    // connections (`on_passive_established`, or `original_dst` directly).
    let fk = FlowKey {
        netns_cookie: key.netns_cookie,
        peer_addr: p.src,
        peer_port: port,
        local_port: out_port,
        _pad: 0,
    };
    let od = OrigDst {
        addr: p.dst,
        port: p.dport,
        flags: ORIG_APP_SIDE,
        pod_id: policy.pod_id,
    };
    if PENDING_FLOWS.insert(&fk, &od, 0).is_err() {
        bump_node(NodeCounter::PendingInsertFailed);
    }
    Some(way_in)
}

/// Packets leaving through a virtual interface: the answers of rerouted
/// connections get their original addresses and ports back, so the VM
/// sees the destination it dialled.
#[classifier]
pub fn weir_virt_out(ctx: TcContext) -> i32 {
    virt_out(&ctx)
}

#[inline(always)]
fn virt_out(ctx: &TcContext) -> i32 {
    let Some((cookie, vi)) = virt_iface(ctx) else {
        return TC_ACT_OK;
    };
    let Some(p) = tcp_packet(ctx, vi.l3_offset as usize) else {
        return TC_ACT_OK;
    };
    let key = virt_flow_key(cookie, &p, false);
    // SAFETY: pointer from a successful lookup, read once.
    match VIRT_FLOWS.get_ptr(&key).map(|f| unsafe { *f }) {
        Some(flow) => virt_rewrite(ctx, cookie, &p, false, &flow),
        None => TC_ACT_OK,
    }
}
