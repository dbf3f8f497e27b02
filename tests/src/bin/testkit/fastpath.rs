//! Traffic for the fast-path tests: a server and a client that check every
//! byte of a stream and say how the stream ended.
//!
//! The client opens the connection with one header line naming what the
//! server should do (`echo`, `sink`, `splice-sink`, `close-after N`,
//! `waitall N`, `hold MS`), then runs its scenario and prints one JSON line.
//! The data is a fixed pattern of the byte offset, so either end can check
//! order and content without the other's copy. The server logs one JSON
//! line per connection.

use std::fs::File;
use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Args;
use serde_json::{Value, json};
use weir_tests::net;

use crate::JsonLog;

/// How long one read or write may block before the stream counts as hung
/// (10 s, times `WEIR_TEST_TIMEOUT_SCALE` on an emulated kernel, where a
/// test's agent restart between two rounds takes longer than that).
fn io_timeout() -> Duration {
    weir_tests::patience(Duration::from_secs(10))
}

/// Reads the way event-loop programs (Envoy) do: wait for readability
/// with poll(2), then read, and go back to waiting on `EAGAIN`. On the fast
/// path a blocking read can return `EAGAIN` when the socket is woken
/// without data (a state change, another thread's write): a kernel
/// behaviour of sockmap sockets, documented, and checked separately by the
/// `blocking-signal` scenario.
struct Polled<'a>(&'a TcpStream);

impl Read for Polled<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let deadline = Instant::now() + io_timeout();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if !wait_readable(self.0, left)? {
                return Err(io::ErrorKind::TimedOut.into());
            }
            match (&mut &*self.0).read(buf) {
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                    ) => {}
                other => return other,
            }
        }
    }
}

