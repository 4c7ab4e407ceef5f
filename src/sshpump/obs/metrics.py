"""The Prometheus view of a Runtime: families built at scrape time from the
master's totals (counters.TunnelCounters, fed by worker reports) and from
live state the master holds anyway (dispatcher queue, workers' session state).

One custom collector rather than prometheus_client Counter/Gauge objects:
the totals are already kept (and must be, to stay monotonic across worker
deaths), so a scrape only reads them, and nothing is updated twice on the
hot path. prometheus_client (slow to import) is imported only when the
registry is first asked for (``--metrics`` or a library user)."""

from __future__ import annotations

import os

from .counters import TunnelCounters
from .tally import BUCKETS, END_LABELS, OPEN_FAILURES, WORKER_LOST

P = "sshpump_"
FWD = ["tunnel", "forward"]
WRK = ["tunnel", "worker"]
CLOSE_REASONS = sorted(set(END_LABELS.values())) + [WORKER_LOST]


class Metrics:
    def __init__(self, runtime):
        self.runtime = runtime
        self._counters: dict[str, TunnelCounters] = {}
        self._registry = None

    def tunnel(self, name: str) -> TunnelCounters:
        """The totals of tunnel ``name``, kept across its restarts."""
        c = self._counters.get(name)
        if c is None:
            c = self._counters[name] = TunnelCounters(name)
        return c

    @property
    def registry(self):
        if self._registry is None:
            from prometheus_client import CollectorRegistry

            self._registry = CollectorRegistry(auto_describe=False)
            self._registry.register(_Collector(self))
            self._registry.register(_Processes(self.runtime))
        return self._registry

    def exposition(self) -> tuple[bytes, str]:
        """(body, content type) for GET /metrics."""
        from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST

    def sessions_up(self) -> tuple[int, int]:
        """(sessions up, workers) over every tunnel: what /healthz reports."""
        ws = [w for t in self.runtime.tunnels.values() for w in t.pool.workers]
        return sum(1 for w in ws if w.up), len(ws)


class _Collector:
    def __init__(self, metrics: Metrics):
        self.m = metrics

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

        opened = CounterMetricFamily(P + "connections_opened", "Connections whose channel opened (carried by a worker)",
                                     labels=FWD)
        closed = CounterMetricFamily(P + "connections_closed", "Carried connections that ended, by end reason "
                                     "(worker_lost: its worker died)", labels=FWD + ["reason"])
        failed = CounterMetricFamily(P + "channel_open_failures", "Channel opens the server refused, by reason",
                                     labels=FWD + ["reason"])
        active = GaugeMetricFamily(P + "connections_active", "Connections carried now (opened - closed)", labels=FWD)
        nbytes = CounterMetricFamily(P + "bytes", "Bytes carried by ended connections; up: client to target",
                                     labels=FWD + ["direction"])
        hist = HistogramMetricFamily(P + "channel_open_seconds", "Time from accept to channel open", labels=FWD)
        for tname, c in self.m._counters.items():
            for fid, f in c.forwards.items():
                lab = [tname, fid]
                opened.add_metric(lab, f.opened)
                for reason in CLOSE_REASONS:   # every reason, 0 too: an alert's rate() needs the series
                    closed.add_metric(lab + [reason], f.closed.get(reason, 0))
                for reason in OPEN_FAILURES:
                    failed.add_metric(lab + [reason], f.failed.get(reason, 0))
                active.add_metric(lab, f.active)
                nbytes.add_metric(lab + ["up"], f.up)
                nbytes.add_metric(lab + ["down"], f.down)
                cum, buckets = 0, []
                for bound, n in zip((*map(_le, BUCKETS), "+Inf"), f.buckets):
                    cum += n
                    buckets.append((bound, cum))
                hist.add_metric(lab, buckets, f.latency_sum)
        yield from (opened, closed, failed, active, nbytes, hist)

        waiting = GaugeMetricFamily(P + "clients_waiting", "Clients not yet given a channel: waiting for a "
                                    "live session in the master, or queued for an open in a worker", labels=["tunnel"])
        up = GaugeMetricFamily(P + "worker_session_up", "1 while the worker's SSH session is up (and it takes clients)",
                               labels=WRK)
        reconn = CounterMetricFamily(P + "worker_reconnects", "SSH sessions brought up again after the worker slot's "
                                     "first (reconnects and respawned workers)", labels=WRK)
        rtt = GaugeMetricFamily(P + "worker_keepalive_rtt_seconds", "Last keepalive round trip: from sending it to the "
                                "next bytes from the server", labels=WRK)
        buf = GaugeMetricFamily(P + "worker_buffered_bytes", "Bytes buffered in the worker's pump", labels=WRK)
        for tname, t in self.m.runtime.tunnels.items():
            workers = t.pool.workers
            waiting.add_metric([tname], len(t.dispatcher.waiting) + sum(w.queued for w in workers))
            for w in workers:
                lab = [tname, str(w.index)]
                up.add_metric(lab, 1 if w.up else 0)
                reconn.add_metric(lab, t.counters.reconnects(w.index))
                if w.rtt is not None:
                    rtt.add_metric(lab, w.rtt)
                buf.add_metric(lab, w.buffered)
        yield from (waiting, up, reconn, rtt, buf)


def _le(bound: float) -> str:
    return repr(float(bound))


class _Processes:
    """process_* for the master (worker="master") and every worker process
    (tunnel, worker index): prometheus_client's ProcessCollector per pid,
    its samples relabelled into one family per name. Workers are looked up
    at each scrape, so a respawned worker's new pid replaces the old one."""

    def __init__(self, runtime):
        self.runtime = runtime
        self._by_pid: dict[int, object] = {}

    def _collector(self, pid):
        from prometheus_client import ProcessCollector

        c = self._by_pid.get(pid)
        if c is None:
            c = self._by_pid[pid] = ProcessCollector(pid=lambda: pid, registry=None)
        return c

    def collect(self):
        from prometheus_client.metrics_core import Metric

        me = os.getpid()
        procs = [({"worker": "master"}, me)]
        for tname, t in self.runtime.tunnels.items():
            procs += [({"tunnel": tname, "worker": str(w.index)}, w.pid)
                      for w in t.pool.workers if w.pid and w.pid != me]
        for gone in set(self._by_pid) - {pid for _, pid in procs}:
            del self._by_pid[gone]
        merged: dict[str, Metric] = {}
        for labels, pid in procs:
            for fam in self._collector(pid).collect():
                out = merged.get(fam.name)
                if out is None:
                    out = merged[fam.name] = Metric(fam.name, fam.documentation, fam.type)
                for s in fam.samples:
                    out.add_sample(s.name, {**s.labels, **labels}, s.value)
        yield from merged.values()
