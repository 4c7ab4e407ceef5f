"""The SOCKS handshake parser (socks.py): whole messages only, exact byte
counts (so that what a client sends after its request stays in the socket),
and every malformed input refused with the right reply."""
from __future__ import annotations

import ipaddress
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sshpump import socks


def s5_request(host, port, cmd=1):
    try:
        ip = ipaddress.ip_address(host)
        addr = (b"\x01" if ip.version == 4 else b"\x04") + ip.packed
    except ValueError:
        addr = b"\x03" + bytes([len(host)]) + host.encode()
    return bytes([5, cmd, 0]) + addr + struct.pack("!H", port)


def s4_request(host, port, user=b"me", cmd=1):
    try:
        ip = ipaddress.IPv4Address(host).packed
        tail = b""
    except ValueError:
        ip, tail = b"\0\0\0\x01", host.encode() + b"\0"
    return bytes([4, cmd]) + struct.pack("!H", port) + ip + user + b"\0" + tail


@pytest.mark.parametrize("host", ["10.1.2.3", "db.internal", "2001:db8::7"])
def test_socks5_greeting_then_request(host):
    g = socks.parse(b"\x05\x02\x02\x00")
    assert g == socks.Greeting(4, b"\x05\x00")
    req = s5_request(host, 5432)
    r = socks.parse(req + b"early bytes", expect_request=True)
    assert (r.version, r.host, r.port, r.consumed) == (5, host, 5432, len(req))


@pytest.mark.parametrize("host", ["10.1.2.3", "db.internal"])
def test_socks4_and_4a(host):
    req = s4_request(host, 80)
    r = socks.parse(req + b"GET /")
    assert (r.version, r.host, r.port, r.consumed) == (4, host, 80, len(req))


@pytest.mark.parametrize("msg,expect_request,reply", [
    (b"\x05\x01\x02", False, b"\x05\xff"),                      # only username/password offered
    (b"\x05\x00", False, b"\x05\xff"),                          # no method at all
    (s5_request("10.0.0.1", 80, cmd=2), True, socks.reply(5, socks.CMD_NOT_SUPPORTED)),   # BIND
    (s5_request("10.0.0.1", 80, cmd=3), True, socks.reply(5, socks.CMD_NOT_SUPPORTED)),   # UDP ASSOCIATE
    (b"\x05\x01\x00\x09" + b"\0" * 8, True, socks.reply(5, socks.ATYP_NOT_SUPPORTED)),
    (s4_request("10.0.0.1", 80, cmd=2), False, socks.reply(4, socks.GENERAL_FAILURE)),      # SOCKS4 BIND
    (b"GET / HTTP/1.1\r\n", False, b""),                        # not SOCKS at all
    (b"\x04\x01\x00\x50\x0a\x00\x00\x01" + b"u" * 2000, False, socks.reply(4, socks.GENERAL_FAILURE)),
])
def test_refusals_carry_the_right_reply(msg, expect_request, reply):
    with pytest.raises(socks.SocksError) as e:
        socks.parse(msg, expect_request)
    assert e.value.reply == reply


def test_open_failure_codes():
    assert socks.open_failure_code("administratively prohibited") == socks.NOT_ALLOWED
    assert socks.open_failure_code("connect failed") == socks.REFUSED
    assert socks.open_failure_code("No route to host") == socks.HOST_UNREACHABLE
    assert socks.open_failure_code("resource shortage") == socks.GENERAL_FAILURE
    assert socks.reply(4, socks.OK)[1] == 0x5A and socks.reply(4, socks.REFUSED)[1] == 0x5B


hosts = st.one_of(
    st.ip_addresses(v=4).map(str), st.ip_addresses(v=6).map(str),
    st.from_regex(r"[a-z0-9][a-z0-9.-]{0,60}", fullmatch=True))


@settings(max_examples=300, deadline=None)
@given(hosts, st.integers(1, 65535), st.binary(max_size=40), st.sampled_from([4, 5]))
def test_every_prefix_waits_and_the_whole_message_is_consumed_exactly(host, port, tail, version):
    if version == 4 and (":" in host or host.startswith("0.0.0.")):
        return   # SOCKS4 has no IPv6, and 0.0.0.x means "a SOCKS4a name follows"
    msg = s4_request(host, port) if version == 4 else s5_request(host, port)
    for i in range(len(msg)):
        assert socks.parse(msg[:i], expect_request=version == 5) is None
    r = socks.parse(msg + tail, expect_request=version == 5)
    assert (r.host, r.port, r.consumed) == (host, port, len(msg))


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=300), st.booleans())
def test_garbage_is_either_incomplete_or_refused(data, expect_request):
    try:
        r = socks.parse(data, expect_request)
    except socks.SocksError:
        return
    assert r is None or 0 < r.consumed <= len(data)
