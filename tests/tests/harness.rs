//! Self-tests of the kernel test harness: every guard creates what it says
//! and leaves nothing behind when dropped. They need root and skip without
//! it (unless WEIR_REQUIRE_KERNEL_TESTS or CI is set).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::Value;
use weir_tests::{
    Bpffs, Cgroup, NetNs, TempDir, net, require_root, spawn_in, veth_pair, wait_until,
};

const TESTKIT: &str = env!("CARGO_BIN_EXE_weir-testkit");
const TIMEOUT: Duration = Duration::from_secs(10);

fn mounted_at(path: &Path) -> Option<String> {
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap();
    let path = path.to_str().unwrap();
    mounts.lines().find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        (f.get(1) == Some(&path)).then(|| f[2].to_owned())
    })
}

fn netns_listed(name: &str) -> bool {
    let out = Command::new("ip").args(["netns", "list"]).output().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .any(|l| l.split_whitespace().next() == Some(name))
}

fn json_lines(text: &str) -> Vec<Value> {
    text.lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect()
}

#[test]
fn netns_pair_with_veth_carries_traffic_and_is_removed() {
    if !require_root() {
        return;
    }
    let a = NetNs::new("ha");
    let b = NetNs::new("hb");
    let (a_name, b_name) = (a.name().to_owned(), b.name().to_owned());
    assert!(a.path().exists() && netns_listed(&a_name));
    assert_ne!(a.inode(), b.inode());
    assert_ne!(a.cookie(), b.cookie());

    let veth = veth_pair(
        &a,
        &["198.18.0.1/24", "2001:2::1/64"],
        &b,
        &["198.18.0.2/24", "2001:2::2/64"],
    );
    assert!(veth.a_name().len() <= 15 && veth.b_name().len() <= 15);
    let addrs = a.ip(&["-o", "addr", "show", "dev", veth.a_name()]);
    assert!(
        addrs.contains("198.18.0.1/24") && addrs.contains("2001:2::1/64"),
        "{addrs}"
    );
    assert!(a.ip(&["-o", "link", "show", "lo"]).contains("UP"));

    // A listener opened inside b, dialled from inside a, over both families.
    for (listen, dial) in [
        ("198.18.0.2:0", "198.18.0.2"),
        ("[2001:2::2]:0", "2001:2::2"),
    ] {
        let listener = b.run_in(|| TcpListener::bind(listen).unwrap());
        let port = listener.local_addr().unwrap().port();
        let dst = SocketAddr::new(dial.parse().unwrap(), port);
        let mut client = a.run_in(|| net::connect_timeout(None, dst, TIMEOUT).unwrap());
        let (mut server, peer) = listener.accept().unwrap();
        assert_eq!(peer, client.local_addr().unwrap());
        client.write_all(b"x").unwrap();
        let mut buf = [0u8; 1];
        server.read_exact(&mut buf).unwrap();
        // Not reachable from the namespace the tests run in.
        assert!(TcpStream::connect_timeout(&dst, Duration::from_millis(200)).is_err());
    }

    // `exec` runs inside the namespace.
    let out = b.exec_ok(&["ip", "-o", "addr", "show", "dev", veth.b_name()]);
    assert!(out.contains("198.18.0.2/24"), "{out}");

    let a_end = veth.a_name().to_owned();
    drop(veth);
    assert!(!a.ip(&["-o", "link"]).contains(&a_end));
    drop(a);
    drop(b);
    assert!(!netns_listed(&a_name) && !netns_listed(&b_name));
    assert!(!Path::new("/var/run/netns").join(&a_name).exists());
}

