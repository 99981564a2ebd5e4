"""Rotary position embeddings (RoPE): the cos/sin tables and the rotation. The model's attention applies them,
and the rotary kernel's torch reference is this same rotation (``kernels/reference.py``), so it lives below both."""

from __future__ import annotations

import torch

from stackwise_cli.model.config import ModelConfig


def rope_tables(
    cfg: ModelConfig, seq_len: int, device: torch.device | None = None, dim: int | None = None, start: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin, each (T, dim), for positions start..start+T-1, in the "rotate half" layout (frequencies
    repeated for both halves).

    ``dim`` is the number of rotated dims per head: ``head_dim`` (the default) or MLA's decoupled ``rope_dim``.
    """
    dim = dim or cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, device=device, dtype=torch.float32) / dim))
    t = torch.arange(start, start + seq_len, device=device, dtype=torch.float32)
    freqs = torch.outer(t, inv_freq)  # (T, dim/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (T, dim)
    return emb.cos(), emb.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (i, i + D/2) of x (..., T, D) by the angle of each position; cos and sin are (T, D)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos.to(x.dtype) + rotated * sin.to(x.dtype)
