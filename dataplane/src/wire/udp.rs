//! UDP header view (RFC 768).
//!
//! Once [`Packet::check_len`] has passed, no getter panics: `8 <= len() <= buffer length`.
//! Bytes beyond `len()` are ignored. `set_len` voids that guarantee until `check_len` is
//! called again.
//!
//! The checksum helpers take the pseudo-header sum from [`super::checksum`], computed with
//! length = `len()`, so they serve IPv4 and IPv6 alike. A zero checksum field means "no
//! checksum" over IPv4 only; IPv6 forbids it (RFC 8200 §8.1). [`Packet::verify_checksum`]
//! does not special-case zero: the caller, which knows the family, applies that rule.

use super::{Error, Result, checksum, get_u16, put_u16};

mod field {
    pub(super) const SRC_PORT: usize = 0;
    pub(super) const DST_PORT: usize = 2;
    pub(super) const LENGTH: usize = 4;
    pub(super) const CHECKSUM: usize = 6;
}

/// Length of the UDP header.
pub const HEADER_LEN: usize = 8;

packet_view! {
    /// A read/write view of a UDP datagram.
}

impl<T: AsRef<[u8]>> Packet<T> {
    /// `Truncated` if the buffer is shorter than 8 bytes or the length field; `Malformed` if
    /// the length field is below 8.
    pub fn check_len(&self) -> Result<()> {
        let len = self.buffer.as_ref().len();
        if len < HEADER_LEN {
            return Err(Error::Truncated);
        }
        let field_len = usize::from(self.len());
        if field_len < HEADER_LEN {
            return Err(Error::Malformed);
        }
        if len < field_len {
            return Err(Error::Truncated);
        }
        Ok(())
    }

    pub fn src_port(&self) -> u16 {
        get_u16(self.buffer.as_ref(), field::SRC_PORT)
    }

    pub fn dst_port(&self) -> u16 {
        get_u16(self.buffer.as_ref(), field::DST_PORT)
    }

    /// The length field: header plus payload.
    #[allow(clippy::len_without_is_empty)] // a header field, not a container length
    pub fn len(&self) -> u16 {
        get_u16(self.buffer.as_ref(), field::LENGTH)
    }

    pub fn checksum(&self) -> u16 {
        get_u16(self.buffer.as_ref(), field::CHECKSUM)
    }

    /// Bytes `8..len()`.
    pub fn payload(&self) -> &[u8] {
        &self.buffer.as_ref()[HEADER_LEN..usize::from(self.len())]
    }

