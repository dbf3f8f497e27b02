//! The load generator: a fixed amount of work, timed with `Instant`, one
//! JSON line of results on stdout.
//!
//! Blocking sockets, one thread per concurrent connection (`crr`) or a
//! single thread (`rr`, `bulk`), every buffer allocated before the clock
//! starts. Failed connections are counted, not retried, and reported.

use std::io::{self, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Subcommand;
use serde_json::{Value, json};

use crate::proto::{self, HEADER_LEN, STATUS_CAPTURED, STATUS_DIRECT, STATUS_SERVER};
use crate::stats;

/// How long a single connect, read or write may block.
const IO_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Subcommand, Debug)]
pub enum LoadKind {
    /// Connection rate (TCP_CRR-like): connect, one request/response,
    /// close; repeated `--conns` times over `--threads` threads.
    Crr {
        /// Address to dial.
        #[arg(long)]
        connect: SocketAddr,
        /// Connections in total.
        #[arg(long)]
        conns: u64,
        /// Concurrent connections (one thread each).
        #[arg(long, default_value_t = 1)]
        threads: u64,
        /// Request size in bytes (at least the 16-byte header).
        #[arg(long, default_value_t = 64)]
        req: usize,
        /// Response size in bytes.
        #[arg(long, default_value_t = 64)]
        resp: usize,
        /// Bind each socket to this source address first (the port is
        /// picked at connect time, `IP_BIND_ADDRESS_NO_PORT`).
        #[arg(long)]
        bind: Option<std::net::Ipv4Addr>,
    },
    /// Request latency (TCP_RR-like): one connection, `--requests`
    /// request/response round trips, one at a time.
    Rr {
        /// Address to dial.
        #[arg(long)]
        connect: SocketAddr,
        /// Timed round trips.
        #[arg(long)]
        requests: usize,
        /// Untimed round trips first.
        #[arg(long, default_value_t = 1000)]
        warmup: usize,
        /// Request and response size in bytes.
        #[arg(long, default_value_t = 64)]
        size: usize,
        /// Print every sample (ns) in the JSON (for the plot).
        #[arg(long)]
        samples: bool,
    },
    /// Bulk throughput: one connection sends `--bytes`, the server answers
    /// with a small response once it has them all.
    Bulk {
        /// Address to dial.
        #[arg(long)]
        connect: SocketAddr,
        /// Bytes to send.
        #[arg(long)]
        bytes: u64,
        /// Size of each write.
        #[arg(long, default_value_t = 256 * 1024)]
        chunk: usize,
    },
}

/// Runs the load and prints its result.
pub fn run(kind: LoadKind) -> Result<()> {
    let result = match kind {
        LoadKind::Crr {
            connect,
            conns,
            threads,
            req,
            resp,
            bind,
        } => crr(connect, conns, threads, req, resp, bind)?,
        LoadKind::Rr {
            connect,
            requests,
            warmup,
            size,
            samples,
        } => rr(connect, requests, warmup, size, samples)?,
        LoadKind::Bulk {
            connect,
            bytes,
            chunk,
        } => bulk(connect, bytes, chunk)?,
    };
    let mut out = io::stdout().lock();
    writeln!(out, "{result}")?;
    out.flush()?;
    Ok(())
}

/// What one CRR thread counted.
#[derive(Default)]
struct CrrCount {
    ok: u64,
    captured: u64,
    direct: u64,
    server: u64,
    errors: u64,
    first_error: Option<String>,
    /// Time of each connection (connect to close), ns.
    times: Vec<u32>,
}

fn crr(
    addr: SocketAddr,
    conns: u64,
    threads: u64,
    req: usize,
    resp: usize,
    bind: Option<std::net::Ipv4Addr>,
) -> Result<Value> {
    if threads == 0 || conns < threads {
        bail!("need at least one thread and one connection per thread");
    }
    let barrier = Arc::new(Barrier::new(threads as usize + 1));
    let handles: Vec<_> = (0..threads)
        .map(|i| {
            let n = conns / threads + u64::from(i < conns % threads);
            let barrier = barrier.clone();
            std::thread::spawn(move || crr_thread(addr, bind, n, req, resp, &barrier))
        })
        .collect();
    barrier.wait();
    let started = Instant::now();
    let counts: Vec<CrrCount> = handles
        .into_iter()
        .map(|h| h.join().expect("crr thread panicked"))
        .collect();
    let elapsed = started.elapsed();
    let mut total = CrrCount::default();
    for c in counts {
        total.ok += c.ok;
        total.captured += c.captured;
        total.direct += c.direct;
        total.server += c.server;
        total.errors += c.errors;
        total.first_error = total.first_error.or(c.first_error);
        total.times.extend(c.times);
    }
    total.times.sort_unstable();
    Ok(json!({
        "kind": "crr",
        "connect": addr.to_string(),
        "conns": conns,
        "threads": threads,
        "ok": total.ok,
        "errors": total.errors,
        "first_error": total.first_error,
        "status": {"captured": total.captured, "direct": total.direct, "server": total.server},
        "elapsed_s": elapsed.as_secs_f64(),
        "rate": total.ok as f64 / elapsed.as_secs_f64(),
        "conn_time_ns": {
            "p50": stats::percentile(&total.times, 50.0),
            "p99": stats::percentile(&total.times, 99.0),
        },
    }))
}

