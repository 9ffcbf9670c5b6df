//! IPv4 header view (RFC 791).
//!
//! Once [`Packet::check_len`] has passed, no getter panics: every field read lies inside the
//! first `header_len()` bytes, and `header_len() <= total_len() <= buffer length` holds.
//! Bytes beyond `total_len()` (Ethernet padding) are ignored. Setters that change
//! `header_len` or `total_len` void that guarantee until `check_len` is called again.

use std::net::Ipv4Addr;

use super::{Error, IpProtocol, Result, checksum, get_u16, put_u16};

mod field {
    use core::ops::Range;

    pub(super) const VER_IHL: usize = 0;
    pub(super) const DSCP_ECN: usize = 1;
    pub(super) const LENGTH: usize = 2;
    pub(super) const IDENT: usize = 4;
    pub(super) const FLG_OFF: usize = 6;
    pub(super) const TTL: usize = 8;
    pub(super) const PROTOCOL: usize = 9;
    pub(super) const CHECKSUM: usize = 10;
    pub(super) const SRC_ADDR: Range<usize> = 12..16;
    pub(super) const DST_ADDR: Range<usize> = 16..20;
}

/// Length of a header without options.
pub const HEADER_LEN: usize = 20;

const FLAG_DF: u16 = 0x4000;
const FLAG_MF: u16 = 0x2000;
const OFFSET_MASK: u16 = 0x1fff;

packet_view! {
    /// A read/write view of an IPv4 packet.
}

impl<T: AsRef<[u8]>> Packet<T> {
    /// Validates the length and version fields against the buffer.
    ///
    /// `Truncated` if the buffer is shorter than 20 bytes, `header_len` or `total_len`;
    /// `Malformed` if the version is not 4, `header_len < 20` or `total_len < header_len`.
    pub fn check_len(&self) -> Result<()> {
        let len = self.buffer.as_ref().len();
        if len < HEADER_LEN {
            return Err(Error::Truncated);
        }
        if self.version() != 4 {
            return Err(Error::Malformed);
        }
        let header_len = usize::from(self.header_len());
        if header_len < HEADER_LEN {
            return Err(Error::Malformed);
        }
        if len < header_len {
            return Err(Error::Truncated);
        }
        let total_len = usize::from(self.total_len());
        if total_len < header_len {
            return Err(Error::Malformed);
        }
        if len < total_len {
            return Err(Error::Truncated);
        }
        Ok(())
    }

    pub fn version(&self) -> u8 {
        self.buffer.as_ref()[field::VER_IHL] >> 4
    }

    /// Header length in bytes (IHL × 4).
    pub fn header_len(&self) -> u8 {
        (self.buffer.as_ref()[field::VER_IHL] & 0x0f) * 4
    }

    pub fn dscp_ecn(&self) -> u8 {
        self.buffer.as_ref()[field::DSCP_ECN]
    }

    pub fn total_len(&self) -> u16 {
        get_u16(self.buffer.as_ref(), field::LENGTH)
    }

    pub fn ident(&self) -> u16 {
        get_u16(self.buffer.as_ref(), field::IDENT)
    }

    pub fn dont_frag(&self) -> bool {
        get_u16(self.buffer.as_ref(), field::FLG_OFF) & FLAG_DF != 0
    }

    pub fn more_frags(&self) -> bool {
        get_u16(self.buffer.as_ref(), field::FLG_OFF) & FLAG_MF != 0
    }

    /// Fragment offset in bytes (the field counts 8-byte units).
    pub fn frag_offset(&self) -> u16 {
        (get_u16(self.buffer.as_ref(), field::FLG_OFF) & OFFSET_MASK) * 8
    }

    /// True for any fragment, first or not: only an unfragmented packet carries a complete
    /// upper-layer header and payload.
    pub fn is_fragment(&self) -> bool {
        self.more_frags() || self.frag_offset() != 0
    }

