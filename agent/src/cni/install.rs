//! Putting `weir-cni` into the node's CNI configuration, and taking it out.
//!
//! The container runtime (containerd's go-cni, CRI-O's ocicni, both over
//! libcni) uses the first file of its configuration directory in name
//! order among `*.conf`, `*.conflist` and `*.json`. It reads a `.conflist`
//! as a list (`plugins`); a `.conf` or `.json` as one plugin, which must
//! have a `type` (a `plugins` list in such a file is not read: containerd
//! refuses the file with "network type not found"), wrapped into a list of
//! one under the file's `name` and `cniVersion`.
//!
//! weir appends its entry to that list (after the plugin that wires the
//! pod's network, whose result carries the pod's addresses). A
//! single-plugin `.conf`/`.json` becomes a `.conflist` of the same stem
//! holding that plugin unchanged, then weir's entry, which remembers the
//! original file name (`restoreFile`); the single-plugin file goes, or the
//! runtime would keep reading it first (`x.conf` sorts before
//! `x.conflist`). Uninstall removes weir's entry from every configuration
//! file and turns such a list back into the original single-plugin file.
//! Writes are atomic (a temporary file renamed over the old one), and the
//! entry is re-inserted when the primary network plugin rewrites its file
//! (the agent checks every few seconds). A configuration weir cannot
//! chain onto is refused, naming the file and the problem, and left as it
//! is.
//!
//! The plugin binary is copied next to the other plugins the same way.

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use serde_json::{Map, Value, json};

/// The plugin's `type`, which is also its binary's name.
pub const PLUGIN: &str = "weir-cni";

/// The key of weir's entry naming the single-plugin file it was made from.
const RESTORE_FILE: &str = "restoreFile";

/// The list's `cniVersion` when a single-plugin file has none (chaining
/// needs 0.3.0 or later).
const DEFAULT_VERSION: &str = "0.3.1";

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
    #[error(
        "{path}: {problem}; the file was left as it is: fix the node's CNI configuration or set --cni-mode off"
    )]
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
    /// Namespaces whose pods start without the agent when it is not
    /// reachable.
    pub exclude_namespaces: Vec<String>,
    /// A kubeconfig (host path) the plugin reads pods with when the agent
    /// is not reachable.
    pub kubeconfig: Option<PathBuf>,
}

