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
``dynamic_forwards``                  list of ``-D`` specs ([bind:]port), SOCKS proxies;
                                      with one, ``forwards`` may be left out
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
``mux``                               true / false: as ``--mux`` (README)
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

This module is the file level: reading the file, TOML, the top-level keys,
tunnel names, and ``summary`` for ``--check``. One table's keys -> Options
is tunneltable's job; the listen-address clash check is listenclash's.
"""

from __future__ import annotations

import difflib
import os
import re
import tomllib
from dataclasses import dataclass

from . import validate
from .errors import UsageError
from .listenclash import check_listen_clashes
from .options import Options, default_workers
from .tunneltable import (TUNNEL_KEYS, FileProblem, defaults_settings, read_string,
                          tunnel_options, type_name)

MAX_FILE_BYTES = 16 << 20     # a tunnels file is small; this stops /dev/zero, not a real file
NAME_RE = re.compile(r"[A-Za-z0-9_.-]{1,64}")
TOP_KEYS = ("control", "defaults", "tunnels")


@dataclass
class TunnelConfig:
    name: str
    opts: Options          # opts.forwards holds this tunnel's forwards


@dataclass
class FileConfig:
    path: str
    tunnels: dict[str, TunnelConfig]     # in file order
    control: str | None = None           # top-level `control = "/path/to/socket"`


def _one_line(text: str) -> str:
    # file text reaches messages and --check output: keep each on one line
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _read_text(path: str) -> str:
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_FILE_BYTES + 1)
    except OSError as e:
        raise FileProblem(f"cannot read: {e.strerror or e}") from None
    if len(raw) > MAX_FILE_BYTES:
        raise FileProblem(f"larger than {MAX_FILE_BYTES >> 20} MiB: not a tunnels file")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        # tomllib takes str: decode here so the message can say where the bad byte is
        line = raw[: e.start].count(b"\n") + 1
        column = e.start - (raw.rfind(b"\n", 0, e.start) + 1) + 1
        raise FileProblem(f"line {line}, column {column}: not UTF-8 (byte {raw[e.start]:#04x}); "
                   "save the file as UTF-8") from None
    return text.removeprefix("\ufeff")    # a BOM some editors write


def _parse_toml(text: str) -> dict:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        # tomllib puts the position last, in parentheses; our messages put it first
        msg = str(e)
        m = re.fullmatch(r"(.*) \(at line (\d+), column (\d+)\)", msg, re.S)
        if m:
            raise FileProblem(f"line {m[2]}, column {m[3]}: {m[1]}") from None
        m = re.fullmatch(r"(.*) \(at end of document\)", msg, re.S)
        if m:
            raise FileProblem(f"at the end: {m[1]}") from None
        raise FileProblem(msg) from None


def _control(value) -> str:
    try:
        text = validate.local_file(read_string(value), "control socket path")
        return validate.path(text, "control socket path", max_bytes=validate.UNIX_PATH_MAX)
    except UsageError as e:
        raise FileProblem(f"control: {e}") from None


def _load(path: str) -> FileConfig:
    doc = _parse_toml(_read_text(path))
    for key, value in doc.items():
        if key not in TOP_KEYS:
            close = difflib.get_close_matches(key.lower(), TOP_KEYS, n=1, cutoff=0.6)
            hint = (f" (did you mean {close[0]!r}?)" if close else
                    " (a tunnel is a [tunnels.NAME] table)" if isinstance(value, dict) else
                    " (tunnel keys go in a [tunnels.NAME] table)" if key in TUNNEL_KEYS else "")
            raise FileProblem(f"unknown top-level key {validate.show(key)}{hint}")
    control = _control(doc["control"]) if "control" in doc else None
    defaults = defaults_settings(doc.get("defaults", {}))
    tunnels_table = doc.get("tunnels", {})
    if not isinstance(tunnels_table, dict):
        raise FileProblem(f"tunnels must be [tunnels.NAME] tables, not {type_name(tunnels_table)}")
    if not tunnels_table:
        raise FileProblem("no tunnels: add a [tunnels.NAME] table with destination and forwards")
    workers = default_workers() if "workers" not in defaults else defaults["workers"]
    tunnels = {}
    for name, table in tunnels_table.items():
        if not NAME_RE.fullmatch(name):
            raise FileProblem(f"tunnel name {validate.show(name)} is not 1 to 64 of A-Z a-z 0-9 _ . -")
        tunnels[name] = TunnelConfig(name=name, opts=tunnel_options(name, table, defaults, workers))
    check_listen_clashes({name: t.opts for name, t in tunnels.items()}, control)
    return FileConfig(path=path, tunnels=tunnels, control=control)


def load(path: str) -> FileConfig:
    """Read and check a tunnels file. Every problem raises UsageError with one
    line that names the file (as given), and the tunnel and key it is about."""
    path = os.fspath(path)
    try:
        return _load(path)
    except FileProblem as e:
        raise UsageError(_one_line(f"{path}: {e}")) from None
    except UsageError as e:    # already a whole message (listenclash), or a check not wrapped: name the file
        raise UsageError(_one_line(f"{path}: {e}")) from None


def _destination_text(opts: Options) -> str:
    host = f"[{opts.host}]" if ":" in opts.host else opts.host    # an IPv6 address, as ssh writes it
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
