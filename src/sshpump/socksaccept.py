"""The master's side of a ``-D`` connection: the SOCKS handshake, before the
client is handed to a worker.

The client's bytes are peeked at and only the handshake's own are consumed
(socks.py counts them), so whatever a client sends right after its request
stays in the socket for the pump. The worker answers the request after the
channel open has succeeded or failed (worker.py), so a client never gets
"granted" for a target the server could not reach. A handshake that is
malformed, hostile or too slow is closed within HANDSHAKE_TIMEOUT."""

from __future__ import annotations

import asyncio
import logging
import socket

from . import socks
from .cut import end_close, reset_close
from .describe import peer_text

log = logging.getLogger("sshpump")

HANDSHAKE_TIMEOUT = 10.0     # seconds for greeting and request together, as a slow drip must end


async def _peek(loop, sock, want_more_than: int) -> bytes:
    """What the client has sent so far (not consumed), once it is more than
    want_more_than bytes; b"" at EOF."""
    while True:
        try:
            data = sock.recv(socks.MAX_HANDSHAKE, socket.MSG_PEEK)
        except (BlockingIOError, InterruptedError):
            data = None
        if data is not None and (len(data) > want_more_than or not data):
            return data
        fut = loop.create_future()
        loop.add_reader(sock.fileno(), lambda: fut.done() or fut.set_result(None))
        try:
            await fut
        finally:
            loop.remove_reader(sock.fileno())


async def _message(loop, sock, expect_request: bool):
    seen = 0
    while True:
        data = await _peek(loop, sock, seen)
        if not data:
            raise socks.SocksError("client closed during the SOCKS handshake")
        step = socks.parse(data, expect_request)
        if step is not None:
            sock.recv(step.consumed)     # exactly the handshake's bytes
            return step
        if len(data) >= socks.MAX_HANDSHAKE:
            raise socks.SocksError("SOCKS handshake too long")
        seen = len(data)


async def _handshake(loop, sock) -> socks.Request:
    step = await _message(loop, sock, expect_request=False)
    if isinstance(step, socks.Greeting):
        sock.send(step.answer)   # two bytes into an empty socket buffer
        step = await _message(loop, sock, expect_request=True)
    return step


async def accept_socks(sock: socket.socket, peer, label: str, hand_over) -> None:
    """Run the handshake; then hand_over(request), or close the client."""
    loop = asyncio.get_running_loop()
    try:
        request = await asyncio.wait_for(_handshake(loop, sock), HANDSHAKE_TIMEOUT)
    except socks.SocksError as e:
        log.warning("%sSOCKS client %s: %s", label, peer_text(peer), e)
        try:
            sock.recv(1 << 16, socket.MSG_DONTWAIT)   # unread bytes would turn the close into a reset
            if e.reply:
                sock.send(e.reply)
        except OSError:
            pass
        end_close(sock)   # a FIN, so that the client reads the refusal
        return
    except asyncio.TimeoutError:
        log.warning("%sSOCKS client %s: no complete request within %.0fs", label, peer_text(peer),
                    HANDSHAKE_TIMEOUT)
        reset_close(sock)
        return
    except OSError as e:
        log.info("%sSOCKS client %s: %s", label, peer_text(peer), e.strerror or e)
        reset_close(sock)
        return
    except asyncio.CancelledError:
        reset_close(sock)
        raise
    hand_over(request)
