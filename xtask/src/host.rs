//! Facts about the machine xtask runs on: who we are, where programs live.

use std::env;
use std::ffi::OsString;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use crate::cmd::Cmd;

/// Directories searched after `PATH` for administration tools: a non-root
/// user's `PATH` on Debian has no `sbin`, yet `ip`, `bpftool` and `iptables`
/// live there.
const SBIN_DIRS: &[&str] = &["/usr/sbin", "/sbin"];

/// The cargo to run for host builds.
///
/// `cargo run` (and so `cargo xtask`) sets `CARGO` to the cargo binary that
/// started us, so nested builds use the same toolchain as the outer one
/// instead of whatever a rustup override would pick.
pub fn cargo() -> OsString {
    env::var_os("CARGO").unwrap_or_else(|| "cargo".into())
}

/// `$CARGO_HOME/bin`, where `cargo install` puts binaries (default
/// `~/.cargo/bin`).
pub fn cargo_bin_dir() -> PathBuf {
    let home = env::var_os("CARGO_HOME")
        .filter(|h| !h.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let user_home = env::var_os("HOME").unwrap_or_else(|| "/root".into());
            Path::new(&user_home).join(".cargo")
        });
    home.join("bin")
}

/// Whether the effective user is root, so package installs need no `sudo`.
///
/// Reads `/proc/self/status` (no libc dependency) and falls back to `id -u`.
pub fn is_root() -> bool {
    let from_proc = fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| parse_euid(&status));
    let euid = from_proc.or_else(|| Cmd::new("id").arg("-u").read().ok()?.parse().ok());
    euid == Some(0)
}

/// The effective UID from the `Uid:` line of `/proc/<pid>/status`, whose
/// fields are real, effective, saved and filesystem UID (see proc(5)).
fn parse_euid(status: &str) -> Option<u32> {
    status
        .lines()
        .find_map(|line| line.strip_prefix("Uid:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// Finds an executable named `name` on `PATH`, then in `extra_dirs`.
pub fn find_program(name: &str, extra_dirs: &[&Path]) -> Option<PathBuf> {
    let path = env::var_os("PATH").unwrap_or_default();
    env::split_paths(&path)
        .chain(extra_dirs.iter().map(|d| d.to_path_buf()))
        .map(|dir| dir.join(name))
        .find(|candidate| is_executable(candidate))
}

/// Like [`find_program`], also looking in the `sbin` directories.
pub fn find_admin_program(name: &str) -> Option<PathBuf> {
    let sbin: Vec<&Path> = SBIN_DIRS.iter().map(Path::new).collect();
    find_program(name, &sbin)
}

pub fn is_executable(path: &Path) -> bool {
    fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// `PATH` with `dir` in front, or `None` when `dir` is already on it (then
/// the caller's `PATH` can be passed on unchanged).
pub fn path_with(dir: &Path) -> Option<OsString> {
    let current = env::var_os("PATH").unwrap_or_default();
    let mut dirs: Vec<PathBuf> = env::split_paths(&current).collect();
    if dirs.iter().any(|d| d == dir) {
        return None;
    }
    dirs.insert(0, dir.to_path_buf());
    // A directory with a ':' in its name cannot go on PATH; the linker is
    // passed by full path anyway, so keep the caller's PATH then.
    env::join_paths(dirs).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn euid_is_the_second_uid_field() {
        let status = "Name:\tcat\nUid:\t1000\t0\t0\t0\nGid:\t1000\t1000\t1000\t1000\n";
        assert_eq!(parse_euid(status), Some(0));
        assert_eq!(parse_euid("Name:\tcat\n"), None);
    }

    #[test]
    fn finds_sh_on_path() {
        assert!(find_program("sh", &[]).is_some());
        assert!(find_program("weir-no-such-program", &[]).is_none());
    }
}
