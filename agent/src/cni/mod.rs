//! The agent's side of the `weir-cni` plugin: a Unix socket on which the
//! plugin asks, during a pod's network set-up, to enroll the pod's network
//! namespace now; and keeping the plugin in the node's CNI configuration.
//!
//! A request is answered only after the pod's maps and its `sk_lookup`
//! link are in place (or it failed), so when the runtime starts the pod's
//! first container, capture is already on: no window, as with iptables
//! written by an init container. The protocol is in [`protocol`].
//!
//! The socket is root-only: its directory is created `0700`, the socket
//! `0600`, and every peer's credentials are checked (`SO_PEERCRED`).

pub mod install;
pub mod kubeconfig;
pub mod protocol;
pub mod registry;

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use log::{debug, info, warn};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::Notify;

use self::protocol::{Command, PodRef, Request, Response};
use self::registry::{CniPod, Registry};
use crate::k8s::classify::{PodView, Verdict};
use crate::k8s::netns::agent_view_of;
use crate::k8s::state::spec_of;
use crate::reconcile::Reconciler;

/// What the agent does about the CNI plugin.
#[derive(Copy, Clone, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    /// Serve the socket; a pod that cannot be enrolled does not start.
    Enforce,
    /// Serve the socket; a pod that cannot be enrolled starts anyway and
    /// the watcher enrolls it later (a short window without capture).
    FailOpen,
    /// No plugin: no socket, and weir's entry is removed from the node's
    /// CNI configuration (the watcher alone enrolls pods).
    Off,
}

/// `weir run` options for the CNI plugin.
#[derive(clap::Args, Debug, Clone)]
#[group(id = "cni_plugin")]
pub struct Args {
    /// Unix socket the weir-cni plugin talks to [default with --kubernetes:
    /// /var/run/weir/cni.sock; without it, no socket unless given].
    #[arg(long, env = "WEIR_CNI_SOCKET")]
    pub cni_socket: Option<PathBuf>,
    /// enforce: pods weir cannot enroll do not start (retried by the
    /// kubelet); fail-open: they start and are enrolled later; off: no CNI
    /// plugin.
    #[arg(long, env = "WEIR_CNI_MODE", value_enum, default_value = "enforce")]
    pub cni_mode: Mode,
    /// The node's CNI configuration directory (as mounted in the agent):
    /// when set, the agent keeps weir-cni chained in its primary
    /// configuration (removes it with --cni-mode off).
    #[arg(long, env = "WEIR_CNI_CONF_DIR")]
    pub cni_conf_dir: Option<PathBuf>,
    /// The node's CNI binary directory (as mounted in the agent): when set,
    /// the weir-cni binary shipped next to `weir` is copied there.
    #[arg(long, env = "WEIR_CNI_BIN_DIR")]
    pub cni_bin_dir: Option<PathBuf>,
    /// The host's path of --cni-conf-dir, written into weir-cni's entry
    /// (the kubeconfig the plugin reads) [default: the same path].
    #[arg(long, env = "WEIR_CNI_HOST_CONF_DIR")]
    pub cni_host_conf_dir: Option<PathBuf>,
    /// Namespaces (comma-separated) whose pods weir-cni lets start when the
    /// agent is not reachable, without asking anything (as istio-cni's
    /// excluded namespaces). With the agent up they are handled like any
    /// other.
    #[arg(
        long,
        env = "WEIR_CNI_EXCLUDE_NAMESPACES",
        value_delimiter = ',',
        default_value = "kube-system"
    )]
    pub cni_exclude_namespaces: Vec<String>,
}

/// Whether `name` is a namespace name (an RFC 1123 label).
fn is_namespace_name(name: &str) -> bool {
    let b = name.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        && b[0] != b'-'
        && b[b.len() - 1] != b'-'
}

