"""The model's frozen config. Kept free of torch so recipes validate (and ``--help`` answers) instantly."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from stackwise_cli.schema import check

Family = Literal["llama"]
AttentionKind = Literal["mha", "gqa", "mqa", "mla", "linear"]
Backend = Literal["auto", "reference", "sdpa", "xformers", "kernels"]
FeatureMap = Literal["elu"]


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """Shape of every block and of the ends. Stacks differ only in how many blocks they hold."""

    family: Family = "llama"
    vocab_size: int = 4096
    d_model: int = 128
    n_heads: int = 4
    n_kv_heads: int | None = None  # None = n_heads (plain MHA); fewer = grouped-query attention
    d_ff: int | None = None  # None = the LLaMA rule: 8/3 * d_model rounded up to a multiple of 64
    max_seq_len: int = 256
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    tie_embeddings: bool = False
    init_std: float = 0.02

    # derived, computed once
    head_dim: int = field(init=False, repr=False)
    kv_heads: int = field(init=False, repr=False)
    ffn_dim: int = field(init=False, repr=False)

    def __post_init__(self) -> None:
        check(self)
        object.__setattr__(self, "head_dim", self.d_model // self.n_heads)
        object.__setattr__(self, "kv_heads", self.n_kv_heads or self.n_heads)
        ffn = self.d_ff or 64 * -(-(8 * self.d_model // 3) // 64)
        object.__setattr__(self, "ffn_dim", ffn)

    def problems(self) -> list[tuple[str, str]]:
        out = []
        for name in ("vocab_size", "d_model", "n_heads", "max_seq_len"):
            if getattr(self, name) < 1:
                out.append((name, f"must be >= 1, got {getattr(self, name)}"))
        if out:
            return out
        if self.d_model % self.n_heads:
            out.append(("n_heads", f"must divide d_model ({self.d_model}), got {self.n_heads}"))
        elif (self.d_model // self.n_heads) % 2:
            out.append(
                ("n_heads", f"d_model / n_heads must be even for rotary embeddings, got {self.d_model // self.n_heads}")
            )
        if self.n_kv_heads is not None and (self.n_kv_heads < 1 or self.n_heads % self.n_kv_heads):
            out.append(("n_kv_heads", f"must divide n_heads ({self.n_heads}), got {self.n_kv_heads}"))
        if self.d_ff is not None and self.d_ff < 1:
            out.append(("d_ff", f"must be >= 1, got {self.d_ff}"))
        if self.norm_eps <= 0:
            out.append(("norm_eps", f"must be > 0, got {self.norm_eps}"))
        if self.init_std <= 0:
            out.append(("init_std", f"must be > 0, got {self.init_std}"))
        return out

    def block_params(self, attn: AttentionConfig | None = None) -> int:
        """Parameters in one block with attention ``attn`` (default: ``AttentionConfig()``, plain GQA)."""
        attn = attn or AttentionConfig()
        mlp = 3 * self.d_model * self.ffn_dim
        return attn.params(self) + mlp + 2 * self.d_model

    def ends_params(self) -> int:
        """Parameters in the embedding, final norm and head."""
        head = 0 if self.tie_embeddings else self.vocab_size * self.d_model
        return self.vocab_size * self.d_model + self.d_model + head


@dataclass(frozen=True, kw_only=True)
class AttentionConfig:
    """Which attention every block uses, and how it is computed (the recipe's ``attention:`` section).

    The head counts stay in ``ModelConfig``: ``kind`` names the variant and is checked against them
    (``mqa`` requires ``model.n_kv_heads: 1``, ``mha`` requires it unset or equal to ``n_heads``), so that
    ``ModelConfig.kv_heads`` is the one truth for the parameter count, the KV cache and the Hugging Face export.
    See docs/attention.md for each kind's shapes and costs.
    """

    kind: AttentionKind = "gqa"  # gqa takes any n_kv_heads dividing n_heads (mha and mqa are its two ends)
    backend: Backend = "auto"  # auto = the fastest available for the device and kind; reference = fp32 truth
    window: int | None = None  # sliding window: i attends to j with i - window < j <= i (causal); None = all
    kv_rank: int | None = None  # mla: rank of the shared KV latent; None = d_model // 4
    q_rank: int | None = None  # mla: rank of the query compression; None = full-rank queries
    rope_dim: int | None = None  # mla: dims of the decoupled RoPE part of q and k; None = head_dim // 2 (even)
    feature_map: FeatureMap = "elu"  # linear: the positive feature map, elu(x) + 1

    def __post_init__(self) -> None:
        check(self)

    def problems(self) -> list[tuple[str, str]]:
        out = []
        if self.window is not None and self.window < 1:
            out.append(("window", f"must be >= 1 or null, got {self.window}"))
        for name in ("kv_rank", "q_rank", "rope_dim"):
            value = getattr(self, name)
            if value is not None and value < 1:
                out.append((name, f"must be >= 1 or null, got {value}"))
            elif value is not None and self.kind != "mla":
                out.append((name, f"only applies to kind 'mla', got kind {self.kind!r}"))
        if self.rope_dim is not None and self.rope_dim % 2:
            out.append(("rope_dim", f"must be even (RoPE rotates pairs), got {self.rope_dim}"))
        if self.kind == "linear":
            if self.window is not None:
                out.append(("window", "kind 'linear' has no sliding window; use kind 'gqa' or 'mla' with a window"))
            if self.backend in ("sdpa", "xformers"):
                out.append(
                    (
                        "backend",
                        f"kind 'linear' has only its own O(T) implementation: use 'auto' or 'reference', "
                        f"got {self.backend!r}",
                    )
                )
        return out

    def model_problems(self, model: ModelConfig) -> list[tuple[str, str]]:
        """Checks that need the model's shape, as (key path from the recipe root, message)."""
        out = []
        if self.kind == "mha" and model.kv_heads != model.n_heads:
            out.append(
                (
                    "model.n_kv_heads",
                    f"must be null or {model.n_heads} with attention.kind 'mha', "
                    f"got {model.n_kv_heads} (use kind 'gqa')",
                )
            )
        if self.kind == "mqa" and model.n_kv_heads != 1:
            out.append(("model.n_kv_heads", f"must be 1 with attention.kind 'mqa', got {model.n_kv_heads}"))
        if self.kind == "mla":
            if self.mla_kv_rank(model) < 1:
                out.append(("attention.kv_rank", f"must be >= 1; the default d_model // 4 is 0 for {model.d_model}"))
            if self.mla_rope_dim(model) > model.head_dim:
                out.append(("attention.rope_dim", f"must be <= head_dim ({model.head_dim}), got {self.rope_dim}"))
        return out

    def mla_kv_rank(self, model: ModelConfig) -> int:
        return self.kv_rank if self.kv_rank is not None else model.d_model // 4

    def mla_rope_dim(self, model: ModelConfig) -> int:
        # head_dim // 2 rounded down to even, at least 2 (head_dim itself is even).
        return self.rope_dim if self.rope_dim is not None else max(2, model.head_dim // 4 * 2)

    def rope_dim_for(self, model: ModelConfig) -> int:
        """Dims of each head that RoPE rotates: the decoupled part for mla, the whole head otherwise."""
        return self.mla_rope_dim(model) if self.kind == "mla" else model.head_dim

    def params(self, model: ModelConfig) -> int:
        """Parameters of one attention layer (what ``ModelConfig.block_params`` counts)."""
        d, H, D = model.d_model, model.n_heads, model.head_dim
        if self.kind != "mla":  # q, k, v, o; linear attention has the same weights as standard attention
            return d * D * (2 * H + 2 * model.kv_heads)
        C, R = self.mla_kv_rank(model), self.mla_rope_dim(model)
        q = d * H * (D + R) if self.q_rank is None else d * self.q_rank + self.q_rank + self.q_rank * H * (D + R)
        kv = d * C + C + d * R + 2 * C * H * D  # kv_down, kv_norm, k_rope, k_up and v_up
        return q + kv + H * D * d
