//! `cargo xtask kernel-test VERSION`: weir's kernel tests on another Linux
//! kernel, in a qemu VM (docs/kernels.md).
//!
//! The kernel is one of Debian's generic `linux-image-*-amd64-unsigned`
//! packages, fetched with `apt-get download` and unpacked with `dpkg-deb -x`
//! into a cache outside the checkout: it is never installed on the host.
//! virtme-ng (from PyPI, in a venv of that cache) boots it with the host's
//! filesystem shared read-only over 9p, so the guest runs the very test
//! executables the host built. qemu runs under TCG (`--disable-kvm`): the
//! machines this runs on have no usable KVM, so it is slow (10-30x) but real.
//!
//! vng's own exit code says nothing about the guest (it exits 255 after a
//! good run): the guest script writes each test executable's output and
//! exit code to a shared writable directory, and the verdict is read from
//! there. A test file that wrote no exit code (VM crashed or timed out)
//! is a failure, as is any missing tool: nothing here is skipped.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};

use crate::build::{self, EBPF_OBJECT_ENV};
use crate::cmd::{Cmd, shell_quote};
use crate::host;
use crate::toolchain;

/// The virtme-ng release this was verified with.
const VIRTME_NG: &str = "virtme-ng==1.42";

/// Test files that exercise kernel features (hooks, helpers, attach types,
/// map types) rather than weir's own logic: what `cargo xtask test` runs on
/// the older kernel. The differential (33 min under TCG) and the soak are
/// left to the host kernel; they test decisions and load, not features.
pub const FEATURE_TESTS: &[&str] = &[
    "capture",
    "dns",
    "virt",
    "fastpath",
    "lifecycle",
    "isolation",
    "cni_plugin",
];

/// Every kernel test file but the differential (`--tests all`).
const ALL_BUT_DIFFERENTIAL: &[&str] = &[
    "bad_input",
    "capture",
    "cni_plugin",
    "dashboard",
    "demo",
    "dns",
    "explain",
    "fastpath",
    "harness",
    "isolation",
    "k8s_agent",
    "lifecycle",
    "map_pressure",
    "observability",
    "soak",
    "virt",
];

/// What to run on which kernel.
#[derive(Debug, Clone)]
pub struct Options {
    /// A Linux series Debian packages, e.g. `6.1` or `6.12`.
    pub version: String,
    /// Test files (names under tests/tests, without `.rs`).
    pub tests: Vec<String>,
    /// Arguments for every test executable (after `--test-threads=1`).
    pub test_args: Vec<String>,
    /// Give up on the VM after this long.
    pub timeout: Duration,
}

impl Options {
    /// The test files `names` stands for: `all` (everything but the
    /// differential), `features` (the default) or a list.
    pub fn test_files(names: &[String]) -> Vec<String> {
        match names {
            [] => FEATURE_TESTS.iter().map(|s| s.to_string()).collect(),
            [one] if one == "features" => FEATURE_TESTS.iter().map(|s| s.to_string()).collect(),
            [one] if one == "all" => ALL_BUT_DIFFERENTIAL.iter().map(|s| s.to_string()).collect(),
            list => list.to_vec(),
        }
    }
}

/// One test file's result in the guest.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
struct FileResult {
    /// Exit code of the test executable; `None` if it never finished.
    code: Option<i32>,
    passed: usize,
    failed: Vec<String>,
    ignored: usize,
    seconds: Option<u64>,
}

impl FileResult {
    fn ok(&self) -> bool {
        self.code == Some(0) && self.failed.is_empty() && self.passed > 0
    }
}

