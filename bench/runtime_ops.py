"""``python -m bench.runtime_ops [--reps 50]``: how long changing a running
sshpump takes -- adding a forward (listening when the call returns) and
removing one -- through the library API and through the control socket
(``sshpump ctl``'s request, one connection per command), with 0 and 2 workers.

Measured against the test bed's sshd, with an echo target; each added
forward is used once (a round trip) before it is removed, outside the timing.
Must run as root (the test bed's sshd). Writes
bench/results/<stamp>-runtime-ops.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time

from testbed.sshd import Sshd
from testbed.targets import Targets

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _roundtrip(addr):
    with socket.create_connection(tuple(addr[:2]), timeout=10) as s:
        s.sendall(b"ping")
        s.shutdown(socket.SHUT_WR)
        got = b""
        while len(got) < 4:
            chunk = s.recv(100)
            if not chunk:
                break
            got += chunk
    if got != b"ping":
        raise RuntimeError(f"echo through the added forward gave {got!r}")


def _summary(samples_ms):
    s = sorted(samples_ms)
    return {"median_ms": round(statistics.median(s), 3), "p90_ms": round(s[int(len(s) * 0.9) - 1], 3),
            "min_ms": round(s[0], 3), "max_ms": round(s[-1], 3), "n": len(s)}


def _library(sshd, echo, workers, reps):
    import sshpump

    spec = f"0:{echo[0]}:{echo[1]}"
    add, remove = [], []
    with sshpump.forward(f"{sshd.user}@{sshd.host}", spec, port=sshd.port, identity=sshd.client_key,
                         known_hosts=sshd.known_hosts, identities_only=True, use_agent=False,
                         workers=workers) as t:
        for _ in range(reps):
            t0 = time.perf_counter()
            fwd = t.add(spec)
            add.append((time.perf_counter() - t0) * 1000)
            _roundtrip(fwd.address)
            t0 = time.perf_counter()
            t.remove(fwd)
            remove.append((time.perf_counter() - t0) * 1000)
    return {"add": _summary(add), "remove": _summary(remove)}


def _control(sshd, echo, workers, reps):
    from sshpump.control.client import request

    spec = f"0:{echo[0]}:{echo[1]}"
    ctl = os.path.join(tempfile.mkdtemp(prefix="sshpump-bench-"), "ctl.sock")
    r, w = os.pipe()
    proc = subprocess.Popen(
        [sys.executable, "-m", "sshpump", "--ready-fd", str(w), "--control", ctl, "--workers", str(workers),
         "-p", str(sshd.port), "-i", sshd.client_key, "-o", f"UserKnownHostsFile={sshd.known_hosts}",
         "-o", "IdentitiesOnly=yes", "-L", spec, f"{sshd.user}@{sshd.host}"],
        pass_fds=[w], stdin=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=REPO)
    os.close(w)
    try:
        with os.fdopen(r) as f:
            json.loads(f.readline())
        add, remove = [], []
        for _ in range(reps):
            t0 = time.perf_counter()
            fwd = request(ctl, "add", {"spec": spec})
            add.append((time.perf_counter() - t0) * 1000)
            _roundtrip(fwd["listen"][0])
            t0 = time.perf_counter()
            request(ctl, "remove", {"forward": fwd["id"]})
            remove.append((time.perf_counter() - t0) * 1000)
        return {"add": _summary(add), "remove": _summary(remove)}
    finally:
        proc.terminate()
        proc.wait(30)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.runtime_ops", description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--out", default=os.path.join(REPO, "bench", "results"))
    args = ap.parse_args(argv)
    reps = max(1, min(args.reps, 1000))
    rows = []
    with Sshd() as sshd, Targets() as targets:
        echo = targets.tcp["echo"]
        for workers in (0, 2):
            rows.append(("library", workers, _library(sshd, echo, workers, reps)))
            rows.append(("control socket", workers, _control(sshd, echo, workers, reps)))
    stamp = time.strftime("%Y%m%d-%H%M%S")
    os.makedirs(args.out, exist_ok=True)
    lines = [f"# sshpump: changing a running tunnel, {time.strftime('%Y-%m-%dT%H:%M:%S%z')}", "",
             f"`python -m bench.runtime_ops --reps {reps}`; {os.cpu_count()} CPUs. Times in ms, "
             "median (p90, min-max); an added forward is listening when the call returns.", "",
             "| via | workers | add | remove |", "|---|---|---|---|"]
    for via, workers, r in rows:
        cell = lambda s: f"{s['median_ms']:.2f} ({s['p90_ms']:.2f}, {s['min_ms']:.2f}-{s['max_ms']:.2f})"  # noqa: E731
        lines.append(f"| {via} | {workers} | {cell(r['add'])} | {cell(r['remove'])} |")
    text = "\n".join(lines) + "\n"
    with open(os.path.join(args.out, f"{stamp}-runtime-ops.md"), "w") as f:
        f.write(text)
    with open(os.path.join(args.out, f"{stamp}-runtime-ops.json"), "w") as f:
        json.dump([{"via": v, "workers": w, **r} for v, w, r in rows], f, indent=1)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
