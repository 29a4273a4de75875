"""The Go-built peers (flanneld, CNI plugins, cnitool, Kubernetes, etcd) that scripts/peers.sh
builds into its cache: each binary is where `scripts/peers.sh --print-env` says and reports
the version pinned in scripts/peers.versions. A missing binary fails (never skips) and names
the command that builds it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "peers.sh"
VERSIONS_FILE = ROOT / "scripts" / "peers.versions"
pytestmark = pytest.mark.peers

BUILD_HINT = "build it with `make peers` (or `bash scripts/peers.sh`)"


def read_versions() -> dict[str, str]:
    versions = {}
    for line in VERSIONS_FILE.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            versions[key.strip()] = value.strip()
    return versions


VERSIONS = read_versions()


@pytest.fixture(scope="module")
def peers_env() -> dict[str, str]:
    out = subprocess.run(
        ["bash", str(SCRIPT), "--print-env"], capture_output=True, text=True, check=True
    ).stdout
    env = dict(line.split("=", 1) for line in out.splitlines() if "=" in line)
    assert env, f"{SCRIPT} --print-env printed nothing"
    return env


def binary(env: dict[str, str], key: str, name: str | None = None) -> Path:
    assert key in env, f"{SCRIPT} --print-env has no {key}"
    path = Path(env[key]) / name if name else Path(env[key])
    if not (path.is_file() and os.access(path, os.X_OK)):
        pytest.fail(f"{key}: peer binary {path} is missing; {BUILD_HINT}", pytrace=False)
    return path


def run(*argv: str | Path, env: dict[str, str] | None = None) -> str:
    """stdout and stderr of a command, which must exit 0."""
    proc = subprocess.run(
        [str(a) for a in argv],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        check=False,
    )
    both = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{argv} exited {proc.returncode}: {both}"
    return both


def test_versions_file_pins_every_tool() -> None:
    for key in (
        "FLANNEL_VERSION",
        "CNI_PLUGINS_VERSION",
        "FLANNEL_CNI_VERSION",
        "CNITOOL_VERSION",
        "KUBERNETES_VERSION",
        "ETCD_VERSION",
    ):
        assert VERSIONS.get(key, "").startswith("v"), f"{VERSIONS_FILE}: no {key}"


def test_flanneld(peers_env: dict[str, str]) -> None:
    out = run(binary(peers_env, "FXDP_FLANNELD"), "--version")
    assert out.strip() == VERSIONS["FLANNEL_VERSION"], out


@pytest.mark.parametrize("cmd", ["kube-apiserver", "kube-proxy"])
def test_kube_server_binaries(peers_env: dict[str, str], cmd: str) -> None:
    key = "FXDP_" + cmd.upper().replace("-", "_")
    out = run(binary(peers_env, key), "--version")
    assert out.strip() == f"Kubernetes {VERSIONS['KUBERNETES_VERSION']}", out


def test_kubectl(peers_env: dict[str, str]) -> None:
    out = run(binary(peers_env, "FXDP_KUBECTL"), "version", "--client")
    assert f"Client Version: {VERSIONS['KUBERNETES_VERSION']}" in out, out


def test_etcd(peers_env: dict[str, str]) -> None:
    out = run(binary(peers_env, "FXDP_ETCD"), "--version")
    assert f"etcd Version: {VERSIONS['ETCD_VERSION'].removeprefix('v')}" in out, out


def cni_version(plugin: Path) -> dict:
    """The plugin's answer to CNI_COMMAND=VERSION (the CNI spec's version query)."""
    env = {"PATH": os.environ.get("PATH", ""), "CNI_COMMAND": "VERSION"}
    proc = subprocess.run(
        [str(plugin)], input="{}", capture_output=True, text=True, timeout=30, env=env, check=False
    )
    assert proc.returncode == 0, f"{plugin} VERSION exited {proc.returncode}: {proc.stderr}"
    answer = json.loads(proc.stdout)
    assert answer.get("supportedVersions"), f"{plugin}: no supportedVersions in {answer}"
    return answer


def cni_about(plugin: Path) -> str:
    """Without CNI_COMMAND a plugin prints its 'about' line, which names its version."""
    env = {"PATH": os.environ.get("PATH", "")}
    return run(plugin, env=env)


@pytest.mark.parametrize("plugin", ["bridge", "host-local", "portmap", "loopback"])
def test_cni_plugins(peers_env: dict[str, str], plugin: str) -> None:
    path = binary(peers_env, "FXDP_CNI_BIN", plugin)
    answer = cni_version(path)
    assert "1.0.0" in answer["supportedVersions"], answer
    about = cni_about(path)
    assert VERSIONS["CNI_PLUGINS_VERSION"] in about, about


def test_flannel_cni_plugin(peers_env: dict[str, str]) -> None:
    path = binary(peers_env, "FXDP_FLANNEL_CNI")
    assert path.name == "flannel"
    answer = cni_version(path)
    assert "0.3.1" in answer["supportedVersions"], answer
    about = cni_about(path)
    assert VERSIONS["FLANNEL_CNI_VERSION"] in about, about
    cni_path = peers_env["FXDP_CNI_PATH"].split(":")
    assert peers_env["FXDP_CNI_BIN"] in cni_path and str(path.parent) in cni_path


def test_cnitool(peers_env: dict[str, str]) -> None:
    path = binary(peers_env, "FXDP_CNITOOL")
    # cnitool has no version flag; its Go build info names the module version it came from.
    go = shutil.which("go")
    assert go, "`go` is not on PATH: it is needed to read cnitool's build info"
    out = run(go, "version", "-m", path)
    want = f"mod\tgithub.com/containernetworking/cni\t{VERSIONS['CNITOOL_VERSION']}"
    assert want in out, out
