"""Which libssh2 runs: the patched build, loaded before ssh2-python binds its own,
exactly one libssh2 in every process; the stock one only on purpose or with
one warning line saying why."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from helpers import clean_env, start_pump, tcp_spec
from testbed.client import connect, echo_roundtrip

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Reports, from a fresh interpreter, what sshpump loaded and what is mapped.
PROBE = """
import ctypes, json, sys
{first}
import sshpump, sshpump.pump
from sshpump.libssh2_loader import IDENT_SYMBOL, mapped_libssh2
try:
    getattr(ctypes.CDLL(None), IDENT_SYMBOL)
    ident = True
except AttributeError:
    ident = False
print(json.dumps({{"loaded": sshpump.LIBSSH2.__dict__, "mapped": mapped_libssh2(), "ident": ident}}))
"""


def _probe(first="", env=None):
    import json

    r = subprocess.run([sys.executable, "-c", PROBE.format(first=first)], capture_output=True,
                       text=True, env=clean_env(env), timeout=60)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout), r.stderr


def _patched_dir():
    import sshpump.libssh2_loader as loader
    return os.path.realpath(loader.PATCHED_DIR)


def test_import_loads_the_patched_build_and_only_it():
    got, err = _probe()
    assert err == ""
    assert got["loaded"]["patched"] is True, got
    assert len(got["mapped"]) == 1, got["mapped"]
    assert os.path.dirname(os.path.realpath(got["mapped"][0])) == _patched_dir()
    # the identification symbol exists only in our build: this is the patched library
    assert got["ident"] is True
    assert got["loaded"]["openssl"].startswith("OpenSSL 3.")


def test_ssh2_imported_first_runs_stock_with_one_warning_line():
    got, err = _probe(first="import ssh2.session")
    assert got["loaded"]["patched"] is False
    assert got["ident"] is False
    assert len(got["mapped"]) == 1 and "ssh2_python.libs" in got["mapped"][0]
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "stock libssh2" in lines[0] and "ssh2 was imported before sshpump" in lines[0]


def test_stock_on_purpose_is_quiet():
    got, err = _probe(env={"SSHPUMP_LIBSSH2": "stock"})
    assert got["loaded"]["patched"] is False and got["loaded"]["why_stock"] == "SSHPUMP_LIBSSH2=stock"
    assert "ssh2_python.libs" in got["mapped"][0]
    assert err == ""


def test_unknown_selector_warns_and_runs_stock():
    got, err = _probe(env={"SSHPUMP_LIBSSH2": "fastest"})
    assert got["loaded"]["patched"] is False
    assert len(err.strip().splitlines()) == 1 and "SSHPUMP_LIBSSH2='fastest'" in err


@pytest.mark.parametrize("selector,kind", [("", "patched"), ("stock", "stock")])
def test_version_names_the_library(selector, kind):
    r = subprocess.run([sys.executable, "-m", "sshpump", "--version"], capture_output=True, text=True,
                       env=clean_env({"SSHPUMP_LIBSSH2": selector}), timeout=60)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert lines[0].startswith("sshpump ")
    assert lines[1].startswith(f"libssh2 1.11.1, {kind}") and "libssh2-" in lines[1]
    assert lines[2].startswith("OpenSSL 3.")


def _maps_of(pid):
    with open(f"/proc/{pid}/maps") as f:
        return {line.split()[-1] for line in f if "libssh2" in line}


@pytest.mark.parametrize("selector", ["", "stock"])
def test_workers_run_on_the_selected_library(sshd, targets, selector):
    echo = targets.tcp["echo"]
    with start_pump(sshd, tcp_spec(echo), workers=2, env=clean_env({"SSHPUMP_LIBSSH2": selector})) as p:
        with connect(p.listen[0]) as s:
            echo_roundtrip(s, b"which libssh2", half_close=True)
        pids = [p.pid, *p.workers()]
        assert len(pids) == 3
        for pid in pids:
            libs = _maps_of(pid)
            assert len(libs) == 1, (pid, libs)
            where = os.path.dirname(os.path.realpath(libs.pop()))
            assert (where == _patched_dir()) == (selector == ""), where
        assert "stock libssh2" not in p.stderr()


def test_build_refuses_an_sdist_with_the_wrong_checksum(tmp_path):
    bogus = tmp_path / "ssh2_python-1.2.0.post1.tar.gz"
    bogus.write_bytes(b"not the sdist")
    r = subprocess.run([sys.executable, os.path.join(REPO, "csrc", "build_libssh2.py"), str(tmp_path / "out")],
                       capture_output=True, text=True, env=dict(os.environ, SSHPUMP_SSH2_PYTHON_SDIST=str(bogus)),
                       timeout=120)
    assert r.returncode == 1
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "is not the pinned" in r.stderr and "refusing" in r.stderr
    assert not (tmp_path / "out").exists() or not os.listdir(tmp_path / "out")


def test_patched_files_are_warning_free_under_libssh2s_own_flags(tmp_path):
    """The files the patch touches compile without a warning under libssh2's
    picky gcc flags (cmake/PickyWarnings.cmake; upstream builds with them)."""
    sys.path.insert(0, os.path.join(REPO, "csrc"))
    import build_libssh2 as b

    data = b.sdist_bytes()

    def warnings() -> set[str]:
        root = b.extract_libssh2(data, str(tmp_path))
        b.apply_patches(root)
        with open(os.path.join(root, "src", "libssh2_config.h"), "w") as f:
            f.write(b.CONFIG_H)
        found = set()
        for name in ("transport.c", "crypto.c", "channel.c"):  # crypto.c includes openssl.c
            r = subprocess.run([*b.compile_args(root, b.PICKY_WARNINGS), "-fsyntax-only",
                                os.path.join(root, "src", name)], capture_output=True, text=True)
            assert r.returncode == 0, r.stderr
            found |= {line for line in r.stderr.splitlines() if ": warning: " in line}
        return found

    assert warnings() == set()
