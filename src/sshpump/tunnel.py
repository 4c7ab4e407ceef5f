"""One tunnel: one destination, its forwards, and the workers that carry them.

It composes the forward table (listeners by forward id), the dispatcher
(which worker takes a client, and the clients waiting for one) and the worker
pool (start, respawn, halt on boot errors). Forwards can be added and removed
while it runs: a removed forward stops listening at once and its connections
get the drain timeout to finish, while every other forward serves on
untouched. The runtime (runtime.py) holds one or many tunnels."""

from __future__ import annotations

import asyncio
import errno
import itertools
import logging
import os
import time
from typing import NamedTuple

from .backoff import Backoff
from .cut import arm_reset, reset_close
from .dispatch import Dispatcher
from .errors import ForwardError, SshpumpError
from .forwards import Forward, ForwardTable
from .logfmt import fields
from .obs.counters import TunnelCounters
from .options import Options
from .pool import WorkerPool
from .remoteset import RemoteSet
from .routes import SOCKS, Route
from .socksaccept import accept_socks
from .spec import LocalForward, RemoteForward

log = logging.getLogger("sshpump")

ACCEPT_BATCH = 256
_conn_numbers = itertools.count(0)   # connection numbers: unique in the process run, across tunnels


class Ticket(NamedTuple):
    """What goes to a worker with a client: its route and its number."""

    route: Route
    conn: int
    accepted: float = 0.0   # time.monotonic() at accept (open latency is measured from it)


