"""The worker's end of --mux: the remote agent on the worker's own session.

The agent (agent.py) is started through an ``exec`` channel after login,
shipped compressed in the command itself, and must greet with its hello
line before anything else; then its channel (the "lane") goes to the C pump
(mux.c), and every -L client of the worker becomes a stream of it: one
pump call to open, and per stream two events back (opened or failed, and
done). Nothing is opened as an SSH channel, so sshd's AllowTcpForwarding
and PermitOpen do not apply: that is why --mux is an explicit opt-in and is
never fallen back to (nor from) silently.

When the agent ends (it exited, or sent bad frames), its streams are cut
with that reason, and the agent is started again on the same session; when
that keeps failing, the session is replaced as for any session failure.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import os
import struct
import time
import zlib

import ssh2.exceptions as sx
from ssh2.error_codes import LIBSSH2_ERROR_EAGAIN

from ..describe import peer_text
from ..errors import ChannelOpenError, MuxUnavailableError
from ..logfmt import fields
from ..pump import END_OPEN_FAILED, EV_DONE, EV_LANE_LOST, EV_OPENED
from ..routes import DIRECT_STREAMLOCAL, DIRECT_TCPIP
from . import agent

log = logging.getLogger("sshpump")

# The agent's own name on the server's process list (its argv[1]), so that
# it can be found there (the tests look for orphans by it).
AGENT_NAME = "sshpump-mux-agent"
START_TIMEOUT = 15.0       # exec + the agent's hello, when ConnectTimeout sets none
RESTARTS_BEFORE_RECONNECT = 3
# The SSH open-failure reason codes (RFC 4254) the agent reports, named as
# libssh2 names them for channel opens, so both planes log the same line.
OPEN_FAILURES = {1: "administratively prohibited", 2: "connect failed", 3: "unknown channel type",
                 4: "resource shortage"}


def agent_command() -> str:
    """The exec command: the agent's source, compressed, run by python3;
    nothing is read from stdin but frames."""
    with open(agent.__file__, "rb") as f:
        blob = base64.b64encode(zlib.compress(f.read(), 9)).decode()
    return (f"exec python3 -c \"import base64,zlib;exec(zlib.decompress(base64.b64decode('{blob}')))\" "
            f"{AGENT_NAME}")


def target_payload(target) -> bytes:
    """An OPEN frame's payload for a route's target (agent.py's format)."""
    if target.is_unix:
        return b"u" + target.path.encode()
    return b"t" + struct.pack("!H", target.port) + target.host.encode()


class Lane:
    """The agent of one worker's session, and the clients it carries.
    ``state``: "down" (no agent), "starting", "up"."""

    def __init__(self, worker):
        self.worker = worker
        self.channel = None
        self.state = "down"
        self.failures = 0          # restarts failed in a row
        self._task = None
        self._command = agent_command()

    @property
    def starting(self) -> bool:
        return self.state == "starting"

    @property
    def ready(self) -> bool:
        return self.state == "up"

    @staticmethod
    def carries(route) -> bool:
        """-L clients go over the lane; -D's (a SOCKS reply waits for the open)
        and -R's are channels as without --mux."""
        return route.kind in (DIRECT_TCPIP, DIRECT_STREAMLOCAL) and not route.socks

    # ---- starting the agent -------------------------------------------------

    async def start(self):
        """Start the agent on the worker's session and hand it to the pump.
        Raises MuxUnavailableError (one line) when the server cannot run it."""
        w = self.worker
        self.state = "starting"
        try:
            timeout = w.opts.connect_timeout or START_TIMEOUT
            deadline = time.monotonic() + timeout
            ch = await self._retry(w.session.open_session, deadline, "open a session channel",
                                   "the --mux agent cannot start: the server refused a session channel")
            await self._retry(lambda: ch.execute(self._command), deadline, "run the agent",
                              "the server has no python3 for --mux: it refused to run a command")
            hello = await self._hello(ch, deadline)
            if hello != agent.HELLO:
                raise MuxUnavailableError(
                    f"the --mux agent on the server said {hello[:60]!r}, not {agent.HELLO.decode().strip()!r}")
            w.pump.mux_start(ch)
        except BaseException:
            self.state = "down"
            raise
        self.channel = ch
        self.state = "up"
        self.failures = 0
        log.info("%s: mux agent started", w.name, extra=fields("mux_up", w))
        w.kick()   # our reads may have queued packets the pump has not seen

    async def _retry(self, call, deadline, what, refused):
        """call() until it is not EAGAIN; a libssh2 error is ``refused`` (one line)."""
        pause = 0.001
        while True:
            try:
                r = call()
            except sx.SSH2Error as e:
                raise MuxUnavailableError(f"{refused} ({type(e).__name__})") from None
            if r != LIBSSH2_ERROR_EAGAIN:
                return r
            if time.monotonic() > deadline:
                raise MuxUnavailableError(f"the --mux agent did not start: no answer to {what} in time")
            await asyncio.sleep(pause)
            pause = min(pause * 2, 0.02)

    async def _hello(self, ch, deadline) -> bytes:
        got = b""
        pause = 0.001
        stderr = b""
        while b"\n" not in got:
            rc, data = ch.read()
            if rc > 0:
                got += data
                continue
            # libssh2 reports EOF only once the stderr bytes are read too.
            erc, edata = ch.read_stderr()
            if erc > 0:
                stderr += edata
                continue
            if rc == 0 and ch.eof():
                raise MuxUnavailableError(f"the server has no python3 for --mux ({self._why_ended(ch, stderr)})")
            if time.monotonic() > deadline:
                raise MuxUnavailableError("the --mux agent did not start: no hello line in time")
            await asyncio.sleep(pause)
            pause = min(pause * 2, 0.02)
        return got

    @staticmethod
    def _why_ended(ch, err: bytes = b"") -> str:
        """The agent's exit status and the last line it wrote to stderr (err:
        what was read of it already), as far as they have arrived."""
        try:
            rc, more = ch.read_stderr()
        except sx.SSH2Error:
            rc, more = 0, b""
        err += more if rc > 0 else b""
        line = err.decode(errors="replace").strip().splitlines()[-1] if err.strip() else ""
        status = ch.get_exit_status()
        parts = [f"exit status {status}"] if status else []
        if line:
            parts.append(line)
        return ": ".join(parts) or "its channel closed"

    # ---- clients --------------------------------------------------------------

    def open(self, client) -> bool:
        """Hand a client to the pump as a new stream (its OPEN goes out with
        the client's first bytes, if any, right behind)."""
        w = self.worker
        fd = client.sock.detach()
        try:
            cid = w.pump.mux_open(fd, target_payload(client.route.target))
        except OSError as e:
            os.close(fd)
            log.warning("%s: cannot carry client %s: %s", w.name, peer_text(client.peer), e,
                        extra=fields("client_dropped", w, forward=client.route.id, conn=client.conn,
                                     peer=peer_text(client.peer), reason=str(e)))
            w.on_finished(client.route.id)
            return False
        client.channel = "mux"
        w.carried.add(cid, client)
        return True

    def filter(self, events) -> list:
        """Handle the events only the mux has (opened, failed open, lane
        lost); return the others for Carried."""
        rest = []
        lost = None
        for ev in events:
            kind, cid, reason, err = ev[0], ev[1], ev[2], ev[3]
            if kind == EV_OPENED:
                self._opened(cid)
            elif kind == EV_DONE and reason == END_OPEN_FAILED:
                self._open_failed(cid, err[1], err[0])
            elif kind == EV_LANE_LOST:
                lost = err
            else:
                rest.append(ev)
        if lost is not None:
            self._lost(lost)
        return rest

    def _opened(self, cid):
        w = self.worker
        client = w.carried.active.get(cid)
        if client is None:
            return
        client.opened_at = time.monotonic()
        w.on_opened(client.opened_at - client.queued_at)
        w.tally.opened(client.route.id, max(0.0, client.opened_at - (client.accepted or client.queued_at)))
        if w.opts.verbose:
            log.info("%s: conn %d open %s -> %s (%.1f ms after accept, mux)", w.name, client.conn,
                     peer_text(client.peer), client.route.target, (client.opened_at - client.queued_at) * 1000,
                     extra=fields("conn_open", w, forward=client.route.id, conn=client.conn,
                                  peer=peer_text(client.peer), target=str(client.route.target),
                                  duration=round(client.opened_at - client.queued_at, 6)))

    def _open_failed(self, cid, err, code):
        w = self.worker
        client = w.carried.active.pop(cid, None)
        if client is None:
            return
        w.on_opened(time.monotonic() - client.queued_at)
        why = OPEN_FAILURES.get(code, f"open failure {code}")
        w.tally.failed(client.route.id, why)
        e = ChannelOpenError(str(client.route.target), why)
        detail = f": {os.strerror(err)}" if err > 0 else ""
        log.warning("%s: %s%s (client %s closed)", w.name, e, detail, peer_text(client.peer),
                    extra=fields("open_failed", w, forward=client.route.id, conn=client.conn,
                                 peer=peer_text(client.peer), target=str(client.route.target), reason=e.reason))
        w.on_finished(client.route.id)

    # ---- the agent's end --------------------------------------------------------

    def _lost(self, err):
        w = self.worker
        ch, self.channel = self.channel, None
        self.state = "down"
        if err == 0:
            why = f"the agent exited ({self._why_ended(ch)})" if ch is not None else "the agent exited"
        elif err == -71:   # -EPROTO
            why = "the agent sent frames that break the protocol"
        else:
            why = f"its channel failed (libssh2 error {err})"
        if ch is not None:
            try:
                ch.close()   # non-blocking: sent if it can be, else dropped with the session's next packets
            except sx.SSH2Error:
                pass
        log.warning("%s: mux agent ended: %s; its streams were cut; restarting it", w.name, why,
                    extra=fields("mux_lost", w, reason=why))
        self._task = asyncio.get_running_loop().create_task(self._restart())

    async def _restart(self):
        w = self.worker
        try:
            while w.up and self.state == "down":
                if self.failures:
                    await asyncio.sleep(min(0.5 * 2 ** self.failures, 5.0))
                if not w.up:
                    return
                try:
                    await self.start()
                    return
                except MuxUnavailableError as e:
                    self.failures += 1
                    log.warning("%s: mux agent restart failed: %s", w.name, e,
                                extra=fields("mux_restart_failed", w, reason=str(e)))
                    if self.failures >= RESTARTS_BEFORE_RECONNECT:
                        w.session_failed_from_lane(f"mux agent cannot be restarted: {e}")
                        return
        finally:
            self._task = None

    def session_down(self):
        """The session is gone (the pump with it): nothing to restart here."""
        if self._task is not None:
            self._task.cancel()
            self._task = None
        self.channel = None
        self.state = "down"