    /// Time to live.
    pub fn hop_limit(&self) -> u8 {
        self.buffer.as_ref()[field::TTL]
    }

    pub fn next_header(&self) -> IpProtocol {
        IpProtocol::from(self.buffer.as_ref()[field::PROTOCOL])
    }

    pub fn checksum(&self) -> u16 {
        get_u16(self.buffer.as_ref(), field::CHECKSUM)
    }

    pub fn src_addr(&self) -> Ipv4Addr {
        let mut octets = [0; 4];
        octets.copy_from_slice(&self.buffer.as_ref()[field::SRC_ADDR]);
        Ipv4Addr::from(octets)
    }

    pub fn dst_addr(&self) -> Ipv4Addr {
        let mut octets = [0; 4];
        octets.copy_from_slice(&self.buffer.as_ref()[field::DST_ADDR]);
        Ipv4Addr::from(octets)
    }

    /// True if the header checksum (over `header_len()` bytes, options included) is valid.
    pub fn verify_checksum(&self) -> bool {
        let header = &self.buffer.as_ref()[..usize::from(self.header_len())];
        checksum::data(header) == 0xffff
    }

    pub fn has_options(&self) -> bool {
        usize::from(self.header_len()) > HEADER_LEN
    }

    /// Bytes `header_len()..total_len()`.
    pub fn payload(&self) -> &[u8] {
        let range = usize::from(self.header_len())..usize::from(self.total_len());
        &self.buffer.as_ref()[range]
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> Packet<T> {
    pub fn set_version(&mut self, value: u8) {
        let byte = &mut self.buffer.as_mut()[field::VER_IHL];
        *byte = (*byte & 0x0f) | (value << 4);
    }

    /// Sets the header length in bytes; it must be a multiple of 4 (lower bits are dropped).
    pub fn set_header_len(&mut self, value: u8) {
        let byte = &mut self.buffer.as_mut()[field::VER_IHL];
        *byte = (*byte & 0xf0) | ((value / 4) & 0x0f);
    }

    pub fn set_dscp_ecn(&mut self, value: u8) {
        self.buffer.as_mut()[field::DSCP_ECN] = value;
    }

    pub fn set_total_len(&mut self, value: u16) {
        put_u16(self.buffer.as_mut(), field::LENGTH, value);
    }

    pub fn set_ident(&mut self, value: u16) {
        put_u16(self.buffer.as_mut(), field::IDENT, value);
    }

    fn set_flag(&mut self, flag: u16, value: bool) {
        let raw = get_u16(self.buffer.as_ref(), field::FLG_OFF);
        let raw = if value { raw | flag } else { raw & !flag };
        put_u16(self.buffer.as_mut(), field::FLG_OFF, raw);
    }

    pub fn set_dont_frag(&mut self, value: bool) {
        self.set_flag(FLAG_DF, value);
    }

    pub fn set_more_frags(&mut self, value: bool) {
        self.set_flag(FLAG_MF, value);
    }

    /// Sets the fragment offset in bytes; it must be a multiple of 8 (lower bits are dropped).
    pub fn set_frag_offset(&mut self, value: u16) {
        let raw = get_u16(self.buffer.as_ref(), field::FLG_OFF);
        let raw = (raw & !OFFSET_MASK) | ((value / 8) & OFFSET_MASK);
        put_u16(self.buffer.as_mut(), field::FLG_OFF, raw);
    }

    pub fn set_hop_limit(&mut self, value: u8) {
        self.buffer.as_mut()[field::TTL] = value;
    }

    pub fn set_next_header(&mut self, value: IpProtocol) {
        self.buffer.as_mut()[field::PROTOCOL] = value.into();
    }

    pub fn set_checksum(&mut self, value: u16) {
        put_u16(self.buffer.as_mut(), field::CHECKSUM, value);
    }

    pub fn set_src_addr(&mut self, value: Ipv4Addr) {
        self.buffer.as_mut()[field::SRC_ADDR].copy_from_slice(&value.octets());
    }

    pub fn set_dst_addr(&mut self, value: Ipv4Addr) {
        self.buffer.as_mut()[field::DST_ADDR].copy_from_slice(&value.octets());
    }

    /// Recomputes the header checksum over `header_len()` bytes.
    pub fn fill_checksum(&mut self) {
        self.set_checksum(0);
        let header = &self.buffer.as_ref()[..usize::from(self.header_len())];
        let sum = checksum::data(header);
        self.set_checksum(!sum);
    }

    /// Bytes `header_len()..total_len()`.
    pub fn payload_mut(&mut self) -> &mut [u8] {
        let range = usize::from(self.header_len())..usize::from(self.total_len());
        &mut self.buffer.as_mut()[range]
    }
}

/// The fields of an IPv4 header the data plane builds packets from.
///
/// Parsing drops options, identification, DSCP/ECN and fragmentation fields; emitting writes
/// a 20-byte header with DF set, because the load balancer never fragments.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Repr {
    pub src_addr: Ipv4Addr,
    pub dst_addr: Ipv4Addr,
    pub next_header: IpProtocol,
    pub payload_len: usize,
    pub hop_limit: u8,
}

impl Repr {
    /// Parses a packet, rejecting a bad header checksum as `Malformed`.
    pub fn parse<T: AsRef<[u8]>>(packet: &Packet<T>) -> Result<Repr> {
        packet.check_len()?;
        if !packet.verify_checksum() {
            return Err(Error::Malformed);
        }
        Ok(Repr {
            src_addr: packet.src_addr(),
            dst_addr: packet.dst_addr(),
            next_header: packet.next_header(),
            payload_len: usize::from(packet.total_len()) - usize::from(packet.header_len()),
            hop_limit: packet.hop_limit(),
        })
    }

