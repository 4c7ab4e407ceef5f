"""systemd's readiness protocol (sd_notify(3)), spoken without libsystemd.

Under ``Type=notify`` systemd passes ``$NOTIFY_SOCKET``: a unix datagram
socket, a filesystem path or, starting with ``@``, an abstract name. Each
message is one datagram of newline-separated ``KEY=VALUE`` lines. sshpump
sends:

- ``READY=1`` + ``STATUS=<summary>`` once the listeners are open and the
  sessions are up (where ``--ready-fd`` is written);
- ``STATUS=<summary>`` whenever the summary changes (sessions up/down,
  forwards or tunnels added or removed), checked every few seconds;
- ``RELOADING=1`` + ``MONOTONIC_USEC=`` when a reload starts (SIGHUP or
  ``ctl reload``), ``READY=1`` when it has ended, applied or refused (what
  ``Type=notify-reload``, systemd >= 253, waits for; harmless otherwise);
- ``STOPPING=1`` when the drain begins;
- ``WATCHDOG=1`` every ``$WATCHDOG_USEC``/2 when the watchdog is on for this
  process, from the event loop: a loop that hangs stops the pings and systemd
  restarts the service.

Everything is a no-op without ``$NOTIFY_SOCKET``. The variables are removed
from the environment when read, so that worker processes, which do not speak
for the service (``NotifyAccess=main``), do not inherit them."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time

log = logging.getLogger("sshpump")

STATUS_EVERY = 2.0      # seconds between checks of the status summary
ENV = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")

_taken: dict | None = None   # what this process took from os.environ (once)


def take_environ(environ=None) -> dict:
    """Remove systemd's variables from the environment and return them (as
    sd_notify(unset_environment=1) and sd_watchdog_enabled(1) do). Taken from
    os.environ once per process: a second call returns the same values."""
    global _taken
    if environ is not None:
        return {k: environ.pop(k, None) for k in ENV}
    if _taken is None:
        _taken = {k: os.environ.pop(k, None) for k in ENV}
    return dict(_taken)


def socket_address(value: str | None):
    """The address to send to, or None: a path, or an abstract name for '@'."""
    if not value:
        return None
    if value[0] == "@":
        return "\0" + value[1:]
    if value[0] == "/":
        return value
    return None   # vsock:... and anything else: not for us


def watchdog_interval(usec: str | None, pid: str | None) -> float | None:
    """Seconds between WATCHDOG=1 pings (half the timeout), or None when the
    watchdog is off or meant for another process."""
    try:
        timeout = int(usec or 0)
    except ValueError:
        return None
    if timeout <= 0:
        return None
    if pid:
        try:
            if int(pid) != os.getpid():
                return None
        except ValueError:
            return None
    return timeout / 2e6


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def summary(rt) -> str:
    """One line: '3 forwards in 2 tunnels, 4/4 sessions up[, 1 tunnel failed]'."""
    tunnels = list(rt.tunnels.values())
    forwards = sum(len(t.table) for t in tunnels)
    workers = [w for t in tunnels for w in t.pool.workers]
    up = sum(1 for w in workers if getattr(w, "up", False))
    text = f"{_plural(forwards, 'forward')} in {_plural(len(tunnels), 'tunnel')}, {up}/{len(workers)} sessions up"
    failed = sum(1 for t in tunnels if t.state == "failed")
    if failed:
        text += f", {_plural(failed, 'tunnel')} failed"
    return text


def _one_line(text: str) -> str:
    return " ".join(text.split())


class Notifier:
    """Tells systemd how sshpump is doing. ``Notifier.from_environ()`` then
    ``attach(runtime)`` before the runtime starts, ``ready()`` once it is."""

    def __init__(self, address=None, watchdog: float | None = None):
        self.address = address
        self.watchdog = watchdog if address else None
        self.sock = None
        if address:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self.sock.setblocking(False)
        self.rt = None
        self.loop = None
        self._status = None
        self._ready = False
        self._reloads = 0
        self._timers: dict[str, asyncio.TimerHandle] = {}
        self._failed_errno = None

    @classmethod
    def from_environ(cls, environ=None) -> "Notifier":
        env = take_environ(environ)
        raw = env["NOTIFY_SOCKET"]
        address = socket_address(raw)
        if raw and address is None:
            log.warning("NOTIFY_SOCKET=%r: not a unix socket path or @name; not notifying systemd", raw)
        return cls(address, watchdog_interval(env["WATCHDOG_USEC"], env["WATCHDOG_PID"]))

    @property
    def enabled(self) -> bool:
        return self.sock is not None

    # ---- sending -------------------------------------------------------------

    def send(self, *lines: str) -> bool:
        """One datagram of KEY=VALUE lines; False if it could not be sent."""
        if self.sock is None:
            return False
        data = "\n".join(lines).encode("utf-8", "replace")
        try:
            self.sock.sendto(data, self.address)
        except OSError as e:
            # A full socket queue (EAGAIN) or a manager gone: say so once per
            # kind of error, never block the event loop.
            if e.errno != self._failed_errno:
                self._failed_errno = e.errno
                log.warning("cannot notify systemd at %s: %s", self.address.replace("\0", "@"), e.strerror)
            return False
        self._failed_errno = None
        return True

    def _status_line(self) -> str:
        self._status = summary(self.rt)
        return "STATUS=" + _one_line(self._status)

    # ---- wiring --------------------------------------------------------------

    def attach(self, rt) -> "Notifier":
        """Hook into the runtime (stop, reload) and start the watchdog; call
        from the event loop, before rt.start()."""
        self.rt = rt
        if not self.enabled:
            return self
        self.loop = asyncio.get_running_loop()
        rt.on_stopping.append(self._on_stopping)
        rt.on_reloading.append(self._on_reloading)
        rt.on_reload_done.append(self._on_reload_done)
        if self.watchdog:
            self._watchdog_ping()
        return self

    def ready(self):
        """Listeners open, sessions up: READY=1 with the summary, then keep
        the summary current."""
        if not self.enabled or self._ready or self.rt.stopping:
            return
        self._ready = True
        self.send("READY=1", self._status_line())
        self._schedule("status", STATUS_EVERY, self._check_status)

    def close(self):
        for handle in self._timers.values():
            handle.cancel()
        self._timers.clear()
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def _schedule(self, name, delay, fn):
        self._timers[name] = self.loop.call_later(delay, fn)

    def _watchdog_ping(self):
        if self.sock is None:
            return
        self.send("WATCHDOG=1")
        self._schedule("watchdog", self.watchdog, self._watchdog_ping)

    def _check_status(self):
        if self.sock is None or self.rt.stopping:
            return
        if summary(self.rt) != self._status:
            self.send(self._status_line())
        self._schedule("status", STATUS_EVERY, self._check_status)

    def _on_stopping(self):
        timer = self._timers.pop("status", None)
        if timer is not None:
            timer.cancel()
        self.send("STOPPING=1", "STATUS=draining: " + _one_line(summary(self.rt)))

    def _on_reloading(self):
        self._reloads += 1
        if self._reloads == 1 and self._ready and not self.rt.stopping:
            self.send("RELOADING=1", f"MONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}",
                      "STATUS=reloading " + (self.rt.config_path or ""))

    def _on_reload_done(self):
        self._reloads = max(0, self._reloads - 1)
        if self._reloads == 0 and self._ready and not self.rt.stopping:
            self.send("READY=1", self._status_line())
