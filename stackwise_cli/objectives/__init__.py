"""Objectives: what the model reads, what it must predict, and the loss (docs/objectives.md). One class per
objective, each in its own module, registered here by the name a recipe's ``objective`` gives.

A consumer asks the objective (``objective_kind(name).causal``, ``.needs_mask_token``, ...) and never compares its
name. Adding an objective: its module here, its line in ``OBJECTIVES``, and its recipe section in recipe.py.
"""

from __future__ import annotations

from stackwise_cli.errors import ProjectError
from stackwise_cli.objectives.base import CACHE_EPOCH, Corrupted, Objective, ObjectiveKind, Recipe, uniform
from stackwise_cli.objectives.clm import Clm
from stackwise_cli.objectives.diffusion import Diffusion
from stackwise_cli.objectives.mlm import Mlm

__all__ = [
    "CACHE_EPOCH",
    "NEXT_TOKEN",
    "OBJECTIVES",
    "Corrupted",
    "Objective",
    "ObjectiveKind",
    "objective_for",
    "objective_kind",
    "planned_ratio",
    "uniform",
]

OBJECTIVES: dict[str, ObjectiveKind] = {k.name: k for k in (Clm(), Mlm(), Diffusion())}
NEXT_TOKEN = "clm"  # what a causal readout of any rack is scored as (eval --causal)


def objective_kind(name: str) -> ObjectiveKind:
    """The registered objective ``name``; a ProjectError naming the ones there are."""
    try:
        return OBJECTIVES[name]
    except KeyError:
        raise ProjectError(
            f"no objective {name!r}; the objectives are {', '.join(OBJECTIVES)}", hint="set objective: in the recipe"
        ) from None


def objective_for(
    recipe: Recipe, mask_id: int | None, vocab: int, ratio: float | None, special_ids: tuple[int, ...] = ()
) -> Objective:
    """The recipe's objective at one stack's ``ratio`` (its manifest ``mask_ratio``; None = t drawn per sequence).

    ``vocab`` is the tokenizer's size and ``special_ids`` its special tokens (``tokenizer_special_ids``): random
    replacement tokens are real, ordinary tokens."""
    kind = objective_kind(recipe.objective)
    if kind.needs_mask_token and mask_id is None:
        raise ProjectError(
            f"objective {kind.name!r} needs a [MASK] token, and this project's tokenizer has none in the manifest",
            hint="prepare the project again with this version of stackwise (it adds [MASK] to the tokenizer)",
        )
    d = recipe.diffusion
    return Objective(
        kind=kind.name,
        seed=recipe.train.seed,
        mask_id=mask_id,
        vocab=vocab,
        special_ids=tuple(special_ids),
        ratio=ratio if kind.needs_mask_token else None,
        t_range=(d.t_min, d.t_max),
        time_input=kind.time_input(recipe),
        mask_token=recipe.mask.mask_token,
        random_token=recipe.mask.random_token,
    )


def planned_ratio(recipe: Recipe, index: int) -> float | None:
    """The mask ratio of the stack at ``index`` (0 = leftmost) of the planned rack: the recipe's mlm ratio; the
    diffusion schedule's t for time-as-depth; None for clm and for time-as-input (t is drawn per sequence)."""
    return objective_kind(recipe.objective).planned_ratio(recipe, index)
