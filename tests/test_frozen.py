"""Frozen stacks in a storage precision (train/frozen.py): error against fp32, gradients through, bytes held, and
activation checkpointing.

Errors are measured on the stack's *update* to the residual stream, y - x, not on y: the residual dominates y, so
an error relative to y would be tiny whatever the quantisation did. Measured on this fixture (d=64, 2 blocks,
init_std 0.02), llama / gpt2 (whose random biases make up much of the update): bf16 0.25% / 0.06%, fp8 4.0% / 0.9%,
nf4 14% / 3.1%, fp4 19% / 4.1%; input-gradient cosines >= 0.999 (fp8), >= 0.98 (4-bit). See docs/precision.md.
The bounds below leave ~1.3-2x room; the lower bounds check that the quantisation really happened.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from stackwise_cli.errors import StackwiseError
from stackwise_cli.model.config import ModelConfig
from stackwise_cli.model.model import Stack
from stackwise_cli.store.e4m3 import fp8_quantize_reference
from stackwise_cli.train.frozen import FrozenLinear, checkpoint_blocks, freeze, frozen_bytes

# dtype -> (max relative error of y - x, min cosine of the input gradient through the blocks, min relative error)
TOLERANCES = {
    "fp32": (0.0, 1.0 - 1e-6, 0.0),
    "bf16": (1e-2, 0.99, 1e-4),
    "fp8": (0.06, 0.99, 5e-3),
    "nf4": (0.2, 0.9, 0.01),
    "fp4": (0.25, 0.9, 0.01),
}


def _stack(family: str = "llama", seed: int = 0) -> Stack:
    torch.manual_seed(seed)
    cfg = ModelConfig(family=family, vocab_size=512, d_model=64, n_heads=4, n_kv_heads=2, d_ff=128, max_seq_len=32)
    stack = Stack(cfg, 2)
    stack.init_weights("random", 4)
    for name, p in stack.named_parameters():
        if name.endswith("bias"):  # init gives zero biases: make them matter
            torch.nn.init.normal_(p, 0.0, 0.02)
    return stack


def _linear_params(stack: Stack) -> tuple[int, int]:
    """(weights in the blocks' linear layers, all other parameters)."""
    lin = sum(m.weight.numel() for m in stack.modules() if isinstance(m, torch.nn.Linear))
    return lin, sum(p.numel() for p in stack.parameters()) - lin


def _run(stack, x, g):
    """(y, dL/dx minus the identity path's g) for L = <y, g>: the gradient that went through the blocks."""
    x = x.detach().requires_grad_(True)
    y = stack(x)
    (gx,) = torch.autograd.grad(y, x, g)
    return y.detach(), gx - g


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("dtype", list(TOLERANCES))
def test_frozen_close_to_fp32_and_gradient_flows_to_input(dtype, family):
    ref = _stack(family)
    frozen = freeze(copy.deepcopy(ref), dtype)
    torch.manual_seed(1)
    x = torch.randn(2, 32, 64)
    g = torch.randn(2, 32, 64)
    y_ref, gx_ref = _run(ref, x, g)
    y, gx = _run(frozen, x, g)

    max_err, min_cos, min_err = TOLERANCES[dtype]
    err = ((y - y_ref).norm() / (y_ref - x).norm()).item()
    assert min_err <= err <= max_err, f"{dtype}: relative error of y - x is {err:.4f}"
    cos = F.cosine_similarity(gx.flatten(), gx_ref.flatten(), dim=0).item()
    assert cos >= min_cos, f"{dtype}: input-gradient cosine {cos:.4f}"
    assert all(not p.requires_grad and p.grad is None for p in frozen.parameters())
    assert all(not b.requires_grad for b in frozen.buffers())


@pytest.mark.parametrize("dtype", ["bf16", "fp8", "nf4"])
def test_trainable_stack_learns_through_a_frozen_suffix(dtype):
    """Right-to-left curriculum: the new (left) stack's gradient passes through the frozen (right) one."""
    left, right = _stack(seed=0), freeze(_stack(seed=1), dtype)
    x = torch.randn(2, 16, 64)
    right(left(x)).square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in left.parameters())
    assert all(p.grad is None for p in right.parameters())


def test_linears_swapped_and_norms_stay_fp32():
    frozen = freeze(_stack("gpt2"), "fp8")
    block = frozen.blocks[0]
    assert isinstance(block.mlp.up, FrozenLinear) and isinstance(block.attn.q, FrozenLinear)
    assert block.mlp.up.qweight.dtype == torch.float8_e4m3fn and block.mlp.up.bias.dtype == torch.float32
    assert not any(isinstance(m, torch.nn.Linear) for m in frozen.modules())
    assert block.attn_norm.weight.dtype == torch.float32 and block.attn_norm.bias.dtype == torch.float32


