//! The lbcluster data plane: zero-copy packet views, the Full-NAT engine, the session table,
//! schedulers and the local-address allocator.
//!
//! This crate performs no I/O: it opens no socket, reads no clock (every time is an argument)
//! and spawns no thread. It is driven alike by the node's packet workers, by tests, by fuzzers
//! and by benchmarks. No input makes it panic; the established-flow path does not allocate.
#![forbid(unsafe_code)]

pub mod counters;
pub mod echo;
pub mod engine;
mod family;
pub mod frag;
pub mod laddr;
pub mod offload;
pub mod sched;
pub mod service;
pub mod session;
pub mod synproxy;
pub mod tcp_state;
pub mod time;
pub mod wire;

pub use counters::{CounterTotals, DropReason, Event};
pub use engine::{
    Authority, Engine, EngineConfig, InstallError, Installed, L4Checksum, Packet, SessionCounts,
    Verdict, Worker,
};
pub use laddr::{L4Proto, LocalAddr, LocalAddrPool};
pub use offload::{FlowActivity, Offload, OffloadFlow, OffloadSide, SideActivity};
pub use service::{BackendConfig, ConnReuse, ServiceConfig, ServiceKey, Snapshot, SynProxy};
pub use session::{FlowState, SessionEvent, SessionRecord};
pub use tcp_state::{Direction, TcpState, Timeouts};
pub use time::Instant;
