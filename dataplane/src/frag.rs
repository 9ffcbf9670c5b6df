//! IP fragments: later fragments follow the translation of their datagram's first fragment.
//!
//! Decisions (issue 17, item 4):
//! * **Tracking, not reassembly.** Only the first fragment carries the TCP or UDP ports, so it
//!   alone can be looked up; it is translated like any packet of its flow (a first UDP fragment
//!   may open the flow) and its new addresses are recorded under the datagram's identity
//!   (source, destination, protocol, IP identification; RFC 791 and RFC 8200 key reassembly on
//!   the same). Later fragments get only their IP addresses rewritten (and the IPv4 header
//!   checksum). This is exact for Full-NAT: the L4 checksum covers the whole datagram, and the
//!   incremental update the first fragment's checksum gets for the new addresses and ports is
//!   the right update for the reassembled datagram, because the rest of it does not change.
//!   Reassembly would have to send the datagram on in pieces again (the kernel forwards an
//!   oversized IPv6 packet from the TUN device as "packet too big", not refragmented), hold up
//!   to 64 KiB per datagram, and break one packet in, one packet out; tracking holds one small
//!   entry per datagram in flight and leaves reassembly to the receiver, as a router does.
//! * **Fragments before their first are dropped**, counted as `fragment_untracked`: holding
//!   them would need buffers and a way to send two packets for one. Linux sends fragments in
//!   order and the lab's paths keep it; a reordering path loses those datagrams (the sender's
//!   retry or the application copes, as with any loss).
//! * **Bounded in memory**: one table per address family of [`FRAG_SLOTS`] entries, allocated
//!   when the engine is built, shared by all workers (the kernel may hand the fragments of one
//!   datagram to different TUN queues) under a lock that fragments alone take. A datagram's
//!   entry is found within [`FRAG_PROBES`] slots of its (seeded) hash; a first fragment that
//!   finds none free is dropped as `fragment_table_full`.
//! * **Bounded in time**: an entry lives [`FRAG_TIMEOUT`] after its first fragment; a later
//!   fragment after that is dropped as `fragment_expired`. An entry is freed as soon as the
//!   fragments seen add up to the datagram's length, so the table holds only datagrams in
//!   flight. A datagram whose fragments would end past 65,535 bytes is `malformed`.
//! * The IP identification is not rewritten (as the kernel's own NAT does not): two datagrams
//!   that the translation maps onto the same address pair with the same identification at the
//!   same moment could be confused by the receiver's reassembly, which the identification's
//!   per-destination allocation makes rare.
//! * Later fragments do not refresh their session or count in the real server's traffic: the
//!   first fragment did, for the datagram.
//! * A first fragment never gets a TOA option (it would change a length the later fragments
//!   rely on) and its L4 checksum is not verified (it covers bytes the engine never sees; the
//!   receiver checks it after reassembly).

use std::net::{Ipv4Addr, Ipv6Addr};
use std::time::Duration;

use parking_lot::Mutex;

use crate::counters::DropReason;
use crate::family::Family;
use crate::tcp_state::Direction;
use crate::time::Instant;

/// Entries per address family: datagrams in flight through the node at once.
pub const FRAG_SLOTS: usize = 4096;
/// Slots looked at for one datagram: bounds the work per fragment.
pub const FRAG_PROBES: usize = 8;
/// How long a datagram's later fragments follow its first (Linux gives reassembly 30 s; a
/// fragment seconds behind its first is lost in practice).
pub const FRAG_TIMEOUT: Duration = Duration::from_secs(5);
/// No datagram is longer than the IP total length field allows.
const MAX_DATAGRAM: u32 = 65_535;

/// Which datagram a fragment belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct FragKey<A> {
    pub(crate) src: A,
    pub(crate) dst: A,
    pub(crate) proto: u8,
    pub(crate) ident: u32,
}

/// Where a fragment is in its datagram: `offset` and `len` count the bytes after the IP
/// header (and after the IPv6 Fragment header).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct FragPos {
    pub(crate) offset: u32,
    pub(crate) len: u32,
    pub(crate) more: bool,
}

