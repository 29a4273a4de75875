"""Values that tests read from the C sources in bpf/, so that each is written once, in C."""

from __future__ import annotations

import re
from functools import cache

from flannel_xdp.bpf import header_text


@cache
def c_define(header: str, name: str) -> int:
    """The integer value of `#define name` in bpf/<header> (e.g. a time window that a
    test must wait out)."""
    found = re.search(
        rf"^#define\s+{re.escape(name)}\s+\(?(0x[0-9a-fA-F]+|\d+)[uUlL]*\)?\s*$",
        header_text(header),
        re.M,
    )
    if not found:
        raise LookupError(f"no integer #define {name} in bpf/{header}")
    return int(found.group(1), 0)
