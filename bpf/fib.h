/* SPDX-License-Identifier: GPL-2.0 */
/*
 * Sending a finished IPv4 frame to an underlay next hop from tc: resolve the
 * route and neighbour like the kernel's own output path would, rewrite the
 * Ethernet header, redirect. Used by vxlan encap and host-gw forwarding alike.
 */
#ifndef FXDP_FIB_H
#define FXDP_FIB_H

#include <uapi/linux/bpf.h>
#include <uapi/linux/if_ether.h>
#include <uapi/linux/pkt_cls.h>

#include "hash.h"
#include "parse.h"

/* bcc 0.26 declares this helper with an outdated prototype; use the kernel's. */
#define fxdp_redirect_neigh \
	((long (*)(__u32 ifindex, void *params, int plen, __u64 flags))BPF_FUNC_redirect_neigh)

/*
 * bpf_fib_lookup() is half of tunnel_egress's cost per packet, and it answers
 * the same for every packet to one peer. Each CPU keeps its last successful answer per question for FIB_CACHE_NS
 * of the coarse clock (bpf_ktime_get_ns reads the TSC, a quarter of a host-gw
 * packet's cost in this VM), so a route or neighbour change reaches the wire at
 * most that plus one timer tick later than the kernel's own forwarding would see
 * it (a kernel neighbour in STALE keeps its old MAC for seconds). Unresolved
 * neighbours and failures are never kept. Direct-mapped by a hash of the
 * question: a collision only costs a lookup.
 */
#define FIB_CACHE_NS		1000000ULL	/* 1 ms */
#define FIB_CACHE_SLOTS		1024		/* a power of two */
_Static_assert((FIB_CACHE_SLOTS & (FIB_CACHE_SLOTS - 1)) == 0, "slots are masked, not divided");

/* Where a routed frame goes: the device and the Ethernet addresses to send it with. */
struct next_hop {
	__u32 ifindex;
	__u8 dmac[ETH_ALEN];
	__u8 smac[ETH_ALEN];
};

static __always_inline void next_hop_from(struct next_hop *hop, const struct bpf_fib_lookup *fib)
{
	hop->ifindex = fib->ifindex;
	__builtin_memcpy(hop->dmac, fib->dmac, ETH_ALEN);
	__builtin_memcpy(hop->smac, fib->smac, ETH_ALEN);
}

struct fib_answer {
	__u64 expires_ns;
	__be32 dst;			/* the question: destination, ... */
	__be32 src;			/* ... source, ... */
	__u32 in_ifindex;		/* ... the interface asked for, ... */
	__u32 kind;			/* ... the lookup flags and the TOS (fib_kind()) */
	struct next_hop hop;		/* the answer */
	/* Largest IP length the route's MTU was seen to allow (0: none checked yet). */
	__u32 max_ok_len;
};

BPF_PERCPU_ARRAY(fib_cache, struct fib_answer, FIB_CACHE_SLOTS);

static __always_inline __u32 fib_kind(const struct bpf_fib_lookup *fib, __u32 flags)
{
	return flags | (__u32)fib->tos << 16;
}

/* A cached answer that holds for this question and a packet of IP length tot_len (0: GSO). */
static __always_inline int fib_answer_valid(const struct fib_answer *a, __be32 dst, __be32 src,
					    __u32 in_ifindex, __u32 kind, __u32 tot_len, __u64 now)
{
	return a->dst == dst && a->src == src && a->in_ifindex == in_ifindex && a->kind == kind &&
	       now < a->expires_ns && tot_len <= a->max_ok_len;
}

/*
 * bpf_fib_lookup(), answered from the cache when it can be. fib holds the question
 * (family, ipv4_src, ipv4_dst, ifindex, tos, tot_len); on BPF_FIB_LKUP_RET_SUCCESS it
 * holds ifindex, dmac and smac of the answer; any other result is the kernel's, with
 * fib as it left it.
 */
