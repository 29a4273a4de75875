"""The fast path's program on the pods' veth ends: tcx links pinned as
links/pod_ingress@<ifindex>, attached as pods appear, moved to a new build, detached.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

from pyroute2 import IPRoute

from flannel_xdp.loader import attach, libbpf
from flannel_xdp.loader.bpffs import PinDir
from flannel_xdp.loader.programs import POD_INGRESS


def _runs_pod_ingress(index: int) -> bool:
    return POD_INGRESS.name in attach.tcx_programs(index, POD_INGRESS.direction)


def _interfaces() -> list[tuple[int, str]]:
    """(ifindex, name) of every interface in this netns."""
    with IPRoute() as ipr:
        return [(link["index"], link.get_attr("IFLA_IFNAME")) for link in ipr.get_links()]


def _pod_link_pins(pins: PinDir) -> list[str]:
    if not os.path.isdir(pins.links):
        return []
    prefix = f"{POD_INGRESS.name}@"
    return [pins.link(n) for n in sorted(os.listdir(pins.links)) if n.startswith(prefix)]


def _attach_pod_link(pins: PinDir, prog_fd: int, index: int) -> bool:
    """Through a tcx link pinned as links/pod_ingress@<ifindex> (a clsact qdisc would
    drop what the port sends while it is added); False when the port is gone."""
    pin = pins.link(f"{POD_INGRESS.name}@{index}")
    try:
        attach.attach_tcx(index, POD_INGRESS.direction, prog_fd, POD_INGRESS.name, pin)
    except attach.NoSuchInterface:
        return False
    return True


def _forget_gone_pod_links(pins: PinDir) -> None:
    """Unpin the links of veth ends that are gone (their pods were deleted)."""
    for pin in _pod_link_pins(pins):
        fd = libbpf.obj_get(pin)
        try:
            gone = libbpf.link_info(fd).tcx_ifindex == 0
        finally:
            os.close(fd)
        if gone:
            os.unlink(pin)


def ensure_pod_ports(bpffs: str, ports: Iterable[str]) -> list[str]:
    """Attach the pinned pod_ingress to those of ports that lack it; the ones it attached."""
    pins = PinDir(bpffs)
    _forget_gone_pod_links(pins)
    with IPRoute() as ipr:
        indexes = {p: found[0] for p in ports if (found := ipr.link_lookup(ifname=p))}
    missing = {p: index for p, index in indexes.items() if not _runs_pod_ingress(index)}
    if not missing:
        return []
    fd = libbpf.obj_get(pins.prog(POD_INGRESS.name))
    try:
        return [p for p, index in missing.items() if _attach_pod_link(pins, fd, index)]
    finally:
        os.close(fd)


def move_pod_ports(pins: PinDir, prog_fd: int) -> None:
    """Give the pods' veth ends that run an older build this one: each tcx link swaps
    its program; a veth end that an older release attached through a tc filter moves
    to a tcx link."""
    _forget_gone_pod_links(pins)
    for pin in _pod_link_pins(pins):
        fd = libbpf.obj_get(pin)
        try:
            libbpf.link_update(fd, prog_fd)
        finally:
            os.close(fd)
    for index, port in _tc_pod_ports():
        if _attach_pod_link(pins, prog_fd, index):
            attach.detach_tc(port, POD_INGRESS.direction)


def _tc_pod_ports() -> list[tuple[int, str]]:
    """(ifindex, name) of the interfaces where an older release attached pod_ingress as a
    tc filter."""
    return [
        (index, name)
        for index, name in _interfaces()
        if attach.tc_filter_name(name, POD_INGRESS.direction) == POD_INGRESS.name
    ]


def detach_pod_ports(bpffs: str) -> None:
    """Take our program off every pod's veth end that runs it; returns once it is off."""
    attach.unpin_tcx_links(_pod_link_pins(PinDir(bpffs)), POD_INGRESS.direction)
    for _, port in _tc_pod_ports():
        attach.detach_tc(port, POD_INGRESS.direction)
