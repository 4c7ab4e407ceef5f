"""Forward specifications, parsed exactly as ``ssh -L`` writes them."""

from __future__ import annotations

from dataclasses import dataclass

from .errors import SpecError


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


def _split(spec: str) -> list[str]:
    """Split on ':' outside square brackets, dropping the brackets."""
    parts, cur, depth = [], [], 0
    for ch in spec:
        if ch == "[":
            if depth:
                raise SpecError(f"bad forward spec {spec!r}: nested '['")
            depth = 1
        elif ch == "]":
            if not depth:
                raise SpecError(f"bad forward spec {spec!r}: unbalanced ']'")
            depth = 0
        elif ch == ":" and not depth:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    if depth:
        raise SpecError(f"bad forward spec {spec!r}: unbalanced '['")
    parts.append("".join(cur))
    return parts


def _port(spec: str, text: str, what: str, allow_zero: bool) -> int:
    if not text.isdigit():
        raise SpecError(f"bad forward spec {spec!r}: {what} {text!r} is not a number")
    port = int(text)
    if port > 65535 or (port == 0 and not allow_zero):
        raise SpecError(f"bad forward spec {spec!r}: {what} {port} is out of range")
    return port


def _host(spec: str, text: str) -> str:
    if not text:
        raise SpecError(f"bad forward spec {spec!r}: empty target host")
    if any(c.isspace() for c in text):
        raise SpecError(f"bad forward spec {spec!r}: bad host {text!r}")
    return text


def parse_local_forward(spec: str) -> LocalForward:
    """Parse one ``-L`` argument.

    Accepted, as in ssh(1): ``[bind:]port:host:hostport``,
    ``[bind:]port:/remote/socket``, ``/local/socket:host:hostport`` and
    ``/local/socket:/remote/socket``; IPv6 addresses in square brackets.
    """
    if not spec or not spec.strip():
        raise SpecError("bad forward spec '': empty")
    parts = _split(spec)
    # Unix-socket listen side: the first field is a path.
    if parts[0].startswith("/"):
        listen = Endpoint(path=parts[0])
        rest = parts[1:]
    else:
        if len(parts) >= 4 or (len(parts) == 3 and parts[2].startswith("/")):
            bind, port, rest = parts[0], parts[1], parts[2:]
            bind = "" if bind == "*" else bind
        else:
            bind, port, rest = None, parts[0], parts[1:]
        listen = Endpoint(host=bind, port=_port(spec, port, "listen port", allow_zero=True))
    if len(rest) == 1 and rest[0].startswith("/"):
        target = Endpoint(path=rest[0])
    elif len(rest) == 2:
        target = Endpoint(host=_host(spec, rest[0]), port=_port(spec, rest[1], "target port", False))
    else:
        raise SpecError(
            f"bad forward spec {spec!r}: expected [bind:]port:host:hostport, "
            "[bind:]port:/remote/socket, /local/socket:host:hostport "
            "or /local/socket:/remote/socket"
        )
    return LocalForward(listen=listen, target=target, spec=spec)
