//! The watcher and the CNI lookup against a fake API server: recorded pod
//! lists and watch streams (JSON lines as the API server sends them),
//! including a failing list, BOOKMARK events, an `ERROR` 410 Gone, a watch
//! connection closed by the server, and direct pod reads.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use kube::{Api, Client};
use serde_json::{Value, json};
use tokio::sync::{Notify, mpsc};
use weir_tests::fake_api::FakeApi;

use super::classify::tests::ISTIO_POD;
use super::state::PodStore;
use super::*;
use crate::cni::registry::Registry;

/// A kube client for the fake API server `api`.
fn client(api: &FakeApi) -> Client {
    let config = kube::Config::new(api.url().parse().unwrap());
    Client::try_from(config).unwrap()
}

/// An Istio pod on node-a.
fn istio_pod(name: &str, uid: &str, rv: &str) -> Value {
    let mut p: Value = serde_json::from_str(ISTIO_POD).unwrap();
    p["metadata"]["name"] = name.into();
    p["metadata"]["namespace"] = "default".into();
    p["metadata"]["uid"] = uid.into();
    p["metadata"]["resourceVersion"] = rv.into();
    p["spec"]["nodeName"] = "node-a".into();
    p
}

fn plain_pod(name: &str, uid: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Pod",
           "metadata": {"name": name, "namespace": "kube-system", "uid": uid, "resourceVersion": "90"},
           "spec": {"nodeName": "node-a", "containers": [{"name": "coredns", "image": "coredns:1.11"}]},
           "status": {"phase": "Running", "podIP": "10.244.1.2", "podIPs": [{"ip": "10.244.1.2"}]}})
}

fn list(rv: &str, items: Vec<Value>) -> String {
    json!({"apiVersion": "v1", "kind": "PodList",
           "metadata": {"resourceVersion": rv}, "items": items})
    .to_string()
}

fn event(kind: &str, object: Value) -> String {
    json!({"type": kind, "object": object}).to_string()
}

fn bookmark(rv: &str) -> String {
    event(
        "BOOKMARK",
        json!({"kind": "Pod", "apiVersion": "v1",
               "metadata": {"resourceVersion": rv,
                            "annotations": {"k8s.io/initial-events-end": "true"}}}),
    )
}

fn gone() -> String {
    event(
        "ERROR",
        json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
               "message": "too old resource version: 100 (250)", "reason": "Expired", "code": 410}),
    )
}

