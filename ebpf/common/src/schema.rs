//! Every BPF map of weir, declared once: its name, kind and sizing rule
//! ([`MAPS`]), and for the per-pod tables (the maps holding one pod's
//! lists, written from its rules) also their key and value types, where the
//! pod's cookie lives, and their [`PodPolicy::tables`] bits
//! ([`pod_tables!`]).
//!
//! The kernel programs declare their maps from [`pod_tables!`], and the
//! agent builds its collection of per-pod tables from it (writing,
//! removing, purging, reading back for `weir explain`), so adding a per-pod
//! table is one entry in [`pod_tables!`] plus the code that fills it (the
//! annotation parser) and the code that reads it (the decision).

use crate::*;

/// The kind of a BPF map, as weir uses it.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum MapKind {
    /// `BPF_MAP_TYPE_HASH` (`BPF_F_NO_PREALLOC`).
    Hash,
    /// `BPF_MAP_TYPE_LRU_HASH` (preallocated: the kernel refuses
    /// `NO_PREALLOC` for it).
    LruHash,
    /// `BPF_MAP_TYPE_PERCPU_HASH`.
    PerCpuHash,
    /// `BPF_MAP_TYPE_LPM_TRIE` (keys: prefix length and [`CidrData`]).
    LpmTrie,
    /// `BPF_MAP_TYPE_ARRAY`.
    Array,
    /// `BPF_MAP_TYPE_PERCPU_ARRAY`.
    PerCpuArray,
    /// `BPF_MAP_TYPE_SOCKHASH`.
    SockHash,
    /// `BPF_MAP_TYPE_SK_STORAGE`.
    SkStorage,
}

/// How the agent sizes a map when it creates it (pinned maps keep the
/// size they were created with).
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Sizing {
    /// As compiled into the object (arrays, socket storage).
    Object,
    /// `n` entries a pod (`--max-pods` times `n`).
    PerPod(u32),
    /// A fixed number of entries.
    Fixed(u32),
    /// `--max-port-rules`.
    PortRules,
    /// `--max-cidrs` (each CIDR map).
    Cidrs,
    /// `--max-pending`.
    PendingFlows,
    /// `--max-fast-sockets` while the fast path is on (two slots off).
    FastSockets,
    /// `--max-virt-flows` (created when a pod first needs it).
    VirtFlows,
}

/// One map of the kernel object.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct MapDecl {
    /// The map's name in the object and its pin's file name.
    pub name: &'static str,
    /// What kind of map it is.
    pub kind: MapKind,
    /// How large the agent creates it.
    pub sizing: Sizing,
    /// Whether `/metrics` reports its entries and capacity
    /// (`weir_map_entries`, `weir_map_capacity`).
    pub usage: bool,
}

/// Where a per-pod table's entry names its pod: the netns cookie in the
/// key of every per-pod table but `POD_ADDRS` (whose value is the cookie).
pub trait PodKey {
    /// The netns cookie of the pod this key belongs to.
    fn cookie(&self) -> u64;
}

impl PodKey for PortKey {
    #[inline(always)]
    fn cookie(&self) -> u64 {
        self.netns_cookie
    }
}

impl PodKey for IdKey {
    #[inline(always)]
    fn cookie(&self) -> u64 {
        self.netns_cookie
    }
}

impl PodKey for VirtKey {
    #[inline(always)]
    fn cookie(&self) -> u64 {
        self.netns_cookie
    }
}

impl PodKey for CidrData {
    #[inline(always)]
    fn cookie(&self) -> u64 {
        u64::from_ne_bytes(self.netns_cookie)
    }
}

/// An LPM-trie key as the agent holds it: (prefix length, data).
impl PodKey for (u32, CidrData) {
    #[inline(always)]
    fn cookie(&self) -> u64 {
        self.1.cookie()
    }
}

