"""``build``: run whatever stages the recipe's planned rack still needs, idempotently.

Each stage checks the manifest and skips what is done, so after a kill (or a Slurm requeue) the same command
finishes the job: prepare -> for each planned stack: grow, cache, train-stack -> fuse -> eval.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from stackwise_cli.data.prepare import prepare
from stackwise_cli.errors import ProjectError
from stackwise_cli.evaluate.eval import EvalResult, evaluate
from stackwise_cli.model.hf import export_problem
from stackwise_cli.progress import QUIET, Reporter
from stackwise_cli.recipe import load_recipe
from stackwise_cli.store.project import Project
from stackwise_cli.train.cache import build_cache, is_fresh
from stackwise_cli.train.fuse import fuse, is_fused
from stackwise_cli.train.grow import grow
from stackwise_cli.train.loop import train_stack


@dataclass
class BuildResult:
    ran: list[str] = field(default_factory=list)  # the stages this invocation ran (empty = nothing to do)
    eval: EvalResult | None = None
    fused: str | None = None  # why there is no fused/ (e.g. an attention kind Llama cannot hold), or None


def build(
    project: Project,
    recipe: Path | None = None,
    overrides: list[str] | None = None,
    inputs: list[Path] | None = None,
    device: str = "auto",
    reporter: Reporter = QUIET,
) -> BuildResult:
    result = BuildResult()
    if not project.exists():
        if recipe is None:
            raise ProjectError(
                f"no project at {project.root} and no recipe to create one",
                hint="pass --recipe recipes/llama/tiny.yaml",
            )
        prepare(project, load_recipe(recipe, overrides), inputs, reporter=reporter)
        result.ran.append("prepare")
    elif recipe is not None:
        wanted = load_recipe(recipe, overrides)
        if wanted != project.load().recipe:
            raise ProjectError(
                f"{project.root} was prepared with a different recipe than {recipe} (with these --set overrides)",
                hint="drop --recipe to continue it, or build into a new folder",
            )
    project.sweep()
    planned = project.load().recipe.rack.stacks
    for i in range(planned):
        m = project.load()
        if len(m.rack) <= i:
            entry = grow(project, "right")
            result.ran.append(f"grow -> {entry.id}")
            m = project.load()
        entry = m.rack[i]
        if entry.state == "trained":  # however many steps: a stack trained by hand is the user's choice
            continue
        if i > 0 and not is_fresh(project, m, entry.id, "train"):
            build_cache(project, entry.id, "train", device=device, reporter=reporter)
            result.ran.append(f"cache {entry.id}")
        train_stack(project, entry.id, device=device, reporter=reporter)
        result.ran.append(f"train-stack {entry.id}")
    problem = export_problem(project.load().recipe.attention)
    if problem:
        result.fused = problem
    elif not is_fused(project):
        fuse(project)
        result.ran.append("fuse")
    result.eval = evaluate(project, device=device, reporter=reporter)
    return result
