"""--metrics: the Prometheus exposition and /healthz, scraped with curl and
read with prometheus_client's own parser while real traffic runs through a
real sshd. Every count asserted is what the test itself did."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import threading
import time

import pytest
from prometheus_client.parser import text_string_to_metric_families

from testbed._util import wait_for
from testbed.client import echo_roundtrip
from testbed.data import pattern_bytes

from helpers import alive, connect, extra_sshd, start_pump, tcp_spec

WORKERS = pytest.mark.parametrize("workers", [0, 2], ids=["w0", "w2"])
METRICS = ["--metrics", "127.0.0.1:0", "-o", "ServerAliveInterval=1"]


def fetch(p, path="/metrics"):
    """(HTTP status, body) from the pump's metrics server, by curl."""
    host, port = p.ready["metrics"]
    r = subprocess.run(["curl", "-sS", "--max-time", "10", "-o", "-", "-w", "\n%{http_code}",
                        f"http://{host}:{port}{path}"], capture_output=True, text=True, timeout=20)
    assert r.returncode == 0, r.stderr
    body, _, code = r.stdout.rpartition("\n")
    return int(code), body


def scrape(p) -> dict:
    """{(sample name, ((label, value), ...)): value} of one scrape."""
    code, body = fetch(p)
    assert code == 200, body
    out = {}
    for fam in text_string_to_metric_families(body):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def val(m, name, **labels):
    return m.get((name, tuple(sorted(labels.items()))), 0.0)


def forward_ids(p):
    """Forward ids in -L order (the ready line has one entry per address)."""
    ids = []
    for e in p.ready["listen"]:
        if e["id"] not in ids:
            ids.append(e["id"])
    return ids


def counters(m) -> dict:
    """The monotonic samples: counters, histogram buckets/counts/sums
    (process_* left out: a respawned worker's process starts from zero)."""
    return {k: v for k, v in m.items() if not k[0].startswith("process_")
            and (k[0].endswith(("_total", "_bucket", "_count", "_sum")))}


def assert_not_down(before, after):
    for k, v in before.items():
        assert after.get(k, 0.0) >= v, f"{k} went down: {v} -> {after.get(k)}"


def refused(addr):
    """A client of a forward whose opens fail is closed or reset; under load
    the reset can come before connect() has returned."""
    try:
        s = connect(addr, 10)
    except ConnectionResetError:
        return
    with s:
        s.settimeout(10)
        try:
            assert s.recv(10) == b""
        except ConnectionResetError:
            pass


