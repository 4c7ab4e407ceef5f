"""A real OpenSSH sshd (``/usr/sbin/sshd -D -e -f CONFIG``) for tests.

Must run as root (sshd needs it to switch to the login user).  Logs in as the
system user ``sshpump-test`` (created by scripts/install-system-deps.sh);
the login user's password is random per machine, kept in a root-only file
(``/var/lib/sshpump-test/password``) and set with ``chpasswd`` when that file
is created, so that every Sshd (in this process or another) agrees on it.

    with Sshd() as s:
        subprocess.run(s.ssh_command("true"), check=True)
"""
from __future__ import annotations

import os
import re
import secrets
import signal
import subprocess
import tempfile
import time

from ._util import (Service, children_of, free_port, ipv6_loopback_available, kill_pids, read_from,
                    socket_inodes, tcp_ports_by_inode)

SSHD = "/usr/sbin/sshd"
SSH = "/usr/bin/ssh"
SSH_KEYGEN = "/usr/bin/ssh-keygen"
DEFAULT_USER = "sshpump-test"

CIPHERS = ("aes128-gcm@openssh.com,aes256-gcm@openssh.com,chacha20-poly1305@openssh.com,"
           "aes128-ctr,aes192-ctr,aes256-ctr")

_penalties_supported: bool | None = None


PASSWORD_DIR = "/var/lib/sshpump-test"


def _machine_password(user: str) -> str:
    """One random password per machine and user, shared by every Sshd."""
    path = os.path.join(PASSWORD_DIR, f"{user}.password")
    try:
        with open(path) as f:
            return f.read().strip()
    except FileNotFoundError:
        pass
    os.makedirs(PASSWORD_DIR, mode=0o700, exist_ok=True)
    password = secrets.token_urlsafe(18)
    tmp = f"{path}.{os.getpid()}"
    with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:
        f.write(password)
    try:
        os.link(tmp, path)  # first writer wins; others read its password
    except FileExistsError:
        pass
    finally:
        os.unlink(tmp)
    with open(path) as f:
        return f.read().strip()


def _keygen(path: str, ktype: str, passphrase: str = "", comment: str = "") -> None:
    args = [SSH_KEYGEN, "-q", "-t", ktype, "-N", passphrase, "-C", comment, "-f", path]
    if ktype == "rsa":
        args[3:3] = ["-b", "3072"]
    subprocess.run(args, check=True, stdin=subprocess.DEVNULL)
    os.chmod(path, 0o600)
    os.chmod(path + ".pub", 0o644)


def _pub(path: str) -> str:
    with open(path + ".pub") as f:
        parts = f.read().split()
    return f"{parts[0]} {parts[1]}"


def _check_penalties(tmpdir: str, hostkey: str) -> bool:
    """Does this sshd understand ``PerSourcePenalties``? (OpenSSH >= 9.8)"""
    global _penalties_supported
    if _penalties_supported is None:
        cfg = os.path.join(tmpdir, "probe_config")
        with open(cfg, "w") as f:
            f.write(f"HostKey {hostkey}\nPerSourcePenalties no\nUsePAM no\n")
        r = subprocess.run([SSHD, "-t", "-f", cfg], capture_output=True, text=True)
        os.unlink(cfg)
        _penalties_supported = r.returncode == 0
    return _penalties_supported


