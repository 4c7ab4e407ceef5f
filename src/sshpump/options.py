"""Connection and forwarding options shared by the CLI, the API and workers."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from .spec import LocalForward

DEFAULT_CIPHERS = (
    "aes128-gcm@openssh.com,aes256-gcm@openssh.com,chacha20-poly1305@openssh.com,"
    "aes128-ctr,aes256-ctr"
)
STRICT_VALUES = ("yes", "accept-new", "no")


def default_workers() -> int:
    """One worker process per CPU this process may run on."""
    return max(1, len(os.sched_getaffinity(0)))


def default_identities() -> list[str]:
    home = os.path.expanduser("~/.ssh")
    names = ("id_ed25519", "id_ecdsa", "id_rsa")
    return [os.path.join(home, n) for n in names if os.path.exists(os.path.join(home, n))]


@dataclass
class Options:
    host: str
    user: str = field(default_factory=lambda: os.environ.get("USER") or "root")
    port: int = 22
    forwards: list[LocalForward] = field(default_factory=list)
    identities: list[str] = field(default_factory=list)
    identities_only: bool = False
    use_agent: bool = True
    password: str | None = None
    passphrase: str | None = None
    known_hosts: list[str] = field(default_factory=lambda: [os.path.expanduser("~/.ssh/known_hosts")])
    strict_host_key_checking: str = "yes"
    connect_timeout: float | None = 30.0  # TCP connect + handshake + auth; None = no bound
    server_alive_interval: float = 30.0
    server_alive_count_max: int = 3
    exit_on_forward_failure: bool = False
    gateway_ports: bool = False
    ciphers: str = DEFAULT_CIPHERS
    workers: int = 0
    sessions_per_worker: int = 1  # SSH sessions in each worker (sessionpool.py)
    window: int = 0
    bufsize: int = 131072
    client_wait: float = 10.0     # how long a client waits for a live session
    drain_timeout: float = 10.0   # grace period on SIGTERM/SIGINT
    reconnect_max: float = 30.0   # cap of the reconnect backoff
    verbose: int = 0
    # How the TCP stream to the server is made (issue 10): jump hosts as
    # ssh -J writes them ("[user@]host[:port]", first hop first), or a
    # ProxyCommand with its %-tokens not yet expanded. Both empty: TCP.
    proxy_jump: list[str] = field(default_factory=list)
    proxy_command: str | None = None
    # --mux (issue 11): -L clients as streams of one exec channel to a remote
    # agent (sshpump.mux) instead of one SSH channel each.
    mux: bool = False

    def identity_files(self) -> list[str]:
        if self.identities:
            return list(self.identities)
        return [] if self.identities_only else default_identities()
