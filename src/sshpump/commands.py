"""What the control socket's commands do (``sshpump ctl PATH COMMAND``), each
returning a JSON-able result or raising an SshpumpError, which the control
server sends back with its exit code. The library's Tunnel methods run the
same functions, so the three ways of changing a running sshpump -- library,
control socket, reload -- have one meaning."""

from __future__ import annotations

import asyncio
import os
import time

from .errors import ForwardError, UsageError
from .spec import parse_dynamic_forward, parse_local_forward, parse_remote_forward


def pick_tunnel(rt, name):
    if name is not None:
        if name not in rt.tunnels:
            raise UsageError(f"no tunnel {name!r} (tunnels: {', '.join(rt.tunnels) or 'none'})")
        return rt.tunnels[name]
    if len(rt.tunnels) != 1:
        raise UsageError(f"{len(rt.tunnels)} tunnels ({', '.join(rt.tunnels)}): say which with --tunnel NAME")
    return next(iter(rt.tunnels.values()))


PARSERS = {"L": parse_local_forward, "R": parse_remote_forward, "D": parse_dynamic_forward}
REMOTE_ANSWER_TIMEOUT = 15.0   # how long `add -R` waits for the server's answer


def add(rt, spec: str, tunnel: str | None = None, kind: str | None = None) -> dict:
    """kind: "L" (the default), "R" or "D", as ssh's -L, -R and -D. A remote
    forward is returned as asked, before the server has answered."""
    parse = PARSERS.get(kind or "L")
    if parse is None:
        raise UsageError(f"forward kind {kind!r} is not L, R or D")
    t = pick_tunnel(rt, tunnel)
    fwd = t.add(parse(spec))
    return fwd.info(t.name)


async def add_settled(rt, spec: str, tunnel: str | None = None, kind: str | None = None) -> dict:
    """add(), and for -R the server's answer too: the port it bound, or
    ForwardError (and the forward is dropped) when it refuses, as
    ``ssh -O forward`` fails."""
    info = add(rt, spec, tunnel, kind)
    if info.get("kind") != "R":
        return info
    t = pick_tunnel(rt, info["tunnel"])
    fwd = t.table.by_id[info["id"]]
    state = await t.remotes.answer(fwd, REMOTE_ANSWER_TIMEOUT)
    if state != "bound":
        t.remove(fwd.id)
        why = "no answer from the server" if state == "pending" else "refused by the server"
        raise ForwardError(f"remote port forwarding failed for listen port {fwd.remote['asked']} ({why})")
    return fwd.info(t.name)


def remove(rt, forward: str, tunnel: str | None = None) -> dict:
    if tunnel is not None:
        t = pick_tunnel(rt, tunnel)
    else:
        owners = [t for t in rt.tunnels.values() if _has(t, forward)]
        t = owners[0] if owners else pick_tunnel(rt, None)
    info = t.table.find(forward).info(t.name)   # with the addresses it listened on
    fwd = t.remove(forward)
    return {**info, "draining": fwd.active}


def _has(t, ref) -> bool:
    try:
        t.table.find(ref)
    except UsageError:
        return False
    return True


def forwards(rt) -> dict:
    return {"forwards": [f for t in rt.tunnels.values() for f in t.forward_list()]}


async def connections(rt) -> dict:
    rows = await asyncio.gather(*(t.connections() for t in rt.tunnels.values()))
    return {"connections": sorted((r for part in rows for r in part), key=lambda r: r["id"])}


async def stats(rt) -> dict:
    per = await asyncio.gather(*(t.stats() for t in rt.tunnels.values()))
    return {"pid": os.getpid(), "uptime": round(time.monotonic() - rt.started_at, 3),
            "stopping": rt.stopping, "config": rt.config_path,
            "connections": sum(s["connections"] for s in per), "buffered": sum(s["buffered"] for s in per),
            "tunnels": {s["name"]: s for s in per}}


def _seconds(value, what):
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 86400 * 365:
        raise UsageError(f"{what} must be a number of seconds, not {value!r}")
    return float(value)


async def run_command(rt, cmd: str, args: dict):
    """The control server's handler."""
    args = args or {}
    if cmd == "ping":
        return {"pid": os.getpid()}
    if cmd == "add":
        return await add_settled(rt, _text(args, "spec"), args.get("tunnel"), args.get("kind"))
    if cmd == "remove":
        return remove(rt, _text(args, "forward"), args.get("tunnel"))
    if cmd == "list":
        return forwards(rt)
    if cmd == "connections":
        return await connections(rt)
    if cmd == "stats":
        return await stats(rt)
    if cmd == "reload":
        if rt.config_path is None:
            raise UsageError("nothing to reload: sshpump was not started with --config")
        return await rt.reload()
    if cmd in ("drain", "stop"):
        grace = _seconds(args.get("timeout"), "timeout") if cmd == "drain" else 0.0
        # After the answer is on its way: the control socket closes on stop.
        asyncio.get_running_loop().call_later(0.05, rt.request_stop, grace)
        return {"stopping": True, "drain_timeout": grace}
    raise UsageError(f"unknown command {cmd!r}")


def _text(args, key) -> str:
    value = args.get(key)
    if not isinstance(value, str) or not value:
        raise UsageError(f"missing {key!r}")
    return value
