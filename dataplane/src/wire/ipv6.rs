//! IPv6 header view (RFC 8200) and extension-header walk.
//!
//! Once [`Packet::check_len`] has passed, no getter panics: the fixed header is present and
//! `40 + payload_len() <= buffer length`. Bytes beyond the payload are ignored.
//! [`Packet::upper_layer`] bounds-checks every extension header it visits and returns an
//! error instead of panicking. `set_payload_len` voids the guarantee until `check_len` is
//! called again. Jumbograms (RFC 2675) are not supported: a zero payload length is an empty
//! payload.

use std::net::Ipv6Addr;

use super::{Error, IpProtocol, Result, get_u16, get_u32, put_u16, put_u32};

mod field {
    use core::ops::Range;

    pub(super) const VER_TC_FLOW: usize = 0;
    pub(super) const LENGTH: usize = 4;
    pub(super) const NXT_HDR: usize = 6;
    pub(super) const HOP_LIMIT: usize = 7;
    pub(super) const SRC_ADDR: Range<usize> = 8..24;
    pub(super) const DST_ADDR: Range<usize> = 24..40;

    // Within an extension header.
    pub(super) const EXT_NXT_HDR: usize = 0;
    pub(super) const EXT_LEN: usize = 1;
    pub(super) const FRAG_OFF_FLAGS: usize = 2;
    pub(super) const FRAG_IDENT: usize = 4;
}

/// Length of the fixed IPv6 header.
pub const HEADER_LEN: usize = 40;

/// Extension headers walked before giving up: bounds the work an attacker can cause per
/// packet. Legitimate packets carry two or three.
pub const MAX_EXT_HEADERS: usize = 8;

const FRAG_HEADER_LEN: usize = 8;
const FRAG_OFFSET_MASK: u16 = 0xfff8;
const FRAG_MORE: u16 = 0x0001;

/// Where the upper-layer protocol starts, as found by [`Packet::upper_layer`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UpperLayer {
    /// The protocol after the last extension header walked.
    pub protocol: IpProtocol,
    /// Byte offset of the upper-layer header from the start of the IPv6 header. For a
    /// non-first fragment this is where the fragment's data starts, which holds no header.
    pub offset: usize,
    /// Present if a Fragment header was seen.
    pub fragment: Option<FragmentInfo>,
}

/// The Fragment header's fields.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FragmentInfo {
    /// Offset of this fragment's data in the original payload, in bytes.
    pub offset: u16,
    /// More fragments follow.
    pub more: bool,
    pub ident: u32,
}

packet_view! {
    /// A read/write view of an IPv6 packet.
}

impl<T: AsRef<[u8]>> Packet<T> {
    /// `Truncated` if the buffer is shorter than 40 bytes or than `40 + payload_len`;
    /// `Malformed` if the version is not 6.
    pub fn check_len(&self) -> Result<()> {
        let len = self.buffer.as_ref().len();
        if len < HEADER_LEN {
            return Err(Error::Truncated);
        }
        if self.version() != 6 {
            return Err(Error::Malformed);
        }
        if len < HEADER_LEN + usize::from(self.payload_len()) {
            return Err(Error::Truncated);
        }
        Ok(())
    }

    pub fn version(&self) -> u8 {
        self.buffer.as_ref()[field::VER_TC_FLOW] >> 4
    }

    pub fn traffic_class(&self) -> u8 {
        ((get_u16(self.buffer.as_ref(), field::VER_TC_FLOW) >> 4) & 0xff) as u8
    }

    pub fn flow_label(&self) -> u32 {
        get_u32(self.buffer.as_ref(), field::VER_TC_FLOW) & 0x000f_ffff
    }

    /// Length of everything after the fixed header, extension headers included.
    pub fn payload_len(&self) -> u16 {
        get_u16(self.buffer.as_ref(), field::LENGTH)
    }

    pub fn next_header(&self) -> IpProtocol {
        IpProtocol::from(self.buffer.as_ref()[field::NXT_HDR])
    }

    pub fn hop_limit(&self) -> u8 {
        self.buffer.as_ref()[field::HOP_LIMIT]
    }

