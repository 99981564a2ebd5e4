"""The four model families from one block definition (docs/models.md): shapes and parameter counts against the
config arithmetic, masks seen through gradients (causal, bidirectional, ModernBERT's local windows), post-norm vs
pre-norm, identity growth, the time embedding, KV-cache decoding = the full causal forward, and every shipped
recipe validates and builds.

Tolerances: fp32 throughout; 1e-5 absolute between decode and forward (the same products in another order).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from stackwise_cli.errors import StackwiseError
from stackwise_cli.model.attention import KINDS
from stackwise_cli.model.config import FAMILIES, FAMILY_DEFAULTS, AttentionConfig, ModelConfig
from stackwise_cli.model.model import Ends, Rack, Stack
from stackwise_cli.schema import SchemaError

ATOL = 1e-5
RECIPES = sorted((Path(__file__).parent.parent / "recipes").rglob("*.yaml"))
PRE_NORM = [f for f in FAMILIES if FAMILY_DEFAULTS[f]["norm_position"] == "pre"]
CAUSAL_FAMILIES = ["llama", "gpt2", "modernbert"]  # modernbert only to exercise windows in decode


def config(family: str, **kw) -> ModelConfig:
    fields = dict(family=family, vocab_size=61, d_model=32, n_heads=4, d_ff=64, max_seq_len=32, init_std=0.1)
    if family == "modernbert":
        fields["local_window"] = 4  # small enough that a 16-token sequence reaches past it
    return ModelConfig(**{**fields, **kw})


def stack_of(cfg: ModelConfig, n: int, attn: AttentionConfig | None = None, seed: int = 0, mode: str = "random"):
    torch.manual_seed(seed)
    s = Stack(cfg, n, attn or AttentionConfig(backend="reference"))
    s.init_weights(mode, total_blocks=4)
    return s


def perturb(module: torch.nn.Module, seed: int = 5) -> None:
    """Norm weights and biases away from their init (1 and 0), so that a swapped or skipped one shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn(p.shape, generator=g))


def rack_of(cfg: ModelConfig, blocks=(1, 2), attn: AttentionConfig | None = None, seed: int = 0) -> Rack:
    torch.manual_seed(seed)
    ends = Ends(cfg)
    ends.init_weights()
    stacks = [stack_of(cfg, n, attn, seed=seed + i) for i, n in enumerate(blocks)]
    rack = Rack(cfg, ends, stacks, list(range(len(blocks)))).eval()
    perturb(rack)
    return rack


def hidden(B=2, T=16, d=32, seed=1) -> torch.Tensor:
    return torch.randn(B, T, d, generator=torch.Generator().manual_seed(seed))


def tokens(B=2, T=16, vocab=61, seed=1) -> torch.Tensor:
    return torch.randint(0, vocab, (B, T), generator=torch.Generator().manual_seed(seed))


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def influence(fn, h: torch.Tensor) -> torch.Tensor:
    """(T, T) bool: out[i] depends on in[j], from the gradient of each output position."""
    T = h.shape[1]
    # a random direction, not a plain sum: the sum of a LayerNorm's output (weight 1, bias 0) is constant
    w = torch.randn(h.shape[-1], generator=torch.Generator().manual_seed(7))
    rows = []
    for i in range(T):
        x = h.clone().requires_grad_(True)
        (fn(x)[:, i] @ w).sum().backward()
        rows.append(x.grad.abs().sum(dim=(0, 2)) > 0)
    return torch.stack(rows)


# ---------------------------------------------------------------------------------------------------------------
# Config: defaults resolved once, validation names the field


@pytest.mark.parametrize("family", FAMILIES)
def test_switches_resolve_to_the_family_defaults_and_overrides_win(family):
    cfg = config(family)
    for name, value in cfg.switches().items():
        want = FAMILY_DEFAULTS[family][name]
        assert value == (4 if name == "local_window" and family == "modernbert" else want), name
    flipped = config(family, norm_position="post" if cfg.norm_at == "pre" else "pre", mlp="swiglu", bias=True)
    assert flipped.norm_at != cfg.norm_at and flipped.mlp_kind == "swiglu" and flipped.use_bias


def test_config_errors_name_the_field_and_the_choices():
    with pytest.raises(SchemaError) as e:
        ModelConfig(family="gpt3")
    assert e.value.problems[0][0] == "family" and "'gpt2'" in e.value.problems[0][1]
    for field, bad in (("norm", "batch"), ("norm_position", "middle"), ("positions", "alibi"), ("mlp", "relu")):
        with pytest.raises(SchemaError) as e:
            ModelConfig(**{field: bad})
        assert e.value.problems[0][0] == field and "or null" in e.value.problems[0][1]
    with pytest.raises(SchemaError) as e:
        ModelConfig(global_every=2)  # llama has no local window to alternate with
    assert e.value.problems[0][0] == "local_window"
    # rotary embeddings need an even head dim; learned positions do not
    with pytest.raises(SchemaError):
        ModelConfig(family="llama", d_model=36, n_heads=4)
    assert ModelConfig(family="gpt2", d_model=36, n_heads=4).head_dim == 9


