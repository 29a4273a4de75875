"""Traffic between two lab pods for the fast path's tests: UDP datagrams and echoes, TCP
streams checked byte for byte both ways, and what a pod's veth end sent into the pod.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Iterator

from flannel_xdp import netns
from flannel_xdp.lab import Pod, traffic
from tests.bpf_support import c_define
from tests.packet_support import wait_out_cache

SERVER_PORT = 9000
STREAM = bytes(range(256)) * 16384  # 4 MiB: TCP sends it in GSO aggregates
DATAGRAMS = 300
SO_RCVBUFFORCE = 33  # asm-generic/socket.h: root may exceed net.core.rmem_max
RCVBUF = 8 << 20  # every datagram of a burst fits, whatever the path's speed
FAST = ("vxlan", "fast_deliver")  # vxlan, for the agent's test


def wait_out_flow_cache() -> None:
    """Past every CPU's kept fast-path decision: what the FIB and the maps say now applies."""
    wait_out_cache(c_define("fastpath.h", "FLOW_CACHE_NS"))


@contextlib.contextmanager
def udp_socket(pod: Pod, port: int = 0) -> Iterator[socket.socket]:
    with traffic.udp_socket(pod.netns, str(pod.ip), port, timeout=3) as s:
        yield s


@contextlib.contextmanager
def echo_server(pod: Pod) -> Iterator[None]:
    """Echoes every datagram to SERVER_PORT back to its sender, until the block ends."""
    with udp_socket(pod, SERVER_PORT) as s:
        s.settimeout(0.2)
        stop = threading.Event()

        def serve() -> None:
            while not stop.is_set():
                try:
                    data, peer = s.recvfrom(2048)
                except TimeoutError:
                    continue
                s.sendto(data, peer)

        t = threading.Thread(target=serve, daemon=True)
        t.start()
        try:
            yield
        finally:
            stop.set()
            t.join()


def veth_tx_packets(cluster, pod: Pod) -> int:
    """Packets the pod's veth end in its node sent into the pod (bpf_redirect_peer skips
    it; the bridge sends through it). cluster: a lab Cluster or AgentCluster."""
    node = cluster.nodes[pod.node]
    with netns.entered(node.netns), open("/proc/thread-self/net/dev") as f:
        for line in f:
            name, _, fields = line.partition(":")
            if name.strip() == pod.host_veth:
                return int(fields.split()[9])
    raise LookupError(f"no {pod.host_veth} in {node.netns}")


def send_and_receive(a: Pod, b: Pod) -> None:
    """DATAGRAMS datagrams from a to b; all must arrive, byte for byte."""
    with udp_socket(b, SERVER_PORT) as server, udp_socket(a) as client:
        server.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, RCVBUF)
        sent = [b"datagram %05d " % i + bytes(i % 200) for i in range(DATAGRAMS)]
        for payload in sent:
            client.sendto(payload, (str(b.ip), SERVER_PORT))
        got = [server.recv(2048) for _ in range(DATAGRAMS)]
    assert sorted(got) == sorted(sent)


@contextlib.contextmanager
def tcp_connection(
    client: Pod, server: Pod, dst: tuple[str, int] | None = None, sport: int = 0
) -> Iterator[tuple[socket.socket, socket.socket]]:
    """A TCP connection from client (port sport) to dst (default: the server's
    SERVER_PORT), as (client's socket, server's), both closed at the end of the block."""
    with netns.entered(server.netns):
        srv = socket.socket()
    with netns.entered(client.netns):
        cli = socket.socket()
    with contextlib.closing(srv), contextlib.closing(cli):
        # the server may close first: its earlier connections wait in TIME_WAIT
        srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        srv.bind((str(server.ip), SERVER_PORT))
        srv.listen(1)
        for s in (srv, cli):
            s.settimeout(10)
        cli.bind((str(client.ip), sport))
        cli.connect(dst or (str(server.ip), SERVER_PORT))
        conn, _ = srv.accept()
        with contextlib.closing(conn):
            conn.settimeout(10)
            yield cli, conn


def tcp_stream(
    client: Pod,
    server: Pod,
    dst: tuple[str, int] | None = None,
    sport: int = 0,
    reply: bytes = b"",
) -> int:
    """STREAM from client to server and reply back at the same time, over one TCP
    connection to dst (default: the server itself), closed by both ends; every byte must
    arrive both ways. Returns the client's port."""
    with tcp_connection(client, server, dst, sport) as (cli, conn):

        def send(sock: socket.socket, data: bytes) -> None:
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)

        senders = [
            threading.Thread(target=send, args=(cli, STREAM), daemon=True),
            threading.Thread(target=send, args=(conn, reply), daemon=True),
        ]
        for t in senders:
            t.start()
        got, back = receive_all(conn), receive_all(cli)
        for t in senders:
            t.join(10)
        port = cli.getsockname()[1]
    assert got == STREAM
    assert back == reply, "the server's data or FIN did not arrive"
    return port


def receive_all(sock: socket.socket) -> bytes:
    """Everything up to the peer's FIN."""
    got = bytearray()
    while chunk := sock.recv(1 << 16):
        got += chunk
    return bytes(got)
