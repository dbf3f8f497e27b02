//! The benchmark's sidecar and application server.
//!
//! Both are thread pools: every listener gets `--threads` threads that each
//! block in `accept()` and then serve that one connection to its end with
//! blocking sockets and buffers allocated once per thread. No thread is
//! spawned and nothing is allocated per connection, so the proxy's own cost
//! stays small and identical in every mode; what differs between modes is
//! the kernel's work (NAT, conntrack, or weir's programs).
//!
//! The sidecar does what Envoy's virtualOutbound / virtualInbound listeners
//! do for every connection: `getsockname` + `getsockopt(SO_ORIGINAL_DST)`.
//! A connection whose original destination port is `--respond-port` is
//! answered by the sidecar itself (the capture-cost workloads); any other is
//! relayed to its original destination (outbound as the proxy user; inbound
//! from 127.0.0.6, like Envoy's inbound passthrough). A connection made
//! straight to a listener (no original destination: the "direct" mode)
//! goes to that listener's fallback instead. On SIGTERM it prints its
//! counters as one JSON line, so the bench can check that every connection
//! of a capture mode really was captured.

use std::io::{self, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::{Context, Result, bail};
use clap::Args;
use nix::sys::signal::{SigSet, Signal};
use serde_json::json;
use weir_tests::net::{normalize, original_dst};

use crate::proto::{self, IO_BUF, Responder, STATUS_CAPTURED, STATUS_DIRECT, STATUS_SERVER};

/// Source address of the inbound passthrough (Envoy binds it so the capture
/// rules let the connection to the application through).
const PASSTHROUGH_SOURCE: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 6);

#[derive(Args, Debug)]
pub struct SidecarArgs {
    /// A listener: `PORT:out:FALLBACK` or `PORT:in:FALLBACK`, where FALLBACK
    /// (used when the connection has no original destination) is `respond`
    /// or an `ip:port` to relay to. Repeat for several.
    #[arg(long = "listen", required = true)]
    listen: Vec<ListenSpec>,
    /// Original destinations with this port are answered by the sidecar.
    #[arg(long, default_value_t = 80)]
    respond_port: u16,
    /// Threads per listener (the most concurrent connections it serves).
    #[arg(long, default_value_t = 16)]
    threads: usize,
    /// Create this file once every listener is listening.
    #[arg(long)]
    ready_file: Option<PathBuf>,
}

#[derive(Args, Debug)]
pub struct ServerArgs {
    /// Port to listen on (0.0.0.0); repeat for several.
    #[arg(long = "port", required = true)]
    ports: Vec<u16>,
    /// Threads per listener.
    #[arg(long, default_value_t = 16)]
    threads: usize,
    /// Create this file once every listener is listening.
    #[arg(long)]
    ready_file: Option<PathBuf>,
}

/// Which of Envoy's listeners a sidecar listener plays.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Direction {
    Outbound,
    Inbound,
}

/// Where a connection without an original destination goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fallback {
    Respond,
    Relay(SocketAddr),
}

/// One `--listen` value.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ListenSpec {
    port: u16,
    direction: Direction,
    fallback: Fallback,
}

impl FromStr for ListenSpec {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut parts = s.splitn(3, ':');
        let (Some(port), Some(dir), Some(fallback)) = (parts.next(), parts.next(), parts.next())
        else {
            return Err(format!("{s:?}: expected PORT:out|in:respond|IP:PORT"));
        };
        let port = port
            .parse()
            .map_err(|_| format!("{s:?}: {port:?} is not a port"))?;
        let direction = match dir {
            "out" => Direction::Outbound,
            "in" => Direction::Inbound,
            other => return Err(format!("{s:?}: direction {other:?} is not `out` or `in`")),
        };
        let fallback = match fallback {
            "respond" => Fallback::Respond,
            addr => Fallback::Relay(
                addr.parse()
                    .map_err(|_| format!("{s:?}: fallback {addr:?} is not `respond` or ip:port"))?,
            ),
        };
        Ok(ListenSpec {
            port,
            direction,
            fallback,
        })
    }
}

/// What the sidecar did, summed over its threads.
#[derive(Default)]
struct Counters {
    accepted: AtomicU64,
    orig_dst: AtomicU64,
    fallback: AtomicU64,
    responded: AtomicU64,
    relayed: AtomicU64,
    upstream_errors: AtomicU64,
    loops: AtomicU64,
}

impl Counters {
    fn bump(c: &AtomicU64) {
        c.fetch_add(1, Ordering::Relaxed);
    }

    fn json(&self) -> serde_json::Value {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        json!({
            "accepted": g(&self.accepted),
            "orig_dst": g(&self.orig_dst),
            "fallback": g(&self.fallback),
            "responded": g(&self.responded),
            "relayed": g(&self.relayed),
            "upstream_errors": g(&self.upstream_errors),
            "loops": g(&self.loops),
        })
    }
}

