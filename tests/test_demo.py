"""``sshpump demo``: the real command as a subprocess -- a clean run, a run
interrupted by SIGINT (during set-up and mid-transfer), and a run as an
unprivileged user.

Each run goes through a small root "reaper" (``_REAPER``): it makes itself
the child subreaper (PR_SET_CHILD_SUBREAPER), so every process the demo
started -- sshd and its per-connection children, the target, sshpump and its
workers, ssh -- stays its descendant even when orphaned; after the demo exits
it reports those still alive (then kills them), along with the demo's exit
code and output.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

import pytest

import sshpump

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_REAPER = r"""
import ctypes, json, os, signal, subprocess, sys, time
spec = json.loads(sys.argv[1])
libc = ctypes.CDLL(None, use_errno=True)
assert libc.prctl(36, 1, 0, 0, 0) == 0            # PR_SET_CHILD_SUBREAPER
kw = {}
if spec.get("user") is not None:
    kw = dict(user=spec["user"], group=spec["group"], extra_groups=[])
t0 = time.monotonic()
p = subprocess.Popen(spec["argv"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=spec["env"],
                     cwd=spec.get("cwd"), **kw)
out = []
sent = None
for raw in p.stdout:
    line = raw.decode(errors="replace")
    out.append(line)
    if sent is None and spec.get("interrupt") and spec["interrupt"] in line:
        p.send_signal(signal.SIGINT)
        sent = time.monotonic() - t0
rc = p.wait(120)
err = p.stderr.read().decode(errors="replace")
elapsed = time.monotonic() - t0

def alive():
    while True:                                    # reap orphans that already died
        try:
            if os.waitpid(-1, os.WNOHANG)[0] == 0:
                break
        except ChildProcessError:
            break
    left = []
    for d in os.listdir("/proc"):
        if not d.isdigit() or int(d) == os.getpid():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                st = f.read()
            with open(f"/proc/{d}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
        rest = st[st.rfind(")") + 2:].split()
        if int(rest[1]) == os.getpid() and rest[0] != "Z":
            left.append(f"{d} {cmd}")
    return left

# The demo waits for what it stops; only SIGKILLed leftovers may need a moment to go.
deadline = time.monotonic() + 3
while alive() and time.monotonic() < deadline:
    time.sleep(0.05)
left = alive()
for entry in left:
    try:
        os.kill(int(entry.split()[0]), signal.SIGKILL)
    except ProcessLookupError:
        pass
print(json.dumps({"rc": rc, "stdout": "".join(out), "stderr": err, "left": left,
                  "elapsed": elapsed, "sent": sent}))
"""


def _run_demo(*args, interrupt=None, user=None, python=sys.executable, env=None, timeout=180):
    if env is None:
        env = dict(os.environ)
    spec = {"argv": [python, "-m", "sshpump", "demo", *args], "env": env, "interrupt": interrupt,
            "cwd": "/" if user is not None else REPO_ROOT}
    if user is not None:
        spec.update(user=user, group=user)
    r = subprocess.run([sys.executable, "-c", _REAPER, json.dumps(spec)], capture_output=True,
                       text=True, timeout=timeout)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.splitlines()[-1])


def _tmpdir_of(res) -> str:
    m = re.search(r"in (/\S+/sshpump-demo-\w+) \(removed at exit\)", res["stdout"])
    assert m, res["stdout"] + res["stderr"]
    return m.group(1)


def _assert_clean(res):
    where = _tmpdir_of(res)
    assert not os.path.exists(where), f"{where} survived the demo"
    assert res["left"] == [], f"processes survived the demo: {res['left']}"
    assert "Traceback" not in res["stderr"] + res["stdout"], res["stderr"]


def _assert_complete(res, ssh=True):
    out = res["stdout"]
    assert res["rc"] == 0, out + res["stderr"]
    assert "every sha256 matches" in out, out
    for label in ("upload", "download"):
        assert re.search(rf"sshpump {label}: .*\n +[\d,.]+ MB/s in [\d.]+s, sha256 match", out), out
        if ssh:
            assert re.search(rf"ssh -L {label}: .*\n +[\d,.]+ MB/s in [\d.]+s, sha256 match", out), out
    assert re.search(r"\nsshpump +[\d,.]+ +[\d,.]+ +[\d,]+ +match/match", out), out
    if ssh:
        assert re.search(r"\nssh -L +[\d,.]+ +[\d,.]+ +[\d,]+ +match/match", out), out
        assert re.search(r"\nsshpump/ssh +[\d.]+x +[\d.]+x +[\d.]+x", out), out
    else:
        assert "ssh -L" not in out and "sshpump/ssh" not in out, out
    assert "every one echoed" in out, out
    assert "Cleaned up:" in out, out


def _need_openssh():
    for p in ("/usr/sbin/sshd", "/usr/bin/ssh", "/usr/bin/ssh-keygen"):
        if not os.path.exists(p):
            pytest.skip(f"{p} not installed; run scripts/install-system-deps.sh")


def test_demo_quick_runs_both_tunnels_and_cleans_up():
    _need_openssh()
    res = _run_demo("--quick")
    _assert_complete(res)
    _assert_clean(res)
    assert res["elapsed"] < 60, res["elapsed"]


def test_demo_no_ssh_and_sizes():
    _need_openssh()
    res = _run_demo("--no-ssh", "--size", "4", "--conns", "50", "--parallel", "4")
    _assert_complete(res, ssh=False)
    assert "Pushing 4 MiB up and 4 MiB down" in res["stdout"]
    assert "then 50 connections" in res["stdout"] and "4 at a time" in res["stdout"]
    _assert_clean(res)


@pytest.mark.parametrize("when", ["  sshd ", "upload: "], ids=["during-setup", "mid-transfer"])
def test_demo_sigint_cleans_up(when):
    """Ctrl-C (SIGINT to the demo alone, as its children run in sessions of
    their own): exit 130, one line, no traceback, nothing left behind."""
    _need_openssh()
    res = _run_demo("--quick", interrupt=when)
    assert res["sent"] is not None, res["stdout"]
    assert res["rc"] in (130, 1), res
    assert "interrupted; stopping everything" in res["stderr"], res["stderr"]
    assert "Cleaned up:" in res["stderr"], res["stderr"]
    assert "every sha256 matches" not in res["stdout"], "the run finished before the SIGINT"
    _assert_clean(res)


def test_demo_usage_error():
    r = subprocess.run([sys.executable, "-m", "sshpump", "demo", "--size", "0"], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 2 and "must be at least 1" in r.stderr, r.stderr


# ------------------------------------------------------------- unprivileged
_DEPS = ("ssh2", "uvloop", "cffi", "_cffi_backend", "pycparser", "rich", "markdown_it", "mdurl",
         "pygments", "prometheus_client")


@pytest.fixture(scope="module")
def nobody_python():
    """(python, PYTHONPATH) with which uid 65534 can run sshpump: our Python
    may live under root's 0700 home, so try it, then /usr/bin/python3 of the
    same version with copies of sshpump and its dependencies in a
    world-readable temp dir.  Skip if neither works."""
    if os.getuid() != 0:
        pytest.skip("needs root to run the demo as another user")
    probe = "import sshpump, ssh2, uvloop, rich"
    made = None

    def works(exe, path):
        env = {"PATH": os.environ.get("PATH", ""), "PYTHONPATH": path}
        try:
            subprocess.run([exe, "-c", probe], user=65534, group=65534, extra_groups=[], env=env,
                           check=True, timeout=60, capture_output=True, cwd="/")
        except (OSError, subprocess.SubprocessError):
            return False
        return True

    try:
        pkg_parent = os.path.dirname(os.path.dirname(os.path.abspath(sshpump.__file__)))
        if works(sys.executable, pkg_parent):
            yield sys.executable, pkg_parent
            return
        exe = "/usr/bin/python3"
        r = subprocess.run([exe, "-c", "import sys; print(sys.version_info[:2])"], capture_output=True,
                           text=True) if os.path.exists(exe) else None
        if r is None or r.stdout.strip() != str(tuple(sys.version_info[:2])):
            pytest.skip("no Python that uid 65534 may run with sshpump's dependencies")
        made = tempfile.mkdtemp(prefix="sshpump-nobody-site-")
        os.chmod(made, 0o755)
        import importlib
        roots = {os.path.dirname(os.path.abspath(sshpump.__file__))}
        for name in _DEPS:
            try:
                mod = importlib.import_module(name)
            except ImportError:
                continue
            f = os.path.abspath(mod.__file__)
            roots.add(os.path.dirname(f) if os.path.basename(f) == "__init__.py" else f)
        for root in list(roots):
            site = os.path.dirname(root)
            for d in os.listdir(site):       # auditwheel's bundled libraries (ssh2_python.libs, ...)
                if d.endswith(".libs") and d.split(".")[0].split("_")[0] in ("ssh2", "cffi", "uvloop"):
                    roots.add(os.path.join(site, d))
        for root in roots:
            dst = os.path.join(made, os.path.basename(root))
            if os.path.isdir(root):
                shutil.copytree(root, dst, ignore=shutil.ignore_patterns("__pycache__"), dirs_exist_ok=True)
            else:
                shutil.copy2(root, dst)
        subprocess.run(["chmod", "-R", "a+rX", made], check=True)
        if not works(exe, made):
            pytest.skip("no Python that uid 65534 may run with sshpump's dependencies")
        yield exe, made
    finally:
        if made:
            shutil.rmtree(made, ignore_errors=True)


def test_demo_as_unprivileged_user(nobody_python):
    """As uid 65534: sshd runs as that user with its own host keys (no root
    needed); ``nobody`` is a locked account, so the demo turns UsePAM on."""
    _need_openssh()
    exe, path = nobody_python
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "HOME")}
    env.update(PYTHONPATH=path, HOME="/tmp")
    res = _run_demo("--quick", user=65534, python=exe, env=env)
    _assert_complete(res)
    assert "running as nobody" in res["stdout"], res["stdout"]
    _assert_clean(res)
