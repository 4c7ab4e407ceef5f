"""The control socket: a real ControlServer on a real unix socket (its own
uvloop thread), a small real handler, the sync client and the `ctl` CLI run
as a subprocess."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time

import pytest
import uvloop

import sshpump
from sshpump.control.client import request
from sshpump.control.protocol import MAX_LINE, ControlError
from sshpump.control.server import ControlServer
from sshpump.control.views import render
from sshpump.errors import ConnectError, ForwardError, SshpumpError, UsageError, error_from_wire

SRC = os.path.dirname(os.path.dirname(os.path.abspath(sshpump.__file__)))


class Forwards:
    """A handler that keeps forwards in a dict, as the real one keeps them
    in the tunnels; it records every call to prove refused peers reach none."""

    def __init__(self):
        self.forwards = {}
        self.calls = []
        self.next_id = 1
        self.gate = None        # set by a test: "drain" waits on it

    async def __call__(self, cmd, args):
        self.calls.append((cmd, args))
        if cmd == "ping":
            return {"pid": os.getpid()}
        if cmd == "add":
            if any(f["spec"] == args["spec"] for f in self.forwards.values()):
                raise ForwardError(f"cannot listen on {args['spec']}: Address already in use")
            fid = f"f{self.next_id}"
            self.next_id += 1
            port = int(args["spec"].split(":")[0])
            self.forwards[fid] = {"id": fid, "tunnel": args["tunnel"] or "default", "spec": args["spec"],
                                  "listen": [["127.0.0.1", port], ["::1", port]], "active": 0}
            return {k: v for k, v in self.forwards[fid].items() if k != "active"}
        if cmd == "remove":
            for fid, f in list(self.forwards.items()):
                if args["forward"] in (fid, f["spec"]):
                    del self.forwards[fid]
                    return {**f, "draining": 2}
            raise UsageError(f"no forward {args['forward']!r}")
        if cmd == "list":
            return {"forwards": list(self.forwards.values())}
        if cmd == "connections":
            return {"connections": [{"id": "w0-17", "tunnel": "default", "forward": "f1",
                                     "client": "127.0.0.1:53422", "target": "db:5432", "worker": 0,
                                     "age": 12.5, "up_bytes": 1234, "down_bytes": 5678, "extra": 1}]}
        if cmd == "stats":
            if self.forwards.get("boom"):
                return 1 / 0
            return {"pid": 1, "tunnels": {"default": {"connections": 3, "workers": [0, 1]}}}
        if cmd == "drain":
            if self.gate is not None:
                await self.gate.wait()
            return {"stopping": True, "drain_timeout": args.get("timeout")}
        if cmd == "reload":
            return {"weird": {1, 2}}   # not JSON: a handler bug
        return {"stopping": True, "drain_timeout": 0.0}


class Served:
    """A ControlServer running on a uvloop loop in a thread."""

    def __init__(self, path, handler, **kw):
        self.path, self.handler = path, handler
        self.loop = uvloop.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server = ControlServer(path, handler, **kw)
        self.run(self.server.start())

    def run(self, coro, timeout=10):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def call(self, fn, *args):
        async def go():
            return fn(*args)
        return self.run(go())

    def stop(self):
        self.run(self.server.close())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


@pytest.fixture
def handler():
    return Forwards()


@pytest.fixture
def served(tmp_path, handler):
    s = Served(str(tmp_path / "ctl.sock"), handler)
    yield s
    s.stop()


def raw(path) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(5)
    s.connect(path)
    return s


def read_line(s) -> dict:
    buf = b""
    while not buf.endswith(b"\n"):
        chunk = s.recv(65536)
        assert chunk, f"closed before a full answer: {buf!r}"
        buf += chunk
    assert buf.count(b"\n") == 1
    return json.loads(buf)


def ask(s, line: bytes) -> dict:
    s.sendall(line)
    return read_line(s)


def ctl(*argv, check_rc=None):
    env = {**os.environ, "PYTHONPATH": SRC}
    p = subprocess.run([sys.executable, "-m", "sshpump.control.client", *argv],
                       capture_output=True, text=True, timeout=60, env=env)
    assert "Traceback" not in p.stderr
    if check_rc is not None:
        assert p.returncode == check_rc, (p.returncode, p.stdout, p.stderr)
    return p


# ---- round trips ------------------------------------------------------------

def test_round_trip(served, handler):
    assert request(served.path, "ping", {}) == {"pid": os.getpid()}
    added = request(served.path, "add", {"spec": "8080:web:80", "tunnel": None})
    assert added == {"id": "f1", "tunnel": "default", "spec": "8080:web:80",
                     "listen": [["127.0.0.1", 8080], ["::1", 8080]]}
    assert [f["id"] for f in request(served.path, "list", None)["forwards"]] == ["f1"]
    assert request(served.path, "remove", {"forward": "8080:web:80"})["draining"] == 2
    assert request(served.path, "list", {}) == {"forwards": []}
    assert handler.calls[1] == ("add", {"spec": "8080:web:80", "kind": None, "tunnel": None})


def test_pipelined_requests_on_one_connection(served):
    s = raw(served.path)
    s.sendall(b'{"cmd": "ping"}\n{"cmd": "list", "args": {}}\n\n{"cmd": "stats"}\n')
    buf = b""
    while buf.count(b"\n") < 3:
        buf += s.recv(65536)
    answers = [json.loads(x) for x in buf.splitlines()]
    assert [a["ok"] for a in answers] == [True, True, True]
    assert answers[1]["result"] == {"forwards": []}
    s.close()


def test_final_line_without_newline_is_answered(served):
    s = raw(served.path)
    s.sendall(b'{"cmd": "ping"}')
    s.shutdown(socket.SHUT_WR)
    assert read_line(s)["ok"] is True
    assert s.recv(10) == b""


# ---- errors -----------------------------------------------------------------

def test_error_carries_type_and_code(served):
    request(served.path, "add", {"spec": "8080:web:80"})
    with pytest.raises(ForwardError) as e:
        request(served.path, "add", {"spec": "8080:web:80"})
    assert e.value.exit_code == 6
    assert str(e.value) == "cannot listen on 8080:web:80: Address already in use"
    s = raw(served.path)
    answer = ask(s, b'{"cmd": "remove", "args": {"forward": "f9"}}\n')
    assert answer == {"ok": False, "error": "no forward 'f9'", "code": 2, "type": "UsageError", "attrs": {}}


def test_handler_bug_is_internal_error_and_logged(served, handler, caplog):
    handler.forwards["boom"] = True
    with caplog.at_level(logging.ERROR, logger="sshpump"):
        with pytest.raises(SshpumpError) as e:
            request(served.path, "stats", {})
        with pytest.raises(SshpumpError) as e2:
            request(served.path, "reload", {})   # a result that is not JSON
    assert type(e.value).__name__ == "InternalError" and e.value.exit_code == 1
    assert "ZeroDivisionError" in str(e.value)
    assert type(e2.value).__name__ == "InternalError"
    assert any(r.exc_info and r.exc_info[0] is ZeroDivisionError for r in caplog.records)
    assert request(served.path, "ping", {})["pid"] == os.getpid()  # still serving


def test_unknown_error_type_keeps_its_exit_code():
    err = error_from_wire({"ok": False, "error": "x\ny", "code": 9, "type": "NoSuchError"})
    assert type(err) is SshpumpError and err.exit_code == 9 and str(err) == "x\\ny"
    err = error_from_wire({"ok": False, "error": "e", "code": 2, "type": "ControlError"})
    assert type(err) is ControlError


@pytest.mark.parametrize("line, needle", [
    (b"garbage\n", "not JSON"),
    (b"\xff\xfe\n", "not JSON"),
    (b"[1, 2]\n", "JSON object"),
    (b'"ping"\n', "JSON object"),
    (b'{"cmd": "explode"}\n', "unknown command"),
    (b'{"cmd": 3}\n', "unknown command"),
    (b'{"cmd": "add", "args": {}}\n', "missing argument 'spec'"),
    (b'{"cmd": "add", "args": {"spec": 8080}}\n', "spec must be"),
    (b'{"cmd": "add", "args": {"spec": "1:h:2", "port": 1}}\n', "unknown argument"),
    (b'{"cmd": "drain", "args": {"timeout": "soon"}}\n', "timeout must be"),
    (b'{"cmd": "drain", "args": {"timeout": true}}\n', "timeout must be"),
    (b'{"cmd": "list", "args": [1]}\n', "args must be an object"),
    (b'{"cmd": "ping", "id": 1}\n', "unknown request field"),
])
def test_malformed_line_gets_usage_error_and_connection_stays(served, handler, line, needle):
    s = raw(served.path)
    answer = ask(s, line)
    assert answer["ok"] is False and answer["code"] == 2 and answer["type"] == "UsageError"
    assert needle in answer["error"] and "\n" not in answer["error"]
    assert ask(s, b'{"cmd": "ping"}\n')["ok"] is True   # same connection, still usable
    assert handler.calls == [("ping", {})]
    s.close()


def test_too_long_line_is_answered_then_closed(served, handler):
    s = raw(served.path)
    try:
        s.sendall(b'{"cmd": "add", "args": {"spec": "' + b"x" * (MAX_LINE + 10) + b'"}}\n')
    except (BrokenPipeError, ConnectionResetError):
        pass   # the server may close before the whole line is sent
    answer = read_line(s)
    assert answer["code"] == 2 and answer["type"] == "UsageError" and "longer than" in answer["error"]
    try:
        assert s.recv(10) == b""
    except ConnectionResetError:
        pass   # unread bytes at the server's close reset the connection: closed all the same
    assert handler.calls == []
    assert request(served.path, "ping", {})   # others still served
    # A line of exactly MAX_LINE bytes is allowed.
    body = b'{"cmd": "add", "args": {"spec": "1:h:2", "tunnel": "'
    line = body + b"t" * (MAX_LINE - len(body) - 3) + b'"}}'
    assert len(line) == MAX_LINE
    s = raw(served.path)
    assert ask(s, line + b"\n")["ok"] is True


def test_client_refuses_bad_request_before_connecting(tmp_path):
    with pytest.raises(UsageError):
        request(str(tmp_path / "none.sock"), "explode", {})


def test_missing_socket_is_connect_error(tmp_path):
    path = str(tmp_path / "none.sock")
    with pytest.raises(ConnectError) as e:
        request(path, "ping", {})
    assert str(e.value) == f"cannot reach sshpump at {path}: No such file or directory"
    assert e.value.exit_code == 3


def test_silent_server_times_out(tmp_path):
    path = str(tmp_path / "mute.sock")
    lsock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    lsock.bind(path)
    lsock.listen(1)
    t0 = time.monotonic()
    with pytest.raises(ConnectError, match="did not answer within 0.3 s"):
        request(path, "ping", {}, timeout=0.3)
    assert time.monotonic() - t0 < 3
    lsock.close()


# ---- the socket file ----------------------------------------------------------

def test_socket_mode_0600(served):
    st = os.lstat(served.path)
    assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600


def test_stale_socket_replaced_live_refused_file_refused(tmp_path, handler):
    path = str(tmp_path / "ctl.sock")
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(path)
    dead.close()              # the file stays, nobody listens: stale
    s = Served(path, handler)
    try:
        assert request(path, "ping", {})
        with pytest.raises(ControlError, match="another process is listening") as e:
            s.run(ControlServer(path, handler).start())
        assert e.value.exit_code == 2
    finally:
        s.stop()
    assert not os.path.lexists(path)   # close() removed it
    open(path, "w").close()
    with pytest.raises(ControlError, match="exists and is not a socket"):
        asyncio.run(ControlServer(path, handler).start())
    with pytest.raises(ControlError, match="No such file or directory"):
        asyncio.run(ControlServer(str(tmp_path / "no" / "dir.sock"), handler).start())


def test_close_leaves_a_replaced_file_alone(tmp_path, handler):
    path = str(tmp_path / "ctl.sock")
    s = Served(path, handler)
    os.unlink(path)
    open(path, "w").close()   # someone else's file now
    s.stop()
    assert os.path.isfile(path)


def test_close_closes_clients(tmp_path, handler):
    path = str(tmp_path / "ctl.sock")
    s = Served(path, handler)
    c = raw(path)
    assert ask(c, b'{"cmd": "ping"}\n')["ok"]
    s.stop()
    assert c.recv(10) == b""
    assert not os.path.lexists(path)


# ---- peers, concurrency, idle clients -------------------------------------------

PEER = r"""
import socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.settimeout(5)
s.connect(sys.argv[1])
try:
    s.sendall(b'{"cmd": "add", "args": {"spec": "9999:h:1"}}\n')
