//! The kubeconfig the agent writes next to the node's CNI configuration
//! for `weir-cni`: with it, the plugin reads a pod from the Kubernetes API
//! itself when the agent is not reachable, to let pods that are clearly
//! not meshed start (as istio-cni's node agent writes one for its plugin).
//!
//! It holds the agent's own credentials (its service account token, read
//! from the token file each time so a rotated token is written again), the
//! API server's address and CA, all inline: the plugin runs on the host,
//! where the agent's files are not. The file is `0600` (root only, like
//! the CNI configuration it sits next to); the agent's RBAC only allows
//! reading pods.

use base64::Engine as _;
use serde_json::{Value, json};

/// The file's name in the CNI configuration directory.
pub const FILE: &str = "weir-kubeconfig";

fn b64(data: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(data)
}

/// DER certificates as one PEM bundle.
fn pem_bundle(ders: &[Vec<u8>]) -> String {
    let mut out = String::new();
    for der in ders {
        out.push_str("-----BEGIN CERTIFICATE-----\n");
        let text = b64(der);
        for chunk in text.as_bytes().chunks(64) {
            out.push_str(std::str::from_utf8(chunk).expect("base64 is ASCII"));
            out.push('\n');
        }
        out.push_str("-----END CERTIFICATE-----\n");
    }
    out
}

/// The kubeconfig text (JSON, which is YAML) for the agent's client
/// configuration, every file it refers to read in.
pub fn for_plugin(config: &kube::Config) -> Result<String, String> {
    let mut cluster = json!({"server": config.cluster_url.to_string()});
    if let Some(ders) = &config.root_cert {
        cluster["certificate-authority-data"] = b64(pem_bundle(ders).as_bytes()).into();
    }
    if config.accept_invalid_certs {
        cluster["insecure-skip-tls-verify"] = true.into();
    }
    if let Some(n) = &config.tls_server_name {
        cluster["tls-server-name"] = n.clone().into();
    }
    let mut user = serde_json::to_value(&config.auth_info)
        .map_err(|e| format!("the agent's credentials do not serialize: {e}"))?;
    let read = |path: &str| -> Result<Vec<u8>, String> {
        std::fs::read(path).map_err(|e| format!("reading {path}: {e}"))
    };
    if let Some(obj) = user.as_object_mut() {
        if let Some(Value::String(f)) = obj.remove("tokenFile")
            && !obj.contains_key("token")
        {
            let token = String::from_utf8_lossy(&read(&f)?).trim().to_string();
            obj.insert("token".into(), token.into());
        }
        for (file_key, data_key) in [
            ("client-certificate", "client-certificate-data"),
            ("client-key", "client-key-data"),
        ] {
            if let Some(Value::String(f)) = obj.remove(file_key)
                && !obj.contains_key(data_key)
            {
                obj.insert(data_key.into(), b64(&read(&f)?).into());
            }
        }
    }
    let kc = json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "weir", "cluster": cluster}],
        "users": [{"name": "weir", "user": user}],
        "contexts": [{"name": "weir", "context": {"cluster": "weir", "user": "weir"}}],
        "current-context": "weir",
    });
    let mut text = serde_json::to_string_pretty(&kc).expect("JSON serializes");
    text.push('\n');
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::TempDir;

    #[tokio::test]
    async fn files_are_read_in_and_the_result_loads() {
        let d = TempDir::new("kc");
        let token = d.path().join("token");
        std::fs::write(&token, "tok-1\n").unwrap();
        let mut config = kube::Config::new("https://10.96.0.1:443".parse().unwrap());
        config.auth_info.token_file = Some(token.to_string_lossy().into_owned());
        config.root_cert = Some(vec![vec![1, 2, 3]]);
        let text = for_plugin(&config).unwrap();
        let v: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["users"][0]["user"]["token"], "tok-1");
        assert!(v["users"][0]["user"].get("tokenFile").is_none());
        let ca = base64::engine::general_purpose::STANDARD
            .decode(
                v["clusters"][0]["cluster"]["certificate-authority-data"]
                    .as_str()
                    .unwrap(),
            )
            .unwrap();
        let ca = String::from_utf8(ca).unwrap();
        assert_eq!(
            ca,
            "-----BEGIN CERTIFICATE-----\nAQID\n-----END CERTIFICATE-----\n"
        );
        // kube reads it back (as the plugin does).
        let path = d.path().join(FILE);
        std::fs::write(&path, &text).unwrap();
        let kc = kube::config::Kubeconfig::read_from(&path).unwrap();
        assert_eq!(kc.current_context.as_deref(), Some("weir"));
        let server = kc.clusters[0].cluster.as_ref().unwrap().server.clone();
        assert!(server.unwrap().starts_with("https://10.96.0.1"));
        // A rotated token is picked up.
        std::fs::write(&token, "tok-2").unwrap();
        assert!(for_plugin(&config).unwrap().contains("tok-2"));
        // A token file that cannot be read is an error naming it.
        config.auth_info.token_file = Some("/nonexistent/token".into());
        assert!(
            for_plugin(&config)
                .unwrap_err()
                .contains("/nonexistent/token")
        );
    }
}
