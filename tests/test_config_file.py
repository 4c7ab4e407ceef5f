"""Many tunnels from one TOML file (--config): each destination supervised on
its own, SIGHUP applying the file's changes without touching the rest."""
from __future__ import annotations

import os
import signal
import socket
import threading
import time

import pytest

from helpers import Pump, clean_env, connect, extra_sshd, run_cli, tcp_spec
from testbed.client import download_and_verify, echo_roundtrip

from sshpump.control.client import request


def _tunnel(name, server, *forwards, **extra):
    lines = [f"[tunnels.{name}]",
             f'destination = "{server.user}@{server.host}"',
             f"port = {server.port}",
             f'identity = "{server.client_key}"',
             f'known_hosts = "{server.known_hosts}"',
             "identities_only = true",
             "use_agent = false",
             "connect_timeout = 10",
             "forwards = [" + ", ".join(f'"{f}"' for f in forwards) + "]"]
    lines += [f"{k} = {v!r}".replace("'", '"') if isinstance(v, str) else f"{k} = {str(v).lower()}"
              for k, v in extra.items()]
    return "\n".join(lines) + "\n"


def _write(path, control, *tunnels):
    text = f'control = "{control}"\n[defaults]\nworkers = 1\nclient_wait = 2\n\n' + "\n".join(tunnels)
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def _forwards(control):
    return {f["tunnel"] + ":" + f["spec"]: f for f in request(control, "list", {})["forwards"]}


def _addr(fwd):
    return tuple(fwd["listen"][0])


def _wait(pred, limit=20.0, what="condition"):
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        value = pred()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"{what} not reached within {limit}s")


def test_one_destination_down_never_disturbs_another(sshd, targets, tmp_path):
    echo = tcp_spec(targets.tcp["echo"])
    control = str(tmp_path / "ctl.sock")
    conf = str(tmp_path / "tunnels.toml")
    with extra_sshd(sshd) as other:
        _write(conf, control, _tunnel("a", sshd, echo), _tunnel("b", other, echo))
        with Pump(["-v", "--config", conf], env=clean_env()) as p:
            fw = _forwards(control)
            a, b = _addr(fw["a:" + echo]), _addr(fw["b:" + echo])
            for addr in (a, b):
                with connect(addr, 10) as s:
                    echo_roundtrip(s, b"both up", half_close=True)
            other.stop()
            # b's clients are cut (reset) once b has no session; a never notices.
            for i in range(20):
                with connect(a, 10) as s:
                    echo_roundtrip(s, b"a %d" % i, half_close=True)
            st = _wait(lambda: (lambda s: s if not any(w["up"] for w in s["tunnels"]["b"]["workers"]) else None)(
                request(control, "stats", {})), what="tunnel b down")
            assert all(w["up"] for w in st["tunnels"]["a"]["workers"])
            with connect(b, 10) as s:
                s.sendall(b"anyone?")
                with pytest.raises((ConnectionResetError, BrokenPipeError)):
                    s.settimeout(15)
                    while s.recv(100):
                        pass
            assert p.proc.poll() is None


def test_a_destination_refusing_our_key_never_disturbs_another(sshd, targets, tmp_path):
    echo = tcp_spec(targets.tcp["echo"])
    control = str(tmp_path / "ctl.sock")
    conf = str(tmp_path / "tunnels.toml")
    wrong_key = str(tmp_path / "wrong_ed25519")
    os.system(f"ssh-keygen -q -t ed25519 -N '' -f {wrong_key}")
    bad = _tunnel("bad", sshd, echo).replace(sshd.client_key, wrong_key)
    _write(conf, control, _tunnel("good", sshd, echo), bad)
    with Pump(["--config", conf], env=clean_env()) as p:
        good = _addr(_forwards(control)["good:" + echo])
        with connect(good, 10) as s:
            echo_roundtrip(s, b"good", half_close=True)
        st = _wait(lambda: (lambda s: s if s["tunnels"]["bad"]["state"] == "failed" else None)(
            request(control, "stats", {})), what="tunnel bad failed")
        assert "authentication failed" in st["tunnels"]["bad"]["error"]
        assert st["tunnels"]["good"]["state"] == "running"
        with connect(good, 10) as s:
            echo_roundtrip(s, b"still good", half_close=True)
        assert p.proc.poll() is None
        assert p.stderr().count("authentication failed") == 1   # said once, retried quietly


def test_sighup_applies_the_difference_and_spares_unchanged_tunnels(sshd, targets, tmp_path):
    source, echo = tcp_spec(targets.tcp["source"]), tcp_spec(targets.tcp["echo"])
    control = str(tmp_path / "ctl.sock")
    conf = str(tmp_path / "tunnels.toml")
    _write(conf, control, _tunnel("keep", sshd, source), _tunnel("gone", sshd, echo))
    with Pump(["--config", conf], env=clean_env()) as p:
        fw = _forwards(control)
        keep, gone = _addr(fw["keep:" + source]), _addr(fw["gone:" + echo])
        keep_pids = sorted(w["pid"] for w in request(control, "stats", {})["tunnels"]["keep"]["workers"])

        # A long, paced download through the unchanged tunnel spans the reload.
        result = {}

        def download():
            try:
                with connect(keep, 30) as s:
                    result["n"] = download_and_verify(s, 24 << 20, "across-reload", rate=8 << 20)
            except Exception as e:  # noqa: BLE001 - asserted below
                result["error"] = e
        th = threading.Thread(target=download)
        th.start()
        time.sleep(0.5)

        # gone removed, new added, keep gets a second forward (options unchanged).
        _write(conf, control, _tunnel("keep", sshd, source, echo), _tunnel("new", sshd, echo))
        p.proc.send_signal(signal.SIGHUP)
        fw = _wait(lambda: (lambda f: f if "new:" + echo in f and "keep:" + echo in f else None)(_forwards(control)),
                   what="reload applied")
        assert not any(k.startswith("gone:") for k in fw)
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(gone, 5).close()
        for key in ("new:" + echo, "keep:" + echo):
            with connect(_addr(fw[key]), 10) as s:
                echo_roundtrip(s, key.encode(), half_close=True)
        th.join(60)
        assert result.get("n") == 24 << 20, result
        # the unchanged tunnel kept its workers (no restart)
        assert sorted(w["pid"] for w in request(control, "stats", {})["tunnels"]["keep"]["workers"]) == keep_pids

        # A file that does not parse is refused; the running set stays.
        with open(conf, "a") as f:
            f.write("[tunnels.broken\n")
        before = _forwards(control)
        p.proc.send_signal(signal.SIGHUP)
        _wait(lambda: "reload:" in p.stderr() and "keeping the running tunnels" in p.stderr(), what="reload refused")
        assert _forwards(control).keys() == before.keys()
        assert p.proc.poll() is None


def test_check_validates_without_connecting(tmp_path, sshd, targets):
    conf = str(tmp_path / "tunnels.toml")
    _write(conf, str(tmp_path / "c.sock"), _tunnel("a", sshd, tcp_spec(targets.tcp["echo"])))
    r = run_cli(["--config", conf, "--check"])
    assert r[0] == 0, r
    with open(conf, "a") as f:
        f.write("bogus = 1\n")
    rc, err = run_cli(["--config", conf, "--check"])
    assert rc == 2 and err.count("\n") == 1 and "unknown" in err, err
    rc, err = run_cli(["--config", conf, "-L", "1:h:2"])
    assert rc == 2 and err.count("\n") == 1, err
