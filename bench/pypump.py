"""Pure-Python ``ssh -L`` over ssh2-python: the baseline that shows what the C pump buys.

``python -m bench.pypump --port SSHPORT --user U --key K --known-hosts F --target H:P ...``

One libssh2 session in non-blocking mode, one ``direct-tcpip`` channel per accepted
connection, one epoll loop, 64 KiB reads, no C of our own.  Honest but simple:
backpressure (a pending write stops reads on the other side), exact half-close,
one channel open in flight at a time.  Every loop iteration tries to read every
open channel (libssh2 buffers packets for all channels when any one is read), so
cost grows with the number of open channels: that is part of what it measures.
"""
from __future__ import annotations

import collections
import os
import select
import signal
import socket
import sys

from ssh2.error_codes import LIBSSH2_ERROR_EAGAIN
from ssh2.session import LIBSSH2_METHOD_CRYPT_CS, LIBSSH2_METHOD_CRYPT_SC, Session

try:
    from . import _runner_common as rc
except ImportError:  # run as a script
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import _runner_common as rc  # type: ignore

CHUNK = 65536
EAGAIN = LIBSSH2_ERROR_EAGAIN


class Conn:
    __slots__ = ("sock", "fd", "target", "chan", "to_chan", "to_client", "client_eof",
                 "eof_sent", "chan_eof", "wr_shut", "mask")

    def __init__(self, sock, target):
        self.sock, self.fd, self.target = sock, sock.fileno(), target
        self.chan = None
        self.to_chan = b""      # bytes read from the client not yet taken by the channel
        self.to_client = b""    # bytes read from the channel not yet sent to the client
        self.client_eof = self.eof_sent = self.chan_eof = self.wr_shut = False
        self.mask = 0


