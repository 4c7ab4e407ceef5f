"""One table of the tunnels file -> Options: a ``[tunnels.NAME]`` table
becomes that tunnel's Options, ``[defaults]`` becomes the settings every
tunnel starts from.

This module owns the key table (which keys a table may hold and the Options
field each sets), the conversion and checking of each value, the ssh ``-o``
entries of ``options``, and the merge of a tunnel's settings over the
defaults. The file level (reading, TOML, top-level keys, tunnel names) is
tunnelfile's; the format is documented there for users.

Problems raise FileProblem with a message that already names the table and
the key (``tunnel 'db': port: ...``); tunnelfile.load adds the file name.
tunnelfile raises it too, for the file-level problems.
Value readers raise plain UsageError (``must be an integer, ...``) because
only the caller knows which key the value came from.
"""

from __future__ import annotations

import difflib
import ipaddress

from . import backoff, sshopts, validate
from .errors import UsageError
from .options import DEFAULT_CIPHERS, STRICT_VALUES, Options
from .spec import LocalForward, parse_dynamic_forward, parse_local_forward, parse_remote_forward

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


class FileProblem(Exception):
    """A problem in a tunnels file whose message already says where it is
    (the tunnel and key, or the file-level place), but not which file.

    Not a UsageError on purpose: the readers' UsageErrors are caught and
    prefixed with the key, and a FileProblem must pass through those
    handlers unprefixed. tunnelfile.load turns it into a UsageError.
    """


# ---- values ---------------------------------------------------------------

def type_name(value) -> str:
    """A TOML value's type as the messages say it: "a table", not "a dict"."""
    return {bool: "a boolean", int: "an integer", float: "a float", str: "a string",
            list: "a list", dict: "a table"}.get(type(value), f"a {type(value).__name__}")


def _want(value, kinds, what: str):
    # bool is an int in Python, but `port = true` is a mistake in a file
    if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
        raise UsageError(f"must be {what}, not {type_name(value)}")
    return value


def read_string(value) -> str:
    return _want(value, (str,), "a string")


def _boolean(value) -> bool:
    return _want(value, (bool,), "true or false")


def _integer(value, lo: int, hi: int) -> int:
    return _in_range(_want(value, (int,), "an integer"), lo, hi)


def _in_range(value, lo, hi):
    if not lo <= value <= hi:
        # TOML integers go to 2**63: do not echo a 19-digit number back
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
    if isinstance(value, float) and value != value:    # nan passes every range check
        raise UsageError("must be a number of seconds, not nan")
    return _in_range(value, 0, validate.MAX_SECONDS)


def _paths(value, what: str) -> list[str]:
    """A string or a non-empty list of strings; each a local path, ~ expanded."""
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list):
        raise UsageError(f"must be a string or a list of strings, not {type_name(value)}")
    if not items:
        raise UsageError("is an empty list")
    out = []
    for i, item in enumerate(items):
        if not isinstance(item, str):
            raise UsageError(f"[{i}] must be a string, not {type_name(item)}")
        out.append(validate.local_file(item, what))
    return out


def _strict(value) -> str:
    # TOML true/false read as ssh's yes/no; strings take the CLI's aliases
    if isinstance(value, bool):
        return "yes" if value else "no"
    v = read_string(value).lower()
    v = sshopts.STRICT_ALIASES.get(v, v)
    if v not in STRICT_VALUES:
        raise UsageError(f"{validate.show(value)} is not yes, accept-new or no")
    return v


def _reconnect_max(value) -> float:
    v = _seconds(value)
    if v < backoff.MIN:
        raise UsageError(f"must be at least {backoff.MIN} seconds (the reconnect backoff's minimum), not {v!r}")
    return v


# ---- the key table ----------------------------------------------------------