impl Entry {
    fn to_json(&self) -> Value {
        let mut v = json!({
            "type": PLUGIN,
            "socket": self.socket.to_string_lossy(),
            "failOpen": self.fail_open,
            "excludeNamespaces": self.exclude_namespaces,
        });
        if let Some(k) = &self.kubeconfig {
            v["kubeconfig"] = k.to_string_lossy().into();
        }
        v
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

/// The CNI configuration files of `conf_dir` in the runtime's order (name
/// order; hidden and temporary files skipped).
fn config_files(conf_dir: &Path) -> Result<Vec<PathBuf>, InstallError> {
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
    Ok(files)
}

/// The configuration file the runtime uses: the first in name order with
/// a CNI extension (hidden and temporary files skipped).
pub fn primary_config(conf_dir: &Path) -> Result<Option<PathBuf>, InstallError> {
    Ok(config_files(conf_dir)?.into_iter().next())
}

/// Whether the runtime reads `path` as a list (`.conflist`) rather than as
/// one plugin (`.conf`, `.json`).
fn is_list_file(path: &Path) -> bool {
    path.extension().and_then(|e| e.to_str()) == Some("conflist")
}

/// Checks a plugin list as libcni reads it.
fn check_list(obj: &Map<String, Value>) -> Result<(), String> {
    let plugins = match obj.get("plugins") {
        None => return Err("no \"plugins\" list (a .conflist must have one)".into()),
        Some(Value::Array(p)) => p,
        Some(other) => return Err(format!("\"plugins\" is not a list (got {other})")),
    };
    if plugins.is_empty() {
        return Err("\"plugins\" is empty".into());
    }
    for (i, p) in plugins.iter().enumerate() {
        match p.get("type") {
            Some(Value::String(t)) if !t.is_empty() => {}
            _ if !p.is_object() => {
                return Err(format!("plugins[{i}] is not a plugin object (got {p})"));
            }
            _ => return Err(format!("plugins[{i}] has no \"type\"")),
        }
    }
    if !matches!(obj.get("name"), Some(Value::String(_))) {
        return Err("no \"name\" (libcni refuses a list without one)".into());
    }
    Ok(())
}

/// The configuration with weir's entry as the last plugin (replacing an
/// older weir entry), and whether anything changed. `list` says how the
/// runtime reads the file (see [`is_list_file`]); `file_name` is recorded
/// when a single plugin is turned into a list. Errors name the problem.
pub fn with_entry(
    conf: &Value,
    list: bool,
    file_name: &str,
    entry: &Entry,
) -> Result<(Value, bool), String> {
    let Some(obj) = conf.as_object() else {
        return Err(format!("not a JSON object (got {})", kind_of(conf)));
    };
    let mut want = entry.to_json();
    let mut out = if list {
        check_list(obj)?;
        if let Some(f) = obj["plugins"]
            .as_array()
            .and_then(|p| p.iter().find(|p| p["type"] == PLUGIN))
            .and_then(|p| p.get(RESTORE_FILE))
        {
            // Made from a single-plugin file: keep what to restore.
            want[RESTORE_FILE] = f.clone();
        }
        conf.clone()
    } else {
        match obj.get("type") {
            Some(Value::String(t)) if !t.is_empty() => {}
            _ if obj.contains_key("plugins") => {
                return Err(
                    "a \"plugins\" list in a .conf/.json file: the runtime reads such a file as one plugin and finds no \"type\" (containerd: \"network type not found\"); rename it to .conflist"
                        .into(),
                );
            }
            _ => return Err("no \"type\" (a .conf/.json file is one plugin)".into()),
        }
        if !matches!(obj.get("name"), None | Some(Value::String(_))) {
            return Err("\"name\" is not a string".into());
        }
        // As libcni's ConfListFromConf: the plugin as it is, in a list
        // under its name and version.
        want[RESTORE_FILE] = file_name.into();
        let version = obj
            .get("cniVersion")
            .cloned()
            .unwrap_or_else(|| DEFAULT_VERSION.into());
        let name = obj
            .get("name")
            .cloned()
            .unwrap_or_else(|| "k8s-pod-network".into());
        json!({"cniVersion": version, "name": name, "plugins": [conf.clone()]})
    };
    let plugins = out["plugins"].as_array_mut().expect("checked above");
    let ours: Vec<usize> = plugins
        .iter()
        .enumerate()
        .filter(|(_, p)| p["type"] == PLUGIN)
        .map(|(i, _)| i)
        .collect();
    if list && ours.len() == 1 && ours[0] == plugins.len() - 1 && plugins[ours[0]] == want {
        return Ok((out, false));
    }
    plugins.retain(|p| p["type"] != PLUGIN);
    if plugins.is_empty() {
        return Err("no plugin but weir-cni in \"plugins\"".into());
    }
    plugins.push(want);
    Ok((out, true))
}

fn kind_of(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

/// What taking weir out of a configuration gives.
#[derive(Debug, PartialEq)]
pub enum Without {
    /// weir was not in it.
    Absent,
    /// The configuration without weir's entry.
    List(Value),
    /// weir made the list from the single-plugin file of this name: the
    /// plugin to write back there.
    Single {
        /// The original file name.
        file: String,
        /// The plugin, as it was.
        plugin: Value,
    },
}

/// The configuration without weir's entry.
pub fn without_entry(conf: &Value) -> Without {
    let mut c = conf.clone();
    let Some(plugins) = c.get_mut("plugins").and_then(Value::as_array_mut) else {
        return Without::Absent;
    };
    let restore = plugins
        .iter()
        .filter(|p| p["type"] == PLUGIN)
        .find_map(|p| p[RESTORE_FILE].as_str().map(str::to_string))
        // Only a plain file name in the same directory.
        .filter(|f| !f.is_empty() && !f.contains('/') && !f.starts_with('.'));
    let before = plugins.len();
    plugins.retain(|p| p["type"] != PLUGIN);
    if plugins.len() == before {
        return Without::Absent;
    }
    match restore {
        Some(file) if plugins.len() == 1 => Without::Single {
            file,
            plugin: plugins[0].clone(),
        },
        _ => Without::List(c),
    }
}

/// Writes `path` atomically (a hidden temporary file renamed over it).
pub fn write_atomic(path: &Path, data: &[u8], mode: u32) -> Result<(), InstallError> {
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
    if text.trim().is_empty() {
        return Err(InstallError::BadConfig {
            path: path.to_path_buf(),
            problem: "the file is empty".into(),
        });
    }
    serde_json::from_str(&text).map_err(|e| InstallError::BadConfig {
        path: path.to_path_buf(),
        problem: format!("not JSON ({e})"),
    })
}

fn pretty(v: &Value) -> Vec<u8> {
    let mut text = serde_json::to_vec_pretty(v).expect("a JSON value serializes");
    text.push(b'\n');
    text
}

/// Inserts weir's entry into the node's primary CNI configuration.
pub fn install_config(conf_dir: &Path, entry: &Entry) -> Result<Installed, InstallError> {
    let Some(path) = primary_config(conf_dir)? else {
        return Ok(Installed::NoConfig);
    };
    let conf = read_json(&path)?;
    let list = is_list_file(&path);
    let file_name = path
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or_default();
    let (new, changed) =
        with_entry(&conf, list, file_name, entry).map_err(|problem| InstallError::BadConfig {
            path: path.clone(),
            problem,
        })?;
    if !changed {
        return Ok(Installed::Unchanged(path));
    }
    if list {
        write_atomic(&path, &pretty(&new), 0o644)?;
        return Ok(Installed::Written(path));
    }
    // A single-plugin file becomes a list under the same stem; the old
    // file goes, or the runtime would keep reading it first.
    let list_path = path.with_extension("conflist");
    write_atomic(&list_path, &pretty(&new), 0o644)?;
    std::fs::remove_file(&path).map_err(io(&path))?;
    Ok(Installed::Written(list_path))
}

/// Removes weir's entry from every CNI configuration file in `conf_dir`
/// (`.conflist`, `.conf` and `.json`: older versions wrote into those
/// too), turning lists weir made from a single-plugin file back into that
/// file; returns the files written. Files that are not JSON are skipped
/// (weir never wrote them).
pub fn uninstall_config(conf_dir: &Path) -> Result<Vec<PathBuf>, InstallError> {
    let mut changed = Vec::new();
    for path in config_files(conf_dir)? {
        let Ok(conf) = read_json(&path) else {
            continue;
        };
        match without_entry(&conf) {
            Without::Absent => {}
            Without::List(new) => {
                write_atomic(&path, &pretty(&new), 0o644)?;
                changed.push(path);
            }
            Without::Single { file, plugin } => {
                let orig = conf_dir.join(&file);
                if orig == path || !orig.exists() {
                    write_atomic(&orig, &pretty(&plugin), 0o644)?;
                }
                // Else the network plugin wrote its file again meanwhile:
                // that one is current, weir's list goes.
                if orig != path {
                    std::fs::remove_file(&path).map_err(io(&path))?;
                }
                changed.push(orig);
            }
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
    use crate::testutil::TempDir;

    fn entry() -> Entry {
        Entry {
            socket: "/var/run/weir/cni.sock".into(),
            fail_open: false,
            exclude_namespaces: vec!["kube-system".into()],
            kubeconfig: Some("/etc/cni/net.d/weir-kubeconfig".into()),
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

    fn types(v: &Value) -> Vec<&str> {
        v["plugins"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["type"].as_str().unwrap())
            .collect()
    }

    #[test]
    fn appends_once_and_replaces_old_entries() {
        let conf: Value = serde_json::from_str(CALICO).unwrap();
        let (new, changed) = with_entry(&conf, true, "10-calico.conflist", &entry()).unwrap();
        assert!(changed);
        assert_eq!(types(&new), ["calico", "portmap", "bandwidth", "weir-cni"]);
        assert_eq!(new["plugins"][3]["socket"], "/var/run/weir/cni.sock");
        assert_eq!(
            new["plugins"][3]["excludeNamespaces"],
            json!(["kube-system"])
        );
        assert_eq!(
            new["plugins"][3]["kubeconfig"],
            "/etc/cni/net.d/weir-kubeconfig"
        );
        assert!(new["plugins"][3].get(RESTORE_FILE).is_none());
        // Idempotent.
        let (again, changed) = with_entry(&new, true, "10-calico.conflist", &entry()).unwrap();
        assert!(!changed);
        assert_eq!(again, new);
        // A changed setting replaces the entry, still last.
        let (open, changed) = with_entry(
            &new,
            true,
            "10-calico.conflist",
            &Entry {
                fail_open: true,
                ..entry()
            },
        )
        .unwrap();
        assert!(changed);
        assert_eq!(open["plugins"].as_array().unwrap().len(), 4);
        assert_eq!(open["plugins"][3]["failOpen"], true);
        assert_eq!(without_entry(&open), Without::List(conf.clone()));
        assert_eq!(without_entry(&conf), Without::Absent);
    }

    #[test]
    fn bad_configs_are_named() {
        for (bad, list, what) in [
            ("[]", true, "not a JSON object"),
            ("[]", false, "not a JSON object"),
            (r#"{"name":"x"}"#, true, "no \"plugins\" list"),
            (r#"{"name":"x"}"#, false, "no \"type\""),
            (r#"{"name":"x","plugins":{}}"#, true, "not a list"),
            (r#"{"name":"x","plugins":[]}"#, true, "empty"),
            (
                r#"{"name":"x","plugins":[1]}"#,
                true,
                "plugins[0] is not a plugin",
            ),
            (
                r#"{"name":"x","plugins":[{"a":1}]}"#,
                true,
                "plugins[0] has no \"type\"",
            ),
            (r#"{"plugins":[{"type":"bridge"}]}"#, true, "no \"name\""),
            (
                r#"{"name":"x","plugins":[{"type":"weir-cni"}]}"#,
                true,
                "no plugin but weir-cni",
            ),
            (
                r#"{"name":"x","plugins":[{"type":"bridge"}]}"#,
                false,
                "rename it to .conflist",
            ),
        ] {
            let e =
                with_entry(&serde_json::from_str(bad).unwrap(), list, "f", &entry()).unwrap_err();
            assert!(e.contains(what), "{bad}: {e}");
        }
    }

    fn names(dir: &Path) -> Vec<String> {
        let mut n: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        n.sort();
        n
    }

    fn read(p: &Path) -> Value {
        serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
    }

    #[test]
    fn installs_into_the_first_file_and_converts_a_single_plugin() {
        let d = TempDir::new("cni");
        let dir = d.path();
        assert_eq!(install_config(dir, &entry()).unwrap(), Installed::NoConfig);
        let flannel = r#"{"name":"cbr0","cniVersion":"0.3.1","type":"flannel","delegate":{"isDefaultGateway":true}}"#;
        std::fs::write(dir.join("10-flannel.conf"), flannel).unwrap();
        std::fs::write(dir.join("99-other.conflist"), CALICO).unwrap();
        std::fs::write(dir.join(".hidden.conflist"), CALICO).unwrap();
        std::fs::write(dir.join("calico-kubeconfig"), "not json").unwrap();
        let got = install_config(dir, &entry()).unwrap();
        let list = dir.join("10-flannel.conflist");
        assert_eq!(got, Installed::Written(list.clone()));
        assert!(!dir.join("10-flannel.conf").exists());
        let v = read(&list);
        assert_eq!(v["name"], "cbr0");
        assert_eq!(v["cniVersion"], "0.3.1");
        assert_eq!(types(&v), ["flannel", "weir-cni"]);
        // The plugin as libcni's ConfListFromConf puts it in the list.
        assert_eq!(
            v["plugins"][0],
            serde_json::from_str::<Value>(flannel).unwrap()
        );
        assert_eq!(v["plugins"][1][RESTORE_FILE], "10-flannel.conf");
        assert_eq!(
            install_config(dir, &entry()).unwrap(),
            Installed::Unchanged(list.clone())
        );
        // No temporary files are left for the runtime to trip over.
        assert!(!names(dir).iter().any(|n| n.contains("weir-tmp")));
        // Uninstall gives the original file back, and only it.
        let other_before = std::fs::read(dir.join("99-other.conflist")).unwrap();
        assert_eq!(
            uninstall_config(dir).unwrap(),
            vec![dir.join("10-flannel.conf")]
        );
        assert_eq!(
            read(&dir.join("10-flannel.conf")),
            serde_json::from_str::<Value>(flannel).unwrap()
        );
        assert!(!list.exists());
        assert_eq!(
            std::fs::read(dir.join("99-other.conflist")).unwrap(),
            other_before
        );
        assert!(uninstall_config(dir).unwrap().is_empty());

        // The network plugin rewrites its list: weir's entry comes back.
        std::fs::remove_file(dir.join("10-flannel.conf")).unwrap();
        install_config(dir, &entry()).unwrap();
        std::fs::write(dir.join("99-other.conflist"), CALICO).unwrap();
        assert_eq!(
            install_config(dir, &entry()).unwrap(),
            Installed::Written(dir.join("99-other.conflist"))
        );
    }

    #[test]
    fn uninstall_cleans_conf_and_json_files_too() {
        let d = TempDir::new("cniun");
        let dir = d.path();
        // What older versions (or a hand edit) left: weir inside .json and
        // .conf files that carry a list, and in a .conflist.
        let with_weir = |name: &str| {
            json!({"cniVersion": "0.4.0", "name": name, "plugins": [
                {"type": "bridge", "bridge": "cni0"},
                {"type": "weir-cni", "socket": "/var/run/weir/cni.sock"}]})
        };
        for f in ["10-a.json", "20-b.conf", "30-c.conflist"] {
            std::fs::write(dir.join(f), with_weir(f).to_string()).unwrap();
        }
        std::fs::write(dir.join("40-empty.conf"), "").unwrap();
        let mut got = uninstall_config(dir).unwrap();
        got.sort();
        assert_eq!(
            got,
            ["10-a.json", "20-b.conf", "30-c.conflist"].map(|f| dir.join(f))
        );
        for f in ["10-a.json", "20-b.conf", "30-c.conflist"] {
            let v = read(&dir.join(f));
            assert_eq!(types(&v), ["bridge"], "{f}");
        }
        assert!(uninstall_config(dir).unwrap().is_empty());
        assert_eq!(std::fs::read(dir.join("40-empty.conf")).unwrap(), b"");
    }

    #[test]
    fn an_original_rewritten_meanwhile_wins_over_weirs_copy() {
        let d = TempDir::new("cnirw");
        let dir = d.path();
        std::fs::write(
            dir.join("10-x.conf"),
            r#"{"name":"n","type":"bridge","v":1}"#,
        )
        .unwrap();
        install_config(dir, &entry()).unwrap();
        std::fs::write(
            dir.join("10-x.conf"),
            r#"{"name":"n","type":"bridge","v":2}"#,
        )
        .unwrap();
        uninstall_config(dir).unwrap();
        assert_eq!(names(dir), ["10-x.conf"]);
        assert_eq!(read(&dir.join("10-x.conf"))["v"], 2);
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

    /// The configurations istio-cni's and linkerd-cni's installers are
    /// tested on (`../shared/reference/peers/cni-configs`, read in place).
    fn peer_configs() -> Vec<PathBuf> {
        let root =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/reference/peers/cni-configs");
        let mut files = Vec::new();
        for mesh in ["istio", "linkerd"] {
            let dir = root.join(mesh);
            let rd = std::fs::read_dir(&dir).unwrap_or_else(|e| {
                panic!(
                    "{}: {e}; the peers' CNI configurations are part of the reference material (../shared/reference/peers relative to the project root)",
                    dir.display()
                )
            });
            files.extend(rd.flatten().map(|e| e.path()));
        }
        files.sort();
        assert!(files.len() >= 12, "{files:?}");
        files
    }

    #[test]
    fn peer_configs_round_trip_or_are_refused_untouched() {
        let mut round_trips = 0;
        let mut refused = 0;
        for src in peer_configs() {
            let name = src.file_name().unwrap().to_str().unwrap().to_string();
            let bytes = std::fs::read(&src).unwrap();
            // As the primary configuration of a node: under its own name
            // when that is a CNI file name, else as a .conf.
            let as_name = if matches!(
                src.extension().and_then(|e| e.to_str()),
                Some("conf" | "conflist" | "json")
            ) {
                name.clone()
            } else {
                format!("{name}.conf")
            };
            let d = TempDir::new("cnipeer");
            let dir = d.path();
            let path = dir.join(&as_name);
            std::fs::write(&path, &bytes).unwrap();
            let original: Option<Value> = serde_json::from_slice(&bytes).ok();
            match install_config(dir, &entry()) {
                Ok(Installed::Written(p)) => {
                    round_trips += 1;
                    let chained = read(&p);
                    assert!(is_list_file(&p), "{name}: written to {}", p.display());
                    let plugins = chained["plugins"].as_array().unwrap();
                    assert_eq!(plugins.last().unwrap()["type"], PLUGIN, "{name}");
                    assert_eq!(
                        plugins.iter().filter(|p| p["type"] == PLUGIN).count(),
                        1,
                        "{name}"
                    );
                    assert!(chained["name"].is_string() && chained["cniVersion"].is_string());
                    // What the runtime then runs first is the network
                    // plugin, as before.
                    let orig = original.clone().unwrap();
                    let first = if orig.get("plugins").is_some() {
                        orig["plugins"][0].clone()
                    } else {
                        orig.clone()
                    };
                    assert_eq!(plugins[0], first, "{name}");
                    if p != path {
                        assert!(!path.exists(), "{name}: the single-plugin file stays");
                    }
                    assert_eq!(names(dir).len(), 1, "{name}: {:?}", names(dir));
                    uninstall_config(dir).unwrap();
                    assert_eq!(names(dir), std::slice::from_ref(&as_name), "{name}");
                    assert_eq!(
                        read(&path),
                        orig,
                        "{name}: not the original after uninstall"
                    );
                }
                Ok(other) => panic!("{name}: {other:?}"),
                Err(e) => {
                    refused += 1;
                    let msg = e.to_string();
                    assert!(matches!(e, InstallError::BadConfig { .. }), "{name}: {msg}");
                    assert!(msg.contains(&as_name), "{name}: {msg}");
                    assert_eq!(std::fs::read(&path).unwrap(), bytes, "{name} was touched");
                    assert_eq!(names(dir), std::slice::from_ref(&as_name), "{name}");
                }
            }
        }
        // istio: bridge.conf and three lists; linkerd: the Calico .conf and
        // .conflist and linkerd-cni's own single-plugin .json.
        assert_eq!(round_trips, 7, "configurations chained");
        // [], {}, {"plugins":[1,2,3]}, {}, and the zero-byte file.
        assert_eq!(refused, 5, "configurations refused");
    }

    #[test]
    fn refusals_say_what_is_wrong() {
        let d = TempDir::new("cnibad");
        let dir = d.path();
        for (file, text, what) in [
            ("05-zero.conf", "", "the file is empty"),
            ("05-arr.conflist", "[]", "not a JSON object (got a list)"),
            ("05-map.conflist", "{}", "no \"plugins\" list"),
            ("05-json.json", "{}", "no \"type\""),
            (
                "05-plugins.json",
                r#"{"plugins":[1,2,3]}"#,
                "rename it to .conflist",
            ),
            ("05-trunc.conflist", "{\"name\":", "not JSON"),
        ] {
            std::fs::write(dir.join(file), text).unwrap();
            let e = install_config(dir, &entry()).unwrap_err().to_string();
            assert!(e.contains(file) && e.contains(what), "{file}: {e}");
            assert_eq!(std::fs::read_to_string(dir.join(file)).unwrap(), text);
            std::fs::remove_file(dir.join(file)).unwrap();
        }
    }
}
