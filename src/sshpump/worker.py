"""One SSH session, its C pump, and the client connections it carries.

Python runs here once per connection event (open, finish) and per session
event (connect, keepalive, failure); bytes never cross into Python. The pump's
epoll fd is watched by the event loop; when it is readable the pump runs once
and hands back the few events Python must act on.

Channel opens (libssh2 allows one in flight per session) are opens.py's
job; this module keeps the session, its keepalives, timers and shutdown.
"""

from __future__ import annotations

import asyncio
import fcntl
import logging
import socket
import termios
import time
from collections import deque

import ssh2.exceptions as sx

from . import hops
from .backoff import Backoff
from .carried import Carried, Client
from .cut import reset_close
from .errors import ConnectTimeoutError, SshpumpError
from .keepalive import SEND, KeepaliveClock
from .logfmt import fields
from .mux.lane import Lane
from .obs.tally import Tally
from .options import Options
from .pump import Pump
from .opens import ChannelOpens
from .remotes import REMOTE_CONN_BASE, RemoteForwards

log = logging.getLogger("sshpump")


class Worker(ChannelOpens):
    """Carries client connections over one SSH session, reconnecting as needed.

    ``on_state(up: bool, reason: str)`` is called when the session comes up or
    goes down; ``on_finished(route_id)`` when a connection ends, opened or not
    (load accounting, per forward);
    ``on_opened(seconds)`` when the server answers a channel open, with the
    time since the client was queued (for routing around a stalled session);
    ``on_resolved(n)`` when n clients leave the open queue, opened or not (the
    master keeps a client's later connections in order behind them).
    What metrics count (opens, ends, failed opens, keepalive round trips)
    goes to ``self.tally``; its owner sets ``tally.on_news`` and reports.
    """

    def __init__(self, opts: Options, name: str = "worker", on_state=None, on_finished=None, on_opened=None,
                 on_resolved=None, index: int = 0):
        self.opts = opts
        self.name = name
        self.on_state = on_state or (lambda up, reason: None)
        self.on_finished = on_finished or (lambda route_id: None)
        self.on_opened = on_opened or (lambda seconds: None)
        self.on_resolved = on_resolved or (lambda n: None)
        self.loop = None
        self.session = None
        self.sock = None
        self.control = None
        self.stream = None   # ProxyCommand or jump chain the session runs over (hops.py); None: TCP
        self.pump = None
        self.up = False
        self.pending: deque[Client] = deque()
        self.tally = Tally()
        self.carried = Carried(name, opts.verbose, self.on_finished, self.tally)
        self.retiring: dict[str, float] = {}   # removed forward -> when its connections are cut
        self._closing = False
        self._reconnect_task = None
        self._timer = None
        self.keepalive = KeepaliveClock(opts.server_alive_interval, opts.server_alive_count_max)
        self._ka_sent = None  # (when, rx mark) of a keepalive whose round trip is being timed
        self.next_conn = 0   # numbers for clients submitted without one (tests, direct use)
        # -R: forwards the master gave this worker; its owner sets the callbacks.
        self.remotes = RemoteForwards(self, conn_base=REMOTE_CONN_BASE * (index + 1))
        self._kicked = False
        # --mux: the remote agent on this session carries the -L clients.
        self.lane = Lane(self) if opts.mux else None

    # ---- session lifecycle -------------------------------------------------

    async def start(self):
        """Connect once; raise SshpumpError on failure (for fail-fast start)."""
        self.loop = asyncio.get_running_loop()
        await self._connect()
        self._timer = self.loop.call_later(self._tick_interval(), self._tick)

    def start_reconnecting(self):
        """Start without failing: connect in the background with backoff."""
        self.loop = asyncio.get_running_loop()
        self._timer = self.loop.call_later(self._tick_interval(), self._tick)
        self._schedule_reconnect("starting", first=True)

    async def _connect(self):
        session, sock, control, stream = await hops.connect(self.opts, self.name, self._session_failed)
        self.session, self.sock, self.control, self.stream = session, sock, control, stream
        self.pump = Pump(session, sock.fileno(), self.opts.bufsize, self.opts.window)
        if control is not None:
            self.pump.set_control(control)
        self.loop.add_reader(self.pump.fileno, self._service)
        if self.lane is not None:
            try:
                await self.lane.start()
            except BaseException:
                self._drop_session()
                raise
        self.up = True
        self.keepalive.reset(self._rx_mark(), time.monotonic())
        self._ka_sent = None
        log.info("%s: session up to %s@%s:%d%s", self.name, self.opts.user, self.opts.host, self.opts.port,
                 f" via {stream.via}" if stream else "", extra=fields("session_up", self))
        self.remotes.session_up()
        self.on_state(True, "connected")
        self._service()

    def _drop_session(self):
        """A session that never came up (its mux agent did not start): freed
        without reporting anything."""
        self.loop.remove_reader(self.pump.fileno)
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.pump.close()
        self.pump = None
        self.control = self.session = None
        self.sock.close()
        self.sock = None

    def session_failed_from_lane(self, reason: str):
        """The mux agent cannot be restarted: replace the session."""
        self._session_failed(reason)

    def _schedule_reconnect(self, reason, first=False):
        if self._closing or self._reconnect_task is not None:
            return
        self._reconnect_task = self.loop.create_task(self._reconnect_loop(reason, first))

    async def _reconnect_loop(self, reason, first):
        backoff = Backoff(self.opts.reconnect_max, first)
        attempt = 0
        try:
            while not self._closing:
                pause = backoff.pause()
                if pause:
                    await asyncio.sleep(pause)
                attempt += 1
                try:
                    await self._connect()
                    return
                except SshpumpError as e:
                    log.warning("%s: reconnect attempt %d failed: %s", self.name, attempt, e,
                                extra=fields("reconnect_failed", self, reason=str(e)))
                    backoff.failed(answered=not isinstance(e, ConnectTimeoutError))
        finally:
            self._reconnect_task = None

    def _session_failed(self, reason: str):
        if not self.up:
            return
        self.up = False
        log.warning("%s: SSH session lost: %s", self.name, reason, extra=fields("session_lost", self, reason=reason))
        # Make every further send fail at once, so that freeing the channels
        # and the session cannot block or hang on a dead peer.
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.pump.abort(session_dead=True)
        self.remotes.session_down()
        if self.lane is not None:
            self.lane.session_down()
        self.carried.handle_events(self.pump.run())
        self.loop.remove_reader(self.pump.fileno)
        self.pump.close()
        self.pump = None
        opening = self.pending[0] if self.pending and self.pending[0].channel == "opening" else None
        if opening is not None:
            opening.channel = None  # the open died with the session; retry later
        self.control = None
        self.session = None
        self.sock.close()
        self.sock = None
        self._close_stream()
        self.on_state(False, reason)
        self._schedule_reconnect(reason)

    @property
    def log_context(self) -> dict | None:
        """Fields its JSON log records carry (logfmt); its connections' too."""
        return getattr(self.carried, "log_context", None)

    @log_context.setter
    def log_context(self, ctx: dict | None):
        self.carried.log_context = ctx

    # ---- connections -------------------------------------------------------

    @property
    def load(self) -> int:
        return len(self.pending) + len(self.carried)

    @property
    def active(self) -> dict:
        return self.carried.active

    def retire(self, route_id: str, grace: float):
        """A forward was removed: its connections (open or queued) may
        finish within grace seconds; then they are cut."""
        self.retiring[route_id] = time.monotonic() + grace

    def connections(self, worker_index) -> list[dict]:
        return self.carried.listing(self.pump, self.pending, worker_index)

    def pump_stats(self) -> dict:
        if self.pump is None:
            return {"conns": 0, "buffered": 0, "buffers": 0}
        st = self.pump.stats()
        return {"conns": st["conns"], "buffered": st["buffered"], "buffers": st["buffers"]}

    def kick(self):
        """Service the session soon (something changed outside a pump run)."""
        if not self._kicked and self.loop is not None:
            self._kicked = True
            self.loop.call_soon(self._kicked_service)

    def _kicked_service(self):
        self._kicked = False
        self._service()

    def _service(self):
        """Run the pump, then the remote forwards and the open queue; again
        only if they read from the session (an open's reply, or libssh2
        looking for forwarded channels, may have brought data the pump has
        not seen yet). One global request or channel open is in flight at a
        time (remotes.py says why)."""
        for _ in range(4):
            if self.pump is None:
                return
            events = self.pump.run()
            if self.lane is not None:
                events = self.lane.filter(events)
            dead = self.carried.handle_events(events)
            if dead:
                self._session_failed(dead)
                return
            if self._ka_sent is not None:
                self._keepalive_answered()
            again = False
            if self.remotes.by_id:
                again = self.remotes.accept()
                opening = bool(self.pending) and self.pending[0].channel == "opening"
                if not opening and self.remotes.drive():
                    if not again:
                        return
                    continue
            if self.pump is None:
                return
            if self.pending:
                again = bool(self._drive_opens()) or again
            elif self.pump is not None and not self.remotes.requesting:
                self.pump.want_in(False)
            if not again:
                return

    # ---- timers ------------------------------------------------------------

    def _tick_interval(self):
        iv = self.opts.server_alive_interval
        return min(iv, 1.0) if iv else 1.0

    def _rx_mark(self) -> int:
        """Bytes the server has sent: received by libssh2 or waiting in the socket."""
        try:
            waiting = int.from_bytes(fcntl.ioctl(self.sock.fileno(), termios.FIONREAD, b"\0\0\0\0"), "little")
        except OSError:
            waiting = 0
        return self.pump.stats()["rx_bytes"] + waiting

    def _tick(self):
        self._timer = self.loop.call_later(self._tick_interval(), self._tick)
        self._expire_pending()
        if self.remotes.by_id and self.up:
            self.kick()   # refused remote forwards are retried when due
        if self.retiring:
            self._cut_retired()
        if self.up and self.stream is not None and self.opts.server_alive_interval:
            # Every jump host's keepalives, first: when a hop hangs, its clock
            # and the session's (whose replies cross it) run out together,
            # and the hop is the one to name.
            self.stream.keepalive(time.monotonic())
        if self.up and self.opts.server_alive_interval:
            self._keepalive()

    def _keepalive_answered(self):
        """The keepalive's round trip: from its send to the next bytes the
        server sent (its reply, or anything before it). Checked when the pump
        has run, so it is timed to the loop turn that read them."""
        when, mark = self._ka_sent
        if self._rx_mark() != mark:
            self._ka_sent = None
            self.tally.rtt(time.monotonic() - when)

    def _keepalive(self):
        if self._ka_sent is not None:
            self._keepalive_answered()
        action = self.keepalive.step(self._rx_mark(), time.monotonic())
        if action is None:
            return
        if action != SEND:
            self._session_failed(action)
            return
        if self.pump.can_send_small():
            mark = self._rx_mark()
            try:
                self.session.keepalive_send()
            except sx.SSH2Error as e:
                self._session_failed(f"keepalive failed: {type(e).__name__}")
                return
            if self._ka_sent is None:   # an unanswered one keeps its start: the wait is the round trip
                self._ka_sent = (time.monotonic(), mark)
        self.keepalive.sent()

    # ---- shutdown ----------------------------------------------------------

    async def drain(self, timeout: float):
        """Wait up to timeout for active connections to finish, then abort them."""
        self.remotes.cancel_all()   # no new forwarded connections while draining
        deadline = time.monotonic() + timeout
        while (self.active or self.pending) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if self.active and self.pump is not None:
            log.warning("%s: drain timeout: aborting %d connections", self.name, len(self.active))
            self.pump.abort()
            for _ in range(50):
                self._service()
                if not self.active:
                    break
                await asyncio.sleep(0.02)

    def close(self):
        self._closing = True
        self.remotes.close()
        if self.lane is not None:
            self.lane.session_down()
        if self._timer:
            self._timer.cancel()
        if self._reconnect_task:
            self._reconnect_task.cancel()
        for client in self.pending:
            reset_close(client.sock)
            self.on_finished(client.route.id)
        if self.pending:
            self.on_resolved(len(self.pending))
        self.pending.clear()
        if self.pump is not None:
            self.pump.abort()
            self.carried.handle_events(self.pump.run())
            self.loop.remove_reader(self.pump.fileno)
            try:
                self.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self.carried.clear()
            self.pump.close()
            self.pump = None
        self.control = None
        self.session = None
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        self._close_stream()
        self.up = False

    def _close_stream(self):
        """After the session over it: end the ProxyCommand or jump chain."""
        if self.stream is not None:
            self.stream.close()
            self.stream = None
