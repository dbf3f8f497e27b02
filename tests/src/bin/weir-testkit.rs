//! `weir-testkit`: the programs weir's kernel tests run inside their network
//! namespaces and cgroups.
//!
//! - `sidecar`: a minimal transparent proxy in the role of Envoy's
//!   virtualOutbound (15001) and virtualInbound (15006) listeners: it reads
//!   each connection's original destination with `SO_ORIGINAL_DST`,
//!   connects there and relays bytes untouched, logging one JSON line per
//!   connection;
//! - `echo`: the application server, answering one JSON line that says what
//!   addresses it saw;
//! - `client`: the application client, printing one JSON line per attempt;
//! - `validate`: Istio's redirect validation probe (istio-validation);
//! - `bookinfo`: the Bookinfo-shaped applications of the demo;
//! - `demo`: the Bookinfo demo (`cargo xtask run`): a node of network
//!   namespaces captured by weir, with no iptables rule.
//!
//! Every subcommand takes `--uid`/`--gid` (and `--groups`) to drop
//! privileges right after starting, before any socket exists, so traffic is
//! owned by that user: start it as root (the binary may sit under a
//! directory other users cannot enter) and let it drop itself.

use std::fs::OpenOptions;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use nix::unistd::{Gid, Uid, setgid, setgroups, setuid};

#[path = "testkit/bookinfo.rs"]
mod bookinfo;
#[path = "testkit/client.rs"]
mod client;
#[path = "testkit/demo.rs"]
mod demo;
#[path = "testkit/dns.rs"]
mod dns;
#[path = "testkit/echo.rs"]
mod echo;
#[path = "testkit/fastpath.rs"]
mod fastpath;
#[path = "testkit/isolation.rs"]
mod isolation;
#[path = "testkit/sidecar.rs"]
mod sidecar;
#[path = "testkit/sockopt.rs"]
mod sockopt;
#[path = "testkit/validate.rs"]
mod validate;

#[derive(Parser, Debug)]
#[command(
    name = "weir-testkit",
    about = "Sample sidecar proxy and test applications for weir's kernel tests"
)]
struct Cli {
    #[command(flatten)]
    identity: Identity,
    #[command(subcommand)]
    command: Command,
}

/// Whom to run as after starting.
#[derive(Args, Debug)]
struct Identity {
    /// Switch to this user id right after starting (before any socket).
    #[arg(long, global = true, display_order = 100)]
    uid: Option<u32>,
    /// Switch to this group id (default: the --uid value); the supplementary
    /// groups become this group plus --groups.
    #[arg(long, global = true, display_order = 100)]
    gid: Option<u32>,
    /// Extra supplementary group ids (comma separated).
    #[arg(long, global = true, display_order = 100, value_delimiter = ',')]
    groups: Vec<u32>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Transparent proxy in the role of Envoy's virtualOutbound and
    /// virtualInbound listeners.
    Sidecar(sidecar::SidecarArgs),
    /// Application server: answers each connection with one JSON line.
    Echo(echo::EchoArgs),
    /// Application client: connects, sends a line, prints one JSON line.
    Client(client::ClientArgs),
    /// Istio's redirect validation (istio-validation init container); use
    /// --server-uid/--client-uid instead of --uid, as it runs its own binary
    /// again for the client.
    Validate(validate::ValidateArgs),
    /// Checks that getsockopt calls other than SO_ORIGINAL_DST behave as
    /// without weir (prints one JSON line, exit 0 iff all checks pass).
    SockoptCheck,
    /// UDP and TCP answering server (a DNS server, or the DNS proxy on
    /// 15053 with --loopback).
    DnsServer(dns::DnsServerArgs),
    /// Sends one UDP query and reports the answer's source address.
    UdpClient(dns::UdpClientArgs),
    /// Application connections from chosen source ports (isolation
    /// tests).
    FixedPortClient(isolation::FixedPortClientArgs),
    /// Fast-path tests' server: checks every byte of each stream, then
    /// echoes, sinks, splices or closes early as the client's header says.
    FastServer(fastpath::FastServerArgs),
    /// Fast-path tests' client: one scenario (ordering, half close,
    /// sendfile, early close, ...), one JSON line.
    FastClient(fastpath::FastClientArgs),
    /// Internal: the client half of `validate`.
    #[command(hide = true)]
    ValidateClient(validate::ValidateClientArgs),
    /// A Bookinfo service (productpage, details, reviews, ratings) over
    /// HTTP/1.1, for the demo.
    Bookinfo(bookinfo::BookinfoArgs),
    /// The Bookinfo demo: network namespaces for productpage, details,
    /// reviews v1-v3 and ratings, each with its app and sidecar, captured by
    /// `weir run` (WEIR_BIN) with no iptables rule; needs root.
    Demo(demo::DemoArgs),
    /// A pod sandbox's process (the kubelet's "pause" container): waits for
    /// SIGTERM or SIGINT, reaping children, then exits 0.
    Pause,
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    // Files given on the command line are opened before the privilege drop,
    // so the test can put them anywhere.
    let log = match &cli.command {
        Command::Sidecar(args) => Some(JsonLog::open(args.log.as_deref())?),
        Command::FastServer(args) => Some(JsonLog::open(args.log.as_deref())?),
        _ => None,
    };
    drop_privileges(&cli.identity)?;
    match cli.command {
        Command::Sidecar(args) => sidecar::run(args, log.expect("opened above")),
        Command::Echo(args) => echo::run(args),
        Command::FastServer(args) => fastpath::serve(args, log.expect("opened above")),
        Command::FastClient(args) => fastpath::client(args),
        Command::Client(args) => client::run(args),
        Command::FixedPortClient(args) => isolation::run(args),
        Command::Validate(args) => validate::run(args),
        Command::ValidateClient(args) => validate::run_client(args),
        Command::Bookinfo(args) => bookinfo::run(args),
        Command::Demo(args) => demo::run(args),
        Command::SockoptCheck => sockopt::run(),
        Command::DnsServer(args) => dns::serve(args),
        Command::UdpClient(args) => dns::udp_client(args),
        Command::Pause => pause(),
    }
}

