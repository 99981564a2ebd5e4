"""``build``: run whatever stages the recipe's planned rack still needs, idempotently.

Each stage checks the manifest and skips what is done, so after a kill (or a Slurm requeue) the same command
finishes the job: prepare -> for each planned stack: grow, cache, train-stack -> fuse -> eval.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from stackwise_cli.data.prepare import prepare
from stackwise_cli.errors import ProjectError
from stackwise_cli.evaluate.eval import EvalResult, evaluate
from stackwise_cli.model.hf import export_problem
from stackwise_cli.progress import QUIET, Reporter
from stackwise_cli.recipe import Recipe, load_recipe
from stackwise_cli.store.manifest import StackEntry
from stackwise_cli.store.project import Project
from stackwise_cli.train.cache import build_cache, is_fresh
from stackwise_cli.train.fuse import ANY, fuse, is_fused
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
    val_inputs: list[Path] | None = None,
    precision: str = "auto",
) -> BuildResult:
    result = BuildResult()
    if not project.exists():
        if recipe is None:
            raise ProjectError(
                f"no project at {project.root} and no recipe to create one",
                hint="pass --recipe recipes/llama/tiny.yaml",
            )
        prepare(project, load_recipe(recipe, overrides), inputs, reporter=reporter, val_inputs=val_inputs)
        result.ran.append("prepare")
    elif recipe is not None:
        wanted = load_recipe(recipe, overrides)
        if wanted != project.load().recipe:
            raise ProjectError(
                f"{project.root} was prepared with a different recipe than {recipe} (with these --set overrides)",
                hint="drop --recipe to continue it, or build into a new folder",
            )
    project.sweep()
    recipe = project.load().recipe
    if recipe.curriculum == "end-to-end":
        _end_to_end(project, recipe.rack.stacks, device, precision, reporter, result.ran)
    else:
        side = "right" if recipe.curriculum == "left-to-right" else "left"
        stack_by_stack(project, recipe.rack.stacks, side, device, precision, reporter, result.ran)
    problem = export_problem_for(project.load().recipe)
    if problem:
        result.fused = problem
    elif not is_fused(project, ANY):  # a fused/ fine-tuned by hand on this rack is kept
        fuse(project)
        result.ran.append("fuse")
    result.eval = evaluate(project, device=device, reporter=reporter)
    return result


def export_problem_for(recipe: Recipe) -> str | None:
    """Why ``fused/`` cannot hold this recipe's model, or None."""
    return export_problem(recipe.attention, recipe.model, bidirectional=recipe.bidirectional)


def stack_by_stack(
    project: Project,
    planned: int,
    side: str,
    device: str = "auto",
    precision: str = "auto",
    reporter: Reporter = QUIET,
    ran: list[str] | None = None,
    around_train: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    after_each: Callable[[int, StackEntry], None] | None = None,
) -> None:
    """Grow one stack at a time on ``side`` and train it: left to right (side right) on the cache of the trained
    stacks to its left; right to left (side left) through the frozen, trained suffix to its right. ``ran`` collects
    the stages run; each train-stack runs inside ``around_train()`` (``bench compare`` measures its memory there),
    and ``after_each(i, entry)`` is called once the i-th stack grown is trained (now or before)."""
    ran = [] if ran is None else ran
    flag = "" if side == "right" else f" --side {side}"
    for i in range(planned):
        m = project.load()
        if len(m.rack) <= i:
            entry = grow(project, side)
            ran.append(f"grow{flag} -> {entry.id}")
            m = project.load()
        entry = m.rack[i] if side == "right" else m.rack[len(m.rack) - 1 - i]  # the i-th grown, from its side
        if entry.state != "trained":  # however many steps: a stack trained by hand is the user's choice
            if side == "right" and i > 0 and not is_fresh(project, m, entry.id, "train"):
                build_cache(project, entry.id, "train", device=device, reporter=reporter)
                ran.append(f"cache {entry.id}")
            with around_train():
                train_stack(project, entry.id, precision=precision, device=device, reporter=reporter)
            ran.append(f"train-stack {entry.id}")
        if after_each is not None:
            after_each(i, entry)


def _end_to_end(
    project: Project, planned: int, device: str, precision: str, reporter: Reporter, ran: list[str]
) -> None:
    """Grow the whole planned rack, then train it at once: the baseline."""
    while len(project.load().rack) < planned:
        entry = grow(project, "right")
        ran.append(f"grow -> {entry.id}")
    if any(s.state != "trained" for s in project.load().rack):
        train_stack(project, "all", precision=precision, device=device, reporter=reporter)
        ran.append("train-stack all")
