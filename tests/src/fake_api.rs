//! A fake Kubernetes API server for the agent's Kubernetes pod source, on
//! the agent's own HTTP stack (axum on tokio): the kernel tests point a
//! `weir run --kubernetes` at it through a kubeconfig, the agent's unit
//! tests point a kube client at [`FakeApi::url`].
//!
//! It serves pods (list, watch as a chunked stream of JSON lines, get),
//! namespaces (list, watch, get; [`FakeApi::apply_namespace`],
//! [`FakeApi::forbid_namespaces`] for an agent whose RBAC lacks them) and
//! nodes (get). Two ways to drive it, one server:
//! - **as a cluster** ([`FakeApi::start`]): tests add, change and delete
//!   pods ([`FakeApi::apply`], [`FakeApi::delete`]); lists show the current
//!   pods, watches replay the events after their `resourceVersion` and
//!   then follow; [`FakeApi::set_down`] and [`FakeApi::expire_watches`]
//!   make outages and `410 Gone`;
//! - **from a script** ([`FakeApi::scripted`]): each list request takes
//!   the next scripted answer ([`FakeApi::script_list`]; none left: 503)
//!   and each watch the next scripted stream ([`FakeApi::script_watch`];
//!   none left: a watch that stays quiet), for a watcher's exact
//!   sequence of answers.
//!
//! Every request's target (path and query) is recorded
//! ([`FakeApi::requests`]). The server runs on its own thread and
//! runtime, so synchronous tests and `#[tokio::test]`s use it alike; the
//! listening socket is made by the thread that calls `start`, so a test
//! can start it inside a network namespace ([`crate::NetNs::run_in`]).

