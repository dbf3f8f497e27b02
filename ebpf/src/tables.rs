//! Maps shared with the agent, and small helpers around them.
//!
//! All maps are BTF-defined (`#[btf_map]`), so `bpftool map dump name X`
//! prints field names. Sizes here are defaults: the agent sets the real
//! capacities at load time, from the node's pod capacity (`--max-pods`
//! and friends).
//!
//! Kernel memory grows with use, not with the capacities: hash maps are
//! `BPF_F_NO_PREALLOC` (an entry is allocated when it is inserted; only
//! the bucket array, 16 bytes per slot, is allocated up front) and LPM
//! tries always allocate on demand. The two LRU maps cannot be
//! `NO_PREALLOC` (the kernel refuses it): `PENDING_FLOWS` is sized from
//! the pod count (`--max-pending`) for open redirected connections, and
//! `VIRT_FLOWS` is created (pinned) only when a pod first needs virtual
//! interfaces.

use aya_ebpf::{
    bindings::BPF_F_NO_PREALLOC,
    btf_maps::{
        Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, PerCpuHashMap, SkStorage, SockHash,
        lpm_trie::Key,
    },
    macros::btf_map,
};
use weir_common::*;

/// Map flags of hash maps: entries allocated on insert.
const NO_PREALLOC: usize = BPF_F_NO_PREALLOC as usize;

