"""The optimizer and the learning-rate schedule every training run uses (train-stack, end to end, the fuse
fine-tune).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from stackwise_cli.recipe import TrainRecipe
from stackwise_cli.train.defaults import adamw_step


def lr_at(step: int, tr: TrainRecipe, steps: int) -> float:
    """Linear warmup to ``lr``, then cosine decay to ``lr * min_lr_ratio`` at the last step."""
    if step < tr.warmup_steps:
        return tr.lr * (step + 1) / tr.warmup_steps
    progress = (step - tr.warmup_steps) / max(1, steps - tr.warmup_steps)
    floor = tr.lr * tr.min_lr_ratio
    return floor + (tr.lr - floor) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def make_optimizer(params: dict[str, nn.Parameter], tr: TrainRecipe) -> torch.optim.Optimizer:
    """AdamW (``train.optimizer: adamw``, two fp32 states per parameter; on CUDA its fused step, which allocates no
    per-parameter temporaries: ``defaults.adamw_step``) or bitsandbytes' 8-bit AdamW (``adamw8bit``: two 8-bit states
    with blockwise scales, paged to host memory under pressure on CUDA); weight decay on matrices only (norm gains
    and biases are left alone)."""
    decay = [p for p in params.values() if p.ndim >= 2]
    other = [p for p in params.values() if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": tr.weight_decay}, {"params": other, "weight_decay": 0.0}]
    if tr.optimizer == "adamw8bit":
        import bitsandbytes as bnb

        on_cuda = any(p.is_cuda for p in params.values())
        cls = bnb.optim.PagedAdamW8bit if on_cuda else bnb.optim.AdamW8bit
        return cls(groups, lr=tr.lr, betas=tr.betas, eps=1e-8)
    devices = {p.device.type for p in params.values()}
    fused = len(devices) == 1 and adamw_step(devices.pop()) == "fused"
    fused = fused and all(p.is_floating_point() for p in params.values())
    # fused=None (not False) off CUDA: torch's default, the foreach step, exactly as before.
    return torch.optim.AdamW(groups, lr=tr.lr, betas=tr.betas, eps=1e-8, fused=True if fused else None)
