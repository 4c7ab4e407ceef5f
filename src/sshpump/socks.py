"""SOCKS4, SOCKS4a and SOCKS5 handshakes, sans I/O (for ``-D``).

The caller peeks at what the client sent, asks here whether a whole message
is there, and then consumes exactly that many bytes from the socket: bytes a
client sends right after its request stay in the socket for the tunnel, so
none is lost. Only CONNECT is supported, as in ssh -D; BIND and UDP
ASSOCIATE are refused with "command not supported". Names are resolved by
the server (as ssh does): a domain name travels as it is in the channel open.

    step = parse(buf, stage)     # None: need more bytes; else a Greeting or a Request
    raises SocksError(reply)     # malformed or unsupported; reply: bytes to send before closing (maybe b"")
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

MAX_HANDSHAKE = 1024          # a greeting or a request longer than this is hostile
NO_AUTH, NO_ACCEPTABLE = 0x00, 0xFF
CONNECT = 0x01

# SOCKS5 reply codes (RFC 1928 section 6)
OK, GENERAL_FAILURE, NOT_ALLOWED, NET_UNREACHABLE, HOST_UNREACHABLE = 0x00, 0x01, 0x02, 0x03, 0x04
REFUSED, TTL_EXPIRED, CMD_NOT_SUPPORTED, ATYP_NOT_SUPPORTED = 0x05, 0x06, 0x07, 0x08
SOCKS4_GRANTED, SOCKS4_REJECTED = 0x5A, 0x5B


class SocksError(Exception):
    """The handshake cannot go on. ``reply``: what the client should get
    before the connection is closed (b"" when nothing sensible exists)."""

    def __init__(self, why: str, reply: bytes = b""):
        super().__init__(why)
        self.reply = reply


@dataclass(frozen=True)
class Greeting:
    """SOCKS5's method negotiation; answer with ``answer``."""

    consumed: int
    answer: bytes


@dataclass(frozen=True)
class Request:
    version: int          # 4 (4a included) or 5
    host: str             # an IP address or a name the server resolves
    port: int
    consumed: int


def _socks5_reply(code: int) -> bytes:
    return bytes([5, code, 0, 1, 0, 0, 0, 0, 0, 0])


def _socks4_reply(granted: bool) -> bytes:
    return bytes([0, SOCKS4_GRANTED if granted else SOCKS4_REJECTED, 0, 0, 0, 0, 0, 0])


def reply(version: int, code: int) -> bytes:
    """The answer to a request after the channel open: code is a SOCKS5
    code (OK on success); SOCKS4 only knows granted or rejected."""
    return _socks4_reply(code == OK) if version == 4 else _socks5_reply(code)


def parse(buf: bytes, expect_request: bool = False):
    """The next complete client message at the start of buf, or None."""
    if not buf:
        return None
    version = buf[0]
    if version == 4 and not expect_request:
        return _socks4(buf)
    if version == 5:
        return _socks5_request(buf) if expect_request else _socks5_greeting(buf)
    raise SocksError(f"not a SOCKS handshake (first byte 0x{version:02x})")


def _socks5_greeting(buf: bytes):
    if len(buf) < 2:
        return None
    n = buf[1]
    if n == 0:
        raise SocksError("SOCKS5 greeting offers no method", bytes([5, NO_ACCEPTABLE]))
    if len(buf) < 2 + n:
        return None
    if NO_AUTH not in buf[2:2 + n]:
        raise SocksError("SOCKS5 client offers no method without authentication", bytes([5, NO_ACCEPTABLE]))
    return Greeting(2 + n, bytes([5, NO_AUTH]))


def _socks5_request(buf: bytes):
    if len(buf) < 5:
        return None
    _, cmd, rsv, atyp = buf[:4]
    if rsv != 0:
        raise SocksError("SOCKS5 request: reserved byte not zero", _socks5_reply(GENERAL_FAILURE))
    if atyp == 1:
        end = 4 + 4
        host = lambda: str(ipaddress.IPv4Address(buf[4:8]))  # noqa: E731
    elif atyp == 4:
        end = 4 + 16
        host = lambda: str(ipaddress.IPv6Address(buf[4:20]))  # noqa: E731
    elif atyp == 3:
        n = buf[4]
        if n == 0:
            raise SocksError("SOCKS5 request: empty domain name", _socks5_reply(GENERAL_FAILURE))
        end = 5 + n
        host = lambda: _domain(buf[5:5 + n], _socks5_reply(GENERAL_FAILURE))  # noqa: E731
    else:
        raise SocksError(f"SOCKS5 request: address type {atyp} not supported", _socks5_reply(ATYP_NOT_SUPPORTED))
    if len(buf) < end + 2:
        return None
    if cmd != CONNECT:
        raise SocksError(f"SOCKS5 command {cmd} not supported (CONNECT only)", _socks5_reply(CMD_NOT_SUPPORTED))
    port = int.from_bytes(buf[end:end + 2], "big")
    if port == 0:
        raise SocksError("SOCKS5 request: port 0", _socks5_reply(GENERAL_FAILURE))
    return Request(5, host(), port, end + 2)


def _socks4(buf: bytes):
    if len(buf) < 8:
        return None
    cmd = buf[1]
    port = int.from_bytes(buf[2:4], "big")
    ip = buf[4:8]
    user_end = buf.find(b"\0", 8)
    if user_end < 0:
        if len(buf) >= MAX_HANDSHAKE:
            raise SocksError("SOCKS4 user id too long", _socks4_reply(False))
        return None
    consumed = user_end + 1
    if ip[:3] == b"\0\0\0" and ip[3] != 0:     # SOCKS4a: the name follows
        name_end = buf.find(b"\0", consumed)
        if name_end < 0:
            if len(buf) >= MAX_HANDSHAKE:
                raise SocksError("SOCKS4a host name too long", _socks4_reply(False))
            return None
        host = _domain(buf[consumed:name_end], _socks4_reply(False))
        consumed = name_end + 1
    else:
        host = str(ipaddress.IPv4Address(ip))
    if cmd != CONNECT:
        raise SocksError(f"SOCKS4 command {cmd} not supported (CONNECT only)", _socks4_reply(False))
    if port == 0:
        raise SocksError("SOCKS4 request: port 0", _socks4_reply(False))
    return Request(4, host, port, consumed)


def _domain(raw: bytes, refusal: bytes) -> str:
    try:
        name = raw.decode("ascii")
    except UnicodeDecodeError:
        raise SocksError("SOCKS request: host name is not ASCII", refusal) from None
    if not name or not all(c.isalnum() or c in "-._" for c in name):
        raise SocksError(f"SOCKS request: bad host name {name!r}", refusal)
    return name


def open_failure_code(reason: str) -> int:
    """The SOCKS5 code for a failed channel open, from what the server said."""
    text = reason.lower()
    if "prohibited" in text:
        return NOT_ALLOWED
    if "unreachable" in text or "no route" in text:
        return HOST_UNREACHABLE
    if "connect failed" in text or "refused" in text:
        return REFUSED
    return GENERAL_FAILURE
