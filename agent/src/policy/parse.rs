//! Annotation parsers: each reads one annotation's value the way the
//! mesh's own tooling does (`istio-iptables`: split on commas, trim spaces,
//! skip empty items; `*` means every value) and fails with an
//! [`AnnotationError`] naming the annotation, the bad item and the fix.

use std::collections::BTreeSet;
use std::net::IpAddr;

use ipnet::IpNet;

use super::{AnnotationError, keys};

/// Whether `name` can name a Linux network interface (`dev_valid_name`):
/// 1-15 bytes, not `.` or `..`, no `/`, `:` or whitespace.
pub(super) fn is_interface_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 15
        && name != "."
        && name != ".."
        && !name.contains(['/', ':'])
        && !name.contains(char::is_whitespace)
}

pub(super) fn items(value: &str) -> impl Iterator<Item = &str> {
    value.split(',').map(str::trim).filter(|s| !s.is_empty())
}

pub(super) fn err(key: &str, value: &str, problem: String, fix: &'static str) -> AnnotationError {
    AnnotationError {
        key: key.to_string(),
        value: value.to_string(),
        problem,
        fix,
    }
}

pub(super) const PORT_FIX: &str = "use a comma-separated list of ports 1-65535";

pub(super) fn parse_port(key: &str, value: &str, item: &str) -> Result<u16, AnnotationError> {
    match item.parse::<u16>() {
        Ok(p) if p > 0 => Ok(p),
        _ => Err(err(key, value, format!("{item:?} is not a port"), PORT_FIX)),
    }
}

/// Parses a port list; `Ok(None)` for `*`.
pub(super) fn parse_ports(
    key: &str,
    value: &str,
    allow_star: bool,
) -> Result<Option<BTreeSet<u16>>, AnnotationError> {
    if allow_star && value.trim() == "*" {
        return Ok(None);
    }
    items(value)
        .map(|i| {
            if i == "*" {
                Err(err(
                    key,
                    value,
                    "\"*\" must be the whole value".into(),
                    "write \"*\" alone, or list ports",
                ))
            } else {
                parse_port(key, value, i)
            }
        })
        .collect::<Result<BTreeSet<_>, _>>()
        .map(Some)
}

/// Parses a CIDR list; `Ok(None)` for `*`. As in Istio (whose injector
/// validates these annotations with a prefix parser), every item must have
/// a prefix length: a bare address is refused rather than guessed.
pub(super) fn parse_cidrs(
    key: &str,
    value: &str,
) -> Result<Option<BTreeSet<IpNet>>, AnnotationError> {
    if value.trim() == "*" {
        return Ok(None);
    }
    parse_cidr_list(
        key,
        value,
        "use a comma-separated list like 10.0.0.0/8,fd00::/8, or \"*\" alone",
    )
    .map(Some)
}

/// Parses a CIDR list where `*` has no meaning (Linkerd's `skip-subnets`,
/// Kuma's `exclude-outbound-ips`: their init containers want subnets).
pub(super) fn parse_subnets(key: &str, value: &str) -> Result<BTreeSet<IpNet>, AnnotationError> {
    parse_cidr_list(
        key,
        value,
        "use a comma-separated list like 10.0.0.0/8,fd00::/8",
    )
}

pub(super) fn parse_cidr_list(
    key: &str,
    value: &str,
    list_hint: &'static str,
) -> Result<BTreeSet<IpNet>, AnnotationError> {
    items(value)
        .map(|i| {
            i.parse::<IpNet>().map(|n| n.trunc()).map_err(|_| {
                let hint = if i.parse::<IpAddr>().is_ok() {
                    "add the prefix length, e.g. 10.1.2.3/32 or fd00::1/128"
                } else {
                    list_hint
                };
                err(key, value, format!("{i:?} is not a CIDR"), hint)
            })
        })
        .collect()
}

/// Kuma's `exclude-outbound-ips`: addresses with or without a prefix
/// length (a bare address is the host), as its init container reads them.
pub(super) fn parse_kuma_ips(key: &str, value: &str) -> Result<BTreeSet<IpNet>, AnnotationError> {
    items(value)
        .map(|i| {
            i.parse::<IpNet>()
                .map(|n| n.trunc())
                .or_else(|_| i.parse::<IpAddr>().map(IpNet::from))
                .map_err(|_| {
                    err(
                        key,
                        value,
                        format!("{i:?} is not an IP address or CIDR"),
                        "use a comma-separated list like 10.0.0.1,10.2.0.0/16,fd00::/8",
                    )
                })
        })
        .collect()
}

