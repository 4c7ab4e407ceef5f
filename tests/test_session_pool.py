"""--sessions-per-worker K: each worker holds K SSH sessions and spreads its
clients over them; the tunnel serves while any is up, and a lost session
is reconnected while the others carry on."""
from __future__ import annotations

import os
import signal
import threading
import time

import pytest

from helpers import connect, run_cli, tcp_spec
from testbed._util import socket_inodes, tcp_ports_by_inode
from testbed.client import download_and_verify, echo_roundtrip

WORKERS = pytest.mark.parametrize("workers", [0, 2], ids=["w0", "w2"])


def _sessions_to(sshd, pids) -> int:
    """SSH connections these processes hold to the sshd."""
    ports = tcp_ports_by_inode()
    return sum(1 for pid in pids for i in socket_inodes(pid) if i in ports and ports[i][1] == sshd.port)


def _serving_one_connection(sshd, client_pid) -> list[int]:
    from sshpump.demo.sshd import descendants
    ports = tcp_ports_by_inode()
    client_ports = sorted(ports[i][0] for i in socket_inodes(client_pid) if i in ports and ports[i][1] == sshd.port)
    assert len(client_ports) == 2, client_ports
    server_end = {i for i, (local, remote) in ports.items() if local == sshd.port and remote == client_ports[0]}
    return [k for k in descendants(sshd.proc.pid) if socket_inodes(k) & server_end]


@WORKERS
def test_clients_spread_over_the_sessions(pump, sshd, targets, workers):
    p = pump(tcp_spec(targets.tcp["echo"]), workers=workers, extra=["--sessions-per-worker", "3"])
    carriers = p.workers() if workers else [p.pid]
    assert _sessions_to(sshd, carriers) == 3 * max(workers, 1)
    held = [connect(p.address) for _ in range(12)]
    try:
        errors = []

        def one(s, i):
            try:
                echo_roundtrip(s, os.urandom(200_000 + i))
            except BaseException as e:  # reported below
                errors.append(e)

        threads = [threading.Thread(target=one, args=(s, i)) for i, s in enumerate(held)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not errors, errors
        assert len(p.connections()) == 12
    finally:
        for s in held:
            s.close()


def test_one_session_lost_the_others_carry_on(pump, sshd, targets):
    p = pump(tcp_spec(targets.tcp["source"]), workers=1, extra=["--sessions-per-worker", "2",
                                                               "-o", "ServerAliveInterval=1",
                                                               "-o", "ServerAliveCountMax=2"])
    p.check_idle = False
    (worker,) = p.workers()
    # Stop the sshd processes serving one of its two SSH connections: that
    # session dies by keepalive; the tunnel keeps serving on the other.
    victim = _serving_one_connection(sshd, worker)
    assert victim
    for pid in victim:
        os.kill(pid, signal.SIGSTOP)
    try:
        deadline = time.monotonic() + 30
        served = 0
        while time.monotonic() < deadline and served < 5:
            try:
                with connect(p.address, 10) as s:
                    s.settimeout(10)
                    download_and_verify(s, 1 << 20, f"pool-{served}")
                    served += 1
            except (OSError, AssertionError):
                time.sleep(0.2)
        assert served == 5
    finally:
        for pid in victim:
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
    assert p.stats()["tunnels"]["default"]["workers"][0]["up"]


def test_bad_sessions_per_worker_is_one_line_exit_2(sshd):
    for value, said in (("0", "--sessions-per-worker '0' is out of range"), ("x", "is not a number"),
                        ("65", "out of range")):
        code, err = run_cli(["--sessions-per-worker", value, "-L", "0:h:1", "nobody@127.0.0.1"])
        assert code == 2 and said in err and len(err.strip().splitlines()) == 1, err


def test_a_pool_of_mux_sessions_with_a_remote_forward(pump, targets):
    """--mux on every session of the pool carries the -L clients; -R (a
    channel, on the first session) works beside them."""
    echo = targets.tcp["echo"]
    p = pump(tcp_spec(echo), workers=1, extra=["--sessions-per-worker", "2", "--mux",
                                               "-R", f"0:{echo[0]}:{echo[1]}"])
    held = [connect(p.address) for _ in range(6)]
    try:
        for i, s in enumerate(held):
            echo_roundtrip(s, os.urandom(50_000 + i))
    finally:
        for s in held:
            s.close()
    import socket as _socket
    with _socket.create_connection(("127.0.0.1", p.ready["remote"][0]["port"]), timeout=10) as s:
        echo_roundtrip(s, b"remote" * 1000)
