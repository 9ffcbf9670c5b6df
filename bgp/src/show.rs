//! Parses `birdc show protocols all` into [`ProtocolState`]s. Pure, and total: any input gives a
//! list (lines it does not know are skipped), never a panic.
//!
//! Understands the wording of BIRD 2 and BIRD 3 (which adds `Import state:`/`Export state:` and
//! more columns to the change statistics — both ignored), plain birdc output and the numbered
//! reply lines of `birdc -v` or the raw socket (`1002-…`).

use std::net::IpAddr;

use crate::render::PEER_PREFIX;

/// A protocol's state as in the `State` column.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProtoState {
    /// Running (for BGP: the session is established).
    Up,
    /// Disabled or failed.
    Down,
    /// Starting (for BGP: connecting, Active/Connect/OpenSent…).
    Start,
    /// Shutting down.
    Stop,
    /// Down and flushing its routes.
    Flush,
    /// A word this parser does not know; data, not an error.
    Other(String),
}

impl ProtoState {
    fn parse(word: &str) -> ProtoState {
        match word {
            "up" => ProtoState::Up,
            "down" => ProtoState::Down,
            "start" => ProtoState::Start,
            "stop" => ProtoState::Stop,
            "flush" => ProtoState::Flush,
            other => ProtoState::Other(other.to_string()),
        }
    }
}

/// Route counters of one channel (`Routes: 1 imported, 0 exported, 1 preferred`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RouteCounts {
    /// Routes the protocol put into the table (a static protocol: its active routes).
    pub imported: u32,
    /// Routes the protocol sent out (a BGP session: announced to the peer).
    pub exported: u32,
    /// Imported routes that won the best-route selection.
    pub preferred: u32,
}

/// One channel (`Channel ipv4`) of a protocol.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ChannelState {
    /// `ipv4`, `ipv6`, … (BIRD 1 style output without channels: the table's name).
    pub name: String,
    /// `UP`, `DOWN`, `START`, … as BIRD prints it.
    pub state: String,
    /// The routing table, e.g. `master4`.
    pub table: String,
    /// The counters; zero while the channel is down (BIRD prints none then).
    pub routes: RouteCounts,
}

/// One protocol of `show protocols all`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProtocolState {
    /// The protocol's name (`vip4`, `peer_r1`, `device1`, …).
    pub name: String,
    /// Its kind: `BGP`, `Static`, `BFD`, `Device`, …
    pub proto: String,
    /// The main table, `---` when none.
    pub table: String,
    /// The `State` column.
    pub state: ProtoState,
    /// When the state last changed, as BIRD prints it (format depends on `timeformat`).
    pub since: String,
    /// The `Info` column, e.g. `Established`, or `Active        Socket: Connection refused`.
    pub info: String,
    /// BGP: the `BGP state:` line (`Established`, `Active`, `Connect`, `Passive`, `Idle`, …).
    pub bgp_state: Option<String>,
    /// BGP: the neighbor's address.
    pub neighbor: Option<IpAddr>,
    /// BGP: the neighbor's AS.
    pub neighbor_as: Option<u32>,
    /// BGP: the `Last error:` line.
    pub last_error: Option<String>,
    /// BFD: for a BFD protocol, whether it is up; for a BGP protocol, `Some(false)` when BIRD
    /// says BFD took the session down. `None` otherwise — BIRD reports per-session BFD state in
    /// `show bfd sessions`, not here.
    pub bfd: Option<bool>,
    /// The channels with their route counters.
    pub channels: Vec<ChannelState>,
}

impl ProtocolState {
    fn new(name: &str, proto: &str, table: &str, state: &str, since: String, info: String) -> Self {
        ProtocolState {
            name: name.to_string(),
            proto: proto.to_string(),
            table: table.to_string(),
            state: ProtoState::parse(state),
            since,
            bgp_state: None,
            neighbor: None,
            neighbor_as: None,
            last_error: None,
            bfd: match proto {
                "BFD" => Some(state == "up"),
                "BGP" if mentions_bfd_down(&info) => Some(false),
                _ => None,
            },
            channels: Vec::new(),
            info,
        }
    }

    /// The peer name this crate rendered the protocol from (`peer_r1` → `r1`), for BGP
    /// protocols only.
    pub fn peer_name(&self) -> Option<&str> {
        (self.proto == "BGP")
            .then(|| self.name.strip_prefix(PEER_PREFIX))
            .flatten()
    }

    /// The route counters summed over all channels.
    pub fn routes(&self) -> RouteCounts {
        self.channels
            .iter()
            .fold(RouteCounts::default(), |acc, c| RouteCounts {
                imported: acc.imported.saturating_add(c.routes.imported),
                exported: acc.exported.saturating_add(c.routes.exported),
                preferred: acc.preferred.saturating_add(c.routes.preferred),
            })
    }

    /// Whether this is an established BGP session.
    pub fn is_established(&self) -> bool {
        self.proto == "BGP" && self.state == ProtoState::Up
    }
}

