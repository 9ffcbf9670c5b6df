//! TCP segment view (RFC 9293) and option parsing.
//!
//! Once [`Packet::check_len`] has passed, no getter panics: the fixed header is present and
//! `20 <= header_len() <= buffer length`. The buffer is the whole segment (the IP payload),
//! so [`Packet::payload`] is everything after the header. [`TcpOptions`] never panics on any
//! slice. `set_header_len` voids the guarantee until `check_len` is called again.
//!
//! The checksum helpers take the pseudo-header sum from [`super::checksum`], computed with
//! length = the whole segment length, so they serve IPv4 and IPv6 alike.

use super::{Error, Result, checksum, get_u16, get_u32, put_u16, put_u32};

mod field {
    pub(super) const SRC_PORT: usize = 0;
    pub(super) const DST_PORT: usize = 2;
    pub(super) const SEQ_NUM: usize = 4;
    pub(super) const ACK_NUM: usize = 8;
    pub(super) const FLAGS: usize = 12;
    pub(super) const WIN_SIZE: usize = 14;
    pub(super) const CHECKSUM: usize = 16;
    pub(super) const URGENT: usize = 18;

    pub(super) const FLG_FIN: u16 = 0x001;
    pub(super) const FLG_SYN: u16 = 0x002;
    pub(super) const FLG_RST: u16 = 0x004;
    pub(super) const FLG_PSH: u16 = 0x008;
    pub(super) const FLG_ACK: u16 = 0x010;
    pub(super) const FLG_URG: u16 = 0x020;
    pub(super) const FLG_ECE: u16 = 0x040;
    pub(super) const FLG_CWR: u16 = 0x080;
    pub(super) const FLG_ALL: u16 = 0x1ff;

    pub(super) const OPT_END: u8 = 0;
    pub(super) const OPT_NOP: u8 = 1;
    pub(super) const OPT_MSS: u8 = 2;
    pub(super) const OPT_WS: u8 = 3;
    pub(super) const OPT_SACKPERM: u8 = 4;
    pub(super) const OPT_SACKRNG: u8 = 5;
    pub(super) const OPT_TSTAMP: u8 = 8;
}

/// Length of a header without options.
pub const HEADER_LEN: usize = 20;

/// Longest header the data offset can express.
pub const MAX_HEADER_LEN: usize = 60;

packet_view! {
    /// A read/write view of a TCP segment.
}

impl<T: AsRef<[u8]>> Packet<T> {
    /// `Truncated` if the buffer is shorter than 20 bytes or `header_len()`; `Malformed` if
    /// the data offset is below 5.
    pub fn check_len(&self) -> Result<()> {
        let len = self.buffer.as_ref().len();
        if len < HEADER_LEN {
            return Err(Error::Truncated);
        }
        let header_len = usize::from(self.header_len());
        if header_len < HEADER_LEN {
            return Err(Error::Malformed);
        }
        if len < header_len {
            return Err(Error::Truncated);
        }
        Ok(())
    }

    fn flags(&self) -> u16 {
        get_u16(self.buffer.as_ref(), field::FLAGS)
    }

    pub fn src_port(&self) -> u16 {
        get_u16(self.buffer.as_ref(), field::SRC_PORT)
    }

    pub fn dst_port(&self) -> u16 {
        get_u16(self.buffer.as_ref(), field::DST_PORT)
    }

    pub fn seq_number(&self) -> u32 {
        get_u32(self.buffer.as_ref(), field::SEQ_NUM)
    }

    pub fn ack_number(&self) -> u32 {
        get_u32(self.buffer.as_ref(), field::ACK_NUM)
    }

    /// Header length in bytes (data offset × 4).
    pub fn header_len(&self) -> u8 {
        (self.buffer.as_ref()[field::FLAGS] >> 4) * 4
    }

    pub fn fin(&self) -> bool {
        self.flags() & field::FLG_FIN != 0
    }

    pub fn syn(&self) -> bool {
        self.flags() & field::FLG_SYN != 0
    }

    pub fn rst(&self) -> bool {
        self.flags() & field::FLG_RST != 0
    }

    pub fn psh(&self) -> bool {
        self.flags() & field::FLG_PSH != 0
    }

    pub fn ack(&self) -> bool {
        self.flags() & field::FLG_ACK != 0
    }

    pub fn urg(&self) -> bool {
        self.flags() & field::FLG_URG != 0
    }

    pub fn ece(&self) -> bool {
        self.flags() & field::FLG_ECE != 0
    }

