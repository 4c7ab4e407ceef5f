"""PostgreSQL (psycopg, pgbench) through sshpump forwards."""
from __future__ import annotations

import subprocess
from concurrent.futures import ThreadPoolExecutor

import psycopg
import pytest

WORKERS = pytest.mark.parametrize("workers", [0, 2], ids=["w0", "w2"])


def _queries(host, port, i):
    with psycopg.connect(host=host, port=port, dbname="bench", user="bench",
                         connect_timeout=10) as conn:
        with conn.cursor() as cur:
            cur.execute("select 1")
            assert cur.fetchone() == (1,)
            cur.execute("select %s::int * 2, %s::text", (i, f"conn-{i}"))
            assert cur.fetchone() == (2 * i, f"conn-{i}")
            cur.execute("select count(*) from pgbench_branches")
            assert cur.fetchone()[0] >= 1
            cur.execute("select repeat('x', 1000000)")
            assert len(cur.fetchone()[0]) == 1_000_000
            cur.execute("select pg_backend_pid()")
            return cur.fetchone()[0]


def _many(addr, n=20):
    host, port = addr
    with ThreadPoolExecutor(n) as ex:
        pids = [f.result(timeout=60) for f in [ex.submit(_queries, host, port, i) for i in range(n)]]
    assert len(set(pids)) == n  # really n distinct server connections


@WORKERS
def test_psycopg_tcp(pump, postgres, workers):
    p = pump(f"0:{postgres.host}:{postgres.port}", workers=workers, verbose=0)
    _many(p.address)


@WORKERS
def test_psycopg_streamlocal(pump, postgres, workers):
    p = pump(f"0:{postgres.socket_path}", workers=workers, verbose=0)
    _many(p.address)


@WORKERS
def test_pgbench(pump, postgres, workers):
    p = pump(f"0:{postgres.host}:{postgres.port}", workers=workers, verbose=0)
    host, port = p.address
    r = subprocess.run(postgres.pgbench_command("-S", "-c", "8", "-j", "2", "-T", "3", "-n",
                                                host=host, port=port),
                       capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert r.returncode == 0, r.stderr + r.stdout
    assert "number of failed transactions: 0" in r.stdout or "tps" in r.stdout, r.stdout
