"""-R: the server listens and its connections come back through the tunnel,
used from the server's side (this machine is also the sshd host): echo and
checksummed transfers over TCP and unix-socket targets, psql and curl, a
refusing target, a port the server cannot bind (with and without
ExitOnForwardFailure), forwards added and removed at runtime, a worker
killed -9 and an sshd restart."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time

import pytest

from helpers import base_args, extra_sshd, run_cli, start_pump
from testbed._util import free_port, ipv6_loopback_available
from testbed.client import download_and_verify, echo_roundtrip, upload_and_verify

WORKERS = pytest.mark.parametrize("workers", [0, 2], ids=["w0", "w2"])


def _remote(p, i=0) -> dict:
    return p.ready["remote"][i]


def _server_side(port, host="127.0.0.1", timeout=10.0) -> socket.socket:
    """Connect to the server's end of a remote forward, as a program on the
    sshd host would."""
    return socket.create_connection((host, port), timeout=timeout)


def _eventually(check, timeout=20.0, what="condition"):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            result = check()
            if result:
                return result
        except (OSError, AssertionError) as e:   # e.g. the server still holds a dead session's port
            last = e
        time.sleep(0.1)
    raise AssertionError(f"{what} not met within {timeout}s (last error: {last})")


def _forward_state(p, fid="f1") -> dict:
    return next(f for f in p.ctl("list")["forwards"] if f["id"] == fid)["remote"]


def _serves_echo(port, payload=b"ping" * 1000):
    with _server_side(port, timeout=5) as s:
        echo_roundtrip(s, payload)
    return True


@WORKERS
def test_tcp_and_unix_targets_carry_checksummed_bytes_both_ways(pump, targets, workers):
    echo, sink, source = targets.tcp["echo"], targets.tcp["sink"], targets.tcp["source"]
    p = pump(workers=workers, extra=["-R", f"0:{echo[0]}:{echo[1]}", "-R", f"0:{targets.unix['sink']}",
                                     "-R", f"0:{targets.unix['source']}", "-R", f"0:{sink[0]}:{sink[1]}",
                                     "-R", f"0:{source[0]}:{source[1]}"])
    ports = [r["port"] for r in p.ready["remote"]]
    assert all(r["state"] == "bound" and r["bind"] == "localhost" for r in p.ready["remote"])
    assert len(set(ports)) == 5 and 0 not in ports
    err = p.stderr()
    for r in p.ready["remote"]:   # ssh's own line, for every port the server chose
        assert f"Allocated port {r['port']} for remote forward to {r['target']}" in err
    with _server_side(ports[0]) as s:
        echo_roundtrip(s, os.urandom(3 << 20), half_close=True)
    for port in (ports[1], ports[3]):
        with _server_side(port) as s:
            upload_and_verify(s, 8 << 20, f"up-{port}")
    for port in (ports[2], ports[4]):
        with _server_side(port) as s:
            download_and_verify(s, 8 << 20, f"down-{port}")
    listing = p.ctl("list")["forwards"]
    assert [f["kind"] for f in listing] == ["R"] * 5
    assert sum(f["accepted"] for f in listing) == 5


@pytest.mark.skipif(not ipv6_loopback_available(), reason="no IPv6 loopback")
def test_ipv6_bind_and_fixed_port(pump, targets):
    port = free_port()
    echo = targets.tcp["echo"]
    p = pump(extra=["-R", f"[::1]:{port}:{echo[0]}:{echo[1]}"])
    assert _remote(p)["bind"] == "::1" and _remote(p)["port"] == port
    with _server_side(port, "::1", 5) as s:   # the server listens where it was asked
        echo_roundtrip(s, b"v6" * 1000)
    assert "Allocated port" not in p.stderr()   # ssh says it only for port 0


def test_a_refusing_target_closes_that_channel_only(pump, targets):
    refuse, echo = targets.tcp["refuse"], targets.tcp["echo"]
    p = pump(extra=["-R", f"0:{refuse[0]}:{refuse[1]}", "-R", f"0:{echo[0]}:{echo[1]}"])
    bad, good = (r["port"] for r in p.ready["remote"])
    for _ in range(3):
        with _server_side(bad) as s:
            try:
                assert s.recv(10) == b""   # closed by the server once the channel is
            except ConnectionResetError:
                pass
    assert _serves_echo(good)
    _eventually(lambda: not p.connections(), 10, "refused channels gone")
    f1 = next(f for f in p.ctl("list")["forwards"] if f["id"] == "f1")
    assert f1["accepted"] == 3 and f1["active"] == 0


def _occupy(port):
    """Hold a loopback port (both families) so that sshd cannot bind it."""
    held = []
    for fam, host in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")):
        s = socket.socket(fam, socket.SOCK_STREAM)
        try:
            s.bind((host, port))
            s.listen(1)
            held.append(s)
        except OSError:
            s.close()
    return held


def test_a_port_the_server_cannot_bind_is_retried_until_free(pump, targets):
    port = free_port()
    echo = targets.tcp["echo"]
    held = _occupy(port)
    try:
        p = pump(extra=["-R", f"{port}:{echo[0]}:{echo[1]}"])
        assert _remote(p)["state"] == "refused"
        assert f"Warning: remote port forwarding failed for listen port {port}" in p.stderr()
    finally:
        for s in held:
            s.close()
    _eventually(lambda: _forward_state(p)["state"] == "bound", 40, "remote forward bound after retry")
    assert _serves_echo(port)


def test_exit_on_forward_failure_for_a_refused_remote_forward(sshd, targets):
    port = free_port()
    held = _occupy(port)
    try:
        args, dest = base_args(sshd)
        code, err = run_cli(["--workers", "0", *args, "-o", "ExitOnForwardFailure=yes",
                             "-R", f"{port}:127.0.0.1:{targets.tcp['echo'][1]}", dest])
    finally:
        for s in held:
            s.close()
    assert code == 6
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert lines[-1].endswith(f"remote port forwarding failed for listen port {port}"), err
    assert "Traceback" not in err


def test_a_server_that_allows_only_local_forwarding_refuses(sshd, targets):
    with extra_sshd(sshd, allow_tcp_forwarding="local") as local_only:
        args, dest = base_args(local_only)
        code, err = run_cli(["--workers", "0", *args, "-o", "ExitOnForwardFailure=yes",
                             "-R", f"0:127.0.0.1:{targets.tcp['echo'][1]}", dest])
        assert code == 6 and "remote port forwarding failed for listen port 0" in err, err
        with start_pump(local_only, extra=["-R", f"0:127.0.0.1:{targets.tcp['echo'][1]}"]) as p:
            assert p.ready["remote"][0]["state"] == "refused"   # said, and retried; the tunnel runs


@WORKERS
def test_added_and_removed_at_runtime(pump, targets, workers):
    echo = targets.tcp["echo"]
    p = pump(tcp_target := f"0:{echo[0]}:{echo[1]}", workers=workers)
    added = p.ctl("add", spec=tcp_target, kind="R")
    assert added["kind"] == "R" and added["remote"]["state"] == "bound"
    port = added["remote"]["port"]
    assert _serves_echo(port)
    removed = p.ctl("remove", forward=added["id"])
    assert removed["id"] == added["id"]
    # cancel-tcpip-forward: the server stops listening at once.
    _eventually(lambda: _refused(port), 10, "remote port closed after remove")
    code = subprocess.run([*_ctl(p), "add", "-R", f"0:{echo[0]}:{echo[1]}"], capture_output=True, text=True)
    assert code.returncode == 0, code.stderr
    assert "remote localhost:" in code.stdout


def _ctl(p):
    import sys
    return [sys.executable, "-m", "sshpump", "ctl", p.control]


def _refused(port) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    except ConnectionRefusedError:
        return True
    return False


def test_library_remote_forward(sshd, targets):
    import sshpump
    echo = targets.tcp["echo"]
    kw = dict(port=sshd.port, identity=sshd.client_key, known_hosts=sshd.known_hosts, workers=0)
    with sshpump.forward(f"{sshd.user}@{sshd.host}", remote=[f"0:{echo[0]}:{echo[1]}"], **kw) as t:
        (port,) = t.remote_ports
        assert port and _serves_echo(port)
        fwd = t.add(f"0:{echo[0]}:{echo[1]}", kind="R")
        assert fwd.kind == "R" and fwd.remote_port not in (None, port)
        assert _serves_echo(fwd.remote_port)
    assert _refused(port)


def test_worker_killed_the_forward_comes_back(pump, targets):
    port = free_port()
    echo = targets.tcp["echo"]
    p = pump(workers=2, extra=["-R", f"{port}:{echo[0]}:{echo[1]}"])
    p.check_idle = False
    owner = _forward_state(p)["worker"]
    pid = p.stats()["tunnels"]["default"]["workers"][owner]["pid"]
    os.kill(pid, 9)
    _eventually(lambda: _forward_state(p)["state"] == "bound" and _serves_echo(port), 40,
                "remote forward serving after kill -9 of its worker")


def test_sshd_restart_the_forward_comes_back(sshd, targets):
    port = free_port()
    echo = targets.tcp["echo"]
    with extra_sshd(sshd) as other:
        with start_pump(other, extra=["-R", f"{port}:{echo[0]}:{echo[1]}", "-o", "ServerAliveInterval=1",
                                      "-o", "ServerAliveCountMax=2"]) as p:
            p.check_idle = False
            assert _serves_echo(port)
            other.restart()
            _eventually(lambda: _serves_echo(port), 60, "remote forward serving after an sshd restart")


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl not installed")
def test_curl_from_the_server_side(pump):
    import http.server
    import threading

    class Hello(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = b"hello through -R\n"
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *a):
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Hello)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        p = pump(extra=["-R", f"0:127.0.0.1:{srv.server_address[1]}"])
        port = _remote(p)["port"]
        for _ in range(5):
            out = subprocess.run(["curl", "-sS", "--max-time", "10", f"http://127.0.0.1:{port}/"],
                                 capture_output=True, text=True, timeout=20)
            assert out.stdout == "hello through -R\n", out.stderr
    finally:
        srv.shutdown()
        srv.server_close()


def test_psql_from_the_server_side(pump, postgres):
    p = pump(extra=["-R", f"0:{postgres.socket_path}" if getattr(postgres, "socket_path", None)
                    else f"0:127.0.0.1:{postgres.port}"])
    port = _remote(p)["port"]
    out = subprocess.run([*postgres.psql_command(host="127.0.0.1", port=port), "-Atc", "select 40 + 2"],
                         capture_output=True, text=True, timeout=30)
    assert out.stdout.strip() == "42", out.stderr


def test_bad_remote_specs_are_one_line_exit_2(sshd):
    args, dest = base_args(sshd)
    for spec, text in (("8080", "remote dynamic forwarding (SOCKS) is not supported"),
                       ("/tmp/x.sock:h:80", "remote unix socket listener"),
                       ("0:h:99999", "out of range")):
        code, err = run_cli([*args, "-R", spec, dest])
        assert code == 2 and text in err and len(err.strip().splitlines()) == 1, err
