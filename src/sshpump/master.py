"""The master: owns the listeners, accepts, and hands clients to workers.

With ``workers == 0`` one in-process Worker carries everything (small uses,
the library API). With ``workers >= 1`` each worker is a process with its own
SSH session; accepted fds go to it over SCM_RIGHTS and the master closes its
copy at once. Dispatch picks the live worker with the fewest open
connections. Workers that die are respawned; a worker that cannot boot
(authentication, host key) halts the master instead of looping.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections import deque

from . import fdpass
from .cut import reset_close
from .errors import ConnectError, ForwardError, SshpumpError
from .listeners import close_listener, listener_address, open_listeners
from .options import Options
from .worker import Worker

log = logging.getLogger("sshpump")

ACCEPT_BATCH = 256
WORKER_QUEUE_MAX = 4096   # clients held by the master while no worker can take them


class LocalWorker:
    """A Worker in this process, behind the same interface as WorkerProcess."""

    def __init__(self, opts: Options, index: int):
        self.index = index
        self.worker = Worker(opts, name="sshpump", on_finished=self._finished)
        self.load = 0

    @property
    def up(self):
        return self.worker.up

    def _finished(self, n):
        self.load -= n

    async def start(self):
        await self.worker.start()  # raises on failure: fail fast like ssh

    def submit(self, sock, fwd_index, peer, opts) -> bool:
        self.load += 1
        self.worker.submit(sock, opts.forwards[fwd_index], peer)
        return True

    async def stop(self, grace):
        await self.worker.drain(grace)
        self.worker.close()


class WorkerProcess:
    """A worker process and its control socket."""

    def __init__(self, master: "Master", index: int):
        self.master = master
        self.index = index
        self.load = 0
        self.up = False
        self.proc = None
        self.ctrl = None
        self.started_at = 0.0
        self.first_status = None
        self.stopping = False

    def spawn(self):
        loop = asyncio.get_running_loop()
        parent, child = fdpass.pair()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "sshpump.workerproc", str(child.fileno())],
            pass_fds=[child.fileno()],
            stdin=subprocess.DEVNULL,
        )
        child.close()
        fdpass.send_config(parent, {"opts": self.master.opts, "index": self.index})
        parent.setblocking(False)
        self.ctrl = parent
        self.load = 0
        self.up = False
        self.started_at = time.monotonic()
        self.first_status = loop.create_future()
        loop.add_reader(parent.fileno(), self._on_ctrl)

    def _on_ctrl(self):
        while True:
            try:
                msg = fdpass.recv_status(self.ctrl)
            except BlockingIOError:
                return
            except OSError:
                msg = None
            if msg is None:
                self._gone()
                return
            kind = msg.get("t")
            if kind == "done":
                self.load -= msg["n"]
            elif kind == "up":
                self.up = True
                log.info("worker %d (pid %d): session up", self.index, self.proc.pid)
                self.master.flush_waiting()
            elif kind == "down":
                self.up = False
                log.warning("worker %d (pid %d): session down: %s", self.index, self.proc.pid, msg.get("reason"))
            elif kind == "fatal":
                self.up = False
                log.error("worker %d (pid %d): %s", self.index, self.proc.pid, msg.get("msg"))
            if self.first_status is not None and not self.first_status.done() and kind in ("up", "down", "fatal"):
                self.first_status.set_result(msg)

    def _gone(self):
        loop = asyncio.get_running_loop()
        loop.remove_reader(self.ctrl.fileno())
        self.ctrl.close()
        self.ctrl = None
        self.up = False
        try:
            code = self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
        if self.first_status is not None and not self.first_status.done():
            self.first_status.set_result({"t": "fatal", "code": 7, "msg": f"worker exited with code {code} at boot"})
        if self.stopping:
            return
        if code < 0:
            sig = signal.Signals(-code).name
            hint = " (perhaps out of memory)" if -code == signal.SIGKILL else ""
            log.warning("worker %d (pid %d) killed by %s%s; its clients were closed", self.index, self.proc.pid, sig, hint)
        else:
            log.warning("worker %d (pid %d) exited with code %d; its clients were closed", self.index, self.proc.pid, code)
        self.master.respawn(self)

    def submit(self, sock, fwd_index, peer, opts) -> bool:
        if self.ctrl is None:
            return False
        try:
            fdpass.send_client(self.ctrl, sock.fileno(), fwd_index, peer)
        except (BlockingIOError, InterruptedError):
            return False  # its queue is full: try another worker
        except OSError:
            return False
        sock.close()  # the worker has its own copy now
        self.load += 1
        return True

    async def stop(self, grace):
        self.stopping = True
        if self.ctrl is not None:
            try:
                fdpass.send_drain(self.ctrl, grace)
            except OSError:
                pass
        deadline = time.monotonic() + grace + 3
        while self.proc.poll() is None and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if self.proc.poll() is None:
            log.warning("worker %d (pid %d) did not stop in time: killing it", self.index, self.proc.pid)
            self.proc.kill()
            self.proc.wait()


class Master:
    def __init__(self, opts: Options):
        self.opts = opts
        self.listeners: list[tuple[socket.socket, int]] = []   # (socket, forward index)
        self.workers = []
        self.waiting: deque = deque()   # (sock, fwd_index, peer, since)
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

    async def start(self):
        self.loop = asyncio.get_running_loop()
        self._open_listeners()
        try:
            if self.opts.workers == 0:
                w = LocalWorker(self.opts, 0)
                self.workers.append(w)
                await w.start()
            else:
                await self._start_processes()
        except BaseException:
            self._close_listeners()
            raise
        for sock, idx in self.listeners:
            self.loop.add_reader(sock.fileno(), self._accept, sock, idx)
        self._timer = self.loop.call_later(0.5, self._tick)

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
        if self._stopping:
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
            self._dispatch(sock, idx, peer[:2], time.monotonic())

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

    def _pick(self):
        live = [w for w in self.workers if w.up]
        if not live:
            return []
        return sorted(live, key=lambda w: w.load)

    def _dispatch(self, sock, idx, peer, since) -> bool:
        for w in self._pick():
            if w.submit(sock, idx, peer, self.opts):
                return True
        if len(self.waiting) >= WORKER_QUEUE_MAX:
            log.warning("closing client %s: %d clients already waiting for a worker", peer, WORKER_QUEUE_MAX)
            reset_close(sock)
            return False
        self.waiting.append((sock, idx, peer, since))
        return False

    def flush_waiting(self):
        n = len(self.waiting)
        for _ in range(n):
            sock, idx, peer, since = self.waiting.popleft()
            if not self._dispatch(sock, idx, peer, since):
                break

    def _tick(self):
        self._timer = self.loop.call_later(0.5, self._tick)
        self._emfile_logged = False if not self._accept_paused else self._emfile_logged
        if self.waiting:
            self.flush_waiting()
        limit = time.monotonic() - self.opts.client_wait
        while self.waiting and self.waiting[0][3] < limit:
            sock, _, peer, _ = self.waiting.popleft()
            log.warning("closing client %s: no live SSH session for %.0fs", peer, self.opts.client_wait)
            reset_close(sock)

    # ---- stop --------------------------------------------------------------

    def request_stop(self):
        if not self._stopping:
            self._stop_requested.set()

    async def serve(self):
        await self._stop_requested.wait()
        await self.stop(self.opts.drain_timeout)

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
        while self.waiting:
            reset_close(self.waiting.popleft()[0])
        await self._stop_workers(grace)


def default_workers() -> int:
    return max(1, len(os.sched_getaffinity(0)))
