"""The demo's child processes: the target, the sshpump CLI and ``ssh -N -L``.

Every child runs in its own session (a Ctrl-C in the terminal reaches the
demo alone, which then stops them in order) and gets SIGTERM if the demo
dies without cleaning up (``PR_SET_PDEATHSIG``).  ``Child.stop()`` ends the
process and every descendant it left (sshpump's workers).
"""
from __future__ import annotations

import json
import os
import select
import signal
import socket
import subprocess
import sys
import time

from .sshtools import SSH, descendants, free_port, kill_pids

CIPHER = "aes128-gcm@openssh.com"


class DemoError(Exception):
    """A step failed; the message says which, for one line on stderr."""


def _pdeathsig():
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)

    def setup():
        libc.prctl(1, int(signal.SIGTERM), 0, 0, 0)   # PR_SET_PDEATHSIG
    return setup


def _tail(path: str, lines: int = 15) -> str:
    try:
        with open(path, "rb") as f:
            text = f.read().decode(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            st = f.read()
    except OSError:
        return False
    return st[st.rfind(")") + 2] != "Z"


class Child:
    """A child process with its log file in the demo's temp dir."""

    def __init__(self, name: str, argv: list[str], log_path: str, env=None, stdin=subprocess.DEVNULL,
                 stdout=None, pass_fds=()):
        self.name, self.argv, self.log_path = name, argv, log_path
        with open(log_path, "ab") as log:
            self.proc = subprocess.Popen(argv, stdin=stdin, stdout=stdout or log, stderr=log, env=env,
                                         pass_fds=pass_fds, start_new_session=True,
                                         preexec_fn=_pdeathsig())
        self.pid = self.proc.pid

    def log(self) -> str:
        return _tail(self.log_path)

    def failed(self, what: str) -> DemoError:
        try:
            rc = self.proc.wait(1)
        except subprocess.TimeoutExpired:
            rc = None
        state = f"exited with {rc}" if rc is not None else "still running"
        return DemoError(f"{self.name} {what} ({state}); its log, {self.log_path}:\n{self.log()}")

    def stop(self, grace: float = 5.0) -> None:
        if self.proc.poll() is None:
            kids = descendants(self.pid)
            if self.proc.stdin:
                try:
                    self.proc.stdin.close()
                except OSError:
                    pass
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            kill_pids([k for k in kids if _alive(k)])
        for f in (self.proc.stdin, self.proc.stdout):
            if f:
                try:
                    f.close()
                except OSError:
                    pass


def _read_line(fd: int, timeout: float, child: Child) -> bytes:
    deadline = time.monotonic() + timeout
    buf = b""
    while b"\n" not in buf:
        left = deadline - time.monotonic()
        if left <= 0:
            raise child.failed(f"did not report ready within {timeout:g}s")
        if select.select([fd], [], [], min(left, 0.2))[0]:
            chunk = os.read(fd, 65536)
            if not chunk:
                raise child.failed("exited before it was ready")
            buf += chunk
    return buf.split(b"\n", 1)[0]


def child_env(home: str) -> dict:
    """No agent, no SSHPUMP_* secrets, an empty HOME: only the demo's key is used."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("SSH_AUTH_SOCK", "SSHPUMP_PASSWORD", "SSHPUMP_PASSPHRASE")}
    env["HOME"] = home
    return env


TARGETS = ("echo", "bulk")


def start_target(tmpdir: str, env: dict) -> tuple[Child, dict]:
    """The target child and its ports: {"echo": P1, "bulk": P2}."""
    c = Child("the target server", [sys.executable, "-m", "sshpump.demo.target"],
              os.path.join(tmpdir, "target.log"), env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        info = json.loads(_read_line(c.proc.stdout.fileno(), 30, c))
    except BaseException:
        c.stop()
        raise
    return c, {k: int(info[k]) for k in TARGETS}


def _specs(local: dict, target: dict) -> list[str]:
    out = []
    for k in TARGETS:
        out += ["-L", f"127.0.0.1:{local[k]}:127.0.0.1:{target[k]}"]
    return out


def start_sshpump(sshd, target: dict, tmpdir: str, env: dict, workers: int | None) -> tuple[Child, dict]:
    """``python -m sshpump ... --ready-fd W -L 127.0.0.1:0:127.0.0.1:T ...``
    (one forward per target port); returns it and its ports, as for
    start_target, read from its readiness line."""
    r, w = os.pipe()
    argv = [sys.executable, "-m", "sshpump", "--ready-fd", str(w), "--drain-timeout", "2",
            "-p", str(sshd.port), "-i", sshd.client_key,
            "-o", f"UserKnownHostsFile={sshd.known_hosts}", "-o", "StrictHostKeyChecking=yes",
            "-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes", "-o", f"Ciphers={CIPHER}",
            *(["--workers", str(workers)] if workers is not None else []),
            *_specs({k: 0 for k in TARGETS}, target), f"{sshd.user}@{sshd.host}"]
    try:
        c = Child("sshpump", argv, os.path.join(tmpdir, "sshpump.log"), env=env, pass_fds=[w])
    except BaseException:
        os.close(r)
        raise
    finally:
        os.close(w)
    try:
        ready = json.loads(_read_line(r, 60, c))
    except BaseException:
        c.stop()
        raise
    finally:
        os.close(r)
    ports = [int(e["address"][1]) for e in ready["listen"]]
    return c, dict(zip(TARGETS, ports))


def _listening(port: int) -> bool:
    """Someone listens on 127.0.0.1:port -- checked by bind(), not connect()."""
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


def start_ssh(sshd, target: dict, tmpdir: str, env: dict) -> tuple[Child, dict]:
    """``ssh -N -L 127.0.0.1:P:127.0.0.1:T ...`` (OpenSSH client), as
    start_sshpump; ready once its ports listen (ssh opens local forwards only
    after logging in)."""
    last = None
    for attempt in range(5):
        local = {k: free_port() for k in TARGETS}
        argv = sshd.ssh_command("-N", *_specs(local, target),
                                options=["-o", "ExitOnForwardFailure=yes", "-o", "ConnectTimeout=10"])
        assert argv[0] == SSH
        c = Child("ssh -N -L", argv, os.path.join(tmpdir, "ssh.log"), env=env)
        try:
            deadline = time.monotonic() + 30
            while not all(_listening(p) for p in local.values()):
                if c.proc.poll() is not None:
                    raise c.failed("did not start")
                if time.monotonic() > deadline:
                    raise c.failed("did not listen within 30s")
                time.sleep(0.02)
            return c, local
        except DemoError as e:
            c.stop()
            last = e
            if "Address already in use" not in c.log():   # lost a race for the port: pick again
                raise
        except BaseException:
            c.stop()
            raise
    raise last