#[test]
fn cgroup_kills_its_processes_and_is_removed() {
    if !require_root() {
        return;
    }
    let cg = Cgroup::new("hcg");
    let path = cg.path().to_path_buf();
    assert!(path.join("cgroup.procs").exists());
    assert!(path.starts_with(weir_tests::cgroup2_mount()));
    assert_eq!(
        cg.id(),
        std::fs::metadata(&path)
            .map(|m| {
                use std::os::unix::fs::MetadataExt;
                m.ino()
            })
            .unwrap()
    );

    // A process tree: the shell and a background child, both in the cgroup.
    let mut cmd = Command::new("sh");
    cmd.args(["-c", "sleep 1000 & echo $!; wait"]);
    let mut shell = spawn_in(None, Some(&cg), cmd);
    wait_until(TIMEOUT, "two processes in the cgroup", || {
        cg.procs().len() == 2
    });
    assert!(cg.procs().contains(&(shell.pid() as i32)));
    wait_until(TIMEOUT, "the background pid", || !shell.stdout().is_empty());
    let grandchild: i32 = shell.stdout().trim().parse().unwrap();
    assert!(cg.procs().contains(&grandchild));

    let nested = cg.child("hnest");
    assert!(nested.path().starts_with(&path));

    // Dropping the parent removes the nested cgroup too.
    drop(cg);
    assert!(!path.exists(), "{} still exists", path.display());
    assert!(shell.wait_timeout(TIMEOUT).is_some(), "shell survived");
    // The grandchild was reparented, so it is not ours to reap: it is gone
    // once it no longer exists or only as a zombie.
    wait_until(TIMEOUT, "the background sleep to die", || {
        kill(Pid::from_raw(grandchild), None).is_err()
            || std::fs::read_to_string(format!("/proc/{grandchild}/stat"))
                .is_ok_and(|s| s.contains(") Z "))
    });
    drop(nested); // already removed with its parent: a no-op
}

#[test]
fn bpffs_is_mounted_and_unmounted() {
    if !require_root() {
        return;
    }
    let fs = Bpffs::new();
    let path = fs.path().to_path_buf();
    assert_eq!(mounted_at(&path).as_deref(), Some("bpf"));
    std::fs::create_dir(fs.join("sub")).unwrap(); // bpffs allows directories
    let other = Bpffs::new();
    assert!(!other.join("sub").exists(), "instances must be separate");
    drop(other);
    drop(fs);
    assert_eq!(mounted_at(&path), None);
    assert!(!path.exists());
}

#[test]
fn proc_runs_in_netns_and_cgroup_and_keeps_logs() {
    if !require_root() {
        return;
    }
    let ns = NetNs::new("hp");
    let cg = Cgroup::new("hp");
    let mut cmd = Command::new("sh");
    cmd.args([
        "-c",
        "readlink /proc/self/ns/net; cat /proc/self/cgroup; echo oops >&2; exit 3",
    ]);
    let mut p = spawn_in(Some(&ns), Some(&cg), cmd);
    let status = p.wait_timeout(TIMEOUT).expect("exits");
    assert_eq!(status.code(), Some(3));
    let out = p.stdout();
    assert!(out.contains(&format!("net:[{}]", ns.inode())), "{out}");
    let rel = cg.path().strip_prefix(weir_tests::cgroup2_mount()).unwrap();
    assert!(out.contains(&format!("0::/{}", rel.display())), "{out}");
    assert_eq!(p.stderr(), "oops\n");
    assert!(p.logs().contains("oops"));

    // kill() on a running process.
    let mut sleeper = spawn_in(None, None, {
        let mut c = Command::new("sleep");
        c.arg("1000");
        c
    });
    assert!(sleeper.is_running());
    let status = sleeper.kill();
    assert!(!status.success());
    assert!(kill(Pid::from_raw(sleeper.pid() as i32), None).is_err());
    // signal() after the process is gone is harmless.
    sleeper.signal(Signal::SIGTERM);
}

#[test]
fn temp_dir_is_world_writable_and_removed() {
    let dir = TempDir::new("ht");
    let path: PathBuf = dir.path().to_path_buf();
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&path).unwrap().permissions().mode() & 0o7777,
        0o1777
    );
    std::fs::write(dir.join("f"), b"x").unwrap();
    drop(dir);
    assert!(!path.exists());
}

#[test]
fn testkit_is_found() {
    assert_eq!(
        weir_tests::testkit().canonicalize().unwrap(),
        Path::new(TESTKIT).canonicalize().unwrap()
    );
}