use std::collections::{BTreeMap, VecDeque};
use std::convert::Infallible;
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use axum::Router;
use axum::body::Body;
use axum::extract::{Path as UrlPath, State};
use axum::http::{StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde_json::{Value, json};
use tokio::sync::{mpsc, oneshot};

/// A watch stream's events as the server sends them, one JSON object a
/// line; `None` ends the stream (the server closed it).
type Feed = mpsc::UnboundedSender<Option<String>>;

/// The objects of one kind, their events and their watches.
#[derive(Default)]
struct Objects {
    items: BTreeMap<String, Value>,
    /// Every event sent, by resource version: a watch from version N
    /// first gets the events after N, as from the API server's cache.
    history: Vec<(u64, String)>,
    watchers: Vec<Feed>,
}

impl Objects {
    fn broadcast(&mut self, rv: u64, line: String) {
        self.history.push((rv, line.clone()));
        self.watchers.retain(|w| w.send(Some(line.clone())).is_ok());
    }

    fn close_watches(&mut self) {
        for w in std::mem::take(&mut self.watchers) {
            let _ = w.send(None);
        }
    }

    /// A watch from `query`'s `resourceVersion`: the events after it, then
    /// the live ones.
    fn watch(&mut self, query: &str) -> Response {
        let since: u64 = query
            .split('&')
            .find_map(|kv| kv.strip_prefix("resourceVersion="))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let (tx, rx) = mpsc::unbounded_channel();
        for (rv, line) in &self.history {
            if *rv > since && !line.contains("\"BOOKMARK\"") && !line.contains("\"ERROR\"") {
                let _ = tx.send(Some(line.clone()));
            }
        }
        self.watchers.push(tx);
        stream_response(rx)
    }

    /// Adds or replaces the object at `key`; the event's type.
    fn apply(&mut self, rv: u64, key: String, mut obj: Value) {
        obj["metadata"]["resourceVersion"] = rv.to_string().into();
        let kind = if self.items.contains_key(&key) {
            "MODIFIED"
        } else {
            "ADDED"
        };
        self.items.insert(key, obj.clone());
        self.broadcast(rv, json!({"type": kind, "object": obj}).to_string());
    }

    fn delete(&mut self, rv: u64, key: &str) {
        if let Some(mut obj) = self.items.remove(key) {
            obj["metadata"]["resourceVersion"] = rv.to_string().into();
            self.broadcast(rv, json!({"type": "DELETED", "object": obj}).to_string());
        }
    }
}

#[derive(Default)]
struct ApiState {
    /// Answer pod lists and watches from the script only.
    scripted: bool,
    pods: Objects,
    namespaces: Objects,
    /// Namespace requests answered 403 (RBAC without namespaces).
    namespaces_forbidden: bool,
    rv: u64,
    lists: VecDeque<(StatusCode, String)>,
    watches: VecDeque<mpsc::UnboundedReceiver<String>>,
    nodes: BTreeMap<String, Value>,
    down: bool,
    requests: Vec<String>,
}

type Shared = Arc<Mutex<ApiState>>;

/// The fake API server; stops when dropped.
pub struct FakeApi {
    addr: SocketAddr,
    state: Shared,
    shutdown: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl FakeApi {
    /// Starts a server that behaves as a cluster (no pods yet) on
    /// 127.0.0.1 of the calling thread's network namespace.
    pub fn start() -> FakeApi {
        FakeApi::with_state(ApiState::default())
    }

    /// Starts a server that answers pod lists and watches from its script
    /// only (see the module docs).
    pub fn scripted() -> FakeApi {
        FakeApi::with_state(ApiState {
            scripted: true,
            ..ApiState::default()
        })
    }

    fn with_state(state: ApiState) -> FakeApi {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .unwrap_or_else(|e| panic!("binding the fake API server on 127.0.0.1: {e}"));
        listener
            .set_nonblocking(true)
            .expect("a non-blocking listener");
        let addr = listener.local_addr().expect("the listener's address");
        let state: Shared = Arc::new(Mutex::new(state));
        let app = Router::new()
            .route("/api/v1/pods", get(pods))
            .route("/api/v1/namespaces", get(namespaces))
            .route("/api/v1/namespaces/{name}", get(one_namespace))
            .route("/api/v1/namespaces/{ns}/pods/{name}", get(one_pod))
            .route("/api/v1/nodes/{name}", get(one_node))
            .fallback(no_such_path)
            .with_state(state.clone());
        let (shutdown, stopped) = oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("the fake API server's runtime");
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener)
                    .expect("the fake API server's listener");
                tokio::select! {
                    r = axum::serve(listener, app) => {
                        if let Err(e) = r {
                            eprintln!("weir-tests: fake API server: {e}");
                        }
                    }
                    _ = stopped => {}
                }
            });
            // Dropping the runtime ends every connection still open.
        });
        FakeApi {
            addr,
            state,
            shutdown: Some(shutdown),
            thread: Some(thread),
        }
    }

    fn state(&self) -> MutexGuard<'_, ApiState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A kubeconfig file for it, written to `path`.
    pub fn kubeconfig(&self, path: &Path) -> PathBuf {
        let text = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: {}\nusers:\n- name: fake\n  user: {{}}\ncontexts:\n- name: fake\n  context:\n    cluster: fake\n    user: fake\n    namespace: default\ncurrent-context: fake\n",
            self.url()
        );
        std::fs::write(path, text)
            .unwrap_or_else(|e| panic!("writing kubeconfig {}: {e}", path.display()));
        path.to_path_buf()
    }

    /// Adds or updates a pod (and tells the watchers).
    pub fn apply(&self, pod: Value) {
        let mut s = self.state();
        s.rv += 1;
        let rv = s.rv;
        s.pods.apply(rv, pod_key(&pod), pod);
    }

    /// Adds or updates namespace `name` with `labels` (and tells the
    /// namespace watchers).
    pub fn apply_namespace(&self, name: &str, labels: &[(&str, &str)]) {
        let labels: BTreeMap<&str, &str> = labels.iter().copied().collect();
        let ns = json!({"apiVersion": "v1", "kind": "Namespace",
                        "metadata": {"name": name, "uid": format!("ns-uid-{name}"), "labels": labels},
                        "spec": {"finalizers": ["kubernetes"]}, "status": {"phase": "Active"}});
        let mut s = self.state();
        s.rv += 1;
        let rv = s.rv;
        s.namespaces.apply(rv, name.to_string(), ns);
    }

    /// Deletes namespace `name` (its pods stay: tests delete them).
    pub fn delete_namespace(&self, name: &str) {
        let mut s = self.state();
        s.rv += 1;
        let rv = s.rv;
        s.namespaces.delete(rv, name);
    }

    /// `true`: namespace lists, watches and reads are refused with 403
    /// Forbidden, as for an agent whose ClusterRole lacks namespaces.
    pub fn forbid_namespaces(&self, forbidden: bool) {
        let mut s = self.state();
        s.namespaces_forbidden = forbidden;
        if forbidden {
            s.namespaces.close_watches();
        }
    }

    /// Adds a pod without telling the watchers (a late watch event): only
    /// a list or a direct read shows it.
    pub fn insert_quietly(&self, pod: Value) {
        let mut s = self.state();
        s.rv += 1;
        let mut pod = pod;
        pod["metadata"]["resourceVersion"] = s.rv.to_string().into();
        s.pods.items.insert(pod_key(&pod), pod);
    }

    /// Serves `pod` exactly as given (its own `resourceVersion`) to direct
    /// reads and lists, without an event or a new resource version.
    pub fn put_pod(&self, pod: Value) {
        self.state().pods.items.insert(pod_key(&pod), pod);
    }

    /// Deletes pod `default/name`.
    pub fn delete(&self, name: &str) {
        self.delete_in("default", name);
    }

    /// Deletes pod `namespace/name`.
    pub fn delete_in(&self, namespace: &str, name: &str) {
        let mut s = self.state();
        s.rv += 1;
        let rv = s.rv;
        s.pods.delete(rv, &format!("{namespace}/{name}"));
    }

    /// Sends a BOOKMARK to the watchers.
    pub fn bookmark(&self) {
        let mut s = self.state();
        let rv = s.rv.to_string();
        s.broadcast(
            json!({"type": "BOOKMARK", "object": {"kind": "Pod", "apiVersion": "v1", "metadata": {"resourceVersion": rv}}}).to_string(),
        );
    }

    /// Expires every watch with `ERROR 410 Gone` (as after a compaction).
    pub fn expire_watches(&self) {
        let mut s = self.state();
        s.broadcast(
            json!({"type": "ERROR", "object": {"kind": "Status", "apiVersion": "v1", "metadata": {},
                   "status": "Failure", "message": "too old resource version", "reason": "Expired", "code": 410}})
            .to_string(),
        );
        s.close_watches();
    }

    /// `true`: every request gets 503 and open watches are closed, as
    /// when the API server is away; `false`: serving again.
    pub fn set_down(&self, down: bool) {
        let mut s = self.state();
        s.down = down;
        if down {
            s.close_watches();
        }
    }

    /// The next pod list request is answered `code` with `body`.
    pub fn script_list(&self, code: u16, body: String) {
        let code = StatusCode::from_u16(code).expect("an HTTP status code");
        self.state().lists.push_back((code, body));
    }

    /// The next pod watch request streams what is sent on the other end
    /// of `events` (one event a message, a line each) until that end is
    /// dropped, which closes the stream.
    pub fn script_watch(&self, events: mpsc::UnboundedReceiver<String>) {
        self.state().watches.push_back(events);
    }

    /// Serves node `name` with `status` (e.g. `{"capacity": {"pods":
    /// "110"}}`); other nodes are not found.
    pub fn set_node(&self, name: &str, status: Value) {
        let node = json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": name}, "status": status});
        self.state().nodes.insert(name.to_string(), node);
    }

    /// The targets (path and query) of the requests served so far.
    pub fn requests(&self) -> Vec<String> {
        self.state().requests.clone()
    }
}

