"""FLOPs per token of every training stage, and the parameter shapes they count: one definition, read by the
planner (``bench plan``), by the trainers (train-stack, cache and the fuse fine-tunes record tokens x these in the
manifest) and by ``bench compare`` (docs/memory.md, "FLOPs").

Pure arithmetic on the recipe's shapes, below the trainers and the planner both: torch is never imported.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from stackwise_cli.model.config import AttentionConfig, ModelConfig
from stackwise_cli.recipe import Recipe

LINEAR_CHUNK = 64  # model.attention.LINEAR_CHUNK, repeated here to keep torch out


# ----------------------------------------------------------------------------------------------------------------
# Parameters: every tensor, with the names and shapes model.py gives it


def block_shapes(model: ModelConfig, attn: AttentionConfig) -> dict[str, tuple[int, ...]]:
    """Every parameter of one block, by the name ``Block.named_parameters`` gives it, with its shape."""
    d, H, D, F = model.d_model, model.n_heads, model.head_dim, model.ffn_dim
    s: dict[str, tuple[int, ...]] = {"attn_norm.weight": (d,)}
    if attn.kind == "mla":
        C, R = attn.mla_kv_rank(model), attn.mla_rope_dim(model)
        if attn.q_rank is None:
            s["attn.q.weight"] = (H * (D + R), d)
        else:
            s["attn.q_down.weight"] = (attn.q_rank, d)
            s["attn.q_norm.weight"] = (attn.q_rank,)
            s["attn.q_up.weight"] = (H * (D + R), attn.q_rank)
        s["attn.kv_down.weight"] = (C, d)
        s["attn.kv_norm.weight"] = (C,)
        s["attn.k_rope.weight"] = (R, d)
        s["attn.k_up.weight"] = (H * D, C)
        s["attn.v_up.weight"] = (H * D, C)
        s["attn.o.weight"] = (d, H * D)
    else:
        kv = model.kv_heads * D
        s.update({"attn.q.weight": (H * D, d), "attn.k.weight": (kv, d), "attn.v.weight": (kv, d)})
        s["attn.o.weight"] = (d, H * D)
    s["mlp_norm.weight"] = (d,)
    s.update({"mlp.gate.weight": (F, d), "mlp.up.weight": (F, d), "mlp.down.weight": (d, F)})
    return s


def ends_shapes(model: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every parameter of ``Ends``, by name, with its shape."""
    s = {"embed.weight": (model.vocab_size, model.d_model), "norm.weight": (model.d_model,)}
    if not model.tie_embeddings:
        s["head.weight"] = (model.vocab_size, model.d_model)
    return s


