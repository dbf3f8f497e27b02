//! Istio ambient mode: which pods are ambient, and what the node agent
//! hands to ztunnel.
//!
//! In ambient mode there is no sidecar: ztunnel, one per node, opens its
//! listeners (15001 outbound, 15006 inbound, 15008 HBONE, 15053 DNS)
//! *inside* each ambient pod's network namespace. istio-cni writes in-pod
//! iptables rules that send the pod's traffic to them; weir does the same
//! with its eBPF programs (`weir_common::decide_ambient_outbound` and
//! friends, docs/ambient.md). This module decides enrollment (the same
//! rules as istio-cni) and lists the enrolled pods for the ZDS server.

mod enroll;
pub mod inpod;

pub use enroll::*;

use std::collections::BTreeMap;
use std::path::PathBuf;

use crate::policy::Mesh;
use crate::reconcile::Enrolled;

/// One ambient pod as the ZDS server hands it to ztunnel
/// (`AddWorkload{uid, workload_info{name, namespace, service_account}}`
/// plus the netns fd).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AmbientPod {
    /// Kubernetes pod UID (what ztunnel keys its workloads by).
    pub uid: String,
    /// Pod name.
    pub name: String,
    /// Pod namespace.
    pub namespace: String,
    /// `spec.serviceAccountName` (`default` when unset).
    pub service_account: String,
    /// The pod's network namespace, as the agent opens it.
    pub netns: PathBuf,
}

/// The ambient pods among the reconciler's enrolled pods, in key order.
pub fn enrolled_pods(pods: &BTreeMap<String, Enrolled>) -> Vec<AmbientPod> {
    pods.values()
        .filter(|p| p.spec.mesh == Mesh::Ambient)
        .map(|p| AmbientPod::of(&p.spec))
        .collect()
}

impl AmbientPod {
    /// The pod of a spec. A pod without a UID gets `namespace/name` (the
    /// pods file may omit it; ztunnel only needs it to be unique and
    /// stable).
    pub fn of(spec: &crate::podsfile::PodSpec) -> AmbientPod {
        AmbientPod {
            uid: if spec.uid.is_empty() {
                spec.key()
            } else {
                spec.uid.clone()
            },
            name: spec.name.clone(),
            namespace: spec.namespace.clone(),
            service_account: if spec.service_account.is_empty() {
                "default".into()
            } else {
                spec.service_account.clone()
            },
            netns: spec.netns.clone(),
        }
    }
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
    fn ambient_rules_follow_istio_cni() {
        use crate::policy::{Mesh, keys, pod_rules};
        use weir_common::*;
        let ips = ["198.18.0.1".parse().unwrap()];
        let r = pod_rules(Mesh::Ambient, &ips, &BTreeMap::new()).unwrap();
        let f = r.policy.flags;
        assert_ne!(f & POLICY_AMBIENT, 0);
        assert_ne!(f & POLICY_CAPTURE_OUTBOUND, 0);
        assert_ne!(f & POLICY_CAPTURE_INBOUND, 0);
        assert_ne!(f & POLICY_CAPTURE_DNS, 0, "DNS capture on by default");
        assert_eq!(
            (r.policy.outbound_port, r.policy.inbound_port),
            (15001, 15006)
        );
        assert_eq!((r.policy.tunnel_port, r.policy.dns_port), (15008, 15053));
        assert!(r.uids.is_empty() && r.gids.is_empty(), "no proxy identity");
        // The probe address, both ways.
        let probe: ipnet::IpNet = "169.254.7.127/32".parse().unwrap();
        assert!(r.exclude_cidrs.contains(&probe));
        assert!(r.inbound_skip_sources.contains(&probe));
        // No sidecar exclusions (15090, 15021) inbound.
        assert!(!r.in_exclude_ports.contains(&15090));

        let off = m(&[(keys::AMBIENT_DNS_CAPTURE, "false")]);
        let r = pod_rules(Mesh::Ambient, &ips, &off).unwrap();
        assert_eq!(r.policy.flags & POLICY_CAPTURE_DNS, 0);
        let ingress = m(&[(keys::AMBIENT_BYPASS_INBOUND, "true")]);
        let r = pod_rules(Mesh::Ambient, &ips, &ingress).unwrap();
        assert_eq!(r.policy.flags & POLICY_CAPTURE_INBOUND, 0);
        assert_ne!(r.policy.flags & POLICY_CAPTURE_OUTBOUND, 0);
        let bad = m(&[(keys::AMBIENT_DNS_CAPTURE, "maybe")]);
        let e = pod_rules(Mesh::Ambient, &ips, &bad).unwrap_err();
        assert!(
            e.to_string().contains("ambient.istio.io/dns-capture"),
            "{e}"
        );
    }

    #[test]
    fn pods_file_labels_uid_and_service_account() {
        let text = "pods:
  - name: a
    netns: /var/run/netns/a
    ips: [198.18.0.1]
    namespaceLabels: {istio.io/dataplane-mode: ambient}
    uid: 3f1c
    serviceAccount: reviews
  - name: b
    netns: /var/run/netns/b
    ips: [198.18.0.2]
    labels: {istio.io/dataplane-mode: none}
    namespaceLabels: {istio.io/dataplane-mode: ambient}
  - name: c
    netns: /var/run/netns/c
    ips: [198.18.0.3]
    mesh: ambient
";
        let f = crate::podsfile::parse(std::path::Path::new("pods.yaml"), text).unwrap();
        assert!(f.errors.is_empty(), "{:?}", f.errors);
        let by = |n: &str| f.pods.iter().find(|p| p.name == n).unwrap();
        assert_eq!(by("a").mesh, Mesh::Ambient);
        assert_eq!(by("a").uid, "3f1c");
        assert_eq!(by("a").service_account, "reviews");
        assert_eq!(by("b").mesh, Mesh::Istio, "opted out: sidecar default");
        assert_eq!(by("c").mesh, Mesh::Ambient);
        assert_eq!(by("c").service_account, "default");
    }
}
