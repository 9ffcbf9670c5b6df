// SPDX-License-Identifier: GPL-2.0 OR Apache-2.0
/* lbcluster's kernel fast path: a tc (clsact ingress / tcx) program on the node's uplink that
 * forwards the packets of offloaded sessions itself, with exactly the engine's Full-NAT rewrite,
 * and hands everything else to the kernel (and so to the TUN device and the engine) untouched.
 *
 * Decisions, in one place:
 * - Only what the engine would forward unchanged but for the rewrite: IPv4 without options or
 *   fragmentation, IPv6 whose next header is TCP or UDP, TTL / hop limit above 1, TCP without
 *   SYN, FIN or RST (state changes stay the engine's), UDP. Everything else returns TC_ACT_OK.
 * - The way out is asked of the kernel's FIB for the rewritten destination before anything is
 *   changed; no route: the packet goes to the slow path untouched (counted).
 * - Checksums go through the kernel's helpers, which know CHECKSUM_PARTIAL and GSO: addresses
 *   as pseudo-header changes, ports as plain ones; a UDP checksum of 0 stays 0 and a computed 0
 *   becomes 0xffff (BPF_F_MARK_MANGLED_0), as in the engine.
 * - TTL / hop limit is decremented once: the packet is forwarded here, not by the kernel.
 * - Per side of a session: last-seen time, packets and bytes, and for TCP the highest sequence
 *   number sent and the largest window advertised, so the engine keeps expiring only idle flows
 *   and accepting only in-window RSTs. Counters are atomic adds; the window edges are plain
 *   stores (two CPUs racing on one flow can lose an update; the engine allows for it).
 */
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/pkt_cls.h>
#include <linux/tcp.h>
#include <linux/udp.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>

#include "fastpath.h"

#ifndef AF_INET
#define AF_INET 2
#endif
#ifndef AF_INET6
#define AF_INET6 10
#endif
#define IP_MF 0x2000
#define IP_OFFSET 0x1fff

/* The loader sets the size (twice the node's session capacity: two keys a session); entries are
 * allocated as they are inserted, not up front. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct lbc_flow_key);
	__type(value, struct lbc_flow);
} lbc_flows SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, LBC_COUNTERS);
	__type(key, __u32);
	__type(value, __u64);
} lbc_counters SEC(".maps");

static __always_inline int count(__u32 which, int verdict)
{
	__u64 *c = bpf_map_lookup_elem(&lbc_counters, &which);

	if (c)
		*c += 1;
	return verdict;
}

/* What the parsers found: the key, and where the rewrite writes. */
struct parsed {
	struct lbc_flow_key key;
	__u32 l3_off;      /* the IP header */
	__u32 l4_off;      /* the TCP or UDP header */
	__u32 l4_csum_off; /* the L4 checksum field */
	__u32 ip_len;      /* the IP packet's length */
	__u32 seq;         /* TCP: sequence number (host order) */
	__u32 payload;     /* TCP: payload length */
	__u16 window;      /* TCP: window field (host order) */
	__u8 ttl;          /* TTL or hop limit */
	__u8 tos;
};

/* Parses the L4 header at `l4`; false if the packet is not for the fast path. */
static __always_inline int parse_l4(void *l4, void *data_end, struct parsed *p, __u32 l4_len)
{
	if (p->key.proto == IPPROTO_TCP) {
		struct tcphdr *th = l4;

		if ((void *)(th + 1) > data_end)
			return 0;
		if (th->syn || th->fin || th->rst)
			return 0;
		__u32 hdr = th->doff * 4;

		if (hdr < sizeof(*th) || hdr > l4_len)
			return 0;
		p->key.sport = th->source;
		p->key.dport = th->dest;
		p->l4_csum_off = p->l4_off + offsetof(struct tcphdr, check);
		p->seq = bpf_ntohl(th->seq);
		p->payload = l4_len - hdr;
		p->window = bpf_ntohs(th->window);
		return 1;
	}
	if (p->key.proto == IPPROTO_UDP) {
		struct udphdr *uh = l4;

		if ((void *)(uh + 1) > data_end)
			return 0;
		p->key.sport = uh->source;
		p->key.dport = uh->dest;
		p->l4_csum_off = p->l4_off + offsetof(struct udphdr, check);
		return 1;
	}
	return 0;
}