class Sshd(Service):
    """Real OpenSSH server on 127.0.0.1 (and [::1] when available).

    Constructor::

        Sshd(permit_open=None, allow_tcp_forwarding=True, extra_config=None,
             user="sshpump-test", host_key_types=("ed25519", "ecdsa"), ipv6=None,
             netns=None, host=None)

    * ``permit_open``: value for ``PermitOpen`` (str, or list joined by spaces),
      e.g. ``"127.0.0.1:5432"`` or ``"none"``.
    * ``allow_tcp_forwarding``: bool, or an sshd string ("local", "no", ...).
    * ``extra_config``: {keyword: value}; overrides defaults (case-insensitive);
      value ``None`` drops a default; a list value repeats the keyword.
    * ``ipv6``: also listen on ::1 (default: if the host has IPv6 loopback).
    * ``netns``: run sshd inside that network namespace (``ip netns exec``),
      listening on ``host`` alone (an address of the namespace, e.g.
      testbed.netns.Netns.addr); forwarded connections then start there too.

    Attributes: host ("127.0.0.1" unless given), port, user, password, client_key,
    client_key_encrypted, client_key_passphrase, known_hosts,
    wrong_known_hosts, host_keys (private key paths), host_public_keys
    ("type base64" strings), tmpdir, config_path, log_path, pid, proc, ipv6,
    ciphers.

    Methods: start(), stop(kill_sessions=True), restart(), kill_sessions(),
    session_pids(client_pid), log() (text of the sshd log), ssh_command(*args, options=(), key=None),
    known_hosts_for(port, hosts=..., wrong=False) -> path.
    """

    host = "127.0.0.1"

    def __init__(self, permit_open=None, allow_tcp_forwarding=True, extra_config=None,
                 user: str = DEFAULT_USER, host_key_types=("ed25519", "ecdsa"), ipv6=None,
                 netns: str | None = None, host: str | None = None):
        if os.geteuid() != 0:
            raise RuntimeError("testbed.Sshd must run as root")
        if (netns is None) != (host is None):
            raise ValueError("Sshd: netns and host go together")
        self.netns = netns
        if host is not None:
            self.host = host
            ipv6 = False
        self.permit_open = permit_open
        self.allow_tcp_forwarding = allow_tcp_forwarding
        self.extra_config = dict(extra_config or {})
        self.user = user
        self.ipv6 = ipv6_loopback_available() if ipv6 is None else bool(ipv6)
        self.ciphers = CIPHERS
        self.port: int | None = None
        self.proc: subprocess.Popen | None = None
        self.pid: int | None = None
        self.password = _machine_password(self.user)
        self.client_key_passphrase = "pass-" + secrets.token_urlsafe(12)

        self.tmpdir = tempfile.mkdtemp(prefix="sshpump-sshd-")
        os.chmod(self.tmpdir, 0o755)
        self.config_path = os.path.join(self.tmpdir, "sshd_config")
        self.pid_file = os.path.join(self.tmpdir, "sshd.pid")
        self.log_path = os.path.join(self.tmpdir, "sshd.log")
        self.authorized_keys = os.path.join(self.tmpdir, "authorized_keys")
        self.known_hosts = os.path.join(self.tmpdir, "known_hosts")
        self.wrong_known_hosts = os.path.join(self.tmpdir, "wrong_known_hosts")

        self.host_keys = []
        self.host_public_keys = []
        self.wrong_host_public_keys = []
        wrongdir = os.path.join(self.tmpdir, "wrong")
        os.mkdir(wrongdir, 0o700)
        for t in host_key_types:
            p = os.path.join(self.tmpdir, f"ssh_host_{t}_key")
            _keygen(p, t)
            self.host_keys.append(p)
            self.host_public_keys.append(_pub(p))
            w = os.path.join(wrongdir, f"ssh_host_{t}_key")
            _keygen(w, t)
            self.wrong_host_public_keys.append(_pub(w))

        self.client_key = os.path.join(self.tmpdir, "client_ed25519")
        _keygen(self.client_key, "ed25519", comment="sshpump-test-client")
        self.client_key_encrypted = os.path.join(self.tmpdir, "client_ed25519_encrypted")
        _keygen(self.client_key_encrypted, "ed25519", self.client_key_passphrase,
                comment="sshpump-test-client-encrypted")
        with open(self.authorized_keys, "w") as f:
            f.write(_pub(self.client_key) + " sshpump-test-client\n")
            f.write(_pub(self.client_key_encrypted) + " sshpump-test-client-encrypted\n")
        os.chmod(self.authorized_keys, 0o644)
        self._log_offset = 0

    # -- configuration -------------------------------------------------
    def _config_items(self):
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
            "UsePAM": "no",
            "PubkeyAuthentication": "yes",
            "PasswordAuthentication": "yes",
            "KbdInteractiveAuthentication": "no",
            "PermitRootLogin": "no",
            "PermitEmptyPasswords": "no",
            "AllowUsers": self.user,
            "AllowTcpForwarding": atf,
            "AllowStreamLocalForwarding": "yes",
            "AllowAgentForwarding": "yes",
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
        if self.permit_open is not None:
            po = self.permit_open
            items["PermitOpen"] = po if isinstance(po, str) else " ".join(po)
        if _check_penalties(self.tmpdir, self.host_keys[0]):
            items["PerSourcePenalties"] = "no"
        lower = {k.lower(): k for k in items}
        for k, v in self.extra_config.items():
            real = lower.get(k.lower(), k)
            if v is None:
                items.pop(real, None)
            else:
                items[real] = v
        return items

    def _write_config(self):
        lines = []
        for k, v in self._config_items().items():
            for one in (v if isinstance(v, (list, tuple)) else [v]):
                lines.append(f"{k} {one}")
        with open(self.config_path, "w") as f:
            f.write("\n".join(lines) + "\n")
        os.chmod(self.config_path, 0o644)

    def known_hosts_for(self, port: int, hosts=None,
                        wrong: bool = False, path: str | None = None) -> str:
        """Write a known_hosts file pinning this server's host keys (or the
        wrong ones) for ``[host]:port`` -- e.g. for a proxy in front of it.
        Default hosts: 127.0.0.1, localhost, ::1 and this server's host."""
        if hosts is None:
            hosts = tuple(dict.fromkeys(("127.0.0.1", "localhost", "::1", self.host)))
        keys = self.wrong_host_public_keys if wrong else self.host_public_keys
        names = ",".join(h if port == 22 else f"[{h}]:{port}" for h in hosts)
        if path is None:
            path = os.path.join(self.tmpdir, f"known_hosts_{port}{'_wrong' if wrong else ''}")
        with open(path, "w") as f:
            for k in keys:
                f.write(f"{names} {k}\n")
        os.chmod(path, 0o644)
        return path

    # -- lifecycle ------------------------------------------------------
    def _set_password(self):
        subprocess.run(["chpasswd"], input=f"{self.user}:{self.password}\n", text=True,
                       check=True, capture_output=True)

    def _try_start(self, port: int, timeout: float = 15.0) -> str:
        """Start on ``port``; return "ok", "inuse" (bind failed) or raise."""
        self.port = port
        self._write_config()
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)
        offset = os.path.getsize(self.log_path) if os.path.exists(self.log_path) else 0
        with open(self.log_path, "ab") as log:
            prefix = ["ip", "netns", "exec", self.netns] if self.netns else []
            self.proc = subprocess.Popen([*prefix, SSHD, "-D", "-e", "-f", self.config_path],
                                         stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                         start_new_session=True)
        want_v4 = f"Server listening on {self.host} port {port}."
        want_v6 = f"Server listening on ::1 port {port}."
        deadline = time.monotonic() + timeout
        while True:
            text = read_from(self.log_path, offset)
            if "Address already in use" in text:
                self._kill_proc()
                return "inuse"
            ok = want_v4 in text and (not self.ipv6 or want_v6 in text)
            if ok:
                self.pid = self.proc.pid
                self._log_offset = offset
                self.known_hosts_for(port, path=self.known_hosts)
                self.known_hosts_for(port, wrong=True, path=self.wrong_known_hosts)
                return "ok"
            if self.proc.poll() is not None:
                raise RuntimeError(f"sshd exited with {self.proc.returncode}:\n{text}")
            if time.monotonic() > deadline:
                self._kill_proc()
                raise RuntimeError(f"sshd did not report listening within {timeout}s:\n{text}")
            time.sleep(0.01)

    def start(self):
        self._set_password()
        for _ in range(10):
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

    def kill_sessions(self):
        """SIGKILL every per-connection sshd process; the listener keeps running.
        Clients see their TCP connection reset/closed without an SSH disconnect."""
        if self.proc is not None:
            kill_pids(children_of(self.proc.pid))

    def session_pids(self, client_pid: int) -> list[int]:
        """The per-connection sshd processes (privileged monitor and session
        child) serving the SSH connections that process ``client_pid`` made to
        this server: those holding the server end of a TCP connection whose
        client port is one of that process's sockets.  SIGSTOP them to hang
        one session while the listener and every other session keep going."""
        ports = tcp_ports_by_inode()
        client_ports = {ports[i][0] for i in socket_inodes(client_pid)
                        if i in ports and ports[i][1] == self.port}
        server_ends = {i for i, (local, remote) in ports.items()
                       if local == self.port and remote in client_ports}
        kids = children_of(self.proc.pid) if self.proc is not None else []
        return sorted(k for k in kids if socket_inodes(k) & server_ends)

    def _kill_proc(self, sig=signal.SIGTERM):
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

    def stop(self, kill_sessions: bool = True):
        """Stop the listener; with ``kill_sessions`` (default) also SIGKILL
        all established sessions (otherwise they survive, like a real sshd)."""
        if self.proc is None:
            return
        kids = children_of(self.proc.pid) if kill_sessions else []
        self._kill_proc()
        kill_pids(kids)
        self.pid = None


    # -- helpers --------------------------------------------------------
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
