from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from stackwise_cli.commands.options import DeviceOpt, JsonOpt, ProjectOpt
from stackwise_cli.console import CliReporter, out, print_json


def cache(
    stack_id: Annotated[int, typer.Argument(metavar="ID", help="Stack id: cache the hidden states entering it.")],
    split: Annotated[str, typer.Option("--split", help="train, val or all.")] = "train",
    device: DeviceOpt = "auto",
    project: ProjectOpt = Path("."),
    json_: JsonOpt = False,
) -> None:
    """Compute the hidden states entering a stack, shard by shard (restartable, incremental)."""
    from stackwise_cli.store.project import Project
    from stackwise_cli.train.cache import SPLITS, build_cache

    splits = list(SPLITS) if split == "all" else [split]
    entries = [build_cache(Project(project), stack_id, s, device, CliReporter(quiet=json_)) for s in splits]
    result = [
        {
            "stack": e.stack,
            "split": e.split,
            "dtype": e.dtype,
            "shards": len(e.shards),
            "sequences": sum(s.sequences for s in e.shards),
        }
        for e in entries
    ]
    if json_:
        print_json(result)
        return
    for r in result:
        out.print(
            f"cache {r['stack']}/{r['split']}: {r['sequences']:,} sequences in {r['shards']} shard(s), {r['dtype']}"
        )
