"""Attaching programs to tc (clsact, direct-action), tcx and XDP, in this netns.

Replacement is atomic on every hook: tc's replace-filter swaps the program
of an existing filter, a tcx link's update swaps its program, and setting XDP
over an attached program swaps it in one netlink call, so traffic never sees a gap.

tcx (bpf_link on the device's tc hook, Linux 6.6) is for devices that carry
traffic when we first attach, such as pods' veth ends and the underlay: adding a clsact qdisc
deactivates the device's queues for a moment, and what it sends then is dropped.
"""

from __future__ import annotations

import errno
import logging
import os
import time
from enum import StrEnum

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from flannel_xdp.loader import libbpf

log = logging.getLogger(__name__)

ETH_P_ALL = 0x0003
TC_PARENT = {"ingress": "ffff:fff2", "egress": "ffff:fff3"}
# Our filter's identity on a clsact hook: other users' filters are left alone.
TC_PRIO = 1
TC_HANDLE = 1

XDP_FLAGS_SKB_MODE = 1 << 1
XDP_FLAGS_DRV_MODE = 1 << 2
XDP_ATTACHED_DRV = 1
XDP_ATTACHED_SKB = 2
# pyroute2 decodes IFLA_XDP_ATTACHED to names; the kernel's numbers are the API.
_XDP_ATTACHED_NAMES = {None: 0, "xdp": 1, "xdpgeneric": 2, "xdpoffload": 3, "xdpmulti": 4}


class AttachError(RuntimeError):
    pass


class NoSuchInterface(AttachError):
    pass


class XdpMode(StrEnum):
    AUTO = "auto"
    NATIVE = "native"
    GENERIC = "generic"


def _index(ipr: IPRoute, dev: str) -> int:
    found = ipr.link_lookup(ifname=dev)
    if not found:
        raise NoSuchInterface(f"interface {dev!r} does not exist in this network namespace")
    return found[0]


def attach_tc(dev: str, direction: str, prog_fd: int, prog_name: str) -> None:
    with IPRoute() as ipr:
        idx = _index(ipr, dev)
        try:
            ipr.tc("add", "clsact", idx)
        except NetlinkError as exc:
            if exc.code != errno.EEXIST:
                raise AttachError(f"{dev}: cannot add clsact qdisc: {exc}") from exc
        try:
            ipr.tc(
                "replace-filter",
                "bpf",
                idx,
                TC_HANDLE,
                fd=prog_fd,
                name=prog_name,
                parent=TC_PARENT[direction],
                prio=TC_PRIO,
                protocol=ETH_P_ALL,
                classid=1,
                direct_action=True,
            )
        except NetlinkError as exc:
            raise AttachError(f"{dev}: cannot attach {prog_name} to tc {direction}: {exc}") from exc
    log.info("attached %s to tc %s of %s", prog_name, direction, dev)


def tc_filters(ipr: IPRoute, index: int, direction: str) -> list[tuple[int, str | None]]:
    """(prio, bpf program name or None) of every filter on a tc hook of the interface;
    none without a clsact qdisc."""
    try:
        filters = ipr.get_filters(index, parent=TC_PARENT[direction])
    except NetlinkError as exc:
        if exc.code == errno.EINVAL:  # no clsact qdisc
            return []
        raise
    return [
        (f["info"] >> 16, options.get_attr("TCA_BPF_NAME"))
        for f in filters
        if (options := f.get_attr("TCA_OPTIONS"))  # not the header entry of a prio
    ]


def tc_filter_name(dev: str, direction: str) -> str | None:
    """The program name of our filter on dev's tc hook; None without one (or without dev)."""
    with IPRoute() as ipr:
        found = ipr.link_lookup(ifname=dev)
        if not found:
            return None
        filters = tc_filters(ipr, found[0], direction)
    return next((name for prio, name in filters if prio == TC_PRIO and name), None)


TCX_ATTACH_TYPE = {"ingress": libbpf.BPF_TCX_INGRESS, "egress": libbpf.BPF_TCX_EGRESS}


LOOPBACK_IFINDEX = 1  # in every netns


def tcx_problem() -> str | None:
    """Why this kernel cannot attach through tcx (it came with Linux 6.6); None if it can."""
    try:
        libbpf.prog_query(LOOPBACK_IFINDEX, libbpf.BPF_TCX_INGRESS)
    except libbpf.BpfError as exc:
        return f"this kernel has no tcx hooks (Linux 6.6 and later): {exc}"
    return None


def tcx_programs(index: int, direction: str) -> list[str]:
    """The names of the programs on the interface's tcx hook, in the order they run."""
    ids = libbpf.prog_query(index, TCX_ATTACH_TYPE[direction])
    return [name for i in ids if (name := libbpf.prog_name_by_id(i)) is not None]


def attach_tcx(index: int, direction: str, prog_fd: int, prog_name: str, pin: str) -> None:
    """Attach through a bpf_link pinned at pin (unpinning it detaches); a pin left by
    an interface that is gone is replaced. Nothing stays attached when pinning fails."""
    try:
        link_fd = libbpf.link_create(prog_fd, index, TCX_ATTACH_TYPE[direction])
    except libbpf.BpfError as exc:
        if exc.errno == errno.ENODEV:
            raise NoSuchInterface(f"interface {index} is gone") from exc
        raise AttachError(
            f"ifindex {index}: cannot attach {prog_name} to tcx {direction}: {exc}"
        ) from exc
    try:
        if os.path.lexists(pin):
            os.unlink(pin)
        libbpf.obj_pin(link_fd, pin)
    finally:
        os.close(link_fd)
    log.info("attached %s to tcx %s of ifindex %d", prog_name, direction, index)


