"""GET /metrics and GET /healthz, served on the master's event loop.

A small asyncio HTTP/1.1 responder instead of prometheus_client's
start_http_server: that one answers from a thread, which would read the
totals while the loop updates them (a lock on every report), and would run
Python work in a second thread of the process that accepts every client. A
scrape here is one generate_latest() in the loop: reading the totals and
/proc for each worker, well under a millisecond per worker. Requests are
bounded (size, time) so that a stuck or hostile peer costs nothing more."""

from __future__ import annotations

import asyncio
import logging

from ..errors import ForwardError

log = logging.getLogger("sshpump")

REQUEST_MAX = 8192      # bytes of request line + headers
REQUEST_TIMEOUT = 10.0  # seconds to send them


class MetricsServer:
    def __init__(self, metrics, host: str, port: int):
        self.metrics = metrics
        self.host, self.port = host, port
        self.server = None
        self.address = None   # [host, bound port]

    async def start(self):
        try:
            self.server = await asyncio.start_server(self._serve, self.host, self.port,
                                                     limit=REQUEST_MAX, reuse_address=True)
        except OSError as e:
            where = f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"
            raise ForwardError(f"--metrics {where}: {e.strerror or e}") from None
        self.address = [self.host, self.server.sockets[0].getsockname()[1]]
        self.metrics.registry   # built now: a failure shows at start, not at the first scrape
        log.info("metrics on http://%s/metrics (health check /healthz)", _hostport(self.address))
        return self

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), REQUEST_TIMEOUT)
            method, path = _request_line(head)
            try:
                status, ctype, body = self._answer(method, path)
            except Exception:  # noqa: BLE001 - a scrape must never take the master down
                log.exception("metrics: cannot answer %s %s", method, path)
                status, ctype, body = 500, "text/plain; charset=utf-8", b"internal error\n"
            writer.write(b"HTTP/1.1 %d %s\r\nContent-Type: %s\r\nContent-Length: %d\r\nConnection: close\r\n\r\n"
                         % (status, _REASONS[status], ctype.encode(), len(body)))
            if method != "HEAD":
                writer.write(body)
            await asyncio.wait_for(writer.drain(), REQUEST_TIMEOUT)
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, asyncio.TimeoutError, ValueError,
                ConnectionError):
            pass   # a broken or abandoned request gets no answer
        finally:
            writer.close()

    def _answer(self, method, path) -> tuple[int, str, bytes]:
        text = "text/plain; charset=utf-8"
        if method not in ("GET", "HEAD"):
            return 405, text, b"method not allowed\n"
        path = path.split("?", 1)[0]
        if path == "/metrics":
            body, ctype = self.metrics.exposition()
            return 200, ctype, body
        if path == "/healthz":
            up, total = self.metrics.sessions_up()
            if up:
                return 200, text, b"ok: %d of %d sessions up\n" % (up, total)
            return 503, text, b"no SSH session up (0 of %d)\n" % total
        return 404, text, b"not found\n"

    async def close(self):
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()
            self.server = None


_REASONS = {200: b"OK", 404: b"Not Found", 405: b"Method Not Allowed", 500: b"Internal Server Error",
            503: b"Service Unavailable"}


def _request_line(head: bytes) -> tuple[str, str]:
    parts = head.split(b"\r\n", 1)[0].decode("latin-1").split()
    if len(parts) != 3 or not parts[2].startswith("HTTP/"):
        raise ValueError("not an HTTP request")
    return parts[0], parts[1]


def _hostport(addr) -> str:
    return f"[{addr[0]}]:{addr[1]}" if ":" in addr[0] else f"{addr[0]}:{addr[1]}"


async def serve_metrics(runtime, address) -> MetricsServer | None:
    """--metrics (host, port), or None when not asked for."""
    if address is None:
        return None
    return await MetricsServer(runtime.metrics, *address).start()
