//! Per-session TCP state tracking with IPVS semantics, and the per-state timeouts.
//!
//! The transition table is the one of Linux IPVS (`ip_vs_proto_tcp.c`, the normal table, not the
//! "secure TCP" one): the event of a segment is RST, else SYN, else FIN, else ACK, looked up by the
//! direction it travels (`Inbound` = client → real server, `Outbound` = real server → client).
//! On top of IPVS, a RST only changes the state when its sequence number lies inside the window
//! the receiver could accept (a lenient check in the style of netfilter conntrack), so a blind
//! RST cannot tear down a session. Pure code: no clock, no I/O.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// TCP connection states as IPVS names them (`ipvsadm -Lnc`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum TcpState {
    /// Before the first segment; never stored in a session.
    None,
    SynSent,
    SynRecv,
    Established,
    FinWait,
    CloseWait,
    LastAck,
    TimeWait,
    Close,
}

impl TcpState {
    /// The name `ipvsadm -Lnc` prints.
    pub fn name(self) -> &'static str {
        match self {
            TcpState::None => "NONE",
            TcpState::SynSent => "SYN_SENT",
            TcpState::SynRecv => "SYN_RECV",
            TcpState::Established => "ESTABLISHED",
            TcpState::FinWait => "FIN_WAIT",
            TcpState::CloseWait => "CLOSE_WAIT",
            TcpState::LastAck => "LAST_ACK",
            TcpState::TimeWait => "TIME_WAIT",
            TcpState::Close => "CLOSE",
        }
    }

    /// IPVS counts a connection as active only while established; every other state is inactive.
    pub fn is_active(self) -> bool {
        self == TcpState::Established
    }

    /// The next state after a segment with `flags` travelling in `dir`, per the IPVS table.
    pub fn next(self, dir: Direction, flags: TcpFlags) -> TcpState {
        use TcpState::{
            Close as CL, CloseWait as CW, Established as ES, FinWait as FW, LastAck as LA,
            None as NO, SynRecv as SR, SynSent as SS, TimeWait as TW,
        };
        let event = if flags.rst {
            3
        } else if flags.syn {
            0
        } else if flags.fin {
            1
        } else if flags.ack {
            2
        } else {
            return self;
        };
        // Columns: NO, ES, SS, SR, FW, TW, CL, CW, LA.
        const INBOUND: [[TcpState; 9]; 4] = [
            /* syn */ [SR, ES, ES, SR, SR, SR, SR, SR, SR],
            /* fin */ [CL, CW, SS, TW, TW, TW, CL, CW, LA],
            /* ack */ [CL, ES, SS, ES, FW, TW, CL, CW, CL],
            /* rst */ [CL, CL, CL, SR, CL, CL, CL, CL, LA],
        ];
        const OUTBOUND: [[TcpState; 9]; 4] = [
            /* syn */ [SS, ES, SS, SR, SS, SS, SS, SS, SS],
            /* fin */ [TW, FW, SS, TW, FW, TW, CL, TW, LA],
            /* ack */ [ES, ES, SS, ES, FW, TW, CL, CW, LA],
            /* rst */ [CL, CL, SS, CL, CL, TW, CL, CL, CL],
        ];
        let column = match self {
            NO => 0,
            ES => 1,
            SS => 2,
            SR => 3,
            FW => 4,
            TW => 5,
            CL => 6,
            CW => 7,
            LA => 8,
        };
        match dir {
            Direction::Inbound => INBOUND[event][column],
            Direction::Outbound => OUTBOUND[event][column],
        }
    }
}

/// Which way a packet travels through the load balancer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    /// Client → VIP, rewritten to LIP → real server.
    Inbound,
    /// Real server → LIP, rewritten to VIP → client.
    Outbound,
}

impl Direction {
    fn index(self) -> usize {
        match self {
            Direction::Inbound => 0,
            Direction::Outbound => 1,
        }
    }
}

/// The TCP flags the state machine looks at.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TcpFlags {
    pub syn: bool,
    pub ack: bool,
    pub fin: bool,
    pub rst: bool,
}

impl TcpFlags {
    /// A segment that opens a connection: SYN, and no ACK, FIN or RST.
    pub fn opens(self) -> bool {
        self.syn && !self.ack && !self.fin && !self.rst
    }
}

