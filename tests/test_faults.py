"""Fault suite (issue 7): faults a deployment meets, with real clients whose
data is checked. Every wait is bounded; the faults stay on loopback."""
from __future__ import annotations

import os
import re
import signal
import socket
import threading
import time

import pytest

from testbed._util import wait_for
from testbed.client import download_and_verify, echo_roundtrip, recv_exactly

from helpers import connect, tcp_spec

DOWNLOADS = 4
SIZE = 64 << 20
RATE = 16e6   # bytes/s per reader: each download lasts ~4 s, so all are mid-way at the signal


def _refused(addr):
    try:
        with socket.create_connection(addr, timeout=2):
            return False
    except ConnectionRefusedError:
        return True


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["TERM", "INT"])
def test_process_group_signal_drains_transfers(pump, targets, sig):
    # systemd's KillMode=control-group, `kill -TERM -PGID` and Ctrl-C signal
    # the master and every worker at once.
    p = pump(tcp_spec(targets.tcp["source"]), workers=2, new_session=True, extra=["--drain-timeout", "60"])
    progress = [0] * DOWNLOADS
    results = [None] * DOWNLOADS

    def download(i):
        try:
            with connect(p.address, 30) as s:
                download_and_verify(s, SIZE, f"pgroup-{i}", rate=RATE,
                                    progress=lambda got: progress.__setitem__(i, got))
            results[i] = "ok"
        except (OSError, AssertionError) as e:
            results[i] = repr(e)

    threads = [threading.Thread(target=download, args=(i,), daemon=True) for i in range(DOWNLOADS)]
    for t in threads:
        t.start()
    wait_for(lambda: all(progress), 15, what="every download under way")
    at_signal = list(progress)
    os.killpg(p.pid, sig)
    wait_for(lambda: _refused(p.address), 5, what="listener closed after the signal")
    rc = p.proc.wait(60)
    for t in threads:
        t.join(30)
    assert not any(t.is_alive() for t in threads)
    assert all(0 < n < SIZE for n in at_signal), at_signal  # all were in flight
    assert results == ["ok"] * DOWNLOADS, (results, p.stderr())
    assert rc == 0, p.stderr()
    err = p.stderr()
    assert "drain timeout" not in err and "killing it" not in err, err


def _serves(addr, payload, timeout):
    """A connection with one echo round trip done, or None if it stalled."""
    s = connect(addr, timeout)
    try:
        s.settimeout(timeout)
        echo_roundtrip(s, payload)
        return s
    except (OSError, AssertionError):
        s.close()
        return None


def _opens_by_worker(err, index):
    return len(re.findall(rf"worker {index}: conn \d+ open", err))


def test_sigstop_of_sshd_session_process(pump, sshd, targets):
    # A session whose server hangs (here: its sshd processes stopped) answers
    # nothing, yet its keepalives take minutes to declare it dead. New clients
    # must go to the worker whose session answers.
    p = pump(tcp_spec(targets.tcp["echo"]), workers=2)
    err = p.wait_log("): session up", count=2, timeout=15)
    pid_a = int(re.search(r"worker 0 \(pid (\d+)\): session up", err).group(1))
    hung = sshd.session_pids(pid_a)
    assert hung, "no sshd process found for worker 0's session"
    held = []
    try:
        for x in hung:
            os.kill(x, signal.SIGSTOP)
        try:
            # The first client sent to worker 0 stalls: its channel open is on
            # the wire to a stopped server. (Least-loaded dispatch sends one of
            # two held clients there.)
            stalled = None
            for i in range(3):
                probe = b"probe %d" % i
                s = connect(p.address, 10)
                held.append(s)
                s.settimeout(1.5)
                try:
                    echo_roundtrip(s, probe)
                except (OSError, AssertionError):
                    stalled = s
                    break
            assert stalled is not None, p.stderr()
            p.wait_log(f"worker 0 (pid {pid_a}): a channel open has waited", timeout=10)
            before = _opens_by_worker(p.stderr(), 1)
            t0 = time.monotonic()
            for i in range(10):
                s = _serves(p.address, b"during the hang %d" % i, 10)
                assert s is not None, f"client {i} stalled:\n{p.stderr()}"
                held.append(s)
            served_in = time.monotonic() - t0
            assert served_in < 10, served_in
            assert _opens_by_worker(p.stderr(), 1) - before == 10, p.stderr()
        finally:
            for x in hung:
                os.kill(x, signal.SIGCONT)
        # The stalled client was not lost: its open completes once sshd runs
        # again, and what it sent meanwhile comes back.
        stalled.settimeout(10)
        assert recv_exactly(stalled, len(probe)) == probe
        echo_roundtrip(stalled, b"after SIGCONT")
        p.wait_log(f"worker 0 (pid {pid_a}): channel opens answered again", timeout=10)
        # ...and worker 0, the least loaded by far, takes new clients again.
        before = _opens_by_worker(p.stderr(), 0)
        for i in range(3):
            s = _serves(p.address, b"back %d" % i, 10)
            assert s is not None
            held.append(s)
        assert _opens_by_worker(p.stderr(), 0) - before == 3, p.stderr()
    finally:
        for s in held:
            s.close()
