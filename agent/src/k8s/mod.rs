//! The Kubernetes pod source: the meshed pods of this node, from the API.
//!
//! - A kube-rs watcher on pods with `spec.nodeName=<node>` (served from the
//!   API server's watch cache, `resourceVersion=0`, which is what a
//!   DaemonSet on every node should ask for), restarted with backoff on
//!   errors; `410 Gone`, bookmarks and re-lists are the watcher's business.
//! - [`state::PodStore`] keeps what the last complete list and the events
//!   since say; nothing is applied before the first complete list, so an
//!   agent that starts while the API is down leaves the pinned state of
//!   the previous agent (and so capture) exactly as it is.
//! - Each pass (on a change, and every `--resync-secs`) finds every meshed
//!   pod's network namespace ([`netns`]) and applies the full desired set
//!   with [`Reconciler::apply`]. A pod whose namespace is gone is removed;
//!   an invalid annotation keeps the pod's last good policy. Kubernetes I/O
//!   and `/proc` scans happen outside the reconciler's lock.
//! - The CNI server ([`crate::cni`]) enrolls new pods synchronously; its
//!   pods are merged into every pass ([`crate::cni::registry`]).
//! - A metadata-only watch on namespaces ([`namespaces`]) gives each pod
//!   its namespace's `istio.io/dataplane-mode` (ambient enrollment), in
//!   the passes and in the CNI server's lookup; a label change decides the
//!   namespace's pods again on the next pass.

pub mod classify;
pub mod namespaces;
pub mod netns;
pub mod state;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use futures_util::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use kube::{Api, Client};
use log::{debug, error, info, warn};
use tokio::sync::Notify;

use self::classify::{NamespaceLabels, PodView, view};
use self::namespaces::NamespaceStore;
use self::netns::Discovery;
use self::state::PodStore;
use crate::cni::protocol::PodRef;
use crate::cni::registry::Registry;
use crate::reconcile::Reconciler;

/// `weir run` options for the Kubernetes pod source.
#[derive(clap::Args, Debug, Clone)]
#[group(id = "kubernetes_source")]
pub struct KubeArgs {
    /// Watch this node's pods in the Kubernetes API (in-cluster config, or
    /// --kubeconfig / $KUBECONFIG) instead of reading a pods file.
    #[arg(long, env = "WEIR_KUBERNETES")]
    pub kubernetes: bool,
    /// This node's name, as in its pods' spec.nodeName (in a DaemonSet,
    /// from the downward API).
    #[arg(long, env = "NODE_NAME")]
    pub node_name: Option<String>,
    /// The host's /proc, where pods' processes (their cgroups and network
    /// namespaces) are found: /proc with hostPID, or a host mount.
    #[arg(long, env = "WEIR_HOST_PROC", default_value = "/proc")]
    pub host_proc: PathBuf,
    /// A kubeconfig file [default: the in-cluster service account, else
    /// $KUBECONFIG or ~/.kube/config].
    #[arg(long)]
    pub kubeconfig: Option<PathBuf>,
    /// Where to record why each pod is enrolled (a pod label, its
    /// namespace's label), for `weir status` and `weir explain`.
    #[arg(long, env = "WEIR_STATE_FILE", default_value = crate::reasons::DEFAULT_STATE_FILE)]
    pub state_file: PathBuf,
}

/// How long the CNI server waits for the API when the watcher does not
/// know a pod yet.
const GET_TIMEOUT: Duration = Duration::from_secs(10);

