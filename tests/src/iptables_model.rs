//! A small model of the iptables rules the meshes write: a parser for
//! `iptables-restore` input (Istio's `-N`/`-A` form and `iptables-save`'s
//! `:CHAIN`/`-A` form, comments and `-m` modules included) and an evaluator
//! that walks a table's chains for one packet, first match wins, as the
//! kernel does for the first packet of a connection.
//!
//! Written for two uses: comparing rule sets rule for rule when they are
//! printed differently (the meshes' golden files against the generators of
//! this crate), and as an independent model of capture decisions (the
//! property test of weir's `decide_outbound` / `decide_inbound` walks the
//! generated rules with [`Table::eval`]). It knows the matches the meshes
//! use (`-p -s -d -i -o`, `--dport`/`--sport`, `multiport`, `owner`) and
//! the targets `RETURN`, `REDIRECT`, `ACCEPT`, jumps to user chains; a rule
//! with anything else fails the evaluation rather than being guessed.

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;

/// `!` or not, and a value.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Neg<T> {
    /// Negated (`! -d ...`).
    pub not: bool,
    /// The value.
    pub v: T,
}

/// A CIDR as a rule matches it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Cidr {
    /// Network address (host bits as written).
    pub addr: IpAddr,
    /// Prefix length.
    pub len: u8,
}

impl Cidr {
    /// Parses `a.b.c.d[/n]` / `x::y[/n]` (no prefix: a host).
    pub fn parse(s: &str) -> Result<Cidr, String> {
        let (a, l) = s.split_once('/').unwrap_or((s, ""));
        let addr: IpAddr = a.parse().map_err(|_| format!("bad address {s:?}"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let len = if l.is_empty() {
            max
        } else {
            l.parse::<u8>()
                .ok()
                .filter(|l| *l <= max)
                .ok_or_else(|| format!("bad prefix {s:?}"))?
        };
        Ok(Cidr { addr, len })
    }

    /// Whether `ip` is in this CIDR (same family only).
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip) {
            (IpAddr::V4(n), IpAddr::V4(a)) => {
                let mask = if self.len == 0 {
                    0
                } else {
                    u32::MAX << (32 - u32::from(self.len))
                };
                u32::from(n) & mask == u32::from(a) & mask
            }
            (IpAddr::V6(n), IpAddr::V6(a)) => {
                let mask = if self.len == 0 {
                    0
                } else {
                    u128::MAX << (128 - u32::from(self.len))
                };
                u128::from(n) & mask == u128::from(a) & mask
            }
            _ => false,
        }
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

/// One match of a rule.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Match {
    /// `-p`.
    Proto(Neg<String>),
    /// `-s`.
    Src(Neg<Cidr>),
    /// `-d`.
    Dst(Neg<Cidr>),
    /// `-i` (a trailing `+` is a prefix wildcard).
    InIface(Neg<String>),
    /// `-o`.
    OutIface(Neg<String>),
    /// `--dport` / `--dports` (multiport): inclusive ranges.
    Dport(Neg<Vec<(u16, u16)>>),
    /// `--sport` / `--sports`.
    Sport(Neg<Vec<(u16, u16)>>),
    /// `--uid-owner` (inclusive range).
    Uid(Neg<(u32, u32)>),
    /// `--gid-owner` (inclusive range; the socket's primary group).
    Gid(Neg<(u32, u32)>),
    /// Anything else (`--ctstate`, `--mark`, ...): kept for comparison,
    /// refused by the evaluator.
    Other(Neg<String>),
}

/// What a rule does.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Target {
    /// `-j RETURN`.
    Return,
    /// `-j ACCEPT`.
    Accept,
    /// `-j REDIRECT --to-ports N`.
    Redirect(u16),
    /// `-j CHAIN` (a user chain).
    Jump(String),
    /// Any other target with its options, e.g. `CT --zone 1`, `TPROXY ...`.
    Other(String),
}

