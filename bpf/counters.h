/* SPDX-License-Identifier: GPL-2.0 */
/* Per-CPU counters: summed by user space at scrape time, so no atomics here. */
#ifndef FXDP_COUNTERS_H
#define FXDP_COUNTERS_H

#include "maps.h"

static __always_inline void count_slot(void *map_lookup_result, __u64 bytes)
{
	struct counter *c = map_lookup_result;

	if (c) {
		c->packets++;
		c->bytes += bytes;
	}
}

static __always_inline void count_traffic(int backend, int dir, __u64 bytes)
{
	__u32 slot = backend * DIR_MAX + dir;

	count_slot(traffic.lookup(&slot), bytes);
}

static __always_inline void count_reason(int backend, int reason, __u64 bytes)
{
	__u32 slot = backend * REASON_MAX + reason;

	count_slot(reasons.lookup(&slot), bytes);
}

#endif