    /// True if the checksum over `0..len()` plus `pseudo` is valid. A zero field is checked
    /// like any other value (see the module documentation).
    pub fn verify_checksum(&self, pseudo: u16) -> bool {
        let datagram = &self.buffer.as_ref()[..usize::from(self.len())];
        checksum::combine(&[pseudo, checksum::data(datagram)]) == 0xffff
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> Packet<T> {
    pub fn set_src_port(&mut self, value: u16) {
        put_u16(self.buffer.as_mut(), field::SRC_PORT, value);
    }

    pub fn set_dst_port(&mut self, value: u16) {
        put_u16(self.buffer.as_mut(), field::DST_PORT, value);
    }

    pub fn set_len(&mut self, value: u16) {
        put_u16(self.buffer.as_mut(), field::LENGTH, value);
    }

    pub fn set_checksum(&mut self, value: u16) {
        put_u16(self.buffer.as_mut(), field::CHECKSUM, value);
    }

    /// Bytes `8..len()`.
    pub fn payload_mut(&mut self) -> &mut [u8] {
        let end = usize::from(self.len());
        &mut self.buffer.as_mut()[HEADER_LEN..end]
    }

    /// Computes the checksum over `0..len()` plus `pseudo`. A computed zero is written as
    /// `0xFFFF`, since zero on the wire would mean "no checksum".
    pub fn fill_checksum(&mut self, pseudo: u16) {
        self.set_checksum(0);
        let datagram = &self.buffer.as_ref()[..usize::from(self.len())];
        let check = !checksum::combine(&[pseudo, checksum::data(datagram)]);
        self.set_checksum(if check == 0 { 0xffff } else { check });
    }
}

/// A UDP datagram's ports and payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Repr<'a> {
    pub src_port: u16,
    pub dst_port: u16,
    pub payload: &'a [u8],
}

impl<'a> Repr<'a> {
    /// Parses a datagram, rejecting a bad checksum as `Malformed`.
    ///
    /// A zero checksum field is accepted unverified, as IPv4 requires; IPv6 callers must
    /// reject `packet.checksum() == 0` themselves.
    pub fn parse<T: AsRef<[u8]> + ?Sized>(packet: &Packet<&'a T>, pseudo: u16) -> Result<Repr<'a>> {
        packet.check_len()?;
        if packet.checksum() != 0 && !packet.verify_checksum(pseudo) {
            return Err(Error::Malformed);
        }
        let payload = &packet.buffer.as_ref()[HEADER_LEN..usize::from(packet.len())];
        Ok(Repr {
            src_port: packet.src_port(),
            dst_port: packet.dst_port(),
            payload,
        })
    }

    /// Header plus payload length.
    pub const fn buffer_len(&self) -> usize {
        HEADER_LEN + self.payload.len()
    }

    /// Writes the header, payload and checksum (`pseudo` computed with length
    /// `buffer_len()`).
    ///
    /// # Panics
    ///
    /// If the buffer is shorter than `buffer_len()`. The payload must be at most 65527
    /// bytes (checked in debug builds).
    pub fn emit<T: AsRef<[u8]> + AsMut<[u8]>>(&self, packet: &mut Packet<T>, pseudo: u16) {
        debug_assert!(self.buffer_len() <= usize::from(u16::MAX));
        packet.set_src_port(self.src_port);
        packet.set_dst_port(self.dst_port);
        packet.set_len(self.buffer_len() as u16);
        packet.payload_mut().copy_from_slice(self.payload);
        packet.fill_checksum(pseudo);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::IpProtocol;
    use proptest::prelude::*;
    use std::net::Ipv4Addr;

    const SRC: Ipv4Addr = Ipv4Addr::new(192, 168, 1, 1);
    const DST: Ipv4Addr = Ipv4Addr::new(192, 168, 1, 2);

    // 53 -> 49152, 4 payload bytes, checksum over the pseudo-header for SRC -> DST.
    static PACKET_BYTES: [u8; 12] = [
        0x00, 0x35, 0xc0, 0x00, 0x00, 0x0c, 0x11, 0x4d, 0xaa, 0x00, 0x00, 0xff,
    ];

    static PAYLOAD_BYTES: [u8; 4] = [0xaa, 0x00, 0x00, 0xff];

    fn pseudo(len: usize) -> u16 {
        checksum::pseudo_header_v4(&SRC, &DST, IpProtocol::Udp, len as u32)
    }

    #[test]
    fn test_parse() {
        let packet = Packet::new_checked(&PACKET_BYTES[..]).unwrap();
        assert_eq!(packet.src_port(), 53);
        assert_eq!(packet.dst_port(), 49152);
        assert_eq!(packet.len(), 12);
        assert_eq!(packet.checksum(), 0x114d);
        assert_eq!(packet.payload(), &PAYLOAD_BYTES[..]);
        assert!(packet.verify_checksum(pseudo(12)));
        let repr = Repr::parse(&packet, pseudo(12)).unwrap();
        assert_eq!(
            repr,
            Repr {
                src_port: 53,
                dst_port: 49152,
                payload: &PAYLOAD_BYTES
            }
        );
    }

    #[test]
    fn test_emit() {
        let repr = Repr {
            src_port: 53,
            dst_port: 49152,
            payload: &PAYLOAD_BYTES,
        };
        assert_eq!(repr.buffer_len(), 12);
        let mut bytes = [0u8; 12];
        repr.emit(&mut Packet::new_unchecked(&mut bytes[..]), pseudo(12));
        assert_eq!(bytes, PACKET_BYTES);
    }

    #[test]
    fn test_truncated_at_each_boundary() {
        super::super::assert_prefixes_truncated(&PACKET_BYTES, |b| {
            Packet::new_checked(b).map(drop)
        });
    }

    #[test]
    fn test_bad_len() {
        let mut bytes = PACKET_BYTES;
        bytes[5] = 7;
        assert_eq!(
            Packet::new_checked(&bytes[..]).err(),
            Some(Error::Malformed)
        );
    }

    #[test]
    fn test_trailing_bytes_ignored() {
        let mut bytes = [0u8; 16];
        bytes[..12].copy_from_slice(&PACKET_BYTES);
        let packet = Packet::new_checked(&bytes[..]).unwrap();
        assert_eq!(packet.payload(), &PAYLOAD_BYTES[..]);
        assert!(packet.verify_checksum(pseudo(12)));
    }

    #[test]
    fn test_bad_checksum() {
        let mut bytes = PACKET_BYTES;
        bytes[7] ^= 1;
        let packet = Packet::new_checked(&bytes[..]).unwrap();
        assert!(!packet.verify_checksum(pseudo(12)));
        assert_eq!(Repr::parse(&packet, pseudo(12)), Err(Error::Malformed));
    }

    #[test]
    fn test_zero_checksum() {
        let mut bytes = PACKET_BYTES;
        bytes[6..8].fill(0);
        let packet = Packet::new_checked(&bytes[..]).unwrap();
        assert!(!packet.verify_checksum(pseudo(12)));
        assert!(Repr::parse(&packet, pseudo(12)).is_ok());
    }

    #[test]
    fn test_computed_zero_sent_as_ffff() {
        // Pick the payload word that makes the sum -0, so the checksum computes to 0.
        let mut bytes = PACKET_BYTES;
        bytes[8..10].fill(0);
        bytes[6..8].fill(0);
        let sum = checksum::combine(&[pseudo(12), checksum::data(&bytes)]);
        bytes[8..10].copy_from_slice(&(!sum).to_be_bytes());
        let mut packet = Packet::new_unchecked(&mut bytes[..]);
        packet.fill_checksum(pseudo(12));
        assert_eq!(packet.checksum(), 0xffff);
        assert!(packet.verify_checksum(pseudo(12)));
    }

    proptest! {
        #![proptest_config(super::super::proptest_config(10_000))]

        #[test]
        fn prop_getters_never_panic(
            bytes in proptest::collection::vec(any::<u8>(), 0..40),
            pseudo in any::<u16>(),
            fix in any::<bool>(),
            len in any::<prop::sample::Index>(),
        ) {
            // Half the cases get a length field near the buffer length, so that they pass
            // `check_len` (or fail it narrowly) instead of almost always being truncated.
            let mut bytes = bytes;
            if fix && bytes.len() >= HEADER_LEN {
                let len = len.index(bytes.len() + 2) as u16;
                bytes[field::LENGTH..field::LENGTH + 2].copy_from_slice(&len.to_be_bytes());
            }
            if let Ok(packet) = Packet::new_checked(&bytes[..]) {
                let _ = (packet.src_port(), packet.dst_port(), packet.len(), packet.checksum());
                let _ = (packet.payload(), packet.verify_checksum(pseudo));
                let _ = Repr::parse(&packet, pseudo);
            }
        }
    }
}
