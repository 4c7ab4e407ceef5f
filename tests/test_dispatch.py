"""The master's dispatch queue (sshpump.dispatch.Dispatcher) with fake workers.

No processes, no SSH: each worker is a plain object with the attributes the
Dispatcher reads (``up``, ``load``, ``health``, ``opens``, ``label``) and a
``submit`` that records what it was handed. Clients are real socketpairs;
time is explicit ``now`` values, so nothing here sleeps.
"""
from __future__ import annotations

import logging
import socket
import types

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from sshpump import dispatch
from sshpump.dispatch import STALL_FACTOR, STALL_MIN, Dispatcher, OpenHealth, OpenQueue

ROUTE = object()  # the route argument is opaque to the dispatcher


class FakeWorker:
    """What the Dispatcher sees of a worker. ``refuse`` makes submit return
    False (a full control socket, a worker gone); the client is not taken."""

    def __init__(self, label, up=True, load=0, log=None):
        self.label = label
        self.log = log      # a list shared by several workers: every handover, in order
        self.up = up
        self.load = load
        self.health = OpenHealth()
        self.opens = OpenQueue()
        self.refuse = False
        self.got = []       # (sock, route, peer) in the order handed over
        self.tries = 0

    def submit(self, sock, route, peer, opts) -> bool:
        self.tries += 1
        if self.refuse:
            return False
        self.got.append((sock, route, peer))
        if self.log is not None:
            self.log.append(sock)
        self.load += 1
        return True

    def socks(self):
        return [s for s, _, _ in self.got]

    def resolve(self, n=1):
        """The worker's session answered its n oldest channel opens."""
        self.opens.resolved(n)


class Clients:
    """Client sockets: the accepted end of a socketpair each, plus its peer
    end (kept open so that a close is ours, not the far side's)."""

    def __init__(self):
        self.pairs = []

    def new(self):
        a, b = socket.socketpair()
        self.pairs.append((a, b))
        return a

    def close_all(self):
        for a, b in self.pairs:
            a.close()
            b.close()


def closed(sock) -> bool:
    return sock.fileno() == -1


@pytest.fixture
def clients():
    c = Clients()
    yield c
    c.close_all()


def make(*workers, client_wait=10.0):
    return Dispatcher(list(workers), types.SimpleNamespace(client_wait=client_wait))


def peer(ip="10.0.0.1", port=40000):
    return (ip, port)


# ---- the pick -------------------------------------------------------------

def test_least_loaded_worker_gets_the_client(clients):
    a, b, c = FakeWorker("a", load=3), FakeWorker("b", load=1), FakeWorker("c", load=2)
    d = make(a, b, c)
    s = clients.new()
    d.dispatch(s, ROUTE, peer(), 0.0, 0.0)
    assert b.got == [(s, ROUTE, peer())]
    assert a.got == [] and c.got == []
    assert not d.waiting
    assert b.opens.holds("10.0.0.1")


class InProcessWorker(FakeWorker):
    """Like --workers 0's LocalWorker: the channel may open (and the client
    resolve) inside submit() itself."""

    def submit(self, sock, route, peer, opts) -> bool:
        taken = super().submit(sock, route, peer, opts)
        if taken:
            self.resolve(1)
        return taken


def test_an_open_resolved_inside_submit_leaves_no_stale_key(clients):
    w = InProcessWorker("local")
    d = make(w)
    for port in range(3):
        d.dispatch(clients.new(), ROUTE, peer(port=40000 + port), 0.0, 0.0)
    assert not w.opens.holds("10.0.0.1") and not w.opens.keys


def test_a_refusal_takes_back_the_key(clients):
    a, b = FakeWorker("a", load=0), FakeWorker("b", load=5)
    a.refuse = True
    d = make(a, b)
    d.dispatch(clients.new(), ROUTE, peer(), 0.0, 0.0)
    assert not a.opens.holds("10.0.0.1") and b.opens.holds("10.0.0.1")


