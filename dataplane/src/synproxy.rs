//! The SYN proxy's pure parts: SYN cookies and the segments the proxy writes itself.
//!
//! A proxied service answers a client's SYN with a SYN-ACK whose sequence number is a cookie
//! and keeps nothing: no session, no local port. The cookie (32 bits, as Linux lays its own
//! out in spirit) holds a 3-bit time slot of 64 s, 7 bits of the client's options (an MSS from
//! [`MSS_TABLE`], SACK permitted, the window scale) and a 22-bit SipHash-2-4 MAC, under a
//! per-node 128-bit secret, of the flow's addresses and ports, the client's initial sequence
//! number, the slot and the option bits. The client's ACK proves it: a cookie of the current or
//! the previous slot (so 64–128 s) whose MAC matches. Only then does the engine schedule,
//! allocate a port and open the connection to the real server (see the engine).
//!
//! Options: the SYN-ACK offers the MSS the client's own falls into (at most 1460 for IPv4, 1440
//! for IPv6), SACK if the client offered it, and window scale [`PROXY_WSCALE`] if the client
//! offered scaling. Timestamps are not offered: a cookie has no room to carry them, and the
//! real server's timestamps could not be made to follow ours. The real server sees the
//! client's options (the MSS from the table, SACK, the client's window scale) in the proxy's
//! SYN; its own window scale may differ from ours, so the engine rescales the windows it sends
//! (see the engine).
//!
//! Pure code: no clock (`now_s` is the caller's), no I/O.

use std::hash::Hasher;

use siphasher::sip::SipHasher24;

use crate::family::Family;
use crate::session::FlowKey;
use crate::wire::{Error, IpProtocol, TcpOption, TcpOptions, checksum};

/// The MSS values a cookie can carry: the largest not above the client's is offered.
pub const MSS_TABLE: [u16; 4] = [536, 1220, 1440, 1460];

/// The window scale the proxy offers a client that offered scaling.
pub const PROXY_WSCALE: u8 = 7;

/// Seconds of one cookie time slot; a cookie is good in its slot and the next.
pub const COOKIE_SLOT_SECS: u64 = 64;

const MAC_BITS: u32 = 22;
const MAC_MASK: u32 = (1 << MAC_BITS) - 1;
const OPT_SHIFT: u32 = MAC_BITS;
const SLOT_SHIFT: u32 = 29;
const NO_WSCALE: u32 = 15;

/// What a cookie remembers of the client's SYN.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CookieOpts {
    /// One of [`MSS_TABLE`].
    pub mss: u16,
    pub sack: bool,
    /// The client's window scale (at most 14), if it offered scaling.
    pub wscale: Option<u8>,
}

impl CookieOpts {
    /// The options of a SYN's option bytes, the MSS rounded down to [`MSS_TABLE`] (536 if the
    /// client sent none, as RFC 9293 assumes; never above `max_mss`).
    pub fn from_syn(options: &[u8], max_mss: u16) -> Result<CookieOpts, Error> {
        let mut opts = CookieOpts {
            mss: MSS_TABLE[0],
            sack: false,
            wscale: None,
        };
        let mut client_mss = MSS_TABLE[0];
        for opt in TcpOptions::new(options) {
            match opt? {
                TcpOption::MaxSegmentSize(m) => client_mss = m,
                TcpOption::SackPermitted => opts.sack = true,
                TcpOption::WindowScale(w) => opts.wscale = Some(w.min(14)),
                TcpOption::EndOfList => break,
                _ => {}
            }
        }
        let limit = client_mss.min(max_mss);
        opts.mss = MSS_TABLE
            .iter()
            .rev()
            .copied()
            .find(|&m| m <= limit)
            .unwrap_or(MSS_TABLE[0]);
        Ok(opts)
    }

    fn bits(self) -> u32 {
        let mss = MSS_TABLE.iter().position(|&m| m == self.mss).unwrap_or(0) as u32;
        let ws = self.wscale.map_or(NO_WSCALE, u32::from);
        mss | u32::from(self.sack) << 2 | ws << 3
    }

    fn from_bits(bits: u32) -> Option<CookieOpts> {
        let ws = bits >> 3 & 0xf;
        Some(CookieOpts {
            mss: MSS_TABLE[(bits & 3) as usize],
            sack: bits & 4 != 0,
            wscale: match ws {
                NO_WSCALE => None,
                0..=14 => Some(ws as u8),
                _ => return None,
            },
        })
    }
}

/// Makes and checks SYN cookies under one secret.
#[derive(Debug, Clone)]
pub struct Cookies {
    key: [u64; 2],
}

impl Cookies {
    /// Cookies under a secret: pick it at random per node.
    pub fn new(key: [u64; 2]) -> Cookies {
        Cookies { key }
    }

