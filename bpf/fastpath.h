/* SPDX-License-Identifier: GPL-2.0 */
/*
 * The UDP fast path (built with FXDP_UDP_FAST_PATH, kernel hook only): single
 * UDP datagrams between pods of different nodes skip the node's routing and
 * netfilter pass on both ends, but only when that pass provably changes nothing:
 *  - conntrack has a confirmed entry for the flow (the stack, with its netfilter
 *    rules, let the flow's first packet through) and the entry is not NATed
 *    (no Service DNAT to undo, no masquerade); an unknown, unconfirmed or NATed
 *    flow takes the normal path, so does every TCP segment (conntrack must see a
 *    TCP stream in both directions to keep tracking its windows), every fragment,
 *    every GSO aggregate and every header the stack would refuse;
 *  - the packet goes where the kernel's forwarding would send it, with the MACs
 *    and the TTL it would set.
 * Receiving (underlay_tc, fast_deliver()): a judged VXLAN frame, or a host-gw
 * peer's plain packet, for a pod of this node is handed to the pod. A pod the
 * agent has put in local_pods (its veth end, with the MAC the FIB answered) gets
 * it in its own netns directly (bpf_redirect_peer); any other through cni0.
 * Sending (pod_ingress on a pod's veth end, fast_send()): a datagram that a pod
 * in local_pods routes through its gateway, from its own address and MAC, to a
 * remote subnet goes to the peer as tunnel_egress would send it (send.h),
 * without crossing cni0 and its bridge netfilter hooks.
 * What the fast path does not do: refresh the conntrack entry (a one-way flow's
 * entry expires and its next packet takes the stack, which confirms it again),
 * and re-run filter rules on every packet of a confirmed flow, so a rule added
 * later that drops an established UDP flow takes effect when its entry goes
 * (`conntrack -D` makes that immediate, give or take FLOW_CACHE_NS).
 *
 * Each CPU keeps its last decision per flow for FLOW_CACHE_NS of the coarse clock:
 * conntrack's verdict, the route's answer (next hop, and the largest datagram seen
 * to fit it), and the pod (receiving) or the peer (sending), so that a flow's
 * packets after its first in that window cost no map, conntrack or FIB lookup.
 * Everything these answers were
 * derived from is in the key, down to the pod's MACs; what the key cannot hold
 * (conntrack, the FIB, the peer and pod maps changing) reaches the fast path at
 * most FLOW_CACHE_NS plus one timer tick late, as fib.h's cache does for
 * tunnel_egress. A "no" is never kept, so a flow's first packets find conntrack's
 * entry as soon as the stack confirmed it. Direct-mapped by a hash of the flow: a
 * collision only costs the lookups.
 */
#ifndef FXDP_FASTPATH_H
#define FXDP_FASTPATH_H

#include "parse.h"
#include "csum.h"
#include "underlay.h"
#include "kfuncs.h"
#include "send.h"

#define FLOW_CACHE_NS		1000000ULL	/* 1 ms */
#define FLOW_CACHE_SLOTS	1024		/* a power of two */

/* A UDP flow as one place sees it: the question a decision answers. */
struct fast_flow_key {
	__be32 saddr;
	__be32 daddr;
	__be16 sport;
	__be16 dport;
	__u32 in_ifindex;		/* where the stack would see it arrive */
	__u8 in_smac[ETH_ALEN];		/* sending: the pod's frame, from its MAC ... */
	__u8 in_dmac[ETH_ALEN];		/* ... to its gateway's (receiving: zero) */
	__u8 tos;			/* the route's question has it */
	__u8 pad[3];
} __attribute__((aligned(8)));

struct fast_flow {
	struct fast_flow_key key;
	__u64 expires_ns;
	__u32 max_ok_len;		/* largest IP length seen to fit the route */
	__u32 pod_ifindex;		/* receiving: the pod's veth end (0: through hop) */
	struct next_hop hop;
	struct remote_subnet peer;	/* sending */
};

BPF_PERCPU_ARRAY(fast_flows, struct fast_flow, FLOW_CACHE_SLOTS);

static __always_inline void fast_flow_key_of(struct fast_flow_key *k, const struct iphdr *ip,
					     const struct udphdr *udp, __u32 in_ifindex)
{
	k->saddr = ip->saddr;
	k->daddr = ip->daddr;
	k->sport = udp->source;
	k->dport = udp->dest;
	k->in_ifindex = in_ifindex;
	k->tos = ip->tos;
}

static __always_inline int fast_flow_key_equal(const struct fast_flow_key *a,
					       const struct fast_flow_key *b)
{
	const __u64 *x = (const __u64 *)a, *y = (const __u64 *)b;

	_Static_assert(sizeof(struct fast_flow_key) == 4 * sizeof(__u64), "compared as 4 words");
	return x[0] == y[0] && x[1] == y[1] && x[2] == y[2] && x[3] == y[3];
}

