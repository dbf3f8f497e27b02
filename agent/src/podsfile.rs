//! The local pod source: a YAML file listing the pods of this node.
//!
//! ```yaml
//! pods:
//!   - name: productpage-v1            # required
//!     namespace: default              # optional, default "default"
//!     netns: /var/run/netns/productpage   # required
//!     ips: [198.18.1.2]               # IPv4 and/or IPv6
//!     mesh: istio                     # istio (default) | linkerd | kuma | ambient
//!     annotations: {}                 # Kubernetes pod annotations
//!     labels: {}                      # ambient: istio.io/dataplane-mode
//!     namespaceLabels: {}             # ambient: the namespace's labels
//!     uid: 3f1c...                    # Kubernetes pod UID (ambient: ztunnel's key)
//!     serviceAccount: default         # ambient: the pod's identity
//! ```
//!
//! A file that cannot be read or is not YAML is an error as a whole; a bad
//! entry is reported (file, pod, field) and skipped, the others stay.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use log::{error, info, warn};

use crate::cni::protocol::PodRef;
use crate::pod::{MeshVerdict, PodSpec, PodView};
use crate::policy::{Mesh, pod_rules};
use crate::reconcile::Reconciler;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    #[serde(default)]
    pods: Vec<serde_yaml_ng::Value>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPod {
    name: String,
    #[serde(default = "default_namespace")]
    namespace: String,
    netns: PathBuf,
    #[serde(default)]
    ips: Vec<String>,
    #[serde(default)]
    mesh: Option<Mesh>,
    #[serde(default)]
    annotations: BTreeMap<String, String>,
    /// Kubernetes pod UID (ambient: what ztunnel knows the pod by);
    /// default `<namespace>/<name>`.
    #[serde(default)]
    uid: Option<String>,
    /// `spec.serviceAccountName` (ambient: the pod's identity), default
    /// `default`.
    #[serde(default, rename = "serviceAccount")]
    service_account: Option<String>,
    /// Labels of the pod (ambient enrollment:
    /// `istio.io/dataplane-mode`).
    #[serde(default)]
    labels: BTreeMap<String, String>,
    /// Labels of the pod's namespace (ambient enrollment).
    #[serde(default, rename = "namespaceLabels")]
    namespace_labels: BTreeMap<String, String>,
}

fn default_namespace() -> String {
    "default".to_string()
}

/// What a pods file holds: the valid pods and one message per bad entry.
#[derive(Debug, Default)]
pub struct PodsFile {
    /// Valid pods.
    pub pods: Vec<PodSpec>,
    /// Problems, each naming the file, the pod and the field.
    pub errors: Vec<String>,
    /// `namespace/name` of the entries that were invalid (when their name
    /// could be read): such pods keep their last good policy.
    pub invalid: BTreeSet<String>,
}

/// Errors that make the whole file unusable.
#[derive(Debug, thiserror::Error)]
pub enum PodsFileError {
    /// The file is not the expected YAML.
    #[error("pods file {path}: {source}; expected a mapping with a `pods:` list")]
    Yaml {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: serde_yaml_ng::Error,
    },
    /// The file is empty: most likely caught between truncate and write by
    /// a writer that does not replace it atomically.
    #[error(
        "pods file {path}: the file is empty (still being written?); write `pods: []` to remove every pod, and replace the file atomically (write a temporary file, then rename it)"
    )]
    Empty {
        /// The file.
        path: PathBuf,
    },
}

/// The largest pods file the agent reads (a node's pods take a few MB).
pub const MAX_FILE_BYTES: u64 = 64 << 20;