def test_workers_that_are_down_are_not_tried(clients):
    a, b = FakeWorker("a", up=False, load=0), FakeWorker("b", load=9)
    d = make(a, b)
    s = clients.new()
    d.dispatch(s, ROUTE, peer(), 0.0, 0.0)
    assert a.tries == 0
    assert b.socks() == [s]


def test_a_refusing_worker_is_skipped_for_the_next(clients):
    a, b, c = FakeWorker("a", load=0), FakeWorker("b", load=1), FakeWorker("c", load=2)
    a.refuse = True
    d = make(a, b, c)
    s = clients.new()
    d.dispatch(s, ROUTE, peer(), 0.0, 0.0)
    assert a.tries == 1          # tried first: least loaded
    assert b.socks() == [s]      # then the next least loaded
    assert c.tries == 0
    assert not a.opens.holds("10.0.0.1")   # only the worker that took it holds its open
    assert b.opens.holds("10.0.0.1")


def test_all_workers_refuse_the_client_waits(clients):
    a, b = FakeWorker("a"), FakeWorker("b")
    a.refuse = b.refuse = True
    d = make(a, b)
    s = clients.new()
    d.dispatch(s, ROUTE, peer(), 0.0, 0.0)
    assert a.tries == b.tries == 1
    assert [w[0] for w in d.waiting] == [s]
    assert not closed(s)


# ---- the waiting queue ----------------------------------------------------

def test_no_worker_up_clients_wait_then_flush_oldest_first(clients):
    w = FakeWorker("w", up=False)
    d = make(w)
    socks = [clients.new() for _ in range(3)]
    for i, s in enumerate(socks):
        d.dispatch(s, ROUTE, peer(port=i), float(i), float(i))
    assert [x[0] for x in d.waiting] == socks
    assert w.tries == 0

    w.up = True
    d.flush(5.0)
    assert w.socks() == socks
    assert not d.waiting
    assert not any(closed(s) for s in socks)


def test_flush_keeps_a_refused_client_at_the_head(clients):
    w = FakeWorker("w", up=False)
    d = make(w)
    socks = [clients.new() for _ in range(3)]
    for i, s in enumerate(socks):
        d.dispatch(s, ROUTE, peer(port=i), float(i), float(i))

    w.up = True
    w.refuse = True
    d.flush(5.0)
    assert w.tries == 1                              # stops at the first refusal
    assert [x[0] for x in d.waiting] == socks        # head still the oldest, nothing moved
    assert [x[3] for x in d.waiting] == [0.0, 1.0, 2.0]

    w.refuse = False
    d.flush(6.0)
    assert w.socks() == socks


def test_flush_takes_the_next_worker_when_one_refuses(clients):
    a, b = FakeWorker("a", up=False), FakeWorker("b", up=False, load=5)
    d = make(a, b)
    socks = [clients.new() for _ in range(2)]
    for i, s in enumerate(socks):
        d.dispatch(s, ROUTE, peer(port=i), float(i), float(i))
    a.up = b.up = True
    a.refuse = True
    d.flush(3.0)
    assert b.socks() == socks
    assert not d.waiting


def test_new_client_does_not_overtake_waiting_ones(clients):
    """A client accepted while older ones still wait goes behind them, even
    when a worker has come up and no flush has run yet (the master's accept
    handler may run before the worker's "up" is read)."""
    w = FakeWorker("w", up=False)
    d = make(w)
    old = [clients.new() for _ in range(2)]
    for i, s in enumerate(old):
        d.dispatch(s, ROUTE, peer(port=i), float(i), float(i))

    w.up = True
    new = clients.new()
    d.dispatch(new, ROUTE, peer(port=9), 3.0, 3.0)
    assert w.socks() == old + [new]
    assert not d.waiting


def test_new_client_queues_behind_a_refused_head(clients):
    """The worker is up but refuses the oldest waiting client: the new one
    must not be handed over ahead of it; it waits behind."""
    w = FakeWorker("w", up=False)
    d = make(w)
    old = clients.new()
    d.dispatch(old, ROUTE, peer(port=1), 0.0, 0.0)

    w.up = True
    w.refuse = True
    new = clients.new()
    d.dispatch(new, ROUTE, peer(port=2), 1.0, 1.0)
    assert w.got == []
    assert [x[0] for x in d.waiting] == [old, new]

    w.refuse = False
    d.flush(2.0)
    assert w.socks() == [old, new]