/// The per-pod tables: every map that holds entries of one pod computed
/// from its rules (besides `POD_POLICY` itself). Calls the macro `$then`
/// with one entry per table, in the order the agent writes them:
///
/// ```text
/// /// doc
/// NAME / field_name {
///     kind: Hash | LpmTrie,       // LpmTrie keys are (prefix length, CidrData)
///     key: KeyType,               // for LpmTrie: CidrData
///     value: ValueType,
///     default: 1234,              // max_entries compiled into the object
///     sizing: Sizing::...,        // what the agent creates it with
///     cookie_in: key | value,     // where an entry names its pod
///     list: None | Some(CidrList::...), // the CIDR list it answers
///     bits: |k| expr,             // PodPolicy::tables bits of entry key k
/// }
/// ```
///
/// A pod's entries are written before its policy and removed after it;
/// an entry whose key does not carry the cookie (`cookie_in: value`) is
/// only removed while it still names the pod (the address may have moved
/// to another pod already).
#[macro_export]
macro_rules! pod_tables {
    ($then:ident) => {
        $then! {
            /// Port lists (outbound/inbound include/exclude) of every pod.
            PORT_RULES / port_rules {
                kind: Hash, key: $crate::PortKey, value: u32, default: 262144,
                sizing: $crate::schema::Sizing::PortRules, cookie_in: key, list: None,
                bits: |k| $crate::table_of_ports(k.kind),
            }
            /// Proxy UIDs and GIDs, owner groups and excluded interface
            /// indexes of every pod.
            PROXY_IDS / proxy_ids {
                kind: Hash, key: $crate::IdKey, value: u32, default: 65536,
                sizing: $crate::schema::Sizing::PerPod(4), cookie_in: key, list: None,
                bits: |k| $crate::table_of_ids(k.kind),
            }
            /// `excludeOutboundIPRanges` of every pod (cookie-prefixed keys).
            CIDR_EXCLUDE / cidr_exclude {
                kind: LpmTrie, key: $crate::CidrData, value: u32, default: 262144,
                sizing: $crate::schema::Sizing::Cidrs, cookie_in: key,
                list: Some($crate::CidrList::OutboundExclude),
                bits: |_k| $crate::TABLE_CIDR_EXCLUDE,
            }
            /// `includeOutboundIPRanges` of every pod, unless `*`.
            CIDR_INCLUDE / cidr_include {
                kind: LpmTrie, key: $crate::CidrData, value: u32, default: 262144,
                sizing: $crate::schema::Sizing::Cidrs, cookie_in: key,
                list: Some($crate::CidrList::OutboundInclude),
                bits: |_k| $crate::TABLE_CIDR_INCLUDE,
            }
            /// The pod's DNS servers (`/128` keys), when DNS capture is on
            /// and not for every server.
            CIDR_DNS / cidr_dns {
                kind: LpmTrie, key: $crate::CidrData, value: u32, default: 65536,
                sizing: $crate::schema::Sizing::Cidrs, cookie_in: key,
                list: Some($crate::CidrList::DnsServers),
                bits: |_k| $crate::TABLE_CIDR_DNS,
            }
            /// Subnets reached through the pod's `excludeInterfaces` (value
            /// unused).
            CIDR_IFACE / cidr_iface {
                kind: LpmTrie, key: $crate::CidrData, value: u32, default: 65536,
                sizing: $crate::schema::Sizing::Cidrs, cookie_in: key,
                list: Some($crate::CidrList::ExcludedInterfaceRoutes),
                bits: |_k| $crate::TABLE_CIDR_IFACE,
            }
            /// Sources whose inbound connections are not captured (Linkerd's
            /// `skip-subnets`; value unused).
            CIDR_SKIP_SRC / cidr_skip_src {
                kind: LpmTrie, key: $crate::CidrData, value: u32, default: 65536,
                sizing: $crate::schema::Sizing::Cidrs, cookie_in: key,
                list: Some($crate::CidrList::InboundSkipSources),
                bits: |_k| $crate::TABLE_CIDR_SKIP_SRC,
            }
            /// The pod's connected subnets -> its address on each (the
            /// source the kernel picks for a destination there).
            SRC_ROUTES / src_routes {
                kind: LpmTrie, key: $crate::CidrData, value: $crate::Addr, default: 65536,
                sizing: $crate::schema::Sizing::Cidrs, cookie_in: key, list: None,
                bits: |_k| $crate::TABLE_SRC_ROUTES,
            }
            /// Every address of every enrolled pod -> the pod's netns cookie.
            POD_ADDRS / pod_addrs {
                kind: Hash, key: $crate::Addr, value: u64, default: 65536,
                sizing: $crate::schema::Sizing::PerPod(4), cookie_in: value, list: None,
                bits: |_k| 0,
            }
            /// The interfaces of `istio.io/reroute-virtual-interfaces` of
            /// every pod, with the addresses their TCP connections are
            /// redirected to.
            VIRT_IFACES / virt_ifaces {
                kind: Hash, key: $crate::VirtKey, value: $crate::VirtIface, default: 4096,
                sizing: $crate::schema::Sizing::PerPod(4), cookie_in: key, list: None,
                bits: |_k| 0,
            }
        }
    };
}

