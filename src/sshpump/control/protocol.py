"""The control socket's wire format, shared by server and client: JSON lines,
one request object per line, one response object per line.

    request:  {"cmd": "add", "args": {"spec": "8080:web:80", "tunnel": null}}
    response: {"ok": true, "result": <any JSON>}
              {"ok": false, "error": "<one line>", "code": <exit code>, "type": "<class name>",
               "attrs": {...}}   # attrs: the error's str/int/list attributes, may be absent

Requests are checked here (command, argument names and types) so that the
handler only ever sees well-formed arguments, and so that the client refuses
the same requests before it connects."""

from __future__ import annotations

import json
import math

from ..errors import SshpumpError, UsageError, error_from_wire, error_to_wire

MAX_LINE = 64 * 1024          # a request line, newline excluded
MAX_RESPONSE = 64 * 1024 * 1024   # the client's bound: a connections list may be long


class ControlError(SshpumpError):
    """The control socket could not be served (path taken, not a socket) or
    a peer was refused. Exit code 2, as for a usage error: the caller named
    the wrong path or is the wrong user."""

    exit_code = 2


class InternalError(SshpumpError):
    """A handler failed with something other than an SshpumpError (a bug):
    the server logs the traceback and answers with this."""

    exit_code = 1


def _text(value):
    return isinstance(value, str) and value != ""


def _opt_text(value):
    return value is None or _text(value)


def _opt_seconds(value):
    # bool is an int to Python, not a number of seconds to anyone.
    return value is None or (isinstance(value, (int, float)) and not isinstance(value, bool)
                             and math.isfinite(value) and value >= 0)


# Per command: argument name -> (check, required). Unknown names are refused:
# a misspelt argument must not be silently ignored.
COMMANDS = {
    "add": {"spec": (_text, True), "kind": (_opt_text, False), "tunnel": (_opt_text, False)},
    "remove": {"forward": (_text, True), "tunnel": (_opt_text, False)},
    "list": {},
    "connections": {},
    "stats": {},
    "drain": {"timeout": (_opt_seconds, False)},
    "stop": {},
    "ping": {},
    "reload": {},   # commands.py serves it for --config (cli.py's usage lists it)
}
WHAT = {_text: "a non-empty string", _opt_text: "a non-empty string or null",
        _opt_seconds: "a non-negative number of seconds or null"}


def one_line(text: str) -> str:
    """Control characters escaped: a message stays one line on a terminal
    (the same rule as cli.one_line, kept here so this package stands alone)."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def check_request(cmd, args) -> tuple[str, dict]:
    """(cmd, args) checked, with every optional argument present (None when
    not given), so a handler can index args directly; raises UsageError
    naming what is wrong."""
    if not isinstance(cmd, str) or cmd not in COMMANDS:
        shown = one_line(repr(cmd))[:80]
        raise UsageError(f"unknown command {shown} (commands: {', '.join(COMMANDS)})")
    if args is None:
        args = {}
    if not isinstance(args, dict):
        raise UsageError(f"{cmd}: args must be an object, not {type(args).__name__}")
    spec = COMMANDS[cmd]
    for name in args:
        if name not in spec:
            shown = one_line(repr(name))[:80]
            allowed = ", ".join(spec) or "none"
            raise UsageError(f"{cmd}: unknown argument {shown} (arguments: {allowed})")
    out = {}
    for name, (check, required) in spec.items():
        if name not in args and required:
            raise UsageError(f"{cmd}: missing argument {name!r}")
        value = args.get(name)
        if not check(value):
            raise UsageError(f"{cmd}: {name} must be {WHAT[check]}, not {one_line(repr(value))[:80]}")
        out[name] = value
    return cmd, out


def encode_request(cmd: str, args: dict | None) -> bytes:
    cmd, args = check_request(cmd, args)
    line = json.dumps({"cmd": cmd, "args": args}, ensure_ascii=True, allow_nan=False).encode() + b"\n"
    if len(line) - 1 > MAX_LINE:
        raise UsageError(f"request longer than {MAX_LINE} bytes")
    return line


def decode_request(line: bytes) -> tuple[str, dict]:
    """One request line -> (cmd, args); UsageError for anything malformed."""
    try:
        msg = json.loads(line)
    except (UnicodeDecodeError, ValueError) as e:
        raise UsageError(f"request is not JSON: {one_line(str(e))}") from None
    if not isinstance(msg, dict):
        raise UsageError(f"request must be a JSON object, not {type(msg).__name__}")
    extra = set(msg) - {"cmd", "args"}
    if extra:
        raise UsageError(f"unknown request field {one_line(repr(sorted(extra)[0]))[:80]} (fields: cmd, args)")
    return check_request(msg.get("cmd"), msg.get("args"))


def encode_ok(result) -> bytes:
    """Raises TypeError/ValueError if the result is not JSON (a handler bug)."""
    return json.dumps({"ok": True, "result": result}, ensure_ascii=True, allow_nan=False).encode() + b"\n"


def encode_error(e: SshpumpError) -> bytes:
    wire = error_to_wire(e)
    msg = {"ok": False, "error": one_line(wire["msg"]) or type(e).__name__, "code": wire["code"],
           "type": wire["type"]}
    try:
        line = json.dumps({**msg, "attrs": wire["attrs"]}, ensure_ascii=True, allow_nan=False)
    except (TypeError, ValueError):  # an attribute list that is not JSON: drop the extras
        line = json.dumps(msg, ensure_ascii=True)
    return line.encode() + b"\n"


def decode_response(line: bytes):
    """A response line -> the result, or raises the error it carries."""
    try:
        msg = json.loads(line)
    except (UnicodeDecodeError, ValueError):
        msg = None
    if not isinstance(msg, dict) or not isinstance(msg.get("ok"), bool):
        raise SshpumpError("malformed answer from the control socket")
    if msg["ok"]:
        return msg.get("result")
    raise error_from_wire(msg)
