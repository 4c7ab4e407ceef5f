"""The only importer of the compiled pump, and the pointer bridge.

ssh2-python has no public accessor for the ``LIBSSH2_SESSION*`` and
``LIBSSH2_CHANNEL*`` it wraps. Its ``session.pxd`` and ``channel.pxd`` declare
them as the first C field of the ``cdef class``, right after the object
header, so we read them at that offset. The offset is verified, not trusted:
once per process for sessions (a timeout set through ssh2-python must read
back through the pointer) and once for channels (the write window ssh2-python
reports must equal what the pointer gives). A mismatch raises BridgeError.
"""

from __future__ import annotations

import ssh2.session  # noqa: F401  (loads the bundled libssh2 + libcrypto first)
import ssh2.channel

from ._pump import ffi, lib
from .errors import BridgeError

_FIELD_OFFSET = object.__basicsize__  # first cdef field follows PyObject_HEAD
_SSH2_VERSION = getattr(ssh2, "__version__", "unknown")
_channel_checked = False

END_NORMAL = lib.PUMP_END_NORMAL
END_ABORTED = lib.PUMP_END_ABORTED
EV_DONE = lib.PUMP_EV_DONE
EV_SESSION_DEAD = lib.PUMP_EV_SESSION_DEAD
EV_OPENED = lib.PUMP_EV_OPENED
EV_LANE_LOST = lib.PUMP_EV_LANE_LOST
END_OPEN_FAILED = lib.PUMP_END_OPEN_FAILED

END_REASONS = {
    lib.PUMP_END_NORMAL: "closed",
    lib.PUMP_END_CLIENT_ERROR: "client error",
    lib.PUMP_END_CHANNEL_CLOSED: "channel closed by server with data pending",
    lib.PUMP_END_CHANNEL_ERROR: "channel error",
    lib.PUMP_END_ABORTED: "aborted",
    lib.PUMP_END_STATE: "pump bug: impossible state change refused",
    lib.PUMP_END_OPEN_FAILED: "open failed",
    lib.PUMP_END_RESET: "reset by the target side",
    lib.PUMP_END_LANE_LOST: "mux agent gone",
}

STATE_NAMES = {
    lib.PUMP_STATE_OPEN: "open",
    lib.PUMP_STATE_DRAIN: "drain",
    lib.PUMP_STATE_DONE: "done",
    lib.PUMP_STATE_CLOSING: "closing",
}


def _raw_pointer(obj, cls):
    if type(obj) is not cls:
        raise BridgeError(f"expected {cls.__module__}.{cls.__name__}, got {type(obj).__name__}")
    return ffi.cast("void **", id(obj) + _FIELD_OFFSET)[0]


def _mismatch(what, expected, got):
    return BridgeError(
        f"ssh2-python {_SSH2_VERSION} does not match sshpump's pointer bridge: "
        f"{what} expected {expected}, read {got}; sshpump needs ssh2-python 1.2.0.post1"
    )


def session_pointer(session):
    """The LIBSSH2_SESSION* of an ssh2.session.Session, verified."""
    ptr = _raw_pointer(session, ssh2.session.Session)
    if ptr == ffi.NULL:
        raise _mismatch("session pointer", "non-NULL", "NULL")
    old = session.get_timeout()
    probe = 271828
    session.set_timeout(probe)
    try:
        got = lib.pump_session_timeout(ptr)
    finally:
        session.set_timeout(old)
    if got != probe:
        raise _mismatch("session timeout", probe, got)
    return ptr


def channel_pointer(channel):
    """The LIBSSH2_CHANNEL* of an ssh2.channel.Channel (checked once per process)."""
    global _channel_checked
    ptr = _raw_pointer(channel, ssh2.channel.Channel)
    if not _channel_checked:
        expected = channel.window_write()
        got = lib.pump_channel_window_write(ptr)
        if ptr == ffi.NULL or got != expected:
            raise _mismatch("channel write window", expected, got)
        _channel_checked = True
    return ptr