/// Checks done before the datapath is loaded in Kubernetes mode.
///
/// The pins must live in the host's bpffs: an agent that mounted its own
/// inside its container would lose them (and capture) on restart.
pub fn preflight(args: &KubeArgs, bpffs: &std::path::Path) -> Result<()> {
    if args
        .node_name
        .as_deref()
        .is_none_or(|n| n.trim().is_empty())
    {
        anyhow::bail!(
            "--kubernetes needs the node's name: pass --node-name or set NODE_NAME (in a DaemonSet: env NODE_NAME from fieldRef spec.nodeName)"
        );
    }
    if !crate::sys::is_bpffs(bpffs) {
        anyhow::bail!(
            "--bpffs {}: not a bpffs mount; in Kubernetes mode the host's bpffs must be mounted there (hostPath /sys/fs/bpf with mountPropagation HostToContainer), or pins would not survive an agent restart",
            bpffs.display()
        );
    }
    if !args.host_proc.join("1/cgroup").exists() {
        anyhow::bail!(
            "--host-proc {}: no 1/cgroup there; point it at the host's /proc (hostPID: true and /proc, or a hostPath mount)",
            args.host_proc.display()
        );
    }
    Ok(())
}

/// The client configuration from --kubeconfig, else the usual inference.
pub async fn config(args: &KubeArgs) -> Result<kube::Config> {
    let config = match &args.kubeconfig {
        Some(path) => {
            let kc = kube::config::Kubeconfig::read_from(path)
                .with_context(|| format!("--kubeconfig {}", path.display()))?;
            kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
                .await
                .with_context(|| format!("--kubeconfig {}", path.display()))?
        }
        None => kube::Config::infer().await.context(
            "no Kubernetes configuration: not in a pod with a service account, and no usable $KUBECONFIG or ~/.kube/config; pass --kubeconfig",
        )?,
    };
    info!("Kubernetes API at {}", config.cluster_url);
    Ok(config)
}

/// A client from [`config`]'s configuration.
pub fn client(config: kube::Config) -> Result<Client> {
    // No retries inside the client: the watcher's backoff (0.8 s doubling
    // to 30 s, like client-go's reflector) decides when to try again and
    // reports each failure, and a CNI request should fail fast so the
    // kubelet retries the pod. The client's own retry of 429/503 grows to
    // minutes, which would delay recovery after an outage.
    let mut config = config;
    config.default_retry = false;
    Client::try_from(config).context("building the Kubernetes client")
}

/// The pods this node can run (`status.capacity.pods` of the Node named
/// `--node-name`), to size the maps; [`Capacities::DEFAULT_PODS`] with a
/// warning when the API does not say (no permission to read nodes, no
/// answer within 10 s, a malformed quantity).
///
/// [`Capacities::DEFAULT_PODS`]: crate::datapath::Capacities::DEFAULT_PODS
pub async fn node_pod_capacity(args: &KubeArgs) -> u32 {
    let node = args.node_name.clone().unwrap_or_default();
    let read = async {
        let client = client(config(args).await?)?;
        read_pod_capacity(client, &node).await
    };
    pod_capacity_or_default(&node, tokio::time::timeout(GET_TIMEOUT, read).await)
}

/// `status.capacity.pods` of node `node`.
async fn read_pod_capacity(client: Client, node: &str) -> Result<u32> {
    let api: Api<k8s_openapi::api::core::v1::Node> = Api::all(client);
    let n = api
        .get(node)
        .await
        .with_context(|| format!("reading node {node}"))?;
    let q = n
        .status
        .and_then(|s| s.capacity)
        .and_then(|c| c.get("pods").cloned())
        .with_context(|| format!("node {node} has no status.capacity.pods"))?;
    parse_pod_capacity(&q.0).with_context(|| format!("node {node}: status.capacity.pods {:?}", q.0))
}

/// The capacity read, or the default with a warning saying how to size
/// the maps.
fn pod_capacity_or_default(
    node: &str,
    read: Result<Result<u32>, tokio::time::error::Elapsed>,
) -> u32 {
    let fallback = crate::datapath::Capacities::DEFAULT_PODS;
    match read {
        Ok(Ok(p)) => {
            info!("node {node} runs at most {p} pods (status.capacity.pods): maps sized for it");
            p
        }
        Ok(Err(e)) => {
            warn!(
                "{e:#}: maps sized for {fallback} pods; pass --max-pods (or grant `get nodes`) to size them for this node"
            );
            fallback
        }
        Err(_) => {
            warn!(
                "reading node {node}: no answer within {} s: maps sized for {fallback} pods; pass --max-pods to size them",
                GET_TIMEOUT.as_secs()
            );
            fallback
        }
    }
}

