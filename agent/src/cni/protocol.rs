//! The protocol between the `weir-cni` plugin and the agent.
//!
//! One request per connection on a Unix stream socket (root only): the
//! plugin writes one JSON object and a newline, the agent answers with one
//! JSON object and a newline, then closes. Both sides refuse messages
//! larger than [`MAX_MESSAGE`].
//!
//! ```text
//! -> {"version":1,"command":"add","containerId":"4f6c…","netns":"/var/run/netns/cni-9a1e…",
//!     "ifname":"eth0","pod":{"namespace":"default","name":"web-0","uid":"3f1c…"},
//!     "ips":["10.244.1.17","fd00:10:244:1::11"]}
//! <- {"outcome":"enrolled","cookie":4097,"message":"default/web-0 enrolled (istio)"}
//! ```
//!
//! Outcomes: `enrolled` (captured from now on), `skipped` (not a meshed
//! pod: nothing to do), `ok` (DEL, CHECK and STATUS succeeded), `failed`
//! (the plugin fails the pod's network set-up unless `failOpen`).
//!
//! This file is compiled into both the agent and the plugin binary
//! (`src/bin/weir-cni.rs`), so it only uses std and serde.

use serde::{Deserialize, Serialize};

/// Version of this protocol; the agent refuses other versions.
pub const VERSION: u32 = 1;

/// Where the agent listens unless configured otherwise (a host path: the
/// plugin runs on the host, the agent mounts the same directory).
pub const DEFAULT_SOCKET: &str = "/var/run/weir/cni.sock";

/// The largest request or response, in bytes.
pub const MAX_MESSAGE: usize = 64 * 1024;

/// What the plugin asks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Command {
    /// Enroll the pod's network namespace now (CNI ADD).
    Add,
    /// The pod's sandbox is being torn down (CNI DEL).
    Del,
    /// Is the pod enrolled as it should be (CNI CHECK)?
    Check,
    /// Is the agent ready to serve ADD (CNI STATUS)?
    Status,
    /// `weir inpod-enroll`: capture the caller's own network namespace
    /// for Istio ambient mode (the agent opens it through the caller's
    /// pid, from the socket's credentials; `netns` is ignored).
    Inpod,
}

/// The pod, from `CNI_ARGS` (`K8S_POD_NAMESPACE`, `K8S_POD_NAME`,
/// `K8S_POD_UID`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodRef {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// UID (empty when the runtime does not pass it).
    #[serde(default)]
    pub uid: String,
    /// `spec.serviceAccountName` (only sent by `weir inpod-enroll`).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub service_account: String,
}

/// A request.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Request {
    /// [`VERSION`].
    pub version: u32,
    /// What to do.
    pub command: Command,
    /// `CNI_CONTAINERID` (the sandbox).
    #[serde(default)]
    pub container_id: String,
    /// `CNI_NETNS`, a path on the host.
    #[serde(default)]
    pub netns: String,
    /// `CNI_IFNAME`.
    #[serde(default)]
    pub ifname: String,
    /// The pod.
    #[serde(default)]
    pub pod: PodRef,
    /// The pod's addresses from the previous plugin's result.
    #[serde(default)]
    pub ips: Vec<String>,
}

/// An answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "outcome", rename_all = "lowercase")]
pub enum Response {
    /// Enrolled: capture is in place for this netns.
    Enrolled {
        /// The netns cookie.
        cookie: u64,
        /// For the logs.
        message: String,
    },
    /// Not a meshed pod; nothing was done.
    Skipped {
        /// Why.
        message: String,
    },
    /// DEL, CHECK or STATUS succeeded.
    Ok {
        /// For the logs.
        message: String,
    },
    /// The agent could not do what was asked.
    Failed {
        /// What went wrong and what to do about it.
        message: String,
    },
}
