//! What a pod's routing table means for capture, in plain Rust.
//!
//! A connect-time hook cannot ask the kernel's routing. With iptables the
//! kernel routes the *original* destination before the NAT rule rewrites
//! it, and two things follow from that route:
//!
//! - the connection's source address (the application's `getsockname`, the
//!   proxy's peer): the route's preferred source, else an address of the
//!   interface it leaves through;
//! - `excludeInterfaces` (`-A OUTPUT -o net1 -j RETURN`): a destination
//!   whose route leaves through an excluded interface is not captured.
//!
//! weir rewrites the destination at `connect()`, so it writes both facts
//! per destination prefix into LPM tries (`SRC_ROUTES`, `CIDR_IFACE`) from
//! the pod's main routing table, read when the pod is enrolled and on every
//! resync. Policy routing (`ip rule`), multipath routes and routes added
//! between two resyncs are not followed (docs/differential.md).

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use ipnet::IpNet;

/// One unicast route of the pod's main table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Route {
    /// Destination prefix.
    pub dst: IpNet,
    /// Interface it leaves through.
    pub oif: u32,
    /// Preferred source (`src` in `ip route`).
    pub prefsrc: Option<IpAddr>,
    /// Next hop, for a route through a gateway.
    pub gateway: Option<IpAddr>,
    /// Metric (lower wins between routes to the same prefix).
    pub metric: u32,
}

/// An address of one of the pod's interfaces.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IfaceAddr {
    /// Interface index.
    pub ifindex: u32,
    /// The address with its prefix length.
    pub net: IpNet,
}

/// The route the kernel uses for each prefix: the lowest metric wins.
fn best_routes(routes: &[Route]) -> BTreeMap<IpNet, &Route> {
    let mut best: BTreeMap<IpNet, &Route> = BTreeMap::new();
    for r in routes {
        let dst = r.dst.trunc();
        match best.get(&dst) {
            Some(cur) if cur.metric <= r.metric => {}
            _ => {
                best.insert(dst, r);
            }
        }
    }
    best
}

fn same_family(a: &IpAddr, b: &IpAddr) -> bool {
    a.is_ipv4() == b.is_ipv4()
}

fn link_local(ip: &IpAddr) -> bool {
    matches!(ip, IpAddr::V6(v) if (v.segments()[0] & 0xffc0) == 0xfe80)
}

/// The source address the kernel picks for a route: its preferred source,
/// else an address of its interface in the same family, preferring one on
/// the gateway's subnet, then the first one the interface lists
/// (link-local IPv6 addresses only as a last resort).
fn source_of(r: &Route, addrs: &[IfaceAddr]) -> Option<IpAddr> {
    if let Some(src) = r.prefsrc {
        return Some(src);
    }
    let family = r.dst.addr();
    let on_link: Vec<&IfaceAddr> = addrs
        .iter()
        .filter(|a| a.ifindex == r.oif && same_family(&a.net.addr(), &family))
        .collect();
    if let Some(gw) = r.gateway
        && let Some(a) = on_link
            .iter()
            .find(|a| a.net.contains(&gw) && !link_local(&a.net.addr()))
    {
        return Some(a.net.addr());
    }
    on_link
        .iter()
        .find(|a| !link_local(&a.net.addr()))
        .or_else(|| on_link.first())
        .map(|a| a.net.addr())
}

/// Source-address entries for `SRC_ROUTES`: every routed prefix with the
/// source the kernel would pick for it. Link-local destinations and
/// sources are left out (captured connections are to global addresses).
pub fn source_routes(routes: &[Route], addrs: &[IfaceAddr]) -> BTreeMap<IpNet, IpAddr> {
    best_routes(routes)
        .into_iter()
        .filter(|(dst, _)| !link_local(&dst.addr()))
        .filter_map(|(dst, r)| {
            let src = source_of(r, addrs)?;
            (!link_local(&src)).then_some((dst, src))
        })
        .collect()
}

/// The destinations whose route leaves through one of `excluded`, as
/// prefixes for `CIDR_IFACE`: each such route's prefix minus the more
/// specific routes inside it that leave elsewhere.
pub fn excluded_region(routes: &[Route], excluded: &BTreeSet<u32>) -> BTreeSet<IpNet> {
    let best = best_routes(routes);
    let mut out = BTreeSet::new();
    for (dst, r) in &best {
        if !excluded.contains(&r.oif) {
            continue;
        }
        let holes: Vec<IpNet> = best
            .iter()
            .filter(|(d, o)| {
                d.prefix_len() > dst.prefix_len() && dst.contains(*d) && !excluded.contains(&o.oif)
            })
            .map(|(d, _)| *d)
            .collect();
        subtract(*dst, &holes, &mut out);
    }
    out
}

