//! weir's kernel programs.
//!
//! | program            | hook                   | job                                                       |
//! |--------------------|------------------------|-----------------------------------------------------------|
//! | `weir_connect4/6`  | cgroup connect4/6      | outbound capture: rewrite the destination to the proxy    |
//! | `weir_getpeer4/6`  | cgroup getpeername4/6  | the application still sees the address it dialled         |
//! | `weir_sockops`     | cgroup sock_ops        | record proxy listeners; hand original destinations over   |
//! | `weir_getsockopt`  | cgroup getsockopt      | answer `SO_ORIGINAL_DST` / `IP6T_SO_ORIGINAL_DST`          |
//! | `weir_sk_lookup`   | sk_lookup (per pod)    | inbound capture: pick the proxy's listener, fail closed   |
//! | `weir_fast_redirect` | sk_msg on `FAST_SOCKS` | fast path (opt-in): local bytes go socket to socket     |
//! | `weir_virt_in/out` | tc ingress/egress (TCX) of a pod's virtual interfaces | `reroute-virtual-interfaces`: TCP from a VM to the outbound port, and back |
//!
//! A pod is identified by its network-namespace cookie. Every decision is
//! taken by `weir_common::decide_*`, shared with the agent; this file only
//! reads contexts, looks up maps and applies verdicts.
#![no_std]
#![no_main]

mod tables;

/// Kernel log records (aya-log), gated by the `LOG_LEVEL` map so that a
/// disabled level costs one array lookup. Levels: 1 error .. 5 trace.
macro_rules! klog {
    (warn, $ctx:expr, $($arg:tt)+) => {
        if crate::tables::log_enabled(2) { aya_log_ebpf::warn!($ctx, $($arg)+) }
    };
    (info, $ctx:expr, $($arg:tt)+) => {
        if crate::tables::log_enabled(3) { aya_log_ebpf::info!($ctx, $($arg)+) }
    };
    (debug, $ctx:expr, $($arg:tt)+) => {
        if crate::tables::log_enabled(4) { aya_log_ebpf::debug!($ctx, $($arg)+) }
    };
    (trace, $ctx:expr, $($arg:tt)+) => {
        if crate::tables::log_enabled(5) { aya_log_ebpf::trace!($ctx, $($arg)+) }
    };
}

mod ambient;

use aya_ebpf::{
    EbpfContext as _,
    bindings::{BPF_F_INGRESS, bpf_sock, bpf_sock_addr, sk_action},
    helpers::generated::{bpf_bind, bpf_get_current_uid_gid, bpf_get_netns_cookie, bpf_sk_release},
    macros::{cgroup_sock_addr, cgroup_sockopt, classifier, sk_lookup, sk_msg, sock_ops},
    programs::{
        SkLookupContext, SkMsgContext, SockAddrContext, SockOpsContext, SockoptContext, TcContext,
    },
};
use weir_common::*;

use crate::tables::*;

const SOCK_STREAM: u32 = 1;
const SOCK_DGRAM: u32 = 2;
const IPPROTO_TCP: u32 = 6;
const SOL_IP: i32 = 0;
const SOL_IPV6: i32 = 41;
/// `SO_ORIGINAL_DST` (linux/netfilter_ipv4.h) and `IP6T_SO_ORIGINAL_DST`
/// (linux/netfilter_ipv6/ip6_tables.h) share the number 80.
const SO_ORIGINAL_DST: i32 = 80;
const LOOPBACK_IFINDEX: u32 = 1;
/// Beyond this, cgroup sockopt programs only see the first page of optval.
const PAGE_SIZE: i32 = 4096;
const TCP_SYN_SENT: u32 = 2;
const TCP_CLOSE: u32 = 7;
const BPF_SOCK_OPS_TCP_CONNECT_CB: u32 = 3;
const BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB: u32 = 4;
const BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB: u32 = 5;
const BPF_SOCK_OPS_STATE_CB: u32 = 10;
const BPF_SOCK_OPS_TCP_LISTEN_CB: u32 = 11;
const BPF_SOCK_OPS_STATE_CB_FLAG: i32 = 4;

const V4_LOCALHOST: u32 = u32::from_ne_bytes([127, 0, 0, 1]);
const IPPROTO_UDP: u32 = 17;

/// The `LISTENERS` key of the pod's DNS proxy socket (UDP, bound to
/// loopback, adopted by the agent) for queries from `from`'s family.
#[inline(always)]
fn dns_proxy_key(cookie: u64, from: &Addr, dns_port: u16) -> ListenerKey {
    ListenerKey {
        netns_cookie: cookie,
        port: dns_port,
        family: if is_v4_mapped(from) {
            AF_INET
        } else {
            AF_INET6
        } as u16,
        protocol: LISTENER_UDP,
    }
}

/// Whether weir holds the pod's DNS proxy socket for `from`'s family.
#[inline(always)]
fn dns_proxy_known(cookie: u64, from: &Addr, dns_port: u16) -> bool {
    let key = dns_proxy_key(cookie, from, dns_port);
    // SAFETY: a lookup in our sockhash returns a referenced socket (or
    // NULL), released right away: only its presence matters.
    unsafe {
        let sk = aya_ebpf::helpers::generated::bpf_map_lookup_elem(
            core::ptr::from_ref(&LISTENERS).cast_mut().cast(),
            (&key as *const ListenerKey).cast(),
        );
        if sk.is_null() {
            return false;
        }
        bpf_sk_release(sk);
    }
    true
}

/// Reads a 4-word address from a context or socket field one word at a
/// time: the verifier rejects the pointer arithmetic LLVM emits when it
/// copies the array as a whole ("dereference of modified ctx ptr").
#[inline(always)]
fn read_words(p: *const [u32; 4]) -> Addr {
    let p = p as *const u32;
    // SAFETY: `p` points at a readable 16-byte field; volatile keeps each
    // access a separate, fixed-offset 4-byte load.
    unsafe {
        [
            core::ptr::read_volatile(p),
            core::ptr::read_volatile(p.add(1)),
            core::ptr::read_volatile(p.add(2)),
            core::ptr::read_volatile(p.add(3)),
        ]
    }
}

