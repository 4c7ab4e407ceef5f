"""Which worker gets a new client, and the clients waiting for one.

Order: a client's connections reach the target in the order sshpump accepted
them. Each session opens its channels one at a time, in queue order, so a
new connection from a client address that still has a channel open queued on
some worker goes to that same worker, behind it; once that open is answered
(the target has accepted the earlier connection), the next may go anywhere.
Protocols that pair connections by arrival order (iperf3's --bidir, FTP-like
control + data pairs) depend on this; ssh -L, with one session, has it too.

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
from collections import Counter, deque

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


def client_key(peer) -> str:
    """Connections from one client: its IP address (unix peers: one client)."""
    return str(peer[0]) if isinstance(peer, tuple) and peer else "unix"


class OpenQueue:
    """The clients a worker has been handed and not yet opened a channel for,
    in the worker's order (it resolves them oldest first, and reports it)."""

    def __init__(self):
        self.keys: deque = deque()
        self.count: Counter = Counter()

    def push(self, key: str):
        self.keys.append(key)
        self.count[key] += 1

    def unpush(self, key: str):
        """Take back the last push (the worker did not take the client)."""
        self.keys.pop()
        self.count[key] -= 1
        if not self.count[key]:
            del self.count[key]

    def resolved(self, n: int):
        for _ in range(min(n, len(self.keys))):
            key = self.keys.popleft()
            self.count[key] -= 1
            if not self.count[key]:
                del self.count[key]

    def holds(self, key: str) -> bool:
        return key in self.count


class Dispatcher:
    """The waiting queue and the pick. ``workers`` is the tunnel's list: each
    has ``up``, ``load``, ``health`` (OpenHealth), ``label`` and
    ``submit(sock, ticket, peer, opts) -> bool``. A ticket is opaque here
    (the tunnel's route and connection number); ``on_dropped(ticket)`` is
    called for every client closed while it waited."""

    def __init__(self, workers: list, opts, on_dropped=None):
        self.workers = workers
        self.opts = opts
        self.on_dropped = on_dropped or (lambda ticket: None)
        self.waiting: deque = deque()   # (sock, ticket, peer, since)

    def pick(self, now: float, key: str | None = None) -> list:
        """Live workers to try, least loaded first; stalled ones left out
        while another live worker answers. A worker with an open of the same
        client still queued comes first (see Order above)."""
        live = [w for w in self.workers if w.up]
        if len(live) > 1:
            answering = [w for w in live if not self._stalled(w, live, now)]
            live = answering or live
        return sorted(live, key=lambda w: (key is None or not w.opens.holds(key), w.load))

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

    def dispatch(self, sock, ticket, peer, since, now):
        """Hand a client to a worker, or queue it while none can take it.
        Clients already waiting go first: a worker that has come up takes
        them before this one, and while any still waits this one queues
        behind them (clients are handed over in accept order)."""
        if self.waiting:
            self.flush(now)
        if not self.waiting and self._hand_over(sock, ticket, peer, now):
            return
        if len(self.waiting) >= QUEUE_MAX:
            log.warning("closing client %s: %d clients already waiting for a worker", peer, QUEUE_MAX)
            reset_close(sock)
            self.on_dropped(ticket)
            return
        self.waiting.append((sock, ticket, peer, since))

    def _hand_over(self, sock, ticket, peer, now) -> bool:
        key = client_key(peer)
        for w in self.pick(now, key):
            # Pushed first: an in-process worker may open (and resolve) the
            # client inside submit(), and its resolve must find the key.
            w.opens.push(key)
            if w.submit(sock, ticket, peer, self.opts):
                return True
            w.opens.unpush(key)
        return False

    def flush(self, now):
        """Hand queued clients over, oldest first, while workers take them;
        the first that none takes stays at the head (tick expires from it)."""
        while self.waiting:
            sock, ticket, peer, _ = self.waiting[0]
            if not self._hand_over(sock, ticket, peer, now):
                return
            self.waiting.popleft()

    def tick(self, now):
        """Retry the queue, close clients that waited too long, and review
        stalls (so that they are logged even when no client comes)."""
        if self.waiting:
            self.flush(now)
        limit = now - self.opts.client_wait
        while self.waiting and self.waiting[0][3] < limit:
            sock, ticket, peer, _ = self.waiting.popleft()
            log.warning("closing client %s: no live SSH session for %.0fs", peer, self.opts.client_wait)
            reset_close(sock)
            self.on_dropped(ticket)
        self.pick(now)

    def close(self):
        while self.waiting:
            sock, ticket, _, _ = self.waiting.popleft()
            reset_close(sock)
            self.on_dropped(ticket)