def test_fp8_storage_is_the_reference_quantisation():
    ref = _stack()
    w = ref.blocks[0].mlp.down.weight.detach().clone()
    lin = freeze(ref, "fp8").blocks[0].mlp.down
    codes, scales = fp8_quantize_reference(w)
    assert torch.equal(lin.qweight.view(torch.uint8), codes)
    assert torch.equal(lin.scale[:, 0], scales)
    assert torch.equal(lin.weight, codes.view(torch.float8_e4m3fn).float() * scales[:, None])


def test_frozen_bytes():
    lin, other = _linear_params(_stack())
    n_linear = sum(isinstance(m, torch.nn.Linear) for m in _stack().modules())
    rows = sum(m.out_features for m in _stack().modules() if isinstance(m, torch.nn.Linear))
    assert frozen_bytes(freeze(_stack(), "fp32")) == 4 * (lin + other)
    assert frozen_bytes(freeze(_stack(), "bf16")) == 2 * lin + 4 * other  # half the weights' bytes
    assert frozen_bytes(freeze(_stack(), "fp8")) == lin + 4 * rows + 4 * other  # 1 byte each + a scale per row
    for dtype in ("nf4", "fp4"):
        n = frozen_bytes(freeze(_stack(), dtype)) - 4 * other
        # 4 bits each, an 8-bit absmax per 64 weights, then per layer the code tables (16 + 256 fp32) and the
        # fp32 absmax of the absmaxes: 1/8 of fp32 plus scales.
        assert lin // 2 + lin // 64 <= n <= lin // 2 + lin // 64 + n_linear * (4 * (16 + 256) + 64), (dtype, n)


def test_bad_dtype_is_an_error():
    with pytest.raises(StackwiseError, match="fp32, bf16, fp8, nf4, fp4"):
        freeze(_stack(), "int8")


def _saved_bytes(fn):
    """fn()'s output and the bytes autograd saved for backward while it ran."""
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, total


def test_checkpointed_matches_plain_and_saves_less():
    stack = _stack("llama")
    x = torch.randn(2, 32, 64, requires_grad=True)
    y, plain_bytes = _saved_bytes(lambda: stack(x, True))
    yc, ckpt_bytes = _saved_bytes(lambda: checkpoint_blocks(stack)(x, True))
    assert torch.equal(y, yc)
    g = torch.randn_like(y)
    (gx,) = torch.autograd.grad(y, x, g, retain_graph=True)
    (gxc,) = torch.autograd.grad(yc, x, g)
    assert torch.equal(gx, gxc)
    # Plain: every activation inside both blocks; checkpointed: only the block inputs (recomputed in backward).
    assert ckpt_bytes < plain_bytes / 4, (ckpt_bytes, plain_bytes)
    assert isinstance(stack.blocks[0], type(_stack().blocks[0]))  # the blocks stay the modules they were


def test_checkpointed_parameter_gradients_and_frozen_stack():
    trained = _stack()
    x = torch.randn(2, 16, 64)
    trained(x).square().sum().backward()
    expected = [p.grad.clone() for p in trained.parameters()]
    trained.zero_grad()
    checkpoint_blocks(trained)(x).square().sum().backward()
    assert all(torch.equal(a, b) for a, b in zip(expected, (p.grad for p in trained.parameters()), strict=True))

    frozen = freeze(_stack(), "nf4")
    xr = x.clone().requires_grad_(True)
    (ga,) = torch.autograd.grad(frozen(xr).sum(), xr)
    (gb,) = torch.autograd.grad(checkpoint_blocks(frozen)(xr).sum(), xr)
    torch.testing.assert_close(ga, gb)


def test_checkpointed_with_time_embedding():
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=512, d_model=32, n_heads=4, d_ff=64, max_seq_len=16, time_embedding=True)
    stack = Stack(cfg, 2)
    stack.init_weights("random", 2)
    torch.nn.init.normal_(stack.time.out.weight, 0.0, 0.02)  # starts at 0: make the time signal matter
    x, t = torch.randn(2, 16, 32), torch.rand(2)
    assert torch.equal(stack(x, True, t), checkpoint_blocks(copy.deepcopy(stack))(x, True, t))
    frozen = freeze(copy.deepcopy(stack), "nf4")  # the time network stays fp32 and still runs
    assert frozen.time.inp.weight.dtype == torch.float32
    assert frozen(x, True, t).shape == x.shape
