// SPDX-License-Identifier: GPL-2.0
/* Test program: the conntrack status of the IPv4/UDP or TCP frame it is given, as its retval. */
#include <uapi/linux/bpf.h>
#include <uapi/linux/if_ether.h>
#include <uapi/linux/ip.h>
#include <uapi/linux/udp.h>

#include "../bpf/kfuncs.h"

int ct_probe(struct __sk_buff *skb)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;
	struct iphdr *ip = (void *)(eth + 1);
	struct udphdr *l4 = (void *)(ip + 1);	/* ports sit alike in UDP and TCP */

	if ((void *)(l4 + 1) > data_end || ip->ihl != 5)
		return -1;
	return (int)ct_status_ipv4(skb, ip->saddr, ip->daddr, l4->source, l4->dest, ip->protocol);
}
