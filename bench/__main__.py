"""``python -m bench [--smoke | --full] [--only NAME ...] [--workload KEY ...] [--out DIR]``

quick (default, ~3 min): bulk up/down 192 MiB, 16 parallel uploads, echo round
trips at 1 and 64 connections, connection churn at 16, pgbench -S steady and
-C, 1,000 idle connections; 2 repetitions.
--full: 1 GiB bulk, 64 parallel streams, 10,000 idle connections, longer
runs (pgbench -T 8); 3 repetitions.
--smoke: one tiny upload and a short echo per contender (seconds; for CI).
Must run as root (the test bed's sshd and PostgreSQL need it).

The sshpump rows run the installed sshpump (pip install '.[bench]'); the report
names the libssh2 each row loaded (patched, or stock for the
'sshpump (stock libssh2)' row).  Exit status 1 when one of our contenders
(an sshpump row or pypump) cannot start; missing peers are skipped.
"""
from __future__ import annotations

import argparse
import os
import sys


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--smoke", action="store_true", help="tiny workloads, seconds")
    g.add_argument("--full", action="store_true", help="everything, longer, 3 repetitions")
    ap.add_argument("--only", action="append", metavar="CONTENDER",
                    help="run only these contenders (e.g. 'sshpump w0', 'sshpump (stock libssh2)', 'ssh -L', direct; "
                         "also 'sshpump w1', which only runs when named); repeatable")
    ap.add_argument("--workload", action="append", metavar="KEY", help="run only these workloads; repeatable")
    ap.add_argument("--out", help="results directory (default bench/results)")
    ap.add_argument("-q", "--quiet", action="store_true")
    a = ap.parse_args(argv)
    # the repository root for the bench and testbed packages; never src/: the
    # contenders run the installed sshpump (see contenders._env)
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if repo not in sys.path:
        sys.path.insert(0, repo)
    if os.geteuid() != 0:
        print("python -m bench must run as root (the test bed starts sshd and PostgreSQL)", file=sys.stderr)
        return 2
    from .contenders import ContenderFailed
    from .runner import run_suite
    mode = "smoke" if a.smoke else "full" if a.full else "quick"
    try:
        path = run_suite(mode, a.out, a.only, a.workload, a.quiet)
    except ContenderFailed as e:
        print(f"bench: FAILED: {e}", file=sys.stderr)
        return 1
    md = path[:-5] + ".md"
    if not a.quiet and os.path.exists(md):
        with open(md) as f:
            print(f.read())
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
