//! ZDS messages (`istio.workload.zds`, ztunnel's `proto/zds.proto`),
//! written as prost structs by hand: the same wire format as code generated
//! from the `.proto`, without needing `protoc` at build time. The tests
//! check every field number against the `.proto` in the shared reference
//! copy of ztunnel's source, byte for byte.

/// `istio.workload.zds.Version`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
#[repr(i32)]
pub enum Version {
    /// `NOT_USED = 0`.
    NotUsed = 0,
    /// `V1 = 1`: the only version there is.
    V1 = 1,
}

/// `ZdsHello`: the first message ztunnel sends on a new connection.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ZdsHello {
    /// `Version version = 1`.
    #[prost(enumeration = "Version", tag = "1")]
    pub version: i32,
}

/// `WorkloadInfo`: who the workload is (its proxy's identity).
#[derive(Clone, PartialEq, prost::Message)]
pub struct WorkloadInfo {
    /// `string name = 1`.
    #[prost(string, tag = "1")]
    pub name: String,
    /// `string namespace = 2`.
    #[prost(string, tag = "2")]
    pub namespace: String,
    /// `string service_account = 3`.
    #[prost(string, tag = "3")]
    pub service_account: String,
}

/// `AddWorkload`: sent with exactly one file descriptor (`SCM_RIGHTS`),
/// the pod's network namespace.
#[derive(Clone, PartialEq, prost::Message)]
pub struct AddWorkload {
    /// `string uid = 1`.
    #[prost(string, tag = "1")]
    pub uid: String,
    /// `WorkloadInfo workload_info = 2`.
    #[prost(message, optional, tag = "2")]
    pub workload_info: Option<WorkloadInfo>,
}

/// `KeepWorkload`: before `SnapshotSent` only, a workload the agent knows
/// but cannot hand over (its netns cannot be opened): ztunnel keeps it.
#[derive(Clone, PartialEq, prost::Message)]
pub struct KeepWorkload {
    /// `string uid = 1`.
    #[prost(string, tag = "1")]
    pub uid: String,
}

/// `DelWorkload`: ztunnel stops the workload's proxy.
#[derive(Clone, PartialEq, prost::Message)]
pub struct DelWorkload {
    /// `string uid = 2` (field 2 in the `.proto`, not 1).
    #[prost(string, tag = "2")]
    pub uid: String,
}

/// `SnapshotSent`: the initial list is complete; ztunnel drops the
/// workloads that were neither added nor kept.
#[derive(Clone, PartialEq, prost::Message)]
pub struct SnapshotSent {}

/// `Ack`: ztunnel's answer to each request; a non-empty `error` is a
/// refusal.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Ack {
    /// `string error = 1`.
    #[prost(string, tag = "1")]
    pub error: String,
}

/// `WorkloadRequest`: agent to ztunnel.
#[derive(Clone, PartialEq, prost::Message)]
pub struct WorkloadRequest {
    /// `oneof payload`.
    #[prost(oneof = "Request", tags = "1, 5, 2, 3")]
    pub payload: Option<Request>,
}

/// `WorkloadRequest.payload`.
#[derive(Clone, PartialEq, prost::Oneof)]
pub enum Request {
    /// `AddWorkload add = 1`.
    #[prost(message, tag = "1")]
    Add(AddWorkload),
    /// `KeepWorkload keep = 5`.
    #[prost(message, tag = "5")]
    Keep(KeepWorkload),
    /// `DelWorkload del = 2`.
    #[prost(message, tag = "2")]
    Del(DelWorkload),
    /// `SnapshotSent snapshot_sent = 3`.
    #[prost(message, tag = "3")]
    SnapshotSent(SnapshotSent),
}

impl Request {
    /// The request's kind, as the `kind` label of `weir_zds_requests_total`.
    pub fn kind(&self) -> &'static str {
        match self {
            Request::Add(_) => "add",
            Request::Keep(_) => "keep",
            Request::Del(_) => "del",
            Request::SnapshotSent(_) => "snapshot_sent",
        }
    }
}

/// `WorkloadResponse`: ztunnel to agent.
#[derive(Clone, PartialEq, prost::Message)]
pub struct WorkloadResponse {
    /// `oneof payload`.
    #[prost(oneof = "Response", tags = "1")]
    pub payload: Option<Response>,
}

/// `WorkloadResponse.payload`.
#[derive(Clone, PartialEq, prost::Oneof)]
pub enum Response {
    /// `Ack ack = 1`.
    #[prost(message, tag = "1")]
    Ack(Ack),
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;
    use std::collections::BTreeMap;

    /// `message NAME { ... }` blocks of the `.proto`: field name -> number,
    /// from lines `TYPE name = N;` (oneof members included).
    fn proto_fields(text: &str) -> BTreeMap<String, BTreeMap<String, u32>> {
        let mut out: BTreeMap<String, BTreeMap<String, u32>> = BTreeMap::new();
        let mut current: Option<String> = None;
        let mut depth = 0usize;
        for line in text.lines() {
            let line = line.split("//").next().unwrap_or("").trim();
            if let Some(rest) = line.strip_prefix("message ") {
                let name = rest.trim_end_matches('{').trim().to_string();
                out.entry(name.clone()).or_default();
                current = Some(name);
                depth = 0;
            }
            depth += line.matches('{').count();
            depth = depth.saturating_sub(line.matches('}').count());
            let Some(msg) = &current else { continue };
            if let Some((lhs, rhs)) = line.split_once('=') {
                let words: Vec<&str> = lhs.split_whitespace().collect();
                let number = rhs.trim().trim_end_matches(';').trim();
                if words.len() == 2
                    && words[0] != "reserved"
                    && let Ok(n) = number.parse::<u32>()
                {
                    out.get_mut(msg)
                        .expect("entry made above")
                        .insert(words[1].to_string(), n);
                }
            }
            if depth == 0 && line.contains('}') {
                current = None;
            }
        }
        out
    }

