"""``sshpump``: argument parsing only; the work is in master.Master."""

from __future__ import annotations

import argparse
import getpass
import json
import logging
import os
import sys

from . import envsecrets
from .envsecrets import PASSPHRASE_ENV, PASSWORD_ENV
from .errors import AuthError, SshpumpError, UsageError
from .procsetup import raise_fd_limit, setup_logging
from .master import Master, default_workers
from .options import STRICT_VALUES, Options
from .spec import parse_local_forward

log = logging.getLogger("sshpump")

USAGE = """sshpump [-gv] [-L spec]... [-p port] [-l login] [-i identity_file]
               [-o option=value]... [--workers N] [--ready-fd FD] [user@]host"""

EXIT_CODES = """exit status:
  0  stopped by SIGINT/SIGTERM after draining
  2  usage error (bad option, malformed forward spec)
  3  cannot connect to the SSH server / session failed at start
  4  host key unknown or changed
  5  authentication failed
  6  forward failed (listen address in use, ExitOnForwardFailure)
  7  internal error (ssh2-python does not match the C pump)"""

YES_NO = {"yes": True, "no": False, "true": True, "false": False}


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
    p.add_argument("destination", metavar="[user@]host")
    p.add_argument("-L", dest="local", action="append", default=[], metavar="spec",
                   help="[bind:]port:host:hostport | [bind:]port:/remote/socket | "
                   "/local/socket:host:hostport | /local/socket:/remote/socket")
    p.add_argument("-p", dest="port", type=int, help="SSH server port (default 22)")
    p.add_argument("-l", dest="login", help="user to log in as")
    p.add_argument("-i", dest="identity", action="append", default=[], metavar="identity_file")
    p.add_argument("-o", dest="options", action="append", default=[], metavar="option=value")
    p.add_argument("-g", dest="gateway", action="store_true", help="allow remote hosts to connect to local forwards")
    p.add_argument("-v", dest="verbose", action="count", default=0, help="log every connection (-vv: debug)")
    for flag in ("-N", "-n", "-T", "-f"):
        p.add_argument(flag, action="store_true", help=argparse.SUPPRESS)  # ssh habits: implied
    p.add_argument("--workers", type=int, default=None,
                   help=f"worker processes, each with its own SSH session (default: CPU count, {default_workers()} here); "
                   "0 runs everything in one process")
    p.add_argument("--ready-fd", type=int, default=None, metavar="FD",
                   help="when ready, write one JSON line (pid, listen addresses) to FD and close it")
    p.add_argument("--drain-timeout", type=float, default=10.0, metavar="SECONDS",
                   help="on SIGTERM/SIGINT, how long open connections may finish (default 10)")
    p.add_argument("--client-wait", type=float, default=10.0, metavar="SECONDS",
                   help="how long a new client waits while no SSH session is up (default 10)")
    p.add_argument("--window", type=int, default=0, metavar="BYTES",
                   help="SSH receive window per channel (default libssh2's 2 MiB); raise it on high-latency links")
    return p


def _apply_option(opts: Options, text: str, batch: list) -> None:
    if "=" in text:
        key, value = text.split("=", 1)
    else:
        parts = text.split(None, 1)
        if len(parts) != 2:
            raise UsageError(f"bad -o option {text!r}: expected Option=value")
        key, value = parts
    key_l, value = key.strip().lower(), value.strip()

    def yes_no():
        if value.lower() not in YES_NO:
            raise UsageError(f"bad -o {key}={value}: expected yes or no")
        return YES_NO[value.lower()]

    def number(kind=float):
        try:
            return kind(value)
        except ValueError:
            raise UsageError(f"bad -o {key}={value}: expected a number") from None

    if key_l == "userknownhostsfile":
        opts.known_hosts = [os.path.expanduser(v) for v in value.split()]
    elif key_l == "stricthostkeychecking":
        v = value.lower()
        v = {"true": "yes", "false": "no", "off": "no", "on": "yes"}.get(v, v)
        if v not in STRICT_VALUES:
            raise UsageError(f"bad -o StrictHostKeyChecking={value}: expected yes, accept-new or no")
        opts.strict_host_key_checking = v
    elif key_l == "connecttimeout":
        opts.connect_timeout = number() or None
    elif key_l == "serveraliveinterval":
        opts.server_alive_interval = number()
    elif key_l == "serveralivecountmax":
        opts.server_alive_count_max = number(int)
    elif key_l == "exitonforwardfailure":
        opts.exit_on_forward_failure = yes_no()
    elif key_l == "gatewayports":
        opts.gateway_ports = yes_no()
    elif key_l == "identityfile":
        opts.identities.append(os.path.expanduser(value))
    elif key_l == "identitiesonly":
        opts.identities_only = yes_no()
    elif key_l == "ciphers":
        opts.ciphers = value
    elif key_l == "port":
        opts.port = number(int)
    elif key_l == "user":
        opts.user = value
    elif key_l == "batchmode":
        batch.append(yes_no())
    else:
        raise UsageError(f"unsupported -o option {key!r}")


