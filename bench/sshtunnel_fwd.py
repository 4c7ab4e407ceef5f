"""sshtunnel (paramiko) runner: ``python -m bench.sshtunnel_fwd --port ... --target H:P``.

paramiko's cipher preference is narrowed to the requested cipher
(aes128-gcm@openssh.com is supported by paramiko >= 3.x; the negotiated one is reported)."""
from __future__ import annotations

import os
import signal
import sys

import paramiko
import sshtunnel

try:
    from . import _runner_common as rc
except ImportError:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import _runner_common as rc  # type: ignore


def main():
    rc.raise_nofile()
    a = rc.parse("python -m bench.sshtunnel_fwd")
    if a.cipher in paramiko.Transport._preferred_ciphers:
        paramiko.Transport._preferred_ciphers = (a.cipher,)
    fw = sshtunnel.SSHTunnelForwarder(
        (a.host, a.port), ssh_username=a.user, ssh_pkey=a.key, allow_agent=False,
        host_pkey_directories=[], remote_bind_addresses=list(a.targets),
        local_bind_addresses=[("127.0.0.1", 0)] * len(a.targets), set_keepalive=0)
    fw.start()
    cipher = getattr(fw._transport, "remote_cipher", None) or "?"
    rc.report([("127.0.0.1", p) for p in fw.local_bind_ports], cipher)
    signal.signal(signal.SIGTERM, lambda *x: os._exit(0))
    try:
        while os.read(sys.stdin.fileno(), 4096):
            pass
    except OSError:
        pass
    os._exit(0)  # sshtunnel's stop() can block until clients close: skip it


if __name__ == "__main__":
    main()
