//! weir's counters, each declared once: the per-pod and node-wide counter
//! structs the kernel bumps, an index type naming each counter
//! ([`PodCounter`], [`NodeCounter`]), and each counter's Prometheus series
//! (family and label values), which `/metrics`, `weir status` and `weir
//! explain` all read from [`PodCounter::series`] / [`NodeCounter::series`].
//!
//! Each counter counts one unit, said in its doc: TCP connections unless it
//! says otherwise (the agent exports each unit as its own metric family,
//! see agent/src/metrics.rs).

/// Declares a counter struct (one `u64` per counter, `#[repr(C)]`, named
/// fields so `bpftool` prints them), its index enum and its series table.
macro_rules! counters {
    (
        $(#[$sdoc:meta])* struct $S:ident;
        $(#[$edoc:meta])* enum $E:ident;
        $( $(#[$doc:meta])* $V:ident / $f:ident : $family:literal [$($label:literal),*]; )*
    ) => {
        $(#[$sdoc])*
        #[repr(C)]
        #[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
        pub struct $S {
            $( $(#[$doc])* pub $f: u64, )*
        }

        $(#[$edoc])*
        #[repr(u32)]
        #[derive(Copy, Clone, Debug, PartialEq, Eq)]
        pub enum $E {
            $( $(#[$doc])* $V, )*
        }

        impl $E {
            /// Every counter, in field order.
            pub const ALL: &[$E] = &[$($E::$V),*];

            /// The field's name.
            pub const fn name(self) -> &'static str {
                match self { $( $E::$V => stringify!($f), )* }
            }

            /// The Prometheus series this counter is exported as: family
            /// name and label values (after `namespace`, `pod` for
            /// per-pod counters).
            pub const fn series(self) -> (&'static str, &'static [&'static str]) {
                match self { $( $E::$V => ($family, &[$($label),*]), )* }
            }
        }

        impl $S {
            /// Number of counters.
            pub const LEN: usize = $E::ALL.len();

            /// The counters as an array, indexed by the counter enum.
            #[inline(always)]
            pub fn as_array(&self) -> &[u64; Self::LEN] {
                // SAFETY: `#[repr(C)]` with `LEN` `u64` fields and nothing
                // else: the same layout as `[u64; LEN]` (size checked in
                // the tests).
                unsafe { &*(self as *const Self).cast::<[u64; Self::LEN]>() }
            }

            /// As [`Self::as_array`], mutable.
            #[inline(always)]
            pub fn as_array_mut(&mut self) -> &mut [u64; Self::LEN] {
                // SAFETY: as in `as_array`.
                unsafe { &mut *(self as *mut Self).cast::<[u64; Self::LEN]>() }
            }

            /// The value of counter `c`.
            #[inline(always)]
            pub fn get(&self, c: $E) -> u64 {
                self.as_array()[c as usize]
            }

            /// Adds one to counter `c`.
            #[inline(always)]
            pub fn bump(&mut self, c: $E) {
                self.as_array_mut()[c as usize] += 1;
            }

            /// Adds `n` to counter `c`.
            #[inline(always)]
            pub fn add(&mut self, c: $E, n: u64) {
                self.as_array_mut()[c as usize] += n;
            }

            /// The sum of per-CPU values.
            pub fn sum<'a>(it: impl Iterator<Item = &'a Self>) -> Self {
                let mut o = Self::default();
                for c in it {
                    for (o, c) in o.as_array_mut().iter_mut().zip(c.as_array()) {
                        *o += c;
                    }
                }
                o
            }
        }
    };
}

counters! {
    /// Per-pod counters (a per-CPU hash keyed by netns cookie). Read and
    /// summed by the agent on scrape.
    struct PodCounters;
    /// One of the [`PodCounters`].
    enum PodCounter;
        /// Outbound connections sent to the outbound port.
        OutboundCaptured / outbound_captured: "weir_connections_captured_total" ["outbound"];
        /// Proxy connections over loopback sent to the inbound port.
        OutboundToInbound / outbound_to_inbound: "weir_connections_captured_total" ["outbound_to_inbound"];
        /// Not captured: excluded outbound port.
        BypassExcludedPort / bypass_excluded_port: "weir_connections_bypassed_total" ["outbound", "excluded_port"];
        /// Not captured: from 127.0.0.6 / ::6 (inbound passthrough).
        BypassPassthrough / bypass_passthrough: "weir_connections_bypassed_total" ["outbound", "inbound_passthrough"];
        /// Not captured: loopback traffic of a process that is not the proxy.
        BypassLoopback / bypass_loopback: "weir_connections_bypassed_total" ["outbound", "loopback"];
        /// Not captured: the proxy's own connection.
        BypassProxy / bypass_proxy: "weir_connections_bypassed_total" ["outbound", "proxy_identity"];
        /// Not captured: to 127.0.0.1 / ::1.
        BypassLocalhost / bypass_localhost: "weir_connections_bypassed_total" ["outbound", "localhost"];
        /// Not captured: excluded outbound CIDR.
        BypassExcludedCidr / bypass_excluded_cidr: "weir_connections_bypassed_total" ["outbound", "excluded_cidr"];
        /// Not captured: neither an included port nor an included CIDR.
        BypassNotIncluded / bypass_not_included: "weir_connections_bypassed_total" ["outbound", "not_included"];
        /// Inbound connections delivered to the inbound port.
        InboundCaptured / inbound_captured: "weir_connections_captured_total" ["inbound"];
        /// Inbound connections not captured (tunnel, excluded or not included
        /// port).
        InboundBypass / inbound_bypass: "weir_connections_bypassed_total" ["inbound", "port_rule"];
        /// Inbound connections refused because the proxy was not listening.
        InboundFailClosed / inbound_fail_closed: "weir_fail_closed_total" ["inbound"];
        /// Outbound connections refused because the proxy was not listening.
        OutboundFailClosed / outbound_fail_closed: "weir_fail_closed_total" ["outbound"];
        /// `SO_ORIGINAL_DST` answered by weir.
        OrigDstAnswered / orig_dst_answered: "weir_original_dst_lookups_total" ["answered"];
        /// `SO_ORIGINAL_DST` asked on a socket weir knows nothing about.
        OrigDstMissed / orig_dst_missed: "weir_original_dst_lookups_total" ["missed"];
        /// The pod's IP could not be bound as the redirected connection's
        /// source (the connection went on from loopback).
        SourceBindFailed / source_bind_failed: "weir_source_bind_failed_total" [];
        /// TCP connections to port 53 sent to the DNS port.
        DnsTcpCaptured / dns_tcp_captured: "weir_connections_captured_total" ["dns"];
        /// Not captured: the owner-group filter.
        BypassOwnerGroup / bypass_owner_group: "weir_connections_bypassed_total" ["outbound", "owner_group"];
        /// Not captured: through an interface of `excludeInterfaces`.
        BypassExcludedIface / bypass_excluded_iface: "weir_connections_bypassed_total" ["outbound", "excluded_interface"];
        /// TCP connections from a virtual interface
        /// (`istio.io/reroute-virtual-interfaces`) sent to the outbound port.
        VirtCaptured / virt_captured: "weir_connections_captured_total" ["virtual_interface"];
        /// Packets from a virtual interface dropped: a connection to capture
        /// while the interface has no address of its family (as `REDIRECT`
        /// drops it), a packet of a rerouted connection weir has no state for,
        /// or no free port to tell two connections apart.
        VirtDropped / virt_dropped: "weir_virtual_interface_dropped_packets_total" [];
        /// UDP sockets whose `connect()` to port 53 was pointed at the DNS port
        /// (sockets; their datagrams follow without further decisions).
        DnsUdpConnectsCaptured / dns_udp_connects_captured: "weir_dns_udp_sockets_total" ["captured"];
        /// UDP sockets `connect()`ed to port 53 and not captured (sockets).
        DnsUdpConnectsBypassed / dns_udp_connects_bypassed: "weir_dns_udp_sockets_total" ["bypassed"];
        /// Datagrams of unconnected UDP sockets to port 53 sent to the DNS
        /// port (datagrams).
        DnsUdpDatagramsCaptured / dns_udp_datagrams_captured: "weir_dns_udp_datagrams_total" ["captured"];
        /// Datagrams of unconnected UDP sockets to port 53 not captured
        /// (datagrams).
        DnsUdpDatagramsBypassed / dns_udp_datagrams_bypassed: "weir_dns_udp_datagrams_total" ["bypassed"];
}

counters! {
    /// Node-wide counters (a one-slot per-CPU array). As with
    /// [`PodCounters`], each field's doc says its unit.
    struct NodeCounters;
    /// One of the [`NodeCounters`].
    enum NodeCounter;
        /// TCP connections from network namespaces that are not enrolled.
        NotEnrolled / not_enrolled: "weir_unenrolled_connections_total" [];
        /// Redirected `connect()` calls (TCP connections, UDP sockets to a DNS
        /// server) whose original destination could not be stored (socket
        /// storage full or unavailable): refused (fail closed).
        OrigDstStoreFailed / orig_dst_store_failed: "weir_original_dst_failures_total" ["store_failed"];
        /// `PENDING_FLOWS` insertions that failed.
        PendingInsertFailed / pending_insert_failed: "weir_original_dst_failures_total" ["pending_insert_failed"];
        /// Listening sockets of proxies recorded in `LISTENERS`.
        ListenersRecorded / listeners_recorded: "weir_proxy_listeners_total" ["recorded"];
        /// Listening sockets that could not be recorded (map full).
        ListenersRecordFailed / listeners_record_failed: "weir_proxy_listeners_total" ["record_failed"];
        /// Fast path: established local sockets added to `FAST_SOCKS`.
        FastSocketsAdded / fast_sockets_added: "weir_fast_path_sockets_total" ["added"];
        /// Fast path: local sockets that could not be added (map full, or no
        /// socket storage); they simply use TCP.
        FastAddFailed / fast_add_failed: "weir_fast_path_sockets_total" ["add_failed"];
        /// Fast path: messages (`sendmsg` calls, or parts of them) moved
        /// straight into the peer socket.
        FastMsgsRedirected / fast_msgs_redirected: "weir_fast_path_messages_total" ["redirected"];
        /// Fast path: bytes of those messages.
        FastBytesRedirected / fast_bytes_redirected: "weir_fast_path_redirected_bytes_total" [];
        /// Redirected connections accepted by the proxy whose original
        /// destination had been evicted from `PENDING_FLOWS` (more handshakes
        /// in flight than `--max-pending`): `SO_ORIGINAL_DST` fails for them.
        OrigDstLost / orig_dst_lost: "weir_original_dst_failures_total" ["lost"];
        /// Fast path: messages of sockets in `FAST_SOCKS` sent through TCP as
        /// usual (the peer socket is not in the map, or the connection fell
        /// back to TCP for good; see [`FAST_FALLBACK`]).
        FastMsgsPassed / fast_msgs_passed: "weir_fast_path_messages_total" ["passed"];
        /// DNS datagrams of unconnected UDP sockets that were to be captured
        /// but whose server could not be stored on the socket: sent to the
        /// server asked, uncaptured (datagrams).
        DnsDatagramStoreFailed / dns_datagram_store_failed: "weir_dns_datagram_store_failed_total" [];
        /// `getpeername()` on an application's redirected TCP socket (from a
        /// pod address to a capture port on loopback) whose original
        /// destination `PENDING_FLOWS` had evicted (more open redirected
        /// connections than `--max-pending`): it named the proxy's address.
        PeerLost / peer_lost: "weir_original_dst_failures_total" ["peer_lost"];
        /// Redirected TCP `connect()` calls whose task moved to another CPU
        /// between `connect4`/`connect6` and `TCP_CONNECT_CB`: the original
        /// destination was found in that CPU's `CONNECTING` slots.
        ConnectOtherCpu / connect_other_cpu: "weir_connect_handoffs_total" ["other"];
}

/// The bypass reason of a pod's `weir_connections_bypassed_total{direction="outbound"}`
/// series of counter `c`, if it is one: the list `weir status` sums.
pub fn outbound_bypass_reason(c: PodCounter) -> Option<&'static str> {
    match c.series() {
        ("weir_connections_bypassed_total", ["outbound", reason]) => Some(reason),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_are_arrays_of_their_fields() {
        assert_eq!(core::mem::size_of::<PodCounters>(), PodCounters::LEN * 8);
        assert_eq!(core::mem::size_of::<NodeCounters>(), NodeCounters::LEN * 8);
        let mut c = PodCounters::default();
        c.bump(PodCounter::BypassExcludedIface);
        c.add(PodCounter::OutboundCaptured, 2);
        assert_eq!(c.bypass_excluded_iface, 1);
        assert_eq!(c.outbound_captured, 2);
        let s = PodCounters::sum([c, c].iter());
        assert_eq!(s.get(PodCounter::OutboundCaptured), 4);
        for (i, p) in PodCounter::ALL.iter().enumerate() {
            assert_eq!(*p as usize, i);
        }
    }

    #[test]
    fn every_outbound_bypass_reason_is_listed() {
        let reasons: std::vec::Vec<&str> = PodCounter::ALL
            .iter()
            .filter_map(|c| outbound_bypass_reason(*c))
            .collect();
        assert_eq!(reasons.len(), 9);
        assert!(reasons.contains(&"excluded_interface"));
    }
}
