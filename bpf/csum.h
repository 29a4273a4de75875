/* SPDX-License-Identifier: GPL-2.0 */
/* Internet checksums. Sums are kept in memory order, as the kernel's csum_* do. */
#ifndef FXDP_CSUM_H
#define FXDP_CSUM_H

#include <uapi/linux/in.h>
#include <uapi/linux/ip.h>
#include <uapi/linux/tcp.h>
#include <uapi/linux/udp.h>

#include "parse.h"

#define CSUM_CHUNK		256	/* bytes per bpf_csum_diff call */
#define CSUM_MAX_CHUNKS		16	/* covers any frame XDP sees without frags */
/* csum_bytes() sums what is left after whole chunks in steps of 128 bytes down to 1. */
_Static_assert(CSUM_CHUNK == 256, "csum_bytes()'s steps cover CSUM_CHUNK - 1 bytes");
_Static_assert((CSUM_MAX_CHUNKS & (CSUM_MAX_CHUNKS - 1)) == 0, "chunk counts are masked");

static __always_inline __u16 csum_fold32(__u64 sum)
{
	sum = (sum & 0xffffffff) + (sum >> 32);
	sum = (sum & 0xffffffff) + (sum >> 32);
	sum = (sum & 0xffff) + (sum >> 16);
	sum = (sum & 0xffff) + (sum >> 16);
	return (__u16)sum;
}

/* Header checksum of an IPv4 header without options. */
static __always_inline __u16 ipv4_header_csum(struct iphdr *ip)
{
	__u16 *w = (__u16 *)ip;
	__u64 sum = 0;
	int i;

	ip->check = 0;
#pragma unroll
	for (i = 0; i < (int)sizeof(*ip) / 2; i++)
		sum += w[i];
	return ~csum_fold32(sum);
}

/* An IPv4 header without options whose checksum is right (as ip_rcv() checks it). */
static __always_inline int ipv4_header_valid(const struct iphdr *ip)
{
	const __u16 *w = (const __u16 *)ip;
	__u64 sum = 0;
	int i;

#pragma unroll
	for (i = 0; i < (int)sizeof(*ip) / 2; i++)
		sum += w[i];
	return csum_fold32(sum) == 0xffff;
}

/* RFC 1624 incremental update of a 16-bit checksum for one changed 16-bit word. */
static __always_inline __u16 csum_replace16(__u16 check, __u16 old, __u16 new)
{
	__u64 sum = (__u16)~check + (__u16)~old + (__u64)new;

	return ~csum_fold32(sum);
}

/*
 * A packet that crossed a veth with CHECKSUM_PARTIAL carries only the
 * pseudo-header sum in its L4 checksum field; the device that "transmits" it
 * is trusted to finish the job. Once such a frame goes through XDP_REDIRECT the
 * skb's checksum state is lost and the receiver verifies in software, so a
 * partial checksum would be dropped as bad. complete_l4_csum() finishes the
 * checksum when (and only when) the field holds exactly the pseudo-header sum.
 * For a valid packet the computation reproduces the value already there, so it
 * never breaks a correct checksum.
 */
/*
 * Sum of len bytes at l4 (len <= CSUM_MAX_CHUNKS * CSUM_CHUNK), unfolded.
 * Written for the verifier: whole chunks in a bounded loop, then the rest from a
 * pointer recomputed from len, so that every loop exit merges into one state,
 * then power-of-two steps as straight-line code.
 */
static __always_inline __u64 csum_bytes(void *l4, void *data_end, __u32 len)
{
	__u32 chunks = len / CSUM_CHUNK;
	__u32 rest = len % CSUM_CHUNK;
	__u32 sum = 0;
	__u64 tail = 0;
	void *p = l4;
	int i;

	for (i = 0; i < CSUM_MAX_CHUNKS; i++) {
		if (i >= chunks || p + CSUM_CHUNK > data_end)
			break;
		sum = bpf_csum_diff(0, 0, p, CSUM_CHUNK, sum);
		p += CSUM_CHUNK;
	}
	p = l4 + (chunks & (CSUM_MAX_CHUNKS * 2 - 1)) * CSUM_CHUNK;
#define CSUM_STEP(n)							\
	if (rest & (n)) {						\
		if (p + (n) > data_end)					\
			return sum;					\
		sum = bpf_csum_diff(0, 0, p, (n), sum);			\
		p += (n);						\
	}
	CSUM_STEP(128)
	CSUM_STEP(64)
	CSUM_STEP(32)
	CSUM_STEP(16)
	CSUM_STEP(8)
	CSUM_STEP(4)
#undef CSUM_STEP
	/* 0..3 trailing bytes, zero-padded, in memory order (little endian) */
	if ((rest & 3) >= 1 && p + 1 <= data_end)
		tail += *(__u8 *)p;
	if ((rest & 3) >= 2 && p + 2 <= data_end)
		tail += (__u32)*(__u8 *)(p + 1) << 8;
	if ((rest & 3) >= 3 && p + 3 <= data_end)
		tail += (__u32)*(__u8 *)(p + 2) << 16;
	return (__u64)sum + tail;
}

static __always_inline void complete_l4_csum(struct iphdr *ip, void *data_end)
{
	void *l4 = (void *)ip + IPV4_HLEN;
	__u16 *check;
	__u32 l4len;
	__u64 pseudo;
	__u16 full;

	if (ip->ihl != IPV4_HLEN / 4 || (ip->frag_off & bpf_htons(IP_FRAG_MASK)))
		return;
	if (ip->protocol == IPPROTO_TCP) {
		struct tcphdr *th = l4;

		if ((void *)(th + 1) > data_end)
			return;
		check = &th->check;
	} else if (ip->protocol == IPPROTO_UDP) {
		struct udphdr *uh = l4;

		if ((void *)(uh + 1) > data_end || uh->check == 0)
			return;
		check = &uh->check;
	} else {
		return;
	}
	l4len = bpf_ntohs(ip->tot_len);
	if (l4len <= IPV4_HLEN || l4len - IPV4_HLEN > CSUM_MAX_CHUNKS * CSUM_CHUNK ||
	    l4 + (l4len - IPV4_HLEN) > data_end)
		return;
	l4len -= IPV4_HLEN;
	pseudo = (__u64)ip->saddr + ip->daddr + bpf_htons((__u16)ip->protocol) +
		 bpf_htons((__u16)l4len);
	if (*check != csum_fold32(pseudo))
		return;
	full = ~csum_fold32(csum_bytes(l4, data_end, l4len));
	if (full == 0 && ip->protocol == IPPROTO_UDP)
		full = 0xffff;
	*check = full;
}

#endif
