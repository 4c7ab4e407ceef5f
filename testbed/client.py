"""Client-side helpers that drive the target servers (see testbed.targets).

All helpers take a connected, blocking ``socket.socket`` (or anything with
``sendall``/``recv_into``/``shutdown``) and raise ``AssertionError`` with a
clear message when the data that came back is wrong.
"""
from __future__ import annotations

import hashlib
import socket
import threading
import time
from typing import Union

from .data import DEFAULT_CHUNK, pattern_chunks, pattern_digest

__all__ = [
    "connect",
    "recv_exactly",
    "recv_until_eof",
    "echo_roundtrip",
    "upload_and_verify",
    "download_and_verify",
    "download_until_cut",
]

BUFSIZE = 1 << 20
Address = Union[tuple, str, bytes]


def connect(addr: Address, timeout: float | None = 30.0) -> socket.socket:
    """Connect to ``(host, port)`` over TCP or to a unix-socket path.  The
    returned socket is blocking with ``timeout`` as its per-operation timeout."""
    if isinstance(addr, (str, bytes)):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    else:
        s = socket.create_connection(addr, timeout=timeout)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return s
    s.settimeout(timeout)
    try:
        s.connect(addr)
    except BaseException:
        s.close()
        raise
    return s


def recv_exactly(sock, n: int) -> bytes:
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        r = sock.recv_into(view[got:], min(n - got, BUFSIZE))
        if r == 0:
            raise AssertionError(f"connection closed after {got} of {n} expected bytes")
        got += r
    return bytes(buf)


def recv_until_eof(sock, limit: int = 1 << 20) -> bytes:
    """Read until EOF (at most ``limit`` bytes, else AssertionError)."""
    out = bytearray()
    while True:
        b = sock.recv(65536)
        if not b:
            return bytes(out)
        out += b
        if len(out) > limit:
            raise AssertionError(f"peer sent more than {limit} bytes before EOF")


def echo_roundtrip(sock, payload: bytes, *, half_close: bool = False) -> bytes:
    """Send ``payload`` to an echo server while concurrently reading the echo;
    assert the echo equals ``payload`` (compared incrementally, nothing big is
    buffered).  With ``half_close=True`` also shutdown(SHUT_WR) after sending
    and assert the server then sends EOF.  Returns ``len(payload)``."""
    if not isinstance(payload, (bytes, bytearray)):
        payload = bytes(payload)
    err: list[BaseException] = []

    def sender():
        try:
            view = memoryview(payload)
            for off in range(0, len(view), BUFSIZE):
                sock.sendall(view[off:off + BUFSIZE])
            if half_close:
                sock.shutdown(socket.SHUT_WR)
        except BaseException as e:  # reported below
            err.append(e)

    t = threading.Thread(target=sender, name="echo-sender", daemon=True)
    t.start()
    n = len(payload)
    buf = bytearray(BUFSIZE)
    view = memoryview(buf)
    got = 0
    mismatch = None
    try:
        while got < n:
            r = sock.recv_into(view, min(n - got, BUFSIZE))
            if r == 0:
                break
            if mismatch is None and (buf if r == BUFSIZE else buf[:r]) != payload[got:got + r]:
                mismatch = got + next(i for i in range(r) if buf[i] != payload[got + i])
            got += r
    finally:
        t.join()
    if err:
        raise err[0]
    if got != n:
        raise AssertionError(f"echo: connection closed after {got} of {n} expected bytes")
    if mismatch is not None:
        raise AssertionError(f"echo mismatch: sent {n} bytes; first difference at offset {mismatch}")
    if half_close:
        extra = recv_until_eof(sock)
        if extra:
            raise AssertionError(f"echo server sent {len(extra)} unexpected bytes before EOF")
    return n


def _paced(got: int, t0: float, rate: float | None, progress) -> None:
    """After a read: report progress, and sleep to keep to ``rate`` bytes/s."""
    if progress is not None:
        progress(got)
    if rate:
        ahead = got / rate - (time.monotonic() - t0)
        if ahead > 0:
            time.sleep(ahead)


