"""Each kernel in ``kernels/`` against its torch reference: time, achieved bandwidth, and the device's measured
copy bandwidth as the ceiling to read it against; plus the fp8 cache's reconstruction error and size.

Achieved bandwidth = the bytes an op must move at least (each input read once, each output written once)
divided by its median time. Every op here is memory bound, so the fraction of copy bandwidth is the figure of
merit. On a device without the extension (a CPU) only the references are measured, and each row says so.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

from stackwise_cli.kernels import ops
from stackwise_cli.kernels.reference import add_rmsnorm_reference, rotary_backward_reference, rotary_reference
from stackwise_cli.store.e4m3 import fp8_dequantize_reference, fp8_quantize_reference

EPS = 1e-5
ROPE_THETA = 10000.0
# (tokens, width) per device: big enough to be bandwidth bound, small enough for a 2-core CPU in seconds.
SIZES = {"cpu": [(2048, 1024), (4096, 2048)], "cuda": [(8192, 4096), (32768, 4096), (16384, 5120)]}
HEAD_DIM = 128


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_s(fn: Callable[[], object], device: torch.device, repeats: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def copy_bandwidth_gb_s(device: torch.device, repeats: int = 5, warmup: int = 2) -> float:
    """``dst.copy_(src)`` of a large buffer: bytes read + bytes written over the median time, in GB/s."""
    n_bytes = (1 << 30) if device.type == "cuda" else (1 << 26)  # 1 GiB on a GPU, 64 MiB on a CPU
    src = torch.empty(n_bytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    t = _median_s(lambda: dst.copy_(src), device, repeats, warmup)
    return 2 * n_bytes / t / 1e9


def _rope(seq_len: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 1.0 / (ROPE_THETA ** (torch.arange(0, HEAD_DIM, 2, device=device, dtype=torch.float32) / HEAD_DIM))
    freqs = torch.outer(torch.arange(seq_len, device=device, dtype=torch.float32), inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)  # (T, D)
    return emb.cos(), emb.sin()


def _cases(tokens: int, width: int, dtype: torch.dtype, device: torch.device, use_kernel: bool):
    """(kernel name, bytes moved, reference callable, kernel callable or None) for one size and dtype."""
    elt = torch.finfo(dtype).bits // 8
    n = tokens * width
    gen = torch.Generator(device=device).manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=gen, device=device, dtype=torch.float32).to(dtype)

    ext = ops._extension_or_none() if use_kernel else None
    x, r, dy, dh = rand(tokens, width), rand(tokens, width), rand(tokens, width), rand(tokens, width)
    w = torch.ones(width, device=device)
    h, _ = add_rmsnorm_reference(x, r, w, EPS)
    rstd = torch.rsqrt(h.float().pow(2).mean(-1) + EPS)
    # read x, r, weight; write h, y, rstd
    yield (
        "add_rmsnorm fwd",
        4 * n * elt + 4 * width + 4 * tokens,
        lambda: add_rmsnorm_reference(x, r, w, EPS),
        ((lambda: ext.add_rmsnorm_forward(x, r, w, EPS)) if ext else None),
    )

    xg, rg, wg = x.clone().requires_grad_(), r.clone().requires_grad_(), w.clone().requires_grad_()
    hg, yg = add_rmsnorm_reference(xg, rg, wg, EPS)

    def ref_bwd():
        return torch.autograd.grad((hg, yg), (xg, rg, wg), (dh, dy), retain_graph=True)

    # read dy, dh, h, weight, rstd; write dx (the residual's gradient is the same tensor), dweight
    yield (
        "add_rmsnorm bwd",
        4 * n * elt + 8 * width + 4 * tokens,
        ref_bwd,
        ((lambda: ext.add_rmsnorm_backward(dy, dh, h, w, rstd)) if ext else None),
    )

    # Rotary: the same bytes as (B=1, H=width/128, T=tokens, 128) q and k (GQA-free), tables (T, 128) fp32.
    heads = width // HEAD_DIM
    q, k = rand(1, heads, tokens, HEAD_DIM), rand(1, heads, tokens, HEAD_DIM)
    cos, sin = _rope(tokens, device)
    rope_bytes = 4 * n * elt + 2 * cos.numel() * 4  # read q, k; write both; read both tables
    yield (
        "rotary fwd",
        rope_bytes,
        lambda: rotary_reference(q, k, cos, sin),
        ((lambda: ext.rotary(q, k, cos, sin, False)) if ext else None),
    )
    yield (
        "rotary bwd",
        rope_bytes,
        lambda: rotary_backward_reference(q, k, cos, sin),
        ((lambda: ext.rotary(q, k, cos, sin, True)) if ext else None),
    )

    codes, scales = fp8_quantize_reference(x)
    # read x; write codes (1 byte) and scales
    yield (
        "fp8 quantize",
        n * elt + n + 4 * tokens,
        lambda: fp8_quantize_reference(x),
        ((lambda: ext.fp8_quantize(x)) if ext else None),
    )
    yield (
        "fp8 dequantize",
        n + 4 * tokens + n * elt,
        lambda: fp8_dequantize_reference(codes, scales, dtype),
        ((lambda: ext.fp8_dequantize(codes, scales, dtype == torch.bfloat16)) if ext else None),
    )


def _row(device, name, impl, dtype, tokens, width, n_bytes, time_s, copy_gb_s, note) -> dict:
    gb_s = n_bytes / time_s / 1e9
    return {
        "device": str(device),
        "kernel": name,
        "impl": impl,
        "dtype": str(dtype).removeprefix("torch."),
        "tokens": tokens,
        "width": width,
        "bytes": n_bytes,
        "time_ms": round(time_s * 1e3, 4),
        "gb_per_s": round(gb_s, 2),
        "copy_gb_per_s": round(copy_gb_s, 2),
        "fraction_of_copy": round(gb_s / copy_gb_s, 3),
        "note": note,
    }


def fp8_cache_error(x: torch.Tensor) -> dict:
    """The fp8 cache's reconstruction error on x (tokens, width) and its size against bf16, as one flat dict."""
    codes, scales = ops.fp8_quantize(x)
    back = ops.fp8_dequantize(codes, scales, torch.float32)
    xf = x.float()
    err = (back - xf).abs()
    row_amax = xf.abs().amax(-1).clamp_min(torch.finfo(torch.float32).tiny)
    width = x.shape[-1]
    return {
        "device": str(x.device),
        "kernel": "fp8 cache error",
        "dtype": str(x.dtype).removeprefix("torch."),
        "tokens": x.shape[0],
        "width": width,
        "max_err_over_row_amax": float((err.amax(-1) / row_amax).max()),
        "mean_abs_err": float(err.mean()),
        "mean_abs_value": float(xf.abs().mean()),
        "fp8_bytes_per_value": 1 + 4 / width,  # the code, plus the row's fp32 scale shared by width values
        "bf16_bytes_per_value": 2.0,
        "size_saved_vs_bf16": round(1 - (1 + 4 / width) / 2, 4),
    }


