// SPDX-License-Identifier: GPL-2.0
/*
 * XDP on the underlay interface: VXLAN frames for our VNI from a registered
 * peer are stripped to their inner frame and handed to the tunnel device
 * (through its veth peer), so they enter the stack on flannel.<VNI> exactly
 * as with flanneld. Everything else passes to the stack untouched, counted by
 * reason; host-gw traffic for our pods is counted as delivered.
 */
#include <uapi/linux/bpf.h>

#include "layout.h"
#include "parse.h"
#include "counters.h"
#include "csum.h"
#include "vxlan.h"

static __always_inline int in_own_subnet(const struct node_config *cfg, __be32 addr)
{
	__u32 plen = cfg->subnet_prefixlen;
	__be32 mask;

	if (plen == 0 || plen > 32)
		return 0;
	mask = bpf_htonl(~0U << (32 - plen));
	return (addr & mask) == cfg->subnet_addr;
}

/* Plain IPv4 from a host-gw peer's pod to ours: the stack forwards it, we count it. */
static __always_inline int is_host_gw_delivery(const struct node_config *cfg,
					       const struct iphdr *ip)
{
	struct subnet_key key = { .prefixlen = 32, .addr = ip->saddr };
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

int underlay_xdp(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct outer_headers h = {};
	struct node_config *cfg;
	struct iphdr *inner_ip;
	__u64 bytes = data_end - data;
	__u32 zero = 0;
	__u32 tunnel_peer;
	int reason;

	cfg = node_config.lookup(&zero);
	if (!cfg || !cfg->public_ip) {
		count_reason(BACKEND_NONE, PASS_NOT_CONFIGURED, bytes);
		return XDP_PASS;
	}
	reason = parse_eth_ipv4(data, data_end, &h);
	if (reason == REASON_NONE)
		reason = parse_vxlan(&h, data_end, cfg);
	if (reason != REASON_NONE) {
		if (reason >= PASS_NOT_UDP && reason <= PASS_OTHER_VNI &&
		    is_host_gw_delivery(cfg, h.ip))
			count_traffic(BACKEND_HOST_GW, DIR_DELIVER, bytes);
		else
			count_reason(BACKEND_NONE, reason, bytes);
		return XDP_PASS;
	}

	reason = inner_reason(cfg, &h, data_end);
	if (reason != REASON_NONE) {
		count_reason(BACKEND_VXLAN, reason, bytes);
		return XDP_DROP;
	}

	tunnel_peer = cfg->tunnel_peer_ifindex;
	if (bpf_xdp_adjust_head(ctx, VXLAN_ENCAP_LEN)) {
		count_reason(BACKEND_VXLAN, DROP_ENCAP_FAILED, bytes);
		return XDP_DROP;
	}
	data = (void *)(long)ctx->data;
	data_end = (void *)(long)ctx->data_end;
	inner_ip = data + ETH_HLEN;
	if ((void *)(inner_ip + 1) > data_end) {
		count_reason(BACKEND_VXLAN, DROP_MALFORMED, bytes);
		return XDP_DROP;
	}
	complete_l4_csum(inner_ip, data_end);
	count_traffic(BACKEND_VXLAN, DIR_DECAP, data_end - data);
	return bpf_redirect(tunnel_peer, 0);
}
