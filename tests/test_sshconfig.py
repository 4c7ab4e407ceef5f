"""~/.ssh/config through ``ssh -G``: sshpump's resolution agrees with the
real ssh binary's for every key sshpump honours; the command line wins;
what sshpump lacks is ignored in a config file but refused on -o; no ssh on
PATH is one warning line; a bad config is one error line and exit 2. Every
test names its config with -F (ssh reads ~/.ssh/config from the password
database's home directory, not $HOME, so only -F is hermetic)."""
from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest

from sshpump import validate

from helpers import PY, Pump, clean_env

SSH = "/usr/bin/ssh"
pytestmark = pytest.mark.skipif(not os.path.exists(SSH), reason="needs the OpenSSH client")


def ssh_g(*args) -> dict[str, list[str]]:
    """What the real ssh resolves: {key: [values]}."""
    out = subprocess.run([SSH, "-G", *args], stdin=subprocess.DEVNULL, capture_output=True, text=True,
                         check=True).stdout
    keys: dict[str, list[str]] = {}
    for line in out.splitlines():
        key, _, value = line.partition(" ")
        keys.setdefault(key, []).append(value)
    return keys


def sshpump(*args, env=None, timeout=30):
    """python -m sshpump ARGS -> (exit code, stdout, stderr)."""
    r = subprocess.run([PY, "-m", "sshpump", *args], stdin=subprocess.DEVNULL, capture_output=True,
                       text=True, env=clean_env() if env is None else env, timeout=timeout)
    return r.returncode, r.stdout, r.stderr


def sshpump_g(*args, env=None) -> dict[str, list[str]]:
    rc, out, err = sshpump("-G", *args, env=env)
    assert rc == 0 and err == "", f"exit {rc}: {err}"
    keys: dict[str, list[str]] = {}
    for line in out.splitlines():
        key, _, value = line.partition(" ")
        keys.setdefault(key, []).append(value)
    return keys


def without_phantoms(ssh: dict) -> list[str]:
    """ssh -G's dynamicforward lines less the phantom printed for each
    LocalForward to a unix path (readconf.c dump_cfg_forwards)."""
    dynamic = list(ssh.get("dynamicforward", []))
    for line in ssh.get("localforward", []):
        listen, target = line.split(" ")
        if target.startswith(("/", "~")):
            dynamic.remove(listen)
    return dynamic


@pytest.fixture
def config(tmp_path):
    """A config with Include, Host patterns with a wildcard and a negation,
    Match host / Match user, ProxyJump, forwards of each kind, IdentityFile
    with %-tokens, and options sshpump does not implement."""
    keys = tmp_path / "keys"
    keys.mkdir()
    (tmp_path / "included.conf").write_text(
        "Host db-bad\n"
        "  HostName bad.example\n"
        "  ForwardAgent yes\n")
    cfg = tmp_path / "ssh_config"
    cfg.write_text(
        f"Include {tmp_path}/included.conf\n"
        "Host db-* !db-bad\n"
        "  HostName %h.internal\n"
        "  User dbadmin\n"
        "  Port 2201\n"
        f"  IdentityFile {keys}/%r@%h-%p\n"
        f"  IdentityFile {keys}/id-%C\n"
        f"  IdentityFile {keys}/missing-%n-%l-%u-%%\n"
        "  LocalForward 15432 localhost:5432\n"
        "  LocalForward [::1]:15433 [::1]:5433\n"
        f"  LocalForward {tmp_path}/s.sock /run/postgresql/.s.PGSQL.5432\n"
        f"  LocalForward {tmp_path}/%h-%%.sock [::1]:5434\n"
        "  LocalForward 15434 /run/other.sock\n"
        "  DynamicForward 127.0.0.1:1080\n"
        "  DynamicForward 1081\n"
        "  RemoteForward 9000 localhost:22\n"
        "  ProxyJump jumper@bastion:2222,ssh://second@inner:2200\n"
        "  Compression yes\n"
        "  ControlMaster auto\n"
        "Match host *.internal user dbadmin\n"
        "  ServerAliveInterval 15\n"
        "  ServerAliveCountMax 5\n"
        "  StrictHostKeyChecking accept-new\n"
        f"  UserKnownHostsFile {tmp_path}/kh-%h %d/kh2\n"
        "  Ciphers aes256-ctr,aes192-ctr,aes128-gcm@openssh.com,aes128-cbc\n"
        "  ConnectTimeout 7\n"
        "  ExitOnForwardFailure yes\n"
        "  GatewayPorts yes\n"
        "  BatchMode yes\n"
        "  IdentitiesOnly yes\n"
        "Host *\n"
        "  ProxyCommand nc %h %p\n"
        "  User fallback\n")
    return cfg


