/* SPDX-License-Identifier: GPL-2.0 */
/* Hashing for flow-derived values (VXLAN source ports, cache slots). */
#ifndef FXDP_HASH_H
#define FXDP_HASH_H

/* murmur3's 32-bit finalizer: every input bit moves every output bit. */
#define FMIX_MUL_1		0x85ebca6bU
#define FMIX_MUL_2		0xc2b2ae35U

static __always_inline __u32 fmix32(__u32 h)
{
	h ^= h >> 16;
	h *= FMIX_MUL_1;
	h ^= h >> 13;
	h *= FMIX_MUL_2;
	h ^= h >> 16;
	return h;
}

#endif
