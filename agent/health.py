"""/healthz and /readyz, as flanneld serves them (a tiny HTTP/1.0 responder)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

log = logging.getLogger(__name__)


async def serve(host: str, port: int, ready: Callable[[], bool]) -> asyncio.AbstractServer:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = await asyncio.wait_for(reader.readline(), 5)
            parts = line.decode(errors="replace").split()
            path = parts[1] if len(parts) >= 2 else ""
            if path == "/healthz":
                status, body = "200 OK", "ok\n"
            elif path == "/readyz":
                status, body = (
                    ("200 OK", "ready\n") if ready() else ("503 Service Unavailable", "not ready\n")
                )
            else:
                status, body = "404 Not Found", "not found\n"
            writer.write(
                f"HTTP/1.0 {status}\r\nContent-Type: text/plain\r\n"
                f"Content-Length: {len(body)}\r\n\r\n{body}".encode()
            )
            await writer.drain()
        except (TimeoutError, ConnectionError) as exc:
            log.debug("health client: %s", exc)
        finally:
            writer.close()

    server = await asyncio.start_server(handle, host, port)
    log.info("health endpoints on http://%s:%d/healthz and /readyz", host, port)
    return server
