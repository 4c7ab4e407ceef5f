"""Signals: a worker signalled on its own drains like the whole group does,
SIGHUP is survived, and no way out leaves a unix listener's socket file."""
from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import threading
import time

import pytest

from testbed._util import children_of, wait_for
from testbed.client import download_and_verify, echo_roundtrip

from helpers import PY, base_args, clean_env, connect, run_cli, tcp_spec


def _echo(addr, payload):
    with connect(addr, 10) as s:
        echo_roundtrip(s, payload, half_close=True)


def _unix_spec(path, target):
    return f"{path}:{target[0]}:{target[1]}"


def test_sighup_is_survived_and_sigterm_removes_the_socket_file(pump, targets, tmp_path):
    path = str(tmp_path / "x.sock")
    p = pump(_unix_spec(path, targets.tcp["echo"]), workers=2, new_session=True)
    workers = p.workers()
    _echo(path, b"before HUP")
    os.killpg(p.pid, signal.SIGHUP)  # the master and every worker, as a closed terminal does
    p.wait_log("SIGHUP: nothing to reload", timeout=5)
    time.sleep(0.5)
    assert p.proc.poll() is None, p.stderr()
    assert p.workers() == workers, p.stderr()  # no worker died of it either
    for i in range(4):
        _echo(path, b"after HUP %d" % i)
    os.killpg(p.pid, signal.SIGTERM)
    assert p.proc.wait(30) == 0, p.stderr()
    assert not os.path.lexists(path)


def test_worker_sigterm_alone_drains_and_is_replaced(pump, targets):
    p = pump(tcp_spec(targets.tcp["source"]), tcp_spec(targets.tcp["echo"]), workers=2,
             extra=["--drain-timeout", "60"])
    size, progress, result = 64 << 20, [0], []

    def download():
        try:
            with connect(p.listen[0], 30) as s:
                download_and_verify(s, size, "alone", rate=16e6, progress=lambda got: progress.__setitem__(0, got))
            result.append("ok")
        except (OSError, AssertionError) as e:
            result.append(repr(e))

    t = threading.Thread(target=download, daemon=True)
    t.start()
    wait_for(lambda: progress[0], 15, what="download under way")
    m = re.search(r"sshpump\[(\d+)\]: worker (\d): conn \d+ open", p.stderr())
    victim, index = int(m.group(1)), m.group(2)
    os.kill(victim, signal.SIGTERM)
    p.wait_log(f"worker {index} (pid {victim}): got SIGTERM: draining", timeout=5)
    # The other worker serves new clients meanwhile; the draining one gets none.
    opens = len(re.findall(rf"sshpump\[{victim}\]: worker {index}: conn", p.stderr()))
    for i in range(4):
        _echo(p.listen[1], b"while draining %d" % i)
    assert len(re.findall(rf"sshpump\[{victim}\]: worker {index}: conn \d+ open", p.stderr())) == opens
    t.join(30)
    assert result == ["ok"], (result, p.stderr())
    p.wait_log(f"worker {index} (pid {victim}) drained and exited", timeout=10)
    wait_for(lambda: len(p.workers()) == 2 and victim not in p.workers(), 15, what="a new worker")
    p.wait_log("): session up", count=3, timeout=15)
    assert p.proc.poll() is None
    for i in range(4):
        _echo(p.listen[1], b"after %d" % i)


def _silent_server():
    """Accepts TCP connections (the kernel does) and never says a word: an
    SSH login to it waits for the server's banner."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(16)
    return s


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP], ids=["TERM", "INT", "HUP"])
def test_signal_during_start_up_removes_the_socket_file(sshd, targets, tmp_path, sig):
    # The listeners open first, then the workers start (imports take a good
    # part of a second) and log in to a server that never answers: the
    # signal reaches every process in the middle of its start.
    path = str(tmp_path / "starting.sock")
    with _silent_server() as silent:
        args, dest = base_args(sshd, port=silent.getsockname()[1])
        proc = subprocess.Popen([PY, "-m", "sshpump", "--workers", "2", *args,
                                 "-L", _unix_spec(path, targets.tcp["echo"]), dest],
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                env=clean_env(), start_new_session=True)
        try:
            wait_for(lambda: os.path.lexists(path), 10, interval=0.005, what="the listener")
            t0 = time.monotonic()
            os.killpg(proc.pid, sig)
            if sig == signal.SIGHUP:  # survived by all: still starting; then stopped
                workers = wait_for(lambda: len(children_of(proc.pid)) == 2 and children_of(proc.pid), 5,
                                   what="both workers")
                time.sleep(1.5)
                assert proc.poll() is None
                assert children_of(proc.pid) == workers
                t0 = time.monotonic()
                os.killpg(proc.pid, signal.SIGTERM)
            rc = proc.wait(10)
            took = time.monotonic() - t0
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            err = proc.stderr.read().decode()
            proc.stderr.close()
    assert rc == 0, err
    assert took < 8, took  # not held up by the ConnectTimeout (10 s) of the logins
    assert not os.path.lexists(path), err
    assert "Traceback" not in err, err


def test_start_up_failures_remove_the_socket_file(sshd, targets, tmp_path):
    path = str(tmp_path / "failed.sock")
    spec = _unix_spec(path, targets.tcp["echo"])
    # Authentication fails (no key, no agent): exit 5.
    args, dest = base_args(sshd, key=False)
    rc, err = run_cli(["--workers", "2", *args, "-o", "BatchMode=yes", "-L", spec, dest])
    assert rc == 5, err
    assert not os.path.lexists(path), err
    # ExitOnForwardFailure: the unix listener opened, the next forward cannot: exit 6.
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        args, dest = base_args(sshd)
        rc, err = run_cli(["--workers", "2", *args, "-o", "ExitOnForwardFailure=yes", "-L", spec,
                           "-L", f"127.0.0.1:{busy.getsockname()[1]}:127.0.0.1:9", dest])
    assert rc == 6, err
    assert not os.path.lexists(path), err
