//! The processes the soak runs inside pods: the sidecar (answers every
//! captured connection with its `SO_ORIGINAL_DST`), the servers at the
//! original destinations (answer `direct`: capture was lost), a bare
//! listener for churned pods, and the continuous load generator.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Args;
use nix::sys::socket::{
    AddressFamily, SockFlag, SockType, SockaddrIn, bind, setsockopt, socket, sockopt,
};
use serde::Serialize;
use serde_json::json;

use crate::proto::{
    self, Answer, Expect, Verdict, answer_and_close, interrupted, judge, now_ms, read_line,
};

/// How long a listener waits for the client to close after answering.
const LINGER: Duration = Duration::from_secs(2);

/// A listening IPv4 TCP socket on 0.0.0.0:`port` with `backlog`.
fn listen_v4(port: u16, backlog: i32) -> Result<TcpListener> {
    let fd = socket(
        AddressFamily::Inet,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    setsockopt(&fd, sockopt::ReuseAddr, &true)?;
    bind(
        fd.as_raw_fd(),
        &SockaddrIn::from(std::net::SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, port)),
    )
    .with_context(|| format!("binding 0.0.0.0:{port}"))?;
    let l = TcpListener::from(fd);
    // listen(2) itself: the kernel caps the queue at net.core.somaxconn
    // (nix's Backlog refuses values above the default cap).
    relisten(&l, backlog).with_context(|| format!("listening on 0.0.0.0:{port}"))?;
    Ok(l)
}

/// Changes the accept queue length of a listening socket (listen(2) again
/// on a listening socket only updates its backlog).
fn relisten(l: &TcpListener, backlog: i32) -> Result<()> {
    // SAFETY: plain listen(2) on a descriptor we own.
    let rc = unsafe { libc::listen(l.as_raw_fd(), backlog) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error()).context("listen(2)");
    }
    Ok(())
}

#[derive(Args, Debug)]
pub struct SidecarArgs {
    /// Pod name, reported in each answer.
    #[arg(long)]
    name: String,
    /// The outbound listener's port.
    #[arg(long, default_value_t = 15001)]
    outbound_port: u16,
    /// The inbound listener's port.
    #[arg(long, default_value_t = 15006)]
    inbound_port: u16,
    /// Accepting threads per listener (answer-and-close mode).
    #[arg(long, default_value_t = 4)]
    workers: usize,
    /// Keep every connection open after answering (concurrent connections).
    #[arg(long)]
    hold: bool,
    /// Listen with a queue of one and accept nothing until this file
    /// exists (handshakes pile up in flight), then accept everything.
    #[arg(long)]
    stall_until: Option<PathBuf>,
    /// Listen queue length.
    #[arg(long, default_value_t = 65535)]
    backlog: i32,
    /// Write counters (JSON) to this file every 200 ms.
    #[arg(long)]
    stats: Option<PathBuf>,
    /// Created once both listeners listen.
    #[arg(long)]
    ready_file: PathBuf,
}

/// What a sidecar counted.
#[derive(Debug, Default)]
struct SidecarStats {
    accepted: AtomicU64,
    answered: AtomicU64,
    errno: AtomicU64,
    own_listener: AtomicU64,
}

pub fn sidecar(args: SidecarArgs) -> Result<()> {
    let stats = Arc::new(SidecarStats::default());
    let stalled = args.stall_until.is_some();
    let backlog = if stalled { 1 } else { args.backlog };
    let mut listeners = Vec::new();
    for (kind, port) in [
        ("outbound", args.outbound_port),
        ("inbound", args.inbound_port),
    ] {
        listeners.push((kind, port, Arc::new(listen_v4(port, backlog)?)));
    }
    proto::touch(&args.ready_file)?;
    if let Some(path) = args.stats.clone() {
        let stats = stats.clone();
        std::thread::spawn(move || {
            loop {
                let v = json!({
                    "accepted": stats.accepted.load(Ordering::Relaxed),
                    "answered": stats.answered.load(Ordering::Relaxed),
                    "errno": stats.errno.load(Ordering::Relaxed),
                    "own_listener": stats.own_listener.load(Ordering::Relaxed),
                });
                let _ = proto::write_json(&path, &v);
                std::thread::sleep(Duration::from_millis(200));
            }
        });
    }
    if let Some(trigger) = &args.stall_until {
        proto::wait_for_file(trigger, Duration::from_millis(5));
        for (_, _, l) in &listeners {
            relisten(l, args.backlog)?;
        }
    }
    let name: &'static str = args.name.leak();
    let mut threads = Vec::new();
    for (kind, port, listener) in listeners {
        let workers = if args.hold { 1 } else { args.workers.max(1) };
        let stalled = args.stall_until.is_some();
        for _ in 0..workers {
            let listener = listener.clone();
            let stats = stats.clone();
            // A stalled proxy has a backlog of thousands of handshakes to
            // answer at once: it answers and closes without waiting for
            // each client to close first.
            let mode = if args.hold {
                Mode::Hold
            } else if stalled {
                Mode::AnswerClose
            } else {
                Mode::AnswerLinger
            };
            threads.push(std::thread::spawn(move || {
                serve_sidecar(&listener, kind, port, name, mode, &stats)
            }));
        }
    }
    for t in threads {
        let _ = t.join();
    }
    Ok(())
}

