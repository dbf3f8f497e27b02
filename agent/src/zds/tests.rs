//! The ZDS server against a scripted ztunnel on a real `SOCK_SEQPACKET`
//! socket (the real ztunnel: tests/tests/zds.rs).

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::sys::socket::{
    AddressFamily, ControlMessageOwned, MsgFlags, SockFlag, SockType, UnixAddr, connect, recvmsg,
    send, setsockopt, socket, sockopt,
};
use nix::sys::time::TimeVal;
use prost::Message;

use super::proto::*;
use super::*;
use crate::k8s::testutil::TempDir;

/// A ztunnel stand-in: connects, says hello, reads requests and acks them.
struct Fake {
    fd: OwnedFd,
}

impl Fake {
    fn connect(path: &Path) -> Fake {
        let fd = socket(
            AddressFamily::Unix,
            SockType::SeqPacket,
            SockFlag::SOCK_CLOEXEC,
            None,
        )
        .unwrap();
        connect(fd.as_raw_fd(), &UnixAddr::new(path).unwrap()).unwrap();
        let f = Fake { fd };
        f.timeout(Duration::from_secs(5));
        let hello = ZdsHello {
            version: Version::V1 as i32,
        };
        f.send(&hello.encode_to_vec());
        f
    }

    fn timeout(&self, d: Duration) {
        let tv = TimeVal::new(d.as_secs() as i64, d.subsec_micros().into());
        setsockopt(&self.fd, sockopt::ReceiveTimeout, &tv).unwrap();
    }

    fn send(&self, bytes: &[u8]) {
        send(self.fd.as_raw_fd(), bytes, MsgFlags::empty()).unwrap();
    }

    /// The next request, with the fd that came with it; `None` when
    /// nothing arrives within the receive timeout.
    fn try_next(&self) -> Option<(Request, Option<OwnedFd>)> {
        let mut buf = vec![0u8; 4096];
        let mut iov = [std::io::IoSliceMut::new(&mut buf)];
        let mut space = nix::cmsg_space!([RawFd; 2]);
        let msg = match recvmsg::<()>(
            self.fd.as_raw_fd(),
            &mut iov,
            Some(&mut space),
            MsgFlags::MSG_CMSG_CLOEXEC,
        ) {
            Ok(m) => m,
            Err(nix::errno::Errno::EAGAIN) => return None,
            Err(e) => panic!("recvmsg: {e}"),
        };
        let n = msg.bytes;
        let mut fds = Vec::new();
        for c in msg.cmsgs().unwrap() {
            if let ControlMessageOwned::ScmRights(v) = c {
                // SAFETY: SCM_RIGHTS descriptors are new descriptors the
                // kernel installed in this process for this message; each
                // is owned here exactly once.
                fds.extend(v.into_iter().map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }));
            }
        }
        assert!(
            fds.len() <= 1,
            "at most one fd per message, got {}",
            fds.len()
        );
        let req = WorkloadRequest::decode(&buf[..n]).unwrap();
        Some((req.payload.expect("a payload"), fds.pop()))
    }

    fn next(&self) -> (Request, Option<OwnedFd>) {
        self.try_next().expect("a request within 5 s")
    }

    fn ack(&self, error: &str) {
        let r = WorkloadResponse {
            payload: Some(Response::Ack(Ack {
                error: error.to_string(),
            })),
        };
        self.send(&r.encode_to_vec());
    }

    /// Reads the next request, checks it with `f`, acks it.
    fn expect(&self, f: impl FnOnce(&Request, Option<&OwnedFd>)) {
        let (req, fd) = self.next();
        f(&req, fd.as_ref());
        self.ack("");
    }

    fn expect_quiet(&self, d: Duration) {
        self.timeout(d);
        if let Some((req, _)) = self.try_next() {
            panic!("expected no request, got {req:?}");
        }
        self.timeout(Duration::from_secs(5));
    }
}

fn own_netns() -> PathBuf {
    PathBuf::from("/proc/self/ns/net")
}

fn workload(uid: &str, netns: Option<PathBuf>) -> Workload {
    Workload {
        uid: uid.to_string(),
        name: format!("pod-{uid}"),
        namespace: "ns".to_string(),
        service_account: "sa".to_string(),
        netns,
    }
}

