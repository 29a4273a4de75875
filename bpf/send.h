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
#include "pmtu.h"
#include "vxlan.h"

/*
 * Returns TC_ACT_REDIRECT (counted as encap or forward; or, for a frame the
 * route to the peer cannot take, its ICMP answer, counted as frag_needed),
 * TC_ACT_OK (such a vxlan frame without DF, left to the kernel's vxlan device
 * to send in fragments, counted as encap: pmtu.h) or TC_ACT_SHOT (counted with
 * its reason). The frame's Ethernet header is at
 * skb->data, its IPv4 header right after it.
 * hop: the next hop the caller has resolved already (the fast path, for a frame
 * it checked against the route's MTU), or NULL to resolve it here as the kernel's
 * output path would, sized against the route's MTU before it is encapsulated.
 */
static __always_inline int send_to_peer(struct __sk_buff *skb, const struct node_config *cfg,
					const struct remote_subnet *peer,
					const struct next_hop *hop, __u64 bytes)
{
	struct bpf_fib_lookup fib = {};
	int backend = peer->backend;
	int reason = REASON_NONE;
	int verdict, rc = 0;

	if (backend != BACKEND_VXLAN && backend != BACKEND_HOST_GW) {
		count_reason(BACKEND_NONE, DROP_NO_ROUTE, bytes);
		return TC_ACT_SHOT;
	}
	if (!hop) {
		void *data = (void *)(long)skb->data;
		void *data_end = (void *)(long)skb->data_end;
		struct iphdr *ip = data + ETH_HLEN;
		__u32 len;

		if ((void *)(ip + 1) > data_end) {
			reason = DROP_MALFORMED;
			goto drop;
		}
		len = ipv4_wire_len(skb, ip, data_end);
		if (len)
			len += encap_len(backend);
		if (len > IPV4_MAX_LEN) {
			reason = DROP_TOO_BIG;
			goto drop;
		}
		rc = next_hop_lookup(skb, &fib, cfg->public_ip, peer->public_ip,
				     cfg->underlay_ifindex, len);
		if (rc == BPF_FIB_LKUP_RET_FRAG_NEEDED)
			return answer_too_big(skb, cfg, peer, fib.mtu_result - encap_len(backend),
					      bytes);
	}
	if (backend == BACKEND_VXLAN) {
		reason = vxlan_encap(skb, cfg, peer);
		if (reason != REASON_NONE)
			goto drop;
	}
	if (hop)
		verdict = rewrite_and_redirect(skb, hop, &reason);
	else
		verdict = redirect_to_next_hop(skb, rc, &fib, peer->public_ip, &reason);
	if (verdict == TC_ACT_SHOT)
		goto drop;
	count_traffic(backend, backend == BACKEND_VXLAN ? DIR_ENCAP : DIR_FORWARD, bytes);
	return verdict;
drop:
	count_reason(backend, reason, bytes);
	return TC_ACT_SHOT;
}

#endif
