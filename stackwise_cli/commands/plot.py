from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from stackwise_cli.commands.options import JsonOpt, ProjectOpt
from stackwise_cli.console import out, print_json


def plot(
    output: Annotated[
        Path | None, typer.Option("-o", "--output", help="Folder for the PNGs (default: <project>/plots).")
    ] = None,
    project: ProjectOpt = Path("."),
    json_: JsonOpt = False,
) -> None:
    """PNGs of the training and validation loss of each run over steps and over cumulative FLOPs, and the readout
    after each stack (from the newest eval). Needs matplotlib (the plot extra)."""
    from stackwise_cli.evaluate.plot import plot as run
    from stackwise_cli.evaluate.plot import to_data
    from stackwise_cli.store.project import Project

    result = run(Project(project), output)
    if json_:
        print_json(to_data(result))
        return
    for f in result.files:
        out.print(f)
    if result.readout is None:
        out.print(f"readout.png: no eval record yet (`stackwise eval -p {project}` writes one)")
