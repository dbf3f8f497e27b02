//! Types shared by weir's kernel programs and its agent.
//!
//! Everything here is `#[repr(C)]`, `Copy`, and free of implicit padding, so
//! the same bytes mean the same thing on both sides of a BPF map. The capture
//! decision itself ([`decide_outbound`], [`decide_inbound`]) is plain Rust in
//! this crate: the kernel programs call it with map lookups, and the agent
//! calls it with in-memory tables (for `weir explain` and unit tests), so
//! there is exactly one implementation of Istio's rule order.
//!
//! Byte order: addresses are stored as the kernel hands them to BPF programs
//! (`[u32; 4]` words whose *bytes* are in network order); IPv4 addresses are
//! stored IPv4-mapped (`::ffff:a.b.c.d`). Ports are stored in host order.
#![cfg_attr(not(test), no_std)]

pub mod ambient;
pub mod counters;
pub mod decide;
pub mod schema;

pub use ambient::*;
pub use counters::*;
pub use decide::*;

/// Layout version of every map below. The agent stores it in the pinned
/// `WEIR_META` map and refuses to reuse pinned maps written with another
/// version (bump it whenever a struct in this crate changes, or a map's
/// type, flags or sizing rule). v10: `LISTEN_PORTS` a bitmap, the per-CPU
/// `CONNECTING` slots, `NodeCounters::connect_other_cpu`. v9: `PodCounters` with one unit a field
/// (DNS split by protocol, connects vs datagrams); hash maps
/// `BPF_F_NO_PREALLOC`, sizes from the node's pod capacity, `VIRT_FLOWS`
/// created on first use.
pub const LAYOUT_VERSION: u32 = 10;

/// `AF_INET` as the kernel reports it in BPF contexts.
pub const AF_INET: u32 = 2;
/// `AF_INET6` as the kernel reports it in BPF contexts.
pub const AF_INET6: u32 = 10;

/// An address as stored in weir's maps: four 32-bit words whose bytes are
/// in network order, IPv4 addresses IPv4-mapped.
pub type Addr = [u32; 4];

/// The IPv4-mapped form of an IPv4 address given as a network-order word
/// (as found in `bpf_sock_addr.user_ip4`).
#[inline(always)]
pub const fn v4_mapped(ip4_be: u32) -> Addr {
    [0, 0, u32::from_ne_bytes([0, 0, 0xff, 0xff]), ip4_be]
}

/// Whether `addr` is IPv4-mapped (`::ffff:0:0/96`).
#[inline(always)]
pub const fn is_v4_mapped(addr: &Addr) -> bool {
    addr[0] == 0 && addr[1] == 0 && addr[2] == u32::from_ne_bytes([0, 0, 0xff, 0xff])
}

/// Whether `addr` is the wildcard address: `::`, or `0.0.0.0` in its
/// IPv4-mapped form (a socket bound to no particular address).
#[inline(always)]
pub const fn is_unspecified(addr: &Addr) -> bool {
    addr[3] == 0 && addr[0] | addr[1] == 0 && (addr[2] == 0 || is_v4_mapped(addr))
}

/// The IPv4 word (network order) of an IPv4-mapped address.
#[inline(always)]
pub const fn v4_word(addr: &Addr) -> u32 {
    addr[3]
}

/// Builds an [`Addr`] from the 16 bytes of an IPv6 address (network order).
#[inline(always)]
pub const fn addr_from_octets(o: [u8; 16]) -> Addr {
    [
        u32::from_ne_bytes([o[0], o[1], o[2], o[3]]),
        u32::from_ne_bytes([o[4], o[5], o[6], o[7]]),
        u32::from_ne_bytes([o[8], o[9], o[10], o[11]]),
        u32::from_ne_bytes([o[12], o[13], o[14], o[15]]),
    ]
}

/// The 16 network-order bytes of an [`Addr`].
#[inline(always)]
pub const fn addr_octets(a: &Addr) -> [u8; 16] {
    let w0 = a[0].to_ne_bytes();
    let w1 = a[1].to_ne_bytes();
    let w2 = a[2].to_ne_bytes();
    let w3 = a[3].to_ne_bytes();
    [
        w0[0], w0[1], w0[2], w0[3], w1[0], w1[1], w1[2], w1[3], w2[0], w2[1], w2[2], w2[3], w3[0],
        w3[1], w3[2], w3[3],
    ]
}

