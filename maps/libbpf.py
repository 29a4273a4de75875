"""ctypes bindings to the libbpf calls that reading and writing pinned maps needs.

libbpf.so.1 comes with Debian's libbpf1 (a dependency of bcc). Every call
raises BpfError with the kernel's errno and the object it was about. The calls
for programs and links are loader/libbpf.py's, on the same library.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
from functools import cache


class BpfError(OSError):
    """A bpf(2) operation failed."""


def _load() -> ctypes.CDLL:
    name = ctypes.util.find_library("bpf") or "libbpf.so.1"
    try:
        return ctypes.CDLL(name, use_errno=True)
    except OSError as exc:
        raise BpfError(
            errno.ENOENT, f"libbpf not found ({name}): install Debian's libbpf1"
        ) from exc


@cache
def lib() -> ctypes.CDLL:
    so = _load()
    c_void_p, c_int, c_uint32 = ctypes.c_void_p, ctypes.c_int, ctypes.c_uint32
    so.bpf_obj_get.argtypes = [ctypes.c_char_p]
    so.bpf_map_lookup_elem.argtypes = [c_int, c_void_p, c_void_p]
    so.bpf_map_update_elem.argtypes = [c_int, c_void_p, c_void_p, ctypes.c_uint64]
    so.bpf_map_delete_elem.argtypes = [c_int, c_void_p]
    so.bpf_map_get_next_key.argtypes = [c_int, c_void_p, c_void_p]
    so.bpf_map_update_batch.argtypes = [
        c_int,
        c_void_p,
        c_void_p,
        ctypes.POINTER(c_uint32),
        c_void_p,
    ]
    so.bpf_map_delete_batch.argtypes = [c_int, c_void_p, ctypes.POINTER(c_uint32), c_void_p]
    so.bpf_obj_get_info_by_fd.argtypes = [c_int, c_void_p, ctypes.POINTER(c_uint32)]
    so.libbpf_num_possible_cpus.argtypes = []
    return so


def check(rc: int, what: str) -> int:
    # libbpf 1.x returns -errno and also sets errno.
    if rc < 0:
        err = -rc if rc != -1 else ctypes.get_errno()
        raise BpfError(err, f"{what}: {os.strerror(err)}")
    return rc


def obj_get(path: str) -> int:
    return check(lib().bpf_obj_get(path.encode()), f"open pinned object {path}")


def num_possible_cpus() -> int:
    return check(lib().libbpf_num_possible_cpus(), "count possible CPUs")


def lookup(fd: int, key: ctypes.Array | ctypes.Structure, value) -> bool:
    rc = lib().bpf_map_lookup_elem(fd, ctypes.byref(key), ctypes.byref(value))
    if rc < 0 and -rc == errno.ENOENT:
        return False
    check(rc, f"lookup in map fd {fd}")
    return True


def update(fd: int, key, value, flags: int = 0) -> None:
    check(
        lib().bpf_map_update_elem(fd, ctypes.byref(key), ctypes.byref(value), flags),
        f"update map fd {fd}",
    )


def delete(fd: int, key) -> bool:
    rc = lib().bpf_map_delete_elem(fd, ctypes.byref(key))
    if rc < 0 and -rc == errno.ENOENT:
        return False
    check(rc, f"delete from map fd {fd}")
    return True


def next_key(fd: int, key, next_out) -> bool:
    """Write the key after key (or the first, if key is None) into next_out."""
    rc = lib().bpf_map_get_next_key(
        fd, None if key is None else ctypes.byref(key), ctypes.byref(next_out)
    )
    if rc < 0 and -rc == errno.ENOENT:
        return False
    check(rc, f"iterate map fd {fd}")
    return True


class _BatchOpts(ctypes.Structure):
    _fields_ = [
        ("sz", ctypes.c_size_t),
        ("elem_flags", ctypes.c_uint64),
        ("flags", ctypes.c_uint64),
    ]


def update_batch(fd: int, keys, values, count: int) -> None:
    n = ctypes.c_uint32(count)
    opts = _BatchOpts(ctypes.sizeof(_BatchOpts), 0, 0)
    check(
        lib().bpf_map_update_batch(
            fd, ctypes.byref(keys), ctypes.byref(values), ctypes.byref(n), ctypes.byref(opts)
        ),
        f"batch update of {count} entries in map fd {fd} ({n.value} done)",
    )


def delete_batch(fd: int, keys, count: int) -> None:
    n = ctypes.c_uint32(count)
    opts = _BatchOpts(ctypes.sizeof(_BatchOpts), 0, 0)
    check(
        lib().bpf_map_delete_batch(fd, ctypes.byref(keys), ctypes.byref(n), ctypes.byref(opts)),
        f"batch delete of {count} entries in map fd {fd} ({n.value} done)",
    )


class MapInfo(ctypes.Structure):
    # The head of struct bpf_map_info (uapi); the kernel fills what fits.
    _fields_ = [
        ("type", ctypes.c_uint32),
        ("id", ctypes.c_uint32),
        ("key_size", ctypes.c_uint32),
        ("value_size", ctypes.c_uint32),
        ("max_entries", ctypes.c_uint32),
        ("map_flags", ctypes.c_uint32),
        ("name", ctypes.c_char * 16),
        ("ifindex", ctypes.c_uint32),
        ("btf_vmlinux_value_type_id", ctypes.c_uint32),
        ("netns_dev", ctypes.c_uint64),
        ("netns_ino", ctypes.c_uint64),
        ("btf_id", ctypes.c_uint32),  # 0: the map has no BTF
        ("btf_key_type_id", ctypes.c_uint32),
        ("btf_value_type_id", ctypes.c_uint32),
    ]


def obj_info(fd: int, info: ctypes.Structure, what: str):
    """Fill info (the head of a bpf_*_info struct: the kernel fills what fits) for fd."""
    size = ctypes.c_uint32(ctypes.sizeof(info))
    check(
        lib().bpf_obj_get_info_by_fd(fd, ctypes.byref(info), ctypes.byref(size)),
        f"info of {what} fd {fd}",
    )
    return info


def map_info(fd: int) -> MapInfo:
    return obj_info(fd, MapInfo(), "map")
