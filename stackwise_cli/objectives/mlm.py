"""``mlm``: bidirectional; each position is *selected* with probability ``mask.ratio``; a selected position reads
``[MASK]`` (80%), a random token (10%) or itself (10%); the loss is the cross-entropy on selected positions only."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from stackwise_cli.objectives.base import (
    HOW,
    RANDOM_TOKEN,
    Corrupted,
    Objective,
    ObjectiveKind,
    Recipe,
    masked,
    select,
    uniform,
)

if TYPE_CHECKING:
    import torch


class Mlm(ObjectiveKind):
    name = "mlm"
    scored = "masked-token loss"
    document_likelihood = False  # trained at one mask ratio, not as a generative model

    def planned_ratio(self, recipe: Recipe, index: int) -> float | None:
        return recipe.mask.ratio

    def rack_ratio(self, recipe: Recipe) -> float | None:
        return recipe.mask.ratio

    def key(self, o: Objective) -> str:
        parts = [super().key(o), f"mask_token={o.mask_token}", f"random_token={o.random_token}", f"vocab={o.vocab}"]
        if o.special_ids:  # the ids random replacements skip (keys without them predate the rule)
            parts.append(f"special={','.join(map(str, o.excluded_ids()))}")
        return " ".join(parts)

    def corrupt(self, o: Objective, tokens: torch.Tensor, seq_ids: np.ndarray, epochs: np.ndarray | int) -> Corrupted:
        """80% [MASK], 10% a random token, 10% unchanged, of the selected positions."""
        import torch

        seq_ids, epochs, t, selected = select(o, tokens, seq_ids, epochs)
        T = tokens.shape[1]
        inputs = tokens.clone()
        dev = tokens.device
        how = uniform(o.seed, epochs, seq_ids, T, HOW)
        to_mask = selected & (how < o.mask_token)
        to_random = selected & (how >= o.mask_token) & (how < o.mask_token + o.random_token)
        # A random ordinary token (never [MASK], <|endoftext|> or another special token): draw from the
        # vocab - n_excluded ordinary ids, then step over each excluded id in ascending order, which maps
        # 0, 1, 2, ... onto the ordinary ids one to one.
        excluded = o.excluded_ids()
        n = o.vocab - len(excluded)
        r = np.floor(uniform(o.seed, epochs, seq_ids, T, RANDOM_TOKEN) * n).astype(np.int64)
        for e in excluded:
            r = r + (r >= e)
        inputs[torch.from_numpy(to_mask).to(dev)] = o.mask_id
        rand = torch.from_numpy(to_random).to(dev)
        inputs[rand] = torch.from_numpy(r).to(dev)[rand]
        return masked(o, inputs, tokens, t, selected)