/// Reads the pods file, refusing what is not a regular file of sane size:
/// a FIFO or a device would block or never end, and a reader must never
/// stall the agent's loop.
pub async fn read(path: &Path) -> std::io::Result<String> {
    use std::io::{Error, ErrorKind};
    let meta = tokio::fs::metadata(path).await?;
    if !meta.is_file() {
        return Err(Error::new(
            ErrorKind::InvalidInput,
            "not a regular file; point --pods-file at a YAML file",
        ));
    }
    if meta.len() > MAX_FILE_BYTES {
        return Err(Error::new(
            ErrorKind::InvalidInput,
            format!(
                "{} bytes, more than the {MAX_FILE_BYTES} bytes weir reads; list only this node's pods",
                meta.len()
            ),
        ));
    }
    tokio::fs::read_to_string(path).await
}

/// Wakes the agent when the pods file is replaced or rewritten.
///
/// Watches the file's directory (an atomic replace is a rename into it,
/// and a Kubernetes ConfigMap volume swaps a symlink there) for entries
/// closed after writing, moved in or out, created, deleted or changed
/// owner/mode. Half-written files are not announced (no `IN_MODIFY`). A
/// thread blocks on the inotify descriptor and wakes the agent's loop.
pub struct Watch {
    wake: std::sync::Arc<tokio::sync::Notify>,
}

impl Watch {
    /// Starts watching the directory of `path`.
    pub fn new(path: &Path) -> std::io::Result<Self> {
        use nix::sys::inotify::{AddWatchFlags as W, InitFlags, Inotify};
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => Path::new("."),
        };
        let ino = Inotify::init(InitFlags::IN_CLOEXEC)?;
        ino.add_watch(
            dir,
            W::IN_CLOSE_WRITE
                | W::IN_MOVED_TO
                | W::IN_MOVED_FROM
                | W::IN_DELETE
                | W::IN_CREATE
                | W::IN_ATTRIB,
        )?;
        let wake = std::sync::Arc::new(tokio::sync::Notify::new());
        let waker = wake.clone();
        std::thread::Builder::new()
            .name("pods-file-watch".into())
            .spawn(move || {
                loop {
                    match ino.read_events() {
                        Ok(_) => waker.notify_one(),
                        Err(nix::errno::Errno::EINTR) => {}
                        Err(e) => {
                            log::warn!("pods file watch stopped ({e}); polling only");
                            break;
                        }
                    }
                }
            })?;
        Ok(Self { wake })
    }

    /// Waits for the next change in the directory. Any entry counts: the
    /// file may be a symlink through other entries of the directory
    /// (ConfigMap volumes), and a spurious wake-up only costs a read of an
    /// unchanged file.
    pub async fn changed(&self) {
        self.wake.notified().await;
    }
}

