//! The pod model: what weir knows of a pod, whichever source it came from.
//!
//! - [`PodView`]: a Kubernetes pod as classified ([`MeshVerdict`]: meshed by
//!   which mesh, or why not), from the watcher or the CNI plugin
//!   (`k8s::classify` builds it);
//! - [`PodSpec`]: a pod to enroll (its netns and capture rules), from a
//!   [`PodView`] ([`PodSpec::of_view`]) or from the pods file;
//! - [`Desired`]: the set of pods one reconcile pass enrolls.
//!
//! Plain data, no I/O: the CNI plugin (`weir-cni`) compiles it in as is.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::IpAddr;
use std::path::PathBuf;

use crate::policy::{AnnotationError, Mesh, PodRules, keys, pod_rules};

/// Whether weir captures a pod, and why not.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MeshVerdict {
    /// Captured with this mesh's profile.
    Meshed(Mesh),
    /// Left alone; the reason is for logs and the CNI plugin's answer.
    NotMeshed(String),
}

impl fmt::Display for MeshVerdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MeshVerdict::Meshed(m) => write!(f, "meshed ({m})"),
            MeshVerdict::NotMeshed(why) => write!(f, "not meshed: {why}"),
        }
    }
}

/// What weir keeps of a pod object: small, and everything it needs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodView {
    /// `metadata.namespace`.
    pub namespace: String,
    /// `metadata.name`.
    pub name: String,
    /// `metadata.uid`.
    pub uid: String,
    /// The UID in the pod's cgroup path: the mirror annotation of a static
    /// pod, else `uid`.
    pub cgroup_uid: String,
    /// `status.podIPs` (or `status.podIP`), the ones that parse.
    pub ips: Vec<IpAddr>,
    /// `metadata.annotations`.
    pub annotations: BTreeMap<String, String>,
    /// `spec.serviceAccountName`, `default` when unset (as the API
    /// server's admission fills it in).
    pub service_account: String,
    /// The decision.
    pub verdict: MeshVerdict,
    /// Addresses in `status.podIPs` that are not IP addresses (reported,
    /// never fatal).
    pub bad_ips: Vec<String>,
    /// An Istio pod without dual stack and without `weir.dev/capture-ipv6`:
    /// istio-iptables writes IPv6 rules exactly when the pod's first
    /// address is IPv6, so that annotation is derived from `ips` (again
    /// whenever they change: [`PodView::set_ips`]).
    pub ipv6_from_first_ip: bool,
    /// When the ambient rule decides this pod (no sidecar of any mesh, not
    /// host network, not finished): the pod's own `istio.io/dataplane-mode`
    /// label (an empty map without it), so the verdict can be decided again
    /// with its namespace's labels ([`PodView::classify_ambient`]). `None`:
    /// another rule decided.
    pub ambient_labels: Option<BTreeMap<String, String>>,
    /// Why an ambient pod is ambient (`pod label ...`, `namespace label
    /// ...`); empty for other pods.
    pub reason: String,
}

/// The ambient rule's verdict for a pod no other rule decided, with the
/// reason an ambient pod is ambient (empty otherwise).
pub fn ambient_verdict(
    pod_labels: &BTreeMap<String, String>,
    ns: NamespaceLabels<'_>,
) -> (MeshVerdict, String) {
    let namespace_labels = match ns {
        NamespaceLabels::Known(l) => l,
        NamespaceLabels::Unknown => None,
    };
    match crate::ambient::classify(crate::ambient::PodFacts {
        labels: Some(pod_labels),
        namespace_labels,
        ..Default::default()
    }) {
        crate::ambient::Enrollment::Ambient(why) => (MeshVerdict::Meshed(Mesh::Ambient), why),
        crate::ambient::Enrollment::NotAmbient(why) => (
            MeshVerdict::NotMeshed(format!(
                "no istio-proxy, linkerd-proxy or kuma-sidecar container, and not ambient: {why}"
            )),
            String::new(),
        ),
    }
}

/// What is known of a pod's namespace labels when its verdict is decided.
#[derive(Clone, Copy, Debug)]
pub enum NamespaceLabels<'a> {
    /// These are its namespace's labels (`None`: the namespace has none,
    /// or does not exist).
    Known(Option<&'a BTreeMap<String, String>>),
    /// They could not be read (no permission, the API away): pod labels
    /// only.
    Unknown,
}