def time_shapes(model: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every parameter of one stack's time network (``model.time_embedding``), by name; none without it."""
    if not model.time_embedding:
        return {}
    d = model.d_model
    return {"time.inp.weight": (d, d), "time.inp.bias": (d,), "time.out.weight": (d, d), "time.out.bias": (d,)}


def numel(shape: tuple[int, ...]) -> int:
    return math.prod(shape)


# ----------------------------------------------------------------------------------------------------------------
# FLOPs per token. The convention: 2 FLOPs per multiply-add of a matmul weight per token forward, twice that
# backward (the input's gradient and the weight's), the weight's half only where the weight trains; attention scores
# and weighted sums as ``attention_flops_forward``, backward twice the forward; activation checkpointing adds one
# forward of every checkpointed block. Not counted: the embedding lookup and its gradient (an index, not a matmul),
# norms, RoPE, softmax, activations, the loss and the optimizer step (elementwise: a few FLOPs per value, not per
# weight).


def attention_context(model: ModelConfig, attn: AttentionConfig, seq_len: int, causal: bool = True) -> float:
    """The mean number of keys a query attends to: T/2 causal, T bidirectional, at most the window."""
    ctx = seq_len / 2 if causal else float(seq_len)
    return ctx if attn.window is None else min(ctx, float(attn.window))


def attention_flops_forward(model: ModelConfig, attn: AttentionConfig, seq_len: int, causal: bool = True) -> float:
    """Forward FLOPs per token of one layer's attention scores and weighted sum (the matmuls are in 2 N):
    2 H (Dqk + Dv) x the mean context (T/2 causal, T bidirectional, at most the window). Linear attention: 4 H D^2
    (state update and read) plus its in-chunk part."""
    H, D = model.n_heads, model.head_dim
    if attn.kind == "linear":
        return 4 * H * D * D + 2 * H * 2 * D * LINEAR_CHUNK / 2
    dqk = D + (attn.mla_rope_dim(model) if attn.kind == "mla" else 0)
    return 2 * H * (dqk + D) * attention_context(model, attn, seq_len, causal)


def matmul_params_per_block(model: ModelConfig, attn: AttentionConfig) -> int:
    """The weights one block multiplies every token by: its attention projections and MLP matrices (biases and
    norm gains are elementwise). Any family: the MLP is gate, up, down (swiglu, geglu) or up, down (gelu)."""
    attention = sum(numel(s) for n, s in block_shapes(model, attn).items() if n.startswith("attn.") and len(s) == 2)
    return attention + (2 if model.mlp_kind == "gelu" else 3) * model.d_model * model.ffn_dim


@dataclass(frozen=True)
class FlopShapes:
    """The per-token terms every stage's FLOPs are made of, for one recipe's shapes at one sequence length."""

    block: int  # matmul weights of one block
    time: int  # matmul weights of one stack's time network (0 without one)
    head: int  # the logits matmul (vocab x d, tied or not), plus an MLM transform's d x d
    attention: float  # one block's attention forward FLOPs per token (``attention_flops_forward``)

    @staticmethod
    def of(recipe: Recipe, seq_len: int | None = None) -> FlopShapes:
        m = recipe.model
        T = seq_len or recipe.data.seq_len
        return FlopShapes(
            block=matmul_params_per_block(m, recipe.attention),
            time=sum(numel(s) for s in time_shapes(m).values() if len(s) == 2),
            head=m.vocab_size * m.d_model + (m.d_model * m.d_model if m.mlm_head else 0),
            attention=attention_flops_forward(m, recipe.attention, T, causal=not recipe.bidirectional),
        )

    def stack(self, blocks: int) -> int:
        """Matmul weights of one stack of ``blocks`` blocks (and its time network)."""
        return blocks * self.block + self.time


def train_stack_flops_per_token(
    f: FlopShapes,
    blocks: int,
    *,
    head_trains: bool,
    checkpointing: bool,
    suffix_blocks: int = 0,
    suffix_stacks: int = 0,
    prefix_blocks: list[int] | tuple[int, ...] = (),
) -> float:
    """train-stack of one stack of ``blocks`` blocks: its forward and backward (6 per weight; checkpointed, one more
    forward), the head (6 per weight when its weight trains, else 4: forward and the gradient to its input), and
    right to left the frozen suffix of ``suffix_blocks`` blocks in ``suffix_stacks`` stacks, always checkpointed:
    forward, recomputed forward and the gradient to its input (6 per weight, no weight gradient). With
    ``train.prefix: recompute``, the frozen prefix's stacks (``prefix_blocks`` blocks each) run a no-grad forward on
    every batch: a cache pass's FLOPs per token (``cache_flops_per_token``)."""
    n = f.stack(blocks)
    total = 6 * n + (2 * n if checkpointing else 0) + blocks * f.attention * (4 if checkpointing else 3)
    total += (6 if head_trains else 4) * f.head
    if suffix_blocks:
        total += 6 * (suffix_blocks * f.block + suffix_stacks * f.time) + 4 * suffix_blocks * f.attention
    return total + (cache_flops_per_token(f, prefix_blocks) if prefix_blocks else 0.0)


def cache_flops_per_token(f: FlopShapes, prefix_blocks: list[int] | tuple[int, ...]) -> float:
    """A cache pass: one no-grad forward through each stack it runs, ``prefix_blocks`` their block counts (from the
    tokens every stack to the left of the cached one; incremental only the left neighbour)."""
    return float(sum(2 * f.stack(b) + b * f.attention for b in prefix_blocks))


def whole_model_flops_per_token(
    f: FlopShapes, blocks: int, stacks: int, *, checkpointing: bool, head_trains: bool = True
) -> float:
    """The whole model trained at once (end to end, a full fine-tune): ``blocks`` blocks in ``stacks`` stacks."""
    n = blocks * f.block + stacks * f.time
    total = 6 * n + (2 * n if checkpointing else 0) + blocks * f.attention * (4 if checkpointing else 3)
    return total + (6 if head_trains else 4) * f.head


def lora_flops_per_token(f: FlopShapes, blocks: int, stacks: int, adapter_params: int, *, checkpointing: bool) -> float:
    """A LoRA or QLoRA fine-tune: the frozen base forward and backward to its input (4 per weight, the head too),
    the adapters' forward and backward (6 per adapter weight); checkpointed, one more forward of both."""
    base = blocks * f.block + stacks * f.time
    total = 4 * (base + f.head) + 6 * adapter_params + (2 * (base + adapter_params) if checkpointing else 0)
    return total + blocks * f.attention * (4 if checkpointing else 3)
