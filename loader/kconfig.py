"""The running kernel's build configuration, where it publishes it.

Read as libbpf reads it for `__kconfig` externs: /boot/config-<release>, else
/proc/config.gz (CONFIG_IKCONFIG_PROC). A bcc-compiled program gets such values as
-D flags from its loader.
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path


class KconfigError(LookupError):
    """The kernel's configuration, or the asked-for option, cannot be read."""


def _sources() -> list[Path]:
    return [Path("/boot") / f"config-{os.uname().release}", Path("/proc/config.gz")]


def _read(path: Path) -> str:
    if path.suffix == ".gz":
        return gzip.decompress(path.read_bytes()).decode()
    return path.read_text()


def value(option: str) -> str:
    """option's value (CONFIG_HZ -> "250"); KconfigError when no source has it."""
    tried = []
    for path in _sources():
        try:
            text = _read(path)
        except OSError as exc:
            tried.append(f"{path}: {exc.strerror or exc}")
            continue
        for line in text.splitlines():
            name, sep, val = line.partition("=")
            if sep and name == option:
                return val.strip('"')
        tried.append(f"{path}: no {option}")
    raise KconfigError(f"the kernel's {option} is unknown ({'; '.join(tried)})")


def hz() -> int:
    """CONFIG_HZ: jiffies per second, the unit of conntrack's timeouts in the kernel."""
    raw = value("CONFIG_HZ")
    try:
        return int(raw)
    except ValueError:
        raise KconfigError(f"CONFIG_HZ={raw!r} is not a number") from None
