"""Master <-> worker messages: SOCK_SEQPACKET datagrams, fds by SCM_RIGHTS.

One message is one datagram, so framing is free. The first one (master ->
worker) is the pickled configuration (options with secrets: never on argv or
in the environment). Every other message is a JSON object whose "t" names
its type; a client's fd rides along its CLIENT message.

master -> worker
  client  {conn, route, peer, at} + fd   carry this client (conn: its number, unique in the process run;
                                     at: the master's time.monotonic() at accept, for open latency)
  drain   {grace}                    finish what you carry within grace seconds, then exit
  retire  {route, grace}             a forward was removed: its connections get grace seconds
  query   {id}                       answer with a report (connections and pump stats)
worker -> master
  up / down {reason}                 the session came up / went down
  fatal   {type, code, msg}          a boot error (authentication, host key): errors.error_to_wire
  counts  {done: {route: n}, resolved: n, [m], [rtt], [buf]}   connections ended (per forward), opens
                                     resolved; metrics since the last one (obs.tally.Tally.take: per
                                     route opened/closed by reason/bytes/failed opens/latency buckets,
                                     keepalive round trip, pump buffered bytes); once per loop turn
  opens   {wait, lat}                how its channel opens fare (dispatch.OpenHealth)
  draining {reason}                  it got SIGTERM/SIGINT itself
  report  {id, conns, pump}          the answer to a query
"""

from __future__ import annotations

import json
import pickle
import socket

MAX_MESSAGE = 1 << 16
CONFIG = b"O"


def pair():
    return socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)


def send_config(sock, obj) -> None:
    sock.sendall(CONFIG + pickle.dumps(obj))


def recv_config(sock):
    data = sock.recv(1 << 20)
    if not data.startswith(CONFIG):
        raise RuntimeError("worker: expected configuration from master")
    return pickle.loads(data[1:])


def send(sock, t: str, fd: int | None = None, **fields) -> None:
    """One message; raises BlockingIOError when the peer's queue is full."""
    body = json.dumps({"t": t, **fields}, separators=(",", ":")).encode()
    if fd is None:
        sock.send(body)
    else:
        socket.send_fds(sock, [body], [fd])


def recv(sock):
    """(message dict, fd or None); (None, None) at EOF (the peer is gone).
    Raises BlockingIOError when nothing is waiting."""
    data, fds, _flags, _addr = socket.recv_fds(sock, MAX_MESSAGE, 4)
    if not data:
        for fd in fds:
            socket.close(fd)
        return None, None
    for extra in fds[1:]:
        socket.close(extra)
    return json.loads(data), (fds[0] if fds else None)