impl FragPos {
    fn end(self) -> Result<u32, DropReason> {
        let end = self.offset + self.len;
        if end > MAX_DATAGRAM {
            return Err(DropReason::Malformed);
        }
        Ok(end)
    }
}

/// The translation a datagram's later fragments follow.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Follow<A> {
    pub(crate) src: A,
    pub(crate) dst: A,
    pub(crate) dir: Direction,
}

#[derive(Debug, Clone, Copy)]
struct Entry<A> {
    key: FragKey<A>,
    follow: Follow<A>,
    /// Nanoseconds on the engine's clock.
    expires: u64,
    /// Fragment bytes seen so far.
    seen: u32,
    /// The datagram's length, once its last fragment was seen.
    total: Option<u32>,
}

/// The fragment table of one address family.
#[derive(Debug)]
pub(crate) struct FragTable<A> {
    slots: Box<[Option<Entry<A>>]>,
    seed: u64,
}

impl<A: Family> FragTable<A> {
    fn new(seed: u64) -> Self {
        FragTable {
            slots: vec![None; FRAG_SLOTS].into_boxed_slice(),
            seed,
        }
    }

    fn probes(&self, key: &FragKey<A>) -> impl Iterator<Item = usize> {
        let (src, dst) = (key.src.octets_of(), key.dst.octets_of());
        let (src, dst) = (src.as_ref(), dst.as_ref());
        let mut bytes = [0u8; 37];
        let n = src.len();
        bytes[..n].copy_from_slice(src);
        bytes[n..2 * n].copy_from_slice(dst);
        bytes[2 * n] = key.proto;
        bytes[2 * n + 1..2 * n + 5].copy_from_slice(&key.ident.to_be_bytes());
        let hash = xxhash_rust::xxh3::xxh3_64_with_seed(&bytes[..2 * n + 5], self.seed);
        // FRAG_SLOTS is a power of two: the mask keeps the index in the table.
        let start = hash as usize;
        (0..FRAG_PROBES).map(move |i| start.wrapping_add(i) & (FRAG_SLOTS - 1))
    }

    /// Whether a first fragment of `key` would find a slot now.
    pub(crate) fn has_room(&self, key: &FragKey<A>, now: Instant) -> bool {
        let now = now.as_nanos();
        self.probes(key).any(|i| match &self.slots[i] {
            None => true,
            Some(e) => e.key == *key || e.expires <= now,
        })
    }

    /// Records a translated first fragment; a datagram with the same identity before it (the
    /// identification wrapped, or a retransmission) is replaced.
    pub(crate) fn track(
        &mut self,
        key: FragKey<A>,
        pos: FragPos,
        follow: Follow<A>,
        now: Instant,
    ) -> Result<(), DropReason> {
        pos.end()?;
        let now_ns = now.as_nanos();
        let mut free = None;
        for i in self.probes(&key) {
            match &self.slots[i] {
                Some(e) if e.key == key => {
                    free = Some(i);
                    break;
                }
                Some(e) if e.expires > now_ns => {}
                _ => {
                    free.get_or_insert(i);
                }
            }
        }
        let i = free.ok_or(DropReason::FragmentTableFull)?;
        self.slots[i] = Some(Entry {
            key,
            follow,
            expires: now.saturating_add(FRAG_TIMEOUT).as_nanos(),
            seen: pos.len,
            total: None,
        });
        Ok(())
    }

    /// The translation of a later fragment; frees the entry once its datagram is complete.
    pub(crate) fn follow(
        &mut self,
        key: &FragKey<A>,
        pos: FragPos,
        now: Instant,
    ) -> Result<Follow<A>, DropReason> {
        let end = pos.end()?;
        let i = self
            .probes(key)
            .find(|&i| self.slots[i].as_ref().is_some_and(|e| e.key == *key))
            .ok_or(DropReason::FragmentUntracked)?;
        let slot = &mut self.slots[i];
        let e = slot.as_mut().ok_or(DropReason::FragmentUntracked)?;
        if e.expires <= now.as_nanos() {
            *slot = None;
            return Err(DropReason::FragmentExpired);
        }
        e.seen = e.seen.saturating_add(pos.len);
        if !pos.more {
            e.total = Some(end);
        }
        let follow = e.follow;
        // Complete (a duplicate may make it look so early; its stragglers are then untracked).
        if e.total.is_some_and(|t| e.seen >= t) {
            *slot = None;
        }
        Ok(follow)
    }
}

