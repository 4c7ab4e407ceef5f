"""The C pump and the patched libssh2 under AddressSanitizer + UBSan: debug
builds of the same sources carry real traffic (bulk both ways across a rekey,
half-close, many short connections, aborted clients) and must report nothing;
on both planes (--mux: also its agent killed under live streams)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import threading

import pytest

from helpers import PLANES, clean_env, extra_sshd, plane_args, start_pump
from testbed.client import connect, download_and_verify, echo_roundtrip, upload_and_verify

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SANITIZE = ["-fsanitize=address,undefined", "-fno-omit-frame-pointer", "-O1", "-g"]

pytestmark = pytest.mark.slow


def _libasan():
    path = subprocess.run(["gcc", "-print-file-name=libasan.so"], capture_output=True, text=True).stdout.strip()
    return path if os.path.isabs(path) and os.path.exists(path) else None


@pytest.fixture(scope="module")
def asan_package(tmp_path_factory):
    """A copy of the sshpump package whose _pump and patched libssh2 are built with sanitizers."""
    libasan = _libasan()
    if libasan is None:
        pytest.skip("gcc has no libasan here")
    root = tmp_path_factory.mktemp("asan")
    shutil.copytree(os.path.join(REPO, "src", "sshpump"), root / "sshpump",
                    ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    build = root / "build"
    env = dict(os.environ, SSHPUMP_SANITIZE="1")
    code = (
        "import sys; sys.path.insert(0, 'csrc'); import build_pump; "
        f"build_pump.ffibuilder.compile(tmpdir={str(build)!r}, verbose=False)"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    built = [p for p in (build / "sshpump").glob("_pump*.so")]
    assert built, os.listdir(build)
    shutil.copy(built[0], root / "sshpump" / built[0].name)
    sys.path.insert(0, os.path.join(REPO, "csrc"))
    import build_libssh2

    shutil.rmtree(root / "sshpump" / "_libssh2", ignore_errors=True)
    build_libssh2.build(str(root / "sshpump" / "_libssh2"), cflags=SANITIZE + ["-UNDEBUG"], ldflags=SANITIZE)
    return root, libasan


def _agents(sshd):
    from test_mux import agents_of
    return agents_of(sshd)


@pytest.fixture
def rekeying_sshd(sshd):
    """Rekeys every 16 MiB, so the 48 MiB transfers below cross rekeys."""
    with extra_sshd(sshd, extra_config={"RekeyLimit": "16M"}) as s:
        yield s


@PLANES
def test_pump_clean_under_asan(asan_package, rekeying_sshd, targets, plane):
    sshd = rekeying_sshd
    root, libasan = asan_package
    env = clean_env({
        "PYTHONPATH": f"{root}{os.pathsep}{REPO}",
        "LD_PRELOAD": libasan,
        # CPython's own allocations are not ours to judge; memory errors are.
        "ASAN_OPTIONS": "detect_leaks=0:abort_on_error=0:halt_on_error=1",
        "UBSAN_OPTIONS": "print_stacktrace=1:halt_on_error=1",
    })
    echo, sink, source = targets.tcp["echo"], targets.tcp["sink"], targets.tcp["source"]
    p = start_pump(sshd, f"0:{echo[0]}:{echo[1]}", f"0:{sink[0]}:{sink[1]}", f"0:{source[0]}:{source[1]}",
                   workers=0, env=env, ready_timeout=60, extra=plane_args(plane))
    try:
        a_echo, a_sink, a_source = p.listen
        with open(f"/proc/{p.pid}/maps") as f:
            mapped = {line.split()[-1] for line in f if "libssh2" in line}
        # the sanitized patched libssh2, and only it
        assert len(mapped) == 1 and os.path.dirname(next(iter(mapped))) == str(root / "sshpump" / "_libssh2"), mapped
        with connect(a_sink) as s:
            upload_and_verify(s, 48 << 20, "asan-up")
        with connect(a_source) as s:
            download_and_verify(s, 48 << 20, "asan-down")
        errors = []

        def short(i):
            try:
                with connect(a_echo) as s:
                    echo_roundtrip(s, os.urandom(1000 + i), half_close=True)
            except Exception as e:  # noqa: BLE001 - collected and asserted below
                errors.append(e)

        threads = [threading.Thread(target=short, args=(i,)) for i in range(64)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not errors, errors[:3]
        # Clients that vanish mid-transfer (RST with data in flight).
        for _ in range(8):
            s = connect(a_source)
            s.sendall(b"%d reset\n" % (64 << 20))
            s.recv(65536)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
            s.close()
        with connect(a_echo) as s:
            echo_roundtrip(s, b"still serving", half_close=True)
        if plane == "mux":
            # The agent dies under a held stream and a transfer: every
            # stream is cut, the lane is restarted, the pump stays clean.
            held = connect(a_echo)
            echo_roundtrip(held, b"held")
            busy = connect(a_source)
            busy.sendall(b"%d busy\n" % (64 << 20))
            busy.recv(65536)
            for pid in _agents(sshd):
                os.kill(pid, signal.SIGKILL)
            p.wait_log("mux agent started", count=2, timeout=30)
            held.close()
            busy.close()
            with connect(a_echo) as s:
                echo_roundtrip(s, b"after the agent's restart", half_close=True)
        assert p.proc.poll() is None, p.stderr()
        assert p.stop() == 0, p.stderr()
        log = p.stderr()
    finally:
        p.close()
    assert "AddressSanitizer" not in log and "runtime error" not in log, log[-4000:]
