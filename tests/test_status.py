"""`sshpump status` against a running sshpump with connections held open
(known bytes each way): --json checked against the sockets themselves (which
worker process holds each one, per `ss -p`), the plain rendering, and the
--watch screen in a real terminal (tmux, capture-pane): connections appear
and disappear, Ctrl-C and SIGTERM exit 0 with the cursor back, a stopped
sshpump shows "is gone" (exit 3), many connections show the newest that fit
and "+K more"."""
from __future__ import annotations

import json
import os
import re
import select
import shutil
import signal
import subprocess
import tempfile
import time

import pytest

from helpers import PY, _direct_children, clean_env, connect, tcp_spec
from sshpump.control.views import size
from testbed._util import wait_for
from testbed.client import echo_roundtrip

SOURCE_LINE = b"123456 status-test\n"   # the source target sends 123456 bytes back


def status(p, *args, timeout=30):
    return subprocess.run([PY, "-m", "sshpump", "status", p.control, *args], capture_output=True,
                          env=clean_env(), timeout=timeout, text=True)


def recv_exactly(s, n):
    got = 0
    while got < n:
        chunk = s.recv(min(65536, n - got))
        assert chunk, f"EOF after {got} of {n} bytes"
        got += len(chunk)


def hold(p, targets):
    """Three connections, left open, with known bytes each way:
    {client "host:port": (socket, forward id, up bytes, down bytes)}."""
    held = {}
    for addr, fwd, payload in ((p.listen[0], "f1", b"a" * 3000), (p.listen[0], "f1", b"b" * 70000)):
        s = connect(addr, 10)
        echo_roundtrip(s, payload)
        held["%s:%d" % s.getsockname()[:2]] = (s, fwd, len(payload), len(payload))
    s = connect(p.listen[1], 10)
    s.sendall(SOURCE_LINE)
    recv_exactly(s, 123456)
    held["%s:%d" % s.getsockname()[:2]] = (s, "f2", len(SOURCE_LINE), 123456)
    return held


def release(held):
    for s, *_ in held.values():
        s.close()


def owners(listen, client) -> set[int]:
    """Pids of the processes holding sshpump's end of a client's connection."""
    lhost, lport = listen
    chost, cport = client.rsplit(":", 1)
    out = subprocess.run(["ss", "-tnpH", "state", "connected", "src", f"{lhost}:{lport}",
                          "dst", f"{chost}:{cport}"], capture_output=True, text=True, timeout=10).stdout
    return {int(pid) for pid in re.findall(r"pid=(\d+)", out)}


@pytest.fixture
def two_forwards(pump, targets):
    return pump(tcp_spec(targets.tcp["echo"]), tcp_spec(targets.tcp["source"]), workers=2)


def test_json_has_each_connection_with_its_bytes_forward_and_worker(two_forwards, targets):
    p = two_forwards
    held = hold(p, targets)
    try:
        r = status(p, "--json")
        assert r.returncode == 0 and r.stderr == "", r
        data = json.loads(r.stdout)
        assert set(data) == {"stats", "connections"}
        tunnel = data["stats"]["tunnels"]["default"]
        pids = {w["index"]: w["pid"] for w in tunnel["workers"]}
        assert len(pids) == 2 and all(w["up"] for w in tunnel["workers"])
        assert [f["id"] for f in tunnel["forwards"]] == ["f1", "f2"]
        conns = {c["client"]: c for c in data["connections"]}
        assert set(conns) == set(held), data["connections"]
        listen = {"f1": p.listen[0], "f2": p.listen[1]}
        for client, (_s, fwd, up, down) in held.items():
            c = conns[client]
            assert (c["forward"], c["up_bytes"], c["down_bytes"], c["tunnel"]) == (fwd, up, down, "default"), c
            # The worker it names is the process that holds the socket.
            assert owners(listen[fwd], client) == {pids[c["worker"]]}, (c, pids)
        loads = {i: sum(1 for c in conns.values() if c["worker"] == i) for i in pids}
        assert loads == {w["index"]: w["load"] for w in tunnel["workers"]}
    finally:
        release(held)