/// The fragment tables of both families.
#[derive(Debug)]
pub(crate) struct Fragments {
    pub(crate) v4: Mutex<FragTable<Ipv4Addr>>,
    pub(crate) v6: Mutex<FragTable<Ipv6Addr>>,
}

impl Fragments {
    pub(crate) fn new(seed: u64) -> Self {
        Fragments {
            v4: Mutex::new(FragTable::new(seed)),
            v6: Mutex::new(FragTable::new(seed)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 10);
    const B: Ipv4Addr = Ipv4Addr::new(198, 18, 100, 1);

    fn key(ident: u32) -> FragKey<Ipv4Addr> {
        FragKey {
            src: A,
            dst: B,
            proto: 17,
            ident,
        }
    }

    fn follow() -> Follow<Ipv4Addr> {
        Follow {
            src: B,
            dst: A,
            dir: Direction::Inbound,
        }
    }

    fn pos(offset: u32, len: u32, more: bool) -> FragPos {
        FragPos { offset, len, more }
    }

    #[test]
    fn test_complete_datagram_frees_its_entry() {
        let mut t = FragTable::new(1);
        let now = Instant::from_secs(10);
        t.track(key(1), pos(0, 1480, true), follow(), now).unwrap();
        assert!(t.follow(&key(1), pos(1480, 1480, true), now).is_ok());
        assert!(t.follow(&key(1), pos(2960, 48, false), now).is_ok());
        assert_eq!(
            t.follow(&key(1), pos(2960, 48, false), now).unwrap_err(),
            DropReason::FragmentUntracked
        );
        assert!(t.slots.iter().all(Option::is_none));
    }

    #[test]
    fn test_last_before_middle_keeps_the_entry() {
        let mut t = FragTable::new(1);
        let now = Instant::from_secs(10);
        t.track(key(1), pos(0, 1480, true), follow(), now).unwrap();
        assert!(t.follow(&key(1), pos(2960, 48, false), now).is_ok());
        assert!(t.follow(&key(1), pos(1480, 1480, true), now).is_ok());
        assert!(t.slots.iter().all(Option::is_none));
    }

    #[test]
    fn test_oversized_datagram_is_malformed() {
        let mut t = FragTable::new(1);
        let now = Instant::from_secs(10);
        t.track(key(1), pos(0, 1480, true), follow(), now).unwrap();
        assert_eq!(
            t.follow(&key(1), pos(65_528, 16, false), now).unwrap_err(),
            DropReason::Malformed
        );
    }

    #[test]
    fn test_probe_window_full_then_expired_slots_are_reused() {
        let mut t = FragTable::new(7);
        let now = Instant::from_secs(10);
        let mut refused = 0;
        for ident in 0..(2 * FRAG_SLOTS as u32) {
            match t.track(key(ident), pos(0, 8, true), follow(), now) {
                Ok(()) => {}
                Err(DropReason::FragmentTableFull) => refused += 1,
                Err(e) => panic!("{e:?}"),
            }
        }
        // Never more datagrams than slots; most slots are used before a probe window is full.
        assert!(refused >= FRAG_SLOTS, "{refused}");
        let used = t.slots.iter().filter(|s| s.is_some()).count();
        assert!(used > FRAG_SLOTS * 3 / 4, "{used}");
        let later = now.saturating_add(FRAG_TIMEOUT);
        assert!(t.has_room(&key(u32::MAX), later));
        t.track(key(u32::MAX), pos(0, 8, true), follow(), later)
            .unwrap();
    }
}