/// The per-pod tables, as `weir_common::pod_tables!` declares them.
macro_rules! kernel_pod_tables {
    ($( $(#[$doc:meta])* $name:ident / $field:ident {
        kind: $kind:ident, key: $key:ty, value: $value:ty, default: $default:literal,
        sizing: $sizing:expr, cookie_in: $cookie_in:ident, list: $list:expr,
        bits: |$bk:ident| $bits:expr $(,)?
    })*) => {
        $( kernel_pod_table!($(#[$doc])* $name, $kind, $key, $value, $default); )*

        /// Whether `key` falls in one of the pod's CIDRs of `list`: a
        /// lookup in the LPM table `pod_tables!` names for that list
        /// (`list:`), so a new CIDR list needs no code here.
        #[inline(always)]
        fn cidr_list_has(list: CidrList, key: &Key<CidrData>) -> bool {
            $( kernel_cidr_lookup!($name, $kind, $list, list, key); )*
            false
        }
    };
}

/// One arm of `cidr_list_has`: LPM tables answer the list they declare;
/// hash tables answer none.
macro_rules! kernel_cidr_lookup {
    ($name:ident, LpmTrie, $list:expr, $want:ident, $key:ident) => {
        if $list == Some($want) {
            return $name.get($key).is_some();
        }
    };
    ($name:ident, Hash, $list:expr, $want:ident, $key:ident) => {};
}

macro_rules! kernel_pod_table {
    ($(#[$doc:meta])* $name:ident, Hash, $key:ty, $value:ty, $default:literal) => {
        $(#[$doc])*
        #[btf_map]
        pub static $name: HashMap<$key, $value, $default, NO_PREALLOC> = HashMap::new();
    };
    ($(#[$doc:meta])* $name:ident, LpmTrie, $key:ty, $value:ty, $default:literal) => {
        $(#[$doc])*
        #[btf_map]
        pub static $name: LpmTrie<$key, $value, $default> = LpmTrie::new();
    };
}

weir_common::pod_tables!(kernel_pod_tables);

/// Per-pod policy, keyed by netns cookie.
#[btf_map]
pub static POD_POLICY: HashMap<u64, PodPolicy, 16384, NO_PREALLOC> = HashMap::new();

/// The pod's own source address for `dst`, if `dst` is on one of its
/// connected subnets.
#[inline(always)]
pub fn source_route(cookie: u64, dst: &Addr) -> Option<Addr> {
    let key = Key::new(
        CIDR_COOKIE_BITS + 128,
        CidrData {
            netns_cookie: cookie.to_ne_bytes(),
            addr: addr_octets(dst),
        },
    );
    SRC_ROUTES.get(&key).copied()
}

/// Listening proxy sockets per (pod, port, family). Entries vanish when the
/// socket closes, which is what makes capture fail closed.
#[btf_map]
pub static LISTENERS: SockHash<ListenerKey, 65536> = SockHash::new();

/// Ports whose listeners are recorded in `LISTENERS` (every capture port
/// of every enrolled pod), one bit a port: asked several times per
/// redirected connection, and an array lookup is inlined by the JIT where
/// a hash lookup is a helper call.
#[btf_map]
pub static LISTEN_PORTS: Array<u64, { LISTEN_PORT_WORDS as usize }> = Array::new();

/// Whether `port` is a capture port of some enrolled pod.
#[inline(always)]
pub fn is_listen_port(port: u16) -> bool {
    let (word, bit) = listen_port_bit(port);
    matches!(LISTEN_PORTS.get(word), Some(w) if *w & bit != 0)
}

/// Original destinations of redirected connections, from the
/// application's `TCP_CONNECT_CB` until the proxy's accepted socket closes,
/// read by both sockets (each computes the key from its own addresses);
/// ambient: ztunnel's connections to the application, until evicted.
#[btf_map]
pub static PENDING_FLOWS: LruHashMap<FlowKey, OrigDst, 65536> = LruHashMap::new();

/// Redirected TCP `connect()`s between `connect4`/`connect6` and their
/// socket's `TCP_CONNECT_CB`, a few slots per CPU: a per-CPU array has no
/// lock and no allocation, where socket storage (two allocations and an
/// RCU free per connection) or a hash map (a bucket lock) cost a good part
/// of a redirected connection's CPU time.
#[btf_map]
pub static CONNECTING: PerCpuArray<Connecting, { CONNECTING_SLOTS as usize }> = PerCpuArray::new();

/// Most CPUs searched for a `CONNECTING` slot left on another CPU (the
/// search stops at the first CPU the kernel does not have).
const MAX_CPUS: u32 = 1024;

/// Original destination stored on a socket (freed with it): UDP sockets
/// connected to a DNS server; the application's TCP socket once the proxy
/// has closed its side first (`PENDING_FLOWS` forgets the connection when
/// the proxy's socket closes, and the application may still ask
/// `getpeername()` while it reads the rest); the proxy's socket reset
/// before it asked.
#[btf_map]
pub static ORIG_DST: SkStorage<OrigDst> = SkStorage::new();

/// Records a redirected TCP `connect()` of socket `sock` going to `od`, in
/// this CPU's `CONNECTING` slots: a free one, else the oldest.
#[inline(always)]
pub fn connecting_put(sock: u64, od: OrigDst) {
    let mut free: Option<*mut Connecting> = None;
    let mut oldest: Option<*mut Connecting> = None;
    let (mut oldest_seq, mut newest_seq) = (u64::MAX, 0u64);
    for i in 0..CONNECTING_SLOTS {
        let Some(p) = CONNECTING.get_ptr_mut(i) else {
            return;
        };
        // SAFETY: pointer into this CPU's slot of our array.
        let (used, seq) = unsafe { ((*p).sock, (*p).seq) };
        newest_seq = newest_seq.max(seq);
        if used == 0 {
            free = free.or(Some(p));
        } else if seq < oldest_seq {
            oldest_seq = seq;
            oldest = Some(p);
        }
    }
    if let Some(p) = free.or(oldest) {
        // SAFETY: as above.
        unsafe {
            (*p).od = od;
            (*p).seq = newest_seq.wrapping_add(1);
            (*p).sock = sock;
        }
    }
}

/// Takes the original destination [`connecting_put`] recorded for socket
/// `sock`: from this CPU's slots, else (the task moved to another CPU
/// during `connect()`) from any CPU's.
#[inline(always)]
pub fn connecting_take(sock: u64) -> Option<OrigDst> {
    for i in 0..CONNECTING_SLOTS {
        if let Some(p) = CONNECTING.get_ptr_mut(i) {
            // SAFETY: pointer into this CPU's slot of our array.
            unsafe {
                if (*p).sock == sock {
                    (*p).sock = 0;
                    return Some((*p).od);
                }
            }
        }
    }
    // Not here: the task moved to another CPU in between, or (found
    // nowhere) weir did not redirect this connect() (a direct dial of a
    // capture port), or its slot was reused meanwhile; the proxy's accept
    // counts that last case as `orig_dst_lost` (a pod's own address to a
    // capture port without an entry).
    let found = connecting_take_any_cpu(sock);
    if found.is_some() {
        bump_node(NodeCounter::ConnectOtherCpu);
    }
    found
}

#[inline(always)]
fn connecting_take_any_cpu(sock: u64) -> Option<OrigDst> {
    let map = core::ptr::from_ref(&CONNECTING).cast_mut().cast();
    for cpu in 0..MAX_CPUS {
        for i in 0..CONNECTING_SLOTS {
            let key = i;
            // SAFETY: lookup in our per-CPU array with a u32 key on our
            // stack; NULL once `cpu` is past the kernel's CPUs.
            let p = unsafe {
                aya_ebpf::helpers::generated::bpf_map_lookup_percpu_elem(
                    map,
                    (&key as *const u32).cast_mut().cast(),
                    cpu,
                )
            } as *mut Connecting;
            if p.is_null() {
                return None;
            }
            // SAFETY: non-NULL slot of our value type.
            unsafe {
                if (*p).sock == sock {
                    (*p).sock = 0;
                    return Some((*p).od);
                }
            }
        }
    }
    None
}

/// The `PENDING_FLOWS` key of a redirected connection as its
/// application's socket sees it: its own address and port, and the port
/// it is connected to (the proxy's).
#[inline(always)]
pub fn app_flow_key(cookie: u64, local: Addr, local_port: u16, remote_port: u16) -> FlowKey {
    FlowKey {
        netns_cookie: cookie,
        peer_addr: local,
        peer_port: local_port,
        local_port: remote_port,
        _pad: 0,
    }
}

/// Whether a connection between `app_addr` and `capture_port` that has
/// no `PENDING_FLOWS` entry is one weir redirected and lost (the LRU map
/// evicted it, or the hand-off from `connect()` failed): from one of the
/// pod's own addresses (weir bound that source) to a capture port. The
/// proxy's `SO_ORIGINAL_DST` then fails (`ENOENT`) rather than answer its
/// own address. The one definition of "lost" for every program.
#[inline(always)]
pub fn redirect_lost(cookie: u64, app_addr: &Addr, capture_port: u16) -> bool {
    is_listen_port(capture_port) && KernelTables::bare(cookie).is_pod_addr(app_addr)
}

/// The original destination of the application's side of a redirected
/// TCP connection (`ORIG_APP_SIDE`), from `PENDING_FLOWS` by the
/// application socket's addresses.
#[inline(always)]
pub fn app_orig_dst(key: &FlowKey) -> Option<OrigDst> {
    let p = PENDING_FLOWS.get_ptr(key)?;
    // SAFETY: pointer returned by a successful lookup.
    let od = unsafe { *p };
    (od.flags & ORIG_APP_SIDE != 0).then_some(od)
}

/// The original destination stored on socket `sk`, if any (lookup only).
#[inline(always)]
pub fn orig_dst_of(sk: *mut aya_ebpf::bindings::bpf_sock) -> Option<OrigDst> {
    // SAFETY: `sk` is a socket pointer from the program's context (the
    // helper accepts NULL); the map is our sk_storage map; no create flag.
    let p = unsafe {
        aya_ebpf::helpers::generated::bpf_sk_storage_get(
            core::ptr::from_ref(&ORIG_DST).cast_mut().cast(),
            sk.cast(),
            core::ptr::null_mut(),
            0,
        )
    } as *const OrigDst;
    // SAFETY: non-NULL storage holds our value type.
    (!p.is_null()).then(|| unsafe { *p })
}

/// Stores `od` on socket `sk` (creating its storage); false when the
/// kernel could not allocate it.
#[inline(always)]
pub fn store_orig_dst(sk: *mut aya_ebpf::bindings::bpf_sock, mut od: OrigDst) -> bool {
    // SAFETY: as in `orig_dst_of`; F_CREATE initialises new storage with
    // `od`, which lives on our stack for the call.
    let p = unsafe {
        aya_ebpf::helpers::generated::bpf_sk_storage_get(
            core::ptr::from_ref(&ORIG_DST).cast_mut().cast(),
            sk.cast(),
            (&mut od as *mut OrigDst).cast(),
            u64::from(aya_ebpf::bindings::BPF_SK_STORAGE_GET_F_CREATE),
        )
    } as *mut OrigDst;
    if p.is_null() {
        return false;
    }
    // SAFETY: non-NULL storage of our value type (it may have existed).
    unsafe { *p = od };
    true
}

/// The fast path's switch: 1 when the agent runs with `--fast-path`
/// (and its `sk_msg` program is attached to `FAST_SOCKS`), else 0.
#[btf_map]
pub static FAST_PATH: Array<u32, 1> = Array::new();

/// Whether new local connections join the fast path.
#[inline(always)]
pub fn fast_path_on() -> bool {
    matches!(FAST_PATH.get(0), Some(v) if *v != 0)
}

/// The fast path: established TCP sockets of enrolled pods whose peer can
/// be on this node (loopback, or another enrolled pod's address), keyed by
/// their own addresses. `weir_fast_redirect` runs on every message these
/// sockets send. Entries vanish when the sockets close.
#[btf_map]
pub static FAST_SOCKS: SockHash<FastKey, 65536> = SockHash::new();

/// The peer key (and fallback flag) of each socket in `FAST_SOCKS`, on the
/// socket itself (freed with it).
#[btf_map]
pub static FAST_PEER: SkStorage<FastPeer> = SkStorage::new();

/// The `FAST_PEER` storage of socket `sk`, if any.
#[inline(always)]
pub fn fast_peer_of(sk: *mut aya_ebpf::bindings::bpf_sock) -> Option<*mut FastPeer> {
    // SAFETY: as in `orig_dst_of`: a socket pointer from the program's
    // context, our sk_storage map, no create flag.
    let p = unsafe {
        aya_ebpf::helpers::generated::bpf_sk_storage_get(
            core::ptr::from_ref(&FAST_PEER).cast_mut().cast(),
            sk.cast(),
            core::ptr::null_mut(),
            0,
        )
    } as *mut FastPeer;
    (!p.is_null()).then_some(p)
}

/// Stores `fp` on socket `sk` (creating its storage); false when the
/// kernel could not allocate it.
#[inline(always)]
pub fn store_fast_peer(sk: *mut aya_ebpf::bindings::bpf_sock, mut fp: FastPeer) -> bool {
    // SAFETY: as in `store_orig_dst`.
    let p = unsafe {
        aya_ebpf::helpers::generated::bpf_sk_storage_get(
            core::ptr::from_ref(&FAST_PEER).cast_mut().cast(),
            sk.cast(),
            (&mut fp as *mut FastPeer).cast(),
            u64::from(aya_ebpf::bindings::BPF_SK_STORAGE_GET_F_CREATE),
        )
    } as *mut FastPeer;
    if p.is_null() {
        return false;
    }
    // SAFETY: non-NULL storage of our value type (it may have existed).
    unsafe { *p = fp };
    true
}

/// Connections rerouted from virtual interfaces: two mirrored entries per
/// connection (the way in, the way back), as `REDIRECT`'s conntrack entry
/// would hold them. Least recently used entries go first when it fills.
#[btf_map]
pub static VIRT_FLOWS: LruHashMap<VirtFlowKey, VirtFlow, 131072> = LruHashMap::new();

/// Per-pod counters.
#[btf_map]
pub static POD_COUNTERS: PerCpuHashMap<u64, PodCounters, 16384, NO_PREALLOC> = PerCpuHashMap::new();

/// Node-wide counters.
#[btf_map]
pub static NODE_COUNTERS: PerCpuArray<NodeCounters, 1> = PerCpuArray::new();

/// Pod names for operators (not read by the programs).
#[btf_map]
pub static POD_META: HashMap<u64, PodMeta, 16384, NO_PREALLOC> = HashMap::new();

/// Kernel log level: 0 off (the default), 1 error, 2 warn, 3 info,
/// 4 debug, 5 trace (aya-log levels). Set by `weir run
/// --kernel-log-level` and at run time by `weir log-level`.
#[btf_map]
pub static LOG_LEVEL: Array<u32, 1> = Array::new();

/// Whether kernel log records of `level` (1 error .. 5 trace) are wanted:
/// one array lookup, so disabled logging costs next to nothing on the
/// hot paths.
#[inline(always)]
pub fn log_enabled(level: u32) -> bool {
    match LOG_LEVEL.get(0) {
        Some(l) => level <= *l,
        None => false,
    }
}

/// Layout version and readiness of the pinned state.
#[btf_map]
pub static WEIR_META: Array<WeirMeta, 1> = Array::new();

/// The pod's policy, copied out of the map.
#[inline(always)]
pub fn pod_policy(cookie: u64) -> Option<PodPolicy> {
    pod_policy_ref(cookie).copied()
}

/// The policy of the pod `cookie`, in place: no copy on the stack (the
/// connect hooks are within a few bytes of the verifier's 512-byte stack
/// limit). The hash map is `BPF_F_NO_PREALLOC`, so the agent's update
/// replaces the element rather than writing into it: a reader holding the
/// old element sees it whole (RCU) until the program ends.
#[inline(always)]
pub fn pod_policy_ref(cookie: u64) -> Option<&'static PodPolicy> {
    // SAFETY: pointer from a successful lookup into a map value, valid
    // for the program's run (RCU).
    POD_POLICY.get_ptr(&cookie).map(|p| unsafe { &*p })
}

/// Adds one to a pod's counter `c` on this CPU (no-op if the pod has
/// none).
#[inline(always)]
pub fn bump_pod(cookie: u64, c: PodCounter) {
    if let Some(p) = POD_COUNTERS.get_ptr_mut(&cookie) {
        // SAFETY: per-CPU value of this CPU; BPF programs do not preempt
        // each other on one CPU for these hooks.
        unsafe { &mut *p }.bump(c);
    }
}

/// Adds one to the node counter `c` on this CPU.
#[inline(always)]
pub fn bump_node(c: NodeCounter) {
    bump_node_with(|n| n.bump(c));
}

/// Updates the node counters on this CPU (several with one lookup).
#[inline(always)]
pub fn bump_node_with(f: impl FnOnce(&mut NodeCounters)) {
    if let Some(p) = NODE_COUNTERS.get_ptr_mut(0) {
        // SAFETY: as in `bump_pod`.
        f(unsafe { &mut *p });
    }
}

/// One pod's tables, backed by the maps above.
pub struct KernelTables<'a> {
    /// The pod's netns cookie.
    pub cookie: u64,
    /// The pod's policy: its `tables` bits say which lists have entries
    /// (a lookup in an empty list is answered without touching its map),
    /// and its single proxy UID/GID, if any.
    pub policy: &'a PodPolicy,
    /// A destination whose `POD_ADDRS` answer is already known (the
    /// connect hook asks twice)...
    pub known_addr: Addr,
    /// ...and the answer: `KNOWN_NONE`, `KNOWN_NO` or `KNOWN_YES`.
    pub known: u32,
}

/// The policy of [`KernelTables::bare`]: every list looked up.
static BARE_POLICY: PodPolicy = PodPolicy {
    pod_id: 0,
    flags: 0,
    outbound_port: 0,
    inbound_port: 0,
    tunnel_port: 0,
    dns_port: 0,
    lo_id: 0,
    lo_id_kind: 0,
    pod_ip4: 0,
    pod_ip6: [0; 4],
    tables: !(TABLE_ONE_UID | TABLE_ONE_GID),
    one_uid: 0,
    one_gid: 0,
};

/// [`KernelTables::known`]: no answer known.
pub const KNOWN_NONE: u32 = 0;
/// [`KernelTables::known`]: `known_addr` is not the pod's.
pub const KNOWN_NO: u32 = 1;
/// [`KernelTables::known`]: `known_addr` is the pod's.
pub const KNOWN_YES: u32 = 2;

impl<'a> KernelTables<'a> {
    /// The tables of the pod `cookie` whose policy is `p`.
    #[inline(always)]
    pub fn of(cookie: u64, p: &'a PodPolicy) -> Self {
        Self {
            cookie,
            policy: p,
            known_addr: [0; 4],
            known: KNOWN_NONE,
        }
    }

    /// The tables of the pod `cookie`, every list looked up (only
    /// `is_pod_addr` is asked of these).
    #[inline(always)]
    pub fn bare(cookie: u64) -> KernelTables<'static> {
        KernelTables {
            cookie,
            policy: &BARE_POLICY,
            known_addr: [0; 4],
            known: KNOWN_NONE,
        }
    }

    /// Remembers whether `addr` is one of the pod's addresses (one lookup
    /// now, none when the rules ask again).
    #[inline(always)]
    pub fn learn_pod_addr(&mut self, addr: &Addr) {
        let yes = self.is_pod_addr(addr);
        self.known_addr = *addr;
        self.known = if yes { KNOWN_YES } else { KNOWN_NO };
    }
}

impl PodTables for KernelTables<'_> {
    #[inline(always)]
    fn is_virt_iface(&self, ifindex: u32) -> bool {
        let key = VirtKey {
            netns_cookie: self.cookie,
            ifindex,
            _pad: 0,
        };
        VIRT_IFACES.get_ptr(&key).is_some()
    }

    #[inline(always)]
    fn has_port(&self, kind: u16, port: u16) -> bool {
        if self.policy.tables & table_of_ports(kind) == 0 {
            return false;
        }
        let k = PortKey {
            netns_cookie: self.cookie,
            port,
            kind,
            _pad: 0,
        };
        PORT_RULES.get_ptr(&k).is_some()
    }

    #[inline(always)]
    fn has_id(&self, kind: u32, id: u32) -> bool {
        let p = self.policy;
        if p.tables & table_of_ids(kind) == 0 {
            return false;
        }
        if kind == IDKEY_UID && p.tables & TABLE_ONE_UID != 0 {
            return id == p.one_uid;
        }
        if kind == IDKEY_GID && p.tables & TABLE_ONE_GID != 0 {
            return id == p.one_gid;
        }
        let k = IdKey {
            netns_cookie: self.cookie,
            id,
            kind,
        };
        PROXY_IDS.get_ptr(&k).is_some()
    }

    #[inline(always)]
    fn in_cidrs(&self, list: CidrList, addr: &Addr) -> bool {
        if self.policy.tables & table_of_cidrs(list) == 0 {
            return false;
        }
        let key = Key::new(
            CIDR_COOKIE_BITS + 128,
            CidrData {
                netns_cookie: self.cookie.to_ne_bytes(),
                addr: addr_octets(addr),
            },
        );
        cidr_list_has(list, &key)
    }

    #[inline(always)]
    fn is_pod_addr(&self, addr: &Addr) -> bool {
        let k = &self.known_addr;
        // Word by word: a slice comparison would become a `bcmp` call.
        if self.known != KNOWN_NONE
            && k[0] == addr[0]
            && k[1] == addr[1]
            && k[2] == addr[2]
            && k[3] == addr[3]
        {
            return self.known == KNOWN_YES;
        }
        match POD_ADDRS.get_ptr(addr) {
            // SAFETY: pointer from a successful lookup.
            Some(c) => (unsafe { *c }) == self.cookie,
            None => false,
        }
    }
}