def parse_args(argv) -> tuple[Options, argparse.Namespace, bool]:
    ns = build_parser().parse_args(argv)
    dest = ns.destination
    user, _, host = dest.rpartition("@")
    if not host:
        raise UsageError(f"bad destination {dest!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    opts = Options(host=host)
    if user:
        opts.user = user
    batch = []
    for o in ns.options:
        _apply_option(opts, o, batch)
    if ns.login:
        opts.user = ns.login
    if ns.port is not None:
        opts.port = ns.port
    if not 0 < opts.port < 65536:
        raise UsageError(f"bad port {opts.port}")
    opts.identities = [os.path.expanduser(i) for i in ns.identity] + opts.identities
    opts.forwards = [parse_local_forward(s) for s in ns.local]
    if not opts.forwards:
        raise UsageError("nothing to forward: give at least one -L")
    opts.gateway_ports = opts.gateway_ports or ns.gateway
    opts.verbose = ns.verbose
    opts.workers = default_workers() if ns.workers is None else ns.workers
    if opts.workers < 0:
        raise UsageError("--workers must be >= 0")
    opts.drain_timeout = ns.drain_timeout
    opts.client_wait = ns.client_wait
    opts.window = ns.window
    interactive = sys.stdin.isatty() and not (batch and batch[-1])
    return opts, ns, interactive


def _key_is_encrypted(path: str) -> bool:
    import base64

    try:
        with open(path) as f:
            text = f.read()
    except OSError:
        return False
    if "ENCRYPTED" in text:
        return True
    if "BEGIN OPENSSH PRIVATE KEY" in text:
        body = "".join(line for line in text.splitlines() if not line.startswith("-----"))
        try:
            raw = base64.b64decode(body)
        except ValueError:
            return False
        magic = b"openssh-key-v1\0"
        if raw.startswith(magic):
            n = int.from_bytes(raw[len(magic) : len(magic) + 4], "big")
            cipher = raw[len(magic) + 4 : len(magic) + 4 + n]
            return cipher != b"none"
    return False


async def _run(opts: Options, ns) -> int:
    master = Master(opts)
    master.handle_signals()  # before start: a signal during start-up still closes the listeners
    if not await master.start():
        log.info("stopped before ready")
        return 0
    addrs = master.addresses()
    for spec, addr in addrs:
        log.info("listening on %s for -L %s", addr if isinstance(addr, str) else f"{addr[0]}:{addr[1]}", spec)
    log.info("ready (pid %d, %d workers)", os.getpid(), opts.workers)
    if ns.ready_fd is not None:
        line = json.dumps({"ready": True, "pid": os.getpid(),
                           "listen": [{"spec": s, "address": a} for s, a in addrs]})
        try:
            os.write(ns.ready_fd, (line + "\n").encode())
            os.close(ns.ready_fd)
        except OSError as e:
            log.warning("cannot write readiness to fd %d: %s", ns.ready_fd, e.strerror)
    await master.serve()
    log.info("stopped")
    return 0


def main(argv=None) -> int:
    # Secrets leave the environment first: workers must not inherit them,
    # nor may /proc/PID/environ show them.
    password = envsecrets.take(PASSWORD_ENV)
    passphrase = envsecrets.take(PASSPHRASE_ENV)
    argv = sys.argv[1:] if argv is None else argv
    try:
        opts, ns, interactive = parse_args(argv)
    except UsageError as e:
        print(f"sshpump: {e}", file=sys.stderr)
        return e.exit_code
    opts.password, opts.passphrase = password, passphrase
    setup_logging(opts.verbose)
    raise_fd_limit()
    if interactive and opts.passphrase is None:
        for path in opts.identity_files():
            if _key_is_encrypted(path):
                opts.passphrase = getpass.getpass(f"Enter passphrase for key '{path}': ")
                break
    import uvloop

    while True:
        try:
            return uvloop.run(_run(opts, ns))
        except SshpumpError as e:
            # Worker processes report auth failures as plain SshpumpError
            # with AuthError's exit code; the server's methods are in the text.
            offered = str(e).split("tried:")[0]
            if (e.exit_code == AuthError.exit_code and interactive and opts.password is None
                    and "password" in offered):
                opts.password = getpass.getpass(f"{opts.user}@{opts.host}'s password: ")
                continue
            print(f"sshpump: {e}", file=sys.stderr)
            return e.exit_code
        except KeyboardInterrupt:
            return 130


if __name__ == "__main__":
    sys.exit(main())
