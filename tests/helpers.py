"""Helpers for running the sshpump CLI as a subprocess in tests.

``Pump`` starts ``python -m sshpump ... --ready-fd FD`` with a pipe as FD,
waits (bounded) for the one JSON readiness line, and exposes the listen
addresses; stderr goes to a file so tests can assert on log lines.  It always
terminates the process (and any worker it left behind) on close.
"""
from __future__ import annotations

import json
import os
import select
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

from testbed._util import children_of, kill_pids, wait_for

PY = sys.executable


def base_args(sshd, *, key=True, known_hosts=None, strict="yes", port=None, host=None, user=None):
    """-p/-i/-o arguments for the test sshd."""
    args = ["-p", str(port or sshd.port)]
    if key:
        args += ["-i", sshd.client_key if key is True else key]
    args += ["-o", f"UserKnownHostsFile={known_hosts or sshd.known_hosts}",
             "-o", f"StrictHostKeyChecking={strict}",
             "-o", "ConnectTimeout=10"]
    return args, f"{user or sshd.user}@{host or sshd.host}"


def clean_env(extra=None, home=None):
    """Environment for sshpump: no agent, HOME pointing at an empty dir
    (so ~/.ssh keys are never used), no SSHPUMP_* secrets unless given."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("SSH_AUTH_SOCK", "SSHPUMP_PASSWORD", "SSHPUMP_PASSPHRASE")}
    if home is None:
        home = _empty_home()
    env["HOME"] = home
    env.update(extra or {})
    return env


def _spec_args(specs):
    out = []
    for s in specs:
        out += ["-L", s]
    return out


_HOME = None


def _empty_home():
    """One empty HOME per test process (no ~/.ssh, so no default keys)."""
    global _HOME
    if _HOME is None or not os.path.isdir(_HOME):
        _HOME = tempfile.mkdtemp(prefix="sshpump-home-")
        import atexit
        import shutil
        atexit.register(shutil.rmtree, _HOME, True)
    assert not os.listdir(_HOME), f"{_HOME} should stay empty"
    return _HOME


class PumpFailed(RuntimeError):
    pass


class Pump:
    """A running sshpump CLI process.

    Attributes: proc, pid (master), listen (one address per forward, in -L
    order: (host, port) tuples or unix paths), listen_all (every listening
    address, the [::1] twins included), ready (the parsed JSON line),
    stderr_path.  Methods: stderr(), wait_log(text, timeout), workers(),
    stop(sig, timeout) -> returncode, close().
    """

    def __init__(self, argv, env=None, ready_timeout=30.0, new_session=False, control=True):
        self.control = None
        if control and "--config" not in argv:
            # Every test pump has a control socket: tests observe structured
            # status through it (stats(), connections()), not log text.
            self._control_dir = tempfile.mkdtemp(prefix="sshpump-ctl-")
            self.control = os.path.join(self._control_dir, "ctl.sock")
            argv = ["--control", self.control, *argv]
        self.argv = argv
        self.check_idle = True    # the pump fixture's teardown asserts idle() unless a test says otherwise
        fd, self.stderr_path = tempfile.mkstemp(prefix="sshpump-stderr-", suffix=".log")
        self._stderr_file = os.fdopen(fd, "wb")
        r, w = os.pipe()
        self.listen = []
        self.ready = None
        try:
            self.proc = subprocess.Popen(
                [PY, "-m", "sshpump", "--ready-fd", str(w), *argv],
                pass_fds=[w], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                stderr=self._stderr_file, env=env, start_new_session=new_session)
        except BaseException:
            os.close(r)
            os.close(w)
            raise
        os.close(w)
        self.pid = self.proc.pid
        try:
            line = self._read_ready(r, ready_timeout)
        finally:
            os.close(r)
        if not line:
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                pass
            rc = self.proc.poll()
            err = self.stderr()
            self.close()  # removes the stderr file; its text is in the exception
            raise PumpFailed(f"sshpump not ready (exit code {rc}):\n{err}")
        self.ready = json.loads(line)
        assert self.ready["ready"] is True and self.ready["pid"] == self.pid
        if self.control is None and self.ready.get("control"):
            self.control = self.ready["control"]
        entries = self.ready["listen"]
        self.listen_all = [a["address"] if isinstance(a["address"], str) else tuple(a["address"])
                           for a in entries]
        self.listen = [a for i, a in enumerate(self.listen_all) if not _ipv6_loopback_twin(entries, i)]

    def _read_ready(self, r, timeout):
        deadline = time.monotonic() + timeout
        buf = b""
        while b"\n" not in buf:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            rl, _, _ = select.select([r], [], [], left)
            if not rl:
                continue
            chunk = os.read(r, 65536)
            if not chunk:
                return None
            buf += chunk
        return buf.split(b"\n", 1)[0]

    @property
    def address(self):
        return self.listen[0]

    def stderr(self) -> str:
        if self._stderr_file.closed:
            return self._final_stderr
        self._stderr_file.flush()
        with open(self.stderr_path, "rb") as f:
            return f.read().decode(errors="replace")

    def wait_log(self, text, timeout=10.0, count=1):
        """Wait until ``text`` occurs ``count`` times in stderr; return stderr."""
        deadline = time.monotonic() + timeout
        while True:
            err = self.stderr()
            if err.count(text) >= count:
                return err
            if time.monotonic() > deadline:
                raise AssertionError(f"{text!r} not logged (x{count}) within {timeout}s; stderr:\n{err}")
            time.sleep(0.05)

    def workers(self) -> list[int]:
        """Pids of the worker processes (direct children of the master)."""
        return _direct_children(self.pid)

    # ---- structured status over the control socket ----------------------

    def ctl(self, cmd, **args):
        from sshpump.control.client import request
        return request(self.control, cmd, args, timeout=10)

    def stats(self) -> dict:
        return self.ctl("stats")

    def connections(self) -> list[dict]:
        return self.ctl("connections")["connections"]

    def fds(self) -> dict:
        """{pid: open fds} for the master and its workers."""
        out = {}
        for pid in [self.pid, *self.workers()]:
            try:
                out[pid] = fd_count(pid)
            except OSError:
                pass
        return out

    def baseline(self, limit=5.0):
        """Remember the fds of the master and workers once every session is
        up (no baseline, so no fd check, if they are not up within limit)."""
        try:
            wait_for(lambda: all(w["up"] for t in self.stats()["tunnels"].values() for w in t["workers"]),
                     limit, what="every worker's session up")
        except TimeoutError:
            self._baseline = None
            return
        # The control request just made may still hold a server-side fd for a
        # moment: the lower of two samples is the baseline.
        first = self.fds()
        time.sleep(0.05)
        second = self.fds()
        self._baseline = {pid: min(n, second.get(pid, n)) for pid, n in first.items()}

    def assert_idle(self, limit=15.0):
        """No connection open or waiting, nothing buffered in any pump, and
        (when a baseline was taken and the same workers still run) no fd
        more than then."""
        def idle():
            st = self.stats()
            busy = [(name, t["connections"], t["waiting"], t["buffered"]) for name, t in st["tunnels"].items()
                    if t["connections"] or t["waiting"] or t["buffered"]]
            return None if busy else st
        try:
            wait_for(idle, limit, what="no connections and no buffered bytes")
        except TimeoutError:
            raise AssertionError(f"sshpump not idle: {self.stats()}; connections: {self.connections()[:20]}") from None
        base = getattr(self, "_baseline", None)
        if base is not None and set(base) == set(self.fds()):
            # More fds than at the start is a leak; fewer is a control
            # connection that was still open when the baseline was taken.
            try:
                wait_for(lambda: all(n <= base[pid] for pid, n in self.fds().items()), limit)
            except TimeoutError:
                raise AssertionError(f"fds not back to where they started: {self.fds()}, was {base}") from None

    def stop(self, sig=signal.SIGTERM, timeout=30.0):
        """Send sig and wait; return the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"sshpump did not exit within {timeout}s after {sig!r}:\n{self.stderr()}")

    def close(self):
        kids = children_of(self.pid) if self.proc.poll() is None else []
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        kill_pids([k for k in kids if _alive(k)])
        if not self._stderr_file.closed:
            self._final_stderr = self.stderr()
            self._stderr_file.close()
            try:
                os.unlink(self.stderr_path)
            except FileNotFoundError:
                pass
        if getattr(self, "_control_dir", None):
            import shutil
            shutil.rmtree(self._control_dir, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _ipv6_loopback_twin(entries, i) -> bool:
    """A forward without a bind address listens on 127.0.0.1 and then on
    [::1] at the same port: entry i is that second address."""
    if i == 0 or isinstance(entries[i]["address"], str) or isinstance(entries[i - 1]["address"], str):
        return False
    prev, cur = entries[i - 1], entries[i]
    return (prev["spec"] == cur["spec"] and cur["address"][0] == "::1"
            and list(prev["address"][:2]) == ["127.0.0.1", cur["address"][1]])


def _alive(pid) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            st = f.read()
    except OSError:
        return False
    return st[st.rfind(")") + 2] != "Z"


def alive(pid) -> bool:
    return _alive(pid)


def _direct_children(pid) -> list[int]:
    out = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                st = f.read()
        except OSError:
            continue
        rest = st[st.rfind(")") + 2:].split()
        if int(rest[1]) == pid and rest[0] != "Z":
            out.append(int(d))
    return sorted(out)


def vm_rss_kb(pid) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def fd_count(pid) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def start_pump(sshd, *specs, workers=0, verbose=1, extra=(), env=None, ready_timeout=30.0,
               new_session=False, **kw):
    """Start sshpump against ``sshd`` forwarding ``specs``; return a Pump.
    ``new_session``: in its own session and process group (pgid == pid), so
    that a test can signal the whole group as systemd or a terminal does."""
    args, dest = base_args(sshd, **kw)
    argv = ["-v"] * verbose + ["--workers", str(workers), *args, *extra, *_spec_args(specs), dest]
    p = Pump(argv, env=clean_env() if env is None else env, ready_timeout=ready_timeout,
             new_session=new_session)
    p.baseline()
    return p


def run_cli(argv, env=None, timeout=30.0):
    """Run sshpump to completion (for failures); return (returncode, stderr)."""
    r = subprocess.run([PY, "-m", "sshpump", *argv], stdin=subprocess.DEVNULL,
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                       env=clean_env() if env is None else env, timeout=timeout)
    return r.returncode, r.stderr.decode(errors="replace")


def connect(addr, timeout=30.0) -> socket.socket:
    from testbed.client import connect as _connect
    return _connect(addr, timeout=timeout)


# One scenario suite, two data planes: a channel per connection (default),
# and --mux (every connection a stream of one channel to the remote agent).
PLANE_ARGS = {"channel": [], "mux": ["--mux"]}


def plane_args(plane: str) -> list[str]:
    return list(PLANE_ARGS[plane])


def _planes():
    import pytest
    return pytest.mark.parametrize("plane", list(PLANE_ARGS))


PLANES = _planes()


def tcp_spec(target, listen="0"):
    return f"{listen}:{target[0]}:{target[1]}"


def extra_sshd(session_sshd, **kw):
    """Another testbed Sshd (e.g. with permit_open or RekeyLimit), sharing the
    session sshd's password: every Sshd start runs chpasswd for the same system
    user, so a fresh random password would break password auth on the session
    sshd for every later test.  Use as a context manager."""
    from testbed.sshd import Sshd
    s = Sshd(**kw)
    s.password = session_sshd.password
    return s


def run_concurrently(fns, limit: float, what: str = "a task"):
    """Run each fn in its own thread at once; assert that all finish within
    ``limit`` seconds and none raised (the first error is re-raised)."""
    errors = []

    def run(fn):
        try:
            fn()
        except BaseException as e:  # noqa: BLE001 - re-raised below
            errors.append(e)
    threads = [threading.Thread(target=run, args=(fn,), daemon=True) for fn in fns]
    for t in threads:
        t.start()
    deadline = time.monotonic() + limit
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    assert not any(t.is_alive() for t in threads), f"{what} did not finish within {limit:g}s"
    if errors:
        raise errors[0]