/// [`MapDecl`]s of the per-pod tables, from [`pod_tables!`].
macro_rules! pod_table_decls {
    ($( $(#[$doc:meta])* $name:ident / $field:ident {
        kind: $kind:ident, key: $key:ty, value: $value:ty, default: $default:literal,
        sizing: $sizing:expr, cookie_in: $cookie_in:ident, list: $list:expr,
        bits: |$bk:ident| $bits:expr $(,)?
    })*) => {
        /// The per-pod tables ([`pod_tables!`]), in the order the agent
        /// writes them.
        pub const POD_TABLES: &[MapDecl] = &[$(
            MapDecl {
                name: stringify!($name),
                kind: MapKind::$kind,
                sizing: $sizing,
                usage: true,
            },
        )*];
    };
}
pod_tables!(pod_table_decls);

/// Every other map of the kernel object.
pub const OTHER_MAPS: &[MapDecl] = &[
    MapDecl {
        name: "POD_POLICY",
        kind: MapKind::Hash,
        sizing: Sizing::PerPod(1),
        usage: true,
    },
    MapDecl {
        name: "POD_COUNTERS",
        kind: MapKind::PerCpuHash,
        sizing: Sizing::PerPod(1),
        usage: true,
    },
    MapDecl {
        name: "POD_META",
        kind: MapKind::Hash,
        sizing: Sizing::PerPod(1),
        usage: false,
    },
    MapDecl {
        name: "LISTENERS",
        kind: MapKind::SockHash,
        sizing: Sizing::PerPod(4),
        usage: false,
    },
    MapDecl {
        name: "LISTEN_PORTS",
        kind: MapKind::Array,
        sizing: Sizing::Object,
        usage: false,
    },
    MapDecl {
        name: "PENDING_FLOWS",
        kind: MapKind::LruHash,
        sizing: Sizing::PendingFlows,
        usage: true,
    },
    MapDecl {
        name: "CONNECTING",
        kind: MapKind::PerCpuArray,
        sizing: Sizing::Object,
        usage: false,
    },
    MapDecl {
        name: "ORIG_DST",
        kind: MapKind::SkStorage,
        sizing: Sizing::Object,
        usage: false,
    },
    MapDecl {
        name: "NODE_COUNTERS",
        kind: MapKind::PerCpuArray,
        sizing: Sizing::Object,
        usage: false,
    },
    MapDecl {
        name: "WEIR_META",
        kind: MapKind::Array,
        sizing: Sizing::Object,
        usage: false,
    },
    MapDecl {
        name: "LOG_LEVEL",
        kind: MapKind::Array,
        sizing: Sizing::Object,
        usage: false,
    },
    MapDecl {
        name: "FAST_PATH",
        kind: MapKind::Array,
        sizing: Sizing::Object,
        usage: false,
    },
    MapDecl {
        name: "FAST_SOCKS",
        kind: MapKind::SockHash,
        sizing: Sizing::FastSockets,
        usage: true,
    },
    MapDecl {
        name: "FAST_PEER",
        kind: MapKind::SkStorage,
        sizing: Sizing::Object,
        usage: false,
    },
    MapDecl {
        name: "VIRT_FLOWS",
        kind: MapKind::LruHash,
        sizing: Sizing::VirtFlows,
        usage: true,
    },
];

/// Every map of the kernel object: the per-pod tables, then the others.
pub fn maps() -> impl Iterator<Item = &'static MapDecl> {
    POD_TABLES.iter().chain(OTHER_MAPS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn map_names_are_unique() {
        let mut names: std::vec::Vec<&str> = maps().map(|m| m.name).collect();
        let n = names.len();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), n);
        assert_eq!(n, 25);
    }

    #[test]
    fn cidr_keys_name_their_pod() {
        let d = CidrData {
            netns_cookie: 7u64.to_ne_bytes(),
            addr: [0; 16],
        };
        assert_eq!(d.cookie(), 7);
        assert_eq!((96u32, d).cookie(), 7);
    }
}
