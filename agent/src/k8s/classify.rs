//! Is a pod meshed, by which mesh, and with which addresses and policy?
//!
//! Pure functions over the Kubernetes `Pod` object, shared by the watcher
//! and the CNI server so both decide the same way. The rules follow what
//! each mesh's own CNI plugin checks before it writes iptables rules:
//!
//! | mesh | meshed when | not meshed when |
//! |---|---|---|
//! | Istio | an `istio-proxy` container (regular or native sidecar) or the `sidecar.istio.io/status` annotation | `istio-init` is present (Istio's own iptables capture the pod), `sidecar.istio.io/inject` is false (label first, then annotation), the proxy is not a sidecar (`proxy router`: a gateway), `DISABLE_ENVOY=true`, `sidecar.istio.io/interceptionMode: NONE` |
//! | Linkerd | a `linkerd-proxy` container | `linkerd-init` is present, `linkerd.io/inject: disabled` |
//! | Kuma | a `kuma-sidecar` container | `kuma-init` is present, `kuma.io/sidecar-injection: disabled` |
//!
//! and, for every mesh: host-network pods (they share the node's network
//! namespace) and finished pods (phase `Succeeded` or `Failed`).

use std::collections::BTreeMap;
use std::net::IpAddr;

use k8s_openapi::api::core::v1::{Container, Pod};

pub use crate::pod::{MeshVerdict, NamespaceLabels, PodView};
use crate::policy::{Mesh, keys};

/// Istio's sidecar container.
pub const ISTIO_PROXY: &str = "istio-proxy";
/// Istio's iptables init container.
pub const ISTIO_INIT: &str = "istio-init";
/// Written by Istio's injector on every injected pod.
pub const ISTIO_STATUS: &str = "sidecar.istio.io/status";
/// Istio's opt-out (label or annotation), a boolean.
pub const ISTIO_INJECT: &str = "sidecar.istio.io/inject";
/// Linkerd's sidecar container.
pub const LINKERD_PROXY: &str = "linkerd-proxy";
/// Linkerd's iptables init container.
pub const LINKERD_INIT: &str = "linkerd-init";
/// Linkerd's opt-out annotation (`disabled`).
pub const LINKERD_INJECT: &str = "linkerd.io/inject";
/// Kuma's sidecar container.
pub const KUMA_SIDECAR: &str = "kuma-sidecar";
/// Kuma's iptables init container.
pub const KUMA_INIT: &str = "kuma-init";
/// Kuma's opt-out annotation (`disabled` or `false`).
pub const KUMA_INJECTION: &str = "kuma.io/sidecar-injection";
/// On a static pod's mirror: the UID the kubelet uses for the pod (and so
/// in its cgroup path), which differs from the mirror's `metadata.uid`.
pub const MIRROR_ANNOTATION: &str = "kubernetes.io/config.mirror";

/// A pod object weir cannot use at all.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PodError {
    /// A required metadata field is missing or empty.
    #[error(
        "pod object without metadata.{field} (namespace {namespace:?}, name {name:?}); the API server always sets it, so this object is ignored"
    )]
    Missing {
        /// `name`, `namespace` or `uid`.
        field: &'static str,
        /// What namespace it had.
        namespace: String,
        /// What name it had.
        name: String,
    },
}

/// Go's `strconv.ParseBool`, which Istio uses for `sidecar.istio.io/inject`.
fn parse_go_bool(v: &str) -> Option<bool> {
    match v {
        "1" | "t" | "T" | "TRUE" | "true" | "True" => Some(true),
        "0" | "f" | "F" | "FALSE" | "false" | "False" => Some(false),
        _ => None,
    }
}

fn all_containers(pod: &Pod) -> impl Iterator<Item = &Container> {
    let spec = pod.spec.as_ref();
    spec.into_iter().flat_map(|s| {
        s.containers
            .iter()
            .chain(s.init_containers.iter().flatten())
    })
}

