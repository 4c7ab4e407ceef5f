"""The demo's output: step lines, progress bars (rich, in a terminal; one
line per step otherwise) and the closing table."""
from __future__ import annotations

import time

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn
from rich.table import Table

MiB = 1 << 20


def _amount(what: str, n: float) -> str:
    return f"{n / MiB:,.0f} MiB" if what != "connections" else f"{n:,.0f}"


class Display:
    def __init__(self, console: Console | None = None, checkpoint=None):
        self.console = console or Console(highlight=False)
        self.checkpoint = checkpoint   # called before each line: raises a stop signal that was swallowed
        self.live = self.console.is_terminal
        self.progress: Progress | None = None

    def say(self, text: str = "") -> None:
        if self.checkpoint is not None:
            self.checkpoint()
        self.console.print(text, soft_wrap=True)

    # -- progress --------------------------------------------------------------
    def __enter__(self):
        if self.live:
            self.progress = Progress(TextColumn("  {task.description:<20}"), BarColumn(bar_width=24),
                                     TextColumn("{task.fields[detail]}"),
                                     console=self.console, transient=False)
            self.progress.start()
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None

    def step(self, label: str, what: str, total: int) -> "Step":
        return Step(self, label, what, total)


class Step:
    """One measured step: ``advance(n)`` while it runs, ``finish(result)``."""

    def __init__(self, display: Display, label: str, what: str, total: int):
        self.display, self.label, self.what, self.total = display, label, what, total
        self.done, self.t0 = 0, time.perf_counter()
        self._last = 0.0
        self.task = None
        if display.progress is not None:
            self.task = display.progress.add_task(label, total=total, detail=self._detail())
        else:
            display.say(f"  {label}: {_amount(what, total)} ...")

    def _detail(self) -> str:
        secs = time.perf_counter() - self.t0
        rate = self.done / secs if secs > 0 else 0.0
        if self.what == "connections":
            return f"{self.done:>5,}/{self.total:,}  {rate:6,.0f} conn/s"
        return f"{self.done / MiB:>5,.0f}/{self.total / MiB:,.0f} MiB  {rate / 1e6:6,.1f} MB/s"

    def advance(self, n: int) -> None:
        self.done += n
        if self.task is None:
            return
        now = time.perf_counter()
        if now - self._last >= 0.05 or self.done >= self.total:
            self._last = now
            self.display.progress.update(self.task, completed=self.done, detail=self._detail())

    def finish(self, result) -> None:
        if result.what == "connections":
            said = f"{result.rate:,.0f} conn/s in {result.seconds:.2f}s"
            check = "all echoed" if result.ok else f"FAILED: {result.detail}"
        else:
            said = f"{result.rate:,.1f} MB/s in {result.seconds:.2f}s"
            check = "sha256 match" if result.ok else f"sha256 MISMATCH: {result.detail}"
        if self.task is not None:
            colour = "green" if result.ok else "red"
            self.display.progress.update(self.task, completed=self.done,
                                         detail=f"{said}, [{colour}]{check}[/]")
        else:
            self.display.say(f"    {said}, {check}")


def summary_table(rows: list[tuple[str, dict]], ratio: bool) -> Table:
    """rows: (name, {"upload": Result, "download": Result, "connections": Result})."""
    t = Table(show_header=True, header_style="bold", box=None, pad_edge=False, padding=(0, 2))
    t.add_column("")
    t.add_column("upload MB/s", justify="right")
    t.add_column("download MB/s", justify="right")
    t.add_column("conn/s", justify="right")
    t.add_column("sha256 up/down")
    for name, res in rows:
        up, down, conns = res["upload"], res["download"], res["connections"]
        sha = "/".join("match" if r.ok else "MISMATCH" for r in (up, down))
        t.add_row(name, f"{up.rate:,.1f}", f"{down.rate:,.1f}", f"{conns.rate:,.0f}", sha)
    if ratio and len(rows) == 2:
        a, b = rows[0][1], rows[1][1]

        def r(k):
            return f"{a[k].rate / b[k].rate:.2f}x" if b[k].rate > 0 else "-"
        t.add_row("[bold]sshpump/ssh[/]", r("upload"), r("download"), r("connections"), "")
    return t
