"""A throwaway OpenSSH ``sshd`` on loopback: the one launcher behind
``sshpump demo``, the test bed (testbed/sshd.py subclasses it) and the bench.

Everything lives in a temporary directory: generated host keys, a client key,
an ``AuthorizedKeysFile``, the config, the pid file and the log.  It runs as
the invoking user and lets only that user in, with the client key:

* as a normal user sshd needs no privileges when it has its own host keys,
  a custom ``AuthorizedKeysFile`` and ``UsePAM no`` / ``StrictModes no``
  (it can then only log in the user it runs as);
* as root it logs in root (``PermitRootLogin prohibit-password``, key only),
  unless a subclass names another user (the test bed's ``sshpump-test``);
* without PAM sshd refuses an account whose password field starts with
  ``!`` (locked: ``nobody``, or root on some systems) even for a key, so for
  such an account ``use_pam=None`` (the default) turns ``UsePAM`` on.

    with Sshd() as s:
        subprocess.run(s.ssh_command("true"), check=True)
"""
from __future__ import annotations

import os
import pwd
import re
import shutil
import signal
import subprocess
import tempfile
import time

from .sshtools import (CIPHERS, SSH, SSH_KEYGEN, SSHD, account_locked, descendants,  # noqa: F401
                       free_port, keygen, kill_pids, penalties_supported, public_key, read_from)


