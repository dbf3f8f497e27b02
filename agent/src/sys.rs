//! The few system calls aya and nix do not wrap for us.
//!
//! Each function is one syscall with a fixed-layout argument; the `unsafe`
//! blocks only pass pointers to locals that outlive the call.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

/// `enum bpf_cmd` values (include/uapi/linux/bpf.h).
const BPF_MAP_GET_NEXT_KEY: libc::c_long = 4;
const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_OBJ_PIN: libc::c_long = 6;
const BPF_OBJ_GET: libc::c_long = 7;
const BPF_LINK_CREATE: libc::c_long = 28;
const BPF_LINK_UPDATE: libc::c_long = 29;

/// `SO_NETNS_COOKIE` (asm-generic/socket.h, Linux 5.14+).
const SO_NETNS_COOKIE: libc::c_int = 71;

/// `bpf_attr` for `BPF_OBJ_GET`.
#[repr(C)]
#[derive(Default)]
struct ObjGetAttr {
    pathname: u64,
    bpf_fd: u32,
    file_flags: u32,
    path_fd: i32,
    _pad: u32,
}

/// `bpf_attr` for `BPF_LINK_CREATE` (the common prefix).
#[repr(C)]
#[derive(Default)]
struct LinkCreateAttr {
    prog_fd: u32,
    target_fd: u32,
    attach_type: u32,
    flags: u32,
}

/// `bpf_attr` for `BPF_PROG_LOAD` (the prefix up to the license).
#[repr(C)]
#[derive(Default)]
struct ProgLoadAttr {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
}

/// `bpf_attr` for `BPF_LINK_UPDATE`.
#[repr(C)]
#[derive(Default)]
struct LinkUpdateAttr {
    link_fd: u32,
    new_prog_fd: u32,
    flags: u32,
    old_prog_fd: u32,
}

/// `bpf_attr` for `BPF_MAP_GET_NEXT_KEY`.
#[repr(C)]
#[derive(Default)]
struct MapNextKeyAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    next_key: u64,
}

fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> io::Result<libc::c_long> {
    // SAFETY: `attr` is a live, correctly laid out bpf_attr prefix of
    // `size_of::<T>()` bytes; the kernel zero-extends the rest.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *mut T as *mut libc::c_void,
            std::mem::size_of::<T>() as libc::c_uint,
        )
    };
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// The number of keys in the map `map` (whose keys are `key_size`
/// bytes), whatever their type: one `BPF_MAP_GET_NEXT_KEY` per key.
pub fn map_key_count(map: BorrowedFd<'_>, key_size: u32) -> io::Result<usize> {
    let size = key_size as usize;
    let (mut key, mut next) = (vec![0u8; size], vec![0u8; size]);
    let mut count = 0;
    let mut first = true;
    loop {
        let mut attr = MapNextKeyAttr {
            map_fd: map.as_raw_fd() as u32,
            // NULL asks for the first key.
            key: if first { 0 } else { key.as_ptr() as u64 },
            next_key: next.as_mut_ptr() as u64,
            ..Default::default()
        };
        match bpf(BPF_MAP_GET_NEXT_KEY, &mut attr) {
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(count),
            Err(e) => return Err(e),
        }
        count += 1;
        first = false;
        std::mem::swap(&mut key, &mut next);
    }
}

