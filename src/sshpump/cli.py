"""``sshpump``'s command line read into Options (one tunnel) or a --config
file path; launch.py runs it."""

from __future__ import annotations

import argparse
import sys

from . import sshconfig, validate
from .envsecrets import PASSPHRASE_ENV, PASSWORD_ENV
from .errors import UsageError
from .options import Options, default_workers
from .spec import parse_dynamic_forward, parse_local_forward, parse_remote_forward
from .sshopts import (MAX_SESSIONS_PER_WORKER, MAX_WINDOW, MAX_WORKERS, apply_option, check_options, option_value,
                      parse_jump)

USAGE = """sshpump [-gvG] [-L spec]... [-R spec]... [-D [bind:]port]... [-p port] [-l login] [-i identity_file]
               [-F configfile] [-J [user@]host[:port][,...]] [-o option=value]...
               [--workers N] [--control PATH] [--ready-fd FD] [user@]host
       sshpump --config tunnels.toml [--check] [--control PATH] [-v] [--ready-fd FD]
       sshpump ctl PATH {add -L|-R|-D spec|remove ID|list|connections|stats|reload|drain|stop} [--json]"""

EXIT_CODES = """exit status:
  0  stopped by SIGINT/SIGTERM after draining
  2  usage error (bad option, malformed forward spec, an ssh config ssh -G refuses)
  3  cannot connect to the SSH server / session failed at start
  4  host key unknown or changed
  5  authentication failed
  6  forward failed (listen address in use, ExitOnForwardFailure)
  7  internal error (ssh2-python does not match the C pump)"""

# Options taking a value, read as ssh's getopt reads them (see _getopt_words).
SHORT_WITH_VALUE = "LRDplioFJ"
LONG_WITH_VALUE = ("--workers", "--sessions-per-worker", "--ready-fd", "--drain-timeout", "--client-wait", "--window",
                   "--control",
                   "--config", "--metrics", "--log-format")
# ssh options a user may try; without this argparse reads `-R spec host`
# with the spec as the destination.
NOT_SUPPORTED = {
    "W": "-W (stdio forwarding) is not supported",
}
# -o options that take part in ssh's own resolution of the config (Host and
# Match blocks, %-tokens, ProxyJump versus ProxyCommand): they go to ssh -G
# and its answer is used. The others sshpump reads itself, after the config.
SSH_RESOLVES = ("HostName", "User", "Port", "ProxyJump", "ProxyCommand")
MAX_FD = 2**31 - 1


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise UsageError(message)