def upload_and_verify(sock, nbytes: int, seed: str, *, chunk: int = DEFAULT_CHUNK) -> int:
    """Stream ``nbytes`` of pattern ``seed`` to a sink server, half-close,
    read its ``"<nbytes> <sha256hex>\\n"`` reply and compare.  Returns nbytes."""
    for c in pattern_chunks(seed, nbytes, chunk):
        sock.sendall(c)
    sock.shutdown(socket.SHUT_WR)
    reply = recv_until_eof(sock, 4096)
    expected = f"{nbytes} {pattern_digest(seed, nbytes, chunk)}\n".encode()
    if reply != expected:
        raise AssertionError(
            f"sink reply mismatch for {nbytes} bytes of seed {seed!r}: expected {expected!r}, got {reply!r}")
    return nbytes


def download_and_verify(sock, nbytes: int, seed: str, *, chunk: int = DEFAULT_CHUNK,
                        rate: float | None = None, progress=None) -> int:
    """Ask a source server for ``nbytes`` of pattern ``seed``, read until EOF,
    check byte count and sha256, then half-close our side.  Returns nbytes.
    (The source server always generates with the default 1 MiB chunking;
    ``chunk`` only affects how the expected digest is computed.)
    ``rate``: read at most that many bytes per second (a slow reader keeps the
    transfer in flight); ``progress(got)`` is called after every read."""
    sock.sendall(f"{nbytes} {seed}\n".encode())
    h = hashlib.sha256()
    buf = bytearray(BUFSIZE)
    view = memoryview(buf)
    got = 0
    t0 = time.monotonic()
    while True:
        r = sock.recv_into(view, BUFSIZE)
        if r == 0:
            break
        h.update(view[:r])
        got += r
        _paced(got, t0, rate, progress)
    try:
        sock.shutdown(socket.SHUT_WR)
    except OSError:
        pass
    if got != nbytes:
        raise AssertionError(f"download of seed {seed!r}: expected {nbytes} bytes, got {got} before EOF")
    exp = pattern_digest(seed, nbytes, chunk)
    if h.hexdigest() != exp:
        raise AssertionError(f"download of seed {seed!r}: sha256 mismatch over {nbytes} bytes")
    return nbytes


def download_until_cut(sock, nbytes: int, seed: str, *, rate: float | None = None, progress=None,
                       limit_s: float = 60.0) -> tuple[str, int]:
    """For a download that is meant to be cut: ask a source server for
    ``nbytes`` of pattern ``seed`` and read until the stream ends, checking
    every byte against the pattern as it arrives. Returns ("eof" | "reset",
    bytes received); AssertionError on a wrong byte or if the stream neither
    ends nor is reset within ``limit_s``. ``rate``/``progress`` as in
    download_and_verify."""
    sock.sendall(f"{nbytes} {seed}\n".encode())
    sock.settimeout(limit_s)
    expected = pattern_chunks(seed, nbytes)
    chunk, pos = b"", 0
    buf = bytearray(BUFSIZE)
    view = memoryview(buf)
    got = 0
    t0 = time.monotonic()
    while True:
        try:
            r = sock.recv_into(view, BUFSIZE)
        except ConnectionResetError:
            return "reset", got
        except TimeoutError:
            raise AssertionError(f"download of seed {seed!r}: neither ended nor reset within {limit_s}s") from None
        if r == 0:
            return "eof", got
        i = 0
        while i < r:
            if pos == len(chunk):
                chunk, pos = next(expected, b""), 0
                if not chunk:
                    raise AssertionError(f"download of seed {seed!r}: more than {nbytes} bytes")
            n = min(r - i, len(chunk) - pos)
            if view[i:i + n] != chunk[pos:pos + n]:
                raise AssertionError(f"download of seed {seed!r}: wrong bytes within {got + i}..{got + i + n}")
            i += n
            pos += n
        got += r
        _paced(got, t0, rate, progress)
