"""-R on one worker: the remote forwards its session asked the server to
listen for, and the connections the server forwards back through them.

A remote port can be bound by one session only, so the master gives each
remote forward to exactly one worker (remoteset.py). Here, once the session
is up, each is requested (``tcpip-forward``), one global request in flight
at a time and never beside a channel open: libssh2 keeps one outgoing
packet, and a second request started while the first is half sent would be
refused (LIBSSH2_ERROR_BAD_USE). Keepalive replies cannot be mistaken for
the forward's reply: the patched libssh2 drops them (csrc patch
keepalive-replies). A refused request (the port is in use there, or
forwarding is not allowed) is reported and retried with backoff: after a
reconnect, the server may still hold the old session's listener for a
moment.

libssh2 confirms a ``forwarded-tcpip`` channel itself while it reads packets
and queues it on its listener; ``forward_accept`` takes it. We then connect
to the local target without blocking; the pump carries the pair as it
carries a -L connection. A target that refuses gets the channel closed (it
was confirmed already: the remote client sees its connection closed), and
is counted as a failed open.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from dataclasses import dataclass

import ssh2.exceptions as sx
from ssh2.error_codes import LIBSSH2_ERROR_EAGAIN
from ssh2.session import LIBSSH2_SESSION_BLOCK_OUTBOUND

from .backoff import Backoff
from .carried import Client
from .cut import reset_close
from .logfmt import fields
from .routes import Route

log = logging.getLogger("sshpump")

QUEUE_MAX = 1024           # forwarded connections libssh2 may queue before we accept them
REMOTE_CONN_BASE = 1 << 40  # worker-made connection numbers stay clear of the master's


@dataclass
class RemoteListen:
    route: Route
    bind: str              # as the tcpip-forward request names it ("localhost", "" for all, an address)
    port: int              # as asked (0: the server chooses)
    state: str = "wanted"  # wanted -> requesting -> bound; refused waits for retry_at; cancelled
    listener: object = None
    bound: int = 0
    retry_at: float = 0.0
    backoff: Backoff | None = None
    failures: int = 0

    @property
    def label(self) -> str:
        host = f"[{self.bind}]" if ":" in self.bind else (self.bind or "*")
        return f"{host}:{self.bound or self.port}"


class RemoteForwards:
    """The Worker's remote forwards. ``on_remote(route_id, state, port,
    reason)`` reports "bound" (with the port the server bound) and
    "refused"; ``on_accepted(route_id)`` counts a forwarded connection taken
    in (its end is reported as every connection's)."""

    def __init__(self, worker, on_remote=None, on_accepted=None, conn_base: int = REMOTE_CONN_BASE):
        self.worker = worker
        self.on_remote = on_remote or (lambda route_id, state, port, reason: None)
        self.on_accepted = on_accepted or (lambda route_id: None)
        self.by_id: dict[str, RemoteListen] = {}
        self.next_conn = conn_base
        self.connecting: set[asyncio.Task] = set()

    # ---- what the master assigns -------------------------------------------

    def assign(self, route: Route, bind: str, port: int):
        if route.id in self.by_id:
            return
        self.by_id[route.id] = RemoteListen(route, bind, port, backoff=Backoff(self.worker.opts.reconnect_max))
        self.worker.kick()

    def withdraw(self, route_id: str):
        """The forward was removed (or moved): the server stops listening.
        Its connections are the retire path's to end."""
        rl = self.by_id.get(route_id)
        if rl is None:
            return
        if rl.state == "requesting":
            rl.state = "cancelled"   # cancelled once its reply is in
            return
        del self.by_id[route_id]
        self._cancel(rl)

    def cancel_all(self):
        """Shutdown: cancel-tcpip-forward for every bound forward, as ssh
        does on exit, so that the server frees the ports at once."""
        for rid in list(self.by_id):
            self.withdraw(rid)

    def _cancel(self, rl: RemoteListen):
        if rl.listener is None or not self.worker.up:
            return
        pump = self.worker.pump
        if pump is not None and not pump.can_send_small():
            # Never beside a half-sent packet; the server drops the
            # listener with the session anyway.
            log.info("%s: remote forward %s not cancelled (session busy sending)", self.worker.name, rl.label)
            return
        try:
            rl.listener.forward_cancel()
        except sx.SSH2Error:
            pass
        rl.listener = None

    # ---- session -----------------------------------------------------------

    def session_up(self):
        for rl in self.by_id.values():
            rl.state, rl.listener, rl.retry_at = "wanted", None, 0.0

    def session_down(self):
        """The listeners died with the session (libssh2 frees them with it);
        each is asked for again after the reconnect."""
        for rid, rl in list(self.by_id.items()):
            if rl.state == "cancelled":
                del self.by_id[rid]
                continue
            if rl.state == "bound":
                self.on_remote(rid, "pending", rl.port, "SSH session down")
            rl.state, rl.listener, rl.bound = "wanted", None, 0

    @property
    def requesting(self) -> bool:
        return any(rl.state == "requesting" for rl in self.by_id.values())

    def drive(self) -> bool:
        """Request what is wanted, one at a time. True while a request is in
        flight (the open queue then waits: one global request at a time)."""
        w = self.worker
        now = time.monotonic()
        for rid, rl in list(self.by_id.items()):
            if not w.up:
                return False
            if rl.state == "wanted" and rl.retry_at > now:
                continue
            if rl.state not in ("wanted", "requesting", "cancelled"):
                continue
            if rl.state == "wanted" and not w.pump.can_send_small():
                return True   # a packet is half sent: the pump must finish it first
            if rl.state == "wanted":
                rl.state = "requesting"
            try:
                result = w.session.forward_listen_ex(QUEUE_MAX, rl.bind, rl.port)
            except sx.RequestDeniedError:
                self._refused(rl, now)
                continue
            except sx.SSH2Error as e:
                w._session_failed(f"{type(e).__name__} during remote forward request{': ' + str(e) if str(e) else ''}")
                return False
            listener, bound = result
            if isinstance(listener, int):
                if listener != LIBSSH2_ERROR_EAGAIN:
                    w._session_failed(f"libssh2 error {listener} during remote forward request")
                    return False
                w.pump.want_in(True)
                if w.session.block_directions() & LIBSSH2_SESSION_BLOCK_OUTBOUND:
                    w.pump.want_out()
                return True
            rl.listener, rl.bound = listener, bound or rl.port
            if rl.state == "cancelled":
                del self.by_id[rid]
                self._cancel(rl)
                continue
            rl.state, rl.failures = "bound", 0
            rl.backoff = Backoff(w.opts.reconnect_max)
            log.info("%s: remote forward %s -> %s bound", w.name, rl.label, rl.route.target,
                     extra=fields("remote_bound", w, forward=rid, target=str(rl.route.target)))
            self.on_remote(rid, "bound", rl.bound, "")
        return False

    def _refused(self, rl: RemoteListen, now: float):
        if rl.state == "cancelled":
            self.by_id.pop(rl.route.id, None)
            return
        rl.failures += 1
        pause = max(rl.backoff.pause(), 0.5)
        rl.backoff.failed()
        rl.state, rl.retry_at = "wanted", now + pause
        reason = f"remote port forwarding failed for listen port {rl.port}"
        level = logging.WARNING if rl.failures == 1 else logging.INFO
        log.log(level, "%s: %s (%s); retrying in %.1fs", self.worker.name, reason,
                "the port is in use there, or forwarding is not allowed", pause,
                extra=fields("remote_refused", self.worker, forward=rl.route.id, reason=reason))
        self.on_remote(rl.route.id, "refused", rl.port, reason)

    # ---- forwarded connections -------------------------------------------

    def accept(self) -> bool:
        """Take every forwarded channel libssh2 has queued. True if taking
        them read from the session socket (libssh2 reads while it looks),
        so the pump must run again to see what that brought."""
        w = self.worker
        if not any(rl.state == "bound" for rl in self.by_id.values()):
            return False
        before = w.pump.stats()["rx_bytes"]
        for rl in list(self.by_id.values()):
            while rl.state == "bound" and w.up:
                try:
                    ch = rl.listener.forward_accept()
                except sx.SSH2Error:
                    break
                if isinstance(ch, int):
                    break
                self._start_connect(rl, ch)
        return w.pump is not None and w.pump.stats()["rx_bytes"] != before

    def _start_connect(self, rl: RemoteListen, channel):
        conn = self.next_conn
        self.next_conn += 1
        self.on_accepted(rl.route.id)
        task = self.worker.loop.create_task(self._connect_target(rl, channel, conn, time.monotonic()))
        self.connecting.add(task)
        task.add_done_callback(self.connecting.discard)

    async def _connect_target(self, rl: RemoteListen, channel, conn: int, started: float):
        w = self.worker
        target = rl.route.target
        peer = f"remote {rl.label}"   # who connected is the server's to know; this is where
        try:
            if target.is_unix:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                address = target.path
            else:
                infos = await w.loop.getaddrinfo(target.host, target.port, type=socket.SOCK_STREAM)
                family, _, _, _, address = infos[0]
                sock = socket.socket(family, socket.SOCK_STREAM)
            sock.setblocking(False)
            try:
                await asyncio.wait_for(w.loop.sock_connect(sock, address), w.opts.connect_timeout or None)
            except BaseException:
                sock.close()
                raise
        except (OSError, asyncio.TimeoutError) as e:
            why = "connect timed out" if isinstance(e, asyncio.TimeoutError) else (
                e.strerror or str(e) if not isinstance(e, socket.gaierror) else f"cannot resolve: {e.strerror}")
            self._target_failed(rl, channel, conn, why)
            return
        except asyncio.CancelledError:
            self._close_channel(channel)
            raise
        if not w.up or w.pump is None:
            reset_close(sock)
            w.on_finished(rl.route.id)
            return
        w.carry(Client(sock, rl.route, peer, conn, accepted=started, channel=channel))

    def _target_failed(self, rl: RemoteListen, channel, conn: int, why: str):
        w = self.worker
        w.tally.failed(rl.route.id, "connect failed")
        log.warning("%s: remote forward %s: connect to %s failed: %s (channel closed)", w.name, rl.label,
                    rl.route.target, why,
                    extra=fields("open_failed", w, forward=rl.route.id, conn=conn, peer=f"remote {rl.label}",
                                 target=str(rl.route.target), reason=f"connect failed: {why}"))
        self._close_channel(channel)
        w.on_finished(rl.route.id)

    def _close_channel(self, channel):
        """Close a confirmed channel that has no local end: the pump carries
        it with a socket whose peer is already gone and cuts it at once,
        with the same CLOSE it sends for any cut connection."""
        w = self.worker
        if not w.up or w.pump is None:
            return
        mine, theirs = socket.socketpair()
        theirs.close()
        try:
            cid = w.pump.add(mine.detach(), channel)
        except OSError:
            return
        w.pump.abort(cid)
        w.kick()

    def close(self):
        for task in list(self.connecting):
            task.cancel()
        self.connecting.clear()

    def listing(self) -> list[dict]:
        return [{"forward": rid, "bind": rl.bind, "port": rl.bound or rl.port, "state": rl.state}
                for rid, rl in self.by_id.items()]
