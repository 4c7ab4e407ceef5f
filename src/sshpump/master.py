"""The master: owns the listeners, accepts, and hands clients to workers.

With ``workers == 0`` one in-process Worker carries everything (small uses,
the library API). With ``workers >= 1`` each worker is a process with its own
SSH session (pool.py); accepted fds go to it over SCM_RIGHTS and the master
closes its copy at once. Dispatch (dispatch.py) picks the live worker with the fewest
open connections whose channel opens are not stalled. Workers that die are
respawned; a worker that cannot boot (authentication, host key) halts the
master instead of looping. SIGTERM/SIGINT drain and stop, SIGHUP is logged;
on every way out the listeners are closed (unix socket files removed).
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import signal
import socket
import time
from collections import deque

from .cut import arm_reset
from .dispatch import Dispatcher
from .errors import ConnectError, ForwardError, SshpumpError
from .listeners import close_listener, listener_address, open_listeners
from .options import Options
from .pool import LocalWorker, WorkerProcess

log = logging.getLogger("sshpump")

ACCEPT_BATCH = 256


class Master:
    def __init__(self, opts: Options):
        self.opts = opts
        self.listeners: list[tuple[socket.socket, int]] = []   # (socket, forward index)
        self.workers = []
        self.dispatcher = Dispatcher(self.workers, opts)
        self._accept_paused = False
        self._emfile_logged = False
        self._stopping = False
        self._timer = None
        self._respawns = deque()
        self._stop_requested = asyncio.Event()

    # ---- start -------------------------------------------------------------

    def addresses(self):
        """[(spec, address)] of every listening socket (port 0 resolved)."""
        return [(self.opts.forwards[i].spec, listener_address(s)) for s, i in self.listeners]

    async def start(self) -> bool:
        """Open the listeners and start the workers (raises on failure).
        False when a stop was requested meanwhile: all is closed again."""
        self.loop = asyncio.get_running_loop()
        self._open_listeners()
        try:
            started = await self._unless_stopped(self._start_workers())
        except BaseException:
            self._close_listeners()
            raise
        if not started:
            await self.stop(0)
            return False
        for sock, idx in self.listeners:
            self.loop.add_reader(sock.fileno(), self._accept, sock, idx)
        self._timer = self.loop.call_later(0.5, self._tick)
        return True

    async def _unless_stopped(self, coro) -> bool:
        """Run coro to its end unless a stop is requested first (a signal
        while the workers log in): then cancel it and return False."""
        task = asyncio.ensure_future(coro)
        stop = asyncio.ensure_future(self._stop_requested.wait())
        await asyncio.wait({task, stop}, return_when=asyncio.FIRST_COMPLETED)
        stop.cancel()
        if task.done():
            task.result()
            return True
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        return False

    async def _start_workers(self):
        if self.opts.workers == 0:
            w = LocalWorker(self.opts, 0)
            self.workers.append(w)
            await w.start()
        else:
            await self._start_processes()

    def _open_listeners(self):
        for idx, fwd in enumerate(self.opts.forwards):
            try:
                socks = open_listeners(fwd, self.opts.gateway_ports)
            except ForwardError as e:
                if self.opts.exit_on_forward_failure or len(self.opts.forwards) == 1:
                    self._close_listeners()
                    raise
                log.warning("%s (forward %s skipped)", e, fwd.spec)
                continue
            self.listeners.extend((s, idx) for s in socks)
        if not self.listeners and self.opts.forwards:
            raise ForwardError("no forward could be set up")

    async def _start_processes(self):
        for i in range(self.opts.workers):
            w = WorkerProcess(self, i)
            w.spawn()
            self.workers.append(w)
        timeout = (self.opts.connect_timeout or 30) + 0.05 * len(self.workers) + 10
        results = []
        for w in self.workers:
            try:
                results.append(await asyncio.wait_for(asyncio.shield(w.first_status), timeout))
            except asyncio.TimeoutError:
                results.append({"t": "down", "reason": "no answer from worker"})
        if any(r["t"] == "up" for r in results):
            return
        await self._stop_workers(0)
        first = next((r for r in results if r["t"] == "fatal"), results[0])
        err = SshpumpError(first.get("msg") or first.get("reason"))
        err.exit_code = first.get("code") or ConnectError.exit_code
        raise err

    def respawn(self, w: WorkerProcess):
        if self.stopping:
            return
        now = time.monotonic()
        self._respawns.append(now)
        while self._respawns and self._respawns[0] < now - 10:
            self._respawns.popleft()
        if now - w.started_at < 1.0 and len(self._respawns) > 5 * len(self.workers):
            log.error("workers keep dying at start; halting")
            self.loop.call_soon(self.request_stop)
            return
        w.spawn()

    # ---- accept and dispatch ----------------------------------------------

    def _accept(self, lsock, idx):
        for _ in range(ACCEPT_BATCH):
            try:
                sock, peer = lsock.accept()
            except BlockingIOError:
                return
            except InterruptedError:
                continue
            except OSError as e:
                if e.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    self._pause_accepting(e)
                    return
                if e.errno in (errno.ECONNABORTED, errno.EPROTO):
                    continue
                raise
            if not isinstance(peer, tuple) or not peer:
                peer = ("127.0.0.1", 0)
            arm_reset(sock)
            now = time.monotonic()
            self.dispatcher.dispatch(sock, idx, peer[:2], now, now)

    def _pause_accepting(self, e):
        """Out of fds: stop accepting for a moment instead of spinning."""
        if not self._emfile_logged:
            log.warning("accept failed: %s; pausing accepts until fds are released", e.strerror)
            self._emfile_logged = True
        self._accept_paused = True
        for sock, _ in self.listeners:
            self.loop.remove_reader(sock.fileno())
        self.loop.call_later(0.25, self._resume_accepting)

    def _resume_accepting(self):
        if self._stopping or not self._accept_paused:
            return
        self._accept_paused = False
        for sock, idx in self.listeners:
            self.loop.add_reader(sock.fileno(), self._accept, sock, idx)

    def flush_waiting(self):
        self.dispatcher.flush(time.monotonic())

    def _tick(self):
        self._timer = self.loop.call_later(0.5, self._tick)
        self._emfile_logged = False if not self._accept_paused else self._emfile_logged
        self.dispatcher.tick(time.monotonic())

    # ---- stop --------------------------------------------------------------

    @property
    def stopping(self) -> bool:
        return self._stopping or self._stop_requested.is_set()

    def request_stop(self):
        if not self._stopping:
            self._stop_requested.set()

    def handle_signals(self):
        """SIGTERM/SIGINT: drain and stop; SIGHUP: logged, nothing else.
        Main thread only; call before start() so that a signal during start-up
        still closes the listeners."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_stop_signal, sig)
        loop.add_signal_handler(signal.SIGHUP, self._on_hup)

    def _on_stop_signal(self, sig):
        # The workers drain on the same signal when the whole process group
        # got it, and on the master's DRAIN otherwise; a repeated signal
        # changes nothing (the drain is bounded by --drain-timeout).
        if self.stopping:
            log.info("%s: already stopping", sig.name)
            return
        log.info("%s: draining (up to %gs)", sig.name, self.opts.drain_timeout)
        self.request_stop()

    def _on_hup(self):
        # A daemon without a configuration file has nothing to reload; a
        # closed terminal or a stray `kill -HUP` must not stop the tunnels.
        log.warning("SIGHUP: nothing to reload (no configuration file); still running")

    async def serve(self):
        try:
            await self._stop_requested.wait()
            await self.stop(self.opts.drain_timeout)
        finally:
            self._close_listeners()  # on any way out: no unix socket file stays behind

    def _close_listeners(self):
        for sock, _ in self.listeners:
            try:
                self.loop.remove_reader(sock.fileno())
            except (ValueError, OSError, AttributeError):
                pass
            close_listener(sock)
        self.listeners = []

    async def _stop_workers(self, grace):
        await asyncio.gather(*(w.stop(grace) for w in self.workers))

    async def stop(self, grace: float):
        """Stop accepting, let connections drain up to grace, then close."""
        self._stopping = True
        if self._timer:
            self._timer.cancel()
        self._close_listeners()
        self.dispatcher.close()
        await self._stop_workers(grace)


def default_workers() -> int:
    return max(1, len(os.sched_getaffinity(0)))