/// One rule.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Rule {
    /// Its matches, in a canonical order (so two spellings of one rule
    /// compare equal).
    pub matches: Vec<Match>,
    /// Its target.
    pub target: Target,
    /// The line it was parsed from.
    pub text: String,
}

impl Rule {
    /// The rule without its source text (for comparisons).
    pub fn canonical(&self) -> (Vec<Match>, Target) {
        (self.matches.clone(), self.target.clone())
    }
}

/// One table: chains in the order they were declared, with their rules.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Table {
    /// Chain name -> rules, in order.
    pub chains: BTreeMap<String, Vec<Rule>>,
}

/// Every table of one restore input (one family).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Ruleset {
    /// Table name (`nat`, `raw`, `mangle`, ...) -> table.
    pub tables: BTreeMap<String, Table>,
}

fn tokenize(line: &str) -> Result<Vec<String>, String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut in_word = false;
    let mut quoted = false;
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => {
                if let Some(n) = chars.next() {
                    cur.push(n);
                    in_word = true;
                }
            }
            '"' => {
                quoted = !quoted;
                in_word = true;
            }
            c if c.is_whitespace() && !quoted => {
                if in_word {
                    out.push(std::mem::take(&mut cur));
                    in_word = false;
                }
            }
            c => {
                cur.push(c);
                in_word = true;
            }
        }
    }
    if quoted {
        return Err(format!("unterminated quote in {line:?}"));
    }
    if in_word {
        out.push(cur);
    }
    Ok(out)
}

fn ports(s: &str) -> Result<Vec<(u16, u16)>, String> {
    s.split(',')
        .map(|p| {
            let (a, b) = p.split_once(':').unwrap_or((p, p));
            let a: u16 = a.parse().map_err(|_| format!("bad port {p:?}"))?;
            let b: u16 = b.parse().map_err(|_| format!("bad port {p:?}"))?;
            Ok((a, b))
        })
        .collect()
}

fn id_range(s: &str) -> Result<(u32, u32), String> {
    let (a, b) = s.split_once('-').unwrap_or((s, s));
    let a: u32 = a
        .parse()
        .map_err(|_| format!("owner {s:?} is not numeric"))?;
    let b: u32 = b
        .parse()
        .map_err(|_| format!("owner {s:?} is not numeric"))?;
    Ok((a, b))
}

/// Targets that are not user chains (besides `RETURN`, `ACCEPT`,
/// `REDIRECT`).
const BUILTIN_TARGETS: &[&str] = &[
    "DROP",
    "REJECT",
    "CT",
    "TPROXY",
    "MARK",
    "CONNMARK",
    "DNAT",
    "SNAT",
    "MASQUERADE",
    "LOG",
    "TOS",
];

/// Options of the targets the meshes use (each takes one value).
const TARGET_OPTIONS: &[&str] = &[
    "--to-ports",
    "--to-port",
    "--zone",
    "--on-port",
    "--on-ip",
    "--tproxy-mark",
    "--set-mark",
    "--set-xmark",
    "--reject-with",
    "--to-destination",
    "--to-source",
];