# ---- expiry ---------------------------------------------------------------

def test_tick_closes_clients_that_waited_too_long_oldest_first(clients, caplog):
    w = FakeWorker("w", up=False)
    d = make(w, client_wait=10.0)
    socks = [clients.new() for _ in range(4)]
    for s, t in zip(socks, [0.0, 1.0, 5.0, 8.0]):
        d.dispatch(s, ROUTE, peer(), t, t)

    d.tick(10.0)                # nobody has waited *longer* than 10 s
    assert not any(closed(s) for s in socks)

    with caplog.at_level(logging.WARNING, logger="sshpump"):
        d.tick(11.5)            # 0.0 and 1.0 have; 5.0 and 8.0 have not
    assert closed(socks[0]) and closed(socks[1])
    assert not closed(socks[2]) and not closed(socks[3])
    assert [x[0] for x in d.waiting] == socks[2:]
    assert sum("no live SSH session" in r.message for r in caplog.records) == 2

    d.tick(100.0)
    assert all(closed(s) for s in socks)
    assert not d.waiting
    assert w.got == []


def test_tick_hands_over_before_expiring(clients):
    """A worker that is up takes even a client past its wait: tick retries
    the queue first and only closes what is still left."""
    w = FakeWorker("w", up=False)
    d = make(w, client_wait=10.0)
    s = clients.new()
    d.dispatch(s, ROUTE, peer(), 0.0, 0.0)
    w.up = True
    d.tick(50.0)
    assert w.socks() == [s]
    assert not closed(s)


def test_closed_client_sees_a_reset():
    """TCP clients: reset_close sets SO_LINGER 0, so the peer reads ECONNRESET."""
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen()
    c = socket.create_connection(lsock.getsockname())
    s, p = lsock.accept()
    try:
        d = make(FakeWorker("w", up=False), client_wait=1.0)
        d.dispatch(s, ROUTE, p, 0.0, 0.0)
        d.tick(2.0)
        assert closed(s)
        c.settimeout(5)
        with pytest.raises(ConnectionResetError):
            c.recv(1)
    finally:
        for x in (lsock, c, s):
            x.close()


def test_queue_max_closes_the_client_beyond_it(clients, monkeypatch):
    monkeypatch.setattr(dispatch, "QUEUE_MAX", 3)
    w = FakeWorker("w", up=False)
    d = make(w)
    socks = [clients.new() for _ in range(5)]
    for i, s in enumerate(socks):
        d.dispatch(s, ROUTE, peer(port=i), float(i), float(i))
    assert [x[0] for x in d.waiting] == socks[:3]
    assert not any(closed(s) for s in socks[:3])
    assert closed(socks[3]) and closed(socks[4])

    w.up = True
    d.flush(10.0)
    assert w.socks() == socks[:3]


def test_queue_max_counts_after_the_queue_drains(clients, monkeypatch):
    """A full queue and a worker that came up: the new client's dispatch
    hands the waiting ones over first and is not closed for a full queue."""
    monkeypatch.setattr(dispatch, "QUEUE_MAX", 2)
    w = FakeWorker("w", up=False)
    d = make(w)
    old = [clients.new() for _ in range(2)]
    for i, s in enumerate(old):
        d.dispatch(s, ROUTE, peer(port=i), float(i), float(i))
    w.up = True
    new = clients.new()
    d.dispatch(new, ROUTE, peer(port=9), 5.0, 5.0)
    assert not closed(new)
    assert w.socks() == old + [new]


def test_close_resets_every_waiting_client(clients):
    w = FakeWorker("w", up=False)
    d = make(w)
    socks = [clients.new() for _ in range(3)]
    for i, s in enumerate(socks):
        d.dispatch(s, ROUTE, peer(port=i), float(i), float(i))
    d.close()
    assert all(closed(s) for s in socks)
    assert not d.waiting
    assert w.got == []


