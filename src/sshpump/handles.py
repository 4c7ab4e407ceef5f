"""Worker handles for a tunnel: a worker process (its control socket, load
and session state as it reports them), or the one in-process Worker of
``--workers 0`` behind the same interface. pool.py starts and replaces them."""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import os
import signal
import subprocess
import sys
import time
from typing import TYPE_CHECKING, Protocol

from . import wire
from .dispatch import OpenHealth, OpenQueue
from .envsecrets import without_secrets
from .errors import SshpumpError, WorkerError, error_from_wire
from .logfmt import fields
from .options import Options
from .procsetup import HANDLED_SIGNALS, LOG_FORMAT
from .routes import Route
from .sessionpool import make_worker

if TYPE_CHECKING:
    from .obs.counters import TunnelCounters

log = logging.getLogger("sshpump")

EXIT_BOOT_ERROR = 3       # workerproc's exit status after a boot error
QUERY_TIMEOUT = 2.0       # a worker that does not answer a status query in time is left out


class Supervisor(Protocol):
    """What a worker handle needs of the tunnel that supervises it."""

    opts: Options
    loop: asyncio.AbstractEventLoop
    stopping: bool

    counters: "TunnelCounters"   # obs.counters: metrics totals, fed from reports

    def flush_waiting(self) -> None: ...

    def finished(self, done: dict[str, int]) -> None: ...

    def respawn(self, worker: "WorkerProcess") -> None: ...

    def boot_failed(self, worker, error: SshpumpError) -> None: ...

    def accepted(self, taken: dict[str, int]) -> None: ...

    def remote_status(self, worker, route_id: str, state: str, port: int, reason: str) -> None: ...


class LocalWorker:
    """A Worker in this process, behind the same interface as WorkerProcess."""

    def __init__(self, tunnel: Supervisor, index: int):
        self.tunnel = tunnel
        self.index = index
        self.worker = make_worker(tunnel.opts, (tunnel.label or "sshpump: ").rstrip(": "), index,
                                  on_finished=self._finished)
        self.worker.remotes.on_remote = lambda rid, state, port, reason: tunnel.remote_status(
            self, rid, state, port, reason)
        self.worker.remotes.on_accepted = self._accepted
        self.remote_assigned: dict[str, dict] = {}
        # Its log records name the tunnel and worker, as a worker process's do (logfmt).
        self.worker.log_context = {"tunnel": tunnel.name, "worker": index}
        self.load = 0
        self.label = self.worker.name
        self.pid = os.getpid()
        self.health = OpenHealth()  # one worker: never routed around
        self.opens = OpenQueue()
        self.worker.on_resolved = self.opens.resolved
        self.worker.on_state = self._state
        # Metrics are applied once per loop turn, as a worker process sends them.
        self.worker.tally.on_news = lambda: self.tunnel.loop.call_soon(self._report)
        self.rtt = None

    @property
    def up(self):
        return self.worker.up

    @property
    def buffered(self) -> int:
        return self.worker.pump_stats()["buffered"]

    @property
    def queued(self) -> int:
        # Clients waiting for a channel open. Not self.opens: an open that
        # completes inside submit() resolves before the dispatcher records it.
        return len(self.worker.pending)

    def _report(self):
        report = self.worker.tally.take()
        self.rtt = report.get("rtt", self.rtt)
        self.tunnel.counters.apply(self.index, report)

    def _state(self, up, reason):
        if up:
            self.tunnel.counters.session_up(self.index)
            self.tunnel.flush_waiting()

    def _finished(self, route_id):
        self.load -= 1
        self.tunnel.finished({route_id: 1})

    def _accepted(self, route_id):
        self.load += 1
        self.tunnel.accepted({route_id: 1})

    def assign_remote(self, route_id: str, payload: dict):
        self.remote_assigned[route_id] = payload
        self.worker.remotes.assign(Route.from_wire(payload["route"]), payload["bind"], payload["port"])

    def withdraw_remote(self, route_id: str):
        self.remote_assigned.pop(route_id, None)
        self.worker.remotes.withdraw(route_id)

    async def start(self):
        await self.worker.start()  # raises on failure: fail fast like ssh

    def submit(self, sock, ticket, peer, opts=None) -> bool:
        self.load += 1
        self.worker.submit(sock, ticket.route, peer, ticket.conn, accepted=ticket.accepted or None)
        return True

    def retire(self, route_id, grace):
        self.worker.retire(route_id, grace)

    async def query(self) -> dict:
        return {"conns": self.worker.connections(self.index), "pump": self.worker.pump_stats(), "up": self.up}

    async def stop(self, grace):
        await self.worker.drain(grace)
        self.worker.close()


