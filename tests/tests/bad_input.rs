//! Bad input to the real `weir` binary: every row of docs/bad-input.md that
//! is not a parser unit test is checked here. Each case asserts the exit
//! code, that the message names what is wrong (and how to fix it), and that
//! nothing panicked.
//!
//! The command-line cases need no root: they fail before anything is
//! loaded. The cases marked "kernel" need root (they build a child cgroup,
//! a private bpffs and pod network namespaces with the harness, and never
//! attach anything to the machine's root cgroup).

use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use weir_tests::node::{Node, PodEntry, sidecar_log};
use weir_tests::{
    Bpffs, Cgroup, NetNs, Proc, TempDir, require_root, spawn_in, veth_pair, wait_until, weir_bin,
};

/// What one `weir` run answered.
#[derive(Debug)]
struct Answer {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl Answer {
    fn all(&self) -> String {
        format!("{}{}", self.stdout, self.stderr)
    }
}

/// Runs `program args` with a deadline (a validation that regressed must
/// not leave an agent running), returning its exit code and output.
fn run_with(mut cmd: Command) -> Answer {
    let out_dir = TempDir::new("badin");
    let (o, e) = (out_dir.join("stdout"), out_dir.join("stderr"));
    cmd.stdin(Stdio::null())
        .stdout(std::fs::File::create(&o).unwrap())
        .stderr(std::fs::File::create(&e).unwrap())
        .env("RUST_LOG", "info")
        .env_remove("RUST_BACKTRACE");
    let what = format!("{cmd:?}");
    let mut child = cmd.spawn().unwrap_or_else(|e| panic!("{what}: {e}"));
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break Some(s);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let a = Answer {
        code: status.and_then(|s| s.code()),
        stdout: std::fs::read_to_string(&o).unwrap_or_default(),
        stderr: std::fs::read_to_string(&e).unwrap_or_default(),
    };
    assert!(status.is_some(), "{what} did not finish in 30 s: {a:?}");
    assert!(
        !a.all().contains("panicked"),
        "{what} panicked:\n{}",
        a.all()
    );
    a
}

fn weir(args: &[&str]) -> Answer {
    let mut cmd = Command::new(weir_bin());
    cmd.args(args);
    run_with(cmd)
}

/// Asserts the run failed with `code` and said `needle`.
#[track_caller]
fn expect(a: &Answer, code: i32, needle: &str) {
    assert_eq!(a.code, Some(code), "exit code; output:\n{}", a.all());
    assert!(
        a.all().contains(needle),
        "expected {needle:?} in:\n{}",
        a.all()
    );
}

// ---------------------------------------------------------------------------
// Command line (no root needed)
// ---------------------------------------------------------------------------

#[test]
fn bad_metrics_addr_is_named() {
    for bad in ["nope", "1.2.3.4", "[::1]:99999", "localhost:9464", ":9464"] {
        let a = weir(&["run", "--metrics-addr", bad, "--pods-file", "/nonexistent"]);
        expect(
            &a,
            1,
            &format!(
                "--metrics-addr {bad:?}: not an address; use IP:PORT like 0.0.0.0:9464, or \"off\""
            ),
        );
    }
}

#[test]
fn out_of_range_numbers_are_refused_by_name() {
    let cases: &[(&str, &str, &str)] = &[
        ("--max-pods", "0", "0 is not in 1..=1048576"),
        ("--max-pods", "1048577", "1048577 is not in 1..=1048576"),
        ("--max-pods", "-1", "unexpected argument '-1'"),
        ("--max-pods", "many", "invalid digit found in string"),
        ("--max-port-rules", "0", "0 is not in 1..=16777216"),
        ("--max-cidrs", "16777217", "16777217 is not in 1..=16777216"),
        ("--max-pending", "1023", "1023 is not in 1024..=16777216"),
        ("--reload-ms", "9", "9 is not in 10..=60000"),
        ("--resync-secs", "0", "0 is not in 1..=3600"),
        ("--resync-secs", "3601", "3601 is not in 1..=3600"),
    ];
    for (flag, value, why) in cases {
        let a = weir(&["run", "--pods-file", "/nonexistent", flag, value]);
        assert_eq!(a.code, Some(2), "{flag} {value}: {}", a.all());
        let all = a.all();
        assert!(all.contains(why), "{flag} {value}: {all}");
        if !why.starts_with("unexpected") {
            assert!(
                all.contains(&format!("invalid value '{value}' for '{flag} <")),
                "{flag} {value}: {all}"
            );
        }
    }
}

#[test]
fn environment_variables_are_checked_like_flags() {
    let mut cmd = Command::new(weir_bin());
    cmd.args(["run", "--pods-file", "/nonexistent"])
        .env("WEIR_MAX_PODS", "lots");
    let a = run_with(cmd);
    expect(&a, 2, "invalid value 'lots' for '--max-pods <MAX_PODS>'");
    let mut cmd = Command::new(weir_bin());
    cmd.args(["run", "--pods-file", "/nonexistent"])
        .env("WEIR_METRICS_ADDR", "zz");
    expect(&run_with(cmd), 1, "--metrics-addr \"zz\": not an address");
}

#[test]
fn missing_or_conflicting_pod_source_is_refused() {
    let mut cmd = Command::new(weir_bin());
    cmd.arg("run")
        .env_remove("WEIR_PODS_FILE")
        .env_remove("WEIR_KUBERNETES");
    let a = run_with(cmd);
    expect(
        &a,
        2,
        "the following required arguments were not provided:\n  --pods-file <PODS_FILE>",
    );
    let a = weir(&["run", "--pods-file", "/p.yaml", "--kubernetes"]);
    expect(
        &a,
        2,
        "the argument '--pods-file <PODS_FILE>' cannot be used with '--kubernetes'",
    );
}

#[test]
fn unknown_flags_and_values_are_refused() {
    expect(
        &weir(&["run", "--pods-file", "/p", "--frobnicate"]),
        2,
        "unexpected argument '--frobnicate' found",
    );
    expect(&weir(&["bogus"]), 2, "unrecognized subcommand 'bogus'");
    expect(
        &weir(&["status", "-o", "yaml"]),
        2,
        "invalid value 'yaml' for '--output <OUTPUT>'",
    );
    expect(
        &weir(&["explain", "--pod", "default/a", "--dst", "nope"]),
        2,
        "invalid value 'nope' for '--dst <ADDR:PORT>'",
    );
}

#[test]
fn cgroup_that_does_not_exist_is_refused_before_loading() {
    let a = weir(&[
        "run",
        "--pods-file",
        "/nonexistent",
        "--cgroup",
        "/nonexistent/weir-cgroup",
        "--metrics-addr",
        "off",
    ]);
    expect(
        &a,
        1,
        "--cgroup /nonexistent/weir-cgroup: ENOENT: No such file or directory; pass an existing cgroup v2 directory",
    );
    assert!(!a.all().contains("attached"), "{}", a.all());
}

#[test]
fn cgroup_that_is_not_cgroup_v2_is_refused_before_loading() {
    let dir = TempDir::new("notcg");
    let p = dir.path().to_str().unwrap();
    let a = weir(&[
        "run",
        "--pods-file",
        "/nonexistent",
        "--cgroup",
        p,
        "--metrics-addr",
        "off",
    ]);
    expect(
        &a,
        1,
        &format!("--cgroup {p}: not a cgroup v2 directory (filesystem magic"),
    );
    let file = dir.join("file");
    std::fs::write(&file, "").unwrap();
    let a = weir(&[
        "run",
        "--pods-file",
        "/nonexistent",
        "--cgroup",
        file.to_str().unwrap(),
    ]);
    expect(
        &a,
        1,
        &format!("--cgroup {}: not a directory", file.display()),
    );
}

#[test]
fn status_and_explain_without_weir_say_so() {
    let a = weir(&["status", "--bpffs", "/nonexistent"]);
    expect(
        &a,
        1,
        "cannot open /nonexistent/weir/maps/POD_POLICY (is weir installed on this node, and --bpffs right?)",
    );
    let a = weir(&[
        "explain",
        "--pod",
        "default/a",
        "--dst",
        "198.18.0.1:80",
        "--bpffs",
        "/nonexistent",
    ]);
    expect(
        &a,
        1,
        "(is weir installed on this node, and --bpffs right?)",
    );
    let a = weir(&["uninstall", "--bpffs", "/nonexistent"]);
    expect(&a, 0, "nothing to remove under /nonexistent/weir");
}

// ---------------------------------------------------------------------------
// Privileges (root, to drop them)
// ---------------------------------------------------------------------------

/// A copy of the agent that any user can run (the build directory may be
/// under /root).
fn public_weir(dir: &TempDir) -> PathBuf {
    let p = dir.join("weir");
    std::fs::copy(weir_bin(), &p).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    p
}

fn has_setpriv() -> bool {
    Command::new("setpriv")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

#[test]
fn not_root_and_no_capabilities_is_refused_with_the_list() {
    if !require_root() || !has_setpriv() {
        return;
    }
    let dir = TempDir::new("caps");
    let bin = public_weir(&dir);
    let cg = Cgroup::new("caps");
    let bpffs = Bpffs::new();
    let pods = dir.join("pods.yaml");
    std::fs::write(&pods, "pods: []\n").unwrap();
    let common = |cmd: &mut Command| {
        cmd.arg(&bin)
            .args(["run", "--metrics-addr", "off", "--pods-file"])
            .arg(&pods)
            .arg("--cgroup")
            .arg(cg.path())
            .arg("--bpffs")
            .arg(bpffs.path());
    };
    // An ordinary user.
    let mut cmd = Command::new("setpriv");
    cmd.args(["--reuid", "65534", "--regid", "65534", "--clear-groups"]);
    common(&mut cmd);
    let a = run_with(cmd);
    expect(
        &a,
        1,
        "missing capabilities CAP_SYS_ADMIN, CAP_NET_ADMIN, CAP_SYS_PTRACE, CAP_BPF, CAP_PERFMON: \
         neither CAP_BPF nor CAP_SYS_ADMIN is in the effective set",
    );
    // Root without capabilities (a container with `drop: [ALL]`).
    let mut cmd = Command::new("setpriv");
    cmd.args(["--inh-caps", "-all", "--bounding-set", "-all"]);
    common(&mut cmd);
    let a = run_with(cmd);
    expect(
        &a,
        1,
        "neither CAP_BPF nor CAP_SYS_ADMIN is in the effective set",
    );
    assert!(!a.all().contains("attached"), "{}", a.all());
}

/// Without CAP_SYS_PTRACE the agent says what it cannot do, then runs.
#[test]
fn missing_optional_capability_is_a_warning() {
    if !require_root() || !has_setpriv() {
        return;
    }
    let dir = TempDir::new("caps");
    let cg = Cgroup::new("caps");
    let bpffs = Bpffs::new();
    let pods = dir.join("pods.yaml");
    std::fs::write(&pods, "pods: []\n").unwrap();
    let mut cmd = Command::new("setpriv");
    cmd.args(["--inh-caps", "-all", "--bounding-set", "-sys_ptrace"])
        .arg(weir_bin())
        .args([
            "run",
            "--metrics-addr",
            "off",
            "--reload-ms",
            "50",
            "--pods-file",
        ])
        .arg(&pods)
        .arg("--cgroup")
        .arg(cg.path())
        .arg("--bpffs")
        .arg(bpffs.path())
        .env("RUST_LOG", "info");
    let mut agent = spawn_in(None, None, cmd);
    agent.wait_for_output("pods file applied", Duration::from_secs(20));
    let logs = agent.logs();
    assert!(
        logs.contains(
            "missing capabilities CAP_SYS_PTRACE: without CAP_SYS_PTRACE weir cannot adopt proxies"
        ),
        "{logs}"
    );
    stop(&mut agent, &bpffs);
}

fn stop(agent: &mut Proc, bpffs: &Bpffs) {
    agent.signal(Signal::SIGTERM);
    agent.wait_timeout(Duration::from_secs(10));
    let _ = Command::new(weir_bin())
        .arg("uninstall")
        .arg("--bpffs")
        .arg(bpffs.path())
        .output();
}

// ---------------------------------------------------------------------------
// bpffs, BTF, cgroup v2 (kernel)
// ---------------------------------------------------------------------------

#[test]
fn bpffs_path_that_cannot_be_mounted_is_refused() {
    if !require_root() {
        return;
    }
    let dir = TempDir::new("bpffile");
    let file = dir.join("not-a-dir");
    std::fs::write(&file, "").unwrap();
    let cg = Cgroup::new("bpffile");
    let a = weir(&[
        "run",
        "--metrics-addr",
        "off",
        "--pods-file",
        "/nonexistent",
        "--cgroup",
        cg.path().to_str().unwrap(),
        "--bpffs",
        file.to_str().unwrap(),
    ]);
    expect(
        &a,
        1,
        &format!(
            "--bpffs {0}: not a bpffs and mounting one failed; mount it (mount -t bpf bpf {0}) or point --bpffs at one",
            file.display()
        ),
    );
    assert!(!a.all().contains("attached"), "{}", a.all());
}

/// No bpffs at --bpffs: weir mounts one, root-only (mode 0700).
#[test]
fn missing_bpffs_is_mounted_root_only() {
    if !require_root() {
        return;
    }
    let dir = TempDir::new("nobpffs");
    let mnt = dir.join("bpf");
    let pods = dir.join("pods.yaml");
    std::fs::write(&pods, "pods: []\n").unwrap();
    let cg = Cgroup::new("nobpffs");
    let mut cmd = Command::new(weir_bin());
    cmd.args([
        "run",
        "--metrics-addr",
        "off",
        "--reload-ms",
        "50",
        "--pods-file",
    ])
    .arg(&pods)
    .arg("--cgroup")
    .arg(cg.path())
    .arg("--bpffs")
    .arg(&mnt)
    .env("RUST_LOG", "info");
    let mut agent = spawn_in(None, None, cmd);
    let cleanup = |agent: &mut Proc| {
        agent.signal(Signal::SIGTERM);
        agent.wait_timeout(Duration::from_secs(10));
        let _ = Command::new(weir_bin())
            .arg("uninstall")
            .arg("--bpffs")
            .arg(&mnt)
            .output();
        let _ = nix::mount::umount2(&mnt, nix::mount::MntFlags::MNT_DETACH);
    };
    let res = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        agent.wait_for_output("pods file applied", Duration::from_secs(20));
        assert!(
            agent
                .logs()
                .contains(&format!("no bpffs at {}: mounting one", mnt.display())),
            "{}",
            agent.logs()
        );
        let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap();
        let line = mounts
            .lines()
            .find(|l| l.split_whitespace().nth(1) == Some(mnt.to_str().unwrap()))
            .unwrap_or_else(|| panic!("{} not mounted:\n{mounts}", mnt.display()));
        assert!(
            line.contains(" bpf ") && line.contains("mode=700"),
            "{line}"
        );
        let mode = std::fs::metadata(&mnt).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700, "bpffs root mode {mode:o}");
        assert!(mnt.join("weir/maps/POD_POLICY").exists());
        // Every pin is root's alone.
        for dir in ["weir/maps", "weir/links"] {
            for e in std::fs::read_dir(mnt.join(dir)).unwrap() {
                let md = e.unwrap().metadata().unwrap();
                let mode = md.permissions().mode() & 0o777;
                assert_eq!(mode & 0o077, 0, "{dir}: pin mode {mode:o}");
                assert_eq!(std::os::unix::fs::MetadataExt::uid(&md), 0);
            }
        }
    }));
    cleanup(&mut agent);
    if let Err(p) = res {
        std::panic::resume_unwind(p);
    }
}

