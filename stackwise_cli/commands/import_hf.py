from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from stackwise_cli.commands.options import InputOpt, JsonOpt, ProjectOpt, RecipeOpt, SetOpt
from stackwise_cli.console import CliReporter, out, print_json


def import_(
    hf_dir: Annotated[
        Path, typer.Argument(help="A local Hugging Face model folder: config.json, *.safetensors, tokenizer.json.")
    ],
    blocks_per_stack: Annotated[
        int | None,
        typer.Option("--blocks-per-stack", min=1, help="Layers per stack (must divide the model's; default 1)."),
    ] = None,
    recipe: RecipeOpt = None,
    set_: SetOpt = None,
    input_: InputOpt = None,
    project: ProjectOpt = Path("."),
    json_: JsonOpt = False,
) -> None:
    """Create a project from a pretrained LlamaForCausalLM, GPT2LMHeadModel or BertForMaskedLM: its tokenizer,
    train/val shards of --input, and its weights as trained stacks."""
    from stackwise_cli.model.hf_import import import_hf

    r = import_hf(hf_dir, project, blocks_per_stack, recipe, set_ or [], input_, CliReporter(quiet=json_))
    result = {
        "project": r.project,
        "family": r.family,
        "architecture": r.architecture,
        "layers": r.layers,
        "stacks": r.stacks,
        "blocks_per_stack": r.blocks_per_stack,
        "params": r.params,
        "vocab_size": r.vocab_size,
        "added_tokens": r.added_tokens,
        "bytes_read": r.bytes_read,
        "time_s": round(r.time_s, 3),
        "prepare_s": round(r.prepare_s, 3),
    }
    if json_:
        print_json(result)
        return
    added = f", added {', '.join(r.added_tokens)}" if r.added_tokens else ""
    out.print(
        f"imported {hf_dir} ({r.architecture}, {r.params:,} parameters{added}) as {len(r.stacks)} trained "
        f"stack(s) of {r.blocks_per_stack} block(s) in {r.time_s:.1f} s"
    )
    middle = r.stacks[max(len(r.stacks) // 2 - 1, 0)] if r.stacks else 0  # an insert between pretrained stacks
    out.print(f"next: stackwise grow -p {project} --after {middle} --init identity")
