//! Adopting proxy listeners that were listening before weir was attached.
//!
//! The sockops program records a proxy's listener when it calls
//! `listen()`. A proxy that was already listening when weir was installed
//! (or re-installed after `weir uninstall`) was never seen: its pod would
//! refuse every inbound connection until the proxy restarts. So when a pod
//! is enrolled, the agent looks for listening sockets on the pod's capture
//! ports among the processes of the pod's network namespace, takes a
//! duplicate of each with `pidfd_getfd(2)`, and records it in `LISTENERS`
//! itself. (Pinned maps survive agent restarts, so this is only needed on
//! a first install.)

use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::path::Path;

use weir_common::{AF_INET, AF_INET6};

/// A listening socket found in a pod.
pub struct Found {
    /// Listening port.
    pub port: u16,
    /// `AF_INET` or `AF_INET6`.
    pub family: u32,
    /// A UDP socket (the DNS proxy's), not a TCP listener.
    pub udp: bool,
    /// A duplicate of the socket, owned by the agent.
    pub fd: OwnedFd,
}

/// TCP_LISTEN in /proc/net/tcp's `st` column.
const TCP_LISTEN: &str = "0A";
/// TCP_CLOSE, an unconnected UDP socket, in /proc/net/udp's `st` column.
const UDP_UNCONNECTED: &str = "07";
/// 127.0.0.1 and ::1 as /proc/net/udp{,6} print them (host-order words).
const LOOPBACK4_HEX: &str = "0100007F";
const LOOPBACK6_HEX: &str = "00000000000000000000000001000000";

/// Which sockets to look for.
#[derive(Clone, Copy)]
enum Kind {
    /// TCP listeners, any address.
    TcpListen,
    /// Unconnected UDP sockets bound to loopback (a DNS proxy).
    UdpLoopback,
}

/// Inodes of the sockets of `kind` on `ports`, from
/// `/proc/<pid>/net/{tcp,udp}{,6}` (which describe the network namespace
/// of `pid`).
fn socket_inodes(
    proc_root: &Path,
    pid: u32,
    ports: &BTreeSet<u16>,
    kind: Kind,
) -> BTreeMap<u64, (u16, u32)> {
    let mut out = BTreeMap::new();
    let files = match kind {
        Kind::TcpListen => [("tcp", AF_INET), ("tcp6", AF_INET6)],
        Kind::UdpLoopback => [("udp", AF_INET), ("udp6", AF_INET6)],
    };
    for (file, family) in files {
        let Ok(text) = std::fs::read_to_string(proc_root.join(format!("{pid}/net/{file}"))) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            // sl local_address rem_address st tx:rx tr:when retrnsmt uid timeout inode
            let wanted = match kind {
                Kind::TcpListen => f.len() >= 10 && f[3] == TCP_LISTEN,
                Kind::UdpLoopback => {
                    let loopback = if family == AF_INET {
                        LOOPBACK4_HEX
                    } else {
                        LOOPBACK6_HEX
                    };
                    f.len() >= 10
                        && f[3] == UDP_UNCONNECTED
                        && f[1].split(':').next() == Some(loopback)
                }
            };
            if !wanted {
                continue;
            }
            let Some(port) = f[1]
                .rsplit(':')
                .next()
                .and_then(|p| u16::from_str_radix(p, 16).ok())
            else {
                continue;
            };
            if !ports.contains(&port) {
                continue;
            }
            if let Ok(inode) = f[9].parse::<u64>() {
                out.insert(inode, (port, family));
            }
        }
    }
    out
}