    pub fn cwr(&self) -> bool {
        self.flags() & field::FLG_CWR != 0
    }

    pub fn window_len(&self) -> u16 {
        get_u16(self.buffer.as_ref(), field::WIN_SIZE)
    }

    pub fn checksum(&self) -> u16 {
        get_u16(self.buffer.as_ref(), field::CHECKSUM)
    }

    pub fn urgent_at(&self) -> u16 {
        get_u16(self.buffer.as_ref(), field::URGENT)
    }

    /// The option bytes, `20..header_len()`; iterate them with [`TcpOptions::new`].
    pub fn options(&self) -> &[u8] {
        &self.buffer.as_ref()[HEADER_LEN..usize::from(self.header_len())]
    }

    pub fn payload(&self) -> &[u8] {
        &self.buffer.as_ref()[usize::from(self.header_len())..]
    }

    /// Sequence space the segment occupies: payload length, plus one each for SYN and FIN.
    pub fn segment_len(&self) -> usize {
        self.payload().len() + usize::from(self.syn()) + usize::from(self.fin())
    }

    /// True if the checksum over the whole buffer plus `pseudo` is valid.
    pub fn verify_checksum(&self, pseudo: u16) -> bool {
        checksum::combine(&[pseudo, checksum::data(self.buffer.as_ref())]) == 0xffff
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> Packet<T> {
    fn set_flag(&mut self, flag: u16, value: bool) {
        let raw = get_u16(self.buffer.as_ref(), field::FLAGS);
        let raw = if value { raw | flag } else { raw & !flag };
        put_u16(self.buffer.as_mut(), field::FLAGS, raw);
    }

    pub fn set_src_port(&mut self, value: u16) {
        put_u16(self.buffer.as_mut(), field::SRC_PORT, value);
    }

    pub fn set_dst_port(&mut self, value: u16) {
        put_u16(self.buffer.as_mut(), field::DST_PORT, value);
    }

    pub fn set_seq_number(&mut self, value: u32) {
        put_u32(self.buffer.as_mut(), field::SEQ_NUM, value);
    }

    pub fn set_ack_number(&mut self, value: u32) {
        put_u32(self.buffer.as_mut(), field::ACK_NUM, value);
    }

    /// Sets the header length in bytes; it must be a multiple of 4 (lower bits are dropped).
    pub fn set_header_len(&mut self, value: u8) {
        let byte = &mut self.buffer.as_mut()[field::FLAGS];
        *byte = (*byte & 0x0f) | (((value / 4) & 0x0f) << 4);
    }

    /// Clears every flag bit, keeping the data offset.
    pub fn clear_flags(&mut self) {
        self.set_flag(field::FLG_ALL, false);
    }

    pub fn set_fin(&mut self, value: bool) {
        self.set_flag(field::FLG_FIN, value);
    }

    pub fn set_syn(&mut self, value: bool) {
        self.set_flag(field::FLG_SYN, value);
    }

    pub fn set_rst(&mut self, value: bool) {
        self.set_flag(field::FLG_RST, value);
    }

    pub fn set_psh(&mut self, value: bool) {
        self.set_flag(field::FLG_PSH, value);
    }

    pub fn set_ack(&mut self, value: bool) {
        self.set_flag(field::FLG_ACK, value);
    }

    pub fn set_urg(&mut self, value: bool) {
        self.set_flag(field::FLG_URG, value);
    }

    pub fn set_ece(&mut self, value: bool) {
        self.set_flag(field::FLG_ECE, value);
    }

    pub fn set_cwr(&mut self, value: bool) {
        self.set_flag(field::FLG_CWR, value);
    }

    pub fn set_window_len(&mut self, value: u16) {
        put_u16(self.buffer.as_mut(), field::WIN_SIZE, value);
    }

    pub fn set_checksum(&mut self, value: u16) {
        put_u16(self.buffer.as_mut(), field::CHECKSUM, value);
    }

    pub fn set_urgent_at(&mut self, value: u16) {
        put_u16(self.buffer.as_mut(), field::URGENT, value);
    }

    /// The option bytes, `20..header_len()` (e.g. to rewrite an MSS in place).
    pub fn options_mut(&mut self) -> &mut [u8] {
        let end = usize::from(self.header_len());
        &mut self.buffer.as_mut()[HEADER_LEN..end]
    }

    pub fn payload_mut(&mut self) -> &mut [u8] {
        let start = usize::from(self.header_len());
        &mut self.buffer.as_mut()[start..]
    }

    /// Computes the checksum over the whole buffer plus `pseudo`.
    pub fn fill_checksum(&mut self, pseudo: u16) {
        self.set_checksum(0);
        let sum = checksum::combine(&[pseudo, checksum::data(self.buffer.as_ref())]);
        self.set_checksum(!sum);
    }
}

/// A TCP option, borrowed from the header it was parsed from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TcpOption<'a> {
    EndOfList,
    NoOperation,
    MaxSegmentSize(u16),
    WindowScale(u8),
    SackPermitted,
    /// One to four `(left, right)` blocks (RFC 2018): the most 40 option bytes can hold.
    /// Parsing fills the leading slots; more than four blocks is `Malformed`.
    SackRange([Option<(u32, u32)>; 4]),
    Timestamps {
        tsval: u32,
        tsecr: u32,
    },
    Unknown {
        kind: u8,
        data: &'a [u8],
    },
}

impl<'a> TcpOption<'a> {
    /// Parses the option at the start of `buffer`, returning it and the bytes after it.
    ///
    /// `Malformed` if the length byte is missing, below 2, runs past the slice, or does not
    /// match the fixed length of a known kind; `Truncated` if `buffer` is empty.
    pub fn parse(buffer: &'a [u8]) -> Result<(TcpOption<'a>, &'a [u8])> {
        let (&kind, rest) = buffer.split_first().ok_or(Error::Truncated)?;
        match kind {
            field::OPT_END => return Ok((TcpOption::EndOfList, rest)),
            field::OPT_NOP => return Ok((TcpOption::NoOperation, rest)),
            _ => {}
        }
        let &length = rest.first().ok_or(Error::Malformed)?;
        let length = usize::from(length);
        if length < 2 {
            return Err(Error::Malformed);
        }
        let data = buffer.get(2..length).ok_or(Error::Malformed)?;
        let rest = &buffer[length..];
        let option = match (kind, data.len()) {
            (field::OPT_MSS, 2) => TcpOption::MaxSegmentSize(get_u16(data, 0)),
            (field::OPT_WS, 1) => TcpOption::WindowScale(data[0]),
            (field::OPT_SACKPERM, 0) => TcpOption::SackPermitted,
            (field::OPT_SACKRNG, n) if n % 8 == 0 && (8..=32).contains(&n) => {
                let mut blocks = [None; 4];
                for (slot, block) in blocks.iter_mut().zip(data.chunks_exact(8)) {
                    *slot = Some((get_u32(block, 0), get_u32(block, 4)));
                }
                TcpOption::SackRange(blocks)
            }
            (field::OPT_TSTAMP, 8) => TcpOption::Timestamps {
                tsval: get_u32(data, 0),
                tsecr: get_u32(data, 4),
            },
            (
                field::OPT_MSS
                | field::OPT_WS
                | field::OPT_SACKPERM
                | field::OPT_SACKRNG
                | field::OPT_TSTAMP,
                _,
            ) => return Err(Error::Malformed),
            (kind, _) => TcpOption::Unknown { kind, data },
        };
        Ok((option, rest))
    }

