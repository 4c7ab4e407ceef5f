"""Master <-> worker control channel: SOCK_SEQPACKET messages, fds by SCM_RIGHTS.

One message is one datagram, so framing is free. Kinds:
  master -> worker: CONFIG (pickled Options, sent once), CLIENT (forward
  index + peer, with the client fd attached), DRAIN (grace seconds).
  worker -> master: JSON status: up, down, fatal, done (n connections
  ended), opens (how long its oldest queued open has waited, the median of
  its recent opens), draining (it got SIGTERM/SIGINT itself).
"""

from __future__ import annotations

import json
import pickle
import socket
import struct

CONFIG = b"O"
CLIENT = b"C"
DRAIN = b"D"
MAX_MESSAGE = 1 << 16


def pair():
    return socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)


def send_config(sock, obj) -> None:
    sock.sendall(CONFIG + pickle.dumps(obj))


def recv_config(sock):
    data = sock.recv(1 << 20)
    if not data.startswith(CONFIG):
        raise RuntimeError("worker: expected configuration from master")
    return pickle.loads(data[1:])


def send_client(sock, fd: int, fwd_index: int, peer) -> None:
    """Raises BlockingIOError when the worker's queue is full."""
    body = CLIENT + struct.pack("!I", fwd_index) + json.dumps(list(peer) if isinstance(peer, tuple) else peer).encode()
    socket.send_fds(sock, [body], [fd])


def send_drain(sock, grace: float) -> None:
    sock.send(DRAIN + struct.pack("!d", grace))


def recv_master(sock):
    """One message from the master: (kind, payload, fd or None); kind None at EOF."""
    data, fds, _flags, _addr = socket.recv_fds(sock, MAX_MESSAGE, 4)
    if not data:
        for fd in fds:
            socket.close(fd)
        return None, None, None
    kind = data[:1]
    if kind == CLIENT:
        idx = struct.unpack("!I", data[1:5])[0]
        peer = json.loads(data[5:])
        peer = tuple(peer) if isinstance(peer, list) else peer
        for extra in fds[1:]:
            socket.close(extra)
        return kind, (idx, peer), (fds[0] if fds else None)
    for fd in fds:
        socket.close(fd)
    if kind == DRAIN:
        return kind, struct.unpack("!d", data[1:9])[0], None
    return kind, data[1:], None


def send_status(sock, **msg) -> None:
    sock.send(json.dumps(msg).encode())


def recv_status(sock):
    """A status dict, or None at EOF (the worker is gone)."""
    data = sock.recv(MAX_MESSAGE)
    if not data:
        return None
    return json.loads(data)