/// Opens a pinned BPF object (link, map or program).
pub fn obj_get(path: &Path) -> io::Result<OwnedFd> {
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains NUL"))?;
    let mut attr = ObjGetAttr {
        pathname: c.as_ptr() as u64,
        ..Default::default()
    };
    let fd = bpf(BPF_OBJ_GET, &mut attr)?;
    // SAFETY: the kernel returned a new file descriptor that we now own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Pins a BPF object (link, map, program) at `path` on a bpffs.
pub fn obj_pin(fd: BorrowedFd<'_>, path: &Path) -> io::Result<()> {
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains NUL"))?;
    let mut attr = ObjGetAttr {
        pathname: c.as_ptr() as u64,
        bpf_fd: fd.as_raw_fd() as u32,
        ..Default::default()
    };
    bpf(BPF_OBJ_PIN, &mut attr).map(|_| ())
}

/// Creates a BPF link attaching `prog` to `target` (a cgroup or netns fd)
/// at `attach_type` (`enum bpf_attach_type`). aya 0.14 cannot turn every
/// cgroup link into a pinnable fd link, so weir makes them itself.
pub fn link_create(
    prog: BorrowedFd<'_>,
    target: BorrowedFd<'_>,
    attach_type: u32,
) -> io::Result<OwnedFd> {
    link_create_raw(prog, target.as_raw_fd() as u32, attach_type)
}

/// Creates a TCX BPF link attaching `prog` to interface `ifindex` of the
/// calling thread's network namespace (the kernel resolves the index
/// there), at `attach_type` (`BPF_TCX_INGRESS` 46 / `BPF_TCX_EGRESS` 47),
/// after the programs already there.
pub fn link_create_tcx(
    prog: BorrowedFd<'_>,
    ifindex: u32,
    attach_type: u32,
) -> io::Result<OwnedFd> {
    // `target_ifindex` shares its word with `target_fd`.
    link_create_raw(prog, ifindex, attach_type)
}

/// `BPF_TCX_INGRESS` (`enum bpf_attach_type`, Linux 6.6).
pub const BPF_TCX_INGRESS: u32 = 46;

/// Whether this kernel can attach tc programs as TCX links (Linux >= 6.6),
/// which `reroute-virtual-interfaces` needs.
///
/// Loads a two-instruction `BPF_PROG_TYPE_SCHED_CLS` program and asks for
/// a TCX link on an interface index no interface has: a kernel with TCX
/// looks the interface up and answers `ENODEV`; an older one does not know
/// the attach type and answers `EINVAL` (kernel/bpf/syscall.c,
/// `link_create`). Nothing is ever attached.
pub fn tcx_supported() -> io::Result<bool> {
    // r0 = 0 (BPF_ALU64 | BPF_MOV | BPF_K); exit (BPF_JMP | BPF_EXIT).
    let insns: [u64; 2] = [0xb7, 0x95];
    let license = c"GPL";
    let mut attr = ProgLoadAttr {
        prog_type: 3, // BPF_PROG_TYPE_SCHED_CLS
        insn_cnt: insns.len() as u32,
        insns: insns.as_ptr() as u64,
        license: license.as_ptr() as u64,
    };
    let fd = bpf(BPF_PROG_LOAD, &mut attr)?;
    // SAFETY: the kernel returned a new file descriptor that we now own.
    let prog = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    match link_create_raw(prog.as_fd(), i32::MAX as u32, BPF_TCX_INGRESS) {
        Ok(_) => Ok(true),
        Err(e) if e.raw_os_error() == Some(libc::ENODEV) => Ok(true),
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => Ok(false),
        Err(e) => Err(e),
    }
}

/// Why this kernel cannot reroute virtual interfaces, or `None` when it
/// can (or the probe could not tell: then attaching reports its own
/// error). Probed once per process.
pub fn virt_unsupported() -> Option<String> {
    static PROBE: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    PROBE
        .get_or_init(|| match tcx_supported() {
            Ok(true) => None,
            Ok(false) => Some(format!(
                "this kernel (Linux {}) has no TCX links, which {} needs (Linux >= 6.6)",
                kernel_release(),
                crate::policy::keys::REROUTE_VIRTUAL_INTERFACES
            )),
            Err(e) => {
                log::debug!("probing for TCX links: {e}");
                None
            }
        })
        .clone()
}

/// The running kernel's release (`uname -r`).
pub fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "?".into())
}

