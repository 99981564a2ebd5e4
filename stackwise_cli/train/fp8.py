"""fp8 training matmuls for ``--precision fp8``: every linear layer of the trained stack as a scaled e4m3 matmul.

The scheme (docs/precision.md):

- forward: the input is quantised per row (one fp32 scale per token) and the weight per output row
  (``scaling="row"``) or per tensor (``scaling="tensor"``) to ``float8_e4m3fn`` with scale = amax / 448; the
  product of the fp8 values is taken and rescaled to the compute dtype.
- backward: straight-through. The gradients wrt the input and the weight are computed from the *dequantised* fp8
  values (the ones the forward used), in higher precision: fp32 on the ``emulate`` path, the compute dtype (bf16
  under autocast) on the ``scaled_mm`` path. The incoming gradient is not quantised (the usual e5m2 gradient
  matmuls are not done here), so only the forward matmul runs in fp8.
- the master weight stays an fp32 ``nn.Parameter``: :class:`Fp8Linear` has exactly ``nn.Linear``'s parameters and
  state_dict, so checkpoints and safetensors files do not change. What backward keeps is the fp8 codes and their
  scales (1 byte per element instead of 4).

Paths, chosen by :func:`resolve_fp8_path` for the device the input lives on:

- ``emulate``: quantise, dequantise to fp32 and matmul in fp32, in plain PyTorch. Exact and deterministic on any
  device; what runs on the CPU and what the tests check. It is a numerics reference, not a speed-up.
- ``scaled_mm``: ``torch._scaled_mm`` on CUDA GPUs of compute capability >= 8.9 (Ada, Hopper and later), row-wise
  scales, bf16 output. UNTESTED in this repository's CI (no GPU); its test is gated on such a device.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from stackwise_cli.errors import StackwiseError
from stackwise_cli.store.e4m3 import fp8_quantize_reference

SCALINGS = ("row", "tensor")
PATHS = ("auto", "emulate", "scaled_mm")
SCALED_MM_CAPABILITY = (8, 9)  # fp8 tensor cores: Ada (sm_89) and Hopper (sm_90) onwards
SCALED_MM_ALIGN = 16  # torch._scaled_mm wants every matrix dimension a multiple of 16


def resolve_scaling(name: str) -> str:
    if name not in SCALINGS:
        raise StackwiseError(f"fp8 scaling must be one of {', '.join(SCALINGS)}; got {name!r}")
    return name


def fp8_missing(device: torch.device | str) -> str | None:
    """What ``torch._scaled_mm`` lacks on ``device`` (None: it can run)."""
    dev = torch.device(device)
    if dev.type != "cuda":
        return f"a CUDA GPU (this tensor is on {dev.type})"
    if not hasattr(torch, "_scaled_mm"):
        return f"torch._scaled_mm, which this torch ({torch.__version__}) does not have"
    cap = torch.cuda.get_device_capability(dev)
    if cap < SCALED_MM_CAPABILITY:
        name = torch.cuda.get_device_name(dev)
        need = "sm_{}{}".format(*SCALED_MM_CAPABILITY)
        return f"fp8 tensor cores ({need} or newer); {name} is sm_{cap[0]}{cap[1]}"
    return None


def resolve_fp8_path(device: torch.device | str, path: str = "auto") -> str:
    """The fp8 matmul path for tensors on ``device``.

    ``auto``: ``emulate`` on the CPU (the documented reference path), ``scaled_mm`` on a CUDA GPU with fp8 tensor
    cores. A CUDA GPU without them is an error rather than a silent emulation (which would be slower than bf16), as
    is an explicit ``scaled_mm`` that cannot run; ``emulate`` runs anywhere.
    """
    if path not in PATHS:
        raise StackwiseError(f"fp8 path must be one of {', '.join(PATHS)}; got {path!r}")
    dev = torch.device(device)
    if path == "emulate" or (path == "auto" and dev.type == "cpu"):
        return "emulate"
    missing = fp8_missing(dev)
    if missing is not None:
        raise StackwiseError(
            f"--precision fp8 ({path} path) needs {missing}",
            hint="use --precision bf16, or the emulate path to study fp8 numerics (slow)",
        )
    return "scaled_mm"


# ----------------------------------------------------------------------------------------------------------------
# Quantisation


def quantize_e4m3(x: torch.Tensor, scaling: str = "row") -> tuple[torch.Tensor, torch.Tensor]:
    """x (..., D) -> (codes float8_e4m3fn (..., D), scales fp32 (..., 1) for ``row`` or (1,) * x.ndim for ``tensor``).

    scale = amax / 448 over each row (or the whole tensor), 1 where the amax is 0 (all codes 0 then), so that
    x ~= codes * scales: ``store.e4m3.fp8_quantize_reference``, the one e4m3 quantiser of the project,
    applied to the rows (or to the whole tensor as one row)."""
    per_row = resolve_scaling(scaling) == "row"
    codes, scales = fp8_quantize_reference(x if per_row else x.reshape(1, -1))
    codes = codes.view(torch.float8_e4m3fn).view(x.shape)
    return codes, scales.unsqueeze(-1) if per_row else scales.reshape((1,) * x.ndim)


def dequantize_e4m3(codes: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The values :func:`quantize_e4m3` encoded, computed in fp32 and returned in ``dtype``."""
    return (codes.float() * scales).to(dtype)