/// Builds weir and its kernel tests on the host, then runs the test files
/// of `options` in a VM booted on the newest Debian kernel of the series
/// `options.version`. Fails unless every test of every file passed.
pub fn run(root: &Path, object: &Path, options: &Options) -> Result<()> {
    ensure!(
        host::is_root(),
        "cargo xtask kernel-test needs root (it installs qemu and runs the kernel tests)"
    );
    let started = Instant::now();
    let files = &options.tests;
    ensure!(!files.is_empty(), "no test files chosen");
    for f in files {
        ensure!(
            root.join("tests/tests").join(format!("{f}.rs")).is_file(),
            "--tests: there is no tests/tests/{f}.rs"
        );
    }
    let vng = ensure_tools()?;
    let kernel = ensure_kernel(&options.version)?;
    let exes = build_tests(root, object, files)?;
    let weir = build::host_target_dir(root).join("release").join("weir");
    ensure!(weir.is_file(), "{} was not built", weir.display());

    let out = build::host_target_dir(root)
        .join("kernel-matrix")
        .join(&options.version);
    let _ = fs::remove_dir_all(&out);
    fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    let list: String = files
        .iter()
        .map(|f| format!("{f} {}\n", exes[f].display()))
        .collect();
    fs::write(out.join("tests.list"), list)?;
    let script = out.join("guest.sh");
    fs::write(&script, guest_script(root, &weir, &out, &options.test_args))?;

    println!(
        "\n==> weir kernel-test {}: booting {} under TCG (slow: expect minutes per test file)",
        options.version,
        kernel.display()
    );
    let vm_started = Instant::now();
    // vng's exit code is not the guest's: read the verdict from `out`.
    // vng starts its helpers (virtme-run) by name: the venv goes on PATH.
    let venv_bin = vng.parent().context("vng has no directory")?;
    let path =
        host::path_with(venv_bin).unwrap_or_else(|| std::env::var_os("PATH").unwrap_or_default());
    let status = Cmd::new("timeout")
        .args(["-k", "30"])
        .arg(options.timeout.as_secs().to_string())
        .arg(&vng)
        .args([
            "--disable-kvm",
            "--force-9p",
            "--cpus",
            "2",
            "--memory",
            "2G",
        ])
        .arg("--run")
        .arg(&kernel)
        .arg("--rwdir")
        .arg(&out)
        .arg("--exec")
        .arg(format!("bash {}", shell_quote(&script.to_string_lossy())))
        .env("PATH", path)
        .dir(root)
        .status()
        .context("running virtme-ng")?;
    let vm_seconds = vm_started.elapsed().as_secs();
    if status.code() == Some(124) {
        println!(
            "weir kernel-test: the VM ran out of time ({} s)",
            options.timeout.as_secs()
        );
    }

    let guest_kernel = fs::read_to_string(out.join("uname"))
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "? (the guest script never started)".into());
    let mut results = BTreeMap::new();
    for f in files {
        results.insert(f.clone(), read_result(&out, f));
    }
    let summary = summary(&options.version, &guest_kernel, &results, vm_seconds);
    print!("{summary}");
    fs::write(out.join("summary.txt"), &summary)?;
    println!(
        "weir kernel-test: logs in {} ({} s in all)",
        out.display(),
        started.elapsed().as_secs()
    );
    ensure!(
        !guest_kernel.starts_with('?'),
        "the guest never ran weir's script; see vng's output above"
    );
    let bad: Vec<&str> = results
        .iter()
        .filter(|(_, r)| !r.ok())
        .map(|(f, _)| f.as_str())
        .collect();
    if !bad.is_empty() {
        bail!(
            "on Linux {guest_kernel}: {} failed (logs: {}/<file>.log)",
            bad.join(", "),
            out.display()
        );
    }
    Ok(())
}

/// Finds or installs qemu, kmod and virtme-ng; returns the `vng` path.
fn ensure_tools() -> Result<PathBuf> {
    let mut missing = Vec::new();
    if host::find_program("qemu-system-x86_64", &[]).is_none() {
        missing.push("qemu-system-x86");
    }
    if host::find_admin_program("modprobe").is_none() {
        missing.push("kmod");
    }
    if host::find_program("lz4", &[]).is_none() {
        missing.push("lz4");
    }
    // virtme-ng builds the guest's initramfs around a static busybox.
    if host::find_program("busybox", &[]).is_none() {
        missing.push("busybox-static");
    }
    if host::find_program("timeout", &[]).is_none() {
        missing.push("coreutils");
    }
    if Cmd::new("python3")
        .args(["-c", "import venv, ensurepip"])
        .read()
        .is_err()
    {
        missing.push("python3-venv");
    }
    if !missing.is_empty() {
        toolchain::apt_install(&missing)?;
    }
    ensure!(
        host::find_program("qemu-system-x86_64", &[]).is_some(),
        "qemu-system-x86_64 is still missing after installing qemu-system-x86"
    );
    let venv = cache_dir().join("venv");
    let vng = venv.join("bin/vng");
    if !host::is_executable(&vng) {
        let _ = fs::remove_dir_all(&venv);
        Cmd::new("python3")
            .args(["-m", "venv"])
            .arg(&venv)
            .run()
            .context("making a Python venv for virtme-ng")?;
        Cmd::new(venv.join("bin/pip"))
            .args(["install", "--quiet", VIRTME_NG])
            .run()
            .with_context(|| format!("installing {VIRTME_NG} from PyPI"))?;
    }
    ensure!(
        host::is_executable(&vng),
        "{} missing after installing {VIRTME_NG}",
        vng.display()
    );
    Ok(vng)
}

