//! The cluster's namespaces, for their `istio.io/dataplane-mode` label:
//! a pod without a sidecar is ambient when its namespace says `ambient`
//! (unless the pod says `none`), as istio-cni decides.
//!
//! - A metadata-only watch (`PartialObjectMetadata`: names and labels, no
//!   spec or status) over every namespace, lists from the API server's
//!   watch cache; only the one label is kept.
//! - Like the pod store, a (re-)list replaces the labels only once it is
//!   complete, and passes wait for the first complete list: a pass before
//!   it would un-enroll every pod enrolled by its namespace's label.
//! - When namespaces cannot be read before that first list (RBAC refuses
//!   `list namespaces`, an older ClusterRole), the error is logged with
//!   its fix and passes go on with pod labels only; a pod whose verdict
//!   depends on its namespace is then neither enrolled nor un-enrolled
//!   (the pass keeps what is there). Errors after the first list keep the
//!   labels last seen.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use k8s_openapi::api::core::v1::Namespace;
use kube::Api;
use kube::core::PartialObjectMeta;
use kube::runtime::watcher::{self, Event};
use log::{debug, error, info, warn};
use tokio::sync::Notify;

use crate::ambient::DATAPLANE_MODE;
use crate::pod::NamespaceLabels;

/// A namespace as the metadata-only watch delivers it.
pub type NamespaceMeta = PartialObjectMeta<Namespace>;

/// What the agent needs of a namespace's labels: the dataplane mode only.
fn relevant(ns: &NamespaceMeta) -> Option<(String, BTreeMap<String, String>)> {
    let name = ns.metadata.name.clone().filter(|n| !n.is_empty())?;
    let labels = ns
        .metadata
        .labels
        .iter()
        .flatten()
        .filter(|(k, _)| k.as_str() == DATAPLANE_MODE)
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    Some((name, labels))
}

/// The namespaces' labels as last seen.
#[derive(Debug, Default)]
pub struct NamespaceStore {
    labels: BTreeMap<String, BTreeMap<String, String>>,
    relist: Option<BTreeMap<String, BTreeMap<String, String>>>,
    synced: bool,
    /// Why namespaces could not be read, while they never could.
    unreadable: Option<String>,
}

impl NamespaceStore {
    /// An empty store, before the first list.
    pub fn new() -> Self {
        Self::default()
    }

    /// Whether passes may run: the first list completed, or namespaces
    /// cannot be read (pod labels only).
    pub fn ready(&self) -> bool {
        self.synced || self.unreadable.is_some()
    }

    /// Why namespaces cannot be read, when they never could.
    pub fn unreadable(&self) -> Option<&str> {
        self.unreadable.as_deref()
    }

    /// The labels of namespace `ns`: known once listed (a namespace the
    /// list does not have has none), else unknown.
    pub fn labels_of(&self, ns: &str) -> NamespaceLabels<'_> {
        if self.synced {
            NamespaceLabels::Known(self.labels.get(ns))
        } else {
            NamespaceLabels::Unknown
        }
    }

    /// The labels of `ns` when the store has that namespace (owned, to
    /// use outside the lock).
    pub fn get(&self, ns: &str) -> Option<BTreeMap<String, String>> {
        self.labels.get(ns).filter(|_| self.synced).cloned()
    }

    /// Applies one watcher event; whether any namespace's dataplane mode
    /// changed (then every pod of it is decided again).
    pub fn handle(&mut self, ev: Event<NamespaceMeta>) -> bool {
        match ev {
            Event::Init => {
                self.relist = Some(BTreeMap::new());
                false
            }
            Event::InitApply(ns) => {
                if let Some((name, labels)) = relevant(&ns) {
                    self.relist
                        .get_or_insert_with(BTreeMap::new)
                        .insert(name, labels);
                }
                false
            }
            Event::InitDone => {
                let fresh = self.relist.take().unwrap_or_default();
                let changed = !self.synced || fresh != self.labels;
                self.labels = fresh;
                self.synced = true;
                self.unreadable = None;
                changed
            }
            Event::Apply(ns) => {
                let Some((name, labels)) = relevant(&ns) else {
                    return false;
                };
                self.labels.insert(name, labels.clone()) != Some(labels)
            }
            Event::Delete(ns) => {
                let Some((name, _)) = relevant(&ns) else {
                    return false;
                };
                self.labels.remove(&name).is_some()
            }
        }
    }

    /// Records a failed list or watch; whether passes may now go on
    /// without namespace labels (the first failure before any list).
    pub fn failed(&mut self, why: String) -> bool {
        if self.synced || self.unreadable.is_some() {
            return false;
        }
        self.unreadable = Some(why);
        true
    }
}

/// Whether a watcher error is the API refusing the agent (RBAC).
fn forbidden(e: &watcher::Error) -> bool {
    let inner = match e {
        watcher::Error::InitialListFailed(e)
        | watcher::Error::WatchStartFailed(e)
        | watcher::Error::WatchFailed(e) => e,
        watcher::Error::WatchError(s) => return s.code == 403,
        watcher::Error::NoResourceVersion => return false,
    };
    matches!(inner, kube::Error::Api(s) if s.code == 403)
}

