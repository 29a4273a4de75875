"""agent/pod_watch.py: which routing-netlink notifications wake the pod scan (unit), and
the watch on the real kernel in a scratch netns: a bridge, its port, its neighbours and
its forwarding entries wake it; a neighbour of another device does not."""

from __future__ import annotations

import asyncio
import errno
import struct
import subprocess

import pytest

from flannel_xdp import netns
from flannel_xdp.agent.pod_watch import NDMSG, NLMSGHDR, PodWatch, concerns_pods
from flannel_xdp.rtnl import AF_BRIDGE, RTM_DELLINK, RTM_NEWLINK, RTM_NEWNEIGH
from tests.node_support import UNDERLAY, node_netns
from tests.requirements import require_root_and_bcc

BRIDGE_INDEX = 7
RTM_NEWROUTE = 24


def message(kind: int, body: bytes) -> bytes:
    length = NLMSGHDR.size + len(body)
    padding = b"\0" * (-length % 4)
    return NLMSGHDR.pack(length, kind, 0, 0, 0) + body + padding


def neighbour(family: int, ifindex: int) -> bytes:
    return message(RTM_NEWNEIGH, NDMSG.pack(family, ifindex, 0x02, 0, 1) + b"\0" * 3)


@pytest.mark.unit
@pytest.mark.parametrize(
    ("data", "want"),
    [
        (message(RTM_NEWLINK, b"\0" * 16), True),
        (message(RTM_DELLINK, b"\0" * 16), True),
        (neighbour(2, BRIDGE_INDEX), True),  # an IPv4 neighbour of the bridge
        (neighbour(AF_BRIDGE, 3), True),  # a forwarding entry of a port
        (neighbour(2, 3), False),  # a neighbour of another device
        (neighbour(2, BRIDGE_INDEX)[: NLMSGHDR.size + 4], False),  # cut short
        (message(RTM_NEWROUTE, b"\0" * 12), False),
        (b"", False),
        (neighbour(2, 3) + neighbour(2, 4) + neighbour(2, BRIDGE_INDEX), True),  # the third
    ],
    ids=[
        "link-added",
        "link-removed",
        "bridge-neighbour",
        "fdb-entry",
        "other-neighbour",
        "truncated",
        "route",
        "empty",
        "third-of-three",
    ],
)
def test_which_notifications_concern_the_pods(data: bytes, want: bool) -> None:
    assert concerns_pods(data, BRIDGE_INDEX) is want


@pytest.mark.unit
def test_without_a_bridge_no_neighbour_concerns_the_pods() -> None:
    assert not concerns_pods(neighbour(2, 0), 0)
    assert concerns_pods(neighbour(AF_BRIDGE, 5), 0)


@pytest.mark.unit
def test_a_message_claiming_more_than_was_read_ends_the_parse() -> None:
    whole = neighbour(2, BRIDGE_INDEX)
    lying = struct.pack("=I", len(whole) + 64) + whole[4:]
    assert not concerns_pods(lying, BRIDGE_INDEX)


@pytest.mark.unit
def test_a_socket_that_fails_is_no_longer_watched(caplog: pytest.LogCaptureFixture) -> None:
    """Its error is logged once and the scan goes on, on its period."""

    async def scenario() -> None:
        watch = PodWatch("cni0")
        watch.start()
        real = watch._sock

        class Failing:
            def recv(self, _size: int) -> bytes:
                raise OSError(errno.EIO, "Input/output error")

            def fileno(self) -> int:
                return real.fileno()

            def close(self) -> None:
                real.close()

        watch._sock = Failing()  # type: ignore[assignment]
        try:
            watch.read()
            assert watch._loop is None, "the failed socket is still watched"
            assert not await watch.wait(0.05, 0.0)
        finally:
            watch.close()

    asyncio.run(scenario())
    assert caplog.text.count("link and neighbour notifications failed") == 1


def _neigh(address: str, mac: str, dev: str) -> list[str]:
    return ["neigh", "add", address, "lladdr", mac, "dev", dev]


def _ip(ns: str, *args: str) -> None:
    subprocess.run(["ip", "-n", ns, *args], check=True, capture_output=True)


async def _woken(watch: PodWatch, act: list[str], ns: str) -> bool:
    _ip(ns, *act)
    return await watch.wait(1.0, 0.0)


@pytest.mark.lab
def test_the_watch_wakes_for_the_bridge_its_ports_and_their_neighbours_only() -> None:
    require_root_and_bcc("ip", "bridge")

    async def scenario(ns: str, watch: PodWatch) -> None:
        watch.start()
        assert not await watch.wait(0.3, 0.0), "woken with nothing happening"
        assert not await _woken(
            watch,
            ["neigh", "add", "192.0.2.20", "lladdr", "02:00:00:00:00:01", "dev", UNDERLAY],
            ns,
        ), "woken by a neighbour of the underlay"
        assert await _woken(watch, ["link", "add", "cni0", "type", "bridge"], ns)
        _ip(ns, "link", "set", "cni0", "up")
        await watch.wait(0.3, 0.0)  # whatever setting it up announced
        assert not await _woken(
            watch,
            ["neigh", "add", "192.0.2.21", "lladdr", "02:00:00:00:00:02", "dev", UNDERLAY],
            ns,
        ), "woken by a neighbour of the underlay, with a bridge there"
        assert await _woken(watch, _neigh("198.18.0.5", "02:00:00:00:00:03", "cni0"), ns), (
            "not woken by a neighbour of the bridge"
        )
        assert await _woken(
            watch, ["link", "add", "vpod", "type", "veth", "peer", "name", "vpodp"], ns
        )
        assert await _woken(watch, ["link", "set", "vpod", "master", "cni0"], ns)
        await watch.wait(0.3, 0.0)
        subprocess.run(
            ["bridge", "-n", ns, "fdb", "add", "02:00:00:00:00:04", "dev", "vpod", "master"],
            check=True,
            capture_output=True,
        )
        assert await watch.wait(1.0, 0.0), "not woken by a port's forwarding entry"
        assert await _woken(watch, ["link", "del", "vpod"], ns), "not woken by a port leaving"

    # The agent runs in its node's netns: so does the watch here, its socket and its
    # look-up of the bridge.
    with node_netns("fxwatch") as ns, netns.entered(ns):
        watch = PodWatch("cni0")
        try:
            asyncio.run(scenario(ns, watch))
        finally:
            watch.close()
