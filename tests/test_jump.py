"""Jump hosts (ProxyJump) and ProxyCommand, through real OpenSSH servers.

The servers behind the jump live in a network namespace, listening on its
loopback, which this namespace cannot reach at all: the target sshd and the
echo/sink/source servers (127.0.0.1 there), and a middle sshd for two hops.
The jump sshd listens on the namespace's veth address (reachable from here)
with PermitOpen limited to the servers behind it and LogLevel DEBUG1, so its
log shows each direct-tcpip it opened: the path is proven from the servers'
logs, everything else is observed through structured status (stats()).
Every wait is bounded.
"""
from __future__ import annotations

import contextlib
import glob
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time

import pytest

import sshpump
from sshpump.errors import AuthError, ConnectError, HostKeyError, UsageError
from sshpump.hopspec import hop_options, parse_hop
from sshpump.options import Options
from testbed import netns
from testbed._util import wait_for
from testbed.client import (connect, download_and_verify, download_until_cut, echo_roundtrip,
                            upload_and_verify)
from testbed.data import pattern_bytes
from testbed.targets import Targets

from helpers import alive, extra_sshd, run_cli, base_args, clean_env

MiB = 1 << 20
FAST_KEEPALIVES = dict(server_alive_interval=1, server_alive_count_max=2)
DEBUG_LOG = {"LogLevel": "DEBUG1"}


@pytest.fixture
def nc():
    """OpenBSD netcat, the ProxyCommand of these tests."""
    import shutil
    if shutil.which("nc") is None:
        pytest.skip("nc not installed (Debian: netcat-openbsd)")


def _direct_tcpip_lines(server, port) -> list[str]:
    """The server's log lines for direct-tcpip channels it opened to 127.0.0.1:port."""
    pat = re.compile(rf"server_request_direct_tcpip: originator .* target 127\.0\.0\.1 port {port}\b")
    return [line for line in server.log().splitlines() if pat.search(line)]


class Behind:
    """The namespace and what runs in it (see the module docstring)."""

    def __init__(self, ns, targets, target, mid, jump, web_port):
        self.ns, self.targets, self.target, self.mid, self.jump = ns, targets, target, mid, jump
        self.web_port = web_port
        self.servers = [jump, mid, target]

    def jump_spec(self, jump=None) -> str:
        jump = jump or self.jump
        return f"{jump.user}@{jump.host}:{jump.port}"

    def mid_spec(self) -> str:
        return f"{self.mid.user}@127.0.0.1:{self.mid.port}"

    def kw(self, *hops, **extra) -> dict:
        """forward() arguments for the target through ``hops`` (default: the jump)."""
        servers = self.servers + [h for h in extra.pop("more_servers", [])]
        kw = dict(port=self.target.port, identity=[s.client_key for s in servers],
                  known_hosts=[s.known_hosts for s in servers], connect_timeout=10,
                  proxy_jump=list(hops) or [self.jump_spec()], verbose=1)
        kw.update(extra)
        return kw

    @property
    def dest(self) -> str:
        return f"{self.target.user}@127.0.0.1"

    def spec(self, kind="echo") -> str:
        host, port = self.targets.tcp[kind]
        return f"0:{host}:{port}"

    def jump_sshd(self, **kw):
        """Another jump sshd like the module's (for tests that stop it)."""
        return extra_sshd(self.jump, netns=self.ns.name, host=self.ns.addr, extra_config=DEBUG_LOG,
                          permit_open=[f"127.0.0.1:{self.target.port}"], **kw)


_WEB = ("import functools, http.server, os, sys\n"
        "os.chdir(sys.argv[1])\n"
        "srv = http.server.ThreadingHTTPServer(('127.0.0.1', 0), http.server.SimpleHTTPRequestHandler)\n"
        "print(srv.server_address[1], flush=True)\n"
        "srv.serve_forever()\n")


