//! The per-pod tables as one collection, built from their one declaration
//! ([`weir_common::pod_tables!`]): a pod's entries ([`PodEntries`]), the
//! open maps ([`PodMaps`]) and the in-memory lookups the shared decision
//! functions run on ([`PodTables`] for [`PodEntries`]).
//!
//! Writing, removing, purging and reading back a pod are each one loop
//! over the tables, whatever their number; see docs/architecture.md
//! ("Where each kind of change goes") for what adding a table takes.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use anyhow::{Context, Result};
use aya::Ebpf;
use aya::maps::lpm_trie::{Key, LpmTrie};
use aya::maps::{HashMap, Map, MapData, MapError};
use ipnet::IpNet;
use weir_common::schema::{PodKey, Sizing};
use weir_common::*;

use crate::policy::{PodRules, addr_of, cidr_key, cidr_keys};

/// Every entry of a table, or the error reading it.
type Entries<K, V> = Vec<Result<(K, V), MapError>>;

/// One per-pod table, open: the operations the collection needs, the
/// same for hash maps and LPM tries.
pub trait EntryMap {
    /// The entry key as the agent holds it (LPM tries: prefix length and
    /// data).
    type Key: Ord + Copy;
    /// The entry value.
    type Value: Copy + PartialEq;
    /// Inserts or replaces one entry.
    fn put(&mut self, k: &Self::Key, v: &Self::Value) -> Result<(), MapError>;
    /// Removes one entry (a missing one is fine).
    fn delete(&mut self, k: &Self::Key);
    /// The value stored under exactly `k`.
    fn value(&self, k: &Self::Key) -> Option<Self::Value>;
    /// Every entry.
    fn all(&self) -> Entries<Self::Key, Self::Value>;
}

impl<K: aya::Pod + Ord, V: aya::Pod + PartialEq> EntryMap for HashMap<MapData, K, V> {
    type Key = K;
    type Value = V;
    fn put(&mut self, k: &K, v: &V) -> Result<(), MapError> {
        self.insert(k, v, 0)
    }
    fn delete(&mut self, k: &K) {
        let _ = self.remove(k);
    }
    fn value(&self, k: &K) -> Option<V> {
        self.get(k, 0).ok()
    }
    fn all(&self) -> Entries<K, V> {
        self.iter().collect()
    }
}

impl<V: aya::Pod + PartialEq> EntryMap for LpmTrie<MapData, CidrData, V> {
    type Key = (u32, CidrData);
    type Value = V;
    fn put(&mut self, k: &(u32, CidrData), v: &V) -> Result<(), MapError> {
        self.insert(&Key::new(k.0, k.1), v, 0)
    }
    fn delete(&mut self, k: &(u32, CidrData)) {
        let _ = self.remove(&Key::new(k.0, k.1));
    }
    fn value(&self, k: &(u32, CidrData)) -> Option<V> {
        // A trie lookup is a longest-prefix match: only an entry of
        // exactly this prefix is this key's.
        self.iter()
            .filter_map(|e| e.ok())
            .find(|(key, _)| key.prefix_len() == k.0 && key.data() == k.1)
            .map(|(_, v)| v)
    }
    fn all(&self) -> Entries<(u32, CidrData), V> {
        self.iter()
            .map(|e| e.map(|(key, v)| ((key.prefix_len(), key.data()), v)))
            .collect()
    }
}

/// Whether the LPM key `(bits, data)` of pod `cookie` matches `addr`: the
/// kernel's lookup with a full-length key finds an entry exactly when one
/// of the pod's prefixes covers the address.
fn prefix_covers(key: &(u32, CidrData), cookie: u64, addr: &Addr) -> bool {
    let (bits, data) = key;
    if data.cookie() != cookie || *bits < CIDR_COOKIE_BITS {
        return false;
    }
    let len = bits - CIDR_COOKIE_BITS;
    let a = u128::from_be_bytes(addr_octets(addr));
    let n = u128::from_be_bytes(data.addr);
    len == 0 || (len <= 128 && (a ^ n) >> (128 - len) == 0)
}

