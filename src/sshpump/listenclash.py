"""The listen-address clash check for a set of tunnels: no two forwards, in
one tunnel or in two, may listen on the same local address, and none on the
control socket's path.

Why at load time: the file is checked as a whole before anything starts,
so ``--check`` catches a clash, and the message can name both forwards and
their tunnels instead of leaving it to whichever bind comes second.

What counts as the same address (the tunnels file's docstring states it for
users): the same unix path after normalising, or the same TCP port on
overlapping addresses. Port 0 never clashes: the kernel picks a free port.
"""

from __future__ import annotations

import ipaddress
import os

from . import validate
from .errors import UsageError
from .options import Options
from .spec import LocalForward, RemoteForward


def _bind_set(host: str | None, gateway_ports: bool) -> set[tuple[str, str]]:
    """(family, address) pairs a TCP forward binds; address '*' is a wildcard.

    No bind address means what ssh -L does: both loopbacks, or every interface
    with gateway_ports. A host name cannot be resolved here (the file is
    checked offline), so it is kept as ("name", host) and _overlap treats it
    as possibly anything.
    """
    if host is None:
        return {("4", "*"), ("6", "*")} if gateway_ports else {("4", "127.0.0.1"), ("6", "::1")}
    if host == "":
        return {("4", "*"), ("6", "*")}
    if host.lower() == "localhost":
        return {("4", "127.0.0.1"), ("6", "::1")}
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return {("name", host.lower().rstrip("."))}
    family = str(ip.version)
    return {(family, "*" if ip.is_unspecified else ip.compressed)}


def _overlap(a: set, b: set) -> bool:
    for fa, xa in a:
        for fb, xb in b:
            if fa == "name" or fb == "name":
                # a name may resolve to anything: it meets wildcards and itself
                if (fa == fb and xa == xb) or xa == "*" or xb == "*":
                    return True
            elif fa == fb and (xa == xb or "*" in (xa, xb)):
                return True
    return False


def _where_listens(fwd: LocalForward) -> str:
    if fwd.listen.is_unix:
        return fwd.listen.path
    return f"port {fwd.listen.port}"


def _listen_key(fwd: LocalForward, gateway_ports: bool):
    """What two forwards must share to clash: ("unix", path), ("tcp", port,
    bind set), or None for port 0, which never clashes."""
    if fwd.listen.is_unix:
        return ("unix", os.path.normpath(fwd.listen.path))
    if fwd.listen.port == 0:
        return None
    return ("tcp", fwd.listen.port, _bind_set(fwd.listen.host, gateway_ports))


def check_listen_clashes(tunnels: dict[str, Options], control: str | None) -> None:
    """Raise UsageError, one line naming the forwards and their tunnels, for
    the first forward that repeats another or listens where another does or
    on the control socket path. ``tunnels`` maps name -> Options, in file
    order; the messages count forwards[i] as in the file."""
    seen = []   # (tunnel name, index, forward, listen key)
    for tunnel_name, opts in tunnels.items():
        for i, fwd in enumerate(opts.forwards):
            if isinstance(fwd, RemoteForward):
                continue   # the server listens for it, not this machine
            key = _listen_key(fwd, opts.gateway_ports)
            for name, j, other, okey in seen:
                if name == tunnel_name and (other.listen, other.target) == (fwd.listen, fwd.target):
                    raise UsageError(f"tunnel {validate.show(name)}: forwards[{j}] and forwards[{i}] are the "
                                     f"same forward ({validate.show(other.spec)}, {validate.show(fwd.spec)})")
                if key is None or okey is None or key[0] != okey[0]:
                    continue
                if key[0] == "unix":
                    clash = key == okey
                else:
                    clash = key[1] == okey[1] and _overlap(key[2], okey[2])
                if clash:
                    first = f"forwards[{j}] {validate.show(other.spec)}"
                    second = f"forwards[{i}] {validate.show(fwd.spec)}"
                    if name == tunnel_name:
                        who = f"tunnel {validate.show(name)}: {first} and {second}"
                    else:
                        who = (f"tunnels {validate.show(name)} ({first}) and "
                               f"{validate.show(tunnel_name)} ({second})")
                    raise UsageError(f"{who} both listen on {_where_listens(fwd)}")
            seen.append((tunnel_name, i, fwd, key))
            if control is not None and key is not None and key[0] == "unix" \
                    and key[1] == os.path.normpath(control):
                raise UsageError(f"tunnel {validate.show(tunnel_name)}: forwards[{i}] listens on the "
                                 f"control socket path {validate.show(control)}")
