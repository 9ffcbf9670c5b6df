//! Established flows handed to a faster path beside the engine (DESIGN §1 "Two tiers": the
//! node's kernel fast path), with the engine as the authority.
//!
//! Decisions, in one place:
//! * **When.** A TCP session is offloaded when it becomes ESTABLISHED, a UDP session when its
//!   second packet reaches the engine (the first opened it); sessions installed from peers are
//!   offloaded alike. One refusal (a full map) keeps the session on the engine for good, counted.
//! * **Both sides.** The client side (client → VIP, leaving as LIP → real server) and the server
//!   side (real server → LIP, leaving as VIP → client) go together.
//! * **Back to the engine** — withdrawn — when the session leaves ESTABLISHED (FIN and RST always
//!   come to the engine), is closed, expires or is removed by a peer. What the faster path counted
//!   is then folded into the real server's counters, and its TCP window edges into the session.
//! * **Expiry.** A due session that is offloaded is asked when it last saw a packet: a live flow
//!   gets a new deadline from that time and is not expired; at most one question per due
//!   session, within the sweep's budget.
//! * **RST.** Before a segment of an offloaded TCP session is checked against the window, the
//!   window edges the faster path saw are folded in, so only an in-window RST closes it.

use std::fmt;
use std::net::SocketAddr;

use crate::laddr::L4Proto;
use crate::time::Instant;

/// One side of an offloaded session: its packets arrive as `arrives` and leave as `leaves`
/// (source, destination).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OffloadSide {
    pub arrives: (SocketAddr, SocketAddr),
    pub leaves: (SocketAddr, SocketAddr),
    /// TCP: the window-scale shift of this side's windows (0 unless both SYNs carried one).
    pub wscale: u8,
    /// TCP: the highest sequence number + length this side has sent, as the engine saw it.
    pub seq_end: u32,
    /// TCP: the largest scaled window this side advertised, as the engine saw it.
    pub max_win: u32,
}

/// A session offloaded: both its sides.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OffloadFlow {
    pub proto: L4Proto,
    pub client_side: OffloadSide,
    pub server_side: OffloadSide,
}

/// What the faster path saw of one side.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SideActivity {
    /// The last packet it forwarded, on the engine's clock; `None` before the first.
    pub last_seen: Option<Instant>,
    pub packets: u64,
    pub bytes: u64,
    /// TCP: the window edges of this side (see [`OffloadSide`]).
    pub seq_end: u32,
    pub max_win: u32,
}

/// What the faster path saw of a flow: `[client side, server side]`.
pub type FlowActivity = [SideActivity; 2];

/// A faster path the engine hands established flows to.
pub trait Offload: Send + Sync + fmt::Debug {
    /// Takes over forwarding `flow`; false when it cannot (full, refused).
    fn offload(&self, flow: &OffloadFlow) -> bool;

    /// Stops forwarding `flow`; what it saw of it since it was offloaded (`None` if it did not
    /// hold it).
    fn withdraw(&self, flow: &OffloadFlow) -> Option<FlowActivity>;

    /// What it has seen of `flow` so far; it keeps forwarding it.
    fn activity(&self, flow: &OffloadFlow) -> Option<FlowActivity>;
}

/// Where a session stands with the faster path.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) enum Offloaded {
    #[default]
    No,
    Yes,
    /// Refused once: the session stays with the engine.
    Refused,
}
