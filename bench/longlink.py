"""``python -m bench.longlink [--rtt-ms 100] [--mib 256] [--reps 2]``: bulk
transfers over a long link, where the SSH channel window, not CPU, sets the pace.

The SSH connection of every tunnel crosses testbed.delayproxy (a pipelining
delay proxy: this kernel has no ``tc netem``), so each contender sees the same
round trip. Rows, side by side in one run, alternating:

- ``direct via proxy``: a plain TCP transfer through the proxy, no SSH. It
  shows the proxy is not the bottleneck (far above any window/RTT figure);
- ``ssh -L``: OpenSSH's client (its channel window is 2 MiB; it grows it for
  bulk sessions only);
- ``sshpump``: default window (libssh2's 2 MiB), ``--window 16M`` and ``--window 64M``.

Download is bounded by our receive window (window / RTT). Upload is bounded by
sshd's receive window (OpenSSH's 2 MiB for direct-tcpip channels), which no
client option changes. Must run as root (the test bed's sshd). Writes
bench/results/<stamp>-longlink.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time

from testbed._util import free_port, wait_listening
from testbed.delayproxy import DelayProxy
from testbed.sshd import Sshd

from .servers import pattern, recv_crc

MiB = 1 << 20
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _upload(addr, nbytes, pat):
    with socket.create_connection(addr, timeout=120) as s:
        s.sendall(b"%d\n" % nbytes)
        mv, left = memoryview(pat), nbytes
        while left:
            k = min(left, len(pat))
            s.sendall(mv[:k])
            left -= k
        reply = b""
        while b"\n" not in reply:
            b = s.recv(100)
            if not b:
                raise RuntimeError("sink closed without a reply")
            reply += b
    if int(reply.split()[0]) != nbytes:
        raise RuntimeError(f"sink got {reply!r}, sent {nbytes}")


def _download(addr, nbytes):
    with socket.create_connection(addr, timeout=120) as s:
        s.sendall(b"%d\n" % nbytes)
        got, _ = recv_crc(s, nbytes)
    if got != nbytes:
        raise RuntimeError(f"downloaded {got} of {nbytes}")


class Forwarder:
    """A tunnel through the proxy to sshd, forwarding to the sink and source."""

    def __init__(self, name, argv_fn):
        self.name, self.argv_fn = name, argv_fn

    def __enter__(self):
        self.ports = (free_port(), free_port())
        self.proc = subprocess.Popen(self.argv_fn(*self.ports), stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     start_new_session=True)
        wait_listening("127.0.0.1", self.ports[1], 30.0, proc=self.proc)
        return self

    def __exit__(self, *exc):
        self.proc.terminate()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def addrs(self):
        return [("127.0.0.1", p) for p in self.ports]


def run(rtt_ms: float, mib: int, reps: int) -> dict:
    nbytes, pat = mib * MiB, pattern()
    srv = subprocess.Popen([sys.executable, "-m", "bench.servers"], cwd=REPO,
                           stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    t = json.loads(srv.stdout.readline())
    sink, source = tuple(t["sink"]), tuple(t["source"])
    sshd = Sshd()
    sshd.start()
    delay = rtt_ms / 2000.0
    results = {}
    try:
        with DelayProxy(("127.0.0.1", sshd.port), delay) as ssh_link, \
                DelayProxy(sink, delay) as sink_link, DelayProxy(source, delay) as source_link:
            kh = sshd.known_hosts_for(ssh_link.listen[1])
            common = ["-p", str(ssh_link.listen[1]), "-i", sshd.client_key, "-o", f"UserKnownHostsFile={kh}",
                      "-o", "StrictHostKeyChecking=yes", "-o", "Ciphers=aes128-gcm@openssh.com"]
            dest = f"{sshd.user}@127.0.0.1"

            def fwd(a, b):
                return ["-L", f"{a}:{sink[0]}:{sink[1]}", "-L", f"{b}:{source[0]}:{source[1]}"]

            def sshpump(window):
                extra = ["--window", str(window)] if window else []
                return lambda a, b: [sys.executable, "-m", "sshpump", "--workers", "0", *extra, *common,
                                     *fwd(a, b), dest]

            def ssh(a, b):
                return sshd.ssh_command("-N", *fwd(a, b), port=ssh_link.listen[1], known_hosts=kh)

            contenders = [Forwarder("ssh -L", ssh), Forwarder("sshpump", sshpump(0)),
                          Forwarder("sshpump --window 16M", sshpump(16 * MiB)),
                          Forwarder("sshpump --window 64M", sshpump(64 * MiB))]
            rows = ["direct via proxy"] + [c.name for c in contenders]
            results = {r: {"up": [], "down": []} for r in rows}
            for rep in range(reps):
                order = contenders if rep % 2 == 0 else contenders[::-1]
                for kind in ("down", "up"):
                    t0 = time.monotonic()
                    if kind == "up":
                        _upload(sink_link.listen, nbytes, pat)
                    else:
                        _download(source_link.listen, nbytes)
                    results["direct via proxy"][kind].append(nbytes / (time.monotonic() - t0) / 1e6)
                for c in order:
                    with c:
                        for kind in ("down", "up"):
                            t0 = time.monotonic()
                            if kind == "up":
                                _upload(c.addrs()[0], nbytes, pat)
                            else:
                                _download(c.addrs()[1], nbytes)
                            results[c.name][kind].append(nbytes / (time.monotonic() - t0) / 1e6)
    finally:
        sshd.stop()
        srv.stdin.close()
        srv.wait()
    return {"rtt_ms": rtt_ms, "mib": mib, "reps": reps, "MB/s": results}


def report(res: dict) -> str:
    ws = 2 * MiB / (res["rtt_ms"] / 1000) / 1e6
    lines = [f"# long link: {res['rtt_ms']:g} ms RTT, {res['mib']} MiB per transfer, best of {res['reps']}",
             "", f"2 MiB window / RTT = {ws:.0f} MB/s; 16 MiB / RTT = {8 * ws:.0f} MB/s.", "",
             "| path | download MB/s | upload MB/s | download × ssh -L |", "|---|---|---|---|"]
    r = res["MB/s"]
    ssh_down = max(r["ssh -L"]["down"])
    for name, v in r.items():
        lines.append(f"| {name} | {max(v['down']):.1f} | {max(v['up']):.1f} | {max(v['down']) / ssh_down:.2f}× |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.longlink", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rtt-ms", type=float, default=100.0)
    ap.add_argument("--mib", type=int, default=256)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--out", default=os.path.join(REPO, "bench", "results"))
    a = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("python -m bench.longlink must run as root (the test bed starts sshd)", file=sys.stderr)
        return 2
    res = run(a.rtt_ms, a.mib, a.reps)
    md = report(res)
    os.makedirs(a.out, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    with open(os.path.join(a.out, f"{stamp}-longlink.json"), "w") as f:
        json.dump(res, f, indent=1)
    with open(os.path.join(a.out, f"{stamp}-longlink.md"), "w") as f:
        f.write(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