/// Policy flag: outbound capture is on for this pod.
pub const POLICY_CAPTURE_OUTBOUND: u32 = 1 << 0;
/// Policy flag: inbound capture is on for this pod.
pub const POLICY_CAPTURE_INBOUND: u32 = 1 << 1;
/// Policy flag: `includeOutboundIPRanges` is `*` (every destination).
pub const POLICY_OUTBOUND_ALL_CIDRS: u32 = 1 << 2;
/// Policy flag: `includeInboundPorts` is `*` (every port but the excluded).
pub const POLICY_INBOUND_ALL_PORTS: u32 = 1 << 3;
/// Policy flag: the outbound include ranges contain a loopback address, so
/// Istio skips its "other processes on loopback are not captured" rule.
pub const POLICY_INCLUDE_HAS_LOOPBACK: u32 = 1 << 4;
/// Policy flag: `pod_ip4` is set.
pub const POLICY_HAS_IP4: u32 = 1 << 5;
/// Policy flag: `pod_ip6` is set.
pub const POLICY_HAS_IP6: u32 = 1 << 6;
/// Policy flag: DNS capture (TCP/UDP port 53 to the DNS port).
pub const POLICY_CAPTURE_DNS: u32 = 1 << 7;
/// Policy flag: with DNS capture, port 53 to *any* server is captured (not
/// only to the pod's resolvers, listed in `CIDR_DNS`).
pub const POLICY_DNS_ALL_SERVERS: u32 = 1 << 8;
/// Policy flag: only processes whose GID is one of the `IDKEY_OWNER_GROUP`
/// entries are captured (`ISTIO_OUTBOUND_OWNER_GROUPS` is a list).
pub const POLICY_OWNER_GROUPS_ONLY: u32 = 1 << 9;
/// Policy flag: processes whose GID is one of the `IDKEY_OWNER_GROUP`
/// entries are not captured (`ISTIO_OUTBOUND_OWNER_GROUPS_EXCLUDE`).
pub const POLICY_OWNER_GROUPS_EXCEPT: u32 = 1 << 10;
/// Policy flag: Linkerd-style loopback rule: every connection over `lo`,
/// the proxy's included, is left alone (no "proxy to own pod" rule).
pub const POLICY_LOOPBACK_SIMPLE: u32 = 1 << 11;
/// Policy flag: the pod has `excludeInterfaces` (see
/// `IDKEY_EXCLUDED_IFINDEX` and `CidrList::ExcludedInterfaceRoutes`).
pub const POLICY_EXCLUDE_IFACES: u32 = 1 << 12;
/// Policy flag: inbound connections from some sources are not captured
/// (Linkerd's `skip-subnets`; see `CidrList::InboundSkipSources`).
pub const POLICY_INBOUND_SKIP_SOURCES: u32 = 1 << 13;
/// Policy flag: Kuma's rule order (see `decide_outbound`): excluded
/// addresses and DNS come before the loopback rules in its `OUTPUT` chain,
/// and DNS over TCP is never captured.
pub const POLICY_KUMA_ORDER: u32 = 1 << 16;

/// Which proxy identity Istio's loopback rules are written for (see
/// [`PodPolicy::lo_id_kind`]).
pub const ID_KIND_NONE: u32 = 0;
/// The identity is a UID.
pub const ID_KIND_UID: u32 = 1;
/// The identity is a GID.
pub const ID_KIND_GID: u32 = 2;