/// Polls `f` on the store until it holds (5 s at most).
async fn until(store: &Mutex<PodStore>, what: &str, f: impl Fn(&PodStore) -> bool) {
    for _ in 0..500 {
        if f(&store.lock().unwrap()) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let s = store.lock().unwrap();
    let pods: Vec<String> = s.pods().map(|v| format!("{} {}", v.key(), v.uid)).collect();
    panic!(
        "timed out waiting for {what}; store (synced {}): {pods:?}",
        s.synced()
    );
}

fn keys(s: &PodStore) -> Vec<String> {
    s.pods().map(|v| v.key()).collect()
}

#[tokio::test]
async fn watcher_follows_lists_events_bookmarks_410_and_reconnects() {
    let api = FakeApi::scripted();
    let (w1, r1) = mpsc::unbounded_channel();
    let (w2, r2) = mpsc::unbounded_channel();
    let (w3, r3) = mpsc::unbounded_channel();
    // The API server is not ready at first.
    api.script_list(
        503,
        json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
               "message": "the server is currently unable to handle the request",
               "reason": "ServiceUnavailable", "code": 503})
        .to_string(),
    );
    api.script_list(
        200,
        list(
            "100",
            vec![istio_pod("a", "uid-a", "95"), plain_pod("dns", "uid-dns")],
        ),
    );
    api.script_list(
        200,
        list(
            "250",
            vec![
                istio_pod("a", "uid-a", "240"),
                istio_pod("d", "uid-d", "245"),
            ],
        ),
    );
    for r in [r1, r2, r3] {
        api.script_watch(r);
    }
    let client = client(&api);
    let store = Arc::new(Mutex::new(PodStore::new()));
    let registry = Arc::new(Mutex::new(Registry::default()));
    let wake = Arc::new(Notify::new());
    let task = tokio::spawn(watch(
        Api::all(client),
        watcher_config("node-a"),
        store.clone(),
        registry.clone(),
        wake.clone(),
    ));

    // Nothing counts before a complete list.
    assert!(!store.lock().unwrap().synced());
    until(&store, "the first list", |s| s.synced()).await;
    assert_eq!(
        keys(&store.lock().unwrap()),
        ["default/a", "kube-system/dns"]
    );
    {
        let s = store.lock().unwrap();
        assert_eq!(s.meshed().len(), 1, "coredns is not meshed");
    }

    // Events: a new meshed pod, an annotation change, a bookmark.
    w1.send(event("ADDED", istio_pod("c", "uid-c", "101")))
        .unwrap();
    let mut a2 = istio_pod("a", "uid-a", "102");
    a2["metadata"]["annotations"]["traffic.sidecar.istio.io/excludeOutboundPorts"] =
        "5432,6379".into();
    w1.send(event("MODIFIED", a2)).unwrap();
    w1.send(bookmark("103")).unwrap();
    until(&store, "c added and a updated", |s| {
        s.get("default/c").is_some()
            && s.get("default/a").unwrap().annotations
                ["traffic.sidecar.istio.io/excludeOutboundPorts"]
                == "5432,6379"
    })
    .await;
    w1.send(event("DELETED", istio_pod("c", "uid-c", "104")))
        .unwrap();
    until(&store, "c deleted", |s| s.get("default/c").is_none()).await;

    // 410 Gone: the watcher lists again; until that list is complete the
    // store keeps its picture (a and dns), then it is replaced at once.
    w1.send(gone()).unwrap();
    until(&store, "the re-list", |s| s.get("default/d").is_some()).await;
    assert_eq!(keys(&store.lock().unwrap()), ["default/a", "default/d"]);
    // The re-listed a is as the list says.
    assert_eq!(
        store.lock().unwrap().get("default/a").unwrap().annotations["traffic.sidecar.istio.io/excludeOutboundPorts"],
        "5432"
    );

    // The server closes the watch: the watcher watches again from where
    // it was, without a new list.
    drop(w2);
    w3.send(event("DELETED", istio_pod("d", "uid-d", "260")))
        .unwrap();
    until(&store, "d deleted on the new watch", |s| {
        s.get("default/d").is_none()
    })
    .await;

    let requests = api.requests();
    task.abort();
    let lists: Vec<&String> = requests
        .iter()
        .filter(|q| !q.contains("watch=true"))
        .collect();
    let watches: Vec<&String> = requests
        .iter()
        .filter(|q| q.contains("watch=true"))
        .collect();
    assert_eq!(
        lists.len(),
        3,
        "503, first list, re-list after 410: {requests:#?}"
    );
    for q in &requests {
        assert!(q.contains("fieldSelector=spec.nodeName%3Dnode-a"), "{q}");
    }
    // Lists are served from the API server's cache.
    assert!(
        lists.iter().all(|q| q.contains("resourceVersion=0")),
        "{lists:#?}"
    );
    assert!(watches[0].contains("resourceVersion=100"), "{watches:#?}");
    assert!(
        watches[0].contains("allowWatchBookmarks=true"),
        "{watches:#?}"
    );
    assert!(watches[1].contains("resourceVersion=250"), "{watches:#?}");
    assert!(watches[2].contains("resourceVersion=250"), "{watches:#?}");
}

