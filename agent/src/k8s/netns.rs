//! Finding a pod's network namespace on the node from its UID.
//!
//! Every container of a pod runs in a cgroup whose path names the pod UID,
//! under either cgroup driver and whatever the runtime:
//!
//! | layout | a process's `/proc/PID/cgroup` line |
//! |---|---|
//! | cgroupfs (containerd, k3s) | `0::/kubepods/burstable/pod<uid>/<container id>` |
//! | cgroupfs, Guaranteed QoS | `0::/kubepods/pod<uid>/<container id>` |
//! | systemd + containerd | `0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod<uid with _>.slice/cri-containerd-<id>.scope` |
//! | systemd + CRI-O | `0::/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod<uid with _>.slice/crio-<id>.scope` |
//! | cgroupfs + CRI-O | `0::/kubepods/besteffort/pod<uid>/crio-<id>` |
//! | kind (`--cgroup-root=/kubelet`) | `0::/kubelet.slice/kubelet-kubepods.slice/…-pod<uid>.slice/…` |
//! | cgroup v1 | one line per hierarchy, e.g. `4:memory:/kubepods/besteffort/pod<uid>/<id>` |
//! | agent in its own cgroup namespace | the same paths after `/../..` |
//!
//! So the agent reads `/proc/*/cgroup` of the host (`--host-proc`, with
//! `hostPID: true` simply `/proc`), finds a process of the pod, and uses its
//! `/proc/PID/ns/net`. Two kinds of processes sit in a pod's cgroup but not
//! in its network namespace, and are skipped: CRI-O's `conmon` (its
//! `crio-conmon-<id>.scope`) and anything else still in the host's network
//! namespace (compared by inode with `/proc/1/ns/net`).
//!
//! A path found once is reused while its process still belongs to the pod
//! (a PID can be reused), so the path the reconciler sees stays stable and
//! a pass costs one `/proc` scan only when a pod is new or its process
//! went away.

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;

/// Normalises a UID as it appears in a cgroup path (systemd escapes `-` as
/// `_`) to the API's form.
pub fn normalize(uid: &str) -> String {
    uid.trim().replace('_', "-").to_ascii_lowercase()
}

/// Whether `s` can be a pod UID: a UUID (36) or a static pod's config hash
/// (32 hex digits), with `-` or systemd's `_`.
fn looks_like_uid(s: &str) -> bool {
    (32..=36).contains(&s.len())
        && s.chars()
            .all(|c| c.is_ascii_hexdigit() || c == '-' || c == '_')
}

/// The pod UID named by one cgroup path segment, in API form.
fn uid_in_segment(seg: &str) -> Option<String> {
    // systemd driver: `…-pod<uid_with_underscores>.slice`.
    if let Some(stem) = seg.strip_suffix(".slice")
        && let Some(at) = stem.rfind("-pod")
    {
        let uid = &stem[at + 4..];
        return looks_like_uid(uid).then(|| normalize(uid));
    }
    // cgroupfs driver: `pod<uid>`.
    let uid = seg.strip_prefix("pod")?;
    looks_like_uid(uid).then(|| normalize(uid))
}

/// What one process's `/proc/PID/cgroup` says about pods: the pod UID, and
/// whether the process is CRI-O's conmon (in the pod's cgroup but the
/// host's network namespace).
#[derive(Debug, PartialEq, Eq)]
pub struct CgroupInfo {
    /// The pod UID (API form).
    pub uid: String,
    /// A `conmon` process.
    pub conmon: bool,
}

/// Parses `/proc/PID/cgroup` text; `None` when no line names a pod.
pub fn parse_proc_cgroup(text: &str) -> Option<CgroupInfo> {
    for line in text.lines() {
        // hierarchy-ID:controller-list:cgroup-path
        let Some(path) = line.splitn(3, ':').nth(2) else {
            continue;
        };
        let segs: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
        for (i, seg) in segs.iter().enumerate() {
            if let Some(uid) = uid_in_segment(seg) {
                let conmon = segs[i + 1..].iter().any(|s| s.contains("conmon"));
                return Some(CgroupInfo { uid, conmon });
            }
        }
    }
    None
}

