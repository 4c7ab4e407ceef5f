"""A throw-away PostgreSQL 15 cluster (Debian paths) for tests/benchmarks.

initdb and postgres run as the ``postgres`` OS user (they refuse root).  The
server listens on 127.0.0.1:<port> and on a unix socket in ``socket_dir``
(0755 dir, 0777 socket) so the sshd login user can reach it through
``direct-streamlocal@openssh.com``.  Auth is ``trust`` everywhere.  Role and
database ``bench`` (superuser, owner of db ``bench``) are created at start.
"""
from __future__ import annotations

import os
import pwd
import signal
import subprocess
import tempfile
import time

from ._util import Service, free_port, ipv6_loopback_available, read_from

PG_BIN = "/usr/lib/postgresql/15/bin"
OS_USER = "postgres"


class Postgres(Service):
    """Constructor::

        Postgres(max_connections=300, extra_conf=None, ipv6=None)

    Attributes: host ("127.0.0.1"), port, socket_dir, socket_path
    (``socket_dir/.s.PGSQL.<port>``), user ("bench"), dbname ("bench"),
    datadir, tmpdir, log_path, bin_dir, pgbench (path), psql (path), proc.

    Methods: dsn(host=None, port=None, dbname="bench", user="bench") -> libpq
    keyword DSN string (host may be a directory for the unix socket);
    init_pgbench(scale=1); psql_command(*args, host=None, port=None) -> argv;
    pgbench_command(*args, host=None, port=None) -> argv; stop(); start().
    """

    host = "127.0.0.1"

    def __init__(self, max_connections: int = 300, extra_conf: dict | None = None,
                 ipv6: bool | None = None):
        if os.geteuid() != 0:
            raise RuntimeError("testbed.Postgres must run as root (it switches to 'postgres')")
        self.bin_dir = PG_BIN
        self.pgbench = os.path.join(PG_BIN, "pgbench")
        self.psql = os.path.join(PG_BIN, "psql")
        self.max_connections = max_connections
        self.extra_conf = dict(extra_conf or {})
        self.ipv6 = ipv6_loopback_available() if ipv6 is None else ipv6
        self.user = "bench"
        self.dbname = "bench"
        self.port: int | None = None
        self.proc: subprocess.Popen | None = None
        pw = pwd.getpwnam(OS_USER)
        self._uid, self._gid = pw.pw_uid, pw.pw_gid

        self.tmpdir = tempfile.mkdtemp(prefix="sshpump-pg-")
        os.chmod(self.tmpdir, 0o755)
        self.datadir = os.path.join(self.tmpdir, "data")
        self.socket_dir = os.path.join(self.tmpdir, "sock")
        self.log_path = os.path.join(self.tmpdir, "postgres.log")
        os.mkdir(self.socket_dir)
        os.chown(self.tmpdir, self._uid, self._gid)
        os.chown(self.socket_dir, self._uid, self._gid)
        os.chmod(self.socket_dir, 0o755)
        self._initdb()

    def _run_as_pg(self, argv, **kw):
        return subprocess.run(argv, user=self._uid, group=self._gid, extra_groups=[],
                              cwd=self.tmpdir, env=self._env(), **kw)

    def _env(self):
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env.update(HOME=self.tmpdir, LC_ALL="C.UTF-8", LANG="C.UTF-8")
        return env

    def _initdb(self):
        r = self._run_as_pg([os.path.join(PG_BIN, "initdb"), "-D", self.datadir, "-U", "postgres",
                             "--auth=trust", "--encoding=UTF8", "--locale=C", "--no-sync"],
                            capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"initdb failed:\n{r.stdout}\n{r.stderr}")
        with open(os.path.join(self.datadir, "pg_hba.conf"), "w") as f:
            f.write("local all all trust\n"
                    "host all all 127.0.0.1/32 trust\n"
                    "host all all ::1/128 trust\n")

    @property
    def socket_path(self) -> str:
        return os.path.join(self.socket_dir, f".s.PGSQL.{self.port}")

    def _try_start(self, port: int, timeout: float = 30.0) -> str:
        self.port = port
        conf = {
            "listen_addresses": "'127.0.0.1,::1'" if self.ipv6 else "'127.0.0.1'",
            "port": str(port),
            "unix_socket_directories": f"'{self.socket_dir}'",
            "unix_socket_permissions": "0777",
            "max_connections": str(self.max_connections),
            "shared_buffers": "'128MB'",
            "fsync": "off",
            "synchronous_commit": "off",
            "full_page_writes": "off",
            "logging_collector": "off",
            "log_min_messages": "warning",
        }
        conf.update({k: str(v) for k, v in self.extra_conf.items()})
        with open(os.path.join(self.datadir, "postgresql.auto.conf"), "w") as f:
            f.writelines(f"{k} = {v}\n" for k, v in conf.items())
        offset = os.path.getsize(self.log_path) if os.path.exists(self.log_path) else 0
        with open(self.log_path, "ab") as log:
            os.fchown(log.fileno(), self._uid, self._gid)
            self.proc = subprocess.Popen([os.path.join(PG_BIN, "postgres"), "-D", self.datadir],
                                         user=self._uid, group=self._gid, extra_groups=[],
                                         env=self._env(), cwd=self.tmpdir,
                                         stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                         start_new_session=True)
        deadline = time.monotonic() + timeout
        while True:
            text = read_from(self.log_path, offset)
            if "Address already in use" in text:
                self._kill()
                return "inuse"
            if "database system is ready to accept connections" in text:
                return "ok"
            if self.proc.poll() is not None:
                raise RuntimeError(f"postgres exited with {self.proc.returncode}:\n{text}")
            if time.monotonic() > deadline:
                self._kill()
                raise RuntimeError(f"postgres not ready after {timeout}s:\n{text}")
            time.sleep(0.02)

    def start(self):
        for _ in range(10):
            if self._try_start(free_port("127.0.0.1", also_v6=self.ipv6)) == "ok":
                break
        else:
            raise RuntimeError("postgres: could not bind a free port in 10 tries")
        if not getattr(self, "_bench_created", False):
            self._psql_admin("CREATE ROLE bench LOGIN SUPERUSER;")
            self._psql_admin("CREATE DATABASE bench OWNER bench;")
            self._bench_created = True
        return self

    def _psql_admin(self, sql):
        r = subprocess.run([self.psql, "-X", "-v", "ON_ERROR_STOP=1", "-h", self.socket_dir,
                            "-p", str(self.port), "-U", "postgres", "-d", "postgres", "-c", sql],
                           capture_output=True, text=True, env=self._env())
        if r.returncode != 0:
            raise RuntimeError(f"psql {sql!r} failed: {r.stderr}")

    def dsn(self, host: str | None = None, port: int | None = None,
            dbname: str | None = None, user: str | None = None) -> str:
        """libpq keyword/value DSN.  ``host`` defaults to 127.0.0.1; pass
        ``self.socket_dir`` (or any directory) for a unix socket."""
        return (f"host={host or self.host} port={port or self.port} "
                f"dbname={dbname or self.dbname} user={user or self.user} connect_timeout=10")

    def psql_command(self, *args, host=None, port=None) -> list[str]:
        return [self.psql, "-X", "-h", host or self.host, "-p", str(port or self.port),
                "-U", self.user, "-d", self.dbname, *args]

    def pgbench_command(self, *args, host=None, port=None) -> list[str]:
        return [self.pgbench, "-h", host or self.host, "-p", str(port or self.port),
                "-U", self.user, *args, self.dbname]

    def init_pgbench(self, scale: int = 1):
        r = subprocess.run(self.pgbench_command("-i", "-q", "-s", str(scale), host=self.socket_dir),
                           capture_output=True, text=True, env=self._env())
        if r.returncode != 0:
            raise RuntimeError(f"pgbench -i failed:\n{r.stderr}")
        return self

    def _kill(self, sig=signal.SIGINT):  # SIGINT = "fast" shutdown
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def stop(self):
        self._kill()