/// Writes a 4-word address into a context field one word at a time.
#[inline(always)]
fn write_words(p: *mut [u32; 4], a: Addr) {
    let p = p as *mut u32;
    // SAFETY: `p` points at a writable 16-byte context field.
    unsafe {
        core::ptr::write_volatile(p, a[0]);
        core::ptr::write_volatile(p.add(1), a[1]);
        core::ptr::write_volatile(p.add(2), a[2]);
        core::ptr::write_volatile(p.add(3), a[3]);
    }
}

// ---------------------------------------------------------------------------
// Outbound: connect4 / connect6
// ---------------------------------------------------------------------------

/// Outbound capture for IPv4 sockets.
#[cgroup_sock_addr(connect4)]
pub fn weir_connect4(ctx: SockAddrContext) -> i32 {
    connect(&ctx, false)
}

/// Outbound capture for IPv6 sockets (also IPv4-mapped destinations).
#[cgroup_sock_addr(connect6)]
pub fn weir_connect6(ctx: SockAddrContext) -> i32 {
    connect(&ctx, true)
}

/// Returns 1 to let `connect()` proceed (possibly to a rewritten address),
/// 0 to refuse it with `EPERM` (only when a redirect could not be recorded:
/// the proxy could not know where the connection was going).
#[inline(always)]
fn connect(ctx: &SockAddrContext, v6: bool) -> i32 {
    // SAFETY: the kernel passes a valid bpf_sock_addr for the program's
    // lifetime; field reads are checked by the verifier.
    let sa: &mut bpf_sock_addr = unsafe { &mut *ctx.sock_addr };
    let udp = match sa.type_ {
        SOCK_STREAM => false,
        SOCK_DGRAM => true,
        _ => return 1,
    };
    // SAFETY: plain helper call on our own context.
    let cookie = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    let Some(policy) = pod_policy_ref(cookie) else {
        if !udp {
            bump_node(|c| c.not_enrolled += 1);
        }
        return 1;
    };
    let dst: Addr = if v6 {
        read_words(&sa.user_ip6)
    } else {
        v4_mapped(sa.user_ip4)
    };
    let dport = u16::from_be(sa.user_port as u16);
    // SAFETY: `sk` is always set (non-NULL) for sock_addr programs.
    let sk: &bpf_sock = unsafe { &*sa.__bindgen_anon_1.sk };
    let src: Addr = if v6 {
        read_words(&sk.src_ip6)
    } else {
        v4_mapped(sk.src_ip4)
    };
    let ids = unsafe { bpf_get_current_uid_gid() };
    let q = OutboundQuery {
        dst,
        dport,
        src,
        uid: ids as u32,
        gid: (ids >> 32) as u32,
        udp,
    };
    let mut t = KernelTables::of(cookie, policy);
    // Asked by the rules (is it a loopback route?) and below (bind the
    // pod's own address?): one lookup for both.
    if !is_loopback_addr(&dst) {
        t.learn_pod_addr(&dst);
    }
    let verdict = if policy.flags & POLICY_AMBIENT != 0 {
        ambient::outbound(policy, &q, sk, &t)
    } else {
        decide_outbound(policy, &q, &t)
    };
    bump_pod(cookie, |c| {
        if udp {
            count_udp_connect(c, verdict, dport)
        } else {
            count_outbound(c, verdict)
        }
    });
    klog!(
        trace,
        ctx,
        "connect pod={} dst={:i}:{} uid={} udp={} verdict={}",
        policy.pod_id,
        addr_octets(&dst),
        dport,
        q.uid,
        udp as u8,
        verdict as u32
    );
    let (port, flags) = match verdict {
        Verdict::RedirectOutbound => (policy.outbound_port, ORIG_APP_SIDE),
        Verdict::RedirectInbound => (policy.inbound_port, ORIG_APP_SIDE | ORIG_TO_INBOUND),
        Verdict::RedirectDns => (policy.dns_port, ORIG_APP_SIDE | ORIG_DNS),
        _ => return 1,
    };

    // Remember where the application was going, on its own socket; the
    // sockops program hands it to the proxy's socket once it is accepted.
    let od = OrigDst {
        addr: dst,
        port: dport,
        flags,
        pod_id: policy.pod_id,
    };
    if !store_orig_dst((sk as *const bpf_sock).cast_mut(), od) {
        bump_node(|c| c.orig_dst_store_failed += 1);
        klog!(
            warn,
            ctx,
            "pod {}: cannot store the original destination; connect refused",
            policy.pod_id
        );
        return 0;
    }

    // With iptables REDIRECT the connection keeps the source address the
    // kernel picks for the original destination (the pod IP for remote
    // destinations and for the pod's own IP, 127.0.0.1 for 127.0.0.0/8),
    // so the proxy sees the application as its peer. Bind that address
    // before the destination turns into loopback. An explicit bind by the
    // application is left alone.
    let unbound = sk.src_port == 0 && is_unspecified(&src);
    if unbound {
        let on_lo_local = t.is_pod_addr(&dst);
        let remote = !on_lo_local && !is_loopback_addr(&dst);
        if on_lo_local || remote {
            if bind_source(sa, policy, &dst, v6, on_lo_local, cookie).is_err() {
                bump_pod(cookie, |c| c.source_bind_failed += 1);
            }
        }
    }

    // A UDP socket bound to the wildcard address with a port (a resolver
    // library's usual socket) cannot get a source address bound any more,
    // and towards loopback the kernel would pick 127.0.0.1 / ::1: the DNS
    // proxy would see its query come from loopback, where REDIRECT keeps
    // the pod's address. Send it to the pod's own address and the DNS
    // port instead: the kernel picks the pod's address as source, and
    // `weir_sk_lookup` hands the datagram to the DNS proxy's loopback
    // socket (its answers get the pod's address as source in
    // `weir_sendmsg`). Only once the agent has recorded that socket in
    // `LISTENERS` (it looks on every pass); until then, loopback.
    if verdict == Verdict::RedirectDns && udp && sk.src_port != 0 {
        if is_unspecified(&src) && !is_loopback_route(&dst, &t) {
            if let Some(from) = source_for(policy, &dst, cookie) {
                let family_ok = v6 || is_v4_mapped(&from);
                if family_ok && dns_proxy_known(cookie, &from, policy.dns_port) {
                    if v6 {
                        write_words(&mut sa.user_ip6, from);
                    } else {
                        sa.user_ip4 = v4_word(&from);
                    }
                    sa.user_port = u32::from(port.to_be());
                    return 1;
                }
            }
        }
    }

    // Rewrite the destination: the proxy listens on loopback.
    if v6 {
        if is_v4_mapped(&dst) {
            write_words(&mut sa.user_ip6, v4_mapped(V4_LOCALHOST));
        } else {
            write_words(
                &mut sa.user_ip6,
                [0, 0, 0, u32::from_ne_bytes([0, 0, 0, 1])],
            );
        }
    } else {
        sa.user_ip4 = V4_LOCALHOST;
    }
    sa.user_port = u32::from(port.to_be());
    1
}

