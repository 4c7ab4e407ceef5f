"""A real OpenSSH sshd (``sshd -D -e -f CONFIG``) for tests and the bench.

The launcher itself (keys, config, start/stop, known_hosts, ssh argv) is
sshpump's own, ``sshpump.demo.sshd`` (also behind ``sshpump demo``); this
subclass adds what tests need on top: a dedicated login user with a password,
an encrypted client key, wrong host keys, ``PermitOpen``, network namespaces
and per-client session pids.

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
import secrets
import subprocess

from sshpump.demo import sshd as _base
from sshpump.demo.sshd import CIPHERS, SSH, SSH_KEYGEN, keygen, public_key  # noqa: F401 (re-exported)

from ._util import Service, ipv6_loopback_available, socket_inodes, tcp_ports_by_inode

SSHD = _base.SSHD
DEFAULT_USER = "sshpump-test"
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


class Sshd(_base.Sshd, Service):
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

    def __init__(self, permit_open=None, allow_tcp_forwarding=True, extra_config=None,
                 user: str = DEFAULT_USER, host_key_types=("ed25519", "ecdsa"), ipv6=None,
                 netns: str | None = None, host: str | None = None):
        if os.geteuid() != 0:
            raise RuntimeError("testbed.Sshd must run as root")
        if (netns is None) != (host is None):
            raise ValueError("Sshd: netns and host go together")
        self.netns = netns
        if host is not None:
            ipv6 = False
        self.permit_open = permit_open
        self.password = _machine_password(user)
        self.client_key_passphrase = "pass-" + secrets.token_urlsafe(12)
        super().__init__(user=user, host=host,
                         ipv6=ipv6_loopback_available() if ipv6 is None else bool(ipv6),
                         host_key_types=host_key_types, allow_tcp_forwarding=allow_tcp_forwarding,
                         extra_config=extra_config, use_pam=False)
        self.wrong_known_hosts = os.path.join(self.tmpdir, "wrong_known_hosts")

    # -- keys and configuration ------------------------------------------------
    def _generate_keys(self, host_key_types) -> None:
        super()._generate_keys(host_key_types)
        self.wrong_host_public_keys = []
        wrongdir = os.path.join(self.tmpdir, "wrong")
        os.mkdir(wrongdir, 0o700)
        for t in host_key_types:
            w = os.path.join(wrongdir, f"ssh_host_{t}_key")
            keygen(w, t)
            self.wrong_host_public_keys.append(public_key(w))
        self.client_key_encrypted = os.path.join(self.tmpdir, "client_ed25519_encrypted")
        keygen(self.client_key_encrypted, "ed25519", self.client_key_passphrase,
               comment="sshpump-test-client-encrypted")

    def _authorized(self):
        return [(self.client_key, "sshpump-test-client"),
                (self.client_key_encrypted, "sshpump-test-client-encrypted")]

    def _config_items(self):
        items = super()._config_items()
        items.update({"PasswordAuthentication": "yes", "PermitRootLogin": "no",
                      "AllowAgentForwarding": "yes"})
        if self.permit_open is not None:
            po = self.permit_open
            items["PermitOpen"] = po if isinstance(po, str) else " ".join(po)
        return items

    def known_hosts_for(self, port: int, hosts=None,
                        wrong: bool = False, path: str | None = None) -> str:
        """Write a known_hosts file pinning this server's host keys (or the
        wrong ones) for ``[host]:port`` -- e.g. for a proxy in front of it.
        Default hosts: 127.0.0.1, localhost, ::1 and this server's host."""
        if path is None:
            path = os.path.join(self.tmpdir, f"known_hosts_{port}{'_wrong' if wrong else ''}")
        return super().known_hosts_for(port, hosts=hosts, path=path,
                                       keys=self.wrong_host_public_keys if wrong else None)

    # -- lifecycle -------------------------------------------------------------
    def _command(self):
        prefix = ["ip", "netns", "exec", self.netns] if self.netns else []
        return [*prefix, *super()._command()]

    def _started(self, port):
        super()._started(port)
        self.known_hosts_for(port, wrong=True, path=self.wrong_known_hosts)

    def _set_password(self):
        subprocess.run(["chpasswd"], input=f"{self.user}:{self.password}\n", text=True,
                       check=True, capture_output=True)

    def start(self):
        self._set_password()
        return super().start()

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
        kids = _base.descendants(self.proc.pid) if self.proc is not None else []
        return sorted(k for k in kids if socket_inodes(k) & server_ends)
