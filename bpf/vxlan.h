/* SPDX-License-Identifier: GPL-2.0 */
/* VXLAN as a Linux vxlan device configured by flanneld puts it on the wire. */
#ifndef FXDP_VXLAN_H
#define FXDP_VXLAN_H

#include <uapi/linux/pkt_cls.h>

#include "counters.h"
#include "hash.h"
#include "maps.h"
#include "parse.h"

/* Outer TTL: ip_default_ttl, which a vxlan device with ttl 0 inherits. */
#define VXLAN_OUTER_TTL		64
/* UDP source ports come from the flow hash within the ephemeral range, as udp_flow_src_port(). */
#define VXLAN_SPORT_MIN		32768
#define VXLAN_SPORT_MAX		61000
#define ECN_MASK		0x03
#define ECN_ECT_0		0x02
#define ECN_CE			0x03

#ifndef BPF_F_ADJ_ROOM_ENCAP_L2_ETH
#define BPF_F_ADJ_ROOM_ENCAP_L2_ETH	(1ULL << 6)
#endif

struct vxlan_encap_headers {
	struct ethhdr eth;
	struct iphdr ip;
	struct udphdr udp;
	struct vxlanhdr vxlan;
	struct ethhdr inner_eth;
} __attribute__((packed));

/* Outer ECN as the kernel's INET_ECN_encapsulate(): inner ECN copied, CE sent as ECT(0). */
static __always_inline __u8 vxlan_outer_ecn(__u8 inner_tos)
{
	__u8 ecn = inner_tos & ECN_MASK;

	return ecn == ECN_CE ? ECN_ECT_0 : ecn;
}

/*
 * The sender of a decapsulated frame must own the subnet of its inner source
 * address: the frame's outer source must be that subnet's registered public IP.
 */
static __always_inline int vxlan_source_reason(__be32 outer_src, __be32 inner_src)
{
	struct subnet_key key = { .prefixlen = IPV4_ADDR_BITS, .addr = inner_src };
	struct remote_subnet *owner = subnets.lookup(&key);

	if (!owner)
		return DROP_UNKNOWN_SOURCE;
	if (owner->public_ip != outer_src)
		return DROP_SPOOFED_SOURCE;
	return REASON_NONE;
}

/*
 * The inner flow's hash, from its addresses, protocol and (unfragmented TCP/UDP)
 * ports. Computed here rather than with bpf_get_hash_recalc(): an skb whose hash
 * was cleared (NAT, kube-proxy's DNAT) would otherwise run the flow dissector and
 * siphash for every packet, a third of this program's cost.
 */
static __always_inline __u32 inner_flow_hash(const struct iphdr *ip, void *data_end)
{
	__u32 ports = 0;

	if ((ip->protocol == IPPROTO_TCP || ip->protocol == IPPROTO_UDP) &&
	    !(ip->frag_off & bpf_htons(IP_FRAG_MASK))) {
		const void *l4 = (const void *)ip + ((ip->ihl * 4) & IPV4_IHL_BYTES_MASK);

		if (ip->ihl >= IPV4_HLEN / 4 && l4 + sizeof(__u32) <= data_end)
			ports = *(const __u32 *)l4;
	}
	return fmix32(ip->saddr ^ fmix32(ip->daddr ^ fmix32(ports ^ ip->protocol)));
}

static __always_inline __be16 vxlan_source_port(__u32 hash)
{
	return bpf_htons((__u16)((((__u64)hash * (VXLAN_SPORT_MAX - VXLAN_SPORT_MIN)) >> 32) +
				 VXLAN_SPORT_MIN));
}

/*
 * Push outer Ethernet/IPv4/UDP/VXLAN in front of the IPv4 frame at skb->data
 * and write the inner Ethernet header (our VtepMAC -> the peer's VtepMAC).
 * The outer Ethernet header is left for redirect_to_next_hop(). Returns
 * REASON_NONE or a DROP_* reason.
 */
static __always_inline int vxlan_encap(struct __sk_buff *skb, const struct node_config *cfg,
				       const struct remote_subnet *peer)
{
	const __u64 flags = BPF_F_ADJ_ROOM_FIXED_GSO | BPF_F_ADJ_ROOM_ENCAP_L3_IPV4 |
			    BPF_F_ADJ_ROOM_ENCAP_L4_UDP | BPF_F_ADJ_ROOM_ENCAP_L2_ETH |
			    BPF_F_ADJ_ROOM_ENCAP_L2(ETH_HLEN);
	const int grow = VXLAN_ENCAP_LEN;
	struct vxlan_encap_headers *h;
	void *data, *data_end;
	__be16 sport;
	__u8 inner_tos;
	__u32 outer_len;

	data = (void *)(long)skb->data;
	data_end = (void *)(long)skb->data_end;
	if (data + ETH_HLEN + IPV4_HLEN > data_end)
		return DROP_MALFORMED;
	inner_tos = ((struct iphdr *)(data + ETH_HLEN))->tos;
	/* The hash must be taken before the headers change: it is the inner flow's. */
	sport = vxlan_source_port(inner_flow_hash(data + ETH_HLEN, data_end));

	outer_len = skb->len - ETH_HLEN + grow;
	if (outer_len > IPV4_MAX_LEN)
		return DROP_TOO_BIG;
	if (bpf_skb_adjust_room(skb, grow, BPF_ADJ_ROOM_MAC, flags))
		return DROP_ENCAP_FAILED;

	data = (void *)(long)skb->data;
	data_end = (void *)(long)skb->data_end;
	h = data;
	if ((void *)(h + 1) > data_end)
		return DROP_ENCAP_FAILED;

	__builtin_memcpy(h->inner_eth.h_dest, peer->vtep_mac, ETH_ALEN);
	__builtin_memcpy(h->inner_eth.h_source, cfg->vtep_mac, ETH_ALEN);
	h->inner_eth.h_proto = bpf_htons(ETH_P_IP);

	h->vxlan.flags = VXLAN_FLAG_VNI;
	h->vxlan.reserved1[0] = h->vxlan.reserved1[1] = h->vxlan.reserved1[2] = 0;
	h->vxlan.vni[0] = cfg->vni >> 16;
	h->vxlan.vni[1] = cfg->vni >> 8;
	h->vxlan.vni[2] = cfg->vni;
	h->vxlan.reserved2 = 0;

	h->udp.source = sport;
	h->udp.dest = cfg->vxlan_port;
	h->udp.len = bpf_htons(outer_len - IPV4_HLEN);
	/*
	 * No outer UDP checksum: valid for IPv4 and what RFC 7348 recommends; the
	 * kernel's vxlan device (udpcsum on by default) would compute one.
	 */
	h->udp.check = 0;

	h->eth.h_proto = bpf_htons(ETH_P_IP);
	h->ip.version = 4;
	h->ip.ihl = IPV4_HLEN / 4;
	h->ip.tos = vxlan_outer_ecn(inner_tos);
	h->ip.tot_len = bpf_htons(outer_len);
	h->ip.id = 0;
	h->ip.frag_off = bpf_htons(IP_DF);
	h->ip.ttl = VXLAN_OUTER_TTL;
	h->ip.protocol = IPPROTO_UDP;
	h->ip.saddr = cfg->public_ip;
	h->ip.daddr = peer->public_ip;
	h->ip.check = ipv4_header_csum(&h->ip);
	return REASON_NONE;
}

#endif
