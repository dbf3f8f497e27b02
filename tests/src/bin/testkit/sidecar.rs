//! The sample sidecar: a transparent TCP proxy like Envoy's virtualOutbound
//! and virtualInbound listeners.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Args;
use serde_json::json;
use weir_tests::net::{self, fmt_addr};

use crate::JsonLog;

/// How long an upstream connect may take.
const UPSTREAM_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Args, Debug)]
pub(crate) struct SidecarArgs {
    /// Port of the outbound listener (Envoy's virtualOutbound).
    #[arg(long, default_value_t = 15001)]
    outbound_port: u16,
    /// Port of the inbound listener (Envoy's virtualInbound).
    #[arg(long, default_value_t = 15006)]
    inbound_port: u16,
    /// Name reported in each log record.
    #[arg(long, default_value = "sidecar")]
    name: String,
    /// Append one JSON record per connection to this file (default: stdout).
    #[arg(long)]
    pub(crate) log: Option<PathBuf>,
    /// Create this file once every listener is listening.
    #[arg(long)]
    ready_file: Option<PathBuf>,
    /// Behave like Istio's ztunnel in a pod (ambient mode): every upstream
    /// socket carries mark 0x539, and inbound connections go to the
    /// application from the client's own address (a transparent socket),
    /// so the answers only come back if the pod routes them to us.
    #[arg(long)]
    ztunnel: bool,
    /// Once the upstream has closed, close the application's connection
    /// at once (as Envoy's TCP proxy does), instead of passing the EOF on
    /// as a half close and waiting for the application's.
    #[arg(long)]
    full_close: bool,
}

/// `--full-close`.
static FULL_CLOSE: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// `--ztunnel`, for every connection's handler.
static ZTUNNEL: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

#[derive(Clone, Copy, Debug)]
enum Kind {
    Outbound,
    Inbound,
}

impl Kind {
    fn as_str(self) -> &'static str {
        match self {
            Kind::Outbound => "outbound",
            Kind::Inbound => "inbound",
        }
    }
}

pub(crate) fn run(args: SidecarArgs, log: JsonLog) -> Result<()> {
    ZTUNNEL.store(args.ztunnel, std::sync::atomic::Ordering::Relaxed);
    FULL_CLOSE.store(args.full_close, std::sync::atomic::Ordering::Relaxed);
    let ipv6 = net::ipv6_available();
    let mut listeners = Vec::new();
    for (kind, port) in [
        (Kind::Outbound, args.outbound_port),
        (Kind::Inbound, args.inbound_port),
    ] {
        let v4 = SocketAddr::from((Ipv4Addr::UNSPECIFIED, port));
        let l = net::listen(v4, None).with_context(|| format!("listening on {v4}"))?;
        eprintln!("sidecar {}: {} listening on {v4}", args.name, kind.as_str());
        listeners.push((kind, port, l));
        if ipv6 {
            let v6 = SocketAddr::from((Ipv6Addr::UNSPECIFIED, port));
            match net::listen(v6, Some(true)) {
                Ok(l) => {
                    eprintln!("sidecar {}: {} listening on {v6}", args.name, kind.as_str());
                    listeners.push((kind, port, l));
                }
                Err(e) => eprintln!("sidecar {}: no IPv6 listener on {v6}: {e}", args.name),
            }
        } else {
            eprintln!("sidecar {}: IPv6 unavailable, IPv4 only", args.name);
        }
    }
    crate::signal_ready(args.ready_file.as_ref())?;

    let name: &'static str = args.name.leak();
    let mut threads = Vec::new();
    for (kind, port, listener) in listeners {
        let log = log.clone();
        threads.push(std::thread::spawn(move || {
            accept_loop(listener, kind, port, name, log)
        }));
    }
    for t in threads {
        let _ = t.join();
    }
    Ok(())
}

