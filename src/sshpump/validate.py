"""Checks for every value a user types, each failure one UsageError line.

They run before anything listens or connects, so bad input never reaches a
worker, the resolver or libssh2 (where it used to surface as a traceback or
a misleading exit code). The rules are ssh's: numbers are ASCII digits only
(Python's int() would also take '٣٣٠٦', '２４１１０' or '1_0'), times are
whole seconds with optional units (ssh's convtime: 90, 1m30s), ciphers must
be ones libssh2 has.
"""

from __future__ import annotations

import functools
import math
import os
import re

from .errors import UsageError

MAX_SECONDS = 2**31 - 1     # ssh's convtime refuses more (INT_MAX)
MAX_HOST_BYTES = 255        # the longest DNS name; anything longer cannot resolve
UNIX_PATH_MAX = 107         # sun_path is 108 bytes, the last one the NUL

_TIME_PART = re.compile(r"([0-9]+)([sSmMhHdDwW]?)")
_TIME_UNIT = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_DECIMAL = re.compile(r"[0-9]+(?:\.[0-9]*)?|\.[0-9]+")


def show(text: str) -> str:
    """A user's text quoted for a one-line message: repr escapes control
    characters, and a huge argument is cut short."""
    return repr(text) if len(text) <= 120 else repr(text[:100]) + f"... ({len(text)} characters)"


def ascii_int(text: str, what: str, lo: int, hi: int) -> int:
    if not (text.isascii() and text.isdigit()):
        raise UsageError(f"{what} {show(text)} is not a number (ASCII digits only)")
    digits = text.lstrip("0") or "0"
    # Compare lengths first: int() of thousands of digits raises ValueError.
    if len(digits) > len(str(hi)) or not lo <= int(digits) <= hi:
        raise UsageError(f"{what} {show(text)} is out of range ({lo}-{hi})")
    return int(digits)


def port(text: str, what: str, allow_zero: bool = False) -> int:
    return ascii_int(text, what, 0 if allow_zero else 1, 65535)


def seconds(text: str, what: str) -> int:
    """Whole seconds as ssh's convtime reads them: '30', '1m30s', '2h'."""
    parts = _TIME_PART.findall(text)
    if not text or "".join(n + u for n, u in parts) != text:
        raise UsageError(f"{what} {show(text)} is not a time in whole seconds (e.g. 30, 90s, 2m)")
    total = 0
    for number, unit in parts:
        if len(number.lstrip("0")) > 10:
            total = MAX_SECONDS + 1
            break
        total += int(number) * _TIME_UNIT[unit.lower()]
    if total > MAX_SECONDS:
        raise UsageError(f"{what} {show(text)} is too large (at most {MAX_SECONDS} seconds)")
    return total


def decimal_seconds(text: str, what: str) -> float:
    """A non-negative number of seconds, fractions allowed (sshpump's own options)."""
    if not _DECIMAL.fullmatch(text):
        raise UsageError(f"{what} {show(text)} is not a number of seconds")
    value = float(text)
    if value > MAX_SECONDS:
        raise UsageError(f"{what} {show(text)} is too large (at most {MAX_SECONDS} seconds)")
    return value


def number_in(value, what: str, lo: float, hi: float, *, integer: bool = False):
    """A number given through the library API (no text to parse)."""
    kinds = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds):
        raise UsageError(f"{what} must be {'an integer' if integer else 'a number'}, not {value!r}")
    if isinstance(value, float) and not math.isfinite(value) or not lo <= value <= hi:
        # repr() of an int with thousands of digits raises ValueError
        shown = repr(value) if isinstance(value, float) or abs(value) < 10**18 else "a number that large"
        raise UsageError(f"{what} must be between {lo:g} and {hi:g}, not {shown}")
    return value


def _nonempty_str(text, what: str) -> str:
    if not isinstance(text, str):
        raise UsageError(f"{what} must be a string, not {type(text).__name__}")
    if not text:
        raise UsageError(f"{what} is empty")
    return text