/// Runs `script` (which must end in `exec "$@"`) in a private mount
/// namespace followed by the weir command line `args`.
fn in_private_mounts(script: &str, args: &[&str]) -> Command {
    let mut cmd = Command::new("unshare");
    cmd.args([
        "--mount",
        "--propagation",
        "private",
        "sh",
        "-c",
        script,
        "sh",
    ])
    .arg(weir_bin())
    .args(args);
    cmd
}

/// A kernel without BTF cannot be had here; hiding /sys/kernel/btf in a
/// private mount namespace shows the warning (the detection itself is
/// unit tested in caps.rs with a fake sysfs).
#[test]
fn missing_btf_is_warned_about() {
    if !require_root() {
        return;
    }
    let dir = TempDir::new("nobtf");
    let pods = dir.join("pods.yaml");
    std::fs::write(&pods, "pods: []\n").unwrap();
    let cg = Cgroup::new("nobtf");
    let bpffs = Bpffs::new();
    let cmd = in_private_mounts(
        "mount -t tmpfs none /sys/kernel/btf && test ! -e /sys/kernel/btf/vmlinux && exec \"$@\"",
        &[
            "run",
            "--metrics-addr",
            "off",
            "--reload-ms",
            "50",
            "--pods-file",
            pods.to_str().unwrap(),
            "--cgroup",
            cg.path().to_str().unwrap(),
            "--bpffs",
            bpffs.path().to_str().unwrap(),
        ],
    );
    let mut agent = spawn_in(None, None, cmd);
    agent.wait_for_output(
        "/sys/kernel/btf/vmlinux is missing",
        Duration::from_secs(20),
    );
    assert!(
        agent
            .logs()
            .contains("this kernel has no BTF (CONFIG_DEBUG_INFO_BTF)"),
        "{}",
        agent.logs()
    );
    stop(&mut agent, &bpffs);
}

