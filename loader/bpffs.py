"""The bpffs directory that holds our pins: <dir>/maps/<name>, <dir>/progs/<name>."""

from __future__ import annotations

import ctypes
import logging
import os
import stat
from dataclasses import dataclass

log = logging.getLogger(__name__)

BPF_FS_MAGIC = 0xCAFE4A11
PIN_DIR_MODE = 0o700
SYSFS_BPF_DIR = "/sys/fs/bpf"


class BpffsError(RuntimeError):
    pass


def _fs_type(path: str) -> int:
    class Statfs(ctypes.Structure):
        _fields_ = [("f_type", ctypes.c_long), ("rest", ctypes.c_byte * 120)]

    libc = ctypes.CDLL(None, use_errno=True)
    buf = Statfs()
    if libc.statfs(path.encode(), ctypes.byref(buf)) != 0:
        err = ctypes.get_errno()
        raise BpffsError(f"statfs {path}: {os.strerror(err)}")
    return buf.f_type & 0xFFFFFFFF


def is_bpffs(path: str) -> bool:
    return os.path.isdir(path) and _fs_type(path) == BPF_FS_MAGIC


def _fs_name(path: str) -> str:
    """The type of the filesystem path is on, as /proc/self/mounts names it (for messages)."""
    mount_point = os.path.abspath(path)
    while not os.path.ismount(mount_point):
        mount_point = os.path.dirname(mount_point)
    kind = "an unknown filesystem"
    try:
        with open("/proc/self/mounts") as f:
            for line in f:  # the last mount on a mount point is the one on top
                fields = line.split()
                if len(fields) >= 3 and fields[1].replace("\\040", " ") == mount_point:
                    kind = fields[2]
    except OSError:
        pass
    return kind


def _mount_bpffs(path: str) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.mount(b"bpf", path.encode(), b"bpf", 0, None) != 0:
        err = ctypes.get_errno()
        raise BpffsError(f"cannot mount bpffs at {path}: {os.strerror(err)}")
    log.info("mounted bpffs at %s", path)


@dataclass(frozen=True)
class PinDir:
    root: str

    @property
    def maps(self) -> str:
        return os.path.join(self.root, "maps")

    @property
    def progs(self) -> str:
        return os.path.join(self.root, "progs")

    def prog(self, name: str) -> str:
        return os.path.join(self.progs, name)

    @property
    def links(self) -> str:
        """bpf_links that keep programs attached without a qdisc (tcx)."""
        return os.path.join(self.root, "links")

    def link(self, name: str) -> str:
        return os.path.join(self.links, name)

    def check(self) -> bool:
        """Whether pins can go under root, without changing anything: BpffsError names the
        problem. True when bpffs still has to be mounted (on /sys/fs/bpf, see ensure())."""
        root = os.path.abspath(self.root)
        probe = root
        while not os.path.lexists(probe):
            probe = os.path.dirname(probe)
        if not os.path.isdir(probe):
            raise BpffsError(f"--bpffs {self.root}: {probe} exists and is not a directory")
        if is_bpffs(probe):
            return False
        # Nothing mounted on the standard mount point (a fresh machine, or `ip netns exec`,
        # which remounts /sys and hides the host's /sys/fs/bpf): ensure() mounts it there.
        if probe == SYSFS_BPF_DIR:
            return True
        # Anywhere else we do not mount bpffs ourselves: a mount made here could live in a
        # mount namespace of ours only, and go (with every pin) when we do. Pins need bpffs.
        raise BpffsError(
            f"--bpffs {self.root}: {probe} is on {_fs_name(probe)}, not on a bpf filesystem, "
            f"so nothing can be pinned there; use a directory under {SYSFS_BPF_DIR} or "
            f"mount one first (mount -t bpf bpf <dir>)"
        )

    def ensure(self) -> None:
        """Create root/maps/progs (mode 0700), mounting bpffs on /sys/fs/bpf if it is not."""
        if self.check():
            _mount_bpffs(SYSFS_BPF_DIR)
        root = os.path.abspath(self.root)
        for d in (root, self.maps, self.progs, self.links):
            os.makedirs(d, mode=PIN_DIR_MODE, exist_ok=True)
            if stat.S_IMODE(os.stat(d).st_mode) != PIN_DIR_MODE:
                os.chmod(d, PIN_DIR_MODE)

    def remove(self) -> None:
        """Unpin everything below root (links first: that detaches their programs) and
        remove the directories we made."""
        for sub in (self.links, self.progs, self.maps):
            if os.path.isdir(sub):
                for name in os.listdir(sub):
                    os.unlink(os.path.join(sub, name))
                os.rmdir(sub)
        if not os.path.isdir(self.root) or self.root == SYSFS_BPF_DIR:
            return
        if os.path.ismount(self.root):
            libc = ctypes.CDLL(None, use_errno=True)
            libc.umount2(self.root.encode(), 0)
        try:
            os.rmdir(self.root)
        except OSError as exc:
            log.warning("left %s in place: %s", self.root, exc)
