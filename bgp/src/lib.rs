//! BGP announcements through BIRD 2: pure config rendering plus `birdc` control. Depends on
//! nothing in the workspace: the node describes what to announce in a plain [`Announce`].
//!
//! * [`render`] turns an [`Announce`] into BIRD's whole config file; it performs no I/O and
//!   rejects anything BIRD would misread (DESIGN §5, TESTBED "Owner and backup routes").
//! * [`Bird`] writes a config atomically after `bird -p` accepted it and calls
//!   `birdc configure`; [`Applier`] runs that in the background, coalescing bursts. The config
//!   holds the BGP passwords: it is 0600 (0640 where the old file let its group read) from its
//!   creation on, and its rename is followed by a directory fsync.
//! * [`parse_show_protocols`] reads `birdc show protocols all` (BIRD 2 and 3); it never panics.
//!
//! Failures are [`BgpError`]s that name the failing part (binary missing, socket missing, daemon
//! not answering, config rejected); nothing here panics on any input.

mod applier;
mod bird;
mod error;
mod render;
mod show;

pub use applier::{Applier, DEFAULT_INTERVAL};
pub use bird::{Applied, Bird, DEFAULT_TIMEOUT};
pub use error::BgpError;
pub use render::{Announce, Bfd, GRACEFUL_SHUTDOWN, PEER_PREFIX, Peer, render};
pub use show::{ChannelState, ProtoState, ProtocolState, RouteCounts, parse_show_protocols};