#[repr(C)]
struct SockaddrIn {
    family: u16,
    port: u16,
    addr: u32,
    zero: [u8; 8],
}

#[repr(C)]
struct SockaddrIn6 {
    family: u16,
    port: u16,
    flowinfo: u32,
    addr: Addr,
    scope_id: u32,
}

/// The source address the kernel would choose for a remote `dst`: the
/// pod's address on the subnet of `dst` when it has one (a second
/// interface), else its primary address of that family.
#[inline(always)]
fn source_for(p: &PodPolicy, dst: &Addr, cookie: u64) -> Option<Addr> {
    if p.tables & TABLE_SRC_ROUTES != 0
        && let Some(a) = source_route(cookie, dst)
    {
        return Some(a);
    }
    if is_v4_mapped(dst) {
        (p.flags & POLICY_HAS_IP4 != 0).then(|| v4_mapped(p.pod_ip4))
    } else {
        (p.flags & POLICY_HAS_IP6 != 0).then_some(p.pod_ip6)
    }
}

/// Binds the source address the kernel would have chosen for `dst`.
#[inline(always)]
fn bind_source(
    sa: &mut bpf_sock_addr,
    p: &PodPolicy,
    dst: &Addr,
    v6: bool,
    dst_is_pod_addr: bool,
    cookie: u64,
) -> Result<(), ()> {
    let src: Addr = if dst_is_pod_addr {
        *dst
    } else {
        match source_for(p, dst, cookie) {
            Some(a) => a,
            None => return Ok(()),
        }
    };
    let ret = if v6 {
        let mut a = SockaddrIn6 {
            family: AF_INET6 as u16,
            port: 0,
            flowinfo: 0,
            addr: src,
            scope_id: 0,
        };
        // SAFETY: bpf_bind reads `addr_len` bytes of our stack sockaddr.
        unsafe {
            bpf_bind(
                sa,
                (&mut a as *mut SockaddrIn6).cast(),
                core::mem::size_of::<SockaddrIn6>() as i32,
            )
        }
    } else {
        let mut a = SockaddrIn {
            family: AF_INET as u16,
            port: 0,
            addr: v4_word(&src),
            zero: [0; 8],
        };
        // SAFETY: as above.
        unsafe {
            bpf_bind(
                sa,
                (&mut a as *mut SockaddrIn).cast(),
                core::mem::size_of::<SockaddrIn>() as i32,
            )
        }
    };
    if ret == 0 { Ok(()) } else { Err(()) }
}

#[inline(always)]
fn count_outbound(c: &mut PodCounters, v: Verdict) {
    match v {
        Verdict::RedirectOutbound => c.outbound_captured += 1,
        Verdict::RedirectInbound => c.outbound_to_inbound += 1,
        Verdict::BypassExcludedPort => c.bypass_excluded_port += 1,
        Verdict::BypassPassthrough => c.bypass_passthrough += 1,
        Verdict::BypassLoopback => c.bypass_loopback += 1,
        Verdict::BypassProxy => c.bypass_proxy += 1,
        Verdict::BypassLocalhost => c.bypass_localhost += 1,
        Verdict::BypassExcludedCidr => c.bypass_excluded_cidr += 1,
        Verdict::BypassNotIncluded => c.bypass_not_included += 1,
        Verdict::BypassOwnerGroup => c.bypass_owner_group += 1,
        Verdict::BypassExcludedInterface => c.bypass_excluded_iface += 1,
        Verdict::BypassNoRoute => c.bypass_not_included += 1,
        Verdict::RedirectDns => c.dns_tcp_captured += 1,
        Verdict::BypassZtunnel => c.bypass_proxy += 1,
        Verdict::BypassTunnel | Verdict::BypassDisabled => {}
    }
}

/// Counts a UDP socket's `connect()`: only those to port 53 (the only UDP
/// weir ever captures), in sockets, apart from the TCP connections.
#[inline(always)]
fn count_udp_connect(c: &mut PodCounters, v: Verdict, dport: u16) {
    if dport != 53 {
        return;
    }
    if v == Verdict::RedirectDns {
        c.dns_udp_connects_captured += 1;
    } else {
        c.dns_udp_connects_bypassed += 1;
    }
}

// ---------------------------------------------------------------------------
// DNS over unconnected UDP: sendmsg4/6 and recvmsg4/6
// ---------------------------------------------------------------------------

/// DNS capture for unconnected UDP sockets: a datagram to port 53 that
/// Istio's rules would redirect goes to the pod's DNS port instead.
#[cgroup_sock_addr(sendmsg4)]
pub fn weir_sendmsg4(ctx: SockAddrContext) -> i32 {
    sendmsg(&ctx, false)
}

/// IPv6 twin of [`weir_sendmsg4`].
#[cgroup_sock_addr(sendmsg6)]
pub fn weir_sendmsg6(ctx: SockAddrContext) -> i32 {
    sendmsg(&ctx, true)
}