/// Finds pods' network namespaces through the host's `/proc`.
#[derive(Debug)]
pub struct Discovery {
    host_proc: PathBuf,
    /// Pod UID -> the PID whose netns was used last time.
    cache: BTreeMap<String, u32>,
}

impl Discovery {
    /// Discovery over `host_proc` (the host's `/proc`).
    pub fn new(host_proc: impl Into<PathBuf>) -> Self {
        Self {
            host_proc: host_proc.into(),
            cache: BTreeMap::new(),
        }
    }

    fn net_path(&self, pid: u32) -> PathBuf {
        self.host_proc.join(pid.to_string()).join("ns/net")
    }

    fn cgroup_of(&self, pid: u32) -> Option<CgroupInfo> {
        let text =
            std::fs::read_to_string(self.host_proc.join(pid.to_string()).join("cgroup")).ok()?;
        parse_proc_cgroup(&text)
    }

    fn netns_inode(&self, pid: u32) -> Option<u64> {
        std::fs::metadata(self.net_path(pid)).ok().map(|m| m.ino())
    }

    /// The network namespace of each pod in `uids` (cgroup UIDs) that has
    /// a process on this node, by normalised UID; pods without one are left
    /// out. Fails only when the host's `/proc` cannot be read at all (then
    /// nothing can be concluded about any pod).
    pub fn resolve(
        &mut self,
        uids: &BTreeSet<String>,
    ) -> std::io::Result<BTreeMap<String, PathBuf>> {
        let uids: BTreeSet<String> = uids.iter().map(|u| normalize(u)).collect();
        self.cache.retain(|uid, _| uids.contains(uid));
        let host_ns = self.netns_inode(1);
        let mut out = BTreeMap::new();
        let mut missing: BTreeSet<String> = BTreeSet::new();
        for uid in uids {
            let still_valid = self.cache.get(&uid).copied().filter(|pid| {
                self.cgroup_of(*pid)
                    .is_some_and(|c| c.uid == uid && !c.conmon)
                    && self.netns_inode(*pid).is_some_and(|i| Some(i) != host_ns)
            });
            match still_valid {
                Some(pid) => {
                    out.insert(uid, self.net_path(pid));
                }
                None => {
                    missing.insert(uid);
                }
            }
        }
        if missing.is_empty() {
            return Ok(out);
        }
        for (uid, pid) in self.scan(&missing, host_ns)? {
            out.insert(uid.clone(), self.net_path(pid));
            self.cache.insert(uid, pid);
        }
        Ok(out)
    }

    /// One pass over `/proc`: the lowest PID of each wanted pod that is in
    /// the pod's own network namespace.
    fn scan(
        &self,
        wanted: &BTreeSet<String>,
        host_ns: Option<u64>,
    ) -> std::io::Result<BTreeMap<String, u32>> {
        let mut found = BTreeMap::new();
        let dir = std::fs::read_dir(&self.host_proc)?;
        let mut pids: Vec<u32> = dir
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse().ok())
            .collect();
        pids.sort_unstable();
        for pid in pids {
            let Some(info) = self.cgroup_of(pid) else {
                continue;
            };
            if info.conmon || found.contains_key(&info.uid) || !wanted.contains(&info.uid) {
                continue;
            }
            match self.netns_inode(pid) {
                Some(ino) if Some(ino) != host_ns => {
                    found.insert(info.uid, pid);
                }
                // The host's netns (a runtime helper), or a process that
                // just exited or is not ours to inspect.
                _ => {}
            }
            if found.len() == wanted.len() {
                break;
            }
        }
        Ok(found)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::TempDir;
    use std::path::Path;

    const UID: &str = "3f1c8f0e-5d2a-4b1e-9a53-0c6b1b0f7c11";
    const UID_: &str = "3f1c8f0e_5d2a_4b1e_9a53_0c6b1b0f7c11";

