//! Zero-copy views of the packet formats the data plane reads and rewrites.
//!
//! Each protocol module follows one pattern. `Packet<T: AsRef<[u8]>>` wraps a buffer without
//! copying it. Untrusted bytes enter only through `Packet::new_checked`, which is
//! `new_unchecked` followed by `check_len`; once `check_len` has passed, no getter of that view
//! panics. Setters that change a length field (header length, total length, …) can break that
//! guarantee, so call `check_len` again after using them on a view you will read back.
//! `Repr` types are the owned/high-level form of a header: `parse` from a checked view,
//! `emit` into a buffer of at least `buffer_len()` bytes.
//!
//! All checksum values are the 16-bit field as read big-endian from the wire; the
//! [`checksum`] module holds the arithmetic shared by every protocol.

use core::fmt;

pub mod checksum;
pub mod icmpv4;
pub mod icmpv6;
pub mod ipv4;
pub mod ipv6;
pub mod tcp;
pub mod udp;

pub use icmpv4::{Message as Icmpv4Message, Packet as Icmpv4Packet};
pub use icmpv6::{Message as Icmpv6Message, Packet as Icmpv6Packet};
pub use ipv4::{Packet as Ipv4Packet, Repr as Ipv4Repr};
pub use ipv6::{
    FragmentInfo, Packet as Ipv6Packet, Repr as Ipv6Repr, UpperLayer as Ipv6UpperLayer,
};
pub use tcp::{Control as TcpControl, Packet as TcpPacket, Repr as TcpRepr, TcpOption, TcpOptions};
pub use udp::{Packet as UdpPacket, Repr as UdpRepr};

/// Why a buffer was rejected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// The buffer is shorter than the headers or length fields require.
    #[error("truncated packet")]
    Truncated,
    /// A field holds a value the protocol forbids (bad version, bad length, bad checksum, …).
    #[error("malformed packet")]
    Malformed,
}

/// Result of parsing or validating a packet.
pub type Result<T> = core::result::Result<T, Error>;

/// IP protocol numbers (IPv4 "protocol", IPv6 "next header"), IANA assigned.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum IpProtocol {
    HopByHop,
    Icmp,
    Tcp,
    Udp,
    Ipv6Route,
    Ipv6Frag,
    Esp,
    Ah,
    Icmpv6,
    Ipv6NoNxt,
    Ipv6Opts,
    Unknown(u8),
}

impl From<u8> for IpProtocol {
    fn from(value: u8) -> Self {
        match value {
            0 => IpProtocol::HopByHop,
            1 => IpProtocol::Icmp,
            6 => IpProtocol::Tcp,
            17 => IpProtocol::Udp,
            43 => IpProtocol::Ipv6Route,
            44 => IpProtocol::Ipv6Frag,
            50 => IpProtocol::Esp,
            51 => IpProtocol::Ah,
            58 => IpProtocol::Icmpv6,
            59 => IpProtocol::Ipv6NoNxt,
            60 => IpProtocol::Ipv6Opts,
            other => IpProtocol::Unknown(other),
        }
    }
}

impl From<IpProtocol> for u8 {
    fn from(value: IpProtocol) -> Self {
        match value {
            IpProtocol::HopByHop => 0,
            IpProtocol::Icmp => 1,
            IpProtocol::Tcp => 6,
            IpProtocol::Udp => 17,
            IpProtocol::Ipv6Route => 43,
            IpProtocol::Ipv6Frag => 44,
            IpProtocol::Esp => 50,
            IpProtocol::Ah => 51,
            IpProtocol::Icmpv6 => 58,
            IpProtocol::Ipv6NoNxt => 59,
            IpProtocol::Ipv6Opts => 60,
            IpProtocol::Unknown(other) => other,
        }
    }
}

impl fmt::Display for IpProtocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            IpProtocol::Unknown(n) => write!(f, "protocol {n}"),
            known => write!(f, "{known:?}"),
        }
    }
}

// Big-endian field access shared by the views. Callers index only inside bounds their
// `check_len` established (or, for setters, documented buffer sizes).

fn get_u16(buf: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([buf[at], buf[at + 1]])
}

fn get_u32(buf: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([buf[at], buf[at + 1], buf[at + 2], buf[at + 3]])
}

fn put_u16(buf: &mut [u8], at: usize, value: u16) {
    buf[at..at + 2].copy_from_slice(&value.to_be_bytes());
}

fn put_u32(buf: &mut [u8], at: usize, value: u32) {
    buf[at..at + 4].copy_from_slice(&value.to_be_bytes());
}

/// Proptest settings for the wire tests. Failures are not persisted: the regressions file
/// would be written outside `src/`.
#[cfg(test)]
fn proptest_config(cases: u32) -> proptest::test_runner::Config {
    proptest::test_runner::Config {
        failure_persistence: None,
        ..proptest::test_runner::Config::with_cases(cases)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_ip_protocol_roundtrip() {
        for n in 0..=u8::MAX {
            assert_eq!(u8::from(IpProtocol::from(n)), n);
        }
        assert_eq!(IpProtocol::from(6), IpProtocol::Tcp);
        assert_eq!(IpProtocol::from(200), IpProtocol::Unknown(200));
    }

    #[test]
    fn test_ip_protocol_display() {
        assert_eq!(IpProtocol::Tcp.to_string(), "Tcp");
        assert_eq!(IpProtocol::Unknown(253).to_string(), "protocol 253");
    }

    #[test]
    fn test_error_display() {
        assert_eq!(Error::Truncated.to_string(), "truncated packet");
        assert_eq!(Error::Malformed.to_string(), "malformed packet");
    }
}
