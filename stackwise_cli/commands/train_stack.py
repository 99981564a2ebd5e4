from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from stackwise_cli.commands.options import DeviceOpt, ForceOpt, JsonOpt, PrecisionOpt, ProjectOpt, RunSetOpt
from stackwise_cli.console import CliReporter, out, print_json


def train_stack(
    stack_id: Annotated[
        str, typer.Argument(metavar="ID", help="Stack id to train, or `all`: the whole rack end to end (baseline).")
    ],
    steps: Annotated[
        int | None,
        typer.Option(
            "--steps",
            min=1,
            help="Optimizer steps (default: the recipe's train.steps, times the stack's train.step_scale factor).",
        ),
    ] = None,
    precision: PrecisionOpt = "auto",
    resume: Annotated[
        str, typer.Option("--resume", help="auto: continue from the newest checkpoint; never: start over.")
    ] = "auto",
    checkpoint_every_min: Annotated[
        float | None,
        typer.Option(
            "--checkpoint-every-min", min=0, help="Also checkpoint every N minutes of wall time (recipe default)."
        ),
    ] = None,
    set_: RunSetOpt = None,
    device: DeviceOpt = "auto",
    force: ForceOpt = False,
    project: ProjectOpt = Path("."),
    json_: JsonOpt = False,
) -> None:
    """Train one stack by the recipe's objective and curriculum, or `all` end to end. SIGTERM/SIGUSR1 checkpoint
    and exit 75: rerun to resume."""
    from stackwise_cli.errors import StackwiseError
    from stackwise_cli.preflight import check_fits
    from stackwise_cli.store.project import Project
    from stackwise_cli.train.distributed import is_main, launched
    from stackwise_cli.train.stack import ALL
    from stackwise_cli.train.stack import train_stack as run

    if stack_id != ALL and not stack_id.lstrip("-").isdigit():
        raise StackwiseError(f"ID must be a stack id or `all`, got {stack_id!r}", hint="see `stackwise status`")
    stack_id = stack_id if stack_id == ALL else int(stack_id)
    check_fits(Project(project).load().recipe, "stackwise train-stack", device, force)  # before any allocation
    reporter = CliReporter(quiet=json_)
    if set_ and launched() > 1:
        raise StackwiseError(
            "--set is not taken under torchrun: every rank must read the same recipe",
            hint="apply it first without torchrun (or edit stackwise.yaml), then launch the ranks",
        )
    if set_:
        from stackwise_cli.settings import apply_settings, schedule_open

        p = Project(project)
        apply_settings(p, set_, "train-stack", schedule_open(p, stack_id, resume))
    result = run(Project(project), stack_id, steps, precision, resume, device, reporter, None, checkpoint_every_min)
    if not is_main():  # under torchrun rank 0 reports for every rank
        return
    data = {"id": stack_id, "trained": result is not None}
    if result is not None:
        data.update(
            steps=result.steps,
            tokens=result.tokens,
            loss=result.last_loss,
            time_s=result.time_s,
            tokens_per_s=result.tokens_per_s,
            resumed_from=result.resumed_from,
        )
    if json_:
        print_json(data)
    elif result is None:
        out.print(f"stack {stack_id} is already trained; nothing to do")
    else:
        out.print(
            f"stack {stack_id}: {result.steps} steps, loss {result.last_loss:.4f}, {result.tokens_per_s:,.0f} tokens/s"
        )
