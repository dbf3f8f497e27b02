//! Putting `weir-cni` into the node's CNI configuration, and taking it out.
//!
//! The container runtime (containerd, CRI-O, via libcni) uses the first
//! file of its configuration directory in name order among `*.conf`,
//! `*.conflist` and `*.json`. weir appends its entry to that file's
//! `plugins` list (after the plugin that wires the pod's network, whose
//! result carries the pod's addresses); a single-plugin `.conf` is turned
//! into a `.conflist` first. Writes are atomic (a temporary file renamed
//! over the old one), and the entry is re-inserted when the primary
//! network plugin rewrites its file (the agent checks every few seconds).
//!
//! The plugin binary is copied next to the other plugins the same way.

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use serde_json::{Value, json};

/// The plugin's `type`, which is also its binary's name.
pub const PLUGIN: &str = "weir-cni";

/// Errors of install and uninstall; each names the file and the fix.
#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    /// A file or directory cannot be read or written.
    #[error(
        "{path}: {source}; check that the CNI directories are mounted read-write (--cni-conf-dir, --cni-bin-dir)"
    )]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The primary configuration is not something weir can chain onto.
    #[error("{path}: {problem}; fix the node's CNI configuration or set --cni-mode off")]
    BadConfig {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        problem: String,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> InstallError + '_ {
    move |source| InstallError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// What weir writes into the plugin list.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    /// The agent's socket, a host path.
    pub socket: PathBuf,
    /// Let pods start when the agent cannot enroll them.
    pub fail_open: bool,
}

impl Entry {
    fn to_json(&self) -> Value {
        json!({
            "type": PLUGIN,
            "socket": self.socket.to_string_lossy(),
            "failOpen": self.fail_open,
        })
    }
}

/// What an install pass did.
#[derive(Debug, PartialEq, Eq)]
pub enum Installed {
    /// The entry was written into this file.
    Written(PathBuf),
    /// The file already had the right entry.
    Unchanged(PathBuf),
    /// There is no CNI configuration yet (the network plugin has not
    /// installed itself on this node).
    NoConfig,
}

/// The configuration file the runtime uses: the first in name order with
/// a CNI extension (hidden and temporary files skipped).
pub fn primary_config(conf_dir: &Path) -> Result<Option<PathBuf>, InstallError> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(conf_dir)
        .map_err(io(conf_dir))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.is_file()
                && !p
                    .file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with('.'))
                && matches!(
                    p.extension().and_then(|e| e.to_str()),
                    Some("conf" | "conflist" | "json")
                )
        })
        .collect();
    files.sort();
    Ok(files.into_iter().next())
}

/// The configuration with weir's entry as the last plugin (replacing an
/// older weir entry), and whether anything changed. A single-plugin
/// configuration is wrapped into a list.
pub fn with_entry(conf: &Value, entry: &Entry) -> Result<(Value, bool), String> {
    let Some(obj) = conf.as_object() else {
        return Err("not a JSON object".into());
    };
    let mut list = if obj.contains_key("plugins") {
        conf.clone()
    } else {
        if !obj.contains_key("type") {
            return Err("neither a \"plugins\" list nor a single plugin with a \"type\"".into());
        }
        let mut single = conf.clone();
        let single_obj = single.as_object_mut().expect("checked above");
        let version = single_obj.remove("cniVersion").unwrap_or(json!("0.3.1"));
        let name = single_obj
            .remove("name")
            .unwrap_or(json!("k8s-pod-network"));
        json!({"cniVersion": version, "name": name, "plugins": [single]})
    };
    let plugins = list["plugins"]
        .as_array_mut()
        .ok_or_else(|| "\"plugins\" is not a list".to_string())?;
    if plugins.is_empty() {
        return Err("\"plugins\" is empty".into());
    }
    let want = entry.to_json();
    let ours: Vec<usize> = plugins
        .iter()
        .enumerate()
        .filter(|(_, p)| p["type"] == PLUGIN)
        .map(|(i, _)| i)
        .collect();
    if ours.len() == 1 && ours[0] == plugins.len() - 1 && plugins[ours[0]] == want {
        return Ok((list, false));
    }
    plugins.retain(|p| p["type"] != PLUGIN);
    plugins.push(want);
    Ok((list, true))
}

/// The configuration without weir's entry, and whether it had one.
pub fn without_entry(conf: &Value) -> (Value, bool) {
    let mut c = conf.clone();
    let Some(plugins) = c.get_mut("plugins").and_then(Value::as_array_mut) else {
        return (c, false);
    };
    let before = plugins.len();
    plugins.retain(|p| p["type"] != PLUGIN);
    let changed = plugins.len() != before;
    (c, changed)
}

