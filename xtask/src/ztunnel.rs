//! ztunnel, Istio ambient's node proxy, as a real peer for weir's tests:
//! built once per machine from the shared reference source
//! (`../shared/reference/peers/ztunnel/`, see its README) into a cache
//! outside the checkout, `~/.cache/weir/ztunnel/<commit>/`:
//!
//! - `ztunnel/`: the unpacked source (patched with
//!   `harness-ip_forward.patch`), its build in `ztunnel/out/rust`;
//! - `brp.git`, `gitconfig`: the one git dependency cargo resolves, served
//!   from the bare repository in the reference directory;
//! - `bin/ztunnel`: the proxy binary (a debug build with the fake CA that
//!   `FAKE_CA=true` needs), copied out of the build of ztunnel's
//!   `namespaced` test suite, which builds both at once (~6 min cold on
//!   2 cores, 3.2 GB; then nothing).
//!
//! The kernel tests find the binary through `WEIR_ZTUNNEL_BIN` (set by
//! `cargo xtask test`).

use std::path::{Path, PathBuf};

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};

use crate::cmd::Cmd;
use crate::host;

/// The ztunnel commit of the shared source (its README says which).
pub const COMMIT: &str = "62d826530e5ce85764e309170205b293efcbc80b";
/// The variable that gives the tests the ztunnel binary.
pub const BIN_ENV: &str = "WEIR_ZTUNNEL_BIN";

/// `$WEIR_ZTUNNEL_CACHE`, else `$XDG_CACHE_HOME/weir/ztunnel/<commit:8>`,
/// else `~/.cache/weir/ztunnel/<commit:8>`.
pub fn cache_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("WEIR_ZTUNNEL_CACHE").filter(|d| !d.is_empty()) {
        return PathBuf::from(d);
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .filter(|d| !d.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| "/root".into())).join(".cache")
        });
    base.join("weir/ztunnel").join(&COMMIT[..8])
}

/// The shared reference directory with ztunnel's source.
pub fn peer_dir(root: &Path) -> PathBuf {
    root.join("../shared/reference/peers/ztunnel")
}

/// The unpacked, patched source (unpacked on first use): `<cache>/ztunnel`.
pub fn ensure_source(root: &Path) -> Result<PathBuf> {
    let cache = cache_dir();
    let src = cache.join("ztunnel");
    if src.join("Cargo.toml").is_file() {
        return Ok(src);
    }
    let peer = peer_dir(root);
    let tarball = peer.join("ztunnel-src.tar.gz");
    if !tarball.is_file() {
        bail!(
            "{} not found: ztunnel's source comes from the shared reference directory beside the checkout (../shared/reference/peers/ztunnel)",
            tarball.display()
        );
    }
    std::fs::create_dir_all(&cache).with_context(|| format!("creating {}", cache.display()))?;
    // Unpacked beside, then renamed: an interrupted unpack is redone.
    let tmp = cache.join("ztunnel.unpacking");
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp)?;
    Cmd::new("tar")
        .arg("-xzf")
        .arg(&tarball)
        .arg("-C")
        .arg(&tmp)
        .run()?;
    Cmd::new("patch")
        .args(["-p1", "-i"])
        .arg(peer.join("harness-ip_forward.patch"))
        .dir(tmp.join("ztunnel"))
        .run()?;
    let brp = cache.join("brp.git");
    if !brp.join("HEAD").is_file() {
        let _ = std::fs::remove_dir_all(&brp);
        std::fs::create_dir_all(&brp)?;
        Cmd::new("tar")
            .arg("-xzf")
            .arg(peer.join("boring-rustls-provider.git.tar.gz"))
            .arg("-C")
            .arg(&brp)
            .run()?;
    }
    std::fs::write(
        cache.join("gitconfig"),
        format!(
            "[url \"file://{}\"]\n\tinsteadOf = https://github.com/janrueth/boring-rustls-provider\n",
            brp.display()
        ),
    )?;
    std::fs::rename(tmp.join("ztunnel"), &src)
        .with_context(|| format!("moving the unpacked source to {}", src.display()))?;
    let _ = std::fs::remove_dir_all(&tmp);
    Ok(src)
}

