//! The virtio-net header (`struct virtio_net_hdr`, 10 bytes) that a TUN device with
//! `IFF_VNET_HDR` puts in front of every packet, and what it tells the engine about checksums.
//!
//! Read side (kernel → us), per TESTBED "TUN with virtio-net offloads":
//! * `NEEDS_CSUM`: checksum offload is pending; the L4 checksum field holds the pseudo-header
//!   partial sum → [`L4Checksum::Partial`] (the engine adds address differences without
//!   complementing and leaves port changes to whoever completes the sum from `csum_start`).
//! * `DATA_VALID`: the kernel has verified a complete checksum → [`L4Checksum::Verified`].
//! * neither: a complete checksum nobody checked → [`L4Checksum::Unverified`].
//!
//! Write side (us → kernel): the header goes back as it came. Full-NAT rewrites addresses and
//! ports in place and never changes the length of the IP header, so `csum_start` (the offset of
//! the L4 header), `csum_offset`, `gso_type` and `gso_size` keep their meaning. The one length
//! change the engine makes is a TOA option inserted into a SYN ([`fix_after_rewrite`]): it sits
//! *after* the checksum field, so `csum_start`/`csum_offset` stay right; for a non-GSO packet
//! `hdr_len` is only a hint the kernel checks against the packet length (`hdr_len <= len`),
//! which growth keeps true; for a GSO packet (the kernel never segments a SYN, but nothing is
//! assumed) `hdr_len` must cover the whole TCP header, so it grows by the same amount.

use dataplane::L4Checksum;

/// Size of `struct virtio_net_hdr` (without the `num_buffers` of the mergeable variant).
pub(crate) const VNET_HDR_LEN: usize = 10;

/// `VIRTIO_NET_HDR_F_NEEDS_CSUM`.
const F_NEEDS_CSUM: u8 = 1;
/// `VIRTIO_NET_HDR_F_DATA_VALID`.
const F_DATA_VALID: u8 = 2;
/// `VIRTIO_NET_HDR_GSO_NONE`.
const GSO_NONE: u8 = 0;

/// A parsed virtio-net header. Its 16-bit fields are in the host's byte order: a TUN device
/// uses native (legacy virtio) order unless `TUNSETVNETLE`/`TUNSETVNETBE` is set, and we set
/// neither.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct VnetHdr {
    pub(crate) flags: u8,
    pub(crate) gso_type: u8,
    pub(crate) hdr_len: u16,
    pub(crate) gso_size: u16,
    pub(crate) csum_start: u16,
    pub(crate) csum_offset: u16,
}

impl VnetHdr {
    pub(crate) fn parse(b: &[u8; VNET_HDR_LEN]) -> Self {
        let word = |i: usize| u16::from_ne_bytes([b[i], b[i + 1]]);
        VnetHdr {
            flags: b[0],
            gso_type: b[1],
            hdr_len: word(2),
            gso_size: word(4),
            csum_start: word(6),
            csum_offset: word(8),
        }
    }

    pub(crate) fn write(&self, b: &mut [u8; VNET_HDR_LEN]) {
        b[0] = self.flags;
        b[1] = self.gso_type;
        b[2..4].copy_from_slice(&self.hdr_len.to_ne_bytes());
        b[4..6].copy_from_slice(&self.gso_size.to_ne_bytes());
        b[6..8].copy_from_slice(&self.csum_start.to_ne_bytes());
        b[8..10].copy_from_slice(&self.csum_offset.to_ne_bytes());
    }

    /// What the engine may assume about the packet's L4 checksum. `NEEDS_CSUM` wins over
    /// `DATA_VALID` (the kernel never sets both; if it did, the field is still a partial sum).
    pub(crate) fn checksum_state(&self) -> L4Checksum {
        if self.flags & F_NEEDS_CSUM != 0 {
            L4Checksum::Partial
        } else if self.flags & F_DATA_VALID != 0 {
            L4Checksum::Verified
        } else {
            L4Checksum::Unverified
        }
    }

    /// A GSO super-packet the kernel segments on the way out.
    pub(crate) fn is_gso(&self) -> bool {
        self.gso_type != GSO_NONE
    }
}

/// Fixes the header in `hdr` after the engine turned a packet of `old_len` bytes into one of
/// `new_len` bytes (see the module documentation: only `hdr_len` of a GSO packet changes).
pub(crate) fn fix_after_rewrite(hdr: &mut [u8; VNET_HDR_LEN], old_len: usize, new_len: usize) {
    if new_len == old_len {
        return;
    }
    let mut h = VnetHdr::parse(hdr);
    if h.is_gso() && new_len > old_len {
        let grown = u16::try_from(new_len - old_len).unwrap_or(u16::MAX);
        h.hdr_len = h.hdr_len.saturating_add(grown);
        h.write(hdr);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hdr(flags: u8, gso_type: u8, hdr_len: u16) -> VnetHdr {
        VnetHdr {
            flags,
            gso_type,
            hdr_len,
            gso_size: 1448,
            csum_start: 20,
            csum_offset: 16,
        }
    }

    #[test]
    fn test_parse_write_roundtrip() {
        let h = hdr(F_NEEDS_CSUM, 1, 66);
        let mut b = [0u8; VNET_HDR_LEN];
        h.write(&mut b);
        assert_eq!(VnetHdr::parse(&b), h);
        // Native order, as the kernel writes it on this host.
        assert_eq!(&b[2..4], &66u16.to_ne_bytes());
        assert_eq!(&b[8..10], &16u16.to_ne_bytes());
    }

    #[test]
    fn test_checksum_state() {
        assert_eq!(hdr(0, 0, 0).checksum_state(), L4Checksum::Unverified);
        assert_eq!(
            hdr(F_DATA_VALID, 0, 0).checksum_state(),
            L4Checksum::Verified
        );
        assert_eq!(
            hdr(F_NEEDS_CSUM, 0, 0).checksum_state(),
            L4Checksum::Partial
        );
        assert_eq!(
            hdr(F_NEEDS_CSUM | F_DATA_VALID, 0, 0).checksum_state(),
            L4Checksum::Partial
        );
    }

    #[test]
    fn test_fix_after_rewrite() {
        let mut b = [0u8; VNET_HDR_LEN];
        // Unchanged length: header untouched.
        hdr(F_NEEDS_CSUM, 1, 66).write(&mut b);
        let before = b;
        fix_after_rewrite(&mut b, 1000, 1000);
        assert_eq!(b, before);
        // Non-GSO SYN that grew by a TOA option: nothing to change.
        hdr(F_NEEDS_CSUM, GSO_NONE, 0).write(&mut b);
        let before = b;
        fix_after_rewrite(&mut b, 60, 68);
        assert_eq!(b, before);
        // GSO packet that grew: hdr_len covers the longer TCP header; the rest is unchanged.
        hdr(F_NEEDS_CSUM, 1, 66).write(&mut b);
        fix_after_rewrite(&mut b, 30_000, 30_008);
        assert_eq!(VnetHdr::parse(&b), hdr(F_NEEDS_CSUM, 1, 74));
    }
}
