"""The CUDA kernels in kernels/ and their torch references (docs/kernels.md).

On every machine: the references are right (held to the model's own RMSNorm and apply_rope, to float64
autograd, and to the e4m3 error bound), each .cu compiles with nvcc where nvcc exists, and the public functions
fall back to the references on CPU. On CUDA only: kernel against reference, outputs and gradients.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from stackwise_cli.errors import StackwiseError
from stackwise_cli.kernels import (
    E4M3_MAX,
    add_rmsnorm,
    add_rmsnorm_reference,
    fp8_dequantize,
    fp8_dequantize_reference,
    fp8_quantize,
    fp8_quantize_reference,
    kernel_sources,
    load_extension,
    rotary,
    rotary_backward_reference,
    rotary_reference,
)
from stackwise_cli.model.attention import RMSNorm
from stackwise_cli.model.rope import apply_rope

KERNELS = Path(__file__).resolve().parents[1] / "kernels"
CU_FILES = sorted(KERNELS.glob("*.cu"))
needs_cuda = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="CUDA is absent: kernel vs reference tests need a GPU"
)
EPS = 1e-5


def rope(seq_len: int, dim: int, theta: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    emb = torch.outer(torch.arange(seq_len, dtype=torch.float64), inv_freq).repeat(1, 2)  # (T, D)
    return emb.cos().float(), emb.sin().float()


# ------------------------------------------------------------------------------------------------------------
# References (CPU)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_add_rmsnorm_reference_is_add_then_model_rmsnorm(dtype):
    g = torch.Generator().manual_seed(0)
    x, r = torch.randn(3, 7, 48, generator=g).to(dtype), torch.randn(3, 7, 48, generator=g).to(dtype)
    norm = RMSNorm(48, EPS).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(48, generator=g) + 0.5)
    h, y = add_rmsnorm_reference(x, r, norm.weight, EPS)
    assert torch.equal(h, x + r)
    assert y.dtype == dtype
    assert torch.equal(y, norm(x + r))


def test_add_rmsnorm_reference_gradients_match_float64():
    g = torch.Generator().manual_seed(1)
    x, r = torch.randn(5, 37, generator=g, dtype=torch.float64), torch.randn(5, 37, generator=g, dtype=torch.float64)
    w = torch.rand(37, generator=g, dtype=torch.float64) + 0.5
    dh, dy = torch.randn(5, 37, generator=g, dtype=torch.float64), torch.randn(5, 37, generator=g, dtype=torch.float64)

    def grads(dtype):
        leaves = [t.to(dtype).requires_grad_() for t in (x, r, w)]
        h, y = add_rmsnorm_reference(*leaves, EPS)
        return torch.autograd.grad((h, y), leaves, (dh.to(dtype), dy.to(dtype)))

    for got, want in zip(grads(torch.float32), grads(torch.float64)):
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    # The closed form the CUDA backward uses, in float64: dh = rstd * (g - n * mean(g * n)) + dh_out.
    hd = x + r
    rstd = torch.rsqrt(hd.pow(2).mean(-1, keepdim=True) + EPS)
    n, gw = hd * rstd, dy * w
    dx = rstd * (gw - n * (gw * n).mean(-1, keepdim=True)) + dh
    # (The reference normalises in fp32 whatever the input, as the model does, hence fp32 tolerances here.)
    want = grads(torch.float64)
    torch.testing.assert_close(dx, want[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(dx, want[1], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close((dy * n).sum(0), want[2], rtol=1e-5, atol=1e-6)


def test_rotary_reference_is_apply_rope_and_backward_is_rotation_by_minus_angle():
    g = torch.Generator().manual_seed(2)
    cos, sin = rope(11, 24)
    q, k = torch.randn(2, 4, 11, 24, generator=g), torch.randn(2, 2, 11, 24, generator=g)  # GQA: fewer k heads
    qo, ko = rotary_reference(q, k, cos, sin)
    assert torch.equal(qo, apply_rope(q, cos, sin)) and torch.equal(ko, apply_rope(k, cos, sin))
    qg, kg = q.clone().requires_grad_(), k.clone().requires_grad_()
    gq, gk = torch.randn_like(q), torch.randn_like(k)
    dq, dk = torch.autograd.grad(rotary_reference(qg, kg, cos, sin), (qg, kg), (gq, gk))
    bq, bk = rotary_backward_reference(gq, gk, cos, sin)
    torch.testing.assert_close(dq, bq)
    torch.testing.assert_close(dk, bk)
    # Rotating back undoes the rotation (a rotation is orthogonal).
    torch.testing.assert_close(rotary_backward_reference(qo, ko, cos, sin), (q, k), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fp8_roundtrip_within_e4m3_bound(dtype):
    """e4m3 has 3 mantissa bits, so round to nearest is off by at most half a spacing: 2^-4 of the value for
    normals, and half the subnormal spacing 2^-9, i.e. 2^-10, below 2^-6 (in units of the scale). The largest
    spacing used is 32 (values in [256, 448]), so no element is off by more than 16/448 = 1/28 of its row's amax.
    The slack covers the fp32 divide and multiply."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(64, 200, generator=g) * torch.logspace(-4, 4, 64)[:, None]  # rows of very different size
    x = x.to(dtype)
    x[5] = 0.0  # an all-zero row
    codes, scales = fp8_quantize_reference(x)
    assert codes.dtype == torch.uint8 and codes.shape == x.shape
    assert scales.dtype == torch.float32 and scales.shape == (64,) and bool((scales > 0).all())
    assert scales[5] == 1.0 and bool((codes[5] == 0).all())
    back = fp8_dequantize_reference(codes, scales, torch.float32)
    xf = x.float()
    err = (back - xf).abs()
    slack = 1 + 1e-6
    assert bool((err <= (2**-4 * xf.abs() + 2**-10 * scales[:, None]) * slack).all())
    assert bool((err.amax(-1) <= xf.abs().amax(-1) / 28 * slack).all())
    # The row amax maps to the code 448, which decodes back to the amax (up to the fp32 divide and multiply).
    torch.testing.assert_close(back.abs().amax(-1), xf.abs().amax(-1), rtol=1e-6, atol=0)
    assert bool((codes.view(torch.float8_e4m3fn).float().abs().amax(-1)[xf.abs().amax(-1) > 0] == E4M3_MAX).all())
    assert fp8_dequantize_reference(codes, scales).dtype == torch.bfloat16


