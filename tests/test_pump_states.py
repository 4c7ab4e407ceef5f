"""The C pump driven directly (no worker, no master) over a real SSH session:
``Pump.conn_stats`` reports each direction's bytes, buffered bytes and state,
states only move forward (open -> drain -> done, then closing), and when a
connection is reported done its id, connections and buffers are back to 0."""
from __future__ import annotations

import hashlib
import os
import re
import select
import shutil
import socket
import subprocess
import sys
import time

import sshpump  # noqa: F401  (first: it loads the patched libssh2)
import pytest
from sshpump import session as ssh_session
from sshpump.options import Options
from sshpump.pump import END_ABORTED, END_NORMAL, EV_DONE, Pump
from testbed.client import connect, echo_roundtrip
from testbed.data import pattern_digest

from helpers import clean_env, start_pump

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

RANK = {"open": 0, "drain": 1, "done": 2, "closing": 3}
KEYS = {"up_bytes", "down_bytes", "buffered_up", "buffered_down", "up_state", "down_state"}


class Rig:
    """One authenticated session, its pump, and channels to the targets."""

    def __init__(self, sshd):
        opts = Options(host=sshd.host, port=sshd.port, user=sshd.user, identities=[sshd.client_key],
                       identities_only=True, use_agent=False, known_hosts=[sshd.known_hosts])
        self.session, self.sock, self.control = ssh_session.connect(opts)
        self.pump = Pump(self.session, self.sock.fileno(), bufsize=65536)
        if self.control is not None:
            self.pump.set_control(self.control)
        self.channels = {}
        self.events = []

    def add(self, target):
        """A client socket carried by the pump to target; returns (cid, our end)."""
        self.session.set_blocking(True)  # a blocking open keeps the test short
        try:
            ch = self.session.direct_tcpip_ex(target[0], target[1], "127.0.0.1", 0)
        finally:
            self.session.set_blocking(False)
        ours, theirs = socket.socketpair()
        theirs.setblocking(False)
        ours.setblocking(False)
        cid = self.pump.add(theirs.detach(), ch)
        self.channels[cid] = ch  # alive until its DONE event
        return cid, ours

    def run(self):
        for ev in self.pump.run():
            self.events.append(ev)
            if ev[0] == EV_DONE:
                self.channels.pop(ev[1], None)

    def until(self, cond, what, timeout=30.0, each=None):
        deadline = time.monotonic() + timeout
        while True:
            self.run()
            if each:
                each()
            if cond():
                return
            assert time.monotonic() < deadline, f"timed out waiting for {what}"
            select.select([self.pump.fileno], [], [], 0.02)

    def done(self, cid):
        return [ev for ev in self.events if ev[0] == EV_DONE and ev[1] == cid]

    def close(self):
        self.pump.close()
        self.channels.clear()
        self.control = None
        self.session = None
        self.sock.close()


@pytest.fixture
def rig(sshd):
    r = Rig(sshd)
    yield r
    r.close()


def _states(st):
    return RANK[st["up_state"]], RANK[st["down_state"]]


def _assert_all_freed(rig):
    s = rig.pump.stats()
    assert (s["conns"], s["buffered"], s["buffers"]) == (0, 0, 0), s


