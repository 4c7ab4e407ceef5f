"""ProxyCommand: the session runs over a command's stdin and stdout.

As ssh does it: the command line, its %-tokens expanded, is run by the
shell with ``exec`` (so the process we watch is the command itself), its
stdin and stdout one end of a socketpair (libssh2 needs a socket, a pipe
will not do), the other end the session's. Its stderr lines go to the log,
prefixed with the worker's name. Its exit is the session's death, seen
through a pidfd on the event loop and reaped there; close() ends it.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import shutil
import signal
import socket
import subprocess
import time

from .errors import ConnectError, UsageError
from .options import Options

log = logging.getLogger("sshpump")

STDERR_LINE_MAX = 4096     # a command that writes no newline still gets logged, in pieces
TERM_GRACE = 0.2           # seconds between SIGTERM and SIGKILL at close()


@functools.lru_cache(maxsize=1)
def _die_with_us() -> tuple[str, ...]:
    """A prefix that makes the command get SIGTERM when this process dies,
    even by SIGKILL (the OOM killer): util-linux's setpriv sets the parent
    death signal and execs (so the pid stays the command's). In its own
    process group nothing else would end it, and a silent server would
    keep it, and the session it holds, for hours. Without setpriv: none."""
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        return ()
    try:
        r = subprocess.run([setpriv, "--help"], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return ()
    return (setpriv, "--pdeathsig", "TERM", "--") if "--pdeathsig" in r.stdout else ()


def expand_tokens(command: str, opts: Options) -> str:
    """%h (host), %p (port), %r (remote user), %n (the host as given: the
    same here, config resolution has already replaced it) and %%, as ssh
    expands them; any other token is an error, as in ssh."""
    values = {"h": opts.host, "n": opts.host, "p": str(opts.port), "r": opts.user, "%": "%"}
    out, i = [], 0
    while i < len(command):
        c = command[i]
        if c != "%":
            out.append(c)
            i += 1
            continue
        key = command[i + 1:i + 2]
        if key not in values:
            raise UsageError(f"ProxyCommand {command!r}: unknown token %{key}" if key
                             else f"ProxyCommand {command!r} ends with a lone %")
        out.append(values[key])
        i += 2
    return "".join(out)


class ProxyCommand:
    """One run of the command; a stream for hops.open_stream."""

    def __init__(self, command: str, name: str, on_lost):
        self.command = command
        self.name = name
        self.on_lost = on_lost
        self.via = f"ProxyCommand {command!r}"
        self.loop = asyncio.get_running_loop()
        self.sock = None
        self.proc = None
        self._pidfd = None
        self._stderr = None
        self._partial = b""
        self.exit_reason = None

    @classmethod
    def start(cls, template: str, opts: Options, name: str, on_lost) -> "ProxyCommand":
        self = cls(expand_tokens(template, opts), name, on_lost)
        try:
            self._spawn()
        except BaseException as e:
            self.close()
            if self.sock is not None:
                self.sock.close()
            if isinstance(e, OSError):   # out of fds or processes: a failed attempt, retried
                raise ConnectError(f"cannot run ProxyCommand {self.command!r}: {e.strerror or e}") from None
            raise
        log.debug("%s: ProxyCommand %r started (pid %d)", name, self.command, self.proc.pid)
        return self

    def _spawn(self):
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock = ours
        try:
            self.proc = subprocess.Popen(
                [*_die_with_us(), "/bin/sh", "-c", "exec " + self.command],
                stdin=theirs.fileno(), stdout=theirs.fileno(), stderr=subprocess.PIPE,
                close_fds=True,
                # Its own process group: a Ctrl-C or ``kill -INT -PGID`` makes
                # the workers drain their connections, which need the command
                # alive until close() ends it.
                process_group=0,
            )
        finally:
            theirs.close()
        self._stderr = self.proc.stderr
        os.set_blocking(self._stderr.fileno(), False)
        self.loop.add_reader(self._stderr.fileno(), self._read_stderr)
        self._pidfd = os.pidfd_open(self.proc.pid)
        self.loop.add_reader(self._pidfd, self._exited)

    def _read_stderr(self):
        try:
            chunk = os.read(self._stderr.fileno(), 65536)
        except BlockingIOError:
            return
        except OSError:
            chunk = b""
        if not chunk:
            self._flush_stderr()
            self.loop.remove_reader(self._stderr.fileno())
            return
        self._partial += chunk
        *lines, self._partial = self._partial.split(b"\n")
        while len(self._partial) > STDERR_LINE_MAX:
            lines.append(self._partial[:STDERR_LINE_MAX])
            self._partial = self._partial[STDERR_LINE_MAX:]
        for line in lines:
            self._log_line(line)

    def _flush_stderr(self):
        if self._partial:
            self._log_line(self._partial)
            self._partial = b""

    def _log_line(self, line: bytes):
        text = line.decode(errors="replace").rstrip("\r")
        if text:
            log.warning("%s: ProxyCommand: %s", self.name, text)

    def _exited(self):
        """The command is gone: reap it, and the session over it is dead."""
        if self.exit_reason is not None:
            return
        self.loop.remove_reader(self._pidfd)
        code = self.proc.wait()
        # What it wrote just before it died explains why: log it first.
        self._read_stderr_rest()
        self.exit_reason = (f"ProxyCommand {self.command!r} exited with code {code}" if code >= 0
                            else f"ProxyCommand {self.command!r} killed by {signal.Signals(-code).name}")
        self.on_lost(self.exit_reason)

    def _read_stderr_rest(self):
        if self._stderr is None or self._stderr.closed:
            return
        try:
            while True:
                chunk = os.read(self._stderr.fileno(), 65536)
                if not chunk:
                    break
                self._partial += chunk
        except OSError:
            pass
        for line in self._partial.split(b"\n"):
            self._log_line(line)
        self._partial = b""

    async def why_dead(self, wait: float = 1.0) -> str | None:
        """After a failed login over it: did the command die (waiting up to
        ``wait`` seconds for it to end)? Its exit then explains the failure."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            try:
                await asyncio.to_thread(self.proc.wait, wait)
            except subprocess.TimeoutExpired:
                return None
        if self.exit_reason is None and self._pidfd is not None:
            self._exited()    # reaped already; say it once, here
        return self.exit_reason

    def keepalive(self, now: float):
        """Nothing to keep alive: the session's own keepalives cover the path."""

    def close(self):
        """Stop watching, end the command (SIGTERM, then SIGKILL) and reap it.
        The session's end of the socketpair is the session's to close."""
        if self._pidfd is not None:
            self.loop.remove_reader(self._pidfd)
            os.close(self._pidfd)
            self._pidfd = None
        if self._stderr is not None:
            self.loop.remove_reader(self._stderr.fileno())
            self._stderr.close()
            self._stderr = None
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            deadline = time.monotonic() + TERM_GRACE
            while self.proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.01)
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