/// Per-thread buffers.
struct Buffers {
    responder: Responder,
    relay: Vec<u8>,
}

/// Blocks SIGTERM in this thread (and so in every thread spawned after).
fn block_sigterm() -> Result<SigSet> {
    let mut set = SigSet::empty();
    set.add(Signal::SIGTERM);
    set.thread_block().context("blocking SIGTERM")?;
    Ok(set)
}

/// Waits for SIGTERM, prints `counters` as one JSON line, exits.
fn wait_and_report(set: SigSet, counters: &Counters) -> Result<()> {
    set.wait().context("waiting for SIGTERM")?;
    let mut out = io::stdout().lock();
    writeln!(out, "{}", counters.json())?;
    out.flush()?;
    std::process::exit(0);
}

fn signal_ready(path: Option<&PathBuf>) -> Result<()> {
    if let Some(p) = path {
        std::fs::write(p, b"").with_context(|| format!("creating ready file {}", p.display()))?;
    }
    Ok(())
}

/// `weir-bench sidecar`.
pub fn run_sidecar(args: SidecarArgs) -> Result<()> {
    let sigterm = block_sigterm()?;
    let counters = Arc::new(Counters::default());
    let mut listeners = Vec::new();
    for spec in &args.listen {
        let addr = SocketAddr::from((Ipv4Addr::UNSPECIFIED, spec.port));
        let l = proto::listen_tcp(addr).with_context(|| format!("listening on {addr}"))?;
        listeners.push((*spec, Arc::new(l)));
    }
    for (spec, listener) in listeners {
        for _ in 0..args.threads.max(1) {
            let listener = listener.clone();
            let counters = counters.clone();
            let respond_port = args.respond_port;
            std::thread::spawn(move || {
                let mut bufs = Buffers {
                    responder: Responder::new(),
                    relay: vec![0; IO_BUF],
                };
                loop {
                    match listener.accept() {
                        Ok((conn, _)) => {
                            handle(conn, spec, respond_port, &counters, &mut bufs);
                        }
                        Err(e) => {
                            eprintln!("sidecar: accept on port {}: {e}", spec.port);
                            std::thread::sleep(std::time::Duration::from_millis(10));
                        }
                    }
                }
            });
        }
    }
    signal_ready(args.ready_file.as_ref())?;
    wait_and_report(sigterm, &counters)
}

fn handle(
    mut conn: TcpStream,
    spec: ListenSpec,
    respond_port: u16,
    counters: &Counters,
    bufs: &mut Buffers,
) {
    Counters::bump(&counters.accepted);
    let _ = conn.set_nodelay(true);
    let (target, status) = match original_dst(&conn) {
        Ok(dst) => {
            Counters::bump(&counters.orig_dst);
            let dst = normalize(dst);
            if dst.port() == respond_port {
                (Fallback::Respond, STATUS_CAPTURED)
            } else if dst.port() == spec.port {
                // Dialled this listener itself: relaying would loop.
                Counters::bump(&counters.loops);
                return;
            } else {
                (Fallback::Relay(dst), STATUS_CAPTURED)
            }
        }
        Err(_) => {
            Counters::bump(&counters.fallback);
            (spec.fallback, STATUS_DIRECT)
        }
    };
    match target {
        Fallback::Respond => {
            Counters::bump(&counters.responded);
            let _ = bufs.responder.serve(&mut conn, status);
        }
        Fallback::Relay(dst) => match connect_upstream(spec.direction, dst) {
            Ok(up) => {
                Counters::bump(&counters.relayed);
                relay(&conn, &up, &mut bufs.relay);
            }
            Err(e) => {
                if counters.upstream_errors.fetch_add(1, Ordering::Relaxed) < 5 {
                    eprintln!("sidecar: connecting to {dst}: {e}");
                }
            }
        },
    }
}

/// Connects to `dst`: outbound as is, inbound from 127.0.0.6 (with
/// `IP_BIND_ADDRESS_NO_PORT`, so the port is picked at connect time).
fn connect_upstream(direction: Direction, dst: SocketAddr) -> io::Result<TcpStream> {
    let up = match (direction, dst) {
        (Direction::Inbound, SocketAddr::V4(_)) => {
            weir_tests::net::connect_from(PASSTHROUGH_SOURCE.into(), dst)?
        }
        _ => TcpStream::connect(dst)?,
    };
    up.set_nodelay(true)?;
    Ok(up)
}

