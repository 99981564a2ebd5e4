from __future__ import annotations

from pathlib import Path

from stackwise_cli.commands.eval import render_eval
from stackwise_cli.commands.options import (
    DeviceOpt,
    InputOpt,
    JsonOpt,
    PrecisionOpt,
    ProjectOpt,
    RecipeOpt,
    SetOpt,
    ValInputOpt,
)
from stackwise_cli.console import CliReporter, out, print_json


def build(
    recipe: RecipeOpt = None,
    set_: SetOpt = None,
    input_: InputOpt = None,
    val_input: ValInputOpt = None,
    device: DeviceOpt = "auto",
    precision: PrecisionOpt = "auto",
    project: ProjectOpt = Path("."),
    json_: JsonOpt = False,
) -> None:
    """Run every stage the recipe's planned rack still needs (prepare, grow, cache, train-stack, fuse, eval).

    Idempotent: after a kill or a Slurm requeue, run the same command again and it finishes the job.
    """
    from stackwise_cli.build import build as run
    from stackwise_cli.store.project import Project

    result = run(Project(project), recipe, set_, input_, device, CliReporter(quiet=json_), val_input, precision)
    if json_:
        print_json({"ran": result.ran, "eval": result.eval.to_data() if result.eval else None, "no_fuse": result.fused})
        return
    out.print(f"ran: {', '.join(result.ran) or 'nothing (already built)'}")
    render_eval(result.eval)
    if result.fused:
        out.print(f"not fused: {result.fused}")
    else:
        from stackwise_cli.model.hf import HF_FORMATS

        fmt = HF_FORMATS[Project(project).load().recipe.model.family]
        auto = "AutoModelForMaskedLM" if fmt.bidirectional else "AutoModelForCausalLM"
        out.print(f"fused model: {Project(project).fused_dir} (transformers.{auto}.from_pretrained)")
