"""Benchmark target servers, run as ``python -m bench.servers`` (one process).

Prints ONE JSON line ``{"pid": ..., "echo": [h, p], "sink": [h, p], "source": [h, p]}``
and serves until stdin reaches EOF.

* ``echo``   uvloop/asyncio echo (cheap per connection: fine for 10,000 idle
             connections and for request/response rates).
* ``sink``   reads a line ``"<nbytes>\\n"``, then exactly that many bytes, replies
             ``"<nbytes> <crc32>\\n"``, waits for the client to close.  (A length
             header rather than EOF: sshtunnel does not forward half-close.)
* ``source`` reads ``"<nbytes>\\n"``, sends ``nbytes`` of a fixed pseudo-random
             buffer (``pattern(BUF)`` repeated), shutdown(SHUT_WR), waits for EOF.

Why not testbed.targets: its sink/source hash with SHA-256 (~1.5 GB/s on one
core here) and its echo spends one thread and 1 MiB per connection.  The bench
needs the *direct* path well above any tunnel, so these servers checksum with
zlib.crc32 (~3.3 GB/s, releases the GIL) over sendall/recv_into of 1 MiB.
Correctness with SHA-256 is the tests' job; crc32 here catches a dropped,
duplicated or reordered chunk.
"""
from __future__ import annotations

import asyncio
import json
import os
import socket
import sys
import threading
import zlib

from testbed._util import tune_socket

BUFSIZE = 1 << 20
PATTERN_SIZE = 16 << 20   # the source repeats this buffer


def pattern() -> bytes:
    """16 MiB of deterministic pseudo-random bytes (shared by client and server)."""
    import hashlib
    return hashlib.shake_128(b"sshpump-bench").digest(PATTERN_SIZE)


def stream_crc(nbytes: int, buf: bytes) -> int:
    """crc32 of the first ``nbytes`` of ``buf`` repeated."""
    crc = 0
    mv = memoryview(buf)
    full, rest = divmod(nbytes, len(buf))
    for _ in range(full):
        crc = zlib.crc32(mv, crc)
    return zlib.crc32(mv[:rest], crc)


def recv_crc(sock, want: int, crc: int = 0) -> tuple[int, int]:
    """Receive up to ``want`` bytes (fewer at EOF); return (count, running crc32)."""
    view = memoryview(bytearray(BUFSIZE))
    got = 0
    while got < want:
        n = sock.recv_into(view, min(BUFSIZE, want - got))
        if n == 0:
            break
        crc = zlib.crc32(view[:n], crc)
        got += n
    return got, crc


def _read_line(conn) -> bytes:
    line = b""
    while b"\n" not in line:
        b = conn.recv(4096)
        if not b or len(line) > 4096:
            raise ValueError("no header line")
        line += b
    return line


def _sink(conn):
    line = _read_line(conn)
    head, extra = line.split(b"\n", 1)
    want = int(head)
    got, crc = recv_crc(conn, want - len(extra), zlib.crc32(extra))
    total = len(extra) + got
    conn.sendall(f"{total} {crc}\n".encode())
    while conn.recv(65536):
        pass


def _source(conn, pat):
    nbytes = int(_read_line(conn).split(b"\n", 1)[0])
    mv = memoryview(pat)
    left = nbytes
    while left > 0:
        k = min(left, len(pat))
        conn.sendall(mv[:k])
        left -= k
    conn.shutdown(socket.SHUT_WR)
    while conn.recv(65536):
        pass


def _serve(handler, conn, *args):
    try:
        tune_socket(conn, BUFSIZE)
        handler(conn, *args)
    except (OSError, ValueError):
        pass
    finally:
        conn.close()


def _accept_loop(lsock, handler, *args):
    while True:
        try:
            conn, _ = lsock.accept()
        except OSError:
            return
        threading.Thread(target=_serve, args=(handler, conn, *args), daemon=True).start()


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
        return False  # close after EOF (echo done)


def _listener():
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    tune_socket(s, BUFSIZE)
    s.bind(("127.0.0.1", 0))
    s.listen(4096)
    return s


async def _amain(info):
    loop = asyncio.get_running_loop()
    es = _listener()
    server = await loop.create_server(_Echo, sock=es, backlog=4096)
    info["echo"] = list(es.getsockname()[:2])
    sys.stdout.write(json.dumps(info) + "\n")
    sys.stdout.flush()
    stop = asyncio.Event()

    def _stdin_watch():
        try:
            while sys.stdin.buffer.read(65536):
                pass
        except OSError:
            pass
        loop.call_soon_threadsafe(stop.set)

    threading.Thread(target=_stdin_watch, daemon=True).start()
    await stop.wait()
    server.close()


def main():
    try:
        import resource
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ImportError, ValueError, OSError):
        pass
    pat = pattern()
    info = {"pid": os.getpid()}
    sink, source = _listener(), _listener()
    info["sink"] = list(sink.getsockname()[:2])
    info["source"] = list(source.getsockname()[:2])
    threading.Thread(target=_accept_loop, args=(sink, _sink), daemon=True).start()
    threading.Thread(target=_accept_loop, args=(source, _source, pat), daemon=True).start()
    try:
        import uvloop
        uvloop.run(_amain(info))
    except ImportError:
        asyncio.run(_amain(info))
    os._exit(0)


if __name__ == "__main__":
    main()
