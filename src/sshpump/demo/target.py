"""The demo's target server, run as a child: ``python -m sshpump.demo.target``.

Two TCP ports on 127.0.0.1:

* ``echo`` (uvloop, cheap per connection): everything comes back, until EOF;
* ``bulk`` (a thread per connection, 1 MiB socket buffers); the first byte
  picks the service:
  ``U`` + 8-byte length N (upload, a sink): reads N bytes and answers the
  32-byte sha256 of what it received;
  ``D`` + 8-byte length N (download, a source): sends N bytes of
  ``pattern(N)``, then closes.

It prints ``{"echo": P1, "bulk": P2, "pid": PID}`` on stdout once listening
and serves until its stdin reaches EOF (the parent closed it, or died) or
SIGTERM.
"""
from __future__ import annotations

import asyncio
import hashlib
import json
import os
import random
import signal
import socket
import sys
import threading

CHUNK = 1 << 20
_BLOCK = random.Random(20240613).randbytes(CHUNK)


def pattern(size: int):
    """The demo's data stream, ``size`` bytes in chunks of up to 1 MiB: a
    fixed pseudo-random block whose first 8 bytes carry the chunk number (so
    a lost, repeated or reordered chunk changes the sha256).  Yields the same
    buffer each time: use a chunk before asking for the next."""
    buf = bytearray(_BLOCK)
    view = memoryview(buf)
    sent, i = 0, 0
    while sent < size:
        buf[:8] = i.to_bytes(8, "big")
        n = min(CHUNK, size - sent)
        yield view[:n]
        sent += n
        i += 1


def pattern_sha256(size: int) -> str:
    h = hashlib.sha256()
    for chunk in pattern(size):
        h.update(chunk)
    return h.hexdigest()


def recv_exactly(sock: socket.socket, n: int) -> bytes:
    out = bytearray()
    while len(out) < n:
        b = sock.recv(n - len(out))
        if not b:
            raise EOFError(f"connection closed after {len(out)} of {n} bytes")
        out += b
    return bytes(out)


def tune(sock: socket.socket, bufsize: int = 0) -> None:
    """TCP_NODELAY; with ``bufsize``, socket buffers that big (bulk)."""
    for opt in ((socket.SO_RCVBUF, socket.SO_SNDBUF) if bufsize else ()):
        try:
            sock.setsockopt(socket.SOL_SOCKET, opt, bufsize)
        except OSError:
            pass
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _bulk(s: socket.socket) -> None:
    try:
        tune(s, CHUNK)
        kind = s.recv(1)
        n = int.from_bytes(recv_exactly(s, 8), "big")
        if kind == b"U":
            h, buf = hashlib.sha256(), bytearray(CHUNK)
            view, got = memoryview(buf), 0
            while got < n:
                k = s.recv_into(view[:min(CHUNK, n - got)])
                if not k:
                    return
                h.update(view[:k])
                got += k
            s.sendall(h.digest())
        elif kind == b"D":
            for chunk in pattern(n):
                s.sendall(chunk)
    except (OSError, EOFError):
        pass
    finally:
        s.close()


def _accept_loop(lsock: socket.socket) -> None:
    while True:
        try:
            conn, _ = lsock.accept()
        except OSError:
            return
        threading.Thread(target=_bulk, args=(conn,), daemon=True).start()


class _Echo(asyncio.Protocol):
    def connection_made(self, transport):
        self.t = transport
        sock = transport.get_extra_info("socket")
        if sock is not None:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass

    def data_received(self, data):
        self.t.write(data)

    def eof_received(self):
        return False   # close once the client has


def _listener(bufsize: int = 0) -> socket.socket:
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if bufsize:
        tune(s, bufsize)
    s.bind(("127.0.0.1", 0))
    s.listen(4096)
    return s


async def _serve() -> None:
    loop = asyncio.get_running_loop()
    echo, bulk = _listener(), _listener(CHUNK)
    await loop.create_server(_Echo, sock=echo, backlog=4096)
    threading.Thread(target=_accept_loop, args=(bulk,), daemon=True).start()
    info = {"echo": echo.getsockname()[1], "bulk": bulk.getsockname()[1], "pid": os.getpid()}
    sys.stdout.write(json.dumps(info) + "\n")
    sys.stdout.flush()
    stop = asyncio.Event()

    def stdin_watch():
        try:
            while sys.stdin.buffer.read(65536):
                pass
        except OSError:
            pass
        loop.call_soon_threadsafe(stop.set)

    threading.Thread(target=stdin_watch, daemon=True).start()
    await stop.wait()


def main() -> int:
    import uvloop

    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    signal.signal(signal.SIGINT, signal.SIG_IGN)   # the demo stops us
    uvloop.run(_serve())
    os._exit(0)


if __name__ == "__main__":
    sys.exit(main())
