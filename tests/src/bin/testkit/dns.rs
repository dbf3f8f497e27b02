//! DNS-shaped test programs: a UDP+TCP server on port 53, a DNS "proxy" in
//! the role of istio-agent's listener on 15053, and a UDP client that says
//! from which address the answer came.
//!
//! Payloads are not DNS: a query is one line of text, an answer one JSON
//! line saying who answered and what it saw. What matters to weir is only
//! the addressing.

use std::io::{BufRead, BufReader, Write};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, UdpSocket};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Args;
use serde_json::{Value, json};
use weir_tests::net::{self, fmt_addr};

/// A UDP and TCP answering server (a DNS server, or the DNS proxy).
#[derive(Args, Debug)]
pub(crate) struct DnsServerArgs {
    /// Port to listen on (UDP and TCP).
    #[arg(long, default_value_t = 53)]
    port: u16,
    /// Name put in every answer.
    #[arg(long, default_value = "dns")]
    name: String,
    /// Listen on loopback only (127.0.0.1 and ::1), like istio-agent's DNS
    /// proxy; otherwise on every address.
    #[arg(long)]
    loopback: bool,
    /// Created once every socket is listening.
    #[arg(long)]
    ready_file: Option<PathBuf>,
}

/// The UDP client.
#[derive(Args, Debug)]
pub(crate) struct UdpClientArgs {
    /// Server address.
    #[arg(long)]
    to: SocketAddr,
    /// `connect()` the socket first (else `sendto`).
    #[arg(long)]
    connected: bool,
    /// Timeout for the answer, in ms.
    #[arg(long, default_value_t = 3000)]
    timeout_ms: u64,
}

pub(crate) fn serve(args: DnsServerArgs) -> Result<()> {
    let addrs: Vec<SocketAddr> = if args.loopback {
        vec![
            (Ipv4Addr::LOCALHOST, args.port).into(),
            (Ipv6Addr::LOCALHOST, args.port).into(),
        ]
    } else {
        vec![
            (Ipv4Addr::UNSPECIFIED, args.port).into(),
            (Ipv6Addr::UNSPECIFIED, args.port).into(),
        ]
    };
    let name: &'static str = Box::leak(args.name.into_boxed_str());
    let mut threads = Vec::new();
    for addr in addrs {
        if addr.is_ipv6() && !net::ipv6_available() {
            continue;
        }
        let v6only = addr.is_ipv6().then_some(true);
        let udp = bind_udp(addr).with_context(|| format!("udp {addr}"))?;
        threads.push(std::thread::spawn(move || udp_loop(udp, name)));
        let tcp = net::listen(addr, v6only).with_context(|| format!("tcp {addr}"))?;
        threads.push(std::thread::spawn(move || tcp_loop(tcp, name)));
    }
    crate::signal_ready(args.ready_file.as_ref())?;
    for t in threads {
        let _ = t.join();
    }
    Ok(())
}

fn bind_udp(addr: SocketAddr) -> std::io::Result<UdpSocket> {
    if addr.is_ipv6() {
        let s = socket2_v6only(addr)?;
        return Ok(s);
    }
    UdpSocket::bind(addr)
}

/// An IPv6 UDP socket with IPV6_V6ONLY, so it never shadows the IPv4 one.
fn socket2_v6only(addr: SocketAddr) -> std::io::Result<UdpSocket> {
    use nix::sys::socket::{
        AddressFamily, SockFlag, SockType, SockaddrIn6, bind, setsockopt, socket, sockopt,
    };
    let fd = socket(
        AddressFamily::Inet6,
        SockType::Datagram,
        SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    setsockopt(&fd, sockopt::Ipv6V6Only, &true)?;
    let SocketAddr::V6(a) = addr else {
        unreachable!("IPv6 only")
    };
    bind(std::os::fd::AsRawFd::as_raw_fd(&fd), &SockaddrIn6::from(a))?;
    Ok(UdpSocket::from(fd))
}

fn answer(
    name: &str,
    local: Option<SocketAddr>,
    peer: SocketAddr,
    request: &str,
    proto: &str,
    orig: Option<SocketAddr>,
) -> Value {
    json!({
        "server": name,
        "proto": proto,
        "local": local.map(|a| fmt_addr(net::normalize(a))),
        "peer": fmt_addr(net::normalize(peer)),
        "orig_dst": orig.map(|a| fmt_addr(net::normalize(a))),
        "request": request,
    })
}

fn udp_loop(sock: UdpSocket, name: &'static str) {
    let local = sock.local_addr().ok();
    let mut buf = [0u8; 1500];
    loop {
        let Ok((n, peer)) = sock.recv_from(&mut buf) else {
            continue;
        };
        let req = String::from_utf8_lossy(&buf[..n]).trim().to_string();
        let a = answer(name, local, peer, &req, "udp", None);
        let _ = sock.send_to(a.to_string().as_bytes(), peer);
    }
}

fn tcp_loop(l: TcpListener, name: &'static str) {
    for conn in l.incoming() {
        let Ok(mut c) = conn else { continue };
        std::thread::spawn(move || {
            let _ = c.set_read_timeout(Some(Duration::from_secs(5)));
            let mut line = String::new();
            let _ = BufReader::new(&c).read_line(&mut line);
            let orig = net::original_dst(&c).ok();
            let a = answer(
                name,
                c.local_addr().ok(),
                c.peer_addr().unwrap_or((Ipv4Addr::UNSPECIFIED, 0).into()),
                line.trim(),
                "tcp",
                orig,
            );
            let _ = writeln!(c, "{a}");
        });
    }
}

/// Sends one query and prints {ok, from, peer, reply}: `from` is the
/// address `recvfrom` reported, `peer` what `getpeername` says (connected
/// sockets only).
pub(crate) fn udp_client(args: UdpClientArgs) -> Result<()> {
    let bind: SocketAddr = if args.to.is_ipv6() {
        (Ipv6Addr::UNSPECIFIED, 0).into()
    } else {
        (Ipv4Addr::UNSPECIFIED, 0).into()
    };
    let s = UdpSocket::bind(bind)?;
    s.set_read_timeout(Some(Duration::from_millis(args.timeout_ms)))?;
    let mut out = json!({"ok": false, "from": null, "peer": null, "reply": null, "error": null});
    let sent = if args.connected {
        s.connect(args.to).and_then(|_| {
            out["peer"] = json!(s.peer_addr().ok().map(|a| fmt_addr(net::normalize(a))));
            s.send(b"query\n")
        })
    } else {
        s.send_to(b"query\n", args.to)
    };
    if let Err(e) = sent {
        out["error"] = json!(format!("send: {e}"));
        println!("{out}");
        return Ok(());
    }
    let mut buf = [0u8; 2048];
    match s.recv_from(&mut buf) {
        Ok((n, from)) => {
            out["ok"] = json!(true);
            out["from"] = json!(fmt_addr(net::normalize(from)));
            out["reply"] = serde_json::from_slice(&buf[..n]).unwrap_or(Value::Null);
        }
        Err(e) => out["error"] = json!(format!("recv: {e}")),
    }
    println!("{out}");
    Ok(())
}
