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
FORWARDED_TCPIP = "forwarded-tcpip"                      # -R: the server opens, we connect to target
SOCKS = "socks"    # -D: a forward whose connections each get their own direct-tcpip route


@dataclass(frozen=True)
class Route:
    id: str            # the forward's id ("f1"), unique in this process run
    kind: str          # the SSH channel type to open (SOCKS: decided per connection)
    target: Endpoint | None
    socks: int = 0     # 4 or 5: the client waits for this SOCKS version's reply to the open

    @classmethod
    def for_target(cls, forward_id: str, target: Endpoint | None) -> "Route":
        if target is None:
            return cls(forward_id, SOCKS, None)
        return cls(forward_id, DIRECT_STREAMLOCAL if target.is_unix else DIRECT_TCPIP, target)

    @classmethod
    def for_remote(cls, forward_id: str, target: Endpoint) -> "Route":
        return cls(forward_id, FORWARDED_TCPIP, target)

    def for_socks_request(self, host: str, port: int, version: int) -> "Route":
        """One SOCKS connection's route: to what its client asked for."""
        return Route(self.id, DIRECT_TCPIP, Endpoint(host=host, port=port), version)

    def to_wire(self) -> list:
        t = self.target
        return [self.id, self.kind, t.path if t.is_unix else [t.host, t.port], self.socks]

    @classmethod
    def from_wire(cls, data) -> "Route":
        rid, kind, where, version = data
        if kind not in (DIRECT_TCPIP, DIRECT_STREAMLOCAL, FORWARDED_TCPIP):
            raise ValueError(f"unknown route kind {kind!r}")
        target = Endpoint(path=where) if isinstance(where, str) else Endpoint(host=where[0], port=int(where[1]))
        return cls(str(rid), kind, target, int(version))

    def __str__(self) -> str:
        return "SOCKS" if self.target is None else str(self.target)