/// Where kernels and the virtme-ng venv are kept between runs:
/// `$WEIR_KERNEL_CACHE`, else `~/.cache/weir/kernels` (outside the
/// checkout, so a fresh clone reuses them).
fn cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("WEIR_KERNEL_CACHE").filter(|d| !d.is_empty()) {
        return PathBuf::from(dir);
    }
    let home = std::env::var_os("HOME").unwrap_or_else(|| "/root".into());
    Path::new(&home).join(".cache/weir/kernels")
}

/// The newest Debian generic kernel package of the series `version`, e.g.
/// `linux-image-6.1.0-57-amd64-unsigned` for `6.1` or
/// `linux-image-6.12.118+deb12-amd64-unsigned` for `6.12`.
fn newest_package(version: &str, apt_names: &str) -> Option<String> {
    let prefix = format!("linux-image-{version}.");
    apt_names
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| n.starts_with(&prefix) && n.ends_with("-amd64-unsigned"))
        // The generic flavour only: -cloud lacks 9p, -rt is another kernel.
        .filter(|n| !n.contains("-cloud-") && !n.contains("-rt-"))
        .max_by_key(|n| numbers(&n[prefix.len()..]))
        .map(str::to_owned)
}

/// The runs of digits in `s`, in order (a version sort key).
fn numbers(s: &str) -> Vec<u64> {
    s.split(|c: char| !c.is_ascii_digit())
        .filter(|p| !p.is_empty())
        .filter_map(|p| p.parse().ok())
        .collect()
}

/// Downloads and unpacks (once) the kernel of series `version`; returns
/// its `vmlinuz`.
fn ensure_kernel(version: &str) -> Result<PathBuf> {
    ensure!(
        !version.is_empty() && version.chars().all(|c| c.is_ascii_digit() || c == '.'),
        "kernel version {version:?}: expected a series such as 6.1 or 6.12"
    );
    let search = || {
        Cmd::new("apt-cache")
            .args(["search", "--names-only"])
            .arg(format!("^linux-image-{}\\.", version.replace('.', "\\.")))
            .read()
    };
    let mut found = newest_package(version, &search().unwrap_or_default());
    if found.is_none() {
        Cmd::new("apt-get")
            .arg("update")
            .env("DEBIAN_FRONTEND", "noninteractive")
            .run()
            .context("apt-get update")?;
        found = newest_package(version, &search()?);
    }
    let package = found.with_context(|| {
        format!(
            "Debian has no linux-image-{version}.*-amd64-unsigned package here \
             (`apt-cache search linux-image-{version}`); Debian 12 has 6.1 and 6.12"
        )
    })?;
    let dir = cache_dir().join(&package);
    if vmlinuz(&dir).is_none() {
        let tmp = cache_dir().join(format!("{package}.partial"));
        let _ = fs::remove_dir_all(&tmp);
        fs::create_dir_all(&tmp)?;
        Cmd::new("apt-get")
            .args(["download", &package])
            .dir(&tmp)
            .run()
            .with_context(|| format!("downloading {package}"))?;
        let deb = fs::read_dir(&tmp)?
            .filter_map(|e| e.ok())
            .map(|e| e.path())
            .find(|p| p.extension().is_some_and(|e| e == "deb"))
            .with_context(|| format!("apt-get download {package} left no .deb"))?;
        let unpacked = tmp.join("root");
        // Unpacked, never installed: the host's kernel and boot are untouched.
        Cmd::new("dpkg-deb")
            .arg("-x")
            .arg(&deb)
            .arg(&unpacked)
            .run()?;
        fs::remove_file(&deb)?;
        let _ = fs::remove_dir_all(&dir);
        fs::rename(&unpacked, &dir)?;
        let _ = fs::remove_dir_all(&tmp);
    }
    vmlinuz(&dir).with_context(|| format!("no boot/vmlinuz-* in {}", dir.display()))
}

fn vmlinuz(dir: &Path) -> Option<PathBuf> {
    fs::read_dir(dir.join("boot"))
        .ok()?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("vmlinuz-"))
        })
}

