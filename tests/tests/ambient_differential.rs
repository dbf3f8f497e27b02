//! Differential test for Istio ambient mode: weir against the in-pod rules
//! istio-cni writes (its goldens, `../shared/reference/peers/istio-ambient/`,
//! applied unchanged with `iptables-restore` / `ip6tables-restore`, plus the
//! `ip rule` / `ip route` istio-cni adds), connection by connection.
//!
//! Two identical worlds per golden: a pod namespace with a ztunnel
//! stand-in (testkit `sidecar --ztunnel`: its sockets marked 0x539, its
//! inbound connections made transparently from the client's address), an
//! application, an HBONE listener (15008) and a DNS listener (15053), joined
//! by a veth to a peer namespace with the remote services. The iptables
//! world gets the golden; the weir world is an ambient pod of the agent.
//! Every connection of the matrix ([`matrix`]) is reduced to what the
//! processes observe (who answered, which stand-in listener took it, the
//! address the application saw) and must be the same in both worlds.

use std::io::Write as _;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use weir_tests::node::{Node, PodEntry, sidecar_log};
use weir_tests::{NetNs, require_root, veth_pair};

const APP_UID: u32 = 1000;

/// One golden and the pod settings istio-cni wrote it for.
struct Golden {
    file: &'static str,
    annotations: &'static [(&'static str, &'static str)],
}

const GOLDENS: &[Golden] = &[
    // RedirectDNS on globally.
    Golden {
        file: "default",
        annotations: &[],
    },
    // DNS on globally, off for the pod.
    Golden {
        file: "dns_pod_disabled_and_on_globally",
        annotations: &[("ambient.istio.io/dns-capture", "false")],
    },
    // IngressMode (no inbound rules), DNS off globally.
    Golden {
        file: "ingress",
        annotations: &[
            ("ambient.istio.io/bypass-inbound-capture", "true"),
            ("ambient.istio.io/dns-capture", "false"),
        ],
    },
];

/// The golden's `iptables-save`-style blocks for one family, as
/// `iptables-restore` input. A `_ipv6` golden lists the IPv4 tables, then
/// the IPv6 ones.
fn restore_input(text: &str, v6: bool) -> String {
    let mut blocks: Vec<String> = Vec::new();
    for line in text.lines() {
        let l = line.trim();
        if let Some(table) = l.strip_prefix("* ") {
            blocks.push(format!("*{table}\n"));
        } else if let Some(chain) = l.strip_prefix("-N ")
            && let Some(b) = blocks.last_mut()
        {
            b.push_str(&format!(":{chain} - [0:0]\n"));
        } else if (l.starts_with("-A ") || l.starts_with("-I ") || l == "COMMIT")
            && let Some(b) = blocks.last_mut()
        {
            b.push_str(l);
            b.push('\n');
        }
    }
    let half = blocks.len() / 2;
    let picked: Vec<String> = if v6 {
        blocks[half..].to_vec()
    } else if text.contains("::1/128") {
        blocks[..half].to_vec()
    } else {
        blocks
    };
    picked.concat()
}

fn golden_text(name: &str, v6: bool) -> String {
    let file = if v6 {
        format!("{name}_ipv6.golden")
    } else {
        format!("{name}.golden")
    };
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../shared/reference/peers/istio-ambient")
        .join(&file);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn restore(ns: &NetNs, tool: &str, input: &str) {
    let mut child = Command::new("nsenter")
        .arg(format!("--net={}", ns.path().display()))
        .arg(tool)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{tool}: {e}"));
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{tool} failed: {}\n{input}",
        String::from_utf8_lossy(&out.stderr)
    );
}

struct World {
    pod: NetNs,
    peer: NetNs,
    _veth: weir_tests::Veth,
    ztunnel_log: std::path::PathBuf,
}

const POD4: &str = "198.18.9.1";
const PEER4: &str = "198.18.9.2";
const POD6: &str = "2001:2:0:9::1";
const PEER6: &str = "2001:2:0:9::2";
const PROBE4: &str = "169.254.7.127";

