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

    def ensure(self) -> None:
        """Create root/maps/progs (mode 0700), mounting bpffs where none is."""
        root = os.path.abspath(self.root)
        probe = root
        while not os.path.isdir(probe):
            probe = os.path.dirname(probe)
        if not is_bpffs(probe):
            # Nothing mounted (a fresh machine, or `ip netns exec`, which remounts
            # /sys and hides the host's /sys/fs/bpf): mount bpffs ourselves, on the
            # sysfs mount point if that is where we are, else on root itself.
            if probe != SYSFS_BPF_DIR:
                os.makedirs(root, mode=PIN_DIR_MODE, exist_ok=True)
                probe = root
            _mount_bpffs(probe)
        for d in (root, self.maps, self.progs):
            os.makedirs(d, mode=PIN_DIR_MODE, exist_ok=True)
            if stat.S_IMODE(os.stat(d).st_mode) != PIN_DIR_MODE:
                os.chmod(d, PIN_DIR_MODE)

    def remove(self) -> None:
        """Unpin everything below root and remove the directories we made."""
        for sub in (self.progs, self.maps):
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
