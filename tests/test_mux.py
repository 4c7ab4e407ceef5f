"""--mux end to end: what only the multiplexed plane has -- its agent on the
server (started, checked, restarted, never orphaned), a server without
python3, and sshd's forwarding policy not applying. The scenarios both
planes share are in test_forward.py and test_prefork.py (PLANES)."""
from __future__ import annotations

import os
import signal
import socket
import time

import pytest

from sshpump.mux import agent as mux_agent
from sshpump.mux.lane import AGENT_NAME
from testbed._util import children_of, wait_for
from testbed.client import echo_roundtrip

from helpers import connect, extra_sshd, run_cli, base_args, start_pump, tcp_spec


def agents_of(sshd) -> list[int]:
    """Pids of mux agents the test sshd runs (any of its sessions)."""
    out = []
    for pid in children_of(sshd.proc.pid):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if AGENT_NAME.encode() in f.read():
                    out.append(pid)
        except OSError:
            pass
    return out


def test_window_constants_agree():
    from sshpump._pump import lib
    assert lib.PUMP_MUX_WINDOW == mux_agent.INITIAL_WINDOW


@pytest.fixture(scope="module")
def sshd_no_python(sshd):
    """A server where the account's commands find no python3."""
    with extra_sshd(sshd, extra_config={"SetEnv": "PATH=/nonexistent"}) as s:
        yield s


@pytest.mark.parametrize("workers", [0, 2], ids=["w0", "w2"])
def test_no_python3_is_one_line_and_no_start(sshd_no_python, targets, workers):
    args, dest = base_args(sshd_no_python)
    rc, err = run_cli(["--mux", "--workers", str(workers), *args, "-L", tcp_spec(targets.tcp["echo"]), dest])
    assert rc == 3, err
    lines = [ln for ln in err.splitlines() if "python3" in ln]
    assert lines and all("the server has no python3 for --mux" in ln for ln in lines), err
    assert len(err.strip().splitlines()) == 1, err


def test_agent_killed_is_restarted_on_the_same_session(pump, sshd, targets):
    p = pump(tcp_spec(targets.tcp["echo"]), workers=0, extra=["--mux"])
    held = connect(p.address, 10)
    echo_roundtrip(held, b"before")
    wait_for(lambda: len(agents_of(sshd)) == 1, 10, what="one agent on the server")
    victim = agents_of(sshd)[0]
    os.kill(victim, signal.SIGKILL)
    err = p.wait_log("mux agent ended", timeout=10)
    assert "streams were cut" in err
    held.settimeout(10)
    try:   # the held client is cut: reset (or EOF once the reset is read)
        assert held.recv(10) == b""
    except ConnectionResetError:
        pass
    held.close()
    p.wait_log("mux agent started", count=2, timeout=15)
    assert "session lost" not in p.stderr()   # the same session
    for i in range(5):
        with connect(p.address, 10) as s:
            echo_roundtrip(s, b"after restart %d" % i, half_close=True)
    assert victim not in agents_of(sshd)


def test_no_orphan_agent_after_worker_kill_or_stop(pump, sshd, targets):
    before = set(agents_of(sshd))
    p = pump(tcp_spec(targets.tcp["echo"]), workers=2, extra=["--mux"])
    wait_for(lambda: len(set(agents_of(sshd)) - before) == 2, 10, what="an agent per worker")
    ours = set(agents_of(sshd)) - before
    with connect(p.address, 10) as s:
        echo_roundtrip(s, b"x" * 1000, half_close=True)
    victim = p.workers()[0]
    os.kill(victim, signal.SIGKILL)
    p.wait_log(f"(pid {victim}) killed by SIGKILL", timeout=10)
    # the killed worker's session closes, and with it its agent's stdin
    wait_for(lambda: len(ours & set(agents_of(sshd))) == 1, 10, what="the killed worker's agent to exit")
    wait_for(lambda: len(set(agents_of(sshd)) - before) == 2, 15, what="the new worker's agent")
    assert p.stop() == 0
    wait_for(lambda: not (set(agents_of(sshd)) - before), 10, what="every agent to exit after stop")


@pytest.fixture(scope="module")
def sshd_permit_one(sshd):
    with extra_sshd(sshd, permit_open="127.0.0.1:1") as s:
        yield s


def test_mux_bypasses_permit_open(sshd_permit_one, targets):
    """What the README says: PermitOpen (and AllowTcpForwarding) do not
    apply to --mux, which opens no forwarding channel."""
    with start_pump(sshd_permit_one, tcp_spec(targets.tcp["echo"]), workers=0, extra=["--mux"]) as p:
        with connect(p.address, 10) as s:
            echo_roundtrip(s, b"through the agent", half_close=True)
        assert "administratively prohibited" not in p.stderr()


def test_many_streams_held_while_one_works(pump, targets):
    """1,000 idle streams on one lane; a working one keeps its round trip."""
    p = pump(tcp_spec(targets.tcp["echo"]), workers=0, verbose=0, extra=["--mux"])
    held = []
    try:
        for i in range(1000):
            held.append(connect(p.address, 10))
        echo_roundtrip(held[-1], b"ping")
        wait_for(lambda: p.stats()["tunnels"]["default"]["connections"] == 1000, 20,
                 what="every stream carried")
        t0 = time.monotonic()
        with connect(p.address, 10) as s:
            for _ in range(50):
                echo_roundtrip(s, b"rt")
        assert time.monotonic() - t0 < 5
    finally:
        for s in held:
            s.close()


def test_client_reset_reaches_the_target(pump, targets):
    """A client that resets mid-transfer costs the stream only; the lane
    and other streams go on, and nothing stays buffered."""
    p = pump(tcp_spec(targets.tcp["source"]), tcp_spec(targets.tcp["echo"]), workers=0, extra=["--mux"])
    for _ in range(5):
        s = connect(p.listen[0], 10)
        s.sendall(b"%d reset\n" % (64 << 20))
        s.recv(65536)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        s.close()
    with connect(p.listen[1], 10) as s:
        echo_roundtrip(s, b"still serving", half_close=True)


def test_mux_is_asked_for_per_tunnel_flag_file_and_library(tmp_path):
    """--mux, `mux = true` per tunnel in the TOML file, mux=True in the library."""
    from sshpump import cli, sshopts, tunnelfile
    opts, _ns, _batch = cli.parse_command_line(["--mux", "-L", "0:127.0.0.1:5432", "u@h"])
    assert opts.mux
    opts, _ns, _batch = cli.parse_command_line(["-L", "0:127.0.0.1:5432", "u@h"])
    assert not opts.mux
    f = tmp_path / "t.toml"
    f.write_text('[tunnels.a]\ndestination = "u@h"\nforwards = ["0:127.0.0.1:5432"]\nmux = true\n'
                 '[tunnels.b]\ndestination = "u@h"\nforwards = ["0:127.0.0.1:5433"]\n')
    cfg = tunnelfile.load(str(f))
    assert cfg.tunnels["a"].opts.mux and not cfg.tunnels["b"].opts.mux
    assert sshopts.build_options("u@h", ["0:127.0.0.1:5432"], mux=True).mux
