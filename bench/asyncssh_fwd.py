"""asyncssh ``forward_local_port`` runner: ``python -m bench.asyncssh_fwd --port ... --target H:P``.

Plain asyncio event loop (what an asyncssh user gets by default)."""
from __future__ import annotations

import asyncio
import os
import signal
import sys

import asyncssh

try:
    from . import _runner_common as rc
except ImportError:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import _runner_common as rc  # type: ignore


async def amain(a):
    conn = await asyncssh.connect(a.host, port=a.port, username=a.user, client_keys=[a.key],
                                  known_hosts=a.known_hosts, encryption_algs=[a.cipher],
                                  agent_path=None)
    listen = []
    for h, p in a.targets:
        lst = await conn.forward_local_port("127.0.0.1", 0, h, p)
        listen.append(("127.0.0.1", lst.get_port()))
    cipher = conn.get_extra_info("send_cipher")
    rc.report(listen, cipher or a.cipher)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_reader(sys.stdin.fileno(), lambda: None if os.read(sys.stdin.fileno(), 4096) else stop.set())
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    os._exit(0)


def main():
    rc.raise_nofile()
    asyncio.run(amain(rc.parse("python -m bench.asyncssh_fwd")))


if __name__ == "__main__":
    main()
