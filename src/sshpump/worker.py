"""One SSH session, its C pump, and the client connections it carries.

Python runs here once per connection event (open, finish) and per session
event (connect, keepalive, failure); bytes never cross into Python. The pump's
epoll fd is watched by the event loop; when it is readable the pump runs once
and hands back the few events Python must act on.

libssh2 allows one channel open in flight per session, so opens are queued
and driven one at a time, retried with the same arguments after EAGAIN.
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
from ssh2.error_codes import LIBSSH2_ERROR_EAGAIN
from ssh2.session import LIBSSH2_SESSION_BLOCK_OUTBOUND

from . import session as ssh_session
from . import socks
from .backoff import Backoff
from .carried import Carried, Client
from .cut import client_gone, end_close, reset_close
from .describe import open_reason, peer_text
from .errors import ChannelOpenError, ConnectTimeoutError, SshpumpError
from .keepalive import SEND, KeepaliveClock
from .logfmt import fields
from .obs.tally import Tally
from .options import Options
from .pump import Pump
from .routes import Route

log = logging.getLogger("sshpump")


def grant(client: Client):
    """-D: the open succeeded; the client (which waited for this) may talk.
    Ten bytes into an empty socket buffer: a non-blocking send takes them."""
    try:
        client.sock.send(socks.reply(client.route.socks, socks.OK))
    except OSError:
        pass   # gone: the pump sees it at once


def refuse(client: Client, reason: str):
    """A failed open: a SOCKS client is told why (and reads it before a
    normal end); any other client is reset."""
    if not client.route.socks:
        reset_close(client.sock)
        return
    try:
        client.sock.send(socks.reply(client.route.socks, socks.open_failure_code(reason)))
    except OSError:
        pass
    end_close(client.sock)


class Worker:
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
                 on_resolved=None):
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
        session, sock, control = await asyncio.to_thread(ssh_session.connect, self.opts)
        self.session, self.sock, self.control = session, sock, control
        self.pump = Pump(session, sock.fileno(), self.opts.bufsize, self.opts.window)
        if control is not None:
            self.pump.set_control(control)
        self.loop.add_reader(self.pump.fileno, self._service)
        self.up = True
        self.keepalive.reset(self._rx_mark(), time.monotonic())
        self._ka_sent = None
        log.info("%s: session up to %s@%s:%d", self.name, self.opts.user, self.opts.host, self.opts.port,
                 extra=fields("session_up", self))
        self.on_state(True, "connected")
        self._service()

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
        self.on_state(False, reason)
        self._schedule_reconnect(reason)

    # ---- connections -------------------------------------------------------

    def submit(self, sock: socket.socket, route: Route, peer=None, conn: int | None = None,
               accepted: float | None = None):
        """Carry one accepted client connection through this worker
        (``accepted``: the master's time.monotonic() at accept)."""
        sock.setblocking(False)
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if peer is None:
            try:
                peer = sock.getpeername()
            except OSError:
                peer = ("127.0.0.1", 0)
        if not isinstance(peer, tuple) or not peer:
            peer = ("127.0.0.1", 0)
        if conn is None:
            conn = self.next_conn
            self.next_conn += 1
        self.pending.append(Client(sock, route, peer, conn, accepted=accepted))
        if self.up:
            self._drive_opens()

    def _dequeue(self) -> Client:
        """The oldest queued client leaves the queue (opened, failed, gone)."""
        client = self.pending.popleft()
        self.on_resolved(1)
        return client

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

    def oldest_open_wait(self) -> float | None:
        """Seconds the oldest queued client has waited for its channel; None
        when none waits on a live session."""
        if not self.up or not self.pending:
            return None
        return time.monotonic() - self.pending[0].queued_at

    def _drive_opens(self) -> int:
        """Open channels for queued clients, one in flight at a time.

        Returns how many were opened."""
        opened = 0
        while self.pending and self.up:
            client = self.pending[0]
            target = client.route.target
            if client.channel != "opening" and client_gone(client.sock):
                # Reset while it waited: an open would cost a channel and a
                # target connection for nobody (a burst of connect+RST).
                self._dequeue()
                client.sock.close()
                self.on_finished(client.route.id)
                continue
            shost = client.peer[0] if client.sock.family != socket.AF_UNIX else "127.0.0.1"
            sport = client.peer[1] if client.sock.family != socket.AF_UNIX else 0
            client.channel = "opening"
            try:
                if target.is_unix:
                    ch = self.session.direct_streamlocal_ex(target.path, shost, sport)
                else:
                    ch = self.session.direct_tcpip_ex(target.host, target.port, shost, sport)
            except sx.ChannelFailure:
                self._dequeue()
                self.on_opened(time.monotonic() - client.queued_at)
                why = open_reason(self.session)
                self.tally.failed(client.route.id, why)
                err = ChannelOpenError(str(target), why)
                log.warning("%s: %s (client %s closed)", self.name, err, peer_text(client.peer),
                            extra=fields("open_failed", self, forward=client.route.id, conn=client.conn,
                                         peer=peer_text(client.peer), target=str(target), reason=err.reason))
                refuse(client, err.reason)
                self.on_finished(client.route.id)
                continue
            except sx.SSH2Error as e:
                # Any other libssh2 error during an open is session-level
                # (socket, kex, protocol; a failed open after a timeout leaves
                # the session unusable): replace the session.
                self._session_failed(f"{type(e).__name__} during channel open{': ' + str(e) if str(e) else ''}")
                return opened
            if ch == LIBSSH2_ERROR_EAGAIN or isinstance(ch, int):
                self.pump.want_in(True)
                if self.session.block_directions() & LIBSSH2_SESSION_BLOCK_OUTBOUND:
                    self.pump.want_out()
                return opened
            self._dequeue()
            client.channel = ch
            client.opened_at = time.monotonic()
            self.on_opened(client.opened_at - client.queued_at)
            if client.route.socks:
                grant(client)
            fd = client.sock.detach()  # the pump owns the fd now
            try:
                cid = self.pump.add(fd, ch)
            except OSError as e:
                reset_close(socket.socket(fileno=fd))
                log.warning("%s: cannot carry client %s: %s", self.name, peer_text(client.peer), e,
                            extra=fields("client_dropped", self, forward=client.route.id, conn=client.conn,
                                         peer=peer_text(client.peer), target=str(target), reason=str(e)))
                self.on_finished(client.route.id)
                continue
            self.carried.add(cid, client)
            self.tally.opened(client.route.id, max(0.0, client.opened_at - (client.accepted or client.queued_at)))
            opened += 1
            if self.opts.verbose:
                log.info(
                    "%s: conn %d open %s -> %s (%.1f ms after accept)",
                    self.name, client.conn, peer_text(client.peer), target,
                    (client.opened_at - client.queued_at) * 1000,
                    extra=fields("conn_open", self, forward=client.route.id, conn=client.conn,
                                 peer=peer_text(client.peer), target=str(target),
                                 duration=round(client.opened_at - client.queued_at, 6)),
                )
        if self.pump is not None:
            self.pump.want_in(False)
        return opened

    def _service(self):
        """Run the pump, then the open queue; again only if an open completed
        (its reply may have carried data the pump has not seen yet)."""
        for _ in range(4):
            if self.pump is None:
                return
            dead = self.carried.handle_events(self.pump.run())
            if dead:
                self._session_failed(dead)
                return
            if self._ka_sent is not None:
                self._keepalive_answered()
            if not self.pending or not self._drive_opens():
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
        if self.retiring:
            self._cut_retired()
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

    def _expire_pending(self):
        """Clients waiting for a session that is down give up after client_wait."""
        if self.up or not self.pending:
            return
        limit = time.monotonic() - self.opts.client_wait
        while self.pending and self.pending[0].queued_at < limit:
            client = self._dequeue()
            log.warning(
                "%s: closing client %s: no SSH session for %.0fs", self.name, peer_text(client.peer), self.opts.client_wait,
                extra=fields("client_dropped", self, forward=client.route.id, conn=client.conn,
                             peer=peer_text(client.peer), target=str(client.route.target), reason="no SSH session"),
            )
            reset_close(client.sock)
            self.on_finished(client.route.id)

    def _cut_retired(self):
        """Connections of removed forwards whose grace has passed are cut
        (reset), as a drain timeout cuts them."""
        now = time.monotonic()
        due = {rid for rid, at in self.retiring.items() if at <= now}
        if not due:
            return
        for rid in due:
            del self.retiring[rid]
        keep = deque()
        while self.pending:
            client = self.pending.popleft()
            if client.route.id in due and client.channel != "opening":
                self.on_resolved(1)
                reset_close(client.sock)
                self.on_finished(client.route.id)
            else:
                keep.append(client)
        self.pending = keep
        if self.pump is None:
            return
        cut = [cid for rid in due for cid in self.carried.of_route(rid)]
        if cut:
            log.warning("%s: removed forward: cutting %d connections after the drain timeout", self.name, len(cut))
            for cid in cut:
                self.pump.abort(cid)
            self._service()

    # ---- shutdown ----------------------------------------------------------

    async def drain(self, timeout: float):
        """Wait up to timeout for active connections to finish, then abort them."""
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
        self.up = False