/// A cgroup v1 only host, seen from a private mount namespace where the
/// cgroup2 mount is hidden and one v1 hierarchy is mounted. The script
/// refuses to start weir if any cgroup2 mount is still visible, so weir can
/// never find (and attach to) the real cgroup2 root.
#[test]
fn cgroup_v1_only_host_is_refused() {
    if !require_root() {
        return;
    }
    let bpffs = Bpffs::new();
    // Unmount every cgroup2 mount (deepest first); keep or add a v1 one.
    let script = "for d in $(awk '$3 == \"cgroup2\" {print $2}' /proc/self/mounts | sort -r); do \
           umount -l \"$d\" || exit 98; done; \
         grep -q ' cgroup ' /proc/self/mounts || \
           mount -t cgroup -o none,name=weir-test cgroup /sys/fs/cgroup || exit 97; \
         if grep -q ' cgroup2 ' /proc/self/mounts; then echo 'cgroup2 still visible'; exit 99; fi; \
         exec \"$@\"";
    let a = run_with(in_private_mounts(
        script,
        &[
            "run",
            "--metrics-addr",
            "off",
            "--pods-file",
            "/nonexistent",
            "--bpffs",
            bpffs.path().to_str().unwrap(),
        ],
    ));
    assert_ne!(a.code, Some(99), "{}", a.all());
    expect(
        &a,
        1,
        "this host mounts cgroup v1 only: weir's programs attach to cgroup v2; boot with systemd.unified_cgroup_hierarchy=1",
    );
    // Nothing at all: every cgroup mount unmounted.
    let script = "for d in $(awk '$3 ~ /^cgroup/ {print $2}' /proc/self/mounts | sort -r); do \
           umount -l \"$d\" || exit 98; done; \
         if grep -q ' cgroup' /proc/self/mounts; then exit 99; fi; exec \"$@\"";
    let a = run_with(in_private_mounts(
        script,
        &[
            "run",
            "--metrics-addr",
            "off",
            "--pods-file",
            "/nonexistent",
            "--bpffs",
            bpffs.path().to_str().unwrap(),
        ],
    ));
    assert_ne!(a.code, Some(99), "{}", a.all());
    expect(
        &a,
        1,
        "no cgroup filesystem is mounted: weir needs cgroup v2",
    );
}

