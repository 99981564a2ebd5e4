"""Parity of the model's paths: stack-by-stack = whole model, backends agree, identity growth, causality."""

from __future__ import annotations

import pytest
import torch

from stackwise_cli.model.config import AttentionConfig, ModelConfig
from stackwise_cli.model.model import Ends, Rack, Stack, causal_lm_loss

CFG = ModelConfig(vocab_size=101, d_model=32, n_heads=4, n_kv_heads=2, d_ff=64, max_seq_len=32, init_std=0.1)


def make_rack(cfg: ModelConfig = CFG, blocks=(1, 2), backend: str = "sdpa", seed: int = 0) -> Rack:
    torch.manual_seed(seed)
    ends = Ends(cfg)
    ends.init_weights()
    stacks = []
    for n in blocks:
        s = Stack(cfg, n, AttentionConfig(backend=backend))
        s.init_weights("random", total_blocks=sum(blocks))
        stacks.append(s)
    return Rack(cfg, ends, stacks, list(range(len(blocks))))


def tokens(B=2, T=16, vocab=CFG.vocab_size, seed=1) -> torch.Tensor:
    return torch.randint(0, vocab, (B, T), generator=torch.Generator().manual_seed(seed))


def test_stackwise_forward_equals_whole_model():
    rack = make_rack()
    t = tokens()
    h = rack.ends.embed_tokens(t)
    for stack in rack.stacks:  # what training does: each stack fed the previous one's output
        h = stack(h)
    assert torch.equal(rack.ends.logits(h), rack(t))
    states = rack.hidden_states(t)
    assert len(states) == 3 and torch.equal(states[-1], h)


def test_sdpa_matches_reference_attention_in_outputs_and_gradients():
    ref, fast = make_rack(backend="reference"), make_rack(backend="sdpa")
    fast.load_state_dict(ref.state_dict())
    t = tokens(T=24)
    for causal in (True, False):
        lr, lf = ref(t, causal), fast(t, causal)
        assert torch.allclose(lr, lf, atol=1e-5), (lr - lf).abs().max()
    causal_lm_loss(ref(t), t).backward()
    causal_lm_loss(fast(t), t).backward()
    for (n, a), (_, b) in zip(ref.named_parameters(), fast.named_parameters()):
        assert torch.allclose(a.grad, b.grad, atol=1e-5), n


@pytest.mark.parametrize("backend", ["reference", "sdpa"])
def test_causal_model_cannot_see_the_future(backend):
    rack = make_rack(backend=backend)
    t = tokens(T=16)
    t2 = t.clone()
    t2[:, 10:] = (t2[:, 10:] + 1) % CFG.vocab_size
    a, b = rack(t), rack(t2)
    assert torch.allclose(a[:, :10], b[:, :10], atol=1e-6)
    assert not torch.allclose(a[:, 10:], b[:, 10:], atol=1e-3)


def test_identity_init_leaves_the_function_unchanged():
    rack = make_rack()
    t = tokens()
    before = rack(t)
    new = Stack(CFG, 2)
    new.init_weights("identity", total_blocks=5)
    grown = Rack(CFG, rack.ends, [*rack.stacks, new], [0, 1, 2])
    assert torch.equal(grown(t), before)
    left = Rack(CFG, rack.ends, [new, *rack.stacks], [2, 0, 1])
    assert torch.equal(left(t), before)
    # and it is not the identity by accident: random init does change the output
    other = Stack(CFG, 2)
    other.init_weights("random", total_blocks=5)
    assert not torch.allclose(Rack(CFG, rack.ends, [*rack.stacks, other], [0, 1, 2])(t), before)


def test_tied_embeddings_share_the_head():
    cfg = ModelConfig(vocab_size=50, d_model=16, n_heads=2, max_seq_len=8, tie_embeddings=True)
    ends = Ends(cfg)
    assert ends.head is None
    h = torch.randn(1, 3, 16)
    assert torch.allclose(ends.logits(h), ends.norm(h) @ ends.embed.weight.T)


def test_loss_is_next_token_prediction():
    B, T, V = 2, 5, 7
    t = torch.randint(0, V, (B, T))
    logits = torch.full((B, T, V), -1e4)
    logits[:, :-1].scatter_(-1, t[:, 1:, None], 1e4)  # a perfect predictor of the *next* token
    assert causal_lm_loss(logits, t).item() == pytest.approx(0.0, abs=1e-6)
    shifted = torch.full((B, T, V), -1e4).scatter_(-1, t[:, :, None], 1e4)  # predicts the current token
    assert causal_lm_loss(shifted, t).item() > 100


def test_config_rejects_bad_shapes_with_field_names():
    from stackwise_cli.schema import SchemaError

    with pytest.raises(SchemaError) as e:
        ModelConfig(d_model=30, n_heads=4)
    assert e.value.problems[0][0] == "n_heads"
    with pytest.raises(SchemaError) as e:
        ModelConfig(d_model=32, n_heads=4, n_kv_heads=3)
    assert e.value.problems[0][0] == "n_kv_heads"


def test_llama_tensor_names_are_unchanged():
    """Stored stacks and ends (and their Hugging Face names) depend on these exact names: the llama family must keep
    them whatever switches the other families add."""
    stack, ends = Stack(CFG, 1), Ends(CFG)
    assert list(stack.state_dict()) == [
        "blocks.0.attn_norm.weight",
        "blocks.0.attn.q.weight",
        "blocks.0.attn.k.weight",
        "blocks.0.attn.v.weight",
        "blocks.0.attn.o.weight",
        "blocks.0.mlp_norm.weight",
        "blocks.0.mlp.gate.weight",
        "blocks.0.mlp.up.weight",
        "blocks.0.mlp.down.weight",
    ]
    assert list(ends.state_dict()) == ["embed.weight", "norm.weight", "head.weight"]
    assert [p is ends.embed.weight for p in ends.input_parameters()] == [True]
    assert ends.output_parameters() == [ends.norm.weight, ends.head.weight]


def test_llama_init_draws_are_unchanged():
    """Random init consumes the generator in the same order as before the families existed (norms 1, no biases),
    so a seed gives the same llama weights as earlier releases."""
    stack = Stack(CFG, 2)
    stack.init_weights("random", total_blocks=4, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(0)
    for block in stack.blocks:
        want = {}  # the draws replayed in the old order; output projections are drawn twice, the last one stays
        for name, p in block.named_parameters():
            if name.endswith("norm.weight"):
                want[name] = torch.ones_like(p)
            else:
                want[name] = torch.empty_like(p).normal_(0.0, CFG.init_std, generator=g)
        for name in ("attn.o.weight", "mlp.down.weight"):
            want[name] = torch.empty_like(want[name]).normal_(0.0, CFG.init_std / (2 * 4) ** 0.5, generator=g)
        for name, p in block.named_parameters():
            assert torch.equal(p, want[name]), name
