"""`python -m flannel_xdp.loader install`: compile, load, attach and pin in a short-lived
process, so that long-running callers (the agent) never hold bcc and LLVM in memory.

Reads a JSON request on stdin, prints a JSON result on stdout; errors go to stderr
with exit code 1 (the message names the device or program at fault).
"""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import asdict

from flannel_xdp import defaults
from flannel_xdp.loader import datapath


def main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.INFO, format=defaults.LOG_FORMAT, stream=sys.stderr)
    if argv != ["install"]:
        print("usage: python -m flannel_xdp.loader install < request.json", file=sys.stderr)
        return 2
    request = datapath.InstallRequest.from_json(sys.stdin.read())
    try:
        installed = datapath.install(request.config, request.node)
    except (OSError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(asdict(installed), default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