impl Drop for FakeApi {
    fn drop(&mut self) {
        self.set_down(true);
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl ApiState {
    /// Sends a pod event to the pod watchers.
    fn broadcast(&mut self, line: String) {
        let rv = self.rv;
        self.pods.broadcast(rv, line);
    }

    fn close_watches(&mut self) {
        self.pods.close_watches();
        self.namespaces.close_watches();
    }

    /// Records the request; the 503 to answer when the server is down.
    fn begin(&mut self, uri: &Uri) -> Option<Response> {
        let target = uri
            .path_and_query()
            .map_or_else(|| uri.path().to_string(), |pq| pq.as_str().to_string());
        self.requests.push(target);
        self.down.then(|| {
            json_response(
                StatusCode::SERVICE_UNAVAILABLE,
                status(503, "ServiceUnavailable", "the server is down"),
            )
        })
    }
}

fn pod_key(pod: &Value) -> String {
    format!(
        "{}/{}",
        pod["metadata"]["namespace"].as_str().unwrap_or("default"),
        pod["metadata"]["name"]
            .as_str()
            .expect("a pod object has metadata.name")
    )
}

fn lock(s: &Shared) -> MutexGuard<'_, ApiState> {
    s.lock().unwrap_or_else(|e| e.into_inner())
}

/// A Kubernetes `Status` object.
fn status(code: u16, reason: &str, message: &str) -> String {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
           "message": message, "reason": reason, "code": code})
    .to_string()
}

