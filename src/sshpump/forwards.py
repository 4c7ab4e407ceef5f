"""A tunnel's forwards, each with an id, its route and its listening sockets.

Ids ("f1", "f2", ...) are unique in the process run and never reused, so a
connection, a log line or a control command names one forward for certain,
even after forwards came and went."""

from __future__ import annotations

import itertools
import socket
from dataclasses import dataclass, field

from .errors import UsageError  # noqa: I001
from .listeners import close_listener, listener_address, open_listeners
from .routes import Route
from .errors import SpecError
from .spec import LocalForward, parse_dynamic_forward, parse_local_forward

_ids = itertools.count(1)


@dataclass
class Forward:
    id: str
    spec: LocalForward
    route: Route
    sockets: list[socket.socket] = field(default_factory=list)
    accepted: int = 0
    active: int = 0

    @property
    def addresses(self) -> list:
        return [listener_address(s) for s in self.sockets]

    def info(self, tunnel: str) -> dict:
        return {"id": self.id, "tunnel": tunnel, "spec": self.spec.spec,
                "listen": [list(a) if isinstance(a, tuple) else a for a in self.addresses],
                "target": str(self.route), "active": self.active, "accepted": self.accepted}


class ForwardTable:
    """Forwards by id, in the order they were added."""

    def __init__(self):
        self.by_id: dict[str, Forward] = {}

    def __iter__(self):
        return iter(self.by_id.values())

    def __len__(self):
        return len(self.by_id)

    def open(self, spec: LocalForward, gateway_ports: bool) -> Forward:
        """Listen for spec (raises ForwardError) and register it."""
        sockets = open_listeners(spec, gateway_ports)
        fid = f"f{next(_ids)}"
        fwd = Forward(fid, spec, Route.for_target(fid, spec.target), sockets)
        self.by_id[fid] = fwd
        return fwd

    def find(self, ref: str) -> Forward:
        """By id ("f3") or by spec as it was given or an equivalent one."""
        if ref in self.by_id:
            return self.by_id[ref]
        matches = [f for f in self.by_id.values() if f.spec.spec == ref]
        if not matches:
            parsed = None
            for parse in (parse_local_forward, parse_dynamic_forward):
                try:
                    parsed = parse(ref)
                    break
                except SpecError:
                    continue
            if parsed is not None:
                matches = [f for f in self.by_id.values()
                           if (f.spec.listen, f.spec.target) == (parsed.listen, parsed.target)]
        if not matches:
            raise UsageError(f"no forward {ref!r}")
        return matches[0]

    def close(self, fwd: Forward):
        """Stop listening for fwd and forget it (its connections are the
        workers' to finish)."""
        self.by_id.pop(fwd.id, None)
        for s in fwd.sockets:
            close_listener(s)
        fwd.sockets = []

    def close_all(self):
        for fwd in list(self.by_id.values()):
            self.close(fwd)