/// Per-pod capture policy, keyed by the pod's network-namespace cookie in
/// the `POD_POLICY` map.
#[repr(C)]
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct PodPolicy {
    /// Agent-assigned pod number (stable while the pod is enrolled).
    pub pod_id: u32,
    /// `POLICY_*` flags.
    pub flags: u32,
    /// Port of the proxy's outbound listener (Istio: 15001).
    pub outbound_port: u16,
    /// Port of the proxy's inbound listener (Istio: 15006).
    pub inbound_port: u16,
    /// Port that is never captured in either direction (Istio's HBONE
    /// tunnel port 15008); 0 for none.
    pub tunnel_port: u16,
    /// Port of the proxy's DNS listener (Istio: 15053).
    pub dns_port: u16,
    /// The first proxy identity: Istio writes its "loopback" rules per
    /// identity, and the first one's "not this identity on lo: RETURN" rule
    /// shadows the others (see [`decide_outbound`]).
    pub lo_id: u32,
    /// `ID_KIND_*` of [`PodPolicy::lo_id`].
    pub lo_id_kind: u32,
    /// The pod's primary IPv4 address (network order), used as the source
    /// of redirected connections, as the kernel would have chosen it.
    pub pod_ip4: u32,
    /// The pod's primary IPv6 address.
    pub pod_ip6: Addr,
    /// `TABLE_*` bits: which of the pod's lists have entries in the maps.
    /// Set by the agent from what it writes (never by the rules
    /// themselves); the kernel skips the lookups of empty lists.
    pub tables: u32,
    /// The pod's only proxy UID, when `tables` has [`TABLE_ONE_UID`].
    pub one_uid: u32,
    /// The pod's only proxy GID, when `tables` has [`TABLE_ONE_GID`].
    pub one_gid: u32,
}

/// [`PodPolicy::tables`] bit: `PORT_RULES` has `PORT_OUT_INCLUDE` entries.
pub const TABLE_OUT_INCLUDE_PORTS: u32 = 1 << 0;
/// [`PodPolicy::tables`] bit: `PORT_RULES` has `PORT_OUT_EXCLUDE` entries.
pub const TABLE_OUT_EXCLUDE_PORTS: u32 = 1 << 1;
/// [`PodPolicy::tables`] bit: `PORT_RULES` has `PORT_IN_INCLUDE` entries.
pub const TABLE_IN_INCLUDE_PORTS: u32 = 1 << 2;
/// [`PodPolicy::tables`] bit: `PORT_RULES` has `PORT_IN_EXCLUDE` entries.
pub const TABLE_IN_EXCLUDE_PORTS: u32 = 1 << 3;
/// [`PodPolicy::tables`] bit: `CIDR_EXCLUDE` has entries.
pub const TABLE_CIDR_EXCLUDE: u32 = 1 << 4;
/// [`PodPolicy::tables`] bit: `CIDR_INCLUDE` has entries.
pub const TABLE_CIDR_INCLUDE: u32 = 1 << 5;
/// [`PodPolicy::tables`] bit: `CIDR_DNS` has entries.
pub const TABLE_CIDR_DNS: u32 = 1 << 6;
/// [`PodPolicy::tables`] bit: `CIDR_IFACE` has entries.
pub const TABLE_CIDR_IFACE: u32 = 1 << 7;
/// [`PodPolicy::tables`] bit: `CIDR_SKIP_SRC` has entries.
pub const TABLE_CIDR_SKIP_SRC: u32 = 1 << 8;
/// [`PodPolicy::tables`] bit: `SRC_ROUTES` has entries.
pub const TABLE_SRC_ROUTES: u32 = 1 << 9;
/// [`PodPolicy::tables`] bit: `PROXY_IDS` has `IDKEY_UID` entries.
pub const TABLE_UIDS: u32 = 1 << 10;
/// [`PodPolicy::tables`] bit: `PROXY_IDS` has `IDKEY_GID` entries.
pub const TABLE_GIDS: u32 = 1 << 11;
/// [`PodPolicy::tables`] bit: `PROXY_IDS` has `IDKEY_OWNER_GROUP` entries.
pub const TABLE_OWNER_GROUPS: u32 = 1 << 12;
/// [`PodPolicy::tables`] bit: `PROXY_IDS` has `IDKEY_EXCLUDED_IFINDEX`
/// entries.
pub const TABLE_EXCLUDED_IFINDEXES: u32 = 1 << 13;

/// [`PodPolicy::tables`] bit: the pod has exactly one proxy UID,
/// [`PodPolicy::one_uid`] (no `PROXY_IDS` lookup needed for UIDs).
pub const TABLE_ONE_UID: u32 = 1 << 14;
/// [`PodPolicy::tables`] bit: the pod has exactly one proxy GID,
/// [`PodPolicy::one_gid`].
pub const TABLE_ONE_GID: u32 = 1 << 15;