class WorkerProcess:
    """A worker process and its control socket."""

    def __init__(self, tunnel: Supervisor, index: int):
        self.tunnel = tunnel
        self.index = index
        self.load = 0
        self.up = False
        self.proc = None
        self.ctrl = None
        self.started_at = 0.0
        self.first_status = None
        self.stopping = False
        self.draining = False   # drains on a signal of its own; replaced when it exits
        self.boot_error = None
        self.health = OpenHealth()
        self.opens = OpenQueue()
        self.rtt = None         # last keepalive round trip it reported (seconds)
        self.buffered = 0       # bytes in its pump, as last reported
        self._queries: dict[int, tuple[asyncio.Future, list]] = {}
        self._query_ids = itertools.count(1)
        # -R forwards this worker holds; sent again to the process that replaces it.
        self.remote_assigned: dict[str, dict] = {}

    @property
    def pid(self):
        return self.proc.pid if self.proc else None

    @property
    def label(self):
        return f"{self.tunnel.label}worker {self.index} (pid {self.pid})"

    def spawn(self):
        loop = asyncio.get_running_loop()
        parent, child = wire.pair()
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
        # Forwards travel with each client as routes (routes.py), not here.
        opts = dataclasses.replace(self.tunnel.opts, forwards=[])
        wire.send_config(parent, {"opts": opts, "index": self.index, "name": self.tunnel.label,
                                  "tunnel": self.tunnel.name, "log_format": LOG_FORMAT["format"]})
        parent.setblocking(False)
        self.ctrl = parent
        for rid, payload in self.remote_assigned.items():
            self._send("remote", id=rid, add=True, **payload)
        self.load = 0
        self.up = False
        self.draining = False
        self.boot_error = None
        self.health = OpenHealth()
        self.opens = OpenQueue()
        self.rtt = None
        self.buffered = 0
        self.started_at = time.monotonic()
        self.first_status = loop.create_future()
        loop.add_reader(parent.fileno(), self._on_ctrl)

    def _on_ctrl(self):
        while True:
            try:
                msg, fd = wire.recv(self.ctrl)
            except BlockingIOError:
                return
            except OSError:
                msg, fd = None, None
            if fd is not None:
                os.close(fd)
            if msg is None:
                self._gone()
                return
            kind = msg.get("t")
            handler = getattr(self, f"_on_{kind}", None)
            if handler is None:
                log.error("%s: unknown message %r", self.label, kind)
                continue
            handler(msg)
            if kind in ("up", "down", "fatal") and self.first_status is not None and not self.first_status.done():
                self.first_status.set_result(msg)

    def assign_remote(self, route_id: str, payload: dict):
        self.remote_assigned[route_id] = payload
        self._send("remote", id=route_id, add=True, **payload)

    def withdraw_remote(self, route_id: str):
        if self.remote_assigned.pop(route_id, None) is not None:
            self._send("remote", id=route_id, add=False)

    def _on_remote(self, msg):
        self.tunnel.remote_status(self, msg["id"], msg["state"], msg["port"], msg.get("reason", ""))

    def _on_counts(self, msg):
        taken = msg.get("accepted")
        if taken:
            self.load += sum(taken.values())
            self.tunnel.accepted(taken)
        done = msg["done"]
        self.load -= sum(done.values())
        self.opens.resolved(msg["resolved"])
        self.tunnel.finished(done)
        self.rtt = msg.get("rtt", self.rtt)
        self.buffered = msg.get("buf", self.buffered)
        self.tunnel.counters.apply(self.index, msg)

    @property
    def queued(self) -> int:
        return len(self.opens.keys)   # clients handed to it, still waiting for their channel open

    def _on_opens(self, msg):
        self.health.report(msg.get("wait"), msg.get("lat"), time.monotonic())

    def _on_up(self, msg):
        self.health.clear()
        self.up = not self.draining
        self.tunnel.counters.session_up(self.index)
        log.info("%s: session up", self.label, extra=self._fields("worker_session_up"))
        self.tunnel.flush_waiting()

    def _on_down(self, msg):
        self.health.clear()
        self.up = False
        if self.first_status is None or self.first_status.done():
            log.warning("%s: session down: %s", self.label, msg.get("reason"),
                        extra=self._fields("worker_session_down", reason=msg.get("reason")))

    def _on_fatal(self, msg):
        # Not logged here: the tunnel says it once (pool.boot_failed).
        self.health.clear()
        self.up = False
        self.boot_error = error_from_wire(msg)

    def _on_draining(self, msg):
        """The worker got a SIGTERM/SIGINT of its own (from the process group,
        or sent to it alone): no new clients for it; it is replaced once its
        connections have drained and it has exited."""
        self.up = False
        self.draining = True
        level = logging.INFO if self.stopping or self.tunnel.stopping else logging.WARNING
        log.log(level, "%s: got %s: draining its connections", self.label, msg.get("reason"),
                extra=self._fields("worker_draining", reason=msg.get("reason")))

    def _on_report(self, msg):
        entry = self._queries.get(msg["id"])
        if entry is None:
            return
        fut, parts = entry
        parts.extend(msg["conns"])
        if msg.get("last"):
            del self._queries[msg["id"]]
            if not fut.done():
                fut.set_result({"conns": parts, "pump": msg.get("pump", {}), "up": msg.get("up", False)})

    def _gone(self):
        loop = asyncio.get_running_loop()
        loop.remove_reader(self.ctrl.fileno())
        self.ctrl.close()
        self.ctrl = None
        self.up = False
        self.buffered = 0
        # What it still carried will never report an end: closed for the
        # metrics, and no longer active in the forwards' counts.
        lost = self.tunnel.counters.worker_gone(self.index)
        if lost:
            self.tunnel.finished(lost)
        for fut, _ in self._queries.values():
            if not fut.done():
                fut.set_result(None)
        self._queries.clear()
        try:
            code = self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
        if self.first_status is not None and not self.first_status.done():
            err = self.boot_error or WorkerError(f"worker {self.index} exited with code {code} before its session was up")
            self.first_status.set_result({"t": "fatal", "error": err})
        if self.stopping or self.tunnel.stopping:
            return
        if code == EXIT_BOOT_ERROR and self.boot_error is not None:
            self.tunnel.boot_failed(self, self.boot_error)
            return
        if code == 0 and self.draining:
            log.warning("%s drained and exited; starting a new worker", self.label,
                        extra=self._fields("worker_exit", reason="drained"))
            # Not at once: when the whole group was signalled, the master's own
            # SIGTERM may be a moment behind this exit, and then it must not
            # start a worker only to stop it.
            self.tunnel.loop.call_later(0.5, self.tunnel.respawn, self)
            return
        if code < 0:
            sig = signal.Signals(-code).name
            hint = " (perhaps out of memory)" if -code == signal.SIGKILL else ""
            log.warning("%s killed by %s%s; its clients were closed", self.label, sig, hint,
                        extra=self._fields("worker_exit", reason=f"killed by {sig}"))
        else:
            log.warning("%s exited with code %d; its clients were closed", self.label, code,
                        extra=self._fields("worker_exit", reason=f"exit code {code}"))
        self.tunnel.respawn(self)

    def _fields(self, event, **values) -> dict:
        return fields(event, tunnel=self.tunnel.name, worker=self.index, **values)

    def _send(self, t, fd=None, **fields) -> bool:
        if self.ctrl is None:
            return False
        try:
            wire.send(self.ctrl, t, fd, **fields)
        except OSError:  # BlockingIOError: its queue is full; others: it is gone
            return False
        return True

    def submit(self, sock, ticket, peer, opts=None) -> bool:
        if not self._send("client", sock.fileno(), conn=ticket.conn, route=ticket.route.to_wire(), at=ticket.accepted,
                          peer=list(peer) if isinstance(peer, tuple) else peer):
            return False  # try another worker
        sock.close()  # the worker has its own copy now
        self.load += 1
        return True

    def retire(self, route_id, grace):
        self._send("retire", route=route_id, grace=grace)

    async def query(self) -> dict | None:
        """Its connections and pump totals; None if it does not answer."""
        qid = next(self._query_ids)
        fut = asyncio.get_running_loop().create_future()
        self._queries[qid] = (fut, [])
        if not self._send("query", id=qid):
            self._queries.pop(qid, None)
            return None
        try:
            return await asyncio.wait_for(fut, QUERY_TIMEOUT)
        except asyncio.TimeoutError:
            self._queries.pop(qid, None)
            return None

    async def stop(self, grace):
        self.stopping = True
        self._send("drain", grace=grace)
        deadline = time.monotonic() + grace + 3
        while self.proc.poll() is None and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if self.proc.poll() is None:
            log.warning("%s did not stop in time: killing it", self.label, extra=self._fields("worker_killed"))
            self.proc.kill()
            self.proc.wait()