/// The namespace list of `--cni-exclude-namespaces`: blanks dropped, each
/// checked.
pub fn exclude_namespaces(raw: &[String]) -> Result<Vec<String>> {
    let mut out: Vec<String> = Vec::new();
    for n in raw.iter().map(|n| n.trim()).filter(|n| !n.is_empty()) {
        if !is_namespace_name(n) {
            anyhow::bail!(
                "--cni-exclude-namespaces: {n:?} is not a namespace name (lowercase letters, digits and '-', at most 63 characters); give a comma-separated list such as kube-system,kube-flannel"
            );
        }
        if !out.iter().any(|o| o == n) {
            out.push(n.to_string());
        }
    }
    Ok(out)
}

impl Args {
    /// The socket to serve, if any.
    pub fn socket(&self, kubernetes: bool) -> Option<PathBuf> {
        if self.cni_mode == Mode::Off {
            return None;
        }
        self.cni_socket
            .clone()
            .or_else(|| kubernetes.then(|| PathBuf::from(protocol::DEFAULT_SOCKET)))
    }
}

/// `weir cni …`: manage the plugin's place in the node's CNI configuration
/// by hand (the agent does it itself when given --cni-conf-dir).
#[derive(clap::Args, Debug)]
pub struct CniCommand {
    #[command(subcommand)]
    action: CniAction,
}

#[derive(clap::Subcommand, Debug)]
enum CniAction {
    /// Copy weir-cni into the CNI binary directory and chain it into the
    /// primary CNI configuration.
    Install {
        /// CNI configuration directory.
        #[arg(long, default_value = "/etc/cni/net.d")]
        cni_conf_dir: PathBuf,
        /// CNI binary directory.
        #[arg(long, default_value = "/opt/cni/bin")]
        cni_bin_dir: PathBuf,
        /// The agent's socket, as the host sees it.
        #[arg(long, default_value = protocol::DEFAULT_SOCKET)]
        cni_socket: PathBuf,
        /// Let pods start when the agent cannot enroll them.
        #[arg(long)]
        fail_open: bool,
        /// Namespaces (comma-separated) whose pods start when the agent is
        /// not reachable.
        #[arg(long, value_delimiter = ',', default_value = "kube-system")]
        cni_exclude_namespaces: Vec<String>,
    },
    /// Remove weir-cni from every CNI configuration file (do this before
    /// removing weir from a node, or new pods there cannot start).
    Uninstall {
        /// CNI configuration directory.
        #[arg(long, default_value = "/etc/cni/net.d")]
        cni_conf_dir: PathBuf,
        /// Also delete the binary from this CNI binary directory.
        #[arg(long)]
        cni_bin_dir: Option<PathBuf>,
    },
}

/// Runs `weir cni …`.
pub fn command(c: &CniCommand) -> Result<()> {
    match &c.action {
        CniAction::Install {
            cni_conf_dir,
            cni_bin_dir,
            cni_socket,
            fail_open,
            cni_exclude_namespaces,
        } => {
            let src = install::bundled_plugin()
                .context("weir-cni is not next to the weir binary; install both together")?;
            if install::install_binary(&src, cni_bin_dir)? {
                println!("copied {} to {}", src.display(), cni_bin_dir.display());
            }
            let entry = install::Entry {
                socket: cni_socket.clone(),
                fail_open: *fail_open,
                exclude_namespaces: exclude_namespaces(cni_exclude_namespaces)?,
                // By hand there is no agent credential to hand on: pods
                // outside the excluded namespaces wait for the agent.
                kubeconfig: None,
            };
            match install::install_config(cni_conf_dir, &entry)? {
                install::Installed::Written(p) => println!("chained weir-cni into {}", p.display()),
                install::Installed::Unchanged(p) => {
                    println!("{} already chains weir-cni", p.display())
                }
                install::Installed::NoConfig => anyhow::bail!(
                    "{}: no CNI configuration yet; install the network plugin first",
                    cni_conf_dir.display()
                ),
            }
        }
        CniAction::Uninstall {
            cni_conf_dir,
            cni_bin_dir,
        } => {
            for p in install::uninstall_config(cni_conf_dir)? {
                println!("removed weir-cni from {}", p.display());
            }
            if remove_plugin_kubeconfig(cni_conf_dir)? {
                println!("removed {}", cni_conf_dir.join(kubeconfig::FILE).display());
            }
            if let Some(dir) = cni_bin_dir {
                let bin = dir.join(install::PLUGIN);
                match std::fs::remove_file(&bin) {
                    Ok(()) => println!("removed {}", bin.display()),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => return Err(e).with_context(|| format!("removing {}", bin.display())),
                }
            }
        }
    }
    Ok(())
}