def test_close_leaves_handed_over_clients_alone(clients):
    w = FakeWorker("w")
    d = make(w)
    s = clients.new()
    d.dispatch(s, ROUTE, peer(), 0.0, 0.0)
    d.close()
    assert not closed(s)   # the worker's now


# ---- per-client ordering --------------------------------------------------

def test_same_client_follows_its_queued_open(clients):
    a, b = FakeWorker("a", load=0), FakeWorker("b", load=0)
    d = make(a, b)
    first = clients.new()
    d.dispatch(first, ROUTE, peer("10.0.0.7", 1000), 0.0, 0.0)
    holder, other = (a, b) if a.got else (b, a)
    holder.load += 10            # now far busier than the other

    second = clients.new()
    d.dispatch(second, ROUTE, peer("10.0.0.7", 1001), 0.1, 0.1)
    assert holder.socks() == [first, second]     # behind its first connection
    assert other.got == []

    stranger = clients.new()
    d.dispatch(stranger, ROUTE, peer("10.0.0.8", 1000), 0.2, 0.2)
    assert other.socks() == [stranger]           # other clients: least loaded

    holder.resolve(2)            # both of 10.0.0.7's opens answered
    assert not holder.opens.holds("10.0.0.7")
    third = clients.new()
    d.dispatch(third, ROUTE, peer("10.0.0.7", 1002), 0.3, 0.3)
    assert other.socks() == [stranger, third]    # free to go anywhere again


def test_same_client_held_until_its_last_queued_open_resolves(clients):
    a, b = FakeWorker("a", load=0), FakeWorker("b", load=50)
    d = make(a, b)
    s1, s2 = clients.new(), clients.new()
    d.dispatch(s1, ROUTE, peer("10.0.0.7"), 0.0, 0.0)
    d.dispatch(s2, ROUTE, peer("10.0.0.7"), 0.0, 0.0)
    assert a.socks() == [s1, s2]
    a.load = 100
    a.resolve(1)                 # s1 answered, s2 still queued
    s3 = clients.new()
    d.dispatch(s3, ROUTE, peer("10.0.0.7"), 0.1, 0.1)
    assert a.socks() == [s1, s2, s3]


def test_queued_open_of_another_client_does_not_attract(clients):
    a, b = FakeWorker("a", load=0), FakeWorker("b", load=1)
    d = make(a, b)
    d.dispatch(clients.new(), ROUTE, peer("10.0.0.1"), 0.0, 0.0)   # to a
    a.load = 5
    s = clients.new()
    d.dispatch(s, ROUTE, peer("10.0.0.2"), 0.0, 0.0)
    assert b.socks() == [s]


def test_waiting_clients_of_one_address_keep_their_order(clients):
    a, b = FakeWorker("a", up=False), FakeWorker("b", up=False)
    d = make(a, b)
    socks = [clients.new() for _ in range(3)]
    for i, s in enumerate(socks):
        d.dispatch(s, ROUTE, peer("10.0.0.7", i), float(i), float(i))
    a.up = b.up = True
    d.flush(5.0)
    holder = a if a.got else b
    assert holder.socks() == socks   # all behind the first, in accept order


# ---- stall routing --------------------------------------------------------

def stalled_pair(now=100.0):
    """Two live workers: ``fast`` answers its opens in 10 ms; ``stuck`` has
    an open waiting for 5 s and is the less loaded."""
    fast, stuck = FakeWorker("fast", load=5), FakeWorker("stuck", load=0)
    fast.health.report(None, 0.010, now - 1.0)
    stuck.health.report(5.0, None, now)
    return fast, stuck


def test_stalled_worker_is_skipped_for_new_clients(clients, caplog):
    fast, stuck = stalled_pair()
    d = make(fast, stuck)
    s = clients.new()
    with caplog.at_level(logging.WARNING, logger="sshpump"):
        d.dispatch(s, ROUTE, peer(), 100.0, 100.0)
    assert fast.socks() == [s]
    assert stuck.tries == 0
    assert stuck.health.stalled
    assert any("stuck: a channel open has waited" in r.message for r in caplog.records)