def test_plain_rendering_without_a_terminal(two_forwards, targets):
    p = two_forwards
    held = hold(p, targets)
    try:
        r = status(p)
        assert r.returncode == 0 and r.stderr == "", r
        text = r.stdout
        assert "\x1b" not in text   # no colour, no cursor codes
        assert "Connections (3)" in text and "running" in text
        for f in p.ready["listen"][:2]:
            assert re.search(rf"^{f['id']}\s+default\s+{re.escape(f['spec'])}\s", text, re.M), text
        conns = {c["client"]: c for c in p.connections()}
        for client, (_s, fwd, up, down) in held.items():
            row = next(line for line in text.splitlines() if f" {client} " in line)
            assert row.split()[:4] == [str(conns[client]["id"]), "default", fwd, client], row
            assert f"{size(up)}" in row and f"{size(down)}" in row and conns[client]["target"] in row, row
    finally:
        release(held)


def test_errors_are_one_line_with_exit_codes():
    for args, code in ((["/nonexistent/ctl.sock"], 3), (["/nonexistent/ctl.sock", "--watch"], 3),
                       (["/x", "--interval", "0"], 2), (["/x", "--frobnicate"], 2), ([], 2)):
        r = subprocess.run([PY, "-m", "sshpump", "status", *args], capture_output=True, text=True, timeout=30)
        assert r.returncode == code and r.stdout == "" and r.stderr.count("\n") == 1, (args, r)


# ---- in a real terminal ---------------------------------------------------------

class Term:
    """`sshpump status --watch` in a tmux pane of its own tmux server. The
    pane runs bash, which writes sshpump's exit code to a file and then
    sleeps, so the pane stays alive and its cursor state can be read (tmux
    3.3's #{pane_dead_status} is sometimes left empty when the pty closes
    before the child is reaped)."""

    def __init__(self, path, width=160, height=40, interval=0.2):
        self.dir = tempfile.mkdtemp(prefix="sshpump-status-tmux-")
        self.rc_file = os.path.join(self.dir, "rc")
        self.sock = os.path.join(self.dir, "tmux.sock")   # a private tmux server, removed with the directory
        cmd = (f"{PY} -m sshpump status {path} --watch --interval {interval}; "
               f"echo $? > {self.rc_file}; exec sleep 120")
        self.tmux("new-session", "-d", "-x", str(width), "-y", str(height), "bash", "-c", cmd)

    def tmux(self, *args) -> str:
        r = subprocess.run(["tmux", "-S", self.sock, "-f", "/dev/null", *args], capture_output=True,
                           text=True, timeout=10, env={**clean_env(), "TERM": "xterm-256color"})
        assert r.returncode == 0, r
        return r.stdout

    def screen(self) -> str:
        return self.tmux("capture-pane", "-p")

    def wait_screen(self, check, what, timeout=15.0) -> str:
        try:
            return wait_for(lambda: (lambda s: s if check(s) else None)(self.screen()), timeout,
                            interval=0.05, what=what)
        except TimeoutError:
            raise AssertionError(f"screen never showed {what}:\n{self.screen()}") from None

    def status_pid(self) -> int:
        bash = int(self.tmux("display", "-p", "#{pane_pid}").strip())
        return wait_for(lambda: (_direct_children(bash) or [None])[0], 10, what="sshpump status running")

    def exit_code(self, timeout=10.0) -> int:
        text = wait_for(lambda: os.path.exists(self.rc_file) and open(self.rc_file).read().strip(), timeout,
                        what="sshpump status to exit")
        return int(text)

    def cursor_visible(self) -> bool:
        return self.tmux("display", "-p", "#{cursor_flag}").strip() == "1"

    def close(self):
        subprocess.run(["tmux", "-S", self.sock, "kill-server"], capture_output=True, timeout=10)
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def term():
    made = []

    def start(*a, **kw):
        made.append(Term(*a, **kw))
        return made[-1]

    yield start
    for t in made:
        t.close()


def rows(screen: str) -> list[list[str]]:
    """The connection rows on a screen, split into cells."""
    lines = screen.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("Connections ("))
    return [line.split() for line in lines[start + 2:] if re.match(r"\s*\d+\s", line)]


