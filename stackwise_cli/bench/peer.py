"""The independent peer of a comparison, and the one evaluator every arm is scored with.

The peer is the recipe's model shape as a Hugging Face ``transformers`` model (``LlamaForCausalLM``, config from
``model/hf.hf_config``), trained by a plain torch loop that shares no code with stackwise's trainer: AdamW with the
recipe's lr, betas and weight decay (matrices only), linear warmup then cosine decay to ``lr * min_lr_ratio``, the
recipe's batch size, grad accumulation and gradient clipping, on random windows of the train token stream. It shows
how stackwise's own end-to-end baseline compares with an ordinary training loop of the same model.

The evaluator is Hugging Face's forward too: the mean next-token cross-entropy over the first N val sequences,
every position but the first, for any folder ``AutoModelForCausalLM`` loads (an arm's ``fused/``, the peer).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from stackwise_cli.model.hf import hf_config
from stackwise_cli.recipe import Recipe, TrainRecipe


def peer_model(recipe: Recipe, eos_id: int, pad_id: int | None, seed: int) -> torch.nn.Module:
    """A freshly initialised ``transformers`` causal LM of the recipe's whole planned shape (every stack's blocks)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    n_layers = recipe.rack.stacks * recipe.rack.blocks_per_stack
    cfg = hf_config(recipe.model, n_layers, eos_id, pad_id)
    cfg.pop("architectures")
    config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    torch.manual_seed(seed)  # HF initialises from the global generator: normal(0, initializer_range)
    return AutoModelForCausalLM.from_config(config).float()


def warm_up(device: torch.device) -> None:
    """Two training steps of a tiny model: the first use of torch's kernels, thread pools and optimizer, so
    that what they set up once is not counted as a measured stage's memory."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=16,
    )  # fmt: skip
    model = LlamaForCausalLM(cfg).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.zeros(2, 16, dtype=torch.long, device=device)
    for _ in range(2):
        model(input_ids=x, labels=x).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)


def lr_at(step: int, tr: TrainRecipe, steps: int) -> float:
    """Linear warmup over ``warmup_steps``, then cosine from ``lr`` to ``lr * min_lr_ratio`` at the last step."""
    if step < tr.warmup_steps:
        return tr.lr * (step + 1) / tr.warmup_steps
    progress = min((step - tr.warmup_steps) / max(1, steps - tr.warmup_steps), 1.0)
    floor = tr.lr * tr.min_lr_ratio
    return floor + (tr.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))


@torch.inference_mode()
def next_token_loss(model: torch.nn.Module, tokens: np.ndarray, batch_size: int, device: torch.device) -> float:
    """Mean next-token cross-entropy (nats) of ``model`` on ``tokens`` (N, T): positions 1..T-1 of every row."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for lo in range(0, len(tokens), batch_size):
        x = torch.from_numpy(tokens[lo : lo + batch_size].astype(np.int64)).to(device)  # (B, T)
        logits = model(input_ids=x).logits.float()  # (B, T, V)
        total += float(
            F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="sum")
        )
        count += x[:, 1:].numel()
    model.train(was_training)
    return total / max(count, 1)


def score_folder(folder: Path, tokens: np.ndarray, batch_size: int, device: torch.device) -> float:
    """The evaluator on a Hugging Face folder (``fused/``, the peer's ``model/``), loaded in fp32."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # stderr is the command's progress; the load bar is noise there
    model = AutoModelForCausalLM.from_pretrained(folder).float().to(device)
    return next_token_loss(model, tokens, batch_size, device)


@dataclass
class PeerRun:
    steps: int
    tokens: int  # trained on
    losses: list[float] = field(default_factory=list)  # training loss of every step
    points: list[tuple[int, float]] = field(default_factory=list)  # (step, val loss) at the eval steps


def train_peer(
    model: torch.nn.Module,
    stream: np.ndarray,
    tr: TrainRecipe,
    seq_len: int,
    steps: int,
    device: torch.device,
    eval_at: set[int] = frozenset(),
    evaluate: Callable[[torch.nn.Module], float] | None = None,
) -> PeerRun:
    """Train ``model`` for ``steps`` optimizer steps on random ``seq_len`` windows of the 1-D token ``stream``
    (seeded by ``train.seed``: the same windows every run), scoring it with ``evaluate`` after each step in
    ``eval_at``."""
    if len(stream) < seq_len:
        raise ValueError(f"the train stream has {len(stream)} tokens, fewer than one window of {seq_len}")
    model.to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    # Weight decay on matrices only, as is usual (norm gains are left alone).
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": tr.weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    opt = torch.optim.AdamW(groups, lr=tr.lr, betas=tr.betas, eps=1e-8)
    rng = np.random.default_rng(tr.seed)
    stream_t = torch.from_numpy(np.asarray(stream, dtype=np.int64))
    run = PeerRun(steps=steps, tokens=0)
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, tr, steps)
        loss_sum = 0.0
        for _ in range(tr.grad_accum):
            starts = torch.from_numpy(rng.integers(0, len(stream) - seq_len + 1, size=tr.batch_size))
            x = stream_t[starts[:, None] + torch.arange(seq_len)].to(device)  # (B, T)
            logits = model(input_ids=x).logits  # (B, T, V)
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), x[:, 1:].reshape(-1))
            (loss / tr.grad_accum).backward()
            loss_sum += float(loss.detach())
            run.tokens += x.numel()
        if tr.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, tr.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        run.losses.append(loss_sum / tr.grad_accum)
        if evaluate is not None and step + 1 in eval_at:
            run.points.append((step + 1, evaluate(model)))
    return run
