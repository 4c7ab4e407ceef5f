"""Forwards added and removed while a tunnel runs (library API), with every
other forward serving untouched: nothing lost, checked by checksums."""
from __future__ import annotations

import socket
import threading
import time

import pytest

import sshpump
from helpers import connect, tcp_spec
from testbed.client import download_and_verify, echo_roundtrip, upload_and_verify

LOAD_LIMIT_S = 60.0


def _kw(sshd, **extra):
    return dict(port=sshd.port, identity=sshd.client_key, known_hosts=sshd.known_hosts,
                identities_only=True, use_agent=False, **extra)


def _wait_idle(t, limit=15.0):
    """Teardown check: no connection left, nothing buffered in any pump."""
    deadline = time.monotonic() + limit
    while True:
        st = t.stats()
        if st["connections"] == 0 and st["buffered"] == 0 and not t.connections():
            return st
        if time.monotonic() > deadline:
            raise AssertionError(f"tunnel not idle after {limit}s: {st}")
        time.sleep(0.05)


class SteadyLoad:
    """Checksummed downloads and uploads, one after another, through one
    forward until stopped (bounded by count and time)."""

    def __init__(self, source, sink, max_rounds=400):
        self.source, self.sink, self.max_rounds = source, sink, max_rounds
        self.rounds = 0
        self.errors = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        t0 = time.monotonic()
        while not self._stop.is_set() and self.rounds < self.max_rounds and time.monotonic() - t0 < LOAD_LIMIT_S:
            try:
                with connect(self.source, 10) as s:
                    download_and_verify(s, 1 << 20, f"steady-d{self.rounds}")
                with connect(self.sink, 10) as s:
                    upload_and_verify(s, 1 << 20, f"steady-u{self.rounds}")
            except Exception as e:  # noqa: BLE001 - reported by the test
                self.errors.append(f"round {self.rounds}: {e!r}")
                return
            self.rounds += 1

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(LOAD_LIMIT_S + 30)


@pytest.mark.parametrize("workers", [0, 2], ids=["w0", "w2"])
def test_add_and_remove_while_other_forwards_carry_load(sshd, targets, workers):
    dest = f"{sshd.user}@{sshd.host}"
    with sshpump.forward(dest, tcp_spec(targets.tcp["source"]), tcp_spec(targets.tcp["sink"]),
                         workers=workers, drain_timeout=10, **_kw(sshd)) as t:
        source_fwd, sink_fwd = t.forwards
        with SteadyLoad(source_fwd.address, sink_fwd.address) as load:
            t0 = time.monotonic()
            added = t.add(tcp_spec(targets.tcp["echo"]))
            took_ms = (time.monotonic() - t0) * 1000
            assert added.id not in (source_fwd.id, sink_fwd.id)
            assert added.spec == tcp_spec(targets.tcp["echo"]) and len(added.addresses) == 2
            with connect(added.address, 10) as s:
                echo_roundtrip(s, b"through a forward added at runtime", half_close=True)
            assert [f.id for f in t.forwards] == [source_fwd.id, sink_fwd.id, added.id]

            # A connection open across the removal finishes normally (drain);
            # the listeners are gone at once.
            held = connect(added.address, 10)
            echo_roundtrip(held, b"before the removal")
            t.remove(added)
            for addr in added.addresses:
                with pytest.raises(ConnectionRefusedError):
                    socket.create_connection(addr[:2], 5).close()
            assert [f.id for f in t.forwards] == [source_fwd.id, sink_fwd.id]
            echo_roundtrip(held, b"after the removal, within the drain timeout", half_close=True)
            held.close()

            # The same spec can come back, with a new id.
            again = t.add(tcp_spec(targets.tcp["echo"]))
            assert again.id != added.id
            with connect(again.address, 10) as s:
                echo_roundtrip(s, b"again", half_close=True)
            t.remove(again.id)
            time.sleep(0.5)
        assert not load.errors, load.errors
        assert load.rounds > 0
        _wait_idle(t)
        print(f"workers={workers}: add took {took_ms:.2f} ms; {load.rounds} steady rounds untouched")


@pytest.mark.parametrize("workers", [0, 2], ids=["w0", "w2"])
def test_a_removed_forwards_connections_are_cut_after_the_drain_timeout(sshd, targets, workers):
    dest = f"{sshd.user}@{sshd.host}"
    with sshpump.forward(dest, tcp_spec(targets.tcp["echo"]), workers=workers, drain_timeout=1,
                         **_kw(sshd)) as t:
        keep = t.forwards[0]
        doomed = t.add(tcp_spec(targets.tcp["echo"]))
        held = connect(doomed.address, 10)
        echo_roundtrip(held, b"open")
        rows = [c for c in t.connections() if c["forward"] == doomed.id]
        assert len(rows) == 1 and rows[0]["state"] == "open" and rows[0]["up_bytes"] >= 4
        t.remove(doomed)
        held.settimeout(15)
        with pytest.raises(ConnectionResetError):   # cut: a reset, not an end
            while held.recv(65536):
                pass
        held.close()
        with connect(keep.address, 10) as s:   # the other forward never noticed
            echo_roundtrip(s, b"still here", half_close=True)
        _wait_idle(t)


def test_add_refuses_bad_specs_and_busy_ports(sshd, targets):
    dest = f"{sshd.user}@{sshd.host}"
    with sshpump.forward(dest, tcp_spec(targets.tcp["echo"]), **_kw(sshd)) as t:
        with pytest.raises(sshpump.SpecError):
            t.add("99999:h:1")
        busy = t.forwards[0].address
        with pytest.raises(sshpump.ForwardError, match="in use"):
            t.add(f"{busy[1]}:{targets.tcp['echo'][0]}:{targets.tcp['sink'][1]}")
        with pytest.raises(sshpump.UsageError, match="no forward"):
            t.remove("f999999")
        assert len(t.forwards) == 1
