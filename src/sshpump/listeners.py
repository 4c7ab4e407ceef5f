"""Local listening sockets for -L forwards: TCP (dual-stack) and unix."""

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
            os.unlink(path)  # stale: nobody is listening on it
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
        raise ForwardError(f"cannot listen on {path}: {e.strerror}") from None
    finally:
        os.umask(old)
    return sock


def _tcp_listeners(host: str | None, port: int) -> list[socket.socket]:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise ForwardError(f"cannot listen on {host}:{port}: {e.strerror}") from None
    socks = []
    seen = set()
    for family, type_, proto, _, addr in infos:
        if (family, addr[0]) in seen:
            continue
        seen.add((family, addr[0]))
        sock = socket.socket(family, type_, proto)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            if port == 0 and socks:
                addr = (addr[0], socks[0].getsockname()[1]) + tuple(addr[2:])
            sock.bind(addr)
        except OSError as e:
            sock.close()
            if e.errno == errno.EADDRNOTAVAIL and len(infos) > 1:
                continue  # e.g. ::1 on a host without IPv6
            for s in socks:
                s.close()
            where = f"[{addr[0]}]:{addr[1]}" if family == socket.AF_INET6 else f"{addr[0]}:{addr[1]}"
            raise ForwardError(f"cannot listen on {where}: {e.strerror}") from None
        socks.append(sock)
    if not socks:
        raise ForwardError(f"cannot listen on {host}:{port}: no usable address")
    return socks


def open_listeners(fwd: LocalForward, gateway_ports: bool = False, backlog: int = 4096) -> list[socket.socket]:
    """Bind and listen for one forward; sockets are non-blocking."""
    if fwd.listen.is_unix:
        socks = [_unix_listener(fwd.listen.path)]
    else:
        host = fwd.listen.host
        if host is None:
            host = None if gateway_ports else "localhost"
        elif host == "":
            host = None  # "*" or empty: every interface
        socks = _tcp_listeners(host, fwd.listen.port)
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