/// Adds `net` minus the union of `holes` to `out`, as prefixes.
fn subtract(net: IpNet, holes: &[IpNet], out: &mut BTreeSet<IpNet>) {
    let inside: Vec<IpNet> = holes.iter().copied().filter(|h| net.contains(h)).collect();
    if inside.is_empty() {
        out.insert(net);
        return;
    }
    if inside.iter().any(|h| h.prefix_len() <= net.prefix_len()) {
        return; // `net` is entirely a hole
    }
    let Ok(halves) = net.subnets(net.prefix_len() + 1) else {
        return;
    };
    for half in halves {
        subtract(half, &inside, out);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn route(dst: &str, oif: u32, gw: Option<&str>) -> Route {
        Route {
            dst: net(dst),
            oif,
            prefsrc: None,
            gateway: gw.map(ip),
            metric: 0,
        }
    }

    fn addrs() -> Vec<IfaceAddr> {
        vec![
            IfaceAddr {
                ifindex: 2,
                net: net("fe80::1/64"),
            },
            IfaceAddr {
                ifindex: 2,
                net: net("198.18.0.1/24"),
            },
            IfaceAddr {
                ifindex: 2,
                net: net("2001:2::1/64"),
            },
            IfaceAddr {
                ifindex: 3,
                net: net("198.18.100.1/24"),
            },
            IfaceAddr {
                ifindex: 3,
                net: net("2001:2:0:100::1/64"),
            },
        ]
    }

    /// The multi-interface pod of the differential suite: eth0 (2) with the
    /// default routes, net1 (3) with a connected subnet and a gateway route.
    fn pod_routes() -> Vec<Route> {
        vec![
            route("0.0.0.0/0", 2, Some("198.18.0.254")),
            route("198.18.0.0/24", 2, None),
            route("198.18.100.0/24", 3, None),
            route("198.18.110.0/24", 3, Some("198.18.100.254")),
            route("::/0", 2, Some("2001:2::ffff")),
            route("2001:2::/64", 2, None),
            route("fe80::/64", 2, None),
            route("2001:2:0:100::/64", 3, None),
            route("2001:2:0:110::/64", 3, Some("2001:2:0:100::ffff")),
        ]
    }

    #[test]
    fn sources_follow_the_interface_of_the_route() {
        let s = source_routes(&pod_routes(), &addrs());
        assert_eq!(s[&net("0.0.0.0/0")], ip("198.18.0.1"));
        assert_eq!(s[&net("198.18.110.0/24")], ip("198.18.100.1"));
        assert_eq!(s[&net("198.18.100.0/24")], ip("198.18.100.1"));
        assert_eq!(s[&net("::/0")], ip("2001:2::1"));
        assert_eq!(s[&net("2001:2:0:110::/64")], ip("2001:2:0:100::1"));
        // Link-local destinations get no entry.
        assert!(!s.contains_key(&net("fe80::/64")));
    }

    #[test]
    fn preferred_source_and_metric_win() {
        let mut routes = pod_routes();
        routes.push(Route {
            dst: net("198.18.110.0/24"),
            oif: 2,
            prefsrc: Some(ip("198.18.0.1")),
            gateway: Some(ip("198.18.0.254")),
            metric: 100,
        });
        // Higher metric: the net1 route stays.
        let s = source_routes(&routes, &addrs());
        assert_eq!(s[&net("198.18.110.0/24")], ip("198.18.100.1"));
        routes.last_mut().unwrap().metric = 0;
        routes[3].metric = 50;
        let s = source_routes(&routes, &addrs());
        assert_eq!(s[&net("198.18.110.0/24")], ip("198.18.0.1"));
    }

    #[test]
    fn gateway_subnet_picks_among_several_addresses() {
        let mut a = addrs();
        a.push(IfaceAddr {
            ifindex: 3,
            net: net("203.0.113.5/24"),
        });
        let routes = vec![route("10.0.0.0/8", 3, Some("203.0.113.1"))];
        assert_eq!(
            source_routes(&routes, &a)[&net("10.0.0.0/8")],
            ip("203.0.113.5")
        );
    }

    #[test]
    fn no_source_without_an_address_on_the_link() {
        let routes = vec![route("10.0.0.0/8", 9, None)];
        assert!(source_routes(&routes, &addrs()).is_empty());
    }

    #[test]
    fn excluded_interface_covers_its_gateway_routes() {
        let r = excluded_region(&pod_routes(), &[3].into());
        let want: BTreeSet<IpNet> = [
            "198.18.100.0/24",
            "198.18.110.0/24",
            "2001:2:0:100::/64",
            "2001:2:0:110::/64",
        ]
        .iter()
        .map(|s| net(s))
        .collect();
        assert_eq!(r, want);
    }

    /// A default route through the excluded interface covers everything
    /// but what more specific routes send elsewhere.
    #[test]
    fn excluded_default_route_leaves_the_other_routes_out() {
        let r = excluded_region(&pod_routes(), &[2].into());
        let covered = |a: &str| r.iter().any(|n| n.contains(&ip(a)));
        assert!(covered("8.8.8.8"));
        assert!(covered("198.18.0.7"));
        assert!(covered("198.18.101.1"));
        assert!(!covered("198.18.100.7"));
        assert!(!covered("198.18.110.7"));
        assert!(covered("2001:db8::1"));
        assert!(!covered("2001:2:0:110::9"));
        // Bounded: one prefix per level at most for each hole.
        assert!(r.len() <= 2 * 128, "{}", r.len());
    }

    #[test]
    fn nothing_excluded_without_routes_through_it() {
        assert!(excluded_region(&pod_routes(), &[7].into()).is_empty());
        assert!(excluded_region(&[], &[2].into()).is_empty());
    }
}
