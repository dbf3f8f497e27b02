//! Socket helpers shared by the harness, the tests and `weir-testkit`:
//! reading the socket options a transparent proxy depends on, and TCP
//! sockets with a source address and a connect timeout.
//!
//! Errors are returned as [`io::Error`] carrying the kernel's errno
//! (`raw_os_error()`), so tests can check exactly what the kernel (or an
//! eBPF program standing in for it) answered.

use std::io;
use std::net::{
    Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6, TcpListener, TcpStream,
};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::time::Duration;

use nix::errno::Errno;
use nix::sys::socket::{
    AddressFamily, Backlog, SockFlag, SockType, SockaddrLike, SockaddrStorage, bind, connect,
    getsockname, setsockopt, socket, sockopt,
};
use nix::sys::time::{TimeVal, TimeValLike};

/// `SO_COOKIE` from `<asm-generic/socket.h>` (not in the libc crate).
const SO_COOKIE: libc::c_int = 57;
/// `SO_NETNS_COOKIE` from `<asm-generic/socket.h>` (Linux 5.14+; not in the
/// libc crate).
const SO_NETNS_COOKIE: libc::c_int = 71;

/// Plain C data that `getsockopt` may fill with any bytes.
trait Pod: Copy {
    fn zeroed() -> Self;
}

impl Pod for u64 {
    fn zeroed() -> Self {
        0
    }
}

impl Pod for libc::sockaddr_in {
    fn zeroed() -> Self {
        // SAFETY: sockaddr_in is a C struct of integers; all-zero bytes are
        // a valid value.
        unsafe { std::mem::zeroed() }
    }
}

impl Pod for libc::sockaddr_in6 {
    fn zeroed() -> Self {
        // SAFETY: sockaddr_in6 is a C struct of integers and byte arrays;
        // all-zero bytes are a valid value.
        unsafe { std::mem::zeroed() }
    }
}

/// Calls `getsockopt(fd, level, name)` into a zeroed `T`; returns the value
/// and the option length the kernel reported.
fn getsockopt_pod<T: Pod>(
    fd: BorrowedFd<'_>,
    level: libc::c_int,
    name: libc::c_int,
) -> io::Result<(T, usize)> {
    let mut val = T::zeroed();
    let mut len = std::mem::size_of::<T>() as libc::socklen_t;
    // SAFETY: `fd` is an open descriptor borrowed for the call; `val` is a
    // live, writable `T` of exactly `len` bytes, and the kernel writes at
    // most `len` bytes into it; every byte pattern is a valid `T` (`Pod`).
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            level,
            name,
            (&raw mut val).cast::<libc::c_void>(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok((val, len as usize))
}

/// The original destination of a redirected TCP connection, as a
/// transparent proxy (Envoy) reads it on an accepted socket:
/// `getsockopt(SOL_IP, SO_ORIGINAL_DST)` into a `sockaddr_in` for IPv4
/// sockets (and IPv4-mapped ones), `getsockopt(SOL_IPV6,
/// IP6T_SO_ORIGINAL_DST)` into a `sockaddr_in6` for IPv6 ones.
///
/// Without any capture the kernel answers `ENOENT`. An answer whose address
/// family is not the expected one is an `InvalidData` error (Envoy rejects
/// those too); the reported option length is ignored, as Envoy does.
pub fn original_dst(sock: &impl AsFd) -> io::Result<SocketAddr> {
    let fd = sock.as_fd();
    let local: SockaddrStorage = getsockname(fd.as_raw_fd())?;
    let ipv4 = match local.family() {
        Some(AddressFamily::Inet) => true,
        Some(AddressFamily::Inet6) => local
            .as_sockaddr_in6()
            .is_some_and(|a| a.ip().to_ipv4_mapped().is_some()),
        other => {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("not an IP socket (family {other:?})"),
            ));
        }
    };
    if ipv4 {
        let (sin, len) =
            getsockopt_pod::<libc::sockaddr_in>(fd, libc::SOL_IP, libc::SO_ORIGINAL_DST)?;
        if libc::c_int::from(sin.sin_family) != libc::AF_INET {
            return Err(bad_family(sin.sin_family, len, "AF_INET"));
        }
        let ip = Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr));
        Ok(SocketAddr::V4(SocketAddrV4::new(
            ip,
            u16::from_be(sin.sin_port),
        )))
    } else {
        let (sin6, len) =
            getsockopt_pod::<libc::sockaddr_in6>(fd, libc::SOL_IPV6, libc::IP6T_SO_ORIGINAL_DST)?;
        if libc::c_int::from(sin6.sin6_family) != libc::AF_INET6 {
            return Err(bad_family(sin6.sin6_family, len, "AF_INET6"));
        }
        Ok(SocketAddr::V6(SocketAddrV6::new(
            Ipv6Addr::from(sin6.sin6_addr.s6_addr),
            u16::from_be(sin6.sin6_port),
            u32::from_be(sin6.sin6_flowinfo),
            sin6.sin6_scope_id,
        )))
    }
}

