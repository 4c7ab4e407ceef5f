"""ProxyJump: the session to the destination runs through jump hosts.

For each hop: a libssh2 session (host key checked, authenticated, as for the
destination), then a ``direct-tcpip`` channel from it to the next hop (the
destination after the last one). That channel is carried by the hop
session's own C pump, like any client connection, with one end of an
AF_UNIX socketpair as its "client"; the next session handshakes on the
other end, in a thread, while the event loop keeps pumping the hop. No ssh
process is involved and every byte stays in C.

A hop's death is the chain's: its pump reports the session dead or the
channel ended, or its keepalives (the destination's ServerAliveInterval and
CountMax, ticked by the Worker) go unanswered. Then ``on_lost(reason)``
tells the Worker, whose session fails and is rebuilt, chain and all, with
its usual backoff. Each worker process builds its own chain.
"""

from __future__ import annotations

import asyncio
import dataclasses
import fcntl
import logging
import os
import socket
import termios
import time

import ssh2.exceptions as sx

from . import session as ssh_session
from .describe import err_text, open_reason
from .errors import ConnectError, SshpumpError, error_from_wire, error_to_wire
from .hopspec import hop_name, hop_options
from .keepalive import SEND, KeepaliveClock
from .options import Options
from .pump import END_REASONS, EV_DONE, EV_SESSION_DEAD, Pump

log = logging.getLogger("sshpump")

# ssh -W names its stdio forward's originator so; sshd logs it.
ORIGINATOR = ("127.0.0.1", 65535)
# A socketpair's default buffer (about 200 KiB) is smaller than what one
# pump round moves under bulk: a larger one saves wakeups on both sides.
STREAM_BUFFER = 1 << 20


def named(error: SshpumpError, opts: Options) -> SshpumpError:
    """The same error (type, exit code, attributes) with the hop named first:
    "jump host 10.0.0.1 port 22: authentication failed for ..."."""
    wire = error_to_wire(error)
    wire["msg"] = f"{hop_name(opts)}: {wire['msg']}"
    return error_from_wire(wire)


def _login_and_open(opts: Options, stream, to_host: str, to_port: int):
    """In a thread: log in to one hop (over ``stream``, or TCP for the first)
    and open its channel to the next hop. Returns (session, sock, channel)."""
    session, sock, _ = ssh_session.connect(opts, stream, control=False)
    try:
        session.set_blocking(True)
        timeout = opts.connect_timeout
        session.set_timeout(int(timeout * 1000) if timeout else 0)
        try:
            channel = session.direct_tcpip_ex(to_host, to_port, *ORIGINATOR)
        except sx.ChannelFailure:
            raise ConnectError(f"channel to {to_host} port {to_port} failed: {open_reason(session)}") from None
        except sx.SSH2Error as e:
            raise ConnectError(f"channel to {to_host} port {to_port} failed: {type(e).__name__}") from None
        session.set_timeout(0)
        session.set_blocking(False)
        return session, sock, channel
    except BaseException:
        sock.close()
        raise


@dataclasses.dataclass
class Hop:
    opts: Options
    to: str                         # where its channel goes, for messages
    session: object = None
    sock: socket.socket | None = None
    channel: object = None          # the pump uses its pointer: kept alive here
    pump: Pump | None = None
    cid: int = -1
    clock: KeepaliveClock | None = None

    @property
    def name(self) -> str:
        return hop_name(self.opts)

    def rx_mark(self) -> int:
        """Bytes the hop's server has sent: read by libssh2 or waiting."""
        try:
            waiting = int.from_bytes(fcntl.ioctl(self.sock.fileno(), termios.FIONREAD, b"\0\0\0\0"), "little")
        except OSError:
            waiting = 0
        return self.pump.stats()["rx_bytes"] + waiting


