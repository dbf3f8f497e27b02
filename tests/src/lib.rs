//! weir's kernel test harness.
//!
//! Kernel tests need real kernel objects: network namespaces joined by veth
//! pairs, cgroup v2 directories to attach programs to, private bpffs
//! instances to pin into, and processes placed inside all of them. Every
//! object here is a guard that removes what it created when dropped (best
//! effort: `Drop` never panics), so a failing test leaves nothing behind on
//! the machine.
//!
//! Test traffic stays inside namespaces created here; tests use addresses
//! from `198.18.0.0/15` (IPv4) and `2001:2::/48` (IPv6), both reserved for
//! benchmarking, and never touch the host's network configuration or the
//! root cgroup's programs.
//!
//! The `weir-testkit` binary built from this crate provides the sample
//! sidecar proxy and the applications the tests run inside the namespaces
//! ([`testkit`] finds it).
//!
//! Helpers panic with a useful message instead of returning errors: a
//! harness failure is a test failure. (The few that the benchmark, the
//! soak and the demo need to report instead have a `try_` form.)
//!
//! One of each, shared by the kernel tests, `weir-bench`, `weir-soak` and
//! the demo (`weir-testkit demo`):
//! - [`node::Node`] (built with [`node::Node::builder`]): a cgroup, a
//!   bpffs, a pods file and a `weir run` agent to start, kill, restart and
//!   wait for (`pods file applied in N ms`);
//! - [`podsfile`]: the pods file, serialized with serde and replaced by
//!   rename;
//! - [`fake_api::FakeApi`]: the fake Kubernetes API server, on the agent's
//!   HTTP stack (axum), as a cluster or from a script;
//! - guards and helpers for kernel objects: [`Cgroup`] (and
//!   [`kill_subtree`]/[`remove_subtree`] for cgroups made by name),
//!   [`NetNs`], [`Bridge`], [`NsFile`], [`veth_pair`], [`Bpffs`],
//!   [`spawn_in`]/[`join_before_exec`], [`run_in_netns`].

#![warn(missing_docs)]

mod bpffs;
mod cgroup;
mod cmd;
pub mod fake_api;
pub mod goldens;
pub mod iptables_model;
pub mod istio_iptables;
pub mod kuma_iptables;
pub mod linkerd_iptables;
pub mod net;
mod netns;
pub mod node;
pub mod podsfile;
mod proc;
mod tempdir;

use std::net::{Ipv4Addr, TcpListener};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

pub use bpffs::{Bpffs, mount_bpffs};
pub use cgroup::{
    Cgroup, cgroup2_mount, find_cgroup2_mount, is_mount_point, kill_subtree, remove_subtree,
    subtree_pids,
};
pub use netns::{Bridge, NetNs, NsFile, Veth, run_in_netns, try_ip, veth_named, veth_pair};
pub use proc::{Proc, join_before_exec, spawn_in, spawn_in_netns_path};
pub use tempdir::TempDir;

/// Environment variable that turns "skipped, not root" into a test failure.
pub const REQUIRE_KERNEL_TESTS_ENV: &str = "WEIR_REQUIRE_KERNEL_TESTS";

/// Returns `true` when the process runs as root (effective UID 0), which
/// kernel tests need for eBPF, network namespaces and cgroups.
///
/// When not root, a test should return early. If `WEIR_REQUIRE_KERNEL_TESTS`
/// or `CI` is set, skipping is not allowed and this panics instead, so a CI
/// run can never pass by silently skipping every kernel test.
///
/// ```no_run
/// #[test]
/// fn captures_outbound() {
///     if !weir_tests::require_root() {
///         return;
///     }
///     // ...
/// }
/// ```
pub fn require_root() -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    if std::env::var_os(REQUIRE_KERNEL_TESTS_ENV).is_some() || std::env::var_os("CI").is_some() {
        panic!(
            "kernel test needs root (eBPF, netns, cgroups): run as root or via `cargo xtask test`"
        );
    }
    let test = std::thread::current()
        .name()
        .unwrap_or("<unnamed>")
        .to_owned();
    eprintln!(
        "SKIPPED (needs root): {test}: kernel tests need eBPF, netns and cgroups; \
         run as root or via `cargo xtask test`"
    );
    false
}

/// Reports that something a test needs is missing (a tool, a kernel
/// module): under `cargo xtask test` (`WEIR_REQUIRE_KERNEL_TESTS`) or CI
/// that is a failure, so a suite never passes without having run; on a
/// developer's machine the test is skipped with a `SKIPPED:` line.
/// Returns only when skipping: the caller then returns.
pub fn unavailable(what: &str) {
    if std::env::var_os(REQUIRE_KERNEL_TESTS_ENV).is_some() || std::env::var_os("CI").is_some() {
        panic!("{what} (a test may not skip under CI or `cargo xtask test`)");
    }
    let test = std::thread::current()
        .name()
        .unwrap_or("<unnamed>")
        .to_owned();
    eprintln!("SKIPPED: {test}: {what}");
}

