"""MAC addresses as flannel writes them: six lowercase hex pairs, colon separated."""

from __future__ import annotations

import random
from collections.abc import Iterable


def parse_mac(mac: str) -> bytes:
    parts = mac.split(":")
    if len(parts) != 6 or not all(len(p) == 2 for p in parts):
        raise ValueError(f"not a MAC address: {mac!r}")
    return bytes(int(p, 16) for p in parts)


def format_mac(raw: Iterable[int]) -> str:
    return ":".join(f"{b:02x}" for b in raw)


def random_vtep_mac(rng: random.Random | None = None) -> str:
    """Locally administered, unicast, as flanneld's VtepMAC."""
    rng = rng or random.SystemRandom()
    raw = bytearray(rng.getrandbits(8) for _ in range(6))
    raw[0] = (raw[0] & 0xFE) | 0x02
    return format_mac(raw)
