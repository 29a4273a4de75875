"""What tests check about the fast path's program on pods' veth ends."""

from __future__ import annotations

from pyroute2 import IPRoute

from flannel_xdp.loader import attach
from flannel_xdp.loader.programs import POD_INGRESS


def pod_ports_attached() -> list[str]:
    """The interfaces (pods' veth ends) of this netns whose tcx ingress runs our
    pod_ingress."""
    with IPRoute() as ipr:
        links = [(link["index"], link.get_attr("IFLA_IFNAME")) for link in ipr.get_links()]
    return [
        name
        for index, name in links
        if POD_INGRESS.name in attach.tcx_programs(index, POD_INGRESS.direction)
    ]
