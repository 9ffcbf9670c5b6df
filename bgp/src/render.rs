//! Renders a node's whole BIRD 2 config from an [`Announce`]. Pure: no I/O, no clock.
//!
//! The rendered file is BIRD's entire config (`bird -c FILE`), not an include: only a whole file
//! can be validated with `bird -p` before BIRD sees it, and the node owns every line of it.
//!
//! Layout (TESTBED.md, "Owner and backup routes for LIPs"):
//! * `protocol device {}` — without it static routes never activate;
//! * six static protocols, `vip4`/`vip6`, `own4`/`own6`, `backup4`/`backup6`, each route
//!   `via "<device>"` with `check link yes;`, so BIRD withdraws every route by itself within
//!   milliseconds when the data plane's device goes away or loses carrier. A protocol with no
//!   routes is still rendered: withdrawing all VIPs is an empty `vip4`/`vip6`;
//! * one export filter `lbc_export`: VIPs (with the graceful-shutdown community while draining),
//!   own LIPs, and backup LIPs with the local AS prepended `backup_prepend` times; the configured
//!   communities and MED on all of them; everything else rejected;
//! * one BGP protocol per peer, named `peer_<name>`, with the channel of the peer's address
//!   family (`import none`), short timers and optional BFD, TCP-MD5 password;
//! * `protocol bfd` when any peer uses BFD.
//!
//! Every string that reaches the file is validated (identifiers, device name, password), so the
//! input cannot inject config; invalid input is an [`BgpError::InvalidAnnounce`], never a panic.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr};

use crate::BgpError;

/// The graceful-shutdown community (RFC 8326): receivers lower the route's preference, so
/// traffic moves away before the route is withdrawn.
pub const GRACEFUL_SHUTDOWN: (u16, u16) = (65535, 0);

/// Prefix of the BGP protocol names: keeps peer names clear of BIRD keywords (`rt` is one) and of
/// the static protocols' names.
pub const PEER_PREFIX: &str = "peer_";

/// Seconds between connection attempts to a peer (TESTBED's verified router/node setting).
const CONNECT_RETRY_SECS: u16 = 3;
/// BIRD's symbol length limit.
const MAX_SYMBOL_LEN: usize = 64;
/// Linux's interface name limit (IFNAMSIZ - 1).
const MAX_IFNAME_LEN: usize = 15;
/// The kernel's TCP-MD5 key limit (TCP_MD5SIG_MAXKEYLEN).
const MAX_PASSWORD_LEN: usize = 80;

/// What one node announces, and to whom.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Announce {
    /// BIRD's router id (nonzero).
    pub router_id: Ipv4Addr,
    /// The node's AS number (nonzero).
    pub local_as: u32,
    /// The data plane's device (TUN, e.g. `lbc0`): every route's next hop, so routes live only
    /// while it is up.
    pub device: String,
    /// VIPs to announce (each as a /32 or /128). Empty = withdraw them all.
    pub vips: Vec<IpAddr>,
    /// This node's own LIPs, announced as the preferred route.
    pub own_lips: Vec<IpAddr>,
    /// Other nodes' LIPs, announced as backup (AS path prepended).
    pub backup_lips: Vec<IpAddr>,
    /// Drain step 1: tag the VIP routes with [`GRACEFUL_SHUTDOWN`].
    pub graceful_shutdown: bool,
    /// Standard communities added to every announced route.
    pub communities: Vec<(u16, u16)>,
    /// MED set on every announced route.
    pub med: Option<u32>,
    /// How many times the local AS is prepended on backup LIP routes (1 to 16).
    pub backup_prepend: u8,
    /// The BGP sessions.
    pub peers: Vec<Peer>,
}

impl Announce {
    /// An announcement of nothing to nobody, with the default of 3 backup prepends.
    pub fn new(router_id: Ipv4Addr, local_as: u32, device: impl Into<String>) -> Announce {
        Announce {
            router_id,
            local_as,
            device: device.into(),
            vips: Vec::new(),
            own_lips: Vec::new(),
            backup_lips: Vec::new(),
            graceful_shutdown: false,
            communities: Vec::new(),
            med: None,
            backup_prepend: 3,
            peers: Vec::new(),
        }
    }
}

/// One BGP session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    /// Letters, digits and `_`; the BIRD protocol is named `peer_<name>`.
    pub name: String,
    /// The neighbor's address; its family decides which routes (v4 or v6) the session carries.
    pub addr: IpAddr,
    /// The neighbor's AS (nonzero).
    pub remote_as: u32,
    /// Source address of the session (same family as `addr`).
    pub local_addr: Option<IpAddr>,
    /// Hold time, 3 to 65535 s.
    pub hold_secs: u16,
    /// Keepalive time, 1 s to the hold time.
    pub keepalive_secs: u16,
    /// Sub-second failure detection.
    pub bfd: Option<Bfd>,
    /// TCP-MD5 password (the caller reads it from a file): printable ASCII without `"` or `\`,
    /// at most 80 bytes.
    pub password: Option<String>,
}

