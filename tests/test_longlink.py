"""A long link (100 ms round trip through testbed.delayproxy between sshpump
and sshd): a larger --window keeps its size while data flows (libssh2's own
adjusts would shrink it back to 2 MiB), and transfers stay intact both ways
across rekeys. Throughput is bench/longlink.py's job, not an assertion here."""
from __future__ import annotations

import pytest

from helpers import connect, extra_sshd, start_pump, tcp_spec
from testbed.client import download_and_verify, upload_and_verify
from testbed.delayproxy import DelayProxy

pytestmark = pytest.mark.slow

MiB = 1 << 20


@pytest.fixture(scope="module")
def long_link(sshd):
    """An sshd that rekeys every 32 MiB, reached through a 100 ms RTT link."""
    with extra_sshd(sshd, extra_config={"RekeyLimit": "32M"}) as server, \
            DelayProxy((server.host, server.port), 0.05) as link:
        yield server, link


@pytest.mark.parametrize("window", [0, 16 * MiB, 64 * MiB], ids=["default", "16M", "64M"])
def test_window_over_a_long_link_both_ways_across_rekeys(long_link, targets, window):
    server, link = long_link
    known_hosts = server.known_hosts_for(link.listen[1])
    extra = ["--window", str(window)] if window else []
    with start_pump(server, tcp_spec(targets.tcp["source"]), tcp_spec(targets.tcp["sink"]), workers=0,
                    extra=extra, port=link.listen[1], known_hosts=known_hosts) as p:
        with connect(p.listen[0], 120) as s:
            download_and_verify(s, 96 * MiB, f"long-down-{window}")
        with connect(p.listen[1], 120) as s:
            upload_and_verify(s, 96 * MiB, f"long-up-{window}")
        assert p.proc.poll() is None, p.stderr()
        err = p.stderr()
        assert "session lost" not in err and err.count("closed 127.0.0.1") == 2, err


def test_the_delay_proxy_relays_intact_both_ways(targets):
    """The proxy itself: bytes and half-close pass through unchanged."""
    with DelayProxy(targets.tcp["source"], 0.02) as down, DelayProxy(targets.tcp["sink"], 0.02) as up:
        with connect(down.listen, 60) as s:
            download_and_verify(s, 32 * MiB, "proxy-down")
        with connect(up.listen, 60) as s:
            upload_and_verify(s, 32 * MiB, "proxy-up")
