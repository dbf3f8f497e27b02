//! `fixed-port-client`: application connections from chosen source ports,
//! for the isolation tests (two pods whose application sockets have the
//! very same address and port, so only the network namespace tells their
//! flows apart).

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use anyhow::Result;
use clap::Args;
use serde_json::json;
use weir_tests::net::{self, fmt_addr};

#[derive(Args, Debug)]
pub(crate) struct FixedPortClientArgs {
    /// Address to connect to: `ip:port` or `[ipv6]:port`.
    #[arg(long)]
    connect: SocketAddr,
    /// Source address to bind.
    #[arg(long)]
    bind: IpAddr,
    /// Source port of the first connection; connection `i` uses
    /// `first_port + i`.
    #[arg(long)]
    first_port: u16,
    /// Number of connections, one after another.
    #[arg(long, default_value_t = 1)]
    count: u16,
    /// Timeout for the connect and for each read and write, in ms.
    #[arg(long, default_value_t = 3000)]
    timeout_ms: u64,
}

/// Prints one JSON line per connection: `ok`, `local`, `peer`, `reply`
/// (the server's answer), `error`.
pub(crate) fn run(args: FixedPortClientArgs) -> Result<()> {
    let timeout = Duration::from_millis(args.timeout_ms);
    let mut out = std::io::stdout().lock();
    for i in 0..args.count {
        let port = args.first_port.saturating_add(i);
        let record = match attempt(&args, port, timeout) {
            Ok((local, peer, reply)) => json!({
                "ok": true, "local": local, "peer": peer, "reply": reply, "error": null,
            }),
            Err(e) => json!({
                "ok": false, "local": null, "peer": null, "reply": null,
                "error": format!("source port {port}: {e}"),
            }),
        };
        writeln!(out, "{record}")?;
        out.flush()?;
    }
    Ok(())
}

fn attempt(
    args: &FixedPortClientArgs,
    port: u16,
    timeout: Duration,
) -> std::io::Result<(String, String, String)> {
    let fd = net::tcp_socket(args.connect, Some(SocketAddr::new(args.bind, port)))?;
    let mut conn = net::connect_socket(fd, args.connect, timeout)?;
    conn.set_read_timeout(Some(timeout))?;
    conn.set_write_timeout(Some(timeout))?;
    let local = fmt_addr(conn.local_addr()?);
    let peer = fmt_addr(conn.peer_addr()?);
    conn.write_all(b"hello\n")?;
    let mut reply = String::new();
    conn.read_to_string(&mut reply)?;
    Ok((local, peer, reply))
}
