"""Contenders: each starts a forwarder for a list of targets and gives back,
per target, the local address(es) to connect to.  All forwarders run as child
processes so their CPU and memory are read from /proc the same way.

A contender's ``start(env, targets)`` is a context manager yielding a
:class:`Running` with ``addr(i, k)`` -> local (host, port) for target ``i``
and stream ``k`` (only "session per connection" has several addresses).
"""
from __future__ import annotations

import contextlib
import copy
import importlib.util
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import time

from testbed._util import free_port, wait_listening

from . import libssh2

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CIPHER = "aes128-gcm@openssh.com"


class SkipContender(Exception):
    """The contender cannot run here; the message says why."""


class ContenderFailed(Exception):
    """One of our own forwarders could not start: the run must fail, not skip it."""

    def __init__(self, name: str, reason: str):
        super().__init__(f"contender {name!r} {libssh2.one_line(reason, 600)}")


def _env(extra: dict | None = None) -> dict:
    """The children's environment.  Only the repository root goes on PYTHONPATH
    (for the bench and testbed packages), never src/: sshpump must be the installed
    package, as a user runs it (a non-editable install has no _pump in src/)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([REPO, env.get("PYTHONPATH", "")])
    env.update(extra or {})
    return env


def _read_line(fd: int, timeout: float, proc, what: str) -> dict:
    buf = b""
    deadline = time.monotonic() + timeout
    while b"\n" not in buf:
        left = deadline - time.monotonic()
        if left <= 0:
            raise RuntimeError(f"{what}: not ready after {timeout:.0f}s")
        r, _, _ = select.select([fd], [], [], min(left, 0.2))
        if r:
            b = os.read(fd, 65536)
            if not b:
                raise RuntimeError(f"{what}: exited ({proc.poll()}) before reporting ready")
            buf += b
        elif proc.poll() is not None:
            raise RuntimeError(f"{what}: exited with {proc.returncode} before reporting ready")
    return json.loads(buf.split(b"\n", 1)[0])


def _stop(proc, sig=signal.SIGTERM, timeout=5.0):
    if proc is None or proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        return
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(5)


def _stderr_tail(path, n=800):
    try:
        with open(path, "rb") as f:
            f.seek(0, 2)
            size = f.tell()
            f.seek(max(0, size - n))
            return f.read().decode(errors="replace").strip()
    except OSError:
        return ""


class Running:
    def __init__(self, name, procs, addrs, logs, info=None):
        self.name = name
        self.procs = procs          # Popen objects (roots of the process trees)
        self.addrs = addrs          # addrs[k][i]: tunnel k, target i
        self.logs = logs
        self.info = info or {}

    def addr(self, i: int, k: int = 0):
        return tuple(self.addrs[k % len(self.addrs)][i])

    @property
    def nsessions(self):
        return len(self.addrs)

    def pids(self):
        return [p.pid for p in self.procs if p.poll() is None]

    def dead(self) -> str | None:
        for p, log in zip(self.procs, self.logs):
            if p.poll() is not None:
                return f"exited with {p.returncode}: {_stderr_tail(log)}"
        return None


class Contender:
    name = "?"
    desc = ""
    max_streams: int | None = None   # None: any concurrency; else the cap (skip above)
    single_address = True             # usable by pgbench (one host:port)
    ours = False                      # ours must start: a failure fails the run instead of a skip

    def skip_reason(self) -> str | None:
        return None

    def start(self, env, targets):
        raise NotImplementedError


class Direct(Contender):
    name = "direct"
    desc = "no tunnel: the client connects to the target itself"

    @contextlib.contextmanager
    def start(self, env, targets):
        yield Running(self.name, [], [list(targets)], [])


class _Popen:
    """Start one child; ``kind`` 'ready-fd' (sshpump) or 'stdout' (runner scripts)."""

    def __init__(self, argv, logdir, tag, ready="stdout", timeout=30.0, env=None):
        env = env if env is not None else _env()
        self.log = os.path.join(logdir, f"{tag}.stderr")
        err = open(self.log, "ab")
        if ready == "ready-fd":
            r, w = os.pipe()
            argv = [a.replace("{FD}", str(w)) for a in argv]
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                         stderr=err, pass_fds=(w,), env=env, cwd=REPO,
                                         start_new_session=True)
            os.close(w)
            self.rfd = r
        else:
            self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                         stderr=err, env=env, cwd=REPO, start_new_session=True)
            self.rfd = self.proc.stdout.fileno()
        err.close()
        self.ready_kind = ready
        self.timeout = timeout
        self.tag = tag

    def wait_ready(self) -> dict:
        try:
            return _read_line(self.rfd, self.timeout, self.proc, self.tag)
        except Exception as e:
            _stop(self.proc)
            raise RuntimeError(f"{e}; stderr: {_stderr_tail(self.log)}") from None
        finally:
            if self.ready_kind == "ready-fd":
                os.close(self.rfd)

    def stop(self):
        if self.ready_kind == "stdout" and self.proc.stdin:
            try:
                self.proc.stdin.close()
            except OSError:
                pass
            try:
                self.proc.wait(2)
            except subprocess.TimeoutExpired:
                pass
        _stop(self.proc)
        if self.proc.stdout:
            self.proc.stdout.close()


class Sshpump(Contender):
    ours = True

    def __init__(self, workers: int, name: str, desc: str, sessions: int = 1):
        self.workers = workers
        self.name = name
        self.desc = desc
        self.sessions = sessions
        self.extra_env = {}        # on top of _env(): SSHPUMP_LIBSSH2 for the stock row
        self.expect_libssh2 = "patched"   # the build this row claims to measure (bench/libssh2.py checks)
        if sessions > 1:
            self.max_streams = sessions
            self.single_address = False

    def on_stock_libssh2(self, name: str) -> Sshpump:
        """This contender again, on ssh2-python's stock libssh2: the row that shows what the patch buys."""
        c = copy.copy(self)
        c.name = name
        c.desc = f"{self.desc}; {libssh2.ENV}=stock: ssh2-python's stock libssh2, not sshpump's patched build"
        c.extra_env = {**self.extra_env, libssh2.ENV: "stock"}
        c.expect_libssh2 = "stock"
        return c

    def argv(self, env, targets):
        s = env.sshd
        # the installed package, run by this interpreter (the one that has it installed)
        a = [sys.executable, "-m", "sshpump", "--workers", str(self.workers), "--ready-fd", "{FD}",
             "--drain-timeout", "1", "-p", str(s.port), "-i", s.client_key,
             "-o", f"UserKnownHostsFile={s.known_hosts}", "-o", "IdentitiesOnly=yes",
             "-o", f"Ciphers={CIPHER}"]
        for h, p in targets:
            a += ["-L", f"127.0.0.1:0:{h}:{p}"]
        return a + [f"{s.user}@{s.host}"]

    @contextlib.contextmanager
    def start(self, env, targets):
        penv = _env(self.extra_env)
        lib = libssh2.probe(penv, REPO, self.expect_libssh2)
        ps = []
        try:
            for k in range(self.sessions):
                ps.append(_Popen(self.argv(env, targets), env.logdir, f"{self.name}-{k}", ready="ready-fd",
                                 env=penv))
                if self.sessions > 1:
                    time.sleep(0.05)   # stagger logins (MaxStartups)
            addrs = []
            for p in ps:
                info = p.wait_ready()
                addrs.append([tuple(x["address"][:2]) for x in info["listen"]])
            yield Running(self.name, [p.proc for p in ps], addrs, [p.log for p in ps],
                          {"cipher": CIPHER + " (forced with -o Ciphers)", "libssh2": lib})
        finally:
            for p in ps:
                _stop(p.proc, timeout=3)


