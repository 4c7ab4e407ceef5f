"""The library API: open forwards from Python, e.g.

    with sshpump.forward("bastion", "0:db.internal:5432", user="me") as t:
        conn = psycopg.connect(host=t.local_address[0], port=t.local_address[1])

The tunnel runs on its own event loop in a background thread of this
process (``workers=0``) or in worker processes (``workers >= 1``).
"""

from __future__ import annotations

import asyncio
import threading

from .aio import AsyncTunnel, Forward
from .options import Options
from .sshopts import build_options


class Tunnel:
    """A running set of forwards. Close it (or use ``with``) to stop.

    It runs an aio.AsyncTunnel on an event loop of its own in a background
    thread; every method here is safe to call from any thread but that one."""

    def __init__(self, opts: Options, control_path: str | None = None):
        self.opts = opts
        self._aio = AsyncTunnel(opts, control_path)
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
        try:
            await self._aio.start()
        except BaseException as e:  # reported to the caller of start()
            self._error = e
            self._started.set()
            return
        self._started.set()
        try:
            await self._aio.wait_closed()
        except Exception as e:  # noqa: BLE001 - kept for wait_closed() / close()
            self.error = e

    def _call(self, fn, *args):
        """Run fn(*args) on the tunnel's loop; its result or its exception."""
        if self._stopped.is_set():
            raise RuntimeError("the tunnel is closed")

        async def call():
            result = fn(*args)
            return await result if asyncio.iscoroutine(result) else result

        return asyncio.run_coroutine_threadsafe(call(), self._loop).result()

    error = None   # what stopped the tunnel on its own (e.g. AuthError), if anything

    @property
    def forwards(self) -> list[Forward]:
        return self._call(lambda: self._aio.forwards)

    @property
    def addresses(self):
        """Every listening address: (host, port) tuples and unix paths, in -L order."""
        return self._call(lambda: self._aio.addresses)

    @property
    def remote_ports(self) -> list:
        """-R: the ports the server listens on, in -R order (None: not bound now)."""
        return self._call(lambda: self._aio.remote_ports)

    @property
    def local_address(self):
        """The first forward's listening address: (host, port) or a unix path."""
        return self.addresses[0]

    def add(self, spec: str, kind: str = "L") -> Forward:
        """Listen for one more forward now: an -L spec, or with kind="D" a
        -D [bind:]port (a SOCKS proxy); returns the Forward (its id and
        bound addresses). kind="R": a -R spec; returns once the server
        listens (Forward.remote_port). Raises SpecError or ForwardError."""
        if kind == "R":
            return self._call(self._aio.add_remote, spec)
        return self._call(self._aio.add, spec, kind)

    def remove(self, forward) -> None:
        """Stop listening for a forward (a Forward, its id or its spec) at
        once; its open connections get the drain timeout to finish."""
        self._call(self._aio.remove, forward)

    def connections(self) -> list[dict]:
        """The connections it carries now (id, forward, client, target,
        worker, state, age, bytes up and down, buffered)."""
        return self._call(self._aio.connections)

    def stats(self) -> dict:
        """The tunnel's state, forwards, workers (session up, load, pump
        buffers) and totals."""
        return self._call(self._aio.stats)

    def close(self, drain_timeout: float | None = None):
        """Stop accepting, let connections finish (up to drain_timeout), stop."""
        if self._loop is None or self._stopped.is_set():
            return
        self._loop.call_soon_threadsafe(self._aio.close, drain_timeout)
        self._stopped.wait()
        self._thread.join()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def forward(destination: str, *specs: str, control: str | None = None, **kwargs) -> Tunnel:
    """Start forwards through ``destination`` ("[user@]host") and return the Tunnel.

    ``specs`` are ``-L`` specs exactly as ssh writes them; ``remote=`` takes
    -R specs and ``dynamic=`` -D specs. Keyword arguments:
    port, user, identity, password, passphrase, known_hosts,
    strict_host_key_checking, workers, control (a control socket path, as
    --control) and any Options field (connect_timeout, server_alive_interval,
    exit_on_forward_failure, gateway_ports, window, drain_timeout, verbose,
    ...). Raises UsageError (a ValueError) for a bad argument before anything
    connects, or another SshpumpError subclass (ConnectError, HostKeyError,
    AuthError, ForwardError, SpecError) when the tunnel cannot start -- with
    worker processes too.
    """
    return Tunnel(build_options(destination, specs, **kwargs), control).start()