HONOURED_AS_PRINTED = ("user", "hostname", "port", "proxyjump", "userknownhostsfile", "serveraliveinterval",
                       "serveralivecountmax", "connecttimeout", "identitiesonly", "exitonforwardfailure",
                       "gatewayports", "batchmode", "localforward", "remoteforward")


def test_resolution_agrees_with_ssh_g(config, tmp_path):
    ssh = ssh_g("-F", str(config), "db-main")
    conn_hash = ssh_g("-F", str(config), "-o", "ControlPath=%C", "db-main")["controlpath"][0]
    (tmp_path / "keys" / "dbadmin@db-main.internal-2201").write_text("")
    (tmp_path / "keys" / f"id-{conn_hash}").write_text("")
    ours = sshpump_g("-F", str(config), "db-main")
    for key in HONOURED_AS_PRINTED:
        assert ours[key] == ssh[key], key
    assert ours["dynamicforward"] == without_phantoms(ssh) == ["[127.0.0.1]:1080", "1081"]
    assert ssh["stricthostkeychecking"] == ours["stricthostkeychecking"] == ["accept-new"]
    assert ours["proxycommand"] == ["none"] and "proxycommand" not in ssh   # ProxyJump came first
    # ssh's order kept, names libssh2 lacks dropped (none here: this libssh2 has all of ssh's)
    assert ours["ciphers"] == [",".join(c for c in ssh["ciphers"][0].split(",")
                                        if c in validate.supported_ciphers())]
    # %-tokens expanded as ssh does, files that do not exist skipped
    assert ssh["identityfile"][1].endswith("/id-%C")
    assert ours["identityfile"] == [f"{tmp_path}/keys/dbadmin@db-main.internal-2201",
                                    f"{tmp_path}/keys/id-{conn_hash}"]
    assert ours["hostname"] == ["db-main.internal"] and ours["proxyjump"] == ["jumper@bastion:2222,second@inner:2200"]


def test_negated_host_and_include_agree_with_ssh_g(config):
    ssh = ssh_g("-F", str(config), "db-bad")
    ours = sshpump_g("-F", str(config), "db-bad")
    for key in ("user", "hostname", "port", "proxycommand", "serveraliveinterval", "stricthostkeychecking"):
        assert key in ssh
    assert (ours["hostname"], ours["user"], ours["port"]) == (ssh["hostname"], ssh["user"], ssh["port"]) \
        == (["bad.example"], ["fallback"], ["22"])
    assert ours["proxycommand"] == ssh["proxycommand"] == ["nc %h %p"] and ours["proxyjump"] == ["none"]
    assert "localforward" not in ours and "dynamicforward" not in ours
    # ssh's defaults become sshpump's own (keepalives on, 30 s bound, its cipher order)
    assert ssh["serveraliveinterval"] == ["0"] and ours["serveraliveinterval"] == ["30"]
    assert ssh["stricthostkeychecking"] == ["ask"] and ours["stricthostkeychecking"] == ["yes"]
    assert ssh["connecttimeout"] == ["none"] and ours["connecttimeout"] == ["30"]
    assert ours["ciphers"][0].startswith("aes128-gcm@openssh.com,")


def test_command_line_wins_over_the_config(config, tmp_path):
    args = ["-F", str(config), "-p", "2300", "-o", "ServerAliveInterval=1m", "-o", "Ciphers=aes128-ctr",
            "-o", f"UserKnownHostsFile={tmp_path}/mine", "-o", "StrictHostKeyChecking=no", "-o", "BatchMode=no",
            "-J", "none", "-i", str(tmp_path / "cli-key"), "-L", "7000:web:80", "-L", "15432:localhost:5432"]
    ssh = ssh_g("-F", str(config), "-p", "2300", "-J", "none", "db-main")
    ours = sshpump_g(*args, "db-main")
    assert ours["port"] == ssh["port"] == ["2300"] and ours["proxyjump"] == ["none"]
    assert ours["proxycommand"] == ssh["proxycommand"] == ["nc %h %p"]   # -J none: ProxyCommand applies, as in ssh
    assert ours["serveraliveinterval"] == ["60"] and ours["ciphers"] == ["aes128-ctr"]
    assert ours["userknownhostsfile"] == [f"{tmp_path}/mine"] and ours["stricthostkeychecking"] == ["no"]
    assert ours["batchmode"] == ["no"] and ours["serveralivecountmax"] == ["5"]   # the rest from the config
    assert ours["identityfile"] == [str(tmp_path / "cli-key")]   # -i first (the config's do not exist here)
    # the command line's forwards first; the config's same forward is not added twice, as in ssh
    assert ours["localforward"][:2] == ["7000 [web]:80", "15432 [localhost]:5432"]
    assert ours["localforward"].count("15432 [localhost]:5432") == 1
    # -l changes what Match user sees: the Match block no longer applies, as ssh says
    ssh = ssh_g("-F", str(config), "-l", "someone", "db-main")
    ours = sshpump_g("-F", str(config), "-l", "someone", "-o", "HostName=10.9.8.7", "db-main")
    assert ours["user"] == ssh["user"] == ["someone"] and ours["hostname"] == ["10.9.8.7"]
    assert ssh["serveraliveinterval"] == ["0"] and ours["serveraliveinterval"] == ["30"]


