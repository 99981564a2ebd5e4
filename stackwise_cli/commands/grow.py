from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from stackwise_cli.commands.options import ForceOpt, JsonOpt, ProjectOpt
from stackwise_cli.console import out, print_json


def grow(
    side: Annotated[str, typer.Option("--side", help="right (append) or left (prepend).")] = "right",
    blocks: Annotated[
        int | None, typer.Option("--blocks", min=1, help="Blocks in the new stack (default: the recipe's).")
    ] = None,
    init: Annotated[
        str | None,
        typer.Option(
            "--init", help="random, copy or identity (default: the recipe's rack.init; the first stack: random)."
        ),
    ] = None,
    force: ForceOpt = False,
    project: ProjectOpt = Path("."),
    json_: JsonOpt = False,
) -> None:
    """Add a stack to the rack with a new stable id."""
    from stackwise_cli.preflight import check_fits
    from stackwise_cli.store.project import Project
    from stackwise_cli.train.grow import grow as run

    check_fits(Project(project).load().recipe, "stackwise grow", force=force)  # before the stack is allocated
    entry = run(Project(project), side, blocks, init)  # type: ignore[arg-type]
    if json_:
        print_json({"id": entry.id, "blocks": entry.blocks, "init": entry.init, "side": side})
    else:
        out.print(f"grew stack {entry.id} ({entry.blocks} block(s), init {entry.init}) on the {side}")