def test_watch_in_a_terminal_connections_come_and_go_then_ctrl_c(two_forwards, targets, term):
    p = two_forwards
    t = term(p.control)
    t.wait_screen(lambda s: "Connections (0)" in s and re.search(r"^f2\s+default", s, re.M), "both forwards")
    assert not t.cursor_visible()   # rich hides it while drawing
    held = hold(p, targets)
    clients = list(held)
    screen = t.wait_screen(lambda s: "Connections (3)" in s and all(c in s for c in clients), "3 connections")
    print("\n".join(line.rstrip() for line in screen.rstrip("\n").splitlines()))   # a real capture, for -s
    shown = {r[3]: r for r in rows(screen)}
    conns = {c["client"]: c for c in p.connections()}
    for client, (_s, fwd, up, down) in held.items():
        assert shown[client][:4] == [str(conns[client]["id"]), "default", fwd, client], screen
        assert shown[client][-2] == str(conns[client]["worker"]), screen
    gone_one = clients[1]
    held.pop(gone_one)[0].close()
    t.wait_screen(lambda s: "Connections (2)" in s and gone_one not in s and all(c in s for c in held),
                  "the closed connection gone, the others still there")
    release(held)
    t.wait_screen(lambda s: "Connections (0)" in s and not rows(s), "no connections")
    t.tmux("send-keys", "C-c")
    assert t.exit_code() == 0
    assert t.cursor_visible()   # the terminal is restored
    after = t.screen()
    assert "Traceback" not in after and "Connections (0)" in after   # the last frame stays on the screen


def test_watch_shows_gone_when_sshpump_stops(pump, targets, term):
    p = pump(tcp_spec(targets.tcp["echo"]))
    t = term(p.control)
    t.wait_screen(lambda s: "Connections (0)" in s, "the first frame")
    assert p.stop() == 0
    screen = t.wait_screen(lambda s: f"sshpump at {p.control} is gone" in s, "the gone message")
    assert t.exit_code() == 3
    assert t.cursor_visible() and "Traceback" not in screen


def test_watch_with_many_connections_shows_the_newest_that_fit_then_sigterm(pump, targets, term):
    p = pump(tcp_spec(targets.tcp["echo"]), workers=2)
    socks = []
    try:
        for i in range(14):
            s = connect(p.address, 10)
            echo_roundtrip(s, b"x" * (i + 1))
            socks.append(s)
            time.sleep(0.01)   # distinct ages: "newest" is well defined
        ids = [c["id"] for c in sorted(p.connections(), key=lambda c: c["age"])]   # newest first
        t = term(p.control, width=120, height=24)
        screen = t.wait_screen(lambda s: "Connections (14)" in s and "more (older)" in s, "a cut list")
        lines = screen.splitlines()
        assert lines[0].startswith("sshpump pid") and len(lines) <= 24, screen   # the frame fits the screen
        shown = [int(r[0]) for r in rows(screen)]
        more = int(re.search(r"^\+(\d+) more \(older\)$", screen, re.M).group(1))
        assert len(shown) >= 3 and len(shown) + more == 14 and shown == ids[:len(shown)], (ids, screen)
        os.kill(t.status_pid(), signal.SIGTERM)
        assert t.exit_code() == 0 and t.cursor_visible()
    finally:
        for s in socks:
            s.close()


def test_watch_json_prints_one_object_per_line_until_sigterm(pump, targets):
    p = pump(tcp_spec(targets.tcp["echo"]))
    proc = subprocess.Popen([PY, "-m", "sshpump", "status", p.control, "--watch", "--json", "--interval", "0.1"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=clean_env())
    try:
        with connect(p.address, 10) as s:
            echo_roundtrip(s, b"y" * 777)
            client = "%s:%d" % s.getsockname()[:2]
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline:
                if not select.select([proc.stdout], [], [], 1)[0]:
                    continue
                data = json.loads(proc.stdout.readline())
                if any(c["client"] == client and c["up_bytes"] == 777 for c in data["connections"]):
                    break
            else:
                raise AssertionError("the connection never showed")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        proc.stdout.close()
        proc.stderr.close()
