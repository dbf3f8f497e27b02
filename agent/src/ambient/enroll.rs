//! Which pods are ambient (istio-cni's enrollment rule). Plain std, also
//! compiled into the weir-cni plugin (through `k8s/classify.rs`).

use std::collections::BTreeMap;

/// The label (on the pod or its namespace) that puts a pod in ambient
/// mode: `ambient`; `none` on the pod opts it out.
pub const DATAPLANE_MODE: &str = "istio.io/dataplane-mode";
/// [`DATAPLANE_MODE`]'s value for ambient.
pub const DATAPLANE_AMBIENT: &str = "ambient";
/// [`DATAPLANE_MODE`]'s opt-out value.
pub const DATAPLANE_NONE: &str = "none";
/// Istio's injector writes this on every pod with a sidecar.
pub const SIDECAR_STATUS: &str = "sidecar.istio.io/status";

/// Whether a pod is captured for ambient mode, and why (or why not).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Enrollment {
    /// Ambient; the reason names the label that decided it.
    Ambient(String),
    /// Not ambient; why.
    NotAmbient(String),
}

impl Enrollment {
    /// Whether the pod is ambient.
    #[cfg(test)]
    pub fn is_ambient(&self) -> bool {
        matches!(self, Enrollment::Ambient(_))
    }
}

/// What [`classify`] looks at.
#[derive(Clone, Copy, Debug, Default)]
pub struct PodFacts<'a> {
    /// The pod's labels.
    pub labels: Option<&'a BTreeMap<String, String>>,
    /// The pod's annotations.
    pub annotations: Option<&'a BTreeMap<String, String>>,
    /// The labels of the pod's namespace (`None`: not known).
    pub namespace_labels: Option<&'a BTreeMap<String, String>>,
    /// The pod has an `istio-proxy` sidecar (container or injector
    /// annotation).
    pub has_sidecar: bool,
    /// The pod shares the node's network namespace.
    pub host_network: bool,
}

/// istio-cni's enrollment rule: a pod is ambient when it or its namespace
/// has `istio.io/dataplane-mode=ambient`, unless the pod says `none`, has
/// a sidecar (sidecar mode wins), or uses the host's network.
pub fn classify(f: PodFacts<'_>) -> Enrollment {
    let label = |m: Option<&BTreeMap<String, String>>| {
        m.and_then(|m| m.get(DATAPLANE_MODE))
            .map(|v| v.trim().to_string())
    };
    let pod = label(f.labels);
    let ns = label(f.namespace_labels);
    let why = match (pod.as_deref(), ns.as_deref()) {
        (Some(DATAPLANE_NONE), _) => {
            return Enrollment::NotAmbient(format!("pod label {DATAPLANE_MODE}={DATAPLANE_NONE}"));
        }
        (Some(DATAPLANE_AMBIENT), _) => format!("pod label {DATAPLANE_MODE}={DATAPLANE_AMBIENT}"),
        (_, Some(DATAPLANE_AMBIENT)) => {
            format!("namespace label {DATAPLANE_MODE}={DATAPLANE_AMBIENT}")
        }
        _ => {
            return Enrollment::NotAmbient(format!(
                "no {DATAPLANE_MODE}={DATAPLANE_AMBIENT} label on the pod or its namespace"
            ));
        }
    };
    if f.host_network {
        return Enrollment::NotAmbient(
            "host network (the pod shares the node's network namespace)".into(),
        );
    }
    let sidecar_annotated = f
        .annotations
        .is_some_and(|a| a.contains_key(SIDECAR_STATUS));
    if f.has_sidecar || sidecar_annotated {
        return Enrollment::NotAmbient(format!(
            "{why}, but the pod has an Istio sidecar (sidecar mode takes precedence)"
        ));
    }
    Enrollment::Ambient(why)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(kv: &[(&str, &str)]) -> BTreeMap<String, String> {
        kv.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn pod_or_namespace_label_enrolls_and_none_opts_out() {
        let amb = m(&[(DATAPLANE_MODE, "ambient")]);
        let none = m(&[(DATAPLANE_MODE, "none")]);
        let empty = m(&[]);
        let on_ns = classify(PodFacts {
            labels: Some(&empty),
            namespace_labels: Some(&amb),
            ..Default::default()
        });
        assert!(on_ns.is_ambient(), "{on_ns:?}");
        assert!(format!("{on_ns:?}").contains("namespace label"));
        let on_pod = classify(PodFacts {
            labels: Some(&amb),
            ..Default::default()
        });
        assert!(on_pod.is_ambient());
        let opted_out = classify(PodFacts {
            labels: Some(&none),
            namespace_labels: Some(&amb),
            ..Default::default()
        });
        assert_eq!(
            opted_out,
            Enrollment::NotAmbient("pod label istio.io/dataplane-mode=none".into())
        );
        assert!(!classify(PodFacts::default()).is_ambient());
        // Another value ("sidecar", a typo) is not ambient.
        let other = m(&[(DATAPLANE_MODE, "ambiant")]);
        assert!(
            !classify(PodFacts {
                labels: Some(&other),
                ..Default::default()
            })
            .is_ambient()
        );
    }

    #[test]
    fn sidecars_and_host_network_are_never_ambient() {
        let amb = m(&[(DATAPLANE_MODE, "ambient")]);
        let injected = m(&[(SIDECAR_STATUS, "{}")]);
        for f in [
            PodFacts {
                namespace_labels: Some(&amb),
                has_sidecar: true,
                ..Default::default()
            },
            PodFacts {
                namespace_labels: Some(&amb),
                annotations: Some(&injected),
                ..Default::default()
            },
            PodFacts {
                labels: Some(&amb),
                host_network: true,
                ..Default::default()
            },
        ] {
            assert!(!classify(f).is_ambient(), "{f:?}");
        }
    }
}
