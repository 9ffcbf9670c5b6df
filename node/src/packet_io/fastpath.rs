//! The kernel fast path (DESIGN §1 "Two tiers"): an eBPF program (`bpf/fastpath.c`, built from
//! source by `build.rs`) attached at tc ingress of the node's uplinks forwards the packets of
//! offloaded sessions with the engine's Full-NAT rewrite; everything else reaches the kernel, the
//! TUN device and the engine as before.
//!
//! * **The engine stays the authority.** It offloads a session (both sides, one map entry each)
//!   when the flow is established, withdraws it when the session leaves that state, closes,
//!   expires or is removed, and reads each entry's last-seen time, counters and TCP window edges
//!   back ([`dataplane::Offload`]). This module only moves entries in and out of the map.
//! * **One map layout.** `bpf/fastpath.h` defines it; [`Key`] and [`Entry`] mirror it, and a test
//!   checks every field's offset against the BTF clang writes into the object.
//! * **Lifecycle.** The program is attached with tcx: the attachment is a BPF link held by this
//!   process, so it goes when the process goes, however it ends, and a dead node forwards nothing
//!   (its routes go with its TUN device). Kernels without tcx (before 6.6) run without the fast
//!   path (`fastpath = "auto"`) or refuse to start (`"on"`).
//! * **A full map** refuses the insert: the session stays on the slow path, counted.

use std::collections::HashMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::{Context, Result, bail};
use aya::maps::{HashMap as BpfHashMap, MapData, PerCpuArray};
use aya::programs::links::LinkOrder;
use aya::programs::tc::TcAttachOptions;
use aya::programs::{SchedClassifier, TcAttachType};
use aya::{Ebpf, EbpfLoader, include_bytes_aligned};
use dataplane::service::Traffic;
use dataplane::{FlowActivity, L4Proto, Offload, OffloadFlow, OffloadSide, SideActivity};
use parking_lot::Mutex;

use crate::clock;

/// The object `build.rs` compiled from `bpf/fastpath.c`.
static OBJECT: &[u8] = include_bytes_aligned!(concat!(env!("OUT_DIR"), "/fastpath.o"));
/// Names in the object.
const PROGRAM: &str = "lbc_fastpath";
const FLOWS: &str = "lbc_flows";
const COUNTERS: &str = "lbc_counters";

/// `struct lbc_flow_key`: a packet's 5-tuple as it arrives, addresses and ports as on the wire.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub(crate) struct Key {
    family: u8,
    proto: u8,
    sport: [u8; 2],
    dport: [u8; 2],
    pad: u16,
    src: [u8; 16],
    dst: [u8; 16],
}

/// `struct lbc_flow`: the rewrite of one side of a session, and what the program saw of it.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct Entry {
    src: [u8; 16],
    dst: [u8; 16],
    sport: [u8; 2],
    dport: [u8; 2],
    wscale: u8,
    side: u8,
    pad: [u8; 2],
    seq_delta: u32,
    ack_delta: u32,
    last_seen_ns: u64,
    packets: u64,
    bytes: u64,
    seq_end: u32,
    max_win: u32,
}

// SAFETY: both are `repr(C)` structs of integers and byte arrays with no padding the compiler
// inserts (the explicit `pad` fields fill it), so every bit pattern is a valid value and the
// kernel can read and write them as bytes.
unsafe impl aya::Pod for Key {}
// SAFETY: as for `Key`.
unsafe impl aya::Pod for Entry {}

/// `LBC_FAMILY_V4` / `LBC_FAMILY_V6`.
const FAMILY_V4: u8 = 4;
const FAMILY_V6: u8 = 6;
/// `LBC_CLIENT_SIDE` / `LBC_SERVER_SIDE`.
const CLIENT_SIDE: u8 = 0;
const SERVER_SIDE: u8 = 1;

fn addr_bytes(ip: IpAddr) -> (u8, [u8; 16]) {
    let mut out = [0; 16];
    match ip {
        IpAddr::V4(a) => {
            out[..4].copy_from_slice(&a.octets());
            (FAMILY_V4, out)
        }
        IpAddr::V6(a) => (FAMILY_V6, a.octets()),
    }
}

fn socket_addr(family: u8, addr: [u8; 16], port: [u8; 2]) -> SocketAddr {
    let ip = if family == FAMILY_V4 {
        IpAddr::from([addr[0], addr[1], addr[2], addr[3]])
    } else {
        IpAddr::from(addr)
    };
    SocketAddr::new(ip, u16::from_be_bytes(port))
}

