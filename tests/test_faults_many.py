"""Fault suite (issue 7): 10,000 clients at once through one sshpump with its
default workers, every byte checked, and nothing left behind afterwards."""
from __future__ import annotations

import asyncio
import resource
import socket
import time

import pytest
import uvloop

from helpers import Pump, base_args, clean_env, extra_sshd, fd_count, tcp_spec
from testbed.client import echo_roundtrip
from testbed.data import pattern_bytes
from testbed.manyecho import ManyEcho

N = 10_000
OPENING = 256        # connects in flight at once (the rest wait their turn, then stay open)
LIMIT_S = 480.0      # the whole crowd: opened, checked, closed (~60 s on a quiet 2-core machine, 120+ under load)


def _payload(i: int, phase: str) -> bytes:
    """Distinct per client and phase, 70 to 1,093 bytes."""
    return b"%05d %s:" % (i, phase.encode()) + pattern_bytes(f"many-{phase}-{i}", 64 + (i * 7919) % 1024)


async def _crowd(addr, n, echo):
    """Open n connections (one round trip each, so every channel is open),
    then -- all of them open -- a round trip each with a fresh payload, then
    all half-close and read the echo's EOF. Returns (seconds per phase, the
    echo's stats while all were open)."""
    host, port = addr
    sem = asyncio.Semaphore(OPENING)
    opened, checked = asyncio.Event(), asyncio.Event()
    counts = {"opened": 0, "checked": 0}
    marks = {}

    def arrive(phase, event):
        counts[phase] += 1
        if counts[phase] == n:
            marks[phase] = time.monotonic()
            event.set()

    async def client(i):
        async with sem:
            r, w = await asyncio.open_connection(host, port)
        try:
            for phase, barrier in (("opened", opened), ("checked", checked)):
                data = _payload(i, phase)
                w.write(data)
                assert await r.readexactly(len(data)) == data, f"client {i}: wrong echo ({phase})"
                arrive(phase, barrier)
                await barrier.wait()
            w.write_eof()
            assert await r.read(1) == b"", f"client {i}: bytes after its echo"
        finally:
            w.close()

    t0 = time.monotonic()
    try:
        async with asyncio.timeout(LIMIT_S):
            async with asyncio.TaskGroup() as tg:
                for i in range(n):
                    tg.create_task(client(i))
                await checked.wait()
                at_peak = await asyncio.to_thread(echo.stats)
    except TimeoutError:
        raise AssertionError(f"crowd not done in {LIMIT_S:.0f}s: {counts}, "
                             f"echo {echo.stats()}, phases {marks}, t0 {t0}") from None
    end = time.monotonic()
    return {"open": marks["opened"] - t0, "check": marks["checked"] - marks["opened"],
            "close": end - marks["checked"]}, at_peak


def _fds(p) -> int:
    return sum(fd_count(pid) for pid in [p.pid, *p.workers()])


@pytest.mark.slow
def test_10000_concurrent_verified_connections(sshd):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard < N + 500:
        pytest.skip(f"RLIMIT_NOFILE hard limit {hard} is below {N + 500}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    try:
        # sshd's MaxSessions (1000 in the test bed) limits session channels
        # (shells, commands); direct-tcpip channels do not count against it,
        # so 5,000 forwarded connections per session need no change there.
        with ManyEcho() as echo, extra_sshd(sshd) as server:
            args, dest = base_args(server)
            with Pump([*args, "-L", tcp_spec(echo.addr), dest], env=clean_env()) as p:  # default workers
                assert len(p.workers()) >= 1
                with socket.create_connection(p.address, 10) as s:
                    echo_roundtrip(s, b"warm-up", half_close=True)
                deadline = time.monotonic() + 15
                while echo.stats()["active"] and time.monotonic() < deadline:
                    time.sleep(0.1)   # the warm-up's target connection ends first
                assert echo.stats()["active"] == 0, echo.stats()
                time.sleep(0.2)
                fds_before = _fds(p)

                loop = uvloop.new_event_loop()
                try:
                    took, at_peak = loop.run_until_complete(_crowd(p.address, N, echo))
                finally:
                    loop.close()
                assert at_peak["active"] == N, at_peak   # all N target connections open at once

                deadline = time.monotonic() + 30
                while (_fds(p) != fds_before or echo.stats()["active"]) and time.monotonic() < deadline:
                    time.sleep(0.2)
                assert _fds(p) == fds_before, f"sshpump holds {_fds(p)} fds, {fds_before} before"
                assert echo.stats()["active"] == 0

                for i in range(10):
                    with socket.create_connection(p.address, 10) as s:
                        echo_roundtrip(s, _payload(i, "after"), half_close=True)
                assert echo.stats()["accepted"] == 1 + N + 10
                assert p.proc.poll() is None
                err = p.stderr()
                assert "Traceback" not in err and "closing client" not in err, err[-3000:]
                print(f"10,000 clients: opened in {took['open']:.1f}s, checked in {took['check']:.1f}s, "
                      f"closed in {took['close']:.1f}s; {len(p.workers())} workers")
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
