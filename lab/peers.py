"""Where the Go-built peers are: flanneld, the CNI plugins and cnitool.

scripts/peers.sh builds them into a cache keyed by version (``make peers``) and
``scripts/peers.sh --print-env`` says where this clone's versions live. An
``FXDP_<NAME>`` variable in the environment wins (a CI job may point elsewhere);
without the script (an installed package, no source tree) the cache's
``peers.env`` answers. A binary that is missing is a LabError naming ``make peers``:
the lab never falls back to an imitation silently.
"""

from __future__ import annotations

import functools
import os
import subprocess
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "peers.sh"
DEFAULT_CACHE = "/var/cache/flannel-xdp"
BUILD_HINT = "build it with `make peers` (or `bash scripts/peers.sh`)"


class PeersMissing(RuntimeError):
    pass


@functools.cache
def _printed() -> dict[str, str]:
    if SCRIPT.is_file():
        out = subprocess.run(
            ["bash", str(SCRIPT), "--print-env"], capture_output=True, text=True, check=True
        ).stdout
    else:
        cache = os.environ.get("FXDP_CACHE", DEFAULT_CACHE)
        try:
            out = Path(cache, "peers.env").read_text()
        except OSError:
            out = ""
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def env(key: str) -> str:
    """The value of one FXDP_* key (FXDP_FLANNELD, FXDP_CNI_PATH, ...)."""
    value = os.environ.get(key) or _printed().get(key)
    if not value:
        raise PeersMissing(f"{key}: no path known for this peer; {BUILD_HINT}")
    return value


def binary(key: str) -> str:
    """The path of an executable peer, checked."""
    path = env(key)
    if not (os.path.isfile(path) and os.access(path, os.X_OK)):
        raise PeersMissing(f"{key}: peer binary {path} is missing; {BUILD_HINT}")
    return path


def flanneld() -> str:
    return binary("FXDP_FLANNELD")


def cnitool() -> str:
    return binary("FXDP_CNITOOL")


def cni_path() -> str:
    """CNI_PATH: the plugins' directories, each checked for the plugins the lab's chain runs."""
    dirs = env("FXDP_CNI_PATH").split(":")
    for plugin in ("flannel", "bridge", "host-local", "portmap"):
        if not any(os.access(os.path.join(d, plugin), os.X_OK) for d in dirs):
            raise PeersMissing(f"CNI plugin {plugin} is in none of {dirs}; {BUILD_HINT}")
    return ":".join(dirs)


def flanneld_version() -> str:
    """What `flanneld --version` prints, e.g. v0.28.9."""
    res = subprocess.run([flanneld(), "--version"], capture_output=True, text=True, check=False)
    return (res.stdout + res.stderr).strip()


__all__ = ["PeersMissing", "binary", "cni_path", "cnitool", "env", "flanneld", "flanneld_version"]
