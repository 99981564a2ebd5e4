from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from stackwise_cli.commands.options import JsonOpt, SetOpt
from stackwise_cli.console import out, print_json, print_table


def step(
    recipe: Annotated[Path, typer.Option("--recipe", help="Recipe YAML whose model is measured.")],
    set_: SetOpt = None,
    device: Annotated[str, typer.Option("--device", help="cpu or cuda.")] = "cpu",
    batch_size: Annotated[
        int | None, typer.Option("--batch-size", min=1, help="Sequences per step (default: the recipe's).")
    ] = None,
    warmup: Annotated[int, typer.Option("--warmup", min=0, help="Untimed steps first.")] = 2,
    repeats: Annotated[int, typer.Option("--repeats", min=1, help="Timed steps; the median is reported.")] = 5,
    json_: JsonOpt = False,
) -> None:
    """One training step of a stack (from its cache) against one step of the whole model trained end to end."""
    from stackwise_cli.bench.step import bench_step
    from stackwise_cli.recipe import load_recipe
    from stackwise_cli.train.precision import pick_device

    dev = str(pick_device(device))
    rows = bench_step(load_recipe(recipe, set_), dev, batch_size, warmup, repeats)
    if json_:
        print_json(
            {
                "device": dev,
                "cases": [r.__dict__ for r in rows],
                "stack_over_end_to_end_tokens_per_s": rows[0].tokens_per_s / rows[1].tokens_per_s,
            }
        )
        return
    print_table(
        f"train step on {dev} (median of {repeats})",
        ["case", "blocks", "params trained", "step s", "tokens/s", "peak MiB"],
        [
            [
                r.case,
                r.blocks,
                f"{r.params_trained:,}",
                r.step_s,
                f"{r.tokens_per_s:,.0f}",
                f"{r.peak_bytes / 2**20:,.1f}",
            ]
            for r in rows
        ],
    )
    out.print(
        f"stack / end-to-end: {rows[0].tokens_per_s / rows[1].tokens_per_s:.2f}x tokens/s, "
        f"{rows[0].peak_bytes / max(rows[1].peak_bytes, 1):.2f}x peak memory ({rows[0].memory_how})"
    )