/// The test applications talk across a veth: echo in one namespace as one
/// user, client in the other as another user.
#[test]
fn testkit_echo_and_client_across_namespaces() {
    if !require_root() {
        return;
    }
    let pod = NetNs::new("hpod");
    let node = NetNs::new("hnode");
    let _veth = veth_pair(
        &pod,
        &["198.18.1.2/24", "2001:2:0:1::2/64"],
        &node,
        &["198.18.1.1/24", "2001:2:0:1::1/64"],
    );
    let dir = TempDir::new("hecho");
    let ready = dir.join("echo.ready");
    let mut echo = spawn_in(Some(&pod), None, {
        let mut c = Command::new(TESTKIT);
        c.args(["--uid", "1000", "echo", "--port", "8080", "--name", "app"])
            .arg("--ready-file")
            .arg(&ready);
        c
    });
    echo.wait_for_file(&ready, TIMEOUT);

    for (dst, local) in [
        ("198.18.1.2:8080", "198.18.1.1"),
        ("[2001:2:0:1::2]:8080", "[2001:2:0:1::1]"),
    ] {
        let mut client = spawn_in(Some(&node), None, {
            let mut c = Command::new(TESTKIT);
            c.args([
                "--uid",
                "1001",
                "client",
                "--connect",
                dst,
                "--send",
                "ping",
            ]);
            c
        });
        assert!(
            client
                .wait_timeout(TIMEOUT)
                .expect("client exits")
                .success()
        );
        let lines = json_lines(&client.stdout());
        assert_eq!(lines.len(), 1, "{}", client.logs());
        let r = &lines[0];
        assert_eq!(r["ok"], true, "{r}");
        assert!(r["local"].as_str().unwrap().starts_with(local), "{r}");
        let reply: Value = serde_json::from_str(r["reply"].as_str().unwrap()).unwrap();
        assert_eq!(reply["server"], "app");
        assert_eq!(reply["request"], "ping");
        assert_eq!(reply["local"], dst);
        assert_eq!(reply["peer"], r["local"]);
    }

    // A refused connection is reported, not an error exit.
    let mut client = spawn_in(Some(&node), None, {
        let mut c = Command::new(TESTKIT);
        c.args(["client", "--connect", "198.18.1.2:8081"]);
        c
    });
    assert!(
        client
            .wait_timeout(TIMEOUT)
            .expect("client exits")
            .success()
    );
    let r = &json_lines(&client.stdout())[0];
    assert_eq!(r["ok"], false);
    assert_eq!(r["errno"], libc::ECONNREFUSED);
}

/// The sample sidecar against iptables REDIRECT rules written into a test
/// namespace (never the host's): it must find the original destinations,
/// relay transparently, and use 127.0.0.6 / ::6 for inbound passthrough.
/// Skipped when iptables is missing.
#[test]
fn testkit_sidecar_relays_iptables_redirects() {
    if !require_root() {
        return;
    }
    let pod = NetNs::new("hspod");
    let peer = NetNs::new("hspeer");
    let _veth = veth_pair(
        &pod,
        &["198.18.2.2/24", "2001:2:0:2::2/64"],
        &peer,
        &["198.18.2.1/24", "2001:2:0:2::1/64"],
    );
    pod.ip(&["addr", "add", "::6/128", "dev", "lo"]);
    for (tool, passthrough) in [("iptables", "127.0.0.6"), ("ip6tables", "::6")] {
        let rules: [&[&str]; 4] = [
            &[
                "-A",
                "PREROUTING",
                "-p",
                "tcp",
                "--dport",
                "8080",
                "-j",
                "REDIRECT",
                "--to-ports",
                "15006",
            ],
            &[
                "-A",
                "OUTPUT",
                "-p",
                "tcp",
                "-o",
                "lo",
                "-s",
                passthrough,
                "-j",
                "RETURN",
            ],
            &[
                "-A",
                "OUTPUT",
                "-p",
                "tcp",
                "-m",
                "owner",
                "--uid-owner",
                "1337",
                "-j",
                "RETURN",
            ],
            &[
                "-A",
                "OUTPUT",
                "-p",
                "tcp",
                "--dport",
                "9999",
                "-j",
                "REDIRECT",
                "--to-ports",
                "15001",
            ],
        ];
        for rule in rules {
            let mut args = vec![tool, "-t", "nat"];
            args.extend_from_slice(rule);
            let out = pod.exec(&args);
            if !out.status.success() {
                weir_tests::unavailable(&format!(
                    "{tool} unusable: {}",
                    String::from_utf8_lossy(&out.stderr)
                ));
                return;
            }
        }
    }

    let dir = TempDir::new("hsc");
    let spawn = |ns: &NetNs, args: &[&str], ready: &str| {
        let mut c = Command::new(TESTKIT);
        c.args(args).arg("--ready-file").arg(dir.join(ready));
        let mut p = spawn_in(Some(ns), None, c);
        p.wait_for_file(&dir.join(ready), TIMEOUT);
        p
    };
    let log = dir.join("sidecar.log");
    let _sidecar = spawn(
        &pod,
        &[
            "--uid",
            "1337",
            "sidecar",
            "--name",
            "pod",
            "--log",
            log.to_str().unwrap(),
        ],
        "sidecar.ready",
    );
    let _app = spawn(
        &pod,
        &["--uid", "1000", "echo", "--port", "8080", "--name", "app"],
        "app.ready",
    );
    let _remote = spawn(
        &peer,
        &["echo", "--port", "9999", "--name", "remote"],
        "remote.ready",
    );

    let client = |ns: &NetNs, uid: &str, dst: &str| -> Value {
        let mut c = Command::new(TESTKIT);
        c.args(["--uid", uid, "client", "--connect", dst]);
        let mut p = spawn_in(Some(ns), None, c);
        p.wait_timeout(TIMEOUT).expect("client exits");
        let r = json_lines(&p.stdout()).remove(0);
        assert_eq!(r["ok"], true, "{r}\n{}", p.logs());
        serde_json::from_str(r["reply"].as_str().unwrap()).unwrap()
    };
    // Inbound: peer -> pod:8080, via 15006, arriving from the passthrough address.
    let r = client(&peer, "1001", "198.18.2.2:8080");
    assert_eq!(r["server"], "app");
    assert!(r["peer"].as_str().unwrap().starts_with("127.0.0.6:"), "{r}");
    let r = client(&peer, "1001", "[2001:2:0:2::2]:8080");
    assert!(r["peer"].as_str().unwrap().starts_with("[::6]:"), "{r}");
    // Outbound: app in the pod -> peer:9999, via 15001, from the pod's address.
    let r = client(&pod, "1000", "198.18.2.1:9999");
    assert_eq!(r["server"], "remote");
    assert!(
        r["peer"].as_str().unwrap().starts_with("198.18.2.2:"),
        "{r}"
    );
    let r = client(&pod, "1000", "[2001:2:0:2::1]:9999");
    assert!(
        r["peer"].as_str().unwrap().starts_with("[2001:2:0:2::2]:"),
        "{r}"
    );

    wait_until(TIMEOUT, "four sidecar log records", || {
        std::fs::read_to_string(&log).is_ok_and(|t| t.lines().count() == 4)
    });
    let records = json_lines(&std::fs::read_to_string(&log).unwrap());
    let orig: Vec<&str> = records
        .iter()
        .map(|r| r["orig_dst"].as_str().unwrap())
        .collect();
    assert_eq!(
        orig,
        [
            "198.18.2.2:8080",
            "[2001:2:0:2::2]:8080",
            "198.18.2.1:9999",
            "[2001:2:0:2::1]:9999"
        ]
    );
    for r in &records {
        assert_eq!(r["sidecar"], "pod");
        assert!(r["upstream_error"].is_null() && r["note"].is_null(), "{r}");
    }
    assert_eq!(records[0]["listener"], "inbound");
    assert_eq!(records[0]["listener_port"], 15006);
    assert_eq!(records[2]["listener"], "outbound");
}

