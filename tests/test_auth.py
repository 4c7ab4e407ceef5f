"""Authentication, host key checking and start-up failures (exit codes)."""
from __future__ import annotations

import os
import socket

import pytest

import sshpump
from testbed.client import echo_roundtrip

from helpers import base_args, clean_env, connect, run_cli, start_pump, tcp_spec

WORKERS = pytest.mark.parametrize("workers", [0, 2], ids=["w0", "w2"])


def _echo_ok(p):
    with connect(p.address, 10) as s:
        echo_roundtrip(s, b"auth ok" * 1000, half_close=True)


def _cli(sshd, targets, *, workers=0, env=None, **kw):
    args, dest = base_args(sshd, **kw)
    return run_cli(["--workers", str(workers), *args, "-L", tcp_spec(targets.tcp["echo"]), dest],
                   env=env, timeout=60)


def test_key_auth(pump, targets):
    p = pump(tcp_spec(targets.tcp["echo"]))
    _echo_ok(p)


def test_agent_auth(sshd, targets, agent):
    agent.add(sshd.client_key)
    assert len(agent.list_keys()) == 1
    env = clean_env({"SSH_AUTH_SOCK": agent.sock})
    assert not os.listdir(env["HOME"])
    with start_pump(sshd, tcp_spec(targets.tcp["echo"]), key=False, env=env) as p:
        _echo_ok(p)


def test_agent_without_keys_fails(sshd, targets, agent):
    env = clean_env({"SSH_AUTH_SOCK": agent.sock})
    rc, err = _cli(sshd, targets, key=False, env=env)
    assert rc == 5, err
    assert "agent" in err


@WORKERS
def test_password_auth(sshd, targets, workers):
    env = clean_env({"SSHPUMP_PASSWORD": sshd.password})
    with start_pump(sshd, tcp_spec(targets.tcp["echo"]), key=False, env=env, workers=workers) as p:
        _echo_ok(p)
        assert sshd.password not in p.stderr()


def test_encrypted_key_with_passphrase(sshd, targets):
    env = clean_env({"SSHPUMP_PASSPHRASE": sshd.client_key_passphrase})
    with start_pump(sshd, tcp_spec(targets.tcp["echo"]), key=sshd.client_key_encrypted, env=env) as p:
        _echo_ok(p)
        assert sshd.client_key_passphrase not in p.stderr()


def test_encrypted_key_without_passphrase_fails(sshd, targets):
    rc, err = _cli(sshd, targets, key=sshd.client_key_encrypted)
    assert rc == 5, err
    assert "authentication failed" in err


@WORKERS
def test_wrong_password_exit_5(sshd, targets, workers):
    env = clean_env({"SSHPUMP_PASSWORD": "definitely-wrong"})
    rc, err = _cli(sshd, targets, key=False, env=env, workers=workers)
    assert rc == 5, err
    assert "authentication failed" in err
    assert "password" in err
    assert "definitely-wrong" not in err


@WORKERS
def test_wrong_known_hosts_exit_4(sshd, targets, workers):
    rc, err = _cli(sshd, targets, known_hosts=sshd.wrong_known_hosts, workers=workers)
    assert rc == 4, err
    assert "does NOT match" in err


def test_unknown_host_strict_yes_exit_4(sshd, targets, tmp_path):
    kh = tmp_path / "known_hosts"
    kh.write_text("")
    rc, err = _cli(sshd, targets, known_hosts=str(kh), strict="yes")
    assert rc == 4, err
    assert "unknown" in err
    assert kh.read_text() == ""
    # a known_hosts file that does not exist at all: same
    rc, err = _cli(sshd, targets, known_hosts=str(tmp_path / "missing"), strict="yes")
    assert rc == 4, err
    assert not (tmp_path / "missing").exists()


