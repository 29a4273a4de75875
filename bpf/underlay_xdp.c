// SPDX-License-Identifier: GPL-2.0
/*
 * XDP on the underlay interface: VXLAN frames for our VNI from a registered
 * peer are stripped to their inner frame and handed to the tunnel device
 * (through its veth peer), so they enter the stack on flannel.<VNI> exactly
 * as with flanneld. Everything else passes to the stack untouched, counted by
 * reason; host-gw traffic for our pods is counted as delivered.
 */
#include <uapi/linux/bpf.h>

#include "maps.h"
#include "parse.h"
#include "counters.h"
#include "csum.h"
#include "vxlan.h"
#include "underlay.h"

int underlay_xdp(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct node_config *cfg;
	struct iphdr *inner_ip;
	__u64 bytes = data_end - data;
	__u32 zero = 0;
	__u32 tunnel_peer;

	cfg = node_config.lookup(&zero);
	if (!cfg || !cfg->public_ip) {
		count_reason(BACKEND_NONE, PASS_NOT_CONFIGURED, bytes);
		return XDP_PASS;
	}
	switch (classify_underlay(cfg, data, data_end, bytes)) {
	case UNDERLAY_PASS:
	case UNDERLAY_HOST_GW:
		return XDP_PASS;
	case UNDERLAY_DROP:
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
