"""ctypes bindings to the libbpf calls for programs and links: loading raw bytecode and
making the maps and BTF it refers to, test runs, tcx links, queries of what runs on a
hook, and pinning.

They share maps/libbpf.py's library handle and error type.
"""

from __future__ import annotations

import ctypes
import errno
import os
from functools import cache

# Pinned programs and links open like maps, and every call here raises the same error:
# both are part of this module's interface.
from flannel_xdp.maps.libbpf import BpfError as BpfError
from flannel_xdp.maps.libbpf import check, map_info, obj_info
from flannel_xdp.maps.libbpf import lib as _maps_lib
from flannel_xdp.maps.libbpf import obj_get as obj_get


@cache
def lib() -> ctypes.CDLL:
    so = _maps_lib()
    c_void_p, c_int, c_uint32 = ctypes.c_void_p, ctypes.c_int, ctypes.c_uint32
    so.bpf_obj_pin.argtypes = [c_int, ctypes.c_char_p]
    so.bpf_prog_test_run_opts.argtypes = [c_int, c_void_p]
    so.bpf_link_create.argtypes = [c_int, c_int, c_int, c_void_p]
    so.bpf_link_update.argtypes = [c_int, c_int, c_void_p]
    so.bpf_prog_query.argtypes = [
        c_int,
        c_int,
        c_uint32,
        ctypes.POINTER(c_uint32),
        ctypes.POINTER(c_uint32),
        ctypes.POINTER(c_uint32),
    ]
    so.bpf_prog_get_fd_by_id.argtypes = [c_uint32]
    so.bpf_map_get_fd_by_id.argtypes = [c_uint32]
    so.bpf_map_create.argtypes = [
        c_int,
        ctypes.c_char_p,
        c_uint32,
        c_uint32,
        c_uint32,
        ctypes.POINTER(_MapCreateOpts),
    ]
    so.bpf_btf_load.argtypes = [c_void_p, ctypes.c_size_t, c_void_p]
    so.bpf_btf_get_fd_by_id.argtypes = [c_uint32]
    so.bpf_prog_load.argtypes = [
        c_int,
        ctypes.c_char_p,
        ctypes.c_char_p,
        c_void_p,
        ctypes.c_size_t,
        ctypes.POINTER(_ProgLoadOpts),
    ]
    return so


def obj_pin(fd: int, path: str) -> None:
    check(lib().bpf_obj_pin(fd, path.encode()), f"pin fd {fd} at {path}")


class _MapCreateOpts(ctypes.Structure):
    # struct bpf_map_create_opts (libbpf 1.1)
    _fields_ = [
        ("sz", ctypes.c_size_t),
        ("btf_fd", ctypes.c_uint32),
        ("btf_key_type_id", ctypes.c_uint32),
        ("btf_value_type_id", ctypes.c_uint32),
        ("btf_vmlinux_value_type_id", ctypes.c_uint32),
        ("inner_map_fd", ctypes.c_uint32),
        ("map_flags", ctypes.c_uint32),
        ("map_extra", ctypes.c_uint64),
        ("numa_node", ctypes.c_uint32),
        ("map_ifindex", ctypes.c_uint32),
    ]


def map_create(
    map_type: int,
    name: str,
    key_size: int,
    value_size: int,
    max_entries: int,
    flags: int = 0,
    btf_fd: int = 0,
    btf_key_type_id: int = 0,
    btf_value_type_id: int = 0,
) -> int:
    """A new map (typed by btf_fd's types when given); its fd (the caller owns it)."""
    opts = _MapCreateOpts(sz=ctypes.sizeof(_MapCreateOpts), map_flags=flags)
    if btf_fd:
        opts.btf_fd = btf_fd
        opts.btf_key_type_id, opts.btf_value_type_id = btf_key_type_id, btf_value_type_id
    return check(
        lib().bpf_map_create(
            map_type,
            name[:PROG_NAME_MAX].encode(),
            key_size,
            value_size,
            max_entries,
            ctypes.byref(opts),
        ),
        f"create map {name}",
    )


def btf_load(blob: bytes) -> int:
    """Load a BTF blob (types for maps); its fd (the caller owns it)."""
    data = ctypes.create_string_buffer(blob, len(blob))
    return check(lib().bpf_btf_load(data, len(blob), None), f"load {len(blob)} bytes of BTF")


class _BtfInfo(ctypes.Structure):
    # struct bpf_btf_info (uapi), up to its id
    _fields_ = [
        ("btf", ctypes.c_uint64),
        ("btf_size", ctypes.c_uint32),
        ("id", ctypes.c_uint32),
    ]


