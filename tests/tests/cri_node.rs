//! The real-runtime test (issue 13): a node made of Debian's containerd
//! 1.6 (its CRI plugin), runc and the reference CNI plugins (bridge,
//! host-local, loopback), with **weir's agent running from its own image**
//! (`cargo xtask image`) as the DaemonSet in deploy/kubernetes/base runs it:
//! host network, host PID, the manifest's capabilities, environment and
//! volumes (each hostPath mapped to a private stand-in: a bpffs the test
//! mounts, a test cgroup, the test's CNI directories).
//!
//! Pods are made through the CRI gRPC API as the kubelet makes them
//! (RunPodSandbox -> CNI ADD -> CreateContainer/StartContainer;
//! StopPodSandbox -> CNI DEL; RemovePodSandbox), their containers run from
//! small images the xtask builds (nothing can be pulled here), and the
//! Kubernetes API is the tests' fake, serving what the API server would at
//! each moment: a pod without `podIPs` while its sandbox is being made, the
//! kubelet's status update after.
//!
//! containerd runs on private directories and sockets, inside its own
//! network namespace (the node's network: the bridge, the upstream server
//! and the fake API live there), never on the machine's network.
//!
//! Run through `cargo xtask test` (which builds the images and sets
//! WEIR_IMAGE and WEIR_TEST_IMAGES), or by hand after `cargo xtask image
//! --test-images` with those two variables set.

mod k8s_support;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use k8s_cri::v1 as cri;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use k8s_support::pod_json;
use serde_json::{Value, json};
use tonic::transport::Channel;
use weir_tests::fake_api::FakeApi;
use weir_tests::node::{ClientResult, sidecar_log};
use weir_tests::{Bpffs, Cgroup, NetNs, Proc, TempDir, cgroup2_mount, spawn_in, testkit, weir_bin};

const NODE: &str = "node-a";
const PAUSE_IMAGE: &str = "weir-test.invalid/pause:1";
const TOOLS_IMAGE: &str = "weir-test.invalid/tools:1";
/// The bridge's addresses on the node: the upstream server listens there.
const GW4: &str = "198.18.40.1";
const GW6: &str = "fd00:77:1::1";
const GW4_JSON: &str = "198.18.41.1";

/// The images, from the xtask; `None` when the test may be skipped.
fn artifacts() -> Option<(PathBuf, PathBuf)> {
    let image = std::env::var_os("WEIR_IMAGE").map(PathBuf::from);
    let tests = std::env::var_os("WEIR_TEST_IMAGES").map(PathBuf::from);
    match (image, tests) {
        (Some(i), Some(t)) => Some((i, t)),
        _ if std::env::var_os(weir_tests::REQUIRE_KERNEL_TESTS_ENV).is_some()
            || std::env::var_os("CI").is_some() =>
        {
            panic!(
                "WEIR_IMAGE and WEIR_TEST_IMAGES are not set: run this test through \
                 `cargo xtask test`, or `cargo xtask image --test-images` and set them"
            )
        }
        _ => {
            eprintln!(
                "SKIPPED: WEIR_IMAGE/WEIR_TEST_IMAGES not set (cargo xtask image --test-images)"
            );
            None
        }
    }
}

/// The CNI configuration variants the test installs as the node's primary
/// network (weir-cni is chained into them by the agent).
fn bridge_plugin(bridge: &str, ranges: Value, ipam_dir: &Path) -> Value {
    json!({
        "type": "bridge",
        "bridge": bridge,
        "isGateway": true,
        "ipMasq": false,
        "ipam": {"type": "host-local", "ranges": ranges, "dataDir": ipam_dir.to_string_lossy()}
    })
}

/// containerd + its CRI client, in the node's network namespace.
struct Containerd {
    proc: Option<Proc>,
    rt: tokio::runtime::Runtime,
    rs: RuntimeServiceClient<Channel>,
    socket: PathBuf,
    dir: PathBuf,
}

