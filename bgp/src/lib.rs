//! BGP announcements through BIRD: pure config rendering plus `birdc` control. Depends on nothing
//! in the workspace.
//!
//! Empty until the BGP issue lands; the crate exists so the workspace layering is fixed now.
