"""Every attention kind and backend, each with a plain-PyTorch reference path (docs/attention.md).

Kinds (recipe ``attention.kind``):

- ``mha`` / ``gqa`` / ``mqa``: :class:`StandardAttention`, softmax attention with ``model.kv_heads`` key/value heads
  shared by groups of query heads, and an optional sliding ``window``.
- ``mla``: :class:`LatentAttention`, multi-head latent attention as in DeepSeek-V2: keys and values are
  up-projected from one low-rank latent per token, RoPE lives on a separate decoupled part of q and k, and the
  decode cache holds only the latent and the rope key.
- ``linear``: :class:`LinearAttention`, kernel-based linear attention with the feature map elu(x) + 1, O(T) in
  the sequence length through running sums.

Backends (recipe ``attention.backend``), resolved per call for the device the input lives on:
``reference`` (explicit softmax in fp32, the ground truth), ``sdpa`` (``F.scaled_dot_product_attention``),
``xformers`` (``xformers.ops.memory_efficient_attention``, CUDA only), ``kernels`` (none exist yet), and
``auto``, which picks the fastest that is available. An explicit choice that cannot run raises a
``StackwiseError`` saying what is missing; nothing falls back silently.

Every module has ``forward(x, cos, sin, causal)`` for a whole sequence and ``decode(x, cos, sin, cache)`` for one
new token given the cache of the tokens before it; the tests hold decode step by step to the full forward.
``cos`` and ``sin`` are None when the model has learned absolute positions instead of RoPE (standard and linear
attention; MLA needs RoPE). Linear layers carry biases when ``model.use_bias`` (GPT-2, BERT).
The rotary helpers and RMSNorm live here, the lowest layer, because MLA needs them; ``model.py`` imports them.
"""

from __future__ import annotations

import functools
import importlib.util
import math
from dataclasses import dataclass
from typing import get_args

import torch
import torch.nn.functional as F
from torch import nn

from stackwise_cli.errors import StackwiseError
from stackwise_cli.kernels.ops import kernels_available, rotary
from stackwise_cli.model.config import AttentionConfig, AttentionKind, Backend, FeatureMap, ModelConfig
from stackwise_cli.model.rope import apply_rope

KINDS = get_args(AttentionKind)
BACKENDS = get_args(Backend)
FEATURE_MAPS = get_args(FeatureMap)
LINEAR_EPS = 1e-6  # keeps the linear-attention normaliser away from 0 when every feature underflows
LINEAR_CHUNK = 64  # tokens per chunk of causal linear attention: quadratic inside a chunk, running sums across


# ----------------------------------------------------------------------------------------------------------------
# Shared pieces: norm, rotary embeddings, masks


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 whatever the input dtype, as LLaMA does, then cast back before the scale.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def allowed_mask(
    q_len: int, k_len: int, causal: bool, window: int | None, device: torch.device | None = None
) -> torch.Tensor | None:
    """Boolean (Tq, Tk), True where query i may attend to key j; None when every pair is allowed.

    The queries are the last ``q_len`` of the ``k_len`` positions. Causal: j <= i; with a window also
    i - window < j. Bidirectional with a window: |i - j| < window.
    """
    if not causal and window is None:
        return None
    i = torch.arange(k_len - q_len, k_len, device=device)[:, None]
    j = torch.arange(k_len, device=device)[None, :]
    dist = i - j  # (Tq, Tk)
    ok = dist >= 0 if causal else torch.ones_like(dist, dtype=torch.bool)
    if window is not None:
        ok = ok & (dist.abs() < window)
    return ok


# ----------------------------------------------------------------------------------------------------------------
# Choices: one resolve function each


def resolve_kind(name: str) -> str:
    if name not in KINDS:
        raise StackwiseError(f"attention.kind must be one of {', '.join(KINDS)}; got {name!r}")
    return name


