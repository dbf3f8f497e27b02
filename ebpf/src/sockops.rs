//! sockops: proxy listeners, and the original destinations of redirected
//! connections kept for the proxy until its accepted socket closes.

use aya_ebpf::{
    EbpfContext as _,
    bindings::{
        self, BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB,
        BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_TCP_CONNECT_CB, BPF_SOCK_OPS_TCP_LISTEN_CB,
        BPF_TCP_CLOSE, BPF_TCP_CLOSE_WAIT, BPF_TCP_ESTABLISHED, BPF_TCP_SYN_SENT, bpf_sock,
    },
    helpers::generated::{bpf_get_netns_cookie, bpf_get_socket_cookie},
    macros::sock_ops,
    programs::SockOpsContext,
};
use weir_common::*;

use crate::abi::*;
use crate::fastpath::fast_path_join;
use crate::tables::*;

/// `cb_flags` are an `i32` in aya's setter.
const BPF_SOCK_OPS_STATE_CB_FLAG: i32 = bindings::BPF_SOCK_OPS_STATE_CB_FLAG as i32;

/// Records proxy listeners (`listen()` on a capture port) in `LISTENERS`,
/// keys a redirected connection's original destination by its addresses
/// in `PENDING_FLOWS` once the application's socket has its port, and
/// forgets it when the proxy's accepted socket closes.
#[sock_ops]
pub fn weir_sockops(ctx: SockOpsContext) -> u32 {
    match ctx.op() {
        BPF_SOCK_OPS_TCP_LISTEN_CB => on_listen(&ctx),
        BPF_SOCK_OPS_TCP_CONNECT_CB => {
            on_connect(&ctx);
            crate::ambient::on_connect(&ctx, ops_cookie(&ctx), ops_sk(&ctx));
        }
        BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB => {
            on_passive_established(&ctx);
            fast_path_join(&ctx);
        }
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB => fast_path_join(&ctx),
        BPF_SOCK_OPS_STATE_CB => on_state(&ctx),
        _ => {}
    }
    1
}

#[inline(always)]
pub(crate) fn ops_cookie(ctx: &SockOpsContext) -> u64 {
    // SAFETY: plain helper call on our own context.
    unsafe { bpf_get_netns_cookie(ctx.as_ptr()) }
}

#[inline(always)]
pub(crate) fn ops_local(ctx: &SockOpsContext) -> Addr {
    if ctx.family() == AF_INET {
        v4_mapped(ctx.local_ip4())
    } else {
        // SAFETY: field of the valid context.
        read_words(unsafe { &(*ctx.ops).local_ip6 })
    }
}