def test_mla_needs_rope_and_no_bias():
    with pytest.raises(StackwiseError, match="model.positions"):
        Stack(config("gpt2", bias=False), 1, AttentionConfig(kind="mla"))
    with pytest.raises(StackwiseError, match="model.bias"):
        Stack(config("llama", bias=True), 1, AttentionConfig(kind="mla"))


# ---------------------------------------------------------------------------------------------------------------
# Shapes and parameter counts


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("time", [False, True], ids=["", "time"])
@pytest.mark.parametrize("family", FAMILIES)
def test_forward_shapes_and_parameter_counts(family, time, tie):
    cfg = config(family, time_embedding=time, tie_embeddings=tie)
    attn = AttentionConfig(backend="reference")
    rack = rack_of(cfg, (1, 3), attn)
    t = tokens()
    tt = torch.rand(2) if time else None
    assert rack(t, causal=False, t=tt).shape == (2, 16, cfg.vocab_size)
    states = rack.hidden_states(t, causal=False, t=tt)
    assert len(states) == 3 and all(s.shape == (2, 16, cfg.d_model) for s in states)
    for stack in rack.stacks:
        assert n_params(stack) == cfg.stack_params(len(stack.blocks), attn)
        for block in stack.blocks:
            assert n_params(block) == cfg.block_params(attn)
    assert n_params(rack.ends) == cfg.ends_params()
    # input and output parameters partition the ends
    ins, outs = rack.ends.input_parameters(), rack.ends.output_parameters()
    assert {id(p) for p in ins} | {id(p) for p in outs} == {id(p) for p in rack.ends.parameters()}
    assert not {id(p) for p in ins} & {id(p) for p in outs}


@pytest.mark.parametrize("family", FAMILIES)
def test_input_parameters_are_exactly_what_embed_tokens_uses(family):
    """Changing any input parameter changes the embedding; changing any output parameter does not (the cache
    digest and the 'embedding trains with the leftmost stack' rule rely on this split)."""
    rack = rack_of(config(family))
    t = tokens()
    ends = rack.ends
    base = ends.embed_tokens(t)
    with torch.no_grad():
        for p in ends.input_parameters():
            saved = p.clone()
            p.add_(1.0)
            assert not torch.allclose(ends.embed_tokens(t), base), p.shape
            p.copy_(saved)
        for p in ends.output_parameters():
            p.add_(1.0)
        assert torch.equal(ends.embed_tokens(t), base)


def test_learned_positions_offset_with_start():
    ends = rack_of(config("gpt2")).ends
    t = tokens(T=12)
    whole = ends.embed_tokens(t)
    assert torch.allclose(ends.embed_tokens(t[:, 5:], start=5), whole[:, 5:])
    assert not torch.allclose(ends.embed_tokens(t[:, 5:]), whole[:, 5:])
    with pytest.raises(StackwiseError, match="max_seq_len"):
        ends.embed_tokens(tokens(T=8), start=30)


# ---------------------------------------------------------------------------------------------------------------
# Masks through gradients


@pytest.mark.parametrize("family", FAMILIES)
def test_causal_hides_the_future_and_bidirectional_does_not(family):
    cfg = config(family, local_window=None, global_every=1) if family == "modernbert" else config(family)
    stack = stack_of(cfg, 2)
    h = hidden(T=8)
    seen = influence(lambda x: stack(x, causal=True), h)
    assert torch.equal(seen, torch.ones(8, 8, dtype=torch.bool).tril())
    assert influence(lambda x: stack(x, causal=False), h).all()


def test_modernbert_local_blocks_see_only_their_window():
    cfg = config("modernbert", global_every=2, local_window=3)
    stack = stack_of(cfg, 2)
    assert stack.blocks[0].attn.window is None and stack.blocks[1].attn.window == 3
    h = hidden(T=10)
    cos, sin = stack._tables(0, 10, h.device)
    i, j = torch.arange(10)[:, None], torch.arange(10)[None, :]
    local = influence(lambda x: stack.blocks[1](x, cos, sin, causal=False), h)
    assert torch.equal(local, (i - j).abs() < 3)  # symmetric window, |i - j| < local_window
    assert torch.equal(influence(lambda x: stack.blocks[1](x, cos, sin, causal=True), h), (i - j >= 0) & (i - j < 3))
    assert influence(lambda x: stack.blocks[0](x, cos, sin, causal=False), h).all()  # global
    # within a stack the pattern restarts: block 2 of 3 with global_every 2 is global again
    assert [b.attn.window for b in stack_of(cfg, 3).blocks] == [None, 3, None]


