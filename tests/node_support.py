"""One node for agent tests: a network namespace with an underlay, and a real agent in it.

node_netns() makes a namespace with one underlay interface (ul0, 192.0.2.10/24, a veth
whose peer ul0p stays in the namespace without an address) and always deletes it. The
agent runs in it through ``nsenter --net`` (so /sys/fs/bpf and the pins stay the host's)
under ``setpriv --pdeathsig KILL`` (no agent outlives the test), optionally with
capabilities dropped or another uid; it reaches etcd through etcd's unix socket.
made_on_node() lists what an agent left on the node: the tests' proof of "nothing made".
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator, Sequence

from flannel_xdp import netns
from flannel_xdp.loader import attach
from tests.etcd_support import EtcdCluster

UNDERLAY = "ul0"
UNDERLAY_PEER = "ul0p"
UNDERLAY_ADDRESS = "192.0.2.10/24"
TUNNEL_PREFIXES = ("flannel.", "fxdp.")
AGENT_TIMEOUT = 60.0


def _ip(*args: str) -> str:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=True).stdout


@contextlib.contextmanager
def node_netns(tag: str = "fxnode") -> Iterator[str]:
    name = f"{tag}-{uuid.uuid4().hex[:8]}"
    _ip("netns", "add", name)
    try:
        _ip("-n", name, "link", "add", UNDERLAY, "type", "veth", "peer", "name", UNDERLAY_PEER)
        _ip("-n", name, "addr", "add", UNDERLAY_ADDRESS, "dev", UNDERLAY)
        for dev in ("lo", UNDERLAY, UNDERLAY_PEER):
            _ip("-n", name, "link", "set", dev, "up")
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


def in_node(ns: str, argv: Sequence[str], setpriv: Sequence[str] = ()) -> list[str]:
    """argv inside netns ns, killed with its parent, with extra setpriv options
    (dropped capabilities, another uid)."""
    return [
        "nsenter", f"--net=/run/netns/{ns}",
        "setpriv", "--pdeathsig", "KILL", *setpriv, "--",
        *argv,
    ]  # fmt: skip


def agent_argv(
    etcd: EtcdCluster,
    prefix: str,
    bpffs: str,
    subnet_file: str,
    *extra: str,
    iface: str = UNDERLAY,
) -> list[str]:
    return [
        sys.executable, "-m", "flannel_xdp.cli", "agent",
        "--etcd-endpoints", etcd.members[0].endpoint,
        "--etcd-prefix", prefix,
        "--iface", iface,
        "--bpffs", bpffs,
        "--subnet-file", subnet_file,
        *extra,
    ]  # fmt: skip


def agent_env() -> dict[str, str]:
    # FLANNELD_* in our environment would silently change the agent's flags
    return {k: v for k, v in os.environ.items() if not k.startswith("FLANNELD_")}


def new_bpffs() -> str:
    return f"/sys/fs/bpf/fxdp-node-{uuid.uuid4().hex[:10]}"


def made_on_node(
    ns: str, bpffs: str, subnet_file: str, etcd: EtcdCluster, prefix: str
) -> list[str]:
    """Everything an agent makes, found on the node: tunnel links, XDP programs, clsact
    qdiscs (where tc programs hang), tc filters, tcx programs, iptables chains, the pin
    directory, the subnet file, a lease. Empty when the agent made nothing."""
    found = []
    links = json.loads(_ip("-n", ns, "-j", "-d", "link", "show"))
    for link in links:
        name = link["ifname"]
        if name.startswith(TUNNEL_PREFIXES):
            found.append(f"link {name}")
        if "xdp" in link:
            found.append(f"XDP program on {name}: {link['xdp']}")
    qdiscs = subprocess.run(
        ["tc", "-n", ns, "-j", "qdisc", "show"], capture_output=True, text=True, check=True
    )
    for q in json.loads(qdiscs.stdout or "[]"):
        if q.get("kind") == "clsact":
            found.append(f"clsact qdisc on {q.get('dev')}")
    for link in links:
        for direction in ("ingress", "egress"):
            res = subprocess.run(
                ["tc", "-n", ns, "filter", "show", "dev", link["ifname"], direction],
                capture_output=True,
                text=True,
                check=False,
            )
            if res.stdout.strip():
                found.append(f"tc {direction} filter on {link['ifname']}: {res.stdout.strip()}")
            with netns.entered(ns):
                tcx = attach.tcx_programs(link["ifindex"], direction)
            if tcx:
                found.append(f"tcx {direction} programs on {link['ifname']}: {tcx}")
    rules = subprocess.run(
        ["nsenter", f"--net=/run/netns/{ns}", "iptables-save"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    found += [f"iptables {line}" for line in rules.splitlines() if "FLANNEL" in line]
    if os.path.lexists(bpffs):
        found.append(f"pin directory {bpffs}")
    if os.path.exists(subnet_file):
        found.append(f"subnet file {subnet_file}")
    found += [f"lease {key}" for key in etcd.keys(f"{prefix}/subnets/")]
    return found


def teardown_node(ns: str, bpffs: str, subnet_file: str, etcd: EtcdCluster, prefix: str) -> None:
    """Remove whatever an agent made on the node (the control runs need this)."""
    subprocess.run(
        in_node(
            ns,
            [sys.executable, "-m", "flannel_xdp.cli", "teardown", "--bpffs", bpffs,
             "--iface", UNDERLAY],
        ),
        capture_output=True,
        text=True,
        timeout=AGENT_TIMEOUT,
        check=False,
    )  # fmt: skip
    with contextlib.suppress(FileNotFoundError):
        os.unlink(subnet_file)
    for key in etcd.keys(f"{prefix}/subnets/"):
        etcd.delete(key)


def someone_elses_tcx(ns: str, dev: str) -> int:
    """Another user's program on dev's tcx ingress in ns, through an unpinned link: its
    fd (closing it detaches the program)."""
    from bcc import BPF
    from pyroute2 import IPRoute

    from flannel_xdp import netns
    from flannel_xdp.loader import libbpf

    module = BPF(text=b"int someone_elses(struct __sk_buff *skb) { return 0; }")
    prog_fd = module.load_func(b"someone_elses", BPF.SCHED_CLS).fd
    try:
        with netns.entered(ns), IPRoute() as ipr:
            idx = ipr.link_lookup(ifname=dev)[0]
            return libbpf.link_create(prog_fd, idx, libbpf.BPF_TCX_INGRESS)
    finally:
        module.cleanup()


def someone_elses_filter(ns: str, dev: str, prio: int) -> int:
    """Another user's tc ingress program on dev in ns, at prio; its fd (close it after)."""
    from bcc import BPF
    from pyroute2 import IPRoute
    from pyroute2.netlink.exceptions import NetlinkError

    from flannel_xdp import netns
    from flannel_xdp.loader import attach

    module = BPF(text=b"int someone_elses(struct __sk_buff *skb) { return 0; }")
    fd = os.dup(module.load_func(b"someone_elses", BPF.SCHED_CLS).fd)
    module.cleanup()
    with netns.entered(ns), IPRoute() as ipr:
        idx = ipr.link_lookup(ifname=dev)[0]
        with contextlib.suppress(NetlinkError):  # a clsact may be there already
            ipr.tc("add", "clsact", idx)
        parent = attach.TC_PARENT["ingress"]
        ipr.tc("add-filter", "bpf", idx, ":1", fd=fd, name="someone_elses", parent=parent,
               prio=prio, classid=1, direct_action=True)  # fmt: skip
    return fd


