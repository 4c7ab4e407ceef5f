"""The tunnels file: many tunnels, each its own destination, options and
forwards, in one TOML file (``sshpump --config FILE``).

Format (see ``examples/tunnels.toml``)::

    control = "/run/user/1000/sshpump.sock"   # optional: the control socket

    [defaults]                 # optional: any tunnel key except destination/forwards
    workers = 2
    server_alive_interval = 15

    [tunnels.db]
    destination = "me@bastion1.example.com"   # [user@]host, as ssh takes it
    port = 22
    identity = "~/.ssh/id_ed25519"            # string or list; ~ expanded
    known_hosts = "~/.ssh/known_hosts"        # string or list; ~ expanded
    strict_host_key_checking = "accept-new"
    forwards = ["5432:db.internal:5432", "/tmp/pg.sock:/run/postgresql/.s.PGSQL.5432"]
    options = ["ServerAliveCountMax=5"]       # ssh -o style, the CLI's names and checks

    [tunnels.web]
    destination = "bastion2"
    workers = 1
    forwards = ["8080:web:80"]

Top level: ``control`` (a unix socket path, ``~`` expanded, at most 107
bytes), ``[defaults]`` and ``[tunnels.NAME]``; nothing else. NAME is 1 to 64
of ``A-Z a-z 0-9 _ . -`` (quote a name with dots: ``[tunnels."db.eu"]``).

Tunnel keys (the Options fields a file may set, with TOML types):

====================================  ==========================================
``destination`` (required)            ``"[user@]host"``; ``"user@[::1]"`` for IPv6
``forwards`` (required)               non-empty list of ``-L`` spec strings
``options``                           list of ``"Key=value"`` strings, as ``-o``
``port``                              integer 1-65535 (default 22)
``user``                              string (default: destination's, else $USER)
``identity`` / ``identities``         string or list of key files, ``~`` expanded
``identities_only``, ``use_agent``,   true / false
``exit_on_forward_failure``,
``gateway_ports``
``known_hosts``                       string or list of files, ``~`` expanded
``strict_host_key_checking``          "yes", "accept-new" or "no"
``connect_timeout``,                  whole seconds: integer, or ssh's "90s",
``server_alive_interval``             "1m30s"; 0 turns it off
``server_alive_count_max``            integer
``ciphers``                           ssh's Ciphers syntax ("+aes256-ctr", ...)
``workers``                           integer 0-1024 (default: the CPU count)
``window``                            integer, bytes (0: libssh2's default)
``client_wait``, ``drain_timeout``    seconds, integer or float
``reconnect_max``                     seconds, integer or float, at least 0.5
====================================  ==========================================

How values combine, setting by setting: what a tunnel sets (by a key or an
``options`` entry) replaces what ``[defaults]`` sets for the same Options
field; a list (``identity``, ``known_hosts``) is replaced whole, not extended.
Settings a tunnel leaves alone keep the default's. In one table, a key and an
``options`` entry for the same setting (``port`` and ``"Port=2222"``), a user
in ``destination`` and a ``user`` key, or ``identity`` and ``identities``
are an error, not a silent precedence. ``BatchMode`` has no place in a file.

Refused: ``password`` and ``passphrase`` (secrets do not go in files: use
ssh-agent, or SSHPUMP_PASSWORD / SSHPUMP_PASSPHRASE), unknown keys (with a
suggestion), two forwards (in one tunnel or in two) that would listen on the
same local address: the same unix path, or the same TCP port on overlapping
addresses (none given = both loopbacks, or every interface with
gateway_ports; ``*`` = every interface; ``0.0.0.0`` = every IPv4 one; ``::``
= every IPv6 one). Port 0 never clashes. Every tunnel's Options then pass
``sshopts.check_options``, as the CLI's do.

Every problem is one UsageError line naming the file, the tunnel and the key:
``tunnels.toml: tunnel 'db': forwards[1]: bad forward spec '99999:h:1': ...``.
"""

from __future__ import annotations

import difflib
import ipaddress
import os
import re
import tomllib
from dataclasses import dataclass

from . import backoff, sshopts, validate
from .errors import UsageError
from .options import DEFAULT_CIPHERS, STRICT_VALUES, Options
from .spec import LocalForward, parse_local_forward

