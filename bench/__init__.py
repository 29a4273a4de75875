"""`make bench`: stock flannel against flannel-xdp on the lab's two-node testbed.

Variants (variants.py): stock-vxlan, xdp-vxlan, xdp-vxlan-tc, xdp-vxlan-kernel,
xdp-vxlan-fast, stock-hostgw, xdp-hostgw, xdp-hostgw-tc, xdp-hostgw-fast; every node
with flanneld's iptables rules (conntrack on, TCP windows unchecked, as the TCP fast
path needs); and direct-veth, two pods on one veth pair with no node (directpair.py).
Workloads, pod to pod across nodes (workloads.py, livepps.py, crr.py): TCP with 1
and 4 streams, UDP 64-byte packets delivered per second (live frames from the sender
pod's veth; iperf3 for reference), the receive path alone with live frames,
request/response latency, new TCP connections per second, and CPU per Gbit; per-program
cost through BPF_PROG_TEST_RUN (progcost.py). report.py turns the raw figures into
medians, ratios, the targets, a table and bench/results.json. profile.py runs workloads
under `perf record` and groups the samples by category (symbols.py).
"""