/// The `pilot-agent proxy <type>` argument of Istio's container ("sidecar"
/// or "router"), when it has one.
fn istio_proxy_type(c: &Container) -> Option<&str> {
    let args = c.args.as_deref().unwrap_or_default();
    let at = args.iter().position(|a| a == "proxy")?;
    args.get(at + 1)
        .map(String::as_str)
        .filter(|t| !t.starts_with('-'))
}

fn env_true(c: &Container, name: &str) -> bool {
    c.env
        .iter()
        .flatten()
        .any(|e| e.name == name && e.value.as_deref().and_then(parse_go_bool) == Some(true))
}

/// Whether the pod's Linkerd proxy listens on IPv6 (its outbound listeners
/// include `[::1]`), which its injector configures exactly when
/// `disableIPv6` is false, the case where linkerd-init writes IPv6 rules.
fn linkerd_ipv6(pod: &Pod) -> bool {
    all_containers(pod)
        .filter(|c| c.name == LINKERD_PROXY)
        .flat_map(|c| c.env.iter().flatten())
        .any(|e| {
            e.name == "LINKERD2_PROXY_OUTBOUND_LISTEN_ADDRS"
                && e.value.as_deref().is_some_and(|v| v.contains("[::1]"))
        })
}

/// Whether Istio runs this pod dual-stack (`ISTIO_DUAL_STACK`, from the
/// pod's `proxy.istio.io/config` or the istio-proxy container's
/// environment, where the injector puts the mesh's proxy metadata).
/// `None`: the pod's proxy config says it (the policy reads it there).
fn istio_dual_stack(pod: &Pod, annotations: &BTreeMap<String, String>) -> Option<bool> {
    if let Some(cfg) = annotations.get(keys::PROXY_CONFIG)
        && crate::policy::istio_proxy_metadata(cfg, "ISTIO_DUAL_STACK")
            .ok()
            .flatten()
            .is_some()
    {
        return None;
    }
    let on = all_containers(pod)
        .filter(|c| c.name == ISTIO_PROXY)
        .flat_map(|c| c.env.iter().flatten())
        .any(|e| {
            e.name == "ISTIO_DUAL_STACK"
                && e.value
                    .as_deref()
                    .and_then(|v| parse_go_bool(v.trim()))
                    .unwrap_or(false)
        });
    Some(on)
}

/// The identity Istio's injector gave the proxy: `istio-proxy`'s
/// `securityContext.runAsUser`, the UID it also passes to `istio-init -u`
/// (1337, or the namespace's UID range on OpenShift), and the GID
/// `istio-init -g` gets: `PROXY_GID` from the container's environment,
/// else the same number.
fn istio_proxy_ids(pod: &Pod) -> Option<(i64, String)> {
    let c = all_containers(pod).find(|c| c.name == ISTIO_PROXY)?;
    let uid = c.security_context.as_ref()?.run_as_user?;
    let gid = c
        .env
        .iter()
        .flatten()
        .find(|e| e.name == "PROXY_GID")
        .and_then(|e| e.value.clone())
        // Only a list of numbers is taken (istio-init would fail on
        // anything else); weir's proxy-gids annotation is for the rest.
        .filter(|v| v.split(',').all(|i| i.trim().parse::<u32>().is_ok()))
        .unwrap_or_else(|| uid.to_string());
    Some((uid, gid))
}

/// Decides whether (and how) weir captures `pod`, from the pod alone (as
/// if its namespace had no labels).
#[cfg(test)]
pub fn verdict(pod: &Pod) -> MeshVerdict {
    verdict_in(pod, NamespaceLabels::Known(None))
}

/// Decides whether (and how) weir captures `pod` in a namespace with
/// labels `ns`.
#[allow(dead_code, reason = "weir-cni's (the agent decides on PodViews)")]
pub fn verdict_in(pod: &Pod, ns: NamespaceLabels<'_>) -> MeshVerdict {
    match sidecar_verdict(pod) {
        Some(v) => v,
        None => crate::pod::ambient_verdict(&ambient_labels(pod), ns).0,
    }
}

