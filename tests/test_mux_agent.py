"""The --mux remote agent on its own: run as a local subprocess whose stdin
and stdout are one end of a socketpair, spoken to by a small reference
client written here from the frame format in the agent's docstring."""
from __future__ import annotations

import errno
import hashlib
import socket
import struct
import subprocess
import sys
import time

import pytest
from hypothesis import given, settings, strategies as st

from sshpump.mux import agent as A
from testbed.data import pattern_bytes, pattern_digest

AGENT = A.__file__


class RefClient:
    """Blocking reference client: sends frames, reads frames, keeps credit."""

    def __init__(self):
        self.sock, theirs = socket.socketpair()
        self.proc = subprocess.Popen([sys.executable, AGENT], stdin=theirs, stdout=theirs,
                                     stderr=subprocess.PIPE)
        theirs.close()
        self.sock.settimeout(10)
        self.buf = b""
        hello = self._read_until(b"\n")
        assert hello == A.HELLO, hello
        self.credit = {}

    def _read_until(self, end):
        while end not in self.buf:
            chunk = self.sock.recv(65536)
            assert chunk, "agent closed"
            self.buf += chunk
        i = self.buf.index(end) + len(end)
        out, self.buf = self.buf[:i], self.buf[i:]
        return out

    def send(self, kind, sid, length=0, payload=b""):
        self.sock.sendall(A.frame(kind, sid, length, payload))

    def open_tcp(self, sid, addr):
        host, port = addr
        self.credit[sid] = A.INITIAL_WINDOW
        self.send(A.OPEN, sid, len(host) + 3, b"t" + struct.pack("!H", port) + host.encode())

    def open_unix(self, sid, path):
        self.credit[sid] = A.INITIAL_WINDOW
        self.send(A.OPEN, sid, len(path) + 1, b"u" + path.encode())

    def data(self, sid, payload):
        assert len(payload) <= self.credit[sid]
        self.credit[sid] -= len(payload)
        self.send(A.DATA, sid, len(payload), payload)

    def frame(self):
        while len(self.buf) < 12:
            chunk = self.sock.recv(1 << 20)
            assert chunk, "agent closed"
            self.buf += chunk
        ver, kind, _flags, sid, length = A.HEADER.unpack_from(self.buf)
        assert ver == A.VERSION
        n = 12 + (length if kind in (A.OPEN_FAIL, A.DATA) else 0)
        while len(self.buf) < n:
            chunk = self.sock.recv(1 << 20)
            assert chunk, "agent closed"
            self.buf += chunk
        payload, self.buf = self.buf[12:n], self.buf[n:]
        if kind == A.WINDOW:
            self.credit[sid] = self.credit.get(sid, 0) + length
        return kind, sid, length, payload

    def close(self):
        self.sock.close()
        try:
            self.proc.wait(5)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture
def client():
    c = RefClient()
    yield c
    c.close()


def send_all(c, sid, payload, pending):
    """Send payload as DATA within credit, reading frames meanwhile into pending."""
    off = 0
    while off < len(payload):
        room = min(c.credit[sid], 32768, len(payload) - off)
        if room <= 0:
            pending.append(c.frame())
            continue
        c.data(sid, payload[off:off + room])
        off += room


def collect(c, sids, pending=(), grant=True):
    """Read frames until every stream in sids is CLOSEd; per-stream bytes and kinds seen."""
    got = {sid: bytearray() for sid in sids}
    kinds = {sid: [] for sid in sids}
    open_ = set(sids)
    frames = list(pending)
    while open_:
        kind, sid, length, payload = frames.pop(0) if frames else c.frame()
        if sid not in got:
            continue
        kinds[sid].append(kind)
        if kind == A.DATA:
            got[sid] += payload
            if grant:
                c.send(A.WINDOW, sid, len(payload))
        elif kind in (A.CLOSE, A.RESET, A.OPEN_FAIL):
            open_.discard(sid)
    return got, kinds


def test_echo_pipelined(client, targets):
    payload = pattern_bytes("mux-echo", 3 << 20)
    pending = []
    client.open_tcp(1, targets.tcp["echo"])
    send_all(client, 1, payload, pending)   # data right after OPEN, before OPEN_OK
    client.send(A.EOF, 1)
    got, kinds = collect(client, [1], pending)
    assert bytes(got[1]) == payload
    assert kinds[1][0] == A.OPEN_OK and kinds[1][-2:] == [A.EOF, A.CLOSE]


def test_unix_and_many_streams(client, targets):
    sids = list(range(1, 101))
    pending = []
    for sid in sids:
        if sid % 2:
            client.open_tcp(sid, targets.tcp["echo"])
        else:
            client.open_unix(sid, targets.unix["echo"])
    for sid in sids:
        send_all(client, sid, pattern_bytes(f"many{sid}", 1000 + sid * 97), pending)
        client.send(A.EOF, sid)
    got, _ = collect(client, sids, pending)
    for sid in sids:
        assert bytes(got[sid]) == pattern_bytes(f"many{sid}", 1000 + sid * 97)