    /// Bytes the option occupies on the wire.
    pub fn buffer_len(&self) -> usize {
        match self {
            TcpOption::EndOfList | TcpOption::NoOperation => 1,
            TcpOption::MaxSegmentSize(_) => 4,
            TcpOption::WindowScale(_) => 3,
            TcpOption::SackPermitted => 2,
            TcpOption::SackRange(blocks) => 2 + 8 * blocks.iter().flatten().count(),
            TcpOption::Timestamps { .. } => 10,
            TcpOption::Unknown { data, .. } => 2 + data.len(),
        }
    }

    /// Writes the option at the start of `buffer` and returns its length.
    ///
    /// `SackRange` writes its `Some` blocks in order. An `Unknown` option's data must be at
    /// most 253 bytes (checked in debug builds).
    ///
    /// # Panics
    ///
    /// If `buffer` is shorter than [`Self::buffer_len`].
    pub fn emit(&self, buffer: &mut [u8]) -> usize {
        let len = self.buffer_len();
        let buffer = &mut buffer[..len];
        let kind = match *self {
            TcpOption::EndOfList => {
                buffer[0] = field::OPT_END;
                return len;
            }
            TcpOption::NoOperation => {
                buffer[0] = field::OPT_NOP;
                return len;
            }
            TcpOption::MaxSegmentSize(mss) => {
                put_u16(buffer, 2, mss);
                field::OPT_MSS
            }
            TcpOption::WindowScale(shift) => {
                buffer[2] = shift;
                field::OPT_WS
            }
            TcpOption::SackPermitted => field::OPT_SACKPERM,
            TcpOption::SackRange(blocks) => {
                for (i, (left, right)) in blocks.iter().flatten().enumerate() {
                    put_u32(buffer, 2 + 8 * i, *left);
                    put_u32(buffer, 6 + 8 * i, *right);
                }
                field::OPT_SACKRNG
            }
            TcpOption::Timestamps { tsval, tsecr } => {
                put_u32(buffer, 2, tsval);
                put_u32(buffer, 6, tsecr);
                field::OPT_TSTAMP
            }
            TcpOption::Unknown { kind, data } => {
                buffer[2..].copy_from_slice(data);
                kind
            }
        };
        debug_assert!(len <= usize::from(u8::MAX));
        buffer[0] = kind;
        buffer[1] = len as u8;
        len
    }
}

/// Iterator over an options byte slice, yielding each option in order.
///
/// Stops after `EndOfList` or after the first error, since nothing past a malformed length
/// can be located.
#[derive(Debug, Clone)]
pub struct TcpOptions<'a> {
    rest: &'a [u8],
}

