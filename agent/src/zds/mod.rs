//! weir as ztunnel's node agent: the ZDS server (Istio ambient mode).
//!
//! In ambient mode ztunnel, the node proxy, runs each pod's proxy inside
//! the pod's own network namespace. It learns which pods those are from
//! the node agent (istio-cni's job, weir's with `--zds-socket`): ztunnel
//! connects to a `SOCK_SEQPACKET` unix socket and the agent hands over
//! each pod with its network namespace as a file descriptor. The protocol
//! (ztunnel's `proto/zds.proto`, [`proto`]):
//!
//! - ztunnel connects and sends `ZdsHello` (version `V1`);
//! - the agent sends its full list, one request at a time, each answered
//!   by an `Ack` before the next: `AddWorkload` (uid, name, namespace,
//!   service account, and the netns fd with `SCM_RIGHTS`), or
//!   `KeepWorkload` for a pod it knows but whose namespace it cannot open
//!   now (ztunnel keeps the proxy it may already run for it); then
//!   `SnapshotSent`, after which ztunnel stops every proxy that was
//!   neither added nor kept;
//! - from then on `AddWorkload` for new pods and `DelWorkload` for pods
//!   gone.
//!
//! How weir runs it:
//!
//! - the pod source (the reconcile pass of the pods file or of Kubernetes,
//!   or `weir zds-serve`'s workloads file) publishes the full set of
//!   workloads with [`Zds::update`]; nothing is sent to a ztunnel before
//!   the first full set, so an agent that restarts never makes ztunnel drop
//!   the pods it serves because of a partial picture;
//! - each connection remembers what it told its ztunnel and sends the
//!   difference when the set changes (and retries pods whose namespace
//!   could not be opened every [`RETRY`]);
//! - with more than one ztunnel connected (a ztunnel upgrade: the new one
//!   connects before the old one leaves) new pods go to the newest
//!   connection only, and deletions to every connection;
//! - a pod without a network namespace (not found yet, or not openable) is
//!   never deleted from ztunnel: it is kept;
//! - every request waits for its ack at most [`ACK_TIMEOUT`]; a ztunnel
//!   that does not answer is disconnected (it reconnects and gets a fresh
//!   snapshot).
//!
//! Metrics: `weir_zds_connections`, `weir_zds_workloads`,
//! `weir_zds_requests_total{kind,result}` (docs/operations.md).

pub mod proto;
pub mod workloads;

use std::collections::{BTreeMap, BTreeSet};
use std::io::IoSlice;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use log::{debug, info, warn};
use nix::sys::socket::{
    AddressFamily, Backlog, ControlMessage, MsgFlags, SockFlag, SockType, UnixAddr, bind, listen,
    sendmsg, socket,
};
use prost::Message;
use tokio::io::Interest;
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::watch;

use self::proto::{
    AddWorkload, DelWorkload, KeepWorkload, Request, Response, SnapshotSent, Version, WorkloadInfo,
    WorkloadRequest, WorkloadResponse, ZdsHello,
};
use crate::ambient::AmbientPod;
use crate::metrics;

/// How long ztunnel has to answer a request (and to say hello).
pub const ACK_TIMEOUT: Duration = Duration::from_secs(5);
/// How often pods whose network namespace could not be opened are tried
/// again (and a connection that became the newest catches up).
pub const RETRY: Duration = Duration::from_secs(2);
/// Largest message read from ztunnel (acks are a few bytes; a refusal
/// carries ztunnel's error text).
const MAX_MESSAGE: usize = 64 * 1024;

/// One pod handed to ztunnel.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Workload {
    /// The pod's UID: ztunnel's key for it.
    pub uid: String,
    /// Pod name.
    pub name: String,
    /// Kubernetes namespace.
    pub namespace: String,
    /// The pod's service account (its proxy's identity).
    pub service_account: String,
    /// The pod's network namespace; `None` while it has none (it is then
    /// kept, never added or deleted).
    pub netns: Option<PathBuf>,
}

impl Workload {
    /// `namespace/name`.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    fn info(&self) -> WorkloadInfo {
        WorkloadInfo {
            name: self.name.clone(),
            namespace: self.namespace.clone(),
            service_account: self.service_account.clone(),
        }
    }
}

