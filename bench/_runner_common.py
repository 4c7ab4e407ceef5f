"""Shared argument parsing for the forwarder runner scripts (pypump,
asyncssh_fwd, sshtunnel_fwd).  Each prints one JSON line
``{"pid": .., "listen": [[host, port], ...], "cipher": ".."}`` (one listen
address per ``--target``, same order) and runs until stdin reaches EOF or
SIGTERM."""
from __future__ import annotations

import argparse
import json
import os
import sys


def parse(prog: str):
    ap = argparse.ArgumentParser(prog=prog)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--user", required=True)
    ap.add_argument("--key", required=True)
    ap.add_argument("--known-hosts", required=True)
    ap.add_argument("--cipher", default="aes128-gcm@openssh.com")
    ap.add_argument("--target", action="append", default=[], metavar="HOST:PORT")
    a = ap.parse_args()
    a.targets = []
    for t in a.target:
        h, p = t.rsplit(":", 1)
        a.targets.append((h, int(p)))
    return a


def report(listen, cipher):
    sys.stdout.write(json.dumps({"pid": os.getpid(), "listen": [list(x) for x in listen],
                                 "cipher": cipher}) + "\n")
    sys.stdout.flush()


def raise_nofile():
    try:
        import resource
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ImportError, ValueError, OSError):
        pass
