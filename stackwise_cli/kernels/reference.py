"""Plain-PyTorch references for every kernel in ``kernels/``: the ground truth the kernels are tested against,
and what runs on every device where the kernels cannot (CPU, or CUDA without the extension)."""

from __future__ import annotations

import torch

from stackwise_cli.model.rope import apply_rope

E4M3_MAX = 448.0  # the largest finite float8_e4m3fn value


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


def fp8_quantize_reference(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row (per-token) e4m3 quantisation of x (..., D): (codes uint8 (..., D) holding the e4m3 bits,
    scales fp32 (...)) with scale = amax(|row|) / 448, and scale 1 for an all-zero row (its codes are 0).

    Rounding is torch's ``float8_e4m3fn`` cast (round to nearest even); x / scale never exceeds 448 by more
    than fp32 rounding, which rounds to 448, so no code saturates or becomes NaN.
    """
    xf = x.float()
    amax = xf.abs().amax(-1)  # (...)
    scales = torch.where(amax > 0, amax / E4M3_MAX, torch.ones_like(amax))
    codes = (xf / scales.unsqueeze(-1)).to(torch.float8_e4m3fn).view(torch.uint8)  # (..., D)
    return codes, scales


def fp8_dequantize_reference(
    codes: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.bfloat16
) -> torch.Tensor:
    """The values that :func:`fp8_quantize_reference` encoded, in ``dtype`` (fp32 or bf16)."""
    return (codes.view(torch.float8_e4m3fn).float() * scales.unsqueeze(-1)).to(dtype)