/// Parses the output of `birdc show protocols all` (or plain `show protocols`).
pub fn parse_show_protocols(output: &str) -> Vec<ProtocolState> {
    let mut out: Vec<ProtocolState> = Vec::new();
    for raw in output.lines() {
        let line = strip_reply_code(raw);
        if line.trim().is_empty() {
            continue;
        }
        if !line.starts_with(char::is_whitespace) {
            if let Some(p) = parse_protocol_line(line) {
                out.push(p);
            }
            continue;
        }
        if let Some(p) = out.last_mut() {
            parse_detail_line(p, line.trim());
        }
    }
    out
}

/// Removes a four-digit reply code with its `-`/` ` separator (`birdc -v`, raw socket).
fn strip_reply_code(line: &str) -> &str {
    let b = line.as_bytes();
    if b.len() >= 5 && b[..4].iter().all(u8::is_ascii_digit) && (b[4] == b'-' || b[4] == b' ') {
        // Bytes 0..5 are ASCII, so 5 is a char boundary.
        &line[5..]
    } else {
        line
    }
}

/// `name proto table state since [info]`; the header line and greetings give `None`.
fn parse_protocol_line(line: &str) -> Option<ProtocolState> {
    let (name, rest) = next_word(line)?;
    let (proto, rest) = next_word(rest)?;
    let (table, rest) = next_word(rest)?;
    let (state, rest) = next_word(rest)?;
    if name == "Name" && proto == "Proto" {
        return None;
    }
    if !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
        return None;
    }
    // `Since` is one word (`10:00:00.123`) or a date and a time, depending on `timeformat`.
    let (since, rest) = match next_word(rest) {
        Some((first, after)) => match next_word(after) {
            Some((second, after2)) if is_date(first) && is_time(second) => {
                (format!("{first} {second}"), after2)
            }
            _ => (first.to_string(), after),
        },
        None => (String::new(), ""),
    };
    Some(ProtocolState::new(
        name,
        proto,
        table,
        state,
        since,
        rest.trim().to_string(),
    ))
}

fn parse_detail_line(p: &mut ProtocolState, line: &str) {
    if let Some(name) = line.strip_prefix("Channel ") {
        p.channels.push(ChannelState {
            name: name.trim().to_string(),
            ..ChannelState::default()
        });
        return;
    }
    let Some((key, value)) = line.split_once(':') else {
        return;
    };
    let value = value.trim();
    match key.trim() {
        "BGP state" => p.bgp_state = Some(value.to_string()),
        "Neighbor address" => {
            // `fe80::1%eth0` or `192.0.2.1 onlink`: the address ends at `%` or a space.
            let addr = value.split(['%', ' ']).next().unwrap_or_default();
            p.neighbor = addr.parse().ok();
        }
        "Neighbor AS" => p.neighbor_as = value.parse().ok(),
        "Last error" => p.last_error = Some(value.to_string()),
        "State" => {
            if let Some(c) = p.channels.last_mut() {
                c.state = value.to_string();
            }
        }
        "Table" => {
            if let Some(c) = p.channels.last_mut() {
                c.table = value.to_string();
            }
        }
        "Routes" => {
            if p.channels.is_empty() {
                // BIRD 1 prints the counters at protocol level.
                p.channels.push(ChannelState {
                    name: p.table.clone(),
                    table: p.table.clone(),
                    ..ChannelState::default()
                });
            }
            if let Some(c) = p.channels.last_mut() {
                c.routes = parse_routes(value);
            }
        }
        _ => {}
    }
    if p.proto == "BGP" && mentions_bfd_down(line) {
        p.bfd = Some(false);
    }
}

fn mentions_bfd_down(text: &str) -> bool {
    text.contains("BFD session down")
}

/// `1 imported, 0 filtered, 2 exported, 1 preferred` in any order; unknown parts ignored.
fn parse_routes(value: &str) -> RouteCounts {
    let mut counts = RouteCounts::default();
    for part in value.split(',') {
        let mut words = part.split_whitespace();
        let (Some(n), Some(what)) = (words.next(), words.next()) else {
            continue;
        };
        let Ok(n) = n.parse() else { continue };
        match what {
            "imported" => counts.imported = n,
            "exported" => counts.exported = n,
            "preferred" => counts.preferred = n,
            _ => {}
        }
    }
    counts
}

fn next_word(s: &str) -> Option<(&str, &str)> {
    let s = s.trim_start();
    if s.is_empty() {
        return None;
    }
    let end = s.find(char::is_whitespace).unwrap_or(s.len());
    Some((&s[..end], &s[end..]))
}

fn is_date(w: &str) -> bool {
    w.len() == 10 && w.bytes().all(|b| b.is_ascii_digit() || b == b'-') && w.contains('-')
}

fn is_time(w: &str) -> bool {
    w.contains(':')
        && w.bytes()
            .all(|b| b.is_ascii_digit() || b == b':' || b == b'.')
}