/// Parses pods-file text (`path` is only used in messages).
pub fn parse(path: &Path, text: &str) -> Result<PodsFile, PodsFileError> {
    // An empty file never means "no pods": it unenrolls every pod of the
    // node, and it is what a reader sees between a writer's truncate and
    // its write. Removing all pods takes an explicit `pods: []`.
    if text.trim().is_empty() {
        return Err(PodsFileError::Empty {
            path: path.to_path_buf(),
        });
    }
    let raw: RawFile = serde_yaml_ng::from_str(text).map_err(|source| PodsFileError::Yaml {
        path: path.to_path_buf(),
        source,
    })?;
    let mut out = PodsFile::default();
    let mut seen_names = BTreeSet::new();
    let mut seen_netns = BTreeMap::new();
    let mut seen_ips = BTreeMap::new();
    for (i, value) in raw.pods.into_iter().enumerate() {
        let name = value
            .get("name")
            .and_then(|n| n.as_str())
            .map(str::to_string);
        let ns = value
            .get("namespace")
            .and_then(|n| n.as_str())
            .unwrap_or("default")
            .to_string();
        let label = name
            .as_ref()
            .map(|n| format!("pod {n:?}"))
            .unwrap_or_else(|| format!("pod #{}", i + 1));
        if let Some(n) = &name {
            out.invalid.insert(format!("{ns}/{n}"));
        }
        let mut fail = |msg: String| {
            out.errors
                .push(format!("pods file {}: {label}: {msg}", path.display()))
        };
        let raw: RawPod = match serde_yaml_ng::from_value(value) {
            Ok(r) => r,
            Err(e) => {
                fail(format!("{e}"));
                continue;
            }
        };
        if raw.name.trim().is_empty() {
            fail("field `name` is empty; give the pod a name".into());
            continue;
        }
        if !raw.netns.is_absolute() {
            fail(format!(
                "field `netns`: {:?} is not an absolute path; use e.g. /var/run/netns/NAME",
                raw.netns
            ));
            continue;
        }
        let mut ips = Vec::new();
        let mut bad_ip = None;
        for s in &raw.ips {
            match s.trim().parse::<IpAddr>() {
                Ok(ip) => match crate::policy::pod_ip_problem(ip) {
                    None => ips.push(ip.to_canonical()),
                    Some(why) => {
                        bad_ip = Some(format!(
                            "{s:?} {why}, not a pod's own address; list the addresses of the pod's interfaces"
                        ));
                        break;
                    }
                },
                Err(_) => {
                    bad_ip = Some(format!("{s:?} is not an IP address"));
                    break;
                }
            }
        }
        if let Some(problem) = bad_ip {
            fail(format!("field `ips`: {problem}"));
            continue;
        }
        let key = format!("{}/{}", raw.namespace, raw.name);
        if !seen_names.insert(key.clone()) {
            fail(format!("pod {key} is listed twice; keep one entry"));
            continue;
        }
        if let Some(other) = seen_netns.insert(raw.netns.clone(), key.clone()) {
            fail(format!(
                "field `netns`: {} is already the netns of pod {other}; each pod has its own",
                raw.netns.display()
            ));
            continue;
        }
        if let Some(other) = ips.iter().find_map(|ip| seen_ips.get(ip)) {
            fail(format!(
                "field `ips`: an address is already used by pod {other}"
            ));
            continue;
        }
        // Without `mesh`, the ambient labels decide (as istio-cni does);
        // else Istio's sidecar mode, the default.
        let (mesh, reason) = match raw.mesh {
            Some(m) if m == Mesh::Ambient => (m, "mesh: ambient in the pods file".to_string()),
            Some(m) => (m, String::new()),
            None => {
                match crate::ambient::classify(crate::ambient::PodFacts {
                    labels: Some(&raw.labels),
                    annotations: Some(&raw.annotations),
                    namespace_labels: Some(&raw.namespace_labels),
                    ..Default::default()
                }) {
                    crate::ambient::Enrollment::Ambient(why) => (Mesh::Ambient, why),
                    crate::ambient::Enrollment::NotAmbient(_) => (Mesh::Istio, String::new()),
                }
            }
        };
        let rules = match pod_rules(mesh, &ips, &raw.annotations) {
            Ok(r) => r,
            Err(e) => {
                fail(format!("field `annotations`: {e}"));
                continue;
            }
        };
        for ip in &ips {
            seen_ips.insert(*ip, key.clone());
        }
        out.invalid.remove(&key);
        out.pods.push(PodSpec {
            namespace: raw.namespace,
            name: raw.name,
            netns: raw.netns,
            ips,
            mesh,
            annotations: raw.annotations,
            rules,
            uid: raw.uid.unwrap_or_default(),
            service_account: raw
                .service_account
                .filter(|s| !s.trim().is_empty())
                .unwrap_or_else(|| "default".into()),
            reason,
        });
    }
    Ok(out)
}

