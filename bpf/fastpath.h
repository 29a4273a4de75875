/* SPDX-License-Identifier: GPL-2.0 */
/*
 * The fast path (built with FXDP_FAST_PATH): UDP datagrams, and with FAST_TCP the
 * segments of established TCP streams, between pods of different nodes skip the
 * node's routing and netfilter pass on both ends, but only when that pass
 * provably changes nothing:
 *  - conntrack has a confirmed entry for the flow (the stack, with its netfilter
 *    rules, let the flow's first packet through; for TCP, the whole handshake:
 *    the entry is assured) and the entry is not NATed (no Service DNAT to undo,
 *    no masquerade); an unknown, unconfirmed or NATed flow takes the normal path,
 *    so does every fragment, every UDP GSO aggregate and every header the stack
 *    would refuse (conntrack.h, which also keeps the entry alive);
 *  - TCP with FAST_TCP, and only of a flow whose entry is marked to have its
 *    windows unchecked (conntrack.h; the agent marks them): conntrack does not
 *    see the segments the fast path carries, so it must not judge the next one it
 *    sees against the windows of the last. SYN, FIN and RST segments always take
 *    the stack, so conntrack follows each stream's state from open to close;
 *  - the packet goes where the kernel's forwarding would send it, with the MACs
 *    and the TTL it would set; a TCP GSO aggregate goes whole, checked against the
 *    route's MTU by the size of the segments it will be cut into, as ip_forward()
 *    checks it.
 * Receiving (underlay_tc, fast_deliver()): a judged VXLAN frame, or a host-gw
 * peer's plain packet, for a pod of this node is handed to the pod. A pod the
 * agent has put in local_pods (its veth end, with the MAC the FIB answered) gets
 * it in its own netns directly (bpf_redirect_peer); any other through cni0.
 * Sending (pod_ingress on a pod's veth end, fast_send()): a packet that a pod
 * in local_pods routes through its gateway, from its own address and MAC, to a
 * remote subnet goes to the peer as tunnel_egress would send it (send.h),
 * without crossing cni0 and its bridge netfilter hooks.
 * What the fast path does not do: re-run filter rules on every packet of a
 * confirmed flow, so a rule added later that drops an established flow takes
 * effect when its entry goes (`conntrack -D` makes that immediate, give or take
 * FLOW_CACHE_NS). It does refresh the entry's timeout (conntrack.h), as the
 * stack would, but at most a few times per timeout.
 *
 * Each CPU keeps its last decision per flow for FLOW_CACHE_NS of the coarse clock:
 * conntrack's verdict, the route's answer (next hop, and the largest packet seen
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

#include <uapi/linux/bpf.h>
#include <uapi/linux/pkt_cls.h>

#include "counters.h"
#include "csum.h"
#include "hash.h"
#include "conntrack.h"
#include "maps.h"
#include "parse.h"
#include "send.h"
#include "underlay.h"

#define FLOW_CACHE_NS		1000000ULL	/* 1 ms */
#define FLOW_CACHE_SLOTS	1024		/* a power of two */
_Static_assert((FLOW_CACHE_SLOTS & (FLOW_CACHE_SLOTS - 1)) == 0, "slots are masked, not divided");

/* A flow as one place sees it: the question a decision answers. */
struct fast_flow_key {
	__be32 saddr;
	__be32 daddr;
	__be16 sport;
	__be16 dport;
	__u32 in_ifindex;		/* where the stack would see it arrive */
	__u8 in_smac[ETH_ALEN];		/* sending: the pod's frame, from its MAC ... */
	__u8 in_dmac[ETH_ALEN];		/* ... to its gateway's (receiving: zero) */
	__u8 tos;			/* the route's question has it */
	__u8 protocol;
	__u8 pad[2];
} __attribute__((aligned(8)));

struct fast_flow {
	struct fast_flow_key key;
	__u64 expires_ns;
	__u32 max_ok_len;		/* largest segment (IP length) seen to fit the route */
	__u32 pod_ifindex;		/* receiving: the pod's veth end (0: through hop) */
	struct next_hop hop;
	struct remote_subnet peer;	/* sending */
};

BPF_PERCPU_ARRAY(fast_flows, struct fast_flow, FLOW_CACHE_SLOTS);

