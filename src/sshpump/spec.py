"""Forward specifications, parsed exactly as ``ssh -L`` writes them."""

from __future__ import annotations

from dataclasses import dataclass

from . import validate
from .errors import SpecError, UsageError


@dataclass(frozen=True)
class Endpoint:
    """A TCP address (host, port) or a unix socket path."""

    host: str | None = None
    port: int | None = None
    path: str | None = None

    @property
    def is_unix(self) -> bool:
        return self.path is not None

    def __str__(self) -> str:
        if self.path is not None:
            return self.path
        host = f"[{self.host}]" if self.host and ":" in self.host else (self.host or "*")
        return f"{host}:{self.port}"


@dataclass(frozen=True)
class LocalForward:
    """``-L``: listen locally, connect from the server to ``target``.

    ``listen.host`` is None when no bind address was given (loopback unless
    gateway ports are enabled) and "" for "all interfaces" ("*" or empty).
    """

    listen: Endpoint
    target: Endpoint
    spec: str

    def __str__(self) -> str:
        return f"{self.listen} -> {self.target}"


@dataclass(frozen=True)
class DynamicForward:
    """``-D``: listen locally and speak SOCKS (4, 4a, 5); each connection's
    target is what its client asks for, resolved by the server."""

    listen: Endpoint
    spec: str
    target: None = None

    def __str__(self) -> str:
        return f"{self.listen} -> SOCKS"


@dataclass(frozen=True)
class RemoteForward:
    """``-R``: the server listens on ``listen`` (its address: ``host`` None
    when no bind address was given, sent as "localhost" as ssh sends it; ""
    for every interface) and each connection it forwards is connected from
    here to ``target``, a TCP address or a local unix socket."""

    listen: Endpoint
    target: Endpoint
    spec: str

    @property
    def bind_address(self) -> str:
        """What the tcpip-forward request names, as ssh(1) sends it."""
        return "localhost" if self.listen.host is None else self.listen.host

    def __str__(self) -> str:
        return f"remote {self.listen} -> {self.target}"


def _split(spec: str) -> list[str]:
    """Split on ':' outside square brackets, dropping the brackets."""
    parts, cur, depth = [], [], 0
    for ch in spec:
        if ch == "[":
            if depth:
                raise SpecError(f"bad forward spec {validate.show(spec)}: nested '['")
            depth = 1
        elif ch == "]":
            if not depth:
                raise SpecError(f"bad forward spec {validate.show(spec)}: unbalanced ']'")
            depth = 0
        elif ch == ":" and not depth:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    if depth:
        raise SpecError(f"bad forward spec {validate.show(spec)}: unbalanced '['")
    parts.append("".join(cur))
    return parts


def _checked(spec: str, check, text: str, what: str, **kw):
    """Run a validate check on one field; its error names the whole spec."""
    try:
        return check(text, what, **kw)
    except UsageError as e:
        raise SpecError(f"bad forward spec {validate.show(spec)}: {e}") from None


def _tcp_listen(spec: str, parts: list[str], what: str, *, bind_resolved_here: bool):
    """``[bind:]port`` at the head of a split -L or -R spec: (its Endpoint,
    the fields after it). The bind address is there when four fields
    follow, or three with a socket path last; "*" (or empty) is every
    interface ("")."""
    if len(parts) >= 4 or (len(parts) == 3 and parts[2].startswith("/")):
        bind, port, rest = parts[0], parts[1], parts[2:]
        bind = "" if bind == "*" else bind
        if bind:
            _checked(spec, validate.host, bind, "bind address", resolved_here=bind_resolved_here)
    else:
        bind, port, rest = None, parts[0], parts[1:]
    return Endpoint(host=bind, port=_checked(spec, validate.port, port, what, allow_zero=True)), rest


