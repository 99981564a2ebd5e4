"""What each training stage is: which blocks train, on what input, with which loss, and what is frozen in which
storage. One definition, read by every place that runs or models a stage:

- ``train-stack`` builds its modules, trainable set and loss from ``for_stack`` / ``for_rack`` (train/stack.py);
- ``bench memory`` and ``bench step`` build the same stage on random data (bench/case.py);
- ``bench plan`` turns ``planned`` into byte and FLOP rows (bench/plan.py);
- the FLOPs a run records come from ``flops_per_token`` of its stage.

A new curriculum or training option changes what a stage is here, and the trainer, the memory bench and the planner
follow. Torch-free: the planner and ``--help`` import it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from stackwise_cli.curricula import curriculum_of
from stackwise_cli.flops import (
    FlopShapes,
    train_stack_flops_per_token,
    whole_model_flops_per_token,
)
from stackwise_cli.recipe import Recipe
from stackwise_cli.store.manifest import Manifest

Source = Literal["tokens", "cache", "recompute"]


@dataclass(frozen=True)
class Stage:
    """One training stage with everything fixed that changes what is on the device and what the step computes.

    ``blocks`` has one entry per trained stack (one, or every stack end to end); ``prefix`` the frozen stacks run
    forward without grad before them on every batch (``train.prefix: recompute``); ``suffix`` the frozen stacks
    after them that the loss reads out through, the gradient passing back (right to left, or a stack inserted in
    front of trained ones). Both are stored in ``frozen_dtype``."""

    name: str  # train-stack-l2r | train-stack-r2l | end-to-end
    variant: str  # leftmost | cached | recompute | suffix | inserted | whole
    position: int | None  # the trained stack's rack position; None end to end
    blocks: tuple[int, ...]
    source: Source  # what enters the first trained block: the embedded tokens, a cache, or the recomputed prefix
    prefix: tuple[int, ...] = ()
    suffix: tuple[int, ...] = ()
    frozen_dtype: str = "bf16"
    embedding_trains: bool = False  # the input side of the ends: the embedding (and learned positions)
    head_trains: bool = False  # the output side: final norm, head (or with tied embeddings what is not the embedding)
    tied: bool = False  # the head's weight is the embedding's
    checkpointing: bool = False  # the trained blocks run under activation checkpointing
    suffix_checkpointing: bool = True

    @property
    def end_to_end(self) -> bool:
        return self.position is None

    @property
    def head_weight_trains(self) -> bool:
        """Whether the logits matmul's weight gets a gradient: tied, it is the embedding."""
        return self.embedding_trains if self.tied else self.head_trains


def _trains(recipe: Recipe, pos: int, right_to_left: bool, has_suffix: bool) -> tuple[bool, bool]:
    """(embedding, head): what of the ends trains with the stack at ``pos``.

    The embedding trains with the leftmost stack. Right to left with tied embeddings it is also the head that the
    trained suffix reads out through, so it trains only with the first stack. The first stack trained always trains
    the final norm and head (a random head makes every readout useless); left to right the later ones do too with
    ``train.head: train``, tied or not: with tied embeddings the output side is what is not the embedding matrix
    (the final norm, BERT's MLM transform and output bias), which no cache depends on. Right to left, and left to
    right for a stack inserted in front of trained ones, the head stays frozen: the trained suffix was fitted to it."""
    tr = recipe.train
    tied_head_in_use = right_to_left and recipe.model.tie_embeddings and has_suffix
    embedding = pos == 0 and tr.embedding == "train" and not tied_head_in_use
    first = not has_suffix if right_to_left else pos == 0
    head = first or (tr.head == "train" and not right_to_left and not has_suffix)
    return embedding, head


def _one(
    recipe: Recipe, variant: str, pos: int, blocks: int, prefix: list[int], suffix: list[int], right_to_left: bool
) -> Stage:
    """The stage of one stack at rack position ``pos`` with these frozen stacks before (recomputed) and after it;
    ``right_to_left``: a curriculum that grows from the output side (``Curriculum.from_output``)."""
    tr = recipe.train
    if pos == 0 or right_to_left:
        source: Source = "tokens"
    elif tr.prefix == "recompute":
        source = "recompute"
    else:
        source = "cache"
    embedding, head = _trains(recipe, pos, right_to_left, bool(suffix))
    return Stage(
        name="train-stack-r2l" if right_to_left else "train-stack-l2r",
        variant=variant,
        position=pos,
        blocks=(blocks,),
        source=source,
        prefix=tuple(prefix) if source == "recompute" else (),
        suffix=tuple(suffix),
        frozen_dtype=tr.frozen_dtype,
        embedding_trains=embedding,
        head_trains=head,
        tied=recipe.model.tie_embeddings,
        checkpointing=tr.activation_checkpointing,
        suffix_checkpointing=tr.suffix_checkpointing,
    )


