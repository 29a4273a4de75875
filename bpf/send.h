/* SPDX-License-Identifier: GPL-2.0 */
/*
 * Sending a routed IPv4 frame on to the remote node that owns its destination:
 * vxlan peers get it encapsulated, host-gw (and DirectRouting) peers get it as
 * it is; both with the next hop's MAC, redirected straight to the underlay.
 * Shared by tunnel_egress (after the stack routed the packet to flannel.<VNI>)
 * and pod_ingress's UDP fast path (fastpath.h).
 */
#ifndef FXDP_SEND_H
#define FXDP_SEND_H

#include <uapi/linux/bpf.h>
#include <uapi/linux/pkt_cls.h>

#include "counters.h"
#include "fib.h"
#include "maps.h"
#include "vxlan.h"

/*
 * Returns TC_ACT_REDIRECT (counted as encap or forward) or TC_ACT_SHOT
 * (counted with its reason). The frame's Ethernet header is at skb->data.
 * hop: the next hop the caller has resolved already (the fast path, for a frame
 * it checked against the route's MTU), or NULL to resolve it here as the kernel's
 * output path would.
 */
static __always_inline int send_to_peer(struct __sk_buff *skb, const struct node_config *cfg,
					const struct remote_subnet *peer,
					const struct next_hop *hop, __u64 bytes)
{
	int backend = peer->backend;
	int reason = REASON_NONE;
	int verdict;

	if (backend != BACKEND_VXLAN && backend != BACKEND_HOST_GW) {
		count_reason(BACKEND_NONE, DROP_NO_ROUTE, bytes);
		return TC_ACT_SHOT;
	}
	if (backend == BACKEND_VXLAN) {
		reason = vxlan_encap(skb, cfg, peer);
		if (reason != REASON_NONE)
			goto drop;
	}
	if (hop)
		verdict = rewrite_and_redirect(skb, hop, &reason);
	else
		verdict = redirect_to_next_hop(skb, cfg->public_ip, peer->public_ip,
					       cfg->underlay_ifindex, &reason);
	if (verdict == TC_ACT_SHOT)
		goto drop;
	count_traffic(backend, backend == BACKEND_VXLAN ? DIR_ENCAP : DIR_FORWARD, bytes);
	return verdict;
drop:
	count_reason(backend, reason, bytes);
	return TC_ACT_SHOT;
}

#endif
