"""The trainer's side of a curriculum: what trains with a stack, and how many steps and which slice of the
learning-rate schedule it gets. Where a stack may train, which stacks its loss reads out through and the order stacks
are grown are the curriculum's own (stackwise_cli/curricula.py).
"""

from __future__ import annotations

from stackwise_cli.curricula import curriculum_of
from stackwise_cli.recipe import TrainRecipe
from stackwise_cli.store.manifest import Manifest, StackEntry


def frozen_suffix(m: Manifest, pos: int) -> list[StackEntry]:
    """The trained stacks after ``pos`` that a stack's loss passes through, by the recipe's curriculum (right to left
    all of them; left to right those after an inserted stack, none otherwise)."""
    return curriculum_of(m.recipe).frozen_suffix(m, pos)


def _steps_of(tr: TrainRecipe, grown: int) -> int:
    if tr.step_scale is None or grown >= len(tr.step_scale):
        return tr.steps
    return round(tr.steps * tr.step_scale[grown])


def planned_steps(m: Manifest, pos: int) -> int:
    """The steps the recipe plans for the stack at rack position ``pos``: train.steps times its factor in
    ``train.step_scale``, which lists the stacks in the order they are grown (left to right: from the input; right to
    left: the leftmost stack is the last grown). A stack grown past the planned rack gets train.steps."""
    return _steps_of(m.recipe.train, curriculum_of(m.recipe).grown_index(m, pos))


def lr_span(m: Manifest, pos: int) -> tuple[int, int] | None:
    """``train.lr_schedule: whole-rack``: the stack's slice of one schedule over every planned stack's steps, as
    (steps of the stacks grown before it, steps of all of them); None for a per-stack schedule, or a stack grown past
    the planned rack (it gets its own)."""
    tr, grown = m.recipe.train, curriculum_of(m.recipe).grown_index(m, pos)
    if tr.lr_schedule != "whole-rack" or grown >= m.recipe.rack.stacks:
        return None
    steps = [_steps_of(tr, g) for g in range(m.recipe.rack.stacks)]
    return sum(steps[:grown]), sum(steps)
