/* SPDX-License-Identifier: GPL-2.0 */
/*
 * What a frame arriving on the underlay is to us, shared by the XDP and the tc
 * ingress program so that both give every frame the same verdict and count it
 * the same way. Works on a linear buffer [data, data_end).
 */
#ifndef FXDP_UNDERLAY_H
#define FXDP_UNDERLAY_H

#include "counters.h"
#include "maps.h"
#include "parse.h"
#include "vxlan.h"

enum underlay_action {
	UNDERLAY_PASS,		/* not ours: to the stack untouched (counted here) */
	UNDERLAY_HOST_GW,	/* a host-gw peer's pod to ours: to the stack (counted here) */
	UNDERLAY_DROP,		/* ours but unacceptable (counted here) */
	UNDERLAY_DECAP,		/* ours: strip VXLAN_ENCAP_LEN and deliver (caller counts) */
};

static __always_inline int in_own_subnet(const struct node_config *cfg, __be32 addr)
{
	__u32 plen = cfg->subnet_prefixlen;
	__be32 mask;

	if (plen == 0 || plen > IPV4_ADDR_BITS)
		return 0;
	mask = bpf_htonl(~0U << (IPV4_ADDR_BITS - plen));
	return (addr & mask) == cfg->subnet_addr;
}

/* Plain IPv4 from a host-gw peer's pod to ours: the stack forwards it, we count it. */
static __always_inline int is_host_gw_delivery(const struct node_config *cfg,
					       const struct iphdr *ip)
{
	struct subnet_key key = { .prefixlen = IPV4_ADDR_BITS, .addr = ip->saddr };
	struct remote_subnet *src;

	if (!in_own_subnet(cfg, ip->daddr))
		return 0;
	src = subnets.lookup(&key);
	return src && src->backend == BACKEND_HOST_GW;
}

/* Checks on the inner frame of a VXLAN packet that is ours. REASON_NONE: decap it. */
static __always_inline int inner_reason(const struct node_config *cfg,
					const struct outer_headers *h, void *data_end)
{
	struct ethhdr *inner_eth = (void *)(h->vxlan + 1);
	struct iphdr *inner_ip;

	if ((void *)(inner_eth + 1) > data_end)
		return DROP_MALFORMED;
	if (!mac_equal(inner_eth->h_dest, cfg->vtep_mac))
		return DROP_WRONG_INNER_MAC;
	if (inner_eth->h_proto != bpf_htons(ETH_P_IP))
		return DROP_INNER_NOT_IPV4;
	inner_ip = (void *)(inner_eth + 1);
	if ((void *)(inner_ip + 1) > data_end)
		return DROP_MALFORMED;
	if (inner_ip->version != 4 || inner_ip->ihl < IPV4_HLEN / 4)
		return DROP_MALFORMED;
	return vxlan_source_reason(h->ip->saddr, inner_ip->saddr);
}

/*
 * Classify a frame and count it unless it is to be decapsulated (the caller
 * counts that, with the inner frame's length, once it succeeded). bytes is the
 * whole frame's length: on an skb, [data, data_end) is only the linear head.
 */
static __always_inline int classify_underlay(const struct node_config *cfg, void *data,
					     void *data_end, __u64 bytes)
{
	struct outer_headers h = {};
	int reason;

	reason = parse_eth_ipv4(data, data_end, &h);
	if (reason == REASON_NONE)
		reason = parse_vxlan(&h, data_end, cfg);
	if (reason != REASON_NONE) {
		if (reason >= PASS_NOT_UDP && reason <= PASS_OTHER_VNI &&
		    is_host_gw_delivery(cfg, h.ip)) {
			count_traffic(BACKEND_HOST_GW, DIR_DELIVER, bytes);
			return UNDERLAY_HOST_GW;
		}
		count_reason(BACKEND_NONE, reason, bytes);
		return UNDERLAY_PASS;
	}
	reason = inner_reason(cfg, &h, data_end);
	if (reason != REASON_NONE) {
		count_reason(BACKEND_VXLAN, reason, bytes);
		return UNDERLAY_DROP;
	}
	return UNDERLAY_DECAP;
}

#endif