fn add_of(uid: &str) -> impl FnOnce(&Request, Option<&OwnedFd>) {
    let uid = uid.to_string();
    move |req, fd| {
        let Request::Add(a) = req else {
            panic!("expected add {uid}, got {req:?}")
        };
        assert_eq!(a.uid, uid);
        let info = a.workload_info.as_ref().expect("workload_info");
        assert_eq!(info.name, format!("pod-{uid}"));
        assert_eq!(info.namespace, "ns");
        assert_eq!(info.service_account, "sa");
        let fd = fd.expect("the netns fd comes with the add");
        let got = std::fs::metadata(format!("/proc/self/fd/{}", fd.as_raw_fd()))
            .unwrap()
            .ino();
        let want = std::fs::metadata(own_netns()).unwrap().ino();
        assert_eq!(got, want, "the fd is the pod's network namespace");
    }
}

fn keep_of(uid: &str) -> impl FnOnce(&Request, Option<&OwnedFd>) {
    let uid = uid.to_string();
    move |req, fd| {
        assert_eq!(req, &Request::Keep(KeepWorkload { uid: uid.clone() }));
        assert!(fd.is_none(), "keep carries no fd");
    }
}

fn del_of(uid: &str) -> impl FnOnce(&Request, Option<&OwnedFd>) {
    let uid = uid.to_string();
    move |req, fd| {
        assert_eq!(req, &Request::Del(DelWorkload { uid: uid.clone() }));
        assert!(fd.is_none());
    }
}

fn snapshot_sent(req: &Request, fd: Option<&OwnedFd>) {
    assert_eq!(req, &Request::SnapshotSent(SnapshotSent {}));
    assert!(fd.is_none());
}

/// A server on a fresh socket, on its own runtime.
fn server() -> (tokio::runtime::Runtime, Zds, TempDir, PathBuf) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let dir = TempDir::new("zds");
    let path = dir.path().join("sub/ztunnel.sock");
    let zds = Zds::new();
    rt.block_on(async { zds.listen(&path) }).unwrap();
    (rt, zds, dir, path)
}

#[test]
fn snapshot_waits_for_the_first_list_then_adds_keeps_and_ends() {
    let (_rt, zds, _dir, path) = server();
    let z = Fake::connect(&path);
    // No list yet: ztunnel must hear nothing (a partial snapshot would
    // make it drop pods).
    z.expect_quiet(Duration::from_millis(300));
    zds.update([
        workload("c", Some(PathBuf::from("/nonexistent/netns"))),
        workload("a", Some(own_netns())),
        workload("b", None),
        workload("d", Some(PathBuf::from("/etc/hostname"))),
    ]);
    z.expect(add_of("a"));
    z.expect(keep_of("b"));
    z.expect(keep_of("c"));
    // Not a namespace file: kept, never handed over.
    z.expect(keep_of("d"));
    z.expect(snapshot_sent);
    z.expect_quiet(Duration::from_millis(200));
}

#[test]
fn changes_after_the_snapshot_are_adds_and_deletes() {
    let (_rt, zds, _dir, path) = server();
    zds.update([workload("a", Some(own_netns())), workload("b", None)]);
    let z = Fake::connect(&path);
    z.expect(add_of("a"));
    z.expect(keep_of("b"));
    z.expect(snapshot_sent);
    // The same set again: nothing to say.
    zds.update([workload("a", Some(own_netns())), workload("b", None)]);
    z.expect_quiet(Duration::from_millis(200));
    // a goes, c comes; b (kept) stays without a namespace.
    zds.update([workload("b", None), workload("c", Some(own_netns()))]);
    z.expect(del_of("a"));
    z.expect(add_of("c"));
    // b gets a namespace: added.
    zds.update([
        workload("b", Some(own_netns())),
        workload("c", Some(own_netns())),
    ]);
    z.expect(add_of("b"));
    // b loses its namespace again: kept (no delete), c unchanged.
    zds.update([workload("b", None), workload("c", Some(own_netns()))]);
    z.expect_quiet(Duration::from_millis(300));
    // Gone from the list: deleted, kept or not.
    zds.update([]);
    z.expect(del_of("b"));
    z.expect(del_of("c"));
}