fn write_atomic(path: &Path, data: &[u8], mode: u32) -> Result<(), InstallError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("file");
    // A hidden name without a CNI extension: the runtime never reads it.
    let tmp = dir.join(format!(".{name}.weir-tmp"));
    let mut f = std::fs::File::create(&tmp).map_err(io(&tmp))?;
    f.write_all(data).map_err(io(&tmp))?;
    f.set_permissions(std::fs::Permissions::from_mode(mode))
        .map_err(io(&tmp))?;
    f.sync_all().map_err(io(&tmp))?;
    drop(f);
    std::fs::rename(&tmp, path).map_err(io(path))
}

fn read_json(path: &Path) -> Result<Value, InstallError> {
    let text = std::fs::read_to_string(path).map_err(io(path))?;
    serde_json::from_str(&text).map_err(|e| InstallError::BadConfig {
        path: path.to_path_buf(),
        problem: format!("not JSON ({e})"),
    })
}

/// Inserts weir's entry into the node's primary CNI configuration.
pub fn install_config(conf_dir: &Path, entry: &Entry) -> Result<Installed, InstallError> {
    let Some(path) = primary_config(conf_dir)? else {
        return Ok(Installed::NoConfig);
    };
    let conf = read_json(&path)?;
    let is_list = conf.get("plugins").is_some();
    let (new, changed) = with_entry(&conf, entry).map_err(|problem| InstallError::BadConfig {
        path: path.clone(),
        problem,
    })?;
    if !changed && is_list {
        return Ok(Installed::Unchanged(path));
    }
    let mut text = serde_json::to_vec_pretty(&new).expect("a JSON value serializes");
    text.push(b'\n');
    if is_list {
        write_atomic(&path, &text, 0o644)?;
        return Ok(Installed::Written(path));
    }
    // A single-plugin file becomes a list under the same stem; the old
    // file goes, or the runtime would keep reading it first.
    let list_path = path.with_extension("conflist");
    write_atomic(&list_path, &text, 0o644)?;
    if list_path != path {
        std::fs::remove_file(&path).map_err(io(&path))?;
    }
    Ok(Installed::Written(list_path))
}

/// Removes weir's entry from every CNI configuration file in `conf_dir`;
/// returns the files changed.
pub fn uninstall_config(conf_dir: &Path) -> Result<Vec<PathBuf>, InstallError> {
    let mut changed = Vec::new();
    let mut files: Vec<PathBuf> = std::fs::read_dir(conf_dir)
        .map_err(io(conf_dir))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().and_then(|e| e.to_str()) == Some("conflist"))
        .collect();
    files.sort();
    for path in files {
        let Ok(conf) = read_json(&path) else {
            continue;
        };
        let (new, had) = without_entry(&conf);
        if had {
            let mut text = serde_json::to_vec_pretty(&new).expect("a JSON value serializes");
            text.push(b'\n');
            write_atomic(&path, &text, 0o644)?;
            changed.push(path);
        }
    }
    Ok(changed)
}

/// Copies the plugin binary into the CNI binary directory when it differs;
/// returns whether it was copied.
pub fn install_binary(src: &Path, bin_dir: &Path) -> Result<bool, InstallError> {
    let data = std::fs::read(src).map_err(io(src))?;
    let dst = bin_dir.join(PLUGIN);
    if std::fs::read(&dst).is_ok_and(|cur| cur == data) {
        return Ok(false);
    }
    write_atomic(&dst, &data, 0o755)?;
    Ok(true)
}