static __always_inline struct fast_flow *fast_flow_slot(const struct fast_flow_key *k)
{
	__u32 ports = (__u32)k->sport << 16 | k->dport;
	__u32 slot = fmix32(k->saddr ^ fmix32(k->daddr ^ fmix32(ports ^ k->in_ifindex))) &
		     (FLOW_CACHE_SLOTS - 1);

	return fast_flows.lookup(&slot);
}

/* The slot's decision holds for this flow and a datagram of IP length len. */
static __always_inline int fast_flow_holds(const struct fast_flow *f, const struct fast_flow_key *k,
					   __u32 len, __u64 now)
{
	return f && now < f->expires_ns && len <= f->max_ok_len && fast_flow_key_equal(&f->key, k);
}

/*
 * Keeps a decision just taken for a datagram of IP length len. A miss on an unexpired
 * entry of the same flow means a datagram larger than it had seen, which the route
 * has just taken: so len is always the new size record.
 */
static __always_inline void fast_flow_keep(struct fast_flow *f, const struct fast_flow_key *k,
					   __u32 len, __u64 now, const struct next_hop *hop,
					   __u32 pod_ifindex, const struct remote_subnet *peer)
{
	if (!f)
		return;
	__builtin_memcpy(&f->key, k, sizeof(*k));
	f->max_ok_len = len;
	f->hop = *hop;
	f->pod_ifindex = pod_ifindex;
	if (peer)
		f->peer = *peer;
	f->expires_ns = now + FLOW_CACHE_NS;
}

/*
 * What both directions require of the packet itself: one whole, unfragmented UDP
 * datagram without IP options that may still be forwarded. ip must be
 * bounds-checked by the caller.
 */
static __always_inline int fast_path_takes(struct __sk_buff *skb, const struct iphdr *ip)
{
	return !skb->gso_size && ip->version == 4 && ip->ihl == IPV4_HLEN / 4 &&
	       ip->protocol == IPPROTO_UDP && !(ip->frag_off & bpf_htons(IP_FRAG_MASK)) &&
	       ip->ttl > 1;
}

/* ... and of its flow: conntrack confirmed it and does not NAT it. */
static __always_inline int conntrack_passes(struct __sk_buff *skb, const struct iphdr *ip,
					    const struct udphdr *udp)
{
	__u64 status = ct_status_ipv4(skb, ip->saddr, ip->daddr, udp->source, udp->dest,
				      IPPROTO_UDP);

	return (status & FXDP_IPS_CONFIRMED) && !(status & (FXDP_IPS_SRC_NAT | FXDP_IPS_DST_NAT));
}

/* What forwarding does to the header: TTL shares its 16-bit word with the protocol. */
static __always_inline void decrement_ttl(struct iphdr *ip)
{
	__u16 old = *(__u16 *)&ip->ttl;

	ip->ttl--;
	ip->check = csum_replace16(ip->check, old, *(__u16 *)&ip->ttl);
}

/*
 * Receiving: the IPv4 packet at offset + ETH_HLEN (offset VXLAN_ENCAP_LEN: a
 * judged VXLAN frame for this node; 0: a host-gw peer's packet) to a local pod.
 * Returns TC_ACT_REDIRECT (delivered, counted), TC_ACT_SHOT (counted) or
 * TC_ACT_OK (not for the fast path; the packet is untouched).
 */
static __always_inline int fast_deliver(struct __sk_buff *skb, const struct node_config *cfg,
					__u64 bytes, const int offset, const int backend)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct iphdr *ip = data + offset + ETH_HLEN;
	struct udphdr *udp = (void *)(ip + 1);
	struct fast_flow_key key = {};
	struct next_hop hop;
	struct fast_flow *f;
	__u32 pod_ifindex, len;
	struct ethhdr *eth;
	__u64 now;

	if ((void *)(udp + 1) > data_end || !in_own_subnet(cfg, ip->daddr) ||
	    !fast_path_takes(skb, ip))
		return TC_ACT_OK;
	/* As the stack would route it: from the vxlan device, or from the underlay. */
	fast_flow_key_of(&key, ip, udp, offset ? cfg->tunnel_ifindex : cfg->underlay_ifindex);
	len = bpf_ntohs(ip->tot_len);
	now = bpf_ktime_get_coarse_ns();
	f = fast_flow_slot(&key);
	if (fast_flow_holds(f, &key, len, now)) {
		hop = f->hop;
		pod_ifindex = f->pod_ifindex;
	} else {
		struct bpf_fib_lookup fib = {};
		struct local_pod *pod;
		__be32 daddr = ip->daddr;

		if (!conntrack_passes(skb, ip, udp))
			return TC_ACT_OK;
		fib.family = AF_INET;
		fib.tos = key.tos;
		fib.tot_len = len;
		fib.ipv4_src = key.saddr;
		fib.ipv4_dst = daddr;
		fib.ifindex = key.in_ifindex;
		if (bpf_fib_lookup(skb, &fib, sizeof(fib), 0) != BPF_FIB_LKUP_RET_SUCCESS)
			return TC_ACT_OK;
		next_hop_from(&hop, &fib);
		pod = local_pods.lookup(&daddr);	/* fib.ipv4_dst may now be a gateway */
		pod_ifindex = pod && mac_equal(pod->mac, hop.dmac) ? pod->ifindex : 0;
		fast_flow_keep(f, &key, len, now, &hop, pod_ifindex, NULL);
	}

	if (offset && bpf_skb_adjust_room(skb, -offset, BPF_ADJ_ROOM_MAC,
					  BPF_F_ADJ_ROOM_FIXED_GSO)) {
		count_reason(backend, DROP_ENCAP_FAILED, bytes);
		return TC_ACT_SHOT;
	}
	data = (void *)(long)skb->data;
	data_end = (void *)(long)skb->data_end;
	eth = data;
	ip = (void *)(eth + 1);
	if ((void *)(ip + 1) > data_end) {
		count_reason(backend, DROP_MALFORMED, bytes);
		return TC_ACT_SHOT;
	}
	__builtin_memcpy(eth->h_dest, hop.dmac, ETH_ALEN);
	__builtin_memcpy(eth->h_source, hop.smac, ETH_ALEN);
	eth->h_proto = bpf_htons(ETH_P_IP);
	decrement_ttl(ip);
	count_traffic(backend, DIR_FAST_DELIVER, skb->len);
	if (pod_ifindex)
		return bpf_redirect_peer(pod_ifindex, 0);
	return bpf_redirect(hop.ifindex, 0);
}