impl Key {
    fn new(proto: L4Proto, (src, dst): (SocketAddr, SocketAddr)) -> Key {
        let (family, src_addr) = addr_bytes(src.ip());
        let (_, dst_addr) = addr_bytes(dst.ip());
        Key {
            family,
            proto: proto.number(),
            sport: src.port().to_be_bytes(),
            dport: dst.port().to_be_bytes(),
            pad: 0,
            src: src_addr,
            dst: dst_addr,
        }
    }
}

impl Entry {
    fn new(side: u8, s: &OffloadSide) -> Entry {
        let (_, src) = addr_bytes(s.leaves.0.ip());
        let (_, dst) = addr_bytes(s.leaves.1.ip());
        Entry {
            src,
            dst,
            sport: s.leaves.0.port().to_be_bytes(),
            dport: s.leaves.1.port().to_be_bytes(),
            wscale: s.wscale,
            side,
            seq_end: s.seq_end,
            max_win: s.max_win,
            ..Entry::default()
        }
    }

    fn activity(&self) -> SideActivity {
        SideActivity {
            last_seen: (self.last_seen_ns != 0)
                .then(|| clock::from_monotonic_ns(self.last_seen_ns)),
            packets: self.packets,
            bytes: self.bytes,
            seq_end: self.seq_end,
            max_win: self.max_win,
        }
    }
}

fn keys(flow: &OffloadFlow) -> [Key; 2] {
    [
        Key::new(flow.proto, flow.client_side.arrives),
        Key::new(flow.proto, flow.server_side.arrives),
    ]
}

/// The program's own counters (`enum lbc_fastpath_counter`), summed over the CPUs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub(crate) struct ProgramCounters {
    pub(crate) forwarded: u64,
    pub(crate) no_entry: u64,
    pub(crate) not_forwardable: u64,
    pub(crate) no_route: u64,
    pub(crate) rewrite_failed: u64,
    pub(crate) too_big: u64,
}

/// Sessions handed to the fast path, as `status` shows them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub(crate) struct SessionCounters {
    /// Offloaded now.
    pub(crate) offloaded: u64,
    /// Offloaded since the start, withdrawn since the start.
    pub(crate) offloads: u64,
    pub(crate) withdrawals: u64,
    /// Offloads the map refused (full): those sessions stay on the slow path.
    pub(crate) refused: u64,
}

/// What the fast path carries now, by service (protocol, VIP) and real server: traffic not
/// yet folded into the engine's counters (that happens when a flow is withdrawn).
pub(crate) type LiveTraffic = HashMap<(L4Proto, SocketAddr, SocketAddr), Traffic>;

/// The fast path of one node: the loaded program, its attachments and its maps.
pub(crate) struct FastPath {
    /// Owns the program and its tcx links: dropping it detaches the program.
    program: Mutex<Option<Ebpf>>,
    flows: Mutex<BpfHashMap<MapData, Key, Entry>>,
    counters: PerCpuArray<MapData, u64>,
    devices: Vec<String>,
    offloads: AtomicU64,
    withdrawals: AtomicU64,
    refused: AtomicU64,
}

impl fmt::Debug for FastPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FastPath")
            .field("devices", &self.devices)
            .finish_non_exhaustive()
    }
}

impl FastPath {
    /// Loads the program with room for `entries` map entries (two a session) and attaches it at
    /// tcx ingress of every device in `devices`.
    pub(crate) fn start(devices: &[String], entries: u32) -> Result<FastPath> {
        if devices.is_empty() {
            bail!("no device to attach the fast path to");
        }
        let mut ebpf = EbpfLoader::new()
            .map_max_entries(FLOWS, entries.max(2))
            .load(OBJECT)
            .context("loading the fast path's eBPF object")?;
        let program: &mut SchedClassifier = ebpf
            .program_mut(PROGRAM)
            .context("the object has no fast path program")?
            .try_into()
            .context("the fast path program is not a tc classifier")?;
        program
            .load()
            .context("the kernel refused the fast path program")?;
        for device in devices {
            // tcx only: its links die with this process (netlink-attached filters would stay).
            program
                .attach_with_options(
                    device,
                    TcAttachType::Ingress,
                    TcAttachOptions::TcxOrder(LinkOrder::default()),
                )
                .with_context(|| {
                    format!("attaching the fast path to {device} (tcx needs Linux 6.6 or later)")
                })?;
        }
        let flows = BpfHashMap::try_from(ebpf.take_map(FLOWS).context("no flow map")?)
            .context("the flow map's layout differs from this build's")?;
        let counters = PerCpuArray::try_from(ebpf.take_map(COUNTERS).context("no counter map")?)
            .context("the counter map's layout differs from this build's")?;
        Ok(FastPath {
            program: Mutex::new(Some(ebpf)),
            flows: Mutex::new(flows),
            counters,
            devices: devices.to_vec(),
            offloads: AtomicU64::new(0),
            withdrawals: AtomicU64::new(0),
            refused: AtomicU64::new(0),
        })
    }

