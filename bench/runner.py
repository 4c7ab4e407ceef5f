"""Orchestration: start the test bed and every contender, run each workload
with contenders interleaved (forward order on even repetitions, reversed on
odd ones), and collect per-repetition values."""
from __future__ import annotations

import contextlib
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
import traceback
import types

from . import contenders as C
from . import libssh2, report, suite

REPO = C.REPO


def raise_nofile(want: int = 1 << 20) -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    for lim in (want, 262144, 65536, hard):
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (max(lim, soft), max(lim, hard)))
            break
        except (ValueError, OSError):
            continue
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def _version(mod):
    try:
        from importlib.metadata import version
        return version(mod)
    except Exception:
        return None


def machine_info() -> dict:
    cpu = None
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    ssh_v = subprocess.run(["ssh", "-V"], capture_output=True, text=True).stderr.strip()
    return {
        "machine": {"nproc": os.cpu_count(), "cpu_model": cpu, "kernel": platform.release(),
                    "platform": platform.platform()},
        "versions": {"openssh": ssh_v, "python": sys.version.split()[0],
                     "ssh2-python": _version("ssh2-python"), "asyncssh": _version("asyncssh"),
                     "sshtunnel": _version("sshtunnel"), "paramiko": _version("paramiko"),
                     "sshpump": _version("sshpump"), "uvloop": _version("uvloop")},
    }


class Progress:
    def __init__(self, total, quiet=False):
        self.quiet = quiet
        self.rich = None
        if not quiet:
            try:
                from rich.progress import (BarColumn, MofNCompleteColumn, Progress as RP,
                                           TextColumn, TimeElapsedColumn)
                if sys.stderr.isatty():
                    self.rich = RP(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                   TimeElapsedColumn(), transient=False)
                    self.rich.start()
                    self.task = self.rich.add_task("bench", total=total)
            except ImportError:
                pass
        self.n, self.total = 0, total

    def step(self, desc):
        if self.rich is not None:
            self.rich.update(self.task, description=desc)
        elif not self.quiet:
            print(f"[{self.n + 1}/{self.total}] {desc}", file=sys.stderr, flush=True)

    def done(self, msg=None):
        self.n += 1
        if self.rich is not None:
            self.rich.advance(self.task)
            if msg:
                self.rich.console.print(msg)
        elif msg and not self.quiet:
            print("   " + msg, file=sys.stderr, flush=True)

    def log(self, msg):
        if self.quiet:
            return
        if self.rich is not None:
            self.rich.console.print(msg)
        else:
            print(msg, file=sys.stderr, flush=True)

    def close(self):
        if self.rich is not None:
            self.rich.stop()


def _fmt(v, unit):
    if v is None:
        return "-"
    return f"{v:,.0f} {unit}" if abs(v) >= 100 else f"{v:.3g} {unit}"


def _check_libssh2(name, ent, run, warnings, prog):
    """Log which libssh2 the contender runs on; a mismatch is a warning even with -q."""
    for w in libssh2.verify(name, ent, run.pids()):
        warnings.append(w)
        print(f"bench: WARNING: {w}", file=sys.stderr, flush=True)
    lib = ent.get("libssh2")
    if lib:
        prog.log(f"    {name}: libssh2 {libssh2.describe(ent, {})}; sshpump from {os.path.dirname(lib['module'])}")


