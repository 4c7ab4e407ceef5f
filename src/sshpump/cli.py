"""``sshpump``: the command line read into Options; the work is in master.Master."""

from __future__ import annotations

import argparse
import getpass
import json
import logging
import os
import sys

from . import envsecrets, validate
from .envsecrets import PASSPHRASE_ENV, PASSWORD_ENV
from .errors import AuthError, SshpumpError, UsageError
from .procsetup import raise_fd_limit, setup_logging
from .master import Master, default_workers
from .options import Options
from .spec import parse_local_forward
from .sshopts import MAX_WINDOW, MAX_WORKERS, apply_option, check_options

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

# Options taking a value, read as ssh's getopt reads them (see _getopt_words).
SHORT_WITH_VALUE = "Lplio"
LONG_WITH_VALUE = ("--workers", "--ready-fd", "--drain-timeout", "--client-wait", "--window")
# ssh options a user may try; without this argparse reads `-R spec host`
# with the spec as the destination.
NOT_SUPPORTED = {
    "R": "-R (remote forwarding) is not supported: sshpump forwards with -L only",
    "D": "-D (dynamic SOCKS forwarding) is not supported: sshpump forwards with -L only",
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
    p.add_argument("destination", metavar="[user@]host")
    p.add_argument("-L", dest="local", action="append", default=[], metavar="spec",
                   help="[bind:]port:host:hostport | [bind:]port:/remote/socket | "
                   "/local/socket:host:hostport | /local/socket:/remote/socket")
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


def parse_command_line(argv: list[str]) -> tuple[Options, argparse.Namespace, bool]:
    """argv -> (Options, namespace, BatchMode): parsing and checks only, no
    environment, files or network. Every bad input raises UsageError (one
    line); -h and --version print and raise SystemExit(0), as argparse does."""
    ns = build_parser().parse_args(_getopt_words(list(argv)))
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
    opts.forwards = [parse_local_forward(s) for s in ns.local]
    if not opts.forwards:
        raise UsageError("nothing to forward: give at least one -L")
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
    if ns.ready_fd is not None:
        ns.ready_fd = validate.ascii_int(ns.ready_fd, "--ready-fd", 0, MAX_FD)
    check_options(opts)
    return opts, ns, bool(batch and batch[-1])


def one_line(text: str) -> str:
    """Control characters escaped: an error message is one line on stderr."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


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
        if not isinstance(addr, str):
            addr = f"[{addr[0]}]:{addr[1]}" if ":" in addr[0] else f"{addr[0]}:{addr[1]}"
        log.info("listening on %s for -L %s", addr, spec)
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
        opts, ns, batch = parse_command_line(argv)
    except UsageError as e:
        print(one_line(f"sshpump: {e}"), file=sys.stderr)
        return e.exit_code
    opts.password, opts.passphrase = password, passphrase
    interactive = sys.stdin.isatty() and not batch
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
            print(one_line(f"sshpump: {e}"), file=sys.stderr)
            return e.exit_code
        except KeyboardInterrupt:
            return 130


if __name__ == "__main__":
    sys.exit(main())
