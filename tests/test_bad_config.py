"""Bad configuration: exit code 2, a message naming the problem, and nothing made.

Every case runs the real `flannel-xdp agent` against a real etcd, inside a network
namespace of its own with an underlay ul0 (192.0.2.10/24), and then looks for anything
the agent could have made (tests/node_support.made_on_node): a tunnel link, an XDP
program, a clsact qdisc or tc filter, iptables chains, the pin directory, subnet.env, a
lease in etcd. A control run with a good config shows that the same look finds all of
it when the agent does start.

Which checks, and where (see agent/cli.py, agent/config.py, loader/bpffs.py):
* flags, capabilities and --bpffs: before the agent talks to etcd at all;
* the network config (flanneld's own rules, agent/config.py): as soon as it is read;
* the interface, and a Network overlapping the underlay: before the lease is taken.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import uuid
from dataclasses import dataclass

import pytest

from tests.etcd_support import EtcdCluster, etcd_cluster
from tests.node_support import (
    AGENT_TIMEOUT,
    agent_argv,
    agent_env,
    in_node,
    made_on_node,
    new_bpffs,
    node_netns,
    teardown_node,
)
from tests.requirements import require_root_and_bcc

pytestmark = pytest.mark.lab

GOOD = {"Network": "198.18.0.0/16", "Backend": {"Type": "vxlan"}}
NOBODY = "65534"


@dataclass(frozen=True)
class Case:
    config: str  # the value at <prefix>/config
    expect: tuple[str, ...]  # substrings of the error line, in order
    args: tuple[str, ...] = ()
    setpriv: tuple[str, ...] = ()  # options for setpriv: dropped capabilities, a uid
    bpffs: str | None = None  # None: a fresh path under /sys/fs/bpf
    iface: str = "ul0"
    env: tuple[tuple[str, str], ...] = ()  # added to the agent's environment


def cfg(**changes) -> str:
    c = json.loads(json.dumps(GOOD))
    for key, value in changes.items():
        if key.startswith("Backend_"):
            c["Backend"][key.removeprefix("Backend_")] = value
        else:
            c[key] = value
    return json.dumps(c)


CASES: dict[str, Case] = {
    # -- the network config in etcd: not JSON, wrong types --------------------------------
    "broken-json": Case(json.dumps(GOOD)[:-1], ("{config}: config is not valid JSON",)),
    "not-an-object": Case('["198.18.0.0/16"]', ("{config}: config: expected a JSON object",)),
    "subnetlen-string": Case(
        cfg(SubnetLen="24"), ("{config}: SubnetLen: expected a whole number, got '24'",)
    ),
    "subnetlen-fraction": Case(
        cfg(SubnetLen=24.5), ("{config}: SubnetLen: expected a whole number, got 24.5",)
    ),
    "subnetlen-bool": Case(cfg(SubnetLen=True), ("{config}: SubnetLen: expected a whole number",)),
    "backend-list": Case(
        json.dumps({**GOOD, "Backend": []}), ("{config}: Backend: expected an object, got []",)
    ),
    "backend-string": Case(
        json.dumps({**GOOD, "Backend": "vxlan"}), ("{config}: Backend: expected an object",)
    ),
    "network-number": Case(cfg(Network=10), ("{config}: Network: expected a string, got 10",)),
    "vni-string": Case(cfg(Backend_VNI="1"), ("{config}: Backend.VNI: expected a whole number",)),
    "directrouting-string": Case(
        cfg(Backend_DirectRouting="yes"),
        ("{config}: Backend.DirectRouting: expected true or false",),
    ),
    "key-twice": Case(
        '{"Network": "198.18.0.0/16", "network": "198.19.0.0/16"}',
        ("{config}: config: key 'network' given twice",),
    ),
    # -- values out of range (flanneld's rules) -------------------------------------------
    "subnetlen-31": Case(cfg(SubnetLen=31), ("{config}: SubnetLen: must be at most 30, got 31",)),
    "subnetlen-33": Case(cfg(SubnetLen=33), ("{config}: SubnetLen: must be at most 30, got 33",)),
    "subnetlen-negative": Case(
        cfg(SubnetLen=-1), ("{config}: SubnetLen: must not be negative, got -1",)
    ),
    "subnetlen-17-of-16": Case(
        cfg(SubnetLen=17),
        ("{config}: SubnetLen: /17 leaves Network 198.18.0.0/16 room for fewer than four",),
    ),
    "subnetlen-wider-than-network": Case(
        cfg(SubnetLen=8), ("{config}: SubnetLen: /8 leaves Network 198.18.0.0/16",)
    ),
    "network-too-small": Case(
        cfg(Network="198.18.0.0/29"), ("{config}: Network: 198.18.0.0/29 is too small",)
    ),
    "network-not-a-network": Case(
        cfg(Network="198.18.0.0/33"), ("{config}: Network: not an IPv4 network: '198.18.0.0/33'",)
    ),
    "subnetmin-outside": Case(
        cfg(SubnetMin="198.19.0.0"),
        ("{config}: SubnetMin: 198.19.0.0 is not in Network 198.18.0.0/16",),
    ),
    "subnetmax-unaligned": Case(
        cfg(SubnetMax="198.18.200.1"),
        ("{config}: SubnetMax: 198.18.200.1 is not on a /24 boundary",),
    ),
    "vni-too-big": Case(
        cfg(Backend_VNI=1 << 24), ("{config}: Backend.VNI: must be 1..16777215, got 16777216",)
    ),
    "unknown-backend": Case(
        cfg(Backend_Type="ipsec"), ("{config}: Backend.Type: unknown backend type 'ipsec'",)
    ),
    "udp-backend": Case(
        json.dumps({"Network": "198.18.0.0/16"}),  # no Backend: udp, as flanneld
        ("backend 'udp' has no BPF data path",),
    ),
    # -- a Network that overlaps this node's underlay -------------------------------------
    "network-holds-public-ip": Case(
        cfg(Network="198.18.0.0/16"),
        (
            "{prefix}/config does not fit this node: Network: 198.18.0.0/16 contains this "
            "node's public IP 198.18.7.7",
        ),
        args=("--public-ip", "198.18.7.7"),
    ),
    "network-holds-underlay-address": Case(
        cfg(Network="192.0.2.0/24", SubnetLen=28),
        (
            "does not fit this node: Network: 192.0.2.0/24 contains 192.0.2.10, the address of "
            "the underlay interface ul0",
        ),
        args=("--public-ip", "198.51.100.7"),
    ),
    "network-overlaps-underlay-subnet": Case(
        cfg(Network="192.0.2.128/25", SubnetLen=28),
        (
            "does not fit this node: Network: 192.0.2.128/25 overlaps 192.0.2.0/24, the on-link "
            "network of the underlay interface ul0",
        ),
    ),
    "host-gw-public-ip-elsewhere": Case(
        cfg(Backend_Type="host-gw"),
        ("host-gw needs the public IP on ul0 (192.0.2.10), not 198.51.100.7",),
        args=("--public-ip", "198.51.100.7"),
    ),
    "fast-path-on-with-host-gw-and-xdp-hook": Case(
        cfg(Backend_Type="host-gw"),
        (
            "--fast-path on: the fast path fits a vxlan network with the kernel ingress hook, "
            "or host-gw with tc or kernel; this node runs host-gw with the xdp hook",
        ),
        args=("--fast-path", "on", "--ingress-hook", "xdp"),
    ),
    "udp-fast-path-with-xdp-hook": Case(  # the alias of --fast-path on
        json.dumps(GOOD),
        (
            "--fast-path on: the fast path fits a vxlan network with the kernel ingress hook, "
            "or host-gw with tc or kernel; this node runs vxlan with the xdp hook",
        ),
        args=("--udp-fast-path", "--ingress-hook", "xdp"),
    ),
    "fast-path-on-with-vxlan-and-tc-hook": Case(
        json.dumps(GOOD),
        (
            "--fast-path on: the fast path fits a vxlan network with the kernel ingress hook, "
            "or host-gw with tc or kernel; this node runs vxlan with the tc hook",
        ),
        args=("--fast-path", "on", "--ingress-hook", "tc"),
    ),
    "fast-path-on-without-tcx": Case(
        json.dumps(GOOD),
        ("--fast-path on: this kernel has no tcx hooks (FXDP_TEST_KERNEL_LACKS says so)",),
        args=("--fast-path", "on"),
        env=(("FXDP_TEST_KERNEL_LACKS", "tcx"),),
    ),
    "fast-path-bad-mode": Case(
        json.dumps(GOOD),
        ("--fast-path: 'fast'; choose auto, on, off",),
        env=(("FLANNELD_FAST_PATH", "fast"),),
    ),
    "tcp-fast-path-with-fast-path-off": Case(
        json.dumps(GOOD),
        ("--tcp-fast-path contradicts --fast-path off",),
        args=("--tcp-fast-path", "--fast-path", "off"),
    ),
    # -- the node: interface, bpffs, capabilities -----------------------------------------
    "iface-missing": Case(
        json.dumps(GOOD),
        ("--iface: none of the interfaces ['nosuch'] exists",),
        iface="nosuch",
    ),
    "iface-without-address": Case(
        json.dumps(GOOD), ("interface 'ul0p' has no IPv4 address",), iface="ul0p"
    ),
    "bpffs-on-tmpfs": Case(
        json.dumps(GOOD),
        ("--bpffs {bpffs}: ", " is on tmpfs, not on a bpf filesystem, so nothing can be pinned"),
        bpffs="/dev/shm/fxdp-bad-{tag}/pins",
    ),
    "bpffs-on-a-disk": Case(
        json.dumps(GOOD),
        ("--bpffs {bpffs}: ", "not on a bpf filesystem, so nothing can be pinned"),
        bpffs="{tmp}/pins",
    ),
    "bpffs-under-a-file": Case(
        json.dumps(GOOD),
        ("--bpffs {bpffs}: {tmp}/file exists and is not a directory",),
        bpffs="{tmp}/file/pins",
    ),
    "no-net-admin": Case(
        json.dumps(GOOD),
        ("missing capability: CAP_NET_ADMIN (to create the tunnel device",),
        setpriv=("--inh-caps=-all", "--bounding-set=-net_admin"),
    ),
    "no-sys-admin": Case(  # CAP_BPF and CAP_PERFMON are kept: they are not enough for bcc
        json.dumps(GOOD),
        ("missing capability: CAP_SYS_ADMIN (for bcc to load the programs",),
        setpriv=("--inh-caps=-all", "--bounding-set=-sys_admin"),
    ),
    "not-root": Case(
        json.dumps(GOOD),
        (
            "missing capabilities: CAP_NET_ADMIN (",
            "; CAP_SYS_ADMIN (",
            "capabilities.add: [NET_ADMIN, SYS_ADMIN]",
        ),
        setpriv=(f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"),
    ),
    # -- flags ------------------------------------------------------------------------------
    "max-subnets-zero": Case(
        json.dumps(GOOD),
        ("--max-subnets: must be 1..16777216, not 0",),
        args=("--max-subnets", "0"),
    ),
    "metrics-ip-bad": Case(
        json.dumps(GOOD),
        ("--metrics-ip: 'localhost:9' is not an IP address",),
        args=("--metrics-ip", "localhost:9"),
    ),
    "healthz-port-bad": Case(
        json.dumps(GOOD),
        ("--healthz-port: 70000 is not a port",),
        args=("--healthz-port", "70000"),
    ),
    "build-cache-relative": Case(
        json.dumps(GOOD),
        ("--build-cache: 'builds' is not an absolute path",),
        args=("--build-cache", "builds"),
    ),
}


@pytest.fixture(scope="module")
def etcd():
    with etcd_cluster(1, unix_socket=True) as cluster:
        yield cluster


@pytest.fixture(scope="module")
def node():
    require_root_and_bcc("ip", "tc", "nsenter", "setpriv", "iptables-save")
    with node_netns("fxbad") as ns:
        yield ns


@dataclass
class Run:
    ns: str
    etcd: EtcdCluster
    prefix: str
    bpffs: str
    subnet_file: str

    def made(self) -> list[str]:
        return made_on_node(self.ns, self.bpffs, self.subnet_file, self.etcd, self.prefix)


def _mounts(*paths: str) -> set[str]:
    """Mounts of bpffs, and mounts under paths (other tests come and go meanwhile)."""
    out = set()
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            fstype = fields[fields.index("-") + 1]
            if fstype == "bpf" or any(fields[4].startswith(p) for p in paths):
                out.add(f"{fields[4]} ({fstype})")
    return out


@pytest.mark.parametrize("name", list(CASES))
def test_bad_configuration_exits_2_and_makes_nothing(name, etcd, node, tmp_path):
    case = CASES[name]
    tag = uuid.uuid4().hex[:8]
    (tmp_path / "file").write_text("not a directory\n")
    bpffs = (case.bpffs or new_bpffs()).format(tmp=tmp_path, tag=tag)
    run = Run(node, etcd, etcd.new_prefix(), bpffs, str(tmp_path / "subnet.env"))
    etcd.put(f"{run.prefix}/config", case.config)
    assert run.made() == [], "the node was not clean before the run"
    watched = (str(tmp_path), os.path.dirname(bpffs))
    mounts = _mounts(*watched)
    argv = agent_argv(etcd, run.prefix, bpffs, run.subnet_file, *case.args, iface=case.iface)
    started = time.monotonic()
    try:
        result = subprocess.run(
            in_node(node, argv, case.setpriv),
            capture_output=True,
            text=True,
            timeout=AGENT_TIMEOUT,
            env={**agent_env(), **dict(case.env)},
            cwd="/",  # the other uid must find nothing it cannot read
        )
    finally:
        made = run.made()
        if made:
            teardown_node(node, bpffs, run.subnet_file, etcd, run.prefix)
        if bpffs.startswith("/dev/shm/"):
            shutil.rmtree(os.path.dirname(bpffs), ignore_errors=True)
    took = time.monotonic() - started
    errors = [ln for ln in result.stderr.splitlines() if " ERROR " in ln]
    print(f"{name}: exit {result.returncode} in {took:.1f} s: {errors}")
    assert result.returncode == 2, result.stderr
    assert len(errors) == 1, result.stderr
    line = errors[0]
    pos = 0
    for part in case.expect:
        want = part.format(
            config=f"{run.prefix}/config", prefix=run.prefix, bpffs=bpffs, tmp=tmp_path
        )
        found = line.find(want, pos)
        assert found >= 0, f"{want!r} not in the error line {line!r}"
        pos = found + len(want)
    assert "Traceback" not in result.stderr, result.stderr
    assert made == [], f"the agent made {made}"
    assert _mounts(*watched) == mounts, "the agent mounted something"


# What made_on_node() must find after a good start, by ingress hook: every kind of thing
# it looks for turns up in one of the two.
CONTROL_FINDS = {
    "xdp": ("link fxdp.1", "XDP program on ul0", "clsact qdisc on flannel.1",
            "tc egress filter on flannel.1"),
    "kernel": ("tcx ingress programs on ul0", "tc ingress filter on flannel.1"),
}  # fmt: skip


@pytest.mark.parametrize("hook", list(CONTROL_FINDS))
def test_control_a_good_config_starts_and_is_found(etcd, node, tmp_path, hook):
    """The same harness with a good config: the agent starts, and made_on_node() finds
    its links, programs, qdiscs, pins, subnet file and lease; teardown removes them."""
    run = Run(node, etcd, etcd.new_prefix(), new_bpffs(), str(tmp_path / "subnet.env"))
    etcd.put(f"{run.prefix}/config", json.dumps(GOOD))
    log_path = tmp_path / "agent.log"
    argv = agent_argv(etcd, run.prefix, run.bpffs, run.subnet_file, "--ingress-hook", hook)
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            in_node(node, argv), stdout=log, stderr=subprocess.STDOUT, env=agent_env()
        )
    try:
        deadline = time.monotonic() + AGENT_TIMEOUT
        while "ready: " not in log_path.read_text():
            assert proc.poll() is None, (
                f"the agent exited {proc.returncode}:\n{log_path.read_text()}"
            )
            assert time.monotonic() < deadline, f"the agent is not ready:\n{log_path.read_text()}"
            time.sleep(0.2)
        proc.terminate()
        assert proc.wait(AGENT_TIMEOUT) == 0, log_path.read_text()
        made = " | ".join(run.made())
        for thing in (
            *CONTROL_FINDS[hook],
            "link flannel.1",
            "iptables -A FLANNEL-FWD",
            f"pin directory {run.bpffs}",
            f"subnet file {run.subnet_file}",
            f"lease {run.prefix}/subnets/198.18.",
        ):
            assert thing in made, f"{thing!r} not found in: {made}"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        teardown_node(node, run.bpffs, run.subnet_file, etcd, run.prefix)
    assert run.made() == []
