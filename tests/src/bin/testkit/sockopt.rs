//! `sockopt-check`: getsockopt calls weir does not handle must behave
//! exactly as without it (weir's cgroup getsockopt program sees all of
//! them), including option buffers larger than a page, which BPF programs
//! only see in part.

use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;

use anyhow::Result;
use serde_json::json;

/// getsockopt with a buffer of `len` bytes; returns (ret, errno, optlen).
fn getsockopt_len(fd: i32, level: i32, name: i32, len: usize) -> (i32, i32, u32) {
    let mut buf = vec![0u8; len];
    let mut optlen = len as libc::socklen_t;
    // SAFETY: `buf` is valid for `len` bytes and `optlen` for writes.
    let ret = unsafe { libc::getsockopt(fd, level, name, buf.as_mut_ptr().cast(), &mut optlen) };
    let errno = if ret < 0 {
        std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
    } else {
        0
    };
    (ret, errno, optlen)
}

/// Runs the checks and prints one JSON line.
pub fn run() -> Result<()> {
    let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
    let c = TcpStream::connect(l.local_addr()?)?;
    let fd = c.as_raw_fd();
    let tcp_info_size = std::mem::size_of::<libc::tcp_info>() as u32;
    let mut failures = Vec::new();
    // Small option.
    let (ret, errno, len) = getsockopt_len(fd, libc::SOL_SOCKET, libc::SO_RCVBUF, 4);
    if ret != 0 || len != 4 {
        failures.push(format!("SO_RCVBUF: ret {ret} errno {errno} len {len}"));
    }
    // Struct option, exact size and oversized buffers (2 pages).
    for buf in [tcp_info_size as usize, 8192, 65536] {
        let (ret, errno, len) = getsockopt_len(fd, libc::SOL_TCP, libc::TCP_INFO, buf);
        if ret != 0 || len > tcp_info_size || len < 100 {
            failures.push(format!(
                "TCP_INFO buf {buf}: ret {ret} errno {errno} len {len}"
            ));
        }
    }
    // An option that fails must keep failing with the same error.
    let (ret, errno, _) = getsockopt_len(fd, libc::SOL_SOCKET, 0x7fff, 4);
    if ret == 0 || errno != libc::ENOPROTOOPT {
        failures.push(format!("unknown option: ret {ret} errno {errno}"));
    }
    let ok = failures.is_empty();
    println!("{}", json!({ "ok": ok, "failures": failures }));
    if ok { Ok(()) } else { std::process::exit(1) }
}