/// Per-state timeouts of a service. Defaults are those of Linux IPVS.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Timeouts {
    #[serde(with = "secs")]
    pub established: Duration,
    #[serde(with = "secs")]
    pub syn_sent: Duration,
    #[serde(with = "secs")]
    pub syn_recv: Duration,
    #[serde(with = "secs")]
    pub fin_wait: Duration,
    #[serde(with = "secs")]
    pub time_wait: Duration,
    #[serde(with = "secs")]
    pub close: Duration,
    #[serde(with = "secs")]
    pub close_wait: Duration,
    #[serde(with = "secs")]
    pub last_ack: Duration,
    #[serde(with = "secs")]
    pub udp: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        let s = Duration::from_secs;
        Timeouts {
            established: s(900),
            syn_sent: s(120),
            syn_recv: s(60),
            fin_wait: s(120),
            time_wait: s(120),
            close: s(10),
            close_wait: s(60),
            last_ack: s(30),
            udp: s(300),
        }
    }
}

impl Timeouts {
    /// The timeout of a TCP state.
    pub fn tcp(&self, state: TcpState) -> Duration {
        match state {
            TcpState::None | TcpState::Close => self.close,
            TcpState::SynSent => self.syn_sent,
            TcpState::SynRecv => self.syn_recv,
            TcpState::Established => self.established,
            TcpState::FinWait => self.fin_wait,
            TcpState::CloseWait => self.close_wait,
            TcpState::LastAck => self.last_ack,
            TcpState::TimeWait => self.time_wait,
        }
    }
}

/// Timeouts are written in whole seconds in config files.
mod secs {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub(super) fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(d.as_secs())
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        u64::deserialize(d).map(Duration::from_secs)
    }
}

/// Window scale value meaning "this side offered no window scaling".
const NO_WSCALE: u8 = 0xff;

/// The largest window scale (RFC 7323 §2.3: a larger shift count is taken as 14). A window
/// shifted by it still fits 32 bits.
pub const MAX_WSCALE: u8 = 14;

/// The largest scaled window a side can advertise.
const MAX_WINDOW: u32 = (u16::MAX as u32) << MAX_WSCALE;

/// Sequence-space tracking per direction, just enough to tell an in-window RST from a blind one.
///
/// `end` is the highest sequence number a side has sent plus its length; `max_win` the largest
/// window it has advertised (scaled). A side whose `end` is unknown has not been seen yet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct TcpWindow {
    end: [u32; 2],
    max_win: [u32; 2],
    wscale: [u8; 2],
    seen: [bool; 2],
}

/// What the window tracker needs of one segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Segment {
    pub flags: TcpFlags,
    pub seq: u32,
    pub ack: u32,
    /// Payload length plus one for SYN and one for FIN.
    pub len: u32,
    pub window: u16,
    /// The window-scale option, on SYN segments only.
    pub wscale: Option<u8>,
}

impl TcpWindow {
    /// Tracking state before any segment was seen.
    pub fn new() -> Self {
        TcpWindow {
            end: [0; 2],
            max_win: [0; 2],
            wscale: [NO_WSCALE; 2],
            seen: [false; 2],
        }
    }

    /// Whether every field is one the tracker itself could have produced: window scales of at
    /// most [`MAX_WSCALE`] (or none) and windows that fit them. Tracking from a peer's record is
    /// installed only if it is.
    pub fn is_valid(&self) -> bool {
        self.wscale
            .iter()
            .all(|&w| w <= MAX_WSCALE || w == NO_WSCALE)
            && self.max_win.iter().all(|&w| w <= MAX_WINDOW)
    }

    /// Whether a RST travelling in `dir` may close the session. Must be called before `update`
    /// with the same segment.
    pub fn rst_acceptable(&self, dir: Direction, seg: &Segment) -> bool {
        let me = dir.index();
        let peer = 1 - me;
        if self.seen[me] {
            // The receiver accepts sequence numbers around what it expects next, within its
            // window; allow a window either side for segments still in flight.
            let win = self.max_win[peer].max(1);
            let dist = seg.seq.wrapping_sub(self.end[me].wrapping_sub(win));
            return dist <= win.saturating_mul(2);
        }
        if self.seen[peer] {
            // A side that has sent nothing yet (a server refusing a SYN) can only prove it saw
            // the connection by acknowledging exactly what the other side sent.
            return seg.flags.ack && seg.ack == self.end[peer];
        }
        // Nothing known (a session installed without tracking): fall back to IPVS behaviour.
        true
    }