fn crr_thread(
    addr: SocketAddr,
    bind: Option<std::net::Ipv4Addr>,
    n: u64,
    req: usize,
    resp: usize,
    barrier: &Barrier,
) -> CrrCount {
    let request = proto::small_request(req, resp);
    let mut response = vec![0u8; resp.max(1)];
    let mut c = CrrCount {
        times: Vec::with_capacity(n as usize),
        ..CrrCount::default()
    };
    barrier.wait();
    for _ in 0..n {
        let t0 = Instant::now();
        match one_crr(addr, bind, &request, &mut response) {
            Ok(status) => {
                c.times
                    .push(t0.elapsed().as_nanos().min(u32::MAX as u128) as u32);
                c.ok += 1;
                match status {
                    STATUS_CAPTURED => c.captured += 1,
                    STATUS_DIRECT => c.direct += 1,
                    STATUS_SERVER => c.server += 1,
                    _ => {}
                }
            }
            Err(e) => {
                c.errors += 1;
                c.first_error.get_or_insert_with(|| e.to_string());
            }
        }
    }
    c
}

/// One connection: connect, send the request, read the whole response,
/// close (the client closes first, gracefully; the bench enables
/// `tcp_tw_reuse` in the pod so its TIME_WAIT sockets do not run the
/// ephemeral ports out). Four system calls and a close: a plain blocking
/// `connect`, no timeouts (the bench kills a load generator that hangs).
fn one_crr(
    addr: SocketAddr,
    bind: Option<std::net::Ipv4Addr>,
    request: &[u8],
    response: &mut [u8],
) -> io::Result<u8> {
    let mut s = match bind {
        None => TcpStream::connect(addr)?,
        Some(src) => weir_tests::net::connect_from(src.into(), addr)?,
    };
    s.write_all(request)?;
    proto::read_exact_retry(&mut s, response)?;
    Ok(response[0])
}

fn rr(addr: SocketAddr, requests: usize, warmup: usize, size: usize, keep: bool) -> Result<Value> {
    let request = proto::small_request(size, size.max(1));
    let mut response = vec![0u8; size.max(1)];
    let mut samples: Vec<u32> = Vec::with_capacity(requests);
    let mut s = TcpStream::connect_timeout(&addr, IO_TIMEOUT)
        .with_context(|| format!("connecting to {addr}"))?;
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(IO_TIMEOUT))?;
    for _ in 0..warmup {
        s.write_all(&request)?;
        proto::read_exact_retry(&mut s, &mut response)?;
    }
    let status = response[0];
    let started = Instant::now();
    for _ in 0..requests {
        let t0 = Instant::now();
        s.write_all(&request)?;
        proto::read_exact_retry(&mut s, &mut response)?;
        samples.push(t0.elapsed().as_nanos().min(u32::MAX as u128) as u32);
    }
    let elapsed = started.elapsed();
    drop(s);
    let raw = keep.then(|| samples.clone());
    samples.sort_unstable();
    let mean = samples.iter().map(|&v| v as f64).sum::<f64>() / samples.len().max(1) as f64;
    Ok(json!({
        "kind": "rr",
        "connect": addr.to_string(),
        "requests": requests,
        "size": size,
        "status": char::from(status).to_string(),
        "elapsed_s": elapsed.as_secs_f64(),
        "mean_ns": mean,
        "p50_ns": stats::percentile(&samples, 50.0),
        "p90_ns": stats::percentile(&samples, 90.0),
        "p99_ns": stats::percentile(&samples, 99.0),
        "p999_ns": stats::percentile(&samples, 99.9),
        "max_ns": samples.last().copied().unwrap_or(0),
        "samples_ns": raw,
    }))
}

fn bulk(addr: SocketAddr, bytes: u64, chunk: usize) -> Result<Value> {
    let chunk = chunk.max(HEADER_LEN);
    let buf = vec![b'b'; chunk];
    let mut response = [0u8; HEADER_LEN];
    let started = Instant::now();
    let mut s = TcpStream::connect_timeout(&addr, IO_TIMEOUT)
        .with_context(|| format!("connecting to {addr}"))?;
    s.set_read_timeout(Some(IO_TIMEOUT))?;
    let total = bytes + HEADER_LEN as u64;
    s.write_all(&proto::header(total, response.len() as u64))?;
    let mut left = bytes;
    while left > 0 {
        let n = (left as usize).min(chunk);
        s.write_all(&buf[..n])?;
        left -= n as u64;
    }
    proto::read_exact_retry(&mut s, &mut response)?;
    let elapsed = started.elapsed();
    Ok(json!({
        "kind": "bulk",
        "connect": addr.to_string(),
        "bytes": bytes,
        "status": char::from(response[0]).to_string(),
        "elapsed_s": elapsed.as_secs_f64(),
        "gbit_s": bytes as f64 * 8.0 / elapsed.as_secs_f64() / 1e9,
    }))
}