    #[test]
    fn every_cgroup_layout() {
        let layouts = [
            // cgroupfs driver, containerd, cgroup v2
            format!("0::/kubepods/burstable/pod{UID}/0b4c2d9f1e"),
            // Guaranteed QoS has no QoS level
            format!("0::/kubepods/pod{UID}/0b4c2d9f1e"),
            // systemd driver + containerd
            format!(
                "0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice/cri-containerd-0b4c2d9f1e.scope"
            ),
            format!("0::/kubepods.slice/kubepods-pod{UID_}.slice/cri-containerd-0b4c.scope"),
            // systemd driver + CRI-O
            format!(
                "0::/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{UID_}.slice/crio-0b4c2d9f1e.scope"
            ),
            // cgroupfs + CRI-O
            format!("0::/kubepods/besteffort/pod{UID}/crio-0b4c2d9f1e"),
            // k3s (cgroupfs, containerd) on cgroup v1: many hierarchies
            format!(
                "12:pids:/kubepods/besteffort/pod{UID}/0b4c\n11:memory:/kubepods/besteffort/pod{UID}/0b4c\n1:name=systemd:/kubepods/besteffort/pod{UID}/0b4c\n0::/"
            ),
            // kind: kubelet's --cgroup-root=/kubelet, systemd driver
            format!(
                "0::/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-besteffort.slice/kubelet-kubepods-besteffort-pod{UID_}.slice/cri-containerd-0b4c.scope"
            ),
            // the agent in a private cgroup namespace sees relative paths
            format!("0::/../../kubepods/burstable/pod{UID}/0b4c"),
            // Docker (cri-dockerd), systemd driver
            format!(
                "0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice/docker-0b4c.scope"
            ),
        ];
        for text in &layouts {
            assert_eq!(
                parse_proc_cgroup(text),
                Some(CgroupInfo {
                    uid: UID.to_string(),
                    conmon: false
                }),
                "{text}"
            );
        }
        let conmon = format!(
            "0::/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{UID_}.slice/crio-conmon-0b4c.scope"
        );
        assert!(parse_proc_cgroup(&conmon).unwrap().conmon);
        // A static pod's config hash.
        let hash = "0::/kubepods/burstable/pod9b7e0c3c6b0d4e3fa3a1f4b2c7d8e9f0/0b4c";
        assert_eq!(
            parse_proc_cgroup(hash).unwrap().uid,
            "9b7e0c3c6b0d4e3fa3a1f4b2c7d8e9f0"
        );
    }

    #[test]
    fn non_pod_cgroups() {
        for text in [
            "0::/",
            "0::/system.slice/containerd.service",
            "0::/kubepods.slice/kubepods-burstable.slice",
            "0::/user.slice/user-1000.slice/session-2.scope",
            "0::/machine.slice/libpod-0b4c.scope",
            "0::/kubepods/podnotauid/x",
            "garbage without colons",
            "",
        ] {
            assert_eq!(parse_proc_cgroup(text), None, "{text}");
        }
    }

    #[test]
    fn cni_paths_as_the_agent_sees_them() {
        use crate::cni::agent_view_of;
        let hp = Path::new("/host/proc");
        assert_eq!(
            agent_view_of(hp, Path::new("/proc/4242/ns/net")),
            Path::new("/host/proc/4242/ns/net")
        );
        assert_eq!(
            agent_view_of(hp, Path::new("/var/run/netns/cni-1234")),
            Path::new("/var/run/netns/cni-1234")
        );
        assert_eq!(
            agent_view_of(Path::new("/proc"), Path::new("/proc/1/ns/net")),
            Path::new("/proc/1/ns/net")
        );
    }

    /// A fake host /proc: `proc(pid, cgroup text, netns name)`; processes
    /// with the same netns name share one netns file (hard links, so the
    /// inodes match as they would for real namespaces).
    struct FakeProc {
        dir: TempDir,
    }