fn json_response(code: StatusCode, body: String) -> Response {
    (code, [("content-type", "application/json")], body).into_response()
}

/// A streamed JSON-lines response of `lines` until it yields `None`.
fn stream_response(lines: mpsc::UnboundedReceiver<Option<String>>) -> Response {
    let stream = futures_util::stream::unfold(lines, |mut rx| async move {
        match rx.recv().await {
            Some(Some(line)) => Some((Ok::<_, Infallible>(format!("{line}\n")), rx)),
            _ => None,
        }
    });
    (
        StatusCode::OK,
        [("content-type", "application/json")],
        Body::from_stream(stream),
    )
        .into_response()
}

async fn pods(State(state): State<Shared>, uri: Uri) -> Response {
    let mut s = lock(&state);
    if let Some(r) = s.begin(&uri) {
        return r;
    }
    let query = uri.query().unwrap_or_default();
    let watch = query
        .split('&')
        .any(|kv| kv == "watch=true" || kv == "watch=1");
    if s.scripted {
        if watch {
            let (tx, rx) = mpsc::unbounded_channel();
            match s.watches.pop_front() {
                Some(mut events) => {
                    tokio::spawn(async move {
                        while let Some(line) = events.recv().await {
                            if tx.send(Some(line)).is_err() {
                                return;
                            }
                        }
                    });
                }
                // Nothing scripted: a quiet watch (the sender lives on in
                // the server state, never sending).
                None => s.pods.watchers.push(tx),
            }
            return stream_response(rx);
        }
        return match s.lists.pop_front() {
            Some((code, body)) => json_response(code, body),
            None => (StatusCode::SERVICE_UNAVAILABLE, "no list scripted").into_response(),
        };
    }
    if watch {
        return s.pods.watch(query);
    }
    let items: Vec<&Value> = s.pods.items.values().collect();
    let list = json!({"apiVersion": "v1", "kind": "PodList",
                      "metadata": {"resourceVersion": s.rv.to_string()}, "items": items});
    json_response(StatusCode::OK, list.to_string())
}

/// 403 for namespace requests when they are forbidden.
fn namespaces_refused(s: &ApiState) -> Option<Response> {
    s.namespaces_forbidden.then(|| {
        json_response(
            StatusCode::FORBIDDEN,
            status(
                403,
                "Forbidden",
                "namespaces is forbidden: User \"system:serviceaccount:weir-system:weir\" cannot list resource \"namespaces\" in API group \"\" at the cluster scope",
            ),
        )
    })
}