static __always_inline int parse_v4(struct __sk_buff *skb, struct parsed *p)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct iphdr *ip = data + ETH_HLEN;

	if ((void *)(ip + 1) > data_end)
		return 0;
	if (ip->version != 4 || ip->ihl != 5)
		return 0;
	if (ip->frag_off & bpf_htons(IP_MF | IP_OFFSET))
		return 0;
	if (ip->ttl <= 1)
		return 0;
	__u32 len = bpf_ntohs(ip->tot_len);

	if (len < sizeof(*ip))
		return 0;
	p->key.family = LBC_FAMILY_V4;
	p->key.proto = ip->protocol;
	p->key.src[0] = ip->saddr;
	p->key.dst[0] = ip->daddr;
	p->l3_off = ETH_HLEN;
	p->l4_off = ETH_HLEN + sizeof(*ip);
	p->ip_len = len;
	p->ttl = ip->ttl;
	p->tos = ip->tos;
	return parse_l4(ip + 1, data_end, p, len - sizeof(*ip));
}

static __always_inline int parse_v6(struct __sk_buff *skb, struct parsed *p)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct ipv6hdr *ip6 = data + ETH_HLEN;

	if ((void *)(ip6 + 1) > data_end)
		return 0;
	if (ip6->version != 6 || ip6->hop_limit <= 1)
		return 0;
	/* Extension headers (fragments among them) are the engine's. */
	if (ip6->nexthdr != IPPROTO_TCP && ip6->nexthdr != IPPROTO_UDP)
		return 0;
	__u32 payload = bpf_ntohs(ip6->payload_len);

	p->key.family = LBC_FAMILY_V6;
	p->key.proto = ip6->nexthdr;
	__builtin_memcpy(p->key.src, &ip6->saddr, 16);
	__builtin_memcpy(p->key.dst, &ip6->daddr, 16);
	p->l3_off = ETH_HLEN;
	p->l4_off = ETH_HLEN + sizeof(*ip6);
	p->ip_len = sizeof(*ip6) + payload;
	p->ttl = ip6->hop_limit;
	return parse_l4(ip6 + 1, data_end, p, payload);
}

/* Rewrites addresses, ports and TTL and fixes the checksums; false if a helper refused
 * (the packet may then be half rewritten: it is dropped). */
static __always_inline int rewrite(struct __sk_buff *skb, struct parsed *p, struct lbc_flow *f)
{
	__u64 mangled = p->key.proto == IPPROTO_UDP ? BPF_F_MARK_MANGLED_0 : 0;
	int v6 = p->key.family == LBC_FAMILY_V6;
	__u32 alen = v6 ? 16 : 4;
	__u32 src_off = p->l3_off + (v6 ? offsetof(struct ipv6hdr, saddr) : offsetof(struct iphdr, saddr));
	__u32 dst_off = p->l3_off + (v6 ? offsetof(struct ipv6hdr, daddr) : offsetof(struct iphdr, daddr));
	__s64 diff;

	/* The addresses: one pseudo-header difference for the L4 checksum, and for IPv4 the
	 * header checksum. */
	if (v6) {
		diff = bpf_csum_diff(p->key.src, 16, f->src, 16, 0);
		diff = bpf_csum_diff(p->key.dst, 16, f->dst, 16, diff);
	} else {
		diff = bpf_csum_diff(p->key.src, 4, f->src, 4, 0);
		diff = bpf_csum_diff(p->key.dst, 4, f->dst, 4, diff);
	}
	if (diff < 0)
		return 0;
	if (bpf_l4_csum_replace(skb, p->l4_csum_off, 0, diff, BPF_F_PSEUDO_HDR | mangled))
		return 0;
	if (!v6 && bpf_l3_csum_replace(skb, p->l3_off + offsetof(struct iphdr, check), 0, diff, 0))
		return 0;
	if (bpf_skb_store_bytes(skb, src_off, f->src, alen, 0) ||
	    bpf_skb_store_bytes(skb, dst_off, f->dst, alen, 0))
		return 0;

	/* The ports. */
	if (bpf_l4_csum_replace(skb, p->l4_csum_off, p->key.sport, f->sport, sizeof(__be16) | mangled) ||
	    bpf_l4_csum_replace(skb, p->l4_csum_off, p->key.dport, f->dport, sizeof(__be16) | mangled))
		return 0;
	if (bpf_skb_store_bytes(skb, p->l4_off, &f->sport, sizeof(__be16), 0) ||
	    bpf_skb_store_bytes(skb, p->l4_off + sizeof(__be16), &f->dport, sizeof(__be16), 0))
		return 0;

	/* One hop: TTL or hop limit. */
	__u8 ttl = p->ttl - 1;

	if (v6)
		return !bpf_skb_store_bytes(skb, p->l3_off + offsetof(struct ipv6hdr, hop_limit), &ttl, 1, 0);
	/* The TTL shares a 16-bit word of the header checksum with the protocol. */
	__be16 old_word = bpf_htons(((__u16)p->ttl << 8) | p->key.proto);
	__be16 new_word = bpf_htons(((__u16)ttl << 8) | p->key.proto);

	if (bpf_l3_csum_replace(skb, p->l3_off + offsetof(struct iphdr, check), old_word, new_word, sizeof(__be16)))
		return 0;
	return !bpf_skb_store_bytes(skb, p->l3_off + offsetof(struct iphdr, ttl), &ttl, 1, 0);
}