except BrokenPipeError:
    pass    # refused before it read anything: the answer is waiting all the same
buf = b""
while True:
    try:
        chunk = s.recv(65536)
    except ConnectionResetError:
        break   # closed with our request unread
    if not chunk:
        break
    buf += chunk
sys.stdout.write(buf.decode())
"""


def python_for_nobody():
    """A Python that uid 65534 may run: ours may live under root's 0700 home."""
    for exe in (sys.executable, "/usr/bin/python3"):
        try:
            subprocess.run([exe, "-c", "pass"], user=65534, group=65534, extra_groups=[], check=True, timeout=30)
        except (OSError, subprocess.SubprocessError):
            continue
        return exe
    pytest.skip("no Python that uid 65534 may run")


def test_peer_with_another_uid_is_refused(handler):
    if os.getuid() != 0:
        pytest.skip("needs root to run a client as nobody")
    exe = python_for_nobody()
    # pytest's tmp_path is 0700 root: nobody could not even reach the socket.
    where = tempfile.mkdtemp(prefix="sshpump-ctl-", dir="/tmp")
    os.chmod(where, 0o711)
    path = os.path.join(where, "ctl.sock")
    s = Served(path, handler)
    try:
        os.chmod(path, 0o666)     # the file lets nobody in: the uid check must not
        p = subprocess.run([exe, "-c", PEER, path], user=65534, group=65534, extra_groups=[],
                           capture_output=True, text=True, timeout=30)
        assert p.returncode == 0, p.stderr
        lines = p.stdout.splitlines()
        assert len(lines) == 1    # one answer, then the server closed
        answer = json.loads(lines[0])
        assert answer["ok"] is False and answer["code"] == 2 and answer["type"] == "ControlError"
        assert answer["error"] == "permission denied: uid 65534 is not the owner (uid 0)"
        assert handler.calls == []
        assert request(path, "ping", {})   # root (the owner) still served
    finally:
        s.stop()
        os.rmdir(where)


