//! What the soak's processes say to each other: the one-line answer a
//! sidecar (or a server reached directly) sends on every connection, how
//! a client judges it, and small I/O helpers.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

/// Set by SIGINT / SIGTERM in every soak process: loops stop, guards clean
/// up.
pub static INTERRUPTED: AtomicBool = AtomicBool::new(false);

/// Whether SIGINT or SIGTERM arrived.
pub fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::Relaxed)
}

extern "C" fn on_signal(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::Relaxed);
}

/// Makes SIGINT and SIGTERM set [`INTERRUPTED`] instead of killing the
/// process, so that every guard's `Drop` still runs.
pub fn catch_signals() -> Result<()> {
    use nix::sys::signal::{SaFlags, SigAction, SigHandler, SigSet, Signal, sigaction};
    let action = SigAction::new(
        SigHandler::Handler(on_signal),
        SaFlags::empty(),
        SigSet::empty(),
    );
    for sig in [Signal::SIGINT, Signal::SIGTERM] {
        // SAFETY: the handler only stores into an atomic (async-signal-safe).
        unsafe { sigaction(sig, &action) }.with_context(|| format!("sigaction({sig})"))?;
    }
    Ok(())
}

/// `CLOCK_MONOTONIC` in milliseconds: one clock for every process of the
/// machine, so the driver can line up a client's failures with the moments
/// it killed a proxy.
pub fn now_ms() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the timespec we pass.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as f64 * 1e3 + ts.tv_nsec as f64 / 1e6
}

/// What a listener answers on each connection (one JSON line).
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Answer {
    /// `sidecar` (the connection was captured) or `direct` (it reached
    /// the original destination itself).
    pub via: String,
    /// The pod (or place) of the answering process.
    pub pod: String,
    /// For a sidecar: `outbound` or `inbound`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub listener: Option<String>,
    /// For a sidecar: what `SO_ORIGINAL_DST` returned.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub orig_dst: Option<String>,
    /// For a sidecar: the errno of a failed `SO_ORIGINAL_DST`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub errno: Option<i32>,
    /// The peer address the answering process saw.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer: Option<String>,
}

impl Answer {
    /// The answer for `conn`, accepted by a sidecar's `listener`.
    pub fn sidecar(pod: &str, listener: &str, conn: &TcpStream) -> Answer {
        let (orig_dst, errno) = match weir_tests::net::original_dst(conn) {
            Ok(a) => (Some(weir_tests::net::fmt_addr(a)), None),
            Err(e) => (None, Some(e.raw_os_error().unwrap_or(-1))),
        };
        Answer {
            via: "sidecar".into(),
            pod: pod.into(),
            listener: Some(listener.into()),
            orig_dst,
            errno,
            peer: conn.peer_addr().ok().map(weir_tests::net::fmt_addr),
        }
    }

    /// The answer of a server reached without capture.
    pub fn direct(pod: &str, conn: &TcpStream) -> Answer {
        Answer {
            via: "direct".into(),
            pod: pod.into(),
            peer: conn.peer_addr().ok().map(weir_tests::net::fmt_addr),
            ..Answer::default()
        }
    }

    /// The JSON line, newline included.
    pub fn line(&self) -> String {
        let mut s = serde_json::to_string(self).unwrap_or_default();
        s.push('\n');
        s
    }
}

/// How a client judged one connection attempt.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    /// Answered by the expected sidecar listener of the expected pod with
    /// this connection's original destination and peer.
    Captured,
    /// Answered by the original destination itself: capture was lost.
    Escaped,
    /// Answered by a sidecar, but not with this connection's original
    /// destination (another connection's or another pod's, or none).
    WrongAnswer,
    /// Refused (RST on the SYN): what capture does while no proxy listens.
    Refused,
    /// Reset or closed after connecting, before a whole answer came.
    Reset,
    /// No connection or no answer in time.
    Timeout,
    /// Anything else (the errno is recorded).
    OtherError,
}