impl From<AmbientPod> for Workload {
    fn from(p: AmbientPod) -> Self {
        Workload {
            uid: p.uid,
            name: p.name,
            namespace: p.namespace,
            service_account: p.service_account,
            netns: Some(p.netns),
        }
    }
}

/// The workloads of one reconcile pass: every enrolled ambient pod with
/// its network namespace, and every other ambient pod the pass knows of
/// (`known`: no network namespace yet, invalid, or not enrolled for
/// another reason) without one, so that ztunnel keeps the proxy it may run
/// for it and is never told to delete it.
pub fn from_pass(
    enrolled: Vec<AmbientPod>,
    known: impl IntoIterator<Item = Workload>,
) -> Vec<Workload> {
    let mut out: BTreeMap<String, Workload> = known
        .into_iter()
        .map(|w| (w.uid.clone(), Workload { netns: None, ..w }))
        .collect();
    for p in enrolled {
        out.insert(p.uid.clone(), Workload::from(p));
    }
    out.into_values().collect()
}

/// The full set of workloads, by UID.
type Desired = Arc<BTreeMap<String, Workload>>;

/// The ZDS server: publish workloads with [`Zds::update`], serve ztunnel
/// with [`Zds::listen`].
#[derive(Clone)]
pub struct Zds {
    desired: watch::Sender<Option<Desired>>,
    /// Connections that said hello, by id (the largest is the newest).
    live: Arc<Mutex<BTreeSet<u64>>>,
    /// Hand-overs a CNI ADD waits for ([`Zds::hand_over`]), by UID: the
    /// newest connection's answer once it has one.
    handoffs: watch::Sender<BTreeMap<String, Option<Result<(), String>>>>,
}

/// A hand-over in progress: [`Handoff::wait`] for ztunnel's answer.
pub struct Handoff {
    zds: Zds,
    uid: String,
    rx: watch::Receiver<BTreeMap<String, Option<Result<(), String>>>>,
}

impl Handoff {
    /// Waits for ztunnel's ack of the pod ([`ACK_TIMEOUT`] at most after
    /// the requests before it); `Err` says why it did not take the pod.
    pub async fn wait(mut self) -> Result<(), String> {
        let uid = self.uid.clone();
        let got = tokio::time::timeout(
            ACK_TIMEOUT * 2,
            self.rx.wait_for(|m| matches!(m.get(&uid), Some(Some(_)))),
        )
        .await;
        let out = match got {
            Ok(Ok(m)) => m.get(&uid).cloned().flatten().unwrap_or(Ok(())),
            Ok(Err(_)) => Err("the ZDS server stopped".to_string()),
            Err(_) => Err(format!(
                "ztunnel did not take the pod within {} s",
                (ACK_TIMEOUT * 2).as_secs()
            )),
        };
        self.zds.handoffs.send_modify(|m| {
            m.remove(&uid);
        });
        out
    }
}

impl Default for Zds {
    fn default() -> Self {
        Self::new()
    }
}

impl Zds {
    /// A server with no workload list yet.
    pub fn new() -> Self {
        Self {
            desired: watch::Sender::new(None),
            live: Arc::new(Mutex::new(BTreeSet::new())),
            handoffs: watch::Sender::new(BTreeMap::new()),
        }
    }

    /// Hands one pod to ztunnel now (a CNI ADD, as istio-cni does: the
    /// pod's containers start only once ztunnel runs its proxy), on top of
    /// the last full list; call it under the reconciler's lock, right
    /// after enrolling the pod, so that no pass publishes a list without
    /// it afterwards. Fails at once when no ztunnel is connected, or when
    /// no full list was published yet (a snapshot must never come from a
    /// partial picture).
    pub fn hand_over(&self, w: Workload) -> Result<Handoff, String> {
        if self.newest().is_none() {
            return Err(
                "no ztunnel is connected to the ZDS socket (--zds-socket): ambient pods start once ztunnel runs on the node".to_string(),
            );
        }
        if self.desired.borrow().is_none() {
            return Err("the agent has not read its pod list yet; the runtime retries".to_string());
        }
        let uid = w.uid.clone();
        let rx = self.handoffs.subscribe();
        self.handoffs.send_modify(|m| {
            m.insert(uid.clone(), None);
        });
        self.desired.send_modify(|cur| {
            let mut set = cur.as_deref().cloned().unwrap_or_default();
            set.insert(uid.clone(), w);
            *cur = Some(Arc::new(set));
        });
        Ok(Handoff {
            zds: self.clone(),
            uid,
            rx,
        })
    }

