//! The applications of the demo: a Bookinfo-shaped set of small HTTP/1.1
//! services (productpage, details, reviews, ratings).
//!
//! productpage calls details and reviews; reviews v2 and v3 call ratings.
//! There is no kube-proxy in the demo, so a service is a fixed list of pod
//! addresses (`--upstream NAME=ADDR:PORT,...`), picked round robin. Every
//! reply is JSON and says what the service saw: its own socket addresses
//! (`served`), and for each call it made the addresses of that connection
//! and the reply it got (`calls`). The demo stitches those together with
//! the sidecars' logs to show which proxy carried every hop.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::{Args, ValueEnum};
use serde_json::{Value, json};
use weir_tests::net::{self, fmt_addr};

/// Port every Bookinfo service listens on.
pub(crate) const PORT: u16 = 9080;
/// Longest request head or reply read.
const MAX_MESSAGE: u64 = 1024 * 1024;
/// Timeout of each upstream call and of reading a request.
const IO_TIMEOUT: Duration = Duration::from_secs(5);

/// The Bookinfo services.
#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
pub(crate) enum Role {
    /// The front end: calls details and reviews.
    Productpage,
    /// Book details.
    Details,
    /// Book reviews; v2 and v3 add star ratings from ratings.
    Reviews,
    /// Star ratings.
    Ratings,
}

impl Role {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Role::Productpage => "productpage",
            Role::Details => "details",
            Role::Reviews => "reviews",
            Role::Ratings => "ratings",
        }
    }
}

/// One service this application calls: its name and its pods.
#[derive(Clone, Debug)]
pub(crate) struct Upstream {
    name: String,
    addrs: Vec<SocketAddr>,
}

fn parse_upstream(s: &str) -> Result<Upstream, String> {
    let (name, list) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?}: expected NAME=ADDR:PORT[,ADDR:PORT...]"))?;
    let addrs = list
        .split(',')
        .map(|a| {
            a.trim()
                .parse::<SocketAddr>()
                .map_err(|e| format!("{s:?}: {a:?} is not ADDR:PORT ({e})"))
        })
        .collect::<Result<Vec<_>, _>>()?;
    if name.is_empty() || addrs.is_empty() {
        return Err(format!("{s:?}: expected NAME=ADDR:PORT[,ADDR:PORT...]"));
    }
    Ok(Upstream {
        name: name.to_string(),
        addrs,
    })
}

#[derive(Args, Debug)]
pub(crate) struct BookinfoArgs {
    /// Which Bookinfo service to play.
    #[arg(long, value_enum)]
    role: Role,
    /// Version of the service (reviews: v1 without ratings, v2 black stars,
    /// v3 red stars).
    #[arg(long, default_value = "v1")]
    version: String,
    /// Pod name reported in replies [default: ROLE-VERSION].
    #[arg(long)]
    pod: Option<String>,
    /// Port to listen on (all addresses).
    #[arg(long, default_value_t = PORT)]
    port: u16,
    /// A service this one calls, as NAME=ADDR:PORT[,ADDR:PORT...] (several
    /// addresses are used round robin); repeat for each service.
    #[arg(long = "upstream", value_parser = parse_upstream)]
    upstreams: Vec<Upstream>,
    /// Create this file once listening.
    #[arg(long)]
    ready_file: Option<PathBuf>,
}

struct App {
    role: Role,
    version: String,
    pod: String,
    upstreams: Vec<(Upstream, AtomicUsize)>,
}

