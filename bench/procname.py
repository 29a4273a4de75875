"""A process's name as the kernel knows it (its comm): what perf groups samples by.

The bench's tools are Python processes like any other on a shared machine; a name of
their own tells their samples apart (bench/profile.py).
"""

from __future__ import annotations

import ctypes
import os

PR_SET_NAME = 15
COMM_MAX = 15  # TASK_COMM_LEN less the terminating NUL


def set_comm(name: str) -> None:
    """Name the calling thread; threads it starts afterwards inherit the name.
    ValueError for a name the kernel would cut; OSError if it refuses."""
    raw = name.encode()
    if not raw or len(raw) > COMM_MAX:
        raise ValueError(f"a comm is 1 to {COMM_MAX} bytes: {name!r}")
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_NAME, ctypes.c_char_p(raw), 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl(PR_SET_NAME, {name!r}): {os.strerror(err)}")
