"""What the demo pushes through a tunnel: a checksummed upload and download
(see target.py for the protocol) and a burst of short echo connections.

Each takes ``advance(n)``, called as work gets done (bytes or connections),
for the progress display; each returns a Result.
"""
from __future__ import annotations

import asyncio
import hashlib
import os
import socket
import time
from dataclasses import dataclass

from .target import CHUNK, pattern, recv_exactly, tune

TIMEOUT = 60.0


@dataclass
class Result:
    what: str          # "upload", "download", "connections"
    amount: int        # bytes, or connections completed
    seconds: float
    ok: bool           # sha256 matched / every connection echoed
    detail: str = ""   # what went wrong, if anything

    @property
    def rate(self) -> float:
        """MB/s (10**6 bytes) for transfers, connections/s for the burst."""
        if self.seconds <= 0:
            return 0.0
        return self.amount / self.seconds / (1e6 if self.what != "connections" else 1)


def _connect(port: int) -> socket.socket:
    s = socket.socket()
    tune(s, CHUNK)    # before connect: the window scale is agreed in the handshake
    s.settimeout(TIMEOUT)
    s.connect(("127.0.0.1", port))
    return s


def upload(port: int, size: int, expected: str, advance) -> Result:
    """Send ``size`` bytes of the pattern to the sink (``port``: bulk); it answers the sha256
    of what arrived, which must be ``expected`` (computed here beforehand)."""
    t0 = time.perf_counter()
    with _connect(port) as s:
        s.sendall(b"U" + size.to_bytes(8, "big"))
        for chunk in pattern(size):
            s.sendall(chunk)
            advance(len(chunk))
        try:
            got = recv_exactly(s, 32).hex()
        except EOFError as e:
            return Result("upload", size, time.perf_counter() - t0, False, f"no checksum back: {e}")
    secs = time.perf_counter() - t0
    ok = got == expected
    return Result("upload", size, secs, ok, "" if ok else f"sha256 {got} at the far end, sent {expected}")


def download(port: int, size: int, expected: str, advance) -> Result:
    """Receive ``size`` bytes of the pattern from the source, hashing as they
    arrive; the sha256 must be ``expected``."""
    t0 = time.perf_counter()
    h, buf = hashlib.sha256(), bytearray(CHUNK)
    view, got = memoryview(buf), 0
    with _connect(port) as s:
        s.sendall(b"D" + size.to_bytes(8, "big"))
        while got < size:
            k = s.recv_into(view[:min(CHUNK, size - got)])
            if not k:
                break
            h.update(view[:k])
            got += k
            advance(k)
    secs = time.perf_counter() - t0
    if got < size:
        return Result("download", got, secs, False, f"connection closed after {got} of {size} bytes")
    digest = h.hexdigest()
    ok = digest == expected
    return Result("download", size, secs, ok, "" if ok else f"received sha256 {digest}, sent {expected}")


async def _burst(port: int, count: int, parallel: int, advance) -> tuple[int, list[str]]:
    todo = iter(range(count))
    done, errors = 0, []

    async def one(i: int) -> None:
        payload = b"demo %08d " % i + os.urandom(16).hex().encode()
        async with asyncio.timeout(TIMEOUT):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            try:
                writer.write(payload)
                if await reader.readexactly(len(payload)) != payload:
                    raise ValueError("echo differs")
            finally:
                writer.close()

    async def lane() -> None:
        nonlocal done
        for i in todo:
            try:
                await one(i)
                done += 1
            except (OSError, EOFError, ValueError, TimeoutError, asyncio.IncompleteReadError) as e:
                errors.append(f"connection {i}: {type(e).__name__}: {e}")
            advance(1)

    await asyncio.gather(*(lane() for _ in range(parallel)))
    return done, errors


def burst(port: int, count: int, parallel: int, advance) -> Result:
    """``count`` connections to the echo ``port``, ``parallel`` at a time: each connects, sends
    ~40 bytes, reads them back and closes."""
    t0 = time.perf_counter()
    import uvloop

    done, errors = uvloop.run(_burst(port, count, parallel, advance))
    secs = time.perf_counter() - t0
    detail = "" if not errors else f"{len(errors)} failed, first: {errors[0]}"
    return Result("connections", done, secs, not errors, detail)
