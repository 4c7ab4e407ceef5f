"""The scale-out recipe (README "Beyond one machine"): two sshpump instances,
each with its own sshd, behind HAProxy running contrib/haproxy/haproxy.cfg
(TCP mode, health checks on each instance's /healthz via --metrics).

Steady client load goes through HAProxy: each client connection sends random
bytes to the echo target in a few chunks and checks that the same bytes (by
SHA-256) come back, then half-closes and expects EOF. HAProxy's tcplog lines
(client port -> server name, termination state) tell which instance served
each connection. Then:

1. both instances serve;
2. instance B's sshd stops (its sessions die, its /healthz turns 503):
   HAProxy marks B down and new clients go to A; the clients HAProxy sent to
   B before that wait there for a session (--client-wait 2) and are closed;
   then B's sshd comes back, B reconnects, HAProxy marks B up and sends it
   clients again;
3. instance B's master is SIGKILLed (its workers die with it): connects to
   B are refused and HAProxy retries them on A at once (option redispatch).

Asserted (behaviour only): no client of A sees an error, ever; every failure
was on B, and either in flight on B at the fault or (phase 2 only) sent to B
before HAProxy marked B down; every client that started after the reroute
succeeds; B serves again once back up; A ends idle. The timings (fault to
/healthz 503, to HAProxy's mark-down, to the last client routed to B) and
the losses are printed, not asserted.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import signal
import socket
import threading
import time

import pytest
from helpers import extra_sshd, start_pump, tcp_spec

from testbed._util import wait_for

HAPROXY = "/usr/sbin/haproxy"

pytestmark = pytest.mark.skipif(not os.path.exists(HAPROXY),
                                reason="haproxy not installed; run scripts/install-system-deps.sh")

CLIENTS = 6             # client threads, each one connection after another
CHUNKS = 4              # echo round trips per connection ...
CHUNK = 16 * 1024       # ... of this many bytes ...
PAUSE = 0.03            # ... with this pause between them: ~0.1-0.2 s per connection
CLIENT_TIMEOUT = 5.0    # per socket operation
MAX_CONNECTIONS = 20000 # a bound on the load, whatever the timing
STEADY = 3.0            # seconds of load in each phase
CLIENT_WAIT = 2         # --client-wait, as contrib/haproxy/haproxy.cfg advises behind a balancer


def metrics_port(pump) -> int:
    """The port --metrics 127.0.0.1:0 bound (the ready line's "metrics": [host, port])."""
    host, port = pump.ready["metrics"]
    assert host == "127.0.0.1"
    return port


def healthz(port: int) -> str:
    """The status of GET /healthz ("200", "503"), or why there is none."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
            s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            head = s.recv(64)
    except ConnectionRefusedError:
        return "refused"
    except OSError as e:
        return type(e).__name__
    parts = head.split()
    return parts[1].decode() if len(parts) > 1 else "no answer"


class Load:
    """CLIENTS threads, each doing checksummed echo connections through
    ``address`` back to back until stop(); one record per connection."""

    def __init__(self, address):
        self.address = address
        self.records: list[dict] = []
        self.lock = threading.Lock()
        self.done = threading.Event()
        self.threads = [threading.Thread(target=self._run, daemon=True, name=f"client-{i}")
                        for i in range(CLIENTS)]

    def start(self):
        for t in self.threads:
            t.start()
        return self

    def stop(self, limit: float = 20.0):
        self.done.set()
        deadline = time.monotonic() + limit
        for t in self.threads:
            t.join(max(0.0, deadline - time.monotonic()))
        assert not any(t.is_alive() for t in self.threads), f"client threads still running {limit}s after stop"

    def _run(self):
        while not self.done.is_set():
            with self.lock:
                if len(self.records) >= MAX_CONNECTIONS:
                    return
            rec = self.one()
            with self.lock:
                self.records.append(rec)

    def one(self) -> dict:
        rec = {"start": time.time(), "port": None, "ok": False, "error": None}
        s = None
        try:
            s = socket.create_connection(self.address, timeout=CLIENT_TIMEOUT)
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            rec["port"] = s.getsockname()[1]
            sent, got = hashlib.sha256(), hashlib.sha256()
            for i in range(CHUNKS):
                data = os.urandom(CHUNK)
                sent.update(data)
                s.sendall(data)
                left = CHUNK
                while left:
                    b = s.recv(left)
                    if not b:
                        raise ConnectionError(f"EOF after {CHUNK * i + CHUNK - left} of {CHUNK * CHUNKS} bytes")
                    got.update(b)
                    left -= len(b)
                if i < CHUNKS - 1:
                    time.sleep(PAUSE)
            s.shutdown(socket.SHUT_WR)
            if s.recv(1):
                raise ConnectionError("bytes after the echo")
            if sent.digest() != got.digest():
                raise ConnectionError("echo checksum differs")
            rec["ok"] = True
        except OSError as e:   # ConnectionError and timeouts included
            rec["error"] = f"{type(e).__name__}: {e}"
        finally:
            rec["end"] = time.time()
            if s is not None:
                s.close()
        return rec


class Watch:
    """Polls HAProxy's server status (admin socket `show stat`) and each
    instance's /healthz every 50 ms; keeps the transitions with their times."""

    def __init__(self, haproxy, metrics_ports: dict):
        self.haproxy = haproxy
        self.metrics_ports = metrics_ports
        self.state: dict = {}
        self.changes: list[tuple[float, str, str]] = []   # (time, key, new value)
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True, name="watch")

    def start(self):
        self._poll()
        self.thread.start()
        return self

    def stop(self):
        self.done.set()
        self.thread.join(5)

    def _set(self, key, value):
        if self.state.get(key) != value:
            self.state[key] = value
            self.changes.append((time.time(), key, value))

    def _poll(self):
        for name, status in self.haproxy.server_status().items():
            # "UP", "UP 1/2" (going down), "DOWN", "DOWN 1/2" (coming up): the first word
            self._set(f"haproxy:{name}", status.split()[0])
        for name, port in self.metrics_ports.items():
            self._set(f"healthz:{name}", healthz(port))

    def _run(self):
        while not self.done.wait(0.05):
            try:
                self._poll()
            except OSError:
                pass

    def wait(self, key, value, timeout, what=None) -> float:
        """Wait until ``key`` is ``value``; the time it became so."""
        def seen():
            return self.state.get(key) == value and next(
                t for t, k, v in reversed(self.changes) if k == key)
        return wait_for(seen, timeout, what=what or f"{key} {value}")