/// The [`PodPolicy::tables`] bit of port list `kind` (`PORT_*`).
pub const fn table_of_ports(kind: u16) -> u32 {
    match kind {
        PORT_OUT_INCLUDE => TABLE_OUT_INCLUDE_PORTS,
        PORT_OUT_EXCLUDE => TABLE_OUT_EXCLUDE_PORTS,
        PORT_IN_INCLUDE => TABLE_IN_INCLUDE_PORTS,
        PORT_IN_EXCLUDE => TABLE_IN_EXCLUDE_PORTS,
        _ => 0,
    }
}

/// The [`PodPolicy::tables`] bit of identity list `kind` (`IDKEY_*`).
pub const fn table_of_ids(kind: u32) -> u32 {
    match kind {
        IDKEY_UID => TABLE_UIDS,
        IDKEY_GID => TABLE_GIDS,
        IDKEY_OWNER_GROUP => TABLE_OWNER_GROUPS,
        IDKEY_EXCLUDED_IFINDEX => TABLE_EXCLUDED_IFINDEXES,
        _ => 0,
    }
}

/// The [`PodPolicy::tables`] bit of CIDR list `list`.
pub const fn table_of_cidrs(list: CidrList) -> u32 {
    match list {
        CidrList::OutboundExclude => TABLE_CIDR_EXCLUDE,
        CidrList::OutboundInclude => TABLE_CIDR_INCLUDE,
        CidrList::DnsServers => TABLE_CIDR_DNS,
        CidrList::ExcludedInterfaceRoutes => TABLE_CIDR_IFACE,
        CidrList::InboundSkipSources => TABLE_CIDR_SKIP_SRC,
    }
}

/// Kinds of entries in the `PORT_RULES` map.
pub const PORT_OUT_INCLUDE: u16 = 1;
/// Outbound ports never captured (`excludeOutboundPorts`).
pub const PORT_OUT_EXCLUDE: u16 = 2;
/// Inbound ports captured when the include list is not `*`.
pub const PORT_IN_INCLUDE: u16 = 3;
/// Inbound ports not captured when the include list is `*`.
pub const PORT_IN_EXCLUDE: u16 = 4;

/// Key of the `PORT_RULES` hash map: one entry per (pod, list, port).
#[repr(C)]
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PortKey {
    /// The pod's network-namespace cookie.
    pub netns_cookie: u64,
    /// Port, host order.
    pub port: u16,
    /// `PORT_*` kind.
    pub kind: u16,
    /// Zero.
    pub _pad: u32,
}

/// Kinds of entries in the `PROXY_IDS` map.
pub const IDKEY_UID: u32 = 1;
/// A proxy GID.
pub const IDKEY_GID: u32 = 2;
/// A GID of the owner-group filter (see `POLICY_OWNER_GROUPS_*`).
pub const IDKEY_OWNER_GROUP: u32 = 3;
/// The index of an interface in `excludeInterfaces` (inside the pod).
pub const IDKEY_EXCLUDED_IFINDEX: u32 = 4;

/// Key of the `VIRT_IFACES` map: an interface of
/// `istio.io/reroute-virtual-interfaces`, inside one pod.
#[repr(C)]
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct VirtKey {
    /// The pod's network-namespace cookie.
    pub netns_cookie: u64,
    /// The interface's index inside the pod.
    pub ifindex: u32,
    /// Zero.
    pub _pad: u32,
}

/// [`VirtIface`] flag: `addr4` is set.
pub const VIRT_HAS4: u32 = 1;
/// [`VirtIface`] flag: `addr6` is set.
pub const VIRT_HAS6: u32 = 2;

/// What the TCP redirect of a virtual interface needs to know about it:
/// the addresses `REDIRECT` would send its connections to (the first
/// IPv4 address; the first global, non-tentative IPv6 address) and where
/// the IP header starts in its frames.
#[repr(C)]
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct VirtIface {
    /// IPv4 address, network order (with `VIRT_HAS4`).
    pub addr4: u32,
    /// `VIRT_*` flags.
    pub flags: u32,
    /// IPv6 address (with `VIRT_HAS6`).
    pub addr6: Addr,
    /// Length of the link-layer header (14 for Ethernet, 0 for L3 devices).
    pub l3_offset: u32,
    /// Zero.
    pub _pad: u32,
}

