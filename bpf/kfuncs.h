/* SPDX-License-Identifier: GPL-2.0 */
/*
 * Kernel functions (kfuncs) for programs that loader/kfunc.py loads: bcc cannot
 * call them by name, so each is called through a placeholder helper number that
 * the loader turns into the kfunc's BTF id. The numbers and nf_conn's layout
 * come from kfunc_cflags() (the running kernel's BTF).
 */
#ifndef FXDP_KFUNCS_H
#define FXDP_KFUNCS_H

#if !defined(FXDP_KFUNC_BPF_SKB_CT_LOOKUP) || !defined(FXDP_NF_CONN_STATUS_OFF)
#error "compile with loader.kfunc.kfunc_cflags()"
#endif

#include <uapi/linux/bpf.h>

/* struct bpf_ct_opts as the kernel first defined it (6.0); later kernels take it too. */
struct fxdp_ct_opts {
	__s32 netns_id;
	__s32 error;
	__u8 l4proto;
	__u8 dir;
	__u8 reserved[2];
};

#define FXDP_CT_CURRENT_NETNS	(-1)
/* enum ip_conntrack_status (uapi/linux/netfilter/nf_conntrack_common.h) */
#define FXDP_IPS_ASSURED	(1UL << 2)
#define FXDP_IPS_CONFIRMED	(1UL << 3)
#define FXDP_IPS_SRC_NAT	(1UL << 4)
#define FXDP_IPS_DST_NAT	(1UL << 5)

static void *(*fxdp_skb_ct_lookup)(struct __sk_buff *skb, struct bpf_sock_tuple *tuple,
				   __u32 tuple_size, struct fxdp_ct_opts *opts, __u32 opts_size) =
	(void *)FXDP_KFUNC_BPF_SKB_CT_LOOKUP;
static void (*fxdp_ct_release)(void *ct) = (void *)FXDP_KFUNC_BPF_CT_RELEASE;
/* timeout in ms from now; refused (-EPERM) for a fixed-timeout entry */
static int (*fxdp_ct_change_timeout)(void *ct, __u32 timeout) =
	(void *)FXDP_KFUNC_BPF_CT_CHANGE_TIMEOUT;

/*
 * The conntrack entry of the IPv4 flow (either direction) in the skb's netns, or NULL.
 * The caller owns a reference: it must call fxdp_ct_release() on every path.
 */
static __always_inline void *ct_lookup_ipv4(struct __sk_buff *skb, __be32 saddr, __be32 daddr,
					    __be16 sport, __be16 dport, __u8 l4proto)
{
	struct bpf_sock_tuple tuple = {};
	struct fxdp_ct_opts opts = { .netns_id = FXDP_CT_CURRENT_NETNS, .l4proto = l4proto };

	tuple.ipv4.saddr = saddr;
	tuple.ipv4.daddr = daddr;
	tuple.ipv4.sport = sport;
	tuple.ipv4.dport = dport;
	return fxdp_skb_ct_lookup(skb, &tuple, sizeof(tuple.ipv4), &opts, sizeof(opts));
}

/* The conntrack status bits of the IPv4 flow, or 0 when conntrack has no entry for it. */
static __always_inline __u64 ct_status_ipv4(struct __sk_buff *skb, __be32 saddr, __be32 daddr,
					    __be16 sport, __be16 dport, __u8 l4proto)
{
	void *ct = ct_lookup_ipv4(skb, saddr, daddr, sport, dport, l4proto);
	__u64 status;

	if (!ct)
		return 0;
	status = *(__u64 *)((char *)ct + FXDP_NF_CONN_STATUS_OFF);
	fxdp_ct_release(ct);
	return status;
}

#endif