def test_many_concurrent_clients(served, handler):
    results, errors = [], []

    def one(i):
        try:
            results.append(request(served.path, "add", {"spec": f"{10000 + i}:h:1"}))
        except Exception as e:  # noqa: BLE001 - collected for the assert
            errors.append(e)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(100)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert errors == []
    assert len({r["id"] for r in results}) == 100
    assert len(request(served.path, "list", {})["forwards"]) == 100


def test_slow_command_does_not_block_others(served, handler):
    handler.gate = served.call(asyncio.Event)
    done = []
    t = threading.Thread(target=lambda: done.append(request(served.path, "drain", {"timeout": 5})))
    t.start()
    deadline = time.monotonic() + 5
    while not handler.calls and time.monotonic() < deadline:
        time.sleep(0.01)
    assert request(served.path, "ping", {})      # answered while drain waits
    assert done == []
    served.call(handler.gate.set)
    t.join(5)
    assert done == [{"stopping": True, "drain_timeout": 5}]


def test_idle_client_is_closed(tmp_path, handler):
    s = Served(str(tmp_path / "ctl.sock"), handler, idle_timeout=0.3)
    try:
        c = raw(s.path)
        assert ask(c, b'{"cmd": "ping"}\n')["ok"]   # the timeout is per wait, not per connection
        t0 = time.monotonic()
        assert c.recv(10) == b""                    # then silence: closed
        assert 0.2 < time.monotonic() - t0 < 3
        assert s.call(lambda: s.server.client_count) == 0
    finally:
        s.stop()


