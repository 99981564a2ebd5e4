"""Adding a stack to the rack with a new stable id."""

from __future__ import annotations

from typing import Literal

import torch

from stackwise_cli.curricula import curriculum_of
from stackwise_cli.errors import ProjectError
from stackwise_cli.model.io import load_stack, save_ends, save_stack
from stackwise_cli.model.model import Ends, Stack
from stackwise_cli.objectives import objective_kind, planned_ratio
from stackwise_cli.store.manifest import EndsEntry, StackEntry
from stackwise_cli.store.project import Project, record

Side = Literal["right", "left"]


def _generator(seed: int, salt: int) -> torch.Generator:
    # Each stack's random init depends only on (train.seed, its id): regrowing gives the same weights.
    return torch.Generator().manual_seed(seed * 1_000_003 + salt)


def grow(
    project: Project,
    side: Side = "right",
    blocks: int | None = None,
    init: str | None = None,
    after: int | None = None,
) -> StackEntry:
    """Append (right) or prepend (left) a stack, or (``after``: a stack id) insert it right after that stack, as
    LLaMA Pro inserts blocks into a pretrained model. Creates the ends first if the rack is empty.

    ``init``: random; copy (duplicate the neighbouring stack on that side); identity (random, then output
    projections zeroed, so the rack computes the same function as before). None: the recipe's ``rack.init``, which
    describes how the rack *grows*: the first stack, with no neighbour to copy and no trained function to
    preserve, starts random. An ``init`` asked for explicitly is taken as asked (identity on an empty rack is the
    function embedding -> head), and copy with nothing to copy is an error. Inserted, copy duplicates stack
    ``after``, and identity leaves the rack's function as it was (the stacks after it then read the same input).

    A side the curriculum does not grow is refused once the rack has trained stacks: left to right grows on the
    right, right to left on the left (the first stack may go either way; so may any while nothing is trained).
    """
    if side not in ("right", "left"):
        raise ProjectError(f"--side must be right or left, got {side!r}")
    with project.update() as m:
        recipe = m.recipe
        # Errors name where the init came from: the caller's choice (grow --init) or the recipe's key.
        source = "--init" if init is not None else "rack.init"
        if init is None:
            init = recipe.rack.init if m.rack else "random"
        curriculum = curriculum_of(recipe)
        at = _insert_position(m, after, recipe) if after is not None else None
        if at is None:
            curriculum.check_side(m, side)
        if (
            not curriculum.from_output
            and side == "left"
            and m.rack
            and objective_kind(recipe.objective).ratio_per_stack(recipe)
        ):
            raise ProjectError(
                f"the recipe's curriculum is {recipe.curriculum}: a {recipe.objective} stack's mask ratio comes from "
                "its place in the planned rack, which fills from the left",
                hint="run `stackwise grow --side right`, or use `curriculum: right-to-left`",
            )
        if init not in ("random", "copy", "identity"):
            raise ProjectError(f"{source} must be random, copy or identity, got {init!r}")
        stack_id = m.next_id
        cfg = recipe.model
        if m.ends is None:
            ends = Ends(cfg)
            ends.init_weights(_generator(recipe.train.seed, -1))
            sha, input_sha = save_ends(project, ends)
            m.ends = EndsEntry(file=project.ends_file, sha256=sha, input_sha256=input_sha)

        if init == "copy":
            if not m.rack:  # only an explicit --init: the recipe's first stack starts random
                raise ProjectError(
                    "--init copy needs a neighbouring stack to copy, and the rack is empty",
                    hint="grow the first stack with --init random (or without --init)",
                )
            neighbour = m.rack[at - 1] if at is not None else m.rack[-1] if side == "right" else m.rack[0]
            if blocks is not None and blocks != neighbour.blocks:
                fix = "--init random" if source == "--init" else "--init random, or set rack.init: random"
                raise ProjectError(
                    f"{source} copy duplicates stack {neighbour.id}, which has {neighbour.blocks} blocks, not {blocks}",
                    hint=f"grow with --blocks {neighbour.blocks}, or with {fix}",
                )
            stack = load_stack(project, m, neighbour.id)
            blocks = neighbour.blocks
        else:
            blocks = blocks if blocks is not None else recipe.rack.blocks_per_stack
            if blocks < 1:
                raise ProjectError(f"--blocks must be >= 1, got {blocks}")
            stack = Stack(cfg, blocks, recipe.attention)
            planned = max(recipe.rack.stacks * recipe.rack.blocks_per_stack, sum(s.blocks for s in m.rack) + blocks)
            depth = recipe.rack.init_depth or planned
            stack.init_weights(init, total_blocks=depth, generator=_generator(recipe.train.seed, stack_id))

        # Its place in the planned rack: left to right (and end to end) the rack fills from the left, right to left
        # from the right, whichever side the first stack was grown on. That place fixes its mask ratio (diffusion:
        # depth is reverse time).
        ratio = planned_ratio(recipe, curriculum.planned_index(recipe, len(m.rack)))
        entry = StackEntry(
            id=stack_id,
            blocks=blocks,
            file=project.stack_file(stack_id),
            sha256=save_stack(project, stack, stack_id),
            init=init,
            mask_ratio=ratio,
        )
        where = f"--after {after}" if at is not None else f"--side {side}"
        if at is not None:
            m.rack.insert(at, entry)
        elif side == "right":
            m.rack.append(entry)
        else:
            m.rack.insert(0, entry)
        m.next_id = stack_id + 1
        record(m, f"grow {where} --blocks {blocks} --init {init} -> id {stack_id}")
    return entry


def _insert_position(m, after: int, recipe) -> int:
    """The rack position a stack inserted after stack ``after`` takes. Left to right (or end to end) only: right to
    left only the leftmost stack trains, and a time-as-depth diffusion stack's mask ratio is its place in the planned
    rack."""
    pos = m.position(after)  # an unknown id names the ids there are
    curriculum_of(recipe).check_insert(m)
    if objective_kind(recipe.objective).ratio_per_stack(recipe):
        raise ProjectError(
            f"--after: a {recipe.objective} stack's mask ratio comes from its place in the planned rack, which an "
            "inserted stack has none of",
            hint="run `stackwise grow --side right`",
        )
    return pos + 1