class JumpChain:
    """The hops to one destination; a stream for hops.open_stream."""

    def __init__(self, opts: Options, name: str, on_lost):
        self.opts = opts
        self.name = name
        self.on_lost = on_lost
        self.loop = asyncio.get_running_loop()
        self.hops: list[Hop] = []
        self.sock = None            # the destination session's end
        self.dead: str | None = None
        self.via = "jump host" + ("s " if len(opts.proxy_jump) > 1 else " ") + ", ".join(opts.proxy_jump)

    @classmethod
    async def build(cls, opts: Options, name: str, on_lost) -> "JumpChain":
        chain = cls(opts, name, on_lost)
        try:
            await chain._build()
        except BaseException:
            chain.close()
            raise
        return chain

    async def _build(self):
        stream = None
        specs = self.opts.proxy_jump
        for i, spec in enumerate(specs):
            hop_opts = hop_options(self.opts, spec)
            nxt = hop_options(self.opts, specs[i + 1]) if i + 1 < len(specs) else self.opts
            hop = Hop(hop_opts, f"{nxt.host} port {nxt.port}")
            try:
                # ``stream`` is handed over: connect() closes it on failure.
                hop.session, hop.sock, hop.channel = await asyncio.to_thread(
                    _login_and_open, hop_opts, stream, nxt.host, nxt.port)
            except SshpumpError as e:
                if self.dead:    # the hop before it died under it: that is the news
                    raise ConnectError(self.dead) from None
                raise named(e, hop_opts) from None
            finally:
                stream = None
            self.hops.append(hop)
            try:
                stream = self._carry(hop)
            except OSError as e:   # out of fds: a failed attempt, retried
                raise ConnectError(f"{hop.name}: cannot carry its channel: {e.strerror or e}") from None
            if self.dead:
                stream.close()
                raise ConnectError(self.dead)
            log.debug("%s: %s: session up, channel open to %s", self.name, hop.name, hop.to)
        self.sock = stream

    def _carry(self, hop: Hop) -> socket.socket:
        """Give the hop's channel to its own pump, with one end of a fresh
        socketpair; return the other end."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            for s in (ours, theirs):
                s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, STREAM_BUFFER)
                s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, STREAM_BUFFER)
            ours.setblocking(False)
            hop.pump = Pump(hop.session, hop.sock.fileno(), self.opts.bufsize, self.opts.window)
            fd = ours.detach()
            try:
                hop.cid = hop.pump.add(fd, hop.channel)   # the pump owns that fd from here on
            except OSError:
                os.close(fd)
                raise
        except BaseException:
            ours.close()
            theirs.close()
            raise
        hop.clock = KeepaliveClock(self.opts.server_alive_interval, self.opts.server_alive_count_max)
        hop.clock.reset(hop.rx_mark(), time.monotonic())
        self.loop.add_reader(hop.pump.fileno, self._service, hop)
        self._service(hop)   # what libssh2 read with the open's reply
        return theirs

    def _service(self, hop: Hop):
        if hop.pump is None:
            return
        why = None
        for kind, cid, reason, err, _up, _down in hop.pump.run():
            if kind == EV_SESSION_DEAD:
                why = f"{hop.name}: session lost ({err_text(err)})"
            elif kind == EV_DONE and cid == hop.cid:
                hop.cid = -1
                why = why or f"{hop.name}: channel to {hop.to} ended ({END_REASONS.get(reason, reason)})"
        if why:
            self._lost(why)

    def _lost(self, reason: str):
        """One hop died: so did every session behind it. Its pump is cut at
        once (the next session sees its stream end), the Worker is told."""
        if self.dead:
            return
        self.dead = reason
        for hop in self.hops:
            self._stop_hop(hop)
        self.on_lost(reason)

    def keepalive(self, now: float):
        """Every hop's ServerAlive clock, as the Worker's tick runs its own."""
        for hop in self.hops:
            if hop.pump is None or self.dead:
                return
            action = hop.clock.step(hop.rx_mark(), now)
            if action is None:
                continue
            if action != SEND:
                self._lost(f"{hop.name}: {action}")
                return
            if hop.pump.can_send_small():
                try:
                    hop.session.keepalive_send()
                except sx.SSH2Error as e:
                    self._lost(f"{hop.name}: keepalive failed: {type(e).__name__}")
                    return
            hop.clock.sent()

    def _stop_hop(self, hop: Hop):
        if hop.pump is None:
            return
        self.loop.remove_reader(hop.pump.fileno)
        # As Worker does for a dead session: make every send fail at once,
        # so that freeing channels cannot block on a dead peer.
        try:
            hop.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        hop.pump.abort(session_dead=True)
        hop.pump.run()
        hop.pump.close()      # closes the socketpair end it carried
        hop.pump = None

    def close(self):
        """End every hop, innermost first. The destination's end of the
        stream belongs to its session once handed over (hops.connect)."""
        for hop in reversed(self.hops):
            self._stop_hop(hop)
            hop.channel = None
            hop.session = None
            if hop.sock is not None:
                hop.sock.close()
                hop.sock = None
        self.hops.clear()

    async def why_dead(self) -> str | None:
        return self.dead
