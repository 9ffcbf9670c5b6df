//! Session sync between nodes: every node sends the sessions it owns to every peer, so that any
//! node can carry on a flow another node started (DESIGN §2, §3).
//!
//! * [`codec`]: the wire format (versioned, length-capped MessagePack frames).
//! * [`core`]: the protocol as a sans-IO state machine — ownership of flows by LIP, batching,
//!   coalescing, epochs and sequence numbers, bulk sync and its re-request, refresh, table
//!   streams that reconcile, bounded queues. It performs no I/O and reads no clock; it never
//!   panics on any input.
//! * [`driver`]: runs the core for one node over QUIC connections the node provides; applies
//!   and table copies run on a thread of their own.
//!
//! Depends on `dataplane` only, for the session record it carries.

pub mod codec;
pub mod core;
pub mod driver;

pub use crate::core::{Apply, Config, ConfigError, Core, DropReason, Drops, Output, PeerStats};
pub use crate::driver::{ALPN, SessionSource, StartError, SyncHandle};
