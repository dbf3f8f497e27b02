//! Named network namespaces (`ip netns`) and veth pairs between them.

use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Output;

use nix::mount::{MntFlags, MsFlags, mount, umount2};
use nix::sched::{CloneFlags, setns, unshare};

use crate::{cmd, unique_name};

/// Where `ip netns` keeps the bind mounts that name network namespaces.
const NETNS_DIR: &str = "/var/run/netns";

/// A named network namespace created with `ip netns add`, with `lo` up.
///
/// Dropping it runs `ip netns del`; the namespace itself (and the veth ends
/// in it) goes away once no process and no open file refers to it any more.
#[derive(Debug)]
pub struct NetNs {
    name: String,
    path: PathBuf,
}

impl NetNs {
    /// Creates a network namespace named [`unique_name`]`(prefix)` and brings
    /// its loopback interface up. Panics when `ip` fails.
    pub fn new(prefix: &str) -> NetNs {
        let name = unique_name(prefix);
        cmd::run("ip", &["netns", "add", &name]);
        // The guard exists from here on, so a failure below still deletes
        // the namespace.
        let ns = NetNs {
            path: Path::new(NETNS_DIR).join(&name),
            name,
        };
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    /// The namespace's name (for `ip netns exec` / `ip -n`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The namespace's file, `/var/run/netns/NAME`: open it to `setns` or to
    /// attach programs that take a network namespace (`sk_lookup`).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Opens the namespace file read-only. Panics when it cannot.
    pub fn open(&self) -> File {
        File::open(&self.path)
            .unwrap_or_else(|e| panic!("opening netns file {}: {e}", self.path.display()))
    }

    /// The namespace's inode number, as `ip netns identify` and
    /// `/proc/PID/ns/net` show it.
    pub fn inode(&self) -> u64 {
        std::fs::metadata(&self.path)
            .unwrap_or_else(|e| panic!("stat {}: {e}", self.path.display()))
            .ino()
    }

    /// The namespace's cookie, as `bpf_get_netns_cookie()` returns it to
    /// programs running for sockets in this namespace (read with
    /// `SO_NETNS_COOKIE` on a socket created inside it).
    pub fn cookie(&self) -> u64 {
        self.run_in(|| {
            let sock = std::net::UdpSocket::bind((std::net::Ipv4Addr::LOCALHOST, 0))
                .unwrap_or_else(|e| panic!("creating a socket to read the netns cookie: {e}"));
            crate::net::netns_cookie(&sock)
                .unwrap_or_else(|e| panic!("getsockopt(SO_NETNS_COOKIE): {e}"))
        })
    }

    /// Runs `ip netns exec NAME args…` and returns its output, whatever the
    /// exit status (panics only when `ip` cannot be started).
    pub fn exec(&self, args: &[&str]) -> Output {
        let mut full = vec!["netns", "exec", &self.name];
        full.extend_from_slice(args);
        cmd::output("ip", &full)
    }

    /// Like [`NetNs::exec`], but panics with stderr unless the command
    /// succeeds; returns its stdout.
    pub fn exec_ok(&self, args: &[&str]) -> String {
        let mut full = vec!["netns", "exec", &self.name];
        full.extend_from_slice(args);
        cmd::run("ip", &full)
    }

    /// Runs `ip -n NAME args…` (for example `ns.ip(&["route", "add",
    /// "default", "via", "198.18.0.1"])`), panicking unless it succeeds;
    /// returns its stdout.
    pub fn ip(&self, args: &[&str]) -> String {
        let mut full = vec!["-n", &self.name];
        full.extend_from_slice(args);
        cmd::run("ip", &full)
    }

    /// Runs `f` on a new thread that has joined this network namespace, and
    /// returns its result; a panic in `f` is passed on.
    ///
    /// Sockets created by `f` stay in this namespace after it returns, so
    /// this is how a test opens a listener or dials from inside a namespace
    /// without a child process. The calling thread's namespace is never
    /// changed (only the short-lived helper thread's).
    pub fn run_in<R: Send>(&self, f: impl FnOnce() -> R + Send) -> R {
        run_in_netns(&self.path, f).unwrap_or_else(|e| panic!("entering netns {}: {e}", self.name))
    }
}

/// Runs `f` on a new thread that has joined the network namespace whose
/// file is `netns` (`/var/run/netns/NAME`, `/proc/PID/ns/net`), and
/// returns its result; a panic in `f` is passed on. The calling thread's
/// namespace is never changed. Fails when the namespace cannot be
/// opened or joined.
pub fn run_in_netns<R: Send>(netns: &Path, f: impl FnOnce() -> R + Send) -> std::io::Result<R> {
    let file = File::open(netns).map_err(|e| annotate(e, "opening netns file", netns))?;
    std::thread::scope(|s| {
        s.spawn(move || {
            setns(&file, CloneFlags::CLONE_NEWNET)
                .map_err(|e| annotate(e.into(), "setns into", netns))?;
            Ok(f())
        })
        .join()
        .unwrap_or_else(|p| std::panic::resume_unwind(p))
    })
}

/// Runs `ip args…`; the error quotes the command and its stderr (for
/// callers that report rather than panic, such as the demo).
pub fn try_ip(args: &[&str]) -> std::io::Result<String> {
    cmd::try_run("ip", args)
}

impl NetNs {
    /// Writes per-namespace sysctls (`("net/ipv4/tcp_tw_reuse", "1")`,
    /// paths under `/proc/sys`) inside this namespace; the machine's own
    /// are never touched. The error names the sysctl.
    pub fn set_sysctls(&self, sysctls: &[(&str, &str)]) -> std::io::Result<()> {
        self.run_in(|| {
            // /proc/sys/net is resolved against the opening thread's
            // network namespace, which run_in has switched.
            for (key, value) in sysctls {
                let path = Path::new("/proc/sys").join(key);
                std::fs::write(&path, value).map_err(|e| {
                    std::io::Error::new(e.kind(), format!("writing {}: {e}", path.display()))
                })?;
            }
            Ok(())
        })
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        if !cmd::quiet("ip", &["netns", "del", &self.name]) {
            eprintln!("weir-tests: `ip netns del {}` failed", self.name);
        }
    }
}

/// A veth pair made by [`veth_pair`]. Dropping it deletes the pair (if its
/// namespace still exists; deleting a namespace deletes its veth ends too).
#[derive(Debug)]
pub struct Veth {
    a_ns: String,
    a_name: String,
    b_name: String,
}

impl Veth {
    /// Name of the end in the first namespace.
    pub fn a_name(&self) -> &str {
        &self.a_name
    }