/// What a sidecar does with a connection after answering it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    /// Wait for the client to close first (TIME_WAIT on its side).
    AnswerLinger,
    /// Close at once.
    AnswerClose,
    /// Keep it open.
    Hold,
}

fn serve_sidecar(
    listener: &TcpListener,
    kind: &'static str,
    port: u16,
    name: &str,
    mode: Mode,
    stats: &SidecarStats,
) {
    let mut held = Vec::new();
    loop {
        let conn = match listener.accept() {
            Ok((c, _)) => c,
            Err(e) => {
                eprintln!("sidecar {name}: accept on {port}: {e}");
                std::thread::sleep(Duration::from_millis(20));
                continue;
            }
        };
        stats.accepted.fetch_add(1, Ordering::Relaxed);
        let answer = Answer::sidecar(name, kind, &conn);
        if answer.errno.is_some() {
            stats.errno.fetch_add(1, Ordering::Relaxed);
        } else {
            stats.answered.fetch_add(1, Ordering::Relaxed);
            if answer
                .orig_dst
                .as_deref()
                .is_some_and(|d| d.ends_with(&format!(":{port}")))
            {
                stats.own_listener.fetch_add(1, Ordering::Relaxed);
            }
        }
        match mode {
            Mode::AnswerLinger => answer_and_close(conn, &answer, LINGER),
            Mode::AnswerClose | Mode::Hold => {
                use std::io::Write;
                let mut conn = conn;
                let _ = conn.write_all(answer.line().as_bytes());
                if mode == Mode::Hold {
                    held.push(conn);
                }
            }
        }
    }
}

#[derive(Args, Debug)]
pub struct DirectArgs {
    /// Name reported in each answer.
    #[arg(long)]
    name: String,
    /// Ports to listen on (0.0.0.0).
    #[arg(long, required = true)]
    port: Vec<u16>,
    /// Accepting threads per port.
    #[arg(long, default_value_t = 2)]
    workers: usize,
    /// Created once every port listens.
    #[arg(long)]
    ready_file: PathBuf,
}

/// A server at an original destination: it answers `direct`, so a client
/// that reaches it knows its connection escaped capture.
pub fn direct(args: DirectArgs) -> Result<()> {
    let mut listeners = Vec::new();
    for &port in &args.port {
        listeners.push(Arc::new(listen_v4(port, 4096)?));
    }
    proto::touch(&args.ready_file)?;
    let name: &'static str = args.name.leak();
    let mut threads = Vec::new();
    for l in listeners {
        for _ in 0..args.workers.max(1) {
            let l = l.clone();
            threads.push(std::thread::spawn(move || {
                loop {
                    if let Ok((conn, _)) = l.accept() {
                        let a = Answer::direct(name, &conn);
                        answer_and_close(conn, &a, LINGER);
                    }
                }
            }));
        }
    }
    for t in threads {
        let _ = t.join();
    }
    Ok(())
}

#[derive(Args, Debug)]
pub struct ListenArgs {
    /// Ports to listen on (0.0.0.0); connections are never accepted.
    #[arg(long, required = true)]
    port: Vec<u16>,
    /// Created once every port listens.
    #[arg(long)]
    ready_file: PathBuf,
}

