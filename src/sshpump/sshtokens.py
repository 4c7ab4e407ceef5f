"""``~``, %-tokens and ${VAR} in ssh config paths, expanded as ssh.c
expands IdentityFile: tilde first, then default_client_percent_dollar_expand
with DEFAULT_CLIENT_PERCENT_EXPAND_ARGS. ``ssh -G`` prints such paths
unexpanded, so sshpump expands them (sshconfig.py)."""

from __future__ import annotations

import os
import pwd
import re
import socket

from . import validate
from .errors import UsageError

_TOKEN = re.compile(r"%(.?)|\$\{([^}]*)\}|\$\{")


def home_dir() -> str:
    # ssh takes ~ and %d from the password database, not from $HOME.
    try:
        return pwd.getpwuid(os.getuid()).pw_dir
    except KeyError:
        return os.path.expanduser("~")


def local_user() -> str:
    try:
        return pwd.getpwuid(os.getuid()).pw_name
    except KeyError:
        return os.environ.get("USER", "")


def tilde(path: str) -> str:
    """A leading ``~`` or ``~user``, as ssh's tilde_expand_filename."""
    if not path.startswith("~"):
        return path
    name, sep, rest = path[1:].partition("/")
    if not name:
        base = home_dir()
    else:
        try:
            base = pwd.getpwnam(name).pw_dir
        except KeyError:
            raise UsageError(f"ssh config: no such user {validate.show(name)} in {validate.show(path)}") from None
    return base.rstrip("/") + "/" + rest if sep else base


def connection_tokens(*, host: str, port: str, user: str | None, host_arg: str, conn_hash: str,
                      key_alias: str | None, last_hop: str) -> dict[str, str]:
    """%C %L %i %k %l %n %p %d %h %r %u %j %% for one connection. ``conn_hash``
    is ssh's own %C (ssh 9.2 hashes %l%h%p%r, later versions add %j)."""
    this_host = socket.gethostname()
    return {
        "C": conn_hash, "L": this_host.split(".", 1)[0], "i": str(os.getuid()), "k": key_alias or host_arg,
        "l": this_host, "n": host_arg, "p": port, "d": home_dir(), "h": host, "r": user or local_user(),
        "u": local_user(), "j": last_hop, "%": "%",
    }


def expand_path(path: str, values: dict[str, str], what: str) -> str:
    """``~``, then %-tokens and ${VAR}; an unknown token or an unset
    variable is a UsageError, as ssh refuses them."""
    path = tilde(path)

    def one(m: re.Match) -> str:
        if m.group(0) == "${":
            raise UsageError(f"ssh config: {what} {validate.show(path)}: unterminated ${{")
        if m.group(2) is not None:
            if m.group(2) not in os.environ:
                raise UsageError(f"ssh config: {what} {validate.show(path)}: ${{{m.group(2)}}} is not set")
            return os.environ[m.group(2)]
        if m.group(1) not in values:
            shown = f"%{m.group(1)}" if m.group(1) else "a lone % at the end"
            raise UsageError(f"ssh config: {what} {validate.show(path)}: unknown %-token {shown}")
        return values[m.group(1)]
    return _TOKEN.sub(one, path)