/// The running kernel's (major, minor) version, from `uname -r`.
pub fn kernel_version() -> (u32, u32) {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let mut parts = release
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|p| p.parse::<u32>().ok());
    (
        parts.next().unwrap_or_default(),
        parts.next().unwrap_or_default(),
    )
}

/// Whether the kernel has TCX links (Linux 6.6): weir's tc programs for
/// `reroute-virtual-interfaces` need them, and the agent refuses pods with
/// that annotation on older kernels.
pub fn kernel_has_tcx() -> bool {
    kernel_version() >= (6, 6)
}

/// Returns a short name that is unique on this machine while this process
/// lives, usable for network namespaces, interfaces, cgroups and paths.
///
/// The name is `<prefix><pid><n>`:
/// - `prefix` keeps only ASCII letters, digits, `-` and `_`, and is
///   shortened so the whole name fits in 15 bytes (`IFNAMSIZ - 1`, the
///   longest interface name);
/// - `pid` is this process's id as 5 base-36 digits (fixed width, so two
///   processes can never produce the same name);
/// - `n` is a per-process counter in base 36.
///
/// For example `unique_name("wns")` in process 4242 gives `"wns0039u0"`,
/// then `"wns0039u1"`, and so on. Give prefixes of at most 7 characters to
/// keep them whole.
pub fn unique_name(prefix: &str) -> String {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let suffix = format!(
        "{:0>5}{}",
        base36(std::process::id() as u64),
        base36(n as u64)
    );
    let keep = 15usize.saturating_sub(suffix.len());
    let prefix: String = prefix
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '-' || *c == '_')
        .take(keep)
        .collect();
    format!("{prefix}{suffix}")
}

fn base36(mut v: u64) -> String {
    const DIGITS: &[u8; 36] = b"0123456789abcdefghijklmnopqrstuvwxyz";
    let mut out = Vec::new();
    loop {
        out.push(DIGITS[(v % 36) as usize]);
        v /= 36;
        if v == 0 {
            break;
        }
    }
    out.reverse();
    String::from_utf8(out).expect("base-36 digits are ASCII")
}

/// `timeout` times `$WEIR_TEST_TIMEOUT_SCALE` (default 1): how long to
/// wait for something that will happen, on a slow machine. `cargo xtask
/// kernel-test` sets it for its emulated kernels, where starting the agent
/// takes seconds. Only patience changes: what is checked stays the same.
pub fn patience(timeout: Duration) -> Duration {
    let scale = std::env::var("WEIR_TEST_TIMEOUT_SCALE")
        .ok()
        .and_then(|s| s.parse::<u32>().ok())
        .filter(|s| *s >= 1)
        .unwrap_or(1);
    timeout * scale
}