def resolve_feature_map(name: str):
    """The positive feature map of linear attention."""
    if name == "elu":
        return lambda x: F.elu(x) + 1.0
    raise StackwiseError(f"attention.feature_map must be one of {', '.join(FEATURE_MAPS)}; got {name!r}")


@functools.cache
def xformers_available() -> bool:
    return importlib.util.find_spec("xformers") is not None


def kernels_missing(dev: torch.device) -> str | None:
    """What the ``kernels`` backend lacks on ``dev`` (None: it can run)."""
    if dev.type != "cuda":
        return f"a CUDA device (this tensor is on {dev.type})"
    if not kernels_available():
        return "the stackwise CUDA extension, which did not build here (see the warning logged above)"
    return None


def resolve_backend(name: str, kind: str, device: torch.device | str) -> str:
    """The backend that computes attention ``kind`` on ``device``.

    ``auto``: linear attention has one implementation (``reference``, its O(T) form); the softmax kinds use
    xformers on CUDA when the package is installed, else sdpa. An explicit choice that cannot run here raises.
    """
    if name not in BACKENDS:
        raise StackwiseError(f"attention.backend must be one of {', '.join(BACKENDS)}; got {name!r}")
    kind = resolve_kind(kind)
    dev = torch.device(device)
    if name == "kernels":
        # Softmax attention through sdpa, with RoPE and the fused residual-add + RMSNorm as custom CUDA kernels.
        if kind not in ("mha", "gqa", "mqa"):
            raise StackwiseError(
                f"attention.backend 'kernels' has kernels for kinds mha, gqa, mqa, not {kind!r}",
                hint="set attention.backend: auto",
            )
        missing = kernels_missing(dev)
        if missing:
            raise StackwiseError(f"attention.backend 'kernels' needs {missing}", hint="set attention.backend: auto")
        return name
    if kind == "linear":
        if name in ("auto", "reference"):
            return "reference"
        raise StackwiseError(
            f"attention.backend {name!r} cannot compute kind 'linear', which has only its own O(T) implementation",
            hint="set attention.backend: auto",
        )
    if name == "auto":
        return "xformers" if dev.type == "cuda" and xformers_available() else "sdpa"
    if name == "xformers":
        missing = [] if xformers_available() else ["the xformers package (pip install xformers)"]
        if dev.type != "cuda":
            missing.append(f"a CUDA device (this tensor is on {dev.type})")
        if missing:
            raise StackwiseError(
                f"attention.backend 'xformers' needs {' and '.join(missing)}", hint="set attention.backend: auto"
            )
    return name


# ----------------------------------------------------------------------------------------------------------------
# Softmax attention backends: q (B, H, Tq, Dqk), k (B, Hkv, Tk, Dqk), v (B, Hkv, Tk, Dv) -> (B, H, Tq, Dv)


def reference_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, window: int | None = None
) -> torch.Tensor:
    """Explicit softmax attention in fp32: the ground truth the fast backends are held to.

    H must be a multiple of Hkv (grouped-query attention); the value dim may differ from the query/key dim (MLA).
    """
    groups = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(groups, dim=1)  # (B, H, Tk, Dqk)
    v = v.repeat_interleave(groups, dim=1)  # (B, H, Tk, Dv)
    scores = (q.float() @ k.float().transpose(-2, -1)) / math.sqrt(q.shape[-1])  # (B, H, Tq, Tk)
    mask = allowed_mask(q.shape[-2], k.shape[-2], causal, window, q.device)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return (scores.softmax(-1) @ v.float()).to(q.dtype)


def sdpa_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, window: int | None = None
) -> torch.Tensor:
    """``F.scaled_dot_product_attention``; a window (or a causal mask with Tq != Tk) goes as a boolean mask."""
    gqa = k.shape[1] != q.shape[1]
    if window is None and (not causal or q.shape[-2] == k.shape[-2]):
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=gqa)
    mask = allowed_mask(q.shape[-2], k.shape[-2], causal, window, q.device)  # (Tq, Tk), True = attend
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)


