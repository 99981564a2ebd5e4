from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from stackwise_cli.commands.options import DeviceOpt, JsonOpt, ProjectOpt
from stackwise_cli.console import CliReporter, print_json, print_table


def render_eval(result) -> None:
    rows = [[r.id, r.blocks, r.loss, r.perplexity] for r in result.per_stack]
    print_table(
        f"{result.split}: loss after each stack ({result.tokens:,} tokens)",
        ["stack id", "blocks", "loss", "perplexity"],
        rows,
    )


def eval_(
    split: Annotated[str, typer.Option("--split", help="Split to score.")] = "val",
    max_sequences: Annotated[
        int | None, typer.Option("--max-sequences", min=1, help="Score at most this many sequences.")
    ] = None,
    device: DeviceOpt = "auto",
    project: ProjectOpt = Path("."),
    json_: JsonOpt = False,
) -> None:
    """Validation loss and perplexity of the rack, and the readout after each stack."""
    from stackwise_cli.evaluate.eval import evaluate
    from stackwise_cli.store.project import Project

    result = evaluate(Project(project), split, max_sequences, device, CliReporter(quiet=json_))
    if json_:
        print_json(result.to_data())
    else:
        render_eval(result)