# How long unpin_tcx_links() waits for the kernel to let go of an unpinned link.
TCX_DETACH_WAIT_S = 1.0


def unpin_tcx_links(pins: list[str], direction: str) -> None:
    """Unpin each tcx link (its last reference) and return once its program is off its
    interface: the kernel releases an unpinned link after an RCU grace period and a work
    item, a few milliseconds later, and until then the interface still runs it."""
    attached = []
    for pin in pins:
        fd = libbpf.obj_get(pin)
        try:
            info = libbpf.link_info(fd)
        finally:
            os.close(fd)
        attached.append((info.tcx_ifindex, info.prog_id))
        os.unlink(pin)
    deadline = time.monotonic() + TCX_DETACH_WAIT_S
    while time.monotonic() < deadline and any(
        _tcx_runs(index, direction, prog_id) for index, prog_id in attached
    ):
        time.sleep(0.001)


def _tcx_runs(index: int, direction: str, prog_id: int) -> bool:
    if index == 0:  # the interface is gone
        return False
    try:
        return prog_id in libbpf.prog_query(index, TCX_ATTACH_TYPE[direction])
    except libbpf.BpfError:  # gone meanwhile
        return False


def detach_tc(dev: str, direction: str, keep_qdisc: bool = False) -> bool:
    """Remove our filter; drop the clsact qdisc when no filter is left on it, unless
    keep_qdisc: adding or deleting a qdisc deactivates the device's queues for a moment,
    and what the device sends meanwhile is dropped (the underlay of a node that keeps
    forwarding keeps an empty clsact)."""
    with IPRoute() as ipr:
        found = ipr.link_lookup(ifname=dev)
        if not found:
            return False
        idx = found[0]
        try:
            ipr.tc(
                "del-filter",
                "bpf",
                idx,
                TC_HANDLE,
                parent=TC_PARENT[direction],
                prio=TC_PRIO,
                protocol=ETH_P_ALL,
            )
        except NetlinkError as exc:
            if exc.code not in (errno.ENOENT, errno.EINVAL):
                raise AttachError(f"{dev}: cannot detach tc {direction} filter: {exc}") from exc
            return False
        left = [
            f
            for parent in TC_PARENT.values()
            for f in ipr.get_filters(idx, parent=parent)
            if f.get_attr("TCA_KIND")
        ]
        if not left and not keep_qdisc:
            try:
                ipr.tc("del", "clsact", idx)
            except NetlinkError as exc:
                log.debug("clsact on %s not removed: %s", dev, exc)
    log.info("detached tc %s filter from %s", direction, dev)
    return True


def xdp_state(dev: str) -> tuple[int, int]:
    """(attach mode, program id) of the XDP program on dev; (0, 0) when none."""
    with IPRoute() as ipr:
        link = ipr.get_links(_index(ipr, dev))[0]
    xdp = link.get_attr("IFLA_XDP")
    if not xdp:
        return 0, 0
    mode = xdp.get_attr("IFLA_XDP_ATTACHED")
    mode = _XDP_ATTACHED_NAMES.get(mode, mode) if not isinstance(mode, int) else mode
    return mode or 0, xdp.get_attr("IFLA_XDP_PROG_ID") or 0


def _set_xdp(dev: str, fd: int, flags: int) -> int:
    from bcc import libbcc  # bcc's netlink helper; works in the caller's netns

    return libbcc.lib.bpf_attach_xdp(dev.encode(), fd, flags)


def attach_xdp(dev: str, prog_fd: int, mode: XdpMode = XdpMode.AUTO) -> XdpMode:
    """Attach (or atomically replace) the XDP program of dev; returns the mode used."""
    attached, _ = xdp_state(dev)
    # Replacing keeps the mode in use: switching modes would need a detach (a gap).
    if attached == XDP_ATTACHED_DRV and mode == XdpMode.AUTO:
        mode = XdpMode.NATIVE
    elif attached == XDP_ATTACHED_SKB and mode == XdpMode.AUTO:
        mode = XdpMode.GENERIC
    if mode in (XdpMode.AUTO, XdpMode.NATIVE):
        if _set_xdp(dev, prog_fd, XDP_FLAGS_DRV_MODE) == 0:
            log.info("attached XDP to %s (native)", dev)
            return XdpMode.NATIVE
        if mode == XdpMode.NATIVE:
            raise AttachError(f"{dev}: native XDP attach failed (driver lacks XDP support?)")
        log.warning("%s: native XDP not available, falling back to generic XDP (slower)", dev)
    if _set_xdp(dev, prog_fd, XDP_FLAGS_SKB_MODE) != 0:
        raise AttachError(f"{dev}: generic XDP attach failed")
    log.info("attached XDP to %s (generic)", dev)
    return XdpMode.GENERIC


def detach_xdp(dev: str) -> bool:
    try:
        attached, _ = xdp_state(dev)
    except AttachError:
        return False
    if not attached:
        return False
    flags = XDP_FLAGS_DRV_MODE if attached == XDP_ATTACHED_DRV else XDP_FLAGS_SKB_MODE
    if _set_xdp(dev, -1, flags) != 0:
        raise AttachError(f"{dev}: cannot detach XDP program")
    log.info("detached XDP from %s", dev)
    return True
