//! The node's pods as the watcher last saw them, and the desired set built
//! from them.
//!
//! The store follows the watcher's events. A (re-)list is buffered and
//! replaces the store only when it completed (`InitDone`), so an API
//! restart, a `410 Gone` or a half-finished list never makes pods look
//! deleted; until the first list completed the store is not `synced` and
//! nothing is applied at all.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

use k8s_openapi::api::core::v1::Pod;
use kube::runtime::watcher::Event;
use log::warn;

use crate::cni::registry::Known;
use crate::k8s::classify::{NamespaceLabels, PodView, view};
use crate::k8s::namespaces::NamespaceStore;
use crate::pod::{Desired, PodSpec};

/// Added to the reason of an ambient pod kept by its last decision.
const STILL: &str = " (as last decided: namespaces cannot be read now)";

/// What one watcher event changed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Handled {
    /// Whether the desired set may have changed.
    pub changed: bool,
    /// `(key, uid)` of pods that are gone (deleted, or missing from a
    /// completed re-list).
    pub deleted: Vec<(String, String)>,
}

/// The pods of this node, by `namespace/name`.
#[derive(Debug, Default)]
pub struct PodStore {
    pods: BTreeMap<String, PodView>,
    relist: Option<BTreeMap<String, PodView>>,
    synced: bool,
}

fn to_view(pod: &Pod) -> Option<PodView> {
    match view(pod) {
        Ok(v) => Some(v),
        Err(e) => {
            warn!("{e}");
            None
        }
    }
}

impl PodStore {
    /// An empty, not yet synced store.
    pub fn new() -> Self {
        Self::default()
    }

    /// Whether a complete list has been seen (only then is the store a
    /// truthful picture of the node).
    pub fn synced(&self) -> bool {
        self.synced
    }

    /// The pod named `namespace/name`, as last seen.
    pub fn get(&self, key: &str) -> Option<&PodView> {
        self.pods.get(key)
    }

    /// Every pod.
    pub fn pods(&self) -> impl Iterator<Item = &PodView> {
        self.pods.values()
    }

    /// The meshed pods by their own labels (cloned).
    #[cfg(test)]
    pub fn meshed(&self) -> Vec<PodView> {
        self.pods
            .values()
            .filter(|v| v.mesh().is_some())
            .cloned()
            .collect()
    }

    /// The meshed pods, decided with their namespaces' labels (cloned, to
    /// work on outside the locks); what a pass tells the CNI registry of
    /// every pod; and the pods whose verdict depends on namespace labels
    /// that cannot be read. Such a pod that `last` (the agent's last
    /// decisions, also a previous agent's) enrolled as ambient stays
    /// ambient.
    pub fn meshed_in(
        &self,
        namespaces: &NamespaceStore,
        last: &crate::reasons::Reasons,
    ) -> (Vec<PodView>, BTreeMap<String, Known>, BTreeSet<String>) {
        let mut meshed = Vec::new();
        let mut known = BTreeMap::new();
        let mut undecided = BTreeSet::new();
        for v in self.pods.values() {
            let mut v = v.clone();
            let ns = namespaces.labels_of(&v.namespace);
            v.classify_ambient(ns);
            if matches!(ns, NamespaceLabels::Unknown) && v.depends_on_namespace() {
                match last.ambient(&v.key(), &v.uid) {
                    Some(why) => {
                        v.verdict = crate::pod::MeshVerdict::Meshed(crate::policy::Mesh::Ambient);
                        v.reason = match why.strip_suffix(STILL) {
                            Some(_) => why.to_string(),
                            None => format!("{why}{STILL}"),
                        };
                    }
                    None => {
                        undecided.insert(v.key());
                    }
                }
            }
            known.insert(
                v.key(),
                Known {
                    uid: v.uid.clone(),
                    meshed: v.mesh().is_some(),
                },
            );
            if v.mesh().is_some() {
                meshed.push(v);
            }
        }
        (meshed, known, undecided)
    }

