"""`make bench`: stock flannel against flannel-xdp on the lab's two-node testbed.

Variants (variants.py): stock-vxlan, xdp-vxlan, xdp-vxlan-tc, stock-hostgw, xdp-hostgw,
xdp-hostgw-tc. Workloads, pod to pod across nodes (workloads.py, rxpps.py): TCP with 1
and 4 streams, UDP 64-byte packets delivered per second, the receive path alone with
live frames, request/response latency, and CPU per Gbit; per-program cost through
BPF_PROG_TEST_RUN (progcost.py). report.py turns the raw figures into medians,
ratios, a table and bench/results.json.
"""
