"""Attention kinds and backends (docs/attention.md): every kind x every backend available here against the fp32
reference, masks (causal, bidirectional, windowed), GQA/MQA shapes, decode with a cache = full forward (MLA's
cache holds only the latent and the rope key), linear attention's O(T) form = its quadratic form, the backends
that cannot run here refuse in one line, identity init, and a tiny stack of each kind learns.

Tolerances: fp32 throughout; 1e-5 absolute on outputs and gradients between backends and between decode and
forward (the same products in another order), 1e-4 relative for linear attention's chunked sums.
"""

from __future__ import annotations

import pytest
import torch

from stackwise_cli.errors import RecipeError, StackwiseError
from stackwise_cli.model.attention import (
    LINEAR_CHUNK,
    LatentAttention,
    LinearAttention,
    allowed_mask,
    make_attention,
    resolve_backend,
)
from stackwise_cli.model.config import AttentionConfig, ModelConfig
from stackwise_cli.model.model import Ends, Rack, Stack, causal_lm_loss
from stackwise_cli.model.rope import rope_tables
from stackwise_cli.schema import SchemaError

ATOL = 1e-5
KV_HEADS = {"mha": None, "gqa": 2, "mqa": 1, "mla": None, "linear": 2}
SOFTMAX = [  # (id, AttentionConfig fields)
    ("mha", {"kind": "mha"}),
    ("gqa", {"kind": "gqa"}),
    ("mqa", {"kind": "mqa"}),
    ("mla", {"kind": "mla", "kv_rank": 12}),
    ("mla-qrank", {"kind": "mla", "kv_rank": 12, "q_rank": 16, "rope_dim": 4}),
]
ALL_KINDS = [*SOFTMAX, ("linear", {"kind": "linear"})]
MASKS = [("causal", True, None), ("bidirectional", False, None), ("causal-w4", True, 4), ("bidirectional-w4", False, 4)]


def model_for(kind: str) -> ModelConfig:
    return ModelConfig(
        vocab_size=64, d_model=32, n_heads=4, n_kv_heads=KV_HEADS[kind], d_ff=64, max_seq_len=256, init_std=0.1
    )


def build(fields: dict, seed: int = 0, **extra) -> tuple[ModelConfig, AttentionConfig, torch.nn.Module]:
    attn = AttentionConfig(**{**fields, **extra})
    cfg = model_for(attn.kind)
    torch.manual_seed(seed)
    return cfg, attn, make_attention(cfg, attn)


def tables(cfg: ModelConfig, attn: AttentionConfig, T: int):
    return rope_tables(cfg, T, dim=attn.rope_dim_for(cfg))


def inputs(B=2, T=16, d=32, seed=1) -> torch.Tensor:
    return torch.randn(B, T, d, generator=torch.Generator().manual_seed(seed))


def available_backends(kind: str) -> list[str]:
    return [b for b in ("reference", "sdpa", "xformers") if _runs(b, kind)]


def _runs(backend: str, kind: str) -> bool:
    try:
        resolve_backend(backend, kind, "cpu")
        return True
    except StackwiseError:
        return False


# ---------------------------------------------------------------------------------------------------------------
# Backends agree with the reference


@pytest.mark.parametrize("mask", MASKS, ids=[m[0] for m in MASKS])
@pytest.mark.parametrize("kind", SOFTMAX, ids=[k[0] for k in SOFTMAX])
def test_every_backend_matches_reference_in_outputs_and_gradients(kind, mask):
    _, causal, window = mask
    cfg, attn, ref = build(kind[1], backend="reference", window=window)
    cos, sin = tables(cfg, attn, 24)
    x = inputs(T=24).requires_grad_(True)
    y_ref = ref(x, cos, sin, causal)
    y_ref.square().sum().backward()
    g_ref = {n: p.grad.clone() for n, p in ref.named_parameters()}
    gx_ref = x.grad.clone()
    backends = [b for b in available_backends(attn.kind) if b != "reference"]
    assert "sdpa" in backends
    for backend in backends:
        _, _, fast = build(kind[1], backend=backend, window=window)
        fast.load_state_dict(ref.state_dict())
        x.grad = None
        y = fast(x, cos, sin, causal)
        assert torch.allclose(y, y_ref, atol=ATOL), (backend, (y - y_ref).abs().max())
        y.square().sum().backward()
        assert torch.allclose(x.grad, gx_ref, atol=ATOL), backend
        for n, p in fast.named_parameters():
            assert torch.allclose(p.grad, g_ref[n], atol=ATOL), (backend, n)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