# ----------------------------------------------------------------------------------------------------------------
# The matmul


def _pad_to(t: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """Zero-pad a 2-D tensor at the bottom and right to (rows, cols); a no-op when already that size."""
    if t.shape == (rows, cols):
        return t
    out = torch.zeros(rows, cols, dtype=t.dtype, device=t.device)
    out[: t.shape[0], : t.shape[1]] = t
    return out


def _scaled_mm(
    qx: torch.Tensor, sx: torch.Tensor, qw: torch.Tensor, sw: torch.Tensor, out_dtype: torch.dtype
) -> torch.Tensor:
    """(N, K) x (M, K)^T on fp8 tensor cores with row-wise scales sx (N, 1) and sw (M, 1). UNTESTED without a GPU.

    The rowwise kernel wants bf16 output and every dimension a multiple of 16: pad with zeros (they add nothing to
    the sums; padded scales are 1) and slice the result back.
    """
    N, K = qx.shape
    M = qw.shape[0]
    a = SCALED_MM_ALIGN
    Np, Kp, Mp = -(-N // a) * a, -(-K // a) * a, -(-M // a) * a
    # fp8 tensors cannot be zero-filled by every op: pad through their uint8 bits (0 is +0.0 in e4m3).
    qx_p = _pad_to(qx.view(torch.uint8), Np, Kp).view(torch.float8_e4m3fn)  # (Np, Kp)
    qw_p = _pad_to(qw.view(torch.uint8), Mp, Kp).view(torch.float8_e4m3fn)  # (Mp, Kp)
    sx_p = torch.ones(Np, 1, dtype=torch.float32, device=qx.device)
    sx_p[:N] = sx
    sw_p = torch.ones(1, Mp, dtype=torch.float32, device=qw.device)
    sw_p[0, :M] = sw.expand(M, 1)[:, 0]  # a per-tensor scale is the same scale on every row
    # mat2 must be column-major: qw_p is (Mp, Kp) row-major, so its transpose is (Kp, Mp) column-major.
    y = torch._scaled_mm(qx_p, qw_p.t(), scale_a=sx_p, scale_b=sw_p, out_dtype=torch.bfloat16)  # (Np, Mp)
    return y[:N, :M].to(out_dtype)


class _Fp8Matmul(torch.autograd.Function):
    """y = x W^T (+ b) with x and W quantised to e4m3; straight-through backward from the dequantised values."""

    @staticmethod
    def forward(ctx, x, weight, bias, scaling: str, path: str, out_dtype: torch.dtype):
        x2 = x.reshape(-1, x.shape[-1])  # (N, K): one row per token
        qx, sx = quantize_e4m3(x2, "row")  # (N, K) fp8, (N, 1)
        qw, sw = quantize_e4m3(weight, scaling)  # (M, K) fp8, (M, 1) or (1, 1)
        if path == "emulate":
            with torch.autocast(x.device.type, enabled=False):
                y = F.linear(dequantize_e4m3(qx, sx), dequantize_e4m3(qw, sw))  # (N, M) fp32
                if bias is not None:
                    y = y + bias.float()
        else:
            y = _scaled_mm(qx, sx, qw, sw, torch.float32)
            if bias is not None:
                y = y + bias.float()
        # Keep the fp8 codes for backward, not x and W: a quarter of the bytes of fp32 activations.
        ctx.save_for_backward(qx, sx, qw, sw)
        ctx.path = path
        ctx.x_shape, ctx.x_dtype, ctx.w_dtype = x.shape, x.dtype, weight.dtype
        ctx.b_dtype = None if bias is None else bias.dtype
        ctx.out_dtype = out_dtype
        return y.to(out_dtype).reshape(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, gy):
        qx, sx, qw, sw = ctx.saved_tensors
        # Straight-through: differentiate the matmul of the dequantised values as if the rounding were the identity.
        gdtype = torch.float32 if ctx.path == "emulate" else ctx.out_dtype
        g = gy.reshape(-1, gy.shape[-1]).to(gdtype)  # (N, M)
        gx = gw = gb = None
        with torch.autocast(gy.device.type, enabled=False):
            if ctx.needs_input_grad[0]:
                gx = (g @ dequantize_e4m3(qw, sw, gdtype)).to(ctx.x_dtype).reshape(ctx.x_shape)  # (..., K)
            if ctx.needs_input_grad[1]:
                gw = (g.t() @ dequantize_e4m3(qx, sx, gdtype)).to(ctx.w_dtype)  # (M, K)
            if ctx.b_dtype is not None and ctx.needs_input_grad[2]:
                gb = g.float().sum(0).to(ctx.b_dtype)  # (M,)
        return gx, gw, gb, None, None, None


def fp8_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, scaling: str = "row", path: str = "auto"
) -> torch.Tensor:
    """``F.linear`` as an fp8 matmul. The output is in the compute dtype: the autocast dtype when autocast is on for
    x's device, else x's dtype (what ``F.linear`` would return)."""
    dev = x.device.type
    out_dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype
    return _Fp8Matmul.apply(x, weight, bias, resolve_scaling(scaling), resolve_fp8_path(x.device, path), out_dtype)


class Fp8Linear(nn.Linear):
    """``nn.Linear`` whose forward is an fp8 matmul; same parameters (fp32 master weight) and state_dict."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        device=None,
        dtype=None,
        scaling: str = "row",
        path: str = "auto",
    ):
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        self.scaling = resolve_scaling(scaling)
        if path not in PATHS:
            raise StackwiseError(f"fp8 path must be one of {', '.join(PATHS)}; got {path!r}")
        self.path = path  # resolved per call for the device the input lives on

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fp8_linear(x, self.weight, self.bias, self.scaling, self.path)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, scaling={self.scaling}, path={self.path}"


def to_fp8(module: nn.Module, scaling: str = "row", path: str = "auto") -> nn.Module:
    """Swap every ``nn.Linear`` in ``module`` (in place; returns it) for an :class:`Fp8Linear` holding the *same*
    Parameter objects, so an optimizer built before or after the swap updates the same tensors and the state_dict
    keys do not change. Layers that are already fp8 (or quantised subclasses such as bitsandbytes') are left alone;
    ``module`` itself is not swapped (wrap a bare ``nn.Linear`` in a container first)."""
    scaling = resolve_scaling(scaling)
    if path not in PATHS:
        raise StackwiseError(f"fp8 path must be one of {', '.join(PATHS)}; got {path!r}")
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is not nn.Linear:  # exact type: subclasses carry their own forward
                continue
            new = Fp8Linear(
                child.in_features,
                child.out_features,
                bias=child.bias is not None,
                device="meta",  # no allocation: the parameters are replaced just below
                scaling=scaling,
                path=path,
            )
            new.weight = child.weight
            new.bias = child.bias
            new.train(child.training)
            setattr(parent, name, new)
    return module
