"""Pinned maps that a new build cannot reuse as they are: set aside before the new
programs load, copied or started anew, and dropped once the old programs are gone
(or put back when the install fails).
"""

from __future__ import annotations

import logging
import os

from flannel_xdp.loader.bpffs import PinDir
from flannel_xdp.maps import libbpf
from flannel_xdp.maps.views import (
    LocalPodsMap,
    NodeConfigMap,
    PinnedMap,
    ReasonsMap,
    SubnetsMap,
    TrafficMap,
)

log = logging.getLogger(__name__)

# Where a subnets map of another size waits while its replacement is filled, and maps of
# another layout while the new programs are loaded (in the pin root).
RESIZE_DIR = "resizing"
STALE_MAPS_DIR = "stale-maps"


def recover_interrupted(pins: PinDir) -> None:
    """Put back maps that an install killed part-way (with its agent) left set aside.

    Until that install attached its programs, the set-aside map was the one in use and
    the one in its place a replacement that may not be filled yet: adopting that would
    attach programs to an empty map. Put back, the map in use is where bcc finds it, and
    this install sets it aside again if it still has to."""
    aside = os.path.join(pins.root, RESIZE_DIR)
    if os.path.exists(os.path.join(aside, SubnetsMap.name)):
        log.warning("subnets map set aside by an interrupted install: putting it back")
        put_back_subnets(aside, pins.maps)
    elif os.path.isdir(aside):
        os.rmdir(aside)
    aside = os.path.join(pins.root, STALE_MAPS_DIR)
    if os.path.isdir(aside):
        names = sorted(os.listdir(aside))
        if names:
            log.warning("maps set aside by an interrupted install: putting back %s", names)
        put_back_stale_maps(names, pins)


def set_aside_resized_subnets(pins: PinDir, max_subnets: int) -> str | None:
    """Move a pinned subnets map of another size than max_subnets out of bcc's way.

    bcc reuses a pinned map whatever its max_entries, so a restart with another
    --max-subnets would silently keep the old capacity. Set aside (renamed, still pinned,
    still used by the attached programs), it is replaced by a map of the asked size;
    its entries are copied over before the new programs are attached."""
    if not os.path.exists(os.path.join(pins.maps, SubnetsMap.name)):
        return None
    with SubnetsMap(pins.maps) as old:
        if old.max_entries == max_subnets:
            return None
        held = sum(1 for _ in old.iter_keys())
        if held > max_subnets:
            raise RuntimeError(
                f"--max-subnets {max_subnets} is below the {held} remote subnets the "
                f"pinned map {old.path} holds; raise it (or `flannel-xdp teardown` first)"
            )
        log.info(
            "subnets map: max_entries %d -> %d (--max-subnets); copying its %d entries",
            old.max_entries,
            max_subnets,
            held,
        )
    aside = os.path.join(pins.root, RESIZE_DIR)
    os.makedirs(aside, mode=0o700, exist_ok=True)
    os.rename(os.path.join(pins.maps, SubnetsMap.name), os.path.join(aside, SubnetsMap.name))
    return aside


def copy_subnets(aside: str, maps_dir: str) -> None:
    with SubnetsMap(aside) as old, SubnetsMap(maps_dir) as new:
        new.apply(old.peers().values())


def put_back_subnets(aside: str, maps_dir: str) -> None:
    os.replace(os.path.join(aside, SubnetsMap.name), os.path.join(maps_dir, SubnetsMap.name))
    os.rmdir(aside)


def drop_set_aside(aside: str) -> None:
    os.unlink(os.path.join(aside, SubnetsMap.name))
    os.rmdir(aside)


# Maps whose contents the agent makes anew (the node's config at install, the pods every
# scan, the counters from zero), so that a map of another layout can simply be replaced.
REBUILT_MAPS: tuple[type[PinnedMap], ...] = (NodeConfigMap, LocalPodsMap, TrafficMap, ReasonsMap)


def set_aside_stale_maps(pins: PinDir) -> list[str]:
    """Move pinned maps that another version made with another layout (see REBUILT_MAPS)
    out of bcc's way: it would reuse them, and the programs would not load, or their
    counts be read under other labels. The new programs get new, empty maps; the agent
    fills them. Returns the names moved."""
    stale = []
    for view in REBUILT_MAPS:
        path = os.path.join(pins.maps, view.name)
        if not os.path.exists(path):
            continue
        fd = libbpf.obj_get(path)
        try:
            why = view.mismatch(libbpf.map_info(fd))
        finally:
            os.close(fd)
        if why:
            log.info("%s map pinned by another version (%s): starting it anew", view.name, why)
            stale.append(view.name)
    if stale:
        aside = os.path.join(pins.root, STALE_MAPS_DIR)
        os.makedirs(aside, mode=0o700, exist_ok=True)
        for name in stale:
            os.rename(os.path.join(pins.maps, name), os.path.join(aside, name))
    return stale


def put_back_stale_maps(stale: list[str], pins: PinDir) -> None:
    aside = os.path.join(pins.root, STALE_MAPS_DIR)
    for name in stale:
        os.replace(os.path.join(aside, name), os.path.join(pins.maps, name))
    os.rmdir(aside)


def drop_stale_maps(stale: list[str], pins: PinDir) -> None:
    aside = os.path.join(pins.root, STALE_MAPS_DIR)
    for name in stale:
        os.unlink(os.path.join(aside, name))
    os.rmdir(aside)


def drop_leftovers(pins: PinDir) -> None:
    """Unpin what an interrupted install left set aside (teardown removes everything)."""
    for sub in (RESIZE_DIR, STALE_MAPS_DIR):
        aside = os.path.join(pins.root, sub)
        if os.path.isdir(aside):
            for name in os.listdir(aside):
                os.unlink(os.path.join(aside, name))
            os.rmdir(aside)