#[tokio::test]
async fn deletions_drop_cni_registrations_and_wake_the_loop() {
    let api = FakeApi::scripted();
    let (w1, r1) = mpsc::unbounded_channel();
    api.script_list(200, list("10", vec![istio_pod("a", "uid-a", "9")]));
    api.script_watch(r1);
    let client = client(&api);
    let store = Arc::new(Mutex::new(PodStore::new()));
    let registry = Arc::new(Mutex::new(Registry::default()));
    let wake = Arc::new(Notify::new());
    let dir = crate::testutil::TempDir::new("k8s");
    let netns = dir.path().join("ns-a");
    std::fs::write(&netns, "").unwrap();
    {
        let v = view(&serde_json::from_value(istio_pod("a", "uid-a", "9")).unwrap()).unwrap();
        registry
            .lock()
            .unwrap()
            .insert(crate::cni::registry::CniPod {
                uid: "uid-a".into(),
                container_id: "sb".into(),
                netns: netns.clone(),
                spec: crate::pod::PodSpec::of_view(&v, netns.clone()).unwrap(),
            });
    }
    let task = tokio::spawn(watch(
        Api::all(client),
        watcher_config("node-a"),
        store.clone(),
        registry.clone(),
        wake.clone(),
    ));
    tokio::time::timeout(Duration::from_secs(5), wake.notified())
        .await
        .expect("the first list wakes the loop");
    assert!(
        registry
            .lock()
            .unwrap()
            .hint("default/a", "uid-a")
            .is_some()
    );
    w1.send(event("DELETED", istio_pod("a", "uid-a", "11")))
        .unwrap();
    tokio::time::timeout(Duration::from_secs(5), wake.notified())
        .await
        .expect("a deletion wakes the loop");
    assert!(
        registry
            .lock()
            .unwrap()
            .hint("default/a", "uid-a")
            .is_none()
    );
    task.abort();
}

#[tokio::test]
async fn cni_lookup_uses_the_store_then_the_api() {
    let api = FakeApi::scripted();
    api.put_pod(istio_pod("fresh", "uid-fresh", "5"));
    let client = client(&api);
    let store = Arc::new(Mutex::new(PodStore::new()));
    store.lock().unwrap().upsert(
        view(&serde_json::from_value::<Pod>(istio_pod("known", "uid-known", "3")).unwrap())
            .unwrap(),
    );
    let lookup = ApiLookup {
        store: store.clone(),
        namespaces: Arc::new(Mutex::new(NamespaceStore::new())),
        client,
    };
    let pod = |name: &str, uid: &str| PodRef {
        namespace: "default".into(),
        name: name.into(),
        uid: uid.into(),
        service_account: String::new(),
    };
    let v = lookup.find(&pod("known", "uid-known")).await.unwrap();
    assert_eq!(v.uid, "uid-known");
    // Not in the store: read from the API.
    let v = lookup.find(&pod("fresh", "uid-fresh")).await.unwrap();
    assert_eq!(v.mesh(), Some(crate::policy::Mesh::Istio));
    // The store has an older pod of that name: the API is asked.
    store.lock().unwrap().upsert(
        view(&serde_json::from_value::<Pod>(istio_pod("fresh", "uid-old", "1")).unwrap()).unwrap(),
    );
    assert_eq!(
        lookup.find(&pod("fresh", "uid-fresh")).await.unwrap().uid,
        "uid-fresh"
    );
    let e = lookup.find(&pod("fresh", "uid-newer")).await.unwrap_err();
    assert!(
        e.contains("UID uid-fresh") && e.contains("uid-newer"),
        "{e}"
    );
    let e = lookup.find(&pod("missing", "")).await.unwrap_err();
    assert!(
        e.contains("default/missing is not in the Kubernetes API"),
        "{e}"
    );
}

#[tokio::test]
async fn maps_are_sized_from_the_node_pod_capacity() {
    // node-a with 110 pods, node-b with a malformed count, node-c
    // without a status; any other is not found.
    let api = FakeApi::scripted();
    api.set_node("node-a", json!({"capacity": {"pods": "110", "cpu": "2"}}));
    api.set_node("node-b", json!({"capacity": {"pods": "1k"}}));
    api.set_node("node-c", json!({}));
    let client = client(&api);
    assert_eq!(
        read_pod_capacity(client.clone(), "node-a").await.unwrap(),
        110
    );
    let e = read_pod_capacity(client.clone(), "node-b")
        .await
        .unwrap_err();
    assert!(
        format!("{e:#}").contains("status.capacity.pods \"1k\""),
        "{e:#}"
    );
    let e = read_pod_capacity(client.clone(), "node-c")
        .await
        .unwrap_err();
    assert!(
        format!("{e:#}").contains("no status.capacity.pods"),
        "{e:#}"
    );
    let e = read_pod_capacity(client.clone(), "node-z")
        .await
        .unwrap_err();
    assert!(format!("{e:#}").contains("reading node node-z"), "{e:#}");
    // Whatever went wrong, the default capacity.
    let default = crate::datapath::Capacities::DEFAULT_PODS;
    let failed = read_pod_capacity(client, "node-z").await;
    assert_eq!(pod_capacity_or_default("node-z", Ok(failed)), default);
    assert_eq!(pod_capacity_or_default("node-a", Ok(Ok(110))), 110);
    assert_eq!(parse_pod_capacity(" 250 ").unwrap(), 250);
    assert!(parse_pod_capacity("0").is_err());
    assert!(parse_pod_capacity("2000000").is_err());
}