/// One direction of a connection rerouted from a virtual interface, as
/// the pod sees its packets: `peer` is the virtual machine's end, `local`
/// the pod's end (the original destination on the way in, the interface
/// address and outbound port on the way back). Key of `VIRT_FLOWS`.
#[repr(C)]
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct VirtFlowKey {
    /// The pod's network-namespace cookie.
    pub netns_cookie: u64,
    /// The virtual machine's address (IPv4-mapped for IPv4).
    pub peer_addr: Addr,
    /// The pod-side address.
    pub local_addr: Addr,
    /// The virtual machine's port, host order.
    pub peer_port: u16,
    /// The pod-side port, host order.
    pub local_port: u16,
    /// Zero.
    pub _pad: u32,
}

/// How packets of a [`VirtFlowKey`] are rewritten: the pod-side end
/// becomes `addr`:`port`, the virtual machine's port becomes `peer_port`.
/// The entry for the way in (original destination -> interface address
/// and outbound port) and the one for the way back mirror each other.
#[repr(C)]
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct VirtFlow {
    /// The pod-side address to write.
    pub addr: Addr,
    /// The pod-side port to write, host order.
    pub port: u16,
    /// The virtual machine's port to write, host order.
    pub peer_port: u16,
    /// Zero.
    pub _pad: u32,
}

/// Key of the `PROXY_IDS` hash map: one entry per (pod, uid-or-gid).
#[repr(C)]
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct IdKey {
    /// The pod's network-namespace cookie.
    pub netns_cookie: u64,
    /// The UID or GID.
    pub id: u32,
    /// `IDKEY_*` kind.
    pub kind: u32,
}

/// Data part of the CIDR LPM-trie keys: the pod's cookie followed by the
/// address, so one trie serves every pod (prefix length = 64 + address
/// prefix, IPv4 prefixes counted in their IPv4-mapped form).
#[repr(C)]
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CidrData {
    /// The pod's network-namespace cookie, as bytes (native order; always
    /// fully covered by the prefix, so its byte order does not matter).
    pub netns_cookie: [u8; 8],
    /// The address, 16 network-order bytes.
    pub addr: [u8; 16],
}

/// Prefix length of the cookie part of a [`CidrData`] key.
pub const CIDR_COOKIE_BITS: u32 = 64;

/// Key of the `LISTENERS` sockhash: a proxy listener of one pod.
#[repr(C)]
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct ListenerKey {
    /// The pod's network-namespace cookie.
    pub netns_cookie: u64,
    /// Listening port, host order.
    pub port: u16,
    /// Address family of the listening socket (`AF_INET`/`AF_INET6`).
    pub family: u16,
    /// `LISTENER_TCP` (a proxy's listening socket, recorded on `listen()`)
    /// or `LISTENER_UDP` (the DNS proxy's UDP socket, adopted by the agent).
    pub protocol: u32,
}

/// Words of the `LISTEN_PORTS` bitmap: one bit for every port.
pub const LISTEN_PORT_WORDS: u32 = 65536 / 64;

/// Where port `port` is in the `LISTEN_PORTS` bitmap: the word's index and
/// the port's bit in it.
#[inline(always)]
pub const fn listen_port_bit(port: u16) -> (u32, u64) {
    ((port / 64) as u32, 1u64 << (port % 64))
}

/// [`ListenerKey::protocol`] of a TCP listener.
pub const LISTENER_TCP: u32 = 0;
/// [`ListenerKey::protocol`] of the DNS proxy's UDP socket.
pub const LISTENER_UDP: u32 = 17;

