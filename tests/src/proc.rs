//! Child processes placed in a test's network namespace and cgroup.

use std::fs::{File, OpenOptions};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use nix::sched::{CloneFlags, setns};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::{Cgroup, NetNs, TempDir};

/// A child process started by [`spawn_in`].
///
/// Its stdout and stderr go to files, so they can be read while it runs and
/// after it died. Dropping the guard kills it (`SIGKILL`) and reaps it; when
/// the drop happens because a test is panicking, the captured output is
/// printed first, so a failing test shows what its processes said.
#[derive(Debug)]
pub struct Proc {
    child: Child,
    status: Option<ExitStatus>,
    what: String,
    dir: TempDir,
}

/// Starts `cmd` inside `netns` and `cgroup` (each optional), with stdin from
/// `/dev/null` and stdout/stderr captured to files (see [`Proc::logs`]).
///
/// The process joins both before `exec`, so the program's first instruction
/// already runs in the namespace and the cgroup (and so is subject to the
/// programs attached to it). Do not combine with `CommandExt::uid`/`gid`
/// (they apply before joining, which then lacks the privileges); have the
/// program drop privileges itself, as `weir-testkit --uid` does. Panics when
/// the process cannot be started.
pub fn spawn_in(netns: Option<&NetNs>, cgroup: Option<&Cgroup>, cmd: Command) -> Proc {
    spawn_in_netns_path(netns.map(NetNs::path), cgroup, cmd)
}

/// Like [`spawn_in`], with the network namespace given by the path of its
/// file (a bind mount such as `/var/run/netns/NAME`, or `/proc/PID/ns/net`)
/// rather than a [`NetNs`] guard: for namespaces the caller manages itself.
pub fn spawn_in_netns_path(
    netns: Option<&Path>,
    cgroup: Option<&Cgroup>,
    mut cmd: Command,
) -> Proc {
    let what = format!("{cmd:?}");
    let dir = TempDir::new("proc");
    let create = |name: &str| {
        File::create(dir.join(name))
            .unwrap_or_else(|e| panic!("creating {}: {e}", dir.join(name).display()))
    };
    cmd.stdin(Stdio::null())
        .stdout(create("stdout"))
        .stderr(create("stderr"));

    join_before_exec(&mut cmd, netns, cgroup.map(Cgroup::path))
        .unwrap_or_else(|e| panic!("starting {what}: {e}"));
    let child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("starting {what}: {e}"));
    Proc {
        child,
        status: None,
        what,
        dir,
    }
}

/// Makes `cmd`'s process join the cgroup whose directory is `cgroup` and
/// the network namespace whose file is `netns` (each optional) before
/// `exec`, so its first instruction already runs in both. Fails when
/// either cannot be opened (here, in the parent); a failure to join them
/// in the child makes its `spawn` fail.
pub fn join_before_exec(
    cmd: &mut Command,
    netns: Option<&Path>,
    cgroup: Option<&Path>,
) -> std::io::Result<()> {
    let annotate = |e: std::io::Error, what: &Path| {
        std::io::Error::new(e.kind(), format!("opening {}: {e}", what.display()))
    };
    // Opened here, in the parent, so the child only has to make system
    // calls on descriptors it already holds.
    let netns_file = netns
        .map(|p| File::open(p).map_err(|e| annotate(e, p)))
        .transpose()?;
    let cgroup_procs = cgroup
        .map(|cg| {
            let procs = cg.join("cgroup.procs");
            OpenOptions::new()
                .write(true)
                .open(&procs)
                .map_err(|e| annotate(e, &procs))
        })
        .transpose()?;
    // SAFETY: the closure runs in the forked child before `exec`, where only
    // async-signal-safe operations are allowed. It makes just two system
    // calls, write(2) and setns(2), on descriptors opened above (no
    // allocation, no locks), and returns errors as raw errno values.
    // Writing "0" to cgroup.procs moves the writing process itself.
    unsafe {
        cmd.pre_exec(move || {
            if let Some(procs) = &cgroup_procs {
                nix::unistd::write(procs, b"0")?;
            }
            if let Some(ns) = &netns_file {
                setns(ns, CloneFlags::CLONE_NEWNET)?;
            }
            Ok(())
        });
    }
    Ok(())
}

