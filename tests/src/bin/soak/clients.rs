//! Applications that keep many captured connections at once:
//!
//! - `hold`: opens N connections, each to its own original destination,
//!   checks every sidecar answer, and keeps them all open until SIGTERM;
//! - `flood`: starts N non-blocking connects to a proxy that accepts
//!   nothing yet (so every handshake stays in flight, each with its entry
//!   in `PENDING_FLOWS`), then, once the proxy accepts, judges every
//!   answer.
//!
//! Destination `j` of pod `k` is 198.19.`k`.(1 + j % 250):(20000 + j / 250):
//! every connection of a pod has its own, and the third octet names the
//! pod, so an answer carrying another connection's or another pod's
//! destination is caught.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream};
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Args;
use nix::errno::Errno;
use nix::sys::socket::{
    AddressFamily, SockFlag, SockType, SockaddrIn, connect, getpeername, getsockname, socket,
};
use serde::{Deserialize, Serialize};

use crate::proto::{self, Answer, Expect, Verdict, interrupted, judge, now_ms, read_line};

/// Destination `j` of pod `k`.
pub fn destination(k: u8, j: u64) -> SocketAddr {
    let host = 1 + (j % 250) as u8;
    let port = 20000 + (j / 250) as u16;
    SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::new(198, 19, k, host), port))
}

/// The pod index `k` of a destination written by [`destination`].
fn pod_index_of(dst: &str) -> Option<u8> {
    let ip: Ipv4Addr = dst.split(':').next()?.parse().ok()?;
    let o = ip.octets();
    (o[0] == 198 && o[1] == 19).then_some(o[2])
}

#[derive(Args, Debug)]
pub struct HoldArgs {
    /// This pod's index (third octet of its destinations).
    #[arg(long)]
    index: u8,
    /// This pod's name (whose sidecar must answer).
    #[arg(long)]
    pod: String,
    /// Connections to open and hold.
    #[arg(long)]
    count: u64,
    /// Connecting threads.
    #[arg(long, default_value_t = 4)]
    threads: u64,
    /// Connect and read timeout, ms.
    #[arg(long, default_value_t = 10000)]
    timeout_ms: u64,
    /// Summary (JSON), written once every connection was attempted; the
    /// connections stay open until SIGTERM.
    #[arg(long)]
    out: PathBuf,
}

/// What `hold` saw.
#[derive(Debug, Default, Serialize, Deserialize, Clone)]
pub struct HoldSummary {
    /// Connections attempted.
    pub attempted: u64,
    /// Connections open (established and answered) at the end.
    pub open: u64,
    /// By verdict.
    pub verdicts: BTreeMap<String, u64>,
    /// Errno of failures.
    pub errnos: BTreeMap<String, u64>,
    /// Answers naming another pod's destination.
    pub other_pod: u64,
    /// Up to 10 wrong answers.
    pub wrong_examples: Vec<String>,
    /// Seconds to open them all.
    pub elapsed_s: f64,
}

pub fn hold(args: HoldArgs) -> Result<()> {
    let started = now_ms();
    let next = Arc::new(AtomicU64::new(0));
    let args = Arc::new(args);
    let mut threads = Vec::new();
    for _ in 0..args.threads.max(1) {
        let (next, args) = (next.clone(), args.clone());
        threads.push(std::thread::spawn(move || {
            let mut s = HoldSummary::default();
            let mut open: Vec<TcpStream> = Vec::new();
            let timeout = Duration::from_millis(args.timeout_ms);
            let expect = Expect {
                listener: "outbound",
                pod: &args.pod,
            };
            loop {
                let j = next.fetch_add(1, Ordering::Relaxed);
                if j >= args.count || interrupted() {
                    break;
                }
                let dst = destination(args.index, j);
                s.attempted += 1;
                let (v, errno, detail, conn) = open_one(dst, &expect, timeout);
                *s.verdicts.entry(v.name().to_string()).or_default() += 1;
                if let Some(e) = errno {
                    *s.errnos.entry(e.to_string()).or_default() += 1;
                }
                if v == Verdict::WrongAnswer {
                    if detail.contains("orig_dst")
                        && let Some(k) = detail
                            .split("\"orig_dst\":\"")
                            .nth(1)
                            .and_then(|r| r.split('"').next())
                            .and_then(pod_index_of)
                        && k != args.index
                    {
                        s.other_pod += 1;
                    }
                    if s.wrong_examples.len() < 10 {
                        s.wrong_examples.push(format!("{dst}: {detail}"));
                    }
                }
                if let Some(c) = conn {
                    open.push(c);
                }
            }
            s.open = open.len() as u64;
            (s, open)
        }));
    }
    let mut total = HoldSummary::default();
    let mut held = Vec::new();
    for t in threads {
        let (s, open) = t
            .join()
            .map_err(|_| anyhow::anyhow!("hold thread panicked"))?;
        total.attempted += s.attempted;
        total.open += s.open;
        total.other_pod += s.other_pod;
        for (k, v) in s.verdicts {
            *total.verdicts.entry(k).or_default() += v;
        }
        for (k, v) in s.errnos {
            *total.errnos.entry(k).or_default() += v;
        }
        total
            .wrong_examples
            .extend(s.wrong_examples.into_iter().take(10));
        held.extend(open);
    }
    total.wrong_examples.truncate(10);
    total.elapsed_s = (now_ms() - started) / 1e3;
    proto::write_json(&args.out, &total)?;
    // Hold every connection until told to stop.
    while !interrupted() {
        std::thread::sleep(Duration::from_millis(50));
    }
    drop(held);
    Ok(())
}

