"""One training stage (train/stage.py) built on random data, as train-stack builds it on a project: the same
trainable set, the same frozen prefix and suffix in the same storage, the same objective and the same loss
(train/stack.py's ``trainable_params`` and ``stage_loss``). ``bench memory`` measures its peak, ``bench step`` its
step time."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from stackwise_cli.model.model import Ends, Stack
from stackwise_cli.objectives import objective_for, objective_kind, planned_ratio
from stackwise_cli.recipe import Recipe
from stackwise_cli.train.data import Batch
from stackwise_cli.train.stack import stage_loss, trainable_params
from stackwise_cli.train.stage import Stage


@dataclass
class Case:
    stage: Stage
    stacks: list[Stack]  # the trained ones
    ends: Ends
    trainable: dict[str, nn.Parameter]
    loss: Callable[[], torch.Tensor]  # the stage's loss on one fixed random batch
    frozen: list[nn.Module] = field(default_factory=list)  # the prefix and suffix, in train.frozen_dtype
    buffers: list[torch.Tensor] = field(default_factory=list)  # what the stage reads beside the tokens (a cache)


def random_case(recipe: Recipe, stage: Stage, precision: str, dev: torch.device, batch_size: int | None = None) -> Case:
    """``stage`` of ``recipe`` on the device with random weights and one random batch of ``batch_size`` sequences
    (default train.batch_size), its trainable parameters marked, ready for optimizer steps."""
    from stackwise_cli.train.frozen import checkpoint_blocks, freeze
    from stackwise_cli.train.transforms import Context, Modules, apply_transforms

    cfg, tr = recipe.model, recipe.train
    depth = recipe.rack.blocks_per_stack * recipe.rack.stacks
    gen = torch.Generator().manual_seed(tr.seed)
    torch.manual_seed(tr.seed)

    def new_stack(blocks: int) -> Stack:
        s = Stack(cfg, blocks, recipe.attention)
        s.init_weights("random", depth, gen)
        return s.to(dev)

    ends = Ends(cfg)
    ends.init_weights(gen)
    ends = ends.to(dev)
    stacks = [new_stack(k) for k in stage.blocks]
    # frozen unless trainable below, fp8 and checkpointing as the stage says: train-stack's transforms
    ctx = Context(device=dev, precision=precision, checkpointing=stage.checkpointing)
    apply_transforms(Modules({str(i): s for i, s in enumerate(stacks)}, ends), ctx)
    prefix = [freeze(new_stack(k), stage.frozen_dtype).to(dev) for k in stage.prefix]
    suffix = [freeze(new_stack(k), stage.frozen_dtype).to(dev) for k in stage.suffix]
    if stage.suffix_checkpointing:
        for s in suffix:
            checkpoint_blocks(s)
    mask_id = cfg.vocab_size - 1 if objective_kind(recipe.objective).needs_mask_token else None
    obj = objective_for(recipe, mask_id, cfg.vocab_size, planned_ratio(recipe, stage.position or 0))
    B, T = batch_size or tr.batch_size, recipe.data.seq_len
    tokens = torch.randint(0, cfg.vocab_size, (B, T), generator=gen).to(dev)
    hidden = torch.randn(B, T, cfg.d_model, generator=gen).to(dev) if stage.source == "cache" else None
    batch = Batch(tokens, hidden, np.arange(B, dtype=np.int64), np.zeros(B, dtype=np.int64))
    keys = ["stack"] if len(stacks) == 1 and not stage.end_to_end else [f"stack{i}" for i in range(len(stacks))]
    modules: dict[str, nn.Module] = {"ends": ends} | dict(zip(keys, stacks))
    trainable = trainable_params(stage, modules)
    for p in trainable.values():
        p.requires_grad_(True)
    loss_fn = stage_loss(stage, obj, stacks, ends, prefix, suffix)
    return Case(
        stage, stacks, ends, trainable, lambda: loss_fn(batch), [*prefix, *suffix], [] if hidden is None else [hidden]
    )
