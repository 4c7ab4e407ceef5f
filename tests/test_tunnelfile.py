"""The tunnels file (sshpump.tunnelfile): file text -> load -> Options per tunnel,
and every mistake one UsageError line naming the file, the tunnel and the key."""
from __future__ import annotations

import os
import textwrap

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sshpump import tunnelfile
from sshpump.errors import UsageError
from sshpump.spec import Endpoint

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLE = os.path.join(REPO_ROOT, "examples", "tunnels.toml")
HOME = os.path.expanduser("~")
CPUS = max(1, len(os.sched_getaffinity(0)))


@pytest.fixture
def here(tmp_path, monkeypatch):
    """Run in tmp_path so that messages name the file as 'tunnels.toml'."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


def load_text(text: str, name: str = "tunnels.toml") -> tunnelfile.FileConfig:
    with open(name, "w", encoding="utf-8") as f:
        f.write(textwrap.dedent(text))
    return tunnelfile.load(name)


def error_of(text: str, name: str = "tunnels.toml") -> str:
    with pytest.raises(UsageError) as e:
        load_text(text, name)
    msg = str(e.value)
    assert "\n" not in msg and "\r" not in msg, msg
    assert msg.startswith(f"{name}: "), msg
    return msg


# ---- files that load ----------------------------------------------------------

def test_the_example_file_loads():
    cfg = tunnelfile.load(EXAMPLE)
    assert cfg.path == EXAMPLE
    assert cfg.control == "/run/user/1000/sshpump.sock"
    assert list(cfg.tunnels) == ["db", "web"]
    db, web = cfg.tunnels["db"], cfg.tunnels["web"]
    assert db.name == "db" and web.name == "web"
    assert (db.opts.user, db.opts.host, db.opts.port) == ("me", "bastion1.example.com", 22)
    assert db.opts.identities == [f"{HOME}/.ssh/id_ed25519"]
    assert db.opts.known_hosts == [f"{HOME}/.ssh/known_hosts"]
    assert db.opts.strict_host_key_checking == "accept-new"     # the tunnel's own beats [defaults]
    assert web.opts.strict_host_key_checking == "yes"
    assert db.opts.server_alive_interval == web.opts.server_alive_interval == 15
    assert db.opts.server_alive_count_max == 5                  # from options = [...]
    assert (db.opts.workers, web.opts.workers) == (2, 1)
    assert [f.spec for f in db.opts.forwards] == [
        "5432:db.internal:5432", "/tmp/pg.sock:/run/postgresql/.s.PGSQL.5432"]
    assert db.opts.forwards[1].listen == Endpoint(path="/tmp/pg.sock")
    assert web.opts.host == "bastion2"
    assert web.opts.user == (os.environ.get("USER") or "root")
    assert db.opts.password is None and db.opts.passphrase is None


def test_summary_is_one_line_per_tunnel():
    cfg = tunnelfile.load(EXAMPLE)
    user = os.environ.get("USER") or "root"
    assert tunnelfile.summary(cfg).splitlines() == [
        "db:  me@bastion1.example.com:22, 2 workers, 2 forwards: "
        "5432:db.internal:5432, /tmp/pg.sock:/run/postgresql/.s.PGSQL.5432",
        f"web: {user}@bastion2:22, 1 worker, 1 forward: 8080:web:80",
    ]


def test_a_minimal_tunnel_gets_the_cli_defaults(here):
    cfg = load_text("""
        [tunnels.only]
        destination = "h"
        forwards = ["0:db:5432"]
    """)
    assert cfg.control is None
    o = cfg.tunnels["only"].opts
    assert o.workers == CPUS                  # default_workers(), as the CLI
    assert (o.port, o.identities, o.strict_host_key_checking) == (22, [], "yes")
    assert (o.connect_timeout, o.server_alive_interval, o.server_alive_count_max) == (30.0, 30.0, 3)
    assert o.forwards[0].listen == Endpoint(host=None, port=0)


def test_dynamic_forwards_beside_or_instead_of_forwards(here):
    cfg = load_text("""
        [tunnels.both]
        destination = "h"
        forwards = ["0:db:5432"]
        dynamic_forwards = ["1080", "[::1]:1081"]

        [tunnels.socks]
        destination = "h2"
        dynamic_forwards = ["127.0.0.1:0"]
    """)
    both = cfg.tunnels["both"].opts.forwards
    assert [type(f).__name__ for f in both] == ["LocalForward", "DynamicForward", "DynamicForward"]
    assert both[2].listen == Endpoint(host="::1", port=1081)
    assert [f.spec for f in cfg.tunnels["socks"].opts.forwards] == ["127.0.0.1:0"]
    assert "dynamic_forwards[0]" in error_of("""
        [tunnels.t]
        destination = "h"
        dynamic_forwards = ["a:b:1080"]
    """)
    assert "forwards is missing" in error_of("""
        [tunnels.t]
        destination = "h"
        dynamic_forwards = []
    """)


def test_every_tunnel_key(here):
    o = load_text("""
        control = "~/pump.sock"
        [tunnels."eu.db-1_x"]
        destination = "ops@[2001:db8::1]"
        forwards = ["127.0.0.1:15432:db:5432"]
        port = 2222
        identities = ["~/k1", "/abs/k2"]
        identities_only = true
        use_agent = false
        known_hosts = ["~/kh1", "~/kh2"]
        strict_host_key_checking = false
        connect_timeout = "1m30s"
        server_alive_interval = 0
        server_alive_count_max = 7
        exit_on_forward_failure = true
        gateway_ports = true
        ciphers = "^aes256-ctr"
        workers = 0
        window = 16777216
        client_wait = 2.5
        drain_timeout = 0
        reconnect_max = 5
    """)
    assert o.control == f"{HOME}/pump.sock"
    t = o.tunnels["eu.db-1_x"].opts
    assert (t.user, t.host, t.port) == ("ops", "2001:db8::1", 2222)
    assert t.identities == [f"{HOME}/k1", "/abs/k2"]
    assert (t.identities_only, t.use_agent) == (True, False)
    assert t.known_hosts == [f"{HOME}/kh1", f"{HOME}/kh2"]
    assert t.strict_host_key_checking == "no"
    assert (t.connect_timeout, t.server_alive_interval, t.server_alive_count_max) == (90, 0, 7)
    assert (t.exit_on_forward_failure, t.gateway_ports) == (True, True)
    assert t.ciphers.startswith("aes256-ctr,aes128-gcm@openssh.com")
    assert (t.workers, t.window, t.client_wait, t.drain_timeout, t.reconnect_max) == (0, 16777216, 2.5, 0, 5)
    summary = tunnelfile.summary(o)
    assert summary == "eu.db-1_x: ops@[2001:db8::1]:2222, 0 workers, 1 forward: 127.0.0.1:15432:db:5432"


def test_connect_timeout_zero_means_no_bound(here):
    o = load_text("""
        [tunnels.a]
        destination = "h"
        forwards = ["1:h:1"]
        connect_timeout = 0
    """).tunnels["a"].opts
    assert o.connect_timeout is None


def test_defaults_apply_and_a_tunnel_key_replaces_them(here):
    cfg = load_text("""
        [defaults]
        user = "deploy"
        identity = ["~/a", "~/b"]
        known_hosts = "~/kh"
        options = ["ServerAliveCountMax=9", "IdentitiesOnly=yes"]
        workers = 3

        [tunnels.plain]
        destination = "h1"
        forwards = ["1001:t:1"]

        [tunnels.own]
        destination = "me@h2"                 # the destination's user beats [defaults]
        identity = "~/c"                      # replaces the whole default list
        options = ["ServerAliveCountMax=1"]   # replaces the default options
        forwards = ["1002:t:1"]
    """)
    plain, own = cfg.tunnels["plain"].opts, cfg.tunnels["own"].opts
    assert (plain.user, plain.identities, plain.workers) == ("deploy", [f"{HOME}/a", f"{HOME}/b"], 3)
    assert (plain.server_alive_count_max, plain.identities_only) == (9, True)
    assert (own.user, own.identities, own.workers) == ("me", [f"{HOME}/c"], 3)
    # the tunnel's options replace the default's *options*, field by field:
    # IdentitiesOnly from [defaults] stays, ServerAliveCountMax is the tunnel's
    assert (own.server_alive_count_max, own.identities_only) == (1, True)
    # each tunnel has its own lists: changing one changes no other
    assert plain.known_hosts == own.known_hosts == [f"{HOME}/kh"]
    assert plain.known_hosts is not own.known_hosts


def test_identity_file_options_add_up(here):
    o = load_text("""
        [tunnels.a]
        destination = "h"
        forwards = ["1:h:1"]
        options = ["IdentityFile=~/k1", "IdentityFile ~/k2", "Port=2200", "User=bob"]
    """).tunnels["a"].opts
    assert (o.identities, o.port, o.user) == ([f"{HOME}/k1", f"{HOME}/k2"], 2200, "bob")


def test_listen_addresses_that_do_not_clash(here):
    cfg = load_text("""
        [tunnels.a]
        destination = "h"
        forwards = ["127.0.0.1:8080:t:1", "0:t:1", "0.0.0.0:9090:t:1", "/tmp/a.sock:t:1"]
        [tunnels.b]
        destination = "h"
        forwards = ["127.0.0.2:8080:t:1", "0:t:1", "[::1]:9090:t:1", "/tmp/b.sock:t:1", "8081:t:1"]
        [tunnels.c]
        destination = "h"
        forwards = ["10.1.2.3:8081:t:1"]     # not loopback: b's 8081 is on the loopbacks only
    """)
    assert len(cfg.tunnels) == 3


def test_a_bom_is_ignored(here):
    with open("tunnels.toml", "w", encoding="utf-8-sig") as f:
        f.write('[tunnels.a]\ndestination = "h"\nforwards = ["1:h:1"]\n')
    assert list(tunnelfile.load("tunnels.toml").tunnels) == ["a"]


def test_load_takes_a_path_object(here):
    load_text('[tunnels.a]\ndestination = "h"\nforwards = ["1:h:1"]\n')
    assert tunnelfile.load(here / "tunnels.toml").path == str(here / "tunnels.toml")


# ---- one-line errors ------------------------------------------------------------

OK = 'destination = "h"\nforwards = ["1:h:1"]\n'


def test_toml_syntax_errors_keep_line_and_column(here):
    msg = error_of('[tunnels.db]\ndestination = "h"\nforwards\n')
    assert msg == "tunnels.toml: line 3, column 9: Expected '=' after a key in a key/value pair"
    assert error_of("[tunnels.db]\nport = ") == "tunnels.toml: at the end: Invalid value"
    assert error_of("[tunnels.a]\n[tunnels.a]\n").startswith("tunnels.toml: line 2, column")


def test_a_missing_file(here):
    with pytest.raises(UsageError) as e:
        tunnelfile.load("nope.toml")
    assert str(e.value) == "nope.toml: cannot read: No such file or directory"


def test_a_directory(here):
    os.mkdir("d.toml")
    with pytest.raises(UsageError) as e:
        tunnelfile.load("d.toml")
    assert str(e.value) == "d.toml: cannot read: Is a directory"


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_an_unreadable_file(here):
    load_text(OK)
    os.chmod("tunnels.toml", 0)
    with pytest.raises(UsageError) as e:
        tunnelfile.load("tunnels.toml")
    assert str(e.value) == "tunnels.toml: cannot read: Permission denied"


def test_a_file_that_is_not_utf8(here):
    with open("tunnels.toml", "wb") as f:
        f.write(b'[tunnels.a]\ndestination = "caf\xe9"\n')
    with pytest.raises(UsageError) as e:
        tunnelfile.load("tunnels.toml")
    assert str(e.value) == ("tunnels.toml: line 2, column 19: not UTF-8 (byte 0xe9); "
                            "save the file as UTF-8")


@pytest.mark.parametrize("text", ["", "# only a comment\n", "[defaults]\nworkers = 1\n", "[tunnels]\n"])
def test_no_tunnels(here, text):
    assert error_of(text) == ("tunnels.toml: no tunnels: add a [tunnels.NAME] table "
                              "with destination and forwards")


ERRORS = [
    # (file text, the whole message after "tunnels.toml: ")
    (f"[tunnels.db]\nprot = 22\n{OK}",
     "unknown key 'prot' in tunnel 'db' (did you mean 'port'?)"),
    (f"[tunnels.db]\nhost = 'x'\n{OK}",
     "unknown key 'host' in tunnel 'db' (use destination = \"[user@]host\")"),
    (f"[defaults]\nwrokers = 2\n[tunnels.db]\n{OK}",
     "unknown key 'wrokers' in [defaults] (did you mean 'workers'?)"),
    (f"verbose = 1\n[tunnels.db]\n{OK}", "unknown top-level key 'verbose'"),
    (f"[tunnel.db]\n{OK}", "unknown top-level key 'tunnel' (did you mean 'tunnels'?)"),
    (f"[db]\n{OK}", "unknown top-level key 'db' (a tunnel is a [tunnels.NAME] table)"),
    (f"port = 22\n[tunnels.db]\n{OK}",
     "unknown top-level key 'port' (tunnel keys go in a [tunnels.NAME] table)"),
    (f"[tunnels.db]\n{OK}[tunnels.db.web]\n{OK}",
     "unknown key 'web' in tunnel 'db' ([tunnels.A.B] is a table inside tunnel 'A': "
     "quote a dotted name, [tunnels.\"A.B\"])"),
    # secrets
    (f"[tunnels.db]\npassword = 'hunter2'\n{OK}",
     "tunnel 'db': password: secrets do not go in files; use ssh-agent, "
     "or SSHPUMP_PASSWORD / SSHPUMP_PASSPHRASE in sshpump's environment"),
    (f"[defaults]\npassphrase = 'x'\n[tunnels.db]\n{OK}",
     "[defaults]: passphrase: secrets do not go in files; use ssh-agent, "
     "or SSHPUMP_PASSWORD / SSHPUMP_PASSPHRASE in sshpump's environment"),
    # structure
    ("tunnels = 5\n", "tunnels must be [tunnels.NAME] tables, not an integer"),
    ("[tunnels]\ndb = 5\n", "tunnel 'db' must be a table ([tunnels.db]), not an integer"),
    (f"defaults = []\n[tunnels.db]\n{OK}", "defaults must be a table ([defaults]), not a list"),
    (f"[tunnels.\"a b\"]\n{OK}", "tunnel name 'a b' is not 1 to 64 of A-Z a-z 0-9 _ . -"),
    (f"[tunnels.{'x' * 65}]\n{OK}",
     f"tunnel name '{'x' * 65}' is not 1 to 64 of A-Z a-z 0-9 _ . -"),
    ("[tunnels.db]\nforwards = ['1:h:1']\n", "tunnel 'db': destination is missing"),
    ("[tunnels.db]\ndestination = 'h'\n", "tunnel 'db': forwards is missing"),
    ("[tunnels.db]\ndestinaton = 'h'\nforwards = ['1:h:1']\n",
     "unknown key 'destinaton' in tunnel 'db' (did you mean 'destination'?)"),
    ("[tunnels.db]\ndestination = 'h'\nforwards = []\n",
     "tunnel 'db': forwards: is empty: give at least one -L spec"),
    ("[tunnels.db]\ndestination = 'h'\nforwards = '1:h:1'\n",
     "tunnel 'db': forwards: must be a list of -L spec strings, not a string"),
    (f"[defaults]\ndestination = 'h'\n[tunnels.db]\n{OK}",
     "[defaults]: destination belongs in each [tunnels.NAME] table, not in [defaults]"),
    # forwards
    ("[tunnels.db]\ndestination = 'h'\nforwards = ['1:h:1', '99999:h:1']\n",
     "tunnel 'db': forwards[1]: bad forward spec '99999:h:1': "
     "listen port '99999' is out of range (0-65535)"),
    ("[tunnels.db]\ndestination = 'h'\nforwards = [5432]\n",
     "tunnel 'db': forwards[0]: bad forward spec 5432: not a string"),
    ('[tunnels.db]\ndestination = "h"\nforwards = ["1:h\\n:1"]\n',     # TOML's "\n": a newline
     "tunnel 'db': forwards[0]: bad forward spec '1:h\\n:1': "
     "target host 'h\\n' contains a space or control character"),
    # destination
    ("[tunnels.db]\ndestination = 'h:2222'\nforwards = ['1:h:1']\n",
     "tunnel 'db': destination: 'h:2222': a port goes in port = N, not in destination"),
    ("[tunnels.db]\ndestination = '@'\nforwards = ['1:h:1']\n",
     "tunnel 'db': destination: host is empty"),
    ("[tunnels.db]\ndestination = 22\nforwards = ['1:h:1']\n",
     "tunnel 'db': destination: must be a string, not an integer"),
    # values
    (f"[tunnels.db]\nport = 0\n{OK}", "tunnel 'db': port: must be between 1 and 65535, not 0"),
    (f"[tunnels.db]\nport = '22'\n{OK}", "tunnel 'db': port: must be an integer, not a string"),
    (f"[tunnels.db]\nport = true\n{OK}", "tunnel 'db': port: must be an integer, not a boolean"),
    (f"[tunnels.db]\nworkers = 2000\n{OK}",
     "tunnel 'db': workers: must be between 0 and 1024, not 2000"),
    (f"[tunnels.db]\nuse_agent = 'yes'\n{OK}",
     "tunnel 'db': use_agent: must be true or false, not a string"),
    (f"[tunnels.db]\nserver_alive_interval = 0.5\n{OK}",
     "tunnel 'db': server_alive_interval: must be whole seconds (an integer, or a string "
     "such as \"90s\"), not a float"),
    (f"[tunnels.db]\nconnect_timeout = '5 s'\n{OK}",
     "tunnel 'db': connect_timeout: time '5 s' is not a time in whole seconds (e.g. 30, 90s, 2m)"),
    (f"[tunnels.db]\nstrict_host_key_checking = 'ask'\n{OK}",
     "tunnel 'db': strict_host_key_checking: 'ask' is not yes, accept-new or no"),
    (f"[tunnels.db]\nknown_hosts = []\n{OK}", "tunnel 'db': known_hosts: is an empty list"),
    (f"[tunnels.db]\nidentity = ['~/k', 3]\n{OK}",
     "tunnel 'db': identity: [1] must be a string, not an integer"),
    (f"[tunnels.db]\nreconnect_max = 0.1\n{OK}",
     "tunnel 'db': reconnect_max: must be at least 0.5 seconds (the reconnect backoff's "
     "minimum), not 0.1"),
    (f"[tunnels.db]\ndrain_timeout = nan\n{OK}",
     "tunnel 'db': drain_timeout: must be a number of seconds, not nan"),
    (f"[tunnels.db]\nclient_wait = -1\n{OK}",
     "tunnel 'db': client_wait: must be between 0 and 2.14748e+09, not -1"),
    (f"[tunnels.db]\nwindow = 1e9\n{OK}", "tunnel 'db': window: must be an integer, not a float"),
    # options
    (f"[tunnels.db]\noptions = ['Prot=22']\n{OK}",
     "tunnel 'db': options[0]: unsupported -o option 'Prot'"),
    (f"[tunnels.db]\noptions = ['ServerAliveCountMax=5', 'Port=x']\n{OK}",
     "tunnel 'db': options[1]: -o Port 'x' is not a number (ASCII digits only)"),
    (f"[tunnels.db]\noptions = ['BatchMode=yes']\n{OK}",
     "tunnel 'db': options[0]: BatchMode is a command-line option, not one for a tunnels file"),
    (f"[tunnels.db]\noptions = 'Port=2'\n{OK}",
     "tunnel 'db': options: must be a list of \"Key=value\" strings, not a string"),
    # the same setting twice in one table
    (f"[tunnels.db]\nport = 22\noptions = ['Port=2222']\n{OK}",
     "tunnel 'db': options[0] 'Port=2222' sets port, and so does port: give it once"),
    (f"[tunnels.db]\nidentity = '~/a'\nidentities = ['~/b']\n{OK}",
     "tunnel 'db': identities sets identities, and so does identity: give it once"),
    ("[tunnels.db]\ndestination = 'me@h'\nuser = 'you'\nforwards = ['1:h:1']\n",
     "tunnel 'db': the user is given twice: in destination and by user"),
    ("[tunnels.db]\ndestination = 'me@h'\noptions = ['User=you']\nforwards = ['1:h:1']\n",
     "tunnel 'db': the user is given twice: in destination and by options[0] 'User=you'"),
    # check_options
    (f"[tunnels.db]\nciphers = 'rot13'\n{OK}",
     "tunnel 'db': ciphers: ciphers 'rot13': libssh2 has no cipher 'rot13' (it has: "),
    # control
    (f"control = 5\n[tunnels.db]\n{OK}", "control: must be a string, not an integer"),
    (f"control = '/{'s' * 107}'\n[tunnels.db]\n{OK}",
     f"control: control socket path '/{'s' * 107}' is 108 bytes long (at most 107)"),
    ("control = '/tmp/x.sock'\n[tunnels.db]\ndestination = 'h'\nforwards = ['/tmp//x.sock:h:1']\n",
     "tunnel 'db': forwards[0] listens on the control socket path '/tmp/x.sock'"),
]


@pytest.mark.parametrize("text, expected", ERRORS, ids=[e[1][:50] for e in ERRORS])
def test_one_line_errors(here, text, expected):
    msg = error_of(text)
    if expected.endswith("(it has: "):
        assert msg.startswith(f"tunnels.toml: {expected}")
    else:
        assert msg == f"tunnels.toml: {expected}"


def test_a_message_names_the_file_as_given(here):
    os.mkdir("conf")
    msg = error_of(f"[tunnels.db]\nprot = 22\n{OK}", name="conf/my tunnels.toml")
    assert msg == "conf/my tunnels.toml: unknown key 'prot' in tunnel 'db' (did you mean 'port'?)"


CLASHES = [
    # (forwards of 'a', forwards of 'b', gateway_ports of b, message after "tunnels.toml: ")
    (["8080:t:1"], ["8080:u:2"], False,
     "tunnels 'a' (forwards[0] '8080:t:1') and 'b' (forwards[0] '8080:u:2') both listen on port 8080"),
    (["8080:t:1"], ["*:8080:u:2"], False,
     "tunnels 'a' (forwards[0] '8080:t:1') and 'b' (forwards[0] '*:8080:u:2') both listen on port 8080"),
    (["localhost:8080:t:1"], ["[::1]:8080:u:2"], False,
     "tunnels 'a' (forwards[0] 'localhost:8080:t:1') and 'b' (forwards[0] '[::1]:8080:u:2') "
     "both listen on port 8080"),
    (["0.0.0.0:8080:t:1"], ["127.0.0.1:8080:u:2"], False,
     "tunnels 'a' (forwards[0] '0.0.0.0:8080:t:1') and 'b' (forwards[0] '127.0.0.1:8080:u:2') "
     "both listen on port 8080"),
    (["10.0.0.1:8080:t:1"], ["8080:u:2"], True,       # gateway_ports: every interface
     "tunnels 'a' (forwards[0] '10.0.0.1:8080:t:1') and 'b' (forwards[0] '8080:u:2') "
     "both listen on port 8080"),
    (["db.example:8080:t:1"], ["DB.example.:8080:u:2"], False,
     "tunnels 'a' (forwards[0] 'db.example:8080:t:1') and 'b' (forwards[0] 'DB.example.:8080:u:2') "
     "both listen on port 8080"),
    (["1:t:1", "/tmp/s.sock:t:1"], ["/tmp/./s.sock:/r"], False,
     "tunnels 'a' (forwards[1] '/tmp/s.sock:t:1') and 'b' (forwards[0] '/tmp/./s.sock:/r') "
     "both listen on /tmp/./s.sock"),
]


@pytest.mark.parametrize("a, b, gateway, expected", CLASHES, ids=[str(c[:2]) for c in CLASHES])
def test_two_tunnels_on_one_listen_address(here, a, b, gateway, expected):
    msg = error_of(f"""
        [tunnels.a]
        destination = "h"
        forwards = {a!r}
        [tunnels.b]
        destination = "h"
        gateway_ports = {str(gateway).lower()}
        forwards = {b!r}
    """)    # a Python list's repr is a TOML array of literal strings
    assert msg == f"tunnels.toml: {expected}"


def test_one_tunnel_listening_twice(here):
    msg = error_of("""
        [tunnels.a]
        destination = "h"
        forwards = ["8080:t:1", "9:t:1", "*:8080:u:2"]
    """)
    assert msg == ("tunnels.toml: tunnel 'a': forwards[0] '8080:t:1' and forwards[2] '*:8080:u:2' "
                   "both listen on port 8080")


def test_the_same_forward_twice(here):
    msg = error_of("""
        [tunnels.a]
        destination = "h"
        forwards = ["0:t:1", "00:t:01"]
    """)
    assert msg == ("tunnels.toml: tunnel 'a': forwards[0] and forwards[1] are the same forward "
                   "('0:t:1', '00:t:01')")


# ---- never a traceback ----------------------------------------------------------

with open(EXAMPLE, encoding="utf-8") as _f:
    EXAMPLE_TEXT = _f.read()


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.data())
def test_a_mangled_example_loads_or_says_why_in_one_line(tmp_path, data):
    """Cut, swap or insert characters in the example: load() either returns or raises
    one UsageError line that names the file; never anything else."""
    text = EXAMPLE_TEXT
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(text)))
        j = data.draw(st.integers(i, min(len(text), i + 40)))
        new = data.draw(st.sampled_from(["", "0", "99999", "'", '"', "[", "]", "=", "\n", "x",
                                         ".", "-", "~", "*", "@", "é", "\\", "#", ",", "true"]))
        text = text[:i] + new + text[j:]
    path = str(tmp_path / "t.toml")
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    try:
        cfg = tunnelfile.load(path)
    except UsageError as e:
        assert "\n" not in str(e) and str(e).startswith(f"{path}: ")
    else:
        assert cfg.tunnels
        assert len(tunnelfile.summary(cfg).splitlines()) == len(cfg.tunnels)