# ------------------------------------------------------------------------------------------------------------
# Builds and dispatch (CPU)


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not on PATH: cannot compile-check the kernels")
@pytest.mark.parametrize("cu", CU_FILES, ids=lambda p: p.name)
def test_cu_file_compiles_with_nvcc(cu, tmp_path):
    result = subprocess.run(
        ["nvcc", "-c", "-arch=sm_90", str(cu), "-o", str(tmp_path / "out.o")], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr


def test_every_kernel_is_a_source_of_the_extension():
    names = {p.name for p in kernel_sources()}
    assert {"add_rmsnorm.cu", "rotary.cu", "fp8_cache.cu", "binding.cpp"} <= names


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: the extension loads here")
def test_load_extension_without_cuda_raises_one_line():
    with pytest.raises(StackwiseError) as info:
        load_extension()
    assert "CUDA is absent" in str(info.value)
    assert "\n" not in str(info.value)


def test_public_functions_fall_back_to_references_on_cpu():
    g = torch.Generator().manual_seed(4)
    x, r, w = torch.randn(4, 40, generator=g), torch.randn(4, 40, generator=g), torch.rand(40, generator=g)
    for got, want in zip(add_rmsnorm(x, r, w, EPS), add_rmsnorm_reference(x, r, w, EPS)):
        assert torch.equal(got, want)
    cos, sin = rope(6, 16)
    q, k = torch.randn(1, 2, 6, 16, generator=g), torch.randn(1, 1, 6, 16, generator=g)
    for got, want in zip(rotary(q, k, cos, sin), rotary_reference(q, k, cos, sin)):
        assert torch.equal(got, want)
    codes, scales = fp8_quantize(x)
    want_codes, want_scales = fp8_quantize_reference(x)
    assert torch.equal(codes, want_codes) and torch.equal(scales, want_scales)
    assert torch.equal(
        fp8_dequantize(codes, scales, torch.float32), fp8_dequantize_reference(codes, scales, torch.float32)
    )


def test_bench_kernels_on_cpu_rows_are_flat(monkeypatch):
    from stackwise_cli.bench import kernels as bench

    monkeypatch.setitem(bench.SIZES, "cpu", [(64, 256)])  # keep the test fast: the recorded tables use real sizes
    rows = bench.bench_kernels("cpu", repeats=1, warmup=0)
    timed = [row for row in rows if "gb_per_s" in row]
    assert {row["kernel"] for row in timed} >= {"add_rmsnorm fwd", "rotary fwd", "fp8 quantize", "fp8 dequantize"}
    assert all(row["impl"] == "reference" and "references only" in row["note"] for row in timed)
    assert all(isinstance(v, (int, float, str)) for row in rows for v in row.values())
    errors = [row for row in rows if row["kernel"] == "fp8 cache error"]
    assert errors and all(row["max_err_over_row_amax"] <= 1 / 28 * (1 + 1e-6) for row in errors)


# ------------------------------------------------------------------------------------------------------------
# Kernel against reference (CUDA)

SHAPES = [(1, 64), (7, 100), (33, 1000), (128, 4096), (5, 5120)]  # non-powers of 2, one row, wide rows
TOL = {torch.float32: {"rtol": 1e-5, "atol": 1e-5}, torch.bfloat16: {"rtol": 2e-2, "atol": 2e-2}}


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
def test_add_rmsnorm_kernel_matches_reference(shape, dtype):
    g = torch.Generator(device="cuda").manual_seed(5)
    x, r, dh, dy = (torch.randn(*shape, generator=g, device="cuda").to(dtype) for _ in range(4))
    w = torch.rand(shape[-1], generator=g, device="cuda") + 0.5

    def run(fn):
        leaves = [t.clone().requires_grad_() for t in (x, r, w)]
        h, y = fn(*leaves, EPS)
        return (h, y, *torch.autograd.grad((h, y), leaves, (dh, dy)))

    got, want = run(add_rmsnorm), run(add_rmsnorm_reference)
    assert torch.equal(got[0], want[0])  # h = x + r, one rounding either way
    # y, dx, dresidual elementwise; dweight sums over rows, and the bf16 reference accumulates it in bf16,
    # so its tolerance grows with the number of rows.
    for a, b in zip(got[1:4], want[1:4]):
        torch.testing.assert_close(a.float(), b.float(), **TOL[dtype])
    rows = x.numel() // shape[-1]
    torch.testing.assert_close(got[4], want[4], rtol=5 * TOL[dtype]["rtol"], atol=rows * TOL[dtype]["atol"])


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dims", [(2, 4, 2, 17, 64), (1, 3, 3, 129, 96), (3, 8, 1, 5, 128)])
def test_rotary_kernel_matches_reference(dims, dtype):
    B, H, Hkv, T, D = dims
    g = torch.Generator(device="cuda").manual_seed(6)
    cos, sin = (t.cuda() for t in rope(T, D))
    q = torch.randn(B, H, T, D, generator=g, device="cuda").to(dtype)
    k = torch.randn(B, Hkv, T, D, generator=g, device="cuda").to(dtype)
    gq, gk = torch.randn_like(q), torch.randn_like(k)

    def run(fn):
        qq, kk = q.clone().requires_grad_(), k.clone().requires_grad_()
        out = fn(qq, kk, cos, sin)
        return (*out, *torch.autograd.grad(out, (qq, kk), (gq, gk)))

    # bf16: the reference rounds after each multiply and the add, the kernel once: a few bf16 ulps apart.
    for a, b in zip(run(rotary), run(rotary_reference)):
        torch.testing.assert_close(a.float(), b.float(), **TOL[dtype])


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
def test_fp8_kernel_matches_reference(shape, dtype):
    g = torch.Generator(device="cuda").manual_seed(7)
    x = (torch.randn(*shape, generator=g, device="cuda") * 3).to(dtype)
    x[0] = 0.0
    codes, scales = fp8_quantize(x)
    want_codes, want_scales = fp8_quantize_reference(x)
    torch.testing.assert_close(scales, want_scales, rtol=0, atol=0)
    assert torch.equal(codes, want_codes)  # same division, same round-to-nearest-even
    for out in (torch.float32, torch.bfloat16):
        assert torch.equal(fp8_dequantize(codes, scales, out), fp8_dequantize_reference(codes, scales, out))


# ------------------------------------------------------------------------- the `kernels` attention backend


def _stacks(backend: str):
    from stackwise_cli.model.config import AttentionConfig, ModelConfig
    from stackwise_cli.model.model import Stack

    cfg = ModelConfig(vocab_size=64, d_model=32, n_heads=4, n_kv_heads=2, d_ff=64, max_seq_len=16, init_std=0.1)
    torch.manual_seed(0)
    ref = Stack(cfg, 2, AttentionConfig(kind="gqa", backend="sdpa"))
    ref.init_weights("random", total_blocks=2)
    for block in ref.blocks:  # norms away from 1, so a fused norm with the wrong weight would show
        block.mlp_norm.weight.data.uniform_(0.5, 1.5)
    other = Stack(cfg, 2, AttentionConfig(kind="gqa", backend=backend))
    other.load_state_dict(ref.state_dict())
    return ref, other


def test_kernels_backend_is_refused_where_it_cannot_run():
    from stackwise_cli.errors import StackwiseError

    _, stack = _stacks("kernels")
    with pytest.raises(StackwiseError, match="needs a CUDA device"):
        stack(torch.randn(1, 8, 32))


def test_kernels_backend_wiring_equals_the_plain_block(monkeypatch):
    """The block with fused add + RMSNorm and the RoPE op computes what the plain block does. Off CUDA the ops
    run their references, so this checks the wiring (which tensors go where), not the CUDA code."""
    import stackwise_cli.model.attention as attention

    monkeypatch.setattr(attention, "kernels_missing", lambda dev: None)
    ref, fused = _stacks("kernels")
    x = torch.randn(2, 12, 32, requires_grad=True)
    x2 = x.detach().clone().requires_grad_(True)
    a, b = ref(x), fused(x2)
    assert torch.allclose(a, b, atol=1e-5)
    a.square().sum().backward()
    b.square().sum().backward()
    assert torch.allclose(x.grad, x2.grad, atol=1e-5)
    for (n, p), (_, q) in zip(ref.named_parameters(), fused.named_parameters()):
        assert torch.allclose(p.grad, q.grad, atol=1e-5), n