/*
 * Sending: a frame on a pod's veth end, from the pod. Returns TC_ACT_REDIRECT (sent,
 * counted), TC_ACT_SHOT (counted) or TC_ACT_OK (not for the fast path; the packet
 * is untouched).
 */
static __always_inline int fast_send(struct __sk_buff *skb, const struct node_config *cfg)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;
	struct iphdr *ip = (void *)(eth + 1);
	struct udphdr *udp = (void *)(ip + 1);
	struct fast_flow_key key = {};
	struct remote_subnet peer;
	struct next_hop hop;
	struct fast_flow *f;
	__u64 bytes = skb->len;
	__u32 len;
	__u64 now;
	int verdict;

	if ((void *)(udp + 1) > data_end || eth->h_proto != bpf_htons(ETH_P_IP))
		return TC_ACT_OK;
	len = bpf_ntohs(ip->tot_len);
	/* What ip_rcv() would refuse or trim is left to it. */
	if (len != bytes - ETH_HLEN || !ipv4_header_valid(ip) || !fast_path_takes(skb, ip))
		return TC_ACT_OK;
	fast_flow_key_of(&key, ip, udp, skb->ifindex);
	__builtin_memcpy(key.in_smac, eth->h_source, ETH_ALEN);
	__builtin_memcpy(key.in_dmac, eth->h_dest, ETH_ALEN);
	now = bpf_ktime_get_coarse_ns();
	f = fast_flow_slot(&key);
	if (fast_flow_holds(f, &key, len, now)) {
		hop = f->hop;
		peer = f->peer;
	} else {
		struct subnet_key dst = { .prefixlen = 32, .addr = key.daddr };
		struct bpf_fib_lookup fib = {};
		struct remote_subnet *found;
		struct local_pod *pod;
		__be32 saddr = key.saddr;

		/*
		 * The pod on this veth, from its own address and MAC, routing through its
		 * gateway: what the bridge would pass up to the node to forward.
		 */
		pod = local_pods.lookup(&saddr);
		if (!pod || pod->ifindex != skb->ifindex || !mac_equal(key.in_smac, pod->mac) ||
		    !mac_equal(key.in_dmac, pod->gateway_mac) || !in_own_subnet(cfg, saddr))
			return TC_ACT_OK;
		found = subnets.lookup(&dst);
		if (!found)
			return TC_ACT_OK;
		peer = *found;
		if (!conntrack_passes(skb, ip, udp))
			return TC_ACT_OK;
		/*
		 * The route to the peer, its MTU and its neighbour: a datagram larger than
		 * the route takes after encapsulation (the stack fragments it or answers
		 * ICMP), or a peer not resolved yet (the stack resolves it), is left to
		 * the stack.
		 */
		fib.family = AF_INET;
		fib.ipv4_src = cfg->public_ip;
		fib.ipv4_dst = peer.public_ip;
		fib.ifindex = cfg->underlay_ifindex;
		fib.tot_len = len + (peer.backend == BACKEND_VXLAN ? VXLAN_ENCAP_LEN : 0);
		if (bpf_fib_lookup(skb, &fib, sizeof(fib), BPF_FIB_LOOKUP_OUTPUT) !=
		    BPF_FIB_LKUP_RET_SUCCESS)
			return TC_ACT_OK;
		next_hop_from(&hop, &fib);
		fast_flow_keep(f, &key, len, now, &hop, 0, &peer);
	}
	decrement_ttl(ip);
	verdict = send_to_peer(skb, cfg, &peer, &hop, bytes);
	if (verdict != TC_ACT_SHOT)
		count_traffic(peer.backend, DIR_FAST_SEND, bytes);
	return verdict;
}

#endif