/// One redirected TCP `connect()` on its way from `connect4`/`connect6`
/// (which know the original destination) to the socket's
/// `TCP_CONNECT_CB` (which knows its port): a slot of the per-CPU
/// `CONNECTING` array. Both run in the same system call, so the slot is
/// on the same CPU unless the task migrated in between.
#[repr(C)]
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct Connecting {
    /// The socket's cookie (`bpf_get_socket_cookie`); 0: free slot.
    pub sock: u64,
    /// The order in which `connect4`/`connect6` filled this CPU's slots
    /// (one more than the highest number in them): a slot whose
    /// `connect()` failed before `TCP_CONNECT_CB` is never emptied, and
    /// the oldest slot (lowest number) is the one reused. A number rather
    /// than a time: no helper call per connection.
    pub seq: u64,
    /// Where the application was going.
    pub od: OrigDst,
}

/// Slots of `CONNECTING` per CPU.
pub const CONNECTING_SLOTS: u32 = 4;

/// One connection seen from the proxy: the application's address and port
/// (the proxy's peer) and the proxy's listening port. Key of the
/// `PENDING_FLOWS` map, which holds a redirected connection's original
/// destination from the application's `connect()` until the proxy's
/// accepted socket closes (`SO_ORIGINAL_DST` reads it there).
#[repr(C)]
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct FlowKey {
    /// Network-namespace cookie of the pod (both ends live in it).
    pub netns_cookie: u64,
    /// The application socket's local address (the proxy's peer).
    pub peer_addr: Addr,
    /// The application socket's local port, host order.
    pub peer_port: u16,
    /// The proxy's listening port, host order.
    pub local_port: u16,
    /// Zero.
    pub _pad: u32,
}

/// [`OrigDst`] flag: the application's side of a redirected connection
/// (what its `getpeername()` answers; the proxy's side leaves it out).
pub const ORIG_APP_SIDE: u16 = 1;
/// [`OrigDst`] flag: the connection went to the inbound port (Istio's rule
/// "proxy calling its own pod over loopback").
pub const ORIG_TO_INBOUND: u16 = 4;
/// [`OrigDst`] flag: a DNS query sent to the DNS port (UDP: replies from
/// the DNS port are shown as coming from `addr`).
pub const ORIG_DNS: u16 = 8;
/// [`OrigDst`] flag: in `PENDING_FLOWS`, a connection ztunnel (ambient
/// mode) made to the application from inside the pod; inbound capture
/// leaves it alone (`addr`/`port`: the application's end).
pub const ORIG_ZTUNNEL: u16 = 32;

/// The destination an application dialled before weir redirected it.
#[repr(C)]
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct OrigDst {
    /// The original destination address (IPv4-mapped for IPv4).
    pub addr: Addr,
    /// The original destination port, host order.
    pub port: u16,
    /// `ORIG_*` flags.
    pub flags: u16,
    /// Pod number of the pod that made the connection.
    pub pod_id: u32,
}

/// Key of the `FAST_SOCKS` sockhash: one established TCP socket of an
/// enrolled pod, by its own addresses. The two ends of one connection have
/// mirrored keys, so a socket finds its peer with [`FastKey::peer`].
///
/// The netns cookie keeps loopback connections of different pods apart
/// (every pod has its own `127.0.0.1`); for a connection between two pods
/// it is the cookie of the pod owning `local_addr`, which the other end
/// knows from `POD_ADDRS`.
#[repr(C)]
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct FastKey {
    /// Network-namespace cookie of the socket's pod.
    pub netns_cookie: u64,
    /// The socket's local address.
    pub local_addr: Addr,
    /// The socket's peer address.
    pub remote_addr: Addr,
    /// Local port, host order.
    pub local_port: u16,
    /// Peer port, host order.
    pub remote_port: u16,
    /// Zero.
    pub _pad: u32,
}

impl FastKey {
    /// The key the other end of this connection has, given the netns
    /// cookie of the pod it lives in.
    #[inline(always)]
    pub const fn peer(&self, peer_cookie: u64) -> FastKey {
        FastKey {
            netns_cookie: peer_cookie,
            local_addr: self.remote_addr,
            remote_addr: self.local_addr,
            local_port: self.remote_port,
            remote_port: self.local_port,
            _pad: 0,
        }
    }
}

