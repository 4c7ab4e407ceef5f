"""The screen of ``sshpump status``: rich renderables built from a control
socket's ``stats`` and ``connections`` results. Every field is read with a
default and every cell is a rich Text escaped to one line (no markup is ever
interpreted): the results come from another process."""

from __future__ import annotations

import time

from rich.console import Console, Group
from rich.table import Table
from rich.text import Text

from .views import addresses, duration, size
from .protocol import one_line


def _num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _get(d, key, default=None):
    return d.get(key, default) if isinstance(d, dict) else default


def cell(value, style: str = "") -> Text:
    text = "-" if value is None or value == "" else one_line(str(value))
    return Text(text, style=style, no_wrap=True, overflow="ellipsis")


def _table(title: str, columns: list[tuple[str, bool]], flexible: set = frozenset()) -> Table:
    t = Table(title=title, title_justify="left", title_style="bold", box=None, padding=(0, 1),
              show_edge=False, pad_edge=False, expand=False, header_style="bold")
    for name, right in columns:
        # Flexible columns give way first on a narrow terminal; their cells stay one line (cut with "…").
        t.add_column(name, justify="right" if right else "left", no_wrap=name not in flexible,
                     overflow="ellipsis")
    return t


def tunnels_of(stats) -> list[dict]:
    tunnels = _get(stats, "tunnels")
    return [t for t in tunnels.values() if isinstance(t, dict)] if isinstance(tunnels, dict) else []


STATE_STYLE = {"running": "green", "failed": "bold red", "stopping": "yellow", "stopped": "yellow",
               "connecting": "yellow"}


def header(path: str, stats) -> Text:
    up = _get(stats, "uptime")
    parts = [f"sshpump pid {one_line(str(_get(stats, 'pid', '?')))}",
             f"up {duration(up) if _num(up) else '?'}"]
    n = _get(stats, "connections")
    if _num(n):
        parts.append(f"{n} connection{'s' if n != 1 else ''}")
    buffered = _get(stats, "buffered")
    if _num(buffered):
        parts.append(f"{size(buffered)} buffered")
    if _get(stats, "stopping"):
        parts.append("STOPPING")
    parts.append(f"control {one_line(path)}")
    text = Text(" · ".join(parts), style="bold", no_wrap=True, overflow="ellipsis")
    text.append(time.strftime("  %H:%M:%S"), style="dim")
    return text


def tunnels_table(stats) -> Table:
    t = _table("Tunnels", [("NAME", False), ("DESTINATION", False), ("STATE", False), ("WAITING", True),
                           ("ERROR", False)], flexible={"NAME", "DESTINATION", "ERROR"})
    for tun in tunnels_of(stats):
        state = _get(tun, "state")
        t.add_row(cell(_get(tun, "name")), cell(_get(tun, "destination")),
                  cell(state, STATE_STYLE.get(state, "")), cell(_get(tun, "waiting")),
                  cell(_get(tun, "error"), "red"))
    return t


def forwards_table(stats) -> Table:
    t = _table("Forwards", [("ID", False), ("TUNNEL", False), ("SPEC", False), ("LISTEN", False),
                            ("ACTIVE", True), ("ACCEPTED", True)], flexible={"TUNNEL", "SPEC", "LISTEN"})
    for tun in tunnels_of(stats):
        for f in _get(tun, "forwards") or []:
            if isinstance(f, dict):
                t.add_row(cell(f.get("id")), cell(f.get("tunnel", _get(tun, "name"))), cell(f.get("spec")),
                          cell(addresses(f.get("listen"))), cell(f.get("active")), cell(f.get("accepted")))
    return t


def workers_table(stats) -> Table:
    t = _table("Workers", [("TUNNEL", False), ("WORKER", True), ("PID", True), ("SESSION", False),
                           ("LOAD", True), ("BUFFERED", True)], flexible={"TUNNEL"})
    for tun in tunnels_of(stats):
        for w in _get(tun, "workers") or []:
            if not isinstance(w, dict):
                continue
            up = w.get("up")
            session = cell("up", "green") if up is True else cell("down", "bold red") if up is False else cell(None)
            if w.get("answered") is False:
                session.append(" (no report)", style="yellow")
            pump = w.get("pump")
            t.add_row(cell(_get(tun, "name")), cell(w.get("index")), cell(w.get("pid")), session,
                      cell(w.get("load")), cell(size(_get(pump, "buffered")) if _get(pump, "buffered") is not None
                                                else None))
    return t


def _newest_first(c):
    a, n = _get(c, "age"), _get(c, "id")
    return (a if _num(a) else float("inf"), -n if _num(n) else 0)


def connections_table(conns, limit: int | None = None) -> tuple[Table, int]:
    """The newest ``limit`` connections (all when None), newest first;
    returns (table, how many were left out)."""
    rows = sorted((c for c in conns if isinstance(c, dict)), key=_newest_first)
    more = 0
    if limit is not None and len(rows) > limit:
        more, rows = len(rows) - limit, rows[:max(limit, 0)]
    title = f"Connections ({len(rows) + more})"
    t = _table(title, [("CONN", True), ("TUNNEL", False), ("FORWARD", False), ("CLIENT", False),
                       ("TARGET", False), ("AGE", True), ("UP", True), ("DOWN", True), ("WORKER", True),
                       ("STATE", False)], flexible={"TUNNEL", "CLIENT", "TARGET"})
    for c in rows:
        state = c.get("state")
        t.add_row(cell(c.get("id")), cell(c.get("tunnel")), cell(c.get("forward")), cell(c.get("client")),
                  cell(c.get("target")), cell(duration(c.get("age")) if c.get("age") is not None else None),
                  cell(size(c.get("up_bytes")) if c.get("up_bytes") is not None else None),
                  cell(size(c.get("down_bytes")) if c.get("down_bytes") is not None else None),
                  cell(c.get("worker")), cell(state, "" if state == "open" else "yellow"))
    return t, more


def _more(more: int) -> Text:
    return Text(f"+{more} more (older)", style="dim") if more else Text("")


def _top(path, stats, gaps: bool) -> list:
    gap = [Text("")] if gaps else []
    return [header(path, stats), *gap, tunnels_table(stats), *gap, forwards_table(stats), *gap,
            workers_table(stats), *gap]


def screen(path: str, stats, conns, console: Console | None = None, height: int | None = None,
           note: str | None = None) -> Group:
    """The whole view, ``note`` (a problem: sshpump gone, not answering)
    on its last line, where it stays in sight after exit. With console and
    height: only as many connections as fit in height lines (the blank
    lines between sections go first when space is short), the rest counted
    as "+K more"."""
    conns = [c for c in conns if isinstance(c, dict)] if isinstance(conns, list) else []
    end = [Text(one_line(note), style="bold red", no_wrap=True, overflow="ellipsis")] if note else []
    if console is None or height is None:
        table, _ = connections_table(conns)
        return Group(*_top(path, stats, True), table, *end)
    opts = console.options.update(height=None)
    empty, _ = connections_table([], 0)
    overhead = len(console.render_lines(empty, opts, pad=False)) + 1 + len(end)   # + the "+K more" line
    for gaps in (True, False):
        top = _top(path, stats, gaps)
        room = height - len(console.render_lines(Group(*top), opts, pad=False)) - overhead
        if room >= min(len(conns), 3):
            break
    if room >= len(conns):
        room += 1   # no "+K more" line
    table, more = connections_table(conns, max(room, 0))
    return Group(*top, table, *([_more(more)] if more else []), *end)