/// Parses one `-A CHAIN ...` line (without `-A CHAIN`).
fn parse_rule(text: &str, tokens: &[String]) -> Result<Rule, String> {
    let mut matches = Vec::new();
    let mut target_name: Option<String> = None;
    let mut target_opts: Vec<String> = Vec::new();
    let mut not = false;
    let mut i = 0;
    let val = |i: usize| -> Result<&str, String> {
        tokens
            .get(i + 1)
            .map(String::as_str)
            .ok_or_else(|| format!("{} without a value in {text:?}", tokens[i]))
    };
    while i < tokens.len() {
        let t = tokens[i].as_str();
        if t == "!" {
            not = true;
            i += 1;
            continue;
        }
        let mut take = 2;
        match t {
            "-p" | "--protocol" => matches.push(Match::Proto(Neg {
                not,
                v: val(i)?.to_string(),
            })),
            "-s" | "--source" => matches.push(Match::Src(Neg {
                not,
                v: Cidr::parse(val(i)?)?,
            })),
            "-d" | "--destination" => matches.push(Match::Dst(Neg {
                not,
                v: Cidr::parse(val(i)?)?,
            })),
            "-i" | "--in-interface" => matches.push(Match::InIface(Neg {
                not,
                v: val(i)?.to_string(),
            })),
            "-o" | "--out-interface" => matches.push(Match::OutIface(Neg {
                not,
                v: val(i)?.to_string(),
            })),
            "--dport" | "--dports" | "--destination-port" | "--destination-ports" => {
                matches.push(Match::Dport(Neg {
                    not,
                    v: ports(val(i)?)?,
                }))
            }
            "--sport" | "--sports" | "--source-port" | "--source-ports" => {
                matches.push(Match::Sport(Neg {
                    not,
                    v: ports(val(i)?)?,
                }))
            }
            // A name (resolved by iptables through /etc/group) is kept as
            // written: comparable, not evaluable.
            "--uid-owner" | "--gid-owner" => {
                let v = val(i)?;
                matches.push(match (t, id_range(v)) {
                    ("--uid-owner", Ok(v)) => Match::Uid(Neg { not, v }),
                    (_, Ok(v)) => Match::Gid(Neg { not, v }),
                    (_, Err(_)) => Match::Other(Neg {
                        not,
                        v: format!("{t} {v}"),
                    }),
                });
            }
            // Modules are implied by their options; comments change nothing.
            "-m" | "--match" | "--comment" => {}
            "-j" | "--jump" => {
                // The target's own options are taken below; matches may
                // still follow (linkerd-init writes `-j RETURN -s NET`).
                target_name = Some(val(i)?.to_string());
            }
            o if TARGET_OPTIONS.contains(&o) => {
                target_opts.push(format!("{o} {}", val(i)?));
            }
            other if other.starts_with('-') => {
                // An unknown option and its values (up to the next option).
                let mut vals = Vec::new();
                let mut j = i + 1;
                while j < tokens.len() && !tokens[j].starts_with('-') && tokens[j] != "!" {
                    vals.push(tokens[j].as_str());
                    j += 1;
                }
                take = j - i;
                matches.push(Match::Other(Neg {
                    not,
                    v: format!("{other} {}", vals.join(" ")).trim().to_string(),
                }));
            }
            other => return Err(format!("unexpected {other:?} in {text:?}")),
        }
        not = false;
        i += take;
    }
    let name = target_name.ok_or_else(|| format!("rule without -j: {text:?}"))?;
    let opt = |names: &[&str]| {
        target_opts.iter().find_map(|o| {
            let (k, v) = o.split_once(' ')?;
            names.contains(&k).then(|| v.to_string())
        })
    };
    let target = match name.as_str() {
        "RETURN" => Target::Return,
        "ACCEPT" => Target::Accept,
        "REDIRECT" => Target::Redirect(
            opt(&["--to-ports", "--to-port"])
                .and_then(|p| p.parse().ok())
                .ok_or_else(|| format!("REDIRECT without --to-ports in {text:?}"))?,
        ),
        n if BUILTIN_TARGETS.contains(&n) || !target_opts.is_empty() => {
            let mut o = target_opts.clone();
            o.sort();
            Target::Other(format!("{n} {}", o.join(" ")).trim().to_string())
        }
        n => Target::Jump(n.to_string()),
    };
    matches.sort();
    Ok(Rule {
        matches,
        target,
        text: text.to_string(),
    })
}

