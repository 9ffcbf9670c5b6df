//! Internet checksum arithmetic (RFC 1071) and incremental updates (RFC 1624).
//!
//! Sums here are *folded* 16-bit ones'-complement sums and are never complemented unless the
//! name says so; a header's checksum field holds the complement of the sum over the data it
//! covers. No function panics in release builds; [`update_bytes`] and its relatives
//! debug-assert their length contract.
//!
//! # Which zero
//!
//! Ones'-complement arithmetic has two zeros, `0x0000` (+0) and `0xFFFF` (-0). A folded sum is
//! +0 only when every byte summed is zero, so a real header's sum is never +0 and its checksum
//! field is never `0xFFFF` — except for UDP, which sends a computed `0x0000` as `0xFFFF`
//! because `0x0000` means "no checksum" over IPv4 (RFC 768).
//!
//! The incremental updates produce exactly the value a full recompute would, with one
//! exception RFC 1624 §3 calls out: if every byte the checksum covers becomes zero, a
//! recompute gives `0xFFFF` and the update gives `0x0000`. The inputs of an update cannot
//! tell the two apart (Linux's `csum_replace*` behaves the same). The case cannot arise for
//! TCP, UDP, ICMPv6 or IPv4 headers, whose covered data always includes a non-zero protocol
//! number or version; it can for an ICMPv4 Echo Reply whose every byte is zero.

use std::net::{Ipv4Addr, Ipv6Addr};

use super::IpProtocol;

/// Folds a wide ones'-complement accumulator to 16 bits (end-around carry).
///
/// The result is zero only if `sum` is zero, which is what keeps +0 out of real sums.
const fn fold(mut sum: u64) -> u16 {
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
}

/// Adds two 64-bit words in ones'-complement arithmetic.
///
/// 2^64 ≡ 1 (mod 2^16 − 1), so a 64-bit end-around carry folds to the same 16-bit sum as
/// adding the four 16-bit words separately.
const fn add64(acc: u64, word: u64) -> u64 {
    let (sum, carry) = acc.overflowing_add(word);
    // Cannot overflow: after a carry `sum` is at most 2^64 - 2.
    sum + carry as u64
}

/// Ones'-complement sum of `data` read as big-endian 16-bit words, folded, not complemented.
///
/// An odd trailing byte is the high byte of a word whose low byte is zero.
pub fn data(data: &[u8]) -> u16 {
    // Eight bytes per step: 64 KiB segments are summed on the packet path.
    let (words, rest) = data.as_chunks::<8>();
    let mut acc = 0u64;
    for word in words {
        acc = add64(acc, u64::from_be_bytes(*word));
    }
    // `rest` starts at a multiple of 8: it is the zero-padded last word, assembled from direct
    // reads (copying it into a buffer and reading that back stalls on store forwarding, which
    // shows on every 20-byte IPv4 header).
    let (four, rest) = rest
        .split_first_chunk::<4>()
        .map_or((0, rest), |(w, r)| (u32::from_be_bytes(*w), r));
    let (two, rest) = rest
        .split_first_chunk::<2>()
        .map_or((0, rest), |(w, r)| (u16::from_be_bytes(*w), r));
    let one = rest.first().copied().unwrap_or(0);
    let tail = (u64::from(four) << 32) | (u64::from(two) << 16) | (u64::from(one) << 8);
    acc = add64(acc, tail);
    fold(acc)
}

/// Ones'-complement sum of already folded sums, e.g. a pseudo-header sum and a payload sum.
pub fn combine(sums: &[u16]) -> u16 {
    // u64 holds 2^48 u16 values without overflow; no slice gets that long.
    fold(sums.iter().map(|&s| u64::from(s)).sum())
}