    /// Whether a CNI ADD waits for ztunnel's answer about `uid` (and has
    /// none yet).
    fn waiting(&self, uid: &str) -> bool {
        matches!(self.handoffs.borrow().get(uid), Some(None))
    }

    /// Records ztunnel's answer to an add, for a CNI ADD waiting on it.
    fn answered(&self, uid: &str, res: &Result<(), String>) {
        self.handoffs.send_if_modified(|m| match m.get_mut(uid) {
            Some(slot) => {
                *slot = Some(res.clone());
                true
            }
            None => false,
        });
    }

    /// Publishes the full set of workloads this node runs; connected
    /// ztunnels get the difference, and the first call lets them have
    /// their snapshot. Duplicate UIDs keep the last entry.
    pub fn update(&self, workloads: impl IntoIterator<Item = Workload>) {
        let set: BTreeMap<String, Workload> =
            workloads.into_iter().map(|w| (w.uid.clone(), w)).collect();
        metrics::agent().zds_workloads(set.len());
        self.desired.send_if_modified(|cur| {
            if cur.as_deref() == Some(&set) {
                return false;
            }
            *cur = Some(Arc::new(set));
            true
        });
    }

    /// Binds `path` (replacing a stale socket left by an earlier agent)
    /// and serves ztunnel connections on the current tokio runtime until
    /// the process ends.
    pub fn listen(&self, path: &Path) -> Result<()> {
        let listener = bind_seqpacket(path)?;
        info!(
            "ZDS: serving ztunnel on {} (SOCK_SEQPACKET)",
            path.display()
        );
        tokio::spawn(accept_loop(listener, self.clone()));
        Ok(())
    }

    fn newest(&self) -> Option<u64> {
        lock(&self.live).last().copied()
    }

    /// Wakes every connection (a connection left: another may be the
    /// newest now and catch up).
    fn wake_all(&self) {
        self.desired.send_modify(|_| {});
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A listening `SOCK_SEQPACKET` unix socket at `path`, mode 0600 (its
/// directory made if missing; a socket file already there is removed
/// first, anything else there is an error).
pub fn bind_seqpacket(path: &Path) -> Result<UnixListener> {
    let flag = || format!("--zds-socket {}", path.display());
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| {
            format!("{}: cannot create its directory {}", flag(), dir.display())
        })?;
    }
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => std::fs::remove_file(path)
            .with_context(|| format!("{}: cannot remove the old socket", flag()))?,
        Ok(_) => anyhow::bail!(
            "{}: exists and is not a socket; point --zds-socket at the path ztunnel's INPOD_UDS names (default /var/run/ztunnel/ztunnel.sock)",
            flag()
        ),
        Err(_) => {}
    }
    let sock = socket(
        AddressFamily::Unix,
        SockType::SeqPacket,
        SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
        None,
    )
    .with_context(|| format!("{}: socket(AF_UNIX, SOCK_SEQPACKET)", flag()))?;
    let addr = UnixAddr::new(path)
        .with_context(|| format!("{}: not a usable unix socket path (too long?)", flag()))?;
    bind(sock.as_raw_fd(), &addr).with_context(|| format!("{}: cannot bind", flag()))?;
    // Root only: whoever connects receives every ambient pod's network
    // namespace.
    std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o600))
        .with_context(|| format!("{}: chmod 600", flag()))?;
    listen(&sock, Backlog::new(128).context("listen backlog")?)
        .with_context(|| format!("{}: cannot listen", flag()))?;
    let std_listener = std::os::unix::net::UnixListener::from(sock);
    UnixListener::from_std(std_listener).with_context(|| format!("{}: tokio listener", flag()))
}

