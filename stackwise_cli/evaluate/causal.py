"""Reading a masked rack (mlm, diffusion) left to right: the next token from a ``[MASK]`` at the next position.

A clm rack is trained so that position i predicts token i+1: its causal readout is the shifted one. An mlm or
diffusion rack is trained so that position i predicts token i (the token hidden under a ``[MASK]`` there); reading
its position i as token i+1 is one position off. Its causal readout is therefore: to predict token p from the
prefix 0..p-1, put a ``[MASK]`` at position p, run causal attention, and read position p's logits. With causal
attention that ``[MASK]`` sees only the prefix and itself, and the prefix's states do not depend on it.

Done once per position, that is one forward pass per scored token. Here it goes through the KV cache instead
(``Stack.decode``): the real tokens are decoded left to right into the per-stack caches, and before token p enters
them a ``[MASK]`` "probe" at position p is decoded against them and its caches are dropped. Every position runs
twice through the rack (the real token and the probe), one position per step: about twice the work of one causal
forward, in T small steps rather than one big one.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from stackwise_cli.errors import ProjectError
from stackwise_cli.model.model import Rack


def decode_stacks(
    rack: Rack, tokens: torch.Tensor, start: int, caches: list | None, read: Sequence[int] = ()
) -> tuple[dict[int, torch.Tensor], list]:
    """``Rack.decode`` with the head read after the stacks at the rack positions ``read``: new tokens (B, n) at
    positions start..start+n-1 -> ({position in rack: logits (B, n, V)}, the caches extended by them)."""
    caches = list(caches) if caches is not None else [None] * len(rack.stacks)
    h = rack.ends.embed_tokens(tokens, start)  # (B, n, d)
    out = {}
    for i, stack in enumerate(rack.stacks):
        h, caches[i] = stack.decode(h, start, caches[i])
        if i in read:
            out[i] = rack.ends.logits(h)  # (B, n, V)
    return out, caches


def require_mask_id(
    mask_id: int | None, why: str, hint: str = "prepare the project again (prepare adds [MASK] to every tokenizer)"
) -> int:
    """``mask_id``, or a ProjectError saying the tokenizer has no [MASK] token and ``why`` one is needed."""
    if mask_id is None:
        raise ProjectError(
            f"this project's tokenizer has no [MASK] token (tokenizer.mask_id is null): {why}", hint=hint
        )
    return mask_id


def mask_probe(rack: Rack, caches: list | None, start: int, mask_id: int, batch: int, read: Sequence[int] = ()):
    """Logits (B, V) of a ``[MASK]`` at position ``start`` that sees the positions ``caches`` hold, read after the
    stacks at ``read`` (default: the last). The caches are not extended: the probe leaves no trace."""
    read = list(read) or [len(rack.stacks) - 1]
    device = rack.ends.embed.weight.device
    probe = torch.full((batch, 1), mask_id, dtype=torch.long, device=device)  # (B, 1)
    logits, _ = decode_stacks(rack, probe, start, caches, read)
    return {i: x[:, 0] for i, x in logits.items()}


@torch.inference_mode()
def masked_next_token_logits(
    rack: Rack, tokens: torch.Tensor, mask_id: int, read: Sequence[int] = ()
) -> Iterator[tuple[int, dict[int, torch.Tensor]]]:
    """For p = 1 .. T-1: (p, {rack position: logits (B, V) for token p}), each from a ``[MASK]`` at position p
    seeing tokens 0..p-1 through causal attention, read after the stacks at ``read`` (default: the last).

    tokens (B, T). The scored positions are those of the clm loss (every token but the first)."""
    B, T = tokens.shape
    caches = None
    for p in range(1, T):
        _, caches = decode_stacks(rack, tokens[:, p - 1 : p], p - 1, caches)  # token p-1 joins the prefix
        yield p, mask_probe(rack, caches, p, mask_id, B, read)
