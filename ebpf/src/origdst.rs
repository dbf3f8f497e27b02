//! The original destination read back: `getpeername` for the application
//! (it keeps seeing the address it dialled) and `SO_ORIGINAL_DST` for the proxy.

use aya_ebpf::{
    EbpfContext as _,
    bindings::{bpf_sock, bpf_sock_addr},
    helpers::generated::bpf_get_netns_cookie,
    macros::{cgroup_sock_addr, cgroup_sockopt},
    programs::{SockAddrContext, SockoptContext},
};
use weir_common::*;

use crate::abi::*;
use crate::tables::*;

const SOL_IP: i32 = 0;
const SOL_IPV6: i32 = 41;
/// `SO_ORIGINAL_DST` (linux/netfilter_ipv4.h) and `IP6T_SO_ORIGINAL_DST`
/// (linux/netfilter_ipv6/ip6_tables.h) share the number 80.
const SO_ORIGINAL_DST: i32 = 80;
/// Beyond this, cgroup sockopt programs only see the first page of optval.
const PAGE_SIZE: i32 = 4096;

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
    let sk_ptr = unsafe { sa.__bindgen_anon_1.sk };
    let Some(od) = app_side_orig_dst(sk_ptr, ctx) else {
        return 1;
    };
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
            bump_pod(cookie, PodCounter::OrigDstMissed);
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
    bump_pod(cookie, PodCounter::OrigDstAnswered);
    1
}

/// What the application's socket `sk_ptr` dialled, if weir redirected
/// it: on the socket (UDP; TCP once the proxy closed first), else in
/// `PENDING_FLOWS` by the socket's addresses (TCP).
#[inline(always)]
fn app_side_orig_dst(sk_ptr: *mut bpf_sock, ctx: &SockAddrContext) -> Option<OrigDst> {
    if sk_ptr.is_null() {
        return None;
    }
    if let Some(od) = orig_dst_of(sk_ptr) {
        return (od.flags & ORIG_APP_SIDE != 0).then_some(od);
    }
    // SAFETY: reading fields of a valid socket.
    let sk = unsafe { &*sk_ptr };
    if sk.protocol != IPPROTO_TCP {
        return None;
    }
    let remote_port = u16::from_be(sk.dst_port);
    if !is_listen_port(remote_port) {
        return None;
    }
    let (local, remote) = if sk.family == AF_INET {
        (v4_mapped(sk.src_ip4), v4_mapped(sk.dst_ip4))
    } else {
        (read_words(&sk.src_ip6), read_words(&sk.dst_ip6))
    };
    // Only for sockets connected to a capture port: the cookie helper is
    // not called for every other getpeername().
    // SAFETY: plain helper call on our own context.
    let cookie = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    let found = app_orig_dst(&app_flow_key(
        cookie,
        local,
        sk.src_port as u16,
        remote_port,
    ));
    if found.is_none() && is_loopback_addr(&remote) && redirect_lost(cookie, &local, remote_port) {
        bump_node(NodeCounter::PeerLost);
    }
    found
}

/// The original destination of the connection behind `sk`, if weir knows
/// it, else (for enrolled pods) the socket's own local address.
#[inline(always)]
fn original_dst(sk_ptr: *mut bpf_sock, cookie: u64) -> Option<OrigDst> {
    if sk_ptr.is_null() {
        return None;
    }
    // SAFETY: reading fields of a valid socket.
    let sk = unsafe { &*sk_ptr };
    let tcp = sk.protocol == IPPROTO_TCP;
    let (local, peer) = if sk.family == AF_INET {
        (v4_mapped(sk.src_ip4), v4_mapped(sk.dst_ip4))
    } else {
        (read_words(&sk.src_ip6), read_words(&sk.dst_ip6))
    };
    let local_port = sk.src_port as u16;
    let remote_port = u16::from_be(sk.dst_port);
    // A proxy's accepted socket, the question asked once per redirected
    // connection: its original destination stays in `PENDING_FLOWS` until
    // the socket closes. Asked first, before the pod's policy: weir
    // redirected this connection (`ORIG_APP_SIDE`), and conntrack too
    // answers for a NATed connection whatever the rules became since.
    let key = FlowKey {
        netns_cookie: cookie,
        peer_addr: peer,
        peer_port: remote_port,
        local_port,
        _pad: 0,
    };
    let pending = if tcp {
        PENDING_FLOWS.get_ptr(&key)
    } else {
        None
    };
    if let Some(p) = pending {
        // SAFETY: pointer returned by a successful lookup.
        let od = unsafe { *p };
        if od.flags & ORIG_APP_SIDE != 0 {
            return Some(od);
        }
    }
    if let Some(od) = orig_dst_of(sk_ptr) {
        // The application's own socket (or a DNS socket): what it dialled.
        return Some(od);
    }
    if !tcp {
        return None;
    }
    let policy = pod_policy_ref(cookie)?;
    if policy.flags & (POLICY_CAPTURE_OUTBOUND | POLICY_CAPTURE_INBOUND) == 0 {
        // interceptionMode NONE: no rules, so no conntrack answer either.
        return None;
    }
    if !is_v4_mapped(&local) && !ipv6_rules(policy) {
        // A pod whose mesh writes no ip6tables rule (Linkerd's default):
        // no conntrack answer for its IPv6 connections either (B7).
        return None;
    }
    if let Some(p) = pending {
        // Any other entry (ambient: ztunnel's connection to the
        // application), for pods whose rules would have NATed it.
        // SAFETY: pointer returned by a successful lookup.
        return Some(unsafe { *p });
    }
    // The application's own socket of a redirected connection.
    if is_listen_port(remote_port)
        && let Some(od) = app_orig_dst(&app_flow_key(cookie, local, local_port, remote_port))
    {
        return Some(od);
    }
    // Lost (counted at the accept): fail closed rather than answer the
    // proxy's own port.
    if redirect_lost(cookie, &peer, local_port) {
        return None;
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