@WORKERS
def test_counts_equal_what_was_done(pump, targets, workers):
    p = pump(tcp_spec(targets.tcp["echo"]), tcp_spec(targets.tcp["refuse"]), workers=workers, verbose=0,
             extra=METRICS)
    echo, bad = forward_ids(p)
    assert p.ready["metrics"][0] == "127.0.0.1" and p.ready["metrics"][1] > 0
    n, m_refused = 24, 3
    sizes = [1000 * i + 7 for i in range(n)]
    done = threading.Event()
    errors = []

    def traffic():
        try:
            for i, size in enumerate(sizes):
                with connect(p.listen[0], 10) as s:
                    echo_roundtrip(s, pattern_bytes(f"m{i}", size), half_close=True)
            for _ in range(m_refused):
                refused(p.listen[1])
        except BaseException as e:  # noqa: BLE001 - re-raised below
            errors.append(e)
        finally:
            done.set()

    t = threading.Thread(target=traffic, daemon=True)
    t.start()
    # Scrape while the traffic runs: every scrape parses, and no counter goes down.
    last, scrapes = {}, 0
    deadline = time.monotonic() + 60
    while not done.is_set() and time.monotonic() < deadline:
        now = counters(scrape(p))
        assert_not_down(last, now)
        last, scrapes = now, scrapes + 1
    t.join(60)
    assert not t.is_alive() and not errors, errors
    assert scrapes >= 1

    def settled():
        m = scrape(p)
        return m if val(m, "sshpump_connections_closed_total", tunnel="default", forward=echo, reason="closed") >= n \
            and val(m, "sshpump_channel_open_failures_total", tunnel="default", forward=bad,
                    reason="connect_failed") >= m_refused else None
    m = wait_for(settled, 15, interval=0.1, what="the workers' reports")
    assert_not_down(last, counters(m))
    fwd = {"tunnel": "default", "forward": echo}
    assert val(m, "sshpump_connections_opened_total", **fwd) == n
    assert val(m, "sshpump_connections_closed_total", **fwd, reason="closed") == n
    assert sum(v for (name, lab), v in m.items() if name == "sshpump_connections_closed_total"
               and dict(lab)["forward"] == echo) == n
    assert val(m, "sshpump_connections_active", **fwd) == 0
    assert val(m, "sshpump_bytes_total", **fwd, direction="up") == sum(sizes)
    assert val(m, "sshpump_bytes_total", **fwd, direction="down") == sum(sizes)
    assert val(m, "sshpump_channel_open_seconds_count", **fwd) == n
    assert val(m, "sshpump_channel_open_seconds_bucket", **fwd, le="+Inf") == n
    assert val(m, "sshpump_channel_open_seconds_sum", **fwd) > 0
    failed = {"tunnel": "default", "forward": bad}
    assert val(m, "sshpump_channel_open_failures_total", **failed, reason="connect_failed") == m_refused
    assert val(m, "sshpump_channel_open_failures_total", **failed, reason="prohibited") == 0
    assert val(m, "sshpump_channel_open_failures_total", **fwd, reason="connect_failed") == 0
    assert val(m, "sshpump_connections_opened_total", **failed) == 0
    assert val(m, "sshpump_clients_waiting", tunnel="default") == 0
    slots = [str(i) for i in range(max(workers, 1))]
    for w in slots:
        assert val(m, "sshpump_worker_session_up", tunnel="default", worker=w) == 1
        assert val(m, "sshpump_worker_reconnects_total", tunnel="default", worker=w) == 0
        assert ("sshpump_worker_buffered_bytes", (("tunnel", "default"), ("worker", w))) in m
    # process_* for the master and, with worker processes, for each of them
    assert val(m, "process_resident_memory_bytes", worker="master") > 0
    for w in (slots if workers else []):
        assert val(m, "process_resident_memory_bytes", tunnel="default", worker=w) > 0
        assert val(m, "process_open_fds", tunnel="default", worker=w) > 0
    # ServerAliveInterval=1: an idle session sends keepalives, and their round trip is measured
    wait_for(lambda: all(("sshpump_worker_keepalive_rtt_seconds", (("tunnel", "default"), ("worker", w)))
                         in scrape(p) for w in slots), 15, interval=0.2, what="a keepalive round trip per worker")


def test_counters_survive_a_worker_kill(pump, targets):
    p = pump(tcp_spec(targets.tcp["echo"]), workers=2, verbose=0, extra=METRICS)
    p.check_idle = False   # a worker is killed: its fds and connections go with it
    (echo,) = forward_ids(p)
    fwd = {"tunnel": "default", "forward": echo}
    for i in range(6):
        with connect(p.address, 10) as s:
            echo_roundtrip(s, pattern_bytes(f"k{i}", 5000), half_close=True)
    held = []
    for i in range(4):   # open across the kill; one at a time, so they spread over both workers
        held.append(connect(p.address, 10))
        echo_roundtrip(held[-1], f"held {i}".encode())
    try:
        before = wait_for(lambda: (lambda m: m if val(m, "sshpump_connections_active", **fwd) == 4 else None)(
            scrape(p)), 15, interval=0.1, what="4 connections active")
        assert val(before, "sshpump_connections_opened_total", **fwd) == 10
        # the victim: a worker that carries some of them (their number is what it takes along)
        carried = {}
        for row in p.connections():
            carried[row["worker"]] = carried.get(row["worker"], 0) + 1
        index, lost = max(carried.items(), key=lambda kv: kv[1])
        victim = next(w["pid"] for w in p.stats()["tunnels"]["default"]["workers"] if w["index"] == index)
        os.kill(victim, signal.SIGKILL)
        wait_for(lambda: not alive(victim), 10, what="the worker to die")
        # Traffic and scrapes while the worker is replaced: nothing goes down.
        # A client handed to the dead worker before the master saw it die is
        # reset (not counted: it never opened); the test counts the echoes done.
        last = counters(before)
        deadline = time.monotonic() + 30
        extra = attempts = cut = 0
        while time.monotonic() < deadline and attempts < 200:
            attempts += 1
            try:
                with connect(p.address, 10) as s:
                    echo_roundtrip(s, pattern_bytes(f"after{extra}", 3000), half_close=True)
                extra += 1
            except (ConnectionResetError, BrokenPipeError, AssertionError):   # reset, or closed unanswered
                cut += 1
            m = scrape(p)
            assert_not_down(last, counters(m))
            last = counters(m)
            respawned = len(p.workers()) == 2 and victim not in p.workers() and all(
                val(m, "sshpump_worker_session_up", tunnel="default", worker=w) == 1 for w in ("0", "1"))
            if respawned and extra >= 5:
                break
        assert respawned, "the killed worker was not replaced"
        assert cut <= 2, f"{cut} clients cut after the kill"   # only those in flight to the dead worker
    finally:
        for s in held:
            s.close()

    def settled():
        m = scrape(p)
        return m if val(m, "sshpump_connections_active", **fwd) == 0 else None
    m = wait_for(settled, 15, interval=0.1, what="no connection active")
    assert_not_down(last, counters(m))
    closed = {dict(lab)["reason"]: v for (name, lab), v in m.items() if name == "sshpump_connections_closed_total"}
    opened = val(m, "sshpump_connections_opened_total", **fwd)
    assert opened == 10 + extra
    assert sum(closed.values()) == opened          # every opened connection is accounted for once
    assert closed["worker_lost"] == lost           # those the killed worker carried
    assert closed["closed"] >= 6 + extra           # every echo that finished (and held ones closed since)
    assert val(m, "sshpump_bytes_total", **fwd, direction="up") >= 6 * 5000 + extra * 3000
    # the killed worker's slot counts its replacement's session as a reconnect
    assert sum(val(m, "sshpump_worker_reconnects_total", tunnel="default", worker=w) for w in ("0", "1")) == 1
    assert {dict(lab).get("worker") for (name, lab) in m if name == "process_start_time_seconds"} == \
        {"master", "0", "1"}


