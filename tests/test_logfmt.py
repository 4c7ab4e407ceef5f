"""--log-format json: every stderr line of the master and its workers is one
JSON object with the documented keys, connection records carry what a log
shipper correlates on; the plain text format is unchanged. And the formatter
itself with values JSON cannot hold."""
from __future__ import annotations

import json
import logging
import re
import signal
import sys

import pytest

from testbed.client import echo_roundtrip

from helpers import connect, tcp_spec

from sshpump.logfmt import KEYS, JsonFormatter, fields

WORKERS = pytest.mark.parametrize("workers", [0, 2], ids=["w0", "w2"])
TIME = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
N = 6


def _records(err: str) -> list[dict]:
    out = []
    for line in err.splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            raise AssertionError(f"not a JSON line: {line!r}\n--- stderr:\n{err}") from None
        assert isinstance(rec, dict), line
        out.append(rec)
    return out


def _check_shape(rec: dict):
    assert set(rec) <= set(KEYS), rec
    for key in ("time", "level", "event", "message", "pid"):
        assert key in rec, (key, rec)
    assert TIME.match(rec["time"]), rec
    assert rec["level"] in ("debug", "info", "warning", "error", "critical"), rec
    assert isinstance(rec["pid"], int) and isinstance(rec["message"], str), rec
    assert re.fullmatch(r"[a-z_]+", rec["event"]), rec
    assert all(v is not None for v in rec.values()), rec


def _addr(a) -> str:
    return f"{a[0]}:{a[1]}"


def _traffic(p, echo_addr, refused_addr):
    """N echo connections held open together (so that two workers share
    them), each with its own payload size; then one to a refused target.
    Returns {client "host:port": bytes sent (= echoed)}."""
    sent = {}
    socks = []
    try:
        for i in range(N):
            s = connect(echo_addr, 10)
            socks.append(s)
            payload = f"json {i} ".encode() * (10 + 37 * i)
            echo_roundtrip(s, payload)   # its channel is open before the next client comes
            sent[_addr(s.getsockname())] = len(payload)
        for i, s in enumerate(socks):
            echo_roundtrip(s, b"bye", half_close=True)
            sent[_addr(s.getsockname())] += 3
    finally:
        for s in socks:
            s.close()
    try:
        # The reset can come before connect() has returned.
        with connect(refused_addr, 10) as s:
            s.settimeout(10)
            assert s.recv(10) == b""
    except ConnectionResetError:
        pass
    return sent


