//! The lbcluster data plane: zero-copy packet views, the Full-NAT engine, the session table,
//! schedulers and the local-address allocator.
//!
//! This crate performs no I/O: it opens no socket, reads no clock (every time is an argument)
//! and spawns no thread. It is driven alike by the node's packet workers, by tests, by fuzzers
//! and by benchmarks.
#![forbid(unsafe_code)]

pub mod laddr;
pub mod sched;
pub mod wire;