#[inline(always)]
fn sendmsg(ctx: &SockAddrContext, v6: bool) -> i32 {
    // SAFETY: valid context, see `connect`.
    let sa: &mut bpf_sock_addr = unsafe { &mut *ctx.sock_addr };
    let dport = u16::from_be(sa.user_port as u16);
    if dport != 53 {
        // Only DNS is ever redirected for UDP; but the DNS proxy's answers
        // to queries `weir_sk_lookup` handed it need the pod's address as
        // their source.
        dns_answer_source(ctx, sa, v6);
        return 1;
    }
    let cookie = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    let Some(policy) = pod_policy(cookie) else {
        return 1;
    };
    if policy.flags & POLICY_CAPTURE_DNS == 0 {
        return 1;
    }
    let dst: Addr = if v6 {
        read_words(&sa.user_ip6)
    } else {
        v4_mapped(sa.user_ip4)
    };
    // SAFETY: `sk` is non-NULL for sock_addr programs.
    let sk: &bpf_sock = unsafe { &*sa.__bindgen_anon_1.sk };
    let src: Addr = if v6 {
        read_words(&sk.src_ip6)
    } else {
        v4_mapped(sk.src_ip4)
    };
    let ids = unsafe { bpf_get_current_uid_gid() };
    let q = OutboundQuery {
        dst,
        dport,
        src,
        uid: ids as u32,
        gid: (ids >> 32) as u32,
        udp: true,
    };
    let t = KernelTables::of(cookie, &policy);
    let verdict = decide_outbound(&policy, &q, &t);
    // Datagrams, counted apart from connections.
    if verdict != Verdict::RedirectDns {
        bump_pod(cookie, |c| c.dns_udp_datagrams_bypassed += 1);
        return 1;
    }
    // Remember the server, so that its answer (coming from the DNS port)
    // can be shown to the application as coming from the server.
    let od = OrigDst {
        addr: dst,
        port: dport,
        flags: ORIG_DNS,
        pod_id: policy.pod_id,
    };
    if !store_orig_dst((sk as *const bpf_sock).cast_mut(), od) {
        bump_node(|c| c.dns_datagram_store_failed += 1);
        return 1;
    }
    bump_pod(cookie, |c| c.dns_udp_datagrams_captured += 1);
    // As with REDIRECT, the query leaves from the address the kernel
    // would pick for the server (the pod's), not from loopback.
    // Only the address matters: a per-message source is fine on a socket
    // bound to the wildcard address with a port (most resolvers).
    if is_unspecified(&src) && !is_loopback_route(&dst, &t) {
        let from = source_for(&policy, &dst, cookie);
        if let Some(from) = from {
            if v6 {
                write_words(&mut sa.msg_src_ip6, from);
            } else {
                sa.msg_src_ip4 = v4_word(&from);
            }
        }
    }
    if v6 {
        if is_v4_mapped(&dst) {
            write_words(&mut sa.user_ip6, v4_mapped(V4_LOCALHOST));
        } else {
            write_words(
                &mut sa.user_ip6,
                [0, 0, 0, u32::from_ne_bytes([0, 0, 0, 1])],
            );
        }
    } else {
        sa.user_ip4 = V4_LOCALHOST;
    }
    sa.user_port = u32::from(policy.dns_port.to_be());
    1
}

/// An answer of the pod's DNS proxy (its socket bound to loopback on the
/// DNS port) to one of the pod's own addresses leaves from that address,
/// so that it matches the querying socket, connected to that address and
/// the DNS port (see the connected case in `connect`).
#[inline(always)]
fn dns_answer_source(ctx: &SockAddrContext, sa: &mut bpf_sock_addr, v6: bool) {
    // SAFETY: `sk` is non-NULL for sock_addr programs.
    let sk: &bpf_sock = unsafe { &*sa.__bindgen_anon_1.sk };
    if sk.src_port == 0 {
        return;
    }
    let bound: Addr = if v6 {
        read_words(&sk.src_ip6)
    } else {
        v4_mapped(sk.src_ip4)
    };
    if !is_localhost(&bound) {
        return;
    }
    let to: Addr = if v6 {
        read_words(&sa.user_ip6)
    } else {
        v4_mapped(sa.user_ip4)
    };
    let Some(cookie) = POD_ADDRS.get_ptr(&to) else {
        return;
    };
    // SAFETY: pointer from a successful lookup.
    let cookie_of_to = unsafe { *cookie };
    // SAFETY: plain helper call on our own context.
    let own = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    if own != cookie_of_to {
        return;
    }
    let Some(policy) = pod_policy(own) else {
        return;
    };
    if policy.flags & POLICY_CAPTURE_DNS == 0 || sk.src_port as u16 != policy.dns_port {
        return;
    }
    if v6 {
        write_words(&mut sa.msg_src_ip6, to);
    } else {
        sa.msg_src_ip4 = v4_word(&to);
    }
}

/// Shows the DNS port's answers to the application as coming from the
/// server it asked.
#[cgroup_sock_addr(recvmsg4)]
pub fn weir_recvmsg4(ctx: SockAddrContext) -> i32 {
    recvmsg(&ctx, false)
}

/// IPv6 twin of [`weir_recvmsg4`].
#[cgroup_sock_addr(recvmsg6)]
pub fn weir_recvmsg6(ctx: SockAddrContext) -> i32 {
    recvmsg(&ctx, true)
}

#[inline(always)]
fn recvmsg(ctx: &SockAddrContext, v6: bool) -> i32 {
    // SAFETY: valid context, see `connect`.
    let sa: &mut bpf_sock_addr = unsafe { &mut *ctx.sock_addr };
    let from: Addr = if v6 {
        read_words(&sa.user_ip6)
    } else {
        v4_mapped(sa.user_ip4)
    };
    // Only sockets that sent a captured query carry ORIG_DNS: most UDP
    // sockets have no storage at all, the cheapest test, so it goes first.
    // SAFETY: reading the `sk` field of a valid context (non-NULL).
    let Some(od) = orig_dst_of(unsafe { sa.__bindgen_anon_1.sk }) else {
        return 1;
    };
    if od.flags & ORIG_DNS == 0 {
        return 1;
    }
    let cookie = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    let Some(policy) = pod_policy(cookie) else {
        return 1;
    };
    if u16::from_be(sa.user_port as u16) != policy.dns_port {
        return 1;
    }
    // From the DNS port on loopback, or on one of the pod's addresses (a
    // connected socket's queries, see `connect`).
    if !is_localhost(&from) && !(KernelTables::bare(cookie)).is_pod_addr(&from) {
        return 1;
    }
    if v6 {
        write_words(&mut sa.user_ip6, od.addr);
    } else if is_v4_mapped(&od.addr) {
        sa.user_ip4 = v4_word(&od.addr);
    } else {
        return 1;
    }
    sa.user_port = u32::from(od.port.to_be());
    1
}

// ---------------------------------------------------------------------------
// getpeername: the application keeps seeing the address it dialled.
// ---------------------------------------------------------------------------

