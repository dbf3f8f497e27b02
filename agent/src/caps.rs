//! What `weir run` needs from the host, checked before anything is loaded:
//! the agent's Linux capabilities, and the kernel features its programs use
//! (cgroup v2, BTF, kernel version), plus the `--cgroup` directory.
//!
//! Each check reads plain files (`/proc/self/status`, `/proc/self/mounts`,
//! `/proc/sys/kernel/osrelease`, `/sys/kernel/btf/vmlinux`) through a
//! [`Host`], so the logic is unit tested against fake files: hosts without
//! BTF or with cgroup v1 only cannot be reproduced on a test machine.
//!
//! Only what makes the agent useless is an error (no way to load BPF at all,
//! no cgroup v2, a `--cgroup` that is not a cgroup v2 directory); anything
//! else is one warning that names what is missing, what it is for, and how
//! to fix it, and the agent goes on.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{Result, bail};
use log::{error, info, warn};

/// A capability weir uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cap {
    /// Bit number in the capability sets (`linux/capability.h`).
    pub bit: u32,
    /// Name, as `capsh` and Kubernetes (without `CAP_`) spell it.
    pub name: &'static str,
    /// What weir does with it.
    pub what: &'static str,
}

/// `CAP_NET_ADMIN`.
pub const CAP_NET_ADMIN: Cap = Cap {
    bit: 12,
    name: "CAP_NET_ADMIN",
    what: "load and attach the networking programs (cgroup connect/sockops/sockopt, sk_lookup) \
           and add ::6 to an IPv6 pod's lo",
};
/// `CAP_SYS_PTRACE`.
pub const CAP_SYS_PTRACE: Cap = Cap {
    bit: 19,
    name: "CAP_SYS_PTRACE",
    what: "adopt proxies that were already listening when their pod was enrolled \
           (pidfd_getfd, /proc/PID/fd) and open other users' /proc/PID/ns/net (Kubernetes mode)",
};
/// `CAP_SYS_ADMIN`.
pub const CAP_SYS_ADMIN: Cap = Cap {
    bit: 21,
    name: "CAP_SYS_ADMIN",
    what: "join pods' network namespaces (setns) to read their cookie and addresses, \
           and mount a bpffs; it also stands in for CAP_BPF and CAP_PERFMON",
};
/// `CAP_PERFMON` (Linux 5.8+).
pub const CAP_PERFMON: Cap = Cap {
    bit: 38,
    name: "CAP_PERFMON",
    what: "let the verifier accept programs without Spectre hardening \
           (only needed without CAP_SYS_ADMIN)",
};
/// `CAP_BPF` (Linux 5.8+).
pub const CAP_BPF: Cap = Cap {
    bit: 39,
    name: "CAP_BPF",
    what: "create maps and load programs (only needed without CAP_SYS_ADMIN)",
};

/// Every capability weir checks, in the order messages list them.
pub const ALL: &[Cap] = &[
    CAP_SYS_ADMIN,
    CAP_NET_ADMIN,
    CAP_SYS_PTRACE,
    CAP_BPF,
    CAP_PERFMON,
];

/// The oldest kernel weir is tested for (sk_lookup, cgroup getpeername and
/// getsockopt hooks, `SO_NETNS_COOKIE`, netns cookies in sockops).
pub const MIN_KERNEL: (u32, u32) = (5, 15);

/// `CGROUP2_SUPER_MAGIC` (`linux/magic.h`).
const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;

/// Where the host's facts are read (the real host, or a fake root in
/// tests).
#[derive(Debug, Clone)]
pub struct Host {
    /// `/proc` (its `self/status`, `self/mounts`, `sys/kernel/osrelease`).
    pub proc: PathBuf,
    /// `/sys` (its `kernel/btf/vmlinux`).
    pub sys: PathBuf,
}

impl Default for Host {
    fn default() -> Self {
        Self {
            proc: "/proc".into(),
            sys: "/sys".into(),
        }
    }
}

/// The effective capability set from `/proc/PID/status` text (`CapEff:`,
/// 16 hex digits).
pub fn parse_cap_eff(status: &str) -> Option<u64> {
    status.lines().find_map(|l| {
        let hex = l.strip_prefix("CapEff:")?.trim();
        u64::from_str_radix(hex, 16).ok()
    })
}

/// The capabilities of [`ALL`] missing from `eff`.
pub fn missing(eff: u64) -> Vec<Cap> {
    ALL.iter()
        .copied()
        .filter(|c| eff & (1u64 << c.bit) == 0)
        .collect()
}