/// A pod count as the API writes it (a plain integer quantity, e.g.
/// `"110"`), within `--max-pods`' range.
fn parse_pod_capacity(q: &str) -> Result<u32> {
    let n: u32 = q.trim().parse().context("not a plain integer quantity")?;
    anyhow::ensure!((1..=1_048_576).contains(&n), "{n} is not in 1..=1048576");
    Ok(n)
}

/// Finds pods for the CNI server: the watcher's store, else the API.
#[derive(Clone)]
pub struct ApiLookup {
    store: Arc<Mutex<PodStore>>,
    namespaces: Arc<Mutex<NamespaceStore>>,
    client: Client,
}

impl crate::cni::PodSource for ApiLookup {
    fn find<'a>(&'a self, pod: &'a PodRef) -> crate::cni::Found<'a> {
        Box::pin(self.find(pod))
    }
}

impl ApiLookup {
    /// The pod `pod` (its UID checked when given), decided with its
    /// namespace's labels.
    pub async fn find(&self, pod: &PodRef) -> Result<PodView, String> {
        let mut v = self.find_pod(pod).await?;
        if v.ambient_labels.is_some() {
            let labels = self.namespace_labels(&pod.namespace).await?;
            v.classify_ambient(match &labels {
                Some(l) => NamespaceLabels::Known(l.as_ref()),
                None => NamespaceLabels::Unknown,
            });
        }
        Ok(v)
    }

    /// The labels of namespace `ns` (`Some(None)`: it has none; `None`:
    /// namespaces cannot be read, pod labels only): the watcher's store,
    /// else the API.
    async fn namespace_labels(
        &self,
        ns: &str,
    ) -> Result<Option<Option<BTreeMap<String, String>>>, String> {
        {
            let s = lock(&self.namespaces);
            if let Some(l) = s.get(ns) {
                return Ok(Some(Some(l)));
            }
            if s.unreadable().is_some() {
                return Ok(None);
            }
        }
        // Not seen by the watcher yet: read it directly.
        let api: Api<namespaces::NamespaceMeta> = Api::all(self.client.clone());
        let got = tokio::time::timeout(GET_TIMEOUT, api.get_opt(ns))
            .await
            .map_err(|_| {
                format!(
                    "reading namespace {ns} from the Kubernetes API: no answer within {} s",
                    GET_TIMEOUT.as_secs()
                )
            })?;
        match got {
            Ok(n) => Ok(Some(n.and_then(|n| n.metadata.labels))),
            Err(kube::Error::Api(e)) if e.code == 403 => {
                warn!(
                    "reading namespace {ns}: {e}; {}; deciding with the pod's labels only",
                    namespaces::FORBIDDEN_FIX
                );
                Ok(None)
            }
            Err(e) => Err(format!(
                "reading namespace {ns} from the Kubernetes API: {e}"
            )),
        }
    }

