"""Process-tree accounting from /proc: CPU seconds (utime+stime) and RSS."""
from __future__ import annotations

import os

from testbed._util import children_of, stat_fields

CLK_TCK = os.sysconf("SC_CLK_TCK")


def tree(pids) -> list[int]:
    out = []
    for p in pids:
        out.append(p)
        out.extend(children_of(p))
    return sorted(set(out))


def cpu_seconds(pids) -> float:
    total = 0
    for p in tree(pids):
        rest = stat_fields(p)
        if rest is None:
            continue
        total += int(rest[11]) + int(rest[12])   # utime, stime (fields 14, 15)
    return total / CLK_TCK


def rss_bytes(pids) -> int:
    total = 0
    for p in tree(pids):
        try:
            with open(f"/proc/{p}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1]) * 1024
                        break
        except OSError:
            continue
    return total


def mapped_libssh2(pid) -> list[str]:
    """Paths of the libssh2 files mapped into ``pid`` (which build a forwarder really runs).

    sshpump's loader has its own reader for /proc/self/maps; the harness must not
    import sshpump (that would map a libssh2 into the harness itself)."""
    try:
        with open(f"/proc/{pid}/maps") as f:
            paths = {line.rstrip("\n").split(None, 5)[-1] for line in f}
    except OSError:
        return []
    return sorted(p for p in paths if "libssh2" in os.path.basename(p))
