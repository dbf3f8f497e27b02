//! Pods enrolled through the CNI plugin.
//!
//! The plugin enrolls a pod before any of its processes exist, so the
//! watcher cannot find its network namespace through `/proc` yet, and it
//! may not even have seen the pod in the API. Each Kubernetes pass merges
//! these pods into its desired set, under the reconciler's lock, so a pass
//! never removes a pod the plugin has just enrolled. An entry goes away with
//! the sandbox (CNI DEL), with the pod (the watcher sees it deleted), or
//! when its network namespace path disappears.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::PathBuf;

use log::debug;

use crate::pod::Desired;
use crate::pod::PodSpec;

/// One pod enrolled by the plugin.
#[derive(Clone, Debug)]
pub struct CniPod {
    /// The pod's UID (from the API, or the runtime's `K8S_POD_UID`).
    pub uid: String,
    /// The sandbox (`CNI_CONTAINERID`).
    pub container_id: String,
    /// Its network namespace path, as the agent sees it.
    pub netns: PathBuf,
    /// The spec it was enrolled with.
    pub spec: PodSpec,
}

/// What the watcher knows of a pod, for [`Registry::merge`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Known {
    /// Its UID.
    pub uid: String,
    /// Whether it is meshed.
    pub meshed: bool,
}

/// Pods enrolled by the plugin, by `namespace/name`.
#[derive(Debug, Default)]
pub struct Registry {
    pods: BTreeMap<String, CniPod>,
}

impl Registry {
    /// Records a pod the plugin enrolled (replacing an older sandbox).
    pub fn insert(&mut self, pod: CniPod) {
        self.pods.insert(pod.spec.key(), pod);
    }

    /// Forgets the pod at `key` (enrollment failed).
    pub fn remove(&mut self, key: &str) {
        self.pods.remove(key);
    }

    /// Forgets the sandbox `container_id` (CNI DEL); returns the pod keys.
    pub fn remove_container(&mut self, container_id: &str) -> Vec<String> {
        let keys: Vec<String> = self
            .pods
            .iter()
            .filter(|(_, p)| p.container_id == container_id)
            .map(|(k, _)| k.clone())
            .collect();
        for k in &keys {
            self.pods.remove(k);
        }
        keys
    }

    /// Forgets the pod `key` if it is the incarnation `uid` (deleted).
    pub fn remove_pod(&mut self, key: &str, uid: &str) {
        if self.pods.get(key).is_some_and(|p| p.uid == uid) {
            self.pods.remove(key);
        }
    }

    /// The network namespace the plugin gave for pod `key` / `uid`, when
    /// it still exists.
    pub fn hint(&self, key: &str, uid: &str) -> Option<PathBuf> {
        self.pods
            .get(key)
            .filter(|p| p.uid == uid && p.netns.exists())
            .map(|p| p.netns.clone())
    }

    /// The addresses CNI ADD reported for pod `key` / `uid`: the watcher
    /// uses them while the API has none for the pod (until the kubelet
    /// reports its status).
    pub fn ips(&self, key: &str, uid: &str) -> Option<Vec<IpAddr>> {
        self.pods
            .get(key)
            .filter(|p| p.uid == uid && !p.spec.ips.is_empty())
            .map(|p| p.spec.ips.clone())
    }

