//! Istio ambient mode (ztunnel in the pod) in the kernel programs: the
//! rules are `weir_common::decide_ambient_*`; this file reads marks and
//! records ztunnel's connections into the pod. Called from the shared
//! hooks only for pods whose policy has `POLICY_AMBIENT`.

use aya_ebpf::{
    EbpfContext as _, bindings::bpf_sock, helpers::generated::bpf_setsockopt,
    programs::SockOpsContext,
};
use weir_common::*;

use crate::tables::*;

const SOL_SOCKET: i32 = 1;
const SO_MARK: i32 = 36;

/// The outbound verdict for an ambient pod's `connect()`, from the
/// socket's mark (set by ztunnel before it connects).
#[inline(always)]
pub fn outbound<T: PodTables>(p: &PodPolicy, q: &OutboundQuery, sk: &bpf_sock, t: &T) -> Verdict {
    decide_ambient_outbound(p, q, sk.mark, t)
}

/// `TCP_CONNECT_CB` of a socket in an ambient pod: ztunnel's transparent
/// connection to the application (marked 0x539, to one of the pod's own
/// addresses) gets the connection mark 0x111 before its SYN leaves, so
/// that the pod's `tcp_fwmark_accept` gives the application's socket the
/// same mark and its answers are routed back to ztunnel (`fwmark 0x111`
/// -> table 100, `local default dev lo`); and the connection is recorded
/// in `PENDING_FLOWS` (flag `ORIG_ZTUNNEL`) so that `weir_sk_lookup`
/// leaves it alone, as istio-cni's `! --mark 0x539/0xfff` does.
#[inline(always)]
pub fn on_connect(ctx: &SockOpsContext, cookie: u64, sk: *mut bpf_sock) {
    if sk.is_null() {
        return;
    }
    // SAFETY: non-NULL full socket of the callback (TCP_CONNECT_CB).
    let mark = unsafe { (*sk).mark };
    if !is_ztunnel_mark(mark) {
        return;
    }
    let Some(policy) = pod_policy_ref(cookie) else {
        return;
    };
    if policy.flags & POLICY_AMBIENT == 0 {
        return;
    }
    let remote = crate::sockops::ops_remote(ctx);
    let to_pod = POD_ADDRS
        .get_ptr(&remote)
        // SAFETY: pointer from a successful lookup.
        .is_some_and(|c| unsafe { *c } == cookie);
    if !ztunnel_to_app(mark, to_pod) {
        return;
    }
    let mut new_mark = (mark & !ZTUNNEL_MARK_MASK) | CONNMARK_MARK;
    // SAFETY: helper call on our own context with a 4-byte value.
    let set = unsafe {
        bpf_setsockopt(
            ctx.as_ptr(),
            SOL_SOCKET,
            SO_MARK,
            (&mut new_mark as *mut u32).cast(),
            4,
        )
    };
    if set != 0 {
        klog!(
            warn,
            ctx,
            "pod {}: cannot mark ztunnel's connection to the app ({})",
            policy.pod_id,
            set
        );
    }
    let key = crate::sockops::app_key(ctx, cookie);
    let od = OrigDst {
        addr: remote,
        port: key.local_port,
        flags: ORIG_ZTUNNEL,
        pod_id: policy.pod_id,
    };
    if PENDING_FLOWS.insert(&key, &od, 0).is_err() {
        bump_node(NodeCounter::PendingInsertFailed);
    }
}

/// Whether the connection arriving at `local_port` from `remote`:`rport`
/// is one that ztunnel made from inside the pod (see [`on_connect`]).
#[inline(always)]
pub fn from_ztunnel(cookie: u64, remote: &Addr, rport: u16, local_port: u16) -> bool {
    let key = FlowKey {
        netns_cookie: cookie,
        peer_addr: *remote,
        peer_port: rport,
        local_port,
        _pad: 0,
    };
    PENDING_FLOWS
        .get_ptr(&key)
        // SAFETY: pointer from a successful lookup.
        .is_some_and(|od| unsafe { (*od).flags } & ORIG_ZTUNNEL != 0)
}
