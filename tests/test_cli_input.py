"""Every bad input is one line on stderr and exit code 2, before anything
listens or connects: never a traceback, never another exit code.

The command line is fuzzed in-process through the parse-only entry point
(``sshpump.cli.parse_command_line``: no network; it runs ``ssh -G`` for the
ssh config, see test_sshconfig.py); the cases
users actually met are run as ``python -m sshpump`` against a port nobody
listens on, so a value that slipped through would show as exit 3 instead of 2.
"""
from __future__ import annotations

import contextlib
import io
import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import sshpump
from sshpump import validate
from sshpump.cli import one_line, parse_command_line
from sshpump.sshopts import MAX_WINDOW, MAX_WORKERS, check_options
from sshpump.sshtokens import local_user

from helpers import run_cli

NOBODY = ["-p", "1", "nobody@127.0.0.1"]   # nothing listens on port 1: a connection attempt exits 3

# (what a user typed, a piece of the one line sshpump must answer with)
MET_IN_THE_FIELD = [
    (["-L", "a" * 64 + ":24110:127.0.0.1:80"], "label too long"),
    (["-L", "24110:127.0.0.1:80²"], "target port '80²' is not a number (ASCII digits only)"),
    (["-L", "24110:h:٣٣٠٦"], "target port '٣٣٠٦' is not a number (ASCII digits only)"),
    (["-L", "２４１１０:h:1"], "listen port '２４１１０' is not a number (ASCII digits only)"),
    (["--workers", "2", "-o", "ConnectTimeout=-5", "-L", "0:h:1"], "-o ConnectTimeout '-5'"),
    (["--workers", "2", "-o", "Ciphers=nonesuch", "-L", "0:h:1"], "libssh2 has no cipher 'nonesuch'"),
    (["--workers", "0", "-o", "Ciphers=nonesuch", "-L", "0:h:1"], "libssh2 has no cipher 'nonesuch'"),
    (["-o", "ServerAliveInterval=0.01", "-L", "0:h:1"], "not a time in whole seconds"),
    (["-L", "/tmp/" + "s" * 103 + ":h:1"], "is 108 bytes long (at most 107)"),
    (["-L", "127.0.0.1\n:0:h:1"], r"bind address '127.0.0.1\n' contains a space or control character"),
    (["-L", "-1:h:80"], "listen port '-1' is not a number"),
    (["-R", "1080", "-L", "0:h:1"], "remote dynamic forwarding (SOCKS) is not supported"),
    (["-R", "/tmp/r.sock:h:1"], "a remote unix socket listener (streamlocal-forward) is not supported"),
    (["-R", "0:h:٣٣٠٦"], "target port '٣٣٠٦' is not a number (ASCII digits only)"),
    (["-W", "h:1"], "-W (stdio forwarding) is not supported"),
    (["-D", "99999"], "listen port '99999' is out of range"),
    (["-D", "a:b:1080"], "expected [bind:]port"),
    (["-L", "0:h:1", "--workers", "٢"], "--workers '٢' is not a number"),
    (["-W", "h:1", "-L", "0:h:1"], "-W (stdio forwarding) is not supported"),
    (["-J", "a@", "-L", "0:h:1"], "-J: jump host 'a@'"),
    (["-J", "j:99999", "-L", "0:h:1"], "out of range"),
    (["-o", "ProxyCommand=nc %x %p", "-L", "0:h:1"], "unknown token %x"),
    (["-o", "HostName=-oProxyCommand=x", "-L", "0:h:1"], "starts with '-'"),
    (["-F", "/nonexistent/ssh_config", "-L", "0:h:1"], "Can't open user config file /nonexistent/ssh_config"),
]


@pytest.mark.parametrize("argv,said", MET_IN_THE_FIELD, ids=[repr(a)[:60] for a, _ in MET_IN_THE_FIELD])
def test_bad_input_is_one_line_and_exit_2(argv, said):
    rc, err = run_cli([*argv, *NOBODY], timeout=30)
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1, f"exit {rc}:\n{err}"
    assert lines[0].startswith("sshpump: ") and said in lines[0], lines[0]