/// Copies bytes both ways until both sides have closed, passing each EOF
/// on as a half close; any error ends both. One thread, `poll(2)` on both
/// sockets, blocking reads and writes (a write blocks only while the peer's
/// buffer is full, which the benchmark's one-direction-at-a-time traffic
/// never sustains in both directions at once).
fn relay(down: &TcpStream, up: &TcpStream, buf: &mut [u8]) {
    let mut open = [true, true];
    while open[0] || open[1] {
        let events = |o: bool| if o { libc::POLLIN } else { 0 };
        let mut fds = [
            libc::pollfd {
                fd: down.as_raw_fd(),
                events: events(open[0]),
                revents: 0,
            },
            libc::pollfd {
                fd: up.as_raw_fd(),
                events: events(open[1]),
                revents: 0,
            },
        ];
        // SAFETY: `fds` is a live array of two `pollfd`s, its length is
        // passed with it, and both descriptors stay open for the call
        // (borrowed from `down` and `up`).
        let rc = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
        if rc < 0 {
            if io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return;
        }
        let wake = libc::POLLIN | libc::POLLHUP | libc::POLLERR;
        let ready = [
            open[0] && fds[0].revents & wake != 0,
            open[1] && fds[1].revents & wake != 0,
        ];
        for (i, is_ready) in ready.into_iter().enumerate() {
            if !is_ready {
                continue;
            }
            let (mut from, mut to) = if i == 0 { (down, up) } else { (up, down) };
            match proto::read_retry(&mut from, buf) {
                Ok(0) => {
                    let _ = to.shutdown(std::net::Shutdown::Write);
                    open[i] = false;
                }
                Ok(n) => {
                    if to.write_all(&buf[..n]).is_err() {
                        return;
                    }
                }
                Err(_) => return,
            }
        }
    }
}

/// `weir-bench server`.
pub fn run_server(args: ServerArgs) -> Result<()> {
    if args.ports.is_empty() {
        bail!("give at least one --port");
    }
    let sigterm = block_sigterm()?;
    let counters = Arc::new(Counters::default());
    for &port in &args.ports {
        let addr = SocketAddr::from((Ipv4Addr::UNSPECIFIED, port));
        let listener: Arc<TcpListener> =
            Arc::new(proto::listen_tcp(addr).with_context(|| format!("listening on {addr}"))?);
        for _ in 0..args.threads.max(1) {
            let listener = listener.clone();
            let counters = counters.clone();
            std::thread::spawn(move || {
                let mut responder = Responder::new();
                loop {
                    match listener.accept() {
                        Ok((mut conn, _)) => {
                            Counters::bump(&counters.accepted);
                            let _ = conn.set_nodelay(true);
                            let _ = responder.serve(&mut conn, STATUS_SERVER);
                        }
                        Err(e) => {
                            eprintln!("server: accept on port {port}: {e}");
                            std::thread::sleep(std::time::Duration::from_millis(10));
                        }
                    }
                }
            });
        }
    }
    signal_ready(args.ready_file.as_ref())?;
    wait_and_report(sigterm, &counters)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_listen_specs() {
        assert_eq!(
            "15001:out:respond".parse::<ListenSpec>().unwrap(),
            ListenSpec {
                port: 15001,
                direction: Direction::Outbound,
                fallback: Fallback::Respond
            }
        );
        assert_eq!(
            "15006:in:198.18.1.3:8080".parse::<ListenSpec>().unwrap(),
            ListenSpec {
                port: 15006,
                direction: Direction::Inbound,
                fallback: Fallback::Relay("198.18.1.3:8080".parse().unwrap())
            }
        );
        assert!("15001:sideways:respond".parse::<ListenSpec>().is_err());
        assert!("15001:out".parse::<ListenSpec>().is_err());
        assert!("x:out:respond".parse::<ListenSpec>().is_err());
        assert!("1:out:nowhere".parse::<ListenSpec>().is_err());
    }

    #[test]
    fn relay_passes_bytes_and_half_closes() {
        use std::io::Read;
        let l1 = TcpListener::bind("127.0.0.1:0").unwrap();
        let l2 = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut client = TcpStream::connect(l1.local_addr().unwrap()).unwrap();
        let (down, _) = l1.accept().unwrap();
        let up = TcpStream::connect(l2.local_addr().unwrap()).unwrap();
        let (mut server, _) = l2.accept().unwrap();
        let t = std::thread::spawn(move || relay(&down, &up, &mut vec![0; 1024]));
        client.write_all(&vec![7u8; 100_000]).unwrap();
        client.shutdown(std::net::Shutdown::Write).unwrap();
        let mut got = Vec::new();
        server.read_to_end(&mut got).unwrap();
        assert_eq!(got.len(), 100_000);
        server.write_all(b"done").unwrap();
        drop(server);
        let mut reply = Vec::new();
        client.read_to_end(&mut reply).unwrap();
        assert_eq!(reply, b"done");
        t.join().unwrap();
    }
}
