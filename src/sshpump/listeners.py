"""Local listening sockets for -L forwards: TCP (both loopbacks, or dual-stack) and unix."""

from __future__ import annotations

import errno
import os
import socket
import stat

from .errors import ForwardError
from .spec import LocalForward


def _unix_listener(path: str) -> socket.socket:
    if os.path.lexists(path):
        st = os.lstat(path)
        if not stat.S_ISSOCK(st.st_mode):
            raise ForwardError(f"cannot listen on {path}: exists and is not a socket")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(path)
        except OSError:
            try:
                os.unlink(path)  # stale: nobody is listening on it
            except OSError as e:
                raise ForwardError(f"cannot listen on {path}: stale socket file: {e.strerror or e}") from None
        else:
            raise ForwardError(f"cannot listen on {path}: another process is listening on it")
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)  # born 0600: no window where others may connect
    try:
        sock.bind(path)
    except OSError as e:
        sock.close()
        raise ForwardError(f"cannot listen on {path}: {e.strerror or e}") from None
    finally:
        os.umask(old)
    return sock


# Without a bind address ssh -L listens on both loopbacks (getaddrinfo with
# no name); asking for "localhost" would depend on /etc/hosts, which often
# lacks "::1 localhost".
LOOPBACK = [(socket.AF_INET, ("127.0.0.1", 0)), (socket.AF_INET6, ("::1", 0, 0, 0))]
PORT_ZERO_ATTEMPTS = 20   # port 0: the IPv6 twin of a picked port may be taken; pick again


class _TwinPortTaken(Exception):
    """Port 0: the port picked for the first address is in use on another one."""


def _where(family, addr) -> str:
    return f"[{addr[0]}]:{addr[1]}" if family == socket.AF_INET6 else f"{addr[0]}:{addr[1]}"


def _bind_all(addrs, port: int) -> list[socket.socket]:
    socks = []
    for family, addr in addrs:
        if port == 0 and socks:
            addr = (addr[0], socks[0].getsockname()[1]) + tuple(addr[2:])  # one port for all
        else:
            addr = (addr[0], port) + tuple(addr[2:])
        try:
            sock = socket.socket(family, socket.SOCK_STREAM)
        except OSError as e:
            if e.errno == errno.EAFNOSUPPORT and len(addrs) > 1:
                continue  # no IPv6 in this kernel
            for s in socks:
                s.close()
            raise ForwardError(f"cannot listen on {_where(family, addr)}: {e.strerror or e}") from None
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(addr)
        except OSError as e:
            sock.close()
            if e.errno == errno.EADDRNOTAVAIL and len(addrs) > 1:
                continue  # e.g. ::1 on a host without IPv6
            for s in socks:
                s.close()
            if e.errno == errno.EADDRINUSE and port == 0 and socks:
                raise _TwinPortTaken() from None
            raise ForwardError(f"cannot listen on {_where(family, addr)}: {e.strerror or e}") from None
        socks.append(sock)
    return socks


def _tcp_listeners(host: str | None, port: int, loopback: bool = False) -> list[socket.socket]:
    if loopback:
        addrs = LOOPBACK
    else:
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        except (socket.gaierror, UnicodeError) as e:  # UnicodeError: IDNA refused the name
            raise ForwardError(f"cannot listen on {host}:{port}: {getattr(e, 'strerror', None) or e}") from None
        addrs = list(dict.fromkeys((family, addr) for family, _, _, _, addr in infos))
    label = "localhost" if loopback else host or "*"
    for _ in range(PORT_ZERO_ATTEMPTS):
        try:
            socks = _bind_all(addrs, port)
        except _TwinPortTaken:
            continue
        if not socks:
            raise ForwardError(f"cannot listen on {label}:{port}: no usable address")
        return socks
    raise ForwardError(f"cannot listen on {label}:0: no port free on every address")


def open_listeners(fwd: LocalForward, gateway_ports: bool = False, backlog: int = 4096) -> list[socket.socket]:
    """Bind and listen for one forward; sockets are non-blocking."""
    if fwd.listen.is_unix:
        socks = [_unix_listener(fwd.listen.path)]
    else:
        host = fwd.listen.host
        if host is None and not gateway_ports:
            socks = _tcp_listeners(None, fwd.listen.port, loopback=True)
        else:
            # None (-g, no bind address), "" or "*": every interface.
            socks = _tcp_listeners(host or None, fwd.listen.port)
    for s in socks:
        s.listen(backlog)
        s.setblocking(False)
    return socks


def listener_address(sock: socket.socket):
    """(host, port) for TCP, the path for unix."""
    name = sock.getsockname()
    return name if isinstance(name, str) else tuple(name[:2])


def close_listener(sock: socket.socket) -> None:
    path = None
    if sock.family == socket.AF_UNIX:
        path = sock.getsockname()
    sock.close()
    if path:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
