"""The public kernel functions: the CUDA kernel where it can run, else the torch reference.

Dispatch, per call: a CUDA tensor on a machine where the extension loads -> the kernel (through an autograd
function where the op has a gradient); anything else (a CPU tensor, or CUDA without a working extension) ->
the reference in :mod:`stackwise_cli.kernels.reference` (fp8: :mod:`stackwise_cli.store.e4m3`). A CUDA machine
whose extension fails to build logs the error once as a warning and uses the references, so a broken toolchain
slows a run rather than killing it; ``load_extension()`` raises the error itself.
"""

from __future__ import annotations

import functools
import logging

import torch

from stackwise_cli.errors import StackwiseError
from stackwise_cli.kernels.build import load_extension
from stackwise_cli.kernels.reference import add_rmsnorm_reference, rotary_reference
from stackwise_cli.store.e4m3 import fp8_dequantize_reference, fp8_quantize_reference

log = logging.getLogger(__name__)
KERNEL_DTYPES = (torch.float32, torch.bfloat16)


@functools.cache
def _extension_or_none():
    try:
        return load_extension()
    except StackwiseError as err:
        if torch.cuda.is_available():
            log.warning("stackwise kernels unavailable, using the torch references: %s", err)
        return None


def kernels_available() -> bool:
    """True when the CUDA extension is built (or builds now) and loads."""
    return torch.cuda.is_available() and _extension_or_none() is not None


def _use_kernel(*tensors: torch.Tensor) -> bool:
    return all(t.is_cuda and t.dtype in KERNEL_DTYPES for t in tensors) and kernels_available()


class AddRMSNorm(torch.autograd.Function):
    """Fused h = x + residual, y = RMSNorm(h) * weight on CUDA; gradients for x, residual and weight."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float):
        ext = _extension_or_none()
        wf = weight.float().contiguous()
        h, y, rstd = ext.add_rmsnorm_forward(x.contiguous(), residual.contiguous(), wf, float(eps))
        ctx.save_for_backward(h, wf, rstd)
        ctx.weight_dtype = weight.dtype
        return h, y

    @staticmethod
    def backward(ctx, dh: torch.Tensor | None, dy: torch.Tensor | None):
        h, wf, rstd = ctx.saved_tensors
        ext = _extension_or_none()
        dy = torch.zeros_like(h) if dy is None else dy.contiguous()
        dh = None if dh is None else dh.contiguous()
        dx, dw = ext.add_rmsnorm_backward(dy, dh, h, wf, rstd)
        return dx, dx, dw.to(ctx.weight_dtype), None


class Rotary(torch.autograd.Function):
    """RoPE on q and k in one CUDA launch; the backward is the rotation by -angle, also one launch."""

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        ext = _extension_or_none()
        cos, sin = cos.float().contiguous(), sin.float().contiguous()
        ctx.save_for_backward(cos, sin)
        ctx.q_shape, ctx.k_shape, ctx.dtype = q.shape, k.shape, q.dtype
        q_out, k_out = ext.rotary(q.contiguous(), k.contiguous(), cos, sin, False)
        return q_out, k_out

    @staticmethod
    def backward(ctx, gq: torch.Tensor | None, gk: torch.Tensor | None):
        cos, sin = ctx.saved_tensors
        ext = _extension_or_none()
        # An output that received no gradient contributes zeros (q and k may be different shapes: GQA).
        gq = torch.zeros(ctx.q_shape, dtype=ctx.dtype, device=cos.device) if gq is None else gq.contiguous()
        gk = torch.zeros(ctx.k_shape, dtype=ctx.dtype, device=cos.device) if gk is None else gk.contiguous()
        dq, dk = ext.rotary(gq, gk, cos, sin, True)
        return dq, dk, None, None


def add_rmsnorm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(h, y): h = x + residual (the residual stream), y = RMSNorm(h) * weight in h's dtype. x, residual (..., D).

    The fused kernel on CUDA (fp32/bf16, x and residual of one dtype and shape), else :func:`add_rmsnorm_reference`.
    """
    if x.shape == residual.shape and x.dtype == residual.dtype and _use_kernel(x, residual, weight):
        return AddRMSNorm.apply(x, residual, weight, eps)
    return add_rmsnorm_reference(x, residual, weight, eps)


def rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE ("rotate half") on q (..., T, D) and k (..., T, D) with tables cos, sin (T, D), as ``apply_rope``.

    One CUDA launch for both (fp32/bf16, same dtype), else :func:`rotary_reference`.
    """
    if q.dtype == k.dtype and _use_kernel(q, k, cos, sin):
        return Rotary.apply(q, k, cos, sin)
    return rotary_reference(q, k, cos, sin)


def fp8_quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token e4m3: (codes uint8 (..., D), scales fp32 (...)), scale = row amax / 448. No gradient (a cache)."""
    if _use_kernel(x):
        return _extension_or_none().fp8_quantize(x.detach().contiguous())
    return fp8_quantize_reference(x.detach())


def fp8_dequantize(codes: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """The values of :func:`fp8_quantize`'s codes and scales, in ``dtype`` (fp32 or bf16)."""
    if dtype in KERNEL_DTYPES and codes.is_cuda and scales.is_cuda and kernels_available():
        return _extension_or_none().fp8_dequantize(
            codes.contiguous(), scales.float().contiguous(), dtype == torch.bfloat16
        )
    return fp8_dequantize_reference(codes, scales, dtype)
