//! Named counters: why packets were dropped, and what the engine did.
//!
//! Each worker owns one `Counters` and is its only writer: an increment is a relaxed load and
//! store, not a locked read-modify-write, and the atomics exist only so that metrics can read
//! the figures from another thread. The engine sums all workers' counters on demand.

use std::sync::atomic::{AtomicU64, Ordering};

use serde::Serialize;

macro_rules! named_enum {
    ($(#[$m:meta])* $name:ident { $($(#[$vm:meta])* $variant:ident => $label:literal,)* }) => {
        $(#[$m])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
        #[serde(rename_all = "snake_case")]
        pub enum $name { $($(#[$vm])* $variant,)* }

        impl $name {
            /// Every value, in declaration order.
            pub const ALL: &'static [$name] = &[$($name::$variant,)*];

            /// The metric label of this value.
            pub fn name(self) -> &'static str {
                match self { $($name::$variant => $label,)* }
            }
        }
    };
}

named_enum! {
    /// Why the engine dropped a packet. `Copy`, so the packet path returns it without allocating.
    DropReason {
        /// A header ends before its fixed part or before the length it claims.
        Truncated => "truncated",
        /// A header field is impossible (version, IHL, data offset, total length, option length).
        Malformed => "malformed",
        /// An IP header, or the L4 checksum of a packet that opens a flow, is wrong.
        BadChecksum => "bad_checksum",
        /// A fragment the engine does not follow: of a datagram other than TCP or UDP (an ICMP
        /// echo or error, …), or a first fragment too short to hold the TCP or UDP ports.
        Fragment => "fragment",
        /// A later fragment whose first fragment was not seen (it arrived out of order before
        /// it, was dropped, or its datagram's entry was reused): nothing says where it goes.
        FragmentUntracked => "fragment_untracked",
        /// A later fragment that came after its datagram's entry expired (see `frag`).
        FragmentExpired => "fragment_expired",
        /// A first fragment refused because the fragment table had no room: too many
        /// fragmented datagrams in flight (see `frag`).
        FragmentTableFull => "fragment_table_full",
        /// IPv4 packets with options are not forwarded.
        IpOptions => "ip_options",
        /// Neither TCP, UDP nor an ICMP error.
        UnsupportedProtocol => "unsupported_protocol",
        /// No service on that VIP, port and protocol.
        NoService => "no_service",
        /// A packet that cannot open a flow (a TCP non-SYN) and matches no session.
        NoSession => "no_session",
        /// The scheduler found no real server able to take a new flow.
        NoBackend => "no_backend",
        /// Every local port of every LIP of the family is in use.
        NoLocalPort => "no_local_port",
        /// The session table is at its configured maximum.
        TableFull => "table_full",
        /// An ICMP error quoting a packet of no known session.
        IcmpNoSession => "icmp_no_session",
        /// An ICMP message that is neither a translatable error nor an echo request to a VIP
        /// (redirect, ND, an echo reply, …).
        IcmpUnsupported => "icmp_unsupported",
        /// A bare ACK to a proxied service with no session and no valid SYN cookie.
        BadCookie => "bad_cookie",
        /// A segment of a proxied flow whose real server has not answered yet (its first data
        /// is held and sent on when it does; the client sends the rest again).
        SynProxyOpening => "syn_proxy_opening",
        /// An ICMP or ICMPv6 echo request to an address that is not a VIP (a LIP, …).
        EchoNotVip => "echo_not_vip",
        /// An echo request to a VIP left unanswered: replies were over their rate (see `echo`).
        EchoRateLimited => "echo_rate_limited",
    }
}

named_enum! {
    /// What the engine did, other than dropping.
    Event {
        /// Packets forwarded client → real server.
        ForwardedInbound => "forwarded_inbound",
        /// Packets forwarded real server → client.
        ForwardedOutbound => "forwarded_outbound",
        /// Sessions created by this node's traffic.
        SessionsCreated => "sessions_created",
        /// Sessions removed by expiry.
        SessionsExpired => "sessions_expired",
        /// Sessions in TIME_WAIT or CLOSE ended by a client's new SYN on the same port, which
        /// was scheduled afresh (`conn_reuse = "reschedule"`).
        SessionsRescheduled => "sessions_rescheduled",
        /// Flows that never completed a handshake (TCP SYN_RECV, UDP without a reply), evicted
        /// oldest first to make room for a new flow when the table or a port pool ran out.
        EmbryonicEvicted => "embryonic_evicted",
        /// ICMP errors translated in their outer and quoted headers.
        IcmpTranslated => "icmp_translated",
        /// Echo requests to a VIP answered by the node (`Verdict::Reply`).
        EchoReplied => "echo_replied",
        /// First fragments translated and tracked: their datagram's later fragments follow.
        FragmentsTracked => "fragments_tracked",
        /// Later fragments translated like their first fragment.
        FragmentsFollowed => "fragments_followed",
        /// SYNs that received a TOA option.
        ToaInserted => "toa_inserted",
        /// SYNs forwarded without TOA because the option did not fit.
        ToaNoRoom => "toa_no_room",
        /// RSTs forwarded without closing the session because they were out of window.
        RstOutOfWindow => "rst_out_of_window",
        /// SYNs answered with a SYN cookie by the SYN proxy.
        SynCookiesSent => "syn_cookies_sent",
        /// Client ACKs that proved a SYN cookie: proxied flows opened.
        SynCookiesAccepted => "syn_cookies_accepted",
        /// Proxied flows whose real server refused the connection (RST to the client).
        SynProxyRefused => "syn_proxy_refused",
        /// Proxied flows whose real server never answered the proxy's SYNs (RST to the client).
        SynProxyFailed => "syn_proxy_failed",
        /// Session events lost because the worker's event buffer was full.
        EventsLost => "events_lost",
    }
}

/// One worker's counters.
#[derive(Debug)]
pub struct Counters {
    drops: [AtomicU64; DropReason::ALL.len()],
    events: [AtomicU64; Event::ALL.len()],
}

impl Default for Counters {
    fn default() -> Self {
        Counters {
            drops: std::array::from_fn(|_| AtomicU64::new(0)),
            events: std::array::from_fn(|_| AtomicU64::new(0)),
        }
    }
}

impl Counters {
    pub(crate) fn dropped(&self, reason: DropReason) {
        bump(&self.drops[reason as usize], 1);
    }

    pub(crate) fn count(&self, event: Event) {
        self.add(event, 1);
    }

    pub(crate) fn add(&self, event: Event, n: u64) {
        bump(&self.events[event as usize], n);
    }

    pub(crate) fn add_into(&self, total: &mut CounterTotals) {
        for (t, c) in total.drops.iter_mut().zip(&self.drops) {
            *t += c.load(Ordering::Relaxed);
        }
        for (t, c) in total.events.iter_mut().zip(&self.events) {
            *t += c.load(Ordering::Relaxed);
        }
    }
}

/// Adds to a counter that only the calling worker writes.
fn bump(counter: &AtomicU64, n: u64) {
    counter.store(
        counter.load(Ordering::Relaxed).wrapping_add(n),
        Ordering::Relaxed,
    );
}

/// The sum of all workers' counters at one moment.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CounterTotals {
    drops: [u64; DropReason::ALL.len()],
    events: [u64; Event::ALL.len()],
}

impl CounterTotals {
    pub fn drops(&self, reason: DropReason) -> u64 {
        self.drops[reason as usize]
    }

    pub fn events(&self, event: Event) -> u64 {
        self.events[event as usize]
    }

    /// All drops, whatever the reason.
    pub fn total_drops(&self) -> u64 {
        self.drops.iter().sum()
    }

    /// Non-zero drop counters by name.
    pub fn nonzero_drops(&self) -> impl Iterator<Item = (DropReason, u64)> + '_ {
        DropReason::ALL
            .iter()
            .map(|&r| (r, self.drops(r)))
            .filter(|&(_, n)| n > 0)
    }

    /// Non-zero event counters by name.
    pub fn nonzero_events(&self) -> impl Iterator<Item = (Event, u64)> + '_ {
        Event::ALL
            .iter()
            .map(|&e| (e, self.events(e)))
            .filter(|&(_, n)| n > 0)
    }
}