impl Verdict {
    /// Snake-case name (JSON keys).
    pub fn name(self) -> &'static str {
        match self {
            Verdict::Captured => "captured",
            Verdict::Escaped => "escaped",
            Verdict::WrongAnswer => "wrong_answer",
            Verdict::Refused => "refused",
            Verdict::Reset => "reset",
            Verdict::Timeout => "timeout",
            Verdict::OtherError => "other_error",
        }
    }

    /// The verdict for a failed connect or read.
    pub fn of_error(e: &io::Error) -> Verdict {
        match e.raw_os_error() {
            Some(libc::ECONNREFUSED) => Verdict::Refused,
            Some(libc::ECONNRESET | libc::EPIPE | libc::ECONNABORTED) => Verdict::Reset,
            Some(libc::ETIMEDOUT | libc::EAGAIN | libc::EINPROGRESS) => Verdict::Timeout,
            _ if e.kind() == io::ErrorKind::UnexpectedEof => Verdict::Reset,
            _ if e.kind() == io::ErrorKind::TimedOut || e.kind() == io::ErrorKind::WouldBlock => {
                Verdict::Timeout
            }
            _ => Verdict::OtherError,
        }
    }
}

/// What a client expects of the answer to a connection to `target` made
/// from `local`.
pub struct Expect<'a> {
    /// `outbound` or `inbound`.
    pub listener: &'a str,
    /// The pod whose sidecar must answer.
    pub pod: &'a str,
}

/// Judges a sidecar's (or a direct server's) answer.
pub fn judge(
    answer: &Answer,
    expect: &Expect<'_>,
    target: SocketAddr,
    local: SocketAddr,
) -> Verdict {
    if answer.via == "direct" {
        return Verdict::Escaped;
    }
    let want_dst = weir_tests::net::fmt_addr(target);
    let want_peer = weir_tests::net::fmt_addr(local);
    let right = answer.via == "sidecar"
        && answer.pod == expect.pod
        && answer.listener.as_deref() == Some(expect.listener)
        && answer.orig_dst.as_deref() == Some(want_dst.as_str())
        && answer.peer.as_deref() == Some(want_peer.as_str());
    if right {
        Verdict::Captured
    } else {
        Verdict::WrongAnswer
    }
}

/// Reads one line (up to `\n`, at most 4 KiB) within the stream's read
/// timeout. EOF before the newline is `UnexpectedEof`.
pub fn read_line(conn: &mut TcpStream) -> io::Result<String> {
    let mut buf = Vec::with_capacity(256);
    let mut byte = [0u8; 512];
    loop {
        let n = conn.read(&mut byte)?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "closed before a whole answer",
            ));
        }
        buf.extend_from_slice(&byte[..n]);
        if let Some(end) = buf.iter().position(|&b| b == b'\n') {
            buf.truncate(end);
            return Ok(String::from_utf8_lossy(&buf).into_owned());
        }
        if buf.len() > 4096 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "answer too long",
            ));
        }
    }
}

/// Serves one connection the way every soak listener does: writes
/// `answer`, then waits (up to `linger`) for the client to close first, so
/// the TIME_WAIT state stays on the client's side.
pub fn answer_and_close(mut conn: TcpStream, answer: &Answer, linger: Duration) {
    if conn.write_all(answer.line().as_bytes()).is_err() {
        return;
    }
    let _ = conn.set_read_timeout(Some(linger));
    let mut sink = [0u8; 256];
    while matches!(conn.read(&mut sink), Ok(n) if n > 0) {}
}

/// Writes `value` as pretty JSON to `path`, atomically (rename).
pub fn write_json(path: &Path, value: &impl Serialize) -> Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, serde_json::to_vec_pretty(value)?)
        .with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming to {}", path.display()))?;
    Ok(())
}

