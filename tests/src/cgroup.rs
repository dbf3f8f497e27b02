//! Child cgroups (cgroup v2) for the processes of one test.

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::unique_name;

/// How long `Drop` waits for killed processes to leave a cgroup.
const KILL_TIMEOUT: Duration = Duration::from_secs(5);

/// Where the cgroup v2 hierarchy is mounted, read from `/proc/self/mounts`
/// (the first `cgroup2` entry; `/sys/fs/cgroup/unified` on hybrid systems,
/// `/sys/fs/cgroup` on unified ones). Panics when there is none.
pub fn cgroup2_mount() -> &'static Path {
    static MOUNT: OnceLock<PathBuf> = OnceLock::new();
    MOUNT.get_or_init(|| {
        find_cgroup2_mount()
            .unwrap_or_else(|| panic!("no cgroup2 file system in /proc/self/mounts"))
    })
}

/// Like [`cgroup2_mount`], `None` when there is no cgroup2 file system
/// (or `/proc/self/mounts` cannot be read).
pub fn find_cgroup2_mount() -> Option<PathBuf> {
    mount_points()
        .into_iter()
        .find_map(|(target, fstype)| (fstype == "cgroup2").then_some(target))
}

/// Whether something is mounted on `path` (exactly), per
/// `/proc/self/mounts`.
pub fn is_mount_point(path: &Path) -> bool {
    mount_points().iter().any(|(target, _)| target == path)
}

/// (mount point, file system type) of every entry of `/proc/self/mounts`.
fn mount_points() -> Vec<(PathBuf, String)> {
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    mounts
        .lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let (_source, target, fstype) = (fields.next()?, fields.next()?, fields.next()?);
            Some((
                PathBuf::from(unescape_mount_path(target)),
                fstype.to_string(),
            ))
        })
        .collect()
}

/// Undoes the octal escapes (`\040` for a space, …) of `/proc/self/mounts`.
fn unescape_mount_path(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes.get(i + 1..i + 4);
        if bytes[i] == b'\\'
            && let Some(digits) = octal
            && digits.iter().all(|d| (b'0'..=b'7').contains(d))
        {
            let v = digits.iter().fold(0u32, |v, d| v * 8 + u32::from(d - b'0'));
            out.push(v as u8);
            i += 4;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A cgroup v2 directory created for a test, named
/// `weir-test-<unique name>` under the cgroup2 mount (or under another
/// `Cgroup`, see [`Cgroup::child`]).
///
/// Dropping it kills every process still in it or in a descendant
/// (`cgroup.kill`, plus `SIGKILL` to each listed process), waits up to 5 s
/// for them to leave, then removes the directories, deepest first.
#[derive(Debug)]
pub struct Cgroup {
    path: PathBuf,
}

impl Cgroup {
    /// Creates a new cgroup directly under the cgroup2 mount. Panics when
    /// it cannot.
    pub fn new(prefix: &str) -> Cgroup {
        Cgroup::create(cgroup2_mount(), prefix)
    }

    /// Creates a new cgroup nested in this one (for example a pod's cgroup
    /// under a "kubepods" cgroup). Drop the child first; dropping the parent
    /// removes remaining children anyway.
    pub fn child(&self, prefix: &str) -> Cgroup {
        Cgroup::create(&self.path, prefix)
    }

    /// Creates a cgroup nested in this one with exactly the name `name`
    /// (a path as the kubelet lays them out, e.g. `pod<uid>`, which the
    /// agent parses). The caller keeps names unique.
    pub fn child_named(&self, name: &str) -> Cgroup {
        let path = self.path.join(name);
        std::fs::create_dir(&path)
            .unwrap_or_else(|e| panic!("creating cgroup {}: {e}", path.display()));
        Cgroup { path }
    }

    fn create(parent: &Path, prefix: &str) -> Cgroup {
        let path = parent.join(format!("weir-test-{}", unique_name(prefix)));
        std::fs::create_dir(&path)
            .unwrap_or_else(|e| panic!("creating cgroup {}: {e}", path.display()));
        Cgroup { path }
    }

    /// The cgroup's directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Opens the cgroup's directory, as programs are attached to it
    /// (`cgroup/connect4`, `sockops`, `cgroup/getsockopt`, …).
    pub fn open(&self) -> File {
        File::open(&self.path)
            .unwrap_or_else(|e| panic!("opening cgroup {}: {e}", self.path.display()))
    }

    /// The cgroup's id, as `bpf_get_current_cgroup_id()` and
    /// `bpf_skb_cgroup_id()` return it (the inode number of its directory).
    pub fn id(&self) -> u64 {
        std::fs::metadata(&self.path)
            .unwrap_or_else(|e| panic!("stat {}: {e}", self.path.display()))
            .ino()
    }

    /// Process ids listed in this cgroup's `cgroup.procs` (not those of
    /// descendants).
    pub fn procs(&self) -> Vec<i32> {
        read_procs(&self.path)
            .unwrap_or_else(|e| panic!("reading {}/cgroup.procs: {e}", self.path.display()))
    }

    /// Moves process `pid` (all its threads) into this cgroup.
    pub fn add(&self, pid: u32) {
        let procs = self.path.join("cgroup.procs");
        std::fs::OpenOptions::new()
            .write(true)
            .open(&procs)
            .and_then(|mut f| f.write_all(pid.to_string().as_bytes()))
            .unwrap_or_else(|e| panic!("moving pid {pid} into {}: {e}", procs.display()));
    }
}

fn read_procs(dir: &Path) -> std::io::Result<Vec<i32>> {
    let text = std::fs::read_to_string(dir.join("cgroup.procs"))?;
    Ok(text.lines().filter_map(|l| l.trim().parse().ok()).collect())
}

/// Every cgroup directory from `dir` down, deepest first.
fn subtree_post_order(dir: &Path, out: &mut Vec<PathBuf>) {
    if let Ok(entries) = std::fs::read_dir(dir) {
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                subtree_post_order(&entry.path(), out);
            }
        }
    }
    out.push(dir.to_path_buf());
}

