"""--workers N (prefork): dispatch, fd hygiene, worker death and respawn,
sshd restarts, graceful drain, master death, many connections, keepalive."""
from __future__ import annotations

import asyncio
import hashlib
import re
import resource
import signal
import socket
import threading
import time

import pytest

from testbed._util import wait_for
from testbed.client import echo_roundtrip
from testbed.data import pattern_bytes, pattern_digest

from helpers import PLANES, alive, connect, extra_sshd, fd_count, plane_args, start_pump, tcp_spec


def _conn_counts(err):
    return {w: len(re.findall(rf"worker {w}: conn \d+ open", err)) for w in (0, 1)}


def _try_echo(addr, payload=b"ping", timeout=5):
    try:
        with connect(addr, timeout) as s:
            echo_roundtrip(s, payload, half_close=True)
        return True
    except (OSError, AssertionError):
        return False


def test_connections_spread_across_workers(pump, targets):
    p = pump(tcp_spec(targets.tcp["echo"]), workers=2)
    assert len(p.workers()) == 2
    socks = []
    try:
        for i in range(20):
            s = connect(p.address, 10)
            socks.append(s)
            echo_roundtrip(s, f"spread {i}".encode())  # channel is open before the next one
        err = p.stderr()
    finally:
        for s in socks:
            s.close()
    counts = _conn_counts(err)
    assert sum(counts.values()) == 20, err
    assert counts[0] >= 5 and counts[1] >= 5, counts


def test_master_fds_return_to_baseline(pump, targets):
    p = pump(tcp_spec(targets.tcp["echo"]), workers=2, verbose=0)
    with connect(p.address, 10) as s:
        echo_roundtrip(s, b"warm", half_close=True)
    time.sleep(0.2)
    base = fd_count(p.pid)
    worker_base = {w: fd_count(w) for w in p.workers()}
    for i in range(1000):
        with connect(p.address, 10) as s:
            echo_roundtrip(s, b"%d" % i)
    wait_for(lambda: abs(fd_count(p.pid) - base) <= 2, 5, what="master fd count back to baseline")
    # workers release theirs too (give the last closes a moment)
    for w, n in worker_base.items():
        wait_for(lambda: fd_count(w) <= n + 2, 5, what=f"worker {w} fd count back to {n}")