/// The plugin binary shipped next to the running agent.
pub fn bundled_plugin() -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    let p = exe.parent()?.join(PLUGIN);
    p.is_file().then_some(p)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::k8s::testutil::TempDir;

    fn entry() -> Entry {
        Entry {
            socket: "/var/run/weir/cni.sock".into(),
            fail_open: false,
        }
    }

    const CALICO: &str = r#"{
      "name": "k8s-pod-network", "cniVersion": "0.3.1",
      "plugins": [
        {"type": "calico", "datastore_type": "kubernetes", "ipam": {"type": "calico-ipam"},
         "kubernetes": {"kubeconfig": "/etc/cni/net.d/calico-kubeconfig"}},
        {"type": "portmap", "snat": true, "capabilities": {"portMappings": true}},
        {"type": "bandwidth", "capabilities": {"bandwidth": true}}
      ]
    }"#;

    #[test]
    fn appends_once_and_replaces_old_entries() {
        let conf: Value = serde_json::from_str(CALICO).unwrap();
        let (new, changed) = with_entry(&conf, &entry()).unwrap();
        assert!(changed);
        let types: Vec<&str> = new["plugins"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["type"].as_str().unwrap())
            .collect();
        assert_eq!(types, ["calico", "portmap", "bandwidth", "weir-cni"]);
        assert_eq!(new["plugins"][3]["socket"], "/var/run/weir/cni.sock");
        // Idempotent.
        let (again, changed) = with_entry(&new, &entry()).unwrap();
        assert!(!changed);
        assert_eq!(again, new);
        // A changed setting replaces the entry, still last.
        let (open, changed) = with_entry(
            &new,
            &Entry {
                fail_open: true,
                ..entry()
            },
        )
        .unwrap();
        assert!(changed);
        assert_eq!(open["plugins"].as_array().unwrap().len(), 4);
        assert_eq!(open["plugins"][3]["failOpen"], true);
        let (gone, had) = without_entry(&open);
        assert!(had);
        assert_eq!(gone, conf);
    }

    #[test]
    fn bad_configs_are_named() {
        for (bad, what) in [
            ("[]", "not a JSON object"),
            (r#"{"name":"x"}"#, "neither"),
            (r#"{"plugins":{}}"#, "not a list"),
            (r#"{"plugins":[]}"#, "empty"),
        ] {
            let e = with_entry(&serde_json::from_str(bad).unwrap(), &entry()).unwrap_err();
            assert!(e.contains(what), "{bad}: {e}");
        }
    }

    #[test]
    fn installs_into_the_first_file_and_converts_a_single_plugin() {
        let d = TempDir::new("cni");
        let dir = d.path();
        assert_eq!(install_config(dir, &entry()).unwrap(), Installed::NoConfig);
        std::fs::write(
            dir.join("10-flannel.conf"),
            r#"{"name":"cbr0","cniVersion":"0.3.1","type":"flannel","delegate":{"isDefaultGateway":true}}"#,
        )
        .unwrap();
        std::fs::write(dir.join("99-other.conflist"), CALICO).unwrap();
        std::fs::write(dir.join(".hidden.conflist"), CALICO).unwrap();
        std::fs::write(dir.join("calico-kubeconfig"), "not json").unwrap();
        let got = install_config(dir, &entry()).unwrap();
        let list = dir.join("10-flannel.conflist");
        assert_eq!(got, Installed::Written(list.clone()));
        assert!(!dir.join("10-flannel.conf").exists());
        let v: Value = serde_json::from_str(&std::fs::read_to_string(&list).unwrap()).unwrap();
        assert_eq!(v["name"], "cbr0");
        assert_eq!(v["cniVersion"], "0.3.1");
        assert_eq!(v["plugins"][0]["type"], "flannel");
        assert_eq!(v["plugins"][1]["type"], "weir-cni");
        assert!(v["plugins"][0].get("cniVersion").is_none());
        assert_eq!(
            install_config(dir, &entry()).unwrap(),
            Installed::Unchanged(list.clone())
        );
        // The network plugin rewrites its file: weir's entry comes back.
        std::fs::write(&list, CALICO).unwrap();
        assert_eq!(
            install_config(dir, &entry()).unwrap(),
            Installed::Written(list.clone())
        );
        // No temporary files are left for the runtime to trip over.
        let names: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        assert!(!names.iter().any(|n| n.contains("weir-tmp")), "{names:?}");
        assert_eq!(uninstall_config(dir).unwrap(), vec![list.clone()]);
        assert!(uninstall_config(dir).unwrap().is_empty());
    }

    #[test]
    fn copies_the_binary_only_when_it_changed() {
        let d = TempDir::new("cnibin");
        let src = d.path().join("src-weir-cni");
        std::fs::write(&src, b"\x7fELF v1").unwrap();
        let bin = d.path().join("bin");
        std::fs::create_dir(&bin).unwrap();
        assert!(install_binary(&src, &bin).unwrap());
        assert!(!install_binary(&src, &bin).unwrap());
        let mode = std::fs::metadata(bin.join(PLUGIN))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o755);
        std::fs::write(&src, b"\x7fELF v2").unwrap();
        assert!(install_binary(&src, &bin).unwrap());
        let e = install_binary(&d.path().join("missing"), &bin).unwrap_err();
        assert!(e.to_string().contains("missing"), "{e}");
    }
}