# key -> (Options field, reader). Two keys may set one field (identity and
# identities); _settings refuses a table that gives both.
KEYS = {
    "port": ("port", lambda v: _integer(v, 1, 65535)),
    "user": ("user", lambda v: validate.user(read_string(v), "user")),
    "identity": ("identities", lambda v: _paths(v, "identity file")),
    "identities": ("identities", lambda v: _paths(v, "identity file")),
    "identities_only": ("identities_only", _boolean),
    "use_agent": ("use_agent", _boolean),
    "known_hosts": ("known_hosts", lambda v: _paths(v, "known_hosts file")),
    "strict_host_key_checking": ("strict_host_key_checking", _strict),
    "connect_timeout": ("connect_timeout", lambda v: _whole_seconds(v) or None),   # 0: off, as in ssh
    "server_alive_interval": ("server_alive_interval", _whole_seconds),
    "server_alive_count_max": ("server_alive_count_max", lambda v: _integer(v, 0, sshopts.MAX_COUNT)),
    "exit_on_forward_failure": ("exit_on_forward_failure", _boolean),
    "gateway_ports": ("gateway_ports", _boolean),
    "ciphers": ("ciphers", lambda v: validate.ciphers(read_string(v), DEFAULT_CIPHERS, "ciphers")),
    "workers": ("workers", lambda v: _integer(v, 0, sshopts.MAX_WORKERS)),
    "window": ("window", lambda v: _integer(v, 0, sshopts.MAX_WINDOW)),
    "sessions_per_worker": ("sessions_per_worker", lambda v: _integer(v, 1, sshopts.MAX_SESSIONS_PER_WORKER)),
    "client_wait": ("client_wait", _seconds),
    "drain_timeout": ("drain_timeout", _seconds),
    "reconnect_max": ("reconnect_max", _reconnect_max),
    "mux": ("mux", _boolean),
}
TUNNEL_ONLY = ("destination", "forwards")    # what makes a tunnel itself: no default
TUNNEL_KEYS = TUNNEL_ONLY + ("dynamic_forwards", "remote_forwards", "options") + tuple(KEYS)
DEFAULT_KEYS = ("options",) + tuple(KEYS)


# ---- a table's settings -------------------------------------------------------

def _unknown_key(key: str, where: str, allowed, value) -> FileProblem:
    msg = f"unknown key {validate.show(key)} in {where}"
    if key in SECRET_KEYS:
        return FileProblem(f"{where}: {key}: secrets do not go in files; use ssh-agent, "
                            "or SSHPUMP_PASSWORD / SSHPUMP_PASSPHRASE in sshpump's environment")
    if key in TUNNEL_ONLY and where == "[defaults]":
        return FileProblem(f"{where}: {key} belongs in each [tunnels.NAME] table, not in [defaults]")
    close = difflib.get_close_matches(key.lower(), allowed, n=1, cutoff=0.6)
    if key == "host":
        msg += ' (use destination = "[user@]host")'
    elif close:
        msg += f" (did you mean {close[0]!r}?)"
    elif isinstance(value, dict) and where.startswith("tunnel "):
        # TOML reads [tunnels.db.eu] as a table "eu" inside tunnel "db"
        msg += (" ([tunnels.A.B] is a table inside tunnel 'A': quote a dotted name, "
                "[tunnels.\"A.B\"])")
    return FileProblem(msg)


def _settings(table: dict, where: str, allowed) -> tuple[dict, dict]:
    """One table's settings: ({Options field: value}, {Options field: the key that set it}).

    A field set twice in one table (a key and an options entry, or identity
    and identities) is an error, not a silent precedence.
    """
    for key, value in table.items():
        if key not in allowed:
            raise _unknown_key(key, where, allowed, value)
    fields: dict[str, object] = {}
    source: dict[str, str] = {}

    def put(field: str, value, src: str):
        if field in source:
            raise FileProblem(f"{where}: {src} sets {field}, and so does {source[field]}: give it once")
        fields[field] = value
        source[field] = src

    for key, value in table.items():
        if key in KEYS:
            field, read = KEYS[key]
            try:
                put(field, read(value), key)
            except UsageError as e:
                raise FileProblem(f"{where}: {key}: {e}") from None
    if "options" in table:
        for field, value, src in _options(table["options"], where):
            if field == "identities" and source.get(field, "").startswith("options["):
                fields[field] = fields[field] + value    # IdentityFile adds up, as in ssh
                continue
            put(field, value, src)
    return fields, source