class Pump:
    def __init__(self, args):
        self.args = args
        s = socket.create_connection((args.host, args.port))
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.ssock = s
        sess = Session()
        sess.method_pref(LIBSSH2_METHOD_CRYPT_CS, args.cipher)
        sess.method_pref(LIBSSH2_METHOD_CRYPT_SC, args.cipher)
        sess.handshake(s)
        sess.userauth_publickey_fromfile(args.user, args.key)
        sess.set_blocking(False)
        self.sess = sess
        self.ep = select.epoll()
        self.ep.register(s.fileno(), select.EPOLLIN)
        self.listeners = {}
        listen = []
        for t in args.targets:
            ls = socket.socket()
            ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            ls.bind(("127.0.0.1", 0))
            ls.listen(4096)
            ls.setblocking(False)
            self.listeners[ls.fileno()] = (ls, t)
            self.ep.register(ls.fileno(), select.EPOLLIN)
            listen.append(ls.getsockname())
        self.conns: dict[int, Conn] = {}
        self.open_q: collections.deque[Conn] = collections.deque()
        self.sess_wants_out = False
        self.running = True
        self.more = False
        self.listen = listen

    # -- helpers -----------------------------------------------------------
    def _want(self, c: Conn):
        m = 0
        if c.chan is not None and not c.client_eof and not c.to_chan:
            m |= select.EPOLLIN
        if c.to_client:
            m |= select.EPOLLOUT
        if m != c.mask:
            if c.mask == 0:
                self.ep.register(c.fd, m)
            elif m == 0:
                self.ep.unregister(c.fd)
            else:
                self.ep.modify(c.fd, m)
            c.mask = m

    def _drop(self, c: Conn):
        if c.mask:
            self.ep.unregister(c.fd)
            c.mask = 0
        self.conns.pop(c.fd, None)
        try:
            c.sock.close()
        except OSError:
            pass
        if c.chan is not None:
            ch, c.chan = c.chan, None
            self.closing.append(ch)

    # -- the loop ----------------------------------------------------------
    def run(self):
        self.closing = []
        stdin_fd = sys.stdin.fileno()
        self.ep.register(stdin_fd, select.EPOLLIN)
        while self.running:
            busy = self.more or self.open_q or self.sess_wants_out or self.closing or any(
                c.to_chan or (c.client_eof and not c.eof_sent) for c in self.conns.values())
            events = self.ep.poll(0.002 if busy else 0.5)
            for fd, ev in events:
                if fd in self.listeners:
                    ls, t = self.listeners[fd]
                    for _ in range(256):
                        try:
                            cs, _a = ls.accept()
                        except BlockingIOError:
                            break
                        cs.setblocking(False)
                        cs.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                        c = Conn(cs, t)
                        self.conns[c.fd] = c
                        self.open_q.append(c)
                elif fd == stdin_fd:
                    if not os.read(stdin_fd, 4096):
                        self.running = False
                elif fd == self.ssock.fileno():
                    pass
                else:
                    c = self.conns.get(fd)
                    if c is None:
                        continue
                    if ev & (select.EPOLLIN | select.EPOLLHUP | select.EPOLLERR) and not c.to_chan \
                            and not c.client_eof and c.chan is not None:
                        try:
                            d = c.sock.recv(CHUNK)
                        except BlockingIOError:
                            d = None
                        except OSError:
                            self._drop(c)
                            continue
                        if d == b"":
                            c.client_eof = True
                        elif d:
                            c.to_chan = d
                    if ev & select.EPOLLOUT and c.to_client:
                        if not self._send_client(c):
                            continue
            self._progress()

    def _send_client(self, c: Conn) -> bool:
        try:
            n = c.sock.send(c.to_client)
        except BlockingIOError:
            n = 0
        except OSError:
            self._drop(c)
            return False
        c.to_client = c.to_client[n:]
        return True

    def _progress(self):
        self.sess_wants_out = False
        self.more = False
        # channel opens: one in flight per session
        while self.open_q:
            c = self.open_q[0]
            if c.fd not in self.conns:
                self.open_q.popleft()
                continue
            h, p = c.target
            ch = self.sess.direct_tcpip_ex(h, p, "127.0.0.1", 0)
            if ch == EAGAIN:
                self.sess_wants_out = True
                break
            self.open_q.popleft()
            if not ch or isinstance(ch, int):
                self._drop(c)
                continue
            c.chan = ch
            self._want(c)
        # closes
        still = []
        for ch in self.closing:
            if ch.close() == EAGAIN:
                still.append(ch)
        self.closing = still
        for c in list(self.conns.values()):
            ch = c.chan
            if ch is None:
                continue
            # client -> channel
            while c.to_chan:
                # ssh2-python returns (rc, bytes_written): after EAGAIN, bytes_written
                # may still be > 0 (it loops internally) -- count them, never resend.
                rc_, n = ch.write(c.to_chan)
                if n > 0:
                    c.to_chan = c.to_chan[n:]
                if rc_ == EAGAIN or n == 0:
                    self.sess_wants_out = True
                    break
                if rc_ < 0:
                    self._drop(c)
                    break
            if c.chan is None:
                continue
            if c.client_eof and not c.to_chan and not c.eof_sent:
                r = ch.send_eof()
                if r == EAGAIN:
                    self.sess_wants_out = True
                else:
                    c.eof_sent = True
            # channel -> client
            for _ in range(8):
                if c.to_client or c.chan_eof:
                    break
                size, data = ch.read(CHUNK)
                if size > 0:
                    self.more = True   # libssh2 may hold more (for this or other channels)
                if size == EAGAIN:
                    break
                if size < 0:
                    self._drop(c)
                    break
                if size == 0:
                    if ch.eof():
                        c.chan_eof = True
                    break
                c.to_client = data
                if not self._send_client(c):
                    break
            if c.fd not in self.conns:
                continue
            if c.chan_eof and not c.to_client and not c.wr_shut:
                try:
                    c.sock.shutdown(socket.SHUT_WR)
                except OSError:
                    pass
                c.wr_shut = True
            if c.wr_shut and c.eof_sent:
                self._drop(c)
                continue
            self._want(c)
        m = select.EPOLLIN | (select.EPOLLOUT if self.sess_wants_out else 0)
        self.ep.modify(self.ssock.fileno(), m)


def main():
    rc.raise_nofile()
    args = rc.parse("python -m bench.pypump")
    signal.signal(signal.SIGTERM, lambda *a: os._exit(0))
    p = Pump(args)
    rc.report(p.listen, args.cipher)
    p.run()
    os._exit(0)


if __name__ == "__main__":
    main()
