"""The C sources of the data path, and what Python reads from them.

The enums shared with user space are parsed from the types header itself, so that
Python and C cannot disagree on a value.
"""

from __future__ import annotations

import re
from functools import cache
from importlib import resources
from pathlib import Path

# The header holding every enum, struct and constant shared with user space.
TYPES_HEADER = "types.h"

_ENUM = re.compile(r"enum\s+(\w+)\s*\{(.*?)\};", re.S)
_MEMBER = re.compile(r"^\s*(\w+)\s*(?:=\s*(\d+))?\s*,?", re.M)


def source_dir() -> Path:
    """Where the .c and .h files are installed with the package."""
    return Path(str(resources.files(__name__)))


def strip_comments(text: str) -> str:
    text = re.sub(r"/\*.*?\*/", "", text, flags=re.S)
    return re.sub(r"//[^\n]*", "", text)


def header_text(header: str) -> str:
    """bpf/<header> without its comments."""
    return strip_comments((source_dir() / header).read_text())


@cache
def c_enums() -> dict[str, dict[str, int]]:
    """Every enum of the types header as {enum name: {member: value}}."""
    enums: dict[str, dict[str, int]] = {}
    for name, body in _ENUM.findall(header_text(TYPES_HEADER)):
        members: dict[str, int] = {}
        value = -1
        for member, explicit in _MEMBER.findall(body):
            value = int(explicit) if explicit else value + 1
            members[member] = value
        enums[name] = members
    return enums