impl Peer {
    /// A session with TESTBED's short timers (hold 3 s, keepalive 1 s), no BFD, no password.
    pub fn new(name: impl Into<String>, addr: IpAddr, remote_as: u32) -> Peer {
        Peer {
            name: name.into(),
            addr,
            remote_as,
            local_addr: None,
            hold_secs: 3,
            keepalive_secs: 1,
            bfd: None,
            password: None,
        }
    }

    /// The name of this peer's BGP protocol in BIRD (and in `show protocols`).
    pub fn protocol_name(&self) -> String {
        format!("{PEER_PREFIX}{}", self.name)
    }
}

/// BFD timers of one session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bfd {
    /// Minimum receive and transmit interval, 1 to 60000 ms.
    pub interval_ms: u32,
    /// Missed packets before the session is declared down, 1 to 255.
    pub multiplier: u8,
}

/// Renders the whole BIRD config for `a`, or says which field BIRD would refuse.
pub fn render(a: &Announce) -> Result<String, BgpError> {
    let sets = validate(a)?;
    let mut out = String::new();
    out.push_str("# Rendered by lbcluster (bgp crate); the node rewrites this file.\n");
    // fmt::Write into a String cannot fail; `let _` keeps that visible without unwrap.
    let _ = writeln!(out, "router id {};\n", a.router_id);
    out.push_str("protocol device {\n}\n");
    for (name, family, routes) in [
        ("vip4", "ipv4", &sets.vips4),
        ("vip6", "ipv6", &sets.vips6),
        ("own4", "ipv4", &sets.own4),
        ("own6", "ipv6", &sets.own6),
        ("backup4", "ipv4", &sets.backup4),
        ("backup6", "ipv6", &sets.backup6),
    ] {
        let _ = writeln!(
            out,
            "\nprotocol static {name} {{\n  {family};\n  check link yes;"
        );
        for addr in routes {
            let len = if addr.is_ipv4() { 32 } else { 128 };
            let _ = writeln!(out, "  route {addr}/{len} via \"{}\";", a.device);
        }
        out.push_str("}\n");
    }
    render_filter(&mut out, a);
    if a.peers.iter().any(|p| p.bfd.is_some()) {
        out.push_str("\nprotocol bfd lbc_bfd {\n}\n");
    }
    for peer in &a.peers {
        render_peer(&mut out, a.local_as, peer);
    }
    Ok(out)
}

fn render_filter(out: &mut String, a: &Announce) {
    let mut common = String::new();
    for (x, y) in &a.communities {
        let _ = writeln!(common, "    bgp_community.add(({x}, {y}));");
    }
    if let Some(med) = a.med {
        let _ = writeln!(common, "    bgp_med = {med};");
    }
    out.push_str("\nfilter lbc_export\n{\n");
    out.push_str("  if proto = \"vip4\" || proto = \"vip6\" then {\n");
    if a.graceful_shutdown {
        let (x, y) = GRACEFUL_SHUTDOWN;
        let _ = writeln!(out, "    bgp_community.add(({x}, {y}));");
    }
    let _ = write!(out, "{common}    accept;\n  }}\n");
    out.push_str("  if proto = \"own4\" || proto = \"own6\" then {\n");
    let _ = write!(out, "{common}    accept;\n  }}\n");
    out.push_str("  if proto = \"backup4\" || proto = \"backup6\" then {\n");
    for _ in 0..a.backup_prepend {
        let _ = writeln!(out, "    bgp_path.prepend({});", a.local_as);
    }
    let _ = write!(out, "{common}    accept;\n  }}\n");
    out.push_str("  reject;\n}\n");
}

fn render_peer(out: &mut String, local_as: u32, p: &Peer) {
    let _ = writeln!(out, "\nprotocol bgp {} {{", p.protocol_name());
    match p.local_addr {
        Some(local) => {
            let _ = writeln!(out, "  local {local} as {local_as};");
        }
        None => {
            let _ = writeln!(out, "  local as {local_as};");
        }
    }
    let _ = writeln!(out, "  neighbor {} as {};", p.addr, p.remote_as);
    let _ = writeln!(
        out,
        "  hold time {}; keepalive time {}; start delay time 1; connect retry time {CONNECT_RETRY_SECS}; error wait time 1, 10;",
        p.hold_secs, p.keepalive_secs
    );
    if let Some(pw) = &p.password {
        let _ = writeln!(out, "  password \"{pw}\";");
    }
    if let Some(b) = p.bfd {
        let _ = writeln!(
            out,
            "  bfd {{ min rx interval {0} ms; min tx interval {0} ms; multiplier {1}; }};",
            b.interval_ms, b.multiplier
        );
    }
    let family = if p.addr.is_ipv4() { "ipv4" } else { "ipv6" };
    let _ = writeln!(
        out,
        "  {family} {{ import none; export filter lbc_export; }};\n}}"
    );
}

/// The validated, deduplicated and sorted route sets.
struct RouteSets {
    vips4: BTreeSet<IpAddr>,
    vips6: BTreeSet<IpAddr>,
    own4: BTreeSet<IpAddr>,
    own6: BTreeSet<IpAddr>,
    backup4: BTreeSet<IpAddr>,
    backup6: BTreeSet<IpAddr>,
}