static __always_inline int fib_lookup_cached(struct __sk_buff *skb, struct bpf_fib_lookup *fib,
					     __u32 flags)
{
	__be32 dst = fib->ipv4_dst, src = fib->ipv4_src;
	__u32 in_ifindex = fib->ifindex, tot_len = fib->tot_len;
	__u32 kind = fib_kind(fib, flags);
	__u32 slot = fmix32(dst ^ fmix32(src ^ in_ifindex ^ kind)) & (FIB_CACHE_SLOTS - 1);
	struct fib_answer *a = fib_cache.lookup(&slot);
	__u64 now = bpf_ktime_get_coarse_ns();
	int rc;

	if (a && fib_answer_valid(a, dst, src, in_ifindex, kind, tot_len, now)) {
		fib->ifindex = a->hop.ifindex;
		__builtin_memcpy(fib->dmac, a->hop.dmac, ETH_ALEN);
		__builtin_memcpy(fib->smac, a->hop.smac, ETH_ALEN);
		return BPF_FIB_LKUP_RET_SUCCESS;
	}
	rc = bpf_fib_lookup(skb, fib, sizeof(*fib), flags);
	if (rc != BPF_FIB_LKUP_RET_SUCCESS || !a)
		return rc;
	/* An expired or foreign entry starts its size record over. */
	if (!fib_answer_valid(a, dst, src, in_ifindex, kind, 0, now))
		a->max_ok_len = 0;
	if (tot_len > a->max_ok_len)
		a->max_ok_len = tot_len;
	a->dst = dst;
	a->src = src;
	a->in_ifindex = in_ifindex;
	a->kind = kind;
	next_hop_from(&a->hop, fib);
	a->expires_ns = now + FIB_CACHE_NS;
	return rc;
}

static __always_inline int rewrite_and_redirect(struct __sk_buff *skb, const struct next_hop *hop,
						int *reason)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;

	if ((void *)(eth + 1) > data_end) {
		*reason = DROP_MALFORMED;
		return TC_ACT_SHOT;
	}
	__builtin_memcpy(eth->h_dest, hop->dmac, ETH_ALEN);
	__builtin_memcpy(eth->h_source, hop->smac, ETH_ALEN);
	eth->h_proto = bpf_htons(ETH_P_IP);
	return bpf_redirect(hop->ifindex, 0);
}

/*
 * The route and neighbour toward next_hop, asked before the frame is sent (and
 * encapsulated): tot_len is the IP length of each packet it will be on the wire
 * (0: not checked against the route's MTU). Returns bpf_fib_lookup()'s answer;
 * on BPF_FIB_LKUP_RET_FRAG_NEEDED, fib->mtu_result holds the route's MTU.
 */
static __always_inline int next_hop_lookup(struct __sk_buff *skb, struct bpf_fib_lookup *fib,
					   __be32 src, __be32 next_hop, __u32 underlay_ifindex,
					   __u32 tot_len)
{
	fib->family = AF_INET;
	fib->ipv4_src = src;
	fib->ipv4_dst = next_hop;
	fib->ifindex = underlay_ifindex;
	fib->tot_len = tot_len;
	return fib_lookup_cached(skb, fib, BPF_FIB_LOOKUP_OUTPUT);
}

/*
 * Sends the frame at skb->data (Ethernet header, then IPv4) by a next_hop_lookup()
 * that answered rc. Returns TC_ACT_REDIRECT, or TC_ACT_SHOT with *reason set.
 */
static __always_inline int redirect_to_next_hop(struct __sk_buff *skb, int rc,
						const struct bpf_fib_lookup *fib,
						__be32 next_hop, int *reason)
{
	struct next_hop hop;

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
		struct bpf_redir_neigh nh = { .nh_family = AF_INET, .ipv4_nh = fib->ipv4_dst };
		void *data = (void *)(long)skb->data;
		void *data_end = (void *)(long)skb->data_end;
		struct iphdr *ip = data + ETH_HLEN;

		if ((void *)(ip + 1) > data_end) {
			*reason = DROP_MALFORMED;
			return TC_ACT_SHOT;
		}
		if (ip->daddr == next_hop)
			return fxdp_redirect_neigh(fib->ifindex, 0, 0, 0);
		return fxdp_redirect_neigh(fib->ifindex, &nh, sizeof(nh), 0);
	}
	if (rc != BPF_FIB_LKUP_RET_SUCCESS) {
		*reason = DROP_NO_UNDERLAY_ROUTE;
		return TC_ACT_SHOT;
	}
	next_hop_from(&hop, fib);
	return rewrite_and_redirect(skb, &hop, reason);
}

#endif