    /// Name of the end in the second namespace.
    pub fn b_name(&self) -> &str {
        &self.b_name
    }
}

impl Drop for Veth {
    fn drop(&mut self) {
        if Path::new(NETNS_DIR).join(&self.a_ns).exists() {
            // Fails harmlessly when the pair is already gone.
            cmd::quiet("ip", &["-n", &self.a_ns, "link", "del", &self.a_name]);
        }
    }
}

/// Creates a veth pair with unique names, one end in `a` and the other in
/// `b`, adds the addresses (CIDR notation such as `"198.18.0.1/24"` or
/// `"2001:2::1/64"`; IPv6 ones with `nodad` so they are usable at once) and
/// sets both ends up.
///
/// Either namespace can play the pod, the node or another node: to model
/// the host side of a pod, create a `NetNs` for "the node" and pass it as
/// `b`. Routes are up to the caller (`NetNs::ip`). The pair is created
/// inside `a`, never in the namespace the tests run in. Panics when `ip`
/// fails.
pub fn veth_pair(a: &NetNs, a_addrs: &[&str], b: &NetNs, b_addrs: &[&str]) -> Veth {
    veth_named(
        a,
        &unique_name("va"),
        a_addrs,
        b,
        &unique_name("vb"),
        b_addrs,
    )
}

/// Like [`veth_pair`], with the ends named `a_name` and `b_name` (names
/// the code under test looks for, e.g. a pod's `eth0` or `k6t-eth0`; they
/// only need to be unique inside their namespaces).
pub fn veth_named(
    a: &NetNs,
    a_name: &str,
    a_addrs: &[&str],
    b: &NetNs,
    b_name: &str,
    b_addrs: &[&str],
) -> Veth {
    let veth = Veth {
        a_ns: a.name().to_owned(),
        a_name: a_name.to_owned(),
        b_name: b_name.to_owned(),
    };
    a.ip(&[
        "link",
        "add",
        &veth.a_name,
        "type",
        "veth",
        "peer",
        "name",
        &veth.b_name,
        "netns",
        b.name(),
    ]);
    for (ns, dev, addrs) in [(a, &veth.a_name, a_addrs), (b, &veth.b_name, b_addrs)] {
        for &addr in addrs {
            let mut args = vec!["addr", "add", addr, "dev", dev.as_str()];
            if addr.contains(':') {
                args.push("nodad");
            }
            ns.ip(&args);
        }
        ns.ip(&["link", "set", dev, "up"]);
    }
    veth
}

/// A "node": a network namespace holding a bridge `br0` that pods hang
/// off, each by a veth pair ([`Bridge::attach`]). Dropping it deletes the
/// namespace (and with it the bridge and the node ends of the pairs).
#[derive(Debug)]
pub struct Bridge {
    ns: NetNs,
}

impl Bridge {
    /// A new namespace named [`unique_name`]`(prefix)` with `br0` up.
    pub fn new(prefix: &str) -> Bridge {
        let ns = NetNs::new(prefix);
        ns.ip(&["link", "add", "br0", "type", "bridge"]);
        ns.ip(&["link", "set", "br0", "up"]);
        Bridge { ns }
    }