def test_conn_stats_follow_a_download_and_its_half_close(rig, targets):
    n = 4 << 20
    line = b"%d states\n" % n
    cid, c = rig.add(targets.tcp["source"])
    st = rig.pump.conn_stats(cid)
    assert set(st) == KEYS
    assert st == {"up_bytes": 0, "down_bytes": 0, "buffered_up": 0, "buffered_down": 0,
                  "up_state": "open", "down_state": "open"}
    c.sendall(line)
    seen = [_states(st)]

    def watch():
        s = rig.pump.conn_stats(cid)
        if s is not None:
            seen.append(_states(s))

    # The client does not read: the pump holds what its socket cannot take.
    rig.until(lambda: rig.pump.conn_stats(cid)["buffered_down"] > 0, "bytes buffered down", each=watch)
    st = rig.pump.conn_stats(cid)
    assert st["up_bytes"] == len(line) and st["buffered_up"] == 0
    assert (st["up_state"], st["down_state"]) == ("open", "open")
    assert rig.pump.stats()["buffered"] == st["buffered_down"]

    # Read it all: the server's EOF moves down to done; up stays open (the
    # source waits for our EOF).
    got = hashlib.sha256()
    total = [0]

    def read():  # in sips, so that the pump still holds bytes at the server's EOF
        watch()
        try:
            b = c.recv(32 << 10)
        except BlockingIOError:
            return
        got.update(b)
        total[0] += len(b)

    rig.until(lambda: rig.pump.conn_stats(cid)["down_state"] == "done", "down done", each=read)
    c.settimeout(10)  # the rest is in our socket, then its EOF
    while b := c.recv(1 << 20):
        got.update(b)
        total[0] += len(b)
    c.setblocking(False)
    assert total[0] == n and got.hexdigest() == pattern_digest("states", n)
    st = rig.pump.conn_stats(cid)
    assert st == {"up_bytes": len(line), "down_bytes": n, "buffered_up": 0, "buffered_down": 0,
                  "up_state": "open", "down_state": "done"}

    # Our EOF: up drains, the channel closes, the connection is reported.
    c.shutdown(socket.SHUT_WR)
    rig.until(lambda: rig.done(cid), "the DONE event", each=watch)
    (_, _, reason, err, up, down), = rig.done(cid)
    assert (reason, err, up, down) == (END_NORMAL, 0, len(line), n)
    assert rig.pump.conn_stats(cid) is None
    # Each direction only moved forward. (Down's "drain" is usually seen too,
    # when the server's EOF comes while the pump still holds bytes; not
    # always, so not asserted.)
    ups = [u for u, _ in seen]
    downs = [d for _, d in seen]
    assert ups == sorted(ups) and downs == sorted(downs), seen
    assert (RANK["open"], RANK["done"]) in seen
    _assert_all_freed(rig)
    c.close()


def test_conn_stats_count_what_each_direction_holds(rig, targets):
    """An echo whose client stops reading: bytes back up to the server and
    into the pump's up buffer; the per-connection numbers add up to the
    pump's total."""
    cid, c = rig.add(targets.tcp["echo"])
    chunk = os.urandom(1 << 16)
    sent = hashlib.sha256()
    nsent = [0]

    def push():
        while nsent[0] < 256 << 20:
            try:
                k = c.send(chunk)
            except BlockingIOError:
                return
            sent.update(chunk[:k])
            nsent[0] += k

    def both_held():
        st = rig.pump.conn_stats(cid)
        return st["buffered_up"] > 0 and st["buffered_down"] > 0

    rig.until(both_held, "bytes held in both directions", timeout=60, each=push)
    st = rig.pump.conn_stats(cid)
    assert (st["up_state"], st["down_state"]) == ("open", "open")
    assert rig.pump.stats()["buffered"] == st["buffered_up"] + st["buffered_down"]
    assert st["up_bytes"] + st["buffered_up"] <= nsent[0]
    assert st["down_bytes"] <= st["up_bytes"]

    # Drain it all back: every byte echoed, in order.
    c.shutdown(socket.SHUT_WR)
    got = hashlib.sha256()
    ngot = [0]
    eof = [False]

    def read():
        while not eof[0]:
            try:
                b = c.recv(1 << 20)
            except BlockingIOError:
                return
            if not b:
                eof[0] = True
                return
            got.update(b)
            ngot[0] += len(b)

    rig.until(lambda: eof[0] and rig.done(cid), "echo back and DONE", timeout=60, each=read)
    (_, _, reason, _, up, down), = rig.done(cid)
    assert reason == END_NORMAL and up == down == ngot[0] == nsent[0]
    assert got.digest() == sent.digest()
    assert rig.pump.conn_stats(cid) is None
    _assert_all_freed(rig)
    c.close()


