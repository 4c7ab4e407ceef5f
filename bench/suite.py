"""Workload definitions for the smoke, quick and full suites."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from . import workloads as W

MiB = 1 << 20


@dataclass
class Workload:
    key: str
    title: str
    unit: str
    higher_is_better: bool
    fn: Callable              # fn(run, env) -> dict
    streams: int = 1          # concurrency: contenders with a lower max_streams skip it
    needs_pg: bool = False
    single_address: bool = False   # the client takes one host:port (pgbench)
    group: str = ""
    extra: dict = field(default_factory=dict)


ECHO, SINK, SOURCE, PG = 0, 1, 2, 3


def build(mode: str) -> tuple[list[Workload], dict]:
    """(workloads, settings) for mode 'smoke' | 'quick' | 'full'."""
    if mode == "smoke":
        wl = [
            Workload("up_4m", "upload 4 MiB (1 stream)", "MB/s", True,
                     lambda r, e: W.run_bulk(r, SINK, 4 * MiB, "up"), group="bulk"),
            Workload("rr_c1", "echo 64 B round trips, 1 conn, 0.3 s", "req/s", True,
                     lambda r, e: W.run_rr(r, ECHO, 1, 0.3), group="rr"),
        ]
        return wl, {"reps": 1, "spc_sessions": 2, "pg": False}
    full = mode == "full"
    bulk = (1024 if full else 192) * MiB
    rr_t = 3.0 if full else 0.7
    churn_t = 4.0 if full else 0.7
    pg_t = 8 if full else 1
    wl = [
        Workload("up", f"bulk upload {bulk // MiB} MiB, 1 stream", "MB/s", True,
                 lambda r, e: W.run_bulk(r, SINK, bulk, "up"), group="bulk"),
        Workload("down", f"bulk download {bulk // MiB} MiB, 1 stream", "MB/s", True,
                 lambda r, e: W.run_bulk(r, SOURCE, bulk, "down"), group="bulk"),
        Workload("par16", "16 parallel uploads (aggregate)", "MB/s", True,
                 lambda r, e: W.run_parallel(r, SINK, 16, (64 if full else 16) * MiB),
                 streams=16, group="par", extra={"streams": 16}),
    ]
    if full:
        wl.append(Workload("par64", "64 parallel uploads (aggregate)", "MB/s", True,
                           lambda r, e: W.run_parallel(r, SINK, 64, 16 * MiB),
                           streams=64, group="par", extra={"streams": 64}))
    wl += [
        Workload("rr_c1", f"echo 64 B round trips, 1 conn ({rr_t:g} s)", "req/s", True,
                 lambda r, e: W.run_rr(r, ECHO, 1, rr_t), group="rr", extra={"conc": 1}),
        Workload("rr_c64", f"echo 64 B round trips, 64 conns ({rr_t:g} s)", "req/s", True,
                 lambda r, e: W.run_rr(r, ECHO, 64, rr_t), streams=64, group="rr", extra={"conc": 64}),
        Workload("churn_c16", f"connect + 1 round trip + close, 16 at a time ({churn_t:g} s)", "conn/s", True,
                 lambda r, e: W.run_churn(r, ECHO, 16, churn_t), streams=16, group="churn"),
        Workload("pgbench_c32", f"pgbench -S -c 32 -j 2 -T {pg_t}", "TPS", True,
                 lambda r, e: W.run_pgbench(r, PG, e.pg, ["-c", "32", "-j", "2"], pg_t),
                 streams=32, needs_pg=True, single_address=True, group="pg"),
        Workload("pgbench_C_c16", f"pgbench -S -C -c 16 -j 2 -T {pg_t}", "TPS", True,
                 lambda r, e: W.run_pgbench(r, PG, e.pg, ["-C", "-c", "16", "-j", "2"], pg_t),
                 streams=16, needs_pg=True, single_address=True, group="pg"),
        Workload("idle_1000", "1,000 idle connections held: RSS growth", "KiB/conn", False,
                 lambda r, e: W.run_idle(r, ECHO, 1000, 60), streams=1000, group="idle",
                 extra={"connections": 1000}),
    ]
    if full:
        wl.append(Workload("idle_10000", "10,000 idle connections held: RSS growth", "KiB/conn", False,
                           lambda r, e: W.run_idle(r, ECHO, 10000, 240), streams=10000, group="idle",
                           extra={"connections": 10000}))
    return wl, {"reps": 3 if full else 2, "spc_sessions": 16, "pg": True}
