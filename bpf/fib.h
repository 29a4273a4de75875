/* SPDX-License-Identifier: GPL-2.0 */
/*
 * Sending a finished IPv4 frame to an underlay next hop from tc: resolve the
 * route and neighbour like the kernel's own output path would, rewrite the
 * Ethernet header, redirect. Used by vxlan encap and host-gw forwarding alike.
 */
#ifndef FXDP_FIB_H
#define FXDP_FIB_H

#include <uapi/linux/pkt_cls.h>

/* bcc 0.26 declares this helper with an outdated prototype; use the kernel's. */
#define fxdp_redirect_neigh \
	((long (*)(__u32 ifindex, void *params, int plen, __u64 flags))BPF_FUNC_redirect_neigh)

#ifndef AF_INET
#define AF_INET 2
#endif

/*
 * Returns TC_ACT_REDIRECT, or TC_ACT_SHOT with *reason set. The frame's
 * Ethernet header must be at skb->data and its IPv4 header right after it.
 */
static __always_inline int redirect_to_next_hop(struct __sk_buff *skb, __be32 src,
						__be32 next_hop, __u32 underlay_ifindex,
						int *reason)
{
	struct bpf_fib_lookup fib = {};
	void *data, *data_end;
	struct ethhdr *eth;
	int rc;

	fib.family = AF_INET;
	fib.ipv4_src = src;
	fib.ipv4_dst = next_hop;
	fib.ifindex = underlay_ifindex;
	/*
	 * A GSO packet is segmented to the route MTU later; only check single frames.
	 * Test gso_size, not gso_segs: bpf_skb_adjust_room() zeroes gso_segs when it
	 * grows a GSO packet (vxlan encap), which made every encapsulated GSO packet
	 * look like one oversized frame.
	 */
	if (!skb->gso_size)
		fib.tot_len = skb->len - ETH_HLEN;

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
	data = (void *)(long)skb->data;
	data_end = (void *)(long)skb->data_end;
	eth = data;
	if ((void *)(eth + 1) > data_end) {
		*reason = DROP_MALFORMED;
		return TC_ACT_SHOT;
	}
	__builtin_memcpy(eth->h_dest, fib.dmac, ETH_ALEN);
	__builtin_memcpy(eth->h_source, fib.smac, ETH_ALEN);
	eth->h_proto = bpf_htons(ETH_P_IP);
	return bpf_redirect(fib.ifindex, 0);
}

#endif