/// What to do about a namespace read the API refused.
pub const FORBIDDEN_FIX: &str = "grant the agent's ClusterRole get, list and watch on namespaces (the Helm chart and deploy/kubernetes do; an older ClusterRole lacks it)";

/// Follows every namespace, feeding `store` and waking the pass loop when
/// a dataplane mode changed; never ends (errors are retried with the
/// watcher's default backoff).
pub async fn watch(api: Api<NamespaceMeta>, store: Arc<Mutex<NamespaceStore>>, wake: Arc<Notify>) {
    let mut cfg = watcher::Config::default().any_semantic();
    // Served from the watch cache (see `watcher_config` for the pods).
    cfg.page_size = None;
    let on_event = |ev: Event<NamespaceMeta>| {
        let done = matches!(ev, Event::InitDone);
        let mut s = super::lock(&store);
        let changed = s.handle(ev);
        if done {
            let ambient = s
                .labels
                .values()
                .filter(|l| {
                    l.get(DATAPLANE_MODE).map(|v| v.trim())
                        == Some(crate::ambient::DATAPLANE_AMBIENT)
                })
                .count();
            info!(
                "Kubernetes API: listed {} namespaces, {ambient} labelled {DATAPLANE_MODE}={}",
                s.labels.len(),
                crate::ambient::DATAPLANE_AMBIENT
            );
        }
        drop(s);
        if changed {
            wake.notify_one();
        }
    };
    let on_error = |e: &watcher::Error, repeated: bool| {
        let why = if forbidden(e) {
            format!("cannot read namespaces ({e}): {FORBIDDEN_FIX}")
        } else {
            format!("cannot read namespaces ({e})")
        };
        let fallback = super::lock(&store).failed(why.clone());
        if fallback {
            error!(
                "{why}; until they can be read, ambient enrollment follows pod labels only (a namespace's {DATAPLANE_MODE} label is not seen; pods it would decide are neither enrolled nor removed)"
            );
            wake.notify_one();
        } else if !repeated {
            warn!(
                "Kubernetes API: {why}; retrying with backoff (the labels last seen stay in use)"
            );
        } else {
            debug!("Kubernetes API: {e}");
        }
    };
    super::follow(api, cfg, "namespaces", on_event, on_error).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ns(name: &str, mode: Option<&str>) -> NamespaceMeta {
        let mut labels = BTreeMap::from([("team".to_string(), "x".to_string())]);
        if let Some(m) = mode {
            labels.insert(DATAPLANE_MODE.into(), m.into());
        }
        let mut n = NamespaceMeta::default();
        n.metadata.name = Some(name.into());
        n.metadata.labels = Some(labels);
        n
    }

    fn mode(s: &NamespaceStore, name: &str) -> Option<String> {
        match s.labels_of(name) {
            NamespaceLabels::Known(l) => l.and_then(|l| l.get(DATAPLANE_MODE).cloned()),
            NamespaceLabels::Unknown => Some("unknown".into()),
        }
    }

    #[test]
    fn lists_replace_whole_and_label_changes_are_changes() {
        let mut s = NamespaceStore::new();
        assert!(!s.ready());
        assert_eq!(mode(&s, "a"), Some("unknown".into()));
        s.handle(Event::Init);
        s.handle(Event::InitApply(ns("a", Some("ambient"))));
        assert!(!s.ready(), "half a list");
        assert!(s.handle(Event::InitDone));
        assert!(s.ready() && s.synced);
        assert_eq!(mode(&s, "a"), Some("ambient".into()));
        // Only the dataplane mode is kept.
        assert_eq!(s.get("a").unwrap().len(), 1);
        assert_eq!(mode(&s, "b"), None, "not listed: no labels");
        // Another label changing is no change.
        let mut other = ns("a", Some("ambient"));
        other
            .metadata
            .labels
            .as_mut()
            .unwrap()
            .insert("team".into(), "y".into());
        assert!(!s.handle(Event::Apply(other)));
        assert!(s.handle(Event::Apply(ns("a", None))));
        assert_eq!(mode(&s, "a"), None);
        assert!(s.handle(Event::Apply(ns("b", Some("ambient")))));
        assert!(s.handle(Event::Delete(ns("b", Some("ambient")))));
        // A re-list with the same namespaces changes nothing.
        s.handle(Event::Init);
        s.handle(Event::InitApply(ns("a", None)));
        assert!(!s.handle(Event::InitDone));
    }

    #[test]
    fn unreadable_before_the_first_list_lets_passes_go_on() {
        let mut s = NamespaceStore::new();
        assert!(s.failed("403".into()), "the first failure");
        assert!(!s.failed("403".into()), "reported once");
        assert!(s.ready() && !s.synced);
        assert_eq!(s.unreadable(), Some("403"));
        assert_eq!(mode(&s, "a"), Some("unknown".into()));
        // Readable again (RBAC fixed): labels known.
        s.handle(Event::Init);
        s.handle(Event::InitApply(ns("a", Some("ambient"))));
        s.handle(Event::InitDone);
        assert_eq!(s.unreadable(), None);
        assert_eq!(mode(&s, "a"), Some("ambient".into()));
        // Failures after a list keep the labels.
        assert!(!s.failed("503".into()));
        assert_eq!(mode(&s, "a"), Some("ambient".into()));
    }
}
