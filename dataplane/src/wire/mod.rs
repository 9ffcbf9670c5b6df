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

/// Declares the module's `Packet<T>` view with the constructors every view shares.
///
/// The invoking module writes its own `check_len`: it alone knows which bounds make its
/// getters panic-free, and `new_checked` is the one door untrusted bytes pass through.
macro_rules! packet_view {
    ($(#[$attr:meta])*) => {
        $(#[$attr])*
        #[derive(Debug, Clone, PartialEq, Eq)]
        pub struct Packet<T: AsRef<[u8]>> {
            buffer: T,
        }

        impl<T: AsRef<[u8]>> Packet<T> {
            /// Wraps a buffer without validation; getters may panic until [`Self::check_len`]
            /// passes.
            pub const fn new_unchecked(buffer: T) -> Packet<T> {
                Packet { buffer }
            }

            /// Wraps untrusted bytes: [`Self::new_unchecked`] followed by [`Self::check_len`].
            pub fn new_checked(buffer: T) -> $crate::wire::Result<Packet<T>> {
                let packet = Self::new_unchecked(buffer);
                packet.check_len()?;
                Ok(packet)
            }

            /// Returns the wrapped buffer.
            pub fn into_inner(self) -> T {
                self.buffer
            }
        }
    };
}

/// Declares an ICMP view: ICMPv4 and ICMPv6 share one 8-byte header layout (type, code,
/// checksum, then echo identifier and sequence number; RFC 792, RFC 4443), so they share its
/// length check and accessors too. The invoking module defines `Message`, `HEADER_LEN` and
/// those `field` offsets, and adds its own MTU field and checksum rule.
macro_rules! icmp_view {
    ($(#[$attr:meta])*) => {
        packet_view! {
            $(#[$attr])*
        }

        impl<T: AsRef<[u8]>> Packet<T> {
            /// `Truncated` if the buffer is shorter than the 8-byte header.
            pub fn check_len(&self) -> $crate::wire::Result<()> {
                if self.buffer.as_ref().len() < HEADER_LEN {
                    return Err($crate::wire::Error::Truncated);
                }
                Ok(())
            }

            pub fn msg_type(&self) -> Message {
                Message::from(self.buffer.as_ref()[field::TYPE])
            }

            pub fn msg_code(&self) -> u8 {
                self.buffer.as_ref()[field::CODE]
            }

            pub fn checksum(&self) -> u16 {
                $crate::wire::get_u16(self.buffer.as_ref(), field::CHECKSUM)
            }

            pub fn echo_ident(&self) -> u16 {
                $crate::wire::get_u16(self.buffer.as_ref(), field::ECHO_IDENT)
            }

            pub fn echo_seq_no(&self) -> u16 {
                $crate::wire::get_u16(self.buffer.as_ref(), field::ECHO_SEQNO)
            }

            /// Everything after the 8-byte header: echo data, or the quoted packet of an error.
            pub fn data(&self) -> &[u8] {
                &self.buffer.as_ref()[HEADER_LEN..]
            }
        }

        impl<T: AsRef<[u8]> + AsMut<[u8]>> Packet<T> {
            pub fn set_msg_type(&mut self, value: Message) {
                self.buffer.as_mut()[field::TYPE] = value.into();
            }

            pub fn set_msg_code(&mut self, value: u8) {
                self.buffer.as_mut()[field::CODE] = value;
            }

            pub fn set_checksum(&mut self, value: u16) {
                $crate::wire::put_u16(self.buffer.as_mut(), field::CHECKSUM, value);
            }

            pub fn set_echo_ident(&mut self, value: u16) {
                $crate::wire::put_u16(self.buffer.as_mut(), field::ECHO_IDENT, value);
            }

            pub fn set_echo_seq_no(&mut self, value: u16) {
                $crate::wire::put_u16(self.buffer.as_mut(), field::ECHO_SEQNO, value);
            }

            pub fn data_mut(&mut self) -> &mut [u8] {
                &mut self.buffer.as_mut()[HEADER_LEN..]
            }
        }
    };
}

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

/// The views' shared truncation test: `check` (a view's `new_checked`) must refuse every
/// proper prefix of `bytes` as `Truncated`, whichever length field it trips on.
#[cfg(test)]
fn assert_prefixes_truncated(bytes: &[u8], check: impl Fn(&[u8]) -> Result<()>) {
    for len in 0..bytes.len() {
        assert_eq!(
            check(&bytes[..len]).err(),
            Some(Error::Truncated),
            "length {len}"
        );
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