/// With iptables the application's socket still names the original
/// destination as its peer (NAT happens below the socket); restore that.
#[cgroup_sock_addr(getpeername4)]
pub fn weir_getpeer4(ctx: SockAddrContext) -> i32 {
    getpeer(&ctx, false)
}

/// IPv6 twin of [`weir_getpeer4`].
#[cgroup_sock_addr(getpeername6)]
pub fn weir_getpeer6(ctx: SockAddrContext) -> i32 {
    getpeer(&ctx, true)
}

#[inline(always)]
fn getpeer(ctx: &SockAddrContext, v6: bool) -> i32 {
    // SAFETY: valid context, see `connect`.
    let sa: &mut bpf_sock_addr = unsafe { &mut *ctx.sock_addr };
    if sa.type_ != SOCK_STREAM && sa.type_ != SOCK_DGRAM {
        return 1;
    }
    // SAFETY: reading the `sk` field of a valid context (non-NULL).
    let Some(od) = orig_dst_of(unsafe { sa.__bindgen_anon_1.sk }) else {
        return 1;
    };
    if od.flags & ORIG_APP_SIDE == 0 {
        return 1;
    }
    if v6 {
        write_words(&mut sa.user_ip6, od.addr);
    } else if is_v4_mapped(&od.addr) {
        sa.user_ip4 = v4_word(&od.addr);
    } else {
        return 1;
    }
    sa.user_port = u32::from(od.port.to_be());
    1
}

// ---------------------------------------------------------------------------
// sockops: proxy listeners and the hand-over of original destinations.
// ---------------------------------------------------------------------------

/// Records proxy listeners (`listen()` on a capture port) in `LISTENERS`,
/// and moves a redirected connection's original destination from the
/// application's socket to the proxy's accepted socket.
#[sock_ops]
pub fn weir_sockops(ctx: SockOpsContext) -> u32 {
    match ctx.op() {
        BPF_SOCK_OPS_TCP_LISTEN_CB => on_listen(&ctx),
        BPF_SOCK_OPS_TCP_CONNECT_CB => {
            on_connect(&ctx);
            ambient::on_connect(&ctx, ops_cookie(&ctx), ops_sk(&ctx));
        }
        BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB => {
            on_passive_established(&ctx);
            fast_path_join(&ctx);
        }
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB => {
            // Connected: it was not refused, so stop the per-state
            // callbacks that watch for a refusal (they would run for every
            // later state change of the connection).
            let flags = ctx.cb_flags() as i32;
            if flags & BPF_SOCK_OPS_STATE_CB_FLAG != 0 {
                let _ = ctx.set_cb_flags(flags & !BPF_SOCK_OPS_STATE_CB_FLAG);
            }
            fast_path_join(&ctx);
        }
        BPF_SOCK_OPS_STATE_CB => on_state(&ctx),
        _ => {}
    }
    1
}

#[inline(always)]
fn ops_cookie(ctx: &SockOpsContext) -> u64 {
    // SAFETY: plain helper call on our own context.
    unsafe { bpf_get_netns_cookie(ctx.as_ptr()) }
}

#[inline(always)]
fn ops_local(ctx: &SockOpsContext) -> Addr {
    if ctx.family() == AF_INET {
        v4_mapped(ctx.local_ip4())
    } else {
        // SAFETY: field of the valid context.
        read_words(unsafe { &(*ctx.ops).local_ip6 })
    }
}

#[inline(always)]
fn ops_remote(ctx: &SockOpsContext) -> Addr {
    if ctx.family() == AF_INET {
        v4_mapped(ctx.remote_ip4())
    } else {
        // SAFETY: field of the valid context.
        read_words(unsafe { &(*ctx.ops).remote_ip6 })
    }
}

/// `bpf_sock_ops.remote_port` holds the network-order port in the upper
/// 16 bits on little-endian hosts (net/core/filter.c shifts it there), so
/// `ntohl` of the whole word is the port in host order.
#[inline(always)]
fn ops_remote_port(ctx: &SockOpsContext) -> u16 {
    u32::from_be(ctx.remote_port()) as u16
}

#[inline(always)]
fn ops_sk(ctx: &SockOpsContext) -> *mut bpf_sock {
    // SAFETY: reading the `sk` field of a valid context.
    unsafe { (*ctx.ops).__bindgen_anon_2.sk }
}

#[inline(always)]
fn on_listen(ctx: &SockOpsContext) {
    let port = ctx.local_port() as u16;
    if LISTEN_PORTS.get_ptr(&port).is_none() {
        return;
    }
    let mut key = ListenerKey {
        netns_cookie: ops_cookie(ctx),
        port,
        family: ctx.family() as u16,
        protocol: LISTENER_TCP,
    };
    // SAFETY: `ops` is the valid context pointer of this program.
    let ops = unsafe { &mut *ctx.ops };
    if LISTENERS.update(&mut key, ops, 0).is_ok() {
        bump_node(|c| c.listeners_recorded += 1);
        klog!(
            info,
            ctx,
            "proxy listener recorded: netns {} port {}",
            key.netns_cookie,
            port
        );
    } else {
        bump_node(|c| c.listeners_record_failed += 1);
        klog!(
            warn,
            ctx,
            "proxy listener NOT recorded (LISTENERS full?): netns {} port {}",
            key.netns_cookie,
            port
        );
    }
}

#[inline(always)]
fn on_connect(ctx: &SockOpsContext) {
    let sk = ops_sk(ctx);
    if sk.is_null() {
        return;
    }
    let Some(od) = orig_dst_of(sk) else {
        return;
    };
    if od.flags & ORIG_APP_SIDE == 0 {
        return;
    }
    let key = FlowKey {
        netns_cookie: ops_cookie(ctx),
        peer_addr: ops_local(ctx),
        peer_port: ctx.local_port() as u16,
        local_port: ops_remote_port(ctx),
        _pad: 0,
    };
    if PENDING_FLOWS.insert(&key, &od, 0).is_err() {
        bump_node(|c| c.pending_insert_failed += 1);
    }
    // Watch the state of this socket to count connections refused because
    // the proxy was not listening (SYN_SENT -> CLOSE).
    let _ = ctx.set_cb_flags(ctx.cb_flags() as i32 | BPF_SOCK_OPS_STATE_CB_FLAG);
}

