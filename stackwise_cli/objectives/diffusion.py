"""``diffusion`` (masked diffusion, MDLM / LLaDA): bidirectional; each position reads ``[MASK]`` with probability
t and the loss is the cross-entropy on the masked positions. t is the stack's ratio (time-as-depth) or drawn per
sequence in [t_min, t_max] (time-as-input, fed to the model; time drawn, not fed; and the end-to-end baseline of
time-as-depth)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from stackwise_cli.errors import ProjectError
from stackwise_cli.objectives.base import Corrupted, Objective, ObjectiveKind, Recipe, masked, select

if TYPE_CHECKING:
    import torch


class Diffusion(ObjectiveKind):
    name = "diffusion"
    scored = "masked loss at the stack's t"
    headline = "ELBO bound"
    harness_scoring = "bound"
    scores_elbo = True

    def problems(self, recipe: Recipe) -> list[tuple[str, str]]:
        d = recipe.diffusion
        if isinstance(d.schedule, list) and len(d.schedule) != recipe.rack.stacks:
            return [
                (
                    "diffusion.schedule",
                    f"needs one ratio per planned stack (rack.stacks = {recipe.rack.stacks}), got {len(d.schedule)}",
                )
            ]
        return []

    def time_input(self, recipe: Recipe) -> bool:
        return recipe.diffusion.time == "input"

    def ratio_per_stack(self, recipe: Recipe) -> bool:
        return recipe.diffusion.time == "depth"

    def planned_ratio(self, recipe: Recipe, index: int) -> float | None:
        """Time-as-depth: the schedule's t of the stack's place; input or drawn: None (t drawn per sequence)."""
        if recipe.diffusion.time != "depth":
            return None
        ratios = recipe.diffusion.ratios(recipe.rack.stacks)
        if not 0 <= index < len(ratios):
            raise ProjectError(
                f"the diffusion schedule has {len(ratios)} ratios, one per planned stack (rack.stacks = "
                f"{recipe.rack.stacks}); a stack at planned position {index} has none",
                hint="plan a bigger rack: raise rack.stacks (and the schedule's length, if it is a list)",
            )
        return ratios[index]

    def readout_ratio(self, ratio: float | None) -> float | None:
        return ratio if ratio is not None else 0.5  # t drawn per sequence: read out at the middle of (0, 1)

    def single_pass(self, time: str) -> bool:
        return time == "depth"

    def describe(self, time: str) -> str:
        return f"diffusion with diffusion.time {time!r}"

    def corrupt(self, o: Objective, tokens: torch.Tensor, seq_ids: np.ndarray, epochs: np.ndarray | int) -> Corrupted:
        """Each selected position reads [MASK]."""
        import torch

        seq_ids, epochs, t, selected = select(o, tokens, seq_ids, epochs)
        inputs = tokens.clone()
        inputs[torch.from_numpy(selected).to(tokens.device)] = o.mask_id
        return masked(o, inputs, tokens, t, selected)