def run_suite(mode: str = "quick", outdir: str | None = None, only: list[str] | None = None,
              workload_filter: list[str] | None = None, quiet: bool = False) -> str:
    """Run a suite; return the path of the results JSON."""
    t_start = time.time()
    outdir = outdir or os.path.join(REPO, "bench", "results")
    os.makedirs(outdir, exist_ok=True)
    nofile = raise_nofile()
    workloads, cfg = suite.build(mode)
    if workload_filter:
        workloads = [w for w in workloads if w.key in workload_filter]
    contenders = C.all_contenders(cfg["spc_sessions"])
    if only:
        contenders += C.extra_contenders()
        contenders = [c for c in contenders if c.name in only or c.name.replace(" ", "-") in only]
    need_pg = cfg["pg"] and any(w.needs_pg for w in workloads)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    logdir = tempfile.mkdtemp(prefix="sshpump-bench-")
    result = {"suite": mode, "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **machine_info(),
              "cipher": C.CIPHER, "repetitions": cfg["reps"], "rlimit_nofile": nofile,
              "method": "contenders run side by side against one sshd; per workload and repetition "
                        "the contenders run one after another (order reversed on odd repetitions); "
                        "ratios are taken pair by pair within a repetition, then summarised "
                        "(median, min-max).",
              "contenders": {}, "workloads": {}, "warnings": [], "logdir": logdir}
    from testbed.sshd import Sshd
    with contextlib.ExitStack() as stack:
        prog = Progress(1, quiet)
        stack.callback(prog.close)
        prog.log(f"bench {mode}: starting sshd, target servers" + (", PostgreSQL" if need_pg else ""))
        sshd = stack.enter_context(Sshd())
        result["versions"]["openssh_server"] = sshd.version
        srv = subprocess.Popen([sys.executable, "-m", "bench.servers"], stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, cwd=REPO, env=C._env())
        stack.callback(lambda: (srv.stdin.close(), srv.wait(10)))
        info = C._read_line(srv.stdout.fileno(), 30, srv, "bench.servers")
        targets = [tuple(info["echo"]), tuple(info["sink"]), tuple(info["source"])]
        pg = None
        if need_pg:
            try:
                from testbed.postgres import Postgres
                pg = stack.enter_context(Postgres())
                pg.init_pgbench()
                targets.append((pg.host, pg.port))
                result["versions"]["postgres"] = "15"
            except Exception as e:
                result["pg_error"] = str(e)
                pg = None
        env = types.SimpleNamespace(sshd=sshd, pg=pg, logdir=logdir)

        running = {}
        for c in contenders:
            ent = {"description": c.desc}
            reason = c.skip_reason()
            if reason is None:
                prog.log(f"  starting {c.name}")
                try:
                    run = running[c.name] = stack.enter_context(c.start(env, targets))
                except Exception as e:
                    reason = f"failed to start: {e}"
                else:
                    ent.update(status="ok", processes=len(run.procs), **run.info)
                    _check_libssh2(c.name, ent, run, result["warnings"], prog)
            if reason is not None:
                if c.ours:   # a missing row of ours would pass for a clean run
                    raise C.ContenderFailed(c.name, reason)
                ent["status"] = "skipped"
                ent["reason"] = reason
                prog.log(f"  skip {c.name}: {reason}")
            result["contenders"][c.name] = ent
        active = [c for c in contenders if c.name in running]

        steps = sum(cfg["reps"] * len(active) for _ in workloads)
        prog.total = steps
        if prog.rich is not None:
            prog.rich.update(prog.task, total=steps)
        for w in workloads:
            wres = {"title": w.title, "unit": w.unit, "higher_is_better": w.higher_is_better,
                    "group": w.group, **w.extra, "results": {}}
            result["workloads"][w.key] = wres
            skip = {}
            for c in contenders:
                if c.name not in running:
                    skip[c.name] = result["contenders"][c.name].get("reason", "skipped")
                elif w.needs_pg and pg is None:
                    skip[c.name] = "PostgreSQL unavailable: " + result.get("pg_error", "?")
                elif w.single_address and not c.single_address:
                    skip[c.name] = "needs one address per stream; the client (pgbench) takes one host:port"
                elif c.max_streams is not None and w.streams > c.max_streams:
                    skip[c.name] = f"{w.streams} concurrent connections > {c.max_streams} sessions started"
            for name, why in skip.items():
                wres["results"][name] = {"skipped": why}
            order = [c for c in active if c.name not in skip]
            for rep in range(cfg["reps"]):
                seq = order if rep % 2 == 0 else order[::-1]
                for c in seq:
                    prog.step(f"{w.key} rep {rep + 1}/{cfg['reps']} {c.name}")
                    run = running[c.name]
                    ent = wres["results"].setdefault(c.name, {"reps": []})
                    dead = run.dead()
                    if dead:
                        ent["reps"].append({"value": None, "error": f"contender died: {dead}"})
                        prog.done(f"  {w.key} {c.name}: DIED {dead[:200]}")
                        continue
                    t0 = time.perf_counter()
                    try:
                        r = w.fn(run, env)
                        r["wall_s"] = time.perf_counter() - t0
                        ent["reps"].append(r)
                        msg = f"  {w.key:14s} {c.name:12s} {_fmt(r.get('value'), w.unit)}"
                    except Exception as e:
                        ent["reps"].append({"value": None, "error": f"{type(e).__name__}: {e}",
                                            "wall_s": time.perf_counter() - t0})
                        msg = f"  {w.key:14s} {c.name:12s} ERROR {type(e).__name__}: {str(e)[:200]}"
                        if os.environ.get("BENCH_DEBUG"):
                            traceback.print_exc()
                    prog.done(msg)
                    time.sleep(0.1 if w.group != "idle" else 0.5)
            report.summarise(wres, cfg["reps"])
        # capture late deaths / stderr for the record
        for name, run in running.items():
            d = run.dead()
            if d:
                result["contenders"][name]["died"] = d
    result["elapsed_s"] = time.time() - t_start
    return report.write_all(result, outdir, stamp, mode)
