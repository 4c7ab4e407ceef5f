"""The workers of one tunnel: started together, replaced when they die, and
halted on a boot error (authentication, host key) instead of respawned in a
loop, as gunicorn's arbiter does with WORKER_BOOT_ERROR."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque

from .errors import ConnectError, SshpumpError, error_from_wire
from .handles import LocalWorker, Supervisor, WorkerProcess

log = logging.getLogger("sshpump")

BOOT_GRACE = 10.0     # beyond ConnectTimeout, how long the first status of a worker may take


def _status_error(msg: dict) -> SshpumpError:
    if "error" in msg:
        return msg["error"]
    err = error_from_wire({"type": msg.get("type", "ConnectError"), "code": msg.get("code"),
                           "msg": msg.get("msg") or msg.get("reason")})
    return err


class WorkerPool:
    def __init__(self, tunnel: Supervisor):
        self.tunnel = tunnel
        self.opts = tunnel.opts
        self.workers: list = []
        self._respawns: deque = deque()

    async def start(self, fail_fast: bool):
        """Start the workers. fail_fast (the CLI, the library): the first
        boot error stops them all and is raised, and so is a session that no
        worker could bring up. Otherwise (a tunnel of a --config file) the
        workers keep trying in the background and boot errors go to the
        tunnel's boot_failed."""
        if self.opts.workers == 0:
            w = LocalWorker(self.tunnel, 0)
            self.workers.append(w)
            if fail_fast:
                await w.start()
            else:
                w.worker.start_reconnecting()
            return
        for i in range(self.opts.workers):
            w = WorkerProcess(self.tunnel, i)
            w.spawn()
            self.workers.append(w)
        if not fail_fast:
            return
        timeout = (self.opts.connect_timeout or 30) + 0.05 * len(self.workers) + BOOT_GRACE
        waiting = {asyncio.ensure_future(asyncio.shield(w.first_status)) for w in self.workers}
        # Ready once every worker has answered (so that clients spread over
        # all of them from the first), with at least one session up; the
        # first boot error ends the wait at once.
        first_down, any_up = None, False
        deadline = time.monotonic() + timeout
        try:
            while waiting:
                done, waiting = await asyncio.wait(waiting, timeout=max(0.0, deadline - time.monotonic()),
                                                   return_when=asyncio.FIRST_COMPLETED)
                if not done:
                    break
                for fut in done:
                    msg = fut.result()
                    if msg["t"] == "fatal":   # authentication, host key: no worker will do better
                        await self.stop(0)
                        raise _status_error(msg)
                    if msg["t"] == "up":
                        any_up = True
                    else:
                        first_down = first_down or _status_error(msg)
        finally:
            for fut in waiting:
                fut.cancel()
        if any_up:
            return
        await self.stop(0)
        raise first_down or ConnectError("no worker reported a session within %.0fs" % timeout)

    def respawn(self, w: WorkerProcess):
        if self.tunnel.stopping:
            return
        now = time.monotonic()
        self._respawns.append(now)
        while self._respawns and self._respawns[0] < now - 10:
            self._respawns.popleft()
        if now - w.started_at < 1.0 and len(self._respawns) > 5 * len(self.workers):
            self.tunnel.boot_failed(w, SshpumpError("workers keep dying at start"))
            return
        w.spawn()

    def retire(self, route_id: str, grace: float):
        for w in self.workers:
            w.retire(route_id, grace)

    async def reports(self) -> list[tuple[object, dict | None]]:
        """Each worker's connections and pump totals (None: no answer)."""
        answers = await asyncio.gather(*(w.query() for w in self.workers))
        return list(zip(self.workers, answers))

    async def stop(self, grace: float):
        await asyncio.gather(*(w.stop(grace) for w in self.workers))
