"""The remote end of --mux: one process on the SSH server, started through an
``exec`` channel, that carries many TCP/unix connections as streams of one
byte stream (its stdin and stdout, i.e. the channel).

Python 3 standard library only, one file: the worker ships it compressed in
the exec command (``python3 -c ...``), so nothing is installed on the server
and no code is ever read from stdin (a buffered stdin would swallow frames).

Wire format (both ways), after the agent's hello line ``SSHPUMP-MUX 1``:
a 12-byte header ``!BBHII`` -- version, type, flags, stream id, length --
then ``length`` payload bytes for OPEN, OPEN_FAIL and DATA. For WINDOW,
PING, PONG and GOAWAY the length field is the value and there is no payload.

  OPEN       client -> agent; payload b"t" + port(u16) + host, or b"u" + path.
             DATA and EOF may follow at once (pipelined opens).
  OPEN_OK    agent -> client: the target accepted the connection.
  OPEN_FAIL  agent -> client; payload reason(u8, the SSH open-failure codes)
             + errno(u32) + text. The stream is gone on both sides.
  DATA       payload bytes; never more than the receiver's credit.
  WINDOW     credit: the receiver delivered this many bytes to its socket.
  EOF        the sender will send no more DATA on this stream (half-close).
  CLOSE      agent -> client: both directions ended and the target socket
             is closed; the stream is gone.
  RESET      either way: the stream was cut; the receiver resets its socket.
  PING/PONG  liveness; PONG echoes PING's value.
  GOAWAY     client -> agent: exit now.

Each stream starts with INITIAL_WINDOW of credit in each direction. Credit
comes back only once bytes reached the destination socket, so a slow target
or client stalls only its own stream, and the agent never holds more than
the windows of its streams. Control frames are written before DATA, and
DATA is read from the targets round robin, one chunk per stream per turn.

Target sockets are watched edge-triggered (registered once, removed by
close): per connection the agent makes no epoll calls beyond that, which is
most of its cost under connection churn.
"""

import collections
import errno
import os
import queue
import select
import socket
import struct
import sys
import threading

VERSION = 1
HELLO = b"SSHPUMP-MUX %d\n" % VERSION
HEADER = struct.Struct("!BBHII")
(OPEN, OPEN_OK, OPEN_FAIL, DATA, WINDOW, EOF, CLOSE, RESET, PING, PONG,
 GOAWAY) = range(1, 12)
INITIAL_WINDOW = 1 << 20
CHUNK = 32768            # DATA payload per frame read from a target
OUT_HIGH = 256 << 10     # stop reading targets while this much waits for stdout
IN_READ = 256 << 10      # stdin read size
# SSH_OPEN_* reason codes (RFC 4254), so open failures read as channel ones.
PROHIBITED, CONNECT_FAILED, UNKNOWN_TYPE, RESOURCE_SHORTAGE = 1, 2, 3, 4
RESOLVERS = 4


def frame(kind, sid, value=0, payload=b""):
    """One frame; with a payload, the length field is its length."""
    return HEADER.pack(VERSION, kind, 0, sid, len(payload) if payload else value) + payload


class ProtocolError(Exception):
    pass


EPOLLIN, EPOLLOUT = select.EPOLLIN, select.EPOLLOUT
READABLE = select.EPOLLIN | select.EPOLLRDHUP | select.EPOLLHUP | select.EPOLLERR
WRITABLE = select.EPOLLOUT | select.EPOLLHUP | select.EPOLLERR
TARGET_EVENTS = select.EPOLLIN | select.EPOLLOUT | select.EPOLLRDHUP | select.EPOLLET


class Stream:
    __slots__ = ("sid", "sock", "fd", "addrs", "connected", "credit", "to_target",
                 "delivered", "eof_in", "shut_wr", "eof_out", "rd_ready",
                 "wr_ready", "listed")

    def __init__(self, sid):
        self.sid = sid
        self.sock = None
        self.addrs = []          # remaining addresses to try
        self.connected = False
        self.credit = INITIAL_WINDOW   # bytes we may send the client
        self.to_target = bytearray()   # client bytes not yet written to the target
        self.delivered = 0       # written to the target, not yet credited back
        self.eof_in = False      # the client sent EOF
        self.shut_wr = False     # ... and the target has been told
        self.eof_out = False     # the target sent EOF, passed on
        self.rd_ready = False    # the target socket may have bytes (edge seen, no EAGAIN since)
        self.wr_ready = False    # ... may take bytes
        self.listed = False      # in Agent.ready
        self.fd = -1