impl Ruleset {
    /// Parses `iptables-restore` input for one family: `*table` (or
    /// `* table`), `:CHAIN POLICY [counters]`, `-N CHAIN`, `-A CHAIN ...`, `-I CHAIN [N] ...`,
    /// `COMMIT`; blank lines and `#` comments are skipped. Lines are
    /// applied in order, as `iptables-restore --noflush` does on an empty
    /// namespace.
    pub fn parse(text: &str) -> Result<Ruleset, String> {
        let mut rs = Ruleset::default();
        let mut table: Option<String> = None;
        for line in text.lines() {
            let l = line.trim();
            if l.is_empty() || l.starts_with('#') {
                continue;
            }
            if let Some(t) = l.strip_prefix('*') {
                let name = t.trim().to_string();
                rs.tables.entry(name.clone()).or_default();
                table = Some(name);
                continue;
            }
            if l == "COMMIT" {
                table = None;
                continue;
            }
            let tname = table
                .clone()
                .ok_or_else(|| format!("{l:?} outside a table"))?;
            let t = rs.tables.get_mut(&tname).expect("created above");
            if let Some(decl) = l.strip_prefix(':') {
                let name = decl.split_whitespace().next().unwrap_or("").to_string();
                t.chains.entry(name).or_default();
                continue;
            }
            let tokens = tokenize(l)?;
            match tokens.first().map(String::as_str) {
                Some("-N") => {
                    let name = tokens.get(1).ok_or("-N without a chain")?;
                    t.chains.entry(name.clone()).or_default();
                }
                Some("-A") => {
                    let chain = tokens.get(1).ok_or("-A without a chain")?;
                    let rule = parse_rule(l, &tokens[2..])?;
                    t.chains.entry(chain.clone()).or_default().push(rule);
                }
                Some("-I") => {
                    let chain = tokens.get(1).ok_or("-I without a chain")?;
                    let (pos, rest) = match tokens.get(2).and_then(|n| n.parse::<usize>().ok()) {
                        Some(n) => (n.max(1) - 1, &tokens[3..]),
                        None => (0, &tokens[2..]),
                    };
                    let rule = parse_rule(l, rest)?;
                    let rules = t.chains.entry(chain.clone()).or_default();
                    rules.insert(pos.min(rules.len()), rule);
                }
                _ => return Err(format!("unsupported line {l:?}")),
            }
        }
        Ok(rs)
    }

    /// A table (empty when absent).
    pub fn table(&self, name: &str) -> Table {
        self.tables.get(name).cloned().unwrap_or_default()
    }

    /// Rule-for-rule differences with `other`: for every table and chain,
    /// the canonical rules in order. Empty when equal; tables and chains
    /// without rules count as absent.
    pub fn diff(&self, other: &Ruleset) -> Vec<String> {
        let mut out = Vec::new();
        let mut keys: Vec<(&String, &String)> = Vec::new();
        for rs in [self, other] {
            for (tn, t) in &rs.tables {
                for (cn, rules) in &t.chains {
                    if !rules.is_empty() && !keys.contains(&(tn, cn)) {
                        keys.push((tn, cn));
                    }
                }
            }
        }
        keys.sort();
        for (tn, cn) in keys {
            let get = |rs: &Ruleset| -> Vec<Rule> {
                rs.tables
                    .get(tn)
                    .and_then(|t| t.chains.get(cn))
                    .cloned()
                    .unwrap_or_default()
            };
            let (a, b) = (get(self), get(other));
            let n = a.len().max(b.len());
            for i in 0..n {
                let ca = a.get(i).map(Rule::canonical);
                let cb = b.get(i).map(Rule::canonical);
                if ca != cb {
                    out.push(format!(
                        "{tn}/{cn} rule {}: {} <> {}",
                        i + 1,
                        a.get(i).map_or("(none)", |r| r.text.as_str()),
                        b.get(i).map_or("(none)", |r| r.text.as_str())
                    ));
                }
            }
        }
        out
    }
}