def xformers_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, window: int | None = None
) -> torch.Tensor:
    """``xformers.ops.memory_efficient_attention`` (CUDA only; ``resolve_backend`` guards it)."""
    import xformers.ops as xops

    B, H, Tq, _ = q.shape
    Tk = k.shape[-2]
    groups = H // k.shape[1]
    # xformers wants (B, T, H, D) with as many KV heads as query heads.
    qx = q.transpose(1, 2)  # (B, Tq, H, Dqk)
    kx = k.repeat_interleave(groups, dim=1).transpose(1, 2)  # (B, Tk, H, Dqk)
    vx = v.repeat_interleave(groups, dim=1).transpose(1, 2)  # (B, Tk, H, Dv)
    mask = allowed_mask(Tq, Tk, causal, window, q.device)
    if mask is None:
        bias = None
    elif window is None and Tq == Tk:
        bias = xops.LowerTriangularMask()
    else:
        # A dense additive bias. xformers needs its rows aligned to 8 elements in memory, hence the padded buffer.
        padded = -(-Tk // 8) * 8
        bias = torch.full((B, H, Tq, padded), float("-inf"), dtype=q.dtype, device=q.device)[..., :Tk]
        bias.masked_fill_(mask, 0.0)  # (B, H, Tq, Tk)
    y = xops.memory_efficient_attention(qx, kx, vx, attn_bias=bias, scale=1.0 / math.sqrt(q.shape[-1]))
    return y.transpose(1, 2)  # (B, H, Tq, Dv)


# "kernels" computes the softmax itself through sdpa: its kernels are RoPE and the block's fused add + norm.
ATTEND = {
    "reference": reference_attention,
    "sdpa": sdpa_attention,
    "xformers": xformers_attention,
    "kernels": sdpa_attention,
}


def attend(
    backend: str, kind: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, window: int | None
) -> torch.Tensor:
    """Softmax attention on the backend ``backend`` resolves to for q's device."""
    return ATTEND[resolve_backend(backend, kind, q.device)](q, k, v, causal, window)


# ----------------------------------------------------------------------------------------------------------------
# Standard attention: mha, gqa, mqa


@dataclass
class KVCache:
    """Standard attention's decode cache: the rotated keys and the values, (B, Hkv, t, D) each; with a window
    only the last ``window`` positions are kept."""

    k: torch.Tensor
    v: torch.Tensor


def head_projections(cfg: ModelConfig) -> tuple[nn.Linear, nn.Linear, nn.Linear, nn.Linear]:
    """q (H D, d), k and v (Hkv D, d), o (d, H D): the weights standard and linear attention share (the names
    Hugging Face export maps)."""
    bias = cfg.use_bias  # GPT-2 and BERT have biases on all four
    q = nn.Linear(cfg.d_model, cfg.n_heads * cfg.head_dim, bias=bias)
    k = nn.Linear(cfg.d_model, cfg.kv_heads * cfg.head_dim, bias=bias)
    v = nn.Linear(cfg.d_model, cfg.kv_heads * cfg.head_dim, bias=bias)
    o = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.d_model, bias=bias)
    return q, k, v, o


