"""--iface / --iface-regex / default-route selection of the underlay, in a netns of our own."""

from __future__ import annotations

import subprocess
import uuid

import pytest

from flannel_xdp import netns
from flannel_xdp.node.underlay import InterfaceError, find_underlay
from tests.requirements import require_root_and_bcc

pytestmark = pytest.mark.lab


@pytest.fixture
def ns():
    require_root_and_bcc()
    name = f"fxif-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        for dev, peer, addr in (
            ("ul0", "ul0p", "192.0.2.10/24"),
            ("ul1", "ul1p", "198.51.100.10/24"),
        ):
            subprocess.run(
                ["ip", "-n", name, "link", "add", dev, "type", "veth", "peer", "name", peer],
                check=True,
            )
            subprocess.run(["ip", "-n", name, "addr", "add", addr, "dev", dev], check=True)
            subprocess.run(["ip", "-n", name, "link", "set", dev, "up"], check=True)
        subprocess.run(["ip", "-n", name, "link", "set", "ul1", "mtu", "1400"], check=True)
        subprocess.run(
            ["ip", "-n", name, "route", "add", "default", "via", "198.51.100.1"], check=True
        )
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


def test_selection_by_name_ip_regex_and_default_route(ns):
    with netns.entered(ns):
        assert find_underlay(["ul0"], []).name == "ul0"
        by_ip = find_underlay(["198.51.100.10"], [])
        assert (by_ip.name, str(by_ip.address), by_ip.mtu) == ("ul1", "198.51.100.10/24", 1400)
        assert find_underlay(["nosuch", "ul0"], []).name == "ul0"  # first that exists
        assert find_underlay([], ["^ul1$"]).name == "ul1"
        assert find_underlay([], []).name == "ul1"  # the default route's interface
        with pytest.raises(InterfaceError, match="none of the interfaces"):
            find_underlay(["nosuch"], [])
        with pytest.raises(InterfaceError, match="no interface with an IPv4 address matches"):
            find_underlay([], ["^eth"])
        with pytest.raises(InterfaceError, match="--iface-regex"):
            find_underlay([], ["("])
        with pytest.raises(InterfaceError, match="has no IPv4 address"):
            find_underlay(["ul0p"], [])