def test_each_jump_host_is_resolved_as_ssh_resolves_it(tmp_path):
    """ssh reaches a hop as any host: its own HostName, User and Port (the
    local user when nothing names one, not the destination's)."""
    cfg = tmp_path / "c"
    cfg.write_text("Host bastion\n  HostName bastion.example.com\n  User ops\n  Port 2022\n"
                   "Host db\n  User postgres\n  ProxyJump bastion,me@other:23,plain\n")
    assert ssh_g("-F", str(cfg), "db")["proxyjump"] == ["bastion,me@other:23,plain"]
    hops = []
    for args in (["bastion"], ["-l", "me", "-p", "23", "other"], ["plain"]):
        ssh = ssh_g("-F", str(cfg), *args)
        hops.append(f"{ssh['user'][0]}@{ssh['hostname'][0]}:{ssh['port'][0]}")
    assert hops[0] == "ops@bastion.example.com:2022" and hops[2].endswith("@plain:22")
    ours = sshpump_g("-F", str(cfg), "db")
    assert ours["proxyjump"] == [",".join(hops)] and ours["user"] == ["postgres"]
    # -J on the command line goes through the same resolution
    assert sshpump_g("-F", str(cfg), "-J", "bastion", "db")["proxyjump"] == ["ops@bastion.example.com:2022"]


def test_every_token_expands_as_ssh_expands_it(config):
    """ssh -G expands ControlPath itself: the same template through
    sshpump's expansion must give the same path, token for token."""
    from sshpump import sshconfig, sshtokens

    template = "~/%d/%h/%r/%u/%l/%L/%n/%p/%i/%k/%%/%C"
    for host, seen in (("db-main", "/db-main.internal/dbadmin/"), ("DB-Main", "/db-main/fallback/")):
        want = ssh_g("-F", str(config), "-o", f"ControlPath={template}", host)["controlpath"][0]
        resolved = sshconfig.resolve(SSH, sshconfig.Query(destination=host, config_file=str(config)))
        got = sshtokens.expand_path(template, sshconfig.tokens(resolved, host), "test")
        assert got == want and seen in got   # %n keeps the case typed, %h is ssh's (lowercased)


def test_remote_forwards_are_added_to_the_command_line(tmp_path):
    """The config's RemoteForward lines become -R forwards beside the
    command line's, shown by -G as ssh shows them; a remote SOCKS forward
    (which libssh2 cannot do) is one line, exit 2."""
    from sshpump import sshconfig, sshtokens

    cfg = tmp_path / "c"
    cfg.write_text("Host *\n  RemoteForward 9000 localhost:22\n  RemoteForward [::1]:9001 %d/app.sock\n")
    ssh = ssh_g("-F", str(cfg), "h")
    assert sshpump_g("-F", str(cfg), "h")["remoteforward"] == ssh["remoteforward"]
    home = sshtokens.home_dir()   # ssh -G expands the tokens of forward paths itself
    assert [sshconfig.remote_forward_spec(line) for line in ssh["remoteforward"]] == \
        ["9000:[localhost]:22", f"[::1]:9001:{home}/app.sock"]
    both = sshpump_g("-F", str(cfg), "-R", "9100:db:5432", "h")["remoteforward"]
    assert both == ["9100 [db]:5432", *ssh["remoteforward"]]
    rc, out, err = sshpump("-F", str(cfg), "-p", "1", "nobody@127.0.0.1")
    assert rc == 3 and "RemoteForward" not in err, err   # nothing else to forward: the config's -R is enough
    cfg.write_text("Host *\n  RemoteForward 9002\n")
    rc, out, err = sshpump("-F", str(cfg), "-L", "0:h:1", "nobody@127.0.0.1")
    assert rc == 2 and err.strip().splitlines() == [
        "sshpump: RemoteForward in the ssh config: bad remote forward spec '9002': remote dynamic forwarding "
        "(SOCKS) is not supported; expected [bind:]port:host:hostport or [bind:]port:/local/socket"], err


