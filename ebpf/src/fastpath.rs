//! The fast path (opt-in): local sockets exchange bytes without TCP/IP.

use aya_ebpf::{
    bindings::{BPF_F_INGRESS, sk_action},
    macros::sk_msg,
    programs::{SkMsgContext, SockOpsContext},
};
use weir_common::*;

use crate::sockops::{ops_cookie, ops_local, ops_remote, ops_remote_port, ops_sk};
use crate::tables::*;

/// Puts a freshly established socket of an enrolled pod into `FAST_SOCKS`
/// when the fast path is on and its peer can be a socket of this node: a
/// loopback peer (same pod) or an address of an enrolled pod. The socket
/// also gets its peer's key in `FAST_PEER`, for `weir_fast_redirect`.
/// Anything else is left alone and uses TCP as usual.
#[inline(always)]
pub(crate) fn fast_path_join(ctx: &SockOpsContext) {
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
