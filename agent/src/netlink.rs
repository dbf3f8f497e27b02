//! Address set-up inside a pod's network namespace (rtnetlink).

use std::net::{IpAddr, Ipv6Addr};
use std::os::fd::AsFd;
use std::path::Path;

use anyhow::{Context, Result};

/// `lo` is interface 1 in every network namespace.
const LOOPBACK_IFINDEX: u32 = 1;

/// Adds `addr/128` to `lo` in the network namespace at `netns` (replacing
/// it if present, so repeating this is harmless).
pub fn add_lo_addr6(netns: &Path, addr: Ipv6Addr) -> Result<()> {
    let ns = std::fs::File::open(netns).with_context(|| format!("opening {}", netns.display()))?;
    crate::sys::in_netns(ns.as_fd(), || {
        // The netlink socket is opened by `new_connection`, on this thread,
        // hence inside the pod's namespace.
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        rt.block_on(async {
            let (conn, handle, _) = rtnetlink::new_connection()?;
            tokio::spawn(conn);
            handle
                .address()
                .add(LOOPBACK_IFINDEX, IpAddr::V6(addr), 128)
                .replace()
                .execute()
                .await
                .map_err(std::io::Error::other)
        })
    })
    .with_context(|| format!("adding {addr}/128 to lo"))
}

/// What `excludeInterfaces` names resolve to inside a pod.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ExcludedInterfaces {
    /// Interface indexes of the named interfaces that exist.
    pub ifindexes: std::collections::BTreeSet<u32>,
    /// Subnets of their addresses (connected routes).
    pub subnets: std::collections::BTreeSet<ipnet::IpNet>,
}

/// Everything the agent learns from a pod's network namespace, in one
/// visit (one thread, one netlink socket): its addresses, its connected
/// subnets with the address on each, and what `exclude` names resolve to.
#[derive(Debug, Default, Clone)]
pub struct NetnsFacts {
    /// Every non-loopback address.
    pub addrs: Vec<IpAddr>,
    /// Connected subnets (global scope) and the address on each.
    pub subnets: Vec<(ipnet::IpNet, IpAddr)>,
    /// `excludeInterfaces` resolved.
    pub excluded: ExcludedInterfaces,
    /// Every address with its interface (loopback included).
    pub iface_addrs: Vec<crate::routes::IfaceAddr>,
    /// The unicast routes of the main table (both families).
    pub routes: Vec<crate::routes::Route>,
    /// `reroute-virtual-interfaces` resolved: interface index -> what the
    /// kernel programs need to redirect its TCP connections.
    pub virt: std::collections::BTreeMap<u32, weir_common::VirtIface>,
}

/// The interface names a probe resolves inside one pod.
#[derive(Debug, Default, Clone, Copy)]
pub struct Names<'a> {
    /// `excludeInterfaces`.
    pub exclude: Option<&'a std::collections::BTreeSet<String>>,
    /// `reroute-virtual-interfaces`.
    pub virt: Option<&'a std::collections::BTreeSet<String>>,
}

impl Names<'_> {
    fn is_empty(&self) -> bool {
        self.exclude.is_none_or(|s| s.is_empty()) && self.virt.is_none_or(|s| s.is_empty())
    }
}

/// What one visit to a pod's network namespace found.
#[derive(Debug)]
pub struct Probe {
    /// The namespace's cookie (`SO_NETNS_COOKIE`), or why it could not be
    /// entered (gone, not a namespace).
    pub cookie: std::io::Result<u64>,
    /// Its addresses and interfaces (only meaningful with a cookie).
    pub facts: Result<NetnsFacts>,
}

/// Threads that visit namespaces for one [`probe_all`] call.
const PROBE_THREADS: usize = 4;

/// Visits every namespace in `targets` (path, interface names to resolve)
/// and returns a [`Probe`] for each, in order.
///
/// A handful of worker threads share the list; each builds one
/// single-threaded runtime and moves itself from namespace to namespace
/// with `setns`, opening its sockets after each move so they belong to the
/// pod. The workers end with the call, so no thread of the agent stays in
/// a pod's namespace. One netns visit costs tens of microseconds this way,
/// against a thread and a runtime per pod.
pub fn probe_all(targets: &[(&Path, Names<'_>)]) -> Vec<Probe> {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let next = AtomicUsize::new(0);
    let slots: Vec<std::sync::Mutex<Option<Probe>>> = targets
        .iter()
        .map(|_| std::sync::Mutex::new(None))
        .collect();
    let workers = PROBE_THREADS.min(targets.len());
    std::thread::scope(|s| {
        for _ in 0..workers {
            s.spawn(|| {
                let rt = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => Some(rt),
                    Err(e) => {
                        log::warn!("netns probe: cannot build a runtime: {e}");
                        None
                    }
                };
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some((netns, names)) = targets.get(i) else {
                        break;
                    };
                    let probe = probe_one(rt.as_ref(), netns, *names);
                    *slots[i].lock().unwrap_or_else(|p| p.into_inner()) = Some(probe);
                }
            });
        }
    });
    slots
        .into_iter()
        .map(|m| {
            m.into_inner()
                .unwrap_or_else(|p| p.into_inner())
                .unwrap_or_else(|| Probe {
                    cookie: Err(std::io::Error::other("netns probe did not run")),
                    facts: Err(anyhow::anyhow!("netns probe did not run")),
                })
        })
        .collect()
}

