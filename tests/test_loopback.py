"""A forward without a bind address listens on both loopbacks, 127.0.0.1 and
[::1], at the same port, as `ssh -L` does, whatever /etc/hosts says of
"localhost" (Debian images often lack "::1 localhost")."""
from __future__ import annotations

import socket

import pytest

import sshpump
from testbed._util import ipv6_loopback_available
from testbed.client import echo_roundtrip

from helpers import base_args, connect, run_cli, tcp_spec

WORKERS = pytest.mark.parametrize("workers", [0, 2], ids=["w0", "w2"])


pytestmark = pytest.mark.skipif(not ipv6_loopback_available(), reason="no IPv6 loopback on this host")


@WORKERS
def test_port_zero_listens_on_both_loopbacks_at_one_port(pump, targets, workers):
    spec = tcp_spec(targets.tcp["echo"])
    p = pump(spec, workers=workers)
    v4, v6 = p.ready["listen"]
    assert v4["spec"] == v6["spec"] == spec
    port = v4["address"][1]
    assert v4["address"] == ["127.0.0.1", port] and v6["address"] == ["::1", port]
    assert p.listen == [("127.0.0.1", port)]  # one forward
    for addr in (("127.0.0.1", port), ("::1", port)):
        with connect(addr, 10) as s:
            echo_roundtrip(s, f"over {addr[0]}".encode() * 100, half_close=True)
    p.wait_log(f"listening on [::1]:{port} for -L {spec}")


def test_fixed_port_taken_on_ipv6_loopback_is_a_forward_error(sshd, targets):
    """Both loopbacks or none: a port held on [::1] fails like one held on 127.0.0.1."""
    busy = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    busy.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    busy.bind(("::1", 0))
    busy.listen(1)
    port = busy.getsockname()[1]
    try:
        args, dest = base_args(sshd)
        rc, err = run_cli(["--workers", "0", *args, "-L", f"{port}:{targets.tcp['echo'][0]}:1", dest])
        assert rc == 6, err
        assert err.strip() == f"sshpump: cannot listen on [::1]:{port}: Address already in use", err
    finally:
        busy.close()


def test_explicit_bind_address_stays_one_address(pump, targets):
    p = pump(tcp_spec(targets.tcp["echo"], listen="127.0.0.1:0"))
    assert [a["address"][0] for a in p.ready["listen"]] == ["127.0.0.1"]


def test_api_lists_both_loopback_addresses(sshd, targets):
    with sshpump.forward(f"{sshd.user}@{sshd.host}", tcp_spec(targets.tcp["echo"]), port=sshd.port,
                         identity=sshd.client_key, known_hosts=sshd.known_hosts) as t:
        (h4, p4), (h6, p6) = t.addresses
        assert (h4, h6) == ("127.0.0.1", "::1") and p4 == p6 and t.local_address == (h4, p4)
        for addr in t.addresses:
            with connect(addr, 10) as s:
                echo_roundtrip(s, b"api over both loopbacks", half_close=True)
