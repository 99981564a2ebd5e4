"""The curriculum rules: where a stack may train (left to right on trained stacks, right to left in front
of a trained suffix, or the whole rack end to end), which stacks its loss reads out through, what trains with it, and
how many steps and which slice of the learning-rate schedule it gets.
"""

from __future__ import annotations

from torch import nn

from stackwise_cli.errors import ProjectError
from stackwise_cli.model.model import Ends, Stack
from stackwise_cli.recipe import TrainRecipe
from stackwise_cli.store.manifest import Manifest, StackEntry


def check_left_to_right(m: Manifest, stack_id: int, right: bool = True) -> int:
    """Left to right, a stack trains (or gets its cache) only on top of trained stacks, and (``right``) trains only
    while nothing to its right has trained on its output. Returns its rack position."""
    pos = m.position(stack_id)
    left = [s.id for s in m.rack[:pos] if s.state not in ("trained", "frozen")]
    if left:
        raise ProjectError(
            f"left-to-right: stack {stack_id} would learn from stack(s) {', '.join(map(str, left))}, "
            "which are not trained yet",
            hint=f"run `stackwise train-stack {left[0]}` first (`stackwise build` runs every stage in order)",
        )
    trained_right = [s.id for s in m.rack[pos + 1 :] if s.state != "new"] if right else []
    if trained_right and not inserted(m, pos):
        raise ProjectError(
            f"left-to-right: stack {stack_id} has trained stacks to its right ({', '.join(map(str, trained_right))}); "
            "retraining it would silently invalidate them",
            hint="grow a new stack on the right instead (`stackwise grow --side right`)",
        )
    return pos


def inserted(m: Manifest, pos: int) -> bool:
    """Left to right, whether the stack at ``pos`` was inserted into a trained rack (``grow --after``, as LLaMA Pro
    inserts blocks): not trained itself, after a stack, and every stack to its right trained. It trains from the cache
    of the stacks before it, and its loss reads out through the frozen stacks after it (``frozen_suffix``)."""
    after = m.rack[pos + 1 :]
    return (
        pos > 0
        and m.rack[pos].state not in ("trained", "frozen")
        and bool(after)
        and all(s.state in ("trained", "frozen") for s in after)
    )


def frozen_suffix(m: Manifest, pos: int) -> list[StackEntry]:
    """The trained stacks after ``pos`` that a stack's loss passes through: right to left all of them; left to right
    those after an inserted stack (``inserted``), none otherwise."""
    if m.recipe.curriculum == "right-to-left" or inserted(m, pos):
        return m.rack[pos + 1 :]
    return []


def check_right_to_left(m: Manifest, stack_id: int) -> int:
    """Right to left, only the leftmost stack trains, against a suffix that is all trained. Returns 0."""
    pos = m.position(stack_id)
    if pos != 0:
        raise ProjectError(
            f"right-to-left: stack {stack_id} is at rack position {pos}; only the leftmost stack "
            f"({m.rack[0].id}) trains, in front of the trained suffix",
            hint="grow a new stack on the left (`stackwise grow --side left`) and train that",
        )
    untrained = [s.id for s in m.rack[1:] if s.state not in ("trained", "frozen")]
    if untrained:
        raise ProjectError(
            f"right-to-left: stack {stack_id} would learn against stack(s) {', '.join(map(str, untrained))}, "
            "which are not trained yet",
            hint=f"run `stackwise train-stack {untrained[-1]}` first (`stackwise build` runs every stage in order)",
        )
    return pos


def check_curriculum(m: Manifest, stack_id: int | None) -> int | None:
    """The rack position the curriculum lets ``stack_id`` train at (None: the whole rack, end to end)."""
    curriculum = m.recipe.curriculum
    if curriculum == "end-to-end":
        if stack_id is not None:
            raise ProjectError(
                f"the recipe's curriculum is end-to-end: the whole rack trains at once, not stack {stack_id}",
                hint="run `stackwise train-stack all`",
            )
        if not m.rack:
            raise ProjectError("the rack is empty: nothing to train", hint="run `stackwise grow` once per stack")
        return None
    if stack_id is None:
        raise ProjectError(
            f"`train-stack all` trains the whole rack end to end; this recipe's curriculum is {curriculum}",
            hint="train one stack at a time, or make a project with `curriculum: end-to-end` as the baseline",
        )
    if curriculum == "right-to-left":
        return check_right_to_left(m, stack_id)
    return check_left_to_right(m, stack_id)


def _grown_index(m: Manifest, pos: int) -> int:
    """How many stacks were grown before the one at ``pos``: left to right those to its left, right to left those
    to its right."""
    return len(m.rack) - 1 - pos if m.recipe.curriculum == "right-to-left" else pos


def _steps_of(tr: TrainRecipe, grown: int) -> int:
    if tr.step_scale is None or grown >= len(tr.step_scale):
        return tr.steps
    return round(tr.steps * tr.step_scale[grown])


def planned_steps(m: Manifest, pos: int) -> int:
    """The steps the recipe plans for the stack at rack position ``pos``: train.steps times its factor in
    ``train.step_scale``, which lists the stacks in the order they are grown (left to right: from the input; right to
    left: the leftmost stack is the last grown). A stack grown past the planned rack gets train.steps."""
    return _steps_of(m.recipe.train, _grown_index(m, pos))


def lr_span(m: Manifest, pos: int) -> tuple[int, int] | None:
    """``train.lr_schedule: whole-rack``: the stack's slice of one schedule over every planned stack's steps, as
    (steps of the stacks grown before it, steps of all of them); None for a per-stack schedule, or a stack grown past
    the planned rack (it gets its own)."""
    tr, grown = m.recipe.train, _grown_index(m, pos)
    if tr.lr_schedule != "whole-rack" or grown >= m.recipe.rack.stacks:
        return None
    steps = [_steps_of(tr, g) for g in range(m.recipe.rack.stacks)]
    return sum(steps[:grown]), sum(steps)


def trainable_for(
    stack: Stack, ends: Ends, tr: TrainRecipe, pos: int, right_to_left: bool, has_suffix: bool
) -> dict[str, nn.Parameter]:
    """What trains with one stack at rack position ``pos``, as ``stack.<name>`` / ``ends.<name>``.

    The embedding trains with the leftmost stack. Right to left with tied embeddings it is also the head that the
    trained suffix reads out through, so it trains only with the first stack. The first stack trained always trains
    the final norm and head (a random head makes every readout useless); left to right the later ones do too with
    `train.head: train`, tied or not: with tied embeddings the output side is what is not the embedding matrix (the
    final norm, BERT's MLM transform and output bias), which no cache depends on. Right to left, and left to right
    for a stack inserted in front of trained ones, the head stays frozen: the trained suffix was fitted to it."""
    trainable = {f"stack.{n}": p for n, p in stack.named_parameters()}
    tied_head_in_use = right_to_left and ends.head is None and has_suffix
    if pos == 0 and tr.embedding == "train" and not tied_head_in_use:
        trainable.update({f"ends.{n}": p for n, p in ends.named_input_parameters().items()})
    first = not has_suffix if right_to_left else pos == 0
    if first or (tr.head == "train" and not right_to_left and not has_suffix):
        trainable.update({f"ends.{n}": p for n, p in ends.named_output_parameters().items()})
    return trainable
