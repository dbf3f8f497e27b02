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
}

/// Reads [`NetnsFacts`] of the network namespace at `netns`.
pub fn inspect(netns: &Path, exclude: &std::collections::BTreeSet<String>) -> Result<NetnsFacts> {
    use futures_util::TryStreamExt;
    use rtnetlink::packet_route::address::AddressAttribute;
    use rtnetlink::packet_route::link::LinkAttribute;
    let ns = std::fs::File::open(netns).with_context(|| format!("opening {}", netns.display()))?;
    crate::sys::in_netns(ns.as_fd(), || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        rt.block_on(async {
            let (conn, handle, _) = rtnetlink::new_connection()?;
            tokio::spawn(conn);
            let mut facts = NetnsFacts::default();
            if !exclude.is_empty() {
                let mut links = handle.link().get().execute();
                while let Some(msg) = links.try_next().await.map_err(std::io::Error::other)? {
                    let named = msg
                        .attributes
                        .iter()
                        .any(|a| matches!(a, LinkAttribute::IfName(n) if exclude.contains(n)));
                    if named {
                        facts.excluded.ifindexes.insert(msg.header.index);
                    }
                }
            }
            let mut addrs = handle.address().get().execute();
            while let Some(msg) = addrs.try_next().await.map_err(std::io::Error::other)? {
                for attr in &msg.attributes {
                    let AddressAttribute::Address(ip) = attr else {
                        continue;
                    };
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
            Ok(facts)
        })
    })
    .context("reading the pod's addresses")
}
