//! ICMPv4 message view (RFC 792).
//!
//! Once [`Packet::check_len`] has passed (the buffer holds the 8-byte header), no getter
//! panics. The buffer is the whole message: the checksum covers all of it.

use super::{checksum, get_u16, put_u16};

mod field {
    pub(super) const TYPE: usize = 0;
    pub(super) const CODE: usize = 1;
    pub(super) const CHECKSUM: usize = 2;
    pub(super) const ECHO_IDENT: usize = 4;
    pub(super) const ECHO_SEQNO: usize = 6;
    pub(super) const NEXT_HOP_MTU: usize = 6;
}

/// Length of the fixed ICMPv4 header.
pub const HEADER_LEN: usize = 8;

/// ICMPv4 message types.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Message {
    EchoReply,
    DstUnreachable,
    Redirect,
    EchoRequest,
    RouterAdvert,
    RouterSolicit,
    TimeExceeded,
    ParamProblem,
    Timestamp,
    TimestampReply,
    Unknown(u8),
}

impl Message {
    /// True for error messages, which quote the offending packet's header in their data and
    /// must be translated along with the flow they belong to.
    pub fn is_error(&self) -> bool {
        matches!(
            self,
            Message::DstUnreachable
                | Message::Redirect
                | Message::TimeExceeded
                | Message::ParamProblem
        )
    }
}

impl From<u8> for Message {
    fn from(value: u8) -> Self {
        match value {
            0 => Message::EchoReply,
            3 => Message::DstUnreachable,
            5 => Message::Redirect,
            8 => Message::EchoRequest,
            9 => Message::RouterAdvert,
            10 => Message::RouterSolicit,
            11 => Message::TimeExceeded,
            12 => Message::ParamProblem,
            13 => Message::Timestamp,
            14 => Message::TimestampReply,
            other => Message::Unknown(other),
        }
    }
}

impl From<Message> for u8 {
    fn from(value: Message) -> Self {
        match value {
            Message::EchoReply => 0,
            Message::DstUnreachable => 3,
            Message::Redirect => 5,
            Message::EchoRequest => 8,
            Message::RouterAdvert => 9,
            Message::RouterSolicit => 10,
            Message::TimeExceeded => 11,
            Message::ParamProblem => 12,
            Message::Timestamp => 13,
            Message::TimestampReply => 14,
            Message::Unknown(other) => other,
        }
    }
}

icmp_view! {
    /// A read/write view of an ICMPv4 message.
}

impl<T: AsRef<[u8]>> Packet<T> {
    /// Next-hop MTU of a "fragmentation needed" message (RFC 1191).
    pub fn next_hop_mtu(&self) -> u16 {
        get_u16(self.buffer.as_ref(), field::NEXT_HOP_MTU)
    }

    /// True if the checksum over the whole message is valid.
    pub fn verify_checksum(&self) -> bool {
        checksum::data(self.buffer.as_ref()) == 0xffff
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> Packet<T> {
    pub fn set_next_hop_mtu(&mut self, value: u16) {
        put_u16(self.buffer.as_mut(), field::NEXT_HOP_MTU, value);
    }

    /// Recomputes the checksum over the whole message.
    pub fn fill_checksum(&mut self) {
        self.set_checksum(0);
        let sum = checksum::data(self.buffer.as_ref());
        self.set_checksum(!sum);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    // Echo request, ident 0x1234, seq 1, data "ping".
    static ECHO_BYTES: [u8; 12] = [
        0x08, 0x00, 0x06, 0xfa, 0x12, 0x34, 0x00, 0x01, 0x70, 0x69, 0x6e, 0x67,
    ];

    // Fragmentation needed, next-hop MTU 1400, quoting 4 bytes of a packet.
    static FRAG_NEEDED_BYTES: [u8; 12] = [
        0x03, 0x04, 0x00, 0x00, 0x00, 0x00, 0x05, 0x78, 0x45, 0x00, 0x05, 0xdc,
    ];

    #[test]
    fn test_parse() {
        let packet = Packet::new_checked(&ECHO_BYTES[..]).unwrap();
        assert_eq!(packet.msg_type(), Message::EchoRequest);
        assert_eq!(packet.msg_code(), 0);
        assert_eq!(packet.checksum(), 0x06fa);
        assert_eq!(packet.echo_ident(), 0x1234);
        assert_eq!(packet.echo_seq_no(), 1);
        assert_eq!(packet.data(), b"ping");
        assert!(packet.verify_checksum());
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
        packet.fill_checksum();
        assert_eq!(bytes, ECHO_BYTES);
    }

    #[test]
    fn test_frag_needed() {
        let mut bytes = FRAG_NEEDED_BYTES;
        let mut packet = Packet::new_checked(&mut bytes[..]).unwrap();
        assert_eq!(packet.msg_type(), Message::DstUnreachable);
        assert!(packet.msg_type().is_error());
        assert_eq!(packet.msg_code(), 4);
        assert_eq!(packet.next_hop_mtu(), 1400);
        packet.set_next_hop_mtu(1280);
        packet.fill_checksum();
        assert!(packet.verify_checksum());
        assert_eq!(packet.next_hop_mtu(), 1280);
        assert_eq!(packet.into_inner()[8..], FRAG_NEEDED_BYTES[8..]);
    }

    #[test]
    fn test_truncated_at_each_boundary() {
        super::super::assert_prefixes_truncated(&ECHO_BYTES[..HEADER_LEN], |b| {
            Packet::new_checked(b).map(drop)
        });
        let packet = Packet::new_checked(&ECHO_BYTES[..HEADER_LEN]).unwrap();
        assert_eq!(packet.data(), &[] as &[u8]);
    }

    #[test]
    fn test_message_roundtrip() {
        for n in 0..=u8::MAX {
            assert_eq!(u8::from(Message::from(n)), n);
        }
        let errors: Vec<u8> = (0..=u8::MAX)
            .filter(|&n| Message::from(n).is_error())
            .collect();
        assert_eq!(errors, [3, 5, 11, 12]);
    }

    proptest! {
        #![proptest_config(super::super::proptest_config(10_000))]

        #[test]
        fn prop_getters_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..40)) {
            if let Ok(packet) = Packet::new_checked(&bytes[..]) {
                let _ = (packet.msg_type().is_error(), packet.msg_code(), packet.checksum());
                let _ = (packet.next_hop_mtu(), packet.echo_ident(), packet.echo_seq_no());
                let _ = (packet.data(), packet.verify_checksum());
            }
        }
    }
}
