"""Worker handles for the master: a worker process (its control socket, its
load, its session state as it reports them), or the one Worker of
``--workers 0`` in this process behind the same interface."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import sys
import time
from typing import Protocol

from . import fdpass
from .envsecrets import without_secrets
from .dispatch import OpenHealth, OpenQueue
from .options import Options
from .procsetup import HANDLED_SIGNALS
from .worker import Worker



class Supervisor(Protocol):
    """What a worker handle needs of the process that supervises it (the
    master): declared here so that this module does not depend on it."""

    opts: Options
    loop: asyncio.AbstractEventLoop
    stopping: bool

    def flush_waiting(self) -> None: ...

    def respawn(self, worker: "WorkerProcess") -> None: ...

log = logging.getLogger("sshpump")


class LocalWorker:
    """A Worker in this process, behind the same interface as WorkerProcess."""

    def __init__(self, opts: Options, index: int):
        self.index = index
        self.worker = Worker(opts, name="sshpump", on_finished=self._finished)
        self.load = 0
        self.label = "sshpump"
        self.health = OpenHealth()  # one worker: never routed around
        self.opens = OpenQueue()
        self.worker.on_resolved = self.opens.resolved

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

    def __init__(self, master: Supervisor, index: int):
        self.master = master
        self.index = index
        self.load = 0
        self.up = False
        self.proc = None
        self.ctrl = None
        self.started_at = 0.0
        self.first_status = None
        self.stopping = False
        self.draining = False   # drains on a signal of its own; replaced when it exits
        self.health = OpenHealth()
        self.opens = OpenQueue()

    @property
    def label(self):
        return f"worker {self.index} (pid {self.proc.pid})"

    def spawn(self):
        loop = asyncio.get_running_loop()
        parent, child = fdpass.pair()
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, HANDLED_SIGNALS)  # inherited (see procsetup)
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "sshpump.workerproc", str(child.fileno())],
                pass_fds=[child.fileno()],
                stdin=subprocess.DEVNULL,
                env=without_secrets(os.environ),  # they come over the control socket
            )
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        child.close()
        fdpass.send_config(parent, {"opts": self.master.opts, "index": self.index})
        parent.setblocking(False)
        self.ctrl = parent
        self.load = 0
        self.up = False
        self.draining = False
        self.health = OpenHealth()
        self.opens = OpenQueue()
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
            if kind in ("up", "down", "fatal"):
                self.health.clear()
            if kind == "counts":
                self.load -= msg["done"]
                self.opens.resolved(msg["resolved"])
            elif kind == "opens":
                self.health.report(msg.get("wait"), msg.get("lat"), time.monotonic())
            elif kind == "up":
                self.up = not self.draining
                log.info("%s: session up", self.label)
                self.master.flush_waiting()
            elif kind == "down":
                self.up = False
                log.warning("%s: session down: %s", self.label, msg.get("reason"))
            elif kind == "fatal":
                self.up = False
                log.error("%s: %s", self.label, msg.get("msg"))
            elif kind == "draining":
                self._draining(msg.get("reason"))
            if self.first_status is not None and not self.first_status.done() and kind in ("up", "down", "fatal"):
                self.first_status.set_result(msg)

    def _draining(self, reason):
        """The worker got a SIGTERM/SIGINT of its own (from the process group,
        or sent to it alone): no new clients for it; it is replaced once its
        connections have drained and it has exited."""
        self.up = False
        self.draining = True
        level = logging.INFO if self.stopping or self.master.stopping else logging.WARNING
        log.log(level, "%s: got %s: draining its connections", self.label, reason)

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
        if self.stopping or self.master.stopping:
            return
        if code == 0 and self.draining:
            log.warning("%s drained and exited; starting a new worker", self.label)
            # Not at once: when the whole group was signalled, the master's own
            # SIGTERM may be a moment behind this exit, and then it must not
            # start a worker only to stop it.
            self.master.loop.call_later(0.5, self.master.respawn, self)
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
