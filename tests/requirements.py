"""Checks for what kernel-level tests need: they fail loudly, never skip."""

from __future__ import annotations

import os
import shutil

import pytest


def require_root_and_bcc(*tools: str) -> None:
    if os.geteuid() != 0:
        pytest.fail(
            "this test needs root (BPF programs, network namespaces): run `make test` as root"
        )
    try:
        import bcc  # noqa: F401
    except ImportError:
        pytest.fail("bcc is not importable: run `make setup` (Debian python3-bpfcc in the venv)")
    if not os.path.exists("/sys/kernel/btf/vmlinux"):
        pytest.fail("the kernel has no BTF (/sys/kernel/btf/vmlinux): BPF maps cannot be typed")
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        pytest.fail(f"missing tools {missing}: run `make setup`")