/// Where the other end of a connection of an enrolled pod (netns cookie
/// `own_cookie`) can live, for the fast path: in the same pod for a
/// loopback peer (`127.0.0.0/8`, `::1`, `::6`), in the pod that owns the
/// peer address when that is a pod of this node (`pod_of`, the
/// `POD_ADDRS` lookup), otherwise nowhere on this node (`None`: the
/// connection is not a fast-path candidate).
#[inline(always)]
pub fn fast_peer_cookie(
    own_cookie: u64,
    remote: &Addr,
    pod_of: impl FnOnce(&Addr) -> Option<u64>,
) -> Option<u64> {
    if is_loopback_addr(remote) {
        Some(own_cookie)
    } else {
        pod_of(remote)
    }
}

/// [`FastPeer`] flag: this socket's messages go through TCP for the rest
/// of the connection. Set when a message found no peer socket: once bytes
/// went through TCP, later ones must too, or the receiver could read them
/// out of order (it reads redirected bytes before its TCP receive queue).
pub const FAST_FALLBACK: u32 = 1;

/// Value of the `FAST_PEER` socket storage: what the fast path's `sk_msg`
/// program needs about a socket in `FAST_SOCKS`.
#[repr(C)]
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct FastPeer {
    /// The `FAST_SOCKS` key of the other end of the connection.
    pub peer: FastKey,
    /// `FAST_*` flags.
    pub flags: u32,
    /// Zero.
    pub _pad: u32,
}

/// Value of the `POD_META` map: the pod's name, for operators reading maps
/// with bpftool and for `weir status` on a node where the agent is down.
#[repr(C)]
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct PodMeta {
    /// Kubernetes namespace, NUL-padded.
    pub namespace: [u8; 64],
    /// Pod name, NUL-padded.
    pub name: [u8; 64],
}

impl Default for PodMeta {
    fn default() -> Self {
        Self {
            namespace: [0; 64],
            name: [0; 64],
        }
    }
}

/// Value of the one-slot `WEIR_META` array: what wrote the pinned maps.
#[repr(C)]
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct WeirMeta {
    /// [`LAYOUT_VERSION`] of the agent that created the maps.
    pub layout_version: u32,
    /// Non-zero once the agent finished its first reconcile.
    pub ready: u32,
}

#[cfg(feature = "user")]
mod user {
    // SAFETY (all impls): every type is #[repr(C)], Copy, has only integer
    // and integer-array fields, and no implicit padding (checked by the
    // size assertions in the tests), so any bit pattern is a valid value.
    unsafe impl aya::Pod for super::PodPolicy {}
    unsafe impl aya::Pod for super::PortKey {}
    unsafe impl aya::Pod for super::IdKey {}
    unsafe impl aya::Pod for super::CidrData {}
    unsafe impl aya::Pod for super::ListenerKey {}
    unsafe impl aya::Pod for super::FlowKey {}
    unsafe impl aya::Pod for super::OrigDst {}
    unsafe impl aya::Pod for super::Connecting {}
    unsafe impl aya::Pod for super::PodCounters {}
    unsafe impl aya::Pod for super::NodeCounters {}
    unsafe impl aya::Pod for super::PodMeta {}
    unsafe impl aya::Pod for super::WeirMeta {}
    unsafe impl aya::Pod for super::FastKey {}
    unsafe impl aya::Pod for super::FastPeer {}
    unsafe impl aya::Pod for super::VirtKey {}
    unsafe impl aya::Pod for super::VirtIface {}
    unsafe impl aya::Pod for super::VirtFlowKey {}
    unsafe impl aya::Pod for super::VirtFlow {}
}

#[cfg(test)]
mod layout_tests {
    use super::*;
    use core::mem::size_of;

    /// No implicit padding: each size equals the sum of its fields.
    #[test]
    fn unspecified_is_the_wildcard_of_either_family() {
        assert!(super::is_unspecified(&[0; 4]));
        assert!(super::is_unspecified(&super::v4_mapped(0)));
        assert!(!super::is_unspecified(&super::v4_mapped(
            u32::from_ne_bytes([198, 18, 0, 1])
        )));
        assert!(!super::is_unspecified(&[
            0,
            0,
            0,
            u32::from_ne_bytes([0, 0, 0, 1])
        ]));
        // ::1:0:0 is not the wildcard, nor is anything outside ::ffff:0:0/96.
        assert!(!super::is_unspecified(&[0, 0, 1, 0]));
    }

