"""/run/flannel/subnet.env, which the flannel CNI plugin reads: written atomically."""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from ipaddress import IPv4Interface, IPv4Network

DEFAULT_PATH = "/run/flannel/subnet.env"
FILE_MODE = 0o644


@dataclass(frozen=True)
class SubnetEnv:
    network: IPv4Network
    subnet: IPv4Network
    mtu: int
    ip_masq: bool

    def render(self) -> str:
        # flanneld's order and format; FLANNEL_SUBNET is the subnet's first host address.
        first_host = IPv4Interface((int(self.subnet.network_address) + 1, self.subnet.prefixlen))
        return (
            f"FLANNEL_NETWORK={self.network}\n"
            f"FLANNEL_SUBNET={first_host}\n"
            f"FLANNEL_MTU={self.mtu}\n"
            f"FLANNEL_IPMASQ={'true' if self.ip_masq else 'false'}\n"
        )


def write(path: str, env: SubnetEnv) -> None:
    """Replace path in one rename, so a reader never sees half a file."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".subnet.env.", dir=directory)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(env.render())
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def read_subnet(path: str) -> IPv4Network | None:
    """The FLANNEL_SUBNET of an existing file (as a network), or None."""
    try:
        with open(path) as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    for line in lines:
        key, _, value = line.partition("=")
        if key.strip() == "FLANNEL_SUBNET":
            try:
                return IPv4Interface(value.strip()).network
            except ValueError:
                return None
    return None