/// Polls `f` every 10 ms until it returns `true`; panics with
/// "timed out after … waiting for {what}" when `timeout` (times
/// [`patience`]) passes first.
pub fn wait_until(timeout: Duration, what: &str, mut f: impl FnMut() -> bool) {
    let timeout = patience(timeout);
    let deadline = Instant::now() + timeout;
    loop {
        if f() {
            return;
        }
        if Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Returns a TCP port that was free on `127.0.0.1` in the test's own network
/// namespace a moment ago (the kernel picks it; the socket is closed again).
///
/// Inside a fresh network namespace every port is free, so this is only
/// needed for listeners in the namespace the tests run in.
pub fn free_tcp_port() -> u16 {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .unwrap_or_else(|e| panic!("binding 127.0.0.1:0 to find a free port: {e}"));
    listener
        .local_addr()
        .unwrap_or_else(|e| panic!("local address of 127.0.0.1:0 listener: {e}"))
        .port()
}

/// Path of the `weir-testkit` binary (sample sidecar, echo server, client).
///
/// Taken from `WEIR_TESTKIT` when set; otherwise the binary cargo built next
/// to the running test, `target/<profile>/weir-testkit` (test executables
/// live in `target/<profile>/deps/`). Cargo builds it for this crate's
/// integration tests automatically; integration tests may also use
/// `env!("CARGO_BIN_EXE_weir-testkit")` directly.
///
/// Panics when the binary cannot be found.
pub fn testkit() -> PathBuf {
    if let Some(p) = std::env::var_os("WEIR_TESTKIT") {
        return PathBuf::from(p);
    }
    let profile_dirs = profile_dirs();
    for dir in &profile_dirs {
        let candidate = dir.join("weir-testkit");
        if candidate.is_file() {
            return candidate;
        }
    }
    panic!(
        "weir-testkit not found (looked in {profile_dirs:?}): build it with \
         `cargo build -p weir-tests --bin weir-testkit` or set WEIR_TESTKIT"
    );
}

/// A [`std::process::Command`] that runs [`testkit`] with `args`.
///
/// To drop privileges pass `--uid`/`--gid` to the testkit rather than using
/// `CommandExt::uid`: the binary may live under a directory (such as
/// `/root`) that the target user cannot enter, and [`spawn_in`] needs root
/// until `exec`.
pub fn testkit_command<I, S>(args: I) -> std::process::Command
where
    I: IntoIterator<Item = S>,
    S: AsRef<std::ffi::OsStr>,
{
    let mut cmd = std::process::Command::new(testkit());
    cmd.args(args);
    cmd
}

/// The real ztunnel binary (Istio ambient's node proxy): `WEIR_ZTUNNEL_BIN`,
/// else where `cargo xtask ztunnel` caches it
/// (`~/.cache/weir/ztunnel/62d82653/bin/ztunnel`, xtask/src/ztunnel.rs).
/// `None` after [`unavailable`] (a failure under CI and `cargo xtask
/// test`): the caller then skips.
pub fn ztunnel_bin() -> Option<PathBuf> {
    let from_env = std::env::var_os("WEIR_ZTUNNEL_BIN")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from);
    let default = std::env::var_os("HOME")
        .map(|h| PathBuf::from(h).join(".cache/weir/ztunnel/62d82653/bin/ztunnel"));
    if let Some(p) = from_env.or(default).filter(|p| p.is_file()) {
        return Some(p);
    }
    unavailable(
        "no ztunnel binary: set WEIR_ZTUNNEL_BIN, or run `cargo xtask ztunnel` (builds it from ../shared/reference/peers/ztunnel)",
    );
    None
}

/// ztunnel as a node proxy in shared (in-pod) mode, as the ZDS tests and
/// the ambient demo run it: its node agent at `socket` (`INPOD_UDS`, weir's
/// ZDS socket), workloads and services from the local XDS file `xds`
/// (`LOCAL_XDS_PATH`, ztunnel's `LocalConfig`), certificates from its fake
/// CA, no control plane (`XDS_ADDRESS` and `CA_ADDRESS` empty), as node
/// `node_name`, logging at info. The environment is otherwise empty
/// (`PATH` kept), so nothing of the caller's reaches ztunnel; callers add
/// their own variables (e.g. `LOG_FORMAT=json`).
pub fn ztunnel_command(
    bin: &std::path::Path,
    socket: &std::path::Path,
    xds: &std::path::Path,
    node_name: &str,
) -> std::process::Command {
    let mut cmd = std::process::Command::new(bin);
    cmd.env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("RUST_LOG", "info")
        .env("PROXY_MODE", "shared")
        .env("INPOD_UDS", socket)
        .env("FAKE_CA", "true")
        .env("XDS_ADDRESS", "")
        .env("CA_ADDRESS", "")
        .env("LOCAL_XDS_PATH", xds)
        .env("NODE_NAME", node_name);
    cmd
}

/// Path of the weir agent binary.
///
/// Taken from `WEIR_BIN` when set; otherwise `target/release/weir`, then
/// `target/debug/weir`, in the target directory the running test was built
/// in. Panics with "build the agent first: cargo xtask build" when none
/// exists.
pub fn weir_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("WEIR_BIN") {
        return PathBuf::from(p);
    }
    let mut looked = Vec::new();
    for target in target_dirs() {
        for profile in ["release", "debug"] {
            let candidate = target.join(profile).join("weir");
            if candidate.is_file() {
                return candidate;
            }
            looked.push(candidate);
        }
    }
    panic!("build the agent first: cargo xtask build (or set WEIR_BIN); looked for {looked:?}");
}

/// Directories that may hold this build's binaries: the running
/// executable's profile directory (`target/<profile>`, found from
/// `target/<profile>/deps/<test>` or `target/<profile>/<bin>`).
fn profile_dirs() -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    if let Ok(exe) = std::env::current_exe()
        && let Some(parent) = exe.parent()
    {
        if parent.file_name().is_some_and(|n| n == "deps")
            && let Some(profile) = parent.parent()
        {
            dirs.push(profile.to_path_buf());
        }
        dirs.push(parent.to_path_buf());
    }
    dirs
}

/// Candidate cargo target directories: the one the running executable was
/// built in, `CARGO_TARGET_DIR`, and the workspace's `target/`.
fn target_dirs() -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = profile_dirs()
        .iter()
        .filter_map(|d| d.parent().map(Path::to_path_buf))
        .collect();
    if let Some(d) = std::env::var_os("CARGO_TARGET_DIR") {
        dirs.push(PathBuf::from(d));
    }
    dirs.push(Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"));
    dirs.dedup();
    dirs
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unique_names_fit_interface_names() {
        let a = unique_name("averyveryverylongprefix");
        let b = unique_name("averyveryverylongprefix");
        assert_ne!(a, b);
        assert!(a.len() <= 15, "{a}");
        assert!(a.starts_with("avery"), "{a}");
        let c = unique_name("a/b c");
        assert!(c.starts_with("abc"), "{c}");
    }

    #[test]
    fn base36_digits() {
        assert_eq!(base36(0), "0");
        assert_eq!(base36(35), "z");
        assert_eq!(base36(36), "10");
        assert_eq!(base36(4_194_304), "2hwcg");
    }
}