def underlay_programs(ns: str, dev: str = "eth0") -> dict[str, list[int]]:
    """Ids of the programs on dev's ingress in ns, by hook: xdp, tc (clsact filters), tcx."""
    from pyroute2 import IPRoute

    from flannel_xdp.loader import devices, libbpf

    res = subprocess.run(
        ["ip", "netns", "exec", ns, "bpftool", "-j", "net"], capture_output=True, text=True
    )
    (net,) = json.loads(res.stdout)
    with netns.entered(ns):
        xdp = attach.xdp_state(dev)[1]
        with IPRoute() as ipr:
            index = devices.ifindex(ipr, dev)
        assert index is not None, f"{dev} is not in {ns}"
        tcx = libbpf.prog_query(index, libbpf.BPF_TCX_INGRESS)
    return {
        "xdp": [xdp] if xdp else [],
        "tc": [p["id"] for p in net["tc"]
               if p["devname"] == dev and p["kind"] == "clsact/ingress"],
        "tcx": tcx,
    }  # fmt: skip


def prepare_downgrade(ns: str, bpffs: str, iface: str) -> subprocess.CompletedProcess[str]:
    """`flannel-xdp prepare-downgrade` in the node's netns, as an operator runs it there
    (its mount namespace kept: the pins are under bpffs)."""
    return subprocess.run(
        ["nsenter", f"--net=/run/netns/{ns}", sys.executable, "-m", "flannel_xdp.cli",
         "prepare-downgrade", "--iface", iface, "--bpffs", bpffs],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
