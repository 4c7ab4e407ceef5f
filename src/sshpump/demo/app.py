"""``sshpump demo``: a first run that needs no bastion.

Starts a throwaway OpenSSH sshd on loopback (generated keys, a temporary
directory), a target server and two tunnels through that sshd -- sshpump
(the real CLI, as a child) and ``ssh -N -L`` -- then pushes a checksummed
upload and download and a burst of short connections through each, side
by side, and prints the rates and the ratio sshpump/ssh.  Every process and
the temporary directory go away at the end, on an error, on Ctrl-C
(exit 130) and on SIGTERM/SIGHUP (exit 143/129).
"""
from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys

from ..options import default_workers
from . import procs, workload
from .procs import CIPHER, DemoError
from .sshd import Sshd
from .sshtools import SSH, SSH_KEYGEN, SSHD
from .target import pattern_sha256
from .ui import MiB, Display, summary_table

QUICK_SIZE, QUICK_CONNS = 32, 400


class _Signalled(BaseException):
    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


_pending: list[BaseException] = []   # a stop signal, until it has stopped the run


def _on_stop_signal(signum, _frame):
    """Ctrl-C (KeyboardInterrupt), SIGTERM, SIGHUP: raised at once, and also
    kept, so that one raised where Python swallows it (a __del__, a
    callback: "Exception ignored in ...") still stops the run at its next
    line of output (Display's checkpoint)."""
    exc = KeyboardInterrupt() if signum == signal.SIGINT else _Signalled(signum)
    _pending.append(exc)
    raise exc


def _checkpoint():
    if _pending:
        raise _pending[0]


def _positive(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if v <= 0:
        raise argparse.ArgumentTypeError(f"must be at least 1: {text!r}")
    return v


def parse(argv) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="sshpump demo",
        description="Start a throwaway sshd on loopback (generated keys, temp dir), a target and a tunnel "
                    "through it; push a checksummed transfer and a burst of short connections through "
                    "sshpump and, side by side, through `ssh -N -L`; print the rates and ratios. "
                    "Cleans up everything, also on Ctrl-C.")
    p.add_argument("--size", type=_positive, metavar="MiB",
                   help=f"transfer size each way, in MiB (default 256; --quick: {QUICK_SIZE})")
    p.add_argument("--conns", type=_positive, metavar="N",
                   help=f"short connections in the burst (default 2000; --quick: {QUICK_CONNS})")
    p.add_argument("--parallel", type=_positive, default=16, metavar="N",
                   help="connections of the burst open at a time (default 16)")
    p.add_argument("--workers", type=int, default=None, metavar="N",
                   help=f"sshpump worker processes (default: sshpump's, {default_workers()} here)")
    p.add_argument("--quick", action="store_true", help="small sizes (a few seconds; for tests)")
    p.add_argument("--no-ssh", action="store_true", help="skip the `ssh -N -L` side")
    ns = p.parse_args(argv)
    ns.size = (ns.size or (QUICK_SIZE if ns.quick else 256)) * MiB
    ns.conns = ns.conns or (QUICK_CONNS if ns.quick else 2000)
    if ns.workers is not None and ns.workers < 0:
        p.error("--workers must be 0 or more")
    return ns


def _missing_programs(ssh: bool) -> list[str]:
    need = [SSHD, SSH_KEYGEN] + ([SSH] if ssh else [])
    return [p for p in need if not os.access(p, os.X_OK)]


def _specs_text(local: dict, target: dict) -> str:
    return " ".join(f"-L 127.0.0.1:{local[k]}:127.0.0.1:{target[k]}" for k in procs.TARGETS)