def _options(value, where: str):
    """ssh -o strings, read by sshopts.apply_option so a file takes exactly
    what the CLI's -o takes: (field, value, source) each."""
    if not isinstance(value, list):
        raise FileProblem(f"{where}: options: must be a list of \"Key=value\" strings, not {type_name(value)}")
    for i, text in enumerate(value):
        src = f"options[{i}]"
        if not isinstance(text, str):
            raise FileProblem(f"{where}: {src}: must be a string, not {type_name(text)}")
        try:
            name, _ = sshopts._split(text)
            if name == "BatchMode":
                raise UsageError("BatchMode is a command-line option, not one for a tunnels file")
            scratch = Options(host="scratch", identities=[])    # read the one field it sets
            sshopts.apply_option(scratch, text, [])
        except UsageError as e:
            raise FileProblem(f"{where}: {src}: {e}") from None
        field = OPTION_FIELDS[name]
        yield field, getattr(scratch, field), f"{src} {validate.show(text)}"


def defaults_settings(table) -> dict:
    """The ``[defaults]`` table's settings: {Options field: value}."""
    if not isinstance(table, dict):
        raise FileProblem(f"defaults must be a table ([defaults]), not {type_name(table)}")
    fields, _ = _settings(table, "[defaults]", DEFAULT_KEYS)
    return fields


# ---- a tunnel -----------------------------------------------------------------

def _destination(value, where: str) -> tuple[str | None, str]:
    """"[user@]host" -> (user or None, host); "user@[::1]" for IPv6."""
    try:
        text = read_string(value)
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
        raise FileProblem(f"{where}: destination: {e}") from None
    return (user or None), host


def _forwards(value, where: str) -> list[LocalForward]:
    if isinstance(value, list) and not value:
        raise FileProblem(f"{where}: forwards: is empty: give at least one -L spec")
    return _spec_list(value, where, "forwards", parse_local_forward, "-L")


def _spec_list(value, where: str, key: str, parse, form: str) -> list:
    """forwards (-L specs), dynamic_forwards (-D) or remote_forwards (-R)."""
    if not isinstance(value, list):
        raise FileProblem(f"{where}: {key}: must be a list of {form} spec strings, not {type_name(value)}")
    out = []
    for i, spec in enumerate(value):
        try:
            out.append(parse(spec))
        except UsageError as e:
            raise FileProblem(f"{where}: {key}[{i}]: {e}") from None
    return out


def tunnel_options(name: str, table, defaults: dict, default_workers: int) -> Options:
    """The Options of tunnel NAME: its table's settings over ``defaults``
    (field by field; a list is replaced whole), checked as the CLI's are."""
    where = f"tunnel {validate.show(name)}"
    if not isinstance(table, dict):
        raise FileProblem(f"{where} must be a table ([tunnels.{name}]), not {type_name(table)}")
    fields, source = _settings(table, where, TUNNEL_KEYS)    # unknown keys first: a typo is not "missing"
    # forwards (-L) may be left out when the tunnel has -D or -R forwards
    socks_only = bool(table.get("dynamic_forwards") or table.get("remote_forwards")) and not table.get("forwards")
    for key in TUNNEL_ONLY:
        if key not in table and not (key == "forwards" and socks_only):
            raise FileProblem(f"{where}: {key} is missing")
    user, host = _destination(table["destination"], where)
    if user is not None:
        if "user" in fields:
            raise FileProblem(f"{where}: the user is given twice: in destination and by {source['user']}")
        fields["user"] = user
    opts = Options(host=host, workers=default_workers)
    for field, value in {**defaults, **fields}.items():
        setattr(opts, field, list(value) if isinstance(value, list) else value)  # no list shared
    opts.forwards = ([] if socks_only else _forwards(table["forwards"], where)) + \
        _spec_list(table.get("remote_forwards", []), where, "remote_forwards", parse_remote_forward,
                   "-R ([bind:]port:host:hostport or [bind:]port:/local/socket)") + \
        _spec_list(table.get("dynamic_forwards", []), where, "dynamic_forwards", parse_dynamic_forward,
                   "-D ([bind:]port)")
    try:
        sshopts.check_options(opts)
    except UsageError as e:
        raise FileProblem(f"{where}: {e}") from None
    return opts