#[test]
fn a_pod_whose_netns_opens_later_is_added_by_the_retry() {
    let (_rt, zds, dir, path) = server();
    let link = dir.path().join("netns-later");
    zds.update([workload("a", Some(link.clone()))]);
    let z = Fake::connect(&path);
    z.expect(keep_of("a"));
    z.expect(snapshot_sent);
    std::os::unix::fs::symlink(own_netns(), &link).unwrap();
    // No new list: the periodic retry finds it.
    z.timeout(RETRY * 2 + Duration::from_secs(1));
    z.expect(add_of("a"));
}

#[test]
fn adds_go_to_the_newest_ztunnel_and_deletes_to_all() {
    let (_rt, zds, _dir, path) = server();
    zds.update([workload("a", Some(own_netns()))]);
    let old = Fake::connect(&path);
    old.expect(add_of("a"));
    old.expect(snapshot_sent);
    let new = Fake::connect(&path);
    new.expect(add_of("a"));
    new.expect(snapshot_sent);
    zds.update([
        workload("a", Some(own_netns())),
        workload("b", Some(own_netns())),
    ]);
    new.expect(add_of("b"));
    old.expect_quiet(Duration::from_millis(300));
    zds.update([workload("b", Some(own_netns()))]);
    old.expect(del_of("a"));
    new.expect(del_of("a"));
    // The new one leaves: the old one is the newest again and catches up.
    drop(new);
    old.expect(add_of("b"));
}

