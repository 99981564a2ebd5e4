"""``build``: run whatever stages the recipe's planned rack still needs, idempotently.

Each stage checks the manifest and skips what is done, so after a kill (or a Slurm requeue) the same command
finishes the job: prepare -> for each planned stack: grow, cache, train-stack -> fuse -> eval.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from stackwise_cli.curricula import curriculum_of
from stackwise_cli.data.prepare import prepare
from stackwise_cli.errors import ProjectError
from stackwise_cli.evaluate.eval import EvalResult, evaluate
from stackwise_cli.fuse import ANY, fuse, is_fused
from stackwise_cli.model.hf import export_problem
from stackwise_cli.objectives import objective_kind
from stackwise_cli.progress import QUIET, Reporter
from stackwise_cli.recipe import Recipe, load_recipe
from stackwise_cli.store.manifest import StackEntry
from stackwise_cli.store.project import Project
from stackwise_cli.train.cache import build_cache, is_fresh
from stackwise_cli.train.grow import grow
from stackwise_cli.train.stack import train_stack


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
        adopt_recipe(project, load_recipe(recipe, overrides), recipe, reporter)
    project.sweep()
    recipe = project.load().recipe
    curriculum = curriculum_of(recipe)
    if curriculum.whole_rack:
        end_to_end(project, recipe.rack.stacks, device, precision, reporter, result.ran)
    else:
        stack_by_stack(project, recipe.rack.stacks, curriculum.grows, device, precision, reporter, result.ran)
    problem = export_problem_for(project.load().recipe)
    if problem:
        result.fused = problem
    elif not is_fused(project, ANY):  # a fused/ fine-tuned by hand on this rack is kept
        fuse(project)
        result.ran.append("fuse")
    result.eval = evaluate(project, device=device, reporter=reporter)
    from stackwise_cli.evaluate.plot import record_eval

    record_eval(project, result.eval)  # for `stackwise plot`'s readout curve
    return result


def adopt_recipe(project: Project, wanted: Recipe, source: Path, reporter: Reporter = QUIET) -> None:
    """``build --recipe`` on an existing project: the same recipe continues it; one that differs only in run-time
    settings (``settings.py``: cadence, eval sizes) or in a larger ``rack.stacks`` is adopted, recorded in the
    history (build then grows and trains the new stacks); any other difference is refused, naming every key."""
    from stackwise_cli.settings import CADENCE, EVAL_SIZES, differences

    m = project.load()
    changes = differences(m.recipe, wanted)
    if not changes:
        return
    refused = [c for c in changes if c.key not in (*CADENCE, *EVAL_SIZES, "rack.stacks")]
    grow = next((c for c in changes if c.key == "rack.stacks"), None)
    why = ""
    if grow is not None and grow.new < grow.old:
        refused.append(grow)
        why = f"; rack.stacks can grow, not shrink ({grow.old} -> {grow.new})"
    elif grow is not None and objective_kind(m.recipe.objective).ratio_per_stack(m.recipe):
        refused.append(grow)
        why = "; rack.stacks spreads the diffusion time-as-depth schedule over the planned stacks, fixed at grow"
    elif grow is not None and curriculum_of(m.recipe).whole_rack and any(e.state != "new" for e in m.rack):
        refused.append(grow)
        why = "; end to end trains the whole rack at once, and it is trained"
    if refused:
        what = ", ".join(f"{c.key} ({c.old!r} -> {c.new!r})" for c in refused)
        raise ProjectError(
            f"{project.root} was prepared with a different recipe than {source} (with these --set overrides): "
            f"{what}{why}",
            hint="drop --recipe to continue the project as it is, or build into a new folder",
        )
    what = " ".join(f"--set {c.key}={c.new}" for c in changes)
    with project.update(f"build --recipe {source} {what}") as mm:
        mm.recipe = wanted
    reporter.info(f"recipe changed: {', '.join(f'{c.key} {c.old!r} -> {c.new!r}' for c in changes)}")


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
            cached = m.recipe.train.prefix == "cache"  # recompute: the stack runs its prefix on every batch
            if side == "right" and i > 0 and cached and not is_fresh(project, m, entry.id, "train"):
                build_cache(project, entry.id, "train", device=device, reporter=reporter)
                ran.append(f"cache {entry.id}")
            with around_train():
                train_stack(project, entry.id, precision=precision, device=device, reporter=reporter)
            ran.append(f"train-stack {entry.id}")
        if after_each is not None:
            after_each(i, entry)


def end_to_end(
    project: Project,
    planned: int,
    device: str = "auto",
    precision: str = "auto",
    reporter: Reporter = QUIET,
    ran: list[str] | None = None,
    around_train: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
) -> None:
    """Grow the whole planned rack, then train it at once: the baseline. The training runs inside
    ``around_train()`` (``bench compare`` measures its memory there)."""
    ran = [] if ran is None else ran
    while len(project.load().rack) < planned:
        entry = grow(project, "right")
        ran.append(f"grow -> {entry.id}")
    if any(s.state != "trained" for s in project.load().rack):
        with around_train():
            train_stack(project, "all", precision=precision, device=device, reporter=reporter)
        ran.append("train-stack all")
