//! The application client: one JSON line per connection attempt.

use std::io::{self, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use anyhow::Result;
use clap::Args;
use serde_json::{Value, json};
use weir_tests::net::{self, fmt_addr};

#[derive(Args, Debug)]
pub(crate) struct ClientArgs {
    /// Address to connect to: `ip:port` or `[ipv6]:port`.
    #[arg(long)]
    connect: SocketAddr,
    /// Text to send (a newline is appended).
    #[arg(long, default_value = "hello")]
    send: String,
    /// Source address to bind before connecting (port chosen by the kernel).
    #[arg(long)]
    bind: Option<IpAddr>,
    /// Mark the socket (`SO_MARK`) before connecting, e.g. 0x539 (1337) as
    /// Istio's ztunnel marks its sockets.
    #[arg(long)]
    mark: Option<u32>,
    /// Timeout for the connect and for each read and write, in ms.
    #[arg(long, default_value_t = 3000)]
    timeout_ms: u64,
    /// Number of connections to make, one after another.
    #[arg(long, default_value_t = 1)]
    count: u32,
    /// Pause between connections, in ms.
    #[arg(long, default_value_t = 100)]
    interval_ms: u64,
    /// Stop (after the connection in progress) once this file exists, even
    /// before `--count` connections: traffic that lasts as long as a test
    /// needs it, however slow the machine.
    #[arg(long)]
    until_file: Option<std::path::PathBuf>,
    /// Wait this long after the reply's EOF before asking `getpeername`
    /// again (`peer_after_eof`), so that the other side's close is done.
    #[arg(long, default_value_t = 0)]
    after_eof_ms: u64,
    /// Weir's pinned `CONNECTING` map (needs root: give no `--uid`).
    /// Before connecting, this process is pinned to one CPU and the
    /// socket's original destination `--handoff-to` is left in another
    /// CPU's slot, as if `connect4` had run there and the task had moved
    /// before `TCP_CONNECT_CB`: the hand-off must search the other CPUs.
    /// Connect straight to the proxy's port (no redirect of its own).
    #[arg(long, requires = "handoff_to")]
    handoff_map: Option<std::path::PathBuf>,
    /// The original destination `--handoff-map` plants.
    #[arg(long)]
    handoff_to: Option<SocketAddr>,
}

pub(crate) fn run(args: ClientArgs) -> Result<()> {
    let timeout = Duration::from_millis(args.timeout_ms);
    for i in 0..args.count {
        if args.until_file.as_deref().is_some_and(|f| f.exists()) {
            break;
        }
        if i > 0 {
            std::thread::sleep(Duration::from_millis(args.interval_ms));
        }
        let record = attempt(&args, timeout);
        let mut out = io::stdout().lock();
        writeln!(out, "{record}")?;
        out.flush()?;
    }
    Ok(())
}

/// What went wrong, and at which step.
fn failure(record: &mut Value, step: &str, e: &io::Error) {
    record["ok"] = json!(false);
    record["error"] = json!(format!("{step}: {e}"));
    record["errno"] = json!(e.raw_os_error());
}

fn attempt(args: &ClientArgs, timeout: Duration) -> Value {
    let started = Instant::now();
    let mut record = json!({
        "ok": false,
        "error": null,
        "errno": null,
        "local": null,
        "peer": null,
        "peer_after_eof": null,
        "reply": null,
    });
    let bind_to = args.bind.map(|ip| SocketAddr::new(ip, 0));
    let fd = match net::tcp_socket(args.connect, bind_to) {
        Ok(fd) => fd,
        Err(e) => {
            failure(&mut record, "bind", &e);
            return finish(record, started);
        }
    };
    if let Some(mark) = args.mark
        && let Err(e) = nix::sys::socket::setsockopt(&fd, nix::sys::socket::sockopt::Mark, &mark)
    {
        failure(&mut record, "bind", &std::io::Error::from(e));
        return finish(record, started);
    }
    if let (Some(map), Some(to)) = (&args.handoff_map, args.handoff_to) {
        match plant_handoff(&fd, map, to) {
            Ok((cookie, cpus)) => {
                record["handoff_cookie"] = json!(cookie);
                record["handoff_cpus"] = json!(cpus);
            }
            Err(e) => {
                record["error"] = json!(format!("handoff: {e:#}"));
                return finish(record, started);
            }
        }
    }
    let mut conn = match net::connect_socket(fd, args.connect, timeout) {
        Ok(c) => c,
        Err(e) => {
            failure(&mut record, "connect", &e);
            return finish(record, started);
        }
    };
    record["local"] = json!(conn.local_addr().ok().map(fmt_addr));
    record["peer"] = json!(conn.peer_addr().ok().map(fmt_addr));
    let mut reply = Vec::new();
    match exchange(&mut conn, &args.send, timeout, &mut reply) {
        Ok(()) => record["ok"] = json!(true),
        Err((step, e)) => failure(&mut record, step, &e),
    }
    record["reply"] = json!(String::from_utf8_lossy(&reply));
    // Once the other end has closed (its FIN read, the socket in
    // CLOSE_WAIT): what `getpeername` says then.
    std::thread::sleep(Duration::from_millis(args.after_eof_ms));
    record["peer_after_eof"] = json!(conn.peer_addr().ok().map(fmt_addr));
    finish(record, started)
}

fn finish(mut record: Value, started: Instant) -> Value {
    record["elapsed_ms"] = json!(started.elapsed().as_millis() as u64);
    record
}

/// Sends `text` and a newline, then reads until EOF into `reply`.
fn exchange(
    conn: &mut TcpStream,
    text: &str,
    timeout: Duration,
    reply: &mut Vec<u8>,
) -> Result<(), (&'static str, io::Error)> {
    let timeout = (!timeout.is_zero()).then_some(timeout);
    conn.set_write_timeout(timeout).map_err(|e| ("write", e))?;
    conn.set_read_timeout(timeout).map_err(|e| ("read", e))?;
    conn.write_all(format!("{text}\n").as_bytes())
        .map_err(|e| ("write", e))?;
    conn.read_to_end(reply).map_err(|e| ("read", e))?;
    Ok(())
}

/// `--handoff-map`: pins this process to CPU 0 and writes `to` into slot 0
/// of CPU 1 (the other CPUs' slots keep what they hold), keyed by the
/// socket's cookie. Returns the cookie and the CPUs `connect()` runs on
/// (0) and the slot is on (1).
fn plant_handoff(
    fd: &std::os::fd::OwnedFd,
    map: &std::path::Path,
    to: SocketAddr,
) -> Result<(u64, [usize; 2])> {
    use anyhow::Context as _;
    use aya::maps::{Map, MapData, PerCpuArray, PerCpuValues};
    use weir_common::{Connecting, ORIG_APP_SIDE, OrigDst, addr_from_octets};

    let cpus = aya::util::nr_cpus().map_err(|(_, e)| e)?;
    anyhow::ensure!(
        cpus >= 2,
        "the hand-off between CPUs needs at least 2 CPUs, this machine has {cpus}"
    );
    let mut set = nix::sched::CpuSet::new();
    set.set(0)?;
    nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set)?;
    let cookie = net::socket_cookie(fd)?;
    let data = MapData::from_pin(map).with_context(|| format!("opening {}", map.display()))?;
    let mut slots: PerCpuArray<MapData, Connecting> =
        PerCpuArray::try_from(Map::PerCpuArray(data))?;
    let mut values: Vec<Connecting> = slots.get(&0, 0)?.iter().copied().collect();
    let addr = addr_from_octets(match to.ip() {
        IpAddr::V4(a) => a.to_ipv6_mapped().octets(),
        IpAddr::V6(a) => a.octets(),
    });
    values[1] = Connecting {
        sock: cookie,
        seq: values[1].seq.wrapping_add(1),
        od: OrigDst {
            addr,
            port: to.port(),
            flags: ORIG_APP_SIDE,
            pod_id: 0,
        },
    };
    slots.set(0, PerCpuValues::try_from(values)?, 0)?;
    Ok((cookie, [0, 1]))
}
