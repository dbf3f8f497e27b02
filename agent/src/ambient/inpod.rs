//! `weir inpod-enroll`: capture the caller's own network namespace for
//! Istio ambient mode, through the agent's CNI socket.
//!
//! For hosts without Kubernetes and for ztunnel's namespaced test suite,
//! whose harness runs `scripts/ztunnel-redirect-inpod.sh` inside each pod's
//! netns before handing it to ztunnel: weir's replacement of that script
//! runs `weir inpod-enroll`. The agent opens the netns through the caller's
//! pid (`SO_PEERCRED`) and keeps it open (`/proc/<agent>/fd/<n>`), since
//! the caller exits right away and its netns may have no path at all. Such
//! a pod stays enrolled until the agent stops, or until a newer inpod pod
//! holds one of its addresses (the old namespace is gone: test suites
//! reuse addresses).

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::net::IpAddr;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

use crate::cni::protocol::{self, Command, PodRef, Request, Response};
use crate::pod::PodSpec;
use crate::policy::{Mesh, pod_rules};
use crate::reconcile::Reconciler;

/// A pod enrolled by `weir inpod-enroll`, with its netns held open.
#[derive(Debug)]
pub struct InpodPod {
    /// Its spec (the netns path is the held descriptor's).
    pub spec: PodSpec,
    /// The open netns.
    fd: OwnedFd,
}

impl InpodPod {
    /// The path through which the agent opens the held netns.
    pub fn path(&self) -> PathBuf {
        netns_path(&self.fd)
    }
}

fn netns_path(fd: &OwnedFd) -> PathBuf {
    PathBuf::from(format!(
        "/proc/{}/fd/{}",
        std::process::id(),
        fd.as_raw_fd()
    ))
}

/// Enrolls the netns at `req.netns` (`/proc/<caller>/ns/net`) as an
/// ambient pod; returns its key and netns cookie.
pub fn enroll(r: &mut Reconciler, req: &Request) -> Result<(String, u64)> {
    let caller = Path::new(&req.netns);
    let file = std::fs::File::open(caller)
        .with_context(|| format!("opening the caller's netns {}", caller.display()))?;
    let ino = file.metadata()?.ino();
    let fd: OwnedFd = file.into();
    let netns = netns_path(&fd);
    // Its addresses, as they are now (the harness configures them first).
    let probe = crate::netlink::probe_all(&[(
        netns.as_path(),
        crate::netlink::Names {
            exclude: None,
            virt: None,
        },
    )])
    .pop()
    .context("netns probe did not run")?;
    let facts = probe
        .facts
        .with_context(|| format!("reading the addresses of netns {}", caller.display()))?;
    let ips: Vec<IpAddr> = facts
        .addrs
        .iter()
        .copied()
        .filter(|ip| crate::policy::pod_ip_problem(*ip).is_none() && !is_link_local(ip))
        .collect();
    if ips.is_empty() {
        bail!(
            "netns {} has no address yet; configure the pod's interface before inpod-enroll",
            caller.display()
        );
    }
    let name = if req.pod.name.is_empty() {
        format!("inpod-{ino}")
    } else {
        req.pod.name.clone()
    };
    let namespace = if req.pod.namespace.is_empty() {
        "default".to_string()
    } else {
        req.pod.namespace.clone()
    };
    let annotations = BTreeMap::new();
    let rules = pod_rules(Mesh::Ambient, &ips, &annotations).map_err(|e| anyhow::anyhow!("{e}"))?;
    let spec = PodSpec {
        namespace,
        name,
        netns,
        ips: ips.clone(),
        mesh: Mesh::Ambient,
        annotations,
        rules,
        uid: req.pod.uid.clone(),
        service_account: if req.pod.service_account.is_empty() {
            "default".into()
        } else {
            req.pod.service_account.clone()
        },
        reason: "weir inpod-enroll".into(),
    };
    let key = spec.key();
    // An earlier inpod pod with one of these addresses is gone (its
    // namespace was torn down and the address reused), or this is a
    // re-enrollment under the same key: it goes first.
    let stale: Vec<String> = r
        .inpod
        .iter()
        .filter(|(k, p)| **k == key || p.spec.ips.iter().any(|a| ips.contains(a)))
        .map(|(k, _)| k.clone())
        .collect();
    for k in stale {
        r.inpod.remove(&k);
        r.remove_pod(&k);
    }
    let held = InpodPod {
        spec: spec.clone(),
        fd,
    };
    debug_assert_eq!(held.path(), spec.netns);
    r.inpod.insert(key.clone(), held);
    match r.enroll_now(&spec) {
        Ok(cookie) => Ok((key, cookie)),
        Err(e) => {
            r.inpod.remove(&key);
            Err(e)
        }
    }
}

fn is_link_local(ip: &IpAddr) -> bool {
    match ip {
        IpAddr::V4(v) => v.is_link_local(),
        IpAddr::V6(v) => v.segments()[0] & 0xffc0 == 0xfe80,
    }
}

/// `weir inpod-enroll`.
#[derive(clap::Args, Debug)]
pub struct InpodArgs {
    /// The agent's CNI socket.
    #[arg(long, env = "WEIR_CNI_SOCKET", default_value = protocol::DEFAULT_SOCKET)]
    pub socket: PathBuf,
    /// Pod name [default: inpod-<netns inode>].
    #[arg(long, default_value = "")]
    pub name: String,
    /// Pod namespace [default: default].
    #[arg(long, default_value = "")]
    pub namespace: String,
    /// Pod UID (what ztunnel knows the pod by) [default: NAMESPACE/NAME].
    #[arg(long, default_value = "")]
    pub uid: String,
    /// Service account [default: default].
    #[arg(long, default_value = "")]
    pub service_account: String,
}

/// Asks the agent to enroll this process's netns; prints the outcome.
pub fn command(a: &InpodArgs) -> Result<()> {
    let req = Request {
        version: protocol::VERSION,
        command: Command::Inpod,
        container_id: String::new(),
        netns: String::new(),
        ifname: String::new(),
        pod: PodRef {
            namespace: a.namespace.clone(),
            name: a.name.clone(),
            uid: a.uid.clone(),
            service_account: a.service_account.clone(),
        },
        ips: Vec::new(),
    };
    let mut s = std::os::unix::net::UnixStream::connect(&a.socket).with_context(|| {
        format!(
            "connecting to the agent's CNI socket {}; is `weir run` running with --cni-socket?",
            a.socket.display()
        )
    })?;
    s.set_read_timeout(Some(std::time::Duration::from_secs(30)))?;
    let mut out = serde_json::to_vec(&req)?;
    out.push(b'\n');
    s.write_all(&out)?;
    let mut line = String::new();
    BufReader::new(s)
        .read_line(&mut line)
        .context("reading the agent's answer")?;
    match serde_json::from_str::<Response>(&line).context("the agent's answer")? {
        Response::Enrolled { cookie, message } => {
            println!("{message} (netns cookie {cookie})");
            Ok(())
        }
        Response::Failed { message } => bail!("the agent refused: {message}"),
        other => bail!("unexpected answer: {other:?}"),
    }
}