MAX_FILE_BYTES = 16 << 20     # a tunnels file is small; this stops /dev/zero, not a real file
NAME_RE = re.compile(r"[A-Za-z0-9_.-]{1,64}")
TOP_KEYS = ("control", "defaults", "tunnels")
SECRET_KEYS = ("password", "passphrase")

# -o option name -> the Options field it sets (BatchMode sets none).
OPTION_FIELDS = {
    "UserKnownHostsFile": "known_hosts", "StrictHostKeyChecking": "strict_host_key_checking",
    "ConnectTimeout": "connect_timeout", "ServerAliveInterval": "server_alive_interval",
    "ServerAliveCountMax": "server_alive_count_max",
    "ExitOnForwardFailure": "exit_on_forward_failure", "GatewayPorts": "gateway_ports",
    "IdentityFile": "identities", "IdentitiesOnly": "identities_only", "Ciphers": "ciphers",
    "Port": "port", "User": "user",
}


@dataclass
class TunnelConfig:
    name: str
    opts: Options          # opts.forwards holds this tunnel's forwards


@dataclass
class FileConfig:
    path: str
    tunnels: dict[str, TunnelConfig]     # in file order
    control: str | None = None           # top-level `control = "/path/to/socket"`


class _Bad(Exception):
    """A problem found while reading one value; load() adds the file name."""


def _one_line(text: str) -> str:
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


# ---- values ---------------------------------------------------------------

def _type_name(value) -> str:
    return {bool: "a boolean", int: "an integer", float: "a float", str: "a string",
            list: "a list", dict: "a table"}.get(type(value), f"a {type(value).__name__}")


def _want(value, kinds, what: str):
    if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
        raise UsageError(f"must be {what}, not {_type_name(value)}")
    return value


def _string(value) -> str:
    return _want(value, (str,), "a string")


def _boolean(value) -> bool:
    return _want(value, (bool,), "true or false")


def _integer(value, lo: int, hi: int) -> int:
    return _in_range(_want(value, (int,), "an integer"), lo, hi)


def _in_range(value, lo, hi):
    if not lo <= value <= hi:
        shown = repr(value) if abs(value) < 10**18 else "a number that large"
        raise UsageError(f"must be between {lo:g} and {hi:g}, not {shown}")
    return value


def _whole_seconds(value) -> int:
    """ssh's times: an integer, or a string such as '90s', '1m30s'."""
    _want(value, (int, str), "whole seconds (an integer, or a string such as \"90s\")")
    if isinstance(value, str):
        return validate.seconds(value, "time")
    return _in_range(value, 0, validate.MAX_SECONDS)


def _seconds(value) -> float:
    _want(value, (int, float), "a number of seconds")
    if isinstance(value, float) and value != value:
        raise UsageError("must be a number of seconds, not nan")
    return _in_range(value, 0, validate.MAX_SECONDS)


def _paths(value, what: str) -> list[str]:
    """A string or a non-empty list of strings; each a local path, ~ expanded."""
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list):
        raise UsageError(f"must be a string or a list of strings, not {_type_name(value)}")
    if not items:
        raise UsageError("is an empty list")
    out = []
    for i, item in enumerate(items):
        if not isinstance(item, str):
            raise UsageError(f"[{i}] must be a string, not {_type_name(item)}")
        out.append(validate.local_file(item, what))
    return out


def _strict(value) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    v = _string(value).lower()
    v = sshopts.STRICT_ALIASES.get(v, v)
    if v not in STRICT_VALUES:
        raise UsageError(f"{validate.show(value)} is not yes, accept-new or no")
    return v


def _reconnect_max(value) -> float:
    v = _seconds(value)
    if v < backoff.MIN:
        raise UsageError(f"must be at least {backoff.MIN} seconds (the reconnect backoff's minimum), not {v!r}")
    return v