    fn mac<A: Family>(&self, key: &FlowKey<A>, isn: u32, slot: u64, bits: u32) -> u32 {
        let mut h = SipHasher24::new_with_keys(self.key[0], self.key[1]);
        h.write(key.src.octets_of().as_ref());
        h.write(key.dst.octets_of().as_ref());
        h.write_u16(key.sport);
        h.write_u16(key.dport);
        h.write_u32(isn);
        h.write_u64(slot);
        h.write_u32(bits);
        h.finish() as u32 & MAC_MASK
    }

    /// The cookie for a SYN with `key` (client → VIP) and initial sequence number `isn`.
    pub(crate) fn make<A: Family>(
        &self,
        key: &FlowKey<A>,
        isn: u32,
        now_s: u64,
        opts: CookieOpts,
    ) -> u32 {
        let slot = now_s / COOKIE_SLOT_SECS;
        let bits = opts.bits();
        (slot as u32 & 7) << SLOT_SHIFT | bits << OPT_SHIFT | self.mac(key, isn, slot, bits)
    }

    /// The options a cookie carries, if it is one this node made for `key` and `isn` in the
    /// current or the previous time slot.
    pub(crate) fn check<A: Family>(
        &self,
        key: &FlowKey<A>,
        isn: u32,
        cookie: u32,
        now_s: u64,
    ) -> Option<CookieOpts> {
        let now_slot = now_s / COOKIE_SLOT_SECS;
        let bits = cookie >> OPT_SHIFT & 0x7f;
        let opts = CookieOpts::from_bits(bits)?;
        [Some(now_slot), now_slot.checked_sub(1)]
            .into_iter()
            .flatten()
            .find(|&slot| {
                slot as u32 & 7 == cookie >> SLOT_SHIFT
                    && self.mac(key, isn, slot, bits) == cookie & MAC_MASK
            })
            .map(|_| opts)
    }
}

/// TCP flags as they sit in byte 13 of the header.
pub(crate) mod flags {
    pub(crate) const FIN: u8 = 0x01;
    pub(crate) const SYN: u8 = 0x02;
    pub(crate) const RST: u8 = 0x04;
    pub(crate) const ACK: u8 = 0x10;
}

/// A TCP segment the proxy writes in place of the packet it processes.
#[derive(Debug)]
pub(crate) struct Segment<'a, A> {
    pub(crate) src: A,
    pub(crate) dst: A,
    pub(crate) sport: u16,
    pub(crate) dport: u16,
    pub(crate) seq: u32,
    pub(crate) ack: u32,
    pub(crate) flags: u8,
    pub(crate) window: u16,
    pub(crate) options: &'a [TcpOption<'a>],
    pub(crate) payload: &'a [u8],
}

/// Writes `seg` over the packet in `buf` (an IPv4 header without options or an IPv6 header
/// without extension headers, as the engine checked): the IP header keeps its first bytes
/// (TOS, ID, flow label) and gets the new addresses, length and a TTL of 64; the TCP header is
/// written whole. The L4 checksum is complete, or the pseudo-header sum when `partial` (the
/// packet leaves with checksum offload pending, as it came). Returns the packet's new length,
/// or `None` if it does not fit in `buf`.
pub(crate) fn write_segment<A: Family>(
    buf: &mut [u8],
    partial: bool,
    seg: &Segment<'_, A>,
) -> Option<usize> {
    let l4_start = if A::IS_V6 { 40 } else { 20 };
    let opt_len: usize = seg.options.iter().map(TcpOption::buffer_len).sum();
    let hl = 20 + opt_len.next_multiple_of(4);
    if hl > 60 {
        return None;
    }
    let end = l4_start + hl + seg.payload.len();
    let l4_len = u32::try_from(hl + seg.payload.len()).ok()?;
    let out = buf.get_mut(..end)?;
    let n = seg.src.octets_of().as_ref().len();
    out[A::SRC_OFF..A::SRC_OFF + n].copy_from_slice(seg.src.octets_of().as_ref());
    out[A::DST_OFF..A::DST_OFF + n].copy_from_slice(seg.dst.octets_of().as_ref());
    if A::IS_V6 {
        out[4..6].copy_from_slice(&u16::try_from(l4_len).ok()?.to_be_bytes());
        out[6] = IpProtocol::Tcp.into();
        out[7] = 64;
    } else {
        out[0] = 0x45;
        out[2..4].copy_from_slice(&u16::try_from(end).ok()?.to_be_bytes());
        out[6..8].copy_from_slice(&0x4000u16.to_be_bytes());
        out[8] = 64;
        out[9] = IpProtocol::Tcp.into();
        out[10..12].fill(0);
        let c = !checksum::data(&out[..20]);
        out[10..12].copy_from_slice(&c.to_be_bytes());
    }
    let tcp = &mut out[l4_start..];
    tcp[0..2].copy_from_slice(&seg.sport.to_be_bytes());
    tcp[2..4].copy_from_slice(&seg.dport.to_be_bytes());
    tcp[4..8].copy_from_slice(&seg.seq.to_be_bytes());
    tcp[8..12].copy_from_slice(&seg.ack.to_be_bytes());
    tcp[12] = ((hl / 4) as u8) << 4;
    tcp[13] = seg.flags;
    tcp[14..16].copy_from_slice(&seg.window.to_be_bytes());
    tcp[16..20].fill(0);
    let mut at = 20;
    for opt in seg.options {
        at += opt.emit(&mut tcp[at..]);
    }
    // Pad with end-of-list bytes to the 4-byte boundary.
    tcp[at..hl].fill(0);
    tcp[hl..hl + seg.payload.len()].copy_from_slice(seg.payload);
    let pseudo = A::pseudo_header(seg.src, seg.dst, IpProtocol::Tcp, l4_len);
    let c = if partial {
        pseudo
    } else {
        !checksum::combine(&[pseudo, checksum::data(&tcp[..hl + seg.payload.len()])])
    };
    tcp[16..18].copy_from_slice(&c.to_be_bytes());
    Some(end)
}