async fn accept_loop(listener: UnixListener, zds: Zds) {
    let mut next_id: u64 = 0;
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                next_id += 1;
                tokio::spawn(connection(next_id, stream, zds.clone()));
            }
            Err(e) => {
                warn!("ZDS: accept failed: {e}; retrying");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// What went wrong on one connection (it is then closed; ztunnel
/// reconnects).
#[derive(Debug, thiserror::Error)]
enum ConnError {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("ztunnel closed the connection")]
    Eof,
    #[error("no answer from ztunnel within {} s", ACK_TIMEOUT.as_secs())]
    Timeout,
    #[error("ztunnel sent something that is not a ZDS message: {0}")]
    Decode(#[from] prost::DecodeError),
    #[error("ztunnel speaks ZDS version {0}, weir only V1")]
    Version(i32),
    #[error("ztunnel answered without an ack")]
    NoAck,
}

/// What one connection told its ztunnel about a workload.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Told {
    /// Added with the namespace of this identity (device, inode).
    Added(NetnsId),
    /// Kept in the snapshot (no namespace could be opened then).
    Kept,
}

/// A network namespace's identity: its nsfs device and inode.
type NetnsId = (u64, u64);

async fn connection(id: u64, stream: UnixStream, zds: Zds) {
    let mut c = Conn {
        id,
        stream,
        told: BTreeMap::new(),
        unopenable: BTreeMap::new(),
    };
    let res = c.run(&zds).await;
    let was_live = lock(&zds.live).remove(&id);
    if was_live {
        metrics::agent().zds_connection(false);
        zds.wake_all();
    }
    match res {
        Ok(()) | Err(ConnError::Eof) => info!("ZDS: ztunnel connection {id} closed"),
        Err(e) => warn!("ZDS: ztunnel connection {id} dropped: {e}"),
    }
}

struct Conn {
    id: u64,
    stream: UnixStream,
    told: BTreeMap<String, Told>,
    /// Pods whose namespace could not be opened, with the reason (logged
    /// once per reason).
    unopenable: BTreeMap<String, String>,
}