@contextlib.contextmanager
def _web_server(ns):
    """An HTTP server on the namespace's loopback serving one file, hello.txt."""
    root = tempfile.mkdtemp(prefix="sshpump-web-")
    os.chmod(root, 0o755)
    with open(os.path.join(root, "hello.txt"), "w") as f:
        f.write("hello from behind the jump\n")
    proc = subprocess.Popen(ns.exec_argv([sys.executable, "-c", _WEB, root]), stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        line = proc.stdout.readline()
        assert line.strip().isdigit(), f"web server did not start: {line!r}"
        yield int(line)
    finally:
        proc.kill()
        proc.wait(10)
        import shutil
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def behind(sshd):
    ok, why = netns.available()
    if not ok:
        pytest.skip(why)
    with netns.Netns(index=10) as ns, Targets(netns=ns.name, host="127.0.0.1") as targets, \
            extra_sshd(sshd, netns=ns.name, host="127.0.0.1") as target, \
            extra_sshd(sshd, netns=ns.name, host="127.0.0.1", extra_config=DEBUG_LOG,
                       permit_open=f"127.0.0.1:{target.port}") as mid:
        permit = [f"127.0.0.1:{target.port}", f"127.0.0.1:{mid.port}"]
        with extra_sshd(sshd, netns=ns.name, host=ns.addr, extra_config=DEBUG_LOG, permit_open=permit) as jump, \
                _web_server(ns) as web_port:
            yield Behind(ns, targets, target, mid, jump, web_port)


def _workers_up(t, n=None):
    ws = t.stats()["workers"]
    return len(ws) == (n or len(ws)) and ws and all(w["up"] for w in ws)


def _exercise(addr, seed):
    """Checksummed traffic both ways: echo, upload to a sink, download."""
    with connect(addr, 20) as s:
        echo_roundtrip(s, pattern_bytes(seed, 3 * MiB), half_close=True)


# ---- hop specs ------------------------------------------------------------

def test_hop_specs():
    assert parse_hop("jump") == parse_hop("jump")
    h = parse_hop("me@bastion.example:2222")
    assert (h.user, h.host, h.port) == ("me", "bastion.example", 2222)
    h = parse_hop("ssh://me@[::1]:22")
    assert (h.user, h.host, h.port) == ("me", "::1", 22)
    h = parse_hop("fe80::1")
    assert (h.user, h.host, h.port) == (None, "fe80::1", None)
    for bad in ("", "me@", "@host", "host:0", "host:99999", "[::1", "-oProxyCommand=x"):
        with pytest.raises(UsageError):
            parse_hop(bad)
    base = Options(host="db", user="alice", port=2200, identities=["/k"], known_hosts=["/kh"],
                   proxy_jump=["a", "b"], strict_host_key_checking="accept-new")
    o = hop_options(base, "bob@a:2022")
    assert (o.host, o.port, o.user, o.proxy_jump, o.proxy_command) == ("a", 2022, "bob", [], None)
    assert (o.identities, o.known_hosts, o.strict_host_key_checking) == (["/k"], ["/kh"], "accept-new")
    o = hop_options(base, "a")
    assert (o.port, o.user) == (22, Options(host="x").user)   # as ssh: the local user, not the destination's
    assert base.proxy_jump == ["a", "b"] and base.host == "db"


# ---- ProxyCommand ----------------------------------------------------------

def test_proxycommand_nc_carries_echo(sshd, targets, caplog, nc):
    """nc %h %p as the ProxyCommand; its stderr goes to the log."""
    echo = targets.tcp["echo"]
    cmd = "sh -c 'echo proxy-says-hello >&2; exec nc %h %p'"
    with caplog.at_level("WARNING", logger="sshpump"), \
            sshpump.forward(f"{sshd.user}@{sshd.host}", f"0:{echo[0]}:{echo[1]}", port=sshd.port,
                            identity=sshd.client_key, known_hosts=sshd.known_hosts, proxy_command=cmd,
                            connect_timeout=10) as t:
        assert _workers_up(t, 1)
        for i in range(2):
            _exercise(t.local_address, f"pc{i}")
        wait_for(lambda: "ProxyCommand: proxy-says-hello" in caplog.text, 5, what="stderr line logged")
        assert t.stats()["workers"][0]["pump"]["conns"] == 0


def _nc_children(cmd_marker) -> list[int]:
    """Our own children running nc (the in-process worker's ProxyCommand)."""
    me = os.getpid()
    out = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                st = f.read()
            with open(f"/proc/{d}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        rest = st[st.rfind(")") + 2:].split()
        if int(rest[1]) == me and argv and argv[0] == b"nc" and cmd_marker.encode() in argv:
            out.append(int(d))
    return out


def test_proxycommand_death_reconnects_with_a_fresh_command(sshd, targets, nc):
    echo = targets.tcp["echo"]
    with sshpump.forward(f"{sshd.user}@{sshd.host}", f"0:{echo[0]}:{echo[1]}", port=sshd.port,
                         identity=sshd.client_key, known_hosts=sshd.known_hosts, proxy_command="nc %h %p",
                         connect_timeout=10, reconnect_max=1, **FAST_KEEPALIVES) as t:
        first = _nc_children(str(sshd.port))
        assert len(first) == 1, first
        _exercise(t.local_address, "before")
        os.kill(first[0], signal.SIGKILL)
        wait_for(lambda: not _workers_up(t), 5, what="the session seen dead")
        wait_for(lambda: _workers_up(t), 15, what="the session back up")
        second = _nc_children(str(sshd.port))
        assert len(second) == 1 and second != first
        assert not alive(first[0]) and not os.path.exists(f"/proc/{first[0]}"), "the dead command was not reaped"
        _exercise(t.local_address, "after")
    # shutdown ends and reaps the command
    wait_for(lambda: not os.path.exists(f"/proc/{second[0]}"), 5, what="the command ended at close")


def test_proxycommand_that_exits_at_once_fails_the_start(sshd, targets):
    echo = targets.tcp["echo"]
    t0 = time.monotonic()
    with pytest.raises(ConnectError) as ei:
        sshpump.forward(f"{sshd.user}@{sshd.host}", f"0:{echo[0]}:{echo[1]}", port=sshd.port,
                        identity=sshd.client_key, known_hosts=sshd.known_hosts, proxy_command="false",
                        connect_timeout=10)
    assert time.monotonic() - t0 < 8
    assert ei.value.exit_code == 3
    assert str(ei.value) == "ProxyCommand 'false' exited with code 1"
    assert not [p for p in _nc_children("") if p]


def test_proxycommand_that_never_answers_is_bounded_and_ended(sshd, targets):
    """A command that says nothing: the handshake gives up at ConnectTimeout,
    and the command is ended, not left behind."""
    echo = targets.tcp["echo"]
    seconds = str(60 + os.getpid() % 997)   # tells our sleep from any other
    t0 = time.monotonic()
    with pytest.raises(ConnectError) as ei:
        sshpump.forward(f"{sshd.user}@{sshd.host}", f"0:{echo[0]}:{echo[1]}", port=sshd.port,
                        identity=sshd.client_key, known_hosts=sshd.known_hosts,
                        proxy_command=f"sleep {seconds}", connect_timeout=2)
    assert 1.5 < time.monotonic() - t0 < 8, time.monotonic() - t0
    assert ei.value.exit_code == 3 and "handshake" in str(ei.value)
    wait_for(lambda: not [k for k in _children_named(os.getpid(), b"sleep") if _argv(k)[1:2] == [seconds.encode()]],
             5, what="the silent command ended")


def test_proxyjump_and_proxycommand_are_exclusive(sshd, targets):
    echo = targets.tcp["echo"]
    with pytest.raises(UsageError, match="cannot both be set"):
        sshpump.forward(f"{sshd.user}@{sshd.host}", f"0:{echo[0]}:{echo[1]}", port=sshd.port,
                        identity=sshd.client_key, known_hosts=sshd.known_hosts, proxy_command="nc %h %p",
                        proxy_jump=[f"127.0.0.1:{sshd.port}"])


def test_proxycommand_unknown_token_is_an_error(sshd, targets):
    echo = targets.tcp["echo"]
    with pytest.raises(UsageError, match="unknown token %x"):
        sshpump.forward(f"{sshd.user}@{sshd.host}", f"0:{echo[0]}:{echo[1]}", port=sshd.port,
                        identity=sshd.client_key, known_hosts=sshd.known_hosts, proxy_command="nc %x %p")


# ---- ProxyJump -------------------------------------------------------------

@pytest.mark.parametrize("workers", [0, 2], ids=["w0", "w2"])
def test_one_jump_carries_traffic_both_ways(behind, workers):
    before = len(_direct_tcpip_lines(behind.jump, behind.target.port))
    with sshpump.forward(behind.dest, behind.spec("echo"), behind.spec("sink"), behind.spec("source"),
                         workers=workers, **behind.kw()) as t:
        wait_for(lambda: _workers_up(t, max(1, workers)), 15, what="workers up")
        echo, sink, source = (f.address for f in t.forwards)
        _exercise(echo, f"jump-w{workers}")
        with connect(sink, 20) as s:
            upload_and_verify(s, 4 * MiB, "up-through-jump")
        with connect(source, 20) as s:
            download_and_verify(s, 4 * MiB, "down-through-jump")
        if workers:
            # each worker built its own chain: one TCP connection each to the jump
            assert _established_to(behind.jump) == workers
    # the path: the jump opened a direct-tcpip to the target once per chain
    assert len(_direct_tcpip_lines(behind.jump, behind.target.port)) - before == max(1, workers)


def _established_to(server) -> int:
    r = subprocess.run(["ss", "-Htn", "state", "established", f"( dport = :{server.port} )", "dst", server.host],
                       capture_output=True, text=True, timeout=10, check=True)
    return len([line for line in r.stdout.splitlines() if line.strip()])


def test_two_jumps(behind):
    jump_before = len(_direct_tcpip_lines(behind.jump, behind.mid.port))
    mid_before = len(_direct_tcpip_lines(behind.mid, behind.target.port))
    with sshpump.forward(behind.dest, behind.spec("echo"),
                         **behind.kw(behind.jump_spec(), behind.mid_spec())) as t:
        assert _workers_up(t, 1)
        _exercise(t.local_address, "two-hops")
    assert len(_direct_tcpip_lines(behind.jump, behind.mid.port)) - jump_before == 1
    assert len(_direct_tcpip_lines(behind.mid, behind.target.port)) - mid_before == 1


def test_socks_through_a_jump(behind):
    with sshpump.forward(behind.dest, dynamic=["0"], **behind.kw()) as t:
        host, port = t.local_address
        # "localhost" is resolved by the target sshd, in the namespace
        r = subprocess.run(["curl", "-sS", "--max-time", "20", "--socks5-hostname", f"{host}:{port}",
                            f"http://localhost:{behind.web_port}/hello.txt"],
                           capture_output=True, text=True, timeout=30)
        assert r.returncode == 0, r.stderr
        assert r.stdout == "hello from behind the jump\n"


_ECHO_FROM_INSIDE = ("import socket, sys\n"
                     "s = socket.create_connection(('127.0.0.1', int(sys.argv[1])), timeout=20)\n"
                     "data = bytes(range(256)) * 4096\n"
                     "s.sendall(data); s.shutdown(socket.SHUT_WR)\n"
                     "got = b''\n"
                     "while True:\n"
                     "    b = s.recv(65536)\n"
                     "    if not b: break\n"
                     "    got += b\n"
                     "print('ok' if got == data else f'mismatch {len(got)}')\n")


def test_remote_forward_through_a_jump(behind, targets):
    """-R through a jump: the target sshd (in the namespace) listens, and a
    client beside it reaches an echo server on this side."""
    echo = targets.tcp["echo"]
    with sshpump.forward(behind.dest, remote=[f"0:{echo[0]}:{echo[1]}"], **behind.kw()) as t:
        (port,) = t.remote_ports
        r = subprocess.run(behind.ns.exec_argv([sys.executable, "-c", _ECHO_FROM_INSIDE, str(port)]),
                           capture_output=True, text=True, timeout=60)
        assert r.stdout.strip() == "ok", (r.stdout, r.stderr)


def test_jump_restart_cuts_then_serves_again(behind):
    with behind.jump_sshd() as jump:
        kw = behind.kw(behind.jump_spec(jump), more_servers=[jump], reconnect_max=1, **FAST_KEEPALIVES)
        with sshpump.forward(behind.dest, behind.spec("source"), behind.spec("echo"), **kw) as t:
            source, echo = (f.address for f in t.forwards)
            _exercise(echo, "before-restart")
            results = []

            def download():
                with connect(source, 30) as s:
                    results.append(download_until_cut(s, 2048 * MiB, "cut-by-restart", rate=20e6, limit_s=30))

            th = threading.Thread(target=download, daemon=True)
            th.start()
            time.sleep(0.5)
            jump.stop()                     # and every session through it
            th.join(35)
            assert results, "the download did not end"
            how, got = results[0]
            assert how == "reset" and 0 < got < 2048 * MiB, results
            wait_for(lambda: not _workers_up(t), 10, what="the session seen dead")
            jump.restart()                  # same port, same keys
            wait_for(lambda: _workers_up(t), 20, what="the chain rebuilt")
            _exercise(echo, "after-restart")
            assert len(_direct_tcpip_lines(jump, behind.target.port)) >= 1   # this run of the jump carried it


def test_target_restart_rebuilds_the_chain(behind):
    """The server behind the jump goes away: its session ends inside the
    jump's channel; the whole chain is rebuilt and serves again."""
    before = len(_direct_tcpip_lines(behind.jump, behind.target.port))
    with sshpump.forward(behind.dest, behind.spec("echo"), reconnect_max=1, **behind.kw()) as t:
        _exercise(t.local_address, "before-target-restart")
        behind.target.restart()
        wait_for(lambda: not _workers_up(t), 10, what="the session seen dead")
        wait_for(lambda: _workers_up(t), 20, what="the chain rebuilt")
        _exercise(t.local_address, "after-target-restart")
    assert len(_direct_tcpip_lines(behind.jump, behind.target.port)) - before == 2


def test_dead_hop_keepalives(behind, caplog):
    """A jump host that stops answering (SIGSTOP) is found dead by its own
    keepalives (the reason names it), and the chain is rebuilt when it
    answers again."""
    caplog.set_level("WARNING", logger="sshpump")
    with behind.jump_sshd() as jump:
        kw = behind.kw(behind.jump_spec(jump), more_servers=[jump], reconnect_max=1, **FAST_KEEPALIVES)
        with sshpump.forward(behind.dest, behind.spec("echo"), **kw) as t:
            _exercise(t.local_address, "before-stop")
            pids = [p for p in _sshd_session_pids(jump)]
            assert pids
            for p in pids:
                os.kill(p, signal.SIGSTOP)
            try:
                wait_for(lambda: not _workers_up(t), 10, what="the hung hop seen dead")
            finally:
                for p in pids:
                    os.kill(p, signal.SIGCONT)
            wait_for(lambda: _workers_up(t), 20, what="the chain rebuilt")
            _exercise(t.local_address, "after-stop")
    lost = [r.getMessage() for r in caplog.records if "SSH session lost" in r.getMessage()]
    assert lost and f"jump host {jump.host} port {jump.port}: server not responding" in lost[0], lost


def _sshd_session_pids(server) -> list[int]:
    from sshpump.demo.sshd import descendants
    return descendants(server.proc.pid)


# ---- errors name the hop ---------------------------------------------------

def test_hop_errors_name_the_hop(behind, sshd, tmp_path):
    jump = behind.jump
    name = f"jump host {jump.host} port {jump.port}"
    base = behind.kw()
    # authentication: the jump accepts none of the keys offered
    kw = dict(base, identity=[behind.target.client_key])
    with pytest.raises(AuthError) as ei:
        sshpump.forward(behind.dest, behind.spec(), **kw)
    assert str(ei.value).startswith(f"{name}: authentication failed for") and ei.value.exit_code == 5
    # host key: the jump's is not in known_hosts
    kw = dict(base, known_hosts=[behind.target.known_hosts])
    with pytest.raises(HostKeyError) as ei:
        sshpump.forward(behind.dest, behind.spec(), **kw)
    assert str(ei.value).startswith(f"{name}: host key for [{jump.host}]:{jump.port} is unknown")
    assert ei.value.exit_code == 4
    # a channel the jump refuses (PermitOpen)
    kw = dict(base, port=behind.targets.tcp["echo"][1])
    with pytest.raises(ConnectError) as ei:
        sshpump.forward(behind.dest, behind.spec(), **kw)
    assert str(ei.value) == (f"{name}: channel to 127.0.0.1 port {kw['port']} failed: "
                             "administratively prohibited")
    assert ei.value.exit_code == 3
    # nothing listens where the jump is said to be
    closed = _closed_port()
    kw = dict(base, proxy_jump=[f"127.0.0.1:{closed}"])
    with pytest.raises(ConnectError) as ei:
        sshpump.forward(behind.dest, behind.spec(), **kw)
    assert str(ei.value).startswith(f"jump host 127.0.0.1 port {closed}: connect to 127.0.0.1 port {closed}")
    assert ei.value.exit_code == 3
    # the second hop fails: named as the second hop
    kw = dict(base, proxy_jump=[behind.jump_spec(), f"{behind.mid.user}@127.0.0.1:{behind.target.port}"],
              identity=[jump.client_key, behind.mid.client_key])
    with pytest.raises(AuthError) as ei:
        sshpump.forward(behind.dest, behind.spec(), **kw)
    assert str(ei.value).startswith(f"jump host 127.0.0.1 port {behind.target.port}: authentication failed")


def _closed_port() -> int:
    import socket
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


# ---- the command line: -J and -o ProxyCommand ------------------------------

def _cli_args(behind, keys_of=None):
    """-p, -i (the keys of ``keys_of``, default every server) and -o options."""
    args = ["-p", str(behind.target.port)]
    for s in keys_of or behind.servers:
        args += ["-i", s.client_key]
    args += ["-o", "UserKnownHostsFile=" + " ".join(s.known_hosts for s in behind.servers),
             "-o", "StrictHostKeyChecking=yes", "-o", "ConnectTimeout=10"]
    return args


def test_cli_jump_with_two_workers(behind):
    from helpers import Pump
    argv = ["-v", "--workers", "2", *_cli_args(behind), "-J", behind.jump_spec(),
            "-L", behind.spec("echo"), behind.dest]
    with Pump(argv, env=clean_env()) as p:
        wait_for(lambda: all(w["up"] for w in p.stats()["tunnels"]["default"]["workers"]), 15,
                 what="both workers up")
        assert len(p.stats()["tunnels"]["default"]["workers"]) == 2
        _exercise(p.address, "cli-jump")
        assert _established_to(behind.jump) == 2
        assert p.stop() == 0


def test_cli_jump_auth_failure_names_the_hop(behind):
    jump = behind.jump
    argv = [*_cli_args(behind, keys_of=[behind.target]), "-J", behind.jump_spec(), "-L", behind.spec(),
            behind.dest]
    rc, err = run_cli(argv)
    assert rc == 5, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        f"sshpump: jump host {jump.host} port {jump.port}: authentication failed"), err