/// What to raise when a table of `sizing` is full.
fn full_hint(sizing: Sizing) -> &'static str {
    match sizing {
        Sizing::PortRules => " (raise --max-port-rules)",
        Sizing::Cidrs => " (raise --max-cidrs)",
        Sizing::PerPod(_) => " (raise --max-pods)",
        _ => "",
    }
}

fn take<T: TryFrom<Map, Error = MapError>>(ebpf: &mut Ebpf, name: &str) -> Result<T> {
    let map = ebpf
        .take_map(name)
        .with_context(|| format!("map {name} missing from the kernel object"))?;
    T::try_from(map).with_context(|| format!("map {name} has an unexpected type"))
}

/// The aya map type of a per-pod table.
macro_rules! map_type {
    (Hash, $key:ty, $value:ty) => { HashMap<MapData, $key, $value> };
    (LpmTrie, $key:ty, $value:ty) => { LpmTrie<MapData, $key, $value> };
}

/// The entry key type of a per-pod table.
macro_rules! entry_key {
    (Hash, $key:ty) => {
        $key
    };
    (LpmTrie, $key:ty) => {
        (u32, $key)
    };
}

/// A pinned per-pod table opened by name.
macro_rules! open_pinned {
    (Hash, $path:expr) => {
        HashMap::try_from(Map::HashMap(MapData::from_pin(&$path)?))?
    };
    (LpmTrie, $path:expr) => {
        LpmTrie::try_from(Map::LpmTrie(MapData::from_pin(&$path)?))?
    };
}

/// The pod an entry belongs to.
macro_rules! cookie_of {
    (key, $k:expr, $v:expr) => {
        PodKey::cookie($k)
    };
    (value, $k:expr, $v:expr) => {
        *$v
    };
}

/// Whether a stale entry may be removed: always when its key names the
/// pod; otherwise only while it still names the pod.
macro_rules! still_ours {
    (key, $map:expr, $k:expr, $cookie:expr) => {
        true
    };
    (value, $map:expr, $k:expr, $cookie:expr) => {
        $map.value($k) == Some($cookie)
    };
}

/// A CIDR list's lookup over the entries of an LPM table.
macro_rules! cidr_lookup {
    (Hash, $list:expr, $entries:expr, $want:expr, $cookie:expr, $addr:expr) => {};
    (LpmTrie, $list:expr, $entries:expr, $want:expr, $cookie:expr, $addr:expr) => {
        let list: Option<CidrList> = $list;
        if list == Some($want) {
            return $entries.keys().any(|k| prefix_covers(k, $cookie, $addr));
        }
    };
}