    /// What a faster path forwarding `dir` needs: the highest sequence number + length sent
    /// that way, the largest scaled window advertised, and the window-scale shift (0 unless both
    /// SYNs carried the option).
    pub fn edges(&self, dir: Direction) -> (u32, u32, u8) {
        let me = dir.index();
        let scale = if self.wscale[me] != NO_WSCALE && self.wscale[1 - me] != NO_WSCALE {
            self.wscale[me]
        } else {
            0
        };
        (self.end[me], self.max_win[me], scale)
    }

    /// Folds in what a faster path saw while it forwarded `dir` ([`TcpWindow::edges`] moved
    /// on).
    /// The window scale the side sending in `dir` offered in its SYN, if it offered one.
    pub fn offered_wscale(&self, dir: Direction) -> Option<u8> {
        let w = self.wscale[dir.index()];
        (w != NO_WSCALE).then_some(w)
    }

    pub fn merge(&mut self, dir: Direction, end: u32, max_win: u32) {
        let me = dir.index();
        if (end.wrapping_sub(self.end[me]) as i32) > 0 {
            self.end[me] = end;
        }
        self.max_win[me] = self.max_win[me].max(max_win);
    }

    /// Records a segment travelling in `dir`.
    pub fn update(&mut self, dir: Direction, seg: &Segment) {
        let me = dir.index();
        let peer = 1 - me;
        if seg.flags.syn {
            self.wscale[me] = seg.wscale.map_or(NO_WSCALE, |w| w.min(MAX_WSCALE));
        }
        let end = seg.seq.wrapping_add(seg.len);
        if !self.seen[me] || (end.wrapping_sub(self.end[me]) as i32) > 0 {
            self.end[me] = end;
        }
        self.seen[me] = true;
        // RFC 7323: windows are scaled only when both SYNs carried the option, never on SYNs.
        // Clamped again here, whatever the stored scale: a 16-bit window shifted by at most
        // `MAX_WSCALE` cannot overflow.
        let scale =
            if !seg.flags.syn && self.wscale[me] != NO_WSCALE && self.wscale[peer] != NO_WSCALE {
                u32::from(self.wscale[me].min(MAX_WSCALE))
            } else {
                0
            };
        let win = u32::from(seg.window) << scale;
        self.max_win[me] = self.max_win[me].max(win);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use Direction::{Inbound, Outbound};
    use TcpState::{Close, CloseWait, Established, FinWait, LastAck, SynRecv, SynSent, TimeWait};

    const SYN: TcpFlags = TcpFlags {
        syn: true,
        ack: false,
        fin: false,
        rst: false,
    };
    const SYNACK: TcpFlags = TcpFlags {
        syn: true,
        ack: true,
        fin: false,
        rst: false,
    };
    const ACK: TcpFlags = TcpFlags {
        syn: false,
        ack: true,
        fin: false,
        rst: false,
    };
    const FIN: TcpFlags = TcpFlags {
        syn: false,
        ack: true,
        fin: true,
        rst: false,
    };
    const RST: TcpFlags = TcpFlags {
        syn: false,
        ack: false,
        fin: false,
        rst: true,
    };

    #[test]
    fn test_handshake_and_active_close_by_client() {
        let mut s = TcpState::None.next(Inbound, SYN);
        assert_eq!(s, SynRecv);
        s = s.next(Outbound, SYNACK);
        assert_eq!(s, SynRecv);
        s = s.next(Inbound, ACK);
        assert_eq!(s, Established);
        s = s.next(Inbound, FIN);
        assert_eq!(s, CloseWait);
        s = s.next(Outbound, FIN);
        assert_eq!(s, TimeWait);
        s = s.next(Inbound, ACK);
        assert_eq!(s, TimeWait);
    }

    #[test]
    fn test_active_close_by_server() {
        let s = Established.next(Outbound, FIN);
        assert_eq!(s, FinWait);
        assert_eq!(s.next(Inbound, FIN), TimeWait);
        assert_eq!(s.next(Inbound, ACK), FinWait);
    }

    #[test]
    fn test_rst_and_flagless() {
        assert_eq!(Established.next(Inbound, RST), Close);
        assert_eq!(Established.next(Outbound, RST), Close);
        assert_eq!(SynRecv.next(Inbound, RST), SynRecv);
        assert_eq!(Established.next(Inbound, TcpFlags::default()), Established);
        assert_eq!(TimeWait.next(Inbound, SYN), SynRecv);
    }

    #[test]
    fn test_timeouts_defaults_follow_ipvs() {
        let t = Timeouts::default();
        assert_eq!(t.tcp(Established), Duration::from_secs(900));
        assert_eq!(t.tcp(SynSent), Duration::from_secs(120));
        assert_eq!(t.tcp(SynRecv), Duration::from_secs(60));
        assert_eq!(t.tcp(FinWait), Duration::from_secs(120));
        assert_eq!(t.tcp(TimeWait), Duration::from_secs(120));
        assert_eq!(t.tcp(Close), Duration::from_secs(10));
        assert_eq!(t.tcp(CloseWait), Duration::from_secs(60));
        assert_eq!(t.tcp(LastAck), Duration::from_secs(30));
        assert_eq!(t.udp, Duration::from_secs(300));
    }

    fn seg(
        flags: TcpFlags,
        seq: u32,
        ack: u32,
        len: u32,
        window: u16,
        wscale: Option<u8>,
    ) -> Segment {
        Segment {
            flags,
            seq,
            ack,
            len,
            window,
            wscale,
        }
    }

    fn established_window() -> TcpWindow {
        let mut w = TcpWindow::new();
        w.update(Inbound, &seg(SYN, 1000, 0, 1, 65535, Some(7)));
        w.update(Outbound, &seg(SYNACK, 5000, 1001, 1, 65535, Some(7)));
        w.update(Inbound, &seg(ACK, 1001, 5001, 0, 512, None));
        w.update(Outbound, &seg(ACK, 5001, 1001, 100, 512, None));
        w
    }

    #[test]
    fn test_rst_in_window_accepted() {
        let w = established_window();
        // The client's next byte is 1001; the server advertised 512 << 7.
        assert!(w.rst_acceptable(Inbound, &seg(RST, 1001, 0, 0, 0, None)));
        assert!(w.rst_acceptable(Inbound, &seg(RST, 1001 + 60_000, 0, 0, 0, None)));
        assert!(w.rst_acceptable(Outbound, &seg(RST, 5101, 0, 0, 0, None)));
    }

    #[test]
    fn test_rst_out_of_window_refused() {
        let w = established_window();
        assert!(!w.rst_acceptable(Inbound, &seg(RST, 1001 + 200_000, 0, 0, 0, None)));
        assert!(!w.rst_acceptable(
            Inbound,
            &seg(RST, 1001u32.wrapping_sub(200_000), 0, 0, 0, None)
        ));
        assert!(!w.rst_acceptable(Outbound, &seg(RST, 0x8000_0000, 0, 0, 0, None)));
    }

    #[test]
    fn test_rst_refusing_syn_must_ack_it() {
        let mut w = TcpWindow::new();
        w.update(Inbound, &seg(SYN, 1000, 0, 1, 65535, None));
        let rst_ack = TcpFlags {
            rst: true,
            ack: true,
            ..TcpFlags::default()
        };
        assert!(w.rst_acceptable(Outbound, &seg(rst_ack, 0, 1001, 0, 0, None)));
        assert!(!w.rst_acceptable(Outbound, &seg(rst_ack, 0, 77, 0, 0, None)));
        assert!(!w.rst_acceptable(Outbound, &seg(RST, 0, 0, 0, 0, None)));
    }

    #[test]
    fn test_window_not_scaled_unless_both_sides_offer() {
        let mut w = TcpWindow::new();
        w.update(Inbound, &seg(SYN, 1000, 0, 1, 65535, Some(7)));
        w.update(Outbound, &seg(SYNACK, 5000, 1001, 1, 1000, None));
        w.update(Outbound, &seg(ACK, 5001, 1001, 0, 1000, None));
        w.update(Inbound, &seg(ACK, 1001, 5001, 0, 1000, None));
        // Unscaled: the server's window is 1000, so 5,000 bytes ahead is out of window.
        assert!(!w.rst_acceptable(Inbound, &seg(RST, 1001 + 5000, 0, 0, 0, None)));
        assert!(w.rst_acceptable(Inbound, &seg(RST, 1001 + 500, 0, 0, 0, None)));
    }
}