/// Builds ztunnel's `namespaced` test suite (and with it the `ztunnel`
/// binary) unless built already; returns the source directory, whose
/// `out/rust/debug/deps/namespaced-*` is the suite.
pub fn ensure_namespaced_build(root: &Path) -> Result<PathBuf> {
    let src = ensure_source(root)?;
    // protoc, and the well-known types ztunnel's protos import
    // (google/protobuf/*.proto, from libprotobuf-dev).
    if host::find_admin_program("protoc").is_none()
        || !Path::new("/usr/include/google/protobuf/empty.proto").is_file()
    {
        crate::toolchain::apt_install(&["protobuf-compiler", "libprotobuf-dev"])?;
    }
    let cache = cache_dir();
    println!(
        "ztunnel: building its namespaced tests and binary in {} (once per machine; ~6 min cold)",
        src.display()
    );
    Cmd::new(host::cargo())
        .args(["test", "--test", "namespaced", "--no-run"])
        .env("GIT_CONFIG_GLOBAL", cache.join("gitconfig"))
        .env("CARGO_NET_GIT_FETCH_WITH_CLI", "true")
        // weir's own build settings must not leak into ztunnel's.
        .env_remove("CARGO_TARGET_DIR")
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_BUILD_TARGET")
        .dir(&src)
        .run()
        .context("building ztunnel (its source: ../shared/reference/peers/ztunnel/README.md)")?;
    Ok(src)
}

/// The ztunnel binary, `<cache>/bin/ztunnel`, built first when missing.
pub fn ensure_ztunnel_binary(root: &Path) -> Result<PathBuf> {
    let bin = cache_dir().join("bin/ztunnel");
    if host::is_executable(&bin) {
        return Ok(bin);
    }
    let src = ensure_namespaced_build(root)?;
    let built = src.join("out/rust/debug/ztunnel");
    if !built.is_file() {
        bail!("{} missing after ztunnel's build", built.display());
    }
    let dir = bin.parent().context("bin/ztunnel has a parent")?;
    std::fs::create_dir_all(dir)?;
    let tmp = dir.join("ztunnel.tmp");
    std::fs::copy(&built, &tmp)
        .with_context(|| format!("copying {} to {}", built.display(), tmp.display()))?;
    std::fs::rename(&tmp, &bin)?;
    println!("ztunnel: {}", bin.display());
    Ok(bin)
}

// ---------------------------------------------------------------------------
// `cargo xtask peer-ztunnel`: ztunnel's namespaced suite with weir.
//
// ztunnel's own namespaced integration suite (30 tests: local and
// cross-node capture, waypoints, HBONE, policy, shutdown, malicious calls,
// CRL) runs `scripts/ztunnel-redirect-inpod.sh` inside each captured pod's
// netns before handing it to ztunnel. Here that script is replaced by one
// that hands the netns to a weir agent (`weir inpod-enroll`) and nothing
// else; the suite must pass with no iptables and no nft rule in any pod
// (the script counts them, read-only, and `run` asserts the counts).
// ---------------------------------------------------------------------------

/// The namespaced suite's size at [`COMMIT`].
pub const SUITE_TESTS: usize = 30;

/// The newest built `namespaced-*` test binary of the source at `src`.
fn find_suite(src: &Path) -> Result<Option<PathBuf>> {
    let deps = src.join("out/rust/debug/deps");
    let Ok(rd) = std::fs::read_dir(&deps) else {
        return Ok(None);
    };
    let mut found: Vec<(std::time::SystemTime, PathBuf)> = Vec::new();
    for e in rd {
        let e = e?;
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with("namespaced-") && !name.contains('.') {
            found.push((e.metadata()?.modified()?, e.path()));
        }
    }
    found.sort();
    Ok(found.pop().map(|(_, p)| p))
}

/// The replacement of `scripts/ztunnel-redirect-inpod.sh`: enroll this
/// netns with weir, then count (read-only) the netns's iptables and nft
/// rules into `audit`.
fn redirect_script(weir: &Path, socket: &Path, audit: &Path) -> String {
    format!(
        r#"#!/bin/sh
# weir's replacement of ztunnel's scripts/ztunnel-redirect-inpod.sh (written
# by `cargo xtask peer-ztunnel`): hand this pod's network namespace to weir,
# which captures it for ztunnel with eBPF. No iptables, no nft rule is
# written; the last lines only count, read-only, the rules this namespace
# has, for the xtask to check they are none.
set -e
{weir} inpod-enroll --socket {socket}
# A tool that fails counts as "failed", never as 0.
if out=$(iptables-save); then ipt=$(printf '%s\n' "$out" | grep -c '^-A' || true); else ipt=failed; fi
if out=$(ip6tables-save); then ip6t=$(printf '%s\n' "$out" | grep -c '^-A' || true); else ip6t=failed; fi
if out=$(nft list ruleset); then
    nft=$(printf '%s\n' "$out" | grep -cvE '^[[:space:]]*(table|chain|}}|type|policy|$)' || true)
else
    nft=failed
fi
echo "$(stat -L -c %i /proc/self/ns/net) iptables=$ipt ip6tables=$ip6t nft=$nft" >> {audit}
"#,
        weir = weir.display(),
        socket = socket.display(),
        audit = audit.display()
    )
}