/// `validate` succeeds against Istio's rule for proxy-UID loopback traffic
/// and fails (exit 1) without capture. Without a usable iptables it fails
/// under CI (and is skipped elsewhere).
#[test]
fn testkit_validate_follows_the_redirect() {
    if !require_root() {
        return;
    }
    let run = |ns: &NetNs| {
        let mut p = spawn_in(Some(ns), None, {
            let mut c = Command::new(TESTKIT);
            c.args(["validate", "--timeout-ms", "3000"]);
            c
        });
        let status = p.wait_timeout(TIMEOUT).expect("validate exits");
        (status.code(), json_lines(&p.stdout()).remove(0))
    };
    let plain = NetNs::new("hval");
    let (code, r) = run(&plain);
    assert_eq!(code, Some(1), "{r}");
    assert_eq!(r["ok"], false);
    assert!(r["error"].as_str().unwrap().contains("refused"), "{r}");

    let captured = NetNs::new("hvalc");
    let out = captured.exec(&[
        "iptables",
        "-t",
        "nat",
        "-A",
        "OUTPUT",
        "-p",
        "tcp",
        "-o",
        "lo",
        "!",
        "-d",
        "127.0.0.1",
        "-m",
        "owner",
        "--uid-owner",
        "1337",
        "-j",
        "REDIRECT",
        "--to-ports",
        "15006",
    ]);
    if !out.status.success() {
        weir_tests::unavailable(&format!(
            "iptables unusable: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
        return;
    }
    let (code, r) = run(&captured);
    assert_eq!(code, Some(0), "{r}");
    assert_eq!(r["ok"], true);
    assert_eq!(r["accepted_on"], 15006);
    assert_eq!(r["orig_dst"], "127.0.0.6:15002");
}