def match_logs(records, log_entries):
    """Give each client record the HAProxy log entry of its connection:
    same client port, the nearest accept time."""
    by_port: dict[int, list[dict]] = {}
    for e in log_entries:
        by_port.setdefault(e["client"][1], []).append(e)
    for r in records:
        r["log"] = r["server"] = None
        cands = by_port.get(r["port"], [])
        if not cands:
            continue
        best = min(cands, key=lambda e: abs(e["accept"] - r["start"]))
        cands.remove(best)
        r["log"] = best
        r["server"] = best["server"]


def test_two_instances_behind_haproxy(sshd, targets):
    from testbed.haproxy import Haproxy

    echo = targets.tcp["echo"]
    with contextlib.ExitStack() as stack:
        sshd_b = stack.enter_context(extra_sshd(sshd))
        pumps = {}
        for name, server in (("a", sshd), ("b", sshd_b)):
            p = start_pump(server, tcp_spec(echo), workers=2,
                           extra=("--metrics", "127.0.0.1:0", "--client-wait", str(CLIENT_WAIT)))
            stack.callback(p.close)
            pumps[name] = p
        a, b = pumps["a"], pumps["b"]
        mports = {n: metrics_port(p) for n, p in pumps.items()}
        assert healthz(mports["a"]) == healthz(mports["b"]) == "200"

        h = stack.enter_context(Haproxy({n: (p.address, mports[n]) for n, p in pumps.items()}))
        watch = Watch(h, mports).start()
        stack.callback(watch.stop)
        for n in pumps:
            watch.wait(f"haproxy:{n}", "UP", 10)

        load = Load(h.address).start()
        stack.callback(load.done.set)
        t0 = time.time()

        # Phase 1: both serve.
        time.sleep(STEADY)

        # Phase 2: B's sshd stops; its sessions die.
        t_sshd = time.time()
        sshd_b.stop()
        t_down2 = watch.wait("haproxy:b", "DOWN", 10, "HAProxy marking B down after its sshd stopped")
        time.sleep(STEADY)
        sshd_b.restart()
        t_back = time.time()
        t_up = watch.wait("haproxy:b", "UP", 60, "HAProxy marking B up after its sshd came back")
        time.sleep(STEADY)

        # Phase 3: B's master is SIGKILLed (PR_SET_PDEATHSIG takes its workers).
        t_kill = time.time()
        b.stop(signal.SIGKILL)
        t_gone = time.time()   # reaped: every socket of the master is closed
        t_down3 = watch.wait("haproxy:b", "DOWN", 10, "HAProxy marking B down after SIGKILL")
        time.sleep(STEADY)
        load.stop()
        t_end = time.time()

        # Every connection has ended, so HAProxy has logged each (tcplog logs at the end).
        records = load.records
        ports = {r["port"] for r in records if r["port"] is not None}
        wait_for(lambda: ports <= {e["client"][1] for e in h.connections()}, 10,
                 what="HAProxy's log line for every client connection")
        match_logs(records, h.connections())

        report = summarize(records, watch, t0, t_sshd, t_down2, t_back, t_up, t_kill, t_gone, t_down3, t_end)
        print("\n" + report)

        # ---- behaviour -----------------------------------------------------
        unlogged = [r for r in records if r.get("log") is None]
        assert not unlogged, f"client connections HAProxy did not log (never reached it?): {unlogged[:5]}"
        failed = [r for r in records if not r["ok"]]
        on_a = [r for r in records if r["server"] == "a"]
        assert all(r["ok"] for r in on_a), \
            f"clients of A saw errors: {[r for r in on_a if not r['ok']][:5]}\n{report}"
        assert all(r["server"] == "b" for r in failed), \
            f"failures not on B: {[r for r in failed if r['server'] != 'b'][:5]}\n{report}"
        phase1 = [r for r in records if r["start"] < t_sshd]
        assert {r["server"] for r in phase1} == {"a", "b"}, f"phase 1 did not use both instances\n{report}"
        assert not [r for r in failed if r["end"] < t_sshd], f"failures before any fault\n{report}"
        # Phase 2: lost = in flight on B when its sessions died, or sent to B
        # before HAProxy marked it down (they wait --client-wait for a session,
        # then B closes them).
        for r in failed:
            if r["end"] < t_kill:
                assert r["start"] < t_down2, f"a client that started after B was marked down failed: {r}\n{report}"
            else:
                # Phase 3: only what was in flight on B when its master died
                # (between the SIGKILL and the reaping, B's listener may still take one).
                assert r["start"] < t_gone, f"a client that started after B was gone failed: {r}\n{report}"
        after = [r for r in records if t_down2 <= r["start"] and r["end"] < t_kill or r["start"] >= t_gone]
        assert after and all(r["ok"] for r in after), f"clients after a reroute failed\n{report}"
        assert [r for r in records if r["start"] > t_up and r["server"] == "b" and r["ok"]], \
            f"B got no client after it was marked up again\n{report}"
        assert not [r for r in records if r["start"] > t_gone and r["server"] == "b"], \
            f"HAProxy sent clients to B after its process was gone\n{report}"
        assert a.proc.poll() is None
        a.assert_idle()