def version_text() -> str:
    """``sshpump --version``: ours, the libssh2 in use (patched or stock, its path), OpenSSL."""
    from importlib.metadata import PackageNotFoundError, version

    from .libssh2_loader import LOADED

    try:
        ours = version("sshpump")
    except PackageNotFoundError:
        ours = "unknown (not installed)"
    why = f" ({LOADED.why_stock})" if LOADED.why_stock else ""
    return (f"sshpump {ours}\n"
            f"libssh2 1.11.1, {LOADED.kind}{why}: {LOADED.path}\n"
            f"{LOADED.openssl}")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="sshpump",
        usage=USAGE,
        description="SSH port forwarding like `ssh -nNT -L`, carried by worker processes "
        "with their own SSH sessions and a C pump.",
        epilog="-o options: UserKnownHostsFile, StrictHostKeyChecking (yes|accept-new|no), "
        "ConnectTimeout, ServerAliveInterval, ServerAliveCountMax, ExitOnForwardFailure, "
        "GatewayPorts, IdentityFile, IdentitiesOnly, Ciphers, Port, User, BatchMode, HostName, "
        "ProxyJump, ProxyCommand.\n~/.ssh/config (or -F file) is read through `ssh -G` when ssh is installed.\n"
        f"Password: set {PASSWORD_ENV} (never on the command line) or answer the prompt. "
        f"Key passphrase: {PASSPHRASE_ENV} or the prompt.\n\n" + EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--version", action="version", version=version_text(),
                   help="print sshpump's version, the libssh2 in use and OpenSSL's version")
    p.add_argument("destination", metavar="[user@]host", nargs="?")
    p.add_argument("-L", dest="local", action="append", default=[], metavar="spec",
                   help="[bind:]port:host:hostport | [bind:]port:/remote/socket | "
                   "/local/socket:host:hostport | /local/socket:/remote/socket")
    p.add_argument("-R", dest="remote", action="append", default=[], metavar="spec",
                   help="[bind:]port:host:hostport | [bind:]port:/local/socket: the server listens "
                   "(port 0: it chooses, and sshpump prints which) and each connection comes back here")
    p.add_argument("-D", dest="dynamic", action="append", default=[], metavar="[bind:]port",
                   help="a SOCKS (4, 4a, 5) proxy: each connection goes where its client asks, "
                   "names resolved by the server")
    p.add_argument("-p", dest="port", help="SSH server port (default 22)")
    p.add_argument("-l", dest="login", help="user to log in as")
    p.add_argument("-i", dest="identity", action="append", default=[], metavar="identity_file")
    p.add_argument("-o", dest="options", action="append", default=[], metavar="option=value")
    p.add_argument("-F", dest="ssh_config", metavar="configfile",
                   help="ssh config file instead of ~/.ssh/config and /etc/ssh/ssh_config; none: no file")
    p.add_argument("-J", dest="jump", metavar="[user@]host[:port][,...]",
                   help="reach the server through these jump hosts (ProxyJump); none: directly")
    p.add_argument("-G", dest="print_config", action="store_true",
                   help="print the settings and forwards sshpump resolved, then exit")
    p.add_argument("-g", dest="gateway", action="store_true", help="allow remote hosts to connect to local forwards")
    p.add_argument("-v", dest="verbose", action="count", default=0, help="log every connection (-vv: debug)")
    for flag in ("-N", "-n", "-T", "-f"):
        p.add_argument(flag, action="store_true", help=argparse.SUPPRESS)  # ssh habits: implied
    p.add_argument("--workers", default=None,
                   help=f"worker processes, each with its own SSH session (default: CPU count, {default_workers()} here); "
                   "0 runs everything in one process")
    p.add_argument("--sessions-per-worker", default=None, metavar="K",
                   help="SSH sessions in each worker (default 1): K channel opens in flight per worker, "
                   "at the price of K sshd processes on the server")
    p.add_argument("--ready-fd", default=None, metavar="FD",
                   help="when ready, write one JSON line (pid, listen addresses) to FD and close it")
    p.add_argument("--drain-timeout", default=None, metavar="SECONDS",
                   help="on SIGTERM/SIGINT, how long open connections may finish (default 10)")
    p.add_argument("--client-wait", default=None, metavar="SECONDS",
                   help="how long a new client waits while no SSH session is up (default 10)")
    p.add_argument("--window", default=None, metavar="BYTES",
                   help="SSH receive window per channel (default libssh2's 2 MiB); raise it on high-latency links")
    p.add_argument("--mux", action="store_true",
                   help="carry every -L connection of a worker inside ONE channel, to a small agent sshpump runs "
                   "on the server with python3 (bypasses sshd's AllowTcpForwarding/PermitOpen; see README)")
    p.add_argument("--control", default=None, metavar="PATH",
                   help="serve a control socket at PATH (mode 0600): `sshpump ctl PATH ...` adds and removes "
                   "forwards, lists connections, drains")
    p.add_argument("--config", default=None, metavar="FILE",
                   help="run the tunnels a TOML file names (several destinations); SIGHUP re-reads it")
    p.add_argument("--check", action="store_true", help="with --config: check the file, print it, exit")
    p.add_argument("--metrics", default=None, metavar="[ADDR:]PORT",
                   help="serve Prometheus metrics at /metrics and a health check at /healthz "
                   "(default address 127.0.0.1)")
    p.add_argument("--log-format", default="text", choices=("text", "json"),
                   help="text (default) or json: one object per line for log shippers")
    return p


def _getopt_words(argv: list[str]) -> list[str]:
    """Join every option to its value, as ssh's getopt does: argparse would
    take a value that starts with '-' (`-L -1:h:80`) for an option. Refuse
    ssh options sshpump does not have before argparse misreads them."""
    words, i = [], 0
    while i < len(argv):
        word = argv[i]
        i += 1
        if word == "--":
            return words + argv[i - 1:]
        if word in LONG_WITH_VALUE and i < len(argv):
            words.append(f"{word}={argv[i]}")
            i += 1
            continue
        if word.startswith("-") and not word.startswith("--"):
            for pos, flag in enumerate(word[1:], 1):
                if flag in NOT_SUPPORTED:
                    raise UsageError(NOT_SUPPORTED[flag])
                if flag in SHORT_WITH_VALUE:  # the rest of the word, or the next one, is its value
                    if pos == len(word) - 1 and i < len(argv):
                        word += argv[i]
                        i += 1
                    break
        words.append(word)
    return words