def test_r_then_spec_then_host_is_not_read_as_a_destination():
    rc, err = run_cli(["-R", "8080", "somehost"], timeout=30)
    assert rc == 2 and err.startswith("sshpump: bad remote forward spec '8080': remote dynamic forwarding"), err


def test_a_stray_argument_with_a_newline_stays_on_one_line():
    rc, err = run_cli(["-L", "0:h:1", *NOBODY, "extra\nargument"], timeout=30)
    assert rc == 2 and err == "sshpump: unrecognized arguments: extra\\nargument\n", err


def test_every_error_is_also_a_builtin():
    """As the README says: callers may catch the builtin instead of ours."""
    assert issubclass(sshpump.HostKeyError, ConnectionError)
    assert issubclass(sshpump.ConnectError, ConnectionError)
    assert issubclass(sshpump.AuthError, PermissionError)
    assert issubclass(sshpump.ForwardError, OSError)
    assert issubclass(sshpump.SpecError, ValueError) and issubclass(sshpump.UsageError, ValueError)
    for cls in (sshpump.ChannelOpenError, sshpump.BridgeError):
        assert cls.__mro__[2] is not Exception, cls


def test_what_ssh_accepts_still_parses():
    opts, ns, batch = parse_command_line([
        "-gvNT", "-L", "0:db:5432", "-L", "[::1]:8080:[::1]:80", "-L", "/tmp/a.sock:/run/b.sock",
        "-o", "ServerAliveInterval=1m30s", "-o", "ConnectTimeout 0", "-o", "Ciphers=+aes256-cbc",
        "-o", "BatchMode=yes", "--workers", "3", "--drain-timeout", "2.5", "--window", str(16 << 20),
        "-F", "none", "-J", "hop@jump.example.com:2200,[::1]:22", "-o", "HostName=10.0.0.5",
        "-p", "02222", "me@bastion.example.com"])
    assert (opts.user, opts.host, opts.port, opts.workers) == ("me", "10.0.0.5", 2222, 3)
    # each hop as ssh reaches it: its user (the local one when none is named) and port written out
    assert opts.proxy_jump == ["hop@jump.example.com:2200", f"{local_user()}@[::1]:22"] and opts.proxy_command is None
    assert opts.server_alive_interval == 90 and opts.connect_timeout is None and batch is True
    assert opts.ciphers.endswith(",aes256-cbc") and opts.drain_timeout == 2.5 and opts.gateway_ports
    assert [str(f) for f in opts.forwards] == ["*:0 -> db:5432", "[::1]:8080 -> [::1]:80",
                                               "/tmp/a.sock -> /run/b.sock"]


@pytest.mark.parametrize("kw,said", [
    (dict(ciphers="nonesuch"), "libssh2 has no cipher 'nonesuch'"),
    (dict(server_alive_interval=0.01), "server_alive_interval"),
    (dict(connect_timeout=-5), "connect_timeout"),
    (dict(workers=-1), "workers"),
])
def test_api_checks_options_before_connecting(kw, said):
    with pytest.raises(sshpump.UsageError, match=said):
        sshpump.forward("nobody@127.0.0.1", "0:h:1", port=1, **kw)


# ---------------------------------------------------------------- fuzz

FLAGS = ["-L", "-p", "-l", "-i", "-o", "-g", "-v", "-N", "-n", "-T", "-f", "-R", "-D", "-J", "-F", "-G", "-W",
         "-gL", "-vo", "-Lp", "--workers", "--ready-fd", "--drain-timeout", "--client-wait",
         "--window", "--", "-", "--bogus", "-x"]
OPTION_NAMES = ["UserKnownHostsFile", "StrictHostKeyChecking", "ConnectTimeout", "ServerAliveInterval",
                "ServerAliveCountMax", "ExitOnForwardFailure", "GatewayPorts", "IdentityFile",
                "IdentitiesOnly", "Ciphers", "Port", "User", "BatchMode", "connecttimeout", "ProxyJump",
                "HostName", "ProxyCommand", "Compression"]
