"""Secrets given in the environment do not stay there: neither the master's
/proc/PID/environ nor any worker's shows SSHPUMP_PASSWORD or
SSHPUMP_PASSPHRASE once sshpump has started (workers get them over their
control socket)."""
from __future__ import annotations

import pytest

from testbed.client import echo_roundtrip

from helpers import clean_env, connect, start_pump, tcp_spec

WORKERS = pytest.mark.parametrize("workers", [0, 2], ids=["w0", "w2"])


def _environ(pid) -> bytes:
    with open(f"/proc/{pid}/environ", "rb") as f:
        return f.read()


def _assert_scrubbed(p, name, secret, workers):
    pids = [p.pid, *p.workers()]
    assert len(pids) == 1 + workers, pids
    for pid in pids:
        env = _environ(pid)
        assert name.encode() + b"=" not in env, f"{name} visible in /proc/{pid}/environ"
        assert secret.encode() not in env, f"the secret's value is in /proc/{pid}/environ"
        assert b"HOME=" in env, "the rest of the environment must stay intact"


@WORKERS
def test_password_leaves_every_process_environment(sshd, targets, workers):
    env = clean_env({"SSHPUMP_PASSWORD": sshd.password})
    assert sshd.password.encode() in b"".join(f"{k}={v}".encode() for k, v in env.items())
    with start_pump(sshd, tcp_spec(targets.tcp["echo"]), key=False, env=env, workers=workers) as p:
        with connect(p.address, 10) as s:  # logged in with the password it no longer shows
            echo_roundtrip(s, b"password auth" * 100, half_close=True)
        _assert_scrubbed(p, "SSHPUMP_PASSWORD", sshd.password, workers)


def test_passphrase_leaves_every_process_environment(sshd, targets):
    env = clean_env({"SSHPUMP_PASSPHRASE": sshd.client_key_passphrase})
    with start_pump(sshd, tcp_spec(targets.tcp["echo"]), key=sshd.client_key_encrypted,
                    env=env, workers=2) as p:
        with connect(p.address, 10) as s:
            echo_roundtrip(s, b"encrypted key" * 100, half_close=True)
        _assert_scrubbed(p, "SSHPUMP_PASSPHRASE", sshd.client_key_passphrase, 2)
