// SPDX-License-Identifier: GPL-2.0
/*
 * tc egress on the tunnel device flannel.<VNI>. The kernel routes every remote
 * pod subnet here (as flanneld routes them to its vxlan device), so packets
 * arrive after netfilter has done conntrack, DNAT, masquerade and policy.
 * From here a packet leaves for its peer: vxlan peers get encapsulated,
 * host-gw (and DirectRouting) peers get the next hop's MAC; both are
 * redirected straight to the underlay, without touching the veth peer.
 */
#include <uapi/linux/bpf.h>
#include <uapi/linux/pkt_cls.h>

#include "maps.h"
#include "parse.h"
#include "counters.h"
#include "csum.h"
#include "send.h"

static __always_inline int shot(int backend, int reason, __u64 bytes)
{
	count_reason(backend, reason, bytes);
	return TC_ACT_SHOT;
}

int tunnel_egress(struct __sk_buff *skb)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;
	struct subnet_key key = { .prefixlen = IPV4_ADDR_BITS };
	struct remote_subnet peer, *found;
	struct node_config *cfg;
	struct iphdr *ip;
	__u64 bytes = skb->len;
	__u32 zero = 0;

	cfg = node_config.lookup(&zero);
	if (!cfg || !cfg->public_ip)
		return shot(BACKEND_NONE, DROP_NOT_CONFIGURED, bytes);
	/* Nothing but routed IPv4 belongs on the tunnel (no ARP: neighbours are permanent). */
	if ((void *)(eth + 1) > data_end)
		return shot(BACKEND_NONE, DROP_MALFORMED, bytes);
	if (eth->h_proto != bpf_htons(ETH_P_IP))
		return shot(BACKEND_NONE, DROP_INNER_NOT_IPV4, bytes);
	ip = (void *)(eth + 1);
	if ((void *)(ip + 1) > data_end)
		return shot(BACKEND_NONE, DROP_MALFORMED, bytes);

	key.addr = ip->daddr;
	found = subnets.lookup(&key);
	if (!found)
		return shot(BACKEND_NONE, DROP_NO_ROUTE, bytes);
	/* Copy: the entry may be replaced while we work; the packet sees one version. */
	__builtin_memcpy(&peer, found, sizeof(peer));

	return send_to_peer(skb, cfg, &peer, NULL, bytes);
}
