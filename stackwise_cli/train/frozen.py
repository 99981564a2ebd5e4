"""Frozen stacks in a storage precision, and a stack's blocks under activation checkpointing.

A stack that is not being trained (the frozen suffix of the right-to-left curriculum, or the frozen prefix whose
outputs are cached) only has to be run, and differentiated *through*: the gradient reaches the trained stack by
way of the frozen one's input, never its weights. So its linear weights can be held in fewer bits:

============  ==================================================  =========================================
``dtype``     weight storage                                       compute
============  ==================================================  =========================================
``fp32``      unchanged (4 bytes/param)                            as before
``bf16``      bf16 (2 bytes/param)                                 ``F.linear(x, w.to(x.dtype))``
``fp8``       e4m3, one fp32 scale per output row (~1 byte/param)  dequantised to x's dtype, then ``F.linear``
``nf4/fp4``   bitsandbytes 4-bit, blocks of 64, double-quantised   bitsandbytes ``matmul_4bit``: fp32 on the
              absmax (~0.52 bytes/param)                           CPU, the input's (autocast) dtype on CUDA
============  ==================================================  =========================================

Norm weights, biases, the time network and anything else that is not a block's linear weight stay fp32 (they
are small). Measured errors and bytes are in docs/precision.md. The fp8 path dequantises in plain PyTorch on every
device (no ``torch._scaled_mm`` here): the weights are stored in fp8, the matmul is not.

Freeze after loading the fp32 weights, and save the fp32 originals, never a frozen module: its state_dict holds the
quantised buffers under other keys.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from stackwise_cli.errors import StackwiseError
from stackwise_cli.train.fp8 import dequantize_e4m3, quantize_e4m3

STORAGE_DTYPES = ("fp32", "bf16", "fp8", "nf4", "fp4")
BLOCKSIZE_4BIT = 64  # weights per absmax in bitsandbytes' 4-bit formats (QLoRA's choice)


def resolve_storage_dtype(name: str) -> str:
    if name not in STORAGE_DTYPES:
        raise StackwiseError(f"frozen storage dtype must be one of {', '.join(STORAGE_DTYPES)}; got {name!r}")
    return name


class FrozenLinear(nn.Module):
    """A linear layer with no trainable state: the weight held as a bf16 or fp8 buffer (``qweight``; fp8 adds the
    per-output-row fp32 ``scale`` (out, 1)), the bias (if any) as an fp32 buffer."""

    def __init__(self, linear: nn.Linear, dtype: str):
        super().__init__()
        if dtype not in ("bf16", "fp8"):
            raise StackwiseError(f"FrozenLinear stores bf16 or fp8 weights; got {dtype!r}")
        self.dtype_name = dtype
        self.in_features, self.out_features = linear.in_features, linear.out_features
        w = linear.weight.detach()  # (out, in)
        if dtype == "bf16":
            self.register_buffer("qweight", w.to(torch.bfloat16))
            self.register_buffer("scale", None)
        else:
            codes, scale = quantize_e4m3(w, "row")  # (out, in) e4m3, (out, 1) fp32
            self.register_buffer("qweight", codes)
            self.register_buffer("scale", scale)
        bias = None if linear.bias is None else linear.bias.detach().float()
        self.register_buffer("bias", bias)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The stored weight (out, in) in ``dtype``."""
        if self.scale is None:
            return self.qweight.to(dtype)
        return dequantize_e4m3(self.qweight, self.scale, dtype)

    @property
    def weight(self) -> torch.Tensor:
        """The weight as fp32, for code that reads ``linear.weight`` (e.g. MLA's absorbed decode)."""
        return self.dequantized_weight(torch.float32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.dequantized_weight(x.dtype), bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, dtype={self.dtype_name}"


@functools.cache
def _frozen_4bit_class() -> type:
    """The 4-bit frozen layer class, built on first use so bitsandbytes is imported only when it is needed."""
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise StackwiseError(
            "frozen storage nf4/fp4 needs bitsandbytes, which is not installed",
            hint="pip install bitsandbytes, or use fp8 or bf16",
        ) from None

    class Frozen4bitLinear(bnb.nn.Linear4bit):
        """``Linear4bit`` with the compute dtype chosen per call: the autocast dtype on CUDA under autocast, else
        the input's dtype on CUDA, fp32 on the CPU (bitsandbytes' CPU path is only fast and tested in fp32)."""

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            dev = x.device.type
            if dev == "cuda":
                compute = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype
            else:
                compute = torch.float32
            bias = None if self.bias is None else self.bias.to(compute)
            y = bnb.matmul_4bit(x.to(compute), self.weight, bias=bias, quant_state=self.weight.quant_state)
            return y if dev == "cuda" else y.to(x.dtype)

        def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
            """The 4-bit weight decoded to (out, in) in ``dtype``."""
            return bnb.functional.dequantize_4bit(self.weight.data, self.weight.quant_state).to(dtype)

    return Frozen4bitLinear


def _make_4bit(linear: nn.Linear, quant_type: str) -> nn.Module:
    """A bitsandbytes ``Linear4bit`` holding ``linear``'s weight quantised (blocks of 64, double-quantised absmax)
    on the weight's device; the bias stays fp32."""
    import bitsandbytes as bnb

    w = linear.weight.detach()
    out = _frozen_4bit_class()(
        linear.in_features,
        linear.out_features,
        bias=linear.bias is not None,
        compute_dtype=torch.float32,
        quant_type=quant_type,
        device="meta",  # the placeholder weight is replaced just below
    )
    out.weight = bnb.nn.Params4bit(
        w.float().clone(), requires_grad=False, blocksize=BLOCKSIZE_4BIT, quant_type=quant_type, module=out
    ).to(w.device)  # quantisation happens on this move
    if linear.bias is not None:
        out.bias = nn.Parameter(linear.bias.detach().float().clone(), requires_grad=False)
    return out


def freeze(module: nn.Module, dtype: str) -> nn.Module:
    """Freeze ``module`` (in place; returns it): ``requires_grad`` False on every parameter and every ``nn.Linear``
    (Fp8Linear included) except the time network's replaced by a frozen layer holding its weight in ``dtype`` (see
    the module docstring).

    Gradients still flow to the module's input. Layers already frozen are left as they are; ``module`` itself is not
    swapped (wrap a bare ``nn.Linear`` in a container first).
    """
    dtype = resolve_storage_dtype(dtype)
    for p in module.parameters():
        p.requires_grad_(False)
    if dtype == "fp32":
        return module
    from stackwise_cli.model.model import TimeEmbedding

    for parent in list(module.modules()):
        if isinstance(parent, TimeEmbedding):
            continue  # small (2 d^2 per stack), and its forward reads inp.weight.dtype, which 4-bit layers change
        for name, child in list(parent.named_children()):
            if not isinstance(child, nn.Linear) or hasattr(child, "dequantized_weight"):
                continue  # not a linear, or one already frozen (the 4-bit layers subclass nn.Linear)
            new = FrozenLinear(child, dtype) if dtype in ("bf16", "fp8") else _make_4bit(child, dtype)
            new.train(child.training)
            setattr(parent, name, new)
    return module


def frozen_bytes(module: nn.Module) -> int:
    """Bytes held by ``module``'s parameters and buffers, counted once each, including bitsandbytes' quantisation
    state (absmax, its second-level absmax and the code tables) for 4-bit weights."""
    seen: set[int] = set()
    total = 0

    def add(t: torch.Tensor | None) -> None:
        nonlocal total
        if not isinstance(t, torch.Tensor):
            return
        key = t.untyped_storage().data_ptr() if t.device.type != "meta" else id(t)
        if key in seen and key != 0:
            return
        seen.add(key)
        total += t.numel() * t.element_size()

    for t in list(module.parameters()) + list(module.buffers()):
        add(t)
        state = getattr(t, "quant_state", None)
        while state is not None:  # the 4-bit state, then the nested state of its absmax
            add(state.absmax)
            add(state.code)
            add(getattr(state, "offset", None))
            state = getattr(state, "state2", None)
    return total


# ----------------------------------------------------------------------------------------------------------------
# Activation checkpointing


def checkpoint_blocks(stack: nn.Module) -> nn.Module:
    """Run each block of ``stack`` under non-reentrant ``torch.utils.checkpoint`` from now on (in place; returns it):
    backward keeps only each block's input and recomputes the block. The same values as the plain forward, bit for
    bit in fp32.

    Each block's own ``forward`` is wrapped, once, so the stack and its blocks stay the modules they were: the same
    state_dict keys and parameters, hooks (FSDP2's) still around the block, and ``Stack.forward`` unchanged."""
    for block in stack.blocks:
        plain = block.forward
        block.forward = functools.partial(checkpoint, plain, use_reentrant=False)
    return stack
