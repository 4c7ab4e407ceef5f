"""Which worker gets a new client, and the clients waiting for one.

The master hands each client to the live worker with the fewest open
connections, but skips a worker whose session has stalled: its oldest queued
channel open has waited far longer than the other workers' recent opens took
(a hung sshd, a network cut), long before its keepalives can declare it dead.
Clients already handed to that worker stay with it -- an fd passed to a worker
is the worker's, and its open may already be on the wire -- and are served
when the server answers again or the worker has reconnected; only new clients
go elsewhere. While no worker is up, clients wait here up to --client-wait.
"""

from __future__ import annotations

import logging
import statistics
from collections import deque

from .cut import reset_close

log = logging.getLogger("sshpump")

QUEUE_MAX = 4096     # clients held while no worker can take them
STALL_MIN = 2.0      # an open may always wait this long before its worker counts as stalled...
STALL_FACTOR = 10.0  # ...and this many times the median of the other workers' recent opens
RECENT = 30.0        # seconds an open latency counts as recent


class OpenHealth:
    """One worker's channel opens, as it reports them (workerproc.OpenReport)."""

    def __init__(self):
        self.oldest_since = None            # when its oldest queued open began waiting (None: none waits)
        self.latencies = deque(maxlen=16)   # (when reported, median open latency of that report)
        self.stalled = False

    def report(self, wait, latency, now):
        self.oldest_since = None if wait is None else now - wait
        if latency is not None:
            self.latencies.append((now, latency))

    def clear(self):
        """The session went down or came up: no open waits on it."""
        self.oldest_since = None
        self.stalled = False


class Dispatcher:
    """The waiting queue and the pick. ``workers`` is the master's list: each
    has ``up``, ``load``, ``health`` (OpenHealth), ``label`` and
    ``submit(sock, fwd_index, peer, opts) -> bool``."""

    def __init__(self, workers: list, opts):
        self.workers = workers
        self.opts = opts
        self.waiting: deque = deque()   # (sock, fwd_index, peer, since)

    def pick(self, now: float) -> list:
        """Live workers to try, least loaded first; stalled ones left out
        while another live worker answers."""
        live = [w for w in self.workers if w.up]
        if len(live) > 1:
            answering = [w for w in live if not self._stalled(w, live, now)]
            live = answering or live
        return sorted(live, key=lambda w: w.load)

    def _stalled(self, w, live, now) -> bool:
        h = w.health
        waited = 0.0 if h.oldest_since is None else now - h.oldest_since
        stalled = waited > STALL_MIN  # most picks stop here: nothing waits that long
        if stalled:
            others = [lat for o in live if o is not w for at, lat in o.health.latencies if at > now - RECENT]
            typical = statistics.median(others) if others else None
            stalled = typical is None or waited > STALL_FACTOR * typical
        if stalled != h.stalled:
            h.stalled = stalled
            if stalled:
                took = f"{typical * 1000:.1f} ms" if typical is not None else "no recent opens"
                log.warning("%s: a channel open has waited %.1fs (other workers' recent opens: %s); "
                            "new clients go to the other workers", w.label, waited, took)
            else:
                log.warning("%s: channel opens answered again; it takes new clients again", w.label)
        return stalled

    def dispatch(self, sock, idx, peer, since, now):
        """Hand a client to a worker, or queue it while none can take it."""
        if self._hand_over(sock, idx, peer, now):
            return
        if len(self.waiting) >= QUEUE_MAX:
            log.warning("closing client %s: %d clients already waiting for a worker", peer, QUEUE_MAX)
            reset_close(sock)
            return
        self.waiting.append((sock, idx, peer, since))

    def _hand_over(self, sock, idx, peer, now) -> bool:
        return any(w.submit(sock, idx, peer, self.opts) for w in self.pick(now))

    def flush(self, now):
        """Hand queued clients over, oldest first, while workers take them."""
        while self.waiting:
            sock, idx, peer, _ = self.waiting[0]
            if not self._hand_over(sock, idx, peer, now):
                return
            self.waiting.popleft()

    def tick(self, now):
        """Retry the queue, close clients that waited too long, and review
        stalls (so that they are logged even when no client comes)."""
        if self.waiting:
            self.flush(now)
        limit = now - self.opts.client_wait
        while self.waiting and self.waiting[0][3] < limit:
            sock, _, peer, _ = self.waiting.popleft()
            log.warning("closing client %s: no live SSH session for %.0fs", peer, self.opts.client_wait)
            reset_close(sock)
        self.pick(now)

    def close(self):
        while self.waiting:
            reset_close(self.waiting.popleft()[0])