fn bad_family(family: libc::sa_family_t, len: usize, want: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("original destination has address family {family}, not {want} (optlen {len})"),
    )
}

/// The socket's cookie (`SO_COOKIE`), as `bpf_get_socket_cookie()` returns
/// it to programs.
pub fn socket_cookie(sock: &impl AsFd) -> io::Result<u64> {
    getsockopt_pod::<u64>(sock.as_fd(), libc::SOL_SOCKET, SO_COOKIE).map(|(v, _)| v)
}

/// The cookie of the network namespace the socket lives in
/// (`SO_NETNS_COOKIE`), as `bpf_get_netns_cookie()` returns it.
pub fn netns_cookie(sock: &impl AsFd) -> io::Result<u64> {
    getsockopt_pod::<u64>(sock.as_fd(), libc::SOL_SOCKET, SO_NETNS_COOKIE).map(|(v, _)| v)
}

/// `::ffff:a.b.c.d` becomes `a.b.c.d`; everything else is unchanged.
pub fn normalize(addr: SocketAddr) -> SocketAddr {
    match addr {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::V4(SocketAddrV4::new(v4, v6.port())),
            None => addr,
        },
        SocketAddr::V4(_) => addr,
    }
}

/// Formats `addr` as `ip:port` or `[ip]:port`, IPv4-mapped IPv6 addresses
/// shown as plain IPv4 (the form the testkit's JSON uses).
pub fn fmt_addr(addr: SocketAddr) -> String {
    normalize(addr).to_string()
}