impl<'a> TcpOptions<'a> {
    pub fn new(options: &'a [u8]) -> TcpOptions<'a> {
        TcpOptions { rest: options }
    }
}

impl<'a> Iterator for TcpOptions<'a> {
    type Item = Result<TcpOption<'a>>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.rest.is_empty() {
            return None;
        }
        match TcpOption::parse(self.rest) {
            Ok((option, rest)) => {
                self.rest = if option == TcpOption::EndOfList {
                    &[]
                } else {
                    rest
                };
                Some(Ok(option))
            }
            Err(err) => {
                self.rest = &[];
                Some(Err(err))
            }
        }
    }
}

/// The control flags a segment carries, at most one of SYN, FIN and RST.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Control {
    None,
    Psh,
    Syn,
    Fin,
    Rst,
}

impl Control {
    /// Sequence space the flag occupies.
    pub const fn len(self) -> usize {
        match self {
            Control::Syn | Control::Fin => 1,
            Control::None | Control::Psh | Control::Rst => 0,
        }
    }

    /// True if the flag occupies no sequence space.
    pub const fn is_empty(self) -> bool {
        self.len() == 0
    }
}

/// A TCP segment's header fields, the options the data plane uses, and its payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Repr<'a> {
    pub src_port: u16,
    pub dst_port: u16,
    pub control: Control,
    pub seq_number: u32,
    /// Present when the ACK flag is set.
    pub ack_number: Option<u32>,
    pub window_len: u16,
    /// Shift count as received; RFC 7323 caps its use at 14, which is the peer's business.
    pub window_scale: Option<u8>,
    pub max_seg_size: Option<u16>,
    pub sack_permitted: bool,
    /// `(tsval, tsecr)` of the Timestamps option (RFC 7323).
    pub timestamps: Option<(u32, u32)>,
    pub payload: &'a [u8],
}