    /// Number of entries.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.pods.len()
    }

    /// Adds the plugin's pods to a pass's desired set: entries whose netns
    /// is gone are dropped; the watcher's view wins for pods it knows (same
    /// UID), except that the plugin's netns path is authoritative; pods the
    /// watcher does not know yet (or knows under an older UID) are kept as
    /// the plugin enrolled them.
    pub fn merge(&mut self, desired: &mut Desired, known: &BTreeMap<String, Known>) {
        self.pods.retain(|key, p| {
            let alive = p.netns.exists();
            if !alive {
                debug!(
                    "pod {key}: netns {} from CNI ADD is gone",
                    p.netns.display()
                );
            }
            alive
        });
        for (key, p) in &self.pods {
            match known.get(key) {
                Some(k) if k.uid == p.uid && !k.meshed => continue,
                Some(k) if k.uid == p.uid => {
                    if let Some(spec) = desired.pods.iter_mut().find(|s| s.key() == *key) {
                        spec.netns = p.netns.clone();
                        continue;
                    }
                    if desired.invalid.contains(key) {
                        continue;
                    }
                }
                _ => {}
            }
            if !desired.contains(key) {
                desired.no_netns.remove(key);
                desired.pods.push(p.spec.clone());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::k8s::classify::{tests::ISTIO_POD, tests::pod, view};
    use crate::testutil::TempDir;

    fn cni_pod(name: &str, uid: &str, netns: PathBuf) -> CniPod {
        let mut v = view(&pod(ISTIO_POD)).unwrap();
        v.name = name.into();
        v.uid = uid.into();
        CniPod {
            uid: uid.into(),
            container_id: format!("sandbox-{name}"),
            netns: netns.clone(),
            spec: PodSpec::of_view(&v, netns).unwrap(),
        }
    }

    #[test]
    fn merge_keeps_fresh_cni_pods_and_drops_gone_ones() {
        let d = TempDir::new("reg");
        let ns = |n: &str| {
            let p = d.path().join(n);
            std::fs::write(&p, "").unwrap();
            p
        };
        let mut r = Registry::default();
        r.insert(cni_pod("new", "u-new", ns("new")));
        r.insert(cni_pod("known", "u-known", ns("known")));
        r.insert(cni_pod("optout", "u-optout", ns("optout")));
        r.insert(cni_pod("gone", "u-gone", d.path().join("never-created")));
        r.insert(cni_pod("recreated", "u-new2", ns("recreated")));

        let watcher_spec = {
            let mut s = cni_pod("known", "u-known", "/proc/42/ns/net".into()).spec;
            s.annotations.insert("x".into(), "y".into());
            s
        };
        let mut desired = Desired {
            pods: vec![watcher_spec],
            ..Desired::default()
        };
        let known: BTreeMap<String, Known> = [
            ("bookinfo/known", "u-known", true),
            ("bookinfo/optout", "u-optout", false),
            ("bookinfo/recreated", "u-old", true),
        ]
        .into_iter()
        .map(|(k, u, m)| {
            (
                k.to_string(),
                Known {
                    uid: u.into(),
                    meshed: m,
                },
            )
        })
        .collect();
        r.merge(&mut desired, &known);
        let mut keys: Vec<String> = desired.pods.iter().map(PodSpec::key).collect();
        keys.sort();
        assert_eq!(
            keys,
            ["bookinfo/known", "bookinfo/new", "bookinfo/recreated"]
        );
        let known_spec = desired.pods.iter().find(|s| s.name == "known").unwrap();
        // The watcher's policy, the plugin's netns.
        assert_eq!(known_spec.annotations["x"], "y");
        assert_eq!(known_spec.netns, d.path().join("known"));
        assert_eq!(r.len(), 4, "the entry whose netns is gone is dropped");
        assert_eq!(r.hint("bookinfo/new", "u-new"), Some(d.path().join("new")));
        assert_eq!(r.hint("bookinfo/new", "u-other"), None);
        // The addresses the ADD reported, for this incarnation only.
        let ips = r.ips("bookinfo/new", "u-new").unwrap();
        assert_eq!(ips, view(&pod(ISTIO_POD)).unwrap().ips);
        assert_eq!(r.ips("bookinfo/new", "u-other"), None);
        assert_eq!(r.remove_container("sandbox-new"), ["bookinfo/new"]);
        r.remove_pod("bookinfo/known", "u-other");
        assert_eq!(r.len(), 3);
        r.remove_pod("bookinfo/known", "u-known");
        assert_eq!(r.len(), 2);
    }
}
