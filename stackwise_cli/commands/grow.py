from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from stackwise_cli.commands.options import ForceOpt, JsonOpt, ProjectOpt
from stackwise_cli.console import out, print_json


def grow(
    side: Annotated[
        str | None,
        typer.Option("--side", help="right (append) or left (prepend); default: the side the curriculum grows on."),
    ] = None,
    after: Annotated[
        int | None,
        typer.Option("--after", help="Insert the new stack right after the stack with this id (LLaMA Pro style)."),
    ] = None,
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
    """Add a stack to the rack with a new stable id: on the right, on the left, or inserted after a stack."""
    from stackwise_cli.curricula import curriculum_of
    from stackwise_cli.preflight import check_fits
    from stackwise_cli.store.project import Project
    from stackwise_cli.train.grow import grow as run

    recipe = Project(project).load().recipe
    check_fits(recipe, "stackwise grow", force=force)  # before the stack is allocated
    if after is not None and side is not None:
        from stackwise_cli.errors import StackwiseError

        raise StackwiseError("--after and --side both say where the stack goes: give one of them")
    side = side or curriculum_of(recipe).grows
    where = f"after stack {after}" if after is not None else f"on the {side}"
    entry = run(Project(project), side, blocks, init, after)  # type: ignore[arg-type]
    if json_:
        result = {"id": entry.id, "blocks": entry.blocks, "init": entry.init}
        print_json(result | ({"side": side} if after is None else {"after": after}))
    else:
        out.print(f"grew stack {entry.id} ({entry.blocks} block(s), init {entry.init}) {where}")