impl<'a> Repr<'a> {
    /// Parses a segment, rejecting a bad checksum (`pseudo` computed with the segment length),
    /// a malformed option or a combination of SYN, FIN and RST as `Malformed`.
    ///
    /// ECE, CWR, URG and SACK blocks are dropped; unknown options are skipped.
    pub fn parse<T: AsRef<[u8]> + ?Sized>(packet: &Packet<&'a T>, pseudo: u16) -> Result<Repr<'a>> {
        packet.check_len()?;
        if !packet.verify_checksum(pseudo) {
            return Err(Error::Malformed);
        }
        let control = match (packet.syn(), packet.fin(), packet.rst(), packet.psh()) {
            (false, false, false, false) => Control::None,
            (false, false, false, true) => Control::Psh,
            (true, false, false, _) => Control::Syn,
            (false, true, false, _) => Control::Fin,
            (false, false, true, _) => Control::Rst,
            _ => return Err(Error::Malformed),
        };
        let buffer: &'a [u8] = packet.buffer.as_ref();
        let header_len = usize::from(packet.header_len());
        let mut repr = Repr {
            src_port: packet.src_port(),
            dst_port: packet.dst_port(),
            control,
            seq_number: packet.seq_number(),
            ack_number: packet.ack().then(|| packet.ack_number()),
            window_len: packet.window_len(),
            window_scale: None,
            max_seg_size: None,
            sack_permitted: false,
            timestamps: None,
            payload: &buffer[header_len..],
        };
        for option in TcpOptions::new(&buffer[HEADER_LEN..header_len]) {
            match option? {
                TcpOption::MaxSegmentSize(mss) => repr.max_seg_size = Some(mss),
                TcpOption::WindowScale(shift) => repr.window_scale = Some(shift),
                TcpOption::SackPermitted => repr.sack_permitted = true,
                TcpOption::Timestamps { tsval, tsecr } => repr.timestamps = Some((tsval, tsecr)),
                TcpOption::EndOfList
                | TcpOption::NoOperation
                | TcpOption::SackRange(_)
                | TcpOption::Unknown { .. } => {}
            }
        }
        Ok(repr)
    }

    fn options(&self) -> impl Iterator<Item = TcpOption<'static>> {
        let mss = self.max_seg_size.map(TcpOption::MaxSegmentSize);
        let ws = self.window_scale.map(TcpOption::WindowScale);
        let sack = self.sack_permitted.then_some(TcpOption::SackPermitted);
        let ts = self
            .timestamps
            .map(|(tsval, tsecr)| TcpOption::Timestamps { tsval, tsecr });
        [mss, ws, sack, ts].into_iter().flatten()
    }

    /// Header length with options, padded to a multiple of 4 (at most 40 bytes).
    pub fn header_len(&self) -> usize {
        let options: usize = self.options().map(|o| o.buffer_len()).sum();
        HEADER_LEN + options.next_multiple_of(4)
    }

    /// Header plus payload length: the length to compute `pseudo` with.
    pub fn buffer_len(&self) -> usize {
        self.header_len() + self.payload.len()
    }

