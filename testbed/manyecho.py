"""An echo server for tens of thousands of concurrent connections.

The targets' echo (testbed.targets) spends a thread and a 1 MiB buffer per
connection: 10,000 connections would cost 10,000 threads and some 10 GiB.
This one is a single event loop (uvloop when installed) at a few KiB per
connection, in its own process, with its own RLIMIT_NOFILE raised to the
hard limit. It echoes, and after the client's EOF finishes echoing and
closes. It counts connections: accepted, active, and the most active at once.

    with ManyEcho() as echo:
        echo.addr          # (host, port)
        echo.stats()       # {"accepted": n, "active": n, "peak": n}

Run as ``python -m testbed.manyecho``: one JSON line ``{"pid": .., "addr": [h, p]}``
on stdout; then each line ``stats`` on stdin is answered with one JSON line;
EOF on stdin stops it.
"""
from __future__ import annotations

import asyncio
import json
import os
import resource
import sys

from ._util import ChildService, start_module

COUNTS = {"accepted": 0, "active": 0, "peak": 0}


class _Echo(asyncio.Protocol):
    def connection_made(self, transport):
        self.t = transport
        COUNTS["accepted"] += 1
        COUNTS["active"] += 1
        COUNTS["peak"] = max(COUNTS["peak"], COUNTS["active"])

    def data_received(self, data):
        self.t.write(data)

    # A client that does not read must not make us buffer without end.
    def pause_writing(self):
        self.t.pause_reading()

    def resume_writing(self):
        self.t.resume_reading()

    def eof_received(self):
        return False  # close once the echo is written

    def connection_lost(self, exc):
        COUNTS["active"] -= 1


async def _serve(host):
    loop = asyncio.get_running_loop()
    server = await loop.create_server(_Echo, host, 0, backlog=4096)
    addr = server.sockets[0].getsockname()[:2]
    sys.stdout.write(json.dumps({"pid": os.getpid(), "addr": list(addr)}) + "\n")
    sys.stdout.flush()
    done = loop.create_future()
    pending = b""

    def command():
        nonlocal pending
        data = os.read(0, 4096)
        if not data:
            loop.remove_reader(0)
            done.set_result(None)
            return
        pending += data
        while b"\n" in pending:
            line, pending = pending.split(b"\n", 1)
            if line.strip() == b"stats":
                sys.stdout.write(json.dumps(COUNTS) + "\n")
                sys.stdout.flush()

    loop.add_reader(0, command)
    await done
    server.close()


def main():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    host = sys.argv[1] if len(sys.argv) > 1 else "127.0.0.1"
    try:
        import uvloop
        uvloop.run(_serve(host))
    except ImportError:
        asyncio.run(_serve(host))


class ManyEcho(ChildService):
    """``python -m testbed.manyecho`` in a child process; ``addr``, ``pid``,
    ``stats()``."""

    def __init__(self, host: str = "127.0.0.1"):
        self.host = host
        self.proc = None
        self.addr = None
        self.pid = None

    def start(self):
        self.proc, info = start_module("testbed.manyecho", self.host)
        self.pid = info["pid"]
        self.addr = tuple(info["addr"])
        return self

    def stats(self) -> dict:
        self.proc.stdin.write(b"stats\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"testbed.manyecho exited with {self.proc.poll()}")
        return json.loads(line)


if __name__ == "__main__":
    main()