# Odd values, by the kind of field they replace or are spliced into.
ODD = {
    "number": ["٣٣٠٦", "２４１１０", "80²", "-1", "", "1_0", " 80", "+80", "0x10", "1e3", "nan", "inf",
               "0.01", "65536", "2147483648", "9" * 5000, "0" * 50 + "80"],
    "name": ["a" * 64, "h\n", "", " ", "a..b", "\x00", "\udcff", "-h", "ho st", "\u2028", "x" * 300, "[", "]"],
    "path": ["/" + "p" * 200, "/tmp/\x00x", "/tmp/\udcff", "\n", "~\x00", ""],
    "value": ["nonesuch", "+nonesuch", "-", "^", ",", "aes128-ctr,,", "maybe", "yes\n", "-5", "0.01", "1x", ""],
}
odd_text = st.lists(st.sampled_from([v for vs in ODD.values() for v in vs]), max_size=3).map("".join)
numbers = st.one_of(st.integers(-10**30, 10**30).map(str), st.integers(0, 70000).map(str))
words = st.one_of(odd_text, numbers, st.text(max_size=30), st.text(st.characters(codec="utf-8"), max_size=10))
specs = st.lists(st.one_of(words, numbers), min_size=1, max_size=5).map(":".join)
option_values = st.tuples(st.sampled_from(OPTION_NAMES), st.sampled_from(["=", " ", "", " = "]),
                          st.one_of(words, numbers)).map("".join)


def field(kind, strategy):
    return strategy.map(lambda text: (kind, text))


# What ssh accepts, as typed fields, so that a mutation can hit one field of
# a spec or one option's value with an odd value of its kind.
port0 = field("number", st.integers(0, 65535).map(str))
port1 = field("number", st.integers(1, 65535).map(str))
host = field("name", st.sampled_from(["localhost", "db.internal", "127.0.0.1", "[::1]", "bücher.example", "h"]))
bind = field("name", st.sampled_from(["127.0.0.1", "[::1]", "*", "", "localhost"]))
spec_fields = st.one_of(
    st.tuples(port0, host, port1),
    st.tuples(bind, port0, host, port1),
    st.tuples(port0, field("path", st.just("/run/postgresql/.s.PGSQL.5432"))),
    st.tuples(field("path", st.just("/tmp/l.sock")), host, port1),
    st.tuples(field("path", st.just("/tmp/l.sock")), field("path", st.just("/run/r.sock"))))
option_fields = st.sampled_from([
    ("ConnectTimeout", "number", "10"), ("ConnectTimeout", "number", "0"),
    ("ServerAliveInterval", "value", "1m30s"), ("ServerAliveCountMax", "number", "0"),
    ("Ciphers", "value", "aes128-ctr"), ("Ciphers", "value", "-aes128-ctr"),
    ("Ciphers", "value", "^aes256-gcm@openssh.com"), ("Port", "number", "2222"), ("User", "name", "me"),
    ("BatchMode", "value", "yes"), ("StrictHostKeyChecking", "value", "accept-new"),
    ("UserKnownHostsFile", "path", "/tmp/kh ~/kh2"), ("IdentityFile", "path", "~/.ssh/id_test"),
    ("IdentitiesOnly", "value", "yes"), ("GatewayPorts", "value", "no"), ("ExitOnForwardFailure", "value", "yes"),
    ("ProxyJump", "name", "jump.example.com"), ("ProxyJump", "value", "none"), ("HostName", "name", "db.internal"),
]).map(lambda o: (("name", o[0]), (o[1], o[2])))
flag_values = st.one_of(
    st.tuples(st.just("--workers"), field("number", st.integers(0, 64).map(str))),
    st.tuples(st.just("--window"), field("number", st.integers(0, 1 << 30).map(str))),
    st.tuples(st.sampled_from(["--drain-timeout", "--client-wait"]),
              field("number", st.sampled_from(["0", "2.5", ".5", "10"]))),
    st.tuples(st.just("-p"), port1), st.tuples(st.just("-l"), field("name", st.just("me"))),
    st.tuples(st.just("-i"), field("path", st.just("/tmp/key"))),
    st.tuples(st.just("--ready-fd"), field("number", st.just("3"))),
    st.tuples(st.just("-F"), field("value", st.just("none"))),
    st.tuples(st.just("-J"), field("name", st.sampled_from(["jump", "me@jump:2222", "none"]))))