    /// Detaches the program: from now on every packet takes the slow path. The entries stay
    /// until their sessions are withdrawn.
    pub(crate) fn detach(&self) {
        self.program.lock().take();
    }

    /// The devices the program is attached to.
    pub(crate) fn devices(&self) -> &[String] {
        &self.devices
    }

    pub(crate) fn sessions(&self) -> SessionCounters {
        let offloads = self.offloads.load(Ordering::Relaxed);
        let withdrawals = self.withdrawals.load(Ordering::Relaxed);
        SessionCounters {
            offloaded: offloads.saturating_sub(withdrawals),
            offloads,
            withdrawals,
            refused: self.refused.load(Ordering::Relaxed),
        }
    }

    /// The program's counters, summed over the CPUs.
    pub(crate) fn counters(&self) -> ProgramCounters {
        let sum = |i: u32| {
            self.counters
                .get(&i, 0)
                .map(|per_cpu| per_cpu.iter().sum())
                .unwrap_or(0)
        };
        ProgramCounters {
            forwarded: sum(0),
            no_entry: sum(1),
            not_forwardable: sum(2),
            no_route: sum(3),
            rewrite_failed: sum(4),
            too_big: sum(5),
        }
    }

    /// What the fast path carries now ([`LiveTraffic`]): every entry read once.
    pub(crate) fn live_traffic(&self) -> LiveTraffic {
        let mut live = LiveTraffic::new();
        let flows = self.flows.lock();
        for (key, entry) in flows.iter().filter_map(Result::ok) {
            let proto = if key.proto == L4Proto::Udp.number() {
                L4Proto::Udp
            } else {
                L4Proto::Tcp
            };
            let family = key.family;
            if entry.side == CLIENT_SIDE {
                let vip = socket_addr(family, key.dst, key.dport);
                let rs = socket_addr(family, entry.dst, entry.dport);
                let t = live.entry((proto, vip, rs)).or_default();
                t.packets_in += entry.packets;
                t.bytes_in += entry.bytes;
            } else {
                let vip = socket_addr(family, entry.src, entry.sport);
                let rs = socket_addr(family, key.src, key.sport);
                let t = live.entry((proto, vip, rs)).or_default();
                t.packets_out += entry.packets;
                t.bytes_out += entry.bytes;
            }
        }
        live
    }
}

/// The devices the fast path goes on by default: every one that is up, but the loopback and
/// the node's TUN device (`tun`), as the kernel lists them in `/sys/class/net`.
pub(crate) fn uplinks(tun: &str) -> Result<Vec<String>> {
    const IFF_UP: u32 = 0x1;
    let mut devices = Vec::new();
    for dev in std::fs::read_dir("/sys/class/net").context("listing /sys/class/net")? {
        let dev = dev.context("listing /sys/class/net")?;
        let name = dev.file_name().to_string_lossy().into_owned();
        if name == "lo" || name == tun {
            continue;
        }
        let flags = std::fs::read_to_string(dev.path().join("flags")).unwrap_or_default();
        let flags = u32::from_str_radix(flags.trim().trim_start_matches("0x"), 16).unwrap_or(0);
        if flags & IFF_UP != 0 {
            devices.push(name);
        }
    }
    devices.sort();
    Ok(devices)
}

impl Offload for FastPath {
    fn offload(&self, flow: &OffloadFlow) -> bool {
        let [client, server] = keys(flow);
        let entries = [
            (client, Entry::new(CLIENT_SIDE, &flow.client_side)),
            (server, Entry::new(SERVER_SIDE, &flow.server_side)),
        ];
        let mut flows = self.flows.lock();
        for (n, (key, entry)) in entries.iter().enumerate() {
            if flows.insert(key, entry, 0).is_err() {
                for (key, _) in &entries[..n] {
                    let _ = flows.remove(key);
                }
                self.refused.fetch_add(1, Ordering::Relaxed);
                return false;
            }
        }
        self.offloads.fetch_add(1, Ordering::Relaxed);
        true
    }

