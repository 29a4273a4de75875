"""flanneld's node annotations (kube subnet manager), read and written byte for byte.

Pure functions over plain dicts (a node as the API serves it in JSON), so that they are
tested without an apiserver. flanneld v0.28 (pkg/subnet/kube/annotations.go, kube.go):

* ``<prefix>/backend-type``: "vxlan", "host-gw", ...;
* ``<prefix>/backend-data``: Go's JSON of the backend's lease data, vxlan
  ``{"VNI":1,"VtepMAC":"12:c6:65:89:b4:e3"}``, host-gw ``null``;
* ``<prefix>/public-ip``: the dotted quad (``public-ip-overwrite``, when set, wins);
* ``<prefix>/kube-subnet-manager``: ``"true"``, the mark of a node flannel manages.

Read only: ``node-public-ip`` (used as the public IP) and ``public-ip-overwrite``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime
from ipaddress import IPv4Address, IPv4Network, ip_network
from typing import Any

from flannel_xdp.registry.lease import LeaseAttrs, LeaseError

DEFAULT_PREFIX = "flannel.alpha.coreos.com"


@dataclass(frozen=True)
class Annotations:
    """The annotation names under one prefix (flanneld's --kube-annotation-prefix)."""

    prefix: str = DEFAULT_PREFIX

    def _name(self, suffix: str) -> str:
        return f"{self.prefix}/{suffix}"

    @property
    def backend_type(self) -> str:
        return self._name("backend-type")

    @property
    def backend_data(self) -> str:
        return self._name("backend-data")

    @property
    def public_ip(self) -> str:
        return self._name("public-ip")

    @property
    def public_ip_overwrite(self) -> str:
        return self._name("public-ip-overwrite")

    @property
    def node_public_ip(self) -> str:
        return self._name("node-public-ip")

    @property
    def subnet_kube_managed(self) -> str:
        return self._name("kube-subnet-manager")

    @property
    def watched(self) -> tuple[str, str, str]:
        """An update is a lease event only when one of these changed (as in flanneld)."""
        return (self.backend_data, self.backend_type, self.public_ip)


def backend_data_json(attrs: LeaseAttrs) -> str:
    """Go's json.Marshal of the backend data: vxlan {"VNI":n,"VtepMAC":"..."}, else null."""
    if attrs.backend_type == "vxlan":
        return json.dumps({"VNI": attrs.vni, "VtepMAC": attrs.vtep_mac}, separators=(",", ":"))
    return "null"


def lease_annotations(
    names: Annotations, attrs: LeaseAttrs, current: dict[str, str]
) -> dict[str, str]:
    """The annotations flanneld sets on its own node (current: the node's annotations now,
    for public-ip-overwrite)."""
    overwrite = current.get(names.public_ip_overwrite, "")
    return {
        names.backend_type: attrs.backend_type,
        names.backend_data: backend_data_json(attrs),
        names.public_ip: overwrite or str(attrs.public_ip),
        names.subnet_kube_managed: "true",
    }


def needs_patch(names: Annotations, wanted: dict[str, str], current: dict[str, str]) -> bool:
    return any(current.get(k) != v for k, v in wanted.items())


def network_unavailable_false(now: datetime | None = None) -> dict[str, Any]:
    """flanneld's status patch: NetworkUnavailable=False, reason FlannelIsUp (the field
    order of Go's v1.NodeCondition)."""
    stamp = (now or datetime.now(UTC)).strftime("%Y-%m-%dT%H:%M:%SZ")
    return {
        "status": {
            "conditions": [
                {
                    "type": "NetworkUnavailable",
                    "status": "False",
                    "lastHeartbeatTime": stamp,
                    "lastTransitionTime": stamp,
                    "reason": "FlannelIsUp",
                    "message": "Flannel is running on this node",
                }
            ]
        }
    }


def pod_cidr(node: dict[str, Any]) -> IPv4Network | None:
    """The node's IPv4 pod CIDR: the IPv4 entry of spec.podCIDRs, else spec.podCIDR.
    None when none is assigned; LeaseError when malformed or when there are more than two."""
    spec = node.get("spec") or {}
    name = (node.get("metadata") or {}).get("name", "?")
    cidrs = spec.get("podCIDRs") or []
    if len(cidrs) > 2:
        raise LeaseError(f'node "{name}" pod cidrs should be IPv4/IPv6 only or dualstack')
    if not cidrs and spec.get("podCIDR"):
        cidrs = [spec["podCIDR"]]
    for text in cidrs:
        try:
            net = ip_network(text, strict=False)
        except (TypeError, ValueError) as exc:
            raise LeaseError(f'node "{name}": pod CIDR {text!r} is malformed') from exc
        if isinstance(net, IPv4Network):
            return net
    return None


def is_managed(names: Annotations, annotations: dict[str, str]) -> bool:
    return annotations.get(names.subnet_kube_managed) == "true"


def node_lease(names: Annotations, node: dict[str, Any]) -> tuple[IPv4Network, LeaseAttrs] | None:
    """(subnet, attrs) of a node flannel manages; None for a node it does not manage (or
    that has no IPv4 pod CIDR yet); LeaseError when its annotations are malformed."""
    meta = node.get("metadata") or {}
    ann = meta.get("annotations") or {}
    if not is_managed(names, ann):
        return None
    subnet = pod_cidr(node)
    if subnet is None:
        return None
    try:
        data = json.loads(ann.get(names.backend_data, ""))
    except ValueError as exc:
        raise LeaseError(f"{names.backend_data}: not JSON: {exc}") from exc
    value = {
        "PublicIP": ann.get(names.public_ip, ""),
        "BackendType": ann.get(names.backend_type, ""),
        "BackendData": data,
    }
    try:
        attrs = LeaseAttrs.from_json(json.dumps(value))
    except LeaseError as exc:
        raise LeaseError(f'node "{meta.get("name", "?")}": {exc}') from exc
    return subnet, attrs


def stored_vtep_mac(names: Annotations, annotations: dict[str, str]) -> str | None:
    """The VtepMAC this node published before (flanneld reuses it on restart)."""
    try:
        data = json.loads(annotations.get(names.backend_data, ""))
    except ValueError:
        return None
    if not isinstance(data, dict):
        return None
    mac = {k.lower(): v for k, v in data.items()}.get("vtepmac")
    if not isinstance(mac, str):
        return None
    try:
        LeaseAttrs.from_json(
            json.dumps(
                {
                    "PublicIP": "0.0.0.0",
                    "BackendType": "vxlan",
                    "BackendData": {"VNI": 1, "VtepMAC": mac},
                }
            )
        )
    except LeaseError:
        return None
    return mac.lower()


def node_public_ip(names: Annotations, annotations: dict[str, str]) -> IPv4Address | None:
    text = annotations.get(names.node_public_ip, "")
    try:
        return IPv4Address(text) if text else None
    except ValueError:
        return None