# ---------------------------------------------------------------------------------------------------------------
# Post-norm vs pre-norm


def test_bert_block_is_post_norm():
    cfg = config("bert")
    block = stack_of(cfg, 1).blocks[0]  # LayerNorms at init: weight 1, bias 0
    x = 3.0 * hidden() + 1.0
    y = block(x, None, None, causal=False)
    # the output is a LayerNorm's: every position has mean 0 and variance 1
    assert torch.allclose(y.mean(-1), torch.zeros(2, 16), atol=1e-5)
    assert torch.allclose(y.var(-1, unbiased=False), torch.ones(2, 16), atol=1e-3)
    perturb(block)
    a = block.attn_norm(x + block.attn(x, None, None, False))
    assert torch.allclose(block(x, None, None, causal=False), block.mlp_norm(a + block.mlp(a)), atol=1e-6)


@pytest.mark.parametrize("family", PRE_NORM)
def test_pre_norm_blocks_keep_the_residual(family):
    cfg = config(family)
    stack = stack_of(cfg, 1)
    block = stack.blocks[0]
    perturb(block)
    cos, sin = stack._tables(0, 16, torch.device("cpu"))
    x = 3.0 * hidden() + 1.0
    a = x + block.attn(block.attn_norm(x), cos, sin, False)
    want = a + block.mlp(block.mlp_norm(a))
    y = block(x, cos, sin, causal=False)
    assert torch.allclose(y, want, atol=1e-5)
    assert not torch.allclose(y.mean(-1), torch.zeros(2, 16), atol=0.1)  # not normalised: the residual is kept


# ---------------------------------------------------------------------------------------------------------------
# Identity growth and the time embedding


@pytest.mark.parametrize("family", PRE_NORM)
def test_identity_init_preserves_the_function(family):
    cfg = config(family)
    rack = rack_of(cfg)
    t = tokens()
    before = rack(t, causal=False)
    new = stack_of(cfg, 2, mode="identity")
    for stacks in ([*rack.stacks, new], [new, *rack.stacks]):
        assert torch.equal(Rack(cfg, rack.ends, stacks, [0, 1, 2])(t, causal=False), before)
    other = stack_of(cfg, 2, mode="random")
    assert not torch.allclose(Rack(cfg, rack.ends, [*rack.stacks, other], [0, 1, 2])(t, causal=False), before)


def test_identity_init_is_refused_for_post_norm():
    with pytest.raises(StackwiseError, match="post-norm") as e:
        Stack(config("bert"), 1).init_weights("identity", total_blocks=2)
    assert "random" in e.value.hint
    with pytest.raises(StackwiseError, match="init must be one of"):
        Stack(config("llama"), 1).init_weights("copy", total_blocks=2)


@pytest.mark.parametrize("family", FAMILIES)
def test_time_embedding_is_the_identity_at_init_and_then_depends_on_t(family):
    cfg = config(family, time_embedding=True)
    plain = stack_of(dataclasses.replace(cfg, time_embedding=False), 2, seed=3)
    timed = stack_of(cfg, 2, seed=3)
    missing, unexpected = timed.load_state_dict(plain.state_dict(), strict=False)  # the same blocks
    assert not unexpected and missing and all(k.startswith("time.") for k in missing)
    assert timed.time.inp.weight.abs().sum() > 0  # only the last layer is zero
    h = hidden()
    t0, t1 = torch.tensor([0.1, 0.9]), torch.tensor([0.5, 0.2])
    assert torch.equal(timed(h, False, t0), plain(h, False))
    assert torch.equal(timed(h, False, t1), plain(h, False))
    with torch.no_grad():  # as after some training
        timed.time.out.weight.normal_(0.0, 0.1, generator=torch.Generator().manual_seed(0))
    a, b = timed(h, False, t0), timed(h, False, t1)
    assert not torch.allclose(a, b, atol=1e-3)
    # per sequence: sequence 0 sees only its own t
    assert torch.equal(timed(h, False, torch.tensor([0.1, 0.3]))[0], a[0])
    with pytest.raises(StackwiseError, match="needs t"):
        timed(h, False)
    with pytest.raises(StackwiseError, match="no time embedding"):
        plain(h, False, t0)


# ---------------------------------------------------------------------------------------------------------------
# KV-cache decoding


