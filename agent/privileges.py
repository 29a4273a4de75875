"""The capabilities the agent needs, checked before it touches anything.

Without them the agent would get as far as taking a lease and then fail half-way
through installing the data path (found by running it under setpriv with capabilities
dropped): without CAP_NET_ADMIN it cannot make the tunnel device, without CAP_SYS_ADMIN
bcc cannot reopen the pinned maps (it looks maps up by id, BPF_MAP_GET_FD_BY_ID, which
needs CAP_SYS_ADMIN even where CAP_BPF and CAP_PERFMON are granted) nor mount bpffs.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Capability:
    name: str
    bit: int  # linux/capability.h
    needed_for: str


REQUIRED = (
    Capability(
        "CAP_NET_ADMIN",
        12,
        "to create the tunnel device, attach the tc and XDP programs, set routes and "
        "iptables rules",
    ),
    Capability(
        "CAP_SYS_ADMIN",
        21,
        "for bcc to load the programs and reopen the pinned maps, and to mount bpffs",
    ),
)


def effective_capabilities(status_path: str = "/proc/self/status") -> int:
    """The effective capability set of this process, as a bit mask."""
    with open(status_path) as f:
        for line in f:
            if line.startswith("CapEff:"):
                return int(line.split()[1], 16)
    raise RuntimeError(f"{status_path} has no CapEff line")


def missing(effective: int | None = None) -> list[Capability]:
    caps = effective_capabilities() if effective is None else effective
    return [c for c in REQUIRED if not caps >> c.bit & 1]


def problem(effective: int | None = None) -> str | None:
    """A message naming every missing capability and why it is needed, or None."""
    lacking = missing(effective)
    if not lacking:
        return None
    what = "; ".join(f"{c.name} ({c.needed_for})" for c in lacking)
    names = ", ".join(c.name.removeprefix("CAP_") for c in lacking)
    return (
        f"missing capabilit{'y' if len(lacking) == 1 else 'ies'}: {what}. Run the agent as "
        f"root with them (Kubernetes: securityContext.capabilities.add: [{names}])"
    )