fn link_create_raw(prog: BorrowedFd<'_>, target: u32, attach_type: u32) -> io::Result<OwnedFd> {
    let mut attr = LinkCreateAttr {
        prog_fd: prog.as_raw_fd() as u32,
        target_fd: target,
        attach_type,
        flags: 0,
    };
    let fd = bpf(BPF_LINK_CREATE, &mut attr)?;
    // SAFETY: the kernel returned a new file descriptor that we now own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Atomically replaces the program behind a BPF link.
pub fn link_update(link: BorrowedFd<'_>, prog: BorrowedFd<'_>) -> io::Result<()> {
    let mut attr = LinkUpdateAttr {
        link_fd: link.as_raw_fd() as u32,
        new_prog_fd: prog.as_raw_fd() as u32,
        ..Default::default()
    };
    bpf(BPF_LINK_UPDATE, &mut attr).map(|_| ())
}

/// The cookie of the network namespace at `netns` (a `/proc/PID/ns/net` or
/// `/var/run/netns/NAME` path), read with `SO_NETNS_COOKIE` from a socket
/// created inside it on a short-lived thread (setns is per thread).
pub fn netns_cookie_of_path(netns: &Path) -> io::Result<u64> {
    let file = std::fs::File::open(netns)?;
    in_netns(file.as_fd(), || {
        let sock = nix::sys::socket::socket(
            nix::sys::socket::AddressFamily::Unix,
            nix::sys::socket::SockType::Datagram,
            nix::sys::socket::SockFlag::SOCK_CLOEXEC,
            None,
        )?;
        socket_netns_cookie(sock.as_fd())
    })
}

/// `getsockopt(SO_NETNS_COOKIE)` on a socket.
pub fn socket_netns_cookie(sock: BorrowedFd<'_>) -> io::Result<u64> {
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: `cookie` and `len` are valid for writes of their sizes.
    let ret = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            &mut cookie as *mut u64 as *mut libc::c_void,
            &mut len,
        )
    };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(cookie)
}

/// Runs `f` on a fresh thread that first joins the network namespace
/// `netns`, so the calling thread's namespace never changes.
pub fn in_netns<T: Send>(
    netns: BorrowedFd<'_>,
    f: impl FnOnce() -> io::Result<T> + Send,
) -> io::Result<T> {
    std::thread::scope(|s| {
        s.spawn(|| {
            nix::sched::setns(netns, nix::sched::CloneFlags::CLONE_NEWNET)?;
            f()
        })
        .join()
        .map_err(|_| io::Error::other("netns helper thread panicked"))?
    })
}

/// Whether `path` is the root of a bpffs mount.
pub fn is_bpffs(path: &Path) -> bool {
    const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
    nix::sys::statfs::statfs(path)
        .map(|s| s.filesystem_type().0 == BPF_FS_MAGIC)
        .unwrap_or(false)
}

/// Mounts a bpffs at `path`.
pub fn mount_bpffs(path: &Path) -> io::Result<()> {
    std::fs::create_dir_all(path)?;
    nix::mount::mount(
        Some("bpf"),
        path,
        Some("bpf"),
        nix::mount::MsFlags::empty(),
        Some("mode=0700"),
    )?;
    Ok(())
}

/// The cgroup v2 mount point, from `/proc/self/mounts`.
pub fn cgroup2_mount() -> io::Result<std::path::PathBuf> {
    let mounts = std::fs::read_to_string("/proc/self/mounts")?;
    mounts
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let (_dev, dir, fstype) = (f.next()?, f.next()?, f.next()?);
            (fstype == "cgroup2").then(|| std::path::PathBuf::from(dir))
        })
        .next()
        .ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::NotFound,
                "no cgroup2 filesystem is mounted (weir needs cgroup v2); mount one or pass --cgroup",
            )
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The TCX probe agrees with the kernel's version: TCX came in 6.6.
    #[test]
    fn tcx_probe_matches_the_kernel_version() {
        let release = kernel_release();
        let mut parts = release
            .split(|c: char| !c.is_ascii_digit())
            .filter_map(|p| p.parse::<u32>().ok());
        let version = (parts.next().unwrap(), parts.next().unwrap());
        match tcx_supported() {
            Ok(has) => assert_eq!(has, version >= (6, 6), "Linux {release}"),
            // Unprivileged: the program load itself is refused.
            Err(e) => assert!(
                !nix::unistd::geteuid().is_root(),
                "probe failed as root on Linux {release}: {e}"
            ),
        }
    }
}