/// One visit, on the calling (worker) thread, which stays in `netns`.
fn probe_one(rt: Option<&tokio::runtime::Runtime>, netns: &Path, names: Names<'_>) -> Probe {
    let entered = std::fs::File::open(netns).and_then(|f| {
        nix::sched::setns(f.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)?;
        Ok(())
    });
    if let Err(e) = entered {
        return Probe {
            facts: Err(anyhow::anyhow!("cannot enter {}: {e}", netns.display())),
            cookie: Err(e),
        };
    }
    let cookie = nix::sys::socket::socket(
        nix::sys::socket::AddressFamily::Unix,
        nix::sys::socket::SockType::Datagram,
        nix::sys::socket::SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(std::io::Error::from)
    .and_then(|sock| crate::sys::socket_netns_cookie(sock.as_fd()));
    let facts = match rt {
        Some(rt) => rt
            .block_on(read_facts(names))
            .context("reading the pod's addresses"),
        None => Err(anyhow::anyhow!("no runtime to read the pod's addresses")),
    };
    Probe { cookie, facts }
}

/// Dumps links and addresses of the calling thread's network namespace.
async fn read_facts(names: Names<'_>) -> std::io::Result<NetnsFacts> {
    use futures_util::TryStreamExt;
    use rtnetlink::packet_route::address::{AddressAttribute, AddressScope};
    use rtnetlink::packet_route::link::{LinkAttribute, LinkLayerType};
    let exclude = names.exclude.cloned().unwrap_or_default();
    let virt_names = names.virt.cloned().unwrap_or_default();
    // The socket is opened here, on the thread that entered the namespace.
    let (conn, handle, _) = rtnetlink::new_connection()?;
    let dump = async move {
        let mut facts = NetnsFacts::default();
        if !names.is_empty() {
            let mut links = handle.link().get().execute();
            while let Some(msg) = links.try_next().await.map_err(std::io::Error::other)? {
                let name = msg.attributes.iter().find_map(|a| match a {
                    LinkAttribute::IfName(n) => Some(n.as_str()),
                    _ => None,
                });
                let Some(name) = name else { continue };
                if exclude.contains(name) {
                    facts.excluded.ifindexes.insert(msg.header.index);
                }
                if virt_names.contains(name) {
                    // Ethernet-like devices (veth, bridge, tap) carry a
                    // 14-byte header in front of IP; L3 devices none.
                    let l3_offset = match msg.header.link_layer_type {
                        LinkLayerType::Ether => 14,
                        _ => 0,
                    };
                    facts.virt.insert(
                        msg.header.index,
                        weir_common::VirtIface {
                            l3_offset,
                            ..Default::default()
                        },
                    );
                }
            }
        }
        let mut addrs = handle.address().get().execute();
        while let Some(msg) = addrs.try_next().await.map_err(std::io::Error::other)? {
            for attr in &msg.attributes {
                let AddressAttribute::Address(ip) = attr else {
                    continue;
                };
                if let Some(v) = facts.virt.get_mut(&msg.header.index) {
                    virt_address(
                        v,
                        ip,
                        &msg.header.flags,
                        msg.header.scope == AddressScope::Universe,
                    );
                }
                if let Ok(net) = ipnet::IpNet::new(*ip, msg.header.prefix_len) {
                    facts.iface_addrs.push(crate::routes::IfaceAddr {
                        ifindex: msg.header.index,
                        net,
                    });
                }
                if ip.is_loopback() {
                    continue;
                }
                if !facts.addrs.contains(ip) {
                    facts.addrs.push(*ip);
                }
                let Ok(net) = ipnet::IpNet::new(*ip, msg.header.prefix_len) else {
                    continue;
                };
                if facts.excluded.ifindexes.contains(&msg.header.index) {
                    facts.excluded.subnets.insert(net.trunc());
                }
                let link_local =
                    matches!(ip, IpAddr::V6(v) if (v.segments()[0] & 0xffc0) == 0xfe80);
                if !link_local {
                    facts.subnets.push((net.trunc(), *ip));
                }
            }
        }
        for v6 in [false, true] {
            let query = if v6 {
                rtnetlink::RouteMessageBuilder::<std::net::Ipv6Addr>::new().build()
            } else {
                rtnetlink::RouteMessageBuilder::<std::net::Ipv4Addr>::new().build()
            };
            let mut routes = handle.route().get(query).execute();
            while let Some(msg) = routes.try_next().await.map_err(std::io::Error::other)? {
                if let Some(r) = route_of(&msg) {
                    facts.routes.push(r);
                }
            }
        }
        Ok(facts)
    };
    // The connection task runs only while the dump does, so nothing of
    // this namespace is left on the runtime for the next one.
    tokio::select! {
        r = dump => r,
        _ = conn => Err(std::io::Error::other("netlink connection closed")),
    }
}

/// Takes `ip` as the address `REDIRECT` uses on a virtual interface if it
/// is the first fitting one in dump order: the first primary IPv4 address
/// (`in_dev->ifa_list`), the first global IPv6 address that is not
/// tentative (`nf_nat_redirect_ipv6` picks the first of the destination's
/// scope in `idev->addr_list`, the dump's order).
fn virt_address(
    v: &mut weir_common::VirtIface,
    ip: &IpAddr,
    flags: &rtnetlink::packet_route::address::AddressHeaderFlags,
    global: bool,
) {
    use rtnetlink::packet_route::address::AddressHeaderFlags;
    match ip {
        IpAddr::V4(a)
            if v.flags & weir_common::VIRT_HAS4 == 0
                && !flags.contains(AddressHeaderFlags::Secondary) =>
        {
            v.addr4 = u32::from_ne_bytes(a.octets());
            v.flags |= weir_common::VIRT_HAS4;
        }
        IpAddr::V6(a)
            if v.flags & weir_common::VIRT_HAS6 == 0
                && global
                && !flags.contains(AddressHeaderFlags::Tentative) =>
        {
            v.addr6 = weir_common::addr_from_octets(a.octets());
            v.flags |= weir_common::VIRT_HAS6;
        }
        _ => {}
    }
}

/// A main-table unicast route with one outgoing interface, else `None`.
fn route_of(msg: &rtnetlink::packet_route::route::RouteMessage) -> Option<crate::routes::Route> {
    use rtnetlink::packet_route::route::{RouteAddress, RouteAttribute, RouteHeader, RouteType};
    let ip = |a: &RouteAddress| match a {
        RouteAddress::Inet(v) => Some(IpAddr::V4(*v)),
        RouteAddress::Inet6(v) => Some(IpAddr::V6(*v)),
        _ => None,
    };
    let mut table = u32::from(msg.header.table);
    let (mut dst, mut oif, mut prefsrc, mut gateway, mut metric) = (None, None, None, None, 0);
    for a in &msg.attributes {
        match a {
            RouteAttribute::Table(t) => table = *t,
            RouteAttribute::Destination(d) => dst = ip(d),
            RouteAttribute::Oif(i) => oif = Some(*i),
            RouteAttribute::PrefSource(p) => prefsrc = ip(p),
            RouteAttribute::Gateway(g) => gateway = ip(g),
            RouteAttribute::Priority(m) => metric = *m,
            _ => {}
        }
    }
    if table != u32::from(RouteHeader::RT_TABLE_MAIN) || msg.header.kind != RouteType::Unicast {
        return None;
    }
    let len = msg.header.destination_prefix_length;
    let dst = match dst {
        Some(d) => ipnet::IpNet::new(d, len).ok()?,
        // The default route has no destination attribute.
        None if msg.header.address_family == rtnetlink::packet_route::AddressFamily::Inet6 => {
            ipnet::IpNet::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), 0).ok()?
        }
        None => ipnet::IpNet::new(IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED), 0).ok()?,
    };
    Some(crate::routes::Route {
        dst: dst.trunc(),
        oif: oif?,
        prefsrc,
        gateway,
        metric,
    })
}

