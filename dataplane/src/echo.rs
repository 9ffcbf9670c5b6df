//! Echo requests (ping) to a VIP are answered by the node (issue 17, item 5).
//!
//! Decisions:
//! * Answered when the destination is the VIP of a configured service (any port or protocol),
//!   as IPVS answers because the VIP is a local address there; monitoring pings VIPs. An echo
//!   request to any other address routed into the node (a LIP, …) is dropped as
//!   `echo_not_vip`.
//! * The reply is built in place: addresses swapped, TTL or hop limit [`REPLY_TTL`], type echo
//!   reply (code 0), checksum recomputed over the message (ICMPv6: with the pseudo-header of
//!   the swapped addresses); identifier, sequence number and data as they came. The engine
//!   returns [`Verdict::Reply`](crate::Verdict::Reply): the I/O layer writes it back into the
//!   kernel, which routes it to the client like any packet leaving the node.
//! * Rate-limited by one token bucket per engine, shared by every worker: [`ECHO_RATE`]
//!   replies a second with bursts of [`ECHO_BURST`], so a ping flood costs the node bounded
//!   work and the node never answers more than it is asked. Requests over the rate are dropped
//!   as `echo_rate_limited`; answered ones are counted as `echo_replied`.
//! * Not answered: a request from an unspecified, broadcast or multicast source (`malformed`:
//!   nobody to answer), a fragmented request (`fragment`: the engine does not reassemble), an
//!   IPv6 request after extension headers (`icmp_unsupported`: a routing header would make the
//!   swapped addresses wrong).

use std::net::{Ipv4Addr, Ipv6Addr};

use parking_lot::Mutex;

use crate::time::Instant;
use crate::wire::{Icmpv4Message, Icmpv4Packet, Icmpv6Message, Icmpv6Packet, IpProtocol, checksum};
use crate::wire::{Ipv4Packet, Ipv6Packet};

/// Echo replies a second, over all workers.
pub const ECHO_RATE: u64 = 1000;
/// Replies that may go out back to back after a quiet time.
pub const ECHO_BURST: u64 = 100;
/// TTL or hop limit of a reply (Linux's default).
pub const REPLY_TTL: u8 = 64;

const NANOS_PER_REPLY: u64 = 1_000_000_000 / ECHO_RATE;

/// The token bucket, in nanoseconds of credit: a reply costs [`NANOS_PER_REPLY`], time adds
/// credit up to a burst's worth.
#[derive(Debug)]
pub(crate) struct EchoLimiter {
    bucket: Mutex<Bucket>,
}

#[derive(Debug)]
struct Bucket {
    credit: u64,
    last: u64,
}

impl EchoLimiter {
    pub(crate) fn new() -> Self {
        EchoLimiter {
            bucket: Mutex::new(Bucket {
                credit: ECHO_BURST * NANOS_PER_REPLY,
                last: 0,
            }),
        }
    }

    /// Takes one reply's credit; false when there is none. Workers' clocks may be a moment
    /// apart: an earlier `now` than the last adds nothing.
    pub(crate) fn allow(&self, now: Instant) -> bool {
        let now = now.as_nanos();
        let mut b = self.bucket.lock();
        let elapsed = now.saturating_sub(b.last);
        b.last = b.last.max(now);
        b.credit = b
            .credit
            .saturating_add(elapsed)
            .min(ECHO_BURST * NANOS_PER_REPLY);
        if b.credit < NANOS_PER_REPLY {
            return false;
        }
        b.credit -= NANOS_PER_REPLY;
        true
    }
}

/// Whether a request from `src` may be answered.
pub(crate) fn answerable_v4(src: Ipv4Addr) -> bool {
    !(src.is_unspecified() || src.is_broadcast() || src.is_multicast())
}

pub(crate) fn answerable_v6(src: Ipv6Addr) -> bool {
    !(src.is_unspecified() || src.is_multicast())
}

/// Turns the echo request in `packet` (an IPv4 header without options, then the ICMP message
/// up to `end`) into its reply.
pub(crate) fn reply_v4(packet: &mut [u8], l4_start: usize, end: usize) {
    let mut ip = Ipv4Packet::new_unchecked(&mut packet[..l4_start]);
    let (src, dst) = (ip.src_addr(), ip.dst_addr());
    ip.set_src_addr(dst);
    ip.set_dst_addr(src);
    ip.set_hop_limit(REPLY_TTL);
    ip.fill_checksum();
    let mut msg = Icmpv4Packet::new_unchecked(&mut packet[l4_start..end]);
    msg.set_msg_type(Icmpv4Message::EchoReply);
    msg.set_msg_code(0);
    msg.fill_checksum();
}

/// Turns the ICMPv6 echo request in `packet` (the fixed IPv6 header, then the message up to
/// `end`) into its reply.
pub(crate) fn reply_v6(packet: &mut [u8], l4_start: usize, end: usize) {
    let mut ip = Ipv6Packet::new_unchecked(&mut packet[..l4_start]);
    let (src, dst) = (ip.src_addr(), ip.dst_addr());
    ip.set_src_addr(dst);
    ip.set_dst_addr(src);
    ip.set_hop_limit(REPLY_TTL);
    let len = u32::try_from(end - l4_start).unwrap_or(u32::MAX);
    let mut msg = Icmpv6Packet::new_unchecked(&mut packet[l4_start..end]);
    msg.set_msg_type(Icmpv6Message::EchoReply);
    msg.set_msg_code(0);
    msg.fill_checksum(checksum::pseudo_header_v6(
        &dst,
        &src,
        IpProtocol::Icmpv6,
        len,
    ));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_bucket_burst_then_rate() {
        let l = EchoLimiter::new();
        let t = Instant::from_secs(100);
        for _ in 0..ECHO_BURST {
            assert!(l.allow(t));
        }
        assert!(!l.allow(t));
        // One reply's worth of time later, one more.
        let t = Instant::from_nanos(t.as_nanos() + NANOS_PER_REPLY);
        assert!(l.allow(t));
        assert!(!l.allow(t));
        // An earlier clock from another worker adds nothing.
        assert!(!l.allow(Instant::from_secs(99)));
        // A long quiet time refills a burst, not more.
        let t = Instant::from_secs(200);
        for _ in 0..ECHO_BURST {
            assert!(l.allow(t));
        }
        assert!(!l.allow(t));
    }
}
