"""The asyncio API, in the caller's running loop (uvloop or not):

    async with sshpump.aio.forward("bastion", "0:db.internal:5432", user="me") as t:
        host, port = t.local_address
        extra = t.add("0:cache.internal:6379")     # a Forward, listening already
        await t.connections()                      # what it carries now
        t.remove(extra)

    t = await sshpump.aio.forward(...)             # or without `async with`
    t.close(); await t.wait_closed()

With ``workers=0`` (the default) the tunnel's session and pump run in this
loop; the SSH handshake runs in a thread, so nothing here blocks the loop.
With ``workers >= 1`` they run in worker processes."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from . import commands
from .options import Options
from .runtime import Runtime
from .sshopts import build_options


@dataclass(frozen=True)
class Forward:
    """One forward of a running tunnel."""

    id: str
    spec: str
    target: str
    addresses: tuple        # every listening address: (host, port) tuples or unix paths
    kind: str = "L"         # "L", "R" or "D"
    remote_port: int | None = None   # -R: the port the server listens on (None until it has answered)

    @property
    def address(self):
        """The first listening address: (host, port) or a unix path."""
        return self.addresses[0]

    @classmethod
    def from_info(cls, info: dict) -> "Forward":
        remote = info.get("remote")
        if remote is not None:
            return cls(info["id"], info["spec"], info["target"], (), "R",
                       remote["port"] if remote["state"] == "bound" else None)
        return cls(info["id"], info["spec"], info["target"],
                   tuple(tuple(a) if isinstance(a, list) else a for a in info["listen"]), info.get("kind", "L"))


class AsyncTunnel:
    """A running set of forwards through one destination."""

    def __init__(self, opts: Options, control_path: str | None = None):
        self.opts = opts
        self._runtime = Runtime(control_path=control_path)
        self._serving: asyncio.Task | None = None

    async def start(self) -> "AsyncTunnel":
        if self._serving is None:
            rt = self._runtime
            if not await rt.start([("default", self.opts)]):
                raise RuntimeError("stopped while starting")
            self._serving = asyncio.ensure_future(rt.serve())
        return self

    def __await__(self):
        return self.start().__await__()

    async def __aenter__(self) -> "AsyncTunnel":
        return await self.start()

    async def __aexit__(self, *exc):
        self.close()
        await self.wait_closed()

    @property
    def _tunnel(self):
        return self._runtime.tunnels["default"]

    @property
    def forwards(self) -> list[Forward]:
        return [Forward.from_info(i) for i in self._tunnel.forward_list()]

    @property
    def remote_ports(self) -> list:
        """-R: the ports the server listens on, in -R order (None: not bound now)."""
        return [f.remote_port for f in self.forwards if f.kind == "R"]

    @property
    def addresses(self) -> list:
        """Every listening address: (host, port) tuples and unix paths, in order."""
        return [a for f in self.forwards for a in f.addresses]

    @property
    def local_address(self):
        """The first forward's first listening address."""
        return self.forwards[0].address

    def add(self, spec: str, kind: str = "L") -> Forward:
        """Listen for one more forward now: an -L spec, or with kind="D" a
        -D [bind:]port (a SOCKS proxy); raises SpecError/ForwardError. With
        kind="R" the server is asked to listen and the Forward returns at
        once (remote_port None): ``await add_remote()`` waits for its answer."""
        return Forward.from_info(commands.add(self._runtime, spec, kind=kind))

    async def add_remote(self, spec: str) -> Forward:
        """-R [bind:]port:host:hostport or [bind:]port:/local/socket, once
        the server listens (remote_port: the port it bound); ForwardError
        if it refuses."""
        return Forward.from_info(await commands.add_settled(self._runtime, spec, kind="R"))

    def remove(self, forward) -> None:
        """Stop listening for a forward (a Forward, its id or its spec) at
        once; its connections get the drain timeout to finish."""
        commands.remove(self._runtime, forward.id if isinstance(forward, Forward) else forward)

    async def connections(self) -> list[dict]:
        return (await commands.connections(self._runtime))["connections"]

    async def stats(self) -> dict:
        return (await commands.stats(self._runtime))["tunnels"]["default"]

    def close(self, drain_timeout: float | None = None) -> None:
        """Stop accepting; connections get drain_timeout (default: the
        tunnel's) to finish. Await wait_closed() for the end."""
        self._runtime.request_stop(drain_timeout)

    async def wait_closed(self) -> None:
        """Until the tunnel has stopped; raises the error that stopped it
        (e.g. AuthError when a replaced worker can no longer log in)."""
        if self._serving is not None:
            await asyncio.shield(self._serving)


def forward(destination: str, *specs: str, **kwargs) -> AsyncTunnel:
    """Same arguments as sshpump.forward(); await it or use `async with`."""
    control = kwargs.pop("control", None)
    return AsyncTunnel(build_options(destination, specs, **kwargs), control)