def btf_blob_by_id(btf_id: int) -> bytes:
    """The raw BTF the kernel holds as btf_id (what typed a map)."""
    fd = check(lib().bpf_btf_get_fd_by_id(btf_id), f"open BTF id {btf_id}")
    try:
        size = obj_info(fd, _BtfInfo(), "BTF").btf_size
        buf = ctypes.create_string_buffer(size)
        info = _BtfInfo(btf=ctypes.addressof(buf), btf_size=size)
        obj_info(fd, info, "BTF")
        return buf.raw[: info.btf_size]
    finally:
        os.close(fd)


class _ProgLoadOpts(ctypes.Structure):
    # struct bpf_prog_load_opts (libbpf 1.1), up to the log buffer
    _fields_ = [
        ("sz", ctypes.c_size_t),
        ("attempts", ctypes.c_int),
        ("expected_attach_type", ctypes.c_uint32),
        ("prog_btf_fd", ctypes.c_uint32),
        ("prog_flags", ctypes.c_uint32),
        ("prog_ifindex", ctypes.c_uint32),
        ("kern_version", ctypes.c_uint32),
        ("attach_btf_id", ctypes.c_uint32),
        ("attach_btf_obj_fd", ctypes.c_uint32),
        ("attach_prog_fd", ctypes.c_uint32),
        ("fd_array", ctypes.c_void_p),
        ("func_info", ctypes.c_void_p),
        ("func_info_cnt", ctypes.c_uint32),
        ("func_info_rec_size", ctypes.c_uint32),
        ("line_info", ctypes.c_void_p),
        ("line_info_cnt", ctypes.c_uint32),
        ("line_info_rec_size", ctypes.c_uint32),
        ("log_level", ctypes.c_uint32),
        ("log_size", ctypes.c_uint32),
        ("log_buf", ctypes.c_char_p),
    ]


BPF_INSN_SIZE = 8
# enum bpf_prog_type (uapi), as bcc's BPF.SCHED_CLS and BPF.XDP name them too.
BPF_PROG_TYPE_SCHED_CLS, BPF_PROG_TYPE_XDP = 3, 6
PROG_NAME_MAX = 15  # BPF_OBJ_NAME_LEN - 1
VERIFIER_LOG_SIZE = 1 << 20
VERIFIER_LOG_ERRORS = 1
VERIFIER_LOG_TAIL = 8  # lines of the verifier's log an error quotes


def prog_load(prog_type: int, name: str, insns: bytes, license: bytes = b"GPL") -> int:
    """Load raw bytecode (maps already as fds); returns the program fd (the caller owns
    it). BpfError quotes the end of the verifier's log."""
    log = ctypes.create_string_buffer(VERIFIER_LOG_SIZE)
    opts = _ProgLoadOpts(sz=ctypes.sizeof(_ProgLoadOpts))
    opts.log_level, opts.log_size = VERIFIER_LOG_ERRORS, VERIFIER_LOG_SIZE
    opts.log_buf = ctypes.cast(log, ctypes.c_char_p)
    code = ctypes.create_string_buffer(insns, len(insns))
    fd = lib().bpf_prog_load(
        prog_type,
        name[:PROG_NAME_MAX].encode(),
        license,
        code,
        len(insns) // BPF_INSN_SIZE,
        ctypes.byref(opts),
    )
    if fd < 0:
        err = -fd if fd != -1 else ctypes.get_errno()
        tail = log.value.decode(errors="replace").strip().splitlines()[-VERIFIER_LOG_TAIL:]
        raise BpfError(err, f"loading {name}: {os.strerror(err)}; verifier: {' | '.join(tail)}")
    return fd