def test_cli_proxycommand_nc(pump, sshd, targets, nc):
    echo = targets.tcp["echo"]
    p = pump(f"0:{echo[0]}:{echo[1]}", workers=1, extra=["-o", "ProxyCommand=nc %h %p"])
    _exercise(p.address, "cli-proxycommand")
    assert [w["up"] for w in p.stats()["tunnels"]["default"]["workers"]] == [True]


def test_cli_proxycommand_that_exits_at_once(sshd, targets):
    echo = targets.tcp["echo"]
    args, dest = base_args(sshd)
    for workers in ("0", "1"):
        rc, err = run_cli([*args, "--workers", workers, "-o", "ProxyCommand=false",
                           "-L", f"0:{echo[0]}:{echo[1]}", dest])
        assert rc == 3, err
        assert err.strip().splitlines() == ["sshpump: ProxyCommand 'false' exited with code 1"], err


def _argv(pid) -> list[bytes]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().split(b"\0")
    except OSError:
        return []


def _children_named(pid, name: bytes) -> list[int]:
    from testbed._util import children_of
    out = []
    for k in children_of(pid):
        try:
            with open(f"/proc/{k}/cmdline", "rb") as f:
                if f.read().split(b"\0")[0] == name:
                    out.append(k)
        except OSError:
            pass
    return out


