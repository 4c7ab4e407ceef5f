"""systemd Type=notify: the test plays the service manager. It binds the
notification socket itself (a path, or an abstract '@name'), passes it in
$NOTIFY_SOCKET (and $WATCHDOG_USEC) to a real sshpump against the test sshd,
and reads what arrives -- with the sender's credentials, as systemd does for
NotifyAccess=main."""
from __future__ import annotations

import os
import re
import signal
import socket
import struct
import tempfile
import threading
import time


from helpers import Pump, clean_env, connect, extra_sshd, tcp_spec
from test_config_file import _tunnel, _write
from testbed.client import echo_roundtrip

from sshpump import sdnotify


class Manager:
    """A notification socket and everything sent to it, in order: a list of
    (sender pid, {KEY: VALUE}) read by a thread. ``on_message(fields)`` runs
    in that thread as each datagram arrives."""

    def __init__(self, abstract: bool = False, on_message=None):
        self._dir = tempfile.mkdtemp(prefix="sdn-")   # short: sun_path holds 108 bytes
        if abstract:
            name = f"sshpump-test-{os.getpid()}-{time.monotonic_ns()}"
            self.env_value, bind_to = "@" + name, "\0" + name
        else:
            self.env_value = bind_to = os.path.join(self._dir, "notify")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(bind_to)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock.settimeout(0.1)
        self.messages: list[tuple[int, dict]] = []
        self.on_message = on_message
        self.cond = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self):
        ucred = struct.calcsize("3i")
        while not self._closed:
            try:
                data, anc, _flags, _addr = self.sock.recvmsg(65536, socket.CMSG_SPACE(ucred))
            except socket.timeout:
                continue
            except OSError:
                return
            pid = None
            for level, kind, payload in anc:
                if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                    pid = struct.unpack("3i", payload[:ucred])[0]
            text = data.decode()
            fields = dict(line.split("=", 1) for line in text.split("\n") if line)
            assert "\n" not in fields.get("STATUS", ""), text
            if self.on_message is not None:
                self.on_message(fields)
            with self.cond:
                self.messages.append((pid, fields))
                self.cond.notify_all()

    def env(self, **extra) -> dict:
        env = clean_env()
        for key in ("WATCHDOG_PID", "WATCHDOG_USEC"):   # only what a test passes
            env.pop(key, None)
        env.update(NOTIFY_SOCKET=self.env_value, **extra)
        return env

    def wait(self, pred, limit=20.0, what="a notification"):
        """Wait (bounded) until pred(messages) is true; return its value."""
        deadline = time.monotonic() + limit
        with self.cond:
            while True:
                value = pred([f for _pid, f in self.messages])
                if value:
                    return value
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"{what} not received within {limit}s; got {self.messages}")
                self.cond.wait(left)

    def wait_index(self, key, value="1", after=-1, limit=20.0):
        """Index of the first message after ``after`` with KEY=value."""
        def find(msgs):
            for i in range(after + 1, len(msgs)):
                if msgs[i].get(key) == value:
                    return i + 1   # truthy even for index 0
            return None
        return self.wait(find, limit, f"{key}={value}") - 1

    def count(self, key, value="1") -> int:
        with self.cond:
            return sum(1 for _pid, f in self.messages if f.get(key) == value)

    def senders(self) -> set:
        with self.cond:
            return {pid for pid, _f in self.messages}

    def fields(self) -> list[dict]:
        with self.cond:
            return [f for _pid, f in self.messages]

    def close(self):
        self._closed = True
        self._thread.join(5)
        self.sock.close()
        import shutil
        shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _environ(pid) -> dict:
    with open(f"/proc/{pid}/environ", "rb") as f:
        raw = f.read()
    return dict(item.split(b"=", 1) for item in raw.split(b"\0") if b"=" in item)


def _monotonic_usec() -> int:
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


# ---- the unit's own logic ----------------------------------------------------

