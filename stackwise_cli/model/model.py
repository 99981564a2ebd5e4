"""The whole model in one module: blocks, stacks, the ends, and the rack.

One block definition serves four families (docs/models.md), switched by the resolved fields of ``ModelConfig``:

- llama: pre-norm RMSNorm, rotary embeddings on q and k, SwiGLU MLP, no biases, final norm, LM head.
- gpt2: pre-norm LayerNorm, learned absolute positions, GELU (tanh) MLP, biases everywhere, final norm, tied head.
- bert: post-norm LayerNorm, learned positions + token type 0 + embedding LayerNorm, GELU MLP, biases, no final
  norm; the MLM head is dense + GELU + LayerNorm, then the decoder (tied to the embedding) with an output bias.
- modernbert: pre-norm LayerNorm without bias, RoPE, GeGLU MLP, embedding norm, final norm, and within each stack
  global attention every ``global_every`` blocks, a sliding window of ``local_window`` in the others.

The attention is one of the kinds in ``attention.py`` (grouped-query by default; latent or linear by recipe),
chosen by ``AttentionConfig`` and the same in every block (local blocks add their window to it).

A *stack* is a run of blocks trained as a unit (optionally with a time network, for diffusion objectives); the
*ends* are everything before the first stack (token, position and type embeddings, embedding norm) and after the
last (final norm, MLM transform, head); the *rack* is the ordered list of stacks. ``Rack.forward`` is exactly the
same computation as running the ends and each stack in turn, which is what stack-wise training relies on.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from stackwise_cli.errors import StackwiseError
from stackwise_cli.kernels.ops import add_rmsnorm
from stackwise_cli.model.attention import (  # noqa: F401  (re-exported: the model's pieces, found from here)
    LatentAttention,
    LinearAttention,
    RMSNorm,
    StandardAttention,
    make_attention,
    reference_attention,
    resolve_backend,
)
from stackwise_cli.model.config import TIME_FREQS_MAX_PERIOD, AttentionConfig, ModelConfig
from stackwise_cli.model.rope import rope_tables

INIT_MODES = ("random", "identity")
TIME_SCALE = 1000.0  # t in [0, 1] is spread over [0, 1000] before the sinusoids, as DDPM's integer steps are


def make_norm(cfg: ModelConfig) -> nn.Module:
    """The model's norm: RMSNorm, or LayerNorm (with a bias iff the model has biases); ``ModelConfig`` has
    checked that ``norm`` is one of the two."""
    if cfg.norm_kind == "rms":
        return RMSNorm(cfg.d_model, cfg.norm_eps)
    return nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps, bias=cfg.use_bias)


def is_norm(module: nn.Module) -> bool:
    return isinstance(module, (RMSNorm, nn.LayerNorm))


class MLP(nn.Module):
    """swiglu: down(silu(gate(x)) * up(x)); geglu: down(gelu(gate(x)) * up(x)); gelu: down(gelu(up(x)))."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.kind, self.approximate = cfg.mlp_kind, cfg.gelu_approximate
        if self.kind != "gelu":
            self.gate = nn.Linear(cfg.d_model, cfg.ffn_dim, bias=cfg.use_bias)
        self.up = nn.Linear(cfg.d_model, cfg.ffn_dim, bias=cfg.use_bias)
        self.down = nn.Linear(cfg.ffn_dim, cfg.d_model, bias=cfg.use_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "swiglu":
            return self.down(F.silu(self.gate(x)) * self.up(x))
        if self.kind == "geglu":
            return self.down(F.gelu(self.gate(x), approximate=self.approximate) * self.up(x))
        return self.down(F.gelu(self.up(x), approximate=self.approximate))


class Block(nn.Module):
    """Attention then MLP, each with a residual. Pre-norm: x + f(norm(x)); post-norm (BERT): norm(x + f(x))."""

    def __init__(self, cfg: ModelConfig, attn: AttentionConfig):
        super().__init__()
        self.post_norm = cfg.norm_at == "post"
        self.attn_norm = make_norm(cfg)  # post-norm: applied after the attention residual
        self.attn = make_attention(cfg, attn)
        self.mlp_norm = make_norm(cfg)  # post-norm: applied after the MLP residual
        self.mlp = MLP(cfg)
        # The fused residual-add + RMSNorm kernel computes exactly the pre-norm RMSNorm step.
        self.fusable = cfg.norm_kind == "rms" and not self.post_norm

    def _residual(self, x: torch.Tensor, attend: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """The block around ``attend`` (the attention on a normalised or raw input): shared by forward and decode."""
        if self.post_norm:
            x = self.attn_norm(x + attend(x))
            return self.mlp_norm(x + self.mlp(x))
        a = attend(self.attn_norm(x))
        if self.fusable and resolve_backend(self.attn.backend, self.attn.kind, x.device) == "kernels":
            h, y = add_rmsnorm(x, a, self.mlp_norm.weight, self.mlp_norm.eps)  # one pass: h = x + a, y = norm(h)
            return h + self.mlp(y)
        x = x + a
        return x + self.mlp(self.mlp_norm(x))

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor | None, sin: torch.Tensor | None, causal: bool = True
    ) -> torch.Tensor:
        return self._residual(x, lambda y: self.attn(y, cos, sin, causal))

    def decode(
        self, x: torch.Tensor, cos: torch.Tensor | None, sin: torch.Tensor | None, cache: object | None
    ) -> tuple[torch.Tensor, object]:
        """New positions x (B, n, d) after the cached ones; cos and sin are their n rows (or None). The attention
        modules decode one token at a time, so the n tokens go through them in order; the rest is per position."""

        def attend(y: torch.Tensor) -> torch.Tensor:
            nonlocal cache
            out = []
            for j in range(y.shape[1]):
                cj = None if cos is None else cos[j : j + 1]
                sj = None if sin is None else sin[j : j + 1]
                a, cache = self.attn.decode(y[:, j : j + 1], cj, sj, cache)  # (B, 1, d)
                out.append(a)
            return torch.cat(out, dim=1)  # (B, n, d)

        return self._residual(x, attend), cache

    def output_projections(self) -> list[nn.Linear]:
        """The layers whose zeroing makes a pre-norm block the identity (the residual passes through unchanged).

        Every attention kind ends in one output projection ``o``."""
        return [self.attn.o, self.mlp.down]


class TimeEmbedding(nn.Module):
    """t (B,) in [0, 1] -> (B, d): sinusoidal features -> Linear -> SiLU -> Linear (the last zero at init)."""

    def __init__(self, d_model: int):
        super().__init__()
        self.d_model = d_model
        self.inp = nn.Linear(d_model, d_model)
        self.out = nn.Linear(d_model, d_model)

    def features(self, t: torch.Tensor) -> torch.Tensor:
        half = self.d_model // 2
        freqs = torch.exp(-math.log(TIME_FREQS_MAX_PERIOD) * torch.arange(half, device=t.device) / max(half, 1))
        args = t.float()[:, None] * TIME_SCALE * freqs[None]  # (B, d/2)
        f = torch.cat((args.cos(), args.sin()), dim=-1)  # (B, 2 * (d/2))
        return F.pad(f, (0, self.d_model - 2 * half))  # (B, d): one zero column for odd d

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        f = self.features(t).to(self.inp.weight.dtype)
        return self.out(F.silu(self.inp(f)))  # (B, d)


class Stack(nn.Module):
    """A run of consecutive blocks: the unit that is trained, stored and cached."""

    def __init__(self, cfg: ModelConfig, n_blocks: int, attn: AttentionConfig | None = None):
        super().__init__()
        self.cfg = cfg
        self.attn = attn or AttentionConfig()  # each block's make_attention checks it against cfg
        self.rope_dim = self.attn.rope_dim_for(cfg)  # head_dim, or MLA's decoupled rope dims
        self.blocks = nn.ModuleList(Block(cfg, self.block_attention(i)) for i in range(n_blocks))
        self.time = TimeEmbedding(cfg.d_model) if cfg.time_embedding else None

    def block_attention(self, index: int) -> AttentionConfig:
        """Block ``index``'s attention: the stack's, with the model's local window on the local blocks."""
        if self.cfg.is_global(index):
            return self.attn
        return dataclasses.replace(self.attn, window=self.cfg.local_span)

    def _tables(self, start: int, n: int, device: torch.device):
        """RoPE's cos and sin rows for positions start..start+n-1, (n, rope_dim) each; None, None for learned."""
        if self.cfg.position_kind != "rope":
            return None, None
        return rope_tables(self.cfg, n, device, self.rope_dim, start)

    def _time(self, t: torch.Tensor | None, h: torch.Tensor) -> torch.Tensor | None:
        if self.time is None:
            if t is not None:
                raise StackwiseError("this model has no time embedding; pass t only with model.time_embedding: true")
            return None
        if t is None or t.shape != (h.shape[0],):
            found = None if t is None else tuple(t.shape)
            raise StackwiseError(
                f"model.time_embedding needs t of shape ({h.shape[0]},), one per sequence; got {found}"
            )
        return self.time(t)[:, None, :].to(h.dtype)  # (B, 1, d)

    def forward(self, h: torch.Tensor, causal: bool = True, t: torch.Tensor | None = None) -> torch.Tensor:
        """h (B, T, d_model) -> (B, T, d_model); t (B,) in [0, 1], required iff the model has a time embedding."""
        cos, sin = self._tables(0, h.shape[1], h.device)
        te = self._time(t, h)
        for block in self.blocks:
            if te is not None:
                h = h + te  # the time signal enters every block
            h = block(h, cos, sin, causal)
        return h

    def decode(self, h: torch.Tensor, start: int, caches: list | None = None) -> tuple[torch.Tensor, list]:
        """Causal incremental forward: new positions h (B, n, d) at start..start+n-1, after the positions the
        per-block ``caches`` hold (None = none yet, start = 0). Returns the output (B, n, d) = those positions of
        ``forward(full, causal=True)``, and the caches extended by them."""
        if self.time is not None:
            raise StackwiseError("decode is causal generation; a stack with a time embedding is not autoregressive")
        caches = list(caches) if caches is not None else [None] * len(self.blocks)
        if len(caches) != len(self.blocks):
            raise StackwiseError(f"decode got {len(caches)} caches for a stack of {len(self.blocks)} blocks")
        cos, sin = self._tables(start, h.shape[1], h.device)
        for i, block in enumerate(self.blocks):
            h, caches[i] = block.decode(h, cos, sin, caches[i])
        return h, caches

    def init_weights(self, mode: str, total_blocks: int, generator: torch.Generator | None = None) -> None:
        """``random``: N(0, init_std), with output projections scaled by 1/sqrt(2 * total_blocks) as in GPT-2 so
        the residual stream does not grow with depth; biases 0; every norm (MLA's included) weight 1, bias 0.
        ``identity``: as random, then output projections zeroed so every block passes its input through
        unchanged (function-preserving growth); pre-norm only. The time network's last layer always starts at 0."""
        if mode not in INIT_MODES:
            raise StackwiseError(f"init must be one of {', '.join(INIT_MODES)}; got {mode!r}")
        if mode == "identity" and self.cfg.norm_at == "post":
            raise StackwiseError(
                "init 'identity' needs pre-norm blocks: a post-norm block (BERT) normalises its output, so no "
                "weights make it the identity",
                hint="use init random (rack.init: random, or grow --init random)",
            )
        std = self.cfg.init_std
        for block in self.blocks:
            norm_params = {id(p) for m in block.modules() if is_norm(m) for p in m.parameters()}
            for name, p in block.named_parameters():
                if id(p) in norm_params:
                    nn.init.ones_(p) if name.endswith("weight") else nn.init.zeros_(p)
                elif name.endswith("bias"):
                    nn.init.zeros_(p)
                else:
                    nn.init.normal_(p, 0.0, std, generator=generator)
            for lin in block.output_projections():
                if mode == "identity":
                    nn.init.zeros_(lin.weight)
                else:
                    nn.init.normal_(lin.weight, 0.0, std / math.sqrt(2 * total_blocks), generator=generator)
        if self.time is not None:
            nn.init.normal_(self.time.inp.weight, 0.0, std, generator=generator)
            nn.init.zeros_(self.time.inp.bias)
            nn.init.zeros_(self.time.out.weight)  # zero: a new stack starts as if it had no time input
            nn.init.zeros_(self.time.out.bias)


class Ends(nn.Module):
    """Input side: token embedding (+ learned positions) (+ token type 0) (+ embedding norm). Output side: final
    norm (+ BERT's MLM transform) and the head (the token embedding itself when tied) (+ BERT's output bias)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        d = cfg.d_model
        self.embed = nn.Embedding(cfg.vocab_size, d)
        self.pos = nn.Embedding(cfg.max_seq_len, d) if cfg.position_kind == "learned" else None
        self.types = nn.Embedding(cfg.type_vocab, d) if cfg.type_vocab else None
        self.embed_norm = make_norm(cfg) if cfg.embed_norm else None
        self.norm = make_norm(cfg) if cfg.final_norm else None
        self.mlm_dense = nn.Linear(d, d, bias=cfg.use_bias) if cfg.mlm_head else None
        self.mlm_norm = make_norm(cfg) if cfg.mlm_head else None
        self.head = None if cfg.tie_embeddings else nn.Linear(d, cfg.vocab_size, bias=False)
        self.out_bias = nn.Parameter(torch.zeros(cfg.vocab_size)) if cfg.mlm_head else None

    def _input_modules(self) -> list[nn.Module]:
        return [m for m in (self.embed, self.pos, self.types, self.embed_norm) if m is not None]

    def init_weights(self, generator: torch.Generator | None = None) -> None:
        std = self.cfg.init_std
        for emb in (self.embed, self.pos, self.types):
            if emb is not None:
                nn.init.normal_(emb.weight, 0.0, std, generator=generator)
        for m in self.modules():
            if is_norm(m):
                nn.init.ones_(m.weight)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)
        if self.mlm_dense is not None:
            nn.init.normal_(self.mlm_dense.weight, 0.0, std, generator=generator)
            if self.mlm_dense.bias is not None:
                nn.init.zeros_(self.mlm_dense.bias)
        if self.head is not None:
            nn.init.normal_(self.head.weight, 0.0, std, generator=generator)
        if self.out_bias is not None:
            nn.init.zeros_(self.out_bias)

    def input_parameters(self) -> list[nn.Parameter]:
        """Every parameter ``embed_tokens`` uses: hidden-state caches are keyed on their digest."""
        return [p for m in self._input_modules() for p in m.parameters()]

    def output_parameters(self) -> list[nn.Parameter]:
        """Every other parameter: the final norm, the MLM transform, the head and the output bias (with tied
        embeddings the head *is* the embedding, an input parameter)."""
        return list(self.named_output_parameters().values())

    def named_input_parameters(self) -> dict[str, nn.Parameter]:
        """``input_parameters()`` by name."""
        inputs = {id(p) for p in self.input_parameters()}
        return {n: p for n, p in self.named_parameters() if id(p) in inputs}

    def named_output_parameters(self) -> dict[str, nn.Parameter]:
        """``output_parameters()`` by name."""
        inputs = {id(p) for p in self.input_parameters()}
        return {n: p for n, p in self.named_parameters() if id(p) not in inputs}

    def embed_tokens(self, tokens: torch.Tensor, start: int = 0) -> torch.Tensor:
        """tokens (B, T) at positions start..start+T-1 -> (B, T, d_model): everything before the first stack."""
        h = self.embed(tokens)  # (B, T, d)
        if self.types is not None:
            h = h + self.types.weight[0]  # token type 0 everywhere
        if self.pos is not None:
            end = start + tokens.shape[1]
            if end > self.cfg.max_seq_len:
                raise StackwiseError(
                    f"positions up to {end} do not fit the learned position table of model.max_seq_len "
                    f"{self.cfg.max_seq_len}"
                )
            h = h + self.pos.weight[start:end]  # (T, d), broadcast over the batch
        if self.embed_norm is not None:
            h = self.embed_norm(h)
        return h

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """h (B, T, d_model) -> (B, T, vocab): everything after the last stack."""
        if self.norm is not None:
            h = self.norm(h)
        if self.mlm_dense is not None:
            h = self.mlm_norm(F.gelu(self.mlm_dense(h), approximate=self.cfg.gelu_approximate))
        weight = self.embed.weight if self.head is None else self.head.weight
        return F.linear(h, weight, self.out_bias)  # (B, T, vocab)


class Rack(nn.Module):
    """Ends plus the stacks in order (left = input side). ``ids`` are the stable ids of the manifest."""

    def __init__(self, cfg: ModelConfig, ends: Ends, stacks: list[Stack], ids: list[int]):
        super().__init__()
        assert len(stacks) == len(ids)
        self.cfg = cfg
        self.ends = ends
        self.stacks = nn.ModuleList(stacks)
        self.ids = list(ids)

    def hidden_states(
        self, tokens: torch.Tensor, causal: bool = True, t: torch.Tensor | None = None
    ) -> list[torch.Tensor]:
        """The hidden state entering the first stack, then after each stack: len(stacks) + 1 tensors."""
        h = self.ends.embed_tokens(tokens)
        out = [h]
        for stack in self.stacks:
            h = stack(h, causal, t)
            out.append(h)
        return out

    def forward(self, tokens: torch.Tensor, causal: bool = True, t: torch.Tensor | None = None) -> torch.Tensor:
        h = self.ends.embed_tokens(tokens)
        for stack in self.stacks:
            h = stack(h, causal, t)
        return self.ends.logits(h)

    def decode(self, tokens: torch.Tensor, start: int, caches: list | None = None) -> tuple[torch.Tensor, list]:
        """Logits (B, n, vocab) of new tokens (B, n) at positions start..start+n-1 given each stack's caches from
        earlier calls (None = none yet); returns them with the updated caches (one list per stack)."""
        caches = list(caches) if caches is not None else [None] * len(self.stacks)
        h = self.ends.embed_tokens(tokens, start)
        for i, stack in enumerate(self.stacks):
            h, caches[i] = stack.decode(h, start, caches[i])
        return self.ends.logits(h), caches


def causal_lm_loss(logits: torch.Tensor, tokens: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Next-token cross-entropy: position t predicts token t+1; the last position has no target."""
    return F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]).float(), tokens[:, 1:].reshape(-1), reduction=reduction
    )
