// SPDX-License-Identifier: GPL-2.0
/*
 * tcx ingress on a local pod's veth end in the node (the fast path; a pinned
 * bpf_link, no qdisc): what the pod sends, before cni0 and its bridge netfilter
 * hooks see it. UDP datagrams (and with FAST_TCP, TCP segments) of
 * conntrack-confirmed, un-NATed flows from the pod to a remote pod go straight to
 * the peer (fastpath.h); everything else, and every frame the program does not
 * understand, goes on to the bridge untouched and uncounted: this hook sees all
 * of the pod's traffic, most of it none of ours.
 */
#include <uapi/linux/bpf.h>
#include <uapi/linux/pkt_cls.h>

#include "maps.h"
#include "parse.h"
#include "counters.h"
#include "fastpath.h"

#define POD_PULL_LEN	(ETH_HLEN + IPV4_HLEN + TCP_HLEN)	/* what fast_send() reads */

int pod_ingress(struct __sk_buff *skb)
{
	__u32 pull = skb->len < POD_PULL_LEN ? skb->len : POD_PULL_LEN;
	struct node_config *cfg;
	__u32 zero = 0;

	cfg = node_config.lookup(&zero);
	if (!cfg || !cfg->public_ip)
		return TC_ACT_OK;
	if ((void *)(long)skb->data + pull > (void *)(long)skb->data_end)
		bpf_skb_pull_data(skb, pull);
	return fast_send(skb, cfg);
}