#[inline(always)]
fn on_passive_established(ctx: &SockOpsContext) {
    let local_port = ctx.local_port() as u16;
    if LISTEN_PORTS.get_ptr(&local_port).is_none() {
        return;
    }
    let key = FlowKey {
        netns_cookie: ops_cookie(ctx),
        peer_addr: ops_remote(ctx),
        peer_port: ops_remote_port(ctx),
        local_port,
        _pad: 0,
    };
    let Some(pending) = PENDING_FLOWS.get_ptr(&key) else {
        // From one of this pod's own addresses to a capture port: a
        // connection weir redirected (it bound that source), whose entry
        // `PENDING_FLOWS` (an LRU map) evicted under pressure. Mark the
        // proxy's socket so `SO_ORIGINAL_DST` fails (ENOENT) rather than
        // answering the proxy's own address, and count it.
        let t = KernelTables::bare(key.netns_cookie);
        if t.is_pod_addr(&key.peer_addr) {
            bump_node(|c| c.orig_dst_lost += 1);
            let sk = ops_sk(ctx);
            if !sk.is_null() {
                let lost = OrigDst {
                    flags: ORIG_PROXY_SIDE | ORIG_LOST,
                    ..OrigDst::default()
                };
                let _ = store_orig_dst(sk, lost);
            }
        }
        return;
    };
    // SAFETY: pointer returned by a successful lookup.
    let mut od = unsafe { *pending };
    od.flags = (od.flags & !ORIG_APP_SIDE) | ORIG_PROXY_SIDE;
    let sk = ops_sk(ctx);
    if sk.is_null() {
        return;
    }
    if store_orig_dst(sk, od) {
        let _ = PENDING_FLOWS.remove(&key);
    }
}

#[inline(always)]
fn on_state(ctx: &SockOpsContext) {
    if ctx.arg(0) == TCP_SYN_SENT && ctx.arg(1) == TCP_CLOSE {
        // A redirected connect was refused: nobody listens on the proxy
        // port (fail closed, as with iptables). Forget its pending entry.
        let cookie = ops_cookie(ctx);
        bump_pod(cookie, |c| c.outbound_fail_closed += 1);
        let key = FlowKey {
            netns_cookie: cookie,
            peer_addr: ops_local(ctx),
            peer_port: ctx.local_port() as u16,
            local_port: ops_remote_port(ctx),
            _pad: 0,
        };
        let _ = PENDING_FLOWS.remove(&key);
    }
}

// ---------------------------------------------------------------------------
// The fast path (opt-in): local sockets exchange bytes without TCP/IP.
// ---------------------------------------------------------------------------

/// Puts a freshly established socket of an enrolled pod into `FAST_SOCKS`
/// when the fast path is on and its peer can be a socket of this node: a
/// loopback peer (same pod) or an address of an enrolled pod. The socket
/// also gets its peer's key in `FAST_PEER`, for `weir_fast_redirect`.
/// Anything else is left alone and uses TCP as usual.
#[inline(always)]
fn fast_path_join(ctx: &SockOpsContext) {
    if !fast_path_on() {
        return;
    }
    let family = ctx.family();
    if family != AF_INET && family != AF_INET6 {
        return;
    }
    let cookie = ops_cookie(ctx);
    if POD_POLICY.get_ptr(&cookie).is_none() {
        return;
    }
    let remote = ops_remote(ctx);
    // SAFETY (closure): pointer from a successful lookup, read once.
    let Some(peer_cookie) = fast_peer_cookie(cookie, &remote, |a| {
        POD_ADDRS.get_ptr(a).map(|c| unsafe { *c })
    }) else {
        return;
    };
    let sk = ops_sk(ctx);
    if sk.is_null() {
        return;
    }
    let mut key = FastKey {
        netns_cookie: cookie,
        local_addr: ops_local(ctx),
        remote_addr: remote,
        local_port: ctx.local_port() as u16,
        remote_port: ops_remote_port(ctx),
        _pad: 0,
    };
    let fp = FastPeer {
        peer: key.peer(peer_cookie),
        flags: 0,
        _pad: 0,
    };
    if !store_fast_peer(sk, fp) {
        bump_node(|c| c.fast_add_failed += 1);
        return;
    }
    // SAFETY: `ops` is the valid context pointer of this program.
    let ops = unsafe { &mut *ctx.ops };
    if FAST_SOCKS.update(&mut key, ops, 0).is_ok() {
        bump_node(|c| c.fast_sockets_added += 1);
    } else {
        bump_node(|c| c.fast_add_failed += 1);
    }
}

/// Runs on every message a socket in `FAST_SOCKS` sends: when the peer
/// socket is in the map too, the bytes go straight onto its receive queue
/// (`BPF_F_INGRESS`), past TCP, IP, loopback or veth and the peer's TCP
/// receive path. Otherwise they go through TCP as usual, and so does the
/// rest of the connection's bytes in that direction (see `FAST_FALLBACK`).
/// Never drops anything.
#[sk_msg]
pub fn weir_fast_redirect(ctx: SkMsgContext) -> u32 {
    // SAFETY: the context is valid for the program's lifetime; `sk` is a
    // non-NULL socket pointer in sk_msg programs.
    let sk = unsafe { (*ctx.msg).__bindgen_anon_3.sk };
    let Some(fp) = fast_peer_of(sk) else {
        return sk_action::SK_PASS;
    };
    // SAFETY: non-NULL storage of our value type; only this socket's own
    // messages touch it, under the socket lock.
    let fp = unsafe { &mut *fp };
    if fp.flags & FAST_FALLBACK == 0 {
        let mut peer = fp.peer;
        if FAST_SOCKS.redirect_msg(&ctx, &mut peer, u64::from(BPF_F_INGRESS))
            == i64::from(sk_action::SK_PASS)
        {
            let size = u64::from(ctx.size());
            bump_node(|c| {
                c.fast_msgs_redirected += 1;
                c.fast_bytes_redirected += size;
            });
            return sk_action::SK_PASS;
        }
        // No peer socket: these bytes take TCP, and so must every later
        // one, to stay in order at the receiver.
        fp.flags |= FAST_FALLBACK;
    }
    bump_node(|c| c.fast_msgs_passed += 1);
    sk_action::SK_PASS
}

