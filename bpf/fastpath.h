/* SPDX-License-Identifier: GPL-2.0 */
/*
 * The UDP fast path (built with FXDP_UDP_FAST_PATH into the kernel hook's
 * underlay_tc). A judged VXLAN frame whose inner packet is a single UDP datagram
 * to a pod of this node is decapsulated here and sent straight to the pod's
 * bridge, skipping the inner packet's routing and netfilter pass, but only when
 * that pass provably changes nothing:
 *  - conntrack has a confirmed entry for the flow (the stack, with its netfilter
 *    rules, let the flow's first packet through) and the entry is not NATed
 *    (no Service DNAT to undo, no masquerade); an unknown, unconfirmed or NATed
 *    flow takes the normal path, so does every TCP segment (conntrack must see a
 *    TCP stream in both directions to keep tracking its windows), every fragment
 *    and every GSO aggregate;
 *  - the FIB forwards it to an interface with a resolved neighbour: the MACs and
 *    the TTL are set as the kernel's forwarding would set them.
 * A pod the agent has put in local_pods (its veth end, with the MAC the FIB
 * answered) gets the packet in its own netns directly (bpf_redirect_peer); any
 * other goes out through cni0, which delivers it as the bridge does.
 * Everything else returns TC_ACT_OK and the kernel's vxlan device decapsulates.
 * What the fast path does not do: refresh the conntrack entry (a one-way flow's
 * entry expires and its next packet takes the stack, which confirms it again),
 * and re-run filter rules on every packet of a confirmed flow, so a rule added
 * later that drops an established UDP flow takes effect when its entry goes
 * (`conntrack -D` makes that immediate).
 */
#ifndef FXDP_FASTPATH_H
#define FXDP_FASTPATH_H

#include "parse.h"
#include "underlay.h"
#include "kfuncs.h"

/*
 * Returns TC_ACT_REDIRECT (delivered, counted), TC_ACT_SHOT (counted) or
 * TC_ACT_OK (not for the fast path; the packet is untouched).
 */
static __always_inline int udp_fast_path(struct __sk_buff *skb, const struct node_config *cfg,
					 __u64 bytes)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct iphdr *ip = data + VXLAN_ENCAP_LEN + ETH_HLEN;
	struct udphdr *udp = (void *)(ip + 1);
	struct bpf_fib_lookup fib = {};
	struct local_pod *pod;
	__u32 pod_ifindex = 0;
	__be32 daddr;
	struct ethhdr *eth;
	__u64 status;
	__u16 old_ttl;

	if (skb->gso_size || (void *)(udp + 1) > data_end)
		return TC_ACT_OK;
	if (ip->ihl != IPV4_HLEN / 4 || ip->protocol != IPPROTO_UDP ||
	    (ip->frag_off & bpf_htons(IP_FRAG_MASK)) || ip->ttl <= 1)
		return TC_ACT_OK;
	daddr = ip->daddr;
	if (!in_own_subnet(cfg, daddr))
		return TC_ACT_OK;

	status = ct_status_ipv4(skb, ip->saddr, ip->daddr, udp->source, udp->dest, IPPROTO_UDP);
	if (!(status & FXDP_IPS_CONFIRMED) || (status & (FXDP_IPS_SRC_NAT | FXDP_IPS_DST_NAT)))
		return TC_ACT_OK;

	fib.family = AF_INET;
	fib.tos = ip->tos;
	fib.l4_protocol = IPPROTO_UDP;
	fib.sport = udp->source;
	fib.dport = udp->dest;
	fib.tot_len = bpf_ntohs(ip->tot_len);
	fib.ipv4_src = ip->saddr;
	fib.ipv4_dst = ip->daddr;
	fib.ifindex = cfg->tunnel_ifindex;	/* as if the vxlan device had delivered it */
	if (bpf_fib_lookup(skb, &fib, sizeof(fib), 0) != BPF_FIB_LKUP_RET_SUCCESS)
		return TC_ACT_OK;
	pod = local_pods.lookup(&daddr);	/* fib.ipv4_dst may now be a gateway */
	if (pod && mac_equal(pod->mac, fib.dmac))
		pod_ifindex = pod->ifindex;

	if (bpf_skb_adjust_room(skb, -(VXLAN_ENCAP_LEN), BPF_ADJ_ROOM_MAC,
				BPF_F_ADJ_ROOM_FIXED_GSO)) {
		count_reason(BACKEND_VXLAN, DROP_ENCAP_FAILED, bytes);
		return TC_ACT_SHOT;
	}
	data = (void *)(long)skb->data;
	data_end = (void *)(long)skb->data_end;
	eth = data;
	ip = (void *)(eth + 1);
	if ((void *)(ip + 1) > data_end) {
		count_reason(BACKEND_VXLAN, DROP_MALFORMED, bytes);
		return TC_ACT_SHOT;
	}
	__builtin_memcpy(eth->h_dest, fib.dmac, ETH_ALEN);
	__builtin_memcpy(eth->h_source, fib.smac, ETH_ALEN);
	eth->h_proto = bpf_htons(ETH_P_IP);
	/* TTL shares its 16-bit word with the protocol. */
	old_ttl = *(__u16 *)&ip->ttl;
	ip->ttl--;
	ip->check = csum_replace16(ip->check, old_ttl, *(__u16 *)&ip->ttl);
	count_traffic(BACKEND_VXLAN, DIR_FAST_PATH, skb->len);
	if (pod_ifindex)
		return bpf_redirect_peer(pod_ifindex, 0);
	return bpf_redirect(fib.ifindex, 0);
}

#endif
