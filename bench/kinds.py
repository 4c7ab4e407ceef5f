"""``python -m bench.kinds [--quick]``: ``-D`` (SOCKS) and ``-R`` (remote) forwarding,
sshpump against OpenSSH's ``ssh -D`` / ``ssh -R``, side by side in one run.

Contenders: ``ssh`` (OpenSSH client), ``sshpump w0`` (one process) and sshpump with
its default worker count (one per CPU). Same test-bed sshd, same cipher
(aes128-gcm@openssh.com forced on every client), same targets (bench.servers:
crc32 source/sink and a uvloop echo, fast enough not to be the bottleneck).
All forwarders stay up for the whole run; each measurement alternates the
contenders (the order rotates every repetition) and a row reports the median.

Rows:

- ``-D bulk down``: one SOCKS5 CONNECT (our own few bytes of handshake) to the
  source, download N MiB, byte count checked;
- ``-D curl``: ``curl --socks5-hostname`` GETs M MiB from an in-process HTTP server
  (sendall of a pattern, no disk); the ``direct`` column shows it is not the limit;
- ``-D churn``: connect + SOCKS5 handshake + one echo round trip + close, 16 at once;
- ``-R bulk down`` / ``-R bulk up``: from the server side (this machine) connect to
  the port sshd allocated (``-R 0:host:port``) and download from the source /
  upload to the sink;
- ``-R churn``: connect to the remote port + one echo round trip + close, 16 at once.

CPU is utime+stime of the forwarder's process tree (ssh; sshpump master + workers)
from /proc, per GB or per 1,000 connections. sshd's own CPU is not counted.
Every loop is bounded in count and time. Must run as root (the test bed's sshd).
Writes bench/results/<stamp>-kinds[-quick].{json,md} with the command line.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

from testbed._util import free_port, wait_listening
from testbed.sshd import Sshd

from .contenders import CIPHER, _env, _Popen, _stderr_tail, _stop
from .procstat import cpu_seconds
from .servers import pattern

MiB = 1 << 20
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NDEF = len(os.sched_getaffinity(0))          # sshpump's default --workers (one per CPU)
CONTENDERS = ("ssh", "sshpump w0", f"sshpump w{NDEF} (default)")
CONCURRENCY = 16
IO_TIMEOUT = 60.0                              # per recv/send: a stuck forwarder fails the row, never hangs it
ROWS = {  # name: (kind, unit, cpu unit)
    "-D bulk down": ("D", "MB/s", "CPU s/GB"), "-D curl": ("D", "MB/s", "CPU s/GB"),
    "-D churn": ("D", "conn/s", "CPU s/1k conn"), "-R bulk down": ("R", "MB/s", "CPU s/GB"),
    "-R bulk up": ("R", "MB/s", "CPU s/GB"), "-R churn": ("R", "conn/s", "CPU s/1k conn")}


# ---- clients: plain sockets, SOCKS5 by hand (no library between us and the proxy) ----------
def _recvn(s, n):
    buf = b""
    while len(buf) < n:
        b = s.recv(n - len(buf))
        if not b:
            raise RuntimeError(f"closed after {len(buf)} of {n} bytes")
        buf += b
    return buf


def _socks5_request(host, port):
    return b"\x05\x01\x00\x01" + socket.inet_aton(host) + port.to_bytes(2, "big")


def _socks5_reply_rest(head):
    """Bytes left after the 4-byte reply head: bound address (IPv4 or IPv6) + port."""
    if head[0] != 5 or head[1] != 0 or head[3] not in (1, 4):
        raise RuntimeError(f"SOCKS5 reply {head!r}")
    return (4 if head[3] == 1 else 16) + 2


def _connect(addr, socks=None):
    """A socket to ``addr``, through SOCKS5 proxy ``socks`` when given (greeting, then request)."""
    s = socket.create_connection(socks or addr, timeout=IO_TIMEOUT)
    if socks:
        s.sendall(b"\x05\x01\x00")
        if _recvn(s, 2) != b"\x05\x00":
            raise RuntimeError("SOCKS5: no-auth refused")
        s.sendall(_socks5_request(*addr))
        _recvn(s, _socks5_reply_rest(_recvn(s, 4)))
    return s


def _download(s, nbytes, deadline):
    """bench.servers source: '<n>\\n' then n bytes; only the count is checked (crc costs CPU)."""
    s.sendall(b"%d\n" % nbytes)
    view, got = memoryview(bytearray(MiB)), 0
    while got < nbytes and time.monotonic() < deadline:
        n = s.recv_into(view, min(MiB, nbytes - got))
        if not n:
            break
        got += n
    if got != nbytes:
        raise RuntimeError(f"downloaded {got} of {nbytes}")


def _upload(s, nbytes, pat, deadline):
    """bench.servers sink: '<n>\\n', n bytes, it replies '<n> <crc>'."""
    s.sendall(b"%d\n" % nbytes)
    mv, left = memoryview(pat), nbytes
    while left and time.monotonic() < deadline:
        k = min(left, len(pat))
        s.sendall(mv[:k])
        left -= k
    reply = b""
    while b"\n" not in reply:
        b = s.recv(100)
        if not b:
            break
        reply += b
    if not reply or int(reply.split()[0]) != nbytes:
        raise RuntimeError(f"sink got {reply!r}, sent {nbytes}")


async def _churn(addr, socks, count, limit):
    """``count`` ops (connect [+ SOCKS5] + 4-byte echo + close), CONCURRENCY at once; ops/s."""
    done, started, errors, deadline = 0, 0, [], time.monotonic() + limit

    async def op():
        r, w = await asyncio.open_connection(*(socks or addr))
        try:
            if socks:
                w.write(b"\x05\x01\x00")
                if await r.readexactly(2) != b"\x05\x00":
                    raise RuntimeError("SOCKS5: no-auth refused")
                w.write(_socks5_request(*addr))
                head = await r.readexactly(4)
                await r.readexactly(_socks5_reply_rest(head))
            w.write(b"ping")
            if await r.readexactly(4) != b"ping":
                raise RuntimeError("bad echo")
        finally:
            w.close()

    async def client():
        nonlocal done, started
        while started < count and time.monotonic() < deadline and len(errors) < 20:
            started += 1
            try:
                await asyncio.wait_for(op(), 15)
                done += 1
            except (OSError, RuntimeError, asyncio.TimeoutError, asyncio.IncompleteReadError) as e:
                errors.append(repr(e))

    t0 = time.monotonic()
    await asyncio.gather(*(client() for _ in range(CONCURRENCY)))
    dt = time.monotonic() - t0
    if errors or done < count:
        raise RuntimeError(f"{done}/{count} ops in {dt:.1f}s; errors: {errors[:3]}")
    return done / dt


def _run_churn(addr, socks, count, limit):
    try:
        import uvloop   # the client's own overhead counts against every contender alike: keep it small
        return uvloop.run(_churn(addr, socks, count, limit))
    except ImportError:
        return asyncio.run(_churn(addr, socks, count, limit))


# ---- an HTTP server for curl: GET /<n> -> n bytes of the pattern (sendall releases the GIL) ---
class Http:
    def __init__(self, pat):
        self.pat, self.sock = pat, socket.create_server(("127.0.0.1", 0), backlog=64)
        self.addr = self.sock.getsockname()[:2]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn):
        try:
            conn.settimeout(IO_TIMEOUT)
            req = b""
            while b"\r\n\r\n" not in req and len(req) < 65536:
                b = conn.recv(4096)
                if not b:
                    return
                req += b
            n = int(req.split()[1].strip(b"/"))
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n" % n)
            mv, left = memoryview(self.pat), n
            while left:
                k = min(left, len(self.pat))
                conn.sendall(mv[:k])
                left -= k
        except (OSError, ValueError, IndexError):
            pass
        finally:
            conn.close()


def _curl(http, nbytes, socks):
    url = f"http://{http.addr[0]}:{http.addr[1]}/{nbytes}"
    argv = ["curl", "-sS", "-o", "/dev/null", "--max-time", str(int(IO_TIMEOUT)), "-w", "%{size_download} %{time_total}"]
    if socks:
        argv += ["--socks5-hostname", f"{socks[0]}:{socks[1]}"]
    r = subprocess.run(argv + [url], capture_output=True, text=True, timeout=IO_TIMEOUT + 10)
    size, secs = r.stdout.split() if r.returncode == 0 else ("0", "1")
    if int(size) != nbytes:
        raise RuntimeError(f"curl: {size} of {nbytes} bytes, rc {r.returncode}: {r.stderr.strip()[:200]}")
    return nbytes / float(secs) / 1e6   # curl's own transfer time: its process start-up is not the tunnel's


# ---- forwarders -----------------------------------------------------------------------------
class Forwarder:
    """One running forwarder: ``socks`` (D) or ``remote[target] -> port`` (R); ``pids()`` for CPU."""

    def __init__(self, name, kind, sshd, targets, logdir):
        self.name, self.kind, self.socks, self.remote = name, kind, None, {}
        specs = [f"0:{h}:{p}" for h, p in targets] if kind == "R" else []
        self.proc = None
        try:
            (self._start_ssh if name == "ssh" else self._start_sshpump)(sshd, specs, targets, logdir)
        except Exception:
            _stop(self.proc)
            raise

    def _start_ssh(self, sshd, specs, targets, logdir):
        port = free_port()
        fwd = [a for s in specs for a in ("-R", s)] or ["-D", f"127.0.0.1:{port}"]
        self.log = os.path.join(logdir, f"ssh-{self.kind}.stderr")
        opts = ["-o", "ExitOnForwardFailure=yes", "-o", "ServerAliveInterval=0", "-o", "ControlMaster=no",
                "-o", "ControlPath=none"]
        with open(self.log, "wb") as err:
            self.proc = subprocess.Popen(sshd.ssh_command("-N", *fwd, options=opts), stdin=subprocess.DEVNULL,
                                         stdout=subprocess.DEVNULL, stderr=err, start_new_session=True)
        if self.kind == "D":
            wait_listening("127.0.0.1", port, 30, proc=self.proc)
            self.socks = ("127.0.0.1", port)
            return
        deadline = time.monotonic() + 30   # ssh says where sshd listens only on stderr, as users read it
        while len(self.remote) < len(targets):
            with open(self.log) as f:
                for m in re.finditer(r"Allocated port (\d+) for remote forward to (\S+)", f.read()):
                    self.remote[m.group(2)] = int(m.group(1))
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"ssh -R: {_stderr_tail(self.log)}")
            time.sleep(0.05)

    def _start_sshpump(self, sshd, specs, targets, logdir):
        workers = ["--workers", "0"] if self.name == "sshpump w0" else []   # else the default, as a user runs it
        fwd = [a for s in specs for a in ("-R", s)] or ["-D", "127.0.0.1:0"]
        argv = [sys.executable, "-m", "sshpump", *workers, "--ready-fd", "{FD}", "--drain-timeout", "1",
                "-p", str(sshd.port), "-i", sshd.client_key, "-o", f"UserKnownHostsFile={sshd.known_hosts}",
                "-o", "IdentitiesOnly=yes", "-o", f"Ciphers={CIPHER}", *fwd, f"{sshd.user}@{sshd.host}"]
        p = _Popen(argv, logdir, f"{self.name.split()[1]}-{self.kind}", ready="ready-fd", env=_env())
        self.proc, self.log = p.proc, p.log
        info = p.wait_ready()
        if self.kind == "D":
            self.socks = tuple(info["listen"][0]["address"][:2])
        else:
            self.remote = {r["target"]: r["port"] for r in info["remote"]}

    def target(self, hp):
        """Where a client connects for target ``hp``: (addr, socks) for D, the remote port for R."""
        if self.kind == "D":
            return tuple(hp), self.socks
        return ("127.0.0.1", self.remote[f"{hp[0]}:{hp[1]}"]), None

    def pids(self):
        return [self.proc.pid] if self.proc.poll() is None else []

    def stop(self):
        _stop(self.proc)


def measure(fwd, row, t, a, pat, http):
    """One measurement: (value, CPU of the forwarder per GB or per 1k conns)."""
    nbytes = (a.curl_mib if row == "-D curl" else a.mib) * MiB
    kind = row.split()[1]
    target = t["echo"] if kind == "churn" else t["sink"] if row.endswith("up") else t["source"]
    dest, socks = (tuple(target), None) if fwd is None else fwd.target(target)
    cpu0 = cpu_seconds(fwd.pids()) if fwd else 0.0
    t0 = time.monotonic()
    if row == "-D curl":
        value = _curl(http, nbytes, socks)
    elif kind == "churn":
        value = _run_churn(dest, socks, a.count, a.time_limit)
    else:
        with _connect(dest, socks) as s:
            if row.endswith("up"):
                _upload(s, nbytes, pat, t0 + a.time_limit)
            else:
                _download(s, nbytes, t0 + a.time_limit)
        value = nbytes / (time.monotonic() - t0) / 1e6
    if fwd is None:
        return value, None
    cpu = cpu_seconds(fwd.pids()) - cpu0
    return value, cpu / (a.count / 1000 if kind == "churn" else nbytes / 1e9)


def run(a) -> dict:
    pat, load0 = pattern(), os.getloadavg()[0]   # the machine is shared: say how busy it was
    logdir = tempfile.mkdtemp(prefix="sshpump-bench-kinds-")
    srv = subprocess.Popen([sys.executable, "-m", "bench.servers"], cwd=REPO, env=_env(),
                           stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    t = json.loads(srv.stdout.readline())
    http = Http(pat)
    res = {r: {c: [] for c in ("direct",) + CONTENDERS} for r in ROWS}
    errors, fwds = {}, {}
    try:
        with Sshd() as sshd:
            for kind in ("D", "R"):
                for name in CONTENDERS:
                    fwds[kind, name] = Forwarder(name, kind, sshd, [t["source"], t["sink"], t["echo"]], logdir)
            for rep in range(a.reps):
                k = rep % len(CONTENDERS)   # rotate who goes first: no contender always meets a warm/cold machine
                order = ("direct",) + CONTENDERS[k:] + CONTENDERS[:k]
                for row, (kind, _, _) in ROWS.items():
                    if row == "-D curl" and a.no_curl:
                        continue
                    for name in order:
                        fwd = None if name == "direct" else fwds[kind, name]
                        try:
                            res[row][name].append(measure(fwd, row, t, a, pat, http))
                        except Exception as e:   # one failed cell is reported, the rest still runs
                            errors.setdefault(f"{row} / {name}", []).append(str(e)[:300])
                        if fwd and fwd.proc.poll() is not None:
                            raise RuntimeError(f"{name} -{kind} died: {_stderr_tail(fwd.log)}")
    finally:
        for f in fwds.values():
            f.stop()
        http.sock.close()
        srv.stdin.close()
        srv.wait(10)
    return {"res": res, "errors": errors, "logdir": logdir, "load": [load0, os.getloadavg()[0]]}


def _med(samples, i):
    vals = [s[i] for s in samples if s[i] is not None]
    return statistics.median(vals) if vals else None


def report(out, a, cmd) -> str:
    res = out["res"]
    f = lambda v, d=1: "—" if v is None else f"{v:.{d}f}"   # noqa: E731
    w0, wd = CONTENDERS[1], CONTENDERS[2]
    lines = [f"# sshpump -D / -R vs OpenSSH ssh -D / -R, {time.strftime('%Y-%m-%dT%H:%M:%S%z')}", "",
             f"`{cmd}`", "",
             f"{os.cpu_count()} CPUs (1-min load {out['load'][0]:.2f} at start, {out['load'][1]:.2f} at end); cipher {CIPHER}; median of {a.reps}; bulk {a.mib} MiB, curl {a.curl_mib} MiB, "
             f"churn {a.count} connections ({CONCURRENCY} at once). `direct` = no tunnel (bulk/curl: the target "
             "itself; churn: plain echo connections, no SOCKS). CPU = forwarder process tree (sshd not counted).", "",
             f"| row | unit | direct | ssh | {w0} | {wd} | w0/ssh | w{NDEF}/ssh | CPU unit | ssh | w0 | w{NDEF} |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for row, (kind, unit, cunit) in ROWS.items():
        r = res[row]
        if row == "-D curl" and a.no_curl:
            lines.append(f"| {row} | — | not run (--no-curl) |" + " |" * 9)
            continue
        v = {c: _med(r[c], 0) for c in r}
        c = {k: _med(r[k], 1) for k in CONTENDERS}
        ratio = lambda x: "—" if x is None or not v["ssh"] else f"{x / v['ssh']:.2f}×"   # noqa: E731
        d = 0 if unit == "conn/s" else 1
        lines.append(f"| {row} | {unit} | {f(v['direct'], d)} | {f(v['ssh'], d)} | {f(v[w0], d)} | {f(v[wd], d)} "
                     f"| {ratio(v[w0])} | {ratio(v[wd])} | {cunit} | {f(c['ssh'], 2)} | {f(c[w0], 2)} | {f(c[wd], 2)} |")
    if out["errors"]:
        lines += ["", "Failed measurements:", ""] + [f"- {k}: {e[0]}" for k, e in out["errors"].items()]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.kinds", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="64 MiB, 300 connections, 1 repetition")
    ap.add_argument("--mib", type=int, help="bulk MiB per transfer (default 512; quick 64)")
    ap.add_argument("--curl-mib", type=int, help="curl download MiB (default 256; quick 32)")
    ap.add_argument("--count", type=int, help="connections per churn measurement (default 2000; quick 300)")
    ap.add_argument("--reps", type=int, help="repetitions, median reported (default 3; quick 1)")
    ap.add_argument("--time-limit", type=float, default=120.0, help="seconds one measurement may take")
    ap.add_argument("--no-curl", action="store_true", help="leave out the curl row")
    ap.add_argument("--out", default=os.path.join(REPO, "bench", "results"))
    a = ap.parse_args(argv)
    q = a.quick
    a.mib = max(1, min(a.mib or (64 if q else 512), 8192))
    a.curl_mib = max(1, min(a.curl_mib or (32 if q else 256), 8192))
    a.count = max(CONCURRENCY, min(a.count or (300 if q else 2000), 100000))
    a.reps = max(1, min(a.reps or (1 if q else 3), 20))
    if os.geteuid() != 0:
        print("python -m bench.kinds must run as root (the test bed starts sshd)", file=sys.stderr)
        return 2
    cmd = "python -m bench.kinds " + " ".join(sys.argv[1:] if argv is None else argv)
    out = run(a)
    md = report(out, a, cmd.strip())
    os.makedirs(a.out, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S") + ("-kinds-quick" if q else "-kinds")
    with open(os.path.join(a.out, f"{stamp}.json"), "w") as fh:
        json.dump({"command": cmd.strip(), "cpus": os.cpu_count(), "cipher": CIPHER, "mib": a.mib,
                   "curl_mib": a.curl_mib, "count": a.count, "reps": a.reps, "concurrency": CONCURRENCY, "load": out["load"],
                   "rows": {r: {c: [{"value": v, "cpu": cp} for v, cp in s] for c, s in cs.items()}
                            for r, cs in out["res"].items()}, "errors": out["errors"]}, fh, indent=1)
    with open(os.path.join(a.out, f"{stamp}.md"), "w") as fh:
        fh.write(md)
    print(md)
    return 1 if out["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
