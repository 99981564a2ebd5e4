"""The one console: rich progress bars and tables for people, plain lines when not on a terminal, JSON for scripts.

Results go to stdout (a table, or one JSON document with --json); progress and messages go to stderr, so
``stackwise eval --json | jq .loss`` works with progress still visible.
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
from collections.abc import Iterator
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.measure import Measurement
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from stackwise_cli.progress import Advance, Reporter

out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)
_LOG_WIDTH = 10_000  # off a terminal (a Slurm log, a pipe) nothing wraps or is cut: a table is as wide as it needs


def _duration(seconds: float) -> str:
    s = int(round(seconds))
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


def _eta(done: float, total: int | None, elapsed: float) -> str:
    """``  eta 3m05s`` from the rate so far (``done`` of ``total`` in ``elapsed`` s); empty without a total, or in
    the first second (no rate yet)."""
    if not total or done <= 0 or elapsed < 1.0:
        return ""
    return f"  eta {_duration(elapsed / done * max(0.0, total - done))}"


def _fmt(fields: dict[str, Any]) -> str:
    parts = []
    for k, v in fields.items():
        if isinstance(v, float):
            v = f"{v:,.0f}" if abs(v) >= 1000 else f"{v:.4f}"
        parts.append(f"{k} {v}")
    return "  ".join(parts)


class CliReporter(Reporter):
    """Progress on stderr: a rich bar on a terminal, otherwise a plain line every few seconds (Slurm logs)."""

    def __init__(self, quiet: bool = False, plain_every_s: float = 10.0):
        self.quiet = quiet
        self.plain_every_s = plain_every_s

    def info(self, message: str) -> None:
        if not self.quiet:
            err.print(message, markup=False)

    @contextlib.contextmanager
    def task(self, description: str, total: int | None = None) -> Iterator[Advance]:
        if self.quiet:
            yield lambda n=1, **fields: None
            return
        if err.is_terminal:
            columns = [
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
                TextColumn("{task.fields[extra]}"),
            ]
            with Progress(*columns, console=err, transient=False) as progress:
                task = progress.add_task(description, total=total, extra="")

                def advance(n: int = 1, **fields: Any) -> None:
                    progress.update(task, advance=n, **({"extra": _fmt(fields)} if fields else {}))

                yield advance
            return
        state = {"done": 0, "last": 0.0, "fields": {}, "first": None}
        start = time.monotonic()

        def advance(n: int = 1, **fields: Any) -> None:
            state["done"] += n
            state["fields"] = fields or state["fields"]
            now = time.monotonic()
            if state["first"] is None:  # the rate is measured from the first unit on: set-up time is not a rate
                state["first"] = (now, state["done"])
            if now - state["last"] >= self.plain_every_s:
                state["last"] = now
                of = f"/{total}" if total else ""
                t0, done0 = state["first"]
                eta = _eta(state["done"] - done0, total - done0 if total else None, now - t0)
                err.print(f"{description}: {state['done']}{of}{eta}  {_fmt(state['fields'])}", markup=False)

        yield advance
        of = f"/{total}" if total else ""
        err.print(
            f"{description}: done {state['done']}{of} in {time.monotonic() - start:.1f}s  {_fmt(state['fields'])}",
            markup=False,
        )


def print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")
    sys.stdout.flush()


def print_table(title: str, columns: list[str], rows: list[list[Any]]) -> None:
    table = Table(title=title, title_justify="left")
    for c in columns:
        table.add_column(
            c,
            justify="left"
            if c in ("case", "state", "file", "what", "stage", "kind", "backend", "kernel", "impl", "dtype")
            else "right",
        )
    for r in rows:
        table.add_row(*["-" if v is None else (f"{v:.4f}" if isinstance(v, float) else str(v)) for v in r])
    if out.is_terminal:
        out.print(table)
        return
    # Off a terminal rich would squeeze the table into 80 columns and cut cells ("train…"): print it whole.
    natural = Measurement.get(out, out.options.update(width=_LOG_WIDTH), table).maximum
    Console(highlight=False, soft_wrap=True, width=max(out.width, natural)).print(table)


def error_line(message: str, hint: str | None) -> None:
    err.print(f"[bold red]error:[/] {escape(message)}")
    if hint:
        err.print(f"[dim]hint:[/] {escape(hint)}")
