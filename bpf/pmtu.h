/* SPDX-License-Identifier: GPL-2.0 */
/*
 * Path MTU: a packet too big for the route to its peer once it is sent
 * (encapsulated, for vxlan). Our outer header has DF set, so nothing on the way
 * fragments a tunnel packet, and one that the route's MTU (locked, or learnt
 * from an underlay router's ICMP) cannot take would be lost. Instead, as a
 * router does and as the kernel's tunnels do for what they bridge
 * (skb_tunnel_check_pmtu()), a DF packet is answered with ICMP "fragmentation
 * needed" carrying the MTU left for the inner packet (the route's MTU less the
 * encapsulation: the value the kernel's vxlan device records as the inner
 * route's PMTU); its sender, a pod's TCP included, then sends smaller packets.
 * The answer is built in the packet itself and handed to the stack as if it had
 * come out of the tunnel, so netfilter relates it to the flow (and undoes a
 * Service's DNAT in the quoted header) on its way back to the sender.
 * A packet without DF may be fragmented, which a BPF program cannot do. Where
 * flannel.<VNI> is the kernel's vxlan device (the kernel ingress hook), such a
 * vxlan packet is handed to it with its tunnel metadata: the device
 * encapsulates it without DF and the stack fragments the outer packet, as with
 * flanneld's own device. Elsewhere it is dropped as too_big. (A pod's stack sends
 * such packets in fragments that fit, but conntrack on the node reassembles them,
 * in the bridge's netfilter hooks, and the reassembled packet is not cut again.)
 */
#ifndef FXDP_PMTU_H
#define FXDP_PMTU_H

#include <uapi/linux/bpf.h>
#include <uapi/linux/icmp.h>
#include <uapi/linux/pkt_cls.h>

#include "counters.h"
#include "csum.h"
#include "maps.h"
#include "parse.h"
#include "vxlan.h"

/*
 * Every IPv4 host accepts a 576-byte datagram (RFC 791): an ICMP error quotes
 * as much of the packet as fits in that (RFC 1812), and a path MTU below it is
 * not announced (iptunnel_pmtud_check_icmp() does not either).
 */
#define IPV4_MIN_MTU		576
#define ICMP_HLEN		((int)sizeof(struct icmphdr))
#define ICMP_QUOTE_LEN		(IPV4_MIN_MTU - IPV4_HLEN - ICMP_HLEN)
/* ip_default_ttl, what the kernel's own ICMP errors start with */
#define ICMP_REPLY_TTL		64

/* What a frame grows by when sent to a peer of this backend. */
static __always_inline __u32 encap_len(int backend)
{
	return backend == BACKEND_VXLAN ? VXLAN_ENCAP_LEN : 0;
}

/*
 * The IP length of each packet the frame at skb->data (Ethernet, then the IPv4
 * header at ip) is on the wire: its own, or for a GSO aggregate that of the
 * segments it will be cut into, as skb_gso_network_seglen() counts them (0 when
 * that cannot be told, a TCP header beyond the linear data: not checked then).
 */
static __always_inline __u32 ipv4_wire_len(const struct __sk_buff *skb, const struct iphdr *ip,
					   const void *data_end)
{
	__u32 ihl = (ip->ihl * 4) & IPV4_IHL_BYTES_MASK;
	const struct tcphdr *th = (const void *)ip + ihl;

	if (!skb->gso_size)
		return skb->len - ETH_HLEN;
	if (ip->protocol == IPPROTO_UDP)
		return ihl + UDP_HLEN + skb->gso_size;
	if (ip->protocol != IPPROTO_TCP || (const void *)(th + 1) > data_end)
		return 0;
	return ihl + th->doff * 4 + skb->gso_size;
}

/* ICMP errors that must not be answered with another (RFC 1122 3.2.2, icmp_is_err()). */
static __always_inline int icmp_is_error(__u8 type)
{
	return type == ICMP_DEST_UNREACH || type == ICMP_SOURCE_QUENCH ||
	       type == ICMP_REDIRECT || type == ICMP_TIME_EXCEEDED || type == ICMP_PARAMETERPROB;
}

