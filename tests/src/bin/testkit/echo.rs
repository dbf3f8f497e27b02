//! The application server: tells each client which addresses it saw.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Args;
use serde_json::json;
use weir_tests::net::{self, fmt_addr};

use crate::JsonLog;

/// Longest request line read.
const MAX_REQUEST: u64 = 64 * 1024;
/// How long a client may take to send its line.
const READ_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Args, Debug)]
pub(crate) struct EchoArgs {
    /// Port to listen on (repeat for several).
    #[arg(long, required = true)]
    port: Vec<u16>,
    /// Name reported in each reply.
    #[arg(long, default_value = "echo")]
    name: String,
    /// Address to listen on (default: `::` dual stack when IPv6 is
    /// available, else 0.0.0.0).
    #[arg(long)]
    bind: Option<IpAddr>,
    /// Create this file once every listener is listening.
    #[arg(long)]
    ready_file: Option<PathBuf>,
}

pub(crate) fn run(args: EchoArgs) -> Result<()> {
    let mut listeners = Vec::new();
    for &port in &args.port {
        let listener = match args.bind {
            Some(ip) => {
                let addr = SocketAddr::new(ip, port);
                net::listen(addr, None).with_context(|| format!("listening on {addr}"))?
            }
            None => {
                let v6 = SocketAddr::from((Ipv6Addr::UNSPECIFIED, port));
                match net::listen(v6, Some(false)) {
                    Ok(l) => l,
                    // Only a missing IPv6 falls back to IPv4; other errors
                    // (port in use, permission) would hit IPv4 too.
                    Err(e)
                        if matches!(
                            e.raw_os_error(),
                            Some(libc::EAFNOSUPPORT | libc::EADDRNOTAVAIL)
                        ) =>
                    {
                        let v4 = SocketAddr::from((Ipv4Addr::UNSPECIFIED, port));
                        eprintln!(
                            "echo {}: no dual-stack listener on {v6} ({e}), using {v4}",
                            args.name
                        );
                        net::listen(v4, None).with_context(|| format!("listening on {v4}"))?
                    }
                    Err(e) => return Err(e).with_context(|| format!("listening on {v6}")),
                }
            }
        };
        eprintln!(
            "echo {}: listening on {}",
            args.name,
            listener
                .local_addr()
                .map(|a| a.to_string())
                .unwrap_or_default()
        );
        listeners.push(listener);
    }
    crate::signal_ready(args.ready_file.as_ref())?;

    let name: &'static str = args.name.leak();
    let log = JsonLog::stdout();
    let threads: Vec<_> = listeners
        .into_iter()
        .map(|l| {
            let log = log.clone();
            std::thread::spawn(move || accept_loop(l, name, log))
        })
        .collect();
    for t in threads {
        let _ = t.join();
    }
    Ok(())
}

fn accept_loop(listener: TcpListener, name: &'static str, log: JsonLog) {
    loop {
        match listener.accept() {
            Ok((conn, _)) => {
                let log = log.clone();
                std::thread::spawn(move || {
                    if let Err(e) = serve(conn, name, &log) {
                        eprintln!("echo {name}: {e}");
                    }
                });
            }
            Err(e) => {
                eprintln!("echo {name}: accept: {e}");
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

/// Reads one line, answers with one JSON line, then closes gracefully.
fn serve(mut conn: TcpStream, name: &str, log: &JsonLog) -> std::io::Result<()> {
    conn.set_read_timeout(Some(READ_TIMEOUT))?;
    let mut line = Vec::new();
    BufReader::new((&conn).take(MAX_REQUEST)).read_until(b'\n', &mut line)?;
    let request = String::from_utf8_lossy(&line);
    let request = request.trim_end_matches('\n').trim_end_matches('\r');
    let reply = json!({
        "server": name,
        "local": conn.local_addr().ok().map(fmt_addr),
        "peer": conn.peer_addr().ok().map(fmt_addr),
        "request": request,
    });
    log.write(&reply);
    let mut text = reply.to_string();
    text.push('\n');
    conn.write_all(text.as_bytes())?;
    conn.shutdown(Shutdown::Write)?;
    // Wait for the client to close its side: closing with unread data
    // would send a reset and could destroy the reply in flight.
    conn.set_read_timeout(Some(Duration::from_secs(1)))?;
    let _ = std::io::copy(&mut conn, &mut std::io::sink());
    Ok(())
}
