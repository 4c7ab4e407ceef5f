"""The master's totals for one tunnel, accumulated from what its workers
report (tally.Tally batches, applied once per ``counts`` message).

Totals live here, not in the workers, so that they never go down: a worker
that dies takes only its unreported deltas with it. Connections it still
carried are counted as closed with reason ``worker_lost`` (no end event will
come for them), so that opened - closed stays the number of connections
open. Kept by tunnel name in the runtime (obs.metrics.Metrics.tunnel), so a
tunnel restarted by a reload keeps counting from where it was."""

from __future__ import annotations

from .tally import BUCKETS, WORKER_LOST


class ForwardTotals:
    __slots__ = ("opened", "closed", "up", "down", "failed", "buckets", "latency_sum")

    def __init__(self):
        self.opened = 0
        self.closed: dict[str, int] = {}
        self.up = 0
        self.down = 0
        self.failed: dict[str, int] = {}
        self.buckets = [0] * (len(BUCKETS) + 1)
        self.latency_sum = 0.0

    @property
    def active(self) -> int:
        return self.opened - sum(self.closed.values())


def _add(into: dict, more: dict):
    for k, n in more.items():
        into[k] = into.get(k, 0) + int(n)


class TunnelCounters:
    def __init__(self, name: str = ""):
        self.name = name
        self.forwards: dict[str, ForwardTotals] = {}
        self.sessions: dict[int, int] = {}          # worker index -> sessions it brought up
        self._carried: dict[int, dict[str, int]] = {}  # worker index -> route -> open now

    def forward(self, route_id: str) -> ForwardTotals:
        f = self.forwards.get(route_id)
        if f is None:
            f = self.forwards[route_id] = ForwardTotals()
        return f

    def apply(self, index: int, report: dict):
        """One worker's batch: the "m" part of a counts message (tally.take)."""
        per_route = report.get("m")
        if not per_route:
            return
        carried = self._carried.setdefault(index, {})
        for rid, r in per_route.items():
            f = self.forward(rid)
            f.opened += r["o"]
            _add(f.closed, r["c"])
            f.up += r["u"]
            f.down += r["d"]
            _add(f.failed, r["f"])
            for i, n in enumerate(r["h"][:len(f.buckets)]):
                f.buckets[i] += n
            f.latency_sum += r["s"]
            carried[rid] = carried.get(rid, 0) + r["o"] - sum(r["c"].values())

    def session_up(self, index: int):
        self.sessions[index] = self.sessions.get(index, 0) + 1

    def reconnects(self, index: int) -> int:
        """Sessions brought up again after the slot's first (by the worker
        reconnecting, or by its replacement after it died)."""
        return max(0, self.sessions.get(index, 0) - 1)

    def worker_gone(self, index: int) -> dict[str, int]:
        """A worker process ended: what it still carried is closed.
        Returns those connections per forward."""
        lost = {}
        for rid, n in self._carried.pop(index, {}).items():
            if n > 0:
                f = self.forward(rid)
                f.closed[WORKER_LOST] = f.closed.get(WORKER_LOST, 0) + n
                lost[rid] = n
        return lost
