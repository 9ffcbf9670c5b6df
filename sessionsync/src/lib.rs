//! Session sync between nodes: a sans-IO protocol core (codec, batching, bulk sync) and a thin
//! QUIC driver. Depends on `dataplane` only.
//!
//! Empty until the session-sync issue lands; the crate exists so the workspace layering is fixed now.