/// Removes the plugin's kubeconfig from `conf_dir`; whether there was one.
fn remove_plugin_kubeconfig(conf_dir: &Path) -> Result<bool> {
    let path = conf_dir.join(kubeconfig::FILE);
    match std::fs::remove_file(&path) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e).with_context(|| format!("removing {}", path.display())),
    }
}

/// Where the server learns whether a pod is meshed, and its policy.
#[derive(Clone)]
pub enum Lookup {
    /// Local mode: the pods file lists the meshed pods.
    PodsFile(PathBuf),
    /// The Kubernetes API (the watcher's store, then a GET).
    Kubernetes(crate::k8s::Lookup),
}

impl Lookup {
    async fn find(&self, pod: &PodRef) -> Result<PodView, String> {
        match self {
            Lookup::Kubernetes(k) => k.find(pod).await,
            Lookup::PodsFile(path) => {
                let text = tokio::fs::read_to_string(path)
                    .await
                    .map_err(|e| format!("pods file {}: {e}", path.display()))?;
                let parsed = crate::podsfile::parse(path, &text).map_err(|e| e.to_string())?;
                let key = format!("{}/{}", pod.namespace, pod.name);
                let not = |why: String| PodView {
                    namespace: pod.namespace.clone(),
                    name: pod.name.clone(),
                    uid: pod.uid.clone(),
                    cgroup_uid: pod.uid.clone(),
                    ips: Vec::new(),
                    annotations: BTreeMap::new(),
                    service_account: "default".into(),
                    verdict: Verdict::NotMeshed(why),
                    bad_ips: Vec::new(),
                    ipv6_from_first_ip: false,
                };
                if parsed.invalid.contains(&key) {
                    return Err(format!(
                        "the pods file's entry for {key} is invalid; see the agent's log"
                    ));
                }
                let Some(s) = parsed.pods.into_iter().find(|s| s.key() == key) else {
                    return Ok(not("not listed in the pods file".into()));
                };
                Ok(PodView {
                    ips: s.ips,
                    annotations: s.annotations,
                    uid: s.uid.clone(),
                    cgroup_uid: s.uid,
                    service_account: s.service_account,
                    verdict: Verdict::Meshed(s.mesh),
                    ..not(String::new())
                })
            }
        }
    }
}

/// Why the network namespace at `p` (the agent's view) cannot be used, if
/// it cannot: missing, or not reachable (the real error, e.g. permission
/// denied, is named: it is not the same fix).
fn netns_problem(p: &Path) -> Option<String> {
    match std::fs::metadata(p) {
        Ok(_) => None,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Some(format!(
            "network namespace {} does not exist in the agent's view; mount the host's /var/run/netns into the agent at the same path with mountPropagation: HostToContainer",
            p.display()
        )),
        Err(e) => Some(format!(
            "network namespace {} cannot be opened by the agent: {e}; the agent runs as root with the host's /var/run/netns mounted (check its securityContext and the mount)",
            p.display()
        )),
    }
}