    /// Records one pod (from the CNI server's own API read): newer
    /// knowledge than the store's when the watcher lags.
    pub fn upsert(&mut self, v: PodView) -> bool {
        let key = v.key();
        if self.pods.get(&key) == Some(&v) {
            return false;
        }
        self.pods.insert(key, v);
        true
    }

    /// Applies one watcher event.
    pub fn handle(&mut self, ev: Event<Pod>) -> Handled {
        let mut out = Handled::default();
        match ev {
            Event::Init => {
                self.relist = Some(BTreeMap::new());
            }
            Event::InitApply(p) => {
                if let Some(v) = to_view(&p) {
                    // An InitApply without Init cannot happen; be lenient.
                    self.relist
                        .get_or_insert_with(BTreeMap::new)
                        .insert(v.key(), v);
                }
            }
            Event::InitDone => {
                let fresh = self.relist.take().unwrap_or_default();
                for (key, old) in &self.pods {
                    if fresh.get(key).is_none_or(|n| n.uid != old.uid) {
                        out.deleted.push((key.clone(), old.uid.clone()));
                    }
                }
                out.changed = !self.synced || fresh != self.pods;
                self.pods = fresh;
                self.synced = true;
            }
            Event::Apply(p) => {
                if let Some(v) = to_view(&p) {
                    if let Some(old) = self.pods.get(&v.key())
                        && old.uid != v.uid
                    {
                        out.deleted.push((v.key(), old.uid.clone()));
                    }
                    out.changed = self.upsert(v);
                }
            }
            Event::Delete(p) => {
                if let Some(v) = to_view(&p) {
                    let key = v.key();
                    if self.pods.get(&key).is_some_and(|o| o.uid == v.uid) {
                        self.pods.remove(&key);
                        out.changed = true;
                    }
                    out.deleted.push((key, v.uid));
                }
            }
        }
        out
    }
}