pub(crate) fn run(args: BookinfoArgs) -> Result<()> {
    let needs: &[&str] = match (args.role, args.version.as_str()) {
        (Role::Productpage, _) => &["details", "reviews"],
        (Role::Reviews, "v2" | "v3") => &["ratings"],
        _ => &[],
    };
    for n in needs {
        if !args.upstreams.iter().any(|u| u.name == *n) {
            bail!(
                "{} {} calls {n}: pass --upstream {n}=ADDR:PORT",
                args.role.name(),
                args.version
            );
        }
    }
    let addr = SocketAddr::from((Ipv4Addr::UNSPECIFIED, args.port));
    let listener = net::listen(addr, None).with_context(|| format!("listening on {addr}"))?;
    let app = Arc::new(App {
        role: args.role,
        pod: args
            .pod
            .unwrap_or_else(|| format!("{}-{}", args.role.name(), args.version)),
        version: args.version,
        upstreams: args
            .upstreams
            .into_iter()
            .map(|u| (u, AtomicUsize::new(0)))
            .collect(),
    });
    eprintln!("bookinfo {}: listening on {addr}", app.pod);
    crate::signal_ready(args.ready_file.as_ref())?;
    loop {
        match listener.accept() {
            Ok((conn, _)) => {
                let app = app.clone();
                std::thread::spawn(move || {
                    if let Err(e) = serve(&app, conn) {
                        eprintln!("bookinfo {}: {e:#}", app.pod);
                    }
                });
            }
            Err(e) => {
                eprintln!("bookinfo {}: accept: {e}", app.pod);
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

/// Reads one request, answers it, closes.
fn serve(app: &App, conn: TcpStream) -> Result<()> {
    conn.set_read_timeout(Some(IO_TIMEOUT))?;
    let served = json!({
        "local": conn.local_addr().ok().map(fmt_addr),
        "peer": conn.peer_addr().ok().map(fmt_addr),
    });
    let mut reader = BufReader::new((&conn).take(MAX_MESSAGE));
    let mut request_line = String::new();
    reader.read_line(&mut request_line)?;
    // Skip the headers.
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 || line == "\r\n" || line == "\n" {
            break;
        }
    }
    let mut parts = request_line.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let (status, body) = if method != "GET" {
        (
            405,
            json!({"error": format!("method {method:?} not allowed")}),
        )
    } else {
        match route(app, path) {
            Some(mut body) => {
                body["service"] = json!(app.role.name());
                body["version"] = json!(app.version);
                body["pod"] = json!(app.pod);
                body["served"] = served;
                (200, body)
            }
            None => (404, json!({"error": format!("no route for {path:?}")})),
        }
    };
    let text = body.to_string();
    let reason = match status {
        200 => "OK",
        404 => "Not Found",
        _ => "Method Not Allowed",
    };
    let mut out = &conn;
    write!(
        out,
        "HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{text}",
        text.len()
    )?;
    out.flush()?;
    conn.shutdown(std::net::Shutdown::Write)?;
    // Wait for the peer to close: closing with unread data would reset the
    // connection and could lose the reply in flight.
    conn.set_read_timeout(Some(Duration::from_secs(1)))?;
    let _ = std::io::copy(&mut (&conn), &mut std::io::sink());
    Ok(())
}

fn route(app: &App, path: &str) -> Option<Value> {
    let id = |prefix: &str| -> Option<u32> { path.strip_prefix(prefix)?.parse().ok() };
    match app.role {
        Role::Productpage if path == "/productpage" || path == "/" => {
            let details = call(app, "details", "/details/0");
            let reviews = call(app, "reviews", "/reviews/0");
            let ok = details["ok"] == json!(true) && reviews["ok"] == json!(true);
            Some(json!({
                "ok": ok,
                "product": {"id": 0, "title": "The Comedy of Errors"},
                "calls": [details, reviews],
            }))
        }
        Role::Details => {
            let id = id("/details/")?;
            Some(json!({
                "ok": true,
                "details": {
                    "id": id,
                    "author": "William Shakespeare",
                    "year": 1595,
                    "type": "paperback",
                    "pages": 200,
                    "language": "English",
                },
                "calls": [],
            }))
        }
        Role::Reviews => {
            let id = id("/reviews/")?;
            let mut reviews = json!([
                {"reviewer": "Reviewer1", "text": "Two sets of twins and not a dull scene."},
                {"reviewer": "Reviewer2", "text": "Fast and funny, if a little thin."},
            ]);
            let mut calls = Vec::new();
            let color = match app.version.as_str() {
                "v2" => Some("black"),
                "v3" => Some("red"),
                _ => None,
            };
            let mut ok = true;
            if let Some(color) = color {
                let r = call(app, "ratings", &format!("/ratings/{id}"));
                ok = r["ok"] == json!(true);
                for review in reviews.as_array_mut().into_iter().flatten() {
                    let who = review["reviewer"].as_str().unwrap_or_default().to_string();
                    review["rating"] = match r["response"]["ratings"].get(&who) {
                        Some(stars) => json!({"stars": stars, "color": color}),
                        None => json!({"error": "ratings unavailable"}),
                    };
                }
                calls.push(r);
            }
            Some(json!({"ok": ok, "id": id, "reviews": reviews, "calls": calls}))
        }
        Role::Ratings => {
            let id = id("/ratings/")?;
            Some(json!({
                "ok": true,
                "id": id,
                "ratings": {"Reviewer1": 5, "Reviewer2": 4},
                "calls": [],
            }))
        }
        _ => None,
    }
}

/// Calls `service` (next pod, round robin) and describes the call.
fn call(app: &App, service: &str, path: &str) -> Value {
    let Some((up, next)) = app.upstreams.iter().find(|(u, _)| u.name == service) else {
        return json!({"service": service, "ok": false, "error": "no --upstream for it"});
    };
    let dst = up.addrs[next.fetch_add(1, Ordering::Relaxed) % up.addrs.len()];
    let mut record = json!({"service": service, "dst": fmt_addr(dst), "path": path});
    match http_get(dst, service, path, IO_TIMEOUT) {
        Ok(r) => {
            record["ok"] = json!(r.status == 200 && r.body["ok"] == json!(true));
            record["status"] = json!(r.status);
            record["local"] = json!(fmt_addr(r.local));
            record["peer"] = json!(fmt_addr(r.peer));
            record["elapsed_ms"] = json!(r.elapsed.as_millis() as u64);
            record["response"] = r.body;
        }
        Err(e) => {
            record["ok"] = json!(false);
            record["error"] = json!(format!("{e:#}"));
        }
    }
    record
}

/// What one HTTP GET saw.
pub(crate) struct HttpReply {
    /// The client socket's own address.
    pub(crate) local: SocketAddr,
    /// The client socket's peer, as `getpeername()` reports it.
    pub(crate) peer: SocketAddr,
    /// HTTP status code.
    pub(crate) status: u16,
    /// The body, parsed as JSON (a string value if it is not JSON).
    pub(crate) body: Value,
    /// Time from connect to the end of the reply.
    pub(crate) elapsed: Duration,
}

/// `GET path` over a new connection to `dst` (HTTP/1.1, `Connection:
/// close`), reading the reply to its end.
pub(crate) fn http_get(
    dst: SocketAddr,
    host: &str,
    path: &str,
    timeout: Duration,
) -> Result<HttpReply> {
    let started = Instant::now();
    let mut conn = net::connect_timeout(None, dst, timeout)
        .with_context(|| format!("connect {}", fmt_addr(dst)))?;
    let local = conn.local_addr()?;
    let peer = conn.peer_addr()?;
    conn.set_read_timeout(Some(timeout))?;
    conn.set_write_timeout(Some(timeout))?;
    write!(
        conn,
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: weir-testkit\r\nConnection: close\r\n\r\n"
    )
    .context("sending the request")?;
    let mut raw = Vec::new();
    (&mut conn)
        .take(MAX_MESSAGE)
        .read_to_end(&mut raw)
        .context("reading the reply")?;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .with_context(|| format!("not an HTTP reply: {:?}", truncate(&text, 200)))?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("no status in {:?}", truncate(head, 200)))?;
    let body = serde_json::from_str(body).unwrap_or_else(|_| json!(body));
    Ok(HttpReply {
        local,
        peer,
        status,
        body,
        elapsed: started.elapsed(),
    })
}

fn truncate(s: &str, n: usize) -> &str {
    match s.char_indices().nth(n) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    #[test]
    fn upstreams_are_parsed() {
        let u = parse_upstream("reviews=198.18.0.12:9080, 198.18.0.13:9080").unwrap();
        assert_eq!(u.name, "reviews");
        assert_eq!(u.addrs.len(), 2);
        assert!(
            parse_upstream("reviews")
                .unwrap_err()
                .contains("NAME=ADDR:PORT")
        );
        assert!(parse_upstream("r=x:1").unwrap_err().contains("\"x:1\""));
    }

    /// A productpage in this process, with details, reviews v2 and ratings
    /// behind it, all on loopback.
    #[test]
    fn services_call_each_other() {
        fn start(role: Role, version: &str, upstreams: Vec<Upstream>) -> SocketAddr {
            let listener = TcpListener::bind("127.0.0.1:0").unwrap();
            let addr = listener.local_addr().unwrap();
            let app = Arc::new(App {
                role,
                version: version.into(),
                pod: format!("{}-{version}", role.name()),
                upstreams: upstreams
                    .into_iter()
                    .map(|u| (u, AtomicUsize::new(0)))
                    .collect(),
            });
            std::thread::spawn(move || {
                for conn in listener.incoming().flatten() {
                    let app = app.clone();
                    std::thread::spawn(move || serve(&app, conn));
                }
            });
            addr
        }
        let up = |name: &str, a: SocketAddr| Upstream {
            name: name.into(),
            addrs: vec![a],
        };
        let ratings = start(Role::Ratings, "v1", vec![]);
        let reviews = start(Role::Reviews, "v3", vec![up("ratings", ratings)]);
        let details = start(Role::Details, "v1", vec![]);
        let pp = start(
            Role::Productpage,
            "v1",
            vec![up("details", details), up("reviews", reviews)],
        );
        let r = http_get(pp, "productpage", "/productpage", IO_TIMEOUT).unwrap();
        assert_eq!(r.status, 200, "{}", r.body);
        assert_eq!(r.body["ok"], json!(true), "{}", r.body);
        assert_eq!(r.body["pod"], json!("productpage-v1"));
        let calls = r.body["calls"].as_array().unwrap();
        assert_eq!(
            calls[0]["response"]["details"]["author"],
            json!("William Shakespeare")
        );
        let rev = &calls[1]["response"];
        assert_eq!(rev["reviews"][0]["rating"]["color"], json!("red"));
        assert_eq!(
            rev["calls"][0]["response"]["served"]["local"],
            json!(ratings.to_string())
        );
        let r = http_get(pp, "productpage", "/nope", IO_TIMEOUT).unwrap();
        assert_eq!(r.status, 404);
    }
}
