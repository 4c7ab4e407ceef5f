"""The reload plan (sshpump.reloadplan): old tunnels and new ones -> what to add,
remove, restart, and which forwards to open or close."""
from __future__ import annotations

import dataclasses
import textwrap
from collections import Counter

from hypothesis import given, settings
from hypothesis import strategies as st

from sshpump import reloadplan, tunnelfile
from sshpump.options import Options
from sshpump.reloadplan import plan
from sshpump.spec import parse_local_forward
from sshpump.tunnelfile import TunnelConfig


def tunnel(name: str, *specs: str, **opts) -> TunnelConfig:
    o = Options(host=opts.pop("host", "bastion"), user="me", workers=opts.pop("workers", 2), **opts)
    o.forwards = [parse_local_forward(s) for s in specs]
    return TunnelConfig(name=name, opts=o)


def tunnels(*ts: TunnelConfig) -> dict[str, TunnelConfig]:
    return {t.name: t for t in ts}


def specs(forwards) -> list[str]:
    return [f.spec for f in forwards]


def test_nothing_changed():
    old = tunnels(tunnel("db", "5432:db:5432"), tunnel("web", "8080:web:80"))
    new = tunnels(tunnel("db", "5432:db:5432"), tunnel("web", "8080:web:80"))
    p = plan(old, new)
    assert p.empty()
    assert p.unchanged == ["db", "web"]
    assert (p.added, p.removed, p.restarted, p.forwards_added, p.forwards_removed) == ([], [], [], {}, {})


def test_a_tunnel_added_and_one_removed():
    old = tunnels(tunnel("db", "5432:db:5432"), tunnel("old", "1:h:1"))
    new = tunnels(tunnel("db", "5432:db:5432"), tunnel("web", "8080:web:80"))
    p = plan(old, new)
    assert not p.empty()
    assert [t.name for t in p.added] == ["web"] and p.added[0] is new["web"]
    assert p.removed == ["old"]
    assert p.unchanged == ["db"] and p.restarted == []


def test_an_option_change_restarts_only_that_tunnel():
    old = tunnels(tunnel("db", "5432:db:5432"), tunnel("web", "8080:web:80"))
    new = tunnels(tunnel("db", "5432:db:5432", "6432:db:6432", port=2222),
                  tunnel("web", "8080:web:80"))
    p = plan(old, new)
    assert [t.name for t in p.restarted] == ["db"] and p.restarted[0] is new["db"]
    # restarted only: its new forwards come with it, not in forwards_added
    assert p.forwards_added == {} and p.forwards_removed == {}
    assert p.unchanged == ["web"]


def test_each_session_option_restarts():
    base = tunnel("t", "1:h:1")
    changes = dict(host="other", user="you", port=2200, identities=["/k"], identities_only=True,
                   use_agent=False, known_hosts=["/kh"], strict_host_key_checking="no",
                   connect_timeout=None, server_alive_interval=5, server_alive_count_max=9,
                   exit_on_forward_failure=True, gateway_ports=True, ciphers="aes256-ctr",
                   workers=7, window=1 << 24, bufsize=4096, client_wait=1.0, drain_timeout=2.0,
                   reconnect_max=3.0, proxy_jump=["jump"], proxy_command="nc %h %p",
                   sessions_per_worker=4, mux=True)
    assert set(changes) | set(reloadplan.NOT_COMPARED) == {f.name for f in dataclasses.fields(Options)}
    for name, value in changes.items():
        changed = TunnelConfig("t", dataclasses.replace(base.opts, **{name: value}))
        p = plan({"t": base}, {"t": changed})
        assert [t.name for t in p.restarted] == ["t"], name


def test_secrets_and_verbosity_are_not_compared():
    """The runtime sets password/passphrase (from its environment) and verbose (-v)
    on the tunnels it runs; a freshly loaded file has none of them."""
    running = tunnel("t", "1:h:1", password="s3cret", passphrase="pp", verbose=2)
    loaded = tunnel("t", "1:h:1")
    assert plan({"t": running}, {"t": loaded}).unchanged == ["t"]


def test_forwards_added_and_removed_in_file_order():
    old = tunnels(tunnel("db", "5432:db:5432", "/tmp/a.sock:/r", "7:h:7"))
    new = tunnels(tunnel("db", "9:h:9", "5432:db:5432", "8:h:8"))
    p = plan(old, new)
    assert p.restarted == [] and p.unchanged == []
    assert {k: specs(v) for k, v in p.forwards_added.items()} == {"db": ["9:h:9", "8:h:8"]}
    assert {k: specs(v) for k, v in p.forwards_removed.items()} == {"db": ["/tmp/a.sock:/r", "7:h:7"]}
    assert not p.empty()


def test_only_additions_leave_forwards_removed_empty():
    p = plan(tunnels(tunnel("db", "1:h:1")), tunnels(tunnel("db", "1:h:1", "2:h:2")))
    assert specs(p.forwards_added["db"]) == ["2:h:2"]
    assert p.forwards_removed == {}


def test_forwards_are_compared_by_what_they_do_not_their_text():
    old = tunnels(tunnel("db", "00080:h:0022", "*:81:h:1", "[::1]:82:[::1]:2"))
    new = tunnels(tunnel("db", "80:h:22", ":81:h:1", "[::1]:82:[0::1]:2"))
    p = plan(old, new)
    # "::1" and "0::1" are the same address, but not the same text: the target
    # host goes to the server as written, so it is a different forward
    assert specs(p.forwards_added["db"]) == ["[::1]:82:[0::1]:2"]
    assert specs(p.forwards_removed["db"]) == ["[::1]:82:[::1]:2"]
    p = plan(old, tunnels(tunnel("db", "80:h:22", ":81:h:1", "[::1]:82:[::1]:2")))
    assert p.empty() and p.unchanged == ["db"]