/// The desired set for `meshed` pods, `netns_of` giving each pod's network
/// namespace path (or `None` when it has none on this node).
pub fn desired(
    meshed: &[PodView],
    mut netns_of: impl FnMut(&PodView) -> Option<PathBuf>,
) -> Desired {
    let mut d = Desired::default();
    for v in meshed {
        if v.mesh().is_none() {
            continue;
        }
        let key = v.key();
        if !v.bad_ips.is_empty() {
            d.problems.insert(
                key.clone(),
                format!(
                    "status.podIPs has entries that are not a pod's own IP addresses ({:?}: not addresses, or loopback, unspecified, multicast, broadcast); they are ignored",
                    v.bad_ips
                ),
            );
        }
        let Some(netns) = netns_of(v) else {
            d.no_netns.insert(key);
            continue;
        };
        match PodSpec::of_view(v, netns) {
            Ok(spec) => d.pods.push(spec),
            Err(e) => {
                d.problems
                    .insert(key.clone(), format!("{e}; keeping its last good policy"));
                d.invalid.insert(key);
            }
        }
    }
    d
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::k8s::classify::tests::{ISTIO_POD, pod};

    fn istio(name: &str, uid: &str) -> Pod {
        let mut v: serde_json::Value = serde_json::from_str(ISTIO_POD).unwrap();
        v["metadata"]["name"] = name.into();
        v["metadata"]["uid"] = uid.into();
        serde_json::from_value(v).unwrap()
    }

    fn names(s: &PodStore) -> Vec<String> {
        s.pods().map(|v| v.name.clone()).collect()
    }

    #[test]
    fn nothing_is_synced_before_the_first_complete_list() {
        let mut s = PodStore::new();
        assert!(!s.synced());
        s.handle(Event::Init);
        s.handle(Event::InitApply(istio("a", "u-a")));
        assert!(!s.synced());
        assert!(names(&s).is_empty(), "half a list is not applied");
        let h = s.handle(Event::InitDone);
        assert!(h.changed && s.synced());
        assert_eq!(names(&s), ["a"]);
    }

    #[test]
    fn relist_replaces_atomically_and_reports_deletions() {
        let mut s = PodStore::new();
        s.handle(Event::Init);
        s.handle(Event::InitApply(istio("a", "u-a")));
        s.handle(Event::InitApply(istio("b", "u-b")));
        s.handle(Event::InitDone);
        // The watch breaks (410 Gone): a new list starts; meanwhile the old
        // picture stays.
        s.handle(Event::Init);
        s.handle(Event::InitApply(istio("b", "u-b")));
        assert_eq!(names(&s), ["a", "b"]);
        let h = s.handle(Event::InitDone);
        assert_eq!(names(&s), ["b"]);
        assert_eq!(
            h.deleted,
            vec![("bookinfo/a".to_string(), "u-a".to_string())]
        );
        assert!(h.changed);
        // The same list again changes nothing.
        s.handle(Event::Init);
        s.handle(Event::InitApply(istio("b", "u-b")));
        assert_eq!(s.handle(Event::InitDone), Handled::default());
    }

    #[test]
    fn apply_delete_and_recreation() {
        let mut s = PodStore::new();
        s.handle(Event::Init);
        s.handle(Event::InitDone);
        assert!(s.handle(Event::Apply(istio("a", "u-a"))).changed);
        // A status-only update weir does not look at is no change.
        let mut same: serde_json::Value = serde_json::to_value(istio("a", "u-a")).unwrap();
        same["status"]["conditions"] = serde_json::json!([{"type": "Ready", "status": "True"}]);
        let h = s.handle(Event::Apply(serde_json::from_value(same).unwrap()));
        assert!(!h.changed);
        // A StatefulSet pod re-created under the same name.
        let h = s.handle(Event::Apply(istio("a", "u-a2")));
        assert!(h.changed);
        assert_eq!(h.deleted, vec![("bookinfo/a".into(), "u-a".into())]);
        // A late delete of the old incarnation leaves the new one.
        let h = s.handle(Event::Delete(istio("a", "u-a")));
        assert!(!h.changed);
        assert_eq!(s.get("bookinfo/a").unwrap().uid, "u-a2");
        assert!(s.handle(Event::Delete(istio("a", "u-a2"))).changed);
        assert!(s.get("bookinfo/a").is_none());
    }

    #[test]
    fn objects_without_identity_are_ignored() {
        let mut s = PodStore::new();
        let bad: Pod = serde_json::from_value(serde_json::json!({"metadata": {}})).unwrap();
        assert_eq!(s.handle(Event::Apply(bad)), Handled::default());
    }

    #[test]
    fn desired_set_names_problems() {
        let good = view(&pod(ISTIO_POD)).unwrap();
        let mut bad = good.clone();
        bad.name = "bad".into();
        bad.annotations.insert(
            "traffic.sidecar.istio.io/excludeInboundPorts".into(),
            "80,http".into(),
        );
        let mut lost = good.clone();
        lost.name = "lost".into();
        let d = desired(&[good.clone(), bad, lost], |v| {
            (v.name != "lost").then(|| PathBuf::from(format!("/run/netns/{}", v.name)))
        });
        assert_eq!(d.pods.len(), 1);
        assert_eq!(d.pods[0].key(), good.key());
        assert_eq!(d.pods[0].ips, good.ips);
        assert_eq!(
            d.pods[0].rules.out_exclude_ports,
            [5432].into_iter().collect()
        );
        assert!(d.invalid.contains("bookinfo/bad"));
        let msg = &d.problems["bookinfo/bad"];
        assert!(
            msg.contains("traffic.sidecar.istio.io/excludeInboundPorts")
                && msg.contains("\"http\""),
            "{msg}"
        );
        assert!(d.no_netns.contains("bookinfo/lost"));
    }
}