# key -> (Options field, reader)
KEYS = {
    "port": ("port", lambda v: _integer(v, 1, 65535)),
    "user": ("user", lambda v: validate.user(_string(v), "user")),
    "identity": ("identities", lambda v: _paths(v, "identity file")),
    "identities": ("identities", lambda v: _paths(v, "identity file")),
    "identities_only": ("identities_only", _boolean),
    "use_agent": ("use_agent", _boolean),
    "known_hosts": ("known_hosts", lambda v: _paths(v, "known_hosts file")),
    "strict_host_key_checking": ("strict_host_key_checking", _strict),
    "connect_timeout": ("connect_timeout", lambda v: _whole_seconds(v) or None),
    "server_alive_interval": ("server_alive_interval", _whole_seconds),
    "server_alive_count_max": ("server_alive_count_max", lambda v: _integer(v, 0, sshopts.MAX_COUNT)),
    "exit_on_forward_failure": ("exit_on_forward_failure", _boolean),
    "gateway_ports": ("gateway_ports", _boolean),
    "ciphers": ("ciphers", lambda v: validate.ciphers(_string(v), DEFAULT_CIPHERS, "ciphers")),
    "workers": ("workers", lambda v: _integer(v, 0, sshopts.MAX_WORKERS)),
    "window": ("window", lambda v: _integer(v, 0, sshopts.MAX_WINDOW)),
    "client_wait": ("client_wait", _seconds),
    "drain_timeout": ("drain_timeout", _seconds),
    "reconnect_max": ("reconnect_max", _reconnect_max),
}
TUNNEL_ONLY = ("destination", "forwards")
TUNNEL_KEYS = TUNNEL_ONLY + ("options",) + tuple(KEYS)
DEFAULT_KEYS = ("options",) + tuple(KEYS)


# ---- tables -----------------------------------------------------------------

def _unknown_key(key: str, where: str, allowed, value) -> _Bad:
    msg = f"unknown key {validate.show(key)} in {where}"
    if key in SECRET_KEYS:
        return _Bad(f"{where}: {key}: secrets do not go in files; use ssh-agent, "
                    "or SSHPUMP_PASSWORD / SSHPUMP_PASSPHRASE in sshpump's environment")
    if key in TUNNEL_ONLY and where == "[defaults]":
        return _Bad(f"{where}: {key} belongs in each [tunnels.NAME] table, not in [defaults]")
    close = difflib.get_close_matches(key.lower(), allowed, n=1, cutoff=0.6)
    if key == "host":
        msg += ' (use destination = "[user@]host")'
    elif close:
        msg += f" (did you mean {close[0]!r}?)"
    elif isinstance(value, dict) and where.startswith("tunnel "):
        msg += (" ([tunnels.A.B] is a table inside tunnel 'A': quote a dotted name, "
                "[tunnels.\"A.B\"])")
    return _Bad(msg)


def _layer(table: dict, where: str, allowed) -> tuple[dict, dict]:
    """One table's settings: ({Options field: value}, {Options field: the key that set it})."""
    for key, value in table.items():
        if key not in allowed:
            raise _unknown_key(key, where, allowed, value)
    fields: dict[str, object] = {}
    source: dict[str, str] = {}

    def put(field: str, value, src: str):
        if field in source:
            raise _Bad(f"{where}: {src} sets {field}, and so does {source[field]}: give it once")
        fields[field] = value
        source[field] = src

    for key, value in table.items():
        if key in KEYS:
            field, read = KEYS[key]
            try:
                put(field, read(value), key)
            except UsageError as e:
                raise _Bad(f"{where}: {key}: {e}") from None
    if "options" in table:
        for field, value, src in _options(table["options"], where):
            if field == "identities" and source.get(field, "").startswith("options["):
                fields[field] = fields[field] + value    # IdentityFile adds up, as in ssh
                continue
            put(field, value, src)
    return fields, source


def _options(value, where: str):
    """ssh -o strings, read by sshopts.apply_option: (field, value, source) each."""
    if not isinstance(value, list):
        raise _Bad(f"{where}: options: must be a list of \"Key=value\" strings, not {_type_name(value)}")
    for i, text in enumerate(value):
        src = f"options[{i}]"
        if not isinstance(text, str):
            raise _Bad(f"{where}: {src}: must be a string, not {_type_name(text)}")
        try:
            name, _ = sshopts._split(text)
            if name == "BatchMode":
                raise UsageError("BatchMode is a command-line option, not one for a tunnels file")
            scratch = Options(host="scratch", identities=[])
            sshopts.apply_option(scratch, text, [])
        except UsageError as e:
            raise _Bad(f"{where}: {src}: {e}") from None
        field = OPTION_FIELDS[name]
        yield field, getattr(scratch, field), f"{src} {validate.show(text)}"


