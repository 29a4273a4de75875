"""`python -m flannel_xdp.loader install`: compile, load, attach and pin in a short-lived
process, so that long-running callers (the agent) never hold bcc and LLVM in memory.

Reads a JSON request on stdin, prints a JSON result on stdout; errors go to stderr
with exit code 1 (the message names the device or program at fault).
"""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import asdict
from ipaddress import IPv4Address, IPv4Network

from flannel_xdp.loader import datapath
from flannel_xdp.loader.attach import XdpMode


def request_json(cfg: datapath.DataPathConfig, node: datapath.NodeParams) -> str:
    return json.dumps({"config": asdict(cfg), "node": asdict(node)}, default=str)


def parse_request(text: str) -> tuple[datapath.DataPathConfig, datapath.NodeParams]:
    raw = json.loads(text)
    c, n = raw["config"], raw["node"]
    cfg = datapath.DataPathConfig(
        underlay=c["underlay"],
        bpffs=c["bpffs"],
        max_subnets=int(c["max_subnets"]),
        xdp_mode=XdpMode(c["xdp_mode"]),
        ingress_hook=datapath.IngressHook(c["ingress_hook"]),
        tunnel_mtu=c["tunnel_mtu"],
        udp_fast_path=bool(c.get("udp_fast_path", False)),
        tcp_fast_path=bool(c.get("tcp_fast_path", False)),
    )
    node = datapath.NodeParams(
        public_ip=IPv4Address(n["public_ip"]),
        subnet=IPv4Network(n["subnet"]),
        vtep_mac=n["vtep_mac"],
        vni=int(n["vni"]),
        vxlan_port=int(n["vxlan_port"]),
    )
    return cfg, node


def main(argv: list[str]) -> int:
    logging.basicConfig(
        level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    if argv != ["install"]:
        print("usage: python -m flannel_xdp.loader install < request.json", file=sys.stderr)
        return 2
    cfg, node = parse_request(sys.stdin.read())
    try:
        installed = datapath.install(cfg, node)
    except (OSError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(asdict(installed), default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
