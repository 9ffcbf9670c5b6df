//! Local-address (LIP) port allocator for Full-NAT.
//!
//! Every new flow leaves the node with its source rewritten to one of the node's local
//! addresses (LIP) and a local port, so that the backend's reply comes back to this node. This
//! module hands those `LIP:port` pairs out and takes them back.
//!
//! # Guarantees
//!
//! * **Uniqueness.** A port is unique per `(LIP, protocol)`: while it is held (allocated or
//!   reserved, not yet released) it is never handed out again, whatever the concurrency. The
//!   backend side of the flow plays no part; a scheme that reuses one port towards different
//!   backends (unique per 5-tuple) would multiply the capacity, at the price of a lookup keyed
//!   by backend on every allocation, and can come later behind the same API.
//! * **Range.** Only ports inside the configured range are ever handed out or accepted.
//! * **Families.** An IPv6 request only gets an IPv6 LIP and an IPv4 request only an IPv4 one.
//! * **Lock-free, bounded.** Every method is lock-free and takes `&self`; the pool is shared by
//!   all packet workers behind an `Arc`. An allocation visits each bitmap word of each LIP of the
//!   family at most once; in the usual case it succeeds at the first word it looks at, and a LIP
//!   that is full is skipped after one counter load. Nothing loops unboundedly except the retry
//!   of a lost bit race, which only repeats because another thread made progress.
//! * **Completeness.** Without concurrent callers, [`LocalAddrPool::allocate`] returns `None`
//!   only when every port of every LIP of the family is held. With concurrent callers on an
//!   almost full pool it may return `None` while another thread is freeing a port: a single
//!   bounded pass is preferred to chasing ports that move.
//! * **Accounting.** [`LocalAddrPool::usage`] is exact whenever no call is in flight, and
//!   otherwise off by at most the number of calls in flight.
//! * **No panics**, on any input.
//! * **Changing LIPs.** [`LocalAddrPool::with_lips`] builds the pool for a new set of LIPs. A LIP
//!   kept shares its port spaces with the old pool (behind an `Arc`), so a worker still using the
//!   old pool claims and frees ports in the very same bitmaps. A LIP removed while some of its
//!   ports are held stays *retired*: its ports can still be released but are no longer handed
//!   out or reserved, and if it comes back it comes back with them. A retired LIP with no port
//!   held is forgotten at the next change. One race remains: a worker still on the pool before a
//!   change may take a port on a LIP that the change found idle and forgot; if that LIP is added
//!   back while the flow lives, its port may be handed out twice (only a flow to the same
//!   backend port would then collide, and its session insert fails).
//!
//! # Design
//!
//! Each `(LIP, protocol)` owns a bitmap over the port range, one bit per port, in atomic
//! 64-bit words; a count of held ports; and a cursor naming the word where the next search
//! starts. The cursor only moves forward when its word fills up, so a port released behind it
//! is not reused until the cursor has gone all the way round: a backend that still holds the
//! old connection in `TIME_WAIT` is then unlikely to see the same 4-tuple again soon.

use std::fmt;
use std::net::IpAddr;
use std::ops::RangeInclusive;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

/// Transport protocols that own separate port spaces.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum L4Proto {
    /// TCP.
    Tcp,
    /// UDP.
    Udp,
}

impl L4Proto {
    /// Every protocol, in the order [`LocalAddrPool::usage`] reports them.
    pub const ALL: [Self; 2] = [Self::Tcp, Self::Udp];

    /// The position in [`Self::ALL`].
    pub fn index(self) -> usize {
        match self {
            L4Proto::Tcp => 0,
            L4Proto::Udp => 1,
        }
    }

    /// The other protocol.
    pub fn other(self) -> Self {
        match self {
            L4Proto::Tcp => L4Proto::Udp,
            L4Proto::Udp => L4Proto::Tcp,
        }
    }

    /// The IP protocol number.
    pub fn number(self) -> u8 {
        match self {
            Self::Tcp => 6,
            Self::Udp => 17,
        }
    }
}

/// A local address and port, as a session holds it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct LocalAddr {
    /// One of the node's local addresses (LIP).
    pub ip: IpAddr,
    /// A port inside the pool's range.
    pub port: u16,
}

/// How many ports of one `(LIP, protocol)` are held.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct LipUsage {
    /// The local address.
    pub ip: IpAddr,
    /// The protocol whose port space this row describes.
    pub proto: L4Proto,
    /// Ports currently allocated or reserved.
    pub in_use: u32,
    /// Ports in the pool's range.
    pub capacity: u32,
}