def test_healthz_and_prohibited(sshd, targets):
    echo = targets.tcp["echo"]
    with extra_sshd(sshd, permit_open=f"{echo[0]}:{echo[1]}") as server:
        p = start_pump(server, tcp_spec(echo), "0:127.0.0.1:1", workers=1, verbose=0,
                       extra=["--metrics", "127.0.0.1:0", "--client-wait", "2"])
        with p:
            ok, bad = forward_ids(p)
            code, body = fetch(p, "/healthz")
            assert code == 200 and body.startswith("ok"), body
            assert fetch(p, "/nope")[0] == 404
            refused(p.listen[1])   # the server's PermitOpen forbids it
            with connect(p.listen[0], 10) as s:
                echo_roundtrip(s, b"permitted", half_close=True)
            m = wait_for(lambda: (lambda m: m if val(m, "sshpump_channel_open_failures_total", tunnel="default",
                                                     forward=bad, reason="prohibited") else None)(scrape(p)),
                         10, interval=0.1, what="the prohibited open reported")
            assert val(m, "sshpump_channel_open_failures_total", tunnel="default", forward=bad,
                       reason="prohibited") == 1
            assert val(m, "sshpump_channel_open_failures_total", tunnel="default", forward=bad,
                       reason="connect_failed") == 0
            assert val(m, "sshpump_connections_opened_total", tunnel="default", forward=ok) == 1
            # The server goes away (listener and sessions): no session is up, /healthz says so.
            server.stop()
            wait_for(lambda: fetch(p, "/healthz")[0] == 503, 15, interval=0.1, what="/healthz 503")
            m = scrape(p)
            assert val(m, "sshpump_worker_session_up", tunnel="default", worker="0") == 0
            assert p.proc.poll() is None


def test_metrics_address_taken(sshd, targets, tmp_path):
    """A --metrics address in use stops sshpump with exit 6 and one line,
    after closing what had started (no unix socket file stays behind)."""
    from helpers import base_args, run_cli
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    with taken:
        path = str(tmp_path / "fwd.sock")
        args, dest = base_args(sshd)
        code, err = run_cli(["--workers", "1", "--metrics", f"127.0.0.1:{port}", *args,
                             "-L", f"{path}:{targets.tcp['echo'][0]}:{targets.tcp['echo'][1]}", dest])
    assert code == 6, err
    assert f"--metrics 127.0.0.1:{port}" in err and "in use" in err, err
    assert not os.path.exists(path)