# ---- the CLI ------------------------------------------------------------------

def test_cli_commands(served):
    p = ctl(served.path, "add", "-L", "8080:web:80", check_rc=0)
    assert p.stdout == "added f1 (tunnel default): 8080:web:80, listening on 127.0.0.1:8080, [::1]:8080\n"
    assert p.stderr == ""
    p = ctl(served.path, "list", check_rc=0)
    header, row = p.stdout.splitlines()
    assert header.split() == ["ID", "TUNNEL", "SPEC", "LISTEN", "ACTIVE"]
    assert row.split() == ["f1", "default", "8080:web:80", "127.0.0.1:8080,", "[::1]:8080", "0"]
    p = ctl("--json", served.path, "list", check_rc=0)
    assert json.loads(p.stdout)["forwards"][0]["id"] == "f1"
    p = ctl(served.path, "connections", check_rc=0)
    assert p.stdout.splitlines()[1].split() == ["w0-17", "default", "f1", "127.0.0.1:53422", "db:5432",
                                               "0", "12.5s", "1.2", "KiB", "5.5", "KiB"]
    p = ctl(served.path, "stats", "--json", check_rc=0)
    assert json.loads(p.stdout)["tunnels"]["default"]["connections"] == 3
    p = ctl(served.path, "stats", check_rc=0)
    assert p.stdout == "pid: 1\ntunnels:\n  default:\n    connections: 3\n    workers: 0, 1\n"
    p = ctl(served.path, "remove", "f1", check_rc=0)
    assert p.stdout.startswith("removed f1 (tunnel default): 8080:web:80") and "2 connections draining" in p.stdout
    assert ctl(served.path, "drain", "--timeout", "2.5", check_rc=0).stdout.startswith("stopping")
    assert ctl(served.path, "stop", check_rc=0).stdout == "stopping\n"


