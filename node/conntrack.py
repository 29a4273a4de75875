"""The node's conntrack, as the TCP fast path needs it.

The TCP fast path carries only streams whose conntrack entry the agent marked (via
ctnetlink, node/flow_marks.py) to have their windows left unchecked; so it needs
ctnetlink in the node's netns, for the events of new entries and to mark them. It does
not need the node-wide net.netfilter.nf_conntrack_tcp_be_liberal.
"""

from __future__ import annotations

import os

from . import ctnetlink

# Node-wide: conntrack leaves every TCP flow's windows unchecked. The lab and the
# benchmark may set it for the kernel's own data paths; the fast path does not need it.
TCP_BE_LIBERAL = "net.netfilter.nf_conntrack_tcp_be_liberal"
# 0: conntrack sends no events, so no new flow would be marked.
EVENTS = "net.netfilter.nf_conntrack_events"


def sysctl_path(name: str) -> str:
    return os.path.join("/proc/sys", *name.split("."))


def tcp_be_liberal() -> bool | None:
    """TCP_BE_LIBERAL in this thread's netns (/proc/sys/net is per netns); None when
    there is no conntrack to ask."""
    try:
        with open(sysctl_path(TCP_BE_LIBERAL)) as f:
            return f.read().strip() != "0"
    except FileNotFoundError:
        return None


def tcp_fast_path_problem() -> str | None:
    """Why TCP cannot take the fast path in this thread's netns; None if it can: the
    agent must follow conntrack's new entries and mark them (ctnetlink)."""
    try:
        with open(sysctl_path(EVENTS)) as f:
            if f.read().strip() == "0":
                return f"TCP on the fast path needs conntrack's events: {EVENTS} is 0"
    except FileNotFoundError:
        return "TCP on the fast path needs conntrack in the node's network namespace"
    try:
        ctnetlink.open_socket(ctnetlink.NEW_EVENTS).close()
    except OSError as exc:
        return (
            "TCP on the fast path needs conntrack's netlink interface (ctnetlink) in the node's "
            f"network namespace, to mark the TCP flows it may carry: {exc.strerror or exc}"
        )
    return None