fn world(tag: &str) -> World {
    let pod = NetNs::new(&format!("ad{tag}p"));
    let peer = NetNs::new(&format!("ad{tag}r"));
    let veth = veth_pair(
        &pod,
        &[&format!("{POD4}/24"), &format!("{POD6}/64")],
        &peer,
        &[&format!("{PEER4}/24"), &format!("{PEER6}/64")],
    );
    // The probe address lives on the peer side ("the node").
    peer.ip(&["addr", "add", &format!("{PROBE4}/32"), "dev", "lo"]);
    pod.ip(&["route", "add", &format!("{PROBE4}/32"), "via", PEER4]);
    World {
        pod,
        peer,
        _veth: veth,
        ztunnel_log: std::path::PathBuf::new(),
    }
}

fn start_processes(node: &mut Node, w: &mut World) {
    w.ztunnel_log = node.sidecar_with(&w.pod, "ztunnel", &[], &["--ztunnel"]);
    node.echo(&w.pod, 8080, "app", APP_UID);
    node.echo(&w.pod, 15008, "hbone", APP_UID);
    node.echo(&w.pod, 15053, "dns-proxy", APP_UID);
    // Ports below 1024: root.
    node.echo(&w.peer, 80, "peer", 0);
    node.echo(&w.peer, 53, "peer-dns", 0);
}

/// One connection of the matrix.
struct Conn {
    name: String,
    from_peer: bool,
    dst: String,
    global: Vec<String>,
    args: Vec<String>,
}

fn conn(name: &str, from_peer: bool, dst: String, global: &[&str], args: &[&str]) -> Conn {
    Conn {
        name: name.into(),
        from_peer,
        dst,
        global: global.iter().map(|s| s.to_string()).collect(),
        args: args.iter().map(|s| s.to_string()).collect(),
    }
}

fn ep(ip: &str, port: u16) -> String {
    if ip.contains(':') {
        format!("[{ip}]:{port}")
    } else {
        format!("{ip}:{port}")
    }
}

fn matrix(v6: bool) -> Vec<Conn> {
    let (pod, peer, lo) = if v6 {
        (POD6, PEER6, "::1")
    } else {
        (POD4, PEER4, "127.0.0.1")
    };
    let app = ["--uid", "1000"];
    let root: [&str; 0] = [];
    let mut m = vec![
        conn("app->peer:80", false, ep(peer, 80), &app, &[]),
        conn("app->peer:53/tcp", false, ep(peer, 53), &app, &[]),
        conn("app->localhost:8080", false, ep(lo, 8080), &app, &[]),
        conn("app->own-ip:8080", false, ep(pod, 8080), &app, &[]),
        conn("app->own-ip:53/tcp", false, ep(pod, 53), &app, &[]),
        conn(
            "marked-0x539->peer:80",
            false,
            ep(peer, 80),
            &root,
            &["--mark", "1337"],
        ),
        conn(
            "marked-0x1539->peer:80",
            false,
            ep(peer, 80),
            &root,
            &["--mark", "5433"],
        ),
        conn(
            "marked-0x111->peer:80",
            false,
            ep(peer, 80),
            &root,
            &["--mark", "273"],
        ),
        conn(
            "marked-0x539->peer:53/tcp",
            false,
            ep(peer, 53),
            &root,
            &["--mark", "1337"],
        ),
        conn("peer->pod:8080", true, ep(pod, 8080), &app, &[]),
        conn("peer->pod:15008", true, ep(pod, 15008), &app, &[]),
        conn("peer->pod:15053", true, ep(pod, 15053), &app, &[]),
    ];
    if !v6 {
        m.push(conn("app->probe:80", false, ep(PROBE4, 80), &app, &[]));
        m.push(conn(
            "probe->pod:8080",
            true,
            ep(pod, 8080),
            &app,
            &["--bind", PROBE4],
        ));
    }
    m
}