/// What the server works with.
pub struct Server {
    rec: Arc<Mutex<Reconciler>>,
    lookup: Lookup,
    host_proc: PathBuf,
    /// Kubernetes mode: pods enrolled here, for the watcher's passes.
    registry: Option<Arc<Mutex<Registry>>>,
    /// Kubernetes mode: wakes the watcher's loop (after a DEL).
    wake: Option<Arc<Notify>>,
    /// Kubernetes mode: the agent's client configuration, handed on to
    /// the plugin as a kubeconfig ([`kubeconfig`]).
    plugin_kube: Option<kube::Config>,
    /// `--zds-socket`: an ambient pod's ADD hands it to ztunnel and waits
    /// for ztunnel's answer.
    zds: Option<crate::zds::Zds>,
}

impl Server {
    /// A server over the reconciler.
    pub fn new(
        rec: Arc<Mutex<Reconciler>>,
        lookup: Lookup,
        host_proc: PathBuf,
        registry: Option<Arc<Mutex<Registry>>>,
        wake: Option<Arc<Notify>>,
    ) -> Self {
        Self {
            rec,
            lookup,
            host_proc,
            registry,
            wake,
            plugin_kube: None,
            zds: None,
        }
    }

    /// Hands ambient pods to ztunnel at ADD time ([`crate::zds`]).
    pub fn with_zds(mut self, zds: Option<crate::zds::Zds>) -> Self {
        self.zds = zds;
        self
    }

    /// Lets the agent write a kubeconfig for the plugin from `config`
    /// (with --cni-conf-dir), so the plugin can tell pods that are not
    /// meshed while the agent is down.
    pub fn with_plugin_kubeconfig(mut self, config: kube::Config) -> Self {
        self.plugin_kube = Some(config);
        self
    }

    /// Answers one request.
    pub async fn handle(&self, req: Request) -> Response {
        if req.version != protocol::VERSION {
            return Response::Failed {
                message: format!(
                    "protocol version {} is not {}; install the weir-cni shipped with this agent",
                    req.version,
                    protocol::VERSION
                ),
            };
        }
        match req.command {
            Command::Add => self.add(req).await,
            Command::Del => self.del(req),
            Command::Check => self.check(req).await,
            Command::Status => Response::Ok {
                message: "ready".into(),
            },
            Command::Inpod => self.inpod(req).await,
        }
    }

    fn netns_of(&self, req: &Request) -> Result<PathBuf, String> {
        let p = Path::new(&req.netns);
        if !p.is_absolute() {
            return Err(format!("CNI_NETNS {:?} is not an absolute path", req.netns));
        }
        let p = agent_view_of(&self.host_proc, p);
        netns_problem(&p).map_or(Ok(p), Err)
    }