SEC("classifier")
int lbc_fastpath(struct __sk_buff *skb)
{
	struct parsed p = {};
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;
	int ok;

	if ((void *)(eth + 1) > data_end)
		return TC_ACT_OK;
	/* The headers must be in the linear part for the parsers to see them. */
	if (data + ETH_HLEN + sizeof(struct ipv6hdr) + sizeof(struct tcphdr) > data_end) {
		bpf_skb_pull_data(skb, ETH_HLEN + sizeof(struct ipv6hdr) + sizeof(struct tcphdr));
		data = (void *)(long)skb->data;
		data_end = (void *)(long)skb->data_end;
		eth = data;
		if ((void *)(eth + 1) > data_end)
			return TC_ACT_OK;
	}
	if (eth->h_proto == bpf_htons(ETH_P_IP))
		ok = parse_v4(skb, &p);
	else if (eth->h_proto == bpf_htons(ETH_P_IPV6))
		ok = parse_v6(skb, &p);
	else
		return TC_ACT_OK;
	if (!ok)
		return count(LBC_NOT_FORWARDABLE, TC_ACT_OK);

	struct lbc_flow *f = bpf_map_lookup_elem(&lbc_flows, &p.key);

	if (!f)
		return count(LBC_NO_ENTRY, TC_ACT_OK);

	/* The way out, before anything changes. */
	struct bpf_fib_lookup fib = {};

	fib.l4_protocol = p.key.proto;
	fib.sport = f->sport;
	fib.dport = f->dport;
	/* tot_len 0: the kernel checks the skb itself against the egress MTU, GSO super-packets
	 * by their segments (a length given here would be the whole super-packet's). */
	fib.tot_len = 0;
	fib.ifindex = skb->ingress_ifindex;
	if (p.key.family == LBC_FAMILY_V4) {
		fib.family = AF_INET;
		fib.tos = p.tos;
		fib.ipv4_src = f->src[0];
		fib.ipv4_dst = f->dst[0];
	} else {
		fib.family = AF_INET6;
		__builtin_memcpy(fib.ipv6_src, f->src, 16);
		__builtin_memcpy(fib.ipv6_dst, f->dst, 16);
	}
	int route = bpf_fib_lookup(skb, &fib, sizeof(fib), 0);

	/* Too big for the way out: the slow path answers with the ICMP error. */
	if (route == BPF_FIB_LKUP_RET_FRAG_NEEDED)
		return count(LBC_TOO_BIG, TC_ACT_OK);
	if (route != BPF_FIB_LKUP_RET_SUCCESS && route != BPF_FIB_LKUP_RET_NO_NEIGH)
		return count(LBC_NO_ROUTE, TC_ACT_OK);

	if (p.key.proto == IPPROTO_TCP) {
		__u32 end = p.seq + p.payload;
		__u32 win = (__u32)p.window << (f->wscale & 15);

		if ((__s32)(end - f->seq_end) > 0)
			f->seq_end = end;
		if (win > f->max_win)
			f->max_win = win;
	}
	if (!rewrite(skb, &p, f))
		return count(LBC_REWRITE_FAILED, TC_ACT_SHOT);
	f->last_seen_ns = bpf_ktime_get_ns();
	__sync_fetch_and_add(&f->packets, 1);
	__sync_fetch_and_add(&f->bytes, p.ip_len);
	count(LBC_FORWARDED, 0);

	if (route == BPF_FIB_LKUP_RET_NO_NEIGH)
		return bpf_redirect_neigh(fib.ifindex, NULL, 0, 0);
	/* The packet pointers are stale after the helpers: write the MACs through the helper. */
	if (bpf_skb_store_bytes(skb, offsetof(struct ethhdr, h_dest), fib.dmac, ETH_ALEN, 0) ||
	    bpf_skb_store_bytes(skb, offsetof(struct ethhdr, h_source), fib.smac, ETH_ALEN, 0))
		return count(LBC_REWRITE_FAILED, TC_ACT_SHOT);
	return bpf_redirect(fib.ifindex, 0);
}

char LICENSE[] SEC("license") = "GPL";
