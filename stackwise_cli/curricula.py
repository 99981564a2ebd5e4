"""Curricula: the order a rack's stacks are grown and trained, one class per curriculum, registered by the name a
recipe's ``curriculum`` gives (docs/objectives.md).

- ``left-to-right``: stacks are grown on the right; each trains on the trained stacks before it (their cache, or
  recomputed), its head reading its own output, so the trained prefix is a model of its own.
- ``right-to-left``: stacks are grown on the left; each trains from the tokens, its loss read out through the
  frozen, trained suffix after it; only the leftmost stack trains.
- ``end-to-end``: the whole rack trains at once (the baseline), ``train-stack all``.

A consumer asks the curriculum (``curriculum_of(recipe).grows``, ``.check(m, stack_id)``, ...) and never compares
its name. Adding a curriculum: its class here and its line in ``CURRICULA``, and its training stage where it
differs (train/stack.py, bench/plan.py). Torch-free, so the recipe validates against the registry.
"""

from __future__ import annotations

from typing import Any, ClassVar

from stackwise_cli.errors import ProjectError

# store.manifest.Manifest and StackEntry, and recipe.Recipe: this module sits below both in the layers (the recipe
# validates its curriculum here), so the types are named, not imported.
Manifest = Any
StackEntry = Any
Recipe = Any

TRAINED = ("trained", "frozen")


class Curriculum:
    """One curriculum. The defaults are a stack-by-stack curriculum's; a whole-rack one overrides ``check``."""

    name: ClassVar[str]
    grows: ClassVar[str]  # the side a new stack goes on: grow's and build's, once the rack has trained stacks
    whole_rack: ClassVar[bool] = False  # one run trains every stack together (`train-stack all`)
    # Stacks are grown from the output side: each new one trains from the tokens, in front of the trained suffix
    # after it, which its loss reads out through (frozen), with the suffix's head.
    from_output: ClassVar[bool] = False
    # A stack reads the trained stacks before it (their cache, or recomputed with train.prefix: recompute).
    reads_prefix: ClassVar[bool] = False
    # The head was trained reading each stack's output in turn, so the trained prefix is a model of its own (eval
    # scores it) and one pass may read the head after every stack (generate --single-pass).
    head_reads_each_stack: ClassVar[bool] = False
    plan_stage: ClassVar[str]  # the bench plan / bench memory stage of one of its training runs

    def check(self, m: Manifest, stack_id: int | None) -> int | None:
        """The rack position the curriculum lets ``stack_id`` train at (None: the whole rack); a ProjectError
        saying why not and what to run instead."""
        raise NotImplementedError

    def check_side(self, m: Manifest, side: str) -> None:
        """A ProjectError for a new stack on ``side`` that this curriculum cannot train."""

    def check_insert(self, m: Manifest) -> None:
        """A ProjectError if this curriculum cannot train a stack inserted between others (``grow --after``)."""

    def frozen_suffix(self, m: Manifest, pos: int) -> list[StackEntry]:
        """The trained stacks after ``pos`` that its loss reads out through."""
        return []

    def grown_index(self, m: Manifest, pos: int) -> int:
        """How many stacks were grown before the one at ``pos`` (the order of ``train.step_scale``)."""
        return pos

    def planned_index(self, recipe: Recipe, rack_size: int) -> int:
        """The place in the planned rack (0 = leftmost) of a new stack grown on a rack of ``rack_size`` stacks."""
        return rack_size

    def before(self, m: Manifest, pos: int) -> list[StackEntry]:
        """The stacks trained before the one at ``pos``, which drew the start of the training stream."""
        return m.rack[:pos]

    def dependents(self, m: Manifest, pos: int) -> list[StackEntry]:
        """The stacks (outermost first) whose training read the one at ``pos``."""
        return list(reversed(m.rack[pos + 1 :]))

    def next_to_train(self, entries: list[StackEntry]) -> StackEntry | None:
        """Which of the untrained ``entries`` trains next (None: all of them at once)."""
        return entries[0]


def inserted(m: Manifest, pos: int) -> bool:
    """Left to right, whether the stack at ``pos`` was inserted into a trained rack (``grow --after``, as LLaMA Pro
    inserts blocks): not trained itself, after a stack, and every stack to its right trained. It trains from the cache
    of the stacks before it, and its loss reads out through the frozen stacks after it (``frozen_suffix``)."""
    after = m.rack[pos + 1 :]
    return pos > 0 and m.rack[pos].state not in TRAINED and bool(after) and all(s.state in TRAINED for s in after)


def check_left_to_right(m: Manifest, stack_id: int, right: bool = True) -> int:
    """Left to right, a stack trains (or gets its cache) only on top of trained stacks, and (``right``) trains only
    while nothing to its right has trained on its output. Returns its rack position."""
    pos = m.position(stack_id)
    left = [s.id for s in m.rack[:pos] if s.state not in TRAINED]
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


def _one_at_a_time(m: Manifest, stack_id: int | None) -> int:
    if stack_id is None:
        raise ProjectError(
            f"`train-stack all` trains the whole rack end to end; this recipe's curriculum is {m.recipe.curriculum}",
            hint="train one stack at a time, or make a project with `curriculum: end-to-end` as the baseline",
        )
    return stack_id


