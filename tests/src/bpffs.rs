//! Private bpffs instances to pin programs and maps into.

use std::path::{Path, PathBuf};

use nix::mount::{MntFlags, MsFlags, mount, umount2};

use crate::unique_name;

/// A fresh bpffs instance mounted on `/tmp/weir-bpffs-<unique name>`.
///
/// Each mount of type `bpf` is a new, empty instance, so pins made by one
/// test (or by the agent it runs with `--bpffs`) are invisible to others
/// and to `/sys/fs/bpf`. Dropping it detaches the mount (pinned objects
/// that nothing else holds are freed) and removes the directory.
#[derive(Debug)]
pub struct Bpffs {
    path: PathBuf,
}

impl Bpffs {
    /// Creates the directory and mounts bpffs on it. Panics when it cannot.
    pub fn new() -> Bpffs {
        let path = Path::new("/tmp").join(format!("weir-bpffs-{}", unique_name("")));
        std::fs::create_dir(&path)
            .unwrap_or_else(|e| panic!("creating bpffs mount point {}: {e}", path.display()));
        if let Err(e) = mount_bpffs(&path) {
            let _ = std::fs::remove_dir(&path);
            panic!("mount -t bpf bpf {}: {e}", path.display());
        }
        Bpffs { path }
    }

    /// The mount point.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// `path()/name`.
    pub fn join(&self, name: impl AsRef<Path>) -> PathBuf {
        self.path.join(name)
    }
}

/// Mounts a new bpffs instance on the directory `path` (`mount -t bpf bpf
/// PATH`, nosuid, nodev, noexec).
pub fn mount_bpffs(path: &Path) -> nix::Result<()> {
    mount(
        Some("bpf"),
        path,
        Some("bpf"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        None::<&str>,
    )
}

impl Default for Bpffs {
    fn default() -> Self {
        Bpffs::new()
    }
}

impl Drop for Bpffs {
    fn drop(&mut self) {
        if let Err(e) = umount2(&self.path, MntFlags::MNT_DETACH) {
            eprintln!("weir-tests: unmounting bpffs {}: {e}", self.path.display());
            // Do not remove a directory that may still be a mount point.
            return;
        }
        if let Err(e) = std::fs::remove_dir(&self.path) {
            eprintln!("weir-tests: removing {}: {e}", self.path.display());
        }
    }
}