def test_cli_rebuilt_chain_and_fresh_command_leak_no_fd(behind, pump, sshd, targets, nc):
    """After a jump restart (chain rebuilt) and a killed ProxyCommand (a new
    one started), every process has no more fds than at the start."""
    from helpers import Pump
    with behind.jump_sshd() as jump:
        servers = [*behind.servers, jump]
        argv = ["-v", "--workers", "1", "-p", str(behind.target.port),
                *[a for s in servers for a in ("-i", s.client_key)],
                "-o", "UserKnownHostsFile=" + " ".join(s.known_hosts for s in servers),
                "-o", "ConnectTimeout=10", "-o", "ServerAliveInterval=1", "-o", "ServerAliveCountMax=2",
                "-J", behind.jump_spec(jump), "-L", behind.spec("echo"), behind.dest]
        with Pump(argv, env=clean_env()) as p:
            p.baseline()
            _exercise(p.address, "before")
            up = lambda: all(w["up"] for w in p.stats()["tunnels"]["default"]["workers"])  # noqa: E731
            jump.restart()
            wait_for(lambda: not up(), 10, what="the chain seen dead")
            wait_for(up, 20, what="the chain rebuilt")
            _exercise(p.address, "after")
            p.assert_idle()
    echo = targets.tcp["echo"]
    p = pump(f"0:{echo[0]}:{echo[1]}", workers=1, extra=["-o", "ProxyCommand=nc %h %p",
                                                         "-o", "ServerAliveInterval=1"])
    worker = p.workers()[0]
    first = _children_named(worker, b"nc")
    assert len(first) == 1
    os.kill(first[0], signal.SIGKILL)
    up = lambda: all(w["up"] for w in p.stats()["tunnels"]["default"]["workers"])  # noqa: E731
    wait_for(lambda: _children_named(worker, b"nc") not in ([], first) and up(), 20, what="a fresh command")
    assert not os.path.exists(f"/proc/{first[0]}"), "the killed command was not reaped"
    _exercise(p.address, "after")
    # the pump fixture's teardown checks idle and fds against the baseline