/// What the capability check concludes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CapVerdict {
    /// Everything weir uses is there.
    Complete,
    /// Some are missing; weir runs with less (the message says what).
    Degraded(String),
    /// Nothing can be loaded: the message says what to add.
    Fatal(String),
}

/// Judges an effective capability set.
pub fn judge(eff: u64) -> CapVerdict {
    let miss = missing(eff);
    let lacks = |c: Cap| miss.contains(&c);
    if lacks(CAP_SYS_ADMIN) && lacks(CAP_BPF) {
        return CapVerdict::Fatal(format!(
            "missing capabilities {}: neither CAP_BPF nor CAP_SYS_ADMIN is in the effective set, \
             so no BPF map or program can be created; run as root, or grant {} \
             (Kubernetes: securityContext.capabilities.add: [SYS_ADMIN, NET_ADMIN, SYS_PTRACE])",
            names(&miss),
            names(&needed()),
        ));
    }
    // With CAP_SYS_ADMIN, CAP_BPF and CAP_PERFMON add nothing.
    let has_admin = !lacks(CAP_SYS_ADMIN);
    let relevant: Vec<Cap> = miss
        .iter()
        .copied()
        .filter(|c| !(has_admin && (*c == CAP_BPF || *c == CAP_PERFMON)))
        .collect();
    if relevant.is_empty() {
        return CapVerdict::Complete;
    }
    let mut msg = format!("missing capabilities {}:", names(&relevant));
    for c in &relevant {
        let _ = write!(msg, " without {} weir cannot {};", c.name, c.what);
    }
    let _ = write!(
        msg,
        " grant {} for full function (see docs/security.md)",
        names(&needed())
    );
    CapVerdict::Degraded(msg)
}

/// The capabilities `weir run` needs for everything it does.
pub fn needed() -> Vec<Cap> {
    vec![CAP_SYS_ADMIN, CAP_NET_ADMIN, CAP_SYS_PTRACE]
}

fn names(caps: &[Cap]) -> String {
    caps.iter().map(|c| c.name).collect::<Vec<_>>().join(", ")
}

/// How cgroups are mounted, from `/proc/self/mounts` text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CgroupLayout {
    /// A cgroup2 mount (unified, or hybrid with v1 controllers beside it).
    V2(PathBuf),
    /// Only cgroup v1 hierarchies.
    V1Only,
    /// No cgroup filesystem at all.
    None,
}

/// Finds the cgroup layout in `/proc/self/mounts` text.
pub fn cgroup_layout(mounts: &str) -> CgroupLayout {
    let mut v1 = false;
    for l in mounts.lines() {
        let mut f = l.split_whitespace();
        let (Some(_dev), Some(dir), Some(fstype)) = (f.next(), f.next(), f.next()) else {
            continue;
        };
        match fstype {
            "cgroup2" => return CgroupLayout::V2(unescape_mount_path(dir)),
            "cgroup" => v1 = true,
            _ => {}
        }
    }
    if v1 {
        CgroupLayout::V1Only
    } else {
        CgroupLayout::None
    }
}

/// `/proc/self/mounts` escapes space, tab, newline and backslash as octal.
fn unescape_mount_path(s: &str) -> PathBuf {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|d| (b'0'..=b'7').contains(d))
        {
            let v = (b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    use std::os::unix::ffi::OsStringExt;
    PathBuf::from(std::ffi::OsString::from_vec(out))
}

/// `(major, minor)` of a kernel release string like `6.18.0-1-amd64`.
pub fn parse_release(release: &str) -> Option<(u32, u32)> {
    let mut it = release.trim().split(|c: char| !c.is_ascii_digit());
    let major = it.next()?.parse().ok()?;
    let minor = it.next()?.parse().ok()?;
    Some((major, minor))
}

/// Checks a `--cgroup` directory: it must exist and be on cgroup2.
pub fn check_cgroup_dir(path: &Path) -> Result<()> {
    let st = match nix::sys::statfs::statfs(path) {
        Ok(st) => st,
        Err(e) => bail!(
            "--cgroup {}: {e}; pass an existing cgroup v2 directory (e.g. the cgroup2 mount \
             listed in /proc/self/mounts, or a directory under it)",
            path.display()
        ),
    };
    if !path.is_dir() {
        bail!(
            "--cgroup {}: not a directory; pass a cgroup v2 directory",
            path.display()
        );
    }
    let magic = st.filesystem_type().0 as i64;
    if magic != CGROUP2_SUPER_MAGIC {
        bail!(
            "--cgroup {}: not a cgroup v2 directory (filesystem magic {magic:#x}, cgroup2 is {:#x}); \
             weir's programs attach to cgroup v2 only: pass the cgroup2 mount or a directory under it",
            path.display(),
            CGROUP2_SUPER_MAGIC
        );
    }
    Ok(())
}

/// Everything [`preflight`] found, before logging: fatal problems and
/// warnings.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Findings {
    /// Problems that stop the agent.
    pub fatal: Vec<String>,
    /// Problems the agent runs with.
    pub warnings: Vec<String>,
}