/// Whether this network namespace can create IPv6 sockets.
pub fn ipv6_available() -> bool {
    socket(
        AddressFamily::Inet6,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .is_ok()
}

fn family_of(addr: &SocketAddr) -> AddressFamily {
    match addr {
        SocketAddr::V4(_) => AddressFamily::Inet,
        SocketAddr::V6(_) => AddressFamily::Inet6,
    }
}

/// A listening TCP socket on `addr` with `SO_REUSEADDR`. For IPv6 addresses
/// `v6only` sets `IPV6_V6ONLY` (`Some(true)`: IPv6 only, so an IPv4 socket
/// can share the port; `Some(false)`: dual stack; `None`: the system
/// default).
pub fn listen(addr: SocketAddr, v6only: Option<bool>) -> io::Result<TcpListener> {
    let fd = socket(
        family_of(&addr),
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    setsockopt(&fd, sockopt::ReuseAddr, &true)?;
    if let (SocketAddr::V6(_), Some(only)) = (addr, v6only) {
        setsockopt(&fd, sockopt::Ipv6V6Only, &only)?;
    }
    bind(fd.as_raw_fd(), &SockaddrStorage::from(addr))?;
    nix::sys::socket::listen(&fd, Backlog::new(128)?)?;
    Ok(TcpListener::from(fd))
}

/// A TCP socket of `dst`'s address family, bound to `bind` when given (port
/// 0 lets the kernel choose). Pair with [`connect_socket`]; the two steps
/// are separate so callers can tell a failed bind from a failed connect.
pub fn tcp_socket(dst: SocketAddr, bind_to: Option<SocketAddr>) -> io::Result<OwnedFd> {
    let fd = socket(
        family_of(&dst),
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    if let Some(src) = bind_to {
        bind(fd.as_raw_fd(), &SockaddrStorage::from(src))?;
    }
    Ok(fd)
}

/// A blocking TCP connection to `dst` from address `src`, its port picked
/// at connect time (`IP_BIND_ADDRESS_NO_PORT`, as Envoy binds its inbound
/// passthrough source).
pub fn connect_from(src: std::net::IpAddr, dst: SocketAddr) -> io::Result<TcpStream> {
    let fd = tcp_socket(dst, None)?;
    setsockopt(&fd, sockopt::IpBindAddressNoPort, &true)?;
    bind(
        fd.as_raw_fd(),
        &SockaddrStorage::from(SocketAddr::new(src, 0)),
    )?;
    connect(fd.as_raw_fd(), &SockaddrStorage::from(dst))?;
    Ok(TcpStream::from(fd))
}

/// Connects `fd` (from [`tcp_socket`]) to `dst`, giving up after `timeout`
/// with `ETIMEDOUT` (a zero timeout waits as long as the kernel does).
pub fn connect_socket(fd: OwnedFd, dst: SocketAddr, timeout: Duration) -> io::Result<TcpStream> {
    // A blocking connect(2) honours SO_SNDTIMEO (and then fails with
    // EINPROGRESS), which saves a non-blocking connect + poll.
    let ms = i64::try_from(timeout.as_millis()).unwrap_or(i64::MAX);
    setsockopt(&fd, sockopt::SendTimeout, &TimeVal::milliseconds(ms))?;
    match connect(fd.as_raw_fd(), &SockaddrStorage::from(dst)) {
        Ok(()) => {}
        Err(Errno::EINPROGRESS) => return Err(io::Error::from_raw_os_error(libc::ETIMEDOUT)),
        Err(e) => return Err(e.into()),
    }
    setsockopt(&fd, sockopt::SendTimeout, &TimeVal::milliseconds(0))?;
    Ok(TcpStream::from(fd))
}

/// Connects to `dst` from `bind_to` (when given) within `timeout`; see
/// [`tcp_socket`] and [`connect_socket`].
pub fn connect_timeout(
    bind_to: Option<SocketAddr>,
    dst: SocketAddr,
    timeout: Duration,
) -> io::Result<TcpStream> {
    connect_socket(tcp_socket(dst, bind_to)?, dst, timeout)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalizes_mapped_addresses() {
        let mapped: SocketAddr = "[::ffff:198.18.0.1]:80".parse().unwrap();
        assert_eq!(fmt_addr(mapped), "198.18.0.1:80");
        let v6: SocketAddr = "[2001:2::1]:80".parse().unwrap();
        assert_eq!(fmt_addr(v6), "[2001:2::1]:80");
    }

    #[test]
    fn original_dst_without_capture_is_enoent() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server, _) = listener.accept().unwrap();
        let err = original_dst(&server).unwrap_err();
        // ENOENT with conntrack loaded, ENOPROTOOPT without it.
        assert!(
            matches!(err.raw_os_error(), Some(libc::ENOENT | libc::ENOPROTOOPT)),
            "{err}"
        );
        drop(client);
    }

    #[test]
    fn cookies_are_readable() {
        let sock = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        assert_ne!(socket_cookie(&sock).unwrap(), 0);
        assert_ne!(netns_cookie(&sock).unwrap(), 0);
    }
}
