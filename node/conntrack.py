"""The node's conntrack setting that decides whether TCP may take the fast path.

The fast path (bpf/fastpath.h) carries a TCP stream's segments past conntrack, which
then has not seen them. With its window checks on, conntrack would judge the next
segment of that stream it does see (a FIN, a segment the fast path leaves to the stack)
against windows long gone, and call it INVALID, which kube-proxy's rules drop. So TCP
takes the fast path only while conntrack leaves windows unchecked in the node's netns.
"""

from __future__ import annotations

import os

TCP_BE_LIBERAL = "net.netfilter.nf_conntrack_tcp_be_liberal"


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
    """Why TCP cannot take the fast path on this node now; None if it can."""
    liberal = tcp_be_liberal()
    if liberal:
        return None
    now = "there is no conntrack" if liberal is None else "it is 0"
    return (
        f"TCP on the fast path needs {TCP_BE_LIBERAL}=1 in the node's network namespace ({now}): "
        "conntrack does not see the segments the fast path carries, and would judge "
        "the next one it sees against stale windows"
    )
