"""Flannel's backends, by the names flannel gives them: the network config's Backend.Type,
a lease's BackendType and the `backend` label of every metric."""

from __future__ import annotations

from enum import StrEnum


class Backend(StrEnum):
    """The backends that flannel-xdp runs in BPF."""

    VXLAN = "vxlan"
    HOST_GW = "host-gw"
