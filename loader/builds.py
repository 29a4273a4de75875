"""Keeping a pinned program that is already what a compile would make.

An agent that restarts (after a crash, or when kubelet restarts its container) finds its
programs pinned and running. Compiling them again with bcc costs seconds of CPU and ends
in the same bytecode, so the install keeps a pinned program when it is provably that
build:

- a build is named by a digest of everything the compile reads: the C text with its
  headers inlined, the -D parameters (but the pin directory's path, which only tells bcc
  where the maps are and never reaches the bytecode), the program's name and type, and the
  kernel and bcc it runs on;
- the kernel names every loaded program by its tag, a hash of its instructions with the
  map references blanked out (bpf_prog_calc_tag()); a compile records its build's tag
  under the digest, in a small cache (BUILD_CACHE_DIR);
- the pinned program is kept when its tag, name and type are the ones recorded for the
  build asked for, and every shared map it uses (maps/layout.MAP_LAYOUTS) is the one pinned
  under the same directory now (none set aside or made anew; its caches are its own).
  Otherwise it is compiled as before.

The cache maps a build to its tag, a function of the build, so an entry is never wrong
for its build; entries of builds no longer asked for are merely unused. It lives in /run,
as the pins live in bpffs: both are gone after a reboot. Failing to read or write it costs
a compile, nothing else.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
from dataclasses import dataclass
from pathlib import Path

from flannel_xdp import defaults
from flannel_xdp.loader import libbpf
from flannel_xdp.loader.compile import BuildParams, expand_includes, program_source
from flannel_xdp.maps import libbpf as maps_libbpf
from flannel_xdp.maps.layout import MAP_LAYOUTS

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Build:
    """One build of a program: what the cache and the pinned program are compared by."""

    name: str  # the kernel's name of it (BuildParams.program_name)
    prog_type: int  # BPF_PROG_TYPE_*
    digest: str

    @classmethod
    def of(cls, source: str, params: BuildParams, prog_type: int) -> Build:
        name = params.program_name(source)
        h = hashlib.sha256()
        for part in (
            expand_includes(program_source(source)),
            *params.cflags(with_maps_dir=False),
            name,
            str(prog_type),
            platform.release(),
            platform.version(),
            _bcc_version(),
        ):
            h.update(part.encode())
            h.update(b"\0")
        return cls(name, prog_type, h.hexdigest())


def _bcc_version() -> str:
    try:
        from bcc import __version__
    except ImportError:  # no bcc: nothing will be compiled either
        return "none"
    return str(__version__)


def _entry(build: Build, cache_dir: str) -> Path:
    return Path(cache_dir) / build.digest


def record(build: Build, fd: int, cache_dir: str = defaults.BUILD_CACHE_DIR) -> None:
    """Remember the tag of build, just loaded as fd."""
    path = _entry(build, cache_dir)
    try:
        tag = bytes(libbpf.prog_info(fd).tag).hex()
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}")
        tmp.write_text(tag + "\n")
        os.replace(tmp, path)
    except OSError as exc:
        log.warning(
            "cannot cache the tag of %s in %s (%s): the next start compiles it",
            build.name,
            cache_dir,
            exc,
        )


def pinned_map_ids(maps_dir: str) -> dict[str, int]:
    """{name: id} of the maps pinned in maps_dir; {} where they cannot be read, which
    keeps no program that uses a shared map."""
    pinned = {}
    try:
        for name in os.listdir(maps_dir):
            fd = maps_libbpf.obj_get(os.path.join(maps_dir, name))
            try:
                pinned[name] = maps_libbpf.map_info(fd).id
            finally:
                os.close(fd)
    except OSError as exc:
        log.info("cannot read the maps pinned in %s (%s): compiling every program", maps_dir, exc)
        return {}
    return pinned


def _uses_the_pinned_maps(fd: int, pinned: dict[str, int]) -> bool:
    """Every map of MAP_LAYOUTS that the program uses is the one pinned now (its others
    are its own caches, made with it and never pinned)."""
    for map_id in libbpf.prog_map_ids(fd):
        name = libbpf.map_name_by_id(map_id)
        if name in MAP_LAYOUTS and pinned.get(name) != map_id:
            return False
    return True


def keep(
    build: Build, pin: str, pinned: dict[str, int], cache_dir: str = defaults.BUILD_CACHE_DIR
) -> int | None:
    """An fd of the program pinned at pin (the caller owns it) if it is build and uses the
    maps pinned now (pinned: pinned_map_ids()); None where it must be compiled."""
    try:
        tag = _entry(build, cache_dir).read_text().strip()
        fd = libbpf.obj_get(pin)
    except OSError:
        return None
    try:
        info = libbpf.prog_info(fd)
        same = (
            bytes(info.tag).hex() == tag
            and info.name.decode() == build.name
            and info.type == build.prog_type
            and _uses_the_pinned_maps(fd, pinned)
        )
    except OSError as exc:
        log.info("cannot compare the pinned %s with its build (%s): compiling it", build.name, exc)
        same = False
    if not same:
        os.close(fd)
        return None
    return fd
