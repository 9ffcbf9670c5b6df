//! ICMPv6 message view (RFC 4443).
//!
//! Once [`Packet::check_len`] has passed (the buffer holds the 8-byte header), no getter
//! panics. The buffer is the whole message. Unlike ICMPv4, the checksum also covers the IPv6
//! pseudo-header: pass its sum from [`super::checksum::pseudo_header_v6`], computed with
//! protocol `Icmpv6` and length = the message length.

use super::{checksum, get_u32, put_u32};

mod field {
    pub(super) const TYPE: usize = 0;
    pub(super) const CODE: usize = 1;
    pub(super) const CHECKSUM: usize = 2;
    pub(super) const MTU: usize = 4;
    pub(super) const ECHO_IDENT: usize = 4;
    pub(super) const ECHO_SEQNO: usize = 6;
}

/// Length of the fixed ICMPv6 header.
pub const HEADER_LEN: usize = 8;

/// ICMPv6 message types.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Message {
    DstUnreachable,
    PktTooBig,
    TimeExceeded,
    ParamProblem,
    EchoRequest,
    EchoReply,
    RouterSolicit,
    RouterAdvert,
    NeighborSolicit,
    NeighborAdvert,
    Redirect,
    Unknown(u8),
}

impl Message {
    /// True for the error messages (types 1..=4), which quote the offending packet and must
    /// be translated along with the flow they belong to.
    pub fn is_error(&self) -> bool {
        matches!(
            self,
            Message::DstUnreachable
                | Message::PktTooBig
                | Message::TimeExceeded
                | Message::ParamProblem
        )
    }
}

impl From<u8> for Message {
    fn from(value: u8) -> Self {
        match value {
            1 => Message::DstUnreachable,
            2 => Message::PktTooBig,
            3 => Message::TimeExceeded,
            4 => Message::ParamProblem,
            128 => Message::EchoRequest,
            129 => Message::EchoReply,
            133 => Message::RouterSolicit,
            134 => Message::RouterAdvert,
            135 => Message::NeighborSolicit,
            136 => Message::NeighborAdvert,
            137 => Message::Redirect,
            other => Message::Unknown(other),
        }
    }
}

impl From<Message> for u8 {
    fn from(value: Message) -> Self {
        match value {
            Message::DstUnreachable => 1,
            Message::PktTooBig => 2,
            Message::TimeExceeded => 3,
            Message::ParamProblem => 4,
            Message::EchoRequest => 128,
            Message::EchoReply => 129,
            Message::RouterSolicit => 133,
            Message::RouterAdvert => 134,
            Message::NeighborSolicit => 135,
            Message::NeighborAdvert => 136,
            Message::Redirect => 137,
            Message::Unknown(other) => other,
        }
    }
}

icmp_view! {
    /// A read/write view of an ICMPv6 message.
}

impl<T: AsRef<[u8]>> Packet<T> {
    /// MTU of a Packet Too Big message.
    pub fn mtu(&self) -> u32 {
        get_u32(self.buffer.as_ref(), field::MTU)
    }

    /// True if the checksum over the whole message plus `pseudo` is valid.
    pub fn verify_checksum(&self, pseudo: u16) -> bool {
        checksum::combine(&[pseudo, checksum::data(self.buffer.as_ref())]) == 0xffff
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> Packet<T> {
    pub fn set_mtu(&mut self, value: u32) {
        put_u32(self.buffer.as_mut(), field::MTU, value);
    }

    /// Recomputes the checksum over the whole message plus `pseudo`.
    pub fn fill_checksum(&mut self, pseudo: u16) {
        self.set_checksum(0);
        let sum = checksum::combine(&[pseudo, checksum::data(self.buffer.as_ref())]);
        self.set_checksum(!sum);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::IpProtocol;
    use proptest::prelude::*;
    use std::net::Ipv6Addr;

    const SRC: Ipv6Addr = Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 1);
    const DST: Ipv6Addr = Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 2);

    // Echo request, ident 0x1234, seq 1, data "ping", checksum for SRC -> DST.
    static ECHO_BYTES: [u8; 12] = [
        0x80, 0x00, 0x91, 0xae, 0x12, 0x34, 0x00, 0x01, 0x70, 0x69, 0x6e, 0x67,
    ];

    // Packet Too Big, MTU 1280, quoting 4 bytes of an IPv6 header.
    static PTB_BYTES: [u8; 12] = [
        0x02, 0x00, 0x00, 0x00, 0x00, 0x00, 0x05, 0x00, 0x60, 0x00, 0x00, 0x00,
    ];

    fn pseudo(len: usize) -> u16 {
        checksum::pseudo_header_v6(&SRC, &DST, IpProtocol::Icmpv6, len as u32)
    }

    #[test]
    fn test_parse() {
        let packet = Packet::new_checked(&ECHO_BYTES[..]).unwrap();
        assert_eq!(packet.msg_type(), Message::EchoRequest);
        assert_eq!(packet.msg_code(), 0);
        assert_eq!(packet.checksum(), 0x91ae);
        assert_eq!(packet.echo_ident(), 0x1234);
        assert_eq!(packet.echo_seq_no(), 1);
        assert_eq!(packet.data(), b"ping");
        assert!(packet.verify_checksum(pseudo(12)));
        assert!(!packet.msg_type().is_error());
    }

    #[test]
    fn test_emit() {
        let mut bytes = [0u8; 12];
        let mut packet = Packet::new_unchecked(&mut bytes[..]);
        packet.set_msg_type(Message::EchoRequest);
        packet.set_msg_code(0);
        packet.set_echo_ident(0x1234);
        packet.set_echo_seq_no(1);
        packet.data_mut().copy_from_slice(b"ping");
        packet.fill_checksum(pseudo(12));
        assert_eq!(bytes, ECHO_BYTES);
    }

    #[test]
    fn test_packet_too_big() {
        let mut bytes = PTB_BYTES;
        let mut packet = Packet::new_checked(&mut bytes[..]).unwrap();
        assert_eq!(packet.msg_type(), Message::PktTooBig);
        assert!(packet.msg_type().is_error());
        assert_eq!(packet.mtu(), 1280);
        packet.set_mtu(1500);
        packet.fill_checksum(pseudo(12));
        assert!(packet.verify_checksum(pseudo(12)));
        assert!(!packet.verify_checksum(pseudo(13)));
        assert_eq!(packet.mtu(), 1500);
        assert_eq!(packet.into_inner()[8..], PTB_BYTES[8..]);
    }

    #[test]
    fn test_truncated_at_each_boundary() {
        super::super::assert_prefixes_truncated(&ECHO_BYTES[..HEADER_LEN], |b| {
            Packet::new_checked(b).map(drop)
        });
    }

    #[test]
    fn test_message_roundtrip() {
        for n in 0..=u8::MAX {
            assert_eq!(u8::from(Message::from(n)), n);
        }
        let errors: Vec<u8> = (0..=u8::MAX)
            .filter(|&n| Message::from(n).is_error())
            .collect();
        assert_eq!(errors, [1, 2, 3, 4]);
    }

    proptest! {
        #![proptest_config(super::super::proptest_config(10_000))]

        #[test]
        fn prop_getters_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..40), pseudo in any::<u16>()) {
            if let Ok(packet) = Packet::new_checked(&bytes[..]) {
                let _ = (packet.msg_type().is_error(), packet.msg_code(), packet.checksum());
                let _ = (packet.mtu(), packet.echo_ident(), packet.echo_seq_no());
                let _ = (packet.data(), packet.verify_checksum(pseudo));
            }
        }
    }
}