macro_rules! agent_pod_tables {
    ($( $(#[$doc:meta])* $name:ident / $field:ident {
        kind: $kind:ident, key: $key:ty, value: $value:ty, default: $default:literal,
        sizing: $sizing:expr, cookie_in: $cookie_in:ident, list: $list:expr,
        bits: |$bk:ident| $bits:expr $(,)?
    })*) => {
        /// Every map entry of one enrolled pod (besides `POD_POLICY`),
        /// table by table, keyed as in the map.
        #[derive(Clone, Debug, Default, PartialEq, Eq)]
        pub struct PodEntries {
            /// The pod's netns cookie (in every entry).
            pub cookie: u64,
            $( $(#[$doc])* pub $field: BTreeMap<entry_key!($kind, $key), $value>, )*
        }

        /// The per-pod tables, open.
        pub struct PodMaps {
            $( $field: map_type!($kind, $key, $value), )*
        }

        impl PodMaps {
            /// Takes the tables out of a loaded object.
            pub fn take(ebpf: &mut Ebpf) -> Result<Self> {
                Ok(Self { $( $field: take(ebpf, stringify!($name))?, )* })
            }

            /// Opens the tables pinned in `dir` (`<bpffs>/weir/maps`).
            pub fn open_pinned(dir: &Path) -> Result<Self> {
                Ok(Self {
                    $( $field: (|| -> Result<_> {
                        let path = dir.join(stringify!($name));
                        Ok(open_pinned!($kind, path))
                    })()
                    .with_context(|| format!(
                        "cannot open {} (is weir installed on this node, and --bpffs right?)",
                        dir.join(stringify!($name)).display()
                    ))?, )*
                })
            }

            /// Inserts (or replaces) every entry of `new`.
            pub fn write(&mut self, new: &PodEntries) -> Result<()> {
                $(
                    for (k, v) in &new.$field {
                        self.$field.put(k, v).with_context(|| {
                            format!("{} full{}", stringify!($name), full_hint($sizing))
                        })?;
                    }
                )*
                Ok(())
            }

            /// Removes the entries of `old` that `new` does not have.
            pub fn remove_stale(&mut self, old: &PodEntries, new: &PodEntries) {
                let cookie = old.cookie;
                $(
                    for k in old.$field.keys().filter(|k| !new.$field.contains_key(*k)) {
                        if still_ours!($cookie_in, self.$field, k, cookie) {
                            self.$field.delete(k);
                        }
                    }
                )*
            }

            /// Every entry of the pod `cookie`, scanned from the maps.
            pub fn entries_of(&self, cookie: u64) -> Result<PodEntries> {
                let mut e = PodEntries { cookie, ..Default::default() };
                $(
                    for r in self.$field.all() {
                        let (k, v) = r.with_context(|| format!("reading {}", stringify!($name)))?;
                        if cookie_of!($cookie_in, &k, &v) == cookie {
                            e.$field.insert(k, v);
                        }
                    }
                )*
                Ok(e)
            }
        }

        impl PodEntries {
            /// The [`PodPolicy::tables`] bits of these entries: which lists
            /// have any.
            pub fn tables(&self) -> u32 {
                let mut t = 0;
                $( for $bk in self.$field.keys() { t |= $bits; } )*
                t
            }

            /// Whether `addr` is in the pod's CIDR list `want`, as the
            /// kernel's trie lookup answers it.
            fn in_cidr_list(&self, want: CidrList, addr: &Addr) -> bool {
                $( cidr_lookup!($kind, $list, self.$field, want, self.cookie, addr); )*
                false
            }
        }
    };
}

weir_common::pod_tables!(agent_pod_tables);

impl PodMaps {
    /// Removes every entry of the pod `cookie` (left over by an earlier
    /// agent, known only by its cookie).
    pub fn purge(&mut self, cookie: u64) {
        match self.entries_of(cookie) {
            Ok(e) => self.remove_stale(&e, &PodEntries::default()),
            Err(e) => log::warn!("purging netns cookie {cookie}: {e:#}"),
        }
    }
}

/// A pod's rules encoded as its map entries.
impl PodRules {
    /// The map entries of this pod when enrolled with `cookie`.
    pub fn entries(&self, cookie: u64) -> PodEntries {
        let port = |kind, port| {
            let k = PortKey {
                netns_cookie: cookie,
                port,
                kind,
                _pad: 0,
            };
            (k, 1)
        };
        let id = |kind, id| {
            let k = IdKey {
                netns_cookie: cookie,
                id,
                kind,
            };
            (k, 1)
        };
        let cidrs = |nets: &BTreeSet<IpNet>| -> BTreeMap<(u32, CidrData), u32> {
            nets.iter()
                .flat_map(|n| cidr_keys(cookie, n))
                .map(|k| (k, 1))
                .collect()
        };
        PodEntries {
            cookie,
            port_rules: [
                (PORT_OUT_INCLUDE, &self.out_include_ports),
                (PORT_OUT_EXCLUDE, &self.out_exclude_ports),
                (PORT_IN_INCLUDE, &self.in_include_ports),
                (PORT_IN_EXCLUDE, &self.in_exclude_ports),
            ]
            .into_iter()
            .flat_map(|(kind, ports)| ports.iter().map(move |p| port(kind, *p)))
            .collect(),
            proxy_ids: (self.uids.iter().map(|u| id(IDKEY_UID, *u)))
                .chain(self.gids.iter().map(|g| id(IDKEY_GID, *g)))
                .chain(self.owner_groups.iter().map(|g| id(IDKEY_OWNER_GROUP, *g)))
                .chain(
                    self.excluded_ifindexes
                        .iter()
                        .map(|i| id(IDKEY_EXCLUDED_IFINDEX, *i)),
                )
                .collect(),
            cidr_exclude: cidrs(&self.exclude_cidrs),
            cidr_include: cidrs(&self.include_cidrs),
            cidr_dns: self
                .dns_servers
                .iter()
                .map(|ip| (cidr_key(cookie, &IpNet::from(*ip)), 1))
                .collect(),
            cidr_iface: cidrs(&self.iface_routes),
            cidr_skip_src: cidrs(&self.inbound_skip_sources),
            src_routes: self
                .src_routes
                .iter()
                .filter(|(n, ip)| !self.src_route_is_default(n, ip))
                .flat_map(|(n, ip)| cidr_keys(cookie, n).into_iter().map(|k| (k, addr_of(*ip))))
                .collect(),
            pod_addrs: self
                .addrs
                .iter()
                .filter(|a| !(self.skip_ipv6 && a.to_canonical().is_ipv6()))
                .map(|a| (addr_of(*a), cookie))
                .collect(),
            virt_ifaces: self
                .virt
                .iter()
                .map(|(ifindex, v)| {
                    let k = VirtKey {
                        netns_cookie: cookie,
                        ifindex: *ifindex,
                        _pad: 0,
                    };
                    (k, *v)
                })
                .collect(),
        }
    }

    /// In-memory tables for [`decide_outbound`]/[`decide_inbound`]: the
    /// pod's map entries, looked up as the kernel does.
    #[cfg(test)]
    pub fn tables(&self) -> PodEntries {
        self.entries(1)
    }
}

impl PodEntries {
    /// Sets the [`PodPolicy::tables`] bits of `p` from these entries, and
    /// its single proxy UID / GID when there is exactly one.
    pub fn describe_in(&self, p: &mut PodPolicy) {
        p.tables = self.tables();
        p.one_uid = 0;
        p.one_gid = 0;
        for (kind, bit) in [(IDKEY_UID, TABLE_ONE_UID), (IDKEY_GID, TABLE_ONE_GID)] {
            let mut of_kind = self.proxy_ids.keys().filter(|k| k.kind == kind);
            if let (Some(only), None) = (of_kind.next(), of_kind.next()) {
                p.tables |= bit;
                if kind == IDKEY_UID {
                    p.one_uid = only.id;
                } else {
                    p.one_gid = only.id;
                }
            }
        }
    }
}

/// The lookups of the shared decision functions over one pod's entries,
/// answering as the kernel's map lookups do (`weir explain`, tests).
impl PodTables for PodEntries {
    fn has_port(&self, kind: u16, port: u16) -> bool {
        self.port_rules.contains_key(&PortKey {
            netns_cookie: self.cookie,
            port,
            kind,
            _pad: 0,
        })
    }
    fn has_id(&self, kind: u32, id: u32) -> bool {
        self.proxy_ids.contains_key(&IdKey {
            netns_cookie: self.cookie,
            id,
            kind,
        })
    }
    fn in_cidrs(&self, list: CidrList, addr: &Addr) -> bool {
        self.in_cidr_list(list, addr)
    }
    fn is_pod_addr(&self, addr: &Addr) -> bool {
        self.pod_addrs.get(addr) == Some(&self.cookie)
    }
    fn is_virt_iface(&self, ifindex: u32) -> bool {
        self.virt_ifaces.contains_key(&VirtKey {
            netns_cookie: self.cookie,
            ifindex,
            _pad: 0,
        })
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::net::IpAddr;

    use super::*;
    use crate::policy::{Mesh, keys, pod_rules};

    fn ann(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn ips(s: &[&str]) -> Vec<IpAddr> {
        s.iter().map(|a| a.parse().unwrap()).collect()
    }

    #[test]
    fn table_bits_follow_the_entries_written() {
        let mut r = pod_rules(
            Mesh::Istio,
            &ips(&["198.18.0.1"]),
            &ann(&[(keys::EXCLUDE_OUTBOUND_IP_RANGES, "198.18.5.0/24")]),
        )
        .unwrap();
        // The pod's only subnet answers its primary address: no entry.
        r.src_routes.insert(
            "198.18.0.0/24".parse().unwrap(),
            "198.18.0.1".parse().unwrap(),
        );
        let e = r.entries(7);
        assert!(e.src_routes.is_empty());
        let mut p = r.policy;
        e.describe_in(&mut p);
        assert_ne!(p.tables & TABLE_CIDR_EXCLUDE, 0);
        assert_eq!(p.tables & (TABLE_CIDR_INCLUDE | TABLE_SRC_ROUTES), 0);
        assert_eq!(p.tables & TABLE_OUT_EXCLUDE_PORTS, 0);
        // Istio's defaults: one proxy UID and one GID, 1337, inline.
        assert_eq!(
            p.tables & (TABLE_ONE_UID | TABLE_ONE_GID),
            TABLE_ONE_UID | TABLE_ONE_GID
        );
        assert_eq!((p.one_uid, p.one_gid), (1337, 1337));
        // A wider route to another address contains the primary's: the
        // primary's must stay, or the wider one would answer for it.
        r.src_routes.insert(
            "198.0.0.0/8".parse().unwrap(),
            "198.18.9.9".parse().unwrap(),
        );
        let e = r.entries(7);
        assert_eq!(e.src_routes.len(), 2, "{:?}", e.src_routes);
        e.describe_in(&mut p);
        assert_ne!(p.tables & TABLE_SRC_ROUTES, 0);
        // Two proxy UIDs: looked up in PROXY_IDS again.
        r.uids.push(1338);
        r.entries(7).describe_in(&mut p);
        assert_eq!(p.tables & TABLE_ONE_UID, 0);
        assert_ne!(p.tables & TABLE_UIDS, 0);
    }

    #[test]
    fn entries_and_tables_agree() {
        let r = pod_rules(
            Mesh::Istio,
            &ips(&["198.18.0.1", "2001:2::1"]),
            &ann(&[(
                keys::EXCLUDE_OUTBOUND_IP_RANGES,
                "198.18.5.0/24,2001:2:5::/48",
            )]),
        )
        .unwrap();
        let e = r.entries(42);
        assert_eq!(e.cidr_exclude.len(), 2);
        assert!(e.cidr_exclude.contains_key(&(
            64 + 96 + 24,
            CidrData {
                netns_cookie: 42u64.to_ne_bytes(),
                addr: addr_octets(&addr_of("198.18.5.0".parse().unwrap())),
            }
        )));
        assert_eq!(e.pod_addrs.len(), 2);
        let t = r.tables();
        assert!(t.in_cidrs(
            CidrList::OutboundExclude,
            &addr_of("198.18.5.9".parse().unwrap())
        ));
        assert!(!t.in_cidrs(
            CidrList::OutboundExclude,
            &addr_of("198.18.6.9".parse().unwrap())
        ));
        let q = OutboundQuery {
            dst: addr_of("2001:2:5::9".parse().unwrap()),
            dport: 80,
            src: [0; 4],
            uid: 1000,
            gid: 1000,
            udp: false,
        };
        assert_eq!(
            decide_outbound(&r.policy, &q, &t),
            Verdict::BypassExcludedCidr
        );
    }

    /// Linkerd's defaults as map entries: IPv4 addresses only, and an IPv6
    /// destination finds no route.
    #[test]
    fn linkerd_entries_leave_ipv6_alone() {
        let r = pod_rules(
            Mesh::Linkerd,
            &ips(&["198.18.0.1", "2001:2::1"]),
            &BTreeMap::new(),
        )
        .unwrap();
        // disableIPv6 defaults to true: no IPv6 steering.
        let e = r.entries(7);
        assert_eq!(
            e.pod_addrs.keys().copied().collect::<Vec<_>>(),
            vec![addr_of("198.18.0.1".parse().unwrap())]
        );
        let q = OutboundQuery {
            dst: addr_of("2001:2::2".parse().unwrap()),
            dport: 80,
            src: [0; 4],
            uid: 1000,
            gid: 1000,
            udp: false,
        };
        assert_eq!(
            decide_outbound(&r.policy, &q, &r.tables()),
            Verdict::BypassNoRoute
        );
        // With capture-ipv6, both addresses are steered.
        let r = pod_rules(
            Mesh::Linkerd,
            &ips(&["198.18.0.1", "2001:2::1"]),
            &ann(&[(keys::CAPTURE_IPV6, "true")]),
        )
        .unwrap();
        assert_eq!(r.entries(7).pod_addrs.len(), 2);
        // An IPv6-only pod without IPv6 rules: no address steered.
        let r = pod_rules(Mesh::Linkerd, &ips(&["2001:2::1"]), &BTreeMap::new()).unwrap();
        assert!(r.entries(7).pod_addrs.is_empty());
    }

    #[test]
    fn dns_servers_are_one_key_each() {
        let r = pod_rules(
            Mesh::Istio,
            &ips(&["198.18.0.1"]),
            &ann(&[
                (keys::DNS_CAPTURE, "true"),
                (keys::DNS_SERVERS, "10.96.0.10, fd00::a"),
            ]),
        )
        .unwrap();
        assert_eq!(r.entries(7).cidr_dns.len(), 2);
    }

    fn key(cookie: u64, bits: u32, octets: [u8; 16]) -> (u32, CidrData) {
        (
            CIDR_COOKIE_BITS + bits,
            CidrData {
                netns_cookie: cookie.to_ne_bytes(),
                addr: octets,
            },
        )
    }

    #[test]
    fn prefixes_cover_like_the_kernel_trie() {
        let net = std::net::Ipv6Addr::new(0x2001, 2, 0, 0, 0, 0, 0, 0).octets();
        let k = key(7, 32, net);
        let inside =
            addr_from_octets(std::net::Ipv6Addr::new(0x2001, 2, 9, 0, 0, 0, 0, 1).octets());
        let outside =
            addr_from_octets(std::net::Ipv6Addr::new(0x2001, 3, 0, 0, 0, 0, 0, 1).octets());
        assert!(prefix_covers(&k, 7, &inside));
        assert!(!prefix_covers(&k, 7, &outside));
        // Another pod's entry never matches.
        assert!(!prefix_covers(&k, 8, &inside));
        // A /0 covers everything of its pod; a /128 only itself.
        assert!(prefix_covers(&key(7, 0, [0; 16]), 7, &outside));
        assert!(prefix_covers(
            &key(7, 128, addr_octets(&inside)),
            7,
            &inside
        ));
        assert!(!prefix_covers(
            &key(7, 128, addr_octets(&inside)),
            7,
            &outside
        ));
    }

    /// The sk_lookup checks before the capture rules, over the entries the
    /// agent writes: the pod's own address is inside the pod, and a
    /// virtual interface's connections are never inbound traffic.
    #[test]
    fn inbound_passes_what_sk_lookup_passes() {
        let mut e = PodEntries {
            cookie: 7,
            ..Default::default()
        };
        let own = v4_mapped(u32::from_ne_bytes([198, 18, 0, 1]));
        let peer = v4_mapped(u32::from_ne_bytes([198, 18, 0, 9]));
        e.pod_addrs.insert(own, 7);
        e.virt_ifaces.insert(
            VirtKey {
                netns_cookie: 7,
                ifindex: 5,
                _pad: 0,
            },
            VirtIface::default(),
        );
        assert_eq!(inbound_pass(&own, 2, &e), Some(InboundPass::FromInsidePod));
        assert_eq!(
            inbound_pass(&peer, 5, &e),
            Some(InboundPass::VirtualInterface)
        );
        assert_eq!(inbound_pass(&peer, 2, &e), None);
        // Another pod's interface 5 is not this pod's.
        e.cookie = 8;
        assert_eq!(inbound_pass(&peer, 5, &e), None);
    }

    #[test]
    fn entries_answer_the_decision_lookups() {
        let mut e = PodEntries {
            cookie: 7,
            ..Default::default()
        };
        let a = v4_mapped(u32::from_ne_bytes([198, 18, 0, 1]));
        e.pod_addrs.insert(a, 7);
        e.port_rules.insert(
            PortKey {
                netns_cookie: 7,
                port: 80,
                kind: PORT_OUT_EXCLUDE,
                _pad: 0,
            },
            1,
        );
        e.cidr_dns.insert(key(7, 128, addr_octets(&a)), 1);
        assert!(e.is_pod_addr(&a));
        assert!(e.has_port(PORT_OUT_EXCLUDE, 80));
        assert!(!e.has_port(PORT_OUT_INCLUDE, 80));
        assert!(e.in_cidrs(CidrList::DnsServers, &a));
        assert!(!e.in_cidrs(CidrList::OutboundExclude, &a));
        assert_eq!(e.tables(), TABLE_OUT_EXCLUDE_PORTS | TABLE_CIDR_DNS);
    }
}
