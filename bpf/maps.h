/* SPDX-License-Identifier: GPL-2.0 */
/*
 * The pinned maps, shared with user space (their layouts are types.h's).
 *
 * Build-time parameters (passed by loader/ as -D flags, defaults kept in
 * flannel_xdp/defaults.py): FXDP_MAPS_DIR, FXDP_MAX_SUBNETS.
 */
#ifndef FXDP_MAPS_H
#define FXDP_MAPS_H

#include "types.h"

#ifndef FXDP_MAPS_DIR
#error "FXDP_MAPS_DIR (the bpffs directory for pinned maps) must be defined"
#endif
#ifndef FXDP_MAX_SUBNETS
#error "FXDP_MAX_SUBNETS (capacity of the remote subnets map) must be defined"
#endif

/* Map names are what bpftool and `flannel-xdp inspect` show: keep them plain. */
BPF_TABLE_PINNED("lpm_trie", struct subnet_key, struct remote_subnet, subnets,
		 FXDP_MAX_SUBNETS, FXDP_MAPS_DIR "/subnets", BPF_F_NO_PREALLOC);
BPF_TABLE_PINNED("array", __u32, struct node_config, node_config, 1,
		 FXDP_MAPS_DIR "/node_config");
BPF_TABLE_PINNED("hash", __be32, struct local_pod, local_pods, FXDP_MAX_LOCAL_PODS,
		 FXDP_MAPS_DIR "/local_pods");
BPF_TABLE_PINNED("percpu_array", __u32, struct counter, traffic,
		 FXDP_TRAFFIC_SLOTS, FXDP_MAPS_DIR "/traffic");
BPF_TABLE_PINNED("percpu_array", __u32, struct counter, reasons,
		 FXDP_REASON_SLOTS, FXDP_MAPS_DIR "/reasons");

#endif