// ---------------------------------------------------------------------------
// getsockopt: SO_ORIGINAL_DST
// ---------------------------------------------------------------------------

/// Answers `SO_ORIGINAL_DST` (`SOL_IP`) and `IP6T_SO_ORIGINAL_DST`
/// (`SOL_IPV6`) on sockets of enrolled pods, the way conntrack would:
/// the original destination of a redirected connection, else the socket's
/// own local address (an inbound connection steered by `weir_sk_lookup`
/// keeps its original destination as local address). Every other option
/// is left exactly as the kernel answered it.
#[cgroup_sockopt(getsockopt)]
pub fn weir_getsockopt(ctx: SockoptContext) -> i32 {
    // SAFETY: valid context for the program's lifetime.
    let so = unsafe { &mut *ctx.sockopt };
    let want_v4 = so.level == SOL_IP && so.optname == SO_ORIGINAL_DST;
    let want_v6 = so.level == SOL_IPV6 && so.optname == SO_ORIGINAL_DST;
    if !(want_v4 || want_v6) || so.retval == 0 {
        // Not ours, or already answered (by the kernel's conntrack, or by
        // a program of another cgroup level): leave everything as it is,
        // so that the chain of programs and the kernel's answer pass
        // through unchanged. Only options larger than a page need optlen
        // 0 ("use the kernel's buffer"), since BPF sees just their first
        // page (Documentation/bpf/prog_cgroupsockopt.rst).
        if so.optlen > PAGE_SIZE {
            so.optlen = 0;
        }
        return 1;
    }
    // SAFETY: as above; `sk` is non-NULL in sockopt programs.
    let sk_ptr = unsafe { so.__bindgen_anon_1.sk };
    let cookie = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    let Some(od) = original_dst(sk_ptr, cookie) else {
        if pod_policy(cookie).is_some() {
            bump_pod(cookie, |c| c.orig_dst_missed += 1);
        }
        if so.optlen > PAGE_SIZE {
            so.optlen = 0;
        }
        return 1;
    };
    // SAFETY: optval/optval_end bound the kernel's copy of the user buffer;
    // every write below is after an explicit bounds check.
    let optval = unsafe { so.__bindgen_anon_2.optval } as *mut u8;
    let end = unsafe { so.__bindgen_anon_3.optval_end } as *mut u8;
    if want_v4 {
        let size = core::mem::size_of::<SockaddrIn>();
        if !is_v4_mapped(&od.addr) || unsafe { optval.add(size) } > end {
            // An IPv6 destination asked with SOL_IP, or a buffer too small
            // for the answer: the kernel's own error stands.
            if so.optlen > PAGE_SIZE {
                so.optlen = 0;
            }
            return 1;
        }
        let out = optval as *mut SockaddrIn;
        unsafe {
            (*out).family = AF_INET as u16;
            (*out).port = od.port.to_be();
            (*out).addr = v4_word(&od.addr);
            (*out).zero = [0; 8];
        }
        so.optlen = size as i32;
    } else {
        let size = core::mem::size_of::<SockaddrIn6>();
        if unsafe { optval.add(size) } > end {
            if so.optlen > PAGE_SIZE {
                so.optlen = 0;
            }
            return 1;
        }
        let out = optval as *mut SockaddrIn6;
        unsafe {
            (*out).family = AF_INET6 as u16;
            (*out).port = od.port.to_be();
            (*out).flowinfo = 0;
            (*out).addr = od.addr;
            (*out).scope_id = 0;
        }
        so.optlen = size as i32;
    }
    so.retval = 0;
    bump_pod(cookie, |c| c.orig_dst_answered += 1);
    1
}

/// The original destination of the connection behind `sk`, if weir knows
/// it, else (for enrolled pods) the socket's own local address.
#[inline(always)]
fn original_dst(sk_ptr: *mut bpf_sock, cookie: u64) -> Option<OrigDst> {
    if sk_ptr.is_null() {
        return None;
    }
    if let Some(od) = orig_dst_of(sk_ptr) {
        // A redirected connection whose destination was lost: fail closed.
        return (od.flags & ORIG_LOST == 0).then_some(od);
    }
    // SAFETY: reading fields of a valid socket.
    let sk = unsafe { &*sk_ptr };
    if sk.protocol != IPPROTO_TCP {
        return None;
    }
    let policy = pod_policy(cookie)?;
    if policy.flags & (POLICY_CAPTURE_OUTBOUND | POLICY_CAPTURE_INBOUND) == 0 {
        // interceptionMode NONE: no rules, so no conntrack answer either.
        return None;
    }
    let (local, peer) = if sk.family == AF_INET {
        (v4_mapped(sk.src_ip4), v4_mapped(sk.dst_ip4))
    } else {
        (read_words(&sk.src_ip6), read_words(&sk.dst_ip6))
    };
    if !is_v4_mapped(&local) && !ipv6_rules(&policy) {
        // A pod whose mesh writes no ip6tables rule (Linkerd's default):
        // no conntrack answer for its IPv6 connections either (B7).
        return None;
    }
    let local_port = sk.src_port as u16;
    // The proxy asked before its accepted socket got the hand-over (a race
    // with the sockops callback): read the pending entry directly.
    let key = FlowKey {
        netns_cookie: cookie,
        peer_addr: peer,
        peer_port: u16::from_be(sk.dst_port),
        local_port,
        _pad: 0,
    };
    if let Some(p) = PENDING_FLOWS.get_ptr(&key) {
        // SAFETY: pointer returned by a successful lookup.
        return Some(unsafe { *p });
    }
    // Like conntrack for a connection that was not NATed: the local
    // address is the original destination.
    Some(OrigDst {
        addr: local,
        port: local_port,
        flags: 0,
        pod_id: policy.pod_id,
    })
}

// ---------------------------------------------------------------------------
// Inbound: sk_lookup, attached to each enrolled pod's network namespace.
// ---------------------------------------------------------------------------

