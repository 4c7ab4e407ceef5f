"""Forwarding through the sshpump CLI, single-process and with workers."""
from __future__ import annotations

import hashlib
import os
import socket
import stat
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from testbed.client import (download_and_verify, echo_roundtrip, recv_until_eof,
                            upload_and_verify)
from testbed.data import pattern_bytes, pattern_digest

from helpers import PLANES, alive, connect, extra_sshd, plane_args, run_concurrently, start_pump, tcp_spec, vm_rss_kb

WORKERS = pytest.mark.parametrize("workers", [0, 2], ids=["w0", "w2"])


@PLANES
@WORKERS
def test_echo_tcp(pump, targets, workers, plane):
    p = pump(tcp_spec(targets.tcp["echo"]), workers=workers, extra=plane_args(plane))
    assert p.address[0] == "127.0.0.1" and p.address[1] > 0
    for i in range(3):
        with connect(p.address, 10) as s:
            echo_roundtrip(s, f"hello {i}".encode() * 100)
            echo_roundtrip(s, pattern_bytes(f"echo{i}", 300_000), half_close=True)
    p.wait_log("conn 0 open")


@PLANES
@WORKERS
def test_direct_streamlocal(pump, targets, workers, plane):
    p = pump(f"0:{targets.unix['echo']}", f"0:{targets.unix['sink']}", workers=workers, extra=plane_args(plane))
    with connect(p.listen[0], 10) as s:
        echo_roundtrip(s, pattern_bytes("unix", 1 << 20), half_close=True)
    with connect(p.listen[1], 10) as s:
        upload_and_verify(s, 3 << 20, "unix-up")
    p.wait_log(f"-> {targets.unix['echo']}")