def test_upload_checksum_and_credit_returned(client, targets):
    n = 8 << 20
    pending = []
    client.open_tcp(7, targets.tcp["sink"])
    send_all(client, 7, pattern_bytes("mux-up", n), pending)
    client.send(A.EOF, 7)
    got, _ = collect(client, [7], pending)
    assert bytes(got[7]) == f"{n} {pattern_digest('mux-up', n)}\n".encode()


def test_open_failures(client, targets, tmp_path):
    client.open_tcp(3, targets.tcp["refuse"])
    client.open_unix(4, str(tmp_path / "nothing.sock"))
    client.open_tcp(5, ("no-such-host.invalid", 80))
    fails = {}
    while len(fails) < 3:
        kind, sid, _length, payload = client.frame()
        assert kind == A.OPEN_FAIL, kind
        fails[sid] = struct.unpack("!BI", payload[:5]) + (payload[5:].decode(),)
    assert fails[3][:2] == (A.CONNECT_FAILED, errno.ECONNREFUSED)
    assert fails[4][:2] == (A.CONNECT_FAILED, errno.ENOENT)
    assert fails[5][0] == A.CONNECT_FAILED and "resolve" in fails[5][2]
    # frames for a failed stream are ignored, and the agent still serves
    client.send(A.DATA, 3, 3, b"abc")
    client.send(A.PING, 0, 77)
    assert client.frame()[:3] == (A.PONG, 0, 77)


def test_slow_stream_stalls_only_itself(client, targets):
    """A download whose credit is never returned stops at the window; an
    echo stream beside it goes on."""
    client.open_tcp(1, targets.tcp["source"])
    line = f"{64 << 20} slow\n".encode()
    client.data(1, line)
    got = 0
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline and got < A.INITIAL_WINDOW:
        kind, sid, length, payload = client.frame()
        if kind == A.DATA:
            got += len(payload)
    assert got == A.INITIAL_WINDOW
    client.open_tcp(2, targets.tcp["echo"])
    pending = []
    send_all(client, 2, b"still moving", pending)
    client.send(A.EOF, 2)
    echoed = bytearray()
    for kind, sid, length, payload in pending:
        assert sid != 1 or kind != A.DATA
    while True:
        kind, sid, length, payload = client.frame()
        assert not (sid == 1 and kind == A.DATA), "stream 1 sent beyond its window"
        if sid == 2 and kind == A.DATA:
            echoed += payload
        if sid == 2 and kind == A.CLOSE:
            break
    assert bytes(echoed) == b"still moving"
    client.send(A.RESET, 1)


def test_half_close_and_reset(client, targets):
    client.open_tcp(1, targets.tcp["sink"])
    client.data(1, b"abc")
    client.send(A.EOF, 1)   # the sink answers only after our EOF reached it
    got, kinds = collect(client, [1])
    assert bytes(got[1]) == f"3 {hashlib.sha256(b'abc').hexdigest()}\n".encode()
    client.open_tcp(2, targets.tcp["echo"])
    client.data(2, b"x" * 1000)
    client.send(A.RESET, 2)
    client.send(A.PING, 0, 1)   # the agent took the RESET and still serves
    while client.frame()[0] != A.PONG:
        pass


def test_exits_when_stdin_closes(targets):
    c = RefClient()
    c.open_tcp(1, targets.tcp["echo"])
    assert c.frame()[0] == A.OPEN_OK
    c.sock.shutdown(socket.SHUT_WR)
    assert c.proc.wait(5) == 0
    c.close()


def test_protocol_error_is_one_line(client):
    client.send(A.DATA, 9, 2 * A.INITIAL_WINDOW)
    assert client.proc.wait(5) == 2
    err = client.proc.stderr.read().decode()
    assert err.startswith("sshpump mux agent: protocol error") and err.count("\n") == 1


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(1, 40), min_size=1, max_size=30), st.lists(st.integers(1, 200), max_size=20))
def test_frames_parse_across_any_split(values, cuts):
    """The same frames, cut into arbitrary pieces, give the same replies."""
    c = RefClient()
    try:
        stream = b"".join(A.frame(A.PING, i, v) for i, v in enumerate(values))
        pos = 0
        for cut in cuts:
            if pos >= len(stream):
                break
            c.sock.sendall(stream[pos:pos + cut])
            pos += cut
            time.sleep(0.0005)
        c.sock.sendall(stream[pos:])
        replies = [c.frame()[:3] for _ in values]
        assert replies == [(A.PONG, i, v) for i, v in enumerate(values)]
    finally:
        c.close()