/// As PID 1 of a sandbox, a signal without a handler is ignored, so the
/// signals are taken with `sigwait`.
fn pause() -> Result<()> {
    use nix::sys::signal::{SigSet, Signal};
    use nix::sys::wait::{WaitPidFlag, waitpid};
    let mut set = SigSet::empty();
    for signal in [Signal::SIGTERM, Signal::SIGINT, Signal::SIGCHLD] {
        set.add(signal);
    }
    set.thread_block()?;
    loop {
        match set.wait()? {
            Signal::SIGCHLD => {
                while let Ok(status) = waitpid(None, Some(WaitPidFlag::WNOHANG)) {
                    if status == nix::sys::wait::WaitStatus::StillAlive {
                        break;
                    }
                }
            }
            _ => return Ok(()),
        }
    }
}

/// setgroups + setgid + setuid, in that order (after setuid the process
/// could no longer change its groups).
fn drop_privileges(id: &Identity) -> Result<()> {
    let gid = id.gid.or(id.uid);
    let mut groups: Vec<Gid> = gid.into_iter().map(Gid::from_raw).collect();
    groups.extend(id.groups.iter().copied().map(Gid::from_raw));
    if !groups.is_empty() {
        setgroups(&groups).with_context(|| format!("setgroups({groups:?})"))?;
    }
    if let Some(gid) = gid {
        setgid(Gid::from_raw(gid)).with_context(|| format!("setgid({gid})"))?;
    }
    if let Some(uid) = id.uid {
        setuid(Uid::from_raw(uid)).with_context(|| format!("setuid({uid})"))?;
    }
    Ok(())
}

/// Where one-JSON-object-per-line records go: a file opened for append, or
/// stdout. Each record is written with one `write` and flushed.
#[derive(Clone)]
pub(crate) struct JsonLog {
    out: Arc<Mutex<Box<dyn Write + Send>>>,
}

impl JsonLog {
    pub(crate) fn open(path: Option<&Path>) -> Result<JsonLog> {
        let out: Box<dyn Write + Send> = match path {
            Some(p) => Box::new(
                OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(p)
                    .with_context(|| format!("opening log {}", p.display()))?,
            ),
            None => Box::new(std::io::stdout()),
        };
        Ok(JsonLog {
            out: Arc::new(Mutex::new(out)),
        })
    }

    pub(crate) fn stdout() -> JsonLog {
        JsonLog {
            out: Arc::new(Mutex::new(Box::new(std::io::stdout()))),
        }
    }

    pub(crate) fn write(&self, record: &serde_json::Value) {
        let mut line = record.to_string();
        line.push('\n');
        let mut out = self.out.lock().unwrap_or_else(|p| p.into_inner());
        if let Err(e) = out.write_all(line.as_bytes()).and_then(|()| out.flush()) {
            eprintln!("weir-testkit: writing log record: {e}");
        }
    }
}

/// Creates `path` (empty) to tell a waiting test that the listeners are up.
pub(crate) fn signal_ready(path: Option<&PathBuf>) -> Result<()> {
    if let Some(p) = path {
        std::fs::write(p, b"").with_context(|| {
            format!(
                "creating ready file {} (is its directory writable by this user?)",
                p.display()
            )
        })?;
    }
    Ok(())
}