/// Builds the test executables of `files` (release, as the host's kernel
/// tests) and returns them by file name.
fn build_tests(root: &Path, object: &Path, files: &[String]) -> Result<BTreeMap<String, PathBuf>> {
    Cmd::new(host::cargo())
        .args(["build", "--release", "--package", "weir-agent"])
        .env(EBPF_OBJECT_ENV, object)
        .dir(root)
        .run()?;
    let mut cmd = Cmd::new(host::cargo()).args([
        "test",
        "--release",
        "--package",
        "weir-tests",
        "--no-run",
        "--message-format=json-render-diagnostics",
    ]);
    for f in files {
        cmd = cmd.args(["--test", f]);
    }
    let json = cmd
        .env(EBPF_OBJECT_ENV, object)
        .dir(root)
        .run_capture_stdout()?;
    let exes = test_executables(&json);
    for f in files {
        ensure!(
            exes.contains_key(f),
            "cargo built no test executable for tests/tests/{f}.rs"
        );
    }
    Ok(exes)
}

/// Test executables by target name, from cargo's JSON messages.
fn test_executables(json: &str) -> BTreeMap<String, PathBuf> {
    json.lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|m| m["reason"] == "compiler-artifact")
        .filter(|m| {
            m["target"]["kind"]
                .as_array()
                .is_some_and(|k| k.iter().any(|k| k == "test"))
        })
        .filter_map(|m| {
            Some((
                m["target"]["name"].as_str()?.to_owned(),
                PathBuf::from(m["executable"].as_str()?),
            ))
        })
        .collect()
}

/// The script the guest runs: each test executable in turn, its output,
/// exit code and duration written to `out`.
fn guest_script(root: &Path, weir: &Path, out: &Path, test_args: &[String]) -> String {
    let q = |p: &Path| shell_quote(&p.to_string_lossy());
    let args: Vec<String> = test_args.iter().map(|a| shell_quote(a)).collect();
    format!(
        r#"#!/bin/bash
# Written by `cargo xtask kernel-test`; runs inside the VM.
set -u
out={out}
uname -r > "$out/uname"
exec >"$out/guest.log" 2>&1
# The guest has cgroup2 but no bpffs, and the modules weir's tests use are
# not loaded yet.
mountpoint -q /sys/fs/bpf || mount -t bpf bpf /sys/fs/bpf
for m in veth sch_ingress cls_bpf dummy; do
    modprobe "$m" || echo "modprobe $m failed"
done
export WEIR_BIN={weir}
export WEIR_REQUIRE_KERNEL_TESTS=1
export RUST_BACKTRACE=0
# Emulation is 10-30x slower: the tests wait longer for what must happen
# (an agent's start, a log line); what they check is unchanged.
export WEIR_TEST_TIMEOUT_SCALE=5
# Cargo runs tests from their package's directory.
cd {tests}
while read -r name exe; do
    echo "== $name"
    start=$(date +%s)
    "$exe" --test-threads=1 {args} >"$out/$name.log" 2>&1
    echo $? >"$out/$name.rc"
    echo $(( $(date +%s) - start )) >"$out/$name.secs"
done <"$out/tests.list"
touch "$out/done"
poweroff -f 2>/dev/null || true
"#,
        out = q(out),
        weir = q(weir),
        tests = q(&root.join("tests")),
        args = args.join(" "),
    )
}

/// What the guest wrote for test file `name`.
fn read_result(out: &Path, name: &str) -> FileResult {
    let log = fs::read_to_string(out.join(format!("{name}.log"))).unwrap_or_default();
    let mut r = parse_libtest(&log);
    r.code = fs::read_to_string(out.join(format!("{name}.rc")))
        .ok()
        .and_then(|s| s.trim().parse().ok());
    r.seconds = fs::read_to_string(out.join(format!("{name}.secs")))
        .ok()
        .and_then(|s| s.trim().parse().ok());
    r
}

/// Counts libtest's `test NAME ... ok|FAILED|ignored` lines.
fn parse_libtest(log: &str) -> FileResult {
    let mut r = FileResult::default();
    for line in log.lines() {
        let Some(rest) = line.strip_prefix("test ") else {
            continue;
        };
        let Some((name, verdict)) = rest.rsplit_once(" ... ") else {
            continue;
        };
        match verdict.trim() {
            "ok" => r.passed += 1,
            "FAILED" => r.failed.push(name.trim().to_owned()),
            v if v.starts_with("ignored") => r.ignored += 1,
            _ => {}
        }
    }
    r
}

