"""``--sessions-per-worker K``: one worker process, K SSH sessions.

libssh2 allows one channel open in flight per session and walks the
session's whole channel list per open and per packet. K sessions in one
worker give K opens in flight and lists n/K long, at the price of K sshd
processes on the server (DESIGN.md §8: the other way to attack churn than
the multiplexed plane; the benchmark puts both side by side).

SessionPool has the interface of one Worker (worker.py), so the worker
process and the in-process worker use either without knowing which: clients
go to the live session with the fewest connections; the pool is up while
any session is; counts share one Tally. Remote forwards (-R) live on the
first session (a remote port is bound by one session)."""

from __future__ import annotations

import asyncio

from .obs.tally import Tally
from .options import Options
from .worker import Worker


def make_worker(opts: Options, name: str, index: int = 0, **callbacks):
    """A Worker, or a SessionPool when opts.sessions_per_worker > 1."""
    if opts.sessions_per_worker > 1:
        return SessionPool(opts, name, index=index, **callbacks)
    return Worker(opts, name=name, index=index, **callbacks)


class SessionPool:
    def __init__(self, opts: Options, name: str, index: int = 0, on_state=None, on_finished=None,
                 on_opened=None, on_resolved=None):
        self.opts = opts
        self.name = name
        self.on_state = on_state or (lambda up, reason: None)
        self.tally = Tally()
        self.sessions: list[Worker] = []
        for j in range(opts.sessions_per_worker):
            w = Worker(opts, name=f"{name} session {j}", on_state=lambda up, reason, j=j: self._state(j, up, reason),
                       on_finished=on_finished, on_opened=on_opened, on_resolved=on_resolved,
                       index=index * opts.sessions_per_worker + j)
            w.tally = w.carried.tally = self.tally
            self.sessions.append(w)
        self.up = False
        self._starting = False

    # ---- what the owner sets or reads as on a Worker ---------------------------

    @property
    def on_finished(self):
        return self.sessions[0].on_finished

    @on_finished.setter
    def on_finished(self, fn):
        for w in self.sessions:
            w.on_finished = fn
            w.carried.on_finished = fn

    @property
    def on_resolved(self):
        return self.sessions[0].on_resolved

    @on_resolved.setter
    def on_resolved(self, fn):
        for w in self.sessions:
            w.on_resolved = fn

    @property
    def remotes(self):
        return self.sessions[0].remotes

    @property
    def log_context(self):
        return getattr(self.sessions[0], "log_context", None)

    @log_context.setter
    def log_context(self, ctx):
        for w in self.sessions:
            w.log_context = ctx

    @property
    def pending(self) -> list:
        return [c for w in self.sessions for c in w.pending]

    @property
    def active(self) -> dict:
        return {(j, cid): c for j, w in enumerate(self.sessions) for cid, c in w.active.items()}

    @property
    def load(self) -> int:
        return sum(w.load for w in self.sessions)

    def _state(self, j: int, up: bool, reason: str):
        if self._starting:
            return   # said once start() is done
        now_up = any(w.up for w in self.sessions)
        if now_up != self.up:
            self.up = now_up
            self.on_state(now_up, reason if not now_up else f"session {j}: {reason}")

    # ---- lifecycle -------------------------------------------------------------

    async def start(self):
        """Every session logs in; the pool says "up" once they all have
        answered (so that what was measured at "ready" holds them all). A
        session that failed reconnects in the background while the others
        serve; when none came up, the first error is raised (the caller
        then starts reconnecting, as with one Worker)."""
        self._starting = True
        try:
            results = await asyncio.gather(*(w.start() for w in self.sessions), return_exceptions=True)
        finally:
            self._starting = False
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors and not any(w.up for w in self.sessions):
            raise errors[0]
        for w, r in zip(self.sessions, results):
            if isinstance(r, BaseException):
                w.start_reconnecting()
        self._state(0, True, "connected")

    def start_reconnecting(self):
        for w in self.sessions:
            w.start_reconnecting()

    async def drain(self, timeout: float):
        await asyncio.gather(*(w.drain(timeout) for w in self.sessions))

    def close(self):
        for w in self.sessions:
            w.close()
        self.up = False

    # ---- connections -------------------------------------------------------------

    def submit(self, sock, route, peer=None, conn=None, accepted=None):
        """To the live session with the fewest connections (any session when
        none is up: the client waits there for its reconnect)."""
        live = [w for w in self.sessions if w.up] or self.sessions
        min(live, key=lambda w: w.load).submit(sock, route, peer, conn, accepted=accepted)

    def retire(self, route_id: str, grace: float):
        for w in self.sessions:
            w.retire(route_id, grace)

    def oldest_open_wait(self) -> float | None:
        waits = [t for t in (w.oldest_open_wait() for w in self.sessions) if t is not None]
        return max(waits) if waits else None

    def connections(self, worker_index) -> list[dict]:
        return [row for w in self.sessions for row in w.connections(worker_index)]

    def pump_stats(self) -> dict:
        total = {"conns": 0, "buffered": 0, "buffers": 0}
        for w in self.sessions:
            for k, v in w.pump_stats().items():
                total[k] += v
        return total