/// Sum of the IPv4 pseudo-header (RFC 793 / RFC 768): addresses, protocol and the
/// upper-layer length, folded and not complemented.
pub fn pseudo_header_v4(src: &Ipv4Addr, dst: &Ipv4Addr, proto: IpProtocol, length: u32) -> u16 {
    let src = u32::from_be_bytes(src.octets());
    let dst = u32::from_be_bytes(dst.octets());
    let acc = u64::from(src) + u64::from(dst) + u64::from(u8::from(proto)) + u64::from(length);
    fold(acc)
}

/// Sum of the IPv6 pseudo-header (RFC 8200 §8.1), folded and not complemented.
pub fn pseudo_header_v6(src: &Ipv6Addr, dst: &Ipv6Addr, proto: IpProtocol, length: u32) -> u16 {
    let src = u128::from_be_bytes(src.octets());
    let dst = u128::from_be_bytes(dst.octets());
    let mut acc = 0u64;
    for addr in [src, dst] {
        acc = add64(acc, (addr >> 64) as u64);
        acc = add64(acc, addr as u64);
    }
    acc = add64(acc, u64::from(u8::from(proto)));
    acc = add64(acc, u64::from(length));
    fold(acc)
}

/// Updates checksum field `check` after the 16-bit word `old` became `new`
/// (RFC 1624 eqn. 3: `HC' = ~(~HC + ~m + m')`).
///
/// See the module documentation for the single case (all covered data zero) where the result
/// is `0x0000` rather than `0xFFFF`. For UDP use [`update_udp`], which keeps the "no checksum"
/// and `0xFFFF` conventions.
pub fn update_word(check: u16, old: u16, new: u16) -> u16 {
    !fold(u64::from(!check) + u64::from(!old) + u64::from(new))
}

/// Updates checksum field `check` after the bytes `old` were replaced by `new` (an address,
/// a port pair, …), as repeated [`update_word`].
///
/// The run must start at an even offset of the checksummed data, and `old` and `new` should
/// have the same even length (asserted in debug builds). Otherwise, in release builds, each
/// is summed on its own as big-endian words with an odd tail byte zero-padded; the result is
/// then exact only if that padding matches where the bytes really sit.
pub fn update_bytes(check: u16, old: &[u8], new: &[u8]) -> u16 {
    debug_assert!(old.len() == new.len() && old.len().is_multiple_of(2));
    !fold(u64::from(!check) + u64::from(!data(old)) + u64::from(data(new)))
}

/// [`update_bytes`] for a UDP checksum field: `0` ("no checksum", IPv4 only) stays `0`, and a
/// result of `0` is sent as `0xFFFF`, so the output equals a full recompute by
/// [`super::udp::Packet::fill_checksum`].
pub fn update_udp(check: u16, old: &[u8], new: &[u8]) -> u16 {
    if check == 0 {
        return 0;
    }
    match update_bytes(check, old, new) {
        0 => 0xffff,
        updated => updated,
    }
}