def test_phantom_dynamicforward_of_a_tilde_target_is_dropped(tmp_path):
    """ssh takes "~/x.sock" as a unix path too, and prints its phantom; the
    remote ~ is not sshpump's to expand: refused, never made a SOCKS proxy."""
    cfg = tmp_path / "c"
    cfg.write_text("Host *\n  LocalForward 7007 ~/remote.sock\n")
    assert ssh_g("-F", str(cfg), "h")["dynamicforward"] == ["7007"]
    rc, out, err = sshpump("-G", "-F", str(cfg), "h")
    assert rc == 2 and "ssh config LocalForward '7007 ~/remote.sock'" in err and out == "", err


def test_f_none_reads_no_file(tmp_path):
    ours = sshpump_g("-F", "none", "-L", "0:h:1", "Some-Host")
    ssh = ssh_g("-F", "none", "Some-Host")
    assert ours["hostname"] == ssh["hostname"] == ["some-host"]   # ssh lowercases the host, as here
    assert (ours["user"], ours["port"]) == (ssh["user"], ["22"])
    assert "identityfile" not in ours and ours["proxyjump"] == ["none"]   # empty $HOME: no default keys
    assert ours["localforward"] == ["0 [h]:1"] and "dynamicforward" not in ours


def test_unknown_option_ignored_in_config_refused_on_command_line(tmp_path):
    cfg = tmp_path / "c"
    cfg.write_text("Host *\n  Compression yes\n  ForwardX11 yes\n  LogLevel QUIET\n")
    assert sshpump_g("-F", str(cfg), "-L", "0:h:1", "h")["hostname"] == ["h"]
    rc, out, err = sshpump("-F", str(cfg), "-o", "Compression=yes", "-L", "0:h:1", "-p", "1", "nobody@127.0.0.1")
    assert rc == 2 and err == "sshpump: unsupported -o option 'Compression'\n", err


@pytest.mark.parametrize("text,said", [
    ("Host *\n  NoSuchKeyword 1\n", "line 2: Bad configuration option: nosuchkeyword"),
    ("Host *\n  Port seventy\n", "line 2: Bad port 'seventy'"),
    ("Host *\n  LocalForward 0 h:1\n", "line 2: Bad forwarding specification"),
])
def test_bad_config_is_one_line_and_exit_2(tmp_path, text, said):
    cfg = tmp_path / "c"
    cfg.write_text(text)
    rc, out, err = sshpump("-F", str(cfg), "-L", "0:h:1", "h")
    assert rc == 2 and len(err.splitlines()) == 1, err
    assert err.startswith("sshpump: ssh config: ssh -G failed (exit 255): ") and said in err, err


@pytest.mark.parametrize("text,said", [
    ("Host *\n  IdentityFile /tmp/key-%Z\n", "ssh config: IdentityFile '/tmp/key-%Z': unknown %-token %Z"),
    ("Host *\n  IdentityFile /tmp/${SSHPUMP_TEST_UNSET}\n", "${SSHPUMP_TEST_UNSET} is not set"),
    ("Host *\n  ProxyCommand nc %h %Q\n", "unknown token %Q"),
    ("Host *\n  LocalForward /tmp/" + "%d" * 30 + ".sock h:1\n", "bytes long (at most 107)"),   # once expanded
])
def test_config_ssh_takes_but_sshpump_cannot_use_is_one_line(tmp_path, text, said):
    """ssh -G accepts these (it expands paths later, at connect time)."""
    cfg = tmp_path / "c"
    cfg.write_text(text)
    ssh_g("-F", str(cfg), "h")
    rc, out, err = sshpump("-F", str(cfg), "-L", "0:h:1", "h")
    assert rc == 2 and len(err.splitlines()) == 1 and said in err, err


def test_bad_f_path_is_one_line_and_exit_2(tmp_path):
    rc, out, err = sshpump("-F", str(tmp_path / "nonesuch"), "-L", "0:h:1", "h")
    assert rc == 2 and err == (f"sshpump: ssh config: ssh -G failed (exit 255): Can't open user config file "
                               f"{tmp_path}/nonesuch: No such file or directory\n"), err