def test_a_bind_address_change_is_a_new_forward():
    p = plan(tunnels(tunnel("db", "8080:h:1")), tunnels(tunnel("db", "localhost:8080:h:1")))
    assert specs(p.forwards_removed["db"]) == ["8080:h:1"]
    assert specs(p.forwards_added["db"]) == ["localhost:8080:h:1"]


def test_identical_port_zero_forwards_count_as_a_multiset():
    p = plan(tunnels(tunnel("t", "0:h:1", "0:h:1", "0:h:1")), tunnels(tunnel("t", "0:h:1")))
    assert specs(p.forwards_removed["t"]) == ["0:h:1", "0:h:1"]
    assert "t" not in p.forwards_added


def test_a_renamed_tunnel_is_removed_and_added():
    p = plan(tunnels(tunnel("db", "1:h:1")), tunnels(tunnel("pg", "1:h:1")))
    assert p.removed == ["db"] and [t.name for t in p.added] == ["pg"]


def test_from_old_and_new_files(tmp_path):
    """Two versions of one file, as a SIGHUP reload sees them."""
    def load(text):
        path = tmp_path / "tunnels.toml"
        path.write_text(textwrap.dedent(text))
        return tunnelfile.load(str(path)).tunnels

    old = load("""
        [defaults]
        workers = 2
        [tunnels.db]
        destination = "me@bastion1"
        forwards = ["5432:db:5432", "/tmp/pg.sock:/run/postgresql/.s.PGSQL.5432"]
        [tunnels.web]
        destination = "bastion2"
        forwards = ["8080:web:80"]
        [tunnels.gone]
        destination = "bastion3"
        forwards = ["9000:x:1"]
        [tunnels.cache]
        destination = "bastion4"
        forwards = ["6379:redis:6379"]
    """)
    new = load("""
        [defaults]
        workers = 2
        [tunnels.db]
        destination = "me@bastion1"
        forwards = ["5432:db:5432", "5433:replica:5432"]   # one forward swapped
        [tunnels.web]
        destination = "bastion2"
        workers = 4                                        # restart
        forwards = ["8080:web:80"]
        [tunnels.cache]                                    # untouched
        destination = "bastion4"
        forwards = ["6379:redis:6379"]
        [tunnels.new]
        destination = "bastion5"
        forwards = ["9001:y:1"]
    """)
    p = plan(old, new)
    assert [t.name for t in p.added] == ["new"]
    assert p.removed == ["gone"]
    assert [t.name for t in p.restarted] == ["web"] and p.restarted[0].opts.workers == 4
    assert {k: specs(v) for k, v in p.forwards_added.items()} == {"db": ["5433:replica:5432"]}
    assert {k: specs(v) for k, v in p.forwards_removed.items()} == {
        "db": ["/tmp/pg.sock:/run/postgresql/.s.PGSQL.5432"]}
    assert p.unchanged == ["cache"]
    assert plan(new, new).empty()


# ---- property: applying the plan to old gives new ----------------------------------

SPECS = ["1:h:1", "0001:h:1", "2:h:2", "0:h:3", "*:4:h:4", "127.0.0.1:4:h:4",
         "/tmp/a.sock:h:5", "/tmp/a.sock:/r", "6:/r"]
NAMES = ["a", "b", "c", "d"]


@st.composite
def configs(draw):
    out = {}
    for name in draw(st.lists(st.sampled_from(NAMES), unique=True)):
        out[name] = tunnel(
            name,
            *draw(st.lists(st.sampled_from(SPECS), min_size=1, max_size=5)),
            host=draw(st.sampled_from(["h1", "h2"])),
            port=draw(st.sampled_from([22, 2222])),
            workers=draw(st.sampled_from([1, 2])),
            password=draw(st.sampled_from([None, "pw"])),   # never compared
        )
    return out


def session(opts: Options) -> Options:
    """The oracle: Options without forwards and the fields nobody reloads."""
    return dataclasses.replace(opts, forwards=[], password=None, passphrase=None, verbose=0)


def state(cfg: dict[str, TunnelConfig]) -> dict:
    return {n: (session(t.opts), Counter((f.listen, f.target) for f in t.opts.forwards))
            for n, t in cfg.items()}


@settings(max_examples=500, deadline=None)
@given(configs(), configs())
def test_applying_the_plan_to_old_gives_new(old, new):
    p = plan(old, new)
    run = state(old)
    for name in p.removed:
        del run[name]
    for t in p.added + p.restarted:
        assert (t.name in run) == (t in p.restarted)
        run[t.name] = state({t.name: t})[t.name]
    for name, fwds in p.forwards_removed.items():
        gone = Counter((f.listen, f.target) for f in fwds)
        assert not gone - run[name][1], "removes a forward that is not running"
        run[name][1].subtract(gone)
        run[name] = (run[name][0], +run[name][1])
    for name, fwds in p.forwards_added.items():
        run[name][1].update((f.listen, f.target) for f in fwds)
    assert run == state(new)

    # every new name is in exactly one place; a restarted tunnel has no forward changes
    restarted = [t.name for t in p.restarted]
    changed = set(p.forwards_added) | set(p.forwards_removed)
    groups = [[t.name for t in p.added], restarted, p.unchanged, sorted(changed)]
    assert sorted(sum(groups, [])) == sorted(new)
    assert p.removed == [n for n in old if n not in new]
    assert all(fwds for fwds in [*p.forwards_added.values(), *p.forwards_removed.values()])
    # order: the new file's
    assert [t.name for t in p.added] == [n for n in new if n not in old]
    assert [n for n in new if n in restarted] == restarted
    assert [n for n in new if n in p.unchanged] == p.unchanged
    assert p.empty() == (state(old) == state(new))
