//! The lab: network-namespace topologies for end-to-end tests and the demo.
//!
//! Empty until the node issue lands; the crate exists so the workspace layering is fixed now.
