"""The benchmark harness runs end to end (``python -m bench --smoke``) and
accounts for every contender: measured, or skipped with a reason.  No timing
is asserted (benchmarks report numbers; tests never judge them)."""
from __future__ import annotations

import glob
import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_bench_smoke(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("the bench's test bed needs root (sshd)")
    if not os.path.exists("/usr/sbin/sshd"):
        pytest.skip("openssh-server not installed; run scripts/install-system-deps.sh")
    r = subprocess.run([sys.executable, "-m", "bench", "--smoke", "-q", "--out", str(tmp_path)],
                       cwd=REPO, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    files = glob.glob(str(tmp_path / "*-smoke.json"))
    assert len(files) == 1, os.listdir(tmp_path)
    with open(files[0]) as f:
        res = json.load(f)
    assert glob.glob(str(tmp_path / "*-smoke.md"))

    sys.path.insert(0, REPO)
    from bench.contenders import all_contenders
    expected = {c.name for c in all_contenders()}
    assert set(res["contenders"]) == expected
    assert {"nproc", "cpu_model", "kernel"} <= set(res["machine"])
    assert res["cipher"] == "aes128-gcm@openssh.com"
    assert res["workloads"]
    problems = []
    for name, c in res["contenders"].items():
        if c["status"] == "skipped":
            if not c.get("reason"):
                problems.append(f"{name}: skipped without a reason")
            continue
        assert c["status"] == "ok"
        for key, w in res["workloads"].items():
            ent = w["results"].get(name)
            if ent is None:
                problems.append(f"{key}/{name}: missing")
            elif "skipped" in ent:
                if not ent["skipped"]:
                    problems.append(f"{key}/{name}: skipped without a reason")
            elif not ent["reps"] or any(rep.get("value") is None for rep in ent["reps"]):
                problems.append(f"{key}/{name}: not measured: {ent.get('errors')}")
    assert not problems, "\n".join(problems)

    # every sshpump row says which libssh2 it ran on; one that is not the build its
    # name claims carries a warning (stock is a fallback sshpump allows, not an error)
    for name, c in res["contenders"].items():
        lib = c.get("libssh2")
        if not name.startswith("sshpump"):
            continue
        assert lib and lib["path"] and lib["kind"] in ("patched", "stock"), (name, c)
        if lib["kind"] != lib["expected"]:
            assert any(w.startswith(f"{name} runs on") for w in res["warnings"]), res["warnings"]
    assert res["contenders"]["sshpump (stock libssh2)"]["libssh2"]["kind"] == "stock"


def test_bench_kinds_smoke(tmp_path):
    """``python -m bench.kinds --quick`` (-D / -R vs ssh -D / -R) with tiny sizes: every row, every
    contender (and the direct reference) produced a number; values are never judged."""
    if os.geteuid() != 0:
        pytest.skip("the bench's test bed needs root (sshd)")
    if not os.path.exists("/usr/sbin/sshd"):
        pytest.skip("openssh-server not installed; run scripts/install-system-deps.sh")
    r = subprocess.run([sys.executable, "-m", "bench.kinds", "--quick", "--mib", "2", "--curl-mib", "2",
                        "--count", "32", "--out", str(tmp_path)],
                       cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    files = glob.glob(str(tmp_path / "*-kinds-quick.json"))
    assert len(files) == 1 and glob.glob(str(tmp_path / "*-kinds-quick.md")), os.listdir(tmp_path)
    with open(files[0]) as f:
        res = json.load(f)
    assert res["cipher"] == "aes128-gcm@openssh.com" and not res["errors"]
    assert len(res["rows"]) == 6
    for row, per in res["rows"].items():
        assert len(per) == 4, (row, per)
        for name, samples in per.items():
            assert samples and all(isinstance(s["value"], float) for s in samples), (row, name, samples)
            assert name == "direct" or all(s["cpu"] is not None for s in samples), (row, name, samples)
