"""Every header in bpf/ includes what it uses: each compiles alone, first in its file."""

from __future__ import annotations

import subprocess
import sys
import uuid

import pytest

from flannel_xdp.bpf import source_dir
from tests.requirements import require_root_and_bcc

pytestmark = pytest.mark.bpf

HEADERS = sorted(p.name for p in source_dir().glob("*.h"))

# A child process per header: bcc may crash the process it compiles in after an error.
# The build is the one with every define (the fast path and its kfuncs), as the loader
# makes it, against maps pinned in a directory of its own.
COMPILE_ALONE = """
import sys
from pathlib import Path
from flannel_xdp.loader.bpffs import PinDir
from flannel_xdp.loader.compile import BuildParams, compile_file

alone, bpffs = Path(sys.argv[1]), sys.argv[2]
pins = PinDir(bpffs)
pins.ensure()
try:
    params = BuildParams(maps_dir=pins.maps, max_subnets=64, udp_fast_path=True)
    compile_file(alone, params, "header_alone").cleanup()
finally:
    pins.remove()
"""


@pytest.mark.parametrize("header", HEADERS)
def test_header_compiles_alone(header, tmp_path):
    require_root_and_bcc()
    alone = tmp_path / f"only_{header.removesuffix('.h')}.c"
    alone.write_text(f'#include "{source_dir() / header}"\n')
    bpffs = f"/sys/fs/bpf/fxdp-header-{uuid.uuid4().hex[:8]}"
    done = subprocess.run(
        [sys.executable, "-c", COMPILE_ALONE, str(alone), bpffs],
        capture_output=True,
        text=True,
        timeout=120,
    )
    errors = [line for line in done.stderr.splitlines() if "error" in line.lower()]
    assert done.returncode == 0, f"bpf/{header} does not compile alone: " + "\n".join(
        errors or done.stderr.splitlines()[-10:]
    )
