"""The library API: open forwards from Python, e.g.

    with sshpump.forward("bastion", "0:db.internal:5432", user="me") as t:
        conn = psycopg.connect(host=t.local_address[0], port=t.local_address[1])

The tunnel runs on its own event loop in a background thread of this
process (``workers=0``) or in worker processes (``workers >= 1``).
"""

from __future__ import annotations

import os
import threading

from .master import Master
from .options import Options
from .spec import parse_local_forward
from .sshopts import check_options


class Tunnel:
    """A running set of forwards. Close it (or use ``with``) to stop."""

    def __init__(self, opts: Options):
        self.opts = opts
        self._master = None
        self._loop = None
        self._thread = None
        self._error = None
        self._started = threading.Event()
        self._stopped = threading.Event()

    def start(self) -> "Tunnel":
        self._thread = threading.Thread(target=self._run, name="sshpump", daemon=True)
        self._thread.start()
        self._started.wait()
        if self._error is not None:
            self._thread.join()
            raise self._error
        return self

    def _run(self):
        import uvloop

        self._loop = uvloop.new_event_loop()
        try:
            self._loop.run_until_complete(self._main())
        finally:
            self._loop.close()
            self._stopped.set()

    async def _main(self):
        self._master = Master(self.opts)
        try:
            await self._master.start()
        except BaseException as e:  # reported to the caller of start()
            self._error = e
            self._started.set()
            return
        self._started.set()
        await self._master.serve()

    @property
    def addresses(self):
        """Every listening address: (host, port) tuples and unix paths, in -L order."""
        return [addr for _, addr in self._master.addresses()]

    @property
    def local_address(self):
        """The first forward's listening address: (host, port) or a unix path."""
        return self.addresses[0]

    def close(self, drain_timeout: float | None = None):
        """Stop accepting, let connections finish (up to drain_timeout), stop."""
        if self._loop is None or self._stopped.is_set():
            return
        if drain_timeout is not None:
            self.opts.drain_timeout = drain_timeout
        self._loop.call_soon_threadsafe(self._master.request_stop)
        self._stopped.wait()
        self._thread.join()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def forward(
    destination: str,
    *specs: str,
    port: int = 22,
    user: str | None = None,
    identity: str | list[str] | None = None,
    password: str | None = None,
    passphrase: str | None = None,
    known_hosts: str | list[str] | None = None,
    strict_host_key_checking: str = "yes",
    workers: int = 0,
    **options,
) -> Tunnel:
    """Start forwards through ``destination`` ("[user@]host") and return the Tunnel.

    ``specs`` are ``-L`` specs exactly as ssh writes them. Remaining keyword
    arguments set Options fields (connect_timeout, server_alive_interval,
    exit_on_forward_failure, gateway_ports, window, verbose, ...). Raises
    UsageError (a ValueError) for a bad argument before anything connects,
    or another SshpumpError subclass (ConnectError, HostKeyError, AuthError,
    ForwardError, SpecError) when the tunnel cannot start.
    """
    u, _, host = destination.rpartition("@")
    opts = Options(host=host, port=port, workers=workers)
    if u or user:
        opts.user = user or u
    if identity:
        opts.identities = [identity] if isinstance(identity, (str, os.PathLike)) else list(identity)
        opts.identities = [os.path.expanduser(os.fspath(p)) for p in opts.identities]
    opts.password = password
    opts.passphrase = passphrase
    if known_hosts:
        opts.known_hosts = [known_hosts] if isinstance(known_hosts, (str, os.PathLike)) else list(known_hosts)
        opts.known_hosts = [os.path.expanduser(os.fspath(p)) for p in opts.known_hosts]
    opts.strict_host_key_checking = strict_host_key_checking
    opts.forwards = [parse_local_forward(s) for s in specs]
    for key, value in options.items():
        if not hasattr(opts, key):
            raise TypeError(f"forward() got an unknown option {key!r}")
        setattr(opts, key, value)
    check_options(opts)  # bad values fail here, not inside a worker
    return Tunnel(opts).start()
