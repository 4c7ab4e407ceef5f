"""The clients a worker has been handed and not yet opened a channel for.

libssh2 allows one channel open in flight per session, so opens are queued
and driven one at a time, retried with the same arguments after EAGAIN; a
client that reset while it waited costs no channel. Clients wait for a
session up to client_wait; those of a removed forward get the drain
timeout. A -D client is answered here (SOCKS reply) once its open is
answered. ChannelOpens is the part of Worker (worker.py) that does this.
"""

from __future__ import annotations

import logging
import socket
import time
from collections import deque

import ssh2.exceptions as sx
from ssh2.error_codes import LIBSSH2_ERROR_EAGAIN
from ssh2.session import LIBSSH2_SESSION_BLOCK_OUTBOUND

from . import socks
from .carried import Client
from .cut import client_gone, end_close, reset_close
from .describe import open_reason, peer_text
from .errors import ChannelOpenError
from .logfmt import fields
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


class ChannelOpens:
    """Worker's open queue (``self.pending``); uses the Worker's session,
    pump, carried connections, tally and callbacks."""

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
            if self.lane is not None and client.channel != "opening":
                # --mux: the agent's channel open is the one in flight while
                # it starts; -L clients then wait for it, and go over it.
                if self.lane.starting or (self.lane.carries(client.route) and not self.lane.ready):
                    return opened
                if self.lane.carries(client.route):
                    self._dequeue()
                    opened += self.lane.open(client)
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
            if self.carry(client):
                opened += 1
        if self.pump is not None:
            self.pump.want_in(False)
        return opened

    def carry(self, client: Client) -> bool:
        """Hand a client whose channel is open (client.channel) to the pump."""
        target = client.route.target
        fd = client.sock.detach()  # the pump owns the fd now
        try:
            cid = self.pump.add(fd, client.channel)
        except OSError as e:
            reset_close(socket.socket(fileno=fd))
            log.warning("%s: cannot carry client %s: %s", self.name, peer_text(client.peer), e,
                        extra=fields("client_dropped", self, forward=client.route.id, conn=client.conn,
                                     peer=peer_text(client.peer), target=str(target), reason=str(e)))
            self.on_finished(client.route.id)
            return False
        self.carried.add(cid, client)
        if not client.opened_at:
            client.opened_at = time.monotonic()
        self.tally.opened(client.route.id, max(0.0, client.opened_at - (client.accepted or client.queued_at)))
        if self.opts.verbose:
            log.info(
                "%s: conn %d open %s -> %s (%.1f ms after accept)",
                self.name, client.conn, peer_text(client.peer), target,
                (client.opened_at - client.queued_at) * 1000,
                extra=fields("conn_open", self, forward=client.route.id, conn=client.conn,
                             peer=peer_text(client.peer), target=str(target),
                             duration=round(client.opened_at - client.queued_at, 6)),
            )
        return True

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
