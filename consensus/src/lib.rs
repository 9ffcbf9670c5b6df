//! Replicated cluster configuration: the openraft state machine, its durable storage and the
//! QUIC Raft transport. Depends on no other workspace crate.
//!
//! Empty until the Raft issue lands; the crate exists so the workspace layering is fixed now.
