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
 * The conntrack lookup is half of the fast path's cost and answers the same for
 * every packet of a flow: each CPU keeps its last "yes" per flow for FLOW_CACHE_NS
 * of the coarse clock, as fib.h keeps FIB answers. A "no" is never kept, so a
 * flow's first packets find conntrack's entry as soon as the stack confirmed it.
 * Direct-mapped by a hash of the flow: a collision only costs a lookup.
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

/* A UDP flow conntrack has confirmed un-NATed, as one direction's packets show it. */
struct fast_flow {
	__u64 expires_ns;
	__be32 saddr;
	__be32 daddr;
	__be16 sport;
	__be16 dport;
};

BPF_PERCPU_ARRAY(fast_flows, struct fast_flow, FLOW_CACHE_SLOTS);

static __always_inline int fast_flow_is(const struct fast_flow *f, const struct iphdr *ip,
					const struct udphdr *udp)
{
	return f->saddr == ip->saddr && f->daddr == ip->daddr && f->sport == udp->source &&
	       f->dport == udp->dest;
}

/*
 * The gate both directions share: one whole, unfragmented UDP datagram without IP
 * options that may still be forwarded, of a flow conntrack confirmed and did not
 * NAT. ip and udp must be bounds-checked by the caller.
 */
static __always_inline int fast_path_allows(struct __sk_buff *skb, const struct iphdr *ip,
					    const struct udphdr *udp)
{
	__u32 ports = (__u32)udp->source << 16 | udp->dest;
	__u32 slot = fmix32(ip->saddr ^ fmix32(ip->daddr ^ fmix32(ports))) & (FLOW_CACHE_SLOTS - 1);
	struct fast_flow *f;
	__u64 status, now;

	if (skb->gso_size)
		return 0;
	if (ip->version != 4 || ip->ihl != IPV4_HLEN / 4 || ip->protocol != IPPROTO_UDP ||
	    (ip->frag_off & bpf_htons(IP_FRAG_MASK)) || ip->ttl <= 1)
		return 0;
	now = bpf_ktime_get_coarse_ns();
	f = fast_flows.lookup(&slot);
	if (f && now < f->expires_ns && fast_flow_is(f, ip, udp))
		return 1;
	status = ct_status_ipv4(skb, ip->saddr, ip->daddr, udp->source, udp->dest, IPPROTO_UDP);
	if (!(status & FXDP_IPS_CONFIRMED) || (status & (FXDP_IPS_SRC_NAT | FXDP_IPS_DST_NAT)))
		return 0;
	if (f) {
		f->saddr = ip->saddr;
		f->daddr = ip->daddr;
		f->sport = udp->source;
		f->dport = udp->dest;
		f->expires_ns = now + FLOW_CACHE_NS;
	}
	return 1;
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
	struct bpf_fib_lookup fib = {};
	struct local_pod *pod;
	__u32 pod_ifindex = 0;
	__be32 daddr;
	struct ethhdr *eth;

	if ((void *)(udp + 1) > data_end || !in_own_subnet(cfg, ip->daddr))
		return TC_ACT_OK;
	if (!fast_path_allows(skb, ip, udp))
		return TC_ACT_OK;
	daddr = ip->daddr;

	fib.family = AF_INET;
	fib.tos = ip->tos;
	fib.tot_len = bpf_ntohs(ip->tot_len);
	fib.ipv4_src = ip->saddr;
	fib.ipv4_dst = daddr;
	/* As the stack would route it: from the vxlan device, or from the underlay. */
	fib.ifindex = offset ? cfg->tunnel_ifindex : cfg->underlay_ifindex;
	if (fib_lookup_cached(skb, &fib, 0) != BPF_FIB_LKUP_RET_SUCCESS)
		return TC_ACT_OK;
	pod = local_pods.lookup(&daddr);	/* fib.ipv4_dst may now be a gateway */
	if (pod && mac_equal(pod->mac, fib.dmac))
		pod_ifindex = pod->ifindex;

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
	__builtin_memcpy(eth->h_dest, fib.dmac, ETH_ALEN);
	__builtin_memcpy(eth->h_source, fib.smac, ETH_ALEN);
	eth->h_proto = bpf_htons(ETH_P_IP);
	decrement_ttl(ip);
	count_traffic(backend, DIR_FAST_DELIVER, skb->len);
	if (pod_ifindex)
		return bpf_redirect_peer(pod_ifindex, 0);
	return bpf_redirect(fib.ifindex, 0);
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
	struct subnet_key key = { .prefixlen = 32 };
	struct remote_subnet peer, *found;
	struct bpf_fib_lookup fib = {};
	struct local_pod *pod;
	__u64 bytes = skb->len;
	__be32 saddr;
	int verdict;

	if ((void *)(udp + 1) > data_end || eth->h_proto != bpf_htons(ETH_P_IP))
		return TC_ACT_OK;
	/*
	 * The pod on this veth, from its own address and MAC, routing through its
	 * gateway: what the bridge would pass up to the node to forward.
	 */
	saddr = ip->saddr;
	pod = local_pods.lookup(&saddr);
	if (!pod || pod->ifindex != skb->ifindex || !mac_equal(eth->h_source, pod->mac) ||
	    !mac_equal(eth->h_dest, pod->gateway_mac) || !in_own_subnet(cfg, saddr))
		return TC_ACT_OK;
	/* What ip_rcv() would refuse or trim is left to it. */
	if (bpf_ntohs(ip->tot_len) != bytes - ETH_HLEN || !ipv4_header_valid(ip))
		return TC_ACT_OK;
	key.addr = ip->daddr;
	found = subnets.lookup(&key);
	if (!found)
		return TC_ACT_OK;
	__builtin_memcpy(&peer, found, sizeof(peer));
	if (!fast_path_allows(skb, ip, udp))
		return TC_ACT_OK;
	/*
	 * The route to the peer, its MTU and its neighbour, asked as redirect_to_next_hop()
	 * will ask (so that one is answered from the cache): a datagram larger than the
	 * route takes (the stack fragments it or answers ICMP), or a peer not resolved yet
	 * (the stack resolves it), is left to the stack.
	 */
	fib.family = AF_INET;
	fib.ipv4_src = cfg->public_ip;
	fib.ipv4_dst = peer.public_ip;
	fib.ifindex = cfg->underlay_ifindex;
	fib.tot_len = bytes - ETH_HLEN + (peer.backend == BACKEND_VXLAN ? VXLAN_ENCAP_LEN : 0);
	if (fib_lookup_cached(skb, &fib, BPF_FIB_LOOKUP_OUTPUT) != BPF_FIB_LKUP_RET_SUCCESS)
		return TC_ACT_OK;
	decrement_ttl(ip);
	verdict = send_to_peer(skb, cfg, &peer, bytes);
	if (verdict != TC_ACT_SHOT)
		count_traffic(peer.backend, DIR_FAST_SEND, bytes);
	return verdict;
}

#endif