/// Checks `host` (and `cgroup`, when `--cgroup` was given; its filesystem
/// is checked on the real host). Fatal findings come in the order they
/// should be fixed: the cgroup (`--cgroup`, or cgroup v2 on the host)
/// first, then capabilities.
pub fn examine(host: &Host, cgroup: Option<&Path>) -> Findings {
    let mut f = Findings::default();
    // The operator's own argument first: it is the likeliest mistake.
    match cgroup {
        Some(c) => {
            if let Err(e) = check_cgroup_dir(c) {
                f.fatal.push(format!("{e:#}"));
            }
        }
        None => match std::fs::read_to_string(host.proc.join("self/mounts")) {
            Ok(m) => match cgroup_layout(&m) {
                CgroupLayout::V2(_) => {}
                CgroupLayout::V1Only => f.fatal.push(
                    "this host mounts cgroup v1 only: weir's programs attach to cgroup v2; \
                     boot with systemd.unified_cgroup_hierarchy=1 (or mount cgroup2 and pass \
                     --cgroup DIR)"
                        .to_string(),
                ),
                CgroupLayout::None => f.fatal.push(
                    "no cgroup filesystem is mounted: weir needs cgroup v2; mount one \
                     (mount -t cgroup2 none /sys/fs/cgroup) or pass --cgroup DIR"
                        .to_string(),
                ),
            },
            Err(e) => f.warnings.push(format!(
                "cannot read {}: {e}; not checking for cgroup v2",
                host.proc.join("self/mounts").display()
            )),
        },
    }
    match std::fs::read_to_string(host.proc.join("self/status"))
        .ok()
        .as_deref()
        .and_then(parse_cap_eff)
    {
        Some(eff) => match judge(eff) {
            CapVerdict::Complete => {}
            CapVerdict::Degraded(m) => f.warnings.push(m),
            CapVerdict::Fatal(m) => f.fatal.push(m),
        },
        None => f.warnings.push(format!(
            "cannot read CapEff from {}; not checking capabilities",
            host.proc.join("self/status").display()
        )),
    }
    match std::fs::read_to_string(host.proc.join("sys/kernel/osrelease"))
        .ok()
        .as_deref()
        .map(|r| (r.trim().to_string(), parse_release(r)))
    {
        Some((r, Some(v))) if v < MIN_KERNEL => f.warnings.push(format!(
            "kernel {r} is older than {}.{}, the oldest weir supports: loading its programs \
             will likely fail (unless the needed BPF features were backported)",
            MIN_KERNEL.0, MIN_KERNEL.1
        )),
        _ => {}
    }
    let btf = host.sys.join("kernel/btf/vmlinux");
    if !btf.exists() {
        f.warnings.push(format!(
            "{} is missing: this kernel has no BTF (CONFIG_DEBUG_INFO_BTF), which weir's \
             programs need; loading them will likely fail. Use a kernel built with BTF",
            btf.display()
        ));
    }
    f
}

