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
//! taken by `weir_common::decide_*`, shared with the agent; the modules here only
//! read contexts, look up maps and apply verdicts, one module per program
//! family (`abi` holds what several of them share).
#![no_std]
#![no_main]

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

mod abi;
mod ambient;
mod dns;
mod fastpath;
mod inbound;
mod origdst;
mod outbound;
mod sockops;
mod tables;
mod virt;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
