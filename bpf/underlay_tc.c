// SPDX-License-Identifier: GPL-2.0
/*
 * tc ingress on the underlay interface: the same verdicts as underlay_xdp.c,
 * on the skb instead of the XDP frame. It keeps what XDP loses: GRO/GSO
 * aggregates stay whole (XDP on a veth even turns GSO off on the peer) and the
 * checksum state survives, so no checksum needs completing here. Decapsulated
 * packets enter the stack on flannel.<VNI>, as with flanneld.
 *
 * Kernels before BPF_F_ADJ_ROOM_DECAP_L4_UDP (bpf-next, after 6.18) cannot clear
 * the UDP-tunnel GSO state of an aggregate on decap. The packet is still
 * delivered correctly, but a device without tunnel offloads on its way (the
 * cni0 bridge) segments it in software, which costs TCP throughput (see the
 * README's benchmark); one that would be encapsulated again is refused by
 * bpf_skb_adjust_room and counted as DROP_ENCAP_FAILED.
 *
 * Built with FXDP_KERNEL_DECAP (the "kernel" ingress hook), the program only
 * judges: what it accepts goes on to the stack whole, and flannel.<VNI>, then
 * the kernel's vxlan device in external mode, strips the outer headers with
 * its GRO cells, which leaves clean aggregates. What it refuses never reaches
 * that device, so anti-spoofing is the same as with the BPF decap.
 *
 * Built also with FXDP_FAST_PATH, it delivers the UDP datagrams (and with
 * FAST_TCP, the TCP segments) of conntrack-confirmed, un-NATed flows from vxlan
 * and host-gw peers to local pods itself (fastpath.h).
 */
#include <uapi/linux/bpf.h>
#include <uapi/linux/pkt_cls.h>

#include "maps.h"
#include "parse.h"
#include "counters.h"
#include "csum.h"
#include "vxlan.h"
#include "underlay.h"
#ifdef FXDP_FAST_PATH
#include "fastpath.h"
#endif

/* Outer headers up to the inner IPv4 header: what classify_underlay() reads. */
#define UNDERLAY_PARSE_LEN	(VXLAN_ENCAP_LEN + ETH_HLEN + IPV4_HLEN)
#ifdef FXDP_FAST_PATH
#define UNDERLAY_PULL_LEN	(UNDERLAY_PARSE_LEN + TCP_HLEN)	/* and what fast_deliver() reads */
#else
#define UNDERLAY_PULL_LEN	UNDERLAY_PARSE_LEN
#endif

/* Each build has a name of its own in the kernel (loader/compile.py names them). */
#ifndef FXDP_PROG_NAME
#error "FXDP_PROG_NAME (this build's name) must be defined"
#endif

int FXDP_PROG_NAME(struct __sk_buff *skb)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	const __u64 flags = BPF_F_ADJ_ROOM_FIXED_GSO;
	__u8 inner_src[ETH_ALEN];
	struct node_config *cfg;
	struct ethhdr *eth;
	__u64 bytes = skb->len;
	__u32 pull = skb->len < UNDERLAY_PULL_LEN ? skb->len : UNDERLAY_PULL_LEN;
	__u32 zero = 0;
	__u32 tunnel;

	cfg = node_config.lookup(&zero);
	if (!cfg || !cfg->public_ip) {
		count_reason(BACKEND_NONE, PASS_NOT_CONFIGURED, bytes);
		return TC_ACT_OK;
	}
	if (data + pull > data_end) {
		bpf_skb_pull_data(skb, pull);
		data = (void *)(long)skb->data;
		data_end = (void *)(long)skb->data_end;
	}
	switch (classify_underlay(cfg, data, data_end, bytes)) {
	case UNDERLAY_PASS:
		return TC_ACT_OK;
	case UNDERLAY_HOST_GW:
#ifdef FXDP_FAST_PATH
		return fast_deliver(skb, cfg, bytes, 0, BACKEND_HOST_GW);
#endif
		return TC_ACT_OK;
	case UNDERLAY_DROP:
		return TC_ACT_SHOT;
	}

	/* classify_underlay() checked that the inner Ethernet header is there. */
	eth = data + VXLAN_ENCAP_LEN;
	if ((void *)(eth + 1) > data_end) {
		count_reason(BACKEND_VXLAN, DROP_MALFORMED, bytes);
		return TC_ACT_SHOT;
	}
#ifdef FXDP_KERNEL_DECAP
	count_traffic(BACKEND_VXLAN, DIR_DECAP, bytes - VXLAN_ENCAP_LEN);
#ifdef FXDP_FAST_PATH
	return fast_deliver(skb, cfg, bytes, VXLAN_ENCAP_LEN, BACKEND_VXLAN);
#endif
	return TC_ACT_OK;
#endif
	__builtin_memcpy(inner_src, eth->h_source, ETH_ALEN);
	tunnel = cfg->tunnel_ifindex;

	/* Remove outer IPv4/UDP/VXLAN and the inner Ethernet header; keep an Ethernet header. */
	if (bpf_skb_adjust_room(skb, -(VXLAN_ENCAP_LEN), BPF_ADJ_ROOM_MAC, flags)) {
		count_reason(BACKEND_VXLAN, DROP_ENCAP_FAILED, bytes);
		return TC_ACT_SHOT;
	}
	data = (void *)(long)skb->data;
	data_end = (void *)(long)skb->data_end;
	eth = data;
	if ((void *)(eth + 1) > data_end) {
		count_reason(BACKEND_VXLAN, DROP_MALFORMED, bytes);
		return TC_ACT_SHOT;
	}
	__builtin_memcpy(eth->h_dest, cfg->vtep_mac, ETH_ALEN);
	__builtin_memcpy(eth->h_source, inner_src, ETH_ALEN);
	eth->h_proto = bpf_htons(ETH_P_IP);
	count_traffic(BACKEND_VXLAN, DIR_DECAP, skb->len);
	return bpf_redirect(tunnel, BPF_F_INGRESS);
}