impl Containerd {
    fn start(dir: &Path, ns: &NetNs) -> Containerd {
        let cni_bin = dir.join("cni/bin");
        let cni_conf = dir.join("cni/conf");
        let socket = dir.join("containerd.sock");
        let config = format!(
            r#"version = 2
root = "{root}"
state = "{state}"
disabled_plugins = ["io.containerd.internal.v1.opt", "io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper", "io.containerd.tracing.processor.v1.otlp", "io.containerd.internal.v1.tracing"]
[grpc]
  address = "{socket}"
[ttrpc]
  address = "{socket}.ttrpc"
[debug]
  level = "info"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{PAUSE_IMAGE}"
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  disable_apparmor = true
  # Not below containerd's own score: lowering it (the sandbox's -998)
  # needs CAP_SYS_RESOURCE, which test machines may not have.
  restrict_oom_score_adj = true
  enable_selinux = false
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
        Root = "{runc}"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{bin}"
    conf_dir = "{conf}"
    max_conf_num = 1
"#,
            root = dir.join("root").display(),
            state = dir.join("state").display(),
            socket = socket.display(),
            runc = dir.join("runc").display(),
            bin = cni_bin.display(),
            conf = cni_conf.display(),
        );
        let config_path = dir.join("containerd.toml");
        std::fs::write(&config_path, config).unwrap();
        let mut cmd = Command::new("containerd");
        cmd.arg("--config").arg(&config_path);
        let mut proc = spawn_in(Some(ns), None, cmd);
        let deadline = Instant::now() + Duration::from_secs(30);
        while !socket.exists() {
            assert!(
                Instant::now() < deadline && proc.is_running(),
                "containerd did not start:\n{}",
                proc.logs()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let path = socket.clone();
        let channel = rt
            .block_on(async move {
                tonic::transport::Endpoint::try_from("http://[::]:0")
                    .unwrap()
                    .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
                        let path = path.clone();
                        async move {
                            Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                                tokio::net::UnixStream::connect(path).await?,
                            ))
                        }
                    }))
                    .await
            })
            .expect("connecting to containerd's CRI socket");
        let mut c = Containerd {
            proc: Some(proc),
            rt,
            rs: RuntimeServiceClient::new(channel),
            socket,
            dir: dir.to_path_buf(),
        };
        // The CRI plugin answers once it has loaded.
        let version = c
            .call(|mut rs| async move { rs.version(cri::VersionRequest::default()).await })
            .expect("CRI Version");
        assert_eq!(version.runtime_api_version, "v1", "{version:?}");
        c
    }

    fn call<T, F, Fut>(&mut self, f: F) -> Result<T, tonic::Status>
    where
        F: FnOnce(RuntimeServiceClient<Channel>) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        let rs = self.rs.clone();
        self.rt.block_on(f(rs)).map(tonic::Response::into_inner)
    }

    /// `ctr -n k8s.io images import`, as an operator loads an image on a
    /// node without a registry.
    fn import(&self, archive: &Path) {
        let out = Command::new("ctr")
            .arg("--address")
            .arg(&self.socket)
            .args([
                "-n",
                "k8s.io",
                "images",
                "import",
                "--snapshotter",
                "overlayfs",
            ])
            .arg(archive)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "ctr images import {}: {}{}",
            archive.display(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn logs(&self) -> String {
        self.proc.as_ref().map(Proc::logs).unwrap_or_default()
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        // Every sandbox goes first (their shims would outlive containerd).
        if let Ok(list) = self.call(|mut rs| async move {
            rs.list_pod_sandbox(cri::ListPodSandboxRequest::default())
                .await
        }) {
            for sb in list.items {
                let id = sb.id.clone();
                let _ = self.call(|mut rs| async move {
                    rs.stop_pod_sandbox(cri::StopPodSandboxRequest { pod_sandbox_id: id })
                        .await
                });
                let id = sb.id.clone();
                let _ = self.call(|mut rs| async move {
                    rs.remove_pod_sandbox(cri::RemovePodSandboxRequest { pod_sandbox_id: id })
                        .await
                });
            }
        }
        if let Some(mut p) = self.proc.take() {
            p.signal(nix::sys::signal::Signal::SIGTERM);
            let _ = p.wait_timeout(Duration::from_secs(10));
        }
        // Whatever containerd left mounted under its directories.
        if let Ok(text) = std::fs::read_to_string("/proc/self/mountinfo") {
            let mut points: Vec<&str> = text
                .lines()
                .filter_map(|l| l.split(' ').nth(4))
                .filter(|p| Path::new(p).starts_with(&self.dir))
                .collect();
            points.sort_by_key(|p| std::cmp::Reverse(p.len()));
            for p in points {
                let _ = nix::mount::umount2(p, nix::mount::MntFlags::MNT_DETACH);
            }
        }
    }
}

/// A pod as the kubelet made it.
struct Pod {
    name: String,
    sandbox: String,
    ips: Vec<String>,
    containers: HashMap<String, String>,
    /// Host directory mounted at /log in its containers.
    log_dir: PathBuf,
}

impl Pod {
    fn ip(&self, v6: bool) -> Option<&str> {
        self.ips
            .iter()
            .find(|ip| ip.contains(':') == v6)
            .map(String::as_str)
    }
}

/// The node: network namespace, containerd, the fake API, the agent's
/// stand-ins for the host paths the DaemonSet mounts.
struct CriNode {
    // Dropped in order: containerd (and every pod) before the agent's
    // bpffs, cgroup and namespace.
    ctd: Containerd,
    api: FakeApi,
    _upstream: Vec<Proc>,
    agent_sandbox: String,
    agent: Option<String>,
    agent_attempt: u32,
    _v1: V1CgroupCleanup,
    cgroup: Cgroup,
    bpffs: Bpffs,
    _ns: NetNs,
    dir: TempDir,
    image_name: String,
    daemonset: Value,
}

impl CriNode {
    fn dir(&self, sub: &str) -> PathBuf {
        self.dir.path().join(sub)
    }

    fn cgroup_rel(&self) -> PathBuf {
        Path::new("/").join(self.cgroup.path().strip_prefix(cgroup2_mount()).unwrap())
    }

    fn log(&self, what: &str, since: Instant) {
        eprintln!("cri_node: {what} ({:.1}s)", since.elapsed().as_secs_f64());
    }

    /// The agent's container log so far.
    fn agent_logs(&self) -> String {
        let dir = self.dir("pods/weir");
        let mut out = String::new();
        for n in 0..=self.agent_attempt {
            if let Ok(t) = std::fs::read_to_string(dir.join(format!("weir-{n}.log"))) {
                out.push_str(&format!("--- agent attempt {n} ---\n{t}"));
            }
        }
        out
    }

    /// Enrolled pods, `namespace/name`, from `weir status` on the pins.
    fn enrolled(&self) -> Vec<String> {
        let out = Command::new(weir_bin())
            .args(["status", "-o", "json", "--bpffs"])
            .arg(self.bpffs.path())
            .output()
            .expect("weir status");
        let st: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
        let mut v: Vec<String> = st["pods"]
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|p| {
                        format!(
                            "{}/{}",
                            p["namespace"].as_str().unwrap_or(""),
                            p["name"].as_str().unwrap_or("")
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();
        v.sort();
        v
    }

    fn wait(&self, timeout: Duration, what: &str, mut f: impl FnMut(&CriNode) -> bool) {
        let deadline = Instant::now() + timeout;
        while !f(self) {
            if Instant::now() > deadline {
                panic!(
                    "timed out after {timeout:?} waiting for {what}\n--- agent ---\n{}",
                    self.agent_logs()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The DaemonSet's container spec.
    fn ds_container(&self) -> &Value {
        &self.daemonset["spec"]["template"]["spec"]["containers"][0]
    }

    /// Starts the agent's container from weir's image with the DaemonSet's
    /// settings (`extra_env` overrides, e.g. the fail-open overlay's).
    fn start_agent(&mut self, extra_env: &[(&str, &str)]) {
        let started = Instant::now();
        let c = self.ds_container().clone();
        let pod_spec = self.daemonset["spec"]["template"]["spec"].clone();
        // What the test changes, and why: the socket's host directory is a
        // private one, so the socket path the agent serves (and writes into
        // the CNI configuration for the plugin on the host) is that path.
        let run_dir = self.dir("run");
        let socket = run_dir.join("cni.sock");
        let mut envs: Vec<(String, String)> = Vec::new();
        for e in c["env"].as_array().unwrap() {
            let name = e["name"].as_str().unwrap().to_string();
            let value = if let Some(v) = e["value"].as_str() {
                v.to_string()
            } else if e["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName" {
                NODE.to_string()
            } else {
                panic!("daemonset env {name}: unknown source {e}");
            };
            envs.push((name, value));
        }
        assert!(
            envs.contains(&("WEIR_CNI_HOST_CONF_DIR".into(), "/etc/cni/net.d".into())),
            "the DaemonSet must tell the agent the host path of the CNI configuration: {envs:?}"
        );
        let mut set = |k: &str, v: &str| {
            envs.retain(|(n, _)| n != k);
            envs.push((k.into(), v.into()));
        };
        set("WEIR_CNI_SOCKET", &socket.to_string_lossy());
        // Likewise the configuration directory's host path, which names
        // the plugin's kubeconfig in its entry.
        set(
            "WEIR_CNI_HOST_CONF_DIR",
            &self.dir("cni/conf").to_string_lossy(),
        );
        set("KUBECONFIG", "/etc/weir-test/kubeconfig");
        set("RUST_LOG", "info");
        for (k, v) in extra_env {
            set(k, v);
        }
        // Volumes: each hostPath of the manifest, mapped to the test's own.
        let volumes: HashMap<String, String> = pod_spec["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| {
                (
                    v["name"].as_str().unwrap().to_string(),
                    v["hostPath"]["path"].as_str().unwrap().to_string(),
                )
            })
            .collect();
        let mut mounts = Vec::new();
        for m in c["volumeMounts"].as_array().unwrap() {
            let host = &volumes[m["name"].as_str().unwrap()];
            let mut container_path = m["mountPath"].as_str().unwrap().to_string();
            let host_path = match host.as_str() {
                "/sys/fs/bpf" => self.bpffs.path().to_path_buf(),
                "/sys/fs/cgroup" => self.cgroup.path().to_path_buf(),
                // The real directory (the runtime creates the pods'
                // namespaces there); its resolved path, which is the
                // shared mount `ip netns` makes (/var/run is a symlink,
                // and / is not shared on every test machine).
                "/var/run/netns" => std::fs::canonicalize("/var/run/netns").unwrap(),
                "/opt/cni/bin" => self.dir("cni/bin"),
                "/etc/cni/net.d" => self.dir("cni/conf"),
                "/var/run/weir" => {
                    container_path = run_dir.to_string_lossy().into_owned();
                    run_dir.clone()
                }
                other => panic!("daemonset hostPath {other}: no stand-in in cri_node.rs"),
            };
            let propagation = match m["mountPropagation"].as_str() {
                None | Some("None") => cri::MountPropagation::PropagationPrivate,
                Some("HostToContainer") => cri::MountPropagation::PropagationHostToContainer,
                Some("Bidirectional") => cri::MountPropagation::PropagationBidirectional,
                Some(o) => panic!("mountPropagation {o}"),
            };
            mounts.push(cri::Mount {
                container_path,
                host_path: host_path.to_string_lossy().into_owned(),
                readonly: m["readOnly"].as_bool().unwrap_or(false),
                propagation: propagation as i32,
                ..Default::default()
            });
        }
        mounts.push(cri::Mount {
            container_path: "/etc/weir-test/kubeconfig".into(),
            host_path: self.dir("kubeconfig").to_string_lossy().into_owned(),
            readonly: true,
            ..Default::default()
        });
        let sc = &c["securityContext"];
        let caps = |k: &str| -> Vec<String> {
            sc["capabilities"][k]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_str().unwrap().to_string())
                .collect()
        };
        let unconfined = || cri::SecurityProfile {
            profile_type: cri::security_profile::ProfileType::Unconfined as i32,
            ..Default::default()
        };
        assert_eq!(sc["seccompProfile"]["type"], "Unconfined");
        assert_eq!(sc["appArmorProfile"]["type"], "Unconfined");
        let config = cri::ContainerConfig {
            metadata: Some(cri::ContainerMetadata {
                name: c["name"].as_str().unwrap().into(),
                attempt: self.agent_attempt,
            }),
            image: Some(cri::ImageSpec {
                image: self.image_name.clone(),
                ..Default::default()
            }),
            args: c["args"]
                .as_array()
                .unwrap()
                .iter()
                .map(|a| a.as_str().unwrap().into())
                .collect(),
            envs: envs
                .into_iter()
                .map(|(key, value)| cri::KeyValue { key, value })
                .collect(),
            mounts,
            log_path: format!("weir-{}.log", self.agent_attempt),
            linux: Some(cri::LinuxContainerConfig {
                security_context: Some(cri::LinuxContainerSecurityContext {
                    capabilities: Some(cri::Capability {
                        add_capabilities: caps("add"),
                        drop_capabilities: caps("drop"),
                        ..Default::default()
                    }),
                    privileged: sc["privileged"].as_bool().unwrap_or(false),
                    namespace_options: Some(node_namespaces()),
                    run_as_user: sc["runAsUser"]
                        .as_i64()
                        .map(|value| cri::Int64Value { value }),
                    readonly_rootfs: sc["readOnlyRootFilesystem"].as_bool().unwrap_or(false),
                    seccomp: Some(unconfined()),
                    apparmor: Some(unconfined()),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        };
        let sandbox_config = self.agent_sandbox_config();
        let sandbox = self.agent_sandbox.clone();
        let id = self
            .ctd
            .call(|mut rs| async move {
                rs.create_container(cri::CreateContainerRequest {
                    pod_sandbox_id: sandbox,
                    config: Some(config),
                    sandbox_config: Some(sandbox_config),
                })
                .await
            })
            .unwrap_or_else(|e| panic!("CreateContainer weir: {e}"))
            .container_id;
        let cid = id.clone();
        self.ctd
            .call(|mut rs| async move {
                rs.start_container(cri::StartContainerRequest { container_id: cid })
                    .await
            })
            .unwrap_or_else(|e| panic!("StartContainer weir: {e}\n{}", self.agent_logs()));
        self.agent = Some(id);
        let log = self
            .dir("pods/weir")
            .join(format!("weir-{}.log", self.agent_attempt));
        self.wait(
            Duration::from_secs(30),
            "the agent watching the fake API",
            |_| {
                std::fs::read_to_string(&log)
                    .unwrap_or_default()
                    .contains("watching the pods of node node-a")
            },
        );
        self.wait(Duration::from_secs(10), "the CNI socket", |_| {
            socket.exists()
        });
        self.log("agent container started from the image", started);
    }

    /// Stops and removes the agent's container (its sandbox stays, as the
    /// kubelet keeps a DaemonSet pod's sandbox across container restarts).
    fn stop_agent(&mut self) {
        let Some(id) = self.agent.take() else { return };
        let cid = id.clone();
        self.ctd
            .call(|mut rs| async move {
                rs.stop_container(cri::StopContainerRequest {
                    container_id: cid,
                    timeout: 10,
                })
                .await
            })
            .unwrap_or_else(|e| panic!("StopContainer weir: {e}"));
        self.ctd
            .call(|mut rs| async move {
                rs.remove_container(cri::RemoveContainerRequest { container_id: id })
                    .await
            })
            .unwrap_or_else(|e| panic!("RemoveContainer weir: {e}"));
        self.agent_attempt += 1;
    }

    fn agent_sandbox_config(&self) -> cri::PodSandboxConfig {
        cri::PodSandboxConfig {
            metadata: Some(cri::PodSandboxMetadata {
                name: "weir-abcde".into(),
                uid: "0e1d2c3b-0000-4000-8000-00000000a9e7".into(),
                namespace: "weir-system".into(),
                attempt: 0,
            }),
            // The node's own UTS namespace: containerd 1.6 (runc) refuses
            // a hostname there.
            hostname: String::new(),
            log_directory: self.dir("pods/weir").to_string_lossy().into_owned(),
            linux: Some(cri::LinuxPodSandboxConfig {
                cgroup_parent: self
                    .cgroup_rel()
                    .join("kubepods/burstable/pod0e1d2c3b-0000-4000-8000-00000000a9e7")
                    .to_string_lossy()
                    .into_owned(),
                security_context: Some(cri::LinuxSandboxSecurityContext {
                    namespace_options: Some(node_namespaces()),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn pod_sandbox_config(&self, name: &str, namespace: &str, uid: &str) -> cri::PodSandboxConfig {
        cri::PodSandboxConfig {
            metadata: Some(cri::PodSandboxMetadata {
                name: name.into(),
                uid: uid.into(),
                namespace: namespace.into(),
                attempt: 0,
            }),
            hostname: name.into(),
            log_directory: self
                .dir(&format!("pods/{name}"))
                .to_string_lossy()
                .into_owned(),
            linux: Some(cri::LinuxPodSandboxConfig {
                cgroup_parent: self
                    .cgroup_rel()
                    .join(format!("kubepods/burstable/pod{uid}"))
                    .to_string_lossy()
                    .into_owned(),
                security_context: Some(cri::LinuxSandboxSecurityContext {
                    namespace_options: Some(cri::NamespaceOption {
                        network: cri::NamespaceMode::Pod as i32,
                        pid: cri::NamespaceMode::Container as i32,
                        ipc: cri::NamespaceMode::Pod as i32,
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    /// The pod object the API serves: meshed (Istio's injection status
    /// annotation, an `istio-proxy` container) or not, with `ips`.
    fn pod_object(
        &self,
        name: &str,
        namespace: &str,
        uid: &str,
        meshed: bool,
        ips: &[&str],
    ) -> Value {
        let ann: Vec<(&str, &str)> = if meshed {
            vec![(
                "sidecar.istio.io/status",
                r#"{"containers":["istio-proxy"]}"#,
            )]
        } else {
            Vec::new()
        };
        let containers: &[&str] = if meshed {
            &["app", "istio-proxy"]
        } else {
            &["app"]
        };
        let mut pod = pod_json(name, uid, ips, containers, &ann);
        pod["metadata"]["namespace"] = namespace.into();
        if meshed {
            // A dual-stack mesh: the injector sets this on the proxy.
            pod["spec"]["containers"][1]["env"] =
                json!([{"name": "ISTIO_DUAL_STACK", "value": "true"}]);
        }
        pod["spec"]["nodeName"] = NODE.into();
        pod
    }

    /// Creates a pod as the kubelet does: the API has it without IPs;
    /// RunPodSandbox (CNI ADD); the status update with its IPs; then its
    /// containers (the sidecar first when meshed, as Istio orders them),
    /// each started and, for the sidecar, ready. Returns the sandbox
    /// error when RunPodSandbox fails (the kubelet would retry).
    fn run_pod(&mut self, name: &str, namespace: &str, meshed: bool) -> Result<Pod, tonic::Status> {
        let started = Instant::now();
        // The same pod (a retry) has the same UID.
        let hash = name.bytes().fold(0xcbf2_9ce4u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
        });
        let uid = format!("6f1e2d3c-0000-4000-8000-{:012x}", hash & 0xffff_ffff_ffff);
        self.api
            .apply(self.pod_object(name, namespace, &uid, meshed, &[]));
        let config = self.pod_sandbox_config(name, namespace, &uid);
        let cfg = config.clone();
        let sandbox = self
            .ctd
            .call(|mut rs| async move {
                rs.run_pod_sandbox(cri::RunPodSandboxRequest {
                    config: Some(cfg),
                    runtime_handler: String::new(),
                })
                .await
            })?
            .pod_sandbox_id;
        let sb = sandbox.clone();
        let status = self
            .ctd
            .call(|mut rs| async move {
                rs.pod_sandbox_status(cri::PodSandboxStatusRequest {
                    pod_sandbox_id: sb,
                    verbose: false,
                })
                .await
            })
            .expect("PodSandboxStatus")
            .status
            .unwrap();
        let net = status.network.unwrap_or_default();
        let mut ips = vec![net.ip.clone()];
        ips.extend(net.additional_ips.iter().map(|i| i.ip.clone()));
        ips.retain(|i| !i.is_empty());
        let ip_refs: Vec<&str> = ips.iter().map(String::as_str).collect();
        self.api
            .apply(self.pod_object(name, namespace, &uid, meshed, &ip_refs));
        let log_dir = self.dir(&format!("pods/{name}/files"));
        std::fs::create_dir_all(&log_dir).unwrap();
        // The sidecar writes its ready file as UID 1337.
        std::fs::set_permissions(
            &log_dir,
            std::os::unix::fs::PermissionsExt::from_mode(0o1777),
        )
        .unwrap();
        let mut pod = Pod {
            name: name.into(),
            sandbox,
            ips,
            containers: HashMap::new(),
            log_dir,
        };
        if meshed {
            self.container(
                &mut pod,
                &config,
                "istio-proxy",
                &[
                    "--uid",
                    "1337",
                    "sidecar",
                    "--name",
                    name,
                    "--log",
                    "/log/sidecar.log",
                    "--ready-file",
                    "/log/ready",
                ],
            );
            let ready = pod.log_dir.join("ready");
            let deadline = Instant::now() + Duration::from_secs(10);
            while !ready.exists() {
                assert!(
                    Instant::now() < deadline,
                    "{name}: the sidecar did not listen; its log:\n{}",
                    std::fs::read_to_string(self.dir(&format!("pods/{name}/istio-proxy.log")))
                        .unwrap_or_default()
                );
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        self.container(&mut pod, &config, "app", &["pause"]);
        self.log(
            &format!("pod {namespace}/{name} running, {:?}", pod.ips),
            started,
        );
        Ok(pod)
    }

    fn container(
        &mut self,
        pod: &mut Pod,
        sandbox_config: &cri::PodSandboxConfig,
        name: &str,
        args: &[&str],
    ) {
        let config = cri::ContainerConfig {
            metadata: Some(cri::ContainerMetadata {
                name: name.into(),
                attempt: 0,
            }),
            image: Some(cri::ImageSpec {
                image: TOOLS_IMAGE.into(),
                ..Default::default()
            }),
            args: args.iter().map(|a| a.to_string()).collect(),
            mounts: vec![cri::Mount {
                container_path: "/log".into(),
                host_path: pod.log_dir.to_string_lossy().into_owned(),
                ..Default::default()
            }],
            log_path: format!("{name}.log"),
            ..Default::default()
        };
        let (sb, sc) = (pod.sandbox.clone(), sandbox_config.clone());
        let id = self
            .ctd
            .call(|mut rs| async move {
                rs.create_container(cri::CreateContainerRequest {
                    pod_sandbox_id: sb,
                    config: Some(config),
                    sandbox_config: Some(sc),
                })
                .await
            })
            .unwrap_or_else(|e| panic!("CreateContainer {}/{name}: {e}", pod.name))
            .container_id;
        let cid = id.clone();
        self.ctd
            .call(|mut rs| async move {
                rs.start_container(cri::StartContainerRequest { container_id: cid })
                    .await
            })
            .unwrap_or_else(|e| panic!("StartContainer {}/{name}: {e}", pod.name));
        pod.containers.insert(name.into(), id);
    }

    /// `kubectl exec POD -c app -- weir-testkit --uid 1000 client …`: one
    /// connection from the application to `dst`.
    fn client(&mut self, pod: &Pod, dst: &str) -> ClientResult {
        let cid = pod.containers["app"].clone();
        let cmd: Vec<String> = [
            "/usr/local/bin/weir-testkit",
            "--uid",
            "1000",
            "client",
            "--connect",
            dst,
            "--timeout-ms",
            "3000",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let out = self
            .ctd
            .call(|mut rs| async move {
                rs.exec_sync(cri::ExecSyncRequest {
                    container_id: cid,
                    cmd,
                    timeout: 20,
                })
                .await
            })
            .unwrap_or_else(|e| panic!("ExecSync in {}: {e}", pod.name));
        let stdout = String::from_utf8_lossy(&out.stdout);
        let line = stdout.lines().last().unwrap_or_default();
        ClientResult {
            json: serde_json::from_str(line).unwrap_or_else(|e| {
                panic!(
                    "client in {} printed {stdout:?} ({e}); stderr {}",
                    pod.name,
                    String::from_utf8_lossy(&out.stderr)
                )
            }),
        }
    }

    /// The app's connection to `dst` went through the pod's sidecar
    /// (`n` records in its log so far, the last to `dst`).
    fn assert_captured(&mut self, pod: &Pod, dst: &str, n: usize) {
        let r = self.client(pod, dst);
        let log = sidecar_log(&pod.log_dir.join("sidecar.log"));
        assert!(
            r.ok(),
            "{}: {:?}; sidecar {log:?}\n{}",
            pod.name,
            r.json,
            self.agent_logs()
        );
        assert_eq!(
            log.len(),
            n,
            "{}: connection {n} to {dst} through the sidecar: {log:?}\n{}",
            pod.name,
            self.agent_logs()
        );
        assert_eq!(log[n - 1]["orig_dst"], dst, "{log:?}");
    }

    /// StopPodSandbox (CNI DEL) and RemovePodSandbox.
    fn remove_pod(&mut self, pod: &Pod) {
        let id = pod.sandbox.clone();
        self.ctd
            .call(|mut rs| async move {
                rs.stop_pod_sandbox(cri::StopPodSandboxRequest { pod_sandbox_id: id })
                    .await
            })
            .unwrap_or_else(|e| panic!("StopPodSandbox {}: {e}", pod.name));
        let id = pod.sandbox.clone();
        self.ctd
            .call(|mut rs| async move {
                rs.remove_pod_sandbox(cri::RemovePodSandboxRequest { pod_sandbox_id: id })
                    .await
            })
            .unwrap_or_else(|e| panic!("RemovePodSandbox {}: {e}", pod.name));
    }

    /// Replaces the node's primary CNI configuration with `file` = `conf`.
    fn set_cni_conf(&self, file: &str, conf: &Value) {
        let dir = self.dir("cni/conf");
        for e in std::fs::read_dir(&dir).unwrap().flatten() {
            if is_cni_conf(&e.path()) {
                std::fs::remove_file(e.path()).unwrap();
            }
        }
        let tmp = dir.join(format!(".{file}.tmp"));
        std::fs::write(&tmp, serde_json::to_vec_pretty(conf).unwrap()).unwrap();
        std::fs::rename(&tmp, dir.join(file)).unwrap();
    }

    /// The configuration files (name -> JSON).
    fn cni_confs(&self) -> Vec<(String, Value)> {
        let mut v: Vec<(String, Value)> = std::fs::read_dir(self.dir("cni/conf"))
            .unwrap()
            .flatten()
            .filter(|e| is_cni_conf(&e.path()))
            .map(|e| {
                (
                    e.file_name().to_string_lossy().into_owned(),
                    serde_json::from_slice(&std::fs::read(e.path()).unwrap())
                        .unwrap_or(Value::Null),
                )
            })
            .collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }

    /// The configuration the runtime reads has weir chained last.
    fn chained(&self) -> bool {
        self.cni_confs().first().is_some_and(|(name, c)| {
            name.ends_with(".conflist")
                && c["plugins"]
                    .as_array()
                    .and_then(|p| p.last())
                    .is_some_and(|p| p["type"] == "weir-cni")
        })
    }
}

/// A file the runtime reads as network configuration.
fn is_cni_conf(path: &Path) -> bool {
    !path
        .file_name()
        .is_some_and(|n| n.to_string_lossy().starts_with('.'))
        && matches!(
            path.extension().and_then(|e| e.to_str()),
            Some("conf" | "conflist" | "json")
        )
}

fn node_namespaces() -> cri::NamespaceOption {
    cri::NamespaceOption {
        network: cri::NamespaceMode::Node as i32,
        pid: cri::NamespaceMode::Node as i32,
        ipc: cri::NamespaceMode::Pod as i32,
        ..Default::default()
    }
}

impl Drop for CriNode {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("--- agent ---\n{}", self.agent_logs());
            eprintln!("--- containerd ---\n{}", self.ctd.logs());
        }
    }
}

/// runc (cgroupfs driver, cgroup v1 or hybrid hosts) also makes the pods'
/// cgroups in each v1 hierarchy: removed after the pods, deepest first.
struct V1CgroupCleanup(PathBuf);

impl Drop for V1CgroupCleanup {
    fn drop(&mut self) {
        let Ok(entries) = std::fs::read_dir("/sys/fs/cgroup") else {
            return;
        };
        for e in entries.flatten() {
            let root = e.path().join(&self.0);
            if root.starts_with(cgroup2_mount()) || !root.is_dir() {
                continue;
            }
            let mut dirs = Vec::new();
            fn walk(d: &Path, out: &mut Vec<PathBuf>) {
                if let Ok(es) = std::fs::read_dir(d) {
                    for e in es.flatten() {
                        if e.file_type().is_ok_and(|t| t.is_dir()) {
                            walk(&e.path(), out);
                        }
                    }
                }
                out.push(d.to_path_buf());
            }
            walk(&root, &mut dirs);
            for d in dirs {
                let _ = std::fs::remove_dir(d);
            }
        }
    }
}

fn make_shared(path: &Path) {
    nix::mount::mount(
        None::<&str>,
        path,
        None::<&str>,
        nix::mount::MsFlags::MS_SHARED,
        None::<&str>,
    )
    .unwrap_or_else(|e| panic!("mount --make-shared {}: {e}", path.display()));
}

/// The image's name, from its archive's index (what `ctr images import`
/// names it).
fn archive_image_name(archive: &Path) -> String {
    let out = Command::new("tar")
        .arg("-xOf")
        .arg(archive)
        .arg("index.json")
        .output()
        .unwrap();
    let index: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{}: index.json: {e}", archive.display()));
    index["manifests"][0]["annotations"]["io.containerd.image.name"]
        .as_str()
        .unwrap()
        .to_string()
}

/// The node, up to a running agent: namespace, directories, the CNI
/// plugins, containerd with the three images imported, the fake API, the
/// upstream server on the bridge's addresses, the agent's sandbox and
/// container.
fn node(image: &Path, test_images: &Path, started: Instant) -> CriNode {
    let dir = TempDir::new("cri");
    let ns = NetNs::new("crinode");
    // No DAD on the node's bridge: its gateway addresses answer at once.
    for (k, v) in [
        ("net.ipv6.conf.all.accept_dad", "0"),
        ("net.ipv6.conf.default.accept_dad", "0"),
    ] {
        ns.exec_ok(&["sysctl", "-qw", &format!("{k}={v}")]);
    }
    for sub in [
        "cni/bin",
        "cni/conf",
        "cni/ipam",
        "run",
        "pods/weir",
        "root",
        "state",
        "runc",
    ] {
        std::fs::create_dir_all(dir.join(sub)).unwrap();
    }
    for plugin in ["bridge", "host-local", "loopback"] {
        let src = Path::new("/usr/lib/cni").join(plugin);
        assert!(
            src.is_file(),
            "{} missing: install Debian's containernetworking-plugins (cargo xtask setup)",
            src.display()
        );
        std::os::unix::fs::symlink(&src, dir.join("cni/bin").join(plugin)).unwrap();
    }
    let bpffs = Bpffs::new();
    // The DaemonSet mounts the host's bpffs HostToContainer, which the
    // runtime accepts only from a shared (or slave) mount.
    make_shared(bpffs.path());
    let cgroup = Cgroup::new("cri");
    let v1 = V1CgroupCleanup(
        cgroup
            .path()
            .strip_prefix(cgroup2_mount())
            .unwrap()
            .to_path_buf(),
    );

    let ctd = Containerd::start(dir.path(), &ns);
    for archive in [
        image.to_path_buf(),
        test_images.join("pause.oci.tar"),
        test_images.join("tools.oci.tar"),
    ] {
        ctd.import(&archive);
    }
    eprintln!(
        "cri_node: containerd up, images imported ({:.1}s)",
        started.elapsed().as_secs_f64()
    );
    let image_name = archive_image_name(image);

    let daemonset: Value = serde_yaml_ng::from_str(
        &std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/kubernetes/base/daemonset.yaml"),
        )
        .unwrap(),
    )
    .unwrap();
    let container = &daemonset["spec"]["template"]["spec"]["containers"][0];
    // The manifest runs the image `cargo xtask image` makes.
    assert_eq!(
        container["image"],
        image_name.as_str(),
        "deploy/kubernetes/base/daemonset.yaml image"
    );
    let pod_spec = &daemonset["spec"]["template"]["spec"];
    assert_eq!(pod_spec["hostNetwork"], true);
    assert_eq!(pod_spec["hostPID"], true);

    // The API server lives on the node's network (the agent is host
    // network).
    let api = ns.run_in(FakeApi::start);
    api.kubeconfig(&dir.join("kubeconfig"));

    // The upstream: a server on every address of the node's network.
    let ready = dir.join("upstream.ready");
    let mut cmd = Command::new(testkit());
    cmd.args([
        "echo",
        "--port",
        "8080",
        "--name",
        "upstream",
        "--ready-file",
    ])
    .arg(&ready);
    let mut up = spawn_in(Some(&ns), None, cmd);
    up.wait_for_file(&ready, Duration::from_secs(10));

    let mut n = CriNode {
        ctd,
        api,
        _upstream: vec![up],
        agent_sandbox: String::new(),
        agent: None,
        agent_attempt: 0,
        _v1: v1,
        cgroup,
        bpffs,
        _ns: ns,
        dir,
        image_name,
        daemonset,
    };
    // The primary network: dual stack.
    let conf = json!({
        "cniVersion": "0.4.0",
        "name": "weir-test-dual",
        "plugins": [bridge_plugin("cni0", json!([[{"subnet": "198.18.40.0/24", "gateway": GW4}], [{"subnet": "fd00:77:1::/64", "gateway": GW6}]]), &n.dir("cni/ipam"))]
    });
    n.set_cni_conf("10-weir-test.conflist", &conf);

    let sandbox_config = n.agent_sandbox_config();
    n.agent_sandbox = n
        .ctd
        .call(|mut rs| async move {
            rs.run_pod_sandbox(cri::RunPodSandboxRequest {
                config: Some(sandbox_config),
                runtime_handler: String::new(),
            })
            .await
        })
        .unwrap_or_else(|e| panic!("RunPodSandbox weir (host network): {e}"))
        .pod_sandbox_id;
    n.start_agent(&[]);
    n
}

#[test]
fn cri_node_runs_the_agent_from_its_image() {
    if !weir_tests::require_root() {
        return;
    }
    let Some((image, test_images)) = artifacts() else {
        return;
    };
    let started = Instant::now();
    let mut n = node(&image, &test_images, started);
    let up4 = format!("{GW4}:8080");
    let up6 = format!("[{GW6}]:8080");

    // The agent chained weir-cni into the node's configuration and copied
    // the plugin from its image into the CNI bin directory.
    n.wait(
        Duration::from_secs(10),
        "weir-cni chained",
        CriNode::chained,
    );
    assert!(n.dir("cni/bin/weir-cni").is_file());

    // A meshed dual-stack pod: its first connection, and one over IPv6,
    // go through its sidecar.
    let web = n.run_pod("web", "default", true).expect("meshed pod web");
    assert!(
        web.ip(false).is_some() && web.ip(true).is_some(),
        "{:?}",
        web.ips
    );
    assert_eq!(n.enrolled(), ["default/web"]);
    n.assert_captured(&web, &up4, 1);
    n.assert_captured(&web, &up6, 2);
    n.log(
        "dual-stack pod captured (IPv4 first connection, IPv6)",
        started,
    );

    // A pod that is not meshed starts and is left alone.
    let plain = n
        .run_pod("plain", "default", false)
        .expect("non-meshed pod");
    let r = n.client(&plain, &up4);
    assert!(r.ok(), "{:?}", r.json);
    assert_eq!(n.enrolled(), ["default/web"]);

    // CNI DEL: the pod's enrollment and its address are released.
    let web_ip = web.ip(false).unwrap().to_string();
    n.remove_pod(&web);
    n.wait(
        Duration::from_secs(15),
        "web un-enrolled after StopPodSandbox",
        |n| n.enrolled().is_empty(),
    );
    assert!(
        !n.dir("cni/ipam/weir-test-dual").join(&web_ip).exists(),
        "host-local still holds {web_ip}"
    );
    n.log("CNI DEL cleaned up", started);

    // The agent is down: a meshed pod waits (its sandbox fails, the kubelet
    // retries); a pod of an excluded namespace starts.
    n.stop_agent();
    let err = n
        .run_pod("late", "default", true)
        .err()
        .expect("a meshed pod must not start without the agent");
    assert!(err.message().contains("weir"), "{err}");
    n.log(
        &format!("agent down: meshed sandbox refused: {}", err.message()),
        started,
    );
    let system = n.run_pod("dns", "kube-system", false);
    let system_ok = system
        .as_ref()
        .map(|_| ())
        .map_err(|e| e.message().to_string());
    // A pod the API shows is not meshed: the plugin asks the API itself.
    let plain2 = n.run_pod("plain2", "default", false);
    let plain2_ok = plain2
        .as_ref()
        .map(|_| ())
        .map_err(|e| e.message().to_string());

    // The agent is back: the kubelet's retry enrolls the pod.
    n.start_agent(&[]);
    let late = n.run_pod("late", "default", true).expect("retried sandbox");
    assert!(n.enrolled().contains(&"default/late".to_string()));
    n.assert_captured(&late, &up4, 1);
    n.log("agent back: retried sandbox enrolled and captured", started);

    // A restart under a running pod keeps capture, during and after.
    n.stop_agent();
    n.assert_captured(&late, &up4, 2);
    n.start_agent(&[]);
    n.assert_captured(&late, &up4, 3);
    n.log("capture kept across an agent restart", started);

    // An IPv6-only network, as a single-plugin `.conf`: the agent chains it
    // (as a .conflist), the pod's IPv6 connection is captured although the
    // API had no podIPs when CNI ADD enrolled it.
    n.set_cni_conf(
        "10-weir-test.conf",
        &json!(
            bridge_plugin(
                "cni0",
                json!([[{"subnet": "fd00:77:1::/64", "gateway": GW6}]]),
                &n.dir("cni/ipam")
            )
            .as_object()
            .unwrap()
            .clone()
            .into_iter()
            .chain([
                ("cniVersion".to_string(), json!("0.4.0")),
                ("name".to_string(), json!("weir-test-v6"))
            ])
            .collect::<serde_json::Map<_, _>>()
        ),
    );
    n.wait(
        Duration::from_secs(15),
        "the .conf chained as a .conflist",
        CriNode::chained,
    );
    let v6 = n.run_pod("v6", "default", true).expect("IPv6-only pod");
    assert!(
        v6.ip(false).is_none() && v6.ip(true).is_some(),
        "{:?}",
        v6.ips
    );
    let v6_captured = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        n.assert_captured(&v6, &up6, 1)
    }));

    // A single-plugin `.json`, IPv4 only, on another bridge.
    let mut single = bridge_plugin(
        "cni1",
        json!([[{"subnet": "198.18.41.0/24", "gateway": GW4_JSON}]]),
        &n.dir("cni/ipam"),
    );
    single["cniVersion"] = json!("0.4.0");
    single["name"] = json!("weir-test-json");
    n.set_cni_conf("10-weir-test.json", &single);
    n.wait(
        Duration::from_secs(15),
        "the .json chained as a .conflist",
        CriNode::chained,
    );
    let j = n
        .run_pod("j", "default", true)
        .expect("pod on the .json network");
    n.assert_captured(&j, &format!("{GW4_JSON}:8080"), 1);
    n.log(".conf and .json configurations chained", started);

    // Fail-open (the overlay's setting): the agent down, a meshed pod
    // starts anyway; back, the agent enrolls it from the API and its
    // processes.
    n.stop_agent();
    n.start_agent(&[("WEIR_CNI_MODE", "fail-open")]);
    n.wait(
        Duration::from_secs(15),
        "failOpen in the chained entry",
        |n| {
            n.cni_confs().first().is_some_and(|(_, c)| {
                c["plugins"]
                    .as_array()
                    .and_then(|p| p.last())
                    .is_some_and(|p| p["failOpen"] == true)
            })
        },
    );
    n.stop_agent();
    let open = n
        .run_pod("open", "default", true)
        .expect("fail-open: a meshed pod starts");
    n.start_agent(&[("WEIR_CNI_MODE", "fail-open")]);
    n.wait(
        Duration::from_secs(20),
        "the fail-open pod enrolled by the watcher",
        |n| n.enrolled().contains(&"default/open".to_string()),
    );
    n.assert_captured(&open, &format!("{GW4_JSON}:8080"), 1);
    n.log(
        "fail-open: pod started without the agent, enrolled after",
        started,
    );

    // Unchained cleanly: the agent gone, `weir cni uninstall` from the
    // image (as an operator's one-off pod) leaves a configuration the
    // runtime still reads, without weir: a meshed pod starts.
    n.stop_agent();
    let out = Command::new("ctr")
        .arg("--address")
        .arg(&n.ctd.socket)
        .args(["-n", "k8s.io", "run", "--rm", "--net-host", "--cgroup"])
        .arg(n.cgroup_rel().join("uninstall"))
        .arg("--runc-root")
        .arg(n.dir("runc"))
        .arg("--mount")
        .arg(format!(
            "type=bind,src={},dst=/host/etc/cni/net.d,options=rbind:rw",
            n.dir("cni/conf").display()
        ))
        .arg("--mount")
        .arg(format!(
            "type=bind,src={},dst=/host/opt/cni/bin,options=rbind:rw",
            n.dir("cni/bin").display()
        ))
        .arg(&n.image_name)
        .arg("weir-cni-uninstall")
        .args([
            "/usr/local/bin/weir",
            "cni",
            "uninstall",
            "--cni-conf-dir",
            "/host/etc/cni/net.d",
            "--cni-bin-dir",
            "/host/opt/cni/bin",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "weir cni uninstall: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // The original file comes back as it was, and weir's files go.
    let confs = n.cni_confs();
    assert_eq!(
        confs,
        [("10-weir-test.json".to_string(), single.clone())],
        "the configuration after `weir cni uninstall`"
    );
    assert!(!n.dir("cni/conf/weir-kubeconfig").exists());
    assert!(!n.dir("cni/bin/weir-cni").exists());
    let after = n
        .run_pod("after", "default", true)
        .expect("a pod after uninstall");
    assert!(after.ip(false).is_some());
    n.log("unchained: pods start without weir", started);

    // Checks that depend on the `cni` branch's fixes, reported last so
    // every other check ran.
    if let Err(p) = v6_captured {
        std::panic::resume_unwind(p);
    }
    assert!(
        system_ok.is_ok(),
        "a kube-system pod must start while the agent is down: {system_ok:?}"
    );
    assert!(
        plain2_ok.is_ok(),
        "a pod that is not meshed must start while the agent is down: {plain2_ok:?}"
    );
    eprintln!(
        "cri_node: all checks passed in {:.1}s",
        started.elapsed().as_secs_f64()
    );
}