fn summary(
    series: &str,
    guest_kernel: &str,
    results: &BTreeMap<String, FileResult>,
    vm_seconds: u64,
) -> String {
    use std::fmt::Write as _;
    let mut s = format!("\nweir kernel-test summary: Linux {series} (guest {guest_kernel})\n");
    let _ = writeln!(
        s,
        "  {:<14} {:>6} {:>6} {:>7} {:>7}  result",
        "test file", "passed", "failed", "ignored", "time"
    );
    let (mut passed, mut failed) = (0, 0);
    for (name, r) in results {
        passed += r.passed;
        failed += r.failed.len();
        let result = match r.code {
            None => "DID NOT FINISH".to_owned(),
            Some(_) if r.ok() => "ok".to_owned(),
            Some(0) if r.passed == 0 => "FAILED (no test ran)".to_owned(),
            Some(c) => format!("FAILED (exit {c})"),
        };
        let time = r.seconds.map(|t| format!("{t}s")).unwrap_or_default();
        let _ = writeln!(
            s,
            "  {name:<14} {:>6} {:>6} {:>7} {time:>7}  {result}",
            r.passed,
            r.failed.len(),
            r.ignored
        );
        for f in &r.failed {
            let _ = writeln!(s, "      failed: {f}");
        }
    }
    let _ = writeln!(s, "  VM wall time {vm_seconds}s");
    // The plain closing line CI log readers understand.
    let _ = writeln!(s, "kernel-test: {passed} passed, {failed} failed");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn picks_the_newest_generic_kernel_of_a_series() {
        let apt = "\
linux-image-6.1.0-9-amd64-unsigned - Linux 6.1 for 64-bit PCs
linux-image-6.1.0-57-amd64-unsigned - Linux 6.1 for 64-bit PCs
linux-image-6.1.0-57-cloud-amd64-unsigned - Linux 6.1 for x86-64 cloud
linux-image-6.1.0-58-rt-amd64-unsigned - Linux 6.1 PREEMPT_RT
linux-image-6.12.118+deb12-amd64-unsigned - Linux 6.12 for 64-bit PCs
linux-image-6.12.9+deb12-amd64-unsigned - Linux 6.12 for 64-bit PCs
";
        assert_eq!(
            newest_package("6.1", apt).as_deref(),
            Some("linux-image-6.1.0-57-amd64-unsigned")
        );
        assert_eq!(
            newest_package("6.12", apt).as_deref(),
            Some("linux-image-6.12.118+deb12-amd64-unsigned")
        );
        assert_eq!(newest_package("5.15", apt), None);
    }

    #[test]
    fn libtest_lines_are_counted() {
        let log = "\
running 3 tests
test a ... ok
test b ... FAILED
test c ... ignored, asserts limitations
test d has a name ... ok
test result: FAILED. 2 passed; 1 failed; 1 ignored
";
        let r = parse_libtest(log);
        assert_eq!(r.passed, 2);
        assert_eq!(r.failed, ["b"]);
        assert_eq!(r.ignored, 1);
        assert!(
            !FileResult {
                code: Some(0),
                ..r.clone()
            }
            .ok()
        );
        let good = FileResult {
            code: Some(0),
            ..parse_libtest("test a ... ok\n")
        };
        assert!(good.ok());
        // An executable that ran no test is no pass.
        assert!(
            !FileResult {
                code: Some(0),
                ..FileResult::default()
            }
            .ok()
        );
    }

    #[test]
    fn test_executables_come_from_cargo_json() {
        let json = r#"{"reason":"compiler-artifact","target":{"kind":["test"],"name":"capture"},"executable":"/t/release/deps/capture-1"}
{"reason":"compiler-artifact","target":{"kind":["bin"],"name":"weir-soak"},"executable":"/t/release/weir-soak"}
{"reason":"build-finished","success":true}"#;
        let exes = test_executables(json);
        assert_eq!(exes.len(), 1);
        assert_eq!(exes["capture"], PathBuf::from("/t/release/deps/capture-1"));
    }

    #[test]
    fn test_file_lists() {
        assert_eq!(Options::test_files(&[]).len(), FEATURE_TESTS.len());
        assert!(
            !Options::test_files(&["all".into()])
                .iter()
                .any(|f| f == "differential")
        );
        assert_eq!(Options::test_files(&["dns".into()]), ["dns"]);
    }
}