/// What istio-cni sets up in an ambient pod besides iptables, so that the
/// application's answers to ztunnel's transparent connections (source:
/// the client's address) are delivered back to ztunnel inside the pod
/// instead of being routed out: `tcp_fwmark_accept` (the application's
/// accepted socket takes the mark of the SYN, which weir's sockops set to
/// 0x111), `fwmark_reflect` (RSTs and ICMP answers too), and
/// `ip rule add fwmark 0x111/0xfff pref 32764 lookup 100` with
/// `ip route add local 0.0.0.0/0 dev lo table 100` (and `::/0`). All of
/// it inside the pod's netns only; repeating it is harmless.
pub fn setup_ambient(netns: &Path) -> Result<()> {
    use rtnetlink::packet_route::route::{RouteScope, RouteType};
    use rtnetlink::packet_route::rule::{RuleAction, RuleAttribute};
    use weir_common::{CONNMARK_MARK, CONNMARK_RULE_PRIORITY, CONNMARK_TABLE, ZTUNNEL_MARK_MASK};
    let ns = std::fs::File::open(netns).with_context(|| format!("opening {}", netns.display()))?;
    crate::sys::in_netns(ns.as_fd(), || {
        // /proc/sys/net is the netns of the thread that opens it.
        for (path, required) in [
            ("/proc/sys/net/ipv4/tcp_fwmark_accept", true),
            ("/proc/sys/net/ipv4/fwmark_reflect", true),
            ("/proc/sys/net/ipv6/fwmark_reflect", false),
        ] {
            match std::fs::write(path, "1") {
                Ok(()) => {}
                Err(e) if !required && e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(std::io::Error::other(format!("{path}: {e}"))),
            }
        }
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        rt.block_on(async {
            let (conn, handle, _) = rtnetlink::new_connection()?;
            tokio::spawn(conn);
            let exists_ok = |r: Result<(), rtnetlink::Error>| match r {
                Ok(()) => Ok(()),
                Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::EEXIST => Ok(()),
                Err(e) => Err(std::io::Error::other(e)),
            };
            for v6 in [false, true] {
                let mut rule = handle
                    .rule()
                    .add()
                    .fw_mark(CONNMARK_MARK)
                    .priority(CONNMARK_RULE_PRIORITY)
                    .table_id(CONNMARK_TABLE)
                    .action(RuleAction::ToTable);
                rule.message_mut()
                    .attributes
                    .push(RuleAttribute::FwMask(ZTUNNEL_MARK_MASK));
                let res = if v6 {
                    let mut r = rule.v6();
                    r.message_mut().header.family = rtnetlink::packet_route::AddressFamily::Inet6;
                    r.execute().await
                } else {
                    rule.v4().execute().await
                };
                match exists_ok(res) {
                    // A pod without IPv6 (disabled in its netns).
                    Err(e) if v6 => {
                        log::debug!("ambient: no IPv6 rule in {}: {e}", netns.display());
                        continue;
                    }
                    r => r?,
                }
                let msg = if v6 {
                    rtnetlink::RouteMessageBuilder::<Ipv6Addr>::new()
                        .destination_prefix(Ipv6Addr::UNSPECIFIED, 0)
                        .output_interface(LOOPBACK_IFINDEX)
                        .table_id(CONNMARK_TABLE)
                        .kind(RouteType::Local)
                        .scope(RouteScope::Host)
                        .build()
                } else {
                    rtnetlink::RouteMessageBuilder::<std::net::Ipv4Addr>::new()
                        .destination_prefix(std::net::Ipv4Addr::UNSPECIFIED, 0)
                        .output_interface(LOOPBACK_IFINDEX)
                        .table_id(CONNMARK_TABLE)
                        .kind(RouteType::Local)
                        .scope(RouteScope::Host)
                        .build()
                };
                exists_ok(handle.route().add(msg).replace().execute().await)?;
            }
            Ok(())
        })
    })
    .with_context(|| format!("ambient routing set-up in {}", netns.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rtnetlink::packet_route::address::AddressHeaderFlags;

    /// REDIRECT's choice on a virtual interface: the first primary IPv4
    /// address, the first global IPv6 address that is not tentative, in
    /// dump order.
    #[test]
    fn virtual_interface_addresses_are_redirects_choice() {
        let mut v = weir_common::VirtIface::default();
        let none = AddressHeaderFlags::empty();
        let dump: [(&str, AddressHeaderFlags, bool); 6] = [
            ("10.0.2.9", AddressHeaderFlags::Secondary, true),
            ("10.0.2.1", none, true),
            ("10.0.3.1", none, true),
            ("fe80::1", none, false),
            ("fd00::9", AddressHeaderFlags::Tentative, true),
            ("fd00::1", none, true),
        ];
        for (ip, flags, global) in dump {
            virt_address(&mut v, &ip.parse().unwrap(), &flags, global);
        }
        assert_eq!(v.flags, weir_common::VIRT_HAS4 | weir_common::VIRT_HAS6);
        assert_eq!(v.addr4, u32::from_ne_bytes([10, 0, 2, 1]));
        let want: std::net::Ipv6Addr = "fd00::1".parse().unwrap();
        assert_eq!(v.addr6, weir_common::addr_from_octets(want.octets()));
        // No address of a family: no flag, so the kernel drops (as
        // REDIRECT does).
        let mut v = weir_common::VirtIface::default();
        virt_address(&mut v, &"fe80::2".parse().unwrap(), &none, false);
        assert_eq!(v.flags, 0);
    }
}
