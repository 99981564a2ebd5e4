"""Plain-PyTorch references for every kernel in ``kernels/``: the ground truth the kernels are tested against,
and what runs on every device where the kernels cannot (CPU, or CUDA without the extension). The fp8 cache
kernels' reference is the store's own e4m3 codec (``store/e4m3.py``), which writes and reads fp8 cache shards."""

from __future__ import annotations

import torch

from stackwise_cli.model.rope import apply_rope


def add_rmsnorm_reference(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(h, y) with h = x + residual and y = RMSNorm(h) exactly as ``model.attention.RMSNorm`` computes it
    (normalise in fp32, cast back to h's dtype, then scale), returned in h's dtype as the kernel writes it."""
    h = x + residual  # (..., D)
    hf = h.float()
    n = (hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + eps)).to(h.dtype)
    return h, (weight * n).to(h.dtype)


def rotary_reference(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE on q (..., T, D) and k (..., T, D) with tables (T, D): ``model.rope.apply_rope`` on each."""
    return apply_rope(q, cos, sin), apply_rope(k, cos, sin)


def rotary_backward_reference(
    gq: torch.Tensor, gk: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The gradient of :func:`rotary_reference`: the rotation by -angle, i.e. ``apply_rope`` with -sin."""
    return apply_rope(gq, cos, -sin), apply_rope(gk, cos, -sin)