/// A pod without a sidecar in namespace `ns`, with pod labels `labels`.
fn bare_pod(ns: &str, name: &str, labels: Value) -> Value {
    json!({"apiVersion": "v1", "kind": "Pod",
           "metadata": {"name": name, "namespace": ns, "uid": format!("uid-{name}"), "labels": labels},
           "spec": {"nodeName": "node-a", "containers": [{"name": "app", "image": "app:1"}]},
           "status": {"phase": "Running", "podIPs": [{"ip": "10.244.1.9"}]}})
}

/// Polls `f` on the namespace store until it holds (5 s at most).
async fn ns_until(store: &Mutex<NamespaceStore>, what: &str, f: impl Fn(&NamespaceStore) -> bool) {
    for _ in 0..500 {
        if f(&store.lock().unwrap()) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("timed out waiting for {what}: {:?}", store.lock().unwrap());
}

/// The metadata-only namespace watch against the fake API: labels from the
/// list and from watch events decide the pods' ambient verdict; a
/// forbidden list lets passes go on with pod labels only, and the pods the
/// namespace would decide are left undecided (kept as they are).
#[tokio::test]
async fn namespace_labels_decide_ambient_and_rbac_refusal_falls_back() {
    let api = FakeApi::start();
    api.apply_namespace("shop", &[("istio.io/dataplane-mode", "ambient")]);
    api.apply_namespace("plain", &[]);
    let mut pods = PodStore::new();
    pods.handle(kube::runtime::watcher::Event::Init);
    for p in [
        bare_pod("shop", "web", json!({})),
        bare_pod(
            "shop",
            "opted-out",
            json!({"istio.io/dataplane-mode": "none"}),
        ),
        bare_pod("plain", "db", json!({})),
        bare_pod(
            "plain",
            "own",
            json!({"istio.io/dataplane-mode": "ambient"}),
        ),
    ] {
        pods.handle(kube::runtime::watcher::Event::InitApply(
            serde_json::from_value(p).unwrap(),
        ));
    }
    pods.handle(kube::runtime::watcher::Event::InitDone);
    let mut last = crate::reasons::Reasons::default();
    let meshed_names = |n: &NamespaceStore, last: &crate::reasons::Reasons| {
        let (m, known, undecided) = pods.meshed_in(n, last);
        let names: Vec<String> = m
            .iter()
            .map(|v| format!("{} ({})", v.key(), v.reason))
            .collect();
        assert_eq!(known.len(), 4);
        (names, undecided.into_iter().collect::<Vec<_>>())
    };

    let store = Arc::new(Mutex::new(NamespaceStore::new()));
    let wake = Arc::new(Notify::new());
    let task = tokio::spawn(namespaces::watch(
        Api::all(client(&api)),
        store.clone(),
        wake.clone(),
    ));
    ns_until(&store, "the first list", |s| s.ready()).await;
    assert_eq!(
        meshed_names(&store.lock().unwrap(), &last),
        (
            vec![
                "plain/own (pod label istio.io/dataplane-mode=ambient)".to_string(),
                "shop/web (namespace label istio.io/dataplane-mode=ambient)".to_string(),
            ],
            vec![]
        )
    );
    // The metadata-only form was asked for, from the watch cache.
    let reqs = api.requests();
    assert!(
        reqs.iter()
            .any(|r| r.starts_with("/api/v1/namespaces?") && r.contains("resourceVersion=0")),
        "{reqs:?}"
    );
    // A label change arrives as a watch event and wakes the loop.
    api.apply_namespace("shop", &[]);
    tokio::time::timeout(Duration::from_secs(5), wake.notified())
        .await
        .expect("a label change wakes the loop");
    ns_until(&store, "shop without its label", |s| {
        s.get("shop").is_some_and(|l| l.is_empty())
    })
    .await;
    api.apply_namespace("plain", &[("istio.io/dataplane-mode", "ambient")]);
    ns_until(&store, "plain labelled", |s| {
        s.get("plain").is_some_and(|l| !l.is_empty())
    })
    .await;
    assert_eq!(
        meshed_names(&store.lock().unwrap(), &last).0,
        [
            "plain/db (namespace label istio.io/dataplane-mode=ambient)",
            "plain/own (pod label istio.io/dataplane-mode=ambient)"
        ]
    );
    task.abort();

    // RBAC without namespaces: passes go on, pod labels only; pods their
    // namespace would decide are undecided (neither enrolled nor removed).
    api.forbid_namespaces(true);
    let store = Arc::new(Mutex::new(NamespaceStore::new()));
    let task = tokio::spawn(namespaces::watch(
        Api::all(client(&api)),
        store.clone(),
        wake.clone(),
    ));
    ns_until(&store, "the refusal", |s| s.ready()).await;
    let why = store.lock().unwrap().unreadable().unwrap().to_string();
    assert!(why.contains("403") || why.contains("forbidden"), "{why}");
    assert!(why.contains("get, list and watch on namespaces"), "{why}");
    assert_eq!(
        meshed_names(&store.lock().unwrap(), &last),
        (
            vec!["plain/own (pod label istio.io/dataplane-mode=ambient)".to_string()],
            vec!["plain/db".to_string(), "shop/web".to_string()]
        )
    );
    // A pod the last decisions (a previous agent's) enrolled as ambient
    // by its namespace stays ambient.
    last.pods.insert(
        "shop/web".into(),
        crate::reasons::PodReason {
            uid: "uid-web".into(),
            netns_cookie: 1,
            mesh: "ambient".into(),
            reason: "namespace label istio.io/dataplane-mode=ambient".into(),
        },
    );
    assert_eq!(
        meshed_names(&store.lock().unwrap(), &last),
        (
            vec![
                "plain/own (pod label istio.io/dataplane-mode=ambient)".to_string(),
                "shop/web (namespace label istio.io/dataplane-mode=ambient (as last decided: namespaces cannot be read now))".to_string()
            ],
            vec!["plain/db".to_string()]
        )
    );
    // Allowed again: the labels come back.
    api.forbid_namespaces(false);
    ns_until(&store, "readable again", |s| s.unreadable().is_none()).await;
    assert_eq!(
        meshed_names(&store.lock().unwrap(), &last).1,
        Vec::<String>::new()
    );
    task.abort();
}

/// The CNI server's lookup decides with the namespace's labels: from the
/// namespace store, else read from the API (a namespace the watch has not
/// delivered yet); a refused read falls back to the pod's labels.
#[tokio::test]
async fn cni_lookup_reads_the_namespace_labels() {
    let api = FakeApi::start();
    api.apply_namespace("shop", &[("istio.io/dataplane-mode", "ambient")]);
    api.apply(bare_pod("shop", "web", json!({})));
    api.apply(bare_pod(
        "shop",
        "out",
        json!({"istio.io/dataplane-mode": "none"}),
    ));
    let lookup = ApiLookup {
        store: Arc::new(Mutex::new(PodStore::new())),
        namespaces: Arc::new(Mutex::new(NamespaceStore::new())),
        client: client(&api),
    };
    let pod = |name: &str| PodRef {
        namespace: "shop".into(),
        name: name.into(),
        uid: format!("uid-{name}"),
        service_account: String::new(),
    };
    let v = lookup.find(&pod("web")).await.unwrap();
    assert_eq!(v.mesh(), Some(crate::policy::Mesh::Ambient));
    assert_eq!(v.reason, "namespace label istio.io/dataplane-mode=ambient");
    assert!(
        api.requests()
            .contains(&"/api/v1/namespaces/shop".to_string()),
        "{:?}",
        api.requests()
    );
    assert_eq!(lookup.find(&pod("out")).await.unwrap().mesh(), None);
    api.forbid_namespaces(true);
    let v = lookup.find(&pod("web")).await.unwrap();
    assert_eq!(v.mesh(), None, "pod labels only: {:?}", v.verdict);
}
