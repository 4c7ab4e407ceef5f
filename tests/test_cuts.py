"""A connection sshpump had to cut looks cut to its client: a TCP reset, never
the FIN of a complete response (drain timeout, lost SSH session, failed
channel open, no session at all)."""
from __future__ import annotations

import os
import signal
import struct
import socket
import time

import pytest

from helpers import connect, extra_sshd, start_pump, tcp_spec
from testbed.client import download_and_verify

MiB = 1 << 20


def read_to_end(sock, limit_s=30.0):
    """Read until the stream ends; returns ("eof" | "reset", bytes received)."""
    got = 0
    deadline = time.monotonic() + limit_s
    sock.settimeout(limit_s)
    while time.monotonic() < deadline:
        try:
            b = sock.recv(1 << 20)
        except ConnectionResetError:
            return "reset", got
        if not b:
            return "eof", got
        got += len(b)
    raise AssertionError(f"stream neither ended nor was reset within {limit_s}s")


def start_stalled_downloads(addr, n, nbytes=512 * MiB):
    """n downloads that read 1 MiB and then stop reading (the rest piles up)."""
    socks = []
    for i in range(n):
        s = connect(addr, 30)
        s.sendall(f"{nbytes} cut-{i}\n".encode())
        got = 0
        while got < MiB:
            got += len(s.recv(MiB))
        socks.append(s)
    return socks


@pytest.mark.parametrize("workers", [0, 2], ids=["w0", "w2"])
def test_drain_timeout_resets_unfinished_downloads(sshd, targets, workers):
    p = start_pump(sshd, tcp_spec(targets.tcp["source"]), workers=workers, extra=["--drain-timeout", "1"])
    try:
        socks = start_stalled_downloads(p.listen[0], 4)
        p.proc.send_signal(signal.SIGTERM)
        ends = [read_to_end(s)[0] for s in socks]
        assert p.proc.wait(30) == 0, p.stderr()
    finally:
        p.close()
    assert ends == ["reset"] * 4, ends


@pytest.mark.parametrize("workers", [0, 2], ids=["w0", "w2"])
def test_lost_session_resets_its_downloads(sshd, targets, workers):
    with start_pump(sshd, tcp_spec(targets.tcp["source"]), workers=workers,
                    extra=["-o", "ServerAliveInterval=1"]) as p:
        socks = start_stalled_downloads(p.listen[0], 4)
        sshd.kill_sessions()   # the server side of every session vanishes
        ends = [read_to_end(s)[0] for s in socks]
        assert ends == ["reset"] * 4, ends
        assert p.proc.poll() is None


def test_failed_channel_open_resets_the_client(sshd, targets):
    with start_pump(sshd, tcp_spec(targets.tcp["refuse"]), workers=0) as p:
        with connect(p.listen[0]) as s:
            assert read_to_end(s)[0] == "reset"


def test_no_session_within_client_wait_resets_the_client(sshd, targets):
    with extra_sshd(sshd) as server, start_pump(server, tcp_spec(targets.tcp["echo"]), workers=1,
                                                extra=["--client-wait", "1"]) as p:
        server.stop()  # and its sessions: the worker cannot reconnect
        deadline = time.monotonic() + 20
        ends = []
        while time.monotonic() < deadline and "reset" not in ends:
            with connect(p.listen[0]) as s:
                s.shutdown(socket.SHUT_WR)  # an echo that is served ends with EOF
                ends.append(read_to_end(s)[0])
        assert ends[-1] == "reset", ends


@pytest.mark.parametrize("workers", [0, 2], ids=["w0", "w2"])
def test_clients_reset_before_their_open_cost_no_target_connection(sshd, targets, workers):
    """A burst of connect + RST: the opens of clients already gone are skipped,
    and the tunnel serves normally afterwards."""
    n = 400
    with start_pump(sshd, tcp_spec(targets.tcp["echo"]), workers=workers, verbose=0) as p:
        before = targets.stats()["echo"]["accepted"]
        for _ in range(n):
            s = socket.create_connection(p.listen[0])
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            s.close()
        with connect(p.listen[0]) as s:  # queued behind the burst: served once it is through
            s.sendall(b"after the burst")
            s.shutdown(socket.SHUT_WR)
            assert s.recv(100) == b"after the burst"
        opened = targets.stats()["echo"]["accepted"] - before - 1
        assert p.proc.poll() is None, p.stderr()
    assert opened < n // 2, f"{opened} of {n} reset clients still cost a target connection"


def test_worker_killed_outright_resets_its_downloads(sshd, targets):
    """SIGKILL leaves the worker no chance to act: the master armed every
    client with SO_LINGER 0, so the kernel's own close is a reset. Clients
    of the other worker are untouched, and normal ends stay normal."""
    with start_pump(sshd, tcp_spec(targets.tcp["source"]), workers=2) as p:
        socks = start_stalled_downloads(p.listen[0], 8)
        victim = p.workers()[0]
        victim_ports = _client_ports_of(victim)
        os.kill(victim, signal.SIGKILL)
        ends = {}
        for s in socks:
            port = s.getsockname()[1]
            if port in victim_ports:
                ends[port] = read_to_end(s)[0]
        assert ends and set(ends.values()) == {"reset"}, ends
        # the survivors' downloads and new ones complete normally
        with connect(p.listen[0]) as s:
            assert download_and_verify(s, 8 * MiB, "after-kill") == 8 * MiB
        for s in socks:
            if s.getsockname()[1] not in victim_ports:
                s.close()


def _client_ports_of(pid):
    """Remote ports of the TCP connections process pid holds (its clients)."""
    from testbed._util import socket_inodes, tcp_ports_by_inode

    ports = tcp_ports_by_inode()
    return {ports[i][1] for i in socket_inodes(pid) if i in ports}


@pytest.mark.parametrize("selector,cut_without_eof", [("", True), ("stock", False)], ids=["patched", "stock"])
def test_server_sees_a_cut_channel_closed_without_eof(selector, cut_without_eof):
    """The server side of a cut: CLOSE without EOF (libssh2_channel_abort,
    sshpump's patched libssh2), so it can tell a cut from an end. A normal
    end sends EOF first. On the stock library a cut also sends EOF."""
    from helpers import clean_env
    from testbed.faultserver import RECORD_PORT, FaultServer

    with FaultServer() as fault:
        with start_pump(fault, f"0:127.0.0.1:{RECORD_PORT}", workers=0,
                        env=clean_env({"SSHPUMP_LIBSSH2": selector})) as p:
            with connect(p.listen[0]) as s:            # a normal end
                s.sendall(b"hello")
                s.shutdown(socket.SHUT_WR)
                assert read_to_end(s) == ("eof", 5)
            s = connect(p.listen[0])                   # a cut: the client resets mid-stream
            s.sendall(b"x" * 1000)
            assert s.recv(1000)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            s.close()
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and sum(fault.stats()["ends"].values()) < 2:
                time.sleep(0.05)
        ends = fault.stats()["ends"]
    if cut_without_eof:
        assert ends == {"eof_then_close": 1, "close_without_eof": 1}, ends
    else:
        assert ends == {"eof_then_close": 2, "close_without_eof": 0}, ends