#[inline(always)]
pub(crate) fn ops_remote(ctx: &SockOpsContext) -> Addr {
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
pub(crate) fn ops_remote_port(ctx: &SockOpsContext) -> u16 {
    u32::from_be(ctx.remote_port()) as u16
}

#[inline(always)]
pub(crate) fn ops_sk(ctx: &SockOpsContext) -> *mut bpf_sock {
    // SAFETY: reading the `sk` field of a valid context.
    unsafe { (*ctx.ops).__bindgen_anon_2.sk }
}

#[inline(always)]
pub(crate) fn on_listen(ctx: &SockOpsContext) {
    let port = ctx.local_port() as u16;
    if !is_listen_port(port) {
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
        bump_node(NodeCounter::ListenersRecorded);
        klog!(
            info,
            ctx,
            "proxy listener recorded: netns {} port {}",
            key.netns_cookie,
            port
        );
    } else {
        bump_node(NodeCounter::ListenersRecordFailed);
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
pub(crate) fn on_connect(ctx: &SockOpsContext) {
    let sk = ops_sk(ctx);
    if sk.is_null() {
        return;
    }
    // Only sockets whose connect() weir redirected (to a capture port).
    if !is_listen_port(ops_remote_port(ctx)) {
        return;
    }
    // SAFETY: plain helper call on our own context.
    let sock = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let Some(od) = connecting_take(sock) else {
        return;
    };
    let key = app_key(ctx, ops_cookie(ctx));
    if PENDING_FLOWS.insert(&key, &od, 0).is_err() {
        bump_node(NodeCounter::PendingInsertFailed);
    }
    // Watch this socket's state: a refusal (SYN_SENT -> CLOSE: the proxy
    // is not listening), and the proxy closing first (see `on_app_state`).
    let _ = ctx.set_cb_flags(ctx.cb_flags() as i32 | BPF_SOCK_OPS_STATE_CB_FLAG);
}

/// The proxy accepted a connection on a capture port. Its original
/// destination stays in `PENDING_FLOWS`, where `weir_getsockopt` reads it
/// (keyed by the proxy's peer, as often as the proxy asks), until this
/// socket closes: no per-socket storage is allocated for the proxy's
/// side, the costliest step of a redirected connection before.
#[inline(always)]
pub(crate) fn on_passive_established(ctx: &SockOpsContext) {
    let local_port = ctx.local_port() as u16;
    if !is_listen_port(local_port) {
        return;
    }
    let key = proxy_flow_key(ctx, local_port);
    if PENDING_FLOWS.get_ptr(&key).is_some() {
        // Forget the entry when this socket closes (see `on_state`).
        let _ = ctx.set_cb_flags(ctx.cb_flags() as i32 | BPF_SOCK_OPS_STATE_CB_FLAG);
        return;
    }
    // `weir_getsockopt` fails for it (ENOENT); count it.
    if redirect_lost(key.netns_cookie, &key.peer_addr, local_port) {
        bump_node(NodeCounter::OrigDstLost);
    }
}

/// The `PENDING_FLOWS` key of the connection whose connecting side (the
/// application's socket; ztunnel's in ambient mode) this callback is for.
#[inline(always)]
pub(crate) fn app_key(ctx: &SockOpsContext, cookie: u64) -> FlowKey {
    app_flow_key(
        cookie,
        ops_local(ctx),
        ctx.local_port() as u16,
        ops_remote_port(ctx),
    )
}

/// The `PENDING_FLOWS` key of the connection a proxy socket accepted on
/// `local_port`.
#[inline(always)]
fn proxy_flow_key(ctx: &SockOpsContext, local_port: u16) -> FlowKey {
    FlowKey {
        netns_cookie: ops_cookie(ctx),
        peer_addr: ops_remote(ctx),
        peer_port: ops_remote_port(ctx),
        local_port,
        _pad: 0,
    }
}

#[inline(always)]
pub(crate) fn on_state(ctx: &SockOpsContext) {
    let local_port = ctx.local_port() as u16;
    if !is_listen_port(local_port) {
        on_app_state(ctx);
        return;
    }
    // A proxy's accepted socket closed (only those keep this callback
    // once established): its connection's original destination goes.
    if ctx.arg(1) != BPF_TCP_CLOSE {
        return;
    }
    let key = proxy_flow_key(ctx, local_port);
    let from = ctx.arg(0);
    if from == BPF_TCP_ESTABLISHED || from == BPF_TCP_CLOSE_WAIT {
        // Reset while the proxy still holds the socket, maybe before it
        // asked: keep the answer on the socket itself (the rare case that
        // pays for storage), as conntrack would still answer.
        if let Some(p) = PENDING_FLOWS.get_ptr(&key) {
            // SAFETY: pointer returned by a successful lookup.
            let mut od = unsafe { *p };
            od.flags &= !ORIG_APP_SIDE;
            let sk = ops_sk(ctx);
            if !sk.is_null() {
                let _ = store_orig_dst(sk, od);
            }
        }
    }
    let _ = PENDING_FLOWS.remove(&key);
}

/// State changes of an application's redirected socket: from its
/// `TCP_CONNECT_CB` until it leaves `ESTABLISHED`.
#[inline(always)]
fn on_app_state(ctx: &SockOpsContext) {
    let (from, to) = (ctx.arg(0), ctx.arg(1));
    if to == BPF_TCP_ESTABLISHED {
        return;
    }
    // Nothing to watch after this change (one callback more per
    // connection than needed for the refusal alone).
    let _ = ctx.set_cb_flags(ctx.cb_flags() as i32 & !BPF_SOCK_OPS_STATE_CB_FLAG);
    if to == BPF_TCP_CLOSE_WAIT {
        // The proxy closed first: its socket's close will take the
        // connection out of `PENDING_FLOWS`, while the application may
        // still read and ask `getpeername()`. Keep the answer on the
        // socket (only this case pays for socket storage).
        if let Some(od) = app_orig_dst(&app_key(ctx, ops_cookie(ctx))) {
            let sk = ops_sk(ctx);
            if !sk.is_null() {
                let _ = store_orig_dst(sk, od);
            }
        }
        return;
    }
    if to == BPF_TCP_CLOSE && from == BPF_TCP_SYN_SENT {
        // A redirected connect was refused: nobody listens on the proxy
        // port (fail closed, as with iptables). Forget its pending entry.
        let cookie = ops_cookie(ctx);
        bump_pod(cookie, PodCounter::OutboundFailClosed);
        let _ = PENDING_FLOWS.remove(&app_key(ctx, cookie));
    }
}