class Pump:
    """One C pump for one SSH session. Not thread-safe: one loop owns it."""

    def __init__(self, session, ssh_fd: int, bufsize: int = 65536, window: int = 0):
        self._session = session  # the pump uses its pointer: keep it alive
        self._p = lib.pump_new(session_pointer(session), ssh_fd, bufsize, window)
        if self._p == ffi.NULL:
            raise MemoryError("pump_new failed")
        self._events = ffi.new("struct pump_event[256]")
        self._stats = ffi.new("struct pump_stats *")
        self._conn_stats = ffi.new("struct pump_conn_stats *")

    @property
    def fileno(self) -> int:
        return lib.pump_epoll_fd(self._p)

    def add(self, fd: int, channel) -> int:
        """Give fd (owned by the pump from now) and channel to the pump."""
        cid = lib.pump_add(self._p, fd, channel_pointer(channel))
        if cid < 0:
            raise OSError(-cid, f"pump_add: {fd}")
        return cid

    def run(self):
        """Move what can move; return [(kind, conn, reason, err, up, down)].
        For a --mux open that failed (reason END_OPEN_FAILED), err is the
        pair (SSH reason code, errno)."""
        out = []
        ev = self._events
        while True:
            n = lib.pump_run(self._p, ev, 256)
            for i in range(n):
                e = ev[i]
                err = (e.code, e.err) if e.reason == END_OPEN_FAILED and e.kind == EV_DONE else e.err
                out.append((e.kind, e.conn, e.reason, err, e.up, e.down))
            if n < 256:
                return out

    def mux_start(self, channel):
        """--mux: the agent's channel, its hello checked (kept alive by the caller)."""
        r = lib.pump_mux_start(self._p, channel_pointer(channel))
        if r < 0:
            raise OSError(-r, "pump_mux_start")

    def mux_open(self, fd: int, target: bytes) -> int:
        """--mux: fd (owned by the pump from now) as a new stream to target."""
        cid = lib.pump_mux_open(self._p, fd, target, len(target))
        if cid < 0:
            raise OSError(-cid, f"pump_mux_open: {fd}")
        return cid

    def abort(self, conn: int = -1, session_dead: bool = False):
        lib.pump_abort(self._p, conn, 1 if session_dead else 0)

    def can_send_small(self) -> bool:
        return bool(lib.pump_can_send_small(self._p))

    def want_out(self):
        lib.pump_want_out(self._p)

    def set_control(self, channel):
        """The session's idle control channel (kept alive by the caller)."""
        lib.pump_set_control(self._p, channel_pointer(channel))

    def want_in(self, on: bool):
        lib.pump_want_in(self._p, 1 if on else 0)

    def stats(self) -> dict:
        s = self._stats
        lib.pump_get_stats(self._p, s)
        return {
            "conns": s.conns,
            "buffered": s.buffered,
            "buffers": s.buffers,
            "rx_bytes": s.rx_bytes,
            "last_rx": s.last_rx,
            "out_blocked": s.out_blocked,
        }

    def conn_stats(self, cid: int) -> dict | None:
        """One live connection now, or None if cid is not live (never added,
        or already reported done: a later add() may reuse the id).
        Directions go "open" -> "drain" -> "done"; both say "closing" once
        the connection is closing its channel."""
        s = self._conn_stats
        if lib.pump_conn_stats(self._p, cid, s) < 0:
            return None
        return {
            "up_bytes": s.up,
            "down_bytes": s.down,
            "buffered_up": s.buffered_up,
            "buffered_down": s.buffered_down,
            "up_state": STATE_NAMES[s.up_state],
            "down_state": STATE_NAMES[s.down_state],
        }

    def close(self):
        if self._p != ffi.NULL:
            lib.pump_free(self._p)
            self._p = ffi.NULL
