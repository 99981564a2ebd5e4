"""The whole model in one module: blocks, stacks, the ends, and the rack.

A LLaMA-shaped decoder: pre-norm RMSNorm, rotary embeddings on q and k, attention, SwiGLU MLP, no biases.
The attention is one of the kinds in ``attention.py`` (grouped-query by default; latent or linear by recipe),
chosen by ``AttentionConfig`` and the same in every block.

A *stack* is a run of blocks trained as a unit; the *ends* are the token embedding, the final
norm and the LM head; the *rack* is the ordered list of stacks. ``Rack.forward`` is exactly the same
computation as running the ends and each stack in turn, which is what stack-wise training relies on.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from stackwise_cli.model.attention import (  # noqa: F401  (re-exported: the model's pieces, found from here)
    LatentAttention,
    LinearAttention,
    RMSNorm,
    StandardAttention,
    apply_rope,
    make_attention,
    reference_attention,
    resolve_backend,
    rope_tables,
)
from stackwise_cli.model.config import AttentionConfig, ModelConfig


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate = nn.Linear(cfg.d_model, cfg.ffn_dim, bias=False)
        self.up = nn.Linear(cfg.d_model, cfg.ffn_dim, bias=False)
        self.down = nn.Linear(cfg.ffn_dim, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, attn: AttentionConfig):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = make_attention(cfg, attn)
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, causal: bool = True) -> torch.Tensor:
        a = self.attn(self.attn_norm(x), cos, sin, causal)
        if resolve_backend(self.attn.backend, self.attn.kind, x.device) == "kernels":
            from stackwise_cli.kernels.ops import add_rmsnorm

            h, y = add_rmsnorm(x, a, self.mlp_norm.weight, self.mlp_norm.eps)  # one pass: h = x + a, y = norm(h)
            return h + self.mlp(y)
        x = x + a
        return x + self.mlp(self.mlp_norm(x))

    def output_projections(self) -> list[nn.Linear]:
        """The layers whose zeroing makes the block the identity (the residual passes through unchanged).

        Every attention kind ends in one output projection ``o``."""
        return [self.attn.o, self.mlp.down]


class Stack(nn.Module):
    """A run of consecutive blocks: the unit that is trained, stored and cached."""

    def __init__(self, cfg: ModelConfig, n_blocks: int, attn: AttentionConfig | None = None):
        super().__init__()
        self.cfg = cfg
        self.attn = attn or AttentionConfig()
        self.rope_dim = self.attn.rope_dim_for(cfg)  # head_dim, or MLA's decoupled rope dims
        self.blocks = nn.ModuleList(Block(cfg, self.attn) for _ in range(n_blocks))

    def forward(self, h: torch.Tensor, causal: bool = True) -> torch.Tensor:
        """h (B, T, d_model) -> (B, T, d_model)."""
        cos, sin = rope_tables(self.cfg, h.shape[1], h.device, self.rope_dim)
        for block in self.blocks:
            h = block(h, cos, sin, causal)
        return h

    def init_weights(self, mode: str, total_blocks: int, generator: torch.Generator | None = None) -> None:
        """``random``: N(0, init_std), with output projections scaled by 1/sqrt(2 * total_blocks) as in GPT-2 so
        the residual stream does not grow with depth; every norm weight (MLA's included) starts at 1.
        ``identity``: as random, then output projections zeroed so every block passes its input through
        unchanged (function-preserving growth)."""
        std = self.cfg.init_std
        for block in self.blocks:
            for name, p in block.named_parameters():
                if name.endswith("norm.weight"):
                    nn.init.ones_(p)
                else:
                    nn.init.normal_(p, 0.0, std, generator=generator)
            for lin in block.output_projections():
                if mode == "identity":
                    nn.init.zeros_(lin.weight)
                else:
                    nn.init.normal_(lin.weight, 0.0, std / math.sqrt(2 * total_blocks), generator=generator)


class Ends(nn.Module):
    """Token embedding (input side), final norm and LM head (output side)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.head = None if cfg.tie_embeddings else nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)

    def init_weights(self, generator: torch.Generator | None = None) -> None:
        nn.init.normal_(self.embed.weight, 0.0, self.cfg.init_std, generator=generator)
        nn.init.ones_(self.norm.weight)
        if self.head is not None:
            nn.init.normal_(self.head.weight, 0.0, self.cfg.init_std, generator=generator)

    def input_parameters(self) -> list[nn.Parameter]:
        return [self.embed.weight]

    def output_parameters(self) -> list[nn.Parameter]:
        """The final norm and the head (with tied embeddings the head *is* the embedding)."""
        return [self.norm.weight] + ([self.head.weight] if self.head is not None else [])

    def embed_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.embed(tokens)  # (B, T) -> (B, T, d_model)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        h = self.norm(h)
        weight = self.embed.weight if self.head is None else self.head.weight
        return F.linear(h, weight)  # (B, T, vocab)


class Rack(nn.Module):
    """Ends plus the stacks in order (left = input side). ``ids`` are the stable ids of the manifest."""

    def __init__(self, cfg: ModelConfig, ends: Ends, stacks: list[Stack], ids: list[int]):
        super().__init__()
        assert len(stacks) == len(ids)
        self.cfg = cfg
        self.ends = ends
        self.stacks = nn.ModuleList(stacks)
        self.ids = list(ids)

    def hidden_states(self, tokens: torch.Tensor, causal: bool = True) -> list[torch.Tensor]:
        """The hidden state entering the first stack, then after each stack: len(stacks) + 1 tensors."""
        h = self.ends.embed_tokens(tokens)
        out = [h]
        for stack in self.stacks:
            h = stack(h, causal)
            out.append(h)
        return out

    def forward(self, tokens: torch.Tensor, causal: bool = True) -> torch.Tensor:
        h = self.ends.embed_tokens(tokens)
        for stack in self.stacks:
            h = stack(h, causal)
        return self.ends.logits(h)


def causal_lm_loss(logits: torch.Tensor, tokens: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Next-token cross-entropy: position t predicts token t+1; the last position has no target."""
    return F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]).float(), tokens[:, 1:].reshape(-1), reduction=reduction
    )
