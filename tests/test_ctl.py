"""`sshpump ctl` against a running sshpump: forwards added and removed at
runtime, connections listed while they carry data, errors as one line with
the CLI's exit codes, and a peer of another uid refused."""
from __future__ import annotations

import json
import os
import socket
import subprocess

import pytest

from helpers import PY, clean_env, connect, tcp_spec
from test_control import PEER, python_for_nobody
from testbed.client import echo_roundtrip


def ctl(p, *args, json_out=True):
    r = subprocess.run([PY, "-m", "sshpump", "ctl", p.control, *args, *(["--json"] if json_out else [])],
                       capture_output=True, env=clean_env(), timeout=30)
    out = r.stdout.decode()
    return r.returncode, (json.loads(out) if json_out and r.returncode == 0 else out), r.stderr.decode()


@pytest.mark.parametrize("workers", [0, 2], ids=["w0", "w2"])
def test_add_list_connections_remove(pump, targets, workers):
    p = pump(tcp_spec(targets.tcp["echo"]), workers=workers)
    rc, added, err = ctl(p, "add", "-L", tcp_spec(targets.tcp["echo"]))
    assert rc == 0, err
    addr = tuple(added["listen"][0])
    with connect(addr, 10) as s:
        echo_roundtrip(s, b"x" * 5000)   # open, with bytes counted both ways
        rc, conns, err = ctl(p, "connections")
        assert rc == 0, err
        mine = [c for c in conns["connections"] if c["forward"] == added["id"]]
        assert len(mine) == 1, conns
        assert mine[0]["state"] == "open" and mine[0]["up_bytes"] == 5000 and mine[0]["down_bytes"] == 5000
        assert mine[0]["client"] == "%s:%d" % s.getsockname()[:2]
    rc, listing, _ = ctl(p, "list")
    assert [f["id"] for f in listing["forwards"]][-1] == added["id"]
    rc, removed, err = ctl(p, "remove", added["id"])
    assert rc == 0 and removed["id"] == added["id"], err
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(addr, 5).close()
    rc, text, _ = ctl(p, "list", json_out=False)   # the human view
    assert rc == 0 and added["id"] not in text and p.ready["listen"][0]["id"] in text
    with connect(p.address, 10) as s:                   # the first forward never noticed
        echo_roundtrip(s, b"still", half_close=True)


def test_errors_are_one_line_with_the_cli_exit_codes(pump, targets):
    p = pump(tcp_spec(targets.tcp["echo"]))
    busy = p.address[1]
    cases = [
        (["add", "-L", "99999:h:1"], 2, "bad forward spec"),
        (["add", "-L", f"{busy}:h:1"], 6, "in use"),
        (["remove", "f424242"], 2, "no forward"),
        (["frobnicate"], 2, ""),
    ]
    for args, code, text in cases:
        rc, _, err = ctl(p, *args)
        assert rc == code and err.count("\n") == 1 and text in err, (args, rc, err)
    r = subprocess.run([PY, "-m", "sshpump", "ctl", "/nonexistent/ctl.sock", "list"], capture_output=True,
                       timeout=30)
    assert r.returncode == 3 and r.stderr.decode().count("\n") == 1


def test_control_socket_is_0600_and_refuses_another_uid(pump, targets):
    p = pump(tcp_spec(targets.tcp["echo"]))
    assert os.stat(p.control).st_mode & 0o777 == 0o600
    exe = python_for_nobody()
    os.chmod(p.control, 0o666)   # only the peer-uid check stands in the way now
    os.chmod(os.path.dirname(p.control), 0o711)
    before = p.ctl("list")
    r = subprocess.run([exe, "-c", PEER, p.control], user=65534, group=65534, extra_groups=[],
                       capture_output=True, text=True, timeout=30)
    answer = json.loads(r.stdout.splitlines()[0])
    assert answer["ok"] is False and answer["code"] == 2 and "permission denied" in answer["error"], r
    assert p.ctl("list") == before   # nothing was added


def test_drain_stops_the_process(pump, targets):
    p = pump(tcp_spec(targets.tcp["echo"]), workers=2)
    rc, answer, err = ctl(p, "drain", "--timeout", "1")
    assert rc == 0 and answer["stopping"], err
    assert p.proc.wait(30) == 0
    assert not os.path.exists(p.control)
