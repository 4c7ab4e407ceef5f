"""``sshpump``'s command line read into Options (one tunnel) or a --config
file path; launch.py runs it."""

from __future__ import annotations

import argparse

from . import validate
from .envsecrets import PASSPHRASE_ENV, PASSWORD_ENV
from .errors import UsageError
from .options import Options, default_workers
from .spec import parse_dynamic_forward, parse_local_forward, parse_remote_forward
from .sshopts import MAX_WINDOW, MAX_WORKERS, apply_option, check_options

USAGE = """sshpump [-gv] [-L spec]... [-R spec]... [-D [bind:]port]... [-p port] [-l login] [-i identity_file]
               [-o option=value]... [--workers N] [--control PATH] [--ready-fd FD] [user@]host
       sshpump --config tunnels.toml [--check] [--control PATH] [-v] [--ready-fd FD]
       sshpump ctl PATH {add -L|-R|-D spec|remove ID|list|connections|stats|reload|drain|stop} [--json]"""

EXIT_CODES = """exit status:
  0  stopped by SIGINT/SIGTERM after draining
  2  usage error (bad option, malformed forward spec)
  3  cannot connect to the SSH server / session failed at start
  4  host key unknown or changed
  5  authentication failed
  6  forward failed (listen address in use, ExitOnForwardFailure)
  7  internal error (ssh2-python does not match the C pump)"""

# Options taking a value, read as ssh's getopt reads them (see _getopt_words).
SHORT_WITH_VALUE = "LRDplio"
LONG_WITH_VALUE = ("--workers", "--ready-fd", "--drain-timeout", "--client-wait", "--window", "--control",
                   "--config", "--metrics", "--log-format")
# ssh options a user may try; without this argparse reads `-R spec host`
# with the spec as the destination.
NOT_SUPPORTED = {
    "J": "-J (ProxyJump) is not supported",
    "W": "-W (stdio forwarding) is not supported",
    "F": "-F is not supported: ssh config files are not read; give options with -o",
}
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
        "GatewayPorts, IdentityFile, IdentitiesOnly, Ciphers, Port, User, BatchMode.\n"
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
    p.add_argument("-g", dest="gateway", action="store_true", help="allow remote hosts to connect to local forwards")
    p.add_argument("-v", dest="verbose", action="count", default=0, help="log every connection (-vv: debug)")
    for flag in ("-N", "-n", "-T", "-f"):
        p.add_argument(flag, action="store_true", help=argparse.SUPPRESS)  # ssh habits: implied
    p.add_argument("--workers", default=None,
                   help=f"worker processes, each with its own SSH session (default: CPU count, {default_workers()} here); "
                   "0 runs everything in one process")
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
TUNNEL_ONLY = ("local", "remote", "dynamic", "port", "login", "identity", "options", "gateway", "workers", "drain_timeout",
               "client_wait", "window", "mux")


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
    """argv -> (Options, namespace, BatchMode): parsing and checks only, no
    environment, files or network. Every bad input raises UsageError (one
    line); -h and --version print and raise SystemExit(0), as argparse does.
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
    user, _, host = ns.destination.rpartition("@")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    opts = Options(host=validate.host(host, "host", resolved_here=True))
    if user:
        opts.user = validate.user(user)
    batch = []
    for o in ns.options:
        apply_option(opts, o, batch)
    if ns.login is not None:
        opts.user = validate.user(ns.login, "-l")
    if ns.port is not None:
        opts.port = validate.port(ns.port, "-p")
    opts.identities = [validate.local_file(i, "-i") for i in ns.identity] + opts.identities
    opts.forwards = ([parse_local_forward(s) for s in ns.local] + [parse_remote_forward(s) for s in ns.remote]
                     + [parse_dynamic_forward(s) for s in ns.dynamic])
    if not opts.forwards:
        raise UsageError("nothing to forward: give at least one -L, -R or -D")
    opts.gateway_ports = opts.gateway_ports or ns.gateway
    opts.verbose = ns.verbose
    opts.workers = (default_workers() if ns.workers is None
                    else validate.ascii_int(ns.workers, "--workers", 0, MAX_WORKERS))
    if ns.drain_timeout is not None:
        opts.drain_timeout = validate.decimal_seconds(ns.drain_timeout, "--drain-timeout")
    if ns.client_wait is not None:
        opts.client_wait = validate.decimal_seconds(ns.client_wait, "--client-wait")
    if ns.window is not None:
        opts.window = validate.ascii_int(ns.window, "--window", 0, MAX_WINDOW)
    opts.mux = ns.mux
    check_options(opts)
    return opts, ns, bool(batch and batch[-1])


def one_line(text: str) -> str:
    """Control characters escaped: an error message is one line on stderr."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
