"""``sshpump status PATH [--watch] [--json] [--interval S]``: what a running
sshpump is doing, read from its control socket (``stats`` and
``connections``): tunnels, forwards, workers and open connections.

Once: a rich view on a terminal, plain text when stdout is not one, or with
``--json`` one object ``{"stats": ..., "connections": [...]}``. ``--watch``
redraws the view every ``--interval`` seconds (with ``--json``: one object
per line) until Ctrl-C or SIGTERM (exit 0), or until sshpump goes away
("sshpump at PATH is gone", exit 3). Errors are one line on stderr with the
control client's exit codes (3 unreachable, 2 usage)."""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import sys
import threading

from ..errors import ConnectError, SshpumpError, UsageError
from .client import request
from .protocol import one_line

PROG = "sshpump status"
USAGE = f"{PROG} PATH [--watch] [--json] [--interval SECONDS]"
_SECONDS = re.compile(r"[0-9]+(\.[0-9]+)?\Z")
ONCE_TIMEOUT = 30.0     # one look: as patient as `sshpump ctl`
WATCH_TIMEOUT = 5.0     # watching: a slow answer shows as "not answering", the loop goes on


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise UsageError(message)


def _interval(text: str) -> float:
    if not _SECONDS.match(text) or not 0.05 <= float(text) <= 3600:
        raise argparse.ArgumentTypeError(f"not a number of seconds from 0.05 to 3600: {text!r}")
    return float(text)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog=PROG, usage=USAGE,
                description="Show a running sshpump's tunnels, forwards, workers and open connections "
                            "(its --control socket).")
    p.add_argument("path", metavar="PATH", help="the control socket")
    p.add_argument("--watch", action="store_true", help="redraw live until Ctrl-C")
    p.add_argument("--json", action="store_true", help='print {"stats": ..., "connections": [...]}')
    p.add_argument("--interval", type=_interval, default=1.0, metavar="SECONDS",
                   help="seconds between redraws with --watch (default 1)")
    return p


def fetch(path: str, timeout: float = ONCE_TIMEOUT) -> dict:
    """Both results, as --json prints them."""
    stats = request(path, "stats", None, timeout=timeout)
    conns = request(path, "connections", None, timeout=timeout)
    conns = conns.get("connections") if isinstance(conns, dict) else None
    return {"stats": stats if isinstance(stats, dict) else {}, "connections": conns if isinstance(conns, list) else []}


def _gone(e: SshpumpError) -> bool:
    """A ConnectError other than a timeout: nobody serves the socket any more."""
    return isinstance(e, ConnectError) and "within" not in str(e) and "timed out" not in str(e)


def _fail(e: SshpumpError) -> int:
    print(one_line(f"sshpump: {e}"), file=sys.stderr)
    code = e.exit_code
    return code if isinstance(code, int) and 0 < code < 256 else 1


def _console(plain: bool):
    from rich.console import Console
    if plain:
        # Not a terminal: no colour, no control codes, wide enough that no column is cut.
        return Console(file=sys.stdout, force_terminal=False, no_color=True, color_system=None,
                       width=int(os.environ.get("SSHPUMP_STATUS_WIDTH", "400")), highlight=False,
                       emoji=False, markup=False)
    return Console(file=sys.stdout, highlight=False, emoji=False, markup=False)


def show_once(path: str, as_json: bool) -> int:
    try:
        data = fetch(path)
    except SshpumpError as e:
        return _fail(e)
    if as_json:
        print(json.dumps(data, indent=2))
        return 0
    from .statusview import screen
    plain = not sys.stdout.isatty()
    console = _console(plain)
    if plain:
        with console.capture() as cap:
            console.print(screen(path, data["stats"], data["connections"]))
        text = "\n".join(line.rstrip() for line in cap.get().splitlines())
        sys.stdout.write(text.rstrip("\n") + "\n")
    else:
        console.print(screen(path, data["stats"], data["connections"]))
    return 0


class _Stop:
    """SIGINT and SIGTERM set an event the watch loop waits on, so either
    ends the loop at a clean point (and rich restores the terminal)."""

    def __init__(self):
        self.event = threading.Event()
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._old[sig] = signal.signal(sig, lambda *_: self.event.set())
        return self

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


def watch_json(path: str, interval: float, stop: _Stop) -> int:
    seen = False
    while not stop.event.is_set():
        try:
            data = fetch(path, WATCH_TIMEOUT)
            seen = True
        except SshpumpError as e:
            if not seen:
                return _fail(e)
            if _gone(e):
                print(one_line(f"sshpump: sshpump at {path} is gone ({e})"), file=sys.stderr)
                return 3
            print(one_line(f"sshpump: {e}"), file=sys.stderr)
        else:
            print(json.dumps(data, separators=(",", ":")), flush=True)
        stop.event.wait(interval)
    return 0


def watch_screen(path: str, interval: float, stop: _Stop) -> int:
    from rich.live import Live
    from .statusview import screen
    try:
        last = fetch(path, WATCH_TIMEOUT)   # unreachable from the start: an error, not a screen
    except SshpumpError as e:
        return _fail(e)
    console = _console(False)
    code = 0
    with Live(_view(screen, console, path, last, None), console=console, auto_refresh=False,
              transient=False, redirect_stdout=False, redirect_stderr=False) as live:
        while not stop.event.wait(interval):
            note = None
            try:
                last = fetch(path, WATCH_TIMEOUT)
            except SshpumpError as e:
                if _gone(e):
                    live.update(_view(screen, console, path, last, f"sshpump at {path} is gone (last state above)"),
                                refresh=True)
                    code = 3
                    break
                note = f"{e} (retrying every {interval:g} s)"
            live.update(_view(screen, console, path, last, note), refresh=True)
    if code == 3 and not sys.stdout.isatty():
        print(one_line(f"sshpump: sshpump at {path} is gone"), file=sys.stderr)
    return code


def _view(screen, console, path, data, note):
    # One line spare: a frame as tall as the terminal would scroll it.
    return screen(path, data["stats"], data["connections"], console, max(console.size.height - 1, 1), note)


def main(argv: list[str]) -> int:
    try:
        ns = build_parser().parse_args(argv)
        if ns.path == "":
            raise UsageError("PATH must not be empty")
    except UsageError as e:
        print(one_line(f"{PROG}: {e}"), file=sys.stderr)
        return e.exit_code
    except SystemExit as e:   # -h/--help printed by argparse
        return e.code if isinstance(e.code, int) else 0
    try:
        if not ns.watch:
            try:
                return show_once(ns.path, ns.json)
            except KeyboardInterrupt:
                return 130
        with _Stop() as stop:
            return (watch_json if ns.json else watch_screen)(ns.path, ns.interval, stop)
    except BrokenPipeError:   # `| head`: the reader left
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