/// What the processes saw of one connection.
fn observe(node: &Node, w: &World, c: &Conn) -> String {
    let before = sidecar_log(&w.ztunnel_log).len();
    let from = if c.from_peer { &w.peer } else { &w.pod };
    let args: Vec<&str> = c.args.iter().map(String::as_str).collect();
    let global: Vec<&str> = c.global.iter().map(String::as_str).collect();
    let r = node.client_with(from, &global, &c.dst, &args);
    // The stand-in writes its record as it relays.
    std::thread::sleep(Duration::from_millis(50));
    let recs = sidecar_log(&w.ztunnel_log);
    let took = recs
        .get(before..)
        .unwrap_or_default()
        .iter()
        .map(|r| {
            format!(
                "{}(orig {})",
                r["listener"].as_str().unwrap_or("?"),
                r["orig_dst"].as_str().unwrap_or("-")
            )
        })
        .collect::<Vec<_>>()
        .join(",");
    let outcome = if r.ok() {
        let reply = r.reply();
        let peer_ip = reply["peer"]
            .as_str()
            .map(|p| p.rsplit_once(':').map_or(p, |x| x.0).to_string())
            .unwrap_or_default();
        format!(
            "answered by {} (saw {})",
            reply["server"].as_str().unwrap_or("?"),
            peer_ip
        )
    } else {
        format!(
            "failed: {}",
            r.json["error"]
                .as_str()
                .or(r.json["errno_name"].as_str())
                .unwrap_or("error")
        )
    };
    format!("{outcome}; ztunnel: [{took}]")
}

fn differential(v6: bool) {
    let mut node = Node::with_agent();
    let mut total = 0;
    let mut diffs = Vec::new();
    for (gi, g) in GOLDENS.iter().enumerate() {
        let tag = format!("{gi}{}", if v6 { 6 } else { 4 });
        // iptables world: the golden, istio-cni's policy routing.
        let mut ipt = world(&format!("i{tag}"));
        let text = golden_text(g.file, v6);
        restore(&ipt.pod, "iptables-restore", &restore_input(&text, false));
        if v6 {
            restore(&ipt.pod, "ip6tables-restore", &restore_input(&text, true));
        }
        for fam in [["-4"].as_slice(), ["-6"].as_slice()] {
            let mut a: Vec<&str> = fam.to_vec();
            a.extend([
                "rule",
                "add",
                "fwmark",
                "0x111/0xfff",
                "pref",
                "32764",
                "lookup",
                "100",
            ]);
            ipt.pod.ip(&a);
            let mut a: Vec<&str> = fam.to_vec();
            a.extend([
                "route", "add", "local", "default", "dev", "lo", "table", "100",
            ]);
            ipt.pod.ip(&a);
        }
        start_processes(&mut node, &mut ipt);
        // weir world: an ambient pod of the agent.
        let mut wr = world(&format!("w{tag}"));
        let mut pod = PodEntry::new("amb", &wr.pod, &[POD4, POD6]);
        pod.mesh = Some("ambient".into());
        for (k, v) in g.annotations {
            pod.annotations.insert(k.to_string(), v.to_string());
        }
        node.set_pods(&[pod]);
        start_processes(&mut node, &mut wr);
        for c in matrix(v6) {
            let a = observe(&node, &ipt, &c);
            let b = observe(&node, &wr, &c);
            total += 1;
            println!(
                "{} {:<28} iptables: {a}\n{:<35} weir:     {b}",
                g.file, c.name, ""
            );
            if a != b {
                diffs.push(format!(
                    "{} {}: iptables {a:?} vs weir {b:?}",
                    g.file, c.name
                ));
            }
        }
    }
    println!(
        "ambient differential: {total} connections, {} differences",
        diffs.len()
    );
    assert!(diffs.is_empty(), "differences:\n{}", diffs.join("\n"));
}

#[test]
fn ambient_goldens_ipv4() {
    if !require_root() {
        return;
    }
    differential(false);
}

#[test]
fn ambient_goldens_ipv6() {
    if !require_root() {
        return;
    }
    differential(true);
}

#[test]
fn golden_blocks_split_by_family() {
    let text = golden_text("default", true);
    let v4 = restore_input(&text, false);
    let v6 = restore_input(&text, true);
    assert!(
        v4.contains("127.0.0.1/32") && !v4.contains("::1/128"),
        "{v4}"
    );
    assert!(
        v6.contains("::1/128") && !v6.contains("127.0.0.1/32"),
        "{v6}"
    );
    assert_eq!(v4.matches("COMMIT").count(), 3);
    assert!(v4.starts_with("*mangle\n:ISTIO_PRERT - [0:0]\n"));
}