/// A directory that mirrors ztunnel's source tree through symlinks, with
/// `scripts/ztunnel-redirect-inpod.sh` replaced (the suite runs it
/// relative to its working directory).
fn make_run_tree(src: &Path, run: &Path, script: &str) -> Result<()> {
    std::fs::create_dir_all(run.join("scripts"))?;
    for e in std::fs::read_dir(src)? {
        let e = e?;
        let name = e.file_name();
        if name == "scripts" {
            continue;
        }
        std::os::unix::fs::symlink(e.path(), run.join(&name))?;
    }
    for e in std::fs::read_dir(src.join("scripts"))? {
        let e = e?;
        if e.file_name() == "ztunnel-redirect-inpod.sh" {
            continue;
        }
        std::os::unix::fs::symlink(e.path(), run.join("scripts").join(e.file_name()))?;
    }
    let path = run.join("scripts/ztunnel-redirect-inpod.sh");
    std::fs::write(&path, script)?;
    Cmd::new("chmod").arg("0755").arg(&path).run()?;
    Ok(())
}

/// Builds (once) and runs ztunnel's namespaced suite with weir in place of
/// the iptables script; `weir` is the agent binary, `filter` optional test
/// names. Fails unless every test passes and every pod had 0 rules.
pub fn run(root: &Path, weir: &Path, filter: &[String]) -> Result<()> {
    let src = ensure_namespaced_build(root)?;
    let suite = find_suite(&src)?.context("no namespaced-* binary after ztunnel's build")?;
    let run = cache_dir().join(format!("weir-run-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&run);
    let agent_dir = run.join("agent");
    std::fs::create_dir_all(&agent_dir)?;
    let socket = agent_dir.join("cni.sock");
    let audit = run.join("rules-audit.txt");
    make_run_tree(&src, &run, &redirect_script(weir, &socket, &audit))?;
    let pods_file = agent_dir.join("pods.yaml");
    std::fs::write(&pods_file, "pods: []\n")?;

    // A bpffs and a cgroup of our own: the agent attaches there only.
    let bpffs = agent_dir.join("bpffs");
    std::fs::create_dir_all(&bpffs)?;
    Cmd::new("mount")
        .args(["-t", "bpf", "bpf"])
        .arg(&bpffs)
        .run()?;
    let cgroup = cgroup2_root()?.join(format!("weir-ztunnel-{}", std::process::id()));
    std::fs::create_dir_all(&cgroup)?;
    let mut guard = Cleanup {
        weir: weir.to_path_buf(),
        bpffs: bpffs.clone(),
        cgroup: cgroup.clone(),
        agent: None,
    };
    let log = std::fs::File::create(agent_dir.join("agent.log"))?;
    let agent = std::process::Command::new(weir)
        .arg("run")
        .arg("--pods-file")
        .arg(&pods_file)
        .arg("--bpffs")
        .arg(&bpffs)
        .arg("--cgroup")
        .arg(&cgroup)
        .arg("--cni-socket")
        .arg(&socket)
        .args(["--metrics-addr", "off"])
        .env("RUST_LOG", "info")
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .context("starting weir")?;
    guard.agent = Some(agent);
    let t0 = Instant::now();
    while !socket.exists() {
        ensure!(
            t0.elapsed() < Duration::from_secs(30),
            "weir did not open {} within 30 s; see {}",
            socket.display(),
            agent_dir.join("agent.log").display()
        );
        if let Some(a) = guard.agent.as_mut()
            && let Some(st) = a.try_wait()?
        {
            bail!(
                "weir exited ({st}); see {}",
                agent_dir.join("agent.log").display()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }

    // The suite in the agent's cgroup (ztunnel runs inside it too, so its
    // sockets meet weir's programs).
    println!(
        "peer-ztunnel: running {} (cwd {}, --test-threads=1)",
        suite.display(),
        run.display()
    );
    let started = Instant::now();
    let out = std::process::Command::new("sh")
        .arg("-c")
        .arg("echo $$ > \"$0/cgroup.procs\" && shift && exec \"$@\"")
        .arg(&cgroup)
        .arg("--")
        .arg(&suite)
        .arg("--test-threads=1")
        .args(filter)
        .current_dir(&run)
        // Several tests read ztunnel's access logs (info level).
        .env_remove("RUST_LOG")
        .stderr(std::process::Stdio::inherit())
        .output()
        .context("running the namespaced suite")?;
    let elapsed = started.elapsed();
    let stdout = String::from_utf8_lossy(&out.stdout);
    print!("{stdout}");
    let (passed, failed) = summary(&stdout).with_context(|| {
        format!(
            "no test summary in the suite's output (exit {:?}); agent log: {}",
            out.status,
            agent_dir.join("agent.log").display()
        )
    })?;
    let audit_text = std::fs::read_to_string(&audit).unwrap_or_default();
    let pods = audit_text.lines().count();
    let dirty: Vec<&str> = audit_text
        .lines()
        .filter(|l| !l.ends_with("iptables=0 ip6tables=0 nft=0"))
        .collect();
    drop(guard);
    println!(
        "peer-ztunnel: {passed} passed, {failed} failed in {:.1} s; {pods} pod netns enrolled by weir, rules per pod: {}",
        elapsed.as_secs_f64(),
        if dirty.is_empty() {
            "0 iptables, 0 ip6tables, 0 nft (every pod)".to_string()
        } else {
            format!("NOT zero: {dirty:?}")
        }
    );
    ensure!(
        failed == 0 && out.status.success(),
        "{failed} test(s) of ztunnel's suite failed with weir; agent log: {}",
        agent_dir.join("agent.log").display()
    );
    ensure!(pods > 0, "the redirect script never ran (no audit lines)");
    ensure!(dirty.is_empty(), "pods with iptables/nft rules: {dirty:?}");
    if filter.is_empty() {
        ensure!(
            passed == SUITE_TESTS,
            "{passed} tests passed, expected all {SUITE_TESTS}"
        );
    }
    let _ = std::fs::remove_dir_all(&run);
    Ok(())
}

/// `test result: ok. 30 passed; 0 failed; ...` -> (30, 0).
fn summary(out: &str) -> Option<(usize, usize)> {
    let line = out.lines().rev().find(|l| l.starts_with("test result:"))?;
    let num = |word: &str| -> Option<usize> {
        let i = line.find(word)?;
        line[..i].split_whitespace().last()?.parse().ok()
    };
    Some((num(" passed")?, num(" failed")?))
}

fn cgroup2_root() -> Result<PathBuf> {
    let mounts = std::fs::read_to_string("/proc/self/mounts")?;
    mounts
        .lines()
        .find_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() > 2 && f[2] == "cgroup2").then(|| PathBuf::from(f[1]))
        })
        .context("no cgroup2 mount in /proc/self/mounts")
}

/// Stops the agent and removes its pins, bpffs and cgroup.
struct Cleanup {
    weir: PathBuf,
    bpffs: PathBuf,
    cgroup: PathBuf,
    agent: Option<std::process::Child>,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        if let Some(mut a) = self.agent.take() {
            let _ = Cmd::new("kill")
                .args(["-TERM", &a.id().to_string()])
                .status();
            let t0 = Instant::now();
            while t0.elapsed() < Duration::from_secs(10) {
                if let Ok(Some(_)) = a.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            let _ = a.kill();
            let _ = a.wait();
        }
        let _ = Cmd::new(&self.weir)
            .arg("uninstall")
            .arg("--bpffs")
            .arg(&self.bpffs)
            .status();
        let _ = Cmd::new("umount").arg(&self.bpffs).status();
        // Leftover processes of the suite, if any, keep the cgroup busy.
        let _ = std::fs::remove_dir(&self.cgroup);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_commit_is_the_one_of_the_shared_source() {
        let readme = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../shared/reference/peers/ztunnel/README.md");
        let Ok(text) = std::fs::read_to_string(&readme) else {
            assert!(
                std::env::var_os("CI").is_none(),
                "{} is missing under CI",
                readme.display()
            );
            return;
        };
        assert!(
            text.contains(COMMIT),
            "{} names another commit",
            readme.display()
        );
        assert!(
            cache_dir().ends_with(&COMMIT[..8]) || std::env::var_os("WEIR_ZTUNNEL_CACHE").is_some()
        );
    }

    #[test]
    fn summary_reads_libtest_totals() {
        let out = "running 30 tests\n...\ntest result: ok. 30 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out; finished in 14.2s\n";
        assert_eq!(summary(out), Some((30, 0)));
        let bad = "test result: FAILED. 27 passed; 3 failed; 0 ignored";
        assert_eq!(summary(bad), Some((27, 3)));
        assert_eq!(summary("no tests"), None);
    }
}