def bench_kernels(device: str, repeats: int = 5, warmup: int = 2) -> list[dict]:
    """Every kernel and its reference on ``device`` for a few sizes in fp32 and bf16, as flat JSON-able dicts.

    On a device without the extension (a CPU, or CUDA where it does not build) only the references run and
    each row's ``note`` says so; the last rows give the fp8 cache's error and size on normal activations.
    """
    dev = torch.device(device)
    use_kernel = dev.type == "cuda" and ops.kernels_available()
    note = "" if use_kernel else f"references only: the CUDA kernels cannot run on {dev.type}"
    copy_gb_s = copy_bandwidth_gb_s(dev, repeats, warmup)
    rows = []
    for tokens, width in SIZES["cuda" if dev.type == "cuda" else "cpu"]:
        for dtype in (torch.float32, torch.bfloat16):
            for name, n_bytes, ref, kern in _cases(tokens, width, dtype, dev, use_kernel):
                t = _median_s(ref, dev, repeats, warmup)
                rows.append(_row(dev, name, "reference", dtype, tokens, width, n_bytes, t, copy_gb_s, note))
                if kern is not None:
                    t = _median_s(kern, dev, repeats, warmup)
                    rows.append(_row(dev, name, "cuda", dtype, tokens, width, n_bytes, t, copy_gb_s, note))
    gen = torch.Generator(device=dev).manual_seed(0)
    tokens, width = SIZES["cpu"][0]
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(tokens, width, generator=gen, device=dev).to(dtype)
        rows.append(fp8_cache_error(x))
    return rows


__all__ = ["bench_kernels", "copy_bandwidth_gb_s", "fp8_cache_error"]
