"""The model's frozen config. Kept free of torch so recipes validate (and ``--help`` answers) instantly."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from stackwise_cli.schema import check

Family = Literal["llama"]
Backend = Literal["auto", "reference", "sdpa"]


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

    def block_params(self) -> int:
        """Parameters in one block."""
        attn = self.d_model * self.head_dim * (2 * self.n_heads + 2 * self.kv_heads)
        mlp = 3 * self.d_model * self.ffn_dim
        return attn + mlp + 2 * self.d_model

    def ends_params(self) -> int:
        """Parameters in the embedding, final norm and head."""
        head = 0 if self.tie_embeddings else self.vocab_size * self.d_model
        return self.vocab_size * self.d_model + self.d_model + head