    pub fn src_addr(&self) -> Ipv6Addr {
        let mut octets = [0; 16];
        octets.copy_from_slice(&self.buffer.as_ref()[field::SRC_ADDR]);
        Ipv6Addr::from(octets)
    }

    pub fn dst_addr(&self) -> Ipv6Addr {
        let mut octets = [0; 16];
        octets.copy_from_slice(&self.buffer.as_ref()[field::DST_ADDR]);
        Ipv6Addr::from(octets)
    }

    /// Bytes `40..40 + payload_len()`, extension headers included.
    pub fn payload(&self) -> &[u8] {
        &self.buffer.as_ref()[HEADER_LEN..HEADER_LEN + usize::from(self.payload_len())]
    }

    /// Walks the extension headers to the upper-layer protocol.
    ///
    /// Hop-by-Hop (first only, as RFC 8200 §4.1 requires), Routing, Destination Options and
    /// AH are skipped. A Fragment header is recorded; the walk goes on past it only for the
    /// first fragment (offset 0), since later fragments carry no upper-layer header. The
    /// walk stops at any other protocol, including ESP, No Next Header and unknown ones.
    ///
    /// `Truncated` if a header runs past the payload; `Malformed` beyond
    /// [`MAX_EXT_HEADERS`] headers, for a misplaced Hop-by-Hop header or a second Fragment
    /// header.
    pub fn upper_layer(&self) -> Result<UpperLayer> {
        let payload = self.payload();
        let mut protocol = self.next_header();
        let mut offset = 0;
        let mut fragment = None;
        let mut walked = 0;
        loop {
            let is_extension = matches!(
                protocol,
                IpProtocol::HopByHop
                    | IpProtocol::Ipv6Route
                    | IpProtocol::Ipv6Opts
                    | IpProtocol::Ah
                    | IpProtocol::Ipv6Frag
            );
            if !is_extension {
                return Ok(UpperLayer {
                    protocol,
                    offset: HEADER_LEN + offset,
                    fragment,
                });
            }
            if walked == MAX_EXT_HEADERS {
                return Err(Error::Malformed);
            }
            let ext_len = || {
                payload
                    .get(offset + field::EXT_LEN)
                    .map(|&l| usize::from(l))
            };
            let header_len = match protocol {
                IpProtocol::HopByHop if walked > 0 => return Err(Error::Malformed),
                IpProtocol::Ipv6Frag if fragment.is_some() => return Err(Error::Malformed),
                IpProtocol::Ipv6Frag => FRAG_HEADER_LEN,
                IpProtocol::Ah => (ext_len().ok_or(Error::Truncated)? + 2) * 4,
                _ => (ext_len().ok_or(Error::Truncated)? + 1) * 8,
            };
            // Every header is at least 8 bytes, so the fixed fields read below are in bounds.
            let header = payload
                .get(offset..offset + header_len)
                .ok_or(Error::Truncated)?;
            let this = protocol;
            protocol = IpProtocol::from(header[field::EXT_NXT_HDR]);
            offset += header_len;
            walked += 1;
            if this == IpProtocol::Ipv6Frag {
                let off_flags = get_u16(header, field::FRAG_OFF_FLAGS);
                let info = FragmentInfo {
                    offset: off_flags & FRAG_OFFSET_MASK,
                    more: off_flags & FRAG_MORE != 0,
                    ident: get_u32(header, field::FRAG_IDENT),
                };
                fragment = Some(info);
                if info.offset != 0 {
                    return Ok(UpperLayer {
                        protocol,
                        offset: HEADER_LEN + offset,
                        fragment,
                    });
                }
            }
        }
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> Packet<T> {
    pub fn set_version(&mut self, value: u8) {
        let byte = &mut self.buffer.as_mut()[field::VER_TC_FLOW];
        *byte = (*byte & 0x0f) | (value << 4);
    }

    pub fn set_traffic_class(&mut self, value: u8) {
        let raw = get_u16(self.buffer.as_ref(), field::VER_TC_FLOW);
        let raw = (raw & 0xf00f) | (u16::from(value) << 4);
        put_u16(self.buffer.as_mut(), field::VER_TC_FLOW, raw);
    }

    /// Sets the 20-bit flow label; higher bits of `value` are dropped.
    pub fn set_flow_label(&mut self, value: u32) {
        let raw = get_u32(self.buffer.as_ref(), field::VER_TC_FLOW);
        let raw = (raw & 0xfff0_0000) | (value & 0x000f_ffff);
        put_u32(self.buffer.as_mut(), field::VER_TC_FLOW, raw);
    }

    pub fn set_payload_len(&mut self, value: u16) {
        put_u16(self.buffer.as_mut(), field::LENGTH, value);
    }

    pub fn set_next_header(&mut self, value: IpProtocol) {
        self.buffer.as_mut()[field::NXT_HDR] = value.into();
    }

    pub fn set_hop_limit(&mut self, value: u8) {
        self.buffer.as_mut()[field::HOP_LIMIT] = value;
    }

    pub fn set_src_addr(&mut self, value: Ipv6Addr) {
        self.buffer.as_mut()[field::SRC_ADDR].copy_from_slice(&value.octets());
    }

    pub fn set_dst_addr(&mut self, value: Ipv6Addr) {
        self.buffer.as_mut()[field::DST_ADDR].copy_from_slice(&value.octets());
    }

    /// Bytes `40..40 + payload_len()`.
    pub fn payload_mut(&mut self) -> &mut [u8] {
        let end = HEADER_LEN + usize::from(self.payload_len());
        &mut self.buffer.as_mut()[HEADER_LEN..end]
    }
}

/// The fields of an IPv6 header the data plane builds packets from.
///
/// Parsing drops traffic class and flow label; emitting writes them as zero.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Repr {
    pub src_addr: Ipv6Addr,
    pub dst_addr: Ipv6Addr,
    /// The fixed header's next header, which may name an extension header.
    pub next_header: IpProtocol,
    pub payload_len: usize,
    pub hop_limit: u8,
}

impl Repr {
    pub fn parse<T: AsRef<[u8]>>(packet: &Packet<T>) -> Result<Repr> {
        packet.check_len()?;
        Ok(Repr {
            src_addr: packet.src_addr(),
            dst_addr: packet.dst_addr(),
            next_header: packet.next_header(),
            payload_len: usize::from(packet.payload_len()),
            hop_limit: packet.hop_limit(),
        })
    }

