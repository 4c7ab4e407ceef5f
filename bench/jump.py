"""``python -m bench.jump [--bulk-mib 256] [--pg-seconds 8]``: forwarding
through one jump host, sshpump (-J as ProxyJump: the jump session's
direct-tcpip channel carried by its own pump, in the same process) against
OpenSSH's ``ssh -N -L ... -J ...`` (two ssh processes: the second is the
jump's ``ssh -W``).

Two test-bed sshds on loopback, the jump and the target, both taking one
client key; the same cipher (aes128-gcm) on both hops for every contender.
Workloads, one after another per contender, one run each: bulk upload and
download of --bulk-mib through the target to the bench's sink/source
servers (checksummed), and ``pgbench -S -C -c 16 -j 2`` (a new connection,
so a new channel through both hops, per transaction) against PostgreSQL.
The contenders are started side by side (idle while the others run).
sshpump runs from whatever ``import sshpump`` finds (the results name it).
Must run as root (sshd, PostgreSQL). Writes
bench/results/<stamp>-jump.{json,md}.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

from testbed._util import free_port, wait_listening

from . import procstat
from . import workloads as W
from .contenders import CIPHER, _env, _read_line, _stop

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MiB = 1 << 20


class Setup:
    """The two sshds, the bench's target servers and PostgreSQL; one key and
    one known_hosts file for both hops; an ssh config that says so."""

    def __init__(self, stack: contextlib.ExitStack):
        from testbed.postgres import Postgres
        from testbed.sshd import Sshd

        self.jump = stack.enter_context(Sshd())
        self.target = stack.enter_context(Sshd())
        # The jump takes the target's client key too, so that one key serves
        # both hops for every contender (ssh -J passes -F, not -i, to the
        # jump's ssh -W).
        with open(self.jump.authorized_keys, "a") as f, open(self.target.client_key + ".pub") as pub:
            f.write(pub.read())
        self.dir = tempfile.mkdtemp(prefix="sshpump-bench-jump-")
        stack.callback(shutil.rmtree, self.dir, True)
        self.key = self.target.client_key
        self.known_hosts = os.path.join(self.dir, "known_hosts")
        with open(self.known_hosts, "w") as out:
            for s in (self.jump, self.target):
                with open(s.known_hosts) as f:
                    out.write(f.read())
        self.ssh_config = os.path.join(self.dir, "ssh_config")
        with open(self.ssh_config, "w") as f:
            f.write("Host *\n" + "".join(f"  {k} {v}\n" for k, v in (
                ("IdentityFile", self.key), ("IdentitiesOnly", "yes"), ("IdentityAgent", "none"),
                ("UserKnownHostsFile", self.known_hosts), ("GlobalKnownHostsFile", "/dev/null"),
                ("StrictHostKeyChecking", "yes"), ("BatchMode", "yes"), ("Ciphers", CIPHER),
                ("ServerAliveInterval", "0"))))
        srv = subprocess.Popen([sys.executable, "-m", "bench.servers"], stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, cwd=REPO, env=_env())
        stack.callback(lambda: (srv.stdin.close(), srv.wait(10)))
        info = _read_line(srv.stdout.fileno(), 30, srv, "bench.servers")
        self.pg = stack.enter_context(Postgres())
        self.pg.init_pgbench()
        # sink, source, PostgreSQL: what each contender forwards, in this order
        self.targets = [tuple(info["sink"]), tuple(info["source"]), (self.pg.host, self.pg.port)]
        self.hop = f"{self.jump.user}@127.0.0.1:{self.jump.port}"
        self.dest = f"{self.target.user}@127.0.0.1"


class Running:
    def __init__(self, name, proc, ports, command):
        self.name, self.proc, self.command = name, proc, command
        self.addrs = [("127.0.0.1", p) for p in ports]

    def addr(self, target_i, _k=0):
        return self.addrs[target_i]

    def pids(self):
        return procstat.tree([self.proc.pid])


@contextlib.contextmanager
def openssh(setup: Setup):
    ports = [free_port() for _ in setup.targets]
    argv = ["ssh", "-F", setup.ssh_config, "-N", "-o", "ExitOnForwardFailure=yes"]
    for lp, (h, p) in zip(ports, setup.targets):
        argv += ["-L", f"127.0.0.1:{lp}:{h}:{p}"]
    argv += ["-J", setup.hop, "-p", str(setup.target.port), setup.dest]
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, start_new_session=True)
    try:
        for lp in ports:
            wait_listening("127.0.0.1", lp, 20, proc=proc)
        yield Running("ssh -J", proc, ports, " ".join(argv))
    finally:
        _stop(proc)


_CHILD = """
import json, signal, sys, sshpump
a = json.loads(sys.argv[1])
t = sshpump.forward(a["dest"], *a["specs"], **a["kw"])
print(json.dumps({"listen": [f.address for f in t.forwards], "sshpump": sshpump.__file__}), flush=True)
signal.sigwait([signal.SIGTERM, signal.SIGINT])
t.close()
"""


@contextlib.contextmanager
def sshpump_run(setup: Setup, workers: int):
    specs = [f"127.0.0.1:0:{h}:{p}" for h, p in setup.targets]
    kw = dict(port=setup.target.port, identity=setup.key, known_hosts=setup.known_hosts, ciphers=CIPHER,
              proxy_jump=[setup.hop], workers=workers, identities_only=True, use_agent=False,
              strict_host_key_checking="yes")
    arg = json.dumps({"dest": setup.dest, "specs": specs, "kw": kw})
    proc = subprocess.Popen([sys.executable, "-c", _CHILD, arg], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            start_new_session=True, env=_env())
    try:
        info = _read_line(proc.stdout.fileno(), 30, proc, f"sshpump w{workers}")
        run = Running(f"sshpump w{workers}", proc, [a[1] for a in info["listen"]],
                      f"sshpump.forward({setup.dest!r}, *{specs!r}, **{kw!r})")
        run.imported = info["sshpump"]
        yield run
    finally:
        _stop(proc)


def measure(run: Running, setup: Setup, bulk: int, pg_seconds: int) -> dict:
    out = {}
    for key, direction, i in (("up", "up", 0), ("down", "down", 1)):
        out[key] = W.run_bulk(run, i, bulk, direction)
    out["pgbench_C_c16"] = W.run_pgbench(run, 2, setup.pg, ["-C", "-c", "16", "-j", "2"], pg_seconds)
    return out


TITLES = {"up": "bulk upload {mib} MiB, 1 stream (MB/s)", "down": "bulk download {mib} MiB, 1 stream (MB/s)",
          "pgbench_C_c16": "pgbench -S -C -c 16 -j 2 -T {pg} (TPS)"}


def report(results: dict, args, argv_text: str, commands: dict, imported: str) -> str:
    names = list(results)
    base = "ssh -J"
    lines = [f"# Through one jump host: sshpump vs ssh -J, {time.strftime('%Y-%m-%dT%H:%M:%S%z')}", "",
             f"`{argv_text}`; {os.cpu_count()} CPUs, cipher {CIPHER} on both hops, one run per cell. "
             f"sshpump imported from `{imported}`.", "",
             "| workload | " + " | ".join(names) + " | " + " | ".join(f"{n} / {base}" for n in names if n != base) + " |",
             "|---" * (len(names) * 2) + "|"]
    for key, title in TITLES.items():
        vals = {n: results[n][key]["value"] for n in names}
        cells = [f"{vals[n]:.0f}" if vals[n] >= 100 else f"{vals[n]:.1f}" for n in names]
        ratios = [f"{vals[n] / vals[base]:.2f}" for n in names if n != base]
        lines.append(f"| {title.format(mib=args.bulk_mib, pg=args.pg_seconds)} | " + " | ".join(cells + ratios) + " |")
    cpu = ["", "Client-side CPU seconds per GB of bulk (all the contender's processes):", "",
           "| contender | up | down |", "|---|---|---|"]
    for n in names:
        cpu.append(f"| {n} | {results[n]['up'].get('cpu_s_per_gb', 0):.2f} | "
                   f"{results[n]['down'].get('cpu_s_per_gb', 0):.2f} |")
    cmds = ["", "Commands:", ""] + [f"- {n}: `{c}`" for n, c in commands.items()]
    return "\n".join(lines + cpu + cmds) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.jump", description=__doc__.split("\n\n")[0])
    ap.add_argument("--bulk-mib", type=int, default=256)
    ap.add_argument("--pg-seconds", type=int, default=8)
    ap.add_argument("--out", default=os.path.join(REPO, "bench", "results"))
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("python -m bench.jump must run as root (sshd, PostgreSQL)", file=sys.stderr)
        return 2
    argv_text = "python -m bench.jump " + " ".join(sys.argv[1:] if argv is None else argv)
    bulk = args.bulk_mib * MiB
    results, commands, imported = {}, {}, "?"
    with contextlib.ExitStack() as stack:
        setup = Setup(stack)
        runs = [stack.enter_context(openssh(setup)),
                stack.enter_context(sshpump_run(setup, 0)),
                stack.enter_context(sshpump_run(setup, 2))]
        for run in runs:
            print(f"measuring {run.name} ...", file=sys.stderr, flush=True)
            results[run.name] = measure(run, setup, bulk, args.pg_seconds)
            commands[run.name] = run.command
            imported = getattr(run, "imported", imported)
    text = report(results, args, argv_text, commands, imported)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, f"{stamp}-jump.md"), "w") as f:
        f.write(text)
    with open(os.path.join(args.out, f"{stamp}-jump.json"), "w") as f:
        json.dump({"command": argv_text, "cipher": CIPHER, "cpus": os.cpu_count(), "sshpump": imported,
                   "commands": commands, "results": results}, f, indent=1)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
