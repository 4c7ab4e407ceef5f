"""Issue 11's rows: the multiplexed plane (--mux) beside channel-per-connection
and ``ssh -L``, against one sshd, contenders interleaved per repetition.

``python -m bench.mux [--reps N] [--ramp 10000] [--bulk-mib 512] [--out DIR]``
(as root; it starts its own sshd and target servers). Rows:

* connect + 1 round trip + close, 16 at a time (churn): conn/s
* a ramp of held connections: opens/s for each block of 1,000 (one 8-byte
  round trip per connection, 64 opening at a time), and the round trip of
  one active connection while N are held (median of 50)
* bulk upload and download, 1 stream: MB/s

Writes ``bench/results/<timestamp>-mux.{json,md}``; the md names the command.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import types

from . import contenders as C
from . import workloads as W
from .runner import machine_info, raise_nofile

MiB = 1 << 20


class MuxSshpump(C.Sshpump):
    """sshpump --workers 0 --mux: every connection a stream of one channel."""

    def argv(self, env, targets):
        a = super().argv(env, targets)
        return a[:3] + ["--mux"] + a[3:]


class PoolSshpump(C.Sshpump):
    """sshpump --workers 0 --sessions-per-worker K: K sessions in one
    process, a channel per connection (K opens in flight, lists n/K long)."""

    def __init__(self, k: int):
        super().__init__(0, f"pool{k}", f"sshpump --workers 0 --sessions-per-worker {k}: {k} sessions in one "
                                        "process, a channel per connection")
        self.k = k

    def argv(self, env, targets):
        a = super().argv(env, targets)
        return a[:3] + ["--sessions-per-worker", str(self.k)] + a[3:]


def contenders():
    return [
        C.Sshpump(0, "channel", "sshpump --workers 0: one session, a channel per connection"),
        PoolSshpump(4),
        MuxSshpump(0, "mux", "sshpump --workers 0 --mux: one session, every connection a stream of one "
                             "exec channel to the remote agent"),
        C.OpenSSH(),
    ]


def run_ramp(run, target_i: int, total: int, step: int) -> dict:
    """Open ``total`` connections in blocks of ``step`` and hold them: opens/s
    per block, and one extra connection's round trip after each block."""
    async def main():
        sem = asyncio.Semaphore(64)
        held = []

        async def one(k):
            async with sem:
                r, w = await W._open(run.addr(target_i, 0))
                held.append(w)
                w.write(b"12345678")
                await asyncio.wait_for(r.readexactly(8), 60)

        rates, rtts = [], []
        try:
            r0, w0 = await W._open(run.addr(target_i, 0))
            for start in range(0, total, step):
                t0 = time.perf_counter()
                await asyncio.gather(*[one(k) for k in range(start, start + step)])
                rates.append(step / (time.perf_counter() - t0))
                lat = []
                for _ in range(50):
                    t1 = time.perf_counter()
                    w0.write(b"x" * 64)
                    await asyncio.wait_for(r0.readexactly(64), 30)
                    lat.append(time.perf_counter() - t1)
                rtts.append(statistics.median(lat) * 1e3)
            w0.close()
        finally:
            for w in held:
                w.close()
            await asyncio.sleep(1.0)
        return {"value": rates[-1] / rates[0], "opens_per_s": rates, "rtt_ms": rtts}

    return W._arun(main())


ROWS = [
    ("churn_c16", "connect + 1 round trip + close, 16 at a time (4 s)", "conn/s",
     lambda run, a: W.run_churn(run, 0, 16, 4.0)),
    ("ramp", "held connections ramp: opens/s at the last block / at the first", "ratio",
     lambda run, a: run_ramp(run, 0, a.ramp, 1000)),
    ("up", "bulk upload, 1 stream", "MB/s", lambda run, a: W.run_bulk(run, 1, a.bulk_mib * MiB, "up")),
    ("down", "bulk download, 1 stream", "MB/s", lambda run, a: W.run_bulk(run, 2, a.bulk_mib * MiB, "down")),
]


def _fmt(v):
    return f"{v:,.0f}" if abs(v) >= 100 else f"{v:.3g}"