    /// Length of the emitted header (the payload is not included).
    pub const fn buffer_len(&self) -> usize {
        HEADER_LEN
    }

    /// Writes the fixed header; the payload area is left untouched.
    ///
    /// # Panics
    ///
    /// If the buffer is shorter than `buffer_len()`. `payload_len` must fit 16 bits
    /// (checked in debug builds).
    pub fn emit<T: AsRef<[u8]> + AsMut<[u8]>>(&self, packet: &mut Packet<T>) {
        debug_assert!(self.payload_len <= usize::from(u16::MAX));
        put_u32(packet.buffer.as_mut(), field::VER_TC_FLOW, 0x6000_0000);
        packet.set_payload_len(self.payload_len as u16);
        packet.set_next_header(self.next_header);
        packet.set_hop_limit(self.hop_limit);
        packet.set_src_addr(self.src_addr);
        packet.set_dst_addr(self.dst_addr);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const SRC: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1);
    const DST: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 2);

    // Traffic class 0xb8, flow label 0x12345, UDP, hop limit 64, 4 payload bytes.
    static PACKET_BYTES: [u8; 44] = [
        0x6b, 0x81, 0x23, 0x45, 0x00, 0x04, 0x11, 0x40, //
        0x20, 0x01, 0x0d, 0xb8, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
        0x01, //
        0x20, 0x01, 0x0d, 0xb8, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
        0x02, //
        0xaa, 0xbb, 0xcc, 0xdd,
    ];

    fn packet_repr() -> Repr {
        Repr {
            src_addr: SRC,
            dst_addr: DST,
            next_header: IpProtocol::Udp,
            payload_len: 4,
            hop_limit: 64,
        }
    }