@pytest.mark.slow
def test_bench_jump_smoke(tmp_path, sshd):
    """python -m bench.jump end to end, tiny: every contender measured on
    every workload (no timing is judged)."""
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run([sys.executable, "-m", "bench.jump", "--bulk-mib", "2", "--pg-seconds", "1",
                        "--out", str(tmp_path)], cwd=repo, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    files = glob.glob(str(tmp_path / "*-jump.json"))
    assert len(files) == 1 and glob.glob(str(tmp_path / "*-jump.md"))
    with open(files[0]) as f:
        res = json.load(f)["results"]
    assert set(res) == {"ssh -J", "sshpump w0", "sshpump w2"}
    for name, row in res.items():
        assert set(row) == {"up", "down", "pgbench_C_c16"}, name
        assert all(cell["value"] > 0 for cell in row.values()), (name, row)


def test_cli_proxycommand_dies_with_a_killed_worker(pump, sshd, targets, nc):
    """A worker killed outright (SIGKILL, as the OOM killer does) takes its
    ProxyCommand with it (parent death signal); its replacement starts its
    own. The command here outlives its stream (a shell that sleeps after
    nc), so only that signal can end it."""
    echo = targets.tcp["echo"]
    command = "sh -c 'nc %h %p; exec sleep 300'"
    p = pump(f"0:{echo[0]}:{echo[1]}", workers=1, extra=["-o", f"ProxyCommand={command}"])
    p.check_idle = False    # the worker is replaced: its fds are not comparable
    worker = p.workers()[0]
    first = _children_named(worker, b"sh")
    assert len(first) == 1
    os.kill(worker, signal.SIGKILL)
    wait_for(lambda: not alive(first[0]), 10, what="the killed worker's ProxyCommand gone")
    wait_for(lambda: p.workers() and p.workers()[0] != worker
             and len(_children_named(p.workers()[0], b"sh")) == 1
             and all(w["up"] for w in p.stats()["tunnels"]["default"]["workers"]), 20,
             what="a new worker with its own ProxyCommand")
    _exercise(p.address, "after-kill")
