// SPDX-License-Identifier: GPL-2.0
/*
 * tc ingress on flannel.<VNI> when it is the kernel's vxlan device (the kernel
 * ingress hook): the last word on what that device decapsulated.
 *
 * underlay_tc judges the VXLAN that enters through the underlay interface, but the
 * device's UDP socket listens on every address and interface: VXLAN that reaches
 * the port another way (another interface or local address, outer fragments the
 * stack reassembled, a VNI underlay_tc leaves to the stack) is decapsulated too.
 * Here every decapsulated packet is checked against its tunnel metadata by the
 * same rules: our VNI, to our public IP, from the registered owner of its inner
 * source. Only drops are counted: what passes was counted as decap on the underlay
 * (or, for tunnel_egress's ICMP answer to a packet too big, as frag_needed there).
 */
#include <uapi/linux/bpf.h>
#include <uapi/linux/pkt_cls.h>

#include "maps.h"
#include "parse.h"
#include "counters.h"
#include "csum.h"
#include "pmtu.h"
#include "vxlan.h"

static __always_inline int drop(int reason, __u64 bytes)
{
	count_reason(BACKEND_VXLAN, reason, bytes);
	return TC_ACT_SHOT;
}

int tunnel_ingress(struct __sk_buff *skb)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct bpf_tunnel_key key = {};
	struct node_config *cfg;
	struct ethhdr *eth = data;
	struct iphdr *ip;
	__u64 bytes = skb->len;
	__u32 zero = 0;
	int reason;

	cfg = node_config.lookup(&zero);
	if (!cfg || !cfg->public_ip)
		return drop(DROP_NOT_CONFIGURED, bytes);
	if (bpf_skb_get_tunnel_key(skb, &key, sizeof(key), 0)) {
		/* Not decapsulated: tunnel_egress's answer to a packet too big (pmtu.h)? */
		ip = (void *)(eth + 1);
		if ((void *)(ip + 1) <= data_end && eth->h_proto == bpf_htons(ETH_P_IP) &&
		    is_frag_needed_reply(ip, data_end))
			return TC_ACT_OK;
		return drop(DROP_MALFORMED, bytes);	/* no IPv4 tunnel metadata */
	}
	if (key.tunnel_id != cfg->vni || bpf_htonl(key.local_ipv4) != cfg->public_ip)
		return drop(DROP_FOREIGN_TUNNEL, bytes);

	if ((void *)(eth + 1) > data_end)
		return drop(DROP_MALFORMED, bytes);
	if (eth->h_proto != bpf_htons(ETH_P_IP))
		return drop(DROP_INNER_NOT_IPV4, bytes);
	ip = (void *)(eth + 1);
	if ((void *)(ip + 1) > data_end)
		return drop(DROP_MALFORMED, bytes);
	reason = vxlan_source_reason(bpf_htonl(key.remote_ipv4), ip->saddr);
	if (reason != REASON_NONE)
		return drop(reason, bytes);
	return TC_ACT_OK;
}