@WORKERS
def test_json_log_lines(pump, targets, workers):
    echo, refuse = targets.tcp["echo"], targets.tcp["refuse"]
    p = pump(tcp_spec(echo), tcp_spec(refuse), workers=workers, extra=("--log-format", "json"))
    ids = {e["spec"]: e["id"] for e in p.ready["listen"]}
    echo_fwd, refuse_fwd = ids[tcp_spec(echo)], ids[tcp_spec(refuse)]
    worker_pids = set(p.workers())
    assert len(worker_pids) == workers
    sent = _traffic(p, p.listen[0], p.listen[1])
    p.wait_log('"event":"conn_close"', count=N, timeout=10)
    p.wait_log('"event":"open_failed"', timeout=10)
    # A forward added and removed at runtime.
    added = p.ctl("add", spec=tcp_spec(echo))
    p.ctl("remove", forward=added["id"])
    p.wait_log('"event":"forward_removed"', timeout=10)
    assert p.stop(signal.SIGTERM) == 0
    err = p.stderr()
    recs = _records(err)
    assert recs, err
    for rec in recs:
        _check_shape(rec)
        if rec["pid"] in worker_pids:   # worker-side records name their tunnel and worker
            assert rec["tunnel"] == "default" and rec["worker"] in range(workers), rec
        else:
            assert rec["pid"] == p.pid, rec
    by = {}
    for rec in recs:
        by.setdefault(rec["event"], []).append(rec)

    opens, closes = by.get("conn_open", []), by.get("conn_close", [])
    assert len(opens) == N and len(closes) == N, err
    target = _addr(echo)
    open_of = {}
    for rec in opens:
        assert rec["level"] == "info"
        assert rec["tunnel"] == "default" and rec["forward"] == echo_fwd and rec["target"] == target, rec
        assert rec["peer"] in sent, (rec, sent)
        assert isinstance(rec["conn"], int) and isinstance(rec["worker"], int), rec
        assert isinstance(rec["duration"], float) and 0 <= rec["duration"] < 10, rec
        # the text format's message, without its "sshpump[PID]: " prefix
        assert re.match(rf"^(worker \d|sshpump): conn {rec['conn']} open {re.escape(rec['peer'])} -> "
                        rf"{re.escape(target)} \(\d+\.\d ms after accept\)$", rec["message"]), rec
        if workers:
            assert rec["pid"] in worker_pids, rec
        else:
            assert rec["pid"] == p.pid and rec["worker"] == 0, rec
        open_of[rec["conn"]] = rec
    # Connection numbers: unique in the process run, across workers.
    assert len(open_of) == N, [r["conn"] for r in opens]
    if workers == 2:
        assert {r["worker"] for r in opens} == {0, 1}, opens
        # each worker process says one worker index
        assert all(len({r["worker"] for r in opens if r["pid"] == pid}) == 1 for pid in worker_pids)
    for rec in closes:
        o = open_of.get(rec["conn"])
        assert o is not None, (rec, open_of)
        for key in ("tunnel", "forward", "worker", "peer", "target", "pid"):
            assert rec[key] == o[key], (key, rec, o)
        n = sent[rec["peer"]]
        assert rec["bytes"] == {"up": n, "down": n}, (rec, n)
        assert isinstance(rec["duration"], float) and 0 <= rec["duration"] < 30, rec
        assert rec["reason"] == "closed", rec
        assert f"up {n} bytes, down {n} bytes" in rec["message"], rec
    assert {r["peer"] for r in closes} == set(sent)

    failed = by.get("open_failed", [])
    assert len(failed) == 1, err
    f = failed[0]
    assert f["level"] == "warning" and f["reason"] == "connect failed", f
    assert f["forward"] == refuse_fwd and f["target"] == _addr(refuse) and f["tunnel"] == "default", f
    assert isinstance(f["worker"], int) and "peer" in f
    assert f["conn"] not in open_of, f    # its number is its own too

    # Process and session events.
    assert [r["address"] for r in by["listening"]][:1] == [_addr(p.listen[0])], by["listening"]
    assert {r["forward"] for r in by["listening"]} == {echo_fwd, refuse_fwd}
    assert len(by["ready"]) == 1 and by["ready"][0]["pid"] == p.pid
    assert [r.get("reason") for r in by["stopped"]] == [None]
    assert by["draining"][0]["reason"] == "SIGTERM"
    ups = by["session_up"]
    assert sorted(r["worker"] for r in ups) == list(range(max(workers, 1))), ups
    assert all(r["tunnel"] == "default" for r in ups)
    if workers:
        master_ups = by["worker_session_up"]
        assert sorted(r["worker"] for r in master_ups) == [0, 1] and all(r["pid"] == p.pid for r in master_ups)
    fa, fr = by["forward_added"], by["forward_removed"]
    assert [(r["tunnel"], r["forward"], r["target"]) for r in fa] == [("default", added["id"], target)]
    assert [(r["tunnel"], r["forward"]) for r in fr] == [("default", added["id"])]


# Today's text lines (prefix "sshpump[PID]: "); tests and people grep them.
TEXT_PATTERNS = {
    "open": r"(worker \d: |sshpump: )conn (\d+) open 127\.0\.0\.1:\d+ -> {target} \(\d+\.\d ms after accept\)",
    "close": r"(worker \d: |sshpump: )conn (\d+) closed 127\.0\.0\.1:\d+ -> {target}: "
             r"up \d+ bytes, down \d+ bytes, \d+\.\d{{3}}s, closed",
    "failed": r"(worker \d: |sshpump: )channel open to {refused} failed: connect failed \(client 127\.0\.0\.1:\d+ closed\)",
    "listening": r"listening on 127\.0\.0\.1:\d+ for -L \S+ \(forward f\d+\)",
    "ready": r"ready \(pid \d+, 1 tunnels, \d workers, control socket \S+\)",
    "stopped": r"stopped",
}