def test_environment_is_taken_and_addresses_parsed():
    env = {"NOTIFY_SOCKET": "@x", "WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid()), "PATH": "/bin"}
    n = sdnotify.Notifier.from_environ(env)
    assert env == {"PATH": "/bin"}                    # unset, as sd_notify(unset_environment=1)
    assert n.enabled and n.address == "\0x" and n.watchdog == 15.0
    n.close()
    assert sdnotify.socket_address("/run/systemd/notify") == "/run/systemd/notify"
    assert sdnotify.socket_address("vsock:2:1234") is None and sdnotify.socket_address("") is None
    assert sdnotify.watchdog_interval("30000000", str(os.getpid() + 1)) is None   # another process's watchdog
    assert sdnotify.watchdog_interval("0", None) is None and sdnotify.watchdog_interval("x", None) is None
    off = sdnotify.Notifier.from_environ({"WATCHDOG_USEC": "1000000"})
    assert not off.enabled and off.watchdog is None and off.send("READY=1") is False


# ---- a real sshpump ----------------------------------------------------------

def test_ready_status_watchdog_and_stopping(pump, targets, tmp_path):
    listen = str(tmp_path / "echo.sock")
    at_ready = {}

    def on_message(fields):
        # When READY=1 arrives the listener must already accept clients.
        if fields.get("READY") == "1" and "listening" not in at_ready:
            try:
                with connect(listen, 10) as s:
                    echo_roundtrip(s, b"at READY=1", half_close=True)
                at_ready["listening"] = True
            except OSError as e:
                at_ready["listening"] = repr(e)

    with Manager(on_message=on_message) as mgr:
        p = pump(f"{listen}:{targets.tcp['echo'][0]}:{targets.tcp['echo'][1]}", workers=2,
                 env=mgr.env(WATCHDOG_USEC="400000"))   # a ping every 0.2 s
        ready = mgr.wait_index("READY")
        assert at_ready.get("listening") is True, at_ready
        msg = mgr.fields()[ready]
        assert msg["STATUS"] == "1 forward in 1 tunnel, 2/2 sessions up", msg

        # WATCHDOG=1 keeps coming (counted, not timed: at least 5 more within a bounded wait).
        seen = mgr.count("WATCHDOG")
        mgr.wait(lambda msgs: sum(1 for f in msgs if f.get("WATCHDOG") == "1") >= seen + 5, 15,
                 "5 more WATCHDOG=1")

        # Workers do not speak for the service: none inherited the variables.
        workers = p.workers()
        assert len(workers) == 2
        for pid in workers:
            env = _environ(pid)
            assert b"NOTIFY_SOCKET" not in env and b"WATCHDOG_USEC" not in env, (pid, env.keys())
        assert mgr.senders() == {p.pid}      # only the main process sent (NotifyAccess=main)

        assert p.stop(signal.SIGTERM) == 0
        stopping = mgr.wait_index("STOPPING", after=ready)
        assert mgr.fields()[stopping]["STATUS"].startswith("draining: 1 forward in 1 tunnel")
        # Nothing claims readiness after the drain began.
        assert not any(f.get("READY") for f in mgr.fields()[stopping:])
        assert mgr.senders() == {p.pid}


def test_abstract_socket_and_no_watchdog_unless_asked(pump, targets):
    with Manager(abstract=True) as mgr:
        assert mgr.env_value.startswith("@")
        p = pump(tcp_spec(targets.tcp["echo"]), workers=0, env=mgr.env())
        ready = mgr.wait_index("READY")
        assert re.fullmatch(r"1 forward in 1 tunnel, 1/1 sessions up", mgr.fields()[ready]["STATUS"])
        with connect(p.address, 10) as s:
            echo_roundtrip(s, b"abstract", half_close=True)
        assert p.stop(signal.SIGTERM) == 0
        mgr.wait_index("STOPPING", after=ready)
        assert mgr.count("WATCHDOG") == 0       # no $WATCHDOG_USEC: no pings
        assert mgr.senders() == {p.pid}


def test_watchdog_for_another_pid_is_not_ours(pump, targets):
    with Manager() as mgr:
        env = mgr.env(WATCHDOG_USEC="200000", WATCHDOG_PID="1")
        p = pump(tcp_spec(targets.tcp["echo"]), workers=0, env=env)
        mgr.wait_index("READY")
        # A STATUS check and many watchdog periods pass: still no ping.
        time.sleep(1.0)
        assert mgr.count("WATCHDOG") == 0
        assert p.stop(signal.SIGTERM) == 0


def test_sighup_reload_is_bracketed_and_status_follows_sessions(sshd, targets, tmp_path):
    echo, source = tcp_spec(targets.tcp["echo"]), tcp_spec(targets.tcp["source"])
    control = str(tmp_path / "ctl.sock")
    conf = str(tmp_path / "tunnels.toml")
    with extra_sshd(sshd) as other, Manager() as mgr:
        _write(conf, control, _tunnel("a", sshd, echo), _tunnel("b", other, echo))
        with Pump(["-v", "--config", conf], env=mgr.env(WATCHDOG_USEC="1000000")) as p:
            ready = mgr.wait_index("READY")
            assert re.fullmatch(r"2 forwards in 2 tunnels, [0-2]/2 sessions up", mgr.fields()[ready]["STATUS"])
            # The tunnels of a file come up in the background: STATUS follows.
            mgr.wait(lambda msgs: any(f.get("STATUS") == "2 forwards in 2 tunnels, 2/2 sessions up" for f in msgs),
                     20, "STATUS with both sessions up")

            # SIGHUP with a forward added: RELOADING=1 (with the monotonic clock), then READY=1.
            _write(conf, control, _tunnel("a", sshd, echo, source), _tunnel("b", other, echo))
            before = _monotonic_usec()
            p.proc.send_signal(signal.SIGHUP)
            reloading = mgr.wait_index("RELOADING", after=ready)
            msg = mgr.fields()[reloading]
            assert before <= int(msg["MONOTONIC_USEC"]) <= _monotonic_usec(), msg
            again = mgr.wait_index("READY", after=reloading)
            assert mgr.fields()[again]["STATUS"].startswith("3 forwards in 2 tunnels"), mgr.fields()[again]

            # A file that does not load is refused, and the reload still ends with READY=1.
            with open(conf, "a") as f:
                f.write("[tunnels.broken\n")
            p.proc.send_signal(signal.SIGHUP)
            refused = mgr.wait_index("RELOADING", after=again)
            back = mgr.wait_index("READY", after=refused)
            assert mgr.fields()[back]["STATUS"].startswith("3 forwards in 2 tunnels")
            assert "keeping the running tunnels" in p.stderr()

            # One destination gone: its session goes down and STATUS says so.
            other.stop()
            mgr.wait(lambda msgs: any(f.get("STATUS") == "3 forwards in 2 tunnels, 1/2 sessions up"
                                      for f in msgs[back:]), 30, "STATUS with one session down")
            assert mgr.count("WATCHDOG") >= 2   # pinged all along (every 0.5 s)
            assert p.stop(signal.SIGTERM) == 0
            mgr.wait_index("STOPPING", after=back)
            assert mgr.senders() == {p.pid}
