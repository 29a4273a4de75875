"""Choosing the underlay interface and public IP, as flanneld's --iface flags do."""

from __future__ import annotations

import re
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Interface, IPv4Network, ip_address

from pyroute2 import IPRoute


class InterfaceError(RuntimeError):
    pass


@dataclass(frozen=True)
class Underlay:
    name: str
    index: int
    address: IPv4Interface  # the interface's own address (public IP unless overridden)
    mtu: int

    @property
    def network(self) -> IPv4Network:
        return self.address.network


def _links(ipr: IPRoute) -> dict[int, tuple[str, int]]:
    return {
        link["index"]: (link.get_attr("IFLA_IFNAME"), link.get_attr("IFLA_MTU"))
        for link in ipr.get_links()
    }


def _ipv4_addresses(ipr: IPRoute) -> list[tuple[int, IPv4Interface]]:
    return [
        (a["index"], IPv4Interface(f"{a.get_attr('IFA_ADDRESS')}/{a['prefixlen']}"))
        for a in ipr.get_addr(family=2)
    ]


def find_underlay(ifaces: list[str], iface_regex: list[str]) -> Underlay:
    """The first of ifaces (names or IPs) that exists, else the first regex match, else
    the interface of the default route."""
    with IPRoute() as ipr:
        links = _links(ipr)
        addrs = _ipv4_addresses(ipr)
        by_name = {name: idx for idx, (name, _) in links.items()}

        def underlay(idx: int, want: IPv4Address | None = None) -> Underlay | None:
            mine = [a for i, a in addrs if i == idx]
            if want is not None:
                mine = [a for a in mine if a.ip == want]
            if not mine:
                return None
            name, mtu = links[idx]
            return Underlay(name=name, index=idx, address=mine[0], mtu=mtu)

        for item in ifaces:
            try:
                ip = ip_address(item)
            except ValueError:
                ip = None
            if ip is not None:
                for idx, a in addrs:
                    if a.ip == ip:
                        return underlay(idx, a.ip)  # type: ignore[return-value]
                continue
            if item in by_name:
                found = underlay(by_name[item])
                if found is None:
                    raise InterfaceError(f"interface {item!r} has no IPv4 address")
                return found
        if ifaces:
            raise InterfaceError(
                f"--iface: none of the interfaces {ifaces} exists (or has that address)"
            )
        for pattern in iface_regex:
            try:
                rx = re.compile(pattern)
            except re.error as exc:
                raise InterfaceError(f"--iface-regex {pattern!r}: {exc}") from exc
            for idx, (name, _) in sorted(links.items()):
                if rx.search(name) and (found := underlay(idx)):
                    return found
        if iface_regex:
            raise InterfaceError(f"no interface with an IPv4 address matches {iface_regex}")
        for route in ipr.get_default_routes(family=2):
            idx = route.get_attr("RTA_OIF")
            if idx and (found := underlay(idx)):
                return found
    raise InterfaceError("no --iface given and no default route to pick an interface from")