fn accept_loop(listener: TcpListener, kind: Kind, port: u16, name: &'static str, log: JsonLog) {
    loop {
        match listener.accept() {
            Ok((conn, _)) => {
                let log = log.clone();
                std::thread::spawn(move || handle(conn, kind, port, name, &log));
            }
            Err(e) => {
                eprintln!(
                    "sidecar {name}: accept on {} port {port}: {e}",
                    kind.as_str()
                );
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

fn handle(conn: TcpStream, kind: Kind, port: u16, name: &str, log: &JsonLog) {
    let local = conn.local_addr().ok();
    let peer = conn.peer_addr().ok();
    let mut record = json!({
        "sidecar": name,
        "listener": kind.as_str(),
        "listener_port": port,
        "local": local.map(fmt_addr),
        "peer": peer.map(fmt_addr),
        "orig_dst": null,
        "orig_dst_error": null,
        "upstream_local": null,
        "upstream_error": null,
        "note": null,
    });
    let dst = match net::original_dst(&conn) {
        Ok(dst) => dst,
        Err(e) => {
            record["orig_dst_error"] = json!(e.to_string());
            log.write(&record);
            return;
        }
    };
    record["orig_dst"] = json!(fmt_addr(dst));
    if net::normalize(dst).port() == port {
        // A connection to the proxy port itself (like Envoy's BlackHole for
        // traffic to its own listeners): relaying it would loop. With
        // sk_lookup steering, the local address *is* the original
        // destination, so only the port tells a loop apart.
        record["upstream_error"] = json!("original destination is this listener (loop)");
        log.write(&record);
        return;
    }
    let connected = if ZTUNNEL.load(std::sync::atomic::Ordering::Relaxed) {
        connect_like_ztunnel(kind, dst, peer)
    } else {
        connect_upstream(kind, dst, &mut record)
    };
    let upstream = match connected {
        Ok(s) => s,
        Err(e) => {
            record["upstream_error"] = json!(e.to_string());
            log.write(&record);
            return;
        }
    };
    record["upstream_local"] = json!(upstream.local_addr().ok().map(fmt_addr));
    log.write(&record);
    relay(conn, upstream);
}

/// Connects to the original destination. Inbound connections come from
/// 127.0.0.6 / ::6 like Envoy's inbound passthrough, so the capture rules
/// recognise them and do not capture them again; when that address cannot
/// be bound (IPv6 without `::6` on `lo`) the connection goes out unbound and
/// the record's `note` says so.
fn connect_upstream(
    kind: Kind,
    dst: SocketAddr,
    record: &mut serde_json::Value,
) -> io::Result<TcpStream> {
    let dst = net::normalize(dst);
    let fd = match kind {
        Kind::Outbound => net::tcp_socket(dst, None)?,
        Kind::Inbound => {
            let src: IpAddr = match dst {
                SocketAddr::V4(_) => Ipv4Addr::new(127, 0, 0, 6).into(),
                SocketAddr::V6(_) => Ipv6Addr::new(0, 0, 0, 0, 0, 0, 0, 6).into(),
            };
            match net::tcp_socket(dst, Some(SocketAddr::new(src, 0))) {
                Ok(fd) => fd,
                Err(e) => {
                    record["note"] = json!(format!(
                        "cannot bind {src} ({e}); inbound passthrough connection not bound"
                    ));
                    net::tcp_socket(dst, None)?
                }
            }
        }
    };
    net::connect_socket(fd, dst, UPSTREAM_CONNECT_TIMEOUT)
}

/// ztunnel's upstream connections: mark 0x539 (istio-cni's and weir's
/// "ztunnel's own socket"); inbound, a transparent socket bound to the
/// client's address (`IP_TRANSPARENT`), as ztunnel connects to the
/// application from inside the pod.
fn connect_like_ztunnel(
    kind: Kind,
    dst: SocketAddr,
    peer: Option<SocketAddr>,
) -> io::Result<TcpStream> {
    use nix::sys::socket::{setsockopt, sockopt};
    use std::os::fd::AsRawFd;
    let dst = net::normalize(dst);
    let fd = net::tcp_socket(dst, None)?;
    setsockopt(&fd, sockopt::Mark, &0x539)?;
    if let (Kind::Inbound, Some(peer)) = (kind, peer) {
        let peer = net::normalize(peer);
        if peer.is_ipv4() {
            setsockopt(&fd, sockopt::IpTransparent, &true)?;
        } else {
            let one: libc::c_int = 1;
            // SAFETY: setsockopt with a valid int option value.
            let rc = unsafe {
                libc::setsockopt(
                    fd.as_raw_fd(),
                    libc::SOL_IPV6,
                    libc::IPV6_TRANSPARENT,
                    (&one as *const libc::c_int).cast(),
                    std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                )
            };
            if rc != 0 {
                return Err(io::Error::last_os_error());
            }
        }
        nix::sys::socket::bind(
            fd.as_raw_fd(),
            &nix::sys::socket::SockaddrStorage::from(SocketAddr::new(peer.ip(), 0)),
        )?;
    }
    net::connect_socket(fd, dst, UPSTREAM_CONNECT_TIMEOUT)
}

/// Copies bytes both ways until each side's EOF, passing each EOF on with a
/// half close. An error in either direction tears both connections down.
fn relay(down: TcpStream, up: TcpStream) {
    let (Ok(down2), Ok(up2)) = (down.try_clone(), up.try_clone()) else {
        return;
    };
    if FULL_CLOSE.load(std::sync::atomic::Ordering::Relaxed) {
        // Upstream to application until the upstream's EOF, then close
        // both connections entirely (the other direction's thread then
        // sees its socket shut down).
        std::thread::spawn(move || pipe(down2, up2));
        let (mut from, mut to) = (up, down);
        let _ = copy(&mut from, &mut to);
        let _ = to.shutdown(Shutdown::Both);
        let _ = from.shutdown(Shutdown::Both);
        return;
    }
    let t = std::thread::spawn(move || pipe(down2, up2));
    pipe(up, down);
    let _ = t.join();
}

fn pipe(mut from: TcpStream, mut to: TcpStream) {
    match copy(&mut from, &mut to) {
        Ok(()) => {
            let _ = to.shutdown(Shutdown::Write);
        }
        Err(_) => {
            let _ = from.shutdown(Shutdown::Both);
            let _ = to.shutdown(Shutdown::Both);
        }
    }
}

/// Copies until EOF. A read that fails with `EAGAIN` waits for
/// readability (poll) and goes on, as an event-loop proxy would: sockets
/// on weir's fast path can return it from a blocking read when woken
/// without data (a kernel behaviour of sockmap sockets).
fn copy(from: &mut TcpStream, to: &mut TcpStream) -> io::Result<()> {
    use std::io::{Read, Write};
    use std::os::fd::AsRawFd;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match from.read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(n) => to.write_all(&buf[..n])?,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                let mut pfd = libc::pollfd {
                    fd: from.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                };
                // SAFETY: one live pollfd, its count passed with it.
                unsafe { libc::poll(&mut pfd, 1, -1) };
            }
            Err(e) => return Err(e),
        }
    }
}
