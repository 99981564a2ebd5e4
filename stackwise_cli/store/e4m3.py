"""The project's one e4m3 quantiser: per-row codes and fp32 scales, in plain PyTorch.

It is the format of fp8 cache shards (``store/shards.py`` writes and reads them with it), the quantiser of fp8
training and fp8 frozen weights (``train/fp8.py``, ``train/frozen.py``), and the reference the fp8 cache kernels
are tested against (``kernels/``). It lives in the store, the lowest layer that needs it, so the store never
imports the kernels."""

from __future__ import annotations

import torch

E4M3_MAX = 448.0  # the largest finite float8_e4m3fn value


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
