"""The client connections one worker carries: queued for a channel, or
handed to the C pump; their end events turned into log lines and counts,
and a listing of them for status (connections(), ``sshpump ctl connections``)."""

from __future__ import annotations

import logging
import socket
import time
from dataclasses import dataclass, field

from .describe import err_text, peer_text
from .logfmt import fields
from .pump import END_ABORTED, END_NORMAL, END_REASONS, EV_DONE, EV_SESSION_DEAD
from .routes import Route

log = logging.getLogger("sshpump")


@dataclass
class Client:
    sock: socket.socket
    route: Route
    peer: tuple
    conn: int                       # the connection's number, unique in the process run
    queued_at: float = field(default_factory=time.monotonic)
    accepted: float | None = None   # when the master accepted it (CLOCK_MONOTONIC is system-wide)
    opened_at: float = 0.0
    channel: object = None


class Carried:
    """Connections in the pump, by pump id. ``on_finished(route_id)`` is
    called once per connection that ends; its reason and bytes go to
    ``tally`` (obs.tally.Tally, for metrics) when one is given."""

    def __init__(self, name: str, verbose: int, on_finished, tally=None):
        self.name = name
        self.verbose = verbose
        self.on_finished = on_finished
        self.tally = tally
        self.active: dict[int, Client] = {}
        self.total_done = 0

    def __len__(self):
        return len(self.active)

    def add(self, cid: int, client: Client):
        self.active[cid] = client

    def of_route(self, route_id: str) -> list[int]:
        return [cid for cid, c in self.active.items() if c.route.id == route_id]

    def handle_events(self, events) -> str | None:
        """Account for ended connections; the reason if the session died."""
        dead = None
        for kind, cid, reason, err, up, down in events:
            if kind == EV_DONE:
                client = self.active.pop(cid, None)
                if client is None:
                    continue
                self.total_done += 1
                # Dropping the Channel frees it in libssh2; the pump has
                # already closed it, so the free sends nothing.
                client.channel = None
                self._log_end(client, reason, err, up, down)
                if self.tally is not None:
                    self.tally.ended(client.route.id, reason, up, down)
                self.on_finished(client.route.id)
            elif kind == EV_SESSION_DEAD:
                dead = f"libssh2 error {err}"
        return dead

    def _log_end(self, client, reason, err, up, down):
        # Ends the user did not cause (errors) are logged even without -v.
        routine = reason in (END_NORMAL, END_ABORTED)
        if not (self.verbose or not routine):
            return
        why = END_REASONS.get(reason, str(reason))
        if err:
            why += f" ({err_text(err)})"
        log.log(logging.INFO if routine else logging.WARNING,
                "%s: conn %d closed %s -> %s: up %d bytes, down %d bytes, %.3fs, %s",
                self.name, client.conn, peer_text(client.peer), client.route.target, up, down,
                time.monotonic() - client.opened_at, why,
                extra=fields("conn_close", self, forward=client.route.id, conn=client.conn,
                             peer=peer_text(client.peer), target=str(client.route.target),
                             bytes={"up": up, "down": down},
                             duration=round(time.monotonic() - client.opened_at, 6),
                             reason=END_REASONS.get(reason, str(reason))))

    def clear(self):
        self.active.clear()

    def listing(self, pump, pending, worker_index) -> list[dict]:
        """Every connection, open or queued, as status reports it."""
        now = time.monotonic()
        out = []
        for cid, c in self.active.items():
            st = pump.conn_stats(cid) if pump is not None and hasattr(pump, "conn_stats") else None
            out.append(_row(c, worker_index, now, "open", st))
        out.extend(_row(c, worker_index, now, "opening" if c.channel == "opening" else "queued", None)
                   for c in pending)
        return out


def _row(c: Client, worker_index, now, state, st) -> dict:
    since = c.opened_at or c.queued_at
    return {
        "id": c.conn, "forward": c.route.id, "client": peer_text(c.peer), "target": str(c.route.target),
        "worker": worker_index, "state": state, "age": round(now - c.queued_at, 3),
        "open_for": round(now - since, 3) if c.opened_at else 0.0,
        "up_bytes": st["up_bytes"] if st else 0, "down_bytes": st["down_bytes"] if st else 0,
        "buffered": (st["buffered_up"] + st["buffered_down"]) if st else 0,
    }