#[test]
fn a_refusal_keeps_the_connection_and_a_close_ends_it() {
    let (rt, zds, _dir, path) = server();
    zds.update([workload("a", Some(own_netns()))]);
    let z = Fake::connect(&path);
    let (req, _) = z.next();
    assert!(matches!(req, Request::Add(_)));
    z.ack("failure to start proxy: test");
    z.expect(snapshot_sent);
    zds.update([]);
    z.expect(del_of("a"));
    drop(z);
    // The server saw the close: no connection is left.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while zds.newest().is_some() {
        assert!(
            std::time::Instant::now() < deadline,
            "connection not closed"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    drop(rt);
}

#[test]
fn a_wrong_hello_is_refused() {
    let (_rt, zds, _dir, path) = server();
    zds.update([workload("a", Some(own_netns()))]);
    let fd = socket(
        AddressFamily::Unix,
        SockType::SeqPacket,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .unwrap();
    connect(fd.as_raw_fd(), &UnixAddr::new(&path).unwrap()).unwrap();
    let z = Fake { fd };
    z.timeout(Duration::from_secs(5));
    z.send(&ZdsHello { version: 7 }.encode_to_vec());
    // Closed without a request.
    let mut buf = [0u8; 16];
    let n = nix::sys::socket::recv(z.fd.as_raw_fd(), &mut buf, MsgFlags::empty()).unwrap();
    assert_eq!(n, 0, "the server closes the connection");
}

#[test]
fn bind_replaces_a_stale_socket_and_refuses_other_files() {
    let dir = TempDir::new("zds-bind");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let path = dir.path().join("ztunnel.sock");
    rt.block_on(async {
        drop(bind_seqpacket(&path).unwrap());
        // The file of the first listener is still there: replaced.
        assert!(path.exists());
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(&path).unwrap().permissions(),
        );
        assert_eq!(mode & 0o777, 0o600, "root only: it hands out netns fds");
        drop(bind_seqpacket(&path).unwrap());
        let file = dir.path().join("regular");
        std::fs::write(&file, "x").unwrap();
        let e = bind_seqpacket(&file).unwrap_err().to_string();
        assert!(
            e.contains("--zds-socket") && e.contains("not a socket"),
            "{e}"
        );
        assert_eq!(std::fs::read_to_string(&file).unwrap(), "x");
    });
}

#[test]
fn open_netns_refuses_what_is_not_a_namespace() {
    assert!(open_netns(&own_netns()).is_ok());
    let e = open_netns(Path::new("/etc/hostname")).unwrap_err();
    assert!(e.to_string().contains("not a namespace file"), "{e}");
    assert!(open_netns(Path::new("/nonexistent")).is_err());
}

#[test]
fn a_ztunnel_that_does_not_answer_is_disconnected() {
    let (_rt, zds, _dir, path) = server();
    zds.update([workload("a", Some(own_netns()))]);
    let z = Fake::connect(&path);
    let (req, fd) = z.next();
    assert!(matches!(req, Request::Add(_)) && fd.is_some());
    // No ack: after ACK_TIMEOUT the agent closes the connection.
    z.timeout(ACK_TIMEOUT + Duration::from_secs(3));
    let mut buf = [0u8; 16];
    let n = nix::sys::socket::recv(z.fd.as_raw_fd(), &mut buf, MsgFlags::empty()).unwrap();
    assert_eq!(n, 0, "the agent gave up on the connection");
    // A new connection gets a fresh snapshot.
    let z2 = Fake::connect(&path);
    z2.expect(add_of("a"));
    z2.expect(snapshot_sent);
}

#[test]
fn a_pass_hands_over_enrolled_pods_and_keeps_the_others() {
    let enrolled = vec![AmbientPod {
        uid: "a".into(),
        name: "pod-a".into(),
        namespace: "ns".into(),
        service_account: "sa".into(),
        netns: own_netns(),
    }];
    let known = [
        // Also enrolled: the enrolled entry (with its netns) wins.
        workload("a", Some(PathBuf::from("/elsewhere"))),
        // Desired but not enrolled (no netns yet, invalid): kept.
        workload("b", Some(PathBuf::from("/proc/1/ns/net"))),
    ];
    let w = from_pass(enrolled, known);
    assert_eq!(
        w,
        vec![workload("a", Some(own_netns())), workload("b", None),]
    );
}

#[test]
fn a_hand_over_waits_for_ztunnels_answer() {
    let (rt, zds, _dir, path) = server();
    // No ztunnel: refused at once.
    let e = zds
        .hand_over(workload("b", Some(own_netns())))
        .err()
        .unwrap();
    assert!(e.contains("no ztunnel is connected"), "{e}");
    let z = Fake::connect(&path);
    z.expect_quiet(Duration::from_millis(200));
    // Connected, but no full list yet: refused (no partial snapshot).
    let e = zds
        .hand_over(workload("b", Some(own_netns())))
        .err()
        .unwrap();
    assert!(e.contains("not read its pod list"), "{e}");
    zds.update([workload("a", Some(own_netns()))]);
    z.expect(add_of("a"));
    z.expect(snapshot_sent);
    // b: added, the waiter gets the ack.
    let h = zds.hand_over(workload("b", Some(own_netns()))).unwrap();
    let waiter = rt.spawn(h.wait());
    z.expect(add_of("b"));
    assert_eq!(rt.block_on(waiter).unwrap(), Ok(()));
    // Again (a runtime retry): sent again, as it is waited for.
    let h = zds.hand_over(workload("b", Some(own_netns()))).unwrap();
    let waiter = rt.spawn(h.wait());
    let (req, _) = z.next();
    assert!(matches!(req, Request::Add(_)), "{req:?}");
    z.ack("failure to start proxy: test");
    let got = rt.block_on(waiter).unwrap();
    assert_eq!(got, Err("failure to start proxy: test".to_string()));
    // The next full list keeps b (it is enrolled): nothing to say.
    zds.update([
        workload("a", Some(own_netns())),
        workload("b", Some(own_netns())),
    ]);
    z.expect_quiet(Duration::from_millis(300));
}

#[test]
fn garbage_from_ztunnel_closes_only_its_connection() {
    let (_rt, zds, _dir, path) = server();
    zds.update([workload("a", Some(own_netns()))]);
    let fd = socket(
        AddressFamily::Unix,
        SockType::SeqPacket,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .unwrap();
    connect(fd.as_raw_fd(), &UnixAddr::new(&path).unwrap()).unwrap();
    let bad = Fake { fd };
    bad.timeout(Duration::from_secs(5));
    // Not a protobuf message (a truncated varint).
    bad.send(&[0x08, 0xff, 0xff]);
    let mut buf = [0u8; 16];
    let n = nix::sys::socket::recv(bad.fd.as_raw_fd(), &mut buf, MsgFlags::empty()).unwrap();
    assert_eq!(n, 0, "the server closes that connection");
    // The server goes on serving others.
    let z = Fake::connect(&path);
    z.expect(add_of("a"));
    z.expect(snapshot_sent);
}