DECODE_CASES = [
    *[pytest.param("llama", {"kind": k}, id=f"llama-{k}") for k in KINDS],
    pytest.param("llama", {"kind": "mla", "kv_rank": 12, "q_rank": 16}, id="llama-mla-qrank"),
    pytest.param("llama", {"kind": "gqa", "window": 5}, id="llama-gqa-window5"),
    pytest.param("gpt2", {"kind": "mha"}, id="gpt2"),
    pytest.param("modernbert", {"kind": "gqa"}, id="modernbert-local"),
]
KV = {"mha": None, "gqa": 2, "mqa": 1, "mla": None, "linear": 2}


@pytest.mark.parametrize("family,fields", DECODE_CASES)
def test_decode_equals_the_causal_forward(family, fields):
    cfg = config(family, n_kv_heads=KV[fields["kind"]])
    attn = AttentionConfig(backend="reference", **fields)
    assert all(hasattr(type(b.attn), "decode") for b in Stack(cfg, 1, attn).blocks)
    rack = rack_of(cfg, (2, 3), attn)
    t = tokens(T=14)
    full = rack(t, causal=True)
    h_full = rack.stacks[0](rack.ends.embed_tokens(t), causal=True)
    # a prompt of 5, then one token at a time, then a chunk of 3, then the rest one by one
    caches, stack_caches, outs, h_outs, start = None, None, [], [], 0
    for n in (5, 1, 1, 3, 1, 1, 1, 1):
        logits, caches = rack.decode(t[:, start : start + n], start, caches)
        h, stack_caches = rack.stacks[0].decode(
            rack.ends.embed_tokens(t[:, start : start + n], start), start, stack_caches
        )
        outs.append(logits)
        h_outs.append(h)
        start += n
    assert start == t.shape[1]
    assert torch.allclose(torch.cat(h_outs, 1), h_full, atol=ATOL), (torch.cat(h_outs, 1) - h_full).abs().max()
    assert torch.allclose(torch.cat(outs, 1), full, atol=ATOL), (torch.cat(outs, 1) - full).abs().max()
    assert len(caches) == 2 and len(caches[1]) == 3


def test_decode_is_refused_with_a_time_embedding():
    stack = stack_of(config("llama", time_embedding=True), 1)
    with pytest.raises(StackwiseError, match="time embedding"):
        stack.decode(hidden(T=1), 0, None)


# ---------------------------------------------------------------------------------------------------------------
# Shipped recipes


def test_every_family_has_the_five_sizes():
    names = {p.relative_to(p.parent.parent).as_posix() for p in RECIPES}
    for family in FAMILIES:
        for size in ("tiny", "small", "base", "large", "xl"):
            assert f"{family}/{size}.yaml" in names


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.relative_to(p.parent.parent).as_posix())
def test_recipe_builds_with_the_counted_parameters(path):
    from stackwise_cli.recipe import load_recipe

    recipe = load_recipe(path)
    cfg = recipe.model
    assert cfg.family == path.parent.name
    with torch.device("meta"):  # shapes only: nothing is allocated for the large ones
        stack = Stack(cfg, recipe.rack.blocks_per_stack, recipe.attention)
        ends = Ends(cfg)
    assert n_params(stack) == cfg.stack_params(recipe.rack.blocks_per_stack, recipe.attention)
    assert n_params(ends) == cfg.ends_params()
    if cfg.family in ("bert", "modernbert"):
        assert recipe.objective == "mlm"
    if path.stem == "tiny":
        assert cfg.d_model <= 128 and recipe.rack.stacks * recipe.rack.blocks_per_stack <= 4


def total_params(path: str) -> int:
    from stackwise_cli.recipe import load_recipe

    r = load_recipe(Path(__file__).parent.parent / "recipes" / path)
    return r.model.stack_params(r.rack.blocks_per_stack, r.attention) * r.rack.stacks + r.model.ends_params()


@pytest.mark.parametrize(
    "path,published",
    [
        ("gpt2/small.yaml", 124_439_808),  # GPT2LMHeadModel "gpt2"
        ("gpt2/base.yaml", 354_823_168),  # "gpt2-medium"
        ("gpt2/large.yaml", 774_030_080),  # "gpt2-large"
        ("gpt2/xl.yaml", 1_557_611_200),  # "gpt2-xl"
    ],
)
def test_gpt2_recipes_have_the_published_parameter_counts(path, published):
    assert total_params(path) == published


def test_bert_and_modernbert_recipes_have_the_published_shapes():
    # BertForMaskedLM bert-base-uncased: 109,514,298 (BertModel without the pooler) + MLM transform and bias
    base = total_params("bert/base.yaml")
    assert base == 109_514_298
    assert 330e6 < total_params("bert/large.yaml") < 340e6
    assert 145e6 < total_params("modernbert/base.yaml") < 155e6  # ModernBERT-base: 149M
    assert 390e6 < total_params("modernbert/large.yaml") < 400e6  # ModernBERT-large: 395M