/// Runs every check on the real host at the start of `weir run`: logs the
/// warnings, and fails with the first fatal problem.
pub fn preflight(cgroup: Option<&Path>) -> Result<()> {
    let f = examine(&Host::default(), cgroup);
    for w in &f.warnings {
        warn!("{w}");
    }
    for e in f.fatal.iter().skip(1) {
        error!("{e}");
    }
    if let Some(e) = f.fatal.first() {
        bail!("{e}");
    }
    if f.warnings.is_empty() {
        info!("host check passed: capabilities, BTF, cgroup v2");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const ROOT_STATUS: &str = "Name:\tweir\nUmask:\t0022\nState:\tR (running)\n\
        CapInh:\t0000000000000000\nCapPrm:\t000001ffffffffff\nCapEff:\t000001ffffffffff\n\
        CapBnd:\t000001ffffffffff\nCapAmb:\t0000000000000000\nNoNewPrivs:\t0\n";

    fn bits(caps: &[Cap]) -> u64 {
        caps.iter().fold(0, |a, c| a | (1 << c.bit))
    }

    #[test]
    fn cap_eff_is_read_from_status() {
        assert_eq!(parse_cap_eff(ROOT_STATUS), Some(0x1ff_ffff_ffff));
        assert_eq!(parse_cap_eff("CapEff:\t0000000000003000\n"), Some(0x3000));
        assert_eq!(parse_cap_eff("CapPrm:\t00000000000000ff\n"), None);
        assert_eq!(parse_cap_eff("CapEff:\tzz\n"), None);
        assert_eq!(parse_cap_eff(""), None);
    }

    #[test]
    fn full_root_is_complete() {
        assert_eq!(judge(0x1ff_ffff_ffff), CapVerdict::Complete);
        assert!(missing(0x1ff_ffff_ffff).is_empty());
        // SYS_ADMIN covers BPF and PERFMON (kernels before 5.8 have neither).
        assert_eq!(
            judge(bits(&[CAP_SYS_ADMIN, CAP_NET_ADMIN, CAP_SYS_PTRACE])),
            CapVerdict::Complete
        );
    }

    #[test]
    fn nothing_loads_without_bpf_and_sys_admin() {
        let CapVerdict::Fatal(m) = judge(0) else {
            panic!("no capabilities must be fatal");
        };
        assert!(m.starts_with("missing capabilities CAP_SYS_ADMIN, CAP_NET_ADMIN, CAP_SYS_PTRACE, CAP_BPF, CAP_PERFMON:"), "{m}");
        assert!(m.contains("neither CAP_BPF nor CAP_SYS_ADMIN"), "{m}");
        let CapVerdict::Fatal(_) = judge(bits(&[CAP_NET_ADMIN, CAP_SYS_PTRACE, CAP_PERFMON]))
        else {
            panic!("NET_ADMIN alone cannot load");
        };
    }

    #[test]
    fn missing_optional_ones_are_named_with_their_purpose() {
        let CapVerdict::Degraded(m) = judge(bits(&[CAP_SYS_ADMIN, CAP_NET_ADMIN])) else {
            panic!("missing SYS_PTRACE must be reported");
        };
        assert!(m.starts_with("missing capabilities CAP_SYS_PTRACE:"), "{m}");
        assert!(m.contains("pidfd_getfd"), "{m}");
        // CAP_BPF without CAP_SYS_ADMIN: loads, but cannot join netns.
        let CapVerdict::Degraded(m) = judge(bits(&[CAP_BPF, CAP_NET_ADMIN, CAP_PERFMON])) else {
            panic!("missing SYS_ADMIN must be reported");
        };
        assert!(
            m.starts_with("missing capabilities CAP_SYS_ADMIN, CAP_SYS_PTRACE:"),
            "{m}"
        );
        assert!(m.contains("setns"), "{m}");
        let CapVerdict::Degraded(m) = judge(bits(&[CAP_BPF, CAP_NET_ADMIN])) else {
            panic!();
        };
        assert!(m.contains("CAP_PERFMON"), "{m}");
    }

    #[test]
    fn cgroup_layouts() {
        let unified = "sysfs /sys sysfs rw 0 0\ncgroup2 /sys/fs/cgroup cgroup2 rw,nsdelegate 0 0\n";
        assert_eq!(
            cgroup_layout(unified),
            CgroupLayout::V2("/sys/fs/cgroup".into())
        );
        let hybrid = "tmpfs /sys/fs/cgroup tmpfs ro 0 0\n\
            cgroup2 /sys/fs/cgroup/unified cgroup2 rw 0 0\n\
            cgroup /sys/fs/cgroup/cpu,cpuacct cgroup rw,cpu,cpuacct 0 0\n";
        assert_eq!(
            cgroup_layout(hybrid),
            CgroupLayout::V2("/sys/fs/cgroup/unified".into())
        );
        let v1 = "tmpfs /sys/fs/cgroup tmpfs ro 0 0\n\
            cgroup /sys/fs/cgroup/systemd cgroup rw,name=systemd 0 0\n\
            cgroup /sys/fs/cgroup/memory cgroup rw,memory 0 0\n";
        assert_eq!(cgroup_layout(v1), CgroupLayout::V1Only);
        assert_eq!(
            cgroup_layout("proc /proc proc rw 0 0\n"),
            CgroupLayout::None
        );
        assert_eq!(cgroup_layout(""), CgroupLayout::None);
        assert_eq!(
            cgroup_layout("none /run/my\\040cg cgroup2 rw 0 0\n"),
            CgroupLayout::V2("/run/my cg".into())
        );
    }

    #[test]
    fn kernel_releases() {
        assert_eq!(parse_release("6.18.0-1-amd64\n"), Some((6, 18)));
        assert_eq!(parse_release("5.15.0"), Some((5, 15)));
        assert_eq!(parse_release("4.18.0-553.el8_10.x86_64"), Some((4, 18)));
        assert_eq!(parse_release("junk"), None);
        assert!((4, 18) < MIN_KERNEL && (5, 15) >= MIN_KERNEL && (6, 1) > MIN_KERNEL);
    }

    /// A fake host: `/proc/self/status`, `/proc/self/mounts`,
    /// `/proc/sys/kernel/osrelease` and maybe `/sys/kernel/btf/vmlinux`.
    fn fake_host(status: &str, mounts: &str, release: &str, btf: bool) -> (Host, PathBuf) {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let root = std::env::temp_dir().join(format!(
            "weir-caps-{}-{}",
            std::process::id(),
            N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        ));
        let proc = root.join("proc");
        let sys = root.join("sys");
        std::fs::create_dir_all(proc.join("self")).unwrap();
        std::fs::create_dir_all(proc.join("sys/kernel")).unwrap();
        std::fs::create_dir_all(sys.join("kernel/btf")).unwrap();
        std::fs::write(proc.join("self/status"), status).unwrap();
        std::fs::write(proc.join("self/mounts"), mounts).unwrap();
        std::fs::write(proc.join("sys/kernel/osrelease"), release).unwrap();
        if btf {
            std::fs::write(sys.join("kernel/btf/vmlinux"), b"\x9f\xeb").unwrap();
        }
        (Host { proc, sys }, root)
    }

    const V2: &str = "cgroup2 /sys/fs/cgroup cgroup2 rw 0 0\n";

    #[test]
    fn healthy_host_has_no_findings() {
        let (h, root) = fake_host(ROOT_STATUS, V2, "6.18.0\n", true);
        assert_eq!(examine(&h, None), Findings::default());
        let _ = std::fs::remove_dir_all(root);
    }

    #[test]
    fn host_without_btf_is_warned_about() {
        let (h, root) = fake_host(ROOT_STATUS, V2, "6.18.0\n", false);
        let f = examine(&h, None);
        assert!(f.fatal.is_empty(), "{f:?}");
        assert_eq!(f.warnings.len(), 1, "{f:?}");
        assert!(f.warnings[0].contains("kernel/btf/vmlinux is missing: this kernel has no BTF"));
        let _ = std::fs::remove_dir_all(root);
    }

    #[test]
    fn old_kernel_is_warned_about() {
        let (h, root) = fake_host(ROOT_STATUS, V2, "5.4.0-100-generic\n", true);
        let f = examine(&h, None);
        assert!(f.fatal.is_empty(), "{f:?}");
        assert!(
            f.warnings[0].starts_with("kernel 5.4.0-100-generic is older than 5.15"),
            "{f:?}"
        );
        let _ = std::fs::remove_dir_all(root);
    }

    #[test]
    fn cgroup_v1_only_host_is_refused() {
        let v1 = "cgroup /sys/fs/cgroup/memory cgroup rw,memory 0 0\n";
        let (h, root) = fake_host(ROOT_STATUS, v1, "6.18.0\n", true);
        let f = examine(&h, None);
        assert_eq!(f.fatal.len(), 1, "{f:?}");
        assert!(
            f.fatal[0].starts_with("this host mounts cgroup v1 only"),
            "{f:?}"
        );
        let (h, root2) = fake_host(ROOT_STATUS, "proc /proc proc rw 0 0\n", "6.18.0\n", true);
        let f = examine(&h, None);
        assert!(
            f.fatal[0].starts_with("no cgroup filesystem is mounted"),
            "{f:?}"
        );
        let _ = std::fs::remove_dir_all(root);
        let _ = std::fs::remove_dir_all(root2);
    }

    #[test]
    fn unprivileged_host_is_refused() {
        let (h, root) = fake_host("CapEff:\t0000000000000000\n", V2, "6.18.0\n", true);
        let f = examine(&h, None);
        assert!(f.fatal[0].starts_with("missing capabilities "), "{f:?}");
        let _ = std::fs::remove_dir_all(root);
    }

    #[test]
    fn cgroup_dir_must_be_cgroup2() {
        let e = check_cgroup_dir(Path::new("/nonexistent/weir-cg")).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("--cgroup /nonexistent/weir-cg: ENOENT"),
            "{e}"
        );
        let tmp = std::env::temp_dir();
        let e = check_cgroup_dir(&tmp).unwrap_err();
        assert!(e.to_string().contains("not a cgroup v2 directory"), "{e}");
    }
}
