"""Running commands inside the lab's network namespaces.

Two ways in, for two needs:

* ``ip netns exec`` is what a person types, and what workloads in pods run
  under. It also gives the command a private mount namespace with a fresh
  /sys, which hides /sys/fs/bpf and every pin on it.
* ``nsenter --net`` switches only the network namespace, so tools that open
  pinned objects (``bpftool map dump pinned ...``) still find them.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Sequence

NETNS_RUN_DIR = "/var/run/netns"


class CommandError(RuntimeError):
    """A command in a namespace failed; the message carries its output."""

    def __init__(self, netns: str, argv: Sequence[str], result: subprocess.CompletedProcess[str]):
        self.result = result
        super().__init__(
            f"[{netns}] {' '.join(argv)} exited {result.returncode}\n"
            f"stdout: {result.stdout.strip()}\nstderr: {result.stderr.strip()}"
        )


def netns_path(netns: str) -> str:
    return os.path.join(NETNS_RUN_DIR, netns)


def netns_exists(netns: str) -> bool:
    return os.path.exists(netns_path(netns))


def in_netns(netns: str, argv: Sequence[str], *, keep_mounts: bool = False) -> list[str]:
    """The command line that runs argv inside netns (see the module doc for keep_mounts)."""
    if keep_mounts:
        return ["nsenter", f"--net={netns_path(netns)}", "--", *argv]
    return ["ip", "netns", "exec", netns, *argv]


def run(
    netns: str,
    argv: Sequence[str],
    *,
    check: bool = True,
    timeout: float = 60.0,
    keep_mounts: bool = False,
    input: str | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run argv in netns and wait; raises CommandError (with the output) when check fails."""
    result = subprocess.run(
        in_netns(netns, argv, keep_mounts=keep_mounts),
        capture_output=True,
        text=True,
        timeout=timeout,
        input=input,
    )
    if check and result.returncode != 0:
        raise CommandError(netns, argv, result)
    return result


def spawn(netns: str, argv: Sequence[str], *, keep_mounts: bool = False) -> subprocess.Popen[str]:
    """Start argv in netns in the background, stdout and stderr piped (text).

    The caller owns the process; Cluster.down() also kills whatever is still
    running in a lab namespace, so a failed test cannot leave servers behind.
    """
    return subprocess.Popen(
        in_netns(netns, argv, keep_mounts=keep_mounts),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def netns_pids(netns: str) -> list[int]:
    """Processes whose network namespace is netns (``ip netns pids``)."""
    result = subprocess.run(
        ["ip", "netns", "pids", netns], capture_output=True, text=True, check=False
    )
    return [int(p) for p in result.stdout.split() if p.isdigit()]
