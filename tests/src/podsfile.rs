//! The agent's pods file (`weir run --pods-file`), written the one way the
//! tests, the benchmark, the soak and the demo all write it: serialized
//! with serde (so every value is quoted as YAML needs it) and replaced in
//! one rename, so the agent never reads a half-written file.
//!
//! Hand-written pods files stay where a test checks what the agent does
//! with text a serializer would never produce (bad input).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::NetNs;

/// One entry of the pods file (the fields the agent's `podsfile` reads).
#[derive(Clone, Debug, Default, Serialize)]
pub struct PodEntry {
    /// Pod name.
    pub name: String,
    /// Kubernetes namespace (`None`: the agent's default, `default`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// The pod's network namespace file.
    pub netns: PathBuf,
    /// The pod's addresses.
    pub ips: Vec<String>,
    /// `istio` (the default when `None`), `linkerd` or `kuma`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mesh: Option<String>,
    /// Pod annotations.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
    /// Kubernetes pod UID (`None`: the agent's default,
    /// `<namespace>/<name>`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub uid: Option<String>,
    /// The pod's service account (`None`: `default`).
    #[serde(rename = "serviceAccount", skip_serializing_if = "Option::is_none")]
    pub service_account: Option<String>,
    /// Pod labels (ambient enrollment: `istio.io/dataplane-mode`).
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// Labels of the pod's namespace (ambient enrollment).
    #[serde(rename = "namespaceLabels", skip_serializing_if = "BTreeMap::is_empty")]
    pub namespace_labels: BTreeMap<String, String>,
}

impl PodEntry {
    /// An Istio pod in `ns` with `ips`.
    pub fn new(name: &str, ns: &NetNs, ips: &[&str]) -> Self {
        Self::at(name, ns.path(), ips)
    }

    /// An Istio pod whose network namespace file is `netns` (a namespace
    /// the caller manages itself) with `ips`.
    pub fn at(name: &str, netns: &Path, ips: &[&str]) -> Self {
        Self {
            name: name.to_string(),
            netns: netns.to_path_buf(),
            ips: ips.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        }
    }

    /// Sets the Kubernetes namespace.
    pub fn namespace(mut self, namespace: &str) -> Self {
        self.namespace = Some(namespace.to_string());
        self
    }

    /// Adds an annotation.
    pub fn annotate(mut self, k: &str, v: &str) -> Self {
        self.annotations.insert(k.to_string(), v.to_string());
        self
    }

    /// Adds every annotation of `annotations`.
    pub fn annotate_all(mut self, annotations: impl IntoIterator<Item = (String, String)>) -> Self {
        self.annotations.extend(annotations);
        self
    }
}

#[derive(Serialize)]
struct PodsFile<'a> {
    pods: &'a [PodEntry],
}

/// The pods file listing `pods` (`pods: []` when empty).
pub fn pods_yaml(pods: &[PodEntry]) -> String {
    serde_yaml_ng::to_string(&PodsFile { pods })
        .unwrap_or_else(|e| panic!("serializing a pods file: {e}"))
}

/// Replaces `path` with `text` in one rename (a temporary file next to it
/// first), so a reader sees the old file or the new one, never a part.
pub fn write_atomically(path: &Path, text: &str) -> std::io::Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_file_lists_no_pods() {
        let v: serde_yaml_ng::Value = serde_yaml_ng::from_str(&pods_yaml(&[])).unwrap();
        assert_eq!(v["pods"].as_sequence().map(Vec::len), Some(0));
    }

    #[test]
    fn values_that_look_like_numbers_stay_strings() {
        let e = PodEntry::at(
            "a",
            Path::new("/var/run/netns/a"),
            &["198.18.0.1", "2001:2::1"],
        )
        .namespace("shop")
        .annotate("traffic.sidecar.istio.io/excludeOutboundPorts", "3306")
        .annotate("x", "a \"quoted\": value");
        let text = pods_yaml(std::slice::from_ref(&e));
        let v: serde_yaml_ng::Value = serde_yaml_ng::from_str(&text).unwrap();
        let pod = &v["pods"][0];
        assert_eq!(pod["name"].as_str(), Some("a"), "{text}");
        assert_eq!(pod["namespace"].as_str(), Some("shop"), "{text}");
        assert_eq!(pod["netns"].as_str(), Some("/var/run/netns/a"), "{text}");
        assert_eq!(pod["ips"][1].as_str(), Some("2001:2::1"), "{text}");
        assert_eq!(
            pod["annotations"]["traffic.sidecar.istio.io/excludeOutboundPorts"].as_str(),
            Some("3306"),
            "{text}"
        );
        assert_eq!(
            pod["annotations"]["x"].as_str(),
            Some("a \"quoted\": value"),
            "{text}"
        );
        assert!(pod.get("mesh").is_none(), "{text}");
        assert!(pod.get("serviceAccount").is_none(), "{text}");
    }

    #[test]
    fn ambient_fields_use_the_agents_names() {
        let mut e = PodEntry::at("a", Path::new("/n/a"), &[]);
        e.uid = Some("u-1".into());
        e.service_account = Some("sa".into());
        e.labels
            .insert("istio.io/dataplane-mode".into(), "ambient".into());
        e.namespace_labels.insert("team".into(), "x".into());
        let text = pods_yaml(std::slice::from_ref(&e));
        let v: serde_yaml_ng::Value = serde_yaml_ng::from_str(&text).unwrap();
        let pod = &v["pods"][0];
        assert_eq!(pod["uid"].as_str(), Some("u-1"), "{text}");
        assert_eq!(pod["serviceAccount"].as_str(), Some("sa"), "{text}");
        assert_eq!(
            pod["labels"]["istio.io/dataplane-mode"].as_str(),
            Some("ambient"),
            "{text}"
        );
        assert_eq!(pod["namespaceLabels"]["team"].as_str(), Some("x"), "{text}");
    }

    #[test]
    fn writes_by_rename() {
        let dir = std::env::temp_dir().join(format!("weir-podsfile-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("pods.yaml");
        write_atomically(&path, "pods: []\n").unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "pods: []\n");
        assert!(!dir.join("pods.yaml.tmp").exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
