"""An idle worker (no client connection at all) must keep its session: servers
with ClientAliveInterval expect answers to their keepalives even then."""

import time

import pytest

from helpers import connect, extra_sshd, start_pump, tcp_spec
from testbed.client import echo_roundtrip


@pytest.fixture(scope="module")
def sshd_client_alive(sshd):
    with extra_sshd(sshd, extra_config={"ClientAliveInterval": "1", "ClientAliveCountMax": "2"}) as s:
        yield s


@pytest.mark.parametrize("workers", [0, 1])
def test_idle_session_answers_server_keepalives(sshd_client_alive, targets, workers):
    with start_pump(sshd_client_alive, tcp_spec(targets.tcp["echo"]), workers=workers,
                    extra=["-o", "ServerAliveInterval=0"]) as p:
        # sshd probes every ~2 s (whole seconds) and drops a client that
        # leaves 2 probes unanswered: about 6 s.
        time.sleep(10)
        # Then one connection, and idle again.
        with connect(p.address, 10) as s:
            echo_roundtrip(s, b"after idle", half_close=True)
        time.sleep(4)
        with connect(p.address, 10) as s:
            echo_roundtrip(s, b"after idle again", half_close=True)
        err = p.stderr()
        assert "session lost" not in err and "session down" not in err, err