/// Updates a field holding a *not complemented* partial sum — the pseudo-header sum a sender
/// leaves in the checksum field for checksum offload (virtio-net `NEEDS_CSUM`, Linux
/// `CHECKSUM_PARTIAL`) — after the bytes `old` became `new`: `S' = S + ~old + new`.
///
/// The same length and alignment rules as [`update_bytes`] apply. The result equals the
/// partial sum recomputed from the new pseudo-header.
pub fn update_partial(partial: u16, old: &[u8], new: &[u8]) -> u16 {
    debug_assert!(old.len() == new.len() && old.len().is_multiple_of(2));
    fold(u64::from(partial) + u64::from(!data(old)) + u64::from(data(new)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// RFC 1071 the slow way, as the oracle for the fast path.
    fn reference(bytes: &[u8]) -> u16 {
        let mut acc = 0u32;
        for pair in bytes.chunks(2) {
            let hi = u32::from(pair[0]) << 8;
            let lo = pair.get(1).map_or(0, |&b| u32::from(b));
            acc += hi | lo;
            acc = (acc & 0xffff) + (acc >> 16);
        }
        acc as u16
    }

    #[test]
    fn test_rfc1071_example() {
        // RFC 1071 §3: the words 0001 f203 f4f5 f6f7 sum to ddf2.
        let bytes = [0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7];
        assert_eq!(data(&bytes), 0xddf2);
    }

    #[test]
    fn test_odd_length() {
        assert_eq!(data(&[0xab]), 0xab00);
        assert_eq!(data(&[0x12, 0x34, 0x56]), 0x6834);
    }

    #[test]
    fn test_empty_and_zero() {
        assert_eq!(data(&[]), 0);
        assert_eq!(data(&[0; 64]), 0);
        // A non-zero input never folds to +0.
        assert_eq!(data(&[0xff, 0xff, 0x00, 0x00]), 0xffff);
    }

    #[test]
    fn test_large_input_carries() {
        let bytes = vec![0xffu8; 65_536 + 7];
        assert_eq!(data(&bytes), reference(&bytes));
    }

    #[test]
    fn test_combine() {
        assert_eq!(combine(&[]), 0);
        assert_eq!(combine(&[0xffff, 0x0001]), 0x0001);
        assert_eq!(combine(&[0x8000, 0x8000]), 0x0001);
    }

    #[test]
    fn test_pseudo_header_v4() {
        let src = Ipv4Addr::new(192, 168, 0, 1);
        let dst = Ipv4Addr::new(192, 168, 0, 199);
        let mut bytes = Vec::new();
        bytes.extend_from_slice(&src.octets());
        bytes.extend_from_slice(&dst.octets());
        bytes.extend_from_slice(&[0, 17, 0x00, 0x20]);
        assert_eq!(
            pseudo_header_v4(&src, &dst, IpProtocol::Udp, 0x20),
            reference(&bytes)
        );
    }

    #[test]
    fn test_pseudo_header_v6() {
        let src: Ipv6Addr = "2001:db8::1".parse().unwrap();
        let dst: Ipv6Addr = "fe80::ffff:1234".parse().unwrap();
        let mut bytes = Vec::new();
        bytes.extend_from_slice(&src.octets());
        bytes.extend_from_slice(&dst.octets());
        bytes.extend_from_slice(&0x0001_0004u32.to_be_bytes());
        bytes.extend_from_slice(&[0, 0, 0, 6]);
        assert_eq!(
            pseudo_header_v6(&src, &dst, IpProtocol::Tcp, 0x0001_0004),
            reference(&bytes)
        );
    }

    #[test]
    fn test_update_word_rfc1624_example() {
        // RFC 1624 §4: HC = 0xdd2f, m = 0x5555 -> m' = 0x3285 gives HC' = 0x0000.
        assert_eq!(update_word(0xdd2f, 0x5555, 0x3285), 0x0000);
    }

    #[test]
    fn test_update_udp_keeps_no_checksum() {
        assert_eq!(update_udp(0, &[1, 2], &[3, 4]), 0);
    }

    #[test]
    fn test_update_all_zero_data_gives_plus_zero() {
        // Data [0x0001] -> [0x0000]: recompute says 0xffff, RFC 1624 eqn. 3 says 0x0000.
        let check = !data(&[0, 1]);
        assert_eq!(update_word(check, 0x0001, 0x0000), 0x0000);
        assert_eq!(!data(&[0, 0]), 0xffff);
    }

    /// The checksum a sender would put in the field for `covered` (field zeroed).
    fn full(covered: &[u8]) -> u16 {
        !data(covered)
    }

    /// Compares an updated checksum with a recompute: exact, except that ±0 are accepted as
    /// equal when every covered byte is zero, the only case RFC 1624 §3 leaves open.
    fn same_checksum(updated: u16, covered: &[u8]) -> bool {
        let recomputed = full(covered);
        if covered.iter().all(|&b| b == 0) {
            updated == 0x0000 || updated == 0xffff
        } else {
            updated == recomputed
        }
    }

    /// A UDP datagram over IPv4, as the bytes a NAT rewrites: pseudo-header addresses then
    /// the UDP header and payload, with the checksum at `UDP_CHECK`.
    const ADDRS: usize = 8;
    const UDP_PORTS: usize = ADDRS;
    const UDP_CHECK: usize = ADDRS + 6;

    fn udp_fill(bytes: &mut [u8]) {
        // Covered data = addresses + (0, 17) + UDP length + the UDP datagram itself.
        bytes[UDP_CHECK..UDP_CHECK + 2].fill(0);
        let udp_len = (bytes.len() - ADDRS) as u32;
        let sum = combine(&[data(bytes), 17, fold(u64::from(udp_len))]);
        let check = match !sum {
            0 => 0xffff,
            c => c,
        };
        bytes[UDP_CHECK..UDP_CHECK + 2].copy_from_slice(&check.to_be_bytes());
    }

    fn udp_check(bytes: &[u8]) -> u16 {
        u16::from_be_bytes([bytes[UDP_CHECK], bytes[UDP_CHECK + 1]])
    }

    // Total checksum property cases: 4 × 250_000 + 100_000 = 1_100_000.
    proptest! {
        #![proptest_config(super::super::proptest_config(100_000))]

        #[test]
        fn prop_data_matches_reference(raw in any::<[u64; 10]>(), len in 0usize..=80) {
            let bytes = bytes_of(&raw, len);
            prop_assert_eq!(data(&bytes), reference(&bytes));
        }
    }

    /// Random bytes drawn as a few wide integers: proptest's per-element cost dominates
    /// these cheap properties, and a million cases must fit the debug-build time budget.
    fn bytes_of(words: &[u64], len: usize) -> Vec<u8> {
        words
            .iter()
            .flat_map(|w| w.to_be_bytes())
            .take(len)
            .collect()
    }

    proptest! {
        #![proptest_config(super::super::proptest_config(250_000))]

        #[test]
        fn prop_update_word_matches_recompute(
            raw in any::<[u64; 6]>(),
            len in 1usize..24,
            index in any::<prop::sample::Index>(),
            new in any::<u16>(),
            zero_rest in any::<bool>(),
        ) {
            let mut words: Vec<u16> = bytes_of(&raw, 2 * len)
                .chunks(2)
                .map(|p| u16::from_be_bytes([p[0], p[1]]))
                .collect();
            if zero_rest {
                // Drive the ±0 corner: every other word zero, so `new == 0` zeroes everything.
                words.iter_mut().for_each(|w| *w = 0);
                words[0] = 1;
            }
            let i = if zero_rest { 0 } else { index.index(words.len()) };
            let before: Vec<u8> = words.iter().flat_map(|w| w.to_be_bytes()).collect();
            let old = words[i];
            words[i] = new;
            let after: Vec<u8> = words.iter().flat_map(|w| w.to_be_bytes()).collect();
            let updated = update_word(full(&before), old, new);
            prop_assert!(same_checksum(updated, &after), "{updated:#06x} vs {:#06x}", full(&after));
        }

        #[test]
        fn prop_update_bytes_matches_recompute(
            raw in any::<[u64; 8]>(),
            total in 16usize..=64,
            at in any::<prop::sample::Index>(),
            new in any::<u128>(),
            len in prop::sample::select(vec![2usize, 4, 16]),
        ) {
            let bytes = bytes_of(&raw, total);
            let new = new.to_be_bytes();
            let mut after = bytes.clone();
            // Replace a port (2), IPv4 address (4) or IPv6 address (16) at an even offset.
            let start = at.index((bytes.len() - len) / 2 + 1) * 2;
            after[start..start + len].copy_from_slice(&new[..len]);
            let updated = update_bytes(full(&bytes), &bytes[start..start + len], &new[..len]);
            prop_assert!(same_checksum(updated, &after), "{updated:#06x} vs {:#06x}", full(&after));
        }

        #[test]
        fn prop_update_udp_matches_recompute(
            raw in any::<[u64; 5]>(),
            payload_len in 2usize..40,
            addrs in any::<u64>(),
            ports in any::<u32>(),
            new_addr in any::<u32>(),
            new_port in any::<u16>(),
            mode in 0u8..4,
        ) {
            let (new_addr, new_port) = (new_addr.to_be_bytes(), new_port.to_be_bytes());
            // Layout: src, dst | sport, dport, len, check | payload (first word is a fix-up).
            let mut before = Vec::new();
            before.extend_from_slice(&addrs.to_be_bytes());
            before.extend_from_slice(&ports.to_be_bytes());
            let udp_len = (8 + payload_len) as u16;
            before.extend_from_slice(&udp_len.to_be_bytes());
            before.extend_from_slice(&[0, 0]);
            before.extend_from_slice(&bytes_of(&raw, payload_len));
            let mut after = before.clone();
            after[0..4].copy_from_slice(&new_addr);
            after[UDP_PORTS..UDP_PORTS + 2].copy_from_slice(&new_port);
            // Even offset, so the fix-up is one aligned word even for odd payload lengths.
            let fixup = ADDRS + 8;
            if mode == 1 || mode == 2 {
                // Force the sum to -0 before (1) or after (2) the rewrite, so the computed
                // checksum is 0 and goes on the wire as 0xffff.
                let target = if mode == 1 { &mut before } else { &mut after };
                target[fixup..fixup + 2].fill(0);
                let sum = combine(&[data(target), 17, udp_len]);
                let word = (!sum).to_be_bytes();
                before[fixup..fixup + 2].copy_from_slice(&word);
                after[fixup..fixup + 2].copy_from_slice(&word);
            }
            udp_fill(&mut before);
            udp_fill(&mut after);
            if mode == 1 {
                prop_assert_eq!(udp_check(&before), 0xffff);
            }
            if mode == 2 {
                prop_assert_eq!(udp_check(&after), 0xffff);
            }
            if mode == 3 {
                // IPv4 sender chose "no checksum": the rewrite must not invent one.
                before[UDP_CHECK..UDP_CHECK + 2].fill(0);
                after[UDP_CHECK..UDP_CHECK + 2].fill(0);
            }
            let mut check = udp_check(&before);
            check = update_udp(check, &before[0..4], &new_addr);
            check = update_udp(check, &before[UDP_PORTS..UDP_PORTS + 2], &new_port);
            prop_assert_eq!(check, udp_check(&after));
        }

        #[test]
        fn prop_update_partial_matches_pseudo_header(
            src in any::<u128>(),
            dst in any::<u128>(),
            new_src in any::<u128>(),
            length in any::<u16>(),
            v6 in any::<bool>(),
            tcp in any::<bool>(),
        ) {
            let proto = if tcp { IpProtocol::Tcp } else { IpProtocol::Udp };
            let length = u32::from(length);
            let (partial, expected, old, new) = if v6 {
                let (s, d, n) = (Ipv6Addr::from(src), Ipv6Addr::from(dst), Ipv6Addr::from(new_src));
                (
                    pseudo_header_v6(&s, &d, proto, length),
                    pseudo_header_v6(&n, &d, proto, length),
                    s.octets().to_vec(),
                    n.octets().to_vec(),
                )
            } else {
                let (s, d, n) = (Ipv4Addr::from(src as u32), Ipv4Addr::from(dst as u32), Ipv4Addr::from(new_src as u32));
                (
                    pseudo_header_v4(&s, &d, proto, length),
                    pseudo_header_v4(&n, &d, proto, length),
                    s.octets().to_vec(),
                    n.octets().to_vec(),
                )
            };
            // Partial sums contain a non-zero protocol, so the comparison is exact.
            prop_assert_eq!(update_partial(partial, &old, &new), expected);
        }
    }
}
