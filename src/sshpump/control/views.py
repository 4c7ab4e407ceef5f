"""Human views of control results for ``sshpump ctl``. Every field is read
with a default and every cell is escaped to one line: the results come from
another process and may lack keys, carry extra ones, or hold odd text."""

from __future__ import annotations

from .protocol import one_line


def _cell(value) -> str:
    if value is None:
        return "-"
    return one_line(str(value))


def address(addr) -> str:
    """["127.0.0.1", 8080] -> 127.0.0.1:8080, ["::1", 8080] -> [::1]:8080, a path as is."""
    if isinstance(addr, (list, tuple)) and len(addr) >= 2:
        host = str(addr[0])
        return f"[{host}]:{addr[1]}" if ":" in host else f"{host}:{addr[1]}"
    return str(addr)


def addresses(listen) -> str:
    if not isinstance(listen, list) or not listen:
        return "-"
    return ", ".join(address(a) for a in listen)


def table(headers: list[str], rows: list[list], right: set = frozenset()) -> str:
    cells = [[_cell(c) for c in row] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]

    def fmt(row):
        out = [c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))]
        return "  ".join(out).rstrip()

    return "\n".join([fmt(headers)] + [fmt(r) for r in cells])


def size(n) -> str:
    if not isinstance(n, (int, float)) or isinstance(n, bool):
        return _cell(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)  # not reached


def duration(s) -> str:
    if not isinstance(s, (int, float)) or isinstance(s, bool):
        return _cell(s)
    if s < 60:
        return f"{s:.1f}s"
    m, sec = divmod(int(s), 60)
    if m < 60:
        return f"{m}m{sec:02d}s"
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m"


def _get(d, key):
    return d.get(key) if isinstance(d, dict) else None


def forward_line(verb: str, r) -> str:
    text = (f"{verb} {_cell(_get(r, 'id'))} (tunnel {_cell(_get(r, 'tunnel'))}): {_cell(_get(r, 'spec'))}")
    if _get(r, "listen") is not None:
        text += f", listening on {one_line(addresses(r['listen']))}"
    return text


def view_add(r) -> str:
    return forward_line("added", r)


def view_remove(r) -> str:
    text = forward_line("removed", r).replace(", listening on ", ", no longer listening on ", 1)
    draining = _get(r, "draining")
    if isinstance(draining, int) and draining:
        text += f"; {draining} connection{'s' if draining != 1 else ''} draining"
    return text


def view_list(r) -> str:
    fwds = [f for f in (_get(r, "forwards") or []) if isinstance(f, dict)]
    if not fwds:
        return "no forwards"
    rows = [[f.get("id"), f.get("tunnel"), f.get("spec"), addresses(f.get("listen")), f.get("active")]
            for f in fwds]
    return table(["ID", "TUNNEL", "SPEC", "LISTEN", "ACTIVE"], rows, right={4})


def view_connections(r) -> str:
    conns = [c for c in (_get(r, "connections") or []) if isinstance(c, dict)]
    if not conns:
        return "no connections"
    rows = [[c.get("id"), c.get("tunnel"), c.get("forward"), c.get("client"), c.get("target"),
             c.get("worker"), duration(c.get("age")), size(c.get("up_bytes")), size(c.get("down_bytes"))]
            for c in conns]
    return table(["ID", "TUNNEL", "FORWARD", "CLIENT", "TARGET", "WORKER", "AGE", "UP", "DOWN"],
                 rows, right={5, 6, 7, 8})


def tree(value, indent: int = 0) -> list[str]:
    """Nested dicts as `key: value` lines, children indented by two spaces;
    lists of scalars on one line, lists of objects as `-` items."""
    pad = "  " * indent
    lines = []
    if isinstance(value, dict):
        if not value:
            return [pad + "(empty)"]
        for k, v in value.items():
            if isinstance(v, dict) and v or isinstance(v, list) and any(isinstance(x, (dict, list)) for x in v):
                lines.append(f"{pad}{_cell(k)}:")
                lines.extend(tree(v, indent + 1))
            else:
                lines.append(f"{pad}{_cell(k)}: {_scalar(v)}")
    elif isinstance(value, list):
        for item in value:
            sub = tree(item, indent + 1)
            lines.append(pad + "- " + sub[0].lstrip() if sub else pad + "-")
            lines.extend(sub[1:])
    else:
        lines.append(pad + _scalar(value))
    return lines


def _scalar(v) -> str:
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, list):
        return ", ".join(_scalar(x) for x in v) or "(none)"
    if isinstance(v, dict):
        return "(empty)"
    return _cell(v)


def view_stop(r) -> str:
    grace = _get(r, "drain_timeout")
    if isinstance(grace, (int, float)) and not isinstance(grace, bool) and grace > 0:
        return f"stopping (open connections may finish within {grace:g} s)"
    return "stopping"


def view_ping(r) -> str:
    pid = _get(r, "pid")
    return f"pong (pid {_cell(pid)})" if pid is not None else "pong"


VIEWS = {"add": view_add, "remove": view_remove, "list": view_list, "connections": view_connections,
         "drain": view_stop, "stop": view_stop, "ping": view_ping}


def render(cmd: str, result) -> str:
    """The human view of a command's result; stats, reload and anything
    unexpected fall back to the key: value tree."""
    view = VIEWS.get(cmd)
    if view is not None and isinstance(result, dict):
        return view(result)
    if result is None:
        return "ok"
    return "\n".join(tree(result))
