/* SPDX-License-Identifier: GPL-2.0 */
/*
 * Sending a finished IPv4 frame to an underlay next hop from tc: resolve the
 * route and neighbour like the kernel's own output path would, rewrite the
 * Ethernet header, redirect. Used by vxlan encap and host-gw forwarding alike.
 */
#ifndef FXDP_FIB_H
#define FXDP_FIB_H

#include <uapi/linux/pkt_cls.h>

#include "hash.h"

/* bcc 0.26 declares this helper with an outdated prototype; use the kernel's. */
#define fxdp_redirect_neigh \
	((long (*)(__u32 ifindex, void *params, int plen, __u64 flags))BPF_FUNC_redirect_neigh)

/*
 * bpf_fib_lookup() is half of tunnel_egress's cost per packet, and it answers
 * the same for every packet to one peer. Each CPU keeps its last successful
 * answer per peer for NEXT_HOP_CACHE_NS of the coarse clock (bpf_ktime_get_ns
 * reads the TSC, a quarter of a host-gw packet's cost in this VM), so a route
 * or neighbour change reaches the wire at most that plus one timer tick later
 * than the kernel's own output would see it (a kernel neighbour in STALE keeps
 * its old MAC for seconds). Unresolved neighbours and failures are never kept.
 * Direct-mapped by a hash of the next hop: a collision only costs a lookup.
 */
#define NEXT_HOP_CACHE_NS	1000000ULL	/* 1 ms */
#define NEXT_HOP_CACHE_SLOTS	1024		/* a power of two */

struct next_hop {
	__u64 expires_ns;
	__be32 next_hop;		/* the key: peer address, ... */
	__be32 src;			/* ... our source ... */
	__u32 underlay_ifindex;		/* ... and the interface asked for */
	__u32 ifindex;			/* the answer: where to redirect ... */
	__u8 dmac[ETH_ALEN];		/* ... with which addresses */
	__u8 smac[ETH_ALEN];
	/* Largest IP length the route's MTU was seen to allow (0: none checked yet). */
	__u32 max_ok_len;
};

BPF_PERCPU_ARRAY(next_hop_cache, struct next_hop, NEXT_HOP_CACHE_SLOTS);

static __always_inline struct next_hop *next_hop_slot(__be32 next_hop)
{
	__u32 slot = fmix32(next_hop) & (NEXT_HOP_CACHE_SLOTS - 1);

	return next_hop_cache.lookup(&slot);
}

/* A cached answer that holds for a packet of IP length tot_len (0: GSO, any size). */
static __always_inline int next_hop_valid(const struct next_hop *nh, __be32 src, __be32 next_hop,
					  __u32 underlay_ifindex, __u32 tot_len, __u64 now)
{
	return nh->next_hop == next_hop && nh->src == src &&
	       nh->underlay_ifindex == underlay_ifindex && now < nh->expires_ns &&
	       tot_len <= nh->max_ok_len;
}

static __always_inline int rewrite_and_redirect(struct __sk_buff *skb, const __u8 *dmac,
						const __u8 *smac, __u32 ifindex, int *reason)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;

	if ((void *)(eth + 1) > data_end) {
		*reason = DROP_MALFORMED;
		return TC_ACT_SHOT;
	}
	__builtin_memcpy(eth->h_dest, dmac, ETH_ALEN);
	__builtin_memcpy(eth->h_source, smac, ETH_ALEN);
	eth->h_proto = bpf_htons(ETH_P_IP);
	return bpf_redirect(ifindex, 0);
}

/*
 * Returns TC_ACT_REDIRECT, or TC_ACT_SHOT with *reason set. The frame's
 * Ethernet header must be at skb->data and its IPv4 header right after it.
 */
static __always_inline int redirect_to_next_hop(struct __sk_buff *skb, __be32 src,
						__be32 next_hop, __u32 underlay_ifindex,
						int *reason)
{
	struct bpf_fib_lookup fib = {};
	struct next_hop *cached;
	void *data, *data_end;
	__u32 tot_len = 0;
	__u64 now;
	int rc;

	/*
	 * A GSO packet is segmented to the route MTU later; only check single frames.
	 * Test gso_size, not gso_segs: bpf_skb_adjust_room() zeroes gso_segs when it
	 * grows a GSO packet (vxlan encap), which made every encapsulated GSO packet
	 * look like one oversized frame.
	 */
	if (!skb->gso_size)
		tot_len = skb->len - ETH_HLEN;
	now = bpf_ktime_get_coarse_ns();
	cached = next_hop_slot(next_hop);
	if (cached && next_hop_valid(cached, src, next_hop, underlay_ifindex, tot_len, now))
		return rewrite_and_redirect(skb, cached->dmac, cached->smac, cached->ifindex, reason);

	fib.family = AF_INET;
	fib.ipv4_src = src;
	fib.ipv4_dst = next_hop;
	fib.ifindex = underlay_ifindex;
	fib.tot_len = tot_len;

	rc = bpf_fib_lookup(skb, &fib, sizeof(fib), BPF_FIB_LOOKUP_OUTPUT);
	if (rc == BPF_FIB_LKUP_RET_NO_NEIGH) {
		/*
		 * Let the neighbour subsystem resolve and queue, as ip_finish_output2 does.
		 * A packet addressed to the peer itself (vxlan: the outer header) is best
		 * routed by the kernel: that also replaces the skb's route, still the
		 * one into the tunnel device, which the neighbour code would otherwise use
		 * to send the packet it queued. Any other packet (host-gw: addressed to a
		 * remote pod) needs the next hop named, or the kernel resolves the pod's
		 * address on the underlay, which nobody answers.
		 */
		struct bpf_redir_neigh nh = { .nh_family = AF_INET, .ipv4_nh = fib.ipv4_dst };
		struct iphdr *ip;

		data = (void *)(long)skb->data;
		data_end = (void *)(long)skb->data_end;
		ip = data + ETH_HLEN;
		if ((void *)(ip + 1) > data_end) {
			*reason = DROP_MALFORMED;
			return TC_ACT_SHOT;
		}
		if (ip->daddr == next_hop)
			return fxdp_redirect_neigh(fib.ifindex, 0, 0, 0);
		return fxdp_redirect_neigh(fib.ifindex, &nh, sizeof(nh), 0);
	}
	if (rc == BPF_FIB_LKUP_RET_FRAG_NEEDED) {
		*reason = DROP_TOO_BIG;
		return TC_ACT_SHOT;
	}
	if (rc != BPF_FIB_LKUP_RET_SUCCESS) {
		*reason = DROP_NO_UNDERLAY_ROUTE;
		return TC_ACT_SHOT;
	}
	if (cached) {
		/* An expired or foreign entry starts its size record over. */
		if (!next_hop_valid(cached, src, next_hop, underlay_ifindex, 0, now))
			cached->max_ok_len = 0;
		if (tot_len > cached->max_ok_len)
			cached->max_ok_len = tot_len;
		cached->next_hop = next_hop;
		cached->src = src;
		cached->underlay_ifindex = underlay_ifindex;
		cached->ifindex = fib.ifindex;
		__builtin_memcpy(cached->dmac, fib.dmac, ETH_ALEN);
		__builtin_memcpy(cached->smac, fib.smac, ETH_ALEN);
		cached->expires_ns = now + NEXT_HOP_CACHE_NS;
	}
	return rewrite_and_redirect(skb, fib.dmac, fib.smac, fib.ifindex, reason);
}

#endif
