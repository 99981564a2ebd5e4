from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from stackwise_cli.commands.options import JsonOpt, ProjectOpt
from stackwise_cli.console import out, print_json


def drop(
    stack_id: Annotated[int, typer.Argument(metavar="ID", help="Stack id to remove from the rack.")],
    force: Annotated[
        bool,
        typer.Option("--force", help="Also drop a trained (or training, frozen) stack, deleting its training."),
    ] = False,
    project: ProjectOpt = Path("."),
    json_: JsonOpt = False,
) -> None:
    """Remove a stack from the rack with its file, checkpoints and caches; the other ids stay as they are. An
    untrained stack drops as asked; a trained one only with --force, and only when no trained stack depends on it."""
    from dataclasses import asdict

    from stackwise_cli.store.project import Project
    from stackwise_cli.store.tidy import drop_stack, human_bytes

    d = drop_stack(Project(project), stack_id, force)
    if json_:
        print_json(asdict(d))
        return
    rack = " ".join(map(str, d.rack)) or "empty"
    out.print(
        f"dropped stack {d.id} ({d.state}, was at rack position {d.position}); freed {human_bytes(d.bytes_freed)}; "
        f"rack now: {rack}"
    )
