//! Inbound capture: sk_lookup, attached to each enrolled pod's network namespace.

use aya_ebpf::{bindings::sk_action, macros::sk_lookup, programs::SkLookupContext};
use weir_common::*;

use crate::abi::*;
use crate::dns::dns_to_proxy;
use crate::tables::*;

const LOOPBACK_IFINDEX: u32 = 1;

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
        let ztunnel = crate::ambient::from_ztunnel(cookie, &remote, rport, l.local_port as u16);
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
