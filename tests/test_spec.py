"""-L spec parsing (sshpump.parse_local_forward) and CLI usage errors."""
from __future__ import annotations

import pytest

import sshpump
from sshpump import Endpoint, parse_local_forward

from helpers import run_cli

GOOD = [
    ("127.0.0.1:8080:db.internal:5432",
     Endpoint(host="127.0.0.1", port=8080), Endpoint(host="db.internal", port=5432)),
    ("8080:db.internal:5432",
     Endpoint(host=None, port=8080), Endpoint(host="db.internal", port=5432)),
    ("0:10.0.0.1:22",
     Endpoint(host=None, port=0), Endpoint(host="10.0.0.1", port=22)),
    ("[::1]:8080:[::1]:5432",
     Endpoint(host="::1", port=8080), Endpoint(host="::1", port=5432)),
    ("8080:[fe80::1]:80",
     Endpoint(host=None, port=8080), Endpoint(host="fe80::1", port=80)),
    ("8080:/run/postgresql/.s.PGSQL.5432",
     Endpoint(host=None, port=8080), Endpoint(path="/run/postgresql/.s.PGSQL.5432")),
    ("127.0.0.1:8080:/var/run/remote.sock",
     Endpoint(host="127.0.0.1", port=8080), Endpoint(path="/var/run/remote.sock")),
    ("/tmp/local.sock:db.internal:5432",
     Endpoint(path="/tmp/local.sock"), Endpoint(host="db.internal", port=5432)),
    ("/tmp/local.sock:/var/run/remote.sock",
     Endpoint(path="/tmp/local.sock"), Endpoint(path="/var/run/remote.sock")),
    ("*:8080:db.internal:5432",
     Endpoint(host="", port=8080), Endpoint(host="db.internal", port=5432)),
    (":8080:db.internal:5432",
     Endpoint(host="", port=8080), Endpoint(host="db.internal", port=5432)),
    ("localhost:65535:h:1",
     Endpoint(host="localhost", port=65535), Endpoint(host="h", port=1)),
    ("/" + "s" * 106 + ":h:1",       # the longest unix socket path: 107 bytes
     Endpoint(path="/" + "s" * 106), Endpoint(host="h", port=1)),
    ("00080:h:0022",                 # leading zeros, as ssh's strtonum takes them
     Endpoint(host=None, port=80), Endpoint(host="h", port=22)),
]


@pytest.mark.parametrize("spec,listen,target", GOOD, ids=[g[0] for g in GOOD])
def test_parse_good(spec, listen, target):
    fwd = parse_local_forward(spec)
    assert fwd.listen == listen
    assert fwd.target == target
    assert fwd.spec == spec
    assert fwd.listen.is_unix == (listen.path is not None)
    assert fwd.target.is_unix == (target.path is not None)


def test_endpoint_str():
    assert str(parse_local_forward("[::1]:80:[::1]:81").target) == "[::1]:81"
    assert str(parse_local_forward("80:h:81").listen) == "*:80"
    assert str(parse_local_forward("/a.sock:/b.sock")) == "/a.sock -> /b.sock"


BAD = [
    "",
    "   ",
    "8080",                          # missing everything after the port
    "8080:host",                     # missing hostport
    "8080:host:",                    # empty hostport
    "8080::5432",                    # empty host
    "a:b:c:d:e",                     # too many fields
    "70000:host:80",                 # listen port out of range
    "8080:host:70000",               # target port out of range
    "8080:host:0",                   # target port 0
    "abc:host:80",                   # non-numeric listen port
    "8080:host:http",                # non-numeric target port
    "8080:host:-1",
    "[::1:8080:host:80",             # unbalanced [
    "::1]:8080:host:80",             # unbalanced ]
    "[[::1]]:8080:host:80",          # nested [
    "8080:[::1:80",
    "/tmp/local.sock",               # unix listen, no target
    "/tmp/local.sock:host",          # unix listen, no target port
    "/tmp/local.sock:host:port",
    "8080:ho st:80",                 # whitespace in host
    "24110:127.0.0.1:80²",           # int() would raise on '²' although isdigit() is True
    "24110:h:٣٣٠٦",                  # Arabic-Indic digits: ports are ASCII digits, as in ssh
    "２４１１０:h:1",                  # fullwidth digits
    "a" * 64 + ":24110:127.0.0.1:80",  # a 64-character label: IDNA refuses it
    "127.0.0.1\n:0:h:1",             # a newline in the bind address
    "/" + "s" * 107 + ":h:1",        # 108 bytes: sun_path holds 107 and the NUL
    "/tmp/a\x00b:h:1",               # a NUL byte in a unix socket path
]


@pytest.mark.parametrize("spec", BAD, ids=[repr(b) for b in BAD])
def test_parse_bad(spec):
    with pytest.raises(sshpump.SpecError) as ei:
        parse_local_forward(spec)
    msg = str(ei.value)
    assert repr(spec) in msg or (not spec.strip() and "''" in msg), msg
    assert "\n" not in msg
    assert isinstance(ei.value, sshpump.UsageError)
    assert isinstance(ei.value, ValueError)
    assert ei.value.exit_code == 2


@pytest.mark.parametrize("spec", ["8080:host", "70000:h:80", "8080:h:x", "[::1:80:h:80"])
def test_cli_bad_spec_exits_2(spec):
    rc, err = run_cli(["-L", spec, "-p", "1", "nobody@127.0.0.1"], timeout=20)
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("sshpump: "), err
    assert spec in lines[0]


@pytest.mark.parametrize("argv", [
    ["-p", "1", "nobody@127.0.0.1"],                                # no -L
    ["-L", "0:h:1", "-o", "NoSuchOption=1", "nobody@127.0.0.1"],
    ["-L", "0:h:1", "-o", "StrictHostKeyChecking=maybe", "nobody@127.0.0.1"],
    ["-L", "0:h:1", "-p", "70000", "nobody@127.0.0.1"],
    ["-L", "0:h:1", "--workers", "-1", "nobody@127.0.0.1"],
    ["-L", "0:h:1", "--bogus", "nobody@127.0.0.1"],
    ["-L", "0:h:1"],                                                # no destination
])
def test_cli_usage_errors_exit_2(argv):
    rc, err = run_cli(argv, timeout=20)
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("sshpump: "), err


def test_api_bad_spec_raises_before_connecting():
    with pytest.raises(sshpump.SpecError, match="8080:nohostport"):
        sshpump.forward("nobody@127.0.0.1", "8080:nohostport", port=1)