    /// The node's namespace.
    pub fn ns(&self) -> &NetNs {
        &self.ns
    }

    /// Connects `pod` to the bridge with a veth pair whose pod end has
    /// `addr` (CIDR notation).
    pub fn attach(&self, pod: &NetNs, addr: &str) -> Veth {
        let veth = veth_pair(pod, &[addr], &self.ns, &[]);
        self.ns.ip(&["link", "set", veth.b_name(), "master", "br0"]);
        veth
    }
}

/// A network namespace kept alive by a bind mount on a plain file (what
/// `ip netns add` does, without starting `ip`): the benchmark and the soak
/// make thousands. It has only `lo` (down). Dropping it unmounts and
/// removes the file; the namespace goes once no process is left in it.
#[derive(Debug)]
pub struct NsFile {
    path: PathBuf,
    mounted: bool,
}

impl NsFile {
    /// A new network namespace bound on `path` (created).
    pub fn create(path: &Path) -> std::io::Result<NsFile> {
        let mut all = NsFile::create_all(std::slice::from_ref(&path.to_path_buf()), &|| false)?;
        Ok(all.pop().expect("one namespace made"))
    }

    /// A new network namespace bound on each of `paths`, made by one
    /// helper thread in turn; `stop` is asked every 50 namespaces and ends
    /// the work with an `Interrupted` error (the namespaces made so far
    /// are removed again).
    pub fn create_all(
        paths: &[PathBuf],
        stop: &(dyn Fn() -> bool + Sync),
    ) -> std::io::Result<Vec<NsFile>> {
        // unshare() moves only the calling thread: a short-lived thread
        // makes the namespaces, the process stays where it is.
        std::thread::scope(|s| {
            s.spawn(|| {
                let mut made = Vec::with_capacity(paths.len());
                for (i, path) in paths.iter().enumerate() {
                    if i % 50 == 0 && stop() {
                        return Err(std::io::Error::new(
                            std::io::ErrorKind::Interrupted,
                            "interrupted",
                        ));
                    }
                    File::create(path).map_err(|e| annotate(e, "creating", path))?;
                    let mut ns = NsFile {
                        path: path.clone(),
                        mounted: false,
                    };
                    unshare(CloneFlags::CLONE_NEWNET)
                        .map_err(|e| annotate(e.into(), "unshare(CLONE_NEWNET) for", path))?;
                    mount(
                        Some("/proc/thread-self/ns/net"),
                        path,
                        None::<&str>,
                        MsFlags::MS_BIND,
                        None::<&str>,
                    )
                    .map_err(|e| annotate(e.into(), "bind-mounting a netns on", path))?;
                    ns.mounted = true;
                    made.push(ns);
                }
                Ok(made)
            })
            .join()
            .unwrap_or_else(|p| std::panic::resume_unwind(p))
        })
    }

    /// The namespace file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Unmounts and removes the file: the pod's network namespace is
    /// deleted (as `ip netns del` does).
    pub fn delete(&mut self) {
        if self.mounted {
            let _ = umount2(&self.path, MntFlags::MNT_DETACH);
            self.mounted = false;
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

impl Drop for NsFile {
    fn drop(&mut self) {
        self.delete();
    }
}

fn annotate(e: std::io::Error, what: &str, path: &Path) -> std::io::Error {
    std::io::Error::new(e.kind(), format!("{what} {}: {e}", path.display()))
}