# With --config, what belongs to a tunnel is in the file.
TUNNEL_ONLY = ("local", "remote", "dynamic", "port", "login", "identity", "options", "gateway", "workers",
               "sessions_per_worker", "drain_timeout", "client_wait", "window", "ssh_config", "jump", "print_config",
               "mux")


def _check_config_mode(ns):
    if ns.config is None:
        if ns.check:
            raise UsageError("--check needs --config FILE")
        if ns.destination is None:
            raise UsageError("missing destination ([user@]host), or give --config FILE")
        return
    if ns.destination is not None:
        raise UsageError("--config names the destinations: give no [user@]host beside it")
    given = [k for k in TUNNEL_ONLY if getattr(ns, k) not in (None, [], False)]
    if given and given[0] in ("ssh_config", "jump", "print_config"):
        raise UsageError("--config: -F, -J and -G are for a command-line tunnel ([user@]host), not with a tunnels file")
    if given:
        raise UsageError(f"--config: set {given[0].replace('_', '-')} in the file, per tunnel")
    ns.config = validate.local_file(ns.config, "--config")
    if ns.control is not None:
        ns.control = validate.path(ns.control, "--control", max_bytes=validate.UNIX_PATH_MAX)


def metrics_address(text: str) -> tuple[str, int]:
    """--metrics [ADDR:]PORT: loopback unless an address is given; IPv6 in brackets."""
    host, sep, port = text.rpartition(":")
    if not sep:
        host = "127.0.0.1"
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not host:
        raise UsageError(f"--metrics {validate.show(text)}: empty address")
    validate.host(host, "--metrics address", resolved_here=True)
    return host, validate.port(port, "--metrics port", allow_zero=True)


def parse_command_line(argv: list[str]) -> tuple[Options | None, argparse.Namespace, bool]:
    """argv -> (Options, namespace, BatchMode): parsing and checks, and the
    ssh config as ``ssh -G`` resolves it (the only outside work: no network,
    unless a Match exec command or CanonicalizeHostname in the user's config
    does some). Every bad input raises UsageError (one line); -h, --version
    and -G print and raise SystemExit(0), as argparse does.
    With --config, Options is None: the tunnels come from the file."""
    ns = build_parser().parse_args(_getopt_words(list(argv)))
    _check_config_mode(ns)
    if ns.metrics is not None:
        ns.metrics = metrics_address(ns.metrics)
    if ns.ready_fd is not None:
        ns.ready_fd = validate.ascii_int(ns.ready_fd, "--ready-fd", 0, MAX_FD)
    if ns.config is not None:
        return None, ns, False
    if ns.control is not None:
        ns.control = validate.path(ns.control, "--control", max_bytes=validate.UNIX_PATH_MAX)
    opts, batch, to_ssh, own = _from_command_line(ns)
    config_batch, config_forwards, (_remote, remote_specs) = _read_ssh_config(opts, ns, to_ssh, own)
    config_forwards += [_config_remote(spec) for spec in remote_specs]
    for fwd in config_forwards:   # ssh adds a config forward unless the same one is there already
        if not any((type(f), f.listen, f.target) == (type(fwd), fwd.listen, fwd.target) for f in opts.forwards):
            opts.forwards.append(fwd)
    batch_mode = bool(batch[-1]) if batch else bool(config_batch)
    check_options(opts)
    if ns.print_config:
        print(sshconfig.describe(opts, batch_mode))
        raise SystemExit(0)
    if not opts.forwards:
        raise UsageError("nothing to forward: give at least one -L, -R or -D (or LocalForward, RemoteForward "
                         "or DynamicForward in the ssh config)")
    return opts, ns, batch_mode


def _config_remote(spec: str):
    """A config RemoteForward (as an -R spec); its errors name where it came from."""
    try:
        return parse_remote_forward(spec)
    except UsageError as e:
        raise UsageError(f"RemoteForward in the ssh config: {e}") from None


