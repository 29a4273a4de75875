"""Where underlay_tc sits on the underlay: wherever attaching it drops nothing.

The underlay carries the node's traffic when we first attach to it (a node that moves
over from flanneld, a restart, an upgrade). Adding a clsact qdisc deactivates the
device's transmit queues for a moment, and what the node sends meanwhile is dropped.
So underlay_tc goes through a tcx link pinned as links/underlay_tc@<ifindex> (no qdisc)
unless the underlay has a clsact qdisc already, as an older release or a handover of
one leaves it: then it is our filter there, and nothing is grafted either. A kernel
without tcx (before Linux 6.6) gets the qdisc, and the moment's loss with it.

Once placed, a program stays on its hook: a new build replaces the link's program or
the filter's, each atomically.
"""

from __future__ import annotations

import errno
import logging
import os
from enum import StrEnum

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from flannel_xdp.loader import attach, devices, libbpf
from flannel_xdp.loader.bpffs import PinDir
from flannel_xdp.loader.programs import UNDERLAY_TC

log = logging.getLogger(__name__)


class Hook(StrEnum):
    TCX = "tcx"
    TC = "tc"  # a filter on a clsact qdisc that was there


def link_pin(pins: PinDir, index: int) -> str:
    return pins.link(f"{UNDERLAY_TC.name}@{index}")


def _live_link(pins: PinDir, index: int) -> int | None:
    """The fd of our pinned link on the underlay; None (and no stale pin) without one."""
    pin = link_pin(pins, index)
    if not os.path.lexists(pin):
        return None
    fd = libbpf.obj_get(pin)
    if libbpf.link_info(fd).tcx_ifindex == index:
        return fd
    os.close(fd)
    os.unlink(pin)  # an interface of that index that is gone
    return None


def _has_clsact(index: int) -> bool:
    with IPRoute() as ipr:
        try:
            qdiscs = ipr.get_qdiscs(index)
        except NetlinkError as exc:
            if exc.code == errno.ENODEV:
                raise attach.NoSuchInterface(f"interface {index} is gone") from exc
            raise
    return any(q.get_attr("TCA_KIND") == "clsact" for q in qdiscs)


def attach_program(pins: PinDir, underlay: str, index: int, prog_fd: int, name: str) -> Hook:
    """Put the program on the underlay's tc ingress, where it runs already or else
    where no qdisc must be added; the hook it is on."""
    fd = _live_link(pins, index)
    if fd is not None:
        try:
            libbpf.link_update(fd, prog_fd)
        finally:
            os.close(fd)
        log.info("replaced %s's tcx ingress program with %s", underlay, name)
        hook = Hook.TCX
    elif (clsact := _has_clsact(index)) or (no_tcx := attach.tcx_problem()) is not None:
        if not clsact:
            log.warning("%s gets a clsact qdisc, which drops what it sends meanwhile: %s",
                        underlay, no_tcx)  # fmt: skip
        attach.attach_tc(underlay, UNDERLAY_TC.direction, prog_fd, name)
        return Hook.TC
    else:
        attach.attach_tcx(index, UNDERLAY_TC.direction, prog_fd, name, link_pin(pins, index))
        hook = Hook.TCX
    # A filter of ours left beside the link (an install killed in between) would take
    # over, unseen, once the link went.
    attach.detach_tc(underlay, UNDERLAY_TC.direction, keep_qdisc=True)
    return hook


def detach_program(pins: PinDir, underlay: str, keep_qdisc: bool = False) -> None:
    """Take the program off the underlay, from either hook; returns once it is off.
    keep_qdisc leaves a clsact qdisc we found there (deleting it drops what the node
    sends for a moment)."""
    with IPRoute() as ipr:
        index = devices.ifindex(ipr, underlay)
    if index is not None and (fd := _live_link(pins, index)) is not None:
        os.close(fd)
        attach.unpin_tcx_links([link_pin(pins, index)], UNDERLAY_TC.direction)
    attach.detach_tc(underlay, UNDERLAY_TC.direction, keep_qdisc=keep_qdisc)


def move_to_clsact(pins: PinDir, underlay: str) -> bool:
    """For a release that knows underlay_tc only as a clsact filter (0.1.0): the program
    the tcx link runs becomes the underlay's filter, then the link goes. Adding the qdisc
    drops what the underlay sends for a moment. False when there is no link to move."""
    index = devices.require_ifindex(underlay)
    fd = _live_link(pins, index)
    if fd is None:
        return False
    try:
        prog_id = libbpf.link_info(fd).prog_id
    finally:
        os.close(fd)
    prog_fd = libbpf.prog_fd_by_id(prog_id)
    try:
        name = libbpf.prog_info(prog_fd).name.decode()
        attach.attach_tc(underlay, UNDERLAY_TC.direction, prog_fd, name)
    finally:
        os.close(prog_fd)
    attach.unpin_tcx_links([link_pin(pins, index)], UNDERLAY_TC.direction)
    log.info("%s: %s moved from its tcx link to a filter on a clsact qdisc", underlay, name)
    return True