def _run(ns, out: Display, stack: contextlib.ExitStack, state: dict) -> int:
    sshd = Sshd(prefix="sshpump-demo-", parent_death_signal=signal.SIGTERM)
    state["tmpdir"] = sshd.tmpdir
    stack.callback(sshd.close)
    out.say(f"sshpump demo: everything runs on this machine, in {sshd.tmpdir} (removed at exit)")
    sshd.start()
    pam = "; UsePAM yes: sshd without PAM refuses a locked account" if sshd.use_pam else ""
    out.say(f"  sshd      {sshd.version} on 127.0.0.1:{sshd.port}, pid {sshd.pid}, running as "
            f"{sshd.user}; host and client keys generated (ed25519), login as {sshd.user} with the key{pam}")
    home = os.path.join(sshd.tmpdir, "home")
    os.mkdir(home, 0o700)
    env = procs.child_env(home)
    target, tports = procs.start_target(sshd.tmpdir, env)
    stack.callback(target.stop)
    out.say(f"  target    pid {target.pid}: echo on 127.0.0.1:{tports['echo']}, sink (answers the sha256 "
            f"it received) and source on 127.0.0.1:{tports['bulk']}")
    workers = default_workers() if ns.workers is None else ns.workers
    pump, pports = procs.start_sshpump(sshd, tports, sshd.tmpdir, env, workers)
    stack.callback(pump.stop)
    tunnels = [("sshpump", pports, pump)]
    out.say(f"  sshpump   pid {pump.pid}, {workers} workers: sshpump -p {sshd.port} -i KEY "
            f"{_specs_text(pports, tports)} {sshd.user}@127.0.0.1")
    if not ns.no_ssh:
        ssh, sports = procs.start_ssh(sshd, tports, sshd.tmpdir, env)
        stack.callback(ssh.stop)
        tunnels.append(("ssh -L", sports, ssh))
        out.say(f"  ssh -L    pid {ssh.pid}: ssh -N -p {sshd.port} -i KEY "
                f"{_specs_text(sports, tports)} {sshd.user}@127.0.0.1")
    out.say(f"  cipher    {CIPHER} for both" if len(tunnels) > 1 else f"  cipher    {CIPHER}")
    expected = pattern_sha256(ns.size)
    out.say(f"\nPushing {ns.size // MiB:,} MiB up and {ns.size // MiB:,} MiB down per tunnel "
            f"(sha256 {expected[:16]}...), then {ns.conns:,} connections "
            f"(connect, echo ~40 bytes, close), {ns.parallel} at a time:")
    steps = [("upload", "upload", ns.size,
              lambda p, adv: workload.upload(p["bulk"], ns.size, expected, adv)),
             ("download", "download", ns.size,
              lambda p, adv: workload.download(p["bulk"], ns.size, expected, adv)),
             ("connections", "connections", ns.conns,
              lambda p, adv: workload.burst(p["echo"], ns.conns, ns.parallel, adv))]
    results = {name: {} for name, _, _ in tunnels}
    with out:
        for what, label, total, fn in steps:
            for name, port, child in tunnels:
                step = out.step(f"{name} {label}", what, total)
                try:
                    res = fn(port, step.advance)
                except (OSError, EOFError) as e:
                    raise child.failed(f"failed during the {label} ({type(e).__name__}: {e})") from None
                step.finish(res)
                results[name][what] = res
    rows = [(name, results[name]) for name, _, _ in tunnels]
    out.say()
    out.console.print(summary_table(rows, ratio=len(rows) == 2))
    ok = all(r.ok for res in results.values() for r in res.values())
    out.say()
    transfers = [r for res in results.values() for k, r in res.items() if k != "connections"]
    if all(r.ok for r in transfers):
        out.say(f"Transfers: {len(transfers)} x {ns.size // MiB:,} MiB, every sha256 matches.")
    else:
        out.say("Transfers: sha256 MISMATCH: " + "; ".join(r.detail for r in transfers if not r.ok))
    bad = [f"{name}: {res['connections'].detail}" for name, res in results.items() if not res["connections"].ok]
    out.say(f"Connections: {ns.conns:,} per tunnel, "
            + ("every one echoed." if not bad else "FAILED: " + "; ".join(bad)))
    out.say(f"One run; sshd, the tunnels, the target and this client share this machine's "
            f"{os.cpu_count()} CPUs, so the figures move from run to run.")
    return 0 if ok else 1


def _cleanup(stack: contextlib.ExitStack, out: Display, state: dict) -> bool:
    """Stop every process and remove the temp dir; signals wait meanwhile."""
    old = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        out.close()
        try:
            stack.close()
        except Exception as e:  # noqa: BLE001 - reported, the rest of the clean-up already ran
            print(f"sshpump demo: clean-up: {e}", file=sys.stderr)
        tmpdir = state.get("tmpdir")
        return not (tmpdir and os.path.exists(tmpdir))
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def main(argv=None) -> int:
    ns = parse(sys.argv[1:] if argv is None else argv)
    missing = _missing_programs(not ns.no_ssh)
    if missing:
        print(f"sshpump demo: needs OpenSSH ({', '.join(missing)} not found; on Debian: "
              "apt install openssh-server openssh-client)", file=sys.stderr)
        return 1
    _pending.clear()
    out = Display(checkpoint=_checkpoint)
    state: dict = {}
    old = {s: signal.signal(s, _on_stop_signal) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    stack = contextlib.ExitStack()
    rc = 1
    try:
        rc = _run(ns, out, stack, state)
    except KeyboardInterrupt:
        out.close()
        print("\nsshpump demo: interrupted; stopping everything", file=sys.stderr)
        rc = 130
    except _Signalled as e:
        out.close()
        print(f"\nsshpump demo: {signal.Signals(e.signum).name}; stopping everything", file=sys.stderr)
        rc = 128 + e.signum
    except DemoError as e:
        out.close()
        print(f"sshpump demo: {e}", file=sys.stderr)
        rc = 1
    except (OSError, RuntimeError, ValueError) as e:
        out.close()
        print(f"sshpump demo: {type(e).__name__}: {e}", file=sys.stderr)
        rc = 1
    finally:
        clean = _cleanup(stack, out, state)
        for s, h in old.items():
            signal.signal(s, h)
    where = state.get("tmpdir")
    if where:
        print(("Cleaned up: sshd, the target and the tunnels stopped, " if clean else
               "Clean-up incomplete: ") + f"{where} {'removed' if clean else 'still there'}.",
              file=sys.stderr if rc else sys.stdout)
    return rc if clean else (rc or 1)