def _whole(recipe: Recipe, blocks: list[int]) -> Stage:
    """End to end: the embedding (unless ``train.embedding: frozen``), every stack and the head train together."""
    tr = recipe.train
    return Stage(
        name="end-to-end",
        variant="whole",
        position=None,
        blocks=tuple(blocks),
        source="tokens",
        frozen_dtype=tr.frozen_dtype,
        embedding_trains=tr.embedding == "train",
        head_trains=True,
        tied=recipe.model.tie_embeddings,
        checkpointing=tr.activation_checkpointing,
        suffix_checkpointing=tr.suffix_checkpointing,
    )


def for_stack(m: Manifest, pos: int) -> Stage:
    """The stage that trains the stack at rack position ``pos`` of the project's rack as it is now."""
    curriculum = curriculum_of(m.recipe)
    suffix = curriculum.frozen_suffix(m, pos)
    variant = "leftmost" if pos == 0 else "cached"
    if curriculum.from_output:
        variant = "suffix"
    elif suffix:
        variant = "inserted"
    elif pos > 0 and m.recipe.train.prefix == "recompute":
        variant = "recompute"
    prefix = [e.blocks for e in m.rack[:pos]]
    return _one(m.recipe, variant, pos, m.rack[pos].blocks, prefix, [e.blocks for e in suffix], curriculum.from_output)


def for_rack(m: Manifest) -> Stage:
    """End to end over the project's whole rack."""
    return _whole(m.recipe, [e.blocks for e in m.rack])


def planned(recipe: Recipe) -> list[Stage]:
    """Every stage the recipe's planned rack runs that differs in what is on the device, in plan order: left to
    right the leftmost stack and a later one (from its cache, or the rightmost recomputing its whole prefix), right
    to left the leftmost stack in front of the whole trained suffix, and end to end the whole rack. Each is built
    by the rule train-stack follows, as if the rack were at that point."""
    k, n = recipe.rack.blocks_per_stack, recipe.rack.stacks
    stages = [_one(recipe, "leftmost", 0, k, [], [], False)]
    if n > 1:
        if recipe.train.prefix == "recompute":
            stages.append(_one(recipe, "recompute", n - 1, k, [k] * (n - 1), [], False))
        else:
            stages.append(_one(recipe, "cached", 1, k, [k], [], False))
    stages.append(_one(recipe, "suffix", 0, k, [], [k] * (n - 1), True))
    stages.append(_whole(recipe, [k] * n))
    return stages


def grown(recipe: Recipe) -> list[Stage]:
    """The stage of every planned stack in the order ``build`` trains them (end to end: the one whole-rack stage),
    each as ``for_stack`` builds it when that stack's turn comes: left to right stack i after the i trained to its
    left (from their cache, or recomputing them), right to left the j-th stack grown in front of the j trained."""
    k, n = recipe.rack.blocks_per_stack, recipe.rack.stacks
    curriculum = curriculum_of(recipe)
    if curriculum.whole_rack:
        return [_whole(recipe, [k] * n)]
    if curriculum.from_output:
        return [_one(recipe, "suffix", 0, k, [], [k] * j, True) for j in range(n)]
    later = "recompute" if recipe.train.prefix == "recompute" else "cached"
    return [_one(recipe, "leftmost" if i == 0 else later, i, k, [k] * i, [], False) for i in range(n)]


def measured(recipe: Recipe, name: str) -> Stage:
    """The planned stage ``name`` that ``bench memory`` and ``bench step`` measure: its last variant in
    ``planned``, so left to right a later stack (from its cache, or recomputing its prefix), the leftmost only
    when the rack has one stack."""
    return [s for s in planned(recipe) if s.name == name][-1]


def flops_per_token(stage: Stage, f: FlopShapes) -> float:
    """The training FLOPs per token of ``stage``, by the planner's formulas: the trained blocks forward and
    backward, the recomputed prefix forward, the frozen suffix forward and backward (its weights get no gradient),
    and the head, whose weight's gradient counts only where it trains."""
    if stage.end_to_end:
        return whole_model_flops_per_token(
            f,
            sum(stage.blocks),
            len(stage.blocks),
            checkpointing=stage.checkpointing,
            head_trains=stage.head_weight_trains,
        )
    return train_stack_flops_per_token(
        f,
        stage.blocks[0],
        head_trains=stage.head_weight_trains,
        checkpointing=stage.checkpointing,
        suffix_blocks=sum(stage.suffix),
        suffix_stacks=len(stage.suffix),
        prefix_blocks=list(stage.prefix),
    )
