//! Outbound capture: connect4 / connect6.

use aya_ebpf::{
    EbpfContext as _,
    bindings::{bpf_sock, bpf_sock_addr},
    helpers::generated::{
        bpf_bind, bpf_get_current_uid_gid, bpf_get_netns_cookie, bpf_get_socket_cookie,
    },
    macros::cgroup_sock_addr,
    programs::SockAddrContext,
};
use weir_common::*;

use crate::abi::*;
use crate::dns::dns_proxy_known;
use crate::tables::*;

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
            bump_node(NodeCounter::NotEnrolled);
        }
        return 1;
    };
    let (q, sk) = outbound_query(sa, v6, udp);
    let (dst, dport, src) = (q.dst, q.dport, q.src);
    let mut t = KernelTables::of(cookie, policy);
    // Asked by the rules (is it a loopback route?) and below (bind the
    // pod's own address?): one lookup for both.
    if !is_loopback_addr(&dst) {
        t.learn_pod_addr(&dst);
    }
    let verdict = outbound_verdict(policy, &q, sk, &t);
    let counter = if udp {
        udp_connect_counter(verdict, dport)
    } else {
        verdict.outbound_counter()
    };
    if let Some(c) = counter {
        bump_pod(cookie, c);
    }
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

    // Remember where the application was going. TCP: until the socket's
    // `TCP_CONNECT_CB`, which keys it by the connection's addresses in
    // `PENDING_FLOWS` (for the proxy and for the application's
    // `getpeername()`). UDP (DNS): on the socket itself.
    let od = OrigDst {
        addr: dst,
        port: dport,
        flags,
        pod_id: policy.pod_id,
    };
    if !udp {
        // SAFETY: plain helper call on our own context.
        connecting_put(unsafe { bpf_get_socket_cookie(ctx.as_ptr()) }, od);
    } else if !store_orig_dst((sk as *const bpf_sock).cast_mut(), od) {
        bump_node(NodeCounter::OrigDstStoreFailed);
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
                bump_pod(cookie, PodCounter::SourceBindFailed);
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

/// What a `connect()` or `sendmsg()` asks of the rules: the destination
/// the application named, the socket's own address, the caller's ids; and
/// the socket (valid for the program's run, whatever happens to `sa`).
#[inline(always)]
pub(crate) fn outbound_query<'k>(
    sa: &bpf_sock_addr,
    v6: bool,
    udp: bool,
) -> (OutboundQuery, &'k bpf_sock) {
    let dst: Addr = if v6 {
        read_words(&sa.user_ip6)
    } else {
        v4_mapped(sa.user_ip4)
    };
    // SAFETY: `sk` is always set (non-NULL) for sock_addr programs.
    let sk: &bpf_sock = unsafe { &*sa.__bindgen_anon_1.sk };
    let src: Addr = if v6 {
        read_words(&sk.src_ip6)
    } else {
        v4_mapped(sk.src_ip4)
    };
    // SAFETY: plain helper call, no arguments.
    let ids = unsafe { bpf_get_current_uid_gid() };
    let q = OutboundQuery {
        dst,
        dport: u16::from_be(sa.user_port as u16),
        src,
        uid: ids as u32,
        gid: (ids >> 32) as u32,
        udp,
    };
    (q, sk)
}

/// The verdict of the pod's rules (sidecar or ambient) for `q`.
#[inline(always)]
pub(crate) fn outbound_verdict<T: PodTables>(
    policy: &PodPolicy,
    q: &OutboundQuery,
    sk: &bpf_sock,
    t: &T,
) -> Verdict {
    if policy.flags & POLICY_AMBIENT != 0 {
        crate::ambient::outbound(policy, q, sk, t)
    } else {
        decide_outbound(policy, q, t)
    }
}

/// The source address the kernel would choose for a remote `dst`: the
/// pod's address on the subnet of `dst` when it has one (a second
/// interface), else its primary address of that family.
#[inline(always)]
pub(crate) fn source_for(p: &PodPolicy, dst: &Addr, cookie: u64) -> Option<Addr> {
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
