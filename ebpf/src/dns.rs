//! DNS over UDP: unconnected sockets (sendmsg4/6, recvmsg4/6) and the
//! datagrams of connected sockets handed to the DNS proxy (from `weir_sk_lookup`).

use aya_ebpf::{
    EbpfContext as _,
    bindings::{bpf_sock, bpf_sock_addr, sk_action},
    helpers::generated::{bpf_get_netns_cookie, bpf_sk_release},
    macros::cgroup_sock_addr,
    programs::{SkLookupContext, SockAddrContext},
};
use weir_common::*;

use crate::abi::*;
use crate::outbound::{outbound_query, outbound_verdict, source_for};
use crate::tables::*;

/// The `LISTENERS` key of the pod's DNS proxy socket (UDP, bound to
/// loopback, adopted by the agent) for queries from `from`'s family.
#[inline(always)]
pub(crate) fn dns_proxy_key(cookie: u64, from: &Addr, dns_port: u16) -> ListenerKey {
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
pub(crate) fn dns_proxy_known(cookie: u64, from: &Addr, dns_port: u16) -> bool {
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
    let (q, sk) = outbound_query(sa, v6, true);
    let (dst, src) = (q.dst, q.src);
    let t = KernelTables::of(cookie, &policy);
    let verdict = outbound_verdict(&policy, &q, sk, &t);
    // Datagrams, counted apart from connections.
    if verdict != Verdict::RedirectDns {
        bump_pod(cookie, PodCounter::DnsUdpDatagramsBypassed);
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
        bump_node(NodeCounter::DnsDatagramStoreFailed);
        return 1;
    }
    bump_pod(cookie, PodCounter::DnsUdpDatagramsCaptured);
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

/// A DNS query from one of the pod's addresses to one of its addresses
/// and the DNS port (the connected-socket case of `connect`) goes to the
/// pod's DNS proxy, bound to loopback.
#[inline(always)]
pub(crate) fn dns_to_proxy(ctx: &SkLookupContext, l: &aya_ebpf::bindings::bpf_sk_lookup) -> u32 {
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