    /// A packet whose payload is `extensions` followed by `tail`.
    fn with_extensions(next_header: IpProtocol, extensions: &[u8], tail: &[u8]) -> Vec<u8> {
        let payload_len = extensions.len() + tail.len();
        let mut bytes = vec![0u8; HEADER_LEN + payload_len];
        let repr = Repr {
            next_header,
            payload_len,
            ..packet_repr()
        };
        repr.emit(&mut Packet::new_unchecked(&mut bytes[..]));
        bytes[HEADER_LEN..HEADER_LEN + extensions.len()].copy_from_slice(extensions);
        bytes[HEADER_LEN + extensions.len()..].copy_from_slice(tail);
        bytes
    }

    #[test]
    fn test_parse() {
        let packet = Packet::new_checked(&PACKET_BYTES[..]).unwrap();
        assert_eq!(packet.version(), 6);
        assert_eq!(packet.traffic_class(), 0xb8);
        assert_eq!(packet.flow_label(), 0x12345);
        assert_eq!(packet.payload_len(), 4);
        assert_eq!(packet.next_header(), IpProtocol::Udp);
        assert_eq!(packet.hop_limit(), 64);
        assert_eq!(packet.src_addr(), SRC);
        assert_eq!(packet.dst_addr(), DST);
        assert_eq!(packet.payload(), &[0xaa, 0xbb, 0xcc, 0xdd]);
        assert_eq!(
            packet.upper_layer(),
            Ok(UpperLayer {
                protocol: IpProtocol::Udp,
                offset: 40,
                fragment: None
            })
        );
        assert_eq!(Repr::parse(&packet), Ok(packet_repr()));
        assert_eq!(packet.into_inner(), &PACKET_BYTES[..]);
    }

    #[test]
    fn test_emit() {
        let mut bytes = [0xffu8; 44];
        let mut packet = Packet::new_unchecked(&mut bytes[..]);
        packet_repr().emit(&mut packet);
        packet.set_traffic_class(0xb8);
        packet.set_flow_label(0x12345);
        packet
            .payload_mut()
            .copy_from_slice(&[0xaa, 0xbb, 0xcc, 0xdd]);
        assert_eq!(bytes, PACKET_BYTES);
        assert_eq!(packet_repr().buffer_len(), 40);
    }

    #[test]
    fn test_setters() {
        let mut bytes = PACKET_BYTES;
        let mut packet = Packet::new_unchecked(&mut bytes[..]);
        packet.set_src_addr(DST);
        packet.set_dst_addr(SRC);
        packet.set_hop_limit(1);
        packet.set_next_header(IpProtocol::Tcp);
        packet.set_flow_label(0xfff_ffff);
        packet.set_payload_len(2);
        let packet = Packet::new_checked(&bytes[..]).unwrap();
        assert_eq!((packet.src_addr(), packet.dst_addr()), (DST, SRC));
        assert_eq!(packet.hop_limit(), 1);
        assert_eq!(packet.next_header(), IpProtocol::Tcp);
        assert_eq!(packet.traffic_class(), 0xb8);
        assert_eq!(packet.flow_label(), 0xf_ffff);
        assert_eq!(packet.payload(), &[0xaa, 0xbb]);
    }

    #[test]
    fn test_truncated_at_each_boundary() {
        super::super::assert_prefixes_truncated(&PACKET_BYTES, |b| {
            Packet::new_checked(b).map(drop)
        });
    }

    #[test]
    fn test_bad_version() {
        let mut bytes = PACKET_BYTES;
        bytes[0] = 0x4b;
        assert_eq!(
            Packet::new_checked(&bytes[..]).err(),
            Some(Error::Malformed)
        );
    }

    #[test]
    fn test_hop_by_hop_and_dest_opts_before_tcp() {
        let extensions = [
            // Hop-by-Hop, next = Destination Options, 8 bytes: PadN.
            60, 0, 1, 4, 0, 0, 0, 0, //
            // Destination Options, next = TCP, 16 bytes: PadN.
            6, 1, 1, 12, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
        ];
        let bytes = with_extensions(IpProtocol::HopByHop, &extensions, &[0; 20]);
        let packet = Packet::new_checked(&bytes[..]).unwrap();
        assert_eq!(
            packet.upper_layer(),
            Ok(UpperLayer {
                protocol: IpProtocol::Tcp,
                offset: 64,
                fragment: None
            })
        );
    }