def summarize(records, watch, t0, t_sshd, t_down2, t_back, t_up, t_kill, t_gone, t_down3, t_end) -> str:
    """The figures of the run, as printed by the test (README's failover table)."""
    def ms(t, since):
        return "-" if t is None else f"{(t - since) * 1000:.0f} ms"

    logged = [r for r in records if r["log"] is not None]
    lines = [f"{len(records)} client connections in {t_end - t0:.1f} s through HAProxy: "
             f"{sum(r['ok'] for r in records)} ok, {sum(not r['ok'] for r in records)} failed; "
             f"{sum(r['server'] == 'a' for r in records)} served by A, {sum(r['server'] == 'b' for r in records)} by B"]
    for title, fault, down, until in (("B's sshd stopped (its sessions killed)", t_sshd, t_down2, t_back),
                                      ("B's master SIGKILLed (workers die with it)", t_kill, t_down3, t_end)):
        in_phase = [r for r in logged if fault <= r["end"] and r["start"] < until]
        to_b = [r["log"]["accept"] for r in in_phase if r["server"] == "b" and r["log"]["accept"] >= fault]
        failed = [r for r in in_phase if not r["ok"]]
        in_flight = [r for r in failed if r["start"] < fault]
        states = sorted({r["log"]["state"] for r in failed})
        unhealthy = next((t for t, k, v in watch.changes if k == "healthz:b" and v != "200" and t >= fault), None)
        last_failed = max((r["start"] for r in failed), default=None)
        lines += [
            f"{title}:",
            f"  B's /healthz not 200 after         {ms(unhealthy, fault)}",
            f"  HAProxy marked B DOWN after        {ms(down, fault)} (admin socket polled every 50 ms)",
            f"  clients sent to B after the fault  {len(to_b)}, the last {ms(max(to_b, default=None), fault)} after it",
            f"  last failed client started         {ms(last_failed, fault)} after the fault; every later one succeeded",
            f"  lost                               {len(failed)} of {len(in_phase)}: {len(in_flight)} in flight on B "
            f"at the fault, {len(failed) - len(in_flight)} sent to B after it"
            + (f" (HAProxy termination states {', '.join(states)})" if states else ""),
            f"  redispatched to A (connect to B refused): {sum(r['log']['redispatched'] for r in in_phase)}",
        ]
    lines.insert(-6, f"  B's master reaped                  {ms(t_gone, t_kill)} after the SIGKILL")
    lines.append(f"B back: HAProxy marked B UP {ms(t_up, t_back)} after its sshd restarted")
    return "\n".join(lines)