class StandardAttention(nn.Module):
    """Softmax attention with H query heads and Hkv = ``cfg.kv_heads`` key/value heads (H = Hkv: mha; 1: mqa)."""

    def __init__(self, cfg: ModelConfig, attn: AttentionConfig):
        super().__init__()
        self.n_heads, self.n_kv, self.hd = cfg.n_heads, cfg.kv_heads, cfg.head_dim
        self.kind, self.backend, self.window = attn.kind, attn.backend, attn.window
        self.q, self.k, self.v, self.o = head_projections(cfg)

    def _qkv(self, x: torch.Tensor, cos: torch.Tensor | None, sin: torch.Tensor | None):
        B, T, _ = x.shape
        q = self.q(x).view(B, T, self.n_heads, self.hd).transpose(1, 2)  # (B, H, T, D)
        k = self.k(x).view(B, T, self.n_kv, self.hd).transpose(1, 2)  # (B, Hkv, T, D)
        v = self.v(x).view(B, T, self.n_kv, self.hd).transpose(1, 2)  # (B, Hkv, T, D)
        if cos is None:  # learned absolute positions (GPT-2, BERT): added to the embedding, nothing to rotate
            return q, k, v
        if resolve_backend(self.backend, self.kind, x.device) == "kernels":
            q, k = rotary(q, k, cos, sin)  # one launch for both, same math as apply_rope
            return q, k, v
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, causal: bool = True) -> torch.Tensor:
        """x (B, T, d_model) -> (B, T, d_model); cos and sin (T, head_dim)."""
        B, T, _ = x.shape
        q, k, v = self._qkv(x, cos, sin)
        y = attend(self.backend, self.kind, q, k, v, causal, self.window)  # (B, H, T, D)
        return self.o(y.transpose(1, 2).reshape(B, T, self.n_heads * self.hd))

    def decode(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: KVCache | None = None
    ) -> tuple[torch.Tensor, KVCache]:
        """One new token x (B, 1, d_model) at position t = the cache's length; cos and sin are row t, (1, D)."""
        B = x.shape[0]
        q, k, v = self._qkv(x, cos, sin)  # (B, H, 1, D), (B, Hkv, 1, D) x2
        if cache is not None:
            k, v = torch.cat((cache.k, k), dim=2), torch.cat((cache.v, v), dim=2)  # (B, Hkv, t+1, D)
        if self.window is not None:  # position t sees t - window < j <= t: exactly the last `window` entries
            k, v = k[:, :, -self.window :], v[:, :, -self.window :]
        # The cache holds exactly the keys the new token may see, so no mask is needed.
        y = attend(self.backend, self.kind, q, k, v, False, None)  # (B, H, 1, D)
        return self.o(y.transpose(1, 2).reshape(B, 1, self.n_heads * self.hd)), KVCache(k, v)


# ----------------------------------------------------------------------------------------------------------------
# Multi-head latent attention (DeepSeek-V2)


@dataclass
class LatentCache:
    """MLA's decode cache: the normalised latent (B, t, C) and the rotated rope key (B, t, R), shared by all
    heads. That is C + R numbers per token and layer, against 2 * Hkv * D for standard attention."""

    latent: torch.Tensor
    k_rope: torch.Tensor


