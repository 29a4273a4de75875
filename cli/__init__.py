"""flannel-xdp: an eBPF (XDP and tc) data path for Flannel clusters."""

from __future__ import annotations

import argparse
import logging
import sys

from flannel_xdp import defaults
from flannel_xdp.backend import Backend

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2

log = logging.getLogger("flannel_xdp")


def _cmd_teardown(args: argparse.Namespace) -> int:
    from flannel_xdp.loader import datapath
    from flannel_xdp.node import masq

    if args.handover:
        if not args.iface:
            log.error("--handover needs --iface (the underlay the peers are routed on)")
            return EXIT_USAGE
        datapath.hand_over(args.bpffs, args.iface, Backend(args.handover), args.vni)
    else:
        datapath.uninstall(args.bpffs, args.iface, args.vni)
    masq.remove()
    if args.iface:
        from pyroute2 import IPRoute

        from flannel_xdp.node import routes

        with IPRoute() as ipr:
            found = ipr.link_lookup(ifname=args.iface)
            if found:  # the managed neighbours kept for host-gw next hops
                routes.sync_next_hops(ipr, found[0], [])
    return EXIT_OK


def _cmd_prepare_downgrade(args: argparse.Namespace) -> int:
    from flannel_xdp.loader import underlay_tc
    from flannel_xdp.loader.bpffs import PinDir

    if not underlay_tc.move_to_clsact(PinDir(args.bpffs), args.iface):
        log.info("%s: no tcx link of ours on it: nothing to move", args.iface)
    return EXIT_OK


def _cmd_inspect(args: argparse.Namespace) -> int:
    from flannel_xdp.cli import inspect

    return inspect.run(args.bpffs, args.json)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flannel-xdp", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    from flannel_xdp.lab import options as lab_options

    demo = sub.add_parser(
        "demo",
        help="run the local virtual-cluster demo (make demo)",
        description="Bring up a virtual cluster of flannel-xdp nodes in network namespaces, "
        "send traffic between every pod pair, show what the data path counted, tear down.",
    )
    lab_options.demo_arguments(demo)

    lab = sub.add_parser(
        "lab",
        help="a virtual cluster that keeps running: lab up|down|status",
        description="Build, inspect and remove a virtual Flannel cluster (network namespaces, "
        "a local etcd, one agent per node) that outlives the command.",
    )
    lab_options.lab_arguments(lab)

    from flannel_xdp.agent import flags

    agent = sub.add_parser(
        "agent",
        help="run the node agent (flanneld's flags; each also as FLANNELD_<NAME>)",
        description="Take a subnet lease from etcd as flanneld does, install the BPF data "
        "path and keep its maps equal to the registry.",
    )
    flags.add_arguments(agent)
    agent.set_defaults(func=flags.run)

    inspect = sub.add_parser("inspect", help="show the node's lease, peers, programs and counters")
    inspect.add_argument("--bpffs", default=defaults.BPFFS_DIR, help="pin directory (%(default)s)")
    inspect.add_argument("--json", action="store_true", help="machine-readable output")
    inspect.set_defaults(func=_cmd_inspect)

    teardown = sub.add_parser(
        "teardown",
        help="remove what the agent made: programs, pins, the tunnel device (and with it its "
        "routes and neighbours), the iptables chains",
    )
    teardown.add_argument("--bpffs", default=defaults.BPFFS_DIR, help="pin directory (%(default)s)")
    teardown.add_argument("--iface", help="underlay whose programs (XDP, tcx, tc) to detach")
    teardown.add_argument("--vni", type=int, default=defaults.VXLAN_VNI, help="VNI (%(default)s)")
    teardown.add_argument(
        "--handover",
        choices=[b.value for b in Backend],
        help="moving the node back to flanneld with this backend: leave its routes (and, "
        "for vxlan, flannel.<VNI> as flanneld's kind of device with every peer's FDB and "
        "neighbour entry) so that flanneld, started next, adopts them without a gap",
    )
    teardown.set_defaults(func=_cmd_teardown)

    downgrade = sub.add_parser(
        "prepare-downgrade",
        help="before starting 0.1.0 on this node: move the underlay's program from its tcx "
        "link to a filter on a clsact qdisc, where 0.1.0 replaces it",
        description="0.1.0 attaches underlay_tc as a clsact filter and does not know the tcx "
        "link this version uses; a link left there would run ahead of 0.1.0's filter. "
        "Run this after stopping the agent and before starting 0.1.0. Adding the qdisc drops "
        "what the underlay sends for a moment.",
    )
    downgrade.add_argument(
        "--bpffs", default=defaults.BPFFS_DIR, help="pin directory (%(default)s)"
    )
    downgrade.add_argument("--iface", required=True, help="the underlay interface")
    downgrade.set_defaults(func=_cmd_prepare_downgrade)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format=defaults.LOG_FORMAT,
    )
    if args.command is None:
        parser.print_help()
        return EXIT_USAGE
    try:
        return args.func(args)
    except (OSError, RuntimeError) as exc:
        log.error("%s", exc)
        return EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