fn pidfd_open(pid: u32) -> io::Result<OwnedFd> {
    // SAFETY: plain syscall with integer arguments; returns a new fd.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel returned a new descriptor that we now own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

fn pidfd_getfd(pidfd: &OwnedFd, target: RawFd) -> io::Result<OwnedFd> {
    use std::os::fd::AsRawFd;
    // SAFETY: plain syscall with integer arguments; returns a new fd that
    // refers to the same open file as `target` in the other process.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), target, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: as above.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// Every process of the host, grouped by the inode of its network
/// namespace (one pass over `proc_root`, shared by all the pods of a
/// reconcile pass).
pub fn netns_pids(proc_root: &Path) -> io::Result<BTreeMap<u64, Vec<u32>>> {
    let mut out: BTreeMap<u64, Vec<u32>> = BTreeMap::new();
    for entry in std::fs::read_dir(proc_root)? {
        let Ok(entry) = entry else { continue };
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(link) = std::fs::read_link(entry.path().join("ns/net")) else {
            continue;
        };
        let Some(ino) = link
            .to_str()
            .and_then(|l| l.strip_prefix("net:["))
            .and_then(|l| l.strip_suffix(']'))
            .and_then(|l| l.parse::<u64>().ok())
        else {
            continue;
        };
        out.entry(ino).or_default().push(pid);
    }
    Ok(out)
}

/// Finds the listening sockets on `ports` of `pids` (the processes of one
/// pod's network namespace, see [`netns_pids`]).
pub fn find_listeners(
    proc_root: &Path,
    pids: &[u32],
    ports: &BTreeSet<u16>,
) -> io::Result<Vec<Found>> {
    find(proc_root, pids, ports, Kind::TcpListen)
}

/// Finds the pod's DNS proxy: unconnected UDP sockets bound to
/// `127.0.0.1` or `::1` on `port`, among `pids`.
pub fn find_dns_proxy(proc_root: &Path, pids: &[u32], port: u16) -> io::Result<Vec<Found>> {
    find(proc_root, pids, &BTreeSet::from([port]), Kind::UdpLoopback)
}

/// The socket inodes of the pod's DNS proxy (see [`find_dns_proxy`]),
/// from `/proc/<pid>/net/udp{,6}` alone: cheap enough for every pass, to
/// tell whether the sockets weir holds are still the proxy's.
pub fn dns_proxy_inodes(proc_root: &Path, pids: &[u32], port: u16) -> BTreeSet<u64> {
    pids.first().map_or_else(BTreeSet::new, |pid| {
        socket_inodes(proc_root, *pid, &BTreeSet::from([port]), Kind::UdpLoopback)
            .into_keys()
            .collect()
    })
}

fn find(
    proc_root: &Path,
    pids: &[u32],
    ports: &BTreeSet<u16>,
    kind: Kind,
) -> io::Result<Vec<Found>> {
    let mut found = Vec::new();
    let mut seen = BTreeSet::new();
    let Some(first) = pids.first() else {
        return Ok(found);
    };
    // Every process of the netns sees the same /proc/PID/net/tcp.
    let inodes = socket_inodes(proc_root, *first, ports, kind);
    if inodes.is_empty() {
        return Ok(found);
    }
    for pid in pids {
        let Ok(fds) = std::fs::read_dir(proc_root.join(format!("{pid}/fd"))) else {
            continue;
        };
        let mut pidfd = None;
        for fd in fds.filter_map(|e| e.ok()) {
            let Ok(link) = std::fs::read_link(fd.path()) else {
                continue;
            };
            let Some(inode) = link
                .to_str()
                .and_then(|l| l.strip_prefix("socket:["))
                .and_then(|l| l.strip_suffix(']'))
                .and_then(|l| l.parse::<u64>().ok())
            else {
                continue;
            };
            let Some(&(port, family)) = inodes.get(&inode) else {
                continue;
            };
            if !seen.insert(inode) {
                continue;
            }
            let Some(target) = fd
                .file_name()
                .to_str()
                .and_then(|s| s.parse::<RawFd>().ok())
            else {
                continue;
            };
            if pidfd.is_none() {
                pidfd = Some(pidfd_open(*pid)?);
            }
            let dup = pidfd_getfd(pidfd.as_ref().expect("opened above"), target)?;
            found.push(Found {
                port,
                family,
                udp: matches!(kind, Kind::UdpLoopback),
                fd: dup,
            });
        }
        if seen.len() == inodes.len() {
            break;
        }
    }
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::testutil::TempDir;

    /// A fake `/proc/<pid>/net/...` for process 7.
    fn fake_proc(files: &[(&str, &str)]) -> TempDir {
        let d = TempDir::new("adopt");
        let net = d.path().join("7/net");
        std::fs::create_dir_all(&net).unwrap();
        for (name, text) in files {
            std::fs::write(net.join(name), text).unwrap();
        }
        d
    }

    const HEAD: &str = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n";

    #[test]
    fn dns_proxy_sockets_are_unconnected_udp_on_loopback() {
        // 15053 = 0x3ACD. Kept: 127.0.0.1 and ::1, unconnected (07).
        // Not kept: 0.0.0.0:15053, a connected socket, another port.
        let udp = format!(
            "{HEAD}\
  1: 0100007F:3ACD 00000000:0000 07 00000000:00000000 00:00000000 00000000  1337        0 101 2\n\
  2: 00000000:3ACD 00000000:0000 07 00000000:00000000 00:00000000 00000000  1337        0 102 2\n\
  3: 0100007F:3ACD 0100007F:9C40 01 00000000:00000000 00:00000000 00000000  1337        0 103 2\n\
  4: 0100007F:0035 00000000:0000 07 00000000:00000000 00:00000000 00000000  1337        0 104 2\n"
        );
        let udp6 = format!(
            "{HEAD}\
  5: 00000000000000000000000001000000:3ACD 00000000000000000000000000000000:0000 07 00000000:00000000 00:00000000 00000000  1337        0 105 2\n"
        );
        let d = fake_proc(&[("udp", &udp), ("udp6", &udp6)]);
        let got = dns_proxy_inodes(d.path(), &[7], 15053);
        assert_eq!(got, BTreeSet::from([101, 105]));
        assert!(dns_proxy_inodes(d.path(), &[], 15053).is_empty());
    }
}
