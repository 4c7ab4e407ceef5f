"""Self-tests of the test bed, using only OpenSSH / asyncssh / paramiko and
direct connections (no sshpump code)."""
from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import subprocess
import time

import pytest

from testbed._util import free_port, wait_for, wait_listening
from testbed.client import (connect, download_and_verify, echo_roundtrip, recv_until_eof,
                            upload_and_verify)
from testbed.data import pattern_bytes, pattern_chunks, pattern_digest


# ---------------------------------------------------------------- helpers
@contextlib.contextmanager
def ssh_forward(sshd, spec, **kw):
    """Run ``ssh -N -L <spec>`` (spec = "LPORT:HOST:PORT" or "LPORT:/path")."""
    lport = int(spec.split(":", 1)[0])
    cmd = sshd.ssh_command("-N", "-L", spec, options=["-o", "ExitOnForwardFailure=yes"], **kw)
    p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        try:
            wait_listening("127.0.0.1", lport, 15, proc=p)
        except RuntimeError:
            raise RuntimeError(f"ssh -L failed: {p.stderr.read()}")
        yield ("127.0.0.1", lport)
    finally:
        p.terminate()
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:  # ssh lingers on a channel the test left open
            p.kill()
            p.wait()


def run_ssh(cmd, **kw):
    return subprocess.run(cmd, capture_output=True, text=True, timeout=30,
                          stdin=subprocess.DEVNULL, **kw)


# ---------------------------------------------------------------- data
def test_pattern_definition():
    import hashlib
    data = pattern_bytes("s", (1 << 20) + 7)
    assert data[: 1 << 20] == hashlib.shake_128(b"s:0").digest(1 << 20)
    assert data[1 << 20:] == hashlib.shake_128(b"s:1").digest(7)
    assert pattern_digest("s", (1 << 20) + 7) == hashlib.sha256(data).hexdigest()
    assert b"".join(pattern_chunks("s", 100, chunk=10)) != data[:100]  # chunking matters
    assert pattern_bytes("s", 0) == b""


@pytest.mark.slow
def test_pattern_stream_is_complete():
    # Its speed is printed, not asserted (timings belong in bench/): a loaded
    # machine halves it.
    n = 256 << 20
    t = time.perf_counter()
    total = sum(len(c) for c in pattern_chunks("speed", n))
    rate = n / (time.perf_counter() - t) / 1e6
    print(f"pattern generation: {rate:.0f} MB/s")
    assert total == n


# ---------------------------------------------------------------- targets
@pytest.mark.parametrize("kind", ["tcp", "unix"])
def test_targets_direct(targets, kind):
    addrs = getattr(targets, kind)
    with connect(addrs["echo"]) as s:
        echo_roundtrip(s, b"hello world")
        echo_roundtrip(s, pattern_bytes("e", 3 << 20), half_close=True)
    with connect(addrs["sink"]) as s:
        assert upload_and_verify(s, (5 << 20) + 3, "up") == (5 << 20) + 3
    with connect(addrs["sink"]) as s:
        s.shutdown(socket.SHUT_WR)
        assert recv_until_eof(s) == f"0 {pattern_digest('x', 0)}\n".encode()
    with connect(addrs["source"]) as s:
        assert download_and_verify(s, (5 << 20) + 3, "down") == (5 << 20) + 3
    with pytest.raises(ConnectionRefusedError):
        connect(addrs["refuse"])


def test_targets_verification_detects_errors(targets):
    with connect(targets.tcp["sink"]) as s:
        s.sendall(b"garbage")
        with pytest.raises(AssertionError):
            upload_and_verify(s, 10, "x")
    with connect(targets.tcp["source"]) as s:
        s.sendall(b"10 other\n")
        with pytest.raises(AssertionError):
            download_and_verify(s, 10, "x")  # requested line goes after ours; wrong data


def test_targets_stats(targets):
    before = targets.stats()["echo"]["accepted"]
    with connect(targets.tcp["echo"]) as s:
        echo_roundtrip(s, b"x", half_close=True)
    wait_for(lambda: targets.stats()["echo"]["active"] == 0, 5, what="echo conn closed")
    assert targets.stats()["echo"]["accepted"] == before + 1


