//! Why each pod is enrolled, as the Kubernetes agent last decided: a small
//! JSON file (`--state-file`, beside the CNI socket by default) that `weir
//! status` and `weir explain` read. The pinned maps say how a pod is
//! captured, not why (a pod label, or its namespace's label for an
//! ambient pod); the file adds that. An entry counts only while its netns
//! cookie is the enrolled pod's, so a stale file says nothing wrong.
//!
//! The agent also reads it back at start: when namespaces cannot be read,
//! an ambient pod its namespace's label enrolled before stays ambient
//! (the last decision) instead of being removed because of the error.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::reconcile::Enrolled;

/// The default `--state-file`.
pub const DEFAULT_STATE_FILE: &str = "/var/run/weir/pods.json";

/// `--state-file` of `weir status` and `weir explain`.
#[derive(clap::Args, Debug, Clone)]
pub struct StateFileArg {
    /// The file where the Kubernetes agent records why each pod is
    /// enrolled (`weir run --kubernetes --state-file`); missing: no
    /// reasons shown.
    #[arg(long, env = "WEIR_STATE_FILE", default_value = DEFAULT_STATE_FILE)]
    pub state_file: PathBuf,
}

/// One enrolled pod.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodReason {
    /// Its Kubernetes UID (empty when unknown).
    #[serde(default)]
    pub uid: String,
    /// The netns cookie it was enrolled under.
    pub netns_cookie: u64,
    /// Its mesh (`istio`, `ambient`, ...).
    pub mesh: String,
    /// Why an ambient pod is ambient (`namespace label ...`); empty for
    /// the sidecar meshes.
    pub reason: String,
}

/// Every enrolled pod, by `namespace/name`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reasons {
    /// The pods.
    pub pods: BTreeMap<String, PodReason>,
}

impl Reasons {
    /// The reasons of the reconciler's enrolled pods.
    pub fn of(pods: &BTreeMap<String, Enrolled>) -> Reasons {
        Reasons {
            pods: pods
                .iter()
                .map(|(k, p)| {
                    (
                        k.clone(),
                        PodReason {
                            uid: p.spec.uid.clone(),
                            netns_cookie: p.cookie,
                            mesh: p.spec.mesh.to_string(),
                            reason: p.spec.reason.clone(),
                        },
                    )
                })
                .collect(),
        }
    }

    /// Writes the file (atomically: a reader never sees half of it).
    pub fn write(&self, path: &Path) -> std::io::Result<()> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let tmp = path.with_extension("json.tmp");
        std::fs::write(&tmp, serde_json::to_vec_pretty(self)?)?;
        std::fs::rename(&tmp, path)
    }

    /// The file at `path`; empty when it is missing or unreadable.
    pub fn read(path: &Path) -> Reasons {
        std::fs::read(path)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default()
    }

    /// Whether pod `key` / `uid` was enrolled as ambient, and why.
    pub fn ambient(&self, key: &str, uid: &str) -> Option<&str> {
        self.pods
            .get(key)
            .filter(|p| p.uid == uid && p.mesh == "ambient")
            .map(|p| p.reason.as_str())
    }

    /// Why pod `key`, enrolled under `cookie`, is ambient (`None`: not
    /// recorded, or recorded for another incarnation).
    pub fn reason(&self, key: &str, cookie: u64) -> Option<&str> {
        self.pods
            .get(key)
            .filter(|p| p.netns_cookie == cookie && !p.reason.is_empty())
            .map(|p| p.reason.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_stale_entries() {
        let dir = crate::testutil::TempDir::new("reasons");
        let path = dir.path().join("run/pods.json");
        assert_eq!(Reasons::read(&path), Reasons::default(), "missing file");
        let mut r = Reasons::default();
        r.pods.insert(
            "shop/web".into(),
            PodReason {
                uid: "u-web".into(),
                netns_cookie: 7,
                mesh: "ambient".into(),
                reason: "namespace label istio.io/dataplane-mode=ambient".into(),
            },
        );
        r.pods.insert(
            "shop/side".into(),
            PodReason {
                uid: "u-side".into(),
                netns_cookie: 8,
                mesh: "istio".into(),
                reason: String::new(),
            },
        );
        r.write(&path).unwrap();
        let back = Reasons::read(&path);
        assert_eq!(back, r);
        assert_eq!(
            back.reason("shop/web", 7),
            Some("namespace label istio.io/dataplane-mode=ambient")
        );
        assert_eq!(back.reason("shop/web", 9), None, "another incarnation");
        assert_eq!(back.reason("shop/side", 8), None, "no reason recorded");
        std::fs::write(&path, "not json").unwrap();
        assert_eq!(Reasons::read(&path), Reasons::default());
    }
}
