"""``clm``: causal attention; the input is the tokens; position i predicts token i+1."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from stackwise_cli.objectives.base import Corrupted, Objective, ObjectiveKind

if TYPE_CHECKING:
    import torch


class Clm(ObjectiveKind):
    name = "clm"
    causal = True
    needs_mask_token = False
    scored = "next-token loss"
    harness_scoring = "exact"

    def key(self, o: Objective) -> str:
        return "tokens"  # nothing is corrupted: a cache depends on the tokens alone

    def corrupt(self, o: Objective, tokens: torch.Tensor, seq_ids: np.ndarray, epochs: np.ndarray | int) -> Corrupted:
        return Corrupted(tokens, tokens, None, None)

    def loss(self, logits: torch.Tensor, c: Corrupted, reduction: str) -> torch.Tensor:
        """The cross-entropy of the next token at every position."""
        import torch.nn.functional as F

        V = logits.shape[-1]
        return F.cross_entropy(logits[:, :-1].reshape(-1, V).float(), c.targets[:, 1:].reshape(-1), reduction=reduction)
