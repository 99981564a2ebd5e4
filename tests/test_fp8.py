"""fp8 training matmuls (train/fp8.py): the emulated path against an independent reference, its error bound, the
straight-through gradients, parameter sharing, path resolution, and a short training run against fp32."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from stackwise_cli.errors import StackwiseError
from stackwise_cli.model.config import ModelConfig
from stackwise_cli.model.model import Ends, Rack, Stack, causal_lm_loss
from stackwise_cli.store.e4m3 import fp8_dequantize_reference, fp8_quantize_reference
from stackwise_cli.train.fp8 import Fp8Linear, fp8_linear, quantize_e4m3, resolve_fp8_path, to_fp8

U = 2.0**-4  # e4m3 unit roundoff: 3 mantissa bits, round to nearest
SUBNORMAL_ERR = 2.0**-10  # half the e4m3 subnormal spacing (2^-9), in units of the scale


def _dq(codes_u8: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    return fp8_dequantize_reference(codes_u8, scales, torch.float32)


def _data(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 5, 64, generator=g) * torch.logspace(-2, 1, 64)  # per-feature magnitudes over 3 decades
    w = torch.randn(48, 64, generator=g) * 0.05
    b = torch.randn(48, generator=g) * 0.1
    return x, w, b


def test_quantize_row_is_the_reference_quantizer():
    x, w, _ = _data()
    for t in (x, w, torch.zeros(4, 8)):
        codes, scales = quantize_e4m3(t, "row")
        ref_codes, ref_scales = fp8_quantize_reference(t)
        assert torch.equal(codes.view(torch.uint8), ref_codes)
        assert torch.equal(scales[..., 0], ref_scales)


def test_emulated_forward_equals_independent_reference():
    x, w, b = _data()
    cx, sx = fp8_quantize_reference(x)  # per token
    cw, sw = fp8_quantize_reference(w)  # per output row
    expected = _dq(cx, sx) @ _dq(cw, sw).t() + b
    assert torch.equal(fp8_linear(x, w, b, "row", "emulate"), expected)

    # Per-tensor weight scale: one amax for the whole matrix, quantised here by hand.
    s = w.abs().amax() / 448.0
    wq = (w / s).to(torch.float8_e4m3fn).float() * s
    assert torch.equal(fp8_linear(x, w, None, "tensor", "emulate"), _dq(cx, sx) @ wq.t())


@pytest.mark.parametrize("scaling", ["row", "tensor"])
def test_error_against_fp32_within_the_e4m3_bound(scaling):
    """Each quantised element is within u |v| + 2^-10 scale of v (u = 2^-4; the second term covers subnormals), so
    |y8 - y| <= sum_k ex_k |w_k| + |x_k| ew_k + ex_k ew_k, plus fp32 accumulation slack."""
    x, w, _ = _data()
    y8 = fp8_linear(x, w, None, scaling, "emulate")
    y = x @ w.t()
    _, sx = quantize_e4m3(x, "row")
    _, sw = quantize_e4m3(w, scaling)
    ex = U * x.abs() + SUBNORMAL_ERR * sx  # (3, 5, 64)
    ew = U * w.abs() + SUBNORMAL_ERR * sw  # (48, 64)
    bound = ex @ w.abs().t() + x.abs() @ ew.t() + ex @ ew.t() + 1e-5 * (x.abs() @ w.abs().t())
    assert ((y8 - y).abs() <= bound).all()
    rel = ((y8 - y).norm() / y.norm()).item()
    assert 1e-3 < rel < U, rel  # it did quantise; measured 3.2% for both scalings


def test_straight_through_gradients():
    x, w, b = _data()
    x, w, b = x.requires_grad_(True), w.requires_grad_(True), b.requires_grad_(True)
    g = torch.randn(3, 5, 48)
    gx, gw, gb = torch.autograd.grad(fp8_linear(x, w, b, "row", "emulate"), (x, w, b), g)
    # Exactly the matmul gradients of the dequantised values the forward used.
    cx, sx = fp8_quantize_reference(x.detach())
    cw, sw = fp8_quantize_reference(w.detach())
    assert torch.equal(gx, g @ _dq(cw, sw))
    assert torch.equal(gw, g.reshape(-1, 48).t() @ _dq(cx, sx).reshape(-1, 64))
    torch.testing.assert_close(gb, g.sum((0, 1)))
    # And close to the fp32 gradients.
    rx, rw, _ = torch.autograd.grad(F.linear(x, w, b), (x, w, b), g)
    for got, ref in ((gx, rx), (gw, rw)):
        assert F.cosine_similarity(got.flatten(), ref.flatten(), dim=0) > 0.998
        assert (got - ref).norm() / ref.norm() < U


def test_to_fp8_shares_parameters_and_state_dict():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 8, bias=False))
    params_before = list(model.parameters())
    keys_before = list(model.state_dict())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)  # built before the swap
    to_fp8(model, scaling="tensor")
    assert isinstance(model[0], Fp8Linear) and isinstance(model[2], Fp8Linear) and model[0].scaling == "tensor"
    assert all(a is b for a, b in zip(params_before, model.parameters(), strict=True))
    assert list(model.state_dict()) == keys_before
    w0 = model[0].weight.detach().clone()
    model(torch.randn(4, 16)).square().sum().backward()
    opt.step()
    assert not torch.equal(model[0].weight, w0)  # the optimizer moved the weight the fp8 layer uses
    assert model[2].bias is None


def test_fp8_linear_is_an_nn_linear_with_its_state_dict():
    lin = Fp8Linear(8, 4)
    ref = torch.nn.Linear(8, 4)
    ref.load_state_dict(lin.state_dict())
    assert set(lin.state_dict()) == {"weight", "bias"} and lin.weight.dtype == torch.float32
    with pytest.raises(StackwiseError, match="row, tensor"):
        Fp8Linear(8, 4, scaling="block")


def test_output_follows_autocast_dtype():
    x, w, b = _data()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = fp8_linear(x, w, b, "row", "emulate")  # the matmul itself stays fp32: no slow CPU bf16 matmul
    assert y.dtype == torch.bfloat16
    assert torch.equal(y, fp8_linear(x, w, b, "row", "emulate").to(torch.bfloat16))


def test_resolve_path(monkeypatch):
    assert resolve_fp8_path("cpu") == "emulate"
    assert resolve_fp8_path("cpu", "emulate") == "emulate"
    with pytest.raises(StackwiseError, match="needs a CUDA GPU"):
        resolve_fp8_path("cpu", "scaled_mm")
    with pytest.raises(StackwiseError, match="auto, emulate, scaled_mm"):
        resolve_fp8_path("cpu", "fast")
    # A CUDA GPU without fp8 tensor cores (an A100, sm_80): auto and scaled_mm both refuse, emulate runs.
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100")
    for path in ("auto", "scaled_mm"):
        with pytest.raises(StackwiseError, match=r"sm_89 or newer\); NVIDIA A100 is sm_80"):
            resolve_fp8_path("cuda", path)
    assert resolve_fp8_path("cuda", "emulate") == "emulate"
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert resolve_fp8_path("cuda") == "scaled_mm"


def _train(fp8: bool, steps: int = 25) -> list[float]:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=64, d_model=32, n_heads=4, d_ff=64, max_seq_len=16)
    ends, stack = Ends(cfg), Stack(cfg, 2)
    ends.init_weights()
    stack.init_weights("random", 2)
    if fp8:
        to_fp8(stack)
    rack = Rack(cfg, ends, [stack], [0])
    opt = torch.optim.AdamW(rack.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(1)
    # Learnable data: each sequence counts up from a random start, modulo the vocabulary.
    starts = torch.randint(0, 64, (8, 1), generator=g)
    tokens = (starts + torch.arange(16)) % 64  # (8, 16)
    losses = []
    for _ in range(steps):
        loss = causal_lm_loss(rack(tokens), tokens)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_training_with_fp8_tracks_fp32():
    """Measured: 4.14 -> 0.0608 (fp32) and 4.14 -> 0.0616 (fp8) in 25 steps; the curves agree to ~1% throughout."""
    ref, fp8 = _train(False), _train(True)
    assert ref[-1] < 0.1 * ref[0]  # the task is learnable in 25 steps
    assert 0.8 * ref[-1] < fp8[-1] < 1.25 * ref[-1], (ref[-1], fp8[-1])
    assert all(abs(a - b) < 0.1 * a + 0.02 for a, b in zip(ref, fp8, strict=True))


@pytest.mark.skipif(
    not (torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9)),
    reason="torch._scaled_mm needs a CUDA GPU with fp8 tensor cores (sm_89+)",
)
def test_scaled_mm_matches_emulation_on_gpu():
    x, w, b = (t.cuda() for t in _data())
    x = x[:, :4]  # 12 tokens: not a multiple of 16, exercises the padding
    for scaling in ("row", "tensor"):
        emu = fp8_linear(x, w, b, scaling, "emulate")
        fast = fp8_linear(x, w, b, scaling, "scaled_mm")
        assert fast.dtype == torch.float32
        torch.testing.assert_close(fast, emu, rtol=1e-2, atol=1e-3)  # bf16 output of the fp8 kernel