/// Whether `pod`'s verdict depends on its namespace's labels (see
/// [`PodView::depends_on_namespace`]).
#[allow(dead_code, reason = "weir-cni's (the agent decides on PodViews)")]
pub fn needs_namespace(pod: &Pod) -> bool {
    sidecar_verdict(pod).is_none()
        && !matches!(
            ambient_labels(pod)
                .get(crate::ambient::DATAPLANE_MODE)
                .map(|v| v.trim()),
            Some(crate::ambient::DATAPLANE_AMBIENT | crate::ambient::DATAPLANE_NONE)
        )
}

/// The pod's own `istio.io/dataplane-mode` label, as a map (empty without
/// it).
fn ambient_labels(pod: &Pod) -> BTreeMap<String, String> {
    pod.metadata
        .labels
        .iter()
        .flatten()
        .filter(|(k, _)| k.as_str() == crate::ambient::DATAPLANE_MODE)
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

/// The verdict of every rule but the ambient one (which also needs the
/// namespace's labels); `None`: the ambient rule decides.
fn sidecar_verdict(pod: &Pod) -> Option<MeshVerdict> {
    let not = |why: &str| Some(MeshVerdict::NotMeshed(why.to_string()));
    let spec = pod.spec.as_ref();
    if spec.and_then(|s| s.host_network) == Some(true) {
        return not("host network (the pod shares the node's network namespace)");
    }
    if let Some(phase) = pod.status.as_ref().and_then(|s| s.phase.as_deref())
        && matches!(phase, "Succeeded" | "Failed")
    {
        return Some(MeshVerdict::NotMeshed(format!("finished (phase {phase})")));
    }
    let empty = BTreeMap::new();
    let ann = pod.metadata.annotations.as_ref().unwrap_or(&empty);
    let labels = pod.metadata.labels.as_ref().unwrap_or(&empty);
    let has = |name: &str| all_containers(pod).any(|c| c.name == name);

    let istio_proxy = all_containers(pod).find(|c| c.name == ISTIO_PROXY);
    if istio_proxy.is_some() || ann.contains_key(ISTIO_STATUS) {
        if has(ISTIO_INIT) {
            return not("istio-init is present: Istio's own iptables rules capture this pod");
        }
        // The label is the newer API; Istio prefers it when both are set.
        let inject = labels.get(ISTIO_INJECT).or_else(|| ann.get(ISTIO_INJECT));
        if inject.and_then(|v| parse_go_bool(v.trim())) == Some(false) {
            return not("sidecar.istio.io/inject is false");
        }
        if let Some(c) = istio_proxy {
            if let Some(t) = istio_proxy_type(c)
                && t != "sidecar"
            {
                return Some(MeshVerdict::NotMeshed(format!(
                    "istio-proxy runs as {t:?}, not as a sidecar (a gateway)"
                )));
            }
            if env_true(c, "DISABLE_ENVOY") {
                return not("DISABLE_ENVOY is set on istio-proxy");
            }
        }
        if ann
            .get(keys::INTERCEPTION_MODE)
            .is_some_and(|m| m.trim() == "NONE")
        {
            return not("sidecar.istio.io/interceptionMode is NONE");
        }
        return Some(MeshVerdict::Meshed(Mesh::Istio));
    }
    if has(LINKERD_PROXY) {
        if has(LINKERD_INIT) {
            return not("linkerd-init is present: Linkerd's own iptables rules capture this pod");
        }
        if ann
            .get(LINKERD_INJECT)
            .is_some_and(|v| v.trim() == "disabled")
        {
            return not("linkerd.io/inject is disabled");
        }
        return Some(MeshVerdict::Meshed(Mesh::Linkerd));
    }
    if has(KUMA_SIDECAR) {
        if has(KUMA_INIT) {
            return not("kuma-init is present: Kuma's own iptables rules capture this pod");
        }
        if ann
            .get(KUMA_INJECTION)
            .is_some_and(|v| matches!(v.trim(), "disabled" | "false"))
        {
            return not("kuma.io/sidecar-injection is disabled");
        }
        return Some(MeshVerdict::Meshed(Mesh::Kuma));
    }
    // Istio ambient mode: decided with the namespace's labels.
    None
}

/// Reduces a pod object to what weir needs.
pub fn view(pod: &Pod) -> Result<PodView, PodError> {
    let md = &pod.metadata;
    let namespace = md.namespace.clone().unwrap_or_default();
    let name = md.name.clone().unwrap_or_default();
    let uid = md.uid.clone().unwrap_or_default();
    for (field, value) in [("name", &name), ("namespace", &namespace), ("uid", &uid)] {
        if value.is_empty() {
            return Err(PodError::Missing {
                field,
                namespace: namespace.clone(),
                name: name.clone(),
            });
        }
    }
    let mut annotations: BTreeMap<String, String> = md.annotations.clone().unwrap_or_default();
    let (verdict, ambient_labels) = match sidecar_verdict(pod) {
        Some(v) => (v, None),
        None => (
            MeshVerdict::NotMeshed(String::new()),
            Some(ambient_labels(pod)),
        ),
    };
    if verdict == MeshVerdict::Meshed(Mesh::Linkerd)
        && !annotations.contains_key(keys::CAPTURE_IPV6)
        && linkerd_ipv6(pod)
    {
        // Linkerd's `disableIPv6` is cluster-wide; its proxy's listeners
        // tell whether linkerd-init would have written IPv6 rules.
        annotations.insert(keys::CAPTURE_IPV6.into(), "true".into());
    }
    let cgroup_uid = annotations
        .get(MIRROR_ANNOTATION)
        .filter(|v| !v.trim().is_empty())
        .map(|v| v.trim().to_string())
        .unwrap_or_else(|| uid.clone());
    let status = pod.status.as_ref();
    let mut raw_ips: Vec<&str> = status
        .and_then(|s| s.pod_ips.as_ref())
        .map(|v| v.iter().map(|p| p.ip.as_str()).collect())
        .unwrap_or_default();
    if raw_ips.is_empty()
        && let Some(ip) = status.and_then(|s| s.pod_ip.as_deref())
    {
        raw_ips.push(ip);
    }
    let mut ips = Vec::new();
    let mut bad_ips = Vec::new();
    for s in raw_ips {
        match s.trim().parse::<IpAddr>() {
            Ok(ip) if crate::policy::pod_ip_problem(ip).is_some() => bad_ips.push(s.to_string()),
            Ok(ip) if !ips.contains(&ip) => ips.push(ip),
            Ok(_) => {}
            Err(_) => bad_ips.push(s.to_string()),
        }
    }
    // istio-iptables writes IPv6 rules only with ISTIO_DUAL_STACK or when
    // the pod's first address is IPv6; a proxy without dual stack listens
    // on IPv4 only, so capturing IPv6 would refuse those connections.
    let ipv6_from_first_ip = verdict == MeshVerdict::Meshed(Mesh::Istio)
        && !annotations.contains_key(keys::CAPTURE_IPV6)
        && istio_dual_stack(pod, &annotations) == Some(false);
    // The proxy's identity: weir's own annotations win, else what the
    // injector wrote (a proxy UID weir did not know would have its own
    // connections captured, a loop).
    if verdict == MeshVerdict::Meshed(Mesh::Istio)
        && !annotations.contains_key(keys::PROXY_UIDS)
        && let Some((uid, gid)) = istio_proxy_ids(pod)
        && uid >= 0
    {
        annotations.insert(keys::PROXY_UIDS.into(), uid.to_string());
        annotations.entry(keys::PROXY_GIDS.into()).or_insert(gid);
    }
    let service_account = pod
        .spec
        .as_ref()
        .and_then(|s| s.service_account_name.clone())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "default".to_string());
    let mut v = PodView {
        verdict,
        service_account,
        namespace,
        name,
        uid,
        cgroup_uid,
        ips: Vec::new(),
        annotations,
        bad_ips,
        ipv6_from_first_ip,
        ambient_labels,
        reason: String::new(),
    };
    // The pod's own label; the namespace's are added by the watcher's
    // passes and the CNI server.
    v.classify_ambient(NamespaceLabels::Known(None));
    v.set_ips(ips);
    Ok(v)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A pod as the API server returns it for an Istio-injected Deployment
    /// (trimmed to the fields weir and the injector care about).
    pub(crate) const ISTIO_POD: &str = r#"{
      "apiVersion": "v1", "kind": "Pod",
      "metadata": {
        "name": "productpage-v1-6b746f74dc-9stvs", "namespace": "bookinfo",
        "uid": "3f1c8f0e-5d2a-4b1e-9a53-0c6b1b0f7c11", "resourceVersion": "81231",
        "labels": {"app": "productpage", "security.istio.io/tlsMode": "istio",
                   "service.istio.io/canonical-name": "productpage"},
        "annotations": {
          "kubectl.kubernetes.io/default-container": "productpage",
          "prometheus.io/path": "/stats/prometheus", "prometheus.io/port": "15020",
          "sidecar.istio.io/status": "{\"initContainers\":[\"istio-validation\"],\"containers\":[\"istio-proxy\"],\"volumes\":[\"istio-envoy\"],\"revision\":\"default\"}",
          "traffic.sidecar.istio.io/excludeOutboundPorts": "5432"
        }
      },
      "spec": {
        "nodeName": "node-a", "serviceAccountName": "bookinfo-productpage",
        "initContainers": [{"name": "istio-validation", "image": "docker.io/istio/proxyv2:1.24.0",
          "args": ["istio-iptables", "--run-validation", "--skip-rule-apply"]}],
        "containers": [
          {"name": "productpage", "image": "docker.io/istio/examples-bookinfo-productpage-v1:1.20.2",
           "ports": [{"containerPort": 9080, "protocol": "TCP"}]},
          {"name": "istio-proxy", "image": "docker.io/istio/proxyv2:1.24.0",
           "args": ["proxy", "sidecar", "--domain", "$(POD_NAMESPACE).svc.cluster.local",
                    "--proxyLogLevel=warning"],
           "env": [{"name": "ISTIO_META_POD_PORTS", "value": "[{\"containerPort\":9080}]"}],
           "securityContext": {"runAsUser": 1337, "runAsGroup": 1337}}
        ]
      },
      "status": {"phase": "Running", "podIP": "10.244.1.17",
                 "podIPs": [{"ip": "10.244.1.17"}, {"ip": "fd00:10:244:1::11"}],
                 "hostIP": "172.18.0.3"}
    }"#;

    pub(crate) fn pod(json: &str) -> Pod {
        serde_json::from_str(json).unwrap()
    }

    fn istio() -> serde_json::Value {
        serde_json::from_str(ISTIO_POD).unwrap()
    }

    fn verdict_of(v: serde_json::Value) -> MeshVerdict {
        verdict(&serde_json::from_value(v).unwrap())
    }

    fn not_meshed(v: serde_json::Value) -> String {
        match verdict_of(v) {
            MeshVerdict::NotMeshed(why) => why,
            other => panic!("expected not meshed, got {other}"),
        }
    }

    #[test]
    fn istio_sidecar_pod() {
        let v = view(&pod(ISTIO_POD)).unwrap();
        assert_eq!(v.verdict, MeshVerdict::Meshed(Mesh::Istio));
        assert_eq!(v.key(), "bookinfo/productpage-v1-6b746f74dc-9stvs");
        assert_eq!(v.cgroup_uid, "3f1c8f0e-5d2a-4b1e-9a53-0c6b1b0f7c11");
        assert_eq!(
            v.ips,
            vec![
                "10.244.1.17".parse::<IpAddr>().unwrap(),
                "fd00:10:244:1::11".parse().unwrap()
            ]
        );
        assert_eq!(
            v.annotations["traffic.sidecar.istio.io/excludeOutboundPorts"],
            "5432"
        );
    }

    #[test]
    fn istio_native_sidecar_and_status_annotation_alone() {
        // Istio 1.19+ with native sidecars: istio-proxy is an init
        // container with restartPolicy Always.
        let mut p = istio();
        let proxy = p["spec"]["containers"][1].take();
        p["spec"]["containers"] = serde_json::json!([{"name": "app"}]);
        let mut proxy = proxy;
        proxy["restartPolicy"] = "Always".into();
        p["spec"]["initContainers"]
            .as_array_mut()
            .unwrap()
            .push(proxy);
        assert_eq!(verdict_of(p.clone()), MeshVerdict::Meshed(Mesh::Istio));
        // The injector's annotation alone counts too.
        p["spec"]["initContainers"] = serde_json::json!([]);
        assert_eq!(verdict_of(p), MeshVerdict::Meshed(Mesh::Istio));
    }

    #[test]
    fn istio_opt_outs() {
        let mut p = istio();
        p["spec"]["hostNetwork"] = true.into();
        assert!(not_meshed(p).contains("host network"));

        let mut p = istio();
        p["spec"]["initContainers"] = serde_json::json!([{"name": "istio-init"}]);
        assert!(not_meshed(p).contains("istio-init"));

        let mut p = istio();
        p["metadata"]["annotations"]["sidecar.istio.io/inject"] = "false".into();
        assert!(not_meshed(p).contains("inject is false"));

        // The label wins over the annotation.
        let mut p = istio();
        p["metadata"]["annotations"]["sidecar.istio.io/inject"] = "true".into();
        p["metadata"]["labels"]["sidecar.istio.io/inject"] = "F".into();
        assert!(not_meshed(p).contains("inject is false"));
        let mut p = istio();
        p["metadata"]["annotations"]["sidecar.istio.io/inject"] = "false".into();
        p["metadata"]["labels"]["sidecar.istio.io/inject"] = "true".into();
        assert_eq!(verdict_of(p), MeshVerdict::Meshed(Mesh::Istio));

        let mut p = istio();
        p["spec"]["containers"][1]["args"] = serde_json::json!(["proxy", "router"]);
        assert!(not_meshed(p).contains("gateway"));

        let mut p = istio();
        p["spec"]["containers"][1]["env"] =
            serde_json::json!([{"name": "DISABLE_ENVOY", "value": "true"}]);
        assert!(not_meshed(p).contains("DISABLE_ENVOY"));

        let mut p = istio();
        p["metadata"]["annotations"]["sidecar.istio.io/interceptionMode"] = "NONE".into();
        assert!(not_meshed(p).contains("NONE"));

        let mut p = istio();
        p["status"]["phase"] = "Succeeded".into();
        assert!(not_meshed(p).contains("finished"));
    }

    #[test]
    fn istio_proxy_identity_from_the_injected_container() {
        // The sample pod: runAsUser 1337, no PROXY_GID.
        let v = view(&pod(ISTIO_POD)).unwrap();
        assert_eq!(v.annotations[keys::PROXY_UIDS], "1337");
        assert_eq!(v.annotations[keys::PROXY_GIDS], "1337");
        // Another UID (OpenShift's range), PROXY_GID from the environment.
        let mut p = istio();
        p["spec"]["containers"][1]["securityContext"]["runAsUser"] = 1000650000.into();
        p["spec"]["containers"][1]["env"] =
            serde_json::json!([{"name": "PROXY_GID", "value": "1337,3000"}]);
        let v = view(&serde_json::from_value(p).unwrap()).unwrap();
        assert_eq!(v.annotations[keys::PROXY_UIDS], "1000650000");
        assert_eq!(v.annotations[keys::PROXY_GIDS], "1337,3000");
        // A PROXY_GID that is not a list of numbers is not taken.
        let mut p = istio();
        p["spec"]["containers"][1]["env"] =
            serde_json::json!([{"name": "PROXY_GID", "value": "istio"}]);
        let v = view(&serde_json::from_value(p).unwrap()).unwrap();
        assert_eq!(v.annotations[keys::PROXY_GIDS], "1337");
        // weir's annotations win; no securityContext: weir's defaults.
        let mut p = istio();
        p["metadata"]["annotations"][keys::PROXY_UIDS] = "1337,1338".into();
        let v = view(&serde_json::from_value(p).unwrap()).unwrap();
        assert_eq!(v.annotations[keys::PROXY_UIDS], "1337,1338");
        let mut p = istio();
        p["spec"]["containers"][1]
            .as_object_mut()
            .unwrap()
            .remove("securityContext");
        let v = view(&serde_json::from_value(p).unwrap()).unwrap();
        assert!(!v.annotations.contains_key(keys::PROXY_UIDS));
    }

    #[test]
    fn istio_ipv6_follows_istio_dual_stack() {
        let dual = |ips: &[&str], env: Option<&str>, cfg: Option<&str>| {
            let mut p = istio();
            p["status"]["podIPs"] = serde_json::Value::Array(
                ips.iter().map(|ip| serde_json::json!({"ip": ip})).collect(),
            );
            if let Some(v) = env {
                let c = p["spec"]["containers"]
                    .as_array_mut()
                    .unwrap()
                    .iter_mut()
                    .find(|c| c["name"] == "istio-proxy")
                    .unwrap();
                c["env"] = serde_json::json!([{"name": "ISTIO_DUAL_STACK", "value": v}]);
            }
            if let Some(c) = cfg {
                p["metadata"]["annotations"][keys::PROXY_CONFIG] = c.into();
            }
            view(&pod(&p.to_string()))
                .unwrap()
                .annotations
                .get(keys::CAPTURE_IPV6)
                .cloned()
        };
        let v4_first = ["198.18.0.1", "2001:2::1"];
        // Istio's default (off): IPv6 rules only for an IPv6-first pod.
        assert_eq!(dual(&v4_first, None, None).as_deref(), Some("false"));
        assert_eq!(
            dual(&["2001:2::1", "198.18.0.1"], None, None).as_deref(),
            Some("true")
        );
        // On in the proxy's environment (the mesh's proxyMetadata).
        assert_eq!(dual(&v4_first, Some("true"), None), None);
        assert_eq!(
            dual(&v4_first, Some("false"), None).as_deref(),
            Some("false")
        );
        // The pod's own proxy config decides (read by the policy).
        let cfg = "proxyMetadata:\n  ISTIO_DUAL_STACK: \"true\"\n";
        assert_eq!(dual(&v4_first, None, Some(cfg)), None);
    }

    #[test]
    fn ipv6_decision_follows_addresses_set_later() {
        // As at CNI ADD: the API has no podIPs yet.
        let mut p = istio();
        p["status"] = serde_json::json!({"phase": "Pending"});
        let mut v = view(&pod(&p.to_string())).unwrap();
        assert!(v.ips.is_empty() && v.ipv6_from_first_ip);
        let ipv6 = |v: &PodView| v.annotations[keys::CAPTURE_IPV6].clone();
        for (ips, want) in [
            (&["2001:2::1"][..], "true"),
            (&["2001:2::1", "198.18.0.1"][..], "true"),
            (&["198.18.0.1", "2001:2::1"][..], "false"),
            (&["198.18.0.1"][..], "false"),
        ] {
            v.set_ips(ips.iter().map(|i| i.parse().unwrap()).collect());
            assert_eq!(ipv6(&v), want, "{ips:?}");
            // The same as the API's view once it has those addresses.
            let mut q = istio();
            q["status"]["podIPs"] = ips.iter().map(|ip| serde_json::json!({"ip": ip})).collect();
            assert_eq!(view(&pod(&q.to_string())).unwrap(), v, "{ips:?}");
        }
        // An explicit setting is the pod's own: addresses do not change it.
        p["metadata"]["annotations"][keys::CAPTURE_IPV6] = "false".into();
        let mut v = view(&pod(&p.to_string())).unwrap();
        assert!(!v.ipv6_from_first_ip);
        v.set_ips(vec!["2001:2::1".parse().unwrap()]);
        assert_eq!(ipv6(&v), "false");
    }

    #[test]
    fn linkerd_and_kuma() {
        let linkerd = serde_json::json!({
            "metadata": {"name": "web", "namespace": "emojivoto", "uid": "u1",
                         "annotations": {"linkerd.io/proxy-version": "stable-2.14.10"}},
            "spec": {"containers": [{"name": "linkerd-proxy"}, {"name": "web-svc"}]}
        });
        assert_eq!(
            verdict_of(linkerd.clone()),
            MeshVerdict::Meshed(Mesh::Linkerd)
        );
        let mut l = linkerd.clone();
        l["spec"]["initContainers"] = serde_json::json!([{"name": "linkerd-init"}]);
        assert!(not_meshed(l).contains("linkerd-init"));
        let mut l = linkerd.clone();
        l["metadata"]["annotations"]["linkerd.io/inject"] = "disabled".into();
        assert!(not_meshed(l).contains("disabled"));
        // IPv6 capture follows the proxy's listeners (disableIPv6).
        let v = view(&pod(&linkerd.to_string())).unwrap();
        assert!(!v.annotations.contains_key(keys::CAPTURE_IPV6));
        let mut l = linkerd.clone();
        l["spec"]["containers"][0]["env"] = serde_json::json!([
            {"name": "LINKERD2_PROXY_OUTBOUND_LISTEN_ADDRS", "value": "127.0.0.1:4140,[::1]:4140"}
        ]);
        let v = view(&pod(&l.to_string())).unwrap();
        assert_eq!(v.annotations[keys::CAPTURE_IPV6], "true");
        l["metadata"]["annotations"][keys::CAPTURE_IPV6] = "false".into();
        let v = view(&pod(&l.to_string())).unwrap();
        assert_eq!(v.annotations[keys::CAPTURE_IPV6], "false");

        let kuma = serde_json::json!({
            "metadata": {"name": "demo", "namespace": "kuma-demo", "uid": "u2"},
            "spec": {"containers": [{"name": "demo-app"}, {"name": "kuma-sidecar"}]}
        });
        assert_eq!(verdict_of(kuma.clone()), MeshVerdict::Meshed(Mesh::Kuma));
        let mut k = kuma;
        k["metadata"]["annotations"] = serde_json::json!({"kuma.io/sidecar-injection": "disabled"});
        assert!(not_meshed(k).contains("disabled"));
    }

    #[test]
    fn plain_pods_and_odd_objects() {
        let plain = serde_json::json!({
            "metadata": {"name": "coredns-1", "namespace": "kube-system", "uid": "u3"},
            "spec": {"containers": [{"name": "coredns"}]}
        });
        assert!(not_meshed(plain).contains("no istio-proxy"));
        // No spec, no status at all: not meshed, no panic.
        let bare: Pod =
            serde_json::from_value(serde_json::json!({"metadata": {"name": "x"}})).unwrap();
        assert!(matches!(verdict(&bare), MeshVerdict::NotMeshed(_)));
        // Missing uid: refused with the field named.
        let e = view(&bare).unwrap_err().to_string();
        assert!(e.contains("metadata.namespace"), "{e}");
    }

    #[test]
    fn ips_and_mirror_pods() {
        let mut p = istio();
        p["status"]["podIPs"] = serde_json::json!([{"ip": "nonsense"}, {"ip": "10.0.0.9"}]);
        p["metadata"]["annotations"]["kubernetes.io/config.mirror"] =
            "9b7e0c3c6b0d4e3fa3a1f4b2c7d8e9f0".into();
        let v = view(&serde_json::from_value(p).unwrap()).unwrap();
        assert_eq!(v.ips, vec!["10.0.0.9".parse::<IpAddr>().unwrap()]);
        assert_eq!(v.bad_ips, vec!["nonsense".to_string()]);
        assert_eq!(v.cgroup_uid, "9b7e0c3c6b0d4e3fa3a1f4b2c7d8e9f0");

        // Only podIP (older API servers, single stack).
        let mut p = istio();
        p["status"] = serde_json::json!({"podIP": "10.0.0.7"});
        let v = view(&serde_json::from_value(p).unwrap()).unwrap();
        assert_eq!(v.ips, vec!["10.0.0.7".parse::<IpAddr>().unwrap()]);

        // Pending pod: no addresses yet.
        let mut p = istio();
        p["status"] = serde_json::json!({"phase": "Pending"});
        let v = view(&serde_json::from_value(p).unwrap()).unwrap();
        assert!(v.ips.is_empty());
        assert_eq!(v.verdict, MeshVerdict::Meshed(Mesh::Istio));
    }
}
