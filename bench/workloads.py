"""Client side of every workload.  Each ``run_*`` returns a dict with the
headline ``value`` plus extra figures; it raises on a wrong byte or a timeout.

Throughput clients move data at C speed (``sendall`` of a pre-generated
16 MiB buffer, ``recv_into`` + ``zlib.crc32``; both release the GIL), so the
``direct`` row shows the ceiling of client + servers (> 1.5 GB/s here).
Request/response, churn and idle clients use asyncio on uvloop in this process.
"""
from __future__ import annotations

import asyncio
import functools
import re
import socket
import subprocess
import threading
import time

from . import procstat
from .servers import pattern, recv_crc, stream_crc

BUF = 1 << 20
IO_TIMEOUT = 60.0


@functools.lru_cache(maxsize=1)
def _pattern() -> bytes:
    return pattern()


@functools.lru_cache(maxsize=16)
def expected_crc(n: int) -> int:
    return stream_crc(n, _pattern())


def _connect(addr, timeout=IO_TIMEOUT):
    s = socket.create_connection(addr, timeout=timeout)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    for opt in (socket.SO_RCVBUF, socket.SO_SNDBUF):
        s.setsockopt(socket.SOL_SOCKET, opt, BUF)
    return s


def _read_line(s) -> bytes:
    out = b""
    while b"\n" not in out:
        b = s.recv(4096)
        if not b:
            raise AssertionError(f"connection closed before reply (got {out!r})")
        out += b
    return out.split(b"\n", 1)[0]


def upload(addr, n: int) -> None:
    pat = memoryview(_pattern())
    with _connect(addr) as s:
        s.sendall(f"{n}\n".encode())
        left = n
        while left:
            k = min(left, len(pat))
            s.sendall(pat[:k])
            left -= k
        got = _read_line(s).decode()
    want = f"{n} {expected_crc(n)}"
    if got != want:
        raise AssertionError(f"sink: expected {want!r}, got {got!r}")


def download(addr, n: int) -> None:
    with _connect(addr) as s:
        s.sendall(f"{n}\n".encode())
        got, crc = recv_crc(s, n)
    if got != n or crc != expected_crc(n):
        raise AssertionError(f"source: got {got} of {n} bytes, crc {'ok' if crc == expected_crc(n) else 'BAD'}")


def _cpu_wrap(pids, fn):
    c0 = procstat.cpu_seconds(pids) if pids else None
    t0 = time.perf_counter()
    fn()
    dt = time.perf_counter() - t0
    c1 = procstat.cpu_seconds(pids) if pids else None
    return dt, (None if c0 is None else c1 - c0)


def run_bulk(run, target_i: int, n: int, direction: str) -> dict:
    fn = upload if direction == "up" else download
    expected_crc(n)          # pattern + checksum computed outside the timed region
    addr = run.addr(target_i, 0)
    dt, cpu = _cpu_wrap(run.pids(), lambda: fn(addr, n))
    out = {"value": n / dt / 1e6, "seconds": dt, "bytes": n}
    if cpu is not None:
        out["cpu_s"] = cpu
        out["cpu_s_per_gb"] = cpu / (n / 1e9)
    return out


def run_parallel(run, target_i: int, streams: int, per_stream: int) -> dict:
    expected_crc(per_stream)
    errors: list[BaseException] = []
    barrier = threading.Barrier(streams + 1)

    def worker(k):
        try:
            barrier.wait(30)
            upload(run.addr(target_i, k), per_stream)
        except BaseException as e:
            errors.append(e)

    ths = [threading.Thread(target=worker, args=(k,), daemon=True) for k in range(streams)]
    for t in ths:
        t.start()
    pids = run.pids()
    c0 = procstat.cpu_seconds(pids) if pids else None
    barrier.wait(30)
    t0 = time.perf_counter()
    deadline = t0 + IO_TIMEOUT * 3
    for t in ths:
        t.join(max(0.1, deadline - time.perf_counter()))
    dt = time.perf_counter() - t0
    if any(t.is_alive() for t in ths):
        raise TimeoutError(f"{sum(t.is_alive() for t in ths)} of {streams} streams still running after {dt:.0f}s")
    if errors:
        raise errors[0]
    total = streams * per_stream
    out = {"value": total / dt / 1e6, "seconds": dt, "bytes": total}
    if c0 is not None:
        out["cpu_s_per_gb"] = (procstat.cpu_seconds(pids) - c0) / (total / 1e9)
    return out


# -- asyncio workloads --------------------------------------------------------
def _arun(coro):
    try:
        import uvloop
        return uvloop.run(coro)
    except ImportError:
        return asyncio.run(coro)


async def _open(addr):
    r, w = await asyncio.wait_for(asyncio.open_connection(*addr), 30)
    sock = w.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return r, w


