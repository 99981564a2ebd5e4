from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from stackwise_cli.commands.options import JsonOpt, ProjectOpt
from stackwise_cli.console import out, print_json


def clean(
    caches: Annotated[
        bool, typer.Option("--caches", help="Also remove caches a later stage still reads (it recomputes them).")
    ] = False,
    checkpoints: Annotated[
        bool,
        typer.Option("--checkpoints", help="Also remove the newest checkpoint of a run that can resume (it restarts)."),
    ] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Only list what would go, and what it frees.")] = False,
    project: ProjectOpt = Path("."),
    json_: JsonOpt = False,
) -> None:
    """Remove what no stage needs: stale or finished-with caches, old checkpoints, stray temporaries and files the
    manifest does not list. Says what each removal frees, and what it keeps because a later stage reads it."""
    from stackwise_cli.store.project import Project
    from stackwise_cli.store.tidy import clean as run
    from stackwise_cli.store.tidy import human_bytes

    result = run(Project(project), caches, checkpoints, dry_run)
    if json_:
        print_json(result.to_data())
        return
    verb = "would remove" if dry_run else "removed"
    for i in result.items:
        warn = "[yellow]" if i.needed else ""
        out.print(f"{warn}{verb} {i.path} ({human_bytes(i.bytes)}): {i.why}{'[/]' if warn else ''}")
    for i in result.kept:
        out.print(f"kept {i.path} ({human_bytes(i.bytes)}): {i.why.removeprefix('kept: ')}")
    what = "would free" if dry_run else "freed"
    out.print(f"clean: {what} {human_bytes(result.bytes_freed)} in {len(result.items)} item(s)")
