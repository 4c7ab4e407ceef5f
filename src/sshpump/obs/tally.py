"""What one worker counts for metrics between two reports to the master.

The worker records connection events here (opened with its latency, ended
with its reason and bytes, failed opens with their reason, keepalive round
trips); its owner takes the batch once per event-loop turn and sends it with
the ``counts`` message (workerproc.py), or applies it in place (LocalWorker).
Only deltas travel, so the master's totals survive a worker's death: a
respawned worker starts from zero and the master keeps adding.

Kept free of prometheus_client: it is imported by every worker process."""

from __future__ import annotations

from bisect import bisect_left

from .. import pump

# Open latency buckets, seconds (upper bounds; +Inf implied). A channel open
# takes about one round trip to the server plus its connect to the target:
# under a millisecond on a LAN, hundreds of ms across continents, seconds
# when the target does not answer.
BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


def _short(text: str) -> str:
    if text.startswith("channel closed"):
        return "channel_closed"
    if text.startswith("pump bug"):
        return "state"
    return text.replace(" ", "_")


# The pump's end reasons as label values: closed, aborted, client_error,
# channel_closed, channel_error, state.
END_LABELS = {code: _short(text) for code, text in pump.END_REASONS.items()}
WORKER_LOST = "worker_lost"   # the master's own: open when its worker died (no end event came)
OPEN_FAILURES = ("prohibited", "connect_failed", "other")


def open_failure(reason_text: str) -> str:
    """describe.open_reason's text (the server's SSH_OPEN_* reason) as a label."""
    text = reason_text.lower()
    if "prohibited" in text:
        return "prohibited"
    if "connect failed" in text:
        return "connect_failed"
    return "other"


def _route():
    # o: opened, c: closed by reason, u/d: bytes up/down of ended
    # connections, f: failed opens by reason, h: latency bucket counts (not
    # cumulative, +Inf last), s: latency sum.
    return {"o": 0, "c": {}, "u": 0, "d": 0, "f": {}, "h": [0] * (len(BUCKETS) + 1), "s": 0.0}


class Tally:
    """``on_news()`` is called on the first record after a take(), so that
    the owner can schedule one report for the whole batch."""

    def __init__(self, on_news=None):
        self.on_news = on_news or (lambda: None)
        self._routes: dict[str, dict] = {}
        self._rtt = None
        self._buffered = None
        self._news = False

    def _touch(self):
        if not self._news:
            self._news = True
            self.on_news()

    def _r(self, route_id: str) -> dict:
        r = self._routes.get(route_id)
        if r is None:
            r = self._routes[route_id] = _route()
        self._touch()
        return r

    def opened(self, route_id: str, latency: float):
        r = self._r(route_id)
        r["o"] += 1
        r["h"][bisect_left(BUCKETS, latency)] += 1
        r["s"] += latency

    def ended(self, route_id: str, reason: int, up: int, down: int):
        r = self._r(route_id)
        label = END_LABELS.get(reason, "other")
        r["c"][label] = r["c"].get(label, 0) + 1
        r["u"] += up
        r["d"] += down

    def failed(self, route_id: str, reason_text: str):
        r = self._r(route_id)
        label = open_failure(reason_text)
        r["f"][label] = r["f"].get(label, 0) + 1

    def rtt(self, seconds: float):
        self._rtt = seconds
        self._touch()

    def buffered(self, nbytes: int):
        if nbytes != self._buffered:
            self._buffered = nbytes
            self._touch()

    @property
    def news(self) -> bool:
        return self._news

    def take(self) -> dict:
        """The batch as message fields (JSON-ready), and a fresh start."""
        out = {}
        if self._routes:
            out["m"] = self._routes
            self._routes = {}
        if self._rtt is not None:
            out["rtt"] = self._rtt
            self._rtt = None
        if self._news and self._buffered is not None:
            out["buf"] = self._buffered
        self._news = False
        return out