/* The IPv4 packet at ip may be answered with "fragmentation needed" (bounds-checked by the caller). */
static __always_inline int frag_needed_answerable(const struct iphdr *ip, const void *data_end,
						  __u32 mtu)
{
	const struct icmphdr *icmp = (const void *)(ip + 1);

	/* DF and no fragment: what iptunnel_pmtud_check_icmp() answers. */
	if (mtu < IPV4_MIN_MTU || ip->frag_off != bpf_htons(IP_DF) || ip->version != 4 ||
	    ip->ihl < IPV4_HLEN / 4)
		return 0;
	if (ip->protocol != IPPROTO_ICMP)
		return 1;
	return (const void *)(icmp + 1) <= data_end && ip->ihl == IPV4_HLEN / 4 &&
	       !icmp_is_error(icmp->type);
}

/* The ICMP "fragmentation needed" header with a length and checksum still to fill in. */
struct frag_needed_reply {
	struct ethhdr eth;
	struct iphdr ip;
	struct icmphdr icmp;
} __attribute__((packed));

/*
 * Hands a vxlan frame without DF to the kernel's vxlan device (flannel.<VNI> with
 * the kernel hook), which sends it to the peer as flanneld's device would, in
 * outer fragments. Returns TC_ACT_OK (counted as encap), or TC_ACT_SHOT (counted
 * as too_big) where the device is ours, a veth.
 */
static __always_inline int send_by_kernel_vxlan(struct __sk_buff *skb,
						const struct node_config *cfg,
						const struct remote_subnet *peer, __u64 bytes)
{
#ifdef FXDP_KERNEL_DECAP
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct bpf_tunnel_key key = {};
	struct ethhdr *eth = data;
	struct iphdr *ip = (void *)(eth + 1);

	if ((void *)(ip + 1) > data_end)
		goto too_big;
	__builtin_memcpy(eth->h_dest, peer->vtep_mac, ETH_ALEN);
	__builtin_memcpy(eth->h_source, cfg->vtep_mac, ETH_ALEN);
	key.tunnel_id = cfg->vni;
	key.remote_ipv4 = bpf_ntohl(peer->public_ip);
	key.local_ipv4 = bpf_ntohl(cfg->public_ip);
	key.tunnel_tos = vxlan_outer_ecn(ip->tos);
	key.tunnel_ttl = VXLAN_OUTER_TTL;
	/* No BPF_F_DONT_FRAGMENT: the outer packet may be cut. Outer UDP checksum 0, as ours. */
	if (bpf_skb_set_tunnel_key(skb, &key, sizeof(key), BPF_F_ZERO_CSUM_TX))
		goto too_big;
	count_traffic(BACKEND_VXLAN, DIR_ENCAP, bytes);
	return TC_ACT_OK;
too_big:
#endif
	count_reason(BACKEND_VXLAN, DROP_TOO_BIG, bytes);
	return TC_ACT_SHOT;
}

/*
 * A frame at tunnel_egress that the route to its peer cannot take: mtu is what
 * is left for the inner packet. Returns TC_ACT_REDIRECT with the frame turned
 * into the ICMP answer to its sender, handed to the stack on the tunnel
 * device's ingress (counted as frag_needed); for a vxlan frame without DF, what
 * send_by_kernel_vxlan() returns; else TC_ACT_SHOT (counted as too_big).
 * bytes: the frame's length as it came.
 */