    fn withdraw(&self, flow: &OffloadFlow) -> Option<FlowActivity> {
        let mut flows = self.flows.lock();
        let mut take = |key: &Key| {
            let entry = flows.get(key, 0).ok()?;
            flows.remove(key).ok()?;
            Some(entry.activity())
        };
        let [client, server] = keys(flow);
        let seen = [take(&client), take(&server)];
        drop(flows);
        if seen.iter().all(Option::is_none) {
            return None;
        }
        self.withdrawals.fetch_add(1, Ordering::Relaxed);
        Some(seen.map(Option::unwrap_or_default))
    }

    fn activity(&self, flow: &OffloadFlow) -> Option<FlowActivity> {
        let flows = self.flows.lock();
        let [client, server] = keys(flow);
        let seen = [client, server].map(|key| flows.get(&key, 0).ok().map(|e| e.activity()));
        if seen.iter().all(Option::is_none) {
            return None;
        }
        Some(seen.map(Option::unwrap_or_default))
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::mem::{offset_of, size_of};

    use object::{Object, ObjectSection};

    use super::*;

    /// The members (name → byte offset) and size of every struct in the BTF of an object.
    fn btf_structs(object: &[u8]) -> HashMap<String, (u32, HashMap<String, u32>)> {
        let elf = object::File::parse(object).unwrap();
        let btf = elf
            .section_by_name(".BTF")
            .expect("clang -g writes .BTF")
            .data()
            .unwrap();
        let u16_at = |o: usize| u16::from_le_bytes([btf[o], btf[o + 1]]);
        let u32_at = |o: usize| u32::from_le_bytes(btf[o..o + 4].try_into().unwrap());
        assert_eq!(u16_at(0), 0xeb9f, "BTF magic");
        let hdr_len = u32_at(4) as usize;
        let (type_off, type_len) = (u32_at(8) as usize, u32_at(12) as usize);
        let str_off = u32_at(16) as usize;
        let types = hdr_len + type_off..hdr_len + type_off + type_len;
        let name = |off: u32| {
            let start = hdr_len + str_off + off as usize;
            let end = btf[start..].iter().position(|&b| b == 0).unwrap() + start;
            String::from_utf8(btf[start..end].to_vec()).unwrap()
        };
        let mut structs = HashMap::new();
        let mut at = types.start;
        while at < types.end {
            let (name_off, info, size) = (u32_at(at), u32_at(at + 4), u32_at(at + 8));
            let (kind, vlen) = ((info >> 24) & 0x1f, (info & 0xffff) as usize);
            at += 12;
            let extra = match kind {
                1 | 14 | 17 => 4,             // INT, VAR, DECL_TAG
                3 => 12,                      // ARRAY
                4 | 5 | 15 | 19 => vlen * 12, // STRUCT, UNION, DATASEC, ENUM64
                6 | 13 => vlen * 8,           // ENUM, FUNC_PROTO
                _ => 0,
            };
            if kind == 4 {
                let members = (0..vlen)
                    .map(|m| {
                        let o = at + m * 12;
                        (name(u32_at(o)), u32_at(o + 8) / 8)
                    })
                    .collect();
                structs.insert(name(name_off), (size, members));
            }
            at += extra;
        }
        structs
    }

    macro_rules! layout {
        ($ty:ty { $($field:ident),* }) => {
            (
                size_of::<$ty>() as u32,
                HashMap::from([$((stringify!($field).to_owned(), offset_of!($ty, $field) as u32)),*]),
            )
        };
    }

    #[test]
    fn test_the_rust_mirror_has_the_program_s_map_layout() {
        let structs = btf_structs(OBJECT);
        assert_eq!(
            structs["lbc_flow_key"],
            layout!(Key {
                family,
                proto,
                sport,
                dport,
                pad,
                src,
                dst
            })
        );
        assert_eq!(
            structs["lbc_flow"],
            layout!(Entry {
                src,
                dst,
                sport,
                dport,
                wscale,
                side,
                pad,
                seq_delta,
                ack_delta,
                last_seen_ns,
                packets,
                bytes,
                seq_end,
                max_win
            })
        );
    }

    /// The verifier accepts the program as built (needs root, as the suite runs).
    #[test]
    fn test_the_kernel_accepts_the_program() {
        let mut ebpf = EbpfLoader::new().load(OBJECT).unwrap();
        let program: &mut SchedClassifier = ebpf.program_mut(PROGRAM).unwrap().try_into().unwrap();
        program.load().unwrap();
    }
}