class Runner(Contender):
    """A bench/ runner script (pypump, asyncssh_fwd, sshtunnel_fwd)."""

    def __init__(self, module, name, desc, needs=(), ours=False):
        self.module = module
        self.name = name
        self.desc = desc
        self.needs = needs
        self.ours = ours

    def skip_reason(self):
        for m in self.needs:
            if importlib.util.find_spec(m) is None:
                return f"python package {m!r} not installed (pip install {m})"
        return None

    @contextlib.contextmanager
    def start(self, env, targets):
        s = env.sshd
        argv = [sys.executable, "-m", self.module, "--port", str(s.port), "--user", s.user,
                "--key", s.client_key, "--known-hosts", s.known_hosts, "--cipher", CIPHER]
        for h, p in targets:
            argv += ["--target", f"{h}:{p}"]
        p = _Popen(argv, env.logdir, self.name)
        try:
            info = p.wait_ready()
            yield Running(self.name, [p.proc], [[tuple(x) for x in info["listen"]]], [p.log],
                          {"cipher": info.get("cipher")})
        finally:
            p.stop()


class OpenSSH(Contender):
    name = "ssh -L"
    desc = "OpenSSH client: ssh -N -L (one session, one channel per connection)"

    def skip_reason(self):
        return None if shutil.which("ssh") else "ssh client not installed"

    @contextlib.contextmanager
    def start(self, env, targets):
        s = env.sshd
        last = None
        for attempt in range(5):
            ports = [free_port() for _ in targets]
            spec = []
            for lp, (h, p) in zip(ports, targets):
                spec += ["-L", f"127.0.0.1:{lp}:{h}:{p}"]
            argv = s.ssh_command("-N", *spec, options=["-o", "ExitOnForwardFailure=yes",
                                                       "-o", "ServerAliveInterval=0"])
            log = os.path.join(env.logdir, "ssh.stderr")
            with open(log, "ab") as err:
                proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                        stderr=err, start_new_session=True)
            try:
                for lp in ports:
                    wait_listening("127.0.0.1", lp, 15, proc=proc)
            except (RuntimeError, TimeoutError) as e:
                last = f"{e}: {_stderr_tail(log)}"
                _stop(proc)
                continue
            try:
                yield Running(self.name, [proc], [[("127.0.0.1", lp) for lp in ports]], [log],
                              {"cipher": CIPHER})
            finally:
                _stop(proc)
            return
        raise RuntimeError(f"ssh -L did not start: {last}")


