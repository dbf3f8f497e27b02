//! The workloads file of `weir zds-serve`: the pods to hand to ztunnel,
//! without loading any kernel program (for tests and for trying ztunnel
//! by hand).
//!
//! ```yaml
//! workloads:
//!   - uid: 0b6c4f1e-...           # required: ztunnel's key for the pod
//!     name: productpage-v1         # required
//!     namespace: bookinfo          # optional, default "default"
//!     service_account: bookinfo-productpage   # optional, default "default"
//!     netns: /var/run/netns/productpage       # optional: none = kept
//! ```
//!
//! A file that is not YAML is an error as a whole; a bad entry is reported
//! (file, entry, field) and skipped.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::Workload;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    #[serde(default)]
    workloads: Vec<serde_yaml_ng::Value>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawWorkload {
    uid: String,
    name: String,
    #[serde(default = "default_name")]
    namespace: String,
    #[serde(default = "default_name")]
    service_account: String,
    #[serde(default)]
    netns: Option<PathBuf>,
}

fn default_name() -> String {
    "default".to_string()
}

/// The valid workloads of a file, and one message per bad entry.
#[derive(Debug, Default)]
pub struct WorkloadsFile {
    /// Valid entries.
    pub workloads: Vec<Workload>,
    /// Problems, each naming the file, the entry and the field.
    pub errors: Vec<String>,
}

/// Parses workloads-file text (`path` is only used in messages).
pub fn parse(path: &Path, text: &str) -> Result<WorkloadsFile, String> {
    if text.trim().is_empty() {
        return Err(format!(
            "workloads file {}: empty (still being written?); write `workloads: []` for none, and replace the file atomically",
            path.display()
        ));
    }
    let raw: RawFile = serde_yaml_ng::from_str(text).map_err(|e| {
        format!(
            "workloads file {}: {e}; expected a mapping with a `workloads:` list",
            path.display()
        )
    })?;
    let mut out = WorkloadsFile::default();
    for (i, v) in raw.workloads.into_iter().enumerate() {
        let w: RawWorkload = match serde_yaml_ng::from_value(v) {
            Ok(w) => w,
            Err(e) => {
                out.errors.push(format!(
                    "workloads file {}: entry {i}: {e} (fields: uid, name, namespace, service_account, netns)",
                    path.display()
                ));
                continue;
            }
        };
        let mut problem = None;
        for (field, value) in [
            ("uid", &w.uid),
            ("name", &w.name),
            ("namespace", &w.namespace),
            ("service_account", &w.service_account),
        ] {
            if value.trim().is_empty() {
                problem = Some(format!("`{field}` is empty; give the pod's {field}"));
                break;
            }
        }
        if problem.is_none()
            && let Some(p) = &w.netns
            && !p.is_absolute()
        {
            problem = Some(format!(
                "`netns` {}: not an absolute path; give /proc/PID/ns/net or /var/run/netns/NAME",
                p.display()
            ));
        }
        if let Some(p) = problem {
            out.errors.push(format!(
                "workloads file {}: entry {i} ({}/{}): {p}",
                path.display(),
                w.namespace,
                w.name
            ));
            continue;
        }
        out.workloads.push(Workload {
            uid: w.uid,
            name: w.name,
            namespace: w.namespace,
            service_account: w.service_account,
            netns: w.netns,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_entries_with_defaults() {
        let f = parse(
            Path::new("w.yaml"),
            "workloads:\n  - uid: u1\n    name: a\n    netns: /var/run/netns/a\n  - uid: u2\n    name: b\n    namespace: ns\n    service_account: sa\n",
        )
        .unwrap();
        assert!(f.errors.is_empty(), "{:?}", f.errors);
        assert_eq!(f.workloads.len(), 2);
        assert_eq!(f.workloads[0].namespace, "default");
        assert_eq!(f.workloads[0].service_account, "default");
        assert_eq!(
            f.workloads[0].netns.as_deref(),
            Some(Path::new("/var/run/netns/a"))
        );
        assert_eq!(f.workloads[1].netns, None);
        assert_eq!(f.workloads[1].key(), "ns/b");
    }

    #[test]
    fn bad_entries_are_named_and_skipped() {
        let f = parse(
            Path::new("w.yaml"),
            "workloads:\n  - uid: ''\n    name: a\n  - uid: u2\n    name: b\n    netns: rel/path\n  - uid: u3\n    name: c\n    colour: red\n  - uid: u4\n    name: d\n",
        )
        .unwrap();
        assert_eq!(f.workloads.len(), 1, "{:?}", f.errors);
        assert_eq!(f.workloads[0].uid, "u4");
        assert_eq!(f.errors.len(), 3);
        assert!(f.errors[0].contains("`uid` is empty"), "{}", f.errors[0]);
        assert!(
            f.errors[1].contains("`netns` rel/path: not an absolute path"),
            "{}",
            f.errors[1]
        );
        assert!(
            f.errors[2].contains("entry 2") && f.errors[2].contains("colour"),
            "{}",
            f.errors[2]
        );
    }

    #[test]
    fn empty_or_not_yaml_is_refused_whole() {
        assert!(
            parse(Path::new("w.yaml"), "  \n")
                .unwrap_err()
                .contains("empty")
        );
        assert!(
            parse(Path::new("w.yaml"), "pods: []\n")
                .unwrap_err()
                .contains("`workloads:` list")
        );
    }
}