@WORKERS
def test_local_unix_listener(pump, targets, tmp_path, workers):
    path = str(tmp_path / "x.sock")
    # A stale socket file: bound once, nobody listening any more.
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(path)
    stale.close()
    assert stat.S_ISSOCK(os.lstat(path).st_mode)
    p = pump(f"{path}:{targets.tcp['echo'][0]}:{targets.tcp['echo'][1]}", workers=workers)
    assert p.address == path
    st = os.lstat(path)
    assert stat.S_ISSOCK(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o600, oct(st.st_mode)
    for _ in range(2):
        with connect(path, 10) as s:
            echo_roundtrip(s, pattern_bytes("ulisten", 500_000), half_close=True)
    assert p.stop() == 0
    assert not os.path.lexists(path), "unix listener socket not removed on exit"


def test_local_unix_listener_in_use_is_not_stolen(pump, targets, tmp_path):
    path = str(tmp_path / "busy.sock")
    busy = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    busy.bind(path)
    busy.listen(1)
    try:
        from helpers import PumpFailed
        with pytest.raises(PumpFailed) as ei:
            pump(f"{path}:{targets.tcp['echo'][0]}:{targets.tcp['echo'][1]}")
        assert "exit code 6" in str(ei.value)
        assert path in str(ei.value)
        assert os.path.lexists(path)
    finally:
        busy.close()


@PLANES
@WORKERS
def test_unix_to_unix(pump, targets, tmp_path, workers, plane):
    path = str(tmp_path / "u2u.sock")
    p = pump(f"{path}:{targets.unix['echo']}", workers=workers, extra=plane_args(plane))
    assert p.address == path
    with connect(path, 10) as s:
        echo_roundtrip(s, pattern_bytes("u2u", 2 << 20), half_close=True)
    assert p.stop() == 0
    assert not os.path.lexists(path)


@WORKERS
def test_several_forwards(pump, targets, tmp_path, workers):
    lpath = str(tmp_path / "src.sock")
    p = pump(tcp_spec(targets.tcp["echo"]), f"0:{targets.unix['sink']}",
             f"{lpath}:{targets.unix['source']}", tcp_spec(targets.tcp["sink"]), workers=workers)
    assert len(p.listen) == 4
    assert len({a for a in p.listen}) == 4
    assert p.listen[2] == lpath
    with connect(p.listen[0], 10) as s:
        echo_roundtrip(s, b"several", half_close=True)
    with connect(p.listen[1], 10) as s:
        upload_and_verify(s, 1 << 20, "several-up")
    with connect(p.listen[2], 10) as s:
        download_and_verify(s, 1 << 20, "several-down")
    with connect(p.listen[3], 10) as s:
        upload_and_verify(s, 12345, "several-up2")
    specs = list(dict.fromkeys(x["spec"] for x in p.ready["listen"]))  # TCP ones listen twice: 127.0.0.1, [::1]
    assert specs[0] == tcp_spec(targets.tcp["echo"])
    assert specs[2] == f"{lpath}:{targets.unix['source']}"


@PLANES
@WORKERS
def test_64mib_up_and_down(pump, targets, workers, plane):
    p = pump(tcp_spec(targets.tcp["sink"]), tcp_spec(targets.tcp["source"]), workers=workers, extra=plane_args(plane))
    n = 64 << 20
    with connect(p.listen[0], 60) as s:
        upload_and_verify(s, n, "up64")
    with connect(p.listen[1], 60) as s:
        download_and_verify(s, n, "down64")
    # and both at once
    def transfer(fn, addr, seed):
        def go():
            with connect(addr, 60) as s:
                fn(s, n, seed)
        return go
    run_concurrently([transfer(upload_and_verify, p.listen[0], "up64b"),
                      transfer(download_and_verify, p.listen[1], "down64b")], 120, "a transfer")


@PLANES
@WORKERS
def test_half_close(pump, targets, workers, plane):
    p = pump(tcp_spec(targets.tcp["echo"]), workers=workers, extra=plane_args(plane))
    payload = pattern_bytes("half", 4 << 20)
    with connect(p.address, 30) as s:
        s.sendall(payload)  # echo server buffers 1 MiB socket buffers; we read after
        s.shutdown(socket.SHUT_WR)
        got = recv_until_eof(s, limit=len(payload) + 1)
    assert len(got) == len(payload)
    assert got == payload
    # the same with data interleaved both ways
    with connect(p.address, 30) as s:
        echo_roundtrip(s, payload, half_close=True)
    # sink: the reply comes only after our EOF reached the target through the tunnel
    p2 = pump(tcp_spec(targets.tcp["sink"]), workers=workers, extra=plane_args(plane))
    with connect(p2.address, 30) as s:
        s.sendall(b"abc")
        s.shutdown(socket.SHUT_WR)
        assert recv_until_eof(s) == f"3 {hashlib.sha256(b'abc').hexdigest()}\n".encode()


@PLANES
@WORKERS
def test_200_concurrent_connections(pump, targets, workers, plane):
    p = pump(tcp_spec(targets.tcp["echo"]), workers=workers, extra=plane_args(plane), verbose=0)
    n = 200
    barrier = threading.Barrier(n, timeout=60)

    def one(i):
        data = pattern_bytes(f"conc-{i}", 20_000 + 37 * i)
        with connect(p.address, 60) as s:
            barrier.wait()  # all connections are open at once
            echo_roundtrip(s, data, half_close=True)
        return i

    with ThreadPoolExecutor(n) as ex:
        futs = [ex.submit(one, i) for i in range(n)]
        results = [f.result(timeout=120) for f in futs]
    assert sorted(results) == list(range(n))


@PLANES
@WORKERS
def test_target_refused(pump, targets, workers, plane):
    p = pump(tcp_spec(targets.tcp["refuse"]), tcp_spec(targets.tcp["echo"]), workers=workers, extra=plane_args(plane))

    def refused_client():
        """A client of the refused target sees its connection cut (the reset
        may even come before connect() has returned)."""
        try:
            with connect(p.listen[0], 10) as s:
                s.settimeout(10)
                s.sendall(b"hello?")
                assert s.recv(100) == b""
        except (ConnectionResetError, BrokenPipeError):
            pass

    refused_client()
    err = p.wait_log("connect failed", timeout=10)
    assert f"{targets.tcp['refuse'][0]}:{targets.tcp['refuse'][1]}" in err
    assert "administratively prohibited" not in err
    # the session and the tunnel survive: both forwards serve the next clients
    with connect(p.listen[1], 10) as s:
        echo_roundtrip(s, b"still alive", half_close=True)
    refused_client()
    p.wait_log("connect failed", timeout=10, count=2)
    with connect(p.listen[1], 10) as s:
        echo_roundtrip(s, b"still alive 2", half_close=True)


@PLANES
@WORKERS
def test_slow_reader_memory_bound(pump, targets, workers, plane):
    p = pump(tcp_spec(targets.tcp["source"]), workers=workers, extra=plane_args(plane), verbose=0)
    pids = p.workers() if workers else [p.pid]
    assert len(pids) == max(workers, 1)
    # warm up so that baseline includes allocator arenas and channel buffers
    with connect(p.address, 30) as s:
        download_and_verify(s, 8 << 20, "warm")
    time.sleep(0.3)
    base = {pid: vm_rss_kb(pid) for pid in pids}
    limit_kb = 64 << 10
    n = 512 << 20
    seed = "slowreader"
    h = hashlib.sha256()
    got = 0
    peak = dict(base)

    def sample():
        for pid in pids:
            peak[pid] = max(peak[pid], vm_rss_kb(pid))

    with connect(p.address, 60) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 << 10)
        s.sendall(f"{n} {seed}\n".encode())
        # read slowly: 64 KiB every 10 ms for 1 s
        t_end = time.monotonic() + 1.0
        while time.monotonic() < t_end:
            b = s.recv(65536)
            assert b
            h.update(b)
            got += len(b)
            sample()
            time.sleep(0.01)
        # stop reading for 4 s
        t_end = time.monotonic() + 4.0
        while time.monotonic() < t_end:
            sample()
            time.sleep(0.05)
        for pid in pids:
            assert peak[pid] - base[pid] < limit_kb, (
                f"pid {pid}: RSS grew by {(peak[pid] - base[pid]) >> 10} MiB while the reader stalled")
        assert got < n // 2, "transfer was not held back by the slow reader"
        buf = bytearray(1 << 20)
        view = memoryview(buf)
        while True:
            r = s.recv_into(view)
            if r == 0:
                break
            h.update(view[:r])
            got += r
            if got % (32 << 20) < r:
                sample()
        s.shutdown(socket.SHUT_WR)
    assert got == n
    assert h.hexdigest() == pattern_digest(seed, n)
    for pid in pids:
        assert peak[pid] - base[pid] < limit_kb, f"pid {pid}: RSS grew by {(peak[pid] - base[pid]) >> 10} MiB"
        assert alive(pid)