def _destination(value, where: str) -> tuple[str | None, str]:
    try:
        text = _string(value)
        user, _, host = text.rpartition("@")
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
        validate.host(host, "host", resolved_here=True)
        if ":" in host:
            try:
                ipaddress.IPv6Address(host)
            except ValueError:
                raise UsageError(f"{validate.show(text)}: a port goes in port = N, not in destination") from None
        if user:
            validate.user(user)
    except UsageError as e:
        raise _Bad(f"{where}: destination: {e}") from None
    return (user or None), host


def _forwards(value, where: str) -> list[LocalForward]:
    if not isinstance(value, list):
        raise _Bad(f"{where}: forwards: must be a list of -L spec strings, not {_type_name(value)}")
    if not value:
        raise _Bad(f"{where}: forwards: is empty: give at least one -L spec")
    out = []
    for i, spec in enumerate(value):
        try:
            out.append(parse_local_forward(spec))
        except UsageError as e:
            raise _Bad(f"{where}: forwards[{i}]: {e}") from None
    return out


def _tunnel(name: str, table, defaults: dict, default_workers: int) -> TunnelConfig:
    where = f"tunnel {validate.show(name)}"
    if not isinstance(table, dict):
        raise _Bad(f"{where} must be a table ([tunnels.{name}]), not {_type_name(table)}")
    fields, source = _layer(table, where, TUNNEL_KEYS)    # unknown keys first: a typo is not "missing"
    for key in TUNNEL_ONLY:
        if key not in table:
            raise _Bad(f"{where}: {key} is missing")
    user, host = _destination(table["destination"], where)
    if user is not None:
        if "user" in fields:
            raise _Bad(f"{where}: the user is given twice: in destination and by {source['user']}")
        fields["user"] = user
    opts = Options(host=host, workers=default_workers)
    for field, value in {**defaults, **fields}.items():
        setattr(opts, field, list(value) if isinstance(value, list) else value)  # no list shared
    opts.forwards = _forwards(table["forwards"], where)
    try:
        sshopts.check_options(opts)
    except UsageError as e:
        raise _Bad(f"{where}: {e}") from None
    return TunnelConfig(name=name, opts=opts)


# ---- listen addresses -------------------------------------------------------

def _bind_set(host: str | None, gateway_ports: bool) -> set[tuple[str, str]]:
    """(family, address) pairs a TCP forward binds; address '*' is a wildcard."""
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


def _check_clashes(tunnels: dict[str, TunnelConfig], control: str | None) -> None:
    seen = []   # (tunnel, index, forward, key)
    for t in tunnels.values():
        for i, fwd in enumerate(t.opts.forwards):
            if fwd.listen.is_unix:
                key = ("unix", os.path.normpath(fwd.listen.path))
            elif fwd.listen.port == 0:
                key = None
            else:
                key = ("tcp", fwd.listen.port, _bind_set(fwd.listen.host, t.opts.gateway_ports))
            for name, j, other, okey in seen:
                if name == t.name and (other.listen, other.target) == (fwd.listen, fwd.target):
                    raise _Bad(f"tunnel {validate.show(name)}: forwards[{j}] and forwards[{i}] are the "
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
                    if name == t.name:
                        who = f"tunnel {validate.show(name)}: {first} and {second}"
                    else:
                        who = (f"tunnels {validate.show(name)} ({first}) and "
                               f"{validate.show(t.name)} ({second})")
                    raise _Bad(f"{who} both listen on {_where_listens(fwd)}")
            seen.append((t.name, i, fwd, key))
            if control is not None and key is not None and key[0] == "unix" \
                    and key[1] == os.path.normpath(control):
                raise _Bad(f"tunnel {validate.show(t.name)}: forwards[{i}] listens on the control socket "
                           f"path {validate.show(control)}")


# ---- the file ---------------------------------------------------------------

def _default_workers() -> int:
    """The CLI's default: one worker per CPU this process may run on
    (options.default_workers; master.default_workers before it moved)."""
    try:
        from .options import default_workers
    except ImportError:
        try:
            from .master import default_workers
        except ImportError:
            return max(1, len(os.sched_getaffinity(0)))
    return default_workers()


def _read_text(path: str) -> str:
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_FILE_BYTES + 1)
    except OSError as e:
        raise _Bad(f"cannot read: {e.strerror or e}") from None
    if len(raw) > MAX_FILE_BYTES:
        raise _Bad(f"larger than {MAX_FILE_BYTES >> 20} MiB: not a tunnels file")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        column = e.start - (raw.rfind(b"\n", 0, e.start) + 1) + 1
        raise _Bad(f"line {line}, column {column}: not UTF-8 (byte {raw[e.start]:#04x}); "
                   "save the file as UTF-8") from None
    return text.removeprefix("\ufeff")    # a BOM some editors write


