"""The control socket inside a running sshpump: a unix socket (mode 0600,
owner's uid checked with SO_PEERCRED) serving JSON lines (protocol.py) to a
handler ``async (cmd, args) -> result``. Each client has its own task; one
bad client, request or handler bug never stops the others or the server."""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import socket
import stat
import struct

from ..errors import SshpumpError, UsageError
from .protocol import MAX_LINE, ControlError, InternalError, decode_request, encode_error, encode_ok

log = logging.getLogger("sshpump")

UNIX_PATH_MAX = 107        # sun_path holds 108 bytes with the NUL
_UCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


def _probe_listening(path: str) -> bool:
    """Is a process accepting on this socket file? Non-blocking, so a live
    listener with a full backlog answers EAGAIN at once instead of stalling
    the event loop: it counts as listening."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.setblocking(False)
    try:
        probe.connect(path)
    except (BlockingIOError, InterruptedError):
        return True
    except OSError as e:
        if e.errno in (errno.ECONNREFUSED, errno.ENOENT):
            return False
        raise ControlError(f"cannot listen on {path}: {e.strerror or e}") from None
    finally:
        probe.close()
    return True


def bind_control_socket(path: str) -> socket.socket:
    """A listening unix socket at path, born 0600. A stale socket file (no
    listener) is replaced; a live one, or a path that is not a socket, is
    refused."""
    if len(os.fsencode(path)) > UNIX_PATH_MAX:
        raise ControlError(f"cannot listen on {path}: path longer than {UNIX_PATH_MAX} bytes")
    if os.path.lexists(path):
        if not stat.S_ISSOCK(os.lstat(path).st_mode):
            raise ControlError(f"cannot listen on {path}: exists and is not a socket")
        if _probe_listening(path):
            raise ControlError(f"cannot listen on {path}: another process is listening on it")
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        except OSError as e:
            raise ControlError(f"cannot listen on {path}: stale socket file: {e.strerror or e}") from None
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)  # born 0600: no window in which others may connect
    try:
        sock.bind(path)
        sock.listen(128)
    except OSError as e:
        sock.close()
        raise ControlError(f"cannot listen on {path}: {e.strerror or e}") from None
    finally:
        os.umask(old)
    sock.setblocking(False)
    return sock


def peer_uid(writer: asyncio.StreamWriter) -> int:
    sock = writer.get_extra_info("socket")
    _pid, uid, _gid = _UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))
    return uid


class ControlServer:
    """``await start()``, ``await close()``. ``handler(cmd, args)`` raises
    SshpumpError subclasses for failures; anything else is a bug, logged
    with its traceback and answered as InternalError (code 1)."""

    def __init__(self, path: str, handler, *, idle_timeout: float = 60.0):
        self.path = path
        self.handler = handler
        self.idle_timeout = idle_timeout
        self._server: asyncio.AbstractServer | None = None
        self._clients: dict[asyncio.Task, asyncio.StreamWriter] = {}
        self._inode = None      # (st_dev, st_ino) of our socket file: unlink only ours
        self._closed = False

    async def start(self) -> None:
        sock = bind_control_socket(self.path)
        try:
            st = os.stat(self.path)
            self._inode = (st.st_dev, st.st_ino)
            # limit: readline refuses a line longer than MAX_LINE (newline excluded).
            self._server = await asyncio.start_unix_server(self._serve, sock=sock, limit=MAX_LINE)
        except BaseException:
            sock.close()
            self._unlink()
            raise

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._server is not None:
            self._server.close()
        self._unlink()
        me = asyncio.current_task()   # close() may run inside a handler: do not cancel ourselves
        tasks = [t for t in self._clients if t is not me]
        for t in tasks:
            self._clients[t].close()
            t.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        # From inside a handler, wait_closed (3.12+: waits for every
        # connection) would wait for ourselves.
        if self._server is not None and me not in self._clients:
            await self._server.wait_closed()

    def _unlink(self) -> None:
        # A newer sshpump may have replaced the file since: leave that one alone.
        try:
            st = os.lstat(self.path)
            if (st.st_dev, st.st_ino) == self._inode:
                os.unlink(self.path)
        except OSError:
            pass

    @property
    def client_count(self) -> int:
        return len(self._clients)

    # ---- one client ------------------------------------------------------

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        self._clients[task] = writer
        try:
            if self._closed:
                return
            if not await self._peer_allowed(writer):
                return
            # A handler may close the server (stop): its own answer still goes out, then the end.
            while await self._one_request(reader, writer) and not self._closed:
                pass
        except asyncio.CancelledError:
            pass   # close(): the connection goes with the server
        except (ConnectionError, asyncio.TimeoutError):
            pass   # the client went away, or stopped reading its answers
        except Exception:
            log.error("control socket: client connection failed", exc_info=True)
        finally:
            self._clients.pop(task, None)
            writer.close()

    async def _peer_allowed(self, writer) -> bool:
        owner = os.getuid()
        try:
            uid = peer_uid(writer)
        except OSError as e:
            await self._send(writer, encode_error(ControlError(f"permission denied: peer unknown: {e.strerror or e}")))
            return False
        if uid == owner or uid == 0:
            return True
        log.warning("control socket: refused a client with uid %d (owner uid %d)", uid, owner)
        await self._send(writer, encode_error(
            ControlError(f"permission denied: uid {uid} is not the owner (uid {owner})")))
        return False

    async def _one_request(self, reader, writer) -> bool:
        """Read, run and answer one request; False when the connection ends."""
        try:
            line = await asyncio.wait_for(reader.readline(), self.idle_timeout)
        except asyncio.TimeoutError:
            log.debug("control socket: closing a client idle for %g s", self.idle_timeout)
            return False
        except ValueError:   # longer than MAX_LINE: the rest of it cannot be framed, so close
            await self._send(writer, encode_error(UsageError(f"request line longer than {MAX_LINE} bytes")))
            return False
        if not line:
            return False
        last = not line.endswith(b"\n")   # a final line without newline is still answered
        if line.strip():
            await self._send(writer, await self._answer(line))
        return not last

    async def _answer(self, line: bytes) -> bytes:
        try:
            cmd, args = decode_request(line)
        except UsageError as e:
            return encode_error(e)
        try:
            result = await self.handler(cmd, args)
            return encode_ok(result)
        except SshpumpError as e:
            return encode_error(e)
        except asyncio.CancelledError:
            raise
        except Exception as e:
            log.error("control socket: command %r failed", cmd, exc_info=True)
            return encode_error(InternalError(f"internal error in {cmd!r}: {type(e).__name__}: {e}"))

    async def _send(self, writer, data: bytes) -> None:
        writer.write(data)
        # A client that never reads would hold this task forever: bound it.
        await asyncio.wait_for(writer.drain(), self.idle_timeout)
