"""ssh's ``-o Option=value`` and the library's keyword arguments read into
Options, and the check every Options passes (CLI, library, --config file)
before anything listens or connects."""

from __future__ import annotations

import os

from . import validate
from .errors import UsageError
from .hopspec import check_transport, parse_hop
from .options import DEFAULT_CIPHERS, STRICT_VALUES, Options
from .spec import parse_dynamic_forward, parse_local_forward, parse_remote_forward

YES_NO = {"yes": True, "no": False, "true": True, "false": False}
STRICT_ALIASES = {"true": "yes", "false": "no", "off": "no", "on": "yes"}
MAX_COUNT = 2**31 - 1     # ssh's ServerAliveCountMax limit (INT_MAX)
MAX_WORKERS = 1024        # a typo such as --workers 10000 must not fork that many processes
MAX_SESSIONS_PER_WORKER = 64   # each is an sshd process on the server
MAX_WINDOW = 1 << 30      # OpenSSH ends a session whose peer window would pass 2^32 - 1

# Canonical spelling of every -o option sshpump knows, for messages.
KNOWN = {name.lower(): name for name in (
    "UserKnownHostsFile", "StrictHostKeyChecking", "ConnectTimeout", "ServerAliveInterval",
    "ServerAliveCountMax", "ExitOnForwardFailure", "GatewayPorts", "IdentityFile",
    "IdentitiesOnly", "Ciphers", "Port", "User", "BatchMode",
)}
# Where the connection goes and how it is carried: the command line's -o
# takes them (and hands them to ssh -G, see sshconfig.py); a tunnels file
# does not (its _split uses KNOWN).
CLI_KNOWN = {**KNOWN, **{name.lower(): name for name in ("HostName", "ProxyJump", "ProxyCommand")}}


def _split(text: str, known: dict = KNOWN) -> tuple[str, str]:
    """'Key=value', 'Key value' or 'Key = value', as ssh accepts them."""
    if "=" in text:
        key, value = text.split("=", 1)
    else:
        parts = text.split(None, 1)
        if len(parts) != 2:
            raise UsageError(f"bad -o option {validate.show(text)}: expected Option=value")
        key, value = parts
    name = known.get(key.strip().lower())
    if name is None:
        raise UsageError(f"unsupported -o option {validate.show(key.strip())}")
    return name, value.strip()


def parse_jump(text: str, what: str = "-J") -> list[str]:
    """ProxyJump / -J as Options.proxy_jump: hops as "[user@]host[:port]"
    (an IPv6 address in brackets when a port follows), first hop first;
    "none": none. Each hop is read by hopspec.parse_hop, the reader the jump
    chain uses, so what is accepted here is what can be connected."""

    if text.strip().lower() == "none":
        return []
    hops = []
    for hop in text.split(","):
        try:
            spec = parse_hop(hop)
        except UsageError as e:
            raise UsageError(f"{what}: {e}") from None
        host = f"[{spec.host}]" if ":" in spec.host and spec.port is not None else spec.host
        hops.append((f"{spec.user}@" if spec.user else "") + host + (f":{spec.port}" if spec.port else ""))
    return hops


def apply_option(opts: Options, text: str, batch: list) -> str:
    """Apply one -o argument to opts; BatchMode values are appended to
    batch. Returns the option's name, as ssh spells it."""
    name, value = _split(text, CLI_KNOWN)
    what = f"-o {name}"

    def yes_no() -> bool:
        if value.lower() not in YES_NO:
            raise UsageError(f"{what} {validate.show(value)} is not yes or no")
        return YES_NO[value.lower()]

    if name == "UserKnownHostsFile":
        opts.known_hosts = [validate.local_file(v, what) for v in value.split()]
        if not opts.known_hosts:
            raise UsageError(f"{what} needs at least one path")
    elif name == "StrictHostKeyChecking":
        v = STRICT_ALIASES.get(value.lower(), value.lower())
        if v not in STRICT_VALUES:
            raise UsageError(f"{what} {validate.show(value)} is not yes, accept-new or no")
        opts.strict_host_key_checking = v
    elif name == "ConnectTimeout":
        opts.connect_timeout = validate.seconds(value, what) or None  # 0: no bound
    elif name == "ServerAliveInterval":
        # Whole seconds, as in ssh: a fraction such as 0.01 declared healthy
        # servers dead and reconnected workers in a loop.
        opts.server_alive_interval = validate.seconds(value, what)
    elif name == "ServerAliveCountMax":
        opts.server_alive_count_max = validate.ascii_int(value, what, 0, MAX_COUNT)
    elif name == "ExitOnForwardFailure":
        opts.exit_on_forward_failure = yes_no()
    elif name == "GatewayPorts":
        opts.gateway_ports = yes_no()
    elif name == "IdentityFile":
        opts.identities.append(validate.local_file(value, what))
    elif name == "IdentitiesOnly":
        opts.identities_only = yes_no()
    elif name == "Ciphers":
        opts.ciphers = validate.ciphers(value, DEFAULT_CIPHERS, what)
    elif name == "Port":
        opts.port = validate.port(value, what)
    elif name == "User":
        opts.user = validate.user(value, what)
    elif name == "BatchMode":
        batch.append(yes_no())
    elif name == "HostName":
        opts.host = validate.host(value, what, resolved_here=True)
    elif name == "ProxyJump":
        opts.proxy_jump = parse_jump(value, what)
    elif name == "ProxyCommand":
        if not value:
            raise UsageError(f"{what} needs a command (or none)")
        opts.proxy_command = None if value.lower() == "none" else value
    return name