def no_ssh_env(tmp_path):
    """PATH holding only python: no ssh binary to find."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    os.symlink(sys.executable, bin_dir / "python")
    return clean_env({"PATH": str(bin_dir)})


def test_without_ssh_one_warning_and_the_command_line_alone(tmp_path):
    env = no_ssh_env(tmp_path)
    rc, out, err = sshpump("-G", "-J", "me@jump:2222", "-o", "ProxyCommand=none", "-L", "0:h:1", "-p", "2200",
                           "u@host", env=env)
    assert rc == 0 and err == "sshpump: warning: ssh not found: ~/.ssh/config is not read; " \
                              "using the command line alone\n", err
    assert {"user u", "hostname host", "port 2200", "proxyjump me@jump:2222", "localforward 0 [h]:1"} \
        <= set(out.splitlines())
    rc, out, err = sshpump("-L", "0:h:1", "-p", "1", "nobody@127.0.0.1", env=env)
    lines = err.splitlines()
    assert rc == 3 and err.count("ssh not found") == 1 and "ssh not found" in lines[0], err
    assert lines[-1] == "sshpump: connect to 127.0.0.1 port 1: Connection refused", err   # it ran, and tried
    rc, out, err = sshpump("-F", str(tmp_path / "c"), "-L", "0:h:1", "h", env=env)
    assert rc == 2 and len(err.splitlines()) == 1 and "ssh is not installed" in err, err
    rc, out, err = sshpump("-G", "-F", "none", "-L", "0:h:1", "h", env=env)
    assert rc == 0 and err == "", err   # -F none asked for no file: nothing to warn of


def test_config_alias_carries_an_echo(sshd, targets, tmp_path):
    """End to end: everything but the alias comes from the config file."""
    echo_host, echo_port = targets.tcp["echo"]
    cfg = tmp_path / "c"
    cfg.write_text(
        "Host tunnel-alias\n"
        f"  HostName {sshd.host}\n"
        f"  Port {sshd.port}\n"
        f"  User {sshd.user}\n"
        f"  IdentityFile {sshd.client_key}\n"
        f"  UserKnownHostsFile {sshd.known_hosts}\n"
        "  ConnectTimeout 10\n"
        f"  LocalForward {tmp_path}/%n.sock {echo_host}:{echo_port}\n")
    with Pump(["-F", str(cfg), "--workers", "0", "tunnel-alias"], env=clean_env()) as p:
        assert p.listen == [f"{tmp_path}/tunnel-alias.sock"]
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(10)
            s.connect(p.listen[0])
            s.sendall(b"through the config")
            got = b""
            while len(got) < len(b"through the config"):
                chunk = s.recv(4096)
                assert chunk
                got += chunk
        assert got == b"through the config"
        assert p.stop() == 0


def test_config_proxyjump_carries_an_echo(sshd, targets, tmp_path):
    """A Host alias whose ProxyJump is another alias, both resolved from the
    config (the suite's sshd is its own jump host here; test_jump.py proves
    the path through separate servers)."""
    echo_host, echo_port = targets.tcp["echo"]
    cfg = tmp_path / "c"
    cfg.write_text(
        "Host jumpbox\n"
        f"  HostName {sshd.host}\n"
        f"  Port {sshd.port}\n"
        f"  User {sshd.user}\n"
        "Host behind\n"
        f"  HostName {sshd.host}\n"
        "  ProxyJump jumpbox\n"
        "Host *\n"
        f"  Port {sshd.port}\n"
        f"  User {sshd.user}\n"
        f"  IdentityFile {sshd.client_key}\n"
        f"  UserKnownHostsFile {sshd.known_hosts}\n"
        "  ConnectTimeout 10\n"
        f"  LocalForward {tmp_path}/echo.sock {echo_host}:{echo_port}\n")
    assert sshpump_g("-F", str(cfg), "behind")["proxyjump"] == [f"{sshd.user}@{sshd.host}:{sshd.port}"]
    with Pump(["-v", "-F", str(cfg), "--workers", "0", "behind"], env=clean_env()) as p:
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(10)
            s.connect(p.listen[0])
            s.sendall(b"via the jump host")
            got = b""
            while len(got) < len(b"via the jump host"):
                chunk = s.recv(4096)
                assert chunk
                got += chunk
        assert got == b"via the jump host"
        assert p.stop() == 0
        assert f"via jump host {sshd.user}@{sshd.host}:{sshd.port}" in p.stderr()
