"""Small shared helpers (free ports, waiting on log files, process trees)."""
from __future__ import annotations

import os
import signal
import socket
import time


def free_port(host: str = "127.0.0.1", also_v6: bool = False) -> int:
    """Bind port 0, read the port, close.  Racy by nature; callers retry."""
    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
    for _ in range(50):
        with socket.socket(fam, socket.SOCK_STREAM) as s:
            s.bind((host, 0))
            port = s.getsockname()[1]
        if not also_v6:
            return port
        try:
            with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s6:
                s6.bind(("::1", port))
            return port
        except OSError:
            continue
    raise RuntimeError("could not find a free port")


def ipv6_loopback_available() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


def read_from(path: str, offset: int) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            return f.read().decode(errors="replace")
    except FileNotFoundError:
        return ""


def stat_fields(pid) -> list[str] | None:
    """Fields of /proc/PID/stat after the command name (state first), or None."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read().decode(errors="replace")
    except OSError:
        return None
    return stat[stat.rfind(")") + 2:].split()


def tune_socket(sock, bufsize: int = 1 << 20) -> None:
    """Big buffers for bulk tests; TCP_NODELAY for round trips."""
    for opt in (socket.SO_RCVBUF, socket.SO_SNDBUF):
        try:
            sock.setsockopt(socket.SOL_SOCKET, opt, bufsize)
        except OSError:
            pass
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def children_of(pid: int) -> list[int]:
    """All descendant pids of ``pid`` (via /proc), deepest last."""
    ppids: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        rest = stat_fields(d)
        if rest is None:
            continue
        ppids.setdefault(int(rest[1]), []).append(int(d))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        for c in ppids.get(p, []):
            out.append(c)
            todo.append(c)
    return out


def tcp_ports_by_inode() -> dict[int, tuple[int, int]]:
    """Every TCP socket of this network namespace: inode -> (local port,
    remote port), from /proc/net/tcp and tcp6."""
    out = {}
    for name in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(name) as f:
                lines = f.readlines()[1:]
        except FileNotFoundError:
            continue
        for line in lines:
            fields = line.split()
            local, remote, inode = fields[1], fields[2], int(fields[9])
            if inode:
                out[inode] = (int(local.rsplit(":", 1)[1], 16), int(remote.rsplit(":", 1)[1], 16))
    return out


def socket_inodes(pid: int) -> set[int]:
    """Inodes of the sockets process ``pid`` holds open."""
    out = set()
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return out
    for fd in fds:
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            out.add(int(target[8:-1]))
    return out


def kill_pids(pids, sig=signal.SIGKILL):
    for p in pids:
        try:
            os.kill(p, sig)
        except ProcessLookupError:
            pass


def wait_for(predicate, timeout: float, interval: float = 0.02, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while True:
        v = predicate()
        if v:
            return v
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def is_listening(host: str, port: int) -> bool:
    """True if something listens on (host, port) -- checked WITHOUT connecting
    (so no channel is opened through a forwarder): a bind() without
    SO_REUSEADDR fails with EADDRINUSE while a listener exists."""
    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(fam, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False


def wait_listening(host: str, port: int, timeout: float = 15.0, proc=None):
    """Wait until (host, port) has a listener; if ``proc`` (a Popen) exits
    first, raise RuntimeError."""
    def ready():
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening on {port}")
        return is_listening(host, port)
    return wait_for(ready, timeout, what=f"listener on {host}:{port}")


def stop_child(proc, grace: float = 5.0) -> None:
    """Ask a child that serves until its stdin closes to stop; kill it after grace."""
    try:
        proc.stdin.close()
    except OSError:
        pass
    try:
        proc.wait(grace)
    except Exception:  # subprocess.TimeoutExpired
        proc.kill()
        proc.wait()
    if proc.stdout:
        proc.stdout.close()


def report_and_serve(info: dict) -> None:
    """The child side of start_module: report ``info`` as one JSON line, then
    serve (other threads do the work) until stdin reaches EOF or SIGTERM."""
    import json
    import signal
    import sys

    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    sys.stdout.write(json.dumps(info) + "\n")
    sys.stdout.flush()
    try:
        while sys.stdin.buffer.read(65536):
            pass
    except (OSError, KeyboardInterrupt):
        pass
    os._exit(0)


def start_module(module: str, *args: str, prefix=()):
    """Start ``python -m module args`` (``prefix`` first, e.g. ``ip netns
    exec NAME``) with the test bed importable and stdin/stdout as pipes, and
    read the one JSON line it reports on start. Returns (Popen, that dict)."""
    import json
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ)
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.Popen([*prefix, sys.executable, "-m", module, *args],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, cwd=root)
    line = proc.stdout.readline()
    if not line:
        proc.wait()
        raise RuntimeError(f"{module} exited with {proc.returncode} before reporting")
    return proc, json.loads(line)


class Service:
    """Lifecycle shared by the test bed's servers: ``start()`` returns self,
    ``stop()`` ends the processes, ``close()`` also removes ``tmpdir``; as a
    context manager a failed start still cleans up."""

    tmpdir: str | None = None

    def start(self):
        raise NotImplementedError

    def stop(self):
        raise NotImplementedError

    def close(self):
        import shutil

        self.stop()
        if self.tmpdir:
            shutil.rmtree(self.tmpdir, ignore_errors=True)

    def __enter__(self):
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(self, *exc):
        self.close()


class ChildService(Service):
    """A Service that is one child process, ``proc``, which stops when its
    stdin closes (see stop_child)."""

    proc = None

    def stop(self):
        if self.proc is not None:
            stop_child(self.proc)
            self.proc = None