def parse_local_forward(spec: str) -> LocalForward:
    """Parse one ``-L`` argument.

    Accepted, as in ssh(1): ``[bind:]port:host:hostport``,
    ``[bind:]port:/remote/socket``, ``/local/socket:host:hostport`` and
    ``/local/socket:/remote/socket``; IPv6 addresses in square brackets.
    """
    if not isinstance(spec, str):
        raise SpecError(f"bad forward spec {spec!r}: not a string")
    if not spec or not spec.strip():
        raise SpecError("bad forward spec '': empty")
    parts = _split(spec)
    # Unix-socket listen side: the first field is a path.
    if parts[0].startswith("/"):
        path = _checked(spec, validate.path, parts[0], "local socket path", max_bytes=validate.UNIX_PATH_MAX)
        listen = Endpoint(path=path)
        rest = parts[1:]
    else:
        listen, rest = _tcp_listen(spec, parts, "listen port", bind_resolved_here=True)
    if len(rest) == 1 and rest[0].startswith("/"):
        target = Endpoint(path=_checked(spec, validate.path, rest[0], "remote socket path", remote=True))
    elif len(rest) == 2:
        host = _checked(spec, validate.host, rest[0], "target host", resolved_here=False)
        target = Endpoint(host=host, port=_checked(spec, validate.port, rest[1], "target port"))
    else:
        raise SpecError(
            f"bad forward spec {validate.show(spec)}: expected [bind:]port:host:hostport, "
            "[bind:]port:/remote/socket, /local/socket:host:hostport "
            "or /local/socket:/remote/socket"
        )
    return LocalForward(listen=listen, target=target, spec=spec)


def parse_dynamic_forward(spec: str) -> DynamicForward:
    """Parse one ``-D`` argument, as ssh(1) does: ``[bind:]port``, an IPv6
    bind address in square brackets; ``*`` or an empty bind: every interface."""
    if not isinstance(spec, str):
        raise SpecError(f"bad dynamic forward spec {spec!r}: not a string")
    if not spec or not spec.strip():
        raise SpecError("bad dynamic forward spec '': empty")
    parts = _split(spec)
    if len(parts) == 1:
        bind = None
    elif len(parts) == 2:
        bind = "" if parts[0] == "*" else parts[0]
        if bind:
            _checked(spec, validate.host, bind, "bind address", resolved_here=True)
    else:
        raise SpecError(f"bad dynamic forward spec {validate.show(spec)}: expected [bind:]port")
    port_no = _checked(spec, validate.port, parts[-1], "listen port", allow_zero=True)
    return DynamicForward(listen=Endpoint(host=bind, port=port_no), spec=spec)


def parse_remote_forward(spec: str) -> RemoteForward:
    """Parse one ``-R`` argument, as ssh(1) does: ``[bind:]port:host:hostport``
    or ``[bind:]port:/local/socket``; IPv6 addresses in square brackets; port 0
    lets the server choose. (The server cannot listen on a unix socket for us:
    libssh2 has no streamlocal-forward; a remote SOCKS ``-R [bind:]port`` is
    not supported.)"""
    if not isinstance(spec, str):
        raise SpecError(f"bad remote forward spec {spec!r}: not a string")
    if not spec or not spec.strip():
        raise SpecError("bad remote forward spec '': empty")
    parts = _split(spec)
    if parts[0].startswith("/"):
        raise SpecError(f"bad remote forward spec {validate.show(spec)}: a remote unix socket listener "
                        "(streamlocal-forward) is not supported; give [bind:]port")
    if len(parts) <= 2 and not (len(parts) == 2 and parts[1].startswith("/")):
        raise SpecError(f"bad remote forward spec {validate.show(spec)}: remote dynamic forwarding (SOCKS) "
                        "is not supported; expected [bind:]port:host:hostport or [bind:]port:/local/socket")
    # The server resolves the bind address: not checked as a name here.
    listen, rest = _tcp_listen(spec, parts, "remote listen port", bind_resolved_here=False)
    if len(rest) == 1 and rest[0].startswith("/"):
        target = Endpoint(path=_checked(spec, validate.path, rest[0], "local socket path",
                                        max_bytes=validate.UNIX_PATH_MAX))
    elif len(rest) == 2:
        host = _checked(spec, validate.host, rest[0], "target host", resolved_here=True)
        target = Endpoint(host=host, port=_checked(spec, validate.port, rest[1], "target port"))
    else:
        raise SpecError(f"bad remote forward spec {validate.show(spec)}: expected [bind:]port:host:hostport "
                        "or [bind:]port:/local/socket")
    return RemoteForward(listen=listen, target=target, spec=spec)