def _plain_text(text: str, what: str) -> bytes:
    """UTF-8 bytes of a name that goes into a protocol field or a log line."""
    if any(c.isspace() or not c.isprintable() for c in text):
        raise UsageError(f"{what} {show(text)} contains a space or control character")
    try:
        return text.encode("utf-8")
    except UnicodeError:
        raise UsageError(f"{what} {show(text)} is not valid UTF-8") from None


def host(text: str, what: str, *, resolved_here: bool) -> str:
    """A host name or address. ``resolved_here``: looked up on this machine
    (bind addresses, the SSH server), where Python encodes it with IDNA, which
    refuses labels over 63 characters; targets are resolved by the server."""
    _nonempty_str(text, what)
    raw = _plain_text(text, what)
    if len(raw) > MAX_HOST_BYTES:
        raise UsageError(f"{what} {show(text)} is longer than {MAX_HOST_BYTES} bytes")
    if text.startswith("-"):
        raise UsageError(f"{what} {show(text)} starts with '-'")
    if resolved_here:
        try:
            text.encode("idna")
        except UnicodeError as e:
            reason = str(e).rpartition("UnicodeError: ")[2].rstrip(")") or "invalid"
            raise UsageError(f"{what} {show(text)} is not a valid host name ({reason})") from None
    return text


def user(text: str, what: str = "user") -> str:
    _nonempty_str(text, what)
    if any(not c.isprintable() for c in text):
        raise UsageError(f"{what} {show(text)} contains a control character")
    try:
        text.encode("utf-8")
    except UnicodeError:
        raise UsageError(f"{what} {show(text)} is not valid UTF-8") from None
    return text


def path(text: str, what: str, *, remote: bool = False, max_bytes: int | None = None) -> str:
    """A file or socket path. A local one must encode to the file system's
    bytes; a remote one travels in the SSH protocol as UTF-8."""
    _nonempty_str(text, what)
    if "\0" in text:
        raise UsageError(f"{what} {show(text)} contains a NUL byte")
    try:
        raw = text.encode("utf-8") if remote else os.fsencode(text)
    except UnicodeError:
        raise UsageError(f"{what} {show(text)} cannot be encoded as a path") from None
    if max_bytes is not None and len(raw) > max_bytes:
        raise UsageError(f"{what} {show(text)} is {len(raw)} bytes long (at most {max_bytes})")
    return text


def local_file(text: str, what: str) -> str:
    """A local file path, '~' expanded as ssh does."""
    return os.path.expanduser(path(text, what))


@functools.lru_cache(maxsize=None)
def supported_ciphers() -> tuple[str, ...]:
    # libssh2 lists its algorithms on a session that has not connected yet.
    from ssh2.session import LIBSSH2_METHOD_CRYPT_CS, Session

    return tuple(Session().supported_algs(LIBSSH2_METHOD_CRYPT_CS))


def ciphers(value: str, default: str, what: str = "ciphers") -> str:
    """A Ciphers list as ssh reads it: 'a,b' replaces ``default``; '+a'
    appends to it, '-a' removes from it, '^a' puts first. Every name must be
    one libssh2 supports (a bad one used to fail only inside the workers)."""
    op = value[:1] if value[:1] in ("+", "-", "^") else ""
    wanted = list(dict.fromkeys(value[len(op):].split(",")))
    supported = supported_ciphers()
    unknown = [n for n in wanted if n not in supported]
    if unknown:
        raise UsageError(
            f"{what} {show(value)}: libssh2 has no cipher {', '.join(show(n) for n in unknown)} "
            f"(it has: {','.join(supported)})"
        )
    base = default.split(",")
    if op == "+":
        result = base + [n for n in wanted if n not in base]
    elif op == "-":
        result = [n for n in base if n not in wanted]
    elif op == "^":
        result = wanted + [n for n in base if n not in wanted]
    else:
        result = wanted
    if not result:
        raise UsageError(f"{what} {show(value)}: no cipher left")
    return ",".join(result)
