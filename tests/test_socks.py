"""-D: a SOCKS proxy through the tunnel, driven by curl (SOCKS4, 4a, 5 and
5 with server-side names) and by raw handshakes for what curl cannot show:
reply codes after a failed open, bytes sent right after the request,
hostile handshakes closed within a bounded time."""
from __future__ import annotations

import http.server
import json
import shutil
import socket
import struct
import subprocess
import sys
import threading
import time

import pytest

from helpers import connect, extra_sshd, start_pump
from testbed.client import echo_roundtrip, recv_exactly

WORKERS = pytest.mark.parametrize("workers", [0, 2], ids=["w0", "w2"])


class _Hello(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = f"hello from {self.path}\n".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *a):
        pass


@pytest.fixture(scope="module")
def web():
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Hello)
    th = threading.Thread(target=srv.serve_forever, daemon=True)
    th.start()
    yield srv.server_address
    srv.shutdown()
    srv.server_close()


def _socks5(addr, host, port, payload=b""):
    """A raw SOCKS5 CONNECT; returns (socket, reply code)."""
    s = connect(addr, 10)
    s.sendall(b"\x05\x01\x00")
    assert recv_exactly(s, 2) == b"\x05\x00"
    try:
        dst = b"\x01" + socket.inet_aton(host)
    except OSError:
        dst = b"\x03" + bytes([len(host)]) + host.encode()
    s.sendall(b"\x05\x01\x00" + dst + struct.pack("!H", port) + payload)
    reply = recv_exactly(s, 10)
    return s, reply[1]