    async fn add(&self, req: Request) -> Response {
        let key = format!("{}/{}", req.pod.namespace, req.pod.name);
        if req.pod.name.is_empty() || req.pod.namespace.is_empty() {
            return Response::Skipped {
                message: "not a Kubernetes pod (no K8S_POD_NAMESPACE / K8S_POD_NAME)".into(),
            };
        }
        let failed = |message: String| Response::Failed { message };
        let netns = match self.netns_of(&req) {
            Ok(p) => p,
            Err(e) => return failed(e),
        };
        let mut view = match self.lookup.find(&req.pod).await {
            Ok(v) => v,
            Err(e) => return failed(e),
        };
        let mesh = match &view.verdict {
            Verdict::NotMeshed(why) => {
                debug!("CNI ADD {key}: not meshed: {why}");
                return Response::Skipped {
                    message: format!("{key}: not meshed: {why}"),
                };
            }
            Verdict::Meshed(m) => *m,
        };
        let mut ips = Vec::new();
        for s in &req.ips {
            match s.parse::<IpAddr>() {
                Ok(ip) if !ips.contains(&ip) => ips.push(ip),
                Ok(_) => {}
                Err(_) => {
                    return failed(format!(
                        "prevResult address {s:?} is not an IP address; check the primary CNI plugin's result"
                    ));
                }
            }
        }
        if !ips.is_empty() {
            // The ADD's own result: the API has no addresses yet for a new
            // pod (the kubelet learns them from this very ADD).
            view.set_ips(ips);
        }
        let spec = match spec_of(&view, netns.clone()) {
            Ok(s) => s,
            Err(e) => return failed(e.to_string()),
        };
        let uid = if view.uid.is_empty() {
            req.pod.uid.clone()
        } else {
            view.uid.clone()
        };
        let rec = self.rec.clone();
        let registry = self.registry.clone();
        let container_id = req.container_id.clone();
        let started = std::time::Instant::now();
        let zds = self
            .zds
            .clone()
            .filter(|_| mesh == crate::policy::Mesh::Ambient);
        let res = tokio::task::spawn_blocking(move || {
            let mut r = rec.lock().unwrap_or_else(|p| p.into_inner());
            // Registered before enrolling, under the reconciler's lock, so
            // no watcher pass can remove the pod in between.
            let mut reg = registry
                .as_ref()
                .map(|r| r.lock().unwrap_or_else(|p| p.into_inner()));
            if let Some(reg) = reg.as_mut() {
                reg.insert(CniPod {
                    uid,
                    container_id,
                    netns,
                    spec: spec.clone(),
                });
            }
            let res = r.enroll_now(&spec);
            if res.is_err()
                && let Some(reg) = reg.as_mut()
            {
                reg.remove(&spec.key());
            }
            // An ambient pod goes to ztunnel now, under the reconciler's
            // lock (no pass can publish a list without it after this).
            res.map(|cookie| {
                let handoff = zds.map(|z| {
                    z.hand_over(crate::zds::Workload::from(crate::ambient::AmbientPod::of(
                        &spec,
                    )))
                });
                (cookie, handoff)
            })
        })
        .await;
        match res {
            Ok(Ok((cookie, handoff))) => {
                if let Some(h) = handoff {
                    let handed = match h {
                        Ok(h) => h.wait().await,
                        Err(e) => Err(e),
                    };
                    if let Err(e) = handed {
                        warn!("CNI ADD {key}: enrolled, but ztunnel did not take it: {e}");
                        return failed(format!(
                            "{key}: enrolled, but ztunnel did not take it: {e}"
                        ));
                    }
                }
                info!(
                    "CNI ADD {key}: enrolled ({mesh}, netns cookie {cookie}) in {} ms",
                    started.elapsed().as_millis()
                );
                Response::Enrolled {
                    cookie,
                    message: format!("{key} enrolled ({mesh})"),
                }
            }
            Ok(Err(e)) => {
                warn!("CNI ADD {key}: not enrolled: {e:#}");
                failed(format!("{e:#}"))
            }
            Err(e) => failed(format!("enrollment task failed: {e}")),
        }
    }

    /// `weir inpod-enroll`: enrolls the caller's netns as an ambient pod
    /// (see [`crate::ambient::inpod`]).
    async fn inpod(&self, req: Request) -> Response {
        if req.netns.is_empty() {
            return Response::Failed {
                message: "the caller's pid is unknown (no SO_PEERCRED); run weir inpod-enroll \
                          on this host"
                    .into(),
            };
        }
        let rec = self.rec.clone();
        let res = tokio::task::spawn_blocking(move || {
            let mut r = rec.lock().unwrap_or_else(|p| p.into_inner());
            crate::ambient::inpod::enroll(&mut r, &req)
        })
        .await;
        match res {
            Ok(Ok((key, cookie))) => {
                info!("inpod-enroll: {key} enrolled (ambient, netns cookie {cookie})");
                Response::Enrolled {
                    cookie,
                    message: format!("{key} enrolled (ambient)"),
                }
            }
            Ok(Err(e)) => {
                warn!("inpod-enroll: {e:#}");
                Response::Failed {
                    message: format!("{e:#}"),
                }
            }
            Err(e) => Response::Failed {
                message: format!("enrollment task failed: {e}"),
            },
        }
    }

