/* SPDX-License-Identifier: GPL-2.0 */
/* Bounds-checked header parsing over a linear buffer [data, data_end). */
#ifndef FXDP_PARSE_H
#define FXDP_PARSE_H

#include <uapi/linux/if_ether.h>
#include <uapi/linux/in.h>
#include <uapi/linux/ip.h>
#include <uapi/linux/udp.h>
#include <uapi/linux/tcp.h>

#include "types.h"

#define IPV4_HLEN	((int)sizeof(struct iphdr))	/* without options */
#define UDP_HLEN	((int)sizeof(struct udphdr))
#define TCP_HLEN	((int)sizeof(struct tcphdr))	/* without options */
#define VXLAN_HLEN	8
#define VXLAN_FLAG_VNI	0x08			/* the I flag, first byte */
/* Outer headers a VXLAN frame carries before the inner Ethernet header. */
#define VXLAN_ENCAP_LEN	(ETH_HLEN + IPV4_HLEN + UDP_HLEN + VXLAN_HLEN)
#define IP_FRAG_MASK	0x3fff			/* MF flag and fragment offset */
#define IP_DF		0x4000
#define IPV4_MAX_LEN	0xffff			/* tot_len is 16 bits */
#define IPV4_IHL_BYTES_MASK	0x3c		/* ihl * 4 is at most 60: bounds a header's length */
#ifndef AF_INET
#define AF_INET		2			/* bpf_fib_lookup's family (linux/socket.h) */
#endif

struct vxlanhdr {
	__u8 flags;
	__u8 reserved1[3];
	__u8 vni[3];
	__u8 reserved2;
};

/* A parsed frame: pointers are valid for their header's full length. */
struct outer_headers {
	struct ethhdr *eth;
	struct iphdr *ip;
	struct udphdr *udp;
	struct vxlanhdr *vxlan;
};

static __always_inline int is_vlan_proto(__be16 proto)
{
	return proto == bpf_htons(ETH_P_8021Q) || proto == bpf_htons(ETH_P_8021AD);
}

/* Open-coded: __builtin_memcmp may become a call to memcmp, which BPF lacks. */
static __always_inline int mac_equal(const __u8 *a, const __u8 *b)
{
	return ((a[0] ^ b[0]) | (a[1] ^ b[1]) | (a[2] ^ b[2]) |
		(a[3] ^ b[3]) | (a[4] ^ b[4]) | (a[5] ^ b[5])) == 0;
}

static __always_inline __u32 vxlan_vni(const struct vxlanhdr *vx)
{
	return ((__u32)vx->vni[0] << 16) | ((__u32)vx->vni[1] << 8) | vx->vni[2];
}

/*
 * Parse Ethernet + IPv4 (no options, no fragments). Returns REASON_NONE with
 * h->eth and h->ip set, or the PASS_* reason that stops the parse.
 */
static __always_inline int parse_eth_ipv4(void *data, void *data_end,
					  struct outer_headers *h)
{
	struct ethhdr *eth = data;
	struct iphdr *ip;

	if ((void *)(eth + 1) > data_end)
		return PASS_TRUNCATED;
	if (is_vlan_proto(eth->h_proto))
		return PASS_VLAN;
	if (eth->h_proto != bpf_htons(ETH_P_IP))
		return PASS_NOT_IPV4;
	ip = (void *)(eth + 1);
	if ((void *)(ip + 1) > data_end)
		return PASS_TRUNCATED;
	if (ip->version != 4)
		return PASS_NOT_IPV4;
	if (ip->ihl != IPV4_HLEN / 4)
		return ip->ihl < IPV4_HLEN / 4 ? PASS_TRUNCATED : PASS_IP_OPTIONS;
	if (ip->frag_off & bpf_htons(IP_FRAG_MASK))
		return PASS_IP_FRAGMENT;
	h->eth = eth;
	h->ip = ip;
	return REASON_NONE;
}

/*
 * After parse_eth_ipv4(): is this UDP to our public IP and VXLAN port with our
 * VNI? Returns REASON_NONE with h->udp and h->vxlan set, else the PASS_*
 * reason: anything not ours goes to the stack untouched.
 */
static __always_inline int parse_vxlan(struct outer_headers *h, void *data_end,
				       const struct node_config *cfg)
{
	struct udphdr *udp;
	struct vxlanhdr *vx;

	if (h->ip->protocol != IPPROTO_UDP)
		return PASS_NOT_UDP;
	if (h->ip->daddr != cfg->public_ip)
		return PASS_OTHER_ADDRESS;
	udp = (void *)(h->ip + 1);
	if ((void *)(udp + 1) > data_end)
		return PASS_TRUNCATED;
	if (udp->dest != cfg->vxlan_port)
		return PASS_OTHER_PORT;
	vx = (void *)(udp + 1);
	if ((void *)(vx + 1) > data_end)
		return PASS_TRUNCATED;
	if (!(vx->flags & VXLAN_FLAG_VNI) || vxlan_vni(vx) != cfg->vni)
		return PASS_OTHER_VNI;
	h->udp = udp;
	h->vxlan = vx;
	return REASON_NONE;
}

#endif