def _med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def markdown(result, command) -> str:
    names = list(result["contenders"])
    pairs = [(x, y) for x in ("mux", "pool4") for y in ("channel", "ssh -L") if x in names and y in names]
    out = [f"# --mux rows ({result['timestamp']})", "", f"Command: `{command}`", "",
           f"Machine: {result['machine']['nproc']} CPUs ({result['machine']['cpu_model']}), loopback, "
           f"{result['versions']['openssh']}; cipher {C.CIPHER}; {result['reps']} repetitions, contenders "
           "interleaved (order reversed on odd repetitions); median (min-max).", "",
           "| row | unit | " + " | ".join(names) + " | " + " | ".join(f"{x} / {y}" for x, y in pairs) + " |",
           "|---|---|" + "---|" * (len(names) + len(pairs))]
    for key, title, unit, _fn in ROWS:
        row = result["rows"].get(key)
        if not row:
            continue
        cells, meds = [], {}
        for n in names:
            vals = [r.get("value") for r in row.get(n, []) if r.get("value") is not None]
            meds[n] = _med(vals)
            cells.append(f"{_fmt(meds[n])} ({_fmt(min(vals))}–{_fmt(max(vals))})" if vals else "error")

        def ratio(a, b):
            return f"{meds[a] / meds[b]:.2f}x" if meds.get(a) and meds.get(b) else "-"
        out.append(f"| {title} | {unit} | " + " | ".join(cells) + " | "
                   + " | ".join(ratio(x, y) for x, y in pairs) + " |")
    ramp = result["rows"].get("ramp")
    if ramp:
        out += ["", "Ramp detail (first repetition): opens/s per block of 1,000 held connections, and one "
                "active connection's round trip (ms, median of 50) after each block.", ""]
        for n in names:
            reps = [r for r in ramp.get(n, []) if "opens_per_s" in r]
            if reps:
                r = reps[0]
                out.append(f"- {n}: opens/s " + ", ".join(f"{x:,.0f}" for x in r["opens_per_s"])
                           + "; rtt ms " + ", ".join(f"{x:.2f}" for x in r["rtt_ms"]))
            else:
                errs = [r.get("error") for r in ramp.get(n, [])]
                out.append(f"- {n}: {errs[:1]}")
    return "\n".join(out) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m bench.mux")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--ramp", type=int, default=10000)
    ap.add_argument("--bulk-mib", type=int, default=512)
    ap.add_argument("--rows", default=",".join(k for k, *_ in ROWS))
    ap.add_argument("--out", default=os.path.join(C.REPO, "bench", "results"))
    ap.add_argument("--report", metavar="JSON", help="only write the .md of an earlier run's .json")
    a = ap.parse_args(argv)
    if a.report:
        with open(a.report) as f:
            result = json.load(f)
        with open(a.report[:-len(".json")] + ".md", "w") as f:
            f.write(markdown(result, result["command"]))
        return 0
    command = "python -m bench.mux " + " ".join(argv if argv is not None else sys.argv[1:])
    raise_nofile()
    logdir = tempfile.mkdtemp(prefix="sshpump-bench-mux-")
    result = {"timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **machine_info(), "reps": a.reps,
              "command": command, "contenders": {}, "rows": {}}
    from testbed.sshd import Sshd
    with contextlib.ExitStack() as stack:
        sshd = stack.enter_context(Sshd(extra_config={"MaxSessions": "100"}))
        srv = subprocess.Popen([sys.executable, "-m", "bench.servers"], stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, cwd=C.REPO, env=C._env())
        stack.callback(lambda: (srv.stdin.close(), srv.wait(10)))
        info = C._read_line(srv.stdout.fileno(), 30, srv, "bench.servers")
        targets = [tuple(info["echo"]), tuple(info["sink"]), tuple(info["source"])]
        env = types.SimpleNamespace(sshd=sshd, pg=None, logdir=logdir)
        running = {}
        for c in contenders():
            running[c.name] = stack.enter_context(c.start(env, targets))
            result["contenders"][c.name] = c.desc
        order = list(running)
        for key, title, unit, fn in ROWS:
            if key not in a.rows.split(","):
                continue
            row = result["rows"][key] = {n: [] for n in order}
            for rep in range(a.reps):
                for name in (order if rep % 2 == 0 else order[::-1]):
                    try:
                        r = fn(running[name], a)
                    except Exception as e:  # noqa: BLE001 - recorded in the results
                        r = {"value": None, "error": f"{type(e).__name__}: {e}"}
                    row[name].append(r)
                    v = r.get("value")
                    print(f"{key:10s} rep {rep + 1} {name:8s} "
                          f"{'ERROR ' + r['error'] if v is None else f'{v:,.3f} {unit}'}", file=sys.stderr,
                          flush=True)
                    time.sleep(0.5)
    os.makedirs(a.out, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    base = os.path.join(a.out, f"{stamp}-mux")
    with open(base + ".json", "w") as f:
        json.dump(result, f, indent=1)
    with open(base + ".md", "w") as f:
        f.write(markdown(result, command))
    print(base + ".md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
