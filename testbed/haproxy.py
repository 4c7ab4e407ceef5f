"""HAProxy (Debian's ``/usr/sbin/haproxy``, 2.6) in front of test servers:
the load balancer of the scale-out recipe (contrib/haproxy/haproxy.cfg).

``render(template, bind=..., servers=..., stats_socket=...)`` rewrites a
config's addresses and nothing else (the ``bind`` address, the ``server``
lines with their check ``port``, the stats socket's path), so a test runs the
documented file itself.  ``Haproxy`` runs ``haproxy -f CFG -db`` as a child
in a temporary directory::

    servers = {"a": (("127.0.0.1", 40001), 40002), "b": (("127.0.0.1", 40003), 40004)}
    with Haproxy(servers) as h:          # template: contrib/haproxy/haproxy.cfg
        connect(h.address)
        h.server_status()                # {"a": "UP", "b": "DOWN"} (admin socket `show stat`)
        h.connections()                  # one dict per tcplog line: client port, server, state...

Attributes after start: host, port, address, tmpdir, config_path, log_path
(haproxy's stdout: the tcplog lines and server state changes), stderr_path,
stats_socket, proc.
"""
from __future__ import annotations

import csv
import io
import os
import re
import signal
import socket
import subprocess
import tempfile
import time
from datetime import datetime

from . import REPO_ROOT
from ._util import Service, free_port, read_from, wait_for

HAPROXY = "/usr/sbin/haproxy"
CONTRIB_CONFIG = os.path.join(REPO_ROOT, "contrib", "haproxy", "haproxy.cfg")


def _address(addr) -> str:
    host, port = addr
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def render(template: str, *, bind, servers: dict, stats_socket: str) -> str:
    """The config ``template`` with only its addresses changed: every ``bind``
    line listens on ``bind`` ((host, port)); the first ``server`` line is
    repeated once per entry of ``servers`` ({name: ((host, port), check_port)})
    with its options kept and its ``port`` option set to check_port, and the
    other ``server`` lines are dropped; ``stats socket`` uses
    ``stats_socket``."""
    out, server_opts, placed = [], None, False
    for line in template.splitlines():
        words = line.split()
        indent = line[: len(line) - len(line.lstrip())]
        if words[:2] == ["stats", "socket"]:
            out.append(f"{indent}stats socket {stats_socket} {' '.join(words[3:])}".rstrip())
        elif words[:1] == ["bind"]:
            out.append(f"{indent}bind {_address(bind)} {' '.join(words[2:])}".rstrip())
        elif words[:1] == ["server"]:
            if placed:
                continue
            server_opts, placed = words[3:], True
            for name, (addr, check_port) in servers.items():
                opts = list(server_opts)
                if "port" in opts:
                    opts[opts.index("port") + 1] = str(check_port)
                elif check_port is not None:
                    opts += ["port", str(check_port)]
                out.append(f"{indent}server {name} {_address(addr)} {' '.join(opts)}".rstrip())
        else:
            out.append(line)
    if not placed:
        raise ValueError("haproxy template has no server line")
    return "\n".join(out) + "\n"


# option tcplog: %ci:%cp [%t] %ft %b/%s %Tw/%Tc/%Tt %B %ts %ac/%fc/%bc/%sc/%rc %sq/%bq
_TCPLOG = re.compile(
    r"(?P<ci>\S+):(?P<cp>\d+) \[(?P<t>[^\]]+)\] (?P<ft>\S+) (?P<b>[^/\s]+)/(?P<s>\S+) "
    r"(?P<Tw>-?\d+)/(?P<Tc>-?\d+)/\+?(?P<Tt>-?\d+) \+?(?P<B>\d+) (?P<ts>\S{2}) "
    r"(?P<ac>\d+)/(?P<fc>\d+)/(?P<bc>\d+)/(?P<sc>\d+)/(?P<rc>\+?\d+) (?P<sq>\d+)/(?P<bq>\d+)")


def parse_tcplog(text: str) -> list[dict]:
    """One dict per tcplog line: client (host, port), accept (epoch seconds,
    from the local-time accept date), frontend, backend, server ("<NOSRV>" if
    none), Tw/Tc/Tt (ms; -1 when that step did not happen), bytes (to the
    client), state (termination state, "--" for a clean end), retries,
    redispatched (the connection went to another server after a failed
    connect)."""
    out = []
    for line in text.splitlines():
        m = _TCPLOG.search(line)
        if not m:
            continue
        accept = datetime.strptime(m["t"], "%d/%b/%Y:%H:%M:%S.%f")
        out.append({
            "client": (m["ci"], int(m["cp"])),
            "accept": time.mktime(accept.timetuple()) + accept.microsecond / 1e6,
            "frontend": m["ft"], "backend": m["b"], "server": m["s"],
            "Tw": int(m["Tw"]), "Tc": int(m["Tc"]), "Tt": int(m["Tt"]),
            "bytes": int(m["B"]), "state": m["ts"],
            "retries": int(m["rc"].lstrip("+")), "redispatched": m["rc"].startswith("+"),
        })
    return out