/// The local mode's loop: applies the pods file now, whenever its content
/// changes (inotify, else every `reload`), and every `resync`; returns on
/// SIGTERM or SIGINT.
pub async fn run(
    pods_file: &Path,
    reload: Duration,
    resync: Duration,
    rec: Arc<Mutex<Reconciler>>,
    ready: Arc<AtomicBool>,
    zds: Option<crate::zds::Zds>,
) -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut tick = tokio::time::interval(reload);
    // Changes are seen at once through inotify; the poll stays as the
    // fallback (and for filesystems without inotify).
    let watch = match Watch::new(pods_file) {
        Ok(w) => Some(w),
        Err(e) => {
            warn!(
                "pods file {}: cannot watch it with inotify ({e}); polling every {} ms",
                pods_file.display(),
                reload.as_millis()
            );
            None
        }
    };
    let mut last: Option<String> = None;
    let mut last_apply = tokio::time::Instant::now();
    let mut unreadable: Option<String> = None;
    loop {
        tokio::select! {
            _ = term.recv() => { info!("SIGTERM: stopping (capture stays in place)"); break; }
            _ = int.recv() => { info!("SIGINT: stopping (capture stays in place)"); break; }
            _ = tick.tick() => {}
            _ = async {
                match &watch {
                    Some(w) => w.changed().await,
                    None => std::future::pending().await,
                }
            } => {}
        }
        let text = match read(pods_file).await {
            Ok(t) => {
                if unreadable.take().is_some() {
                    info!("pods file {}: readable again", pods_file.display());
                }
                t
            }
            Err(e) => {
                // Said once per distinct problem, not on every poll.
                let msg = e.to_string();
                if unreadable.as_deref() != Some(msg.as_str()) {
                    warn!(
                        "pods file {}: cannot read it ({msg}); keeping the current pods",
                        pods_file.display()
                    );
                    unreadable = Some(msg);
                }
                last = None;
                continue;
            }
        };
        let changed = last.as_deref() != Some(text.as_str());
        if !changed && last_apply.elapsed() < resync {
            continue;
        }
        let parsed = match parse(pods_file, &text) {
            Ok(p) => p,
            Err(e) => {
                if changed {
                    crate::metrics::agent().reconcile_pass(None, Duration::ZERO);
                    error!("{e}; keeping the current pods");
                }
                last = Some(text);
                continue;
            }
        };
        if changed {
            for e in &parsed.errors {
                error!("{e}");
            }
        }
        let rec = rec.clone();
        let started = std::time::Instant::now();
        let zds = zds.clone();
        tokio::task::spawn_blocking(move || {
            let mut r = rec.lock().unwrap_or_else(|p| p.into_inner());
            r.apply(&parsed.pods, &parsed.invalid);
            r.dp.set_ready(true);
            // The ambient pods for ztunnel (under the lock, so a CNI ADD's
            // hand-over is never followed by a list without its pod):
            // enrolled ones with their netns, the others of the file kept.
            if let Some(z) = &zds {
                let known = parsed
                    .pods
                    .iter()
                    .filter(|s| s.mesh == Mesh::Ambient)
                    .map(|s| crate::zds::Workload::from(crate::ambient::AmbientPod::of(s)));
                z.update(crate::zds::from_pass(
                    crate::ambient::enrolled_pods(&r.pods),
                    known,
                ));
            }
        })
        .await?;
        if changed {
            info!("pods file applied in {} ms", started.elapsed().as_millis());
        }
        ready.store(true, Ordering::Relaxed);
        last = Some(text);
        last_apply = tokio::time::Instant::now();
    }
    Ok(())
}

/// The pods file as the CNI server's pod source (local mode): a pod is
/// meshed when the file lists it.
pub struct PodsFileSource(pub PathBuf);

impl crate::cni::PodSource for PodsFileSource {
    fn find<'a>(&'a self, pod: &'a PodRef) -> crate::cni::Found<'a> {
        Box::pin(self.find(pod))
    }
}