    #[test]
    fn structs_have_no_padding() {
        assert_eq!(
            size_of::<PodPolicy>(),
            4 + 4 + 2 * 4 + 4 + 4 + 4 + 16 + 4 + 4 + 4
        );
        assert_eq!(size_of::<PortKey>(), 16);
        assert_eq!(size_of::<IdKey>(), 16);
        assert_eq!(size_of::<CidrData>(), 24);
        assert_eq!(size_of::<ListenerKey>(), 16);
        assert_eq!(size_of::<FlowKey>(), 8 + 16 + 2 + 2 + 4);
        assert_eq!(size_of::<OrigDst>(), 16 + 2 + 2 + 4);
        assert_eq!(size_of::<PodCounters>(), 25 * 8);
        assert_eq!(size_of::<VirtKey>(), 16);
        assert_eq!(size_of::<VirtIface>(), 4 + 4 + 16 + 4 + 4);
        assert_eq!(size_of::<VirtFlowKey>(), 8 + 16 + 16 + 2 + 2 + 4);
        assert_eq!(size_of::<VirtFlow>(), 16 + 2 + 2 + 4);
        assert_eq!(size_of::<NodeCounters>(), 14 * 8);
        assert_eq!(size_of::<Connecting>(), 8 + 8 + size_of::<OrigDst>());
        assert_eq!(size_of::<FastKey>(), 8 + 16 + 16 + 2 + 2 + 4);
        assert_eq!(size_of::<FastPeer>(), size_of::<FastKey>() + 4 + 4);
        assert_eq!(size_of::<PodMeta>(), 128);
    }

    #[test]
    fn listen_port_bits_cover_every_port_once() {
        let mut seen = std::collections::HashSet::new();
        for port in 0..=u16::MAX {
            let (word, bit) = listen_port_bit(port);
            assert!(word < LISTEN_PORT_WORDS, "{port}");
            assert_eq!(bit.count_ones(), 1);
            assert!(seen.insert((word, bit)), "{port}");
        }
        assert_eq!(listen_port_bit(15001), (234, 1 << 25));
    }

    #[test]
    fn fast_keys_mirror_each_other() {
        let app = FastKey {
            netns_cookie: 7,
            local_addr: v4_mapped(u32::from_ne_bytes([198, 18, 0, 1])),
            remote_addr: v4_mapped(u32::from_ne_bytes([127, 0, 0, 1])),
            local_port: 40000,
            remote_port: 15001,
            _pad: 0,
        };
        let proxy = app.peer(7);
        assert_eq!(proxy.local_addr, app.remote_addr);
        assert_eq!((proxy.local_port, proxy.remote_port), (15001, 40000));
        assert_eq!(proxy.peer(7), app);
    }

    #[test]
    fn fast_peers_are_loopback_or_local_pods() {
        let pod_b = v4_mapped(u32::from_ne_bytes([198, 18, 0, 3]));
        let pods = |a: &Addr| (*a == pod_b).then_some(9);
        // Loopback: the same pod, without a lookup.
        let lo = v4_mapped(u32::from_ne_bytes([127, 0, 0, 6]));
        assert_eq!(fast_peer_cookie(7, &lo, |_| panic!("no lookup")), Some(7));
        let v6_lo = addr_from_octets(core::net::Ipv6Addr::LOCALHOST.octets());
        assert_eq!(fast_peer_cookie(7, &v6_lo, pods), Some(7));
        // Another pod of this node.
        assert_eq!(fast_peer_cookie(7, &pod_b, pods), Some(9));
        // Anything else is not on this node.
        let remote = v4_mapped(u32::from_ne_bytes([10, 0, 0, 5]));
        assert_eq!(fast_peer_cookie(7, &remote, pods), None);
    }

    #[test]
    fn v4_mapping_round_trips() {
        let ip = u32::from_ne_bytes([198, 18, 0, 1]);
        let a = v4_mapped(ip);
        assert!(is_v4_mapped(&a));
        assert_eq!(v4_word(&a), ip);
        assert_eq!(
            addr_octets(&a),
            [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 198, 18, 0, 1]
        );
        assert_eq!(addr_from_octets(addr_octets(&a)), a);
    }
}
