/* SPDX-License-Identifier: GPL-2.0 */
/*
 * The single source of truth for every layout shared with user space: enums,
 * map keys and values, and the constants that size the maps. flannel_xdp.bpf
 * reads the enums from this file; maps/ checks its ctypes structs against it
 * in a test. The maps themselves are declared in maps.h.
 */
#ifndef FXDP_TYPES_H
#define FXDP_TYPES_H

#include <uapi/linux/if_ether.h>

/* How packets reach a remote subnet; also the counters' backend label. */
enum backend {
	BACKEND_NONE = 0,	/* not classified yet (underlay traffic not ours) */
	BACKEND_VXLAN = 1,
	BACKEND_HOST_GW = 2,
	BACKEND_MAX
};

enum direction {
	DIR_ENCAP = 0,		/* vxlan: pushed outer headers, sent to the underlay */
	DIR_DECAP = 1,		/* vxlan: stripped outer headers, handed to the tunnel device */
	DIR_FORWARD = 2,	/* host-gw: rewritten to the next hop, sent to the underlay */
	DIR_DELIVER = 3,	/* host-gw: from a peer to a local pod, left to the stack */
	DIR_FAST_DELIVER = 4,	/* fast path (fastpath.h): from a peer straight
				 * to the pod, into its netns or through cni0; also in
				 * DECAP (vxlan) or DELIVER (host-gw) */
	DIR_FAST_SEND = 5,	/* fast path: from a pod, taken at its veth end's
				 * ingress straight to the peer; also in ENCAP or FORWARD */
	DIR_MAX
};

/*
 * Why the data path did not forward a packet. PASS_* verdicts hand it to the
 * kernel stack untouched (XDP_PASS / TC_ACT_OK); DROP_* verdicts drop it.
 * Names are exported to Prometheus in lower case without the verdict prefix.
 */
enum reason {
	REASON_NONE = 0,
	PASS_NOT_CONFIGURED,	/* the node config entry is empty */
	PASS_TRUNCATED,		/* shorter than the headers it announces */
	PASS_VLAN,		/* 802.1Q/802.1ad tagged: left to VLAN devices */
	PASS_NOT_IPV4,
	PASS_IP_OPTIONS,	/* outer IPv4 header with options */
	PASS_IP_FRAGMENT,	/* outer IPv4 fragment: reassembly is the stack's */
	PASS_NOT_UDP,
	PASS_OTHER_ADDRESS,	/* not addressed to our public IP */
	PASS_OTHER_PORT,	/* UDP, but not our VXLAN port */
	PASS_OTHER_VNI,		/* our port, but not our VNI (or no VNI flag) */
	DROP_NOT_CONFIGURED,	/* tunnel egress without a node config */
	DROP_MALFORMED,		/* ours, but the inner frame is truncated or invalid */
	DROP_INNER_NOT_IPV4,	/* ours, but the inner frame is not IPv4 */
	DROP_WRONG_INNER_MAC,	/* inner destination MAC is not our VtepMAC */
	DROP_UNKNOWN_SOURCE,	/* inner source in no registered peer subnet */
	DROP_SPOOFED_SOURCE,	/* inner source owned by a peer other than the sender */
	DROP_NO_ROUTE,		/* tunnel egress: destination in no remote subnet */
	DROP_NO_UNDERLAY_ROUTE,	/* tunnel egress: FIB has no usable route to the peer */
	DROP_TOO_BIG,		/* encapsulated frame would exceed the underlay MTU */
	DROP_ENCAP_FAILED,	/* the kernel refused to grow or shrink the packet */
	DROP_FOREIGN_TUNNEL,	/* decapsulated by the vxlan device, but not our VNI or public IP */
	DROP_FRAG_NEEDED,	/* DF set and too big for the route to the peer: dropped, and an
				 * ICMP "fragmentation needed" sent back to its sender (pmtu.h) */
	REASON_MAX
};

/* An IPv4 address's bits: the prefix length of a key that is one address. */
#define IPV4_ADDR_BITS 32

/* LPM trie key: the trie requires the prefix length first. */
struct subnet_key {
	__u32 prefixlen;
	__be32 addr;
};

/* One remote node's subnet, as its lease announces it. */
struct remote_subnet {
	__be32 public_ip;		/* the owner's underlay address */
	__u8 vtep_mac[ETH_ALEN];	/* the owner's VtepMAC (vxlan) */
	__u8 backend;			/* enum backend: how we send to it */
	__u8 pad;
};

/* node_config.fast_flags: what the fast path (fastpath.h) takes besides UDP datagrams. */
enum fast_flag {
	FAST_TCP = 1,		/* segments of established TCP streams whose conntrack
				 * entry is marked to have its windows unchecked
				 * (conntrack.h; the agent marks them) */
};

/* This node's own parameters: one entry at index 0. */
struct node_config {
	__be32 public_ip;
	__be32 subnet_addr;		/* own pod subnet (network address) */
	__u32 subnet_prefixlen;
	__u32 vni;			/* host byte order */
	__be16 vxlan_port;
	__u8 vtep_mac[ETH_ALEN];	/* the tunnel device's MAC */
	__u32 underlay_ifindex;
	__u32 tunnel_ifindex;		/* flannel.<VNI>: where the stack sends and receives */
	__u32 tunnel_peer_ifindex;	/* its veth peer: XDP redirects decapped frames here */
	__u32 fast_flags;		/* enum fast_flag */
};

/* A pod on this node's cni0, for the fast path (fastpath.h): delivery straight
 * into its netns, and sending from its veth end straight to a peer. */
struct local_pod {
	__u32 ifindex;			/* its veth end in this netns: a cni0 port */
	__u8 mac[ETH_ALEN];		/* its MAC, as cni0's neighbour table knows it */
	__u8 gateway_mac[ETH_ALEN];	/* cni0's: where the pod sends what it routes */
};

#define FXDP_MAX_LOCAL_PODS 1024

struct counter {
	__u64 packets;
	__u64 bytes;
};

#define FXDP_TRAFFIC_SLOTS (BACKEND_MAX * DIR_MAX)
#define FXDP_REASON_SLOTS (BACKEND_MAX * REASON_MAX)

#endif