def test_accept_new_writes_known_hosts(sshd, targets, tmp_path):
    kh = tmp_path / "sub" / "known_hosts"
    with start_pump(sshd, tcp_spec(targets.tcp["echo"]), known_hosts=str(kh), strict="accept-new") as p:
        _echo_ok(p)
        assert "permanently added" in p.stderr()
    text = kh.read_text()
    lines = text.splitlines()
    assert len(lines) == 1, text
    label, ktype, b64 = lines[0].split()
    assert label == f"[{sshd.host}]:{sshd.port}"
    assert f"{ktype} {b64}" in sshd.host_public_keys
    # now the key is known: strict checking passes and nothing is appended
    with start_pump(sshd, tcp_spec(targets.tcp["echo"]), known_hosts=str(kh), strict="yes") as p:
        _echo_ok(p)
    assert kh.read_text() == text
    # accept-new still refuses a CHANGED key
    rc, err = _cli(sshd, targets, known_hosts=sshd.wrong_known_hosts, strict="accept-new")
    assert rc == 4, err
    assert "does NOT match" in err


def test_strict_no_logs_warning(sshd, targets, tmp_path):
    with start_pump(sshd, tcp_spec(targets.tcp["echo"]), known_hosts=str(tmp_path / "none"),
                    strict="no", verbose=0) as p:
        _echo_ok(p)
        err = p.stderr()
    assert "DISABLED" in err and "StrictHostKeyChecking=no" in err
    assert not (tmp_path / "none").exists()


def test_connect_closed_port_exit_3(sshd, targets):
    closed = targets.tcp["refuse"][1]  # bound, not listening: ECONNREFUSED
    rc, err = _cli(sshd, targets, port=closed)
    assert rc == 3, err
    assert str(closed) in err


@WORKERS
def test_connect_closed_port_exit_3_workers(sshd, targets, workers):
    rc, err = _cli(sshd, targets, port=targets.tcp["refuse"][1], workers=workers)
    assert rc == 3, err


@pytest.mark.parametrize("bind", ["127.0.0.1", None], ids=["explicit", "default"])
def test_listen_port_in_use_exit_6(sshd, targets, bind):
    busy = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    busy.bind(("127.0.0.1", 0))
    busy.listen(1)
    port = busy.getsockname()[1]
    try:
        args, dest = base_args(sshd)
        t = targets.tcp["echo"]
        spec = f"{bind + ':' if bind else ''}{port}:{t[0]}:{t[1]}"
        rc, err = run_cli(["--workers", "0", *args, "-L", spec, dest], timeout=60)
        assert rc == 6, err
        assert f"127.0.0.1:{port}" in err
        assert "in use" in err.lower()
        rc, err = run_cli(["--workers", "2", *args, "-o", "ExitOnForwardFailure=yes",
                           "-L", spec, "-L", tcp_spec(t), dest], timeout=60)
        assert rc == 6, err
        assert f"127.0.0.1:{port}" in err
    finally:
        busy.close()


# ---------------------------------------------------------------- API
def test_api_forward_and_errors(sshd, targets, tmp_path):
    kw = dict(port=sshd.port, identity=sshd.client_key, known_hosts=sshd.known_hosts)
    with sshpump.forward(f"{sshd.user}@{sshd.host}", tcp_spec(targets.tcp["echo"]),
                         f"0:{targets.unix['echo']}", workers=0, **kw) as t:
        assert t.local_address == t.addresses[0]
        assert len(t.addresses) == 4  # each forward on 127.0.0.1 and on [::1]
        for a in t.addresses:
            with connect(a, 10) as s:
                echo_roundtrip(s, b"api", half_close=True)
    with pytest.raises(sshpump.HostKeyError, match="does NOT match"):
        sshpump.forward(f"{sshd.user}@{sshd.host}", tcp_spec(targets.tcp["echo"]),
                        port=sshd.port, identity=sshd.client_key, known_hosts=sshd.wrong_known_hosts)
    with pytest.raises(sshpump.AuthError):
        sshpump.forward(f"{sshd.user}@{sshd.host}", tcp_spec(targets.tcp["echo"]),
                        port=sshd.port, identity=str(tmp_path / "nokey"), identities_only=True,
                        use_agent=False, password="wrong", known_hosts=sshd.known_hosts)
    with pytest.raises(sshpump.ConnectError):
        sshpump.forward(f"{sshd.user}@{sshd.host}", tcp_spec(targets.tcp["echo"]),
                        port=targets.tcp["refuse"][1], identity=sshd.client_key,
                        known_hosts=sshd.known_hosts, connect_timeout=5)
