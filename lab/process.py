"""Running commands inside the lab's network namespaces.

Two ways in, for two needs:

* ``ip netns exec`` is what a person types, and what workloads in pods run
  under. It also gives the command a private mount namespace with a fresh
  /sys, which hides /sys/fs/bpf and every pin on it.
* ``nsenter --net`` switches only the network namespace, so tools that open
  pinned objects (``bpftool map dump pinned ...``) still find them.
"""

from __future__ import annotations

import contextlib
import glob
import os
import signal
import subprocess
import time
from collections.abc import Sequence
from typing import IO

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


def die_with_parent(argv: Sequence[str], sig: str = "KILL") -> list[str]:
    """argv, signalled when the thread that starts it dies (``setpriv --pdeathsig``).
    Not a preexec_fn: that makes subprocess fork() a process in which gRPC runs, and
    gRPC's fork handlers can abort the child before it execs."""
    return ["setpriv", "--pdeathsig", sig, "--", *argv]


def start_daemon(
    argv: Sequence[str],
    out: IO[bytes] | int,
    *,
    detach: bool,
    netns: str | None = None,
    cwd: str | None = None,
    env: dict[str, str] | None = None,
) -> subprocess.Popen[bytes]:
    """Start a long-running process (etcd, an agent), output to out.

    netns: run it there with ``nsenter --net`` (not ``ip netns exec``, whose fresh
    /sys hides the pins on /sys/fs/bpf). detach: it outlives the caller in a session
    of its own (``flannel-xdp lab up``); otherwise ``setpriv --pdeathsig KILL`` ends it
    with the calling *thread* (the kernel's parent-death signal follows the thread, so
    start such processes from a thread that lives as long as they should), and even a
    killed test run leaves no process behind. No
    preexec_fn: after grpc is imported a Python-level hook in the forked child can abort.
    """
    cmd = list(argv)
    if netns is not None:
        cmd = ["nsenter", f"--net={netns_path(netns)}", "--", *cmd]
    if not detach:
        cmd = die_with_parent(cmd)
    return subprocess.Popen(
        cmd,
        stdin=subprocess.DEVNULL,
        stdout=out,
        stderr=subprocess.STDOUT,
        cwd=cwd,
        env=env,
        start_new_session=detach,
    )


def _cmdline(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return None


# Set in the environment of a process whose command line cannot name its lab (a DaemonSet
# container's arguments are the manifest's): its marker, for pid_alive() and pids_with().
MARKER_ENV = "FXDP_LAB_MARKER"


def _environ_marker(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            entries = f.read().split(b"\0")
    except OSError:
        return ""
    prefix = MARKER_ENV.encode() + b"="
    return next((e[len(prefix) :].decode(errors="replace") for e in entries
                 if e.startswith(prefix)), "")  # fmt: skip


def _names(pid: int, marker: str) -> bool:
    cmdline = _cmdline(pid)
    return cmdline is not None and (marker in cmdline or marker in _environ_marker(pid))


def pid_alive(pid: int, marker: str) -> bool:
    """pid runs and its command line (or MARKER_ENV) names marker (a path unique to the
    lab): a pid the kernel has since given to an unrelated process is never taken for
    ours."""
    cmdline = _cmdline(pid)
    if cmdline is None:
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                _reap(pid)
                return False
    except (OSError, IndexError):
        return False
    return _names(pid, marker)


def _reap(pid: int) -> None:
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)


def kill_pid(pid: int, marker: str, sig: int = signal.SIGKILL, timeout: float = 5.0) -> bool:
    """Send sig to pid if it is ours (see pid_alive) and, for SIGKILL, wait until it is
    gone. False when there was nothing to kill."""
    if not pid_alive(pid, marker):
        return False
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)
    if sig != signal.SIGKILL:
        return True
    deadline = time.monotonic() + timeout
    while pid_alive(pid, marker) and time.monotonic() < deadline:
        _reap(pid)
        time.sleep(0.01)
    return True


def descendants(pid: int) -> list[int]:
    """Every process below pid (children first found, then theirs)."""
    out, todo = [], [pid]
    while todo:
        parent = todo.pop()
        for task in glob.glob(f"/proc/{parent}/task/*/children"):
            try:
                with open(task) as f:
                    kids = [int(k) for k in f.read().split()]
            except OSError:
                continue
            out.extend(kids)
            todo.extend(kids)
    return out


def pids_with(marker: str) -> list[int]:
    """Every process whose command line (or MARKER_ENV) names marker (for a teardown
    without state)."""
    return [
        int(entry)
        for entry in os.listdir("/proc")
        if entry.isdigit() and int(entry) != os.getpid() and _names(int(entry), marker)
    ]
