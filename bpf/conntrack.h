/* SPDX-License-Identifier: GPL-2.0 */
/*
 * What the fast path asks of a flow's conntrack entry (bpf/fastpath.h), and the
 * refresh it owes the entry in return.
 *
 * Passing: the entry is confirmed and not NATed; a TCP entry is also assured (the
 * handshake went through the stack) and marked BE_LIBERAL on both directions
 * (node/flow_marks.py marks the flows the fast path may carry): conntrack does not
 * see the segments the fast path carries, and must not judge the next one it sees
 * against the windows of the last. The mark is per entry, so every other flow of the
 * node keeps its window checks.
 *
 * Refreshing: the stack sets an entry's timeout again at each packet; the fast path
 * does it once less than CT_REFRESH_BELOW_PERCENT of the timeout is left, giving it
 * the timeout the stack would (the netns's sysctl for the entry's state), so at most
 * a few writes per flow per timeout, and none on most lookups. Only states the fast
 * path carries are refreshed: a UDP entry, a TCP entry in ESTABLISHED (a closing
 * stream's entry keeps the shorter timeout the stack gave it). Kernel fields are
 * read at the running kernel's offsets (loader/kfunc.py); jiffies are FXDP_HZ a
 * second.
 */
#ifndef FXDP_CONNTRACK_H
#define FXDP_CONNTRACK_H

#include <uapi/linux/bpf.h>
#include <uapi/linux/in.h>

#include "kfuncs.h"

#if !defined(FXDP_NF_CONN_TIMEOUT_OFF) || !defined(FXDP_HZ)
#error "compile with loader.kfunc.kfunc_cflags()"
#endif

/* Refresh an entry once less than this share (percent) of its timeout is left. */
#define CT_REFRESH_BELOW_PERCENT	50

/* uapi/linux/netfilter/nf_conntrack_tcp.h */
#define FXDP_CT_TCP_FLAG_BE_LIBERAL	0x08
/* enum tcp_conntrack, enum udp_conntrack: indexes of the netns's timeouts */
#define FXDP_TCP_CONNTRACK_ESTABLISHED	3
#define FXDP_UDP_CT_UNREPLIED		0
#define FXDP_UDP_CT_REPLIED		1
#define FXDP_MSEC_PER_SEC			1000ULL

#define CT_FIELD(ct, type, off)	(*(type *)((char *)(ct) + (off)))

/* The timeout (jiffies) the stack would give the entry at its next packet; 0: none. */
static __always_inline __u32 ct_stack_timeout(void *ct, __u64 status, __u8 l4proto)
{
	void *net = CT_FIELD(ct, void *, FXDP_NF_CONN_NET_OFF);
	__u32 *timeouts, replied, unreplied;

	if (!net)
		return 0;
	if (l4proto == IPPROTO_TCP) {
		if (CT_FIELD(ct, __u8, FXDP_NF_CONN_TCP_STATE_OFF) != FXDP_TCP_CONNTRACK_ESTABLISHED)
			return 0;
		timeouts = (void *)((char *)net + FXDP_NET_TCP_TIMEOUTS_OFF);
		return timeouts[FXDP_TCP_CONNTRACK_ESTABLISHED];
	}
	/*
	 * nf_conntrack_udp_packet(): an assured stream gets the longer timeout. Both are
	 * read, then one chosen: the verifier takes no variable offset into a kernel struct.
	 */
	timeouts = (void *)((char *)net + FXDP_NET_UDP_TIMEOUTS_OFF);
	replied = timeouts[FXDP_UDP_CT_REPLIED];
	unreplied = timeouts[FXDP_UDP_CT_UNREPLIED];
	return (status & FXDP_IPS_ASSURED) ? replied : unreplied;
}

static __always_inline void ct_keep_alive(void *ct, __u64 status, __u8 l4proto)
{
	__u32 full = ct_stack_timeout(ct, status, l4proto);
	/* a confirmed entry's timeout is the jiffy it expires at (nf_ct_expires()) */
	__s32 left = (__s32)(CT_FIELD(ct, __u32, FXDP_NF_CONN_TIMEOUT_OFF) - (__u32)bpf_jiffies64());
	__u64 ms;

	if (!full || (__s64)left * 100 >= (__s64)full * CT_REFRESH_BELOW_PERCENT)
		return;
	ms = (__u64)full * FXDP_MSEC_PER_SEC / FXDP_HZ;
	fxdp_ct_change_timeout(ct, ms > 0xffffffffULL ? 0xffffffffU : (__u32)ms);
}

/*
 * The IPv4 flow (either direction) in the skb's netns has an entry the fast path
 * may carry packets of (see above); refreshes the entry if it is due.
 */
static __always_inline int ct_flow_passes(struct __sk_buff *skb, __be32 saddr, __be32 daddr,
					  __be16 sport, __be16 dport, __u8 l4proto)
{
	__u64 needed = FXDP_IPS_CONFIRMED | (l4proto == IPPROTO_TCP ? FXDP_IPS_ASSURED : 0);
	void *ct = ct_lookup_ipv4(skb, saddr, daddr, sport, dport, l4proto);
	__u64 status;
	int passes;

	if (!ct)
		return 0;
	status = CT_FIELD(ct, __u64, FXDP_NF_CONN_STATUS_OFF);
	passes = (status & needed) == needed && !(status & (FXDP_IPS_SRC_NAT | FXDP_IPS_DST_NAT));
	if (passes && l4proto == IPPROTO_TCP)
		passes = (CT_FIELD(ct, __u8, FXDP_NF_CONN_TCP_FLAGS_ORIGINAL_OFF) &
			  CT_FIELD(ct, __u8, FXDP_NF_CONN_TCP_FLAGS_REPLY_OFF) &
			  FXDP_CT_TCP_FLAG_BE_LIBERAL) != 0;
	if (passes)
		ct_keep_alive(ct, status, l4proto);
	fxdp_ct_release(ct);
	return passes;
}

#endif