    fn del(&self, req: Request) -> Response {
        if let Some(reg) = &self.registry {
            let keys = reg
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove_container(&req.container_id);
            if !keys.is_empty() {
                debug!("CNI DEL: sandbox {} of {keys:?}", req.container_id);
            }
        }
        if let Some(w) = &self.wake {
            w.notify_one();
        }
        Response::Ok {
            message: "noted".into(),
        }
    }

    async fn check(&self, req: Request) -> Response {
        let key = format!("{}/{}", req.pod.namespace, req.pod.name);
        let view = match self.lookup.find(&req.pod).await {
            Ok(v) => v,
            Err(e) => return Response::Failed { message: e },
        };
        if let Verdict::NotMeshed(why) = view.verdict {
            return Response::Ok {
                message: format!("not meshed: {why}"),
            };
        }
        let netns = match self.netns_of(&req) {
            Ok(p) => p,
            Err(e) => return Response::Failed { message: e },
        };
        let rec = self.rec.clone();
        let res = tokio::task::spawn_blocking(move || {
            let want = crate::sys::netns_cookie_of_path(&netns)
                .map_err(|e| format!("netns {}: {e}", netns.display()))?;
            let r = rec.lock().unwrap_or_else(|p| p.into_inner());
            match r.pods.get(&key) {
                Some(p) if p.cookie == want => Ok(format!("{key} enrolled (cookie {want})")),
                Some(p) => Err(format!(
                    "{key} is enrolled with netns cookie {}, not {want}",
                    p.cookie
                )),
                None => Err(format!("{key} is not enrolled")),
            }
        })
        .await;
        match res {
            Ok(Ok(message)) => Response::Ok { message },
            Ok(Err(message)) => Response::Failed { message },
            Err(e) => Response::Failed {
                message: e.to_string(),
            },
        }
    }
}

/// Creates the socket: its directory `0700` when missing, a stale socket
/// file replaced, the socket `0600`.
pub fn bind(path: &Path) -> Result<UnixListener> {
    if let Some(dir) = path.parent()
        && !dir.exists()
    {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("--cni-socket: cannot create {}", dir.display()))?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
            .with_context(|| format!("--cni-socket: chmod {}", dir.display()))?;
    }
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => std::fs::remove_file(path)
            .with_context(|| format!("--cni-socket: removing stale {}", path.display()))?,
        Ok(_) => anyhow::bail!(
            "--cni-socket {}: exists and is not a socket; remove it or choose another path",
            path.display()
        ),
        Err(_) => {}
    }
    // The socket is bound inside a fresh 0700 directory, made 0600 there,
    // then renamed into place: at no moment can another user connect to it
    // (binding at `path` and then chmod-ing would leave a window with the
    // umask's permissions, in a directory that may be world-readable).
    let dir = path.parent().unwrap_or(Path::new("."));
    let private = dir.join(format!(".weir-cni-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&private);
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&private)
        .with_context(|| format!("--cni-socket: cannot create {}", private.display()))?;
    let staged = private.join("sock");
    let bound = UnixListener::bind(&staged)
        .with_context(|| format!("--cni-socket {}: cannot listen", path.display()))
        .and_then(|l| {
            std::fs::set_permissions(&staged, std::fs::Permissions::from_mode(0o600))
                .with_context(|| format!("--cni-socket: chmod {}", staged.display()))?;
            std::fs::rename(&staged, path).with_context(|| {
                format!("--cni-socket: moving the socket to {}", path.display())
            })?;
            Ok(l)
        });
    let _ = std::fs::remove_dir_all(&private);
    bound
}

