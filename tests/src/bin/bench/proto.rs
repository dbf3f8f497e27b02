//! The wire format between the load generator and whatever answers it (the
//! sidecar answering by itself, or the application server), and the socket
//! plumbing they share.
//!
//! A request is a 16-byte header, `[request length: u64 LE][response
//! length: u64 LE]`, followed by filler up to the request length (which
//! counts the header). The answer is `response length` bytes whose first
//! byte is a status: who answered, and whether that was a sidecar that
//! found the connection's original destination. Requests may follow each
//! other on one connection until the client closes it.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsFd, AsRawFd};

use nix::sys::socket::{
    AddressFamily, Backlog, SockFlag, SockType, SockaddrStorage, bind, listen, setsockopt, socket,
    sockopt,
};

/// Length of the request header.
pub const HEADER_LEN: usize = 16;
/// Status: a sidecar answered, `SO_ORIGINAL_DST` told it where the
/// connection was going (it was captured).
pub const STATUS_CAPTURED: u8 = b'C';
/// Status: a sidecar answered a connection made straight to its port.
pub const STATUS_DIRECT: u8 = b'D';
/// Status: the application server answered.
pub const STATUS_SERVER: u8 = b'S';

/// Size of the buffers each connection handler owns.
pub const IO_BUF: usize = 256 * 1024;

/// The header of a request of `req_len` bytes (header included) asking for
/// `resp_len` bytes back.
pub fn header(req_len: u64, resp_len: u64) -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    h[..8].copy_from_slice(&req_len.to_le_bytes());
    h[8..].copy_from_slice(&resp_len.to_le_bytes());
    h
}

/// `(request length, response length)` from a header.
pub fn parse_header(h: &[u8]) -> (u64, u64) {
    let mut a = [0u8; 8];
    let mut b = [0u8; 8];
    a.copy_from_slice(&h[..8]);
    b.copy_from_slice(&h[8..HEADER_LEN]);
    (u64::from_le_bytes(a), u64::from_le_bytes(b))
}

/// A whole small request (header plus filler), ready to send as is.
pub fn small_request(req_len: usize, resp_len: usize) -> Vec<u8> {
    let req_len = req_len.max(HEADER_LEN);
    let mut v = vec![b'q'; req_len];
    v[..HEADER_LEN].copy_from_slice(&header(req_len as u64, resp_len as u64));
    v
}

/// Answers requests; owns its buffers so serving allocates nothing.
pub struct Responder {
    inbuf: Vec<u8>,
    outbuf: Vec<u8>,
}

impl Responder {
    /// A responder with [`IO_BUF`]-sized buffers.
    pub fn new() -> Responder {
        Responder {
            inbuf: vec![0; IO_BUF],
            outbuf: vec![b'r'; IO_BUF],
        }
    }

    /// Serves requests on `conn` until the client closes it; returns how
    /// many were answered. A close in the middle of a request is an error.
    pub fn serve(&mut self, conn: &mut TcpStream, status: u8) -> io::Result<u64> {
        let mut answered = 0;
        // Bytes received but not consumed yet are `inbuf[..have]`.
        let mut have = 0usize;
        loop {
            while have < HEADER_LEN {
                let n = read_retry(conn, &mut self.inbuf[have..])?;
                if n == 0 {
                    return if have == 0 {
                        Ok(answered)
                    } else {
                        Err(io::ErrorKind::UnexpectedEof.into())
                    };
                }
                have += n;
            }
            let (req_len, resp_len) = parse_header(&self.inbuf[..HEADER_LEN]);
            if req_len < HEADER_LEN as u64 {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("request length {req_len} is shorter than its header"),
                ));
            }
            // Consume what is buffered of this request; keep the rest (a
            // pipelined next request) at the front of the buffer.
            let buffered = (have as u64).min(req_len) as usize;
            self.inbuf.copy_within(buffered..have, 0);
            have -= buffered;
            let mut remaining = req_len - buffered as u64;
            while remaining > 0 {
                let want = (remaining as usize).min(self.inbuf.len());
                let n = read_retry(conn, &mut self.inbuf[..want])?;
                if n == 0 {
                    return Err(io::ErrorKind::UnexpectedEof.into());
                }
                remaining -= n as u64;
            }
            self.respond(conn, status, resp_len)?;
            answered += 1;
        }
    }

    fn respond(&mut self, conn: &mut TcpStream, status: u8, len: u64) -> io::Result<()> {
        let mut left = len;
        let mut first = true;
        while left > 0 {
            let n = (left as usize).min(self.outbuf.len());
            self.outbuf[0] = if first { status } else { b'r' };
            first = false;
            conn.write_all(&self.outbuf[..n])?;
            left -= n as u64;
        }
        Ok(())
    }
}