    #[test]
    fn test_routing_and_ah() {
        let extensions = [
            // Routing, next = AH, 8 bytes.
            51, 0, 4, 0, 0, 0, 0, 0, //
            // AH, next = UDP, (1 + 2) × 4 = 12 bytes.
            17, 1, 0, 0, 0, 0, 0, 1, 0, 0, 0, 7,
        ];
        let bytes = with_extensions(IpProtocol::Ipv6Route, &extensions, &[0; 8]);
        let packet = Packet::new_checked(&bytes[..]).unwrap();
        assert_eq!(
            packet.upper_layer(),
            Ok(UpperLayer {
                protocol: IpProtocol::Udp,
                offset: 60,
                fragment: None
            })
        );
    }

    #[test]
    fn test_first_fragment() {
        // Fragment, next = UDP, offset 0, M set, ident 0xdeadbeef.
        let extensions = [17, 0, 0x00, 0x01, 0xde, 0xad, 0xbe, 0xef];
        let bytes = with_extensions(IpProtocol::Ipv6Frag, &extensions, &[0; 8]);
        let packet = Packet::new_checked(&bytes[..]).unwrap();
        let fragment = FragmentInfo {
            offset: 0,
            more: true,
            ident: 0xdead_beef,
        };
        assert_eq!(
            packet.upper_layer(),
            Ok(UpperLayer {
                protocol: IpProtocol::Udp,
                offset: 48,
                fragment: Some(fragment)
            })
        );
    }

    #[test]
    fn test_non_first_fragment() {
        // Fragment, next = TCP, offset 1448, M clear; then fragment data, not a TCP header.
        let extensions = [6, 0, 0x05, 0xa8, 0, 0, 0, 9];
        let bytes = with_extensions(IpProtocol::Ipv6Frag, &extensions, &[0xee; 4]);
        let packet = Packet::new_checked(&bytes[..]).unwrap();
        let fragment = FragmentInfo {
            offset: 1448,
            more: false,
            ident: 9,
        };
        assert_eq!(
            packet.upper_layer(),
            Ok(UpperLayer {
                protocol: IpProtocol::Tcp,
                offset: 48,
                fragment: Some(fragment)
            })
        );
    }

    #[test]
    fn test_non_first_fragment_stops_before_extension() {
        // The fragment's next header names Destination Options, but its bytes are not here.
        let extensions = [60, 0, 0x00, 0x09, 0, 0, 0, 1];
        let bytes = with_extensions(IpProtocol::Ipv6Frag, &extensions, &[]);
        let packet = Packet::new_checked(&bytes[..]).unwrap();
        let layer = packet.upper_layer().unwrap();
        assert_eq!(layer.protocol, IpProtocol::Ipv6Opts);
        assert_eq!(layer.offset, 48);
    }

    #[test]
    fn test_eight_extension_headers_allowed() {
        let mut extensions = Vec::new();
        for i in 0..8 {
            let next = if i == 7 { 6 } else { 60 };
            extensions.extend_from_slice(&[next, 0, 1, 4, 0, 0, 0, 0]);
        }
        let bytes = with_extensions(IpProtocol::Ipv6Opts, &extensions, &[]);
        let packet = Packet::new_checked(&bytes[..]).unwrap();
        assert_eq!(packet.upper_layer().map(|l| l.offset), Ok(40 + 64));
    }

    #[test]
    fn test_too_many_extension_headers() {
        let extensions: Vec<u8> = (0..9).flat_map(|_| [60, 0, 1, 4, 0, 0, 0, 0]).collect();
        let bytes = with_extensions(IpProtocol::Ipv6Opts, &extensions, &[0; 20]);
        let packet = Packet::new_checked(&bytes[..]).unwrap();
        assert_eq!(packet.upper_layer(), Err(Error::Malformed));
    }