/// A window the real server sent, scaled by its `server_ws`, as the client must read it under
/// the proxy's `proxy_ws`: rounded down, at most 65535.
pub(crate) fn rescale_window(window: u16, server_ws: u8, proxy_ws: u8) -> u16 {
    let bytes = u64::from(window) << server_ws.min(14);
    u16::try_from(bytes >> proxy_ws.min(14)).unwrap_or(u16::MAX)
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;

    fn key(sport: u16) -> FlowKey<Ipv4Addr> {
        FlowKey {
            src: Ipv4Addr::new(198, 18, 1, 10),
            dst: Ipv4Addr::new(198, 18, 100, 1),
            sport,
            dport: 80,
            proto: 6,
        }
    }

    const OPTS: CookieOpts = CookieOpts {
        mss: 1460,
        sack: true,
        wscale: Some(7),
    };

    #[test]
    fn test_a_cookie_is_good_for_its_flow_in_its_slot_and_the_next() {
        let jar = Cookies::new([1, 2]);
        let c = jar.make(&key(40000), 1000, 6400, OPTS);
        assert_eq!(jar.check(&key(40000), 1000, c, 6400), Some(OPTS));
        assert_eq!(jar.check(&key(40000), 1000, c, 6400 + 127), Some(OPTS));
        // Too old, another flow, another ISN, another secret, a changed option bit.
        assert_eq!(jar.check(&key(40000), 1000, c, 6400 + 128), None);
        assert_eq!(jar.check(&key(40001), 1000, c, 6400), None);
        assert_eq!(jar.check(&key(40000), 1001, c, 6400), None);
        assert_eq!(Cookies::new([1, 3]).check(&key(40000), 1000, c, 6400), None);
        assert_eq!(jar.check(&key(40000), 1000, c ^ 1 << 23, 6400), None);
        // Not from the future either.
        assert_eq!(jar.check(&key(40000), 1000, c, 6400 - 64), None);
        // The first slot of the clock has no previous one.
        let first = jar.make(&key(40000), 1000, 3, OPTS);
        assert_eq!(jar.check(&key(40000), 1000, first, 5), Some(OPTS));
    }

    #[test]
    fn test_options_round_trip_through_the_cookie() {
        let jar = Cookies::new([7, 9]);
        for mss in MSS_TABLE {
            for sack in [false, true] {
                for wscale in [None, Some(0), Some(9), Some(14)] {
                    let opts = CookieOpts { mss, sack, wscale };
                    let c = jar.make(&key(1), 5, 100, opts);
                    assert_eq!(jar.check(&key(1), 5, c, 100), Some(opts));
                }
            }
        }
    }

    #[test]
    fn test_syn_options_are_rounded_to_the_table() {
        let syn = [2, 4, 0x05, 0xb4, 4, 2, 1, 3, 3, 9];
        assert_eq!(
            CookieOpts::from_syn(&syn, 1460),
            Ok(CookieOpts {
                mss: 1460,
                sack: true,
                wscale: Some(9)
            })
        );
        let small = [2, 4, 0x04, 0xb0]; // 1200
        assert_eq!(CookieOpts::from_syn(&small, 1460).unwrap().mss, 536);
        assert_eq!(CookieOpts::from_syn(&[], 1460).unwrap().mss, 536);
        let big = [2, 4, 0x23, 0x28, 3, 3, 15]; // 9000, wscale 15 → 14
        let o = CookieOpts::from_syn(&big, 1440).unwrap();
        assert_eq!((o.mss, o.wscale), (1440, Some(14)));
        assert!(CookieOpts::from_syn(&[2, 3, 0], 1460).is_err());
    }

    #[test]
    fn test_windows_are_rescaled_rounding_down() {
        assert_eq!(rescale_window(1000, 7, 7), 1000);
        assert_eq!(rescale_window(1000, 9, 7), 4000);
        assert_eq!(rescale_window(1000, 5, 7), 250);
        assert_eq!(rescale_window(65535, 14, 7), u16::MAX);
        assert_eq!(rescale_window(65535, 0, 0), 65535);
    }
}
