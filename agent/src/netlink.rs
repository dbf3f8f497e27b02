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

/// Resolves interface names inside the network namespace at `netns`: their
/// indexes and the subnets of their addresses. Names that do not exist
/// (yet) are skipped; the agent resolves again on every resync.
pub fn resolve_interfaces(
    netns: &Path,
    names: &std::collections::BTreeSet<String>,
) -> Result<ExcludedInterfaces> {
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
            let mut out = ExcludedInterfaces::default();
            let mut links = handle.link().get().execute();
            while let Some(msg) = links.try_next().await.map_err(std::io::Error::other)? {
                let named = msg
                    .attributes
                    .iter()
                    .any(|a| matches!(a, LinkAttribute::IfName(n) if names.contains(n)));
                if named {
                    out.ifindexes.insert(msg.header.index);
                }
            }
            let mut addrs = handle.address().get().execute();
            while let Some(msg) = addrs.try_next().await.map_err(std::io::Error::other)? {
                if !out.ifindexes.contains(&msg.header.index) {
                    continue;
                }
                for attr in &msg.attributes {
                    if let AddressAttribute::Address(ip) = attr
                        && let Ok(net) = ipnet::IpNet::new(*ip, msg.header.prefix_len)
                    {
                        out.subnets.insert(net.trunc());
                    }
                }
            }
            Ok(out)
        })
    })
    .context("resolving excludeInterfaces")
}

/// The connected subnets of the network namespace at `netns` and the
/// address on each (global and site scope; not loopback or link-local).
pub fn connected_subnets(netns: &Path) -> Result<Vec<(ipnet::IpNet, IpAddr)>> {
    use futures_util::TryStreamExt;
    use rtnetlink::packet_route::address::AddressAttribute;
    let ns = std::fs::File::open(netns).with_context(|| format!("opening {}", netns.display()))?;
    crate::sys::in_netns(ns.as_fd(), || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        rt.block_on(async {
            let (conn, handle, _) = rtnetlink::new_connection()?;
            tokio::spawn(conn);
            let mut out = Vec::new();
            let mut addrs = handle.address().get().execute();
            while let Some(msg) = addrs.try_next().await.map_err(std::io::Error::other)? {
                for attr in &msg.attributes {
                    if let AddressAttribute::Address(ip) = attr {
                        let link_local =
                            matches!(ip, IpAddr::V6(v) if (v.segments()[0] & 0xffc0) == 0xfe80);
                        if ip.is_loopback() || link_local {
                            continue;
                        }
                        if let Ok(net) = ipnet::IpNet::new(*ip, msg.header.prefix_len) {
                            out.push((net.trunc(), *ip));
                        }
                    }
                }
            }
            Ok(out)
        })
    })
    .context("listing connected subnets")
}

/// Every address configured in the network namespace at `netns`, except
/// loopback ones (127.0.0.0/8, ::1): weir treats them all as the pod's own
/// (a pod can have more than the IPs its orchestrator reports, e.g. a
/// second interface), both for inbound capture and for Istio's "on lo"
/// rules.
pub fn list_addrs(netns: &Path) -> Result<Vec<IpAddr>> {
    use futures_util::TryStreamExt;
    use rtnetlink::packet_route::address::AddressAttribute;
    let ns = std::fs::File::open(netns).with_context(|| format!("opening {}", netns.display()))?;
    crate::sys::in_netns(ns.as_fd(), || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        rt.block_on(async {
            let (conn, handle, _) = rtnetlink::new_connection()?;
            tokio::spawn(conn);
            let mut out = Vec::new();
            let mut stream = handle.address().get().execute();
            while let Some(msg) = stream.try_next().await.map_err(std::io::Error::other)? {
                for attr in msg.attributes {
                    if let AddressAttribute::Address(ip) = attr
                        && !ip.is_loopback()
                        && !out.contains(&ip)
                    {
                        out.push(ip);
                    }
                }
            }
            Ok(out)
        })
    })
    .context("listing addresses")
}