/// A proxy that only listens (churned pods: its listeners must come and go
/// from `LISTENERS` with it).
pub fn listen(args: ListenArgs) -> Result<()> {
    let mut held = Vec::new();
    for &port in &args.port {
        held.push(listen_v4(port, 16)?);
    }
    proto::touch(&args.ready_file)?;
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

#[derive(Args, Debug)]
pub struct LoadArgs {
    /// Where the application connects (the original destination).
    #[arg(long)]
    target: SocketAddr,
    /// The sidecar listener that must answer: outbound or inbound.
    #[arg(long)]
    listener: String,
    /// The pod whose sidecar must answer.
    #[arg(long)]
    pod: String,
    /// Connecting threads.
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// Pause between two connections of a thread, microseconds.
    #[arg(long, default_value_t = 0)]
    pause_us: u64,
    /// Connect and read timeout, ms.
    #[arg(long, default_value_t = 3000)]
    timeout_ms: u64,
    /// Stop after this many attempts (default: until SIGTERM).
    #[arg(long)]
    count: Option<u64>,
    /// Summary (JSON), written when the load stops.
    #[arg(long)]
    out: PathBuf,
    /// One JSON line per attempt that was not captured, with its start and
    /// end on CLOCK_MONOTONIC (ms).
    #[arg(long)]
    events: PathBuf,
}

/// What a load generator saw.
#[derive(Debug, Default, Serialize, serde::Deserialize, Clone)]
pub struct LoadSummary {
    /// Connection attempts.
    pub attempted: u64,
    /// Attempts by verdict (snake-case names of [`Verdict`]).
    pub verdicts: BTreeMap<String, u64>,
    /// Errno of failed attempts.
    pub errnos: BTreeMap<String, u64>,
    /// Seconds the load ran.
    pub elapsed_s: f64,
}

impl LoadSummary {
    /// Attempts with verdict `v`.
    pub fn count(&self, v: Verdict) -> u64 {
        self.verdicts.get(v.name()).copied().unwrap_or(0)
    }
}

/// One attempt that was not captured.
#[derive(Debug, Serialize, serde::Deserialize, Clone)]
pub struct LoadEvent {
    /// Start, CLOCK_MONOTONIC ms.
    pub t0: f64,
    /// End, CLOCK_MONOTONIC ms.
    pub t1: f64,
    /// Verdict name.
    pub verdict: String,
    /// Errno, for failures.
    pub errno: Option<i32>,
    /// What went wrong.
    pub detail: String,
}

/// Connects to `target` once and judges the outcome.
pub fn attempt(
    target: SocketAddr,
    expect: &Expect<'_>,
    timeout: Duration,
) -> (Verdict, Option<i32>, String) {
    let fd = match weir_tests::net::tcp_socket(target, None) {
        Ok(fd) => fd,
        Err(e) => {
            return (
                Verdict::OtherError,
                e.raw_os_error(),
                format!("socket: {e}"),
            );
        }
    };
    let mut conn = match weir_tests::net::connect_socket(fd, target, timeout) {
        Ok(c) => c,
        Err(e) => {
            return (
                Verdict::of_error(&e),
                e.raw_os_error(),
                format!("connect: {e}"),
            );
        }
    };
    let local = match conn.local_addr() {
        Ok(a) => a,
        Err(e) => {
            return (
                Verdict::OtherError,
                e.raw_os_error(),
                format!("getsockname: {e}"),
            );
        }
    };
    let _ = conn.set_read_timeout(Some(timeout));
    let line = match read_line(&mut conn) {
        Ok(l) => l,
        Err(e) => {
            return (
                Verdict::of_error(&e),
                e.raw_os_error(),
                format!("read: {e}"),
            );
        }
    };
    let answer: Answer = match serde_json::from_str(&line) {
        Ok(a) => a,
        Err(e) => {
            return (
                Verdict::WrongAnswer,
                None,
                format!("garbled answer {line:?}: {e}"),
            );
        }
    };
    let v = judge(&answer, expect, target, local);
    let detail = if v == Verdict::Captured {
        String::new()
    } else {
        format!("local {local}, answer {line}")
    };
    (v, None, detail)
}

pub fn load(args: LoadArgs) -> Result<()> {
    let started = now_ms();
    let stop = Arc::new(AtomicBool::new(false));
    let issued = Arc::new(AtomicU64::new(0));
    let events = Arc::new(std::sync::Mutex::new(
        std::fs::File::create(&args.events)
            .with_context(|| format!("creating {}", args.events.display()))?,
    ));
    let args = Arc::new(args);
    let mut threads = Vec::new();
    for _ in 0..args.threads.max(1) {
        let (stop, issued, events, args) =
            (stop.clone(), issued.clone(), events.clone(), args.clone());
        threads.push(std::thread::spawn(move || {
            let mut s = LoadSummary::default();
            let timeout = Duration::from_millis(args.timeout_ms);
            let expect = Expect {
                listener: &args.listener,
                pod: &args.pod,
            };
            while !stop.load(Ordering::Relaxed) && !interrupted() {
                if let Some(max) = args.count
                    && issued.fetch_add(1, Ordering::Relaxed) >= max
                {
                    break;
                }
                let t0 = now_ms();
                let (v, errno, detail) = attempt(args.target, &expect, timeout);
                let t1 = now_ms();
                s.attempted += 1;
                *s.verdicts.entry(v.name().to_string()).or_default() += 1;
                if let Some(e) = errno {
                    *s.errnos.entry(e.to_string()).or_default() += 1;
                }
                if v != Verdict::Captured {
                    let ev = LoadEvent {
                        t0,
                        t1,
                        verdict: v.name().to_string(),
                        errno,
                        detail,
                    };
                    let mut line = serde_json::to_string(&ev).unwrap_or_default();
                    line.push('\n');
                    let mut f = events.lock().unwrap_or_else(|p| p.into_inner());
                    use std::io::Write;
                    let _ = f.write_all(line.as_bytes());
                }
                if args.pause_us > 0 {
                    std::thread::sleep(Duration::from_micros(args.pause_us));
                }
            }
            s
        }));
    }
    let mut total = LoadSummary::default();
    for t in threads {
        let s = t
            .join()
            .map_err(|_| anyhow::anyhow!("load thread panicked"))?;
        total.attempted += s.attempted;
        for (k, v) in s.verdicts {
            *total.verdicts.entry(k).or_default() += v;
        }
        for (k, v) in s.errnos {
            *total.errnos.entry(k).or_default() += v;
        }
    }
    stop.store(true, Ordering::Relaxed);
    total.elapsed_s = (now_ms() - started) / 1e3;
    proto::write_json(&args.out, &total)
}

/// Reads a load generator's event lines.
pub fn read_events(path: &std::path::Path) -> Vec<LoadEvent> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}