impl PodsFileSource {
    async fn find(&self, pod: &PodRef) -> Result<PodView, String> {
        let path = &self.0;
        let text = tokio::fs::read_to_string(path)
            .await
            .map_err(|e| format!("pods file {}: {e}", path.display()))?;
        let parsed = parse(path, &text).map_err(|e| e.to_string())?;
        let key = format!("{}/{}", pod.namespace, pod.name);
        let not = |why: String| PodView {
            namespace: pod.namespace.clone(),
            name: pod.name.clone(),
            uid: pod.uid.clone(),
            cgroup_uid: pod.uid.clone(),
            ips: Vec::new(),
            annotations: BTreeMap::new(),
            service_account: "default".into(),
            verdict: MeshVerdict::NotMeshed(why),
            bad_ips: Vec::new(),
            ipv6_from_first_ip: false,
            ambient_labels: None,
            reason: String::new(),
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
            verdict: MeshVerdict::Meshed(s.mesh),
            reason: s.reason,
            ..not(String::new())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(text: &str) -> PodsFile {
        parse(Path::new("pods.yaml"), text).unwrap()
    }

    #[test]
    fn minimal_and_defaults() {
        let f = p(
            "pods:\n  - name: a\n    netns: /var/run/netns/a\n    ips: [198.18.0.1, '2001:2::1']\n",
        );
        assert!(f.errors.is_empty(), "{:?}", f.errors);
        assert_eq!(f.pods.len(), 1);
        assert_eq!(f.pods[0].namespace, "default");
        assert_eq!(f.pods[0].mesh, Mesh::Istio);
        assert_eq!(f.pods[0].ips.len(), 2);
    }

    #[test]
    fn empty_file_is_refused_not_no_pods() {
        for empty in ["", " \n\t\n"] {
            let e = parse(Path::new("p.yaml"), empty).unwrap_err();
            assert!(e.to_string().contains("write `pods: []`"), "{e}");
        }
        assert!(p("pods: []").pods.is_empty());
    }

    #[test]
    fn bad_entries_are_skipped_and_named() {
        let f = p(r#"
pods:
  - name: good
    netns: /var/run/netns/good
  - name: noip
    netns: /var/run/netns/x
    ips: [not-an-ip]
  - netns: /var/run/netns/y
  - name: rel
    netns: relative/path
  - name: badann
    netns: /var/run/netns/z
    annotations:
      traffic.sidecar.istio.io/excludeOutboundPorts: "80,x"
  - name: typo
    netns: /var/run/netns/t
    meshh: istio
  - name: badmesh
    netns: /var/run/netns/m
    mesh: consul
"#);
        assert_eq!(f.pods.len(), 1, "{:?}", f.errors);
        assert_eq!(f.pods[0].name, "good");
        let all = f.errors.join("\n");
        assert_eq!(f.errors.len(), 6, "{all}");
        assert!(
            all.contains("pod \"noip\": field `ips`: \"not-an-ip\""),
            "{all}"
        );
        assert!(all.contains("pod #3: missing field `name`"), "{all}");
        assert!(all.contains("pod \"rel\": field `netns`"), "{all}");
        assert!(all.contains("pod \"badann\": field `annotations`: annotation traffic.sidecar.istio.io/excludeOutboundPorts"), "{all}");
        assert!(all.contains("pod \"typo\": unknown field `meshh`"), "{all}");
        assert!(
            all.contains("pod \"badmesh\": unknown variant `consul`"),
            "{all}"
        );
        assert!(all.starts_with("pods file pods.yaml: "));
    }

    #[test]
    fn duplicates_are_refused() {
        let f = p(r#"
pods:
  - {name: a, netns: /n/a, ips: [198.18.0.1]}
  - {name: a, netns: /n/b}
  - {name: c, netns: /n/a}
  - {name: d, netns: /n/d, ips: [198.18.0.1]}
"#);
        assert_eq!(f.pods.len(), 1);
        assert_eq!(f.errors.len(), 3, "{:?}", f.errors);
    }

    #[test]
    fn not_yaml_is_an_error() {
        let e = parse(Path::new("f"), "pods: [").unwrap_err();
        assert!(e.to_string().starts_with("pods file f:"), "{e}");
        let e = parse(Path::new("f"), "pod: []").unwrap_err();
        assert!(e.to_string().contains("unknown field `pod`"), "{e}");
    }

    #[tokio::test]
    async fn read_refuses_what_is_not_a_sane_regular_file() {
        let dir = std::env::temp_dir().join(format!("weir-podsfile-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let big = dir.join("big.yaml");
        std::fs::File::create(&big)
            .unwrap()
            .set_len(MAX_FILE_BYTES + 1)
            .unwrap();
        let e = read(&big).await.unwrap_err();
        assert!(
            e.to_string().contains("more than the 67108864 bytes"),
            "{e}"
        );
        let fifo = dir.join("fifo.yaml");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRWXU).unwrap();
        // Would block forever if it were opened.
        let e = read(&fifo).await.unwrap_err();
        assert!(e.to_string().contains("not a regular file"), "{e}");
        let e = read(&dir).await.unwrap_err();
        assert!(e.to_string().contains("not a regular file"), "{e}");
        let ok = dir.join("ok.yaml");
        std::fs::write(&ok, "pods: []\n").unwrap();
        assert_eq!(read(&ok).await.unwrap(), "pods: []\n");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn addresses_that_are_no_pod_address_are_refused() {
        for (ip, why) in [
            ("127.0.0.1", "is a loopback address"),
            ("::1", "is a loopback address"),
            ("::ffff:127.0.0.1", "is a loopback address"),
            ("0.0.0.0", "is the unspecified address"),
            ("::", "is the unspecified address"),
            ("224.0.0.1", "is a multicast address"),
            ("ff02::1", "is a multicast address"),
            ("255.255.255.255", "is the broadcast address"),
        ] {
            let f = parse(
                Path::new("p.yaml"),
                &format!("pods:\n  - {{name: a, netns: /n/a, ips: ['{ip}']}}\n"),
            )
            .unwrap();
            assert!(f.pods.is_empty(), "{ip} accepted");
            assert_eq!(
                f.errors,
                vec![format!(
                    "pods file p.yaml: pod \"a\": field `ips`: \"{ip}\" {why}, not a pod's own address; list the addresses of the pod's interfaces"
                )]
            );
        }
    }

    /// The tests' pods-file writer (`weir_tests::podsfile`) writes what
    /// this parser reads: every field it can set arrives.
    #[test]
    fn the_test_harness_writer_is_read_back() {
        use weir_tests::podsfile::{PodEntry, pods_yaml};
        let mut e = PodEntry::at("a", Path::new("/n/a"), &["198.18.0.1", "2001:2::1"])
            .namespace("shop")
            .annotate("traffic.sidecar.istio.io/excludeOutboundPorts", "3306");
        e.mesh = Some("linkerd".into());
        e.uid = Some("u-1".into());
        e.service_account = Some("sa".into());
        let plain = PodEntry::at("b", Path::new("/n/b"), &[]);
        let f = p(&pods_yaml(&[e, plain]));
        assert!(f.errors.is_empty(), "{:?}", f.errors);
        let a = &f.pods[0];
        assert_eq!((a.namespace.as_str(), a.name.as_str()), ("shop", "a"));
        assert_eq!(a.netns, Path::new("/n/a"));
        assert_eq!(a.ips.len(), 2);
        assert_eq!(a.mesh, Mesh::Linkerd);
        assert_eq!(
            a.annotations["traffic.sidecar.istio.io/excludeOutboundPorts"],
            "3306"
        );
        assert_eq!((a.uid.as_str(), a.service_account.as_str()), ("u-1", "sa"));
        let b = &f.pods[1];
        assert_eq!((b.namespace.as_str(), b.mesh), ("default", Mesh::Istio));
        assert!(p(&pods_yaml(&[])).pods.is_empty());
    }
}
