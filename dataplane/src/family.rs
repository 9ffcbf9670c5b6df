//! What differs between IPv4 and IPv6 on the packet path, in one trait, so the session table and
//! the translation code are written once.

use std::fmt::Debug;
use std::hash::Hash;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use parking_lot::Mutex;

use crate::frag::{FragTable, Fragments};
use crate::session::{FamilyTable, SessionTable};
use crate::wire::{IpProtocol, checksum};

pub(crate) trait Family: Copy + Eq + Hash + Debug + Send + Sync + 'static {
    const IS_V6: bool;
    /// Offsets of the source and destination address in the IP header.
    const SRC_OFF: usize;
    const DST_OFF: usize;
    /// Length of a TOA option carrying an address of this family.
    const TOA_LEN: usize;
    type Octets: AsRef<[u8]> + Copy;

    fn octets_of(self) -> Self::Octets;
    fn from_slice(bytes: &[u8]) -> Self;
    fn to_ip(self) -> IpAddr;
    fn from_ip(ip: IpAddr) -> Option<Self>;
    fn table(t: &SessionTable) -> &FamilyTable<Self>;
    fn fragments(f: &Fragments) -> &Mutex<FragTable<Self>>;
    fn pseudo_header(src: Self, dst: Self, proto: IpProtocol, len: u32) -> u16;
}

impl Family for Ipv4Addr {
    const IS_V6: bool = false;
    const SRC_OFF: usize = 12;
    const DST_OFF: usize = 16;
    const TOA_LEN: usize = 8;
    type Octets = [u8; 4];

    fn octets_of(self) -> [u8; 4] {
        self.octets()
    }
    fn from_slice(bytes: &[u8]) -> Self {
        let mut a = [0u8; 4];
        a.copy_from_slice(&bytes[..4]);
        Ipv4Addr::from(a)
    }
    fn to_ip(self) -> IpAddr {
        IpAddr::V4(self)
    }
    fn from_ip(ip: IpAddr) -> Option<Self> {
        match ip {
            IpAddr::V4(a) => Some(a),
            IpAddr::V6(_) => None,
        }
    }
    fn table(t: &SessionTable) -> &FamilyTable<Self> {
        &t.v4
    }
    fn fragments(f: &Fragments) -> &Mutex<FragTable<Self>> {
        &f.v4
    }
    fn pseudo_header(src: Self, dst: Self, proto: IpProtocol, len: u32) -> u16 {
        checksum::pseudo_header_v4(&src, &dst, proto, len)
    }
}

impl Family for Ipv6Addr {
    const IS_V6: bool = true;
    const SRC_OFF: usize = 8;
    const DST_OFF: usize = 24;
    const TOA_LEN: usize = 20;
    type Octets = [u8; 16];

    fn octets_of(self) -> [u8; 16] {
        self.octets()
    }
    fn from_slice(bytes: &[u8]) -> Self {
        let mut a = [0u8; 16];
        a.copy_from_slice(&bytes[..16]);
        Ipv6Addr::from(a)
    }
    fn to_ip(self) -> IpAddr {
        IpAddr::V6(self)
    }
    fn from_ip(ip: IpAddr) -> Option<Self> {
        match ip {
            IpAddr::V6(a) => Some(a),
            IpAddr::V4(_) => None,
        }
    }
    fn table(t: &SessionTable) -> &FamilyTable<Self> {
        &t.v6
    }
    fn fragments(f: &Fragments) -> &Mutex<FragTable<Self>> {
        &f.v6
    }
    fn pseudo_header(src: Self, dst: Self, proto: IpProtocol, len: u32) -> u16 {
        checksum::pseudo_header_v6(&src, &dst, proto, len)
    }
}
