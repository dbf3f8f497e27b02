//! The soak's pods: their network (a bridge in a "node" namespace, one
//! veth per pod) and cheap network namespaces for pod churn. The node
//! itself (cgroup, bpffs, pods file, an agent killed and restarted at
//! will) is the shared [`weir_tests::node::Node`].

use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;

use anyhow::{Context, Result};
use weir_tests::node::PodEntry;
use weir_tests::{Bridge, NetNs, Veth};

/// The pods-file entry of soak pod `name` (namespace `soak`).
pub fn pod_entry(name: &str, netns: &Path, ip: Ipv4Addr) -> PodEntry {
    PodEntry::at(name, netns, &[&ip.to_string()]).namespace("soak")
}

/// The value of a Prometheus series: `name{labels}` exactly as the agent
/// prints it (labels in its order), or `name` alone.
pub fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|l| {
        let rest = l.strip_prefix(series)?;
        rest.strip_prefix(' ')?.trim().parse().ok()
    })
}

/// Per-namespace sysctls every soak pod gets: TIME_WAIT reuse, the whole
/// ephemeral port range, long listen queues.
pub fn tune_netns(ns: &NetNs) -> Result<()> {
    ns.set_sysctls(&[
        ("net/ipv4/tcp_tw_reuse", "1"),
        ("net/ipv4/ip_local_port_range", "1024 65535"),
        ("net/core/somaxconn", "65535"),
        ("net/ipv4/tcp_max_syn_backlog", "65535"),
    ])?;
    Ok(())
}

/// A pod on the [`Lan`].
pub struct LanPod {
    /// Its name.
    pub name: String,
    /// Its address.
    pub ip: Ipv4Addr,
    veth: Veth,
    /// Its network namespace.
    pub ns: NetNs,
}

impl LanPod {
    /// The pods-file entry for this pod.
    pub fn spec(&self) -> PodEntry {
        pod_entry(&self.name, self.ns.path(), self.ip)
    }

    /// `ip:port` of this pod.
    pub fn addr(&self, port: u16) -> SocketAddr {
        SocketAddr::from((self.ip, port))
    }
}

/// Pods on one bridge in a "node" namespace, 198.18.`subnet`.0/24.
pub struct Lan {
    /// The pods.
    pub pods: Vec<LanPod>,
    subnet: u8,
    bridge: Bridge,
}

impl Lan {
    /// An empty bridge.
    pub fn new(subnet: u8) -> Lan {
        Lan {
            pods: Vec::new(),
            subnet,
            bridge: Bridge::new("wsn"),
        }
    }

    /// Adds pod `name` with address 198.18.`subnet`.`host`.
    pub fn add(&mut self, name: &str, host: u8) -> Result<&LanPod> {
        let ns = NetNs::new("wsp");
        let ip = Ipv4Addr::new(198, 18, self.subnet, host);
        let veth = self.bridge.attach(&ns, &format!("{ip}/24"));
        tune_netns(&ns)?;
        self.pods.push(LanPod {
            name: name.to_string(),
            ip,
            veth,
            ns,
        });
        Ok(self.pods.last().expect("just pushed"))
    }

    /// The pod named `name`.
    pub fn pod(&self, name: &str) -> &LanPod {
        self.pods
            .iter()
            .find(|p| p.name == name)
            .unwrap_or_else(|| panic!("no pod {name}"))
    }

    /// Changes pod `name`'s address to 198.18.`subnet`.`host` (the old one
    /// is removed from its interface).
    pub fn readdress(&mut self, name: &str, host: u8) -> Result<Ipv4Addr> {
        let subnet = self.subnet;
        let pod = self
            .pods
            .iter_mut()
            .find(|p| p.name == name)
            .with_context(|| format!("no pod {name}"))?;
        let new = Ipv4Addr::new(198, 18, subnet, host);
        let dev = pod.veth.a_name().to_string();
        // The old one first: deleting a subnet's primary address would
        // take the new (secondary) one with it.
        pod.ns
            .ip(&["addr", "del", &format!("{}/24", pod.ip), "dev", &dev]);
        pod.ns
            .ip(&["addr", "add", &format!("{new}/24"), "dev", &dev]);
        pod.ip = new;
        Ok(new)
    }
}