/// Why a [`LocalAddrPool`] cannot be built.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum LocalAddrError {
    /// The port range holds no port.
    #[error("local port range {start}..={end} is empty")]
    EmptyPortRange {
        /// First port of the range.
        start: u16,
        /// Last port of the range.
        end: u16,
    },
    /// The port range includes port 0, which no packet can carry as a source port.
    #[error("local port range {start}..={end} includes port 0, which cannot be a source port")]
    PortZero {
        /// First port of the range.
        start: u16,
        /// Last port of the range.
        end: u16,
    },
    /// No local address was given, so no flow could ever be forwarded.
    #[error("no local address (LIP) configured")]
    NoLocalAddress,
    /// The same local address appears twice.
    #[error("local address {0} is listed more than once")]
    DuplicateLip(IpAddr),
    /// `0.0.0.0` or `::` cannot be a packet's source.
    #[error("local address {0} is unspecified and cannot be a source address")]
    UnspecifiedLip(IpAddr),
    /// A multicast address cannot be a packet's source.
    #[error("local address {0} is multicast and cannot be a source address")]
    MulticastLip(IpAddr),
    /// `255.255.255.255` cannot be a packet's source.
    #[error("local address {0} is the IPv4 broadcast address and cannot be a source address")]
    BroadcastLip(IpAddr),
    /// An IPv4-mapped IPv6 address would put an IPv4 LIP in the IPv6 family.
    #[error("local address {0} is IPv4-mapped; configure it as a plain IPv4 address")]
    MappedLip(IpAddr),
}

/// The ports of one `(LIP, protocol)`.
struct PortSpace {
    /// Bit `i` set means port `range.start + i` is held. Bits past the end of the range are set
    /// from the start and never cleared, so a search never needs to mask the last word.
    words: Box<[AtomicU64]>,
    /// Held ports, plus transiently the calls in flight on this space. Every call raises it
    /// before it sets a bit and lowers it after it clears one, so it never drops below the
    /// number of set bits (no wrap-around) and it can serve as an admission check.
    in_use: AtomicU32,
    /// Word where the next search starts; only ever stored below `words.len()`.
    cursor: AtomicU32,
}

impl PortSpace {
    fn new(len: u32) -> Self {
        let full_words = len / 64;
        let tail_bits = len % 64;
        let mut words: Vec<AtomicU64> = (0..full_words).map(|_| AtomicU64::new(0)).collect();
        if tail_bits != 0 {
            words.push(AtomicU64::new(u64::MAX << tail_bits));
        }
        Self {
            words: words.into_boxed_slice(),
            in_use: AtomicU32::new(0),
            cursor: AtomicU32::new(0),
        }
    }

    /// Claims a free bit and returns its index. `rot` picks where in a word the search for a
    /// zero bit starts, so that concurrent callers with different hints tend to go for
    /// different bits of the same word instead of fighting over the lowest one.
    fn claim_any(&self, capacity: u32, rot: u32) -> Option<u32> {
        // A plain load first keeps a full space from bouncing its counter's cache line.
        if self.in_use.load(Ordering::Relaxed) >= capacity {
            return None;
        }
        if self.in_use.fetch_add(1, Ordering::Relaxed) >= capacity {
            self.in_use.fetch_sub(1, Ordering::Relaxed);
            return None;
        }
        let found = self.scan(rot);
        if found.is_none() {
            self.in_use.fetch_sub(1, Ordering::Relaxed);
        }
        found
    }

    fn scan(&self, rot: u32) -> Option<u32> {
        let n = self.words.len();
        let start = self.cursor.load(Ordering::Relaxed) as usize % n.max(1);
        let mut i = start;
        for _ in 0..n {
            let word = &self.words[i];
            let mut seen = word.load(Ordering::Relaxed);
            while seen != u64::MAX {
                let bit = (seen.rotate_right(rot).trailing_ones() + rot) % 64;
                let mask = 1u64 << bit;
                // fetch_or rather than compare_exchange: a change to some other bit of the
                // word does not make the claim fail, only losing this very bit does.
                // AcqRel orders the counter raise before the bit for whoever clears it.
                let before = word.fetch_or(mask, Ordering::AcqRel);
                if before & mask == 0 {
                    let next = if i + 1 == n { 0 } else { i + 1 };
                    if before | mask == u64::MAX {
                        self.cursor.store(next as u32, Ordering::Relaxed);
                    } else if i != start {
                        self.cursor.store(i as u32, Ordering::Relaxed);
                    }
                    return Some(i as u32 * 64 + bit);
                }
                seen = before;
            }
            i = if i + 1 == n { 0 } else { i + 1 };
        }
        None
    }

    /// Sets bit `idx` if it is clear; false if it was already set.
    fn claim(&self, idx: u32) -> bool {
        let Some(word) = self.words.get((idx / 64) as usize) else {
            return false;
        };
        let mask = 1u64 << (idx % 64);
        self.in_use.fetch_add(1, Ordering::Relaxed);
        if word.fetch_or(mask, Ordering::AcqRel) & mask == 0 {
            true
        } else {
            self.in_use.fetch_sub(1, Ordering::Relaxed);
            false
        }
    }

    /// Clears bit `idx` if it is set; false if it was already clear.
    fn unclaim(&self, idx: u32) -> bool {
        let Some(word) = self.words.get((idx / 64) as usize) else {
            return false;
        };
        let mask = 1u64 << (idx % 64);
        if word.fetch_and(!mask, Ordering::AcqRel) & mask == 0 {
            return false;
        }
        self.in_use.fetch_sub(1, Ordering::Relaxed);
        true
    }
}

