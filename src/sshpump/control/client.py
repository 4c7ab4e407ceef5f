"""The control socket's client: ``request()`` for programs, ``main()`` for
``sshpump ctl PATH COMMAND [ARGS] [--json]`` (also ``python -m
sshpump.control.client PATH ...``). Every failure is one line on stderr and
an exit code, never a traceback."""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import sys
import time
from typing import Any

from ..errors import ConnectError, SshpumpError, UsageError
from .protocol import MAX_RESPONSE, decode_response, encode_request, one_line
from .views import render


def request(path: str, cmd: str, args: dict | None = None, timeout: float = 30) -> Any:
    """Send one request and return its result, or raise the error the
    server answered with (its class rebuilt by name, with its exit code).
    A socket nobody serves raises ConnectError (exit code 3); no answer
    within ``timeout`` seconds too."""
    line = encode_request(cmd, args)   # bad requests fail here, before connecting
    deadline = time.monotonic() + timeout
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        try:
            sock.settimeout(timeout)
            sock.connect(path)
        except OSError as e:
            raise ConnectError(f"cannot reach sshpump at {path}: {_why(e)}") from None
        try:
            sock.sendall(line)
        except (BrokenPipeError, ConnectionResetError):
            pass   # refused peers get an answer and a close: read it below
        except OSError as e:
            raise ConnectError(f"cannot reach sshpump at {path}: {_why(e)}") from None
        return decode_response(_read_line(sock, path, deadline, timeout))
    finally:
        sock.close()


def _why(e: OSError) -> str:
    if isinstance(e, socket.timeout):
        return "timed out"
    return e.strerror or str(e) or type(e).__name__


def _read_line(sock, path, deadline, timeout) -> bytes:
    buf = bytearray()
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise ConnectError(f"sshpump at {path} did not answer within {timeout:g} s")
        sock.settimeout(left)
        try:
            chunk = sock.recv(65536)
        except socket.timeout:
            continue  # the deadline check above says so
        except OSError as e:
            raise ConnectError(f"lost the connection to sshpump at {path}: {_why(e)}") from None
        if not chunk:
            raise ConnectError(f"sshpump at {path} closed the connection without an answer")
        end = chunk.find(b"\n")
        if end >= 0:
            buf += chunk[:end]
            return bytes(buf)
        buf += chunk
        if len(buf) > MAX_RESPONSE:
            raise SshpumpError(f"answer from sshpump at {path} longer than {MAX_RESPONSE} bytes")


# ---- the command line -----------------------------------------------------

PROG = "sshpump ctl"
USAGE = f"""{PROG} PATH add {{-L SPEC|-R SPEC|-D [BIND:]PORT}} [--tunnel NAME]
       {PROG} PATH remove ID|SPEC [--tunnel NAME]
       {PROG} PATH {{list|connections|stats|ping|reload|stop}}
       {PROG} PATH drain [--timeout SECONDS]
       (--json anywhere: print the raw result as JSON)"""
_SECONDS = re.compile(r"[0-9]+(\.[0-9]+)?\Z")   # ASCII digits only, as elsewhere in sshpump


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise UsageError(message)


def _seconds(text: str) -> float:
    if not _SECONDS.match(text):
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}")
    return float(text)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog=PROG, usage=USAGE, description="Talk to a running sshpump's control socket (--control PATH).")
    p.add_argument("path", metavar="PATH", help="the control socket")
    sub = p.add_subparsers(dest="cmd", metavar="COMMAND", required=True, parser_class=_Parser)
    add = sub.add_parser("add", help="add a forward")
    add.add_argument("-L", dest="spec", action="append", default=[], metavar="SPEC")
    add.add_argument("-R", dest="remote", action="append", default=[], metavar="SPEC")
    add.add_argument("-D", dest="dynamic", action="append", default=[], metavar="[BIND:]PORT")
    add.add_argument("--tunnel", metavar="NAME")
    rm = sub.add_parser("remove", help="remove a forward (its connections finish)")
    rm.add_argument("forward", metavar="ID|SPEC")
    rm.add_argument("--tunnel", metavar="NAME")
    for name, text in (("list", "list forwards"), ("connections", "list open connections"),
                       ("stats", "print counters"), ("ping", "check that sshpump answers"),
                       ("reload", "re-read the --config file"), ("stop", "stop now")):
        sub.add_parser(name, help=text)
    drain = sub.add_parser("drain", help="stop accepting, let connections finish, then stop")
    drain.add_argument("--timeout", type=_seconds, metavar="SECONDS")
    return p


def parse(argv: list[str]) -> tuple[str, str, dict, bool]:
    """argv -> (path, cmd, args, as_json); UsageError if bad. --json may
    stand anywhere before a `--` (argparse would want it before COMMAND)."""
    end = argv.index("--") if "--" in argv else len(argv)
    as_json = "--json" in argv[:end]
    argv = [a for a in argv[:end] if a != "--json"] + list(argv[end:])
    ns = build_parser().parse_args(argv)
    if ns.path == "":
        raise UsageError("PATH must not be empty")
    args: dict = {}
    if ns.cmd == "add":
        given = [("L", s) for s in ns.spec] + [("R", s) for s in ns.remote] + [("D", s) for s in ns.dynamic]
        if len(given) != 1:
            raise UsageError("add takes one -L SPEC, -R SPEC or -D [BIND:]PORT (run add once per forward)")
        kind, spec = given[0]
        args = {"spec": spec, "kind": kind, "tunnel": ns.tunnel}
    elif ns.cmd == "remove":
        args = {"forward": ns.forward, "tunnel": ns.tunnel}
    elif ns.cmd == "drain":
        args = {"timeout": ns.timeout}
    return ns.path, ns.cmd, args, as_json


def main(argv: list[str]) -> int:
    try:
        path, cmd, args, as_json = parse(argv)
    except UsageError as e:
        print(one_line(f"{PROG}: {e}"), file=sys.stderr)
        return e.exit_code
    except SystemExit as e:   # -h/--help printed by argparse
        return e.code if isinstance(e.code, int) else 0
    try:
        result = request(path, cmd, args)
    except SshpumpError as e:
        print(one_line(f"sshpump: {e}"), file=sys.stderr)
        code = e.exit_code
        return code if isinstance(code, int) and 0 < code < 256 else 1
    except KeyboardInterrupt:
        return 130
    try:
        if as_json:
            print(json.dumps(result, indent=2, sort_keys=False))
        else:
            print(render(cmd, result))
        sys.stdout.flush()
    except BrokenPipeError:   # `| head`: the reader left; not an error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
