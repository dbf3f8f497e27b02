//! Istio's redirect validation, as the istio-validation init container
//! runs it when istio-cni writes the capture rules: a client dials
//! 127.0.0.6:15002; the capture must send that connection to one of the
//! proxy's listeners, where `SO_ORIGINAL_DST` must say port 15002.
//!
//! Istio runs both halves as the proxy user (1337); for that user, a
//! connection on loopback to an address other than 127.0.0.1 goes to the
//! inbound port 15006.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::Args;
use serde_json::{Value, json};
use weir_tests::net::{self, fmt_addr};

#[derive(Args, Debug)]
pub(crate) struct ValidateArgs {
    /// User (and group) the listeners run as (default: unchanged).
    #[arg(long)]
    server_uid: Option<u32>,
    /// User (and group) the probing client runs as.
    #[arg(long, default_value_t = 1337)]
    client_uid: u32,
    /// How long to wait for the redirected connection, in ms.
    #[arg(long, default_value_t = 5000)]
    timeout_ms: u64,
    /// Port of the outbound listener (on 127.0.0.1).
    #[arg(long, default_value_t = 15001)]
    outbound_port: u16,
    /// Port of the inbound listener (on 0.0.0.0).
    #[arg(long, default_value_t = 15006)]
    inbound_port: u16,
    /// Address the client dials; nothing listens there.
    #[arg(long, default_value = "127.0.0.6:15002")]
    probe: SocketAddr,
}

#[derive(Args, Debug)]
pub(crate) struct ValidateClientArgs {
    /// Address to dial once the parent says "go" on stdin.
    #[arg(long)]
    connect: SocketAddr,
    /// Connect timeout, in ms.
    #[arg(long)]
    timeout_ms: u64,
}

enum Event {
    Accepted {
        port: u16,
        orig_dst: io::Result<SocketAddr>,
        peer: Option<SocketAddr>,
    },
    Client(Value),
    ClientGone,
}

pub(crate) fn run(args: ValidateArgs) -> Result<()> {
    let outcome = validate(&args);
    let (record, ok) = match outcome {
        Ok(record) => {
            let ok = record["ok"] == json!(true);
            (record, ok)
        }
        Err(e) => (
            json!({"ok": false, "accepted_on": null, "orig_dst": null, "error": format!("{e:#}")}),
            false,
        ),
    };
    println!("{record}");
    std::process::exit(if ok { 0 } else { 1 });
}

fn validate(args: &ValidateArgs) -> Result<Value> {
    let timeout = Duration::from_millis(args.timeout_ms);
    // The client is started first, while this process may still exec its
    // own binary, and drops to the client user itself.
    let exe = std::env::current_exe().context("finding this executable")?;
    let mut child = Command::new(exe)
        .arg("validate-client")
        .arg(format!("--uid={}", args.client_uid))
        .arg(format!("--connect={}", args.probe))
        .arg(format!("--timeout-ms={}", args.timeout_ms))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .context("starting the validation client")?;
    let result = serve(args, &mut child, timeout);
    let _ = child.kill();
    let _ = child.wait();
    result
}

fn serve(args: &ValidateArgs, child: &mut Child, timeout: Duration) -> Result<Value> {
    if let Some(uid) = args.server_uid {
        crate::drop_privileges(&crate::Identity {
            uid: Some(uid),
            gid: None,
            groups: Vec::new(),
        })?;
    }
    let (tx, rx) = mpsc::channel();
    for addr in [
        SocketAddr::from((Ipv4Addr::LOCALHOST, args.outbound_port)),
        SocketAddr::from((Ipv4Addr::UNSPECIFIED, args.inbound_port)),
    ] {
        let listener = net::listen(addr, None).with_context(|| format!("listening on {addr}"))?;
        let tx = tx.clone();
        std::thread::spawn(move || accept_one(listener, addr.port(), &tx));
    }
    let stdout = child.stdout.take().expect("piped");
    let tx_client = tx.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let value =
                serde_json::from_str(&line).unwrap_or_else(|_| json!({"ok": false, "error": line}));
            let _ = tx_client.send(Event::Client(value));
        }
        let _ = tx_client.send(Event::ClientGone);
    });
    child
        .stdin
        .take()
        .expect("piped")
        .write_all(b"go\n")
        .context("starting the validation client")?;

    let deadline = Instant::now() + timeout;
    let mut client = Value::Null;
    let mut record = json!({"ok": false, "accepted_on": null, "orig_dst": null, "error": null});
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(Event::Accepted {
                port,
                orig_dst,
                peer,
            }) => {
                record["accepted_on"] = json!(port);
                record["peer"] = json!(peer.map(fmt_addr));
                match orig_dst {
                    Ok(dst) => {
                        record["orig_dst"] = json!(fmt_addr(dst));
                        if dst.port() == args.probe.port() {
                            record["ok"] = json!(true);
                        } else {
                            record["error"] = json!(format!(
                                "original destination port is {}, expected {}",
                                dst.port(),
                                args.probe.port()
                            ));
                        }
                    }
                    Err(e) => record["error"] = json!(format!("SO_ORIGINAL_DST: {e}")),
                }
                break;
            }
            Ok(Event::Client(value)) => {
                let failed = value["ok"] != json!(true);
                client = value;
                if failed {
                    record["error"] = json!(format!(
                        "client: {}",
                        client["error"].as_str().unwrap_or("failed")
                    ));
                    break;
                }
            }
            Ok(Event::ClientGone) => {
                if client.is_null() {
                    record["error"] = json!("the validation client exited without a result");
                    break;
                }
            }
            Err(_) => {
                record["error"] = json!(format!(
                    "timed out after {timeout:?}: no redirected connection arrived"
                ));
                break;
            }
        }
    }
    record["client"] = client;
    Ok(record)
}

fn accept_one(listener: TcpListener, port: u16, tx: &mpsc::Sender<Event>) {
    if let Ok((conn, peer)) = listener.accept() {
        let orig_dst = net::original_dst(&conn);
        let _ = tx.send(Event::Accepted {
            port,
            orig_dst,
            peer: Some(peer),
        });
    }
}

/// The client half: waits for "go", dials, reports, then holds the
/// connection until the server closes it (or the parent kills this).
pub(crate) fn run_client(args: ValidateClientArgs) -> Result<()> {
    let mut go = String::new();
    io::stdin().read_line(&mut go).context("waiting for go")?;
    let timeout = Duration::from_millis(args.timeout_ms);
    let mut record = json!({"ok": false, "error": null, "errno": null, "local": null});
    let conn = net::connect_timeout(None, args.connect, timeout);
    match &conn {
        Ok(c) => {
            record["ok"] = json!(true);
            record["local"] = json!(c.local_addr().ok().map(fmt_addr));
        }
        Err(e) => {
            record["error"] = json!(format!("connect {}: {e}", args.connect));
            record["errno"] = json!(e.raw_os_error());
        }
    }
    let mut out = io::stdout().lock();
    writeln!(out, "{record}")?;
    out.flush()?;
    if let Ok(mut c) = conn {
        c.set_read_timeout(Some(timeout))?;
        let _ = c.read_to_end(&mut Vec::new());
    }
    Ok(())
}