def test_cli_error_answer_exit_code_and_one_line(served):
    ctl(served.path, "add", "-L", "8080:web:80", check_rc=0)
    p = ctl(served.path, "add", "-L", "8080:web:80", check_rc=6)
    assert p.stderr == "sshpump: cannot listen on 8080:web:80: Address already in use\n" and p.stdout == ""
    p = ctl(served.path, "remove", "nope", "--tunnel", "x", check_rc=2)
    assert p.stderr == "sshpump: no forward 'nope'\n"


@pytest.mark.parametrize("argv", [
    [], ["PATH"], ["PATH", "explode"], ["PATH", "add"], ["PATH", "add", "-L", "1:h:2", "-L", "3:h:4"],
    ["PATH", "remove"], ["PATH", "drain", "--timeout", "soon"], ["PATH", "list", "extra"], ["", "list"],
])
def test_cli_bad_usage(argv):
    p = ctl(*argv, check_rc=2)
    assert p.stderr.startswith("sshpump ctl: ") and p.stderr.count("\n") == 1 and p.stdout == ""


def test_cli_unreachable(tmp_path):
    path = str(tmp_path / "none.sock")
    p = ctl(path, "ping", check_rc=3)
    assert p.stderr == f"sshpump: cannot reach sshpump at {path}: No such file or directory\n"


def test_views_tolerate_odd_results():
    assert render("list", {"forwards": [{"id": "f1"}, "junk"], "more": 1}).splitlines()[1].split()[0] == "f1"
    assert render("list", {}) == "no forwards"
    assert render("connections", {"connections": [{"id": "c\x1b[31m"}]}).count("\x1b") == 0
    assert render("add", {"id": "f2", "listen": ["/tmp/x.sock"]}).endswith("listening on /tmp/x.sock")
    assert render("stats", {"a": {"b": {}}, "c": [{"d": 1}], "e": True}) == "a:\n  b: (empty)\nc:\n  - d: 1\ne: yes"
    assert render("ping", None) == "ok"


def test_handler_may_close_the_server(tmp_path):
    """A stop handler that closes the server itself still gets its answer out."""
    box = {}

    async def stopper(cmd, args):
        await box["server"].close()
        return {"stopping": True}

    s = Served(str(tmp_path / "ctl.sock"), stopper)
    box["server"] = s.server
    try:
        assert request(s.path, "stop", {}) == {"stopping": True}
        assert not os.path.lexists(s.path)
    finally:
        s.stop()