/// `read` that retries on `EINTR`, and on `EAGAIN` after waiting up to
/// 10 s for readability: a blocking socket on weir's fast path can return
/// `EAGAIN` when woken without data (a kernel behaviour of sockmap
/// sockets; never seen without the fast path, so the other modes pay
/// nothing for it).
pub fn read_retry(conn: &mut (impl Read + AsFd), buf: &mut [u8]) -> io::Result<usize> {
    loop {
        match conn.read(buf) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                let mut pfd = libc::pollfd {
                    fd: conn.as_fd().as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                };
                // SAFETY: one live pollfd, its count passed with it.
                let rc = unsafe { libc::poll(&mut pfd, 1, 10_000) };
                if rc == 0 {
                    return Err(e);
                }
            }
            other => return other,
        }
    }
}

/// `read_exact` on top of [`read_retry`].
pub fn read_exact_retry(conn: &mut (impl Read + AsFd), mut buf: &mut [u8]) -> io::Result<()> {
    while !buf.is_empty() {
        match read_retry(conn, buf)? {
            0 => return Err(io::ErrorKind::UnexpectedEof.into()),
            n => buf = &mut buf[n..],
        }
    }
    Ok(())
}

/// A listening TCP socket on `addr` with `SO_REUSEADDR` and a deep backlog
/// (capped by the namespace's `net.core.somaxconn`).
pub fn listen_tcp(addr: SocketAddr) -> io::Result<TcpListener> {
    let family = match addr {
        SocketAddr::V4(_) => AddressFamily::Inet,
        SocketAddr::V6(_) => AddressFamily::Inet6,
    };
    let fd = socket(family, SockType::Stream, SockFlag::SOCK_CLOEXEC, None)?;
    setsockopt(&fd, sockopt::ReuseAddr, &true)?;
    bind(fd.as_raw_fd(), &SockaddrStorage::from(addr))?;
    listen(&fd, Backlog::new(4096)?)?;
    Ok(TcpListener::from(fd))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    #[test]
    fn header_round_trips() {
        let h = header(1 << 33, 64);
        assert_eq!(parse_header(&h), (1 << 33, 64));
        let r = small_request(4, 10);
        assert_eq!(r.len(), HEADER_LEN);
        assert_eq!(parse_header(&r), (HEADER_LEN as u64, 10));
    }

    #[test]
    fn responder_answers_pipelined_and_large_requests() {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let addr = listener.local_addr().unwrap();
        let server = std::thread::spawn(move || {
            let (mut conn, _) = listener.accept().unwrap();
            Responder::new().serve(&mut conn, STATUS_SERVER).unwrap()
        });
        let mut c = TcpStream::connect(addr).unwrap();
        // Two small requests in one write, then a large one.
        let mut two = small_request(64, 3);
        two.extend(small_request(20, 5));
        c.write_all(&two).unwrap();
        let mut resp = [0u8; 8];
        c.read_exact(&mut resp).unwrap();
        assert_eq!(resp[0], STATUS_SERVER);
        assert_eq!(resp[3], STATUS_SERVER);
        let big = 3 * IO_BUF as u64 + 7;
        c.write_all(&header(big, (IO_BUF + 1) as u64)).unwrap();
        c.write_all(&vec![0u8; big as usize - HEADER_LEN]).unwrap();
        let mut resp = vec![0u8; IO_BUF + 1];
        c.read_exact(&mut resp).unwrap();
        assert_eq!(resp[0], STATUS_SERVER);
        drop(c);
        assert_eq!(server.join().unwrap(), 3);
    }
}