    impl FakeProc {
        fn new() -> Self {
            let f = FakeProc {
                dir: TempDir::new("proc"),
            };
            std::fs::create_dir_all(f.dir.path().join("netns")).unwrap();
            f.proc(1, "0::/init.scope", "host");
            f
        }

        fn proc(&self, pid: u32, cgroup: &str, netns: &str) {
            let p = self.dir.path().join(pid.to_string());
            std::fs::create_dir_all(p.join("ns")).unwrap();
            std::fs::write(p.join("cgroup"), cgroup).unwrap();
            let ns = self.dir.path().join("netns").join(netns);
            if !ns.exists() {
                std::fs::write(&ns, netns).unwrap();
            }
            let _ = std::fs::remove_file(p.join("ns/net"));
            std::fs::hard_link(&ns, p.join("ns/net")).unwrap();
        }

        fn kill(&self, pid: u32) {
            std::fs::remove_dir_all(self.dir.path().join(pid.to_string())).unwrap();
        }

        fn root(&self) -> &Path {
            self.dir.path()
        }
    }

    fn uids(u: &[&str]) -> BTreeSet<String> {
        u.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn finds_pods_under_both_drivers_and_skips_host_netns() {
        let p = FakeProc::new();
        let a = "aaaaaaaa-0000-4000-8000-000000000001";
        let b = "bbbbbbbb-0000-4000-8000-000000000002";
        let c = "cccccccc-0000-4000-8000-000000000003";
        // Pod a (systemd + CRI-O): conmon (pid 10, host netns) first,
        // then the pause/infra process and the app.
        let a_ = a.replace('-', "_");
        p.proc(
            10,
            &format!("0::/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{a_}.slice/crio-conmon-1.scope"),
            "host",
        );
        p.proc(
            11,
            &format!("0::/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{a_}.slice/crio-1.scope"),
            "pod-a",
        );
        p.proc(
            12,
            &format!("0::/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{a_}.slice/crio-2.scope"),
            "pod-a",
        );
        // Pod b (cgroupfs + containerd): a helper still in the host netns
        // (pid 20), then the pod's processes.
        p.proc(20, &format!("0::/kubepods/burstable/pod{b}/x"), "host");
        p.proc(21, &format!("0::/kubepods/burstable/pod{b}/pause"), "pod-b");
        // Pod c has no process on this node.
        p.proc(30, "0::/system.slice/kubelet.service", "host");

        let mut d = Discovery::new(p.root());
        let found = d.resolve(&uids(&[a, b, c])).unwrap();
        assert_eq!(found.len(), 2, "{found:?}");
        assert_eq!(found[a], p.root().join("11/ns/net"));
        assert_eq!(found[b], p.root().join("21/ns/net"));

        // The infra process exits: the next pass moves to the app's pid.
        p.kill(11);
        let found = d.resolve(&uids(&[a, b])).unwrap();
        assert_eq!(found[a], p.root().join("12/ns/net"));
        // A reused PID now in another pod is not mistaken for pod b.
        p.kill(21);
        p.proc(21, &format!("0::/kubepods/burstable/pod{c}/x"), "pod-c");
        let found = d.resolve(&uids(&[a, b])).unwrap();
        assert!(!found.contains_key(b), "{found:?}");
        // UIDs given in systemd form are normalised.
        let found = d.resolve(&uids(&[&a_])).unwrap();
        assert_eq!(found[a], p.root().join("12/ns/net"));
    }

    #[test]
    fn unreadable_proc_is_an_error_not_an_empty_node() {
        let mut d = Discovery::new("/nonexistent/weir/proc");
        assert!(
            d.resolve(&uids(&["aaaaaaaa-0000-4000-8000-000000000001"]))
                .is_err()
        );
        // Nothing to look for: nothing to read.
        assert!(d.resolve(&BTreeSet::new()).unwrap().is_empty());
    }
}
