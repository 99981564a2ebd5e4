from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from stackwise_cli.commands.options import DeviceOpt, JsonOpt, ProjectOpt, RunSetOpt
from stackwise_cli.console import CliReporter, out, print_json


def fuse(
    finetune_steps: Annotated[
        int | None,
        typer.Option(
            "--finetune-steps", help="Fine-tune the assembled model end to end for N optimizer steps before export."
        ),
    ] = None,
    finetune: Annotated[
        str | None,
        typer.Option(
            "--finetune", help="full (every weight; default), lora (bf16 base) or qlora (NF4 base): what trains."
        ),
    ] = None,
    lora_rank: Annotated[
        int | None, typer.Option("--lora-rank", help="LoRA rank r, lora and qlora only (default 16).")
    ] = None,
    lora_alpha: Annotated[
        float | None, typer.Option("--lora-alpha", help="LoRA alpha; the update is scaled by alpha/r (default r).")
    ] = None,
    precision: Annotated[
        str,
        typer.Option(
            "--precision",
            help="Fine-tune compute: auto (bf16 on a GPU with bf16, else fp32), fp32, or bf16 (autocast, fp32 master "
            "weights).",
        ),
    ] = "auto",
    resume: Annotated[
        str, typer.Option("--resume", help="auto: continue an interrupted fine-tune; never: start it over.")
    ] = "auto",
    set_: RunSetOpt = None,
    device: DeviceOpt = "auto",
    project: ProjectOpt = Path("."),
    json_: JsonOpt = False,
) -> None:
    """Assemble ends + rack into one model in fused/ (Hugging Face format), optionally fine-tuned end to end first.
    The fine-tune checkpoints in ckpt/finetune; SIGTERM/SIGUSR1 checkpoint and exit 75: rerun to resume."""
    from stackwise_cli.errors import StackwiseError
    from stackwise_cli.fuse import fuse as run
    from stackwise_cli.store.project import Project
    from stackwise_cli.train.distributed import launched
    from stackwise_cli.train.finetune import finetune_spec

    spec = finetune_spec(finetune_steps, finetune, lora_rank, lora_alpha)
    if set_ and launched() > 1:
        raise StackwiseError(
            "--set is not taken under torchrun: every rank must read the same recipe",
            hint="apply it first without torchrun (or edit stackwise.yaml), then launch the ranks",
        )
    if set_:
        from stackwise_cli.settings import apply_settings, finetune_schedule_open

        apply_settings(Project(project), set_, "fuse", finetune_schedule_open(Project(project), resume))
    entry = run(Project(project), spec, device, precision, resume, CliReporter(quiet=json_))
    if entry is None:  # under torchrun rank 0 reports for every rank
        return
    tuned = None
    if entry.finetune is not None:
        tuned = {
            "mode": entry.finetune,
            "steps": entry.finetune_steps,
            "lora_rank": entry.lora_rank,
            "lora_alpha": entry.lora_alpha,
            "loss": entry.finetune_loss,
            "val_loss": entry.val_loss,
        }
    if json_:
        print_json(
            {
                "dir": str(Path(project) / entry.dir),
                "sha256": entry.sha256,
                "stacks": [s.id for s in entry.stacks],
                "finetune": tuned,
            }
        )
    else:
        how = ""
        if tuned is not None:
            val = "" if tuned["val_loss"] is None else f", validation loss {tuned['val_loss']:.4f}"
            how = f", fine-tuned ({tuned['mode']}, {tuned['steps']} steps, loss {tuned['loss']:.4f}{val})"
        out.print(f"fused {len(entry.stacks)} stack(s) into {Path(project) / entry.dir}{how} (loads with transformers)")