/// A Linkerd proxy UID/GID annotation: proxy-init writes no rule for a
/// value of 0 or less.
pub(super) fn linkerd_id(key: &str, value: &str) -> Result<Vec<u32>, AnnotationError> {
    let v = value.trim().parse::<i64>().map_err(|_| {
        err(
            key,
            value,
            format!("{:?} is not a numeric id", value.trim()),
            "use one numeric id",
        )
    })?;
    if v <= 0 {
        return Ok(Vec::new());
    }
    u32::try_from(v).map(|id| vec![id]).map_err(|_| {
        err(
            key,
            value,
            format!("{v} is out of range"),
            "use one numeric id",
        )
    })
}

/// Parses a port list that may hold ranges (`4000-4100`), as Linkerd's and
/// Kuma's annotations do.
pub(super) fn parse_port_ranges(key: &str, value: &str) -> Result<BTreeSet<u16>, AnnotationError> {
    // Ranges are merged before they are expanded: a value may hold many
    // overlapping wide ranges (256 KiB of `1-65535,`), and expanding each
    // would cost the sum of their widths on the agent's reconcile path.
    let mut ranges: Vec<(u16, u16)> = Vec::new();
    for i in items(value) {
        match i.split_once('-') {
            Some((a, b)) => {
                let lo = parse_port(key, value, a.trim())?;
                let hi = parse_port(key, value, b.trim())?;
                if lo > hi {
                    return Err(err(
                        key,
                        value,
                        format!("range {i:?} ends before it starts"),
                        "write ranges low-high, e.g. 4000-4100",
                    ));
                }
                ranges.push((lo, hi));
            }
            None => {
                let p = parse_port(key, value, i)?;
                ranges.push((p, p));
            }
        }
    }
    ranges.sort_unstable();
    let mut out = BTreeSet::new();
    let mut next = 0u32; // first port not yet in `out`
    for (lo, hi) in ranges {
        let from = u32::from(lo).max(next);
        if from <= u32::from(hi) {
            out.extend(from as u16..=hi);
            next = u32::from(hi) + 1;
        }
    }
    Ok(out)
}

/// Reads `proxyMetadata.ISTIO_META_DNS_CAPTURE` from Istio's per-pod proxy
/// config (`proxy.istio.io/config`, YAML or JSON).
pub(super) fn istio_dns_capture(value: &str) -> Result<Option<bool>, AnnotationError> {
    istio_proxy_metadata(value, "ISTIO_META_DNS_CAPTURE")
}

/// Reads the boolean `proxyMetadata.<name>` from Istio's per-pod proxy
/// config (`proxy.istio.io/config`, YAML or JSON).
pub fn istio_proxy_metadata(value: &str, name: &str) -> Result<Option<bool>, AnnotationError> {
    let v: serde_yaml_ng::Value = serde_yaml_ng::from_str(value).map_err(|e| {
        err(
            keys::PROXY_CONFIG,
            value,
            format!("not YAML: {e}"),
            "write a ProxyConfig in YAML or JSON",
        )
    })?;
    let Some(flag) = v.get("proxyMetadata").and_then(|m| m.get(name)) else {
        return Ok(None);
    };
    let text = match flag {
        serde_yaml_ng::Value::Bool(b) => return Ok(Some(*b)),
        serde_yaml_ng::Value::String(s) => s.as_str(),
        _ => "",
    };
    parse_bool(keys::PROXY_CONFIG, value, text).map(Some)
}

pub(super) fn parse_bool(key: &str, value: &str, item: &str) -> Result<bool, AnnotationError> {
    match item.trim().to_ascii_lowercase().as_str() {
        "true" | "1" | "yes" => Ok(true),
        "false" | "0" | "no" | "" => Ok(false),
        other => Err(err(
            key,
            value,
            format!("{other:?} is not a boolean"),
            "use \"true\" or \"false\"",
        )),
    }
}

pub(super) fn parse_ids(key: &str, value: &str) -> Result<Vec<u32>, AnnotationError> {
    let mut out = Vec::new();
    for i in items(value) {
        let id = i.parse::<u32>().map_err(|_| {
            err(
                key,
                value,
                format!("{i:?} is not a numeric id"),
                "use a comma-separated list of numeric UIDs/GIDs",
            )
        })?;
        if !out.contains(&id) {
            out.push(id);
        }
    }
    Ok(out)
}

pub(super) fn single_port(key: &str, value: &str) -> Result<u16, AnnotationError> {
    parse_port(key, value, value.trim())
}