def test_linear_attention_equals_its_quadratic_form(causal):
    cfg, attn, m = build({"kind": "linear"})
    T = 2 * LINEAR_CHUNK + 22  # crosses chunk boundaries, ends in a partial chunk
    cos, sin = tables(cfg, attn, T)
    x = inputs(T=T).requires_grad_(True)
    fast = m(x, cos, sin, causal)
    (fast * torch.linspace(-1, 1, fast.shape[-1])).sum().backward()
    g_fast = [p.grad.clone() for p in m.parameters()]
    m.zero_grad()
    slow = m.quadratic_form(x, cos, sin, causal)
    (slow * torch.linspace(-1, 1, slow.shape[-1])).sum().backward()
    assert torch.allclose(fast, slow, rtol=1e-4, atol=ATOL), (fast - slow).abs().max()
    for a, p in zip(g_fast, m.parameters()):
        assert torch.allclose(a, p.grad, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------------------------------------------
# Shapes and masks


@pytest.mark.parametrize(("kind", "n_kv"), [("mha", 4), ("gqa", 2), ("mqa", 1)])
def test_gqa_and_mqa_shapes(kind, n_kv):
    cfg, attn, m = build({"kind": kind})
    hd = cfg.head_dim
    assert m.q.weight.shape == (4 * hd, 32) and m.k.weight.shape == (n_kv * hd, 32) == m.v.weight.shape
    cos, sin = tables(cfg, attn, 5)
    x = inputs(T=5)
    cache = None
    for t in range(5):
        y, cache = m.decode(x[:, t : t + 1], cos[t : t + 1], sin[t : t + 1], cache)
        assert y.shape == (2, 1, 32)
    assert cache.k.shape == cache.v.shape == (2, n_kv, 5, hd)


def test_mqa_and_mha_check_the_kv_head_count():
    with pytest.raises(StackwiseError, match=r"model\.n_kv_heads: must be 1 with attention\.kind 'mqa', got 2"):
        make_attention(model_for("gqa"), AttentionConfig(kind="mqa"))
    with pytest.raises(StackwiseError, match=r"model\.n_kv_heads: must be null or 4 with attention\.kind 'mha'"):
        make_attention(model_for("gqa"), AttentionConfig(kind="mha"))
    from stackwise_cli.recipe import recipe_from_data

    with pytest.raises(RecipeError, match=r"r\.yaml: model\.n_kv_heads: must be 1"):
        recipe_from_data({"name": "x", "model": {"n_kv_heads": 2}, "attention": {"kind": "mqa"}}, "r.yaml")


def test_attention_config_validation_names_the_field():
    for fields, key in [
        ({"window": 0}, "window"),
        ({"kind": "mla", "rope_dim": 3}, "rope_dim"),
        ({"kind": "mla", "kv_rank": 0}, "kv_rank"),
        ({"kind": "gqa", "kv_rank": 8}, "kv_rank"),
        ({"kind": "linear", "window": 4}, "window"),
        ({"kind": "linear", "backend": "sdpa"}, "backend"),
    ]:
        with pytest.raises(SchemaError) as e:
            AttentionConfig(**fields)
        assert e.value.problems[0][0] == key, fields


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
@pytest.mark.parametrize("kind", [SOFTMAX[1], SOFTMAX[3]], ids=["gqa", "mla"])
def test_window_hides_exactly_the_tokens_outside_it(kind, causal):
    cfg, attn, m = build(kind[1], window=4)
    T, p = 16, 8
    cos, sin = tables(cfg, attn, T)
    x = inputs(T=T)
    x2 = x.clone()
    x2[:, p] += 1.0  # perturb one position
    with torch.no_grad():
        changed = (m(x, cos, sin, causal) - m(x2, cos, sin, causal)).abs().amax(dim=(0, 2)) > 1e-6  # (T,)
    sees_p = allowed_mask(T, T, causal, 4)[:, p]  # (T,): which queries have p inside their window
    assert torch.equal(changed, sees_p)
    expected = [i for i in range(T) if (0 <= i - p < 4 if causal else abs(i - p) < 4)]
    assert sees_p.nonzero().flatten().tolist() == expected


@pytest.mark.parametrize("kind", ALL_KINDS, ids=[k[0] for k in ALL_KINDS])
def test_every_kind_is_causal(kind):
    cfg, attn, m = build(kind[1])
    cos, sin = tables(cfg, attn, 16)
    x = inputs(T=16)
    x2 = x.clone()
    x2[:, 10:] = torch.randn_like(x2[:, 10:])
    with torch.no_grad():
        a, b = m(x, cos, sin, True), m(x2, cos, sin, True)
        assert torch.allclose(a[:, :10], b[:, :10], atol=1e-6)
        assert not torch.allclose(a[:, 10:], b[:, 10:], atol=1e-3)
        # and bidirectional really does look ahead
        assert not torch.allclose(m(x, cos, sin, False)[:, :10], m(x2, cos, sin, False)[:, :10], atol=1e-3)


# ---------------------------------------------------------------------------------------------------------------
# Decode with a cache = full forward


DECODE = [*ALL_KINDS, ("gqa-w3", {"kind": "gqa", "window": 3}), ("mla-w3", {"kind": "mla", "window": 3})]


@pytest.mark.parametrize("kind", DECODE, ids=[k[0] for k in DECODE])
def test_decode_with_cache_equals_full_forward(kind):
    cfg, attn, m = build(kind[1])
    T = 12
    cos, sin = tables(cfg, attn, T)
    x = inputs(T=T)
    with torch.no_grad():
        full = m(x, cos, sin, True)
        cache, steps = None, []
        for t in range(T):
            y, cache = m.decode(x[:, t : t + 1], cos[t : t + 1], sin[t : t + 1], cache)
            steps.append(y)
    assert torch.allclose(torch.cat(steps, dim=1), full, atol=ATOL), (torch.cat(steps, dim=1) - full).abs().max()


@pytest.mark.parametrize("window", [None, 5])
def test_mla_cache_holds_only_the_latent_and_the_rope_key(window):
    cfg, attn, m = build({"kind": "mla", "kv_rank": 12}, window=window)
    assert isinstance(m, LatentAttention) and (m.kv_rank, m.rope_dim) == (12, 4)  # rope_dim = head_dim // 2
    T = 9
    cos, sin = tables(cfg, attn, T)
    x = inputs(T=T)
    cache = None
    with torch.no_grad():
        for t in range(T):
            _, cache = m.decode(x[:, t : t + 1], cos[t : t + 1], sin[t : t + 1], cache)
    kept = T if window is None else window
    assert set(vars(cache)) == {"latent", "k_rope"}
    assert cache.latent.shape == (2, kept, 12) and cache.k_rope.shape == (2, kept, 4)  # C + R = 16 numbers a token
    # against 2 * n_heads * head_dim = 64 for the same model with standard MHA
    assert cache.latent[0, 0].numel() + cache.k_rope[0, 0].numel() < 2 * cfg.n_heads * cfg.head_dim


def test_linear_decode_state_does_not_grow():
    cfg, attn, m = build({"kind": "linear"})
    assert isinstance(m, LinearAttention)
    cos, sin = tables(cfg, attn, 6)
    x = inputs(T=6)
    cache = None
    with torch.no_grad():
        for t in range(6):
            _, cache = m.decode(x[:, t : t + 1], cos[t : t + 1], sin[t : t + 1], cache)
            assert cache.s.shape == (2, 2, 8, 8) and cache.z.shape == (2, 2, 8)


# ---------------------------------------------------------------------------------------------------------------
# Backends that cannot run here


@pytest.mark.parametrize("backend", ["xformers", "kernels"])
def test_unavailable_backends_refuse_in_one_line(backend):
    cfg, attn, m = build({"kind": "gqa"}, backend=backend)
    cos, sin = tables(cfg, attn, 4)
    with pytest.raises(StackwiseError) as e:
        m(inputs(T=4), cos, sin, True)
    text = str(e.value)
    assert "\n" not in text and f"attention.backend '{backend}'" in text
    if backend == "xformers":
        assert "CUDA device" in text  # this machine has none; the package may be missing too, and then it says so
    else:
        assert "needs a CUDA device (this tensor is on cpu)" in text


def test_backend_resolution():
    assert resolve_backend("auto", "gqa", "cpu") == "sdpa"
    assert resolve_backend("auto", "mla", "cpu") == "sdpa"
    assert resolve_backend("auto", "linear", "cpu") == "reference"
    assert resolve_backend("reference", "mqa", "cpu") == "reference"
    with pytest.raises(StackwiseError, match="cannot compute kind 'linear'"):
        resolve_backend("sdpa", "linear", "cpu")
    with pytest.raises(StackwiseError, match="must be one of auto, reference, sdpa, xformers, kernels; got 'flash'"):
        resolve_backend("flash", "gqa", "cpu")
    with pytest.raises(StackwiseError, match="must be one of mha, gqa, mqa, mla, linear; got 'sparse'"):
        resolve_backend("auto", "sparse", "cpu")


# ---------------------------------------------------------------------------------------------------------------
# Stacks of every kind: parameter count, init, training


def stack_for(fields: dict, blocks: int = 2) -> tuple[ModelConfig, AttentionConfig, Stack]:
    attn = AttentionConfig(**fields)
    cfg = model_for(attn.kind)
    return cfg, attn, Stack(cfg, blocks, attn)


@pytest.mark.parametrize("kind", ALL_KINDS, ids=[k[0] for k in ALL_KINDS])
def test_init_covers_every_parameter_and_identity_zeroes_every_output(kind):
    cfg, attn, a = stack_for(kind[1])
    assert sum(p.numel() for p in a.parameters()) == 2 * cfg.block_params(attn)
    torch.manual_seed(1)
    _, _, b = stack_for(kind[1])
    for s in (a, b):  # different construction-time RNG, same init generator: every parameter must come out equal
        s.init_weights("random", total_blocks=2, generator=torch.Generator().manual_seed(7))
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), n
    h = inputs(T=8)
    assert not torch.allclose(a(h), h)
    a.init_weights("identity", total_blocks=2)
    assert torch.equal(a(h), h) and torch.equal(a(h, causal=False), h)