def check_options(opts: Options) -> Options:
    """Check (and normalise) a whole Options; raises UsageError. The library
    sets fields directly, so this is where its values meet ssh's rules."""
    validate.host(opts.host, "host", resolved_here=True)
    validate.user(opts.user)
    validate.number_in(opts.port, "port", 1, 65535, integer=True)
    if opts.connect_timeout is not None:
        opts.connect_timeout = validate.number_in(
            opts.connect_timeout, "connect_timeout", 0, validate.MAX_SECONDS) or None
    interval = validate.number_in(opts.server_alive_interval, "server_alive_interval", 0, validate.MAX_SECONDS)
    if 0 < interval < 1:
        raise UsageError(f"server_alive_interval must be 0 (off) or at least 1 second, not {interval!r}")
    validate.number_in(opts.server_alive_count_max, "server_alive_count_max", 0, MAX_COUNT, integer=True)
    if opts.strict_host_key_checking not in STRICT_VALUES:
        raise UsageError(f"strict_host_key_checking must be one of {', '.join(STRICT_VALUES)}, "
                         f"not {opts.strict_host_key_checking!r}")
    if not opts.known_hosts:
        raise UsageError("known_hosts needs at least one path")
    for p in opts.known_hosts:
        validate.path(p, "known_hosts file")
    for p in opts.identities:
        validate.path(p, "identity file")
    if not isinstance(opts.ciphers, str):
        raise UsageError(f"ciphers must be a comma-separated string, not {opts.ciphers!r}")
    opts.ciphers = validate.ciphers(opts.ciphers, DEFAULT_CIPHERS)
    validate.number_in(opts.workers, "workers", 0, MAX_WORKERS, integer=True)
    validate.number_in(opts.window, "window", 0, MAX_WINDOW, integer=True)
    validate.number_in(opts.sessions_per_worker, "sessions_per_worker", 1, MAX_SESSIONS_PER_WORKER, integer=True)
    validate.number_in(opts.drain_timeout, "drain_timeout", 0, validate.MAX_SECONDS)
    validate.number_in(opts.client_wait, "client_wait", 0, validate.MAX_SECONDS)

    check_transport(opts)
    return opts


def build_options(
    destination: str,
    specs,
    *,
    port: int = 22,
    user: str | None = None,
    identity: str | list[str] | None = None,
    password: str | None = None,
    passphrase: str | None = None,
    known_hosts: str | list[str] | None = None,
    strict_host_key_checking: str = "yes",
    workers: int = 0,
    dynamic=(),
    remote=(),
    **options,
) -> Options:
    """forward()'s arguments as checked Options (shared with aio.forward).
    ``dynamic``: -D specs ([bind:]port), SOCKS proxies beside the -L specs;
    ``remote``: -R specs."""
    u, _, host = destination.rpartition("@")
    opts = Options(host=host, port=port, workers=workers)
    if u or user:
        opts.user = user or u
    if identity:
        opts.identities = [identity] if isinstance(identity, (str, os.PathLike)) else list(identity)
        opts.identities = [os.path.expanduser(os.fspath(p)) for p in opts.identities]
    opts.password = password
    opts.passphrase = passphrase
    if known_hosts:
        opts.known_hosts = [known_hosts] if isinstance(known_hosts, (str, os.PathLike)) else list(known_hosts)
        opts.known_hosts = [os.path.expanduser(os.fspath(p)) for p in opts.known_hosts]
    opts.strict_host_key_checking = strict_host_key_checking
    dynamic = [dynamic] if isinstance(dynamic, str) else dynamic
    remote = [remote] if isinstance(remote, str) else remote
    opts.forwards = ([parse_local_forward(s) for s in specs] + [parse_remote_forward(s) for s in remote]
                     + [parse_dynamic_forward(s) for s in dynamic])
    for key, value in options.items():
        if key == "forwards" or not hasattr(opts, key):
            raise TypeError(f"forward() got an unknown option {key!r}")
        setattr(opts, key, value)
    return check_options(opts)  # bad values fail here, not inside a worker


def option_value(text: str) -> str:
    """The value of one -o argument (already checked by apply_option)."""
    return _split(text, CLI_KNOWN)[1]
