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
