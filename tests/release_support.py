"""The previous release of flannel-xdp, installed from its wheel beside this tree.

The wheel is kept in tests/releases/, built from the release's git tag with
scripts/release-wheel.sh (reproducible: the same tag gives the same bytes), because a
clone need not carry tags. install_release() checks its sha256 and installs it into a venv
of its own, made from the interpreter of this venv with the system's site-packages (bcc is
Debian's python3-bpfcc, never pip's). Its dependencies are this venv's (a .pth names our
site-packages after its own): pip runs with --no-deps and --no-index, so nothing is fetched
and it takes seconds. Nothing is written inside the clone.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import sysconfig
from dataclasses import dataclass, replace
from pathlib import Path

import pytest

from flannel_xdp.lab.agents import AgentRelease

RELEASES = Path(__file__).resolve().parent / "releases"


@dataclass(frozen=True)
class Release:
    """A release as shipped: its version and the sha256 of its wheel in RELEASES."""

    version: str
    sha256: str

    @property
    def wheel(self) -> Path:
        return RELEASES / f"flannel_xdp-{self.version}-py3-none-any.whl"

    def __str__(self) -> str:
        return self.version


# The release before this tree (its tag is v0.1.0).
PREVIOUS_RELEASE = Release(
    "0.1.0", "6bd93fdee5adc8361e86d8f4600ecf1287fa0d4e270cb17346afb31c5b87338c"
)


@dataclass(frozen=True)
class InstalledRelease:
    release: Release
    version: str  # as the package reports it (importlib.metadata), in build_info too
    node_config_size: int  # the value size of its pinned node_config map
    reasons: tuple[str, ...]  # its reason enum's names by value: its reasons map's labels
    agent_flags: frozenset[str]  # what `flannel-xdp agent --help` lists
    agent: AgentRelease

    def with_fast_path_args(self, *args: str) -> AgentRelease:
        """Its agent, given these fast-path flags whatever the lab's are (after checking
        that it knows them)."""
        unknown = set(args) - self.agent_flags
        assert not unknown, f"{self.release}'s agent has no {sorted(unknown)}"
        return replace(self.agent, fast_path_args=args)


def _run(argv: list[str], **kwargs) -> str:
    res = subprocess.run(argv, capture_output=True, text=True, **kwargs)
    if res.returncode != 0:
        pytest.fail(f"{' '.join(argv)} failed ({res.returncode}):\n{res.stdout}{res.stderr}")
    return res.stdout


def require_wheel(release: Release) -> Path:
    """The release's wheel, after checking that it is there and is the one released."""
    wheel = release.wheel
    if not wheel.is_file():
        pytest.fail(
            f"{release}'s wheel {wheel} is missing: scripts/release-wheel.sh "
            f"v{release} {RELEASES} builds it from the tag"
        )
    digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
    if digest != release.sha256:
        pytest.fail(f"{wheel} has sha256 {digest}, not the released {release.sha256}")
    return wheel


# Asked of the installed release itself, with its own python: what it is.
_DESCRIBE = """
import ctypes, json, re, subprocess, sys
from importlib import metadata
from flannel_xdp.maps.layout import NodeConfig, Reason
help = subprocess.run([sys.executable, "-m", "flannel_xdp.cli", "agent", "--help"],
                      capture_output=True, text=True, check=True).stdout
print(json.dumps({"version": metadata.version("flannel-xdp"),
                  "node_config_size": ctypes.sizeof(NodeConfig),
                  "reasons": [r.name for r in sorted(Reason)],
                  "agent_flags": sorted(set(re.findall(r"--[a-z][a-z-]*", help)))}))
"""


def install_release(release: Release, dest: Path) -> InstalledRelease:
    """The release installed under dest (a temporary directory)."""
    wheel = require_wheel(release)
    venv = dest / "venv"
    # The interpreter this venv was made from (its python is a link to it).
    _run([os.path.realpath(sys.executable), "-m", "venv", "--system-site-packages", str(venv)])
    python = venv / "bin" / "python"
    site = _run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"])
    (Path(site.strip()) / "this-trees-dependencies.pth").write_text(
        sysconfig.get_paths()["purelib"] + "\n"
    )
    pip = [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    _run([*pip, "--no-deps", "--no-index", str(wheel)])
    facts = json.loads(_run([str(python), "-c", _DESCRIBE], cwd=dest))
    return InstalledRelease(
        release=release,
        version=facts["version"],
        node_config_size=facts["node_config_size"],
        reasons=tuple(facts["reasons"]),
        agent_flags=frozenset(facts["agent_flags"]),
        agent=AgentRelease(python=str(python)),
    )