@pytest.mark.slow
def test_targets_bulk_speed(targets):
    n = 1 << 30
    payload = bytes(n)
    with connect(targets.tcp["echo"]) as s:
        t = time.perf_counter()
        echo_roundtrip(s, payload, half_close=True)
        rate = n / (time.perf_counter() - t) / 1e9
    print(f"echo 1 GiB: {rate:.2f} GB/s")   # printed, not asserted: timings belong in bench/


# ---------------------------------------------------------------- sshd
def test_sshd_pubkey_auth(sshd):
    r = run_ssh(sshd.ssh_command("id -un"))
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == sshd.user == "sshpump-test"


def test_sshd_ipv6_and_localhost(sshd):
    for host in ["localhost"] + (["::1"] if sshd.ipv6 else []):
        r = run_ssh(sshd.ssh_command("true", host=host))
        assert r.returncode == 0, (host, r.stderr)


def test_sshd_wrong_known_hosts_rejected(sshd):
    r = run_ssh(sshd.ssh_command("true", known_hosts=sshd.wrong_known_hosts))
    assert r.returncode == 255
    assert "REMOTE HOST IDENTIFICATION HAS CHANGED" in r.stderr


def test_sshd_encrypted_key_needs_passphrase(sshd):
    r = run_ssh(sshd.ssh_command("true", key=sshd.client_key_encrypted))
    assert r.returncode == 255  # BatchMode: cannot ask for the passphrase


@pytest.mark.skipif(not shutil.which("sshpass"), reason="sshpass not installed")
def test_sshd_password_auth_sshpass(sshd):
    cmd = sshd.ssh_command("true", options=["-o", "PreferredAuthentications=password",
                                            "-o", "PubkeyAuthentication=no"])
    cmd[cmd.index("BatchMode=yes")] = "BatchMode=no"
    r = run_ssh(["sshpass", "-e", *cmd], env=dict(os.environ, SSHPASS=sshd.password))
    assert r.returncode == 0, r.stderr
    bad = run_ssh(["sshpass", "-e", *cmd], env=dict(os.environ, SSHPASS="wrong"))
    assert bad.returncode != 0


def test_sshd_password_auth_paramiko(sshd):
    import paramiko
    c = paramiko.SSHClient()
    c.load_host_keys(sshd.known_hosts)
    c.set_missing_host_key_policy(paramiko.RejectPolicy())
    c.connect(sshd.host, sshd.port, username=sshd.user, password=sshd.password,
              allow_agent=False, look_for_keys=False, timeout=10)
    try:
        _, out, _ = c.exec_command("echo pw-ok")
        assert out.read().strip() == b"pw-ok"
    finally:
        c.close()


def test_sshd_forward_tcp(sshd, targets):
    with ssh_forward(sshd, f"{free_port()}:127.0.0.1:{targets.tcp['echo'][1]}") as addr:
        with connect(addr) as s:
            echo_roundtrip(s, pattern_bytes("fw", 1 << 20), half_close=True)
    with ssh_forward(sshd, f"{free_port()}:127.0.0.1:{targets.tcp['source'][1]}") as addr:
        with connect(addr) as s:
            download_and_verify(s, 4 << 20, "fw-src")


def test_sshd_forward_unix_socket(sshd, targets):
    with ssh_forward(sshd, f"{free_port()}:{targets.unix['sink']}") as addr:
        with connect(addr) as s:
            upload_and_verify(s, 4 << 20, "fw-unix")


def test_sshd_forward_refused_port(sshd, targets):
    # ssh accepts locally, channel open fails -> local connection closed with no data
    with ssh_forward(sshd, f"{free_port()}:127.0.0.1:{targets.tcp['refuse'][1]}") as addr:
        with connect(addr) as s:
            assert recv_until_eof(s) == b""
    port = targets.tcp["refuse"][1]
    wait_for(lambda: f"connect_to 127.0.0.1 port {port}: failed" in sshd.log(), 5, what="log")


def test_sshd_permit_open_policy(targets):
    from testbed.sshd import Sshd
    allowed = targets.tcp["echo"]
    with Sshd(permit_open=f"127.0.0.1:{allowed[1]}") as s:
        sink_before = targets.stats()["sink"]["accepted"]
        with ssh_forward(s, f"{free_port()}:127.0.0.1:{targets.tcp['sink'][1]}") as addr:
            with connect(addr) as c:
                assert recv_until_eof(c) == b""
        wait_for(lambda: "but the request was denied" in s.log(), 5, what="sshd log")
        assert targets.stats()["sink"]["accepted"] == sink_before
        with ssh_forward(s, f"{free_port()}:127.0.0.1:{allowed[1]}") as addr:
            with connect(addr) as c:
                echo_roundtrip(c, b"allowed", half_close=True)


