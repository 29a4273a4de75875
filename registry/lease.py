"""Subnet leases as flanneld writes them: the etcd key and the JSON value, byte for byte."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network

from flannel_xdp.mac import format_mac, parse_mac

# flannel's own key pattern (pkg/subnet/subnet.go), anchored at the end as there.
SUBNET_KEY_RE = re.compile(r"(\d+\.\d+.\d+.\d+)-(\d+)(?:&([a-f\d:]+)-(\d+))?$")


class LeaseError(ValueError):
    """A lease key or value is malformed; the message says what and where."""


def subnet_key_name(subnet: IPv4Network) -> str:
    """'10.244.3.0-24': the last component of a lease key."""
    return f"{subnet.network_address}-{subnet.prefixlen}"


def parse_subnet_key(key: str) -> IPv4Network:
    m = SUBNET_KEY_RE.search(key)
    if not m:
        raise LeaseError(f"lease key {key!r} does not name a subnet")
    if m.group(3):
        raise LeaseError(f"lease key {key!r} is dual stack, which flannel-xdp does not support yet")
    try:
        return IPv4Network(f"{m.group(1)}/{m.group(2)}")
    except ValueError as exc:
        raise LeaseError(f"lease key {key!r}: {exc}") from exc


@dataclass(frozen=True)
class LeaseAttrs:
    """The value of a lease key (flannel's LeaseAttrs)."""

    public_ip: IPv4Address
    backend_type: str
    vni: int | None = None  # vxlan only
    vtep_mac: str | None = None  # vxlan only

    def to_json(self) -> str:
        # Go's encoding/json output: field order of the struct, no spaces. BackendData is a
        # json.RawMessage tagged omitempty: flanneld's host-gw lease has no such key at all.
        value: dict = {
            "PublicIP": str(self.public_ip),
            "PublicIPv6": None,
            "BackendType": self.backend_type,
        }
        if self.backend_type == "vxlan":
            value["BackendData"] = {"VNI": self.vni, "VtepMAC": self.vtep_mac}
        return json.dumps(value, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str | bytes) -> LeaseAttrs:
        try:
            raw = json.loads(text)
        except (ValueError, UnicodeDecodeError) as exc:
            raise LeaseError(f"lease value is not JSON: {exc}") from exc
        if not isinstance(raw, dict):
            raise LeaseError("lease value is not a JSON object")
        v = {k.lower(): val for k, val in raw.items()}
        try:
            public_ip = IPv4Address(v.get("publicip"))
        except ValueError as exc:
            raise LeaseError(f"lease PublicIP: {exc}") from exc
        backend = v.get("backendtype") or "udp"
        if not isinstance(backend, str):
            raise LeaseError(f"lease BackendType: expected a string, got {backend!r}")
        if backend != "vxlan":
            return cls(public_ip=public_ip, backend_type=backend)
        data = v.get("backenddata")
        if not isinstance(data, dict):
            raise LeaseError(f"vxlan lease BackendData: expected an object, got {data!r}")
        d = {k.lower(): val for k, val in data.items()}
        vni = d.get("vni")
        if isinstance(vni, bool) or not isinstance(vni, int) or not 0 < vni < 1 << 24:
            raise LeaseError(f"vxlan lease BackendData.VNI: invalid {vni!r}")
        mac = d.get("vtepmac")
        try:
            mac = format_mac(parse_mac(mac if isinstance(mac, str) else ""))
        except ValueError as exc:
            raise LeaseError(f"vxlan lease BackendData.VtepMAC: {exc}") from exc
        return cls(public_ip=public_ip, backend_type=backend, vni=vni, vtep_mac=mac)