impl Proc {
    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The exit status if the process has ended (reaping it), else `None`.
    pub fn try_status(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            self.status = self
                .child
                .try_wait()
                .unwrap_or_else(|e| panic!("waiting for {}: {e}", self.what));
        }
        self.status
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        self.try_status().is_none()
    }

    /// Waits up to `timeout` for the process to end; returns its status, or
    /// `None` if it is still running.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + crate::patience(timeout);
        loop {
            if let Some(status) = self.try_status() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Sends `signal` (for example `SIGTERM` to test a graceful shutdown).
    /// Does nothing once the process has been reaped.
    pub fn signal(&mut self, signal: Signal) {
        if self.status.is_none() {
            let _ = kill(Pid::from_raw(self.child.id() as i32), signal);
        }
    }

    /// Kills the process (`SIGKILL`) and reaps it; returns its status.
    pub fn kill(&mut self) -> ExitStatus {
        if let Some(status) = self.status {
            return status;
        }
        let _ = self.child.kill();
        let status = self
            .child
            .wait()
            .unwrap_or_else(|e| panic!("waiting for {}: {e}", self.what));
        self.status = Some(status);
        status
    }

    /// Everything the process wrote to stdout so far.
    pub fn stdout(&self) -> String {
        self.read_log("stdout")
    }

    /// Everything the process wrote to stderr so far.
    pub fn stderr(&self) -> String {
        self.read_log("stderr")
    }

    /// The file the process's stderr goes to (to follow it from an
    /// offset while it runs).
    pub fn stderr_path(&self) -> PathBuf {
        self.dir.join("stderr")
    }

    fn read_log(&self, name: &str) -> String {
        std::fs::read(self.dir.join(name))
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_else(|e| format!("<cannot read {name}: {e}>"))
    }

    /// The command line, pid, exit status and captured output, formatted to
    /// print when a test fails.
    pub fn logs(&self) -> String {
        let status = match self.status {
            Some(s) => s.to_string(),
            None => "running".to_owned(),
        };
        format!(
            "----- {} (pid {}, {status}) -----\n--- stdout ---\n{}\n--- stderr ---\n{}\n-----",
            self.what,
            self.child.id(),
            self.stdout().trim_end(),
            self.stderr().trim_end(),
        )
    }

    /// Waits up to `timeout` for `path` to exist (a `--ready-file`). Panics,
    /// with the process's logs, on timeout or when the process ends first.
    pub fn wait_for_file(&mut self, path: &Path, timeout: Duration) {
        self.wait_for(timeout, &format!("{} to exist", path.display()), |_| {
            path.exists()
        });
    }

    /// Waits up to `timeout` for `needle` to appear in the process's stdout
    /// or stderr. Panics, with the logs, on timeout or when the process ends
    /// first.
    pub fn wait_for_output(&mut self, needle: &str, timeout: Duration) {
        self.wait_for(timeout, &format!("output {needle:?}"), |p| {
            p.stdout().contains(needle) || p.stderr().contains(needle)
        });
    }

    fn wait_for(&mut self, timeout: Duration, what: &str, mut done: impl FnMut(&Proc) -> bool) {
        let timeout = crate::patience(timeout);
        let deadline = Instant::now() + timeout;
        loop {
            if done(self) {
                return;
            }
            if let Some(status) = self.try_status() {
                // One last look: the process may have finished its work and
                // exited between the two checks.
                if done(self) {
                    return;
                }
                panic!(
                    "process exited ({status}) while waiting for {what}\n{}",
                    self.logs()
                );
            }
            if Instant::now() >= deadline {
                panic!(
                    "timed out after {timeout:?} waiting for {what}\n{}",
                    self.logs()
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if self.status.is_none() {
            let _ = self.child.kill();
            match self.child.wait() {
                Ok(status) => self.status = Some(status),
                Err(e) => eprintln!("weir-tests: reaping {}: {e}", self.what),
            }
        }
        if std::thread::panicking() {
            eprintln!("{}", self.logs());
        }
    }
}