/// The metrics port is taken: the agent says which flag and why.
#[test]
fn metrics_addr_in_use_is_named() {
    if !require_root() {
        return;
    }
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let cg = Cgroup::new("mtaken");
    let bpffs = Bpffs::new();
    let dir = TempDir::new("mtaken");
    let pods = dir.join("pods.yaml");
    std::fs::write(&pods, "pods: []\n").unwrap();
    let a = weir(&[
        "run",
        "--metrics-addr",
        &addr,
        "--pods-file",
        pods.to_str().unwrap(),
        "--cgroup",
        cg.path().to_str().unwrap(),
        "--bpffs",
        bpffs.path().to_str().unwrap(),
    ]);
    expect(&a, 1, &format!("--metrics-addr {addr}: cannot listen"));
    expect(&a, 1, "Address already in use");
    let _ = weir(&["uninstall", "--bpffs", bpffs.path().to_str().unwrap()]);
}

// ---------------------------------------------------------------------------
// Pods file at run time (kernel)
// ---------------------------------------------------------------------------

/// Every runtime problem with the pods file is logged with the file and
/// the pod, and never costs the good pods their capture: a netns that does
/// not exist, a bad entry, a file that is not YAML, missing, or unreadable.
#[test]
fn pods_file_problems_keep_the_good_pods_captured() {
    if !require_root() {
        return;
    }
    let cli = NetNs::new("cli");
    let srv = NetNs::new("srv");
    let _veth = veth_pair(&cli, &["198.18.1.1/24"], &srv, &["198.18.1.2/24"]);
    let mut node = Node::with_agent();
    let good = PodEntry::new("good", &cli, &["198.18.1.1"]);
    node.set_pods(std::slice::from_ref(&good));
    let log = node.sidecar(&cli, "good-sidecar");
    node.echo(&srv, 8080, "upstream", 1000);
    let captured = |node: &Node, n: usize| {
        let r = node.client(&cli, 1000, "198.18.1.2:8080");
        assert!(r.ok(), "{:?}\n{}", r.json, node.agent_logs());
        wait_until(Duration::from_secs(5), "sidecar record", || {
            sidecar_log(&log).len() >= n
        });
        assert_eq!(sidecar_log(&log)[n - 1]["orig_dst"], "198.18.1.2:8080");
    };
    captured(&node, 1);
    let file = node.pods_file.display().to_string();
    let good_yaml = "  - {name: good, netns: NETNS, ips: ['198.18.1.1']}\n"
        .replace("NETNS", cli.path().to_str().unwrap());

    // A netns that does not exist: that pod is skipped, the others work.
    let ghost = format!("/var/run/netns/weir-ghost-{}", std::process::id());
    node.write_pods_raw(&format!(
        "pods:\n{good_yaml}  - {{name: ghost, netns: {ghost}, ips: ['198.18.9.9']}}\n"
    ));
    node.wait_log(&format!(
        "pod default/ghost: not enrolled: netns {ghost}: No such file or directory"
    ));
    assert_eq!(node.enrolled(), vec!["good"]);
    captured(&node, 2);

    // Bad entries: each named with the file and the pod, the rest applied.
    node.write_pods_raw(&format!(
        "pods:\n{good_yaml}  - {{name: rel, netns: relative/x}}\n  - {{name: badip, netns: /n/x, ips: [nope]}}\n  \
         - {{name: badann, netns: /n/y, annotations: {{traffic.sidecar.istio.io/excludeOutboundPorts: '80,x'}}}}\n"
    ));
    for needle in [
        format!(
            "pods file {file}: pod \"rel\": field `netns`: \"relative/x\" is not an absolute path"
        ),
        format!("pods file {file}: pod \"badip\": field `ips`: \"nope\" is not an IP address"),
        format!(
            "pods file {file}: pod \"badann\": field `annotations`: annotation traffic.sidecar.istio.io/excludeOutboundPorts: \"x\" is not a port"
        ),
    ] {
        node.wait_log(&needle);
    }
    assert_eq!(node.enrolled(), vec!["good"]);

    // Not YAML: the whole file is refused, the current pods stay.
    node.write_pods_raw("pods: [\n");
    node.wait_log(&format!("pods file {file}: "));
    node.wait_log("; keeping the current pods");
    assert_eq!(node.enrolled(), vec!["good"]);
    captured(&node, 3);

    // Missing, then unreadable (a directory swapped in atomically): the
    // current pods stay. (A readable file turning unreadable is logged.)
    node.write_pods_raw(&format!("pods:\n{good_yaml}"));
    std::thread::sleep(Duration::from_millis(300));
    std::fs::remove_file(&node.pods_file).unwrap();
    node.wait_log(&format!(
            "pods file {file}: cannot read it (No such file or directory (os error 2)); keeping the current pods"
        ),
    );
    assert_eq!(node.enrolled(), vec!["good"]);
    captured(&node, 4);
    node.write_pods_raw(&format!("pods:\n{good_yaml}"));
    std::thread::sleep(Duration::from_millis(300));
    let dir = node.dir.join("pods-dir");
    std::fs::create_dir(&dir).unwrap();
    nix::fcntl::renameat2(
        nix::fcntl::AT_FDCWD,
        &dir,
        nix::fcntl::AT_FDCWD,
        &node.pods_file,
        nix::fcntl::RenameFlags::RENAME_EXCHANGE,
    )
    .unwrap();
    node.wait_log(&format!(
            "pods file {file}: cannot read it (not a regular file; point --pods-file at a YAML file); keeping the current pods"
        ),
    );
    assert_eq!(node.enrolled(), vec!["good"]);
    captured(&node, 5);
    std::fs::remove_dir(&node.pods_file).unwrap();

    // A FIFO (reading it would block the agent's loop forever): refused
    // without opening it; the agent keeps serving and stops on SIGTERM.
    node.write_pods_raw(&format!("pods:\n{good_yaml}"));
    std::thread::sleep(Duration::from_millis(300));
    std::fs::remove_file(&node.pods_file).unwrap();
    nix::unistd::mkfifo(
        &node.pods_file,
        nix::sys::stat::Mode::S_IRUSR | nix::sys::stat::Mode::S_IWUSR,
    )
    .unwrap();
    node.wait_log("cannot read it (not a regular file");
    assert_eq!(node.enrolled(), vec!["good"]);
    captured(&node, 6);
    std::fs::remove_file(&node.pods_file).unwrap();

    // An empty file (a writer between truncate and write): refused, the
    // pods stay; `pods: []` is how to remove them all.
    node.write_pods_raw("");
    node.wait_log("the file is empty (still being written?)");
    assert_eq!(node.enrolled(), vec!["good"]);
    captured(&node, 7);
    node.write_pods_raw(&format!("pods:\n{good_yaml}"));
}

/// A pods file that does not exist yet when the agent starts: it waits for
/// it (logging why) and applies it when it appears.
#[test]
fn pods_file_missing_at_start_is_waited_for() {
    if !require_root() {
        return;
    }
    let node = Node::new();
    std::fs::remove_file(&node.pods_file).unwrap();
    let mut cmd = Command::new(weir_bin());
    cmd.env("RUST_LOG", "info")
        .args([
            "run",
            "--metrics-addr",
            "off",
            "--reload-ms",
            "50",
            "--pods-file",
        ])
        .arg(&node.pods_file)
        .arg("--cgroup")
        .arg(node.cgroup.path())
        .arg("--bpffs")
        .arg(node.bpffs.path());
    let mut agent = spawn_in(None, None, cmd);
    agent.wait_for_output(
        "cannot read it (No such file or directory",
        Duration::from_secs(20),
    );
    std::thread::sleep(Duration::from_millis(500));
    assert!(agent.is_running(), "{}", agent.logs());
    node.write_pods_raw("pods: []\n");
    agent.wait_for_output("pods file applied", Duration::from_secs(10));
    agent.signal(Signal::SIGTERM);
    agent.wait_timeout(Duration::from_secs(10));
}