impl Conn {
    async fn run(&mut self, zds: &Zds) -> Result<(), ConnError> {
        let hello = tokio::time::timeout(ACK_TIMEOUT, self.recv())
            .await
            .map_err(|_| ConnError::Timeout)??;
        let hello = ZdsHello::decode(&hello[..])?;
        if hello.version != Version::V1 as i32 {
            return Err(ConnError::Version(hello.version));
        }
        lock(&zds.live).insert(self.id);
        metrics::agent().zds_connection(true);
        let mut rx = zds.desired.subscribe();
        let first = rx.borrow_and_update().clone();
        let snapshot = match first {
            Some(d) => d,
            None => {
                info!(
                    "ZDS: ztunnel connected (connection {}); its snapshot waits for the first full pod list",
                    self.id
                );
                loop {
                    tokio::select! {
                        r = rx.changed() => if r.is_err() { return Ok(()) },
                        r = self.closed() => return r,
                    }
                    if let Some(d) = rx.borrow_and_update().clone() {
                        break d;
                    }
                }
            }
        };
        self.snapshot(&snapshot, zds).await?;
        let mut retry = tokio::time::interval(RETRY);
        retry.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                r = rx.changed() => if r.is_err() { return Ok(()) },
                _ = retry.tick() => {}
                r = self.closed() => return r,
            }
            let Some(cur) = rx.borrow_and_update().clone() else {
                continue;
            };
            let newest = zds.newest() == Some(self.id);
            self.sync(&cur, newest, zds).await?;
        }
    }

    /// The initial list: add or keep every workload, then `SnapshotSent`.
    async fn snapshot(
        &mut self,
        desired: &BTreeMap<String, Workload>,
        zds: &Zds,
    ) -> Result<(), ConnError> {
        let (mut added, mut kept) = (0usize, 0usize);
        for w in desired.values() {
            match self.open(w) {
                Some((fd, netns)) => {
                    self.add(w, fd, netns, zds).await?;
                    added += 1;
                }
                None => {
                    let req = Request::Keep(KeepWorkload { uid: w.uid.clone() });
                    if let Err(e) = self.request(req, None).await? {
                        warn!("ZDS: ztunnel refused to keep pod {}: {e}", w.key());
                    }
                    self.told.insert(w.uid.clone(), Told::Kept);
                    kept += 1;
                }
            }
        }
        if let Err(e) = self
            .request(Request::SnapshotSent(SnapshotSent {}), None)
            .await?
        {
            warn!("ZDS: ztunnel refused the end of the snapshot: {e}");
        }
        info!(
            "ZDS: snapshot sent to ztunnel (connection {}): {added} pods added, {kept} kept",
            self.id
        );
        Ok(())
    }

    /// After the snapshot: deletions (every connection), then additions
    /// and namespace changes (the newest connection only).
    async fn sync(
        &mut self,
        desired: &BTreeMap<String, Workload>,
        newest: bool,
        zds: &Zds,
    ) -> Result<(), ConnError> {
        let gone: Vec<String> = self
            .told
            .keys()
            .filter(|uid| !desired.contains_key(*uid))
            .cloned()
            .collect();
        for uid in gone {
            let req = Request::Del(DelWorkload { uid: uid.clone() });
            if let Err(e) = self.request(req, None).await? {
                warn!("ZDS: ztunnel refused to delete pod uid {uid}: {e}");
            }
            self.told.remove(&uid);
            self.unopenable.remove(&uid);
            debug!("ZDS: deleted pod uid {uid} (connection {})", self.id);
        }
        if !newest {
            return Ok(());
        }
        for w in desired.values() {
            let told = self.told.get(&w.uid).copied();
            if w.netns.is_none() {
                // Known, no namespace yet: nothing to say (never a delete).
                continue;
            }
            // Added with this namespace already: nothing to say, unless a
            // CNI ADD waits for ztunnel's answer (a runtime retry).
            if let Some(Told::Added(id)) = told
                && w.netns.as_deref().and_then(|p| netns_id(p).ok()) == Some(id)
                && !zds.waiting(&w.uid)
            {
                continue;
            }
            if let Some((fd, netns)) = self.open(w) {
                if matches!(told, Some(Told::Added(_))) {
                    info!(
                        "ZDS: pod {} has a new network namespace; handing it to ztunnel again",
                        w.key()
                    );
                }
                self.add(w, fd, netns, zds).await?;
            }
        }
        Ok(())
    }

    async fn add(
        &mut self,
        w: &Workload,
        fd: OwnedFd,
        netns: NetnsId,
        zds: &Zds,
    ) -> Result<(), ConnError> {
        let req = Request::Add(AddWorkload {
            uid: w.uid.clone(),
            workload_info: Some(w.info()),
        });
        let res = self.request(req, Some(&fd)).await?;
        zds.answered(&w.uid, &res);
        match res {
            Ok(()) => info!(
                "ZDS: pod {} (uid {}) handed to ztunnel (connection {})",
                w.key(),
                w.uid,
                self.id
            ),
            // ztunnel keeps the pod and retries starting its proxy itself.
            Err(e) => warn!(
                "ZDS: ztunnel could not start the proxy of pod {} yet: {e}",
                w.key()
            ),
        }
        self.told.insert(w.uid.clone(), Told::Added(netns));
        self.unopenable.remove(&w.uid);
        Ok(())
    }

    /// Opens the workload's network namespace; `None` (logged once per
    /// reason) when it has none or it cannot be opened.
    fn open(&mut self, w: &Workload) -> Option<(OwnedFd, NetnsId)> {
        let res = match &w.netns {
            None => Err("no network namespace known yet".to_string()),
            Some(p) => open_netns(p).map_err(|e| format!("{}: {e}", p.display())),
        };
        match res {
            Ok(v) => Some(v),
            Err(msg) => {
                if self.unopenable.get(&w.uid) != Some(&msg) {
                    info!(
                        "ZDS: pod {}: {msg}; kept in ztunnel, handed over once it can be opened",
                        w.key()
                    );
                    self.unopenable.insert(w.uid.clone(), msg);
                }
                None
            }
        }
    }

    /// Sends one request and waits for its ack: `Ok(Err(text))` when
    /// ztunnel refused it.
    async fn request(
        &mut self,
        req: Request,
        fd: Option<&OwnedFd>,
    ) -> Result<Result<(), String>, ConnError> {
        let kind = req.kind();
        let bytes = WorkloadRequest { payload: Some(req) }.encode_to_vec();
        let res = tokio::time::timeout(ACK_TIMEOUT, async {
            self.send(&bytes, fd).await?;
            let answer = self.recv().await?;
            let resp = WorkloadResponse::decode(&answer[..])?;
            match resp.payload {
                Some(Response::Ack(a)) => Ok(a),
                None => Err(ConnError::NoAck),
            }
        })
        .await
        .unwrap_or(Err(ConnError::Timeout));
        let result = match &res {
            Ok(a) if a.error.is_empty() => "acked",
            Ok(_) => "refused",
            Err(_) => "failed",
        };
        metrics::agent().zds_request(kind, result);
        let ack = res?;
        Ok(if ack.error.is_empty() {
            Ok(())
        } else {
            Err(ack.error)
        })
    }

    async fn send(&self, bytes: &[u8], fd: Option<&OwnedFd>) -> Result<(), ConnError> {
        let raw = self.stream.as_raw_fd();
        let fds: Vec<i32> = fd.map(|f| f.as_raw_fd()).into_iter().collect();
        let sent = self
            .stream
            .async_io(Interest::WRITABLE, || {
                let iov = [IoSlice::new(bytes)];
                let cmsgs: Vec<ControlMessage<'_>> = if fds.is_empty() {
                    Vec::new()
                } else {
                    vec![ControlMessage::ScmRights(&fds)]
                };
                sendmsg::<()>(raw, &iov, &cmsgs, MsgFlags::MSG_NOSIGNAL, None)
                    .map_err(std::io::Error::from)
            })
            .await?;
        if sent != bytes.len() {
            return Err(ConnError::Io(std::io::Error::other(format!(
                "sent {sent} of {} bytes",
                bytes.len()
            ))));
        }
        Ok(())
    }

    /// The next message from ztunnel (one datagram of the seqpacket
    /// stream).
    async fn recv(&self) -> Result<Vec<u8>, ConnError> {
        let mut buf = vec![0u8; MAX_MESSAGE];
        loop {
            self.stream.readable().await?;
            match self.stream.try_read(&mut buf) {
                Ok(0) => return Err(ConnError::Eof),
                Ok(n) => {
                    buf.truncate(n);
                    return Ok(buf);
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Resolves when ztunnel closes the connection (between requests it
    /// has nothing to say; anything it says then is ignored).
    async fn closed(&self) -> Result<(), ConnError> {
        loop {
            match self.recv().await {
                Err(ConnError::Eof) => return Ok(()),
                Err(e) => return Err(e),
                Ok(m) => debug!(
                    "ZDS: ignoring an unrequested message of {} bytes from ztunnel",
                    m.len()
                ),
            }
        }
    }
}

/// Opens a network namespace file (`/proc/PID/ns/net`, a bind mount under
/// `/var/run/netns`) for handing to ztunnel, checking that it is one.
pub fn open_netns(path: &Path) -> std::io::Result<(OwnedFd, NetnsId)> {
    let file = std::fs::File::open(path)?;
    let fs = nix::sys::statfs::fstatfs(file.as_fd())?;
    if fs.filesystem_type() != nix::sys::statfs::NSFS_MAGIC {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "not a namespace file (give /proc/PID/ns/net or a /var/run/netns/NAME mount)",
        ));
    }
    let m = file.metadata()?;
    Ok((OwnedFd::from(file), (m.dev(), m.ino())))
}

/// The identity of the namespace at `path` without keeping it open.
fn netns_id(path: &Path) -> std::io::Result<NetnsId> {
    let m = std::fs::metadata(path)?;
    Ok((m.dev(), m.ino()))
}

#[cfg(test)]
mod tests;