static __always_inline int answer_too_big(struct __sk_buff *skb, const struct node_config *cfg,
					  const struct remote_subnet *peer, __u32 mtu, __u64 bytes)
{
	int backend = peer->backend;
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	const __u32 reply_len = ETH_HLEN + IPV4_MIN_MTU;
	struct frag_needed_reply *r;
	struct ethhdr *eth = data;
	struct iphdr *ip = (void *)(eth + 1);
	__u8 sender_mac[ETH_ALEN], tunnel_mac[ETH_ALEN];
	__be32 sender, receiver;

	if ((void *)(ip + 1) > data_end)
		goto too_big;
	if (!(ip->frag_off & bpf_htons(IP_DF)) && backend == BACKEND_VXLAN)
		return send_by_kernel_vxlan(skb, cfg, peer, bytes);
	if (!frag_needed_answerable(ip, data_end, mtu) || skb->len < ETH_HLEN + ICMP_QUOTE_LEN)
		goto too_big;
	sender = ip->saddr;
	receiver = ip->daddr;
	/* The stack sent it from the tunnel device's MAC: the answer comes in to it. */
	__builtin_memcpy(sender_mac, eth->h_dest, ETH_ALEN);
	__builtin_memcpy(tunnel_mac, eth->h_source, ETH_ALEN);

	/*
	 * Keep the quote, put the new IP and ICMP headers in front of it, and make it
	 * all linear. A GSO aggregate stops being one when trimmed. A TCP or UDP
	 * packet whose checksum the sending device was to finish (CHECKSUM_PARTIAL)
	 * stays marked so, which no program can change: nothing on the way back
	 * through the stack finishes it, and the receiver takes such a packet as
	 * verified, so the quote keeps the pseudo-header sum the sender wrote.
	 */
	if (bpf_skb_change_tail(skb, ETH_HLEN + ICMP_QUOTE_LEN, 0) ||
	    bpf_skb_adjust_room(skb, IPV4_HLEN + ICMP_HLEN, BPF_ADJ_ROOM_MAC, 0) ||
	    bpf_skb_pull_data(skb, reply_len))
		goto too_big;
	data = (void *)(long)skb->data;
	data_end = (void *)(long)skb->data_end;
	r = data;
	if (data + reply_len > data_end)
		goto too_big;

	__builtin_memcpy(r->eth.h_dest, tunnel_mac, ETH_ALEN);
	__builtin_memcpy(r->eth.h_source, sender_mac, ETH_ALEN);
	r->eth.h_proto = bpf_htons(ETH_P_IP);
	/* From the packet's destination, as the kernel's tunnels answer (iptunnel_pmtud_build_icmp()). */
	r->ip.version = 4;
	r->ip.ihl = IPV4_HLEN / 4;
	r->ip.tos = 0;
	r->ip.tot_len = bpf_htons(IPV4_MIN_MTU);
	r->ip.id = 0;
	r->ip.frag_off = bpf_htons(IP_DF);
	r->ip.ttl = ICMP_REPLY_TTL;
	r->ip.protocol = IPPROTO_ICMP;
	r->ip.saddr = receiver;
	r->ip.daddr = sender;
	r->ip.check = ipv4_header_csum(&r->ip);
	r->icmp.type = ICMP_DEST_UNREACH;
	r->icmp.code = ICMP_FRAG_NEEDED;
	r->icmp.checksum = 0;
	r->icmp.un.frag.__unused = 0;
	r->icmp.un.frag.mtu = bpf_htons(mtu);
	r->icmp.checksum = ~csum_fold32(csum_bytes(&r->icmp, data_end, IPV4_MIN_MTU - IPV4_HLEN));

	count_reason(backend, DROP_FRAG_NEEDED, bytes);
	return bpf_redirect(cfg->tunnel_ifindex, BPF_F_INGRESS);
too_big:
	count_reason(backend, DROP_TOO_BIG, bytes);
	return TC_ACT_SHOT;
}

/*
 * An answer_too_big() reply on the tunnel device's ingress: it carries no tunnel
 * metadata, as nothing the kernel's vxlan device decapsulated lacks it.
 * ip bounds-checked by the caller.
 */
static __always_inline int is_frag_needed_reply(const struct iphdr *ip, const void *data_end)
{
	const struct icmphdr *icmp = (const void *)(ip + 1);

	return ip->ihl == IPV4_HLEN / 4 && ip->protocol == IPPROTO_ICMP &&
	       (const void *)(icmp + 1) <= data_end && icmp->type == ICMP_DEST_UNREACH &&
	       icmp->code == ICMP_FRAG_NEEDED;
}

#endif