/// The first packet of a connection, as the `nat` table sees it.
#[derive(Clone, Debug)]
pub struct Packet {
    /// TCP (`tcp`) or UDP (`udp`).
    pub proto: &'static str,
    /// Source address (for a local socket: the bound address, or the one
    /// routing picked).
    pub src: IpAddr,
    /// Destination address.
    pub dst: IpAddr,
    /// Source port.
    pub sport: u16,
    /// Destination port.
    pub dport: u16,
    /// Input interface (`PREROUTING`).
    pub in_iface: Option<String>,
    /// Output interface (`OUTPUT`).
    pub out_iface: Option<String>,
    /// The socket owner's UID (`OUTPUT`).
    pub uid: Option<u32>,
    /// The socket owner's GID (`OUTPUT`).
    pub gid: Option<u32>,
}

/// What the walk decided.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Left alone (a `RETURN` from the base chain, its end, or `ACCEPT`).
    Accept,
    /// `REDIRECT --to-ports N`.
    Redirect(u16),
}

/// The walk's result and the rules that decided it.
#[derive(Clone, Debug)]
pub struct Trace {
    /// The outcome.
    pub outcome: Outcome,
    /// The rule that decided it (`None`: the end of the base chain).
    pub rule: Option<String>,
}

fn iface_matches(pattern: &str, iface: &str) -> bool {
    match pattern.strip_suffix('+') {
        Some(prefix) => iface.starts_with(prefix),
        None => pattern == iface,
    }
}

fn in_ranges(r: &[(u16, u16)], p: u16) -> bool {
    r.iter().any(|(a, b)| (*a..=*b).contains(&p))
}

impl Rule {
    /// Whether the rule's matches all hold for `p`. Errors on a match the
    /// model does not know.
    pub fn matches(&self, p: &Packet) -> Result<bool, String> {
        for m in &self.matches {
            let (not, hit) = match m {
                Match::Proto(n) => (n.not, n.v == p.proto || n.v == "all"),
                Match::Src(n) => (n.not, n.v.contains(p.src)),
                Match::Dst(n) => (n.not, n.v.contains(p.dst)),
                Match::InIface(n) => (
                    n.not,
                    p.in_iface
                        .as_deref()
                        .is_some_and(|i| iface_matches(&n.v, i)),
                ),
                Match::OutIface(n) => (
                    n.not,
                    p.out_iface
                        .as_deref()
                        .is_some_and(|i| iface_matches(&n.v, i)),
                ),
                Match::Dport(n) => (n.not, in_ranges(&n.v, p.dport)),
                Match::Sport(n) => (n.not, in_ranges(&n.v, p.sport)),
                // The owner match never matches a packet without a local
                // socket, negated or not.
                Match::Uid(n) => match p.uid {
                    Some(u) => (n.not, (n.v.0..=n.v.1).contains(&u)),
                    None => return Ok(false),
                },
                Match::Gid(n) => match p.gid {
                    Some(g) => (n.not, (n.v.0..=n.v.1).contains(&g)),
                    None => return Ok(false),
                },
                Match::Other(n) => {
                    return Err(format!(
                        "the model does not evaluate {:?} (rule {:?})",
                        n.v, self.text
                    ));
                }
            };
            if hit == not {
                return Ok(false);
            }
        }
        Ok(true)
    }
}

impl Table {
    /// Walks `chain` (a base chain, policy ACCEPT) for `p`.
    pub fn eval(&self, chain: &str, p: &Packet) -> Result<Trace, String> {
        match self.walk(chain, p, 0)? {
            Some(t) => Ok(t),
            None => Ok(Trace {
                outcome: Outcome::Accept,
                rule: None,
            }),
        }
    }

