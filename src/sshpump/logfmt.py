"""``--log-format json``: one JSON object per line, for log shippers.

Every line has ``time`` (RFC 3339, UTC, milliseconds), ``level``, ``event``,
``message`` (the text the plain format prints) and ``pid``; and, when the
record knows them: ``tunnel``, ``forward``, ``worker``, ``conn``, ``peer``,
``target``, ``address``, ``bytes`` ({"up": n, "down": n}), ``duration``
(seconds), ``reason``, ``exc`` (a traceback, as one string). A key without a
value is left out; there are no others (KEYS).

Log calls give their fields with ``extra=fields("conn_close", conn=..., ...)``;
the plain text format ignores them, so its lines stay as they were. A worker
process names its tunnel and index once (``Context``, installed by
procsetup.setup_logging); a Worker in the master's process (``--workers 0``)
carries them as ``log_context`` (see ``fields(owner=...)``).

The formatter never raises: a value JSON cannot hold is written as its
str(), and a record that cannot be formatted at all still gives one line.
"""

from __future__ import annotations

import json
import logging
import math
import time

# The keys a line may have, in the order they are written. Stable: a key is
# never renamed or given another type; new ones may be added at the end.
KEYS = ("time", "level", "event", "message", "pid", "tunnel", "forward", "worker", "conn", "peer", "target",
        "address", "bytes", "duration", "reason", "exc")

# The keys a log call may set through ``extra=`` (record attributes).
FIELDS = ("event", "tunnel", "forward", "worker", "conn", "peer", "target", "address", "bytes", "duration",
          "reason")

DEFAULT_EVENT = "log"

# The events sshpump logs, and where (the README lists them). Records without
# one have event "log".
EVENTS = {
    "conn_open": "a client's channel is open (-v)",
    "conn_close": "a connection ended; bytes, duration and the end reason (-v; always when an error ended it)",
    "open_failed": "the server refused a channel open (reason: connect failed, administratively prohibited, ...)",
    "client_dropped": "a client was closed before its channel opened (no session in time, or the pump refused it)",
    "session_up": "a worker's SSH session is up (logged by the worker)",
    "session_lost": "a worker's SSH session died (reason)",
    "reconnect_failed": "a reconnect attempt failed (reason)",
    "worker_session_up": "the master heard that a worker's session is up",
    "worker_session_down": "the master heard that a worker's session went down (reason)",
    "worker_draining": "a worker got a signal of its own and drains",
    "worker_exit": "a worker process exited (reason: drained, killed by SIGKILL, exit code N); it is replaced",
    "worker_killed": "a worker did not stop in time and was killed",
    "forward_added": "a forward listens (at start or at runtime)",
    "forward_removed": "a forward stopped listening; its connections drain",
    "forward_failed": "a forward could not be set up and was skipped",
    "accept_paused": "out of file descriptors: accepts paused",
    "tunnel_failed": "a tunnel could not start (reason)",
    "tunnel_retry": "a tunnel's workers could not log in; retried later (reason)",
    "listening": "an address the CLI listens on",
    "ready": "every tunnel is up and listening",
    "draining": "a stop signal: draining (reason: the signal)",
    "stopped": "the process ends",
    "reload": "a --config reload was applied",
    "reload_failed": "a reload was rejected or part of it failed (reason)",
    "reload_skipped": "SIGHUP with nothing to reload, or while a reload runs",
}


def fields(event: str, owner=None, **values) -> dict:
    """``extra=`` for a log call: the event and the values that are known
    (None is left out). ``owner``: an object whose ``log_context`` (a dict
    with tunnel and worker, when it has one) is added."""
    out = {"event": event}
    ctx = getattr(owner, "log_context", None) if owner is not None else None
    if ctx:
        out.update(ctx)
    out.update((k, v) for k, v in values.items() if v is not None)
    return out


class Context(logging.Filter):
    """Adds what this process knows (a worker's tunnel and index) to every
    record that does not say otherwise. Installed on the handler, so that
    records of other loggers get it too."""

    def __init__(self, **values):
        super().__init__()
        self.values = {k: v for k, v in values.items() if v is not None}

    def filter(self, record):
        for k, v in self.values.items():
            if getattr(record, k, None) is None:
                setattr(record, k, v)
        return True


def _text(value) -> str:
    try:
        return str(value)
    except Exception:  # noqa: BLE001 - the formatter must not raise
        try:
            return repr(value)
        except Exception:  # noqa: BLE001
            return f"<unprintable {type(value).__name__}>"


def _clean(value, depth=0):
    """A value json.dumps writes as it is (strict JSON: no NaN)."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else _text(value)
    if depth < 6:
        if isinstance(value, dict):
            return {_text(k): _clean(v, depth + 1) for k, v in value.items()}
        if isinstance(value, (list, tuple, set, frozenset)):
            return [_clean(v, depth + 1) for v in value]
    return _text(value)


def rfc3339(created: float) -> str:
    t = time.gmtime(created)
    ms = int((created - int(created)) * 1000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", t) + f".{min(ms, 999):03d}Z"


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        try:
            return json.dumps(self._object(record), ensure_ascii=True, allow_nan=False, separators=(",", ":"))
        except Exception as e:  # noqa: BLE001 - the formatter must not raise
            fallback = {"time": rfc3339(time.time()), "level": "error", "event": "log_error",
                        "message": _text(getattr(record, "msg", "")), "pid": getattr(record, "process", None),
                        "reason": f"cannot format a log record: {type(e).__name__}"}
            return json.dumps(_clean(fallback), ensure_ascii=True)

    def _object(self, record: logging.LogRecord) -> dict:
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - bad arguments: show what there is
            message = f"{_text(record.msg)} {_text(record.args)}"
        out = {
            "time": rfc3339(record.created),
            "level": record.levelname.lower(),
            "event": _text(getattr(record, "event", None) or DEFAULT_EVENT),
            "message": _text(message),
            "pid": record.process,
        }
        for key in FIELDS[1:]:
            value = getattr(record, key, None)
            if value is not None:
                out[key] = _clean(value)
        exc = []
        if record.exc_info:
            try:
                exc.append(self.formatException(record.exc_info))
            except Exception:  # noqa: BLE001
                exc.append(_text(record.exc_info[1]))
        elif record.exc_text:
            exc.append(_text(record.exc_text))
        if record.stack_info:
            exc.append(_text(record.stack_info))
        if exc:
            out["exc"] = "\n".join(exc)
        return out