class Sshd:
    """OpenSSH sshd on ``host`` (127.0.0.1) and a free port, in ``tmpdir``.

    Attributes: host, port, user, pid, proc, tmpdir, config_path, log_path,
    client_key, known_hosts, host_keys, host_public_keys, ciphers, ipv6.
    Methods: start(), stop(kill_sessions=True), restart(), close() (stop and
    remove tmpdir), kill_sessions(), log(), ssh_command(...),
    known_hosts_for(port, ...); a context manager (a failed start cleans up).

    ``extra_config``: {keyword: value} written last and overriding the
    defaults (case-insensitive); ``None`` drops a default, a list repeats it.
    ``parent_death_signal``: the signal sshd gets when the thread that
    started it dies (Linux), so a killed caller leaves no listener behind.
    ``use_pam``: ``UsePAM``; None (default): only if the account is locked.
    """

    host = "127.0.0.1"

    def __init__(self, *, user: str | None = None, host: str | None = None, ipv6: bool = False,
                 host_key_types=("ed25519",), allow_tcp_forwarding=True, extra_config=None,
                 prefix: str = "sshpump-sshd-", parent_death_signal: int | None = None,
                 use_pam: bool | None = None):
        if host is not None:
            self.host = host
        self.user = user or pwd.getpwuid(os.geteuid()).pw_name
        self.ipv6 = bool(ipv6)
        self.allow_tcp_forwarding = allow_tcp_forwarding
        self.extra_config = dict(extra_config or {})
        self.parent_death_signal = parent_death_signal
        self.use_pam = account_locked(self.user) if use_pam is None else bool(use_pam)
        self.ciphers = CIPHERS
        self.port: int | None = None
        self.proc: subprocess.Popen | None = None
        self.pid: int | None = None
        self._log_offset = 0
        self.tmpdir = tempfile.mkdtemp(prefix=prefix)
        os.chmod(self.tmpdir, 0o755)
        self.config_path = os.path.join(self.tmpdir, "sshd_config")
        self.pid_file = os.path.join(self.tmpdir, "sshd.pid")
        self.log_path = os.path.join(self.tmpdir, "sshd.log")
        self.authorized_keys = os.path.join(self.tmpdir, "authorized_keys")
        self.known_hosts = os.path.join(self.tmpdir, "known_hosts")
        self.host_keys: list[str] = []
        self.host_public_keys: list[str] = []
        self.client_key = os.path.join(self.tmpdir, "client_ed25519")
        try:
            self._generate_keys(tuple(host_key_types))
            with open(self.authorized_keys, "w") as f:
                for path, comment in self._authorized():
                    f.write(f"{public_key(path)} {comment}\n")
            os.chmod(self.authorized_keys, 0o644)
        except BaseException:
            shutil.rmtree(self.tmpdir, ignore_errors=True)
            raise

    # -- keys and configuration ------------------------------------------------
    def _generate_keys(self, host_key_types) -> None:
        for t in host_key_types:
            p = os.path.join(self.tmpdir, f"ssh_host_{t}_key")
            keygen(p, t)
            self.host_keys.append(p)
            self.host_public_keys.append(public_key(p))
        keygen(self.client_key, "ed25519", comment="sshpump-client")

    def _authorized(self) -> list[tuple[str, str]]:
        """(private key path, comment) of every key authorized_keys lets in."""
        return [(self.client_key, "sshpump-client")]

    def _config_items(self) -> dict:
        atf = self.allow_tcp_forwarding
        if isinstance(atf, bool):
            atf = "yes" if atf else "no"
        items = {
            "Port": str(self.port),
            "ListenAddress": [self.host] + (["::1"] if self.ipv6 else []),
            "AddressFamily": "any" if self.ipv6 else "inet",
            "HostKey": list(self.host_keys),
            "PidFile": self.pid_file,
            "AuthorizedKeysFile": self.authorized_keys,
            "StrictModes": "no",
            "UsePAM": "yes" if self.use_pam else "no",
            "PubkeyAuthentication": "yes",
            "PasswordAuthentication": "no",
            "KbdInteractiveAuthentication": "no",
            "PermitRootLogin": "prohibit-password" if self.user == "root" else "no",
            "PermitEmptyPasswords": "no",
            "AllowUsers": self.user,
            "AllowTcpForwarding": atf,
            "AllowStreamLocalForwarding": "yes",
            "AllowAgentForwarding": "no",
            "GatewayPorts": "no",
            "PermitTunnel": "no",
            "X11Forwarding": "no",
            "Ciphers": self.ciphers,
            "MaxSessions": "1000",
            "MaxStartups": "100:30:200",
            "MaxAuthTries": "20",
            "LoginGraceTime": "30",
            "UseDNS": "no",
            "PrintMotd": "no",
            "PrintLastLog": "no",
            "LogLevel": "VERBOSE",
            "Subsystem": "sftp internal-sftp",
        }
        if penalties_supported(self.tmpdir, self.host_keys[0]):
            items["PerSourcePenalties"] = "no"
        return items

    def _write_config(self) -> None:
        items = self._config_items()
        lower = {k.lower(): k for k in items}
        for k, v in self.extra_config.items():
            real = lower.get(k.lower(), k)
            if v is None:
                items.pop(real, None)
            else:
                items[real] = v
        lines = []
        for k, v in items.items():
            for one in (v if isinstance(v, (list, tuple)) else [v]):
                lines.append(f"{k} {one}")
        with open(self.config_path, "w") as f:
            f.write("\n".join(lines) + "\n")
        os.chmod(self.config_path, 0o644)

    def known_hosts_for(self, port: int, hosts=None, keys=None, path: str | None = None) -> str:
        """Write a known_hosts file pinning this server's host keys (or
        ``keys``) for ``[host]:port``.  Default hosts: 127.0.0.1, localhost,
        ::1 and this server's host."""
        if hosts is None:
            hosts = tuple(dict.fromkeys(("127.0.0.1", "localhost", "::1", self.host)))
        names = ",".join(h if port == 22 else f"[{h}]:{port}" for h in hosts)
        if path is None:
            path = os.path.join(self.tmpdir, f"known_hosts_{port}")
        with open(path, "w") as f:
            for k in (self.host_public_keys if keys is None else keys):
                f.write(f"{names} {k}\n")
        os.chmod(path, 0o644)
        return path

    # -- lifecycle -------------------------------------------------------------
    def _command(self) -> list[str]:
        return [SSHD, "-D", "-e", "-f", self.config_path]

    def _started(self, port: int) -> None:
        """Called once sshd listens on ``port``."""
        self.known_hosts_for(port, path=self.known_hosts)

    def _preexec(self):
        sig = self.parent_death_signal
        if not sig:
            return None
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        return lambda: libc.prctl(1, int(sig), 0, 0, 0)  # PR_SET_PDEATHSIG

    def _try_start(self, port: int, timeout: float = 15.0) -> str:
        """Start on ``port``; return "ok", "inuse" (bind failed) or raise."""
        self.port = port
        self._write_config()
        if os.geteuid() == 0:
            os.makedirs("/run/sshd", mode=0o755, exist_ok=True)  # privilege separation
        offset = os.path.getsize(self.log_path) if os.path.exists(self.log_path) else 0
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self._command(), stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=log, start_new_session=True,
                                         preexec_fn=self._preexec())
        want_v4 = f"Server listening on {self.host} port {port}."
        want_v6 = f"Server listening on ::1 port {port}."
        deadline = time.monotonic() + timeout
        while True:
            text = read_from(self.log_path, offset)
            if "Address already in use" in text:
                self._kill_proc()
                return "inuse"
            if want_v4 in text and (not self.ipv6 or want_v6 in text):
                self.pid = self.proc.pid
                self._log_offset = offset
                self._started(port)
                return "ok"
            if self.proc.poll() is not None:
                raise RuntimeError(f"sshd exited with {self.proc.returncode}:\n{text}")
            if time.monotonic() > deadline:
                self._kill_proc()
                raise RuntimeError(f"sshd did not report listening within {timeout}s:\n{text}")
            time.sleep(0.01)

    def start(self):
        for _ in range(10):
            # a guess from this namespace (a netns host cannot be bound here); sshd retries on a clash
            if self._try_start(free_port("127.0.0.1", also_v6=self.ipv6)) == "ok":
                return self
        raise RuntimeError("sshd: could not bind a free port in 10 tries; see " + self.log_path)

    def restart(self, timeout: float = 10.0):
        """Stop (dropping sessions) and start again on the SAME port and keys."""
        port = self.port
        self.stop()
        deadline = time.monotonic() + timeout
        while True:
            if self._try_start(port) == "ok":
                return self
            if time.monotonic() > deadline:
                raise RuntimeError(f"sshd: port {port} still in use after {timeout}s")
            time.sleep(0.2)

    def kill_sessions(self) -> None:
        """SIGKILL every per-connection sshd process; the listener keeps running.
        Clients see their TCP connection reset/closed without an SSH disconnect."""
        if self.proc is not None:
            kill_pids(descendants(self.proc.pid))

    def _kill_proc(self, sig=signal.SIGTERM) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            try:
                self.proc.send_signal(sig)
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def stop(self, kill_sessions: bool = True) -> None:
        """Stop the listener; with ``kill_sessions`` (default) also SIGKILL
        all established sessions (otherwise they survive, like a real sshd)."""
        if self.proc is None:
            return
        kids = descendants(self.proc.pid) if kill_sessions else []
        self._kill_proc()
        kill_pids(kids)
        self.pid = None

    def close(self) -> None:
        """stop() and remove tmpdir."""
        try:
            self.stop()
        finally:
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

    # -- helpers ---------------------------------------------------------------
    def log(self, all_runs: bool = False) -> str:
        return read_from(self.log_path, 0 if all_runs else self._log_offset)

    @property
    def version(self) -> str:
        r = subprocess.run([SSH, "-V"], capture_output=True, text=True)
        m = re.search(r"OpenSSH_[\w.]+", r.stderr)
        return m.group(0) if m else r.stderr.strip()

    def ssh_command(self, *args, options=(), key: str | None = None, agent: str | None = None,
                    known_hosts: str | None = None, host: str | None = None,
                    port: int | None = None) -> list[str]:
        """argv for the OpenSSH client.  ``options`` go before the destination,
        ``args`` after it (OpenSSH still parses leading ``-N -L ...`` there;
        anything else is the remote command).  NOTE: for ssh the FIRST value
        of an option wins, so ``options`` cannot override the ones built in
        here -- use the keyword arguments (key, agent, known_hosts, host, port).
        ``agent``: path of an agent socket to authenticate with instead of a key."""
        if agent:
            auth = ["-o", "IdentitiesOnly=no", "-o", f"IdentityAgent={agent}"]
        else:
            auth = ["-i", key or self.client_key, "-o", "IdentitiesOnly=yes",
                    "-o", "IdentityAgent=none"]
        return [
            SSH, "-F", "none", "-p", str(port or self.port),
            *auth,
            "-o", f"UserKnownHostsFile={known_hosts or self.known_hosts}",
            "-o", "GlobalKnownHostsFile=/dev/null",
            "-o", "StrictHostKeyChecking=yes",
            "-o", "BatchMode=yes",
            "-o", "Ciphers=aes128-gcm@openssh.com",
            *options,
            f"{self.user}@{host or self.host}",
            *args,
        ]