# ---------------------------------------------------------------- channel open refusals
@pytest.fixture(scope="module")
def sshd_permit_one(sshd):
    with extra_sshd(sshd, permit_open="127.0.0.1:1") as s:
        yield s


@WORKERS
def test_administratively_prohibited_openssh(sshd_permit_one, targets, workers):
    with start_pump(sshd_permit_one, tcp_spec(targets.tcp["echo"]), workers=workers) as p:
        try:   # the reset may come before connect() has returned
            with connect(p.address, 10) as s:
                assert s.recv(10) == b""
        except ConnectionResetError:
            pass
        err = p.wait_log("administratively prohibited", timeout=10)
        assert "connect failed" not in err
        assert f"{targets.tcp['echo'][0]}:{targets.tcp['echo'][1]}" in err
        assert p.proc.poll() is None


@pytest.fixture(scope="module")
def fault():
    from testbed.faultserver import FaultServer
    with FaultServer() as f:
        yield f


def test_faultserver_prohibited_vs_connect_failed(fault, targets):
    with start_pump(fault, "0:127.0.0.1:1", "0:127.0.0.1:2", tcp_spec(targets.tcp["echo"]),
                    workers=0) as p:
        for i, reason in ((0, "administratively prohibited"), (1, "connect failed")):
            try:   # the reset may come before connect() has returned
                with connect(p.listen[i], 10) as s:
                    assert s.recv(10) == b""
            except ConnectionResetError:
                pass
            err = p.wait_log(reason, timeout=10)
        lines = err.splitlines()
        prohibited = [ln for ln in lines if "administratively prohibited" in ln]
        failed = [ln for ln in lines if "connect failed" in ln]
        assert len(prohibited) == 1 and "127.0.0.1:1 " in prohibited[0] + " ", err
        assert len(failed) == 1 and "127.0.0.1:2 " in failed[0] + " ", err
        with connect(p.listen[2], 10) as s:
            echo_roundtrip(s, b"through asyncssh", half_close=True)


# ---------------------------------------------------------------- key re-exchange
@pytest.fixture(scope="module")
def sshd_rekey(sshd):
    with extra_sshd(sshd, extra_config={"RekeyLimit": "32M"}) as s:
        yield s


@PLANES
@WORKERS
def test_download_across_rekey(sshd_rekey, targets, workers, plane):
    n = 160 << 20  # crosses ~5 server-initiated rekeys
    with start_pump(sshd_rekey, tcp_spec(targets.tcp["source"]), workers=workers, extra=plane_args(plane)) as p:
        with connect(p.address, 60) as s:
            download_and_verify(s, n, f"rekey-down-{workers}")


@PLANES
@WORKERS
def test_upload_across_rekey(sshd_rekey, targets, workers, plane):
    n = 160 << 20
    with start_pump(sshd_rekey, tcp_spec(targets.tcp["sink"]), workers=workers, extra=plane_args(plane)) as p:
        with connect(p.address, 60) as s:
            upload_and_verify(s, n, f"rekey-up-{workers}")
        with connect(p.address, 60) as s:
            upload_and_verify(s, n, f"rekey-up2-{workers}")


def test_larger_receive_window_across_rekey(sshd_rekey, targets):
    """--window grows each channel's receive window with an explicit adjust;
    it must stay in step with libssh2's accounting (no data dropped), also
    while rekeys make sends wait, and with a reader that pauses."""
    n = 96 << 20
    with start_pump(sshd_rekey, tcp_spec(targets.tcp["source"]), workers=0,
                    extra=["--window", str(16 << 20)]) as p:
        with connect(p.address, 60) as s:
            s.sendall(f"{n} window16\n".encode())
            time.sleep(1.0)  # let the server fill the bigger window first
            got = hashlib.sha256()
            total = 0
            while True:
                chunk = s.recv(1 << 20)
                if not chunk:
                    break
                got.update(chunk)
                total += len(chunk)
        assert total == n
        assert got.hexdigest() == pattern_digest("window16", n)