/// One local address with its per-protocol port spaces.
struct Lip {
    ip: IpAddr,
    tcp: PortSpace,
    udp: PortSpace,
}

impl Lip {
    fn new(ip: IpAddr, capacity: u32) -> Self {
        Self {
            ip,
            tcp: PortSpace::new(capacity),
            udp: PortSpace::new(capacity),
        }
    }

    /// Whether any port of either protocol is held (or being claimed).
    fn is_held(&self) -> bool {
        L4Proto::ALL
            .iter()
            .any(|&proto| self.space(proto).in_use.load(Ordering::Relaxed) > 0)
    }

    fn space(&self, proto: L4Proto) -> &PortSpace {
        match proto {
            L4Proto::Tcp => &self.tcp,
            L4Proto::Udp => &self.udp,
        }
    }
}

/// The node's local addresses and their ports.
///
/// `Send + Sync`, shared by all packet workers behind an `Arc`; every method takes `&self`.
pub struct LocalAddrPool {
    /// Sorted by address, which puts every IPv4 LIP before every IPv6 one.
    lips: Box<[Arc<Lip>]>,
    /// LIPs removed while some of their ports were held: [`Self::release`] still frees those.
    retired: Box<[Arc<Lip>]>,
    /// Index of the first IPv6 LIP in `lips`.
    v6_start: usize,
    first_port: u16,
    last_port: u16,
    /// Ports per `(LIP, protocol)`.
    capacity: u32,
}

impl fmt::Debug for LocalAddrPool {
    // The bitmaps run to thousands of words; addresses and range say what the pool is.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LocalAddrPool")
            .field("lips", &self.lips().collect::<Vec<_>>())
            .field("ports", &self.port_range())
            .finish_non_exhaustive()
    }
}

impl LocalAddrPool {
    /// The ports above the well-known range.
    pub const DEFAULT_PORTS: RangeInclusive<u16> = 1024..=65535;

    /// Builds a pool over `lips`, each with its own TCP and UDP port space covering `ports`.
    pub fn new(lips: &[IpAddr], ports: RangeInclusive<u16>) -> Result<Self, LocalAddrError> {
        let (first_port, last_port) = (*ports.start(), *ports.end());
        // `is_empty` also catches a range already iterated to its end, whose bounds look fine.
        if ports.is_empty() {
            return Err(LocalAddrError::EmptyPortRange {
                start: first_port,
                end: last_port,
            });
        }
        if first_port == 0 {
            return Err(LocalAddrError::PortZero {
                start: first_port,
                end: last_port,
            });
        }
        if lips.is_empty() {
            return Err(LocalAddrError::NoLocalAddress);
        }
        let sorted = checked_lips(lips)?;
        let capacity = u32::from(last_port - first_port) + 1;
        let v6_start = sorted.partition_point(IpAddr::is_ipv4);
        Ok(Self {
            lips: sorted
                .into_iter()
                .map(|ip| Arc::new(Lip::new(ip, capacity)))
                .collect(),
            retired: Box::default(),
            v6_start,
            first_port,
            last_port,
            capacity,
        })
    }

    /// The pool for a new set of LIPs, over the same port range, for a change of the node's
    /// LIPs at run time (see the module doc: kept LIPs keep their held ports, removed ones retire,
    /// new ones start with every port free). The LIPs are checked as [`Self::new`] checks them,
    /// but an empty list is accepted: a node whose LIPs were all taken away must stop using them,
    /// and with none left every allocation returns `None`.
    pub fn with_lips(&self, lips: &[IpAddr]) -> Result<Self, LocalAddrError> {
        let sorted = checked_lips(lips)?;
        let known = |ip: IpAddr| {
            self.lip(ip)
                .or_else(|| self.retired.iter().find(|lip| lip.ip == ip))
                .cloned()
        };
        let retired = self
            .lips
            .iter()
            .chain(self.retired.iter())
            .filter(|lip| sorted.binary_search(&lip.ip).is_err() && lip.is_held())
            .cloned()
            .collect();
        let v6_start = sorted.partition_point(IpAddr::is_ipv4);
        Ok(Self {
            lips: sorted
                .into_iter()
                .map(|ip| known(ip).unwrap_or_else(|| Arc::new(Lip::new(ip, self.capacity))))
                .collect(),
            retired,
            v6_start,
            first_port: self.first_port,
            last_port: self.last_port,
            capacity: self.capacity,
        })
    }

    /// The ports every LIP offers, per protocol.
    pub fn port_range(&self) -> RangeInclusive<u16> {
        self.first_port..=self.last_port
    }