async fn namespaces(State(state): State<Shared>, uri: Uri) -> Response {
    let mut s = lock(&state);
    if let Some(r) = s.begin(&uri) {
        return r;
    }
    if let Some(r) = namespaces_refused(&s) {
        return r;
    }
    let query = uri.query().unwrap_or_default();
    if query
        .split('&')
        .any(|kv| kv == "watch=true" || kv == "watch=1")
    {
        return s.namespaces.watch(query);
    }
    let items: Vec<&Value> = s.namespaces.items.values().collect();
    let list = json!({"apiVersion": "v1", "kind": "NamespaceList",
                      "metadata": {"resourceVersion": s.rv.to_string()}, "items": items});
    json_response(StatusCode::OK, list.to_string())
}

async fn one_namespace(
    State(state): State<Shared>,
    UrlPath(name): UrlPath<String>,
    uri: Uri,
) -> Response {
    let mut s = lock(&state);
    if let Some(r) = s.begin(&uri) {
        return r;
    }
    if let Some(r) = namespaces_refused(&s) {
        return r;
    }
    match s.namespaces.items.get(&name) {
        Some(n) => json_response(StatusCode::OK, n.to_string()),
        None => json_response(
            StatusCode::NOT_FOUND,
            status(404, "NotFound", &format!("namespaces \"{name}\" not found")),
        ),
    }
}

async fn one_pod(
    State(state): State<Shared>,
    UrlPath((ns, name)): UrlPath<(String, String)>,
    uri: Uri,
) -> Response {
    let mut s = lock(&state);
    if let Some(r) = s.begin(&uri) {
        return r;
    }
    match s.pods.items.get(&format!("{ns}/{name}")) {
        Some(p) => json_response(StatusCode::OK, p.to_string()),
        None => json_response(
            StatusCode::NOT_FOUND,
            json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                   "message": format!("pods \"{name}\" not found"), "reason": "NotFound",
                   "details": {"name": name, "kind": "pods"}, "code": 404})
            .to_string(),
        ),
    }
}

async fn one_node(
    State(state): State<Shared>,
    UrlPath(name): UrlPath<String>,
    uri: Uri,
) -> Response {
    let mut s = lock(&state);
    if let Some(r) = s.begin(&uri) {
        return r;
    }
    match s.nodes.get(&name) {
        Some(node) => json_response(StatusCode::OK, node.to_string()),
        None => json_response(
            StatusCode::NOT_FOUND,
            status(404, "NotFound", &format!("nodes \"{name}\" not found")),
        ),
    }
}