class Haproxy(Service):
    """``haproxy -f CFG -db`` on a free loopback port, the config rendered
    from ``template`` (default: contrib/haproxy/haproxy.cfg) with ``servers``
    ({name: ((host, port), check_port)}).  ``stop()`` is a hard stop
    (SIGTERM, then SIGKILL)."""

    def __init__(self, servers: dict, template: str | None = None, host: str = "127.0.0.1"):
        if template is None:
            with open(CONTRIB_CONFIG) as f:
                template = f.read()
        self.template = template
        self.servers = dict(servers)
        self.host = host
        self.port: int | None = None
        self.proc: subprocess.Popen | None = None
        self.tmpdir = tempfile.mkdtemp(prefix="sshpump-haproxy-")
        self.config_path = os.path.join(self.tmpdir, "haproxy.cfg")
        self.log_path = os.path.join(self.tmpdir, "haproxy.log")
        self.stderr_path = os.path.join(self.tmpdir, "haproxy.stderr")
        self.stats_socket = os.path.join(self.tmpdir, "admin.sock")

    @property
    def address(self):
        return (self.host, self.port)

    def _try_start(self, port: int, timeout: float = 15.0) -> bool:
        """Start on ``port``: True once listening, False if the port was taken."""
        self.port = port
        with open(self.config_path, "w") as f:
            f.write(render(self.template, bind=self.address, servers=self.servers,
                           stats_socket=self.stats_socket))
        err_offset = os.path.getsize(self.stderr_path) if os.path.exists(self.stderr_path) else 0
        with open(self.log_path, "ab") as out, open(self.stderr_path, "ab") as err:
            self.proc = subprocess.Popen([HAPROXY, "-f", self.config_path, "-db"],
                                         stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                         start_new_session=True)

        def up():
            if self.proc.poll() is not None:
                return "exited"
            return os.path.exists(self.stats_socket) and self._listening() and "up"
        try:
            state = wait_for(up, timeout, what=f"haproxy listening on {port}")
        except TimeoutError:
            self._kill()
            raise RuntimeError(f"haproxy did not listen within {timeout}s:\n{self.stderr(err_offset)}")
        if state == "exited":
            text = self.stderr(err_offset)
            self.proc = None
            if "cannot bind" in text or "Address already in use" in text:
                return False
            raise RuntimeError(f"haproxy exited:\n{text}")
        return True

    def _listening(self) -> bool:
        from ._util import is_listening
        return is_listening(self.host, self.port)

    def start(self):
        if not os.path.exists(HAPROXY):
            raise RuntimeError(f"{HAPROXY} not installed; run scripts/install-system-deps.sh")
        for _ in range(10):
            if self._try_start(free_port(self.host)):
                return self
        raise RuntimeError("haproxy: could not bind a free port in 10 tries")

    def _kill(self):
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def stop(self):
        self._kill()

    # -- observing ------------------------------------------------------
    def command(self, cmd: str, timeout: float = 5.0) -> str:
        """One command over the admin socket (e.g. "show stat"); its answer."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(self.stats_socket)
            s.sendall(cmd.encode() + b"\n")
            data = bytearray()
            while True:
                b = s.recv(65536)
                if not b:
                    return data.decode(errors="replace")
                data += b

    def show_stat(self) -> list[dict]:
        """``show stat`` as dicts (pxname, svname, status, scur, stot, check_status, ...)."""
        text = self.command("show stat")
        if text.startswith("# "):
            text = text[2:]
        return list(csv.DictReader(io.StringIO(text)))

    def server_status(self, backend: str | None = None) -> dict:
        """{server name: status} ("UP", "DOWN", "UP 1/2", "DOWN 1/2", "MAINT", ...)
        of ``backend`` (default: every backend's servers)."""
        return {r["svname"]: r["status"] for r in self.show_stat()
                if r["svname"] not in ("FRONTEND", "BACKEND") and (backend is None or r["pxname"] == backend)}

    def log(self, offset: int = 0) -> str:
        return read_from(self.log_path, offset)

    def stderr(self, offset: int = 0) -> str:
        return read_from(self.stderr_path, offset)

    def connections(self) -> list[dict]:
        """The finished connections so far, from the tcplog lines (see parse_tcplog)."""
        return parse_tcplog(self.log())