    /// Writes the header, options (MSS, window scale, SACK-permitted, timestamps, then EOL
    /// padding), payload and checksum. URG, ECE and CWR are cleared.
    ///
    /// # Panics
    ///
    /// If the buffer is not exactly `buffer_len()` bytes: the checksum covers the whole
    /// buffer, so trailing bytes would corrupt it.
    pub fn emit<T: AsRef<[u8]> + AsMut<[u8]>>(&self, packet: &mut Packet<T>, pseudo: u16) {
        assert_eq!(packet.buffer.as_ref().len(), self.buffer_len());
        let header_len = self.header_len();
        packet.set_src_port(self.src_port);
        packet.set_dst_port(self.dst_port);
        packet.set_seq_number(self.seq_number);
        packet.set_ack_number(self.ack_number.unwrap_or(0));
        // One write for data offset, reserved bits and flags: nothing stale survives.
        put_u16(
            packet.buffer.as_mut(),
            field::FLAGS,
            ((header_len / 4) as u16) << 12,
        );
        match self.control {
            Control::None => {}
            Control::Psh => packet.set_psh(true),
            Control::Syn => packet.set_syn(true),
            Control::Fin => packet.set_fin(true),
            Control::Rst => packet.set_rst(true),
        }
        packet.set_ack(self.ack_number.is_some());
        packet.set_window_len(self.window_len);
        packet.set_urgent_at(0);
        let options = packet.options_mut();
        let mut at = 0;
        for option in self.options() {
            at += option.emit(&mut options[at..]);
        }
        options[at..].fill(field::OPT_END);
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

    const SRC: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);
    const DST: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 2);

    fn pseudo(len: usize) -> u16 {
        checksum::pseudo_header_v4(&SRC, &DST, IpProtocol::Tcp, len as u32)
    }

    // Checksums below are for 10.0.0.1 -> 10.0.0.2, computed independently of this code.

    // A Linux-style SYN 40000 -> 80, seq 0x01020304: MSS 1460, SACK permitted,
    // timestamps (1, 0), NOP, window scale 7.
    static SYN_BYTES: [u8; 40] = [
        0x9c, 0x40, 0x00, 0x50, 0x01, 0x02, 0x03, 0x04, 0x00, 0x00, 0x00, 0x00, 0xa0, 0x02, 0xfa,
        0xf0, 0x98, 0x75, 0x00, 0x00, //
        0x02, 0x04, 0x05, 0xb4, 0x04, 0x02, 0x08, 0x0a, 0x00, 0x00, 0x00, 0x01, 0x00, 0x00, 0x00,
        0x00, 0x01, 0x03, 0x03, 0x07,
    ];

    // ACK|PSH 80 -> 40000 carrying "hi", no options.
    static DATA_BYTES: [u8; 22] = [
        0x00, 0x50, 0x9c, 0x40, 0x00, 0x00, 0x10, 0x00, 0x01, 0x02, 0x03, 0x05, 0x50, 0x18, 0x01,
        0x00, 0x81, 0xc7, 0x00, 0x00, b'h', b'i',
    ];

    /// The SYN as `Repr::emit` lays it out: MSS, window scale, SACK permitted, timestamps,
    /// EOL padding.
    static SYN_EMITTED_BYTES: [u8; 40] = [
        0x9c, 0x40, 0x00, 0x50, 0x01, 0x02, 0x03, 0x04, 0x00, 0x00, 0x00, 0x00, 0xa0, 0x02, 0xfa,
        0xf0, 0x91, 0x7d, 0x00, 0x00, //
        0x02, 0x04, 0x05, 0xb4, 0x03, 0x03, 0x07, 0x04, 0x02, 0x08, 0x0a, 0x00, 0x00, 0x00, 0x01,
        0x00, 0x00, 0x00, 0x00, 0x00,
    ];

    /// `bytes` after editing, with the checksum refreshed.
    fn with_checksum<const N: usize>(bytes: [u8; N]) -> [u8; N] {
        let mut bytes = bytes;
        Packet::new_unchecked(&mut bytes[..]).fill_checksum(pseudo(N));
        bytes
    }

    fn syn_repr() -> Repr<'static> {
        Repr {
            src_port: 40000,
            dst_port: 80,
            control: Control::Syn,
            seq_number: 0x0102_0304,
            ack_number: None,
            window_len: 64240,
            window_scale: Some(7),
            max_seg_size: Some(1460),
            sack_permitted: true,
            timestamps: Some((1, 0)),
            payload: &[],
        }
    }

    #[test]
    fn test_parse() {
        let bytes = SYN_BYTES;
        let packet = Packet::new_checked(&bytes[..]).unwrap();
        assert_eq!(packet.src_port(), 40000);
        assert_eq!(packet.dst_port(), 80);
        assert_eq!(packet.seq_number(), 0x0102_0304);
        assert_eq!(packet.ack_number(), 0);
        assert_eq!(packet.header_len(), 40);
        assert!(packet.syn());
        assert!(!(packet.ack() || packet.fin() || packet.rst() || packet.psh()));
        assert!(!(packet.urg() || packet.ece() || packet.cwr()));
        assert_eq!(packet.window_len(), 64240);
        assert_eq!(packet.urgent_at(), 0);
        assert_eq!(packet.options(), &SYN_BYTES[20..]);
        assert_eq!(packet.payload(), &[] as &[u8]);
        assert_eq!(packet.segment_len(), 1);
        assert!(packet.verify_checksum(pseudo(40)));
        assert!(!packet.verify_checksum(pseudo(41)));
        let options: Vec<_> = TcpOptions::new(packet.options()).collect();
        assert_eq!(
            options,
            [
                Ok(TcpOption::MaxSegmentSize(1460)),
                Ok(TcpOption::SackPermitted),
                Ok(TcpOption::Timestamps { tsval: 1, tsecr: 0 }),
                Ok(TcpOption::NoOperation),
                Ok(TcpOption::WindowScale(7)),
            ]
        );
        assert_eq!(Repr::parse(&packet, pseudo(40)), Ok(syn_repr()));
    }

    #[test]
    fn test_parse_data_segment() {
        let bytes = DATA_BYTES;
        let packet = Packet::new_checked(&bytes[..]).unwrap();
        assert!(packet.ack() && packet.psh());
        assert_eq!(packet.ack_number(), 0x0102_0305);
        assert_eq!(packet.payload(), b"hi");
        assert_eq!(packet.segment_len(), 2);
        let repr = Repr::parse(&packet, pseudo(22)).unwrap();
        assert_eq!(repr.control, Control::Psh);
        assert_eq!(repr.ack_number, Some(0x0102_0305));
        assert_eq!(repr.payload, b"hi");
        assert_eq!(repr.header_len(), 20);
    }

    #[test]
    fn test_emit() {
        let repr = syn_repr();
        assert_eq!(repr.header_len(), 40);
        assert_eq!(repr.buffer_len(), 40);
        let mut bytes = [0xffu8; 40];
        repr.emit(&mut Packet::new_unchecked(&mut bytes[..]), pseudo(40));
        assert_eq!(bytes, SYN_EMITTED_BYTES);
        let packet = Packet::new_checked(&bytes[..]).unwrap();
        assert_eq!(Repr::parse(&packet, pseudo(40)), Ok(repr));
    }

    #[test]
    fn test_emit_data_segment() {
        let repr = Repr {
            src_port: 80,
            dst_port: 40000,
            control: Control::Psh,
            seq_number: 0x1000,
            ack_number: Some(0x0102_0305),
            window_len: 256,
            window_scale: None,
            max_seg_size: None,
            sack_permitted: false,
            timestamps: None,
            payload: b"hi",
        };
        let mut bytes = [0u8; 22];
        repr.emit(&mut Packet::new_unchecked(&mut bytes[..]), pseudo(22));
        assert_eq!(bytes, DATA_BYTES);
    }

    #[test]
    fn test_emit_pads_to_multiple_of_four() {
        let repr = Repr {
            max_seg_size: None,
            sack_permitted: false,
            timestamps: None,
            ..syn_repr()
        };
        // Window scale alone: 3 bytes, padded with one EOL.
        assert_eq!(repr.header_len(), 24);
        let mut bytes = [0xffu8; 24];
        repr.emit(&mut Packet::new_unchecked(&mut bytes[..]), pseudo(24));
        assert_eq!(bytes[20..], [3, 3, 7, 0]);
    }

    #[test]
    fn test_setters() {
        let mut bytes = DATA_BYTES;
        let mut packet = Packet::new_unchecked(&mut bytes[..]);
        packet.set_src_port(1);
        packet.set_dst_port(2);
        packet.set_seq_number(3);
        packet.set_ack_number(4);
        packet.set_window_len(5);
        packet.set_urgent_at(6);
        packet.clear_flags();
        packet.set_fin(true);
        packet.set_rst(true);
        packet.set_urg(true);
        packet.set_ece(true);
        packet.set_cwr(true);
        packet.payload_mut().copy_from_slice(b"yo");
        packet.fill_checksum(pseudo(22));
        let packet = Packet::new_checked(&bytes[..]).unwrap();
        assert_eq!((packet.src_port(), packet.dst_port()), (1, 2));
        assert_eq!((packet.seq_number(), packet.ack_number()), (3, 4));
        assert_eq!((packet.window_len(), packet.urgent_at()), (5, 6));
        assert!(packet.fin() && packet.rst() && packet.urg() && packet.ece() && packet.cwr());
        assert!(!(packet.syn() || packet.ack() || packet.psh()));
        assert_eq!(packet.header_len(), 20);
        assert_eq!(packet.payload(), b"yo");
        assert!(packet.verify_checksum(pseudo(22)));
        // FIN and RST together is not a valid control.
        assert_eq!(Repr::parse(&packet, pseudo(22)), Err(Error::Malformed));
    }

    #[test]
    fn test_rewrite_mss_in_place() {
        let mut bytes = SYN_BYTES;
        let mut packet = Packet::new_checked(&mut bytes[..]).unwrap();
        TcpOption::MaxSegmentSize(1400).emit(packet.options_mut());
        packet.fill_checksum(pseudo(40));
        let packet = Packet::new_checked(&bytes[..]).unwrap();
        assert_eq!(
            Repr::parse(&packet, pseudo(40)).unwrap().max_seg_size,
            Some(1400)
        );
    }

    #[test]
    fn test_bad_checksum() {
        let mut bytes = SYN_BYTES;
        bytes[17] ^= 0x80;
        let packet = Packet::new_checked(&bytes[..]).unwrap();
        assert_eq!(Repr::parse(&packet, pseudo(40)), Err(Error::Malformed));
    }

    #[test]
    fn test_truncated_at_each_boundary() {
        super::super::assert_prefixes_truncated(&SYN_BYTES, |b| Packet::new_checked(b).map(drop));
    }

    #[test]
    fn test_bad_data_offset() {
        for offset in 0..5u8 {
            let mut bytes = DATA_BYTES;
            bytes[12] = offset << 4;
            assert_eq!(
                Packet::new_checked(&bytes[..]).err(),
                Some(Error::Malformed)
            );
        }
    }

    #[test]
    fn test_option_lengths_malformed() {
        let cases: [&[u8]; 8] = [
            &[2],                         // length byte missing
            &[2, 0, 5, 0xb4],             // length 0
            &[2, 1, 5, 0xb4],             // length 1
            &[2, 5, 5, 0xb4],             // runs past the slice
            &[2, 3, 5],                   // MSS with the wrong length
            &[3, 4, 7, 0],                // window scale with the wrong length
            &[8, 9, 0, 0, 0, 0, 0, 0, 0], // timestamps too short
            &[5, 6, 0, 0, 0, 0],          // SACK block not a multiple of 8
        ];
        for case in cases {
            let mut options = TcpOptions::new(case);
            assert_eq!(options.next(), Some(Err(Error::Malformed)), "{case:?}");
            assert_eq!(options.next(), None);
        }
    }

    #[test]
    fn test_option_iteration_stops() {
        // Iteration ends at EOL even if junk follows, and after an error.
        let options: Vec<_> = TcpOptions::new(&[1, 0, 2, 0xff]).collect();
        assert_eq!(
            options,
            [Ok(TcpOption::NoOperation), Ok(TcpOption::EndOfList)]
        );
        let options: Vec<_> = TcpOptions::new(&[1, 3, 1, 1, 1]).collect();
        assert_eq!(options, [Ok(TcpOption::NoOperation), Err(Error::Malformed)]);
        assert_eq!(TcpOptions::new(&[]).next(), None);
    }

    #[test]
    fn test_malformed_option_rejects_segment() {
        let mut bytes = SYN_BYTES;
        bytes[21] = 1;
        let bytes = with_checksum(bytes);
        let packet = Packet::new_checked(&bytes[..]).unwrap();
        assert_eq!(Repr::parse(&packet, pseudo(40)), Err(Error::Malformed));
    }

    #[test]
    fn test_option_emit_roundtrip() {
        let options = [
            TcpOption::EndOfList,
            TcpOption::NoOperation,
            TcpOption::MaxSegmentSize(536),
            TcpOption::WindowScale(14),
            TcpOption::SackPermitted,
            TcpOption::SackRange([Some((1, 2)), Some((3, 4)), None, None]),
            TcpOption::SackRange([Some((1, 2)), Some((3, 4)), Some((5, 6)), Some((7, 8))]),
            TcpOption::Timestamps {
                tsval: 0xdead_beef,
                tsecr: 7,
            },
            TcpOption::Unknown {
                kind: 30,
                data: &[1, 2, 3],
            },
        ];
        for option in options {
            let mut buffer = [0u8; 40];
            let len = option.emit(&mut buffer);
            assert_eq!(len, option.buffer_len());
            assert_eq!(TcpOption::parse(&buffer[..len]), Ok((option, &[] as &[u8])));
        }
        assert_eq!(TcpOption::parse(&[]), Err(Error::Truncated));
    }

    #[test]
    fn test_control_len() {
        assert_eq!(Control::Syn.len(), 1);
        assert_eq!(Control::Fin.len(), 1);
        assert!(Control::Rst.is_empty() && Control::Psh.is_empty() && Control::None.is_empty());
    }

    proptest! {
        #![proptest_config(super::super::proptest_config(20_000))]

        #[test]
        fn prop_getters_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..80), pseudo in any::<u16>()) {
            if let Ok(packet) = Packet::new_checked(&bytes[..]) {
                let _ = (packet.src_port(), packet.dst_port(), packet.seq_number());
                let _ = (packet.ack_number(), packet.header_len(), packet.syn(), packet.ack());
                let _ = (packet.fin(), packet.rst(), packet.psh(), packet.urg(), packet.ece());
                let _ = (packet.cwr(), packet.window_len(), packet.checksum(), packet.urgent_at());
                let _ = (packet.payload(), packet.segment_len(), packet.verify_checksum(pseudo));
                let _ = TcpOptions::new(packet.options()).count();
                let _ = Repr::parse(&packet, pseudo);
            }
        }

        #[test]
        fn prop_options_never_panic(bytes in proptest::collection::vec(
            prop_oneof![0u8..=10, any::<u8>()], 0..48)
        ) {
            let mut total = 0;
            // The iterator stops at the first error, so `flatten` sees every parsed option.
            for option in TcpOptions::new(&bytes).flatten() {
                total += option.buffer_len();
                let mut buffer = vec![0u8; option.buffer_len()];
                prop_assert_eq!(option.emit(&mut buffer), buffer.len());
                prop_assert_eq!(TcpOption::parse(&buffer), Ok((option, &[] as &[u8])));
            }
            prop_assert!(total <= bytes.len());
        }
    }
}