    /// Picks a free port on one of the LIPs of the same family as `v6` says (false = IPv4).
    ///
    /// `hint` spreads flows over LIPs and ports (pass a flow hash): its high bits choose the
    /// first LIP tried, its low bits where in a bitmap word the search starts. O(1) in the
    /// usual case. `None` when every port of every LIP of that family is in use (the caller
    /// counts the drop).
    pub fn allocate(&self, proto: L4Proto, v6: bool, hint: u64) -> Option<LocalAddr> {
        let family = if v6 {
            self.lips.get(self.v6_start..)?
        } else {
            self.lips.get(..self.v6_start)?
        };
        let n = family.len();
        // Multiply-shift maps the hint onto 0..n without the bias or the cost of a modulo.
        let first = ((u128::from(hint) * n as u128) >> 64) as usize;
        let rot = (hint % 64) as u32;
        for k in 0..n {
            let lip = &family[(first + k) % n];
            if let Some(idx) = lip.space(proto).claim_any(self.capacity, rot) {
                return Some(LocalAddr {
                    ip: lip.ip,
                    port: self.port_of(idx)?,
                });
            }
        }
        None
    }

    /// Marks a specific LIP:port as used, for a session installed from a peer; false if the
    /// address is not one of ours, the port is outside the range, or it is already in use.
    pub fn reserve(&self, proto: L4Proto, addr: LocalAddr) -> bool {
        self.locate(addr)
            .is_some_and(|(lip, idx)| lip.space(proto).claim(idx))
    }

    /// Frees a port, also on a retired LIP. Releasing an address that is not ours or not in use
    /// is a no-op returning false.
    pub fn release(&self, proto: L4Proto, addr: LocalAddr) -> bool {
        let Some(idx) = self.index_of(addr.port) else {
            return false;
        };
        self.lip(addr.ip)
            .or_else(|| self.retired.iter().find(|lip| lip.ip == addr.ip))
            .is_some_and(|lip| lip.space(proto).unclaim(idx))
    }

    /// Whether `ip` is one of the pool's LIPs.
    pub fn is_local(&self, ip: IpAddr) -> bool {
        self.lip(ip).is_some()
    }

    /// The LIPs, IPv4 first, each family in ascending order.
    pub fn lips(&self) -> impl Iterator<Item = IpAddr> + '_ {
        self.lips.iter().map(|lip| lip.ip)
    }

    /// One row per `(LIP, protocol)`, in the order of [`Self::lips`] then [`L4Proto::ALL`].
    pub fn usage(&self) -> Vec<LipUsage> {
        self.lips
            .iter()
            .flat_map(|lip| {
                L4Proto::ALL.map(|proto| LipUsage {
                    ip: lip.ip,
                    proto,
                    // Calls in flight may push the count past capacity for a moment.
                    in_use: lip
                        .space(proto)
                        .in_use
                        .load(Ordering::Relaxed)
                        .min(self.capacity),
                    capacity: self.capacity,
                })
            })
            .collect()
    }

    fn lip(&self, ip: IpAddr) -> Option<&Arc<Lip>> {
        let at = self.lips.binary_search_by(|lip| lip.ip.cmp(&ip)).ok()?;
        self.lips.get(at)
    }

    /// The bit index of `port`, if it is in the range.
    fn index_of(&self, port: u16) -> Option<u32> {
        self.port_range()
            .contains(&port)
            .then(|| u32::from(port - self.first_port))
    }

    /// The LIP and bit index of `addr`, if both are ours.
    fn locate(&self, addr: LocalAddr) -> Option<(&Lip, u32)> {
        Some((self.lip(addr.ip)?, self.index_of(addr.port)?))
    }

    fn port_of(&self, idx: u32) -> Option<u16> {
        u16::try_from(u32::from(self.first_port) + idx)
            .ok()
            .filter(|&port| port <= self.last_port)
    }
}

/// `lips` sorted, once each checked as a source address, without duplicates.
fn checked_lips(lips: &[IpAddr]) -> Result<Vec<IpAddr>, LocalAddrError> {
    for &ip in lips {
        check_lip(ip)?;
    }
    let mut sorted = lips.to_vec();
    sorted.sort_unstable();
    if let Some(pair) = sorted.windows(2).find(|pair| pair[0] == pair[1]) {
        return Err(LocalAddrError::DuplicateLip(pair[0]));
    }
    Ok(sorted)
}