    /// The pod `pod` as the watcher or the API has it.
    async fn find_pod(&self, pod: &PodRef) -> Result<PodView, String> {
        let key = format!("{}/{}", pod.namespace, pod.name);
        if let Some(v) = lock(&self.store).get(&key)
            && (pod.uid.is_empty() || v.uid == pod.uid)
        {
            return Ok(v.clone());
        }
        // Not seen by the watcher yet (it lags, or the API was away):
        // read it directly.
        let api: Api<Pod> = Api::namespaced(self.client.clone(), &pod.namespace);
        let got = tokio::time::timeout(GET_TIMEOUT, api.get_opt(&pod.name))
            .await
            .map_err(|_| {
                format!(
                    "reading pod {key} from the Kubernetes API: no answer within {} s",
                    GET_TIMEOUT.as_secs()
                )
            })?
            .map_err(|e| format!("reading pod {key} from the Kubernetes API: {e}"))?;
        let Some(p) = got else {
            return Err(format!("pod {key} is not in the Kubernetes API"));
        };
        let v = view(&p).map_err(|e| e.to_string())?;
        if !pod.uid.is_empty() && v.uid != pod.uid {
            return Err(format!(
                "pod {key} in the API has UID {}, the runtime says {} (an older pod of the same name is still there); retry",
                v.uid, pod.uid
            ));
        }
        Ok(v)
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Watches the node's pods and keeps them enrolled until SIGTERM/SIGINT.
pub async fn run(
    args: &KubeArgs,
    cni: &crate::cni::CniArgs,
    resync: Duration,
    rec: Arc<Mutex<Reconciler>>,
    ready: Arc<AtomicBool>,
    zds: Option<crate::zds::Zds>,
) -> Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let node = args
        .node_name
        .clone()
        .context("--kubernetes needs --node-name or NODE_NAME")?;
    let kube_config = config(args).await?;
    let client = client(kube_config.clone())?;
    let store = Arc::new(Mutex::new(PodStore::new()));
    let ns_store = Arc::new(Mutex::new(NamespaceStore::new()));
    let registry = Arc::new(Mutex::new(Registry::default()));
    let wake = Arc::new(Notify::new());

    let server = crate::cni::Server::new(
        rec.clone(),
        Box::new(ApiLookup {
            store: store.clone(),
            namespaces: ns_store.clone(),
            client: client.clone(),
        }),
        args.host_proc.clone(),
        Some(registry.clone()),
        Some(wake.clone()),
    )
    .with_plugin_kubeconfig(kube_config)
    .with_zds(zds.clone());
    crate::cni::start(cni, cni.socket(true), server).await?;

    tokio::spawn(namespaces::watch(
        Api::all(client.clone()),
        ns_store.clone(),
        wake.clone(),
    ));
    let api: Api<Pod> = Api::all(client);
    info!("watching the pods of node {node}");
    tokio::spawn(watch(
        api,
        watcher_config(&node),
        store.clone(),
        registry.clone(),
        wake.clone(),
    ));

    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut tick = tokio::time::interval(resync);
    let mut pass = Pass {
        discovery: Some(Discovery::new(&args.host_proc)),
        reported: BTreeMap::new(),
        waiting: BTreeSet::new(),
        last_keys: None,
        zds,
        state_file: args.state_file.clone(),
        written: None,
        // A previous agent's decisions (see `PodStore::meshed_in`).
        previous: crate::reasons::Reasons::read(&args.state_file),
    };
    loop {
        tokio::select! {
            _ = term.recv() => { info!("SIGTERM: stopping (capture stays in place)"); break; }
            _ = int.recv() => { info!("SIGINT: stopping (capture stays in place)"); break; }
            _ = wake.notified() => {
                // Let a burst of events settle into one pass.
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            _ = tick.tick() => {}
        }
        if let Err(e) = pass.run(&store, &ns_store, &registry, &rec).await {
            crate::metrics::agent().reconcile_pass(None, Duration::ZERO);
            error!("reconcile pass failed: {e:#}");
            continue;
        }
        if lock(&store).synced() && lock(&ns_store).ready() {
            ready.store(true, Ordering::Relaxed);
        }
    }
    Ok(())
}

/// The watch on this node's pods: a field selector on `spec.nodeName`,
/// lists served from the API server's watch cache (`resourceVersion=0`:
/// thousands of agents re-listing must not all hit etcd), bookmarks on.
/// Lists are not paginated: the API server ignores `limit` for cached
/// lists (so kube-rs would drop `resourceVersion=0`), and one node's pods
/// are a small list.
fn watcher_config(node: &str) -> watcher::Config {
    let mut cfg = watcher::Config::default()
        .fields(&format!("spec.nodeName={node}"))
        .any_semantic();
    cfg.page_size = None;
    cfg
}

/// Follows a watcher forever (errors are retried with the watcher's
/// default backoff), for the pod and the namespace watches: `on_event`
/// gets every event; `on_error` gets every error and whether it is the
/// same as the one before (to log it once), after it is counted in
/// `weir_agent_watch_errors_total`; the first event after errors logs that
/// `what` is watched again.
pub(crate) async fn follow<K>(
    api: Api<K>,
    cfg: watcher::Config,
    what: &str,
    mut on_event: impl FnMut(Event<K>),
    mut on_error: impl FnMut(&watcher::Error, bool),
) where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + 'static,
    K::DynamicType: Default,
{
    let mut stream = watcher::watcher(api, cfg).default_backoff().boxed();
    let mut failing: Option<String> = None;
    while let Some(item) = stream.next().await {
        match item {
            Ok(ev) => {
                if let Some(e) = failing.take() {
                    info!("Kubernetes API: watching {what} again (after: {e})");
                }
                on_event(ev);
            }
            Err(e) => {
                crate::metrics::agent().watch_error();
                let msg = e.to_string();
                on_error(&e, failing.as_deref() == Some(msg.as_str()));
                failing = Some(msg);
            }
        }
    }
}

/// Follows this node's pods, feeding the store; never ends.
async fn watch(
    api: Api<Pod>,
    cfg: watcher::Config,
    store: Arc<Mutex<PodStore>>,
    registry: Arc<Mutex<Registry>>,
    wake: Arc<Notify>,
) {
    let on_event = |ev: Event<Pod>| {
        let done = matches!(ev, Event::InitDone);
        let h = lock(&store).handle(ev);
        if !h.deleted.is_empty() {
            let mut reg = lock(&registry);
            for (key, uid) in &h.deleted {
                reg.remove_pod(key, uid);
            }
        }
        if done {
            let s = lock(&store);
            let all = s.pods().count();
            let meshed = s.pods().filter(|v| v.mesh().is_some()).count();
            info!("Kubernetes API: listed {all} pods on this node, {meshed} meshed");
        }
        if h.changed || !h.deleted.is_empty() {
            wake.notify_one();
        }
    };
    let on_error = |e: &watcher::Error, repeated: bool| {
        if repeated {
            debug!("Kubernetes API: {e}");
        } else {
            warn!("Kubernetes API: {e}; retrying with backoff (enrolled pods stay captured)");
        }
    };
    follow(api, cfg, "pods", on_event, on_error).await;
}

/// One reconcile pass, with what it remembers between passes (to log each
/// problem once).
struct Pass {
    discovery: Option<Discovery>,
    reported: BTreeMap<String, String>,
    waiting: BTreeSet<String>,
    last_keys: Option<BTreeSet<String>>,
    /// The ZDS server (`--zds-socket`), fed the ambient pods of each pass.
    zds: Option<crate::zds::Zds>,
    /// `--state-file`, and what was last written there.
    state_file: PathBuf,
    written: Option<crate::reasons::Reasons>,
    /// What the file said when the agent started.
    previous: crate::reasons::Reasons,
}

impl Pass {
    async fn run(
        &mut self,
        store: &Arc<Mutex<PodStore>>,
        namespaces: &Arc<Mutex<NamespaceStore>>,
        registry: &Arc<Mutex<Registry>>,
        rec: &Arc<Mutex<Reconciler>>,
    ) -> Result<()> {
        let (mut meshed, known, undecided) = {
            let s = lock(store);
            let n = lock(namespaces);
            if !s.synced() || !n.ready() {
                // Never act on a partial picture: the pinned state stays.
                return Ok(());
            }
            s.meshed_in(&n, self.written.as_ref().unwrap_or(&self.previous))
        };
        let hints: BTreeMap<String, PathBuf> = {
            let reg = lock(registry);
            for v in meshed.iter_mut().filter(|v| v.ips.is_empty()) {
                // No status.podIPs yet: the addresses CNI ADD reported
                // (and so the same policy the ADD enrolled).
                if let Some(ips) = reg.ips(&v.key(), &v.uid) {
                    v.set_ips(ips);
                }
            }
            meshed
                .iter()
                .filter_map(|v| reg.hint(&v.key(), &v.uid).map(|p| (v.key(), p)))
                .collect()
        };
        let mut discovery = self.discovery.take().expect("one pass at a time");
        let zds = self.zds.clone();
        let (rec, registry) = (rec.clone(), registry.clone());
        let (discovery, res) = tokio::task::spawn_blocking(move || {
            let uids: BTreeSet<String> = meshed
                .iter()
                .filter(|v| !hints.contains_key(&v.key()))
                .map(|v| v.cgroup_uid.clone())
                .collect();
            let found = match discovery.resolve(&uids) {
                Ok(f) => f,
                Err(e) => return (discovery, Err(e)),
            };
            let mut desired = state::desired(&meshed, |v| {
                hints
                    .get(&v.key())
                    .cloned()
                    .or_else(|| found.get(&netns::normalize(&v.cgroup_uid)).cloned())
            });
            let mut r = lock(&rec);
            lock(&registry).merge(&mut desired, &known);
            // Pods only their namespace's (unreadable) labels can decide:
            // as they are, enrolled or not.
            desired.invalid.extend(undecided);
            r.apply(&desired.pods, &desired.invalid);
            r.dp.set_ready(true);
            let applied: BTreeSet<String> = r.pods.keys().cloned().collect();
            let reasons = crate::reasons::Reasons::of(&r.pods);
            // The ambient pods for ztunnel (under the lock, so a CNI ADD's
            // hand-over is never followed by a list without its pod):
            // enrolled ones with their netns; the others (no netns yet,
            // invalid) kept.
            if let Some(z) = &zds {
                let known = meshed
                    .iter()
                    .filter(|v| v.mesh() == Some(crate::policy::Mesh::Ambient))
                    .map(|v| crate::zds::Workload {
                        uid: v.uid.clone(),
                        name: v.name.clone(),
                        namespace: v.namespace.clone(),
                        service_account: v.service_account.clone(),
                        netns: None,
                    });
                z.update(crate::zds::from_pass(
                    crate::ambient::enrolled_pods(&r.pods),
                    known,
                ));
            }
            drop(r);
            (discovery, Ok((desired, applied, reasons)))
        })
        .await
        .context("reconcile task")?;
        self.discovery = Some(discovery);
        let (desired, applied, reasons) = res.map_err(|e| {
            anyhow::anyhow!(
                "cannot read the host's /proc to find pod network namespaces ({e}); nothing changed; check --host-proc and hostPID"
            )
        })?;

        for (key, msg) in &desired.problems {
            if self.reported.get(key) != Some(msg) {
                error!("pod {key}: {msg}");
            }
        }
        self.reported = desired.problems;
        for key in desired.no_netns.difference(&self.waiting) {
            info!(
                "pod {key}: meshed, but no network namespace on this node yet (no process in its cgroup); enrolled once it has one"
            );
        }
        self.waiting = desired.no_netns;
        if self.written.as_ref() != Some(&reasons) {
            match reasons.write(&self.state_file) {
                Ok(()) => self.written = Some(reasons),
                Err(e) => warn!(
                    "--state-file {}: {e}; `weir status` will not show why pods are enrolled",
                    self.state_file.display()
                ),
            }
        }
        if self.last_keys.as_ref() != Some(&applied) {
            info!("Kubernetes: {} pods enrolled", applied.len());
            self.last_keys = Some(applied);
        }
        Ok(())
    }
}