class LatentAttention(nn.Module):
    """Multi-head latent attention. Per head h, with D = head_dim, R = rope_dim, C = kv_rank:

    q_h = [q_nope_h (D), rope(q_rope_h) (R)]           from x (optionally through a rank-Q bottleneck)
    c   = norm(kv_down(x)) (C)                          one latent per token, shared by all heads
    k_h = [k_up_h(c) (D), rope(k_rope(x)) (R)]          the rope key is shared by all heads
    v_h = v_up_h(c) (D)
    RoPE sits on the separate R dims because a rotation between k_up and the latent would depend on position and
    could no longer be absorbed into the query at decode time.
    """

    def __init__(self, cfg: ModelConfig, attn: AttentionConfig):
        super().__init__()
        d, H, D = cfg.d_model, cfg.n_heads, cfg.head_dim
        self.n_heads, self.hd = H, D
        self.kv_rank, self.rope_dim = attn.mla_kv_rank(cfg), attn.mla_rope_dim(cfg)
        self.kind, self.backend, self.window = attn.kind, attn.backend, attn.window
        C, R = self.kv_rank, self.rope_dim
        if attn.q_rank is None:
            self.q = nn.Linear(d, H * (D + R), bias=False)
        else:
            self.q_down = nn.Linear(d, attn.q_rank, bias=False)
            self.q_norm = RMSNorm(attn.q_rank, cfg.norm_eps)
            self.q_up = nn.Linear(attn.q_rank, H * (D + R), bias=False)
        self.kv_down = nn.Linear(d, C, bias=False)
        self.kv_norm = RMSNorm(C, cfg.norm_eps)
        self.k_rope = nn.Linear(d, R, bias=False)
        self.k_up = nn.Linear(C, H * D, bias=False)
        self.v_up = nn.Linear(C, H * D, bias=False)
        self.o = nn.Linear(H * D, d, bias=False)

    def _queries(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        B, T, _ = x.shape
        q = self.q(x) if hasattr(self, "q") else self.q_up(self.q_norm(self.q_down(x)))
        q = q.view(B, T, self.n_heads, self.hd + self.rope_dim).transpose(1, 2)  # (B, H, T, D + R)
        q_nope, q_rope = q.split([self.hd, self.rope_dim], dim=-1)  # (B, H, T, D), (B, H, T, R)
        return q_nope, apply_rope(q_rope, cos, sin)

    def _latent(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """What the cache holds: the latent (B, T, C) and the rotated rope key (B, T, R)."""
        return self.kv_norm(self.kv_down(x)), apply_rope(self.k_rope(x), cos, sin)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, causal: bool = True) -> torch.Tensor:
        """x (B, T, d_model) -> (B, T, d_model); cos and sin (T, rope_dim)."""
        B, T, _ = x.shape
        H, D, R = self.n_heads, self.hd, self.rope_dim
        q_nope, q_rope = self._queries(x, cos, sin)
        c, kr = self._latent(x, cos, sin)  # (B, T, C), (B, T, R)
        k_nope = self.k_up(c).view(B, T, H, D).transpose(1, 2)  # (B, H, T, D)
        v = self.v_up(c).view(B, T, H, D).transpose(1, 2)  # (B, H, T, D)
        q = torch.cat((q_nope, q_rope), dim=-1)  # (B, H, T, D + R)
        k = torch.cat((k_nope, kr[:, None].expand(B, H, T, R)), dim=-1)  # (B, H, T, D + R)
        y = attend(self.backend, self.kind, q, k, v, causal, self.window)  # (B, H, T, D)
        return self.o(y.transpose(1, 2).reshape(B, T, H * D))

    def decode(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: LatentCache | None = None
    ) -> tuple[torch.Tensor, LatentCache]:
        """One new token x (B, 1, d_model) at position t; cos and sin are row t, (1, rope_dim).

        Keys and values are never expanded per head: k_up is absorbed into the query and v_up applied after the
        weighted sum of latents, which is the same product in another order (plain PyTorch, fp32).
        """
        B = x.shape[0]
        H, D, C = self.n_heads, self.hd, self.kv_rank
        q_nope, q_rope = self._queries(x, cos, sin)  # (B, H, 1, D), (B, H, 1, R)
        c, kr = self._latent(x, cos, sin)  # (B, 1, C), (B, 1, R)
        if cache is not None:
            c, kr = torch.cat((cache.latent, c), dim=1), torch.cat((cache.k_rope, kr), dim=1)  # (B, t+1, ...)
        if self.window is not None:
            c, kr = c[:, -self.window :], kr[:, -self.window :]
        w_uk = self.k_up.weight.float().view(H, D, C)
        w_uv = self.v_up.weight.float().view(H, D, C)
        q_lat = torch.einsum("bhqd,hdc->bhqc", q_nope.float(), w_uk)  # (B, H, 1, C): q_nope . k_up(c) = q_lat . c
        scores = q_lat @ c.float()[:, None].transpose(-2, -1)  # (B, H, 1, t)
        scores = scores + q_rope.float() @ kr.float()[:, None].transpose(-2, -1)
        p = (scores / math.sqrt(D + self.rope_dim)).softmax(-1)  # (B, H, 1, t)
        y_lat = p @ c.float()[:, None]  # (B, H, 1, C)
        y = torch.einsum("bhqc,hdc->bhqd", y_lat, w_uv).to(x.dtype)  # (B, H, 1, D)
        return self.o(y.transpose(1, 2).reshape(B, 1, H * D)), LatentCache(c, kr)


# ----------------------------------------------------------------------------------------------------------------
# Linear attention


@dataclass
class LinearState:
    """Causal linear attention's decode state, the same size whatever the length: the running sums
    S = sum_j rope(phi(k_j)) v_j^T (B, Hkv, D, D) and z = sum_j phi(k_j) (B, Hkv, D)."""

    s: torch.Tensor
    z: torch.Tensor


def linear_attention(
    qf: torch.Tensor, kf: torch.Tensor, qr: torch.Tensor, kr: torch.Tensor, v: torch.Tensor, causal: bool
) -> torch.Tensor:
    """The O(T) form. qf, qr (B, Hkv, G, T, D); kf, kr (B, Hkv, 1, T, D); v (B, Hkv, 1, T, Dv) -> (B, Hkv, G, T, Dv).

    ``*f`` are the features phi(x), ``*r`` the same rotated by RoPE. out_i = sum_j (qr_i . kr_j) v_j / sum_j
    (qf_i . kf_j) over j <= i (causal) or all j. Causal runs in chunks: quadratic inside a chunk, running sums
    from the chunks before, so memory stays O(T * chunk + D^2) rather than a (T, D, D) cumulative sum.
    """
    if not causal:
        s = kr.transpose(-2, -1) @ v  # (B, Hkv, 1, D, Dv)
        z = kf.sum(-2, keepdim=True)  # (B, Hkv, 1, 1, D)
        return (qr @ s) / ((qf * z).sum(-1, keepdim=True) + LINEAR_EPS)
    s = torch.zeros(*kr.shape[:-2], kr.shape[-1], v.shape[-1], dtype=v.dtype, device=v.device)  # (B, Hkv, 1, D, Dv)
    z = torch.zeros(*kf.shape[:-2], 1, kf.shape[-1], dtype=v.dtype, device=v.device)  # (B, Hkv, 1, 1, D)
    out = []
    for start in range(0, qf.shape[-2], LINEAR_CHUNK):
        sl = slice(start, start + LINEAR_CHUNK)
        qfc, qrc, kfc, krc, vc = qf[..., sl, :], qr[..., sl, :], kf[..., sl, :], kr[..., sl, :], v[..., sl, :]
        n = qfc.shape[-2]
        later = torch.ones(n, n, dtype=torch.bool, device=v.device).triu(1)  # (c, c): keys after the query
        num = qrc @ s + (qrc @ krc.transpose(-2, -1)).masked_fill(later, 0.0) @ vc  # (B, Hkv, G, c, Dv)
        den = (qfc * z).sum(-1, keepdim=True) + (qfc @ kfc.transpose(-2, -1)).masked_fill(later, 0.0).sum(
            -1, keepdim=True
        )  # (B, Hkv, G, c, 1)
        out.append(num / (den + LINEAR_EPS))
        s = s + krc.transpose(-2, -1) @ vc
        z = z + kfc.sum(-2, keepdim=True)
    return torch.cat(out, dim=-2)


def linear_attention_quadratic(
    qf: torch.Tensor, kf: torch.Tensor, qr: torch.Tensor, kr: torch.Tensor, v: torch.Tensor, causal: bool
) -> torch.Tensor:
    """The same as :func:`linear_attention` through explicit (T, T) matrices: the test oracle."""
    num = qr @ kr.transpose(-2, -1)  # (B, Hkv, G, T, T)
    den = qf @ kf.transpose(-2, -1)  # (B, Hkv, G, T, T)
    if causal:
        later = torch.ones(num.shape[-2:], dtype=torch.bool, device=v.device).triu(1)
        num, den = num.masked_fill(later, 0.0), den.masked_fill(later, 0.0)
    return (num @ v) / (den.sum(-1, keepdim=True) + LINEAR_EPS)


class LinearAttention(nn.Module):
    """Kernel-based linear attention, phi = elu + 1, with the weights of standard attention (q, k, v, o).

    RoPE as in RoFormer: the numerator uses rotated features, the normaliser the unrotated ones, which are
    positive, so it never changes sign. That keeps a position signal in the bidirectional case too. Computed
    in fp32; there is no other backend (``resolve_backend``).
    """

    def __init__(self, cfg: ModelConfig, attn: AttentionConfig):
        super().__init__()
        self.n_heads, self.n_kv, self.hd = cfg.n_heads, cfg.kv_heads, cfg.head_dim
        self.kind, self.backend = attn.kind, attn.backend
        self.phi = resolve_feature_map(attn.feature_map)
        self.q, self.k, self.v, self.o = head_projections(cfg)

    def _features(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        B, T, _ = x.shape
        G = self.n_heads // self.n_kv
        resolve_backend(self.backend, self.kind, x.device)  # raises for a backend that cannot compute this kind
        q = self.q(x).float().view(B, T, self.n_kv, G, self.hd).permute(0, 2, 3, 1, 4)  # (B, Hkv, G, T, D)
        k = self.k(x).float().view(B, T, self.n_kv, 1, self.hd).permute(0, 2, 3, 1, 4)  # (B, Hkv, 1, T, D)
        v = self.v(x).float().view(B, T, self.n_kv, 1, self.hd).permute(0, 2, 3, 1, 4)  # (B, Hkv, 1, T, D)
        qf, kf = self.phi(q), self.phi(k)
        if cos is None:  # learned absolute positions: no rotation
            return qf, kf, qf, kf, v
        return qf, kf, apply_rope(qf, cos, sin), apply_rope(kf, cos, sin), v

    def _out(self, y: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        B, _, _, T, _ = y.shape  # (B, Hkv, G, T, D); query head h = kv head * G + g, as in repeat_interleave
        return self.o(y.permute(0, 3, 1, 2, 4).reshape(B, T, self.n_heads * self.hd).to(dtype))

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, causal: bool = True) -> torch.Tensor:
        """x (B, T, d_model) -> (B, T, d_model) in O(T); cos and sin (T, head_dim)."""
        return self._out(linear_attention(*self._features(x, cos, sin), causal), x.dtype)

    def quadratic_form(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, causal: bool = True
    ) -> torch.Tensor:
        """The same function through (T, T) matrices: the reference the O(T) form is tested against."""
        return self._out(linear_attention_quadratic(*self._features(x, cos, sin), causal), x.dtype)

    def decode(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: LinearState | None = None
    ) -> tuple[torch.Tensor, LinearState]:
        """One new token x (B, 1, d_model) at position t; cos and sin are row t, (1, head_dim)."""
        qf, kf, qr, kr, v = self._features(x, cos, sin)  # (B, Hkv, G|1, 1, D)
        s = kr[:, :, 0].transpose(-2, -1) @ v[:, :, 0]  # (B, Hkv, D, D)
        z = kf[:, :, 0, 0]  # (B, Hkv, D)
        if cache is not None:
            s, z = cache.s + s, cache.z + z
        num = qr @ s[:, :, None]  # (B, Hkv, G, 1, D)
        den = (qf * z[:, :, None, None]).sum(-1, keepdim=True)  # (B, Hkv, G, 1, 1)
        return self._out(num / (den + LINEAR_EPS), x.dtype), LinearState(s, z)


# ----------------------------------------------------------------------------------------------------------------


def make_attention(cfg: ModelConfig, attn: AttentionConfig) -> nn.Module:
    """The attention module for ``attn.kind``; raises if the kind does not fit the model's head counts."""
    problems = attn.model_problems(cfg)
    if problems:
        raise StackwiseError("; ".join(f"{key}: {msg}" for key, msg in problems))
    kind = resolve_kind(attn.kind)
    if kind == "mla":
        return LatentAttention(cfg, attn)
    if kind == "linear":
        return LinearAttention(cfg, attn)
    return StandardAttention(cfg, attn)