fn check_lip(ip: IpAddr) -> Result<(), LocalAddrError> {
    if ip.is_unspecified() {
        return Err(LocalAddrError::UnspecifiedLip(ip));
    }
    if ip.is_multicast() {
        return Err(LocalAddrError::MulticastLip(ip));
    }
    match ip {
        IpAddr::V4(v4) if v4.is_broadcast() => Err(LocalAddrError::BroadcastLip(ip)),
        IpAddr::V6(v6) if v6.to_ipv4_mapped().is_some() => Err(LocalAddrError::MappedLip(ip)),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashSet;
    use std::net::{Ipv4Addr, Ipv6Addr};

    fn v4(last: u8) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(10, 0, 0, last))
    }

    fn v6(last: u16) -> IpAddr {
        IpAddr::V6(Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, last))
    }

    /// SplitMix64: spreads a counter over all 64 bits, as a flow hash would.
    fn mix(mut x: u64) -> u64 {
        x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
        x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        x ^ (x >> 31)
    }

    fn in_use(pool: &LocalAddrPool, ip: IpAddr, proto: L4Proto) -> u32 {
        pool.usage()
            .into_iter()
            .find(|row| row.ip == ip && row.proto == proto)
            .map_or(u32::MAX, |row| row.in_use)
    }

    #[test]
    fn rejects_bad_configuration() {
        let ok = [v4(1)];
        assert_eq!(
            LocalAddrPool::new(&ok, RangeInclusive::new(2000, 1999)).unwrap_err(),
            LocalAddrError::EmptyPortRange {
                start: 2000,
                end: 1999
            }
        );
        assert_eq!(
            LocalAddrPool::new(&ok, 0..=100).unwrap_err(),
            LocalAddrError::PortZero { start: 0, end: 100 }
        );
        assert_eq!(
            LocalAddrPool::new(&[], LocalAddrPool::DEFAULT_PORTS).unwrap_err(),
            LocalAddrError::NoLocalAddress
        );
        let cases = [
            (
                vec![v4(1), v6(1), v4(1)],
                LocalAddrError::DuplicateLip(v4(1)),
            ),
            (
                vec![IpAddr::V4(Ipv4Addr::UNSPECIFIED)],
                LocalAddrError::UnspecifiedLip(IpAddr::V4(Ipv4Addr::UNSPECIFIED)),
            ),
            (
                vec![IpAddr::V6(Ipv6Addr::UNSPECIFIED)],
                LocalAddrError::UnspecifiedLip(IpAddr::V6(Ipv6Addr::UNSPECIFIED)),
            ),
            (
                vec![IpAddr::V4(Ipv4Addr::new(224, 0, 0, 1))],
                LocalAddrError::MulticastLip(IpAddr::V4(Ipv4Addr::new(224, 0, 0, 1))),
            ),
            (
                vec![IpAddr::V6(Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1))],
                LocalAddrError::MulticastLip(IpAddr::V6(Ipv6Addr::new(
                    0xff02, 0, 0, 0, 0, 0, 0, 1,
                ))),
            ),
            (
                vec![IpAddr::V4(Ipv4Addr::BROADCAST)],
                LocalAddrError::BroadcastLip(IpAddr::V4(Ipv4Addr::BROADCAST)),
            ),
            (
                vec![IpAddr::V6(Ipv4Addr::new(10, 0, 0, 1).to_ipv6_mapped())],
                LocalAddrError::MappedLip(IpAddr::V6(Ipv4Addr::new(10, 0, 0, 1).to_ipv6_mapped())),
            ),
        ];
        for (lips, err) in cases {
            assert_eq!(
                LocalAddrPool::new(&lips, LocalAddrPool::DEFAULT_PORTS).unwrap_err(),
                err
            );
        }
        let mut spent = 9..=9;
        spent.next();
        assert_eq!(
            LocalAddrPool::new(&ok, spent).unwrap_err(),
            LocalAddrError::EmptyPortRange { start: 9, end: 9 }
        );
        // Single-port and full ranges are both fine.
        assert!(LocalAddrPool::new(&ok, 7..=7).is_ok());
        assert!(LocalAddrPool::new(&ok, 1..=65535).is_ok());
    }

    #[test]
    fn error_messages_name_the_problem() {
        assert_eq!(
            LocalAddrError::DuplicateLip(v4(3)).to_string(),
            "local address 10.0.0.3 is listed more than once"
        );
        assert!(
            LocalAddrError::PortZero { start: 0, end: 9 }
                .to_string()
                .contains("port 0")
        );
    }

    #[test]
    fn exhausts_then_reuses_the_released_port() {
        let pool = LocalAddrPool::new(&[v4(1)], 1024..=1100).unwrap();
        let mut seen = HashSet::new();
        for i in 0..77 {
            let addr = pool.allocate(L4Proto::Tcp, false, mix(i)).unwrap();
            assert_eq!(addr.ip, v4(1));
            assert!((1024..=1100).contains(&addr.port), "{addr:?}");
            assert!(
                seen.insert(addr.port),
                "port {} handed out twice",
                addr.port
            );
        }
        assert_eq!(
            pool.usage(),
            vec![
                LipUsage {
                    ip: v4(1),
                    proto: L4Proto::Tcp,
                    in_use: 77,
                    capacity: 77
                },
                LipUsage {
                    ip: v4(1),
                    proto: L4Proto::Udp,
                    in_use: 0,
                    capacity: 77
                },
            ]
        );
        assert_eq!(pool.allocate(L4Proto::Tcp, false, 42), None);
        let freed = LocalAddr {
            ip: v4(1),
            port: 1063,
        };
        assert!(pool.release(L4Proto::Tcp, freed));
        assert_eq!(in_use(&pool, v4(1), L4Proto::Tcp), 76);
        assert_eq!(pool.allocate(L4Proto::Tcp, false, 7), Some(freed));
        assert_eq!(pool.allocate(L4Proto::Tcp, false, 8), None);
        // The other protocol has its own port space.
        assert!(pool.allocate(L4Proto::Udp, false, 9).is_some());
    }

    #[test]
    fn reserve_and_release_semantics() {
        let pool = LocalAddrPool::new(&[v4(1), v6(1)], 5000..=5099).unwrap();
        let at = |ip, port| LocalAddr { ip, port };
        assert!(pool.reserve(L4Proto::Udp, at(v6(1), 5000)));
        assert!(!pool.reserve(L4Proto::Udp, at(v6(1), 5000)), "already held");
        assert!(
            pool.reserve(L4Proto::Tcp, at(v6(1), 5000)),
            "other protocol"
        );
        assert!(!pool.reserve(L4Proto::Udp, at(v4(2), 5001)), "not our LIP");
        assert!(!pool.reserve(L4Proto::Udp, at(v4(1), 4999)), "below range");
        assert!(!pool.reserve(L4Proto::Udp, at(v4(1), 5100)), "above range");
        assert_eq!(in_use(&pool, v6(1), L4Proto::Udp), 1);

        assert!(!pool.release(L4Proto::Udp, at(v4(2), 5000)), "not our LIP");
        assert!(!pool.release(L4Proto::Udp, at(v6(1), 5001)), "not held");
        assert!(
            !pool.release(L4Proto::Udp, at(v6(1), 65535)),
            "out of range"
        );
        assert!(pool.release(L4Proto::Udp, at(v6(1), 5000)));
        assert!(
            !pool.release(L4Proto::Udp, at(v6(1), 5000)),
            "double release"
        );
        assert_eq!(in_use(&pool, v6(1), L4Proto::Udp), 0);
        assert_eq!(in_use(&pool, v6(1), L4Proto::Tcp), 1);

        // A reserved port is never allocated.
        let single = LocalAddrPool::new(&[v4(1)], 3000..=3001).unwrap();
        assert!(single.reserve(L4Proto::Tcp, at(v4(1), 3000)));
        assert_eq!(
            single.allocate(L4Proto::Tcp, false, 0),
            Some(at(v4(1), 3001))
        );
        assert_eq!(single.allocate(L4Proto::Tcp, false, 0), None);
    }

    #[test]
    fn families_are_kept_apart() {
        let only_v4 = LocalAddrPool::new(&[v4(1), v4(2)], 1024..=1030).unwrap();
        assert_eq!(only_v4.allocate(L4Proto::Tcp, true, 1), None);
        let only_v6 = LocalAddrPool::new(&[v6(1)], 1024..=1030).unwrap();
        assert_eq!(only_v6.allocate(L4Proto::Tcp, false, 1), None);

        let mixed = LocalAddrPool::new(&[v6(2), v4(1), v6(1), v4(2)], 1024..=1030).unwrap();
        assert_eq!(
            mixed.lips().collect::<Vec<_>>(),
            vec![v4(1), v4(2), v6(1), v6(2)]
        );
        for i in 0..14 {
            assert!(
                mixed
                    .allocate(L4Proto::Tcp, true, mix(i))
                    .unwrap()
                    .ip
                    .is_ipv6()
            );
        }
        assert_eq!(mixed.allocate(L4Proto::Tcp, true, 99), None);
        // The IPv6 LIPs running dry leaves the IPv4 ones untouched.
        assert!(
            mixed
                .allocate(L4Proto::Tcp, false, 99)
                .unwrap()
                .ip
                .is_ipv4()
        );
        assert!(mixed.is_local(v6(2)) && mixed.is_local(v4(1)));
        assert!(!mixed.is_local(v4(3)) && !mixed.is_local(v6(3)));
    }

    #[test]
    fn with_lips_keeps_kept_lips_and_retires_removed_ones() {
        let at = |ip, port| LocalAddr { ip, port };
        let old = LocalAddrPool::new(&[v4(1), v4(2)], 4000..=4000).unwrap();
        assert_eq!(old.allocate(L4Proto::Tcp, false, 0), Some(at(v4(1), 4000)));

        // v4(1) is kept with its held port, v4(3) is new and empty, v4(2) (idle) is dropped.
        let new = old.with_lips(&[v4(3), v4(1)]).unwrap();
        assert_eq!(new.port_range(), 4000..=4000);
        assert_eq!(new.lips().collect::<Vec<_>>(), vec![v4(1), v4(3)]);
        assert!(!new.reserve(L4Proto::Tcp, at(v4(1), 4000)), "still held");
        assert!(new.reserve(L4Proto::Tcp, at(v4(3), 4000)));
        assert_eq!(new.allocate(L4Proto::Tcp, false, 0), None);
        // Both pools share the kept LIP's bitmap: a release through the old one frees it here.
        assert!(old.release(L4Proto::Tcp, at(v4(1), 4000)));
        assert_eq!(new.allocate(L4Proto::Tcp, false, 0), Some(at(v4(1), 4000)));
        assert!(!new.is_local(v4(2)) && !new.release(L4Proto::Tcp, at(v4(2), 4000)));

        // v4(1) leaves with a port held: it retires, no longer offered but still releasable.
        let only3 = new.with_lips(&[v4(3)]).unwrap();
        assert!(!only3.is_local(v4(1)));
        assert!(!only3.reserve(L4Proto::Udp, at(v4(1), 4000)));
        assert_eq!(only3.usage().len(), 2, "{:?}", only3.usage());
        // Back again before its flow ended: the port is still held, not handed out twice.
        let back = only3.with_lips(&[v4(1), v4(3)]).unwrap();
        assert!(!back.reserve(L4Proto::Tcp, at(v4(1), 4000)));
        assert!(only3.release(L4Proto::Tcp, at(v4(1), 4000)));
        assert!(
            !only3.release(L4Proto::Tcp, at(v4(1), 4000)),
            "double release"
        );
        assert!(back.reserve(L4Proto::Tcp, at(v4(1), 4000)));
        assert!(back.release(L4Proto::Tcp, at(v4(1), 4000)));

        // A retired LIP whose last port is back is forgotten at the next change.
        let idle = only3.with_lips(&[v4(3)]).unwrap();
        let none = idle.with_lips(&[]).unwrap();
        assert!(none.retired.iter().all(|lip| lip.ip != v4(1)));
        assert_eq!(none.lips().count(), 0);
        assert_eq!(none.allocate(L4Proto::Tcp, false, 0), None);
        assert_eq!(none.allocate(L4Proto::Udp, true, 0), None);
        assert!(
            none.release(L4Proto::Tcp, at(v4(3), 4000)),
            "v4(3) retired while held"
        );
    }

    #[test]
    fn with_lips_rejects_what_new_rejects_but_an_empty_list() {
        let pool = LocalAddrPool::new(&[v4(1)], 1024..=1030).unwrap();
        assert_eq!(
            pool.with_lips(&[v4(2), v4(2)]).unwrap_err(),
            LocalAddrError::DuplicateLip(v4(2))
        );
        assert_eq!(
            pool.with_lips(&[v4(2), IpAddr::V4(Ipv4Addr::BROADCAST)])
                .unwrap_err(),
            LocalAddrError::BroadcastLip(IpAddr::V4(Ipv4Addr::BROADCAST))
        );
        assert!(pool.with_lips(&[]).is_ok());
    }

    #[test]
    fn hints_spread_flows_over_lips() {
        let lips: Vec<_> = (1..=4).map(v4).collect();
        let pool = LocalAddrPool::new(&lips, LocalAddrPool::DEFAULT_PORTS).unwrap();
        for i in 0..4000 {
            pool.allocate(L4Proto::Tcp, false, mix(i)).unwrap();
        }
        for ip in lips {
            let used = in_use(&pool, ip, L4Proto::Tcp);
            assert!((800..=1200).contains(&used), "{ip}: {used} of 4000");
        }
    }

    #[test]
    fn exhaustion_falls_over_to_the_next_lip() {
        let pool = LocalAddrPool::new(&[v4(1), v4(2)], 1024..=1033).unwrap();
        // Same hint every time: the first LIP fills up, then the second takes over.
        let mut ports = HashSet::new();
        for _ in 0..20 {
            assert!(ports.insert(pool.allocate(L4Proto::Udp, false, 5).unwrap()));
        }
        assert_eq!(pool.allocate(L4Proto::Udp, false, 5), None);
        assert!(
            pool.usage()
                .iter()
                .filter(|r| r.proto == L4Proto::Udp)
                .all(|r| r.in_use == 10)
        );
    }

    #[test]
    fn debug_is_short() {
        let pool = LocalAddrPool::new(&[v4(1)], LocalAddrPool::DEFAULT_PORTS).unwrap();
        let text = format!("{pool:?}");
        assert!(
            text.contains("10.0.0.1") && text.contains("1024..=65535"),
            "{text}"
        );
        assert!(text.len() < 200, "{text}");
    }

    #[derive(Debug, Clone)]
    enum Op {
        Allocate {
            proto: L4Proto,
            v6: bool,
            hint: u64,
        },
        Reserve {
            proto: L4Proto,
            lip: usize,
            port: u16,
        },
        Release {
            proto: L4Proto,
            lip: usize,
            port: u16,
        },
    }

    fn op() -> impl Strategy<Value = Op> {
        let proto = prop_oneof![Just(L4Proto::Tcp), Just(L4Proto::Udp)];
        // Index 3 is not one of the pool's LIPs; ports stray outside every range used.
        prop_oneof![
            4 => (proto.clone(), any::<bool>(), any::<u64>())
                .prop_map(|(proto, v6, hint)| Op::Allocate { proto, v6, hint }),
            1 => (proto.clone(), 0..4usize, 990..1200u16)
                .prop_map(|(proto, lip, port)| Op::Reserve { proto, lip, port }),
            2 => (proto, 0..4usize, 990..1200u16)
                .prop_map(|(proto, lip, port)| Op::Release { proto, lip, port }),
        ]
    }

    proptest! {
        #[test]
        fn matches_a_set_model(
            first in 1000..1010u16,
            len in 1..140u16,
            ops in prop::collection::vec(op(), 1..400),
        ) {
            let ips = [v4(1), v4(2), v6(1), v4(9)];
            let range = first..=first + len - 1;
            let pool = LocalAddrPool::new(&ips[..3], range.clone()).unwrap();
            let mut held: HashSet<(L4Proto, LocalAddr)> = HashSet::new();
            for op in ops {
                match op {
                    Op::Allocate { proto, v6, hint } => {
                        let family: Vec<_> = ips[..3].iter().filter(|ip| ip.is_ipv6() == v6).collect();
                        let free = family.iter().any(|&&ip| {
                            range.clone().any(|port| !held.contains(&(proto, LocalAddr { ip, port })))
                        });
                        match pool.allocate(proto, v6, hint) {
                            Some(addr) => {
                                prop_assert!(free);
                                prop_assert_eq!(addr.ip.is_ipv6(), v6);
                                prop_assert!(range.contains(&addr.port));
                                prop_assert!(held.insert((proto, addr)), "{:?} handed out twice", addr);
                            }
                            None => prop_assert!(!free, "None with a free port"),
                        }
                    }
                    Op::Reserve { proto, lip, port } => {
                        let addr = LocalAddr { ip: ips[lip], port };
                        let expect = lip < 3 && range.contains(&port) && !held.contains(&(proto, addr));
                        prop_assert_eq!(pool.reserve(proto, addr), expect);
                        if expect {
                            held.insert((proto, addr));
                        }
                    }
                    Op::Release { proto, lip, port } => {
                        let addr = LocalAddr { ip: ips[lip], port };
                        prop_assert_eq!(pool.release(proto, addr), held.remove(&(proto, addr)));
                    }
                }
                for row in pool.usage() {
                    let count = held.iter().filter(|(p, a)| *p == row.proto && a.ip == row.ip).count();
                    prop_assert_eq!(row.in_use as usize, count);
                    prop_assert_eq!(row.capacity, u32::from(len));
                }
            }
        }
    }

    #[test]
    fn concurrent_churn_never_hands_out_a_held_port() {
        const FIRST: u16 = 2000;
        const PORTS: usize = 150;
        const THREADS: u64 = 4;
        let lips = [v4(1), v4(2)];
        let pool = LocalAddrPool::new(&lips, FIRST..=FIRST + PORTS as u16 - 1).unwrap();
        // Our own record of what is held, one bit per (LIP, port), set by whoever holds it.
        let held: Vec<AtomicU64> = (0..2 * PORTS).map(|_| AtomicU64::new(0)).collect();
        let slot = |addr: LocalAddr| {
            let lip = lips.iter().position(|&ip| ip == addr.ip).unwrap();
            &held[lip * PORTS + usize::from(addr.port - FIRST)]
        };
        let exhausted = AtomicU64::new(0);
        std::thread::scope(|s| {
            for t in 0..THREADS {
                let (pool, slot, exhausted) = (&pool, &slot, &exhausted);
                s.spawn(move || {
                    let mut mine = Vec::new();
                    for i in 0..100_000u64 {
                        let r = mix(t << 32 | i);
                        // Lean towards allocating so that the pool runs full now and then.
                        if r % 8 < 5 || mine.is_empty() {
                            match pool.allocate(L4Proto::Tcp, false, r) {
                                Some(addr) => {
                                    let before = slot(addr).swap(1, Ordering::AcqRel);
                                    assert_eq!(before, 0, "{addr:?} handed out while held");
                                    mine.push(addr);
                                }
                                None => {
                                    exhausted.fetch_add(1, Ordering::Relaxed);
                                }
                            }
                        } else {
                            let addr = mine.swap_remove((r >> 8) as usize % mine.len());
                            // Our record first: once the pool has it back, someone else may
                            // take it at once.
                            assert_eq!(slot(addr).swap(0, Ordering::AcqRel), 1);
                            assert!(pool.release(L4Proto::Tcp, addr), "{addr:?} not held");
                        }
                    }
                    for addr in mine {
                        assert_eq!(slot(addr).swap(0, Ordering::AcqRel), 1);
                        assert!(pool.release(L4Proto::Tcp, addr));
                    }
                });
            }
        });
        assert!(
            exhausted.load(Ordering::Relaxed) > 0,
            "the pool never ran full"
        );
        assert!(
            pool.usage().iter().all(|row| row.in_use == 0),
            "{:?}",
            pool.usage()
        );
        // Everything came back: the pool is whole again.
        let mut all = HashSet::new();
        while let Some(addr) = pool.allocate(L4Proto::Tcp, false, all.len() as u64) {
            assert!(all.insert(addr));
        }
        assert_eq!(all.len(), 2 * PORTS);
    }
}