class TunnelService:
    """``fail_fast``: a boot error (authentication, host key) ends the tunnel
    and is passed to ``on_failed`` (the CLI and the library then stop with
    it); otherwise (tunnels of a --config file) it is logged once and the
    tunnel's workers are started again later, with backoff. ``counters``:
    where its metrics accumulate (the runtime keeps them by tunnel name)."""

    def __init__(self, name: str, opts: Options, *, fail_fast: bool = True, on_failed=None, prefix: str = "",
                 counters: TunnelCounters | None = None):
        self.name = name
        self.counters = counters if counters is not None else TunnelCounters(name)
        self.opts = opts
        self.label = prefix
        self.fail_fast = fail_fast
        self.on_failed = on_failed or (lambda err: None)
        self.table = ForwardTable()
        self.pool = WorkerPool(self)
        self.remotes = RemoteSet(self)
        self.dispatcher = Dispatcher(self.pool.workers, opts, on_dropped=lambda t: self.finished({t.route.id: 1}))
        self.state = "new"
        self.error: SshpumpError | None = None
        self.loop = None
        self._accept_paused = False
        self._emfile_logged = False
        self._stopping = False
        self._timer = None
        self._retry = Backoff(opts.reconnect_max, False)
        self._handshakes: set[asyncio.Task] = set()   # -D clients still in their SOCKS handshake

    # ---- start -------------------------------------------------------------

    async def start(self):
        """Listen for the configured forwards and start the workers; raises
        (everything closed again) when fail_fast and the tunnel cannot start."""
        self.loop = asyncio.get_running_loop()
        self.state = "starting"
        for path in self.opts.identities:   # said once here, not once per worker
            if not os.path.exists(path):
                log.warning("%sidentity file %s not accessible: No such file", self.label, path)
        self._open_configured()
        try:
            await self.pool.start(self.fail_fast)
        except BaseException:
            self.table.close_all()
            self.state = "failed"
            raise
        self.remotes.place_all()
        if self.fail_fast:
            # -R: ssh reports the server's answer (and with ExitOnForwardFailure
            # exits on a refusal) before it goes on; so does --ready-fd here.
            try:
                await self.remotes.started(self.opts.connect_timeout or 30.0, self.opts.exit_on_forward_failure)
            except BaseException:
                await self.pool.stop(0)
                self.table.close_all()
                self.state = "failed"
                raise
        for fwd in self.table:
            self._watch(fwd)
        self._timer = self.loop.call_later(0.5, self._tick)
        self.state = "running"

    def _open_configured(self):
        specs = self.opts.forwards
        for spec in specs:
            try:
                self.table.open(spec, self.opts.gateway_ports)
            except ForwardError as e:
                if self.opts.exit_on_forward_failure or len(specs) == 1:
                    self.table.close_all()
                    raise
                log.warning("%s%s (forward %s skipped)", self.label, e, spec.spec,
                            extra=fields("forward_failed", tunnel=self.name, reason=str(e)))
        if specs and not len(self.table):
            raise ForwardError("no forward could be set up")

    def _watch(self, fwd: Forward):
        for sock in fwd.sockets:
            self.loop.add_reader(sock.fileno(), self._accept, sock, fwd)

    def _unwatch(self, fwd: Forward):
        for sock in fwd.sockets:
            try:
                self.loop.remove_reader(sock.fileno())
            except (ValueError, OSError):
                pass

    # ---- forwards at runtime -------------------------------------------------

    def add(self, spec: LocalForward) -> Forward:
        """Listen for one more forward and serve it (raises ForwardError)."""
        fwd = self.table.open(spec, self.opts.gateway_ports)
        if isinstance(spec, RemoteForward):
            if self.pool.workers:
                self.remotes.place(fwd)
        elif self.state == "running" and not self._accept_paused:
            self._watch(fwd)
        log.info("%sforward %s added: %s", self.label, fwd.id, _listening(fwd),
                 extra=fields("forward_added", tunnel=self.name, forward=fwd.id, target=str(fwd.route.target)))
        return fwd

    def remove(self, ref: str) -> Forward:
        """Stop listening for a forward at once; its connections get the
        drain timeout to finish, then are cut."""
        fwd = self.table.find(ref)
        self._unwatch(fwd)
        self.table.close(fwd)
        if fwd.remote is not None:
            self.remotes.withdraw(fwd)
        self.pool.retire(fwd.route.id, self.opts.drain_timeout)
        log.info("%sforward %s removed (%s); %d connections draining", self.label, fwd.id, fwd.spec.spec, fwd.active,
                 extra=fields("forward_removed", tunnel=self.name, forward=fwd.id, target=str(fwd.route.target)))
        return fwd

    def forward_list(self) -> list[dict]:
        return [f.info(self.name) for f in self.table]

    # ---- accept and dispatch ----------------------------------------------

    def _accept(self, lsock, fwd: Forward):
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
            fwd.accepted += 1
            fwd.active += 1
            now = time.monotonic()
            if fwd.route.kind == SOCKS:
                self._socks_client(sock, fwd, peer[:2], now)
                continue
            self.dispatcher.dispatch(sock, Ticket(fwd.route, next(_conn_numbers), now), peer[:2], now, now)

    def _socks_client(self, sock, fwd: Forward, peer, accepted_at):
        """-D: the SOCKS handshake first (socksaccept.py); the request names
        this connection's target, and the client goes to a worker with it."""
        def hand_over(request):
            self._handshakes.discard(task)
            if self._stopping:
                reset_close(sock)
                self.finished({fwd.id: 1})
                return
            route = fwd.route.for_socks_request(request.host, request.port, request.version)
            self.dispatcher.dispatch(sock, Ticket(route, next(_conn_numbers), accepted_at), peer,
                                     accepted_at, time.monotonic())

        async def run():
            await accept_socks(sock, peer, self.label, hand_over)
            if task in self._handshakes:   # closed during the handshake
                self._handshakes.discard(task)
                self.finished({fwd.id: 1})

        task = self.loop.create_task(run())
        self._handshakes.add(task)

    def _pause_accepting(self, e):
        """Out of fds: stop accepting for a moment instead of spinning."""
        if not self._emfile_logged:
            log.warning("%saccept failed: %s; pausing accepts until fds are released", self.label, e.strerror,
                        extra=fields("accept_paused", tunnel=self.name, reason=e.strerror))
            self._emfile_logged = True
        self._accept_paused = True
        for fwd in self.table:
            self._unwatch(fwd)
        self.loop.call_later(0.25, self._resume_accepting)

    def _resume_accepting(self):
        if self._stopping or not self._accept_paused:
            return
        self._accept_paused = False
        for fwd in self.table:
            self._watch(fwd)

    def accepted(self, taken: dict[str, int]):
        """-R: workers report connections the server forwarded to them."""
        for fid, n in taken.items():
            fwd = self.table.by_id.get(fid)
            if fwd is not None:
                fwd.active += n
                fwd.accepted += n

    def remote_status(self, w, route_id: str, state: str, port: int, reason: str):
        self.remotes.status(w, route_id, state, port, reason)

    def finished(self, done: dict[str, int]):
        """Workers report connections that ended, per forward."""
        for fid, n in done.items():
            fwd = self.table.by_id.get(fid)
            if fwd is not None:
                fwd.active -= n

    def flush_waiting(self):
        self.dispatcher.flush(time.monotonic())

    def _tick(self):
        self._timer = self.loop.call_later(0.5, self._tick)
        self._emfile_logged = False if not self._accept_paused else self._emfile_logged
        self.dispatcher.tick(time.monotonic())

    # ---- workers -----------------------------------------------------------

    @property
    def stopping(self) -> bool:
        return self._stopping

    def respawn(self, w):
        self.remotes.worker_gone(w)
        self.pool.respawn(w)

    def boot_failed(self, w, err: SshpumpError):
        """A worker could not boot (authentication, host key, dying at start)."""
        if self._stopping:
            return
        self.error = err
        if self.fail_fast:
            self.state = "failed"
            self.on_failed(err)
            return
        pause = self._retry.pause() or 1.0
        self._retry.failed(answered=True)
        if self.state != "failed":
            log.error("%s%s; retrying in %.0fs", self.label, err, pause,
                      extra=fields("tunnel_retry", tunnel=self.name, reason=str(err)))
        self.state = "failed"
        self.loop.call_later(pause, self._restart_worker, w)

    def _restart_worker(self, w):
        if self._stopping:
            return
        self.state = "running"   # until it fails again
        w.spawn()

    # ---- observation -------------------------------------------------------

    async def connections(self) -> list[dict]:
        rows = []
        for _w, report in await self.pool.reports():
            for row in (report or {}).get("conns", []):
                rows.append({**row, "tunnel": self.name})
        return rows

    async def stats(self) -> dict:
        workers = []
        for w, report in await self.pool.reports():
            workers.append({"index": w.index, "pid": w.pid, "up": bool(w.up), "load": w.load,
                            "answered": report is not None,
                            "pump": (report or {}).get("pump", {})})
        return {
            "name": self.name, "state": self.state, "error": str(self.error) if self.error else None,
            "destination": f"{self.opts.user}@{self.opts.host}:{self.opts.port}",
            "forwards": self.forward_list(), "waiting": len(self.dispatcher.waiting), "workers": workers,
            "connections": sum(w["load"] for w in workers),
            "buffered": sum(w["pump"].get("buffered", 0) for w in workers),
        }

    # ---- stop --------------------------------------------------------------

    async def stop(self, grace: float):
        """Stop accepting, let connections drain up to grace, then close."""
        if self._stopping:
            return
        self._stopping = True
        self.state = "stopping"
        if self._timer:
            self._timer.cancel()
        self.close_listeners()
        for task in list(self._handshakes):
            task.cancel()   # the client is reset (socksaccept)
        self.dispatcher.close()
        await self.pool.stop(grace)
        self.state = "stopped"

    def close_listeners(self):
        """On every way out: no unix socket file stays behind."""
        if self.loop is not None:
            for fwd in self.table:
                self._unwatch(fwd)
        self.table.close_all()


def _listening(fwd: Forward) -> str:
    return ", ".join(a if isinstance(a, str) else (f"[{a[0]}]:{a[1]}" if ":" in a[0] else f"{a[0]}:{a[1]}")
                     for a in fwd.addresses)
