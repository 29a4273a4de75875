"""Compiling each build once: keeping a pinned program that is already the build asked
for, and loading a build's saved bytecode where it is not pinned.

Compiling a program with bcc costs 0.5-1 s of CPU and ends in the same bytecode every
time. An agent that restarts (after a crash, or when kubelet restarts its container)
finds its programs pinned and running; a new node, or a lab's, starts from nothing on a
host where the same builds were compiled before. So:

- a build is named by a digest of everything the compile reads: the C text with its
  headers inlined, the -D parameters (but the pin directory's path, which only tells bcc
  where the maps are and never reaches the bytecode), the program's name and type, and the
  kernel and bcc it runs on;
- the kernel names every loaded program by its tag, a hash of its instructions with the
  map references blanked out (bpf_prog_calc_tag()); a compile records its build's tag and
  the bytecode it loaded (loader/bytecode.py) under the digest, in a small cache
  (BUILD_CACHE_DIR);
- the pinned program is kept when its tag, name and type are the ones recorded for the
  build asked for, and every shared map it uses (maps/layout.MAP_LAYOUTS) is the one pinned
  under the same directory now (none set aside or made anew; its caches are its own);
- otherwise the saved bytecode is loaded with the maps pinned now (those missing made as
  the compile made them), and kept if the kernel gives it the recorded tag;
- otherwise it is compiled, as it would be without the cache.

An entry is what a compile of its build gave, so it is right for that build wherever the
digest matches; the entries used last are kept (BUILD_CACHE_ENTRIES). The cache lives
in /run, as the pins live in bpffs: both are gone after a reboot. A missing, unreadable
or malformed entry, one that another user could have written, or bytecode the kernel
refuses, costs a compile, nothing else.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import platform
from dataclasses import dataclass
from pathlib import Path

from flannel_xdp import defaults
from flannel_xdp.loader import libbpf
from flannel_xdp.loader.bytecode import Bytecode, BytecodeError
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


DIGEST_LEN = 64  # hex digits of a sha256: an entry's file name


def _bcc_version() -> str:
    try:
        from bcc import __version__
    except ImportError:  # no bcc: nothing will be compiled either
        return "none"
    return str(__version__)


def _entry(build: Build, cache_dir: str) -> Path:
    return Path(cache_dir) / build.digest


TAG_SIZE = 8  # bytes of a program's tag (BPF_TAG_SIZE)


@dataclass(frozen=True)
class Entry:
    """What the cache holds for one build."""

    tag: str  # the kernel's tag of the program, in hex
    code: Bytecode | None  # None: only kept where pinned, never loaded from here

    def to_json(self) -> str:
        return json.dumps({"tag": self.tag, "bytecode": self.code and self.code.to_json()})

    @classmethod
    def from_json(cls, text: str) -> Entry:
        try:
            raw = json.loads(text)
            tag, code = raw["tag"], raw["bytecode"]
        except (ValueError, TypeError, KeyError) as exc:
            raise BytecodeError(f"malformed build cache entry: {exc!r}") from exc
        if not isinstance(tag, str) or len(tag) != 2 * TAG_SIZE:
            raise BytecodeError(f"malformed build cache entry: tag {tag!r}")
        return cls(tag, None if code is None else Bytecode.from_json(code))


def _read(build: Build, cache_dir: str) -> Entry | None:
    """What the cache holds for build; None where nothing usable (logged why)."""
    path = _entry(build, cache_dir)
    try:
        with path.open() as f:
            _check_owner(os.fstat(f.fileno()), path)
            _check_owner(os.stat(path.parent), path.parent)
            return Entry.from_json(f.read())
    except FileNotFoundError:
        return None
    except (OSError, BytecodeError) as exc:
        log.info("ignoring the cache entry of %s (%s): compiling it", build.name, exc)
        return None


def _check_owner(st: os.stat_result, path: Path) -> None:
    """What goes into the kernel from here is written by this user alone."""
    if st.st_uid != os.geteuid() or st.st_mode & 0o022:
        raise BytecodeError(
            f"{path} is owned by uid {st.st_uid} with mode {st.st_mode & 0o777:o}: "
            "only the agent's user may write it"
        )


def _tag(fd: int) -> str:
    return bytes(libbpf.prog_info(fd).tag).hex()


def record(
    build: Build, fd: int, code: Bytecode | None, cache_dir: str = defaults.BUILD_CACHE_DIR
) -> None:
    """Remember the tag of build, just loaded as fd, and the bytecode it was loaded from."""
    path = _entry(build, cache_dir)
    try:
        text = Entry(_tag(fd), code).to_json()
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}")
        tmp.write_text(text)
        os.replace(tmp, path)
    except OSError as exc:
        log.warning(
            "cannot cache %s in %s (%s): the next start compiles it",
            build.name,
            cache_dir,
            exc,
        )
        return
    prune(cache_dir)


def prune(cache_dir: str, entries: int = defaults.BUILD_CACHE_ENTRIES) -> None:
    """Keep the entries used last (an entry's mtime is its last use), at most entries, and
    drop what a writer that is gone (killed while it wrote) left."""
    try:
        paths = list(Path(cache_dir).iterdir())
        saved = [p for p in paths if len(p.name) == DIGEST_LEN]
        by_use = sorted(saved, key=lambda p: p.stat().st_mtime_ns, reverse=True)
    except OSError:  # another agent pruned meanwhile: its prune did the work
        return
    partial = [p for p in paths if _writer_gone(p.name)]
    for path in [*by_use[entries:], *partial]:
        path.unlink(missing_ok=True)


def _writer_gone(name: str) -> bool:
    """name is an entry being written (<digest>.<pid>) by a process that is gone."""
    digest, _, pid = name.partition(".")
    if len(digest) != DIGEST_LEN or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except OSError:
        return False
    return False


def _used(build: Build, cache_dir: str) -> None:
    """Mark build's entry used now (what prune() keeps by)."""
    with contextlib.suppress(OSError):
        os.utime(_entry(build, cache_dir))


def _load(build: Build, entry: Entry, maps_dir: str) -> int | None:
    """An fd of build loaded from the bytecode its entry saved, with the maps of maps_dir
    (the caller owns it); None where it must be compiled: nothing saved, or not loadable
    here."""
    if entry.code is None:
        return None
    try:
        fd = entry.code.load(maps_dir, build.prog_type, build.name)
    except (OSError, BytecodeError) as exc:
        log.info("cannot load %s from the build cache (%s): compiling it", build.name, exc)
        return None
    if _tag(fd) != entry.tag:  # the saved bytecode is not what was loaded after the compile
        log.info("the cached bytecode of %s has another tag: compiling it", build.name)
        os.close(fd)
        return None
    return fd


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


def _keep(build: Build, entry: Entry, pin: str, pinned: dict[str, int]) -> int | None:
    """An fd of the program pinned at pin (the caller owns it) if it is build (entry: what
    the cache holds for it) and uses the maps pinned now (pinned: pinned_map_ids()); None
    where it must be loaded or compiled."""
    try:
        fd = libbpf.obj_get(pin)
    except OSError:
        return None
    try:
        info = libbpf.prog_info(fd)
        same = (
            bytes(info.tag).hex() == entry.tag
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


def without_compile(
    build: Build,
    pin: str,
    maps_dir: str,
    pinned: dict[str, int],
    cache_dir: str = defaults.BUILD_CACHE_DIR,
) -> tuple[int, bool] | None:
    """build kept where it is pinned (at pin), or else loaded from its saved bytecode: its
    fd (the caller owns it) and whether it was kept; None where it must be compiled."""
    entry = _read(build, cache_dir)
    if entry is None:
        return None
    fd, kept = _keep(build, entry, pin, pinned), True
    if fd is None:
        fd, kept = _load(build, entry, maps_dir), False
    if fd is None:
        return None
    _used(build, cache_dir)
    return fd, kept