    /// ztunnel's `proto/zds.proto` from the shared reference tarball.
    fn reference_proto() -> Option<String> {
        let tarball = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../shared/reference/peers/ztunnel/ztunnel-src.tar.gz");
        if !tarball.is_file() {
            return None;
        }
        let out = std::process::Command::new("tar")
            .arg("-xzOf")
            .arg(&tarball)
            .arg("ztunnel/proto/zds.proto")
            .output()
            .expect("running tar");
        assert!(
            out.status.success(),
            "tar: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Some(String::from_utf8(out.stdout).expect("the .proto is UTF-8"))
    }

    /// Field key byte of a length-delimited field (wire type 2).
    fn key(field: u32) -> u8 {
        u8::try_from(field << 3 | 2).expect("small field number")
    }

    #[test]
    fn field_numbers_match_ztunnel_proto() {
        let Some(text) = reference_proto() else {
            assert!(
                std::env::var_os("CI").is_none(),
                "../shared/reference/peers/ztunnel/ztunnel-src.tar.gz is missing under CI"
            );
            eprintln!("SKIPPED: the shared ztunnel source is not beside the checkout");
            return;
        };
        let f = proto_fields(&text);
        let n = |m: &str, field: &str| -> u32 {
            *f.get(m)
                .and_then(|m| m.get(field))
                .unwrap_or_else(|| panic!("{m}.{field} not in zds.proto: {f:?}"))
        };
        // Each message encoded by prost, against bytes built from the
        // numbers the .proto gives.
        let info = WorkloadInfo {
            name: "n".into(),
            namespace: "ns".into(),
            service_account: "sa".into(),
        };
        let info_bytes = [
            vec![key(n("WorkloadInfo", "name")), 1, b'n'],
            vec![key(n("WorkloadInfo", "namespace")), 2, b'n', b's'],
            vec![key(n("WorkloadInfo", "service_account")), 2, b's', b'a'],
        ]
        .concat();
        assert_eq!(info.encode_to_vec(), info_bytes);

        let add = WorkloadRequest {
            payload: Some(Request::Add(AddWorkload {
                uid: "u".into(),
                workload_info: Some(info),
            })),
        };
        let add_inner = [
            vec![key(n("AddWorkload", "uid")), 1, b'u'],
            vec![
                key(n("AddWorkload", "workload_info")),
                u8::try_from(info_bytes.len()).unwrap(),
            ],
            info_bytes,
        ]
        .concat();
        let mut want = vec![
            key(n("WorkloadRequest", "add")),
            u8::try_from(add_inner.len()).unwrap(),
        ];
        want.extend(add_inner);
        assert_eq!(add.encode_to_vec(), want);

        let keep = WorkloadRequest {
            payload: Some(Request::Keep(KeepWorkload { uid: "k".into() })),
        };
        assert_eq!(
            keep.encode_to_vec(),
            [
                key(n("WorkloadRequest", "keep")),
                3,
                key(n("KeepWorkload", "uid")),
                1,
                b'k'
            ]
        );
        let del = WorkloadRequest {
            payload: Some(Request::Del(DelWorkload { uid: "d".into() })),
        };
        assert_eq!(
            del.encode_to_vec(),
            [
                key(n("WorkloadRequest", "del")),
                3,
                key(n("DelWorkload", "uid")),
                1,
                b'd'
            ]
        );
        let snap = WorkloadRequest {
            payload: Some(Request::SnapshotSent(SnapshotSent {})),
        };
        assert_eq!(
            snap.encode_to_vec(),
            [key(n("WorkloadRequest", "snapshot_sent")), 0]
        );

        let ack_bytes = [
            key(n("WorkloadResponse", "ack")),
            3,
            key(n("Ack", "error")),
            1,
            b'e',
        ];
        let ack = WorkloadResponse::decode(&ack_bytes[..]).unwrap();
        assert_eq!(ack.payload, Some(Response::Ack(Ack { error: "e".into() })));
        // ZdsHello.version is a varint (wire type 0).
        let hello_key = u8::try_from(n("ZdsHello", "version") << 3).unwrap();
        let hello = ZdsHello::decode(&[hello_key, Version::V1 as u8][..]).unwrap();
        assert_eq!(hello.version, Version::V1 as i32);
        assert!(text.contains("V1 = 1;"), "Version.V1 is 1");
        // Every field the .proto declares is one this module knows.
        let known = [
            ("ZdsHello", 1),
            ("WorkloadInfo", 3),
            ("AddWorkload", 2),
            ("KeepWorkload", 1),
            ("DelWorkload", 1),
            ("SnapshotSent", 0),
            ("Ack", 1),
            ("WorkloadRequest", 4),
            ("WorkloadResponse", 1),
        ];
        for (m, count) in known {
            assert_eq!(f.get(m).map(BTreeMap::len), Some(count), "{m}: {f:?}");
        }
        assert_eq!(f.len(), known.len(), "messages in zds.proto: {f:?}");
    }

    #[test]
    fn empty_ack_is_not_an_empty_message() {
        // A seqpacket read of 0 bytes is end of stream, so an ack must
        // never encode to nothing.
        let ack = WorkloadResponse {
            payload: Some(Response::Ack(Ack::default())),
        };
        assert_eq!(ack.encode_to_vec(), [0x0a, 0x00]);
    }
}
