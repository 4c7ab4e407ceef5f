"""A TCP proxy that adds latency without becoming the bottleneck (this
kernel has no ``tc netem``): a long link on loopback.

Run ``python -m testbed.delayproxy --to HOST:PORT --delay SECONDS``: it prints
ONE JSON line ``{"pid": ..., "listen": [host, port]}`` and serves until its
stdin reaches EOF. Every accepted connection is relayed to HOST:PORT; each
direction delays every chunk by ``delay`` (so the round trip grows by twice
that).

It pipelines: a reader thread takes whatever the socket has (up to 1 MiB),
stamps it with its release time and queues it at once; a writer thread
sends each chunk when its time comes. The proxy's own buffering is what the
link holds in flight, so its throughput is not bounded by window/RTT as a
tunnel's is (``python -m testbed.delayproxy`` + a direct TCP transfer through
it shows that; bench/longlink.py reports it). Queued bytes per direction are
capped (``--max-queue``, default 256 MiB); beyond that the reader waits,
which TCP turns into backpressure.

In-process use: ``with DelayProxy(target, delay) as d: d.listen``.
"""
from __future__ import annotations

import argparse
import collections
import os
import socket
import threading
import time

from ._util import ChildService, report_and_serve, start_module, tune_socket

CHUNK = 1 << 20


class _Pipe:
    """One direction of one connection: src -> (delay) -> dst."""

    def __init__(self, src, dst, delay, max_queue):
        self.src, self.dst, self.delay, self.max_queue = src, dst, delay, max_queue
        self.q = collections.deque()
        self.queued = 0
        self.cv = threading.Condition()
        self.eof = False

    def read_loop(self):
        try:
            while True:
                data = self.src.recv(CHUNK)
                with self.cv:
                    while self.queued >= self.max_queue:
                        self.cv.wait()
                    self.q.append((time.monotonic() + self.delay, data))
                    self.queued += len(data)
                    self.cv.notify_all()
                if not data:
                    return
        except OSError:
            with self.cv:
                self.q.append((time.monotonic() + self.delay, None))  # reset
                self.cv.notify_all()

    def write_loop(self):
        try:
            while True:
                with self.cv:
                    while not self.q:
                        self.cv.wait()
                    due, data = self.q[0]
                wait = due - time.monotonic()
                if wait > 0:
                    time.sleep(wait)
                with self.cv:
                    self.q.popleft()
                    self.queued -= len(data or b"")
                    self.cv.notify_all()
                if data is None:  # the other side was reset: pass it on
                    self.dst.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")
                    self.dst.close()
                    return
                if not data:
                    self.dst.shutdown(socket.SHUT_WR)
                    return
                self.dst.sendall(data)
        except OSError:
            pass


def _relay(client, target, delay, max_queue):
    try:
        upstream = socket.create_connection(target)
    except OSError:
        client.close()
        return
    for s in (client, upstream):
        tune_socket(s, 4 << 20)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    for src, dst in ((client, upstream), (upstream, client)):
        pipe = _Pipe(src, dst, delay, max_queue)
        threading.Thread(target=pipe.read_loop, daemon=True).start()
        threading.Thread(target=pipe.write_loop, daemon=True).start()


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m testbed.delayproxy")
    ap.add_argument("--to", required=True, help="HOST:PORT to relay to")
    ap.add_argument("--delay", type=float, required=True, help="one-way delay in seconds")
    ap.add_argument("--listen-host", default="127.0.0.1")
    ap.add_argument("--max-queue", type=int, default=256 << 20, help="bytes queued per direction")
    a = ap.parse_args(argv)
    host, port = a.to.rsplit(":", 1)
    lsock = socket.socket()
    lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    lsock.bind((a.listen_host, 0))
    lsock.listen(128)

    def accept_loop():
        while True:
            conn, _ = lsock.accept()
            _relay(conn, (host, int(port)), a.delay, a.max_queue)

    threading.Thread(target=accept_loop, daemon=True).start()
    report_and_serve({"pid": os.getpid(), "listen": list(lsock.getsockname()[:2])})


class DelayProxy(ChildService):
    """``python -m testbed.delayproxy`` in a child process; ``listen`` is its address."""

    def __init__(self, target, delay: float):
        self.target, self.delay = tuple(target), delay
        self.listen = None

    def start(self):
        self.proc, info = start_module("testbed.delayproxy", "--to", f"{self.target[0]}:{self.target[1]}",
                                       "--delay", str(self.delay))
        self.listen = tuple(info["listen"])
        return self


if __name__ == "__main__":
    main()
