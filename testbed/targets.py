"""Target servers for forwarding tests, run in a separate process.

Run ``python -m testbed.targets --unix-dir DIR`` : it prints ONE JSON line on
stdout, e.g.::

    {"pid": 123, "tcp": {"echo": ["127.0.0.1", 40001], "sink": [...],
     "source": [...], "refuse": [...], "stats": [...]},
     "unix": {"echo": "DIR/echo.sock", "sink": ..., "source": ..., "refuse": ...}}

and serves until killed or until its stdin reaches EOF.  Servers:

* ``echo``   echoes everything; on client EOF finishes echoing, shutdown(SHUT_WR), close.
* ``sink``   reads to EOF, replies ``"<nbytes> <sha256hex>\\n"``, closes.
* ``source`` reads a line ``"<nbytes> <seed>\\n"``, sends ``pattern_chunks(seed, nbytes)``,
             shutdown(SHUT_WR), waits for client EOF, closes.
* ``refuse`` bound but not listening (TCP and unix): connect -> ECONNREFUSED.
* ``stats``  (TCP only) replies one JSON line of per-server counters and closes:
             ``{"echo": {"accepted": n, "active": n, "bytes_in": n, "bytes_out": n}, ...}``.

In-process use: ``with Targets() as t: t.tcp["echo"], t.unix["echo"], t.stats()``.
One thread per connection, blocking sockets, 1 MiB buffers.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import socket
import tempfile
import threading

from ._util import Service, report_and_serve, start_module, stop_child, tune_socket
from .data import pattern_chunks, set_cache_limit

BUFSIZE = 1 << 20
SERVERS = ("echo", "sink", "source")


class _Stats:
    def __init__(self):
        self.lock = threading.Lock()
        self.d = {k: {"accepted": 0, "active": 0, "bytes_in": 0, "bytes_out": 0} for k in SERVERS}

    def add(self, kind, key, n):
        with self.lock:
            self.d[kind][key] += n

    def snapshot(self):
        with self.lock:
            return {k: dict(v) for k, v in self.d.items()}


STATS = _Stats()


def _echo(conn):
    buf = bytearray(BUFSIZE)
    view = memoryview(buf)
    total = 0
    while True:
        n = conn.recv_into(view, BUFSIZE)
        if n == 0:
            break
        conn.sendall(view[:n])
        total += n
    STATS.add("echo", "bytes_in", total)
    STATS.add("echo", "bytes_out", total)
    conn.shutdown(socket.SHUT_WR)


def _sink(conn):
    buf = bytearray(BUFSIZE)
    view = memoryview(buf)
    h = hashlib.sha256()
    total = 0
    while True:
        n = conn.recv_into(view, BUFSIZE)
        if n == 0:
            break
        h.update(view[:n])
        total += n
    STATS.add("sink", "bytes_in", total)
    conn.sendall(f"{total} {h.hexdigest()}\n".encode())


def _source(conn):
    line = bytearray()
    while b"\n" not in line:
        b = conn.recv(4096)
        if not b:
            return
        line += b
        if len(line) > 4096:
            return
    head = line.split(b"\n", 1)[0].decode()
    nbytes_s, seed = head.split(" ", 1)
    nbytes = int(nbytes_s)
    sent = 0
    for c in pattern_chunks(seed, nbytes):
        conn.sendall(c)
        sent += len(c)
    STATS.add("source", "bytes_out", sent)
    conn.shutdown(socket.SHUT_WR)
    while conn.recv(65536):
        pass


_HANDLERS = {"echo": _echo, "sink": _sink, "source": _source}


def _serve_conn(kind, conn):
    try:
        tune_socket(conn)
        _HANDLERS[kind](conn)
    except (OSError, ValueError):
        pass
    finally:
        STATS.add(kind, "active", -1)
        try:
            conn.close()
        except OSError:
            pass


def _accept_loop(kind, lsock):
    while True:
        try:
            conn, _ = lsock.accept()
        except OSError:
            return
        STATS.add(kind, "accepted", 1)
        STATS.add(kind, "active", 1)
        threading.Thread(target=_serve_conn, args=(kind, conn), daemon=True,
                         name=f"{kind}-conn").start()


def _stats_loop(lsock):
    while True:
        try:
            conn, _ = lsock.accept()
        except OSError:
            return
        try:
            conn.sendall((json.dumps(STATS.snapshot()) + "\n").encode())
        except OSError:
            pass
        finally:
            conn.close()


def _tcp_listener(host="127.0.0.1", listen=True):
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    tune_socket(s)
    s.bind((host, 0))
    if listen:
        s.listen(512)
    return s


def _unix_listener(path, listen=True):
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    tune_socket(s)
    s.bind(path)
    os.chmod(path, 0o777)
    if listen:
        s.listen(512)
    return s


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m testbed.targets")
    ap.add_argument("--unix-dir", help="directory for the unix sockets (default: new temp dir)")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--cache-mb", type=int, default=1024,
                    help="pattern chunk cache for the source server (MiB, 0 = off)")
    args = ap.parse_args(argv)

    set_cache_limit(args.cache_mb << 20)
    unix_dir = args.unix_dir or tempfile.mkdtemp(prefix="sshpump-targets-")
    os.makedirs(unix_dir, exist_ok=True)
    os.chmod(unix_dir, 0o755)

    keep = []
    info = {"pid": os.getpid(), "tcp": {}, "unix": {}, "unix_dir": unix_dir}
    for kind in SERVERS:
        t = _tcp_listener(args.host)
        u = _unix_listener(os.path.join(unix_dir, f"{kind}.sock"))
        keep += [t, u]
        info["tcp"][kind] = list(t.getsockname()[:2])
        info["unix"][kind] = u.getsockname()
        for s in (t, u):
            threading.Thread(target=_accept_loop, args=(kind, s), daemon=True,
                             name=f"{kind}-accept").start()
    r = _tcp_listener(args.host, listen=False)
    ru = _unix_listener(os.path.join(unix_dir, "refuse.sock"), listen=False)
    keep += [r, ru]
    info["tcp"]["refuse"] = list(r.getsockname()[:2])
    info["unix"]["refuse"] = ru.getsockname()
    st = _tcp_listener(args.host)
    keep.append(st)
    info["tcp"]["stats"] = list(st.getsockname()[:2])
    threading.Thread(target=_stats_loop, args=(st,), daemon=True, name="stats").start()

    report_and_serve(info)


class Targets(Service):
    """Start ``python -m testbed.targets`` in a child process; with ``netns``
    inside that network namespace (``ip netns exec``), listening on ``host``.

    Attributes after start: ``tcp`` (dict kind -> (host, port); kinds echo,
    sink, source, refuse, stats), ``unix`` (dict kind -> socket path; echo,
    sink, source, refuse), ``unix_dir``, ``pid``, ``proc``.
    """

    def __init__(self, unix_dir: str | None = None, cache_mb: int = 1024, netns: str | None = None,
                 host: str = "127.0.0.1"):
        self.netns = netns
        self.host = host
        self._own_dir = unix_dir is None
        self.unix_dir = unix_dir or tempfile.mkdtemp(prefix="sshpump-targets-")
        os.chmod(self.unix_dir, 0o755)
        self.cache_mb = cache_mb
        self.proc = None
        self.tcp: dict = {}
        self.unix: dict = {}
        self.pid = None

    def start(self):
        prefix = ["ip", "netns", "exec", self.netns] if self.netns else []
        self.proc, info = start_module("testbed.targets", "--unix-dir", self.unix_dir,
                                       "--cache-mb", str(self.cache_mb), "--host", self.host, prefix=prefix)
        self.pid = info["pid"]
        self.tcp = {k: tuple(v) for k, v in info["tcp"].items()}
        self.unix = dict(info["unix"])
        return self

    def stats(self) -> dict:
        """Per-server counters: accepted, active, bytes_in, bytes_out."""
        with socket.create_connection(self.tcp["stats"], timeout=10) as s:
            data = b""
            while True:
                b = s.recv(65536)
                if not b:
                    break
                data += b
        return json.loads(data)

    def stop(self):
        if self.proc is not None:
            stop_child(self.proc)
            self.proc = None
        if self._own_dir:
            shutil.rmtree(self.unix_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