@pytest.mark.parametrize("kind", ALL_KINDS, ids=[k[0] for k in ALL_KINDS])
def test_a_tiny_stack_of_each_kind_learns(kind):
    cfg, attn, stack = stack_for(kind[1], blocks=1)
    torch.manual_seed(0)
    ends = Ends(cfg)
    ends.init_weights()
    stack.init_weights("random", total_blocks=1)
    rack = Rack(cfg, ends, [stack], [0])
    tokens = torch.randint(0, cfg.vocab_size, (4, 16), generator=torch.Generator().manual_seed(3))
    opt = torch.optim.AdamW(rack.parameters(), lr=1e-2)
    losses = []
    for _ in range(30):
        loss = causal_lm_loss(rack(tokens), tokens)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses[::5]


@pytest.mark.parametrize(
    "fields", [{"kind": "mla"}, {"kind": "linear"}, {"kind": "gqa", "window": 8}], ids=["mla", "linear", "window"]
)
def test_hugging_face_export_refuses_what_llama_cannot_hold(tmp_path, fields):
    from stackwise_cli.model.hf import write_fused

    cfg, _, stack = stack_for(fields, blocks=1)
    rack = Rack(cfg, Ends(cfg), [stack], [0])
    with pytest.raises(StackwiseError, match="transformers' Llama cannot hold") as e:
        write_fused(tmp_path / "fused", rack, tmp_path / "tokenizer.json", "<eos>", 0)
    assert "\n" not in str(e.value)
    assert not (tmp_path / "fused").exists()