@WORKERS
def test_text_format_unchanged(pump, targets, workers):
    echo, refuse = targets.tcp["echo"], targets.tcp["refuse"]
    p = pump(tcp_spec(echo), tcp_spec(refuse), workers=workers)
    sent = _traffic(p, p.listen[0], p.listen[1])
    p.wait_log(" closed 127.0.0.1:", count=N, timeout=10)
    p.wait_log("connect failed", timeout=10)
    assert p.stop(signal.SIGTERM) == 0
    err = p.stderr()
    lines = err.splitlines()
    assert lines and not any(line.lstrip().startswith("{") for line in lines), err
    prefix = re.compile(r"^sshpump\[(\d+)\]: (.*)$")
    bodies = []
    for line in lines:
        m = prefix.match(line)
        assert m, line
        bodies.append(m.group(2))
    pats = {k: re.compile("^" + v.format(target=re.escape(_addr(echo)), refused=re.escape(_addr(refuse))) + "$")
            for k, v in TEXT_PATTERNS.items()}
    count = {k: sum(1 for b in bodies if pat.match(b)) for k, pat in pats.items()}
    assert count == {"open": N, "close": N, "failed": 1, "listening": 2, "ready": 1, "stopped": 1}, (count, err)
    conns = [int(pats["open"].match(b).group(2)) for b in bodies if pats["open"].match(b)]
    assert len(set(conns)) == N
    assert len(sent) == N


# ---- the formatter alone ------------------------------------------------------


class _Unprintable:
    def __str__(self):
        raise RuntimeError("no str")

    def __repr__(self):
        raise RuntimeError("no repr")


def _format(msg, *args, exc_info=None, **extra):
    rec = logging.LogRecord("sshpump", logging.WARNING, __file__, 1, msg, args, exc_info)
    for k, v in extra.items():
        setattr(rec, k, v)
    out = JsonFormatter().format(rec)
    assert "\n" not in out and "\r" not in out
    return json.loads(out)


def test_formatter_odd_values():
    rec = _format("odd %s", object(), event="conn_close", conn=7,
                  bytes={"up": 1, ("x", 1): {2, 3}}, peer=b"\xff\x00bytes", target=_Unprintable(),
                  duration=float("nan"), reason="multi\nline\u00e9\udcff", worker=None, forward=["a", (1, 2)])
    _check_shape(rec)
    assert rec["event"] == "conn_close" and rec["conn"] == 7 and rec["level"] == "warning"
    assert rec["message"].startswith("odd <object object at")
    assert rec["bytes"]["up"] == 1 and sorted(rec["bytes"]["('x', 1)"]) == [2, 3]
    assert rec["peer"] == str(b"\xff\x00bytes")
    assert rec["target"] == "<unprintable _Unprintable>"
    assert rec["duration"] == "nan"
    assert rec["reason"].startswith("multi\nline\u00e9")
    assert "worker" not in rec     # None: left out
    assert rec["forward"] == ["a", [1, 2]]
    assert "tunnel" not in rec and "exc" not in rec


def test_formatter_exception_and_bad_args():
    try:
        raise ValueError("boom\nsecond line")
    except ValueError:
        exc_info = sys.exc_info()
    rec = _format("failed: %d", "not a number", exc_info=exc_info)
    _check_shape(rec)
    assert rec["event"] == "log"
    assert rec["message"].startswith("failed: %d")   # the bad arguments do not lose the line
    assert rec["exc"].startswith("Traceback (most recent call last):")
    assert "ValueError: boom\nsecond line" in rec["exc"]


def test_fields_leave_out_none_and_take_owner_context():
    class Owner:
        log_context = {"tunnel": "db", "worker": 3}

    assert fields("ready") == {"event": "ready"}
    assert fields("conn_open", Owner(), conn=1, peer=None) == {"event": "conn_open", "tunnel": "db", "worker": 3,
                                                               "conn": 1}
    assert fields("x", object(), reason="r") == {"event": "x", "reason": "r"}


def test_context_filter_and_other_loggers(capsys):
    """setup_logging's JSON mode: the worker context on every record, also
    on records of loggers other than sshpump's (asyncio's); a record's own
    values win."""
    from sshpump.procsetup import setup_logging

    root, ours = logging.getLogger(), logging.getLogger("sshpump")
    saved = root.handlers[:], root.level, ours.handlers[:], ours.level, ours.propagate
    try:
        setup_logging(1, log_format="json", context={"tunnel": "t1", "worker": 2})
        ours.info("hello", extra=fields("ready"))
        ours.info("mine", extra=fields("forward_added", tunnel="other", worker=5))
        logging.getLogger("asyncio").error("loop trouble")
    finally:
        root.handlers[:], _, ours.handlers[:], _, ours.propagate = saved
        root.setLevel(saved[1])
        ours.setLevel(saved[3])
        logging.captureWarnings(False)
    recs = _records(capsys.readouterr().err)
    for rec in recs:
        _check_shape(rec)
    assert [(r["event"], r["tunnel"], r["worker"], r["level"]) for r in recs] == [
        ("ready", "t1", 2, "info"), ("forward_added", "other", 5, "info"), ("log", "t1", 2, "error")]
