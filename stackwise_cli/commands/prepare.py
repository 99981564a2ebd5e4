from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from stackwise_cli.commands.options import ForceOpt, InputOpt, JsonOpt, ProjectOpt, SetOpt, ValInputOpt
from stackwise_cli.console import CliReporter, out, print_json


def prepare(
    recipe: Annotated[Path, typer.Option("--recipe", help="Recipe YAML, e.g. recipes/llama/tiny.yaml.")],
    set_: SetOpt = None,
    input_: InputOpt = None,
    tokenizer: Annotated[
        Path | None,
        typer.Option(
            "--tokenizer",
            help="Use this tokenizer.json, or a Hugging Face model folder's, instead of training one; its "
            "tokenizer_config.json names the end-of-text token.",
        ),
    ] = None,
    val_input: ValInputOpt = None,
    text_field: Annotated[
        str | None,
        typer.Option("--text-field", help="JSONL field / Parquet, Arrow, CSV column with the text (default: text)."),
    ] = None,
    force: ForceOpt = False,
    project: ProjectOpt = Path("."),
    json_: JsonOpt = False,
) -> None:
    """Create a project: tokenizer, packed train/val token shards, and the manifest."""
    from stackwise_cli.data.prepare import prepare as run
    from stackwise_cli.preflight import check_fits
    from stackwise_cli.recipe import load_recipe
    from stackwise_cli.store.project import Project

    set_ = [*(set_ or []), *([f"data.text_field={text_field}"] if text_field is not None else [])]
    resolved = load_recipe(recipe, set_)
    check_fits(resolved, "stackwise prepare", force=force)  # before a byte of the project is written
    m = run(Project(project), resolved, input_, tokenizer, CliReporter(quiet=json_), val_input)
    h = m.data.holdout
    result = {
        "project": str(project),
        "recipe": m.recipe.name,
        "vocab_size": m.tokenizer.vocab_size,
        "seq_len": m.data.seq_len,
        "splits": {
            k: {"sequences": v.sequences, "tokens": v.tokens, "shards": len(v.shards)} for k, v in m.data.splits.items()
        },
        # How val was made: whole documents by hash, documents split into chunks, or --val-input; what was dropped.
        "val": {
            "method": h.method,
            "documents_split": h.method == "chunks",
            "units": h.val_units,
            "dropped_units": h.dropped_units,
            "dropped_sequences": h.dropped_sequences,
            "min_val_raised": h.min_val_raised,
            "val_input": h.source,
        },
    }
    if json_:
        print_json(result)
        return
    for k, v in result["splits"].items():
        out.print(f"{k}: {v['sequences']:,} sequences, {v['tokens']:,} tokens in {v['shards']} shard(s)")
    unit = "chunks" if h.method == "chunks" else "documents"
    how = {"documents": "whole documents by hash", "chunks": "documents split into chunks", "val-input": "--val-input"}
    out.print(
        f"val from {how[h.method]}: {h.val_units:,} {unit}; dropped as also in train: {h.dropped_units:,} {unit}, "
        f"{h.dropped_sequences:,} sequences"
    )
    out.print(f"prepared {project} (recipe {m.recipe.name}); next: stackwise grow -p {project} --side right")