def test_sshd_restart_same_port(targets):
    from testbed.sshd import Sshd
    with Sshd() as s:
        port = s.port
        s.restart()
        assert s.port == port
        r = run_ssh(s.ssh_command("true"))
        assert r.returncode == 0, r.stderr


def test_sshd_kill_sessions(targets):
    from testbed.sshd import Sshd
    with Sshd() as s:
        p = subprocess.Popen(s.ssh_command("sleep 60"), stdin=subprocess.DEVNULL,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for(lambda: "Starting session" in s.log(), 10, what="session")
        s.kill_sessions()
        assert p.wait(10) == 255
        assert run_ssh(s.ssh_command("true")).returncode == 0


# ---------------------------------------------------------------- postgres
def test_postgres_tcp_and_unix(postgres):
    import psycopg
    for host in (postgres.host, postgres.socket_dir):
        with psycopg.connect(postgres.dsn(host=host)) as c:
            assert c.execute("select 1").fetchone() == (1,)
            assert c.execute("select count(*) from pgbench_accounts").fetchone() == (100000,)
    assert os.path.basename(postgres.socket_path) == f".s.PGSQL.{postgres.port}"


def test_postgres_via_sshd_streamlocal(postgres, sshd):
    import psycopg
    with ssh_forward(sshd, f"{free_port()}:{postgres.socket_path}") as (h, p):
        with psycopg.connect(postgres.dsn(host=h, port=p)) as c:
            assert c.execute("select 2").fetchone() == (2,)


def test_pgbench_runs(postgres):
    r = subprocess.run(postgres.pgbench_command("-n", "-S", "-c", "2", "-t", "50"),
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "tps =" in r.stdout


# ---------------------------------------------------------------- agent
def test_agent(sshd, agent):
    assert agent.list_keys() == []
    agent.add(sshd.client_key_encrypted, passphrase=sshd.client_key_passphrase)
    assert len(agent.list_keys()) == 1
    r = run_ssh(sshd.ssh_command("echo agent-ok", agent=agent.sock))
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "agent-ok"
    agent.remove_all()
    assert agent.list_keys() == []


# ---------------------------------------------------------------- fault server
def test_faultserver_channel_errors_and_forwarding(targets):
    import asyncssh
    from testbed.faultserver import FaultServer

    async def go(f):
        async with asyncssh.connect(f.host, f.port, username=f.user, client_keys=[f.client_key],
                                    known_hosts=f.known_hosts) as conn:
            with pytest.raises(asyncssh.ChannelOpenError) as ei:
                await conn.open_connection("127.0.0.1", 1)
            assert ei.value.code == asyncssh.OPEN_ADMINISTRATIVELY_PROHIBITED
            with pytest.raises(asyncssh.ChannelOpenError) as ei:
                await conn.open_connection("127.0.0.1", 2)
            assert ei.value.code == asyncssh.OPEN_CONNECT_FAILED
            r, w = await conn.open_connection(*targets.tcp["echo"])
            w.write(b"ping")
            assert await r.readexactly(4) == b"ping"
            f.hang()
            w.write(b"x")
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(r.readexactly(1), 0.5)
            f.resume()
            assert await asyncio.wait_for(r.readexactly(1), 5) == b"x"
            f.drop()
            await asyncio.wait_for(conn.wait_closed(), 5)

    with FaultServer() as f:
        asyncio.run(go(f))
        f.down()
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection((f.host, f.port), timeout=5)
        f.up()
        socket.create_connection((f.host, f.port), timeout=5).close()


def test_faultserver_in_front_of_openssh(sshd, targets):
    from testbed.faultserver import FaultServer
    with FaultServer(upstream=(sshd.host, sshd.port)) as f:
        kh = sshd.known_hosts_for(f.port)
        r = run_ssh(sshd.ssh_command("echo via-proxy", port=f.port, known_hosts=kh))
        assert r.returncode == 0, r.stderr
        assert r.stdout.strip() == "via-proxy"
        p = subprocess.Popen(sshd.ssh_command("sleep 60", port=f.port, known_hosts=kh),
                             stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
        wait_for(lambda: f.stats()["active"] == 1, 10, what="proxied connection")
        time.sleep(0.5)
        f.reset()
        assert p.wait(10) == 255
