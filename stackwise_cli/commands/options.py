"""Option aliases shared by every command, declared once."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

ProjectOpt = Annotated[Path, typer.Option("-p", "--project", help="The project directory.", show_default=True)]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print a machine-readable JSON result on stdout.")]
ForceOpt = Annotated[
    bool, typer.Option("--force", help="Run even when the memory planner says the recipe cannot fit this machine.")
]
DeviceOpt = Annotated[str, typer.Option("--device", help="auto (GPU if present), cpu, cuda or cuda:N.")]
RecipeOpt = Annotated[Path | None, typer.Option("--recipe", help="Recipe YAML, e.g. recipes/llama/tiny.yaml.")]
SetOpt = Annotated[
    list[str] | None, typer.Option("--set", help="Override a recipe key: --set train.steps=200 (repeatable).")
]
RunSetOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--set",
        help="Change a run-time setting of the project's recipe, recorded in its history (repeatable): "
        "checkpoint/log/eval cadence, eval sizes; lr and steps before the run they shape.",
    ),
]
InputOpt = Annotated[
    list[Path] | None,
    typer.Option(
        "--input",
        help="Text file, folder, JSONL, CSV/TSV (these also .gz/.zst), Parquet, Arrow, or a datasets save_to_disk "
        "folder (repeatable). Default: built-in corpus.",
    ),
]
PrecisionOpt = Annotated[
    str,
    typer.Option(
        "--precision",
        help="Training compute: auto (bf16 on a GPU with bf16, else fp32); fp32; bf16 or fp16 (mixed, fp32 master "
        "weights; fp16 with loss scaling); fp8 (scaled e4m3 matmuls).",
    ),
]
ValInputOpt = Annotated[
    list[Path] | None,
    typer.Option(
        "--val-input",
        help="Take the val split from this text file, folder, JSONL, Parquet or Arrow (repeatable); "
        "all of --input is then train.",
    ),
]