def test_abort_moves_both_directions_to_closing(rig, targets):
    cid, c = rig.add(targets.tcp["echo"])
    c.sendall(b"ping")
    rig.until(lambda: rig.pump.conn_stats(cid)["down_bytes"] == 4, "the echo")
    assert c.recv(16) == b"ping"
    other, c2 = rig.add(targets.tcp["echo"])
    rig.pump.abort(cid)
    st = rig.pump.conn_stats(cid)
    assert (st["up_state"], st["down_state"]) == ("closing", "closing")
    assert st["buffered_up"] == st["buffered_down"] == 0
    assert rig.pump.conn_stats(other)["up_state"] == "open"  # the other one runs on
    rig.until(lambda: rig.done(cid), "the aborted connection's DONE")
    assert rig.done(cid)[0][2] == END_ABORTED
    assert rig.pump.conn_stats(cid) is None
    c2.shutdown(socket.SHUT_WR)
    rig.until(lambda: rig.done(other), "the other DONE")
    assert rig.done(other)[0][2] == END_NORMAL
    _assert_all_freed(rig)
    c.close()
    c2.close()


def test_conn_stats_of_no_connection_is_none(rig):
    for cid in (-1, 0, 1, 63, 64, 1 << 20):
        assert rig.pump.conn_stats(cid) is None
    assert set(rig.pump.stats()) == {"conns", "buffered", "buffers", "rx_bytes", "last_rx", "out_blocked"}


@pytest.fixture(scope="module")
def debug_package(tmp_path_factory):
    """A copy of the sshpump package whose _pump is a PUMP_DEBUG build."""
    root = tmp_path_factory.mktemp("pumpdebug")
    shutil.copytree(os.path.join(REPO, "src", "sshpump"), root / "sshpump",
                    ignore=shutil.ignore_patterns("_pump*.so", "__pycache__"))
    build = root / "build"
    code = (
        "import sys; sys.path.insert(0, 'csrc'); import build_pump; "
        f"build_pump.ffibuilder.compile(tmpdir={str(build)!r}, verbose=False)"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=dict(os.environ, SSHPUMP_PUMP_DEBUG="1"),
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    built = list((build / "sshpump").glob("_pump*.so"))
    assert built, os.listdir(build)
    shutil.copy(built[0], root / "sshpump" / built[0].name)
    return root


def test_debug_build_traces_only_legal_state_changes(debug_package, sshd, targets):
    """Every state change of a PUMP_DEBUG build is traced with SSHPUMP_PUMP_TRACE=1
    (and an illegal one would abort the process): a half-closed echo walks
    both directions through open -> drain -> done and then closes; a client
    that resets mid-download goes straight from running to closing."""
    env = clean_env({"PYTHONPATH": f"{debug_package}{os.pathsep}{REPO}", "SSHPUMP_PUMP_TRACE": "1"})
    echo, source = targets.tcp["echo"], targets.tcp["source"]
    p = start_pump(sshd, f"0:{echo[0]}:{echo[1]}", f"0:{source[0]}:{source[1]}", workers=0, env=env)
    try:
        a_echo, a_source = p.listen
        with connect(a_echo) as s:
            echo_roundtrip(s, b"traced" * 1000, half_close=True)
        p.wait_log("running -> closing")  # the pump's trace, not the worker's log
        s = connect(a_source)
        s.sendall(b"%d trace\n" % (64 << 20))
        s.recv(65536)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        s.close()
        p.wait_log("running -> closing", count=2)
        assert p.proc.poll() is None
        log = p.stderr()
    finally:
        p.close()
    assert "refused" not in log, log[-4000:]
    found = re.findall(r"^sshpump pump: conn (\d+): (\w+) (\w+) -> (\w+)$", log, re.M)
    trace = [f"{what} {frm}->{to}" for _, what, frm, to in found]
    # Causal order: our EOF reaches the echo before it sends its own. (The
    # second connection may reuse the first one's id, or not.)
    assert trace == ["up open->drain", "up drain->done", "down open->drain", "down drain->done",
                     "conn running->closing",
                     "conn running->closing"], log[-4000:]
    assert len({cid for cid, *_ in found[:5]}) == 1, found