def test_stalled_worker_is_taken_again_when_it_recovers(clients, caplog):
    fast, stuck = stalled_pair()
    d = make(fast, stuck)
    d.dispatch(clients.new(), ROUTE, peer("10.0.0.1"), 100.0, 100.0)
    assert stuck.health.stalled

    stuck.health.report(None, 0.020, 101.0)   # its opens answered
    s = clients.new()
    with caplog.at_level(logging.WARNING, logger="sshpump"):
        d.dispatch(s, ROUTE, peer("10.0.0.2"), 101.0, 101.0)
    assert stuck.socks() == [s]               # least loaded again
    assert not stuck.health.stalled
    assert any("stuck: channel opens answered again" in r.message for r in caplog.records)


def test_stalled_worker_still_serves_when_no_other_is_live(clients):
    fast, stuck = stalled_pair()
    fast.up = False
    d = make(fast, stuck)
    s = clients.new()
    d.dispatch(s, ROUTE, peer(), 100.0, 100.0)
    assert stuck.socks() == [s]


def test_all_stalled_all_are_tried(clients):
    a, b = FakeWorker("a", load=1), FakeWorker("b", load=0)
    a.health.report(9.0, None, 100.0)
    b.health.report(9.0, None, 100.0)
    d = make(a, b)
    s = clients.new()
    d.dispatch(s, ROUTE, peer(), 100.0, 100.0)
    assert b.socks() == [s]


def test_short_wait_is_never_a_stall(clients):
    """Below STALL_MIN a worker keeps its clients, however fast the others."""
    fast, slow = FakeWorker("fast", load=5), FakeWorker("slow", load=0)
    fast.health.report(None, 0.001, 99.0)
    slow.health.report(STALL_MIN * 0.9, None, 100.0)
    d = make(fast, slow)
    s = clients.new()
    d.dispatch(s, ROUTE, peer(), 100.0, 100.0)
    assert slow.socks() == [s]


def test_wait_within_factor_of_the_others_is_not_a_stall(clients):
    """Over STALL_MIN, but the other workers' opens are slow too (a slow
    target, not a stuck session): not routed around."""
    other, slow = FakeWorker("other", load=5), FakeWorker("slow", load=0)
    other.health.report(None, 1.0, 99.0)                       # opens take 1 s
    slow.health.report(STALL_FACTOR * 1.0 * 0.8, None, 100.0)  # 8 s < 10 x 1 s
    d = make(other, slow)
    s = clients.new()
    d.dispatch(s, ROUTE, peer(), 100.0, 100.0)
    assert slow.socks() == [s]


def test_old_latencies_do_not_count(clients):
    """The other workers' latencies from long ago are not "recent": with none
    recent, a wait over STALL_MIN is a stall."""
    other, slow = FakeWorker("other", load=5), FakeWorker("slow", load=0)
    other.health.report(None, 100.0, 0.0)          # long ago, and slow
    slow.health.report(STALL_MIN + 1.0, None, 100.0)
    d = make(other, slow)
    s = clients.new()
    d.dispatch(s, ROUTE, peer(), 100.0, 100.0)
    assert other.socks() == [s]


def test_tick_reviews_stalls_with_no_client(caplog):
    fast, stuck = stalled_pair()
    d = make(fast, stuck)
    with caplog.at_level(logging.WARNING, logger="sshpump"):
        d.tick(100.0)
    assert stuck.health.stalled
    assert sum("stuck: a channel open has waited" in r.message for r in caplog.records) == 1
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="sshpump"):
        d.tick(100.5)
    assert not caplog.records   # logged once per change, not every tick


# ---- property: order and accounting ----------------------------------------

N_WORKERS = 3