class Agent:
    def __init__(self, fd_in, fd_out):
        self.fd_in, self.fd_out = fd_in, fd_out
        os.set_blocking(fd_in, False)
        os.set_blocking(fd_out, False)
        for fd in (fd_in, fd_out):
            try:   # F_SETPIPE_SZ: only pipes have it; sockets keep their buffers
                import fcntl
                fcntl.fcntl(fd, 1031, 1 << 20)
            except (ImportError, OSError):
                pass
        self.ep = select.epoll()
        self.ep.register(fd_in, EPOLLIN)
        self.out_registered = False
        self.streams = {}
        self.by_fd = {}            # target fd -> Stream
        # Frames from the client in inbuf[:ilen]; fixed size: room for a read
        # behind the largest partial frame.
        self.inbuf = bytearray(IN_READ + INITIAL_WINDOW + HEADER.size)
        self.ilen = 0
        self.ctl = []              # control frames, written before any DATA
        self.outq = collections.deque()   # buffers for stdout, written with writev (no joining)
        self.queued = 0            # their total length
        self.ready = []            # streams whose target may be readable, in turn
        self.running = True
        self.resolved = []         # (sid, addrs or OSError) from resolver threads
        self.lock = threading.Lock()
        self.wake_r, self.wake_w = os.pipe()
        os.set_blocking(self.wake_r, False)
        self.ep.register(self.wake_r, EPOLLIN)
        self.lookups = queue.Queue()
        for _ in range(RESOLVERS):
            threading.Thread(target=self._resolver, daemon=True).start()

    # ---- names, off the loop ------------------------------------------------

    def _resolver(self):
        while True:
            sid, host, port = self.lookups.get()
            try:
                result = socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM)
            except OSError as e:
                result = e
            with self.lock:
                self.resolved.append((sid, result))
            os.write(self.wake_w, b"x")

    def _take_resolved(self):
        try:
            os.read(self.wake_r, 4096)
        except BlockingIOError:
            pass
        with self.lock:
            done, self.resolved = self.resolved, []
        for sid, result in done:
            s = self.streams.get(sid)
            if s is None:
                continue   # reset while it was being looked up
            if isinstance(result, OSError):
                self._fail(s, CONNECT_FAILED, 0, "cannot resolve: %s" % (result.strerror or result))
                continue
            s.addrs = [(fam, addr) for fam, _t, _p, _c, addr in result]
            self._connect_next(s, 0)

    # ---- opening ------------------------------------------------------------

    def _open(self, sid, payload):
        if sid in self.streams:
            raise ProtocolError("OPEN for stream %d, already open" % sid)
        s = self.streams[sid] = Stream(sid)
        kind = payload[:1]
        if kind == b"u":
            s.addrs = [(socket.AF_UNIX, payload[1:].decode("utf-8", "surrogateescape"))]
            self._connect_next(s, 0)
        elif kind == b"t" and len(payload) > 3:
            port = struct.unpack("!H", payload[1:3])[0]
            host = payload[3:].decode("utf-8", "surrogateescape")
            numeric = None
            for fam in (socket.AF_INET, socket.AF_INET6):
                try:
                    socket.inet_pton(fam, host)
                    numeric = fam
                    break
                except OSError:
                    pass
            if numeric is not None:
                s.addrs = [(numeric, (host, port))]
                self._connect_next(s, 0)
            else:
                self.lookups.put((sid, host, port))
        else:
            self._fail(s, UNKNOWN_TYPE, 0, "unknown target kind")

    def _connect_next(self, s, last_errno):
        if s.sock is not None:
            self.by_fd.pop(s.fd, None)
            s.sock.close()   # also leaves the epoll set
            s.sock = None
        if not s.addrs:
            self._fail(s, CONNECT_FAILED, last_errno, os.strerror(last_errno) if last_errno else "no address")
            return
        fam, addr = s.addrs.pop(0)
        try:
            sock = socket.socket(fam, socket.SOCK_STREAM)
        except OSError as e:
            self._fail(s, RESOURCE_SHORTAGE, e.errno or 0, str(e))
            return
        sock.setblocking(False)
        if fam != socket.AF_UNIX:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.sock = sock
        s.fd = sock.fileno()
        err = sock.connect_ex(addr)
        if err in (0, errno.EINPROGRESS, errno.EAGAIN):
            self.by_fd[s.fd] = s
            self.ep.register(s.fd, TARGET_EVENTS)
        else:
            self._connect_next(s, err)

    def _connected(self, s):
        err = s.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            self._connect_next(s, err)
            return
        try:
            s.sock.getpeername()
        except OSError:
            return   # not connected yet (an event meant for an earlier socket of this fd)
        s.connected = True
        s.addrs = []
        self.ctl.append(frame(OPEN_OK, s.sid, 0))
        s.rd_ready = s.wr_ready = True
        self._list(s)
        self._flush_target(s)

    def _fail(self, s, reason, err, text):
        self.ctl.append(frame(OPEN_FAIL, s.sid, 0, struct.pack("!BI", reason, err) + text.encode()[:200]))
        self._forget(s, reset=True)

    # ---- streams ------------------------------------------------------------

    def _forget(self, s, reset):
        self.streams.pop(s.sid, None)
        if s.sock is not None:
            self.by_fd.pop(s.fd, None)
            if reset:
                s.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            s.sock.close()
            s.sock = None
        s.rd_ready = False

    def _cut(self, s):
        """The target failed: the client's end is reset too."""
        self.ctl.append(frame(RESET, s.sid, 0))
        self._forget(s, reset=True)

    def _maybe_done(self, s):
        if s.shut_wr and s.eof_out and s.sid in self.streams:
            self._forget(s, reset=False)
            self.ctl.append(frame(CLOSE, s.sid, 0))

    def _list(self, s):
        """s may have bytes for the client: give it a turn in _read_targets."""
        if not s.listed and s.rd_ready and s.credit > 0 and not s.eof_out and s.sock is not None:
            s.listed = True
            self.ready.append(s)

    def _flush_target(self, s):
        """Client bytes to the target; credit back what it took."""
        while s.to_target and s.wr_ready:
            try:
                n = s.sock.send(s.to_target)
            except (BlockingIOError, InterruptedError):
                s.wr_ready = False
                break
            except OSError:
                self._cut(s)
                return
            del s.to_target[:n]
            s.delivered += n
        # Credit goes back in quarters of the window: one WINDOW frame per
        # 256 KiB, not per DATA frame; the sender's credit never runs out
        # (at least 3/4 of it is back once everything is delivered).
        if s.delivered >= INITIAL_WINDOW // 4:
            self.ctl.append(frame(WINDOW, s.sid, s.delivered))
            s.delivered = 0
        if not s.to_target and s.eof_in and not s.shut_wr:
            try:
                s.sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass
            s.shut_wr = True
            self._maybe_done(s)

    def _read_targets(self):
        """DATA from targets, one chunk per stream per turn, while stdout keeps up."""
        while self.ready and self.queued < OUT_HIGH:
            turn, self.ready = self.ready, []
            for i, s in enumerate(turn):
                if self.queued >= OUT_HIGH:
                    self.ready.extend(turn[i:])   # still listed
                    break
                s.listed = False
                if not s.rd_ready or s.sock is None or s.credit <= 0 or s.eof_out:
                    continue   # a WINDOW or the next edge lists it again
                try:
                    data = s.sock.recv(min(CHUNK, s.credit))
                except (BlockingIOError, InterruptedError):
                    s.rd_ready = False
                    continue
                except OSError:
                    self._cut(s)
                    continue
                if data:
                    s.credit -= len(data)
                    self._flush_ctl()
                    self._queue(HEADER.pack(VERSION, DATA, 0, s.sid, len(data)))
                    self._queue(data)
                    self._list(s)
                else:
                    s.rd_ready = False
                    s.eof_out = True
                    self.ctl.append(frame(EOF, s.sid, 0))
                    self._maybe_done(s)

    # ---- the client's frames ------------------------------------------------

    def _frames(self):
        """Every complete frame in the input buffer; consecutive DATA frames
        of one stream go to its target in one sendmsg."""
        buf, have = self.inbuf, self.ilen
        pos = 0
        run_sid, spans = None, []
        while have - pos >= HEADER.size:
            ver, kind, _flags, sid, length = HEADER.unpack_from(buf, pos)
            if ver != VERSION:
                raise ProtocolError("frame version %d" % ver)
            has_payload = kind in (OPEN, OPEN_FAIL, DATA)
            end = pos + HEADER.size + (length if has_payload else 0)
            if has_payload and length > INITIAL_WINDOW:
                raise ProtocolError("frame of %d bytes" % length)
            if end > have:
                break
            if spans and (kind != DATA or sid != run_sid or len(spans) == 512):   # IOV_MAX is 1024
                self._data(run_sid, buf, spans)
                spans = []
            if kind == DATA:
                run_sid = sid
                spans.append((pos + HEADER.size, end))
            else:
                self._control(kind, sid, length, bytes(buf[pos + HEADER.size:end]) if kind == OPEN else None)
            pos = end
        if spans:
            self._data(run_sid, buf, spans)
        buf[:have - pos] = buf[pos:have]   # the partial frame to the front (same length: no resize)
        self.ilen = have - pos

    def _data(self, sid, buf, spans):
        s = self.streams.get(sid)
        if s is None:
            return   # reset or failed while this was in flight
        if s.eof_in:
            raise ProtocolError("DATA after EOF on stream %d" % sid)
        total = sum(b - a for a, b in spans)
        if len(s.to_target) + total > INITIAL_WINDOW:
            raise ProtocolError("stream %d sent beyond its window" % sid)
        with memoryview(buf) as view:
            n = 0
            if s.connected and not s.to_target and s.wr_ready:
                # Straight from the input buffer: only what the target does
                # not take now is copied.
                try:
                    n = s.sock.sendmsg([view[a:b] for a, b in spans])
                except (BlockingIOError, InterruptedError):
                    s.wr_ready = False
                except OSError:
                    self._cut(s)
                    return
                s.delivered += n
            for a, b in spans:
                if n >= b - a:
                    n -= b - a
                    continue
                s.to_target += view[a + n:b]
                n = 0
        if s.connected:
            self._flush_target(s)

    def _control(self, kind, sid, value, payload):
        if kind == OPEN:
            self._open(sid, payload)
            return
        if kind == PING:
            self.ctl.append(frame(PONG, sid, value))
            return
        if kind == GOAWAY:
            self.running = False
            return
        s = self.streams.get(sid)
        if s is None:
            return
        if kind == WINDOW:
            s.credit += value
            if s.connected:
                self._list(s)
        elif kind == EOF:
            s.eof_in = True
            if s.connected:
                self._flush_target(s)
        elif kind == RESET:
            self._forget(s, reset=True)
        else:
            raise ProtocolError("unexpected frame type %d" % kind)

    # ---- stdout -------------------------------------------------------------

    def _queue(self, b):
        self.outq.append(b)
        self.queued += len(b)

    def _flush_ctl(self):
        if self.ctl:
            self._queue(b"".join(self.ctl))
            self.ctl = []

    def _write_out(self):
        self._flush_ctl()
        q = self.outq
        while q:
            try:
                n = os.writev(self.fd_out, list(q)[:64] if len(q) > 64 else q)
            except (BlockingIOError, InterruptedError):
                break
            self.queued -= n
            while n:
                head = q[0]
                if n >= len(head):
                    n -= len(head)
                    q.popleft()
                else:
                    q[0] = memoryview(head)[n:]
                    n = 0
        want = bool(q)
        if want != self.out_registered:
            if want:
                self.ep.register(self.fd_out, EPOLLOUT)
            else:
                self.ep.unregister(self.fd_out)
            self.out_registered = want

    # ---- the loop -----------------------------------------------------------

    def run(self):
        os.write(self.fd_out, HELLO)
        while self.running:
            self._read_targets()
            self._write_out()
            busy = self.ready and self.queued < OUT_HIGH
            for fd, events in self.ep.poll(0 if busy else -1):
                s = self.by_fd.get(fd)
                if s is None:
                    if fd == self.fd_in:
                        self._read_in()
                    elif fd == self.wake_r:
                        self._take_resolved()
                    continue   # stdout writable: _write_out at the top
                if not s.connected:
                    if events & WRITABLE:
                        self._connected(s)
                    continue
                if events & WRITABLE:
                    s.wr_ready = True
                    if s.to_target or (s.eof_in and not s.shut_wr):
                        self._flush_target(s)
                if events & READABLE and s.sock is not None:
                    s.rd_ready = True
                    self._list(s)

    def _read_in(self):
        with memoryview(self.inbuf) as view:
            try:
                n = os.readv(self.fd_in, [view[self.ilen:self.ilen + IN_READ]])
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                n = 0   # a socket as stdin (tests) can be reset: the same end
        if not n:
            self.running = False   # the channel closed: nothing left to serve
            return
        self.ilen += n
        self._frames()


def raise_fd_limit():
    """One fd per stream: thousands of held connections need more than the
    usual soft limit of 1,024 (the hard limit is the account's to set)."""
    try:
        import resource
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft < hard:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ImportError, ValueError, OSError):
        pass


def main():
    raise_fd_limit()
    try:
        Agent(0, 1).run()
    except ProtocolError as e:
        sys.stderr.write("sshpump mux agent: protocol error: %s\n" % e)
        sys.stderr.flush()
        os._exit(2)
    os._exit(0)


if __name__ == "__main__":
    main()
