from __future__ import annotations

from pathlib import Path

from stackwise_cli.commands.options import JsonOpt, ProjectOpt
from stackwise_cli.console import out, print_json


def fuse(project: ProjectOpt = Path("."), json_: JsonOpt = False) -> None:
    """Assemble ends + rack into one model in fused/ (Hugging Face format: LlamaForCausalLM)."""
    from stackwise_cli.store.project import Project
    from stackwise_cli.train.fuse import fuse as run

    entry = run(Project(project))
    if json_:
        print_json(
            {"dir": str(Path(project) / entry.dir), "sha256": entry.sha256, "stacks": [s.id for s in entry.stacks]}
        )
    else:
        out.print(f"fused {len(entry.stacks)} stack(s) into {Path(project) / entry.dir} (loads with transformers)")