@WORKERS
@pytest.mark.parametrize("proto", ["socks4", "socks4a", "socks5", "socks5h"])
def test_curl_through_the_socks_proxy(pump, web, workers, proto):
    p = pump(extra=("-D", "0"), workers=workers)
    host, port = p.address
    name = "127.0.0.1" if proto in ("socks4", "socks5") else "localhost"
    r = subprocess.run(["curl", "-sS", "--max-time", "20", "--proxy", f"{proto}://{host}:{port}",
                        f"http://{name}:{web[1]}/{proto}"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0 and r.stdout == f"hello from /{proto}\n", r.stderr


def test_bytes_right_after_the_request_are_not_lost(pump, targets):
    p = pump(extra=("-D", "0"))
    echo = targets.tcp["echo"]
    s, code = _socks5(p.address, echo[0], echo[1], payload=b"sent before the reply")
    with s:
        assert code == 0
        assert recv_exactly(s, 21) == b"sent before the reply"
        echo_roundtrip(s, b"and after", half_close=True)


@pytest.fixture(scope="module")
def sshd_permit_one(sshd):
    with extra_sshd(sshd, permit_open="127.0.0.1:1") as s:
        yield s


def test_reply_codes_after_the_open(pump, targets, sshd_permit_one):
    p = pump(extra=("-D", "0"))
    s, code = _socks5(p.address, "127.0.0.1", targets.tcp["refuse"][1])
    with s:
        assert code == 0x05                    # connection refused
        assert s.recv(10) == b""               # then a normal end: the client read its answer
    with start_pump(sshd_permit_one, extra=("-D", "0")) as q:
        s, code = _socks5(q.address, "127.0.0.1", targets.tcp["echo"][1])
        with s:
            assert code == 0x02                # not allowed by the server's rules
    s = connect(p.address, 10)                 # BIND: command not supported
    with s:
        s.sendall(b"\x05\x01\x00")
        assert recv_exactly(s, 2) == b"\x05\x00"
        s.sendall(b"\x05\x02\x00\x01" + socket.inet_aton("127.0.0.1") + struct.pack("!H", 80))
        assert recv_exactly(s, 10)[1] == 0x07


def test_hostile_handshakes_are_closed_within_a_bounded_time(pump, targets):
    p = pump(extra=("-D", "0"))
    with connect(p.address, 10) as s:          # garbage: closed at once
        s.sendall(b"GET / HTTP/1.0\r\n\r\n")
        s.settimeout(10)
        assert s.recv(10) == b""
    with connect(p.address, 10) as s:          # oversized SOCKS4 user id
        s.sendall(b"\x04\x01\x00\x50\x7f\x00\x00\x01" + b"u" * 4000)
        s.settimeout(10)
        assert s.recv(10)[1] == 0x5B
    with connect(p.address, 10) as s:          # a slow drip: cut after the handshake timeout (10 s)
        s.sendall(b"\x05\x01\x00")
        assert recv_exactly(s, 2) == b"\x05\x00"
        s.sendall(b"\x05\x01\x00\x03\xff")   # a 255-byte name, one byte every half second
        s.settimeout(0.5)
        t0 = time.monotonic()
        closed = False
        while not closed and time.monotonic() - t0 < 25:
            try:
                closed = s.recv(10) == b""
            except socket.timeout:
                try:
                    s.send(b"a")
                except OSError:
                    closed = True
            except ConnectionResetError:
                closed = True
        assert closed, "a slow drip was not cut"
    echo = targets.tcp["echo"]                 # and the proxy still serves
    s, code = _socks5(p.address, echo[0], echo[1])
    with s:
        assert code == 0
        echo_roundtrip(s, b"still serving", half_close=True)


def _curl(proxy_addr, web, proto="socks5h", path="/x"):
    r = subprocess.run(["curl", "-sS", "--max-time", "20", "--proxy", f"{proto}://{proxy_addr[0]}:{proxy_addr[1]}",
                        f"http://localhost:{web[1]}{path}"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0 and r.stdout == f"hello from {path}\n", r.stderr
    return r.stdout


@WORKERS
def test_socks_forwards_added_at_runtime_library_and_control(sshd, web, workers):
    import sshpump

    kw = dict(port=sshd.port, identity=sshd.client_key, known_hosts=sshd.known_hosts, identities_only=True,
              use_agent=False, workers=workers)
    with sshpump.forward(f"{sshd.user}@{sshd.host}", dynamic=["0"], **kw) as t:
        first = t.forwards[0]
        assert first.target == "SOCKS"
        _curl(first.address, web, path="/from-forward")
        extra = t.add("127.0.0.1:0", kind="D")
        _curl(extra.address, web, path="/added")
        t.remove(extra)
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(extra.address, 5).close()
        _curl(first.address, web, path="/still")


def test_ctl_add_d(pump, web):
    p = pump(extra=("-D", "0"))
    added = p.ctl("add", spec="0", kind="D")
    assert added["target"] == "SOCKS"
    _curl(tuple(added["listen"][0]), web, path="/via-ctl")
    rc = subprocess.run([sys.executable, "-m", "sshpump", "ctl", p.control, "add", "-D", "0", "--json"],
                        capture_output=True, text=True, timeout=30)
    assert rc.returncode == 0 and json.loads(rc.stdout)["target"] == "SOCKS", rc.stderr
    for fid in (added["id"], json.loads(rc.stdout)["id"]):
        p.ctl("remove", forward=fid)   # the teardown counts fds: listeners included


def test_psql_through_the_socks_proxy(pump, postgres, tmp_path):
    """A PostgreSQL client that knows nothing of SOCKS, sent through -D by
    proxychains4 (LD_PRELOAD), with the database's name resolved server-side."""
    if not shutil.which("proxychains4"):
        pytest.skip("proxychains4 not installed; run scripts/install-system-deps.sh")
    p = pump(extra=("-D", "0"), workers=2)
    conf = tmp_path / "proxychains.conf"
    conf.write_text("strict_chain\nquiet_mode\nproxy_dns\ntcp_read_time_out 15000\ntcp_connect_time_out 8000\n"
                    f"[ProxyList]\nsocks5 {p.address[0]} {p.address[1]}\n")
    for host in ("127.0.0.1", "localhost"):
        r = subprocess.run(["proxychains4", "-f", str(conf),
                            *postgres.psql_command("-tAc", "select 40 + 2", host=host)],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0 and r.stdout.strip() == "42", r.stderr
