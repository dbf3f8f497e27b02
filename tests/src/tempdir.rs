//! Temporary directories that processes running as other users can use.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use crate::unique_name;

/// A fresh directory under `/tmp`, removed with its contents on drop.
///
/// Its mode is `01777` (like `/tmp` itself), so a process that dropped its
/// privileges (a sidecar as UID 1337, an application as UID 1000) can still
/// create files in it, such as `--ready-file` markers.
#[derive(Debug)]
pub struct TempDir {
    path: PathBuf,
}

impl TempDir {
    /// Creates `/tmp/weir-<unique name>` (see [`unique_name`]). Panics when
    /// it cannot.
    pub fn new(prefix: &str) -> TempDir {
        let path = Path::new("/tmp").join(format!("weir-{}", unique_name(prefix)));
        std::fs::create_dir(&path)
            .unwrap_or_else(|e| panic!("creating temporary directory {}: {e}", path.display()));
        let dir = TempDir { path };
        std::fs::set_permissions(&dir.path, std::fs::Permissions::from_mode(0o1777))
            .unwrap_or_else(|e| panic!("chmod 1777 {}: {e}", dir.path.display()));
        dir
    }

    /// The directory's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// `path()/name`.
    pub fn join(&self, name: impl AsRef<Path>) -> PathBuf {
        self.path.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_dir_all(&self.path) {
            eprintln!(
                "weir-tests: removing temporary directory {}: {e}",
                self.path.display()
            );
        }
    }
}