/* ports: the first word of the UDP or TCP header, which both start with the ports. */
static __always_inline void fast_flow_key_of(struct fast_flow_key *k, const struct iphdr *ip,
					     const struct udphdr *ports, __u32 in_ifindex)
{
	k->saddr = ip->saddr;
	k->daddr = ip->daddr;
	k->sport = ports->source;
	k->dport = ports->dest;
	k->in_ifindex = in_ifindex;
	k->tos = ip->tos;
	k->protocol = ip->protocol;
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

/* The slot's decision holds for this flow and a packet of segment length len. */
static __always_inline int fast_flow_holds(const struct fast_flow *f, const struct fast_flow_key *k,
					   __u32 len, __u64 now)
{
	return f && now < f->expires_ns && len <= f->max_ok_len && fast_flow_key_equal(&f->key, k);
}

/*
 * Keeps a decision just taken for a packet of segment length len. A miss on an
 * unexpired entry of the same flow means a packet larger than it had seen, which the
 * route has just taken: so len is always the new size record.
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
 * What both directions require of the packet itself, and the IP length of each
 * segment it is on the wire (0: not for the fast path): an unfragmented IPv4
 * packet without options that may still be forwarded, and either one whole UDP
 * datagram or, with FAST_TCP, a TCP segment or GSO aggregate of segments that
 * is neither SYN, FIN nor RST (conntrack's state of the stream follows those).
 * ip must be bounds-checked by the caller.
 */
static __always_inline __u32 fast_path_len(const struct __sk_buff *skb,
					   const struct node_config *cfg, const struct iphdr *ip,
					   const void *data_end)
{
	const struct udphdr *udp = (const void *)(ip + 1);
	const struct tcphdr *th = (const void *)(ip + 1);

	if (ip->version != 4 || ip->ihl != IPV4_HLEN / 4 ||
	    (ip->frag_off & bpf_htons(IP_FRAG_MASK)) || ip->ttl <= 1)
		return 0;
	if (ip->protocol == IPPROTO_UDP)
		return (void *)(udp + 1) <= data_end && !skb->gso_size ? bpf_ntohs(ip->tot_len) : 0;
	if (ip->protocol != IPPROTO_TCP || !(cfg->fast_flags & FAST_TCP) ||
	    (void *)(th + 1) > data_end || th->syn || th->fin || th->rst || !th->ack ||
	    th->doff < TCP_HLEN / 4)
		return 0;
	return skb->gso_size ? IPV4_HLEN + th->doff * 4 + skb->gso_size : bpf_ntohs(ip->tot_len);
}

/* ... and of its flow: conntrack.h's conditions (which also keep its entry alive). */
static __always_inline int conntrack_passes(struct __sk_buff *skb, const struct iphdr *ip,
					    const struct udphdr *ports)
{
	return ct_flow_passes(skb, ip->saddr, ip->daddr, ports->source, ports->dest, ip->protocol);
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
	struct udphdr *ports = (void *)(ip + 1);
	struct fast_flow_key key = {};
	struct next_hop hop;
	struct fast_flow *f;
	__u32 pod_ifindex, len;
	struct ethhdr *eth;
	__u64 now;

	if ((void *)(ports + 1) > data_end || !in_own_subnet(cfg, ip->daddr))
		return TC_ACT_OK;
	len = fast_path_len(skb, cfg, ip, data_end);
	if (!len)
		return TC_ACT_OK;
	/* As the stack would route it: from the vxlan device, or from the underlay. */
	fast_flow_key_of(&key, ip, ports, offset ? cfg->tunnel_ifindex : cfg->underlay_ifindex);
	now = bpf_ktime_get_coarse_ns();
	f = fast_flow_slot(&key);
	if (fast_flow_holds(f, &key, len, now)) {
		hop = f->hop;
		pod_ifindex = f->pod_ifindex;
	} else {
		struct bpf_fib_lookup fib = {};
		struct local_pod *pod;
		__be32 daddr = ip->daddr;

		if (!conntrack_passes(skb, ip, ports))
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
	/*
	 * A TCP aggregate decapsulated here keeps its UDP-tunnel GSO type (see
	 * underlay_tc.c): the pod's own netns takes it whole, but cni0 would segment
	 * it in software, which the vxlan device's decapsulation does not need.
	 */
	if (offset && skb->gso_size && !pod_ifindex)
		return TC_ACT_OK;

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
	struct udphdr *ports = (void *)(ip + 1);
	struct fast_flow_key key = {};
	struct remote_subnet peer;
	struct next_hop hop;
	struct fast_flow *f;
	__u64 bytes = skb->len;
	__u32 len;
	__u64 now;
	int verdict;

	if ((void *)(ports + 1) > data_end || eth->h_proto != bpf_htons(ETH_P_IP))
		return TC_ACT_OK;
	/* What ip_rcv() would refuse or trim is left to it. */
	if (bpf_ntohs(ip->tot_len) != bytes - ETH_HLEN || !ipv4_header_valid(ip))
		return TC_ACT_OK;
	len = fast_path_len(skb, cfg, ip, data_end);
	if (!len)
		return TC_ACT_OK;
	fast_flow_key_of(&key, ip, ports, skb->ifindex);
	__builtin_memcpy(key.in_smac, eth->h_source, ETH_ALEN);
	__builtin_memcpy(key.in_dmac, eth->h_dest, ETH_ALEN);
	now = bpf_ktime_get_coarse_ns();
	f = fast_flow_slot(&key);
	if (fast_flow_holds(f, &key, len, now)) {
		hop = f->hop;
		peer = f->peer;
	} else {
		struct subnet_key dst = { .prefixlen = IPV4_ADDR_BITS, .addr = key.daddr };
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
		if (!conntrack_passes(skb, ip, ports))
			return TC_ACT_OK;
		/*
		 * The route to the peer, its MTU and its neighbour: a packet larger than
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