impl PodView {
    /// Decides the ambient verdict again with the namespace's labels (a
    /// pod another rule decided is left as it is).
    pub fn classify_ambient(&mut self, ns: NamespaceLabels<'_>) {
        if let Some(labels) = &self.ambient_labels {
            (self.verdict, self.reason) = ambient_verdict(labels, ns);
        }
    }

    /// Whether the namespace's labels can change this pod's verdict: the
    /// ambient rule decides it and the pod has no `istio.io/dataplane-mode`
    /// of its own that settles it (`ambient` or `none`).
    pub fn depends_on_namespace(&self) -> bool {
        self.ambient_labels.as_ref().is_some_and(|l| {
            !matches!(
                l.get(crate::ambient::DATAPLANE_MODE).map(|v| v.trim()),
                Some(crate::ambient::DATAPLANE_AMBIENT | crate::ambient::DATAPLANE_NONE)
            )
        })
    }

    /// `namespace/name`, the reconciler's key.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// Sets the pod's addresses, and what depends on them. The API has no
    /// addresses for a pod before the kubelet reports them, which it does
    /// only after the CNI ADD that gave them: the CNI server and the
    /// watcher's passes set the ones the ADD reported until then.
    pub fn set_ips(&mut self, ips: Vec<IpAddr>) {
        if self.ipv6_from_first_ip {
            let first_v6 = ips.first().is_some_and(IpAddr::is_ipv6);
            self.annotations
                .insert(keys::CAPTURE_IPV6.into(), first_v6.to_string());
        }
        self.ips = ips;
    }

    /// The mesh, when meshed.
    pub fn mesh(&self) -> Option<Mesh> {
        match self.verdict {
            MeshVerdict::Meshed(m) => Some(m),
            MeshVerdict::NotMeshed(_) => None,
        }
    }
}

/// One pod to enroll: where its network namespace is, and its capture
/// rules (from the pods file, the Kubernetes watcher or the CNI plugin).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodSpec {
    /// Kubernetes namespace.
    pub namespace: String,
    /// Pod name.
    pub name: String,
    /// Path of the pod's network namespace.
    pub netns: PathBuf,
    /// The pod's addresses.
    pub ips: Vec<IpAddr>,
    /// The pod's mesh.
    pub mesh: Mesh,
    /// The pod's annotations.
    pub annotations: BTreeMap<String, String>,
    /// Capture rules built from the above.
    pub rules: PodRules,
    /// Kubernetes pod UID (empty when unknown).
    pub uid: String,
    /// `spec.serviceAccountName` (`default` when the pod names none).
    pub service_account: String,
    /// Why an ambient pod is ambient (`weir status`); empty for others.
    pub reason: String,
}

impl PodSpec {
    /// `namespace/name`.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// The spec of one meshed pod in `netns`.
    pub fn of_view(v: &PodView, netns: PathBuf) -> Result<PodSpec, AnnotationError> {
        let MeshVerdict::Meshed(mesh) = v.verdict else {
            unreachable!("PodSpec::of_view is only called for meshed pods")
        };
        let rules = pod_rules(mesh, &v.ips, &v.annotations)?;
        Ok(PodSpec {
            namespace: v.namespace.clone(),
            name: v.name.clone(),
            netns,
            ips: v.ips.clone(),
            mesh,
            annotations: v.annotations.clone(),
            rules,
            uid: v.uid.clone(),
            service_account: v.service_account.clone(),
            reason: v.reason.clone(),
        })
    }
}

/// The desired set of one pass.
#[derive(Debug, Default)]
pub struct Desired {
    /// Pods to enroll (or keep enrolled).
    pub pods: Vec<PodSpec>,
    /// Meshed pods whose annotations are invalid: they keep their last good
    /// policy (`Reconciler::apply`'s `keep`).
    pub invalid: BTreeSet<String>,
    /// Problems by pod key, for the log.
    pub problems: BTreeMap<String, String>,
    /// Meshed pods whose network namespace was not found on the node (not
    /// started yet, or already gone).
    pub no_netns: BTreeSet<String>,
}

impl Desired {
    /// Whether the set has a pod with this key.
    pub fn contains(&self, key: &str) -> bool {
        self.pods.iter().any(|p| p.key() == key)
    }
}
