"""The model's frozen config. Kept free of torch so recipes validate (and ``--help`` answers) instantly."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, get_args

from stackwise_cli.schema import check

Family = Literal["llama", "gpt2", "bert", "modernbert"]
Norm = Literal["rms", "layer"]
NormPosition = Literal["pre", "post"]
Positions = Literal["rope", "learned"]
MlpKind = Literal["swiglu", "gelu", "geglu"]
AttentionKind = Literal["mha", "gqa", "mqa", "mla", "linear"]
Backend = Literal["auto", "reference", "sdpa", "xformers", "kernels"]
FeatureMap = Literal["elu"]

FAMILIES = get_args(Family)

# Each family's defaults: the switches a recipe may override (``model.norm`` ...) and the parts that only the family
# decides (GELU's approximation, the embedding norm, the final norm, BERT's MLM transform). One table, read once in
# ``ModelConfig.__post_init__``; nothing else looks at ``family``. See docs/models.md.
FAMILY_DEFAULTS: dict[str, dict] = {
    # LLaMA: pre-norm RMSNorm, RoPE, SwiGLU, no biases; final norm then the head.
    "llama": dict(
        norm="rms",
        norm_position="pre",
        positions="rope",
        mlp="swiglu",
        bias=False,
        token_types=0,
        global_every=1,
        local_window=None,
        gelu="none",
        embed_norm=False,
        final_norm=True,
        mlm_head=False,
    ),
    # GPT-2: pre-norm LayerNorm with bias, learned positions, GELU (tanh approximation, HF "gelu_new"), biases.
    "gpt2": dict(
        norm="layer",
        norm_position="pre",
        positions="learned",
        mlp="gelu",
        bias=True,
        token_types=0,
        global_every=1,
        local_window=None,
        gelu="tanh",
        embed_norm=False,
        final_norm=True,
        mlm_head=False,
    ),
    # BERT: post-norm LayerNorm, learned positions + token types, an embedding LayerNorm, exact GELU, biases, no
    # final norm; the MLM head is dense + GELU + LayerNorm, then the (tied) decoder with an output bias.
    "bert": dict(
        norm="layer",
        norm_position="post",
        positions="learned",
        mlp="gelu",
        bias=True,
        token_types=2,
        global_every=1,
        local_window=None,
        gelu="none",
        embed_norm=True,
        final_norm=False,
        mlm_head=True,
    ),
    # ModernBERT: pre-norm LayerNorm without bias, RoPE, GeGLU, no biases, embedding norm and final norm, and
    # alternating attention: every third block global, the others a bidirectional sliding window of 128.
    "modernbert": dict(
        norm="layer",
        norm_position="pre",
        positions="rope",
        mlp="geglu",
        bias=False,
        token_types=0,
        global_every=3,
        local_window=128,
        gelu="none",
        embed_norm=True,
        final_norm=True,
        mlm_head=False,
    ),
}
SWITCHES = ("norm", "norm_position", "positions", "mlp", "bias", "token_types", "global_every", "local_window")
CHOICES: dict[str, tuple[str, ...]] = {
    "family": FAMILIES,
    "norm": get_args(Norm),
    "norm_position": get_args(NormPosition),
    "positions": get_args(Positions),
    "mlp": get_args(MlpKind),
}
TIME_FREQS_MAX_PERIOD = 10000.0  # sinusoidal time features, as for positions in the Transformer paper


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """Shape of every block and of the ends. Stacks differ only in how many blocks they hold.

    ``family`` picks the defaults of every switch below it (``FAMILY_DEFAULTS``); a switch left null takes the
    family's value. The resolved values are the derived fields (``norm_kind``, ``mlp_kind`` ...): the model reads
    only those.
    """

    family: Family = "llama"
    vocab_size: int = 4096
    d_model: int = 128
    n_heads: int = 4
    n_kv_heads: int | None = None  # None = n_heads (plain MHA); fewer = grouped-query attention
    d_ff: int | None = None  # None = 4 * d_model for gelu, else the LLaMA rule: 8/3 * d_model rounded up to 64
    max_seq_len: int = 256  # also the size of the learned position table
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    tie_embeddings: bool = False
    init_std: float = 0.02
    # Switches; None = the family's default.
    norm: Norm | None = None  # rms (RMSNorm) | layer (LayerNorm, with a bias iff `bias`)
    norm_position: NormPosition | None = None  # pre: x + f(norm(x)); post: norm(x + f(x))
    positions: Positions | None = None  # rope (rotary, in attention) | learned (absolute table, in the embedding)
    mlp: MlpKind | None = None  # swiglu: down(silu(gate) * up); geglu: down(gelu(gate) * up); gelu: down(gelu(up))
    bias: bool | None = None  # biases on every linear layer (and on LayerNorm)
    token_types: int | None = None  # token type embeddings (type 0 everywhere); 0 = none
    global_every: int | None = None  # in each stack block i is global iff i % global_every == 0, else local
    local_window: int | None = None  # local blocks' sliding window: |i - j| < local_window (causal: i - j < it)
    time_embedding: bool = False  # each stack adds a learned embedding of a per-sequence time t in [0, 1]

    # derived, computed once
    head_dim: int = field(init=False, repr=False)
    kv_heads: int = field(init=False, repr=False)
    ffn_dim: int = field(init=False, repr=False)
    norm_kind: str = field(init=False, repr=False)
    norm_at: str = field(init=False, repr=False)
    position_kind: str = field(init=False, repr=False)
    mlp_kind: str = field(init=False, repr=False)
    use_bias: bool = field(init=False, repr=False)
    type_vocab: int = field(init=False, repr=False)
    global_period: int = field(init=False, repr=False)
    local_span: int | None = field(init=False, repr=False)
    gelu_approximate: str = field(init=False, repr=False)  # "tanh" (GPT-2's gelu_new) or "none" (exact erf)
    embed_norm: bool = field(init=False, repr=False)
    final_norm: bool = field(init=False, repr=False)
    mlm_head: bool = field(init=False, repr=False)

    def __post_init__(self) -> None:
        check(self)
        fam = FAMILY_DEFAULTS[self.family]
        resolved = {name: fam[name] if getattr(self, name) is None else getattr(self, name) for name in SWITCHES}
        derived = {
            "norm_kind": resolved["norm"],
            "norm_at": resolved["norm_position"],
            "position_kind": resolved["positions"],
            "mlp_kind": resolved["mlp"],
            "use_bias": resolved["bias"],
            "type_vocab": resolved["token_types"],
            "global_period": resolved["global_every"],
            "local_span": resolved["local_window"],
            "gelu_approximate": fam["gelu"],
            "embed_norm": fam["embed_norm"],
            "final_norm": fam["final_norm"],
            "mlm_head": fam["mlm_head"],
            "head_dim": self.d_model // self.n_heads,
            "kv_heads": self.n_kv_heads or self.n_heads,
        }
        if self.d_ff is not None:
            derived["ffn_dim"] = self.d_ff
        elif resolved["mlp"] == "gelu":
            derived["ffn_dim"] = 4 * self.d_model
        else:
            derived["ffn_dim"] = 64 * -(-(8 * self.d_model // 3) // 64)
        for name, value in derived.items():
            object.__setattr__(self, name, value)

    def switches(self) -> dict[str, object]:
        """The resolved value of every switch, by its recipe name (what export compares to a family's)."""
        return {
            "norm": self.norm_kind,
            "norm_position": self.norm_at,
            "positions": self.position_kind,
            "mlp": self.mlp_kind,
            "bias": self.use_bias,
            "token_types": self.type_vocab,
            "global_every": self.global_period,
            "local_window": self.local_span,
        }

    def problems(self) -> list[tuple[str, str]]:
        out = []
        for name, allowed in CHOICES.items():
            value = getattr(self, name)
            if name != "family" and value is None:
                continue
            if value not in allowed:
                nullable = "" if name == "family" else " or null"
                out.append((name, f"must be one of {', '.join(repr(a) for a in allowed)}{nullable}, got {value!r}"))
        if out:
            return out
        for name in ("vocab_size", "d_model", "n_heads", "max_seq_len"):
            if getattr(self, name) < 1:
                out.append((name, f"must be >= 1, got {getattr(self, name)}"))
        if out:
            return out
        positions = self.positions or FAMILY_DEFAULTS[self.family]["positions"]
        if self.d_model % self.n_heads:
            out.append(("n_heads", f"must divide d_model ({self.d_model}), got {self.n_heads}"))
        elif positions == "rope" and (self.d_model // self.n_heads) % 2:
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
        if self.token_types is not None and self.token_types < 0:
            out.append(("token_types", f"must be >= 0 (0 = no token type embeddings) or null, got {self.token_types}"))
        if self.global_every is not None and self.global_every < 1:
            out.append(("global_every", f"must be >= 1 (1 = every block global) or null, got {self.global_every}"))
        if self.local_window is not None and self.local_window < 1:
            out.append(("local_window", f"must be >= 1 or null, got {self.local_window}"))
        global_every = self.global_every or FAMILY_DEFAULTS[self.family]["global_every"]
        local_window = (
            self.local_window if self.local_window is not None else FAMILY_DEFAULTS[self.family]["local_window"]
        )
        if global_every > 1 and local_window is None:
            out.append(
                ("local_window", f"must be set when global_every is {global_every} (local blocks need a window)")
            )
        return out

    def is_global(self, index: int) -> bool:
        """Whether block ``index`` of a stack (counted from 0 within the stack) attends to every position."""
        return self.local_span is None or index % self.global_period == 0

    def norm_params(self) -> int:
        d = self.d_model
        return 2 * d if self.norm_kind == "layer" and self.use_bias else d

    def mlp_params(self) -> int:
        d, f = self.d_model, self.ffn_dim
        if self.mlp_kind == "gelu":  # up, down
            return 2 * d * f + (f + d if self.use_bias else 0)
        return 3 * d * f + (2 * f + d if self.use_bias else 0)  # gate, up, down

    def block_params(self, attn: AttentionConfig | None = None) -> int:
        """Parameters in one block with attention ``attn`` (default: ``AttentionConfig()``, plain GQA)."""
        attn = attn or AttentionConfig()
        return attn.params(self) + self.mlp_params() + 2 * self.norm_params()

    def time_params(self) -> int:
        """Parameters of one stack's time network (two d x d linear layers with biases), 0 without it."""
        return 2 * (self.d_model * self.d_model + self.d_model) if self.time_embedding else 0

    def stack_params(self, n_blocks: int, attn: AttentionConfig | None = None) -> int:
        """Parameters in a stack of ``n_blocks`` blocks: the blocks plus the stack's time network, if any."""
        return n_blocks * self.block_params(attn) + self.time_params()

    def ends_params(self) -> int:
        """Parameters in the embedding (tokens, positions, types, norm), final norm, MLM transform and head."""
        d, V = self.d_model, self.vocab_size
        n = V * d
        n += self.max_seq_len * d if self.position_kind == "learned" else 0
        n += self.type_vocab * d
        n += self.norm_params() if self.embed_norm else 0
        n += self.norm_params() if self.final_norm else 0
        n += (
            (d * d + (d if self.use_bias else 0) + self.norm_params() + V) if self.mlm_head else 0
        )  # dense, norm, out bias
        n += 0 if self.tie_embeddings else V * d
        return n


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
        if self.kind == "mla" and model.position_kind != "rope":
            out.append(("model.positions", f"must be 'rope' with attention.kind 'mla', got {model.position_kind!r}"))
        if self.kind == "mla" and model.use_bias:
            out.append(("model.bias", "must be false with attention.kind 'mla' (its projections have no biases)"))
        if self.kind == "linear" and model.local_span is not None:
            out.append(
                ("model.local_window", "attention.kind 'linear' has no sliding window; use kind 'gqa' for local blocks")
            )
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
            bias = (H + 2 * model.kv_heads) * D + d if model.use_bias else 0
            return d * D * (2 * H + 2 * model.kv_heads) + bias
        C, R = self.mla_kv_rank(model), self.mla_rope_dim(model)
        q = d * H * (D + R) if self.q_rank is None else d * self.q_rank + self.q_rank + self.q_rank * H * (D + R)
        kv = d * C + C + d * R + 2 * C * H * D  # kv_down, kv_norm, k_rope, k_up and v_up
        return q + kv + H * D * d