def _event():
    worker = st.integers(0, N_WORKERS - 1)
    return st.one_of(
        st.tuples(st.just("accept"), st.integers(0, 3)),             # client IP 10.0.0.N
        st.tuples(st.just("accept"), st.integers(0, 3)),             # (twice as likely)
        st.tuples(st.just("flush")),
        st.tuples(st.just("tick")),
        st.tuples(st.just("advance"), st.sampled_from([0.5, 2.0, 4.0, 11.0])),
        st.tuples(st.just("up"), worker, st.booleans()),
        st.tuples(st.just("refuse"), worker, st.booleans()),
        st.tuples(st.just("resolve"), worker, st.integers(1, 3)),
        st.tuples(st.just("done"), worker),
    )


events = st.lists(_event(), max_size=40)


@settings(max_examples=400, deadline=None, database=None)
@given(events=events, client_wait=st.sampled_from([0.0, 3.0, 10.0]))
@example(events=[("accept", 0), ("up", 0, True), ("accept", 1)], client_wait=10.0)
@example(events=[("accept", 0), ("up", 0, True), ("refuse", 0, True), ("accept", 1),
                 ("refuse", 0, False), ("flush",)], client_wait=10.0)
def test_property_order_and_no_client_lost(events, client_wait):
    """For any sequence of accepts, flushes, ticks, workers going up and down
    or refusing, and opens resolving:

    - every client is in exactly one place: handed to one worker (and open),
      waiting (and open), or closed;
    - clients are handed over in accept order (across all workers), so no
      waiting client is older than one already handed over;
    - a client is closed only once it has waited longer than client_wait;
    - after a flush or tick, if some live worker accepts clients, none waits;
    - a client goes to a worker holding a queued open of its address when
      that worker is live and accepts.
    """
    handovers = []        # every client handed over, in the order it was
    workers = [FakeWorker(f"w{i}", up=False, log=handovers) for i in range(N_WORKERS)]
    d = make(*workers, client_wait=client_wait)
    clients = Clients()
    order = {}            # sock -> accept number
    since = {}            # sock -> accept time
    seen_closed = set()
    now = 0.0
    try:
        def accepting():
            return any(w.up and not w.refuse for w in workers)

        for ev in events:
            kind = ev[0]
            if kind == "accept":
                s = clients.new()
                order[s] = len(order)
                since[s] = now
                p = (f"10.0.0.{ev[1]}", 1000 + order[s])
                key = p[0]
                live = [w for w in workers if w.up and not w.refuse]
                holders = [w for w in live if w.opens.holds(key)]
                loads = {id(w): w.load for w in live}
                was_waiting = bool(d.waiting)
                d.dispatch(s, ROUTE, p, now, now)
                if live and not was_waiting:
                    taker = next(w for w in workers if w.got and w.got[-1][0] is s)
                    if holders:   # behind its address's queued open
                        assert taker in holders
                    else:         # else the least loaded that takes clients
                        assert loads[id(taker)] == min(loads.values())
            elif kind == "flush":
                d.flush(now)
            elif kind == "tick":
                d.tick(now)
            elif kind == "advance":
                now += ev[1]
            elif kind == "up":
                workers[ev[1]].up = ev[2]
            elif kind == "refuse":
                workers[ev[1]].refuse = ev[2]
            elif kind == "resolve":
                workers[ev[1]].resolve(ev[2])
            elif kind == "done":
                w = workers[ev[1]]
                w.load = max(0, w.load - 1)

            if kind in ("flush", "tick", "accept") and accepting():
                assert not d.waiting

            # accept order: handed over in increasing accept number, and
            # every waiting client is younger than every handed-over one
            handed = [order[x] for x in handovers]
            assert handed == sorted(handed)
            waiting = [order[x[0]] for x in d.waiting]
            assert waiting == sorted(waiting)
            if handed and waiting:
                assert waiting[0] > handed[-1]

            # accounting: each client in exactly one place
            got = {s for w in workers for s in w.socks()}
            assert len(got) == len(handovers)
            in_queue = {x[0] for x in d.waiting}
            for s in order:
                places = (s in got) + (s in in_queue) + closed(s)
                assert places == 1, (order[s], s in got, s in in_queue, closed(s))
                if closed(s) and s not in seen_closed:   # closed by this event
                    assert kind == "tick" and now - since[s] > client_wait
                    seen_closed.add(s)
    finally:
        clients.close_all()
