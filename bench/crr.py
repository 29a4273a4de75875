"""New TCP connections per second, as netperf's TCP_CRR counts them (netperf is not in
Debian's main archive): each transaction connects, sends a 1-byte request, reads the
1-byte reply and the server's close, and closes.

`python -m flannel_xdp.bench.crr server IP PORT` answers until killed; `... client IP PORT
SECONDS` runs transactions back to back for SECONDS and prints one JSON line. The server
closes first, so the TIME_WAIT sockets pile up on its side and the client's ephemeral
ports do not run out within a run. A blocking socket per transaction keeps the
interpreter's share small beside the kernel's (socket, handshake, teardown on both
nodes): the figure is comparable between data paths in one run, not with netperf's.
"""

from __future__ import annotations

import json
import socket
import sys
import time

from .procname import set_comm

BACKLOG = 4096
REQUEST = b"q"
REPLY = b"r"
# comm names, so that a CPU profile tells the tool's samples apart (bench/profile.py)
SERVER_COMM = "crr-server"
CLIENT_COMM = "crr-client"


def serve(ip: str, port: int) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((ip, port))
        listener.listen(BACKLOG)
        while True:
            conn, _ = listener.accept()
            with conn:
                if conn.recv(1):
                    conn.sendall(REPLY)


def transactions(ip: str, port: int, seconds: float) -> dict:
    """Transactions back to back for seconds; failed ones are counted, not retried."""
    done = failed = 0
    end = time.monotonic() + seconds
    started = time.monotonic()
    while time.monotonic() < end:
        try:
            with socket.create_connection((ip, port), timeout=2) as conn:
                conn.sendall(REQUEST)
                if conn.recv(1) != REPLY or conn.recv(1) != b"":
                    failed += 1
                    continue
        except OSError:
            failed += 1
            continue
        done += 1
    took = time.monotonic() - started
    return {"transactions": done, "failed": failed, "seconds": took, "tps": done / took}


def main(argv: list[str]) -> int:
    if len(argv) == 3 and argv[0] == "server":
        set_comm(SERVER_COMM)
        serve(argv[1], int(argv[2]))
        return 0
    if len(argv) == 4 and argv[0] == "client":
        set_comm(CLIENT_COMM)
        print(json.dumps(transactions(argv[1], int(argv[2]), float(argv[3]))), flush=True)
        return 0
    print("usage: crr server IP PORT | crr client IP PORT SECONDS", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