fn open_one(
    dst: SocketAddr,
    expect: &Expect<'_>,
    timeout: Duration,
) -> (Verdict, Option<i32>, String, Option<TcpStream>) {
    let fd = match weir_tests::net::tcp_socket(dst, None) {
        Ok(fd) => fd,
        Err(e) => {
            return (
                Verdict::OtherError,
                e.raw_os_error(),
                format!("socket: {e}"),
                None,
            );
        }
    };
    let mut conn = match weir_tests::net::connect_socket(fd, dst, timeout) {
        Ok(c) => c,
        Err(e) => {
            return (
                Verdict::of_error(&e),
                e.raw_os_error(),
                format!("connect: {e}"),
                None,
            );
        }
    };
    let Ok(local) = conn.local_addr() else {
        return (Verdict::OtherError, None, "getsockname".into(), None);
    };
    let _ = conn.set_read_timeout(Some(timeout));
    let line = match read_line(&mut conn) {
        Ok(l) => l,
        Err(e) => {
            return (
                Verdict::of_error(&e),
                e.raw_os_error(),
                format!("read: {e}"),
                None,
            );
        }
    };
    let v = match serde_json::from_str::<Answer>(&line) {
        Ok(a) => judge(&a, expect, dst, local),
        Err(_) => Verdict::WrongAnswer,
    };
    let detail = if v == Verdict::Captured {
        String::new()
    } else {
        format!("local {local}, answer {line}")
    };
    (v, None, detail, Some(conn))
}

#[derive(Args, Debug)]
pub struct FloodArgs {
    /// This pod's index (third octet of its destinations).
    #[arg(long)]
    index: u8,
    /// This pod's name (whose sidecar must answer).
    #[arg(long)]
    pod: String,
    /// Handshakes to start.
    #[arg(long)]
    count: u64,
    /// Written (JSON) once every connect was started.
    #[arg(long)]
    flooded_file: PathBuf,
    /// Give up on connections not answered this many seconds after the
    /// flood.
    #[arg(long, default_value_t = 100)]
    wait_s: u64,
    /// Summary (JSON), written at the end.
    #[arg(long)]
    out: PathBuf,
}

/// How one flooded connection ended, in the order the connects were made.
#[derive(Debug, Default, Serialize, Deserialize, Clone)]
pub struct FloodSummary {
    /// Connects started.
    pub started: u64,
    /// Connects that failed at once (not EINPROGRESS), by errno.
    pub start_errors: BTreeMap<String, u64>,
    /// Seconds to start them all.
    pub flood_s: f64,
    /// Answered with this connection's original destination.
    pub correct: u64,
    /// The proxy's `SO_ORIGINAL_DST` failed (it answered with an errno), by errno.
    pub no_answer: BTreeMap<String, u64>,
    /// The proxy got its own listener's address (127.0.0.1:15001).
    pub own_listener: u64,
    /// The proxy got another connection's (or another pod's) destination.
    pub wrong: u64,
    /// Up to 10 of those.
    pub wrong_examples: Vec<String>,
    /// Connections that failed (refused, reset, timed out), by verdict.
    pub failed: BTreeMap<String, u64>,
    /// Not finished when the wait ended.
    pub unfinished: u64,
    /// For every outcome: the first and last connect index (issue order)
    /// that ended that way.
    pub index_ranges: BTreeMap<String, (u64, u64)>,
    /// Seconds from the end of the flood to the last answer.
    pub drain_s: f64,
    /// The application's `getpeername()` once the proxy's answer arrived,
    /// by what it named: `original` (the destination dialled), `proxy`
    /// (127.0.0.1:15001: the connection's `PENDING_FLOWS` entry was
    /// evicted, counted as `peer_lost`), `other` (anything else, or an
    /// error).
    pub peer: BTreeMap<String, u64>,
}

impl FloodSummary {
    fn note(&mut self, what: &str, j: u64) {
        let r = self.index_ranges.entry(what.to_string()).or_insert((j, j));
        r.0 = r.0.min(j);
        r.1 = r.1.max(j);
    }
}

struct Pending {
    j: u64,
    fd: OwnedFd,
    dst: SocketAddr,
    local: SocketAddr,
    buf: Vec<u8>,
}