    /// `None`: fell off the end of the chain or `RETURN`ed.
    fn walk(&self, chain: &str, p: &Packet, depth: usize) -> Result<Option<Trace>, String> {
        if depth > 16 {
            return Err(format!("chain loop at {chain}"));
        }
        let Some(rules) = self.chains.get(chain) else {
            return Ok(None);
        };
        for r in rules {
            if !r.matches(p)? {
                continue;
            }
            let done = |outcome| {
                Ok(Some(Trace {
                    outcome,
                    rule: Some(r.text.clone()),
                }))
            };
            match &r.target {
                Target::Return => {
                    return if depth == 0 {
                        done(Outcome::Accept)
                    } else {
                        Ok(None)
                    };
                }
                Target::Accept => return done(Outcome::Accept),
                Target::Redirect(port) => return done(Outcome::Redirect(*port)),
                Target::Jump(c) => {
                    if !self.chains.contains_key(c) {
                        return Err(format!("jump to undeclared chain {c} in {:?}", r.text));
                    }
                    if let Some(t) = self.walk(c, p, depth + 1)? {
                        return Ok(Some(t));
                    }
                }
                Target::Other(t) => {
                    return Err(format!("the model does not evaluate target {t:?}"));
                }
            }
        }
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pkt(dst: &str, dport: u16, uid: u32) -> Packet {
        Packet {
            proto: "tcp",
            src: "198.18.0.1".parse().unwrap(),
            dst: dst.parse().unwrap(),
            sport: 40000,
            dport,
            in_iface: None,
            out_iface: Some("eth0".into()),
            uid: Some(uid),
            gid: Some(uid),
        }
    }

    #[test]
    fn two_spellings_of_one_rule_are_equal() {
        let a = Ruleset::parse(
            "*nat\n:OUTPUT ACCEPT\n-A OUTPUT -p udp -m comment --comment \"a \\\"b\\\" c\" -m udp --dport 53 -j REDIRECT --to-ports 15053\nCOMMIT\n",
        )
        .unwrap();
        let b = Ruleset::parse(
            "* nat\n-A OUTPUT --dport 53 -p udp -j REDIRECT --to-port 15053\nCOMMIT\n",
        )
        .unwrap();
        assert!(a.diff(&b).is_empty(), "{:?}", a.diff(&b));
        let c = Ruleset::parse(
            "* nat\n-A OUTPUT -p udp --dport 54 -j REDIRECT --to-port 15053\nCOMMIT\n",
        )
        .unwrap();
        assert_eq!(a.diff(&c).len(), 1);
    }

    #[test]
    fn walks_first_match_wins_with_returns_from_user_chains() {
        let rs = Ruleset::parse(
            "* nat\n-N OUT\n-N REDIR\n-A REDIR -p tcp -j REDIRECT --to-ports 15001\n\
             -A OUTPUT -j OUT\n-A OUT -m owner --uid-owner 1337 -j RETURN\n\
             -A OUT -d 10.0.0.0/8 -j RETURN\n-A OUT -p tcp -m multiport ! --dports 22,100:200 -j REDIR\nCOMMIT\n",
        )
        .unwrap();
        let nat = rs.table("nat");
        let o = |d, port, uid| nat.eval("OUTPUT", &pkt(d, port, uid)).unwrap().outcome;
        assert_eq!(o("192.0.2.1", 80, 1000), Outcome::Redirect(15001));
        assert_eq!(o("192.0.2.1", 80, 1337), Outcome::Accept);
        assert_eq!(o("10.1.2.3", 80, 1000), Outcome::Accept);
        assert_eq!(o("192.0.2.1", 150, 1000), Outcome::Accept);
        assert_eq!(o("192.0.2.1", 22, 1000), Outcome::Accept);
        assert_eq!(o("192.0.2.1", 201, 1000), Outcome::Redirect(15001));
    }

    #[test]
    fn unknown_matches_are_refused_not_guessed() {
        let rs = Ruleset::parse(
            "*mangle\n-A PREROUTING -m conntrack --ctstate INVALID -j DROP\nCOMMIT\n",
        )
        .unwrap();
        assert!(
            rs.table("mangle")
                .eval("PREROUTING", &pkt("192.0.2.1", 80, 0))
                .is_err()
        );
    }
}