def _parse_toml(text: str) -> dict:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        msg = str(e)
        m = re.fullmatch(r"(.*) \(at line (\d+), column (\d+)\)", msg, re.S)
        if m:
            raise _Bad(f"line {m[2]}, column {m[3]}: {m[1]}") from None
        m = re.fullmatch(r"(.*) \(at end of document\)", msg, re.S)
        if m:
            raise _Bad(f"at the end: {m[1]}") from None
        raise _Bad(msg) from None


def _control(value) -> str:
    try:
        text = validate.local_file(_string(value), "control socket path")
        return validate.path(text, "control socket path", max_bytes=validate.UNIX_PATH_MAX)
    except UsageError as e:
        raise _Bad(f"control: {e}") from None


def _load(path: str) -> FileConfig:
    doc = _parse_toml(_read_text(path))
    for key, value in doc.items():
        if key not in TOP_KEYS:
            close = difflib.get_close_matches(key.lower(), TOP_KEYS, n=1, cutoff=0.6)
            hint = (f" (did you mean {close[0]!r}?)" if close else
                    " (a tunnel is a [tunnels.NAME] table)" if isinstance(value, dict) else
                    " (tunnel keys go in a [tunnels.NAME] table)" if key in TUNNEL_KEYS else "")
            raise _Bad(f"unknown top-level key {validate.show(key)}{hint}")
    control = _control(doc["control"]) if "control" in doc else None
    defaults_table = doc.get("defaults", {})
    if not isinstance(defaults_table, dict):
        raise _Bad(f"defaults must be a table ([defaults]), not {_type_name(defaults_table)}")
    defaults, _ = _layer(defaults_table, "[defaults]", DEFAULT_KEYS)
    tunnels_table = doc.get("tunnels", {})
    if not isinstance(tunnels_table, dict):
        raise _Bad(f"tunnels must be [tunnels.NAME] tables, not {_type_name(tunnels_table)}")
    if not tunnels_table:
        raise _Bad("no tunnels: add a [tunnels.NAME] table with destination and forwards")
    workers = _default_workers() if "workers" not in defaults else defaults["workers"]
    tunnels = {}
    for name, table in tunnels_table.items():
        if not NAME_RE.fullmatch(name):
            raise _Bad(f"tunnel name {validate.show(name)} is not 1 to 64 of A-Z a-z 0-9 _ . -")
        tunnels[name] = _tunnel(name, table, defaults, workers)
    _check_clashes(tunnels, control)
    return FileConfig(path=path, tunnels=tunnels, control=control)


def load(path: str) -> FileConfig:
    """Read and check a tunnels file. Every problem raises UsageError with one
    line that names the file (as given), and the tunnel and key it is about."""
    path = os.fspath(path)
    try:
        return _load(path)
    except _Bad as e:
        raise UsageError(_one_line(f"{path}: {e}")) from None
    except UsageError as e:    # a check this module did not wrap: still names the file
        raise UsageError(_one_line(f"{path}: {e}")) from None


def _destination_text(opts: Options) -> str:
    host = f"[{opts.host}]" if ":" in opts.host else opts.host
    return f"{opts.user}@{host}:{opts.port}"


def summary(cfg: FileConfig) -> str:
    """What ``sshpump --config FILE --check`` prints: one line per tunnel."""
    width = max((len(name) for name in cfg.tunnels), default=0)
    lines = []
    for name, t in cfg.tunnels.items():
        o = t.opts
        workers = "1 worker" if o.workers == 1 else f"{o.workers} workers"
        n = len(o.forwards)
        specs = ", ".join(f.spec for f in o.forwards)
        line = (f"{name + ':':<{width + 1}} {_destination_text(o)}, {workers}, "
                f"{n} forward{'' if n == 1 else 's'}: {specs}")
        lines.append(_one_line(line))
    return "\n".join(lines)