    #[test]
    fn test_extension_header_truncated() {
        // Destination Options claims 16 bytes; only 8 remain in the payload.
        let bytes = with_extensions(IpProtocol::Ipv6Opts, &[6, 1, 1, 4, 0, 0, 0, 0], &[]);
        let packet = Packet::new_checked(&bytes[..]).unwrap();
        assert_eq!(packet.upper_layer(), Err(Error::Truncated));
        // The length byte itself is missing.
        let bytes = with_extensions(IpProtocol::Ipv6Opts, &[6], &[]);
        let packet = Packet::new_checked(&bytes[..]).unwrap();
        assert_eq!(packet.upper_layer(), Err(Error::Truncated));
        // A fragment header shorter than 8 bytes.
        let bytes = with_extensions(IpProtocol::Ipv6Frag, &[6, 0, 0, 0], &[]);
        let packet = Packet::new_checked(&bytes[..]).unwrap();
        assert_eq!(packet.upper_layer(), Err(Error::Truncated));
    }

    #[test]
    fn test_misplaced_hop_by_hop() {
        let extensions = [0, 0, 1, 4, 0, 0, 0, 0, 6, 0, 1, 4, 0, 0, 0, 0];
        let bytes = with_extensions(IpProtocol::Ipv6Opts, &extensions, &[]);
        let packet = Packet::new_checked(&bytes[..]).unwrap();
        assert_eq!(packet.upper_layer(), Err(Error::Malformed));
    }

    #[test]
    fn test_second_fragment_header() {
        let extensions = [44, 0, 0, 1, 0, 0, 0, 1, 6, 0, 0, 1, 0, 0, 0, 1];
        let bytes = with_extensions(IpProtocol::Ipv6Frag, &extensions, &[]);
        let packet = Packet::new_checked(&bytes[..]).unwrap();
        assert_eq!(packet.upper_layer(), Err(Error::Malformed));
    }

    #[test]
    fn test_walk_stops_at_esp_and_no_next_header() {
        for protocol in [
            IpProtocol::Esp,
            IpProtocol::Ipv6NoNxt,
            IpProtocol::Unknown(253),
        ] {
            let bytes = with_extensions(protocol, &[], &[0; 8]);
            let packet = Packet::new_checked(&bytes[..]).unwrap();
            assert_eq!(
                packet.upper_layer().map(|l| (l.protocol, l.offset)),
                Ok((protocol, 40))
            );
        }
    }

    /// Raw bytes with, half the time, a valid fixed header whose payload starts with an
    /// extension header, so that the walk is exercised and not only the version check.
    fn ipv6ish() -> impl Strategy<Value = Vec<u8>> {
        (
            proptest::collection::vec(any::<u8>(), 0..160),
            any::<bool>(),
            prop::sample::select(vec![0u8, 43, 44, 51, 60, 6, 17, 58, 59]),
        )
            .prop_map(|(mut bytes, fix, next)| {
                if fix && bytes.len() >= HEADER_LEN {
                    bytes[0] = 0x60 | (bytes[0] & 0x0f);
                    let payload_len = (bytes.len() - HEADER_LEN) as u16;
                    bytes[4..6].copy_from_slice(&payload_len.to_be_bytes());
                    bytes[6] = next;
                    // Keep extension lengths small so chains of several headers fit.
                    for chunk in bytes[HEADER_LEN..].chunks_mut(8) {
                        if let Some(len) = chunk.get_mut(1) {
                            *len &= 0x01;
                        }
                        if let Some(next) = chunk.first_mut() {
                            *next = [0, 43, 44, 51, 60, 6][usize::from(*next % 6)];
                        }
                    }
                }
                bytes
            })
    }

    proptest! {
        #![proptest_config(super::super::proptest_config(20_000))]

        #[test]
        fn prop_getters_never_panic(bytes in ipv6ish()) {
            if let Ok(packet) = Packet::new_checked(&bytes[..]) {
                let _ = (packet.version(), packet.traffic_class(), packet.flow_label());
                let _ = (packet.payload_len(), packet.next_header(), packet.hop_limit());
                let _ = (packet.src_addr(), packet.dst_addr(), packet.payload());
                let _ = Repr::parse(&packet);
                if let Ok(layer) = packet.upper_layer() {
                    prop_assert!(layer.offset <= HEADER_LEN + packet.payload().len());
                }
            }
        }
    }
}