/// Steers inbound TCP connections for captured ports to the pod's inbound
/// listener without rewriting packets: the accepted socket keeps the
/// original destination as its local address. When the proxy is not
/// listening the connection is refused (RST), never delivered to the
/// application behind the proxy's back.
#[sk_lookup]
pub fn weir_sk_lookup(ctx: SkLookupContext) -> u32 {
    // SAFETY: valid context for the program's lifetime.
    let l = unsafe { &*ctx.lookup };
    if l.protocol == IPPROTO_UDP {
        return dns_to_proxy(&ctx, l);
    }
    // iptables' PREROUTING never sees a pod's own loopback traffic either.
    if l.protocol != IPPROTO_TCP || l.ingress_ifindex == LOOPBACK_IFINDEX {
        return sk_action::SK_PASS;
    }
    let family = l.family;
    let local: Addr = if family == AF_INET {
        v4_mapped(l.local_ip4)
    } else {
        read_words(&l.local_ip6)
    };
    // sk_lookup programs cannot read the netns cookie; the destination is
    // one of the pod's addresses, which the agent maps to its cookie.
    let Some(cookie) = POD_ADDRS.get_ptr(&local) else {
        return sk_action::SK_PASS;
    };
    // SAFETY: pointer returned by a successful lookup.
    let cookie = unsafe { *cookie };
    let Some(policy) = pod_policy(cookie) else {
        return sk_action::SK_PASS;
    };
    let t = KernelTables::of(cookie, &policy);
    // Connections made inside the pod itself (from 127.0.0.0/8, ::1, ::6 or
    // the pod's own addresses) never pass iptables' PREROUTING either; they
    // are the outbound rules' business. `ingress_ifindex` cannot tell: for
    // local traffic to the pod IP it names the device holding that IP.
    let remote: Addr = if family == AF_INET {
        v4_mapped(l.remote_ip4)
    } else {
        read_words(&l.remote_ip6)
    };
    if is_loopback_route(&remote, &t) {
        return sk_action::SK_PASS;
    }
    // Istio's `-i IFACE -j RETURN` for `reroute-virtual-interfaces`: what
    // arrives through a virtual interface is never inbound traffic (its
    // captured connections were rewritten by `weir_virt_in`).
    let virt = VirtKey {
        netns_cookie: cookie,
        ifindex: l.ingress_ifindex,
        _pad: 0,
    };
    if VIRT_IFACES.get_ptr(&virt).is_some() {
        return sk_action::SK_PASS;
    }
    let verdict = if policy.flags & POLICY_AMBIENT != 0 {
        let rport = u16::from_be(l.remote_port);
        let ztunnel = ambient::from_ztunnel(cookie, &remote, rport, l.local_port as u16);
        decide_ambient_inbound(&policy, l.local_port as u16, &remote, ztunnel, &t)
    } else {
        decide_inbound(&policy, l.local_port as u16, l.ingress_ifindex, &remote, &t)
    };
    if !verdict.captured() {
        bump_pod(cookie, |c| c.inbound_bypass += 1);
        return sk_action::SK_PASS;
    }
    let mut key = ListenerKey {
        netns_cookie: cookie,
        port: policy.inbound_port,
        family: family as u16,
        protocol: LISTENER_TCP,
    };
    if LISTENERS.redirect_sk_lookup(&ctx, key, 0).is_ok() {
        bump_pod(cookie, |c| c.inbound_captured += 1);
        return sk_action::SK_PASS;
    }
    if family == AF_INET {
        // A dual-stack [::] listener also takes IPv4 connections.
        key.family = AF_INET6 as u16;
        if LISTENERS.redirect_sk_lookup(&ctx, key, 0).is_ok() {
            bump_pod(cookie, |c| c.inbound_captured += 1);
            return sk_action::SK_PASS;
        }
    }
    bump_pod(cookie, |c| c.inbound_fail_closed += 1);
    klog!(
        debug,
        ctx,
        "pod {}: inbound to port {} refused: no proxy listening on {}",
        policy.pod_id,
        l.local_port,
        policy.inbound_port
    );
    sk_action::SK_DROP
}

// ---------------------------------------------------------------------------
// Virtual interfaces (`istio.io/reroute-virtual-interfaces`): tc, per pod
// interface. A VM behind such an interface (KubeVirt) sends its traffic
// through the pod; Istio's `PREROUTING -i IFACE -j REDIRECT` sends its TCP
// connections to the outbound port. Those packets are forwarded, not
// delivered, so no socket hook sees them: `weir_virt_in` rewrites them the
// way REDIRECT's NAT does (destination: the interface's address and the
// outbound port), and `weir_virt_out` rewrites the answers back.
// ---------------------------------------------------------------------------

const TC_ACT_OK: i32 = 0;
const TC_ACT_SHOT: i32 = 2;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86DD;
const IPPROTO_TCP_U8: u8 = 6;
const BPF_F_PSEUDO_HDR: u64 = 1 << 4;
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
            bump_pod(cookie, |c| c.virt_captured += 1);
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
    bump_pod(cookie, |c| c.virt_dropped += 1);
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
        bump_node(|c| c.pending_insert_failed += 1);
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

/// A DNS query from one of the pod's addresses to one of its addresses
/// and the DNS port (the connected-socket case of `connect`) goes to the
/// pod's DNS proxy, bound to loopback.
#[inline(always)]
fn dns_to_proxy(ctx: &SkLookupContext, l: &aya_ebpf::bindings::bpf_sk_lookup) -> u32 {
    let v4 = l.family == AF_INET;
    let local: Addr = if v4 {
        v4_mapped(l.local_ip4)
    } else {
        read_words(&l.local_ip6)
    };
    let Some(cookie) = POD_ADDRS.get_ptr(&local) else {
        return sk_action::SK_PASS;
    };
    // SAFETY: pointer returned by a successful lookup.
    let cookie = unsafe { *cookie };
    let Some(policy) = pod_policy(cookie) else {
        return sk_action::SK_PASS;
    };
    if policy.flags & POLICY_CAPTURE_DNS == 0 || l.local_port as u16 != policy.dns_port {
        return sk_action::SK_PASS;
    }
    let remote: Addr = if v4 {
        v4_mapped(l.remote_ip4)
    } else {
        read_words(&l.remote_ip6)
    };
    let t = KernelTables::bare(cookie);
    if !t.is_pod_addr(&remote) {
        return sk_action::SK_PASS;
    }
    let key = dns_proxy_key(cookie, &remote, policy.dns_port);
    // Not there (the DNS proxy went away): the datagram finds no socket,
    // like a query to a closed DNS port.
    let _ = LISTENERS.redirect_sk_lookup(ctx, key, 0);
    sk_action::SK_PASS
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