pub fn flood(args: FloodArgs) -> Result<()> {
    let mut s = FloodSummary::default();
    let t0 = now_ms();
    let mut pending: Vec<Pending> = Vec::with_capacity(args.count as usize);
    for j in 0..args.count {
        if interrupted() {
            break;
        }
        let dst = destination(args.index, j);
        let fd = socket(
            AddressFamily::Inet,
            SockType::Stream,
            SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
            None,
        )
        .context("socket")?;
        let SocketAddr::V4(v4) = dst else {
            unreachable!("IPv4 destinations")
        };
        match connect(fd.as_raw_fd(), &SockaddrIn::from(v4)) {
            Err(Errno::EINPROGRESS) | Ok(()) => {}
            Err(e) => {
                *s.start_errors.entry((e as i32).to_string()).or_default() += 1;
                s.note("start_error", j);
                continue;
            }
        }
        s.started += 1;
        let local = getsockname::<SockaddrIn>(fd.as_raw_fd())
            .map(|a| SocketAddr::V4(SocketAddrV4::new(a.ip(), a.port())))
            .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)));
        pending.push(Pending {
            j,
            fd,
            dst,
            local,
            buf: Vec::new(),
        });
    }
    let flooded = now_ms();
    s.flood_s = (flooded - t0) / 1e3;
    proto::write_json(
        &args.flooded_file,
        &serde_json::json!({"started": s.started, "start_errors": s.start_errors}),
    )?;

    let deadline = flooded + args.wait_s as f64 * 1e3;
    let mut last_answer = flooded;
    while !pending.is_empty() && now_ms() < deadline && !interrupted() {
        let mut fds: Vec<libc::pollfd> = pending
            .iter()
            .map(|p| libc::pollfd {
                fd: p.fd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            })
            .collect();
        // SAFETY: `fds` is a live array of pollfd of the length passed.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, 200) };
        if n <= 0 {
            continue;
        }
        let mut keep = Vec::with_capacity(pending.len());
        for (mut p, pfd) in pending.into_iter().zip(fds.iter()) {
            if pfd.revents == 0 {
                keep.push(p);
                continue;
            }
            match finish(&mut p) {
                None => keep.push(p),
                Some(outcome) => {
                    last_answer = now_ms();
                    record(&mut s, &p, outcome);
                }
            }
        }
        pending = keep;
    }
    s.unfinished = pending.len() as u64;
    for p in &pending {
        s.note("unfinished", p.j);
    }
    s.drain_s = (last_answer - flooded) / 1e3;
    s.wrong_examples.truncate(10);
    proto::write_json(&args.out, &s)
}

enum Outcome {
    Answer(Answer),
    Failed(Verdict),
}

/// Reads what arrived on `p`; `None` while its answer is incomplete.
fn finish(p: &mut Pending) -> Option<Outcome> {
    let mut chunk = [0u8; 512];
    loop {
        // SAFETY: reading into a live buffer of the length passed.
        let n = unsafe {
            libc::read(
                p.fd.as_raw_fd(),
                chunk.as_mut_ptr().cast::<libc::c_void>(),
                chunk.len(),
            )
        };
        if n > 0 {
            p.buf.extend_from_slice(&chunk[..n as usize]);
            if let Some(end) = p.buf.iter().position(|&b| b == b'\n') {
                let line = String::from_utf8_lossy(&p.buf[..end]).into_owned();
                return Some(match serde_json::from_str::<Answer>(&line) {
                    Ok(a) => Outcome::Answer(a),
                    Err(_) => Outcome::Failed(Verdict::WrongAnswer),
                });
            }
            continue;
        }
        if n == 0 {
            return Some(Outcome::Failed(Verdict::Reset));
        }
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::EAGAIN) {
            return None;
        }
        return Some(Outcome::Failed(Verdict::of_error(&e)));
    }
}

fn record(s: &mut FloodSummary, p: &Pending, outcome: Outcome) {
    if matches!(outcome, Outcome::Answer(_)) {
        let what = match getpeername::<SockaddrIn>(p.fd.as_raw_fd()) {
            Ok(a) => {
                let peer = SocketAddr::V4(SocketAddrV4::new(a.ip(), a.port()));
                if peer == p.dst {
                    "original"
                } else if peer == SocketAddr::from(([127, 0, 0, 1], 15001)) {
                    "proxy"
                } else {
                    "other"
                }
            }
            Err(_) => "other",
        };
        *s.peer.entry(what.to_string()).or_default() += 1;
    }
    match outcome {
        Outcome::Failed(v) => {
            *s.failed.entry(v.name().to_string()).or_default() += 1;
            s.note(v.name(), p.j);
        }
        Outcome::Answer(a) => {
            let want = weir_tests::net::fmt_addr(p.dst);
            let peer = weir_tests::net::fmt_addr(p.local);
            if let Some(e) = a.errno {
                *s.no_answer.entry(e.to_string()).or_default() += 1;
                s.note("no_answer", p.j);
            } else if a.orig_dst.as_deref() == Some(want.as_str())
                && a.peer.as_deref() == Some(peer.as_str())
                && a.via == "sidecar"
            {
                s.correct += 1;
                s.note("correct", p.j);
            } else if a.orig_dst.as_deref() == Some("127.0.0.1:15001") {
                s.own_listener += 1;
                s.note("own_listener", p.j);
            } else {
                s.wrong += 1;
                s.note("wrong", p.j);
                s.wrong_examples.push(format!(
                    "#{} {want} from {peer}: answer {}",
                    p.j,
                    a.line().trim()
                ));
            }
        }
    }
}