/// Serves the socket until the process ends.
pub async fn serve(listener: UnixListener, server: Arc<Server>) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                let server = server.clone();
                tokio::spawn(async move {
                    if let Err(e) = connection(stream, &server).await {
                        warn!("CNI socket: {e:#}");
                    }
                });
            }
            Err(e) => {
                warn!("CNI socket: accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

async fn connection(mut stream: UnixStream, server: &Server) -> Result<()> {
    let cred = stream
        .peer_cred()
        .context("reading the peer's credentials")?;
    let me = nix::unistd::geteuid().as_raw();
    if cred.uid() != 0 && cred.uid() != me {
        anyhow::bail!(
            "refused a connection from uid {} (pid {:?}): only root may use the CNI socket",
            cred.uid(),
            cred.pid()
        );
    }
    let (rd, mut wr) = stream.split();
    let mut line = Vec::new();
    let mut rd = BufReader::new(rd.take(protocol::MAX_MESSAGE as u64));
    tokio::time::timeout(Duration::from_secs(10), rd.read_until(b'\n', &mut line))
        .await
        .context("no request within 10 s")?
        .context("reading the request")?;
    let started = std::time::Instant::now();
    let (command, resp) = match serde_json::from_slice::<Request>(&line) {
        Ok(mut req) => {
            if req.command == Command::Inpod {
                // The caller's own netns, by its pid as this process sees
                // it (never a path the caller names).
                req.netns = match cred.pid() {
                    Some(pid) => format!("/proc/{pid}/ns/net"),
                    None => String::new(),
                };
            }
            (Some(req.command), server.handle(req).await)
        }
        Err(e) => (
            None,
            Response::Failed {
                message: format!(
                    "not a weir-cni request ({e}); is weir-cni the same version as the agent?"
                ),
            },
        ),
    };
    crate::metrics::agent().cni_response(command, &resp, started.elapsed());
    let mut out = serde_json::to_vec(&resp)?;
    out.push(b'\n');
    wr.write_all(&out).await.context("writing the answer")?;
    Ok(())
}

/// Starts the CNI side of the agent: the socket (unless off) and, with
/// --cni-conf-dir, keeping the plugin chained (or removed when off).
pub async fn start(args: &Args, socket: Option<PathBuf>, mut server: Server) -> Result<()> {
    let exclude = exclude_namespaces(&args.cni_exclude_namespaces)?;
    let plugin_kube = server.plugin_kube.take();
    if let Some(path) = &socket {
        let listener = bind(path)?;
        info!("CNI socket {} ({:?} mode)", path.display(), args.cni_mode);
        tokio::spawn(serve(listener, Arc::new(server)));
    }
    if let Some(conf_dir) = args.cni_conf_dir.clone() {
        if args.cni_mode == Mode::Off {
            let dir = conf_dir.clone();
            match tokio::task::spawn_blocking(move || install::uninstall_config(&dir)).await? {
                Ok(files) => {
                    for f in files {
                        info!("--cni-mode off: removed weir-cni from {}", f.display());
                    }
                    crate::metrics::agent().cni_chain(None);
                }
                Err(e) => warn!("--cni-mode off: {e}"),
            }
            if let Err(e) = remove_plugin_kubeconfig(&conf_dir) {
                warn!("--cni-mode off: {e:#}");
            }
            return Ok(());
        }
        let host_dir = args.cni_host_conf_dir.clone().unwrap_or(conf_dir.clone());
        let entry = install::Entry {
            socket: socket.unwrap_or_else(|| PathBuf::from(protocol::DEFAULT_SOCKET)),
            fail_open: args.cni_mode == Mode::FailOpen,
            exclude_namespaces: exclude,
            kubeconfig: plugin_kube
                .is_some()
                .then(|| host_dir.join(kubeconfig::FILE)),
        };
        tokio::spawn(keep_installed(
            conf_dir,
            args.cni_bin_dir.clone(),
            entry,
            plugin_kube,
        ));
    }
    Ok(())
}

/// Keeps the plugin binary and its configuration entry in place, checking
/// every 5 s (the network plugin may rewrite its configuration).
async fn keep_installed(
    conf_dir: PathBuf,
    bin_dir: Option<PathBuf>,
    entry: install::Entry,
    plugin_kube: Option<kube::Config>,
) {
    let mut tick = tokio::time::interval(Duration::from_secs(5));
    let mut last_error = String::new();
    let mut said_no_config = false;
    loop {
        tick.tick().await;
        let (conf_dir, bin_dir, entry) = (conf_dir.clone(), bin_dir.clone(), entry.clone());
        let plugin_kube = plugin_kube.clone();
        let res = tokio::task::spawn_blocking(move || -> Result<(bool, install::Installed)> {
            // The kubeconfig first: the entry that names it comes after.
            if let Some(cfg) = &plugin_kube {
                let text = kubeconfig::for_plugin(cfg)
                    .map_err(|e| anyhow::anyhow!("the kubeconfig for weir-cni: {e}"))?;
                let path = conf_dir.join(kubeconfig::FILE);
                if std::fs::read_to_string(&path).ok().as_deref() != Some(text.as_str()) {
                    install::write_atomic(&path, text.as_bytes(), 0o600)?;
                }
            }
            let copied = match &bin_dir {
                Some(dir) => {
                    let src = install::bundled_plugin().context(
                        "weir-cni is not next to the weir binary in the image; it cannot be installed",
                    )?;
                    install::install_binary(&src, dir)?
                }
                None => false,
            };
            Ok((copied, install::install_config(&conf_dir, &entry)?))
        })
        .await;
        match res {
            Ok(Ok((copied, installed))) => {
                last_error.clear();
                if copied {
                    info!("copied weir-cni into the CNI binary directory");
                }
                crate::metrics::agent().cni_chain(match &installed {
                    install::Installed::Written(p) | install::Installed::Unchanged(p) => Some(p),
                    install::Installed::NoConfig => None,
                });
                match installed {
                    install::Installed::Written(p) => {
                        said_no_config = false;
                        info!("chained weir-cni into {}", p.display());
                    }
                    install::Installed::Unchanged(_) => said_no_config = false,
                    install::Installed::NoConfig if !said_no_config => {
                        said_no_config = true;
                        info!(
                            "no CNI configuration in the CNI configuration directory yet; waiting for the network plugin"
                        );
                    }
                    install::Installed::NoConfig => {}
                }
            }
            Ok(Err(e)) => {
                let msg = format!("{e:#}");
                if msg != last_error {
                    warn!("CNI install: {msg}");
                    last_error = msg;
                }
            }
            Err(e) => warn!("CNI install task: {e}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::k8s::testutil::TempDir;

    #[test]
    fn exclude_namespaces_are_checked() {
        let v = |s: &[&str]| s.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        assert_eq!(
            exclude_namespaces(&v(&["kube-system", " istio-system ", "", "kube-system"])).unwrap(),
            ["kube-system", "istio-system"]
        );
        assert!(exclude_namespaces(&v(&[""])).unwrap().is_empty());
        for bad in ["Kube", "a_b", "-a", "a-", &"x".repeat(64)] {
            let e = exclude_namespaces(&v(&[bad])).unwrap_err().to_string();
            assert!(
                e.contains("--cni-exclude-namespaces") && e.contains(bad),
                "{e}"
            );
        }
    }

    #[test]
    fn netns_problems_name_the_real_error() {
        let d = TempDir::new("netnsp");
        let file = d.path().join("ns");
        std::fs::write(&file, "").unwrap();
        assert_eq!(netns_problem(&file), None);
        let missing = netns_problem(&d.path().join("gone")).unwrap();
        assert!(missing.contains("does not exist"), "{missing}");
        // Not "missing": a path the agent cannot traverse (here ENOTDIR;
        // EACCES for a non-root agent) says what the kernel said.
        let blocked = netns_problem(&file.join("below")).unwrap();
        assert!(
            !blocked.contains("does not exist") && blocked.contains("cannot be opened"),
            "{blocked}"
        );
        assert!(
            blocked.contains(&std::io::Error::from_raw_os_error(libc::ENOTDIR).to_string()),
            "{blocked}"
        );
    }
}