destination_fields = st.one_of(st.tuples(host), st.tuples(field("name", st.just("me")), host))


@st.composite
def command_lines(draw):
    """(kind, argv): a command line ssh would accept ("valid"), the same with
    one field replaced or garbled ("mutated"), or plain noise."""
    kind = draw(st.sampled_from(["valid", "mutated", "mutated", "mutated", "noise"]))
    if kind == "noise":
        return kind, draw(st.lists(st.one_of(st.sampled_from(FLAGS), words, specs, option_values), max_size=12))
    # Each slot: (word before it or None, typed fields, how the fields are joined).
    flags = draw(st.lists(st.sampled_from(["-g", "-v", "-N", "-vv"]), max_size=2))
    slots = [(None, [("flag", f)], "") for f in flags]
    slots += [("-L", list(f), ":") for f in draw(st.lists(spec_fields, min_size=1, max_size=3))]
    slots += [("-o", list(f), "=") for f in draw(st.lists(option_fields, max_size=3))]
    slots += [(flag, [value], "") for flag, value in draw(st.lists(flag_values, max_size=3))]
    slots.append((None, list(draw(destination_fields)), "@"))
    if kind == "mutated":
        before, fields, _ = slots[draw(st.integers(0, len(slots) - 1))]
        j = draw(st.integers(0, len(fields) - 1))
        what, text = fields[j]
        odd = draw(st.one_of(st.sampled_from(ODD.get(what, FLAGS)), words))
        if draw(st.booleans()):
            text = odd
        else:
            at = draw(st.integers(0, len(text)))
            text = text[:at] + odd + text[at:]
        fields[j] = (what, text)
    argv = []
    for before, fields, joiner in slots:
        argv += ([before] if before else []) + [joiner.join(text for _, text in fields)]
    return kind, argv


@settings(max_examples=300, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(command_lines())
def test_fuzzed_command_line_is_accepted_or_one_usage_line(case):
    kind, argv = case
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            opts, ns, _ = parse_command_line(argv)
    except sshpump.UsageError as e:
        assert kind != "valid", f"ssh would accept {argv!r}; sshpump said: {e}"
        assert e.exit_code == 2
        line = one_line(f"sshpump: {e}")
        assert "\n" not in line and "\r" not in line
        return
    except SystemExit as e:  # -h or --version (perhaps abbreviated): printed, exit 0
        assert e.code == 0 and out.getvalue()
        return
    # Accepted: every value is one ssh (and libssh2, and the resolver) would take.
    assert 1 <= opts.port <= 65535 and 0 <= opts.workers <= MAX_WORKERS and 0 <= opts.window <= MAX_WINDOW
    assert float(opts.server_alive_interval).is_integer()  # whole seconds, as ssh
    assert set(opts.ciphers.split(",")) <= set(validate.supported_ciphers())
    opts.host.encode("idna")  # what the resolver is given
    for fwd in opts.forwards:
        for end in (fwd.listen, fwd.target):
            assert end.port is None or (isinstance(end.port, int) and 0 <= end.port <= 65535)
            assert end.port is None or str(end.port) in fwd.spec  # ASCII digits, as typed
            assert end.host is None or end.host.isprintable() and not any(c.isspace() for c in end.host)
        if fwd.listen.host:
            fwd.listen.host.encode("idna")
        if fwd.listen.path:
            assert "\0" not in fwd.listen.path and len(os.fsencode(fwd.listen.path)) <= 107
        (fwd.target.host or fwd.target.path).encode("utf-8")  # as it travels in the SSH protocol
    check_options(opts)  # what the CLI built passes the library's check unchanged


@pytest.mark.parametrize("flag", [["-F", "none"], ["-J", "jump"], ["-G"]])
def test_ssh_config_flags_are_for_a_command_line_tunnel(flag):
    with pytest.raises(sshpump.UsageError, match="-F, -J and -G are for a command-line tunnel"):
        parse_command_line(["--config", "/tmp/tunnels.toml", *flag])
