"""Closing a client connection that sshpump had to cut, and noticing one that is gone.

A cut must look cut: closed with SO_LINGER 0, a TCP client sees a reset
(ECONNRESET), not the FIN of a normal end, so it cannot mistake a truncated
response for a complete one. The C pump does the same for the connections it
carries (pump.c client_reset); this is for clients still queued in Python
(no worker, failed channel open, shutdown)."""

from __future__ import annotations

import socket
import struct

_LINGER_RESET = struct.pack("ii", 1, 0)


def arm_reset(sock: socket.socket) -> None:
    """Make every close of sock a reset until the pump disarms it after a
    normal end (pump.c conn_finish). Set by the master on accept: a worker
    killed with SIGKILL (or dying any other way) then resets its clients
    when the kernel closes its fds, instead of ending them with a FIN that
    looks like a complete response."""
    try:
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
    except OSError:
        pass


def end_close(sock: socket.socket) -> None:
    """Close sock with a normal end (FIN), disarming arm_reset: for a client
    that was answered (a SOCKS refusal) and must get to read the answer."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 0, 0))
    except OSError:
        pass
    sock.close()


def reset_close(sock: socket.socket) -> None:
    """Close sock so that its peer sees a reset."""
    arm_reset(sock)
    sock.close()


def client_gone(sock: socket.socket) -> bool:
    """True when the client reset its connection (or it failed) while it
    waited. A FIN alone is not gone: a client may send its request and
    half-close before the channel opens, and still want the answer."""
    try:
        sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
    except (BlockingIOError, InterruptedError):
        return False
    except OSError:
        return True
    return False