async fn no_such_path(State(state): State<Shared>, uri: Uri) -> Response {
    let mut s = lock(&state);
    if let Some(r) = s.begin(&uri) {
        return r;
    }
    json_response(
        StatusCode::NOT_FOUND,
        status(404, "NotFound", "no such path"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One HTTP/1.0 GET (the server closes the connection after it).
    fn get(api: &FakeApi, target: &str) -> (u16, String) {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(api.addr).unwrap();
        write!(s, "GET {target} HTTP/1.0\r\nHost: x\r\n\r\n").unwrap();
        let mut text = String::new();
        s.read_to_string(&mut text).unwrap();
        let code = text.split_whitespace().nth(1).unwrap().parse().unwrap();
        let body = text.split_once("\r\n\r\n").unwrap().1.to_string();
        (code, body)
    }

    fn pod(name: &str) -> Value {
        json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": "default"}})
    }

    #[test]
    fn cluster_lists_gets_and_goes_down() {
        let api = FakeApi::start();
        api.apply(pod("a"));
        api.apply(pod("b"));
        api.delete("b");
        let (code, body) = get(&api, "/api/v1/pods?fieldSelector=x");
        assert_eq!(code, 200);
        let list: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(list["metadata"]["resourceVersion"], "3");
        assert_eq!(list["items"].as_array().unwrap().len(), 1);
        assert_eq!(get(&api, "/api/v1/namespaces/default/pods/a").0, 200);
        let (code, body) = get(&api, "/api/v1/namespaces/default/pods/b");
        assert_eq!(code, 404);
        assert!(body.contains("NotFound"), "{body}");
        assert_eq!(get(&api, "/api/v1/nodes/node-a").0, 404);
        api.set_down(true);
        assert_eq!(get(&api, "/api/v1/pods").0, 503);
        api.set_down(false);
        assert_eq!(get(&api, "/api/v1/pods").0, 200);
        assert_eq!(
            api.requests()[0],
            "/api/v1/pods?fieldSelector=x",
            "{:?}",
            api.requests()
        );
    }

    /// Reads a watch at `path` to its end, on a thread.
    fn raw_watch(api: &FakeApi, path: &str) -> std::thread::JoinHandle<String> {
        let addr = api.addr;
        let path = path.to_string();
        std::thread::spawn(move || {
            use std::io::{Read, Write};
            let mut s = std::net::TcpStream::connect(addr).unwrap();
            write!(s, "GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").unwrap();
            let mut text = String::new();
            s.read_to_string(&mut text).unwrap();
            text
        })
    }

    #[test]
    fn watch_replays_the_events_after_its_version_then_closes_on_expiry() {
        let api = FakeApi::start();
        api.apply(pod("a"));
        api.apply(pod("b"));
        let reader = raw_watch(&api, "/api/v1/pods?watch=true&resourceVersion=1");
        crate::wait_until(std::time::Duration::from_secs(5), "the watch", || {
            api.requests().len() == 1
        });
        api.expire_watches();
        let text = reader.join().unwrap();
        assert!(!text.contains("\"name\":\"a\""), "{text}");
        assert!(text.contains("\"name\":\"b\""), "{text}");
        assert!(text.contains("\"code\":410"), "{text}");
    }

    #[test]
    fn namespaces_list_watch_get_and_forbidden() {
        let api = FakeApi::start();
        api.apply_namespace("shop", &[("istio.io/dataplane-mode", "ambient")]);
        api.apply(pod("a"));
        api.apply_namespace("shop", &[]);
        api.apply_namespace("other", &[]);
        api.delete_namespace("other");
        let (code, body) = get(&api, "/api/v1/namespaces");
        assert_eq!(code, 200);
        let list: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(list["kind"], "NamespaceList");
        assert_eq!(list["items"].as_array().unwrap().len(), 1);
        assert_eq!(list["items"][0]["metadata"]["labels"], json!({}));
        assert_eq!(get(&api, "/api/v1/namespaces/shop").0, 200);
        assert_eq!(get(&api, "/api/v1/namespaces/other").0, 404);
        // A pod list shows pods only.
        let (_, body) = get(&api, "/api/v1/pods");
        let list: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(list["items"].as_array().unwrap().len(), 1);
        // A watch replays namespace events only (the label added and
        // removed, "other" added and deleted).
        let reader = raw_watch(&api, "/api/v1/namespaces?watch=true&resourceVersion=0");
        crate::wait_until(std::time::Duration::from_secs(5), "the watch", || {
            api.requests().len() == 5
        });
        api.forbid_namespaces(true);
        let text = reader.join().unwrap();
        assert_eq!(text.matches("\"type\":").count(), 4, "{text}");
        assert!(!text.contains("\"kind\":\"Pod\""), "{text}");
        let (code, body) = get(&api, "/api/v1/namespaces");
        assert_eq!(code, 403);
        assert!(body.contains("cannot list resource"), "{body}");
        api.forbid_namespaces(false);
        assert_eq!(get(&api, "/api/v1/namespaces").0, 200);
    }

    #[test]
    fn script_answers_in_order_then_503() {
        let api = FakeApi::scripted();
        api.script_list(500, "{}".into());
        api.script_list(200, "{\"items\": []}".into());
        api.set_node("node-a", json!({"capacity": {"pods": "110"}}));
        assert_eq!(get(&api, "/api/v1/pods").0, 500);
        assert_eq!(get(&api, "/api/v1/pods").0, 200);
        assert_eq!(get(&api, "/api/v1/pods").0, 503);
        let (code, body) = get(&api, "/api/v1/nodes/node-a");
        assert_eq!(code, 200);
        assert!(body.contains("\"110\""), "{body}");
    }
}
