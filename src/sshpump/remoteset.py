"""A tunnel's -R forwards: which worker holds each, and what the server said.

The server lets one session bind a remote port, so each remote forward is
given to exactly one worker (the one holding the fewest). It stays with that
worker across its reconnects (the worker asks again after each login) and
its respawns (the new process is told at spawn). A worker process that dies
hands its forwards to a live worker at once, which asks the server again:
sshd may still hold the dead session's listener for a moment, and the
refusal that brings is retried with backoff (remotes.py), not fatal.
"""

from __future__ import annotations

import asyncio
import logging
import time

from .errors import ForwardError
from .forwards import Forward
from .logfmt import fields

log = logging.getLogger("sshpump")


def allocated_text(fwd: Forward) -> str:
    """ssh's own line for a remote forward whose port the server chose."""
    return f"Allocated port {fwd.remote['port']} for remote forward to {fwd.route.target}"


class RemoteSet:
    def __init__(self, tunnel):
        self.tunnel = tunnel
        self.owner: dict[str, object] = {}          # forward id -> worker handle
        self._answered: dict[str, asyncio.Event] = {}

    def _workers(self) -> list:
        return self.tunnel.pool.workers

    def _held(self, w) -> int:
        return sum(1 for owner in self.owner.values() if owner is w)

    def place(self, fwd: Forward, avoid=None):
        """Give fwd to the worker holding the fewest (a live one first)."""
        candidates = [w for w in self._workers() if w is not avoid] or self._workers()
        if not candidates:
            return
        w = min(candidates, key=lambda c: (not c.up, self._held(c), c.index))
        self.owner[fwd.id] = w
        fwd.remote.update(worker=w.index, state="pending", port=fwd.remote["asked"])
        self._answered.setdefault(fwd.id, asyncio.Event())
        w.assign_remote(fwd.id, {"route": fwd.route.to_wire(), "bind": fwd.remote["bind"],
                                 "port": fwd.remote["asked"]})

    def place_all(self):
        for fwd in self.tunnel.table:
            if fwd.remote is not None and fwd.id not in self.owner:
                self.place(fwd)

    def withdraw(self, fwd: Forward):
        w = self.owner.pop(fwd.id, None)
        self._answered.pop(fwd.id, None)
        if w is not None:
            w.withdraw_remote(fwd.id)

    def worker_gone(self, w):
        """Its process died: its forwards move to a live worker, if any."""
        for fid, owner in self.owner.items():
            fwd = self.tunnel.table.by_id.get(fid)
            if owner is w and fwd is not None:
                fwd.remote.update(state="pending", reason="worker lost")
        live = [o for o in self._workers() if o is not w and o.up]
        if not live:
            return   # the replacement asks again
        for fid, owner in list(self.owner.items()):
            fwd = self.tunnel.table.by_id.get(fid)
            if owner is w and fwd is not None:
                w.remote_assigned.pop(fid, None)
                self.place(fwd, avoid=w)
                log.warning("%sremote forward %s moves to worker %d", self.tunnel.label, fid, fwd.remote["worker"],
                            extra=fields("remote_moved", tunnel=self.tunnel.name, forward=fid))

    def status(self, w, fid: str, state: str, port: int, reason: str):
        """A worker reports the server's answer for one remote forward."""
        fwd = self.tunnel.table.by_id.get(fid)
        if fwd is None or fwd.remote is None or self.owner.get(fid) is not w:
            return   # removed or moved meanwhile
        before = dict(fwd.remote)
        fwd.remote.update(state=state, port=port, reason=reason, worker=w.index)
        if state == "bound" and fwd.remote["asked"] == 0 and before.get("announced") not in (None, port):
            # The server chose another port after a reconnect: users must know.
            log.warning("%s%s (was %s)", self.tunnel.label, allocated_text(fwd), before["announced"],
                        extra=fields("remote_allocated", tunnel=self.tunnel.name, forward=fid))
        if state == "bound":
            fwd.remote["announced"] = port
        ev = self._answered.get(fid)
        if ev is not None and state != "pending":
            ev.set()

    async def answer(self, fwd: Forward, timeout: float) -> str:
        """fwd's state once the server has answered (or timeout passed)."""
        ev = self._answered.get(fwd.id)
        if ev is not None:
            try:
                await asyncio.wait_for(ev.wait(), timeout)
            except asyncio.TimeoutError:
                pass
        return fwd.remote["state"]

    async def first_answers(self, timeout: float) -> list[Forward]:
        """Wait (up to timeout) until the server has answered every remote
        forward once; the forwards it refused (or did not answer)."""
        pending = [(fid, ev) for fid, ev in self._answered.items() if not ev.is_set()]
        deadline = time.monotonic() + timeout
        for _fid, ev in pending:
            try:
                await asyncio.wait_for(ev.wait(), max(0.01, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                break
        return [f for f in self.tunnel.table if f.remote is not None and f.remote["state"] != "bound"]

    async def started(self, timeout: float, exit_on_failure: bool):
        """At start: ExitOnForwardFailure makes a refused remote forward
        fatal, as in ssh; otherwise it is said once and retried."""
        failed = await self.first_answers(timeout)
        for fwd in failed:
            text = f"remote port forwarding failed for listen port {fwd.remote['asked']}"
            if exit_on_failure:
                raise ForwardError(text)
            log.warning("%sWarning: %s (retrying)", self.tunnel.label, text,
                        extra=fields("forward_failed", tunnel=self.tunnel.name, forward=fwd.id, reason=text))