class LeftToRight(Curriculum):
    name = "left-to-right"
    grows = "right"
    reads_prefix = True
    head_reads_each_stack = True
    plan_stage = "train-stack-l2r"

    def check(self, m: Manifest, stack_id: int | None) -> int | None:
        return check_left_to_right(m, _one_at_a_time(m, stack_id))

    def check_side(self, m: Manifest, side: str) -> None:
        trained = [s.id for s in m.rack if s.state in TRAINED]
        if side == "left" and trained:
            raise ProjectError(
                f"the recipe's curriculum is left-to-right: it grows on the right, and stack(s) "
                f"{', '.join(map(str, trained))} are trained on what the embedding gives them now",
                hint=f"run `stackwise grow --side right`, or `stackwise grow --after {m.rack[0].id}` to insert a "
                "stack between trained ones; growing on the left is the right-to-left curriculum's",
            )

    def frozen_suffix(self, m: Manifest, pos: int) -> list[StackEntry]:
        """Those after an inserted stack (``inserted``), none otherwise."""
        return m.rack[pos + 1 :] if inserted(m, pos) else []


class RightToLeft(Curriculum):
    name = "right-to-left"
    grows = "left"
    from_output = True
    plan_stage = "train-stack-r2l"

    def check(self, m: Manifest, stack_id: int | None) -> int | None:
        """Only the leftmost stack trains, against a suffix that is all trained. Returns 0."""
        stack_id = _one_at_a_time(m, stack_id)
        pos = m.position(stack_id)
        if pos != 0:
            raise ProjectError(
                f"right-to-left: stack {stack_id} is at rack position {pos}; only the leftmost stack "
                f"({m.rack[0].id}) trains, in front of the trained suffix",
                hint="grow a new stack on the left (`stackwise grow --side left`) and train that",
            )
        untrained = [s.id for s in m.rack[1:] if s.state not in TRAINED]
        if untrained:
            raise ProjectError(
                f"right-to-left: stack {stack_id} would learn against stack(s) {', '.join(map(str, untrained))}, "
                "which are not trained yet",
                hint=f"run `stackwise train-stack {untrained[-1]}` first (`stackwise build` runs every stage in order)",
            )
        return pos

    def check_side(self, m: Manifest, side: str) -> None:
        if side == "right" and m.rack:  # the first stack may go either way
            raise ProjectError(
                "the recipe's curriculum is right-to-left: new stacks go on the left, in front of the trained ones",
                hint="run `stackwise grow --side left`",
            )

    def check_insert(self, m: Manifest) -> None:
        raise ProjectError(
            "--after inserts a stack between trained ones, which the right-to-left curriculum cannot train "
            "(only its leftmost stack trains)",
            hint="run `stackwise grow --side left`, or use `curriculum: left-to-right`",
        )

    def frozen_suffix(self, m: Manifest, pos: int) -> list[StackEntry]:
        return m.rack[pos + 1 :]

    def grown_index(self, m: Manifest, pos: int) -> int:
        return len(m.rack) - 1 - pos

    def planned_index(self, recipe: Recipe, rack_size: int) -> int:
        return recipe.rack.stacks - 1 - rack_size  # the rack fills from the right

    def before(self, m: Manifest, pos: int) -> list[StackEntry]:
        return m.rack[pos + 1 :]

    def dependents(self, m: Manifest, pos: int) -> list[StackEntry]:
        return m.rack[:pos]

    def next_to_train(self, entries: list[StackEntry]) -> StackEntry | None:
        return entries[-1]  # the suffix first


class EndToEnd(Curriculum):
    name = "end-to-end"
    grows = "right"
    whole_rack = True
    plan_stage = "end-to-end"

    def check(self, m: Manifest, stack_id: int | None) -> int | None:
        if stack_id is not None:
            raise ProjectError(
                f"the recipe's curriculum is end-to-end: the whole rack trains at once, not stack {stack_id}",
                hint="run `stackwise train-stack all`",
            )
        if not m.rack:
            raise ProjectError("the rack is empty: nothing to train", hint="run `stackwise grow` once per stack")
        return None

    def dependents(self, m: Manifest, pos: int) -> list[StackEntry]:
        return m.rack[:pos] + m.rack[pos + 1 :]  # one run trained them together

    def next_to_train(self, entries: list[StackEntry]) -> StackEntry | None:
        return None


CURRICULA: dict[str, Curriculum] = {c.name: c for c in (LeftToRight(), RightToLeft(), EndToEnd())}


def curriculum_named(name: str) -> Curriculum:
    """The registered curriculum ``name``; a ProjectError naming the ones there are."""
    try:
        return CURRICULA[name]
    except KeyError:
        raise ProjectError(
            f"no curriculum {name!r}; the curricula are {', '.join(CURRICULA)}", hint="set curriculum: in the recipe"
        ) from None


def curriculum_of(recipe: Recipe) -> Curriculum:
    """The recipe's curriculum."""
    return curriculum_named(recipe.curriculum)


def trained_together(trained_by: str | None) -> bool:
    """Whether a stack recorded as ``trained_by`` was trained in one run with the whole rack (its tokens and FLOPs
    are that run's, recorded on every stack)."""
    return trained_by in CURRICULA and CURRICULA[trained_by].whole_rack
