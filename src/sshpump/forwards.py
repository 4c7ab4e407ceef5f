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
from .spec import LocalForward, RemoteForward, parse_dynamic_forward, parse_local_forward, parse_remote_forward

_ids = itertools.count(1)


@dataclass
class Forward:
    id: str
    spec: LocalForward
    route: Route
    sockets: list[socket.socket] = field(default_factory=list)
    accepted: int = 0
    active: int = 0
    # -R: the server listens, not us. Which worker asked it, and its answer
    # ("pending", "bound" with the port it bound, "refused": retried).
    remote: dict | None = None

    @property
    def kind(self) -> str:
        return "R" if self.remote is not None else ("D" if self.spec.target is None else "L")

    @property
    def addresses(self) -> list:
        return [listener_address(s) for s in self.sockets]

    def info(self, tunnel: str) -> dict:
        listen = [list(a) if isinstance(a, tuple) else a for a in self.addresses]
        if self.remote is not None:
            r = self.remote
            host = f"[{r['bind']}]" if ":" in r["bind"] else (r["bind"] or "*")
            listen = [f"remote {host}:{r['port']}" + ("" if r["state"] == "bound" else f" ({r['state']})")]
        return {"id": self.id, "tunnel": tunnel, "spec": self.spec.spec, "kind": self.kind,
                "listen": listen, "target": str(self.route), "active": self.active, "accepted": self.accepted,
                **({"remote": dict(self.remote)} if self.remote is not None else {})}


class ForwardTable:
    """Forwards by id, in the order they were added."""

    def __init__(self):
        self.by_id: dict[str, Forward] = {}

    def __iter__(self):
        return iter(self.by_id.values())

    def __len__(self):
        return len(self.by_id)

    def open(self, spec: LocalForward, gateway_ports: bool) -> Forward:
        """Listen for spec (raises ForwardError) and register it. A remote
        forward only gets its id and route here: a worker asks the server."""
        fid = f"f{next(_ids)}"
        if isinstance(spec, RemoteForward):
            fwd = Forward(fid, spec, Route.for_remote(fid, spec.target),
                          remote={"bind": spec.bind_address, "port": spec.listen.port, "asked": spec.listen.port,
                                  "state": "pending", "worker": None, "reason": ""})
            self.by_id[fid] = fwd
            return fwd
        sockets = open_listeners(spec, gateway_ports)
        fwd = Forward(fid, spec, Route.for_target(fid, spec.target), sockets)
        self.by_id[fid] = fwd
        return fwd

    def find(self, ref: str) -> Forward:
        """By id ("f3") or by spec as it was given or an equivalent one."""
        if ref in self.by_id:
            return self.by_id[ref]
        matches = [f for f in self.by_id.values() if f.spec.spec == ref]
        for parse in (parse_local_forward, parse_dynamic_forward, parse_remote_forward):
            if matches:
                break
            try:
                parsed = parse(ref)
            except SpecError:
                continue
            matches = [f for f in self.by_id.values()
                       if (type(f.spec), f.spec.listen, f.spec.target) == (type(parsed), parsed.listen, parsed.target)]
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
