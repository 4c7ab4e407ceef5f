"""A route: how a worker reaches the far end of one forward's connections.

A forward crosses from the master to a worker as its route -- the forward's
id, the channel kind and the target -- carried with every client it hands
over, never as an index into a list the worker holds: a forward added at
runtime is known to every worker by the first client it brings."""

from __future__ import annotations

from dataclasses import dataclass

from .spec import Endpoint

DIRECT_TCPIP = "direct-tcpip"                            # -L host:port
DIRECT_STREAMLOCAL = "direct-streamlocal@openssh.com"    # -L /remote/socket


@dataclass(frozen=True)
class Route:
    id: str            # the forward's id ("f1"), unique in this process run
    kind: str          # the SSH channel type to open
    target: Endpoint

    @classmethod
    def for_target(cls, forward_id: str, target: Endpoint) -> "Route":
        return cls(forward_id, DIRECT_STREAMLOCAL if target.is_unix else DIRECT_TCPIP, target)

    def to_wire(self) -> list:
        t = self.target
        return [self.id, self.kind, t.path if t.is_unix else [t.host, t.port]]

    @classmethod
    def from_wire(cls, data) -> "Route":
        rid, kind, where = data
        if kind not in (DIRECT_TCPIP, DIRECT_STREAMLOCAL):
            raise ValueError(f"unknown route kind {kind!r}")
        target = Endpoint(path=where) if isinstance(where, str) else Endpoint(host=where[0], port=int(where[1]))
        return cls(str(rid), kind, target)

    def __str__(self) -> str:
        return str(self.target)