    /// Length of the emitted header (the payload is not included).
    pub const fn buffer_len(&self) -> usize {
        HEADER_LEN
    }

    /// Writes the header and its checksum; the payload area is left untouched.
    ///
    /// # Panics
    ///
    /// If the buffer is shorter than `buffer_len()` bytes. `payload_len` must be at most
    /// 65515 so that the total length fits 16 bits (checked in debug builds).
    pub fn emit<T: AsRef<[u8]> + AsMut<[u8]>>(&self, packet: &mut Packet<T>) {
        debug_assert!(self.payload_len <= usize::from(u16::MAX) - HEADER_LEN);
        packet.set_version(4);
        packet.set_header_len(HEADER_LEN as u8);
        packet.set_dscp_ecn(0);
        packet.set_total_len((HEADER_LEN + self.payload_len) as u16);
        packet.set_ident(0);
        put_u16(packet.buffer.as_mut(), field::FLG_OFF, FLAG_DF);
        packet.set_hop_limit(self.hop_limit);
        packet.set_next_header(self.next_header);
        packet.set_src_addr(self.src_addr);
        packet.set_dst_addr(self.dst_addr);
        packet.fill_checksum();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    // 10.0.0.1 -> 10.0.0.2, TCP, TTL 64, DF, total length 24, 4 payload bytes.
    static PACKET_BYTES: [u8; 24] = [
        0x45, 0x00, 0x00, 0x18, 0x12, 0x34, 0x40, 0x00, 0x40, 0x06, 0x14, 0xaa, 0x0a, 0x00, 0x00,
        0x01, 0x0a, 0x00, 0x00, 0x02, 0xaa, 0xbb, 0xcc, 0xdd,
    ];

    static PAYLOAD_BYTES: [u8; 4] = [0xaa, 0xbb, 0xcc, 0xdd];

    fn packet_repr() -> Repr {
        Repr {
            src_addr: Ipv4Addr::new(10, 0, 0, 1),
            dst_addr: Ipv4Addr::new(10, 0, 0, 2),
            next_header: IpProtocol::Tcp,
            payload_len: 4,
            hop_limit: 64,
        }
    }

    #[test]
    fn test_parse() {
        let packet = Packet::new_checked(&PACKET_BYTES[..]).unwrap();
        assert_eq!(packet.version(), 4);
        assert_eq!(packet.header_len(), 20);
        assert_eq!(packet.dscp_ecn(), 0);
        assert_eq!(packet.total_len(), 24);
        assert_eq!(packet.ident(), 0x1234);
        assert!(packet.dont_frag());
        assert!(!packet.more_frags());
        assert_eq!(packet.frag_offset(), 0);
        assert!(!packet.is_fragment());
        assert_eq!(packet.hop_limit(), 64);
        assert_eq!(packet.next_header(), IpProtocol::Tcp);
        assert_eq!(packet.checksum(), 0x14aa);
        assert_eq!(packet.src_addr(), Ipv4Addr::new(10, 0, 0, 1));
        assert_eq!(packet.dst_addr(), Ipv4Addr::new(10, 0, 0, 2));
        assert!(packet.verify_checksum());
        assert!(!packet.has_options());
        assert_eq!(packet.payload(), &PAYLOAD_BYTES[..]);
        assert_eq!(Repr::parse(&packet), Ok(packet_repr()));
        assert_eq!(packet.into_inner(), &PACKET_BYTES[..]);
    }

    #[test]
    fn test_emit() {
        let repr = packet_repr();
        let mut bytes = [0xffu8; 24];
        let mut packet = Packet::new_unchecked(&mut bytes[..]);
        repr.emit(&mut packet);
        packet.set_ident(0x1234);
        packet.fill_checksum();
        packet.payload_mut().copy_from_slice(&PAYLOAD_BYTES);
        assert_eq!(bytes, PACKET_BYTES);
        assert_eq!(repr.buffer_len(), 20);
    }

    #[test]
    fn test_setters_roundtrip() {
        let mut bytes = PACKET_BYTES;
        let mut packet = Packet::new_unchecked(&mut bytes[..]);
        packet.set_dont_frag(false);
        packet.set_more_frags(true);
        packet.set_frag_offset(1480);
        packet.set_dscp_ecn(0xb8);
        packet.set_src_addr(Ipv4Addr::new(192, 0, 2, 7));
        packet.set_dst_addr(Ipv4Addr::new(198, 51, 100, 9));
        packet.set_hop_limit(1);
        packet.set_next_header(IpProtocol::Udp);
        packet.fill_checksum();
        let packet = Packet::new_checked(&bytes[..]).unwrap();
        assert!(!packet.dont_frag());
        assert!(packet.more_frags());
        assert_eq!(packet.frag_offset(), 1480);
        assert_eq!(packet.dscp_ecn(), 0xb8);
        assert_eq!(packet.src_addr(), Ipv4Addr::new(192, 0, 2, 7));
        assert_eq!(packet.dst_addr(), Ipv4Addr::new(198, 51, 100, 9));
        assert_eq!(packet.hop_limit(), 1);
        assert_eq!(packet.next_header(), IpProtocol::Udp);
        assert!(packet.verify_checksum());
    }

    #[test]
    fn test_truncated_at_each_boundary() {
        super::super::assert_prefixes_truncated(&PACKET_BYTES, |b| {
            Packet::new_checked(b).map(drop)
        });
    }

    #[test]
    fn test_trailing_padding_ignored() {
        let mut bytes = [0u8; 30];
        bytes[..24].copy_from_slice(&PACKET_BYTES);
        let packet = Packet::new_checked(&bytes[..]).unwrap();
        assert_eq!(packet.payload(), &PAYLOAD_BYTES[..]);
    }

    #[test]
    fn test_bad_version() {
        let mut bytes = PACKET_BYTES;
        bytes[0] = 0x65;
        assert_eq!(
            Packet::new_checked(&bytes[..]).err(),
            Some(Error::Malformed)
        );
    }

    #[test]
    fn test_bad_ihl() {
        let mut bytes = PACKET_BYTES;
        bytes[0] = 0x44;
        assert_eq!(
            Packet::new_checked(&bytes[..]).err(),
            Some(Error::Malformed)
        );
        // IHL 7 = 28 bytes claims more header than the 24-byte buffer holds.
        bytes[0] = 0x47;
        assert_eq!(
            Packet::new_checked(&bytes[..]).err(),
            Some(Error::Truncated)
        );
    }

    #[test]
    fn test_bad_total_len() {
        let mut bytes = PACKET_BYTES;
        bytes[3] = 19;
        assert_eq!(
            Packet::new_checked(&bytes[..]).err(),
            Some(Error::Malformed)
        );
        bytes[3] = 25;
        assert_eq!(
            Packet::new_checked(&bytes[..]).err(),
            Some(Error::Truncated)
        );
    }

    #[test]
    fn test_bad_checksum() {
        let mut bytes = PACKET_BYTES;
        bytes[11] ^= 1;
        let packet = Packet::new_checked(&bytes[..]).unwrap();
        assert!(!packet.verify_checksum());
        assert_eq!(Repr::parse(&packet), Err(Error::Malformed));
    }

    #[test]
    fn test_options_detected() {
        // IHL 6: a 4-byte option (NOP NOP NOP EOL) and no payload.
        let mut bytes = [0u8; 24];
        bytes[..20].copy_from_slice(&PACKET_BYTES[..20]);
        bytes[0] = 0x46;
        bytes[20..24].copy_from_slice(&[1, 1, 1, 0]);
        let mut packet = Packet::new_unchecked(&mut bytes[..]);
        packet.fill_checksum();
        let packet = Packet::new_checked(&bytes[..]).unwrap();
        assert!(packet.has_options());
        assert_eq!(packet.header_len(), 24);
        assert!(packet.verify_checksum());
        assert_eq!(packet.payload(), &[] as &[u8]);
        assert_eq!(Repr::parse(&packet).map(|r| r.payload_len), Ok(0));
    }

    #[test]
    fn test_fragments_detected() {
        let mut bytes = PACKET_BYTES;
        // First fragment: MF set, offset 0.
        bytes[6] = 0x20;
        assert!(Packet::new_checked(&bytes[..]).unwrap().is_fragment());
        // Last fragment: MF clear, offset 185 × 8.
        bytes[6] = 0x00;
        bytes[7] = 185;
        let packet = Packet::new_checked(&bytes[..]).unwrap();
        assert!(packet.is_fragment());
        assert_eq!(packet.frag_offset(), 1480);
    }

    proptest! {
        #![proptest_config(super::super::proptest_config(10_000))]

        #[test]
        fn prop_getters_never_panic(
            bytes in proptest::collection::vec(any::<u8>(), 0..80),
            fix in any::<bool>(),
            total in any::<prop::sample::Index>(),
        ) {
            // Random bytes almost never pass the version and length checks; half the cases
            // get version 4 and a total length inside the buffer, keeping the random IHL.
            let mut bytes = bytes;
            if fix && bytes.len() >= HEADER_LEN {
                bytes[0] = 0x40 | (bytes[0] & 0x0f);
                let total = total.index(bytes.len() + 1) as u16;
                bytes[field::LENGTH..field::LENGTH + 2].copy_from_slice(&total.to_be_bytes());
            }
            if let Ok(packet) = Packet::new_checked(&bytes[..]) {
                let _ = (packet.version(), packet.header_len(), packet.dscp_ecn());
                let _ = (packet.total_len(), packet.ident(), packet.dont_frag());
                let _ = (packet.more_frags(), packet.frag_offset(), packet.is_fragment());
                let _ = (packet.hop_limit(), packet.next_header(), packet.checksum());
                let _ = (packet.src_addr(), packet.dst_addr(), packet.verify_checksum());
                let _ = (packet.has_options(), packet.payload(), Repr::parse(&packet));
                prop_assert!(packet.payload().len() <= bytes.len());
            }
        }
    }
}
