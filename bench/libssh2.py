"""Which libssh2 each sshpump row ran on, and a warning when it is not the expected one.

sshpump loads its patched libssh2 at import and falls back to ssh2-python's
stock build when it cannot (or when ``SSHPUMP_LIBSSH2=stock``); its own
warning then lands in a contender's stderr log that nobody reads.  A row named
"sshpump" measured on the stock build would misreport the product, so the
harness asks sshpump in the very environment (interpreter, variables, working
directory) the contender is started with, and afterwards checks that the
running processes map that same file.
"""
from __future__ import annotations

import json
import subprocess
import sys

from . import procstat

ENV = "SSHPUMP_LIBSSH2"   # read by sshpump's libssh2_loader

# Prints what sshpump.LIBSSH2 says after a normal import (the same load path as
# the contender's own `python -m sshpump`), and which copy of sshpump was imported.
_PROBE = ("import dataclasses, json, sshpump; L = sshpump.LIBSSH2; "
          "print(json.dumps({**dataclasses.asdict(L), 'kind': L.kind, "
          "'module': sshpump.__file__}))")


def one_line(text: str, n: int = 400) -> str:
    """The last ``n`` characters of ``text`` on one line (for a failure message)."""
    flat = " | ".join(s.strip() for s in text.strip().splitlines() if s.strip())
    return flat if len(flat) <= n else "…" + flat[-n:]


def probe(env: dict, cwd: str, expected: str) -> dict:
    """What sshpump loads under ``env``: kind, path, why_stock, openssl, module, expected."""
    r = subprocess.run([sys.executable, "-c", _PROBE], env=env, cwd=cwd,
                       capture_output=True, text=True, timeout=60)
    if r.returncode != 0:
        raise RuntimeError(f"importing sshpump failed ({r.returncode}); stderr: {one_line(r.stderr)}")
    return {**json.loads(r.stdout.strip().splitlines()[-1]), "expected": expected}


def verify(name: str, ent: dict, pids) -> list[str]:
    """Record the libssh2 files the contender's processes map; return warnings for ``name``."""
    mapped = sorted({p for pid in procstat.tree(pids) for p in procstat.mapped_libssh2(pid)})
    if mapped:
        ent["libssh2_mapped"] = mapped
    lib = ent.get("libssh2")
    if lib is None:
        return []
    out = []
    if lib["kind"] != lib["expected"]:
        why = f" ({lib['why_stock']})" if lib["why_stock"] else ""
        out.append(f"{name} runs on {lib['kind']} libssh2{why}, not {lib['expected']}: {lib['path']}")
    if mapped and mapped != [lib["path"]]:
        out.append(f"{name}: sshpump reported libssh2 {lib['path']} but its processes map {', '.join(mapped)}")
    return out


def describe(ent: dict, kinds: dict) -> str:
    """One cell: 'patched: /path' / 'stock (why): /path'; for rows that only map a
    libssh2 (pypump), its path, named by the kind an sshpump row reported for it."""
    lib = ent.get("libssh2")
    if lib:
        why = f" ({lib['why_stock']})" if lib["why_stock"] else ""
        return f"{lib['kind']}{why}: `{lib['path']}`"
    mapped = ent.get("libssh2_mapped")
    if not mapped:
        return "–"
    return "; ".join(f"{kinds[p]}: `{p}`" if p in kinds else f"`{p}`" for p in mapped)


def kinds_by_path(contenders: dict) -> dict:
    return {c["libssh2"]["path"]: c["libssh2"]["kind"] for c in contenders.values() if c.get("libssh2")}


def summary_line(contenders: dict) -> str | None:
    """'libssh2: sshpump w0, sshpump w2: patched: /p; …' grouping rows that share a library."""
    kinds = kinds_by_path(contenders)
    groups: dict[str, list[str]] = {}
    for n, c in contenders.items():
        d = describe(c, kinds)
        if d != "–":
            groups.setdefault(d, []).append(n)
    if not groups:
        return None
    return "libssh2 (as loaded in each row's own environment): " + "; ".join(
        f"{', '.join(ns)} — {d}" for d, ns in groups.items()) + "."