def _from_command_line(ns) -> tuple[Options, list, list[str], set[str]]:
    """Options from the command line alone, every value checked (before
    ssh -G runs a config's Match exec commands). Also returns the BatchMode
    values, the -o options for ssh -G (SSH_RESOLVES) and the names of the
    other -o options given (they win over the config's)."""
    user, _, host = ns.destination.rpartition("@")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    opts = Options(host=validate.host(host, "host", resolved_here=True))
    if user:
        opts.user = validate.user(user)
    batch, to_ssh, own = [], [], set()
    for o in ns.options:
        name = apply_option(opts, o, batch)   # checked here first: errors are ours, one line
        if name in SSH_RESOLVES:
            to_ssh.append(f"{name}={option_value(o)}")
        else:
            own.add(name)
    opts.identities = [validate.local_file(i, "-i") for i in ns.identity] + opts.identities
    if ns.login is not None:
        opts.user = validate.user(ns.login, "-l")
    if ns.port is not None:
        opts.port = validate.port(ns.port, "-p")
    if ns.jump is not None:
        opts.proxy_jump = parse_jump(ns.jump, "-J")
    if ns.ssh_config is not None:
        validate.path(ns.ssh_config, "-F")
    opts.forwards = ([parse_local_forward(s) for s in ns.local] + [parse_remote_forward(s) for s in ns.remote]
                     + [parse_dynamic_forward(s) for s in ns.dynamic])
    if ns.gateway:   # -g is -o GatewayPorts=yes
        opts.gateway_ports = True
        own.add("GatewayPorts")
    opts.verbose = ns.verbose
    opts.workers = (default_workers() if ns.workers is None
                    else validate.ascii_int(ns.workers, "--workers", 0, MAX_WORKERS))
    if ns.sessions_per_worker is not None:
        opts.sessions_per_worker = validate.ascii_int(ns.sessions_per_worker, "--sessions-per-worker", 1,
                                                      MAX_SESSIONS_PER_WORKER)
    if ns.drain_timeout is not None:
        opts.drain_timeout = validate.decimal_seconds(ns.drain_timeout, "--drain-timeout")
    if ns.client_wait is not None:
        opts.client_wait = validate.decimal_seconds(ns.client_wait, "--client-wait")
    if ns.window is not None:
        opts.window = validate.ascii_int(ns.window, "--window", 0, MAX_WINDOW)
    opts.mux = ns.mux
    return opts, batch, to_ssh, own


def _read_ssh_config(opts: Options, ns, to_ssh: list[str], own: set[str]):
    """The ssh config's settings into opts, as ``ssh -G`` resolves them for
    this command line. Returns (the config's BatchMode or None, its
    LocalForward/DynamicForward, (its RemoteForward lines, the same as -R specs))."""
    ssh = sshconfig.find_ssh()
    if ssh is None:
        if ns.ssh_config not in (None, "none"):
            raise UsageError(f"-F {validate.show(ns.ssh_config)}: ssh is not installed (not on PATH), "
                             "and sshpump reads ssh config files through `ssh -G`")
        if ns.ssh_config is None:   # with -F none no file was wanted: nothing to warn of
            _warn_ssh_missing()
        return None, [], ([], [])
    user, _, host = ns.destination.rpartition("@")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    resolved = sshconfig.resolve(ssh, sshconfig.Query(
        destination=f"{user}@{host}" if user else host, config_file=ns.ssh_config,
        port=ns.port, login=ns.login, jump=ns.jump, options=to_ssh))
    command_line_identities, opts.identities = opts.identities, []
    config_batch = sshconfig.apply(opts, resolved, host, own)
    opts.identities = command_line_identities + opts.identities   # as in ssh: the command line's first
    opts.proxy_jump = sshconfig.resolve_hops(ssh, opts.proxy_jump, ns.ssh_config)
    config_forwards, remote, remote_specs = sshconfig.config_forwards(resolved)
    return config_batch, config_forwards, (remote, remote_specs)


_warned_ssh_missing = False


def _warn_ssh_missing() -> None:
    # Once per process: the fuzz tests and a reload may parse many times.
    global _warned_ssh_missing
    if not _warned_ssh_missing:
        _warned_ssh_missing = True
        print(f"sshpump: warning: {sshconfig.SSH_MISSING}", file=sys.stderr)


def one_line(text: str) -> str:
    """Control characters escaped: an error message is one line on stderr."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