/// Creates `path` (empty): a ready or trigger marker.
pub fn touch(path: &Path) -> Result<()> {
    std::fs::write(path, b"").with_context(|| format!("creating {}", path.display()))
}

/// Sleeps until `path` exists or the process is interrupted; returns
/// whether it exists.
pub fn wait_for_file(path: &Path, poll: Duration) -> bool {
    while !path.exists() {
        if interrupted() {
            return false;
        }
        std::thread::sleep(poll);
    }
    true
}

fn get_nofile() -> io::Result<libc::rlimit> {
    let mut cur = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes the struct we pass.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut cur) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(cur)
}

fn set_nofile(soft: u64, hard: u64) -> io::Result<()> {
    let new = libc::rlimit {
        rlim_cur: soft,
        rlim_max: hard,
    };
    // SAFETY: setrlimit reads the struct we pass.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &new) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Raises `RLIMIT_NOFILE` to `n` (soft and, if needed, hard). Raising the
/// hard limit needs `CAP_SYS_RESOURCE`, so this runs before privileges
/// are dropped; without it the soft limit goes up to the hard one.
pub fn raise_nofile(n: u64) -> Result<()> {
    let cur = get_nofile().context("getrlimit(RLIMIT_NOFILE)")?;
    if cur.rlim_cur >= n {
        return Ok(());
    }
    if set_nofile(n, n.max(cur.rlim_max)).is_ok() {
        return Ok(());
    }
    set_nofile(n.min(cur.rlim_max), cur.rlim_max)
        .with_context(|| format!("setrlimit(RLIMIT_NOFILE, {})", n.min(cur.rlim_max)))
}

/// How many descriptors one process of the soak may open: the driver first
/// tries to raise its own hard limit (children inherit it), then reports
/// the hard limit it has (20,000 in a container without
/// `CAP_SYS_RESOURCE`, for example).
pub fn nofile_budget() -> u64 {
    let _ = raise_nofile(1 << 20);
    get_nofile().map_or(1024, |l| l.rlim_max)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sidecar_answer(dst: &str, peer: &str) -> Answer {
        Answer {
            via: "sidecar".into(),
            pod: "a".into(),
            listener: Some("outbound".into()),
            orig_dst: Some(dst.into()),
            errno: None,
            peer: Some(peer.into()),
        }
    }

    #[test]
    fn judges_answers() {
        let e = Expect {
            listener: "outbound",
            pod: "a",
        };
        let target: SocketAddr = "198.19.0.1:80".parse().unwrap();
        let local: SocketAddr = "198.18.0.2:4000".parse().unwrap();
        let ok = sidecar_answer("198.19.0.1:80", "198.18.0.2:4000");
        assert_eq!(judge(&ok, &e, target, local), Verdict::Captured);
        let other = sidecar_answer("198.19.0.2:80", "198.18.0.2:4000");
        assert_eq!(judge(&other, &e, target, local), Verdict::WrongAnswer);
        let other_peer = sidecar_answer("198.19.0.1:80", "198.18.0.2:4001");
        assert_eq!(judge(&other_peer, &e, target, local), Verdict::WrongAnswer);
        let direct = Answer {
            via: "direct".into(),
            ..Answer::default()
        };
        assert_eq!(judge(&direct, &e, target, local), Verdict::Escaped);
        let line = ok.line();
        let back: Answer = serde_json::from_str(line.trim()).unwrap();
        assert_eq!(back, ok);
    }

    #[test]
    fn classifies_errors() {
        let refused = io::Error::from_raw_os_error(libc::ECONNREFUSED);
        assert_eq!(Verdict::of_error(&refused), Verdict::Refused);
        let eof = io::Error::new(io::ErrorKind::UnexpectedEof, "x");
        assert_eq!(Verdict::of_error(&eof), Verdict::Reset);
        let timeout = io::Error::from_raw_os_error(libc::ETIMEDOUT);
        assert_eq!(Verdict::of_error(&timeout), Verdict::Timeout);
    }
}