class _TestRunOpts(ctypes.Structure):
    # struct bpf_test_run_opts (libbpf 1.1)
    _fields_ = [
        ("sz", ctypes.c_size_t),
        ("data_in", ctypes.c_void_p),
        ("data_out", ctypes.c_void_p),
        ("data_size_in", ctypes.c_uint32),
        ("data_size_out", ctypes.c_uint32),
        ("ctx_in", ctypes.c_void_p),
        ("ctx_out", ctypes.c_void_p),
        ("ctx_size_in", ctypes.c_uint32),
        ("ctx_size_out", ctypes.c_uint32),
        ("retval", ctypes.c_uint32),
        ("repeat", ctypes.c_int),
        ("duration", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("cpu", ctypes.c_uint32),
        ("batch_size", ctypes.c_uint32),
    ]


def prog_test_run(
    prog_fd: int,
    data: bytes,
    *,
    repeat: int = 1,
    ctx: bytes | None = None,
    flags: int = 0,
    batch_size: int = 0,
    out_size: int = 16384,
) -> tuple[int, bytes, int]:
    """Run a program on one frame with BPF_PROG_TEST_RUN: (retval, frame out, ns per run)."""
    data_in = ctypes.create_string_buffer(data, len(data))
    data_out = ctypes.create_string_buffer(out_size)
    opts = _TestRunOpts()
    opts.sz = ctypes.sizeof(_TestRunOpts)
    opts.data_in = ctypes.cast(data_in, ctypes.c_void_p)
    opts.data_size_in = len(data)
    if not flags:
        opts.data_out = ctypes.cast(data_out, ctypes.c_void_p)
        opts.data_size_out = out_size
    if ctx is not None:
        ctx_in = ctypes.create_string_buffer(ctx, len(ctx))
        opts.ctx_in = ctypes.cast(ctx_in, ctypes.c_void_p)
        opts.ctx_size_in = len(ctx)
    opts.repeat = repeat
    opts.flags = flags
    opts.batch_size = batch_size
    check(
        lib().bpf_prog_test_run_opts(prog_fd, ctypes.byref(opts)), f"test run of prog fd {prog_fd}"
    )
    return opts.retval, data_out.raw[: opts.data_size_out] if not flags else b"", opts.duration


class ProgInfo(ctypes.Structure):
    # The head of struct bpf_prog_info (uapi), up to the name; the kernel fills what fits.
    _fields_ = [
        ("type", ctypes.c_uint32),
        ("id", ctypes.c_uint32),
        ("tag", ctypes.c_uint8 * 8),
        ("jited_prog_len", ctypes.c_uint32),
        ("xlated_prog_len", ctypes.c_uint32),
        ("jited_prog_insns", ctypes.c_uint64),
        ("xlated_prog_insns", ctypes.c_uint64),
        ("load_time", ctypes.c_uint64),
        ("created_by_uid", ctypes.c_uint32),
        ("nr_map_ids", ctypes.c_uint32),
        ("map_ids", ctypes.c_uint64),
        ("name", ctypes.c_char * 16),
    ]


def prog_info(fd: int) -> ProgInfo:
    return obj_info(fd, ProgInfo(), "program")


def prog_map_ids(fd: int) -> list[int]:
    """The ids of the maps the program uses."""
    count = prog_info(fd).nr_map_ids
    ids = (ctypes.c_uint32 * max(count, 1))()
    info = ProgInfo(nr_map_ids=count, map_ids=ctypes.addressof(ids))
    obj_info(fd, info, "program")
    return list(ids[: min(count, info.nr_map_ids)])


def prog_fd_by_id(prog_id: int) -> int:
    return check(lib().bpf_prog_get_fd_by_id(prog_id), f"open program id {prog_id}")


def map_name_by_id(map_id: int) -> str:
    fd = check(lib().bpf_map_get_fd_by_id(map_id), f"open map id {map_id}")
    try:
        return map_info(fd).name.decode()
    finally:
        os.close(fd)


def prog_name_by_id(prog_id: int) -> str | None:
    """The name of a loaded program; None when it is gone."""
    try:
        fd = prog_fd_by_id(prog_id)
    except BpfError as exc:
        if exc.errno == errno.ENOENT:
            return None
        raise
    try:
        return prog_info(fd).name.decode()
    finally:
        os.close(fd)


# enum bpf_attach_type (uapi): the tcx hooks (Linux 6.6), which need no qdisc.
BPF_TCX_INGRESS, BPF_TCX_EGRESS = 46, 47
MAX_QUERIED_PROGS = 64


def link_create(prog_fd: int, ifindex: int, attach_type: int) -> int:
    """A bpf_link attaching the program to the interface's hook; its fd."""
    return check(
        lib().bpf_link_create(prog_fd, ifindex, attach_type, None),
        f"attach program fd {prog_fd} to ifindex {ifindex} (attach type {attach_type})",
    )


class LinkInfo(ctypes.Structure):
    # The head of struct bpf_link_info (uapi) with its tcx member.
    _fields_ = [
        ("type", ctypes.c_uint32),
        ("id", ctypes.c_uint32),
        ("prog_id", ctypes.c_uint32),
        ("_pad", ctypes.c_uint32),  # the union that follows is 8-byte aligned
        ("tcx_ifindex", ctypes.c_uint32),  # 0 once the interface is gone
        ("tcx_attach_type", ctypes.c_uint32),
    ]


def link_info(fd: int) -> LinkInfo:
    return obj_info(fd, LinkInfo(), "link")


def link_update(link_fd: int, prog_fd: int) -> None:
    """Swap the link's program for another, atomically."""
    check(lib().bpf_link_update(link_fd, prog_fd, None), f"update link fd {link_fd}")


def prog_query(ifindex: int, attach_type: int) -> list[int]:
    """The ids of the programs on the interface's hook, in the order they run."""
    ids = (ctypes.c_uint32 * MAX_QUERIED_PROGS)()
    count = ctypes.c_uint32(MAX_QUERIED_PROGS)
    flags = ctypes.c_uint32(0)
    check(
        lib().bpf_prog_query(
            ifindex, attach_type, 0, ctypes.byref(flags), ids, ctypes.byref(count)
        ),
        f"query programs of ifindex {ifindex} (attach type {attach_type})",
    )
    return list(ids[: count.value])
