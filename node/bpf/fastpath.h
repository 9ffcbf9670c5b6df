/* The fast path's map layout: the one definition the eBPF program is compiled with. The node's
 * Rust mirror (node/src/packet_io/fastpath/abi.rs) is checked against the BTF clang writes
 * into the object from this file, so the two cannot drift unnoticed (a unit test fails).
 *
 * Every address and port is in network byte order, as on the wire; an IPv4 address is the
 * first word of its array, the other three are zero. */
#ifndef LBC_FASTPATH_H
#define LBC_FASTPATH_H

#include <linux/types.h>

/* `struct lbc_flow.side` */
#define LBC_CLIENT_SIDE 0 /* client → VIP, leaving as LIP → real server */
#define LBC_SERVER_SIDE 1 /* real server → LIP, leaving as VIP → client */

/* `struct lbc_flow_key.family` */
#define LBC_FAMILY_V4 4
#define LBC_FAMILY_V6 6

/* A packet's 5-tuple as it arrives: client → VIP for the client side of a session, real
 * server → LIP for its server side. */
struct lbc_flow_key {
	__u8 family;
	__u8 proto; /* IPPROTO_TCP or IPPROTO_UDP */
	__be16 sport;
	__be16 dport;
	__u16 pad; /* zero */
	__be32 src[4];
	__be32 dst[4];
};

/* What the program does with a packet of one side of a session, and what it saw. The engine
 * writes the first part when it offloads the session and never changes it; the program writes
 * the second. */
struct lbc_flow {
	/* The rewrite: the packet leaves as src:sport → dst:dport. */
	__be32 src[4];
	__be32 dst[4];
	__be16 sport;
	__be16 dport;
	/* TCP: the window-scale shift of this side's advertised windows (0 unless both SYNs
	 * carried the option), as the engine's window tracker uses it. */
	__u8 wscale;
	__u8 side;   /* LBC_CLIENT_SIDE or LBC_SERVER_SIDE: which side of the session this is */
	__u8 pad[2]; /* zero */
	/* Reserved for the SYN proxy: added to the sequence and acknowledgement numbers of this
	 * side's segments. Zero: the program does not read them yet. */
	__u32 seq_delta;
	__u32 ack_delta;
	/* Written by the program. */
	__u64 last_seen_ns; /* bpf_ktime_get_ns() of the last packet forwarded */
	__u64 packets;      /* packets forwarded (a GSO super-packet counts once, as in the engine) */
	__u64 bytes;        /* their IP lengths */
	__u32 seq_end;      /* TCP: the highest sequence number + length sent by this side */
	__u32 max_win;      /* TCP: the largest (scaled) window this side advertised */
};

/* Counters of the program, one array slot each (per CPU). */
enum lbc_fastpath_counter {
	LBC_FORWARDED = 0,   /* rewritten and redirected */
	LBC_NO_ENTRY,        /* parsed, but no session is offloaded for it */
	LBC_NOT_FORWARDABLE, /* SYN, FIN, RST, fragment, options, TTL ≤ 1, other protocols */
	LBC_NO_ROUTE,        /* the kernel's FIB has no route for the rewritten packet */
	LBC_REWRITE_FAILED,  /* a helper refused halfway: the packet is dropped */
	LBC_TOO_BIG,         /* over the way out's MTU: the slow path sends the ICMP error */
	LBC_COUNTERS,
};

#endif
