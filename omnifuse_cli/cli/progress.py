"""Progress of long commands: a rich live display in a terminal, plain timestamped lines in a
log file or a cluster queue's output (where a live display prints nothing until it stops).

``live_progress(table)`` gives a (live, progress) pair with the rich API the commands use
(``live.start/stop/is_started``, ``progress.add_task/update``). OMNIFUSE_PROGRESS=plain or live
forces a mode; the default (auto) is plain whenever stdout is not a terminal.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from rich.console import Console, Group
from rich.markup import escape
from rich.table import Table

from omnifuse_cli.cli.common import console as default_console
from omnifuse_cli.cli.common import err_console

MODES = ("auto", "live", "plain")
INTERVAL_SECONDS = 30.0  # a progress line at most this often ...
INTERVAL_SHARE = 0.1  # ... and only after this share of the pass; the end of a pass always


def plain_wanted(console: Console) -> bool:
    mode = os.environ.get("OMNIFUSE_PROGRESS", "auto").strip().lower() or "auto"
    if mode not in MODES:
        mode = "auto"
    return mode == "plain" or (mode == "auto" and not console.is_terminal)


def live_progress(table: Table, console: Console | None = None) -> tuple[Any, Any]:
    """(live, progress): rich's Live + Progress, or one PlainProgress playing both parts."""
    out = console or default_console
    if plain_wanted(out):
        plain = PlainProgress(out, table)
        return plain, plain
    from rich.live import Live  # ~15 ms with rich.progress that `omnifuse --help` need not pay

    progress = _bars(out)
    return Live(Group(table, progress), console=out, refresh_per_second=4), progress


def _bars(console: Console) -> Any:
    """The terminal's transient progress bars: description, bar, done/total, elapsed time."""
    # ~15 ms with rich.live that `omnifuse --help` (which imports this module) need not pay.
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    )


def _timestamp() -> str:
    return f"[{time.strftime('%Y-%m-%d %H:%M:%S')}] "


class _Task:
    def __init__(self, description: str, total: float | None) -> None:
        self.description, self.total = description, total
        self.completed = 0.0
        self.started = time.monotonic()
        self.printed_at = self.started
        self.printed_done = 0.0


class PlainProgress:
    """Timestamped lines: each new table row (an epoch, a fold) as it arrives, a task's progress
    when both INTERVAL_SECONDS and INTERVAL_SHARE have passed since its last line, and the end
    of every pass (so at least one line per epoch)."""

    def __init__(self, console: Console, table: Table) -> None:
        self.console, self.table = console, table
        self.tasks: list[_Task] = []
        self.rows_printed = 0
        self.is_started = False

    # The Live side.
    def start(self) -> None:
        self.is_started = True
        self._new_rows()

    def stop(self) -> None:
        self._new_rows()
        self.is_started = False

    # The Progress side.
    def add_task(self, description: str, total: float | None = None) -> int:
        self.tasks.append(_Task(description, total))
        return len(self.tasks) - 1

    def update(
        self,
        task_id: int,
        *,
        description: str | None = None,
        completed: float | None = None,
        total: float | None = None,
        visible: bool | None = None,
    ) -> None:
        self._new_rows()
        task = self.tasks[task_id]
        now = time.monotonic()
        restarted = (description is not None and description != task.description) or (
            completed is not None and completed < task.completed
        )
        if restarted:  # a new phase or the next epoch's pass
            task.started = task.printed_at = now
            task.printed_done = 0.0
        if description is not None:
            task.description = description
        if total is not None:
            task.total = total
        if completed is None:
            return
        task.completed = completed
        if task.total:
            finished = completed >= task.total
            due = (
                now - task.printed_at >= INTERVAL_SECONDS
                and completed - task.printed_done >= INTERVAL_SHARE * task.total
            )
            if finished or due:
                self._line(
                    f"{task.description}: {completed:g}/{task.total:g} "
                    f"({100 * completed / task.total:.0f}%), {now - task.started:.1f} s"
                )
                task.printed_at, task.printed_done = now, completed

    def _new_rows(self) -> None:
        rows = self.table.row_count
        if rows <= self.rows_printed:
            return
        headers = [str(c.header) for c in self.table.columns]
        for r in range(self.rows_printed, rows):
            cells = [str(list(c.cells)[r]) for c in self.table.columns]
            self._line("  ".join(f"{h} {v}" for h, v in zip(headers, cells, strict=True)))
        self.rows_printed = rows

    def _line(self, text: str) -> None:
        self.console.print(_timestamp() + text, markup=False, highlight=False, soft_wrap=True)


@contextmanager
def pass_progress(console: Console | None = None) -> Iterator[Callable[[str, int, int], None]]:
    """A callback ``(phase, done, total)`` for evaluate/predict's passes over the patients: a
    transient rich bar in a terminal, timestamped lines (PlainProgress's rules) otherwise."""
    out = console or default_console
    if plain_wanted(out):
        plain = PlainProgress(out, Table())
        ids: dict[str, int] = {}

        def plain_update(phase: str, done: int, total: int) -> None:
            if phase not in ids:
                ids[phase] = plain.add_task(phase, total=total)
            plain.update(ids[phase], completed=done, total=total)

        yield plain_update
        return
    bars = _bars(out)
    tasks: dict[str, Any] = {}

    def live_update(phase: str, done: int, total: int) -> None:
        if phase not in tasks:
            tasks[phase] = bars.add_task(phase, total=total)
        bars.update(tasks[phase], completed=done, total=total)

    with bars:
        yield live_update


def stamp(console: Console | None = None) -> str:
    """``[YYYY-MM-DD HH:MM:SS] `` (escaped for rich markup) before a message in plain mode, so
    a log file tells when each step happened; nothing in a terminal."""
    if not plain_wanted(console or default_console):
        return ""
    return escape(_timestamp())


def say(event: Any, console: Console | None = None) -> bool:
    """Print a message or warning event (a warning on stderr too, where logs keep it apart);
    False for every other kind, which the command's display shows."""
    out = console or default_console
    if event.kind == "message":
        out.print(f"[dim]·[/] {stamp(out)}{escape(event.text)}")
        return True
    if event.kind == "warning":
        err_console.print(f"[yellow]warning:[/] {stamp(out)}{escape(event.text)}", soft_wrap=True)
        return True
    return False
