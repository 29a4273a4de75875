"""The previous release of flannel-xdp, installed from its git tag beside this tree.

install_release() unpacks the tag's tree (git archive) into a temporary directory and
installs it into a venv of its own, made from the interpreter of this venv with the
system's site-packages (bcc is Debian's python3-bpfcc, never pip's). Its dependencies are
this venv's (a .pth names our site-packages after its own): pip runs with --no-deps,
--no-index and --no-build-isolation (building with the venv's setuptools and Debian's
python3-wheel, which make setup installs), so nothing is fetched and it takes seconds.
Nothing is written inside the clone.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
from dataclasses import dataclass, replace
from pathlib import Path

import pytest

from flannel_xdp.lab.agents import AgentRelease

REPO_ROOT = Path(__file__).resolve().parents[1]
PREVIOUS_RELEASE = "v0.1.0"  # the git tag of the release before this tree


@dataclass(frozen=True)
class InstalledRelease:
    tag: str
    version: str  # as the package reports it (importlib.metadata), in build_info too
    node_config_size: int  # the value size of its pinned node_config map
    reasons: tuple[str, ...]  # its reason enum's names by value: its reasons map's labels
    agent_flags: frozenset[str]  # what `flannel-xdp agent --help` lists
    agent: AgentRelease

    def with_fast_path_args(self, *args: str) -> AgentRelease:
        """Its agent, given these fast-path flags whatever the lab's are (after checking
        that it knows them)."""
        unknown = set(args) - self.agent_flags
        assert not unknown, f"{self.tag}'s agent has no {sorted(unknown)}"
        return replace(self.agent, fast_path_args=args)


def _run(argv: list[str], **kwargs) -> str:
    res = subprocess.run(argv, capture_output=True, text=True, **kwargs)
    if res.returncode != 0:
        pytest.fail(f"{' '.join(argv)} failed ({res.returncode}):\n{res.stdout}{res.stderr}")
    return res.stdout


def require_tag(tag: str) -> None:
    res = subprocess.run(
        ["git", "-C", str(REPO_ROOT), "rev-parse", "--verify", "--quiet", f"{tag}^{{commit}}"],
        capture_output=True,
        text=True,
    )
    if res.returncode != 0:
        pytest.fail(
            f"the previous release's tag {tag} is not in this clone ({REPO_ROOT}): "
            f"`git fetch --tags` gets it (a clone made with --no-tags or --depth lacks it)"
        )


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


def install_release(tag: str, dest: Path) -> InstalledRelease:
    """The release tagged tag, installed under dest (a temporary directory)."""
    require_tag(tag)
    src, venv = dest / "src", dest / "venv"
    src.mkdir(parents=True)
    archive = subprocess.Popen(
        ["git", "-C", str(REPO_ROOT), "archive", "--format=tar", tag], stdout=subprocess.PIPE
    )
    _run(["tar", "-x", "-C", str(src)], stdin=archive.stdout)
    if archive.wait() != 0:
        pytest.fail(f"git archive {tag} failed")
    # The interpreter this venv was made from (its python is a link to it).
    _run([os.path.realpath(sys.executable), "-m", "venv", "--system-site-packages", str(venv)])
    python = venv / "bin" / "python"
    site = _run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"])
    (Path(site.strip()) / "this-trees-dependencies.pth").write_text(
        sysconfig.get_paths()["purelib"] + "\n"
    )
    pip = [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    _run([*pip, "--no-deps", "--no-index", "--no-build-isolation", str(src)])
    facts = json.loads(_run([str(python), "-c", _DESCRIBE], cwd=dest))
    return InstalledRelease(
        tag=tag,
        version=facts["version"],
        node_config_size=facts["node_config_size"],
        reasons=tuple(facts["reasons"]),
        agent_flags=frozenset(facts["agent_flags"]),
        agent=AgentRelease(python=str(python)),
    )