def extra_contenders() -> list[Contender]:
    """Run only when named with --only (kept out of the default suites' time)."""
    return [Sshpump(1, "sshpump w1", "sshpump --workers 1: master + 1 worker process, 1 session")]


def all_contenders(spc_sessions: int = 16) -> list[Contender]:
    w0 = Sshpump(0, "sshpump w0", "sshpump --workers 0: one process, one session, a channel per connection")
    return [
        w0,
        w0.on_stock_libssh2("sshpump (stock libssh2)"),
        Sshpump(2, "sshpump w2", "sshpump --workers 2: master + 2 worker processes, 2 sessions"),
        Sshpump(0, "sshpump spc", f"session per connection: {spc_sessions} separate `sshpump --workers 0` "
                "tunnels (own process and session each); stream k uses tunnel k; "
                f"skipped above {spc_sessions} concurrent streams and for pgbench (one address)",
                sessions=spc_sessions),
        Runner("bench.pypump", "pypump", "pure-Python pump over ssh2-python (bench/pypump.py): "
               "one session, epoll, 64 KiB reads, no C", needs=("ssh2",), ours=True),
        OpenSSH(),
        Runner("bench.asyncssh_fwd", "asyncssh", "asyncssh forward_local_port (default asyncio loop)",
               needs=("asyncssh",)),
        Runner("bench.sshtunnel_fwd", "sshtunnel", "sshtunnel SSHTunnelForwarder (paramiko, thread per connection)",
               needs=("sshtunnel", "paramiko")),
        Direct(),
    ]