fn invalid(msg: impl Into<String>) -> BgpError {
    BgpError::InvalidAnnounce(msg.into())
}

fn validate(a: &Announce) -> Result<RouteSets, BgpError> {
    if a.router_id.is_unspecified() {
        return Err(invalid("router id must not be 0.0.0.0"));
    }
    if a.local_as == 0 {
        return Err(invalid("local AS must not be 0"));
    }
    let dev_ok = !a.device.is_empty()
        && a.device.len() <= MAX_IFNAME_LEN
        && a.device
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
    if !dev_ok {
        return Err(invalid(format!(
            "device {:?} must be 1 to {MAX_IFNAME_LEN} letters, digits, '.', '_' or '-'",
            a.device
        )));
    }
    if !(1..=16).contains(&a.backup_prepend) {
        return Err(invalid(format!(
            "backup prepend count {} must be 1 to 16",
            a.backup_prepend
        )));
    }
    let vips = route_set("VIP", &a.vips)?;
    let own = route_set("own LIP", &a.own_lips)?;
    let backup = route_set("backup LIP", &a.backup_lips)?;
    for (x, xs, y, ys) in [
        ("VIP", &vips, "own LIP", &own),
        ("VIP", &vips, "backup LIP", &backup),
        ("own LIP", &own, "backup LIP", &backup),
    ] {
        if let Some(addr) = xs.intersection(ys).next() {
            return Err(invalid(format!("{addr} is both a {x} and a {y}")));
        }
    }
    let mut names = BTreeSet::new();
    let mut addrs = BTreeSet::new();
    for p in &a.peers {
        validate_peer(p)?;
        if !names.insert(p.name.as_str()) {
            return Err(invalid(format!("two peers are named {:?}", p.name)));
        }
        if !addrs.insert(p.addr) {
            return Err(invalid(format!("two peers have the address {}", p.addr)));
        }
    }
    let (vips4, vips6) = vips.into_iter().partition(IpAddr::is_ipv4);
    let (own4, own6) = own.into_iter().partition(IpAddr::is_ipv4);
    let (backup4, backup6) = backup.into_iter().partition(IpAddr::is_ipv4);
    Ok(RouteSets {
        vips4,
        vips6,
        own4,
        own6,
        backup4,
        backup6,
    })
}

fn route_set(what: &str, addrs: &[IpAddr]) -> Result<BTreeSet<IpAddr>, BgpError> {
    for addr in addrs {
        if addr.is_unspecified() || addr.is_multicast() {
            return Err(invalid(format!("{what} {addr} is not a unicast address")));
        }
    }
    Ok(addrs.iter().copied().collect())
}

fn validate_peer(p: &Peer) -> Result<(), BgpError> {
    let name_ok = !p.name.is_empty()
        && PEER_PREFIX.len() + p.name.len() <= MAX_SYMBOL_LEN
        && p.name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_');
    if !name_ok {
        return Err(invalid(format!(
            "peer name {:?} must be 1 to {} letters, digits or '_'",
            p.name,
            MAX_SYMBOL_LEN - PEER_PREFIX.len()
        )));
    }
    let who = &p.name;
    if p.addr.is_unspecified() || p.addr.is_multicast() {
        return Err(invalid(format!(
            "peer {who}: {} is not a unicast address",
            p.addr
        )));
    }
    if p.remote_as == 0 {
        return Err(invalid(format!("peer {who}: remote AS must not be 0")));
    }
    if let Some(local) = p.local_addr
        && (local.is_ipv4() != p.addr.is_ipv4() || local.is_unspecified() || local.is_multicast())
    {
        return Err(invalid(format!(
            "peer {who}: local address {local} must be a unicast address of the family of {}",
            p.addr
        )));
    }
    if p.hold_secs < 3 {
        return Err(invalid(format!(
            "peer {who}: hold time {} s must be 3 to 65535 s",
            p.hold_secs
        )));
    }
    if p.keepalive_secs == 0 || p.keepalive_secs > p.hold_secs {
        return Err(invalid(format!(
            "peer {who}: keepalive time {} s must be 1 s to the hold time ({} s)",
            p.keepalive_secs, p.hold_secs
        )));
    }
    if let Some(b) = p.bfd
        && (!(1..=60_000).contains(&b.interval_ms) || b.multiplier == 0)
    {
        return Err(invalid(format!(
            "peer {who}: BFD interval {} ms must be 1 to 60000 and multiplier {} 1 to 255",
            b.interval_ms, b.multiplier
        )));
    }
    if let Some(pw) = &p.password {
        let ok = !pw.is_empty()
            && pw.len() <= MAX_PASSWORD_LEN
            && pw
                .bytes()
                .all(|b| (b' '..=b'~').contains(&b) && b != b'"' && b != b'\\');
        if !ok {
            // The password itself is never quoted in an error: it ends up in logs and status.
            return Err(invalid(format!(
                "peer {who}: password must be 1 to {MAX_PASSWORD_LEN} printable ASCII characters without '\"' or '\\'"
            )));
        }
    }
    Ok(())
}