@PLANES
def test_kill_worker_mid_transfer(pump, targets, plane):
    p = pump(tcp_spec(targets.tcp["echo"]), workers=2, extra=plane_args(plane))
    pids = p.workers()
    assert len(pids) == 2
    n = 8
    stop = threading.Event()
    opened = threading.Barrier(n + 1, timeout=30)
    results = [None] * n

    def client(i):
        payload = pattern_bytes(f"kill-{i}", 256 << 10)
        try:
            with connect(p.address, 10) as s:
                echo_roundtrip(s, payload)
                opened.wait()
                while not stop.is_set():
                    echo_roundtrip(s, payload)
                echo_roundtrip(s, payload, half_close=True)
            results[i] = "ok"
        except threading.BrokenBarrierError:
            results[i] = "barrier"
        except (OSError, AssertionError) as e:
            results[i] = f"failed: {e!r}"

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(n)]
    for i, t in enumerate(threads):
        # One after another, each once the previous is carried: connections
        # from one address whose opens overlap stay on one worker (in order).
        t.start()
        wait_for(lambda: sum(_conn_counts(p.stderr()).values()) > i, 10, what=f"client {i} open")
    opened.wait()
    err = p.stderr()
    counts = _conn_counts(err)
    assert counts == {0: n // 2, 1: n // 2}, (counts, err)
    # which pid is worker 0?
    m = re.search(r"worker 0 \(pid (\d+)\): session up", err)
    victim = int(m.group(1))
    assert victim in pids
    survivor = next(x for x in pids if x != victim)
    time.sleep(0.3)
    p_kill_time = time.monotonic()
    import os
    os.kill(victim, signal.SIGKILL)
    err = p.wait_log(f"worker 0 (pid {victim}) killed by SIGKILL", timeout=10)
    time.sleep(0.5)
    stop.set()
    for t in threads:
        t.join(30)
    assert not any(t.is_alive() for t in threads), "clients hung after a worker was killed"
    failed = [r for r in results if r != "ok"]
    assert len(failed) == n // 2, results
    assert time.monotonic() - p_kill_time < 30
    # respawned under a new pid; the survivor is untouched
    wait_for(lambda: len(p.workers()) == 2 and victim not in p.workers(), 15, what="respawn")
    new = next(x for x in p.workers() if x != survivor)
    assert new != victim and alive(survivor)
    p.wait_log(f"worker 0 (pid {new}): session up", timeout=15)
    for i in range(10):
        assert _try_echo(p.address, b"after-kill %d" % i, timeout=10)
    # new connections go to the new worker too (hold them open to force spreading)
    socks = []
    try:
        for i in range(6):
            s = connect(p.address, 10)
            socks.append(s)
            echo_roundtrip(s, b"x")
    finally:
        for s in socks:
            s.close()
    assert re.search(rf"sshpump\[{new}\]: worker 0: conn \d+ open", p.stderr())


@pytest.fixture
def own_sshd(sshd):
    with extra_sshd(sshd) as s:
        yield s


@PLANES
@pytest.mark.parametrize("workers", [0, 2], ids=["w0", "w2"])
def test_sshd_restart_reconnects(own_sshd, targets, workers, plane):
    with start_pump(own_sshd, tcp_spec(targets.tcp["echo"]), workers=workers, extra=plane_args(plane)) as p:
        assert _try_echo(p.address)
        own_sshd.restart()
        p.wait_log("SSH session lost", timeout=15)
        deadline = time.monotonic() + 20
        while not _try_echo(p.address, b"after restart", timeout=5):
            assert time.monotonic() < deadline, f"tunnel did not serve within 20s of restart:\n{p.stderr()}"
            time.sleep(0.5)
        ups = "session up to" if workers == 0 else "): session up"
        p.wait_log(ups, count=2 * max(workers, 1), timeout=20)
        for i in range(6):
            assert _try_echo(p.address, b"again %d" % i)


@pytest.mark.parametrize("workers", [0, 2], ids=["w0", "w2"])
def test_graceful_drain_on_sigterm(pump, targets, workers):
    p = pump(tcp_spec(targets.tcp["source"]), workers=workers, extra=["--drain-timeout", "60"])
    n = 200_000_000
    seed = "drain"
    pattern_digest(seed, n)  # precompute before timing matters
    state = {"got": 0, "err": None, "digest": None}
    started = threading.Event()

    def download():
        try:
            with connect(p.address, 30) as s:
                s.sendall(f"{n} {seed}\n".encode())
                h = hashlib.sha256()
                buf = bytearray(1 << 20)
                view = memoryview(buf)
                t0 = time.monotonic()
                while True:
                    r = s.recv_into(view)
                    if r == 0:
                        break
                    h.update(view[:r])
                    state["got"] += r
                    started.set()
                    # cap at ~50 MB/s so the transfer outlives the SIGTERM
                    ahead = state["got"] / 50e6 - (time.monotonic() - t0)
                    if ahead > 0:
                        time.sleep(ahead)
                s.shutdown(socket.SHUT_WR)
                state["digest"] = h.hexdigest()
        except BaseException as e:  # noqa: BLE001
            state["err"] = e
        finally:
            started.set()

    t = threading.Thread(target=download, daemon=True)
    t.start()
    assert started.wait(15)
    time.sleep(0.5)
    assert 0 < state["got"] < n // 2
    p.proc.send_signal(signal.SIGTERM)
    # listeners close at once: no new clients while draining
    def refused():
        try:
            with socket.create_connection(p.address, timeout=2):
                return False
        except ConnectionRefusedError:
            return True
    wait_for(refused, 5, what="listener closed after SIGTERM")
    rc = p.proc.wait(60)
    t.join(30)
    assert not t.is_alive()
    assert state["err"] is None, state["err"]
    assert state["got"] == n
    assert state["digest"] == pattern_digest(seed, n)
    assert rc == 0, p.stderr()
    assert "stopped" in p.stderr()


def test_master_sigkill_leaves_no_workers(pump, targets):
    p = pump(tcp_spec(targets.tcp["echo"]), workers=2)
    pids = p.workers()
    assert len(pids) == 2
    with connect(p.address, 10) as s:
        echo_roundtrip(s, b"x")
        p.proc.kill()
        p.proc.wait(5)
        wait_for(lambda: not any(alive(x) for x in pids), 5, what="workers to exit after master SIGKILL")
        s.settimeout(5)
        try:
            assert s.recv(10) == b""
        except ConnectionResetError:
            pass


def test_2000_concurrent_connections(pump, targets):
    n = 2000
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = max(soft, min(hard, 3 * n + 1000))
    if want < 2 * n + 200:
        pytest.skip(f"RLIMIT_NOFILE hard limit {hard} too low")
    resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    try:
        p = pump(tcp_spec(targets.tcp["echo"]), workers=2, verbose=0)
        host, port = p.address
        before = targets.stats()["echo"]["accepted"]

        async def main():
            round1 = 0
            all_open = asyncio.Event()
            sem = asyncio.Semaphore(200)  # pace the connects, not the holding

            async def one(i):
                nonlocal round1
                data = b"%06d:" % i + pattern_bytes(f"c2k-{i}", 200)
                async with sem:
                    r, w = await asyncio.wait_for(asyncio.open_connection(host, port), 30)
                try:
                    w.write(data)
                    assert await asyncio.wait_for(r.readexactly(len(data)), 60) == data
                    round1 += 1
                    if round1 == n:
                        all_open.set()
                    await asyncio.wait_for(all_open.wait(), 120)
                    w.write(data[::-1])
                    w.write_eof()
                    assert await asyncio.wait_for(r.readexactly(len(data)), 60) == data[::-1]
                    assert await asyncio.wait_for(r.read(), 30) == b""
                finally:
                    w.close()
                return i

            async def watch():
                await asyncio.wait_for(all_open.wait(), 150)
                return targets_active()

            def targets_active():
                return targets.stats()["echo"]["active"]

            results = await asyncio.gather(*(one(i) for i in range(n)), watch())
            return results

        loop = asyncio.new_event_loop()
        try:
            results = loop.run_until_complete(asyncio.wait_for(main(), 180))
        finally:
            loop.close()
        assert sorted(results[:-1]) == list(range(n))
        assert results[-1] >= n, f"only {results[-1]} target connections were open at once"
        assert targets.stats()["echo"]["accepted"] - before == n
        counts = {w: fd_count(w) for w in p.workers()}
        assert len(counts) == 2
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


@pytest.mark.parametrize("workers", [0, 2], ids=["w0", "w2"])
def test_keepalive_detects_hung_server(targets, workers):
    from testbed.faultserver import FaultServer
    with FaultServer() as fault:
        with start_pump(fault, tcp_spec(targets.tcp["echo"]), workers=workers,
                        extra=["-o", "ServerAliveInterval=1", "-o", "ServerAliveCountMax=2"]) as p:
            assert _try_echo(p.address)
            t0 = time.monotonic()
            fault.hang()
            err = p.wait_log("not responding", timeout=12, count=max(workers, 1))
            assert time.monotonic() - t0 < 12
            assert "SSH session lost" in err
            fault.resume()
            deadline = time.monotonic() + 40
            while not _try_echo(p.address, b"after hang", timeout=5):
                assert time.monotonic() < deadline, f"no recovery after resume:\n{p.stderr()}"
                time.sleep(0.5)