def _pct(xs, q):
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def run_rr(run, target_i: int, conc: int, duration: float, size: int = 64) -> dict:
    async def main():
        conns = await asyncio.gather(*[_open(run.addr(target_i, k)) for k in range(conc)])
        msg = b"m" * size
        for r, w in conns:                 # warm-up round trip on every connection
            w.write(msg)
            await asyncio.wait_for(r.readexactly(size), 30)
        lats: list[list[float]] = [[] for _ in conns]
        t_end = time.perf_counter() + duration

        async def loop(k, r, w):
            pc = time.perf_counter
            out = lats[k]
            while pc() < t_end:
                t0 = pc()
                w.write(msg)
                got = await asyncio.wait_for(r.readexactly(size), 30)
                out.append(pc() - t0)
                if got != msg:
                    raise AssertionError("echo mismatch")

        t0 = time.perf_counter()
        await asyncio.gather(*[loop(k, r, w) for k, (r, w) in enumerate(conns)])
        dt = time.perf_counter() - t0
        for r, w in conns:
            w.close()
        allv = [x for l in lats for x in l]
        return {"value": len(allv) / dt, "p50_us": _pct(allv, 0.5) * 1e6, "p99_us": _pct(allv, 0.99) * 1e6,
                "count": len(allv), "seconds": dt}

    return _arun(main())


def run_churn(run, target_i: int, conc: int, duration: float, size: int = 64) -> dict:
    async def main():
        msg = b"c" * size
        t_end = time.perf_counter() + duration
        done = [0]
        errors: list[str] = []
        lat: list[float] = []

        async def loop(k):
            pc = time.perf_counter
            while pc() < t_end:
                t0 = pc()
                try:
                    r, w = await _open(run.addr(target_i, k))
                    w.write(msg)
                    got = await asyncio.wait_for(r.readexactly(size), 30)
                    w.close()
                    if got != msg:
                        raise AssertionError("echo mismatch")
                    done[0] += 1
                    lat.append(pc() - t0)
                except (OSError, asyncio.IncompleteReadError, asyncio.TimeoutError, AssertionError) as e:
                    errors.append(type(e).__name__ + ": " + str(e))
                    if len(errors) > 50:
                        raise RuntimeError(f"churn: {len(errors)} failed connections, e.g. {errors[0]}")
                    await asyncio.sleep(0.01)

        t0 = time.perf_counter()
        await asyncio.gather(*[loop(k) for k in range(conc)])
        dt = time.perf_counter() - t0
        return {"value": done[0] / dt, "count": done[0], "errors": len(errors),
                "first_error": errors[0] if errors else None,
                "p50_ms": (_pct(lat, 0.5) or 0) * 1e3, "p99_ms": (_pct(lat, 0.99) or 0) * 1e3}

    return _arun(main())


def run_idle(run, target_i: int, n: int, timeout: float) -> dict:
    """Open ``n`` connections (one 8-byte round trip each, so every channel is
    really open), hold them, and read the RSS growth of the forwarder's processes."""
    pids = run.pids()

    async def main():
        rss0 = procstat.rss_bytes(pids) if pids else None
        sem = asyncio.Semaphore(64)
        conns = []
        t_end = time.perf_counter() + timeout

        async def one(k):
            async with sem:
                if time.perf_counter() > t_end:
                    raise TimeoutError("idle: time budget exhausted while opening")
                r, w = await _open(run.addr(target_i, k))
                conns.append(w)
                w.write(b"12345678")
                await asyncio.wait_for(r.readexactly(8), 30)

        t0 = time.perf_counter()
        try:
            # Collect every outcome so no task is left with an unretrieved
            # error; report the first failure.
            outcomes = await asyncio.gather(*[one(k) for k in range(n)], return_exceptions=True)
            failed = [o for o in outcomes if isinstance(o, BaseException)]
            if failed:
                raise failed[0]
            dt = time.perf_counter() - t0
            await asyncio.sleep(0.5)
            rss1 = procstat.rss_bytes(pids) if pids else None
        finally:
            for w in conns:
                w.close()
        await asyncio.sleep(0.2)
        out = {"open_per_s": n / dt, "open_seconds": dt, "connections": n}
        if rss0 is not None:
            out.update(value=(rss1 - rss0) / n / 1024, rss_before_mb=rss0 / 2**20, rss_after_mb=rss1 / 2**20)
        else:
            out["value"] = None
        return out

    return _arun(main())


_TPS = re.compile(r"tps = ([0-9.]+) \((?:without initial connection time|including connections establishing|excluding connections establishing)?\)?")


def run_pgbench(run, target_i: int, pg, args: list[str], seconds: int) -> dict:
    host, port = run.addr(target_i, 0)
    argv = pg.pgbench_command("-n", "-S", *args, "-T", str(seconds), host=host, port=port)
    r = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 60, env=pg._env())
    m = re.search(r"tps = ([0-9.]+)", r.stdout)
    if r.returncode != 0 or not m:
        raise RuntimeError(f"pgbench exit {r.returncode}: {(r.stderr or r.stdout).strip()[-300:]}")
    failed = re.search(r"number of failed transactions: (\d+)", r.stdout)
    lat = re.search(r"latency average = ([0-9.]+) ms", r.stdout)
    return {"value": float(m.group(1)), "failed": int(failed.group(1)) if failed else 0,
            "latency_ms": float(lat.group(1)) if lat else None}