/// poll(2) for `POLLIN` (or hang-up/error) up to `timeout`; false on
/// timeout.
fn wait_readable(s: &impl AsRawFd, timeout: Duration) -> io::Result<bool> {
    let mut pfd = libc::pollfd {
        fd: s.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    loop {
        // SAFETY: one live pollfd, its count passed with it.
        let rc = unsafe { libc::poll(&mut pfd, 1, timeout.as_millis() as i32) };
        if rc >= 0 {
            return Ok(rc > 0);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}
/// Sizes of successive writes in the default (`--chunk 0`) mode: from one
/// byte to a megabyte, so message boundaries fall everywhere.
const CHUNKS: &[usize] = &[1, 3, 17, 100, 1460, 4096, 65_536, 1 << 20, 7, 250_000];

/// Byte `i` of the test stream.
fn pattern(i: u64) -> u8 {
    (i.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 56) as u8 ^ (i as u8)
}

fn fill(buf: &mut [u8], offset: u64) {
    for (k, b) in buf.iter_mut().enumerate() {
        *b = pattern(offset + k as u64);
    }
}

/// Checks received bytes against the pattern: counts them and remembers the
/// first offset that differs.
#[derive(Default)]
struct Checker {
    bytes: u64,
    mismatch: Option<u64>,
}

impl Checker {
    fn feed(&mut self, data: &[u8]) {
        if self.mismatch.is_none()
            && let Some(k) = data
                .iter()
                .enumerate()
                .position(|(k, b)| *b != pattern(self.bytes + k as u64))
        {
            self.mismatch = Some(self.bytes + k as u64);
        }
        self.bytes += data.len() as u64;
    }
}

/// How a read loop ended.
fn end_of(e: &io::Error) -> String {
    match e.raw_os_error() {
        Some(libc::ECONNRESET) => "reset".into(),
        Some(libc::EPIPE) => "epipe".into(),
        Some(libc::EAGAIN) => "timeout".into(),
        _ if e.kind() == io::ErrorKind::TimedOut => "timeout".into(),
        _ => format!("error: {e}"),
    }
}

/// Reads until EOF or an error, checking the pattern; returns the checker
/// and how it ended (`eof`, `reset`, `timeout`, `error: ...`).
fn read_all(s: &mut impl Read, buf: &mut [u8]) -> (Checker, String) {
    let mut c = Checker::default();
    let end = read_into(s, buf, &mut c);
    (c, end)
}

/// [`read_all`] continuing an existing checker.
fn read_into(s: &mut impl Read, buf: &mut [u8], c: &mut Checker) -> String {
    loop {
        match s.read(buf) {
            Ok(0) => return "eof".into(),
            Ok(n) => c.feed(&buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return end_of(&e),
        }
    }
}

/// Reads up to and including `\n`, one byte at a time (the rest of the
/// stream stays in the socket, for splice).
fn read_line(s: &TcpStream) -> io::Result<String> {
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    loop {
        match Polled(s).read(&mut b)? {
            0 => return Err(io::ErrorKind::UnexpectedEof.into()),
            _ if b[0] == b'\n' => return Ok(String::from_utf8_lossy(&line).into_owned()),
            _ if line.len() > 256 => return Err(io::ErrorKind::InvalidData.into()),
            _ => line.push(b[0]),
        }
    }
}

/// Writes never block longer than [`io_timeout`]; reads are bounded by
/// [`Polled`].
fn timeouts(s: &TcpStream) -> io::Result<()> {
    s.set_write_timeout(Some(io_timeout()))
}

/// Payload bytes TCP itself carried on `s`: `(received, acked)`, from
/// `TCP_INFO`. On the fast path both stay 0 (the bytes never enter TCP).
fn tcp_bytes(s: &impl AsFd) -> (u64, u64) {
    // SAFETY: tcp_info is plain old data; getsockopt writes at most `len`
    // bytes into it and updates `len`.
    unsafe {
        let mut info: libc::tcp_info = std::mem::zeroed();
        let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
        let rc = libc::getsockopt(
            s.as_fd().as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&mut info as *mut libc::tcp_info).cast(),
            &mut len,
        );
        if rc != 0 {
            return (u64::MAX, u64::MAX);
        }
        (info.tcpi_bytes_received, info.tcpi_bytes_acked)
    }
}

// ---------------------------------------------------------------------------
// Server
// ---------------------------------------------------------------------------

#[derive(Args, Debug)]
pub(crate) struct FastServerArgs {
    /// Port to listen on (IPv4, and IPv6 when available).
    #[arg(long)]
    port: u16,
    /// Append one JSON record per connection to this file (default: stdout).
    #[arg(long)]
    pub(crate) log: Option<PathBuf>,
    /// Create this file once listening.
    #[arg(long)]
    ready_file: Option<PathBuf>,
}

pub(crate) fn serve(args: FastServerArgs, log: JsonLog) -> Result<()> {
    let mut listeners = vec![
        net::listen(SocketAddr::from((Ipv4Addr::UNSPECIFIED, args.port)), None)
            .with_context(|| format!("listening on port {}", args.port))?,
    ];
    if net::ipv6_available()
        && let Ok(l) = net::listen(
            SocketAddr::from((Ipv6Addr::UNSPECIFIED, args.port)),
            Some(true),
        )
    {
        listeners.push(l);
    }
    crate::signal_ready(args.ready_file.as_ref())?;
    let mut threads = Vec::new();
    for l in listeners {
        let log = log.clone();
        threads.push(std::thread::spawn(move || accept_loop(l, log)));
    }
    for t in threads {
        let _ = t.join();
    }
    Ok(())
}

fn accept_loop(l: TcpListener, log: JsonLog) {
    loop {
        match l.accept() {
            Ok((conn, _)) => {
                let log = log.clone();
                std::thread::spawn(move || {
                    let record = serve_one(conn);
                    log.write(&record);
                });
            }
            Err(e) => {
                eprintln!("fast-server: accept: {e}");
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

fn serve_one(mut s: TcpStream) -> Value {
    let peer = s.peer_addr().ok().map(net::fmt_addr);
    if let Err(e) = timeouts(&s) {
        return json!({"peer": peer, "error": e.to_string()});
    }
    let header = match read_line(&s) {
        Ok(h) => h,
        Err(e) => return json!({"peer": peer, "error": format!("header: {e}")}),
    };
    let mut words = header.split_whitespace();
    let what = words.next().unwrap_or_default().to_string();
    let arg: u64 = words.next().and_then(|w| w.parse().ok()).unwrap_or(0);
    let mut buf = vec![0u8; 256 * 1024];
    let mut record = json!({"peer": peer, "scenario": what});
    match what.as_str() {
        "echo" => {
            let mut c = Checker::default();
            let end = loop {
                match Polled(&s).read(&mut buf) {
                    Ok(0) => {
                        let _ = s.shutdown(Shutdown::Write);
                        break "eof".to_string();
                    }
                    Ok(n) => {
                        c.feed(&buf[..n]);
                        if let Err(e) = s.write_all(&buf[..n]) {
                            break end_of(&e);
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => break end_of(&e),
                }
            };
            record["bytes"] = json!(c.bytes);
            record["mismatch"] = json!(c.mismatch);
            record["end"] = json!(end);
        }
        "sink" | "splice-sink" | "waitall" => {
            let mut first_recv = None;
            if what == "waitall" {
                // One recv(MSG_WAITALL) of `arg` bytes: it must not return
                // before all of them are there.
                let want = (arg as usize).min(buf.len());
                let _ = s.set_read_timeout(Some(io_timeout()));
                // SAFETY: recv writes at most `want` bytes into `buf`.
                let n = unsafe {
                    libc::recv(
                        s.as_raw_fd(),
                        buf.as_mut_ptr().cast(),
                        want,
                        libc::MSG_WAITALL,
                    )
                };
                first_recv = Some(n);
            }
            let mut c = Checker::default();
            if let Some(n) = first_recv.filter(|n| *n > 0) {
                c.feed(&buf[..n as usize]);
            }
            let end = if what == "splice-sink" {
                splice_read_all(&s, &mut buf, &mut c)
            } else {
                read_into(&mut Polled(&s), &mut buf, &mut c)
            };
            record["bytes"] = json!(c.bytes);
            record["mismatch"] = json!(c.mismatch);
            record["end"] = json!(end);
            record["first_recv"] = json!(first_recv);
            // The reply goes back over the half-closed connection.
            let reply = format!("{record}\n");
            record["reply_error"] = json!(s.write_all(reply.as_bytes()).err().map(|e| end_of(&e)));
        }
        "close-after" => {
            let mut c = Checker::default();
            let mut end = "closed".to_string();
            while c.bytes < arg {
                let want = ((arg - c.bytes) as usize).min(buf.len());
                match Polled(&s).read(&mut buf[..want]) {
                    Ok(0) => {
                        end = "eof".into();
                        break;
                    }
                    Ok(n) => c.feed(&buf[..n]),
                    Err(e) => {
                        end = end_of(&e);
                        break;
                    }
                }
            }
            record["bytes"] = json!(c.bytes);
            record["mismatch"] = json!(c.mismatch);
            record["end"] = json!(end);
            // Closed with the rest of the client's bytes unread.
        }
        "hold" => {
            std::thread::sleep(Duration::from_millis(arg));
            record["end"] = json!("closed");
        }
        other => record["error"] = json!(format!("unknown scenario {other:?}")),
    }
    record
}

/// Reads the socket with splice(2) into a pipe (as splice-based proxies
/// do) until EOF, an error, or nothing for [`io_timeout`].
fn splice_read_all(s: &TcpStream, buf: &mut [u8], c: &mut Checker) -> String {
    let (rd, wr) = match pipe() {
        Ok(p) => p,
        Err(e) => return format!("error: pipe: {e}"),
    };
    let mut rd = File::from(rd);
    loop {
        let mut pfd = libc::pollfd {
            fd: s.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one live pollfd, its count passed with it.
        let rc = unsafe { libc::poll(&mut pfd, 1, io_timeout().as_millis() as i32) };
        if rc == 0 {
            return "timeout".into();
        }
        // SAFETY: splice between two descriptors we hold; no offsets.
        let n = unsafe {
            libc::splice(
                s.as_raw_fd(),
                std::ptr::null_mut(),
                wr.as_raw_fd(),
                std::ptr::null_mut(),
                64 * 1024,
                libc::SPLICE_F_NONBLOCK,
            )
        };
        match n {
            0 => return "eof".into(),
            n if n < 0 => {
                let e = io::Error::last_os_error();
                if e.raw_os_error() == Some(libc::EAGAIN) {
                    continue;
                }
                return end_of(&e);
            }
            n => {
                let mut left = n as usize;
                while left > 0 {
                    let want = left.min(buf.len());
                    match rd.read(&mut buf[..want]) {
                        Ok(k) if k > 0 => {
                            c.feed(&buf[..k]);
                            left -= k;
                        }
                        Ok(_) => return "error: pipe closed".into(),
                        Err(e) => return format!("error: pipe: {e}"),
                    }
                }
            }
        }
    }
}

fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: pipe2 writes two descriptors into `fds`, which we then own.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fresh descriptors owned by nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

// ---------------------------------------------------------------------------
// Client
// ---------------------------------------------------------------------------

#[derive(Args, Debug)]
pub(crate) struct FastClientArgs {
    /// Address to connect to.
    #[arg(long)]
    connect: SocketAddr,
    /// echo, half-close, sendfile, splice-send, splice-recv, peer-closes,
    /// abort, waitall, flood, rounds, blocking-signal.
    #[arg(long)]
    scenario: String,
    /// Bytes of the stream.
    #[arg(long, default_value_t = 8 << 20)]
    bytes: u64,
    /// Size of each write; 0 cycles through sizes from 1 byte to 1 MiB.
    #[arg(long, default_value_t = 0)]
    chunk: usize,
    /// peer-closes: the server closes after reading this many bytes.
    #[arg(long, default_value_t = 64 * 1024)]
    close_after: u64,
    /// rounds: echo exchanges on one connection.
    #[arg(long, default_value_t = 1)]
    rounds: u32,
    /// rounds: before round N (from 2), wait until `<go-prefix>N` exists.
    #[arg(long)]
    go_prefix: Option<PathBuf>,
}

pub(crate) fn client(args: FastClientArgs) -> Result<()> {
    let started = Instant::now();
    let mut s = net::connect_timeout(None, args.connect, io_timeout())
        .with_context(|| format!("connecting to {}", args.connect))?;
    timeouts(&s)?;
    let local = s.local_addr().ok().map(net::fmt_addr);
    let mut out = match args.scenario.as_str() {
        "echo" => echo(&mut s, &args)?,
        "half-close" => sink_with(&mut s, "sink", |s| write_pattern(s, args.bytes, args.chunk))?,
        "splice-recv" => sink_with(&mut s, "splice-sink", |s| {
            write_pattern(s, args.bytes, args.chunk)
        })?,
        "sendfile" => sink_with(&mut s, "sink", |s| send_file(s, args.bytes))?,
        "splice-send" => sink_with(&mut s, "sink", |s| splice_send(s, args.bytes))?,
        "waitall" => sink_with(&mut s, &format!("waitall {}", args.bytes), |s| {
            // Ten pieces, apart: a short recv would return the first.
            let piece = (args.bytes / 10).max(1);
            let mut sent = 0;
            while sent < args.bytes {
                let n = piece.min(args.bytes - sent);
                let mut b = vec![0u8; n as usize];
                fill(&mut b, sent);
                s.write_all(&b)?;
                sent += n;
                std::thread::sleep(Duration::from_millis(20));
            }
            Ok(sent)
        })?,
        "peer-closes" => peer_closes(&mut s, &args)?,
        "abort" => {
            s.write_all(b"sink\n")?;
            let sent = write_pattern(&mut s, args.bytes, args.chunk)?;
            // SO_LINGER 0: close() resets the connection.
            let linger = libc::linger {
                l_onoff: 1,
                l_linger: 0,
            };
            // SAFETY: setsockopt reads `size_of::<linger>()` bytes.
            unsafe {
                libc::setsockopt(
                    s.as_raw_fd(),
                    libc::SOL_SOCKET,
                    libc::SO_LINGER,
                    (&linger as *const libc::linger).cast(),
                    std::mem::size_of::<libc::linger>() as libc::socklen_t,
                );
            }
            json!({"sent": sent})
        }
        "flood" => flood(&mut s, args.bytes)?,
        "blocking-signal" => blocking_signal(&mut s)?,
        "rounds" => rounds(&mut s, &args)?,
        other => bail!("unknown scenario {other:?}"),
    };
    let (rx, acked) = tcp_bytes(&s);
    out["local"] = json!(local);
    out["tcp_bytes_received"] = json!(rx);
    out["tcp_bytes_acked"] = json!(acked);
    out["elapsed_ms"] = json!(started.elapsed().as_millis() as u64);
    println!("{out}");
    Ok(())
}

/// Writes `bytes` of the pattern in `chunk`-sized writes (0: [`CHUNKS`]).
fn write_pattern(s: &mut impl Write, bytes: u64, chunk: usize) -> io::Result<u64> {
    let biggest = if chunk == 0 {
        *CHUNKS.iter().max().unwrap_or(&1)
    } else {
        chunk
    };
    let mut buf = vec![0u8; biggest];
    let mut sent = 0u64;
    let mut i = 0;
    while sent < bytes {
        let size = if chunk == 0 {
            CHUNKS[i % CHUNKS.len()]
        } else {
            chunk
        };
        i += 1;
        let n = (size as u64).min(bytes - sent) as usize;
        fill(&mut buf[..n], sent);
        s.write_all(&buf[..n])?;
        sent += n as u64;
    }
    Ok(sent)
}

/// Sends the pattern from a writer thread, half-closes, and checks what
/// comes back.
fn echo(s: &mut TcpStream, args: &FastClientArgs) -> Result<Value> {
    s.write_all(b"echo\n")?;
    let mut w = s.try_clone()?;
    let (bytes, chunk) = (args.bytes, args.chunk);
    let writer = std::thread::spawn(move || {
        let r = write_pattern(&mut w, bytes, chunk);
        let _ = w.shutdown(Shutdown::Write);
        r
    });
    let (c, end) = read_all(&mut Polled(s), &mut vec![0u8; 256 * 1024]);
    let sent = writer
        .join()
        .map_err(|_| anyhow::anyhow!("writer panicked"))?;
    let ok = sent.as_ref().is_ok_and(|n| *n == bytes)
        && c.bytes == bytes
        && c.mismatch.is_none()
        && end == "eof";
    Ok(json!({
        "ok": ok,
        "sent": sent.as_ref().ok(),
        "write_error": sent.err().map(|e| end_of(&e)),
        "received": c.bytes,
        "mismatch": c.mismatch,
        "end": end,
    }))
}

/// Sends a header and a stream (`send`), half-closes, then reads the
/// server's one-line verdict until EOF.
fn sink_with(
    s: &mut TcpStream,
    header: &str,
    send: impl FnOnce(&mut TcpStream) -> io::Result<u64>,
) -> Result<Value> {
    s.write_all(format!("{header}\n").as_bytes())?;
    let sent = send(s);
    s.shutdown(Shutdown::Write)?;
    let mut reply = Vec::new();
    let end = match Polled(s).read_to_end(&mut reply) {
        Ok(_) => "eof".to_string(),
        Err(e) => end_of(&e),
    };
    let server: Value = serde_json::from_slice(&reply).unwrap_or(Value::Null);
    let ok = sent
        .as_ref()
        .is_ok_and(|n| Some(*n) == server["bytes"].as_u64())
        && server["mismatch"].is_null()
        && server["end"] == "eof"
        && end == "eof";
    Ok(json!({
        "ok": ok,
        "sent": sent.as_ref().ok(),
        "write_error": sent.err().map(|e| end_of(&e)),
        "server": server,
        "end": end,
    }))
}

/// sendfile(2) of a file holding `bytes` of the pattern.
fn send_file(s: &mut TcpStream, bytes: u64) -> io::Result<u64> {
    let path = std::env::temp_dir().join(format!("weir-fastpath-{}.bin", std::process::id()));
    {
        let mut f = File::create(&path)?;
        write_pattern(&mut f, bytes, 1 << 20)?;
    }
    let f = File::open(&path);
    let _ = std::fs::remove_file(&path);
    let f = f?;
    let mut sent = 0u64;
    while sent < bytes {
        let left = (bytes - sent).min(1 << 30) as usize;
        // SAFETY: sendfile between descriptors we hold; the kernel keeps
        // the file offset (NULL offset pointer).
        let n = unsafe { libc::sendfile(s.as_raw_fd(), f.as_raw_fd(), std::ptr::null_mut(), left) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if n == 0 {
            break;
        }
        sent += n as u64;
    }
    Ok(sent)
}

/// splice(2) from a pipe that a thread fills with the pattern.
fn splice_send(s: &mut TcpStream, bytes: u64) -> io::Result<u64> {
    let (rd, wr) = pipe()?;
    let filler = std::thread::spawn(move || {
        let mut wr = File::from(wr);
        write_pattern(&mut wr, bytes, 64 * 1024)
    });
    let mut sent = 0u64;
    while sent < bytes {
        // SAFETY: splice between descriptors we hold; no offsets.
        let n = unsafe {
            libc::splice(
                rd.as_raw_fd(),
                std::ptr::null_mut(),
                s.as_raw_fd(),
                std::ptr::null_mut(),
                ((bytes - sent) as usize).min(1 << 20),
                libc::SPLICE_F_MORE,
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if n == 0 {
            break;
        }
        sent += n as u64;
    }
    let _ = filler.join();
    Ok(sent)
}

/// The server reads a little and closes; we go on writing, then read.
fn peer_closes(s: &mut TcpStream, args: &FastClientArgs) -> Result<Value> {
    s.write_all(format!("close-after {}\n", args.close_after).as_bytes())?;
    let mut buf = vec![0u8; 64 * 1024];
    let mut sent = 0u64;
    let mut write_error = None;
    while sent < args.bytes {
        let n = (buf.len() as u64).min(args.bytes - sent) as usize;
        fill(&mut buf[..n], sent);
        match s.write(&buf[..n]) {
            Ok(k) => sent += k as u64,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                write_error = Some(end_of(&e));
                break;
            }
        }
    }
    let (c, end) = read_all(&mut Polled(s), &mut buf);
    Ok(json!({
        "sent": sent,
        "write_error": write_error,
        "received": c.bytes,
        "end": end,
    }))
}

/// Non-blocking writes into a server that does not read, until the socket
/// pushes back (`EAGAIN`) or `bytes` were taken.
fn flood(s: &mut TcpStream, bytes: u64) -> Result<Value> {
    s.write_all(b"hold 3000\n")?;
    s.set_nonblocking(true)?;
    let buf = vec![0x5a_u8; 64 * 1024];
    let mut taken = 0u64;
    let mut stop = "limit".to_string();
    while taken < bytes {
        match s.write(&buf) {
            Ok(n) => taken += n as u64,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                stop = "would_block".into();
                break;
            }
            Err(e) => {
                stop = end_of(&e);
                break;
            }
        }
    }
    s.set_nonblocking(false)?;
    Ok(json!({"taken": taken, "stop": stop}))
}

extern "C" fn ignore_signal(_: libc::c_int) {}

/// A plain blocking read (no poll, no timeout) on a connection whose server
/// says nothing for a second and then closes, interrupted after 200 ms by a
/// signal whose handler has `SA_RESTART`: TCP restarts the read, which then
/// returns EOF; reports what the read returned (`eof`, `eagain`, ...).
fn blocking_signal(s: &mut TcpStream) -> Result<Value> {
    s.write_all(b"hold 1000\n")?;
    // SAFETY: installs a handler that does nothing (async-signal-safe);
    // `sa` is fully initialised before the call.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = ignore_signal as *const () as libc::sighandler_t;
        sa.sa_flags = libc::SA_RESTART;
        libc::sigemptyset(&mut sa.sa_mask);
        if libc::sigaction(libc::SIGUSR1, &sa, std::ptr::null_mut()) != 0 {
            bail!("sigaction: {}", io::Error::last_os_error());
        }
    }
    // SAFETY: plain query of the calling thread's id.
    let me = unsafe { libc::pthread_self() };
    let me = me as usize;
    let kicker = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(200));
        // SAFETY: the reading thread is alive until this thread is joined.
        unsafe { libc::pthread_kill(me as libc::pthread_t, libc::SIGUSR1) };
    });
    let started = Instant::now();
    let mut b = [0u8; 64];
    let first = match s.read(&mut b) {
        Ok(0) => "eof".to_string(),
        Ok(n) => format!("data {n}"),
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => "eagain".to_string(),
        Err(e) => end_of(&e),
    };
    let after_ms = started.elapsed().as_millis() as u64;
    let _ = kicker.join();
    Ok(json!({"first_read": first, "after_ms": after_ms}))
}

/// Several echo exchanges on one connection, each after its go file (so a
/// test can restart the agent in between). Prints a line per round.
fn rounds(s: &mut TcpStream, args: &FastClientArgs) -> Result<Value> {
    s.write_all(b"echo\n")?;
    let mut buf = vec![0u8; 256 * 1024];
    let mut offset = 0u64;
    let mut results = Vec::new();
    for round in 1..=args.rounds {
        if round > 1
            && let Some(prefix) = &args.go_prefix
        {
            let go = PathBuf::from(format!("{}{round}", prefix.display()));
            let deadline = Instant::now() + Duration::from_secs(60);
            while !go.exists() {
                if Instant::now() > deadline {
                    bail!("no {} within 60 s", go.display());
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        // One exchange: send a piece, read it back.
        let n = args.bytes.min(buf.len() as u64) as usize;
        fill(&mut buf[..n], offset);
        s.write_all(&buf[..n])?;
        let mut c = Checker {
            bytes: offset,
            mismatch: None,
        };
        let mut got = 0;
        while got < n {
            match Polled(s).read(&mut buf[got..n]) {
                Ok(0) => break,
                Ok(k) => got += k,
                Err(e) => {
                    results.push(json!({"round": round, "error": end_of(&e)}));
                    println!("round {round} failed");
                    return Ok(json!({"ok": false, "rounds": results}));
                }
            }
        }
        c.feed(&buf[..got]);
        offset += n as u64;
        let ok = got == n && c.mismatch.is_none();
        let (rx, _) = tcp_bytes(s);
        results.push(json!({"round": round, "ok": ok, "tcp_bytes_received": rx}));
        println!("round {round} {}", if ok { "ok" } else { "failed" });
        let _ = io::stdout().flush();
    }
    s.shutdown(Shutdown::Write)?;
    let (_, end) = read_all(&mut Polled(s), &mut buf);
    let ok = results.iter().all(|r| r["ok"] == true) && end == "eof";
    Ok(json!({"ok": ok, "rounds": results, "end": end}))
}