/// Process ids in the cgroup `dir` and every cgroup below it.
pub fn subtree_pids(dir: &Path) -> Vec<i32> {
    let mut dirs = Vec::new();
    subtree_post_order(dir, &mut dirs);
    dirs.iter()
        .flat_map(|d| read_procs(d).unwrap_or_default())
        .collect()
}

/// Kills every process in the cgroup `dir` and below it and waits up to
/// `timeout` for them to leave; returns the ones still there then.
///
/// `cgroup.kill` (Linux 5.14+) kills the whole subtree, including
/// processes forking right now; SIGKILL per pid covers older kernels.
pub fn kill_subtree(dir: &Path, timeout: Duration) -> Vec<i32> {
    if !dir.exists() {
        return Vec::new();
    }
    let _ = std::fs::write(dir.join("cgroup.kill"), b"1");
    let deadline = Instant::now() + timeout;
    loop {
        let pids = subtree_pids(dir);
        if pids.is_empty() || Instant::now() >= deadline {
            return pids;
        }
        for pid in pids {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Removes the cgroup `dir` and every cgroup below it, deepest first,
/// retrying each for up to a second (a cgroup can be busy for a moment
/// after its last process died). Returns (removed, total) and the errors
/// of those left.
pub fn remove_subtree(dir: &Path) -> (usize, usize, Vec<String>) {
    let mut dirs = Vec::new();
    subtree_post_order(dir, &mut dirs);
    let mut removed = 0;
    let mut errors = Vec::new();
    for d in &dirs {
        let mut last = None;
        for _ in 0..50 {
            match std::fs::remove_dir(d) {
                Ok(()) => {
                    last = None;
                    removed += 1;
                    break;
                }
                Err(e) => last = Some(e),
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        if let Some(e) = last {
            errors.push(format!("removing cgroup {}: {e}", d.display()));
        }
    }
    (removed, dirs.len(), errors)
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        if !self.path.exists() {
            return;
        }
        let left = kill_subtree(&self.path, KILL_TIMEOUT);
        if !left.is_empty() {
            eprintln!(
                "weir-tests: processes {left:?} still in cgroup {} after {KILL_TIMEOUT:?}",
                self.path.display()
            );
        }
        for e in remove_subtree(&self.path).2 {
            eprintln!("weir-tests: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unescapes_mount_paths() {
        assert_eq!(unescape_mount_path("/a\\040b"), "/a b");
        assert_eq!(unescape_mount_path("/sys/fs/cgroup"), "/sys/fs/cgroup");
        assert_eq!(unescape_mount_path("/x\\"), "/x\\");
    }
}
